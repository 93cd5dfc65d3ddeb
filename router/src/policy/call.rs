//! One MoE layer call as a state machine without I/O.
//!
//! The caller creates a [`LayerCall`] from each token's gate result and the replicas of the
//! layer's experts, then loops: it carries out the [`Dispatch`]es from
//! [`LayerCall::poll_dispatch`], reports each answer with [`LayerCall::on_answer`], and
//! calls [`LayerCall::on_time`] at [`LayerCall::next_wakeup`]. Time and randomness come
//! from the caller, so the same code runs against real nodes and in virtual time.
//!
//! Work is split into tasks: one expert and the tokens routed to it. A task goes to the
//! replica with the lowest expected completion time (with a little exploration). When a
//! replica fails, the task goes to another replica; when every replica has failed, the
//! task's tokens move to the next expert in their gate ranking. A task whose replica is
//! slower than usual is hedged to a second replica; the first valid answer wins.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::Instant;

use expertnet_model::rng::SplitMix64;
use libp2p::PeerId;

use super::peers::PeerBook;
use crate::gate::TokenGate;

/// One node's copy of an expert, as the policy models it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaRef {
    pub peer: PeerId,
    /// Token rows queued on the node when it last published its record.
    pub queued_tokens: u32,
}

/// A request the caller sends: the tasks for one node, in one RPC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispatch {
    pub id: u64,
    pub peer: PeerId,
    pub tasks: Vec<TaskRef>,
    /// Whether this duplicates tasks already in flight elsewhere.
    pub hedge: bool,
}

/// The tokens of one expert within a dispatch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRef {
    pub task: usize,
    pub expert: u32,
    /// Token indices of the layer call, in increasing order.
    pub tokens: Vec<usize>,
}

/// The reason a task failed on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskFailure {
    pub expert: u32,
    pub peer: PeerId,
    pub reason: String,
}

/// The outcome of a dispatch: per task, success or the reason it failed. A transport error
/// or a rejected request fails every task of the dispatch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Tasks(Vec<(usize, Result<(), String>)>),
    Failed(String),
}

/// The expert and node that served a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedExpert {
    pub expert: u32,
    pub task: usize,
    pub dispatch: u64,
    pub peer: PeerId,
    /// The expert replaces a higher-ranked one that could not be served.
    pub replacement: bool,
}

/// The outcome of a completed call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallResult {
    /// Per token, the experts that served it.
    pub tokens: Vec<Vec<ServedExpert>>,
    /// Every failure met on the way, served around or not.
    pub failures: Vec<TaskFailure>,
    pub dispatches: usize,
    pub hedges: usize,
    /// Tasks sent to another replica after a failure.
    pub replica_fallbacks: usize,
    /// Tokens moved to a lower-ranked expert.
    pub expert_fallbacks: usize,
}

/// The reason a call could not be completed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("deadline reached with {} experts still unanswered: {}{}", pending.len(), describe_pending(pending), describe_earlier(failures))]
    Deadline {
        /// Experts still waited for, with the nodes they were sent to.
        pending: Vec<(u32, Vec<PeerId>)>,
        failures: Vec<TaskFailure>,
    },
    #[error("deadline reached before the lookup of the layer's replicas finished")]
    LookupDeadline,
    #[error(
        "{tokens} tokens got fewer than {k_min} experts; failures: {}",
        describe_failures(failures)
    )]
    Unserved {
        tokens: usize,
        k_min: usize,
        failures: Vec<TaskFailure>,
    },
}

fn describe_pending(pending: &[(u32, Vec<PeerId>)]) -> String {
    let parts: Vec<String> = pending
        .iter()
        .map(|(expert, peers)| {
            let peers: Vec<String> = peers.iter().map(crate::short_peer_id).collect();
            format!("expert {expert} on [{}]", peers.join(", "))
        })
        .collect();
    parts.join("; ")
}

fn describe_earlier(failures: &[TaskFailure]) -> String {
    if failures.is_empty() {
        String::new()
    } else {
        format!("; failed before: {}", describe_failures(failures))
    }
}

fn describe_failures(failures: &[TaskFailure]) -> String {
    if failures.is_empty() {
        return "no replicas".to_owned();
    }
    let parts: Vec<String> = failures
        .iter()
        .map(|f| {
            format!(
                "expert {} on {}: {}",
                f.expert,
                crate::short_peer_id(&f.peer),
                f.reason
            )
        })
        .collect();
    parts.join("; ")
}

