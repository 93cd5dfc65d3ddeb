//! `expertnet-sim run --scenario FILE`: a network of real nodes in this process on
//! 127.0.0.1, a client sending a paced workload through one MoE layer, and a schedule of
//! faults. The report covers tokens served and failed with reasons, latency per second,
//! fallbacks, hedges, nodes banned for wrong results, the difference from the local
//! layer, and an SVG plot with the faults marked.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use expertnet_model::rng::SplitMix64;
use expertnet_model::{
    Checkpoint, Family, GeneratorOptions, LocalMoeLayer, Manifest, generate_checkpoint,
    max_row_relative_error,
};
use expertnet_node::{ExpertSpec, FaultConfig, Node, NodeConfig, NodeKey, P2pConfig, RunningNode};
use expertnet_router::{DiscoveryConfig, RemoteMoeLayer, Router, RouterConfig};
use serde::{Deserialize, Serialize};

/// A scenario file; see the examples in `sim/scenarios/`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RealScenario {
    #[serde(default)]
    pub seed: u64,
    pub network: RealNetwork,
    pub workload: RealWorkload,
    /// Faults, in any order; each fires once at its time.
    #[serde(default, rename = "fault")]
    pub faults: Vec<Fault>,
    #[serde(default)]
    pub expect: RealExpectations,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RealNetwork {
    /// Nodes besides the bootstrap node, which hosts no experts.
    pub nodes: usize,
    pub experts: usize,
    /// Nodes hosting each expert: node `i` hosts the expert blocks `i` to
    /// `i + replication - 1` (modulo the node count), one block per node.
    pub replication: usize,
    #[serde(default = "default_hidden")]
    pub hidden: usize,
    #[serde(default = "default_ffn")]
    pub ffn: usize,
    /// Delay added to every request of every node, milliseconds, standing for the link.
    #[serde(default)]
    pub link_delay_ms: u64,
    /// Further delay per request, drawn uniformly from 0 to this, milliseconds.
    #[serde(default)]
    pub link_jitter_ms: u64,
    /// Layers of the generated model; the workload goes through the last one.
    #[serde(default = "default_layers")]
    pub layers: usize,
}

fn default_layers() -> usize {
    2
}

fn default_hidden() -> usize {
    64
}

