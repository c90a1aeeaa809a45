//! A planned failover's final point on this machine, and the refusal of
//! every write after it (`<state-dir>/failed-over.rec`, record `LBFO`).
//!
//! The process server sends final-point (`process-server/src/planned.rs`,
//! asked by `lifeboat-mt failover --planned`); the agent answers
//! final-point-taken with the tag's seq, or an error:
//!
//! ```text
//! quiesce   only with an [app] quiescer: pre-freeze scripts, freeze, bounded
//!           by the frame's quiesce_ms (a failure is the answer: quiescing
//!           configured but failed is no reason to settle for less); writes
//!           still flow, as the freeze flushes through this agent
//! stop      new writes and zeroes answer EPERM from now on
//! settle    wait (at most SETTLE) until the stream can be consistent: a
//!           journal overflow's dirty regions resent, a resync done (their
//!           reads are not writes and go on), the last point's checksums
//! hold      the write gate, exclusively: writes in flight complete and take
//!           their seqs (drain bounded by TAG_DRAIN_TIMEOUT)
//! tag       app (its source) when quiesced, else crash
//! journal   synced: the tag survives a crash of the agent from here on
//! record    failed-over.rec written durably (seq, time, source)
//! release   the hold; writes stay refused
//! thaw      FITHAW, post-thaw scripts (their writes are refused too)
//! ```
//!
//! Invariant: every write this agent acknowledged has a seq below the final
//! tag's (a write acknowledged while the stream was in bitmap state was
//! resent by the resync the settle waited for), and none is acknowledged
//! after it, so the point at that seq holds every acknowledged write. A
//! failure before the record takes writes again (no final point; a tag
//! already placed stays an ordinary point). The record survives restarts:
//! an agent that starts with it refuses writes before its exports serve
//! one, until `lifeboat-agent resume-writes` removes it. A second
//! final-point while the record exists answers the recorded seq (nothing
//! was written since).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lifeboat_common::formats::FailedOver as FailedOverRecord;
use lifeboat_common::protocol::{TagKind, TagSource};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::apppoint::{AppPoint, AppPointError, AppPoints};
use crate::stream::{Stream, TAG_DRAIN_TIMEOUT};

/// The record's file in the state directory.
pub const RECORD: &str = "failed-over.rec";
/// The longest a final point may quiesce, whatever the process server asks.
pub const FINAL_QUIESCE_MAX: Duration = Duration::from_secs(600);
/// The longest the stream may take to become consistent once writes stop.
pub const SETTLE: Duration = Duration::from_secs(120);
/// Time over the settle and the drain for the journal's sync and the record.
const RECORD_SLACK: Duration = Duration::from_secs(30);
/// How often the settle looks at the stream.
const SETTLE_POLL: Duration = Duration::from_millis(100);

/// What `failed-over.rec` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct FailedOver {
    /// The final point's tag.
    pub seq: u64,
    pub kind: TagKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<TagSource>,
    /// When it was taken (RFC 3339).
    pub time: String,
    pub label: String,
}

impl FailedOver {
    /// Why writes are refused, as writers and `status` are told.
    pub fn why(&self) -> String {
        format!(
            "writes are refused: a planned failover took the final point at seq {} ({}); the machine runs from its recovered copy now (`lifeboat-agent resume-writes` takes writes here again)",
            self.seq, self.time
        )
    }
}

