//! `expertnet-sim bench node`: the cost of serving an expert over the network, against the
//! same expert computed locally and a plain gRPC echo of the same payload, in one run.

use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use expertnet_model::codec::wire_from_f32;
use expertnet_model::rng::SplitMix64;
use expertnet_model::{Family, GeneratorOptions, MatmulLayout, generate_checkpoint};
use expertnet_node::{ExpertSpec, Node, NodeConfig, NodeKey};
use expertnet_proto::pb::echo_service_client::EchoServiceClient;
use expertnet_proto::pb::echo_service_server::{EchoService, EchoServiceServer};
use expertnet_proto::{DType, ExpertInput, ForwardCall, RequestId, pb};
use expertnet_router::NodeClient;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint, Server};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// `(hidden, ffn)` expert sizes.
    pub sizes: Vec<(usize, usize)>,
    pub batches: Vec<usize>,
    /// Time spent on each local variant, and twice this on node and echo together.
    pub budget: Duration,
    /// Concurrent one-token clients in the throughput measurement.
    pub concurrent_clients: usize,
    /// Duration of the throughput measurement.
    pub concurrent_duration: Duration,
    /// Compute threads of the node.
    pub node_threads: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            sizes: vec![(512, 1408), (1024, 2816)],
            batches: vec![1, 16, 128],
            budget: Duration::from_secs(1),
            concurrent_clients: 32,
            concurrent_duration: Duration::from_secs(3),
            node_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// One row of the report: medians in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyRow {
    pub hidden: usize,
    pub ffn: usize,
    pub batch: usize,
    /// The expert as a node computes it by default (the small-batch kernel up to
    /// [`expertnet_model::SMALL_BATCH_MAX`] tokens, then gemm with `W · xᵀ`).
    pub local_ms: f64,
    /// gemm with `W · xᵀ`.
    pub local_weights_left_ms: f64,
    /// gemm with `x · Wᵀ`, as `candle_nn::Linear` computes it.
    pub local_input_left_ms: f64,
    /// The small-batch kernel, measured up to 16 tokens.
    pub local_small_batch_ms: Option<f64>,
    /// The default computation, each call right after an echo round trip. A node serving a
    /// lone client computes like this, with other work between calls.
    pub local_between_calls_ms: f64,
    pub node_ms: f64,
    /// Mean compute time of the node's forward passes during the round-trip measurement.
    pub node_compute_ms: f64,
    pub echo_ms: f64,
    pub payload_bytes: usize,
}

impl LatencyRow {
    /// Node round trip minus the same computation done locally.
    pub fn overhead_ms(&self) -> f64 {
        self.node_ms - self.local_ms
    }

    /// Node round trip minus the computation done locally between other calls.
    pub fn overhead_between_calls_ms(&self) -> f64 {
        self.node_ms - self.local_between_calls_ms
    }
}

/// The throughput of concurrent one-token clients against local batched computation.
#[derive(Debug, Clone, Serialize)]
pub struct ThroughputRow {
    pub hidden: usize,
    pub ffn: usize,
    pub clients: usize,
    pub node_tokens_per_s: f64,
    pub local_batched_tokens_per_s: f64,
    /// The same clients calling the echo service with the same payload.
    pub echo_requests_per_s: f64,
    /// CPU time of the whole process (clients and node) over wall time during the node
    /// measurement, in cores. On a 2-core machine, 2.0 means both cores were busy.
    pub node_cores_busy: f64,
    /// CPU time of the whole process per token during the node measurement, in µs.
    pub node_cpu_us_per_token: f64,
    /// CPU time of the whole process per echo call, in µs.
    pub echo_cpu_us_per_request: f64,
    pub forward_passes: u64,
    pub requests: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub latency: Vec<LatencyRow>,
    pub throughput: Vec<ThroughputRow>,
}

impl ThroughputRow {
    /// Computes the highest node / local ratio that one gRPC call per token allows. Each
    /// token then costs the CPU of one echo call plus its share of a local batched pass,
    /// with no signatures, hashing or queueing.
    pub fn ceiling_ratio(&self) -> f64 {
        self.echo_requests_per_s / (self.echo_requests_per_s + self.local_batched_tokens_per_s)
    }
}

