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

#[utoipa::path(
    get,
    path = "/v1/agent/vms/{vm}/disks/{disk}/failback",
    tag = "failback",
    summary = "What the agent fails back of a disk",
    params(crate::api::openapi::params::Disk, crate::api::openapi::params::ActingHost),
    responses(
        (status = 200, description = "The target disk's geometry", body = crate::wire::FailbackDiskView),
        (status = 409, description = "`not_failed_over`, `vm_disabled`", body = crate::wire::ErrorBody),
    )
)]
async fn agent_failback_view(
    AgentHost(host): AgentHost,
    State(s): State<AppState>,
    DiskPath { vm, disk }: DiskPath,
) -> ApiResult<Json<crate::failover::failback::FailbackDiskView>> {
    Ok(Json(s.failovers.failback_view(&host, &vm, &disk).await?))
}

#[utoipa::path(
    get,
    path = "/v1/agent/vms/{vm}/disks/{disk}/failback/hashes",
    tag = "failback",
    summary = "BLAKE3 of every block of the target disk (32 bytes each)",
    params(crate::api::openapi::params::Disk, crate::api::openapi::params::ActingHost),
    responses(
        (status = 200, description = "32 bytes per block", body = crate::api::openapi::Octets, content_type = "application/octet-stream"),
        (status = 409, description = "`not_failed_over`, `vm_disabled`", body = crate::wire::ErrorBody),
    )
)]
async fn agent_failback_hashes(
    AgentHost(host): AgentHost,
    State(s): State<AppState>,
    DiskPath { vm, disk }: DiskPath,
) -> ApiResult<Response> {
    Ok(octets(
        s.failovers.failback_hashes(&host, &vm, &disk).await?,
    ))
}

#[utoipa::path(
    post,
    path = "/v1/agent/vms/{vm}/disks/{disk}/failback/fine",
    tag = "failback",
    summary = "16-byte hashes of each 4 KiB piece of some target blocks",
    params(crate::api::openapi::params::Disk, crate::api::openapi::params::ActingHost),
    request_body = crate::wire::FineRequest,
    responses(
        (status = 200, description = "16 bytes per 4 KiB piece", body = crate::api::openapi::Octets, content_type = "application/octet-stream"),
        (status = 409, description = "`not_failed_over`, `vm_disabled`", body = crate::wire::ErrorBody),
    )
)]
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

#[utoipa::path(
    post,
    path = "/v1/agent/vms/{vm}/disks/{disk}/failback/ranges",
    tag = "failback",
    summary = "Bytes of ranges of a target block",
    params(crate::api::openapi::params::Disk, crate::api::openapi::params::ActingHost),
    request_body = crate::wire::RangeRequest,
    responses(
        (status = 200, description = "The ranges' bytes, concatenated", body = crate::api::openapi::Octets, content_type = "application/octet-stream"),
        (status = 409, description = "`not_failed_over`, `vm_disabled`", body = crate::wire::ErrorBody),
    )
)]
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

#[utoipa::path(
    post,
    path = "/v1/agent/vms/{vm}/disks/{disk}/failback/complete",
    tag = "failback",
    summary = "Record a disk's failback as synchronized",
    params(crate::api::openapi::params::Disk, crate::api::openapi::params::ActingHost),
    request_body = crate::wire::DigestRequest,
    responses(
        (status = 200, description = "The failback state", body = crate::wire::FailbackRecord),
        (status = 409, description = "`digest_mismatch`, `not_failed_over`", body = crate::wire::ErrorBody),
    )
)]
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

#[utoipa::path(
    get,
    path = "/v1/vms/{vm}/failback",
    tag = "failback",
    summary = "A VM's failback state",
    params(crate::api::openapi::params::Vm),
    responses(
        (status = 200, description = "Disks synchronized and their digests", body = crate::wire::FailbackRecord),
    )
)]
async fn show_failback(
    _: Viewer,
    State(s): State<AppState>,
    VmName(vm): VmName,
) -> ApiResult<Json<crate::failover::failback::FailbackRecord>> {
    Ok(Json(s.failovers.failback_record(&vm).await?.ok_or_else(
        || Error::not_found("no_failback", format!("VM {vm} has no failback")),
    )?))
}

#[utoipa::path(
    post,
    path = "/v1/vms/{vm}/failback/commit",
    tag = "failback",
    summary = "Commit a failback",
    params(crate::api::openapi::params::Vm),
    request_body = crate::wire::FailbackCommitRequest,
    responses(
        (status = 200, description = "The committed failback", body = crate::wire::FailbackRecord),
        (status = 409, description = "`not_failed_over`, `failback_not_synced`, `target_changed`, `target_disk_unreadable`", body = crate::wire::ErrorBody),
    )
)]
async fn commit_failback(
    _: Operator,
    State(s): State<AppState>,
    VmName(vm): VmName,
    body: Body,
) -> ApiResult<Json<crate::failover::failback::FailbackRecord>> {
    let req: FailbackCommitRequest = read_json(body).await?;
    Ok(Json(s.failovers.failback_commit(&vm, req.force).await?))
}