/// The machine's final point and whether it was taken.
pub struct FinalPoints {
    path: PathBuf,
    stream: Arc<Stream>,
    app: Arc<AppPoints>,
    /// One final point at a time.
    busy: tokio::sync::Mutex<()>,
    taken: Mutex<Option<FailedOver>>,
    /// Why the last attempt failed (a request that waited for it answers it).
    last_error: Mutex<Option<String>>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FinalPoints {
    /// Reads the record in `state_dir`; with one, writes are refused from
    /// now on (call it before the exports serve).
    pub fn open(
        state_dir: &Path,
        stream: Arc<Stream>,
        app: Arc<AppPoints>,
    ) -> anyhow::Result<FinalPoints> {
        let path = state_dir.join(RECORD);
        let taken: Option<FailedOver> = crate::fsutil::load_record::<FailedOverRecord, _>(&path)?;
        if let Some(t) = &taken {
            warn!("{} ({})", t.why(), path.display());
            stream.refuse_writes(t.why());
        }
        Ok(FinalPoints {
            path,
            stream,
            app,
            busy: tokio::sync::Mutex::new(()),
            taken: Mutex::new(taken),
            last_error: Mutex::new(None),
        })
    }

    /// The final point taken, if writes are refused for one.
    pub fn status(&self) -> Option<FailedOver> {
        locked(&self.taken).clone()
    }

    /// Takes the final point (see the header); returns it, or the step that
    /// failed (writes then go on).
    pub async fn take(&self, quiesce: Duration, label: &str) -> Result<FailedOver, String> {
        // A second request (the process server lost the session and asks
        // again) waits for the first, then answers its outcome.
        let _busy = match self.busy.try_lock() {
            Ok(b) => b,
            Err(_) => {
                let bound =
                    quiesce.min(FINAL_QUIESCE_MAX) + SETTLE + TAG_DRAIN_TIMEOUT + RECORD_SLACK;
                let _b = tokio::time::timeout(bound, self.busy.lock())
                    .await
                    .map_err(|_| {
                        format!("the final point asked before is still being taken after {bound:?}")
                    })?;
                return match self.status() {
                    Some(t) => Ok(t),
                    None => Err(locked(&self.last_error)
                        .clone()
                        .unwrap_or_else(|| "the final point asked before was not taken".into())),
                };
            }
        };
        if let Some(t) = self.status() {
            info!(
                "final point asked again: it is the one at seq {} (no write since)",
                t.seq
            );
            return Ok(t);
        }
        if self.stream.syncing() {
            let e = "no consistent point can be taken now: the initial sync is not finished";
            *locked(&self.last_error) = Some(e.into());
            return Err(e.into());
        }
        let quiesced = if self.app.configured() {
            let bound = quiesce.min(FINAL_QUIESCE_MAX);
            let deadline = tokio::time::Instant::now() + bound;
            // Frozen at most through the settle, the hold, the journal's
            // sync and the record as well.
            let frozen = SETTLE + TAG_DRAIN_TIMEOUT + RECORD_SLACK;
            match self
                .app
                .quiesce_unsettled(label, Some(deadline), frozen)
                .await
            {
                Ok(q) => Some(q),
                Err(e) => {
                    self.app.failed(&e);
                    let e = format!("quiescing for the final point: {e}");
                    *locked(&self.last_error) = Some(e.clone());
                    return Err(e);
                }
            }
        } else {
            None
        };
        let source = quiesced.as_ref().map(|q| q.source());
        self.stream.refuse_writes(
            "writes are refused: a planned failover is taking this machine's final point".into(),
        );
        let placed = self.hold_tag_and_refuse(source, label).await;
        if placed.is_err() {
            self.stream.accept_writes();
        }
        if let Some(q) = quiesced {
            // Thawed after the answer: the point is recorded, and FITHAW's
            // and post-thaw's writes are refused anyway.
            let (app, label, placed) = (self.app.clone(), label.to_string(), placed.clone());
            lifeboat_common::spawn(async move {
                let ended = app.end(q).await;
                app.step(None);
                match placed {
                    Ok(t) => app.placed(&AppPoint {
                        seq: t.seq,
                        source: t.source.unwrap_or(TagSource::Script),
                        label,
                        time: t.time,
                        warning: ended.warning(),
                    }),
                    Err(e) => app.failed(&AppPointError::Failed {
                        step: "tag",
                        why: e,
                    }),
                }
            });
        }
        if let Err(e) = &placed {
            *locked(&self.last_error) = Some(e.clone());
        }
        let t = placed?;
        info!(
            "final point of a planned failover at seq {} ({}); every later write is refused",
            t.seq,
            t.kind.as_str()
        );
        Ok(t)
    }

    /// Waits until the stream can take a consistent point and no point's
    /// checksums are being hashed (the final tag then gets its own; see the
    /// header).
    async fn settle(&self, until: tokio::time::Instant) -> Result<(), String> {
        loop {
            let why = match self.stream.why_inconsistent() {
                Some(why) => why,
                None if self.stream.point_sums_busy() => {
                    "the previous point's disk checksums are still being hashed (the first point after a start hashes the whole disks)".into()
                }
                None => return Ok(()),
            };
            if tokio::time::Instant::now() >= until {
                return Err(format!(
                    "no consistent point within {SETTLE:?} of stopping writes: {why}"
                ));
            }
            tokio::time::sleep(SETTLE_POLL).await;
        }
    }

    /// Hold, tag, journal, record, refuse, release (the header's steps).
    async fn hold_tag_and_refuse(
        &self,
        source: Option<TagSource>,
        label: &str,
    ) -> Result<FailedOver, String> {
        // Settled, then held; another tag (the periodic crash tag, a group
        // point) may have taken the checksum slot in between: then again.
        let until = tokio::time::Instant::now() + SETTLE;
        let guard = loop {
            self.settle(until).await?;
            let guard = tokio::time::timeout(TAG_DRAIN_TIMEOUT, self.stream.hold_writes())
                .await
                .map_err(|_| {
                    format!("the writes in flight did not drain within {TAG_DRAIN_TIMEOUT:?} (a consistency-group point holding them?)")
                })?;
            if !self.stream.point_sums_busy() {
                break guard;
            }
            drop(guard);
        };
        let kind = if source.is_some() {
            TagKind::App
        } else {
            TagKind::Crash
        };
        let seq = self
            .stream
            .tag_held(&guard, kind, source, label)
            .ok_or_else(|| {
                format!(
                    "no consistent point can be taken now: {}",
                    self.stream.why_inconsistent().unwrap_or_default()
                )
            })?;
        tokio::time::timeout(RECORD_SLACK, self.stream.sync_journal())
            .await
            .map_err(|_| format!("syncing the journal after the final tag (seq {seq}) took over {RECORD_SLACK:?}"))?
            .map_err(|e| format!("syncing the journal after the final tag (seq {seq}): {e}"))?;
        let t = FailedOver {
            seq,
            kind,
            source,
            time: lifeboat_common::catalogue::format_time_ms(lifeboat_common::now_ms()),
            label: label.to_string(),
        };
        let (path, rec) = (self.path.clone(), t.clone());
        tokio::task::spawn_blocking(move || {
            crate::fsutil::store_record::<FailedOverRecord, _>(&path, &rec)
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| format!("{e:#}")))
        .map_err(|e| format!("recording the final point (seq {seq}): {e}"))?;
        self.stream.refuse_writes(t.why());
        *locked(&self.taken) = Some(t.clone());
        drop(guard);
        Ok(t)
    }

    /// Takes writes again (`lifeboat-agent resume-writes`): removes the
    /// record; returns the final point it held, if any.
    pub fn resume(&self) -> anyhow::Result<Option<FailedOver>> {
        use anyhow::Context;
        let _busy = self
            .busy
            .try_lock()
            .map_err(|_| anyhow::anyhow!("a final point is being taken now"))?;
        let Some(t) = self.status() else {
            return Ok(None);
        };
        crate::fsutil::remove_file(&self.path)
            .with_context(|| format!("removing {}", self.path.display()))?;
        *locked(&self.taken) = None;
        self.stream.accept_writes();
        warn!(
            "writes taken again after the planned failover's final point at seq {}: what is written now is not in the recovered copy",
            t.seq
        );
        Ok(Some(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, Arc<Stream>, Arc<AppPoints>) {
        let dir = tempfile::tempdir().unwrap();
        let (journal, replay) = crate::journal::Journal::open(&dir.path().join("j")).unwrap();
        let stream = Stream::new(journal, replay, 16 << 20);
        stream.mark_welcomed();
        let app = Arc::new(AppPoints::new(
            crate::config::AppConfig::default(),
            stream.clone(),
            vec![],
        ));
        (dir, stream, app)
    }

    #[tokio::test]
    async fn the_final_point_refuses_later_writes_and_survives_a_restart() {
        let (dir, stream, app) = setup();
        let fp = FinalPoints::open(dir.path(), stream.clone(), app.clone()).unwrap();
        assert!(stream.writes_refused().is_none());
        let before = stream.positions().captured;
        let t = fp
            .take(Duration::from_secs(5), "planned-failover")
            .await
            .unwrap();
        assert_eq!(t.seq, before + 1);
        assert_eq!(t.kind, TagKind::Crash);
        let why = stream.writes_refused().expect("writes are refused");
        assert!(why.contains(&format!("seq {}", t.seq)), "{why}");
        // Asked again: the same point, no second tag.
        let again = fp.take(Duration::from_secs(5), "again").await.unwrap();
        assert_eq!(again, t);
        assert_eq!(stream.positions().captured, t.seq);

        // A restarted agent refuses writes from the record.
        drop(fp);
        let (journal, replay) = crate::journal::Journal::open(&dir.path().join("j2")).unwrap();
        let fresh = Stream::new(journal, replay, 16 << 20);
        let fp = FinalPoints::open(dir.path(), fresh.clone(), app).unwrap();
        assert_eq!(fp.status(), Some(t.clone()));
        assert!(fresh.writes_refused().is_some());
        assert_eq!(fp.resume().unwrap(), Some(t));
        assert!(fresh.writes_refused().is_none());
        assert!(!dir.path().join(RECORD).exists());
        assert_eq!(fp.resume().unwrap(), None);
    }

    #[tokio::test]
    async fn no_final_point_while_the_replica_cannot_be_consistent() {
        let (dir, stream, app) = setup();
        stream.begin_sync();
        let fp = FinalPoints::open(dir.path(), stream.clone(), app).unwrap();
        let e = fp.take(Duration::from_secs(5), "p").await.unwrap_err();
        assert!(e.contains("no consistent point"), "{e}");
        assert!(stream.writes_refused().is_none(), "writes refused anyway");
        assert!(!dir.path().join(RECORD).exists());
    }

    #[tokio::test]
    async fn the_record_keeps_its_bytes() {
        let t = FailedOver {
            seq: 42,
            kind: TagKind::App,
            source: Some(TagSource::Fsfreeze),
            time: "2026-12-02T15:00:00.000Z".into(),
            label: "planned-failover".into(),
        };
        let bytes =
            lifeboat_common::formats::read_fixture::<FailedOverRecord>("failed-over", || {
                lifeboat_common::formats::seal::<FailedOverRecord>(&serde_json::to_vec(&t).unwrap())
            });
        let back: FailedOver = serde_json::from_slice(
            lifeboat_common::formats::open::<FailedOverRecord>(&bytes).unwrap(),
        )
        .unwrap();
        assert_eq!(back, t);
    }
}
