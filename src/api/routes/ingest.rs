//! Agent uploads: enabling protection, the blocks of initial replication (with the resume
//! query and completion) and change logs.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{post, put};
use axum::{Json, Router};

use futures_util::StreamExt;

use super::{content_encoding, read_block_body};
use crate::api::auth::AgentHost;
use crate::api::error::ApiResult;
use crate::api::extract::{read_json, BlockIndex, CallerVm, DiskPath, LogId, Query, VmName};
use crate::api::AppState;
use crate::catalog::VmSpec;
use crate::ingest::wire::{BodyEncoding, WireError};
use crate::ingest::{CompleteRequest, LogBody, ReceivedQuery};
use crate::wire::{LogQuery, MissingBlocks, PLAIN_LENGTH_HEADER};

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/agent/vms/{vm}",
            put(enable_protection).get(agent_get_vm),
        )
        .route(
            "/v1/agent/vms/{vm}/disks/{disk}/blocks/query",
            post(agent_query_blocks),
        )
        .route(
            "/v1/agent/vms/{vm}/disks/{disk}/blocks/{index}",
            put(agent_put_block),
        )
        .route(
            "/v1/agent/vms/{vm}/disks/{disk}/complete",
            post(agent_complete_disk),
        )
        .route(
            "/v1/agent/vms/{vm}/disks/{disk}/logs/{log_id}",
            put(agent_put_log),
        )
}

#[utoipa::path(
    put,
    path = "/v1/agent/vms/{vm}",
    tag = "agent",
    summary = "Enable protection, or change a protected VM's disks",
    params(crate::api::openapi::params::Vm, crate::api::openapi::params::ActingHost),
    request_body = crate::wire::VmSpec,
    responses(
        (status = 200, description = "The same spec again, or the disks changed", body = crate::wire::VmView),
        (status = 201, description = "Protection enabled", body = crate::wire::VmView),
        (status = 409, description = "`vm_exists`, `vm_disabled`, `disk_id_retained`, `replication_incomplete`", body = crate::wire::ErrorBody),
    )
)]
async fn enable_protection(
    AgentHost(host): AgentHost,
    State(s): State<AppState>,
    VmName(vm): VmName,
    body: Body,
) -> ApiResult<(StatusCode, Json<crate::catalog::VmView>)> {
    let spec: VmSpec = read_json(body).await?;
    let (rec, created) = s.catalog.enable(&host, &vm, &spec).await?;
    let view = s.overview.view(&rec).await;
    Ok((
        if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        Json(view),
    ))
}

#[utoipa::path(
    get,
    path = "/v1/agent/vms/{vm}",
    tag = "agent",
    operation_id = "agent_get_vm",
    summary = "The VM as its host sees it",
    params(crate::api::openapi::params::Vm, crate::api::openapi::params::ActingHost),
    responses(
        (status = 200, description = "The VM", body = crate::wire::VmView),
    )
)]
async fn agent_get_vm(
    _: AgentHost,
    State(s): State<AppState>,
    CallerVm { record: rec, .. }: CallerVm,
) -> ApiResult<Json<crate::catalog::VmView>> {
    Ok(Json(s.overview.view(&rec).await))
}

#[utoipa::path(
    post,
    path = "/v1/agent/vms/{vm}/disks/{disk}/blocks/query",
    tag = "agent",
    summary = "Which blocks the server still needs",
    params(crate::api::openapi::params::Disk, crate::api::openapi::params::ActingHost),
    request_body = crate::wire::ReceivedQuery,
    responses(
        (status = 200, description = "The missing blocks", body = crate::wire::MissingBlocks),
        (status = 409, description = "`vm_disabled`, `disk_removed`", body = crate::wire::ErrorBody),
    )
)]
async fn agent_query_blocks(
    AgentHost(host): AgentHost,
    State(s): State<AppState>,
    DiskPath { vm, disk }: DiskPath,
    body: Body,
) -> ApiResult<Json<MissingBlocks>> {
    let q: ReceivedQuery = read_json(body).await?;
    Ok(Json(MissingBlocks {
        missing: s.ingest.missing_blocks(&host, &vm, &disk, &q).await?,
    }))
}

