//! `expertnet-sim bench dht`: discovery at scale, with real nodes in one process on
//! loopback.
//!
//! For each network size it starts a bootstrap node and the other nodes one after another
//! (joins are staggered: with libp2p 0.57, 100 nodes bootstrapping through one peer at the
//! same moment made most bootstrap queries time out), then measures
//! - cold lookups from a client that has joined the network but never looked up the key:
//!   time to the first provider of a layer key and to the end of the query, and a full
//!   resolve (providers and their node records) through the router's discovery client;
//! - how long after a new node's start its experts are visible from a client;
//! - resident memory per node.

use std::time::{Duration, Instant};

use expertnet_model::{Family, GeneratorOptions, generate_checkpoint};
use expertnet_node::{ExpertSpec, Node, NodeConfig, NodeKey, P2pConfig, RunningNode};
use expertnet_proto::p2p::{self, BehaviourEvent, DhtSettings};
use expertnet_router::{Discovery, DiscoveryConfig};
use futures::StreamExt;
use libp2p::kad::{self, GetProvidersOk};
use libp2p::swarm::SwarmEvent;
use serde::Serialize;

/// Options of the DHT benchmark.
#[derive(Debug, Clone)]
pub struct DhtBenchOptions {
    /// Network sizes, each including the bootstrap node.
    pub sizes: Vec<usize>,
    /// Time between two nodes' starts.
    pub stagger: Duration,
    /// Cold lookups per network size.
    pub lookups: usize,
    /// Joins of a new node whose visibility is timed, per network size.
    pub joins: usize,
}

impl Default for DhtBenchOptions {
    fn default() -> Self {
        Self {
            sizes: vec![20, 100],
            stagger: Duration::from_millis(300),
            lookups: 50,
            joins: 5,
        }
    }
}

/// Figures for one network size, in milliseconds unless named otherwise.
#[derive(Debug, Clone, Serialize)]
pub struct DhtRow {
    pub nodes: usize,
    pub first_provider_p50_ms: f64,
    pub first_provider_p99_ms: f64,
    pub query_done_p50_ms: f64,
    pub query_done_p99_ms: f64,
    pub resolve_p50_ms: f64,
    pub resolve_p99_ms: f64,
    pub visible_after_start_p50_ms: f64,
    pub visible_after_start_max_ms: f64,
    pub memory_per_node_kib: f64,
    /// Wall time to start all nodes, in seconds.
    pub formation_s: f64,
    /// CPU use of the whole settled network, in percent of one core.
    pub settled_cpu_percent: f64,
}

/// Layers of the benchmark checkpoint; nodes spread over them.
const LAYERS: usize = 4;
const EXPERTS: usize = 8;

/// Runs the benchmark.
///
/// # Errors
/// Any failure to generate the checkpoint or start a node or client.
pub async fn run(options: &DhtBenchOptions) -> anyhow::Result<Vec<DhtRow>> {
    let dir = tempfile::tempdir()?;
    let generator = GeneratorOptions {
        family: Family::Mixtral,
        layers: LAYERS,
        experts: EXPERTS,
        hidden: 32,
        ffn: 32,
        vocab: 16,
        heads: 2,
        kv_heads: 2,
        ..GeneratorOptions::default()
    };
    generate_checkpoint(dir.path(), &generator)?;

    let mut rows = Vec::new();
    for &size in &options.sizes {
        rows.push(measure_size(dir.path(), size, options).await?);
    }
    Ok(rows)
}

fn spec_of(index: usize) -> String {
    format!("{}:{}", index % LAYERS, (index / LAYERS) % EXPERTS)
}

async fn start_node(
    dir: &std::path::Path,
    index: usize,
    bootstrap: Vec<libp2p::Multiaddr>,
) -> anyhow::Result<RunningNode> {
    let mut config = NodeConfig::new(dir, spec_of(index).parse::<ExpertSpec>()?);
    config.threads = Some(1);
    config.p2p = Some(P2pConfig {
        bootstrap,
        ..P2pConfig::default()
    });
    Ok(Node::start(config, NodeKey::generate()?).await?)
}

