//! Failover into Azure storage: disks written as page-blob fixed VHDs on Azurite.
