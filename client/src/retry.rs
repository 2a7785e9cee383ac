//! Retries: which failures are retried, how long to wait between attempts, and the retry
//! budget that keeps a failing server from seeing a retry storm.
//!
//! - Retried: `unavailable` and `overloaded` answered by the server (it did nothing), and
//!   calls that were never sent (the connection was down). A transport failure after a
//!   request may have left (`ApiError::outcome_unknown`) is retried only for calls that are
//!   safe to repeat: reads, and writes carrying an idempotency key (the server replays
//!   the recorded outcome); not writes without one.
//! - Never retried: everything else (invalid argument, not found, condition failed,
//!   unauthenticated, deadline exceeded...).
//! - Backoff: exponential from `initial_backoff` by `multiplier`, capped at `max_backoff`,
//!   with "equal jitter" (a uniform draw in the upper half of the step), and never shorter
//!   than the server's `retryAfterMs`. The call's deadline covers all attempts: a retry that
//!   could not start before it is not made.
//! - Budget (gRPC retry throttling): a token bucket shared by all calls of a client. Each
//!   retryable failure takes a token, each success gives back `budget_token_ratio` (1.0,
//!   not gRPC's 0.1, so that 30% failures are still fully retried); retries are allowed
//!   only while more than half the tokens are left.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capkv::{is_retryable, ApiError, ErrorCode};
use rand::Rng;
use tokio::time::Instant;

/// Hard cap on attempts of one call, whatever the policy says.
pub const MAX_ATTEMPTS_CAP: u32 = 5;

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts per call including the first; 1 = no retries; capped at 5.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub multiplier: f64,
    pub max_backoff: Duration,
    /// Size of the retry budget's bucket.
    pub budget_tokens: f64,
    /// Tokens a success gives back.
    pub budget_token_ratio: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(10),
            multiplier: 2.0,
            max_backoff: Duration::from_secs(1),
            // A success earns one retry: retries flow while fewer than about half of the
            // attempts fail (a flaky server), and stop after 10 failures once most do (a
            // sick one), so a storm adds at most ~10 attempts to a client's calls. The
            // bucket is deep enough that a run of bad luck at 30% failures (an excursion
            // of 10 tokens) is vanishingly rare.
            budget_tokens: 20.0,
            budget_token_ratio: 1.0,
        }
    }
}

impl RetryPolicy {
    /// No retries at all.
    pub fn none() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    pub fn attempts(&self) -> u32 {
        self.max_attempts.clamp(1, MAX_ATTEMPTS_CAP)
    }

    /// The wait before retry number `retry` (1 = the first retry), before `retryAfterMs`.
    pub fn backoff(&self, retry: u32, rng: &mut impl Rng) -> Duration {
        let exp = self
            .multiplier
            .max(1.0)
            .powi(retry.saturating_sub(1).min(64) as i32);
        // Checked: a huge initial backoff or an infinite multiplier would overflow
        // (`mul_f64` panics); the cap holds them.
        let step = Duration::try_from_secs_f64(self.initial_backoff.as_secs_f64() * exp)
            .unwrap_or(Duration::MAX)
            .min(self.max_backoff);
        // Equal jitter: at least half the step, so waits grow; at most the step, so the cap
        // holds; random in between, so clients that failed together do not retry together.
        step / 2 + step.mul_f64(rng.random::<f64>() / 2.0)
    }
}

/// The token bucket of gRPC's retry throttling, shared by the clones of a client.
#[derive(Debug, Clone)]
pub struct RetryBudget {
    inner: Arc<Mutex<BudgetState>>,
}

#[derive(Debug)]
struct BudgetState {
    tokens: f64,
    max: f64,
    ratio: f64,
}

impl RetryBudget {
    pub fn new(policy: &RetryPolicy) -> Self {
        let max = policy.budget_tokens.max(1.0);
        Self {
            inner: Arc::new(Mutex::new(BudgetState {
                tokens: max,
                max,
                ratio: policy.budget_token_ratio.max(0.0),
            })),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut BudgetState) -> R) -> R {
        // The state is two floats; a panic elsewhere cannot leave it inconsistent.
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s)
    }

    pub fn on_success(&self) {
        self.with(|s| s.tokens = (s.tokens + s.ratio).min(s.max));
    }

    pub fn on_retryable_failure(&self) {
        self.with(|s| s.tokens = (s.tokens - 1.0).max(0.0));
    }

    pub fn allows_retry(&self) -> bool {
        self.with(|s| s.tokens > s.max / 2.0)
    }
}

