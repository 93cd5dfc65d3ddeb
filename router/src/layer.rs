//! A MoE layer whose experts run on the network.
//!
//! [`RemoteMoeLayer::forward`] computes the gate locally, hands the plan to the sans-I/O
//! [`LayerCall`], carries out its dispatches as gRPC calls in parallel, and combines the
//! verified outputs with the gate weights of the experts that actually served each token.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use candle_core::{Device, Tensor};
use expertnet_model::gate::{GateRule, gate_tokens};
use expertnet_model::{Checkpoint, Expert, Manifest, ModelError, accumulate};
use expertnet_proto::{DType, Digest, ExpertInput, ExpertOutput, ForwardCall, RequestId};
use libp2p::PeerId;
use tokio::task::JoinSet;

use crate::client::ClientError;
use crate::discovery::{DiscoveryError, LayerReplicas, Replica};
use crate::policy::{
    Answer, CallError, CallSettings, Dispatch, LayerCall, ReplicaRef, TaskFailure,
};
use crate::router::{Inner, Router, RouterStats, lock};

/// Errors of a remote layer call. The router's counters record which nodes failed and why.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LayerError {
    #[error("hidden states have shape {shape:?}; layer {layer} takes [tokens, {hidden_size}]")]
    Shape {
        layer: u32,
        shape: Vec<usize>,
        hidden_size: usize,
    },
    #[error("hidden states hold {value} at token {token}, column {column}; pass finite values")]
    NonFinite {
        token: usize,
        column: usize,
        value: f32,
    },
    #[error("layer {layer} of this checkpoint is not a MoE layer; MoE layers: {moe_layers}")]
    NotMoe { layer: u32, moe_layers: String },
    #[error(
        "the manifest is for model {manifest}, the checkpoint's config.json differs; pass the manifest made for this checkpoint"
    )]
    ManifestMismatch { manifest: String },
    #[error(
        "the manifest lists no digest for layer {layer}, expert {expert}; remake it with `expertnet-node manifest`"
    )]
    MissingDigest { layer: u32, expert: u32 },
    #[error("top_k is {top_k}; this layer has {experts} experts")]
    TopK { top_k: usize, experts: usize },
    #[error("looking up the layer's replicas failed: {0}")]
    Lookup(#[from] DiscoveryError),
    #[error(transparent)]
    Call(#[from] CallError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("computing the gate failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// The output of one layer call.
#[derive(Debug, Clone)]
pub struct LayerOutput {
    /// `[tokens, hidden]`, f32.
    pub output: Tensor,
    pub trace: RoutingTrace,
}

/// The record of how a layer call was served.
#[derive(Debug, Clone, Default)]
pub struct RoutingTrace {
    pub tokens: Vec<TokenTrace>,
    /// RPCs sent, hedges included.
    pub requests: usize,
    pub hedges: usize,
    /// Expert tasks sent to another replica after a failure.
    pub replica_fallbacks: usize,
    /// Tokens moved to a lower-ranked expert.
    pub expert_fallbacks: usize,
    pub spot_checks: usize,
    pub spot_check_mismatches: usize,
    /// Every failure met, served around or not.
    pub failures: Vec<TaskFailure>,
    /// Time to find the layer's replicas (zero when cached).
    pub lookup: Duration,
    /// Time spent verifying receipts and outputs.
    pub verify: Duration,
    pub elapsed: Duration,
}

/// The record of how one token was served.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenTrace {
    /// The gate's top k experts, best first.
    pub chosen: Vec<u32>,
    /// The experts whose outputs were combined, with their weights.
    pub served: Vec<ExpertUse>,
}

impl TokenTrace {
    /// Returns whether experts other than the gate's choice served the token.
    pub fn fell_back(&self) -> bool {
        self.served.iter().any(|e| e.replacement) || self.served.len() < self.chosen.len()
    }
}

/// One expert's part in a token's output.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertUse {
    pub expert: u32,
    pub weight: f32,
    pub peer: PeerId,
    /// The expert replaces a higher-ranked one that could not be served.
    pub replacement: bool,
    /// Round trip of the request that carried it.
    pub latency: Duration,
}

/// A MoE layer computed by the network: the gate here, the experts on the nodes.
#[derive(Debug)]
pub struct RemoteMoeLayer {
    router: Router,
    model_id: String,
    layer: u32,
    hidden_size: usize,
    rule: GateRule,
    top_k: usize,
    /// `[experts, hidden]`, f32.
    gate: Tensor,
    /// Shared with every request in flight, so dispatching does not copy the list.
    weight_digests: Arc<Vec<Digest>>,
    /// The checkpoint, when it contains expert weights to referee spot checks with.
    referee: Option<Checkpoint>,
    local_experts: Mutex<HashMap<u32, Option<Arc<Expert>>>>,
}

