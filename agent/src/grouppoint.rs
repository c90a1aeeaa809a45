//! The agent's part in a consistency-group point, run by the process server
//! (`process-server/src/groups.rs`; frames in `common/src/protocol.rs`):
//!
//! ```text
//! group-prepare id  → hold new writes (the write gate, exclusively): writes in
//!                     flight complete and take their seqs, new ones wait;
//!                     reply group-prepared (error when the drain overran
//!                     TAG_DRAIN_TIMEOUT or no point can be taken now)
//! group-commit id   → place the group tag under the hold, release it; reply
//!                     group-committed with the tag's seq
//! group-release id  → release the hold of `id`, if it is still held, then
//!                     thaw what a group-quiesce of `id` froze
//! group-quiesce id  → (app-consistent group points, before the prepare)
//!                     quiesce with this agent's own [app] quiescer
//!                     (`apppoint.rs`): pre-freeze scripts, then the freeze,
//!                     within the frame's bound; reply group-quiesced with the
//!                     source (or the error naming the step)
//! ```
//!
//! Order of an app-consistent group point, and why:
//!
//! ```text
//! quiesce  pre-freeze scripts, FIFREEZE   writes flow: the freeze flushes dirty
//!                                         pages, writes that come through this
//!                                         agent's NBD export and need the gate
//! prepare  hold the write gate            a frozen filesystem writes nothing, so
//!                                         the hold drains only other writers
//! commit   `app` tag (the member's source) under the hold; then the hold is
//!          released                       before any thaw:
//! thaw     FITHAW, then post-thaw scripts FITHAW may write (ext4 commits its
//!                                         superblock) and the scripts may write:
//!                                         under the hold they would wait on it
//! ```
//!
//! A release, the session's end, the agent's shutdown and the bounds take
//! the same order: hold released first, then thawed (on a thread of its own,
//! so nothing waits for a slow thaw). A machine is quiesced at most the
//! group-quiesce's `quiesce_ms + hold_ms` (capped at [`GROUP_QUIESCE_MAX`] +
//! [`GROUP_HOLD_MAX`]) plus [`QUIESCE_SLACK`]: then a timer thaws it, and
//! the quiescer's watchdog thread does even if the runtime does not. A commit
//! of a point that quiesced this machine but was thawed since (its bound)
//! places no tag: the point would claim a quiesce that no longer held.
//!
//! Invariants: at most one hold at a time; a hold never outlives its bound
//! (the prepare's `hold_ms`, capped at [`GROUP_HOLD_MAX`]): a watchdog
//! releases it when no commit or release came (the process server vanished
//! or gave up), and the end of the session releases it too; a prepare
//! released (or whose session ended) while it still drains never takes the
//! hold. Writes blocked by a hold wait, they never fail.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lifeboat_common::protocol::{TagKind, TagSource};
use tokio::sync::OwnedRwLockWriteGuard;
use tracing::{info, warn};

use crate::apppoint::{AppPoints, Quiesced};
use crate::stream::{Stream, TAG_DRAIN_TIMEOUT};

/// The longest this agent holds writes for a group point, whatever the
/// process server asks.
pub const GROUP_HOLD_MAX: Duration = Duration::from_secs(60);
/// The longest a group-quiesce may take, whatever the process server asks.
pub const GROUP_QUIESCE_MAX: Duration = Duration::from_secs(600);
/// Time over `quiesce_ms + hold_ms` before a quiesced machine thaws by
/// itself (the commit or release is on its way); more than a prepare's
/// drain may take, so that the timer never thaws under the write hold.
pub const QUIESCE_SLACK: Duration = Duration::from_secs(15);

/// An app-consistent group point's quiesce on this machine.
#[derive(Default)]
enum Quiesce {
    #[default]
    Idle,
    /// Under way; `abandoned` once released (or the session ended) meanwhile.
    Running { id: u64, abandoned: bool },
    /// Quiesced for group point `id`, until its commit or release.
    Done { id: u64, quiesced: Quiesced },
}

