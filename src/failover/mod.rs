//! Failover: a recovery point becomes fixed VHD disks plus a VM definition attached to a target
//! virtual network (Azure Site Recovery's model).
//!
//! - [`network`]: target networks, subnets and the source → target network mapping from the
//!   server config, with line-accurate validation; the IPv4 prefix type.
//! - [`address`]: which address each failed-over NIC gets (static, kept source IP, or next free),
//!   as pure state the caller persists with compare-and-swap.
//! - [`definition`]: the VM definition written next to the disks (vm.json) and its renderings
//!   as libvirt domain/network XML and as a qemu command line.

pub mod address;
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
