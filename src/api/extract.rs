//! Request extractors that refuse bad input with the API's JSON error body. Path segments are
//! typed: a handler taking a [`VmName`], [`DiskName`] or [`BlockIndex`] gets a value already
//! checked, so no handler repeats the check. Extractors run in the order of the handler's
//! arguments, so a handler listing `AgentHost`, then `VmName`, then `DiskName` refuses a bad
//! token before a bad VM name, and a bad VM name before a bad disk name.
//!
//! Each segment extractor reads its parameter by the name the route template gives it
//! (`{vm}`, `{disk}`, `{index}`, `{name}`, `{id}` or `{job}`).

use std::fmt;

use axum::body::Body;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::auth::Caller;
use super::error::ApiError;
use super::AppState;
use crate::catalog::VmRecord;
use crate::error::Error;
use crate::vault::registry::check_name;

/// Largest JSON request body.
const MAX_JSON_BODY: usize = 16 * 1024 * 1024;

/// The route's parameters, percent-decoded. axum's own extractor answers a segment that does
/// not decode to UTF-8 with a plain-text 400; here it is refused like any other bad name, with
/// the API's JSON error body.
async fn params(parts: &mut Parts) -> Result<Vec<(String, String)>, ApiError> {
    match axum::extract::Path::<Vec<(String, String)>>::from_request_parts(parts, &()).await {
        Ok(axum::extract::Path(v)) => Ok(v),
        Err(e) => {
            Err(Error::invalid("invalid_name", format!("URL path: {}", e.body_text())).into())
        }
    }
}

/// The value of the first of `keys` the matched route has.
async fn param(parts: &mut Parts, keys: &[&str]) -> Result<String, ApiError> {
    params(parts)
        .await?
        .into_iter()
        .find(|(k, _)| keys.contains(&k.as_str()))
        .map(|(_, v)| v)
        // A handler bound to a route without the parameter: a programming error.
        .ok_or_else(|| Error::internal(format!("route has no {keys:?} parameter")).into())
}

/// A name segment: checked by [`check_name`] (what a name may be, and the `invalid_name`
/// error naming the kind).
macro_rules! name_segment {
    ($(#[$doc:meta])* $ty:ident, $key:literal, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct $ty(pub String);

        impl<S: Send + Sync> FromRequestParts<S> for $ty {
            type Rejection = ApiError;
            async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
                let s = param(parts, &[$key]).await?;
                check_name($kind, &s)?;
                Ok($ty(s))
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_segment!(
    /// `{vm}`: a VM's name.
    VmName,
    "vm",
    "VM"
);
name_segment!(
    /// `{network}`: a target network's name.
    NetworkName,
    "network",
    "network"
);
name_segment!(
    /// `{disk}`: a disk's id within its VM.
    DiskName,
    "disk",
    "disk"
);
/// `{vm}/disks/{disk}`: a disk route's VM and disk, checked in that order (as two extractors
/// would), so a handler of a disk takes one argument for both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskPath {
    pub vm: String,
    pub disk: String,
}

impl<S: Send + Sync> FromRequestParts<S> for DiskPath {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let VmName(vm) = VmName::from_request_parts(parts, state).await?;
        let DiskName(disk) = DiskName::from_request_parts(parts, state).await?;
        Ok(DiskPath { vm, disk })
    }
}

name_segment!(
    /// `{name}` of `/v1/hosts/{name}`.
    HostName,
    "name",
    "host"
);
name_segment!(
    /// `{name}` of `/v1/providers/{name}`.
    ProviderName,
    "name",
    "provider"
);
name_segment!(
    /// `{name}` of `/v1/accounts/{name}`.
    AccountName,
    "name",
    "account"
);
name_segment!(
    /// `{name}` of `/v1/plans/{name}`.
    PlanName,
    "name",
    "plan"
);

fn parse_index(s: &str) -> Result<u64, Error> {
    s.parse::<u64>().map_err(|_| {
        Error::invalid(
            "invalid_index",
            format!("block index {s:?} is not a number"),
        )
    })
}

/// `{index}` of a block (or patch) route: a block number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockIndex(pub u64);

impl<S: Send + Sync> FromRequestParts<S> for BlockIndex {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        Ok(BlockIndex(parse_index(&param(parts, &["index"]).await?)?))
    }
}

/// `{index}` of `/v1/vms/{vm}/nics/{index}`: a NIC's position in the VM's definition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NicIndex(pub u32);

impl<S: Send + Sync> FromRequestParts<S> for NicIndex {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        // Refused with the same words as a block index (the API has always answered so).
        let i = parse_index(&param(parts, &["index"]).await?)?;
        let i =
            u32::try_from(i).map_err(|_| Error::invalid("invalid_index", "NIC index too large"))?;
        Ok(NicIndex(i))
    }
}

