//! The API's OpenAPI 3.1 description, generated from the code: the bodies' schemas come from
//! the wire types' `ToSchema` derives, each operation from the `#[utoipa::path]` attribute on
//! its handler. [`document`] is what `GET /v1/openapi.json` serves, `drvault openapi` prints and
//! `docs/openapi.json` holds (a test fails when they differ).
//!
//! The statuses every operation shares are added here once ([`Conventions`]) rather than on
//! each handler: 401/403 on every authenticated route (the bearer extractors run before
//! anything else), 400 on any route with a path, query or body to refuse, 404 on any route
//! naming a resource in its path, 413 on any JSON body, and the back-pressure and failure
//! statuses (429, 500, 503) any request can meet. Each handler lists what is particular to it.

use axum::http::header;
use axum::response::{IntoResponse, Response};
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use super::routes::{
    accounts, agents, failback, failover, hosts, ingest, jobs, networks, plans, points, resync,
    scrub, system, vms,
};
use super::{audit_layer, console, keys};
use crate::wire::ErrorBody;

/// The name of the bearer-token security scheme (the `security` attribute repeats it: it
/// takes a literal).
const BEARER: &str = "bearer";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "drvault",
        description = "The storage side of Hyper-V-style disaster-recovery replication: host \
            agents replicate disks and change logs, operators read recovery points, fail over and \
            back. Every route needs `Authorization: Bearer TOKEN` (account, host or provider \
            token, see docs/api.md; an account token acts with its role) except /healthz, /metrics, /v1/openapi.json and the console's \
            static files. Errors are `ErrorBody` with a machine-readable `code`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        system::healthz,
        system::metrics,
        system::server_info,
        system::servers,
        openapi_json,
        console::index,
        console::app_js,
        console::app_css,
        console::favicon,
        hosts::list_hosts,
        hosts::add_host,
        hosts::remove_host,
        hosts::set_throttle,
        hosts::list_providers,
        hosts::add_provider,
        hosts::remove_provider,
        hosts::rotate_host_token,
        hosts::rotate_provider_token,
        accounts::whoami,
        accounts::list_accounts,
        accounts::add_account,
        accounts::remove_account,
        accounts::rotate_token,
        audit_layer::list_audit,
        vms::list_vms,
        vms::get_vm,
        vms::set_vm_policy,
        vms::disable_vm,
        vms::get_map,
        vms::get_block,
        console::vm_nics,
        vms::set_nic_override,
        vms::clear_nic_override,
        jobs::list_jobs,
        jobs::get_job,
        jobs::resume_job,
        ingest::enable_protection,
        ingest::agent_get_vm,
        ingest::agent_query_blocks,
        ingest::agent_put_block,
        ingest::agent_complete_disk,
        ingest::agent_put_log,
        agents::heartbeat,
        points::list_points,
        points::merge_vm,
        failover::start_failover,
        failover::show_failover,
        failover::cleanup_failover,
        failover::commit_failover,
        failover::cancel_failover,
        networks::show_network,
        plans::list_plans,
        plans::create_plan,
        plans::get_plan,
        plans::start_plan,
        resync::start_resync,
        resync::show_resync,
        resync::cancel_resync,
        resync::agent_resync_view,
        resync::agent_resync_hashes,
        resync::agent_resync_fine,
        resync::agent_resync_patch,
        resync::agent_resync_complete,
        failback::show_failback,
        failback::commit_failback,
        failback::agent_failback_view,
        failback::agent_failback_hashes,
        failback::agent_failback_fine,
        failback::agent_failback_ranges,
        failback::agent_failback_complete,
        scrub::start_verify,
        scrub::verify_report,
        scrub::damage_register,
        scrub::start_gc,
        scrub::gc_report,
        keys::list_keys,
        keys::rotate_key,
    ),
    components(schemas(ErrorBody)),
    security(("bearer" = [])),
    modifiers(&Conventions),
    tags(
        (name = "system", description = "Health, metrics, server information, this document"),
        (name = "console", description = "The web console's static files"),
        (name = "hosts", description = "Hosts and providers (admin; lists: viewer)"),
        (name = "accounts", description = "Operator accounts and roles (admin; whoami and the list: viewer)"),
        (name = "audit", description = "The audit log of operator actions (viewer)"),
        (name = "vms", description = "Protected VMs, their disks, maps and blocks (operator)"),
        (name = "jobs", description = "Jobs (operator)"),
        (name = "agent", description = "Host agent routes (host or provider token)"),
        (name = "points", description = "Recovery points and merges (operator)"),
        (name = "failover", description = "Failover, networks and recovery plans (operator)"),
        (name = "resync", description = "Resynchronization (operator and agent)"),
        (name = "failback", description = "Failback (operator and agent)"),
        (name = "scrub", description = "Verify, garbage collection, damage (operator)"),
        (name = "keys", description = "Sealing keys (operator)"),
    )
)]
struct ApiDoc;

