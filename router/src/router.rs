//! The shared state of a client of the network: discovery, what it has measured of each
//! node, its connections and its counters. Remote MoE layers call through it.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use expertnet_model::rng::SplitMix64;
use expertnet_proto::DType;
use libp2p::PeerId;

use crate::client::{ClientError, NodeClient};
use crate::discovery::{Discovery, DiscoveryConfig, DiscoveryError, Replica};
use crate::policy::{PeerBook, PeerPolicy};

/// Settings of a [`Router`].
#[derive(Debug, Clone)]
pub struct RouterConfig {
    pub discovery: DiscoveryConfig,
    /// Experts per token; `None` uses the checkpoint's `num_experts_per_tok`.
    pub top_k: Option<usize>,
    /// Minimum number of experts that must serve each token, or the layer call fails. Default 1.
    pub k_min: usize,
    /// Limit on one layer call, covering the lookup, the calls, retries, hedges and spot
    /// checks. Default 5 s.
    pub deadline: Duration,
    /// Send a slow request to a second replica too. Default on.
    pub hedging: bool,
    /// Replica choice, hedge timing and bans.
    pub peers: PeerPolicy,
    /// Share of expert results also computed by a second replica and compared, from 0 to
    /// 1. Default 0.01.
    pub spot_check_rate: f64,
    /// Largest per-row relative difference between two replicas' outputs that still counts
    /// as agreement. Default 1e-3, which bf16 and f16 nodes stay within on f32 tokens.
    pub spot_check_tolerance: f32,
    /// Let the client's own copy of an expert, when the checkpoint has it, referee
    /// spot-check mismatches. Off, a third replica referees. Default on.
    pub local_referee: bool,
    /// File to append the evidence of every spot-check mismatch to, one JSON object per
    /// line. `None` keeps it in the log only.
    pub evidence_file: Option<PathBuf>,
    /// Dtype of the hidden states on the wire. Default f32.
    pub wire_dtype: DType,
    /// Limit on connecting to one node. Default 2 s.
    pub connect_timeout: Duration,
    /// How long [`Router::connect`] waits to join the network. Default 10 s.
    pub bootstrap_timeout: Duration,
    /// Seed of replica exploration and spot-check sampling; `None` picks one at random.
    pub seed: Option<u64>,
}

impl RouterConfig {
    pub fn new(discovery: DiscoveryConfig) -> Self {
        Self {
            discovery,
            top_k: None,
            k_min: 1,
            deadline: Duration::from_secs(5),
            hedging: true,
            peers: PeerPolicy::default(),
            spot_check_rate: 0.01,
            spot_check_tolerance: 1e-3,
            local_referee: true,
            evidence_file: None,
            wire_dtype: DType::F32,
            connect_timeout: Duration::from_secs(2),
            bootstrap_timeout: Duration::from_secs(10),
            seed: None,
        }
    }
}

/// Errors of starting a router.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RouterError {
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    #[error("invalid router setting {name} = {value}: {reason}")]
    Setting {
        name: &'static str,
        value: String,
        reason: &'static str,
    },
}

/// Counters of a router since it started.
#[derive(Debug, Default)]
pub struct RouterStats {
    pub(crate) layer_calls: AtomicU64,
    pub(crate) failed_layer_calls: AtomicU64,
    pub(crate) tokens: AtomicU64,
    pub(crate) dispatches: AtomicU64,
    pub(crate) hedges: AtomicU64,
    pub(crate) replica_fallbacks: AtomicU64,
    pub(crate) expert_fallbacks: AtomicU64,
    pub(crate) spot_checks: AtomicU64,
    pub(crate) spot_check_mismatches: AtomicU64,
    pub(crate) dishonest_bans: AtomicU64,
    failures: Mutex<BTreeMap<&'static str, u64>>,
}

impl RouterStats {
    pub fn layer_calls(&self) -> u64 {
        self.layer_calls.load(Ordering::Relaxed)
    }

    pub fn failed_layer_calls(&self) -> u64 {
        self.failed_layer_calls.load(Ordering::Relaxed)
    }

    pub fn tokens(&self) -> u64 {
        self.tokens.load(Ordering::Relaxed)
    }

    pub fn dispatches(&self) -> u64 {
        self.dispatches.load(Ordering::Relaxed)
    }

    pub fn hedges(&self) -> u64 {
        self.hedges.load(Ordering::Relaxed)
    }

    pub fn replica_fallbacks(&self) -> u64 {
        self.replica_fallbacks.load(Ordering::Relaxed)
    }

    pub fn expert_fallbacks(&self) -> u64 {
        self.expert_fallbacks.load(Ordering::Relaxed)
    }

    pub fn spot_checks(&self) -> u64 {
        self.spot_checks.load(Ordering::Relaxed)
    }

    pub fn spot_check_mismatches(&self) -> u64 {
        self.spot_check_mismatches.load(Ordering::Relaxed)
    }

