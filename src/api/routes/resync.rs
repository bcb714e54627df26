//! Resynchronization: the operator starts, shows and cancels it; the agent syncs each disk.

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::{get, post, put};
use axum::{Json, Router};

use super::{octets, read_block_body};
use crate::api::auth::{AgentHost, Operator, Viewer};
use crate::api::error::ApiResult;
use crate::api::extract::{read_json, BlockIndex, CallerVm, DiskPath, VmName};
use crate::api::AppState;
use crate::error::Error;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/vms/{vm}/resync", get(show_resync).post(start_resync))
        .route("/v1/vms/{vm}/resync/cancel", post(cancel_resync))
        .route(
            "/v1/agent/vms/{vm}/disks/{disk}/resync",
            get(agent_resync_view),
        )
        .route(
            "/v1/agent/vms/{vm}/disks/{disk}/resync/hashes",
            get(agent_resync_hashes),
        )
        .route(
            "/v1/agent/vms/{vm}/disks/{disk}/resync/fine",
            post(agent_resync_fine),
        )
        .route(
            "/v1/agent/vms/{vm}/disks/{disk}/resync/blocks/{index}",
            put(agent_resync_patch),
        )
        .route(
            "/v1/agent/vms/{vm}/disks/{disk}/resync/complete",
            post(agent_resync_complete),
        )
}

#[utoipa::path(
    get,
    path = "/v1/agent/vms/{vm}/disks/{disk}/resync",
    tag = "resync",
    summary = "What the agent resyncs of a disk",
    params(crate::api::openapi::params::Disk, crate::api::openapi::params::ActingHost),
    responses(
        (status = 200, description = "The session as the disk sees it", body = crate::wire::ResyncDiskView),
        (status = 409, description = "`resync_scheduled` (recoverable: `Retry-After` is the wait for the window), `resync_cancelled` and other session states", body = crate::wire::ErrorBody),
    )
)]
async fn agent_resync_view(
    AgentHost(host): AgentHost,
    State(s): State<AppState>,
    DiskPath { vm, disk }: DiskPath,
) -> ApiResult<Json<crate::replica::resync::ResyncDiskView>> {
    Ok(Json(s.resyncs.resync_disk_view(&host, &vm, &disk).await?))
}

#[utoipa::path(
    get,
    path = "/v1/agent/vms/{vm}/disks/{disk}/resync/hashes",
    tag = "resync",
    summary = "BLAKE3 of every block of the replica (32 bytes each)",
    params(crate::api::openapi::params::Disk, crate::api::openapi::params::ActingHost),
    responses(
        (status = 200, description = "32 bytes per block", body = crate::api::openapi::Octets, content_type = "application/octet-stream"),
        (status = 409, description = "`resync_scheduled` (recoverable: `Retry-After` is the wait for the window), `resync_cancelled` and other session states", body = crate::wire::ErrorBody),
    )
)]
async fn agent_resync_hashes(
    AgentHost(host): AgentHost,
    State(s): State<AppState>,
    DiskPath { vm, disk }: DiskPath,
) -> ApiResult<Response> {
    Ok(octets(s.resyncs.resync_hashes(&host, &vm, &disk).await?))
}

#[utoipa::path(
    post,
    path = "/v1/agent/vms/{vm}/disks/{disk}/resync/fine",
    tag = "resync",
    summary = "16-byte hashes of each 4 KiB piece of some blocks",
    params(crate::api::openapi::params::Disk, crate::api::openapi::params::ActingHost),
    request_body = crate::wire::FineRequest,
    responses(
        (status = 200, description = "16 bytes per 4 KiB piece", body = crate::api::openapi::Octets, content_type = "application/octet-stream"),
        (status = 409, description = "`resync_scheduled` (recoverable: `Retry-After` is the wait for the window), `resync_cancelled` and other session states", body = crate::wire::ErrorBody),
    )
)]
async fn agent_resync_fine(
    AgentHost(host): AgentHost,
    State(s): State<AppState>,
    DiskPath { vm, disk }: DiskPath,
    body: Body,
) -> ApiResult<Response> {
    let req: crate::replica::resync::FineRequest = read_json(body).await?;
    Ok(octets(
        s.resyncs.resync_fine(&host, &vm, &disk, &req).await?,
    ))
}

