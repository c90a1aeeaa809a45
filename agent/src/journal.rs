//! The agent's local journal: an append-only log of captured entries, in rolling
//! files, so that captured-but-unacknowledged writes survive an agent restart.
//!
//! Files are `journal/<first-seq:016x>.jnl`, each a sequence of records:
//!
//! ```text
//! magic b"LBJR" | version u16 (1) | length u32 | crc32c u32 | entry (protocol encoding)
//! ```
//!
//! Appends go to an in-memory buffer (under the caller's lock, cheap); one writer
//! thread moves the buffer to the current file, rolls files at `FILE_MAX_BYTES`,
//! fdatasyncs on request ([`Journal::sync`], used by FLUSH and FUA), and deletes
//! files whose every entry is acknowledged (the newest file is kept so the seq
//! counter survives). On open, a torn record at the tail of the newest file is
//! cut off; damage anywhere else is an error naming the file.
//!
//! [`Journal::rebase`] drops every file and starts an empty one named after the
//! new base (the agent lost its state and continues the receiver's numbering):
//! an empty newest file still fixes the counter.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use lifeboat_common::codec::{Reader, Writer};
use lifeboat_common::protocol::Entry;
use tracing::warn;

const MAGIC: [u8; 4] = *b"LBJR";
const VERSION: u16 = 1;
const HEADER: usize = 14;
pub const FILE_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// The writer moves the buffer to the file at least this often...
const WRITE_INTERVAL: Duration = Duration::from_millis(20);
/// ...or as soon as it holds this much.
const WRITE_THRESHOLD: usize = 1024 * 1024;

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
    error: Option<String>,
}

