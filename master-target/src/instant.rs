//! Instant recovery (`lifeboat-mt serve-point`): a recovery point served as
//! one NBD export per disk within seconds, before its data is copied; reads
//! fetch what they need from the store, writes go to a local overlay, and a
//! background hydration copies the whole disk to a target while the export
//! stays live. Veeam's Instant VM Recovery and Proxmox's live-restore do this.
//!
//! # Layers of a disk's view
//!
//! 1. The **local layer** `<state-dir>/<disk>.layer`, a sparse file the size
//!    of the disk, authoritative for the ranges in `local`: what the
//!    segments after the base put there (written before the export starts,
//!    by [`materialize::materialize_layers`] without the base: only the
//!    stream's tail is fetched) and every write made to the export since.
//! 2. The **base's chunks**, for every other byte: fetched from the store on
//!    the first read that needs them, authenticated and checked against their
//!    id, and kept in a bounded cache ([`ChunkCache`], first in first out,
//!    `--cache-mib`). A chunk the base does not list reads as zeros.
//!
//! The export's writes and zeroes go to the local layer and are logged in
//! `writes.log` ([`InstantWrite`] records); so the export's writes survive a
//! restart from the moment a FLUSH (or FUA) returned, as on a disk: a flush
//! syncs the layer files first, then appends the ranges written since and
//! syncs the log, so a logged range's data is durable.
//!
//! # Hydration
//!
//! `--hydrate DISK=DEST` (a file, a block device or an NBD URI) copies the
//! disk's view to DEST one chunk-sized step at a time, in offset order; each
//! step holds the disk's lock, as every export write does, so a step reads
//! the view with no write half done. What the export writes below the
//! hydrated position reaches DEST at the next flush, once it is logged;
//! above it the hydration copies it. Every 256 MiB or 2 s and at the end the
//! position is checkpointed in `hydration.rec` ([`InstantHydration`]) after
//! an internal flush (so every write the copied view held is logged) and a
//! sync of DEST. A restart (after kill -9, say) takes the layer record, the
//! logged writes and the checkpoint, copies every logged range below the
//! checkpoint to DEST again (DEST may have missed it), and goes on from the
//! checkpoint: DEST then equals the view, with no write lost that a flush
//! acknowledged. When every disk is copied, DEST holds the point with the
//! export's writes applied; each later flush copies the new writes to it
//! and syncs it, so the machine can switch to DEST at any time (stop
//! writing, flush).
//!
//! Failures: a flush whose layer sync or log append fails returns the error
//! and keeps its writes pending (a failed append is cut off the log again,
//! so no torn record sits before later ones). A copy to DEST that fails
//! does not fail the export's flush (the write is durable in the layer and
//! the log); the disk is marked behind and the next checkpoint copies every
//! logged range again before it may advance. A hydration that fails leaves
//! the exports serving. The log is compacted to merged ranges at a
//! checkpoint once it reaches 1 MiB. One `serve-point` per state directory
//! (`lock`).
//!
//! The base's chunks must stay in the store while the export serves reads
//! from them: retention that folds the stream to a newer base may delete
//! chunks the new base does not use. A read of a deleted chunk fails with
//! EIO naming it; hydrate promptly, or pause retention for the machine.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use lifeboat_common::base::{self, ChunkNamer, CHUNK_SIZE};
use lifeboat_common::diskio::{DiskFile, IoMode};
use lifeboat_common::formats::{self, InstantHydration, InstantLayer, InstantWrite, Next, Record};
use lifeboat_common::fsutil;
use lifeboat_common::image::Ranges;
use lifeboat_common::nbd_client::{NbdClient, MAX_IO};
use lifeboat_common::nbd_server::{self, BlockBackend, Exports};
use lifeboat_common::seal::Key;
use lifeboat_common::store::Store;
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, OnceCell};
use tokio_util::sync::CancellationToken;

use crate::materialize::{self, Layers, MachineKeys, PointSpec};
use crate::output::{Dest, Target};

pub const LAYER_RECORD: &str = "layer.rec";
pub const WRITES_LOG: &str = "writes.log";
pub const HYDRATION_RECORD: &str = "hydration.rec";
/// Default bound of the chunk cache.
pub const DEFAULT_CACHE_MIB: u64 = 256;
/// Hydration copies this much per step: one base chunk.
const STEP: u64 = CHUNK_SIZE;
/// Chunks the hydration fetches ahead of its step.
const READ_AHEAD: u64 = 8;
/// Hydration checkpoints after this many bytes or this long, whichever first.
const CHECKPOINT_BYTES: u64 = 256 << 20;
const CHECKPOINT_EVERY: Duration = Duration::from_secs(2);
/// `writes.log` is compacted at a checkpoint once it is this long.
const COMPACT_LOG_BYTES: u64 = 1 << 20;
/// Unlogged writes of a disk after which a write also flushes.
const PENDING_MAX: usize = 1 << 16;

/// `layer.rec`: the point the state directory serves.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct LayerRecord {
    pub machine: String,
    /// `--point` as given (`latest`, an id, a time).
    pub point_spec: String,
    /// What it resolved to when the layers were written.
    pub point: String,
    pub seq: u64,
    pub base: Option<u64>,
    pub disks: Vec<LayerDisk>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct LayerDisk {
    pub id: String,
    /// The disk's size at the point (the export's size).
    pub size: u64,
    /// Ranges the segments after the base cover (written, zeroed or cut
    /// off by a shrink): the local layer holds them.
    pub covered: Vec<(u64, u64)>,
    /// `(index, id)` of the base's chunks of this disk.
    pub chunks: Vec<(u64, String)>,
}

