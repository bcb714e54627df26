//! Recovery points and merging logs into the replica (operator).

use axum::body::Body;
use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::api::auth::{Operator, Viewer};
use crate::api::error::ApiResult;
use crate::api::extract::{read_json, VmName};
use crate::api::AppState;
use crate::wire::MergeRequest;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/vms/{vm}/points", get(list_points))
        .route("/v1/vms/{vm}/merge", post(merge_vm))
}

#[utoipa::path(
    get,
    path = "/v1/vms/{vm}/points",
    tag = "points",
    summary = "A VM's recovery points, oldest first",
    params(crate::api::openapi::params::Vm),
    responses(
        (status = 200, description = "The points (and incomplete cycles)", body = Vec<crate::wire::PointView>),
    )
)]
async fn list_points(
    _: Viewer,
    State(s): State<AppState>,
    VmName(vm): VmName,
) -> ApiResult<Json<Vec<crate::replica::points::PointView>>> {
    Ok(Json(s.replicas.points_and_incomplete(&vm).await?))
}

#[utoipa::path(
    post,
    path = "/v1/vms/{vm}/merge",
    tag = "points",
    summary = "Merge logs into the replica now",
    params(crate::api::openapi::params::Vm),
    request_body = crate::wire::MergeRequest,
    responses(
        (status = 200, description = "What was merged", body = crate::wire::MergeReport),
        (status = 409, description = "`point_incomplete`, `maintenance_running` and other conflicts", body = crate::wire::ErrorBody),
    )
)]
async fn merge_vm(
    _: Operator,
    State(s): State<AppState>,
    VmName(vm): VmName,
    body: Body,
) -> ApiResult<Json<crate::replica::points::MergeReport>> {
    let req: MergeRequest = read_json(body).await?;
    s.catalog.vm_for(None, &vm).await?;
    // Resolved before the job exists: a refused point leaves no job running forever.
    let through = match &req.through {
        Some(p) => Some(s.replicas.resolve_point(&vm, p).await?.cycle),
        None => None,
    };
    let job = s
        .jobs
        .create(
            crate::jobs::JobKind::Merge,
            Some(&vm),
            &["Merge logs into the replica"],
            crate::jobs::JobState::Running,
        )
        .await?;
    match s.replicas.merge_vm_through(&vm, req.all, through).await {
        Ok(r) => {
            s.jobs.succeed(&job.id).await?;
            Ok(Json(r))
        }
        Err(e) => {
            let _ = s.jobs.fail(&job.id, &e).await;
            Err(e.into())
        }
    }
}
