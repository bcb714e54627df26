//! What an agent declares when it enables protection, what the vault records about a VM and its
//! disks, and the prerequisite checks (the seed's "the job checks that the machine complies with
//! prerequisites").

use std::collections::BTreeSet;
use std::net::IpAddr;

use crate::error::{Error, Result};
use crate::file_formats::MAX_DISK_SIZE;
use crate::vault::registry::valid_name;
pub use crate::wire::{DiskSpec, NicSpec, Policy, VmSpec};

/// The longest replication interval a policy may set: a host that replicates less often than
/// daily is not being protected continuously (and "not reporting" would take days to notice).
pub const MAX_INTERVAL_S: u64 = 86_400;

impl Policy {
    pub fn validate(&self) -> Result<()> {
        // Any interval from 1 s: ASR offers 30 s, 5 and 15 min, continuous products run at
        // seconds; the agent's cycle and heartbeat follow it.
        if !(1..=MAX_INTERVAL_S).contains(&self.interval_s) {
            return Err(Error::invalid(
                "invalid_policy",
                format!(
                    "replication interval {} s: must be from 1 s to {MAX_INTERVAL_S} s (a day)",
                    self.interval_s
                ),
            ));
        }
        if self.retention_s < self.interval_s {
            return Err(Error::invalid(
                "invalid_policy",
                "retention must be at least one replication interval",
            ));
        }
        if self.app_consistent_every_s != 0 && self.app_consistent_every_s < self.interval_s {
            return Err(Error::invalid(
                "invalid_policy",
                "app-consistent frequency must be 0 or at least one replication interval",
            ));
        }
        Ok(())
    }
}

/// Checks the spec and returns it normalized (MACs upper-case with colons, IPs canonical),
/// plus the warnings to record on the VM.
pub fn validate(
    vm: &str,
    spec: &VmSpec,
    mapped_networks: &BTreeSet<String>,
) -> Result<(VmSpec, Vec<String>)> {
    let bad = |m: String| Err(Error::invalid("invalid_vm_spec", m));
    if !valid_name(vm) {
        return bad(format!("VM name {vm:?}: use 1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit"));
    }
    if !(1..=2).contains(&spec.generation) {
        return bad(format!(
            "generation {}: must be 1 (BIOS) or 2 (UEFI)",
            spec.generation
        ));
    }
    if !(1..=240).contains(&spec.cpus) {
        return bad(format!("cpus {}: must be 1-240", spec.cpus));
    }
    if !(32..=12 * 1024 * 1024).contains(&spec.memory_mib) {
        return bad(format!(
            "memory {} MiB: must be 32 MiB - 12 TiB",
            spec.memory_mib
        ));
    }
    if spec.disks.is_empty() || spec.disks.len() > 64 {
        return bad(format!("{} disks: a VM needs 1-64 disks", spec.disks.len()));
    }
    let mut ids = BTreeSet::new();
    for d in &spec.disks {
        if !valid_name(&d.id) {
            return bad(format!(
                "disk id {:?}: use 1-64 characters from A-Z a-z 0-9 . _ -",
                d.id
            ));
        }
        if !ids.insert(d.id.as_str()) {
            return bad(format!("disk id {:?} appears twice", d.id));
        }
        if d.size == 0 || d.size % 512 != 0 {
            return bad(format!(
                "disk {}: size {} is not a whole, non-zero number of 512-byte sectors",
                d.id, d.size
            ));
        }
        if d.size > MAX_DISK_SIZE {
            return bad(format!(
                "disk {}: size {} exceeds the 4 TiB limit",
                d.id, d.size
            ));
        }
    }
    if spec.nics.len() > 16 {
        return bad(format!("{} NICs: at most 16", spec.nics.len()));
    }
    let mut out = spec.clone();
    let mut macs = BTreeSet::new();
    for (i, n) in out.nics.iter_mut().enumerate() {
        if !valid_name(&n.network) {
            return bad(format!(
                "NIC {i}: network name {:?} is not valid",
                n.network
            ));
        }
        n.mac = normalize_mac(&n.mac).ok_or_else(|| {
            Error::invalid(
                "invalid_vm_spec",
                format!("NIC {i}: MAC {:?} is not six hex octets", n.mac),
            )
        })?;
        if !macs.insert(n.mac.clone()) {
            return bad(format!("NIC {i}: MAC {} appears twice", n.mac));
        }
        if let Some(ip) = &n.ip {
            let parsed: IpAddr = ip.parse().map_err(|_| {
                Error::invalid(
                    "invalid_vm_spec",
                    format!("NIC {i}: {ip:?} is not an IP address"),
                )
            })?;
            n.ip = Some(parsed.to_string());
        }
    }
    let warnings = unmapped_nic_warnings(&out.nics, mapped_networks);
    let policy = out.policy.clone().unwrap_or_default();
    policy.validate()?;
    out.policy = Some(policy);
    Ok((out, warnings))
}

