//! Target networks as a host that runs failed-over VMs sets them up (`drvault network up`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `GET /v1/networks/{network}`: every subnet of a configured target network with what its
/// host side needs: the bridge, the gateway address and the DHCP reservations.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct HostNetworkView {
    pub name: String,
    /// No route out of the host (drill networks).
    pub isolated: bool,
    /// DNS servers handed out by DHCP.
    pub dns: Vec<String>,
    pub subnets: Vec<HostSubnetView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct HostSubnetView {
    pub name: String,
    /// `network.subnet`: the libvirt network's name and the suffix of the failover files
    /// (`network-….xml`, `dhcp-hosts-….conf`).
    pub host_network: String,
    /// The Linux bridge qemu.sh attaches the subnet's NICs to.
    pub bridge: String,
    /// `a.b.c.d/len`.
    pub prefix: String,
    pub gateway: String,
    /// Every address allocated in the subnet, ascending: what the DHCP server hands out.
    pub reservations: Vec<DhcpReservation>,
}

/// One static lease: the failed-over NIC with this MAC gets this address.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct DhcpReservation {
    /// `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    pub ip: String,
    /// Host name handed out, when the VM's name is a DNS label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    pub vm: String,
    pub nic_index: u32,
    pub failover_id: String,
}
