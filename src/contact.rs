//! What the server knows of each host from its agent's heartbeats (`POST /v1/agent/heartbeat`):
//! the last report per host and when it arrived. Health ("host not reporting", an agent's
//! non-recoverable error) and the displays (`drvault vms`, `drvault host list`, the console,
//! /metrics) read it from here.
//!
//! A heartbeat only changes memory, so the handler stays cheap however many hosts report; the
//! book is written to the vault (`records/contact/hosts`) by a background task at most every
//! [`PERSIST_EVERY`], and only when something changed since the last write. A restarted server
//! therefore still knows when each host last reported (up to that much older than the truth)
//! and keeps counting a silent host's silence from there. Hosts driven by hand (`agent protect`,
//! `agent replicate`) never send a heartbeat and have no entry: the rules built on heartbeats
//! do not apply to them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::vault::layout::{self, Family};
use crate::vault::Records;
use crate::wire::{Heartbeat, VmReport};

/// Longest delay between a heartbeat and the vault record that holds it.
pub const PERSIST_EVERY: Duration = Duration::from_secs(5);

/// A host's last heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostContact {
    pub agent_version: String,
    /// The agent's heartbeat interval, seconds (at least 1).
    pub interval_s: u64,
    /// When the server received the heartbeat (Unix seconds, the server's clock).
    pub last_contact_unix: u64,
    /// The VMs the heartbeat reported, by name.
    pub vms: BTreeMap<String, VmReport>,
}

/// Every host's last heartbeat: the persisted record.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ContactBook {
    hosts: BTreeMap<String, HostContact>,
}

/// The contact service. Cheap to clone.
#[derive(Clone)]
pub struct Contacts {
    records: Records,
    // A std lock: no await happens while it is held, and heartbeats only replace one entry.
    book: Arc<RwLock<ContactBook>>,
    dirty: Arc<AtomicBool>,
    /// Hosts forgotten here since the last write (other servers' books may still hold them).
    forgotten: Arc<std::sync::Mutex<Vec<String>>>,
}

impl ContactBook {
    /// Takes in `other`'s entries where they are newer: several servers on one vault each
    /// receive some hosts' heartbeats (agents follow the VMs' leases).
    fn merge(&mut self, other: &ContactBook) {
        for (host, c) in &other.hosts {
            let newer = self
                .hosts
                .get(host)
                .is_none_or(|mine| mine.last_contact_unix < c.last_contact_unix);
            if newer {
                self.hosts.insert(host.clone(), c.clone());
            }
        }
    }
}

fn record_key() -> crate::store::Key {
    layout::record(Family::Contact, "hosts")
}

impl Contacts {
    /// Loads the book the last server wrote (empty on a new vault).
    pub async fn load(records: Records) -> Result<Contacts> {
        let book = records
            .load::<ContactBook>(&record_key())
            .await?
            .map(|v| v.value)
            .unwrap_or_default();
        Ok(Contacts {
            records,
            book: Arc::new(RwLock::new(book)),
            dirty: Arc::new(AtomicBool::new(false)),
            forgotten: Default::default(),
        })
    }

    /// Records `host`'s heartbeat, received at `now` (Unix seconds), replacing its last one.
    pub fn record(&self, host: &str, hb: &Heartbeat, now: u64) {
        let contact = HostContact {
            agent_version: hb.agent_version.clone(),
            interval_s: hb.interval_s.max(1),
            last_contact_unix: now,
            vms: hb.vms.iter().map(|v| (v.vm.clone(), v.clone())).collect(),
        };
        self.write().hosts.insert(host.to_string(), contact);
        self.dirty.store(true, Ordering::Release);
    }

    /// The last heartbeat of `host`, if it ever sent one.
    pub fn host(&self, host: &str) -> Option<HostContact> {
        self.read().hosts.get(host).cloned()
    }

    /// Every host that ever sent a heartbeat, by name.
    pub fn all(&self) -> BTreeMap<String, HostContact> {
        self.read().hosts.clone()
    }

