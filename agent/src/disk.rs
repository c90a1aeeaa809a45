//! A protected disk: the real disk behind the NBD export, with every completed
//! write put into the machine's stream.
//!
//! Write path: make the regions durable in the activity log → take a stream
//! permit (tag gate) → lock the byte range, widened to whole 4 KiB blocks
//! (overlapping writes, and writes into one block, run one after another, so
//! seq order is disk order) → hash the chunks a point still needs
//! (`pointsum.rs`) → write the disk → take the seq (journal and queue), or in
//! `bitmap` state mark the regions dirty → a HASHES entry for the blocks the
//! write covered only in part → unlock → FUA: sync disk and journal → reply.
//! Writes never wait for the process server.
//!
//! The HASHES entry is what keeps a checksum resync exact for writers of less
//! than 4 KiB (databases, 512-byte-sector filesystems): the receiver cannot
//! hash a block from a partial write, and would resend it. Each such block is
//! read before the write, with its whole block locked, so no other write
//! lands in it between that read and the write's seq; the entry, at the seq
//! right after the write's (no rebase between them), carries its
//! hash before the write and with the write laid over it. The receiver takes
//! the second only if its replica's block hashed as the first (the replica
//! matched the disk there), so a replica that differs (a rebase, a disk
//! changed behind the agent's back) keeps the block unknown. It costs one
//! read of a page-cached block per unaligned write.
//!
//! Trim and write-zeroes both make the range read as zeros, and are replicated
//! as zeroing.

use std::io;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use lifeboat_common::protocol::{Op, PartialBlock};
use tokio::sync::Notify;

use lifeboat_common::resync::{partial_blocks, HashScheme, BLOCK};

use crate::capture::BlockBackend;
use crate::dirty::DirtyMap;
use crate::diskio::DiskFile;
use crate::pointsum::DiskSums;
use crate::stream::{Captured, Stream};

/// Byte ranges of writes in flight; overlapping writers wait.
#[derive(Default)]
struct RangeLocks {
    held: Mutex<Vec<(u64, u64)>>,
    released: Notify,
}

struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    range: (u64, u64),
}

impl RangeLocks {
    async fn lock(&self, offset: u64, len: u64) -> RangeGuard<'_> {
        let range = (offset, offset.saturating_add(len));
        loop {
            let released = self.released.notified();
            {
                let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
                if !held.iter().any(|&(a, b)| a < range.1 && range.0 < b) {
                    held.push(range);
                    return RangeGuard { locks: self, range };
                }
            }
            released.await;
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = held.iter().position(|r| *r == self.range) {
            held.swap_remove(i);
        }
        drop(held);
        self.locks.released.notify_waiters();
    }
}

pub struct ProtectedDisk {
    pub id: String,
    /// Position in the hello: the disk number in stream entries.
    pub index: u16,
    file: DiskFile,
    size: u64,
    stream: Arc<Stream>,
    ranges: RangeLocks,
    pub dirty: DirtyMap,
    /// Leaves of the points' checksums (`pointsum.rs`).
    pub sums: DiskSums,
}

impl ProtectedDisk {
    pub fn new(
        id: String,
        index: u16,
        file: DiskFile,
        stream: Arc<Stream>,
        dirty: DirtyMap,
    ) -> ProtectedDisk {
        let size = file.size();
        ProtectedDisk {
            id,
            index,
            file,
            size,
            stream,
            ranges: RangeLocks::default(),
            dirty,
            sums: DiskSums::new(size),
        }
    }

    /// Puts a completed operation into the stream, or marks it dirty.
    /// Returns `false` when the range was only marked dirty.
    fn record(&self, offset: u64, len: u64, op: Op) -> bool {
        self.record_then(offset, len, op, || None)
    }

    /// [`Self::record`], and `then` (a HASHES entry) right after `op`.
    fn record_then(
        &self,
        offset: u64,
        len: u64,
        op: Op,
        then: impl FnOnce() -> Option<Op>,
    ) -> bool {
        match self
            .stream
            .capture_or_dirty_then(op, then, || self.dirty.mark_dirty(offset, len))
        {
            Captured::Seq(seq) => {
                self.dirty.captured(offset, len, seq);
                true
            }
            Captured::Dirty => false,
        }
    }