impl BenchReport {
    /// The report as Markdown tables.
    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        out.push_str("| hidden / ffn | batch | local ms | gemm W·xᵀ ms | gemm x·Wᵀ ms | small-batch kernel ms | local between calls ms |\n");
        out.push_str("|---|---|---|---|---|---|---|\n");
        for row in &self.latency {
            out.push_str(&format!(
                "| {} / {} | {} | {:.3} | {:.3} | {:.3} | {} | {:.3} |\n",
                row.hidden,
                row.ffn,
                row.batch,
                row.local_ms,
                row.local_weights_left_ms,
                row.local_input_left_ms,
                row.local_small_batch_ms
                    .map_or("-".to_owned(), |ms| format!("{ms:.3}")),
                row.local_between_calls_ms,
            ));
        }
        out.push('\n');
        out.push_str("| hidden / ffn | batch | node round trip ms | node compute ms | echo ms | overhead ms | overhead / echo | overhead between calls / echo | (round trip − node compute) / echo |\n");
        out.push_str("|---|---|---|---|---|---|---|---|---|\n");
        for row in &self.latency {
            out.push_str(&format!(
                "| {} / {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.2} | {:.2} | {:.2} |\n",
                row.hidden,
                row.ffn,
                row.batch,
                row.node_ms,
                row.node_compute_ms,
                row.echo_ms,
                row.overhead_ms(),
                row.overhead_ms() / row.echo_ms,
                row.overhead_between_calls_ms() / row.echo_ms,
                (row.node_ms - row.node_compute_ms) / row.echo_ms
            ));
        }
        out.push('\n');
        out.push_str("| hidden / ffn | clients | node tokens/s | local batched tokens/s | ratio | echo requests/s | ceiling ratio | requests | forward passes | cores busy | CPU µs per token | CPU µs per echo |\n");
        out.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|\n");
        for row in &self.throughput {
            out.push_str(&format!(
                "| {} / {} | {} | {:.0} | {:.0} | {:.2} | {:.0} | {:.2} | {} | {} | {:.2} | {:.0} | {:.0} |\n",
                row.hidden,
                row.ffn,
                row.clients,
                row.node_tokens_per_s,
                row.local_batched_tokens_per_s,
                row.node_tokens_per_s / row.local_batched_tokens_per_s,
                row.echo_requests_per_s,
                row.ceiling_ratio(),
                row.requests,
                row.forward_passes,
                row.node_cores_busy,
                row.node_cpu_us_per_token,
                row.echo_cpu_us_per_request
            ));
        }
        out
    }
}

