//! Retry with the seed's back-off: after a recoverable error, wait 1, 2, 4, 8, 10 minutes, then
//! every 30 minutes (docs/api.md, "Errors"). `scale` multiplies every wait (tests use ~0.001); a server's
//! `Retry-After` is honoured when it asks for longer. Non-recoverable errors return at once.

use std::future::Future;
use std::time::Duration;

// tokio's clock, so tests with paused time see the waits pass.
use tokio::time::Instant;

use crate::agent::AgentError;
use crate::client::ClientError;

/// The schedule, in seconds, before scaling.
pub const SCHEDULE_S: [u64; 5] = [60, 120, 240, 480, 600];
pub const STEADY_S: u64 = 1800;

#[derive(Debug, Clone)]
pub struct Backoff {
    pub scale: f64,
    /// Give up once this much time has passed since the first failure.
    pub give_up_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            scale: 1.0,
            give_up_after: Duration::from_secs(24 * 3600),
        }
    }
}

impl Backoff {
    /// Wait before retry number `attempt` (0-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let base = SCHEDULE_S
            .get(attempt as usize)
            .copied()
            .unwrap_or(STEADY_S);
        Duration::from_secs_f64(base as f64 * self.scale.max(0.0))
    }

    /// Runs `op` until it succeeds, fails with a non-recoverable error, or time runs out.
    pub async fn retry<T, F, Fut>(&self, what: &str, op: F) -> Result<T, AgentError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        self.retry_unless(what, &[], op).await
    }

    /// As [`Backoff::retry`], but errors with one of `stop` codes end at once, recoverable or
    /// not (a log refused because a resync is in progress must not be sent again later).
    pub async fn retry_unless<T, F, Fut>(
        &self,
        what: &str,
        stop: &[&str],
        mut op: F,
    ) -> Result<T, AgentError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        // The give-up clock starts at the first failure; from then on neither a back-off sleep
        // nor a retry may run past the deadline (a 1-minute wait must not outlast
        // `--give-up-after 5s`).
        let mut first_failure: Option<Instant> = None;
        let mut attempt = 0u32;
        let mut result = op().await;
        loop {
            let e = match result {
                Ok(v) => return Ok(v),
                Err(e) if !e.recoverable() || e.code().is_some_and(|c| stop.contains(&c)) => {
                    return Err(AgentError::Client(e))
                }
                Err(e) => e,
            };
            let since = *first_failure.get_or_insert_with(Instant::now);
            let deadline = since
                .checked_add(self.give_up_after)
                .unwrap_or_else(|| since + Duration::from_secs(FAR_FUTURE_S));
            let gave_up = |attempts: u32, last: ClientError| AgentError::GaveUp {
                attempts,
                elapsed_s: since.elapsed().as_secs(),
                last,
            };
            let mut wait = self.delay(attempt);
            if let Some(ra) = e.retry_after() {
                wait = wait.max(ra.mul_f64(self.scale.min(1.0)));
            }
            // A server's Retry-After can be anything; too far to represent is past the deadline.
            let retry_at = Instant::now().checked_add(wait).unwrap_or(deadline);
            if retry_at >= deadline {
                tracing::warn!(what, attempt, error = %e, "recoverable error; no retry fits before the give-up deadline");
                tokio::time::sleep_until(deadline).await;
                return Err(gave_up(attempt + 1, e));
            }
            tracing::warn!(what, attempt, wait_s = wait.as_secs_f64(), error = %e, "recoverable error; retrying");
            tokio::time::sleep_until(retry_at).await;
            attempt += 1;
            result = match tokio::time::timeout_at(deadline, op()).await {
                Ok(r) => r,
                // A retry still running at the deadline is abandoned; the error before it is
                // the last one there is.
                Err(_) => return Err(gave_up(attempt + 1, e)),
            };
        }
    }
}