async fn measure_size(
    dir: &std::path::Path,
    size: usize,
    options: &DhtBenchOptions,
) -> anyhow::Result<DhtRow> {
    let memory_before = resident_kib();
    let formation = Instant::now();
    let bootstrap = start_node(dir, 0, Vec::new()).await?;
    let address = bootstrap
        .bootstrap_addr()
        .ok_or_else(|| anyhow::anyhow!("bootstrap has no p2p address"))?;
    let mut nodes = vec![bootstrap];
    for index in 1..size {
        tokio::time::sleep(options.stagger).await;
        nodes.push(start_node(dir, index, vec![address.clone()]).await?);
    }
    let formation_s = formation.elapsed().as_secs_f64();

    // Joining costs CPU on each node and its neighbours (Kademlia bootstrap, first
    // publications). Measurements start once the network has settled, after two
    // consecutive 2 s windows under 50% of one core, or after 60 s.
    let settle = Instant::now();
    let mut calm_windows = 0;
    let mut idle_cpu_percent = f64::NAN;
    while calm_windows < 2 && settle.elapsed() < Duration::from_secs(60) {
        let before = cpu_seconds();
        let window = Instant::now();
        tokio::time::sleep(Duration::from_secs(2)).await;
        idle_cpu_percent = (cpu_seconds() - before) / window.elapsed().as_secs_f64() * 100.0;
        calm_windows = if idle_cpu_percent < 50.0 {
            calm_windows + 1
        } else {
            0
        };
    }
    let memory_per_node_kib = (resident_kib().saturating_sub(memory_before)) as f64 / size as f64;
    eprintln!(
        "{size} nodes started in {formation_s:.1} s, settled {:.0} s later at {idle_cpu_percent:.0}% of one core; {memory_per_node_kib:.0} KiB per node",
        settle.elapsed().as_secs_f64()
    );

    let model_id = nodes[0].model_id().to_owned();
    let mut first_provider = Vec::new();
    let mut query_done = Vec::new();
    let mut resolves = Vec::new();
    for sample in 0..options.lookups {
        let entry = nodes[(sample * 7919) % nodes.len()]
            .bootstrap_addr()
            .unwrap_or_else(|| address.clone());
        let layer = (sample % LAYERS) as u32;
        let shard = (sample as u32 / LAYERS as u32) % p2p::PROVIDER_SHARDS;
        let (first, done) = cold_provider_lookup(&entry, &model_id, layer, shard).await?;
        first_provider.push(first);
        query_done.push(done);

        let discovery = Discovery::start(DiscoveryConfig::new(vec![entry]))?;
        discovery.wait_bootstrapped(Duration::from_secs(10)).await?;
        let started = Instant::now();
        let replicas = discovery.resolve(&model_id, layer).await?;
        resolves.push(started.elapsed());
        if replicas.experts.is_empty() {
            eprintln!("warning: a resolve of layer {layer} found no experts");
        }
    }

    let mut visible = Vec::new();
    let watcher = Discovery::start(DiscoveryConfig::new(vec![address.clone()]))?;
    watcher.wait_bootstrapped(Duration::from_secs(10)).await?;
    for join in 0..options.joins {
        // The new node's expert is also hosted by others; the watcher waits for this
        // node's endpoint among its replicas.
        let index = size + join;
        let started = Instant::now();
        let node = start_node(dir, index, vec![address.clone()]).await?;
        let endpoint = format!("http://{}", node.grpc_addr());
        let layer = (index % LAYERS) as u32;
        let expert = ((index / LAYERS) % EXPERTS) as u32;
        loop {
            let replicas = watcher.resolve_fresh(&model_id, layer).await?;
            if replicas
                .replicas(expert)
                .iter()
                .any(|r| r.endpoints.contains(&endpoint))
            {
                visible.push(started.elapsed());
                break;
            }
            if started.elapsed() > Duration::from_secs(60) {
                let seen: Vec<String> = replicas
                    .replicas(expert)
                    .iter()
                    .map(|r| r.endpoints[0].clone())
                    .collect();
                anyhow::bail!(
                    "a joining node ({endpoint}, {}, layer {layer} expert {expert}) was not visible after 60 s; the watcher saw {seen:?}; node metrics:\n{}",
                    node.key().peer_id(),
                    node.metrics()
                        .encode()
                        .lines()
                        .filter(|l| l.contains("dht_"))
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        nodes.push(node);
    }

    for node in nodes {
        node.kill();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    Ok(DhtRow {
        nodes: size,
        first_provider_p50_ms: percentile_ms(&mut first_provider, 0.5),
        first_provider_p99_ms: percentile_ms(&mut first_provider, 0.99),
        query_done_p50_ms: percentile_ms(&mut query_done, 0.5),
        query_done_p99_ms: percentile_ms(&mut query_done, 0.99),
        resolve_p50_ms: percentile_ms(&mut resolves, 0.5),
        resolve_p99_ms: percentile_ms(&mut resolves, 0.99),
        visible_after_start_p50_ms: percentile_ms(&mut visible, 0.5),
        visible_after_start_max_ms: percentile_ms(&mut visible, 1.0),
        memory_per_node_kib,
        formation_s,
        settled_cpu_percent: idle_cpu_percent,
    })
}

/// Connects a fresh client swarm to `entry`, runs one `get_providers` for one shard of the
/// layer's provider keys and returns the time to the first provider and to the end of the
/// query.
async fn cold_provider_lookup(
    entry: &libp2p::Multiaddr,
    model_id: &str,
    layer: u32,
    shard: u32,
) -> anyhow::Result<(Duration, Duration)> {
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    let mut swarm =
        p2p::build_swarm(&keypair, false, &DhtSettings::default()).map_err(anyhow::Error::msg)?;
    let peer =
        p2p::peer_of(entry).ok_or_else(|| anyhow::anyhow!("entry address has no peer id"))?;
    swarm.behaviour_mut().kad.add_address(&peer, entry.clone());
    swarm.dial(entry.clone())?;

    let deadline = Instant::now() + Duration::from_secs(20);
    while !swarm.is_connected(&peer) {
        anyhow::ensure!(Instant::now() < deadline, "could not connect to {entry}");
        let _ = tokio::time::timeout(Duration::from_millis(50), swarm.select_next_some()).await;
    }

    // Join the network first: the lookup is cold for the key, not for the client.
    let bootstrap = swarm.behaviour_mut().kad.bootstrap()?;
    wait_for_query(&mut swarm, bootstrap, deadline).await?;

    let started = Instant::now();
    let query = swarm
        .behaviour_mut()
        .kad
        .get_providers(p2p::layer_key(model_id, layer, shard));
    let mut first = None;
    loop {
        anyhow::ensure!(Instant::now() < deadline, "provider lookup did not finish");
        let Ok(event) =
            tokio::time::timeout(Duration::from_millis(100), swarm.select_next_some()).await
        else {
            continue;
        };
        if let SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
            id,
            result,
            step,
            ..
        })) = event
        {
            if id != query {
                continue;
            }
            if let kad::QueryResult::GetProviders(Ok(GetProvidersOk::FoundProviders {
                providers,
                ..
            })) = result
                && first.is_none()
                && !providers.is_empty()
            {
                first = Some(started.elapsed());
            }
            if step.last {
                let done = started.elapsed();
                return Ok((first.unwrap_or(done), done));
            }
        }
    }
}

async fn wait_for_query(
    swarm: &mut libp2p::Swarm<p2p::Behaviour>,
    query: kad::QueryId,
    deadline: Instant,
) -> anyhow::Result<()> {
    loop {
        anyhow::ensure!(Instant::now() < deadline, "a DHT query did not finish");
        let Ok(event) =
            tokio::time::timeout(Duration::from_millis(100), swarm.select_next_some()).await
        else {
            continue;
        };
        if let SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
            id,
            step,
            ..
        })) = event
            && id == query
            && step.last
        {
            return Ok(());
        }
    }
}

