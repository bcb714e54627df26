//! Hosts and providers: list (viewer); register, remove, rotate a token (admin). Registering and
//! rotating return the credentials an agent connects with.

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};

use crate::api::auth::{Admin, Viewer};
use crate::api::error::ApiResult;
use crate::api::extract::{read_json, HostName, ProviderName};
use crate::api::AppState;
use crate::wire::{AddHost, AddProvider, Credentials, HostThrottle, HostView, ProviderView};

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/hosts", get(list_hosts).post(add_host))
        .route("/v1/hosts/{name}", axum::routing::delete(remove_host))
        .route(
            "/v1/hosts/{name}/token",
            axum::routing::post(rotate_host_token),
        )
        .route(
            "/v1/hosts/{name}/throttle",
            axum::routing::put(set_throttle),
        )
        .route("/v1/providers", get(list_providers).post(add_provider))
        .route(
            "/v1/providers/{name}",
            axum::routing::delete(remove_provider),
        )
        .route(
            "/v1/providers/{name}/token",
            axum::routing::post(rotate_provider_token),
        )
}

#[utoipa::path(
    get,
    path = "/v1/hosts",
    tag = "hosts",
    summary = "List hosts with their last contact",
    responses(
        (status = 200, description = "Every registered host", body = Vec<crate::wire::HostView>),
    )
)]
async fn list_hosts(_: Viewer, State(s): State<AppState>) -> Json<Vec<HostView>> {
    let reg = s.registry.snapshot().await;
    let vms = s.overview.list().await;
    let contacts = s.contacts.all();
    let now = crate::util::unix_now();
    Json(
        reg.hosts
            .values()
            .map(|h| {
                let c = contacts.get(&h.name);
                let reports = c.iter().flat_map(|c| c.vms.values());
                let last_error = reports
                    .clone()
                    .filter_map(|r| r.last_error.as_ref().map(|f| (r, f)))
                    .max_by_key(|(_, f)| f.at_unix)
                    .map(|(r, f)| format!("{}: {}: {}", r.vm, f.code, f.message));
                HostView {
                    name: h.name.clone(),
                    cloud: h.cloud.clone(),
                    cluster: h.cluster.clone(),
                    created: crate::util::rfc3339(h.created_unix),
                    vms: vms
                        .iter()
                        .filter(|v| v.owner == h.name)
                        .map(|v| v.name.clone())
                        .collect(),
                    throttle_mb_s: h.throttle_mb_s,
                    last_contact: c.map(|c| crate::util::rfc3339(c.last_contact_unix)),
                    last_contact_age_s: c.map(|c| now.saturating_sub(c.last_contact_unix)),
                    agent_version: c.map(|c| c.agent_version.clone()),
                    backlog_bytes: reports
                        .flat_map(|r| r.disks.iter())
                        .map(|d| d.backlog_bytes)
                        .sum(),
                    last_error,
                }
            })
            .collect(),
    )
}

#[utoipa::path(
    put,
    path = "/v1/hosts/{name}/throttle",
    tag = "hosts",
    summary = "Set or clear a host agent's bandwidth cap",
    params(crate::api::openapi::params::Named),
    request_body = crate::wire::HostThrottle,
    responses(
        (status = 200, description = "The cap now set", body = crate::wire::HostThrottle),
    )
)]
async fn set_throttle(
    _: Admin,
    State(s): State<AppState>,
    HostName(host): HostName,
    body: Body,
) -> ApiResult<Json<HostThrottle>> {
    let req: HostThrottle = read_json(body).await?;
    s.registry.set_throttle(&host, req.mb_s).await?;
    tracing::info!(%host, mb_s = ?req.mb_s, "host bandwidth cap set");
    Ok(Json(req))
}

#[utoipa::path(
    post,
    path = "/v1/hosts",
    tag = "hosts",
    summary = "Register a host",
    request_body = crate::wire::AddHost,
    responses(
        (status = 201, description = "The host's credentials (shown once)", body = crate::wire::Credentials),
        (status = 409, description = "`host_exists`", body = crate::wire::ErrorBody),
    )
)]
async fn add_host(
    _: Admin,
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
            servers: other_servers(&s),
        }),
    ))
}