    /// A write or zeroing failed on the disk, possibly after part of it landed
    /// (ENOSPC on a sparse image, EIO): the range may now differ from the
    /// replica, so it is marked dirty and resent by the resync. The activity
    /// log already holds it (logged before the write), so a crash before the
    /// resync resends it too.
    fn failed_write(&self, offset: u64, len: u64, what: &str, e: &io::Error) {
        tracing::warn!(disk = %self.id, offset, len, "{what} failed on the disk: {e}; the range is resent by a resync");
        self.stream.degrade(
            &format!(
                "{what} of {len} bytes at {offset} failed on disk {}: {e}",
                self.id
            ),
            || self.dirty.mark_dirty(offset, len),
        );
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{len} bytes at {offset} is beyond disk {} ({} bytes)",
                    self.id, self.size
                ),
            ));
        }
        Ok(())
    }

    pub fn size_bytes(&self) -> u64 {
        self.size
    }

    /// The range a write of `len` bytes at `offset` locks: widened to whole
    /// 4 KiB blocks (clamped to the disk), so that no other write lands in a
    /// block it covers in part between [`Self::read_partial_blocks`] and the
    /// write's seq.
    fn lock_span(&self, offset: u64, len: u64) -> (u64, u64) {
        let lo = offset - offset % BLOCK;
        let hi = offset
            .saturating_add(len)
            .div_ceil(BLOCK)
            .saturating_mul(BLOCK);
        (lo, hi.min(self.size).max(lo) - lo)
    }

    /// The blocks a write of `len` bytes at `offset` covers only in part,
    /// read before it with its [`Self::lock_span`] locked. A failed read
    /// leaves them out: the receiver keeps them unknown (resent by a
    /// checksum resync), nothing worse.
    async fn read_partial_blocks(&self, offset: u64, len: u64) -> Vec<(u64, Bytes)> {
        let mut out = Vec::new();
        for b in partial_blocks(offset, len) {
            let at = b * BLOCK;
            let n = BLOCK.min(self.size.saturating_sub(at)) as usize;
            match self.file.read_at(at, n).await {
                Ok(data) if data.len() == n => out.push((b, data)),
                Ok(_) => return Vec::new(),
                Err(e) => {
                    tracing::debug!(disk = %self.id, block = b, "reading a block before a partial write failed: {e}; it stays unknown to the receiver");
                    return Vec::new();
                }
            }
        }
        out
    }

    /// The HASHES entry for a write (`data`) or zeroing (`None`) of `len`
    /// bytes at `offset` that the disk completed, with its range still
    /// locked: the blocks it covered in part, each hashed as it was before
    /// (`old`, read by [`Self::read_partial_blocks`]) and with the write's
    /// bytes laid over it, which is what the disk now holds. It goes into
    /// the stream right after the write ([`Stream::capture_or_dirty_then`]).
    fn partial_hashes(
        &self,
        offset: u64,
        len: u64,
        data: Option<&[u8]>,
        old: Vec<(u64, Bytes)>,
    ) -> Option<Op> {
        if old.is_empty() {
            return None;
        }
        let end = offset + len;
        let blocks = old
            .into_iter()
            .map(|(block, before)| {
                let at = block * BLOCK;
                let mut after = before.to_vec();
                let (lo, hi) = (offset.max(at), end.min(at + before.len() as u64));
                let dst = &mut after[(lo - at) as usize..(hi - at) as usize];
                match data {
                    Some(d) => {
                        dst.copy_from_slice(&d[(lo - offset) as usize..(hi - offset) as usize])
                    }
                    None => dst.fill(0),
                }
                PartialBlock {
                    block,
                    before: HashScheme::Xxh3.block(&before),
                    after: HashScheme::Xxh3.block(&after),
                }
            })
            .collect();
        Some(Op::Hashes {
            disk: self.index,
            blocks,
        })
    }

    /// Sync of one chunk (initial sync, resync): read it with its range locked
    /// and put it into the stream; all-zero chunks are skipped when `skip_zero`
    /// (the replica is known to be zero there), else sent as a zero entry.
    /// Returns whether it was sent.
    pub async fn sync_chunk(&self, offset: u64, len: u32, skip_zero: bool) -> io::Result<bool> {
        self.check(offset, len as u64)?;
        let _permit = self.stream.write_permit().await;
        let _range = self.ranges.lock(offset, len as u64).await;
        let data = self.file.read_bulk(offset, len as usize).await?;
        let zero = lifeboat_common::is_zero(&data);
        if skip_zero && zero {
            return Ok(false);
        }
        // Zeros travel as a zero entry: a few bytes instead of the chunk.
        let op = if zero {
            Op::Zero {
                disk: self.index,
                offset,
                len,
            }
        } else {
            Op::Write {
                disk: self.index,
                offset,
                data,
            }
        };
        let queued = self.record(offset, len as u64, op);
        if !queued {
            // Only marked dirty (bitmap state): the activity log must hold the
            // region before the caller's progress moves past it, or a crash would
            // forget it.
            self.dirty.before_write(offset, len as u64).await?;
        }
        Ok(true)
    }

    /// Block-granular resend (checksum resync): `offset` and `len` are multiples
    /// of 4 KiB, the range is clamped to the disk and goes into the stream like
    /// [`Self::sync_chunk`] (range lock, seq). Returns the bytes sent.
    pub async fn resend_blocks(&self, offset: u64, len: u64) -> io::Result<u64> {
        use lifeboat_common::resync::BLOCK;
        if !offset.is_multiple_of(BLOCK)
            || !len.is_multiple_of(BLOCK)
            || len > lifeboat_common::resync::REGION
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("block resend of {len} bytes at {offset} on disk {}: not whole 4 KiB blocks of at most one region", self.id),
            ));
        }
        let len = len.min(self.size.saturating_sub(offset));
        if len == 0 {
            return Ok(0);
        }
        self.sync_chunk(offset, len as u32, false).await?;
        Ok(len)
    }

    /// Reads without locking (hashing for checksum resync: a write racing the
    /// read goes into the stream anyway).
    pub async fn read_unlocked(&self, offset: u64, len: u64) -> io::Result<Bytes> {
        self.check(offset, len)?;
        self.file.read_bulk(offset, len as usize).await
    }

    /// Makes every completed write durable on the disk itself.
    pub async fn sync_disk(&self) -> io::Result<()> {
        self.file.sync().await
    }

    /// A write refused after a planned failover's final point (EPERM to the
    /// NBD client, as a read-only export answers).
    fn refused(&self) -> io::Result<()> {
        match self.stream.writes_refused() {
            None => Ok(()),
            Some(why) => Err(io::Error::new(io::ErrorKind::PermissionDenied, why)),
        }
    }

    async fn durable(&self) -> io::Result<()> {
        let (a, b) = tokio::join!(self.file.sync(), self.stream.sync_journal());
        a?;
        b
    }
}

