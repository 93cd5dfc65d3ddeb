//! What a node refuses at start.

use candle_core::Device;
use expertnet_model::{Checkpoint, Manifest};
use expertnet_node::{ExpertSpec, Node, NodeConfig, NodeError, NodeKey};
use expertnet_proto::DType;

use crate::common;

async fn start_error(config: NodeConfig) -> NodeError {
    Node::start(config, NodeKey::from_secret([5; 32]))
        .await
        .expect_err("the node must refuse to start")
}

#[tokio::test]
async fn altered_expert_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    common::checkpoint(dir.path(), DType::F32);

    let path = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let name = "model.layers.1.block_sparse_moe.experts.3.w1.weight";
    let altered = tensors[name].affine(1.0, 1e-3).unwrap();
    tensors.insert(name.to_owned(), altered);
    candle_core::safetensors::save(&tensors, &path).unwrap();

    // Experts other than the altered one still start.
    let config = NodeConfig::new(dir.path(), "1:0-2".parse().unwrap());
    Node::start(config, NodeKey::from_secret([5; 32]))
        .await
        .unwrap()
        .shutdown()
        .await
        .unwrap();

    let error = start_error(NodeConfig::new(dir.path(), "1:*".parse().unwrap())).await;
    let message = error.to_string();
    assert!(message.contains("layer 1 expert 3"), "{message}");
    assert!(message.contains("differs from the manifest"), "{message}");
}

#[tokio::test]
async fn inconsistent_folders_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    common::checkpoint(dir.path(), DType::F32);
    let all = || NodeConfig::new(dir.path(), ExpertSpec::all());

    let mut bf16 = all();
    bf16.compute_dtype = DType::BF16;
    let message = start_error(bf16).await.to_string();
    assert!(message.contains("use f32 or f16"), "{message}");

    let message = start_error(NodeConfig::new(dir.path(), "0:9".parse().unwrap()))
        .await
        .to_string();
    assert!(message.contains("expert 9 is out of range"), "{message}");

    // A config.json edited after the manifest was made.
    let config_path = dir.path().join("config.json");
    let original = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(
        &config_path,
        original.replace(
            "\"max_position_embeddings\": 4096",
            "\"max_position_embeddings\": 2048",
        ),
    )
    .unwrap();
    let message = start_error(all()).await.to_string();
    assert!(message.contains("does not match the manifest"), "{message}");
    std::fs::write(&config_path, original).unwrap();

    std::fs::remove_file(Manifest::path_in(dir.path())).unwrap();
    let message = start_error(all()).await.to_string();
    assert!(
        message.contains("expertnet-node manifest --checkpoint"),
        "{message}"
    );

    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    Manifest::create(&checkpoint)
        .unwrap()
        .save(&Manifest::path_in(dir.path()))
        .unwrap();
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let message = start_error(all()).await.to_string();
    assert!(message.contains("model.safetensors"), "{message}");
}

#[tokio::test]
async fn busy_port_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    common::checkpoint(dir.path(), DType::F32);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();

    let mut config = NodeConfig::new(dir.path(), ExpertSpec::all());
    config.grpc_listen = taken.local_addr().unwrap();
    let message = start_error(config).await.to_string();
    assert!(
        message.contains("cannot listen for gRPC on 127.0.0.1:"),
        "{message}"
    );
}
