//! Each recovery point's disk checksums (`lifeboat_common::disksum`), hashed
//! from the protected disks themselves while writes go on.
//!
//! Per disk, [`DiskSums`] keeps one leaf hash per 1 MiB chunk and three bit
//! sets: `dirty` (written since its leaf was taken), `pending` (the point
//! being hashed still needs it) and `hashing` (someone reads it now).
//!
//! - A tag that drained the writes ([`PointSums::begin`], called under the
//!   write gate right after the tag took its seq) moves `dirty` to `pending`:
//!   at that instant every pending chunk on disk is exactly as at the point.
//! - A background task hashes the pending chunks. A write or zeroing that
//!   touches a pending chunk first hashes it itself ([`DiskSums::before_change`],
//!   inside the write's gate permit and range lock, before the disk changes),
//!   so a leaf is always taken before anything after the point reaches it.
//!   Every write marks its chunks dirty before it reaches the disk.
//! - When no chunk is pending, the leaves give each disk's sum, and a SUMS
//!   entry naming the point goes into the stream (uploaded as
//!   `sums/<point>.json` by the process server).
//!
//! A tag placed while the previous point is still being hashed, or one that
//! did not drain the writes in time, gets no checksums and changes nothing
//! here (its chunks stay dirty for the next point). A crash-consistent tag
//! first waits up to [`SUMS_WAIT`] for the previous hashing (writes are not
//! held meanwhile); an app-consistent point waits before it freezes
//! anything; a group tag, placed under the group's hold, does not wait. A
//! read error abandons that point's checksum for the disk and leaves the
//! chunk dirty. A rebase of the numbering meanwhile drops the checksums (the
//! point's seq then names another entry). After a start every chunk is
//! dirty: the first point hashes whole disks, [`HASH_CONCURRENCY`] chunks at
//! a time; writes to chunks it has not reached hash them first.
//!
//! Memory: 32 bytes of leaf and 3 bits per MiB of disk (32 MiB per TiB).

use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use futures::StreamExt;
use lifeboat_common::disksum::{self, Hash, CHUNK};
use lifeboat_common::protocol::{DiskSum, Op};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::disk::ProtectedDisk;
use crate::stream::Stream;

/// The longest a tag waits for the previous point's hashing.
pub const SUMS_WAIT: Duration = Duration::from_secs(10);

/// Chunks read and hashed at once, by the background task and by a write.
const HASH_CONCURRENCY: usize = 4;

struct Bits(Vec<u64>);

impl Bits {
    fn zeros(n: u64) -> Bits {
        Bits(vec![0; n.div_ceil(64) as usize])
    }
    fn ones(n: u64) -> Bits {
        let mut v = vec![u64::MAX; n.div_ceil(64) as usize];
        if !n.is_multiple_of(64) {
            if let Some(last) = v.last_mut() {
                *last = (1u64 << (n % 64)) - 1;
            }
        }
        Bits(v)
    }
    fn get(&self, i: u64) -> bool {
        self.0[(i / 64) as usize] & (1 << (i % 64)) != 0
    }
    fn set(&mut self, i: u64, on: bool) {
        let w = &mut self.0[(i / 64) as usize];
        if on {
            *w |= 1 << (i % 64);
        } else {
            *w &= !(1 << (i % 64));
        }
    }
    fn count(&self) -> u64 {
        self.0.iter().map(|w| w.count_ones() as u64).sum()
    }
}

struct SumState {
    leaves: Vec<Hash>,
    dirty: Bits,
    pending: Bits,
    hashing: Bits,
    /// Pending chunks not yet hashed.
    left: u64,
    /// A read failed: this point gets no checksum for the disk.
    failed: bool,
}

/// One disk's leaves and chunk states (see the module header).
pub struct DiskSums {
    size: u64,
    st: Mutex<SumState>,
    changed: Notify,
}

/// What a caller must do for one chunk.
enum Claim {
    /// Nothing pending there: marked dirty, go on.
    Clear,
    /// Hash it now (its `hashing` bit is ours).
    Mine,
    /// Someone else hashes it: wait.
    Wait,
}

