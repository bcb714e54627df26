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

use super::network::{Ipv4Cidr, Subnet, TargetNetwork};
use crate::error::Error;

/// Which rule gave a NIC its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    Static,
    KeptSource,
    NextFree,
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
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