/// `{id}` of `/v1/jobs/{id}` or `{job}` of a verify or gc report: a job's UUID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for JobId {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let id = param(parts, &["id", "job"]).await?;
        if uuid::Uuid::parse_str(&id).is_err() {
            return Err(Error::invalid("invalid_job_id", format!("{id:?} is not a job id")).into());
        }
        Ok(JobId(id))
    }
}

/// `{log_id}` of a log upload, taken as sent: accepting the log checks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for LogId {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        Ok(LogId(param(parts, &["log_id"]).await?))
    }
}

/// The VM named by `{vm}` as the caller may reach it: any protected VM for the operator, only
/// the VMs its host owns for a host (or a provider acting for one). An unknown VM is
/// `vm_not_found`, another host's VM is refused (`forbidden`), as everywhere else.
pub struct CallerVm {
    pub name: String,
    pub record: VmRecord,
}

impl FromRequestParts<AppState> for CallerVm {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Self, ApiError> {
        let caller = Caller::from_request_parts(parts, s).await?;
        let VmName(name) = VmName::from_request_parts(parts, s).await?;
        let record = s.catalog.vm_for(caller.host(), &name).await?;
        Ok(CallerVm { name, record })
    }
}

/// Query parameters, refused with the API's JSON error body (`invalid_query`) when they do not
/// parse, instead of axum's plain-text 400.
pub struct Query<T>(pub T);

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
pub(crate) fn over_limit(e: &axum::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if c.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cause = c.source();
    }
    false
}

