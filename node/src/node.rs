//! Starting and stopping a node in-process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use expertnet_proto::pb;
use expertnet_proto::pb::expert_service_server::ExpertServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;

use crate::announce::{Announcement, Announcer};
use crate::compute::{ComputeQueue, QueueSettings};
use crate::host::HostedModel;
use crate::service::{ExpertServer, ExpertServiceImpl};
use crate::size_limit::SizeLimitLayer;
use crate::{NodeConfig, NodeError, NodeKey, NodeMetrics};

/// HTTP/2 flow-control windows. The 64 KiB defaults stall multi-megabyte tensors: on
/// loopback, 8 / 16 MiB windows cut a 64 KiB echo from 516 to 370 us and a 1 MiB upload
/// from 1.8 to 0.75 ms (tonic 0.14, 2-core AMD EPYC).
pub(crate) const STREAM_WINDOW_BYTES: u32 = 8 << 20;
pub(crate) const CONNECTION_WINDOW_BYTES: u32 = 16 << 20;

/// Smallest accepted `max_message_bytes`.
const MIN_MESSAGE_BYTES: usize = 64 << 10;

/// How long a shutdown waits for the withdrawn node record to be stored.
const WITHDRAW_WAIT: Duration = Duration::from_secs(2);

/// Entry point for running a node in-process.
#[derive(Debug)]
pub struct Node;

/// A node that is serving. Dropping it does not stop it; call [`RunningNode::shutdown`].
#[derive(Debug)]
pub struct RunningNode {
    grpc_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    model_id: String,
    model: Arc<HostedModel>,
    faults: Arc<std::sync::RwLock<crate::FaultConfig>>,
    key: NodeKey,
    metrics: Arc<NodeMetrics>,
    queue: ComputeQueue,
    shutdown: watch::Sender<bool>,
    killed: watch::Sender<bool>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    metrics_server: Option<JoinHandle<()>>,
    announcer: Option<Announcer>,
    p2p_addrs: Vec<libp2p::Multiaddr>,
    drain_timeout: Duration,
}

impl Node {
    /// Loads and verifies the hosted experts, binds the listeners and starts serving.
    ///
    /// # Errors
    /// [`NodeError`] when the checkpoint, manifest or spec is invalid, an expert's digest
    /// differs from the manifest, or a listener cannot be bound.
    pub async fn start(config: NodeConfig, key: NodeKey) -> Result<RunningNode, NodeError> {
        check_limits(&config)?;
        let loaded = {
            let config = config.clone();
            tokio::task::spawn_blocking(move || {
                HostedModel::load(
                    &config.checkpoint,
                    config.manifest.as_deref(),
                    &config.experts,
                    config.compute_dtype,
                )
            })
            .await
            .map_err(|e| NodeError::Config(format!("expert loading task failed: {e}")))??
        };
        let model = Arc::new(loaded);
        let metrics = Arc::new(NodeMetrics::new());

        let threads = config
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let settings = QueueSettings {
            max_queued_tokens: config.limits.max_queued_tokens,
            max_batch_tokens: config.limits.max_batch_tokens,
            batch_wait: config.limits.batch_wait,
            threads,
        };
        let queue = ComputeQueue::new(Arc::clone(&model), &settings, Arc::clone(&metrics))
            .map_err(|source| NodeError::Io {
                what: "start the compute threads".to_owned(),
                error: source,
            })?;

        let listener = TcpListener::bind(config.grpc_listen)
            .await
            .map_err(|source| NodeError::Bind {
                what: "gRPC",
                address: config.grpc_listen,
                error: source,
            })?;
        let grpc_addr = listener.local_addr().map_err(|source| NodeError::Io {
            what: "read the gRPC listen address".to_owned(),
            error: source,
        })?;

        let (shutdown, shutdown_rx) = watch::channel(false);
        let metrics_server = match config.metrics_listen {
            Some(address) => {
                let listener =
                    crate::metrics::bind(address)
                        .await
                        .map_err(|source| NodeError::Bind {
                            what: "metrics",
                            address,
                            error: source,
                        })?;
                let bound = listener.local_addr().ok();
                let task = tokio::spawn(crate::metrics::serve(
                    listener,
                    Arc::clone(&metrics),
                    shutdown_rx.clone(),
                ));
                Some((bound, task))
            }
            None => None,
        };

        let info = info_response(&model, &key, &config);
        let faults = Arc::new(std::sync::RwLock::new(config.faults.clone()));
        if config.faults.is_active() {
            tracing::warn!(faults = %config.faults, "fault injection is on: this node misbehaves on purpose");
        }
        let (killed, killed_rx) = watch::channel(false);
        let server = Arc::new(ExpertServer {
            killed: killed_rx,
            model: Arc::clone(&model),
            queue: queue.clone(),
            key: key.clone(),
            limits: config.limits.clone(),
            metrics: Arc::clone(&metrics),
            info,
            faults: Arc::clone(&faults),
        });
        let service = ExpertServiceServer::new(ExpertServiceImpl(server))
            .max_decoding_message_size(config.limits.max_message_bytes)
            .max_encoding_message_size(config.limits.max_message_bytes);

        // Nodelay must be set on the accepted sockets: `Server::tcp_nodelay` has no effect
        // with `serve_with_incoming`.
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let mut stop = shutdown_rx;
        let router = tonic::transport::Server::builder()
            .initial_stream_window_size(STREAM_WINDOW_BYTES)
            .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
            .layer(SizeLimitLayer {
                max_message_bytes: config.limits.max_message_bytes,
                metrics: Arc::clone(&metrics),
            })
            .add_service(service);
        let server = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async move {
            let _ = stop.changed().await;
        }));

        let announcer = match config.p2p.clone() {
            Some(p2p) => {
                let announcement = Announcement {
                    model_id: model.model_id.clone(),
                    layers: model.layer_sets(),
                    grpc_listen: grpc_addr,
                    limits: node_limits(&config),
                };
                Some(
                    Announcer::start(
                        p2p,
                        &key,
                        announcement,
                        Arc::clone(&metrics),
                        Arc::clone(&faults),
                    )
                    .await?,
                )
            }
            None => None,
        };
        let p2p_addrs: Vec<libp2p::Multiaddr> = announcer
            .as_ref()
            .map(|a| a.listen_addrs().to_vec())
            .unwrap_or_default();

        tracing::info!(
            model_id = model.model_id,
            peer_id = %key.peer_id(),
            grpc = %grpc_addr,
            experts = model.experts.len(),
            "node is serving"
        );
        for address in &p2p_addrs {
            let full = address
                .clone()
                .with_p2p(key.peer_id())
                .unwrap_or_else(|a| a);
            tracing::info!(address = %full, "bootstrap address of this node");
        }
        let (metrics_addr, metrics_server) = match metrics_server {
            Some((bound, task)) => {
                if let Some(address) = bound {
                    tracing::info!(%address, "serving metrics at /metrics");
                }
                (bound, Some(task))
            }
            None => (None, None),
        };

        Ok(RunningNode {
            grpc_addr,
            metrics_addr,
            model_id: model.model_id.clone(),
            model: Arc::clone(&model),
            faults,
            key,
            metrics,
            queue,
            shutdown,
            killed,
            server,
            metrics_server,
            announcer,
            p2p_addrs,
            drain_timeout: config.drain_timeout,
        })
    }
}

