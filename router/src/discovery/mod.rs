//! The client's side of discovery: finds the nodes that host a layer's experts through the
//! Kademlia DHT and turns their signed node records into replicas with gRPC endpoints.
//!
//! [`Discovery`] is a handle to a task that owns a libp2p swarm in Kademlia client mode.
//! Results are cached for `cache_ttl` and refreshed in the background while they are in
//! use; a replica the caller reports as failed is dropped from the cache at once.

mod event_loop;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use expertnet_proto::p2p::{DhtSettings, NodeLimits, NodeRecord};
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot};

/// Settings of a discovery client.
#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    /// Peers to join the network through, each `/ip4/HOST/tcp/PORT/p2p/PEER_ID`.
    pub bootstrap: Vec<Multiaddr>,
    /// How long a resolved layer is served from the cache. Default 10 s.
    pub cache_ttl: Duration,
    /// Limit on one lookup (providers and their node records). Default 5 s.
    pub lookup_timeout: Duration,
    /// How far in the future a node record may be dated. Default 30 s.
    pub max_clock_skew: Duration,
    /// DHT settings of the network; `record_ttl` bounds how old a node record may be.
    pub dht: DhtSettings,
    /// Keep loopback gRPC endpoints. `None` keeps them only when every bootstrap address
    /// is loopback, that is when the whole network runs on this machine.
    pub allow_loopback_endpoints: Option<bool>,
}

impl DiscoveryConfig {
    pub fn new(bootstrap: Vec<Multiaddr>) -> Self {
        Self {
            bootstrap,
            cache_ttl: Duration::from_secs(10),
            lookup_timeout: Duration::from_secs(5),
            max_clock_skew: Duration::from_secs(30),
            dht: DhtSettings::default(),
            allow_loopback_endpoints: None,
        }
    }
}

/// Errors of discovery.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoveryError {
    #[error("cannot set up libp2p: {0}")]
    Setup(String),
    #[error("no bootstrap address given; pass --bootstrap /ip4/HOST/tcp/PORT/p2p/PEER_ID")]
    NoBootstrap,
    #[error(
        "could not reach any bootstrap peer within {timeout:?} ({failures}); check the address and the peer id, and that a node listens there"
    )]
    BootstrapTimeout { failures: String, timeout: Duration },
    #[error("the discovery task has stopped")]
    Stopped,
}

/// One node's copy of an expert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    pub peer_id: PeerId,
    /// gRPC endpoints, such as `http://127.0.0.1:50051`; never empty.
    pub endpoints: Vec<String>,
    /// Token rows queued on the node when it published its record.
    pub load_tokens: u32,
    /// Token rows the node accepts into its queue.
    pub capacity_tokens: u32,
    pub limits: NodeLimits,
    /// The node's clock when it published the record, milliseconds since the Unix epoch.
    pub record_timestamp_ms: u64,
}

/// The replicas of every expert of one layer that discovery found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerReplicas {
    pub model_id: String,
    pub layer: u32,
    /// Expert index to its replicas. Experts without replicas are absent.
    pub experts: BTreeMap<u32, Vec<Replica>>,
}

impl LayerReplicas {
    pub fn replicas(&self, expert: u32) -> &[Replica] {
        self.experts.get(&expert).map_or(&[], Vec::as_slice)
    }
}

/// Counters of a discovery client.
#[derive(Debug, Default)]
pub struct DiscoveryStats {
    rejected: std::sync::Mutex<BTreeMap<&'static str, u64>>,
    lookups: AtomicU64,
    cache_hits: AtomicU64,
}

impl DiscoveryStats {
    pub(crate) fn record_rejected(&self, reason: &'static str) {
        let mut rejected = self.rejected.lock().unwrap_or_else(|e| e.into_inner());
        *rejected.entry(reason).or_default() += 1;
    }

    /// Node records rejected for `reason` (such as `bad_signature`, `future_timestamp`,
    /// `too_large`), so far.
    pub fn rejected(&self, reason: &str) -> u64 {
        let rejected = self.rejected.lock().unwrap_or_else(|e| e.into_inner());
        rejected.get(reason).copied().unwrap_or(0)
    }

    /// DHT lookups started so far.
    pub fn lookups(&self) -> u64 {
        self.lookups.load(Ordering::Relaxed)
    }

    /// Resolutions answered from the cache so far.
    pub fn cache_hits(&self) -> u64 {
        self.cache_hits.load(Ordering::Relaxed)
    }
}

#[derive(Debug)]
enum Command {
    WaitBootstrapped {
        reply: oneshot::Sender<()>,
    },
    Resolve {
        model_id: String,
        layer: u32,
        fresh: bool,
        reply: oneshot::Sender<Arc<LayerReplicas>>,
    },
    Nodes {
        reply: oneshot::Sender<Vec<NodeRecord>>,
    },
    ReportFailure {
        peer: PeerId,
    },
    DescribeBootstrap {
        reply: oneshot::Sender<String>,
    },
}

