//! The expertnet node: hosts a subset of a Mixture-of-Experts model's experts and serves
//! them over gRPC, batching concurrent requests and signing a receipt for every result.
//!
//! The `expertnet-node` binary wraps this library; tests and simulations start nodes
//! in-process with [`Node::start`]:
//!
//! ```no_run
//! use expertnet_node::{ExpertSpec, Node, NodeConfig, NodeKey};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let spec: ExpertSpec = "0:0-3,1:*".parse()?;
//! let config = NodeConfig::new("checkpoints/tiny", spec);
//! let node = Node::start(config, NodeKey::generate()?).await?;
//! println!("serving {} on {}", node.model_id(), node.grpc_addr());
//! node.shutdown().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Limitations
//! Experts run on the CPU with candle. A node serves one model.

#![forbid(unsafe_code)]

mod announce;
mod compute;
mod config;
mod fault;
mod host;
mod key;
mod metrics;
mod node;
mod service;
mod size_limit;
mod spec;

use std::net::SocketAddr;
use std::time::Duration;

pub use announce::P2pConfig;
pub use config::{Limits, NodeConfig};
pub use fault::FaultConfig;
pub use key::{KeyError, NodeKey};
pub use metrics::NodeMetrics;
pub use node::{Node, RunningNode};
pub use spec::{ExpertSpec, SpecError};

/// Errors of starting and running a node.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    #[error(transparent)]
    Model(#[from] expertnet_model::ModelError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("invalid node configuration: {0}")]
    Config(String),
    /// libp2p could not start: a busy port, or a listener that failed.
    #[error("{0}")]
    P2p(String),
    #[error(
        "cannot listen for {what} on {address}: {error}; choose another address or port, or stop the process that uses it"
    )]
    Bind {
        what: &'static str,
        address: SocketAddr,
        error: std::io::Error,
    },
    #[error("cannot {what}: {error}")]
    Io { what: String, error: std::io::Error },
    #[error("gRPC server failed: {0}")]
    Serve(String),
    #[error("in-flight requests did not finish within the drain timeout of {timeout:?}")]
    Drain { timeout: Duration },
}
