//! Several servers on one vault: server heartbeats, leases and fencing.
//!
//! Any number of `drvault serve` processes may share one vault. There is no coordinator beyond
//! the store's conditional writes (the create-only record versions of [`crate::vault::records`]).
//!
//! **Servers.** Each server has an id (`[cluster] server_id`, else generated once into
//! `<data_dir>/server.id`) and a record `records/server/<id>` it rewrites every TTL/5: its URL,
//! start time and the leases it holds. Another server judges it *alive* by its own monotonic
//! clock: the record's version changed less than one TTL ago (a server seen for the first time
//! counts as alive for one TTL). No wall clocks are compared, so clock skew between machines
//! does not matter; only their rates, which agree to far better than the margin below. A server
//! that stops cleanly writes `stopped` and is dead at once.
//!
//! **Leases.** A VM's lease is the record `records/lease/<vm id>`: owner, owner URL and an
//! *epoch*. A server takes it by compare-and-swap when it is free, its owner is dead, or its
//! owner is the server itself (after a restart or a lapse), always as epoch + 1; losing the race
//! means re-reading, so exactly one taker wins each epoch. A lease is not renewed on its own: the
//! owner's heartbeat keeps all its leases. The holder counts its leases as held only while its
//! last heartbeat write started less than 3/4 TTL ago; past that (a pause, a partition, a store
//! that stopped answering) it drops them and must take them again, at a new epoch.
//!
//! **Fencing.** The check above is advisory: a process paused between its check and its write
//! would still write. What decides is the record: every VM and disk record carries the epoch of
//! the lease its last writer held ([`crate::vault::records::Fenced`]), and a server that takes a
//! lease first rewrites each of the VM's records with its new epoch. Every later update is a
//! compare-and-swap that refuses a record stamped with a newer epoch (`lease_lost`,
//! `drvault_fenced_writes_total`). So once the new holder's fencing writes are done, nothing
//! the old holder does reaches the VM's manifests: its update either reads the new version, or
//! its create of that version number finds it taken and re-reads. Chunks, pieces and log frames
//! are content-addressed or uniquely named and may be written by anyone; only the records
//! decide what a point is.
//!
//! **Maintenance.** Garbage collection and verify take the `maintenance` lease, so one server
//! at a time runs them (see [`crate::scrub`] for how a collection stays safe while the other
//! servers write).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::vault::layout::{self, Family};
use crate::vault::Records;

/// The lease garbage collection and verify run under.
pub const MAINTENANCE: &str = "maintenance";

/// Whether `s` can name a server (it becomes part of an object key).
pub fn valid_server_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// A server's record: its heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerRecord {
    pub id: String,
    pub url: String,
    pub started_unix: u64,
    /// Wall-clock time of the heartbeat (shown to operators; liveness never compares it).
    pub heartbeat_unix_ms: u64,
    /// The leases the server held when it wrote the heartbeat.
    #[serde(default)]
    pub leases: Vec<HeldLease>,
    /// Written on a clean shutdown: the server is gone, its leases free at once.
    #[serde(default)]
    pub stopped: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HeldLease {
    /// The VM's name, or [`MAINTENANCE`].
    pub subject: String,
    pub epoch: u64,
    pub since_unix: u64,
}

/// A lease record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Lease {
    pub subject: String,
    pub owner: String,
    pub owner_url: String,
    pub epoch: u64,
    pub taken_unix: u64,
}

/// When a lease held by someone else may be taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Takeover {
    /// Its owner is dead (or it is free, or ours): the normal rule.
    IfOwnerDead,
    /// It is still at the epoch the caller observed (whoever owns it): the caller decided
    /// that owner is gone on its own evidence. Exactly one of several such callers wins.
    IfEpoch(u64),
}

#[derive(Debug, Clone)]
struct Held {
    subject: String,
    epoch: u64,
    since_unix: u64,
}

#[derive(Debug, Clone)]
struct Peer {
    record: ServerRecord,
    version: u64,
    /// When this server saw `version` first (its own clock).
    changed_at: Instant,
}

#[derive(Default)]
struct State {
    held: BTreeMap<String, Held>,
    /// When the last heartbeat write that succeeded started.
    heartbeat_ok: Option<Instant>,
    peers: BTreeMap<String, Peer>,
    /// The TTL's fraction held leases stay valid past the last heartbeat (3/4, see the doc).
    lapsed: u64,
}

/// What one server knows of the cluster. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    records: Records,
    id: String,
    url: String,
    ttl: Duration,
    started_unix: u64,
    state: Mutex<State>,
    /// One take at a time per lease in this process.
    taking: tokio::sync::Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

