//! Node outputs against the local expert computation on the same weights.

use candle_core::{Device, Tensor};
use expertnet_model::codec::{to_candle, wire_to_f32};
use expertnet_model::{Checkpoint, Manifest, max_row_relative_error};
use expertnet_node::Limits;
use expertnet_proto::{DType, ExpertOutput, ForwardCall, Receipt, pb};

use crate::common::{self, HIDDEN};

/// Checks one response against local computation and returns the largest per-row
/// relative error.
fn check_response(
    checkpoint: &Checkpoint,
    manifest: &Manifest,
    request: &pb::ForwardRequest,
    response: pb::ForwardResponse,
    node_key: &ed25519_dalek::VerifyingKey,
) -> f32 {
    let call = ForwardCall::try_from(request.clone()).unwrap();
    assert_eq!(response.outputs.len(), call.inputs.len());

    let mut worst = 0.0f32;
    for (input, output) in call.inputs.iter().zip(response.outputs) {
        let output = ExpertOutput::try_from(output).unwrap();
        assert_eq!(output.expert, input.expert);
        assert_eq!(output.output.shape(), input.hidden.shape());
        assert_eq!(output.output.dtype(), input.hidden.dtype());

        let receipt: &Receipt = &output.receipt;
        receipt.verify(node_key).unwrap();
        assert_eq!(receipt.body.request_id, call.request_id);
        assert_eq!(receipt.body.layer, call.layer);
        assert_eq!(receipt.body.expert, input.expert);
        assert_eq!(receipt.body.input_digest, input.hidden.digest());
        assert_eq!(receipt.body.output_digest, output.output.digest());
        assert_eq!(
            Some(receipt.body.weight_digest),
            manifest.expert_digest(call.layer, input.expert)
        );

        // The reference sees the same (possibly rounded) input and computes in f32.
        let expert = checkpoint
            .load_expert(call.layer, input.expert, DType::F32, &Device::Cpu)
            .unwrap();
        let x = to_candle(&input.hidden, candle_core::DType::F32, &Device::Cpu).unwrap();
        let local = expert.forward(&x).unwrap();
        let remote = Tensor::from_vec(
            wire_to_f32(&output.output),
            output.output.shape(),
            &Device::Cpu,
        )
        .unwrap();
        worst = worst.max(max_row_relative_error(&remote, &local).unwrap());
    }
    worst
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_matches_local_ffn_for_each_dtype() {
    let dir = tempfile::tempdir().unwrap();
    common::checkpoint(dir.path(), DType::F32);
    let node = common::start(dir.path(), "*", Limits::default()).await;
    let mut client = common::client(&node).await;
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    let manifest = Manifest::load(&Manifest::path_in(dir.path())).unwrap();
    let key = node.key().verifying_key();

    // f32 must agree to rounding; bf16 and f16 outputs are rounded once more when the node
    // converts back to the request dtype: 8 and 11 significant bits.
    let bounds = [(DType::F32, 1e-5), (DType::F16, 1e-3), (DType::BF16, 8e-3)];
    for (dtype, bound) in bounds {
        for tokens in [1, 2, 7, 16, 33, 64] {
            let request = common::forward_request(node.model_id(), 1, &[(2, tokens)], dtype);
            let response = client.forward(request.clone()).await.unwrap().into_inner();
            let error = check_response(&checkpoint, &manifest, &request, response, &key);
            assert!(
                error < bound,
                "{dtype} with {tokens} tokens: relative error {error}"
            );
        }
    }
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_serves_several_experts() {
    let dir = tempfile::tempdir().unwrap();
    common::checkpoint(dir.path(), DType::F32);
    let node = common::start(dir.path(), "0:0-3", Limits::default()).await;
    let mut client = common::client(&node).await;
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    let manifest = Manifest::load(&Manifest::path_in(dir.path())).unwrap();
    let key = node.key().verifying_key();

    let request =
        common::forward_request(node.model_id(), 0, &[(3, 5), (0, 1), (1, 12)], DType::F32);
    let response = client.forward(request.clone()).await.unwrap().into_inner();
    let error = check_response(&checkpoint, &manifest, &request, response, &key);
    assert!(error < 1e-5, "relative error {error}");
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_precision_weights_are_served() {
    for dtype in [DType::BF16, DType::F16] {
        let dir = tempfile::tempdir().unwrap();
        common::checkpoint(dir.path(), dtype);
        let node = common::start(dir.path(), "*:1", Limits::default()).await;
        let mut client = common::client(&node).await;
        let checkpoint = Checkpoint::open(dir.path()).unwrap();
        let manifest = Manifest::load(&Manifest::path_in(dir.path())).unwrap();
        let key = node.key().verifying_key();

        let request = common::forward_request(node.model_id(), 0, &[(1, 9)], DType::F32);
        let response = client.forward(request.clone()).await.unwrap().into_inner();
        let error = check_response(&checkpoint, &manifest, &request, response, &key);
        assert!(error < 1e-5, "{dtype} weights: relative error {error}");
        node.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_describes_the_node() {
    let dir = tempfile::tempdir().unwrap();
    common::checkpoint(dir.path(), DType::F32);
    let node = common::start(dir.path(), "0:1-2,1:*", Limits::default()).await;
    let mut client = common::client(&node).await;

    let info = client.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.node_id, node.key().peer_id().to_base58());
    assert_eq!(&info.public_key[..], node.key().verifying_key().as_bytes());
    assert_eq!(info.models.len(), 1);
    let model = &info.models[0];
    assert_eq!(model.model_id, node.model_id());
    assert_eq!(model.hidden_size as usize, HIDDEN);
    let layers: Vec<String> = model
        .layers
        .iter()
        .map(|l| expertnet_proto::LayerExperts::from_wire(l).to_string())
        .collect();
    assert_eq!(layers, ["0:1-2", "1:0-3"]);
    assert_eq!(info.limits.unwrap().max_tokens_per_request, 1024);
    node.shutdown().await.unwrap();
}
