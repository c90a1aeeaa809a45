//! The durable cache: every received entry, in RocksDB, until it is in the object
//! store.
//!
//! Column families and records:
//!
//! ```text
//! log   key   machine bytes | 0x00 | seq u64 big-endian   (ordered by machine, seq)
//!       value envelope(b"LBCV", 1) of the protocol entry encoding
//! hash  key   machine bytes | 0x00 | disk u16 | block u64 big-endian
//!       value the 16-byte hash of the replica's 4 KiB block (common/src/resync.rs)
//! meta  key   "uploaded/<machine>"  value envelope(b"LBPO", 1) of u64: uploaded
//!       key   "machine/<machine>"   value envelope(b"LBMR", 1) of machine.json
//!       key   "owner-epoch/<machine>" value envelope(b"LBOE", 1) of u64: the
//!             ownership epoch this server last held in the store (owner.rs)
//! ```
//!
//! Positions per machine: `durable` = the last seq in `log` (or `uploaded` when
//! the log is empty) ≥ `uploaded`. An append returns only after a synced write,
//! so whatever it returns may be acknowledged. `uploaded` is persisted before the
//! cached range is deleted, so a crash in between only leaves entries that are
//! skipped on restart.
//!
//! The `hash` family describes the replica as the stream leaves it, without
//! reading the object store back (checksum resync compares against it). It is
//! written in the same WriteBatch as the log entries, so both are durable
//! together: a write covering a whole block stores its hash; a block only partly
//! written or zeroed is pending (never matches: it is resent), keeping the
//! hash the block had before; the agent's HASHES entry that follows such a
//! write gives the block's new hash, taken only if the agent's block hashed
//! the same before the write (so a replica that differs there stays
//! unknown); a
//! zeroed whole block is deleted (a missing key is the all-zero block, as a
//! replica starts as zeros). Hashes are [`HashScheme::CURRENT`]'s (XXH3-128);
//! a cache written by a build that stored BLAKE3 ones keeps them until the
//! blocks are written again, and a resync resends those blocks, since a hash
//! of the other scheme never matches.
//!
//! A full cache filesystem (ENOSPC, EDQUOT): the failed write returns an error
//! naming the cache directory and the lack of space, so nothing it held is
//! acknowledged; RocksDB then refuses every write (its background-error
//! state). [`Cache::health`] says so (`lifeboat-ps status`). RocksDB resumes by
//! itself only once the free space exceeds the `log` family's write buffer
//! (64 MiB, polled every 5 s) and its C API has no `Resume`, so
//! [`Cache::recover`] (called every second by the server) probes with a
//! small synced write and, while that fails and the filesystem has room
//! again, closes and reopens the database: what was synced is replayed, a
//! torn tail of the failed write dropped. Every operation holds a read lock on
//! the open database; a reopen takes the write lock.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use lifeboat_common::catalogue::MachineRecord;
use lifeboat_common::codec::Reader;
use lifeboat_common::formats::{self, CacheMachine, CacheOwnerEpoch, CachePosition, CacheValue};
use lifeboat_common::protocol::{Entry, Op};
use lifeboat_common::resync::{self, BlockHash, HashScheme, BLOCK, HASH_LEN};
use rocksdb::{
    ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB,
};
use tracing::{error, info, warn};

const CF_LOG: &str = "log";
const CF_META: &str = "meta";
const CF_HASH: &str = "hash";
/// Zeroed ranges up to this many blocks store hashes; longer ones delete a range.
const ZERO_PUT_MAX_BLOCKS: u64 = 256;
/// [`Cache::recover`] reopens a database that refuses writes only when the
/// filesystem has at least this much free (a new WAL, MANIFEST and the
/// replayed log's L0 files need room; a reopen that fails is tried again).
const REOPEN_MIN_FREE: u64 = 8 << 20;
/// Pauses between reopens (doubling), successful or not: a reopen that
/// fails, or one after which a write fails again at once, waits longer
/// before the next. The pause starts again from the minimum once the cache
/// took writes for [`REOPEN_RETRY_MAX`].
const REOPEN_RETRY_MIN: Duration = Duration::from_secs(2);
const REOPEN_RETRY_MAX: Duration = Duration::from_secs(60);
const PROBE_KEY: &str = "write-probe";

pub struct Cache {
    dir: PathBuf,
    /// `None` only while a reopen is under way (or failed: retried).
    db: RwLock<Option<DB>>,
    health: Mutex<Health>,
}

/// Why the cache does not take writes, since when, and when to try a reopen.
#[derive(Default)]
struct Health {
    error: Option<String>,
    since: Option<SystemTime>,
    /// No reopen before this; the pause after the next one.
    next_reopen: Option<Instant>,
    reopen_pause: Duration,
    /// When writes last worked again.
    recovered_at: Option<Instant>,
}

/// What `lifeboat-ps status` shows of the cache.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CacheHealth {
    pub dir: PathBuf,
    pub writable: bool,
    pub error: Option<String>,
    /// RFC 3339.
    pub since: Option<String>,
    pub free_bytes: Option<u64>,
    /// Bytes in use on the filesystem holding the cache (by anyone).
    pub used_bytes: Option<u64>,
}

/// The open database, read-locked for one operation.
struct DbRef<'a>(RwLockReadGuard<'a, Option<DB>>);

impl std::ops::Deref for DbRef<'_> {
    type Target = DB;
    fn deref(&self) -> &DB {
        self.0
            .as_ref()
            .expect("checked when the reference was taken")
    }
}

