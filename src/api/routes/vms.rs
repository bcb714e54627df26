//! Protected VMs (operator): list and show, policy, NIC overrides, and reading a disk's map and
//! blocks (at a recovery point, the newest by default).

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};

use super::BLAKE3_HEADER;
use crate::api::auth::{Admin, Operator, Viewer};
use crate::api::error::ApiResult;
use crate::api::extract::{read_json, BlockIndex, CallerVm, DiskPath, NicIndex, Query, VmName};
use crate::api::AppState;
use crate::error::Error;
use crate::wire::{DisableReport, DisableRequest, MapView, PointQuery};

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/vms", get(list_vms))
        .route("/v1/vms/{vm}", get(get_vm).patch(set_vm_policy))
        .route("/v1/vms/{vm}/disable", post(disable_vm))
        .route("/v1/vms/{vm}/disks/{disk}/map", get(get_map))
        .route("/v1/vms/{vm}/disks/{disk}/blocks/{index}", get(get_block))
        .route("/v1/vms/{vm}/nics", get(super::console::vm_nics))
        .route(
            "/v1/vms/{vm}/nics/{index}",
            put(set_nic_override).delete(clear_nic_override),
        )
}

#[utoipa::path(
    get,
    path = "/v1/vms",
    tag = "vms",
    summary = "List protected VMs",
    responses(
        (status = 200, description = "Every VM's view", body = Vec<crate::wire::VmView>),
    )
)]
async fn list_vms(_: Viewer, State(s): State<AppState>) -> Json<Vec<crate::catalog::VmView>> {
    Json(s.overview.list().await)
}

#[utoipa::path(
    get,
    path = "/v1/vms/{vm}",
    tag = "vms",
    summary = "A VM's view",
    params(crate::api::openapi::params::Vm),
    responses(
        (status = 200, description = "The VM", body = crate::wire::VmView),
    )
)]
async fn get_vm(
    _: Viewer,
    State(s): State<AppState>,
    CallerVm { record: rec, .. }: CallerVm,
) -> ApiResult<Json<crate::catalog::VmView>> {
    Ok(Json(s.overview.view(&rec).await))
}

#[utoipa::path(
    get,
    path = "/v1/vms/{vm}/disks/{disk}/map",
    tag = "vms",
    summary = "A disk's block map at a recovery point",
    params(crate::api::openapi::params::Disk, crate::wire::PointQuery),
    responses(
        (status = 200, description = "Geometry and the data blocks' hashes", body = crate::wire::MapView),
        (status = 409, description = "`point_damaged`, `point_incomplete`", body = crate::wire::ErrorBody),
    )
)]
async fn get_map(
    _: Viewer,
    State(s): State<AppState>,
    DiskPath { vm, disk }: DiskPath,
    Query(q): Query<PointQuery>,
) -> ApiResult<Json<MapView>> {
    // Without `point` the newest complete point: the base map alone is an old disk as soon as
    // any log is retained after it.
    let sel = q.point.as_deref().unwrap_or("latest");
    let p = s.replicas.resolve_disk_point(&vm, &disk, sel).await?;
    s.replicas.refuse_damaged(&vm, Some(&disk), p.cycle).await?;
    // The disk as it was at the point: a grown disk's older points keep the older size.
    let (d, size, blocks) = s.replicas.point_blocks(&vm, &disk, p.cycle).await?;
    let data = blocks
        .into_iter()
        .map(|(i, h)| (i, h.unwrap_or_default()))
        .collect();
    Ok(Json(MapView {
        size,
        block_size: d.block_size,
        blocks: size.div_ceil(d.block_size as u64),
        data,
        point: Some(p.id),
    }))
}