impl BlockBackend for ProtectedDisk {
    fn size(&self) -> u64 {
        self.size
    }

    async fn read(&self, offset: u64, len: u32) -> io::Result<Bytes> {
        self.check(offset, len as u64)?;
        self.file.read_at(offset, len as usize).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> io::Result<()> {
        self.check(offset, data.len() as u64)?;
        let len = data.len() as u64;
        self.refused()?;
        self.dirty.before_write(offset, len).await?;
        {
            let _permit = self.stream.write_permit().await;
            self.refused()?;
            let (at, span) = self.lock_span(offset, len);
            let _range = self.ranges.lock(at, span).await;
            self.sums.before_change(self, offset, len).await;
            let old = self.read_partial_blocks(offset, len).await;
            if let Err(e) = self.file.write_at(offset, data.clone()).await {
                self.failed_write(offset, len, "write", &e);
                return Err(e);
            }
            let hashes = || self.partial_hashes(offset, len, Some(&data), old);
            let _ = self.record_then(
                offset,
                len,
                Op::Write {
                    disk: self.index,
                    offset,
                    data: data.clone(),
                },
                hashes,
            );
        }
        if fua {
            self.durable().await?;
        }
        Ok(())
    }

    async fn zero(&self, offset: u64, len: u32, fua: bool) -> io::Result<()> {
        self.check(offset, len as u64)?;
        self.refused()?;
        self.dirty.before_write(offset, len as u64).await?;
        {
            let _permit = self.stream.write_permit().await;
            self.refused()?;
            let (at, span) = self.lock_span(offset, len as u64);
            let _range = self.ranges.lock(at, span).await;
            self.sums.before_change(self, offset, len as u64).await;
            let old = self.read_partial_blocks(offset, len as u64).await;
            if let Err(e) = self.file.zero_range(offset, len as u64).await {
                self.failed_write(offset, len as u64, "zeroing", &e);
                return Err(e);
            }
            let _ = self.record_then(
                offset,
                len as u64,
                Op::Zero {
                    disk: self.index,
                    offset,
                    len,
                },
                || self.partial_hashes(offset, len as u64, None, old),
            );
        }
        if fua {
            self.durable().await?;
        }
        Ok(())
    }

    async fn flush(&self) -> io::Result<()> {
        self.durable().await
    }
}
