//! Starting a network of real nodes in this process on 127.0.0.1, shared by the
//! benchmarks.

use std::path::Path;

use expertnet_node::{ExpertSpec, Node, NodeConfig, NodeKey, P2pConfig, RunningNode};

/// Returns the `--experts` spec of node `index` of `nodes` under block placement: the
/// experts are cut into `nodes` blocks, and the node hosts `replicas` consecutive blocks
/// from block `index` on, in every MoE layer (`layers` is a spec such as `*` or `0`).
/// Every expert then has `replicas` hosts.
pub fn block_spec(
    layers: &str,
    index: usize,
    nodes: usize,
    experts: usize,
    replicas: usize,
) -> String {
    let block = experts.div_ceil(nodes).max(1);
    let items: Vec<String> = (0..replicas)
        .map(|r| {
            let first = ((index + r) % nodes) * block;
            let last = (first + block - 1).min(experts - 1);
            format!("{layers}:{first}-{last}")
        })
        .collect();
    items.join(",")
}

/// Starts one node per spec on 127.0.0.1 with `threads` compute threads; the first node
/// is the bootstrap peer of the others. Returns the nodes and the bootstrap address.
///
/// # Errors
/// An invalid spec or a node that fails to start.
pub async fn start_nodes(
    checkpoint: &Path,
    specs: &[String],
    threads: usize,
) -> anyhow::Result<(Vec<RunningNode>, libp2p::Multiaddr)> {
    let mut nodes: Vec<RunningNode> = Vec::with_capacity(specs.len());
    for spec in specs {
        let mut config = NodeConfig::new(checkpoint, spec.parse::<ExpertSpec>()?);
        config.threads = Some(threads);
        config.p2p = Some(P2pConfig {
            bootstrap: nodes
                .first()
                .and_then(RunningNode::bootstrap_addr)
                .into_iter()
                .collect(),
            ..P2pConfig::default()
        });
        nodes.push(Node::start(config, NodeKey::generate()?).await?);
    }
    let bootstrap = nodes
        .first()
        .and_then(RunningNode::bootstrap_addr)
        .ok_or_else(|| anyhow::anyhow!("the first node has no p2p address"))?;
    Ok((nodes, bootstrap))
}
