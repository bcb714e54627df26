//! Agent uploads: enabling protection, the blocks of initial replication (with the resume
//! query and completion) and change logs.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{post, put};
use axum::{Json, Router};

use super::read_block_body;
use crate::api::auth::AgentHost;
use crate::api::error::ApiResult;
use crate::api::extract::{read_json, BlockIndex, CallerVm, DiskPath, LogId, Query, VmName};
use crate::api::AppState;
use crate::catalog::VmSpec;
use crate::ingest::{CompleteRequest, ReceivedQuery};
use crate::wire::{LogQuery, MissingBlocks};

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

async fn agent_get_vm(
    _: AgentHost,
    State(s): State<AppState>,
    CallerVm { record: rec, .. }: CallerVm,
) -> ApiResult<Json<crate::catalog::VmView>> {
    Ok(Json(s.overview.view(&rec).await))
}

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
            .put_block(&host, &vm, &disk, i, claimed, bytes)
            .await?,
    ))
}

async fn agent_complete_disk(
    AgentHost(host): AgentHost,
    State(s): State<AppState>,
    DiskPath { vm, disk }: DiskPath,
    body: Body,
) -> ApiResult<Json<crate::catalog::DiskView>> {
    let req: CompleteRequest = read_json(body).await?;
    Ok(Json(s.ingest.complete_disk(&host, &vm, &disk, &req).await?))
}

async fn agent_put_log(
    AgentHost(host): AgentHost,
    State(s): State<AppState>,
    DiskPath { vm, disk }: DiskPath,
    LogId(log_id): LogId,
    Query(q): Query<LogQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<crate::ingest::logs::LogAck>> {
    let len = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let meta = crate::ingest::logs::LogMeta {
        cycle: q.cycle,
        app_consistent: q.app_consistent,
        final_log: q.final_log,
    };
    // The log's frame buffer is body memory like a block's: reserved from the host's share
    // before the first byte is read.
    let memory = s
        .body_budget
        .reserve(&host, crate::file_formats::LOG_FRAME_LEN as u64)
        .await?;
    let stream = body.into_data_stream();
    // The log is taken in a task of its own: when a client disconnects mid-upload, the server
    // drops this handler's future, and a log accepted that way would stop wherever it was,
    // leaving the frames already stored behind. The task instead sees the body end in an error
    // and deletes them, as for any refused log.
    let p = s.ingest.clone();
    let ack = tokio::spawn(async move {
        let _memory = memory;
        p.accept_log(&host, &vm, &disk, &log_id, meta, len, stream)
            .await
    })
    .await
    .map_err(|e| crate::error::Error::internal(format!("log upload task failed: {e}")))??;
    Ok(Json(ack))
}
