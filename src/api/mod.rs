//! The HTTPS API: `/v1/` for agents and operators, `/metrics`, `/healthz`, and the operator
//! console's static page ([`console`]). Handlers are thin: [`extract`] checks the path segments
//! (names, indexes, job ids) before a handler runs; the handler reads the body, calls the domain
//! (`protection`, `jobs`, `vault`), and turns the result into JSON; nothing here touches the
//! store. [`routes`] has a module per resource. Errors map to HTTP in [`error`] only.
//!
//! Every request gets one tracing span labelled by its endpoint (the matched route template,
//! e.g. `/v1/agent/vms/{vm}/disks/{disk}/blocks/{index}`), and the same label goes on the
//! request counter and latency histogram.

pub mod audit_layer;
pub mod auth;
pub mod body_budget;
pub mod console;
pub mod error;
pub mod extract;
pub mod keys;
pub mod limits;
pub mod openapi;
pub mod routes;
pub mod server;
pub mod slots;
pub mod tls;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::jobs::Jobs;
use crate::vault::registry::Registrar;
use crate::vault::Vault;

/// Shared state of the API.
#[derive(Clone)]
pub struct AppState {
    pub vault: Vault,
    /// VM and disk records.
    pub catalog: crate::catalog::Catalog,
    /// Initial-replication blocks and change logs.
    pub ingest: crate::ingest::Ingest,
    /// Points, readers, merge, damage queries.
    pub replicas: crate::replica::Replicas,
    pub resyncs: crate::replica::resync::Resyncs,
    /// What the API shows of a VM.
    pub overview: crate::overview::Overview,
    /// Each host's last heartbeat (`POST /v1/agent/heartbeat`).
    pub contacts: crate::contact::Contacts,
    pub jobs: Jobs,
    pub failovers: crate::failover::service::Failovers,
    pub plans: crate::failover::plan::Plans,
    /// Verify and garbage collection.
    pub scrub: crate::scrub::Scrub,
    /// Hosts, providers and token digests (cached; this server is the registry's writer).
    pub registry: Registrar,
    /// The audit log of operator actions ([`audit_layer`] records them).
    pub audit: crate::audit::AuditLog,
    /// Block and patch bodies being stored at once (config `ingest.max_inflight_blocks`),
    /// taken once a body is complete.
    pub ingest_permits: Arc<Semaphore>,
    /// Memory of upload bodies being received (config `ingest.body_memory_mib`, per host
    /// `ingest.body_memory_per_host_mib`).
    pub body_budget: Arc<body_budget::BodyBudget>,
    pub metrics: Option<PrometheusHandle>,
    /// Background work, drained on shutdown.
    pub tasks: crate::tasks::Tasks,
    /// URL agents are told to use (credentials files).
    pub public_url: String,
    /// PEM of the certificate agents should trust (credentials files).
    pub ca_pem: String,
}

/// The whole router, behind the per-request limits (rate limit, body rate).
pub fn router(state: AppState, limits: limits::RequestLimits) -> Router {
    let limiter = limits::Limiter::new(limits);
    routes::routes()
        .merge(keys::routes())
        .merge(audit_layer::routes())
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            audit_layer::record,
        ))
        .route_layer(axum::middleware::from_fn(observe))
        .fallback(routes::not_found)
        .layer(axum::middleware::from_fn_with_state(
            (state.clone(), limiter),
            limits::enforce,
        ))
        .with_state(state)
}

/// One span per request; metrics labelled by endpoint, method and status.
async fn observe(matched: Option<MatchedPath>, req: Request, next: Next) -> Response {
    let endpoint = matched
        .as_ref()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().to_string();
    let span = tracing::info_span!("request", method = %method, endpoint = %endpoint, status = tracing::field::Empty);
    let start = Instant::now();
    let resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status().as_u16().to_string();
    span.record("status", status.as_str());
    let secs = start.elapsed().as_secs_f64();
    let _e = span.enter();
    tracing::debug!(secs, "request done");
    metrics::counter!("drvault_http_requests_total", "endpoint" => endpoint.clone(), "method" => method.clone(), "status" => status.clone()).increment(1);
    metrics::histogram!("drvault_http_request_duration_seconds", "endpoint" => endpoint, "method" => method, "status" => status).record(secs);
    resp
}
