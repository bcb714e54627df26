//! Failback: the agent syncs each disk back on premises; the operator shows and commits it.

use axum::body::Body;
use axum::extract::State;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};

use super::octets;
use crate::api::auth::{AgentHost, Operator, Viewer};
use crate::api::error::ApiResult;
use crate::api::extract::{read_json, DiskPath, VmName};
use crate::api::AppState;
use crate::error::Error;
use crate::wire::FailbackCommitRequest;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/vms/{vm}/failback", get(show_failback))
        .route("/v1/vms/{vm}/failback/commit", post(commit_failback))
        .route(
            "/v1/agent/vms/{vm}/disks/{disk}/failback",
            get(agent_failback_view),
        )
        .route(
            "/v1/agent/vms/{vm}/disks/{disk}/failback/hashes",
            get(agent_failback_hashes),
        )
        .route(
            "/v1/agent/vms/{vm}/disks/{disk}/failback/fine",
            post(agent_failback_fine),
        )
        .route(
            "/v1/agent/vms/{vm}/disks/{disk}/failback/ranges",
            post(agent_failback_ranges),
        )
        .route(
            "/v1/agent/vms/{vm}/disks/{disk}/failback/complete",
            post(agent_failback_complete),
        )
}

async fn agent_failback_view(
    AgentHost(host): AgentHost,
    State(s): State<AppState>,
    DiskPath { vm, disk }: DiskPath,
) -> ApiResult<Json<crate::failover::failback::FailbackDiskView>> {
    Ok(Json(s.failovers.failback_view(&host, &vm, &disk).await?))
}

async fn agent_failback_hashes(
    AgentHost(host): AgentHost,
    State(s): State<AppState>,
    DiskPath { vm, disk }: DiskPath,
) -> ApiResult<Response> {
    Ok(octets(
        s.failovers.failback_hashes(&host, &vm, &disk).await?,
    ))
}

async fn agent_failback_fine(
    AgentHost(host): AgentHost,
    State(s): State<AppState>,
    DiskPath { vm, disk }: DiskPath,
    body: Body,
) -> ApiResult<Response> {
    let req: crate::replica::resync::FineRequest = read_json(body).await?;
    Ok(octets(
        s.failovers.failback_fine(&host, &vm, &disk, &req).await?,
    ))
}

async fn agent_failback_ranges(
    AgentHost(host): AgentHost,
    State(s): State<AppState>,
    DiskPath { vm, disk }: DiskPath,
    body: Body,
) -> ApiResult<Response> {
    let req: crate::failover::failback::RangeRequest = read_json(body).await?;
    Ok(octets(
        s.failovers.failback_ranges(&host, &vm, &disk, &req).await?,
    ))
}

async fn agent_failback_complete(
    AgentHost(host): AgentHost,
    State(s): State<AppState>,
    DiskPath { vm, disk }: DiskPath,
    body: Body,
) -> ApiResult<Json<crate::failover::failback::FailbackRecord>> {
    let req: crate::replica::resync::DigestRequest = read_json(body).await?;
    Ok(Json(
        s.failovers
            .failback_complete(&host, &vm, &disk, &req)
            .await?,
    ))
}

async fn show_failback(
    _: Viewer,
    State(s): State<AppState>,
    VmName(vm): VmName,
) -> ApiResult<Json<crate::failover::failback::FailbackRecord>> {
    Ok(Json(s.failovers.failback_record(&vm).await?.ok_or_else(
        || Error::not_found("no_failback", format!("VM {vm} has no failback")),
    )?))
}

async fn commit_failback(
    _: Operator,
    State(s): State<AppState>,
    VmName(vm): VmName,
    body: Body,
) -> ApiResult<Json<crate::failover::failback::FailbackRecord>> {
    let req: FailbackCommitRequest = read_json(body).await?;
    Ok(Json(s.failovers.failback_commit(&vm, req.force).await?))
}
