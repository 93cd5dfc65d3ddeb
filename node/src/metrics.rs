//! Prometheus metrics of a node, and the HTTP endpoint that serves them.

use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

/// Every `reason` label of the rejection counter, shown at 0 from the start so that a
/// dashboard or an alert finds each series before the first rejection.
const REJECTION_REASONS: [&str; 10] = [
    "malformed",
    "unknown_model",
    "unknown_expert",
    "hidden_size",
    "non_finite_input",
    "too_many_tokens",
    "queue_full",
    "shutting_down",
    "compute_failed",
    "message_too_large",
];

/// The `store` labels of the DHT store overflow counter.
const DHT_STORES: [&str; 2] = ["records", "providers"];

/// Every `reason` label of the rejected DHT record counter: the node's own checks, then
/// [`expertnet_proto::p2p::RecordError::reason`]'s.
const RECORD_REJECTIONS: [&str; 9] = [
    "unknown_key",
    "older_sequence",
    "too_large",
    "malformed",
    "peer_mismatch",
    "bad_signature",
    "future_timestamp",
    "stale",
    "invalid",
];

/// The gRPC status codes of Forward responses, listed at 0 from the start.
const RESPONSE_CODES: [tonic::Code; 7] = [
    tonic::Code::Ok,
    tonic::Code::InvalidArgument,
    tonic::Code::NotFound,
    tonic::Code::ResourceExhausted,
    tonic::Code::Unavailable,
    tonic::Code::Internal,
    tonic::Code::Cancelled,
];

/// The node's metrics. Names carry the `expertnet_` prefix in the exposition.
pub struct NodeMetrics {
    registry: Registry,
    requests: Family<CodeLabel, Counter>,
    request_seconds: Histogram,
    forward_passes: Counter,
    batch_tokens: Histogram,
    batch_requests: Histogram,
    pass_seconds: Histogram,
    /// The same sum as `pass_seconds`, readable in-process (the histogram's is not).
    pass_seconds_total: Counter<f64, std::sync::atomic::AtomicU64>,
    queued_tokens: Gauge,
    rejections: Family<ReasonLabel, Counter>,
    cancelled: Counter,
    records_rejected: Family<ReasonLabel, Counter>,
    store_overflows: Family<ReasonLabel, Counter>,
    publications: Family<CodeLabel, Counter>,
    connected_peers: Gauge,
}

impl std::fmt::Debug for NodeMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeMetrics")
            .field("forward_passes", &self.forward_passes.get())
            .field("queued_tokens", &self.queued_tokens.get())
            .finish_non_exhaustive()
    }
}

