//! Operator routes for the vault's key ring: list keys with their seal counts, rotate to a new
//! key. Kept out of `routes.rs` so key handling reads in one place; merged into the router in
//! [`super::router`].

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};

use super::auth::{Admin, Viewer};
use super::error::ApiResult;
use super::AppState;
use crate::chunk::keys::KeyError;
use crate::error::Error;
pub use crate::wire::KeysView;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/keys", get(list_keys))
        .route("/v1/keys/rotate", post(rotate_key))
}

fn view(s: &AppState) -> KeysView {
    let keys = s.vault.keys();
    KeysView {
        active: keys.active_id(),
        keys: keys.usage(),
    }
}

#[utoipa::path(
    get,
    path = "/v1/keys",
    tag = "keys",
    summary = "The key ring (never key material)",
    responses(
        (status = 200, description = "Keys and their seal counts", body = crate::wire::KeysView),
    )
)]
async fn list_keys(_: Viewer, State(s): State<AppState>) -> Json<KeysView> {
    Json(view(&s))
}

#[utoipa::path(
    post,
    path = "/v1/keys/rotate",
    tag = "keys",
    summary = "Rotate the sealing key",
    responses(
        (status = 200, description = "The key ring with the new active key", body = crate::wire::KeysView),
        (status = 409, description = "`key_rotation_refused`", body = crate::wire::ErrorBody),
    )
)]
async fn rotate_key(_: Admin, State(s): State<AppState>) -> ApiResult<Json<KeysView>> {
    let keys = s.vault.keys().clone();
    // Writes and fsyncs the key file: off the async workers.
    let r = tokio::task::spawn_blocking(move || keys.rotate())
        .await
        .map_err(|e| Error::internal(format!("key rotation task: {e}")))?;
    match r {
        Ok(id) => {
            tracing::warn!(
                key_id = id,
                "key rotated by the operator: new objects are sealed with key {id}; back up the key file again"
            );
            Ok(Json(view(&s)))
        }
        Err(e @ KeyError::NoKeyFile) => {
            Err(Error::conflict("key_rotation_refused", e.to_string()).into())
        }
        Err(e) => {
            let message = format!("key rotation failed, nothing changed: {e}");
            Err(Error::local_write(&e, message, Error::Internal).into())
        }
    }
}