    /// Nodes banned for returning a wrong result.
    pub fn dishonest_bans(&self) -> u64 {
        self.dishonest_bans.load(Ordering::Relaxed)
    }

    /// Requests that failed for `kind`: a [`VerifyError::kind`](crate::VerifyError::kind)
    /// such as `bad_signature` or `non_finite`, or one of `timeout`, `unavailable`,
    /// `overloaded`, `rejected`, `connect`, `node_error`.
    pub fn failures(&self, kind: &str) -> u64 {
        lock(&self.failures).get(kind).copied().unwrap_or(0)
    }

    /// Returns every failure kind seen, with its count.
    pub fn failure_counts(&self) -> BTreeMap<&'static str, u64> {
        lock(&self.failures).clone()
    }

    pub(crate) fn count_failure(&self, kind: &'static str) {
        *lock(&self.failures).entry(kind).or_default() += 1;
    }

    pub(crate) fn add(counter: &AtomicU64, amount: usize) {
        counter.fetch_add(amount as u64, Ordering::Relaxed);
    }
}

/// Locks a mutex, recovering the data if a thread panicked while holding it: every value
/// guarded here stays consistent between statements.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A client of the network. Cheap to clone; clones share state.
#[derive(Debug, Clone)]
pub struct Router {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) config: RouterConfig,
    pub(crate) discovery: Discovery,
    pub(crate) book: Mutex<PeerBook>,
    pub(crate) rng: Mutex<SplitMix64>,
    clients: Mutex<HashMap<PeerId, NodeClient>>,
    pub(crate) stats: RouterStats,
}

impl Router {
    /// Joins the network through the configured bootstrap peers.
    ///
    /// # Errors
    /// [`RouterError::Setting`] for settings out of range, and the discovery errors of
    /// starting and bootstrapping.
    pub async fn connect(config: RouterConfig) -> Result<Self, RouterError> {
        if !(0.0..=1.0).contains(&config.spot_check_rate) {
            return Err(RouterError::Setting {
                name: "spot_check_rate",
                value: config.spot_check_rate.to_string(),
                reason: "give a share from 0 to 1",
            });
        }
        if !(config.spot_check_tolerance.is_finite() && config.spot_check_tolerance >= 0.0) {
            return Err(RouterError::Setting {
                name: "spot_check_tolerance",
                value: config.spot_check_tolerance.to_string(),
                reason: "give a relative error of 0 or more",
            });
        }
        if config.k_min == 0 {
            return Err(RouterError::Setting {
                name: "k_min",
                value: "0".to_owned(),
                reason: "at least one expert must serve each token",
            });
        }
        if config.deadline.is_zero() {
            return Err(RouterError::Setting {
                name: "deadline",
                value: "0".to_owned(),
                reason: "give the layer call some time, such as 5 s",
            });
        }
        let discovery = Discovery::start(config.discovery.clone())?;
        discovery
            .wait_bootstrapped(config.bootstrap_timeout)
            .await?;
        let seed = match config.seed {
            Some(seed) => seed,
            None => {
                let mut bytes = [0u8; 8];
                // A failed random source leaves a fixed seed, which only makes exploration
                // predictable.
                let _ = getrandom::fill(&mut bytes);
                u64::from_le_bytes(bytes)
            }
        };
        Ok(Self {
            inner: Arc::new(Inner {
                book: Mutex::new(PeerBook::new(config.peers.clone())),
                rng: Mutex::new(SplitMix64::new(seed)),
                clients: Mutex::new(HashMap::new()),
                stats: RouterStats::default(),
                discovery,
                config,
            }),
        })
    }

    pub fn config(&self) -> &RouterConfig {
        &self.inner.config
    }

    pub fn discovery(&self) -> &Discovery {
        &self.inner.discovery
    }

    pub fn stats(&self) -> &RouterStats {
        &self.inner.stats
    }

    /// Returns a copy of the latency estimates and bans of each node.
    pub fn peer_book(&self) -> PeerBook {
        lock(&self.inner.book).clone()
    }
}

impl Inner {
    /// Returns the connection to `replica`'s node, connecting on first use.
    pub(crate) async fn client(&self, replica: &Replica) -> Result<NodeClient, ClientError> {
        if let Some(client) = lock(&self.clients).get(&replica.peer_id) {
            return Ok(client.clone());
        }
        let mut last_error = None;
        for endpoint in &replica.endpoints {
            match NodeClient::connect(endpoint, Some(replica.peer_id), self.config.connect_timeout)
                .await
            {
                Ok(client) => {
                    lock(&self.clients).insert(replica.peer_id, client.clone());
                    return Ok(client);
                }
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or_else(|| ClientError::Connect {
            endpoint: String::new(),
            reason: "the node record lists no gRPC endpoint".to_owned(),
        }))
    }

    /// Forgets the connection to a node that failed, so the next call reconnects.
    pub(crate) fn drop_client(&self, peer: &PeerId) {
        lock(&self.clients).remove(peer);
    }
}
