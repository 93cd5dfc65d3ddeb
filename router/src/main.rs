//! `expertnet`: query and call the expertnet network from the command line.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use candle_core::{Device, Tensor};
use clap::{Parser, Subcommand};
use expertnet_model::codec::{to_candle, wire_from_f32, wire_to_f32};
use expertnet_model::rng::SplitMix64;
use expertnet_model::tokenizer::TextTokenizer;
use expertnet_model::{Checkpoint, Manifest, ModelError, max_row_relative_error};
use expertnet_proto::{DType, ExpertInput, ForwardCall, LayerExperts, RequestId};
use expertnet_router::generate::check_against_reference;
use expertnet_router::{
    Discovery, DiscoveryConfig, GenerateOptions, LocalMoeLayer, MoeModel, NodeClient,
    RemoteMoeLayer, Router, RouterConfig, short_peer_id,
};

/// Prints a line to stdout. When stdout is closed early, as in `... | head`, the process
/// exits quietly instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(error) = writeln!(std::io::stdout().lock(), $($arg)*) {
            if error.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            eprintln!("error: cannot write to stdout: {error}");
            std::process::exit(1);
        }
    }};
}

#[derive(Debug, Parser)]
#[command(name = "expertnet", version, about = "Query and call expertnet nodes")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the experts the network serves: per expert its replicas, node ids, endpoints,
    /// load and record age.
    Experts {
        /// Peer to join the network through, repeatable:
        /// /ip4/HOST/tcp/PORT/p2p/PEER_ID (`expertnet-node run` logs its own).
        #[arg(long, required = true, value_parser = parse_bootstrap)]
        bootstrap: Vec<libp2p::Multiaddr>,
        /// Only this model.
        #[arg(long)]
        model: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Seconds to wait for the bootstrap peers.
        #[arg(long, default_value_t = 10)]
        timeout_secs: u64,
    },
    /// Print a node's identity, hosted experts and limits.
    Info {
        /// gRPC endpoint of the node, such as http://127.0.0.1:50051.
        #[arg(long)]
        node: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Send random hidden states to one expert of a node, verify the signed results, and
    /// compare them with local computation when the checkpoint contains that expert.
    Call {
        #[arg(long)]
        node: String,
        #[arg(long)]
        layer: u32,
        #[arg(long)]
        expert: u32,
        /// Token rows per request.
        #[arg(long, default_value_t = 1)]
        tokens: usize,
        /// Requests to send, one after another.
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        /// Dtype of the hidden states sent: f32, bf16 or f16.
        #[arg(long, default_value = "f32")]
        dtype: DType,
        /// Checkpoint folder: its manifest checks the weight digest of each receipt, and its
        /// weights (when present) give the local reference.
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// Seed of the random hidden states.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Milliseconds each request may take.
        #[arg(long, default_value_t = 10_000)]
        deadline_ms: u64,
        /// Largest accepted relative difference from local computation, per row
        /// (max |remote - local| / max |local|); the command fails above it. The default
        /// suits f32; bf16 requests need about 1e-2, f16 about 2e-3.
        #[arg(long, default_value_t = 1e-4)]
        tolerance: f32,
    },
    /// Send random hidden states through one MoE layer computed by the network, compute the
    /// same layer locally, and report the difference, fallbacks, failed tokens and latency.
    Forward(ForwardArgs),
    /// Generate text: the dense model runs here, every MoE layer on the network. Tokens
    /// stream as they are produced, then a summary follows.
    Generate(GenerateArgs),
}