/// Stands in for a give-up limit too large for the clock (`--give-up-after 1000years`).
const FAR_FUTURE_S: u64 = 100 * 365 * 24 * 3600;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ErrorBody;
    use reqwest::StatusCode;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn schedule_matches_the_seed() {
        let b = Backoff::default();
        let mins: Vec<u64> = (0..7).map(|i| b.delay(i).as_secs() / 60).collect();
        assert_eq!(mins, vec![1, 2, 4, 8, 10, 30, 30]);
        let fast = Backoff {
            scale: 0.001,
            ..Default::default()
        };
        assert_eq!(fast.delay(0), Duration::from_millis(60));
    }

    fn api_err(recoverable: bool) -> ClientError {
        ClientError::Api {
            status: if recoverable {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::CONFLICT
            },
            body: ErrorBody {
                code: "x".into(),
                message: "m".into(),
                recoverable,
                owner_url: None,
            },
            retry_after: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_recoverable_and_stops_on_fatal() {
        let b = Backoff::default();
        let n = AtomicU32::new(0);
        let r = b
            .retry("t", || async {
                if n.fetch_add(1, Ordering::SeqCst) < 3 {
                    Err(api_err(true))
                } else {
                    Ok(7)
                }
            })
            .await;
        assert_eq!(r.unwrap(), 7);
        assert_eq!(n.load(Ordering::SeqCst), 4);
        let n = AtomicU32::new(0);
        let r: Result<(), _> = b
            .retry("t", || async {
                n.fetch_add(1, Ordering::SeqCst);
                Err(api_err(false))
            })
            .await;
        assert!(matches!(r, Err(AgentError::Client(_))));
        assert_eq!(
            n.load(Ordering::SeqCst),
            1,
            "non-recoverable errors are not retried"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_the_limit() {
        let b = Backoff {
            scale: 1.0,
            give_up_after: Duration::from_secs(3600),
        };
        let start = Instant::now();
        let r: Result<(), _> = b.retry("t", || async { Err(api_err(true)) }).await;
        match r {
            // Failures at 0, 1, 3, 7, 15, 25 and 55 minutes; the next retry (85) is past the
            // hour, so the agent gives up at the hour, not later.
            Err(AgentError::GaveUp {
                attempts,
                elapsed_s,
                ..
            }) => assert_eq!((attempts, elapsed_s), (7, 3600)),
            other => panic!("{other:?}"),
        }
        assert_eq!(start.elapsed(), Duration::from_secs(3600));
    }

    /// `--give-up-after 5s` with a first back-off of a minute: gives up at 5 s, in the middle
    /// of the wait, not after it.
    #[tokio::test(start_paused = true)]
    async fn gives_up_at_the_deadline_during_a_back_off_wait() {
        let b = Backoff {
            scale: 1.0,
            give_up_after: Duration::from_secs(5),
        };
        let start = Instant::now();
        let n = AtomicU32::new(0);
        let r: Result<(), _> = b
            .retry("t", || async {
                n.fetch_add(1, Ordering::SeqCst);
                Err(api_err(true))
            })
            .await;
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        assert_eq!(n.load(Ordering::SeqCst), 1, "no retry fits in 5 s");
        match r {
            Err(e @ AgentError::GaveUp { .. }) => {
                assert!(e.to_string().contains("over 5 s"), "{e}");
            }
            other => panic!("{other:?}"),
        }
    }

    /// A retry that hangs (a server that accepts and never answers) is abandoned at the
    /// deadline too.
    #[tokio::test(start_paused = true)]
    async fn gives_up_at_the_deadline_during_a_hanging_retry() {
        let b = Backoff {
            scale: 0.001,
            give_up_after: Duration::from_secs(5),
        };
        let start = Instant::now();
        let n = AtomicU32::new(0);
        let retry = b.retry("t", || async {
            if n.fetch_add(1, Ordering::SeqCst) == 0 {
                Err(api_err(true))
            } else {
                std::future::pending::<Result<(), ClientError>>().await
            }
        });
        // The outer limit only turns a hang into a failure of this test.
        let r = tokio::time::timeout(Duration::from_secs(3600), retry)
            .await
            .expect("the retry loop outlived its deadline by an hour");
        assert!(
            matches!(r, Err(AgentError::GaveUp { attempts: 2, .. })),
            "{r:?}"
        );
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }
}
