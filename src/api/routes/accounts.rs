//! Operator accounts: who am I (any account), list, add, remove and rotate a token (admin).

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::{Json, Router};

use crate::api::auth::{Admin, Viewer};
use crate::api::error::ApiResult;
use crate::api::extract::{read_json, AccountName};
use crate::api::AppState;
use crate::error::Error;
use crate::vault::registry::Role;
use crate::wire::{AccountToken, AccountView, AddAccount, RotateToken, Whoami};

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/whoami", get(whoami))
        .route("/v1/accounts", get(list_accounts).post(add_account))
        .route("/v1/accounts/{name}", delete(remove_account))
        .route("/v1/accounts/{name}/token", post(rotate_token))
}

#[utoipa::path(
    get,
    path = "/v1/whoami",
    tag = "accounts",
    summary = "The account and role of the token in use",
    responses(
        (status = 200, description = "The caller's account", body = crate::wire::Whoami),
    )
)]
async fn whoami(Viewer(a): Viewer) -> Json<Whoami> {
    Json(Whoami {
        account: a.name,
        role: a.role,
        expires_at: a.expires_unix.map(crate::util::rfc3339),
    })
}

#[utoipa::path(
    get,
    path = "/v1/accounts",
    tag = "accounts",
    summary = "List operator accounts (never tokens)",
    responses(
        (status = 200, description = "Every account, its role and live tokens", body = Vec<crate::wire::AccountView>),
    )
)]
async fn list_accounts(_: Viewer, State(s): State<AppState>) -> Json<Vec<AccountView>> {
    let now = crate::util::unix_now();
    let reg = s.registry.snapshot().await;
    Json(
        reg.accounts
            .values()
            .map(|a| {
                let live: Vec<_> = a.live_tokens(now).collect();
                // One token that never expires keeps the account open indefinitely.
                let expires = if live.iter().any(|t| t.expires_unix.is_none()) {
                    None
                } else {
                    live.iter().filter_map(|t| t.expires_unix).max()
                };
                AccountView {
                    name: a.name.clone(),
                    role: a.role,
                    created: crate::util::rfc3339(a.created_unix),
                    tokens: u32::try_from(live.len()).unwrap_or(u32::MAX),
                    expires_at: expires.map(crate::util::rfc3339),
                }
            })
            .collect(),
    )
}

#[utoipa::path(
    post,
    path = "/v1/accounts",
    tag = "accounts",
    summary = "Create an account with a role; its token is shown once",
    request_body = crate::wire::AddAccount,
    responses(
        (status = 201, description = "The new account's token", body = crate::wire::AccountToken),
        (status = 400, description = "`invalid_role`, `invalid_expiry`, `invalid_name`", body = crate::wire::ErrorBody),
        (status = 409, description = "`account_exists`", body = crate::wire::ErrorBody),
    )
)]
async fn add_account(
    _: Admin,
    State(s): State<AppState>,
    body: Body,
) -> ApiResult<(StatusCode, Json<AccountToken>)> {
    let req: AddAccount = read_json(body).await?;
    let role = Role::parse(&req.role).ok_or_else(|| {
        Error::invalid(
            "invalid_role",
            format!(
                "role {:?} does not exist; the roles are viewer (read), operator (viewer + drills, failover, resync, failback, plans, verify, merge) and admin (operator + hosts, providers, keys, accounts, gc)",
                req.role
            ),
        )
    })?;
    let expires = parse_expiry(req.expires_at.as_deref())?;
    let token = s.registry.add_account(&req.name, role, expires).await?;
    tracing::info!(account = %req.name, %role, "account created");
    Ok((
        StatusCode::CREATED,
        Json(AccountToken {
            account: req.name,
            role,
            token,
            expires_at: expires.map(crate::util::rfc3339),
        }),
    ))
}

#[utoipa::path(
    delete,
    path = "/v1/accounts/{name}",
    tag = "accounts",
    summary = "Remove an account; its tokens stop working",
    params(crate::api::openapi::params::Named),
    responses(
        (status = 204, description = "Removed"),
        (status = 409, description = "`last_admin`", body = crate::wire::ErrorBody),
    )
)]
async fn remove_account(
    _: Admin,
    State(s): State<AppState>,
    AccountName(name): AccountName,
) -> ApiResult<StatusCode> {
    s.registry.remove_account(&name).await?;
    tracing::info!(account = %name, "account removed; its tokens are revoked");
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    post,
    path = "/v1/accounts/{name}/token",
    tag = "accounts",
    summary = "Give an account a new token and revoke its others",
    params(crate::api::openapi::params::Named),
    request_body = crate::wire::RotateToken,
    responses(
        (status = 200, description = "The new token (shown once)", body = crate::wire::AccountToken),
    )
)]
async fn rotate_token(
    _: Admin,
    State(s): State<AppState>,
    AccountName(name): AccountName,
    body: Body,
) -> ApiResult<Json<AccountToken>> {
    let req: RotateToken = read_json(body).await?;
    let expires = parse_expiry(req.expires_at.as_deref())?;
    let (token, role) = s.registry.rotate_account(&name, expires).await?;
    tracing::info!(account = %name, "account token rotated; its other tokens are revoked");
    Ok(Json(AccountToken {
        account: name,
        role,
        token,
        expires_at: expires.map(crate::util::rfc3339),
    }))
}

/// An RFC 3339 time (any offset) as Unix seconds; refused with `invalid_expiry`.
fn parse_expiry(s: Option<&str>) -> Result<Option<u64>, Error> {
    let Some(s) = s else { return Ok(None) };
    let bad = || {
        Error::invalid(
            "invalid_expiry",
            format!(
                "expires_at {s:?}: use an RFC 3339 time in the future, e.g. 2030-01-31T18:00:00Z"
            ),
        )
    };
    let t = chrono::DateTime::parse_from_rfc3339(s).map_err(|_| bad())?;
    u64::try_from(t.timestamp()).map(Some).map_err(|_| bad())
}
