//! Who may talk to the server: operator accounts (each with a role), registered hosts, and
//! VMM-style providers that act for every host of one cloud. Tokens are random 256-bit values
//! shown once; the vault keeps only their keyed digests (`KeyRing::token_digest`).
//!
//! [`Registry`] is the record (one, `registry/main`); [`Registrar`] is the service that owns it:
//! the cached copy every request's token is resolved against, and the compare-and-swap updates
//! that register and remove accounts, hosts and providers and rotate their tokens. The server is
//! the record's only writer, so the cache is refreshed by its own updates.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::RwLock;

use crate::chunk::KeyRing;
use crate::error::{Error, Result};
use crate::vault::layout::{self, Family};
use crate::vault::Records;
pub use crate::wire::Role;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Registry {
    /// Digests of the one shared operator token of a vault written before accounts existed.
    /// Read so that such a vault keeps working: [`Registrar::open`] moves them into account
    /// [`FIRST_ACCOUNT`], and they are never written again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub operator_tokens: Vec<String>,
    #[serde(default)]
    pub accounts: BTreeMap<String, AccountEntry>,
    /// Digest of the data directory's operator token file last taken in at a start. A file
    /// whose token differs (deleted and created anew, or replaced by hand) gives account
    /// [`FIRST_ACCOUNT`] that token once; the same file again adds nothing, so a token the
    /// admins rotated or revoked stays revoked across restarts.
    #[serde(default)]
    pub token_file_digest: Option<String>,
    pub hosts: BTreeMap<String, HostEntry>,
    pub providers: BTreeMap<String, ProviderEntry>,
}

/// The account a first start creates (role admin), holding the data directory's operator token.
pub const FIRST_ACCOUNT: &str = "admin";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccountEntry {
    pub name: String,
    pub role: Role,
    pub tokens: Vec<TokenEntry>,
    pub created_unix: u64,
}

/// One token of an account: its digest, never the token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenEntry {
    pub digest: String,
    pub created_unix: u64,
    /// From this second on the token is refused (`token_expired`).
    #[serde(default)]
    pub expires_unix: Option<u64>,
}

impl TokenEntry {
    fn expired(&self, now: u64) -> bool {
        self.expires_unix.is_some_and(|e| e <= now)
    }
}

impl AccountEntry {
    /// Tokens that still work at `now`.
    pub fn live_tokens(&self, now: u64) -> impl Iterator<Item = &TokenEntry> {
        self.tokens.iter().filter(move |t| !t.expired(now))
    }
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
    /// An operator account; `expires_unix` is the expiry of the token it used.
    Account {
        name: String,
        role: Role,
        expires_unix: Option<u64>,
    },
    Host {
        name: String,
    },
    /// A provider acting for `host`, which belongs to its cloud.
    Provider {
        name: String,
        cloud: String,
    },
}

/// Why a token opens nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Unknown,
    /// A token of `account` that expired at `expired_unix`.
    Expired {
        account: String,
        expired_unix: u64,
    },
}

/// Token prefixes: they make a pasted token recognisable and let the server refuse the wrong
/// kind early, but authority comes only from the digest lookup.
pub const OPERATOR_TOKEN_PREFIX: &str = "drvo_";
pub const HOST_TOKEN_PREFIX: &str = "drvh_";
pub const PROVIDER_TOKEN_PREFIX: &str = "drvp_";

impl Registry {
    /// Finds who holds the token with this digest at time `now`.
    pub fn resolve(&self, digest: &str, now: u64) -> std::result::Result<Principal, Refusal> {
        let eq = |a: &str| constant_time_eq(a.as_bytes(), digest.as_bytes());
        for a in self.accounts.values() {
            if let Some(t) = a.tokens.iter().find(|t| eq(&t.digest)) {
                return match t.expires_unix {
                    Some(at) if at <= now => Err(Refusal::Expired {
                        account: a.name.clone(),
                        expired_unix: at,
                    }),
                    expires_unix => Ok(Principal::Account {
                        name: a.name.clone(),
                        role: a.role,
                        expires_unix,
                    }),
                };
            }
        }
        if let Some(h) = self.hosts.values().find(|h| eq(&h.token_digest)) {
            return Ok(Principal::Host {
                name: h.name.clone(),
            });
        }
        if let Some(p) = self.providers.values().find(|p| eq(&p.token_digest)) {
            return Ok(Principal::Provider {
                name: p.name.clone(),
                cloud: p.cloud.clone(),
            });
        }
        Err(Refusal::Unknown)
    }