#[derive(Debug, clap::Args)]
struct GenerateArgs {
    /// Checkpoint folder with config.json, the manifest and the dense weights (embeddings,
    /// attention, norms, gates, LM head); expert weights are needed only for --verify-local.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Peer to join the network through, repeatable: /ip4/HOST/tcp/PORT/p2p/PEER_ID.
    #[arg(long, required = true, value_parser = parse_bootstrap)]
    bootstrap: Vec<libp2p::Multiaddr>,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// 0 picks the most likely token at every step.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Seed of sampling and of the router's choices.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also run the model with local experts on the same tokens and fail unless the logits
    /// agree within --tolerance at every position.
    #[arg(long)]
    verify_local: bool,
    /// Largest relative logit difference from the local reference, per position
    /// (max |network - local| / max |local|).
    #[arg(long, default_value_t = 1e-4)]
    tolerance: f32,
    /// Milliseconds one layer call may take, lookups, retries and hedges included.
    #[arg(long, default_value_t = 5_000)]
    deadline: u64,
    /// Share of expert results also computed by a second replica and compared, 0 to 1.
    #[arg(long, default_value_t = 0.01)]
    spot_check_rate: f64,
    /// Seconds to wait for the bootstrap peers.
    #[arg(long, default_value_t = 10)]
    timeout_secs: u64,
    /// Print the summary as JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct ForwardArgs {
    /// Checkpoint folder with config.json, the manifest and the gate weights; with the
    /// expert weights too, the layer is also computed locally for comparison.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Peer to join the network through, repeatable: /ip4/HOST/tcp/PORT/p2p/PEER_ID.
    #[arg(long, required = true, value_parser = parse_bootstrap)]
    bootstrap: Vec<libp2p::Multiaddr>,
    #[arg(long)]
    layer: u32,
    /// Token rows to send in all.
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// Token rows per layer call; latency percentiles are over calls.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Seed of the random hidden states and of the router's choices.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Milliseconds one layer call may take, lookups, retries and hedges included.
    #[arg(long, default_value_t = 5_000)]
    deadline: u64,
    /// Largest accepted relative difference from the local layer, per row
    /// (max |remote - local| / max |local|); the command fails above it.
    #[arg(long, default_value_t = 1e-4)]
    tolerance: f32,
    /// Experts per token; the checkpoint's num_experts_per_tok by default.
    #[arg(long)]
    top_k: Option<usize>,
    /// Minimum number of experts that must serve each token.
    #[arg(long, default_value_t = 1)]
    k_min: usize,
    /// Share of expert results also computed by a second replica and compared, 0 to 1.
    #[arg(long, default_value_t = 0.01)]
    spot_check_rate: f64,
    /// File to append the evidence of spot-check mismatches to, as JSON lines.
    #[arg(long)]
    evidence: Option<PathBuf>,
    /// Do not send slow requests to a second replica.
    #[arg(long)]
    no_hedging: bool,
    /// Seconds to wait before the first call until every expert of the layer has a
    /// replica, for a client that starts together with the nodes. 0 does not wait.
    #[arg(long, default_value_t = 0)]
    wait_secs: u64,
    /// Seconds to wait for the bootstrap peers.
    #[arg(long, default_value_t = 10)]
    timeout_secs: u64,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A closed stderr (a log piped into `head`) must not stop the process: the
        // subscriber's own error report would panic writing to the same stderr.
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Experts {
                bootstrap,
                model,
                json,
                timeout_secs,
            } => {
                experts(
                    bootstrap,
                    model.as_deref(),
                    json,
                    Duration::from_secs(timeout_secs),
                )
                .await
            }
            Command::Info { node, json } => info(&node, json).await,
            Command::Call {
                node,
                layer,
                expert,
                tokens,
                repeat,
                dtype,
                checkpoint,
                seed,
                deadline_ms,
                tolerance,
            } => {
                let options = CallOptions {
                    tolerance,
                    layer,
                    expert,
                    tokens,
                    repeat,
                    dtype,
                    checkpoint,
                    seed,
                    deadline: Duration::from_millis(deadline_ms),
                };
                call(&node, &options).await
            }
            Command::Forward(args) => forward(&args).await,
            Command::Generate(args) => generate_text(&args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Parses a bootstrap multiaddr, with the expected form in the error.
fn parse_bootstrap(text: &str) -> Result<libp2p::Multiaddr, String> {
    const FORM: &str = "write /ip4/HOST/tcp/PORT/p2p/PEER_ID (a node logs its own as \"bootstrap address of this node\")";
    text.parse().map_err(|_| {
        // A well-formed address with a bad peer id deserves its own message.
        match text.split_once("/p2p/") {
            Some((address, peer)) if address.parse::<libp2p::Multiaddr>().is_ok() => format!(
                "{peer:?} in {text:?} is not a valid peer id; copy it from the node's log or from `expertnet-node id --key FILE`"
            ),
            _ => format!("{text:?} is not a multiaddr; {FORM}"),
        }
    })
}

async fn experts(
    bootstrap: Vec<libp2p::Multiaddr>,
    model: Option<&str>,
    json: bool,
    timeout: Duration,
) -> anyhow::Result<()> {
    let discovery = Discovery::start(DiscoveryConfig::new(bootstrap))?;
    discovery.wait_bootstrapped(timeout).await?;
    let mut records = discovery.nodes().await?;
    let nodes_found = records.len();
    let mut served: Vec<String> = records.iter().map(|r| r.model_id.clone()).collect();
    served.sort();
    served.dedup();

    // A model is named by its full id or a prefix of it that only one served model has.
    if let Some(model) = model {
        let matching: Vec<&String> = served.iter().filter(|id| id.starts_with(model)).collect();
        match matching.as_slice() {
            [id] => {
                let id = (*id).clone();
                records.retain(|record| record.model_id == id);
            }
            [] => {
                records.clear();
            }
            several => bail!(
                "--model {model} matches {} models ({}); give more of the id",
                several.len(),
                several
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
    let now_ms = expertnet_proto::p2p::unix_millis();

    // model id -> layer -> expert -> replicas
    let mut table: BTreeMap<&str, BTreeMap<u32, BTreeMap<u32, Vec<serde_json::Value>>>> =
        BTreeMap::new();
    for record in &records {
        let replica = serde_json::json!({
            "node_id": record.peer_id.to_base58(),
            "short_id": short_peer_id(&record.peer_id),
            "endpoints": record.grpc_endpoints,
            "load_tokens": record.load_tokens,
            "capacity_tokens": record.capacity_tokens,
            "record_age_ms": now_ms.saturating_sub(record.timestamp_ms),
            "version": record.version,
        });
        for set in &record.layers {
            for expert in set.experts() {
                table
                    .entry(record.model_id.as_str())
                    .or_default()
                    .entry(set.layer)
                    .or_default()
                    .entry(expert)
                    .or_default()
                    .push(replica.clone());
            }
        }
    }

    if json {
        let models: Vec<serde_json::Value> = table
            .iter()
            .map(|(model_id, layers)| {
                let layers: Vec<serde_json::Value> = layers
                    .iter()
                    .map(|(layer, experts)| {
                        let experts: Vec<serde_json::Value> = experts
                            .iter()
                            .map(|(expert, replicas)| serde_json::json!({"expert": expert, "replicas": replicas}))
                            .collect();
                        serde_json::json!({"layer": layer, "experts": experts})
                    })
                    .collect();
                serde_json::json!({"model_id": model_id, "layers": layers})
            })
            .collect();
        let value = serde_json::json!({"nodes": nodes_found, "models": models});
        outln!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }

    if table.is_empty() {
        let listed = if served.is_empty() {
            "none".to_owned()
        } else {
            served.join(", ")
        };
        match model {
            Some(model) => outln!(
                "no node serves model {model}; {} found, serving: {listed}",
                plural(nodes_found, "node")
            ),
            None => outln!("no experts found; {} found", plural(nodes_found, "node")),
        }
        return Ok(());
    }
    for (model_id, layers) in &table {
        outln!("model {model_id}");
        outln!(
            "  {:>5} {:>7}  replicas (node, endpoint, load/capacity tokens, record age)",
            "layer",
            "experts"
        );
        for (layer, experts) in layers {
            // Consecutive experts with the same replicas share a line.
            let mut rows: Vec<(u32, u32, String)> = Vec::new();
            for (&expert, replicas) in experts {
                let described = describe_replicas(replicas);
                match rows.last_mut() {
                    Some((_, last, text)) if *last + 1 == expert && *text == described => {
                        *last = expert
                    }
                    _ => rows.push((expert, expert, described)),
                }
            }
            for (first, last, text) in rows {
                let experts = if first == last {
                    first.to_string()
                } else {
                    format!("{first}-{last}")
                };
                outln!("  {layer:>5} {experts:>7}  {text}");
            }
        }
    }
    outln!("{} found", plural(nodes_found, "node"));
    Ok(())
}

async fn info(endpoint: &str, json: bool) -> anyhow::Result<()> {
    let node = NodeClient::connect(endpoint, None, CONNECT_TIMEOUT).await?;
    let info = node.info();
    let models: Vec<serde_json::Value> = info
        .models
        .iter()
        .map(|model| {
            let layers: Vec<String> = model
                .layers
                .iter()
                .map(|layer| LayerExperts::from_wire(layer).to_string())
                .collect();
            serde_json::json!({
                "model_id": model.model_id,
                "model_type": model.model_type,
                "hidden_size": model.hidden_size,
                "experts": layers,
            })
        })
        .collect();
    let limits = info.limits.unwrap_or_default();

    if json {
        let value = serde_json::json!({
            "node_id": info.node_id,
            "version": info.version,
            "models": models,
            "limits": {
                "max_message_bytes": limits.max_message_bytes,
                "max_tokens_per_request": limits.max_tokens_per_request,
                "max_queued_tokens": limits.max_queued_tokens,
                "max_batch_tokens": limits.max_batch_tokens,
            },
        });
        outln!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }

    outln!(
        "node       {} ({})",
        info.node_id,
        short_peer_id(&node.peer_id())
    );
    outln!("version    {}", info.version);
    for model in &models {
        outln!(
            "model      {}",
            model["model_id"].as_str().unwrap_or_default()
        );
        outln!(
            "  type     {}",
            model["model_type"].as_str().unwrap_or_default()
        );
        outln!("  hidden   {}", model["hidden_size"]);
        let experts: Vec<&str> = model["experts"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        outln!("  experts  {} (layer:experts)", experts.join(" "));
    }
    outln!(
        "limits     {} bytes per message, {} tokens per request, {} queued tokens, {} tokens per batch",
        limits.max_message_bytes,
        limits.max_tokens_per_request,
        limits.max_queued_tokens,
        limits.max_batch_tokens
    );
    Ok(())
}

fn plural(count: usize, noun: &str) -> String {
    if count == 1 {
        format!("1 {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

fn describe_replicas(replicas: &[serde_json::Value]) -> String {
    let described: Vec<String> = replicas
        .iter()
        .map(|r| {
            format!(
                "{} {} {}/{} {:.0}s",
                r["short_id"].as_str().unwrap_or_default(),
                r["endpoints"][0].as_str().unwrap_or("-"),
                r["load_tokens"],
                r["capacity_tokens"],
                r["record_age_ms"].as_u64().unwrap_or(0) as f64 / 1e3
            )
        })
        .collect();
    described.join("; ")
}

struct CallOptions {
    tolerance: f32,
    layer: u32,
    expert: u32,
    tokens: usize,
    repeat: usize,
    dtype: DType,
    checkpoint: Option<PathBuf>,
    seed: u64,
    deadline: Duration,
}

async fn call(endpoint: &str, options: &CallOptions) -> anyhow::Result<()> {
    if options.tokens == 0 {
        bail!("--tokens must be at least 1");
    }
    if options.repeat == 0 {
        bail!("--repeat must be at least 1");
    }
    if options.deadline.is_zero() {
        bail!("--deadline-ms must be at least 1");
    }
    if options.tolerance.is_nan() || options.tolerance < 0.0 {
        bail!(
            "--tolerance must be a number of 0 or more, got {}",
            options.tolerance
        );
    }
    let mut node = NodeClient::connect(endpoint, None, CONNECT_TIMEOUT).await?;
    let model = node
        .info()
        .models
        .first()
        .cloned()
        .context("the node reports no hosted model")?;
    let hidden = model.hidden_size as usize;

    let reference = match &options.checkpoint {
        Some(dir) => Some(load_reference(
            dir,
            &model.model_id,
            options.layer,
            options.expert,
        )?),
        None => None,
    };
    let expected_digest = reference.as_ref().map(|r| r.digest);

    let mut rng = SplitMix64::new(options.seed);
    let mut latencies = Vec::with_capacity(options.repeat);
    let mut worst_error: Option<f32> = None;
    let mut failure = None;
    for _ in 0..options.repeat {
        let values = rng.normal_vec(options.tokens * hidden);
        let input = wire_from_f32(&values, &[options.tokens, hidden], options.dtype)?;
        let call = ForwardCall {
            request_id: random_request_id()?,
            model_id: model.model_id.clone(),
            layer: options.layer,
            inputs: vec![ExpertInput {
                expert: options.expert,
                hidden: input.clone(),
            }],
        };

        let started = Instant::now();
        let outputs = match node
            .forward(&call, Some(options.deadline), |_, _| expected_digest)
            .await
        {
            Ok(outputs) => outputs,
            Err(error) => {
                failure = Some(error);
                break;
            }
        };
        latencies.push(started.elapsed());

        if let Some(weights) = reference.as_ref().and_then(|r| r.expert.as_ref()) {
            let x = to_candle(&input, candle_core::DType::F32, &Device::Cpu)?;
            let local = weights.forward(&x)?;
            let output = &outputs[0].output;
            let remote = Tensor::from_vec(wire_to_f32(output), output.shape(), &Device::Cpu)?;
            // NaN compares false with everything, so keep it explicitly.
            let error = max_row_relative_error(&remote, &local)?;
            worst_error = Some(match worst_error {
                Some(worst) if worst.is_nan() || error.is_nan() => f32::NAN,
                Some(worst) => worst.max(error),
                None => error,
            });
        }
    }

    if !latencies.is_empty() {
        latencies.sort();
        let percentile = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
        outln!(
            "{} of {} requests of {} tokens to layer {} expert {} on {}: all receipts verified",
            latencies.len(),
            options.repeat,
            options.tokens,
            options.layer,
            options.expert,
            short_peer_id(&node.peer_id())
        );
        outln!(
            "latency    p50 {:.3} ms, p99 {:.3} ms",
            percentile(0.5).as_secs_f64() * 1e3,
            percentile(0.99).as_secs_f64() * 1e3
        );
    }
    if let Some(error) = failure {
        return Err(anyhow::Error::new(error).context(format!(
            "request {} of {} failed",
            latencies.len() + 1,
            options.repeat
        )));
    }

    match worst_error {
        Some(error) => {
            outln!("max relative error against local computation: {error:.3e}");
            if error.is_nan() || error > options.tolerance {
                bail!(
                    "the node's output differs from local computation by {error:.3e}, above --tolerance {:.1e}",
                    options.tolerance
                );
            }
        }
        None if options.checkpoint.is_some() => {
            outln!("the checkpoint folder lacks this expert's weights; only the digest was checked")
        }
        None => outln!(
            "pass --checkpoint DIR to check weight digests and compare with local computation"
        ),
    }
    Ok(())
}

struct Reference {
    digest: expertnet_proto::Digest,
    expert: Option<expertnet_model::Expert>,
}

fn load_reference(
    dir: &std::path::Path,
    model_id: &str,
    layer: u32,
    expert: u32,
) -> anyhow::Result<Reference> {
    let checkpoint = Checkpoint::open(dir)?;
    let manifest = Manifest::load(&Manifest::path_in(dir))?;
    if manifest.model_id() != model_id {
        bail!(
            "the checkpoint in {} is model {}, but the node serves {model_id}",
            dir.display(),
            manifest.model_id()
        );
    }
    let digest = manifest
        .expert_digest(layer, expert)
        .with_context(|| format!("layer {layer} expert {expert} is not in the manifest"))?;
    manifest.check_config(&checkpoint)?;
    // A node's folder may hold only some shards; without the weights, only the digest is
    // checked. Weights that are present must match the manifest, or the comparison would
    // judge the node against a damaged reference.
    let expert = match manifest
        .verify_expert(&checkpoint, layer, expert)
        .and_then(|_| checkpoint.load_expert(layer, expert, DType::F32, &Device::Cpu))
    {
        Ok(expert) => Some(expert),
        Err(ModelError::Io { error: source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            None
        }
        Err(ModelError::MissingTensor { .. }) => None,
        Err(error) => return Err(error.into()),
    };
    Ok(Reference { digest, expert })
}

fn random_request_id() -> anyhow::Result<RequestId> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("random source failed: {e}"))?;
    Ok(RequestId::from_bytes(bytes))
}

/// The measurements of `expertnet forward`.
#[derive(Debug, Default, serde::Serialize)]
struct ForwardReport {
    model_id: String,
    layer: u32,
    tokens: usize,
    calls: usize,
    /// Largest per-row relative difference from the local layer over tokens served by
    /// their own top k; `None` without local expert weights.
    max_rel_error: Option<f32>,
    /// Tokens of layer calls that failed.
    failed_tokens: usize,
    /// Replica and expert fallbacks together.
    fallbacks: usize,
    replica_fallbacks: usize,
    expert_fallbacks: usize,
    /// Tokens served by other experts than the gate chose, left out of `max_rel_error`.
    fallback_tokens: usize,
    hedges: usize,
    spot_checks: usize,
    spot_check_mismatches: usize,
    p50_ms: f64,
    p99_ms: f64,
    failures: BTreeMap<String, u64>,
    errors: Vec<String>,
}

async fn forward(args: &ForwardArgs) -> anyhow::Result<()> {
    if args.tokens == 0 {
        bail!("--tokens is 0; it must be at least 1");
    }
    if args.batch == 0 {
        bail!("--batch is 0; it must be at least 1");
    }
    if !(0.0..=1.0).contains(&args.spot_check_rate) {
        bail!(
            "--spot-check-rate is {}; give a share from 0 to 1, such as 0.01",
            args.spot_check_rate
        );
    }
    if args.deadline == 0 {
        bail!("--deadline must be at least 1 millisecond");
    }
    if args.tolerance.is_nan() || args.tolerance < 0.0 {
        bail!(
            "--tolerance must be a number of 0 or more, got {}",
            args.tolerance
        );
    }
    let (checkpoint, manifest) = open_with_manifest(&args.checkpoint)?;

    let mut config = RouterConfig::new(DiscoveryConfig::new(args.bootstrap.clone()));
    config.top_k = args.top_k;
    config.k_min = args.k_min;
    config.deadline = Duration::from_millis(args.deadline);
    config.hedging = !args.no_hedging;
    config.spot_check_rate = args.spot_check_rate;
    config.evidence_file.clone_from(&args.evidence);
    config.bootstrap_timeout = Duration::from_secs(args.timeout_secs);
    config.seed = Some(args.seed);
    let router = Router::connect(config).await?;
    let remote = RemoteMoeLayer::new(&router, &checkpoint, &manifest, args.layer)?;
    if args.wait_secs > 0 {
        wait_for_layer(
            &router,
            &remote,
            checkpoint.config().num_experts(),
            args.wait_secs,
        )
        .await?;
    }

    // The local reference needs every expert's weights; a client folder may hold only the
    // gate.
    let local = match LocalMoeLayer::load(&checkpoint, args.layer) {
        Ok(local) => Some(local),
        Err(error) => {
            eprintln!("note: no local reference, so no error is computed: {error}");
            None
        }
    };
    if let Some(local) = &local
        && let Some(k) = args.top_k.filter(|&k| k != local.top_k())
    {
        bail!(
            "--top-k {k} differs from the checkpoint's {}, so the local layer cannot be compared; leave --top-k out",
            local.top_k()
        );
    }

    let hidden = checkpoint.config().hidden_size;
    let mut rng = SplitMix64::new(args.seed);
    let mut report = ForwardReport {
        model_id: manifest.model_id(),
        layer: args.layer,
        tokens: args.tokens,
        max_rel_error: local.as_ref().map(|_| 0.0),
        ..ForwardReport::default()
    };
    let mut latencies = Vec::new();
    let mut sent = 0;
    while sent < args.tokens {
        let batch = args.batch.min(args.tokens - sent);
        sent += batch;
        report.calls += 1;
        let x = Tensor::from_vec(
            rng.normal_vec(batch * hidden),
            (batch, hidden),
            &Device::Cpu,
        )?;
        let started = Instant::now();
        let result = remote.forward(&x).await;
        let elapsed = started.elapsed();
        let out = match result {
            Ok(out) => out,
            Err(error) => {
                report.failed_tokens += batch;
                report.errors.push(error.to_string());
                continue;
            }
        };
        latencies.push(elapsed.as_secs_f64() * 1e3);
        let trace = &out.trace;
        report.replica_fallbacks += trace.replica_fallbacks;
        report.expert_fallbacks += trace.expert_fallbacks;
        report.hedges += trace.hedges;
        report.spot_checks += trace.spot_checks;
        report.spot_check_mismatches += trace.spot_check_mismatches;
        if let Some(local) = &local {
            let expected = local.forward(&x)?.to_vec2::<f32>()?;
            let actual = out.output.to_vec2::<f32>()?;
            for ((token, want), got) in trace.tokens.iter().zip(&expected).zip(&actual) {
                if token.fell_back() {
                    report.fallback_tokens += 1;
                    continue;
                }
                let error = row_relative_error(got, want);
                let worst = report.max_rel_error.get_or_insert(0.0);
                *worst = if error.is_nan() {
                    f32::NAN
                } else {
                    worst.max(error)
                };
            }
        }
    }
    report.fallbacks = report.replica_fallbacks + report.expert_fallbacks;
    report.p50_ms = percentile(&mut latencies, 0.50);
    report.p99_ms = percentile(&mut latencies, 0.99);
    report.failures = router
        .stats()
        .failure_counts()
        .into_iter()
        .map(|(kind, count)| (kind.to_owned(), count))
        .collect();

    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_forward_report(&report, remote.top_k());
    }
    if report.failed_tokens > 0 {
        bail!(
            "{} of {} tokens failed; first error: {}",
            report.failed_tokens,
            report.tokens,
            report.errors.first().map_or("", String::as_str)
        );
    }
    if let Some(error) = report
        .max_rel_error
        .filter(|e| e.is_nan() || *e > args.tolerance)
    {
        bail!(
            "the network's output differs from the local layer by {error:.3e}, above --tolerance {:.1e}",
            args.tolerance
        );
    }
    Ok(())
}

fn print_forward_report(report: &ForwardReport, top_k: usize) {
    outln!(
        "layer {} of model {}: {} tokens in {} calls, top-{top_k}",
        report.layer,
        report.model_id,
        report.tokens,
        report.calls
    );
    match report.max_rel_error {
        Some(error) => outln!(
            "max relative error vs local layer: {error:.2e} over {} tokens served by their own top-{top_k}",
            report.tokens - report.failed_tokens - report.fallback_tokens
        ),
        None => outln!("max relative error vs local layer: not computed (no expert weights here)"),
    }
    outln!(
        "failed tokens: {}; fallbacks: {} to another replica, {} tokens to another expert; hedges: {}",
        report.failed_tokens,
        report.replica_fallbacks,
        report.expert_fallbacks,
        report.hedges
    );
    outln!(
        "spot checks: {}, mismatches: {}",
        report.spot_checks,
        report.spot_check_mismatches
    );
    outln!(
        "latency per layer call: p50 {:.2} ms, p99 {:.2} ms",
        report.p50_ms,
        report.p99_ms
    );
    if !report.failures.is_empty() {
        let parts: Vec<String> = report
            .failures
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        outln!("failed requests by reason: {}", parts.join(", "));
    }
    for error in &report.errors {
        outln!("error: {error}");
    }
}

/// Computes `max |got - want| / max |want|` over one row: absolute when `want` is zero,
/// NaN when either contains a non-finite value.
fn row_relative_error(got: &[f32], want: &[f32]) -> f32 {
    let mut difference = 0f32;
    let mut scale = 0f32;
    for (&g, &w) in got.iter().zip(want) {
        if !g.is_finite() || !w.is_finite() {
            return f32::NAN;
        }
        difference = difference.max((g - w).abs());
        scale = scale.max(w.abs());
    }
    if scale > 0.0 {
        difference / scale
    } else {
        difference
    }
}

/// Returns the `q` quantile of `values` by nearest rank, or 0 when empty.
fn percentile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

/// Replaces control characters other than newline and tab with U+FFFD, so that generated
/// text cannot move the terminal's cursor or change its state.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                '\u{fffd}'
            } else {
                c
            }
        })
        .collect()
}

async fn generate_text(args: &GenerateArgs) -> anyhow::Result<()> {
    if args.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    if !(0.0..=1.0).contains(&args.spot_check_rate) {
        bail!(
            "--spot-check-rate is {}; give a share from 0 to 1, such as 0.01",
            args.spot_check_rate
        );
    }
    if !(args.temperature >= 0.0 && args.temperature.is_finite()) {
        bail!("--temperature must be 0 or more, got {}", args.temperature);
    }
    if args.deadline == 0 {
        bail!("--deadline must be at least 1 millisecond");
    }
    let (checkpoint, manifest) = open_with_manifest(&args.checkpoint)?;
    let tokenizer = TextTokenizer::load(&args.checkpoint)?;
    let prompt = tokenizer.encode(&args.prompt)?;
    if prompt.is_empty() {
        bail!(
            "--prompt {:?} encodes to no tokens; give some text",
            args.prompt
        );
    }

    // Read every weight the run needs before joining the network, so that a damaged
    // checkpoint fails at once with the tensor's name.
    let dense = expertnet_model::DenseModel::load(&checkpoint)?;
    let reference = if args.verify_local {
        Some(MoeModel::local(&checkpoint)?)
    } else {
        None
    };
    let mut config = RouterConfig::new(DiscoveryConfig::new(args.bootstrap.clone()));
    config.deadline = Duration::from_millis(args.deadline);
    config.spot_check_rate = args.spot_check_rate;
    config.bootstrap_timeout = Duration::from_secs(args.timeout_secs);
    config.seed = Some(args.seed);
    let router = Router::connect(config).await?;
    let model = MoeModel::remote_with(dense, &router, &checkpoint, &manifest)?;

    let options = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        seed: args.seed,
    };
    let stream = !args.json;
    if stream {
        print_flush(&args.prompt);
    }
    // Decoding the whole output each time keeps multi-byte characters and word pieces
    // intact; only the new suffix is printed.
    let mut produced: Vec<u32> = Vec::new();
    let mut printed = 0;
    let generation = expertnet_router::generate(&model, &prompt, &options, |token| {
        produced.push(token);
        if stream {
            let text = tokenizer.decode(&produced);
            if text.len() > printed && text.is_char_boundary(printed) && !text.ends_with('\u{fffd}')
            {
                print_flush(&printable(&text[printed..]));
                printed = text.len();
            }
        }
    })
    .await?;
    if stream {
        // The loop above holds back a multi-byte character cut off by the end of generation.
        // Print the rest as the summary's text has it.
        let text = tokenizer.decode(&generation.tokens);
        if text.len() > printed && text.is_char_boundary(printed) {
            print_flush(&printable(&text[printed..]));
        }
        outln!();
    }

    let check = match &reference {
        Some(reference) => {
            Some(check_against_reference(reference, &generation, args.tolerance).await?)
        }
        None => None,
    };
    let mut served: BTreeMap<String, usize> = BTreeMap::new();
    let (mut fallbacks, mut hedges) = (0, 0);
    for trace in &generation.traces {
        fallbacks += trace.replica_fallbacks + trace.expert_fallbacks;
        hedges += trace.hedges;
        for token in &trace.tokens {
            for used in &token.served {
                *served.entry(short_peer_id(&used.peer)).or_default() += 1;
            }
        }
    }
    let seconds = generation.elapsed.as_secs_f64();
    let summary = serde_json::json!({
        "text": tokenizer.decode(&generation.tokens),
        "tokens": generation.tokens,
        "new_tokens": generation.tokens.len(),
        "tokens_per_s": generation.tokens.len() as f64 / seconds.max(1e-9),
        "elapsed_s": seconds,
        "moe_s": generation.moe.as_secs_f64(),
        "fallbacks": fallbacks,
        "hedges": hedges,
        "failures": router.stats().failure_counts(),
        "expert_calls_by_node": served,
        "max_rel_error": check.as_ref().map(|c| c.max_rel_error),
        "choice_mismatches": check.as_ref().map(|c| c.choice_mismatches.clone()),
    });
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        outln!(
            "{} tokens in {:.2} s ({:.1} tokens/s), {:.2} s in remote MoE layers; fallbacks {fallbacks}, hedges {hedges}",
            generation.tokens.len(),
            seconds,
            generation.tokens.len() as f64 / seconds.max(1e-9),
            generation.moe.as_secs_f64()
        );
        let failures = router.stats().failure_counts();
        if !failures.is_empty() {
            let parts: Vec<String> = failures.iter().map(|(k, v)| format!("{k} {v}")).collect();
            outln!("failed requests by reason: {}", parts.join(", "));
        }
        let parts: Vec<String> = served
            .iter()
            .map(|(peer, n)| format!("{peer} {n}"))
            .collect();
        outln!("expert calls by node: {}", parts.join(", "));
        if let Some(check) = &check {
            outln!(
                "local reference: max relative logit error {:.2e} over {} positions, {} greedy choices differ",
                check.max_rel_error,
                check.positions,
                check.choice_mismatches.len()
            );
        }
    }
    if let Some(check) = check
        && !check.passed(args.tolerance)
    {
        bail!(
            "the network's logits differ from the local reference: max relative error {:.3e} (tolerance {:.1e}), greedy choices differ at positions {:?}",
            check.max_rel_error,
            args.tolerance,
            check.choice_mismatches
        );
    }
    Ok(())
}

/// Prints text to stdout at once, without a newline.
fn print_flush(text: &str) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    if stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .is_err()
    {
        std::process::exit(0);
    }
}

/// Opens a checkpoint folder and the manifest beside it.
fn open_with_manifest(dir: &std::path::Path) -> anyhow::Result<(Checkpoint, Manifest)> {
    let checkpoint = Checkpoint::open(dir)?;
    let manifest_path = Manifest::path_in(dir);
    let manifest = Manifest::load(&manifest_path).with_context(|| {
        format!(
            "the checkpoint needs its manifest at {}; make it with `expertnet-node manifest --checkpoint {}`",
            manifest_path.display(),
            dir.display()
        )
    })?;
    Ok((checkpoint, manifest))
}

/// Waits until discovery lists a replica of every expert of `layer`, polling twice a
/// second for at most `seconds`.
async fn wait_for_layer(
    router: &Router,
    layer: &RemoteMoeLayer,
    experts: u32,
    seconds: u64,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let table = router
            .discovery()
            .resolve_fresh(layer.model_id(), layer.layer())
            .await?;
        let missing: Vec<u32> = (0..experts)
            .filter(|&e| table.replicas(e).is_empty())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if started.elapsed() >= Duration::from_secs(seconds) {
            bail!(
                "after {seconds} s no node serves experts {missing:?} of layer {}; start nodes that host them",
                layer.layer()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
