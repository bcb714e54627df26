//! The integration tests: one test crate with a module per area, so the whole suite links once
//! instead of once per file. Run one area with `cargo test --test it -- hostile::`, one test with
//! its full path (`cargo test --test it -- hostile::oversized_bodies_are_refused_before_they_are_stored`).

mod common;
#[path = "support/emulators.rs"]
mod emulators;

mod agent_run;
mod alerts;
mod api_auth;
mod architecture;
mod audit;
mod azure_e2e;
mod bench_smoke;
mod cli_conventions;
mod cluster_start;
mod concurrency;
mod console;
mod console_browser;
mod crash;
mod delta_e2e;
mod failover_azure;
mod failover_e2e;
mod failover_network;
mod faults;
mod health;
mod hostile;
mod lifecycle;
mod openapi;
mod pieces;
mod protect_e2e;
mod readme_flow;
mod resync_e2e;
mod roles;
mod scale_out;
mod store_conformance;
mod verify_gc;
mod vhdx_out;
mod webhooks;
mod wire_compression;
