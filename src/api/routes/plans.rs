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

async fn list_plans(
    _: Viewer,
    State(s): State<AppState>,
) -> ApiResult<Json<Vec<crate::failover::plan::Plan>>> {
    Ok(Json(s.plans.list().await?))
}

async fn create_plan(
    _: Operator,
    State(s): State<AppState>,
    body: Body,
) -> ApiResult<(StatusCode, Json<crate::failover::plan::Plan>)> {
    let plan: crate::failover::plan::Plan = read_json(body).await?;
    Ok((StatusCode::CREATED, Json(s.plans.create(plan).await?)))
}

async fn get_plan(
    _: Viewer,
    State(s): State<AppState>,
    PlanName(p): PlanName,
) -> ApiResult<Json<crate::failover::plan::Plan>> {
    Ok(Json(s.plans.get(&p).await?))
}

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
