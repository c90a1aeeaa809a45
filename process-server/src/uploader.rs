//! The uploader: one task per machine that turns the cached log into sealed
//! segments in the object store and records recovery points.
//!
//! Loop: read the next entries after `uploaded` from the cache → cut a segment
//! (at `segment-max-bytes`, after `segment-max-age`, and always right after a tag)
//! → zstd + AES-256-GCM → put `points/<seq>.json` for each tag in it and
//! `inconsistent/<seq>.json` for each inconsistent entry → put
//! `log/<first>-<last>-<epoch>-<time>.seg` (time: when its entries were all
//! durable; a segment stored before a restart and cut again at the same
//! seqs keeps its name. The stream end moves with segments, so whoever
//! sees a segment sees its points and marks) → persist `uploaded` → delete the
//! cached range. Up to
//! `upload-concurrency` segments are sealed and uploaded at once; `uploaded`
//! advances strictly in order. Store errors retry with capped backoff forever
//! (the cache absorbs the stream meanwhile); nothing is deleted before the
//! segment and its points are stored.
//!
//! Ownership: before it writes anything the uploader claims the machine in
//! the store (`ownership.rs`), and it re-checks the owner record before every
//! segment put. Segments, points and marks carry the owner epoch (segments in
//! their names) and are created, never overwritten: an existing one with
//! equal content (a retry, or the same entries sealed again after a restart)
//! is accepted, other content fences the machine here — except a point or
//! mark that an older owner landed after this owner's takeover, which no
//! reader counts (`catalogue.rs`, fences) and this owner replaces.
//! Catalogue records are signed with the machine's catalogue key.
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
    self, encode_segment, format_time_ms, point_object, segment_object, CatalogueKey, DiskChecksum,
    Fences, InconsistentRecord, MachineRecord, PointRecord, SegmentName, SumsRecord,
};
use lifeboat_common::churn::Churn;
use lifeboat_common::disksum;
use lifeboat_common::owner::Held;
use lifeboat_common::protocol::{DiskInfo, Entry, Op};
use lifeboat_common::seal::{self, Key};
use lifeboat_common::store::{Store, StoreError};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::cache::{Batch, Cache};
use crate::config::PsConfig;
use crate::ownership::{Fenced, Ownership};

const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Runs `op` until it succeeds or `cancel` fires, backing off between attempts.
pub async fn retry<T, F, Fut>(what: &str, cancel: &CancellationToken, op: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    match try_retry(what, cancel, |_| false, op).await {
        Some(Ok(v)) => Some(v),
        _ => None,
    }
}

/// Errors no retry can mend: this server lost the machine, or an object it
/// must create exists with other content.
pub fn is_fencing(e: &anyhow::Error) -> bool {
    e.is::<Fenced>()
        || matches!(
            e.downcast_ref::<StoreError>(),
            Some(StoreError::Conflict { .. })
        )
}

