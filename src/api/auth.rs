//! Bearer-token authentication and the authorization rules (docs/api.md): only the host that
//! owns a VM reaches its data; an account token opens operator routes only, those its role
//! admits ([`Viewer`], [`Operator`], [`Admin`]); a host token opens agent routes only, for the
//! VMs that host protected; a provider token acts for any host of its cloud (named per request
//! in `X-Drvault-Host`) and no other.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use super::error::ApiError;
use super::AppState;
use crate::error::Error;
use crate::vault::registry::{Principal, Role};
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
    state.registry.authenticate(token).await
}

/// The account behind an operator route's token, admitted if its role is `needed` or above.
async fn account(parts: &Parts, state: &AppState, needed: Role) -> Result<Account, Error> {
    match principal(parts, state).await? {
        Principal::Account {
            name,
            role,
            expires_unix,
        } if role >= needed => Ok(Account {
            name,
            role,
            expires_unix,
        }),
        Principal::Account { name, role, .. } => Err(Error::RoleRequired {
            needed,
            account: name,
            actual: role,
        }),
        _ => Err(Error::forbidden(
            "this route needs an operator account's token; host and provider tokens are for agent routes",
        )),
    }
}

/// The operator account a request came from.
#[derive(Debug, Clone)]
pub struct Account {
    pub name: String,
    pub role: Role,
    /// When the token the request used expires.
    pub expires_unix: Option<u64>,
}

/// Declares an extractor admitting accounts of `$role` and above.
macro_rules! role_extractor {
    ($(#[$doc:meta])* $name:ident, $role:expr) => {
        $(#[$doc])*
        pub struct $name(pub Account);

        impl FromRequestParts<AppState> for $name {
            type Rejection = ApiError;
            async fn from_request_parts(
                parts: &mut Parts,
                state: &AppState,
            ) -> Result<Self, Self::Rejection> {
                Ok($name(account(parts, state, $role).await?))
            }
        }
    };
}

role_extractor!(
    /// Routes that read (every GET): any account.
    Viewer,
    Role::Viewer
);
role_extractor!(
    /// Routes that act on VMs (drills, failover, commit, cleanup, cancel, resync, failback, plans
    /// run and resume, verify, merge): accounts with role operator or admin.
    Operator,
    Role::Operator
);
role_extractor!(
    /// Routes that manage the server (hosts, providers, keys, accounts, gc): admin accounts.
    Admin,
    Role::Admin
);

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
        Principal::Account { .. } => Err(Error::forbidden(
            "an operator account's token cannot be used on agent routes; use a host credential",
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
/// itself still names which kind and role it admits, with [`Viewer`], [`Operator`], [`Admin`]
/// or [`AgentHost`]).
pub enum Caller {
    /// Any operator account (the route's own extractor checks its role).
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
            Principal::Account { .. } => Ok(Caller::Operator),
            who => Ok(Caller::Agent(acting_host(parts, state, who).await?)),
        }
    }
}