/// A handle to the discovery task. Cloning it is cheap; the task stops when every handle
/// is dropped.
#[derive(Debug, Clone)]
pub struct Discovery {
    commands: mpsc::Sender<Command>,
    stats: Arc<DiscoveryStats>,
    peer_id: PeerId,
    bootstrap: Vec<Multiaddr>,
}

/// Commands waiting for the task. A full queue makes callers wait; `report_failure` drops
/// its report instead, since a later report or the next refresh has the same effect.
const COMMAND_QUEUE: usize = 256;

impl Discovery {
    /// Starts the discovery task with a new random identity and dials the bootstrap peers.
    ///
    /// # Errors
    /// [`DiscoveryError::NoBootstrap`] without bootstrap addresses,
    /// [`DiscoveryError::Setup`] when libp2p cannot start.
    pub fn start(config: DiscoveryConfig) -> Result<Self, DiscoveryError> {
        if config.bootstrap.is_empty() {
            return Err(DiscoveryError::NoBootstrap);
        }
        let keypair = libp2p::identity::Keypair::generate_ed25519();
        let peer_id = keypair.public().to_peer_id();
        let stats = Arc::new(DiscoveryStats::default());
        let (commands, receiver) = mpsc::channel(COMMAND_QUEUE);
        let bootstrap = config.bootstrap.clone();
        event_loop::spawn(&keypair, config, receiver, Arc::clone(&stats))?;
        Ok(Self {
            commands,
            stats,
            peer_id,
            bootstrap,
        })
    }

    /// The client's own (random) peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    pub fn stats(&self) -> &Arc<DiscoveryStats> {
        &self.stats
    }

    /// Waits until the client is connected to the network and has filled its routing table.
    ///
    /// # Errors
    /// [`DiscoveryError::BootstrapTimeout`] naming the bootstrap addresses.
    pub async fn wait_bootstrapped(&self, timeout: Duration) -> Result<(), DiscoveryError> {
        let (reply, receiver) = oneshot::channel();
        self.send(Command::WaitBootstrapped { reply }).await?;
        match tokio::time::timeout(timeout, receiver).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(DiscoveryError::Stopped),
            Err(_) => {
                let (reply, receiver) = oneshot::channel();
                self.send(Command::DescribeBootstrap { reply }).await?;
                let failures = receiver.await.unwrap_or_else(|_| {
                    self.bootstrap
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                });
                Err(DiscoveryError::BootstrapTimeout { failures, timeout })
            }
        }
    }

    /// The replicas of every expert of a layer, from the cache when fresh, else from a DHT
    /// lookup bounded by the lookup timeout. A layer nobody hosts resolves to no experts.
    ///
    /// # Errors
    /// [`DiscoveryError::Stopped`] when the task has stopped.
    ///
    /// # Cancel safety
    /// Cancelling the future abandons only this caller's wait; the lookup completes and
    /// fills the cache.
    pub async fn resolve(
        &self,
        model_id: &str,
        layer: u32,
    ) -> Result<Arc<LayerReplicas>, DiscoveryError> {
        self.resolve_with(model_id, layer, false).await
    }

    /// As [`Discovery::resolve`], but always runs a new lookup.
    ///
    /// # Errors
    /// [`DiscoveryError::Stopped`] when the task has stopped.
    pub async fn resolve_fresh(
        &self,
        model_id: &str,
        layer: u32,
    ) -> Result<Arc<LayerReplicas>, DiscoveryError> {
        self.resolve_with(model_id, layer, true).await
    }

    async fn resolve_with(
        &self,
        model_id: &str,
        layer: u32,
        fresh: bool,
    ) -> Result<Arc<LayerReplicas>, DiscoveryError> {
        let (reply, receiver) = oneshot::channel();
        self.send(Command::Resolve {
            model_id: model_id.to_owned(),
            layer,
            fresh,
            reply,
        })
        .await?;
        receiver.await.map_err(|_| DiscoveryError::Stopped)
    }

    /// The current node records of the nodes a walk of the DHT finds, for listings. A walk
    /// makes 16 random lookups, which cover a network of a few hundred nodes; larger
    /// networks are sampled.
    ///
    /// # Errors
    /// [`DiscoveryError::Stopped`] when the task has stopped.
    pub async fn nodes(&self) -> Result<Vec<NodeRecord>, DiscoveryError> {
        let (reply, receiver) = oneshot::channel();
        self.send(Command::Nodes { reply }).await?;
        receiver.await.map_err(|_| DiscoveryError::Stopped)
    }

    /// Drops every replica of `peer` from the cache at once. The node comes back only when
    /// a later lookup finds its record again.
    pub fn report_failure(&self, peer: PeerId) {
        if self
            .commands
            .try_send(Command::ReportFailure { peer })
            .is_err()
        {
            tracing::debug!(%peer, "discovery command queue full; failure report dropped");
        }
    }

    async fn send(&self, command: Command) -> Result<(), DiscoveryError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| DiscoveryError::Stopped)
    }
}
