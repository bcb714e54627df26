//! Jobs (operator): list, show, resume.

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::api::auth::{Operator, Viewer};
use crate::api::error::ApiResult;
use crate::api::extract::{JobId, Query};
use crate::api::AppState;
use crate::error::Error;
use crate::wire::JobsQuery;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/jobs", get(list_jobs))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/jobs/{id}/resume", post(resume_job))
}

#[utoipa::path(
    get,
    path = "/v1/jobs",
    tag = "jobs",
    summary = "List jobs",
    params(crate::wire::JobsQuery),
    responses(
        (status = 200, description = "Jobs, optionally of one VM", body = Vec<crate::wire::Job>),
    )
)]
async fn list_jobs(
    _: Viewer,
    State(s): State<AppState>,
    Query(q): Query<JobsQuery>,
) -> Json<Vec<crate::jobs::Job>> {
    let mut jobs = s.jobs.list().await;
    if let Some(vm) = q.vm {
        jobs.retain(|j| j.vm.as_deref() == Some(vm.as_str()));
    }
    Json(jobs)
}

#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    summary = "A job with its steps",
    params(crate::api::openapi::params::JobId),
    responses(
        (status = 200, description = "The job", body = crate::wire::Job),
    )
)]
async fn get_job(
    _: Viewer,
    State(s): State<AppState>,
    JobId(id): JobId,
) -> ApiResult<Json<crate::jobs::Job>> {
    s.jobs
        .get(&id)
        .await
        .map(Json)
        .ok_or_else(|| Error::not_found("job_not_found", format!("job {id} not found")).into())
}

#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/resume",
    tag = "jobs",
    summary = "Continue a job waiting for a manual action",
    params(crate::api::openapi::params::JobId),
    responses(
        (status = 200, description = "The job", body = crate::wire::Job),
        (status = 409, description = "`job_not_waiting`", body = crate::wire::ErrorBody),
    )
)]
async fn resume_job(
    _: Operator,
    State(s): State<AppState>,
    JobId(id): JobId,
) -> ApiResult<Json<crate::jobs::Job>> {
    Ok(Json(s.jobs.resume(&id).await?))
}
