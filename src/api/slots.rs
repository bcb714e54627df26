//! Connection slots: who may hold a connection, decided when it is accepted.
//!
//! * **General slots** (`server.max_connections`) serve everything. One client address may hold
//!   at most `server.max_connections_per_address` of them, so a single address (one attacker,
//!   or one misbehaving agent) never takes every slot.
//! * **Reserved slots** (`server.reserved_connections`) are used when the general slots are all
//!   taken, or the address holds its share of them. A connection on a reserved slot serves only
//!   `/healthz`, the console's static files and requests with the operator token (others get 429
//!   `connection_limit` with `Retry-After`, see [`super::limits`]); it is closed as soon as its
//!   first request is answered, and an address may hold one reserved connection at a time. So
//!   monitoring and the operator still get in while the general slots are full, and the reserve
//!   cannot be held idle: a holder has at most the header read timeout to send its request.
//! * Beyond that, the connection is closed at once, before the TLS handshake.
//!
//! The accept loop waits (connections stay in the kernel backlog) only when general and
//! reserved slots are all in use.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Reserved connections one address may hold at once: enough for a probe or one operator
/// request, too few for one address to hold the reserve.
const RESERVED_PER_ADDRESS: usize = 1;

/// Why a connection is on a reserved slot (a request extension on its requests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReservedSlot {
    /// Every general slot was taken.
    ServerFull,
    /// The client's address held its share of the general slots.
    AddressFull,
}

/// Slots held per address.
#[derive(Debug, Default)]
struct Held {
    general: usize,
    reserved: usize,
}

/// The slot table of one listener.
#[derive(Debug)]
pub struct Slots {
    /// General plus reserved: the accept loop waits for one of these.
    room: Arc<Semaphore>,
    general: Arc<Semaphore>,
    reserved: Arc<Semaphore>,
    capacity: usize,
    per_address: usize,
    by_address: Mutex<HashMap<IpAddr, Held>>,
}

/// A connection's slot; given back when dropped.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<Slots>,
    ip: IpAddr,
    reserved: Option<ReservedSlot>,
    _room: OwnedSemaphorePermit,
    _kind: OwnedSemaphorePermit,
}

impl Slots {
    pub fn new(general: usize, per_address: usize, reserved: usize) -> Arc<Slots> {
        Arc::new(Slots {
            room: Arc::new(Semaphore::new(general + reserved)),
            general: Arc::new(Semaphore::new(general)),
            reserved: Arc::new(Semaphore::new(reserved)),
            capacity: general + reserved,
            per_address: per_address.max(1),
            by_address: Mutex::new(HashMap::new()),
        })
    }

    /// Waits until some slot is free (`None` once closed).
    pub async fn room(&self) -> Option<OwnedSemaphorePermit> {
        self.room.clone().acquire_owned().await.ok()
    }

    /// The slot a connection from `ip` gets, or `None`: close it at once.
    pub fn admit(self: &Arc<Slots>, ip: IpAddr, room: OwnedSemaphorePermit) -> Option<Slot> {
        // An IPv4 client on a dual-stack socket is the same address as over IPv4.
        let ip = ip.to_canonical();
        // A poisoned lock only means a panic elsewhere while holding it; the table stays usable.
        let mut map = self.by_address.lock().unwrap_or_else(|e| e.into_inner());
        let held = map.entry(ip).or_default();
        let address_full = held.general >= self.per_address;
        let general = if address_full {
            None
        } else {
            self.general.clone().try_acquire_owned().ok()
        };
        let (reserved, kind) = match general {
            Some(p) => {
                held.general += 1;
                (None, p)
            }
            None => {
                let got = (held.reserved < RESERVED_PER_ADDRESS)
                    .then(|| self.reserved.clone().try_acquire_owned().ok())
                    .flatten();
                let Some(p) = got else {
                    if held.general == 0 && held.reserved == 0 {
                        map.remove(&ip);
                    }
                    return None;
                };
                held.reserved += 1;
                let why = if address_full {
                    ReservedSlot::AddressFull
                } else {
                    ReservedSlot::ServerFull
                };
                (Some(why), p)
            }
        };
        Some(Slot {
            slots: self.clone(),
            ip,
            reserved,
            _room: room,
            _kind: kind,
        })
    }

    /// Waits until every slot has been given back (all connections closed).
    pub async fn drained(&self) {
        let n = u32::try_from(self.capacity).unwrap_or(u32::MAX);
        let _ = self.room.acquire_many(n).await;
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.capacity - self.room.available_permits()
    }
}

impl Slot {
    /// `Some` for a connection on a reserved slot.
    pub fn reserved(&self) -> Option<ReservedSlot> {
        self.reserved
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut map = self
            .slots
            .by_address
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(held) = map.get_mut(&self.ip) {
            if self.reserved.is_some() {
                held.reserved = held.reserved.saturating_sub(1);
            } else {
                held.general = held.general.saturating_sub(1);
            }
            if held.general == 0 && held.reserved == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    async fn admit(s: &Arc<Slots>, from: IpAddr) -> Option<Slot> {
        let room = s.room().await?;
        s.admit(from, room)
    }

    #[tokio::test]
    async fn one_address_gets_its_share_then_one_reserved_slot_then_nothing() {
        let s = Slots::new(4, 2, 2);
        let a1 = admit(&s, ip(1)).await.unwrap();
        let a2 = admit(&s, ip(1)).await.unwrap();
        assert_eq!((a1.reserved(), a2.reserved()), (None, None));
        let a3 = admit(&s, ip(1)).await.unwrap();
        assert_eq!(a3.reserved(), Some(ReservedSlot::AddressFull));
        assert!(admit(&s, ip(1)).await.is_none(), "a second reserved slot");
        // Another address still gets general slots.
        let b1 = admit(&s, ip(2)).await.unwrap();
        let b2 = admit(&s, ip(2)).await.unwrap();
        assert_eq!((b1.reserved(), b2.reserved()), (None, None));
        // The general slots are all taken now: a third address lands on the reserve.
        let c = admit(&s, ip(3)).await.unwrap();
        assert_eq!(c.reserved(), Some(ReservedSlot::ServerFull));
        assert_eq!(s.open(), 6);
        // Slots come back when connections end.
        drop((a1, a3));
        let a4 = admit(&s, ip(1)).await.unwrap();
        assert_eq!(a4.reserved(), None);
        drop((a2, a4, b1, b2, c));
        assert_eq!(s.open(), 0);
        assert!(s.by_address.lock().unwrap().is_empty(), "entries linger");
    }

    #[tokio::test]
    async fn drained_waits_for_the_last_connection() {
        let s = Slots::new(2, 2, 1);
        let a = admit(&s, ip(1)).await.unwrap();
        let drained = s.clone();
        let wait = tokio::spawn(async move { drained.drained().await });
        tokio::task::yield_now().await;
        assert!(!wait.is_finished());
        drop(a);
        wait.await.unwrap();
    }
}
