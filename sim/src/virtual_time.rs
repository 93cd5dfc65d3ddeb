//! `expertnet-sim virtual`: the router's routing policy over modeled nodes in virtual
//! time.
//!
//! The policy is the router's own sans-I/O core ([`LayerCall`] and [`PeerBook`]): this
//! module only models the network. Each modeled node has a base latency drawn from
//! a log-normal distribution, a per-token cost and a chance of being a straggler. Churn
//! takes nodes down and brings them back. A node that is down fails requests after a
//! connect timeout, as a refused or dead connection does, and stays listed as a replica,
//! as a stale DHT record would. Nothing sleeps: time is a number advanced from event to
//! event, so a run is fast and, for one seed, always gives the same report.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::path::Path;
use std::time::{Duration, Instant};

use expertnet_model::gate::TokenGate;
use expertnet_model::rng::SplitMix64;
use expertnet_router::policy::{
    Answer, CallError, CallSettings, LayerCall, PeerBook, PeerPolicy, ReplicaRef,
};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};

/// A scenario file; see `sim/scenarios/virtual-10k.toml`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    #[serde(default)]
    pub seed: u64,
    pub network: NetworkModel,
    pub workload: Workload,
    pub latency: LatencyModel,
    #[serde(default)]
    pub churn: ChurnModel,
    /// Extra runs varying replication and churn; the base run alone when absent.
    #[serde(default)]
    pub sweep: Option<Sweep>,
    /// Figures every run must reach, or the command fails.
    #[serde(default)]
    pub expect: Expectations,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkModel {
    pub nodes: usize,
    /// Experts of the one modeled layer.
    pub experts: u32,
    /// Nodes hosting each expert.
    pub replication: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    pub layer_calls: usize,
    pub tokens_per_call: usize,
    pub top_k: usize,
    #[serde(default = "default_k_min")]
    pub k_min: usize,
    /// Virtual milliseconds between the starts of two layer calls; calls do not overlap
    /// when it exceeds their duration.
    #[serde(default = "default_interval")]
    pub interval_ms: f64,
    pub deadline_ms: f64,
    #[serde(default = "default_true")]
    pub hedging: bool,
}

fn default_k_min() -> usize {
    1
}