fn percentile_ms(samples: &mut [Duration], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort();
    let index = ((samples.len() - 1) as f64 * p).round() as usize;
    samples[index].as_secs_f64() * 1e3
}

/// CPU time of this process (user and system) in seconds, from /proc/self/stat (0 where
/// unavailable).
fn cpu_seconds() -> f64 {
    let Ok(text) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name, which is in parentheses and may contain spaces.
    let after = text.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |index: usize| {
        fields
            .get(index)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name; NOTE: assumes
    // 100 clock ticks per second, the Linux default.
    (ticks(11) + ticks(12)) / 100.0
}

/// Resident memory of this process in KiB, from /proc/self/statm (0 where unavailable).
fn resident_kib() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: u64 = text
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // NOTE: assumes 4 KiB pages, the size on x86-64 Linux.
    pages * 4
}

/// Formats the rows as a Markdown table.
pub fn to_markdown(rows: &[DhtRow]) -> String {
    let mut out = String::from(
        "| nodes | first provider p50 / p99 ms | query done p50 / p99 ms | resolve p50 / p99 ms | visible after start p50 / max ms | memory per node KiB | formation s | settled CPU % of a core |\n|---|---|---|---|---|---|---|---|\n",
    );
    for row in rows {
        out.push_str(&format!(
            "| {} | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} / {:.1} | {:.0} / {:.0} | {:.0} | {:.1} | {:.0} |\n",
            row.nodes,
            row.first_provider_p50_ms,
            row.first_provider_p99_ms,
            row.query_done_p50_ms,
            row.query_done_p99_ms,
            row.resolve_p50_ms,
            row.resolve_p99_ms,
            row.visible_after_start_p50_ms,
            row.visible_after_start_max_ms,
            row.memory_per_node_kib,
            row.formation_s,
            row.settled_cpu_percent
        ));
    }
    out
}