#[utoipa::path(
    delete,
    path = "/v1/hosts/{name}",
    tag = "hosts",
    summary = "Remove a host and revoke its token",
    params(crate::api::openapi::params::Named),
    responses(
        (status = 204, description = "Removed"),
        (status = 409, description = "`host_in_use` and other conflicts", body = crate::wire::ErrorBody),
    )
)]
async fn remove_host(
    _: Admin,
    State(s): State<AppState>,
    HostName(host): HostName,
) -> ApiResult<StatusCode> {
    s.registry.remove_host(&host).await?;
    s.contacts.forget(&host);
    tracing::info!(%host, "host removed; its token is revoked");
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    get,
    path = "/v1/providers",
    tag = "hosts",
    summary = "List providers",
    responses(
        (status = 200, description = "Every registered provider", body = Vec<crate::wire::ProviderView>),
    )
)]
async fn list_providers(_: Viewer, State(s): State<AppState>) -> Json<Vec<ProviderView>> {
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

#[utoipa::path(
    post,
    path = "/v1/providers",
    tag = "hosts",
    summary = "Register a provider for a cloud",
    request_body = crate::wire::AddProvider,
    responses(
        (status = 201, description = "The provider's credentials (shown once)", body = crate::wire::Credentials),
        (status = 409, description = "`provider_exists`", body = crate::wire::ErrorBody),
    )
)]
async fn add_provider(
    _: Admin,
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
            servers: other_servers(&s),
        }),
    ))
}

#[utoipa::path(
    delete,
    path = "/v1/providers/{name}",
    tag = "hosts",
    summary = "Remove a provider and revoke its token",
    params(crate::api::openapi::params::Named),
    responses(
        (status = 204, description = "Removed"),
    )
)]
async fn remove_provider(
    _: Admin,
    State(s): State<AppState>,
    ProviderName(p): ProviderName,
) -> ApiResult<StatusCode> {
    s.registry.remove_provider(&p).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A new token for a host; the old one stops working at once, its VMs stay protected.
#[utoipa::path(
    post,
    path = "/v1/hosts/{name}/token",
    tag = "hosts",
    summary = "Give a host a new token and revoke the old one",
    params(crate::api::openapi::params::Named),
    responses(
        (status = 200, description = "The host's new credentials (shown once)", body = crate::wire::Credentials),
    )
)]
async fn rotate_host_token(
    _: Admin,
    State(s): State<AppState>,
    HostName(host): HostName,
) -> ApiResult<Json<Credentials>> {
    let token = s.registry.rotate_host(&host).await?;
    let cloud = s.registry.host(&host).await.and_then(|h| h.cloud);
    tracing::info!(%host, "host token rotated; the old one is revoked");
    Ok(Json(Credentials {
        kind: "host".into(),
        name: host,
        cloud,
        server: s.public_url.clone(),
        token,
        ca_cert_pem: s.ca_pem.clone(),
        servers: other_servers(&s),
    }))
}

/// A new token for a provider; the old one stops working at once.
#[utoipa::path(
    post,
    path = "/v1/providers/{name}/token",
    tag = "hosts",
    summary = "Give a provider a new token and revoke the old one",
    params(crate::api::openapi::params::Named),
    responses(
        (status = 200, description = "The provider's new credentials (shown once)", body = crate::wire::Credentials),
    )
)]
async fn rotate_provider_token(
    _: Admin,
    State(s): State<AppState>,
    ProviderName(p): ProviderName,
) -> ApiResult<Json<Credentials>> {
    let token = s.registry.rotate_provider(&p).await?;
    let cloud = s
        .registry
        .snapshot()
        .await
        .providers
        .get(&p)
        .map(|e| e.cloud.clone());
    tracing::info!(provider = %p, "provider token rotated; the old one is revoked");
    Ok(Json(Credentials {
        kind: "provider".into(),
        name: p,
        cloud,
        server: s.public_url.clone(),
        token,
        ca_cert_pem: s.ca_pem.clone(),
        servers: other_servers(&s),
    }))
}

/// The URLs a credentials file lists after `server`: every live server's advertised URL but
/// the public one (agents try them in order when it does not answer).
fn other_servers(s: &AppState) -> Vec<String> {
    s.catalog
        .cluster()
        .live_urls()
        .into_iter()
        .filter(|u| *u != s.public_url)
        .collect()
}
