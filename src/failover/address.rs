//! IP address management for failed-over NICs, with Azure Site Recovery's rules. Pure and
//! deterministic: the same state and request always give the same address.
//!
//! Rules, in order:
//! 1. A static IP asked for in the failover request is used, or the request fails with the
//!    precise reason (outside the subnet, reserved, held by someone else): the operator asked
//!    for that address, silently picking another would be worse.
//! 2. Otherwise the NIC's source IP is kept when it is IPv4, inside the target subnet, not
//!    reserved and free (ASR's IP retention).
//! 3. Otherwise the lowest free, unreserved address of the subnet. The [`Assignment`] says why
//!    the source IP was not kept, for the failover job's warnings.
//!
//! Reserved addresses (never handed out) are Azure's: the first four and the last of every
//! subnet, plus the configured gateway ([`Subnet::reserved_reason`]).
//!
//! The state is one map per `network/subnet` from address to holder; the lead persists it as a
//! versioned record updated with compare-and-swap, so two failovers running at once cannot both
//! get an address. Its invariants: an address has at most one holder, and a holder — (failover
//! id, VM, NIC index) — holds at most one address across all subnets. The second makes a retried
//! failover step idempotent: asking again for the same NIC returns the address it already has
//! (unless a different static IP is now asked for, which then replaces it).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Serialize};

use super::definition::{
    is_unicast_mac, FailoverInfo, FailoverKind, Firmware, NicDefinition, NicModel, NicOptions,
};
use super::network::{
    bridge_name, host_network_name, Ipv4Cidr, NetworkConfig, Subnet, TargetNetwork,
};
use crate::catalog::spec::normalize_mac;
use crate::error::{Error, Result};
use crate::vault::layout::{self, Family};
use crate::wire::VmSpec;

pub use crate::wire::Rule;

/// Who holds an address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub failover_id: String,
    pub vm: String,
    pub nic_index: u32,
    /// `AA:BB:…`; the host network's DHCP server hands the address to this MAC.
    pub mac: String,
    pub rule: Rule,
}

impl Allocation {
    fn same_holder(&self, req: &NicRequest) -> bool {
        self.failover_id == req.failover_id && self.vm == req.vm && self.nic_index == req.nic_index
    }
}

impl fmt::Display for Allocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "NIC {} of VM {} (failover {})",
            self.nic_index, self.vm, self.failover_id
        )
    }
}

/// The allocation state of every subnet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocations {
    /// `network/subnet` → address → holder. BTreeMaps keep the JSON stable for CAS comparisons.
    pools: BTreeMap<String, BTreeMap<Ipv4Addr, Allocation>>,
}

/// One NIC asking for an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicRequest {
    pub vm: String,
    pub nic_index: u32,
    pub mac: String,
    pub failover_id: String,
    pub static_ip: Option<Ipv4Addr>,
    pub source_ip: Option<IpAddr>,
}

/// Why the source IP was not kept (only reported when there was one and no static IP).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "reason")]
pub enum SourceMiss {
    NotIpv4,
    OutsideSubnet { prefix: Ipv4Cidr },
    Reserved { why: String },
    Taken { by: String },
}

impl fmt::Display for SourceMiss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceMiss::NotIpv4 => write!(f, "it is not IPv4"),
            SourceMiss::OutsideSubnet { prefix } => {
                write!(f, "it is outside the target subnet {prefix}")
            }
            SourceMiss::Reserved { why } => write!(f, "it is {why} in the target subnet"),
            SourceMiss::Taken { by } => write!(f, "it is already held by {by}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub ip: Ipv4Addr,
    pub prefix: Ipv4Cidr,
    pub rule: Rule,
    pub source_not_kept: Option<SourceMiss>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    #[error("static IP {ip} for NIC {nic_index} of VM {vm} is outside subnet {pool} ({prefix})")]
    StaticOutsideSubnet {
        vm: String,
        nic_index: u32,
        ip: Ipv4Addr,
        pool: String,
        prefix: Ipv4Cidr,
    },
    #[error("static IP {ip} for NIC {nic_index} of VM {vm} cannot be used in subnet {pool}: it is {why}")]
    StaticReserved {
        vm: String,
        nic_index: u32,
        ip: Ipv4Addr,
        pool: String,
        why: &'static str,
    },
    #[error("static IP {ip} for NIC {nic_index} of VM {vm} in subnet {pool} is already held by {holder}")]
    StaticTaken {
        vm: String,
        nic_index: u32,
        ip: Ipv4Addr,
        pool: String,
        holder: Box<Allocation>,
    },
    #[error("subnet {pool} ({prefix}) has no free address left for NIC {nic_index} of VM {vm} ({allocated} allocated)")]
    Exhausted {
        vm: String,
        nic_index: u32,
        pool: String,
        prefix: Ipv4Cidr,
        allocated: usize,
    },
}

