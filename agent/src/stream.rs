//! The machine-wide write stream: one sequence for all disks, the journal, the
//! queue of unacknowledged entries, and consistency tags.
//!
//! Invariants:
//! - a write's seq is taken after it completed on the local disk and before it is
//!   acknowledged to the writer, under one lock that also journals and queues it,
//!   so seq order = journal order = send order, and every prefix is crash-consistent;
//! - a tag takes the write gate exclusively: in-flight writes drain (bounded by
//!   `TAG_DRAIN_TIMEOUT`), the tag takes the next seq, writes resume; a tag
//!   that drained starts hashing its disks' checksums (`pointsum.rs`), which
//!   later arrive as a SUMS entry;
//! - positions `captured ≥ sent ≥ acked` live in [`SenderState`]; only entries the
//!   journal has handed to the OS are sent, so an agent killed and restarted never
//!   gives a seq the process server already holds to a different write;
//! - writes never wait for the process server: when unacknowledged entries reach
//!   `journal-max-bytes` the stream goes to `bitmap` state, where writes are only
//!   marked dirty (see `dirty.rs`); once the queue drains to half, `resync`
//!   resends the dirty regions, a crash-consistent tag is placed and the stream
//!   is `streaming` again. No recovery point is taken outside `streaming`.
//! - a planned failover's final point (`finalpoint.rs`) refuses writes
//!   before it takes the write gate exclusively for its tag, and every write
//!   checks [`Stream::writes_refused`] again under the shared gate: a write
//!   that passed the check holds the gate, so its seq is below the tag, and
//!   none is acknowledged after it;
//! - the replication state (`replication.rs`) changes only under its one lock,
//!   together with whatever must happen atomically with the change (a capture,
//!   a dirty mark); each change is logged and published on a `watch` channel.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lifeboat_common::protocol::{Entry, Frame, Op, TagKind, TagSource};
use lifeboat_common::session::{Outgoing, SenderState};
use tokio::sync::{Notify, OwnedRwLockWriteGuard, RwLock, RwLockReadGuard};

use tracing::warn;

use crate::journal::Journal;
use crate::pointsum::{PointSums, SUMS_WAIT};

pub use crate::replication::Mode;
use crate::replication::{Pressure, Replication, Snapshot, Transition};

/// Whether a write went into the stream or only into the dirty map.
pub enum Captured {
    Seq(u64),
    Dirty,
}

/// `queue-memory-bytes` when not configured: queued writes kept in memory.
pub const DEFAULT_QUEUE_MEMORY_BYTES: u64 = 32 << 20;

/// How often paced work looks whether a failing journal writes again.
const JOURNAL_RETRY_POLL: Duration = Duration::from_millis(200);

/// The longest a tag waits for in-flight writes before it is placed anyway.
pub const TAG_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Stream {
    state: Mutex<SenderState>,
    journal: Journal,
    max_bytes: usize,
    /// Writes hold it shared; a tag, and a group hold (`grouppoint.rs`),
    /// exclusively.
    gate: Arc<RwLock<()>>,
    /// Acknowledgements freed journal space.
    space: Notify,
    /// The replication state; see `replication.rs`.
    repl: Mutex<Replication>,
    /// Every new state of `repl`.
    changes: tokio::sync::watch::Sender<Snapshot>,
    /// Bytes resent by resyncs since start (dirty regions, unclean restart).
    pub resync_bytes: std::sync::atomic::AtomicU64,
    /// Hashes each point's disk checksums (`pointsum.rs`); set once the
    /// disks exist.
    point_sums: std::sync::OnceLock<Arc<PointSums>>,
    /// Writes are refused (a planned failover moved the machine away); the
    /// reason is in `refused_why`.
    refused: std::sync::atomic::AtomicBool,
    refused_why: Mutex<String>,
}

/// The replication state, locked: changes are published when it is dropped.
pub struct ReplGuard<'a> {
    repl: std::sync::MutexGuard<'a, Replication>,
    changes: &'a tokio::sync::watch::Sender<Snapshot>,
}

impl std::ops::Deref for ReplGuard<'_> {
    type Target = Replication;
    fn deref(&self) -> &Replication {
        &self.repl
    }
}

impl std::ops::DerefMut for ReplGuard<'_> {
    fn deref_mut(&mut self) -> &mut Replication {
        &mut self.repl
    }
}

impl Drop for ReplGuard<'_> {
    fn drop(&mut self) {
        let now = self.repl.snapshot();
        self.changes.send_if_modified(|old| {
            if old == now {
                return false;
            }
            *old = now.clone();
            true
        });
    }
}

