//! Memory of upload bodies being received: a global budget with a per-host share.
//!
//! A block or patch body is read whole into memory before it is hashed, compressed and stored,
//! and a change log is cut into frames as it streams; both need memory for as long as the
//! client takes to send. Bodies are read *before* an ingest slot is taken (the slot is held only
//! while the server works on a complete body), so a slow sender must not be able to hold memory
//! other hosts need either:
//!
//! * every body reserves its length (a block's `Content-Length`, or the route's limit; a log one
//!   frame) from its host's share (`ingest.body_memory_per_host_mib`) and then from the global
//!   budget (`ingest.body_memory_mib`) before a byte is read, and keeps it until the request
//!   ends. Until the reservation is granted, the body waits on the socket (back-pressure on that
//!   sender only);
//! * the share is at most half the budget (checked in the config), so no single host exhausts
//!   it: one host trickling any number of uploads delays only itself;
//! * a body larger than the share (a disk made with blocks bigger than today's share) reserves
//!   the whole share: that host then receives one body at a time.
//!
//! Waiting for a reservation is the server's back-pressure, not the client's slowness, so it
//! does not count against the minimum body rate ([`super::limits`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::Error;

/// Reservations are counted in KiB so a `u32` of permits covers any body.
const UNIT: u64 = 1024;

/// The budget of one server.
#[derive(Debug)]
pub struct BodyBudget {
    global: Arc<Semaphore>,
    global_units: u32,
    per_host_units: u32,
    /// One share per host that has uploaded since the start (bounded by the registered hosts:
    /// a body is reserved only after its request was authenticated).
    hosts: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// Memory reserved for one body; given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    _host: OwnedSemaphorePermit,
    _global: OwnedSemaphorePermit,
}

impl BodyBudget {
    /// `global` and `per_host` in bytes.
    pub fn new(global: u64, per_host: u64) -> Arc<BodyBudget> {
        let units = |b: u64| u32::try_from(b.div_ceil(UNIT).max(1)).unwrap_or(u32::MAX);
        let global_units = units(global);
        Arc::new(BodyBudget {
            global: Arc::new(Semaphore::new(global_units as usize)),
            global_units,
            per_host_units: units(per_host).min(global_units),
            hosts: Mutex::new(HashMap::new()),
        })
    }

    /// Waits until `host` may hold `bytes` more of body in memory.
    pub async fn reserve(&self, host: &str, bytes: u64) -> Result<Reservation, Error> {
        let want = u32::try_from(bytes.div_ceil(UNIT).max(1))
            .unwrap_or(u32::MAX)
            .min(self.per_host_units);
        let share = {
            // A poisoned lock only means a panic elsewhere while holding it; the map is usable.
            let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
            hosts
                .entry(host.to_string())
                .or_insert_with(|| Arc::new(Semaphore::new(self.per_host_units as usize)))
                .clone()
        };
        let closed = |_| Error::internal("body memory budget closed");
        // The host's own share first: while it waits for that, it holds nothing of the budget.
        let host_permit = share.acquire_many_owned(want).await.map_err(closed)?;
        let global_permit = self
            .global
            .clone()
            .acquire_many_owned(want.min(self.global_units))
            .await
            .map_err(closed)?;
        Ok(Reservation {
            _host: host_permit,
            _global: global_permit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MIB: u64 = 1 << 20;

    #[tokio::test(start_paused = true)]
    async fn one_host_waits_for_its_share_while_others_go_on() {
        let b = BodyBudget::new(8 * MIB, 4 * MIB);
        let mut a = Vec::new();
        for _ in 0..4 {
            a.push(b.reserve("a", MIB).await.unwrap());
        }
        // Host a's share is used up: its fifth body waits...
        let fifth = tokio::time::timeout(Duration::from_secs(5), b.reserve("a", MIB)).await;
        assert!(fifth.is_err(), "a host went past its share");
        // ...while host b gets the rest of the budget at once.
        let mut bs = Vec::new();
        for _ in 0..4 {
            bs.push(b.reserve("b", MIB).await.unwrap());
        }
        // The budget is full now: host c waits until someone finishes.
        let c = tokio::spawn({
            let b = b.clone();
            async move { b.reserve("c", MIB).await.map(|_| ()) }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!c.is_finished());
        drop(bs.pop());
        c.await.unwrap().unwrap();
        drop(a.pop());
        b.reserve("a", MIB).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_larger_than_the_share_takes_the_whole_share() {
        let b = BodyBudget::new(8 * MIB, 2 * MIB);
        let big = b.reserve("a", 64 * MIB).await.unwrap();
        let next = tokio::time::timeout(Duration::from_secs(5), b.reserve("a", 1)).await;
        assert!(next.is_err(), "the share was not all taken");
        drop(big);
        b.reserve("a", 64 * MIB).await.unwrap();
    }
}