    /// Moves a pre-account vault's operator digests into account [`FIRST_ACCOUNT`], and takes
    /// in the token file's digest if it is new (see [`Registry::token_file_digest`]). Whether
    /// anything changed.
    fn take_in(&mut self, file_digest: &str, now: u64) -> bool {
        let mut changed = false;
        let legacy = std::mem::take(&mut self.operator_tokens);
        let file_is_new = self.token_file_digest.as_deref() != Some(file_digest);
        if legacy.is_empty() && !file_is_new {
            return false;
        }
        let first = self
            .accounts
            .entry(FIRST_ACCOUNT.to_string())
            .or_insert_with(|| AccountEntry {
                name: FIRST_ACCOUNT.to_string(),
                role: Role::Admin,
                tokens: Vec::new(),
                created_unix: now,
            });
        for digest in legacy
            .iter()
            .map(String::as_str)
            .chain(file_is_new.then_some(file_digest))
        {
            if !first.tokens.iter().any(|t| t.digest == digest) {
                first.tokens.push(TokenEntry {
                    digest: digest.to_string(),
                    created_unix: now,
                    expires_unix: None,
                });
            }
            changed = true;
        }
        // Whoever holds the data directory holds the vault's key too: the account it opens
        // is an admin again, even if it was demoted or removed since.
        first.role = Role::Admin;
        self.token_file_digest = Some(file_digest.to_string());
        changed
    }

    fn admins(&self) -> usize {
        self.accounts
            .values()
            .filter(|a| a.role == Role::Admin)
            .count()
    }
}

/// The registry service: the cached [`Registry`] and its updates. Cheap to clone.
#[derive(Clone)]
pub struct Registrar {
    records: Records,
    keys: Arc<KeyRing>,
    cache: Arc<RwLock<Registry>>,
    /// The record version the cache holds: other servers on the vault update the registry too.
    version: Arc<std::sync::atomic::AtomicU64>,
    /// When an unknown token last made the registry be re-read.
    refreshed: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

impl Registrar {
    /// Loads the registry. The data directory's `operator_token` becomes a token of account
    /// [`FIRST_ACCOUNT`] (role admin) on a first start, when the vault predates accounts (its
    /// operator tokens move there too), or when the file holds a token not taken in before.
    pub async fn open(
        records: Records,
        keys: Arc<KeyRing>,
        operator_token: &str,
    ) -> Result<Registrar> {
        let digest = keys.token_digest(operator_token);
        let now = crate::util::unix_now();
        let (version, registry) = records
            .update(&Self::key(), |cur: Option<&Registry>| {
                let mut r = cur.cloned().unwrap_or_default();
                let changed = r.take_in(&digest, now);
                Ok((changed || cur.is_none()).then_some(r))
            })
            .await?
            .map(|v| (v.version, v.value))
            .unwrap_or_default();
        Ok(Registrar {
            records,
            keys,
            cache: Arc::new(RwLock::new(registry)),
            version: Arc::new(version.into()),
            refreshed: Default::default(),
        })
    }

    /// Whether an unknown token may trigger a re-read now: at most every 500 ms, so a flood of
    /// bad tokens costs the store one listing per half second.
    fn may_refresh(&self) -> bool {
        let mut last = self.refreshed.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < std::time::Duration::from_millis(500)) {
            return false;
        }
        *last = Some(std::time::Instant::now());
        true
    }