/// Runs the benchmark.
///
/// # Errors
/// Any failure to generate the checkpoint, start the node or servers, or call them.
pub async fn run(options: &BenchOptions) -> anyhow::Result<BenchReport> {
    let mut report = BenchReport {
        latency: Vec::new(),
        throughput: Vec::new(),
    };
    let echo = start_echo().await?;

    for &(hidden, ffn) in &options.sizes {
        let dir = tempfile::tempdir()?;
        let generator = GeneratorOptions {
            family: Family::Mixtral,
            layers: 1,
            experts: 2,
            hidden,
            ffn,
            vocab: 16,
            // Attention is not benchmarked; one head lets any even hidden size through.
            heads: 1,
            kv_heads: 1,
            ..GeneratorOptions::default()
        };
        generate_checkpoint(dir.path(), &generator)?;

        let mut config = NodeConfig::new(dir.path(), "0:0".parse::<ExpertSpec>()?);
        config.threads = Some(options.node_threads);
        let node = Node::start(config, NodeKey::generate()?).await?;
        // Local computation uses the node's own copy of the weights, so that both sides see
        // the same memory and cache behaviour.
        let expert = node
            .hosted_expert(0, 0)
            .ok_or_else(|| anyhow::anyhow!("the node does not host layer 0 expert 0"))?;
        let endpoint = format!("http://{}", node.grpc_addr());
        let mut client = NodeClient::connect(
            &endpoint,
            Some(node.key().peer_id()),
            Duration::from_secs(5),
        )
        .await?;
        let model_id = node.model_id().to_owned();
        let digest =
            expertnet_model::Manifest::load(&expertnet_model::Manifest::path_in(dir.path()))?
                .expert_digest(0, 0);

        let local_pool = rayon::ThreadPoolBuilder::new()
            .num_threads(options.node_threads)
            .build()?;
        let mut rng = SplitMix64::new(1);
        for &batch in &options.batches {
            let values = rng.normal_vec(batch * hidden);
            let x = Tensor::from_vec(values.clone(), (batch, hidden), &Device::Cpu)?;
            let weights_left = expert
                .clone()
                .with_layout(MatmulLayout::WeightsLeft)
                .with_small_batch_max(0);
            let input_left = expert
                .clone()
                .with_layout(MatmulLayout::InputLeft)
                .with_small_batch_max(0);
            let small_batch =
                (batch <= 16).then(|| expert.clone().with_small_batch_max(usize::MAX));

            let call = ForwardCall {
                request_id: RequestId::from_bytes([9; 16]),
                model_id: model_id.clone(),
                layer: 0,
                inputs: vec![ExpertInput {
                    expert: 0,
                    hidden: wire_from_f32(&values, &[batch, hidden], DType::F32)?,
                }],
            };
            let request = call.clone().into_wire();
            let payload_bytes = prost::Message::encoded_len(&request);

            // Local variants first, each on a rayon pool of the node's size, as the node
            // computes. NOTE: when local runs took turns with node and echo calls in this
            // process, large local batches took about twice as long as in isolation on the
            // 2-core development machine; the cause is not known, so the phases are kept
            // apart.
            let mut samples = Samples::default();
            let local_measure = |expert: &expertnet_model::Expert| {
                local_pool.install(|| measure_sync(options.budget, || drop(expert.forward(&x))))
            };
            let local_ms = local_measure(&expert);
            let local_weights_left_ms = local_measure(&weights_left);
            let local_input_left_ms = local_measure(&input_left);
            let local_small_batch_ms = small_batch.as_ref().map(local_measure);

            // Node and echo take turns in blocks of `BLOCK` consecutive calls, so both see
            // the same machine load while running in their steady state. The first two
            // calls of each block are discarded.
            let passes = node.metrics().forward_passes();
            let pass_seconds = node.metrics().forward_pass_seconds();
            let started = Instant::now();
            let mut blocks = 0;
            while blocks < 2 || (started.elapsed() < options.budget * 2 && blocks < 500) {
                for run in 0..BLOCK {
                    let t = Instant::now();
                    client.forward(&call, None, |_, _| digest).await?;
                    samples.node.push_if(run >= 2, t.elapsed());
                }
                for run in 0..BLOCK {
                    let t = Instant::now();
                    echo.clone().echo(request.clone()).await?;
                    samples.echo.push_if(run >= 2, t.elapsed());
                }
                blocks += 1;
            }
            // The local pool's threads spin for a while after each computation and would
            // take cores from node calls right after, so this phase runs on its own.
            for run in 0..BLOCK * blocks {
                echo.clone().echo(request.clone()).await?;
                let t = Instant::now();
                local_pool.install(|| drop(expert.forward(&x)));
                samples.local_between.push_if(run >= 2, t.elapsed());
            }
            let node_compute_ms = (node.metrics().forward_pass_seconds() - pass_seconds) * 1e3
                / (node.metrics().forward_passes() - passes).max(1) as f64;

            let node_ms = samples.node.median_ms();
            let echo_ms = samples.echo.median_ms();
            let local_between_calls_ms = samples.local_between.median_ms();

            let row = LatencyRow {
                hidden,
                ffn,
                batch,
                local_ms,
                local_weights_left_ms,
                local_input_left_ms,
                local_small_batch_ms,
                local_between_calls_ms,
                node_ms,
                node_compute_ms,
                echo_ms,
                payload_bytes,
            };
            eprintln!(
                "hidden {hidden} ffn {ffn} batch {batch}: local {local_ms:.3} ms, node {node_ms:.3} ms (compute {:.3} ms), echo {echo_ms:.3} ms",
                row.node_compute_ms
            );
            report.latency.push(row);
        }

        let throughput =
            concurrent_throughput(&local_pool, options, &expert, &mut client, &echo, &node).await?;
        eprintln!(
            "hidden {hidden} ffn {ffn}: {} clients reach {:.0} tokens/s, local batch of {} {:.0} tokens/s",
            throughput.clients,
            throughput.node_tokens_per_s,
            throughput.clients,
            throughput.local_batched_tokens_per_s
        );
        report.throughput.push(throughput);
        node.shutdown().await?;
    }
    Ok(report)
}