/// How one attempt ended.
pub enum Attempt<T> {
    Done(Result<T, ApiError>),
    /// The request never left (no connection): safe to retry for any call.
    NotSent(ApiError),
}

/// Whether a call may be repeated after its outcome became unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Safety {
    /// Reads: repeating changes nothing.
    Idempotent,
    /// Writes without an idempotency key: retried only when nothing was done.
    NotIdempotent,
}

/// Runs `attempt(n)` for n = 1, 2, ... until it succeeds, fails in a way that is not
/// retried, the policy's attempts or the budget run out, or the deadline would pass.
pub async fn run<T, F, Fut>(
    method: &'static str,
    policy: &RetryPolicy,
    budget: &RetryBudget,
    deadline: Instant,
    safety: Safety,
    mut attempt: F,
) -> Result<T, ApiError>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Attempt<T>>,
{
    let attempts = policy.attempts();
    let mut n = 1;
    loop {
        let (err, retry_allowed_here) = match attempt(n).await {
            Attempt::Done(Ok(v)) => {
                budget.on_success();
                return Ok(v);
            }
            Attempt::Done(Err(e)) => {
                let ok =
                    is_retryable(e.code) && (!e.outcome_unknown || safety == Safety::Idempotent);
                (e, ok)
            }
            Attempt::NotSent(e) => (e, true),
        };
        if !retry_allowed_here {
            return Err(err);
        }
        budget.on_retryable_failure();
        if n >= attempts || !budget.allows_retry() {
            tracing::debug!(
                method,
                attempt = n,
                code = capkv::code_name(err.code),
                "giving up"
            );
            return Err(err);
        }
        let wait = policy
            .backoff(n, &mut rand::rng())
            .max(Duration::from_millis(u64::from(err.retry_after_ms)));
        if Instant::now()
            .checked_add(wait)
            .is_none_or(|t| t >= deadline)
        {
            return Err(if err.code == ErrorCode::DeadlineExceeded {
                err
            } else {
                ApiError::new(err.code, format!("{} (no time left to retry)", err.message))
            });
        }
        tracing::debug!(
            attempt = n,
            wait_ms = wait.as_millis() as u64,
            code = capkv::code_name(err.code),
            "retrying"
        );
        metrics::counter!("capkv_client_retries_total", "method" => method, "code" => capkv::code_name(err.code))
            .increment(1);
        tokio::time::sleep(wait).await;
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    fn unavailable() -> ApiError {
        ApiError::new(ErrorCode::Unavailable, "down")
    }

    #[test]
    fn backoff_grows_is_jittered_and_capped() {
        let p = RetryPolicy {
            initial_backoff: Duration::from_millis(10),
            multiplier: 2.0,
            max_backoff: Duration::from_millis(50),
            ..RetryPolicy::default()
        };
        let mut rng = rand::rng();
        for _ in 0..1000 {
            let b1 = p.backoff(1, &mut rng);
            let b3 = p.backoff(3, &mut rng);
            let b9 = p.backoff(9, &mut rng);
            assert!((5..=10).contains(&b1.as_millis()), "{b1:?}");
            assert!((20..=40).contains(&b3.as_millis()), "{b3:?}");
            assert!((25..=50).contains(&b9.as_millis()), "capped: {b9:?}");
        }
        let draws: std::collections::HashSet<_> =
            (0..100).map(|_| p.backoff(2, &mut rng)).collect();
        assert!(draws.len() > 10, "jittered");
        // Absurd settings (the CLI takes any duration; the library any multiplier) are
        // capped, not a panic.
        for (initial, multiplier) in [
            (Duration::from_secs(u64::MAX / 2), 2.0),
            (Duration::from_millis(10), f64::INFINITY),
        ] {
            let p = RetryPolicy {
                initial_backoff: initial,
                multiplier,
                max_backoff: Duration::from_secs(1),
                ..RetryPolicy::default()
            };
            assert!(p.backoff(5, &mut rng) <= Duration::from_secs(1));
        }
        // A timeout past what an Instant holds is a far deadline, not a panic.
        assert!(crate::far_from_now(Duration::MAX) > Instant::now());
    }

    #[test]
    fn attempts_are_capped() {
        let p = RetryPolicy {
            max_attempts: 50,
            ..RetryPolicy::default()
        };
        assert_eq!(p.attempts(), MAX_ATTEMPTS_CAP);
        assert_eq!(RetryPolicy::none().attempts(), 1);
    }

    #[test]
    fn budget_stops_retries_when_most_calls_fail() {
        let b = RetryBudget::new(&RetryPolicy::default());
        assert!(b.allows_retry());
        for _ in 0..10 {
            b.on_retryable_failure();
        }
        assert!(!b.allows_retry(), "half the tokens gone");
        b.on_success();
        assert!(b.allows_retry(), "successes earn retries back");
    }

    /// Drives `run` with paused time and records when each attempt started.
    async fn timeline(
        policy: RetryPolicy,
        safety: Safety,
        outcomes: Vec<Attempt<()>>,
    ) -> (Result<(), ApiError>, Vec<Duration>) {
        let start = Instant::now();
        let outcomes = RefCell::new(outcomes.into_iter());
        let times = RefCell::new(Vec::new());
        let budget = RetryBudget::new(&policy);
        let r = run(
            "test",
            &policy,
            &budget,
            start + Duration::from_secs(10),
            safety,
            |_| {
                times.borrow_mut().push(start.elapsed());
                let next = outcomes.borrow_mut().next();
                async move { next.unwrap_or(Attempt::Done(Ok(()))) }
            },
        )
        .await;
        (r, times.into_inner())
    }

    #[tokio::test(start_paused = true)]
    async fn delays_follow_the_policy_in_virtual_time() {
        let policy = RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(100),
            multiplier: 2.0,
            max_backoff: Duration::from_millis(300),
            ..RetryPolicy::default()
        };
        let fail = || Attempt::Done(Err(unavailable()));
        let (r, t) = timeline(policy, Safety::Idempotent, vec![fail(), fail(), fail()]).await;
        assert!(r.is_ok());
        assert_eq!(t.len(), 4);
        let gaps: Vec<u128> = t.windows(2).map(|w| (w[1] - w[0]).as_millis()).collect();
        assert!((50..=100).contains(&gaps[0]), "{gaps:?}");
        assert!((100..=200).contains(&gaps[1]), "{gaps:?}");
        assert!((150..=300).contains(&gaps[2]), "capped at 300: {gaps:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_honoured_and_non_retryable_errors_are_final() {
        let slow = ApiError::new(ErrorCode::Overloaded, "busy").with_retry_after_ms(700);
        let (r, t) = timeline(
            RetryPolicy::default(),
            Safety::Idempotent,
            vec![Attempt::Done(Err(slow))],
        )
        .await;
        assert!(r.is_ok());
        assert!(t[1] >= Duration::from_millis(700), "{t:?}");

        let (r, t) = timeline(
            RetryPolicy::default(),
            Safety::Idempotent,
            vec![Attempt::Done(Err(ApiError::new(
                ErrorCode::InvalidArgument,
                "no",
            )))],
        )
        .await;
        assert_eq!(r.unwrap_err().code, ErrorCode::InvalidArgument);
        assert_eq!(t.len(), 1, "attempted exactly once");
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_outcomes_are_retried_only_when_idempotent() {
        let broken = || {
            Attempt::Done(Err(ApiError {
                outcome_unknown: true,
                ..unavailable()
            }))
        };
        let (r, t) = timeline(
            RetryPolicy::default(),
            Safety::NotIdempotent,
            vec![broken()],
        )
        .await;
        assert!(r.unwrap_err().outcome_unknown);
        assert_eq!(t.len(), 1, "a write with unknown outcome is not repeated");
        let (r, t) = timeline(RetryPolicy::default(), Safety::Idempotent, vec![broken()]).await;
        assert!(r.is_ok());
        assert_eq!(t.len(), 2);
        let (r, t) = timeline(
            RetryPolicy::default(),
            Safety::NotIdempotent,
            vec![Attempt::NotSent(unavailable())],
        )
        .await;
        assert!(r.is_ok(), "a write that was never sent is retried");
        assert_eq!(t.len(), 2);
    }
}
