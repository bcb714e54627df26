//! A VM's failover (operator): start, show, clean up, commit, cancel.

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::api::auth::{Operator, Viewer};
use crate::api::error::ApiResult;
use crate::api::extract::{read_json, CallerVm, VmName};
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
    VmName(vm): VmName,
    body: Body,
) -> ApiResult<(StatusCode, Json<crate::failover::service::FailoverRecord>)> {
    let req: crate::failover::service::FailoverRequest = read_json(body).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(s.failovers.start(&vm, req).await?),
    ))
}

async fn show_failover(
    _: Viewer,
    State(s): State<AppState>,
    CallerVm { name: vm, .. }: CallerVm,
) -> ApiResult<Json<crate::failover::service::FailoverView>> {
    Ok(Json(s.failovers.show(&vm).await?))
}

async fn cleanup_failover(
    _: Operator,
    State(s): State<AppState>,
    CallerVm { name: vm, .. }: CallerVm,
) -> ApiResult<Json<crate::failover::service::FailoverRecord>> {
    Ok(Json(s.failovers.cleanup(&vm).await?))
}

async fn commit_failover(
    _: Operator,
    State(s): State<AppState>,
    CallerVm { name: vm, .. }: CallerVm,
) -> ApiResult<Json<crate::failover::service::FailoverRecord>> {
    Ok(Json(s.failovers.commit(&vm).await?))
}

async fn cancel_failover(
    _: Operator,
    State(s): State<AppState>,
    CallerVm { name: vm, .. }: CallerVm,
) -> ApiResult<Json<crate::failover::service::FailoverRecord>> {
    Ok(Json(s.failovers.cancel(&vm).await?))
}
