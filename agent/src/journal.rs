//! The agent's local journal: an append-only log of captured entries, in rolling
//! files, so that captured-but-unacknowledged writes survive an agent restart.
//!
//! Files are `journal/<first-seq:016x>.jnl`, each a sequence of records:
//!
//! ```text
//! magic b"LBJR" | version u16 (1) | length u32 | crc32c u32 | entry (protocol encoding)
//! ```
//!
//! (the envelope of [`formats::JournalRecord`]); an entry carries at most
//! `protocol::MAX_WRITE_LEN` bytes of data, the limit of the NBD export too,
//! so every record written here can be read back.
//!
//! ```text
//! ```
//!
//! Appends go to an in-memory buffer (under the caller's lock, cheap); one writer
//! thread moves the buffer to the current file, rolls files at `FILE_MAX_BYTES`,
//! fdatasyncs on request ([`Journal::sync`], used by FLUSH and FUA), and deletes
//! files whose every entry is acknowledged (the newest file is kept so the seq
//! counter survives). On open, a torn record at the tail of the newest file is
//! cut off; damage anywhere else is an error naming the file, and so are seqs
//! that are not contiguous, within a file or from one file to the next.
//!
//! I/O errors (ENOSPC, EIO) never leave a hole or garbage behind:
//! - a failed write is cut off the file again (`set_len` to the length before
//!   it; until that succeeds nothing more is written to the file), and the
//!   records go back to the front of the buffer, to be written again: the
//!   written position never passes a record that is not in the file;
//! - the error is reported by [`Journal::failing`] until a write and sync
//!   succeed again; sync waiters (FLUSH, FUA) that are not yet covered fail
//!   meanwhile, and the stream stops journaling (it degrades to `bitmap`);
//! - the writer retries with a growing pause, so the journal recovers by
//!   itself when space returns; a current file whose entries are all
//!   acknowledged is closed and deleted, so acknowledgements give space back
//!   even on a filesystem smaller than one journal file.
//!
//! A failed fdatasync fails its waiters and is retried; the records stay in
//! the file. (Linux may have dropped their pages: the activity log, which
//! keeps a region until its writes are acknowledged, covers a crash then.)
//!
//! [`Journal::read_span`] reads entries back (the stream keeps only a bounded
//! part of what it queues in memory; `session.rs`): sequentially from a cursor
//! that follows the sender, or found again from the file names. It reads only
//! seqs the writer has handed to the OS, which no release deletes before they
//! are acknowledged.
//!
//! [`Journal::rebase`] drops every file and starts an empty one named after the
//! new base (the agent lost its state and continues the receiver's numbering):
//! an empty newest file still fixes the counter.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use lifeboat_common::codec::Reader;
use lifeboat_common::formats::{self, JournalRecord, Next};
use lifeboat_common::protocol::Entry;
use tracing::warn;

const HEADER: usize = lifeboat_common::codec::ENVELOPE_HEADER;
pub const FILE_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// The writer moves the buffer to the file at least this often...
const WRITE_INTERVAL: Duration = Duration::from_millis(20);
/// ...or as soon as it holds this much.
const WRITE_THRESHOLD: usize = 1024 * 1024;
/// A current file whose entries are all acknowledged is closed (and then
/// deleted) at the next write once it holds this much.
const ROLL_RELEASED_BYTES: u64 = 4 * 1024 * 1024;
/// Pauses between attempts after a failed write or sync (doubling).
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// Attempts at shutdown while writes fail, before the writer gives up (the
/// records not written are then missing from the journal: no clean-shutdown
/// marker is written, so the activity log resends their regions).
const SHUTDOWN_ATTEMPTS: u32 = 3;

#[derive(Default)]
struct Shared {
    pending: Vec<u8>,
    pending_first: u64,
    pending_last: u64,
    written: u64,
    synced: u64,
    sync_requested: u64,
    release_upto: u64,
    /// A rebase asked for (the new base), done by the writer thread.
    rebase: Option<u64>,
    /// Rebases done; a sync waiter whose entries a rebase dropped returns.
    rebases: u64,
    shutdown: bool,
    /// The last write or sync failed with this; cleared by the next success.
    error: Option<String>,
}

pub struct Journal {
    dir: PathBuf,
    /// Where the last [`Journal::read_span`] stopped.
    cursor: Mutex<Option<Cursor>>,
    shared: Arc<(Mutex<Shared>, Condvar, Condvar)>,
    /// Signalled whenever more entries reached the OS (the sender waits for it).
    pub written: Arc<tokio::sync::Notify>,
    /// `Shared::error` is set: read on every write without taking the lock.
    failing: Arc<std::sync::atomic::AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// A place in the journal: the record of seq `next` starts at `offset` of the
/// file named `file`, in the numbering counted by `rebases`.
#[derive(Debug, Clone, Copy)]
struct Cursor {
    file: u64,
    offset: u64,
    next: u64,
    rebases: u64,
}

/// What [`Journal::read_span`] reads at once (more for a larger record).
const READ_BACK_CHUNK: usize = 4 << 20;

fn file_name(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:016x}.jnl"))
}