fn default_ffn() -> usize {
    128
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RealWorkload {
    pub duration_s: f64,
    /// Layer calls started per second, one after another.
    pub calls_per_s: f64,
    pub batch: usize,
    #[serde(default = "default_deadline")]
    pub deadline_ms: u64,
    #[serde(default)]
    pub spot_check_rate: f64,
}

fn default_deadline() -> u64 {
    2000
}

/// One scheduled fault.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    pub at_s: f64,
    pub action: FaultAction,
    /// Node index, from 1; 0 is the bootstrap node.
    #[serde(default)]
    pub node: usize,
    /// For `slow`: the delay, such as `200ms`; for `advertise-load`: token rows.
    #[serde(default)]
    pub value: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultAction {
    /// Stop the node at once, as a crash would.
    Kill,
    /// Start a killed node again with the same key.
    Restart,
    /// Hold every request without a response; `resume` undoes it.
    Pause,
    Resume,
    /// Delay every request by `value`.
    Slow,
    WrongOutput,
    NanOutput,
    BadSignature,
    AdvertiseLoad,
    /// Start one more node hosting every expert, through the bootstrap address.
    Join,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RealExpectations {
    pub max_failed_tokens: Option<usize>,
    pub max_p50_ms: Option<f64>,
    pub max_p99_ms: Option<f64>,
    /// Nodes (indices) that must end banned for wrong results.
    #[serde(default)]
    pub banned: Vec<usize>,
    /// Largest relative difference from the local layer over tokens served by their own
    /// top k, after the last ban.
    pub max_rel_error_after_bans: Option<f32>,
    /// Every node started by a `join` fault must be listed by discovery at the end.
    #[serde(default)]
    pub joined_visible: bool,
}

/// Latency and failures of one second of the run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Second {
    pub second: usize,
    pub calls: usize,
    pub failed_tokens: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// The report of a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RealReport {
    pub requested_tokens: usize,
    pub served_tokens: usize,
    pub failed_tokens: usize,
    /// Failed layer calls by error, and failed requests by reason.
    pub failures: BTreeMap<String, u64>,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub replica_fallbacks: usize,
    pub expert_fallbacks: usize,
    pub hedges: usize,
    pub spot_checks: usize,
    /// Node index to the second of its first ban for a wrong result.
    pub banned: BTreeMap<usize, f64>,
    /// Over tokens served by their own top k.
    pub max_rel_error: f32,
    /// The same, counting only layer calls after the last expected ban.
    pub max_rel_error_after_bans: f32,
    pub joined_visible: bool,
    pub seconds: Vec<Second>,
    /// The faults as they fired: second and description.
    pub fault_log: Vec<(f64, String)>,
    pub misses: Vec<String>,
}

/// Reads a scenario file.
///
/// # Errors
/// A message naming the file and the value at fault.
pub fn load(path: &Path) -> anyhow::Result<RealScenario> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read scenario {}: {e}", path.display()))?;
    let scenario: RealScenario = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("invalid scenario {}: {e}", path.display()))?;
    let n = &scenario.network;
    let w = &scenario.workload;
    let problems = [
        ((1..=64).contains(&n.nodes), "network.nodes must be 1 to 64"),
        (
            (1..=32).contains(&n.layers),
            "network.layers must be 1 to 32",
        ),
        (
            (2..=256).contains(&n.experts),
            "network.experts must be 2 to 256",
        ),
        (
            n.replication >= 1 && n.replication <= n.nodes,
            "network.replication must be 1 to network.nodes",
        ),
        (
            (8..=4096).contains(&n.hidden)
                && n.hidden.is_multiple_of(8)
                && (1..=16384).contains(&n.ffn),
            "network.hidden must be 8 to 4096 and divisible by 8, network.ffn 1 to 16384",
        ),
        (
            w.duration_s > 0.0
                && w.duration_s <= 600.0
                && w.calls_per_s > 0.0
                && w.calls_per_s <= 1000.0,
            "workload.duration_s must be up to 600 and calls_per_s up to 1000",
        ),
        (
            (1..=1024).contains(&w.batch),
            "workload.batch must be 1 to 1024",
        ),
        (
            (0.0..=1.0).contains(&w.spot_check_rate),
            "workload.spot_check_rate must be 0 to 1",
        ),
    ];
    if let Some((_, problem)) = problems.iter().find(|(ok, _)| !ok) {
        anyhow::bail!("invalid scenario {}: {problem}", path.display());
    }
    for fault in &scenario.faults {
        if fault.node > n.nodes && fault.action != FaultAction::Join {
            anyhow::bail!(
                "invalid scenario {}: a {} fault names node {}, but the nodes are 0 (the bootstrap node) to {}",
                path.display(),
                toml::Value::try_from(fault.action).map_or_else(
                    |_| "scheduled".to_owned(),
                    |v| v.as_str().unwrap_or("scheduled").to_owned()
                ),
                fault.node,
                n.nodes
            );
        }
        if !(0.0..=w.duration_s).contains(&fault.at_s) {
            anyhow::bail!(
                "invalid scenario {}: a fault at {} s is outside the run of {} s",
                path.display(),
                fault.at_s,
                w.duration_s
            );
        }
    }
    Ok(scenario)
}

struct Slot {
    node: Option<RunningNode>,
    key: NodeKey,
    spec: String,
    faults: FaultConfig,
}

async fn start(
    dir: &Path,
    slot_key: &NodeKey,
    spec: &str,
    faults: &FaultConfig,
    bootstrap: Option<libp2p::Multiaddr>,
    p2p_listen: Option<libp2p::Multiaddr>,
) -> anyhow::Result<RunningNode> {
    let mut config = NodeConfig::new(dir, spec.parse::<ExpertSpec>()?);
    config.threads = Some(1);
    config.faults = faults.clone();
    let mut p2p = P2pConfig {
        bootstrap: bootstrap.into_iter().collect(),
        ..P2pConfig::default()
    };
    if let Some(address) = p2p_listen {
        p2p.listen = vec![address];
    }
    config.p2p = Some(p2p);
    Ok(Node::start(config, slot_key.clone()).await?)
}

