//! Who may talk to the server: the operator, registered hosts, and VMM-style providers that act
//! for every host of one cloud. Tokens are random 256-bit values shown once; the vault keeps only
//! their keyed digests (`KeyRing::token_digest`).
//!
//! [`Registry`] is the record (one, `registry/main`); [`Registrar`] is the service that owns it:
//! the cached copy every request's token is resolved against, and the compare-and-swap updates
//! that register and remove hosts and providers. The server is the record's only writer, so
//! the cache is refreshed by its own updates.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::RwLock;

use crate::chunk::KeyRing;
use crate::error::{Error, Result};
use crate::vault::layout::{self, Family};
use crate::vault::Records;

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
    /// Hosts of one cluster act on each other's VMs (see [`Registrar::same_cluster`]).
    #[serde(default)]
    pub cluster: Option<String>,
    pub created_unix: u64,
    /// The operator's bandwidth cap for the host's agent, MB/s (sent with each heartbeat
    /// answer).
    #[serde(default)]
    pub throttle_mb_s: Option<f64>,
}

/// The largest bandwidth cap the operator may set, MB/s (100 GB/s: a typo, not a link).
pub const MAX_THROTTLE_MB_S: f64 = 100_000.0;

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

/// The registry service: the cached [`Registry`] and its updates. Cheap to clone.
#[derive(Clone)]
pub struct Registrar {
    records: Records,
    keys: Arc<KeyRing>,
    cache: Arc<RwLock<Registry>>,
}

impl Registrar {
    /// Loads the registry, adding the digest of `operator_token` if it is not there yet (a
    /// first start, or a new operator token file).
    pub async fn open(
        records: Records,
        keys: Arc<KeyRing>,
        operator_token: &str,
    ) -> Result<Registrar> {
        let digest = keys.token_digest(operator_token);
        let registry = records
            .update(&Self::key(), |cur: Option<&Registry>| {
                let mut r = cur.cloned().unwrap_or_default();
                if r.operator_tokens.contains(&digest) {
                    return Ok(cur.is_none().then_some(r));
                }
                r.operator_tokens.push(digest.clone());
                Ok(Some(r))
            })
            .await?
            .map(|v| v.value)
            .unwrap_or_default();
        Ok(Registrar {
            records,
            keys,
            cache: Arc::new(RwLock::new(registry)),
        })
    }

    fn key() -> crate::store::Key {
        layout::record(Family::Registry, "main")
    }

    /// Who holds `token`, if anyone: the token's keyed digest looked up in the cache.
    pub async fn resolve_token(&self, token: &str) -> Option<Principal> {
        let digest = self.keys.token_digest(token);
        self.cache.read().await.resolve(&digest)
    }

    /// A copy of the cached registry.
    pub async fn snapshot(&self) -> Registry {
        self.cache.read().await.clone()
    }

    /// The registered host `name`.
    pub async fn host(&self, name: &str) -> Option<HostEntry> {
        self.cache.read().await.hosts.get(name).cloned()
    }

    /// Whether host `a` may act on what host `b` owns: the same host, or two registered hosts
    /// of one cluster (a VM moves between a cluster's nodes and keeps its log chain).
    pub async fn same_cluster(&self, a: &str, b: &str) -> bool {
        if a == b {
            return true;
        }
        let r = self.cache.read().await;
        let cluster = |h: &str| r.hosts.get(h).and_then(|e| e.cluster.clone());
        matches!((cluster(a), cluster(b)), (Some(x), Some(y)) if x == y)
    }

    /// Registers host `name` (optionally in `cloud`) and returns its new token, shown once:
    /// only its digest is kept. Refused if a name is not valid or the host exists.
    pub async fn add_host(&self, name: &str, cloud: Option<&str>) -> Result<String> {
        self.add_host_in(name, cloud, None).await
    }

