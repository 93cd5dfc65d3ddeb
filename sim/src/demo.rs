//! `expertnet-sim demo`: a small network on this machine, end to end.
//!
//! It makes (or reuses) a small checkpoint and starts five nodes in this process on
//! 127.0.0.1: a bootstrap node hosting expert 0 of every layer, and four nodes that host
//! every expert twice over. A router finds the experts through the DHT. The client
//! generates text with the dense model here and every MoE layer on the network. Halfway
//! through, one node is killed, and the text must still match the model computed
//! locally. Then another node starts returning wrong outputs under valid signatures
//! while random hidden states go through every MoE layer, and spot checks catch and ban
//! it. Each layer's output is compared with the same layer computed locally.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use expertnet_model::rng::SplitMix64;
use expertnet_model::{
    Checkpoint, GeneratorOptions, LocalMoeLayer, Manifest, generate_checkpoint,
    max_row_relative_error,
};
use expertnet_node::{ExpertSpec, FaultConfig, Node, NodeConfig, NodeKey, P2pConfig, RunningNode};
use expertnet_router::generate::check_against_reference;
use expertnet_router::{
    Discovery, DiscoveryConfig, GenerateOptions, MoeModel, RemoteMoeLayer, Router, RouterConfig,
    generate, short_peer_id,
};

/// Options of the demo.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Checkpoint folder; generated there with the default generator options if it
    /// contains no checkpoint yet.
    pub checkpoint: PathBuf,
    /// Token rows per expert call.
    pub tokens: usize,
    pub seed: u64,
}

/// Nodes of the demo network besides the bootstrap node.
const NODES: usize = 4;

/// Largest accepted relative difference from local computation (f32 on both sides).
const TOLERANCE: f32 = 1e-4;

/// The default checkpoint folder: `$XDG_CACHE_HOME/expertnet/demo-checkpoint`, or
/// `~/.cache/expertnet/demo-checkpoint`, or `expertnet-demo-checkpoint` in the working
/// directory when neither is set.
pub fn default_checkpoint_dir() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|path| path.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")));
    match cache {
        Some(cache) => cache.join("expertnet").join("demo-checkpoint"),
        None => PathBuf::from("expertnet-demo-checkpoint"),
    }
}

/// Counts of the demo's run.
#[derive(Debug, Default)]
pub struct DemoReport {
    /// Layer calls.
    pub calls: usize,
    pub failed_calls: usize,
    /// Expert tasks sent to another replica after a failure.
    pub replica_fallbacks: usize,
    /// Tokens moved to a lower-ranked expert.
    pub expert_fallbacks: usize,
    pub spot_checks: usize,
    pub mismatches: usize,
    /// Nodes banned for wrong results.
    pub dishonest_bans: usize,
    /// Largest per-row relative difference from the local layer, over tokens served by
    /// their own top k.
    pub max_relative_error: f32,
    /// Per layer call.
    pub latencies: Vec<Duration>,
    /// The generated text, decoded byte by byte.
    pub text: String,
    pub new_tokens: usize,
    pub generation_seconds: f64,
    /// Largest relative logit difference from the local reference over the generated
    /// positions.
    pub reference_error: f32,
    /// Tasks served by another replica or expert during generation.
    pub generation_fallbacks: usize,
    /// Failed requests by reason during generation, such as `unavailable 2`.
    pub generation_failures: String,
    /// Failed requests by reason over the whole run.
    pub failures: String,
}

/// Formats the router's failed requests by reason, or `none`.
fn failure_summary(router: &Router) -> String {
    let counts = router.stats().failure_counts();
    if counts.is_empty() {
        return "none".to_owned();
    }
    let parts: Vec<String> = counts
        .iter()
        .map(|(kind, n)| format!("{kind} {n}"))
        .collect();
    parts.join(", ")
}

/// The prompt of the generation part.
const PROMPT: &str = "Mixture of experts";

/// Tokens generated after the prompt.
const NEW_TOKENS: usize = 32;

/// Rounds of layer calls, each through every MoE layer, after the generation.
const ROUNDS: usize = 2;

