//! The libp2p stack shared by nodes and clients: TCP and QUIC, noise, yamux, identify,
//! ping, and Kademlia under a protocol name of our own.

use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::kad::store::{MemoryStore, MemoryStoreConfig};
use libp2p::kad::{self, Mode, StoreInserts};
use libp2p::swarm::NetworkBehaviour;
use libp2p::{StreamProtocol, Swarm, identify, noise, ping, tcp, yamux};

use super::record::MAX_NODE_RECORD_BYTES;

/// The Kademlia protocol of expertnet. A network of its own, separate from other libp2p
/// DHTs such as IPFS's.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/expertnet/kad/1.0.0");

/// The identify protocol version string.
pub const IDENTIFY_PROTOCOL: &str = "/expertnet/id/1.0.0";

/// Largest Kademlia message. libp2p's default is 16 KiB; a `GetProviders` answer for a key
/// with [`MAX_PROVIDERS_PER_KEY`] providers of about 150 bytes each needs up to 38 KiB.
/// Every peer of the network must use the same value.
pub const MAX_KAD_MESSAGE_BYTES: usize = 64 * 1024;

/// Providers kept per key. A layer key has one provider per node hosting any expert of
/// that layer.
// NOTE: a layer hosted by more nodes than this is only partly visible from each storing
// peer; a network that large needs provider keys split by expert ranges.
pub const MAX_PROVIDERS_PER_KEY: usize = 256;

/// Limit on a QUIC handshake. Within a network a handshake takes a few round trips.
pub const QUIC_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// How often a connected peer refreshes its routing table with a Kademlia bootstrap.
pub const BOOTSTRAP_REFRESH: Duration = Duration::from_secs(300);

/// Settings of the DHT, the same for every peer of a network.
#[derive(Debug, Clone)]
pub struct DhtSettings {
    /// How long stored node records and provider records live without a republish.
    pub record_ttl: Duration,
    /// Limit on a Kademlia query.
    pub query_timeout: Duration,
    /// How long a connection without active streams stays open.
    pub idle_connection_timeout: Duration,
    /// Records kept by this peer's store, for other peers' node records.
    pub max_records: usize,
    /// Provider keys kept by this peer's store (layer keys of all models, and the
    /// directory key).
    pub max_provider_keys: usize,
}

impl Default for DhtSettings {
    /// TTL 90 s, query timeout 10 s, idle connections closed after 120 s, 16,384 records
    /// and 16,384 provider keys (for example 100 models of 64 layers with room to spare).
    fn default() -> Self {
        Self {
            record_ttl: Duration::from_secs(90),
            query_timeout: Duration::from_secs(10),
            idle_connection_timeout: Duration::from_secs(120),
            max_records: 16_384,
            max_provider_keys: 16_384,
        }
    }
}

/// The network behaviour of every expertnet peer.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    pub kad: kad::Behaviour<MemoryStore>,
    pub identify: identify::Behaviour,
    pub ping: ping::Behaviour,
}

impl std::fmt::Debug for Behaviour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Behaviour").finish_non_exhaustive()
    }
}