/// `hydration.rec`: the targets and how far each disk is copied.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct HydrationRecord {
    /// Disk id → target as given (`--hydrate`).
    pub targets: BTreeMap<String, String>,
    /// Disk id → bytes copied from offset 0, durable on the target.
    pub upto: BTreeMap<String, u64>,
    pub complete: bool,
}

/// What `serve-point` is asked for.
pub struct Options {
    pub machine: String,
    pub point: String,
    pub state_dir: PathBuf,
    pub hydrate: Vec<Target>,
    /// Most bytes per second the hydration copies (0: no limit), so that
    /// it leaves the store and the disk to the running machine's reads.
    pub hydrate_limit: u64,
    pub cache_bytes: u64,
    pub allow_inconsistent: bool,
    pub engine: IoMode,
}

/// A point being served: its disks, in machine.json order.
pub struct Served {
    pub record: LayerRecord,
    pub disks: Vec<Arc<PointDisk>>,
    /// Whether the layers were written now (else taken from the state dir).
    pub prepared: bool,
    pub segments_read: usize,
    pub bytes_fetched: u64,
    /// Writes found in `writes.log`.
    pub writes_logged: usize,
    state_dir: PathBuf,
    /// One serve-point per state directory.
    _lock: fsutil::DirLock,
    hydrate_limit: u64,
    hydration: StdMutex<HydrationRecord>,
}

/// The cache's chunks by id, and their ids oldest first.
type Held = (HashMap<String, Arc<OnceCell<Bytes>>>, VecDeque<String>);

/// A logged write: disk number, offset, length.
type Logged = (u16, u64, u64);

/// Base chunks fetched on demand, at most `cap` held; the oldest fetched
/// goes first. Concurrent reads of one chunk fetch it once.
pub struct ChunkCache {
    store: Store,
    key: Arc<Key>,
    namer: Arc<ChunkNamer>,
    machine: String,
    cap: usize,
    held: StdMutex<Held>,
    pub fetched: AtomicU64,
    pub fetched_bytes: AtomicU64,
}

impl ChunkCache {
    /// The plaintext of chunk `id`.
    async fn get(&self, id: &str) -> std::io::Result<Bytes> {
        let cell = {
            let mut held = self.held.lock().expect("chunk cache");
            let (map, order) = &mut *held;
            if let Some(c) = map.get(id) {
                c.clone()
            } else {
                let c = Arc::new(OnceCell::new());
                map.insert(id.to_string(), c.clone());
                order.push_back(id.to_string());
                while order.len() > self.cap {
                    if let Some(old) = order.pop_front() {
                        map.remove(&old);
                    }
                }
                c
            }
        };
        let data = cell
            .get_or_try_init(|| async {
                let (plain, fetched) = base::fetch_chunk(
                    &self.store,
                    self.key.clone(),
                    self.namer.clone(),
                    &self.machine,
                    id,
                )
                .await
                .map_err(|e| {
                    tracing::error!(chunk = id, error = %e, "a base chunk could not be read");
                    std::io::Error::other(format!("{e} (a chunk of the base)"))
                })?;
                self.fetched.fetch_add(1, Ordering::Relaxed);
                self.fetched_bytes.fetch_add(fetched, Ordering::Relaxed);
                Ok::<_, std::io::Error>(Bytes::from(plain))
            })
            .await;
        if data.is_err() {
            // A failed fetch is not cached: the next read tries again.
            let mut held = self.held.lock().expect("chunk cache");
            let (map, order) = &mut *held;
            if map.get(id).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                map.remove(id);
                order.retain(|o| o != id);
            }
        }
        data.cloned()
    }
}

/// Where a disk is hydrated to.
enum Dst {
    File(DiskFile),
    Nbd(Mutex<NbdClient>),
}

impl Dst {
    async fn open(dest: &Dest, size: u64, engine: IoMode) -> Result<Dst> {
        match dest {
            Dest::Path(p) => {
                if !p.exists() {
                    OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(p)
                        .with_context(|| format!("creating hydration target {}", p.display()))?;
                }
                let f = DiskFile::open(p, engine)
                    .with_context(|| format!("opening hydration target {}", p.display()))?;
                if f.is_block_device() {
                    if f.size() < size {
                        bail!(
                            "hydration target {} holds {} bytes, less than the disk's {size}",
                            p.display(),
                            f.size()
                        );
                    }
                } else if f.size() != size {
                    f.set_len(size)
                        .with_context(|| format!("sizing {} to {size} bytes", p.display()))?;
                }
                Ok(Dst::File(f))
            }
            Dest::Nbd(uri) => {
                let c = NbdClient::connect(uri)
                    .await
                    .with_context(|| format!("connecting to hydration target {}", uri.text))?;
                if c.size() < size {
                    bail!(
                        "hydration target {} holds {} bytes, less than the disk's {size}",
                        uri.text,
                        c.size()
                    );
                }
                Ok(Dst::Nbd(Mutex::new(c)))
            }
        }
    }

    async fn write(&self, offset: u64, data: Bytes) -> Result<()> {
        match self {
            Dst::File(f) => Ok(f.write_at(offset, data).await?),
            Dst::Nbd(c) => {
                let mut c = c.lock().await;
                for (i, piece) in data.chunks(MAX_IO).enumerate() {
                    c.write(offset + (i * MAX_IO) as u64, piece).await?;
                }
                Ok(())
            }
        }
    }

