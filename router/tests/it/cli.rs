//! The `expertnet` binary against a real node.

use std::process::Command;

use expertnet_model::generate_checkpoint;
use expertnet_node::{ExpertSpec, Node, NodeConfig, NodeKey};

use crate::client::small_options;

const BINARY: &str = env!("CARGO_BIN_EXE_expertnet");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_and_call_work_against_a_node() {
    let dir = tempfile::tempdir().unwrap();
    generate_checkpoint(dir.path(), &small_options()).unwrap();
    let config = NodeConfig::new(dir.path(), "0:1-2".parse::<ExpertSpec>().unwrap());
    let node = Node::start(config, NodeKey::generate().unwrap())
        .await
        .unwrap();
    let endpoint = format!("http://{}", node.grpc_addr());

    let run = |args: Vec<String>| {
        let endpoint = endpoint.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                Command::new(BINARY)
                    .args(&args)
                    .arg("--node")
                    .arg(endpoint)
                    .output()
                    .unwrap()
            })
            .await
            .unwrap()
        }
    };

    let output = run(vec!["info".into(), "--json".into()]).await;
    assert!(output.status.success(), "{output:?}");
    let info: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(info["node_id"], node.key().peer_id().to_base58());
    assert_eq!(info["models"][0]["experts"][0], "0:1-2");

    let checkpoint = dir.path().to_str().unwrap().to_owned();
    let args = [
        "call",
        "--layer",
        "0",
        "--expert",
        "2",
        "--tokens",
        "3",
        "--repeat",
        "4",
        "--checkpoint",
        &checkpoint,
    ];
    let output = run(args.iter().map(|s| s.to_string()).collect()).await;
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(stdout.contains("all receipts verified"), "{stdout}");
    assert!(
        stdout.contains("max relative error against local computation"),
        "{stdout}"
    );

    let output = run(vec![
        "call".into(),
        "--layer".into(),
        "0".into(),
        "--expert".into(),
        "3".into(),
    ])
    .await;
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("layer 0 expert 3 is not hosted"),
        "{stderr}"
    );
    node.shutdown().await.unwrap();
}

#[test]
fn call_to_a_closed_port_names_the_address() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let output = Command::new(BINARY)
        .args(["info", "--node", &endpoint])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains(&endpoint), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn experts_lists_the_network() {
    use expertnet_node::P2pConfig;

    let dir = tempfile::tempdir().unwrap();
    generate_checkpoint(dir.path(), &small_options()).unwrap();
    let start = |spec: &'static str, bootstrap: Vec<libp2p::Multiaddr>| {
        let mut config = NodeConfig::new(dir.path(), spec.parse::<ExpertSpec>().unwrap());
        config.p2p = Some(P2pConfig {
            bootstrap,
            ..P2pConfig::default()
        });
        Node::start(config, NodeKey::generate().unwrap())
    };
    let first = start("0:0-1", Vec::new()).await.unwrap();
    let address = first.bootstrap_addr().unwrap();
    let second = start("0:1-3,1:*", vec![address.clone()]).await.unwrap();
    let model_id = first.model_id().to_owned();

    let list = |args: Vec<String>| async move {
        tokio::task::spawn_blocking(move || {
            Command::new(BINARY)
                .arg("experts")
                .args(&args)
                .output()
                .unwrap()
        })
        .await
        .unwrap()
    };

    // Both nodes announce within about a second; retry a few times in case the second is
    // still joining.
    let mut listing = serde_json::Value::Null;
    for _ in 0..20 {
        let output = list(vec![
            "--bootstrap".into(),
            address.to_string(),
            "--json".into(),
        ])
        .await;
        assert!(output.status.success(), "{output:?}");
        listing = serde_json::from_slice(&output.stdout).unwrap();
        if listing["nodes"] == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    assert_eq!(listing["nodes"], 2, "{listing}");
    let model = &listing["models"][0];
    assert_eq!(model["model_id"], model_id.as_str());
    let layer0 = &model["layers"][0];
    assert_eq!(layer0["layer"], 0);
    let expert1 = &layer0["experts"][1];
    assert_eq!(expert1["expert"], 1);
    assert_eq!(
        expert1["replicas"].as_array().unwrap().len(),
        2,
        "{expert1}"
    );
    assert_eq!(model["layers"][1]["experts"].as_array().unwrap().len(), 4);

    let output = list(vec!["--bootstrap".into(), address.to_string()]).await;
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains(&format!("model {model_id}")), "{text}");
    assert!(text.contains("2 nodes"), "{text}");

    let output = list(vec![
        "--bootstrap".into(),
        address.to_string(),
        "--model".into(),
        "mixtral-other".into(),
    ])
    .await;
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(
        text.contains("no node serves model mixtral-other"),
        "{text}"
    );

    second.shutdown().await.unwrap();
    first.shutdown().await.unwrap();
}