impl From<IpamError> for Error {
    fn from(e: IpamError) -> Error {
        let code = match &e {
            IpamError::StaticOutsideSubnet { .. } => "static_ip_outside_subnet",
            IpamError::StaticReserved { .. } => "static_ip_reserved",
            IpamError::StaticTaken { .. } => "ip_in_use",
            IpamError::Exhausted { .. } => "subnet_full",
        };
        match e {
            IpamError::StaticOutsideSubnet { .. } | IpamError::StaticReserved { .. } => {
                Error::invalid(code, e.to_string())
            }
            IpamError::StaticTaken { .. } | IpamError::Exhausted { .. } => {
                Error::conflict(code, e.to_string())
            }
        }
    }
}

/// The key of a subnet's pool.
pub fn pool_key(network: &TargetNetwork, subnet: &Subnet) -> String {
    format!("{}/{}", network.name(), subnet.name())
}

impl Allocations {
    pub fn new() -> Allocations {
        Allocations::default()
    }

    /// Gives the NIC an address in `subnet` of `network` (rules in the module doc). On error the
    /// state is unchanged.
    pub fn assign(
        &mut self,
        network: &TargetNetwork,
        subnet: &Subnet,
        req: &NicRequest,
    ) -> Result<Assignment, IpamError> {
        let pool = pool_key(network, subnet);
        let prefix = subnet.prefix();
        let held = self.held_by(req);
        // A retry of the same step: hand back what the NIC already has.
        if let Some((held_pool, held_ip, held_rule)) = &held {
            if *held_pool == pool && req.static_ip.is_none_or(|s| s == *held_ip) {
                return Ok(Assignment {
                    ip: *held_ip,
                    prefix,
                    rule: *held_rule,
                    source_not_kept: None,
                });
            }
        }
        let empty = BTreeMap::new();
        let taken = self.pools.get(&pool).unwrap_or(&empty);
        // Addresses this same NIC holds are about to be released, so they do not count as taken.
        let holder_of = |ip: Ipv4Addr| taken.get(&ip).filter(|a| !a.same_holder(req));

        let (ip, rule, source_not_kept) = if let Some(ip) = req.static_ip {
            let refuse_vm = || req.vm.clone();
            if !prefix.contains(ip) {
                return Err(IpamError::StaticOutsideSubnet {
                    vm: refuse_vm(),
                    nic_index: req.nic_index,
                    ip,
                    pool,
                    prefix,
                });
            }
            if let Some(why) = subnet.reserved_reason(ip) {
                return Err(IpamError::StaticReserved {
                    vm: refuse_vm(),
                    nic_index: req.nic_index,
                    ip,
                    pool,
                    why,
                });
            }
            if let Some(holder) = holder_of(ip) {
                let holder = Box::new(holder.clone());
                return Err(IpamError::StaticTaken {
                    vm: refuse_vm(),
                    nic_index: req.nic_index,
                    ip,
                    pool,
                    holder,
                });
            }
            (ip, Rule::Static, None)
        } else {
            let miss = match req.source_ip {
                None => None,
                Some(IpAddr::V6(_)) => Some(SourceMiss::NotIpv4),
                Some(IpAddr::V4(src)) => {
                    if !prefix.contains(src) {
                        Some(SourceMiss::OutsideSubnet { prefix })
                    } else if let Some(why) = subnet.reserved_reason(src) {
                        Some(SourceMiss::Reserved {
                            why: why.to_string(),
                        })
                    } else {
                        holder_of(src).map(|holder| SourceMiss::Taken {
                            by: holder.to_string(),
                        })
                    }
                }
            };
            match (req.source_ip, miss) {
                (Some(IpAddr::V4(src)), None) => (src, Rule::KeptSource, None),
                (_, miss) => {
                    // Each skipped candidate is reserved or taken, so this stops after at most
                    // (allocated + 6) steps even in a /8.
                    let Some(ip) = subnet.usable().find(|ip| holder_of(*ip).is_none()) else {
                        return Err(IpamError::Exhausted {
                            vm: req.vm.clone(),
                            nic_index: req.nic_index,
                            pool,
                            prefix,
                            allocated: taken.len(),
                        });
                    };
                    (ip, Rule::NextFree, miss)
                }
            }
        };

        if held.is_some() {
            self.remove_holder(req);
        }
        let allocation = Allocation {
            failover_id: req.failover_id.clone(),
            vm: req.vm.clone(),
            nic_index: req.nic_index,
            mac: req.mac.clone(),
            rule,
        };
        self.pools.entry(pool).or_default().insert(ip, allocation);
        Ok(Assignment {
            ip,
            prefix,
            rule,
            source_not_kept,
        })
    }

    /// Frees every address of a failover (cleanup of a test failover, or a failed one); returns
    /// the freed addresses with their pool.
    pub fn release(&mut self, failover_id: &str) -> Vec<(String, Ipv4Addr)> {
        let mut freed = Vec::new();
        for (pool, addrs) in self.pools.iter_mut() {
            addrs.retain(|ip, a| {
                let keep = a.failover_id != failover_id;
                if !keep {
                    freed.push((pool.clone(), *ip));
                }
                keep
            });
        }
        // Empty pools would only grow the persisted record.
        self.pools.retain(|_, addrs| !addrs.is_empty());
        freed
    }