#[utoipa::path(
    get,
    path = "/v1/vms/{vm}/disks/{disk}/blocks/{index}",
    tag = "vms",
    summary = "A block's bytes at a recovery point, verified",
    params(crate::api::openapi::params::Block, crate::wire::PointQuery),
    responses(
        (status = 200, description = "The block's bytes", body = crate::api::openapi::Octets, content_type = "application/octet-stream", headers(("X-Drvault-Blake3" = String, description = "Plain BLAKE3 of the block (hex)"))),
        (status = 409, description = "`point_damaged`, `point_incomplete`", body = crate::wire::ErrorBody),
    )
)]
async fn get_block(
    _: Viewer,
    State(s): State<AppState>,
    DiskPath { vm, disk }: DiskPath,
    BlockIndex(i): BlockIndex,
    Query(q): Query<PointQuery>,
) -> ApiResult<Response> {
    let sel = q.point.as_deref().unwrap_or("latest");
    let p = s.replicas.resolve_disk_point(&vm, &disk, sel).await?;
    s.replicas.refuse_damaged(&vm, Some(&disk), p.cycle).await?;
    let (bytes, hash) = s
        .replicas
        .point_reader(&vm, &disk, p.cycle)
        .await?
        .read_block(i)
        .await?;
    let mut resp = Body::from(bytes).into_response();
    resp.headers_mut().insert(
        BLAKE3_HEADER,
        hash.to_hex()
            .parse()
            .map_err(|_| Error::internal("header"))?,
    );
    resp.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        "application/octet-stream"
            .parse()
            .map_err(|_| Error::internal("header"))?,
    );
    Ok(resp)
}

#[utoipa::path(
    patch,
    path = "/v1/vms/{vm}",
    tag = "vms",
    summary = "Change a VM's replication policy",
    params(crate::api::openapi::params::Vm),
    request_body = crate::wire::PolicyChange,
    responses(
        (status = 200, description = "The VM with its new policy", body = crate::wire::VmView),
        (status = 409, description = "`vm_disabled` and other conflicts", body = crate::wire::ErrorBody),
    )
)]
async fn set_vm_policy(
    _: Operator,
    State(s): State<AppState>,
    VmName(vm): VmName,
    body: Body,
) -> ApiResult<Json<crate::catalog::VmView>> {
    let change: crate::catalog::PolicyChange = read_json(body).await?;
    let rec = s.catalog.set_policy(&vm, &change).await?;
    Ok(Json(s.overview.view(&rec).await))
}

#[utoipa::path(
    put,
    path = "/v1/vms/{vm}/nics/{index}",
    tag = "vms",
    summary = "Set a NIC's failover override",
    params(crate::api::openapi::params::Nic),
    request_body = crate::wire::NicOptions,
    responses(
        (status = 200, description = "The VM", body = crate::wire::VmView),
        (status = 409, description = "`vm_disabled` and other conflicts", body = crate::wire::ErrorBody),
    )
)]
async fn set_nic_override(
    _: Operator,
    State(s): State<AppState>,
    VmName(vm): VmName,
    NicIndex(i): NicIndex,
    body: Body,
) -> ApiResult<Json<crate::catalog::VmView>> {
    let o: crate::failover::definition::NicOptions = read_json(body).await?;
    let rec = s.catalog.set_nic_override(&vm, i, Some(o)).await?;
    Ok(Json(s.overview.view(&rec).await))
}

#[utoipa::path(
    delete,
    path = "/v1/vms/{vm}/nics/{index}",
    tag = "vms",
    summary = "Clear a NIC's failover override",
    params(crate::api::openapi::params::Nic),
    responses(
        (status = 200, description = "The VM", body = crate::wire::VmView),
        (status = 409, description = "`vm_disabled` and other conflicts", body = crate::wire::ErrorBody),
    )
)]
async fn clear_nic_override(
    _: Operator,
    State(s): State<AppState>,
    VmName(vm): VmName,
    NicIndex(i): NicIndex,
) -> ApiResult<Json<crate::catalog::VmView>> {
    let rec = s.catalog.set_nic_override(&vm, i, None).await?;
    Ok(Json(s.overview.view(&rec).await))
}

/// Stops protecting a VM (the "Disable protection" job), refused while a failover of it is in
/// progress: it reads the points this would give up.
#[utoipa::path(
    post,
    path = "/v1/vms/{vm}/disable",
    tag = "vms",
    summary = "Stop protecting a VM",
    params(crate::api::openapi::params::Vm),
    request_body = crate::wire::DisableRequest,
    responses(
        (status = 200, description = "What the disable did", body = crate::wire::DisableReport),
        (status = 409, description = "`failover_running`, `failover_not_committed`, `drill_not_cleaned_up`", body = crate::wire::ErrorBody),
    )
)]
async fn disable_vm(
    _: Admin,
    State(s): State<AppState>,
    VmName(vm): VmName,
    body: Body,
) -> ApiResult<Json<DisableReport>> {
    let req: DisableRequest = read_json(body).await?;
    s.catalog.vm_for(None, &vm).await?;
    s.failovers.refuse_in_progress(&vm).await?;
    Ok(Json(s.catalog.disable(&vm, req.delete_data).await?))
}