#[test]
fn experts_with_unreachable_bootstrap_names_it() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let peer = NodeKey::from_secret([9; 32]).peer_id();
    let address = format!("/ip4/127.0.0.1/tcp/{port}/p2p/{peer}");
    let started = std::time::Instant::now();
    let output = Command::new(BINARY)
        .args(["experts", "--bootstrap", &address, "--timeout-secs", "2"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains(&address), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_rejects_a_damaged_local_reference() {
    use candle_core::Device;

    let dir = tempfile::tempdir().unwrap();
    generate_checkpoint(dir.path(), &small_options()).unwrap();
    let config = NodeConfig::new(dir.path(), "0:1".parse::<ExpertSpec>().unwrap());
    let node = Node::start(config, NodeKey::generate().unwrap())
        .await
        .unwrap();
    let endpoint = format!("http://{}", node.grpc_addr());

    // A copy of the checkpoint whose local expert weights were damaged after the manifest.
    let copy = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy.path().join(entry.file_name())).unwrap();
    }
    let weights = copy.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    let name = "model.layers.0.block_sparse_moe.experts.1.w2.weight";
    let damaged = (tensors[name].clone() * f64::NAN).unwrap();
    tensors.insert(name.to_owned(), damaged);
    candle_core::safetensors::save(&tensors, &weights).unwrap();

    let copy_path = copy.path().to_str().unwrap().to_owned();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(BINARY)
            .args([
                "call",
                "--node",
                &endpoint,
                "--layer",
                "0",
                "--expert",
                "1",
                "--checkpoint",
                &copy_path,
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!output.status.success(), "{output:?}");
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("layer 0 expert 1"), "{stderr}");
    assert!(stderr.contains("differs from the manifest"), "{stderr}");
    node.shutdown().await.unwrap();
}

#[test]
fn call_argument_errors_name_the_option() {
    let cases: [(&[&str], &str); 3] = [
        (
            &["--node", "127.0.0.1:50051"],
            "write it as http://HOST:PORT",
        ),
        (
            &["--node", "http://127.0.0.1:1", "--tokens", "0"],
            "--tokens must be at least 1",
        ),
        (
            &["--node", "http://127.0.0.1:1", "--deadline-ms", "0"],
            "--deadline-ms must be at least 1",
        ),
    ];
    for (args, fragment) in cases {
        let output = Command::new(BINARY)
            .args(["call", "--layer", "0", "--expert", "0"])
            .args(args)
            .output()
            .unwrap();
        assert!(!output.status.success(), "{args:?}");
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert!(stderr.contains(fragment), "{args:?}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn experts_accepts_a_bootstrap_without_peer_id() {
    use expertnet_node::P2pConfig;

    let dir = tempfile::tempdir().unwrap();
    generate_checkpoint(dir.path(), &small_options()).unwrap();
    let mut config = NodeConfig::new(dir.path(), "1:2".parse::<ExpertSpec>().unwrap());
    config.p2p = Some(P2pConfig::default());
    let node = Node::start(config, NodeKey::generate().unwrap())
        .await
        .unwrap();
    let address = node.p2p_addrs()[0].to_string();
    assert!(!address.contains("/p2p/"), "{address}");

    let output = tokio::task::spawn_blocking(move || {
        Command::new(BINARY)
            .args(["experts", "--json", "--bootstrap", &address])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(output.status.success(), "{output:?}");
    let listing: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(listing["nodes"], 1, "{listing}");
    node.shutdown().await.unwrap();
}

#[test]
fn malformed_bootstrap_shows_the_expected_form() {
    let output = Command::new(BINARY)
        .args(["experts", "--bootstrap", "127.0.0.1:4100"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("/ip4/HOST/tcp/PORT/p2p/PEER_ID"),
        "{stderr}"
    );
}
