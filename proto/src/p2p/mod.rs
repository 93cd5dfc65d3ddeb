//! The control plane: DHT keys, signed node records and the libp2p stack that nodes and
//! clients share. Enabled by the `p2p` feature.

mod keys;
mod record;
mod swarm;

pub use keys::{
    PROVIDER_SHARDS, is_provider_key, layer_key, node_record_key, parse_node_record_key,
    provider_shard,
};
pub use record::{
    MAX_NODE_RECORD_BYTES, NODE_RECORD_DOMAIN, NodeLimits, NodeRecord, RecordClock, RecordError,
};
pub use swarm::{
    BOOTSTRAP_REFRESH, Behaviour, BehaviourEvent, Bootstrapper, DhtSettings, IDENTIFY_PROTOCOL,
    KAD_PROTOCOL, MAX_BOOTSTRAP_BACKOFF, MAX_KAD_MESSAGE_BYTES, MAX_PROVIDERS_PER_KEY,
    MIN_BOOTSTRAP_BACKOFF, QUIC_HANDSHAKE_TIMEOUT, build_swarm, learn_addresses, peer_of, routable,
};

/// Milliseconds since the Unix epoch; 0 if the clock is before it.
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