/// A task of a layer call: the dispatch that served it and its index in the call.
type TaskKey = (u64, usize);

/// One expert serving one token.
#[derive(Debug, Clone, Copy)]
struct Served {
    expert: u32,
    key: TaskKey,
    peer: PeerId,
    replacement: bool,
}

/// The verified output of one expert task.
#[derive(Debug, Clone)]
struct TaskOutput {
    expert: u32,
    /// Token indices of the layer call, in the order of `rows`.
    tokens: Vec<usize>,
    /// `tokens.len() * hidden` values.
    rows: Vec<f32>,
    /// Per request the task was split into: the input's digest and the node's output.
    pieces: Vec<(Digest, ExpertOutput)>,
}

struct DispatchResult {
    id: u64,
    peer: PeerId,
    latency: Duration,
    verify: Duration,
    result: Result<HashMap<usize, TaskOutput>, Failure>,
}

/// The reason a request failed, with a counter label.
#[derive(Debug, Clone)]
struct Failure {
    kind: &'static str,
    message: String,
    /// The node may be gone: drop it from discovery's cache.
    unreachable: bool,
}

impl Failure {
    fn from_client(error: &ClientError) -> Self {
        let (kind, unreachable) = match error {
            ClientError::Verify { error, .. } => (error.kind(), false),
            ClientError::Status { code, .. } => match code {
                tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => ("timeout", false),
                tonic::Code::Unavailable => ("unavailable", true),
                tonic::Code::ResourceExhausted => ("overloaded", false),
                tonic::Code::InvalidArgument
                | tonic::Code::NotFound
                | tonic::Code::FailedPrecondition => ("rejected", false),
                // A connection that breaks mid-call surfaces as an HTTP/2 error.
                tonic::Code::Internal | tonic::Code::Unknown if is_transport_error(error) => {
                    ("unavailable", true)
                }
                _ => ("node_error", false),
            },
            ClientError::Endpoint { .. }
            | ClientError::Connect { .. }
            | ClientError::NotANode { .. }
            | ClientError::WrongPeer { .. }
            | ClientError::Identity { .. } => ("connect", true),
        };
        Self {
            kind,
            message: error.to_string(),
            unreachable,
        }
    }

    fn reason(&self) -> String {
        format!("{}: {}", self.kind, self.message)
    }
}