/// Like [`retry`], but stops at an error `is_permanent` accepts and returns
/// it; `None` when cancelled.
pub async fn try_retry<T, F, Fut>(
    what: &str,
    cancel: &CancellationToken,
    is_permanent: impl Fn(&anyhow::Error) -> bool,
    mut op: F,
) -> Option<Result<T>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut delay = RETRY_MIN;
    let mut attempt = 0u32;
    loop {
        match op().await {
            Ok(v) => return Some(Ok(v)),
            Err(e) if is_permanent(&e) => return Some(Err(e)),
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
pub const TAIL_MAX_BYTES: usize = 64 * 1024 * 1024;

/// The newest durable entries of a machine, consecutive by seq.
#[derive(Default)]
pub struct Tail {
    entries: VecDeque<Entry>,
    /// When each entry was pushed (made durable), ms since the Unix epoch.
    times: VecDeque<u64>,
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
            self.times.clear();
            self.bytes = 0;
        }
        let add: usize = entries.iter().map(Entry::encoded_len).sum();
        if self.bytes + add > TAIL_MAX_BYTES {
            return; // the uploader falls back to the cache; the next push restarts the tail
        }
        self.bytes += add;
        self.entries.extend(entries.iter().cloned());
        let now = lifeboat_common::now_ms();
        self.times.extend(std::iter::repeat_n(now, entries.len()));
    }

    /// Takes entries from `from` on (up to `budget` bytes, stopping after a tag) if
    /// the tail holds `from`; `None` if the caller must read the cache.
    fn take(&mut self, from: u64, budget: usize) -> Option<Batch> {
        while self.entries.front().is_some_and(|e| e.seq < from) {
            let e = self.entries.pop_front().expect("non-empty");
            self.times.pop_front();
            self.bytes -= e.encoded_len();
        }
        match self.entries.front() {
            None => None, // nothing in memory: the cache may still hold entries
            Some(e) if e.seq != from => None,
            Some(_) => {
                let mut b = Batch::default();
                while let Some(e) = self.entries.pop_front() {
                    b.durable_ms = self.times.pop_front().unwrap_or(0);
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

/// A machine's keys: the data key seals segments, the catalogue key
/// authenticates its catalogue objects.
#[derive(Clone)]
pub struct MachineKeys {
    pub data: Key,
    pub catalogue: CatalogueKey,
}

/// Makes sure the machine's data key exists and returns it.
pub async fn machine_keys(store: &Store, kek: &Key, machine: &str) -> Result<MachineKeys> {
    let name = catalogue::data_key_object(machine);
    let fresh = Key::generate();
    let created = store
        .put_if_absent(
            &name,
            Bytes::from(catalogue::seal_data_key(kek, machine, &fresh)),
        )
        .await?;
    let data = if created {
        info!(%machine, "created data key {}", store.describe(&name));
        fresh
    } else {
        catalogue::load_data_key(store, kek, machine).await?
    };
    Ok(MachineKeys {
        catalogue: CatalogueKey::derive(&data),
        data,
    })
}

/// Writes `machine.json` (the caller owns the machine); returns the record
/// the uploader starts from. Disk sizes already in the store are kept: they
/// are the sizes as of the last uploaded segment, and resize entries in the
/// stream change them from there.
pub async fn prepare_machine(
    store: &Store,
    keys: &MachineKeys,
    rec: &MachineRecord,
) -> Result<MachineRecord> {
    let m = &rec.machine;
    let mut rec = rec.clone();
    match catalogue::load_machine(store, &keys.catalogue, m).await {
        Ok(stored) if stored.disks.len() == rec.disks.len() => {
            let cached = rec.clone();
            rec.disks = stored.disks.clone();
            rec.largest_sizes = stored.largest_sizes.clone();
            rec.widen(Some(&cached));
        }
        Ok(_) | Err(catalogue::CatalogueError::Missing { .. }) => rec.widen(None),
        Err(e) => return Err(e.into()),
    }
    put_machine_json(store, &keys.catalogue, &rec).await?;
    Ok(rec)
}

/// Creates `obj` holding `value` signed, retrying like every store write; an
/// existing object is accepted if `same` finds its record equivalent (a retry
/// or a re-upload after a restart), else it is a fencing error naming it.
/// `None`: cancelled; `Some(Err)`: fencing.
/// `stale` finds an existing record one no reader counts (an older owner
/// landed it after this owner's takeover): it is replaced.
async fn create_json<T: serde::Serialize + serde::de::DeserializeOwned>(
    store: &Store,
    key: &CatalogueKey,
    obj: &str,
    value: &T,
    same: impl Fn(&T) -> bool,
    stale: impl Fn(&T) -> bool,
    cancel: &CancellationToken,
) -> Option<Result<()>> {
    let body = Bytes::from(catalogue::sign_record(key, obj, value));
    let (same, stale) = (&same, &stale);
    try_retry(
        &format!("recording {}", store.describe(obj)),
        cancel,
        is_fencing,
        || {
            let body = body.clone();
            async move {
                let mut replace = false;
                let created = store
                    .create(obj, body.clone(), |existing| {
                        match catalogue::open_record::<T>(key, store, obj, existing) {
                            Ok(r) if stale(&r) => {
                                replace = true;
                                true
                            }
                            Ok(r) => same(&r),
                            Err(_) => false,
                        }
                    })
                    .await;
                created?;
                if replace {
                    warn!(
                        "{} was recorded late by an older owner of the machine; replacing it",
                        store.describe(obj)
                    );
                    store.put(obj, body).await?;
                }
                Ok(())
            }
        },
    )
    .await
}

async fn put_machine_json(store: &Store, key: &CatalogueKey, rec: &MachineRecord) -> Result<()> {
    let name = catalogue::machine_json(&rec.machine);
    let rec = MachineRecord {
        format: catalogue::MACHINE_FORMAT,
        ..rec.clone()
    };
    store
        .put(&name, Bytes::from(catalogue::sign_record(key, &name, &rec)))
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

/// How the uploads of one machine pass the churn since the last point on,
/// in segment order, while they seal in parallel.
struct ChurnChain {
    /// What the next segment receives from the one cut before it.
    last: Option<tokio::sync::oneshot::Receiver<Option<Churn>>>,
}

/// One upload's place in the chain: what came before it (`None`: not
/// counted since this uploader started), and where to pass its total.
struct ChurnLink {
    before: tokio::sync::oneshot::Receiver<Option<Churn>>,
    after: tokio::sync::oneshot::Sender<Option<Churn>>,
}

impl ChurnChain {
    fn new() -> ChurnChain {
        ChurnChain { last: None }
    }

    fn link(&mut self) -> ChurnLink {
        let (after, next) = tokio::sync::oneshot::channel();
        let before = self.last.replace(next).unwrap_or_else(|| {
            // The first segment since start: what came before is unknown.
            let (tx, rx) = tokio::sync::oneshot::channel();
            let _ = tx.send(None);
            rx
        });
        ChurnLink { before, after }
    }
}

/// Aborts a task when its owner stops.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An uploader that stops (cancelled, or on an error) stops its uploads too.
impl Drop for Upload {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// What every machine's uploader works with.
#[derive(Clone)]
pub struct UploadEnv {
    pub cfg: Arc<PsConfig>,
    pub cache: Arc<Cache>,
    pub store: Store,
    pub kek: Key,
    pub ownership: Arc<Ownership>,
    /// Told what is stored (status: RPO, points).
    pub monitor: Arc<crate::monitor::Monitor>,
    /// `[bandwidth]`: segment uploads at most this fast.
    pub limits: Arc<UploadLimits>,
    pub cancel: CancellationToken,
}

/// The upload limits of `[bandwidth]`: the server's, and each listed
/// machine's; a segment waits for both before its PUT.
pub struct UploadLimits {
    server: lifeboat_common::bandwidth::Limiter,
    machines: std::collections::HashMap<String, lifeboat_common::bandwidth::Limiter>,
}

impl UploadLimits {
    pub fn new(cfg: &crate::config::BandwidthConfig) -> UploadLimits {
        use lifeboat_common::bandwidth::Limiter;
        UploadLimits {
            server: Limiter::new(cfg.upload.clone()),
            machines: cfg
                .machine
                .iter()
                .map(|m| (m.name.clone(), Limiter::new(m.upload.clone())))
                .collect(),
        }
    }

    /// Waits until `bytes` of `machine` may be uploaded.
    pub async fn acquire(&self, machine: &str, bytes: u64) {
        if let Some(l) = self.machines.get(machine) {
            l.acquire(bytes).await;
        }
        self.server.acquire(bytes).await;
    }
}

/// What an upload task needs to check, cheaply, that this server still owns
/// the machine before it puts a segment.
pub struct OwnerCheck {
    ownership: Arc<Ownership>,
    key: CatalogueKey,
    machine: String,
    held: std::sync::Mutex<Held>,
}

impl OwnerCheck {
    /// The owner epoch this server holds the machine at.
    pub fn epoch(&self) -> u64 {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record
            .epoch
    }

    pub async fn verify(&self, store: &Store) -> Result<()> {
        self.ownership
            .verify(store, &self.key, &self.machine, &self.held)
            .await
    }
}

/// Runs the machine's uploader until `cancel`, starting it again whenever it
/// stops on an error (a cache read or write it could not retry): an uploader
/// that quietly stayed down would let the cache grow and the RPO slip.
pub async fn supervise(env: UploadEnv, me: Arc<MachineUploader>) {
    let name = format!("uploader of {}", me.machine);
    let cancel = env.cancel.clone();
    lifeboat_common::supervise::supervise(&name, cancel, move || {
        let (env, me) = (env.clone(), me.clone());
        async move {
            run_machine(env.clone(), me.clone()).await;
            if env.cancel.is_cancelled() || env.ownership.fenced(&me.machine).is_some() {
                // Cancelled, or fenced (logged when it was; nothing to upload
                // until an operator acts).
                return Ok(());
            }
            anyhow::bail!("stopped on the error logged above")
        }
    })
    .await
}

/// The uploader task of one machine. Returns when `cancel` fires, or on an
/// error it logged ([`supervise`] starts it again).
pub async fn run_machine(env: UploadEnv, me: Arc<MachineUploader>) {
    let UploadEnv {
        cfg,
        cache,
        store,
        kek,
        ownership,
        monitor,
        limits,
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
    let Some(keys) = retry(
        &format!("opening the keys of {machine} in {}", store.url()),
        &cancel,
        || machine_keys(&store, &kek, &machine),
    )
    .await
    else {
        return;
    };
    // Only the owner writes the machine's objects.
    let held = match try_retry(
        &format!("claiming ownership of {machine} in {}", store.url()),
        &cancel,
        is_fencing,
        || ownership.claim(&store, &cache, &keys.catalogue, &machine),
    )
    .await
    {
        Some(Ok(h)) => h,
        _ => return, // cancelled, or fenced (logged)
    };
    let check = Arc::new(OwnerCheck {
        ownership: ownership.clone(),
        key: keys.catalogue.clone(),
        machine: machine.clone(),
        held: std::sync::Mutex::new(held),
    });
    // Retention runs beside the uploader, as the same owner, and stops with it.
    let compactor = lifeboat_common::spawn(crate::compact::run(crate::compact::Compactor {
        cfg: cfg.clone(),
        cache: cache.clone(),
        store: store.clone(),
        keys: keys.clone(),
        check: check.clone(),
        machine: machine.clone(),
        cancel: cancel.child_token(),
    }));
    let _compactor = AbortOnDrop(compactor);
    // The machine's takeovers: which late records of older owners to replace.
    let Some(fences) = retry(
        &format!(
            "reading the takeover records of {machine} in {}",
            store.url()
        ),
        &cancel,
        || async { Ok(catalogue::list_fences(&store, Some(&keys.catalogue), &machine).await?) },
    )
    .await
    else {
        return;
    };
    let fences = Arc::new(fences);
    let Some(mut rec) = retry(
        &format!("preparing {machine} in {}", store.url()),
        &cancel,
        || prepare_machine(&store, &keys, &rec),
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
    // Segments this epoch stored beyond `uploaded` before a restart: the
    // same seqs cut again get the same name (its time included), so an
    // equal re-upload is recognised and a different one is a conflict.
    let Some(stored_times) = retry(
        &format!("listing the segments of {machine} in {}", store.url()),
        &cancel,
        || async {
            let epoch = check.epoch();
            Ok(catalogue::list_segments(&store, &machine)
                .await?
                .into_iter()
                .filter(|s| s.epoch == epoch && s.first >= next && s.time_ms > 0)
                .map(|s| ((s.first, s.last), s.time_ms))
                .collect::<std::collections::HashMap<_, _>>())
        },
    )
    .await
    else {
        return;
    };
    let stored_times = Arc::new(stored_times);
    let mut in_flight: VecDeque<Upload> = VecDeque::new();
    let max = cfg.segment_max_bytes as usize;
    // Entries read from the cache for the next segment, and when the first arrived.
    let mut pending = Batch::default();
    let mut pending_since: Option<Instant> = None;
    // Signalled whenever an upload task finishes.
    let done = Arc::new(Notify::new());
    let mut churn_chain = ChurnChain::new();
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
                    || async {
                        check.verify(&store).await?;
                        put_machine_json(&store, &keys.catalogue, r).await
                    },
                )
                .await;
                if done.is_none() {
                    return; // cancelled
                }
            }
            let c = cache.clone();
            let m = machine.clone();
            let (first, last) = (u.first, u.last);
            match tokio::task::spawn_blocking(move || c.mark_uploaded(&m, last)).await {
                Ok(Ok(())) => monitor.uploaded(&machine, last),
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
                    if !b.entries.is_empty() {
                        // Read back from the cache: durable by now at the latest.
                        pending.durable_ms = match b.durable_ms {
                            0 => lifeboat_common::now_ms(),
                            t => t,
                        };
                    }
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
        let durable_ms = match (entries.first(), entries.last()) {
            (Some(a), Some(b)) => stored_times
                .get(&(a.seq, b.seq))
                .copied()
                .unwrap_or(pending.durable_ms),
            _ => pending.durable_ms,
        };
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
                || async {
                    check.verify(&store).await?;
                    put_machine_json(&store, &keys.catalogue, &grown).await
                },
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
            keys.clone(),
            machine.clone(),
            disks_at_start,
            entries,
            durable_ms,
            churn_chain.link(),
            cfg.zstd_level,
            check.clone(),
            fences.clone(),
            monitor.clone(),
            limits.clone(),
            cancel.clone(),
        );
        let signal = done.clone();
        let handle = lifeboat_common::spawn(async move {
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

#[allow(clippy::too_many_arguments)]
async fn upload_segment(
    store: Store,
    keys: MachineKeys,
    machine: String,
    mut disks: Vec<DiskInfo>,
    entries: Vec<Entry>,
    durable_ms: u64,
    churn: ChurnLink,
    level: i32,
    check: Arc<OwnerCheck>,
    fences: Arc<Fences>,
    monitor: Arc<crate::monitor::Monitor>,
    limits: Arc<UploadLimits>,
    cancel: CancellationToken,
) -> Option<()> {
    let first = entries.first()?.seq;
    let last = entries.last()?.seq;
    let epoch = check.epoch();
    let name = segment_object(
        &machine,
        &SegmentName::new(first, last, epoch).with_time(durable_ms.max(1)),
    );
    // A point carries the disk sizes of its seq.
    let mut points: Vec<PointRecord> = Vec::new();
    let mut unsettled: Vec<InconsistentRecord> = Vec::new();
    let mut sums: Vec<SumsRecord> = Vec::new();
    for e in &entries {
        match &e.op {
            Op::Sums { point, .. } if *point >= e.seq => {
                warn!(%machine, seq = e.seq, point, "a checksums entry names a point after it; ignored");
            }
            Op::Sums { point, disks: list } => sums.push(SumsRecord {
                format: catalogue::FORMAT_VERSION,
                point: *point,
                seq: e.seq,
                disks: list
                    .iter()
                    .filter_map(|d| {
                        Some(DiskChecksum {
                            id: disks.get(d.disk as usize)?.id.clone(),
                            size: d.size,
                            sum: disksum::hex(&d.sum),
                        })
                    })
                    .collect(),
                epoch,
            }),
            Op::Inconsistent { label } => unsettled.push(InconsistentRecord {
                format: catalogue::FORMAT_VERSION,
                seq: e.seq,
                label: label.clone(),
                epoch,
            }),
            Op::Resize { disk, size } => {
                if let Some(d) = disks.get_mut(*disk as usize) {
                    d.size = *size;
                }
            }
            Op::Tag {
                kind,
                source,
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
                epoch,
                source: *source,
                churn: None,
            }),
            _ => {}
        }
    }
    let write_bytes: u64 = entries
        .iter()
        .map(|e| match &e.op {
            Op::Write { data, .. } => data.len() as u64,
            _ => 0,
        })
        .sum();
    let (plain, sealed) = {
        let name = name.clone();
        let machine = machine.clone();
        let data_key = keys.data.clone();
        tokio::task::spawn_blocking(move || {
            let plain = encode_segment(&machine, &entries);
            let sealed = Bytes::from(seal::seal(&data_key, &name, 0, &plain, level));
            (plain, sealed)
        })
        .await
        .ok()?
    };
    // The churn since the previous point: this segment's, added to what the
    // segments before it (sealed in parallel, passed on in order) counted.
    let mine = Churn {
        write_bytes,
        plain_bytes: plain.len() as u64,
        sealed_bytes: sealed.len() as u64,
    };
    let total = churn.before.await.ok().flatten().map(|b| b.plus(mine));
    let _ = churn.after.send(if points.is_empty() {
        total
    } else {
        Some(Churn::default())
    });
    for p in &mut points {
        p.churn = total;
    }
    let seen: Vec<crate::monitor::PointSeen> = points
        .iter()
        .map(|p| crate::monitor::PointSeen {
            seq: p.seq,
            kind: p.kind,
            time_ms: p.time_ms,
            label: p.label.clone(),
            churn: p.churn,
        })
        .collect();
    let fenced = |e: anyhow::Error| {
        if !e.is::<Fenced>() {
            // An object of ours exists with other content: someone else writes here.
            check.ownership.fence(&machine, format!("{e:#}"));
        }
    };
    // Only the owner writes; checked before the first object and again
    // right before the segment.
    let r = try_retry(
        &format!("checking ownership of {machine}"),
        &cancel,
        is_fencing,
        || check.verify(&store),
    )
    .await?;
    if let Err(e) = r {
        fenced(e);
        return None;
    }
    // Marks and points before the segment: whoever sees the segment (the
    // stream end moves with segments) sees its marks and points too. A point
    // beyond the stored stream is not listed until its segment is stored.
    // A record of an older owner that a takeover fenced is replaced.
    let stale = |of: u64, seq: u64| of < epoch && !fences.counts(of, seq);
    for p in points {
        let r = create_json(
            &store,
            &keys.catalogue,
            &point_object(&machine, p.seq),
            &p,
            |o: &PointRecord| {
                o.seq == p.seq && o.kind == p.kind && o.time_ms == p.time_ms && o.label == p.label
            },
            |o: &PointRecord| stale(o.epoch, o.seq),
            &cancel,
        )
        .await?;
        if let Err(e) = r {
            fenced(e);
            return None;
        }
        info!(%machine, seq = p.seq, kind = p.kind.as_str(), "recovery point recorded");
    }
    for m in sums {
        let obj = catalogue::sums_object(&machine, m.point);
        let r = create_json(
            &store,
            &keys.catalogue,
            &obj,
            &m,
            // Another record of the point's checksums (a re-upload) is kept:
            // metadata, no reason to fence the machine over.
            |o: &SumsRecord| o.point == m.point,
            |o: &SumsRecord| stale(o.epoch, o.seq),
            &cancel,
        )
        .await?;
        if let Err(e) = r {
            fenced(e);
            return None;
        }
    }
    for m in unsettled {
        let obj = catalogue::inconsistent_object(&machine, m.seq);
        let r = create_json(
            &store,
            &keys.catalogue,
            &obj,
            &m,
            |o: &InconsistentRecord| o.seq == m.seq && o.label == m.label,
            |o: &InconsistentRecord| stale(o.epoch, o.seq),
            &cancel,
        )
        .await?;
        if let Err(e) = r {
            fenced(e);
            return None;
        }
    }
    // Under [bandwidth]; an upload slot waits here, so at most
    // upload-concurrency segments of a machine wait at once.
    tokio::select! {
        _ = limits.acquire(&machine, sealed.len() as u64) => {}
        _ = cancel.cancelled() => return None,
    }
    // Checked right before the put; created, never overwritten. The same
    // entries sealed again (a re-upload after a restart) are the same segment.
    let r = try_retry(
        &format!("uploading {}", store.describe(&name)),
        &cancel,
        is_fencing,
        || {
            let data = sealed.clone();
            let (store, name, plain, key) = (&store, &name, &plain, &keys.data);
            let check = &check;
            async move {
                check.verify(store).await?;
                store
                    .create(name, data, |existing| {
                        seal::open(key, name, 0, existing).is_ok_and(|p| p == *plain)
                    })
                    .await?;
                Ok(())
            }
        },
    )
    .await?;
    if let Err(e) = r {
        fenced(e);
        return None;
    }
    for p in seen {
        monitor.point(&machine, p);
    }
    Some(())
}
