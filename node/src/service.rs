//! The gRPC `ExpertService` of a node.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use expertnet_proto::pb::expert_service_server::ExpertService;
use expertnet_proto::{ExpertOutput, ForwardCall, ForwardError, ReceiptBody, pb};
use tonic::{Code, Request, Response, Status};
use tracing::Instrument;

use crate::compute::{ComputeQueue, SubmitError};
use crate::host::HostedModel;
use crate::{FaultConfig, Limits, NodeKey, NodeMetrics};

/// Why a `Forward` request failed. Each maps to one gRPC status in [`Status::from`], and
/// to one `reason` label of the rejection metric.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RequestError {
    #[error("{0}")]
    Malformed(#[from] ForwardError),
    #[error("model {requested} is not served by this node; it serves {served}")]
    UnknownModel { requested: String, served: String },
    #[error("layer {layer} is not hosted by this node; it hosts {hosted}")]
    UnknownLayer { layer: u32, hosted: String },
    #[error("layer {layer} expert {expert} is not hosted by this node; it hosts {hosted}")]
    UnknownExpert {
        layer: u32,
        expert: u32,
        hosted: String,
    },
    #[error("input for expert {expert} has hidden size {actual}, but the model's is {expected}")]
    HiddenSize {
        expert: u32,
        expected: usize,
        actual: usize,
    },
    #[error(
        "input for expert {expert} has a NaN or infinite value at row {row}, column {column}; send finite values only"
    )]
    NonFinite {
        expert: u32,
        row: usize,
        column: usize,
    },
    #[error(
        "request has {tokens} token rows, above this node's max_tokens_per_request of {max}; split it into smaller requests"
    )]
    TooManyTokens { tokens: usize, max: usize },
    #[error(
        "node is overloaded: {queued} token rows queued and {requested} requested, above max_queued_tokens of {max}; retry later or use another replica"
    )]
    QueueFull {
        queued: usize,
        requested: usize,
        max: usize,
    },
    #[error("node is shutting down; use another replica")]
    ShuttingDown,
    #[error("expert computation failed: {0}")]
    Compute(String),
}

impl RequestError {
    /// The label of the rejection metric.
    fn reason(&self) -> &'static str {
        match self {
            RequestError::Malformed(_) => "malformed",
            RequestError::UnknownModel { .. } => "unknown_model",
            RequestError::UnknownLayer { .. } | RequestError::UnknownExpert { .. } => {
                "unknown_expert"
            }
            RequestError::HiddenSize { .. } => "hidden_size",
            RequestError::NonFinite { .. } => "non_finite_input",
            RequestError::TooManyTokens { .. } => "too_many_tokens",
            RequestError::QueueFull { .. } => "queue_full",
            RequestError::ShuttingDown => "shutting_down",
            RequestError::Compute(_) => "compute_failed",
        }
    }

    fn code(&self) -> Code {
        match self {
            RequestError::Malformed(_)
            | RequestError::HiddenSize { .. }
            | RequestError::NonFinite { .. } => Code::InvalidArgument,
            RequestError::UnknownModel { .. }
            | RequestError::UnknownLayer { .. }
            | RequestError::UnknownExpert { .. } => Code::NotFound,
            RequestError::TooManyTokens { .. } | RequestError::QueueFull { .. } => {
                Code::ResourceExhausted
            }
            RequestError::ShuttingDown => Code::Unavailable,
            RequestError::Compute(_) => Code::Internal,
        }
    }
}

impl From<RequestError> for Status {
    fn from(error: RequestError) -> Self {
        Status::new(error.code(), error.to_string())
    }
}