/// The whole document.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The document as served and committed: pretty JSON with a final newline.
pub fn document_json() -> String {
    let mut s = document()
        .to_pretty_json()
        // Serializing maps and strings to JSON cannot fail.
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    s.push('\n');
    s
}

/// The API's description (OpenAPI 3.1), public like /healthz: it says what the routes are, not
/// anything about this vault.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "system",
    security(()),
    responses((status = 200, description = "This document", content_type = "application/json", body = Object))
)]
pub async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        document_json(),
    )
        .into_response()
}

/// Path parameters shared by many operations: one struct per shape of path, so every route
/// names and constrains `{vm}`, `{disk}`, … the same way. A name is 1-64 characters from
/// `A-Z a-z 0-9 . _ -`, the first a letter or digit (400 `invalid_name` otherwise); the
/// examples are the names docs/api.md uses.
pub mod params {
    use utoipa::IntoParams;

    #[derive(IntoParams)]
    #[into_params(parameter_in = Path)]
    #[allow(dead_code)]
    pub struct Vm {
        /// The VM's name.
        #[param(pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", example = "web01")]
        pub vm: String,
    }

    #[derive(IntoParams)]
    #[into_params(parameter_in = Path)]
    #[allow(dead_code)]
    pub struct Disk {
        /// The VM's name.
        #[param(pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", example = "web01")]
        pub vm: String,
        /// The disk's id within the VM.
        #[param(pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", example = "os")]
        pub disk: String,
    }

    #[derive(IntoParams)]
    #[into_params(parameter_in = Path)]
    #[allow(dead_code)]
    pub struct Block {
        /// The VM's name.
        #[param(pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", example = "web01")]
        pub vm: String,
        /// The disk's id within the VM.
        #[param(pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", example = "os")]
        pub disk: String,
        /// The block's index (0-based, in units of the disk's block size).
        #[param(example = 0)]
        pub index: u64,
    }

    #[derive(IntoParams)]
    #[into_params(parameter_in = Path)]
    #[allow(dead_code)]
    pub struct Log {
        /// The VM's name.
        #[param(pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", example = "web01")]
        pub vm: String,
        /// The disk's id within the VM.
        #[param(pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", example = "os")]
        pub disk: String,
        /// The MS-HRL log's UniqueId (a GUID).
        #[param(example = "6c1f0e3a-2b4d-4e8f-9a10-112233445566")]
        pub log_id: String,
    }

    #[derive(IntoParams)]
    #[into_params(parameter_in = Path)]
    #[allow(dead_code)]
    pub struct Nic {
        /// The VM's name.
        #[param(pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", example = "web01")]
        pub vm: String,
        /// The NIC's position in the VM's NIC list.
        #[param(example = 0)]
        pub index: u32,
    }

    /// A host, provider, plan or network name.
    #[derive(IntoParams)]
    #[into_params(parameter_in = Path)]
    #[allow(dead_code)]
    pub struct Named {
        #[param(pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", example = "hv01")]
        pub name: String,
    }

    #[derive(IntoParams)]
    #[into_params(parameter_in = Path)]
    #[allow(dead_code)]
    pub struct Network {
        /// A target network of the server's configuration.
        #[param(pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", example = "drill-vnet")]
        pub network: String,
    }