struct Held {
    id: u64,
    group: String,
    guard: OwnedRwLockWriteGuard<()>,
}

/// The machine's group hold (one at a time), and the quiesce of an
/// app-consistent group point.
#[derive(Default)]
pub struct GroupHold {
    /// This machine's app-consistent points (its quiescer); `None`: it
    /// takes part in crash-consistent group points only.
    app: Option<Arc<AppPoints>>,
    quiesce: Mutex<Quiesce>,
    /// The group point that last quiesced this machine (a commit of it
    /// needs the quiesce still in place).
    quiesced_for: Mutex<Option<u64>>,
    /// The last thaw's thread (shutdown waits for it).
    thawing: Mutex<Option<std::thread::JoinHandle<()>>>,
    held: Mutex<Option<Held>>,
    /// The id of a prepare still draining (refuses a second one meanwhile).
    preparing: Mutex<Option<u64>>,
    /// A prepare released (or whose session ended) while it drained: it
    /// must not take the hold when the drain ends.
    abandoned: Mutex<Option<u64>>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl GroupHold {
    /// With this machine's app-consistent points (for app group points).
    pub fn new(app: Arc<AppPoints>) -> GroupHold {
        GroupHold {
            app: Some(app),
            ..Default::default()
        }
    }

    /// Quiesces the machine for app-consistent group point `id` within
    /// `bound` (capped at [`GROUP_QUIESCE_MAX`]); it stays quiesced until the
    /// commit or release of `id`, at most `bound + hold` (see the header).
    /// Returns how it quiesced; an error names the step that failed.
    pub async fn quiesce(
        self: &Arc<Self>,
        id: u64,
        group: &str,
        bound: Duration,
        hold: Duration,
    ) -> Result<TagSource, String> {
        let Some(app) = &self.app else {
            return Err("this agent takes no app-consistent points".into());
        };
        let bound = bound.min(GROUP_QUIESCE_MAX);
        let frozen_at_most = bound + hold.min(GROUP_HOLD_MAX) + QUIESCE_SLACK;
        if let Some(h) = self.holding() {
            return Err(format!("writes are held for group point {h}"));
        }
        {
            let mut q = locked(&self.quiesce);
            match &*q {
                Quiesce::Idle => {
                    *q = Quiesce::Running {
                        id,
                        abandoned: false,
                    }
                }
                Quiesce::Running { id: other, .. } | Quiesce::Done { id: other, .. } => {
                    return Err(format!(
                        "group point {other} is quiescing this machine already"
                    ))
                }
            }
        }
        let deadline = tokio::time::Instant::now() + bound;
        let label = format!("{group}:{id}");
        let r = app.quiesce(&label, Some(deadline), frozen_at_most).await;
        let mut q = locked(&self.quiesce);
        let abandoned = matches!(
            *q,
            Quiesce::Running {
                abandoned: true,
                ..
            }
        );
        *q = Quiesce::Idle;
        let quiesced = match r {
            Err(e) => {
                drop(q);
                app.failed(&e);
                return Err(e.to_string());
            }
            Ok(quiesced) if abandoned => {
                drop(q);
                self.thaw(quiesced, id, "it was released while this machine quiesced");
                return Err(format!(
                    "group point {id} was released while this machine quiesced; thawed"
                ));
            }
            Ok(quiesced) => quiesced,
        };
        let source = quiesced.source();
        *q = Quiesce::Done { id, quiesced };
        drop(q);
        *locked(&self.quiesced_for) = Some(id);
        info!(
            "quiesced ({}) for group point {id} of {group} (at most {frozen_at_most:?})",
            source.as_str()
        );
        let me = self.clone();
        lifeboat_common::spawn(async move {
            tokio::time::sleep(frozen_at_most).await;
            me.end_quiesce(
                Some(id),
                "its bound passed: neither commit nor release came",
            );
        });
        Ok(source)
    }

    /// Thaws the quiesce of `id` (any when `None`), if one is in place, or
    /// marks one under way to thaw as soon as it is done. Never call it
    /// while holding the writes (see the header).
    fn end_quiesce(&self, id: Option<u64>, why: &str) {
        let mut q = locked(&self.quiesce);
        match &mut *q {
            Quiesce::Running { id: r, abandoned } if id.is_none_or(|id| id == *r) => {
                *abandoned = true
            }
            Quiesce::Done { id: d, .. } if id.is_none_or(|id| id == *d) => {
                if let Quiesce::Done { id, quiesced } = std::mem::take(&mut *q) {
                    drop(q);
                    self.thaw(quiesced, id, why);
                }
            }
            _ => {}
        }
    }

    fn thaw(&self, quiesced: Quiesced, id: u64, why: &str) {
        info!("thawing after group point {id}: {why}");
        let (thread, _outcome) = quiesced.end();
        *locked(&self.thawing) = Some(thread);
    }

    /// Waits (at most `bound`) for the last thaw to finish (agent shutdown:
    /// the session's end released and thawed).
    pub async fn wait_thawed(&self, bound: Duration) {
        let Some(thread) = locked(&self.thawing).take() else {
            return;
        };
        let until = tokio::time::Instant::now() + bound;
        while !thread.is_finished() && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !thread.is_finished() {
            warn!("the thaw after a group point did not finish within {bound:?}");
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Option<Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether writes are held for a group point now (its id).
    pub fn holding(&self) -> Option<u64> {
        self.held().as_ref().map(|h| h.id)
    }

    /// Holds new writes for group point `id` once those in flight drained;
    /// the hold ends by itself after `hold` (capped at [`GROUP_HOLD_MAX`]).
    pub async fn prepare(
        self: &Arc<Self>,
        stream: &Arc<Stream>,
        id: u64,
        group: &str,
        hold: Duration,
    ) -> Result<(), String> {
        let hold = hold.min(GROUP_HOLD_MAX);
        if let Quiesce::Done { id: other, .. } | Quiesce::Running { id: other, .. } =
            &*locked(&self.quiesce)
        {
            if *other != id {
                return Err(format!(
                    "this machine is quiesced for group point {other}, not {id}"
                ));
            }
        }
        if let Some(h) = self.held().as_ref() {
            if h.id == id {
                return Ok(());
            }
            return Err(format!(
                "writes are already held for group point {} of {}",
                h.id, h.group
            ));
        }
        {
            let mut p = self.preparing.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(other) = *p {
                return Err(format!("group point {other} is being prepared"));
            }
            *p = Some(id);
        }
        let result = self.hold(stream, id, group, hold).await;
        *self.preparing.lock().unwrap_or_else(|p| p.into_inner()) = None;
        result
    }

    async fn hold(
        self: &Arc<Self>,
        stream: &Arc<Stream>,
        id: u64,
        group: &str,
        hold: Duration,
    ) -> Result<(), String> {
        if let Some(why) = stream.why_inconsistent() {
            return Err(format!("no consistent point can be taken now: {why}"));
        }
        let drain = TAG_DRAIN_TIMEOUT.min(hold);
        let guard = tokio::time::timeout(drain, stream.hold_writes())
            .await
            .map_err(|_| format!("the writes in flight did not drain within {drain:?}"))?;
        if let Some(why) = stream.why_inconsistent() {
            return Err(format!("no consistent point can be taken now: {why}"));
        }
        let mut held = self.held();
        if self
            .abandoned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take_if(|a| *a == id)
            .is_some()
        {
            drop(guard);
            return Err(format!(
                "group point {id} was released while its writes drained; not holding"
            ));
        }
        *held = Some(Held {
            id,
            group: group.to_string(),
            guard,
        });
        drop(held);
        info!("holding writes for group point {id} of {group} (at most {hold:?})");
        let me = self.clone();
        lifeboat_common::spawn(async move {
            tokio::time::sleep(hold).await;
            let mut h = me.held();
            if h.as_ref().is_some_and(|h| h.id == id) {
                let g = h.take().map(|h| h.group).unwrap_or_default();
                warn!("released the writes held for group point {id} of {g} after its bound ({hold:?}): neither commit nor release came");
            }
        });
        Ok(())
    }

    /// Places the group tag of `id` under its hold and releases the writes;
    /// returns the tag's seq.
    pub fn commit(&self, stream: &Stream, id: u64, label: &str) -> Result<u64, String> {
        let mut h = self.held();
        let Some(held) = h.take_if(|h| h.id == id) else {
            return Err(match h.as_ref() {
                Some(other) => format!("writes are held for group point {}, not {id}", other.id),
                None => format!(
                    "no writes are held for group point {id} (its hold ended after its bound, or it was never prepared)"
                ),
            });
        };
        drop(h);
        let source = match &*locked(&self.quiesce) {
            Quiesce::Done { id: q, quiesced } if *q == id => Some(quiesced.source()),
            _ => None,
        };
        let seq = if source.is_none() && *locked(&self.quiesced_for) == Some(id) {
            Err(format!(
                "this machine was thawed before the commit of group point {id} (its bound passed); no app-consistent tag"
            ))
        } else {
            let kind = if source.is_some() {
                TagKind::App
            } else {
                TagKind::Group
            };
            stream
                .tag_held(&held.guard, kind, source, label)
                .ok_or_else(|| {
                    format!(
                        "no consistent point can be taken now: {}",
                        stream.why_inconsistent().unwrap_or_default()
                    )
                })
        };
        // The hold first, then the thaw (see the header).
        let group = held.group.clone();
        drop(held);
        self.end_quiesce(Some(id), "committed");
        let seq = seq?;
        info!("group point {id} of {group}: tag at seq {seq}; writes released");
        Ok(seq)
    }

    /// Ends the hold of `id` (or any hold when `None`), if there is one.
    pub fn release(&self, id: Option<u64>, why: &str) {
        let mut h = self.held();
        // A prepare still draining must not take the hold afterwards.
        let preparing = *self.preparing.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = preparing.filter(|p| id.is_none_or(|id| id == *p)) {
            *self.abandoned.lock().unwrap_or_else(|p| p.into_inner()) = Some(p);
        }
        if let Some(held) = h.take_if(|h| id.is_none_or(|id| h.id == id)) {
            info!(
                "released the writes held for group point {} of {}: {why}",
                held.id, held.group
            );
        }
        // The hold first, then the thaw (see the header).
        drop(h);
        self.end_quiesce(id, why);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream() -> (tempfile::TempDir, Arc<Stream>) {
        let dir = tempfile::tempdir().unwrap();
        let (journal, replay) = crate::journal::Journal::open(dir.path()).unwrap();
        let stream = Stream::new(journal, replay, 16 << 20);
        stream.mark_welcomed();
        (dir, stream)
    }

    async fn write_waits(stream: &Stream) -> bool {
        tokio::time::timeout(Duration::from_millis(100), stream.write_permit())
            .await
            .is_err()
    }

    #[tokio::test]
    async fn prepare_holds_writes_commit_tags_and_releases() {
        let (_d, stream) = stream();
        let g = Arc::new(GroupHold::default());
        g.prepare(&stream, 7, "g", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(g.holding(), Some(7));
        assert!(write_waits(&stream).await, "a write went through the hold");
        assert!(g
            .prepare(&stream, 8, "g", Duration::from_secs(5))
            .await
            .is_err());
        assert!(g.commit(&stream, 8, "x").is_err());
        let seq = g.commit(&stream, 7, "g:7").unwrap();
        assert_eq!(seq, stream.positions().captured);
        assert!(
            !write_waits(&stream).await,
            "writes stay held after the commit"
        );
        assert!(g.commit(&stream, 7, "again").is_err());
    }

    #[tokio::test]
    async fn a_hold_ends_by_itself_after_its_bound_and_on_release() {
        let (_d, stream) = stream();
        let g = Arc::new(GroupHold::default());
        g.prepare(&stream, 1, "g", Duration::from_millis(300))
            .await
            .unwrap();
        assert!(write_waits(&stream).await);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(g.holding(), None);
        assert!(
            !write_waits(&stream).await,
            "the bound did not release the hold"
        );
        let err = g.commit(&stream, 1, "late").unwrap_err();
        assert!(err.contains("bound"), "{err}");

        g.prepare(&stream, 2, "g", Duration::from_secs(30))
            .await
            .unwrap();
        g.release(Some(3), "not this one");
        assert_eq!(g.holding(), Some(2));
        g.release(None, "session ended");
        assert!(!write_waits(&stream).await);
    }

    #[tokio::test]
    async fn a_prepare_released_while_it_drains_never_holds() {
        let (_d, stream) = stream();
        let g = Arc::new(GroupHold::default());
        // A write in flight: the prepare drains behind it.
        let in_flight = stream.write_permit().await;
        let (g2, s2) = (g.clone(), stream.clone());
        let prepare =
            tokio::spawn(async move { g2.prepare(&s2, 4, "g", Duration::from_secs(30)).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The process server gave up (or the session ended) meanwhile.
        g.release(Some(4), "the process server released it");
        drop(in_flight);
        let err = prepare.await.unwrap().unwrap_err();
        assert!(err.contains("released while"), "{err}");
        assert_eq!(g.holding(), None);
        assert!(
            !write_waits(&stream).await,
            "a released prepare held writes"
        );
    }

    /// Records what happened in order; `prepare` sleeps `hang` (a pre-freeze
    /// script that hangs); `thaw` notes whether writes were still held.
    #[derive(Default)]
    struct Recorder {
        hang: Duration,
        events: Mutex<Vec<&'static str>>,
        hold: std::sync::OnceLock<Arc<GroupHold>>,
    }

    impl crate::quiesce::Quiescer for Recorder {
        fn source(&self) -> TagSource {
            TagSource::Script
        }
        fn prepare(&self) -> Result<(), crate::quiesce::QuiesceError> {
            std::thread::sleep(self.hang);
            self.events.lock().unwrap().push("prepare");
            Ok(())
        }
        fn freeze(&self) -> Result<(), crate::quiesce::QuiesceError> {
            self.events.lock().unwrap().push("freeze");
            Ok(())
        }
        fn thaw(&self) -> Result<(), crate::quiesce::QuiesceError> {
            let held = self.hold.get().is_some_and(|h| h.holding().is_some());
            self.events
                .lock()
                .unwrap()
                .push(if held { "thaw-under-hold" } else { "thaw" });
            Ok(())
        }
        fn finish(&self) -> Result<(), crate::quiesce::QuiesceError> {
            self.events.lock().unwrap().push("finish");
            Ok(())
        }
    }

    fn app_group(
        hang: Duration,
    ) -> (
        tempfile::TempDir,
        Arc<Stream>,
        Arc<GroupHold>,
        Arc<Recorder>,
    ) {
        let (d, stream) = stream();
        let rec = Arc::new(Recorder {
            hang,
            ..Default::default()
        });
        let r = rec.clone();
        let cfg = crate::config::AppConfig {
            pre_freeze: vec!["/pre.sh".into()],
            ..Default::default()
        };
        let app = AppPoints::with_quiescer(
            cfg,
            stream.clone(),
            Box::new(move |_: &str| r.clone() as Arc<dyn crate::quiesce::Quiescer>),
        );
        let g = Arc::new(GroupHold::new(Arc::new(app)));
        let _ = rec.hold.set(g.clone());
        (d, stream, g, rec)
    }

    async fn events_become(rec: &Recorder, want: &[&str]) {
        for _ in 0..100 {
            if rec.events.lock().unwrap().as_slice() == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(rec.events.lock().unwrap().as_slice(), want);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_app_group_point_quiesces_before_the_hold_and_thaws_after_it() {
        let (_d, stream, g, rec) = app_group(Duration::ZERO);
        let s = Duration::from_secs(5);
        assert_eq!(g.quiesce(3, "g", s, s).await.unwrap(), TagSource::Script);
        assert!(!write_waits(&stream).await, "quiescing held writes");
        g.prepare(&stream, 3, "g", s).await.unwrap();
        assert!(write_waits(&stream).await);
        let seq = g.commit(&stream, 3, "g:3").unwrap();
        events_become(&rec, &["prepare", "freeze", "thaw", "finish"]).await;
        let queued = stream.lock_state().poll_transmit(1 << 20);
        assert!(
            queued.iter().any(|f| matches!(f,
                lifeboat_common::session::Outgoing::Frame(lifeboat_common::protocol::Frame::Tag(e)) if e.seq == seq && matches!(e.op,
                    lifeboat_common::protocol::Op::Tag { kind: TagKind::App, source: Some(TagSource::Script), .. }))),
            "{queued:?}"
        );
        // The next point may be crash-consistent: a group tag again.
        g.prepare(&stream, 4, "g", s).await.unwrap();
        g.commit(&stream, 4, "g:4").unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_release_or_a_thaw_before_the_commit_places_no_app_tag() {
        let (_d, stream, g, rec) = app_group(Duration::ZERO);
        let s = Duration::from_secs(5);
        g.quiesce(1, "g", s, s).await.unwrap();
        g.prepare(&stream, 1, "g", s).await.unwrap();
        g.release(Some(1), "the process server gave up");
        events_become(&rec, &["prepare", "freeze", "thaw", "finish"]).await;
        assert!(!write_waits(&stream).await);

        // Thawed (its bound) while held: the commit refuses to call it app.
        rec.events.lock().unwrap().clear();
        let before = stream.positions().captured;
        g.quiesce(2, "g", s, s).await.unwrap();
        g.prepare(&stream, 2, "g", s).await.unwrap();
        g.end_quiesce(Some(2), "its bound passed");
        let e = g.commit(&stream, 2, "g:2").unwrap_err();
        assert!(e.contains("thawed before the commit"), "{e}");
        assert_eq!(stream.positions().captured, before, "a tag was placed");
        assert!(
            !write_waits(&stream).await,
            "the refused commit kept the hold"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hung_pre_freeze_fails_at_the_groups_bound_naming_the_step() {
        let (_d, stream, g, rec) = app_group(Duration::from_secs(2));
        let t = std::time::Instant::now();
        let e = g
            .quiesce(5, "g", Duration::from_millis(300), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "{:?}",
            t.elapsed()
        );
        assert!(
            e.contains("pre-freeze failed") && e.contains("quiesce-timeout"),
            "{e}"
        );
        assert!(!write_waits(&stream).await);
        assert!(rec.events.lock().unwrap().contains(&"finish"));
        // Nothing is left quiesced: a crash group point goes on.
        g.prepare(&stream, 6, "g", Duration::from_secs(5))
            .await
            .unwrap();
        g.commit(&stream, 6, "g:6").unwrap();
    }

    #[tokio::test]
    async fn no_hold_while_the_replica_cannot_be_consistent() {
        let (_d, stream) = stream();
        stream.begin_sync();
        let g = Arc::new(GroupHold::default());
        let err = g
            .prepare(&stream, 1, "g", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(err.contains("no consistent point"), "{err}");
        assert!(!write_waits(&stream).await);
    }
}