pub use crate::wire::{LeaseView, ServerView};

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("id", &self.inner.id)
            .field("url", &self.inner.url)
            .finish()
    }
}

impl Cluster {
    pub fn new(records: Records, id: String, url: String, ttl: Duration) -> Cluster {
        Cluster {
            inner: Arc::new(Inner {
                records,
                id,
                url,
                ttl,
                started_unix: crate::util::unix_now(),
                state: Mutex::new(State::default()),
                taking: Default::default(),
            }),
        }
    }

    pub fn id(&self) -> &str {
        &self.inner.id
    }

    pub fn url(&self) -> &str {
        &self.inner.url
    }

    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave it inconsistent (plain inserts): go on.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long after its last heartbeat started a server still counts its own leases.
    fn validity(&self) -> Duration {
        self.inner.ttl * 3 / 4
    }

    fn lease_key(id: &str) -> crate::store::Key {
        layout::record(Family::Lease, id)
    }

    fn server_key(id: &str) -> crate::store::Key {
        layout::record(Family::Server, id)
    }

    /// The epoch this server holds `lease_id` at, if it holds it now.
    pub fn held_epoch(&self, lease_id: &str) -> Option<u64> {
        let st = self.state();
        let fresh = st
            .heartbeat_ok
            .is_some_and(|t| t.elapsed() < self.validity());
        if !fresh {
            return None;
        }
        st.held.get(lease_id).map(|h| h.epoch)
    }

    /// Whether the lease record in the vault still names this server at the epoch it holds
    /// (a read of the record: for a step that must not run once another server took over).
    pub async fn confirm(&self, lease_id: &str) -> bool {
        let Some(epoch) = self.held_epoch(lease_id) else {
            return false;
        };
        match self
            .inner
            .records
            .load::<Lease>(&Self::lease_key(lease_id))
            .await
        {
            Ok(Some(l)) => l.value.owner == self.inner.id && l.value.epoch == epoch,
            _ => false,
        }
    }

    /// Whether this server holds the lease now.
    pub fn holds(&self, lease_id: &str) -> bool {
        self.held_epoch(lease_id).is_some()
    }

    /// Whether server `id` is alive as far as this server has seen.
    pub fn alive(&self, id: &str) -> bool {
        if id == self.inner.id {
            return true;
        }
        let st = self.state();
        Self::peer_alive(&st, id, self.inner.ttl)
    }

    fn peer_alive(st: &State, id: &str, ttl: Duration) -> bool {
        st.peers
            .get(id)
            .is_some_and(|p| !p.record.stopped && p.changed_at.elapsed() < ttl)
    }

    /// Whether a live server other than this one lists `subject` among its leases (from the
    /// heartbeats read: no store access). Background work skips such VMs.
    pub fn held_elsewhere(&self, subject: &str) -> bool {
        let st = self.state();
        st.peers.iter().any(|(id, p)| {
            Self::peer_alive(&st, id, self.inner.ttl)
                && p.record.leases.iter().any(|l| l.subject == subject)
        })
    }

    /// The URLs of the live servers, this one first (credentials list them for agents).
    pub fn live_urls(&self) -> Vec<String> {
        let st = self.state();
        let mut v = vec![self.inner.url.clone()];
        for (id, p) in &st.peers {
            if Self::peer_alive(&st, id, self.inner.ttl) && !v.contains(&p.record.url) {
                v.push(p.record.url.clone());
            }
        }
        v
    }

    /// Serializes takes of one lease in this process.
    async fn take_lock(&self, lease_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.inner
            .taking
            .lock()
            .await
            .entry(lease_id.to_string())
            .or_default()
            .clone()
    }

