//! The node's side of discovery: a libp2p swarm in Kademlia server mode. It validates other
//! peers' records before storing them. It publishes this node's provider keys and signed
//! node record, republishes them well inside their TTL and withdraws them on shutdown.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use expertnet_proto::LayerExperts;
use expertnet_proto::p2p::{
    self, Behaviour, BehaviourEvent, Bootstrapper, DhtSettings, NodeLimits, NodeRecord, RecordClock,
};
use futures::StreamExt;
use libp2p::kad::{self, store::RecordStore};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm, identify};
use tokio::sync::{mpsc, oneshot};

use crate::{NodeError, NodeKey, NodeMetrics};

/// Discovery settings of a node.
#[derive(Debug, Clone)]
pub struct P2pConfig {
    /// libp2p listen addresses, such as `/ip4/0.0.0.0/tcp/4100` and
    /// `/ip4/0.0.0.0/udp/4100/quic-v1`.
    pub listen: Vec<Multiaddr>,
    /// Peers to join the network through, each `/ip4/.../tcp/PORT/p2p/PEER_ID`. Empty for
    /// the first node of a network.
    pub bootstrap: Vec<Multiaddr>,
    /// Addresses to announce instead of the listen addresses, for nodes behind NAT or in
    /// containers. An address ending in `/http`, such as `/dns4/host/tcp/50051/http`, is a
    /// gRPC endpoint; any other is a libp2p address.
    pub external: Vec<Multiaddr>,
    /// How often the node republishes its record and provider keys. Default 30 s, a third
    /// of the default record TTL.
    pub republish_interval: Duration,
    /// DHT settings, the same for the whole network; `record_ttl` defaults to 90 s.
    pub dht: DhtSettings,
    /// How far in the future another peer's record may be dated. Default 30 s.
    pub max_clock_skew: Duration,
}

impl Default for P2pConfig {
    fn default() -> Self {
        Self {
            listen: vec![
                "/ip4/127.0.0.1/tcp/0"
                    .parse()
                    .unwrap_or_else(|_| Multiaddr::empty()),
            ],
            bootstrap: Vec::new(),
            external: Vec::new(),
            republish_interval: Duration::from_secs(30),
            dht: DhtSettings::default(),
            max_clock_skew: Duration::from_secs(30),
        }
    }
}

/// The facts about the node that its records announce.
#[derive(Debug, Clone)]
pub(crate) struct Announcement {
    pub(crate) model_id: String,
    pub(crate) layers: Vec<LayerExperts>,
    pub(crate) grpc_listen: SocketAddr,
    pub(crate) limits: NodeLimits,
}

/// A handle to the announcer task.
#[derive(Debug)]
pub(crate) struct Announcer {
    commands: mpsc::Sender<Command>,
    task: tokio::task::JoinHandle<()>,
    listen_addrs: Vec<Multiaddr>,
}

#[derive(Debug)]
enum Command {
    /// Publish a withdrawn record, wait at most the given time for it to be stored, stop.
    Withdraw {
        wait: Duration,
        done: oneshot::Sender<()>,
    },
}

