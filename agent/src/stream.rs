//! The machine-wide write stream: one sequence for all disks, the journal, the
//! queue of unacknowledged entries, and consistency tags.
//!
//! Invariants:
//! - a write's seq is taken after it completed on the local disk and before it is
//!   acknowledged to the writer, under one lock that also journals and queues it,
//!   so seq order = journal order = send order, and every prefix is crash-consistent;
//! - a tag takes the write gate exclusively: in-flight writes drain (bounded by
//!   `TAG_DRAIN_TIMEOUT`), the tag takes the next seq, writes resume;
//! - positions `captured ≥ sent ≥ acked` live in [`SenderState`]; only entries the
//!   journal has handed to the OS are sent, so an agent killed and restarted never
//!   gives a seq the process server already holds to a different write;
//! - writes never wait for the process server: when unacknowledged entries reach
//!   `journal-max-bytes` the stream goes to `bitmap` state, where writes are only
//!   marked dirty (see `dirty.rs`); once the queue drains to half, `resync`
//!   resends the dirty regions, a crash-consistent tag is placed and the stream
//!   is `streaming` again. No recovery point is taken outside `streaming`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lifeboat_common::protocol::{Entry, Op, TagKind};
use lifeboat_common::session::SenderState;
use tokio::sync::{Notify, RwLock, RwLockReadGuard};

use tracing::warn;

use crate::journal::Journal;

/// Replication state of the machine's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Streaming,
    Bitmap,
    Resync,
}

/// Whether a write went into the stream or only into the dirty map.
pub enum Captured {
    Seq(u64),
    Dirty,
}

/// The longest a tag waits for in-flight writes before it is placed anyway.
pub const TAG_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Stream {
    state: Mutex<SenderState>,
    journal: Journal,
    max_bytes: usize,
    gate: RwLock<()>,
    /// Acknowledgements freed journal space.
    space: Notify,
    mode: Mutex<(Mode, String)>,
    /// Bytes resent by resyncs since start (dirty regions, unclean restart).
    pub resync_bytes: std::sync::atomic::AtomicU64,
    /// Disks whose initial sync is not finished: no recovery point meanwhile.
    syncing: std::sync::atomic::AtomicUsize,
    /// A checksum resync owns the `resync` state (see `checksum.rs`), running
    /// or waiting for the link to resume.
    checksum_active: std::sync::atomic::AtomicBool,
    /// A checksum resync of every disk replaces the initial sync (the replica
    /// already holds data: the agent lost its state).
    sync_superseded: std::sync::atomic::AtomicBool,
    /// A welcome confirmed this agent's numbering (no rebase needed).
    welcomed: tokio::sync::watch::Sender<bool>,
}

/// A snapshot of the stream's positions.
#[derive(Debug, Clone, Copy, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Positions {
    pub captured: u64,
    pub sent: u64,
    pub acked: u64,
    pub queued_bytes: usize,
    pub journal_written: u64,
    pub journal_synced: u64,
}

impl Stream {
    /// Builds the stream from a journal and the entries it still holds.
    pub fn new(journal: Journal, replay: Vec<Entry>, max_bytes: u64) -> Arc<Stream> {
        let start = replay
            .first()
            .map(|e| e.seq - 1)
            .unwrap_or(journal.positions().0);
        let mut state = SenderState::new(start);
        for e in replay {
            state.push(e);
        }
        let restored = state.captured();
        state.own_upto(restored);
        Arc::new(Stream {
            state: Mutex::new(state),
            journal,
            max_bytes: max_bytes as usize,
            gate: RwLock::new(()),
            space: Notify::new(),
            syncing: std::sync::atomic::AtomicUsize::new(0),
            mode: Mutex::new((Mode::Streaming, "started".into())),
            resync_bytes: std::sync::atomic::AtomicU64::new(0),
            checksum_active: std::sync::atomic::AtomicBool::new(false),
            sync_superseded: std::sync::atomic::AtomicBool::new(false),
            welcomed: tokio::sync::watch::channel(false).0,
        })
    }

    /// Signalled when the journal wrote more entries (which may now be sent).
    pub fn journal_written(&self) -> Arc<Notify> {
        self.journal.written.clone()
    }

