//! The operator console: a static page (HTML, one CSS file, one vanilla ES2020 module, an SVG
//! icon) compiled into the binary and served on the API's own port.
//!
//! Decisions:
//! - The assets carry no secret and no data, so they need no token; the page asks the operator
//!   for the operator token, keeps it in `sessionStorage` (gone with the tab) and sends it as
//!   `Authorization: Bearer` on every `/v1/` call, exactly like the CLI. Nothing here reads or
//!   sets a cookie, so there is no ambient authority to forge requests with.
//! - Every figure the page shows comes from the API; business rules (health, RPO, thresholds)
//!   stay on the server. The page only formats, sorts and plots. The one exception is saying
//!   ahead of time why an action would be refused (the caller's role from `/v1/whoami`, the
//!   VM's failover state), so a button is disabled with its reason instead of failing after
//!   its dialog; the server still decides.
//! - `Content-Security-Policy` allows scripts, styles and fetches from this origin only and no
//!   inline script or style (charts are SVG elements made with DOM calls), so an injected string
//!   can neither run nor exfiltrate; `frame-ancestors 'none'` stops click-jacking of the failover
//!   buttons.
//! - `Cache-Control: no-cache` makes a browser revalidate after an upgrade instead of running an
//!   old script against a new API.
//! - `GET /v1/vms/{vm}/nics` (where each NIC lands on failover) lives here because the console is
//!   its first user; it is an ordinary operator route, documented with the others.

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::auth::Viewer;
use super::error::ApiResult;
use super::extract::CallerVm;
use super::AppState;
use crate::catalog::VmRecord;
use crate::failover::network::NetworkConfig;
pub use crate::wire::NicMappingView;

const INDEX_HTML: &str = include_str!("console/index.html");
const APP_JS: &str = include_str!("console/app.js");
const APP_CSS: &str = include_str!("console/app.css");
const FAVICON_SVG: &str = include_str!("console/favicon.svg");

/// The policy every console response carries (documented in docs/api.md).
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

/// `GET /`: the page.
#[utoipa::path(
    get,
    path = "/",
    tag = "console",
    summary = "The web console's page",
    security(()),
    responses(
        (status = 200, description = "The file", body = String, content_type = "text/html"),
    )
)]
pub async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

/// `GET /console/app.js`: the page's one module.
#[utoipa::path(
    get,
    path = "/console/app.js",
    tag = "console",
    summary = "The console's script",
    security(()),
    responses(
        (status = 200, description = "The file", body = String, content_type = "text/javascript"),
    )
)]
pub async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

/// `GET /console/app.css`.
#[utoipa::path(
    get,
    path = "/console/app.css",
    tag = "console",
    summary = "The console's style sheet",
    security(()),
    responses(
        (status = 200, description = "The file", body = String, content_type = "text/css"),
    )
)]
pub async fn app_css() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}

/// `GET /console/favicon.svg`.
#[utoipa::path(
    get,
    path = "/console/favicon.svg",
    tag = "console",
    summary = "The console's icon",
    security(()),
    responses(
        (status = 200, description = "The file", body = String, content_type = "image/svg+xml"),
    )
)]
pub async fn favicon() -> Response {
    asset("image/svg+xml", FAVICON_SVG)
}

/// Where each NIC lands, by the rules of `failover::definition`: a NIC override's target wins
/// for planned and unplanned failovers only; drills always use the mapping's test target. The
/// override target is shown as stored: an unknown subnet is refused at failover, not here.
pub fn nic_mappings(rec: &VmRecord, config: &NetworkConfig) -> Vec<NicMappingView> {
    let joined = |t: Option<(
        &crate::failover::network::TargetNetwork,
        &crate::failover::network::Subnet,
    )>| t.map(|(n, s)| format!("{}/{}", n.name(), s.name()));
    (0u32..)
        .zip(&rec.spec.nics)
        .map(|(index, nic)| {
            let o = rec.nic_overrides.get(&index).cloned().unwrap_or_default();
            let (failover_target, from) = match &o.target {
                Some(t) => (Some(t.clone()), Some("override")),
                None => {
                    let t = joined(config.target_for(&nic.network, false));
                    let from = t.as_ref().map(|_| "mapping");
                    (t, from)
                }
            };
            NicMappingView {
                index,
                network: nic.network.clone(),
                mac: nic.mac.clone(),
                ip: nic.ip.clone(),
                failover_target,
                failover_target_from: from.map(str::to_string),
                test_target: joined(config.target_for(&nic.network, true)),
                static_ip: o.static_ip,
                public_ip: o.public_ip,
                skip: o.skip,
            }
        })
        .collect()
}

