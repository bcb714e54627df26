//! Route table and handlers. See docs/api.md for the contract.

use axum::body::Body;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::de::DeserializeOwned;

use super::auth::{AgentHost, Operator};
use super::error::{ApiError, ApiResult};
use super::AppState;
use crate::chunk::PlainHash;
use crate::error::Error;
use crate::protection::{CompleteRequest, ReceivedQuery, VmSpec};
use crate::replica::MapEntry;
use crate::vault::layout::{self, Family};
use crate::vault::registry::{
    valid_name, HostEntry, ProviderEntry, Registry, HOST_TOKEN_PREFIX, PROVIDER_TOKEN_PREFIX,
};
use crate::wire::{
    AddHost, AddProvider, FailbackCommitRequest, HostView, JobsQuery, LogQuery, MergeRequest,
    PointQuery, ProviderView, ServerInfo,
};
pub use crate::wire::{Credentials, MapView, MissingBlocks, BLAKE3_HEADER};

/// Largest JSON request body.
const MAX_JSON_BODY: usize = 16 * 1024 * 1024;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/", get(super::console::index))
        .route("/console/app.js", get(super::console::app_js))
        .route("/console/app.css", get(super::console::app_css))
        .route("/console/favicon.svg", get(super::console::favicon))
        .route("/v1/server", get(server_info))
        .route("/v1/hosts", get(list_hosts).post(add_host))
        .route("/v1/hosts/{name}", axum::routing::delete(remove_host))
        .route("/v1/providers", get(list_providers).post(add_provider))
        .route(
            "/v1/providers/{name}",
            axum::routing::delete(remove_provider),
        )
        .route("/v1/vms", get(list_vms))
        .route("/v1/vms/{vm}", get(get_vm).patch(set_vm_policy))
        .route("/v1/vms/{vm}/disks/{disk}/map", get(get_map))
        .route("/v1/vms/{vm}/disks/{disk}/blocks/{index}", get(get_block))
        .route("/v1/vms/{vm}/points", get(list_points))
        .route("/v1/vms/{vm}/nics", get(super::console::vm_nics))
        .route(
            "/v1/vms/{vm}/nics/{index}",
            put(set_nic_override).delete(clear_nic_override),
        )
        .route(
            "/v1/vms/{vm}/failover",
            get(show_failover).post(start_failover),
        )
        .route("/v1/vms/{vm}/failover/cleanup", post(cleanup_failover))
        .route("/v1/vms/{vm}/failover/commit", post(commit_failover))
        .route("/v1/vms/{vm}/failover/cancel", post(cancel_failover))
        .route("/v1/vms/{vm}/merge", post(merge_vm))
        .route("/v1/vms/{vm}/resync", get(show_resync).post(start_resync))
        .route("/v1/vms/{vm}/resync/cancel", post(cancel_resync))
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
        .route("/v1/verify", post(start_verify))
        .route("/v1/verify/{job}", get(verify_report))
        .route("/v1/damage", get(damage_register))
        .route("/v1/gc", post(start_gc))
        .route("/v1/gc/{job}", get(gc_report))
        .route("/v1/jobs", get(list_jobs))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/jobs/{id}/resume", post(resume_job))
        .route("/v1/plans", get(list_plans).post(create_plan))
        .route("/v1/plans/{name}", get(get_plan))
        .route("/v1/plans/{name}/failover", post(start_plan))
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

pub async fn not_found() -> ApiError {
    Error::not_found("no_such_route", "no such route; see docs/api.md").into()
}

fn name(kind: &str, s: &str) -> Result<(), ApiError> {
    if valid_name(s) {
        Ok(())
    } else {
        Err(Error::invalid("invalid_name", format!("{kind} name {s:?}: use 1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit")).into())
    }
}

fn index(s: &str) -> Result<u64, ApiError> {
    s.parse::<u64>().map_err(|_| {
        Error::invalid(
            "invalid_index",
            format!("block index {s:?} is not a number"),
        )
        .into()
    })
}

/// Path parameters. axum's own extractor answers a segment that does not percent-decode to
/// UTF-8 with a plain-text 400; here it is refused like any other bad name, with the API's
/// JSON error body.
struct Path<T>(T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Path(v)),
            Err(e) => {
                Err(Error::invalid("invalid_name", format!("URL path: {}", e.body_text())).into())
            }
        }
    }
}

