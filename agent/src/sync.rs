//! Initial replication of disks that already hold data.
//!
//! A disk with no sync record is copied whole into the stream while it stays in
//! use: all disks of the machine in parallel, in `SYNC_CHUNK` aligned reads, zero
//! chunks skipped (the replica starts as zeros). Each chunk is read with its
//! byte range locked, so a write to that range either completed before the read
//! (and the read sees it) or waits and takes a later seq: seq order is disk
//! order, which is what taking the seq before the read guarantees.
//!
//! Progress is persisted in `<state-dir>/sync-<disk>.rec` (envelope b"LBSY" of
//! JSON) only up to chunks already durable in the local journal, so a restart
//! resumes where it stopped. The sync starts once a welcome confirmed the
//! agent's numbering (see `rebase.rs`). While any disk syncs, no recovery point is taken;
//! the first point is placed when every disk is done. A checksum resync of
//! every disk replaces the initial sync when the replica turns out to hold
//! data already (the agent lost its state: `rebase.rs`) or the disk was resized.

use lifeboat_common::SpawnHere;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use lifeboat_common::formats::SyncState;
use lifeboat_common::protocol::{Op, TagKind};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::checksum::Checksum;
use crate::disk::ProtectedDisk;
use crate::stream::Stream;

/// Read unit of the initial sync.
pub const SYNC_CHUNK: u64 = 1 << 20;
/// How often progress is made durable.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
struct SyncRecord {
    size: u64,
    /// Every byte below this offset is in the stream.
    cursor: u64,
    done: bool,
    /// The replica may hold data (the disk was replicated before, e.g. at
    /// another size): zero chunks must be sent too.
    #[serde(default)]
    replica_has_data: bool,
}

/// Live progress of one disk's initial sync.
#[derive(Debug)]
pub struct SyncProgress {
    pub disk: String,
    pub size: u64,
    pub cursor: AtomicU64,
    pub sent_bytes: AtomicU64,
    pub done: AtomicBool,
    /// Zero chunks are skipped only when the replica is known to be all zeros.
    pub skip_zero: bool,
    started_at: u64,
    started: Instant,
}

impl SyncProgress {
    pub fn snapshot(&self) -> serde_json::Value {
        let cursor = self.cursor.load(Ordering::Relaxed);
        let done = self.done.load(Ordering::Relaxed);
        let elapsed = self.started.elapsed().as_secs_f64().max(1e-3);
        let scanned = cursor.saturating_sub(self.started_at);
        let rate = scanned as f64 / elapsed;
        let left = self.size.saturating_sub(cursor);
        serde_json::json!({
            "disk": self.disk,
            "state": if done { "streaming" } else { "initial-sync" },
            "percent": if self.size == 0 { 100.0 } else { cursor as f64 * 100.0 / self.size as f64 },
            "scanned-bytes": cursor,
            "resumed-from": self.started_at,
            "sent-bytes": self.sent_bytes.load(Ordering::Relaxed),
            "rate-bytes-per-s": rate as u64,
            "eta-s": if done || rate <= 0.0 { 0 } else { (left as f64 / rate).ceil() as u64 },
        })
    }
}

fn record_path(state_dir: &Path, disk: &str) -> PathBuf {
    state_dir.join(format!("sync-{disk}.rec"))
}

fn load_record(path: &Path) -> Result<Option<SyncRecord>> {
    crate::fsutil::load_record::<SyncState, _>(path)
}

fn store_record(path: &Path, rec: &SyncRecord) -> Result<()> {
    crate::fsutil::store_record::<SyncState, _>(path, rec)
}

/// Loads each disk's sync record and returns the progress objects; disks that
/// need syncing are marked in the stream so no point is taken before they finish.
///
/// A disk whose size differs from its record was resized while the agent was
/// stopped: a resize entry goes into the stream and a checksum resync of the
/// disk is planned (it replaces any unfinished initial sync). A disk already in
/// a pending checksum resync needs no initial sync either.
pub async fn prepare(
    state_dir: &Path,
    disks: &[Arc<ProtectedDisk>],
    stream: &Arc<Stream>,
    checksum: &Arc<Checksum>,
    initial_copy: crate::config::InitialCopy,
) -> Result<Vec<Arc<SyncProgress>>> {
    let mut out = Vec::new();
    for (index, d) in disks.iter().enumerate() {
        let path = record_path(state_dir, &d.id);
        let size = d.size_bytes();
        let known = load_record(&path)?;
        if known.is_none() && initial_copy == crate::config::InitialCopy::Checksum {
            let reason = format!(
                "disk {} is new to this agent and the replica holds a copy (initial-copy = \"checksum\")",
                d.id
            );
            info!("{reason}: comparing it with the replica instead of copying it");
            checksum
                .request(disks, &[d.index], &reason, stream, true)
                .await?;
        }
        let mut rec = known.unwrap_or(SyncRecord {
            size,
            cursor: 0,
            done: false,
            replica_has_data: false,
        });
        if rec.size != size {
            let reason = format!(
                "disk {} was resized from {} to {size} bytes while the agent was stopped",
                d.id, rec.size
            );
            warn!("{reason}: comparing it with the replica (checksum resync)");
            stream.mark_inconsistent("disk resize");
            stream.capture(Op::Resize {
                disk: index as u16,
                size,
            });
            stream.sync_journal().await.context("syncing the journal")?;
            checksum
                .request(disks, &[index as u16], &reason, stream, true)
                .await?;
        }
        let planned = checksum
            .pending()
            .is_some_and(|p| p.disks.iter().any(|pd| pd.id == d.id));
        if planned && (!rec.done || rec.size != size) {
            rec = SyncRecord {
                size,
                cursor: size,
                done: true,
                replica_has_data: true,
            };
            store_record(&path, &rec)?;
        }
        if !rec.done {
            if !stream.syncing() {
                // Before any write is captured: until the sync's point, no
                // prefix of the stream is the disk at some moment.
                stream.mark_inconsistent("initial sync");
            }
            stream.begin_sync();
        }
        out.push(Arc::new(SyncProgress {
            disk: d.id.clone(),
            size,
            cursor: AtomicU64::new(rec.cursor),
            sent_bytes: AtomicU64::new(0),
            done: AtomicBool::new(rec.done),
            skip_zero: !rec.replica_has_data,
            started_at: rec.cursor,
            started: Instant::now(),
        }));
    }
    Ok(out)
}