    async fn zero(&self, offset: u64, len: u64) -> Result<()> {
        match self {
            Dst::File(f) => Ok(f.zero_range(offset, len).await?),
            Dst::Nbd(c) => {
                let mut c = c.lock().await;
                if c.can_write_zeroes() {
                    c.write_zeroes(offset, len).await
                } else {
                    let zeros = vec![0u8; len.min(MAX_IO as u64) as usize];
                    let mut at = offset;
                    while at < offset + len {
                        let n = (offset + len - at).min(zeros.len() as u64) as usize;
                        c.write(at, &zeros[..n]).await?;
                        at += n as u64;
                    }
                    Ok(())
                }
            }
        }
    }

    async fn sync(&self) -> Result<()> {
        match self {
            Dst::File(f) => Ok(f.sync().await?),
            Dst::Nbd(c) => c.lock().await.flush().await,
        }
    }
}

/// One disk of a served point: the export's backend and the hydration's source.
pub struct PointDisk {
    pub index: u16,
    pub id: String,
    size: u64,
    layer: DiskFile,
    layer_path: PathBuf,
    /// What the local layer holds (see the module header).
    local: RwLock<Ranges>,
    /// The export's writes in `writes.log` (merged; what a restart replays).
    logged: StdMutex<Ranges>,
    chunks: HashMap<u64, String>,
    cache: Arc<ChunkCache>,
    /// Held by every write and zero, by each hydration step and by a
    /// flush's copy to the target.
    lock: Mutex<()>,
    /// One flush at a time.
    flushing: Mutex<()>,
    /// Ranges written since the last flush (not yet in the log).
    pending: StdMutex<Vec<(u64, u64)>>,
    log: Arc<StdMutex<Log>>,
    target: Option<(String, Dst)>,
    /// A logged write did not reach the target (an error there): the next
    /// checkpoint copies every logged range again before it may advance.
    target_behind: std::sync::atomic::AtomicBool,
    /// Bytes of the view copied to the target (in memory; the checkpoint
    /// is in `hydration.rec`).
    upto: AtomicU64,
}

impl PointDisk {
    pub fn export_size(&self) -> u64 {
        self.size
    }

    pub fn hydrated(&self) -> u64 {
        self.upto.load(Ordering::Acquire)
    }

    /// The base chunks `[offset, offset + len)` of the view needs (those
    /// the local layer does not hold).
    fn chunks_of(&self, offset: u64, end: u64) -> Vec<String> {
        let gaps = self.local.read().expect("local ranges").gaps(offset, end);
        let mut ids = Vec::new();
        for (a, b) in gaps {
            for index in a / CHUNK_SIZE..b.div_ceil(CHUNK_SIZE) {
                if let Some(id) = self.chunks.get(&index) {
                    ids.push(id.clone());
                }
            }
        }
        ids
    }

    /// The view of `[offset, offset + len)`: the local layer where it holds
    /// the range, else the base's chunks, else zeros.
    async fn view(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let end = offset + len as u64;
        // Which ranges the layer holds, before reading it: a write that
        // lands meanwhile is read whole or not at all.
        let gaps = self.local.read().expect("local ranges").gaps(offset, end);
        // Nothing of the range in the layer: no need to read it.
        let mut buf = if gaps == [(offset, end)] {
            vec![0u8; len]
        } else {
            let mut b = self
                .layer
                .read_at(offset, len)
                .await
                .map_err(|e| annotate(e, &self.layer_path))?
                .to_vec();
            b.resize(len, 0);
            b
        };
        for (a, b) in gaps {
            let mut at = a;
            while at < b {
                let index = at / CHUNK_SIZE;
                let chunk_at = index * CHUNK_SIZE;
                let until = b.min(chunk_at + CHUNK_SIZE);
                let dst = &mut buf[(at - offset) as usize..(until - offset) as usize];
                match self.chunks.get(&index) {
                    Some(id) => {
                        let data = self.cache.get(id).await?;
                        let from = (at - chunk_at) as usize;
                        let have = data.len().saturating_sub(from).min(dst.len());
                        dst[..have].copy_from_slice(&data[from..from + have]);
                        dst[have..].fill(0);
                    }
                    None => dst.fill(0),
                }
                at = until;
            }
        }
        Ok(buf)
    }

    /// Records a completed write of `[offset, offset + len)` to the layer.
    fn wrote(&self, offset: u64, len: u64) -> bool {
        self.local
            .write()
            .expect("local ranges")
            .add(offset, offset + len);
        let mut p = self.pending.lock().expect("pending writes");
        p.push((offset, len));
        p.len() >= PENDING_MAX
    }