    /// Re-reads the registry when another server changed it (its version moved).
    pub async fn refresh(&self) -> Result<()> {
        use std::sync::atomic::Ordering;
        let latest = self
            .records
            .latest_versions(Family::Registry)
            .await?
            .get("main")
            .copied()
            .unwrap_or(0);
        if latest <= self.version.load(Ordering::Acquire) {
            return Ok(());
        }
        if let Some(v) = self.records.load::<Registry>(&Self::key()).await? {
            let mut cache = self.cache.write().await;
            if v.version > self.version.load(Ordering::Acquire) {
                *cache = v.value;
                self.version.store(v.version, Ordering::Release);
            }
        }
        Ok(())
    }

    fn key() -> crate::store::Key {
        layout::record(Family::Registry, "main")
    }

    /// Who holds `token`, if anyone and it has not expired: the token's keyed digest looked up
    /// in the cache.
    pub async fn resolve_token(&self, token: &str) -> Option<Principal> {
        self.authenticate(token).await.ok()
    }

    /// Who holds `token`, or why nobody does: 401 `unauthorized` for an unknown or revoked
    /// token, 401 `token_expired` for an expired one.
    pub async fn authenticate(&self, token: &str) -> Result<Principal> {
        let digest = self.keys.token_digest(token);
        let now = crate::util::unix_now();
        let first = self.cache.read().await.resolve(&digest, now);
        if matches!(first, Err(Refusal::Unknown)) && self.may_refresh() {
            // Registered on another server of the vault since this one last read the registry.
            if let Err(e) = self.refresh().await {
                tracing::warn!(error = %e, "re-reading the registry failed");
            }
        }
        self.cache
            .read()
            .await
            .resolve(&digest, now)
            .map_err(|r| match r {
                Refusal::Unknown => Error::Unauthorized {
                    message: "unknown or revoked token".into(),
                },
                Refusal::Expired {
                    account,
                    expired_unix,
                } => Error::TokenExpired {
                    message: format!(
                        "the token of account {account} expired at {}; an admin can issue a new one (drvault account rotate {account})",
                        crate::util::rfc3339(expired_unix)
                    ),
                },
            })
    }

    /// Creates account `name` with `role` and returns its token, shown once. `expires_unix`
    /// must be in the future.
    pub async fn add_account(
        &self,
        name: &str,
        role: Role,
        expires_unix: Option<u64>,
    ) -> Result<String> {
        check_name("account", name)?;
        let now = crate::util::unix_now();
        check_expiry(expires_unix, now)?;
        let token = crate::util::random_token(OPERATOR_TOKEN_PREFIX);
        let digest = self.keys.token_digest(&token);
        self.update(|r| {
            if r.accounts.contains_key(name) {
                return Err(Error::conflict(
                    "account_exists",
                    format!("account {name} already exists"),
                ));
            }
            r.accounts.insert(
                name.to_string(),
                AccountEntry {
                    name: name.to_string(),
                    role,
                    tokens: vec![TokenEntry {
                        digest: digest.clone(),
                        created_unix: now,
                        expires_unix,
                    }],
                    created_unix: now,
                },
            );
            Ok(())
        })
        .await?;
        Ok(token)
    }

    /// Removes account `name`, which revokes its tokens. The last admin account stays: without
    /// it nobody could manage accounts, hosts or keys.
    pub async fn remove_account(&self, name: &str) -> Result<()> {
        check_name("account", name)?;
        self.update(|r| {
            let a = r
                .accounts
                .get(name)
                .ok_or_else(|| account_not_found(name))?;
            if a.role == Role::Admin && r.admins() == 1 {
                return Err(Error::conflict(
                    "last_admin",
                    format!(
                        "account {name} is the last admin; add another admin before removing it"
                    ),
                ));
            }
            r.accounts.remove(name);
            Ok(())
        })
        .await?;
        Ok(())
    }

