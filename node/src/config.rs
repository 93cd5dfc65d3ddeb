//! Settings of a node.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use expertnet_proto::DType;

use crate::{ExpertSpec, FaultConfig, P2pConfig};

/// Limits that protect a node from requests it cannot serve. Each has a documented default;
/// a request over a limit gets `RESOURCE_EXHAUSTED` with a message naming the limit, and the
/// node keeps serving others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest encoded request or response, in bytes. Default 32 MiB: 1,024 token rows of
    /// a hidden size of 4,096 in f32 take 16 MiB each way.
    pub max_message_bytes: usize,
    /// Most token rows in one request, summed over its experts. Default 1,024.
    pub max_tokens_per_request: usize,
    /// Most token rows waiting for computation over all experts; requests beyond it are
    /// rejected so that a client can try another replica. Default 16,384.
    pub max_queued_tokens: usize,
    /// Most token rows in one forward pass of one expert. Default 256.
    pub max_batch_tokens: usize,
    /// How long an expert's first queued request waits for more before a pass that is not
    /// full. Default 0, which adapts: a pass starts at once, requests that arrive during it
    /// are batched into the next one, and under concurrent load a pass waits for the callers
    /// of the last pass to send again, up to one pass duration (at most 5 ms).
    pub batch_wait: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 32 << 20,
            max_tokens_per_request: 1024,
            max_queued_tokens: 16_384,
            max_batch_tokens: 256,
            batch_wait: Duration::ZERO,
        }
    }
}

/// Everything [`crate::Node::start`] needs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Folder with `config.json` and the shards that hold the hosted experts.
    pub checkpoint: PathBuf,
    /// Manifest file; `None` reads `expertnet-manifest.json` in the checkpoint folder.
    pub manifest: Option<PathBuf>,
    pub experts: ExpertSpec,
    /// gRPC listen address; port 0 picks a free port.
    pub grpc_listen: SocketAddr,
    /// Where to serve Prometheus metrics at `/metrics`; `None` serves none.
    pub metrics_listen: Option<SocketAddr>,
    /// Threads for expert computation; `None` uses one per available core.
    pub threads: Option<usize>,
    /// The dtype experts compute in. f32 or f16: candle's CPU matmul has no bf16 kernel, so
    /// bf16 checkpoints are computed in f32 unless f16 is chosen.
    pub compute_dtype: DType,
    pub limits: Limits,
    /// How long a graceful shutdown waits for in-flight requests. Default 30 s.
    pub drain_timeout: Duration,
    /// Discovery over the Kademlia DHT; `None` runs a node reachable only by its gRPC
    /// address.
    pub p2p: Option<P2pConfig>,
    /// Faults to show from the start, for tests and simulations; none by default.
    pub faults: FaultConfig,
}

impl NodeConfig {
    /// A config with default limits for a checkpoint and spec, listening on
    /// `127.0.0.1` with a port chosen by the OS.
    pub fn new(checkpoint: impl Into<PathBuf>, experts: ExpertSpec) -> Self {
        Self {
            checkpoint: checkpoint.into(),
            manifest: None,
            experts,
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_listen: None,
            threads: None,
            compute_dtype: DType::F32,
            limits: Limits::default(),
            drain_timeout: Duration::from_secs(30),
            p2p: None,
            faults: FaultConfig::default(),
        }
    }
}