impl Default for NodeMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl NodeMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("expertnet");
        let requests = Family::<CodeLabel, Counter>::default();
        registry.register(
            "forward_requests",
            "Forward requests by gRPC status code",
            requests.clone(),
        );
        // 100 us to about 26 s.
        let request_seconds = Histogram::new(exponential_buckets(1e-4, 2.0, 19));
        registry.register(
            "forward_request_duration_seconds",
            "Time from receiving a Forward request to sending its response",
            request_seconds.clone(),
        );
        let forward_passes = Counter::default();
        registry.register(
            "forward_passes",
            "Expert forward passes, each over a batch of one or more requests",
            forward_passes.clone(),
        );
        let batch_tokens = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        registry.register(
            "batch_tokens",
            "Token rows per expert forward pass",
            batch_tokens.clone(),
        );
        let batch_requests = Histogram::new(exponential_buckets(1.0, 2.0, 10));
        registry.register(
            "batch_requests",
            "Requests merged into one expert forward pass",
            batch_requests.clone(),
        );
        // 10 us to about 10 s.
        let pass_seconds = Histogram::new(exponential_buckets(1e-5, 2.0, 21));
        registry.register(
            "forward_pass_duration_seconds",
            "Compute time of one expert forward pass, without queueing",
            pass_seconds.clone(),
        );
        let queued_tokens = Gauge::default();
        registry.register(
            "queued_tokens",
            "Token rows waiting for computation",
            queued_tokens.clone(),
        );
        let rejections = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "rejections",
            "Requests rejected before computation, by reason",
            rejections.clone(),
        );
        let cancelled = Counter::default();
        registry.register(
            "cancelled_jobs",
            "Queued expert jobs dropped because their caller gave up or the deadline passed",
            cancelled.clone(),
        );

        let records_rejected = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "dht_records_rejected",
            "Node records and provider records from other peers rejected, by reason",
            records_rejected.clone(),
        );
        let store_overflows = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "dht_store_overflows",
            "Records not stored because the DHT store was full, by store",
            store_overflows.clone(),
        );
        let publications = Family::<CodeLabel, Counter>::default();
        registry.register(
            "dht_publications",
            "Publications of this node's record and provider keys, by result",
            publications.clone(),
        );
        let connected_peers = Gauge::default();
        registry.register(
            "dht_connected_peers",
            "Peers with an open libp2p connection",
            connected_peers.clone(),
        );

        for reason in REJECTION_REASONS {
            let _ = rejections.get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            });
        }
        for reason in RECORD_REJECTIONS {
            let _ = records_rejected.get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            });
        }
        for code in RESPONSE_CODES {
            let _ = requests.get_or_create(&CodeLabel {
                code: format!("{code:?}"),
            });
        }
        for store in DHT_STORES {
            let _ = store_overflows.get_or_create(&ReasonLabel {
                reason: store.to_owned(),
            });
        }
        for code in ["ok", "failed"] {
            let _ = publications.get_or_create(&CodeLabel {
                code: code.to_owned(),
            });
        }

        Self {
            registry,
            requests,
            request_seconds,
            forward_passes,
            batch_tokens,
            batch_requests,
            pass_seconds,
            pass_seconds_total: Counter::default(),
            queued_tokens,
            rejections,
            cancelled,
            records_rejected,
            store_overflows,
            publications,
            connected_peers,
        }
    }

    pub(crate) fn record_request(&self, code: tonic::Code, seconds: f64) {
        self.requests
            .get_or_create(&CodeLabel {
                code: format!("{code:?}"),
            })
            .inc();
        self.request_seconds.observe(seconds);
    }

    pub(crate) fn record_rejection(&self, reason: &str) {
        debug_assert!(
            REJECTION_REASONS.contains(&reason),
            "rejection reason {reason} missing from REJECTION_REASONS"
        );
        self.rejections
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub(crate) fn record_pass(&self, tokens: usize, requests: usize, seconds: f64) {
        self.forward_passes.inc();
        self.pass_seconds.observe(seconds);
        self.pass_seconds_total.inc_by(seconds);
        self.batch_tokens.observe(tokens as f64);
        self.batch_requests.observe(requests as f64);
    }

    pub(crate) fn set_queued_tokens(&self, tokens: usize) {
        self.queued_tokens.set(tokens as i64);
    }

    pub(crate) fn record_cancelled(&self, jobs: usize) {
        self.cancelled.inc_by(jobs as u64);
    }

    pub(crate) fn record_rejected_record(&self, reason: &str) {
        debug_assert!(
            RECORD_REJECTIONS.contains(&reason),
            "record rejection reason {reason} missing from RECORD_REJECTIONS"
        );
        self.records_rejected
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub(crate) fn record_store_overflow(&self, store: &str) {
        debug_assert!(DHT_STORES.contains(&store), "unknown DHT store {store}");
        self.store_overflows
            .get_or_create(&ReasonLabel {
                reason: store.to_owned(),
            })
            .inc();
    }

    pub(crate) fn record_publication(&self, ok: bool) {
        let code = if ok { "ok" } else { "failed" };
        self.publications
            .get_or_create(&CodeLabel {
                code: code.to_owned(),
            })
            .inc();
    }

    pub(crate) fn set_connected_peers(&self, peers: usize) {
        self.connected_peers.set(peers as i64);
    }

    /// Token rows waiting for computation now.
    pub fn queued_tokens(&self) -> u64 {
        self.queued_tokens.get().max(0) as u64
    }

    /// Records from other peers rejected for `reason` (such as `bad_signature`), so far.
    pub fn rejected_records(&self, reason: &str) -> u64 {
        self.records_rejected
            .get(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .map_or(0, |counter| counter.get())
    }

    /// Records not stored because the store for `store` (`records` or `providers`) was
    /// full, so far.
    pub fn store_overflows(&self, store: &str) -> u64 {
        self.store_overflows
            .get(&ReasonLabel {
                reason: store.to_owned(),
            })
            .map_or(0, |counter| counter.get())
    }

    /// Expert forward passes so far.
    pub fn forward_passes(&self) -> u64 {
        self.forward_passes.get()
    }

    /// Total compute time of all forward passes so far, in seconds.
    pub fn forward_pass_seconds(&self) -> f64 {
        self.pass_seconds_total.get()
    }

    /// Forward requests answered with status `code` so far.
    pub fn requests_with_code(&self, code: tonic::Code) -> u64 {
        self.requests
            .get(&CodeLabel {
                code: format!("{code:?}"),
            })
            .map_or(0, |counter| counter.get())
    }

    /// Requests rejected for `reason` so far, such as `queue_full` or `non_finite_input`.
    pub fn rejections(&self, reason: &str) -> u64 {
        self.rejections
            .get(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .map_or(0, |counter| counter.get())
    }

    /// The metrics in the Prometheus text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Serves `GET /metrics` until `shutdown` changes.
pub(crate) async fn serve(
    listener: TcpListener,
    metrics: Arc<NodeMetrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(error) => {
                tracing::debug!(%error, "metrics accept failed");
                continue;
            }
        };

        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let metrics = Arc::clone(&metrics);
                async move { Ok::<_, std::convert::Infallible>(respond(&request, &metrics)) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            if let Err(error) = connection.await {
                tracing::debug!(%error, %peer, "metrics connection failed");
            }
        });
    }
}

fn respond(
    request: &Request<hyper::body::Incoming>,
    metrics: &NodeMetrics,
) -> Response<Full<Bytes>> {
    let (status, content_type, body) = if request.uri().path() == "/metrics" {
        (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        )
    } else {
        (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found; metrics are at /metrics\n".to_owned(),
        )
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

/// Binds the metrics listener.
pub(crate) async fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(address).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_metrics_show_every_reason() {
        let text = NodeMetrics::new().encode();
        for reason in REJECTION_REASONS {
            let line = format!("expertnet_rejections_total{{reason=\"{reason}\"}} 0");
            assert!(text.contains(&line), "{line} missing from:\n{text}");
        }
        assert!(text.contains("expertnet_dht_store_overflows_total{reason=\"providers\"} 0"));
        assert!(text.contains("expertnet_dht_records_rejected_total{reason=\"stale\"} 0"));
        assert!(text.contains("expertnet_forward_requests_total{code=\"Ok\"} 0"));
        assert!(text.contains("expertnet_dht_publications_total{code=\"failed\"} 0"));
    }
}