/// A warning for each NIC whose source network has no mapping in `mapped_networks` (the
/// server's configuration now: a mapping added later and a restart clear it).
pub fn unmapped_nic_warnings(nics: &[NicSpec], mapped_networks: &BTreeSet<String>) -> Vec<String> {
    nics.iter()
        .enumerate()
        .filter(|(_, n)| !mapped_networks.contains(&n.network))
        .map(|(i, n)| {
            format!(
                "NIC {} ({}) is on source network {:?}, which has no network mapping yet: failover needs one",
                i, n.mac, n.network
            )
        })
        .collect()
}

/// `aa-bb-cc-dd-ee-ff` or `aa:bb:…` → `AA:BB:CC:DD:EE:FF`.
pub fn normalize_mac(s: &str) -> Option<String> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6
        || parts
            .iter()
            .any(|p| p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return None;
    }
    Some(parts.join(":").to_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec {
            generation: 2,
            cpus: 2,
            memory_mib: 2048,
            disks: vec![DiskSpec {
                id: "os".into(),
                size: 1 << 30,
            }],
            nics: vec![NicSpec {
                network: "corp".into(),
                mac: "00-15-5d-01-02-03".into(),
                ip: Some("10.0.0.5".into()),
            }],
            policy: None,
        }
    }

    #[test]
    fn normalizes_and_warns_on_unmapped_network() {
        let (s, w) = validate("web01", &spec(), &BTreeSet::new()).unwrap();
        assert_eq!(s.nics[0].mac, "00:15:5D:01:02:03");
        assert_eq!(w.len(), 1);
        let mapped: BTreeSet<String> = ["corp".to_string()].into();
        assert!(validate("web01", &spec(), &mapped).unwrap().1.is_empty());
    }

    #[test]
    fn any_interval_from_one_second_to_a_day_is_a_valid_policy() {
        for interval_s in [1, 2, 5, 30, 60, 300, 900, MAX_INTERVAL_S] {
            let p = Policy {
                interval_s,
                retention_s: interval_s,
                app_consistent_every_s: interval_s,
            };
            p.validate()
                .unwrap_or_else(|e| panic!("{interval_s} s refused: {e}"));
        }
        let e = Policy {
            interval_s: 0,
            ..Policy::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(e.code(), "invalid_policy");
        assert!(e.to_string().contains("from 1 s"), "{e}");
    }

    #[test]
    fn refuses_bad_specs() {
        let m = BTreeSet::new();
        let mut cases: Vec<(&str, VmSpec)> = Vec::new();
        let mut s = spec();
        s.disks[0].size = 1000;
        cases.push(("web", s));
        let mut s = spec();
        s.disks.push(s.disks[0].clone());
        cases.push(("web", s));
        let mut s = spec();
        s.disks[0].size = MAX_DISK_SIZE + 512;
        cases.push(("web", s));
        let mut s = spec();
        s.nics[0].mac = "00:15:5d:01:02".into();
        cases.push(("web", s));
        let mut s = spec();
        s.nics[0].ip = Some("10.0.0.256".into());
        cases.push(("web", s));
        let mut s = spec();
        s.disks[0].id = "../etc".into();
        cases.push(("web", s));
        cases.push(("../x", spec()));
        let mut s = spec();
        s.generation = 3;
        cases.push(("web", s));
        let mut s = spec();
        s.policy = Some(Policy {
            interval_s: 0,
            ..Policy::default()
        });
        cases.push(("web", s));
        let mut s = spec();
        s.policy = Some(Policy {
            interval_s: MAX_INTERVAL_S + 1,
            retention_s: 7 * MAX_INTERVAL_S,
            app_consistent_every_s: 0,
        });
        cases.push(("web", s));
        for (name, s) in cases {
            assert!(validate(name, &s, &m).is_err(), "{name} {s:?} accepted");
        }
    }
}