    /// Forgets a removed host.
    pub fn forget(&self, host: &str) {
        if self.write().hosts.remove(host).is_some() {
            self.dirty.store(true, Ordering::Release);
        }
        self.forgotten
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(host.to_string());
    }

    /// Writes the book to the vault when it changed since the last write. On failure the
    /// change stays pending for the next call.
    ///
    /// The write merges with the record (newest contact per host wins), and what other servers
    /// wrote is taken into memory: any server shows every host's last contact.
    pub async fn persist(&self) -> Result<()> {
        if !self.dirty.swap(false, Ordering::AcqRel) {
            let theirs = self.records.load::<ContactBook>(&record_key()).await?;
            if let Some(v) = theirs {
                self.write().merge(&v.value);
            }
            return Ok(());
        }
        let book = self.read().clone();
        let forgotten: Vec<String> =
            std::mem::take(&mut *self.forgotten.lock().unwrap_or_else(|p| p.into_inner()));
        let r = self
            .records
            .update(&record_key(), |cur: Option<&ContactBook>| {
                let mut merged = book.clone();
                if let Some(cur) = cur {
                    merged.merge(cur);
                }
                for h in &forgotten {
                    merged.hosts.remove(h);
                }
                Ok(Some(merged))
            })
            .await;
        match r {
            Ok(Some(v)) => {
                self.write().merge(&v.value);
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => {
                self.dirty.store(true, Ordering::Release);
                self.forgotten
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(forgotten);
                Err(e)
            }
        }
    }

    /// Runs [`Contacts::persist`] every [`PERSIST_EVERY`] on `tasks`.
    pub fn spawn_persist(&self, tasks: &crate::tasks::Tasks) {
        let me = self.clone();
        tasks.every("contact-persist", PERSIST_EVERY, move || {
            let me = me.clone();
            async move {
                if let Err(e) = me.persist().await {
                    tracing::warn!(error = %e, "could not save the hosts' last heartbeats; retried");
                }
            }
        });
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, ContactBook> {
        // A panic while holding the lock cannot leave a half-replaced entry (insert and remove
        // are single steps), so a poisoned lock's data is still sound.
        self.book.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, ContactBook> {
        self.book.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{DiskBacklog, VmReport};

    fn beat(vm: &str, backlog: u64) -> Heartbeat {
        Heartbeat {
            agent_version: "1.2.3".into(),
            interval_s: 5,
            vms: vec![VmReport {
                vm: vm.into(),
                replicating: true,
                disks: vec![DiskBacklog {
                    disk: "os".into(),
                    backlog_bytes: backlog,
                    pending_logs: 1,
                    oldest_pending_unix: Some(10),
                }],
                last_error: None,
                last_cycle_unix: Some(9),
            }],
        }
    }

    #[tokio::test]
    async fn a_restarted_server_knows_when_each_host_last_reported() {
        let (_s, vault) = crate::services::testing::memory().await;
        let c = Contacts::load(vault.records.clone()).await.unwrap();
        c.record("hv01", &beat("web", 7), 1000);
        c.record("hv02", &beat("db", 0), 1001);
        c.persist().await.unwrap();
        c.record("hv01", &beat("web", 9), 1002);
        // Not persisted yet: a restart now sees the state of the last write.
        let again = Contacts::load(vault.records.clone()).await.unwrap();
        assert_eq!(again.host("hv01").unwrap().last_contact_unix, 1000);
        assert_eq!(again.host("hv02").unwrap().vms["db"].vm, "db");
        c.persist().await.unwrap();
        let again = Contacts::load(vault.records.clone()).await.unwrap();
        let h = again.host("hv01").unwrap();
        assert_eq!(
            (h.last_contact_unix, h.vms["web"].disks[0].backlog_bytes),
            (1002, 9)
        );
        assert_eq!(again.all().len(), 2);
    }
}
