//! # drvault: the storage side of Hyper-V-style disaster-recovery replication
//!
//! Host agents stream each virtual disk once in full and then, every replication cycle, one MS-HRL
//! change log per disk. drvault keeps every byte compressed, AES-256-GCM-sealed and
//! content-addressed in an object store, turns logs into recovery points, and on failover
//! materializes fixed VHD disks and a VM definition on a target network.
//!
//! ## Data flow (one direction)
//!
//! The folders follow the flow: `api → ingest → chunk → store`, `journal` and `replica` turn what
//! was received into points, `failover` reads points out. Arrows are imports; there is no cycle
//! (`tests/it/architecture.rs` checks it).
//!
//! ```text
//! agent, cli ──▶ client ──HTTPS (wire types)──▶ api (extractors, routes per resource)
//!                                                  │
//!        ┌───────────────────┬─────────────────────┼───────────────────┬──────────────────┐
//!        ▼                   ▼                     ▼                   ▼                  ▼
//!      ingest ─────────▶ replica ◀────────────── failover           scrub            overview
//!   (blocks, logs)    (points, readers,      (choose → materialize  (verify, gc)   (the VM view)
//!        │             merge, resync,          → address → define)      │
//!        │             damage register)               │                 │
//!        └────────┬──────────┴────────────────────────┴─────────────────┘
//!                 ▼
//!      catalog (VM and disk records) · journal (stored logs) · jobs
//!                 ▼
//!      vault (layout, versioned records, registry) ──▶ chunk (name → compress → seal) ──▶ store
//! ```
//!
//! [`services`] loads and composes the stateful services (catalog, ingest, replicas, resyncs);
//! [`tasks`] runs their background work (merge, schedules, deletes, failovers) so shutdown can
//! drain it. Nothing below `api` knows about HTTP; only `store` imports object_store; [`wire`]
//! imports nothing from the crate, and the agent and client never import server modules.
//!
//! | module | concept |
//! |---|---|
//! | [`store`] | the object store (local dir with fsync, Azure Blob, S3, memory), fault injection |
//! | [`chunk`] | keyed names (the only place they are computed), sealing, key ring, the pipeline |
//! | [`vault`] | key layout, versioned records (create-only version n+1), registry of hosts, providers and token digests (`Registrar`) |
//! | [`cluster`] | several servers on one vault: server heartbeats, VM leases, fencing by epoch (`docs/cluster.md`) |
//! | [`file_formats`] | every persisted constant of drvault's own formats |
//! | [`format`] | MS-HRL logs, VHD and VHDX readers, fixed-VHD footer |
//! | [`catalog`] | VM and disk records (cached, compare-and-swap), enable and finalize protection |
//! | [`ingest`] | initial-replication blocks (receipts, resume, completion), change logs |
//! | [`journal`] | stored change logs: frames, extent index, the frame cache |
//! | [`replica`] | block maps, points and point readers, merge, resync, the block-sync protocol, the damage register |
//! | [`services`], [`overview`] | the services composed and loaded; what the API shows of a VM, and its health rules |
//! | [`contact`] | each host's last heartbeat (`drvault agent run`), kept in memory, saved every few seconds |
//! | [`tasks`] | tracked background work and per-key retry back-off |
//! | [`jobs`] | the Jobs tab: job records, steps, progress |
//! | [`failover`] | choose point → materialize disks → assign addresses → write definition; networks, plans, failback |
//! | [`scrub`] | verify (re-read and check, quarantine, damaged points), garbage collection |
//! | [`audit`] | the audit log of operator actions: one sealed, hash-chained entry per action (single writer) |
//! | [`api`] | HTTPS server, auth, typed path extractors, routes (a module per resource), the one error-to-HTTP mapping, the OpenAPI document |
//! | [`wire`] | the API contract: request and response bodies, header names, the error body (serde, std and utoipa's derives only) |
//! | [`client`] | the typed API client: a method per route |
//! | [`webhooks`] | signed POSTs to the configured endpoints on job outcomes and VM health changes, retried with back-off |
//! | [`agent`], [`cli`], [`bench`], [`progress`] | reference agent (one block-sync driver for resync and failback), command line (a file per command family), benchmarks, progress bars |
//!
//! ## Object key layout
//!
//! ```text
//! vault/keycheck                          proves the key file opens this vault
//! chunks/<3 hex>/<64 hex>                 block contents, shared by every disk
//! maps/<3 hex>/<64 hex>                   block-map roots and segments
//! packs/<3 hex>/<64 hex>                  sealed pieces of blocks (merge and resync changes)
//! records/<family>/<id>/v<20 digits>      versioned records: registry, vm, disk, job, server, lease
//! records/vault/format/v<20 digits>       the vault's current format (read before any write)
//! stage/<vm>/<disk>/<session>/<index>     receipts of blocks received in a replication session
//! logs/<vm>/<disk>/<log id>/f<n>, extents frames and extent list of a stored change log
//! quarantine/<original key>/<unix time>   damaged objects verify moved aside (never read)
//! audit/<20 digits>                       audit-log entries, one per operator action (create-only)
//! ```
//!
//! No key is also a prefix of other keys (the local backend cannot hold both). Formats:
//! `docs/formats.md`.
//!
//! ## Durability and concurrency
//!
//! * A block upload is acknowledged after its chunk (create-only) and its receipt are durable;
//!   completion writes the map objects, then the disk record version that points at them.
//!   Nothing half-written is visible: objects are put atomically, records are versioned.
//! * Block uploads to one disk run concurrently: each touches only its own chunk (create-only,
//!   so racing identical blocks make one object) and its own receipt key.
//! * Record updates are compare-and-swap on version numbers. Several servers may share a vault:
//!   a VM's records change only on the server holding its lease, and every change is fenced by
//!   the lease's epoch ([`cluster`]). A server caches the records of the VMs it holds (it is
//!   their only writer) and re-reads the others' when their version moves (every 2 s); the
//!   registry likewise.
//! * CPU work (hashing, compression, sealing) runs on a semaphore-bounded blocking pool. Upload
//!   bodies (blocks, patches, log frames) reserve their memory from a global budget, a host at
//!   most a share of it, before they are read, and take one of `ingest.max_inflight_blocks`
//!   ingest slots only once complete: one host sending slowly waits on its own share and never
//!   holds what other hosts need ([`api::body_budget`]).
//! * Connections: general slots with a per-address share, a small reserve that still serves
//!   `/healthz` and the operator when they are taken, and an idle timeout that counts requests,
//!   not HTTP/2 PINGs ([`api::slots`], [`api::server`]).
//!
//! ## What runs concurrently with what
//!
//! | | uploads, logs | merge, resync, failback commit | failover, export | verify | gc |
//! |---|---|---|---|---|---|
//! | **verify** | yes | yes | yes | no | no |
//! | **gc** | yes (write fence, see [`chunk::fence`]) | waits for each to reach its record | yes (retained points only) | no | no |
//!
//! Garbage collection deletes only what no record references, nothing younger than its start
//! and grace period, and nothing a writer stored or reused while it ran ([`scrub`] has the
//! argument). Verify and collection exclude each other (one maintenance job at a time, on one
//! server: the `maintenance` lease); with other servers live a collection runs in rounds that
//! every server joins ([`scrub::rounds`]).

#![forbid(unsafe_code)]

pub mod agent;
pub mod api;
pub mod audit;
pub mod bench;
pub mod catalog;
pub mod chunk;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod config;
pub mod contact;
pub mod error;
pub mod failover;
pub mod file_formats;
pub mod format;
pub mod ingest;
pub mod jobs;
pub mod journal;
pub mod overview;
pub mod progress;
pub mod replica;
pub mod scrub;
pub mod server;
pub mod services;
pub mod store;
pub mod tasks;
pub mod util;
pub mod vault;
pub mod webhooks;
pub mod wire;
