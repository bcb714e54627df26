//! The domain error: what every layer above the store reports, with a stable machine-readable
//! `code`, a human message with context, and whether a client should retry (`recoverable`).
//! The mapping to HTTP status lives in one place, `api::error`.
//!
//! Layer errors (`StoreError`, `SealError`, format errors) convert into it: store trouble is
//! transient (retry), a seal error is corruption (never retried, never served).

use crate::chunk::SealError;
use crate::store::StoreError;

/// The public kinds; each has one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    InvalidInput,
    Unauthorized,
    Forbidden,
    NotFound,
    Conflict,
    TooLarge,
    /// A request body in an encoding the server does not take.
    UnsupportedMedia,
    Busy,
    Unavailable,
    Corrupt,
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{message}")]
    Invalid { code: &'static str, message: String },
    #[error("{message}")]
    Unauthorized { message: String },
    #[error("{message}")]
    Forbidden { message: String },
    /// A token that was valid once and whose expiry passed.
    #[error("{message}")]
    TokenExpired { message: String },
    /// The caller's account has a role below the one the route needs.
    #[error("this needs role {needed}; account {account} has role {actual}")]
    RoleRequired {
        needed: crate::wire::Role,
        account: String,
        actual: crate::wire::Role,
    },
    #[error("{message}")]
    NotFound { code: &'static str, message: String },
    #[error("{message}")]
    Conflict {
        code: &'static str,
        message: String,
        recoverable: bool,
    },
    #[error("{message}")]
    TooLarge { code: &'static str, message: String },
    #[error("{message}")]
    UnsupportedMedia { code: &'static str, message: String },
    /// Back-pressure: retry after the given number of seconds.
    #[error("{message}")]
    Busy {
        code: &'static str,
        message: String,
        retry_after_s: u64,
    },
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// A file the server writes outside the store (the key file, failover output) hit a full
    /// disk: as transient as a full store, and reported with the same code.
    #[error("{message}")]
    DiskFull { message: String },
    /// A local resource the server needs cannot be used right now (failover output that cannot
    /// be written): nothing was applied, and the same request may succeed once it is fixed.
    #[error("{message}")]
    Unavailable { code: &'static str, message: String },
    /// Another live server holds the VM's lease: the request belongs there
    /// ([`Error::lease_held`] words the message).
    #[error("{message}")]
    LeaseHeld { message: String, owner_url: String },
    /// This server lost the lease while working (a newer epoch fenced it out): nothing of the
    /// change was published; the agent's retry reaches the new holder.
    #[error("{message}")]
    LeaseLost { message: String },
    #[error("corrupt object: {0}")]
    Corrupt(#[from] SealError),
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn invalid(code: &'static str, message: impl Into<String>) -> Error {
        Error::Invalid {
            code,
            message: message.into(),
        }
    }
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Error {
        Error::NotFound {
            code,
            message: message.into(),
        }
    }
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Error {
        Error::Conflict {
            code,
            message: message.into(),
            recoverable: false,
        }
    }
    /// A conflict the agent waits out with back-off (resync in progress, for example).
    pub fn conflict_recoverable(code: &'static str, message: impl Into<String>) -> Error {
        Error::Conflict {
            code,
            message: message.into(),
            recoverable: true,
        }
    }
    pub fn forbidden(message: impl Into<String>) -> Error {
        Error::Forbidden {
            message: message.into(),
        }
    }
    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Error {
        Error::Unavailable {
            code,
            message: message.into(),
        }
    }
    /// `lease_held`: server `owner` at `owner_url` holds `subject` (a VM's name).
    pub fn lease_held(subject: &str, owner: &str, owner_url: &str) -> Error {
        Error::LeaseHeld {
            message: format!(
                "VM {subject} is served by server {owner} at {owner_url}: send it there"
            ),
            owner_url: owner_url.to_string(),
        }
    }
    pub fn internal(message: impl Into<String>) -> Error {
        Error::Internal(message.into())
    }
    /// A failed write of a local file: [`Error::DiskFull`] when the disk is full (ENOSPC,
    /// EDQUOT anywhere in `error`'s chain), else `otherwise(message)`.
    pub fn local_write(
        error: &(dyn std::error::Error + 'static),
        message: impl Into<String>,
        otherwise: impl FnOnce(String) -> Error,
    ) -> Error {
        let message = message.into();
        if crate::store::is_storage_full(error) {
            Error::DiskFull { message }
        } else {
            otherwise(message)
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Error::Invalid { .. } => Kind::InvalidInput,
            Error::Unauthorized { .. } | Error::TokenExpired { .. } => Kind::Unauthorized,
            Error::Forbidden { .. } | Error::RoleRequired { .. } => Kind::Forbidden,
            Error::NotFound { .. } => Kind::NotFound,
            Error::Conflict { .. } | Error::LeaseHeld { .. } | Error::LeaseLost { .. } => {
                Kind::Conflict
            }
            Error::TooLarge { .. } => Kind::TooLarge,
            Error::UnsupportedMedia { .. } => Kind::UnsupportedMedia,
            Error::Busy { .. } => Kind::Busy,
            Error::Store(StoreError::NotFound { .. }) => Kind::Corrupt,
            Error::Store(_) | Error::DiskFull { .. } | Error::Unavailable { .. } => {
                Kind::Unavailable
            }
            Error::Corrupt(_) => Kind::Corrupt,
            Error::Internal(_) => Kind::Internal,
        }
    }

    /// Stable machine-readable code (part of the API contract; see docs/api.md).
    pub fn code(&self) -> &'static str {
        match self {
            Error::Invalid { code, .. }
            | Error::NotFound { code, .. }
            | Error::Conflict { code, .. }
            | Error::TooLarge { code, .. }
            | Error::UnsupportedMedia { code, .. }
            | Error::Busy { code, .. }
            | Error::Unavailable { code, .. } => code,
            Error::Unauthorized { .. } => "unauthorized",
            Error::Forbidden { .. } => "forbidden",
            Error::TokenExpired { .. } => "token_expired",
            Error::RoleRequired { .. } => "role_required",
            Error::LeaseHeld { .. } => "lease_held",
            Error::LeaseLost { .. } => "lease_lost",
            // An object the vault's own records point at is gone: that is damage, not a 404.
            Error::Store(StoreError::NotFound { .. }) => "object_missing",
            Error::Store(StoreError::Config(_)) => "store_misconfigured",
            Error::Store(StoreError::Full { .. }) | Error::DiskFull { .. } => "store_full",
            Error::Store(_) => "store_unavailable",
            Error::Corrupt(_) => "corrupt_object",
            Error::Internal(_) => "internal",
        }
    }

    /// Whether the agent should retry with back-off (docs/api.md, "Errors").
    pub fn recoverable(&self) -> bool {
        match self {
            Error::Conflict { recoverable, .. } => *recoverable,
            Error::Busy { .. } | Error::LeaseHeld { .. } | Error::LeaseLost { .. } => true,
            Error::Store(StoreError::Unavailable { .. } | StoreError::Full { .. })
            | Error::DiskFull { .. }
            | Error::Unavailable { .. } => true,
            _ => false,
        }
    }
}

impl From<crate::chunk::pipeline::ChunkError> for Error {
    fn from(e: crate::chunk::pipeline::ChunkError) -> Error {
        use crate::chunk::pipeline::ChunkError;
        match e {
            ChunkError::Store(s) => Error::Store(s),
            ChunkError::Corrupt(c) => Error::Corrupt(c),
            ChunkError::HashMismatch { claimed, actual } => Error::invalid(
                "hash_mismatch",
                format!("block content hashes to {actual}, the request claimed {claimed}"),
            ),
            // Nothing was written; agents retry while the operator rotates the key.
            ChunkError::Key(e) => Error::Busy {
                code: "key_exhausted",
                message: e.to_string(),
                retry_after_s: 60,
            },
        }
    }
}
