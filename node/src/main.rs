//! `expertnet-node`: the daemon volunteers run to serve experts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use expertnet_model::{Checkpoint, Manifest};
use expertnet_node::{ExpertSpec, KeyError, Limits, Node, NodeConfig, NodeKey, P2pConfig};
use expertnet_proto::DType;
use libp2p::Multiaddr;
use serde::Deserialize;

#[derive(Debug, Parser)]
#[command(
    name = "expertnet-node",
    version,
    about = "Serve Mixture-of-Experts experts to the expertnet network"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a new node key file (PKCS#8 PEM, mode 0600) and print its peer id.
    Keygen {
        /// Where to write the key; an existing file is never overwritten.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the peer id of a key file, for building a bootstrap address
    /// (/ip4/HOST/tcp/PORT/p2p/PEER_ID).
    Id {
        /// Key file made by `keygen` or by a node's first start.
        #[arg(long)]
        key: PathBuf,
    },
    /// Hash every expert of a checkpoint and write its manifest.
    Manifest {
        /// Checkpoint folder with config.json and safetensors files.
        #[arg(long)]
        checkpoint: PathBuf,
        /// Output file [default: CHECKPOINT/expertnet-manifest.json].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Replace an existing manifest file.
        #[arg(long)]
        force: bool,
    },
    /// Serve experts until SIGINT or SIGTERM.
    Run(Box<RunArgs>),
}

/// Options of `run`. Each can also be set in the TOML file given with `--config`, under the
/// same name with underscores (`grpc_listen = "0.0.0.0:50051"`); the command line wins.
#[derive(Debug, Default, Args, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunArgs {
    /// TOML file with any of these options.
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Checkpoint folder: config.json, the manifest and the shards that hold the hosted experts.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Manifest file [default: CHECKPOINT/expertnet-manifest.json].
    #[arg(long)]
    manifest: Option<PathBuf>,
    /// Experts to host: LAYERS:EXPERTS items separated by commas, each side `*`, N or N-M
    /// (examples: `0:0-3,1:*`, `*:0-1`, `*`).
    #[arg(long)]
    experts: Option<String>,
    /// gRPC listen address, IP:PORT or HOST:PORT [default: 127.0.0.1:50051].
    #[arg(long, value_parser = parse_listen_address)]
    grpc_listen: Option<SocketAddr>,
    /// Node key file, created with mode 0600 if missing [default: ~/.local/share/expertnet/node.key].
    #[arg(long)]
    key: Option<PathBuf>,
    /// Threads for expert computation [default: one per core].
    #[arg(long)]
    threads: Option<usize>,
    /// Dtype experts compute in: f32 or f16 [default: f32].
    #[arg(long)]
    compute_dtype: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics; ADDR is IP:PORT or HOST:PORT.
    #[arg(long, value_parser = parse_listen_address)]
    metrics_listen: Option<SocketAddr>,
    /// Largest request or response in bytes [default: 33554432].
    #[arg(long)]
    max_message_bytes: Option<usize>,
    /// Most token rows per request, summed over experts [default: 1024].
    #[arg(long)]
    max_tokens_per_request: Option<usize>,
    /// Most token rows queued for computation before requests are rejected [default: 16384].
    #[arg(long)]
    max_queued_tokens: Option<usize>,
    /// Most token rows in one expert forward pass [default: 256].
    #[arg(long)]
    max_batch_tokens: Option<usize>,
    /// Microseconds an idle expert waits to gather a batch [default: 0].
    #[arg(long)]
    batch_wait_us: Option<u64>,
    /// Seconds a shutdown waits for in-flight requests [default: 30].
    #[arg(long)]
    drain_timeout_secs: Option<u64>,
    /// libp2p listen address, repeatable [default: /ip4/127.0.0.1/tcp/4100 and
    /// /ip4/127.0.0.1/udp/4100/quic-v1].
    #[arg(long = "p2p-listen", value_parser = parse_multiaddr)]
    #[serde(default)]
    p2p_listen: Vec<Multiaddr>,
    /// Peer to join the network through, repeatable, as /ip4/HOST/tcp/PORT/p2p/PEER_ID
    /// (`expertnet-node id` prints a node's peer id). None: this is the first node.
    #[arg(long, value_parser = parse_multiaddr)]
    #[serde(default)]
    bootstrap: Vec<Multiaddr>,
    /// Address to announce instead of the listen addresses, repeatable: a libp2p address,
    /// or a gRPC endpoint written as /ip4/HOST/tcp/PORT/http or /dns4/NAME/tcp/PORT/http.
    #[arg(long = "external-addr", value_parser = parse_multiaddr)]
    #[serde(default)]
    external_addr: Vec<Multiaddr>,
    /// Seconds the node's records live in the DHT without a republish [default: 90].
    #[arg(long, value_parser = parse_seconds)]
    record_ttl: Option<u64>,
    /// Seconds between republications of the node's records [default: 30].
    #[arg(long, value_parser = parse_seconds)]
    republish_interval: Option<u64>,
    /// Misbehave on purpose, for tests and simulations (repeatable): delay=DURATION,
    /// jitter=DURATION, wrong-output, nan-output, wrong-shape, bad-signature, stop-answering,
    /// advertise-load=TOKENS. Off by default.
    #[arg(long = "fault")]
    #[serde(default)]
    fault: Vec<String>,
}

