//! The route table, one module per resource (each with its own routes), and the helpers the
//! handlers share. See docs/api.md for the contract.

use axum::body::Body;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Router;

use super::error::ApiError;
use super::extract::over_limit;
use super::AppState;
// The resource modules route to `super::console::…`.
use super::console;
use crate::chunk::PlainHash;
use crate::error::Error;
use crate::ingest::wire::{decode_block, BlockBody, BodyEncoding};

pub(super) mod accounts;
pub(super) mod agents;
pub(super) mod failback;
pub(super) mod failover;
pub(super) mod hosts;
pub(super) mod ingest;
pub(super) mod jobs;
pub(super) mod networks;
pub(super) mod plans;
pub(super) mod points;
pub(super) mod resync;
pub(super) mod scrub;
pub(super) mod system;
pub(super) mod vms;

pub fn routes() -> Router<AppState> {
    Router::new()
        .merge(system::routes())
        .merge(accounts::routes())
        .merge(hosts::routes())
        .merge(vms::routes())
        .merge(jobs::routes())
        .merge(ingest::routes())
        .merge(agents::routes())
        .merge(points::routes())
        .merge(failover::routes())
        .merge(networks::routes())
        .merge(plans::routes())
        .merge(resync::routes())
        .merge(failback::routes())
        .merge(scrub::routes())
}

pub use crate::wire::BLAKE3_HEADER;

pub async fn not_found() -> ApiError {
    Error::not_found("no_such_route", "no such route; see docs/api.md").into()
}

/// What a block or patch upload holds while the server stores it: the memory of its body and
/// an ingest slot.
struct Ingesting {
    _body: super::body_budget::Reservation,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

/// The hash header and a body of at most `limit` plain bytes, decoded as its
/// `Content-Encoding` says (identity or zstd; anything else is refused before the body is read).
/// The body's memory is reserved from its host's share before it is read (without a
/// reservation the body waits on the socket), and the ingest slot is taken only once the body
/// is complete, so a host sending slowly holds memory from its own share and never a slot other
/// hosts need. A compressed body also reserves the `limit` bytes it may inflate to, and is
/// inflated no further (a zstd bomb is refused without allocating what it claims).
async fn read_block_body(
    s: &AppState,
    host: &str,
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    what: &'static str,
) -> Result<(PlainHash, BlockBody, Ingesting), Error> {
    let encoding = content_encoding(headers)?;
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
    let inflated = match encoding {
        BodyEncoding::Identity => 0,
        BodyEncoding::Zstd => limit as u64,
    };
    let memory = s
        .body_budget
        .reserve(host, announced.unwrap_or(limit as u64) + inflated)
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
    metrics::counter!("drvault_wire_bytes_received_total").increment(bytes.len() as u64);
    let slot = s
        .ingest_permits
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| Error::internal("ingest closed"))?;
    let decoded = s
        .vault
        .chunks
        .cpu()
        .run(move || decode_block(encoding, bytes, limit, what))
        .await?;
    Ok((
        claimed,
        decoded,
        Ingesting {
            _body: memory,
            _slot: slot,
        },
    ))
}

/// The body's `Content-Encoding`: identity or zstd, else 415 `unsupported_content_encoding`.
fn content_encoding(headers: &HeaderMap) -> Result<BodyEncoding, Error> {
    let value = headers
        .get(axum::http::header::CONTENT_ENCODING)
        .map(|v| v.as_bytes());
    Ok(BodyEncoding::from_header(value)?)
}

fn octets(bytes: bytes::Bytes) -> Response {
    let mut resp = Body::from(bytes).into_response();
    resp.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/octet-stream"),
    );
    resp
}