async fn concurrent_throughput(
    local_pool: &rayon::ThreadPool,
    options: &BenchOptions,
    expert: &expertnet_model::Expert,
    client: &mut NodeClient,
    echo: &EchoServiceClient<Channel>,
    node: &expertnet_node::RunningNode,
) -> anyhow::Result<ThroughputRow> {
    let (model_id, hidden) = (node.model_id(), expert.hidden_size());
    let clients = options.concurrent_clients;
    let x = Tensor::from_vec(
        SplitMix64::new(2).normal_vec(clients * hidden),
        (clients, hidden),
        &Device::Cpu,
    )?;
    let local_ms = local_pool.install(|| {
        measure_sync(options.budget, || {
            let _ = expert.forward(&x);
        })
    });
    let local_batched_tokens_per_s = clients as f64 / (local_ms / 1e3);

    let passes_before = node.metrics().forward_passes();
    let stop_at = Instant::now() + options.concurrent_duration;
    let mut tasks = Vec::with_capacity(clients);
    for index in 0..clients {
        let mut client = client.clone();
        let call = one_token_call(index, model_id, hidden)?;
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            while Instant::now() < stop_at {
                client.forward(&call, None, |_, _| None).await?;
                done += 1;
            }
            Ok::<u64, expertnet_router::ClientError>(done)
        }));
    }

    let node_phase = join_clients(tasks, "request to the node", options).await?;

    // The same clients against the echo service, with a one-token request as payload.
    let stop_at = Instant::now() + options.concurrent_duration;
    let mut tasks = Vec::with_capacity(clients);
    for index in 0..clients {
        let mut echo = echo.clone();
        let request = one_token_call(index, model_id, hidden)?.into_wire();
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            while Instant::now() < stop_at {
                echo.echo(request.clone()).await?;
                done += 1;
            }
            Ok::<u64, tonic::Status>(done)
        }));
    }
    let echo_phase = join_clients(tasks, "echo call", options).await?;

    Ok(ThroughputRow {
        hidden,
        ffn: expert.ffn_size(),
        clients,
        node_tokens_per_s: node_phase.calls as f64 / node_phase.seconds,
        local_batched_tokens_per_s,
        echo_requests_per_s: echo_phase.calls as f64 / echo_phase.seconds,
        node_cores_busy: node_phase.cpu_seconds / node_phase.seconds,
        node_cpu_us_per_token: node_phase.cpu_seconds * 1e6 / node_phase.calls as f64,
        echo_cpu_us_per_request: echo_phase.cpu_seconds * 1e6 / echo_phase.calls as f64,
        forward_passes: node.metrics().forward_passes() - passes_before,
        requests: node_phase.calls,
    })
}

/// What a set of concurrent clients achieved.
struct ClientPhase {
    /// Calls completed.
    calls: u64,
    /// Wall time from when the clients were started.
    seconds: f64,
    /// CPU time of the whole process over the same span.
    cpu_seconds: f64,
}

