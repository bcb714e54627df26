//! Hosts and providers (operator): register, list, remove; registering returns the credentials
//! an agent connects with.

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};

use crate::api::auth::Operator;
use crate::api::error::ApiResult;
use crate::api::extract::{read_json, HostName, ProviderName};
use crate::api::AppState;
use crate::wire::{AddHost, AddProvider, Credentials, HostView, ProviderView};

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/hosts", get(list_hosts).post(add_host))
        .route("/v1/hosts/{name}", axum::routing::delete(remove_host))
        .route("/v1/providers", get(list_providers).post(add_provider))
        .route(
            "/v1/providers/{name}",
            axum::routing::delete(remove_provider),
        )
}

async fn list_hosts(_: Operator, State(s): State<AppState>) -> Json<Vec<HostView>> {
    let reg = s.registry.snapshot().await;
    let vms = s.overview.list().await;
    Json(
        reg.hosts
            .values()
            .map(|h| HostView {
                name: h.name.clone(),
                cloud: h.cloud.clone(),
                cluster: h.cluster.clone(),
                created: crate::util::rfc3339(h.created_unix),
                vms: vms
                    .iter()
                    .filter(|v| v.owner == h.name)
                    .map(|v| v.name.clone())
                    .collect(),
            })
            .collect(),
    )
}

async fn add_host(
    _: Operator,
    State(s): State<AppState>,
    body: Body,
) -> ApiResult<(StatusCode, Json<Credentials>)> {
    let req: AddHost = read_json(body).await?;
    let token = s
        .registry
        .add_host_in(&req.name, req.cloud.as_deref(), req.cluster.as_deref())
        .await?;
    tracing::info!(host = %req.name, cluster = ?req.cluster, "host registered");
    Ok((
        StatusCode::CREATED,
        Json(Credentials {
            kind: "host".into(),
            name: req.name,
            cloud: req.cloud,
            server: s.public_url.clone(),
            token,
            ca_cert_pem: s.ca_pem.clone(),
        }),
    ))
}

async fn remove_host(
    _: Operator,
    State(s): State<AppState>,
    HostName(host): HostName,
) -> ApiResult<StatusCode> {
    s.registry.remove_host(&host).await?;
    tracing::info!(%host, "host removed; its token is revoked");
    Ok(StatusCode::NO_CONTENT)
}

async fn list_providers(_: Operator, State(s): State<AppState>) -> Json<Vec<ProviderView>> {
    let reg = s.registry.snapshot().await;
    Json(
        reg.providers
            .values()
            .map(|p| ProviderView {
                name: p.name.clone(),
                cloud: p.cloud.clone(),
                created: crate::util::rfc3339(p.created_unix),
            })
            .collect(),
    )
}

async fn add_provider(
    _: Operator,
    State(s): State<AppState>,
    body: Body,
) -> ApiResult<(StatusCode, Json<Credentials>)> {
    let req: AddProvider = read_json(body).await?;
    let token = s.registry.add_provider(&req.name, &req.cloud).await?;
    Ok((
        StatusCode::CREATED,
        Json(Credentials {
            kind: "provider".into(),
            name: req.name,
            cloud: Some(req.cloud),
            server: s.public_url.clone(),
            token,
            ca_cert_pem: s.ca_pem.clone(),
        }),
    ))
}

async fn remove_provider(
    _: Operator,
    State(s): State<AppState>,
    ProviderName(p): ProviderName,
) -> ApiResult<StatusCode> {
    s.registry.remove_provider(&p).await?;
    Ok(StatusCode::NO_CONTENT)
}