/// Runs a scenario.
///
/// # Errors
/// Failures to set up the network; failures during the run are reported, not returned.
pub async fn run(scenario: &RealScenario, plot: Option<&Path>) -> anyhow::Result<RealReport> {
    let dir = tempfile::tempdir()?;
    let n = &scenario.network;
    generate_checkpoint(
        dir.path(),
        &GeneratorOptions {
            family: Family::Mixtral,
            layers: n.layers,
            experts: n.experts,
            hidden: n.hidden,
            ffn: n.ffn,
            vocab: 16,
            heads: 8,
            kv_heads: 8,
            seed: scenario.seed,
            ..GeneratorOptions::default()
        },
    )?;
    let base_faults = FaultConfig {
        delay: Duration::from_millis(n.link_delay_ms),
        jitter: Duration::from_millis(n.link_jitter_ms),
        ..FaultConfig::default()
    };
    let layer_index = (n.layers - 1) as u32;

    // Slot 0 is the bootstrap node; it hosts expert 0 only, so that it takes part.
    let mut slots: Vec<Slot> = Vec::new();
    let mut specs = vec!["*:0".to_owned()];
    specs
        .extend((0..n.nodes).map(|index| {
            crate::network::block_spec("*", index, n.nodes, n.experts, n.replication)
        }));
    let mut bootstrap_addr = None;
    let mut bootstrap_listen = None;
    for spec in specs {
        let key = NodeKey::generate()?;
        let node = start(
            dir.path(),
            &key,
            &spec,
            &base_faults,
            bootstrap_addr.clone(),
            None,
        )
        .await?;
        if bootstrap_addr.is_none() {
            bootstrap_addr = node.bootstrap_addr();
            bootstrap_listen = node.p2p_addrs().first().cloned();
        }
        slots.push(Slot {
            node: Some(node),
            key,
            spec,
            faults: base_faults.clone(),
        });
    }
    let bootstrap =
        bootstrap_addr.ok_or_else(|| anyhow::anyhow!("the bootstrap node has no p2p address"))?;

    let mut config = RouterConfig::new(DiscoveryConfig::new(vec![bootstrap.clone()]));
    config.seed = Some(scenario.seed);
    config.deadline = Duration::from_millis(scenario.workload.deadline_ms);
    config.spot_check_rate = scenario.workload.spot_check_rate;
    // Churn scenarios need replicas to come back soon after a restart.
    config.discovery.cache_ttl = Duration::from_secs(2);
    let router = Router::connect(config).await?;
    let checkpoint = Checkpoint::open(dir.path())?;
    let manifest = Manifest::load(&Manifest::path_in(dir.path()))?;
    let layer = RemoteMoeLayer::new(&router, &checkpoint, &manifest, layer_index)?;
    let local = LocalMoeLayer::load(&checkpoint, layer_index)?;
    wait_covered(&router, &layer, n.experts).await?;

    let mut faults = scenario.faults.clone();
    faults.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
    let mut next_fault = 0;
    let mut report = RealReport::default();
    let mut rng = SplitMix64::new(scenario.seed);
    // Per layer call: second of the run, latency in ms, tokens failed.
    let mut latencies: Vec<(f64, f64, usize)> = Vec::new();
    let mut joined: Vec<libp2p::PeerId> = Vec::new();
    let workload = &scenario.workload;
    let interval = Duration::from_secs_f64(1.0 / workload.calls_per_s);
    let total_calls = (workload.duration_s * workload.calls_per_s).ceil() as usize;
    let started = Instant::now();
    let last_ban_at = faults
        .iter()
        .filter(|f| {
            matches!(
                f.action,
                FaultAction::WrongOutput | FaultAction::NanOutput | FaultAction::BadSignature
            )
        })
        .map(|f| f.at_s)
        .fold(0.0, f64::max);

    for call in 0..total_calls {
        tokio::time::sleep_until((started + interval * call as u32).into()).await;
        let now_s = started.elapsed().as_secs_f64();
        while let Some(fault) = faults.get(next_fault).filter(|f| f.at_s <= now_s) {
            let text = apply_fault(
                fault,
                &mut slots,
                dir.path(),
                &bootstrap,
                bootstrap_listen.clone(),
                &mut joined,
            )
            .await;
            report.fault_log.push((now_s, text));
            next_fault += 1;
        }
        if call % 10 == 0 {
            progress(now_s, workload.duration_s);
        }

        let x = Tensor::from_vec(
            rng.normal_vec(workload.batch * n.hidden),
            (workload.batch, n.hidden),
            &Device::Cpu,
        )?;
        report.requested_tokens += workload.batch;
        let call_started = Instant::now();
        match layer.forward(&x).await {
            Ok(out) => {
                let ms = call_started.elapsed().as_secs_f64() * 1e3;
                latencies.push((now_s, ms, 0));
                report.served_tokens += workload.batch;
                report.replica_fallbacks += out.trace.replica_fallbacks;
                report.expert_fallbacks += out.trace.expert_fallbacks;
                report.hedges += out.trace.hedges;
                report.spot_checks += out.trace.spot_checks;
                let expected = local.forward(&x)?;
                for (token, trace) in out.trace.tokens.iter().enumerate() {
                    if trace.fell_back() {
                        continue;
                    }
                    let error = max_row_relative_error(
                        &out.output.get(token)?.unsqueeze(0)?,
                        &expected.get(token)?.unsqueeze(0)?,
                    )?;
                    let error = if error.is_nan() { f32::INFINITY } else { error };
                    report.max_rel_error = report.max_rel_error.max(error);
                    if now_s > last_ban_at + 1.0 {
                        report.max_rel_error_after_bans =
                            report.max_rel_error_after_bans.max(error);
                    }
                }
            }
            Err(error) => {
                let ms = call_started.elapsed().as_secs_f64() * 1e3;
                latencies.push((now_s, ms, workload.batch));
                report.failed_tokens += workload.batch;
                let kind = match &error {
                    expertnet_router::LayerError::Call(
                        expertnet_router::policy::CallError::Deadline { .. },
                    ) => "deadline",
                    expertnet_router::LayerError::Call(
                        expertnet_router::policy::CallError::Unserved { .. },
                    ) => "unserved",
                    _ => "other",
                };
                *report.failures.entry(format!("call {kind}")).or_default() += 1;
            }
        }
        let book = router.peer_book();
        for (index, slot) in slots.iter().enumerate() {
            if book.is_suspect(&slot.key.peer_id()) && !report.banned.contains_key(&index) {
                report.banned.insert(index, started.elapsed().as_secs_f64());
            }
        }
    }
    progress(workload.duration_s, workload.duration_s);
    eprintln!();

    for (kind, count) in router.stats().failure_counts() {
        *report
            .failures
            .entry(format!("request {kind}"))
            .or_default() += count;
    }
    if !joined.is_empty() {
        let table = router
            .discovery()
            .resolve_fresh(layer.model_id(), layer.layer())
            .await?;
        report.joined_visible = joined.iter().all(|peer| {
            (0..n.experts as u32).any(|e| table.replicas(e).iter().any(|r| r.peer_id == *peer))
        });
    }
    fill_latency(&mut report, &latencies);
    report.misses = misses(scenario, &report);
    if let Some(path) = plot {
        std::fs::write(path, svg(&report, workload.duration_s))
            .map_err(|e| anyhow::anyhow!("cannot write the plot {}: {e}", path.display()))?;
    }
    for slot in slots {
        if let Some(node) = slot.node {
            node.kill();
        }
    }
    Ok(report)
}