/// Builds a swarm with the node's identity. `server` selects Kademlia's server mode (nodes,
/// which store records and answer queries) or client mode (clients, which only query).
/// Server mode is set explicitly: libp2p would otherwise wait for a confirmed external
/// address before answering queries. Inbound records are filtered: the caller validates
/// each and stores it.
///
/// # Errors
/// A message when a transport cannot be set up.
pub fn build_swarm(
    keypair: &Keypair,
    server: bool,
    settings: &DhtSettings,
) -> Result<Swarm<Behaviour>, String> {
    let peer_id = keypair.public().to_peer_id();
    let idle = settings.idle_connection_timeout;
    let mut kad_config = kad::Config::new(KAD_PROTOCOL);
    kad_config
        .set_query_timeout(settings.query_timeout)
        .set_record_ttl(Some(settings.record_ttl))
        .set_provider_record_ttl(Some(settings.record_ttl))
        // Nodes republish their own records; stored copies are not re-replicated, so a
        // node that is gone disappears once its records expire.
        .set_publication_interval(None)
        .set_provider_publication_interval(None)
        .set_replication_interval(None)
        .set_record_filtering(StoreInserts::FilterBoth)
        // Callers bootstrap when they connect to the network and every
        // BOOTSTRAP_REFRESH after; libp2p's own timer warns while a first node is alone.
        .set_periodic_bootstrap_interval(None)
        .set_max_packet_size(MAX_KAD_MESSAGE_BYTES);
    let store_config = MemoryStoreConfig {
        max_records: settings.max_records,
        max_value_bytes: MAX_NODE_RECORD_BYTES,
        max_providers_per_key: MAX_PROVIDERS_PER_KEY,
        max_provided_keys: settings.max_provider_keys,
    };

    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair.clone())
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| format!("TCP transport: {e}"))?
        .with_quic_config(|mut config| {
            // A crashed peer never answers a QUIC handshake (UDP has no reset); give up
            // sooner than the default so lookups that meet it are not held for long.
            config.handshake_timeout = QUIC_HANDSHAKE_TIMEOUT;
            config
        })
        .with_dns()
        .map_err(|e| format!("DNS resolver: {e}"))?
        .with_behaviour(|key| {
            let mut kad = kad::Behaviour::with_config(
                peer_id,
                MemoryStore::with_config(peer_id, store_config),
                kad_config,
            );
            kad.set_mode(Some(if server { Mode::Server } else { Mode::Client }));
            Behaviour {
                kad,
                // Peers learn only the addresses the caller adds as external: listen
                // addresses include loopback and wildcard interfaces that may not be
                // reachable from elsewhere.
                identify: identify::Behaviour::new(
                    identify::Config::new(IDENTIFY_PROTOCOL.to_owned(), key.public())
                        .with_agent_version(format!("expertnet/{}", crate::VERSION))
                        .with_hide_listen_addrs(true),
                ),
                ping: ping::Behaviour::default(),
            }
        })
        .map_err(|e| format!("behaviour: {e}"))?
        .with_swarm_config(|config| config.with_idle_connection_timeout(idle))
        .build();
    Ok(swarm)
}

/// Dials the bootstrap peers until connected, with exponential backoff, and again
/// whenever the connection to one of them is lost, so a bootstrap peer that starts late or
/// restarts rejoins the network.
#[derive(Debug)]
pub struct Bootstrapper {
    peers: Vec<BootstrapPeer>,
    backoff: Duration,
    next_attempt: std::time::Instant,
    next_refresh: std::time::Instant,
}

#[derive(Debug)]
struct BootstrapPeer {
    address: libp2p::Multiaddr,
    /// From the address's `/p2p/` suffix, or learned from the first connection.
    peer: Option<libp2p::PeerId>,
    /// Why the last dial failed, if it did.
    last_error: Option<String>,
}

/// First retry delay of [`Bootstrapper`]; it doubles up to [`MAX_BOOTSTRAP_BACKOFF`].
pub const MIN_BOOTSTRAP_BACKOFF: Duration = Duration::from_millis(500);
pub const MAX_BOOTSTRAP_BACKOFF: Duration = Duration::from_secs(10);