/// `GET /v1/vms/{vm}/nics` (operator).
#[utoipa::path(
    get,
    path = "/v1/vms/{vm}/nics",
    tag = "vms",
    summary = "Where each of a VM's NICs lands on failover",
    params(crate::api::openapi::params::Vm),
    responses(
        (status = 200, description = "One entry per NIC", body = Vec<crate::wire::NicMappingView>),
    )
)]
pub async fn vm_nics(
    _: Viewer,
    State(s): State<AppState>,
    CallerVm { record: rec, .. }: CallerVm,
) -> ApiResult<Json<Vec<NicMappingView>>> {
    Ok(Json(nic_mappings(&rec, s.failovers.networks())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_asset_has_its_type_and_the_security_headers() {
        for (resp, ty) in [
            (index().await, "text/html; charset=utf-8"),
            (app_js().await, "text/javascript; charset=utf-8"),
            (app_css().await, "text/css; charset=utf-8"),
            (favicon().await, "image/svg+xml"),
        ] {
            let h = resp.headers();
            assert_eq!(h[header::CONTENT_TYPE], ty);
            assert_eq!(h[header::CACHE_CONTROL], "no-cache");
            assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
            assert_eq!(h[header::CONTENT_SECURITY_POLICY], CONTENT_SECURITY_POLICY);
        }
    }

    #[test]
    fn the_page_has_no_inline_script_or_style_the_policy_would_block() {
        // The policy forbids inline code; a page relying on it would silently break.
        assert!(!INDEX_HTML.contains("<script>"));
        assert!(!INDEX_HTML.contains(" style="));
        assert!(!INDEX_HTML.contains("<style"));
        assert!(INDEX_HTML.contains(r#"<script type="module" src="/console/app.js">"#));
        assert!(
            !APP_JS.contains("innerHTML"),
            "text goes in with textContent"
        );
        assert!(!CONTENT_SECURITY_POLICY.contains("unsafe"));
    }

    fn record(nics: &[(&str, &str)]) -> VmRecord {
        let spec = serde_json::json!({
            "disks": [{"id": "os", "size": 1048576}],
            "nics": nics.iter().map(|(net, mac)| serde_json::json!({"network": net, "mac": mac, "ip": "10.0.0.5"})).collect::<Vec<_>>(),
        });
        VmRecord {
            name: "web".into(),
            id: "id".into(),
            owner: "hv".into(),
            spec: serde_json::from_value(spec).unwrap(),
            state: crate::catalog::VmState::Protected,
            warnings: vec![],
            created_unix: 0,
            protected_unix: None,
            enable_job: "j".into(),
            finalize_job: None,
            disabled_unix: None,
            removed_disks: Vec::new(),
            nic_overrides: Default::default(),
            fence: 0,
        }
    }

    const NETWORKS: &str = r#"
[[network]]
name = "rec"
address_space = ["10.20.0.0/16"]
  [[network.subnet]]
  name = "app"
  prefix = "10.20.1.0/24"
  [[network.subnet]]
  name = "db"
  prefix = "10.20.2.0/24"
[[network]]
name = "drill"
address_space = ["10.99.0.0/16"]
isolated = true
  [[network.subnet]]
  name = "app"
  prefix = "10.99.1.0/24"
[[mapping]]
source = "corp"
target = "rec/app"
test_target = "drill/app"
[[mapping]]
source = "dmz"
target = "rec/db"
"#;

    #[test]
    fn nics_show_the_mapping_the_override_and_what_is_unmapped() {
        let config = NetworkConfig::from_toml(NETWORKS).unwrap();
        let mut rec = record(&[
            ("corp", "00:15:5d:00:00:01"),
            ("corp", "00:15:5d:00:00:02"),
            ("dmz", "00:15:5d:00:00:03"),
            ("lost", "00:15:5d:00:00:04"),
        ]);
        rec.nic_overrides.insert(
            1,
            crate::failover::definition::NicOptions {
                target: Some("rec/db".into()),
                static_ip: Some("10.20.2.9".parse().unwrap()),
                ..Default::default()
            },
        );
        rec.nic_overrides.insert(
            3,
            crate::failover::definition::NicOptions {
                skip: true,
                ..Default::default()
            },
        );
        let v = nic_mappings(&rec, &config);
        assert_eq!(v.len(), 4);
        assert_eq!(v[0].failover_target.as_deref(), Some("rec/app"));
        assert_eq!(v[0].failover_target_from.as_deref(), Some("mapping"));
        assert_eq!(v[0].test_target.as_deref(), Some("drill/app"));
        // The override moves planned/unplanned failovers only; drills keep the test target.
        assert_eq!(v[1].failover_target.as_deref(), Some("rec/db"));
        assert_eq!(v[1].failover_target_from.as_deref(), Some("override"));
        assert_eq!(v[1].test_target.as_deref(), Some("drill/app"));
        assert_eq!(v[1].static_ip, Some("10.20.2.9".parse().unwrap()));
        // A mapping without a test target: drills of this NIC would be refused.
        assert_eq!(v[2].failover_target.as_deref(), Some("rec/db"));
        assert_eq!(v[2].test_target, None);
        // No mapping at all, and skipped.
        assert_eq!(
            (v[3].failover_target.clone(), v[3].test_target.clone()),
            (None, None)
        );
        assert!(v[3].skip && !v[0].skip);
        assert_eq!(v[3].index, 3);
        assert_eq!(v[3].mac, "00:15:5d:00:00:04");
    }
}