    /// Gives account `name` one new token (returned, shown once) and revokes all its others.
    pub async fn rotate_account(
        &self,
        name: &str,
        expires_unix: Option<u64>,
    ) -> Result<(String, Role)> {
        check_name("account", name)?;
        let now = crate::util::unix_now();
        check_expiry(expires_unix, now)?;
        let token = crate::util::random_token(OPERATOR_TOKEN_PREFIX);
        let digest = self.keys.token_digest(&token);
        let r = self
            .update(|r| {
                let a = r
                    .accounts
                    .get_mut(name)
                    .ok_or_else(|| account_not_found(name))?;
                a.tokens = vec![TokenEntry {
                    digest: digest.clone(),
                    created_unix: now,
                    expires_unix,
                }];
                Ok(())
            })
            .await?;
        let role = r
            .accounts
            .get(name)
            .map(|a| a.role)
            .ok_or_else(|| Error::internal("rotated account vanished"))?;
        Ok((token, role))
    }

    /// Gives host `name` a new token (returned, shown once); the old one stops working at once.
    /// Its VMs, cluster and cloud stay as they are: nothing is protected again.
    pub async fn rotate_host(&self, name: &str) -> Result<String> {
        check_name("host", name)?;
        let token = crate::util::random_token(HOST_TOKEN_PREFIX);
        let digest = self.keys.token_digest(&token);
        self.update(|r| {
            let h = r.hosts.get_mut(name).ok_or_else(|| {
                Error::not_found("host_not_found", format!("host {name} is not registered"))
            })?;
            h.token_digest = digest.clone();
            Ok(())
        })
        .await?;
        Ok(token)
    }

    /// Gives provider `name` a new token (returned, shown once); the old one stops working.
    pub async fn rotate_provider(&self, name: &str) -> Result<String> {
        check_name("provider", name)?;
        let token = crate::util::random_token(PROVIDER_TOKEN_PREFIX);
        let digest = self.keys.token_digest(&token);
        self.update(|r| {
            let p = r.providers.get_mut(name).ok_or_else(|| {
                Error::not_found(
                    "provider_not_found",
                    format!("provider {name} is not registered"),
                )
            })?;
            p.token_digest = digest.clone();
            Ok(())
        })
        .await?;
        Ok(token)
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
        let mut cache = self.cache.write().await;
        *cache = v.value.clone();
        self.version
            .store(v.version, std::sync::atomic::Ordering::Release);
        Ok(v.value)
    }
}

fn account_not_found(name: &str) -> Error {
    Error::not_found(
        "account_not_found",
        format!("account {name} does not exist"),
    )
}