fn list_files(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(stem) = name.strip_suffix(".jnl") {
            if let Ok(first) = u64::from_str_radix(stem, 16) {
                out.push((first, e.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Encodes one record onto `out`.
pub fn encode_record(out: &mut Vec<u8>, e: &Entry) {
    formats::append::<JournalRecord>(out, |o| e.encode(o));
}

/// Reads the records of one file; returns them, the length of the valid
/// prefix, and what is wrong after it (a torn tail) if anything. A record of
/// another format version, undecodable entries and seqs that are not
/// contiguous are errors naming the file.
fn read_file(path: &Path) -> Result<(Vec<Entry>, u64, Option<String>)> {
    let data =
        Bytes::from(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?);
    read_records(data, path)
}

/// [`read_file`] of bytes already read (`path` names them in errors); public
/// for the fuzz target.
pub fn read_records(data: Bytes, path: &Path) -> Result<(Vec<Entry>, u64, Option<String>)> {
    let mut entries: Vec<Entry> = Vec::new();
    let mut pos = 0usize;
    while pos < data.len() {
        let (e, len) = match record_at(&data, pos, 0, path)? {
            Ok(r) => r,
            Err(why) => return Ok((entries, pos as u64, Some(format!("{why} at byte {pos}")))),
        };
        if let Some(prev) = entries.last() {
            expect_seq(&e, prev.seq + 1, pos as u64, path)?;
        }
        entries.push(e);
        pos += len;
    }
    Ok((entries, pos as u64, None))
}

/// The record at `pos` of `data`, bytes of `path` from its byte `base`: its
/// entry and the bytes it takes, or why it is not a whole record (a torn
/// write, or `data` ends inside it). Undecodable records are errors.
fn record_at(
    data: &Bytes,
    pos: usize,
    base: u64,
    path: &Path,
) -> Result<Result<(Entry, usize), String>> {
    let at = base + pos as u64;
    let what = || format!("journal {}: record at byte {at}", path.display());
    let len = match formats::next::<JournalRecord>(&data[pos..]).with_context(what)? {
        Next::Record { len, .. } => len,
        Next::Torn(why) => return Ok(Err(why)),
    };
    let body = data.slice(pos + HEADER..pos + len);
    let e = Entry::decode(&mut Reader::new(&body), &body).with_context(what)?;
    Ok(Ok((e, len)))
}

/// Refuses a record (at byte `at` of `path`) whose seq is not `want`.
fn expect_seq(e: &Entry, want: u64, at: u64, path: &Path) -> Result<()> {
    if e.seq != want {
        bail!(
            "journal {}: the record at byte {at} has seq {}, expected {want}",
            path.display(),
            e.seq
        );
    }
    Ok(())
}

impl Journal {
    /// Opens (creating) the journal and returns the entries it holds, in seq order.
    pub fn open(dir: &Path) -> Result<(Journal, Vec<Entry>)> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let files = list_files(dir)?;
        let mut entries: Vec<Entry> = Vec::new();
        let mut current: Option<(u64, File, u64)> = None;
        for (i, (first, path)) in files.iter().enumerate() {
            let last_file = i + 1 == files.len();
            let (es, valid, damage) = read_file(path)?;
            if let Some(d) = damage {
                if !last_file {
                    bail!("journal file {} is damaged ({d}); it is not the newest file, so this is not a torn write", path.display());
                }
                warn!("journal {}: cutting a torn tail ({d})", path.display());
                let f = OpenOptions::new().write(true).open(path)?;
                f.set_len(valid)?;
                f.sync_all()?;
            }
            if let (Some(prev), Some(e)) = (entries.last(), es.first()) {
                if e.seq != prev.seq + 1 {
                    bail!(
                        "journal {} starts at seq {}, expected {}",
                        path.display(),
                        e.seq,
                        prev.seq + 1
                    );
                }
            }
            if es.first().is_some_and(|e| e.seq != *first) {
                bail!(
                    "journal {} does not start at the seq its name says",
                    path.display()
                );
            }
            entries.extend(es);
            if last_file {
                let f = OpenOptions::new().append(true).open(path)?;
                current = Some((*first, f, valid));
            }
        }
        // An empty newest file whose name does not follow the older files'
        // entries is left from a rebase that did not complete (a power loss
        // before its removals were durable): the entries kept win, and the
        // next welcome judges the numbering again.
        if let (Some((first, _, 0)), Some(e)) = (&current, entries.last()) {
            if *first != e.seq + 1 {
                let path = file_name(dir, *first);
                warn!(
                    "journal {}: an empty file after seq {} (an unfinished rebase); removing it",
                    path.display(),
                    e.seq
                );
                current = None;
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
            }
        }
        // An empty newest file (after a rebase) still says where numbering goes on.
        let newest_base = match &current {
            Some((first, _, _)) => Some(first.saturating_sub(1)),
            None => files.last().map(|(first, _)| first.saturating_sub(1)),
        };
        let last = entries.last().map(|e| e.seq).or(newest_base).unwrap_or(0);
        let shared = Arc::new((
            Mutex::new(Shared {
                written: last,
                synced: last,
                pending_first: last + 1,
                pending_last: last,
                ..Default::default()
            }),
            Condvar::new(),
            Condvar::new(),
        ));
        let s2 = shared.clone();
        let dir2 = dir.to_path_buf();
        let written = Arc::new(tokio::sync::Notify::new());
        let w2 = written.clone();
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f2 = failing.clone();
        let thread = std::thread::Builder::new()
            .name("journal".into())
            .spawn(move || writer_thread(dir2, s2, current, w2, f2))
            .context("starting the journal writer")?;
        Ok((
            Journal {
                dir: dir.to_path_buf(),
                cursor: Mutex::new(None),
                shared,
                written,
                failing,
                thread: Mutex::new(Some(thread)),
            },
            entries,
        ))
    }

    /// Buffers an entry (seqs must be consecutive).
    pub fn append(&self, e: &Entry) {
        let (m, work, _) = &*self.shared;
        let mut s = m.lock().unwrap_or_else(|p| p.into_inner());
        if s.pending.is_empty() {
            s.pending_first = e.seq;
        }
        encode_record(&mut s.pending, e);
        s.pending_last = e.seq;
        if s.pending.len() >= WRITE_THRESHOLD {
            work.notify_one();
        }
    }

    /// Drops every entry and continues after `base`: blocks until the writer
    /// has taken the request, and returns whether it replaced the files by one
    /// empty file named `base + 1` (synced). The caller holds the stream's
    /// state lock, so no append interleaves.
    ///
    /// An error of an earlier write (a full disk) does not end the wait: the
    /// writer does the rebase anyway, and a caller told it failed would go on
    /// numbering after its old seqs into the new file, whose name then
    /// contradicts its first record (the agent cannot start on that journal:
    /// fault seed 217027).
    pub fn rebase(&self, base: u64) -> std::io::Result<()> {
        let (m, work, done) = &*self.shared;
        let mut s = m.lock().unwrap_or_else(|p| p.into_inner());
        if s.shutdown {
            return Err(std::io::Error::other("journal closed"));
        }
        // The buffered records are dropped by the writer, once the files are
        // replaced (records a failing write puts back go with them); a failed
        // rebase keeps them, in step with the stream's old numbering. The
        // writer does not stop while a rebase is asked for.
        s.rebase = Some(base);
        let before = s.rebases;
        work.notify_one();
        while s.rebase.is_some() {
            s = done.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        if s.rebases != before {
            return Ok(());
        }
        Err(std::io::Error::other(format!(
            "journal: {}",
            s.error.as_deref().unwrap_or("the rebase failed")
        )))
    }

    /// Rebases done so far (see [`Self::sync_blocking_since`]).
    pub fn rebases(&self) -> u64 {
        self.shared
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .rebases
    }

    /// Blocks until every entry up to `seq` is written and fdatasync'ed.
    pub fn sync_blocking(&self, seq: u64) -> std::io::Result<()> {
        let rebases = self.rebases();
        self.sync_blocking_since(seq, rebases)
    }

    /// Like [`Self::sync_blocking`] for a `seq` taken when [`Self::rebases`]
    /// was `rebases`: returns at once if a rebase has dropped it since.
    pub fn sync_blocking_since(&self, seq: u64, rebases: u64) -> std::io::Result<()> {
        let (m, work, done) = &*self.shared;
        let mut s = m.lock().unwrap_or_else(|p| p.into_inner());
        if s.rebases != rebases {
            return Ok(());
        }
        s.sync_requested = s.sync_requested.max(seq);
        work.notify_one();
        wait_writer(s, done, |s| s.synced >= seq || s.rebases != rebases)
    }

    /// Files whose entries are all `≤ acked` may be deleted.
    pub fn release(&self, acked: u64) {
        let (m, _, _) = &*self.shared;
        let mut s = m.lock().unwrap_or_else(|p| p.into_inner());
        s.release_upto = s.release_upto.max(acked);
    }

    /// Reads back the entries `first..=last` (`bytes` of them, encoded), all
    /// handed to the OS already ([`Self::positions`]) and not acknowledged (so
    /// not released), of the numbering counted by `rebases` ([`Self::rebases`]).
    pub fn read_span(
        &self,
        first: u64,
        last: u64,
        bytes: usize,
        rebases: u64,
    ) -> Result<Vec<Entry>> {
        if self.rebases() != rebases {
            bail!(
                "journal {}: rebased before seqs {first}..={last} were read back",
                self.dir.display()
            );
        }
        let mut cursor = self.cursor.lock().unwrap_or_else(|p| p.into_inner());
        // Where the cursor is, exactly the span's records; else a scan from the
        // start of the file that holds `first`.
        let records = bytes + HEADER * (last + 1).saturating_sub(first) as usize;
        let mut chunk = READ_BACK_CHUNK;
        let mut c = match *cursor {
            Some(c) if c.next == first && c.rebases == rebases => {
                chunk = records.clamp(HEADER, READ_BACK_CHUNK);
                c
            }
            // Entries sent from memory since: skip forward from the cursor.
            Some(c)
                if c.next < first
                    && c.rebases == rebases
                    && file_name(&self.dir, c.file).exists() =>
            {
                c
            }
            _ => {
                let files = list_files(&self.dir)?;
                let Some(&(file, _)) = files.iter().rev().find(|(f, _)| *f <= first) else {
                    bail!("journal {}: no file holds seq {first}", self.dir.display());
                };
                Cursor {
                    file,
                    offset: 0,
                    next: file,
                    rebases,
                }
            }
        };
        *cursor = None; // set again only when the read succeeds
        let mut out = Vec::new();
        while c.next <= last {
            let mut path = file_name(&self.dir, c.file);
            let f = match File::open(&path) {
                // The cursor's file ended where the last span did and was
                // deleted since (all of it acknowledged): the next seq starts
                // the file named after it.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && c.offset > 0 => {
                    c = Cursor {
                        file: c.next,
                        offset: 0,
                        ..c
                    };
                    path = file_name(&self.dir, c.file);
                    File::open(&path)
                }
                r => r,
            }
            .with_context(|| {
                format!(
                    "journal: reading back seq {} from {}",
                    c.next,
                    path.display()
                )
            })?;
            let mut buf = vec![0u8; chunk];
            let mut n = 0;
            while n < buf.len() {
                let r = f
                    .read_at(&mut buf[n..], c.offset + n as u64)
                    .with_context(|| format!("reading {}", path.display()))?;
                if r == 0 {
                    break;
                }
                n += r;
            }
            let at_eof = n < buf.len();
            if n == 0 && c.offset == 0 {
                bail!(
                    "journal {} is empty where seq {} should start",
                    path.display(),
                    c.next
                );
            }
            buf.truncate(n);
            let data = Bytes::from(buf);
            let start = c.offset;
            let mut pos = 0usize;
            while pos < data.len() && c.next <= last {
                let (e, len) = match record_at(&data, pos, start, &path)? {
                    Ok(r) => r,
                    Err(_) if !at_eof && pos == 0 => {
                        // A record larger than the chunk: read it whole.
                        chunk *= 2;
                        break;
                    }
                    Err(_) if !at_eof => break, // the rest from its start
                    Err(why) => bail!(
                        "journal {}: {why} at byte {} while reading back seq {}",
                        path.display(),
                        c.offset,
                        c.next
                    ),
                };
                expect_seq(&e, c.next, c.offset, &path)?;
                if e.seq >= first {
                    out.push(e);
                }
                c.next += 1;
                c.offset += len as u64;
                pos += len;
            }
            if at_eof && pos == data.len() && c.next <= last {
                // This file ends at a record boundary: the next one goes on.
                c = Cursor {
                    file: c.next,
                    offset: 0,
                    ..c
                };
            }
        }
        if self.rebases() != rebases {
            bail!(
                "journal {}: rebased while seqs {first}..={last} were read back",
                self.dir.display()
            );
        }
        *cursor = Some(c);
        Ok(out)
    }

    /// The last seq handed to the OS and the last one synced.
    pub fn positions(&self) -> (u64, u64) {
        let (m, _, _) = &*self.shared;
        let s = m.lock().unwrap_or_else(|p| p.into_inner());
        (s.written, s.synced)
    }

    /// Why the last write or sync failed, while it has not succeeded since.
    pub fn failing(&self) -> Option<String> {
        if !self.failing.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        let (m, _, _) = &*self.shared;
        m.lock().unwrap_or_else(|p| p.into_inner()).error.clone()
    }

    /// Writes out everything buffered and stops the writer.
    pub fn close(&self) {
        {
            let (m, work, _) = &*self.shared;
            let mut s = m.lock().unwrap_or_else(|p| p.into_inner());
            s.shutdown = true;
            work.notify_one();
        }
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.close();
    }
}

fn writer_thread(
    dir: PathBuf,
    shared: Arc<(Mutex<Shared>, Condvar, Condvar)>,
    mut current: Option<(u64, File, u64)>,
    written: Arc<tokio::sync::Notify>,
    failing: Arc<std::sync::atomic::AtomicBool>,
) {
    let (m, work, done) = &*shared;
    // Consecutive failed attempts, and the length the current file must be cut
    // back to before it takes another record (a write failed part-way).
    let mut failures = 0u32;
    let mut cut_to: Option<u64> = None;
    let mut closed: Vec<(u64, PathBuf)> = list_files(&dir).unwrap_or_default();
    closed.retain(|(first, _)| current.as_ref().map(|c| c.0) != Some(*first));
    loop {
        let rebase = m.lock().unwrap_or_else(|p| p.into_inner()).rebase;
        if let Some(base) = rebase {
            // Every file is removed (the current one too: it stays open,
            // with its pending cut, until the new file replaces it), then the
            // new empty file is created and synced; one that cannot be synced
            // is removed again, so a failed rebase never leaves a newest file
            // whose name contradicts the numbering the stream keeps.
            let result = (|| -> std::io::Result<()> {
                for (_, path) in closed.drain(..) {
                    remove_if_present(&path)?;
                }
                for (_, path) in list_files(&dir).map_err(std::io::Error::other)? {
                    remove_if_present(&path)?;
                }
                let path = file_name(&dir, base + 1);
                let f = OpenOptions::new().create(true).append(true).open(&path)?;
                if let Err(e) = f
                    .sync_all()
                    .and_then(|()| File::open(&dir).and_then(|d| d.sync_all()))
                {
                    let _ = remove_if_present(&path);
                    return Err(e);
                }
                current = Some((base + 1, f, 0));
                cut_to = None;
                Ok(())
            })();
            let mut s = m.lock().unwrap_or_else(|p| p.into_inner());
            match result {
                Ok(()) => {
                    s.written = base;
                    s.synced = base;
                    s.sync_requested = base;
                    s.release_upto = base;
                    s.pending.clear();
                    s.pending_first = base + 1;
                    s.pending_last = base;
                    s.rebases += 1;
                    // The records a failed write kept are dropped with the
                    // rest: their error is over.
                    if s.error.take().is_some() {
                        warn!("journal: writing again (rebased on seq {base})");
                    }
                    failures = 0;
                }
                Err(e) => {
                    s.error = Some(format!("rebasing on seq {base}: {e}"));
                    failures += 1;
                    // Some files may be gone: what is left is released as
                    // usual; the current file stays current while it exists.
                    if current
                        .as_ref()
                        .is_some_and(|(first, _, _)| !file_name(&dir, *first).exists())
                    {
                        current = None;
                        cut_to = None;
                    }
                    closed = list_files(&dir).unwrap_or_default();
                    closed.retain(|(first, _)| current.as_ref().map(|c| c.0) != Some(*first));
                }
            }
            s.rebase = None;
            failing.store(s.error.is_some(), std::sync::atomic::Ordering::Release);
            done.notify_all();
            continue;
        }
        let (buf, first, last, want_sync, release, shutdown) = {
            let mut s = m.lock().unwrap_or_else(|p| p.into_inner());
            if failures > 0 && !s.shutdown {
                // The last attempt failed: pause (growing) before the next.
                let pause = RETRY_MIN
                    .saturating_mul(1 << failures.min(8))
                    .min(RETRY_MAX);
                let until = std::time::Instant::now() + pause;
                while !s.shutdown && s.rebase.is_none() {
                    let left = until.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    s = work
                        .wait_timeout(s, left)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|p| p.into_inner().0);
                }
                if s.rebase.is_some() {
                    continue;
                }
            } else if s.pending.is_empty()
                && s.sync_requested <= s.synced
                && s.rebase.is_none()
                && !s.shutdown
            {
                s = work
                    .wait_timeout(s, WRITE_INTERVAL)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
            let buf = std::mem::take(&mut s.pending);
            let first = s.pending_first;
            let last = s.pending_last;
            s.pending_first = last + 1;
            (
                buf,
                first,
                last,
                s.sync_requested > s.synced || failures > 0,
                s.release_upto,
                s.shutdown,
            )
        };
        // A current file whose every entry is acknowledged is rolled away
        // (once it holds ROLL_RELEASED_BYTES) so the clean-up below can delete
        // it: only closed files are deleted, and on a small or full filesystem
        // the journal then takes little more than its unacknowledged entries.
        let fully_released = release >= first.saturating_sub(1);
        let wrote = if buf.is_empty() {
            Ok(())
        } else {
            write_records(
                &dir,
                &mut current,
                &mut closed,
                &mut cut_to,
                &buf,
                first,
                fully_released,
            )
        };
        let synced = match (&wrote, &current) {
            (Ok(()), Some((_, f, _))) if want_sync || shutdown => f.sync_data(),
            _ => Ok(()),
        };
        {
            let mut s = m.lock().unwrap_or_else(|p| p.into_inner());
            match &wrote {
                Ok(()) if !buf.is_empty() => {
                    s.written = last;
                    written.notify_one();
                }
                Ok(()) => {}
                Err(e) => {
                    // Back to the front of the buffer, before anything appended since.
                    let newer = std::mem::take(&mut s.pending);
                    s.pending = buf;
                    s.pending.extend_from_slice(&newer);
                    s.pending_first = first;
                    let msg = format!("writing seqs {first}..={last}: {e}");
                    if s.error.as_deref() != Some(msg.as_str()) {
                        warn!("journal: {msg}; the records are kept and written again");
                    }
                    s.error = Some(msg);
                }
            }
            match (&wrote, synced) {
                (Ok(()), Ok(())) => {
                    if want_sync || shutdown {
                        s.synced = s.written;
                    }
                    if s.error.take().is_some() {
                        warn!("journal: writing again (up to seq {})", s.written);
                    }
                    failures = 0;
                }
                (Ok(()), Err(e)) => {
                    let msg = format!("syncing up to seq {}: {e}", s.written);
                    warn!("journal: {msg}");
                    s.error = Some(msg);
                    failures += 1;
                }
                (Err(_), _) => failures += 1,
            }
            failing.store(s.error.is_some(), std::sync::atomic::Ordering::Release);
            done.notify_all();
            if shutdown
                && s.rebase.is_none()
                && (s.pending.is_empty() || failures >= SHUTDOWN_ATTEMPTS)
            {
                if failures > 0 {
                    warn!(
                        "journal: stopping with seqs {}..={} not written ({})",
                        s.pending_first,
                        s.pending_last,
                        s.error.as_deref().unwrap_or("")
                    );
                }
                return;
            }
        }
        // A closed file can go once every entry in it (all < the next file's first) is acked.
        let next_first: Vec<u64> = closed
            .iter()
            .skip(1)
            .map(|(f, _)| *f)
            .chain(current.as_ref().map(|c| c.0))
            .collect();
        let mut keep = Vec::new();
        for ((first, path), next) in closed.drain(..).zip(next_first) {
            if next > 0 && next - 1 <= release {
                if let Err(e) = std::fs::remove_file(&path) {
                    warn!("removing acknowledged journal {}: {e}", path.display());
                }
            } else {
                keep.push((first, path));
            }
        }
        closed = keep;
    }
}

/// Appends `buf` (records from seq `first` on) to the current file, rolling
/// to a new file first when it is full. A write that fails is cut off again;
/// while that cut has not succeeded (`cut_to`), nothing else goes in the file.
fn write_records(
    dir: &Path,
    current: &mut Option<(u64, File, u64)>,
    closed: &mut Vec<(u64, PathBuf)>,
    cut_to: &mut Option<u64>,
    buf: &[u8],
    first: u64,
    roll_released: bool,
) -> std::io::Result<()> {
    if let (Some(len), Some((_, f, size))) = (*cut_to, current.as_mut()) {
        f.set_len(len)?;
        *size = len;
        *cut_to = None;
    }
    let roll = match &*current {
        None => true,
        Some((_, _, size)) => {
            *size >= FILE_MAX_BYTES || (roll_released && *size >= ROLL_RELEASED_BYTES)
        }
    };
    if roll {
        if let Some((f0, f, _)) = current.take() {
            if let Err(e) = f.sync_data() {
                *current = Some((f0, f, FILE_MAX_BYTES));
                return Err(e);
            }
            closed.push((f0, file_name(dir, f0)));
        }
        let path = file_name(dir, first);
        let f = OpenOptions::new().create(true).append(true).open(&path)?;
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        *current = Some((first, f, 0));
    }
    let (_, f, size) = current.as_mut().expect("a current file after rolling");
    match f.write_all(buf) {
        Ok(()) => {
            *size += buf.len() as u64;
            Ok(())
        }
        Err(e) => {
            // Part of it may be in the file: cut it off (append mode writes at
            // the end, so the next write starts where the cut left it).
            if f.set_len(*size).is_err() {
                *cut_to = Some(*size);
            }
            Err(e)
        }
    }
}

/// Waits on the writer's `done` signal until `finished`, failing when the
/// writer hit an error or the journal closed.
fn wait_writer(
    mut s: std::sync::MutexGuard<'_, Shared>,
    done: &Condvar,
    finished: impl Fn(&Shared) -> bool,
) -> std::io::Result<()> {
    while !finished(&s) {
        if let Some(e) = &s.error {
            return Err(std::io::Error::other(format!("journal: {e}")));
        }
        if s.shutdown {
            return Err(std::io::Error::other("journal closed"));
        }
        s = done.wait(s).unwrap_or_else(|p| p.into_inner());
    }
    Ok(())
}

fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lifeboat_common::protocol::Op;

    fn w(seq: u64, len: usize) -> Entry {
        Entry {
            seq,
            op: Op::Write {
                disk: 0,
                offset: seq * 512,
                data: Bytes::from(vec![seq as u8; len]),
            },
        }
    }

    #[test]
    fn entries_survive_reopen_and_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (j, es) = Journal::open(dir.path()).unwrap();
            assert!(es.is_empty());
            for s in 1..=100 {
                j.append(&w(s, 1000));
            }
            j.sync_blocking(100).unwrap();
            assert_eq!(j.positions(), (100, 100));
        }
        // Tear the last record.
        let files = list_files(dir.path()).unwrap();
        let (_, last) = files.last().unwrap();
        let len = std::fs::metadata(last).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(last)
            .unwrap()
            .set_len(len - 10)
            .unwrap();
        let (j, es) = Journal::open(dir.path()).unwrap();
        assert_eq!(es.len(), 99);
        assert_eq!(es[98], w(99, 1000));
        j.append(&w(100, 10));
        j.sync_blocking(100).unwrap();
        drop(j);
        let (_, es) = Journal::open(dir.path()).unwrap();
        assert_eq!(es.last().unwrap(), &w(100, 10));
    }

    /// Read-back follows the sender across file rolls, finds any span again
    /// after a jump or a reopen, takes records larger than its chunk, and
    /// refuses a rebased journal's old seqs.
    #[test]
    fn spans_read_back_across_files_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let all: Vec<Entry> = (1..=80u64)
            .map(|s| w(s, if s == 40 { 9 << 20 } else { 1 << 20 }))
            .collect();
        let (j, _) = Journal::open(dir.path()).unwrap();
        for e in &all {
            j.append(e);
            // The writer rolls between the batches it writes.
            if e.seq % 8 == 0 {
                j.sync_blocking(e.seq).unwrap();
            }
        }
        j.sync_blocking(80).unwrap();
        assert!(list_files(dir.path()).unwrap().len() >= 2, "rolled");
        let span = |j: &Journal, a: u64, b: u64| {
            let bytes = all[a as usize - 1..b as usize]
                .iter()
                .map(|e| e.encoded_len())
                .sum();
            let got = j.read_span(a, b, bytes, j.rebases()).unwrap();
            assert_eq!(got, all[a as usize - 1..b as usize], "{a}..={b}");
        };
        span(&j, 1, 1);
        span(&j, 2, 39);
        span(&j, 40, 41); // 9 MiB record, twice the chunk
        span(&j, 42, 80); // across the roll
        span(&j, 3, 5); // a jump back
        span(&j, 66, 66);
        drop(j);
        let (j, replay) = Journal::open(dir.path()).unwrap();
        assert_eq!(replay.len(), 80);
        span(&j, 70, 80);
        span(&j, 1, 80);
        assert!(j.read_span(81, 81, 100, 0).is_err(), "beyond the journal");
        // The cursor ends at a file's end, the file is deleted (all of it
        // acknowledged): the next span starts the file named after it.
        let files = list_files(dir.path()).unwrap();
        let k = files[1].0;
        span(&j, 1, k - 1);
        std::fs::remove_file(&files[0].1).unwrap();
        span(&j, k, k + 1);
        j.rebase(100).unwrap();
        let e = j.read_span(70, 71, 100, 0).unwrap_err();
        assert!(format!("{e:#}").contains("rebased before"), "{e:#}");
        let e = j.read_span(70, 71, 100, 1).unwrap_err();
        assert!(format!("{e:#}").contains("no file holds seq 70"), "{e:#}");
    }

    #[test]
    fn rebase_drops_entries_and_numbering_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (j, _) = Journal::open(dir.path()).unwrap();
            for s in 1..=10 {
                j.append(&w(s, 100));
            }
            j.sync_blocking(10).unwrap();
            j.rebase(500).unwrap();
            assert_eq!(j.positions(), (500, 500));
        }
        // Nothing is replayed, and the counter continues after 500.
        let (j, es) = Journal::open(dir.path()).unwrap();
        assert!(es.is_empty());
        assert_eq!(j.positions(), (500, 500));
        j.append(&w(501, 10));
        j.sync_blocking(501).unwrap();
        drop(j);
        let (_, es) = Journal::open(dir.path()).unwrap();
        assert_eq!(es, vec![w(501, 10)]);
    }

    /// Fault seed 217027: the journal's filesystem full, a rebase asked for
    /// while a write of kept records is failing. The rebase used to return the
    /// old write error at once while the writer still did it later, so the
    /// stream kept its old numbering and the file named `base + 1` began with
    /// a later seq: the agent refused to start on it. The rebase must report
    /// what happened, and the journal must reopen either way.
    #[test]
    fn a_rebase_while_writes_fail_is_done_and_reported_as_done() {
        let Some(fs) = SmallFs::mount("4m") else {
            return;
        };
        let filler = fs.0.path().join("filler");
        std::fs::write(&filler, vec![1u8; 2 << 20]).unwrap();
        let dir = fs.0.path().join("journal");
        let (j, _) = Journal::open(&dir).unwrap();
        let mut s = 0;
        while j.failing().is_none() && s < 16 {
            s += 1;
            j.append(&w(s, 512 << 10));
            let _ = j.sync_blocking(s);
        }
        assert!(j.failing().is_some(), "4 MiB with 2 MiB taken must fill");
        // Rebased on 100 while the kept records cannot be written: done, and
        // the failure of those dropped records is over.
        j.rebase(100).unwrap();
        assert_eq!(j.positions(), (100, 100));
        assert_eq!(j.failing(), None);
        j.append(&w(101, 100));
        j.sync_blocking(101).unwrap();
        drop(j);
        let (_, es) = Journal::open(&dir).unwrap();
        assert_eq!(es, vec![w(101, 100)]);
        std::fs::remove_file(&filler).unwrap();
    }

    /// A rebase cut short by a power loss can leave its new empty file beside
    /// older files whose removal was not durable: the entries kept win, the
    /// empty file goes, and numbering goes on after them (before, the next
    /// entries went into the empty file and the journal was refused at the
    /// following start: "does not start at the seq its name says").
    #[test]
    fn an_empty_newest_file_of_an_unfinished_rebase_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (j, _) = Journal::open(dir.path()).unwrap();
            for s in 5..=7 {
                j.append(&w(s, 100));
            }
            j.sync_blocking(7).unwrap();
        }
        let stray = file_name(dir.path(), 101);
        File::create(&stray).unwrap();
        let (j, es) = Journal::open(dir.path()).unwrap();
        assert_eq!(es.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![5, 6, 7]);
        assert!(!stray.exists());
        assert_eq!(j.positions(), (7, 7));
        j.append(&w(8, 100));
        j.sync_blocking(8).unwrap();
        drop(j);
        let (_, es) = Journal::open(dir.path()).unwrap();
        assert_eq!(es.last().map(|e| e.seq), Some(8));
    }

    /// A size-limited tmpfs (root only); `None` where mounting is not allowed.
    struct SmallFs(tempfile::TempDir);

    impl SmallFs {
        fn mount(size: &str) -> Option<SmallFs> {
            let dir = tempfile::tempdir().unwrap();
            let ok = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir.path())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                eprintln!("cannot mount a tmpfs here (not root?): skipping");
                return None;
            }
            Some(SmallFs(dir))
        }
    }

    impl Drop for SmallFs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.0.path())
                .status();
        }
    }

    #[test]
    fn a_full_disk_keeps_the_journal_readable_and_it_recovers_when_space_returns() {
        let Some(fs) = SmallFs::mount("6m") else {
            return;
        };
        let filler = fs.0.path().join("filler");
        std::fs::write(&filler, vec![1u8; 3 << 20]).unwrap();
        let dir = fs.0.path().join("journal");
        let (j, _) = Journal::open(&dir).unwrap();
        let mut acked_by_flush = 0;
        let mut failed = false;
        for s in 1..=12u64 {
            j.append(&w(s, 512 << 10));
            match j.sync_blocking(s) {
                Ok(()) => acked_by_flush = s,
                Err(e) => {
                    assert!(e.to_string().contains("journal"), "{e}");
                    failed = true;
                    break;
                }
            }
        }
        assert!(failed, "6 MiB of entries must not fit");
        assert!(j.failing().is_some());
        // A later FLUSH fails too while nothing can be written...
        assert!(j.sync_blocking(acked_by_flush + 1).is_err());
        // ...positions stay honest: nothing past what the file holds.
        let (written, synced) = j.positions();
        assert!(written <= acked_by_flush + 1 && synced == acked_by_flush);
        // Space returns: the kept records are written by themselves.
        let last = acked_by_flush + 1;
        std::fs::remove_file(&filler).unwrap();
        let t0 = std::time::Instant::now();
        while j.failing().is_some() && t0.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(j.failing(), None);
        j.sync_blocking(last).unwrap();
        j.append(&w(last + 1, 100));
        j.sync_blocking(last + 1).unwrap();
        drop(j);
        let (_, es) = Journal::open(&dir).unwrap();
        let seqs: Vec<u64> = es.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=last + 1).collect::<Vec<_>>());
        assert_eq!(es[last as usize - 1], w(last, 512 << 10));
    }

    #[test]
    fn the_kept_version_1_journal_reads_back() {
        let make = || {
            let mut b = Vec::new();
            encode_record(&mut b, &w(7, 4096));
            encode_record(
                &mut b,
                &Entry {
                    seq: 8,
                    op: Op::Zero {
                        disk: 1,
                        offset: 1 << 20,
                        len: 65536,
                    },
                },
            );
            encode_record(
                &mut b,
                &Entry {
                    seq: 9,
                    op: Op::Tag {
                        kind: lifeboat_common::protocol::TagKind::Crash,
                        source: None,
                        time_ms: 1_700_000_000_000,
                        label: "fixture".into(),
                    },
                },
            );
            b
        };
        let bytes = formats::read_fixture::<JournalRecord>("journal", make);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(file_name(dir.path(), 7), bytes).unwrap();
        let (_, es) = Journal::open(dir.path()).unwrap();
        let seqs: Vec<u64> = es.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![7, 8, 9]);
        assert_eq!(es[0], w(7, 4096));
    }

    #[test]
    fn a_record_of_another_version_is_named_not_cut() {
        let dir = tempfile::tempdir().unwrap();
        let mut buf = Vec::new();
        encode_record(&mut buf, &w(1, 10));
        let at = buf.len();
        encode_record(&mut buf, &w(2, 10));
        buf[at + 4..at + 6].copy_from_slice(&9u16.to_be_bytes());
        let path = file_name(dir.path(), 1);
        std::fs::write(&path, &buf).unwrap();
        let e = format!("{:#}", Journal::open(dir.path()).err().expect("refused"));
        assert!(e.contains("version 9"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), buf, "nothing was cut");
    }

    #[test]
    fn seqs_that_are_not_contiguous_are_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut buf = Vec::new();
        encode_record(&mut buf, &w(1, 10));
        encode_record(&mut buf, &w(3, 10));
        std::fs::write(file_name(dir.path(), 1), &buf).unwrap();
        let e = Journal::open(dir.path())
            .err()
            .expect("a gap must be refused");
        assert!(format!("{e:#}").contains("expected 2"), "{e:#}");
    }

    #[test]
    fn acknowledged_files_are_deleted_but_newest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path()).unwrap();
        let big = 8 * 1024 * 1024;
        for s in 1..=20 {
            j.append(&w(s, big)); // 160 MiB: at least 3 files
            j.sync_blocking(s).unwrap();
        }
        assert!(list_files(dir.path()).unwrap().len() >= 3);
        j.release(20);
        j.append(&w(21, 1));
        j.sync_blocking(21).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        j.sync_blocking(21).unwrap();
        let files = list_files(dir.path()).unwrap();
        assert_eq!(files.len(), 1, "{files:?}");
        drop(j);
        let (_, es) = Journal::open(dir.path()).unwrap();
        assert_eq!(es.last().unwrap().seq, 21);
    }
}
