//! `RemoteMoeLayer` against real nodes: libp2p discovery and gRPC on 127.0.0.1.

use std::path::Path;
use std::time::Duration;

use candle_core::{Device, Tensor};
use expertnet_model::rng::SplitMix64;
use expertnet_model::{Checkpoint, GeneratorOptions, Manifest, generate_checkpoint};
use expertnet_node::{ExpertSpec, FaultConfig, Node, NodeConfig, NodeKey, P2pConfig, RunningNode};
use expertnet_router::policy::{CallError, PeerPolicy};
use expertnet_router::{
    DiscoveryConfig, LayerError, LocalMoeLayer, RemoteMoeLayer, Router, RouterConfig,
};
use libp2p::PeerId;

const LAYER: u32 = 1;
const HIDDEN: usize = 32;
const EXPERTS: u32 = 8;

fn options() -> GeneratorOptions {
    GeneratorOptions {
        layers: 2,
        experts: EXPERTS as usize,
        top_k: 2,
        hidden: HIDDEN,
        ffn: 48,
        vocab: 16,
        ..GeneratorOptions::default()
    }
}

/// Starts one node per spec on 127.0.0.1 over the checkpoint in `dir`, each with its
/// faults; the first node is the bootstrap peer of the others.
pub(crate) async fn start_nodes(
    dir: &Path,
    specs: &[(&str, FaultConfig)],
) -> (Vec<Option<RunningNode>>, libp2p::Multiaddr) {
    let mut nodes = Vec::new();
    let mut bootstrap = None;
    for (spec, faults) in specs {
        let mut config = NodeConfig::new(dir, spec.parse::<ExpertSpec>().unwrap());
        config.threads = Some(1);
        config.faults = faults.clone();
        config.p2p = Some(P2pConfig {
            bootstrap: bootstrap.iter().cloned().collect(),
            ..P2pConfig::default()
        });
        let node = Node::start(config, NodeKey::generate().unwrap())
            .await
            .unwrap();
        if bootstrap.is_none() {
            bootstrap = node.bootstrap_addr();
        }
        nodes.push(Some(node));
    }
    (nodes, bootstrap.unwrap())
}

/// Nodes on 127.0.0.1 joined into one network, the first one the bootstrap peer.
struct Network {
    dir: tempfile::TempDir,
    nodes: Vec<Option<RunningNode>>,
    bootstrap: libp2p::Multiaddr,
}