    /// Frames of entries the journal already holds, up to about `max_bytes`.
    pub fn poll_transmit(&self, max_bytes: usize) -> Vec<lifeboat_common::protocol::Frame> {
        let (written, _) = self.journal.positions();
        self.lock_state().poll_transmit_upto(max_bytes, written)
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
            journal_written,
            journal_synced,
        }
    }

    /// Held by a write from before it touches the disk until its seq is taken.
    /// Never waits for the process server.
    pub async fn write_permit(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().await
    }

    /// Waits until unacknowledged entries are below `fraction` of the bound
    /// (initial sync and resync pace themselves with it).
    pub async fn wait_space(&self, fraction: f64) {
        let limit = (self.max_bytes as f64 * fraction) as usize;
        loop {
            let space = self.space.notified();
            if self.lock_state().queued_bytes() < limit {
                return;
            }
            space.await;
        }
    }

    pub fn mode(&self) -> (Mode, String) {
        self.mode.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Like [`Self::capture`] for a data write, unless the journal is full: then
    /// the stream goes to `bitmap` and `mark_dirty` records the range. The
    /// decision, the capture and the marking happen under the mode lock, so a
    /// transition out of `resync` ([`Self::finish_resync`]) never misses a
    /// dirty write.
    pub fn capture_or_dirty(&self, op: Op, mark_dirty: impl FnOnce()) -> Captured {
        let mut m = self.mode.lock().unwrap_or_else(|p| p.into_inner());
        let full = self.lock_state().queued_bytes() >= self.max_bytes;
        if m.0 == Mode::Bitmap || full {
            if m.0 != Mode::Bitmap {
                let reason = format!(
                    "journal full ({} bytes unacknowledged): keeping only dirty regions",
                    self.max_bytes
                );
                warn!("replication state {:?} -> Bitmap: {reason}", m.0);
                *m = (Mode::Bitmap, reason);
            }
            mark_dirty();
            return Captured::Dirty;
        }
        Captured::Seq(self.capture(op))
    }

    /// `resync` → `streaming` if `no_dirty` still holds under the state lock.
    pub fn finish_resync(&self, no_dirty: impl Fn() -> bool) -> bool {
        let mut m = self.mode.lock().unwrap_or_else(|p| p.into_inner());
        if m.0 == Mode::Resync && !self.checksum_active() && no_dirty() {
            warn!("replication state Resync -> Streaming: every dirty region resent");
            *m = (Mode::Streaming, "dirty regions resent".into());
            return true;
        }
        false
    }

    /// Whether a checksum resync owns the `resync` state now.
    pub fn checksum_active(&self) -> bool {
        self.checksum_active
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A checksum resync takes the `resync` state (from `streaming`, or keeping
    /// `bitmap`/`resync`, whose dirty regions then wait for it; during an
    /// initial sync, points wait for both). Joining one already pending is fine.
    pub fn begin_checksum_resync(&self, reason: &str) {
        let mut m = self.mode.lock().unwrap_or_else(|p| p.into_inner());
        self.checksum_active
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if m.0 == Mode::Streaming {
            warn!("replication state Streaming -> Resync: {reason}");
            *m = (Mode::Resync, reason.to_string());
        }
    }

    /// Any state → `resync` for the dirty-region resync, with the inconsistent
    /// mark captured under the mode lock: no write slips in between.
    pub fn enter_resync(&self, reason: &str) {
        let mut m = self.mode.lock().unwrap_or_else(|p| p.into_inner());
        if m.0 != Mode::Resync {
            warn!("replication state {:?} -> Resync: {reason}", m.0);
            *m = (Mode::Resync, reason.to_string());
        }
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
        self.welcomed.send_replace(true);
    }

    /// Waits for the first welcome that confirmed the numbering (the initial
    /// sync waits for it: if the agent lost its state, a checksum resync
    /// replaces the sync, and copying before knowing would be wasted).
    pub async fn wait_welcomed(&self) {
        let mut rx = self.welcomed.subscribe();
        let _ = rx.wait_for(|w| *w).await;
    }

    /// Whether an initial sync still runs.
    pub fn syncing(&self) -> bool {
        self.syncing.load(std::sync::atomic::Ordering::SeqCst) > 0
    }

    /// Initial syncs stop: a checksum resync of every disk replaces them.
    pub fn supersede_sync(&self) {
        self.sync_superseded
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn sync_superseded(&self) -> bool {
        self.sync_superseded
            .load(std::sync::atomic::Ordering::SeqCst)
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
            s.rebase(base);
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
        let mut m = self.mode.lock().unwrap_or_else(|p| p.into_inner());
        if !self
            .checksum_active
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            return false;
        }
        if m.0 == Mode::Resync && no_dirty() {
            warn!("replication state Resync -> Streaming: checksum resync finished");
            *m = (Mode::Streaming, "checksum resync finished".into());
            return true;
        }
        false
    }

    /// Gives a completed operation its seq, journals and queues it.
    pub fn capture(&self, op: Op) -> u64 {
        let seq = {
            let mut s = self.lock_state();
            let e = Entry {
                seq: s.next_seq(),
                op,
            };
            self.journal.append(&e);
            let seq = e.seq;
            s.push(e);
            seq
        };
        seq
    }

    pub fn begin_sync(&self) {
        self.syncing
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn end_sync(&self) {
        self.syncing
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether the replica can be consistent: no disk is in its initial sync and
    /// the stream is `streaming`.
    pub fn consistent(&self) -> bool {
        self.syncing.load(std::sync::atomic::Ordering::SeqCst) == 0
            && self.mode().0 == Mode::Streaming
    }

    /// Places a consistency tag after draining in-flight writes; returns its seq,
    /// or `None` when the replica cannot be consistent now (initial sync, bitmap
    /// or resync state).
    pub async fn tag(&self, kind: TagKind, label: &str) -> Option<u64> {
        let guard = tokio::time::timeout(TAG_DRAIN_TIMEOUT, self.gate.write()).await;
        if guard.is_err() {
            warn!("writes did not drain within {TAG_DRAIN_TIMEOUT:?}; placing the {} tag without draining", kind.as_str());
        }
        // Check and place under the state lock: a write that goes dirty cannot
        // slip in between (even when the drain above timed out).
        let m = self.mode.lock().unwrap_or_else(|p| p.into_inner());
        if self.syncing.load(std::sync::atomic::Ordering::SeqCst) != 0 || m.0 != Mode::Streaming {
            return None;
        }
        let seq = self.capture(Op::Tag {
            kind,
            time_ms: lifeboat_common::now_ms(),
            label: label.to_string(),
        });
        drop(m);
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