fn cf<'a>(db: &'a DB, name: &str) -> Result<&'a rocksdb::ColumnFamily> {
    db.cf_handle(name)
        .ok_or_else(|| anyhow!("cache has no column family {name}"))
}

/// Whether a RocksDB or I/O error says the filesystem is full.
pub fn is_no_space(e: &str) -> bool {
    let e = e.to_ascii_lowercase();
    e.contains("no space left") || e.contains("nospace") || e.contains("quota exceeded")
}

/// Free bytes of the filesystem holding `dir` (for an unprivileged writer).
pub fn free_bytes(dir: &Path) -> Option<u64> {
    space(dir).map(|(free, _)| free)
}

/// Free bytes (for an unprivileged writer) and used bytes of the filesystem
/// holding `dir`.
pub fn space(dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs(3) fills the zeroed struct we pass; the path is a C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let frsize = st.f_frsize as u64;
    let used = (st.f_blocks as u64).saturating_sub(st.f_bfree as u64);
    Some((st.f_bavail as u64 * frsize, used * frsize))
}

/// Gives the memory a closed database freed back to the system before a
/// reopen fills its memtables again: glibc keeps up to `M_TRIM_THRESHOLD`
/// (256 MiB, `common::tune_allocator`) otherwise, and the process would
/// hold both.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn open_db(dir: &Path) -> Result<DB> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_max_background_jobs(2);
    let mut log_opts = Options::default();
    // Entries live briefly: a large memtable lets most be deleted before a
    // flush. 64 MiB × 4 bounds the log's memtables at 256 MiB.
    log_opts.set_write_buffer_size(64 * 1024 * 1024);
    log_opts.set_max_write_buffer_number(4);
    log_opts.set_compression_type(rocksdb::DBCompressionType::None);
    let cfs = vec![
        ColumnFamilyDescriptor::new(CF_LOG, log_opts),
        ColumnFamilyDescriptor::new(CF_META, Options::default()),
        ColumnFamilyDescriptor::new(CF_HASH, Options::default()),
    ];
    DB::open_cf_descriptors(&opts, dir, cfs).map_err(|e| {
        let e = e.into_string();
        if is_no_space(&e) {
            anyhow!(
                "opening the RocksDB cache in {}: the cache directory has no space left ({e}); free space there",
                dir.display()
            )
        } else {
            anyhow!("opening the RocksDB cache in {}: {e}", dir.display())
        }
    })
}