    /// Who holds `ip` in `network/subnet`.
    pub fn holder(
        &self,
        network: &TargetNetwork,
        subnet: &Subnet,
        ip: Ipv4Addr,
    ) -> Option<&Allocation> {
        self.pools.get(&pool_key(network, subnet))?.get(&ip)
    }

    /// Every allocation of a subnet, by ascending address.
    pub fn in_subnet<'a>(
        &'a self,
        network: &TargetNetwork,
        subnet: &Subnet,
    ) -> impl Iterator<Item = (Ipv4Addr, &'a Allocation)> + 'a {
        self.pools
            .get(&pool_key(network, subnet))
            .into_iter()
            .flat_map(|m| m.iter().map(|(ip, a)| (*ip, a)))
    }

    /// Total number of allocated addresses.
    pub fn len(&self) -> usize {
        self.pools.values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.pools.is_empty()
    }

    fn held_by(&self, req: &NicRequest) -> Option<(String, Ipv4Addr, Rule)> {
        self.pools.iter().find_map(|(pool, addrs)| {
            addrs
                .iter()
                .find(|(_, a)| a.same_holder(req))
                .map(|(ip, a)| (pool.clone(), *ip, a.rule))
        })
    }

    fn remove_holder(&mut self, req: &NicRequest) {
        for addrs in self.pools.values_mut() {
            addrs.retain(|_, a| !a.same_holder(req));
        }
        self.pools.retain(|_, addrs| !addrs.is_empty());
    }
}

/// Addresses at the start of every subnet that are never handed out (network, gateway, and the
/// two Azure keeps for DNS); the last address (broadcast) is reserved too.
pub const RESERVED_AT_START: u64 = 4;

impl Subnet {
    /// Why `ip` may never be handed out in this subnet, if it may not: Azure's five reserved
    /// addresses plus the configured gateway. Addresses outside the subnet are not "reserved";
    /// callers check containment first.
    pub fn reserved_reason(&self, ip: Ipv4Addr) -> Option<&'static str> {
        let prefix = self.prefix();
        let offset = prefix.offset_of(ip)?;
        if offset == 0 {
            Some("the network address")
        } else if ip == prefix.broadcast() {
            Some("the broadcast address")
        } else if ip == self.gateway() {
            Some("the subnet's gateway")
        } else if offset == 1 {
            Some("reserved for the default gateway (first four addresses of a subnet)")
        } else if offset < RESERVED_AT_START {
            Some("reserved for DNS (first four addresses of a subnet)")
        } else {
            None
        }
    }

    pub fn is_reserved(&self, ip: Ipv4Addr) -> bool {
        self.reserved_reason(ip).is_some()
    }

    /// Addresses that may be handed out, ascending.
    pub fn usable(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        let prefix = self.prefix();
        prefix
            .iter()
            .skip(RESERVED_AT_START as usize)
            .filter(move |ip| !self.is_reserved(*ip))
    }
}

/// Gives every NIC of `spec` its target subnet and address. All or nothing: on error
/// `allocations` is unchanged. `options` is keyed by NIC index.
pub fn assign_nics(
    config: &NetworkConfig,
    allocations: &mut Allocations,
    vm: &str,
    spec: &VmSpec,
    failover: &FailoverInfo,
    options: &BTreeMap<u32, NicOptions>,
) -> Result<Vec<NicDefinition>> {
    let firmware = Firmware::from_generation(spec.generation)?;
    if let Some(i) = options
        .keys()
        .find(|&&i| usize::try_from(i).map_or(true, |i| i >= spec.nics.len()))
    {
        return Err(Error::invalid(
            "unknown_nic",
            format!("VM {vm} has no NIC {i} ({} NICs)", spec.nics.len()),
        ));
    }
    let test = failover.kind == FailoverKind::Test;
    let mut work = allocations.clone();
    let mut out = Vec::with_capacity(spec.nics.len());
    for (i, nic) in spec.nics.iter().enumerate() {
        let index =
            u32::try_from(i).map_err(|_| Error::invalid("invalid_vm_spec", "too many NICs"))?;
        let opts = options.get(&index).cloned().unwrap_or_default();
        let mac = normalize_mac(&nic.mac)
            .filter(|m| is_unicast_mac(m))
            .ok_or_else(|| {
                Error::invalid(
                    "invalid_mac",
                    format!("NIC {i} of VM {vm}: MAC {:?} is not a unicast MAC", nic.mac),
                )
            })?;
        if opts.skip {
            continue;
        }
        let overridden = match (&opts.target, test) {
            (Some(t), false) => {
                let found = t.split_once('/').and_then(|(n, s)| {
                    config
                        .network(n)
                        .and_then(|net| net.subnet(s).map(|sub| (net, sub)))
                });
                Some(found.ok_or_else(|| {
                    Error::invalid(
                        "unknown_target_subnet",
                        format!(
                            "NIC {i} of VM {vm}: target {t:?} is not a configured network/subnet"
                        ),
                    )
                })?)
            }
            _ => None,
        };
        let (net, subnet) = overridden.or_else(|| config.target_for(&nic.network, test)).ok_or_else(|| {
            let which = if test { "test_target" } else { "target" };
            Error::invalid(
                "network_unmapped",
                format!("NIC {i} ({mac}) of VM {vm} is on source network {:?}, which has no mapping with a {which}", nic.network),
            )
        })?;
        // The spec was normalized at protection time; an unparsable address is treated as none.
        let source_ip: Option<IpAddr> = nic.ip.as_deref().and_then(|s| s.parse().ok());
        let req = NicRequest {
            vm: vm.to_string(),
            nic_index: index,
            mac: mac.clone(),
            failover_id: failover.id.clone(),
            static_ip: opts.static_ip,
            source_ip,
        };
        let got = work.assign(net, subnet, &req)?;
        let note = got
            .source_not_kept
            .as_ref()
            .zip(source_ip)
            .map(|(why, src)| format!("source IP {src} not kept: {why}"));
        out.push(NicDefinition {
            index,
            mac,
            model: NicModel::for_firmware(firmware),
            source_network: nic.network.clone(),
            source_ip,
            network: net.name().to_string(),
            subnet: subnet.name().to_string(),
            host_network: host_network_name(net.name(), subnet.name()),
            ip: got.ip,
            prefix_len: got.prefix.prefix_len(),
            gateway: subnet.gateway(),
            dns: net.dns_servers(),
            isolated: net.isolated,
            public_ip: opts.public_ip,
            rule: got.rule,
            note,
        });
    }
    *allocations = work;
    Ok(out)
}

