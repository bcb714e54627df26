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

async fn agent_resync_view(
    AgentHost(host): AgentHost,
    State(s): State<AppState>,
    DiskPath { vm, disk }: DiskPath,
) -> ApiResult<Json<crate::replica::resync::ResyncDiskView>> {
    Ok(Json(s.resyncs.resync_disk_view(&host, &vm, &disk).await?))
}

async fn agent_resync_hashes(
    AgentHost(host): AgentHost,
    State(s): State<AppState>,
    DiskPath { vm, disk }: DiskPath,
) -> ApiResult<Response> {
    Ok(octets(s.resyncs.resync_hashes(&host, &vm, &disk).await?))
}

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

async fn cancel_resync(
    _: Operator,
    State(s): State<AppState>,
    VmName(vm): VmName,
) -> ApiResult<Json<crate::replica::resync::ResyncSession>> {
    Ok(Json(s.resyncs.cancel_resync(&vm).await?))
}
