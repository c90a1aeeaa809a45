//! The agent's replication state, in one place and without I/O: the mode
//! (`streaming`, `bitmap`, `resync`) with its reason, the disks still in their
//! initial sync, whether a checksum resync owns the `resync` state, whether a
//! checksum resync replaced the initial sync, and whether a welcome confirmed
//! the numbering. Every change goes through a method here; `Stream` keeps the
//! state under one lock and publishes each new [`Snapshot`] on a `watch`
//! channel, so the loops that wait for a change (the dirty-region resync, the
//! initial sync waiting for its welcome) are woken instead of polling.
//!
//! Transitions (anything else leaves the mode as it is):
//!
//! ```text
//! streaming ──journal full / journal failing / disk write failed──▶ bitmap
//! bitmap | streaming ──dirty-region resync starts──▶ resync
//! resync ──every dirty region resent, no checksum resync──▶ streaming
//! streaming ──checksum resync begins──▶ resync  (bitmap/resync kept; it waits)
//! resync ──checksum resync ends, nothing dirty──▶ streaming
//! ```
//!
//! A recovery point may be placed only in `streaming`, with no initial sync,
//! once a welcome confirmed the numbering (before it, a rebase could drop it).

/// Replication state of the machine's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Streaming,
    Bitmap,
    Resync,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Streaming => "streaming",
            Mode::Bitmap => "bitmap",
            Mode::Resync => "resync",
        }
    }
}

/// What the state is now; published after every change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub mode: Mode,
    pub reason: String,
    /// Disks whose initial sync is not finished.
    pub syncing: usize,
    /// A checksum resync owns the `resync` state (running or waiting to resume).
    pub checksum_active: bool,
    /// A checksum resync of every disk replaces the initial sync.
    pub sync_superseded: bool,
    /// A welcome confirmed this agent's numbering.
    pub welcomed: bool,
}

/// A change of mode, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub from: Mode,
    pub to: Mode,
    pub reason: String,
}

/// Why a write that was not captured was only marked dirty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pressure {
    /// Unacknowledged entries reached the journal's bound (bytes).
    JournalFull(usize),
    /// The journal cannot write (the error).
    JournalFailing(String),
}

/// The replication state machine.
#[derive(Debug, Clone)]
pub struct Replication {
    s: Snapshot,
}

impl Default for Replication {
    fn default() -> Self {
        Replication {
            s: Snapshot {
                mode: Mode::Streaming,
                reason: "started".into(),
                syncing: 0,
                checksum_active: false,
                sync_superseded: false,
                welcomed: false,
            },
        }
    }
}

impl Replication {
    pub fn snapshot(&self) -> &Snapshot {
        &self.s
    }

    pub fn mode(&self) -> Mode {
        self.s.mode
    }

    fn go(&mut self, to: Mode, reason: impl Into<String>) -> Option<Transition> {
        let reason = reason.into();
        let from = self.s.mode;
        self.s.mode = to;
        self.s.reason = reason.clone();
        (from != to).then_some(Transition { from, to, reason })
    }

    /// A data write completed: whether it is captured (`Ok`) or only marked
    /// dirty (`Err`, with the transition to `bitmap` if this write caused it).
    pub fn on_write(&mut self, pressure: Option<Pressure>) -> Result<(), Option<Transition>> {
        if self.s.mode == Mode::Bitmap {
            return Err(None);
        }
        match pressure {
            None => Ok(()),
            Some(Pressure::JournalFull(bound)) => Err(self.go(
                Mode::Bitmap,
                format!("journal full ({bound} bytes unacknowledged): keeping only dirty regions"),
            )),
            Some(Pressure::JournalFailing(e)) => Err(self.go(
                Mode::Bitmap,
                format!(
                    "journal write failed ({e}): keeping only dirty regions until it writes again"
                ),
            )),
        }
    }

    /// A write failed on the local disk: its range is dirty, no point until
    /// the resync has sent what the disk holds.
    pub fn degrade(&mut self, reason: &str) -> Option<Transition> {
        if self.s.mode == Mode::Bitmap {
            return None;
        }
        self.go(Mode::Bitmap, reason)
    }

    /// The dirty-region resync starts (from any mode).
    pub fn enter_resync(&mut self, reason: &str) -> Option<Transition> {
        if self.s.mode == Mode::Resync {
            return None;
        }
        self.go(Mode::Resync, reason)
    }

    /// The dirty-region resync sent every region: `resync` → `streaming`,
    /// unless a checksum resync owns the state or something is dirty again.
    pub fn finish_resync(&mut self, no_dirty: bool) -> Option<Transition> {
        if self.s.mode == Mode::Resync && !self.s.checksum_active && no_dirty {
            return self.go(Mode::Streaming, "dirty regions resent");
        }
        None
    }