impl RemoteMoeLayer {
    /// Builds layer `layer` of the model a checkpoint and its manifest describe. The
    /// checkpoint needs `config.json` and the gate weights. When it also contains expert
    /// weights matching the manifest, they referee spot-check disagreements.
    ///
    /// # Errors
    /// [`LayerError::NotMoe`], [`LayerError::ManifestMismatch`],
    /// [`LayerError::MissingDigest`], [`LayerError::TopK`] and errors reading the gate.
    pub fn new(
        router: &Router,
        checkpoint: &Checkpoint,
        manifest: &Manifest,
        layer: u32,
    ) -> Result<Self, LayerError> {
        let config = checkpoint.config();
        if !config.is_moe_layer(layer as usize) {
            let moe: Vec<String> = (0..config.num_hidden_layers)
                .filter(|&l| config.is_moe_layer(l))
                .map(|l| l.to_string())
                .collect();
            return Err(LayerError::NotMoe {
                layer,
                moe_layers: moe.join(", "),
            });
        }
        if manifest.check_config(checkpoint).is_err() {
            return Err(LayerError::ManifestMismatch {
                manifest: manifest.model_id(),
            });
        }
        let experts = config.num_experts() as usize;
        let weight_digests = (0..experts as u32)
            .map(|expert| {
                manifest
                    .expert_digest(layer, expert)
                    .ok_or(LayerError::MissingDigest { layer, expert })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let top_k = router.config().top_k.unwrap_or(config.num_experts_per_tok);
        if top_k == 0 || top_k > experts {
            return Err(LayerError::TopK { top_k, experts });
        }
        let gate = checkpoint.load_gate(layer, candle_core::DType::F32, &Device::Cpu)?;
        let has_experts =
            router.config().local_referee && checkpoint.check_expert(layer, 0).is_ok();
        let referee = if has_experts {
            Some(Checkpoint::open(checkpoint.dir())?)
        } else {
            None
        };
        Ok(Self {
            router: router.clone(),
            model_id: manifest.model_id(),
            layer,
            hidden_size: config.hidden_size,
            rule: GateRule::from_config(config),
            top_k,
            gate,
            weight_digests: Arc::new(weight_digests),
            referee,
            local_experts: Mutex::new(HashMap::new()),
        })
    }

    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    pub fn layer(&self) -> u32 {
        self.layer
    }

    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// Computes the layer for `hidden` (`[tokens, hidden]`, any float dtype).
    ///
    /// # Errors
    /// [`LayerError::Shape`] or [`LayerError::NonFinite`] for bad input;
    /// [`LayerError::Lookup`] when discovery fails; [`LayerError::Call`] when the
    /// deadline passes first or some token got fewer than `k_min` experts, naming the
    /// experts and nodes that failed and why.
    pub async fn forward(&self, hidden: &Tensor) -> Result<LayerOutput, LayerError> {
        let inner = &self.router.inner;
        let result = self.forward_inner(hidden).await;
        RouterStats::add(&inner.stats.layer_calls, 1);
        if result.is_err() {
            RouterStats::add(&inner.stats.failed_layer_calls, 1);
        }
        result
    }

    async fn forward_inner(&self, hidden: &Tensor) -> Result<LayerOutput, LayerError> {
        let inner = &*self.router.inner;
        let config = &inner.config;
        let started = Instant::now();
        let deadline = started + config.deadline;

        let hidden = hidden.to_dtype(candle_core::DType::F32)?;
        let (tokens, width) = match hidden.dims() {
            &[tokens, width] if tokens > 0 && width == self.hidden_size => (tokens, width),
            shape => {
                return Err(LayerError::Shape {
                    layer: self.layer,
                    shape: shape.to_vec(),
                    hidden_size: self.hidden_size,
                });
            }
        };
        let values = hidden.flatten_all()?.to_vec1::<f32>()?;
        if let Some(index) = values.iter().position(|v| !v.is_finite()) {
            return Err(LayerError::NonFinite {
                token: index / width,
                column: index % width,
                value: values[index],
            });
        }
        let gates = gate_tokens(&hidden, &self.gate)?;

        let settings = CallSettings {
            top_k: self.top_k,
            k_min: config.k_min.min(self.top_k),
            deadline,
            hedging: config.hedging,
        };
        let mut call = LayerCall::before_lookup(gates.clone(), settings);

        let lookup = tokio::select! {
            result = inner.discovery.resolve(&self.model_id, self.layer) => Some(result?),
            () = tokio::time::sleep_until(deadline.into()) => None,
        };
        let lookup_time = started.elapsed();
        let Some(replicas) = lookup else {
            let now = Instant::now();
            call.on_time(now, &lock(&inner.book), &mut lock(&inner.rng));
            return Err(call_error(&call));
        };
        call.provide_replicas(replica_refs(&replicas));

        let mut running: JoinSet<DispatchResult> = JoinSet::new();
        let mut outputs: HashMap<TaskKey, TaskOutput> = HashMap::new();
        let mut latencies: HashMap<u64, Duration> = HashMap::new();
        let mut verify_time = Duration::ZERO;
        let values = Arc::new(values);
        loop {
            loop {
                let dispatch = {
                    let book = lock(&inner.book);
                    let mut rng = lock(&inner.rng);
                    call.poll_dispatch(Instant::now(), &book, &mut rng)
                };
                let Some(dispatch) = dispatch else { break };
                let request = self.plan_requests(&dispatch, &replicas, &values);
                running.spawn(send_dispatch(
                    self.router.inner.clone(),
                    dispatch,
                    request,
                    deadline,
                ));
            }
            if call.is_done() {
                break;
            }
            let wakeup = call.next_wakeup().unwrap_or(deadline);
            tokio::select! {
                Some(joined) = running.join_next() => {
                    let Ok(done) = joined else { continue };
                    verify_time += done.verify;
                    let now = Instant::now();
                    let answer = match done.result {
                        Ok(tasks) => {
                            latencies.insert(done.id, done.latency);
                            let answer = tasks.keys().map(|&task| (task, Ok(()))).collect();
                            for (task, output) in tasks {
                                outputs.insert((done.id, task), output);
                            }
                            Answer::Tasks(answer)
                        }
                        Err(failure) => {
                            inner.stats.count_failure(failure.kind);
                            tracing::debug!(peer = %done.peer, kind = failure.kind, "{}", failure.message);
                            if failure.unreachable {
                                inner.discovery.report_failure(done.peer);
                                inner.drop_client(&done.peer);
                            }
                            Answer::Failed(failure.reason())
                        }
                    };
                    call.on_answer(done.id, answer, now, &mut lock(&inner.book));
                }
                () = tokio::time::sleep_until(wakeup.into()) => {
                    let now = Instant::now();
                    call.on_time(now, &lock(&inner.book), &mut lock(&inner.rng));
                }
            }
        }
        call.finish_in_flight(Instant::now(), &mut lock(&inner.book));
        running.abort_all();

        let result = match call.outcome() {
            Some(Ok(result)) => result.clone(),
            _ => return Err(call_error(&call)),
        };
        RouterStats::add(&inner.stats.tokens, tokens);
        RouterStats::add(&inner.stats.dispatches, result.dispatches);
        RouterStats::add(&inner.stats.hedges, result.hedges);
        RouterStats::add(&inner.stats.replica_fallbacks, result.replica_fallbacks);
        RouterStats::add(&inner.stats.expert_fallbacks, result.expert_fallbacks);

        // Per token, the served experts and where their rows are.
        let mut served: Vec<Vec<Served>> = result
            .tokens
            .iter()
            .map(|experts| {
                experts
                    .iter()
                    .map(|s| Served {
                        expert: s.expert,
                        key: (s.dispatch, s.task),
                        peer: s.peer,
                        replacement: s.replacement,
                    })
                    .collect()
            })
            .collect();

        let checks = self
            .spot_check(&mut outputs, &served, &replicas, &values, deadline)
            .await;
        for rejected in &checks.rejected {
            for token_experts in &mut served {
                token_experts.retain(|used| used.key != *rejected);
            }
        }
        let k_min = config.k_min.min(self.top_k);
        let short = served
            .iter()
            .filter(|experts| experts.len() < k_min)
            .count();
        if short > 0 {
            let mut failures = result.failures.clone();
            failures.extend(checks.failures.iter().cloned());
            return Err(LayerError::Call(CallError::Unserved {
                tokens: short,
                k_min,
                failures,
            }));
        }

        let mut output = vec![0f32; tokens * width];
        let mut traces = Vec::with_capacity(tokens);
        for (token, experts) in served.iter().enumerate() {
            let gate = &gates[token];
            let ids: Vec<u32> = experts.iter().map(|e| e.expert).collect();
            let weights = self.rule.served_weights(gate, self.top_k, &ids);
            let mut uses = Vec::with_capacity(experts.len());
            for (
                &Served {
                    expert,
                    key,
                    peer,
                    replacement,
                },
                weight,
            ) in experts.iter().zip(weights)
            {
                let Some(task) = outputs.get(&key) else {
                    continue;
                };
                let Some(position) = task.tokens.iter().position(|&t| t == token) else {
                    continue;
                };
                let row = &task.rows[position * width..(position + 1) * width];
                accumulate(&mut output[token * width..(token + 1) * width], weight, row);
                uses.push(ExpertUse {
                    expert,
                    weight,
                    peer,
                    replacement,
                    latency: latencies.get(&key.0).copied().unwrap_or_default(),
                });
            }
            traces.push(TokenTrace {
                chosen: gate.top_k(self.top_k).to_vec(),
                served: uses,
            });
        }

        let mut failures = result.failures.clone();
        failures.extend(checks.failures);
        let trace = RoutingTrace {
            tokens: traces,
            requests: result.dispatches + checks.requests,
            hedges: result.hedges,
            replica_fallbacks: result.replica_fallbacks,
            expert_fallbacks: result.expert_fallbacks,
            spot_checks: checks.checks,
            spot_check_mismatches: checks.mismatches,
            failures,
            lookup: lookup_time,
            verify: verify_time + checks.verify,
            elapsed: started.elapsed(),
        };
        Ok(LayerOutput {
            output: Tensor::from_vec(output, (tokens, width), &Device::Cpu)?,
            trace,
        })
    }

    /// Splits a dispatch into requests within the node's limits.
    fn plan_requests(
        &self,
        dispatch: &Dispatch,
        replicas: &LayerReplicas,
        values: &Arc<Vec<f32>>,
    ) -> Planned {
        let replica = dispatch
            .tasks
            .first()
            .and_then(|t| {
                replicas
                    .replicas(t.expert)
                    .iter()
                    .find(|r| r.peer_id == dispatch.peer)
            })
            .cloned();
        let max_tokens = replica.as_ref().map_or(usize::MAX, |r| {
            max_tokens_per_request(r, self.hidden_size, self.router.config().wire_dtype)
        });
        let mut pieces = Vec::new();
        for task in &dispatch.tasks {
            for chunk in task.tokens.chunks(max_tokens.max(1)) {
                pieces.push(Piece {
                    task: task.task,
                    expert: task.expert,
                    tokens: chunk.to_vec(),
                });
            }
        }
        let mut requests: Vec<Vec<Piece>> = Vec::new();
        let mut current: Vec<Piece> = Vec::new();
        let mut current_tokens = 0;
        for piece in pieces {
            if current_tokens + piece.tokens.len() > max_tokens && !current.is_empty() {
                requests.push(std::mem::take(&mut current));
                current_tokens = 0;
            }
            current_tokens += piece.tokens.len();
            current.push(piece);
        }
        if !current.is_empty() {
            requests.push(current);
        }
        Planned {
            replica,
            requests,
            values: values.clone(),
            hidden_size: self.hidden_size,
            model_id: self.model_id.clone(),
            layer: self.layer,
            digests: Arc::clone(&self.weight_digests),
        }
    }

    /// Sends a share of the served tasks to a second replica and compares the outputs. A
    /// replica that the referee shows wrong is banned and its output replaced. When no
    /// referee can decide, both replicas become suspects and the expert is dropped for the
    /// task's tokens.
    async fn spot_check(
        &self,
        outputs: &mut HashMap<TaskKey, TaskOutput>,
        served: &[Vec<Served>],
        replicas: &LayerReplicas,
        values: &Arc<Vec<f32>>,
        deadline: Instant,
    ) -> SpotChecks {
        let inner = &self.router.inner;
        let config = &inner.config;
        let mut checks = SpotChecks::default();
        if config.spot_check_rate <= 0.0 {
            return checks;
        }
        let mut used: BTreeMap<TaskKey, PeerId> = BTreeMap::new();
        for experts in served {
            for used_task in experts {
                used.insert(used_task.key, used_task.peer);
            }
        }

        let mut running: JoinSet<(u64, usize, PeerId, DispatchResult)> = JoinSet::new();
        for (&key, &peer) in &used {
            let Some(task) = outputs.get(&key) else {
                continue;
            };
            let sample = f64::from(lock(&inner.rng).next_unit());
            if sample >= config.spot_check_rate {
                continue;
            }
            let Some(second) = self.pick_replica(replicas, task.expert, &[peer]) else {
                continue;
            };
            checks.checks += 1;
            RouterStats::add(&inner.stats.spot_checks, 1);
            let dispatch = self.single_task_dispatch(key.1, task, second.peer_id);
            let planned = self.plan_requests(&dispatch, replicas, values);
            let inner = inner.clone();
            running.spawn(async move {
                let result = send_dispatch(inner, dispatch, planned, deadline).await;
                (key.0, key.1, second.peer_id, result)
            });
        }

        while let Some(joined) = running.join_next().await {
            let Ok((dispatch, task_index, second, done)) = joined else {
                continue;
            };
            checks.requests += 1;
            checks.verify += done.verify;
            let key = (dispatch, task_index);
            let Some(first) = used.get(&key).copied() else {
                continue;
            };
            let shadow = match done.result {
                Ok(mut tasks) => match tasks.remove(&task_index) {
                    Some(output) => output,
                    None => continue,
                },
                Err(failure) => {
                    inner.stats.count_failure(failure.kind);
                    lock(&inner.book).record_failure(second, Instant::now());
                    continue;
                }
            };
            let Some(original) = outputs.get(&key).cloned() else {
                continue;
            };
            let difference = max_row_relative_error(&original.rows, &shadow.rows, self.hidden_size);
            if difference <= config.spot_check_tolerance {
                continue;
            }
            checks.mismatches += 1;
            RouterStats::add(&inner.stats.spot_check_mismatches, 1);
            let verdict = self
                .referee(
                    &original, first, &shadow, second, replicas, values, deadline,
                )
                .await;
            let now = Instant::now();
            let mut wrong = Vec::new();
            let outcome = match &verdict.decision {
                Decision::FirstWrong(correct) => {
                    wrong.push(first);
                    if let Some(task) = outputs.get_mut(&key) {
                        task.rows.clone_from(correct);
                    }
                    "first_wrong"
                }
                Decision::SecondWrong => {
                    wrong.push(second);
                    "second_wrong"
                }
                Decision::BothWrong(correct) => {
                    wrong.extend([first, second]);
                    if let Some(task) = outputs.get_mut(&key) {
                        task.rows.clone_from(correct);
                    }
                    "both_wrong"
                }
                Decision::Undecided => {
                    let mut book = lock(&inner.book);
                    book.mark_suspect(first);
                    book.mark_suspect(second);
                    checks.rejected.push(key);
                    "undecided"
                }
            };
            let pair = format!(
                "spot check: outputs of expert {} from {} and {} differ by {difference:.2e}",
                original.expert,
                crate::short_peer_id(&first),
                crate::short_peer_id(&second),
            );
            if wrong.is_empty() {
                let reason = format!(
                    "{pair}; with {}, neither can be shown wrong, so both are suspects and the result is dropped",
                    verdict.referee
                );
                tracing::debug!("{reason}");
                checks.failures.push(TaskFailure {
                    expert: original.expert,
                    peer: first,
                    reason,
                });
            }
            for peer in wrong {
                let newly_banned = lock(&inner.book).ban_dishonest(peer, now);
                if newly_banned {
                    inner.discovery.report_failure(peer);
                    RouterStats::add(&inner.stats.dishonest_bans, 1);
                }
                let reason = format!(
                    "{pair}; judged by {}, {} is wrong and banned",
                    verdict.referee,
                    crate::short_peer_id(&peer)
                );
                tracing::debug!("{reason}");
                checks.failures.push(TaskFailure {
                    expert: original.expert,
                    peer,
                    reason,
                });
            }
            self.write_evidence(
                &original,
                first,
                &shadow,
                second,
                difference,
                &verdict.referee,
                outcome,
            );
        }
        checks
    }

    /// Decides which of two disagreeing outputs is wrong: by the local weights when the
    /// checkpoint has them, else by a third replica.
    #[allow(clippy::too_many_arguments)]
    async fn referee(
        &self,
        first: &TaskOutput,
        first_peer: PeerId,
        second: &TaskOutput,
        second_peer: PeerId,
        replicas: &LayerReplicas,
        values: &Arc<Vec<f32>>,
        deadline: Instant,
    ) -> Verdict {
        let tolerance = self.router.config().spot_check_tolerance;
        let reference = match self.local_expert(first.expert) {
            Some(expert) => self
                .compute_locally(&expert, &first.tokens, values)
                .map(|rows| (rows, "the local weights".to_owned())),
            None => None,
        };
        let reference = match reference {
            Some(reference) => Some(reference),
            None => match self.pick_replica(replicas, first.expert, &[first_peer, second_peer]) {
                Some(third) => {
                    let dispatch = self.single_task_dispatch(0, first, third.peer_id);
                    let planned = self.plan_requests(&dispatch, replicas, values);
                    let done =
                        send_dispatch(self.router.inner.clone(), dispatch, planned, deadline).await;
                    match done.result {
                        Ok(mut tasks) => tasks.remove(&0).map(|o| {
                            (
                                o.rows,
                                format!("replica {}", crate::short_peer_id(&third.peer_id)),
                            )
                        }),
                        Err(_) => None,
                    }
                }
                None => None,
            },
        };
        let Some((rows, referee)) = reference else {
            return Verdict {
                decision: Decision::Undecided,
                referee: "no referee".to_owned(),
            };
        };
        let first_ok = max_row_relative_error(&first.rows, &rows, self.hidden_size) <= tolerance;
        let second_ok = max_row_relative_error(&second.rows, &rows, self.hidden_size) <= tolerance;
        let decision = match (first_ok, second_ok) {
            (true, false) => Decision::SecondWrong,
            (false, true) => Decision::FirstWrong(second.rows.clone()),
            (false, false) if referee.starts_with("the local") => Decision::BothWrong(rows),
            _ => Decision::Undecided,
        };
        Verdict { decision, referee }
    }

    /// Returns the expert's weights from the checkpoint, when it contains them and they
    /// match the manifest.
    fn local_expert(&self, expert: u32) -> Option<Arc<Expert>> {
        let checkpoint = self.referee.as_ref()?;
        let mut cache = lock(&self.local_experts);
        cache
            .entry(expert)
            .or_insert_with(|| {
                let digest = checkpoint.expert_digest(self.layer, expert).ok()?;
                if Some(&digest) != self.weight_digests.get(expert as usize) {
                    return None;
                }
                checkpoint
                    .load_expert(self.layer, expert, DType::F32, &Device::Cpu)
                    .ok()
                    .map(Arc::new)
            })
            .clone()
    }

    fn compute_locally(
        &self,
        expert: &Expert,
        tokens: &[usize],
        values: &[f32],
    ) -> Option<Vec<f32>> {
        let width = self.hidden_size;
        let mut rows = Vec::with_capacity(tokens.len() * width);
        for &token in tokens {
            rows.extend_from_slice(&values[token * width..(token + 1) * width]);
        }
        let x = Tensor::from_vec(rows, (tokens.len(), width), &Device::Cpu).ok()?;
        expert
            .forward(&x)
            .ok()?
            .flatten_all()
            .ok()?
            .to_vec1::<f32>()
            .ok()
    }

    /// Returns the fastest replica of `expert` outside `exclude` that is not banned.
    fn pick_replica(
        &self,
        replicas: &LayerReplicas,
        expert: u32,
        exclude: &[PeerId],
    ) -> Option<Replica> {
        let inner = &self.router.inner;
        let now = Instant::now();
        let book = lock(&inner.book);
        replicas
            .replicas(expert)
            .iter()
            .filter(|r| !exclude.contains(&r.peer_id) && !book.is_banned(&r.peer_id, now))
            .min_by(|a, b| {
                let cost = |r: &Replica| book.expected_ms(&r.peer_id, 1, r.load_tokens);
                cost(a).total_cmp(&cost(b))
            })
            .cloned()
    }

    fn single_task_dispatch(&self, task: usize, output: &TaskOutput, peer: PeerId) -> Dispatch {
        Dispatch {
            id: u64::MAX,
            peer,
            tasks: vec![crate::policy::TaskRef {
                task,
                expert: output.expert,
                tokens: output.tokens.clone(),
            }],
            hedge: false,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn write_evidence(
        &self,
        first: &TaskOutput,
        first_peer: PeerId,
        second: &TaskOutput,
        second_peer: PeerId,
        difference: f32,
        referee: &str,
        outcome: &str,
    ) {
        let receipts = |task: &TaskOutput| -> Vec<serde_json::Value> {
            task.pieces
                .iter()
                .map(|(input_digest, output)| {
                    let body = &output.receipt.body;
                    serde_json::json!({
                        "request_id": body.request_id.to_string(),
                        "expert": body.expert,
                        "weight_digest": body.weight_digest.to_hex(),
                        "input_digest": input_digest.to_hex(),
                        "output_digest": body.output_digest.to_hex(),
                        "timestamp_ms": body.timestamp_ms,
                        "signature": hex(&output.receipt.signature.to_bytes()),
                    })
                })
                .collect()
        };
        let record = serde_json::json!({
            "time_ms": SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
            "model_id": self.model_id,
            "layer": self.layer,
            "expert": first.expert,
            "tokens": first.tokens.len(),
            "max_rel_difference": difference,
            "referee": referee,
            "verdict": outcome,
            "first": { "peer": first_peer.to_string(), "receipts": receipts(first) },
            "second": { "peer": second_peer.to_string(), "receipts": receipts(second) },
        });
        tracing::debug!(evidence = %record, "spot-check mismatch");
        let Some(path) = &self.router.config().evidence_file else {
            return;
        };
        if let Err(error) = append_line(path, &record.to_string()) {
            tracing::warn!(path = %path.display(), %error, "failed to write spot-check evidence; check that the --evidence path is writable");
        }
    }
}

fn is_transport_error(error: &ClientError) -> bool {
    let ClientError::Status { message, .. } = error else {
        return false;
    };
    [
        "h2 protocol error",
        "transport error",
        "connection reset",
        "broken pipe",
    ]
    .iter()
    .any(|fragment| message.contains(fragment))
}

fn append_line(path: &PathBuf, line: &str) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    writeln!(file, "{line}")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug, Default)]
struct SpotChecks {
    checks: usize,
    mismatches: usize,
    requests: usize,
    verify: Duration,
    failures: Vec<TaskFailure>,
    /// Served tasks whose output is dropped: no referee could decide.
    rejected: Vec<TaskKey>,
}

struct Verdict {
    decision: Decision,
    referee: String,
}

enum Decision {
    /// The output used was wrong; the rows are the correct ones.
    FirstWrong(Vec<f32>),
    SecondWrong,
    BothWrong(Vec<f32>),
    Undecided,
}

/// One expert's tokens within one request.
#[derive(Debug, Clone)]
struct Piece {
    task: usize,
    expert: u32,
    tokens: Vec<usize>,
}

/// A dispatch split into requests, with what is needed to build them.
struct Planned {
    replica: Option<Replica>,
    requests: Vec<Vec<Piece>>,
    values: Arc<Vec<f32>>,
    hidden_size: usize,
    model_id: String,
    layer: u32,
    digests: Arc<Vec<Digest>>,
}

/// Largest token count of one request to `replica`: its advertised token limit, and what
/// fits its message size limit with room for the framing.
fn max_tokens_per_request(replica: &Replica, hidden: usize, dtype: DType) -> usize {
    let by_count = match replica.limits.max_tokens_per_request {
        0 => usize::MAX,
        n => n as usize,
    };
    let row_bytes = (hidden * dtype.size_in_bytes()).max(1);
    let by_bytes = match replica.limits.max_message_bytes {
        0 => usize::MAX,
        n => (n as usize).saturating_sub(64 << 10) / row_bytes,
    };
    let by_response = crate::MAX_RESPONSE_BYTES.saturating_sub(64 << 10) / row_bytes;
    by_count.min(by_bytes).min(by_response).max(1)
}

/// Sends the requests of one dispatch in parallel and verifies every output.
async fn send_dispatch(
    inner: Arc<Inner>,
    dispatch: Dispatch,
    planned: Planned,
    deadline: Instant,
) -> DispatchResult {
    let started = Instant::now();
    let mut verify = Duration::ZERO;
    let result = send_requests(&inner, planned, deadline, &mut verify).await;
    DispatchResult {
        id: dispatch.id,
        peer: dispatch.peer,
        latency: started.elapsed(),
        verify,
        result,
    }
}

async fn send_requests(
    inner: &Inner,
    planned: Planned,
    deadline: Instant,
    verify: &mut Duration,
) -> Result<HashMap<usize, TaskOutput>, Failure> {
    let Some(replica) = &planned.replica else {
        return Err(Failure {
            kind: "connect",
            message: "the node is no longer listed for this expert".to_owned(),
            unreachable: true,
        });
    };
    let client = inner
        .client(replica)
        .await
        .map_err(|e| Failure::from_client(&e))?;
    let dtype = inner.config.wire_dtype;
    let width = planned.hidden_size;

    let mut calls = Vec::with_capacity(planned.requests.len());
    for pieces in &planned.requests {
        let mut inputs = Vec::with_capacity(pieces.len());
        for piece in pieces {
            let mut rows = Vec::with_capacity(piece.tokens.len() * width);
            for &token in &piece.tokens {
                rows.extend_from_slice(&planned.values[token * width..(token + 1) * width]);
            }
            let hidden =
                expertnet_model::codec::wire_from_f32(&rows, &[piece.tokens.len(), width], dtype)
                    .map_err(|e| Failure {
                    kind: "encode",
                    message: e.to_string(),
                    unreachable: false,
                })?;
            inputs.push(ExpertInput {
                expert: piece.expert,
                hidden,
            });
        }
        calls.push(ForwardCall {
            request_id: request_id(inner),
            model_id: planned.model_id.clone(),
            layer: planned.layer,
            inputs,
        });
    }

    let timeout = deadline.saturating_duration_since(Instant::now());
    let digests = &planned.digests;
    let answers = futures::future::join_all(calls.iter().map(|call| {
        let mut client = client.clone();
        async move {
            client
                .forward_timed(call, Some(timeout), |_, expert| {
                    digests.get(expert as usize).copied()
                })
                .await
        }
    }))
    .await;

    let mut tasks: HashMap<usize, TaskOutput> = HashMap::new();
    for ((pieces, call), answer) in planned.requests.iter().zip(&calls).zip(answers) {
        let (outputs, spent) = answer.map_err(|e| Failure::from_client(&e))?;
        *verify += spent;
        for ((piece, input), output) in pieces.iter().zip(&call.inputs).zip(outputs) {
            let rows = expertnet_model::codec::wire_to_f32(&output.output);
            let task = tasks.entry(piece.task).or_insert_with(|| TaskOutput {
                expert: piece.expert,
                tokens: Vec::new(),
                rows: Vec::new(),
                pieces: Vec::new(),
            });
            task.tokens.extend_from_slice(&piece.tokens);
            task.rows.extend_from_slice(&rows);
            task.pieces.push((input.hidden.digest(), output));
        }
    }
    Ok(tasks)
}

fn request_id(inner: &Inner) -> RequestId {
    let mut bytes = [0u8; 16];
    if getrandom::fill(&mut bytes).is_err() {
        // Request ids need to be unique, not secret, so the router's generator suffices.
        let mut rng = lock(&inner.rng);
        bytes[..8].copy_from_slice(&rng.next_u64().to_le_bytes());
        bytes[8..].copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    RequestId::from_bytes(bytes)
}

fn replica_refs(replicas: &LayerReplicas) -> BTreeMap<u32, Vec<ReplicaRef>> {
    replicas
        .experts
        .iter()
        .map(|(&expert, list)| {
            let refs = list
                .iter()
                .map(|r| ReplicaRef {
                    peer: r.peer_id,
                    queued_tokens: r.load_tokens,
                })
                .collect();
            (expert, refs)
        })
        .collect()
}

fn call_error(call: &LayerCall) -> LayerError {
    match call.outcome() {
        Some(Err(error)) => LayerError::Call(error.clone()),
        _ => LayerError::Call(CallError::LookupDeadline),
    }
}

/// Largest per-row relative difference of `a` from `b` (rows of `width` values):
/// `max |a - b| / max |b|` per row, absolute where `b`'s row is zero. Non-finite values
/// give infinity.
pub(crate) fn max_row_relative_error(a: &[f32], b: &[f32], width: usize) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    let mut worst = 0f32;
    for (row_a, row_b) in a.chunks(width.max(1)).zip(b.chunks(width.max(1))) {
        let mut difference = 0f32;
        let mut scale = 0f32;
        for (&x, &y) in row_a.iter().zip(row_b) {
            if !x.is_finite() || !y.is_finite() {
                return f32::INFINITY;
            }
            difference = difference.max((x - y).abs());
            scale = scale.max(y.abs());
        }
        worst = worst.max(if scale > 0.0 {
            difference / scale
        } else {
            difference
        });
    }
    worst
}
