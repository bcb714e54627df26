//! Hosts and providers (operator): register, list, remove; registering returns the credentials
//! an agent connects with.

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::{name, read_json, Path};
use crate::api::auth::Operator;
use crate::api::error::ApiResult;
use crate::api::AppState;
use crate::error::Error;
use crate::vault::layout::{self, Family};
use crate::vault::registry::{
    HostEntry, ProviderEntry, Registry, HOST_TOKEN_PREFIX, PROVIDER_TOKEN_PREFIX,
};

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

/// Applies `f` to the registry record (compare-and-swap) and refreshes the cache.
pub async fn update_registry(
    s: &AppState,
    f: impl Fn(&mut Registry) -> Result<(), Error>,
) -> Result<Registry, Error> {
    let prefix = layout::record(Family::Registry, "main");
    let v = s
        .vault
        .records
        .update(&prefix, |cur: Option<&Registry>| {
            let mut r = cur.cloned().unwrap_or_default();
            f(&mut r)?;
            Ok(Some(r))
        })
        .await?
        .ok_or_else(|| Error::internal("registry update returned nothing"))?;
    *s.registry.write().await = v.value.clone();
    Ok(v.value)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddHost {
    name: String,
    #[serde(default)]
    cloud: Option<String>,
}

/// What an agent needs to connect: written to a credentials file by the CLI.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Credentials {
    /// "host" or "provider".
    pub kind: String,
    pub name: String,
    pub cloud: Option<String>,
    pub server: String,
    pub token: String,
    pub ca_cert_pem: String,
}

#[derive(Serialize)]
struct HostView {
    name: String,
    cloud: Option<String>,
    created: String,
    vms: Vec<String>,
}

async fn list_hosts(_: Operator, State(s): State<AppState>) -> Json<Vec<HostView>> {
    let reg = s.registry.read().await.clone();
    let vms = s.protection.list().await;
    Json(
        reg.hosts
            .values()
            .map(|h| HostView {
                name: h.name.clone(),
                cloud: h.cloud.clone(),
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
    name("host", &req.name)?;
    if let Some(c) = &req.cloud {
        name("cloud", c)?;
    }
    let token = crate::util::random_token(HOST_TOKEN_PREFIX);
    let digest = s.vault.keys().token_digest(&token);
    let now = crate::util::unix_now();
    update_registry(&s, |r| {
        if r.hosts.contains_key(&req.name) {
            return Err(Error::conflict(
                "host_exists",
                format!("host {} is already registered", req.name),
            ));
        }
        r.hosts.insert(
            req.name.clone(),
            HostEntry {
                name: req.name.clone(),
                token_digest: digest.clone(),
                cloud: req.cloud.clone(),
                created_unix: now,
            },
        );
        Ok(())
    })
    .await?;
    tracing::info!(host = %req.name, "host registered");
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
    Path(host): Path<String>,
) -> ApiResult<StatusCode> {
    name("host", &host)?;
    update_registry(&s, |r| {
        r.hosts.remove(&host).map(|_| ()).ok_or_else(|| {
            Error::not_found("host_not_found", format!("host {host} is not registered"))
        })
    })
    .await?;
    tracing::info!(%host, "host removed; its token is revoked");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddProvider {
    name: String,
    cloud: String,
}

#[derive(Serialize)]
struct ProviderView {
    name: String,
    cloud: String,
    created: String,
}

async fn list_providers(_: Operator, State(s): State<AppState>) -> Json<Vec<ProviderView>> {
    let reg = s.registry.read().await;
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
    name("provider", &req.name)?;
    name("cloud", &req.cloud)?;
    let token = crate::util::random_token(PROVIDER_TOKEN_PREFIX);
    let digest = s.vault.keys().token_digest(&token);
    let now = crate::util::unix_now();
    update_registry(&s, |r| {
        if r.providers.contains_key(&req.name) {
            return Err(Error::conflict(
                "provider_exists",
                format!("provider {} is already registered", req.name),
            ));
        }
        r.providers.insert(
            req.name.clone(),
            ProviderEntry {
                name: req.name.clone(),
                cloud: req.cloud.clone(),
                token_digest: digest.clone(),
                created_unix: now,
            },
        );
        Ok(())
    })
    .await?;
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
    Path(p): Path<String>,
) -> ApiResult<StatusCode> {
    name("provider", &p)?;
    update_registry(&s, |r| {
        r.providers.remove(&p).map(|_| ()).ok_or_else(|| {
            Error::not_found(
                "provider_not_found",
                format!("provider {p} is not registered"),
            )
        })
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
