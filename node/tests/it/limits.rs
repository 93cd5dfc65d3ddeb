//! Bad requests, limits and batching: each rejection has the expected status and message,
//! and the node keeps serving afterwards.

use std::time::Duration;

use bytes::Bytes;
use expertnet_node::Limits;
use expertnet_proto::{DType, pb};
use tonic::Code;

use crate::common::{self, HIDDEN};

fn f32_tensor(shape: Vec<u64>, values: &[f32]) -> pb::Tensor {
    pb::Tensor {
        shape,
        dtype: pb::DType::DtypeF32 as i32,
        data: Bytes::from(
            values
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>(),
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_statuses() {
    let dir = tempfile::tempdir().unwrap();
    common::checkpoint(dir.path(), DType::F32);
    let limits = Limits {
        max_message_bytes: 256 << 10,
        max_tokens_per_request: 100,
        ..Limits::default()
    };
    let node = common::start(dir.path(), "0:0-1", limits).await;
    let model = node.model_id().to_owned();
    let mut client = common::client(&node).await;

    let good = || common::forward_request(&model, 0, &[(0, 2)], DType::F32);
    let with_values =
        |values: &[f32]| common::raw_request(&model, f32_tensor(vec![1, HIDDEN as u64], values));

    let mut nan = vec![0.5f32; HIDDEN];
    nan[5] = f32::NAN;
    let mut inf = vec![0.5f32; HIDDEN];
    inf[HIDDEN - 1] = f32::INFINITY;

    let mut unknown_model = good();
    unknown_model.model_id = "mixtral-00000000000000000000000000000000".to_owned();
    let mut unknown_layer = good();
    unknown_layer.layer = 1;
    let unknown_expert = common::forward_request(&model, 0, &[(3, 1)], DType::F32);
    let wrong_hidden = common::raw_request(&model, f32_tensor(vec![1, 8], &[0.0; 8]));
    let mut unknown_dtype =
        common::raw_request(&model, f32_tensor(vec![1, HIDDEN as u64], &[0.0; HIDDEN]));
    if let Some(hidden) = unknown_dtype.inputs[0].hidden.as_mut() {
        hidden.dtype = 9;
    }
    let wrong_bytes = common::raw_request(
        &model,
        pb::Tensor {
            shape: vec![2, HIDDEN as u64],
            dtype: pb::DType::DtypeF32 as i32,
            data: Bytes::from(vec![0u8; HIDDEN * 4]),
        },
    );
    let zero_tokens = common::raw_request(&model, f32_tensor(vec![0, HIDDEN as u64], &[]));
    // 1,100 rows of 64 f32 values: 281,600 bytes, above the 256 KiB message limit (and
    // the token limit, which is checked later).
    let oversized = common::forward_request(&model, 0, &[(0, 1100)], DType::F32);
    let too_many_tokens = common::forward_request(&model, 0, &[(0, 60), (1, 41)], DType::F32);
    let mut short_id = good();
    short_id.request_id = Bytes::from_static(b"too short");

    let cases: Vec<(&str, pb::ForwardRequest, Code, &str)> = vec![
        (
            "unknown model",
            unknown_model,
            Code::NotFound,
            "is not served by this node",
        ),
        (
            "unknown layer",
            unknown_layer,
            Code::NotFound,
            "layer 1 is not hosted",
        ),
        (
            "unknown expert",
            unknown_expert,
            Code::NotFound,
            "layer 0 expert 3 is not hosted",
        ),
        (
            "wrong hidden size",
            wrong_hidden,
            Code::InvalidArgument,
            "hidden size 8",
        ),
        (
            "unknown dtype code",
            unknown_dtype,
            Code::InvalidArgument,
            "dtype code 9",
        ),
        (
            "bytes not matching shape",
            wrong_bytes,
            Code::InvalidArgument,
            "needs 512 bytes",
        ),
        (
            "zero tokens",
            zero_tokens,
            Code::InvalidArgument,
            "zero tokens",
        ),
        (
            "NaN input",
            with_values(&nan),
            Code::InvalidArgument,
            "row 0, column 5",
        ),
        (
            "infinite input",
            with_values(&inf),
            Code::InvalidArgument,
            "NaN or infinite",
        ),
        (
            "over the size limit",
            oversized,
            Code::ResourceExhausted,
            "max_message_bytes of 262144",
        ),
        (
            "over the token limit",
            too_many_tokens,
            Code::ResourceExhausted,
            "max_tokens_per_request of 100",
        ),
        (
            "short request id",
            short_id,
            Code::InvalidArgument,
            "request_id has 9 bytes",
        ),
    ];

    for (name, request, code, fragment) in cases {
        let status = client.forward(request).await.unwrap_err();
        assert_eq!(status.code(), code, "{name}: {status:?}");
        assert!(
            status.message().contains(fragment),
            "{name}: {:?}",
            status.message()
        );

        let response = client.forward(good()).await;
        assert!(
            response.is_ok(),
            "{name}: the node stopped serving: {response:?}"
        );
    }

    let metrics = node.metrics();
    assert_eq!(metrics.rejections("non_finite_input"), 2);
    assert_eq!(metrics.rejections("message_too_large"), 1);
    assert_eq!(metrics.rejections("too_many_tokens"), 1);
    assert_eq!(metrics.requests_with_code(Code::Ok), 12);
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_are_batched() {
    let dir = tempfile::tempdir().unwrap();
    common::checkpoint(dir.path(), DType::F32);
    // A generous gathering window: the 32 requests below are sent within a few
    // milliseconds, so all but a few share a pass.
    let limits = Limits {
        batch_wait: Duration::from_millis(200),
        ..Limits::default()
    };
    let node = common::start(dir.path(), "0:0", limits).await;
    let client = common::client(&node).await;

    let mut calls = Vec::new();
    for _ in 0..32 {
        let mut client = client.clone();
        let request = common::forward_request(node.model_id(), 0, &[(0, 1)], DType::F32);
        calls.push(tokio::spawn(async move { client.forward(request).await }));
    }
    for call in calls {
        call.await.unwrap().unwrap();
    }

    let passes = node.metrics().forward_passes();
    assert!(passes < 32, "32 requests took {passes} forward passes");

    let text = common::scrape(&node).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains(&format!("expertnet_forward_passes_total {passes}")),
        "{text}"
    );
    assert!(text.contains("expertnet_batch_tokens_count"), "{text}");
    assert!(text.contains("expertnet_queued_tokens 0"), "{text}");
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_rejects_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    common::checkpoint(dir.path(), DType::F32);
    // The first request is held for the gathering window, so the second finds the queue
    // full; the window is long against the time it takes to send the second.
    let limits = Limits {
        max_queued_tokens: 8,
        max_tokens_per_request: 8,
        batch_wait: Duration::from_secs(2),
        ..Limits::default()
    };
    let node = common::start(dir.path(), "0:0", limits).await;
    let client = common::client(&node).await;

    let mut first_client = client.clone();
    let first = common::forward_request(node.model_id(), 0, &[(0, 6)], DType::F32);
    let held = tokio::spawn(async move { first_client.forward(first).await });
    while node
        .metrics()
        .encode()
        .contains("expertnet_queued_tokens 0")
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let mut second_client = client.clone();
    let second = common::forward_request(node.model_id(), 0, &[(0, 4)], DType::F32);
    let status = second_client.forward(second).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("max_queued_tokens of 8"),
        "{}",
        status.message()
    );

    held.await.unwrap().unwrap();
    let third = common::forward_request(node.model_id(), 0, &[(0, 4)], DType::F32);
    second_client.forward(third).await.unwrap();
    assert_eq!(node.metrics().rejections("queue_full"), 1);
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_deadline_skips_computation() {
    let dir = tempfile::tempdir().unwrap();
    common::checkpoint(dir.path(), DType::F32);
    // The node holds each job for 1 s before computing; the request gives up after 100 ms.
    let limits = Limits {
        batch_wait: Duration::from_secs(1),
        ..Limits::default()
    };
    let node = common::start(dir.path(), "0:0", limits).await;
    let mut client = common::client(&node).await;

    let mut request = tonic::Request::new(common::forward_request(
        node.model_id(),
        0,
        &[(0, 2)],
        DType::F32,
    ));
    request.set_timeout(Duration::from_millis(100));
    let status = client.forward(request).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );

    // The abandoned job is dropped when its pass comes up, without computing it.
    for _ in 0..100 {
        if node
            .metrics()
            .encode()
            .contains("expertnet_cancelled_jobs_total 1")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        node.metrics()
            .encode()
            .contains("expertnet_cancelled_jobs_total 1")
    );
    assert_eq!(node.metrics().forward_passes(), 0);
    node.shutdown().await.unwrap();
}