fn log_transition(t: Option<Transition>) {
    if let Some(t) = t {
        warn!(
            "replication state {} -> {}: {}",
            t.from.as_str(),
            t.to.as_str(),
            t.reason
        );
    }
}

/// A snapshot of the stream's positions.
#[derive(Debug, Clone, Copy, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Positions {
    pub captured: u64,
    pub sent: u64,
    pub acked: u64,
    pub queued_bytes: usize,
    /// The part of `queued_bytes` held in memory (at most `queue-memory-bytes`,
    /// tags aside); the rest is read back from the journal.
    pub queued_in_memory_bytes: usize,
    pub journal_written: u64,
    pub journal_synced: u64,
}

impl Stream {
    /// Builds the stream from a journal and the entries it still holds, with
    /// the default memory limit of its queue.
    pub fn new(journal: Journal, replay: Vec<Entry>, max_bytes: u64) -> Arc<Stream> {
        Self::with_memory(journal, replay, max_bytes, DEFAULT_QUEUE_MEMORY_BYTES)
    }

    /// [`Self::new`] keeping at most `memory_max` bytes of queued writes in
    /// memory (`queue-memory-bytes`); the rest is read back from the journal
    /// when it is sent.
    pub fn with_memory(
        journal: Journal,
        replay: Vec<Entry>,
        max_bytes: u64,
        memory_max: u64,
    ) -> Arc<Stream> {
        let start = replay
            .first()
            .map(|e| e.seq - 1)
            .unwrap_or(journal.positions().0);
        let mut state = SenderState::with_memory_limit(start, memory_max as usize);
        for mut e in replay {
            // A replayed write's data is a slice of its whole journal file:
            // one that stays in memory gets its own copy, so that the files'
            // buffers are freed once replay is done.
            let held = state.would_hold(&e);
            if let (Op::Write { data, .. }, true) = (&mut e.op, held) {
                *data = bytes::Bytes::copy_from_slice(data);
            }
            state.push(e);
        }
        let restored = state.captured();
        state.own_upto(restored);
        Arc::new(Stream {
            state: Mutex::new(state),
            journal,
            max_bytes: max_bytes as usize,
            gate: Arc::new(RwLock::new(())),
            space: Notify::new(),
            repl: Mutex::new(Replication::default()),
            changes: tokio::sync::watch::channel(Replication::default().snapshot().clone()).0,
            resync_bytes: std::sync::atomic::AtomicU64::new(0),
            point_sums: std::sync::OnceLock::new(),
            refused: std::sync::atomic::AtomicBool::new(false),
            refused_why: Mutex::new(String::new()),
        })
    }

    /// Refuses every write from now on, with `why` (see the header).
    pub fn refuse_writes(&self, why: String) {
        use std::sync::atomic::Ordering;
        *self.refused_why.lock().unwrap_or_else(|p| p.into_inner()) = why;
        self.refused.store(true, Ordering::Release);
    }

    /// Takes writes again.
    pub fn accept_writes(&self) {
        self.refused
            .store(false, std::sync::atomic::Ordering::Release);
    }

