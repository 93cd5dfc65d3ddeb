//! `expertnet-sim bench generate`: greedy text generation with every MoE layer on nodes
//! on loopback, against the same model with local experts, in one run.

use std::time::Duration;

use expertnet_model::{Checkpoint, Family, GeneratorOptions, Manifest, generate_checkpoint};
use expertnet_router::{
    DiscoveryConfig, GenerateOptions, MoeModel, Router, RouterConfig, generate,
};
use serde::Serialize;

/// One model size to measure.
#[derive(Debug, Clone, Serialize)]
pub struct ModelSize {
    pub layers: usize,
    pub experts: usize,
    pub hidden: usize,
    pub ffn: usize,
}

/// Figures for one model size.
#[derive(Debug, Clone, Serialize)]
pub struct GenerateRow {
    pub size: ModelSize,
    pub nodes: usize,
    pub new_tokens: usize,
    pub local_tokens_per_s: f64,
    pub network_tokens_per_s: f64,
    pub ratio: f64,
    /// Share of the network run's time spent in remote MoE layers.
    pub moe_share: f64,
}

/// Runs the benchmark for each size: `nodes` nodes, each expert on two of them.
///
/// # Errors
/// Any failure to generate a checkpoint, start the nodes or generate.
pub async fn run(
    sizes: &[ModelSize],
    nodes: usize,
    new_tokens: usize,
) -> anyhow::Result<Vec<GenerateRow>> {
    let mut rows = Vec::new();
    for size in sizes {
        anyhow::ensure!(
            size.experts.is_multiple_of(nodes) && nodes >= 2,
            "the experts of each size must be a multiple of --nodes, and --nodes at least 2"
        );
        let dir = tempfile::tempdir()?;
        eprintln!(
            "{} layers of {} experts, hidden {}, ffn {}",
            size.layers, size.experts, size.hidden, size.ffn
        );
        generate_checkpoint(
            dir.path(),
            &GeneratorOptions {
                family: Family::Mixtral,
                layers: size.layers,
                experts: size.experts,
                hidden: size.hidden,
                ffn: size.ffn,
                vocab: 512,
                heads: 8,
                kv_heads: 4,
                ..GeneratorOptions::default()
            },
        )?;

        let specs: Vec<String> = (0..nodes)
            .map(|index| crate::network::block_spec("*", index, nodes, size.experts, 2))
            .collect();
        let (running, bootstrap) = crate::network::start_nodes(dir.path(), &specs, 1).await?;
        let mut config = RouterConfig::new(DiscoveryConfig::new(vec![bootstrap]));
        config.seed = Some(1);
        config.spot_check_rate = 0.0;
        config.deadline = Duration::from_secs(30);
        let router = Router::connect(config).await?;
        let checkpoint = Checkpoint::open(dir.path())?;
        let manifest = Manifest::load(&Manifest::path_in(dir.path()))?;
        wait_for_replicas(&router, &manifest.model_id(), size).await?;

        let remote = MoeModel::remote(&router, &checkpoint, &manifest)?;
        let local = MoeModel::local(&checkpoint)?;
        let prompt = expertnet_model::tokenizer::encode_bytes("Mixture of experts");
        let settings = GenerateOptions {
            max_new_tokens: new_tokens,
            temperature: 0.0,
            seed: 1,
        };
        // Warm up connections, caches and the latency model.
        generate(&remote, &prompt, &settings, |_| {}).await?;
        generate(&local, &prompt, &settings, |_| {}).await?;

        let network = generate(&remote, &prompt, &settings, |_| {}).await?;
        let reference = generate(&local, &prompt, &settings, |_| {}).await?;
        anyhow::ensure!(
            network.tokens == reference.tokens,
            "the network generated other tokens than the local model"
        );
        let network_tps = network.tokens.len() as f64 / network.elapsed.as_secs_f64();
        let local_tps = reference.tokens.len() as f64 / reference.elapsed.as_secs_f64();
        eprintln!("  local {local_tps:.1} tokens/s, network {network_tps:.1} tokens/s");
        rows.push(GenerateRow {
            size: size.clone(),
            nodes,
            new_tokens,
            local_tokens_per_s: local_tps,
            network_tokens_per_s: network_tps,
            ratio: network_tps / local_tps,
            moe_share: network.moe.as_secs_f64() / network.elapsed.as_secs_f64(),
        });
        for node in running {
            node.kill();
        }
    }
    Ok(rows)
}

async fn wait_for_replicas(
    router: &Router,
    model_id: &str,
    size: &ModelSize,
) -> anyhow::Result<()> {
    for _ in 0..150 {
        let mut fewest = usize::MAX;
        for layer in 0..size.layers as u32 {
            let table = router.discovery().resolve_fresh(model_id, layer).await?;
            let least = (0..size.experts as u32)
                .map(|e| table.replicas(e).len())
                .min();
            fewest = fewest.min(least.unwrap_or(0));
        }
        if fewest >= 2 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!("after 30 s discovery does not list two replicas of every expert")
}

/// Formats the rows as a Markdown table.
pub fn to_markdown(rows: &[GenerateRow]) -> String {
    let mut text = String::from(
        "| layers × experts | hidden / ffn | nodes | new tokens | local tok/s | network tok/s | network / local | time in remote MoE |\n|---|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for row in rows {
        text.push_str(&format!(
            "| {} × {} | {} / {} | {} | {} | {:.1} | {:.1} | {:.2} | {:.0}% |\n",
            row.size.layers,
            row.size.experts,
            row.size.hidden,
            row.size.ffn,
            row.nodes,
            row.new_tokens,
            row.local_tokens_per_s,
            row.network_tokens_per_s,
            row.ratio,
            row.moe_share * 100.0
        ));
    }
    text
}
