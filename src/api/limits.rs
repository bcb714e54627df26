//! Per-request limits that sit in front of every route: a minimum body rate (slow bodies are cut
//! off), a per-host request rate (429 with `Retry-After`) and what a reserved connection slot
//! serves. The header read and idle timeouts, TLS handshake deadline and connection slots live
//! in the accept loop ([`super::server`], [`super::slots`]); body and log size limits, and the
//! memory of bodies being received ([`super::body_budget`]), in the handlers.
//!
//! Decisions taken where the issue is silent:
//!
//! * **Body rate.** Only time the server spends *waiting for the client* counts: the clock runs
//!   while the handler polls the body and nothing has arrived, not while the handler waits for an
//!   ingest permit or writes a frame to a slow store (that back-pressure is ours, not the
//!   client's). Every body gets `body_rate_grace` of waiting for free; after that, each byte
//!   received buys `1 / body_min_rate` seconds more. Separately, no single wait may exceed
//!   `body_idle_timeout`. A body that breaks either rule ends with an error, which the handler
//!   reports (`body_incomplete`) and hyper closes the connection.
//! * **Rate limit.** A token bucket per host (for a provider: per host it acts for), refilled at
//!   `host_rate_per_s` up to `host_rate_burst`. The operator is not limited, and neither are
//!   requests whose token does not resolve: they are refused by authentication anyway, and
//!   bucketing unknown tokens would let anyone grow the table. 0 turns the limit off.
//! * **Reserved connection slots.** A request on a connection the accept loop put on a reserved
//!   slot ([`super::slots`]) is served only if it is a health probe, a console asset or carries
//!   the operator token; anything else gets 429 `connection_limit` with `Retry-After: 1`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use tokio::time::Instant;

use super::error::ApiError;
use super::slots::ReservedSlot;
use super::AppState;
use crate::error::Error;
use crate::vault::registry::Principal;

/// The limits, from `[server]` in the config.
#[derive(Debug, Clone)]
pub struct RequestLimits {
    /// Minimum bytes per second of waiting a body must deliver after the grace period; 0 = off.
    pub body_min_rate: u64,
    pub body_rate_grace: Duration,
    /// Longest wait for the next piece of a body.
    pub body_idle_timeout: Duration,
    /// Requests per second per host; 0 = off.
    pub host_rate_per_s: f64,
    pub host_rate_burst: f64,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits {
            body_min_rate: 4096,
            body_rate_grace: Duration::from_secs(10),
            body_idle_timeout: Duration::from_secs(60),
            host_rate_per_s: 500.0,
            host_rate_burst: 1000.0,
        }
    }
}

/// Why a body was cut off (the handler puts this in its `body_incomplete` message).
#[derive(Debug, thiserror::Error)]
pub enum BodyRateError {
    #[error("request body too slow: {received} bytes in {waited_s:.1} s of waiting (minimum {min_rate} bytes/s after {grace_s} s)")]
    TooSlow {
        received: u64,
        waited_s: f64,
        min_rate: u64,
        grace_s: u64,
    },
    #[error("request body stalled: nothing for {0} s")]
    Idle(u64),
    #[error("{0}")]
    Body(String),
}

/// One bucket per host.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Shared limiter state.
#[derive(Debug)]
pub struct Limiter {
    limits: RequestLimits,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl Limiter {
    pub fn new(limits: RequestLimits) -> Arc<Limiter> {
        Arc::new(Limiter {
            limits,
            buckets: Mutex::new(HashMap::new()),
        })
    }

    /// Takes one token from `who`'s bucket; `Err(seconds)` until one is available.
    fn take(&self, who: &str, now: Instant) -> Result<(), u64> {
        let (rate, burst) = (self.limits.host_rate_per_s, self.limits.host_rate_burst);
        if rate <= 0.0 {
            return Ok(());
        }
        // A poisoned lock only means a panic elsewhere while holding it; the map stays usable.
        let mut map = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let b = map.entry(who.to_string()).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        let refill = now.saturating_duration_since(b.last).as_secs_f64() * rate;
        b.tokens = (b.tokens + refill).min(burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - b.tokens) / rate).ceil().max(1.0) as u64)
        }
    }
}

