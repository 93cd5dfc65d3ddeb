//! Rewrites tonic's rejection of oversized messages into `RESOURCE_EXHAUSTED` with a
//! message naming the node's limit.
//!
//! tonic checks `max_decoding_message_size` while decoding, before the handler runs, and
//! answers `OUT_OF_RANGE`. gRPC's own convention for a message over the size limit is
//! `RESOURCE_EXHAUSTED`, which clients treat as "try elsewhere or send less". The handlers
//! of this node never return `OUT_OF_RANGE`, so the rewrite cannot hide another error.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::Status;

use crate::NodeMetrics;

#[derive(Debug, Clone)]
pub(crate) struct SizeLimitLayer {
    pub(crate) max_message_bytes: usize,
    pub(crate) metrics: Arc<NodeMetrics>,
}

impl<S> tower::Layer<S> for SizeLimitLayer {
    type Service = SizeLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SizeLimit {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct SizeLimit<S> {
    inner: S,
    layer: SizeLimitLayer,
}

/// gRPC status code of `OUT_OF_RANGE`.
const OUT_OF_RANGE: &[u8] = b"11";

impl<S, RequestBody, ResponseBody> tower::Service<http::Request<RequestBody>> for SizeLimit<S>
where
    S: tower::Service<http::Request<RequestBody>, Response = http::Response<ResponseBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<RequestBody>) -> Self::Future {
        let future = self.inner.call(request);
        let layer = self.layer.clone();
        Box::pin(async move {
            let mut response = future.await?;
            let headers = response.headers_mut();
            if headers.get("grpc-status").map(|v| v.as_bytes()) != Some(OUT_OF_RANGE) {
                return Ok(response);
            }

            let found = headers
                .get("grpc-message")
                .and_then(|v| v.to_str().ok())
                .and_then(found_bytes);
            let size = found.map_or_else(
                || "a message".to_owned(),
                |n| format!("a message of {n} bytes"),
            );
            let status = Status::resource_exhausted(format!(
                "{size} is above this node's max_message_bytes of {}; send fewer tokens per request",
                layer.max_message_bytes
            ));
            headers.remove("grpc-status");
            headers.remove("grpc-message");
            if status.add_header(headers).is_err() {
                tracing::debug!("could not rewrite the status of an oversized message");
            }
            layer.metrics.record_rejection("message_too_large");
            layer
                .metrics
                .record_request(tonic::Code::ResourceExhausted, 0.0);
            Ok(response)
        })
    }
}

/// Extracts N from tonic's "... found N bytes ..." message, which is percent-encoded.
fn found_bytes(message: &str) -> Option<u64> {
    let decoded = message
        .replace("%20", " ")
        .replace("%3A", ":")
        .replace("%2C", ",");
    let after = decoded.split("found ").nth(1)?;
    after.split(' ').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_is_read_from_tonic_message() {
        assert_eq!(
            found_bytes(
                "Error, decoded message length too large: found 5000 bytes, the limit is: 100 bytes"
            ),
            Some(5000)
        );
        assert_eq!(
            found_bytes(
                "Error%2C%20decoded%20message%20length%20too%20large%3A%20found%205000%20bytes"
            ),
            Some(5000)
        );
        assert_eq!(found_bytes("something else"), None);
    }
}