pub struct Journal {
    shared: Arc<(Mutex<Shared>, Condvar, Condvar)>,
    /// Signalled whenever more entries reached the OS (the sender waits for it).
    pub written: Arc<tokio::sync::Notify>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

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
fn encode_record(out: &mut Vec<u8>, e: &Entry) {
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.put_u16(VERSION);
    out.put_u32(0);
    out.put_u32(0);
    e.encode(out);
    let len = (out.len() - start - HEADER) as u32;
    let crc = crc32c::crc32c(&out[start + HEADER..]);
    out[start + 6..start + 10].copy_from_slice(&len.to_be_bytes());
    out[start + 10..start + 14].copy_from_slice(&crc.to_be_bytes());
}

/// Reads the records of one file; returns them and the length of the valid prefix.
fn read_file(path: &Path) -> Result<(Vec<Entry>, u64, Option<String>)> {
    let data =
        Bytes::from(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?);
    let mut entries = Vec::new();
    let mut pos = 0usize;
    while pos < data.len() {
        let rec = &data[pos..];
        let mut r = Reader::new(rec);
        let parsed = (|| {
            let magic: [u8; 4] = r.array("journal magic").ok()?;
            let version = r.u16("journal version").ok()?;
            let len = r.u32("journal length").ok()? as usize;
            let crc = r.u32("journal crc").ok()?;
            if magic != MAGIC || version != VERSION || rec.len() < HEADER + len {
                return None;
            }
            let body = &rec[HEADER..HEADER + len];
            if crc32c::crc32c(body) != crc {
                return None;
            }
            Some(len)
        })();
        let Some(len) = parsed else {
            return Ok((
                entries,
                pos as u64,
                Some(format!("bad record at byte {pos}")),
            ));
        };
        let body = data.slice(pos + HEADER..pos + HEADER + len);
        let e = Entry::decode(&mut Reader::new(&body), &body)
            .with_context(|| format!("{}: record at byte {pos}", path.display()))?;
        entries.push(e);
        pos += HEADER + len;
    }
    Ok((entries, pos as u64, None))
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
        // An empty newest file (after a rebase) still says where numbering goes on.
        let newest_base = files.last().map(|(first, _)| first.saturating_sub(1));
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
        let thread = std::thread::Builder::new()
            .name("journal".into())
            .spawn(move || writer_thread(dir2, s2, current, w2))
            .context("starting the journal writer")?;
        Ok((
            Journal {
                shared,
                written,
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

    /// Drops every entry and continues after `base`: blocks until the files are
    /// replaced by one empty file named `base + 1` (synced). The caller holds
    /// the stream's state lock, so no append interleaves.
    pub fn rebase(&self, base: u64) -> std::io::Result<()> {
        let (m, work, done) = &*self.shared;
        let mut s = m.lock().unwrap_or_else(|p| p.into_inner());
        s.pending.clear();
        s.pending_first = base + 1;
        s.pending_last = base;
        s.rebase = Some(base);
        let before = s.rebases;
        work.notify_one();
        wait_writer(s, done, |s| s.rebases != before)
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

    /// The last seq handed to the OS and the last one synced.
    pub fn positions(&self) -> (u64, u64) {
        let (m, _, _) = &*self.shared;
        let s = m.lock().unwrap_or_else(|p| p.into_inner());
        (s.written, s.synced)
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
) {
    let (m, work, done) = &*shared;
    let mut closed: Vec<(u64, PathBuf)> = list_files(&dir).unwrap_or_default();
    closed.retain(|(first, _)| current.as_ref().map(|c| c.0) != Some(*first));
    loop {
        let rebase = m.lock().unwrap_or_else(|p| p.into_inner()).rebase;
        if let Some(base) = rebase {
            let result = (|| -> std::io::Result<()> {
                drop(current.take());
                for (_, path) in closed.drain(..) {
                    remove_if_present(&path)?;
                }
                for (_, path) in list_files(&dir).map_err(std::io::Error::other)? {
                    remove_if_present(&path)?;
                }
                let f = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(file_name(&dir, base + 1))?;
                f.sync_all()?;
                File::open(&dir)?.sync_all()?;
                current = Some((base + 1, f, 0));
                Ok(())
            })();
            let mut s = m.lock().unwrap_or_else(|p| p.into_inner());
            match result {
                Ok(()) => {
                    s.written = base;
                    s.synced = base;
                    s.sync_requested = base;
                    s.release_upto = base;
                    s.rebases += 1;
                }
                Err(e) => s.error = Some(format!("rebasing on seq {base}: {e}")),
            }
            s.rebase = None;
            done.notify_all();
            continue;
        }
        let (buf, first, last, want_sync, release, shutdown) = {
            let mut s = m.lock().unwrap_or_else(|p| p.into_inner());
            if s.pending.is_empty()
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
                s.sync_requested > s.synced,
                s.release_upto,
                s.shutdown,
            )
        };
        let result = (|| -> std::io::Result<()> {
            if !buf.is_empty() {
                let roll = match &current {
                    None => true,
                    Some((_, _, size)) => *size >= FILE_MAX_BYTES,
                };
                if roll {
                    if let Some((f0, f, _)) = current.take() {
                        f.sync_data()?;
                        closed.push((f0, file_name(&dir, f0)));
                    }
                    let path = file_name(&dir, first);
                    let f = OpenOptions::new().create(true).append(true).open(&path)?;
                    if let Ok(d) = File::open(&dir) {
                        let _ = d.sync_all();
                    }
                    current = Some((first, f, 0));
                }
                let (_, f, size) = current.as_mut().expect("a current file after rolling");
                f.write_all(&buf)?;
                *size += buf.len() as u64;
            }
            if want_sync || shutdown {
                if let Some((_, f, _)) = &current {
                    f.sync_data()?;
                }
            }
            Ok(())
        })();
        {
            let mut s = m.lock().unwrap_or_else(|p| p.into_inner());
            match result {
                Ok(()) => {
                    if !buf.is_empty() {
                        s.written = last;
                        written.notify_one();
                    }
                    if want_sync || shutdown {
                        s.synced = s.written;
                    }
                }
                Err(e) => s.error = Some(e.to_string()),
            }
            done.notify_all();
            if shutdown && s.pending.is_empty() {
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
