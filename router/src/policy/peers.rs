//! The router's model of each node: a latency model fitted to measured round trips,
//! and bans with exponential backoff.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;

/// Settings of replica choice, hedging and bans.
#[derive(Debug, Clone)]
pub struct PeerPolicy {
    /// Share of layer calls in which one expert goes to a random replica other than the
    /// best, so that the estimates of the others stay fresh. Default 0.05.
    pub exploration: f64,
    /// A request is hedged when it has taken this many times its replica's expected
    /// latency. Default 2.
    pub hedge_multiplier: f64,
    /// Hedges never fire earlier than this. Default 2 ms.
    pub hedge_min_delay: Duration,
    /// First ban of a failing node; each further failure in a row doubles it. Default 1 s.
    pub ban_base: Duration,
    /// Maximum ban for failures. Default 60 s.
    pub ban_max: Duration,
    /// Ban of a node caught returning wrong results. Default 1 hour.
    pub dishonesty_ban: Duration,
    /// Latency assumed for a node never measured, at one token. Default 1 ms: optimistic,
    /// so new nodes get tried.
    pub prior_latency: Duration,
}

impl Default for PeerPolicy {
    fn default() -> Self {
        Self {
            exploration: 0.05,
            hedge_multiplier: 2.0,
            hedge_min_delay: Duration::from_millis(2),
            ban_base: Duration::from_secs(1),
            ban_max: Duration::from_secs(60),
            dishonesty_ban: Duration::from_secs(3600),
            prior_latency: Duration::from_millis(1),
        }
    }
}

/// Weight of a new observation in the moving averages.
const SMOOTHING: f64 = 0.2;

#[derive(Debug, Clone, Default)]
struct PeerState {
    /// Expected latency of a one-token request, in milliseconds.
    base_ms: Option<f64>,
    /// Expected latency added per token, in milliseconds.
    per_token_ms: f64,
    failures_in_a_row: u32,
    banned_until: Option<Instant>,
    /// Caught disagreeing with another replica when no referee could decide.
    suspect: bool,
    /// Caught returning a wrong result.
    dishonest: bool,
}

/// The router's view of every node it has called.
#[derive(Debug, Clone, Default)]
pub struct PeerBook {
    policy: PeerPolicy,
    peers: HashMap<PeerId, PeerState>,
}

impl PeerBook {
    pub fn new(policy: PeerPolicy) -> Self {
        Self {
            policy,
            peers: HashMap::new(),
        }
    }

    pub fn policy(&self) -> &PeerPolicy {
        &self.policy
    }

    /// Returns the expected time for `peer` to complete a request of `tokens` token rows when
    /// `queued_tokens` rows wait ahead of it, in milliseconds.
    pub fn expected_ms(&self, peer: &PeerId, tokens: usize, queued_tokens: u32) -> f64 {
        let state = self.peers.get(peer);
        let base = state
            .and_then(|s| s.base_ms)
            .unwrap_or(self.policy.prior_latency.as_secs_f64() * 1e3);
        let per_token = state.map_or(0.0, |s| s.per_token_ms);
        base + per_token * ((tokens.max(1) - 1) as f64 + f64::from(queued_tokens))
    }

    /// Returns how long to wait for `peer` before hedging a request of `tokens` rows.
    pub fn hedge_delay(&self, peer: &PeerId, tokens: usize) -> Duration {
        let expected = Duration::from_secs_f64(self.expected_ms(peer, tokens, 0) / 1e3);
        expected
            .mul_f64(self.policy.hedge_multiplier)
            .max(self.policy.hedge_min_delay)
    }

    pub fn is_banned(&self, peer: &PeerId, now: Instant) -> bool {
        self.peers
            .get(peer)
            .and_then(|s| s.banned_until)
            .is_some_and(|until| now < until)
    }

    pub fn is_suspect(&self, peer: &PeerId) -> bool {
        self.peers.get(peer).is_some_and(|s| s.suspect)
    }

