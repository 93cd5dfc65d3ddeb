//! `expertnet-sim`: checkpoints, simulations and benchmarks on one machine.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use expertnet_model::{Family, GeneratorOptions, Manifest, generate_checkpoint};
use expertnet_proto::DType;
use expertnet_sim::bench::{self, BenchOptions};
use expertnet_sim::{demo, dht_bench, generate_bench, layer_bench, scenario, virtual_time};

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
#[command(
    name = "expertnet-sim",
    version,
    about = "Checkpoints, simulations and benchmarks of expertnet"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Layout {
    Mixtral,
    Qwen2Moe,
    Qwen3Moe,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a small network on 127.0.0.1 in this process and send verified requests
    /// through it, killing one node halfway.
    Demo {
        /// Checkpoint folder, made on first use [default: ~/.cache/expertnet/demo-checkpoint].
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// Token rows per expert call.
        #[arg(long, default_value_t = 8)]
        tokens: usize,
        /// Seed of the hidden states sent.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Write a seeded random checkpoint in the Hugging Face layout, with its manifest.
    MakeCheckpoint {
        /// Output folder: new, or empty.
        #[arg(long)]
        out: PathBuf,
        /// Tensor names and config of this model family.
        #[arg(long, value_enum, default_value = "mixtral")]
        layout: Layout,
        /// Transformer layers, each with an MoE block.
        #[arg(long, default_value_t = 4)]
        layers: usize,
        /// Experts per MoE layer.
        #[arg(long, default_value_t = 8)]
        experts: usize,
        /// Experts chosen per token.
        #[arg(long, default_value_t = 2)]
        top_k: usize,
        /// Hidden size of the model (width of the residual stream).
        #[arg(long, default_value_t = 128)]
        hidden: usize,
        /// Width of each expert's hidden layer.
        #[arg(long, default_value_t = 352)]
        ffn: usize,
        /// Vocabulary size.
        #[arg(long, default_value_t = 512)]
        vocab: usize,
        /// Attention heads.
        #[arg(long, default_value_t = 4)]
        heads: usize,
        /// Key-value heads (grouped-query attention).
        #[arg(long, default_value_t = 2)]
        kv_heads: usize,
        /// Seed of the random weights; the same seed gives the same checkpoint.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Storage dtype: f32, bf16 or f16.
        #[arg(long, default_value = "f32")]
        dtype: DType,
        /// Largest safetensors shard in bytes; larger checkpoints are split into shards
        /// listed in model.safetensors.index.json.
        #[arg(long, default_value_t = 2 << 30)]
        max_shard_bytes: u64,
    },
    /// Measure and print benchmarks.
    #[command(subcommand)]
    Bench(Bench),
    /// Run a scenario with real nodes in this process on 127.0.0.1: a paced workload
    /// through one MoE layer and a schedule of faults (see sim/scenarios/).
    Run {
        /// Scenario file, such as sim/scenarios/churn.toml.
        #[arg(long)]
        scenario: PathBuf,
        /// Output file of the SVG plot of latency with the faults marked
        /// [default: SCENARIO_NAME.svg in the temporary folder].
        #[arg(long)]
        plot: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run the router's routing policy over modeled nodes in virtual time, as a scenario
    /// file describes (see sim/scenarios/), and print success, latency and load balance.
    Virtual {
        /// Scenario file, such as sim/scenarios/virtual-10k.toml.
        #[arg(long)]
        scenario: PathBuf,
        /// Print JSON instead of Markdown.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Local expert computation against a node round trip and a gRPC echo of the same
    /// payload, and the throughput of concurrent one-token clients.
    Node {
        /// Seconds per local measurement, from 0.01 to 60. Round trips take twice this, and
        /// the concurrent clients three times this against the node and again against the
        /// echo service. The default run takes about a minute.
        #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
        seconds: f64,
        /// Expert sizes as HIDDENxFFN, comma-separated: an even hidden size up to 8192 and
        /// an ffn size up to 32768.
        #[arg(long, default_value = "512x1408,1024x2816", value_delimiter = ',')]
        sizes: Vec<String>,
        /// Batch sizes in tokens, comma-separated, from 1 to a node's default
        /// max_tokens_per_request (1024).
        #[arg(long, default_value = "1,16,128", value_delimiter = ',')]
        batches: Vec<usize>,
        /// Print JSON instead of Markdown.
        #[arg(long)]
        json: bool,
    },
    /// Discovery with real nodes in one process: cold lookups, time until a new node is
    /// visible, memory per node.
    Dht {
        /// Network sizes, comma-separated, each including the bootstrap node.
        #[arg(long, default_value = "20,100", value_delimiter = ',')]
        nodes: Vec<usize>,
        /// Milliseconds between two nodes' starts.
        #[arg(long, default_value_t = 300)]
        stagger_ms: u64,
        /// Cold lookups per network size.
        #[arg(long, default_value_t = 50)]
        lookups: usize,
        /// Timed joins of a new node per network size.
        #[arg(long, default_value_t = 5)]
        joins: usize,
        /// Print JSON instead of Markdown.
        #[arg(long)]
        json: bool,
    },
    /// A whole MoE layer computed by nodes on loopback, through the router, against the
    /// same layer computed in this process: tokens/s, latency, verification share.
    Layer {
        #[arg(long, default_value_t = 32)]
        experts: usize,
        #[arg(long, default_value_t = 1024)]
        hidden: usize,
        #[arg(long, default_value_t = 2816)]
        ffn: usize,
        #[arg(long, default_value_t = 2)]
        top_k: usize,
        #[arg(long, default_value_t = 4)]
        nodes: usize,
        /// Nodes that host each expert.
        #[arg(long, default_value_t = 2)]
        replicas: usize,
        /// Batch sizes in tokens, comma-separated.
        #[arg(long, default_value = "1,16,128", value_delimiter = ',')]
        batches: Vec<usize>,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Print JSON instead of Markdown.
        #[arg(long)]
        json: bool,
    },
    /// Greedy text generation with every MoE layer on nodes on loopback, against the same
    /// model with local experts.
    Generate {
        /// Model sizes as LAYERSxEXPERTSxHIDDENxFFN, comma-separated.
        #[arg(
            long,
            default_value = "4x8x128x352,8x8x1024x2816",
            value_delimiter = ','
        )]
        sizes: Vec<String>,
        #[arg(long, default_value_t = 4)]
        nodes: usize,
        #[arg(long, default_value_t = 32)]
        new_tokens: usize,
        /// Print JSON instead of Markdown.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Scenario runs fault nodes on purpose; their warnings about it would bury the report.
    let default_level = if matches!(cli.command, Command::Run { .. }) {
        "error"
    } else {
        "warn"
    };
    // A network's first node has no peers to bootstrap from, which Kademlia reports as a
    // warning on every attempt.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{default_level},libp2p_kad=error"))
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A closed stderr (a log piped into `head`) must not stop the process: the
        // subscriber's own error report would panic writing to the same stderr.
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let result = match cli.command {
        Command::Demo {
            checkpoint,
            tokens,
            seed,
        } => demo(checkpoint, tokens, seed),
        Command::MakeCheckpoint {
            out,
            layout,
            layers,
            experts,
            top_k,
            hidden,
            ffn,
            vocab,
            heads,
            kv_heads,
            seed,
            dtype,
            max_shard_bytes,
        } => {
            let options = GeneratorOptions {
                family: match layout {
                    Layout::Mixtral => Family::Mixtral,
                    Layout::Qwen2Moe => Family::Qwen2Moe,
                    Layout::Qwen3Moe => Family::Qwen3Moe,
                },
                layers,
                experts,
                top_k,
                hidden,
                ffn,
                vocab,
                heads,
                kv_heads,
                seed,
                dtype,
                max_shard_bytes,
            };
            make_checkpoint(&out, &options)
        }
        Command::Bench(Bench::Node {
            seconds,
            sizes,
            batches,
            json,
        }) => bench_node(seconds, &sizes, batches, json),
        Command::Bench(Bench::Dht {
            nodes,
            stagger_ms,
            lookups,
            joins,
            json,
        }) => bench_dht(nodes, stagger_ms, lookups, joins, json),
        Command::Virtual { scenario, json } => run_virtual(&scenario, json),
        Command::Run {
            scenario,
            plot,
            json,
        } => run_scenario(&scenario, plot, json),
        Command::Bench(Bench::Generate {
            sizes,
            nodes,
            new_tokens,
            json,
        }) => bench_generate(&sizes, nodes, new_tokens, json),
        Command::Bench(Bench::Layer {
            experts,
            hidden,
            ffn,
            top_k,
            nodes,
            replicas,
            batches,
            seconds,
            json,
        }) => bench_layer(
            layer_bench::LayerBenchOptions {
                experts,
                hidden,
                ffn,
                top_k,
                nodes,
                replicas,
                batches,
                seconds,
                ..layer_bench::LayerBenchOptions::default()
            },
            json,
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn demo(checkpoint: Option<PathBuf>, tokens: usize, seed: u64) -> anyhow::Result<()> {
    if tokens == 0 || tokens > 1024 {
        anyhow::bail!("--tokens must be between 1 and 1024, got {tokens}");
    }
    let options = demo::DemoOptions {
        checkpoint: checkpoint.unwrap_or_else(demo::default_checkpoint_dir),
        tokens,
        seed,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut report = runtime.block_on(demo::run(&options))?;

    report.latencies.sort();
    let percentile = |p: f64| {
        let index = ((report.latencies.len().max(1) - 1) as f64 * p).round() as usize;
        report
            .latencies
            .get(index)
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    outln!(
        "generated (random weights, so the text is noise; it must equal the local model's): {:?}",
        report.text
    );
    outln!(
        "{} tokens in {:.2} s ({:.1} tokens/s); max relative logit error against the local model {:.2e}",
        report.new_tokens,
        report.generation_seconds,
        report.new_tokens as f64 / report.generation_seconds.max(1e-9),
        report.reference_error
    );
    outln!(
        "during generation: {} expert tasks served elsewhere after a failure; failed requests by reason: {}",
        report.generation_fallbacks,
        report.generation_failures
    );
    outln!(
        "then {} layer calls of {tokens} tokens: {} expert tasks served by another replica after a failure, {} tokens moved to another expert, {} failed",
        report.calls,
        report.replica_fallbacks,
        report.expert_fallbacks,
        report.failed_calls
    );
    outln!(
        "every receipt verified; {} spot checks, {} mismatches, nodes banned for wrong results: {}; failed requests by reason: {}",
        report.spot_checks,
        report.mismatches,
        report.dishonest_bans,
        report.failures
    );
    outln!(
        "max relative error against the local layers {:.2e}",
        report.max_relative_error
    );
    outln!(
        "latency per layer call p50 {:.2} ms, p99 {:.2} ms",
        percentile(0.5),
        percentile(0.99)
    );
    Ok(())
}

fn make_checkpoint(out: &std::path::Path, options: &GeneratorOptions) -> anyhow::Result<()> {
    let checkpoint = generate_checkpoint(out, options)?;
    let manifest = Manifest::load(&Manifest::path_in(out))?;
    let config = checkpoint.config();
    eprintln!(
        "wrote {} ({}: {} layers, {} experts of hidden {} / ffn {}, top-{}, {})",
        out.display(),
        config.model_type,
        config.num_hidden_layers,
        config.num_experts(),
        config.hidden_size,
        config.expert_ffn(),
        config.num_experts_per_tok,
        options.dtype
    );
    outln!("{}", manifest.model_id());
    Ok(())
}

fn bench_dht(
    nodes: Vec<usize>,
    stagger_ms: u64,
    lookups: usize,
    joins: usize,
    json: bool,
) -> anyhow::Result<()> {
    if nodes.iter().any(|&n| !(2..=500).contains(&n)) {
        anyhow::bail!("--nodes values must be between 2 and 500, got {nodes:?}");
    }
    if lookups == 0 || lookups > 10_000 || joins > 100 {
        anyhow::bail!("--lookups must be 1 to 10000 and --joins at most 100");
    }
    let options = dht_bench::DhtBenchOptions {
        sizes: nodes,
        stagger: Duration::from_millis(stagger_ms),
        lookups,
        joins,
    };
    run_and_print(json, dht_bench::run(&options), |rows| {
        dht_bench::to_markdown(rows)
    })
}

fn bench_node(
    seconds: f64,
    sizes: &[String],
    batches: Vec<usize>,
    json: bool,
) -> anyhow::Result<()> {
    if !(0.01..=60.0).contains(&seconds) {
        anyhow::bail!("--seconds must be from 0.01 to 60, got {seconds}");
    }
    let max_batch = expertnet_node::Limits::default().max_tokens_per_request;
    if let Some(batch) = batches.iter().find(|&&b| !(1..=max_batch).contains(&b)) {
        anyhow::bail!(
            "--batches takes 1 to {max_batch} tokens (a node's default --max-tokens-per-request), got {batch}"
        );
    }
    // All sizes are checked before the first one runs, so a typo in the last one does not
    // cost the results of the others.
    let sizes = sizes
        .iter()
        .map(|text| parse_expert_size(text))
        .collect::<anyhow::Result<Vec<(usize, usize)>>>()?;
    let options = BenchOptions {
        sizes,
        batches,
        budget: Duration::from_secs_f64(seconds),
        concurrent_duration: Duration::from_secs_f64(3.0 * seconds),
        ..BenchOptions::default()
    };

    run_and_print(json, bench::run(&options), bench::BenchReport::to_markdown)
}

/// Parses one `--sizes` entry of `bench node`, such as `512x1408`.
fn parse_expert_size(text: &str) -> anyhow::Result<(usize, usize)> {
    let invalid = || {
        anyhow::anyhow!(
            "size {text:?} in --sizes is invalid; write HIDDENxFFN, such as 512x1408, with an even hidden size from 2 to 8192 and an ffn size from 1 to 32768"
        )
    };
    let (hidden, ffn) = text.split_once(['x', 'X']).ok_or_else(invalid)?;
    let hidden: usize = hidden.trim().parse().map_err(|_| invalid())?;
    let ffn: usize = ffn.trim().parse().map_err(|_| invalid())?;
    if !(2..=8192).contains(&hidden) || !hidden.is_multiple_of(2) || !(1..=32768).contains(&ffn) {
        return Err(invalid());
    }
    Ok((hidden, ffn))
}

fn bench_layer(options: layer_bench::LayerBenchOptions, json: bool) -> anyhow::Result<()> {
    let valid = (1..=256).contains(&options.experts)
        && (1..=8192).contains(&options.hidden)
        && (1..=32768).contains(&options.ffn)
        && (1..=options.experts).contains(&options.top_k)
        && (1..=16).contains(&options.nodes)
        && options.batches.iter().all(|&b| (1..=4096).contains(&b))
        && options.seconds > 0.0
        && options.seconds <= 600.0;
    if !valid {
        anyhow::bail!(
            "bench layer takes 1-256 experts, hidden 1-8192, ffn 1-32768, top-k up to the experts, 1-16 nodes, batches of 1-4096 tokens and up to 600 seconds per measurement"
        );
    }
    run_and_print(
        json,
        layer_bench::run(&options),
        layer_bench::LayerReport::to_markdown,
    )
}

/// Runs a benchmark on a new runtime and prints its report as JSON or Markdown.
fn run_and_print<R: serde::Serialize>(
    json: bool,
    bench: impl Future<Output = anyhow::Result<R>>,
    markdown: impl FnOnce(&R) -> String,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(bench)?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        outln!("{}", markdown(&report).trim_end());
    }
    Ok(())
}

fn bench_generate(
    sizes: &[String],
    nodes: usize,
    new_tokens: usize,
    json: bool,
) -> anyhow::Result<()> {
    let parsed = sizes
        .iter()
        .map(|text| {
            let parts: Vec<usize> = text
                .split('x')
                .map(str::parse)
                .collect::<Result<_, _>>()
                .map_err(|_| anyhow::anyhow!("invalid size {text:?}; write LAYERSxEXPERTSxHIDDENxFFN, such as 8x8x1024x2816"))?;
            match parts[..] {
                [layers, experts, hidden, ffn]
                    if (1..=64).contains(&layers)
                        && (2..=256).contains(&experts)
                        && (8..=8192).contains(&hidden)
                        && hidden.is_multiple_of(8)
                        && (1..=32768).contains(&ffn) =>
                {
                    Ok(generate_bench::ModelSize { layers, experts, hidden, ffn })
                }
                _ => anyhow::bail!(
                    "invalid size {text:?}; write LAYERSxEXPERTSxHIDDENxFFN with 1-64 layers, 2-256 experts, a hidden size of 8-8192 divisible by 8 and ffn 1-32768"
                ),
            }
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if !(2..=16).contains(&nodes) || !(1..=1024).contains(&new_tokens) {
        anyhow::bail!("--nodes must be 2-16 and --new-tokens 1-1024");
    }
    run_and_print(
        json,
        generate_bench::run(&parsed, nodes, new_tokens),
        |rows| generate_bench::to_markdown(rows),
    )
}

fn run_virtual(path: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let scenario = virtual_time::Scenario::load(path)?;
    let mut reports = Vec::new();
    for (replication, churn_scale) in scenario.runs() {
        eprintln!("replication {replication}, churn x{churn_scale}");
        reports.push(virtual_time::run(&scenario, replication, churn_scale));
    }
    if json {
        outln!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        outln!("{}", virtual_time::to_markdown(&reports).trim_end());
    }
    let misses: Vec<String> = reports.iter().flat_map(|r| scenario.misses(r)).collect();
    if !misses.is_empty() {
        anyhow::bail!(
            "the scenario's expectations were missed: {}",
            misses.join("; ")
        );
    }
    Ok(())
}

fn run_scenario(path: &std::path::Path, plot: Option<PathBuf>, json: bool) -> anyhow::Result<()> {
    let scenario = scenario::load(path)?;
    let plot = plot.unwrap_or_else(|| scenario::default_plot(path));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(scenario::run(&scenario, Some(&plot)))?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        outln!("{}", scenario::to_text(&report).trim_end());
        outln!("plot: {}", plot.display());
    }
    if !report.misses.is_empty() {
        anyhow::bail!(
            "the scenario's expectations were missed: {}",
            report.misses.join("; ")
        );
    }
    if !json {
        outln!("every figure the scenario promises ([expect] in its file) was reached");
    }
    Ok(())
}
