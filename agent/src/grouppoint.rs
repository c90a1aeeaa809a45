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
//! group-release id  → release the hold of `id`, if it is still held
//! ```
//!
//! Invariants: at most one hold at a time; a hold never outlives its bound
//! (the prepare's `hold_ms`, capped at [`GROUP_HOLD_MAX`]): a watchdog
//! releases it when no commit or release came (the process server vanished
//! or gave up), and the end of the session releases it too; a prepare
//! released (or whose session ended) while it still drains never takes the
//! hold. Writes blocked by a hold wait, they never fail.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lifeboat_common::protocol::TagKind;
use tokio::sync::OwnedRwLockWriteGuard;
use tracing::{info, warn};

use crate::stream::{Stream, TAG_DRAIN_TIMEOUT};

/// The longest this agent holds writes for a group point, whatever the
/// process server asks.
pub const GROUP_HOLD_MAX: Duration = Duration::from_secs(60);

struct Held {
    id: u64,
    group: String,
    guard: OwnedRwLockWriteGuard<()>,
}

/// The machine's group hold (one at a time).
#[derive(Default)]
pub struct GroupHold {
    held: Mutex<Option<Held>>,
    /// The id of a prepare still draining (refuses a second one meanwhile).
    preparing: Mutex<Option<u64>>,
    /// A prepare released (or whose session ended) while it drained: it
    /// must not take the hold when the drain ends.
    abandoned: Mutex<Option<u64>>,
}

impl GroupHold {
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
        let seq = stream
            .tag_held(&held.guard, TagKind::Group, label)
            .ok_or_else(|| {
                format!(
                    "no consistent point can be taken now: {}",
                    stream.why_inconsistent().unwrap_or_default()
                )
            })?;
        info!(
            "group point {id} of {}: tag at seq {seq}; writes released",
            held.group
        );
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