/// An expiry must lie ahead: a token born expired is a typo, not a wish.
fn check_expiry(expires_unix: Option<u64>, now: u64) -> Result<()> {
    match expires_unix {
        Some(at) if at <= now => Err(Error::invalid(
            "invalid_expiry",
            format!(
                "expires_at {} is not in the future (now {})",
                crate::util::rfc3339(at),
                crate::util::rfc3339(now)
            ),
        )),
        _ => Ok(()),
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
        assert_eq!(r.resolve_token(OPERATOR).await, Some(admin()));
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

    fn admin() -> Principal {
        Principal::Account {
            name: FIRST_ACCOUNT.into(),
            role: Role::Admin,
            expires_unix: None,
        }
    }

    #[tokio::test]
    async fn a_reopened_registry_has_what_was_written_and_one_admin_digest() {
        let (r, records, keys) = open().await;
        let host = r.add_host("hv1", None).await.unwrap();
        let again = Registrar::open(records.clone(), keys.clone(), OPERATOR)
            .await
            .unwrap();
        assert_eq!(
            again.resolve_token(&host).await,
            Some(Principal::Host { name: "hv1".into() })
        );
        let snap = again.snapshot().await;
        assert_eq!(snap.accounts.len(), 1);
        assert_eq!(snap.accounts[FIRST_ACCOUNT].tokens.len(), 1);
        // A new token file (deleted and created anew) opens account admin beside the old token.
        let third = Registrar::open(records, keys, "drvo_second").await.unwrap();
        assert_eq!(third.resolve_token("drvo_second").await, Some(admin()));
        assert_eq!(third.resolve_token(OPERATOR).await, Some(admin()));
    }

    #[tokio::test]
    async fn a_vault_from_before_accounts_keeps_its_operator_tokens_as_account_admin() {
        let keys = Arc::new(KeyRing::random());
        let records = records(&keys);
        // The record as the server wrote it before accounts existed.
        let old = serde_json::json!({
            "operator_tokens": [keys.token_digest(OPERATOR), keys.token_digest("drvo_older")],
            "hosts": {"hv1": {"name": "hv1", "token_digest": keys.token_digest("drvh_h"),
                              "cloud": null, "created_unix": 1}},
            "providers": {}
        });
        records.create(&Registrar::key(), &old).await.unwrap();
        let r = Registrar::open(records.clone(), keys.clone(), OPERATOR)
            .await
            .unwrap();
        assert_eq!(r.resolve_token(OPERATOR).await, Some(admin()));
        assert_eq!(r.resolve_token("drvo_older").await, Some(admin()));
        assert_eq!(
            r.resolve_token("drvh_h").await,
            Some(Principal::Host { name: "hv1".into() })
        );
        let written: serde_json::Value = records
            .load(&Registrar::key())
            .await
            .unwrap()
            .unwrap()
            .value;
        assert!(written.get("operator_tokens").is_none(), "{written}");
        assert_eq!(written["accounts"]["admin"]["role"], "admin");
        assert_eq!(
            written["accounts"]["admin"]["tokens"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
    }

    #[tokio::test]
    async fn a_rotated_admin_token_stays_revoked_when_the_server_restarts_with_the_same_file() {
        let (r, records, keys) = open().await;
        let (new, role) = r.rotate_account(FIRST_ACCOUNT, None).await.unwrap();
        assert_eq!(role, Role::Admin);
        assert_eq!(r.resolve_token(OPERATOR).await, None);
        let again = Registrar::open(records, keys, OPERATOR).await.unwrap();
        assert_eq!(again.resolve_token(OPERATOR).await, None);
        assert_eq!(again.resolve_token(&new).await, Some(admin()));
    }

    #[tokio::test]
    async fn accounts_rotation_expiry_and_the_last_admin() {
        let (r, _, _) = open().await;
        let now = crate::util::unix_now();
        let viewer = r
            .add_account("ann", Role::Viewer, Some(now + 3600))
            .await
            .unwrap();
        assert_eq!(
            r.resolve_token(&viewer).await,
            Some(Principal::Account {
                name: "ann".into(),
                role: Role::Viewer,
                expires_unix: Some(now + 3600)
            })
        );
        let snap = r.snapshot().await;
        assert!(!serde_json::to_string(&snap).unwrap().contains(&viewer));
        // Expired: refused with its own code, naming the account.
        let expired = snap.resolve(&r.keys.token_digest(&viewer), now + 3600);
        assert_eq!(
            expired,
            Err(Refusal::Expired {
                account: "ann".into(),
                expired_unix: now + 3600
            })
        );
        let e = r
            .add_account("bob", Role::Operator, Some(now - 1))
            .await
            .unwrap_err();
        assert_eq!(e.code(), "invalid_expiry");
        assert_eq!(
            r.add_account("ann", Role::Admin, None)
                .await
                .unwrap_err()
                .code(),
            "account_exists"
        );
        let e = r.remove_account(FIRST_ACCOUNT).await.unwrap_err();
        assert_eq!(e.code(), "last_admin");
        assert!(r.snapshot().await.accounts.contains_key(FIRST_ACCOUNT));
        assert!(!r.snapshot().await.accounts.contains_key("bob"));

        let (rotated, _) = r.rotate_account("ann", None).await.unwrap();
        assert_eq!(r.resolve_token(&viewer).await, None);
        assert!(r.resolve_token(&rotated).await.is_some());
        r.remove_account("ann").await.unwrap();
        assert_eq!(r.resolve_token(&rotated).await, None);

        let host = r.add_host("hv1", None).await.unwrap();
        let host2 = r.rotate_host("hv1").await.unwrap();
        assert_eq!(r.resolve_token(&host).await, None);
        assert_eq!(
            r.resolve_token(&host2).await,
            Some(Principal::Host { name: "hv1".into() })
        );
    }
}