    /// Why writes are refused, if they are (check it again under a write
    /// permit); one atomic load when they are not.
    pub fn writes_refused(&self) -> Option<String> {
        if !self.refused.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        Some(
            self.refused_why
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }

    /// Whether a point's checksums are being hashed now.
    pub fn point_sums_busy(&self) -> bool {
        self.point_sums.get().is_some_and(|p| p.busy())
    }

    /// From now on every tag placed after drained writes gets its disks'
    /// checksums (`pointsum.rs`).
    pub fn set_point_sums(&self, sums: Arc<PointSums>) {
        let _ = self.point_sums.set(sums);
    }

    /// Waits up to `SUMS_WAIT` for the previous point's checksums (writes go
    /// on meanwhile), so that the next tag gets its own.
    pub async fn wait_point_sums(&self) {
        if let Some(p) = self.point_sums.get() {
            p.wait_idle(SUMS_WAIT).await;
        }
    }

    /// How many times the numbering was rebased: an entry computed for a seq
    /// of an older numbering must not be captured in a newer one.
    pub fn rebases(&self) -> u64 {
        self.journal.rebases()
    }

    /// [`Self::capture`], only if the numbering is still the one counted by
    /// `rebases` (checked under the state lock, which a rebase holds).
    pub fn capture_in_numbering(&self, op: Op, rebases: u64) -> Option<u64> {
        let mut s = self.lock_state();
        (self.journal.rebases() == rebases).then(|| self.append(&mut s, op))
    }

    /// Numbers, journals and queues `op` under the state lock `s`.
    fn append(&self, s: &mut SenderState, op: Op) -> u64 {
        let e = Entry {
            seq: s.next_seq(),
            op,
        };
        self.journal.append(&e);
        let seq = e.seq;
        s.push(e);
        seq
    }

    /// Signalled when the journal wrote more entries (which may now be sent).
    pub fn journal_written(&self) -> Arc<Notify> {
        self.journal.written.clone()
    }

    /// Frames of entries the journal already holds, up to about `max_bytes`;
    /// spilled writes are read back from the journal on a blocking thread,
    /// outside the state lock.
    pub async fn transmit(self: &Arc<Self>, max_bytes: usize) -> anyhow::Result<Vec<Frame>> {
        let (out, rebases) = {
            let mut s = self.lock_state();
            // A rebase holds the state lock: the spans are of this numbering.
            let (written, _) = self.journal.positions();
            let rebases = self.journal.rebases();
            (s.poll_transmit_upto(max_bytes, written), rebases)
        };
        let spilled = out.iter().any(|o| matches!(o, Outgoing::Spilled { .. }));
        let resolve = move |journal: &Journal| -> anyhow::Result<Vec<Frame>> {
            out.into_iter()
                .map(|o| match o {
                    Outgoing::Frame(f) => Ok(f),
                    Outgoing::Spilled { first, last, bytes } => Ok(Frame::Writes(
                        journal.read_span(first, last, bytes, rebases)?,
                    )),
                })
                .collect()
        };
        if !spilled {
            return resolve(&self.journal); // no I/O
        }
        let me = self.clone();
        tokio::task::spawn_blocking(move || resolve(&me.journal))
            .await
            .map_err(|e| anyhow::anyhow!("reading spilled writes back from the journal: {e}"))?
    }

    pub fn lock_state(&self) -> std::sync::MutexGuard<'_, SenderState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn positions(&self) -> Positions {
        let (journal_written, journal_synced) = self.journal.positions();
        let s = self.lock_state();
        Positions {
            captured: s.captured(),
            sent: s.sent(),
            acked: s.acked(),
            queued_bytes: s.queued_bytes(),
            queued_in_memory_bytes: s.held_bytes(),
            journal_written,
            journal_synced,
        }
    }

    /// Held by a write from before it touches the disk until its seq is taken.
    /// Never waits for the process server.
    pub async fn write_permit(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().await
    }

    /// Holds new writes (they wait for the guard to drop) once the writes
    /// in flight have completed and taken their seqs: a consistency group's
    /// prepare. The caller bounds the wait and the hold.
    pub async fn hold_writes(&self) -> OwnedRwLockWriteGuard<()> {
        self.gate.clone().write_owned().await
    }

    /// Places a tag while the caller holds the writes ([`Self::hold_writes`]);
    /// `None` when the replica cannot be consistent now.
    pub fn tag_held(
        &self,
        _hold: &OwnedRwLockWriteGuard<()>,
        kind: TagKind,
        source: Option<TagSource>,
        label: &str,
    ) -> Option<u64> {
        let r = self.repl();
        if r.why_inconsistent().is_some() {
            return None;
        }
        let seq = self.capture(Op::Tag {
            kind,
            source,
            time_ms: lifeboat_common::now_ms(),
            label: label.to_string(),
        });
        if let Some(p) = self.point_sums.get() {
            p.begin(seq, true);
        }
        drop(r);
        Some(seq)
    }

    /// Waits until unacknowledged entries are below `fraction` of the bound
    /// and the journal writes (initial sync and resync pace themselves with it).
    pub async fn wait_space(&self, fraction: f64) {
        let limit = (self.max_bytes as f64 * fraction) as usize;
        loop {
            let space = self.space.notified();
            let failing = self.journal.failing().is_some();
            if !failing && self.lock_state().queued_bytes() < limit {
                return;
            }
            if failing {
                // Nothing announces the journal's recovery: look again soon.
                tokio::select! {
                    _ = space => {}
                    _ = tokio::time::sleep(JOURNAL_RETRY_POLL) => {}
                }
            } else {
                space.await;
            }
        }
    }