impl Announcer {
    /// Starts the swarm, listens and begins announcing. Returns once every listen address
    /// is bound.
    pub(crate) async fn start(
        config: P2pConfig,
        key: &NodeKey,
        announcement: Announcement,
        metrics: Arc<NodeMetrics>,
        faults: Arc<std::sync::RwLock<crate::FaultConfig>>,
    ) -> Result<Self, NodeError> {
        for address in &config.listen {
            check_port_free(address)?;
        }
        let mut swarm = p2p::build_swarm(key.keypair(), true, &config.dht)
            .map_err(|reason| NodeError::P2p(format!("cannot set up libp2p: {reason}")))?;
        for address in &config.listen {
            swarm.listen_on(address.clone()).map_err(|error| {
                NodeError::P2p(format!(
                    "cannot listen for libp2p on {address}: {}",
                    describe_error(&error)
                ))
            })?;
        }

        let mut external_grpc = Vec::new();
        for address in &config.external {
            match classify_external(address)? {
                External::Grpc(endpoint) => external_grpc.push(endpoint),
                External::P2p => swarm.add_external_address(address.clone()),
            }
        }

        // Wait for the listeners, so the caller can report the bound addresses.
        let mut listen_addrs = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while listen_addrs.len() < config.listen.len() {
            let event = tokio::time::timeout_at(deadline, swarm.select_next_some())
                .await
                .map_err(|_| {
                    NodeError::P2p("libp2p listeners did not start within 10 s".to_owned())
                })?;
            match event {
                SwarmEvent::NewListenAddr { address, .. } => listen_addrs.push(address),
                SwarmEvent::ListenerError { error, .. }
                | SwarmEvent::ListenerClosed {
                    reason: Err(error), ..
                } => {
                    return Err(NodeError::P2p(format!("libp2p listener failed: {error}")));
                }
                _ => {}
            }
        }

        let loopback_only = config.listen.iter().all(is_loopback);
        let mut state = State {
            peer_id: key.peer_id(),
            keypair: key.keypair().clone(),
            bootstrap: Bootstrapper::new(config.bootstrap.clone()),
            announcement,
            external_grpc,
            loopback_only,
            listen_addrs: Vec::new(),
            metrics,
            faults,
            republish_interval: config.republish_interval,
            next_publish: Instant::now(),
            last_sequence: 0,
            clock_skew: config.max_clock_skew,
            record_ttl: config.dht.record_ttl,
            withdraw: None,
            connected: HashSet::new(),
        };
        for address in &listen_addrs {
            state.on_listen_addr(&mut swarm, address);
        }

        let (commands, receiver) = mpsc::channel(4);
        let task = tokio::spawn(run(swarm, state, receiver));
        Ok(Self {
            commands,
            task,
            listen_addrs,
        })
    }

    /// The bound libp2p listen addresses, with OS-chosen ports filled in.
    pub(crate) fn listen_addrs(&self) -> &[Multiaddr] {
        &self.listen_addrs
    }

    /// Publishes a withdrawn record, waits at most `wait` for the network to store it, and
    /// stops the swarm.
    pub(crate) async fn withdraw(self, wait: Duration) {
        let (done, finished) = oneshot::channel();
        if self
            .commands
            .send(Command::Withdraw { wait, done })
            .await
            .is_ok()
        {
            let _ = tokio::time::timeout(wait + Duration::from_secs(1), finished).await;
        }
        self.task.abort();
    }

    /// Stops the swarm at once, as a crash would: nothing is withdrawn.
    pub(crate) fn abort(self) {
        self.task.abort();
    }
}

struct State {
    peer_id: PeerId,
    keypair: libp2p::identity::Keypair,
    bootstrap: Bootstrapper,
    announcement: Announcement,
    /// gRPC endpoints from `--external-addr ... /http`.
    external_grpc: Vec<String>,
    /// Whether every configured listen address is loopback; only then is loopback
    /// announced.
    loopback_only: bool,
    /// Announceable listen addresses reported by the swarm.
    listen_addrs: Vec<Multiaddr>,
    metrics: Arc<NodeMetrics>,
    /// For the advertised-load fault.
    faults: Arc<std::sync::RwLock<crate::FaultConfig>>,
    republish_interval: Duration,
    next_publish: Instant,
    last_sequence: u64,
    clock_skew: Duration,
    record_ttl: Duration,
    /// The withdrawal in progress: its query and who waits for it.
    withdraw: Option<(Option<kad::QueryId>, oneshot::Sender<()>, Instant)>,
    connected: HashSet<PeerId>,
}

async fn run(mut swarm: Swarm<Behaviour>, mut state: State, mut commands: mpsc::Receiver<Command>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            event = swarm.select_next_some() => state.on_event(&mut swarm, event),
            _ = tick.tick() => {
                let now = Instant::now();
                state.bootstrap.tick(&mut swarm, now);
                if state.withdraw.is_none() && now >= state.next_publish {
                    state.publish(&mut swarm, false);
                }
                if let Some((_, _, deadline)) = &state.withdraw
                    && now >= *deadline {
                        state.finish_withdrawal();
                        return;
                    }
            }
            command = commands.recv() => match command {
                Some(Command::Withdraw { wait, done }) => {
                    let query = state.publish(&mut swarm, true);
                    state.withdraw = Some((query, done, Instant::now() + wait));
                }
                None => return,
            },
        }
        if state
            .withdraw
            .as_ref()
            .is_some_and(|(query, _, _)| query.is_none())
        {
            state.finish_withdrawal();
            return;
        }
    }
}