impl super::service::Failovers {
    /// Step 3: every NIC's target and address, in one compare-and-swap on the vault's
    /// allocation record, so concurrent failovers never collide (all NICs or none).
    pub(super) async fn assign_addresses(
        &self,
        vm: &str,
        spec: &VmSpec,
        info: &FailoverInfo,
        options: &BTreeMap<u32, NicOptions>,
    ) -> Result<Vec<NicDefinition>> {
        let mut assigned = None;
        self.vault
            .records
            .update(
                &layout::record(Family::Ipam, "main"),
                |cur: Option<&Allocations>| {
                    let mut a = cur.cloned().unwrap_or_default();
                    let nics = assign_nics(&self.networks, &mut a, vm, spec, info, options)?;
                    assigned = Some(nics);
                    Ok(Some(a))
                },
            )
            .await?;
        assigned.ok_or_else(|| Error::internal("address assignment produced nothing"))
    }

    /// The vault's allocation record as it stands.
    pub(super) async fn allocations(&self) -> Result<Allocations> {
        Ok(self
            .vault
            .records
            .load(&layout::record(Family::Ipam, "main"))
            .await?
            .map(|v| v.value)
            .unwrap_or_default())
    }

    /// A target network as a host sets it up: per subnet its bridge, gateway and every
    /// current allocation as a DHCP reservation (the same list the failover files hold).
    pub async fn host_network(&self, name: &str) -> Result<crate::wire::HostNetworkView> {
        use crate::wire::{DhcpReservation, HostNetworkView, HostSubnetView};
        let net = self.networks.network(name).ok_or_else(|| {
            Error::not_found(
                "network_not_found",
                format!("no target network {name:?} in the server's config"),
            )
        })?;
        let allocations = self.allocations().await?;
        let subnets = net
            .subnets
            .iter()
            .map(|sub| {
                let holders: BTreeMap<Ipv4Addr, &Allocation> =
                    allocations.in_subnet(net, sub).collect();
                let reservations = super::libvirt::dhcp_hosts(&allocations, net, sub)
                    .into_iter()
                    .filter_map(|h| {
                        let a = holders.get(&h.ip)?;
                        Some(DhcpReservation {
                            mac: h.mac.to_ascii_lowercase(),
                            ip: h.ip.to_string(),
                            hostname: h.name,
                            vm: a.vm.clone(),
                            nic_index: a.nic_index,
                            failover_id: a.failover_id.clone(),
                        })
                    })
                    .collect();
                HostSubnetView {
                    name: sub.name().to_string(),
                    host_network: host_network_name(net.name(), sub.name()),
                    bridge: bridge_name(net.name(), sub.name()),
                    prefix: sub.prefix().to_string(),
                    gateway: sub.gateway().to_string(),
                    reservations,
                }
            })
            .collect();
        Ok(HostNetworkView {
            name: net.name().to_string(),
            isolated: net.isolated,
            dns: net.dns_servers().iter().map(|d| d.to_string()).collect(),
            subnets,
        })
    }