    /// [`Registrar::add_host`] with the host's cluster, if it is in one.
    pub async fn add_host_in(
        &self,
        name: &str,
        cloud: Option<&str>,
        cluster: Option<&str>,
    ) -> Result<String> {
        check_name("host", name)?;
        if let Some(c) = cloud {
            check_name("cloud", c)?;
        }
        if let Some(c) = cluster {
            check_name("cluster", c)?;
        }
        let token = crate::util::random_token(HOST_TOKEN_PREFIX);
        let digest = self.keys.token_digest(&token);
        let now = crate::util::unix_now();
        self.update(|r| {
            if r.hosts.contains_key(name) {
                return Err(Error::conflict(
                    "host_exists",
                    format!("host {name} is already registered"),
                ));
            }
            r.hosts.insert(
                name.to_string(),
                HostEntry {
                    name: name.to_string(),
                    token_digest: digest.clone(),
                    cloud: cloud.map(str::to_string),
                    cluster: cluster.map(str::to_string),
                    created_unix: now,
                    throttle_mb_s: None,
                },
            );
            Ok(())
        })
        .await?;
        Ok(token)
    }

    /// Sets (or with `None` clears) the bandwidth cap of host `name`'s agent, in MB/s.
    pub async fn set_throttle(&self, name: &str, mb_s: Option<f64>) -> Result<()> {
        check_name("host", name)?;
        if let Some(v) = mb_s {
            if !(v.is_finite() && v > 0.0 && v <= MAX_THROTTLE_MB_S) {
                return Err(Error::invalid(
                    "invalid_throttle",
                    format!("bandwidth cap {v} MB/s: must be more than 0 and at most {MAX_THROTTLE_MB_S} (or none to clear it)"),
                ));
            }
        }
        self.update(|r| {
            let h = r.hosts.get_mut(name).ok_or_else(|| {
                Error::not_found("host_not_found", format!("host {name} is not registered"))
            })?;
            h.throttle_mb_s = mb_s;
            Ok(())
        })
        .await?;
        Ok(())
    }

    /// Removes host `name`, which revokes its token.
    pub async fn remove_host(&self, name: &str) -> Result<()> {
        check_name("host", name)?;
        self.update(|r| {
            r.hosts.remove(name).map(|_| ()).ok_or_else(|| {
                Error::not_found("host_not_found", format!("host {name} is not registered"))
            })
        })
        .await?;
        Ok(())
    }

    /// Registers provider `name` acting for the hosts of `cloud` and returns its new token.
    pub async fn add_provider(&self, name: &str, cloud: &str) -> Result<String> {
        check_name("provider", name)?;
        check_name("cloud", cloud)?;
        let token = crate::util::random_token(PROVIDER_TOKEN_PREFIX);
        let digest = self.keys.token_digest(&token);
        let now = crate::util::unix_now();
        self.update(|r| {
            if r.providers.contains_key(name) {
                return Err(Error::conflict(
                    "provider_exists",
                    format!("provider {name} is already registered"),
                ));
            }
            r.providers.insert(
                name.to_string(),
                ProviderEntry {
                    name: name.to_string(),
                    cloud: cloud.to_string(),
                    token_digest: digest.clone(),
                    created_unix: now,
                },
            );
            Ok(())
        })
        .await?;
        Ok(token)
    }

    /// Removes provider `name`, which revokes its token.
    pub async fn remove_provider(&self, name: &str) -> Result<()> {
        check_name("provider", name)?;
        self.update(|r| {
            r.providers.remove(name).map(|_| ()).ok_or_else(|| {
                Error::not_found(
                    "provider_not_found",
                    format!("provider {name} is not registered"),
                )
            })
        })
        .await?;
        Ok(())
    }

