//! A VM's failover (operator): start, show, clean up, commit, cancel.

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};

use super::{name, read_json, Path};
use crate::api::auth::Operator;
use crate::api::error::ApiResult;
use crate::api::AppState;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/vms/{vm}/failover",
            get(show_failover).post(start_failover),
        )
        .route("/v1/vms/{vm}/failover/cleanup", post(cleanup_failover))
        .route("/v1/vms/{vm}/failover/commit", post(commit_failover))
        .route("/v1/vms/{vm}/failover/cancel", post(cancel_failover))
}

async fn start_failover(
    _: Operator,
    State(s): State<AppState>,
    Path(vm): Path<String>,
    body: Body,
) -> ApiResult<(StatusCode, Json<crate::failover::service::FailoverRecord>)> {
    name("VM", &vm)?;
    let req: crate::failover::service::FailoverRequest = read_json(body).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(s.failovers.start(&vm, req).await?),
    ))
}

async fn show_failover(
    _: Operator,
    State(s): State<AppState>,
    Path(vm): Path<String>,
) -> ApiResult<Json<crate::failover::service::FailoverView>> {
    name("VM", &vm)?;
    s.protection.vm_for(None, &vm).await?;
    Ok(Json(s.failovers.show(&vm).await?))
}

async fn cleanup_failover(
    _: Operator,
    State(s): State<AppState>,
    Path(vm): Path<String>,
) -> ApiResult<Json<crate::failover::service::FailoverRecord>> {
    name("VM", &vm)?;
    s.protection.vm_for(None, &vm).await?;
    Ok(Json(s.failovers.cleanup(&vm).await?))
}

async fn commit_failover(
    _: Operator,
    State(s): State<AppState>,
    Path(vm): Path<String>,
) -> ApiResult<Json<crate::failover::service::FailoverRecord>> {
    name("VM", &vm)?;
    s.protection.vm_for(None, &vm).await?;
    Ok(Json(s.failovers.commit(&vm).await?))
}

async fn cancel_failover(
    _: Operator,
    State(s): State<AppState>,
    Path(vm): Path<String>,
) -> ApiResult<Json<crate::failover::service::FailoverRecord>> {
    name("VM", &vm)?;
    s.protection.vm_for(None, &vm).await?;
    Ok(Json(s.failovers.cancel(&vm).await?))
}
