//! The Lifeboat agent: captures every write to a protected disk and ships the stream.

pub mod apppoint;
pub mod capture;
pub mod checksum;
pub mod config;
pub mod control;
pub mod dirty;
pub mod disk;
/// The disk I/O engines (io_uring, portable) live in `common`, shared with the
/// master target's failover writes.
pub use lifeboat_common::diskio;
pub mod disks;
pub mod finalpoint;
pub mod fsutil;
pub mod grouppoint;
pub mod journal;
pub mod pointsum;
pub mod quiesce;
pub mod rebase;
pub mod register;
pub mod replication;
pub mod runner;
pub mod sender;
pub mod stream;
pub mod sync;

pub use runner::run;
