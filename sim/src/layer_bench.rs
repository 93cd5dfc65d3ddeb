//! `expertnet-sim bench layer`: a whole MoE layer computed by nodes on loopback against
//! the same layer computed in this process.
//!
//! The network layer runs through [`RemoteMoeLayer`]: discovery over the DHT, one request
//! per chosen node, verification of every receipt. Both sides get the same random hidden
//! states, one layer call after another from one client, so the figures are latency-bound
//! tokens per second, not the throughput of many concurrent clients.

use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use ed25519_dalek::SigningKey;
use expertnet_model::rng::SplitMix64;
use expertnet_model::{
    Checkpoint, Family, GeneratorOptions, LocalMoeLayer, Manifest, generate_checkpoint,
};
use expertnet_proto::{Digest, ReceiptBody, RequestId};
use expertnet_router::{DiscoveryConfig, RemoteMoeLayer, Router, RouterConfig};
use serde::Serialize;

/// Options of the layer benchmark.
#[derive(Debug, Clone)]
pub struct LayerBenchOptions {
    pub experts: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub top_k: usize,
    pub nodes: usize,
    /// Nodes that host each expert.
    pub replicas: usize,
    pub batches: Vec<usize>,
    /// Time spent on each measurement.
    pub seconds: f64,
    /// Compute threads per node.
    pub node_threads: usize,
}

impl Default for LayerBenchOptions {
    fn default() -> Self {
        Self {
            experts: 32,
            hidden: 1024,
            ffn: 2816,
            top_k: 2,
            nodes: 4,
            replicas: 2,
            batches: vec![1, 16, 128],
            seconds: 3.0,
            node_threads: 1,
        }
    }
}

