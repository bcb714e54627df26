//! Recording operator actions in the audit log ([`crate::audit`]), and `GET /v1/audit`.
//!
//! [`record`] wraps every route. It lets reads (GET, HEAD) and agent routes (`/v1/agent/…`)
//! through untouched, except enabling protection (`PUT /v1/agent/vms/{vm}`, action
//! `vm.protect`), the one agent call that changes what is protected. Every other request that
//! changes something is recorded once answered, refused ones included (401 as actor
//! `unknown`): who (the token's account, see [`crate::audit::actor_name`]), the action named
//! from the route template ([`describe`]), the target from the path (or the body's `name` for
//! what a POST creates), the peer address, the status, the error code of an error answer and
//! the job a 202 answer started.
//!
//! The entry is written before the answer goes out, so an operator who reads the log after an
//! action sees it. When the write fails the answer still goes out unchanged (see the audit
//! module: the entry stays queued and is retried).

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use futures_util::StreamExt;

use super::auth::Viewer;
use super::error::ApiResult;
use super::extract::Query;
use super::AppState;
use crate::audit::{actor_name, Action, AuditList, AuditQuery};

/// The most of a request body kept to name the action (`kind` of a failover, `name` of what
/// is created): those bodies are a few hundred bytes.
const BODY_PEEK: usize = 64 * 1024;
/// Longest path value copied into an entry (a refused request may carry anything).
const MAX_VALUE: usize = 128;

pub(super) fn routes() -> Router<AppState> {
    Router::new().route("/v1/audit", get(list_audit))
}

#[utoipa::path(
    get,
    path = "/v1/audit",
    tag = "audit",
    summary = "The audit log: who did what, when, from where, with what result",
    params(crate::wire::AuditQuery),
    responses(
        (status = 200, description = "Entries in sequence order", body = crate::wire::AuditList),
        (status = 400, description = "`invalid_limit`, `invalid_since`, `invalid_query`", body = crate::wire::ErrorBody),
    )
)]
async fn list_audit(
    _: Viewer,
    State(s): State<AppState>,
    Query(q): Query<AuditQuery>,
) -> ApiResult<Json<AuditList>> {
    Ok(Json(
        s.audit.list(&q).await.map_err(crate::error::Error::from)?,
    ))
}

/// Whether a request to `template` with `method` is recorded.
fn recorded(method: &Method, template: &str) -> bool {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return false;
    }
    if template == "/v1/agent/vms/{vm}" {
        return *method == Method::PUT;
    }
    template.starts_with("/v1/") && !template.starts_with("/v1/agent/")
}

pub async fn record(
    State(s): State<AppState>,
    matched: Option<MatchedPath>,
    req: Request,
    next: Next,
) -> Response {
    let Some(template) = matched.map(|m| m.as_str().to_string()) else {
        return next.run(req).await;
    };
    let method = req.method().clone();
    if !recorded(&method, &template) {
        return next.run(req).await;
    }
    let actor = match bearer(&req) {
        Some(t) => match s.registry.resolve_token(&t).await {
            Some(who) => actor_name(&who),
            None => "unknown".to_string(),
        },
        None => "unknown".to_string(),
    };
    let from = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string())
        .unwrap_or_else(|| "unknown".to_string());
    let params = path_params(&template, req.uri().path());

    // The start of the body is read here (a refused request's handler never reads it) and
    // handed on, followed by the rest: the handler sees the body as it was sent.
    let (parts, body) = req.into_parts();
    let mut rest = body.into_data_stream().fuse();
    let mut head: Vec<Result<bytes::Bytes, axum::Error>> = Vec::new();
    let mut peeked = Vec::new();
    while peeked.len() < BODY_PEEK {
        match rest.next().await {
            Some(Ok(b)) => {
                let room = BODY_PEEK - peeked.len();
                peeked.extend_from_slice(&b[..b.len().min(room)]);
                head.push(Ok(b));
            }
            Some(Err(e)) => {
                head.push(Err(e));
                break;
            }
            None => break,
        }
    }
    let body = Body::from_stream(futures_util::stream::iter(head).chain(rest));
    let resp = next.run(Request::from_parts(parts, body)).await;

    let (parts, body) = resp.into_parts();
    // Answers of these routes are small JSON documents built in memory.
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let answer: Option<serde_json::Value> = serde_json::from_slice(&bytes).ok();
    let status = parts.status.as_u16();
    let request: Option<serde_json::Value> = serde_json::from_slice(&peeked).ok();
    let (action, target) = describe(&method, &template, &params, request.as_ref());
    let field = |name: &str| {
        answer
            .as_ref()
            .and_then(|a| a.get(name))
            .and_then(|v| v.as_str())
            .map(|v| clip(v).to_string())
    };
    let entry = Action {
        actor,
        action,
        target,
        from,
        status,
        code: if status >= 400 { field("code") } else { None },
        job: if status < 400 { field("job") } else { None },
    };
    // A failure is logged, counted and retried by the log itself; the answer stands.
    let _ = s.audit.append(entry).await;
    Response::from_parts(parts, Body::from(bytes))
}

