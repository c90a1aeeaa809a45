//! Checksum resync, the agent's side: started by the receiver's resync-start
//! frame, it makes the replica equal to the disks without knowing what changed.
//!
//! Per disk, in batches of `BATCH_REGIONS` 1 MiB regions: read the batch in
//! `READ_UNIT` aligned reads, hash every 4 KiB block and every region (see
//! `lifeboat_common::resync`) → region-hashes → the receiver answers which
//! regions differ → block-hashes of those regions (kept from the read, no second
//! read) → the receiver answers which blocks differ → those blocks, adjacent
//! ones coalesced, are read again under their range lock and put into the
//! stream as ordinary writes (seq, journal, exactly-once). Meanwhile the state
//! is `resync` and no point is taken; at the end a crash-consistent tag
//! `checksum-resync-complete` is placed, and resync-done (with the counters) is
//! sent once the receiver acknowledged it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use lifeboat_common::protocol::{Frame, ResyncReport, TagKind};
use lifeboat_common::resync::{self, BlockHash, BLOCK, REGION};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::disk::ProtectedDisk;
use crate::stream::Stream;

/// Regions compared per region-hashes frame.
pub const BATCH_REGIONS: u64 = 64;
/// Read unit while hashing.
pub const READ_UNIT: u64 = 8 * REGION;
pub const TAG_LABEL: &str = "checksum-resync-complete";
/// The longest the final tag waits for its acknowledgement before resync-done.
const ACK_WAIT: Duration = Duration::from_secs(120);

/// Counters of the current (or last) checksum resync, for `status`.
#[derive(Default)]
pub struct Counters {
    pub running: AtomicBool,
    pub hashed_bytes: AtomicU64,
    pub hash_bytes: AtomicU64,
    pub block_bytes: AtomicU64,
    pub blocks: AtomicU64,
    pub last: Mutex<Option<ResyncReport>>,
}

impl Counters {
    fn reset(&self) {
        self.running.store(true, Ordering::SeqCst);
        for c in [
            &self.hashed_bytes,
            &self.hash_bytes,
            &self.block_bytes,
            &self.blocks,
        ] {
            c.store(0, Ordering::Relaxed);
        }
    }

    fn report(&self, disk_count: u16, tag_seq: u64, error: String) -> ResyncReport {
        ResyncReport {
            disk_count,
            hashed_bytes: self.hashed_bytes.load(Ordering::Relaxed),
            hash_bytes: self.hash_bytes.load(Ordering::Relaxed),
            block_bytes: self.block_bytes.load(Ordering::Relaxed),
            blocks: self.blocks.load(Ordering::Relaxed),
            tag_seq,
            error,
        }
    }

    pub fn snapshot(&self) -> serde_json::Value {
        serde_json::json!({
            "running": self.running.load(Ordering::Relaxed),
            "hashed-bytes": self.hashed_bytes.load(Ordering::Relaxed),
            "hash-bytes": self.hash_bytes.load(Ordering::Relaxed),
            "block-bytes": self.block_bytes.load(Ordering::Relaxed),
            "blocks-sent": self.blocks.load(Ordering::Relaxed),
            "last": *self.last.lock().unwrap_or_else(|p| p.into_inner()),
        })
    }
}

/// Returns the stream to `streaming` however the resync ends (also when the
/// session drops and the task is aborted).
struct StateGuard {
    stream: Arc<Stream>,
    disks: Vec<Arc<ProtectedDisk>>,
    counters: Arc<Counters>,
}

impl StateGuard {
    fn end(&self) -> bool {
        self.counters.running.store(false, Ordering::SeqCst);
        self.stream
            .end_checksum_resync(|| self.disks.iter().all(|d| d.dirty.dirty_count() == 0))
    }
}

impl Drop for StateGuard {
    fn drop(&mut self) {
        if self.stream.checksum_active() {
            warn!("checksum resync interrupted: the replica may still differ from the disks");
            self.end();
        }
    }
}

/// Runs one resync requested by resync-start; always sends resync-done.
pub async fn run(
    disks: Vec<Arc<ProtectedDisk>>,
    stream: Arc<Stream>,
    counters: Arc<Counters>,
    targets: Vec<u16>,
    out: mpsc::Sender<Frame>,
    inbox: mpsc::UnboundedReceiver<Frame>,
) {
    let n = targets.len() as u16;
    let report = match resync_all(&disks, &stream, &counters, &targets, &out, inbox).await {
        Ok(tag_seq) => counters.report(n, tag_seq, String::new()),
        Err(e) => {
            warn!("checksum resync failed: {e:#}");
            counters.report(n, 0, format!("{e:#}"))
        }
    };
    counters.running.store(false, Ordering::SeqCst);
    *counters.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(report.clone());
    let _ = out.send(Frame::ResyncDone(report)).await;
}