impl State {
    fn on_listen_addr(&mut self, swarm: &mut Swarm<Behaviour>, address: &Multiaddr) {
        tracing::info!(%address, peer_id = %self.peer_id, "libp2p listening");
        if announceable(address, self.loopback_only) && !self.listen_addrs.contains(address) {
            self.listen_addrs.push(address.clone());
            swarm.add_external_address(address.clone());
        }
    }

    fn on_event(&mut self, swarm: &mut Swarm<Behaviour>, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => self.on_listen_addr(swarm, &address),
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                let first = self.connected.is_empty();
                self.connected.insert(peer_id);
                self.metrics.set_connected_peers(self.connected.len());
                let is_bootstrap =
                    self.bootstrap
                        .on_connected(swarm, &peer_id, endpoint.get_remote_address());
                if first {
                    tracing::info!(peer = %peer_id, "connected to the network");
                }
                if first || is_bootstrap {
                    // A new way into the network: refresh the routing table and announce
                    // at once, so a node that started alone becomes visible as soon as it
                    // is connected.
                    let _ = swarm.behaviour_mut().kad.bootstrap();
                    self.next_publish = Instant::now();
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                // One line per failed bootstrap dial; dials back off to one every 10 s.
                if let Some(address) = self.bootstrap.on_dial_failed(peer_id.as_ref(), &error) {
                    tracing::warn!(%address, %error, "cannot reach bootstrap peer; retrying");
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                self.connected.remove(&peer_id);
                self.metrics.set_connected_peers(self.connected.len());
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                p2p::learn_addresses(swarm, &peer_id, &info);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(event)) => self.on_kad_event(swarm, event),
            _ => {}
        }
    }

    fn on_kad_event(&mut self, swarm: &mut Swarm<Behaviour>, event: kad::Event) {
        match event {
            kad::Event::InboundRequest { request } => match request {
                kad::InboundRequest::PutRecord {
                    source,
                    record: Some(record),
                    ..
                } => {
                    self.store_record(swarm, source, record);
                }
                kad::InboundRequest::AddProvider {
                    record: Some(record),
                } => {
                    self.store_provider(swarm, record);
                }
                _ => {}
            },
            kad::Event::OutboundQueryProgressed {
                id, result, step, ..
            } => {
                let ok = match &result {
                    kad::QueryResult::PutRecord(result) => result.is_ok(),
                    kad::QueryResult::StartProviding(result) => result.is_ok(),
                    _ => return,
                };
                if step.last {
                    self.metrics.record_publication(ok);
                    if !ok {
                        tracing::debug!(?result, "publication did not reach enough peers");
                    }
                }
                if let Some((query, _, _)) = &mut self.withdraw
                    && *query == Some(id)
                {
                    *query = None;
                }
            }
            _ => {}
        }
    }

    /// Stores a node record another peer published, after validating it; an older record
    /// of the same node never replaces a newer one.
    fn store_record(&mut self, swarm: &mut Swarm<Behaviour>, source: PeerId, record: kad::Record) {
        let Some(owner) = p2p::parse_node_record_key(&record.key) else {
            tracing::debug!(%source, "rejected a record under a key this protocol does not use");
            self.metrics.record_rejected_record("unknown_key");
            return;
        };
        let clock = RecordClock {
            now_ms: p2p::unix_millis(),
            max_skew: self.clock_skew,
            max_age: Some(self.record_ttl),
        };
        let node_record = match NodeRecord::verify(&record.value, &owner, clock) {
            Ok(node_record) => node_record,
            Err(error) => {
                tracing::debug!(%source, %owner, %error, "rejected a node record");
                self.metrics.record_rejected_record(error.reason());
                return;
            }
        };

        let store = swarm.behaviour_mut().kad.store_mut();
        let newer_stored = store.get(&record.key).and_then(|stored| {
            NodeRecord::verify(&stored.value, &owner, clock)
                .ok()
                .filter(|stored| stored.sequence > node_record.sequence)
        });
        if newer_stored.is_some() {
            tracing::debug!(%owner, sequence = node_record.sequence, "kept a newer stored node record");
            self.metrics.record_rejected_record("older_sequence");
            return;
        }
        if let Err(error) = store.put(record) {
            tracing::warn!(%owner, %error, "DHT record store is full; a node record was not stored");
            self.metrics.record_store_overflow("records");
        }
    }