    /// Takes `lease_id` (for `subject`, the VM's name) under `rule`, at a new epoch, and
    /// returns it. The caller fences the subject's records with the epoch before relying on it
    /// and then calls [`Cluster::mark_held`]. `Err(LeaseHeld)` when a live server holds it.
    pub async fn take(&self, lease_id: &str, subject: &str, rule: Takeover) -> Result<Lease> {
        let me = self.inner.id.clone();
        let url = self.inner.url.clone();
        let ttl = self.inner.ttl;
        let now = crate::util::unix_now();
        let mut previous_owner: Option<String> = None;
        let taken = self
            .inner
            .records
            .update(&Self::lease_key(lease_id), |cur: Option<&Lease>| {
                let epoch = match (cur, rule) {
                    (None, Takeover::IfOwnerDead) => 1,
                    (None, Takeover::IfEpoch(e)) => {
                        if e != 0 {
                            return Err(Error::conflict_recoverable(
                                "lease_moved",
                                format!("lease {subject} is gone (expected epoch {e})"),
                            ));
                        }
                        1
                    }
                    (Some(l), Takeover::IfEpoch(e)) => {
                        if l.epoch != e {
                            return Err(Error::lease_held(subject, &l.owner, &l.owner_url));
                        }
                        l.epoch + 1
                    }
                    (Some(l), Takeover::IfOwnerDead) => {
                        // An empty owner: released.
                        let alive = l.owner == me || l.owner.is_empty() || {
                            let st = self.state();
                            Self::peer_alive(&st, &l.owner, ttl)
                        };
                        if l.owner != me && !l.owner.is_empty() && alive {
                            return Err(Error::lease_held(subject, &l.owner, &l.owner_url));
                        }
                        l.epoch + 1
                    }
                };
                previous_owner = cur.map(|l| l.owner.clone());
                Ok(Some(Lease {
                    subject: subject.to_string(),
                    owner: me.clone(),
                    owner_url: url.clone(),
                    epoch,
                    taken_unix: now,
                }))
            })
            .await?
            .ok_or_else(|| Error::internal("lease record missing after its update"))?;
        if previous_owner.as_deref().is_some_and(|o| o != me) {
            metrics::counter!("drvault_lease_takeovers_total").increment(1);
            tracing::info!(
                lease = subject,
                from = previous_owner.as_deref().unwrap_or(""),
                epoch = taken.value.epoch,
                "took over a lease from a server that is gone"
            );
        }
        Ok(taken.value)
    }