/// Query parameters, refused with the API's JSON error body (`invalid_query`) when they do not
/// parse, instead of axum's plain-text 400.
struct Query<T>(T);

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Query(v)),
            Err(e) => {
                Err(Error::invalid("invalid_query", format!("URL query: {}", e.body_text())).into())
            }
        }
    }
}

/// Whether reading a body failed because it passed the length limit, rather than because it
/// was cut off (a dropped connection, the slow-body guard).
fn over_limit(e: &axum::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if c.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cause = c.source();
    }
    false
}

async fn read_json<T: DeserializeOwned>(body: Body) -> Result<T, ApiError> {
    let bytes = axum::body::to_bytes(body, MAX_JSON_BODY)
        .await
        .map_err(|e| {
            if over_limit(&e) {
                Error::TooLarge {
                    code: "body_too_large",
                    message: format!("JSON body over {MAX_JSON_BODY} bytes"),
                }
            } else {
                Error::invalid("body_incomplete", format!("request body was cut off: {e}"))
            }
        })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::invalid("invalid_json", format!("request body: {e}")).into())
}

async fn healthz(State(s): State<AppState>) -> Response {
    match s.vault.store().head(&layout::key_check()).await {
        Ok(Some(_)) => Json(serde_json::json!({"status": "ok"})).into_response(),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "vault unreachable"})),
        )
            .into_response(),
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    for v in s.protection.list().await {
        let health = match v.health {
            crate::protection::Health::Normal => 0.0,
            crate::protection::Health::Warning => 1.0,
            crate::protection::Health::Critical => 2.0,
        };
        metrics::gauge!("drvault_vm_health", "vm" => v.name.clone()).set(health);
        metrics::gauge!("drvault_vm_replication_progress", "vm" => v.name.clone()).set(v.progress);
        if let Some(rpo) = v.rpo_seconds {
            metrics::gauge!("drvault_vm_rpo_seconds", "vm" => v.name.clone()).set(rpo as f64);
        }
        for d in &v.disks {
            let labels = [("vm", v.name.clone()), ("disk", d.id.clone())];
            metrics::gauge!("drvault_disk_pending_log_bytes", &labels)
                .set(d.pending_log_bytes as f64);
            metrics::gauge!("drvault_disk_journal_length", &labels).set(d.journal_length as f64);
            metrics::gauge!("drvault_disk_resync_required", &labels).set(
                if d.resync_required.is_some() {
                    1.0
                } else {
                    0.0
                },
            );
        }
    }
    match &s.metrics {
        Some(h) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4",
            )],
            h.render(),
        )
            .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder not installed",
        )
            .into_response(),
    }
}

async fn server_info(_: Operator, State(s): State<AppState>) -> Json<ServerInfo> {
    Json(ServerInfo {
        version: env!("CARGO_PKG_VERSION").to_string(),
        block_size: s.protection.block_size(),
    })
}

// ---------- hosts and providers (operator) ----------

/// Applies `f` to the registry record (compare-and-swap) and refreshes the cache.
pub async fn update_registry(
    s: &AppState,
    f: impl Fn(&mut Registry) -> Result<(), Error>,
) -> Result<Registry, Error> {
    let prefix = layout::record(Family::Registry, "main");
    let v = s
        .vault
        .records
        .update(&prefix, |cur: Option<&Registry>| {
            let mut r = cur.cloned().unwrap_or_default();
            f(&mut r)?;
            Ok(Some(r))
        })
        .await?
        .ok_or_else(|| Error::internal("registry update returned nothing"))?;
    *s.registry.write().await = v.value.clone();
    Ok(v.value)
}

async fn list_hosts(_: Operator, State(s): State<AppState>) -> Json<Vec<HostView>> {
    let reg = s.registry.read().await.clone();
    let vms = s.protection.list().await;
    Json(
        reg.hosts
            .values()
            .map(|h| HostView {
                name: h.name.clone(),
                cloud: h.cloud.clone(),
                created: crate::util::rfc3339(h.created_unix),
                vms: vms
                    .iter()
                    .filter(|v| v.owner == h.name)
                    .map(|v| v.name.clone())
                    .collect(),
            })
            .collect(),
    )
}