    pub(super) async fn release(&self, failover_id: &str) -> Result<()> {
        self.vault
            .records
            .update(
                &layout::record(Family::Ipam, "main"),
                |cur: Option<&Allocations>| {
                    let mut a = cur.cloned().unwrap_or_default();
                    if a.release(failover_id).is_empty() {
                        return Ok(None);
                    }
                    Ok(Some(a))
                },
            )
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn reserved_addresses_follow_azure() {
        let cidr = |s: &str| s.parse::<Ipv4Cidr>().unwrap();
        let s = Subnet::new("app", cidr("10.20.1.0/24"), Some(ip("10.20.1.100")));
        for r in [
            "10.20.1.0",
            "10.20.1.1",
            "10.20.1.2",
            "10.20.1.3",
            "10.20.1.100",
            "10.20.1.255",
        ] {
            assert!(s.is_reserved(ip(r)), "{r}");
        }
        assert_eq!(
            s.reserved_reason(ip("10.20.1.100")),
            Some("the subnet's gateway")
        );
        assert!(!s.is_reserved(ip("10.20.1.4")) && !s.is_reserved(ip("10.20.1.254")));
        assert!(!s.is_reserved(ip("10.20.2.0")), "outside is not 'reserved'");
        assert_eq!(s.usable().count(), 256 - 6);
        let tiny = Subnet::new("t", cidr("10.0.0.8/29"), None);
        assert_eq!(
            tiny.usable().collect::<Vec<_>>(),
            vec![ip("10.0.0.12"), ip("10.0.0.13"), ip("10.0.0.14")]
        );
    }

    fn net(prefix: &str, gateway: Option<&str>) -> (TargetNetwork, Subnet) {
        let p: Ipv4Cidr = prefix.parse().unwrap();
        let sub = Subnet::new("app", p, gateway.map(ip));
        let n = TargetNetwork::new(
            "vnet",
            &["10.0.0.0/8".parse().unwrap()],
            &[],
            false,
            vec![sub.clone()],
        );
        (n, sub)
    }

    fn req(vm: &str, nic: u32, fo: &str) -> NicRequest {
        NicRequest {
            vm: vm.into(),
            nic_index: nic,
            mac: format!("00:15:5D:00:00:{nic:02X}"),
            failover_id: fo.into(),
            static_ip: None,
            source_ip: None,
        }
    }

    fn with_source(mut r: NicRequest, s: &str) -> NicRequest {
        r.source_ip = Some(s.parse().unwrap());
        r
    }

    fn with_static(mut r: NicRequest, s: &str) -> NicRequest {
        r.static_ip = Some(ip(s));
        r
    }

    #[test]
    fn keeps_the_source_ip_when_it_fits() {
        let (n, s) = net("10.20.1.0/24", None);
        let mut a = Allocations::new();
        let got = a
            .assign(&n, &s, &with_source(req("web", 0, "f1"), "10.20.1.50"))
            .unwrap();
        assert_eq!(
            (got.ip, got.rule, got.source_not_kept),
            (ip("10.20.1.50"), Rule::KeptSource, None)
        );
        assert_eq!(
            a.holder(&n, &s, ip("10.20.1.50")).map(|h| h.vm.as_str()),
            Some("web")
        );
    }

    #[test]
    fn next_free_when_the_source_ip_does_not_fit() {
        let (n, s) = net("10.20.1.0/24", Some("10.20.1.1"));
        let mut a = Allocations::new();
        let cases = [
            (
                with_source(req("a", 0, "f"), "192.168.0.5"),
                ip("10.20.1.4"),
                SourceMiss::OutsideSubnet { prefix: s.prefix() },
            ),
            (
                with_source(req("b", 0, "f"), "10.20.1.2"),
                ip("10.20.1.5"),
                SourceMiss::Reserved {
                    why: "reserved for DNS (first four addresses of a subnet)".into(),
                },
            ),
            (
                with_source(req("c", 0, "f"), "10.20.1.255"),
                ip("10.20.1.6"),
                SourceMiss::Reserved {
                    why: "the broadcast address".into(),
                },
            ),
            (
                with_source(req("d", 0, "f"), "10.20.1.4"),
                ip("10.20.1.7"),
                SourceMiss::Taken {
                    by: "NIC 0 of VM a (failover f)".into(),
                },
            ),
            (
                with_source(req("e", 0, "f"), "fd00::5"),
                ip("10.20.1.8"),
                SourceMiss::NotIpv4,
            ),
        ];
        for (r, want, why) in cases {
            let got = a.assign(&n, &s, &r).unwrap();
            assert_eq!(got.ip, want, "{}", r.vm);
            assert_eq!(got.rule, Rule::NextFree);
            assert_eq!(got.source_not_kept, Some(why));
        }
        // No source IP at all: next free, nothing to explain.
        let got = a.assign(&n, &s, &req("f", 0, "f")).unwrap();
        assert_eq!(
            (got.ip, got.rule, got.source_not_kept),
            (ip("10.20.1.9"), Rule::NextFree, None)
        );
    }

    #[test]
    fn next_free_fills_gaps_lowest_first_and_skips_the_gateway() {
        let (n, s) = net("10.20.1.0/24", Some("10.20.1.5"));
        let mut a = Allocations::new();
        a.assign(&n, &s, &with_static(req("x", 0, "f1"), "10.20.1.4"))
            .unwrap();
        a.assign(&n, &s, &with_static(req("y", 0, "f2"), "10.20.1.7"))
            .unwrap();
        // .4 taken, .5 gateway → .6; then .8 (.7 taken).
        assert_eq!(
            a.assign(&n, &s, &req("z", 0, "f3")).unwrap().ip,
            ip("10.20.1.6")
        );
        assert_eq!(
            a.assign(&n, &s, &req("z", 1, "f3")).unwrap().ip,
            ip("10.20.1.8")
        );
        a.release("f1");
        assert_eq!(
            a.assign(&n, &s, &req("w", 0, "f4")).unwrap().ip,
            ip("10.20.1.4")
        );
    }

    #[test]
    fn static_ip_wins_over_the_source_ip() {
        let (n, s) = net("10.20.1.0/24", None);
        let mut a = Allocations::new();
        let r = with_static(with_source(req("web", 0, "f"), "10.20.1.50"), "10.20.1.60");
        let got = a.assign(&n, &s, &r).unwrap();
        assert_eq!(
            (got.ip, got.rule, got.source_not_kept),
            (ip("10.20.1.60"), Rule::Static, None)
        );
    }

    #[test]
    fn bad_static_ips_are_refused_precisely() {
        let (n, s) = net("10.20.1.0/24", Some("10.20.1.200"));
        let mut a = Allocations::new();
        a.assign(&n, &s, &with_static(req("db", 0, "f0"), "10.20.1.10"))
            .unwrap();
        let before = a.clone();

        let e = a
            .assign(&n, &s, &with_static(req("web", 0, "f1"), "10.20.2.10"))
            .unwrap_err();
        assert!(matches!(e, IpamError::StaticOutsideSubnet { .. }), "{e}");
        assert_eq!(Error::from(e).code(), "static_ip_outside_subnet");

        for (r, why) in [
            ("10.20.1.0", "network"),
            ("10.20.1.3", "DNS"),
            ("10.20.1.200", "gateway"),
            ("10.20.1.255", "broadcast"),
        ] {
            let e = a
                .assign(&n, &s, &with_static(req("web", 0, "f1"), r))
                .unwrap_err();
            assert!(
                matches!(&e, IpamError::StaticReserved { why: w, .. } if w.contains(why)),
                "{r}: {e}"
            );
            let e = Error::from(e);
            assert_eq!(
                (e.code(), e.kind()),
                ("static_ip_reserved", Kind::InvalidInput)
            );
        }

        let e = a
            .assign(&n, &s, &with_static(req("web", 0, "f1"), "10.20.1.10"))
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("held by NIC 0 of VM db (failover f0)"),
            "{e}"
        );
        let e = Error::from(e);
        assert_eq!((e.code(), e.kind()), ("ip_in_use", Kind::Conflict));
        assert_eq!(a, before, "refused requests change nothing");
    }