/// Runs the demo and prints its progress to stderr.
///
/// # Errors
/// Any failure to prepare the checkpoint, start a node or reach the network, and a call
/// that no replica could serve.
pub async fn run(options: &DemoOptions) -> anyhow::Result<DemoReport> {
    let checkpoint = prepare_checkpoint(&options.checkpoint)?;
    let config = checkpoint.config().clone();
    let manifest = Manifest::load(&Manifest::path_in(&options.checkpoint))?;
    let layers = config.moe_layers();
    let experts = config.num_experts();

    eprintln!(
        "starting a bootstrap node and {NODES} nodes on 127.0.0.1, every expert on two of them"
    );
    let bootstrap = start_node(&options.checkpoint, "*:0", Vec::new()).await?;
    let address = bootstrap
        .bootstrap_addr()
        .ok_or_else(|| anyhow::anyhow!("the bootstrap node has no libp2p address"))?;
    eprintln!(
        "  bootstrap  {}  {}",
        short_peer_id(&bootstrap.key().peer_id()),
        bootstrap.grpc_addr()
    );
    let mut nodes: Vec<Option<RunningNode>> = Vec::new();
    for index in 0..NODES {
        let spec = crate::network::block_spec("*", index, NODES, experts as usize, 2);
        let node = start_node(&options.checkpoint, &spec, vec![address.clone()]).await?;
        eprintln!(
            "  node {index}     {}  {}  hosts {spec}",
            short_peer_id(&node.key().peer_id()),
            node.grpc_addr()
        );
        nodes.push(Some(node));
    }

    let mut router_config = RouterConfig::new(DiscoveryConfig::new(vec![address]));
    router_config.seed = Some(options.seed);
    // Every result is also computed by a second replica, so the node that starts lying
    // below is caught on its first wrong output.
    router_config.spot_check_rate = 1.0;
    router_config.deadline = Duration::from_secs(10);
    let router = Router::connect(router_config).await?;
    let model_id = manifest.model_id();
    wait_until_covered(router.discovery(), &model_id, &layers, experts).await?;
    let remote: Vec<RemoteMoeLayer> = layers
        .iter()
        .map(|&layer| RemoteMoeLayer::new(&router, &checkpoint, &manifest, layer))
        .collect::<Result<_, _>>()?;
    let local: Vec<LocalMoeLayer> = layers
        .iter()
        .map(|&layer| LocalMoeLayer::load(&checkpoint, layer))
        .collect::<Result<_, _>>()?;

    let mut report = DemoReport::default();

    // Text generation: the dense model here, every MoE layer through the router. Node 1
    // is killed halfway; the text must finish without a failed token and match the model
    // computed locally.
    let model = MoeModel::remote(&router, &checkpoint, &manifest)?;
    let reference = MoeModel::local(&checkpoint)?;
    let tokenizer = expertnet_model::tokenizer::TextTokenizer::load(&options.checkpoint)?;
    let prompt = tokenizer.encode(PROMPT)?;
    let settings = GenerateOptions {
        max_new_tokens: NEW_TOKENS,
        temperature: 0.0,
        seed: options.seed,
    };
    eprintln!("generating {NEW_TOKENS} tokens after the prompt {PROMPT:?}; node 1 dies halfway");
    let mut victim = nodes.get_mut(1).and_then(Option::take);
    let mut produced = 0;
    let generation = generate(&model, &prompt, &settings, |_| {
        produced += 1;
        eprint!(".");
        if produced == NEW_TOKENS / 2
            && let Some(node) = victim.take()
        {
            eprintln!(
                "\nkilling node 1 ({}) without warning; its replicas must be replaced",
                short_peer_id(&node.key().peer_id())
            );
            node.kill();
        }
    })
    .await?;
    eprintln!();
    let check = check_against_reference(&reference, &generation, TOLERANCE).await?;
    if !check.passed(TOLERANCE) {
        anyhow::bail!(
            "generated logits differ from the local reference by {:.3e} (tolerance {TOLERANCE:.0e}); greedy choices differ at {:?}",
            check.max_rel_error,
            check.choice_mismatches
        );
    }
    for trace in &generation.traces {
        report.generation_fallbacks += trace.replica_fallbacks + trace.expert_fallbacks;
        report.spot_checks += trace.spot_checks;
        report.mismatches += trace.spot_check_mismatches;
    }
    report.generation_failures = failure_summary(&router);
    report.text = tokenizer.decode(&generation.tokens);
    report.new_tokens = generation.tokens.len();
    report.generation_seconds = generation.elapsed.as_secs_f64();
    report.reference_error = check.max_rel_error;

    let mut rng = SplitMix64::new(options.seed);
    let hidden = config.hidden_size;
    for round in 0..ROUNDS {
        if round == 0
            && let Some(liar) = nodes.get(3).and_then(Option::as_ref)
        {
            eprintln!(
                "node 3 ({}) now returns wrong outputs under valid signatures; spot checks must catch it",
                short_peer_id(&liar.key().peer_id())
            );
            liar.set_faults(FaultConfig {
                wrong_output: true,
                ..FaultConfig::default()
            });
        }

        for (remote, local) in remote.iter().zip(&local) {
            let x = Tensor::from_vec(
                rng.normal_vec(options.tokens * hidden),
                (options.tokens, hidden),
                &Device::Cpu,
            )?;
            report.calls += 1;
            let started = Instant::now();
            let out = match remote.forward(&x).await {
                Ok(out) => out,
                Err(error) => {
                    report.failed_calls += 1;
                    anyhow::bail!("layer {} failed: {error}", remote.layer());
                }
            };
            report.latencies.push(started.elapsed());
            let trace = &out.trace;
            report.replica_fallbacks += trace.replica_fallbacks;
            report.expert_fallbacks += trace.expert_fallbacks;
            report.spot_checks += trace.spot_checks;
            report.mismatches += trace.spot_check_mismatches;
            for failure in &trace.failures {
                eprintln!(
                    "  layer {} expert {} on {}: {}",
                    remote.layer(),
                    failure.expert,
                    short_peer_id(&failure.peer),
                    failure.reason
                );
            }

            let expected = local.forward(&x)?.to_vec2::<f32>()?;
            let actual = out.output.to_vec2::<f32>()?;
            for ((token, got), want) in trace.tokens.iter().zip(&actual).zip(&expected) {
                if token.fell_back() {
                    continue;
                }
                let got = Tensor::from_slice(got, (1, hidden), &Device::Cpu)?;
                let want = Tensor::from_slice(want, (1, hidden), &Device::Cpu)?;
                let error = max_row_relative_error(&got, &want)?;
                if error.is_nan() || error > TOLERANCE {
                    anyhow::bail!(
                        "layer {}: relative error {error:.3e} against the local layer, above {TOLERANCE:.0e}",
                        remote.layer()
                    );
                }
                report.max_relative_error = report.max_relative_error.max(error);
            }
        }
        eprintln!(
            "  round {}: {} layers of {} tokens served, verified and checked against the local layers",
            round + 1,
            layers.len(),
            options.tokens
        );
    }
    report.dishonest_bans = router.stats().dishonest_bans() as usize;
    report.failures = failure_summary(&router);

    for node in nodes.into_iter().flatten() {
        node.shutdown().await?;
    }
    bootstrap.shutdown().await?;
    Ok(report)
}

