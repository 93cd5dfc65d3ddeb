//! The discovery task: owns the swarm, runs lookups and keeps the caches.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use expertnet_proto::p2p::{
    self, Behaviour, BehaviourEvent, Bootstrapper, NodeRecord, RecordClock,
};
use futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::kad::{self, GetProvidersOk, GetRecordOk, QueryId};
use libp2p::swarm::SwarmEvent;
use libp2p::{PeerId, Swarm, identify};
use tokio::sync::{mpsc, oneshot};

use super::{Command, DiscoveryConfig, DiscoveryError, DiscoveryStats, LayerReplicas, Replica};

pub(super) fn spawn(
    keypair: &Keypair,
    config: DiscoveryConfig,
    commands: mpsc::Receiver<Command>,
    stats: Arc<DiscoveryStats>,
) -> Result<(), DiscoveryError> {
    let swarm = p2p::build_swarm(keypair, false, &config.dht).map_err(DiscoveryError::Setup)?;
    let allow_loopback = config.allow_loopback_endpoints.unwrap_or_else(|| {
        config.bootstrap.iter().all(|address| {
            address.iter().any(|part| match part {
                libp2p::multiaddr::Protocol::Ip4(ip) => ip.is_loopback(),
                libp2p::multiaddr::Protocol::Ip6(ip) => ip.is_loopback(),
                libp2p::multiaddr::Protocol::Dns(name)
                | libp2p::multiaddr::Protocol::Dns4(name)
                | libp2p::multiaddr::Protocol::Dns6(name) => name == "localhost",
                _ => false,
            })
        })
    });

    let state = EventLoop {
        bootstrap: Bootstrapper::new(config.bootstrap.clone()),
        config,
        stats,
        allow_loopback,
        routable: false,
        bootstrap_waiters: Vec::new(),
        records: HashMap::new(),
        suppressed: HashMap::new(),
        layers: HashMap::new(),
        lookups: HashMap::new(),
        waiting_for_peers: Vec::new(),
        provider_queries: HashMap::new(),
        record_queries: HashMap::new(),
        records_in_flight: HashMap::new(),
    };
    tokio::spawn(state.run(swarm, commands));
    Ok(())
}

/// The target of a lookup.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Target {
    Layer {
        model_id: String,
        layer: u32,
    },
    /// Every node the client can find, by walking the DHT.
    Directory,
}

/// Random lookups of a directory walk. Each returns the 20 peers closest to a random key,
/// so a network of a few hundred nodes is covered; a larger one is sampled.
const WALK_LOOKUPS: usize = 16;

enum Waiter {
    Layer(oneshot::Sender<Arc<LayerReplicas>>),
    Directory(oneshot::Sender<Vec<NodeRecord>>),
}

struct Lookup {
    waiters: Vec<Waiter>,
    /// Peers whose node records the lookup uses: providers of a layer key, or every peer
    /// a directory walk met.
    providers: HashSet<PeerId>,
    /// DHT queries of this lookup still running.
    queries_left: usize,
    /// When the lookup last found a provider or a record.
    last_progress: Instant,
    /// Providers whose node record is being fetched.
    pending_records: HashSet<PeerId>,
    deadline: Instant,
    started: bool,
}

struct CachedRecord {
    record: NodeRecord,
    fetched: Instant,
}

struct CachedLayer {
    replicas: Arc<LayerReplicas>,
    resolved: Instant,
    last_used: Instant,
}

struct EventLoop {
    config: DiscoveryConfig,
    stats: Arc<DiscoveryStats>,
    bootstrap: Bootstrapper,
    allow_loopback: bool,
    /// Whether a connection to the network has been made, so queries can run.
    routable: bool,
    bootstrap_waiters: Vec<oneshot::Sender<()>>,
    /// The newest valid node record seen per peer.
    records: HashMap<PeerId, CachedRecord>,
    /// Peers reported failed, with the record sequence at that time: records up to that
    /// sequence are ignored, a newer one (the node republished or restarted) lifts it.
    suppressed: HashMap<PeerId, u64>,
    layers: HashMap<(String, u32), CachedLayer>,
    lookups: HashMap<Target, Lookup>,
    /// Lookups waiting for the routing table to have a peer.
    waiting_for_peers: Vec<Target>,
    provider_queries: HashMap<QueryId, Target>,
    record_queries: HashMap<QueryId, PeerId>,
    records_in_flight: HashMap<PeerId, QueryId>,
}