#[utoipa::path(
    put,
    path = "/v1/agent/vms/{vm}/disks/{disk}/blocks/{index}",
    tag = "agent",
    summary = "Upload a block of initial replication",
    params(crate::api::openapi::params::Block, crate::api::openapi::params::ActingHost, ("X-Drvault-Blake3" = String, Header, description = "Plain BLAKE3 of the block (64 hex digits), checked by the server"), ("Content-Encoding" = Option<String>, Header, description = "`zstd` for a compressed body; absent: as it is")),
    request_body(content = crate::api::openapi::Octets, content_type = "application/octet-stream"),
    responses(
        (status = 200, description = "Stored (durable)", body = crate::wire::BlockAck),
        (status = 409, description = "`replication_complete`, `vm_disabled`, `disk_removed`", body = crate::wire::ErrorBody),
        (status = 415, description = "`unsupported_content_encoding`", body = crate::wire::ErrorBody),
    )
)]
async fn agent_put_block(
    AgentHost(host): AgentHost,
    State(s): State<AppState>,
    DiskPath { vm, disk }: DiskPath,
    BlockIndex(i): BlockIndex,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<crate::ingest::BlockAck>> {
    // Authorization and geometry before reading a byte of the body.
    let (_, d) = s.catalog.disk_for(Some(&host), &vm, &disk).await?;
    let (claimed, bytes, _ingesting) =
        read_block_body(&s, &host, &headers, body, d.block_size as usize, "block").await?;
    Ok(Json(
        s.ingest
            .put_block_body(&host, &vm, &disk, i, claimed, bytes)
            .await?,
    ))
}

#[utoipa::path(
    post,
    path = "/v1/agent/vms/{vm}/disks/{disk}/complete",
    tag = "agent",
    summary = "Complete a disk's initial replication",
    params(crate::api::openapi::params::Disk, crate::api::openapi::params::ActingHost),
    request_body = crate::wire::CompleteRequest,
    responses(
        (status = 200, description = "The disk", body = crate::wire::DiskView),
        (status = 409, description = "`blocks_missing`, `digest_mismatch`, `vm_disabled`, `disk_removed`", body = crate::wire::ErrorBody),
    )
)]
async fn agent_complete_disk(
    AgentHost(host): AgentHost,
    State(s): State<AppState>,
    DiskPath { vm, disk }: DiskPath,
    body: Body,
) -> ApiResult<Json<crate::catalog::DiskView>> {
    let req: CompleteRequest = read_json(body).await?;
    Ok(Json(s.ingest.complete_disk(&host, &vm, &disk, &req).await?))
}

#[utoipa::path(
    put,
    path = "/v1/agent/vms/{vm}/disks/{disk}/logs/{log_id}",
    tag = "agent",
    summary = "Upload an MS-HRL change log",
    params(crate::api::openapi::params::Log, crate::wire::LogQuery, crate::api::openapi::params::ActingHost, ("Content-Encoding" = Option<String>, Header, description = "`zstd` for a compressed body; absent: as it is"), ("X-Drvault-Plain-Length" = Option<u64>, Header, description = "A zstd-compressed log's length before compression (required with Content-Encoding: zstd)")),
    request_body(content = crate::api::openapi::Octets, content_type = "application/octet-stream"),
    responses(
        (status = 200, description = "Accepted (or already accepted)", body = crate::wire::LogAck),
        (status = 409, description = "`replication_incomplete`, `chain_broken`, `log_not_closed`, `offline_change`, `resync_required`, `resync_in_progress`, `log_predates_resync`, `failed_over`, `vm_disabled`, `disk_removed`", body = crate::wire::ErrorBody),
        (status = 413, description = "`log_too_large`", body = crate::wire::ErrorBody),
        (status = 415, description = "`unsupported_content_encoding`", body = crate::wire::ErrorBody),
    )
)]
async fn agent_put_log(
    AgentHost(host): AgentHost,
    State(s): State<AppState>,
    DiskPath { vm, disk }: DiskPath,
    LogId(log_id): LogId,
    Query(q): Query<LogQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<crate::ingest::logs::LogAck>> {
    let encoding = log_body(&headers)?;
    let meta = crate::ingest::logs::LogMeta {
        cycle: q.cycle,
        app_consistent: q.app_consistent,
        final_log: q.final_log,
    };
    // The log's frame buffer (and a compressed log's decoder) is body memory like a block's:
    // reserved from the host's share before the first byte is read.
    let memory = s
        .body_budget
        .reserve(&host, log_body_memory(&encoding))
        .await?;
    let stream = body.into_data_stream().inspect(|piece| {
        if let Ok(p) = piece {
            metrics::counter!("drvault_wire_bytes_received_total").increment(p.len() as u64);
        }
    });
    // The log is taken in a task of its own: when a client disconnects mid-upload, the server
    // drops this handler's future, and a log accepted that way would stop wherever it was,
    // leaving the frames already stored behind. The task instead sees the body end in an error
    // and deletes them, as for any refused log.
    let p = s.ingest.clone();
    let ack = tokio::spawn(async move {
        let _memory = memory;
        p.accept_log_encoded(&host, &vm, &disk, &log_id, meta, encoding, stream)
            .await
    })
    .await
    .map_err(|e| crate::error::Error::internal(format!("log upload task failed: {e}")))??;
    Ok(Json(ack))
}

/// How a log upload's body is sent: as it is (with its `Content-Length` when it has one), or
/// zstd-compressed with its plain length in [`PLAIN_LENGTH_HEADER`].
fn log_body(headers: &HeaderMap) -> Result<LogBody, crate::error::Error> {
    let number = |name| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    Ok(match content_encoding(headers)? {
        BodyEncoding::Identity => LogBody::Identity {
            announced_len: number(axum::http::header::CONTENT_LENGTH.as_str()),
        },
        BodyEncoding::Zstd => LogBody::Zstd {
            plain_len: number(PLAIN_LENGTH_HEADER).ok_or(WireError::MissingPlainLength)?,
        },
    })
}

/// Body memory a log upload reserves.
fn log_body_memory(body: &LogBody) -> u64 {
    crate::ingest::wire::log_body_memory(match body {
        LogBody::Identity { .. } => BodyEncoding::Identity,
        LogBody::Zstd { .. } => BodyEncoding::Zstd,
    })
}