async fn start_node(
    checkpoint: &Path,
    spec: &str,
    bootstrap: Vec<libp2p::Multiaddr>,
) -> anyhow::Result<RunningNode> {
    let mut config = NodeConfig::new(checkpoint, spec.parse::<ExpertSpec>()?);
    config.threads = Some(1);
    config.p2p = Some(P2pConfig {
        bootstrap,
        ..P2pConfig::default()
    });
    Ok(Node::start(config, NodeKey::generate()?).await?)
}

fn prepare_checkpoint(dir: &Path) -> anyhow::Result<Checkpoint> {
    if dir.join(expertnet_model::checkpoint::CONFIG_FILE).exists() {
        let checkpoint = Checkpoint::open(dir)?;
        Manifest::load(&Manifest::path_in(dir))?.check_config(&checkpoint)?;
        eprintln!("using the checkpoint in {}", dir.display());
        return Ok(checkpoint);
    }
    eprintln!("making a small checkpoint in {}", dir.display());
    Ok(generate_checkpoint(dir, &GeneratorOptions::default())?)
}

/// Waits until every expert of every MoE layer has at least two replicas in the DHT.
async fn wait_until_covered(
    discovery: &Discovery,
    model_id: &str,
    layers: &[u32],
    experts: u32,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let mut covered = true;
        for &layer in layers {
            let replicas = discovery.resolve_fresh(model_id, layer).await?;
            covered &= (0..experts).all(|expert| replicas.replicas(expert).len() >= 2);
        }
        if covered {
            eprintln!(
                "the client found two replicas of every expert in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(30) {
            anyhow::bail!("not every expert had two replicas after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