    #[test]
    fn exhaustion_is_an_error() {
        let (n, s) = net("10.20.1.8/29", None);
        let mut a = Allocations::new();
        let got: Vec<Ipv4Addr> = (0..3)
            .map(|i| a.assign(&n, &s, &req("vm", i, "f")).unwrap().ip)
            .collect();
        assert_eq!(
            got,
            vec![ip("10.20.1.12"), ip("10.20.1.13"), ip("10.20.1.14")]
        );
        let e = a.assign(&n, &s, &req("vm", 3, "f")).unwrap_err();
        assert!(
            matches!(e, IpamError::Exhausted { allocated: 3, .. }),
            "{e}"
        );
        assert_eq!(Error::from(e).code(), "subnet_full");
        // Subnets too small for Azure's reservations (config validation refuses them) are
        // simply full.
        for tiny in ["10.20.1.0/30", "10.20.1.0/31", "10.20.1.0/32"] {
            let (n, s) = net(tiny, None);
            assert!(matches!(
                Allocations::new().assign(&n, &s, &req("vm", 0, "f")),
                Err(IpamError::Exhausted { .. })
            ));
        }
    }

    #[test]
    fn retries_are_idempotent_and_a_new_static_ip_replaces_the_old() {
        let (n, s) = net("10.20.1.0/24", None);
        let mut a = Allocations::new();
        let first = a
            .assign(&n, &s, &with_source(req("web", 0, "f"), "10.20.1.50"))
            .unwrap();
        // Same NIC again: same address and rule, even though the source IP is now "taken" (by it).
        let again = a
            .assign(&n, &s, &with_source(req("web", 0, "f"), "10.20.1.50"))
            .unwrap();
        assert_eq!((again.ip, again.rule), (first.ip, Rule::KeptSource));
        assert_eq!(a.len(), 1);
        let moved = a
            .assign(&n, &s, &with_static(req("web", 0, "f"), "10.20.1.70"))
            .unwrap();
        assert_eq!(moved.ip, ip("10.20.1.70"));
        assert_eq!(a.len(), 1);
        assert!(a.holder(&n, &s, ip("10.20.1.50")).is_none());
        // Another failover of the same VM is a different holder.
        let other = a
            .assign(&n, &s, &with_source(req("web", 0, "g"), "10.20.1.70"))
            .unwrap();
        assert_eq!(
            other.source_not_kept,
            Some(SourceMiss::Taken {
                by: "NIC 0 of VM web (failover f)".into()
            })
        );
    }

    #[test]
    fn networks_with_the_same_prefix_are_separate_pools() {
        let (prod, s) = net("10.20.1.0/24", None);
        let drill = TargetNetwork::new(
            "drill",
            &["10.0.0.0/8".parse().unwrap()],
            &[],
            true,
            vec![s.clone()],
        );
        let mut a = Allocations::new();
        let r = with_source(req("web", 0, "f"), "10.20.1.50");
        assert_eq!(a.assign(&prod, &s, &r).unwrap().rule, Rule::KeptSource);
        let r = with_source(req("web", 0, "test1"), "10.20.1.50");
        assert_eq!(a.assign(&drill, &s, &r).unwrap().rule, Rule::KeptSource);
        assert_eq!(a.in_subnet(&drill, &s).count(), 1);
    }