/// Waits for the client tasks, each returning its completed calls, and measures the wall
/// and CPU time until the last one ends. `what` names one call in the error given when
/// none completed.
async fn join_clients<E>(
    tasks: Vec<tokio::task::JoinHandle<Result<u64, E>>>,
    what: &str,
    options: &BenchOptions,
) -> anyhow::Result<ClientPhase>
where
    E: std::error::Error + Send + Sync + 'static,
{
    let started = Instant::now();
    let cpu_before = process_cpu_seconds();
    let mut calls = 0;
    for task in tasks {
        calls += task.await??;
    }
    let phase = ClientPhase {
        calls,
        seconds: started.elapsed().as_secs_f64(),
        cpu_seconds: process_cpu_seconds() - cpu_before,
    };
    anyhow::ensure!(
        phase.calls > 0,
        "no {what} completed within {:.3} s; use a larger --seconds",
        options.concurrent_duration.as_secs_f64()
    );
    Ok(phase)
}

/// Builds the one-token request of concurrent client `index`.
fn one_token_call(index: usize, model_id: &str, hidden: usize) -> anyhow::Result<ForwardCall> {
    Ok(ForwardCall {
        request_id: RequestId::from_bytes([index as u8; 16]),
        model_id: model_id.to_owned(),
        layer: 0,
        inputs: vec![ExpertInput {
            expert: 0,
            hidden: wire_from_f32(
                &SplitMix64::new(index as u64).normal_vec(hidden),
                &[1, hidden],
                DType::F32,
            )?,
        }],
    })
}

/// Median of repeated runs in milliseconds: three warm-up runs are discarded, then it runs
/// until `budget` has passed, at least 5 and at most 10,000 times.
fn measure_sync(budget: Duration, mut run: impl FnMut()) -> f64 {
    let mut samples = Series::default();
    let started = Instant::now();
    let mut round = 0;
    while round < 8 || (started.elapsed() < budget && round < 10_003) {
        samples.record(round >= 3, &mut run);
        round += 1;
    }
    samples.median_ms()
}

/// Consecutive runs of one variant in the interleaved measurement.
const BLOCK: usize = 10;

/// Durations of one variant.
#[derive(Debug, Default)]
struct Series(Vec<Duration>);

impl Series {
    /// Times `run`, keeping the sample only when `keep` (warm-up runs are discarded).
    fn record(&mut self, keep: bool, run: impl FnOnce()) {
        let started = Instant::now();
        run();
        self.push_if(keep, started.elapsed());
    }

    fn push_if(&mut self, keep: bool, elapsed: Duration) {
        if keep {
            self.0.push(elapsed);
        }
    }

    fn median_ms(&mut self) -> f64 {
        self.0.sort();
        self.0
            .get(self.0.len() / 2)
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
    }
}

#[derive(Debug, Default)]
struct Samples {
    node: Series,
    local_between: Series,
    echo: Series,
}

#[derive(Debug, Default)]
struct Echo;

#[tonic::async_trait]
impl EchoService for Echo {
    async fn echo(
        &self,
        request: tonic::Request<pb::ForwardRequest>,
    ) -> Result<tonic::Response<pb::ForwardRequest>, tonic::Status> {
        Ok(tonic::Response::new(request.into_inner()))
    }
}

/// Starts an echo server on 127.0.0.1 with the node's transport settings (nodelay on the
/// accepted sockets, 8 / 16 MiB windows) and connects to it.
async fn start_echo() -> anyhow::Result<EchoServiceClient<Channel>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let service = EchoServiceServer::new(Echo)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let server = Server::builder()
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(16 << 20)
        .add_service(service);
    // The server lives until the benchmark process exits.
    let _server = tokio::spawn(server.serve_with_incoming(incoming));

    let channel = Endpoint::from_shared(format!("http://{address}"))?
        .tcp_nodelay(true)
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(16 << 20)
        .connect()
        .await?;
    Ok(EchoServiceClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20))
}

/// CPU time this process has used, user and system, in seconds.
fn process_cpu_seconds() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    let seconds = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    getrusage(UsageWho::RUSAGE_SELF).map_or(f64::NAN, |usage| {
        seconds(usage.user_time()) + seconds(usage.system_time())
    })
}
