//! The uploader: one task per machine that turns the cached log into sealed
//! segments in the object store and records recovery points.
//!
//! Loop: read the next entries after `uploaded` from the cache → cut a segment
//! (at `segment-max-bytes`, after `segment-max-age`, and always right after a tag)
//! → zstd + AES-256-GCM → put `log/<first>-<last>.seg` → put
//! `inconsistent/<seq>.json` for each inconsistent entry and `points/<seq>.json`
//! for each tag in it → persist `uploaded` → delete the cached range. Up to
//! `upload-concurrency` segments are sealed and uploaded at once; `uploaded`
//! advances strictly in order. Store errors retry with capped backoff forever
//! (the cache absorbs the stream meanwhile); nothing is deleted before the
//! segment and its points are stored.
//!
//! Disk sizes: the uploader starts from the sizes in `machine.json` and follows
//! the stream's resize entries; each point records the sizes at its seq, and a
//! segment that resized a disk rewrites `machine.json` before `uploaded` moves
//! past it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::Bytes;
use lifeboat_common::catalogue::{
    self, encode_segment, format_time_ms, point_object, segment_object, InconsistentRecord,
    MachineRecord, PointRecord,
};
use lifeboat_common::protocol::{DiskInfo, Entry, Op};
use lifeboat_common::seal::{self, Key};
use lifeboat_common::store::Store;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::cache::{Batch, Cache};
use crate::config::PsConfig;