/// The middleware: rate limit by host, then the body-rate guard around the body.
pub async fn enforce(
    State((state, limiter)): State<(AppState, Arc<Limiter>)>,
    req: Request,
    next: Next,
) -> Response {
    // Owned copies: the body is not `Sync`, so the request cannot be borrowed across an await.
    let (auth, acting) = {
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(String::from)
        };
        (
            header(axum::http::header::AUTHORIZATION.as_str()),
            header(super::auth::ACTING_HOST_HEADER),
        )
    };
    let principal = principal_of(&state, auth.as_deref()).await;
    if let Some(why) = req.extensions().get::<ReservedSlot>().copied() {
        if !reserve_serves(req.method(), req.uri().path(), principal.as_ref()) {
            metrics::counter!("drvault_reserved_slot_refusals_total").increment(1);
            return ApiError(Error::Busy {
                code: "connection_limit",
                message: match why {
                    ReservedSlot::ServerFull => "the server is at its connection limit: this connection is on a reserved slot, which serves only /healthz and the operator; retry shortly".into(),
                    ReservedSlot::AddressFull => "your address holds its share of the server's connections: this extra one serves only /healthz and the operator; reuse an open connection or retry shortly".into(),
                },
                retry_after_s: 1,
            })
            .into_response();
        }
    }
    if let Some(who) = principal.and_then(|p| bucket_of(p, acting.as_deref())) {
        if let Err(retry_after_s) = limiter.take(&who, Instant::now()) {
            metrics::counter!("drvault_rate_limited_total").increment(1);
            return ApiError(Error::Busy {
                code: "rate_limited",
                message: format!(
                    "{who}: more than {} requests per second (burst {}); slow down",
                    limiter.limits.host_rate_per_s, limiter.limits.host_rate_burst
                ),
                retry_after_s,
            })
            .into_response();
        }
    }
    let (parts, body) = req.into_parts();
    let body = guard_body(body, &limiter.limits);
    next.run(Request::from_parts(parts, body)).await
}

/// Who a request's bearer token names, if it names anyone.
async fn principal_of(state: &AppState, authorization: Option<&str>) -> Option<Principal> {
    let token = authorization?.strip_prefix("Bearer ")?;
    if token.is_empty() || token.len() > 256 {
        return None;
    }
    state.registry.resolve_token(token).await
}

/// The rate-limit bucket of a request: the host it acts for, or `None` (not limited).
fn bucket_of(principal: Principal, acting: Option<&str>) -> Option<String> {
    match principal {
        Principal::Account { .. } => None,
        Principal::Host { name } => Some(format!("host {name}")),
        Principal::Provider { name, .. } => {
            let acting = acting.unwrap_or("");
            // The host a provider acts for, so one provider serving many hosts gets each
            // host's allowance; an unnamed host shares the provider's own bucket.
            Some(if acting.is_empty() {
                format!("provider {name}")
            } else {
                format!("host {acting}")
            })
        }
    }
}

/// What a connection on a reserved slot serves: health probes, the console's static files (a
/// browser needs them to reach the operator routes) and anything the operator token asks for.
fn reserve_serves(method: &Method, path: &str, principal: Option<&Principal>) -> bool {
    const OPEN: [&str; 5] = [
        "/healthz",
        "/",
        "/console/app.js",
        "/console/app.css",
        "/console/favicon.svg",
    ];
    matches!(principal, Some(Principal::Account { .. }))
        || (matches!(*method, Method::GET | Method::HEAD) && OPEN.contains(&path))
}

