//! `NodeClient` against a real node.

use std::time::Duration;

use expertnet_model::codec::wire_from_f32;
use expertnet_model::{GeneratorOptions, Manifest, generate_checkpoint};
use expertnet_node::{ExpertSpec, Node, NodeConfig, NodeKey};
use expertnet_proto::{DType, Digest, ExpertInput, ForwardCall, RequestId};
use expertnet_router::{ClientError, NodeClient};

pub(crate) fn small_options() -> GeneratorOptions {
    GeneratorOptions {
        layers: 2,
        experts: 4,
        hidden: 32,
        ffn: 48,
        vocab: 16,
        ..GeneratorOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_verifies_node_results() {
    let dir = tempfile::tempdir().unwrap();
    generate_checkpoint(dir.path(), &small_options()).unwrap();
    let manifest = Manifest::load(&Manifest::path_in(dir.path())).unwrap();
    let config = NodeConfig::new(dir.path(), "1:*".parse::<ExpertSpec>().unwrap());
    let node = Node::start(config, NodeKey::generate().unwrap())
        .await
        .unwrap();
    let endpoint = format!("http://{}", node.grpc_addr());

    let mut client = NodeClient::connect(
        &endpoint,
        Some(node.key().peer_id()),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(client.peer_id(), node.key().peer_id());

    let call = ForwardCall {
        request_id: RequestId::from_bytes([3; 16]),
        model_id: node.model_id().to_owned(),
        layer: 1,
        inputs: vec![
            ExpertInput {
                expert: 0,
                hidden: wire_from_f32(&[0.25; 64], &[2, 32], DType::F32).unwrap(),
            },
            ExpertInput {
                expert: 3,
                hidden: wire_from_f32(&[-0.5; 32], &[1, 32], DType::BF16).unwrap(),
            },
        ],
    };
    let outputs = client
        .forward(&call, Some(Duration::from_secs(5)), |layer, expert| {
            manifest.expert_digest(layer, expert)
        })
        .await
        .unwrap();
    assert_eq!(outputs.len(), 2);
    assert_eq!(outputs[1].output.dtype(), DType::BF16);

    // A manifest of other weights makes every receipt fail the weight check.
    let error = client
        .forward(&call, None, |_, _| Some(Digest::from_bytes([0; 32])))
        .await
        .unwrap_err();
    assert!(matches!(error, ClientError::Verify { .. }), "{error}");
    assert!(error.to_string().contains("weight digest"), "{error}");
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_rejects_an_unexpected_peer() {
    let dir = tempfile::tempdir().unwrap();
    generate_checkpoint(dir.path(), &small_options()).unwrap();
    let config = NodeConfig::new(dir.path(), ExpertSpec::all());
    let node = Node::start(config, NodeKey::generate().unwrap())
        .await
        .unwrap();
    let endpoint = format!("http://{}", node.grpc_addr());

    let impostor = NodeKey::generate().unwrap().peer_id();
    let error = NodeClient::connect(&endpoint, Some(impostor), Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(error, ClientError::WrongPeer { .. }), "{error}");
    node.shutdown().await.unwrap();

    // Nothing listens there any more.
    let error = NodeClient::connect(&endpoint, None, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(error, ClientError::Connect { .. }), "{error}");
    assert!(error.to_string().contains(&endpoint), "{error}");
}
