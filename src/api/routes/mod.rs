//! The route table, one module per resource (each with its own routes), and the helpers the
//! handlers share. See docs/api.md for the contract.

use axum::body::Body;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::AppState;
// The resource modules route to `super::console::…`.
use super::console;
use crate::chunk::PlainHash;
use crate::error::Error;
use crate::vault::registry::valid_name;

mod failback;
mod failover;
mod hosts;
mod ingest;
mod jobs;
mod plans;
mod points;
mod resync;
mod scrub;
mod system;
mod vms;

pub use hosts::{update_registry, Credentials};
pub use ingest::MissingBlocks;
pub use vms::MapView;

pub fn routes() -> Router<AppState> {
    Router::new()
        .merge(system::routes())
        .merge(hosts::routes())
        .merge(vms::routes())
        .merge(jobs::routes())
        .merge(ingest::routes())
        .merge(points::routes())
        .merge(failover::routes())
        .merge(plans::routes())
        .merge(resync::routes())
        .merge(failback::routes())
        .merge(scrub::routes())
}

/// Header carrying a block's plain BLAKE3 (hex), on uploads and downloads.
pub const BLAKE3_HEADER: &str = "x-drvault-blake3";
/// Largest JSON request body.
const MAX_JSON_BODY: usize = 16 * 1024 * 1024;

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

fn job_id(id: &str) -> Result<(), ApiError> {
    if uuid::Uuid::parse_str(id).is_err() {
        return Err(Error::invalid("invalid_job_id", format!("{id:?} is not a job id")).into());
    }
    Ok(())
}
