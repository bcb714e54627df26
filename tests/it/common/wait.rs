//! Waiting for a condition with a deadline: the one way tests wait. A fixed sleep is either too
//! short on a loaded machine (a flaky test) or too long on a quiet one (a slow suite); a polled
//! condition is neither.

use std::future::Future;
use std::time::{Duration, Instant};

/// The longest pause between two polls: short enough that a met condition is seen quickly.
const MAX_PAUSE: Duration = Duration::from_millis(250);

/// Polls `check` until it returns `Ok`, starting at 10 ms between polls and backing off to
/// 250 ms; panics with `what` and the last `Err` (what was seen) once `within` has passed.
pub fn eventually<T>(
    within: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + within;
    let mut pause = Duration::from_millis(10);
    loop {
        match check() {
            Ok(v) => return v,
            Err(seen) if Instant::now() >= deadline => {
                panic!("{what}: not within {within:?}; last seen: {seen}")
            }
            Err(_) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(MAX_PAUSE);
            }
        }
    }
}

/// [`eventually`] for async checks (sleeps on the runtime's timer, not the thread).
pub async fn eventually_async<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + within;
    let mut pause = Duration::from_millis(10);
    loop {
        match check().await {
            Ok(v) => return v,
            Err(seen) if Instant::now() >= deadline => {
                panic!("{what}: not within {within:?}; last seen: {seen}")
            }
            Err(_) => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_PAUSE);
            }
        }
    }
}

#[test]
fn eventually_returns_the_first_success_and_reports_the_last_observation() {
    let mut n = 0;
    let v = eventually(Duration::from_secs(30), "counter", || {
        n += 1;
        if n == 3 {
            Ok(n)
        } else {
            Err(format!("n={n}"))
        }
    });
    assert_eq!(v, 3);
    let e = std::panic::catch_unwind(|| {
        eventually(Duration::from_millis(30), "never", || {
            Err::<(), _>("still no".into())
        })
    })
    .expect_err("gives up");
    let msg = e.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("never") && msg.contains("still no"), "{msg}");
}
