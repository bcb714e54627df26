//! Changing what is protected: disable, disks added, removed and grown, hosts of a cluster.
