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

#[utoipa::path(
    post,
    path = "/v1/vms/{vm}/failover",
    tag = "failover",
    summary = "Fail a VM over (test, planned or unplanned)",
    params(crate::api::openapi::params::Vm),
    request_body = crate::wire::FailoverRequest,
    responses(
        (status = 202, description = "The failover record; the work is a job", body = crate::wire::FailoverRecord),
        (status = 409, description = "`vm_not_protected`, `failed_over`, `failover_running`, `drill_not_cleaned_up`, `failover_not_committed`, `point_damaged`, `network_unmapped`, `vm_disabled`", body = crate::wire::ErrorBody),
    )
)]
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

#[utoipa::path(
    get,
    path = "/v1/vms/{vm}/failover",
    tag = "failover",
    summary = "A VM's latest failover",
    params(crate::api::openapi::params::Vm),
    responses(
        (status = 200, description = "The record, definition and qemu command", body = crate::wire::FailoverView),
    )
)]
async fn show_failover(
    _: Viewer,
    State(s): State<AppState>,
    CallerVm { name: vm, .. }: CallerVm,
) -> ApiResult<Json<crate::failover::service::FailoverView>> {
    Ok(Json(s.failovers.show(&vm).await?))
}

#[utoipa::path(
    post,
    path = "/v1/vms/{vm}/failover/cleanup",
    tag = "failover",
    summary = "End a drill",
    params(crate::api::openapi::params::Vm),
    responses(
        (status = 200, description = "The failover record", body = crate::wire::FailoverRecord),
        (status = 409, description = "The failover is not in a state that allows it", body = crate::wire::ErrorBody),
    )
)]
async fn cleanup_failover(
    _: Operator,
    State(s): State<AppState>,
    CallerVm { name: vm, .. }: CallerVm,
) -> ApiResult<Json<crate::failover::service::FailoverRecord>> {
    Ok(Json(s.failovers.cleanup(&vm).await?))
}

#[utoipa::path(
    post,
    path = "/v1/vms/{vm}/failover/commit",
    tag = "failover",
    summary = "Commit a planned or unplanned failover",
    params(crate::api::openapi::params::Vm),
    responses(
        (status = 200, description = "The failover record", body = crate::wire::FailoverRecord),
        (status = 409, description = "The failover is not in a state that allows it", body = crate::wire::ErrorBody),
    )
)]
async fn commit_failover(
    _: Operator,
    State(s): State<AppState>,
    CallerVm { name: vm, .. }: CallerVm,
) -> ApiResult<Json<crate::failover::service::FailoverRecord>> {
    Ok(Json(s.failovers.commit(&vm).await?))
}

#[utoipa::path(
    post,
    path = "/v1/vms/{vm}/failover/cancel",
    tag = "failover",
    summary = "Stop a planned failover waiting for final logs",
    params(crate::api::openapi::params::Vm),
    responses(
        (status = 200, description = "The failover record", body = crate::wire::FailoverRecord),
        (status = 409, description = "The failover is not in a state that allows it", body = crate::wire::ErrorBody),
    )
)]
async fn cancel_failover(
    _: Operator,
    State(s): State<AppState>,
    CallerVm { name: vm, .. }: CallerVm,
) -> ApiResult<Json<crate::failover::service::FailoverRecord>> {
    Ok(Json(s.failovers.cancel(&vm).await?))
}