/// A lookup that has found providers and all their records, then nothing new for this
/// long, completes without waiting for its queries to end: a query that meets a crashed
/// peer waits for that peer's timeout, which is seconds.
const QUIESCENCE: Duration = Duration::from_millis(300);

/// How often the task checks deadlines, retries bootstrap dials and refreshes the cache.
const TICK: Duration = Duration::from_millis(100);

/// Cached layers unused for this many cache TTLs are no longer refreshed, and dropped.
const IDLE_TTLS: u32 = 6;

impl EventLoop {
    async fn run(mut self, mut swarm: Swarm<Behaviour>, mut commands: mpsc::Receiver<Command>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = swarm.select_next_some() => self.on_event(&mut swarm, event),
                command = commands.recv() => match command {
                    Some(command) => self.on_command(&mut swarm, command),
                    None => return,
                },
                _ = tick.tick() => self.on_tick(&mut swarm),
            }
        }
    }

    fn on_command(&mut self, swarm: &mut Swarm<Behaviour>, command: Command) {
        match command {
            Command::WaitBootstrapped { reply } => {
                if self.routable {
                    let _ = reply.send(());
                } else {
                    self.bootstrap_waiters.push(reply);
                }
            }
            Command::Resolve {
                model_id,
                layer,
                fresh,
                reply,
            } => {
                let key = (model_id.clone(), layer);
                if !fresh
                    && let Some(cached) = self.layers.get_mut(&key)
                    && cached.resolved.elapsed() < self.config.cache_ttl
                {
                    cached.last_used = Instant::now();
                    self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                    let _ = reply.send(Arc::clone(&cached.replicas));
                    return;
                }
                self.lookup(
                    swarm,
                    Target::Layer { model_id, layer },
                    Some(Waiter::Layer(reply)),
                );
            }
            Command::Nodes { reply } => {
                self.lookup(swarm, Target::Directory, Some(Waiter::Directory(reply)));
            }
            Command::ReportFailure { peer } => self.drop_peer(&peer),
            Command::DescribeBootstrap { reply } => {
                let _ = reply.send(self.bootstrap.describe_failures());
            }
        }
    }

    /// Starts a lookup, or joins the one in flight for the same target.
    fn lookup(&mut self, swarm: &mut Swarm<Behaviour>, target: Target, waiter: Option<Waiter>) {
        if let Some(lookup) = self.lookups.get_mut(&target) {
            lookup.waiters.extend(waiter);
            return;
        }

        self.stats.lookups.fetch_add(1, Ordering::Relaxed);
        let lookup = Lookup {
            waiters: waiter.into_iter().collect(),
            providers: HashSet::new(),
            queries_left: 0,
            last_progress: Instant::now(),
            pending_records: HashSet::new(),
            deadline: Instant::now() + self.config.lookup_timeout,
            started: false,
        };
        self.lookups.insert(target.clone(), lookup);
        if self.routable {
            self.start_lookup(swarm, &target);
        } else {
            self.waiting_for_peers.push(target);
        }
    }

    fn start_lookup(&mut self, swarm: &mut Swarm<Behaviour>, target: &Target) {
        let Some(lookup) = self.lookups.get_mut(target) else {
            return;
        };
        lookup.started = true;
        let kad = &mut swarm.behaviour_mut().kad;
        let queries: Vec<QueryId> = match target {
            Target::Layer { model_id, layer } => (0..p2p::PROVIDER_SHARDS)
                .map(|shard| kad.get_providers(p2p::layer_key(model_id, *layer, shard)))
                .collect(),
            Target::Directory => (0..WALK_LOOKUPS)
                .map(|_| kad.get_closest_peers(PeerId::random()))
                .collect(),
        };
        lookup.queries_left = queries.len();
        for query in queries {
            self.provider_queries.insert(query, target.clone());
        }
        tracing::debug!(?target, "lookup started");
    }

    fn on_tick(&mut self, swarm: &mut Swarm<Behaviour>) {
        let now = Instant::now();
        self.bootstrap.tick(swarm, now);

        let expired: Vec<Target> = self
            .lookups
            .iter()
            .filter(|(_, lookup)| now >= lookup.deadline)
            .map(|(target, _)| target.clone())
            .collect();
        for target in expired {
            tracing::debug!(
                ?target,
                "lookup reached its timeout; answering with what it found"
            );
            self.complete(&target);
        }

        let quiet: Vec<Target> = self
            .lookups
            .iter()
            .filter(|(_, lookup)| {
                lookup.started
                    && !lookup.providers.is_empty()
                    && lookup.pending_records.is_empty()
                    && now.duration_since(lookup.last_progress) >= QUIESCENCE
            })
            .map(|(target, _)| target.clone())
            .collect();
        for target in quiet {
            tracing::debug!(?target, "lookup found nothing new for a while; answering");
            self.complete(&target);
        }

        // Refresh cached layers in use before they go stale; forget long-unused ones.
        let ttl = self.config.cache_ttl;
        self.layers
            .retain(|_, cached| cached.last_used.elapsed() < ttl * IDLE_TTLS);
        let due: Vec<Target> = self
            .layers
            .iter()
            .filter(|(_, cached)| cached.resolved.elapsed() >= ttl / 2)
            .map(|((model_id, layer), _)| Target::Layer {
                model_id: model_id.clone(),
                layer: *layer,
            })
            .filter(|target| !self.lookups.contains_key(target))
            .collect();
        for target in due {
            self.lookup(swarm, target, None);
        }
    }

    fn on_event(&mut self, swarm: &mut Swarm<Behaviour>, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                if self
                    .bootstrap
                    .on_connected(swarm, &peer_id, endpoint.get_remote_address())
                {
                    let _ = swarm.behaviour_mut().kad.bootstrap();
                }
                if !self.routable {
                    // The first connection: queries can run from now on.
                    self.routable = true;
                    for waiter in self.bootstrap_waiters.drain(..) {
                        let _ = waiter.send(());
                    }
                    for target in std::mem::take(&mut self.waiting_for_peers) {
                        self.start_lookup(swarm, &target);
                    }
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                if let Some(address) = self.bootstrap.on_dial_failed(peer_id.as_ref(), &error) {
                    tracing::debug!(%address, %error, "cannot reach bootstrap peer; retrying");
                }
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
        let kad::Event::OutboundQueryProgressed {
            id, result, step, ..
        } = event
        else {
            return;
        };
        match result {
            kad::QueryResult::GetProviders(result) => {
                let Some(target) = self.provider_queries.get(&id).cloned() else {
                    return;
                };
                if let Ok(GetProvidersOk::FoundProviders { providers, .. }) = result {
                    tracing::trace!(?target, count = providers.len(), "providers found");
                    for provider in providers {
                        self.on_provider(swarm, &target, provider);
                    }
                }
                if step.last {
                    self.query_finished(id, &target);
                }
            }
            kad::QueryResult::GetClosestPeers(result) => {
                let Some(target) = self.provider_queries.get(&id).cloned() else {
                    return;
                };
                let peers = match result {
                    Ok(ok) => ok.peers,
                    Err(kad::GetClosestPeersError::Timeout { peers, .. }) => peers,
                };
                for peer in peers {
                    self.on_provider(swarm, &target, peer.peer_id);
                }
                if step.last {
                    self.query_finished(id, &target);
                }
            }
            kad::QueryResult::GetRecord(result) => {
                let Some(&peer) = self.record_queries.get(&id) else {
                    return;
                };
                if let Ok(GetRecordOk::FoundRecord(found)) = result
                    && self.on_record(peer, &found.record)
                    && !step.last
                {
                    // One valid record is enough: the K peers that store a node's
                    // record all receive each republication, so waiting for the
                    // others only adds latency. A newer record, if any, arrives with
                    // the next refresh.
                    if let Some(mut query) = swarm.behaviour_mut().kad.query_mut(&id) {
                        query.finish();
                    }
                }
                if step.last {
                    self.record_queries.remove(&id);
                    self.records_in_flight.remove(&peer);
                    self.record_done(&peer);
                }
            }
            _ => {}
        }
    }

    fn query_finished(&mut self, id: QueryId, target: &Target) {
        self.provider_queries.remove(&id);
        if let Some(lookup) = self.lookups.get_mut(target) {
            lookup.queries_left = lookup.queries_left.saturating_sub(1);
        }
        self.complete_if_done(target);
    }

    fn on_provider(&mut self, swarm: &mut Swarm<Behaviour>, target: &Target, provider: PeerId) {
        let Some(lookup) = self.lookups.get_mut(target) else {
            return;
        };
        if !lookup.providers.insert(provider) {
            return;
        }
        lookup.last_progress = Instant::now();

        let fresh = self
            .records
            .get(&provider)
            .is_some_and(|cached| cached.fetched.elapsed() < self.config.cache_ttl / 2);
        if fresh {
            return;
        }
        lookup.pending_records.insert(provider);
        if !self.records_in_flight.contains_key(&provider) {
            let query = swarm
                .behaviour_mut()
                .kad
                .get_record(p2p::node_record_key(&provider));
            self.record_queries.insert(query, provider);
            self.records_in_flight.insert(provider, query);
        }
    }

    /// Validates a node record found in the DHT and keeps it when it is the newest seen.
    /// Returns whether the record was valid.
    fn on_record(&mut self, peer: PeerId, record: &kad::Record) -> bool {
        if p2p::parse_node_record_key(&record.key) != Some(peer) {
            self.stats.record_rejected("unknown_key");
            return false;
        }
        let clock = RecordClock {
            now_ms: p2p::unix_millis(),
            max_skew: self.config.max_clock_skew,
            max_age: Some(self.config.dht.record_ttl),
        };
        let node_record = match NodeRecord::verify(&record.value, &peer, clock) {
            Ok(node_record) => node_record,
            Err(error) => {
                tracing::debug!(%peer, %error, "rejected a node record");
                self.stats.record_rejected(error.reason());
                return false;
            }
        };
        if self
            .suppressed
            .get(&peer)
            .is_some_and(|&sequence| node_record.sequence <= sequence)
        {
            return false;
        }
        self.suppressed.remove(&peer);

        let newer = self
            .records
            .get(&peer)
            .is_none_or(|cached| node_record.sequence >= cached.record.sequence);
        if newer {
            self.records.insert(
                peer,
                CachedRecord {
                    record: node_record,
                    fetched: Instant::now(),
                },
            );
        } else {
            self.stats.record_rejected("older_sequence");
        }
        newer
    }

    fn record_done(&mut self, peer: &PeerId) {
        let targets: Vec<Target> = self
            .lookups
            .iter_mut()
            .filter_map(|(target, lookup)| {
                let waited = lookup.pending_records.remove(peer);
                if waited {
                    lookup.last_progress = Instant::now();
                }
                waited.then(|| target.clone())
            })
            .collect();
        for target in targets {
            self.complete_if_done(&target);
        }
    }

    fn complete_if_done(&mut self, target: &Target) {
        let done = self.lookups.get(target).is_some_and(|lookup| {
            lookup.started && lookup.queries_left == 0 && lookup.pending_records.is_empty()
        });
        if done {
            self.complete(target);
        }
    }

    /// Sends a lookup's results to its waiters and caches layer results.
    fn complete(&mut self, target: &Target) {
        let Some(lookup) = self.lookups.remove(target) else {
            return;
        };
        self.provider_queries.retain(|_, t| t != target);
        // A lookup that ends early under load can miss providers it found last time. Keep
        // those whose records were fetched within the cache TTL, so one incomplete
        // refresh does not hide them. A node that failed was dropped from `records`.
        let mut peers: BTreeSet<PeerId> = lookup.providers.iter().copied().collect();
        if let Target::Layer { model_id, layer } = target
            && let Some(previous) = self.layers.get(&(model_id.clone(), *layer))
        {
            for replica in previous.replicas.experts.values().flatten() {
                let recent = self
                    .records
                    .get(&replica.peer_id)
                    .is_some_and(|cached| cached.fetched.elapsed() < self.config.cache_ttl);
                if recent {
                    peers.insert(replica.peer_id);
                }
            }
        }
        let providers: Vec<&NodeRecord> = peers
            .iter()
            .filter_map(|peer| self.records.get(peer))
            .map(|cached| &cached.record)
            .filter(|record| !record.withdrawn)
            .collect();

        match target {
            Target::Layer { model_id, layer } => {
                let replicas = Arc::new(self.layer_replicas(model_id, *layer, &providers));
                tracing::debug!(
                    model_id,
                    layer,
                    providers = lookup.providers.len(),
                    experts = replicas.experts.len(),
                    "layer resolved"
                );
                let now = Instant::now();
                let last_used = self
                    .layers
                    .get(&(model_id.clone(), *layer))
                    .map_or(now, |cached| cached.last_used);
                let used = !lookup.waiters.is_empty();
                self.layers.insert(
                    (model_id.clone(), *layer),
                    CachedLayer {
                        replicas: Arc::clone(&replicas),
                        resolved: now,
                        last_used: if used { now } else { last_used },
                    },
                );
                for waiter in lookup.waiters {
                    if let Waiter::Layer(reply) = waiter {
                        let _ = reply.send(Arc::clone(&replicas));
                    }
                }
            }
            Target::Directory => {
                let mut records: Vec<NodeRecord> = providers.into_iter().cloned().collect();
                records.sort_by_key(|record| record.peer_id);
                for waiter in lookup.waiters {
                    if let Waiter::Directory(reply) = waiter {
                        let _ = reply.send(records.clone());
                    }
                }
            }
        }
    }

    fn layer_replicas(
        &self,
        model_id: &str,
        layer: u32,
        providers: &[&NodeRecord],
    ) -> LayerReplicas {
        let mut experts: BTreeMap<u32, Vec<Replica>> = BTreeMap::new();
        for record in providers {
            if record.model_id != model_id {
                continue;
            }
            let Some(set) = record.layer(layer) else {
                continue;
            };
            let endpoints = self.usable_endpoints(&record.grpc_endpoints);
            if endpoints.is_empty() {
                tracing::debug!(peer = %record.peer_id, "node record has no usable gRPC endpoint");
                continue;
            }
            let replica = Replica {
                peer_id: record.peer_id,
                endpoints,
                load_tokens: record.load_tokens,
                capacity_tokens: record.capacity_tokens,
                limits: record.limits,
                record_timestamp_ms: record.timestamp_ms,
            };
            for expert in set.experts() {
                experts.entry(expert).or_default().push(replica.clone());
            }
        }
        for replicas in experts.values_mut() {
            replicas.sort_by_key(|replica| replica.peer_id);
        }
        LayerReplicas {
            model_id: model_id.to_owned(),
            layer,
            experts,
        }
    }

    /// Drops unspecified hosts, and loopback hosts unless this client runs beside the
    /// network.
    fn usable_endpoints(&self, endpoints: &[String]) -> Vec<String> {
        endpoints
            .iter()
            .filter(|endpoint| match endpoint_ip(endpoint) {
                Some(ip) => !ip.is_unspecified() && (self.allow_loopback || !ip.is_loopback()),
                None => true,
            })
            .cloned()
            .collect()
    }

    fn drop_peer(&mut self, peer: &PeerId) {
        if let Some(cached) = self.records.remove(peer) {
            self.suppressed.insert(*peer, cached.record.sequence);
        }
        for cached in self.layers.values_mut() {
            let holds_peer = cached
                .replicas
                .experts
                .values()
                .any(|replicas| replicas.iter().any(|r| &r.peer_id == peer));
            if !holds_peer {
                continue;
            }
            let mut replicas = (*cached.replicas).clone();
            for list in replicas.experts.values_mut() {
                list.retain(|r| &r.peer_id != peer);
            }
            replicas.experts.retain(|_, list| !list.is_empty());
            cached.replicas = Arc::new(replicas);
        }
        tracing::debug!(%peer, "dropped a failed node's replicas");
    }
}

/// The IP of an `http://HOST:PORT` endpoint whose host is an IP literal.
fn endpoint_ip(endpoint: &str) -> Option<IpAddr> {
    let rest = endpoint.strip_prefix("http://")?;
    let (host, _) = rest.rsplit_once(':')?;
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_hosts_are_parsed() {
        assert_eq!(
            endpoint_ip("http://127.0.0.1:5"),
            Some(IpAddr::from([127, 0, 0, 1]))
        );
        assert_eq!(
            endpoint_ip("http://[::1]:5"),
            Some(IpAddr::from(std::net::Ipv6Addr::LOCALHOST))
        );
        assert_eq!(endpoint_ip("http://node-1:5"), None);
    }
}
