//! Verify, garbage collection and the damage register (operator).

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::api::auth::{Admin, Operator, Viewer};
use crate::api::error::ApiResult;
use crate::api::extract::{read_json, JobId};
use crate::api::AppState;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/verify", post(start_verify))
        .route("/v1/verify/{job}", get(verify_report))
        .route("/v1/damage", get(damage_register))
        .route("/v1/gc", post(start_gc))
        .route("/v1/gc/{job}", get(gc_report))
}

#[utoipa::path(
    post,
    path = "/v1/verify",
    tag = "scrub",
    summary = "Verify the vault",
    request_body = crate::wire::VerifyRequest,
    responses(
        (status = 202, description = "The verify job", body = crate::wire::Started),
        (status = 404, description = "`vm_not_found`", body = crate::wire::ErrorBody),
        (status = 409, description = "`maintenance_running` (recoverable)", body = crate::wire::ErrorBody),
    )
)]
async fn start_verify(
    _: Operator,
    State(s): State<AppState>,
    body: Body,
) -> ApiResult<(StatusCode, Json<crate::scrub::Started>)> {
    let req: crate::scrub::verify::VerifyRequest = read_json(body).await?;
    let job = s.scrub.start_verify(req, None).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(crate::scrub::Started { job: job.id }),
    ))
}

#[utoipa::path(
    get,
    path = "/v1/verify/{job}",
    tag = "scrub",
    summary = "A verify's report",
    params(crate::api::openapi::params::ReportJob),
    responses(
        (status = 200, description = "The report", body = crate::wire::VerifyReport),
        (status = 409, description = "`report_not_ready` (recoverable)", body = crate::wire::ErrorBody),
    )
)]
async fn verify_report(
    _: Viewer,
    State(s): State<AppState>,
    JobId(id): JobId,
) -> ApiResult<Json<crate::scrub::verify::VerifyReport>> {
    Ok(Json(
        s.scrub.report(crate::jobs::JobKind::Verify, &id).await?,
    ))
}

#[utoipa::path(
    get,
    path = "/v1/damage",
    tag = "scrub",
    summary = "The damage register",
    responses(
        (status = 200, description = "Damaged objects", body = crate::wire::DamageRecord),
    )
)]
async fn damage_register(
    _: Viewer,
    State(s): State<AppState>,
) -> Json<crate::replica::damage::DamageRecord> {
    Json((*s.scrub.damage().await).clone())
}

#[utoipa::path(
    post,
    path = "/v1/gc",
    tag = "scrub",
    summary = "Collect garbage",
    request_body = crate::wire::GcRequest,
    responses(
        (status = 202, description = "The collection job", body = crate::wire::Started),
        (status = 409, description = "`maintenance_running` (recoverable)", body = crate::wire::ErrorBody),
    )
)]
async fn start_gc(
    _: Admin,
    State(s): State<AppState>,
    body: Body,
) -> ApiResult<(StatusCode, Json<crate::scrub::Started>)> {
    let req: crate::scrub::gc::GcRequest = read_json(body).await?;
    let job = s.scrub.start_gc(req).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(crate::scrub::Started { job: job.id }),
    ))
}

#[utoipa::path(
    get,
    path = "/v1/gc/{job}",
    tag = "scrub",
    summary = "A collection's report",
    params(crate::api::openapi::params::ReportJob),
    responses(
        (status = 200, description = "The report", body = crate::wire::GcReport),
        (status = 409, description = "`report_not_ready` (recoverable)", body = crate::wire::ErrorBody),
    )
)]
async fn gc_report(
    _: Viewer,
    State(s): State<AppState>,
    JobId(id): JobId,
) -> ApiResult<Json<crate::scrub::gc::GcReport>> {
    Ok(Json(
        s.scrub
            .report(crate::jobs::JobKind::GarbageCollection, &id)
            .await?,
    ))
}