/// The service state shared by all connections.
#[derive(Debug)]
pub(crate) struct ExpertServer {
    pub(crate) model: Arc<HostedModel>,
    pub(crate) queue: ComputeQueue,
    pub(crate) key: NodeKey,
    pub(crate) limits: Limits,
    pub(crate) metrics: Arc<NodeMetrics>,
    pub(crate) info: pb::InfoResponse,
    pub(crate) faults: Arc<std::sync::RwLock<FaultConfig>>,
    /// Set by [`crate::RunningNode::kill`]. Aborting the server task leaves its
    /// connections running, so requests watch this to end as a crash would end them.
    pub(crate) killed: tokio::sync::watch::Receiver<bool>,
}

impl ExpertServer {
    /// The faults in force for one request. A poisoned lock means no faults: fault
    /// injection never takes the node down.
    fn faults(&self) -> FaultConfig {
        self.faults.read().map(|f| f.clone()).unwrap_or_default()
    }

    /// Checks a call against the hosted model and the limits, before any computation.
    fn check(&self, call: &ForwardCall) -> Result<Vec<usize>, RequestError> {
        let model = &self.model;
        if call.model_id != model.model_id {
            return Err(RequestError::UnknownModel {
                requested: call.model_id.clone(),
                served: model.model_id.clone(),
            });
        }
        if !model.hosts_layer(call.layer) {
            return Err(RequestError::UnknownLayer {
                layer: call.layer,
                hosted: self.hosted_summary(),
            });
        }

        let tokens = call.total_tokens();
        if tokens > self.limits.max_tokens_per_request {
            return Err(RequestError::TooManyTokens {
                tokens,
                max: self.limits.max_tokens_per_request,
            });
        }

        let mut slots = Vec::with_capacity(call.inputs.len());
        for input in &call.inputs {
            let slot = model.slot(call.layer, input.expert).ok_or_else(|| {
                RequestError::UnknownExpert {
                    layer: call.layer,
                    expert: input.expert,
                    hosted: self.hosted_summary(),
                }
            })?;
            if input.hidden_size() != model.hidden_size() {
                return Err(RequestError::HiddenSize {
                    expert: input.expert,
                    expected: model.hidden_size(),
                    actual: input.hidden_size(),
                });
            }
            if let Some(index) = input.hidden.first_non_finite() {
                return Err(RequestError::NonFinite {
                    expert: input.expert,
                    row: index / input.hidden_size(),
                    column: index % input.hidden_size(),
                });
            }
            slots.push(slot);
        }
        Ok(slots)
    }

    fn hosted_summary(&self) -> String {
        let sets = self.model.layer_sets();
        let listed: Vec<String> = sets.iter().take(8).map(ToString::to_string).collect();
        let more = sets.len().saturating_sub(listed.len());
        if more > 0 {
            format!("layer:experts {} and {more} more layers", listed.join(" "))
        } else {
            format!("layer:experts {}", listed.join(" "))
        }
    }

