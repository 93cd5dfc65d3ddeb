//! Client library of expertnet: runs the MoE layers of a model on the network's nodes and
//! verifies every result they return.
//!
//! A [`Router`] joins the network through bootstrap peers and keeps what it learns about
//! each node. A [`RemoteMoeLayer`] contains one layer's gate: its
//! [`forward`](RemoteMoeLayer::forward) picks each token's top-k experts, sends the tokens
//! of each chosen node in one request, all nodes in parallel, and combines the verified
//! outputs with the gate weights. Replicas are chosen by expected completion time; a slow
//! request is hedged to a second replica; a failed one moves to another replica, then to
//! the next expert in the gate's ranking; one deadline bounds it all. The
//! [`RoutingTrace`] says which node served each token and what failed on the way.
//!
//! ```no_run
//! use candle_core::{Device, Tensor};
//! use expertnet_model::{Checkpoint, Manifest};
//! use expertnet_router::{DiscoveryConfig, RemoteMoeLayer, Router, RouterConfig};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! // A bootstrap peer, as `expertnet-node run` logs it.
//! let bootstrap = "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN".parse()?;
//! let mut config = RouterConfig::new(DiscoveryConfig::new(vec![bootstrap]));
//! config.spot_check_rate = 0.05;
//! let router = Router::connect(config).await?;
//!
//! // The client needs config.json, the manifest and the gate weights of the checkpoint.
//! let checkpoint = Checkpoint::open("checkpoints/demo")?;
//! let manifest = Manifest::load(&Manifest::path_in(checkpoint.dir()))?;
//! let layer = RemoteMoeLayer::new(&router, &checkpoint, &manifest, 1)?;
//!
//! let hidden = Tensor::randn(0f32, 1.0, (16, checkpoint.config().hidden_size), &Device::Cpu)?;
//! let out = layer.forward(&hidden).await?;
//! for (token, trace) in out.trace.tokens.iter().enumerate() {
//!     for used in &trace.served {
//!         println!("token {token}: expert {} weight {:.3} from {}", used.expert, used.weight, used.peer);
//!     }
//! }
//! println!("fallbacks: {}, failures: {:?}", out.trace.replica_fallbacks, router.stats().failure_counts());
//! # Ok(())
//! # }
//! ```
//!
//! [`NodeClient`] talks to one node directly. Each expert output is checked before use
//! ([`verify_output`]): the receipt's ed25519 signature against the key embedded in the
//! node's `PeerId`, the request id, model, layer and expert it signs, the blake3 digests of
//! the tokens sent and the output received, the weight digest from the model manifest,
//! the shape, dtype and finiteness of the output.

#![forbid(unsafe_code)]

mod client;
pub mod discovery;
pub mod generate;
mod identity;
mod layer;
pub mod policy;
mod router;
mod verify;

pub use client::{ClientError, MAX_RESPONSE_BYTES, NodeClient};
pub use discovery::{Discovery, DiscoveryConfig, DiscoveryError, LayerReplicas, Replica};
pub use expertnet_model::LocalMoeLayer;
pub use expertnet_model::gate;
pub use generate::{GenerateError, GenerateOptions, Generation, MoeModel, generate};
pub use identity::{short_peer_id, verifying_key_of};
pub use layer::{ExpertUse, LayerError, LayerOutput, RemoteMoeLayer, RoutingTrace, TokenTrace};
pub use router::{Router, RouterConfig, RouterError, RouterStats};
pub use verify::{VerifyError, verify_output, verify_response};