#[utoipa::path(
    put,
    path = "/v1/agent/vms/{vm}/disks/{disk}/resync/blocks/{index}",
    tag = "resync",
    summary = "Upload a patch against a block",
    params(crate::api::openapi::params::Block, crate::api::openapi::params::ActingHost, ("X-Drvault-Blake3" = String, Header, description = "Plain BLAKE3 of the block (64 hex digits), checked by the server"), ("Content-Encoding" = Option<String>, Header, description = "`zstd` for a compressed body; absent: as it is")),
    request_body(content = crate::api::openapi::Octets, content_type = "application/octet-stream"),
    responses(
        (status = 200, description = "The patch is stored", body = crate::wire::PatchAck),
        (status = 409, description = "`resync_scheduled` (recoverable: `Retry-After` is the wait for the window), `resync_cancelled` and other session states", body = crate::wire::ErrorBody),
        (status = 415, description = "`unsupported_content_encoding`", body = crate::wire::ErrorBody),
    )
)]
async fn agent_resync_patch(
    AgentHost(host): AgentHost,
    State(s): State<AppState>,
    DiskPath { vm, disk }: DiskPath,
    BlockIndex(i): BlockIndex,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<crate::replica::resync::PatchAck>> {
    let (_, d) = s.catalog.disk_for(Some(&host), &vm, &disk).await?;
    let limit = crate::replica::patch::max_patch_len(d.block_size as usize);
    let (claimed, bytes, _ingesting) =
        read_block_body(&s, &host, &headers, body, limit, "patch").await?;
    Ok(Json(
        s.resyncs
            .resync_put_patch(&host, &vm, &disk, i, claimed, bytes.plain)
            .await?,
    ))
}

#[utoipa::path(
    post,
    path = "/v1/agent/vms/{vm}/disks/{disk}/resync/complete",
    tag = "resync",
    summary = "Complete a disk's resync",
    params(crate::api::openapi::params::Disk, crate::api::openapi::params::ActingHost),
    request_body = crate::wire::DigestRequest,
    responses(
        (status = 200, description = "The disk's completion", body = crate::wire::ResyncCompletion),
        (status = 409, description = "`digest_mismatch` and session states", body = crate::wire::ErrorBody),
    )
)]
async fn agent_resync_complete(
    AgentHost(host): AgentHost,
    State(s): State<AppState>,
    DiskPath { vm, disk }: DiskPath,
    body: Body,
) -> ApiResult<Json<crate::replica::resync::ResyncCompletion>> {
    let req: crate::replica::resync::DigestRequest = read_json(body).await?;
    Ok(Json(
        s.resyncs.resync_complete(&host, &vm, &disk, &req).await?,
    ))
}

#[utoipa::path(
    post,
    path = "/v1/vms/{vm}/resync",
    tag = "resync",
    summary = "Start a resync session",
    params(crate::api::openapi::params::Vm),
    request_body = crate::wire::ResyncRequest,
    responses(
        (status = 200, description = "The session", body = crate::wire::ResyncSession),
        (status = 409, description = "`failed_over`, `replication_incomplete`, `resync_in_progress`, `vm_disabled`", body = crate::wire::ErrorBody),
    )
)]
async fn start_resync(
    _: Operator,
    State(s): State<AppState>,
    VmName(vm): VmName,
    body: Body,
) -> ApiResult<Json<crate::replica::resync::ResyncSession>> {
    let req: crate::replica::resync::ResyncRequest = read_json(body).await?;
    Ok(Json(
        s.resyncs
            .start_resync(&vm, &req, "requested by the operator")
            .await?,
    ))
}

#[utoipa::path(
    get,
    path = "/v1/vms/{vm}/resync",
    tag = "resync",
    summary = "A VM's resync session",
    params(crate::api::openapi::params::Vm),
    responses(
        (status = 200, description = "The session", body = crate::wire::ResyncSession),
    )
)]
async fn show_resync(
    _: Viewer,
    State(s): State<AppState>,
    CallerVm {
        name: vm,
        record: v,
    }: CallerVm,
) -> ApiResult<Json<crate::replica::resync::ResyncSession>> {
    Ok(Json(s.resyncs.resync_session(&v.id).await?.ok_or_else(
        || {
            Error::not_found(
                "no_resync",
                format!("VM {vm} has never been resynchronized"),
            )
        },
    )?))
}

#[utoipa::path(
    post,
    path = "/v1/vms/{vm}/resync/cancel",
    tag = "resync",
    summary = "Cancel a resync session",
    params(crate::api::openapi::params::Vm),
    responses(
        (status = 200, description = "The cancelled session", body = crate::wire::ResyncSession),
        (status = 409, description = "`resync_cancelled` and other conflicts", body = crate::wire::ErrorBody),
    )
)]
async fn cancel_resync(
    _: Operator,
    State(s): State<AppState>,
    VmName(vm): VmName,
) -> ApiResult<Json<crate::replica::resync::ResyncSession>> {
    Ok(Json(s.resyncs.cancel_resync(&vm).await?))
}
