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
