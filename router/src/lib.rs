//! Client library of expertnet: calls the nodes that host a model's experts and verifies
//! every result they return.
//!
//! [`NodeClient`] talks to one node over gRPC. Each expert output is checked before use
//! ([`verify_output`]): the receipt's ed25519 signature against the key embedded in the
//! node's `PeerId`, the request id, model, layer and expert it signs, the blake3 digests of
//! the tokens sent and the output received, the weight digest from the model manifest,
//! the shape, dtype and finiteness of the output.
//!
//! ```no_run
//! use std::time::Duration;
//! use expertnet_model::codec::wire_from_f32;
//! use expertnet_proto::{DType, ExpertInput, ForwardCall, RequestId};
//! use expertnet_router::NodeClient;
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let mut node = NodeClient::connect("http://127.0.0.1:50051", None, Duration::from_secs(5)).await?;
//! let model_id = node.info().models[0].model_id.clone();
//! let hidden = node.info().models[0].hidden_size as usize;
//! let call = ForwardCall {
//!     request_id: RequestId::from_bytes(rand_bytes()),
//!     model_id,
//!     layer: 0,
//!     inputs: vec![ExpertInput {
//!         expert: 3,
//!         hidden: wire_from_f32(&vec![0.1; 2 * hidden], &[2, hidden], DType::F32)?,
//!     }],
//! };
//! let outputs = node.forward(&call, Some(Duration::from_secs(1)), |_, _| None).await?;
//! println!("expert 3 returned {:?}", outputs[0].output.shape());
//! # Ok(())
//! # }
//! # fn rand_bytes() -> [u8; 16] { [7; 16] }
//! ```

#![forbid(unsafe_code)]

mod client;
pub mod discovery;
pub mod gate;
mod identity;
mod verify;

pub use client::{ClientError, MAX_RESPONSE_BYTES, NodeClient};
pub use discovery::{Discovery, DiscoveryConfig, DiscoveryError, LayerReplicas, Replica};
pub use identity::{short_peer_id, verifying_key_of};
pub use verify::{VerifyError, verify_output, verify_response};