async fn resync_all(
    disks: &[Arc<ProtectedDisk>],
    stream: &Arc<Stream>,
    counters: &Arc<Counters>,
    targets: &[u16],
    out: &mpsc::Sender<Frame>,
    mut inbox: mpsc::UnboundedReceiver<Frame>,
) -> Result<u64> {
    let mut todo = Vec::new();
    for &t in targets {
        let d = disks.get(t as usize).ok_or_else(|| {
            anyhow!(
                "resync-start names disk {t}; this agent has {}",
                disks.len()
            )
        })?;
        todo.push(d.clone());
    }
    let names: Vec<&str> = todo.iter().map(|d| d.id.as_str()).collect();
    stream
        .begin_checksum_resync(&format!("checksum resync of {}", names.join(", ")))
        .map_err(|e| anyhow!(e))?;
    counters.reset();
    let guard = StateGuard {
        stream: stream.clone(),
        disks: disks.to_vec(),
        counters: counters.clone(),
    };
    for (&index, d) in targets.iter().zip(&todo) {
        resync_disk(index, d, stream, counters, out, &mut inbox)
            .await
            .with_context(|| format!("checksum resync of disk {}", d.id))?;
    }
    if !guard.end() {
        bail!(
            "every block was compared and sent, but the stream left the resync state ({:?}: {}); the next point follows the dirty-region resync",
            stream.mode().0,
            stream.mode().1
        );
    }
    let seq = stream.tag(TagKind::Crash, TAG_LABEL).await.ok_or_else(|| {
        anyhow!(
            "could not place the {TAG_LABEL} point: state {:?}",
            stream.mode().0
        )
    })?;
    info!(
        seq,
        "checksum resync complete: crash-consistent point placed"
    );
    let deadline = tokio::time::Instant::now() + ACK_WAIT;
    while stream.positions().acked < seq {
        if tokio::time::Instant::now() > deadline {
            bail!("the {TAG_LABEL} point (seq {seq}) was not acknowledged within {ACK_WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(seq)
}

async fn reply(inbox: &mut mpsc::UnboundedReceiver<Frame>) -> Result<Frame> {
    inbox
        .recv()
        .await
        .ok_or_else(|| anyhow!("the session ended during the resync"))
}

async fn resync_disk(
    index: u16,
    d: &Arc<ProtectedDisk>,
    stream: &Arc<Stream>,
    counters: &Counters,
    out: &mpsc::Sender<Frame>,
    inbox: &mut mpsc::UnboundedReceiver<Frame>,
) -> Result<()> {
    let size = d.size_bytes();
    let regions = resync::region_count(size);
    let send = |f: Frame| async move {
        out.send(f)
            .await
            .map_err(|_| anyhow!("the session ended during the resync"))
    };
    let mut first = 0u64;
    while first < regions {
        let count = BATCH_REGIONS.min(regions - first);
        // Level 0: read and hash the batch.
        let mut blocks: Vec<Vec<BlockHash>> = Vec::with_capacity(count as usize);
        let start = first * REGION;
        let end = ((first + count) * REGION).min(size);
        let mut at = start;
        while at < end {
            let len = READ_UNIT.min(end - at);
            let data = d
                .read_unlocked(at, len)
                .await
                .with_context(|| format!("reading {len} bytes at {at}"))?;
            let hashed = tokio::task::spawn_blocking(move || {
                data.chunks(REGION as usize)
                    .map(|r| r.chunks(BLOCK as usize).map(resync::block_hash).collect())
                    .collect::<Vec<Vec<BlockHash>>>()
            })
            .await?;
            blocks.extend(hashed);
            counters.hashed_bytes.fetch_add(len, Ordering::Relaxed);
            at += len;
        }
        // Level 1: region hashes.
        let hashes: Vec<BlockHash> = blocks.iter().map(|b| resync::region_hash(b)).collect();
        counters.hash_bytes.fetch_add(
            hashes.len() as u64 * resync::HASH_LEN as u64,
            Ordering::Relaxed,
        );
        send(Frame::RegionHashes {
            disk: index,
            first_region: first,
            hashes,
        })
        .await?;
        let differ = match reply(inbox).await? {
            Frame::RegionsDiffer {
                disk,
                first_region,
                regions,
                ..
            } if disk == index && first_region == first => regions,
            other => bail!(
                "expected regions-differ for regions {first}.. of disk {index}, got {other:?}"
            ),
        };
        // Level 2: block hashes of the regions that differ, all sent, then the replies.
        for &r in &differ {
            let b = r
                .checked_sub(first)
                .and_then(|i| blocks.get(i as usize))
                .ok_or_else(|| {
                    anyhow!("regions-differ names region {r}, outside the batch at {first}")
                })?;
            counters.hash_bytes.fetch_add(
                (b.len() * resync::WIRE_BLOCK_HASH_LEN) as u64,
                Ordering::Relaxed,
            );
            send(Frame::BlockHashes {
                disk: index,
                region: r,
                hashes: b.iter().map(resync::wire_block_hash).collect(),
            })
            .await?;
        }
        for &r in &differ {
            let which = match reply(inbox).await? {
                Frame::BlocksDiffer {
                    disk,
                    region,
                    blocks,
                } if disk == index && region == r => blocks,
                other => {
                    bail!("expected blocks-differ for region {r} of disk {index}, got {other:?}")
                }
            };
            for (b0, n) in runs(&which) {
                stream.wait_space(0.5).await;
                let offset = r * REGION + b0 as u64 * BLOCK;
                let sent = d
                    .resend_blocks(offset, n as u64 * BLOCK)
                    .await
                    .with_context(|| format!("resending {n} blocks at {offset}"))?;
                counters.block_bytes.fetch_add(sent, Ordering::Relaxed);
                counters.blocks.fetch_add(n as u64, Ordering::Relaxed);
                stream.resync_bytes.fetch_add(sent, Ordering::Relaxed);
            }
        }
        first += count;
    }
    Ok(())
}

/// Runs of adjacent block indexes: (first, length). Input need not be sorted.
fn runs(blocks: &[u8]) -> Vec<(u16, u16)> {
    let mut v: Vec<u16> = blocks.iter().map(|&b| b as u16).collect();
    v.sort_unstable();
    v.dedup();
    let mut out: Vec<(u16, u16)> = Vec::new();
    for b in v {
        match out.last_mut() {
            Some((s, n)) if *s + *n == b => *n += 1,
            _ => out.push((b, 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn runs_coalesce_adjacent_blocks() {
        assert_eq!(
            super::runs(&[5, 0, 1, 2, 7, 6, 255]),
            vec![(0, 3), (5, 3), (255, 1)]
        );
        assert!(super::runs(&[]).is_empty());
    }
}