impl RunArgs {
    /// Fills options missing on the command line from the config file.
    fn merge(self, file: RunArgs) -> RunArgs {
        RunArgs {
            config: self.config,
            checkpoint: self.checkpoint.or(file.checkpoint),
            manifest: self.manifest.or(file.manifest),
            experts: self.experts.or(file.experts),
            grpc_listen: self.grpc_listen.or(file.grpc_listen),
            key: self.key.or(file.key),
            threads: self.threads.or(file.threads),
            compute_dtype: self.compute_dtype.or(file.compute_dtype),
            metrics_listen: self.metrics_listen.or(file.metrics_listen),
            max_message_bytes: self.max_message_bytes.or(file.max_message_bytes),
            max_tokens_per_request: self.max_tokens_per_request.or(file.max_tokens_per_request),
            max_queued_tokens: self.max_queued_tokens.or(file.max_queued_tokens),
            max_batch_tokens: self.max_batch_tokens.or(file.max_batch_tokens),
            batch_wait_us: self.batch_wait_us.or(file.batch_wait_us),
            drain_timeout_secs: self.drain_timeout_secs.or(file.drain_timeout_secs),
            p2p_listen: first_non_empty(self.p2p_listen, file.p2p_listen),
            bootstrap: first_non_empty(self.bootstrap, file.bootstrap),
            external_addr: first_non_empty(self.external_addr, file.external_addr),
            record_ttl: self.record_ttl.or(file.record_ttl),
            republish_interval: self.republish_interval.or(file.republish_interval),
            fault: first_non_empty(self.fault, file.fault),
        }
    }

    fn into_config(self) -> anyhow::Result<(NodeConfig, PathBuf)> {
        let checkpoint = self
            .checkpoint
            .context("--checkpoint is required (or `checkpoint` in the --config file)")?;
        let experts: ExpertSpec = self
            .experts
            .context("--experts is required (or `experts` in the --config file), for example --experts '*'")?
            .parse()?;

        let defaults = Limits::default();
        let mut config = NodeConfig::new(checkpoint, experts);
        config.manifest = self.manifest;
        config.grpc_listen = self
            .grpc_listen
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 50051)));
        config.metrics_listen = self.metrics_listen;
        config.threads = self.threads;
        config.compute_dtype = match self.compute_dtype.as_deref() {
            None | Some("f32") => DType::F32,
            Some("f16") => DType::F16,
            Some(other) => bail!(
                "invalid --compute-dtype {other:?}: experts compute in f32 or f16 (bf16 checkpoints are computed in f32)"
            ),
        };
        config.limits = Limits {
            max_message_bytes: self.max_message_bytes.unwrap_or(defaults.max_message_bytes),
            max_tokens_per_request: self
                .max_tokens_per_request
                .unwrap_or(defaults.max_tokens_per_request),
            max_queued_tokens: self.max_queued_tokens.unwrap_or(defaults.max_queued_tokens),
            max_batch_tokens: self.max_batch_tokens.unwrap_or(defaults.max_batch_tokens),
            batch_wait: self
                .batch_wait_us
                .map_or(defaults.batch_wait, Duration::from_micros),
        };
        if let Some(seconds) = self.drain_timeout_secs {
            config.drain_timeout = Duration::from_secs(seconds);
        }
        for fault in &self.fault {
            config
                .faults
                .apply(fault)
                .map_err(|reason| anyhow::anyhow!("invalid --fault: {reason}"))?;
        }
        config.p2p = Some(p2p_config(
            self.p2p_listen,
            self.bootstrap,
            self.external_addr,
            self.record_ttl,
            self.republish_interval,
        )?);

        let key = match self.key {
            Some(key) => key,
            None => default_key_path()?,
        };
        Ok((config, key))
    }
}

