//! Capture front-ends: how writes to a protected disk reach the agent.
//!
//! [`BlockBackend`] is what a front-end (today the NBD server in [`nbd`]) serves;
//! the agent's `ProtectedDisk` implements it by writing the real disk and putting
//! every completed write into the replication stream.

use std::future::Future;
use std::io;

use bytes::Bytes;

pub mod file;
pub mod nbd;

/// A disk as a capture front-end sees it. Calls may run concurrently; a call's
/// future completes when the operation has completed on the disk (and, with
/// `fua`, is durable on it).
pub trait BlockBackend: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    fn read(&self, offset: u64, len: u32) -> impl Future<Output = io::Result<Bytes>> + Send;
    fn write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send;
    /// Trim and write-zeroes: afterwards the range reads as zeros.
    fn zero(&self, offset: u64, len: u32, fua: bool)
        -> impl Future<Output = io::Result<()>> + Send;
    /// Makes every completed write durable.
    fn flush(&self) -> impl Future<Output = io::Result<()>> + Send;
}