fn bearer(req: &Request) -> Option<String> {
    let h = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let t = h.strip_prefix("Bearer ")?;
    (!t.is_empty() && t.len() <= 256).then(|| t.to_string())
}

/// The values of the template's `{params}` in `path`, as sent (bounded).
fn path_params(template: &str, path: &str) -> Vec<(String, String)> {
    template
        .split('/')
        .zip(path.split('/'))
        .filter_map(|(t, p)| {
            let name = t.strip_prefix('{')?.strip_suffix('}')?;
            Some((name.to_string(), clip(p).to_string()))
        })
        .collect()
}

fn clip(s: &str) -> &str {
    match s.char_indices().nth(MAX_VALUE) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// The action's name and target. Known routes have fixed names (docs/api.md lists them); any
/// other changing route (one added later) is named from its template's words and method, so
/// nothing that changes state goes unrecorded.
pub fn describe(
    method: &Method,
    template: &str,
    params: &[(String, String)],
    body: Option<&serde_json::Value>,
) -> (String, String) {
    let param = |name: &str| {
        params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or("?")
    };
    let body_str = |name: &str| {
        body.and_then(|b| b.get(name))
            .and_then(|v| v.as_str())
            .map(|v| clip(v).to_string())
    };
    let kind = || body_str("kind").unwrap_or_else(|| "unknown".into());
    let vm = || format!("vm/{}", param("vm"));
    let (action, target): (String, String) = match (method.as_str(), template) {
        ("PUT", "/v1/agent/vms/{vm}") => ("vm.protect".into(), vm()),
        ("POST", "/v1/vms/{vm}/failover") => (format!("failover.{}", kind()), vm()),
        ("POST", "/v1/vms/{vm}/failover/cleanup") => ("failover.cleanup".into(), vm()),
        ("POST", "/v1/vms/{vm}/failover/commit") => ("failover.commit".into(), vm()),
        ("POST", "/v1/vms/{vm}/failover/cancel") => ("failover.cancel".into(), vm()),
        ("POST", "/v1/vms/{vm}/failback/commit") => ("failback.commit".into(), vm()),
        ("POST", "/v1/vms/{vm}/resync") => ("resync.start".into(), vm()),
        ("POST", "/v1/vms/{vm}/resync/cancel") => ("resync.cancel".into(), vm()),
        ("POST", "/v1/vms/{vm}/merge") => ("vm.merge".into(), vm()),
        ("PATCH", "/v1/vms/{vm}") => ("vm.policy".into(), vm()),
        ("POST", "/v1/vms/{vm}/disable") => ("vm.disable".into(), vm()),
        ("PUT", "/v1/vms/{vm}/nics/{index}") => (
            "vm.nic.set".into(),
            format!("vm/{}/nic/{}", param("vm"), param("index")),
        ),
        ("DELETE", "/v1/vms/{vm}/nics/{index}") => (
            "vm.nic.clear".into(),
            format!("vm/{}/nic/{}", param("vm"), param("index")),
        ),
        ("POST", "/v1/hosts") => (
            "host.add".into(),
            format!("host/{}", body_str("name").unwrap_or_else(|| "?".into())),
        ),
        ("DELETE", "/v1/hosts/{name}") => ("host.remove".into(), format!("host/{}", param("name"))),
        ("PUT", "/v1/hosts/{name}/throttle") => {
            ("host.throttle".into(), format!("host/{}", param("name")))
        }
        ("POST", "/v1/providers") => (
            "provider.add".into(),
            format!(
                "provider/{}",
                body_str("name").unwrap_or_else(|| "?".into())
            ),
        ),
        ("DELETE", "/v1/providers/{name}") => (
            "provider.remove".into(),
            format!("provider/{}", param("name")),
        ),
        ("POST", "/v1/plans") => (
            "plan.create".into(),
            format!("plan/{}", body_str("name").unwrap_or_else(|| "?".into())),
        ),
        ("POST", "/v1/plans/{name}/failover") => (
            format!("plan.failover.{}", kind()),
            format!("plan/{}", param("name")),
        ),
        ("POST", "/v1/jobs/{id}/resume") => ("job.resume".into(), format!("job/{}", param("id"))),
        ("POST", "/v1/verify") => (
            "verify".into(),
            body_str("vm").map_or_else(|| "vault".into(), |v| format!("vm/{v}")),
        ),
        ("POST", "/v1/gc") => {
            let dry = body
                .and_then(|b| b.get("dry_run"))
                .and_then(|v| v.as_bool())
                .unwrap_or(false);
            (if dry { "gc.dry_run" } else { "gc" }.into(), "vault".into())
        }
        ("POST", "/v1/keys/rotate") => ("key.rotate".into(), "vault".into()),
        ("POST", "/v1/accounts") => (
            "account.add".into(),
            format!("account/{}", body_str("name").unwrap_or_else(|| "?".into())),
        ),
        ("DELETE", "/v1/accounts/{name}") => (
            "account.remove".into(),
            format!("account/{}", param("name")),
        ),
        ("POST", "/v1/accounts/{name}/token") => (
            "account.rotate_token".into(),
            format!("account/{}", param("name")),
        ),
        ("POST", "/v1/hosts/{name}/token") => (
            "host.rotate_token".into(),
            format!("host/{}", param("name")),
        ),
        ("POST", "/v1/providers/{name}/token") => (
            "provider.rotate_token".into(),
            format!("provider/{}", param("name")),
        ),
        _ => generic(method, template, params, body_str("name")),
    };
    (action, target)
}

/// A changing route the table does not name, so that none goes unrecorded:
/// `POST /v1/things/{name}/reset` → (`things.reset.post`, `things/<name>`).
fn generic(
    method: &Method,
    template: &str,
    params: &[(String, String)],
    name: Option<String>,
) -> (String, String) {
    let segments: Vec<&str> = template
        .split('/')
        .filter(|s| !s.is_empty())
        .skip(1)
        .collect();
    let words: Vec<&str> = segments
        .iter()
        .copied()
        .filter(|s| !s.starts_with('{'))
        .collect();
    let action = format!(
        "{}.{}",
        words.join("."),
        method.as_str().to_ascii_lowercase()
    );
    let family = words.first().copied().unwrap_or("v1");
    let target = match (params.first(), name) {
        (Some((_, v)), _) => format!("{family}/{v}"),
        (None, Some(n)) => format!("{family}/{n}"),
        (None, None) => family.to_string(),
    };
    (action, target)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(method: Method, template: &str, path: &str, body: &str) -> (String, String) {
        let params = path_params(template, path);
        describe(
            &method,
            template,
            &params,
            serde_json::from_str(body).ok().as_ref(),
        )
    }

    #[test]
    fn actions_and_targets_come_from_the_route_and_the_body() {
        assert_eq!(
            named(
                Method::POST,
                "/v1/vms/{vm}/failover",
                "/v1/vms/web01/failover",
                r#"{"kind":"test"}"#
            ),
            ("failover.test".into(), "vm/web01".into())
        );
        assert_eq!(
            named(Method::POST, "/v1/hosts", "/v1/hosts", r#"{"name":"hv01"}"#),
            ("host.add".into(), "host/hv01".into())
        );
        assert_eq!(
            named(
                Method::POST,
                "/v1/accounts/{name}/token",
                "/v1/accounts/alice/token",
                ""
            ),
            ("account.rotate_token".into(), "account/alice".into())
        );
        assert_eq!(
            named(
                Method::POST,
                "/v1/things/{name}/reset",
                "/v1/things/x/reset",
                ""
            ),
            ("things.reset.post".into(), "things/x".into())
        );
        assert!(!recorded(&Method::GET, "/v1/vms"));
        assert!(!recorded(&Method::POST, "/v1/agent/heartbeat"));
        assert!(recorded(&Method::PUT, "/v1/agent/vms/{vm}"));
        assert!(recorded(&Method::DELETE, "/v1/hosts/{name}"));
    }
}
