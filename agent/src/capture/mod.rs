//! Capture front-ends: how writes to a protected disk reach the agent.
//!
//! [`BlockBackend`] is what a front-end (today the NBD server,
//! `lifeboat_common::nbd_server`, re-exported as [`nbd`]) serves; the agent's
//! `ProtectedDisk` implements it by writing the real disk and putting every
//! completed write into the replication stream.

pub use lifeboat_common::nbd_server::{self as nbd, BlockBackend};

pub mod file;