async fn add_host(
    _: Operator,
    State(s): State<AppState>,
    body: Body,
) -> ApiResult<(StatusCode, Json<Credentials>)> {
    let req: AddHost = read_json(body).await?;
    name("host", &req.name)?;
    if let Some(c) = &req.cloud {
        name("cloud", c)?;
    }
    let token = crate::util::random_token(HOST_TOKEN_PREFIX);
    let digest = s.vault.keys().token_digest(&token);
    let now = crate::util::unix_now();
    update_registry(&s, |r| {
        if r.hosts.contains_key(&req.name) {
            return Err(Error::conflict(
                "host_exists",
                format!("host {} is already registered", req.name),
            ));
        }
        r.hosts.insert(
            req.name.clone(),
            HostEntry {
                name: req.name.clone(),
                token_digest: digest.clone(),
                cloud: req.cloud.clone(),
                created_unix: now,
            },
        );
        Ok(())
    })
    .await?;
    tracing::info!(host = %req.name, "host registered");
    Ok((
        StatusCode::CREATED,
        Json(Credentials {
            kind: "host".into(),
            name: req.name,
            cloud: req.cloud,
            server: s.public_url.clone(),
            token,
            ca_cert_pem: s.ca_pem.clone(),
        }),
    ))
}

async fn remove_host(
    _: Operator,
    State(s): State<AppState>,
    Path(host): Path<String>,
) -> ApiResult<StatusCode> {
    name("host", &host)?;
    update_registry(&s, |r| {
        r.hosts.remove(&host).map(|_| ()).ok_or_else(|| {
            Error::not_found("host_not_found", format!("host {host} is not registered"))
        })
    })
    .await?;
    tracing::info!(%host, "host removed; its token is revoked");
    Ok(StatusCode::NO_CONTENT)
}

async fn list_providers(_: Operator, State(s): State<AppState>) -> Json<Vec<ProviderView>> {
    let reg = s.registry.read().await;
    Json(
        reg.providers
            .values()
            .map(|p| ProviderView {
                name: p.name.clone(),
                cloud: p.cloud.clone(),
                created: crate::util::rfc3339(p.created_unix),
            })
            .collect(),
    )
}

async fn add_provider(
    _: Operator,
    State(s): State<AppState>,
    body: Body,
) -> ApiResult<(StatusCode, Json<Credentials>)> {
    let req: AddProvider = read_json(body).await?;
    name("provider", &req.name)?;
    name("cloud", &req.cloud)?;
    let token = crate::util::random_token(PROVIDER_TOKEN_PREFIX);
    let digest = s.vault.keys().token_digest(&token);
    let now = crate::util::unix_now();
    update_registry(&s, |r| {
        if r.providers.contains_key(&req.name) {
            return Err(Error::conflict(
                "provider_exists",
                format!("provider {} is already registered", req.name),
            ));
        }
        r.providers.insert(
            req.name.clone(),
            ProviderEntry {
                name: req.name.clone(),
                cloud: req.cloud.clone(),
                token_digest: digest.clone(),
                created_unix: now,
            },
        );
        Ok(())
    })
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(Credentials {
            kind: "provider".into(),
            name: req.name,
            cloud: Some(req.cloud),
            server: s.public_url.clone(),
            token,
            ca_cert_pem: s.ca_pem.clone(),
        }),
    ))
}

