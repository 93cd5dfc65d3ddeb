//! Text generation with every MoE layer on real nodes, against the local reference.

use std::time::Duration;

use expertnet_model::{Checkpoint, Family, GeneratorOptions, Manifest, generate_checkpoint};
use expertnet_node::{FaultConfig, RunningNode};
use expertnet_router::generate::check_against_reference;
use expertnet_router::{
    DiscoveryConfig, GenerateOptions, MoeModel, Router, RouterConfig, generate,
};

const BINARY: &str = env!("CARGO_BIN_EXE_expertnet");

fn options() -> GeneratorOptions {
    GeneratorOptions {
        layers: 2,
        experts: 4,
        top_k: 2,
        hidden: 32,
        ffn: 48,
        vocab: 260,
        heads: 4,
        kv_heads: 2,
        ..GeneratorOptions::default()
    }
}

async fn start(
    dir: &std::path::Path,
    specs: &[&str],
) -> (Vec<Option<RunningNode>>, libp2p::Multiaddr) {
    let specs: Vec<(&str, FaultConfig)> =
        specs.iter().map(|&s| (s, FaultConfig::default())).collect();
    crate::layer::start_nodes(dir, &specs).await
}

/// Connects a router and waits until it has seen `replicas` replicas of every expert of
/// every layer.
async fn router(bootstrap: libp2p::Multiaddr, model_id: &str, replicas: usize) -> Router {
    let mut config = RouterConfig::new(DiscoveryConfig::new(vec![bootstrap]));
    config.seed = Some(3);
    config.deadline = Duration::from_secs(20);
    let router = Router::connect(config).await.unwrap();
    for _ in 0..80 {
        let mut fewest = usize::MAX;
        for layer in 0..2 {
            let table = router
                .discovery()
                .resolve_fresh(model_id, layer)
                .await
                .unwrap();
            fewest = fewest.min((0..4).map(|e| table.replicas(e).len()).min().unwrap());
        }
        if fewest >= replicas {
            return router;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("discovery never listed {replicas} replicas of every expert");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_generation_matches_the_local_reference() {
    greedy_generation_matches(Family::Mixtral, 16).await;
}

/// Qwen2-MoE adds attention biases and a shared expert, which the client computes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qwen2_moe_generation_matches_the_local_reference() {
    greedy_generation_matches(Family::Qwen2Moe, 8).await;
}

async fn greedy_generation_matches(family: Family, tokens: usize) {
    let dir = tempfile::tempdir().unwrap();
    let options = GeneratorOptions {
        family,
        ..options()
    };
    generate_checkpoint(dir.path(), &options).unwrap();
    let (nodes, bootstrap) = start(dir.path(), &["*:0-1", "*:2-3", "*:*"]).await;
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    let manifest = Manifest::load(&Manifest::path_in(dir.path())).unwrap();
    let router = router(bootstrap, &manifest.model_id(), 2).await;

    let remote = MoeModel::remote(&router, &checkpoint, &manifest).unwrap();
    let local = MoeModel::local(&checkpoint).unwrap();
    let settings = GenerateOptions {
        max_new_tokens: tokens,
        temperature: 0.0,
        seed: 1,
    };
    let prompt = expertnet_model::tokenizer::encode_bytes("The experts");
    let mut streamed = Vec::new();
    let network = generate(&remote, &prompt, &settings, |t| streamed.push(t))
        .await
        .unwrap();
    assert_eq!(streamed, network.tokens);
    assert_eq!(network.tokens.len(), tokens);

    let check = check_against_reference(&local, &network, 1e-4)
        .await
        .unwrap();
    assert!(check.passed(1e-4), "{check:?}");
    assert_eq!(check.positions, tokens);
    // Run free, the reference picks the same tokens.
    let reference = generate(&local, &prompt, &settings, |_| {}).await.unwrap();
    assert_eq!(reference.tokens, network.tokens);
    // Every pass went through both MoE layers on the network.
    assert_eq!(network.traces.len(), 2 * tokens);

    for node in nodes.into_iter().flatten() {
        node.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_survives_a_node_killed_midway() {
    let dir = tempfile::tempdir().unwrap();
    generate_checkpoint(dir.path(), &options()).unwrap();
    let (mut nodes, bootstrap) = start(dir.path(), &["*:*", "*:*", "*:0-1"]).await;
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    let manifest = Manifest::load(&Manifest::path_in(dir.path())).unwrap();
    let router = router(bootstrap, &manifest.model_id(), 2).await;
    let remote = MoeModel::remote(&router, &checkpoint, &manifest).unwrap();
    let settings = GenerateOptions {
        max_new_tokens: 16,
        temperature: 0.0,
        seed: 1,
    };
    let prompt = expertnet_model::tokenizer::encode_bytes("Kill one");

    // Both full replicas get traffic at first; one of them dies after the fourth token.
    let mut victim = nodes[1].take();
    let mut produced = 0;
    let network = generate(&remote, &prompt, &settings, |_| {
        produced += 1;
        if produced == 4
            && let Some(node) = victim.take()
        {
            node.kill();
        }
    })
    .await
    .unwrap();
    assert_eq!(network.tokens.len(), 16);
    assert!(victim.is_none(), "the node was not killed");

    let local = MoeModel::local(&checkpoint).unwrap();
    let check = check_against_reference(&local, &network, 1e-4)
        .await
        .unwrap();
    assert!(check.passed(1e-4), "{check:?}");
    for node in nodes.into_iter().flatten() {
        node.kill();
    }
}

#[test]
fn generate_names_bad_bootstrap_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    generate_checkpoint(
        dir.path(),
        &GeneratorOptions {
            max_shard_bytes: 64 << 10,
            ..options()
        },
    )
    .unwrap();

    // Nothing listens on this loopback port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let address = format!("/ip4/127.0.0.1/tcp/{port}");
    let run = |extra: &[&str]| {
        std::process::Command::new(BINARY)
            .args([
                "generate",
                "--prompt",
                "hi",
                "--timeout-secs",
                "2",
                "--checkpoint",
            ])
            .arg(dir.path())
            .args(extra)
            .output()
            .unwrap()
    };
    let started = std::time::Instant::now();
    let output = run(&["--bootstrap", &address]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&port.to_string()), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );

    // Drop one dense tensor from the shard index.
    let index_path = dir.path().join("model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    let removed = index["weight_map"]
        .as_object_mut()
        .unwrap()
        .remove("model.layers.1.self_attn.q_proj.weight");
    assert!(removed.is_some());
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    let output = run(&["--bootstrap", &address]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("model.layers.1.self_attn.q_proj.weight"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_command_streams_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    generate_checkpoint(dir.path(), &options()).unwrap();
    let (nodes, bootstrap) = start(dir.path(), &["*:*", "*:*"]).await;
    let manifest = Manifest::load(&Manifest::path_in(dir.path())).unwrap();
    drop(router(bootstrap.clone(), &manifest.model_id(), 2).await);

    let run = |extra: &'static [&'static str]| {
        let dir = dir.path().to_owned();
        let bootstrap = bootstrap.to_string();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(BINARY)
                .args([
                    "generate",
                    "--prompt",
                    "Experts ",
                    "--max-new-tokens",
                    "8",
                    "--verify-local",
                ])
                .arg("--checkpoint")
                .arg(dir)
                .args(["--bootstrap", &bootstrap])
                .args(extra)
                .output()
                .unwrap()
        })
    };
    let output = run(&["--json"]).await.unwrap();
    assert!(output.status.success(), "{output:?}");
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary["new_tokens"], 8, "{summary}");
    assert!(
        summary["max_rel_error"].as_f64().unwrap() < 1e-4,
        "{summary}"
    );
    assert_eq!(summary["choice_mismatches"].as_array().unwrap().len(), 0);

    let output = run(&[]).await.unwrap();
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.starts_with("Experts "), "{text}");
    assert!(text.contains("8 tokens in"), "{text}");
    assert!(
        text.contains("local reference: max relative logit error"),
        "{text}"
    );
    for node in nodes.into_iter().flatten() {
        node.kill();
    }
}