    /// Takes the lease if this server does not hold it, runs `fence(epoch)` (which stamps the
    /// subject's records with the new epoch), and only then counts it held. Returns the epoch.
    pub async fn acquire<F, Fut>(&self, lease_id: &str, subject: &str, fence: F) -> Result<u64>
    where
        F: FnOnce(u64) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        if let Some(e) = self.held_epoch(lease_id) {
            return Ok(e);
        }
        let lock = self.take_lock(lease_id).await;
        let _g = lock.lock().await;
        if let Some(e) = self.held_epoch(lease_id) {
            return Ok(e);
        }
        if !self.heartbeat_fresh() {
            // Without a recent heartbeat the lease would lapse at once: beat first.
            self.heartbeat().await?;
        }
        let lease = self.take(lease_id, subject, Takeover::IfOwnerDead).await?;
        fence(lease.epoch).await?;
        self.mark_held(lease_id, subject, lease.epoch);
        Ok(lease.epoch)
    }

    fn heartbeat_fresh(&self) -> bool {
        self.state()
            .heartbeat_ok
            .is_some_and(|t| t.elapsed() < self.validity())
    }

    /// Counts a lease taken (and fenced) as held.
    pub fn mark_held(&self, lease_id: &str, subject: &str, epoch: u64) {
        let mut st = self.state();
        st.held.insert(
            lease_id.to_string(),
            Held {
                subject: subject.to_string(),
                epoch,
                since_unix: crate::util::unix_now(),
            },
        );
        metrics::gauge!("drvault_leases_held").set(st.held.len() as f64);
    }

    /// Gives a lease up (this server stops working on its subject).
    pub fn forget(&self, lease_id: &str) {
        let mut st = self.state();
        st.held.remove(lease_id);
        metrics::gauge!("drvault_leases_held").set(st.held.len() as f64);
    }

    /// Releases a lease this server holds, in the vault too: another server may take it at
    /// once (maintenance is released after each job).
    pub async fn release(&self, lease_id: &str) -> Result<()> {
        self.forget(lease_id);
        let me = self.inner.id.clone();
        self.inner
            .records
            .update(&Self::lease_key(lease_id), |cur: Option<&Lease>| {
                Ok(cur.filter(|l| l.owner == me).map(|l| Lease {
                    owner: String::new(),
                    owner_url: String::new(),
                    ..l.clone()
                }))
            })
            .await?;
        Ok(())
    }

    /// The other servers alive now, by id.
    pub fn live_peers(&self) -> Vec<String> {
        let st = self.state();
        st.peers
            .keys()
            .filter(|id| Self::peer_alive(&st, id, self.inner.ttl))
            .cloned()
            .collect()
    }

    /// Writes this server's heartbeat and reads the others'. Called every TTL/5, and once
    /// before the server serves.
    pub async fn heartbeat(&self) -> Result<()> {
        let started = Instant::now();
        {
            let mut st = self.state();
            let lapsed = st
                .heartbeat_ok
                .is_some_and(|t| t.elapsed() >= self.validity());
            if lapsed && !st.held.is_empty() {
                // Paused or cut off for most of a TTL: others may have taken these over.
                tracing::warn!(
                    leases = st.held.len(),
                    "no heartbeat for most of the lease TTL: dropping every lease held; they are taken again (at a new epoch) when needed"
                );
                st.held.clear();
                st.lapsed += 1;
                metrics::gauge!("drvault_leases_held").set(0.0);
            }
        }
        self.write_own(false).await?;
        self.state().heartbeat_ok = Some(started);
        self.read_peers().await
    }

    async fn write_own(&self, stopped: bool) -> Result<()> {
        let leases: Vec<HeldLease> = self
            .state()
            .held
            .values()
            .map(|h| HeldLease {
                subject: h.subject.clone(),
                epoch: h.epoch,
                since_unix: h.since_unix,
            })
            .collect();
        let rec = ServerRecord {
            id: self.inner.id.clone(),
            url: self.inner.url.clone(),
            started_unix: self.inner.started_unix,
            heartbeat_unix_ms: crate::util::unix_now_ms(),
            leases: if stopped { Vec::new() } else { leases },
            stopped,
        };
        self.inner
            .records
            .update(
                &Self::server_key(&self.inner.id),
                |_: Option<&ServerRecord>| Ok(Some(rec.clone())),
            )
            .await?;
        Ok(())
    }

    async fn read_peers(&self) -> Result<()> {
        let versions = self.inner.records.latest_versions(Family::Server).await?;
        let mut changed = Vec::new();
        {
            let st = self.state();
            for (id, v) in &versions {
                if *id != self.inner.id && st.peers.get(id).is_none_or(|p| p.version != *v) {
                    changed.push(id.clone());
                }
            }
        }
        for id in changed {
            if let Some(rec) = self
                .inner
                .records
                .load::<ServerRecord>(&Self::server_key(&id))
                .await?
            {
                let mut st = self.state();
                st.peers.insert(
                    id,
                    Peer {
                        record: rec.value,
                        version: rec.version,
                        changed_at: Instant::now(),
                    },
                );
            }
        }
        let mut st = self.state();
        st.peers.retain(|id, _| versions.contains_key(id));
        let live = 1 + st
            .peers
            .keys()
            .filter(|id| Self::peer_alive(&st, id, self.inner.ttl))
            .count();
        metrics::gauge!("drvault_servers_live").set(live as f64);
        drop(st);
        // What `drvault servers` shows, per server.
        for s in self.servers() {
            let labels = [("server", s.id.clone())];
            metrics::gauge!("drvault_server_leases", &labels).set(s.leases.len() as f64);
            metrics::gauge!("drvault_server_seen_age_seconds", &labels).set(s.last_seen_age_s);
            metrics::gauge!("drvault_server_live", &labels).set(if s.live { 1.0 } else { 0.0 });
        }
        Ok(())
    }

    /// Marks this server stopped in the vault (clean shutdown): its leases are free at once.
    pub async fn stop(&self) {
        self.state().held.clear();
        if let Err(e) = self.write_own(true).await {
            tracing::warn!(error = %e, "could not mark this server stopped; its leases free after the TTL");
        }
    }

    /// Every server with a record, this one first, as `drvault servers` shows them.
    pub fn servers(&self) -> Vec<ServerView> {
        let st = self.state();
        let now = crate::util::unix_now();
        let age = |since: u64| now.saturating_sub(since) as f64;
        let mut out = vec![ServerView {
            id: self.inner.id.clone(),
            url: self.inner.url.clone(),
            live: true,
            this_server: true,
            started_unix: self.inner.started_unix,
            last_seen_age_s: st
                .heartbeat_ok
                .map(|t| t.elapsed().as_secs_f64())
                .unwrap_or(0.0),
            leases: st
                .held
                .values()
                .map(|h| LeaseView {
                    vm: h.subject.clone(),
                    epoch: h.epoch,
                    age_s: age(h.since_unix),
                })
                .collect(),
        }];
        for (id, p) in &st.peers {
            let live = Self::peer_alive(&st, id, self.inner.ttl);
            out.push(ServerView {
                id: id.clone(),
                url: p.record.url.clone(),
                live,
                this_server: false,
                started_unix: p.record.started_unix,
                last_seen_age_s: p.changed_at.elapsed().as_secs_f64(),
                leases: if live {
                    p.record
                        .leases
                        .iter()
                        .map(|h| LeaseView {
                            vm: h.subject.clone(),
                            epoch: h.epoch,
                            age_s: age(h.since_unix),
                        })
                        .collect()
                } else {
                    Vec::new()
                },
            });
        }
        out
    }

    /// Starts the heartbeat (every TTL/5) on the server's background tasks.
    pub fn spawn(&self, tasks: &crate::tasks::Tasks) {
        let c = self.clone();
        tasks.every("cluster-heartbeat", self.inner.ttl / 5, move || {
            let c = c.clone();
            async move {
                if let Err(e) = c.heartbeat().await {
                    tracing::warn!(error = %e, "cluster heartbeat failed; retried next period");
                }
            }
        });
    }
}

