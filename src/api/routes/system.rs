//! Health, metrics, server information and the console's static assets.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use crate::api::auth::Viewer;
use crate::api::AppState;
use crate::vault::layout;
use crate::wire::ServerInfo;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/", get(super::console::index))
        .route("/console/app.js", get(super::console::app_js))
        .route("/console/app.css", get(super::console::app_css))
        .route("/console/favicon.svg", get(super::console::favicon))
        .route("/v1/server", get(server_info))
        .route("/v1/servers", get(servers))
        .route("/v1/openapi.json", get(crate::api::openapi::openapi_json))
}

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "system",
    summary = "Whether the vault answers",
    security(()),
    responses(
        (status = 200, description = "The vault answers: `{\"status\": \"ok\"}`", body = Object),
        (status = 503, description = "The vault does not answer", body = Object),
    )
)]
async fn healthz(State(s): State<AppState>) -> Response {
    match s.vault.store().head(&layout::key_check()).await {
        Ok(Some(_)) => Json(serde_json::json!({"status": "ok"})).into_response(),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "vault unreachable"})),
        )
            .into_response(),
    }
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "system",
    summary = "Prometheus metrics (text format)",
    security(()),
    responses(
        (status = 200, description = "Prometheus text exposition format 0.0.4", body = String, content_type = "text/plain"),
        (status = 503, description = "No metrics recorder installed", body = String, content_type = "text/plain"),
    )
)]
async fn metrics(State(s): State<AppState>) -> Response {
    for v in s.overview.list().await {
        let health = match v.health {
            crate::catalog::Health::Normal => 0.0,
            crate::catalog::Health::Warning => 1.0,
            crate::catalog::Health::Critical => 2.0,
        };
        metrics::gauge!("drvault_vm_health", "vm" => v.name.clone()).set(health);
        metrics::gauge!("drvault_vm_replication_progress", "vm" => v.name.clone()).set(v.progress);
        if let Some(rpo) = v.rpo_seconds {
            metrics::gauge!("drvault_vm_rpo_seconds", "vm" => v.name.clone()).set(rpo as f64);
        }
        // The limit the server's own `rpo_exceeded` rule uses, so alert rules compare against
        // the same figure instead of repeating the policy arithmetic.
        metrics::gauge!("drvault_vm_rpo_limit_seconds", "vm" => v.name.clone())
            .set(crate::overview::rpo_limit_s(&v.policy) as f64);
        // A resync is due (some disk requires one) and has not run yet: waiting for its window,
        // or for the agent.
        let resync_waiting = v.disks.iter().any(|d| d.resync_required.is_some())
            || v.resync.as_ref().is_some_and(|r| r.state == "scheduled");
        metrics::gauge!("drvault_vm_resync_waiting", "vm" => v.name.clone())
            .set(if resync_waiting { 1.0 } else { 0.0 });
        if let Some(a) = &v.agent {
            metrics::gauge!("drvault_vm_backlog_bytes", "vm" => v.name.clone())
                .set(a.backlog_bytes as f64);
            metrics::gauge!("drvault_vm_agent_error", "vm" => v.name.clone()).set(
                match &a.last_error {
                    Some(f) if !f.recoverable => 2.0,
                    Some(_) => 1.0,
                    None => 0.0,
                },
            );
        }
        for d in &v.disks {
            let labels = [("vm", v.name.clone()), ("disk", d.id.clone())];
            metrics::gauge!("drvault_disk_pending_log_bytes", &labels)
                .set(d.pending_log_bytes as f64);
            metrics::gauge!("drvault_disk_journal_length", &labels).set(d.journal_length as f64);
            metrics::gauge!("drvault_disk_resync_required", &labels).set(
                if d.resync_required.is_some() {
                    1.0
                } else {
                    0.0
                },
            );
        }
    }
    let now = crate::util::unix_now();
    for (host, c) in s.contacts.all() {
        metrics::gauge!("drvault_host_last_contact_seconds", "host" => host.clone())
            .set(now.saturating_sub(c.last_contact_unix) as f64);
        let backlog: u64 = c
            .vms
            .values()
            .flat_map(|r| r.disks.iter())
            .map(|d| d.backlog_bytes)
            .sum();
        metrics::gauge!("drvault_host_not_reporting_after_seconds", "host" => host.clone())
            .set(crate::overview::not_reporting_after_s(&c, s.overview.health_settings()) as f64);
        metrics::gauge!("drvault_host_backlog_bytes", "host" => host).set(backlog as f64);
    }
    vault_space(&s).await;
    match &s.metrics {
        Some(h) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4",
            )],
            h.render(),
        )
            .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder not installed",
        )
            .into_response(),
    }
}

/// Free and total bytes of the file system holding a local vault (`file://`), for the disk
/// space alert; object stores have no such limit and export nothing.
async fn vault_space(s: &AppState) {
    let Some(dir) = s.vault.store().url().strip_prefix("file://") else {
        return;
    };
    let dir = dir.to_string();
    let stat = tokio::task::spawn_blocking(move || rustix::fs::statvfs(dir.as_str())).await;
    match stat {
        Ok(Ok(st)) => {
            let unit = st.f_frsize.max(1);
            metrics::gauge!("drvault_vault_free_bytes").set((st.f_bavail * unit) as f64);
            metrics::gauge!("drvault_vault_capacity_bytes").set((st.f_blocks * unit) as f64);
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not read the vault file system's free space")
        }
        Err(e) => tracing::warn!(error = %e, "free space check did not run"),
    }
}

#[utoipa::path(
    get,
    path = "/v1/server",
    tag = "system",
    summary = "Server version and block size",
    responses(
        (status = 200, description = "Version and block size", body = crate::wire::ServerInfo),
    )
)]
async fn server_info(_: Viewer, State(s): State<AppState>) -> Json<ServerInfo> {
    Json(ServerInfo {
        version: env!("CARGO_PKG_VERSION").to_string(),
        block_size: s.catalog.block_size(),
    })
}

#[utoipa::path(
    get,
    path = "/v1/servers",
    tag = "system",
    summary = "The servers sharing the vault, the VMs each holds and the lease ages",
    responses(
        (status = 200, description = "Servers as this one sees them", body = crate::wire::ServerList),
    )
)]
async fn servers(_: Viewer, State(s): State<AppState>) -> Json<crate::wire::ServerList> {
    let c = s.catalog.cluster();
    Json(crate::wire::ServerList {
        servers: c.servers(),
        lease_ttl_s: c.ttl().as_secs(),
    })
}