async fn wait_covered(
    router: &Router,
    layer: &RemoteMoeLayer,
    experts: usize,
) -> anyhow::Result<()> {
    for _ in 0..150 {
        let table = router
            .discovery()
            .resolve_fresh(layer.model_id(), layer.layer())
            .await?;
        if (0..experts as u32).all(|e| !table.replicas(e).is_empty()) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!("after 30 s discovery does not list every expert")
}

async fn apply_fault(
    fault: &Fault,
    slots: &mut Vec<Slot>,
    dir: &Path,
    bootstrap: &libp2p::Multiaddr,
    bootstrap_listen: Option<libp2p::Multiaddr>,
    joined: &mut Vec<libp2p::PeerId>,
) -> String {
    let index = fault.node;
    if fault.action == FaultAction::Join {
        let key = match NodeKey::generate() {
            Ok(key) => key,
            Err(error) => return format!("join failed: {error}"),
        };
        let spec = "*".to_owned();
        return match start(
            dir,
            &key,
            &spec,
            &FaultConfig::default(),
            Some(bootstrap.clone()),
            None,
        )
        .await
        {
            Ok(node) => {
                joined.push(key.peer_id());
                slots.push(Slot {
                    node: Some(node),
                    key,
                    spec,
                    faults: FaultConfig::default(),
                });
                format!("node {} joined", slots.len() - 1)
            }
            Err(error) => format!("join failed: {error}"),
        };
    }
    let Some(slot) = slots.get_mut(index) else {
        return format!("no node {index}");
    };
    let mut faults = slot.faults.clone();
    match fault.action {
        FaultAction::Kill => {
            if let Some(node) = slot.node.take() {
                node.kill();
            }
            return format!("node {index} killed");
        }
        FaultAction::Restart => {
            if slot.node.is_some() {
                return format!("node {index} is running; restart skipped");
            }
            // The bootstrap node comes back on its old address, which the others retry.
            let listen = if index == 0 { bootstrap_listen } else { None };
            let upstream = if index == 0 {
                None
            } else {
                Some(bootstrap.clone())
            };
            return match start(dir, &slot.key, &slot.spec, &slot.faults, upstream, listen).await {
                Ok(node) => {
                    slot.node = Some(node);
                    format!("node {index} restarted")
                }
                Err(error) => format!("node {index} failed to restart: {error}"),
            };
        }
        FaultAction::Pause => faults.stop_answering = true,
        FaultAction::Resume => faults.stop_answering = false,
        FaultAction::Slow => {
            let value = fault.value.clone().unwrap_or_else(|| "200ms".to_owned());
            if let Err(error) = faults.apply(&format!("delay={value}")) {
                return format!("slow node {index}: {error}");
            }
        }
        FaultAction::WrongOutput => faults.wrong_output = true,
        FaultAction::NanOutput => faults.nan_output = true,
        FaultAction::BadSignature => faults.bad_signature = true,
        FaultAction::AdvertiseLoad => {
            faults.advertised_load = fault
                .value
                .as_deref()
                .and_then(|v| v.parse().ok())
                .or(Some(10_000));
        }
        FaultAction::Join => {}
    }
    slot.faults = faults.clone();
    if let Some(node) = &slot.node {
        node.set_faults(faults.clone());
    }
    format!("node {index}: {faults}")
}

fn progress(now_s: f64, total_s: f64) {
    let width = 30;
    let done = ((now_s / total_s).clamp(0.0, 1.0) * width as f64) as usize;
    eprint!(
        "\r[{}{}] {now_s:.0}/{total_s:.0} s",
        "#".repeat(done),
        " ".repeat(width - done)
    );
}

fn fill_latency(report: &mut RealReport, latencies: &[(f64, f64, usize)]) {
    let quantile = |values: &mut Vec<f64>, q: f64| -> f64 {
        if values.is_empty() {
            return 0.0;
        }
        values.sort_by(f64::total_cmp);
        let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
        values[rank - 1]
    };
    let mut all: Vec<f64> = latencies.iter().map(|&(_, ms, _)| ms).collect();
    report.p50_ms = quantile(&mut all, 0.50);
    report.p95_ms = quantile(&mut all, 0.95);
    report.p99_ms = quantile(&mut all, 0.99);
    let last = latencies
        .iter()
        .map(|&(s, _, _)| s as usize)
        .max()
        .unwrap_or(0);
    for second in 0..=last {
        let in_second = latencies.iter().filter(|&&(s, _, _)| s as usize == second);
        let failed_tokens = in_second.clone().map(|&(_, _, failed)| failed).sum();
        let mut values: Vec<f64> = in_second.map(|&(_, ms, _)| ms).collect();
        report.seconds.push(Second {
            second,
            calls: values.len(),
            failed_tokens,
            p50_ms: quantile(&mut values, 0.5),
            p99_ms: quantile(&mut values, 0.99),
        });
    }
}

fn misses(scenario: &RealScenario, report: &RealReport) -> Vec<String> {
    let e = &scenario.expect;
    let mut misses = Vec::new();
    if let Some(max) = e.max_failed_tokens
        && report.failed_tokens > max
    {
        misses.push(format!(
            "{} tokens failed, above {max}",
            report.failed_tokens
        ));
    }
    if let Some(max) = e.max_p50_ms
        && report.p50_ms > max
    {
        misses.push(format!("p50 {:.1} ms, above {max} ms", report.p50_ms));
    }
    if let Some(max) = e.max_p99_ms
        && report.p99_ms > max
    {
        misses.push(format!("p99 {:.1} ms, above {max} ms", report.p99_ms));
    }
    for node in &e.banned {
        if !report.banned.contains_key(node) {
            misses.push(format!("node {node} was never banned for wrong results"));
        }
    }
    if let Some(max) = e.max_rel_error_after_bans
        && report.max_rel_error_after_bans > max
    {
        misses.push(format!(
            "after the bans, outputs differ from the local layer by {:.2e}, above {max:.0e}",
            report.max_rel_error_after_bans
        ));
    }
    if e.joined_visible && !report.joined_visible {
        misses.push("a node that joined is not listed by discovery".to_owned());
    }
    misses
}

/// Draws p50 and p99 latency per second as lines, with the faults as vertical marks.
pub fn svg(report: &RealReport, duration_s: f64) -> String {
    let (width, height, margin) = (800.0, 300.0, 40.0);
    let max_ms = report.seconds.iter().map(|s| s.p99_ms).fold(1.0, f64::max);
    let x = |s: f64| margin + s / duration_s.max(1.0) * (width - 2.0 * margin);
    let y = |ms: f64| height - margin - ms / max_ms * (height - 2.0 * margin);
    let line = |pick: fn(&Second) -> f64| -> String {
        report
            .seconds
            .iter()
            .map(|s| format!("{:.1},{:.1}", x(s.second as f64 + 0.5), y(pick(s))))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = write!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (at, text) in &report.fault_log {
        let _ = write!(
            out,
            r#"<line x1="{0:.1}" x2="{0:.1}" y1="{margin}" y2="{1:.1}" stroke="red" stroke-dasharray="4"/><text x="{0:.1}" y="{2:.1}" fill="red">{3}</text>"#,
            x(*at),
            height - margin,
            margin - 4.0,
            text.replace('<', "&lt;")
        );
    }
    let _ = write!(
        out,
        r#"<polyline fill="none" stroke="steelblue" points="{}"/>"#,
        line(|s| s.p50_ms)
    );
    let _ = write!(
        out,
        r#"<polyline fill="none" stroke="darkorange" points="{}"/>"#,
        line(|s| s.p99_ms)
    );
    let _ = write!(
        out,
        r#"<text x="{margin}" y="{0:.1}">layer-call latency per second: p50 (blue), p99 (orange); max {max_ms:.1} ms; faults in red</text></svg>"#,
        height - 10.0
    );
    out
}

/// Formats the report as text.
pub fn to_text(report: &RealReport) -> String {
    let mut text = String::new();
    let _ = writeln!(
        text,
        "tokens: {} requested, {} served, {} failed",
        report.requested_tokens, report.served_tokens, report.failed_tokens
    );
    let _ = writeln!(
        text,
        "layer-call latency: p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms",
        report.p50_ms, report.p95_ms, report.p99_ms
    );
    let _ = writeln!(
        text,
        "fallbacks: {} to another replica, {} tokens to another expert; hedges {}; spot checks {}",
        report.replica_fallbacks, report.expert_fallbacks, report.hedges, report.spot_checks
    );
    let failures: Vec<String> = report
        .failures
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    let _ = writeln!(
        text,
        "failures: {}",
        if failures.is_empty() {
            "none".to_owned()
        } else {
            failures.join(", ")
        }
    );
    let banned: Vec<String> = report
        .banned
        .iter()
        .map(|(n, s)| format!("node {n} at {s:.1} s"))
        .collect();
    let _ = writeln!(
        text,
        "banned for wrong results: {}",
        if banned.is_empty() {
            "none".to_owned()
        } else {
            banned.join(", ")
        }
    );
    let _ = writeln!(
        text,
        "max relative error against the local layer: {:.2e} ({:.2e} after the bans)",
        report.max_rel_error, report.max_rel_error_after_bans
    );
    if report.fault_log.iter().any(|(_, f)| f.ends_with("joined")) {
        let _ = writeln!(
            text,
            "nodes that joined: {}",
            if report.joined_visible {
                "listed by discovery"
            } else {
                "NOT listed by discovery"
            }
        );
    }
    let _ = writeln!(text, "faults:");
    for (at, fault) in &report.fault_log {
        let _ = writeln!(text, "  {at:6.1} s  {fault}");
    }
    let _ = writeln!(
        text,
        "| second | calls | failed tokens | p50 ms | p99 ms |\n|---:|---:|---:|---:|---:|"
    );
    for s in &report.seconds {
        let _ = writeln!(
            text,
            "| {} | {} | {} | {:.1} | {:.1} |",
            s.second, s.calls, s.failed_tokens, s.p50_ms, s.p99_ms
        );
    }
    text
}

/// Returns the default plot path for a scenario file: its name with `.svg`, in the
/// temporary folder.
pub fn default_plot(scenario: &Path) -> PathBuf {
    std::env::temp_dir().join(format!(
        "{}.svg",
        scenario
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("scenario")
    ))
}