/// Runs the initial sync of every disk that needs it, in parallel, then places
/// the first recovery point.
pub async fn run(
    state_dir: PathBuf,
    disks: Vec<Arc<ProtectedDisk>>,
    progress: Vec<Arc<SyncProgress>>,
    stream: Arc<Stream>,
    rate_limit: Option<u64>,
    cancel: CancellationToken,
) -> Result<()> {
    if progress.iter().any(|p| !p.done.load(Ordering::Relaxed)) {
        // Only once the process server confirmed the numbering: an agent that
        // lost its state compares its disks instead (the sync is superseded).
        info!("initial sync waits for the process server's welcome");
        tokio::select! {
            _ = stream.wait_welcomed() => {}
            _ = cancel.cancelled() => return Ok(()),
        }
    }
    let mut tasks = tokio::task::JoinSet::new();
    let mut any = false;
    for (d, p) in disks.into_iter().zip(progress) {
        if p.done.load(Ordering::Relaxed) {
            continue;
        }
        any = true;
        info!(disk = %d.id, from = p.cursor.load(Ordering::Relaxed), "initial sync started");
        let span = tracing::info_span!("sync", disk = %d.id);
        tasks.spawn_here(tracing::Instrument::instrument(
            sync_disk(
                state_dir.clone(),
                d,
                p,
                stream.clone(),
                rate_limit,
                cancel.clone(),
            ),
            span,
        ));
    }
    let mut result = Ok(());
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = Err(e),
            Err(e) => result = Err(anyhow::anyhow!("sync task: {e}")),
        }
    }
    result?;
    if any && !cancel.is_cancelled() {
        match stream
            .tag(TagKind::Crash, None, "initial-sync-complete")
            .await
        {
            Some(seq) => info!(seq, "initial sync complete: first recovery point placed"),
            None => {
                info!("initial sync complete; the first point follows the resync of dirty regions")
            }
        }
    }
    Ok(())
}

/// The resync loop wakes on every change of the replication state; it also
/// looks at the dirty regions this often (a region marked dirty again after a
/// failed resend changes no state).
const RESYNC_RECHECK: Duration = Duration::from_secs(1);

