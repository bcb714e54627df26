//! Target networks (operator): what a host needs to set one up for failed-over VMs.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};

use crate::api::auth::Viewer;
use crate::api::error::ApiResult;
use crate::api::extract::NetworkName;
use crate::api::AppState;
use crate::wire::HostNetworkView;

pub(super) fn routes() -> Router<AppState> {
    Router::new().route("/v1/networks/{network}", get(show_network))
}

#[utoipa::path(
    get,
    path = "/v1/networks/{network}",
    tag = "failover",
    summary = "A target network as a host sets it up",
    params(crate::api::openapi::params::Network),
    responses(
        (status = 200, description = "The network with its reservations", body = crate::wire::HostNetworkView),
    )
)]
async fn show_network(
    _: Viewer,
    State(s): State<AppState>,
    NetworkName(name): NetworkName,
) -> ApiResult<Json<HostNetworkView>> {
    Ok(Json(s.failovers.host_network(&name).await?))
}