    #[derive(IntoParams)]
    #[into_params(parameter_in = Path)]
    #[allow(dead_code)]
    pub struct JobId {
        /// The job's id (a UUID; 400 `invalid_job_id` otherwise).
        #[param(
            pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
            example = "00000000-0000-4000-8000-000000000000"
        )]
        pub id: String,
    }

    #[derive(IntoParams)]
    #[into_params(parameter_in = Path)]
    #[allow(dead_code)]
    pub struct ReportJob {
        /// The verify or collection job's id (a UUID; 400 `invalid_job_id` otherwise).
        #[param(
            pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
            example = "00000000-0000-4000-8000-000000000000"
        )]
        pub job: String,
    }

    /// Header naming the host a provider acts for.
    #[derive(IntoParams)]
    #[into_params(parameter_in = Header)]
    #[allow(dead_code)]
    pub struct ActingHost {
        /// With a provider token: the host of the provider's cloud this request acts for
        /// (`X-Drvault-Host`); ignored with a host token.
        #[param(
            rename = "X-Drvault-Host",
            pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
        )]
        pub acting_host: Option<String>,
    }
}

/// Adds the statuses every operation shares (see the module doc), as references to one
/// response each under `components.responses`, and the bearer security scheme.
struct Conventions;

/// Shared error responses: (status, component name, description).
const SHARED: [(&str, &str, &str); 8] = [
    ("400", "BadRequest", "Refused input: `invalid_name`, `invalid_query`, `invalid_json`, `invalid_job_id`, `invalid_index` or the operation's own codes (docs/api.md); nothing was changed"),
    ("401", "Unauthorized", "`unauthorized`: missing, malformed, unknown or revoked token"),
    ("403", "Forbidden", "`forbidden`: the wrong kind of token for the route, another host's VM, or a provider outside its cloud"),
    ("404", "NotFound", "A resource the path names does not exist: `vm_not_found`, `disk_not_found`, `host_not_found`, `job_not_found`, …"),
    ("413", "TooLarge", "`body_too_large`: a JSON body over 16 MiB"),
    ("429", "Busy", "`record_contended`, `rate_limited`, `key_exhausted` or `connection_limit` (recoverable; `Retry-After` says when)"),
    ("500", "ServerError", "`corrupt_object`, `object_missing` (vault damage, never served as data) or `internal`"),
    ("503", "Unavailable", "`store_unavailable`, `store_full`, `output_not_writable` or `cleanup_failed` (recoverable; `Retry-After`)"),
];

impl Modify for Conventions {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let components = api.components.get_or_insert_with(Default::default);
        components.security_schemes.insert(
            BEARER.into(),
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        for (_, name, description) in SHARED {
            let content = ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build();
            components.responses.insert(
                name.into(),
                RefOr::T(
                    ResponseBuilder::new()
                        .description(description)
                        .content("application/json", content)
                        .build(),
                ),
            );
        }
        for item in api.paths.paths.values_mut() {
            for op in operations(item) {
                add_shared(op);
            }
        }
    }
}

fn operations(item: &mut utoipa::openapi::PathItem) -> Vec<&mut Operation> {
    [
        &mut item.get,
        &mut item.put,
        &mut item.post,
        &mut item.delete,
        &mut item.patch,
    ]
    .into_iter()
    .filter_map(|o| o.as_mut())
    .collect()
}

fn add_shared(op: &mut Operation) {
    use utoipa::openapi::path::ParameterIn;
    // `security(())` on a handler marks it public; the rest take the document's bearer token.
    let public = op.security.is_some();
    let params = op.parameters.as_deref().unwrap_or(&[]);
    let in_path = params
        .iter()
        .any(|p| matches!(p.parameter_in, ParameterIn::Path));
    let json_body = op
        .request_body
        .as_ref()
        .is_some_and(|b| b.content.contains_key("application/json"));
    let refusable = !params.is_empty() || op.request_body.is_some();
    let wanted = [
        ("400", refusable),
        ("401", !public),
        ("403", !public),
        ("404", in_path),
        ("413", json_body),
        ("429", true),
        ("500", !public),
        ("503", !public),
    ];
    for (status, want) in wanted {
        if !want || op.responses.responses.contains_key(status) {
            continue;
        }
        let Some((_, name, _)) = SHARED.iter().find(|(s, _, _)| *s == status) else {
            continue;
        };
        op.responses.responses.insert(
            status.into(),
            RefOr::Ref(Ref::new(format!("#/components/responses/{name}"))),
        );
    }
}

/// A binary body (a block, a resync patch, a change log, packed hashes or ranges), sent as
/// `application/octet-stream`.
pub struct Octets;

impl utoipa::PartialSchema for Octets {
    fn schema() -> RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Binary)))
            .into()
    }
}

impl utoipa::ToSchema for Octets {}