    async fn run_forward(
        &self,
        request: pb::ForwardRequest,
    ) -> Result<pb::ForwardResponse, RequestError> {
        let call = ForwardCall::try_from(request)?;
        let slots = self.check(&call)?;
        let faults = self.faults();
        if faults.stop_answering {
            // The caller's deadline or cancellation ends the request.
            std::future::pending::<()>().await;
        }
        if !faults.delay.is_zero() || !faults.jitter.is_zero() {
            // Request ids are random, so their first bytes give the jitter's draw.
            let draw =
                u16::from_le_bytes([call.request_id.as_bytes()[0], call.request_id.as_bytes()[1]]);
            tokio::time::sleep(faults.request_delay(f64::from(draw) / 65536.0)).await;
        }
        tracing::Span::current().record("tokens", call.total_tokens());

        let compute_dtype = expertnet_model::codec::candle_dtype(self.model.compute_dtype);
        let mut jobs = Vec::with_capacity(call.inputs.len());
        for (input, &slot) in call.inputs.iter().zip(&slots) {
            let tensor = expertnet_model::codec::to_candle(
                &input.hidden,
                compute_dtype,
                &candle_core::Device::Cpu,
            )
            .map_err(|e| RequestError::Compute(e.to_string()))?;
            jobs.push((slot, tensor));
        }

        let receivers = self.queue.submit(jobs).map_err(|error| match error {
            SubmitError::Full {
                queued,
                requested,
                max,
            } => RequestError::QueueFull {
                queued,
                requested,
                max,
            },
            SubmitError::Closed => RequestError::ShuttingDown,
        })?;

        let mut outputs = Vec::with_capacity(receivers.len());
        for ((input, &slot), receiver) in call.inputs.iter().zip(&slots).zip(receivers) {
            let rows = receiver
                .await
                .map_err(|_| RequestError::ShuttingDown)?
                .map_err(RequestError::Compute)?;
            let mut output = expertnet_model::codec::from_candle(&rows, input.hidden.dtype())
                .map_err(|e| RequestError::Compute(e.to_string()))?;
            if faults.is_active() {
                output = faults.corrupt_output(output);
            }

            let mut receipt = ReceiptBody {
                request_id: call.request_id,
                model_id: call.model_id.clone(),
                layer: call.layer,
                expert: input.expert,
                weight_digest: self.model.experts[slot].digest,
                input_digest: input.hidden.digest(),
                output_digest: output.digest(),
                timestamp_ms: unix_millis(),
            }
            .sign(self.key.signing_key());
            if faults.bad_signature {
                crate::fault::corrupt_signature(&mut receipt.signature);
            }
            outputs.push(
                ExpertOutput {
                    expert: input.expert,
                    output,
                    receipt,
                }
                .into_wire(),
            );
        }
        Ok(pb::ForwardResponse { outputs })
    }
}

/// Milliseconds since the Unix epoch; 0 if the clock is before it.
pub(crate) fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The `ExpertService` implementation; a cheap handle around [`ExpertServer`].
#[derive(Debug, Clone)]
pub(crate) struct ExpertServiceImpl(pub(crate) Arc<ExpertServer>);

#[tonic::async_trait]
impl ExpertService for ExpertServiceImpl {
    async fn forward(
        &self,
        request: Request<pb::ForwardRequest>,
    ) -> Result<Response<pb::ForwardResponse>, Status> {
        let started = Instant::now();
        let message = request.into_inner();
        let span = tracing::debug_span!(
            "forward",
            request_id = %hex_id(&message.request_id),
            layer = message.layer,
            experts = message.inputs.len(),
            tokens = tracing::field::Empty,
        );

        let server = &self.0;
        let mut killed = server.killed.clone();
        let result = tokio::select! {
            result = server.run_forward(message).instrument(span.clone()) => result,
            _ = killed.wait_for(|&killed| killed) => return Err(killed_status()),
        };
        let elapsed = started.elapsed().as_secs_f64();
        match result {
            Ok(response) => {
                server.metrics.record_request(Code::Ok, elapsed);
                Ok(Response::new(response))
            }
            Err(error) => {
                let status = Status::from(error_with_metrics(&server.metrics, error, &span));
                server.metrics.record_request(status.code(), elapsed);
                Err(status)
            }
        }
    }

    async fn info(
        &self,
        _request: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        if *self.0.killed.borrow() {
            return Err(killed_status());
        }
        Ok(Response::new(self.0.info.clone()))
    }
}

/// Returns the status a client of a crashed node gets: the transport's code for a lost
/// connection.
fn killed_status() -> Status {
    Status::unavailable("connection lost: the node was killed")
}

fn error_with_metrics(
    metrics: &NodeMetrics,
    error: RequestError,
    span: &tracing::Span,
) -> RequestError {
    span.in_scope(|| tracing::debug!(reason = error.reason(), %error, "forward request failed"));
    metrics.record_rejection(error.reason());
    error
}

fn hex_id(bytes: &[u8]) -> String {
    bytes.iter().take(16).map(|b| format!("{b:02x}")).collect()
}