#[derive(Debug)]
struct Task {
    expert: u32,
    tokens: Vec<usize>,
    /// Dispatches carrying this task now.
    in_flight: Vec<u64>,
    /// Nodes this task went to without success.
    tried: HashSet<PeerId>,
    served: Option<(u64, PeerId)>,
    /// The task found no replica left; its tokens moved on.
    abandoned: bool,
    replacement: bool,
}

#[derive(Debug)]
struct InFlight {
    peer: PeerId,
    tasks: Vec<usize>,
    sent: Instant,
    hedge_at: Option<Instant>,
    tokens: usize,
}

#[derive(Debug)]
struct TokenState {
    gate: TokenGate,
    /// Experts the token uses now, with their task: the top k, minus experts that could
    /// not be served, plus their replacements.
    chosen: Vec<(u32, usize)>,
    /// Experts given up on for this token.
    dropped: HashSet<u32>,
    /// Next position in the ranking to take a replacement from.
    next_rank: usize,
    failed: bool,
}

/// Settings of one call.
#[derive(Debug, Clone)]
pub struct CallSettings {
    pub top_k: usize,
    /// Minimum number of experts that must serve each token.
    pub k_min: usize,
    pub deadline: Instant,
    /// Whether slow requests are hedged.
    pub hedging: bool,
}

/// One layer call in progress.
#[derive(Debug)]
pub struct LayerCall {
    settings: CallSettings,
    /// `None` until the lookup of the layer's replicas has finished.
    replicas: Option<BTreeMap<u32, Vec<ReplicaRef>>>,
    tokens: Vec<TokenState>,
    tasks: Vec<Task>,
    /// Tasks waiting for a replica.
    queue: Vec<usize>,
    /// Dispatches planned and not yet handed to the caller.
    pending_dispatches: VecDeque<Dispatch>,
    in_flight: HashMap<u64, InFlight>,
    next_dispatch: u64,
    failures: Vec<TaskFailure>,
    dispatches: usize,
    hedges: usize,
    replica_fallbacks: usize,
    expert_fallbacks: usize,
    /// `None` until the call first chooses among several replicas; then whether that
    /// choice explored. Later choices never explore.
    explore: std::cell::Cell<Option<bool>>,
    outcome: Option<Result<CallResult, CallError>>,
}

impl LayerCall {
    /// Plans the call: each token's top k experts, grouped into one task per expert.
    pub fn new(
        gates: Vec<TokenGate>,
        replicas: BTreeMap<u32, Vec<ReplicaRef>>,
        settings: CallSettings,
    ) -> Self {
        let mut call = Self::before_lookup(gates, settings);
        call.provide_replicas(replicas);
        call
    }

    /// Plans the call while the replicas are still being looked up: nothing is sent until
    /// [`LayerCall::provide_replicas`], and the deadline covers the wait.
    pub fn before_lookup(gates: Vec<TokenGate>, settings: CallSettings) -> Self {
        let mut call = Self {
            replicas: None,
            tokens: Vec::with_capacity(gates.len()),
            tasks: Vec::new(),
            queue: Vec::new(),
            pending_dispatches: VecDeque::new(),
            in_flight: HashMap::new(),
            next_dispatch: 0,
            failures: Vec::new(),
            dispatches: 0,
            hedges: 0,
            replica_fallbacks: 0,
            expert_fallbacks: 0,
            explore: std::cell::Cell::new(None),
            outcome: None,
            settings,
        };

        let mut by_expert: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (index, gate) in gates.into_iter().enumerate() {
            let top = gate.top_k(call.settings.top_k).to_vec();
            for &expert in &top {
                by_expert.entry(expert).or_default().push(index);
            }
            call.tokens.push(TokenState {
                next_rank: top.len(),
                gate,
                chosen: Vec::new(),
                dropped: HashSet::new(),
                failed: false,
            });
        }
        for (expert, tokens) in by_expert {
            let task = call.add_task(expert, tokens.clone(), false);
            for token in tokens {
                call.tokens[token].chosen.push((expert, task));
            }
        }
        call
    }

    /// Hands over the replicas found by the lookup. Experts absent from `replicas` have
    /// none, and their tokens fall back to lower-ranked experts.
    pub fn provide_replicas(&mut self, replicas: BTreeMap<u32, Vec<ReplicaRef>>) {
        if self.outcome.is_some() {
            return;
        }
        self.replicas = Some(replicas);
        self.finish_if_done();
    }