    /// Applies `f` to the registry record (compare-and-swap) and refreshes the cache.
    async fn update(&self, f: impl Fn(&mut Registry) -> Result<()>) -> Result<Registry> {
        let v = self
            .records
            .update(&Self::key(), |cur: Option<&Registry>| {
                let mut r = cur.cloned().unwrap_or_default();
                f(&mut r)?;
                Ok(Some(r))
            })
            .await?
            .ok_or_else(|| Error::internal("registry update returned nothing"))?;
        *self.cache.write().await = v.value.clone();
        Ok(v.value)
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

/// [`valid_name`], refused with `invalid_name` and a message naming the `kind` of name (VM,
/// disk, host, provider, cloud, plan) and the rule.
pub fn check_name(kind: &str, s: &str) -> Result<()> {
    if valid_name(s) {
        Ok(())
    } else {
        Err(Error::invalid("invalid_name", format!("{kind} name {s:?}: use 1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit")))
    }
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

    use crate::chunk::{ChunkStore, CpuPool};
    use crate::store::Store;

    const OPERATOR: &str = "drvo_operator-token";

    fn records(keys: &Arc<KeyRing>) -> Records {
        Records::new(ChunkStore::new(
            Store::open("memory://", &[]).unwrap(),
            keys.clone(),
            CpuPool::new(2),
            3,
        ))
    }

    async fn open() -> (Registrar, Records, Arc<KeyRing>) {
        let keys = Arc::new(KeyRing::random());
        let records = records(&keys);
        let r = Registrar::open(records.clone(), keys.clone(), OPERATOR)
            .await
            .unwrap();
        (r, records, keys)
    }

    #[tokio::test]
    async fn tokens_resolve_to_who_was_registered_until_removed() {
        let (r, _, _) = open().await;
        assert_eq!(r.resolve_token(OPERATOR).await, Some(Principal::Operator));
        let host = r.add_host("hv1", Some("cloud-a")).await.unwrap();
        let provider = r.add_provider("vmm", "cloud-a").await.unwrap();
        assert!(host.starts_with(HOST_TOKEN_PREFIX) && provider.starts_with(PROVIDER_TOKEN_PREFIX));
        assert_eq!(
            r.resolve_token(&host).await,
            Some(Principal::Host { name: "hv1".into() })
        );
        assert_eq!(
            r.resolve_token(&provider).await,
            Some(Principal::Provider {
                name: "vmm".into(),
                cloud: "cloud-a".into()
            })
        );
        assert_eq!(
            r.host("hv1").await.unwrap().cloud.as_deref(),
            Some("cloud-a")
        );
        // Only digests are kept.
        let snap = r.snapshot().await;
        assert!(!serde_json::to_string(&snap).unwrap().contains(&host));

        r.remove_host("hv1").await.unwrap();
        r.remove_provider("vmm").await.unwrap();
        assert_eq!(r.resolve_token(&host).await, None);
        assert_eq!(r.resolve_token(&provider).await, None);
        assert!(r.host("hv1").await.is_none());
    }

    #[tokio::test]
    async fn refusals_change_nothing() {
        let (r, _, _) = open().await;
        r.add_host("hv1", None).await.unwrap();
        let before = serde_json::to_string(&r.snapshot().await).unwrap();
        for (e, code) in [
            (r.add_host("hv1", None).await.unwrap_err(), "host_exists"),
            (r.add_host("../x", None).await.unwrap_err(), "invalid_name"),
            (
                r.add_host("hv2", Some("a/b")).await.unwrap_err(),
                "invalid_name",
            ),
            (r.add_provider("p", "..").await.unwrap_err(), "invalid_name"),
            (r.remove_host("hv9").await.unwrap_err(), "host_not_found"),
            (
                r.remove_provider("p9").await.unwrap_err(),
                "provider_not_found",
            ),
        ] {
            assert_eq!(e.code(), code, "{e}");
        }
        r.add_provider("p", "c").await.unwrap();
        let e = r.add_provider("p", "d").await.unwrap_err();
        assert_eq!(e.code(), "provider_exists");
        assert_eq!(
            r.add_host("..", None).await.unwrap_err().to_string(),
            format!("host name \"..\": use 1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit")
        );
        let after = serde_json::to_string(&r.snapshot().await).unwrap();
        assert_ne!(before, after, "the provider was added");
        assert!(!after.contains("hv2") && !after.contains("\"d\""));
    }

    #[tokio::test]
    async fn a_reopened_registry_has_what_was_written_and_one_operator_digest() {
        let (r, records, keys) = open().await;
        let host = r.add_host("hv1", None).await.unwrap();
        let again = Registrar::open(records.clone(), keys.clone(), OPERATOR)
            .await
            .unwrap();
        assert_eq!(
            again.resolve_token(&host).await,
            Some(Principal::Host { name: "hv1".into() })
        );
        assert_eq!(again.snapshot().await.operator_tokens.len(), 1);
        // A new operator token is added beside the old one.
        let third = Registrar::open(records, keys, "drvo_second").await.unwrap();
        assert_eq!(
            third.resolve_token("drvo_second").await,
            Some(Principal::Operator)
        );
        assert_eq!(
            third.resolve_token(OPERATOR).await,
            Some(Principal::Operator)
        );
    }
}
