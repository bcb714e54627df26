//! The wire contract of the `/v1/` API: every request and response body, the header names and
//! the error body, shared by the server (`api`), the client, the CLI and the agent. This module
//! depends on serde, std and utoipa's derives only (and on its own items), so a client can use
//! it without the server's modules. docs/api.md describes the routes these bodies travel on; the
//! `ToSchema` derives make their schemas in the OpenAPI document (`crate::api::openapi`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub mod accounts;
pub mod agents;
pub mod audit;
pub mod failback;
pub mod failover;
pub mod hosts;
pub mod ingest;
pub mod jobs;
pub mod keys;
pub mod networks;
pub mod plans;
pub mod points;
pub mod resync;
pub mod scrub;
pub mod server;
pub mod vms;
pub mod webhooks;

pub use accounts::*;
pub use agents::*;
pub use audit::*;
pub use failback::*;
pub use failover::*;
pub use hosts::*;
pub use ingest::*;
pub use jobs::*;
pub use keys::*;
pub use networks::*;
pub use plans::*;
pub use points::*;
pub use resync::*;
pub use scrub::*;
pub use server::*;
pub use vms::*;
pub use webhooks::*;

/// Header carrying a block's plain BLAKE3 (hex), on uploads and downloads.
pub const BLAKE3_HEADER: &str = "x-drvault-blake3";

/// `Content-Encoding` of an upload body (block, resync patch, change log) compressed with zstd.
/// Without the header a body is taken as it is (identity); any other encoding is refused with
/// 415 `unsupported_content_encoding`.
pub const ZSTD_ENCODING: &str = "zstd";

/// Header of a zstd-compressed change log upload: the log's length before compression. The
/// server decompresses no further than that, and refuses a log that does not inflate to it.
pub const PLAIN_LENGTH_HEADER: &str = "x-drvault-plain-length";

/// Header a provider uses to name the host it acts for.
pub const ACTING_HOST_HEADER: &str = "x-drvault-host";

/// The JSON body of every error response (documented in docs/api.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
    pub recoverable: bool,
    /// With `lease_held`: the URL of the server that holds the VM; send the request there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_url: Option<String>,
}

/// OpenAPI schemas of the bodies that hold JSON pairs (`[a, b]`): utoipa writes a Rust tuple as
/// `prefixItems` without a length, so `[]` or `[1]` would pass for a pair; these pin it to two.
pub(crate) mod pair_schemas {
    use utoipa::openapi::schema::{
        ArrayBuilder, ArrayItems, KnownFormat, ObjectBuilder, Schema, SchemaFormat, Type,
    };
    use utoipa::openapi::{Array, RefOr};

    fn unsigned(format: KnownFormat) -> Schema {
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .format(Some(SchemaFormat::KnownFormat(format)))
            .minimum(Some(0))
            .into()
    }

    fn list_of_pairs(first: Schema, second: Schema) -> Array {
        let pair = ArrayBuilder::new()
            .prefix_items([first, second])
            .items(ArrayItems::False)
            .min_items(Some(2))
            .max_items(Some(2))
            .build();
        ArrayBuilder::new()
            .items(RefOr::T(Schema::Array(pair)))
            .build()
    }

    /// `[[index, hash hex], …]`
    pub fn index_and_hash() -> Array {
        list_of_pairs(
            unsigned(KnownFormat::Int64),
            ObjectBuilder::new().schema_type(Type::String).into(),
        )
    }

    /// `[[first, count], …]`
    pub fn u64_runs() -> Array {
        list_of_pairs(unsigned(KnownFormat::Int64), unsigned(KnownFormat::Int64))
    }

    /// `[[offset, length], …]`
    pub fn u32_ranges() -> Array {
        list_of_pairs(unsigned(KnownFormat::Int32), unsigned(KnownFormat::Int32))
    }
}