/// Parses IP:PORT, or HOST:PORT resolved to its first address (such as localhost:50051).
fn parse_listen_address(text: &str) -> Result<SocketAddr, String> {
    if let Ok(address) = text.parse() {
        return Ok(address);
    }
    if let Some((_, port)) = text.rsplit_once(':')
        && port
            .parse::<u32>()
            .is_ok_and(|port| port > u32::from(u16::MAX))
    {
        return Err(format!(
            "port {port} in {text:?} is above 65535; use a port from 0 to 65535 (0 picks a free one)"
        ));
    }
    use std::net::ToSocketAddrs;
    text.to_socket_addrs()
        .ok()
        .and_then(|mut addresses| addresses.next())
        .ok_or_else(|| format!("{text:?} is not IP:PORT or HOST:PORT, such as 127.0.0.1:50051"))
}

/// Parses a multiaddr, with the expected forms in the error.
fn parse_multiaddr(text: &str) -> Result<Multiaddr, String> {
    text.parse().map_err(|_| {
        format!(
            "{text:?} is not a multiaddr; write /ip4/HOST/tcp/PORT (add /p2p/PEER_ID for a bootstrap peer) or /ip4/HOST/udp/PORT/quic-v1"
        )
    })
}

/// Parses whole seconds, written as `30` or `30s`.
fn parse_seconds(text: &str) -> Result<u64, String> {
    text.strip_suffix('s')
        .unwrap_or(text)
        .parse()
        .map_err(|_| format!("{text:?} is not a whole number of seconds, such as 30"))
}

fn first_non_empty<T>(first: Vec<T>, second: Vec<T>) -> Vec<T> {
    if first.is_empty() { second } else { first }
}

fn p2p_config(
    listen: Vec<Multiaddr>,
    bootstrap: Vec<Multiaddr>,
    external: Vec<Multiaddr>,
    record_ttl: Option<u64>,
    republish_interval: Option<u64>,
) -> anyhow::Result<P2pConfig> {
    let mut config = P2pConfig {
        listen: if listen.is_empty() {
            vec![
                "/ip4/127.0.0.1/tcp/4100".parse()?,
                "/ip4/127.0.0.1/udp/4100/quic-v1".parse()?,
            ]
        } else {
            listen
        },
        bootstrap,
        external,
        ..P2pConfig::default()
    };
    if let Some(seconds) = record_ttl {
        config.dht.record_ttl = Duration::from_secs(seconds);
    }
    if let Some(seconds) = republish_interval {
        config.republish_interval = Duration::from_secs(seconds);
    }
    if config.dht.record_ttl.is_zero() {
        bail!("--record-ttl is 0; it must be at least 1 second");
    }
    if config.republish_interval.is_zero() {
        bail!("--republish-interval is 0; it must be at least 1 second");
    }
    if config.republish_interval >= config.dht.record_ttl {
        bail!(
            "--republish-interval ({} s) must be shorter than --record-ttl ({} s), or the node's records lapse between republications; a third of the TTL is a good choice",
            config.republish_interval.as_secs(),
            config.dht.record_ttl.as_secs()
        );
    }
    Ok(config)
}

fn default_key_path() -> anyhow::Result<PathBuf> {
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/share")))
        .context("neither XDG_DATA_HOME nor HOME is set; pass --key FILE")?;
    Ok(data.join("expertnet").join("node.key"))
}