const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Runs `op` until it succeeds or `cancel` fires, backing off between attempts.
pub async fn retry<T, F, Fut>(what: &str, cancel: &CancellationToken, mut op: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut delay = RETRY_MIN;
    let mut attempt = 0u32;
    loop {
        match op().await {
            Ok(v) => return Some(v),
            Err(e) => {
                attempt += 1;
                warn!("{what} failed (attempt {attempt}, retrying in {delay:?}): {e:#}");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = cancel.cancelled() => return None,
        }
        delay = (delay * 2).min(RETRY_MAX);
    }
}

/// Entries kept in memory for the uploader, so the hot path never reads the
/// cache back; beyond this the uploader reads RocksDB instead.
pub const TAIL_MAX_BYTES: usize = 256 * 1024 * 1024;

/// The newest durable entries of a machine, consecutive by seq.
#[derive(Default)]
pub struct Tail {
    entries: VecDeque<Entry>,
    bytes: usize,
}

impl Tail {
    /// Adds entries just made durable; keeps the queue consecutive and bounded.
    pub fn push(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else {
            return;
        };
        if self.entries.back().is_some_and(|b| b.seq + 1 != first.seq) {
            self.entries.clear();
            self.bytes = 0;
        }
        let add: usize = entries.iter().map(Entry::encoded_len).sum();
        if self.bytes + add > TAIL_MAX_BYTES {
            return; // the uploader falls back to the cache; the next push restarts the tail
        }
        self.bytes += add;
        self.entries.extend(entries.iter().cloned());
    }

    /// Takes entries from `from` on (up to `budget` bytes, stopping after a tag) if
    /// the tail holds `from`; `None` if the caller must read the cache.
    fn take(&mut self, from: u64, budget: usize) -> Option<Batch> {
        while self.entries.front().is_some_and(|e| e.seq < from) {
            let e = self.entries.pop_front().expect("non-empty");
            self.bytes -= e.encoded_len();
        }
        match self.entries.front() {
            None => None, // nothing in memory: the cache may still hold entries
            Some(e) if e.seq != from => None,
            Some(_) => {
                let mut b = Batch::default();
                while let Some(e) = self.entries.pop_front() {
                    let len = e.encoded_len();
                    self.bytes -= len;
                    b.bytes += len;
                    let is_tag = matches!(e.op, Op::Tag { .. });
                    b.entries.push(e);
                    if is_tag {
                        b.ends_at_tag = true;
                        break;
                    }
                    if b.bytes >= budget {
                        break;
                    }
                }
                Some(b)
            }
        }
    }
}

/// Shared state of one machine's uploader.
pub struct MachineUploader {
    pub machine: String,
    pub notify: Notify,
    pub tail: std::sync::Mutex<Tail>,
}

/// Writes `machine.json` and makes sure the machine's data key exists; returns
/// the key and the record the uploader starts from. Disk sizes already in the
/// store are kept: they are the sizes as of the last uploaded segment, and
/// resize entries in the stream change them from there.
pub async fn prepare_machine(
    store: &Store,
    kek: &Key,
    rec: &MachineRecord,
) -> Result<(Key, MachineRecord)> {
    let m = &rec.machine;
    let mut rec = rec.clone();
    match catalogue::load_machine(store, m).await {
        Ok(stored) if stored.disks.len() == rec.disks.len() => {
            let cached = rec.clone();
            rec.disks = stored.disks.clone();
            rec.largest_sizes = stored.largest_sizes.clone();
            rec.widen(Some(&cached));
        }
        Ok(_) | Err(catalogue::CatalogueError::Missing { .. }) => rec.widen(None),
        Err(e) => return Err(e.into()),
    }
    put_machine_json(store, &rec).await?;
    let name = catalogue::data_key_object(m);
    let fresh = Key::generate();
    let created = store
        .put_if_absent(&name, Bytes::from(catalogue::seal_data_key(kek, m, &fresh)))
        .await?;
    if created {
        info!(machine = %m, "created data key {}", store.describe(&name));
        return Ok((fresh, rec));
    }
    Ok((catalogue::load_data_key(store, kek, m).await?, rec))
}

/// Stores `value` as JSON at `obj`, retrying like every store write (`None`:
/// cancelled).
async fn put_json<T: serde::Serialize>(
    store: &Store,
    obj: &str,
    value: &T,
    cancel: &CancellationToken,
) -> Option<()> {
    let body = Bytes::from(serde_json::to_vec_pretty(value).ok()?);
    retry(
        &format!("recording {}", store.describe(obj)),
        cancel,
        || {
            let body = body.clone();
            async move { Ok(store.put(obj, body).await?) }
        },
    )
    .await
}

async fn put_machine_json(store: &Store, rec: &MachineRecord) -> Result<()> {
    store
        .put(
            &catalogue::machine_json(&rec.machine),
            Bytes::from(serde_json::to_vec_pretty(rec)?),
        )
        .await?;
    Ok(())
}

/// The uploader's record with the disks the cache's record (the last hello)
/// added after it, and its retired flags; `None` when nothing changed. Sizes of
/// known disks stay as the stream made them (resize entries).
fn adopt_new_disks(cache: &Cache, rec: &MachineRecord) -> Option<MachineRecord> {
    let cached = cache.machine(&rec.machine).ok()??;
    let mut out = rec.clone();
    let mut changed = false;
    for (i, d) in cached.disks.iter().enumerate() {
        match out.disks.get_mut(i) {
            Some(mine) if mine.id == d.id => {
                if mine.retired != d.retired {
                    mine.retired = d.retired;
                    changed = true;
                }
            }
            Some(_) => return None, // refused at the hello; never merged
            None => {
                out.disks.push(d.clone());
                changed = true;
            }
        }
    }
    changed.then(|| {
        out.widen(None);
        out
    })
}

/// Applies the resize entries among `entries` to `disks`; returns whether any did.
fn apply_resizes(disks: &mut [DiskInfo], entries: &[Entry]) -> bool {
    let mut any = false;
    for e in entries {
        if let Op::Resize { disk, size } = e.op {
            match disks.get_mut(disk as usize) {
                Some(d) => {
                    info!(seq = e.seq, disk = %d.id, from = d.size, to = size, "disk resized");
                    d.size = size;
                    any = true;
                }
                None => warn!(
                    seq = e.seq,
                    "resize of disk #{disk}, which the machine record does not list"
                ),
            }
        }
    }
    any
}

struct Upload {
    first: u64,
    last: u64,
    handle: JoinHandle<Option<()>>,
    /// The record to store once this segment is uploaded (it resized a disk).
    machine_json: Option<MachineRecord>,
}

/// An uploader that stops (cancelled, or on an error) stops its uploads too.
impl Drop for Upload {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// Pause before a stopped uploader task is started again.
pub const RESTART_PAUSE: Duration = Duration::from_secs(5);

/// What every machine's uploader works with.
#[derive(Clone)]
pub struct UploadEnv {
    pub cfg: Arc<PsConfig>,
    pub cache: Arc<Cache>,
    pub store: Store,
    pub kek: Key,
    pub cancel: CancellationToken,
}

/// Runs the machine's uploader until `cancel`, starting it again whenever it
/// stops on an error (a cache read or write it could not retry): an uploader
/// that quietly stayed down would let the cache grow and the RPO slip.
pub async fn supervise(env: UploadEnv, me: Arc<MachineUploader>) {
    loop {
        run_machine(env.clone(), me.clone()).await;
        if env.cancel.is_cancelled() {
            return;
        }
        warn!(machine = %me.machine, "uploader stopped; starting it again in {RESTART_PAUSE:?}");
        tokio::select! {
            _ = tokio::time::sleep(RESTART_PAUSE) => {}
            _ = env.cancel.cancelled() => return,
        }
    }
}

/// The uploader task of one machine. Returns when `cancel` fires, or on an
/// error it logged ([`supervise`] starts it again).
pub async fn run_machine(env: UploadEnv, me: Arc<MachineUploader>) {
    let UploadEnv {
        cfg,
        cache,
        store,
        kek,
        cancel,
    } = env;
    let machine = me.machine.clone();
    let rec = match cache.machine(&machine) {
        Ok(rec) => rec,
        Err(e) => {
            warn!(%machine, "reading the machine record from the cache: {e:#}");
            None
        }
    };
    let Some(rec) = rec else {
        warn!(%machine, "no machine record in the cache; uploader not started");
        return;
    };
    let Some((data_key, mut rec)) = retry(
        &format!("preparing {machine} in {}", store.url()),
        &cancel,
        || prepare_machine(&store, &kek, &rec),
    )
    .await
    else {
        return;
    };

    let mut next = match cache.uploaded(&machine) {
        Ok(u) => u + 1,
        Err(e) => {
            warn!(%machine, "reading the uploaded position: {e:#}");
            return;
        }
    };
    let mut in_flight: VecDeque<Upload> = VecDeque::new();
    let max = cfg.segment_max_bytes as usize;
    // Entries read from the cache for the next segment, and when the first arrived.
    let mut pending = Batch::default();
    let mut pending_since: Option<Instant> = None;
    // Signalled whenever an upload task finishes.
    let done = Arc::new(Notify::new());
    loop {
        // Retire finished uploads in order.
        while in_flight.front().is_some_and(|u| u.handle.is_finished()) {
            let mut u = in_flight.pop_front().expect("checked non-empty");
            match (&mut u.handle).await {
                Ok(Some(())) => {}
                _ => return, // cancelled
            }
            if let Some(r) = &u.machine_json {
                let done = retry(
                    &format!("recording the new disk sizes of {machine}"),
                    &cancel,
                    || put_machine_json(&store, r),
                )
                .await;
                if done.is_none() {
                    return; // cancelled
                }
            }
            let c = cache.clone();
            let m = machine.clone();
            let (first, last) = (u.first, u.last);
            match tokio::task::spawn_blocking(move || c.mark_uploaded(&m, first, last)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    warn!(%machine, "recording upload of {first}..={last}: {e:#}");
                    return;
                }
                Err(e) => {
                    warn!(%machine, "recording upload: {e}");
                    return;
                }
            }
        }
        if cancel.is_cancelled() {
            return; // dropping the uploads aborts them
        }
        if in_flight.len() >= cfg.upload_concurrency {
            tokio::select! {
                _ = done.notified() => {}
                _ = cancel.cancelled() => {}
            }
            continue;
        }

        // Top up the pending segment with entries that arrived since the last read.
        if !pending.ends_at_tag && pending.bytes < max {
            let c = cache.clone();
            let m = machine.clone();
            let from = next + pending.entries.len() as u64;
            let budget = max - pending.bytes;
            let from_tail = me
                .tail
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(from, budget);
            let read = match from_tail {
                Some(b) => Ok(Ok(b)),
                None => tokio::task::spawn_blocking(move || c.read_batch(&m, from, budget)).await,
            };
            match read {
                Ok(Ok(b)) => {
                    pending.entries.extend(b.entries);
                    pending.bytes += b.bytes;
                    pending.ends_at_tag = b.ends_at_tag;
                }
                Ok(Err(e)) => {
                    warn!(%machine, "reading the cache: {e:#}");
                    tokio::time::sleep(RETRY_MIN).await;
                    continue;
                }
                Err(_) => return,
            }
        }
        let wait = if pending.entries.is_empty() {
            Some(Duration::from_secs(3600))
        } else {
            let since = *pending_since.get_or_insert_with(Instant::now);
            if pending.ends_at_tag || pending.bytes >= max {
                None
            } else {
                let left = cfg.segment_max_age.saturating_sub(since.elapsed());
                (!left.is_zero()).then_some(left)
            }
        };
        if let Some(d) = wait {
            // Not ready: wait for new entries, the age limit, or a finished upload.
            tokio::select! {
                _ = me.notify.notified() => {}
                _ = tokio::time::sleep(d) => {}
                _ = done.notified() => {}
                _ = cancel.cancelled() => {}
            }
            continue;
        }

        let entries = std::mem::take(&mut pending.entries);
        pending = Batch::default();
        pending_since = None;
        let first = next;
        let last = entries.last().map(|e| e.seq).unwrap_or(first);
        next = last + 1;
        // Disks added (or retired) by a hello since: listed in machine.json
        // before any segment that writes them.
        if let Some(grown) = adopt_new_disks(&cache, &rec) {
            if retry(
                &format!("recording the disks of {machine} in {}", store.url()),
                &cancel,
                || put_machine_json(&store, &grown),
            )
            .await
            .is_none()
            {
                return;
            }
            info!(%machine, disks = grown.disks.len(), "machine.json lists the disks the agent announced");
            rec = grown;
        }
        let disks_at_start = rec.disks.clone();
        let machine_json = apply_resizes(&mut rec.disks, &entries).then(|| {
            rec.widen(None);
            rec.clone()
        });
        let task = upload_segment(
            store.clone(),
            data_key.clone(),
            machine.clone(),
            disks_at_start,
            entries,
            cfg.zstd_level,
            cancel.clone(),
        );
        let signal = done.clone();
        let handle = tokio::spawn(async move {
            let r = task.await;
            signal.notify_one();
            r
        });
        in_flight.push_back(Upload {
            first,
            last,
            handle,
            machine_json,
        });
    }
}

async fn upload_segment(
    store: Store,
    key: Key,
    machine: String,
    mut disks: Vec<DiskInfo>,
    entries: Vec<Entry>,
    level: i32,
    cancel: CancellationToken,
) -> Option<()> {
    let first = entries.first()?.seq;
    let last = entries.last()?.seq;
    let name = segment_object(&machine, first, last);
    // A point carries the disk sizes of its seq.
    let mut points: Vec<PointRecord> = Vec::new();
    let mut unsettled: Vec<InconsistentRecord> = Vec::new();
    for e in &entries {
        match &e.op {
            Op::Inconsistent { label } => unsettled.push(InconsistentRecord {
                format: catalogue::FORMAT_VERSION,
                seq: e.seq,
                label: label.clone(),
            }),
            Op::Resize { disk, size } => {
                if let Some(d) = disks.get_mut(*disk as usize) {
                    d.size = *size;
                }
            }
            Op::Tag {
                kind,
                time_ms,
                label,
            } => points.push(PointRecord {
                format: catalogue::FORMAT_VERSION,
                id: catalogue::point_id(e.seq),
                kind: *kind,
                seq: e.seq,
                time_ms: *time_ms,
                time: format_time_ms(*time_ms),
                label: label.clone(),
                disks: disks.clone(),
            }),
            _ => {}
        }
    }
    let sealed = {
        let name = name.clone();
        let machine = machine.clone();
        tokio::task::spawn_blocking(move || {
            let plain = encode_segment(&machine, &entries);
            Bytes::from(seal::seal(&key, &name, 0, &plain, level))
        })
        .await
        .ok()?
    };
    // Before the segment: whoever sees the segment sees the mark too.
    for m in unsettled {
        let obj = catalogue::inconsistent_object(&machine, m.seq);
        put_json(&store, &obj, &m, &cancel).await?;
    }
    retry(
        &format!("uploading {}", store.describe(&name)),
        &cancel,
        || {
            let data = sealed.clone();
            let store = &store;
            let name = &name;
            async move { Ok(store.put(name, data).await?) }
        },
    )
    .await?;
    for p in points {
        put_json(&store, &point_object(&machine, p.seq), &p, &cancel).await?;
        info!(%machine, seq = p.seq, kind = p.kind.as_str(), "recovery point stored");
    }
    Some(())
}