/// Maximum fixed batch wait a node accepts. A wait above the callers' deadline (5 s by
/// default in the router) times every request out, so values far above it are mistakes.
pub(crate) const MAX_BATCH_WAIT: Duration = Duration::from_secs(10);

fn check_limits(config: &NodeConfig) -> Result<(), NodeError> {
    let limits = &config.limits;
    let positive = [
        ("max_message_bytes", limits.max_message_bytes),
        ("max_tokens_per_request", limits.max_tokens_per_request),
        ("max_queued_tokens", limits.max_queued_tokens),
        ("max_batch_tokens", limits.max_batch_tokens),
    ];
    for (name, value) in positive {
        if value == 0 {
            let flag = name.replace('_', "-");
            return Err(NodeError::Config(format!(
                "--{flag} ({name} in a config file) is 0; it must be at least 1"
            )));
        }
    }
    if limits.batch_wait > MAX_BATCH_WAIT {
        return Err(NodeError::Config(format!(
            "--batch-wait-us (batch_wait_us in a config file) is {} µs; it must be at most {} µs, because a longer wait outlasts callers' deadlines and times every request out",
            limits.batch_wait.as_micros(),
            MAX_BATCH_WAIT.as_micros()
        )));
    }
    if limits.max_message_bytes < MIN_MESSAGE_BYTES {
        return Err(NodeError::Config(format!(
            "max_message_bytes is {}; it must be at least {MIN_MESSAGE_BYTES}, or even Info responses do not fit",
            limits.max_message_bytes
        )));
    }
    if limits.max_tokens_per_request > limits.max_queued_tokens {
        return Err(NodeError::Config(format!(
            "max_tokens_per_request ({}) is above max_queued_tokens ({}), so a request at the limit could never be queued",
            limits.max_tokens_per_request, limits.max_queued_tokens
        )));
    }
    if config.threads == Some(0) {
        return Err(NodeError::Config(
            "--threads (threads in a config file) is 0; it must be at least 1".to_owned(),
        ));
    }
    Ok(())
}

