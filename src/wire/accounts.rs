//! Operator accounts and their roles (`/v1/whoami`, `/v1/accounts`), and the answers to token
//! rotation.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What an operator account may do. Each role admits everything the roles before it do:
/// `viewer` reads (every GET), `operator` also runs drills, failovers of every kind, commits,
/// cleanups, cancels, resyncs, failbacks, plans, verify and merges, and `admin` also manages
/// hosts, providers, keys, accounts and garbage collection.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// The role named `s` (exactly as the API spells it), if there is one.
    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `GET /v1/whoami`: the account a token belongs to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct Whoami {
    pub account: String,
    pub role: Role,
    /// When the token used expires (RFC 3339), `None` if it does not.
    pub expires_at: Option<String>,
}

/// `POST /v1/accounts`. The role is a plain string so that an unknown one is refused with the
/// valid roles named (`invalid_role`) rather than a generic JSON error.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddAccount {
    pub name: String,
    pub role: String,
    /// When the account's token stops working (RFC 3339); none: it does not expire.
    #[serde(default)]
    pub expires_at: Option<String>,
}

/// `POST /v1/accounts/{name}/token`: a new token for the account; its other tokens are revoked.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateToken {
    #[serde(default)]
    pub expires_at: Option<String>,
}

/// The answer to creating an account or rotating its token: the token, shown this once (the
/// server keeps only its digest).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AccountToken {
    pub account: String,
    pub role: Role,
    pub token: String,
    pub expires_at: Option<String>,
}

/// One account in `GET /v1/accounts` (never a token).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct AccountView {
    pub name: String,
    pub role: Role,
    pub created: String,
    /// Tokens that still work (not expired).
    pub tokens: u32,
    /// The latest expiry among its tokens (RFC 3339); `None` if one of them never expires or
    /// it has none.
    pub expires_at: Option<String>,
}