    /// A checksum resync takes the `resync` state (from `streaming`; in
    /// `bitmap`/`resync` the dirty regions wait for it).
    pub fn begin_checksum_resync(&mut self, reason: &str) -> Option<Transition> {
        self.s.checksum_active = true;
        if self.s.mode == Mode::Streaming {
            return self.go(Mode::Resync, reason);
        }
        None
    }

    /// A checksum resync ended: returns whether it was active, and the
    /// transition back to `streaming` when nothing is dirty.
    pub fn end_checksum_resync(&mut self, no_dirty: bool) -> (bool, Option<Transition>) {
        if !std::mem::take(&mut self.s.checksum_active) {
            return (false, None);
        }
        if self.s.mode == Mode::Resync && no_dirty {
            return (true, self.go(Mode::Streaming, "checksum resync finished"));
        }
        (true, None)
    }

    pub fn begin_sync(&mut self) {
        self.s.syncing += 1;
    }

    pub fn end_sync(&mut self) {
        self.s.syncing = self.s.syncing.saturating_sub(1);
    }

    pub fn supersede_sync(&mut self) {
        self.s.sync_superseded = true;
    }

    pub fn welcome(&mut self) {
        self.s.welcomed = true;
    }

    /// Why no recovery point can be placed now, or `None` when one can.
    pub fn why_inconsistent(&self) -> Option<String> {
        if self.s.mode != Mode::Streaming {
            return Some(format!("state {}: {}", self.s.mode.as_str(), self.s.reason));
        }
        if self.s.syncing > 0 {
            return Some("initial sync in progress: the replica is not complete yet".into());
        }
        if !self.s.welcomed {
            // A point placed now could be dropped by a rebase the welcome
            // still may ask for (the agent lost state it does not know of).
            return Some(
                "waiting for the process server to confirm this agent's numbering of the stream"
                    .into(),
            );
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_journal_goes_to_bitmap_once_and_stays_until_the_resync() {
        let mut r = Replication::default();
        r.welcome();
        assert_eq!(r.on_write(None), Ok(()));
        let t = r
            .on_write(Some(Pressure::JournalFull(16)))
            .unwrap_err()
            .unwrap();
        assert_eq!((t.from, t.to), (Mode::Streaming, Mode::Bitmap));
        // Later writes are dirty too, without a new transition, even with room.
        assert_eq!(r.on_write(None), Err(None));
        assert!(r.why_inconsistent().unwrap().contains("journal full"));
        assert_eq!(r.enter_resync("drained").unwrap().to, Mode::Resync);
        assert_eq!(r.on_write(None), Ok(()), "resync captures new writes");
        assert_eq!(r.finish_resync(false), None, "still dirty");
        assert_eq!(r.finish_resync(true).unwrap().to, Mode::Streaming);
        assert_eq!(r.why_inconsistent(), None);
    }

    #[test]
    fn a_failing_journal_and_a_failed_disk_write_name_their_reason() {
        let mut r = Replication::default();
        let t = r
            .on_write(Some(Pressure::JournalFailing("No space left".into())))
            .unwrap_err()
            .unwrap();
        assert!(t.reason.contains("journal write failed (No space left)"));
        let mut r = Replication::default();
        assert_eq!(
            r.degrade("write failed on disk root").unwrap().to,
            Mode::Bitmap
        );
        assert_eq!(r.degrade("again"), None);
        assert!(r.why_inconsistent().unwrap().contains("disk root"));
    }

    #[test]
    fn a_checksum_resync_owns_resync_until_it_ends() {
        let mut r = Replication::default();
        assert_eq!(r.begin_checksum_resync("resized").unwrap().to, Mode::Resync);
        assert_eq!(
            r.finish_resync(true),
            None,
            "the dirty-region resync cannot end it"
        );
        assert_eq!(
            r.end_checksum_resync(false),
            (true, None),
            "dirty: the resync ends it"
        );
        assert_eq!(r.end_checksum_resync(true), (false, None), "only once");
        assert_eq!(r.finish_resync(true).unwrap().to, Mode::Streaming);

        // From bitmap, the mode is kept and the dirty regions wait.
        let mut r = Replication::default();
        r.degrade("disk write failed");
        assert_eq!(r.begin_checksum_resync("lost state"), None);
        assert_eq!(r.mode(), Mode::Bitmap);
        assert!(r.snapshot().checksum_active);
    }

    #[test]
    fn no_point_during_an_initial_sync() {
        let mut r = Replication::default();
        r.begin_sync();
        r.begin_sync();
        r.end_sync();
        assert!(r.why_inconsistent().unwrap().contains("initial sync"));
        r.end_sync();
        r.end_sync(); // never below zero
        assert!(
            r.why_inconsistent().unwrap().contains("numbering"),
            "no point before the welcome"
        );
        assert!(!r.snapshot().welcomed);
        r.welcome();
        assert_eq!(r.why_inconsistent(), None);
        r.supersede_sync();
        assert!(r.snapshot().welcomed && r.snapshot().sync_superseded);
    }
}