    /// The replication state, locked (changes are published on unlock).
    pub fn repl(&self) -> ReplGuard<'_> {
        ReplGuard {
            repl: self.repl.lock().unwrap_or_else(|p| p.into_inner()),
            changes: &self.changes,
        }
    }

    /// Receives every change of the replication state.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Snapshot> {
        self.changes.subscribe()
    }

    pub fn mode(&self) -> (Mode, String) {
        let r = self.repl();
        (r.mode(), r.snapshot().reason.clone())
    }

    /// Like [`Self::capture`] for a data write, unless the journal is full or
    /// cannot write: then the stream goes to `bitmap` and `mark_dirty`
    /// records the range. The decision, the capture and the marking happen
    /// under the state lock, so a transition out of `resync`
    /// ([`Self::finish_resync`]) never misses a dirty write.
    pub fn capture_or_dirty(&self, op: Op, mark_dirty: impl FnOnce()) -> Captured {
        self.capture_or_dirty_then(op, || None, mark_dirty)
    }

    /// [`Self::capture_or_dirty`], and when `op` is captured, the entry
    /// `then` makes right after it, under the same state lock: no rebase
    /// falls between them, so both are in one numbering at consecutive
    /// seqs (HASHES after its write; the receiver checks the adjacency).
    /// `then` is left out rather than fill the journal.
    pub fn capture_or_dirty_then(
        &self,
        op: Op,
        then: impl FnOnce() -> Option<Op>,
        mark_dirty: impl FnOnce(),
    ) -> Captured {
        let mut r = self.repl();
        let pressure = match self.journal.failing() {
            Some(e) => Some(Pressure::JournalFailing(e)),
            None if self.lock_state().queued_bytes() >= self.max_bytes => {
                Some(Pressure::JournalFull(self.max_bytes))
            }
            None => None,
        };
        match r.on_write(pressure) {
            Ok(()) => {
                let mut s = self.lock_state();
                let seq = self.append(&mut s, op);
                if s.queued_bytes() < self.max_bytes {
                    if let Some(then) = then() {
                        self.append(&mut s, then);
                    }
                }
                Captured::Seq(seq)
            }
            Err(t) => {
                log_transition(t);
                mark_dirty();
                Captured::Dirty
            }
        }
    }

    /// A write failed on the local disk after some of it may have reached the
    /// disk: the replica may differ there. Under the state lock, `mark_dirty`
    /// records the range and the stream goes to `bitmap` (no point until the
    /// resync of the dirty regions has sent what the disk holds).
    pub fn degrade(&self, reason: &str, mark_dirty: impl FnOnce()) {
        let mut r = self.repl();
        mark_dirty();
        log_transition(r.degrade(reason));
    }

    /// Why the journal cannot write now, if it cannot.
    pub fn journal_failing(&self) -> Option<String> {
        self.journal.failing()
    }

    /// Why no recovery point can be taken now, or `None` when one can.
    pub fn why_inconsistent(&self) -> Option<String> {
        self.repl().why_inconsistent()
    }

    /// `resync` → `streaming` if `no_dirty` still holds under the state lock.
    pub fn finish_resync(&self, no_dirty: impl Fn() -> bool) -> bool {
        let mut r = self.repl();
        let t = r.finish_resync(no_dirty());
        let done = t.is_some();
        log_transition(t);
        done
    }

    /// Whether a checksum resync owns the `resync` state now.
    pub fn checksum_active(&self) -> bool {
        self.repl().snapshot().checksum_active
    }

    /// A checksum resync takes the `resync` state (from `streaming`, or keeping
    /// `bitmap`/`resync`, whose dirty regions then wait for it; during an
    /// initial sync, points wait for both). Joining one already pending is fine.
    pub fn begin_checksum_resync(&self, reason: &str) {
        let t = self.repl().begin_checksum_resync(reason);
        log_transition(t);
    }

    /// Any state → `resync` for the dirty-region resync, with the inconsistent
    /// mark captured under the state lock: no write slips in between.
    pub fn enter_resync(&self, reason: &str) {
        let mut r = self.repl();
        log_transition(r.enter_resync(reason));
        self.mark_inconsistent("resync of dirty regions");
    }

    /// Records in the stream that from here until the next tag the replica is
    /// not crash-consistent (a sync or resync starts sending): failover at the
    /// stream's end is then refused by name.
    pub fn mark_inconsistent(&self, label: &str) {
        self.capture(Op::Inconsistent {
            label: label.to_string(),
        });
    }

    /// A welcome confirmed the numbering: the receiver's stream is this agent's.
    pub fn mark_welcomed(&self) {
        self.repl().welcome();
    }

    /// Waits for the first welcome that confirmed the numbering (the initial
    /// sync waits for it: if the agent lost its state, a checksum resync
    /// replaces the sync, and copying before knowing would be wasted).
    pub async fn wait_welcomed(&self) {
        let mut rx = self.subscribe();
        let _ = rx.wait_for(|s| s.welcomed).await;
    }

    /// Whether an initial sync still runs.
    pub fn syncing(&self) -> bool {
        self.repl().snapshot().syncing > 0
    }

    /// Initial syncs stop: a checksum resync of every disk replaces them.
    pub fn supersede_sync(&self) {
        self.repl().supersede_sync();
    }

    pub fn sync_superseded(&self) -> bool {
        self.repl().snapshot().sync_superseded
    }

    /// Drops every unacknowledged entry and continues the numbering after
    /// `base` (the receiver's durable position), in the journal and the queue,
    /// with `first` as the first entries of the new numbering. Only for an
    /// agent that lost its state, once a checksum resync of every disk is
    /// recorded: it repairs whatever the dropped entries changed.
    /// Returns once `first` is durable in the journal.
    pub fn rebase(&self, base: u64, first: Vec<Op>) -> std::io::Result<()> {
        let last = {
            let mut s = self.lock_state();
            self.journal.rebase(base)?;
            for (seq, label) in s.rebase(base) {
                warn!(
                    "recovery point at seq {seq} ({label:?}) was not acknowledged before the rebase and is dropped with it: take it again"
                );
            }
            for op in first {
                let e = Entry {
                    seq: s.next_seq(),
                    op,
                };
                self.journal.append(&e);
                s.push(e);
            }
            s.captured()
        };
        self.space.notify_waiters();
        self.journal.sync_blocking(last)
    }

    /// Ends a checksum resync: `resync` → `streaming` when `no_dirty` holds
    /// (otherwise the dirty-region resync, which waited, finishes the state).
    /// Returns whether the stream is `streaming` again.
    pub fn end_checksum_resync(&self, no_dirty: impl Fn() -> bool) -> bool {
        let mut r = self.repl();
        let (_, t) = r.end_checksum_resync(no_dirty());
        let done = t.is_some();
        log_transition(t);
        done
    }

    /// Gives a completed operation its seq, journals and queues it.
    pub fn capture(&self, op: Op) -> u64 {
        let mut s = self.lock_state();
        self.append(&mut s, op)
    }

    pub fn begin_sync(&self) {
        self.repl().begin_sync();
    }

    pub fn end_sync(&self) {
        self.repl().end_sync();
    }

    /// Whether the replica can be consistent: no disk is in its initial sync and
    /// the stream is `streaming`.
    pub fn consistent(&self) -> bool {
        self.why_inconsistent().is_none()
    }

    /// Places a consistency tag after draining in-flight writes; returns its seq,
    /// or `None` when the replica cannot be consistent now (initial sync, bitmap
    /// or resync state).
    /// An app-consistent tag does not wait: its caller waited with
    /// [`Self::wait_point_sums`] before freezing the filesystems.
    pub async fn tag(&self, kind: TagKind, source: Option<TagSource>, label: &str) -> Option<u64> {
        if kind != TagKind::App {
            self.wait_point_sums().await;
        }
        let guard = tokio::time::timeout(TAG_DRAIN_TIMEOUT, self.gate.write()).await;
        if guard.is_err() {
            warn!("writes did not drain within {TAG_DRAIN_TIMEOUT:?}; placing the {} tag without draining", kind.as_str());
        }
        // Check and place under the state lock: a write that goes dirty cannot
        // slip in between (even when the drain above timed out).
        let r = self.repl();
        if r.why_inconsistent().is_some() {
            return None;
        }
        let seq = self.capture(Op::Tag {
            kind,
            source,
            time_ms: lifeboat_common::now_ms(),
            label: label.to_string(),
        });
        if let Some(p) = self.point_sums.get() {
            p.begin(seq, guard.is_ok());
        }
        drop(r);
        Some(seq)
    }

    /// Makes every captured entry durable in the local journal.
    pub async fn sync_journal(self: &Arc<Self>) -> std::io::Result<()> {
        // Read with the rebase count under the state lock (a rebase holds it):
        // a rebase in between then ends the wait instead of stranding it.
        let (upto, rebases) = {
            let s = self.lock_state();
            (s.captured(), self.journal.rebases())
        };
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.journal.sync_blocking_since(upto, rebases))
            .await
            .map_err(std::io::Error::other)?
    }

    /// The receiver acknowledged up to `durable` (already applied to the state).
    pub fn released(&self, acked: u64) {
        self.journal.release(acked);
        self.space.notify_waiters();
    }

    pub fn close(&self) {
        self.journal.close();
    }
}