impl Network {
    /// Starts one node per spec, each with the given faults.
    async fn start(specs: &[(&str, FaultConfig)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        generate_checkpoint(dir.path(), &options()).unwrap();
        let (nodes, bootstrap) = start_nodes(dir.path(), specs).await;
        Self {
            dir,
            nodes,
            bootstrap,
        }
    }

    fn checkpoint(&self) -> &Path {
        self.dir.path()
    }

    fn node(&self, index: usize) -> &RunningNode {
        self.nodes[index].as_ref().unwrap()
    }

    fn peer(&self, index: usize) -> PeerId {
        self.node(index).key().peer_id()
    }

    fn kill(&mut self, index: usize) {
        self.nodes[index].take().unwrap().kill();
    }

    /// Returns a router config with deterministic replica choice: no exploration, a
    /// fixed seed.
    fn config(&self) -> RouterConfig {
        let mut config = RouterConfig::new(DiscoveryConfig::new(vec![self.bootstrap.clone()]));
        config.seed = Some(7);
        config.peers = PeerPolicy {
            exploration: 0.0,
            ..PeerPolicy::default()
        };
        config.spot_check_rate = 0.0;
        config.deadline = Duration::from_secs(20);
        config
    }

    /// Connects a router and waits until discovery lists `replicas` replicas of every
    /// expert of the layer.
    async fn layer(&self, config: RouterConfig, replicas: usize) -> (Router, RemoteMoeLayer) {
        let router = Router::connect(config).await.unwrap();
        let checkpoint = Checkpoint::open(self.checkpoint()).unwrap();
        let manifest = Manifest::load(&Manifest::path_in(self.checkpoint())).unwrap();
        let layer = RemoteMoeLayer::new(&router, &checkpoint, &manifest, LAYER).unwrap();
        let mut found = 0;
        for _ in 0..80 {
            let table = router
                .discovery()
                .resolve_fresh(layer.model_id(), LAYER)
                .await
                .unwrap();
            found = (0..EXPERTS)
                .map(|e| table.replicas(e).len())
                .min()
                .unwrap_or(0);
            if found >= replicas {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert!(
            found >= replicas,
            "discovery found {found} replicas per expert, expected {replicas}"
        );
        (router, layer)
    }

    fn local(&self) -> LocalMoeLayer {
        LocalMoeLayer::load(&Checkpoint::open(self.checkpoint()).unwrap(), LAYER).unwrap()
    }

    async fn stop(mut self) {
        for node in self.nodes.iter_mut().filter_map(Option::take) {
            node.kill();
        }
    }
}

fn faults(text: &str) -> FaultConfig {
    let mut faults = FaultConfig::default();
    for part in text.split(',').filter(|p| !p.is_empty()) {
        faults.apply(part).unwrap();
    }
    faults
}

fn hidden(tokens: usize, seed: u64) -> Tensor {
    let mut rng = SplitMix64::new(seed);
    Tensor::from_vec(
        rng.normal_vec(tokens * HIDDEN),
        (tokens, HIDDEN),
        &Device::Cpu,
    )
    .unwrap()
}

/// Per row, max |remote - local| / max |local|.
fn max_error(remote: &Tensor, local: &Tensor) -> f32 {
    expertnet_model::max_row_relative_error(remote, local).unwrap()
}

/// Returns which of two unmeasured nodes the router tries first: with no exploration,
/// ties go to the lower peer id.
fn preferred(network: &Network, a: usize, b: usize) -> (usize, usize) {
    if network.peer(a) < network.peer(b) {
        (a, b)
    } else {
        (b, a)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_layer_equals_the_local_layer() {
    let network = Network::start(&[
        ("1:0-3", FaultConfig::default()),
        ("1:4-7", FaultConfig::default()),
        ("1:*", FaultConfig::default()),
    ])
    .await;
    let (router, layer) = network.layer(network.config(), 2).await;
    let local = network.local();

    for (tokens, seed) in [(1, 1), (7, 2), (128, 3)] {
        let x = hidden(tokens, seed);
        let out = layer.forward(&x).await.unwrap();
        let expected = local.forward(&x).unwrap();
        let error = max_error(&out.output, &expected);
        assert!(error < 1e-5, "{tokens} tokens: max relative error {error}");

        assert_eq!(out.trace.tokens.len(), tokens);
        for token in &out.trace.tokens {
            assert_eq!(token.served.len(), 2, "{token:?}");
            assert!(!token.fell_back());
            let sum: f32 = token.served.iter().map(|e| e.weight).sum();
            assert!((sum - 1.0).abs() < 1e-5, "weights sum to {sum}");
        }
        // One RPC per node at most, hedges aside: experts are grouped per chosen node.
        let planned = out.trace.requests - out.trace.hedges;
        assert!(planned <= 3, "{planned} requests besides hedges");
    }
    assert_eq!(
        router.stats().failure_counts().len(),
        0,
        "{:?}",
        router.stats().failure_counts()
    );
    network.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_survives_node_killed_mid_call() {
    let mut network = Network::start(&[
        ("1:*", FaultConfig::default()),
        ("1:*", FaultConfig::default()),
    ])
    .await;
    let (first, _) = preferred(&network, 0, 1);
    // The first choice delays the request far longer than the test waits before killing it.
    network.node(first).set_faults(faults("delay=60s"));
    let mut config = network.config();
    config.hedging = false;
    let (router, layer) = network.layer(config, 2).await;

    let x = hidden(16, 4);
    let call = tokio::spawn(async move {
        let out = layer.forward(&x).await;
        (out, x)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !call.is_finished(),
        "the delayed node answered before it was killed"
    );
    network.kill(first);

    let (out, x) = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .unwrap()
        .unwrap();
    let out = out.unwrap();
    let error = max_error(&out.output, &network.local().forward(&x).unwrap());
    assert!(error < 1e-5, "max relative error {error}");
    assert!(out.trace.replica_fallbacks > 0, "{:?}", out.trace);
    assert!(
        router.stats().failures("unavailable") > 0,
        "{:?}",
        router.stats().failure_counts()
    );
    network.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_with_bad_results_are_rejected() {
    let network = Network::start(&[
        ("1:*", FaultConfig::default()),
        ("1:*", FaultConfig::default()),
    ])
    .await;
    let (bad, good) = preferred(&network, 0, 1);
    let local = network.local();

    for (fault, kind) in [
        ("nan-output", "non_finite"),
        ("wrong-shape", "wrong_shape"),
        ("bad-signature", "bad_signature"),
    ] {
        network.node(bad).set_faults(faults(fault));
        // Without hedging, the bad node always responds first, because the test is about
        // rejecting its response.
        let mut config = network.config();
        config.hedging = false;
        let (router, layer) = network.layer(config, 2).await;
        let x = hidden(12, 5);
        let out = layer.forward(&x).await.unwrap();
        let error = max_error(&out.output, &local.forward(&x).unwrap());
        assert!(error < 1e-5, "{fault}: max relative error {error}");
        assert!(
            router.stats().failures(kind) > 0,
            "{fault}: {:?}",
            router.stats().failure_counts()
        );
        for token in &out.trace.tokens {
            assert!(
                token.served.iter().all(|e| e.peer == network.peer(good)),
                "{fault}: {token:?}"
            );
        }
    }
    network.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spot_check_catches_signed_wrong_output() {
    let network = Network::start(&[
        ("1:*", FaultConfig::default()),
        ("1:*", FaultConfig::default()),
    ])
    .await;
    let (liar, honest) = preferred(&network, 0, 1);
    network.node(liar).set_faults(faults("wrong-output"));
    let evidence = network.checkpoint().join("evidence.jsonl");
    let mut config = network.config();
    config.spot_check_rate = 1.0;
    // Without hedging, the liar surely serves first and the honest node checks it.
    config.hedging = false;
    config.evidence_file = Some(evidence.clone());
    let (router, layer) = network.layer(config, 2).await;

    let x = hidden(10, 6);
    let out = layer.forward(&x).await.unwrap();
    // The checkpoint contains the experts, so the local weights referee and the liar's
    // rows are replaced by correct ones.
    let error = max_error(&out.output, &network.local().forward(&x).unwrap());
    assert!(error < 1e-5, "max relative error {error}");
    assert!(out.trace.spot_check_mismatches > 0, "{:?}", out.trace);
    assert!(router.stats().dishonest_bans() >= 1);
    assert!(router.peer_book().is_suspect(&network.peer(liar)));
    assert!(!router.peer_book().is_suspect(&network.peer(honest)));

    let lines = std::fs::read_to_string(&evidence).unwrap();
    let record: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    assert_eq!(record["verdict"], "first_wrong");
    assert_eq!(record["first"]["peer"], network.peer(liar).to_string());
    assert_eq!(record["referee"], "the local weights");
    assert!(
        record["first"]["receipts"][0]["signature"]
            .as_str()
            .unwrap()
            .len()
            == 128
    );

    // Banned, the liar gets no more work.
    let out = layer.forward(&hidden(10, 7)).await.unwrap();
    for token in &out.trace.tokens {
        assert!(token.served.iter().all(|e| e.peer == network.peer(honest)));
    }
    network.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_prefers_fast_replica() {
    let network = Network::start(&[
        ("1:*", faults("delay=200ms")),
        ("1:*", FaultConfig::default()),
    ])
    .await;
    let mut config = network.config();
    config.peers = PeerPolicy::default();
    config.hedging = false;
    let (_router, layer) = network.layer(config, 2).await;
    let fast = network.peer(1);

    let mut to_fast = 0;
    let mut counted = 0;
    for call in 1..=220u64 {
        let out = layer.forward(&hidden(1, call)).await.unwrap();
        if call > 20 {
            counted += 1;
            if out.trace.tokens[0].served.iter().all(|e| e.peer == fast) {
                to_fast += 1;
            }
        }
    }
    assert!(
        to_fast * 10 >= counted * 9,
        "{to_fast} of {counted} calls went to the fast replica"
    );
    network.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_falls_back_to_next_ranked_expert() {
    let mut network = Network::start(&[
        ("1:0-6", FaultConfig::default()),
        ("1:7", FaultConfig::default()),
    ])
    .await;
    let (_router, layer) = network.layer(network.config(), 1).await;
    network.kill(1);

    let x = hidden(64, 8);
    let out = layer.forward(&x).await.unwrap();
    let local = network.local();
    let expected = local.forward(&x).unwrap().to_vec2::<f32>().unwrap();
    let actual = out.output.to_vec2::<f32>().unwrap();
    let mut replaced = 0;
    for ((token, got), want) in out.trace.tokens.iter().zip(&actual).zip(&expected) {
        assert!(got.iter().all(|v| v.is_finite()), "a row holds NaN");
        assert!(got.iter().any(|&v| v != 0.0), "a row is all zeros");
        if token.chosen.contains(&7) {
            replaced += 1;
            assert!(token.fell_back());
            assert!(token.served.iter().all(|e| e.expert != 7));
            assert!(token.served.iter().any(|e| e.replacement), "{token:?}");
            assert_eq!(token.served.len(), 2);
        } else {
            let error = row_error(got, want);
            assert!(error < 1e-5, "a token without expert 7 differs by {error}");
        }
    }
    assert!(replaced > 0, "no token chose expert 7; pick another seed");
    assert_eq!(out.trace.expert_fallbacks, replaced);
    network.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_stalled_node_deadline_or_fallback() {
    let network = Network::start(&[
        ("1:*", FaultConfig::default()),
        ("1:*", FaultConfig::default()),
    ])
    .await;
    let (first, _) = preferred(&network, 0, 1);
    network.node(first).set_faults(faults("stop-answering"));
    let stalled = network.peer(first);

    // Without hedging, the call waits on the stalled first choice and ends at its
    // deadline with an error naming it.
    let mut config = network.config();
    config.deadline = Duration::from_secs(1);
    config.hedging = false;
    let (_router, layer) = network.layer(config, 2).await;
    let result = tokio::time::timeout(Duration::from_secs(30), layer.forward(&hidden(4, 9)))
        .await
        .expect("the layer call hung");
    match result {
        Err(LayerError::Call(error @ CallError::Deadline { .. })) => {
            let text = error.to_string();
            assert!(
                text.contains(&expertnet_router::short_peer_id(&stalled)),
                "{text}"
            );
        }
        other => panic!("expected a deadline error, got {other:?}"),
    }

    // With hedging, the other replica responds in time.
    let mut config = network.config();
    config.deadline = Duration::from_secs(10);
    let (_router, layer) = network.layer(config, 2).await;
    for seed in 10..14 {
        let out = tokio::time::timeout(Duration::from_secs(30), layer.forward(&hidden(4, seed)))
            .await
            .expect("the layer call hung")
            .unwrap();
        assert!(out.trace.tokens.iter().all(|t| t.served.len() == 2));
    }
    network.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_hidden_states_are_refused_with_the_value() {
    let network = Network::start(&[("1:*", FaultConfig::default())]).await;
    let (_router, layer) = network.layer(network.config(), 1).await;

    let error = layer
        .forward(&hidden(3, 1).narrow(1, 0, 16).unwrap())
        .await
        .unwrap_err();
    assert!(error.to_string().contains("[3, 16]"), "{error}");
    let mut values = vec![0.5f32; 2 * HIDDEN];
    values[HIDDEN + 3] = f32::NAN;
    let x = Tensor::from_vec(values, (2, HIDDEN), &Device::Cpu).unwrap();
    let error = layer.forward(&x).await.unwrap_err();
    assert!(error.to_string().contains("token 1, column 3"), "{error}");
    network.stop().await;
}

fn row_error(got: &[f32], want: &[f32]) -> f32 {
    let difference = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .fold(0f32, f32::max);
    let scale = want.iter().map(|w| w.abs()).fold(0f32, f32::max);
    difference / scale.max(f32::MIN_POSITIVE)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_command_reports_error_fallbacks_and_latency() {
    let network = Network::start(&[
        ("1:*", FaultConfig::default()),
        ("1:*", faults("nan-output")),
    ])
    .await;
    let (_router, _layer) = network.layer(network.config(), 2).await;
    let checkpoint = network.checkpoint().to_str().unwrap().to_owned();
    let bootstrap = network.bootstrap.to_string();
    let run = |extra: &[&str]| {
        let mut args: Vec<String> = [
            "forward",
            "--checkpoint",
            &checkpoint,
            "--bootstrap",
            &bootstrap,
        ]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect();
        args.push("--json".to_owned());
        async move {
            tokio::task::spawn_blocking(move || {
                std::process::Command::new(env!("CARGO_BIN_EXE_expertnet"))
                    .args(&args)
                    .output()
                    .unwrap()
            })
            .await
            .unwrap()
        }
    };

    let output = run(&["--layer", "1", "--tokens", "40", "--batch", "8"]).await;
    assert!(output.status.success(), "{output:?}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(report["max_rel_error"].as_f64().unwrap() < 1e-5, "{report}");
    assert_eq!(report["failed_tokens"], 0, "{report}");
    assert_eq!(report["calls"], 5, "{report}");
    assert!(report["p99_ms"].as_f64().unwrap() >= report["p50_ms"].as_f64().unwrap());
    // The NaN node is tried at most until its first failure bans it.
    assert!(
        report["failures"]["non_finite"].as_u64().unwrap_or(0) <= 1,
        "{report}"
    );

    // No node serves layer 0, so every token fails and the exit code is non-zero.
    let output = run(&["--layer", "0", "--tokens", "4", "--deadline", "2000"]).await;
    assert!(!output.status.success(), "{output:?}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["failed_tokens"], 4, "{report}");
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("4 of 4 tokens failed"), "{stderr}");

    let output = run(&["--layer", "1", "--tokens", "0"]).await;
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("--tokens is 0; it must be at least 1")
    );
    network.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_replica_referees_without_local_weights() {
    let network = Network::start(&[
        ("1:*", FaultConfig::default()),
        ("1:*", FaultConfig::default()),
        ("1:*", FaultConfig::default()),
    ])
    .await;
    let mut order = [0, 1, 2];
    order.sort_by_key(|&i| network.peer(i));
    let liar = order[0];
    network.node(liar).set_faults(faults("wrong-output"));
    let mut config = network.config();
    config.spot_check_rate = 1.0;
    // Without hedging, the liar surely serves first and the honest node checks it.
    config.hedging = false;
    config.local_referee = false;
    let (router, layer) = network.layer(config, 3).await;

    let x = hidden(10, 11);
    let out = layer.forward(&x).await.unwrap();
    let error = max_error(&out.output, &network.local().forward(&x).unwrap());
    assert!(error < 1e-5, "max relative error {error}");
    assert!(router.stats().dishonest_bans() >= 1);
    assert!(router.peer_book().is_suspect(&network.peer(liar)));
    let judged = out
        .trace
        .failures
        .iter()
        .find(|f| f.peer == network.peer(liar))
        .unwrap();
    assert!(
        judged.reason.contains("judged by replica"),
        "{}",
        judged.reason
    );
    network.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_referee_both_replicas_become_suspects() {
    let network = Network::start(&[
        ("1:*", FaultConfig::default()),
        ("1:*", FaultConfig::default()),
    ])
    .await;
    let (liar, honest) = preferred(&network, 0, 1);
    network.node(liar).set_faults(faults("wrong-output"));
    let mut config = network.config();
    config.spot_check_rate = 1.0;
    // Without hedging, the liar surely serves first and the honest node checks it.
    config.hedging = false;
    config.local_referee = false;
    let (router, layer) = network.layer(config, 2).await;

    // Every expert of every token was served by the liar and disputed, so every result
    // is dropped and the call fails instead of returning either output.
    let error = layer.forward(&hidden(10, 12)).await.unwrap_err();
    match &error {
        LayerError::Call(CallError::Unserved { tokens, .. }) => assert_eq!(*tokens, 10),
        other => panic!("expected an Unserved error, got {other}"),
    }
    assert!(
        error.to_string().contains("neither can be shown wrong"),
        "{error}"
    );
    assert_eq!(
        router.stats().dishonest_bans(),
        0,
        "no node can be shown wrong"
    );
    let book = router.peer_book();
    assert!(book.is_suspect(&network.peer(liar)));
    assert!(book.is_suspect(&network.peer(honest)));
    network.stop().await;
}