    /// Makes every completed write durable and logged, then copies the
    /// logged ranges below the hydrated position to the target and syncs
    /// it. A write that could not be logged stays pending (the flush fails,
    /// the next one tries again); a target that could not take a copy is
    /// marked behind, and the flush still succeeds: the export's writes are
    /// durable where the export keeps them.
    async fn flush_all(&self) -> std::io::Result<()> {
        let _one = self.flushing.lock().await;
        let recs = {
            let mut p = self.pending.lock().expect("pending writes");
            merge(std::mem::take(&mut *p))
        };
        if recs.is_empty() {
            return Ok(());
        }
        let logged = async {
            self.layer
                .sync()
                .await
                .map_err(|e| annotate(e, &self.layer_path))?;
            let (log, index, to_log) = (self.log.clone(), self.index, recs.clone());
            tokio::task::spawn_blocking(move || {
                log.lock().expect("writes log").append(index, &to_log)
            })
            .await
            .map_err(std::io::Error::other)?
        }
        .await;
        if let Err(e) = logged {
            let mut p = self.pending.lock().expect("pending writes");
            p.splice(0..0, recs);
            return Err(e);
        }
        {
            let mut l = self.logged.lock().expect("logged ranges");
            for &(offset, len) in &recs {
                l.add(offset, offset + len);
            }
        }
        if let Some((name, dst)) = &self.target {
            let upto = self.hydrated();
            if recs.iter().any(|&(offset, _)| offset < upto) {
                let mut copied = Ok(());
                for &(offset, len) in &recs {
                    copied = self.copy_logged(offset, len).await;
                    if copied.is_err() {
                        break;
                    }
                }
                let synced = match copied {
                    Ok(()) => dst
                        .sync()
                        .await
                        .with_context(|| format!("syncing hydration target {name}")),
                    Err(e) => Err(e),
                };
                if let Err(e) = synced {
                    self.target_behind.store(true, Ordering::Release);
                    tracing::error!(disk = %self.id, target = %name, error = %format!("{e:#}"),
                        "the export's writes did not all reach the hydration target; the next checkpoint copies them again");
                }
            }
        }
        Ok(())
    }

    /// Copies the part of a logged range below the hydrated position from
    /// the local layer to the target.
    async fn copy_logged(&self, offset: u64, len: u64) -> Result<()> {
        let Some((name, dst)) = &self.target else {
            return Ok(());
        };
        let _g = self.lock.lock().await;
        let end = (offset + len).min(self.upto.load(Ordering::Acquire));
        let mut at = offset;
        while at < end {
            let n = (end - at).min(MAX_IO as u64);
            let data = self
                .layer
                .read_at(at, n as usize)
                .await
                .with_context(|| format!("reading {}", self.layer_path.display()))?;
            dst.write(at, data)
                .await
                .with_context(|| format!("writing hydration target {name}"))?;
            at += n;
        }
        Ok(())
    }

    /// Copies every logged range below the hydrated position again: what a
    /// restart or a target error may have left out.
    async fn recopy_logged(&self) -> Result<()> {
        let ranges: Vec<(u64, u64)> = self.logged.lock().expect("logged ranges").iter().collect();
        for (a, b) in ranges {
            self.copy_logged(a, b - a).await?;
        }
        Ok(())
    }

    /// One hydration step: `[at, at + STEP)` of the view onto the target.
    async fn hydrate_step(&self, at: u64) -> Result<u64> {
        let Some((name, dst)) = &self.target else {
            return Ok(at);
        };
        let n = (self.size - at).min(STEP);
        // The chunks are fetched before the lock is taken: the export's
        // writes wait for the copy, not for the store.
        for id in self.chunks_of(at, at + n) {
            self.cache
                .get(&id)
                .await
                .with_context(|| format!("reading disk {} at {at}", self.id))?;
        }
        let _g = self.lock.lock().await;
        let data = self
            .view(at, n as usize)
            .await
            .with_context(|| format!("reading disk {} at {at}", self.id))?;
        if lifeboat_common::is_zero(&data) {
            dst.zero(at, n).await
        } else {
            dst.write(at, Bytes::from(data)).await
        }
        .with_context(|| format!("writing hydration target {name} at {at}"))?;
        self.upto.store(at + n, Ordering::Release);
        Ok(at + n)
    }

    /// Starts fetching the chunks of `[at, at + READ_AHEAD steps)` the local
    /// layer does not hold.
    fn read_ahead(self: &Arc<Self>, at: u64) {
        let end = (at + READ_AHEAD * STEP).min(self.size);
        for id in self.chunks_of(at.min(end), end) {
            let cache = self.cache.clone();
            lifeboat_common::spawn(async move {
                let _ = cache.get(&id).await;
            });
        }
    }
}

/// An I/O error that names the file.
fn annotate(e: std::io::Error, path: &Path) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Ranges sorted and merged (overlapping or adjacent ones become one).
fn merge(mut recs: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    let mut r = Ranges::default();
    for (offset, len) in recs.drain(..) {
        r.add(offset, offset + len);
    }
    r.iter().map(|(a, b)| (a, b - a)).collect()
}

impl BlockBackend for PointDisk {
    fn size(&self) -> u64 {
        self.size
    }

    async fn read(&self, offset: u64, len: u32) -> std::io::Result<Bytes> {
        self.view(offset, len as usize).await.map(Bytes::from)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> std::io::Result<()> {
        let len = data.len() as u64;
        let full = {
            let _g = self.lock.lock().await;
            self.layer
                .write_at(offset, data)
                .await
                .map_err(|e| annotate(e, &self.layer_path))?;
            self.wrote(offset, len)
        };
        if fua || full {
            self.flush_all().await?;
        }
        Ok(())
    }

    async fn zero(&self, offset: u64, len: u32, fua: bool) -> std::io::Result<()> {
        let full = {
            let _g = self.lock.lock().await;
            self.layer
                .zero_range(offset, len as u64)
                .await
                .map_err(|e| annotate(e, &self.layer_path))?;
            self.wrote(offset, len as u64)
        };
        if fua || full {
            self.flush_all().await?;
        }
        Ok(())
    }

    async fn flush(&self) -> std::io::Result<()> {
        self.flush_all().await
    }
}

/// `writes.log`, appended at each flush; `len` is the end of its whole
/// records.
struct Log {
    file: File,
    path: PathBuf,
    len: u64,
}

impl Log {
    /// Appends one record per range and syncs. A failed append is cut off
    /// again, so no torn record sits before later ones.
    fn append(&mut self, disk: u16, recs: &[(u64, u64)]) -> std::io::Result<()> {
        let out = encode_log(recs.iter().map(|&(offset, len)| (disk, offset, len)));
        let r = std::os::unix::fs::FileExt::write_all_at(&self.file, &out, self.len)
            .and_then(|()| self.file.sync_data());
        match r {
            Ok(()) => {
                self.len += out.len() as u64;
                Ok(())
            }
            Err(e) => {
                let _ = self.file.set_len(self.len);
                Err(annotate(e, &self.path))
            }
        }
    }

