//! The accept loop: TLS over TCP, HTTP/1.1 and HTTP/2 by ALPN, connection slots decided at
//! accept ([`super::slots`]: general slots with a per-address share, a small reserve for
//! `/healthz` and the operator), a TLS handshake deadline, and graceful shutdown: on the
//! signal, stop accepting, ask every connection to finish, let them for the grace period, then
//! stop waiting (mini-redis / Garage pattern).
//!
//! Each connection's requests are counted as they start and end (a request ends when its
//! response body has been sent or dropped), which gives the connection's timeouts, the same for
//! both protocols:
//!
//! * before its first request: the header read timeout (hyper's own covers HTTP/1.1 only once
//!   it has sniffed the protocol, and HTTP/2 not at all), then the connection is dropped;
//! * with no request in flight after one: `server.idle_timeout_s`, then a graceful close (a
//!   GOAWAY for HTTP/2, so a client never loses a request it sent). hyper's HTTP/2 server has
//!   no idle timeout of its own, and the keep-alive PINGs it sends (answered by every client)
//!   are not requests, so they never keep a connection open. An idle HTTP/1.1 connection may
//!   go sooner: hyper times the wait for the next request's headers with the header read
//!   timeout too;
//! * on a reserved slot: closed as soon as the first request is answered;
//! * while closing: whatever is in flight finishes; an idle closing connection gets the header
//!   read timeout to go, then is dropped.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use axum::Router;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use super::slots::{ReservedSlot, Slots};

/// Limits of the accept loop.
#[derive(Debug, Clone)]
pub struct ServeLimits {
    /// General connection slots.
    pub max_connections: usize,
    /// General slots one client address may hold.
    pub max_connections_per_address: usize,
    /// Slots kept for `/healthz` and the operator when the general ones are taken.
    pub reserved_connections: usize,
    pub header_read_timeout: Duration,
    /// How long a connection may stay open with no request in flight.
    pub idle_timeout: Duration,
    pub handshake_timeout: Duration,
    pub shutdown_grace: Duration,
}

/// Requests of one connection.
#[derive(Debug, Clone, Copy)]
struct Activity {
    in_flight: usize,
    requests: u64,
    /// When the connection opened or its last request ended.
    last: Instant,
}

/// One request in flight; ends when dropped (with the response body, or with the handler's
/// future if the client went away first).
struct InFlight(Arc<watch::Sender<Activity>>);

impl InFlight {
    fn start(activity: &Arc<watch::Sender<Activity>>) -> InFlight {
        activity.send_modify(|a| {
            a.in_flight += 1;
            a.requests += 1;
        });
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|a| {
            a.in_flight = a.in_flight.saturating_sub(1);
            a.last = Instant::now();
        });
    }
}

/// A response body that keeps its request in flight until it is sent or dropped.
struct Tracked {
    inner: Body,
    _in_flight: InFlight,
}

impl HttpBody for Tracked {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    limits: ServeLimits,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let slots = Slots::new(
        limits.max_connections,
        limits.max_connections_per_address,
        limits.reserved_connections,
    );
    let (stop, stopping) = watch::channel(false);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)));
    tokio::pin!(shutdown);
    loop {
        let room = tokio::select! {
            r = slots.room() => match r { Some(r) => r, None => break },
            _ = &mut shutdown => break,
        };
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Some(slot) = slots.admit(peer.ip(), room) else {
            metrics::counter!("drvault_connections_refused_total").increment(1);
            tracing::debug!(%peer, "address at its connection share and the reserve taken: closed");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        let builder = builder.clone();
        let stopping = stopping.clone();
        let limits = limits.clone();
        tokio::spawn(async move {
            let reserved = slot.reserved();
            let _slot = slot;
            let tls =
                match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
            let activity = Arc::new(watch::Sender::new(Activity {
                in_flight: 0,
                requests: 0,
                last: Instant::now(),
            }));
            let counts = activity.clone();
            let svc = tower::service_fn(move |mut req: Request<Incoming>| {
                let in_flight = InFlight::start(&counts);
                if let Some(why) = reserved {
                    req.extensions_mut().insert(why);
                }
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                let app = app.clone();
                async move {
                    let resp = app.oneshot(req).await?;
                    Ok::<_, Infallible>(resp.map(|inner| {
                        Body::new(Tracked {
                            inner,
                            _in_flight: in_flight,
                        })
                    }))
                }
            });
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(tls), TowerToHyperService::new(svc))
                .into_owned();
            drive(
                conn,
                |c| c.graceful_shutdown(),
                &activity,
                reserved,
                stopping,
                &limits,
                peer,
            )
            .await;
        });
    }
    drop(listener);
    tracing::info!(
        connections = slots.open(),
        "shutting down: draining connections"
    );
    let _ = stop.send(true);
    tokio::select! {
        _ = slots.drained() => tracing::info!("all connections closed"),
        _ = tokio::time::sleep(limits.shutdown_grace) => tracing::warn!("grace period over: aborting remaining connections"),
    }
}

/// Polls one connection to its end, closing it when it has been idle too long or on shutdown
/// (see the module docs for the rules).
async fn drive<C>(
    conn: C,
    graceful: impl Fn(Pin<&mut C>),
    activity: &watch::Sender<Activity>,
    reserved: Option<ReservedSlot>,
    mut stopping: watch::Receiver<bool>,
    limits: &ServeLimits,
    peer: std::net::SocketAddr,
) where
    C: Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>>,
{
    tokio::pin!(conn);
    let mut changes = activity.subscribe();
    let mut closing_since: Option<Instant> = None;
    loop {
        let a = *changes.borrow_and_update();
        let deadline = if a.in_flight > 0 {
            None
        } else if let Some(since) = closing_since {
            Some(since.max(a.last) + limits.header_read_timeout)
        } else if a.requests == 0 {
            Some(a.last + limits.header_read_timeout)
        } else if reserved.is_some() {
            Some(a.last)
        } else {
            Some(a.last + limits.idle_timeout)
        };
        let idle = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            // The sender lives as long as this function's caller: `changed` never fails here.
            _ = changes.changed() => {}
            _ = stopping.wait_for(|s| *s), if closing_since.is_none() => {
                graceful(conn.as_mut());
                closing_since = Some(Instant::now());
            }
            _ = idle => {
                if a.requests == 0 {
                    tracing::debug!(%peer, "no request within the header read timeout: closing");
                    return;
                }
                if closing_since.is_some() {
                    tracing::debug!(%peer, "closing connection did not go: dropping it");
                    return;
                }
                tracing::debug!(%peer, requests = a.requests, "idle connection: closing");
                metrics::counter!("drvault_idle_connections_closed_total").increment(1);
                graceful(conn.as_mut());
                closing_since = Some(Instant::now());
            }
        }
    }
}