    fn store_provider(&mut self, swarm: &mut Swarm<Behaviour>, record: kad::ProviderRecord) {
        if !p2p::is_provider_key(&record.key) {
            tracing::debug!(provider = %record.provider, "rejected a provider record under a key this protocol does not use");
            self.metrics.record_rejected_record("unknown_key");
            return;
        }

        let store = swarm.behaviour_mut().kad.store_mut();
        let providers = store.providers(&record.key);
        let known = providers.iter().any(|p| p.provider == record.provider);
        if !known && providers.len() >= p2p::MAX_PROVIDERS_PER_KEY {
            tracing::warn!(
                provider = %record.provider,
                limit = p2p::MAX_PROVIDERS_PER_KEY,
                "a provider key has reached its provider limit; the provider was not stored"
            );
            self.metrics.record_store_overflow("providers");
            return;
        }
        let provider = record.provider;
        let addresses = record.addresses.len();
        if let Err(error) = store.add_provider(record) {
            tracing::warn!(%error, "DHT provider store is full; a provider record was not stored");
        } else {
            tracing::trace!(%provider, addresses, "stored a provider record");
            self.metrics.record_store_overflow("providers");
        }
    }

    /// Publishes the node record and, unless withdrawing, the provider keys. Returns the
    /// query of the node record.
    fn publish(&mut self, swarm: &mut Swarm<Behaviour>, withdrawn: bool) -> Option<kad::QueryId> {
        self.next_publish = Instant::now() + self.republish_interval;
        let now_ms = p2p::unix_millis();
        self.last_sequence = now_ms.max(self.last_sequence + 1);

        let announcement = &self.announcement;
        let record = NodeRecord {
            peer_id: self.peer_id,
            grpc_endpoints: self.grpc_endpoints(),
            p2p_addrs: swarm.external_addresses().take(8).cloned().collect(),
            model_id: announcement.model_id.clone(),
            layers: if withdrawn {
                Vec::new()
            } else {
                announcement.layers.clone()
            },
            capacity_tokens: announcement.limits.max_queued_tokens,
            load_tokens: self
                .faults
                .read()
                .ok()
                .and_then(|faults| faults.advertised_load)
                .unwrap_or_else(|| self.metrics.queued_tokens().min(u64::from(u32::MAX)) as u32),
            version: expertnet_proto::VERSION.to_owned(),
            sequence: self.last_sequence,
            timestamp_ms: now_ms,
            limits: announcement.limits,
            withdrawn,
        };
        let value = match record.sign(&self.keypair) {
            Ok(value) => value,
            Err(error) => {
                tracing::warn!(%error, "cannot sign the node record");
                return None;
            }
        };

        let kad = &mut swarm.behaviour_mut().kad;
        let key = p2p::node_record_key(&self.peer_id);
        let query = match kad.put_record(kad::Record::new(key, value), kad::Quorum::One) {
            Ok(query) => Some(query),
            Err(error) => {
                tracing::warn!(%error, "cannot store the node record locally");
                self.metrics.record_store_overflow("records");
                None
            }
        };

        let keys = announcement.layers.iter().map(|set| {
            p2p::layer_key(
                &announcement.model_id,
                set.layer,
                p2p::provider_shard(&self.peer_id),
            )
        });
        for key in keys {
            if withdrawn {
                kad.stop_providing(&key);
            } else if let Err(error) = kad.start_providing(key) {
                tracing::warn!(%error, "cannot store a provider key locally");
                self.metrics.record_store_overflow("providers");
            }
        }
        tracing::debug!(
            sequence = record.sequence,
            withdrawn,
            "published the node record"
        );
        query
    }

