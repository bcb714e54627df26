//! The object key layout of a vault. Every key drvault writes is built here, from ids the server
//! made (keyed hashes of names, UUIDs, content names): no caller text reaches a key.
//!
//! ```text
//! vault/keycheck                            sealed; proves the key ring opens this vault
//! chunks/<3 hex>/<64 hex>                   block contents (content-addressed, shared by all disks)
//! maps/<3 hex>/<64 hex>                     block-map roots and segments (content-addressed)
//! packs/<3 hex>/<64 hex>                    packs of sealed block pieces (random names)
//! records/<family>/<id>/v<20 digits>        versioned records: registry, vm, disk, job
//! records/vault/format/v<20 digits>         the vault's current format (absent: the key check's)
//! stage/<vm>/<disk>/<session>/<10 digits>   receipts of blocks received in a replication session
//! logs/<vm>/<disk>/<log id>/f<8 digits>      frames of a change log (1 MiB of the .hrl each)
//! logs/<vm>/<disk>/<log id>/extents          its validated extent list
//! quarantine/<original key>/<unix seconds>  a damaged object verify moved out of the way
//! audit/<20 digits>                         one audit-log entry per sequence number (create-only)
//! ```

use crate::chunk::ChunkName;
use crate::file_formats::KEY_FANOUT_HEX;
use crate::store::Key;

fn key(segments: &[&str]) -> Key {
    // Every caller passes fixed words, hex, decimal digits or UUIDs: all safe segments.
    Key::new(segments).unwrap_or_else(|| unreachable!("unsafe key segment in {segments:?}"))
}

pub fn key_check() -> Key {
    key(&["vault", "keycheck"])
}

/// The versioned record holding the vault's current format (absent: the key check's).
pub fn vault_format() -> Key {
    record(Family::Vault, "format")
}

pub fn map_object(name: &ChunkName) -> Key {
    let h = name.to_hex();
    key(&["maps", &h[..KEY_FANOUT_HEX], &h])
}

pub fn pack_object(name: &ChunkName) -> Key {
    let h = name.to_hex();
    key(&["packs", &h[..KEY_FANOUT_HEX], &h])
}

/// Families of versioned records.
#[derive(Debug, Clone, Copy)]
pub enum Family {
    Registry,
    Vm,
    Disk,
    Job,
    Failover,
    Ipam,
    Plan,
    Resync,
    Failback,
    /// Verify and garbage collection: the damage register and the job reports.
    Scrub,
    /// The hosts' last heartbeats (`contact/hosts`).
    Contact,
    /// Each server sharing the vault: its heartbeat and the leases it holds (`server/<id>`).
    Server,
    /// Who may change a VM (`lease/<vm id>`), or run maintenance (`lease/maintenance`).
    Lease,
    /// Vault-wide settings: the format number (`vault/format`).
    Vault,
}

impl Family {
    fn word(self) -> &'static str {
        match self {
            Family::Registry => "registry",
            Family::Vm => "vm",
            Family::Disk => "disk",
            Family::Job => "job",
            Family::Failover => "failover",
            Family::Ipam => "ipam",
            Family::Plan => "plan",
            Family::Resync => "resync",
            Family::Failback => "failback",
            Family::Scrub => "scrub",
            Family::Contact => "contact",
            Family::Server => "server",
            Family::Lease => "lease",
            Family::Vault => "vault",
        }
    }
}

/// Prefix under which the versions of one record live.
pub fn record(family: Family, id: &str) -> Key {
    key(&["records", family.word(), id])
}

pub fn record_family(family: Family) -> Key {
    key(&["records", family.word()])
}

pub fn record_version(prefix: &Key, version: u64) -> Key {
    let v = format!("v{version:020}");
    let segs: Vec<&str> = prefix
        .as_str()
        .split('/')
        .chain(std::iter::once(v.as_str()))
        .collect();
    key(&segs)
}

/// Parses the version from a listed record key's last segment.
pub fn parse_record_version(k: &Key) -> Option<u64> {
    let n = k.name().strip_prefix('v')?;
    if n.len() != 20 {
        return None;
    }
    n.parse().ok()
}

pub fn disk_record_id(vm_id: &str, disk_id: &str) -> String {
    format!("{vm_id}-{disk_id}")
}

pub fn stage_session(vm_id: &str, disk_id: &str, session: &str) -> Key {
    key(&["stage", vm_id, disk_id, session])
}

pub fn stage_receipt(vm_id: &str, disk_id: &str, session: &str, index: u64) -> Key {
    key(&["stage", vm_id, disk_id, session, &format!("{index:010}")])
}

/// Prefix of one stored change log: its frames and its extent index live under it.
pub fn log_prefix(vm_id: &str, disk_id: &str, log_id: &str) -> Key {
    key(&["logs", vm_id, disk_id, log_id])
}

/// Frame `n` of a stored change log.
pub fn log_frame(vm_id: &str, disk_id: &str, log_id: &str, n: u64) -> Key {
    key(&["logs", vm_id, disk_id, log_id, &format!("f{n:08}")])
}

/// The validated extent list of a stored change log.
pub fn log_extents(vm_id: &str, disk_id: &str, log_id: &str) -> Key {
    key(&["logs", vm_id, disk_id, log_id, "extents"])
}

/// The prefix of the audit log's entries.
pub fn audit_prefix() -> Key {
    key(&["audit"])
}

/// Audit-log entry `seq`: one object each, written once, so an append never rewrites.
pub fn audit_entry(seq: u64) -> Key {
    key(&["audit", &format!("{seq:020}")])
}

/// The sequence number of a listed audit entry's key (`None` for anything else under the
/// prefix, e.g. a local vault's staging file of an interrupted write).
pub fn parse_audit_entry(k: &Key) -> Option<u64> {
    let n = k.name();
    if n.len() != 20 || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

/// Where verify keeps a damaged object's bytes: under its original key (so an operator sees what
/// it was), stamped with the time, outside every prefix the server reads or collects. `None`
/// when the key is too deep to nest (no key drvault writes is).
pub fn quarantine(original: &Key, unix: u64) -> Option<Key> {
    let t = unix.to_string();
    let segs: Vec<&str> = std::iter::once("quarantine")
        .chain(original.as_str().split('/'))
        .chain(std::iter::once(t.as_str()))
        .collect();
    Key::new(&segs)
}

/// The prefix of the stored log a key under `logs/` belongs to (`logs/<vm>/<disk>/<log id>`).
pub fn log_prefix_of(k: &Key) -> Option<&str> {
    let s = k.as_str();
    if !s.starts_with("logs/") {
        return None;
    }
    let end = s.match_indices('/').nth(3).map(|(i, _)| i)?;
    s.get(..end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quarantine_and_log_prefixes() {
        let k = log_frame("v", "d", "l", 3);
        assert_eq!(log_prefix_of(&k), Some("logs/v/d/l"));
        assert_eq!(
            log_prefix_of(&log_extents("v", "d", "l")),
            Some("logs/v/d/l")
        );
        assert_eq!(log_prefix_of(&log_prefix("v", "d", "l")), None);
        assert_eq!(log_prefix_of(&key_check()), None);
        assert_eq!(
            quarantine(&k, 17).map(|q| q.to_string()).as_deref(),
            Some("quarantine/logs/v/d/l/f00000003/17")
        );
    }
}