/// Drives `bitmap` → `resync` → `streaming`: once the journal has drained to
/// half its bound, resends every dirty region (zeros included), then places a
/// crash-consistent point. Also resends what an unclean stop left dirty.
pub async fn run_resync(
    disks: Vec<Arc<ProtectedDisk>>,
    stream: Arc<Stream>,
    cancel: CancellationToken,
) -> Result<()> {
    use crate::dirty::REGION;
    use crate::stream::Mode;
    let no_dirty = |disks: &[Arc<ProtectedDisk>]| disks.iter().all(|d| d.dirty.dirty_count() == 0);
    let mut changes = stream.subscribe();
    while !cancel.is_cancelled() {
        let (mode, checksum_active) = {
            let s = changes.borrow_and_update();
            (s.mode, s.checksum_active)
        };
        match mode {
            Mode::Bitmap => {
                tokio::select! {
                    _ = stream.wait_space(0.5) => {}
                    _ = cancel.cancelled() => break,
                }
                let n: usize = disks.iter().map(|d| d.dirty.dirty_count()).sum();
                stream.enter_resync(&format!(
                    "journal drained below half: resending {n} dirty regions"
                ));
            }
            Mode::Streaming if !no_dirty(&disks) => {
                let n: usize = disks.iter().map(|d| d.dirty.dirty_count()).sum();
                stream.enter_resync(&format!("{n} regions may differ from the replica"));
            }
            Mode::Streaming => wait_change(&mut changes, &cancel).await,
            // The checksum resync owns the state; dirty regions wait for it.
            Mode::Resync if checksum_active => wait_change(&mut changes, &cancel).await,
            Mode::Resync => {
                'disks: for d in &disks {
                    while let Some(taken) = d.dirty.take_dirty() {
                        let r = taken.region;
                        tokio::select! {
                            _ = stream.wait_space(0.5) => {}
                            _ = cancel.cancelled() => {}
                        }
                        if stream.mode().0 != Mode::Resync || cancel.is_cancelled() {
                            break 'disks; // dropping `taken` marks it dirty again
                        }
                        let offset = r as u64 * REGION;
                        let len = REGION.min(d.size_bytes() - offset);
                        stream.resync_bytes.fetch_add(len, Ordering::Relaxed);
                        match d.sync_chunk(offset, len as u32, false).await {
                            Ok(_) => taken.resent(),
                            Err(e) => {
                                drop(taken); // dirty again
                                warn!(disk = %d.id, "resync of region {r}: {e}; retrying");
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                        }
                    }
                }
                if stream.finish_resync(|| no_dirty(&disks)) {
                    // A point waits for the welcome (after an unclean restart
                    // the resync may finish before it).
                    tokio::select! {
                        _ = stream.wait_welcomed() => {}
                        _ = cancel.cancelled() => break,
                    }
                    if let Some(seq) = stream.tag(TagKind::Crash, None, "resync-complete").await {
                        info!(seq, "resync complete: crash-consistent point placed");
                    }
                }
            }
        }
    }
    Ok(())
}

/// Waits for a change of the replication state (or [`RESYNC_RECHECK`]).
async fn wait_change(
    changes: &mut tokio::sync::watch::Receiver<crate::replication::Snapshot>,
    cancel: &CancellationToken,
) {
    tokio::select! {
        _ = changes.changed() => {}
        _ = tokio::time::sleep(RESYNC_RECHECK) => {}
        _ = cancel.cancelled() => {}
    }
}

async fn sync_disk(
    state_dir: PathBuf,
    disk: Arc<ProtectedDisk>,
    p: Arc<SyncProgress>,
    stream: Arc<Stream>,
    rate_limit: Option<u64>,
    cancel: CancellationToken,
) -> Result<()> {
    let path = record_path(&state_dir, &disk.id);
    let mut last_checkpoint = Instant::now();
    let started = Instant::now();
    let start = p.cursor.load(Ordering::Relaxed);
    let mut offset = start;
    while offset < p.size {
        if cancel.is_cancelled() {
            break;
        }
        if stream.sync_superseded() {
            info!(disk = %disk.id, "initial sync replaced by a checksum resync of the disk");
            offset = p.size;
            break;
        }
        let len = SYNC_CHUNK.min(p.size - offset);
        tokio::select! {
            _ = stream.wait_space(0.5) => {}
            _ = cancel.cancelled() => break,
        }
        let sent = disk
            .sync_chunk(offset, len as u32, p.skip_zero)
            .await
            .with_context(|| format!("initial sync of disk {} at byte {offset}", disk.id))?;
        if sent {
            p.sent_bytes.fetch_add(len, Ordering::Relaxed);
        }
        offset += len;
        p.cursor.store(offset, Ordering::Relaxed);
        if let Some(limit) = rate_limit {
            let due = Duration::from_secs_f64((offset - start) as f64 / limit as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        if last_checkpoint.elapsed() >= CHECKPOINT_EVERY {
            checkpoint(&stream, &path, &p, offset, false).await?;
            last_checkpoint = Instant::now();
        }
    }
    let done = offset >= p.size;
    checkpoint(&stream, &path, &p, offset, done).await?;
    if done {
        p.done.store(true, Ordering::Relaxed);
        stream.end_sync();
        info!(disk = %disk.id, bytes = p.size, sent = p.sent_bytes.load(Ordering::Relaxed), "initial sync of disk finished");
    }
    Ok(())
}

/// Persists progress once everything before `cursor` is durable in the journal.
async fn checkpoint(
    stream: &Arc<Stream>,
    path: &Path,
    p: &SyncProgress,
    cursor: u64,
    done: bool,
) -> Result<()> {
    stream.sync_journal().await.context("syncing the journal")?;
    let rec = SyncRecord {
        size: p.size,
        cursor,
        done,
        replica_has_data: !p.skip_zero || stream.sync_superseded(),
    };
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || store_record(&path, &rec)).await??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kept_version_1_sync_record_reads_back() {
        let rec = SyncRecord {
            size: 1 << 30,
            cursor: 5 << 20,
            done: false,
            replica_has_data: true,
        };
        let bytes = lifeboat_common::formats::read_fixture::<SyncState>("sync-record", || {
            lifeboat_common::formats::seal::<SyncState>(&serde_json::to_vec(&rec).unwrap())
        });
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sync-root.rec");
        std::fs::write(&path, bytes).unwrap();
        assert_eq!(load_record(&path).unwrap(), Some(rec));
    }
}