impl Bootstrapper {
    pub fn new(addresses: Vec<libp2p::Multiaddr>) -> Self {
        let peers = addresses
            .into_iter()
            .map(|address| BootstrapPeer {
                peer: peer_of(&address),
                address,
                last_error: None,
            })
            .collect();
        let now = std::time::Instant::now();
        Self {
            peers,
            backoff: MIN_BOOTSTRAP_BACKOFF,
            next_attempt: now,
            next_refresh: now + BOOTSTRAP_REFRESH,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Adds the bootstrap peers with known ids to Kademlia's routing table and dials every
    /// bootstrap address whose peer is not connected, if a retry is due. Returns the number
    /// of dials started. Every [`BOOTSTRAP_REFRESH`] it also runs a Kademlia bootstrap to
    /// refresh the routing table.
    pub fn tick(&mut self, swarm: &mut Swarm<Behaviour>, now: std::time::Instant) -> usize {
        if now >= self.next_refresh {
            self.next_refresh = now + BOOTSTRAP_REFRESH;
            let _ = swarm.behaviour_mut().kad.bootstrap();
        }
        if self.peers.is_empty() || now < self.next_attempt {
            return 0;
        }

        let mut dialed = 0;
        for bootstrap in &mut self.peers {
            if bootstrap.peer.is_some_and(|peer| swarm.is_connected(&peer)) {
                continue;
            }
            if let Some(peer) = bootstrap.peer {
                swarm
                    .behaviour_mut()
                    .kad
                    .add_address(&peer, bootstrap.address.clone());
            }
            match swarm.dial(bootstrap.address.clone()) {
                Ok(()) => dialed += 1,
                Err(error) => {
                    tracing::debug!(address = %bootstrap.address, %error, "bootstrap dial failed");
                    bootstrap.last_error = Some(error.to_string());
                }
            }
        }

        if dialed == 0 {
            self.backoff = MIN_BOOTSTRAP_BACKOFF;
        } else {
            self.backoff = (self.backoff * 2).min(MAX_BOOTSTRAP_BACKOFF);
        }
        self.next_attempt = now + self.backoff;
        dialed
    }

    /// Records a new connection. When it is to a bootstrap address given without a peer
    /// id, remembers the peer id and adds the address to Kademlia's routing table. Returns
    /// whether the peer is a bootstrap peer.
    pub fn on_connected(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: &libp2p::PeerId,
        address: &libp2p::Multiaddr,
    ) -> bool {
        let mut known = false;
        for bootstrap in &mut self.peers {
            if bootstrap.peer.is_none() && &bootstrap.address == address {
                bootstrap.peer = Some(*peer);
                swarm.behaviour_mut().kad.add_address(peer, address.clone());
            }
            if bootstrap.peer.as_ref() == Some(peer) {
                known = true;
                bootstrap.last_error = None;
            }
        }
        known
    }

    /// Records a failed dial. Returns the bootstrap address it was for, if any, so the
    /// caller can report it.
    pub fn on_dial_failed(
        &mut self,
        peer: Option<&libp2p::PeerId>,
        error: &libp2p::swarm::DialError,
    ) -> Option<libp2p::Multiaddr> {
        let failed_addresses: Vec<&libp2p::Multiaddr> = match error {
            libp2p::swarm::DialError::Transport(attempts) => {
                attempts.iter().map(|(address, _)| address).collect()
            }
            _ => Vec::new(),
        };
        let bootstrap = self.peers.iter_mut().find(|bootstrap| {
            (peer.is_some() && bootstrap.peer.as_ref() == peer)
                || failed_addresses.contains(&&bootstrap.address)
        })?;
        bootstrap.last_error = Some(error.to_string());
        Some(bootstrap.address.clone())
    }

    /// The bootstrap addresses with the reason their last dial failed, for error messages.
    pub fn describe_failures(&self) -> String {
        let failures: Vec<String> = self
            .peers
            .iter()
            .map(|bootstrap| match &bootstrap.last_error {
                Some(error) => format!("{}: {error}", bootstrap.address),
                None => format!("{}: no answer yet", bootstrap.address),
            })
            .collect();
        failures.join("; ")
    }
}

/// The peer id at the end of a multiaddr (`.../p2p/<peer id>`), if any.
pub fn peer_of(address: &libp2p::Multiaddr) -> Option<libp2p::PeerId> {
    address.iter().find_map(|part| match part {
        libp2p::multiaddr::Protocol::P2p(peer) => Some(peer),
        _ => None,
    })
}

/// Handles an identify report: the remote's listen addresses go into Kademlia's routing
/// table when it serves our Kademlia protocol, so peers learn each other's dialable
/// addresses rather than the ephemeral ports of inbound connections.
pub fn learn_addresses(swarm: &mut Swarm<Behaviour>, peer: &libp2p::PeerId, info: &identify::Info) {
    if !info.protocols.contains(&KAD_PROTOCOL) {
        return;
    }
    for address in &info.listen_addrs {
        if routable(address) {
            swarm.behaviour_mut().kad.add_address(peer, address.clone());
        }
    }
}

/// Whether an address can be dialed: not unspecified (0.0.0.0, ::).
pub fn routable(address: &libp2p::Multiaddr) -> bool {
    address.iter().all(|part| match part {
        libp2p::multiaddr::Protocol::Ip4(ip) => !ip.is_unspecified(),
        libp2p::multiaddr::Protocol::Ip6(ip) => !ip.is_unspecified(),
        _ => true,
    })
}
