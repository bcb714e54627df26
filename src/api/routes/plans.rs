//! Failover plans (operator): create, list, show, start.

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::api::auth::{Operator, Viewer};
use crate::api::error::ApiResult;
use crate::api::extract::{read_json, PlanName};
use crate::api::AppState;
use crate::wire::Started;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/plans", get(list_plans).post(create_plan))
        .route("/v1/plans/{name}", get(get_plan))
        .route("/v1/plans/{name}/failover", post(start_plan))
}

#[utoipa::path(
    get,
    path = "/v1/plans",
    tag = "failover",
    summary = "List recovery plans",
    responses(
        (status = 200, description = "Every plan", body = Vec<crate::wire::Plan>),
    )
)]
async fn list_plans(
    _: Viewer,
    State(s): State<AppState>,
) -> ApiResult<Json<Vec<crate::failover::plan::Plan>>> {
    Ok(Json(s.plans.list().await?))
}

#[utoipa::path(
    post,
    path = "/v1/plans",
    tag = "failover",
    summary = "Create a recovery plan",
    request_body = crate::wire::Plan,
    responses(
        (status = 201, description = "The plan", body = crate::wire::Plan),
        (status = 404, description = "`vm_not_found`: a VM of the plan is not protected", body = crate::wire::ErrorBody),
        (status = 409, description = "`plan_exists`", body = crate::wire::ErrorBody),
    )
)]
async fn create_plan(
    _: Operator,
    State(s): State<AppState>,
    body: Body,
) -> ApiResult<(StatusCode, Json<crate::failover::plan::Plan>)> {
    let plan: crate::failover::plan::Plan = read_json(body).await?;
    Ok((StatusCode::CREATED, Json(s.plans.create(plan).await?)))
}

#[utoipa::path(
    get,
    path = "/v1/plans/{name}",
    tag = "failover",
    summary = "A recovery plan",
    params(crate::api::openapi::params::Named),
    responses(
        (status = 200, description = "The plan", body = crate::wire::Plan),
    )
)]
async fn get_plan(
    _: Viewer,
    State(s): State<AppState>,
    PlanName(p): PlanName,
) -> ApiResult<Json<crate::failover::plan::Plan>> {
    Ok(Json(s.plans.get(&p).await?))
}

#[utoipa::path(
    post,
    path = "/v1/plans/{name}/failover",
    tag = "failover",
    summary = "Run a recovery plan",
    params(crate::api::openapi::params::Named),
    request_body = crate::wire::PlanFailoverRequest,
    responses(
        (status = 202, description = "The plan's job", body = crate::wire::Started),
        (status = 409, description = "A VM of the plan cannot fail over now", body = crate::wire::ErrorBody),
    )
)]
async fn start_plan(
    _: Operator,
    State(s): State<AppState>,
    PlanName(p): PlanName,
    body: Body,
) -> ApiResult<(StatusCode, Json<Started>)> {
    let req: crate::failover::plan::PlanFailoverRequest = read_json(body).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(Started {
            job: s.plans.start(&p, req).await?,
        }),
    ))
}