/// Figures for one batch size.
#[derive(Debug, Clone, Serialize)]
pub struct LayerRow {
    pub batch: usize,
    pub local_tokens_per_s: f64,
    pub local_p50_ms: f64,
    pub local_p99_ms: f64,
    pub network_tokens_per_s: f64,
    pub network_p50_ms: f64,
    pub network_p99_ms: f64,
    /// Network tokens/s over local tokens/s.
    pub ratio: f64,
    /// Share of the network layer's time the client spent verifying results.
    pub verify_share: f64,
    /// Share of the network layer's time the nodes spent signing receipts, from the
    /// measured cost of one signature and the receipts per call.
    pub sign_share: f64,
    /// Requests per layer call.
    pub requests_per_call: f64,
    pub calls: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerReport {
    pub experts: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub top_k: usize,
    pub nodes: usize,
    pub replicas: usize,
    pub sign_us: f64,
    pub rows: Vec<LayerRow>,
}

impl LayerReport {
    pub fn to_markdown(&self) -> String {
        let mut text = format!(
            "Layer of {} experts (hidden {}, ffn {}), top-{}, {} nodes, {} replicas per expert; one signature costs {:.1} µs.\n\n",
            self.experts,
            self.hidden,
            self.ffn,
            self.top_k,
            self.nodes,
            self.replicas,
            self.sign_us
        );
        text.push_str("| batch | local tok/s | local p50 / p99 ms | network tok/s | network p50 / p99 ms | network / local | verify share | sign share | requests per call |\n");
        text.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for row in &self.rows {
            text.push_str(&format!(
                "| {} | {:.0} | {:.2} / {:.2} | {:.0} | {:.2} / {:.2} | {:.2} | {:.2}% | {:.2}% | {:.1} |\n",
                row.batch,
                row.local_tokens_per_s,
                row.local_p50_ms,
                row.local_p99_ms,
                row.network_tokens_per_s,
                row.network_p50_ms,
                row.network_p99_ms,
                row.ratio,
                row.verify_share * 100.0,
                row.sign_share * 100.0,
                row.requests_per_call,
            ));
        }
        text
    }
}

/// Runs the benchmark.
///
/// # Errors
/// Any failure to generate the checkpoint, start the nodes, or run a layer call.
pub async fn run(options: &LayerBenchOptions) -> anyhow::Result<LayerReport> {
    anyhow::ensure!(
        options.replicas >= 1 && options.replicas <= options.nodes,
        "--replicas must be from 1 to --nodes"
    );
    anyhow::ensure!(
        options.experts.is_multiple_of(options.nodes),
        "--experts must be a multiple of --nodes"
    );
    let dir = tempfile::tempdir()?;
    eprintln!(
        "generating a checkpoint of {} experts of hidden {} and ffn {}",
        options.experts, options.hidden, options.ffn
    );
    generate_checkpoint(
        dir.path(),
        &GeneratorOptions {
            family: Family::Mixtral,
            layers: 1,
            experts: options.experts,
            top_k: options.top_k,
            hidden: options.hidden,
            ffn: options.ffn,
            vocab: 16,
            heads: 8,
            kv_heads: 8,
            ..GeneratorOptions::default()
        },
    )?;

    let specs: Vec<String> = (0..options.nodes)
        .map(|index| {
            crate::network::block_spec("0", index, options.nodes, options.experts, options.replicas)
        })
        .collect();
    let (nodes, bootstrap) =
        crate::network::start_nodes(dir.path(), &specs, options.node_threads).await?;

    let mut config = RouterConfig::new(DiscoveryConfig::new(vec![bootstrap]));
    config.seed = Some(1);
    config.spot_check_rate = 0.0;
    config.deadline = Duration::from_secs(30);
    let router = Router::connect(config).await?;
    let checkpoint = Checkpoint::open(dir.path())?;
    let manifest = Manifest::load(&Manifest::path_in(dir.path()))?;
    let remote = RemoteMoeLayer::new(&router, &checkpoint, &manifest, 0)?;
    wait_for_replicas(&router, &remote, options).await?;
    let local = LocalMoeLayer::load(&checkpoint, 0)?;
    let sign_us = signature_cost_us();

    let mut rows = Vec::new();
    let mut rng = SplitMix64::new(2);
    for &batch in &options.batches {
        let inputs: Vec<Tensor> = (0..8)
            .map(|_| {
                Tensor::from_vec(
                    rng.normal_vec(batch * options.hidden),
                    (batch, options.hidden),
                    &Device::Cpu,
                )
            })
            .collect::<Result<_, _>>()?;

        // Warm both sides up: connections, caches, the latency model.
        for x in &inputs {
            local.forward(x)?;
            remote.forward(x).await?;
        }

        let budget = Duration::from_secs_f64(options.seconds);
        let mut local_times = Vec::new();
        let started = Instant::now();
        while started.elapsed() < budget || local_times.len() < 5 {
            let x = &inputs[local_times.len() % inputs.len()];
            let call = Instant::now();
            local.forward(x)?;
            local_times.push(call.elapsed());
        }
        let local_total = started.elapsed();

        let mut network_times = Vec::new();
        let mut verify = Duration::ZERO;
        let mut requests = 0;
        let mut receipts = 0;
        let started = Instant::now();
        while started.elapsed() < budget || network_times.len() < 5 {
            let x = &inputs[network_times.len() % inputs.len()];
            let call = Instant::now();
            let out = remote.forward(x).await?;
            network_times.push(call.elapsed());
            verify += out.trace.verify;
            requests += out.trace.requests;
            let mut experts: Vec<u32> = out
                .trace
                .tokens
                .iter()
                .flat_map(|t| t.served.iter().map(|e| e.expert))
                .collect();
            experts.sort_unstable();
            experts.dedup();
            receipts += experts.len();
        }
        let network_total = started.elapsed();

        let local_tps = (batch * local_times.len()) as f64 / local_total.as_secs_f64();
        let network_tps = (batch * network_times.len()) as f64 / network_total.as_secs_f64();
        let (local_p50, local_p99) = percentiles(&mut local_times);
        let (network_p50, network_p99) = percentiles(&mut network_times);
        let row = LayerRow {
            batch,
            local_tokens_per_s: local_tps,
            local_p50_ms: local_p50,
            local_p99_ms: local_p99,
            network_tokens_per_s: network_tps,
            network_p50_ms: network_p50,
            network_p99_ms: network_p99,
            ratio: network_tps / local_tps,
            verify_share: verify.as_secs_f64() / network_total.as_secs_f64(),
            sign_share: receipts as f64 * sign_us * 1e-6 / network_total.as_secs_f64(),
            requests_per_call: requests as f64 / network_times.len() as f64,
            calls: network_times.len(),
        };
        eprintln!(
            "batch {batch}: local {local_tps:.0} tok/s, network {network_tps:.0} tok/s ({} calls)",
            row.calls
        );
        rows.push(row);
    }

    for node in nodes {
        node.kill();
    }
    Ok(LayerReport {
        experts: options.experts,
        hidden: options.hidden,
        ffn: options.ffn,
        top_k: options.top_k,
        nodes: options.nodes,
        replicas: options.replicas,
        sign_us,
        rows,
    })
}

/// Waits until discovery lists every expert with all its replicas; at most 30 s.
async fn wait_for_replicas(
    router: &Router,
    layer: &RemoteMoeLayer,
    options: &LayerBenchOptions,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let table = router
            .discovery()
            .resolve_fresh(layer.model_id(), layer.layer())
            .await?;
        let fewest = (0..options.experts as u32)
            .map(|e| table.replicas(e).len())
            .min()
            .unwrap_or(0);
        if fewest >= options.replicas {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(30) {
            anyhow::bail!("after 30 s discovery lists only {fewest} replicas of some expert");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Microseconds one receipt signature takes here, over 2000 signatures.
fn signature_cost_us() -> f64 {
    let key = SigningKey::from_bytes(&[7; 32]);
    let body = ReceiptBody {
        request_id: RequestId::from_bytes([1; 16]),
        model_id: "mixtral-bench".to_owned(),
        layer: 0,
        expert: 0,
        weight_digest: Digest::from_bytes([2; 32]),
        input_digest: Digest::from_bytes([3; 32]),
        output_digest: Digest::from_bytes([4; 32]),
        timestamp_ms: 0,
    };
    let count = 2000;
    let started = Instant::now();
    for _ in 0..count {
        std::hint::black_box(body.clone().sign(&key));
    }
    started.elapsed().as_secs_f64() * 1e6 / f64::from(count)
}

/// p50 and p99 in milliseconds, by nearest rank.
fn percentiles(times: &mut [Duration]) -> (f64, f64) {
    times.sort();
    let at = |q: f64| {
        let rank = ((q * times.len() as f64).ceil() as usize).clamp(1, times.len().max(1));
        times.get(rank - 1).map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    (at(0.50), at(0.99))
}