fn node_limits(config: &NodeConfig) -> expertnet_proto::p2p::NodeLimits {
    let limits = &config.limits;
    let clamp = |value: usize| value.min(u32::MAX as usize) as u32;
    expertnet_proto::p2p::NodeLimits {
        max_message_bytes: limits.max_message_bytes as u64,
        max_tokens_per_request: clamp(limits.max_tokens_per_request),
        max_queued_tokens: clamp(limits.max_queued_tokens),
        max_batch_tokens: clamp(limits.max_batch_tokens),
    }
}

fn info_response(model: &HostedModel, key: &NodeKey, config: &NodeConfig) -> pb::InfoResponse {
    pb::InfoResponse {
        node_id: key.peer_id().to_base58(),
        public_key: bytes::Bytes::copy_from_slice(key.verifying_key().as_bytes()),
        models: vec![pb::HostedModel {
            model_id: model.model_id.clone(),
            model_type: model.config.model_type.clone(),
            hidden_size: model.config.hidden_size as u32,
            compute_dtype: model.compute_dtype.to_wire() as i32,
            layers: model.layer_sets().iter().map(|set| set.to_wire()).collect(),
        }],
        limits: Some(pb::Limits {
            max_message_bytes: config.limits.max_message_bytes as u64,
            max_tokens_per_request: config.limits.max_tokens_per_request as u32,
            max_queued_tokens: config.limits.max_queued_tokens as u32,
            max_batch_tokens: config.limits.max_batch_tokens as u32,
        }),
        version: expertnet_proto::VERSION.to_owned(),
    }
}

impl RunningNode {
    /// The bound gRPC address (with the port the OS chose for port 0).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The bound metrics address, if metrics are served.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// Replaces the faults the node shows, from the next request on.
    pub fn set_faults(&self, faults: crate::FaultConfig) {
        if faults.is_active() {
            tracing::warn!(
                %faults,
                "fault injection is on: this node misbehaves on purpose"
            );
        }
        if let Ok(mut current) = self.faults.write() {
            *current = faults;
        }
    }

    /// The weights of a hosted expert, sharing memory with the node's copy, so that
    /// benchmarks and tests compare with local computation on the very same weights.
    pub fn hosted_expert(&self, layer: u32, expert: u32) -> Option<expertnet_model::Expert> {
        let slot = self.model.slot(layer, expert)?;
        Some(self.model.experts[slot].weights.clone())
    }

    pub fn key(&self) -> &NodeKey {
        &self.key
    }

    pub fn metrics(&self) -> &Arc<NodeMetrics> {
        &self.metrics
    }

    /// The bound libp2p listen addresses, empty when discovery is off.
    pub fn p2p_addrs(&self) -> &[libp2p::Multiaddr] {
        &self.p2p_addrs
    }

    /// A full bootstrap address of this node (`.../p2p/<peer id>`): the first libp2p
    /// listen address with the peer id appended.
    pub fn bootstrap_addr(&self) -> Option<libp2p::Multiaddr> {
        self.p2p_addrs.first().map(|address| {
            address
                .clone()
                .with_p2p(self.key.peer_id())
                .unwrap_or_else(|a| a)
        })
    }

    /// Stops at once, as a crash would: connections drop, queued jobs are abandoned, and
    /// the node's records stay in the DHT until they expire.
    pub fn kill(self) {
        let _ = self.killed.send(true);
        self.server.abort();
        if let Some(task) = self.metrics_server {
            task.abort();
        }
        if let Some(announcer) = self.announcer {
            announcer.abort();
        }
        tracing::info!(grpc = %self.grpc_addr, "node killed");
    }

    /// Stops gracefully: stops accepting connections, finishes in-flight requests (waiting
    /// at most the configured drain timeout), then waits for queued computation to end.
    ///
    /// # Errors
    /// [`NodeError::Drain`] when in-flight requests did not finish within the drain timeout.
    pub async fn shutdown(self) -> Result<(), NodeError> {
        tracing::info!(grpc = %self.grpc_addr, "stopping: no new connections, finishing in-flight requests");
        let _ = self.shutdown.send(true);

        // Withdraw first, so clients stop choosing this node while it drains.
        if let Some(announcer) = self.announcer {
            let started = std::time::Instant::now();
            announcer.withdraw(WITHDRAW_WAIT).await;
            tracing::info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "published the withdrawal of this node's record to the DHT"
            );
        }

        let mut server = self.server;
        let drained = tokio::time::timeout(self.drain_timeout, &mut server).await;
        let queue = self.queue;
        let _ = tokio::task::spawn_blocking(move || queue.close()).await;
        if let Some(task) = self.metrics_server {
            task.abort();
        }

        let result = match drained {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(error))) => Err(NodeError::Serve(error.to_string())),
            Ok(Err(join_error)) => Err(NodeError::Serve(join_error.to_string())),
            Err(_) => {
                server.abort();
                Err(NodeError::Drain {
                    timeout: self.drain_timeout,
                })
            }
        };

        tracing::info!("node stopped");
        result
    }
}
