//! Expert computation with dynamic batching.
//!
//! Requests enqueue one job per expert. When the queue goes from idle to busy, a drain task
//! starts on the compute pool; it repeatedly takes the expert whose oldest job has waited
//! longest, merges that expert's queued jobs up to `max_batch_tokens` rows into one
//! forward pass, and sends each caller its rows back, until the queue is empty. While a
//! pass runs, new requests queue up, so under load passes grow without any added wait.
//! Under concurrent load a pass may also wait briefly for requests on their way (see
//! [`hold_until`]); `batch_wait` replaces that with a fixed wait. One pass runs at a time
//! and uses every thread of the pool.
//!
//! The queue is bounded by `max_queued_tokens`: a request that does not fit is rejected at
//! once, as a whole, so its caller can try another replica.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use tokio::sync::oneshot;

use crate::NodeMetrics;
use crate::host::HostedModel;

/// Result of one job: the expert output rows, or why computation failed.
pub(crate) type JobResult = Result<Tensor, String>;

/// Why the queue did not accept a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SubmitError {
    Full {
        queued: usize,
        requested: usize,
        max: usize,
    },
    Closed,
}

struct Job {
    input: Tensor,
    tokens: usize,
    enqueued: Instant,
    reply: oneshot::Sender<JobResult>,
}

struct State {
    /// Pending jobs per hosted expert slot.
    queues: Vec<VecDeque<Job>>,
    /// Slots with pending jobs, in the order they became non-empty.
    ready: VecDeque<usize>,
    queued_tokens: usize,
    /// Whether a drain task is running on the pool.
    draining: bool,
    /// The slot whose pass the drain task is delaying, and the count of its queued jobs
    /// that ends the delay. Arrivals below that count do not wake the drain task.
    holding: Option<(usize, usize)>,
    /// The last forward pass of each slot, for adaptive batching.
    last_pass: Vec<Option<PassRecord>>,
    closing: bool,
}

/// What the last forward pass of a slot was like.
#[derive(Debug, Clone, Copy)]
struct PassRecord {
    requests: usize,
    /// Jobs of the slot still queued when the pass ended.
    queued_after: usize,
    duration: Duration,
    ended: Instant,
}

/// Maximum adaptive hold; see [`hold_until`].
const MAX_ADAPTIVE_HOLD: Duration = Duration::from_millis(5);

struct Shared {
    state: Mutex<State>,
    /// Signalled when jobs arrive (for a drain task holding a batch) and when the drain
    /// task stops (for [`ComputeQueue::close`]).
    changed: Condvar,
    max_queued_tokens: usize,
    max_batch_tokens: usize,
    batch_wait: Duration,
    metrics: Arc<NodeMetrics>,
    model: Arc<HostedModel>,
    pool: rayon::ThreadPool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // No code panics while holding the lock; if a panic ever poisons it, the queue
        // itself is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The handle through which the gRPC service submits work.
#[derive(Clone)]
pub(crate) struct ComputeQueue {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ComputeQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComputeQueue").finish_non_exhaustive()
    }
}

/// Settings of the compute queue.
#[derive(Debug, Clone)]
pub(crate) struct QueueSettings {
    pub(crate) max_queued_tokens: usize,
    pub(crate) max_batch_tokens: usize,
    pub(crate) batch_wait: Duration,
    pub(crate) threads: usize,
}