impl DiskSums {
    pub fn new(size: u64) -> DiskSums {
        let n = disksum::chunks(size);
        DiskSums {
            size,
            st: Mutex::new(SumState {
                leaves: vec![[0u8; 32]; n as usize],
                dirty: Bits::ones(n),
                pending: Bits::zeros(n),
                hashing: Bits::zeros(n),
                left: 0,
                failed: false,
            }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SumState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn chunk_len(&self, i: u64) -> usize {
        CHUNK.min(self.size - i * CHUNK) as usize
    }

    /// The point starts: what was dirty is pending (under the write gate).
    fn start(&self) {
        let mut st = self.lock();
        let n = disksum::chunks(self.size);
        st.pending = std::mem::replace(&mut st.dirty, Bits::zeros(n));
        st.left = st.pending.count();
        st.failed = false;
    }

    fn claim(&self, i: u64, writer: bool) -> Claim {
        let mut st = self.lock();
        if st.hashing.get(i) {
            return Claim::Wait;
        }
        if st.pending.get(i) {
            st.hashing.set(i, true);
            return Claim::Mine;
        }
        if writer {
            st.dirty.set(i, true);
        }
        Claim::Clear
    }

    fn finish(&self, i: u64, leaf: Option<Hash>, writer: bool) {
        let mut st = self.lock();
        match leaf {
            Some(l) => st.leaves[i as usize] = l,
            None => {
                st.failed = true;
                st.dirty.set(i, true);
            }
        }
        st.hashing.set(i, false);
        st.pending.set(i, false);
        st.left -= 1;
        if writer {
            st.dirty.set(i, true);
        }
        drop(st);
        self.changed.notify_waiters();
    }

    /// Hashes chunk `i` as the disk holds it now (the hashing off the
    /// runtime's threads).
    async fn hash(&self, disk: &ProtectedDisk, i: u64) -> Option<Hash> {
        let read = disk
            .read_unlocked(i * CHUNK, self.chunk_len(i) as u64)
            .await;
        let hashed = match read {
            Ok(data) => tokio::task::spawn_blocking(move || disksum::leaf(&data))
                .await
                .map_err(std::io::Error::other),
            Err(e) => Err(e),
        };
        match hashed {
            Ok(leaf) => Some(leaf),
            Err(e) => {
                warn!(disk = %disk.id, chunk = i, "reading the disk for the point's checksum: {e}; this point gets no checksum");
                None
            }
        }
    }

    /// Hashes chunk `i`, whose `hashing` bit the caller claimed, and records
    /// its leaf (`writer`: a write follows, the chunk is dirty again).
    async fn hash_claimed(&self, disk: &ProtectedDisk, i: u64, writer: bool) {
        let leaf = self.hash(disk, i).await;
        self.finish(i, leaf, writer);
    }

    /// Called by a write or zeroing of `offset..offset+len`, inside its gate
    /// permit and range lock, before it changes the disk.
    pub async fn before_change(&self, disk: &ProtectedDisk, offset: u64, len: u64) {
        let n = disksum::chunks(self.size);
        if len == 0 || offset / CHUNK >= n {
            return;
        }
        let last = ((offset + len - 1) / CHUNK).min(n - 1);
        // Claim what is pending and hash it (a few chunks at once: a large
        // trim may cover many), then wait for chunks others were hashing.
        let mut mine = Vec::new();
        let mut others = Vec::new();
        for i in offset / CHUNK..=last {
            match self.claim(i, true) {
                Claim::Clear => {}
                Claim::Mine => mine.push(i),
                Claim::Wait => others.push(i),
            }
        }
        futures::stream::iter(mine)
            .map(|i| self.hash_claimed(disk, i, true))
            .buffer_unordered(HASH_CONCURRENCY)
            .collect::<()>()
            .await;
        for i in others {
            loop {
                let changed = self.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                match self.claim(i, true) {
                    Claim::Clear => break,
                    Claim::Mine => {
                        self.hash_claimed(disk, i, true).await;
                        break;
                    }
                    Claim::Wait => changed.await,
                }
            }
        }
    }

    /// The pending chunks from `from` on, at most `max` (set words only).
    fn next_pending(&self, from: u64, max: usize) -> Vec<u64> {
        let st = self.lock();
        let mut out = Vec::new();
        let first = (from / 64) as usize;
        for w in first..st.pending.0.len() {
            let mut word = st.pending.0[w];
            if w == first {
                word &= u64::MAX << (from % 64);
            }
            while word != 0 {
                if out.len() == max {
                    return out;
                }
                out.push(w as u64 * 64 + word.trailing_zeros() as u64);
                word &= word - 1;
            }
        }
        out
    }

    /// Hashes every pending chunk, then returns the disk's sum (`None` when a
    /// read failed).
    async fn run(&self, disk: &ProtectedDisk) -> Option<Hash> {
        let mut from = 0;
        loop {
            let batch = self.next_pending(from, 256);
            let Some(&last) = batch.last() else {
                break;
            };
            from = last + 1;
            futures::stream::iter(batch)
                .map(|i| async move {
                    if let Claim::Mine = self.claim(i, false) {
                        self.hash_claimed(disk, i, false).await;
                    }
                })
                .buffer_unordered(HASH_CONCURRENCY)
                .collect::<()>()
                .await;
        }
        // Chunks that writers were hashing.
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let done = {
                let st = self.lock();
                (st.left == 0).then(|| (!st.failed).then(|| st.leaves.clone()))
            };
            match done {
                Some(None) => return None,
                Some(Some(leaves)) => {
                    let size = self.size;
                    return tokio::task::spawn_blocking(move || disksum::combine(size, &leaves))
                        .await
                        .ok();
                }
                None => changed.await,
            }
        }
    }
}

/// The machine's point hashing (see the module header).
pub struct PointSums {
    disks: Vec<Weak<ProtectedDisk>>,
    stream: Weak<Stream>,
    /// The point being hashed, if any.
    running: Mutex<Option<u64>>,
    idle: Notify,
}

impl PointSums {
    pub fn new(disks: &[Arc<ProtectedDisk>], stream: &Arc<Stream>) -> Arc<PointSums> {
        Arc::new(PointSums {
            disks: disks.iter().map(Arc::downgrade).collect(),
            stream: Arc::downgrade(stream),
            running: Mutex::new(None),
            idle: Notify::new(),
        })
    }

    fn running(&self) -> MutexGuard<'_, Option<u64>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a point's hashing runs now (a tag placed meanwhile gets no
    /// checksums).
    pub fn busy(&self) -> bool {
        self.running().is_some()
    }

    /// Waits up to `bound` for the previous point's hashing to end.
    pub async fn wait_idle(&self, bound: Duration) {
        let _ = tokio::time::timeout(bound, async {
            loop {
                let idle = self.idle.notified();
                tokio::pin!(idle);
                idle.as_mut().enable();
                if self.running().is_none() {
                    return;
                }
                idle.await;
            }
        })
        .await;
    }

    /// The tag at `seq` was placed; `drained`: under the write gate, with
    /// no write in flight. Starts hashing its checksums (see the header).
    pub fn begin(self: &Arc<Self>, seq: u64, drained: bool) {
        if !drained {
            info!(seq, "no checksum for this point: the writes did not drain");
            return;
        }
        let mut running = self.running();
        if let Some(prev) = *running {
            info!(
                seq,
                "no checksum for this point: point {prev}'s hashing still runs"
            );
            return;
        }
        let disks: Vec<Arc<ProtectedDisk>> = self.disks.iter().filter_map(Weak::upgrade).collect();
        for d in &disks {
            d.sums.start();
        }
        *running = Some(seq);
        // The numbering the tag's seq belongs to: after a rebase meanwhile,
        // `seq` names another entry, and the checksums are dropped.
        let rebases = self.stream.upgrade().map(|s| s.rebases());
        let me = self.clone();
        lifeboat_common::spawn(async move {
            // `running` ends however this task does.
            let _idle = Idle(me.clone());
            let mut sums = Vec::new();
            for d in &disks {
                if let Some(sum) = d.sums.run(d).await {
                    sums.push(DiskSum {
                        disk: d.index,
                        size: d.size_bytes(),
                        sum,
                    });
                }
            }
            if let (false, Some(stream), Some(rebases)) =
                (sums.is_empty(), me.stream.upgrade(), rebases)
            {
                let op = Op::Sums {
                    point: seq,
                    disks: sums,
                };
                match stream.capture_in_numbering(op, rebases) {
                    Some(at) => info!(point = seq, seq = at, "point checksums hashed"),
                    None => info!(
                        point = seq,
                        "point checksums dropped: the stream was renumbered meanwhile"
                    ),
                }
            }
        });
    }
}

/// Ends [`PointSums::running`] when dropped.
struct Idle(Arc<PointSums>);

impl Drop for Idle {
    fn drop(&mut self) {
        *self.0.running() = None;
        self.0.idle.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_cover_exactly_n() {
        for n in [0u64, 1, 63, 64, 65, 130] {
            let b = Bits::ones(n);
            assert_eq!(b.count(), n);
            if n > 0 {
                assert!(b.get(n - 1));
            }
        }
    }
}
