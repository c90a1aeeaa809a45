//! Checksum resync, the agent's side: it makes the replica equal to the disks
//! without knowing what changed. Started by the receiver's resync-start, or by
//! the agent itself when it knows the replica may differ (a disk resized while
//! the agent was stopped, lost agent state — see `rebase.rs`).
//!
//! Per disk, in batches of `BATCH_REGIONS` 1 MiB regions: read the batch in
//! `READ_UNIT` aligned reads, hash every 4 KiB block and every region (see
//! `lifeboat_common::resync`) → region-hashes → the receiver answers which
//! regions differ → block-hashes of those regions (kept from the read, no second
//! read) → the receiver answers which blocks differ → those blocks, adjacent
//! ones coalesced, are read again under their range lock and put into the
//! stream as ordinary writes (seq, journal, exactly-once). The next batch is
//! read and hashed while the receiver answers this one, so the round trips
//! and the resends hide behind the read.
//!
//! The plan (which disks, and per disk the first region not yet compared) is
//! persisted in `<state-dir>/checksum-resync.rec` (envelope b"LBCK" of JSON),
//! advanced after every batch once the blocks resent so far are durable in the
//! journal (two fsyncs per 64 MiB compared). A resync cut by a lost link or an agent restart resumes
//! from there when the link is back. While a plan exists the state is `resync`
//! and no point is taken; when every disk is compared the plan is removed, the
//! state returns to `streaming`, a crash-consistent tag
//! `checksum-resync-complete` is placed, and resync-done (with the counters) is
//! sent once the receiver acknowledged it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use lifeboat_common::formats::ChecksumPlan;
use lifeboat_common::protocol::{Frame, ResyncReport, TagKind};
use lifeboat_common::resync::{self, BlockHash, HashScheme, BLOCK, REGION};
use serde::{Deserialize, Serialize};
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
pub const PLAN_FILE: &str = "checksum-resync.rec";

/// What is left of a checksum resync.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Plan {
    pub reason: String,
    pub disks: Vec<PlanDisk>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct PlanDisk {
    pub id: String,
    /// The disk's size when planned (a different size starts it over).
    pub size: u64,
    /// Regions below this one are compared and their differing blocks are in
    /// the journal.
    pub next_region: u64,
}

fn load_plan(path: &Path) -> Result<Option<Plan>> {
    crate::fsutil::load_record::<ChecksumPlan, _>(path)
}

/// Replaces the plan file atomically (or removes it for `None`), synced.
fn store_plan(path: &Path, plan: Option<&Plan>) -> Result<()> {
    match plan {
        Some(plan) => crate::fsutil::store_record::<ChecksumPlan, _>(path, plan),
        None => {
            crate::fsutil::remove_file(path).with_context(|| format!("removing {}", path.display()))
        }
    }
}

/// Counters of the current (or last) run, for `status`.
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
}

/// The plan and how many times it was requested (a run that started before
/// the latest request must not clear it).
#[derive(Default)]
struct Planned {
    plan: Option<Plan>,
    requests: u64,
}

/// The machine's checksum resync: its persisted plan and its counters.
pub struct Checksum {
    path: PathBuf,
    plan: Mutex<Planned>,
    /// Serialises writes of the plan file; each writes the plan as it is then.
    file: Mutex<()>,
    pub counters: Counters,
}

