//! Helpers shared by the node tests.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use expertnet_model::codec::wire_from_f32;
use expertnet_model::{Family, GeneratorOptions, generate_checkpoint};
use expertnet_node::{ExpertSpec, Limits, Node, NodeConfig, NodeKey, RunningNode};
use expertnet_proto::pb::expert_service_client::ExpertServiceClient;
use expertnet_proto::{DType, ExpertInput, ForwardCall, RequestId, pb};
use tonic::transport::Channel;

pub(crate) const HIDDEN: usize = 64;

pub(crate) fn options(dtype: DType) -> GeneratorOptions {
    GeneratorOptions {
        family: Family::Mixtral,
        layers: 2,
        experts: 4,
        hidden: HIDDEN,
        ffn: 96,
        vocab: 32,
        heads: 4,
        kv_heads: 2,
        dtype,
        ..GeneratorOptions::default()
    }
}

/// Generates a checkpoint of the test size into `dir`.
pub(crate) fn checkpoint(dir: &Path, dtype: DType) {
    generate_checkpoint(dir, &options(dtype)).unwrap();
}

pub(crate) async fn start(dir: &Path, spec: &str, limits: Limits) -> RunningNode {
    let mut config = NodeConfig::new(dir, spec.parse::<ExpertSpec>().unwrap());
    config.limits = limits;
    config.threads = Some(2);
    config.metrics_listen = Some(([127, 0, 0, 1], 0).into());
    Node::start(config, NodeKey::generate().unwrap())
        .await
        .unwrap()
}

pub(crate) async fn client(node: &RunningNode) -> ExpertServiceClient<Channel> {
    let channel = Channel::from_shared(format!("http://{}", node.grpc_addr()))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    ExpertServiceClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

/// Deterministic hidden states in [-1, 1].
pub(crate) fn hidden_values(tokens: usize, seed: u32) -> Vec<f32> {
    (0..tokens * HIDDEN)
        .map(|i| ((i as f32 + 1.0) * 0.618 + seed as f32 * 1.7).sin())
        .collect()
}

pub(crate) fn request_id(n: u8) -> RequestId {
    RequestId::from_bytes([n; 16])
}

/// A valid request for `(expert, tokens)` pairs of one layer, in `dtype`.
pub(crate) fn forward_request(
    model_id: &str,
    layer: u32,
    groups: &[(u32, usize)],
    dtype: DType,
) -> pb::ForwardRequest {
    let inputs = groups
        .iter()
        .map(|&(expert, tokens)| ExpertInput {
            expert,
            hidden: wire_from_f32(&hidden_values(tokens, expert), &[tokens, HIDDEN], dtype)
                .unwrap(),
        })
        .collect();
    ForwardCall {
        request_id: request_id(7),
        model_id: model_id.to_owned(),
        layer,
        inputs,
    }
    .into_wire()
}

/// A one-expert request whose tensor is replaced by `tensor`.
pub(crate) fn raw_request(model_id: &str, tensor: pb::Tensor) -> pb::ForwardRequest {
    pb::ForwardRequest {
        request_id: Bytes::from(vec![1u8; 16]),
        model_id: model_id.to_owned(),
        layer: 0,
        inputs: vec![pb::ExpertInput {
            expert: 0,
            hidden: Some(tensor),
        }],
    }
}

/// Fetches the metrics text over HTTP.
pub(crate) async fn scrape(node: &RunningNode) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = node.metrics_addr().unwrap();
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}
