//! A gRPC client for one node, which verifies every result it returns.

use std::time::Duration;

use ed25519_dalek::VerifyingKey;
use expertnet_proto::pb::expert_service_client::ExpertServiceClient;
use expertnet_proto::{Digest, ExpertOutput, ForwardCall, pb};
use libp2p::PeerId;
use tonic::transport::{Channel, Endpoint};

use crate::verify::{VerifyError, verify_response};

/// HTTP/2 windows matching the node's: the 64 KiB defaults stall multi-megabyte tensors.
const STREAM_WINDOW_BYTES: u32 = 8 << 20;
const CONNECTION_WINDOW_BYTES: u32 = 16 << 20;

/// Largest response the client accepts, in bytes.
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// Errors of calling a node.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("invalid node endpoint {endpoint:?}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("cannot connect to node at {endpoint}: {reason}")]
    Connect { endpoint: String, reason: String },
    #[error(
        "{endpoint} does not answer like an expertnet node ({reason}); check that it is the node's gRPC address, not its metrics or libp2p port"
    )]
    NotANode { endpoint: String, reason: String },
    #[error("node at {endpoint} answered {code:?}: {message}")]
    Status {
        endpoint: String,
        code: tonic::Code,
        message: String,
    },
    #[error("node at {endpoint} identifies as {actual}, expected {expected}")]
    WrongPeer {
        endpoint: String,
        expected: PeerId,
        actual: String,
    },
    #[error("node at {endpoint} sent an invalid identity: {reason}")]
    Identity { endpoint: String, reason: String },
    #[error("node at {endpoint} sent a result that failed verification: {error}")]
    Verify {
        endpoint: String,
        error: VerifyError,
    },
}

/// A connection to one node whose identity is known, so its receipts can be verified.
#[derive(Debug, Clone)]
pub struct NodeClient {
    endpoint: String,
    client: ExpertServiceClient<Channel>,
    peer_id: PeerId,
    key: VerifyingKey,
    info: pb::InfoResponse,
}

impl NodeClient {
    /// Connects to `endpoint` (such as `http://127.0.0.1:50051`) and reads the node's
    /// identity with `Info`. With `expected` set, a node presenting another peer id is
    /// rejected; without it, the client trusts the key the node presents.
    ///
    /// # Errors
    /// [`ClientError::Endpoint`], [`ClientError::Connect`], [`ClientError::Status`],
    /// [`ClientError::WrongPeer`] or [`ClientError::Identity`].
    pub async fn connect(
        endpoint: &str,
        expected: Option<PeerId>,
        connect_timeout: Duration,
    ) -> Result<Self, ClientError> {
        if !endpoint.starts_with("http://") && !endpoint.starts_with("https://") {
            return Err(ClientError::Endpoint {
                endpoint: endpoint.to_owned(),
                reason: "write it as http://HOST:PORT, such as http://127.0.0.1:50051".to_owned(),
            });
        }
        let channel = Endpoint::from_shared(endpoint.to_owned())
            .map_err(|e| ClientError::Endpoint {
                endpoint: endpoint.to_owned(),
                reason: error_chain(&e),
            })?
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .initial_stream_window_size(STREAM_WINDOW_BYTES)
            .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
            .connect()
            .await
            .map_err(|e| ClientError::Connect {
                endpoint: endpoint.to_owned(),
                reason: error_chain(&e),
            })?;
        let mut client = ExpertServiceClient::new(channel)
            .max_decoding_message_size(MAX_RESPONSE_BYTES)
            .max_encoding_message_size(MAX_RESPONSE_BYTES);

        let info = client
            .info(pb::InfoRequest {})
            .await
            .map_err(|status| match status.code() {
                // What a server that is not an expertnet node (a metrics or libp2p port,
                // another HTTP server) makes of a gRPC call.
                tonic::Code::Cancelled
                | tonic::Code::Unknown
                | tonic::Code::Internal
                | tonic::Code::Unimplemented => ClientError::NotANode {
                    endpoint: endpoint.to_owned(),
                    reason: format!("{:?}: {}", status.code(), status.message()),
                },
                _ => status_error(endpoint, &status),
            })?
            .into_inner();
        let identity_error = |reason: String| ClientError::Identity {
            endpoint: endpoint.to_owned(),
            reason,
        };
        let peer_id: PeerId = info
            .node_id
            .parse()
            .map_err(|e| identity_error(format!("node_id {:?}: {e}", info.node_id)))?;
        if let Some(expected) = expected.filter(|&expected| expected != peer_id) {
            return Err(ClientError::WrongPeer {
                endpoint: endpoint.to_owned(),
                expected,
                actual: info.node_id,
            });
        }
        let key = crate::identity::verifying_key_of(&peer_id).map_err(identity_error)?;
        if key.as_bytes()[..] != info.public_key[..] {
            return Err(identity_error(
                "public_key does not match node_id".to_owned(),
            ));
        }

        Ok(Self {
            endpoint: endpoint.to_owned(),
            client,
            peer_id,
            key,
            info,
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// What the node reported about itself when the client connected.
    pub fn info(&self) -> &pb::InfoResponse {
        &self.info
    }

    /// Sends one call and verifies every output. `expected_weights` returns the manifest's
    /// digest of `(layer, expert)`, or `None` to skip that check.
    ///
    /// # Errors
    /// [`ClientError::Status`] when the node rejects the call or the transport fails,
    /// [`ClientError::Verify`] when an output fails verification.
    pub async fn forward(
        &mut self,
        call: &ForwardCall,
        timeout: Option<Duration>,
        expected_weights: impl Fn(u32, u32) -> Option<Digest>,
    ) -> Result<Vec<ExpertOutput>, ClientError> {
        self.forward_timed(call, timeout, expected_weights)
            .await
            .map(|(outputs, _)| outputs)
    }

    /// As [`NodeClient::forward`], and also returns the time spent verifying the outputs.
    ///
    /// # Errors
    /// As [`NodeClient::forward`].
    pub async fn forward_timed(
        &mut self,
        call: &ForwardCall,
        timeout: Option<Duration>,
        expected_weights: impl Fn(u32, u32) -> Option<Digest>,
    ) -> Result<(Vec<ExpertOutput>, Duration), ClientError> {
        let mut request = tonic::Request::new(call.clone().into_wire());
        if let Some(timeout) = timeout {
            request.set_timeout(timeout);
        }
        let response = self
            .client
            .forward(request)
            .await
            .map_err(|status| status_error(&self.endpoint, &status))?
            .into_inner();

        let started = std::time::Instant::now();
        let outputs = verify_response(call, response.outputs, &self.key, expected_weights)
            .map_err(|source| ClientError::Verify {
                endpoint: self.endpoint.clone(),
                error: source,
            })?;
        Ok((outputs, started.elapsed()))
    }
}

fn status_error(endpoint: &str, status: &tonic::Status) -> ClientError {
    ClientError::Status {
        endpoint: endpoint.to_owned(),
        code: status.code(),
        message: status.message().to_owned(),
    }
}

/// Joins an error with its sources, because transport errors hide the cause
/// ("connection refused") in the chain. A cause whose text is already included is skipped,
/// since transport errors often repeat their source in their own message.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