    /// gRPC endpoints to announce: `--external-addr .../http` entries if any, else the gRPC
    /// listen address, or, when it is a wildcard, the IPs of the announced libp2p
    /// addresses with the gRPC port.
    fn grpc_endpoints(&self) -> Vec<String> {
        if !self.external_grpc.is_empty() {
            return self.external_grpc.clone();
        }
        let listen = self.announcement.grpc_listen;
        if !listen.ip().is_unspecified() {
            return vec![http_endpoint(listen.ip(), listen.port())];
        }

        let mut endpoints: Vec<String> = self
            .listen_addrs
            .iter()
            .filter_map(ip_of)
            .filter(|ip| !ip.is_unspecified())
            .map(|ip| http_endpoint(ip, listen.port()))
            .collect();
        endpoints.dedup();
        endpoints.truncate(8);
        endpoints
    }

    fn finish_withdrawal(&mut self) {
        if let Some((_, done, _)) = self.withdraw.take() {
            let _ = done.send(());
        }
    }
}

/// Fails when another process listens on a listen address's fixed port. libp2p binds TCP
/// ports with `SO_REUSEPORT` (to dial from its listen port), so two nodes could otherwise
/// share a port and split its connections between them without an error.
fn check_port_free(address: &Multiaddr) -> Result<(), NodeError> {
    let mut ip = None;
    let mut port = None;
    let mut udp = false;
    for part in address.iter() {
        match part {
            Protocol::Ip4(v4) => ip = Some(IpAddr::V4(v4)),
            Protocol::Ip6(v6) => ip = Some(IpAddr::V6(v6)),
            Protocol::Tcp(p) => port = Some(p),
            Protocol::Udp(p) => {
                port = Some(p);
                udp = true;
            }
            _ => {}
        }
    }
    let (Some(ip), Some(port)) = (ip, port.filter(|&p| p != 0)) else {
        return Ok(());
    };

    let socket = SocketAddr::new(ip, port);
    let result = if udp {
        std::net::UdpSocket::bind(socket).map(drop)
    } else {
        std::net::TcpListener::bind(socket).map(drop)
    };
    result.map_err(|error| {
        NodeError::P2p(format!(
            "cannot listen for libp2p on {address}: {error}; choose another port with --p2p-listen, or stop the process that uses it"
        ))
    })
}

/// An error with its sources, or its debug form when its message is empty (some libp2p
/// transport errors have none).
fn describe_error(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !cause_text.is_empty() && !text.contains(&cause_text) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    if text.trim().is_empty() {
        format!("{error:?}")
    } else {
        text
    }
}

fn http_endpoint(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(ip) => format!("http://{ip}:{port}"),
        IpAddr::V6(ip) => format!("http://[{ip}]:{port}"),
    }
}