pub(crate) async fn read_json<T: DeserializeOwned>(body: Body) -> Result<T, ApiError> {
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

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use axum::routing::get;
    use axum::Router;
    use tower::ServiceExt;

    use super::*;
    use crate::api::error::ErrorBody;

    fn app() -> Router {
        Router::new()
            .route("/vms/{vm}", get(|VmName(vm): VmName| async move { vm }))
            .route(
                "/vms/{vm}/disks/{disk}/blocks/{index}",
                get(
                    |VmName(vm): VmName, DiskName(d): DiskName, BlockIndex(i): BlockIndex| async move {
                        format!("{vm}/{d}/{i}")
                    },
                ),
            )
            .route(
                "/vms/{vm}/nics/{index}",
                get(|VmName(vm): VmName, NicIndex(i): NicIndex| async move {
                    format!("{vm}#{i}")
                }),
            )
            .route("/hosts/{name}", get(|HostName(h): HostName| async move { h }))
            .route(
                "/providers/{name}",
                get(|ProviderName(p): ProviderName| async move { p }),
            )
            .route("/plans/{name}", get(|PlanName(p): PlanName| async move { p }))
            .route("/jobs/{id}", get(|JobId(j): JobId| async move { j }))
            .route("/verify/{job}", get(|JobId(j): JobId| async move { j }))
    }

    /// Status and body (the error body's code and message when it is one).
    async fn call(uri: &str) -> (StatusCode, String, Option<ErrorBody>) {
        let req = Request::builder().uri(uri).body(Body::empty()).unwrap();
        let resp = app().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        let err = serde_json::from_str::<ErrorBody>(&text).ok();
        (status, text, err)
    }

    async fn refused(uri: &str) -> ErrorBody {
        let (status, text, err) = call(uri).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {text}");
        let err = err.unwrap_or_else(|| panic!("{uri}: not the JSON error body: {text}"));
        assert!(!err.recoverable, "{uri}");
        err
    }

    const RULE: &str =
        "use 1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit";

    #[tokio::test]
    async fn good_segments_pass_through_decoded() {
        for (uri, want) in [
            ("/vms/web01", "web01"),
            ("/vms/VM_1.prod-2/disks/os/blocks/17", "VM_1.prod-2/os/17"),
            ("/vms/web%2D01/nics/3", "web-01#3"),
            ("/hosts/hv1", "hv1"),
            ("/providers/p1", "p1"),
            ("/plans/site-a", "site-a"),
            (
                "/jobs/0b0e2c35-5b44-4a47-9d0c-6c4a5f2b8f10",
                "0b0e2c35-5b44-4a47-9d0c-6c4a5f2b8f10",
            ),
            (
                "/verify/0b0e2c35-5b44-4a47-9d0c-6c4a5f2b8f10",
                "0b0e2c35-5b44-4a47-9d0c-6c4a5f2b8f10",
            ),
        ] {
            let (status, text, _) = call(uri).await;
            assert_eq!((status, text.as_str()), (StatusCode::OK, want), "{uri}");
        }
    }

    #[tokio::test]
    async fn bad_names_are_refused_with_invalid_name_naming_the_kind() {
        for (uri, message) in [
            ("/vms/%2e%2e", format!("VM name \"..\": {RULE}")),
            ("/vms/.hidden", format!("VM name \".hidden\": {RULE}")),
            ("/vms/a%2Fb", format!("VM name \"a/b\": {RULE}")),
            ("/vms/a%00b", format!("VM name \"a\\0b\": {RULE}")),
            (
                "/vms/ok/disks/..%2Fx/blocks/0",
                format!("disk name \"../x\": {RULE}"),
            ),
            ("/hosts/-x", format!("host name \"-x\": {RULE}")),
            ("/providers/a%20b", format!("provider name \"a b\": {RULE}")),
            ("/plans/%C3%A9", format!("plan name \"é\": {RULE}")),
        ] {
            let e = refused(uri).await;
            assert_eq!(
                (e.code.as_str(), e.message),
                ("invalid_name", message),
                "{uri}"
            );
        }
    }

    #[tokio::test]
    async fn segments_are_checked_in_order_vm_then_disk_then_index() {
        let e = refused("/vms/..x/disks/..y/blocks/nope").await;
        assert_eq!(e.code, "invalid_name");
        assert!(e.message.starts_with("VM name \"..x\""), "{}", e.message);
        let e = refused("/vms/ok/disks/..y/blocks/nope").await;
        assert!(e.message.starts_with("disk name \"..y\""), "{}", e.message);
        let e = refused("/vms/ok/disks/os/blocks/nope").await;
        assert_eq!(e.code, "invalid_index");
    }

    #[tokio::test]
    async fn a_segment_that_is_not_utf8_is_refused_with_the_json_body() {
        let e = refused("/vms/%FF").await;
        assert_eq!(e.code, "invalid_name");
        assert!(e.message.starts_with("URL path: "), "{}", e.message);
    }

    #[tokio::test]
    async fn bad_indexes_and_job_ids_keep_their_codes() {
        for (uri, code, message) in [
            (
                "/vms/a/disks/os/blocks/-1",
                "invalid_index",
                "block index \"-1\" is not a number",
            ),
            (
                "/vms/a/disks/os/blocks/18446744073709551616",
                "invalid_index",
                "block index \"18446744073709551616\" is not a number",
            ),
            (
                "/vms/a/nics/x",
                "invalid_index",
                "block index \"x\" is not a number",
            ),
            (
                "/vms/a/nics/4294967296",
                "invalid_index",
                "NIC index too large",
            ),
            ("/jobs/nope", "invalid_job_id", "\"nope\" is not a job id"),
            ("/verify/..", "invalid_job_id", "\"..\" is not a job id"),
        ] {
            let e = refused(uri).await;
            assert_eq!(
                (e.code.as_str(), e.message.as_str()),
                (code, message),
                "{uri}"
            );
        }
    }
}
