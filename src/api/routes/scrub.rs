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

async fn verify_report(
    _: Viewer,
    State(s): State<AppState>,
    JobId(id): JobId,
) -> ApiResult<Json<crate::scrub::verify::VerifyReport>> {
    Ok(Json(
        s.scrub.report(crate::jobs::JobKind::Verify, &id).await?,
    ))
}

async fn damage_register(
    _: Viewer,
    State(s): State<AppState>,
) -> Json<crate::replica::damage::DamageRecord> {
    Json((*s.scrub.damage().await).clone())
}

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
