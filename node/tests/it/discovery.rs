//! Discovery with real libp2p swarms on 127.0.0.1: nodes announce, clients resolve.
//!
//! Timing bounds here are far above the expected times (about a second for a lookup, a
//! few seconds for expiry), so a loaded machine does not fail them.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use expertnet_node::{ExpertSpec, Node, NodeConfig, NodeKey, P2pConfig, RunningNode};
use expertnet_proto::DType;
use expertnet_proto::p2p::DhtSettings;
use expertnet_router::{Discovery, DiscoveryConfig, LayerReplicas};
use futures::StreamExt;
use libp2p::Multiaddr;

use crate::common;

/// Settings that make expiry observable within seconds.
fn fast_p2p(bootstrap: Vec<Multiaddr>) -> P2pConfig {
    P2pConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        bootstrap,
        republish_interval: Duration::from_secs(1),
        dht: DhtSettings {
            record_ttl: Duration::from_secs(3),
            query_timeout: Duration::from_secs(5),
            ..DhtSettings::default()
        },
        ..P2pConfig::default()
    }
}

async fn start_node(dir: &Path, spec: &str, key: NodeKey, p2p: P2pConfig) -> RunningNode {
    let mut config = NodeConfig::new(dir, spec.parse::<ExpertSpec>().unwrap());
    config.threads = Some(1);
    config.p2p = Some(p2p);
    Node::start(config, key).await.unwrap()
}

fn client(bootstrap: Multiaddr) -> Discovery {
    let mut config = DiscoveryConfig::new(vec![bootstrap]);
    config.cache_ttl = Duration::from_secs(1);
    config.lookup_timeout = Duration::from_secs(5);
    Discovery::start(config).unwrap()
}

/// The `(layer, expert)` pairs and their replica endpoints a client sees for `layers`.
async fn visible(
    discovery: &Discovery,
    model_id: &str,
    layers: &[u32],
) -> BTreeSet<(u32, u32, String)> {
    let mut seen = BTreeSet::new();
    for &layer in layers {
        let replicas: std::sync::Arc<LayerReplicas> =
            discovery.resolve_fresh(model_id, layer).await.unwrap();
        for (&expert, list) in &replicas.experts {
            for replica in list {
                seen.insert((layer, expert, replica.endpoints[0].clone()));
            }
        }
    }
    seen
}

/// The `(layer, expert, endpoint)` triples a node hosting `spec` of the checkpoint in
/// `dir` should be resolvable as.
fn expected_pairs(dir: &Path, node: &RunningNode, spec: &str) -> BTreeSet<(u32, u32, String)> {
    let checkpoint = expertnet_model::Checkpoint::open(dir).unwrap();
    spec.parse::<ExpertSpec>()
        .unwrap()
        .resolve(checkpoint.config())
        .unwrap()
        .into_iter()
        .map(|(layer, expert)| (layer, expert, format!("http://{}", node.grpc_addr())))
        .collect()
}

