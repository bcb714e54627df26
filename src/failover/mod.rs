//! Failover: a recovery point becomes fixed VHD disks plus a VM definition attached to a target
//! virtual network (Azure Site Recovery's model).
//!
//! A failover job ([`service`]) runs four steps, a module each:
//! 1. [`choose`] the recovery point (a planned failover waits for the final logs), taking every
//!    disk's point reader;
//! 2. [`materialize`] each disk as a fixed VHD, read through the point reader only ([`output`]
//!    is the file it writes, [`azure_target`] the page blob when the target is Azure storage);
//! 3. [`address`]: every NIC's target subnet and address (static, kept source IP, or next
//!    free), as pure state persisted with one compare-and-swap, and released again on cleanup;
//! 4. [`definition`]: the VM definition (vm.json) written next to the disks with its renderings,
//!    [`libvirt`] domain and network XML and a [`qemu`] command line.
//!
//! Around them: [`network`] (target networks, subnets and the source → target mapping from the
//! server config; the IPv4 prefix type), [`plan`] (recovery plans: groups of VMs in order) and
//! [`failback`] (the failed-over disk synced back on-premises).

pub mod address;
pub mod azure_target;
pub mod choose;
pub mod definition;
pub mod failback;
pub mod libvirt;
pub mod materialize;
pub mod network;
pub mod output;
pub mod plan;
pub mod qemu;
pub mod service;