    #[test]
    fn release_frees_only_that_failover_and_round_trips_json() {
        let (n, s) = net("10.20.1.0/24", None);
        let mut a = Allocations::new();
        a.assign(&n, &s, &req("a", 0, "f1")).unwrap();
        a.assign(&n, &s, &req("a", 1, "f1")).unwrap();
        a.assign(&n, &s, &req("b", 0, "f2")).unwrap();
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<Allocations>(&json).unwrap(), a);
        let freed = a.release("f1");
        assert_eq!(
            freed,
            vec![
                ("vnet/app".to_string(), ip("10.20.1.4")),
                ("vnet/app".to_string(), ip("10.20.1.5"))
            ]
        );
        assert_eq!(a.len(), 1);
        assert!(a.release("nope").is_empty());
        a.release("f2");
        assert!(a.is_empty());
        assert_eq!(serde_json::to_string(&a).unwrap(), r#"{"pools":{}}"#);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Assign {
            vm: u8,
            nic: u8,
            fo: u8,
            static_off: Option<u8>,
            source_off: Option<u8>,
        },
        Release {
            fo: u8,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..6, 0u8..3, 0u8..4, proptest::option::of(any::<u8>()), proptest::option::of(any::<u8>()))
                .prop_map(|(vm, nic, fo, static_off, source_off)| Op::Assign { vm, nic, fo, static_off, source_off }),
            1 => (0u8..4).prop_map(|fo| Op::Release { fo }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Random assignments and releases in a /26 (64 addresses, 59 usable; 72 possible
        /// holders so exhaustion happens): never a duplicate, never a reserved address, never
        /// outside the subnet, every holder at most once, and a release makes room again.
        #[test]
        fn random_requests_never_collide(ops in proptest::collection::vec(op(), 1..200)) {
            let (n, s) = net("10.20.1.64/26", Some("10.20.1.100"));
            let mut a = Allocations::new();
            for o in ops {
                match o {
                    Op::Assign { vm, nic, fo, static_off, source_off } => {
                        let mut r = req(&format!("vm{vm}"), u32::from(nic), &format!("f{fo}"));
                        // Offsets around the subnet so some land outside it.
                        let near = |off: u8| Ipv4Addr::from(u32::from(ip("10.20.1.32")) + u32::from(off) % 128);
                        r.static_ip = static_off.filter(|o| o % 4 == 0).map(near);
                        r.source_ip = source_off.map(|o| IpAddr::V4(near(o)));
                        let before = a.clone();
                        match a.assign(&n, &s, &r) {
                            Ok(got) => {
                                prop_assert!(s.prefix().contains(got.ip));
                                prop_assert!(!s.is_reserved(got.ip));
                                prop_assert_eq!(a.holder(&n, &s, got.ip).map(|h| h.same_holder(&r)), Some(true));
                                if let Some(st) = r.static_ip { prop_assert_eq!(got.ip, st); }
                            }
                            Err(IpamError::Exhausted { .. }) => {
                                prop_assert_eq!(&a, &before);
                                prop_assert!(s.usable().all(|ip| a.holder(&n, &s, ip).is_some()));
                            }
                            Err(_) => prop_assert_eq!(&a, &before),
                        }
                    }
                    Op::Release { fo } => {
                        let id = format!("f{fo}");
                        let had = a.len();
                        let freed = a.release(&id);
                        prop_assert_eq!(a.len() + freed.len(), had);
                        prop_assert!(a.in_subnet(&n, &s).all(|(_, h)| h.failover_id != id));
                        // Freed addresses are reusable at once.
                        if let Some((_, first)) = freed.first() {
                            let mut r = req("reuse", 9, "reuse");
                            r.static_ip = Some(*first);
                            prop_assert_eq!(a.assign(&n, &s, &r).map(|g| g.ip), Ok(*first));
                            a.release("reuse");
                        }
                    }
                }
                // Invariants over the whole state.
                let mut holders = BTreeSet::new();
                for (addr, h) in a.in_subnet(&n, &s) {
                    prop_assert!(!s.is_reserved(addr) && s.prefix().contains(addr));
                    prop_assert!(holders.insert((h.failover_id.clone(), h.vm.clone(), h.nic_index)), "holder twice");
                }
            }
        }
    }
}

#[cfg(test)]
mod nic_tests {
    use super::*;
    use crate::failover::definition::tests::{config, definition, spec};
    use crate::failover::definition::{FailoverInfo, FailoverKind, NicModel, NicOptions};