    /// Updates the latency model with a successful request of `tokens` rows.
    pub fn record_success(&mut self, peer: PeerId, tokens: usize, latency: Duration) {
        let state = self.peers.entry(peer).or_default();
        state.failures_in_a_row = 0;
        let observed = latency.as_secs_f64() * 1e3;
        let tokens = tokens.max(1) as f64;
        match state.base_ms {
            None => state.base_ms = Some(observed),
            Some(base) => {
                if tokens >= 2.0 {
                    let per_token = ((observed - base) / (tokens - 1.0)).max(0.0);
                    state.per_token_ms += SMOOTHING * (per_token - state.per_token_ms);
                }
                let base_observed = (observed - state.per_token_ms * (tokens - 1.0)).max(0.0);
                state.base_ms = Some(base + SMOOTHING * (base_observed - base));
            }
        }
    }

    /// Updates the latency model with a request of `tokens` rows abandoned after
    /// `at_least` without a response: the node was at least that slow. Raises the estimate
    /// only when it was below `at_least`.
    pub fn record_slow(&mut self, peer: PeerId, tokens: usize, at_least: Duration) {
        if self.expected_ms(&peer, tokens, 0) < at_least.as_secs_f64() * 1e3 {
            let failures = self.peers.get(&peer).map_or(0, |s| s.failures_in_a_row);
            self.record_success(peer, tokens, at_least);
            if let Some(state) = self.peers.get_mut(&peer) {
                state.failures_in_a_row = failures;
            }
        }
    }

    /// Counts a failure and bans the node for `ban_base` doubled per failure in a row, up
    /// to `ban_max`. Returns the ban.
    pub fn record_failure(&mut self, peer: PeerId, now: Instant) -> Duration {
        let policy = &self.policy;
        let state = self.peers.entry(peer).or_default();
        state.failures_in_a_row = state.failures_in_a_row.saturating_add(1);
        let doublings = state.failures_in_a_row.saturating_sub(1).min(16);
        let ban = policy
            .ban_base
            .saturating_mul(1u32 << doublings)
            .min(policy.ban_max);
        state.banned_until = Some(now + ban);
        ban
    }

    /// Bans a node caught returning wrong results. Returns whether it was not banned for
    /// that already.
    pub fn ban_dishonest(&mut self, peer: PeerId, now: Instant) -> bool {
        let ban = self.policy.dishonesty_ban;
        let state = self.peers.entry(peer).or_default();
        let until = now + ban;
        let newly = !state.dishonest || state.banned_until.is_none_or(|t| t < now);
        state.banned_until = Some(state.banned_until.map_or(until, |t| t.max(until)));
        state.suspect = true;
        state.dishonest = true;
        newly
    }

    /// Marks a node as disagreeing with another replica, without proof of which is wrong.
    pub fn mark_suspect(&mut self, peer: PeerId) {
        self.peers.entry(peer).or_default().suspect = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bans_double_up_to_the_limit() {
        let mut book = PeerBook::new(PeerPolicy::default());
        let peer = PeerId::random();
        let now = Instant::now();
        let bans: Vec<u64> = (0..9)
            .map(|_| book.record_failure(peer, now).as_secs())
            .collect();
        assert_eq!(bans, vec![1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert!(book.is_banned(&peer, now));
        assert!(!book.is_banned(&peer, now + Duration::from_secs(61)));

        book.record_success(peer, 1, Duration::from_millis(1));
        assert_eq!(
            book.record_failure(peer, now).as_secs(),
            1,
            "a success resets the backoff"
        );
    }

    #[test]
    fn latency_model_learns_base_and_slope() {
        let mut book = PeerBook::new(PeerPolicy::default());
        let peer = PeerId::random();
        for _ in 0..50 {
            book.record_success(peer, 1, Duration::from_millis(2));
            book.record_success(peer, 11, Duration::from_millis(12));
        }
        let one = book.expected_ms(&peer, 1, 0);
        let eleven = book.expected_ms(&peer, 11, 0);
        assert!((one - 2.0).abs() < 0.5, "one token: {one}");
        assert!((eleven - 12.0).abs() < 1.5, "eleven tokens: {eleven}");
        assert!(
            book.expected_ms(&peer, 1, 100) > one,
            "queued tokens add to the estimate"
        );
    }

    #[test]
    fn unknown_peers_get_the_prior() {
        let book = PeerBook::new(PeerPolicy::default());
        assert_eq!(book.expected_ms(&PeerId::random(), 1, 0), 1.0);
    }
}