fn default_interval() -> f64 {
    100.0
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LatencyModel {
    /// Median of the nodes' base round trip, milliseconds.
    pub median_ms: f64,
    /// Spread of the log-normal distribution of base round trips across nodes.
    pub sigma: f64,
    /// Spread of one request's latency around its node's base (log-normal jitter).
    #[serde(default)]
    pub jitter_sigma: f64,
    /// Cost of one token row, microseconds.
    pub per_token_us: f64,
    /// Share of nodes that are stragglers.
    #[serde(default)]
    pub straggler_fraction: f64,
    /// How many times slower a straggler is.
    #[serde(default = "default_straggler_factor")]
    pub straggler_factor: f64,
    /// How long a request to a node that is down takes to fail, milliseconds.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: f64,
}

fn default_straggler_factor() -> f64 {
    10.0
}

fn default_connect_timeout() -> f64 {
    20.0
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ChurnModel {
    /// Share of live nodes that go down in each layer call.
    #[serde(default)]
    pub failures_per_call: f64,
    /// Layer calls a node stays down, on average.
    #[serde(default)]
    pub mean_downtime_calls: f64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Sweep {
    #[serde(default)]
    pub replication: Vec<usize>,
    /// Factors applied to `churn.failures_per_call`.
    #[serde(default)]
    pub churn_scale: Vec<f64>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Expectations {
    /// Minimum share of tokens served, from 0 to 1.
    pub min_token_success: Option<f64>,
    /// Largest p99 layer-call latency, milliseconds.
    pub max_p99_ms: Option<f64>,
}

/// Figures of one run.
#[derive(Debug, Clone, Serialize)]
pub struct VirtualReport {
    pub replication: usize,
    pub failures_per_call: f64,
    pub layer_calls: usize,
    pub tokens: usize,
    /// Share of tokens in calls that completed.
    pub token_success: f64,
    pub failed_calls: usize,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    /// Tokens served by the busiest node over the mean of nodes that host experts.
    pub load_max_over_mean: f64,
    pub replica_fallbacks: usize,
    pub expert_fallbacks: usize,
    pub hedges: usize,
    pub requests: usize,
    /// Wall-clock seconds the run took.
    pub wall_s: f64,
}

/// Errors of reading a scenario.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("cannot read scenario {path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("invalid scenario {path}: {reason}")]
    Invalid { path: String, reason: String },
}

impl Scenario {
    /// Reads and checks a scenario file.
    ///
    /// # Errors
    /// [`ScenarioError`] naming the file and the value at fault.
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|error| ScenarioError::Io {
            path: name.clone(),
            error,
        })?;
        let scenario: Scenario = toml::from_str(&text).map_err(|e| {
            let hint = if text.contains("[[fault]]") || text.contains("duration_s") {
                " (this looks like a scenario for `expertnet-sim run`)"
            } else {
                ""
            };
            ScenarioError::Invalid {
                path: name.clone(),
                reason: format!("{}{hint}", e.to_string().trim_end()),
            }
        })?;
        scenario
            .check()
            .map_err(|reason| ScenarioError::Invalid { path: name, reason })?;
        Ok(scenario)
    }

    fn check(&self) -> Result<(), String> {
        let n = &self.network;
        let w = &self.workload;
        let l = &self.latency;
        let replications = self
            .sweep
            .as_ref()
            .map(|s| s.replication.clone())
            .unwrap_or_default();
        let rules: [(bool, String); 11] = [
            (
                (1..=100_000).contains(&n.nodes),
                format!("network.nodes is {}; give 1 to 100000", n.nodes),
            ),
            (
                (1..=4096).contains(&n.experts),
                format!("network.experts is {}; give 1 to 4096", n.experts),
            ),
            (
                replications
                    .iter()
                    .chain([&n.replication])
                    .all(|&r| r >= 1 && r <= n.nodes),
                format!("replication must be from 1 to network.nodes ({})", n.nodes),
            ),
            (
                (1..=10_000_000).contains(&w.layer_calls),
                format!(
                    "workload.layer_calls is {}; give 1 to 10000000",
                    w.layer_calls
                ),
            ),
            (
                (1..=4096).contains(&w.tokens_per_call),
                format!(
                    "workload.tokens_per_call is {}; give 1 to 4096",
                    w.tokens_per_call
                ),
            ),
            (
                w.top_k >= 1 && w.top_k <= n.experts as usize && w.k_min >= 1 && w.k_min <= w.top_k,
                format!(
                    "workload.top_k ({}) must be 1 to network.experts and k_min ({}) 1 to top_k",
                    w.top_k, w.k_min
                ),
            ),
            (
                w.deadline_ms > 0.0 && w.interval_ms >= 0.0,
                "workload.deadline_ms must be above 0 and interval_ms 0 or more".to_owned(),
            ),
            (
                l.median_ms > 0.0
                    && l.sigma >= 0.0
                    && l.jitter_sigma >= 0.0
                    && l.per_token_us >= 0.0,
                "latency values must be positive (median_ms) or 0 and more".to_owned(),
            ),
            (
                (0.0..=1.0).contains(&l.straggler_fraction) && l.straggler_factor >= 1.0,
                "latency.straggler_fraction must be 0 to 1 and straggler_factor 1 or more"
                    .to_owned(),
            ),
            (
                (0.0..=1.0).contains(&self.churn.failures_per_call)
                    && self.churn.mean_downtime_calls >= 0.0,
                "churn.failures_per_call must be 0 to 1 and mean_downtime_calls 0 or more"
                    .to_owned(),
            ),
            (
                l.connect_timeout_ms > 0.0,
                "latency.connect_timeout_ms must be above 0".to_owned(),
            ),
        ];
        match rules.into_iter().find(|(ok, _)| !ok) {
            Some((_, reason)) => Err(reason),
            None => Ok(()),
        }
    }

    /// Lists the runs of the sweep: every replication with every churn scale.
    pub fn runs(&self) -> Vec<(usize, f64)> {
        let sweep = self.sweep.clone().unwrap_or(Sweep {
            replication: Vec::new(),
            churn_scale: Vec::new(),
        });
        let replications = if sweep.replication.is_empty() {
            vec![self.network.replication]
        } else {
            sweep.replication
        };
        let scales = if sweep.churn_scale.is_empty() {
            vec![1.0]
        } else {
            sweep.churn_scale
        };
        replications
            .iter()
            .flat_map(|&r| scales.iter().map(move |&s| (r, s)))
            .collect()
    }

    /// Lists the figures of `report` that miss the scenario's expectations.
    pub fn misses(&self, report: &VirtualReport) -> Vec<String> {
        let mut misses = Vec::new();
        if let Some(min) = self.expect.min_token_success
            && report.token_success < min
        {
            misses.push(format!(
                "replication {}, churn {}: token success {:.4} below {min}",
                report.replication, report.failures_per_call, report.token_success
            ));
        }
        if let Some(max) = self.expect.max_p99_ms
            && report.p99_ms > max
        {
            misses.push(format!(
                "replication {}, churn {}: p99 {:.1} ms above {max} ms",
                report.replication, report.failures_per_call, report.p99_ms
            ));
        }
        misses
    }
}

/// One modeled node.
#[derive(Debug, Clone)]
struct ModelNode {
    peer: PeerId,
    base_ms: f64,
    /// Index of the layer call from which the node is up again; 0 when up.
    down_until: usize,
    served_tokens: u64,
}

/// Runs the scenario once with `replication` and churn scaled by `churn_scale`.
pub fn run(scenario: &Scenario, replication: usize, churn_scale: f64) -> VirtualReport {
    let wall = Instant::now();
    let mut rng = SplitMix64::new(scenario.seed);
    let latency = &scenario.latency;
    let network = &scenario.network;
    let workload = &scenario.workload;

    // Peer ids from fixed keys, so the ordering among ties is the same in every run.
    let mut nodes: Vec<ModelNode> = (0..network.nodes)
        .map(|index| {
            let mut seed = [0u8; 32];
            seed[..8].copy_from_slice(&(index as u64).to_le_bytes());
            seed[8..16].copy_from_slice(&scenario.seed.to_le_bytes());
            let key = libp2p::identity::Keypair::ed25519_from_bytes(seed)
                .unwrap_or_else(|_| libp2p::identity::Keypair::generate_ed25519());
            let straggler = f64::from(rng.next_unit()) < latency.straggler_fraction;
            let base = latency.median_ms * (latency.sigma * f64::from(rng.next_normal())).exp();
            ModelNode {
                peer: key.public().to_peer_id(),
                base_ms: if straggler {
                    base * latency.straggler_factor
                } else {
                    base
                },
                down_until: 0,
                served_tokens: 0,
            }
        })
        .collect();
    let index_of: BTreeMap<PeerId, usize> =
        nodes.iter().enumerate().map(|(i, n)| (n.peer, i)).collect();

    // Each expert on `replication` distinct nodes chosen at random.
    let mut hosting = vec![0u32; nodes.len()];
    let table: BTreeMap<u32, Vec<ReplicaRef>> = (0..network.experts)
        .map(|expert| {
            let mut chosen: Vec<usize> = Vec::with_capacity(replication);
            while chosen.len() < replication.min(nodes.len()) {
                let pick = (rng.next_u64() % nodes.len() as u64) as usize;
                if !chosen.contains(&pick) {
                    chosen.push(pick);
                }
            }
            let refs = chosen
                .iter()
                .map(|&i| {
                    hosting[i] += 1;
                    ReplicaRef {
                        peer: nodes[i].peer,
                        queued_tokens: 0,
                    }
                })
                .collect();
            (expert, refs)
        })
        .collect();

    let mut book = PeerBook::new(PeerPolicy::default());
    let origin = Instant::now();
    let at = |ms: f64| origin + Duration::from_secs_f64(ms.max(0.0) / 1e3);
    let failures_per_call = scenario.churn.failures_per_call * churn_scale;
    let mut latencies = Vec::with_capacity(workload.layer_calls);
    let mut report = VirtualReport {
        replication,
        failures_per_call,
        layer_calls: workload.layer_calls,
        tokens: workload.layer_calls * workload.tokens_per_call,
        token_success: 0.0,
        failed_calls: 0,
        p50_ms: 0.0,
        p95_ms: 0.0,
        p99_ms: 0.0,
        load_max_over_mean: 0.0,
        replica_fallbacks: 0,
        expert_fallbacks: 0,
        hedges: 0,
        requests: 0,
        wall_s: 0.0,
    };
    let mut served_tokens = 0usize;

    for call_index in 0..workload.layer_calls {
        // Churn: some live nodes go down for a while.
        let expected = failures_per_call * nodes.len() as f64;
        let mut count = expected.floor() as usize;
        if f64::from(rng.next_unit()) < expected.fract() {
            count += 1;
        }
        for _ in 0..count {
            let victim = (rng.next_u64() % nodes.len() as u64) as usize;
            let downtime = (scenario.churn.mean_downtime_calls
                * -f64::from(rng.next_unit().max(1e-6)).ln())
            .ceil() as usize;
            nodes[victim].down_until = call_index + downtime.max(1);
        }

        let start_ms = call_index as f64 * workload.interval_ms;
        let gates: Vec<TokenGate> = (0..workload.tokens_per_call)
            .map(|_| TokenGate::from_logits(rng.normal_vec(network.experts as usize)))
            .collect();
        let settings = CallSettings {
            top_k: workload.top_k,
            k_min: workload.k_min,
            deadline: at(start_ms + workload.deadline_ms),
            hedging: workload.hedging,
        };
        let mut call = LayerCall::new(gates, table.clone(), settings);
        // Responses pending, by virtual completion time in microseconds.
        let mut events: BinaryHeap<Reverse<(u64, u64, bool)>> = BinaryHeap::new();
        let mut dispatch_tokens: BTreeMap<u64, (usize, usize)> = BTreeMap::new();
        let mut now_ms = start_ms;
        loop {
            while let Some(dispatch) = call.poll_dispatch(at(now_ms), &book, &mut rng) {
                report.requests += 1;
                let node_index = index_of.get(&dispatch.peer).copied().unwrap_or(0);
                let node = &nodes[node_index];
                let tokens: usize = dispatch.tasks.iter().map(|t| t.tokens.len()).sum();
                let up = node.down_until <= call_index;
                let duration_ms = if up {
                    let jitter = (latency.jitter_sigma * f64::from(rng.next_normal())).exp();
                    node.base_ms * jitter + latency.per_token_us * tokens as f64 / 1e3
                } else {
                    latency.connect_timeout_ms
                };
                let done_us = ((now_ms + duration_ms) * 1e3) as u64;
                events.push(Reverse((done_us, dispatch.id, up)));
                dispatch_tokens.insert(dispatch.id, (node_index, tokens));
            }
            if call.is_done() {
                break;
            }
            let next_answer = events.peek().map(|Reverse((us, _, _))| *us as f64 / 1e3);
            let wakeup = call
                .next_wakeup()
                .map(|t| t.saturating_duration_since(origin).as_secs_f64() * 1e3);
            match (next_answer, wakeup) {
                (Some(answer), wake) if wake.is_none_or(|w| answer <= w) => {
                    let Some(Reverse((_, id, up))) = events.pop() else {
                        break;
                    };
                    now_ms = answer.max(now_ms);
                    let outcome = if up {
                        let tasks = call_tasks(&call, id);
                        Answer::Tasks(tasks.into_iter().map(|t| (t, Ok(()))).collect())
                    } else {
                        Answer::Failed("unavailable: connection refused".to_owned())
                    };
                    if up && let Some(&(node_index, tokens)) = dispatch_tokens.get(&id) {
                        nodes[node_index].served_tokens += tokens as u64;
                    }
                    call.on_answer(id, outcome, at(now_ms), &mut book);
                }
                (_, Some(wake)) => {
                    now_ms = wake.max(now_ms);
                    call.on_time(at(now_ms), &book, &mut rng);
                }
                (_, None) => break,
            }
        }
        call.finish_in_flight(at(now_ms), &mut book);
        match call.outcome() {
            Some(Ok(result)) => {
                served_tokens += workload.tokens_per_call;
                report.replica_fallbacks += result.replica_fallbacks;
                report.expert_fallbacks += result.expert_fallbacks;
                report.hedges += result.hedges;
                latencies.push(now_ms - start_ms);
            }
            Some(Err(CallError::Deadline { .. } | CallError::LookupDeadline)) => {
                report.failed_calls += 1;
                latencies.push(workload.deadline_ms);
            }
            _ => {
                report.failed_calls += 1;
                latencies.push(now_ms - start_ms);
            }
        }
    }

    report.token_success = served_tokens as f64 / report.tokens.max(1) as f64;
    latencies.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        let rank = ((q * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len().max(1));
        latencies.get(rank - 1).copied().unwrap_or(0.0)
    };
    report.p50_ms = pick(0.50);
    report.p95_ms = pick(0.95);
    report.p99_ms = pick(0.99);
    let hosts: Vec<u64> = nodes
        .iter()
        .zip(&hosting)
        .filter(|(_, h)| **h > 0)
        .map(|(n, _)| n.served_tokens)
        .collect();
    let mean = hosts.iter().sum::<u64>() as f64 / hosts.len().max(1) as f64;
    let max = hosts.iter().copied().max().unwrap_or(0) as f64;
    report.load_max_over_mean = if mean > 0.0 { max / mean } else { 0.0 };
    report.wall_s = wall.elapsed().as_secs_f64();
    report
}

/// Task indices of a dispatch still in flight.
fn call_tasks(call: &LayerCall, dispatch: u64) -> Vec<usize> {
    call.dispatch_tasks(dispatch).unwrap_or_default()
}

/// Formats the reports as a Markdown table.
pub fn to_markdown(reports: &[VirtualReport]) -> String {
    let mut text = String::from(
        "| replication | failures per call | layer calls | tokens | token success | failed calls | p50 / p95 / p99 ms | load, max over mean | replica fallbacks | expert fallbacks | hedges | requests | wall s |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in reports {
        text.push_str(&format!(
            "| {} | {} | {} | {} | {:.5} | {} | {:.1} / {:.1} / {:.1} | {:.2} | {} | {} | {} | {} | {:.1} |\n",
            r.replication,
            r.failures_per_call,
            r.layer_calls,
            r.tokens,
            r.token_success,
            r.failed_calls,
            r.p50_ms,
            r.p95_ms,
            r.p99_ms,
            r.load_max_over_mean,
            r.replica_fallbacks,
            r.expert_fallbacks,
            r.hedges,
            r.requests,
            r.wall_s
        ));
    }
    text
}