fn ip_of(address: &Multiaddr) -> Option<IpAddr> {
    address.iter().find_map(|part| match part {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

fn is_loopback(address: &Multiaddr) -> bool {
    ip_of(address).is_some_and(|ip| ip.is_loopback())
}

/// Whether a listen address may be announced: never a wildcard, and loopback only when the
/// node listens on loopback alone.
fn announceable(address: &Multiaddr, loopback_only: bool) -> bool {
    match ip_of(address) {
        Some(ip) => !ip.is_unspecified() && (loopback_only || !ip.is_loopback()),
        None => true,
    }
}

enum External {
    Grpc(String),
    P2p,
}

/// Sorts an `--external-addr` value into a gRPC endpoint or a libp2p address, rejecting
/// anything that is neither, and wildcard hosts, which no peer can dial.
fn classify_external(address: &Multiaddr) -> Result<External, NodeError> {
    let invalid = |reason: &str| {
        NodeError::Config(format!(
            "invalid --external-addr {address}: {reason}; use /ip4/HOST/tcp/PORT or /ip4/HOST/udp/PORT/quic-v1 for libp2p, or /ip4/HOST/tcp/PORT/http (or /dns4/NAME/...) for the gRPC endpoint"
        ))
    };
    if ip_of(address).is_some_and(|ip| ip.is_unspecified()) {
        return Err(invalid("a wildcard address cannot be dialed"));
    }
    if let Some(endpoint) = grpc_endpoint(address) {
        return Ok(External::Grpc(endpoint));
    }

    let parts: Vec<Protocol<'_>> = address
        .iter()
        .filter(|part| !matches!(part, Protocol::P2p(_)))
        .collect();
    let host_ok = |part: &Protocol<'_>| {
        matches!(
            part,
            Protocol::Ip4(_)
                | Protocol::Ip6(_)
                | Protocol::Dns(_)
                | Protocol::Dns4(_)
                | Protocol::Dns6(_)
        )
    };
    match parts.as_slice() {
        [host, Protocol::Tcp(port)] if host_ok(host) && *port != 0 => Ok(External::P2p),
        [host, Protocol::Udp(port), Protocol::QuicV1] if host_ok(host) && *port != 0 => {
            Ok(External::P2p)
        }
        _ => Err(invalid(
            "it is neither a libp2p TCP or QUIC address nor a gRPC endpoint",
        )),
    }
}

/// The gRPC endpoint of an external address ending in `/http`: `/ip4/A/tcp/P/http`,
/// `/ip6/A/tcp/P/http` or `/dns4/NAME/tcp/P/http` (and `/dns`, `/dns6`).
pub(crate) fn grpc_endpoint(address: &Multiaddr) -> Option<String> {
    let parts: Vec<Protocol<'_>> = address.iter().collect();
    let [host, Protocol::Tcp(port), Protocol::Http] = parts.as_slice() else {
        return None;
    };
    match host {
        Protocol::Ip4(ip) => Some(format!("http://{ip}:{port}")),
        Protocol::Ip6(ip) => Some(format!("http://[{ip}]:{port}")),
        Protocol::Dns(name) | Protocol::Dns4(name) | Protocol::Dns6(name) => {
            Some(format!("http://{name}:{port}"))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn external_http_addresses_become_endpoints() {
        let cases = [
            (
                "/ip4/127.0.0.1/tcp/50051/http",
                Some("http://127.0.0.1:50051"),
            ),
            ("/dns4/node-1/tcp/50051/http", Some("http://node-1:50051")),
            ("/ip6/::1/tcp/7/http", Some("http://[::1]:7")),
            ("/ip4/127.0.0.1/tcp/4100", None),
            ("/ip4/127.0.0.1/udp/4100/quic-v1", None),
        ];
        for (address, expected) in cases {
            let address: Multiaddr = address.parse().unwrap();
            assert_eq!(grpc_endpoint(&address).as_deref(), expected, "{address}");
        }
    }

    #[test]
    fn external_addresses_are_classified() {
        let good = [
            "/ip4/127.0.0.1/tcp/4100",
            "/ip4/127.0.0.1/udp/4100/quic-v1",
            "/dns4/node-1/tcp/4100",
            "/ip4/127.0.0.1/tcp/50051/http",
        ];
        for address in good {
            assert!(
                classify_external(&address.parse().unwrap()).is_ok(),
                "{address}"
            );
        }
        let bad = [
            "/ip4/127.0.0.1/tcp/50058/https",
            "/ip4/127.0.0.1/udp/50059/http",
            "/ip4/127.0.0.1",
            "/ip4/0.0.0.0/tcp/50058/http",
            "/ip4/0.0.0.0/tcp/4100",
            "/ip4/127.0.0.1/tcp/0",
        ];
        for address in bad {
            let error = classify_external(&address.parse().unwrap())
                .err()
                .unwrap()
                .to_string();
            assert!(
                error.contains("invalid --external-addr"),
                "{address}: {error}"
            );
        }
    }

    #[test]
    fn wildcard_and_loopback_announcement_rules() {
        let wildcard: Multiaddr = "/ip4/0.0.0.0/tcp/1".parse().unwrap();
        let loopback: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().unwrap();
        let dns: Multiaddr = "/dns4/node/tcp/1".parse().unwrap();
        assert!(!announceable(&wildcard, true));
        assert!(!announceable(&wildcard, false));
        assert!(announceable(&loopback, true));
        assert!(!announceable(&loopback, false));
        assert!(announceable(&dns, false));
    }
}
