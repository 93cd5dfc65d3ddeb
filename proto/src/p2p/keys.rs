//! DHT keys. Each is a readable string, hashed by Kademlia into its key space.

use libp2p::PeerId;
use libp2p::kad::RecordKey;

const PREFIX: &str = "expertnet/v1";

/// Provider keys per layer. libp2p-kad 0.49 returns at most 20 providers (its replication
/// factor) per storing peer in a provider lookup. So the nodes of a layer are split over
/// this many keys by their peer id, and clients look up all of them: up to about 80 nodes
/// per layer are visible.
// NOTE: a layer hosted by many more nodes than 80 needs more shards; the count is part of
// the protocol, the same for every peer.
pub const PROVIDER_SHARDS: u32 = 4;

/// The shard of a layer's provider keys that `peer` provides.
pub fn provider_shard(peer: &PeerId) -> u32 {
    let digest = blake3::hash(&peer.to_bytes());
    u32::from(digest.as_bytes()[0]) % PROVIDER_SHARDS
}

/// The provider key of one layer of one model, shard `shard`. A node provides the key of
/// its shard for each layer in which it hosts experts: one provider key per hosted layer,
/// not one per expert.
pub fn layer_key(model_id: &str, layer: u32, shard: u32) -> RecordKey {
    RecordKey::new(&format!("{PREFIX}/layer/{model_id}/{layer}/{shard}"))
}

/// The key under which a node publishes its signed node record.
pub fn node_record_key(peer_id: &PeerId) -> RecordKey {
    RecordKey::new(&format!("{PREFIX}/node/{peer_id}"))
}

/// The peer a node record key belongs to, or `None` for any other key.
pub fn parse_node_record_key(key: &RecordKey) -> Option<PeerId> {
    let text = std::str::from_utf8(key.as_ref()).ok()?;
    text.strip_prefix(PREFIX)?
        .strip_prefix("/node/")?
        .parse()
        .ok()
}

/// Whether the key is one this protocol uses for provider records.
pub fn is_provider_key(key: &RecordKey) -> bool {
    std::str::from_utf8(key.as_ref()).is_ok_and(|text| {
        text == format!("{PREFIX}/nodes")
            || text
                .strip_prefix(PREFIX)
                .is_some_and(|rest| rest.starts_with("/layer/"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_record_keys_roundtrip() {
        let peer = PeerId::random();
        assert_eq!(parse_node_record_key(&node_record_key(&peer)), Some(peer));
        assert_eq!(parse_node_record_key(&layer_key("m", 0, 0)), None);
        assert_eq!(
            parse_node_record_key(&RecordKey::new(&"expertnet/v1/node/x")),
            None
        );
    }

    #[test]
    fn peers_spread_over_the_shards() {
        let mut counts = [0u32; PROVIDER_SHARDS as usize];
        for _ in 0..400 {
            counts[provider_shard(&PeerId::random()) as usize] += 1;
        }
        assert!(counts.iter().all(|&n| n > 50), "{counts:?}");
    }

    #[test]
    fn provider_keys_are_recognized() {
        assert!(is_provider_key(&layer_key("mixtral-00", 3, 1)));
        assert!(!is_provider_key(&node_record_key(&PeerId::random())));
        assert!(!is_provider_key(&RecordKey::new(&"something else")));
    }
}
