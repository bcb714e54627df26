//! Bearer-token authentication and the authorization rules (docs/api.md): only the host that
//! owns a VM reaches its data; the operator token opens operator routes only; a host token opens
//! agent routes only, for the VMs that host protected; a provider token acts for any host of its
//! cloud (named per request in `X-Drvault-Host`) and no other.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use super::error::ApiError;
use super::AppState;
use crate::error::Error;
use crate::vault::registry::Principal;
pub use crate::wire::ACTING_HOST_HEADER;

fn bearer(parts: &Parts) -> Result<&str, Error> {
    let unauthorized = |m: &str| Error::Unauthorized {
        message: m.to_string(),
    };
    let h = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or_else(|| unauthorized("missing bearer token (Authorization: Bearer …)"))?;
    let s = h
        .to_str()
        .map_err(|_| unauthorized("malformed Authorization header"))?;
    let t = s
        .strip_prefix("Bearer ")
        .ok_or_else(|| unauthorized("Authorization must be a Bearer token"))?;
    if t.is_empty() || t.len() > 256 {
        return Err(unauthorized("malformed bearer token"));
    }
    Ok(t)
}

async fn principal(parts: &Parts, state: &AppState) -> Result<Principal, Error> {
    let token = bearer(parts)?;
    state
        .registry
        .resolve_token(token)
        .await
        .ok_or(Error::Unauthorized {
            message: "unknown or revoked token".into(),
        })
}

/// Extractor for operator routes.
pub struct Operator;

impl FromRequestParts<AppState> for Operator {
    type Rejection = ApiError;
    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        match principal(parts, state).await? {
            Principal::Operator => Ok(Operator),
            _ => Err(Error::forbidden("this route needs the operator token; host and provider tokens are for agent routes").into()),
        }
    }
}

/// Extractor for agent routes: the host on whose behalf the request acts.
pub struct AgentHost(pub String);

impl FromRequestParts<AppState> for AgentHost {
    type Rejection = ApiError;
    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let who = principal(parts, state).await?;
        Ok(AgentHost(acting_host(parts, state, who).await?))
    }
}

/// The host an agent request acts for, given who holds its token.
async fn acting_host(parts: &Parts, state: &AppState, who: Principal) -> Result<String, Error> {
    let acting = parts
        .headers
        .get(ACTING_HOST_HEADER)
        .map(|v| v.to_str().unwrap_or("\u{0}").to_string());
    match who {
        Principal::Operator => Err(Error::forbidden(
            "the operator token cannot be used on agent routes; use a host credential",
        )),
        Principal::Host { name } => match acting {
            Some(a) if a != name => Err(Error::forbidden(format!(
                "host {name} cannot act for host {a}"
            ))),
            _ => Ok(name),
        },
        Principal::Provider { name, cloud } => {
            let host = acting.ok_or_else(|| {
                Error::invalid(
                    "acting_host_required",
                    format!(
                        "provider {name} must name the host it acts for in {ACTING_HOST_HEADER}"
                    ),
                )
            })?;
            match state.registry.host(&host).await {
                Some(h) if h.cloud.as_deref() == Some(cloud.as_str()) => Ok(host),
                _ => Err(Error::forbidden(format!(
                    "provider {name} acts for cloud {cloud}; host {host} is not in it"
                ))),
            }
        }
    }
}

/// Either kind of caller, for extractors that serve operator and agent routes alike (the route
/// itself still names which kind it admits, with [`Operator`] or [`AgentHost`]).
pub enum Caller {
    Operator,
    /// An agent, acting for this host.
    Agent(String),
}

impl Caller {
    /// The host whose VMs alone the caller may reach; `None` for the operator (every VM).
    pub fn host(&self) -> Option<&str> {
        match self {
            Caller::Operator => None,
            Caller::Agent(h) => Some(h),
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;
    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        match principal(parts, state).await? {
            Principal::Operator => Ok(Caller::Operator),
            who => Ok(Caller::Agent(acting_host(parts, state, who).await?)),
        }
    }
}