impl ComputeQueue {
    /// Builds the compute pool.
    pub(crate) fn new(
        model: Arc<HostedModel>,
        settings: &QueueSettings,
        metrics: Arc<NodeMetrics>,
    ) -> std::io::Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(settings.threads)
            .thread_name(|i| format!("expertnet-compute-{i}"))
            .build()
            .map_err(std::io::Error::other)?;

        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queues: (0..model.experts.len()).map(|_| VecDeque::new()).collect(),
                ready: VecDeque::new(),
                queued_tokens: 0,
                draining: false,
                holding: None,
                last_pass: vec![None; model.experts.len()],
                closing: false,
            }),
            changed: Condvar::new(),
            max_queued_tokens: settings.max_queued_tokens,
            max_batch_tokens: settings.max_batch_tokens.max(1),
            batch_wait: settings.batch_wait,
            metrics,
            model,
            pool,
        });
        Ok(Self { shared })
    }

    /// Enqueues one job per `(slot, input)` pair, all or none. Each input is a
    /// `[tokens, hidden]` tensor in the compute dtype.
    pub(crate) fn submit(
        &self,
        jobs: Vec<(usize, Tensor)>,
    ) -> Result<Vec<oneshot::Receiver<JobResult>>, SubmitError> {
        let requested: usize = jobs.iter().map(|(_, input)| input.dims()[0]).sum();
        let mut state = self.shared.lock();
        if state.closing {
            return Err(SubmitError::Closed);
        }
        if state.queued_tokens + requested > self.shared.max_queued_tokens {
            return Err(SubmitError::Full {
                queued: state.queued_tokens,
                requested,
                max: self.shared.max_queued_tokens,
            });
        }

        let now = Instant::now();
        let mut receivers = Vec::with_capacity(jobs.len());
        for (slot, input) in jobs {
            let (reply, receiver) = oneshot::channel();
            let tokens = input.dims()[0];
            if state.queues[slot].is_empty() {
                state.ready.push_back(slot);
            }
            state.queues[slot].push_back(Job {
                input,
                tokens,
                enqueued: now,
                reply,
            });
            receivers.push(receiver);
        }
        state.queued_tokens += requested;
        self.shared.metrics.set_queued_tokens(state.queued_tokens);

        let start_drain = !state.draining;
        state.draining = true;
        let wake_holder = state.holding.is_some_and(|(slot, jobs)| {
            state.queues[slot].len() >= jobs || state.queued_tokens >= self.shared.max_batch_tokens
        });
        drop(state);

        if start_drain {
            let shared = Arc::clone(&self.shared);
            self.shared.pool.spawn(move || drain(&shared));
        } else if wake_holder {
            self.shared.changed.notify_all();
        }
        Ok(receivers)
    }

    /// Stops accepting jobs and waits, blocking, until the jobs already queued have been
    /// computed.
    pub(crate) fn close(&self) {
        let mut state = self.shared.lock();
        state.closing = true;
        self.shared.changed.notify_all();
        while state.draining {
            state = self
                .shared
                .changed
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Runs passes until the queue is empty, then marks the queue idle.
fn drain(shared: &Shared) {
    while let Some((slot, jobs)) = next_batch(shared) {
        run_pass(shared, slot, jobs);
    }
}

fn run_pass(shared: &Shared, slot: usize, jobs: Vec<Job>) {
    let (live, gone): (Vec<Job>, Vec<Job>) =
        jobs.into_iter().partition(|job| !job.reply.is_closed());
    if !gone.is_empty() {
        shared.metrics.record_cancelled(gone.len());
    }
    if live.is_empty() {
        return;
    }

    let tokens: usize = live.iter().map(|job| job.tokens).sum();
    let expert = &shared.model.experts[slot];
    let span = tracing::debug_span!(
        "forward_pass",
        layer = expert.layer,
        expert = expert.expert,
        tokens,
        requests = live.len()
    );
    let _entered = span.enter();

    let started = Instant::now();
    let input = if live.len() == 1 {
        Ok(live[0].input.clone())
    } else {
        let inputs: Vec<&Tensor> = live.iter().map(|job| &job.input).collect();
        Tensor::cat(&inputs, 0)
    };
    let result = input.and_then(|input| expert.weights.forward(&input));
    let duration = started.elapsed();
    shared
        .metrics
        .record_pass(tokens, live.len(), duration.as_secs_f64());
    let mut state = shared.lock();
    let queued_after = state.queues[slot].len();
    state.last_pass[slot] = Some(PassRecord {
        requests: live.len(),
        queued_after,
        duration,
        ended: Instant::now(),
    });
    drop(state);

    match result {
        Ok(output) => {
            let mut offset = 0;
            for job in live {
                let rows = output
                    .narrow(0, offset, job.tokens)
                    .map_err(|e| e.to_string());
                offset += job.tokens;
                // The caller may have gone since the pass started; nothing to do then.
                let _ = job.reply.send(rows);
            }
        }
        Err(error) => {
            tracing::debug!(%error, "expert forward pass failed");
            for job in live {
                let _ = job.reply.send(Err(error.to_string()));
            }
        }
    }
}

/// Returns until when the first job of `slot` may wait for more jobs to join its pass, if
/// at all, and how many queued jobs of the slot end the wait early.
///
/// With `batch_wait` set, up to that long. Otherwise the wait adapts: when the slot's last
/// pass merged several requests and ended less than one pass duration ago, clients are
/// sending concurrently and their next requests are on their way. The pass then waits
/// until every caller seen has sent again: the jobs queued reach the last pass's count
/// plus the jobs already queued when it ended. It waits at most one pass duration after
/// the last pass ended, and never longer than [`MAX_ADAPTIVE_HOLD`]. The load then runs in
/// fewer, larger passes, and a pass starts as soon as its callers are all in. With 32
/// one-token clients of a 1024 / 2816 expert on 2 cores, passes grew from 16 to 30
/// requests. A lone client, whose passes contain one request, never waits.
fn hold_until(
    batch_wait: Duration,
    state: &State,
    slot: usize,
    now: Instant,
) -> Option<(Instant, usize)> {
    if state.closing {
        return None;
    }
    let queue = &state.queues[slot];
    let front = queue.front()?;
    if !batch_wait.is_zero() {
        return Some((front.enqueued + batch_wait, usize::MAX));
    }
    let last = state.last_pass[slot]?;
    let deadline = last.ended + last.duration.min(MAX_ADAPTIVE_HOLD);
    let callers = last.requests + last.queued_after;
    if last.requests < 2 || queue.len() >= callers || now >= deadline {
        return None;
    }
    Some((deadline, callers))
}

/// Takes the next batch: the jobs of the slot that became ready first, up to
/// `max_batch_tokens` rows (a single larger job forms a batch of its own). Returns `None`,
/// after marking the drain task stopped, when the queue is empty.
fn next_batch(shared: &Shared) -> Option<(usize, Vec<Job>)> {
    let mut state = shared.lock();
    loop {
        let Some(&slot) = state.ready.front() else {
            state.draining = false;
            shared.changed.notify_all();
            return None;
        };

        let now = Instant::now();
        if let Some((hold_until, jobs)) = hold_until(shared.batch_wait, &state, slot, now) {
            let pending: usize = state.queues[slot].iter().map(|job| job.tokens).sum();
            if pending < shared.max_batch_tokens && now < hold_until {
                state.holding = Some((slot, jobs));
                state = shared
                    .changed
                    .wait_timeout(state, hold_until - now)
                    .map(|(guard, _)| guard)
                    .unwrap_or_else(|e| e.into_inner().0);
                state.holding = None;
                continue;
            }
        }

        state.ready.pop_front();
        let mut taken = Vec::new();
        let mut tokens = 0;
        while let Some(front) = state.queues[slot].front() {
            if !taken.is_empty() && tokens + front.tokens > shared.max_batch_tokens {
                break;
            }
            tokens += front.tokens;
            if let Some(job) = state.queues[slot].pop_front() {
                taken.push(job);
            }
        }
        if !state.queues[slot].is_empty() {
            state.ready.push_back(slot);
        }
        state.queued_tokens -= tokens;
        shared.metrics.set_queued_tokens(state.queued_tokens);
        return Some((slot, taken));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_with(jobs: usize, last: Option<PassRecord>, enqueued: Instant) -> State {
        let queue = (0..jobs)
            .map(|_| Job {
                input: Tensor::zeros((1, 4), candle_core::DType::F32, &candle_core::Device::Cpu)
                    .unwrap(),
                tokens: 1,
                enqueued,
                reply: oneshot::channel().0,
            })
            .collect();
        State {
            queues: vec![queue],
            ready: VecDeque::from([0]),
            queued_tokens: jobs,
            draining: true,
            holding: None,
            last_pass: vec![last],
            closing: false,
        }
    }

    fn pass(requests: usize, queued_after: usize, ms: u64, ended: Instant) -> PassRecord {
        PassRecord {
            requests,
            queued_after,
            duration: Duration::from_millis(ms),
            ended,
        }
    }

    #[test]
    fn hold_lone_client_never_waits() {
        let t0 = Instant::now();
        let state = state_with(1, Some(pass(1, 0, 4, t0)), t0);
        assert_eq!(hold_until(Duration::ZERO, &state, 0, t0), None);
        let state = state_with(1, None, t0);
        assert_eq!(hold_until(Duration::ZERO, &state, 0, t0), None);
    }

    #[test]
    fn hold_lasts_until_all_callers_arrive() {
        let t0 = Instant::now();
        let now = t0 + Duration::from_millis(1);
        // 30 served and 2 waiting when the pass ended: 32 callers in all.
        let last = Some(pass(30, 2, 4, t0));
        let state = state_with(20, last, t0);
        assert_eq!(
            hold_until(Duration::ZERO, &state, 0, now),
            Some((t0 + Duration::from_millis(4), 32))
        );
        let state = state_with(32, last, t0);
        assert_eq!(hold_until(Duration::ZERO, &state, 0, now), None);
    }

    #[test]
    fn hold_capped_at_five_milliseconds() {
        let t0 = Instant::now();
        let state = state_with(3, Some(pass(8, 0, 40, t0)), t0);
        let (until, _) = hold_until(Duration::ZERO, &state, 0, t0).unwrap();
        assert_eq!(until, t0 + MAX_ADAPTIVE_HOLD);
        let later = t0 + Duration::from_millis(6);
        assert_eq!(hold_until(Duration::ZERO, &state, 0, later), None);
    }

    #[test]
    fn hold_fixed_wait_and_closing() {
        let t0 = Instant::now();
        let wait = Duration::from_micros(300);
        let mut state = state_with(1, None, t0);
        assert_eq!(
            hold_until(wait, &state, 0, t0),
            Some((t0 + wait, usize::MAX))
        );
        state.closing = true;
        assert_eq!(hold_until(wait, &state, 0, t0), None);
    }
}