/// Reads a `--config` file. Relative paths in it are relative to the file's folder, so a
/// config works from any working directory.
fn read_config_file(path: &Path) -> anyhow::Result<RunArgs> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    let mut args: RunArgs =
        toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))?;

    let base = path.parent().unwrap_or(Path::new("."));
    let resolve = |file: &mut Option<PathBuf>| {
        if let Some(relative) = file.as_mut().filter(|p| p.is_relative()) {
            *relative = base.join(&*relative);
        }
    };
    resolve(&mut args.checkpoint);
    resolve(&mut args.manifest);
    resolve(&mut args.key);
    Ok(args)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();

    let result = match cli.command {
        Command::Keygen { out } => keygen(&out),
        Command::Id { key } => NodeKey::load(&key)
            .map(|key| println!("{}", key.peer_id()))
            .map_err(anyhow::Error::from),
        Command::Manifest {
            checkpoint,
            out,
            force,
        } => manifest(&checkpoint, out, force),
        Command::Run(args) => run(*args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    // libp2p's own info and warning lines are about its internals, which the node already
    // reports in its own terms.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,libp2p_kad=error,libp2p_swarm=error,libp2p_tcp=error,libp2p_quic=error,quinn=error,quinn_proto=error")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A closed stderr (a log piped into `head`) must not stop the process: the
        // subscriber's own error report would panic writing to the same stderr.
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn keygen(out: &Path) -> anyhow::Result<()> {
    let key = NodeKey::generate()?;
    key.save_new(out)?;
    println!("{}", key.peer_id());
    eprintln!("wrote {} (mode 0600)", out.display());
    Ok(())
}

fn manifest(checkpoint_dir: &Path, out: Option<PathBuf>, force: bool) -> anyhow::Result<()> {
    let out = out.unwrap_or_else(|| Manifest::path_in(checkpoint_dir));
    if out.exists() && !force {
        bail!(
            "{} exists; pass --force to replace it (a new manifest changes nothing unless the weights changed)",
            out.display()
        );
    }

    let checkpoint = Checkpoint::open(checkpoint_dir)?;
    let started = std::time::Instant::now();
    let manifest = Manifest::create(&checkpoint)?;
    manifest.save(&out)?;
    eprintln!(
        "hashed {} experts in {:.1} s; wrote {}",
        manifest.expert_count(),
        started.elapsed().as_secs_f64(),
        out.display()
    );
    println!("{}", manifest.model_id());
    Ok(())
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let args = match &args.config {
        Some(path) => {
            let file = read_config_file(path)?;
            args.merge(file)
        }
        None => args,
    };
    let (config, key_path) = args.into_config()?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("expertnet-io")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        // A missing key file is written only once the node has started, so a mistake in
        // the other options leaves no new key behind.
        let (key, created) = match NodeKey::load(&key_path) {
            Ok(key) => (key, false),
            Err(KeyError::NotFound { .. }) => (NodeKey::generate()?, true),
            Err(error) => return Err(error.into()),
        };

        // Listen for signals before serving, so a signal sent as soon as the node reports
        // that it serves stops it gracefully.
        let shutdown = shutdown_signal()?;
        tokio::pin!(shutdown);
        let node = tokio::select! {
            node = Node::start(config, key.clone()) => node?,
            () = &mut shutdown => {
                tracing::info!("stopped while loading experts");
                return Ok(());
            }
        };
        if created {
            if let Err(error) = key.save_new(&key_path) {
                let _ = node.shutdown().await;
                return Err(error.into());
            }
            tracing::info!(path = %key_path.display(), peer_id = %key.peer_id(), "saved the node key generated at start");
        }
        shutdown.await;
        node.shutdown().await?;
        Ok(())
    })
}

/// Registers the SIGINT and SIGTERM handlers and returns a future that resolves on the
/// first of them.
#[cfg(unix)]
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    Ok(async move {
        let name = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "received shutdown signal");
    })
}

#[cfg(not(unix))]
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        if tokio::signal::ctrl_c().await.is_ok() {
            tracing::info!("received Ctrl-C");
        }
    })
}