    fn add_task(&mut self, expert: u32, tokens: Vec<usize>, replacement: bool) -> usize {
        self.tasks.push(Task {
            expert,
            tokens,
            in_flight: Vec::new(),
            tried: HashSet::new(),
            served: None,
            abandoned: false,
            replacement,
        });
        let task = self.tasks.len() - 1;
        self.queue.push(task);
        task
    }

    /// Returns the result, once the call is over.
    pub fn outcome(&self) -> Option<&Result<CallResult, CallError>> {
        self.outcome.as_ref()
    }

    pub fn is_done(&self) -> bool {
        self.outcome.is_some()
    }

    /// Returns the next request to send, if any. Call until it returns `None` after creating the
    /// call and after every event.
    pub fn poll_dispatch(
        &mut self,
        now: Instant,
        book: &PeerBook,
        rng: &mut SplitMix64,
    ) -> Option<Dispatch> {
        if self.outcome.is_some() {
            return None;
        }
        if !self.queue.is_empty() && self.replicas.is_some() {
            self.plan_queued(now, book, rng);
            self.finish_if_done();
        }
        if self.outcome.is_some() {
            return None;
        }
        self.pending_dispatches.pop_front()
    }

    /// Chooses a replica for every queued task, grouping tasks by node; tasks with no
    /// replica left fall back to the next expert of their tokens.
    fn plan_queued(&mut self, now: Instant, book: &PeerBook, rng: &mut SplitMix64) {
        let queued = std::mem::take(&mut self.queue);
        let mut by_peer: BTreeMap<PeerId, Vec<usize>> = BTreeMap::new();
        let mut assigned_tokens: HashMap<PeerId, usize> = HashMap::new();
        for task in queued {
            if self.tasks[task].served.is_some() || self.tasks[task].abandoned {
                continue;
            }
            match self.choose_replica(task, &[], now, book, rng, &assigned_tokens) {
                Some(peer) => {
                    *assigned_tokens.entry(peer).or_default() += self.tasks[task].tokens.len();
                    by_peer.entry(peer).or_default().push(task);
                }
                None => self.abandon(task),
            }
        }
        for (peer, tasks) in by_peer {
            let dispatch = self.make_dispatch(peer, tasks, now, book, false);
            self.pending_dispatches.push_back(dispatch);
        }
        // Replacement tasks made by `abandon` need replicas too.
        if !self.queue.is_empty() {
            self.plan_queued(now, book, rng);
        }
    }

    /// Reports the outcome of a dispatch.
    pub fn on_answer(&mut self, id: u64, answer: Answer, now: Instant, book: &mut PeerBook) {
        let Some(flight) = self.in_flight.remove(&id) else {
            return;
        };
        let elapsed = now.saturating_duration_since(flight.sent);
        for &task in &flight.tasks {
            self.tasks[task].in_flight.retain(|&d| d != id);
        }

        match answer {
            Answer::Failed(reason) => {
                book.record_failure(flight.peer, now);
                for &task in &flight.tasks {
                    self.task_failed(task, flight.peer, reason.clone());
                }
            }
            Answer::Tasks(results) => {
                let mut any_failed = false;
                for &task in &flight.tasks {
                    let result = results
                        .iter()
                        .find(|(t, _)| *t == task)
                        .map_or(Err("no answer for this expert".to_owned()), |(_, r)| {
                            r.clone()
                        });
                    match result {
                        Ok(()) => {
                            if self.tasks[task].served.is_none() {
                                self.tasks[task].served = Some((id, flight.peer));
                            }
                        }
                        Err(reason) => {
                            any_failed = true;
                            self.task_failed(task, flight.peer, reason);
                        }
                    }
                }
                if any_failed {
                    book.record_failure(flight.peer, now);
                } else {
                    book.record_success(flight.peer, flight.tokens, elapsed);
                }
            }
        }
        self.finish_if_done();
    }

    fn task_failed(&mut self, task: usize, peer: PeerId, reason: String) {
        self.failures.push(TaskFailure {
            expert: self.tasks[task].expert,
            peer,
            reason,
        });
        let state = &mut self.tasks[task];
        state.tried.insert(peer);
        if state.served.is_none() && state.in_flight.is_empty() && !state.abandoned {
            self.replica_fallbacks += 1;
            self.queue.push(task);
        }
    }

    /// When the caller should next call [`LayerCall::on_time`]: the deadline or the next
    /// hedge.
    pub fn next_wakeup(&self) -> Option<Instant> {
        if self.outcome.is_some() {
            return None;
        }
        let hedges = self.in_flight.values().filter_map(|flight| flight.hedge_at);
        hedges.chain([self.settings.deadline]).min()
    }

