//! `expertnet-sim demo`: a small network on this machine, end to end.
//!
//! It makes (or reuses) a small checkpoint and starts five nodes in this process on
//! 127.0.0.1: a bootstrap node hosting expert 0 of every layer, and four nodes that host
//! every expert twice over. A client finds the experts through the DHT, sends hidden
//! states to every expert of every layer, verifies each signed result and compares it with
//! local computation. Halfway through, one node is killed; the client drops its replicas
//! and uses the others.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use expertnet_model::codec::{to_candle, wire_from_f32, wire_to_f32};
use expertnet_model::rng::SplitMix64;
use expertnet_model::{
    Checkpoint, GeneratorOptions, Manifest, generate_checkpoint, max_row_relative_error,
};
use expertnet_node::{ExpertSpec, Node, NodeConfig, NodeKey, P2pConfig, RunningNode};
use expertnet_proto::{DType, ExpertInput, ForwardCall, RequestId};
use expertnet_router::{Discovery, DiscoveryConfig, NodeClient, short_peer_id};

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
    pub calls: usize,
    pub failed_calls: usize,
    pub retried_calls: usize,
    pub max_relative_error: f32,
    pub latencies: Vec<Duration>,
}

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
        let spec = replica_spec(index, experts);
        let node = start_node(&options.checkpoint, &spec, vec![address.clone()]).await?;
        eprintln!(
            "  node {index}     {}  {}  hosts {spec}",
            short_peer_id(&node.key().peer_id()),
            node.grpc_addr()
        );
        nodes.push(Some(node));
    }

    let discovery = Discovery::start(DiscoveryConfig::new(vec![address]))?;
    discovery.wait_bootstrapped(Duration::from_secs(10)).await?;
    wait_until_covered(&discovery, &manifest.model_id(), &layers, experts).await?;

    let mut report = DemoReport::default();
    let mut clients: BTreeMap<String, NodeClient> = BTreeMap::new();
    let mut rng = SplitMix64::new(options.seed);
    let hidden = config.hidden_size;
    let kill_after = layers.len() / 2;
    let model_id = manifest.model_id();

    for (position, &layer) in layers.iter().enumerate() {
        if position == kill_after
            && let Some(victim) = nodes.get_mut(1).and_then(Option::take)
        {
            eprintln!(
                "killing node 1 ({}) without warning; its replicas must be replaced",
                short_peer_id(&victim.key().peer_id())
            );
            victim.kill();
        }

        let replicas = discovery.resolve(&model_id, layer).await?;
        for expert in 0..experts {
            let values = rng.normal_vec(options.tokens * hidden);
            let input = wire_from_f32(&values, &[options.tokens, hidden], DType::F32)?;
            let call = ForwardCall {
                request_id: random_request_id(&mut rng),
                model_id: model_id.clone(),
                layer,
                inputs: vec![ExpertInput {
                    expert,
                    hidden: input.clone(),
                }],
            };

            report.calls += 1;
            let mut served = None;
            // Rotating the replica order by expert spreads the calls over both replicas.
            let mut order = replicas.replicas(expert).to_vec();
            if !order.is_empty() {
                let shift = expert as usize % order.len();
                order.rotate_left(shift);
            }
            for (attempt, replica) in order.iter().enumerate() {
                let endpoint = replica.endpoints[0].clone();
                let started = Instant::now();
                let result = match clients.get_mut(&endpoint) {
                    Some(client) => {
                        client
                            .forward(&call, Some(Duration::from_secs(5)), |l, e| {
                                manifest.expert_digest(l, e)
                            })
                            .await
                    }
                    None => match NodeClient::connect(
                        &endpoint,
                        Some(replica.peer_id),
                        Duration::from_secs(2),
                    )
                    .await
                    {
                        Ok(mut client) => {
                            let result = client
                                .forward(&call, Some(Duration::from_secs(5)), |l, e| {
                                    manifest.expert_digest(l, e)
                                })
                                .await;
                            clients.insert(endpoint.clone(), client);
                            result
                        }
                        Err(error) => Err(error),
                    },
                };
                match result {
                    Ok(outputs) => {
                        report.latencies.push(started.elapsed());
                        if attempt > 0 {
                            report.retried_calls += 1;
                        }
                        served = Some((outputs, replica.peer_id));
                        break;
                    }
                    Err(error) => {
                        eprintln!(
                            "  layer {layer} expert {expert}: {} failed ({error}); trying another replica",
                            short_peer_id(&replica.peer_id)
                        );
                        discovery.report_failure(replica.peer_id);
                        clients.remove(&endpoint);
                    }
                }
            }

            let Some((outputs, peer)) = served else {
                report.failed_calls += 1;
                anyhow::bail!("every replica of layer {layer} expert {expert} failed");
            };
            let weights = checkpoint.load_expert(layer, expert, DType::F32, &Device::Cpu)?;
            let local =
                weights.forward(&to_candle(&input, candle_core::DType::F32, &Device::Cpu)?)?;
            let output = &outputs[0].output;
            let remote = Tensor::from_vec(wire_to_f32(output), output.shape(), &Device::Cpu)?;
            let error = max_row_relative_error(&remote, &local)?;
            if error.is_nan() || error > TOLERANCE {
                anyhow::bail!(
                    "layer {layer} expert {expert} from {}: relative error {error:.3e} against local computation, above {TOLERANCE:.0e}",
                    short_peer_id(&peer)
                );
            }
            report.max_relative_error = report.max_relative_error.max(error);
        }
        eprintln!(
            "  layer {layer}: {experts} experts served, verified and checked against local computation"
        );
    }

    for node in nodes.into_iter().flatten() {
        node.shutdown().await?;
    }
    bootstrap.shutdown().await?;
    Ok(report)
}

/// The experts of node `index` of four: two consecutive pairs of experts, so that every
/// expert is hosted by two nodes.
fn replica_spec(index: usize, experts: u32) -> String {
    let experts = experts as usize;
    let group = experts.div_ceil(NODES).max(1);
    let first = (index * group) % experts;
    let second = ((index + 1) * group) % experts;
    let range = |start: usize| format!("*:{start}-{}", (start + group - 1).min(experts - 1));
    format!("{},{}", range(first), range(second))
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

fn random_request_id(rng: &mut SplitMix64) -> RequestId {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&rng.next_u64().to_le_bytes());
    bytes[8..].copy_from_slice(&rng.next_u64().to_le_bytes());
    RequestId::from_bytes(bytes)
}