fn log_key(machine: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(machine.len() + 9);
    k.extend_from_slice(machine.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

// HASHES entries carry XXH3-128 hashes: the table must keep the same.
const _: () = assert!(matches!(HashScheme::CURRENT, HashScheme::Xxh3));

fn hash_key(machine: &str, disk: u16, block: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(machine.len() + 11);
    k.extend_from_slice(machine.as_bytes());
    k.push(0);
    k.extend_from_slice(&disk.to_be_bytes());
    k.extend_from_slice(&block.to_be_bytes());
    k
}

/// A value of the `hash` family that marks a block partly written: [`PENDING`],
/// the seq of the entry that wrote it (u64 big-endian), then the hash the
/// replica's block had before that write. It never matches (reads as
/// [`resync::UNKNOWN_HASH`]); the agent's HASHES entry at the next seq turns
/// it into the block's hash if the agent's block hashed the same before the
/// write.
const PENDING: u8 = 1;
const PENDING_LEN: usize = 1 + 8 + HASH_LEN;

/// What a stored value says of the replica's block; `None` is no value.
fn stored_hash(v: Option<&[u8]>, unwritten: BlockHash) -> Result<BlockHash, usize> {
    match v {
        None => Ok(unwritten),
        Some(v) if v.len() == HASH_LEN => Ok(v.try_into().expect("length checked")),
        Some(v) if v.len() == PENDING_LEN && v[0] == PENDING => Ok(resync::UNKNOWN_HASH),
        Some(v) => Err(v.len()),
    }
}

fn hashes_unknown_key(machine: &str) -> String {
    format!("hashes-unknown/{machine}")
}

/// What a block without a value in the `hash` family holds: the all-zero
/// block (never written), unless the hashes were lost ([`Cache::hashes_unknown`]).
fn unwritten_hash(db: &DB, machine: &str) -> Result<BlockHash> {
    let lost = db
        .get_cf(cf(db, CF_META)?, hashes_unknown_key(machine))?
        .is_some();
    Ok(if lost {
        resync::UNKNOWN_HASH
    } else {
        HashScheme::CURRENT.zero_block()
    })
}

/// Whether an entry leaves a block pending or reads one (a HASHES entry):
/// only then does a batch need its own earlier updates ([`HashUpdates`]).
fn reads_hashes(op: &Op) -> bool {
    match op {
        Op::Write { offset, data, .. } => {
            !resync::partial_blocks(*offset, data.len() as u64).is_empty()
        }
        Op::Zero { offset, len, .. } => !resync::partial_blocks(*offset, *len as u64).is_empty(),
        Op::Hashes { .. } => true,
        _ => false,
    }
}

/// The hash-table updates of one batch of entries, in order. A partly
/// written block needs the block's hash before the write, so when the batch
/// holds such entries its own earlier updates are kept, to be read before
/// the table.
struct HashUpdates<'a> {
    db: &'a rocksdb::DB,
    cf: &'a rocksdb::ColumnFamily,
    machine: &'a str,
    /// What a block without a value holds, read once when first needed.
    unwritten: Option<BlockHash>,
    /// Whether to keep `put` and `deleted` (some entry reads the table).
    track: bool,
    put: HashMap<(u16, u64), Vec<u8>>,
    /// Ranges deleted by this batch, after any value in `put` they cover.
    deleted: Vec<(u16, u64, u64)>,
}

impl<'a> HashUpdates<'a> {
    fn new(
        db: &'a rocksdb::DB,
        cf: &'a rocksdb::ColumnFamily,
        machine: &'a str,
        entries: &[Entry],
    ) -> Self {
        HashUpdates {
            db,
            cf,
            machine,
            unwritten: None,
            track: entries.iter().any(|e| reads_hashes(&e.op)),
            put: HashMap::new(),
            deleted: Vec::new(),
        }
    }

    fn put(&mut self, batch: &mut WriteBatch, disk: u16, block: u64, v: &[u8]) {
        batch.put_cf(self.cf, hash_key(self.machine, disk, block), v);
        if self.track {
            self.put.insert((disk, block), v.to_vec());
        }
    }

    fn delete_range(&mut self, batch: &mut WriteBatch, disk: u16, from: u64, to: u64) {
        batch.delete_range_cf(
            self.cf,
            hash_key(self.machine, disk, from),
            hash_key(self.machine, disk, to),
        );
        if self.track {
            self.put
                .retain(|&(d, b), _| d != disk || !(from..to).contains(&b));
            self.deleted.push((disk, from, to));
        }
    }

    /// The block's value as the batch so far leaves it (`None`: no value).
    fn value(&self, disk: u16, block: u64) -> Result<Option<Vec<u8>>> {
        if let Some(v) = self.put.get(&(disk, block)) {
            return Ok(Some(v.clone()));
        }
        if self
            .deleted
            .iter()
            .any(|&(d, from, to)| d == disk && (from..to).contains(&block))
        {
            return Ok(None);
        }
        self.db
            .get_cf(self.cf, hash_key(self.machine, disk, block))
            .with_context(|| {
                format!(
                    "reading the block hash of {} disk {disk} block {block}",
                    self.machine
                )
            })
    }

    /// The replica's block hash as the batch so far leaves it.
    fn hash(&mut self, disk: u16, block: u64) -> Result<BlockHash> {
        let unwritten = match self.unwritten {
            Some(u) => u,
            None => *self
                .unwritten
                .insert(unwritten_hash(self.db, self.machine)?),
        };
        let v = self.value(disk, block)?;
        // A value of another length (never written by this build) is unknown.
        Ok(stored_hash(v.as_deref(), unwritten).unwrap_or(resync::UNKNOWN_HASH))
    }

    /// A block the entry `seq` covers only in part: pending, with its hash
    /// before.
    fn partial(&mut self, batch: &mut WriteBatch, seq: u64, disk: u16, block: u64) -> Result<()> {
        let mut v = Vec::with_capacity(PENDING_LEN);
        v.push(PENDING);
        v.extend_from_slice(&seq.to_be_bytes());
        v.extend_from_slice(&self.hash(disk, block)?);
        self.put(batch, disk, block, &v);
        Ok(())
    }

    /// Adds the updates of one entry to `batch`.
    fn entry(&mut self, batch: &mut WriteBatch, e: &Entry) -> Result<()> {
        let (disk, offset, len, data) = match &e.op {
            Op::Write { disk, offset, data } => (*disk, *offset, data.len() as u64, Some(data)),
            Op::Zero { disk, offset, len } => (*disk, *offset, *len as u64, None),
            Op::Tag { .. } | Op::Inconsistent { .. } | Op::Sums { .. } => return Ok(()),
            // The agent's hashes of the blocks the write before covered in
            // part (XXH3-128, this table's scheme: see the assertion below).
            // Taken only for a block the entry just before left pending, with
            // the same hash as the agent's block had: the replica's block
            // was the agent's, so it is now `after`. Anything else (another
            // entry's pending, a hash that differs) stays unknown.
            Op::Hashes { disk, blocks } => {
                let write = e.seq.wrapping_sub(1).to_be_bytes();
                for b in blocks {
                    let v = self.value(*disk, b.block)?;
                    let agreed = v.as_deref().is_some_and(|v| {
                        v.len() == PENDING_LEN
                            && v[0] == PENDING
                            && v[1..9] == write
                            && v[9..] == b.before
                            && b.before != resync::UNKNOWN_HASH
                    });
                    if agreed {
                        self.put(batch, *disk, b.block, &b.after);
                    }
                }
                return Ok(());
            }
            Op::Resize { disk, size } => {
                // Blocks past the new end read as zeros if the disk grows again.
                self.delete_range(batch, *disk, size.div_ceil(BLOCK), u64::MAX);
                if !size.is_multiple_of(BLOCK) {
                    self.put(batch, *disk, size / BLOCK, &resync::UNKNOWN_HASH);
                }
                return Ok(());
            }
        };
        if len == 0 {
            return Ok(());
        }
        let end = offset.saturating_add(len);
        let first_full = offset.div_ceil(BLOCK);
        let end_full = end / BLOCK;
        // Partly covered blocks at either edge: their content is not known
        // from this entry.
        for block in resync::partial_blocks(offset, len) {
            self.partial(batch, e.seq, disk, block)?;
        }
        if first_full >= end_full {
            return Ok(());
        }
        match data {
            Some(data) => {
                for b in first_full..end_full {
                    let at = (b * BLOCK - offset) as usize;
                    let h = HashScheme::CURRENT.block(&data[at..at + BLOCK as usize]);
                    self.put(batch, disk, b, &h);
                }
            }
            None if end_full - first_full <= ZERO_PUT_MAX_BLOCKS => {
                let z = HashScheme::CURRENT.zero_block();
                for b in first_full..end_full {
                    self.put(batch, disk, b, &z);
                }
            }
            None => self.delete_range(batch, disk, first_full, end_full),
        }
        Ok(())
    }
}

fn seq_of(machine: &str, key: &[u8]) -> Option<u64> {
    let rest = key.strip_prefix(machine.as_bytes())?.strip_prefix(&[0])?;
    Some(u64::from_be_bytes(rest.try_into().ok()?))
}

/// A cache value (envelope of [`CacheValue`]) written in place, without an
/// extra copy.
fn envelope_entry(out: &mut Vec<u8>, e: &Entry) {
    formats::append::<CacheValue>(out, |o| e.encode(o));
}

/// A range of entries read for one segment.
#[derive(Default)]
pub struct Batch {
    pub entries: Vec<Entry>,
    pub bytes: usize,
    /// Whether the batch ends at a tag (segments are always cut there).
    pub ends_at_tag: bool,
    /// When its last entry was durable, ms since the Unix epoch, if known
    /// (0: read back from the cache, not seen being made durable).
    pub durable_ms: u64,
}

impl Cache {
    pub fn open(dir: &Path) -> Result<Cache> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        // The cache holds plaintext writes: owner only.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("making {} private (0700)", dir.display()))?;
        }
        let db = open_db(dir)?;
        Ok(Cache {
            dir: dir.to_path_buf(),
            db: RwLock::new(Some(db)),
            health: Mutex::new(Health::default()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn db(&self) -> Result<DbRef<'_>> {
        let g = self.db.read().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            let why = self.lock_health().error.clone().unwrap_or_default();
            bail!(
                "the cache in {} is closed while it is reopened after an error ({why})",
                self.dir.display()
            );
        }
        Ok(DbRef(g))
    }

    fn lock_health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The error of a failed write (`what`), naming the cache directory and,
    /// if so, the full filesystem; remembered until a write succeeds again.
    fn write_failed(&self, what: &str, e: rocksdb::Error) -> anyhow::Error {
        let e = e.into_string();
        let msg = if is_no_space(&e) {
            format!(
                "{what}: the cache directory {} has no space left ({e}); nothing more is acknowledged (agents keep their journals) until space is freed there, then the cache goes on by itself",
                self.dir.display()
            )
        } else {
            format!("{what}: the cache in {} failed: {e}", self.dir.display())
        };
        let mut h = self.lock_health();
        if h.error.is_none() {
            error!("{msg}");
            h.since = Some(SystemTime::now());
            if h.recovered_at
                .is_none_or(|t| t.elapsed() >= REOPEN_RETRY_MAX)
            {
                h.reopen_pause = REOPEN_RETRY_MIN;
                h.next_reopen = None;
            }
        }
        h.error = Some(msg.clone());
        anyhow!(msg)
    }

    /// Whether the cache takes writes, and why not.
    pub fn health(&self) -> CacheHealth {
        let space = space(&self.dir);
        let h = self.lock_health();
        CacheHealth {
            dir: self.dir.clone(),
            writable: h.error.is_none(),
            error: h.error.clone(),
            since: h.since.map(|t| {
                chrono::DateTime::<chrono::Utc>::from(t)
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            }),
            free_bytes: space.map(|(free, _)| free),
            used_bytes: space.map(|(_, used)| used),
        }
    }

    /// After a failed write: whether writes work again (RocksDB resumed by
    /// itself, a probe write says), else, once the filesystem has room, a
    /// reopen of the database. Returns whether the cache takes writes. Call
    /// it periodically; it does nothing while the cache is healthy.
    pub fn recover(&self) -> bool {
        if self.lock_health().error.is_none() {
            return true;
        }
        let probe = self.db().and_then(|db| {
            let mut wo = WriteOptions::default();
            wo.set_sync(true);
            db.put_cf_opt(cf(&db, CF_META)?, PROBE_KEY, b"", &wo)
                .map_err(|e| anyhow!(e.into_string()))
        });
        if probe.is_ok() {
            self.recovered("RocksDB resumed");
            return true;
        }
        let free = free_bytes(&self.dir).unwrap_or(0);
        {
            let h = self.lock_health();
            // Only a full filesystem is mended by a reopen; another error
            // (EIO, corruption) stays until an operator acts.
            if !h.error.as_deref().is_some_and(is_no_space)
                || free < REOPEN_MIN_FREE
                || h.next_reopen.is_some_and(|t| Instant::now() < t)
            {
                return false;
            }
        }
        let started = Instant::now();
        let reopened = self.reopen();
        let took = started.elapsed();
        let mut h = self.lock_health();
        let pause = h.reopen_pause.max(REOPEN_RETRY_MIN);
        h.next_reopen = Some(Instant::now() + pause);
        h.reopen_pause = (pause * 2).min(REOPEN_RETRY_MAX);
        drop(h);
        match reopened {
            Ok(()) => {
                self.recovered(&format!("reopened in {} ms", took.as_millis()));
                true
            }
            Err(e) => {
                warn!(
                    "reopening the cache in {} failed, trying again in {pause:?}: {e:#}",
                    self.dir.display()
                );
                false
            }
        }
    }

    fn recovered(&self, how: &str) {
        let mut h = self.lock_health();
        if let Some(was) = h.error.take() {
            let down = h.since.and_then(|t| t.elapsed().ok()).unwrap_or_default();
            info!(
                "the cache in {} takes writes again ({how}, after {}s; it failed with: {was})",
                self.dir.display(),
                down.as_secs()
            );
        }
        h.since = None;
        h.recovered_at = Some(Instant::now());
    }

    /// Closes the database (once no operation holds it) and opens it again.
    fn reopen(&self) -> Result<()> {
        let mut g = self.db.write().unwrap_or_else(|p| p.into_inner());
        // Dropping closes it (and cancels RocksDB's own recovery).
        drop(g.take());
        release_freed_memory();
        *g = Some(open_db(&self.dir)?);
        Ok(())
    }

    /// Makes `entries` durable (synced), with the block hashes they imply, and
    /// returns the new durable position.
    pub fn append(&self, machine: &str, entries: &[Entry]) -> Result<u64> {
        let db = self.db()?;
        let cf_log = cf(&db, CF_LOG)?;
        let hash_cf = cf(&db, CF_HASH)?;
        let mut batch = WriteBatch::default();
        let mut hashes = HashUpdates::new(&db, hash_cf, machine, entries);
        let mut buf = Vec::new();
        for e in entries {
            buf.clear();
            envelope_entry(&mut buf, e);
            batch.put_cf(cf_log, log_key(machine, e.seq), &buf);
            hashes.entry(&mut batch, e)?;
        }
        drop(hashes);
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        db.write_opt(batch, &wo).map_err(|e| {
            self.write_failed(
                &format!(
                    "writing {} entries of {machine} to the cache",
                    entries.len()
                ),
                e,
            )
        })?;
        Ok(entries.last().map(|e| e.seq).unwrap_or(0))
    }

    /// Hashes of the replica's blocks `first..first + count` of `disk`.
    pub fn block_hashes(
        &self,
        machine: &str,
        disk: u16,
        first: u64,
        count: u64,
    ) -> Result<Vec<BlockHash>> {
        let db = self.db()?;
        let unwritten = unwritten_hash(&db, machine)?;
        let hash_cf = cf(&db, CF_HASH)?;
        let mut out = vec![unwritten; count as usize];
        let start = hash_key(machine, disk, first);
        let end = hash_key(machine, disk, first.saturating_add(count));
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_upper_bound(end);
        for item in db.iterator_cf_opt(hash_cf, ro, IteratorMode::From(&start, Direction::Forward))
        {
            let (k, v) = item.with_context(|| format!("reading block hashes of {machine}"))?;
            let Some(block) = k
                .get(k.len().saturating_sub(8)..)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
            else {
                continue;
            };
            let Some(slot) = block
                .checked_sub(first)
                .and_then(|i| out.get_mut(i as usize))
            else {
                continue;
            };
            *slot = stored_hash(Some(&v), unwritten).map_err(|len| {
                anyhow!(
                    "block hash of {machine} disk {disk} block {block} has {len} bytes, not {HASH_LEN}"
                )
            })?;
        }
        Ok(out)
    }

    pub fn uploaded(&self, machine: &str) -> Result<u64> {
        let db = self.db()?;
        match db.get_cf(cf(&db, CF_META)?, format!("uploaded/{machine}"))? {
            None => Ok(0),
            Some(v) => {
                let p = formats::open::<CachePosition>(&v)
                    .with_context(|| format!("reading the uploaded position of {machine}"))?;
                Ok(Reader::new(p).u64("uploaded position")?)
            }
        }
    }

    /// The last durable seq of the machine.
    pub fn durable(&self, machine: &str) -> Result<u64> {
        let last = {
            let db = self.db()?;
            let end = log_key(machine, u64::MAX);
            let mut it = db.iterator_cf(
                cf(&db, CF_LOG)?,
                IteratorMode::From(&end, Direction::Reverse),
            );
            match it.next() {
                Some(Ok((k, _))) => seq_of(machine, &k),
                Some(Err(e)) => return Err(e.into()),
                None => None,
            }
        };
        Ok(last.unwrap_or(0).max(self.uploaded(machine)?))
    }

    /// Reads entries from `from` on, up to about `max_bytes`, stopping after a tag.
    pub fn read_batch(&self, machine: &str, from: u64, max_bytes: usize) -> Result<Batch> {
        let db = self.db()?;
        let start = log_key(machine, from);
        let mut out = Batch::default();
        let iter = db.iterator_cf(
            cf(&db, CF_LOG)?,
            IteratorMode::From(&start, Direction::Forward),
        );
        for (expect, item) in (from..).zip(iter) {
            let (k, v) = item?;
            let Some(seq) = seq_of(machine, &k) else {
                break;
            };
            if seq != expect {
                return Err(anyhow!(
                    "cache of {machine} has a gap: expected seq {expect}, found {seq}"
                ));
            }
            let payload = formats::open::<CacheValue>(&v)
                .with_context(|| format!("cache entry {machine}/{seq}"))?;
            let src = Bytes::copy_from_slice(payload);
            let e = Entry::decode(&mut Reader::new(&src), &src)
                .with_context(|| format!("cache entry {machine}/{seq}"))?;
            out.bytes += e.encoded_len();
            let is_tag = matches!(e.op, Op::Tag { .. });
            out.entries.push(e);
            if is_tag {
                out.ends_at_tag = true;
                break;
            }
            if out.bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// Records that everything up to `upto` is in the object store, then frees it.
    pub fn mark_uploaded(&self, machine: &str, upto: u64) -> Result<()> {
        let db = self.db()?;
        let meta = cf(&db, CF_META)?;
        let log = cf(&db, CF_LOG)?;
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        let what = || format!("recording that {machine} is uploaded up to {upto}");
        db.put_cf_opt(
            meta,
            format!("uploaded/{machine}"),
            formats::seal::<CachePosition>(&upto.to_be_bytes()),
            &wo,
        )
        .map_err(|e| self.write_failed(&what(), e))?;
        // From the machine's first seq, not the segment's: a delete that
        // failed before (a full filesystem) is not retried for its own range,
        // since the uploader goes on after `uploaded`; this one covers it.
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(log, log_key(machine, 0), log_key(machine, upto + 1));
        db.write(batch).map_err(|e| self.write_failed(&what(), e))?;
        Ok(())
    }

    /// One synced put into `meta`, its failure described by `what`.
    fn put_meta(&self, what: &str, key: String, value: &[u8]) -> Result<()> {
        let db = self.db()?;
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        db.put_cf_opt(cf(&db, CF_META)?, key, value, &wo)
            .map_err(|e| self.write_failed(what, e))
    }

    pub fn put_machine(&self, rec: &MachineRecord) -> Result<()> {
        let json = serde_json::to_vec(rec)?;
        self.put_meta(
            &format!("recording the machine {} in the cache", rec.machine),
            format!("machine/{}", rec.machine),
            &formats::seal::<CacheMachine>(&json),
        )
    }

    /// Whether this cache lacks block hashes of data the replica holds (it
    /// was rebuilt from the store): missing hashes then mean "unknown", not
    /// "never written", until a full checksum resync has stored them all.
    pub fn hashes_unknown(&self, machine: &str) -> Result<bool> {
        let db = self.db()?;
        Ok(db
            .get_cf(cf(&db, CF_META)?, hashes_unknown_key(machine))?
            .is_some())
    }

    pub fn set_hashes_unknown(&self, machine: &str, unknown: bool) -> Result<()> {
        let key = hashes_unknown_key(machine);
        let what = format!("recording whether the block hashes of {machine} are known");
        if unknown {
            return self.put_meta(&what, key, b"1");
        }
        let db = self.db()?;
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        db.delete_cf_opt(cf(&db, CF_META)?, key, &wo)
            .map_err(|e| self.write_failed(&what, e))
    }

    /// The ownership epoch this server last held for `machine` in the store
    /// (`owner.rs`), `None` if it never owned it.
    pub fn owner_epoch(&self, machine: &str) -> Result<Option<u64>> {
        let db = self.db()?;
        match db.get_cf(cf(&db, CF_META)?, format!("owner-epoch/{machine}"))? {
            None => Ok(None),
            Some(v) => {
                let p = formats::open::<CacheOwnerEpoch>(&v)
                    .with_context(|| format!("reading the owner epoch of {machine}"))?;
                let b: [u8; 8] = p
                    .try_into()
                    .map_err(|_| anyhow!("the owner epoch of {machine} is not 8 bytes"))?;
                Ok(Some(u64::from_be_bytes(b)))
            }
        }
    }

    /// Records (synced) that this server holds `machine` at `epoch`.
    pub fn set_owner_epoch(&self, machine: &str, epoch: u64) -> Result<()> {
        self.put_meta(
            &format!("recording the ownership epoch {epoch} of {machine}"),
            format!("owner-epoch/{machine}"),
            &formats::seal::<CacheOwnerEpoch>(&epoch.to_be_bytes()),
        )
    }

    /// The record of one machine, if it ever connected.
    pub fn machine(&self, machine: &str) -> Result<Option<MachineRecord>> {
        let db = self.db()?;
        match db.get_cf(cf(&db, CF_META)?, format!("machine/{machine}"))? {
            None => Ok(None),
            Some(v) => {
                let p = formats::open::<CacheMachine>(&v)
                    .with_context(|| format!("reading the machine record of {machine}"))?;
                Ok(Some(serde_json::from_slice(p)?))
            }
        }
    }

    /// Takes a machine whose stream the store holds up to `end` into this
    /// cache, in one synced batch: its record, `uploaded = end`, and (when
    /// `end > 0`) its block hashes flagged unknown.
    pub fn adopt(&self, rec: &MachineRecord, end: u64) -> Result<()> {
        let db = self.db()?;
        let meta = cf(&db, CF_META)?;
        let mut batch = WriteBatch::default();
        let m = &rec.machine;
        batch.put_cf(
            meta,
            format!("machine/{m}"),
            formats::seal::<CacheMachine>(&serde_json::to_vec(rec)?),
        );
        batch.put_cf(
            meta,
            format!("uploaded/{m}"),
            formats::seal::<CachePosition>(&end.to_be_bytes()),
        );
        if end > 0 {
            batch.put_cf(meta, hashes_unknown_key(m), b"1");
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        db.write_opt(batch, &wo)
            .map_err(|e| self.write_failed(&format!("taking {m} into the cache"), e))?;
        Ok(())
    }

    /// Every machine this cache has seen, with its last announced disks.
    pub fn machines(&self) -> Result<Vec<MachineRecord>> {
        let db = self.db()?;
        let mut out = Vec::new();
        for item in db.iterator_cf(
            cf(&db, CF_META)?,
            IteratorMode::From(b"machine/", Direction::Forward),
        ) {
            let (k, v) = item?;
            if !k.starts_with(b"machine/") {
                break;
            }
            let p = formats::open::<CacheMachine>(&v)?;
            out.push(serde_json::from_slice(p)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_kept_version_1_cache_value_and_position_read_back() {
        use lifeboat_common::formats::{self, CachePosition, CacheValue};
        use lifeboat_common::protocol::Op;
        let entry = Entry {
            seq: 42,
            op: Op::Write {
                disk: 1,
                offset: 8192,
                data: bytes::Bytes::from_static(b"fixture data"),
            },
        };
        let v = formats::read_fixture::<CacheValue>("cache-value", || {
            let mut b = Vec::new();
            envelope_entry(&mut b, &entry);
            b
        });
        let payload = bytes::Bytes::copy_from_slice(formats::open::<CacheValue>(&v).unwrap());
        assert_eq!(
            Entry::decode(&mut Reader::new(&payload), &payload).unwrap(),
            entry
        );
        let p = formats::read_fixture::<CachePosition>("cache-position", || {
            formats::seal::<CachePosition>(&77u64.to_be_bytes())
        });
        assert_eq!(
            formats::open::<CachePosition>(&p).unwrap(),
            77u64.to_be_bytes()
        );
    }

    use super::*;
    use lifeboat_common::protocol::TagKind;

    fn w(seq: u64) -> Entry {
        Entry {
            seq,
            op: Op::Write {
                disk: 0,
                offset: seq * 4096,
                data: Bytes::from(vec![seq as u8; 4096]),
            },
        }
    }

    #[test]
    fn positions_survive_reopen_and_batches_cut_at_tags() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = Cache::open(dir.path()).unwrap();
            assert_eq!(c.durable("m").unwrap(), 0);
            let mut es: Vec<Entry> = (1..=3).map(w).collect();
            es.push(Entry {
                seq: 4,
                op: Op::Tag {
                    kind: TagKind::Crash,
                    source: None,
                    time_ms: 1,
                    label: String::new(),
                },
            });
            es.push(w(5));
            assert_eq!(c.append("m", &es).unwrap(), 5);
            c.append("m2", &[w(1)]).unwrap();
            let b = c.read_batch("m", 1, 1 << 20).unwrap();
            assert_eq!(b.entries.len(), 4);
            assert!(b.ends_at_tag);
            c.mark_uploaded("m", 4).unwrap();
        }
        let c = Cache::open(dir.path()).unwrap();
        assert_eq!(c.uploaded("m").unwrap(), 4);
        assert_eq!(c.durable("m").unwrap(), 5);
        assert_eq!(c.durable("m2").unwrap(), 1);
        let b = c.read_batch("m", 5, 1 << 20).unwrap();
        assert_eq!(b.entries, vec![w(5)]);
        c.mark_uploaded("m", 5).unwrap();
        assert_eq!(c.durable("m").unwrap(), 5, "durable never moves back");
        assert!(c.read_batch("m", 6, 1 << 20).unwrap().entries.is_empty());
    }

    #[test]
    fn a_full_filesystem_is_told_apart_and_a_healthy_cache_says_so() {
        assert!(is_no_space(
            "IO error: No space left on device: While appending to file: /c/000004.log"
        ));
        assert!(is_no_space("IO error: Disk quota exceeded"));
        assert!(!is_no_space("Corruption: block checksum mismatch"));
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path()).unwrap();
        let h = c.health();
        assert!(
            h.writable && h.error.is_none() && h.since.is_none(),
            "{h:?}"
        );
        assert_eq!(h.dir, dir.path());
        assert!(c.recover(), "a healthy cache needs no recovery");
    }

    fn entry(seq: u64, op: Op) -> Entry {
        Entry { seq, op }
    }

    /// A HASHES entry gives a partly written block its hash only when the
    /// agent's block hashed before the write as the replica's did.
    #[test]
    fn hashes_entries_are_taken_only_where_the_replica_matched_before_the_write() {
        use lifeboat_common::protocol::PartialBlock;
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path()).unwrap();
        let s = HashScheme::CURRENT;
        let u = resync::UNKNOWN_HASH;
        let old = vec![5u8; 4096];
        let mut new = old.clone();
        new[512..1024].fill(6);
        let write = |seq, block: u64| {
            entry(
                seq,
                Op::Write {
                    disk: 0,
                    offset: block * 4096 + 512,
                    data: Bytes::from(vec![6u8; 512]),
                },
            )
        };
        let hashes = |seq, block, before: &[u8]| {
            entry(
                seq,
                Op::Hashes {
                    disk: 0,
                    blocks: vec![PartialBlock {
                        block,
                        before: s.block(before),
                        after: s.block(&new),
                    }],
                },
            )
        };
        let whole = |seq, block: u64| {
            entry(
                seq,
                Op::Write {
                    disk: 0,
                    offset: block * 4096,
                    data: Bytes::from(old.clone()),
                },
            )
        };
        // Blocks 0..4 hold `old` in the replica.
        c.append("m", &(0..4).map(|b| whole(b + 1, b)).collect::<Vec<_>>())
            .unwrap();
        c.append(
            "m",
            &[
                // Block 0: the agent's block was the replica's: taken.
                write(10, 0),
                hashes(11, 0, &old),
                // Block 1: the agent's block differed (changed behind its
                // back, or entries the replica never got): stays unknown.
                write(12, 1),
                hashes(13, 1, &[9u8; 4096]),
                // Block 2: no partial write before it: ignored.
                hashes(14, 2, &old),
            ],
        )
        .unwrap();
        // Block 3: write and hashes in separate batches; block 5, never
        // written, was zeros on both sides.
        c.append("m", &[write(15, 3)]).unwrap();
        c.append(
            "m",
            &[
                hashes(16, 3, &old),
                entry(
                    17,
                    Op::Zero {
                        disk: 0,
                        offset: 5 * 4096 + 512,
                        len: 512,
                    },
                ),
                entry(
                    18,
                    Op::Hashes {
                        disk: 0,
                        blocks: vec![PartialBlock {
                            block: 5,
                            before: s.zero_block(),
                            after: s.zero_block(),
                        }],
                    },
                ),
            ],
        )
        .unwrap();
        assert_eq!(
            c.block_hashes("m", 0, 0, 6).unwrap(),
            vec![
                s.block(&new),
                u,
                s.block(&old),
                s.block(&new),
                s.zero_block(),
                s.zero_block()
            ]
        );
        // A second partial write chains on the first's hash.
        c.append("m", &[write(19, 0), hashes(20, 0, &new)]).unwrap();
        assert_eq!(c.block_hashes("m", 0, 0, 1).unwrap(), vec![s.block(&new)]);
        // Hashes lost (a cache rebuilt from the store): a block without a
        // value is unknown, not zeros, so no HASHES entry is taken for it.
        c.set_hashes_unknown("m", true).unwrap();
        c.append(
            "m",
            &[
                entry(
                    21,
                    Op::Zero {
                        disk: 0,
                        offset: 7 * 4096 + 512,
                        len: 512,
                    },
                ),
                entry(
                    22,
                    Op::Hashes {
                        disk: 0,
                        blocks: vec![PartialBlock {
                            block: 7,
                            before: s.zero_block(),
                            after: s.zero_block(),
                        }],
                    },
                ),
            ],
        )
        .unwrap();
        assert_eq!(c.block_hashes("m", 0, 7, 1).unwrap(), vec![u]);
        // A HASHES entry that does not directly follow the write which left
        // the block pending (its own write was dropped by a rebase) is not
        // taken, even with the right hash before.
        c.set_hashes_unknown("m", false).unwrap();
        c.append(
            "m",
            &[
                whole(23, 9),
                write(24, 9),
                whole(25, 10),
                hashes(26, 9, &old),
            ],
        )
        .unwrap();
        assert_eq!(c.block_hashes("m", 0, 9, 1).unwrap(), vec![u]);
    }

    #[test]
    fn block_hash_table_follows_writes_and_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path()).unwrap();
        let z = HashScheme::CURRENT.zero_block();
        let data: Vec<u8> = (0..3 * 4096u32).map(|i| (i % 251) as u8 + 1).collect();
        let h = |b: usize| HashScheme::CURRENT.block(&data[b * 4096..(b + 1) * 4096]);
        c.append(
            "m",
            &[
                // Whole blocks 1..=3.
                entry(
                    1,
                    Op::Write {
                        disk: 0,
                        offset: 4096,
                        data: Bytes::from(data.clone()),
                    },
                ),
                // Another disk and machine are separate.
                entry(
                    2,
                    Op::Write {
                        disk: 1,
                        offset: 0,
                        data: Bytes::from(vec![9u8; 4096]),
                    },
                ),
                // Straddles blocks 5 and 6 without covering either.
                entry(
                    3,
                    Op::Write {
                        disk: 0,
                        offset: 5 * 4096 + 100,
                        data: Bytes::from(vec![1u8; 4096]),
                    },
                ),
                // Inside block 8 only.
                entry(
                    4,
                    Op::Write {
                        disk: 0,
                        offset: 8 * 4096 + 1,
                        data: Bytes::from_static(b"x"),
                    },
                ),
            ],
        )
        .unwrap();
        c.append(
            "m2",
            &[entry(
                1,
                Op::Write {
                    disk: 0,
                    offset: 0,
                    data: Bytes::from(vec![7u8; 8192]),
                },
            )],
        )
        .unwrap();
        let u = resync::UNKNOWN_HASH;
        let got = c.block_hashes("m", 0, 0, 10).unwrap();
        assert_eq!(got, vec![z, h(0), h(1), h(2), z, u, u, z, u, z]);
        assert_eq!(
            c.block_hashes("m", 1, 0, 2).unwrap(),
            vec![HashScheme::CURRENT.block(&[9u8; 4096]), z]
        );
        assert_eq!(c.block_hashes("m2", 0, 1, 2).unwrap()[1], z);

        // Zeroing: whole blocks read as zeros again (short and long ranges),
        // a partly zeroed block is unknown; a later whole write is known again.
        c.append(
            "m",
            &[
                entry(
                    5,
                    Op::Zero {
                        disk: 0,
                        offset: 4096,
                        len: 4096 + 2048,
                    },
                ),
                entry(
                    6,
                    Op::Zero {
                        disk: 0,
                        offset: 3 * 4096,
                        len: 300 * 4096,
                    },
                ),
                entry(
                    7,
                    Op::Write {
                        disk: 0,
                        offset: 5 * 4096,
                        data: Bytes::from(data[..4096].to_vec()),
                    },
                ),
            ],
        )
        .unwrap();
        let got = c.block_hashes("m", 0, 0, 10).unwrap();
        assert_eq!(got, vec![z, z, u, z, z, h(0), z, z, z, z]);
        drop(c);
        // Durable with the log.
        let c = Cache::open(dir.path()).unwrap();
        assert_eq!(c.block_hashes("m", 0, 5, 1).unwrap(), vec![h(0)]);
        assert_eq!(c.durable("m").unwrap(), 7);
    }
}