/// This server's id: configured, or generated once into `<data_dir>/server.id`.
pub fn server_id(configured: Option<&str>, data_dir: &std::path::Path) -> std::io::Result<String> {
    if let Some(id) = configured {
        return Ok(id.to_string());
    }
    let path = data_dir.join("server.id");
    match std::fs::read_to_string(&path) {
        Ok(s) if valid_server_id(s.trim()) => Ok(s.trim().to_string()),
        Ok(_) | Err(_) => {
            let id = format!("s-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
            std::fs::write(&path, &id)?;
            Ok(id)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn two_servers() -> (Cluster, Cluster, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let keys = Arc::new(crate::chunk::KeyRing::random());
        let mk = |name: &str| {
            // Each server its own store handle: they share only the directory, like processes.
            let url = format!("file://{}", dir.path().display());
            let store = crate::store::Store::open(&url, &[]).unwrap();
            let keys = keys.clone();
            let chunks =
                crate::chunk::ChunkStore::new(store, keys, crate::chunk::CpuPool::new(1), 1);
            Cluster::new(
                Records::new(chunks),
                name.to_string(),
                format!("https://{name}"),
                Duration::from_secs(30),
            )
        };
        (mk("a"), mk("b"), dir)
    }

    /// Two servers, each with its own store handle on one vault directory, race for one lease
    /// 1,000 times, each having observed the same epoch: exactly one wins each epoch.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn thousand_races_one_winner_per_epoch() {
        let (a, b, _dir) = two_servers().await;
        let mut wins = [0u32; 2];
        for round in 0..1000u64 {
            let (ra, rb) = tokio::join!(
                a.take("vm1", "vm1", Takeover::IfEpoch(round)),
                b.take("vm1", "vm1", Takeover::IfEpoch(round)),
            );
            let won: Vec<(usize, Lease)> = [ra, rb]
                .into_iter()
                .enumerate()
                .filter_map(|(i, r)| match r {
                    Ok(l) => Some((i, l)),
                    Err(Error::LeaseHeld { .. }) => None,
                    Err(e) => panic!("round {round}: {e}"),
                })
                .collect();
            assert_eq!(won.len(), 1, "round {round}: winners {won:?}");
            let (i, lease) = &won[0];
            assert_eq!(lease.epoch, round + 1, "round {round}");
            assert_eq!(lease.owner, ["a", "b"][*i]);
            wins[*i] += 1;
        }
        // The record agrees with the last winner, and both servers won some rounds (the race
        // was real, not one side always first).
        let last: Lease = a
            .inner
            .records
            .load(&Cluster::lease_key("vm1"))
            .await
            .unwrap()
            .unwrap()
            .value;
        assert_eq!(last.epoch, 1000);
        assert!(wins[0] > 0 && wins[1] > 0, "wins {wins:?}");
    }

    /// A live owner keeps its lease; a stopped one loses it at once; taking bumps the epoch.
    #[tokio::test]
    async fn live_owner_keeps_stopped_owner_loses() {
        let (a, b, _dir) = two_servers().await;
        a.heartbeat().await.unwrap();
        let e = a
            .acquire("vm1", "web01", |_| async { Ok(()) })
            .await
            .unwrap();
        assert_eq!(e, 1);
        b.heartbeat().await.unwrap();
        match b.take("vm1", "web01", Takeover::IfOwnerDead).await {
            Err(Error::LeaseHeld { message, owner_url }) => {
                assert_eq!(owner_url, "https://a");
                assert!(message.contains("server a "), "{message}");
            }
            other => panic!("expected lease_held, got {other:?}"),
        }
        a.stop().await;
        b.heartbeat().await.unwrap();
        let e = b
            .acquire("vm1", "web01", |_| async { Ok(()) })
            .await
            .unwrap();
        assert_eq!(e, 2);
        let views = b.servers();
        assert_eq!(views[0].leases.len(), 1);
        assert!(views.iter().any(|v| v.id == "a" && !v.live));
    }
}
