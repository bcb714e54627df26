//! Failed-over VMs booted by drvault's own generated definition on their target networks,
//! inside network namespaces the tests create.