    /// Replaces the log with `recs` (the merged ranges of every disk).
    fn rewrite(&mut self, recs: &[Logged]) -> Result<()> {
        let out = encode_log(recs.iter().copied());
        fsutil::replace_file_mode(&self.path, &out, 0o600)
            .with_context(|| format!("compacting {}", self.path.display()))?;
        self.file = OpenOptions::new()
            .write(true)
            .open(&self.path)
            .with_context(|| format!("opening {}", self.path.display()))?;
        self.len = out.len() as u64;
        Ok(())
    }
}

fn encode_log(recs: impl Iterator<Item = Logged>) -> Vec<u8> {
    let mut out = Vec::new();
    for (disk, offset, len) in recs {
        formats::append::<InstantWrite>(&mut out, |b| {
            b.extend_from_slice(&disk.to_be_bytes());
            b.extend_from_slice(&offset.to_be_bytes());
            b.extend_from_slice(&len.to_be_bytes());
        });
    }
    out
}

/// The logged writes: `(disk, offset, len)`, up to a torn tail (a record
/// cut by a crash before its flush returned); the length of the whole records.
fn read_log(path: &Path) -> Result<(Vec<Logged>, u64)> {
    let buf = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut out = Vec::new();
    let mut at = 0;
    while at < buf.len() {
        match formats::next::<InstantWrite>(&buf[at..])
            .with_context(|| format!("reading {}", path.display()))?
        {
            Next::Record { payload, len } if payload.len() == 18 => {
                let disk = u16::from_be_bytes(payload[0..2].try_into().expect("2 bytes"));
                let offset = u64::from_be_bytes(payload[2..10].try_into().expect("8 bytes"));
                let n = u64::from_be_bytes(payload[10..18].try_into().expect("8 bytes"));
                out.push((disk, offset, n));
                at += len;
            }
            Next::Record { payload, .. } => bail!(
                "{}: a write record of {} bytes (18 expected) at byte {at}",
                path.display(),
                payload.len()
            ),
            Next::Torn(why) => {
                // Only the last append can be torn (a crash before its
                // flush returned); a whole record after it means damage.
                let later = (at + 1..buf.len().saturating_sub(3)).find(|&i| {
                    buf[i..].starts_with(&InstantWrite::MAGIC)
                        && matches!(
                            formats::next::<InstantWrite>(&buf[i..]),
                            Ok(Next::Record { .. })
                        )
                });
                if let Some(i) = later {
                    bail!(
                        "{}: the record at byte {at} is damaged ({why}) and whole records follow at byte {i}: \
                         the export's logged writes cannot be trusted",
                        path.display()
                    );
                }
                tracing::warn!(log = %path.display(), at, why, "writes log ends in a torn record (a write not flushed); ignored");
                break;
            }
        }
    }
    Ok((out, at as u64))
}

/// Writes the local layers of the point (unless the state directory holds
/// them already), opens every disk's view and its hydration target, and
/// brings the targets up to the checkpoint.
pub async fn open(store: &Store, kek: &Key, o: &Options) -> Result<Served> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&o.state_dir)
        .with_context(|| format!("creating {}", o.state_dir.display()))?;
    let lock = fsutil::DirLock::acquire(&o.state_dir).with_context(|| {
        format!(
            "another serve-point uses {} ({} is locked)",
            o.state_dir.display(),
            o.state_dir.join("lock").display()
        )
    })?;
    let layer_path = o.state_dir.join(LAYER_RECORD);
    let keys = materialize::machine_keys(store, kek, &o.machine).await?;
    let existing: Option<LayerRecord> = fsutil::load_record::<InstantLayer, _>(&layer_path)?;
    let (record, prepared, segments_read, bytes_fetched) = match existing {
        Some(r) => {
            if r.machine != o.machine || r.point_spec != o.point {
                bail!(
                    "{} serves machine {} at point {:?}, not {} at {:?}: use another --state-dir, or remove this one",
                    o.state_dir.display(),
                    r.machine,
                    r.point_spec,
                    o.machine,
                    o.point
                );
            }
            (r, false, 0, 0)
        }
        None => {
            remove_partial_layers(&o.state_dir)?;
            let (r, segs, bytes) = prepare(store, &keys, o).await?;
            fsutil::store_record::<InstantLayer, _>(&layer_path, &r, 0o600)?;
            (r, true, segs, bytes)
        }
    };

    let hydration_path = o.state_dir.join(HYDRATION_RECORD);
    let mut hydration: HydrationRecord =
        fsutil::load_record::<InstantHydration, _>(&hydration_path)?.unwrap_or_default();
    let asked: BTreeMap<String, String> = o
        .hydrate
        .iter()
        .map(|t| (t.disk.clone(), t.dest.to_string()))
        .collect();
    if !hydration.targets.is_empty() && hydration.targets != asked {
        bail!(
            "{} hydrates to {} already; run with the same --hydrate, or use another --state-dir",
            o.state_dir.display(),
            hydration
                .targets
                .iter()
                .map(|(d, t)| format!("{d}={t}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    for t in &o.hydrate {
        if !record.disks.iter().any(|d| d.id == t.disk) {
            bail!(
                "--hydrate {}={}: {} has no disk {} (its disks: {})",
                t.disk,
                t.dest,
                o.machine,
                t.disk,
                record
                    .disks
                    .iter()
                    .map(|d| d.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    if let Some(t) = o
        .hydrate
        .iter()
        .find(|t| o.hydrate.iter().filter(|u| u.disk == t.disk).count() > 1)
    {
        bail!("--hydrate names disk {} twice", t.disk);
    }
    hydration.targets = asked;

    let log_path = o.state_dir.join(WRITES_LOG);
    let (logged, whole) = read_log(&log_path)?;
    if let Some(w) = logged.iter().find(|w| w.0 as usize >= record.disks.len()) {
        bail!(
            "{} names disk #{}, which the point does not have: the state directory is damaged",
            log_path.display(),
            w.0
        );
    }
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    // A torn tail is cut off, so new records follow the whole ones.
    file.set_len(whole)
        .and_then(|()| file.sync_all())
        .and_then(|()| fsutil::sync_parent(&log_path))
        .with_context(|| format!("cutting {} to its whole records", log_path.display()))?;
    let log = Arc::new(StdMutex::new(Log {
        file,
        path: log_path.clone(),
        len: whole,
    }));

    let cache = Arc::new(ChunkCache {
        store: store.clone(),
        key: Arc::new(keys.data.clone()),
        namer: Arc::new(ChunkNamer::derive(&keys.data)),
        machine: o.machine.clone(),
        cap: (o.cache_bytes / CHUNK_SIZE).max(READ_AHEAD * 2) as usize,
        held: StdMutex::new((HashMap::new(), VecDeque::new())),
        fetched: AtomicU64::new(0),
        fetched_bytes: AtomicU64::new(0),
    });
    let mut disks = Vec::new();
    for (i, d) in record.disks.iter().enumerate() {
        let path = o.state_dir.join(format!("{}.layer", d.id));
        let layer = DiskFile::open(&path, o.engine)
            .with_context(|| format!("opening the local layer {}", path.display()))?;
        if layer.size() != d.size {
            bail!(
                "{} holds {} bytes, not the disk's {}: the state directory is damaged; remove it and start again",
                path.display(),
                layer.size(),
                d.size
            );
        }
        let mut local = Ranges::default();
        for &(a, b) in &d.covered {
            local.add(a, b);
        }
        let mut written = Ranges::default();
        for &(_, offset, len) in logged.iter().filter(|w| w.0 as usize == i) {
            local.add(offset, offset + len);
            written.add(offset, offset + len);
        }
        let target = match o.hydrate.iter().find(|t| t.disk == d.id) {
            Some(t) => Some((
                t.dest.to_string(),
                Dst::open(&t.dest, d.size, o.engine).await?,
            )),
            None => None,
        };
        let upto = hydration.upto.get(&d.id).copied().unwrap_or(0).min(d.size);
        disks.push(Arc::new(PointDisk {
            index: i as u16,
            id: d.id.clone(),
            size: d.size,
            layer,
            layer_path: path,
            local: RwLock::new(local),
            logged: StdMutex::new(written),
            chunks: d.chunks.iter().cloned().collect(),
            cache: cache.clone(),
            lock: Mutex::new(()),
            flushing: Mutex::new(()),
            pending: StdMutex::new(Vec::new()),
            log: log.clone(),
            target,
            target_behind: Default::default(),
            upto: AtomicU64::new(upto),
        }));
    }
    // The target may have missed logged writes below its checkpoint (they
    // reach it only at a flush): copy them again.
    for d in &disks {
        if let Some((name, dst)) = &d.target {
            d.recopy_logged().await?;
            dst.sync()
                .await
                .with_context(|| format!("syncing hydration target {name}"))?;
        }
    }
    Ok(Served {
        record,
        disks,
        prepared,
        segments_read,
        bytes_fetched,
        writes_logged: logged.len(),
        state_dir: o.state_dir.clone(),
        _lock: lock,
        hydrate_limit: o.hydrate_limit,
        hydration: StdMutex::new(hydration),
    })
}

/// Removes the layer files of a preparation that did not finish (killed):
/// they hold the machine's plaintext.
fn remove_partial_layers(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e.with_context(|| format!("reading {}", dir.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.contains(".layer.partial-") {
            std::fs::remove_file(e.path())
                .with_context(|| format!("removing {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// Resolves the point and writes its local layers: the segments after the
/// base, nothing of the base.
async fn prepare(
    store: &Store,
    keys: &MachineKeys,
    o: &Options,
) -> Result<(LayerRecord, usize, u64)> {
    let spec: PointSpec = o.point.parse().map_err(|e: String| anyhow!(e))?;
    let inv = materialize::inventory(store, Some(&keys.catalogue), &o.machine).await?;
    let resolved = materialize::resolve(&inv, &o.machine, &spec, o.allow_inconsistent)?;
    eprintln!(
        "serve-point: writing the local layers of {} at {} (the segments after the base)",
        o.machine, resolved.description
    );
    let (report, overlay) = materialize::materialize_layers(
        store,
        keys,
        &o.machine,
        &inv,
        &resolved,
        &o.state_dir,
        o.allow_inconsistent,
        Layers {
            engine: o.engine,
            with_base: false,
        },
        |_| {},
    )
    .await?;
    // The report lists machine.json's disks in order (it read them).
    let mut disks = Vec::new();
    for (i, d) in report.disks.iter().enumerate() {
        let chunks = match &inv.base {
            Some(b) => match b.disks.get(i).filter(|bd| bd.id == d.id) {
                Some(bd) => bd.chunks.clone(),
                None if b.disks.iter().any(|x| x.id == d.id) => bail!(
                    "{} lists disk {} at another position than machine.json; refusing to guess",
                    store.describe(&base::base_object(&o.machine, b.seq)),
                    d.id
                ),
                None => Vec::new(),
            },
            None => Vec::new(),
        };
        let covered = overlay
            .covered(i as u16)
            .into_iter()
            .filter(|&(a, _)| a < d.size)
            .map(|(a, b)| (a, b.min(d.size)))
            .collect();
        disks.push(LayerDisk {
            id: d.id.clone(),
            size: d.size,
            covered,
            chunks,
        });
    }
    Ok((
        LayerRecord {
            machine: o.machine.clone(),
            point_spec: o.point.clone(),
            point: report.point.clone(),
            seq: report.seq,
            base: report.base,
            disks,
        },
        report.segments_read,
        report.bytes_fetched,
    ))
}

impl Served {
    /// Serves every disk as an export named by its id, on a unix socket
    /// and/or TCP, until `shutdown`; then flushes what the exports wrote.
    pub async fn serve(
        self: &Arc<Self>,
        socket: Option<&Path>,
        tcp: Option<std::net::SocketAddr>,
        shutdown: CancellationToken,
    ) -> Result<()> {
        let mut exports = Exports::new();
        for d in &self.disks {
            exports.insert(d.id.clone(), d.clone());
        }
        let exports = Arc::new(exports);
        let mut tasks = tokio::task::JoinSet::new();
        if let Some(path) = socket {
            let (path, ex, c) = (path.to_path_buf(), exports.clone(), shutdown.clone());
            tasks.spawn(async move {
                nbd_server::serve_unix(&path, ex, c)
                    .await
                    .with_context(|| format!("serving NBD on {}", path.display()))
            });
        }
        if let Some(addr) = tcp {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding NBD address {addr}"))?;
            let (ex, c) = (exports.clone(), shutdown.clone());
            tasks.spawn(async move {
                nbd_server::serve_tcp_listener(listener, ex, c)
                    .await
                    .context("serving NBD over TCP")
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.map_err(|e| anyhow!("the NBD server task failed: {e}"))??;
        }
        for d in &self.disks {
            d.flush_all()
                .await
                .with_context(|| format!("flushing the writes to disk {}", d.id))?;
        }
        Ok(())
    }

    /// Copies every disk with a target, checkpointing on the way; `progress`
    /// gets (disk, bytes copied, disk size). Returns the bytes copied now.
    pub async fn hydrate(
        &self,
        shutdown: &CancellationToken,
        progress: impl Fn(&str, u64, u64),
    ) -> Result<u64> {
        let mut copied = 0;
        let started = Instant::now();
        for d in self.disks.iter().filter(|d| d.target.is_some()) {
            let mut at = d.hydrated();
            let mut since = 0;
            let mut last = Instant::now();
            while at < d.size {
                if shutdown.is_cancelled() {
                    return Ok(copied);
                }
                if at % (READ_AHEAD * STEP) == 0 {
                    // This window's chunks are fetched by the steps (the
                    // first ones here too); the next window's meanwhile.
                    d.read_ahead(at);
                    d.read_ahead(at + READ_AHEAD * STEP);
                }
                let next = d.hydrate_step(at).await?;
                copied += next - at;
                since += next - at;
                at = next;
                if self.hydrate_limit > 0 {
                    let due = Duration::from_secs_f64(copied as f64 / self.hydrate_limit as f64);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = shutdown.cancelled() => {}
                        }
                    }
                }
                if since >= CHECKPOINT_BYTES || last.elapsed() >= CHECKPOINT_EVERY || at == d.size {
                    self.checkpoint(false).await?;
                    progress(&d.id, at, d.size);
                    since = 0;
                    last = Instant::now();
                }
            }
        }
        self.checkpoint(true).await?;
        Ok(copied)
    }

    /// Flushes every disk (so each write the copied view held is logged),
    /// syncs the targets, then records how far each is copied.
    async fn checkpoint(&self, complete: bool) -> Result<()> {
        let mut upto = BTreeMap::new();
        for d in &self.disks {
            d.flush_all()
                .await
                .with_context(|| format!("flushing the writes to disk {}", d.id))?;
            if let Some((name, dst)) = &d.target {
                if d.target_behind.swap(false, Ordering::AcqRel) {
                    if let Err(e) = d.recopy_logged().await {
                        d.target_behind.store(true, Ordering::Release);
                        return Err(e);
                    }
                }
                // The position before the sync: what the sync covers.
                let at = d.hydrated();
                dst.sync()
                    .await
                    .with_context(|| format!("syncing hydration target {name}"))?;
                upto.insert(d.id.clone(), at);
            }
        }
        let rec = {
            let mut h = self.hydration.lock().expect("hydration record");
            h.upto = upto;
            h.complete = complete;
            h.clone()
        };
        fsutil::store_record::<InstantHydration, _>(
            &self.state_dir.join(HYDRATION_RECORD),
            &rec,
            0o600,
        )?;
        self.compact_log().await
    }

    /// Rewrites `writes.log` as the merged ranges of every disk once it
    /// holds many records (a restart replays it): with every flush held
    /// off, so no record appended meanwhile is left out.
    async fn compact_log(&self) -> Result<()> {
        let Some(first) = self.disks.first() else {
            return Ok(());
        };
        if first.log.lock().expect("writes log").len < COMPACT_LOG_BYTES {
            return Ok(());
        }
        let mut held = Vec::new();
        for d in &self.disks {
            held.push(d.flushing.lock().await);
        }
        let mut recs = Vec::new();
        for d in &self.disks {
            let l = d.logged.lock().expect("logged ranges");
            recs.extend(l.iter().map(|(a, b)| (d.index, a, b - a)));
        }
        let log = first.log.clone();
        tokio::task::spawn_blocking(move || log.lock().expect("writes log").rewrite(&recs))
            .await
            .map_err(|e| anyhow!("compacting the writes log failed: {e}"))?
    }

    /// Whether every target is copied (per the last checkpoint).
    pub fn complete(&self) -> bool {
        let h = self.hydration.lock().expect("hydration record");
        h.complete
            || (!h.targets.is_empty()
                && self
                    .disks
                    .iter()
                    .filter(|d| d.target.is_some())
                    .all(|d| h.upto.get(&d.id) == Some(&d.size)))
    }

    pub fn chunks_fetched(&self) -> (u64, u64) {
        self.disks.first().map_or((0, 0), |d| {
            (
                d.cache.fetched.load(Ordering::Relaxed),
                d.cache.fetched_bytes.load(Ordering::Relaxed),
            )
        })
    }
}

/// Bytes per second as MB/s text.
pub fn rate(bytes: u64, took: Duration) -> String {
    format!(
        "{:.0} MB/s",
        bytes as f64 / took.as_secs_f64().max(1e-9) / 1e6
    )
}

/// Time since `started` in seconds, as text.
pub fn secs(started: Instant) -> String {
    format!("{:.2} s", started.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_records_keep_their_format() {
        let layer = LayerRecord {
            machine: "m1".into(),
            point_spec: "latest".into(),
            point: "the end of the stream (seq 9)".into(),
            seq: 9,
            base: Some(4),
            disks: vec![LayerDisk {
                id: "vda".into(),
                size: 8 << 20,
                covered: vec![(0, 4096), (1 << 20, (1 << 20) + 512)],
                chunks: vec![(2, "00112233445566778899aabbccddeeff".into())],
            }],
        };
        let bytes = formats::read_fixture::<InstantLayer>("instant-layer", || {
            formats::seal::<InstantLayer>(&serde_json::to_vec(&layer).unwrap())
        });
        let back: LayerRecord =
            serde_json::from_slice(formats::open::<InstantLayer>(&bytes).unwrap()).unwrap();
        assert_eq!(back, layer);

        let h = HydrationRecord {
            targets: [("vda".to_string(), "/dev/sdb".to_string())].into(),
            upto: [("vda".to_string(), 1 << 20)].into(),
            complete: false,
        };
        let bytes = formats::read_fixture::<InstantHydration>("instant-hydration", || {
            formats::seal::<InstantHydration>(&serde_json::to_vec(&h).unwrap())
        });
        let back: HydrationRecord =
            serde_json::from_slice(formats::open::<InstantHydration>(&bytes).unwrap()).unwrap();
        assert_eq!(back, h);
    }

    #[test]
    fn the_writes_log_reads_back_to_a_torn_tail_and_refuses_damage_before_whole_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(WRITES_LOG);
        let mut log = Log {
            file: File::create(&path).unwrap(),
            path: path.clone(),
            len: 0,
        };
        log.append(0, &[(512, 3584), (1 << 30, 1)]).unwrap();
        log.append(1, &[(7, 9)]).unwrap();
        let whole = std::fs::metadata(&path).unwrap().len();
        let fixture = formats::read_fixture::<InstantWrite>("instant-write", || {
            std::fs::read(&path).unwrap()
        });
        assert_eq!(fixture, std::fs::read(&path).unwrap());
        // A record cut by a crash is not taken.
        log.append(0, &[(0, 4096)]).unwrap();
        log.file.set_len(whole + 10).unwrap();
        let (recs, len) = read_log(&path).unwrap();
        assert_eq!(recs, vec![(0, 512, 3584), (0, 1 << 30, 1), (1, 7, 9)]);
        assert_eq!(len, whole);
        // A damaged record with whole ones after it is an error, naming the byte.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.truncate(whole as usize);
        bytes[20] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let e = format!("{:#}", read_log(&path).unwrap_err());
        assert!(e.contains("damaged") && e.contains("at byte 0"), "{e}");
        // Compaction replaces it with the merged ranges.
        log.rewrite(&[(0, 0, 8192), (1, 7, 9)]).unwrap();
        log.append(0, &[(1, 1)]).unwrap();
        let (recs, _) = read_log(&path).unwrap();
        assert_eq!(recs, vec![(0, 0, 8192), (1, 7, 9), (0, 1, 1)]);
    }

    #[test]
    fn pending_writes_merge_before_they_are_logged() {
        assert_eq!(
            merge(vec![(4096, 4096), (0, 4096), (10_000, 1), (9000, 500)]),
            vec![(0, 8192), (9000, 500), (10_000, 1)]
        );
    }
}