/// Polls `check` every 100 ms until it returns true or `bound` passes; returns the time
/// it took, or `None`.
async fn wait_until<F, Fut>(bound: Duration, mut check: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while started.elapsed() < bound {
        if check().await {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

fn checkpoint_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    common::checkpoint(dir.path(), DType::F32);
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lone_node_announces_without_hanging() {
    let dir = checkpoint_dir();
    let started = Instant::now();
    let node = start_node(
        dir.path(),
        "0:0-1",
        NodeKey::generate().unwrap(),
        fast_p2p(Vec::new()),
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "start took {:?}",
        started.elapsed()
    );

    // A client that knows only this node finds its experts in the node's own store.
    let discovery = client(node.bootstrap_addr().unwrap());
    discovery
        .wait_bootstrapped(Duration::from_secs(20))
        .await
        .unwrap();
    let expected = expected_pairs(dir.path(), &node, "0:0-1");
    let found = wait_until(Duration::from_secs(20), || async {
        visible(&discovery, node.model_id(), &[0]).await == expected
    })
    .await;
    assert!(
        found.is_some(),
        "the lone node's experts were never resolvable"
    );

    let stopping = Instant::now();
    node.shutdown().await.unwrap();
    assert!(
        stopping.elapsed() < Duration::from_secs(20),
        "shutdown took {:?}",
        stopping.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_find_each_other() {
    let dir = checkpoint_dir();
    let first = start_node(
        dir.path(),
        "0:*",
        NodeKey::generate().unwrap(),
        fast_p2p(Vec::new()),
    )
    .await;
    let second = start_node(
        dir.path(),
        "1:*",
        NodeKey::generate().unwrap(),
        fast_p2p(vec![first.bootstrap_addr().unwrap()]),
    )
    .await;

    let model_id = first.model_id().to_owned();
    for (entry, other, spec, layer) in [(&first, &second, "1:*", 1), (&second, &first, "0:*", 0)] {
        let discovery = client(entry.bootstrap_addr().unwrap());
        let expected = expected_pairs(dir.path(), other, spec);
        let found = wait_until(Duration::from_secs(20), || async {
            visible(&discovery, &model_id, &[layer]).await == expected
        })
        .await;
        assert!(
            found.is_some(),
            "a client entering at {} never saw the other node",
            entry.grpc_addr()
        );
    }
    first.shutdown().await.unwrap();
    second.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_simultaneous_announcements_are_all_found() {
    let dir = checkpoint_dir();
    let bootstrap = start_node(
        dir.path(),
        "0:0",
        NodeKey::generate().unwrap(),
        fast_p2p(Vec::new()),
    )
    .await;
    let address = bootstrap.bootstrap_addr().unwrap();

    let starts = (0..3).map(|_| {
        start_node(
            dir.path(),
            "1:3",
            NodeKey::generate().unwrap(),
            fast_p2p(vec![address.clone()]),
        )
    });
    let nodes = futures::future::join_all(starts).await;
    let expected: BTreeSet<String> = nodes
        .iter()
        .map(|n| format!("http://{}", n.grpc_addr()))
        .collect();

    let discovery = client(address);
    let model_id = bootstrap.model_id().to_owned();
    let found = wait_until(Duration::from_secs(20), || async {
        let replicas = discovery.resolve_fresh(&model_id, 1).await.unwrap();
        let endpoints: BTreeSet<String> = replicas
            .replicas(3)
            .iter()
            .map(|r| r.endpoints[0].clone())
            .collect();
        endpoints == expected
    })
    .await;
    assert!(found.is_some(), "lookups never returned all three replicas");

    for node in nodes {
        node.shutdown().await.unwrap();
    }
    bootstrap.shutdown().await.unwrap();
}

/// The expert hosted by node `index` of the ten, so that together they cover all 8
/// experts of the test checkpoint's 2 layers, two of them twice.
fn spec_of(index: usize) -> String {
    format!("{}:{}", index % 2, (index / 2) % 4)
}

/// Starts ten nodes joining through `bootstrap`, staggered so they do not all query the
/// bootstrap node at the same instant.
async fn start_ten(dir: &Path, bootstrap: &Multiaddr) -> Vec<RunningNode> {
    let mut nodes = Vec::new();
    for index in 0..10 {
        let node = start_node(
            dir,
            &spec_of(index),
            NodeKey::generate().unwrap(),
            fast_p2p(vec![bootstrap.clone()]),
        )
        .await;
        nodes.push(node);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    nodes
}

/// Asserts that from every node as entry point, every node's experts resolve, and those
/// of the bootstrap node, which hosts `0:0`.
async fn assert_all_resolvable(
    dir: &Path,
    bootstrap: &RunningNode,
    nodes: &[RunningNode],
    bound: Duration,
) -> Duration {
    let model_id = nodes[0].model_id().to_owned();
    let mut expected: BTreeSet<(u32, u32, String)> = nodes
        .iter()
        .enumerate()
        .flat_map(|(index, node)| expected_pairs(dir, node, &spec_of(index)))
        .collect();
    expected.extend(expected_pairs(dir, bootstrap, "0:0"));

    let started = Instant::now();
    for entry in nodes {
        let discovery = client(entry.bootstrap_addr().unwrap());
        let found = wait_until(bound, || async {
            visible(&discovery, &model_id, &[0, 1]).await == expected
        })
        .await;

        assert!(
            found.is_some(),
            "entering at {}, not every expert was resolvable within {bound:?}",
            entry.grpc_addr()
        );
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_and_ten_nodes_resolve_everything() {
    let dir = checkpoint_dir();
    let bootstrap = start_node(
        dir.path(),
        "0:0",
        NodeKey::generate().unwrap(),
        fast_p2p(Vec::new()),
    )
    .await;
    let nodes = start_ten(dir.path(), &bootstrap.bootstrap_addr().unwrap()).await;

    // Expected: about a second in all; the bound is 30 s per entry point.
    assert_all_resolvable(dir.path(), &bootstrap, &nodes, Duration::from_secs(30)).await;

    for node in nodes {
        node.shutdown().await.unwrap();
    }
    bootstrap.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_bootstrap_is_joined() {
    let dir = checkpoint_dir();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let bootstrap_key = NodeKey::generate().unwrap();
    let address: Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}/p2p/{}", bootstrap_key.peer_id())
        .parse()
        .unwrap();

    let nodes = start_ten(dir.path(), &address).await;
    tokio::time::sleep(Duration::from_secs(5)).await;

    let mut p2p = fast_p2p(Vec::new());
    p2p.listen = vec![format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap()];
    let bootstrap = start_node(dir.path(), "0:0", bootstrap_key, p2p).await;

    // The nodes retry the bootstrap peer with backoff capped at 10 s.
    assert_all_resolvable(dir.path(), &bootstrap, &nodes, Duration::from_secs(40)).await;

    for node in nodes {
        node.shutdown().await.unwrap();
    }
    bootstrap.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_replaces_its_endpoint() {
    let dir = checkpoint_dir();
    let bootstrap = start_node(
        dir.path(),
        "0:0",
        NodeKey::generate().unwrap(),
        fast_p2p(Vec::new()),
    )
    .await;
    let address = bootstrap.bootstrap_addr().unwrap();
    let key = NodeKey::generate().unwrap();

    let before = start_node(
        dir.path(),
        "1:3",
        key.clone(),
        fast_p2p(vec![address.clone()]),
    )
    .await;
    let old_endpoint = format!("http://{}", before.grpc_addr());
    let discovery = client(address.clone());
    let model_id = bootstrap.model_id().to_owned();
    let endpoints_of_expert_3 = || async {
        let replicas = discovery.resolve_fresh(&model_id, 1).await.unwrap();
        replicas
            .replicas(3)
            .iter()
            .map(|r| r.endpoints[0].clone())
            .collect::<Vec<_>>()
    };
    let seen = wait_until(Duration::from_secs(20), || async {
        endpoints_of_expert_3().await == vec![old_endpoint.clone()]
    })
    .await;
    assert!(seen.is_some(), "the node was never resolvable");

    before.kill();
    let after = start_node(dir.path(), "1:3", key, fast_p2p(vec![address])).await;
    let new_endpoint = format!("http://{}", after.grpc_addr());
    assert_ne!(new_endpoint, old_endpoint);
    let replaced = wait_until(Duration::from_secs(20), || async {
        endpoints_of_expert_3().await == vec![new_endpoint.clone()]
    })
    .await;
    assert!(
        replaced.is_some(),
        "the restarted node's new endpoint never replaced the old one"
    );

    after.shutdown().await.unwrap();
    bootstrap.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdrawn_node_disappears_at_once() {
    let dir = checkpoint_dir();
    let bootstrap = start_node(
        dir.path(),
        "0:0",
        NodeKey::generate().unwrap(),
        fast_p2p(Vec::new()),
    )
    .await;
    let address = bootstrap.bootstrap_addr().unwrap();
    let node = start_node(
        dir.path(),
        "1:2",
        NodeKey::generate().unwrap(),
        fast_p2p(vec![address.clone()]),
    )
    .await;

    let discovery = client(address);
    let model_id = bootstrap.model_id().to_owned();
    let count = || async {
        discovery
            .resolve_fresh(&model_id, 1)
            .await
            .unwrap()
            .replicas(2)
            .len()
    };
    assert!(
        wait_until(Duration::from_secs(20), || async { count().await == 1 })
            .await
            .is_some()
    );

    // A graceful shutdown publishes a withdrawn record, which supersedes the live one
    // before any TTL runs out.
    node.shutdown().await.unwrap();
    let gone = wait_until(Duration::from_secs(20), || async { count().await == 0 }).await;
    assert!(gone.is_some(), "the withdrawn node stayed visible");
    bootstrap.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_expires_and_live_node_stays() {
    use crate::daemon::{Daemon, grpc_address, node_command};
    use nix::sys::signal::Signal;

    let dir = checkpoint_dir();
    let bootstrap = start_node(
        dir.path(),
        "0:0",
        NodeKey::generate().unwrap(),
        fast_p2p(Vec::new()),
    )
    .await;
    let address = bootstrap.bootstrap_addr().unwrap();
    let live = start_node(
        dir.path(),
        "1:0",
        NodeKey::generate().unwrap(),
        fast_p2p(vec![address.clone()]),
    )
    .await;

    // The victim runs in its own process, so it can be killed with SIGKILL. Record TTL 3 s,
    // republished every second, as for the in-process nodes.
    let mut command = node_command();
    command.args([
        "run",
        "--experts",
        "1:1",
        "--grpc-listen",
        "127.0.0.1:0",
        "--p2p-listen",
        "/ip4/127.0.0.1/tcp/0",
    ]);
    command.args(["--record-ttl", "3", "--republish-interval", "1"]);
    command
        .arg("--checkpoint")
        .arg(dir.path())
        .arg("--key")
        .arg(dir.path().join("victim.key"));
    command.arg("--bootstrap").arg(address.to_string());
    let victim = Daemon::spawn(&mut command);
    let victim_endpoint = format!(
        "http://{}",
        grpc_address(&victim.wait_for("node is serving"))
    );

    let discovery = client(address);
    let model_id = bootstrap.model_id().to_owned();
    let layer_one = || async {
        let replicas = discovery.resolve_fresh(&model_id, 1).await.unwrap();
        let endpoints = |expert| -> Vec<String> {
            replicas
                .replicas(expert)
                .iter()
                .map(|r| r.endpoints[0].clone())
                .collect()
        };
        (endpoints(0), endpoints(1))
    };
    let visible = wait_until(Duration::from_secs(30), || async {
        layer_one().await.1 == vec![victim_endpoint.clone()]
    })
    .await;
    assert!(visible.is_some(), "the victim was never resolvable");

    victim.signal(Signal::SIGKILL);
    let killed_at = Instant::now();

    // For more than three TTLs: the victim must vanish (expected within TTL + republish
    // interval + client cache TTL, 5 s), while the live node must be present in every
    // lookup.
    let live_endpoint = format!("http://{}", live.grpc_addr());
    let mut gone_after = None;
    while killed_at.elapsed() < Duration::from_secs(12) {
        let (live_replicas, victim_replicas) = layer_one().await;
        assert_eq!(
            live_replicas,
            vec![live_endpoint.clone()],
            "the live node lapsed after {:?}",
            killed_at.elapsed()
        );
        if victim_replicas.is_empty() && gone_after.is_none() {
            gone_after = Some(killed_at.elapsed());
        }
        if !victim_replicas.is_empty() {
            gone_after = None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let gone_after = gone_after.expect("the killed node was still resolvable 12 s after SIGKILL");
    assert!(
        gone_after < Duration::from_secs(10),
        "the killed node took {gone_after:?} to disappear"
    );
    eprintln!("killed node disappeared from lookups after {gone_after:?}");

    let _ = victim.wait_exit();
    live.shutdown().await.unwrap();
    bootstrap.shutdown().await.unwrap();
}

/// A peer that speaks the protocol but publishes invalid records.
struct Rogue {
    swarm: libp2p::Swarm<expertnet_proto::p2p::Behaviour>,
    keypair: libp2p::identity::Keypair,
}

impl Rogue {
    async fn connect(node: &RunningNode) -> Self {
        let keypair = libp2p::identity::Keypair::generate_ed25519();
        let mut swarm =
            expertnet_proto::p2p::build_swarm(&keypair, true, &DhtSettings::default()).unwrap();
        swarm
            .listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap())
            .unwrap();
        // Announce the listen address, so that peers can route lookups to this one.
        loop {
            if let libp2p::swarm::SwarmEvent::NewListenAddr { address, .. } =
                swarm.select_next_some().await
            {
                swarm.add_external_address(address);
                break;
            }
        }
        let node_peer = node.key().peer_id();
        let address = node.bootstrap_addr().unwrap();
        swarm
            .behaviour_mut()
            .kad
            .add_address(&node_peer, address.clone());
        swarm.dial(address).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !swarm.is_connected(&node_peer) {
            assert!(
                Instant::now() < deadline,
                "the rogue peer could not connect"
            );
            let _ =
                tokio::time::timeout(Duration::from_millis(100), swarm.select_next_some()).await;
        }
        Self { swarm, keypair }
    }

    fn peer_id(&self) -> libp2p::PeerId {
        self.keypair.public().to_peer_id()
    }

    /// A record of this peer that passes every check, for the tests to break.
    fn record(&self, model_id: &str) -> expertnet_proto::p2p::NodeRecord {
        let now = expertnet_proto::p2p::unix_millis();
        expertnet_proto::p2p::NodeRecord {
            peer_id: self.peer_id(),
            grpc_endpoints: vec!["http://127.0.0.1:9".to_owned()],
            p2p_addrs: Vec::new(),
            model_id: model_id.to_owned(),
            layers: vec![expertnet_proto::LayerExperts::from_experts(0, [0])],
            capacity_tokens: 1,
            load_tokens: 0,
            version: "0".to_owned(),
            sequence: now,
            timestamp_ms: now,
            limits: expertnet_proto::p2p::NodeLimits::default(),
            withdrawn: false,
        }
    }

    /// Sends `value` as this peer's node record to `target` only, and drives the swarm
    /// until the request is answered.
    async fn put_to(&mut self, target: libp2p::PeerId, value: Vec<u8>) {
        use libp2p::kad;

        let record = kad::Record::new(
            expertnet_proto::p2p::node_record_key(&self.peer_id()),
            value,
        );
        let query = self.swarm.behaviour_mut().kad.put_record_to(
            record,
            std::iter::once(target),
            kad::Quorum::One,
        );
        self.drive_until(query).await;
    }

    /// Stores `value` as this peer's node record in its own store, provides layer 0 so
    /// that clients looking up layer 0 fetch the record from this peer, and keeps
    /// answering the network in a task of its own. A peer that stops being polled would
    /// stall other peers' queries until they time out.
    fn serve(mut self, model_id: &str, value: Vec<u8>) -> tokio::task::JoinHandle<()> {
        use libp2p::kad::{self, store::RecordStore};

        let record = kad::Record::new(
            expertnet_proto::p2p::node_record_key(&self.peer_id()),
            value,
        );
        self.swarm
            .behaviour_mut()
            .kad
            .store_mut()
            .put(record)
            .unwrap();
        let key = expertnet_proto::p2p::layer_key(
            model_id,
            0,
            expertnet_proto::p2p::provider_shard(&self.peer_id()),
        );
        self.swarm.behaviour_mut().kad.start_providing(key).unwrap();
        tokio::spawn(async move {
            loop {
                self.swarm.select_next_some().await;
            }
        })
    }

    async fn drive_until(&mut self, query: libp2p::kad::QueryId) {
        use expertnet_proto::p2p::BehaviourEvent;
        use libp2p::kad;
        use libp2p::swarm::SwarmEvent;

        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(
                Instant::now() < deadline,
                "the rogue's query did not finish"
            );
            let Ok(event) =
                tokio::time::timeout(Duration::from_millis(100), self.swarm.select_next_some())
                    .await
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
                return;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_records_are_rejected() {
    let dir = checkpoint_dir();
    let node = start_node(
        dir.path(),
        "0:0",
        NodeKey::generate().unwrap(),
        fast_p2p(Vec::new()),
    )
    .await;
    let model_id = node.model_id().to_owned();
    let node_peer = node.key().peer_id();

    // The node rejects each invalid record sent to it, and counts why.
    let mut rogue = Rogue::connect(&node).await;
    let stranger = libp2p::identity::Keypair::generate_ed25519();
    let forged = rogue.record(&model_id).sign(&stranger).unwrap();
    let mut future = rogue.record(&model_id);
    future.timestamp_ms += 3_600_000;
    let future = future.sign(&rogue.keypair).unwrap();
    let oversized = vec![7u8; expertnet_proto::p2p::MAX_NODE_RECORD_BYTES + 1];
    rogue.put_to(node_peer, forged.clone()).await;
    rogue.put_to(node_peer, future.clone()).await;
    rogue.put_to(node_peer, oversized).await;

    let metrics = node.metrics();
    let counted = wait_until(Duration::from_secs(10), || async {
        metrics.rejected_records("bad_signature") == 1
            && metrics.rejected_records("future_timestamp") == 1
            && metrics.rejected_records("too_large") == 1
    })
    .await;
    assert!(counted.is_some(), "node counters: {}", metrics.encode());

    // A peer that is no longer polled would stall the lookups below until they time out.
    drop(rogue);

    // A client rejects the same records when a peer serves them directly.
    let forger = Rogue::connect(&node).await;
    let forged = forger.record(&model_id).sign(&stranger).unwrap();
    let forger = forger.serve(&model_id, forged);
    let time_traveller = Rogue::connect(&node).await;
    let mut future = time_traveller.record(&model_id);
    future.timestamp_ms += 3_600_000;
    let future = future.sign(&time_traveller.keypair).unwrap();
    let time_traveller = time_traveller.serve(&model_id, future);

    let discovery = client(node.bootstrap_addr().unwrap());
    let stats = discovery.stats();
    let rejected_both = wait_until(Duration::from_secs(20), || async {
        let replicas = discovery.resolve_fresh(&model_id, 0).await.unwrap();
        let endpoints: Vec<String> = replicas
            .replicas(0)
            .iter()
            .map(|r| r.endpoints[0].clone())
            .collect();
        assert_eq!(
            endpoints,
            vec![format!("http://{}", node.grpc_addr())],
            "an invalid record was accepted"
        );
        stats.rejected("bad_signature") >= 1 && stats.rejected("future_timestamp") >= 1
    })
    .await;
    assert!(
        rejected_both.is_some(),
        "the client never fetched both invalid records"
    );

    forger.abort();
    time_traveller.abort();
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_join_over_quic() {
    let dir = checkpoint_dir();
    let quic = |bootstrap| P2pConfig {
        listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()],
        ..fast_p2p(bootstrap)
    };
    let first = start_node(
        dir.path(),
        "0:0",
        NodeKey::generate().unwrap(),
        quic(Vec::new()),
    )
    .await;
    let address = first.bootstrap_addr().unwrap();
    assert!(address.to_string().contains("/quic-v1/"), "{address}");
    let second = start_node(
        dir.path(),
        "1:1",
        NodeKey::generate().unwrap(),
        quic(vec![address.clone()]),
    )
    .await;

    let discovery = client(address);
    let expected = expected_pairs(dir.path(), &second, "1:1");
    let found = wait_until(Duration::from_secs(20), || async {
        visible(&discovery, first.model_id(), &[1]).await == expected
    })
    .await;
    assert!(
        found.is_some(),
        "the second node was never resolvable over QUIC"
    );
    second.shutdown().await.unwrap();
    first.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reported_failure_drops_the_replica_at_once() {
    let dir = checkpoint_dir();
    let first = start_node(
        dir.path(),
        "0:2",
        NodeKey::generate().unwrap(),
        fast_p2p(Vec::new()),
    )
    .await;
    let address = first.bootstrap_addr().unwrap();
    let second = start_node(
        dir.path(),
        "0:2",
        NodeKey::generate().unwrap(),
        fast_p2p(vec![address.clone()]),
    )
    .await;

    let mut config = DiscoveryConfig::new(vec![address]);
    // A long cache TTL, so only the failure report can change the answer.
    config.cache_ttl = Duration::from_secs(600);
    let discovery = Discovery::start(config).unwrap();
    let model_id = first.model_id().to_owned();
    let both = wait_until(Duration::from_secs(20), || async {
        discovery
            .resolve_fresh(&model_id, 0)
            .await
            .unwrap()
            .replicas(2)
            .len()
            == 2
    })
    .await;
    assert!(both.is_some(), "both replicas were never resolvable");

    discovery.report_failure(second.key().peer_id());
    let replicas = discovery.resolve(&model_id, 0).await.unwrap();
    let peers: Vec<_> = replicas.replicas(2).iter().map(|r| r.peer_id).collect();
    assert_eq!(peers, vec![first.key().peer_id()]);
    assert!(
        discovery.stats().cache_hits() >= 1,
        "the answer did not come from the cache"
    );

    second.shutdown().await.unwrap();
    first.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_p2p_port_is_reported() {
    let dir = checkpoint_dir();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let on_port = || P2pConfig {
        listen: vec![format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap()],
        ..fast_p2p(Vec::new())
    };
    let first = start_node(dir.path(), "0:0", NodeKey::generate().unwrap(), on_port()).await;

    // libp2p binds with SO_REUSEPORT; the node must still refuse to share the port.
    let mut config = NodeConfig::new(dir.path(), "0:1".parse::<ExpertSpec>().unwrap());
    config.p2p = Some(on_port());
    let error = Node::start(config, NodeKey::generate().unwrap())
        .await
        .expect_err("a second node on the same port must not start")
        .to_string();
    assert!(
        error.contains(&format!("/ip4/127.0.0.1/tcp/{port}")),
        "{error}"
    );
    assert!(error.contains("choose another port"), "{error}");
    first.shutdown().await.unwrap();
}