async fn remove_provider(
    _: Operator,
    State(s): State<AppState>,
    Path(p): Path<String>,
) -> ApiResult<StatusCode> {
    name("provider", &p)?;
    update_registry(&s, |r| {
        r.providers.remove(&p).map(|_| ()).ok_or_else(|| {
            Error::not_found(
                "provider_not_found",
                format!("provider {p} is not registered"),
            )
        })
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---------- VMs, maps, blocks, jobs (operator) ----------

async fn list_vms(_: Operator, State(s): State<AppState>) -> Json<Vec<crate::protection::VmView>> {
    Json(s.protection.list().await)
}

async fn get_vm(
    _: Operator,
    State(s): State<AppState>,
    Path(vm): Path<String>,
) -> ApiResult<Json<crate::protection::VmView>> {
    name("VM", &vm)?;
    let rec = s.protection.vm_for(None, &vm).await?;
    Ok(Json(s.protection.view(&rec).await))
}

async fn get_map(
    _: Operator,
    State(s): State<AppState>,
    Path((vm, disk)): Path<(String, String)>,
    Query(q): Query<PointQuery>,
) -> ApiResult<Json<MapView>> {
    name("VM", &vm)?;
    name("disk", &disk)?;
    if let Some(sel) = q.point {
        let p = s.protection.resolve_point(&vm, &sel).await?;
        s.protection
            .refuse_damaged(&vm, Some(&disk), p.cycle)
            .await?;
        let (d, blocks) = s.protection.point_blocks(&vm, &disk, p.cycle).await?;
        let data = blocks
            .into_iter()
            .map(|(i, h)| (i, h.unwrap_or_default()))
            .collect();
        let blocks = d.stats.blocks;
        return Ok(Json(MapView {
            size: d.size,
            block_size: d.block_size,
            blocks,
            data,
            point: Some(p.id),
        }));
    }
    let (d, map) = s.protection.base_map(&vm, &disk).await?;
    s.protection
        .refuse_damaged(&vm, Some(&disk), d.base_point.cycle)
        .await?;
    let data = map
        .entries()
        .filter_map(|(i, e)| match e {
            MapEntry::Data { hash, .. } => Some((i, hash.to_hex())),
            MapEntry::Zero => None,
        })
        .collect();
    Ok(Json(MapView {
        size: d.size,
        block_size: d.block_size,
        blocks: map.len(),
        data,
        point: None,
    }))
}

async fn get_block(
    _: Operator,
    State(s): State<AppState>,
    Path((vm, disk, idx)): Path<(String, String, String)>,
    Query(q): Query<PointQuery>,
) -> ApiResult<Response> {
    name("VM", &vm)?;
    name("disk", &disk)?;
    let i = index(&idx)?;
    let (bytes, hash) = match q.point {
        Some(sel) => {
            let p = s.protection.resolve_point(&vm, &sel).await?;
            s.protection
                .refuse_damaged(&vm, Some(&disk), p.cycle)
                .await?;
            s.protection
                .point_reader(&vm, &disk, p.cycle)
                .await?
                .read_block(i)
                .await?
        }
        None => s.protection.read_block(&vm, &disk, i).await?,
    };
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

async fn list_jobs(
    _: Operator,
    State(s): State<AppState>,
    Query(q): Query<JobsQuery>,
) -> Json<Vec<crate::jobs::Job>> {
    let mut jobs = s.jobs.list().await;
    if let Some(vm) = q.vm {
        jobs.retain(|j| j.vm.as_deref() == Some(vm.as_str()));
    }
    Json(jobs)
}

async fn get_job(
    _: Operator,
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<crate::jobs::Job>> {
    if uuid::Uuid::parse_str(&id).is_err() {
        return Err(Error::invalid("invalid_job_id", format!("{id:?} is not a job id")).into());
    }
    s.jobs
        .get(&id)
        .await
        .map(Json)
        .ok_or_else(|| Error::not_found("job_not_found", format!("job {id} not found")).into())
}

// ---------- agent routes ----------

async fn enable_protection(
    AgentHost(host): AgentHost,
    State(s): State<AppState>,
    Path(vm): Path<String>,
    body: Body,
) -> ApiResult<(StatusCode, Json<crate::protection::VmView>)> {
    name("VM", &vm)?;
    let spec: VmSpec = read_json(body).await?;
    let (view, created) = s.protection.enable(&host, &vm, &spec).await?;
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
    AgentHost(host): AgentHost,
    State(s): State<AppState>,
    Path(vm): Path<String>,
) -> ApiResult<Json<crate::protection::VmView>> {
    name("VM", &vm)?;
    let rec = s.protection.vm_for(Some(&host), &vm).await?;
    Ok(Json(s.protection.view(&rec).await))
}

async fn agent_query_blocks(
    AgentHost(host): AgentHost,
    State(s): State<AppState>,
    Path((vm, disk)): Path<(String, String)>,
    body: Body,
) -> ApiResult<Json<MissingBlocks>> {
    name("VM", &vm)?;
    name("disk", &disk)?;
    let q: ReceivedQuery = read_json(body).await?;
    Ok(Json(MissingBlocks {
        missing: s.protection.missing_blocks(&host, &vm, &disk, &q).await?,
    }))
}

async fn agent_put_block(
    AgentHost(host): AgentHost,
    State(s): State<AppState>,
    Path((vm, disk, idx)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<crate::protection::BlockAck>> {
    name("VM", &vm)?;
    name("disk", &disk)?;
    let i = index(&idx)?;
    // Authorization and geometry before reading a byte of the body.
    let (_, d) = s.protection.disk_for(Some(&host), &vm, &disk).await?;
    let (claimed, bytes, _ingesting) =
        read_block_body(&s, &host, &headers, body, d.block_size as usize, "block").await?;
    Ok(Json(
        s.protection
            .put_block(&host, &vm, &disk, i, claimed, bytes)
            .await?,
    ))
}

async fn agent_complete_disk(
    AgentHost(host): AgentHost,
    State(s): State<AppState>,
    Path((vm, disk)): Path<(String, String)>,
    body: Body,
) -> ApiResult<Json<crate::protection::DiskView>> {
    name("VM", &vm)?;
    name("disk", &disk)?;
    let req: CompleteRequest = read_json(body).await?;
    Ok(Json(
        s.protection.complete_disk(&host, &vm, &disk, &req).await?,
    ))
}

async fn list_points(
    _: Operator,
    State(s): State<AppState>,
    Path(vm): Path<String>,
) -> ApiResult<Json<Vec<crate::protection::points::PointView>>> {
    name("VM", &vm)?;
    Ok(Json(s.protection.points_and_incomplete(&vm).await?))
}

async fn merge_vm(
    _: Operator,
    State(s): State<AppState>,
    Path(vm): Path<String>,
    body: Body,
) -> ApiResult<Json<crate::protection::points::MergeReport>> {
    name("VM", &vm)?;
    let req: MergeRequest = read_json(body).await?;
    s.protection.vm_for(None, &vm).await?;
    // Resolved before the job exists: a refused point leaves no job running forever.
    let through = match &req.through {
        Some(p) => Some(s.protection.resolve_point(&vm, p).await?.cycle),
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
    match s.protection.merge_vm_through(&vm, req.all, through).await {
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

async fn agent_put_log(
    AgentHost(host): AgentHost,
    State(s): State<AppState>,
    Path((vm, disk, log_id)): Path<(String, String, String)>,
    Query(q): Query<LogQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<crate::protection::delta::LogAck>> {
    name("VM", &vm)?;
    name("disk", &disk)?;
    let len = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let meta = crate::protection::delta::LogMeta {
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
    let p = s.protection.clone();
    let ack = tokio::spawn(async move {
        let _memory = memory;
        p.accept_log(&host, &vm, &disk, &log_id, meta, len, stream)
            .await
    })
    .await
    .map_err(|e| crate::error::Error::internal(format!("log upload task failed: {e}")))??;
    Ok(Json(ack))
}

async fn set_vm_policy(
    _: Operator,
    State(s): State<AppState>,
    Path(vm): Path<String>,
    body: Body,
) -> ApiResult<Json<crate::protection::VmView>> {
    name("VM", &vm)?;
    let change: crate::protection::PolicyChange = read_json(body).await?;
    Ok(Json(s.protection.set_policy(&vm, &change).await?))
}

async fn start_failover(
    _: Operator,
    State(s): State<AppState>,
    Path(vm): Path<String>,
    body: Body,
) -> ApiResult<(StatusCode, Json<crate::failover::service::FailoverRecord>)> {
    name("VM", &vm)?;
    let req: crate::failover::service::FailoverRequest = read_json(body).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(s.failovers.start(&vm, req).await?),
    ))
}

async fn show_failover(
    _: Operator,
    State(s): State<AppState>,
    Path(vm): Path<String>,
) -> ApiResult<Json<crate::failover::service::FailoverView>> {
    name("VM", &vm)?;
    s.protection.vm_for(None, &vm).await?;
    Ok(Json(s.failovers.show(&vm).await?))
}

async fn cleanup_failover(
    _: Operator,
    State(s): State<AppState>,
    Path(vm): Path<String>,
) -> ApiResult<Json<crate::failover::service::FailoverRecord>> {
    name("VM", &vm)?;
    s.protection.vm_for(None, &vm).await?;
    Ok(Json(s.failovers.cleanup(&vm).await?))
}

async fn commit_failover(
    _: Operator,
    State(s): State<AppState>,
    Path(vm): Path<String>,
) -> ApiResult<Json<crate::failover::service::FailoverRecord>> {
    name("VM", &vm)?;
    s.protection.vm_for(None, &vm).await?;
    Ok(Json(s.failovers.commit(&vm).await?))
}

async fn cancel_failover(
    _: Operator,
    State(s): State<AppState>,
    Path(vm): Path<String>,
) -> ApiResult<Json<crate::failover::service::FailoverRecord>> {
    name("VM", &vm)?;
    s.protection.vm_for(None, &vm).await?;
    Ok(Json(s.failovers.cancel(&vm).await?))
}

async fn resume_job(
    _: Operator,
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<crate::jobs::Job>> {
    if uuid::Uuid::parse_str(&id).is_err() {
        return Err(Error::invalid("invalid_job_id", format!("{id:?} is not a job id")).into());
    }
    Ok(Json(s.jobs.resume(&id).await?))
}

async fn list_plans(
    _: Operator,
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
    _: Operator,
    State(s): State<AppState>,
    Path(p): Path<String>,
) -> ApiResult<Json<crate::failover::plan::Plan>> {
    name("plan", &p)?;
    Ok(Json(s.plans.get(&p).await?))
}

async fn start_plan(
    _: Operator,
    State(s): State<AppState>,
    Path(p): Path<String>,
    body: Body,
) -> ApiResult<(StatusCode, Json<crate::wire::Started>)> {
    name("plan", &p)?;
    let req: crate::failover::plan::PlanFailoverRequest = read_json(body).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(crate::wire::Started {
            job: s.plans.start(&p, req).await?,
        }),
    ))
}

async fn set_nic_override(
    _: Operator,
    State(s): State<AppState>,
    Path((vm, idx)): Path<(String, String)>,
    body: Body,
) -> ApiResult<Json<crate::protection::VmView>> {
    name("VM", &vm)?;
    let i = u32::try_from(index(&idx)?)
        .map_err(|_| Error::invalid("invalid_index", "NIC index too large"))?;
    let o: crate::failover::definition::NicOptions = read_json(body).await?;
    let rec = s.protection.set_nic_override(&vm, i, Some(o)).await?;
    Ok(Json(s.protection.view(&rec).await))
}

async fn clear_nic_override(
    _: Operator,
    State(s): State<AppState>,
    Path((vm, idx)): Path<(String, String)>,
) -> ApiResult<Json<crate::protection::VmView>> {
    name("VM", &vm)?;
    let i = u32::try_from(index(&idx)?)
        .map_err(|_| Error::invalid("invalid_index", "NIC index too large"))?;
    let rec = s.protection.set_nic_override(&vm, i, None).await?;
    Ok(Json(s.protection.view(&rec).await))
}

/// What a block or patch upload holds while the server stores it: the memory of its body and
/// an ingest slot.
struct Ingesting {
    _body: super::body_budget::Reservation,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

/// The hash header and a body of at most `limit` bytes. The body's memory is reserved from its
/// host's share before it is read (without a reservation the body waits on the socket), and
/// the ingest slot is taken only once the body is complete, so a host sending slowly holds
/// memory from its own share and never a slot other hosts need.
async fn read_block_body(
    s: &AppState,
    host: &str,
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    what: &str,
) -> Result<(PlainHash, bytes::Bytes, Ingesting), Error> {
    let claimed = headers
        .get(BLAKE3_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(PlainHash::from_hex)
        .ok_or_else(|| {
            Error::invalid(
                "missing_hash",
                format!(
                    "header {BLAKE3_HEADER} with the block's BLAKE3 (64 hex digits) is required"
                ),
            )
        })?;
    let announced = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(len) = announced {
        if len > limit as u64 {
            return Err(Error::invalid(
                "body_too_long",
                format!("body of {len} bytes is longer than the {limit}-byte {what} limit"),
            ));
        }
    }
    let memory = s
        .body_budget
        .reserve(host, announced.unwrap_or(limit as u64))
        .await?;
    // A body with a length cannot run past it (HTTP/1.1 and HTTP/2 both stop it there); one
    // without may be anything up to the limit, which was reserved in full.
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(e) => {
            return Err(if over_limit(&e) {
                Error::invalid(
                    "body_too_long",
                    format!("body is longer than the {limit}-byte {what} limit"),
                )
            } else {
                Error::invalid("body_incomplete", format!("request body was cut off: {e}"))
            });
        }
    };
    let slot = s
        .ingest_permits
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| Error::internal("ingest closed"))?;
    Ok((
        claimed,
        bytes,
        Ingesting {
            _body: memory,
            _slot: slot,
        },
    ))
}

fn octets(bytes: bytes::Bytes) -> Response {
    let mut resp = Body::from(bytes).into_response();
    resp.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/octet-stream"),
    );
    resp
}

async fn agent_resync_view(
    AgentHost(host): AgentHost,
    State(s): State<AppState>,
    Path((vm, disk)): Path<(String, String)>,
) -> ApiResult<Json<crate::protection::resync::ResyncDiskView>> {
    name("VM", &vm)?;
    name("disk", &disk)?;
    Ok(Json(
        s.protection.resync_disk_view(&host, &vm, &disk).await?,
    ))
}

async fn agent_resync_hashes(
    AgentHost(host): AgentHost,
    State(s): State<AppState>,
    Path((vm, disk)): Path<(String, String)>,
) -> ApiResult<Response> {
    name("VM", &vm)?;
    name("disk", &disk)?;
    Ok(octets(s.protection.resync_hashes(&host, &vm, &disk).await?))
}

async fn agent_resync_fine(
    AgentHost(host): AgentHost,
    State(s): State<AppState>,
    Path((vm, disk)): Path<(String, String)>,
    body: Body,
) -> ApiResult<Response> {
    name("VM", &vm)?;
    name("disk", &disk)?;
    let req: crate::protection::resync::FineRequest = read_json(body).await?;
    Ok(octets(
        s.protection.resync_fine(&host, &vm, &disk, &req).await?,
    ))
}

async fn agent_resync_patch(
    AgentHost(host): AgentHost,
    State(s): State<AppState>,
    Path((vm, disk, idx)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<crate::protection::resync::PatchAck>> {
    name("VM", &vm)?;
    name("disk", &disk)?;
    let i = index(&idx)?;
    let (_, d) = s.protection.disk_for(Some(&host), &vm, &disk).await?;
    let limit = crate::replica::patch::max_patch_len(d.block_size as usize);
    let (claimed, bytes, _ingesting) =
        read_block_body(&s, &host, &headers, body, limit, "patch").await?;
    Ok(Json(
        s.protection
            .resync_put_patch(&host, &vm, &disk, i, claimed, bytes)
            .await?,
    ))
}

async fn agent_resync_complete(
    AgentHost(host): AgentHost,
    State(s): State<AppState>,
    Path((vm, disk)): Path<(String, String)>,
    body: Body,
) -> ApiResult<Json<crate::protection::resync::ResyncCompletion>> {
    name("VM", &vm)?;
    name("disk", &disk)?;
    let req: crate::protection::resync::DigestRequest = read_json(body).await?;
    Ok(Json(
        s.protection
            .resync_complete(&host, &vm, &disk, &req)
            .await?,
    ))
}

async fn start_resync(
    _: Operator,
    State(s): State<AppState>,
    Path(vm): Path<String>,
    body: Body,
) -> ApiResult<Json<crate::protection::resync::ResyncSession>> {
    name("VM", &vm)?;
    let req: crate::protection::resync::ResyncRequest = read_json(body).await?;
    Ok(Json(
        s.protection
            .start_resync(&vm, &req, "requested by the operator")
            .await?,
    ))
}

async fn show_resync(
    _: Operator,
    State(s): State<AppState>,
    Path(vm): Path<String>,
) -> ApiResult<Json<crate::protection::resync::ResyncSession>> {
    name("VM", &vm)?;
    let v = s.protection.vm_for(None, &vm).await?;
    Ok(Json(s.protection.resync_session(&v.id).await?.ok_or_else(
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
    Path(vm): Path<String>,
) -> ApiResult<Json<crate::protection::resync::ResyncSession>> {
    name("VM", &vm)?;
    Ok(Json(s.protection.cancel_resync(&vm).await?))
}

async fn agent_failback_view(
    AgentHost(host): AgentHost,
    State(s): State<AppState>,
    Path((vm, disk)): Path<(String, String)>,
) -> ApiResult<Json<crate::failover::failback::FailbackDiskView>> {
    name("VM", &vm)?;
    name("disk", &disk)?;
    Ok(Json(s.failovers.failback_view(&host, &vm, &disk).await?))
}

async fn agent_failback_hashes(
    AgentHost(host): AgentHost,
    State(s): State<AppState>,
    Path((vm, disk)): Path<(String, String)>,
) -> ApiResult<Response> {
    name("VM", &vm)?;
    name("disk", &disk)?;
    Ok(octets(
        s.failovers.failback_hashes(&host, &vm, &disk).await?,
    ))
}

async fn agent_failback_fine(
    AgentHost(host): AgentHost,
    State(s): State<AppState>,
    Path((vm, disk)): Path<(String, String)>,
    body: Body,
) -> ApiResult<Response> {
    name("VM", &vm)?;
    name("disk", &disk)?;
    let req: crate::protection::resync::FineRequest = read_json(body).await?;
    Ok(octets(
        s.failovers.failback_fine(&host, &vm, &disk, &req).await?,
    ))
}

async fn agent_failback_ranges(
    AgentHost(host): AgentHost,
    State(s): State<AppState>,
    Path((vm, disk)): Path<(String, String)>,
    body: Body,
) -> ApiResult<Response> {
    name("VM", &vm)?;
    name("disk", &disk)?;
    let req: crate::failover::failback::RangeRequest = read_json(body).await?;
    Ok(octets(
        s.failovers.failback_ranges(&host, &vm, &disk, &req).await?,
    ))
}

async fn agent_failback_complete(
    AgentHost(host): AgentHost,
    State(s): State<AppState>,
    Path((vm, disk)): Path<(String, String)>,
    body: Body,
) -> ApiResult<Json<crate::failover::failback::FailbackRecord>> {
    name("VM", &vm)?;
    name("disk", &disk)?;
    let req: crate::protection::resync::DigestRequest = read_json(body).await?;
    Ok(Json(
        s.failovers
            .failback_complete(&host, &vm, &disk, &req)
            .await?,
    ))
}

async fn show_failback(
    _: Operator,
    State(s): State<AppState>,
    Path(vm): Path<String>,
) -> ApiResult<Json<crate::failover::failback::FailbackRecord>> {
    name("VM", &vm)?;
    Ok(Json(s.failovers.failback_record(&vm).await?.ok_or_else(
        || Error::not_found("no_failback", format!("VM {vm} has no failback")),
    )?))
}

async fn commit_failback(
    _: Operator,
    State(s): State<AppState>,
    Path(vm): Path<String>,
    body: Body,
) -> ApiResult<Json<crate::failover::failback::FailbackRecord>> {
    name("VM", &vm)?;
    let req: FailbackCommitRequest = read_json(body).await?;
    Ok(Json(s.failovers.failback_commit(&vm, req.force).await?))
}

// ---------- verify and garbage collection (operator) ----------

async fn start_verify(
    _: Operator,
    State(s): State<AppState>,
    body: Body,
) -> ApiResult<(StatusCode, Json<crate::scrub::Started>)> {
    let req: crate::scrub::verify::VerifyRequest = read_json(body).await?;
    let job = s.scrub.start_verify(req, None).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(crate::scrub::Started { job: job.id }),
    ))
}

fn job_id(id: &str) -> Result<(), ApiError> {
    if uuid::Uuid::parse_str(id).is_err() {
        return Err(Error::invalid("invalid_job_id", format!("{id:?} is not a job id")).into());
    }
    Ok(())
}

async fn verify_report(
    _: Operator,
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<crate::scrub::verify::VerifyReport>> {
    job_id(&id)?;
    Ok(Json(
        s.scrub.report(crate::jobs::JobKind::Verify, &id).await?,
    ))
}

async fn damage_register(
    _: Operator,
    State(s): State<AppState>,
) -> Json<crate::scrub::damage::DamageRecord> {
    Json((*s.scrub.damage().await).clone())
}

async fn start_gc(
    _: Operator,
    State(s): State<AppState>,
    body: Body,
) -> ApiResult<(StatusCode, Json<crate::scrub::Started>)> {
    let req: crate::scrub::gc::GcRequest = read_json(body).await?;
    let job = s.scrub.start_gc(req).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(crate::scrub::Started { job: job.id }),
    ))
}

async fn gc_report(
    _: Operator,
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<crate::scrub::gc::GcReport>> {
    job_id(&id)?;
    Ok(Json(
        s.scrub
            .report(crate::jobs::JobKind::GarbageCollection, &id)
            .await?,
    ))
}