    /// Advances time: sends hedges that are due and ends the call at its deadline.
    pub fn on_time(&mut self, now: Instant, book: &PeerBook, rng: &mut SplitMix64) {
        if self.outcome.is_some() {
            return;
        }
        if now >= self.settings.deadline {
            self.expire();
            return;
        }

        let mut due: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, flight)| flight.hedge_at.is_some_and(|at| now >= at))
            .map(|(&id, _)| id)
            .collect();
        // In dispatch order, so that the same inputs give the same hedges.
        due.sort_unstable();
        for id in due {
            let Some(flight) = self.in_flight.get_mut(&id) else {
                continue;
            };
            flight.hedge_at = None;
            let slow_peer = flight.peer;
            let tasks = flight.tasks.clone();

            let mut by_peer: BTreeMap<PeerId, Vec<usize>> = BTreeMap::new();
            let assigned = HashMap::new();
            for task in tasks {
                if self.tasks[task].served.is_some() {
                    continue;
                }
                if let Some(peer) =
                    self.choose_replica(task, &[slow_peer], now, book, rng, &assigned)
                {
                    by_peer.entry(peer).or_default().push(task);
                }
            }
            for (peer, tasks) in by_peer {
                self.hedges += 1;
                let dispatch = self.make_dispatch(peer, tasks, now, book, true);
                self.pending_dispatches.push_back(dispatch);
            }
        }
    }

    fn choose_replica(
        &self,
        task: usize,
        exclude: &[PeerId],
        now: Instant,
        book: &PeerBook,
        rng: &mut SplitMix64,
        assigned_tokens: &HashMap<PeerId, usize>,
    ) -> Option<PeerId> {
        let state = &self.tasks[task];
        let in_flight_peers: HashSet<PeerId> = state
            .in_flight
            .iter()
            .filter_map(|id| self.in_flight.get(id).map(|f| f.peer))
            .collect();
        let candidates: Vec<&ReplicaRef> = self
            .replicas
            .as_ref()
            .and_then(|replicas| replicas.get(&state.expert))
            .map(|list| list.as_slice())
            .unwrap_or_default()
            .iter()
            .filter(|r| {
                !state.tried.contains(&r.peer)
                    && !exclude.contains(&r.peer)
                    && !in_flight_peers.contains(&r.peer)
                    && !book.is_banned(&r.peer, now)
            })
            .collect();
        if candidates.is_empty() {
            return None;
        }

        let cost = |r: &ReplicaRef| {
            let extra = assigned_tokens.get(&r.peer).copied().unwrap_or(0);
            book.expected_ms(&r.peer, state.tokens.len() + extra, r.queued_tokens)
        };
        let best = candidates
            .iter()
            .min_by(|a, b| cost(a).total_cmp(&cost(b)).then(a.peer.cmp(&b.peer)))?;
        // One exploring choice per layer call at most, so the share of calls that meet a
        // worse replica stays at `exploration` however many experts a call has.
        // The draw happens once, at the call's first choice among several replicas.
        let explore = candidates.len() > 1
            && match self.explore.get() {
                Some(explore) => explore,
                None => f64::from(rng.next_unit()) < book.policy().exploration,
            };
        if candidates.len() > 1 {
            self.explore.set(Some(false));
        }
        if explore {
            let others: Vec<&&ReplicaRef> =
                candidates.iter().filter(|r| r.peer != best.peer).collect();
            let pick = (rng.next_u64() % others.len() as u64) as usize;
            return Some(others[pick].peer);
        }
        Some(best.peer)
    }

    fn make_dispatch(
        &mut self,
        peer: PeerId,
        tasks: Vec<usize>,
        now: Instant,
        book: &PeerBook,
        hedge: bool,
    ) -> Dispatch {
        let id = self.next_dispatch;
        self.next_dispatch += 1;
        self.dispatches += 1;
        let tokens: usize = tasks.iter().map(|&t| self.tasks[t].tokens.len()).sum();
        for &task in &tasks {
            self.tasks[task].in_flight.push(id);
        }
        let hedge_at =
            (self.settings.hedging && !hedge).then(|| now + book.hedge_delay(&peer, tokens));
        self.in_flight.insert(
            id,
            InFlight {
                peer,
                tasks: tasks.clone(),
                sent: now,
                hedge_at,
                tokens,
            },
        );
        Dispatch {
            id,
            peer,
            tasks: tasks
                .into_iter()
                .map(|task| TaskRef {
                    task,
                    expert: self.tasks[task].expert,
                    tokens: self.tasks[task].tokens.clone(),
                })
                .collect(),
            hedge,
        }
    }

    /// Gives up on a task with no replica left and moves its tokens to the next expert in
    /// their ranking.
    fn abandon(&mut self, task: usize) {
        self.tasks[task].abandoned = true;
        let expert = self.tasks[task].expert;
        let tokens = self.tasks[task].tokens.clone();

        let mut moved: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for token in tokens {
            let state = &mut self.tokens[token];
            state.chosen.retain(|&(e, _)| e != expert);
            state.dropped.insert(expert);
            let in_use: HashSet<u32> = state.chosen.iter().map(|&(e, _)| e).collect();
            let next = loop {
                let Some(&candidate) = state.gate.ranking.get(state.next_rank) else {
                    break None;
                };
                state.next_rank += 1;
                if !in_use.contains(&candidate) && !state.dropped.contains(&candidate) {
                    break Some(candidate);
                }
            };
            match next {
                Some(candidate) => moved.entry(candidate).or_default().push(token),
                None => {
                    if state.chosen.len() < self.settings.k_min {
                        state.failed = true;
                    }
                }
            }
        }
        for (replacement, tokens) in moved {
            self.expert_fallbacks += tokens.len();
            let new_task = self.add_task(replacement, tokens.clone(), true);
            for token in tokens {
                self.tokens[token].chosen.push((replacement, new_task));
            }
        }
    }

    fn finish_if_done(&mut self) {
        if self.outcome.is_some() || self.replicas.is_none() {
            return;
        }
        let failed_tokens = self.tokens.iter().filter(|t| t.failed).count();
        if failed_tokens > 0 {
            self.outcome = Some(Err(CallError::Unserved {
                tokens: failed_tokens,
                k_min: self.settings.k_min,
                failures: self.failures.clone(),
            }));
            return;
        }

        let waiting = self.tokens.iter().any(|token| {
            token
                .chosen
                .iter()
                .any(|&(_, task)| self.tasks[task].served.is_none())
        });
        if waiting || !self.queue.is_empty() {
            return;
        }
        self.outcome = Some(Ok(self.result()));
    }

    fn result(&self) -> CallResult {
        let tokens = self
            .tokens
            .iter()
            .map(|token| {
                token
                    .chosen
                    .iter()
                    .filter_map(|&(expert, task)| {
                        let (dispatch, peer) = self.tasks[task].served?;
                        Some(ServedExpert {
                            expert,
                            task,
                            dispatch,
                            peer,
                            replacement: self.tasks[task].replacement,
                        })
                    })
                    .collect()
            })
            .collect();
        CallResult {
            tokens,
            failures: self.failures.clone(),
            dispatches: self.dispatches,
            hedges: self.hedges,
            replica_fallbacks: self.replica_fallbacks,
            expert_fallbacks: self.expert_fallbacks,
        }
    }

    /// Ends the call at its deadline. Tokens with at least `k_min` served experts keep
    /// them; if any token has fewer, the call fails naming what was still pending.
    fn expire(&mut self) {
        if self.replicas.is_none() {
            self.outcome = Some(Err(CallError::LookupDeadline));
            return;
        }
        let enough = self.tokens.iter().all(|token| {
            token
                .chosen
                .iter()
                .filter(|&&(_, task)| self.tasks[task].served.is_some())
                .count()
                >= self.settings.k_min
        });
        if enough {
            self.outcome = Some(Ok(self.result()));
            return;
        }

        let mut pending: BTreeMap<u32, Vec<PeerId>> = BTreeMap::new();
        for task in self
            .tasks
            .iter()
            .filter(|t| t.served.is_none() && !t.abandoned)
        {
            let peers = pending.entry(task.expert).or_default();
            for id in &task.in_flight {
                if let Some(flight) = self.in_flight.get(id) {
                    peers.push(flight.peer);
                }
            }
        }
        self.outcome = Some(Err(CallError::Deadline {
            pending: pending.into_iter().collect(),
            failures: self.failures.clone(),
        }));
    }

    /// Records, once the call is over, that the requests still in flight took at least
    /// until `now`, so a node that lost a hedge race does not keep its optimistic
    /// estimate. The caller then cancels them.
    pub fn finish_in_flight(&mut self, now: Instant, book: &mut PeerBook) {
        let mut flights: Vec<(u64, InFlight)> = self.in_flight.drain().collect();
        flights.sort_unstable_by_key(|(id, _)| *id);
        for (_, flight) in flights {
            book.record_slow(
                flight.peer,
                flight.tokens,
                now.saturating_duration_since(flight.sent),
            );
        }
    }

    /// Returns the tasks of dispatch `id` while it is in flight.
    pub fn dispatch_tasks(&self, id: u64) -> Option<Vec<usize>> {
        self.in_flight.get(&id).map(|flight| flight.tasks.clone())
    }

    /// Dispatch ids still in flight, which the caller may cancel once the call is over.
    pub fn in_flight(&self) -> impl Iterator<Item = u64> + '_ {
        self.in_flight.keys().copied()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::policy::PeerPolicy;

    /// Gates of `tokens` tokens over `experts` experts where token t ranks expert
    /// `(t + i) % experts` in position i.
    fn gates(tokens: usize, experts: usize) -> Vec<TokenGate> {
        (0..tokens)
            .map(|t| {
                let logits = (0..experts)
                    .map(|e| -(((e + experts - t % experts) % experts) as f32))
                    .collect();
                TokenGate::from_logits(logits)
            })
            .collect()
    }

    fn replicas(experts: u32, peers: &[PeerId]) -> BTreeMap<u32, Vec<ReplicaRef>> {
        (0..experts)
            .map(|e| {
                let list = peers
                    .iter()
                    .map(|&peer| ReplicaRef {
                        peer,
                        queued_tokens: 0,
                    })
                    .collect();
                (e, list)
            })
            .collect()
    }

    fn settings(now: Instant) -> CallSettings {
        CallSettings {
            top_k: 2,
            k_min: 2,
            deadline: now + Duration::from_secs(1),
            hedging: true,
        }
    }

    fn quiet_book() -> PeerBook {
        PeerBook::new(PeerPolicy {
            exploration: 0.0,
            ..PeerPolicy::default()
        })
    }

    fn drain(
        call: &mut LayerCall,
        now: Instant,
        book: &PeerBook,
        rng: &mut SplitMix64,
    ) -> Vec<Dispatch> {
        std::iter::from_fn(|| call.poll_dispatch(now, book, rng)).collect()
    }

    fn ok(dispatch: &Dispatch) -> Answer {
        Answer::Tasks(dispatch.tasks.iter().map(|t| (t.task, Ok(()))).collect())
    }

    #[test]
    fn all_answers_complete_the_call() {
        let now = Instant::now();
        let peers = [PeerId::random(), PeerId::random()];
        let mut book = quiet_book();
        let mut rng = SplitMix64::new(1);
        let mut call = LayerCall::new(gates(6, 4), replicas(4, &peers), settings(now));

        let dispatches = drain(&mut call, now, &book, &mut rng);
        assert!(!dispatches.is_empty());
        let experts: usize = dispatches.iter().map(|d| d.tasks.len()).sum();
        assert_eq!(experts, 4, "one task per expert in use");
        for dispatch in &dispatches {
            call.on_answer(
                dispatch.id,
                ok(dispatch),
                now + Duration::from_millis(3),
                &mut book,
            );
        }

        let result = call.outcome().unwrap().as_ref().unwrap();
        assert_eq!(result.tokens.len(), 6);
        for (t, served) in result.tokens.iter().enumerate() {
            let experts: Vec<u32> = served.iter().map(|s| s.expert).collect();
            assert_eq!(experts.len(), 2, "token {t}");
            assert!(served.iter().all(|s| !s.replacement));
        }
        assert_eq!(result.replica_fallbacks, 0);
        assert_eq!(result.expert_fallbacks, 0);
    }

    #[test]
    fn failed_replica_is_replaced_and_banned() {
        let now = Instant::now();
        let peers = [PeerId::random(), PeerId::random()];
        let mut book = quiet_book();
        let mut rng = SplitMix64::new(1);
        let mut call = LayerCall::new(gates(4, 4), replicas(4, &peers), settings(now));

        let first = drain(&mut call, now, &book, &mut rng);
        let failing = first[0].peer;
        for dispatch in &first {
            let answer = if dispatch.peer == failing {
                Answer::Failed("connection refused".to_owned())
            } else {
                ok(dispatch)
            };
            call.on_answer(dispatch.id, answer, now, &mut book);
        }
        assert!(book.is_banned(&failing, now));

        let retries = drain(&mut call, now, &book, &mut rng);
        assert!(!retries.is_empty());
        assert!(retries.iter().all(|d| d.peer != failing));
        for dispatch in &retries {
            call.on_answer(dispatch.id, ok(dispatch), now, &mut book);
        }
        let result = call.outcome().unwrap().as_ref().unwrap();
        assert!(result.replica_fallbacks > 0);
        assert!(result.tokens.iter().flatten().all(|s| s.peer != failing));
        assert_eq!(result.failures.len(), first[0].tasks.len());
    }

    #[test]
    fn expert_without_replicas_falls_back() {
        let now = Instant::now();
        let peer = PeerId::random();
        let mut book = quiet_book();
        let mut rng = SplitMix64::new(1);
        let mut table = replicas(4, &[peer]);
        table.remove(&1);
        // Token 0 ranks experts 0, 1, 2, 3; token 1 ranks 1, 2, 3, 0. Both lose expert 1.
        let mut call = LayerCall::new(gates(2, 4), table, settings(now));

        let dispatches = drain(&mut call, now, &book, &mut rng);
        for dispatch in &dispatches {
            assert!(dispatch.tasks.iter().all(|t| t.expert != 1));
            call.on_answer(dispatch.id, ok(dispatch), now, &mut book);
        }
        let result = call.outcome().unwrap().as_ref().unwrap();
        let token_one: Vec<(u32, bool)> = result.tokens[1]
            .iter()
            .map(|s| (s.expert, s.replacement))
            .collect();
        assert!(token_one.contains(&(2, false)), "{token_one:?}");
        assert!(
            token_one.contains(&(3, true)),
            "expert 3 replaces expert 1: {token_one:?}"
        );
        let token_zero: Vec<(u32, bool)> = result.tokens[0]
            .iter()
            .map(|s| (s.expert, s.replacement))
            .collect();
        assert!(
            token_zero.contains(&(2, true)),
            "expert 2 replaces expert 1: {token_zero:?}"
        );
        assert_eq!(result.expert_fallbacks, 2);
    }

    #[test]
    fn tokens_without_enough_experts_fail_the_call() {
        let now = Instant::now();
        let peer = PeerId::random();
        let mut book = quiet_book();
        let mut rng = SplitMix64::new(1);
        let mut call = LayerCall::new(gates(3, 3), replicas(3, &[peer]), settings(now));

        while let Some(dispatch) = call.poll_dispatch(now, &book, &mut rng) {
            let answer = Answer::Tasks(
                dispatch
                    .tasks
                    .iter()
                    .map(|t| (t.task, Err("output failed verification".to_owned())))
                    .collect(),
            );
            call.on_answer(dispatch.id, answer, now, &mut book);
        }
        match call.outcome() {
            Some(Err(CallError::Unserved {
                tokens,
                k_min,
                failures,
            })) => {
                assert_eq!(*tokens, 3);
                assert_eq!(*k_min, 2);
                assert!(!failures.is_empty());
                let message = call.outcome().unwrap().clone().unwrap_err().to_string();
                assert!(message.contains("output failed verification"), "{message}");
            }
            other => panic!("expected an unserved error, got {other:?}"),
        }
    }

    #[test]
    fn stalled_call_ends_at_the_deadline() {
        let now = Instant::now();
        let peers = [PeerId::random(), PeerId::random()];
        let book = quiet_book();
        let mut rng = SplitMix64::new(1);
        let mut call = LayerCall::new(
            gates(2, 4),
            replicas(4, &peers),
            CallSettings {
                hedging: false,
                ..settings(now)
            },
        );
        let dispatches = drain(&mut call, now, &book, &mut rng);
        assert!(!dispatches.is_empty());

        let deadline = call.next_wakeup().unwrap();
        assert_eq!(deadline, now + Duration::from_secs(1));
        call.on_time(deadline - Duration::from_millis(1), &book, &mut rng);
        assert!(!call.is_done(), "nothing ends before the deadline");
        call.on_time(deadline, &book, &mut rng);
        match call.outcome() {
            Some(Err(CallError::Deadline { pending, .. })) => {
                let experts: Vec<u32> = pending.iter().map(|(e, _)| *e).collect();
                assert_eq!(experts.len(), 3, "{pending:?}");
                assert!(pending.iter().all(|(_, peers)| !peers.is_empty()));
            }
            other => panic!("expected a deadline error, got {other:?}"),
        }
    }

    #[test]
    fn stalled_lookup_ends_at_the_deadline() {
        let start = Instant::now();
        let book = quiet_book();
        let mut rng = SplitMix64::new(1);
        let mut call = LayerCall::before_lookup(gates(4, 4), settings(start));

        assert_eq!(
            call.poll_dispatch(start, &book, &mut rng),
            None,
            "nothing to send before the lookup"
        );
        let wakeup = call.next_wakeup().unwrap();
        assert_eq!(wakeup, start + Duration::from_secs(1));
        call.on_time(wakeup - Duration::from_millis(1), &book, &mut rng);
        assert!(!call.is_done());
        call.on_time(wakeup, &book, &mut rng);
        assert_eq!(call.outcome(), Some(&Err(CallError::LookupDeadline)));

        // A lookup that finishes late changes nothing.
        call.provide_replicas(replicas(4, &[PeerId::random()]));
        assert_eq!(call.poll_dispatch(wakeup, &book, &mut rng), None);
    }

    #[test]
    fn lookup_in_time_starts_the_call() {
        let start = Instant::now();
        let mut book = quiet_book();
        let mut rng = SplitMix64::new(1);
        let mut call = LayerCall::before_lookup(gates(4, 4), settings(start));
        call.provide_replicas(replicas(4, &[PeerId::random()]));
        let dispatches = drain(&mut call, start, &book, &mut rng);
        assert_eq!(
            dispatches.len(),
            1,
            "one node hosts every expert: one request"
        );
        call.on_answer(dispatches[0].id, ok(&dispatches[0]), start, &mut book);
        assert!(matches!(call.outcome(), Some(Ok(_))));
    }

    #[test]
    fn slow_request_is_hedged_and_first_answer_wins() {
        let now = Instant::now();
        let (slow, fast) = (PeerId::random(), PeerId::random());
        let mut book = quiet_book();
        for _ in 0..10 {
            book.record_success(slow, 1, Duration::from_millis(5));
            book.record_success(fast, 1, Duration::from_millis(6));
        }
        let mut rng = SplitMix64::new(1);
        let table = replicas(1, &[slow, fast]);
        let gate = TokenGate::from_logits(vec![1.0]);
        let mut call = LayerCall::new(
            vec![gate],
            table,
            CallSettings {
                top_k: 1,
                k_min: 1,
                ..settings(now)
            },
        );
        let primary = drain(&mut call, now, &book, &mut rng);
        assert_eq!(primary.len(), 1);
        assert_eq!(primary[0].peer, slow, "the faster estimate wins");

        let hedge_at = call.next_wakeup().unwrap();
        assert!(
            hedge_at < now + Duration::from_millis(20),
            "hedge at {:?}",
            hedge_at - now
        );
        call.on_time(hedge_at, &book, &mut rng);
        let hedges = drain(&mut call, hedge_at, &book, &mut rng);
        assert_eq!(hedges.len(), 1);
        assert!(hedges[0].hedge);
        assert_eq!(hedges[0].peer, fast);

        call.on_answer(
            hedges[0].id,
            ok(&hedges[0]),
            hedge_at + Duration::from_millis(6),
            &mut book,
        );
        let result = call.outcome().unwrap().as_ref().unwrap();
        assert_eq!(result.tokens[0][0].peer, fast);
        assert_eq!(result.hedges, 1);
        // The slow answer arriving later changes nothing.
        call.on_answer(
            primary[0].id,
            ok(&primary[0]),
            hedge_at + Duration::from_millis(50),
            &mut book,
        );
        assert_eq!(
            call.outcome().unwrap().as_ref().unwrap().tokens[0][0].peer,
            fast
        );
    }

    #[test]
    fn measured_latency_steers_choice_to_the_fast_replica() {
        let (slow, fast) = (PeerId::random(), PeerId::random());
        let mut book = PeerBook::new(PeerPolicy::default());
        let mut rng = SplitMix64::new(7);
        let mut now = Instant::now();
        let mut to_fast = 0;
        for round in 0..220 {
            let table = replicas(1, &[slow, fast]);
            let mut call = LayerCall::new(
                vec![TokenGate::from_logits(vec![1.0])],
                table,
                CallSettings {
                    top_k: 1,
                    k_min: 1,
                    deadline: now + Duration::from_secs(10),
                    hedging: false,
                },
            );
            let dispatch = call.poll_dispatch(now, &book, &mut rng).unwrap();
            let latency = if dispatch.peer == slow { 200 } else { 2 };
            now += Duration::from_millis(latency);
            call.on_answer(dispatch.id, ok(&dispatch), now, &mut book);
            if round >= 20 && dispatch.peer == fast {
                to_fast += 1;
            }
        }
        assert!(
            to_fast >= 180,
            "{to_fast} of 200 calls went to the fast replica"
        );
    }
}
