//! Who may talk to the server: the operator, registered hosts, and VMM-style providers that act
//! for every host of one cloud. Tokens are random 256-bit values shown once; the vault keeps only
//! their keyed digests (`KeyRing::token_digest`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Registry {
    /// Digests of operator tokens.
    pub operator_tokens: Vec<String>,
    pub hosts: BTreeMap<String, HostEntry>,
    pub providers: BTreeMap<String, ProviderEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostEntry {
    pub name: String,
    pub token_digest: String,
    pub cloud: Option<String>,
    pub created_unix: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProviderEntry {
    pub name: String,
    pub cloud: String,
    pub token_digest: String,
    pub created_unix: u64,
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Operator,
    Host {
        name: String,
    },
    /// A provider acting for `host`, which belongs to its cloud.
    Provider {
        name: String,
        cloud: String,
    },
}

/// Token prefixes: they make a pasted token recognisable and let the server refuse the wrong
/// kind early, but authority comes only from the digest lookup.
pub const OPERATOR_TOKEN_PREFIX: &str = "drvo_";
pub const HOST_TOKEN_PREFIX: &str = "drvh_";
pub const PROVIDER_TOKEN_PREFIX: &str = "drvp_";

impl Registry {
    /// Finds who holds the token with this digest.
    pub fn resolve(&self, digest: &str) -> Option<Principal> {
        let eq = |a: &str| constant_time_eq(a.as_bytes(), digest.as_bytes());
        if self.operator_tokens.iter().any(|d| eq(d)) {
            return Some(Principal::Operator);
        }
        if let Some(h) = self.hosts.values().find(|h| eq(&h.token_digest)) {
            return Some(Principal::Host {
                name: h.name.clone(),
            });
        }
        if let Some(p) = self.providers.values().find(|p| eq(&p.token_digest)) {
            return Some(Principal::Provider {
                name: p.name.clone(),
                cloud: p.cloud.clone(),
            });
        }
        None
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Names of hosts, providers, clouds, VMs and disks: 1-64 characters from `[A-Za-z0-9._-]`,
/// starting with a letter or digit. Anything else (paths, `..`, NUL, spaces) is refused.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["web01", "a", "VM_1.prod-2", &"x".repeat(64)] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            "../x",
            "..",
            ".hidden",
            "%2e%2e",
            "a/b",
            "a\0b",
            "a b",
            "-x",
            &"x".repeat(65),
            "é",
        ] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }
}