    #[test]
    fn nic_overrides_skip_a_nic_and_move_one_to_another_subnet() {
        let fo = FailoverInfo::new(FailoverKind::Unplanned, "u1", "rp", 0);
        let opts: BTreeMap<u32, NicOptions> = [
            (
                0,
                NicOptions {
                    target: Some("recovery-vnet/db".into()),
                    ..Default::default()
                },
            ),
            (
                1,
                NicOptions {
                    skip: true,
                    ..Default::default()
                },
            ),
        ]
        .into();
        let mut allocs = Allocations::new();
        let nics = assign_nics(&config(), &mut allocs, "web01", &spec(1, 1), &fo, &opts).unwrap();
        assert_eq!(nics.len(), 1, "NIC 1 is skipped");
        assert_eq!((nics[0].index, nics[0].subnet.as_str()), (0, "db"));
        assert!(nics[0].ip.octets()[..3] == [10, 20, 2], "{}", nics[0].ip);

        // A drill ignores the target override (drills stay on the test network).
        let drill = FailoverInfo::new(FailoverKind::Test, "t1", "rp", 0);
        let mut allocs = Allocations::new();
        let nics =
            assign_nics(&config(), &mut allocs, "web01", &spec(1, 1), &drill, &opts).unwrap();
        assert_eq!(nics[0].network, "drill-vnet");

        // An unknown target is refused and allocates nothing.
        let bad: BTreeMap<u32, NicOptions> = [(
            0,
            NicOptions {
                target: Some("recovery-vnet/nope".into()),
                ..Default::default()
            },
        )]
        .into();
        let mut allocs = Allocations::new();
        let e = assign_nics(&config(), &mut allocs, "web01", &spec(1, 1), &fo, &bad).unwrap_err();
        assert_eq!(e.code(), "unknown_target_subnet");
        assert!(allocs.is_empty());
    }

    #[test]
    fn nics_get_targets_and_addresses() {
        let (def, allocs) = definition(2, 1, FailoverKind::Planned, "/vault/fo-1");
        let [app, db] = &def.nics[..] else {
            panic!("{:?}", def.nics)
        };
        assert_eq!(
            (
                app.network.as_str(),
                app.subnet.as_str(),
                app.host_network.as_str()
            ),
            ("recovery-vnet", "app", "recovery-vnet.app")
        );
        assert_eq!(
            (app.ip, app.rule, app.prefix_len),
            ("10.20.1.50".parse().unwrap(), Rule::KeptSource, 24)
        );
        assert_eq!(app.gateway, "10.20.1.1".parse::<Ipv4Addr>().unwrap());
        assert_eq!(app.dns.len(), 2);
        assert!(app.public_ip && !app.isolated && app.note.is_none());
        assert_eq!(app.model, NicModel::Virtio);
        assert_eq!(
            (db.ip, db.rule),
            ("10.20.2.4".parse().unwrap(), Rule::NextFree)
        );
        assert_eq!(db.gateway, "10.20.2.100".parse::<Ipv4Addr>().unwrap());
        assert_eq!(
            db.note.as_deref(),
            Some("source IP 192.168.7.9 not kept: it is outside the target subnet 10.20.2.0/24")
        );
        assert!(!db.public_ip);
        assert_eq!(allocs.len(), 2);
        // A test failover lands on the drill network.
        let (test, _) = definition(2, 1, FailoverKind::Test, "/vault/fo-1");
        assert_eq!(
            (test.nics[0].network.as_str(), test.nics[0].isolated),
            ("drill-vnet", true)
        );
    }

    #[test]
    fn nic_assignment_is_all_or_nothing() {
        let fo = FailoverInfo::new(FailoverKind::Test, "t1", "rp", 0);
        let mut allocs = Allocations::new();
        // The second NIC (backend) has no test target: nothing may stay allocated for the first.
        let e = assign_nics(
            &config(),
            &mut allocs,
            "web01",
            &spec(2, 1),
            &fo,
            &BTreeMap::new(),
        )
        .unwrap_err();
        assert_eq!(e.code(), "network_unmapped");
        assert!(e.to_string().contains("test_target"), "{e}");
        assert!(allocs.is_empty());

        let fo = FailoverInfo::new(FailoverKind::Unplanned, "u1", "rp", 0);
        let bad_static: BTreeMap<u32, NicOptions> = [(
            1,
            NicOptions {
                static_ip: Some("10.20.1.9".parse().unwrap()),
                public_ip: false,
                ..Default::default()
            },
        )]
        .into();
        let e = assign_nics(
            &config(),
            &mut allocs,
            "web01",
            &spec(2, 1),
            &fo,
            &bad_static,
        )
        .unwrap_err();
        assert_eq!(e.code(), "static_ip_outside_subnet");
        assert!(allocs.is_empty());

        let unknown: BTreeMap<u32, NicOptions> = [(2, NicOptions::default())].into();
        assert_eq!(
            assign_nics(&config(), &mut allocs, "web01", &spec(2, 1), &fo, &unknown)
                .unwrap_err()
                .code(),
            "unknown_nic"
        );

        let mut multicast = spec(2, 1);
        multicast.nics[1].mac = "01:00:5E:00:00:01".into();
        let e = assign_nics(
            &config(),
            &mut allocs,
            "web01",
            &multicast,
            &fo,
            &BTreeMap::new(),
        )
        .unwrap_err();
        assert_eq!(e.code(), "invalid_mac");
        assert!(allocs.is_empty());
    }
}
