//! `lifeboat-ps`, the process server: accepts agents over mutual TLS, makes their
//! write streams durable in a RocksDB cache, and uploads them as sealed segments
//! and recovery points to object storage.
//!
//! Modules: [`config`] (ps.toml), [`pki`] (CA, certificates, key-encryption key),
//! [`server`] (TLS accept loop and the cache sink), [`cache`] (RocksDB),
//! [`uploader`] (segments, sealing, points), [`compact`] (retention: bases,
//! thinning, chunk collection), [`ownership`] (fencing: which
//! server owns a machine in the store), [`control`] (local control socket:
//! checksum resync, status, group points), [`status`] (the status snapshot
//! shared by the control socket and HTTP), [`monitor`] (per-machine RPO,
//! churn and points in memory), [`health`] (cache and backlog thresholds,
//! backpressure), [`alerts`] (events and the webhook), [`http`] (`/status`,
//! `/metrics`, the status page), [`metrics`] (Prometheus text), [`page`]
//! (the status page's HTML).

pub mod alerts;
pub mod cache;
pub mod compact;
pub mod config;
pub mod control;
pub mod groups;
pub mod health;
pub mod http;
pub mod metrics;
pub mod monitor;
pub mod ownership;
pub mod page;
pub mod pki;
pub mod registration;
pub mod server;
pub mod status;
pub mod uploader;

pub use server::run;