/// Wraps a body so that a client too slow to send it is cut off (see the module docs).
pub fn guard_body(body: Body, limits: &RequestLimits) -> Body {
    if limits.body_min_rate == 0 {
        return body;
    }
    let limits = limits.clone();
    let stream = body.into_data_stream();
    struct St<S> {
        inner: S,
        received: u64,
        waited: Duration,
        done: bool,
    }
    let st = St {
        inner: stream,
        received: 0,
        waited: Duration::ZERO,
        done: false,
    };
    let s = futures_util::stream::unfold(st, move |mut st| {
        let limits = limits.clone();
        async move {
            if st.done {
                return None;
            }
            // Waiting allowed in total so far: the grace, plus what the bytes received bought.
            let earned = limits.body_rate_grace
                + Duration::from_secs_f64(st.received as f64 / limits.body_min_rate as f64);
            let left = earned.saturating_sub(st.waited);
            let budget = left.min(limits.body_idle_timeout);
            let began = Instant::now();
            let next = tokio::time::timeout(budget, st.inner.next()).await;
            st.waited += began.elapsed();
            let item = match next {
                Ok(None) => return None,
                Ok(Some(Ok(bytes))) => {
                    st.received += bytes.len() as u64;
                    Ok(bytes)
                }
                Ok(Some(Err(e))) => Err(BodyRateError::Body(e.to_string())),
                Err(_) if budget == limits.body_idle_timeout && budget < left => {
                    Err(BodyRateError::Idle(limits.body_idle_timeout.as_secs()))
                }
                Err(_) => Err(BodyRateError::TooSlow {
                    received: st.received,
                    waited_s: st.waited.as_secs_f64(),
                    min_rate: limits.body_min_rate,
                    grace_s: limits.body_rate_grace.as_secs(),
                }),
            };
            if let Err(e) = &item {
                metrics::counter!("drvault_slow_bodies_cut_total").increment(1);
                tracing::info!(error = %e, "request body cut off");
                st.done = true;
            }
            Some((item, st))
        }
    });
    Body::from_stream(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn limits(rate: f64, burst: f64) -> RequestLimits {
        RequestLimits {
            host_rate_per_s: rate,
            host_rate_burst: burst,
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn bucket_allows_the_burst_then_refills() {
        let l = Limiter::new(limits(2.0, 3.0));
        let t = Instant::now();
        for _ in 0..3 {
            l.take("host a", t).unwrap();
        }
        assert_eq!(l.take("host a", t), Err(1));
        // Another host has its own bucket.
        l.take("host b", t).unwrap();
        // Half a second at 2/s refills one request.
        l.take("host a", t + Duration::from_millis(500)).unwrap();
        assert!(l.take("host a", t + Duration::from_millis(500)).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn zero_rate_is_unlimited() {
        let l = Limiter::new(limits(0.0, 0.0));
        for _ in 0..10_000 {
            l.take("h", Instant::now()).unwrap();
        }
    }

    fn slow_body(pieces: Vec<(u64, usize)>) -> Body {
        // (delay before the piece in ms, piece length)
        let s = futures_util::stream::iter(pieces).then(|(ms, n)| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, std::io::Error>(Bytes::from(vec![1u8; n]))
        });
        Body::from_stream(s)
    }

    fn body_limits() -> RequestLimits {
        RequestLimits {
            body_min_rate: 1000,
            body_rate_grace: Duration::from_secs(2),
            body_idle_timeout: Duration::from_secs(5),
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_at_a_good_rate_passes() {
        let b = guard_body(slow_body(vec![(500, 2000); 10]), &body_limits());
        let all = axum::body::to_bytes(b, usize::MAX).await.unwrap();
        assert_eq!(all.len(), 20_000);
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickling_body_is_cut_off() {
        // 10 bytes a second: the grace runs out and the bytes never pay for more waiting.
        let b = guard_body(slow_body(vec![(1000, 10); 60]), &body_limits());
        let e = axum::body::to_bytes(b, usize::MAX).await.unwrap_err();
        let msg = format!("{e} {:?}", std::error::Error::source(&e));
        assert!(msg.contains("too slow"), "{msg}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_is_cut_off_by_the_idle_timeout() {
        // A fast start buys plenty of waiting, but no single wait may pass the idle timeout.
        let b = guard_body(
            slow_body(vec![(0, 1_000_000), (60_000, 10)]),
            &body_limits(),
        );
        let e = axum::body::to_bytes(b, usize::MAX).await.unwrap_err();
        let msg = format!("{e} {:?}", std::error::Error::source(&e));
        assert!(msg.contains("stalled"), "{msg}");
    }

    #[tokio::test(start_paused = true)]
    async fn server_side_pauses_do_not_count() {
        // The handler takes its time between reads (a slow store); the client is not blamed.
        let b = guard_body(slow_body(vec![(0, 100); 5]), &body_limits());
        let mut s = b.into_data_stream();
        let mut n = 0;
        while let Some(piece) = s.next().await {
            n += piece.unwrap().len();
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        assert_eq!(n, 500);
    }
}