impl Checksum {
    /// Loads the plan an interrupted resync left; the stream then stays in
    /// `resync` until it completes. A disk whose size changed starts over.
    pub fn open(
        state_dir: &Path,
        disks: &[Arc<ProtectedDisk>],
        stream: &Stream,
    ) -> Result<Arc<Checksum>> {
        let path = state_dir.join(PLAN_FILE);
        let mut plan = load_plan(&path)?;
        if let Some(p) = plan.as_mut() {
            p.disks.retain_mut(|pd| match disks.iter().find(|d| d.id == pd.id) {
                None => {
                    warn!(disk = %pd.id, "the pending checksum resync names a disk no longer configured; dropping it");
                    false
                }
                Some(d) => {
                    if d.size_bytes() != pd.size {
                        pd.size = d.size_bytes();
                        pd.next_region = 0;
                    }
                    true
                }
            });
        }
        let plan = plan.filter(|p| !p.disks.is_empty());
        if let Some(p) = &plan {
            warn!(
                "a checksum resync did not finish ({}); it resumes when the process server is reachable: {}",
                p.reason,
                describe(p)
            );
            stream.begin_checksum_resync(&p.reason);
        }
        Ok(Arc::new(Checksum {
            path,
            plan: Mutex::new(Planned { plan, requests: 0 }),
            file: Mutex::new(()),
            counters: Counters::default(),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Planned> {
        self.plan.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The pending plan, if any.
    pub fn pending(&self) -> Option<Plan> {
        self.lock().plan.clone()
    }

    /// The pending plan and the request count it reflects.
    fn snapshot_plan(&self) -> Option<(Plan, u64)> {
        let g = self.lock();
        g.plan.clone().map(|p| (p, g.requests))
    }

    /// Records a resync of the disks numbered `targets` from their first
    /// region, merged with any pending plan, and takes the `resync` state (both
    /// under the plan lock), then makes the plan durable. Refused during an
    /// initial sync unless `force`.
    pub async fn request(
        self: &Arc<Self>,
        disks: &[Arc<ProtectedDisk>],
        targets: &[u16],
        reason: &str,
        stream: &Stream,
        force: bool,
    ) -> Result<()> {
        // Targets are disk numbers; a retired disk (no longer configured)
        // has nothing to compare and is left out.
        let chosen: Vec<&Arc<ProtectedDisk>> = disks
            .iter()
            .filter(|d| targets.contains(&d.index))
            .collect();
        if chosen.is_empty() {
            bail!("resync names disks {targets:?}, none of which this agent protects now");
        }
        if !force && stream.syncing() {
            bail!("initial sync in progress: a checksum resync can only follow it");
        }
        let (before, described) = {
            let mut g = self.lock();
            let before = g.plan.clone();
            let plan = g.plan.get_or_insert_with(|| Plan {
                reason: reason.to_string(),
                disks: Vec::new(),
            });
            if plan.reason != reason {
                plan.reason = format!("{}; then {reason}", plan.reason);
            }
            for d in chosen {
                let fresh = PlanDisk {
                    id: d.id.clone(),
                    size: d.size_bytes(),
                    next_region: 0,
                };
                match plan.disks.iter_mut().find(|pd| pd.id == d.id) {
                    Some(pd) => *pd = fresh,
                    None => plan.disks.push(fresh),
                }
            }
            let described = describe(plan);
            g.requests += 1;
            stream.begin_checksum_resync(reason);
            (before, described)
        };
        if let Err(e) = self.persist_async().await {
            // Not durable: undo, and leave the resync state if nothing is left.
            let mut g = self.lock();
            g.plan = before;
            g.requests += 1;
            if g.plan.is_none() {
                stream.end_checksum_resync(|| disks.iter().all(|d| d.dirty.dirty_count() == 0));
            }
            return Err(e);
        }
        info!("checksum resync planned ({reason}): {described}");
        Ok(())
    }

    /// Writes the plan as it is now (removes the file when there is none).
    fn persist(&self) -> Result<()> {
        let _file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let plan = self.pending();
        store_plan(&self.path, plan.as_ref())
    }

    async fn persist_async(self: &Arc<Self>) -> Result<()> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.persist()).await?
    }

    /// Every region of `disk` below `next_region` is compared and what differed
    /// is durable in the journal.
    async fn advance(self: &Arc<Self>, disk: &str, next_region: u64) -> Result<()> {
        if let Some(plan) = self.lock().plan.as_mut() {
            if let Some(pd) = plan.disks.iter_mut().find(|pd| pd.id == disk) {
                pd.next_region = pd.next_region.max(next_region);
            }
        }
        self.persist_async().await
    }

    /// Every disk of the run that started at request count `requests` is
    /// compared: the plan goes and the stream leaves the resync state (if
    /// `no_dirty`), in one step no abort can split — unless a request came in
    /// meanwhile, whose plan then stays for the next run. Returns whether the
    /// stream is `streaming` again.
    fn finish(&self, requests: u64, stream: &Stream, no_dirty: impl Fn() -> bool) -> bool {
        let mut g = self.lock();
        if g.requests != requests {
            return false;
        }
        g.plan = None;
        stream.end_checksum_resync(no_dirty)
    }

    pub fn snapshot(&self) -> serde_json::Value {
        let c = &self.counters;
        serde_json::json!({
            "running": c.running.load(Ordering::Relaxed),
            "pending": self.pending(),
            "hashed-bytes": c.hashed_bytes.load(Ordering::Relaxed),
            "hash-bytes": c.hash_bytes.load(Ordering::Relaxed),
            "block-bytes": c.block_bytes.load(Ordering::Relaxed),
            "blocks-sent": c.blocks.load(Ordering::Relaxed),
            "last": *c.last.lock().unwrap_or_else(|p| p.into_inner()),
        })
    }
}

fn describe(plan: &Plan) -> String {
    plan.disks
        .iter()
        .map(|pd| {
            format!(
                "{} from region {} of {}",
                pd.id,
                pd.next_region,
                resync::region_count(pd.size)
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Marks the run stopped however it ends; an abort (the session dropped)
/// leaves the plan for the next session. With no plan left, the resync state
/// must not outlive the run.
struct RunGuard<'a> {
    ck: &'a Checksum,
    stream: &'a Stream,
    disks: &'a [Arc<ProtectedDisk>],
}

impl Drop for RunGuard<'_> {
    fn drop(&mut self) {
        let was_running = self.ck.counters.running.swap(false, Ordering::SeqCst);
        let g = self.ck.lock();
        match &g.plan {
            Some(p) if was_running => warn!(
                "checksum resync interrupted; it resumes when the link is back: {}",
                describe(p)
            ),
            Some(_) => {}
            None => {
                self.stream
                    .end_checksum_resync(|| self.disks.iter().all(|d| d.dirty.dirty_count() == 0));
            }
        }
    }
}

/// Runs the pending plan; sends resync-done however it ends (unless the
/// session went away first).
pub async fn run(
    ck: Arc<Checksum>,
    disks: Vec<Arc<ProtectedDisk>>,
    stream: Arc<Stream>,
    out: mpsc::Sender<Frame>,
    inbox: mpsc::UnboundedReceiver<Frame>,
    scheme: HashScheme,
) {
    let Some((plan, requests)) = ck.snapshot_plan() else {
        return;
    };
    let n = plan.disks.len() as u16;
    ck.counters.reset();
    let guard = RunGuard {
        ck: &ck,
        stream: &stream,
        disks: &disks,
    };
    let report = match resync_all(
        &ck,
        &plan,
        requests,
        &disks,
        &stream,
        Peer {
            out: &out,
            inbox,
            scheme,
        },
    )
    .await
    {
        Ok(tag_seq) => ck.counters.report(n, tag_seq, String::new()),
        Err(e) => {
            warn!("checksum resync failed: {e:#}");
            ck.counters.report(n, 0, format!("{e:#}"))
        }
    };
    ck.counters.running.store(false, Ordering::SeqCst);
    drop(guard);
    *ck.counters.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(report.clone());
    let _ = out.send(Frame::ResyncDone(report)).await;
}

/// The session a resync runs in: frames out, the receiver's replies in, and
/// the hash scheme its protocol version decides.
struct Peer<'a> {
    out: &'a mpsc::Sender<Frame>,
    inbox: mpsc::UnboundedReceiver<Frame>,
    scheme: HashScheme,
}

async fn resync_all(
    ck: &Arc<Checksum>,
    plan: &Plan,
    requests: u64,
    disks: &[Arc<ProtectedDisk>],
    stream: &Arc<Stream>,
    mut peer: Peer<'_>,
) -> Result<u64> {
    let out = peer.out;
    stream.begin_checksum_resync(&plan.reason);
    info!(
        "checksum resync running ({}): {}",
        plan.reason,
        describe(plan)
    );
    // Before the first resend: until the closing point the stream's end is
    // not crash-consistent.
    stream.mark_inconsistent("checksum resync");
    // The receiver compares with the replica as of the entries it holds, so
    // what the journal still holds from before this run must be in it first:
    // such an entry landing after its region was judged equal would overwrite
    // it with data the disk may no longer hold, and nothing would resend it
    // (after a restart, a plan of the whole disk replaces the resend of the
    // activity log's regions, which covered writes the journal had no room
    // for). Entries captured during the run are safe: a later change of their
    // blocks is journaled after them or marked dirty.
    wait_acked(stream, stream.positions().captured, out).await?;
    for pd in &plan.disks {
        let Some(d) = disks.iter().find(|d| d.id == pd.id) else {
            // Removed from the config since it was planned: retired, its
            // replica stays as it is.
            warn!(
                "the resync plan names disk {}, which is no longer configured: skipped",
                pd.id
            );
            continue;
        };
        resync_disk(ck, d.index, d, pd.next_region, stream, &mut peer)
            .await
            .with_context(|| format!("checksum resync of disk {}", d.id))?;
    }
    let streaming = ck.finish(requests, stream, || {
        disks.iter().all(|d| d.dirty.dirty_count() == 0)
    });
    ck.persist_async().await?;
    if ck.pending().is_some() {
        bail!("a new resync was requested during this one; it runs next");
    }
    if !streaming {
        bail!(
            "every block was compared and sent, but the stream left the resync state ({:?}: {}); the next point follows the dirty-region resync",
            stream.mode().0,
            stream.mode().1
        );
    }
    let seq = stream
        .tag(TagKind::Crash, None, TAG_LABEL)
        .await
        .ok_or_else(|| {
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
    ck: &Arc<Checksum>,
    index: u16,
    d: &Arc<ProtectedDisk>,
    start: u64,
    stream: &Arc<Stream>,
    peer: &mut Peer<'_>,
) -> Result<()> {
    let (out, scheme, inbox) = (peer.out, peer.scheme, &mut peer.inbox);
    let counters = &ck.counters;
    let size = d.size_bytes();
    let regions = resync::region_count(size);
    let send = |f: Frame| async move {
        out.send(f)
            .await
            .map_err(|_| anyhow!("the session ended during the resync"))
    };
    let mut first = start;
    if start > 0 {
        info!(disk = %d.id, "checksum resync resumes at region {start} of {regions}");
    }
    // Level 0 of the next batch is read and hashed while the receiver
    // answers this one's hashes and its differing blocks are resent: the
    // read is unlocked anyway (a write racing it is in the stream before
    // the batch's hashes, so the receiver finds it differs).
    let level0 = |first: u64| {
        let count = BATCH_REGIONS.min(regions - first);
        Abort(lifeboat_common::spawn(hash_batch(
            d.clone(),
            first,
            count,
            scheme,
            ck.clone(),
        )))
    };
    let mut next = (first < regions).then(|| level0(first));
    while first < regions {
        let count = BATCH_REGIONS.min(regions - first);
        let blocks = match next.take() {
            Some(mut task) => (&mut task.0).await??,
            None => bail!("no hashing under way for region {first}"),
        };
        if first + count < regions {
            next = Some(level0(first + count));
        }
        // Level 1: region hashes.
        let hashes: Vec<BlockHash> = blocks.iter().map(|b| scheme.region(b)).collect();
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
        stream.sync_journal().await.context("syncing the journal")?;
        ck.advance(&d.id, first).await?;
    }
    Ok(())
}

/// Waits until the receiver acknowledged every seq up to `seq` (it holds them
/// in its replica before it reads anything sent after).
async fn wait_acked(stream: &Stream, seq: u64, out: &mpsc::Sender<Frame>) -> Result<()> {
    while stream.positions().acked < seq {
        if out.is_closed() {
            bail!("the session ended during the resync");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Aborts its task when dropped (a resync that fails stops hashing ahead).
struct Abort<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for Abort<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Level 0 of regions `first..first + count` of `d`: reads them in
/// `READ_UNIT`s (the next read runs while a unit is hashed) and returns each
/// region's block hashes.
async fn hash_batch(
    d: Arc<ProtectedDisk>,
    first: u64,
    count: u64,
    scheme: HashScheme,
    ck: Arc<Checksum>,
) -> Result<Vec<Vec<BlockHash>>> {
    let mut blocks: Vec<Vec<BlockHash>> = Vec::with_capacity(count as usize);
    let start = first * REGION;
    let end = ((first + count) * REGION).min(d.size_bytes());
    let read = |at: u64| {
        let (d, len) = (d.clone(), READ_UNIT.min(end - at));
        lifeboat_common::spawn(async move {
            d.read_unlocked(at, len)
                .await
                .with_context(|| format!("reading {len} bytes at {at}"))
        })
    };
    let mut next = Some(read(start));
    let mut at = start;
    while let Some(reading) = next.take() {
        let data = reading.await??;
        let len = data.len() as u64;
        if at + len < end {
            next = Some(read(at + len));
        }
        blocks.extend(hash_regions(data, scheme).await?);
        ck.counters.hashed_bytes.fetch_add(len, Ordering::Relaxed);
        at += len;
    }
    Ok(blocks)
}

/// Block hashes of each region in `data` (whole regions but maybe the disk's
/// last), computed on two threads.
async fn hash_regions(data: bytes::Bytes, scheme: HashScheme) -> Result<Vec<Vec<BlockHash>>> {
    let hash = |part: bytes::Bytes| {
        tokio::task::spawn_blocking(move || {
            part.chunks(REGION as usize)
                .map(|r| r.chunks(BLOCK as usize).map(|b| scheme.block(b)).collect())
                .collect::<Vec<Vec<BlockHash>>>()
        })
    };
    let regions = (data.len() as u64).div_ceil(REGION);
    if regions < 2 {
        return Ok(hash(data).await?);
    }
    let mid = ((regions / 2) * REGION) as usize;
    let (a, b) = tokio::join!(hash(data.slice(..mid)), hash(data.slice(mid..)));
    let mut out = a?;
    out.extend(b?);
    Ok(out)
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
    use super::*;

    #[test]
    fn the_kept_version_1_plan_reads_back() {
        let plan = Plan {
            reason: "disk root was resized".into(),
            disks: vec![PlanDisk {
                id: "root".into(),
                size: 1 << 30,
                next_region: 17,
            }],
        };
        let bytes = lifeboat_common::formats::read_fixture::<ChecksumPlan>("checksum-plan", || {
            lifeboat_common::formats::seal::<ChecksumPlan>(&serde_json::to_vec(&plan).unwrap())
        });
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checksum-resync.rec");
        std::fs::write(&path, bytes).unwrap();
        assert_eq!(load_plan(&path).unwrap(), Some(plan));
    }

    #[test]
    fn runs_coalesce_adjacent_blocks() {
        assert_eq!(
            super::runs(&[5, 0, 1, 2, 7, 6, 255]),
            vec![(0, 3), (5, 3), (255, 1)]
        );
        assert!(super::runs(&[]).is_empty());
    }
}
