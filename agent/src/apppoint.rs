//! App-consistent points: the sequence, its bounds, its report and its
//! schedule.
//!
//! ```text
//! check (streaming, nothing else quiescing)
//!   → prepare   pre-freeze scripts          each script ≤ script-timeout
//!   → freeze    FIFREEZE every listed fs    ≤ freeze-timeout
//!   → tag       `app` tag with its source   ≤ freeze-hold (drains in-flight writes)
//!   → thaw      FITHAW                      always, on every path
//!   → finish    post-thaw scripts           always once prepare began
//! ```
//!
//! Invariants:
//! - every step runs on a thread of its own ([`bounded`]): a step that hangs
//!   (a script, a FIFREEZE waiting for writeback through our own NBD export)
//!   holds neither the runtime, nor the write path, nor a crash-consistent tag;
//!   the sequence gives up on it at its bound and thaws;
//! - the filesystems are thawed on every path: by the sequence; by
//!   [`ThawGuard`] when the sequence's future is dropped or panics; by a
//!   watchdog thread at `freeze-timeout + freeze-hold` whatever the runtime
//!   does; and by the quiescer itself when a freeze completes after the
//!   attempt was given up (`quiesce.rs`). Writers to a listed filesystem so
//!   wait at most `freeze-timeout + freeze-hold`;
//! - a failed attempt places no tag, and says which step failed and why:
//!   WARN in the log, `app-points.last-failure` in status, the control reply;
//! - one attempt at a time; crash-consistent tags never wait for one.
//!
//! [`AppPoints::quiesce`] (checks, pre-freeze, freeze — each step bounded,
//! all by an optional deadline) returns a [`Quiesced`] that holds the one
//! attempt; [`Quiesced::end`] thaws, then runs the post-thaw scripts, on a
//! thread of its own. The single-machine sequence is quiesce → tag → end;
//! an app-consistent group point (`grouppoint.rs`) is quiesce → the group's
//! write hold → tag → release of the hold → end.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lifeboat_common::protocol::{TagKind, TagSource};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{AppConfig, QuiesceMode};
use crate::quiesce::{FsFreeze, QuiesceError, Quiescer, VssTest};
use crate::stream::Stream;

/// Bound of the thaw step (FITHAW does not flush; it returns at once).
const THAW_TIMEOUT: Duration = Duration::from_secs(10);
/// Slack over a scripts step's own bound (the script runner kills at it).
const SCRIPTS_SLACK: Duration = Duration::from_secs(5);

/// A placed app-consistent point.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct AppPoint {
    pub seq: u64,
    pub source: TagSource,
    pub label: String,
    pub time: String,
    /// A post-thaw script or a thaw that failed after the tag was placed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// Why no app-consistent point was placed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AppPointError {
    #[error("no app-consistent point is configured: list mount points in [app] freeze or scripts in [app] pre-freeze/post-thaw")]
    NotConfigured,
    #[error("another app-consistent point is being taken")]
    Busy,
    #[error("no recovery point can be taken now: {0}")]
    Inconsistent(String),
    #[error("{step} failed: {why}; no point was placed, filesystems thawed")]
    Failed { step: &'static str, why: String },
}

/// What status shows.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct AppStatus {
    pub configured: bool,
    pub quiesce: String,
    pub interval: String,
    /// The step under way (`prepare`, `freeze`, `tag`, `thaw`, `finish`).
    pub running: Option<&'static str>,
    pub last_point: Option<AppPoint>,
    pub last_failure: Option<Failure>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Failure {
    pub time: String,
    pub error: String,
}

/// Makes one quiescer per attempt (label given).
pub type MakeQuiescer = Box<dyn Fn(&str) -> Arc<dyn Quiescer> + Send + Sync>;

pub struct AppPoints {
    cfg: AppConfig,
    make: MakeQuiescer,
    stream: Arc<Stream>,
    /// Held by the attempt under way (a [`Quiesced`] carries it).
    busy: Arc<tokio::sync::Mutex<()>>,
    status: Arc<Mutex<AppStatus>>,
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn lock(status: &Mutex<AppStatus>) -> std::sync::MutexGuard<'_, AppStatus> {
    status.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `f` on a thread of its own and waits for it at most `bound`. A panic
/// is an error; past the bound the thread is left to finish by itself.
pub async fn bounded<T: Send + 'static>(
    what: &'static str,
    bound: Duration,
    f: impl FnOnce() -> Result<T, QuiesceError> + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("app-{what}"))
        .spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let _ = tx.send(r);
        })
        .map_err(|e| format!("starting a thread for {what}: {e}"))?;
    match tokio::time::timeout(bound, rx).await {
        Ok(Ok(Ok(r))) => r.map_err(|e| e.to_string()),
        Ok(Ok(Err(_))) | Ok(Err(_)) => Err(format!("{what} panicked")),
        Err(_) => Err(format!(
            "did not finish within {}",
            humantime::format_duration(bound)
        )),
    }
}

/// Thaws when dropped (the sequence's future dropped or panicking), on a
/// thread of its own so that a drop never blocks.
struct ThawGuard(Option<Arc<dyn Quiescer>>);

impl ThawGuard {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for ThawGuard {
    fn drop(&mut self) {
        if let Some(q) = self.0.take() {
            warn!("app-consistent point abandoned: thawing");
            let _ = std::thread::Builder::new()
                .name("app-thaw-guard".into())
                .spawn(move || {
                    let _ = q.thaw();
                });
        }
    }
}

/// Thaws at `after` unless told first (or at once when the sequence is
/// dropped without telling): whatever the runtime does, no filesystem stays
/// frozen past the bound.
fn watchdog(q: Arc<dyn Quiescer>, after: Duration) -> std::sync::mpsc::Sender<()> {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let _ = std::thread::Builder::new()
        .name("app-thaw-watchdog".into())
        .spawn(move || {
            match rx.recv_timeout(after) {
                Ok(()) => {} // the sequence thawed
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    warn!(
                        "filesystems frozen for {}: thawing (their bound)",
                        humantime::format_duration(after)
                    );
                    let _ = q.thaw();
                }
                // The sequence is gone without saying it thawed.
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    let _ = q.thaw();
                }
            }
        });
    tx
}

/// What ending a quiesced attempt gave: the thaw's and the post-thaw
/// scripts' outcome.
pub struct Ended {
    pub thawed: Result<(), String>,
    pub finished: Result<(), String>,
}

impl Ended {
    /// A thaw or post-thaw failure, as a warning of a point placed anyway.
    pub fn warning(&self) -> Option<String> {
        match (&self.thawed, &self.finished) {
            (Err(e), _) => Some(format!("thawing: {e}")),
            (Ok(()), Err(e)) => Some(format!("post-thaw: {e}")),
            (Ok(()), Ok(())) => None,
        }
    }
}

/// A machine quiesced for a point (pre-freeze scripts run, filesystems
/// frozen), holding the one attempt there may be. [`Quiesced::end`] thaws,
/// then runs the post-thaw scripts, on a thread of its own; dropped without
/// `end`, the guard thaws at once; whatever happens, the watchdog thaws at
/// the bound given to [`AppPoints::quiesce`].
pub struct Quiesced {
    q: Arc<dyn Quiescer>,
    source: TagSource,
    guard: ThawGuard,
    watchdog: std::sync::mpsc::Sender<()>,
    finish_bound: Duration,
    status: Arc<Mutex<AppStatus>>,
    busy: tokio::sync::OwnedMutexGuard<()>,
}

impl Quiesced {
    pub fn source(&self) -> TagSource {
        self.source
    }

    /// Thaws, then runs the post-thaw scripts, on a thread of its own (FITHAW
    /// may write, e.g. ext4's superblock, and that write may need this
    /// agent's write gate: never call this under a write hold you wait on).
    /// The receiver gets the outcome; the thread ends the attempt.
    pub fn end(
        self,
    ) -> (
        std::thread::JoinHandle<()>,
        tokio::sync::oneshot::Receiver<Ended>,
    ) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let Quiesced {
            q,
            mut guard,
            watchdog,
            finish_bound,
            status,
            busy,
            ..
        } = self;
        let run = move || {
            let step = |s| lock(&status).running = s;
            step(Some("thaw"));
            let thawed = catch(|| q.thaw());
            guard.disarm();
            let _ = watchdog.send(());
            step(Some("finish"));
            let started = std::time::Instant::now();
            let mut finished = catch(|| q.finish());
            if finished.is_ok() && started.elapsed() > finish_bound {
                finished = Err(format!(
                    "took {} (bound {})",
                    humantime::format_duration(started.elapsed()),
                    humantime::format_duration(finish_bound)
                ));
            }
            if let Err(e) = &finished {
                warn!("post-thaw: {e}");
            }
            step(None);
            drop(busy);
            let _ = tx.send(Ended { thawed, finished });
        };
        let handle = std::thread::Builder::new()
            .name("app-thaw".into())
            .spawn(run)
            .unwrap_or_else(|e| {
                // No thread: the dropped guard thaws and the watchdog too.
                warn!("starting the thaw thread: {e}");
                std::thread::spawn(|| {})
            });
        (handle, rx)
    }
}

/// `f`, a panic made an error.
fn catch(f: impl FnOnce() -> Result<(), QuiesceError>) -> Result<(), String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("panicked".into()),
    }
}

/// `bound`, or less when `deadline` comes first (then also saying so).
fn within(bound: Duration, deadline: Option<tokio::time::Instant>) -> (Duration, bool) {
    match deadline {
        Some(d) if d.saturating_duration_since(tokio::time::Instant::now()) < bound => (
            d.saturating_duration_since(tokio::time::Instant::now()),
            true,
        ),
        _ => (bound, false),
    }
}

impl AppPoints {
    /// The quiescer `cfg.quiesce` names; `keep_writable` are paths whose
    /// filesystem must never be frozen (state directory, disk backing files).
    pub fn new(cfg: AppConfig, stream: Arc<Stream>, keep_writable: Vec<PathBuf>) -> AppPoints {
        let make: MakeQuiescer = match cfg.quiesce {
            QuiesceMode::Fsfreeze => {
                let app = cfg.clone();
                Box::new(move |label: &str| {
                    Arc::new(FsFreeze::new(&app, label, keep_writable.clone())) as Arc<dyn Quiescer>
                })
            }
            QuiesceMode::VssTest => {
                warn!("[app] quiesce = \"vss-test\" is for tests only: app-consistent points are recorded as vss without quiescing anything");
                Box::new(|_: &str| Arc::new(VssTest) as Arc<dyn Quiescer>)
            }
        };
        AppPoints::with_quiescer(cfg, stream, make)
    }

    /// With any quiescer (tests inject one).
    pub fn with_quiescer(cfg: AppConfig, stream: Arc<Stream>, make: MakeQuiescer) -> AppPoints {
        let status = AppStatus {
            configured: cfg.configured(),
            quiesce: match cfg.quiesce {
                QuiesceMode::Fsfreeze => "fsfreeze".into(),
                QuiesceMode::VssTest => "vss-test".into(),
            },
            interval: humantime::format_duration(cfg.interval).to_string(),
            ..Default::default()
        };
        AppPoints {
            cfg,
            make,
            stream,
            busy: Arc::new(tokio::sync::Mutex::new(())),
            status: Arc::new(Mutex::new(status)),
        }
    }

    pub fn status(&self) -> AppStatus {
        self.lock_status().clone()
    }

    fn lock_status(&self) -> std::sync::MutexGuard<'_, AppStatus> {
        lock(&self.status)
    }

    /// Whether this machine quiesces for its points (`[app]` configured).
    pub fn configured(&self) -> bool {
        self.cfg.configured()
    }

    pub(crate) fn step(&self, step: Option<&'static str>) {
        self.lock_status().running = step;
    }

    /// Records a placed point (and a warning that came with it) in status.
    pub fn placed(&self, p: &AppPoint) {
        info!(
            seq = p.seq,
            "app-consistent point placed ({}){}",
            p.source.as_str(),
            p.warning
                .as_ref()
                .map(|w| format!("; but {w}"))
                .unwrap_or_default()
        );
        let mut s = self.lock_status();
        s.last_point = Some(p.clone());
        if let Some(w) = &p.warning {
            s.last_failure = Some(Failure {
                time: now_rfc3339(),
                error: w.clone(),
            });
        }
    }

    /// Records a failed attempt in the log and status.
    pub fn failed(&self, e: &AppPointError) {
        warn!("app-consistent point not taken: {e}");
        self.lock_status().last_failure = Some(Failure {
            time: now_rfc3339(),
            error: e.to_string(),
        });
    }

    /// Takes one app-consistent point: the whole sequence, every step bounded.
    pub async fn take(&self, label: &str) -> Result<AppPoint, AppPointError> {
        let r = self.sequence(label).await;
        self.step(None);
        match &r {
            Ok(p) => self.placed(p),
            Err(e) => self.failed(e),
        }
        r
    }

    async fn sequence(&self, label: &str) -> Result<AppPoint, AppPointError> {
        let cfg = &self.cfg;
        let quiesced = self.quiesce(label, None, cfg.freeze_hold).await?;
        let source = quiesced.source();
        self.step(Some("tag"));
        let tag = match tokio::time::timeout(
            cfg.freeze_hold,
            self.stream.tag(TagKind::App, Some(source), label),
        )
        .await
        {
            Ok(Some(seq)) => Ok(seq),
            Ok(None) => Err(AppPointError::Inconsistent(
                self.stream
                    .why_inconsistent()
                    .unwrap_or_else(|| "the state changed while writes drained".into()),
            )),
            Err(_) => Err(AppPointError::Failed {
                step: "tag",
                why: format!(
                    "in-flight writes did not drain within {} (freeze-hold)",
                    humantime::format_duration(cfg.freeze_hold)
                ),
            }),
        };
        let ended = self.end(quiesced).await;
        let seq = tag?;
        Ok(AppPoint {
            seq,
            source,
            label: label.to_string(),
            time: now_rfc3339(),
            warning: ended.warning(),
        })
    }

    /// Ends `q` and waits for its thaw and post-thaw scripts, bounded.
    pub(crate) async fn end(&self, q: Quiesced) -> Ended {
        let bound = THAW_TIMEOUT + q.finish_bound;
        let (_thread, rx) = q.end();
        match tokio::time::timeout(bound, rx).await {
            Ok(Ok(ended)) => ended,
            _ => Ended {
                thawed: Ok(()),
                finished: Err(format!(
                    "thaw and post-thaw did not finish within {}",
                    humantime::format_duration(bound)
                )),
            },
        }
    }

    /// Quiesces the machine for a point: checks (configured, one attempt,
    /// streaming), the pre-freeze scripts, the freeze — each step bounded by
    /// its own bound, and all by `deadline` if one is given. Once frozen,
    /// the watchdog thaws at freeze-timeout + `hold` whatever happens. A
    /// failed step is thawed and its post-thaw scripts run before the error
    /// returns (it names the step).
    pub async fn quiesce(
        &self,
        label: &str,
        deadline: Option<tokio::time::Instant>,
        hold: Duration,
    ) -> Result<Quiesced, AppPointError> {
        self.quiesce_in(label, deadline, hold, true).await
    }

    /// [`Self::quiesce`] whatever state the stream is in (a planned
    /// failover's final point waits for it to settle while quiesced).
    pub async fn quiesce_unsettled(
        &self,
        label: &str,
        deadline: Option<tokio::time::Instant>,
        hold: Duration,
    ) -> Result<Quiesced, AppPointError> {
        self.quiesce_in(label, deadline, hold, false).await
    }

    async fn quiesce_in(
        &self,
        label: &str,
        deadline: Option<tokio::time::Instant>,
        hold: Duration,
        settled: bool,
    ) -> Result<Quiesced, AppPointError> {
        if !self.cfg.configured() {
            return Err(AppPointError::NotConfigured);
        }
        let busy = match (settled, deadline) {
            // A final point waits for an attempt under way (a scheduled
            // point, the thaw of a final point before it) up to its bound.
            (false, Some(d)) => tokio::time::timeout_at(d, self.busy.clone().lock_owned())
                .await
                .map_err(|_| AppPointError::Busy)?,
            _ => self
                .busy
                .clone()
                .try_lock_owned()
                .map_err(|_| AppPointError::Busy)?,
        };
        if let Some(why) = self.stream.why_inconsistent().filter(|_| settled) {
            return Err(AppPointError::Inconsistent(why));
        }
        // The previous point's checksums before the scripts run and
        // anything is frozen (the watchdog and the freeze bounds start after
        // this): the tag placed while frozen must not wait (`pointsum.rs`).
        self.stream.wait_point_sums().await;
        let cfg = &self.cfg;
        let q = (self.make)(label);
        let source = q.source();
        let failed = |step, (why, by_deadline): (String, bool)| AppPointError::Failed {
            step,
            why: if by_deadline {
                format!("{why} (the quiesce-timeout it was given)")
            } else {
                why
            },
        };
        let finish_bound = cfg.script_timeout * (cfg.post_thaw.len() as u32) + SCRIPTS_SLACK;

        self.step(Some("prepare"));
        let (bound, by_deadline) = within(
            cfg.script_timeout * (cfg.pre_freeze.len() as u32) + SCRIPTS_SLACK,
            deadline,
        );
        let qq = q.clone();
        let prepared = bounded("pre-freeze", bound, move || qq.prepare()).await;

        // From here on every path thaws (a thaw before a freeze is harmless).
        let quiesced = Quiesced {
            q: q.clone(),
            source,
            guard: ThawGuard(Some(q.clone())),
            watchdog: watchdog(q.clone(), cfg.freeze_timeout + hold),
            finish_bound,
            status: self.status.clone(),
            busy,
        };
        if let Err(why) = prepared {
            self.end(quiesced).await;
            return Err(failed("pre-freeze", (why, by_deadline)));
        }
        self.step(Some("freeze"));
        let (bound, by_deadline) = within(cfg.freeze_timeout, deadline);
        let qq = q.clone();
        if let Err(why) = bounded("freeze", bound, move || qq.freeze()).await {
            self.end(quiesced).await;
            return Err(failed("freeze", (why, by_deadline)));
        }
        self.step(Some("frozen"));
        Ok(quiesced)
    }

    /// Takes a point every `interval` until cancelled (nothing when no
    /// quiescing is configured).
    pub async fn schedule(self: Arc<Self>, cancel: CancellationToken) {
        if !self.cfg.configured() {
            info!("no app-consistent points scheduled: [app] lists no filesystem to freeze and no script");
            return;
        }
        let every = self.cfg.interval;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if self.stream.writes_refused().is_some() {
                        // After a planned failover's final point nothing is
                        // written here: no point to quiesce for.
                        continue;
                    }
                    // Failures are logged and shown in status by `take`.
                    let _ = self.take("scheduled").await;
                }
                _ = cancel.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    /// Counts calls; `freeze` sleeps `freeze_for` (a FIFREEZE that hangs),
    /// `prepare` fails when `fail_prepare`, `freeze` panics when `panic`.
    #[derive(Default)]
    struct Fake {
        freeze_for: Duration,
        fail_prepare: bool,
        panic: bool,
        frozen: Mutex<bool>,
        prepares: AtomicUsize,
        freezes: AtomicUsize,
        thaws: AtomicUsize,
        finishes: AtomicUsize,
    }

    impl Quiescer for Fake {
        fn source(&self) -> TagSource {
            TagSource::Fsfreeze
        }
        fn prepare(&self) -> Result<(), QuiesceError> {
            self.prepares.fetch_add(1, Ordering::SeqCst);
            if self.fail_prepare {
                return Err(QuiesceError::Script {
                    phase: "pre-freeze",
                    path: "/x.sh".into(),
                    why: "exit status: 1".into(),
                });
            }
            Ok(())
        }
        fn freeze(&self) -> Result<(), QuiesceError> {
            self.freezes.fetch_add(1, Ordering::SeqCst);
            *self.frozen.lock().unwrap() = true;
            if self.panic {
                panic!("freeze blew up");
            }
            std::thread::sleep(self.freeze_for);
            Ok(())
        }
        fn thaw(&self) -> Result<(), QuiesceError> {
            self.thaws.fetch_add(1, Ordering::SeqCst);
            *self.frozen.lock().unwrap() = false;
            Ok(())
        }
        fn finish(&self) -> Result<(), QuiesceError> {
            self.finishes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn setup(fake: Arc<Fake>, cfg: AppConfig) -> (tempfile::TempDir, Arc<Stream>, AppPoints) {
        let dir = tempfile::tempdir().unwrap();
        let (journal, replay) = crate::journal::Journal::open(dir.path()).unwrap();
        let stream = Stream::new(journal, replay, 16 << 20);
        stream.mark_welcomed();
        let cfg = AppConfig {
            freeze: vec!["/srv/db".into()],
            ..cfg
        };
        let app = AppPoints::with_quiescer(
            cfg,
            stream.clone(),
            Box::new(move |_: &str| fake.clone() as Arc<dyn Quiescer>),
        );
        (dir, stream, app)
    }

    fn quick() -> AppConfig {
        AppConfig {
            freeze_timeout: Duration::from_secs(1),
            freeze_hold: Duration::from_secs(1),
            ..Default::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_point_records_its_source_and_every_step_runs_once() {
        let fake = Arc::new(Fake::default());
        let (_d, stream, app) = setup(fake.clone(), quick());
        let before = stream.positions().captured;
        let p = app.take("nightly").await.unwrap();
        assert_eq!((p.seq, p.source), (before + 1, TagSource::Fsfreeze));
        let calls = |f: &Fake| {
            [&f.prepares, &f.freezes, &f.thaws, &f.finishes].map(|c| c.load(Ordering::SeqCst))
        };
        assert_eq!(calls(&fake), [1, 1, 1, 1]);
        assert!(!*fake.frozen.lock().unwrap());
        let s = app.status();
        assert_eq!(s.last_point.unwrap().seq, p.seq);
        assert!(s.last_failure.is_none() && s.running.is_none());
        let queued = stream.lock_state().poll_transmit(1 << 20);
        assert!(
            queued.iter().any(|f| matches!(f,
                lifeboat_common::session::Outgoing::Frame(lifeboat_common::protocol::Frame::Tag(e)) if e.seq == p.seq && matches!(e.op,
                    lifeboat_common::protocol::Op::Tag { kind: TagKind::App, source: Some(TagSource::Fsfreeze), .. }))),
            "{queued:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hung_freeze_is_given_up_at_its_bound_thawed_and_crash_tags_go_on() {
        let fake = Arc::new(Fake {
            freeze_for: Duration::from_secs(4),
            ..Default::default()
        });
        let (_d, stream, app) = setup(fake.clone(), quick());
        let app = Arc::new(app);
        let t = Instant::now();
        let a = app.clone();
        let attempt = tokio::spawn(async move { a.take("x").await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        // The freeze hangs: a crash-consistent tag does not wait for it.
        let crash = tokio::time::timeout(
            Duration::from_millis(500),
            stream.tag(TagKind::Crash, None, ""),
        )
        .await
        .expect("the crash tag waited behind the quiesce");
        assert!(crash.is_some());
        assert_eq!(app.status().running, Some("freeze"));
        let e = attempt.await.unwrap().unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        assert!(
            e.to_string()
                .contains("freeze failed: did not finish within 1s"),
            "{e}"
        );
        assert!(fake.thaws.load(Ordering::SeqCst) >= 1);
        assert_eq!(fake.finishes.load(Ordering::SeqCst), 1);
        // Only the crash tag is in the stream.
        assert_eq!(stream.positions().captured, crash.unwrap());
        let s = app.status();
        assert!(s.last_failure.unwrap().error.contains("freeze failed"));
        assert!(s.last_point.is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_that_do_not_drain_end_the_hold_at_its_bound() {
        let fake = Arc::new(Fake::default());
        let (_d, stream, app) = setup(fake.clone(), quick());
        let before = stream.positions().captured;
        // A write in flight that never completes: the tag cannot drain.
        let permit = stream.write_permit().await;
        let t = Instant::now();
        let e = app.take("x").await.unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        assert!(e.to_string().contains("tag failed"), "{e}");
        assert!(!*fake.frozen.lock().unwrap(), "left frozen");
        assert_eq!(stream.positions().captured, before, "a tag was placed");
        drop(permit);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_prepare_freezes_nothing_and_still_runs_post_thaw() {
        let fake = Arc::new(Fake {
            fail_prepare: true,
            ..Default::default()
        });
        let (_d, stream, app) = setup(fake.clone(), quick());
        let before = stream.positions().captured;
        let e = app.take("x").await.unwrap_err();
        assert!(
            e.to_string()
                .contains("pre-freeze failed: pre-freeze script /x.sh"),
            "{e}"
        );
        assert_eq!(fake.freezes.load(Ordering::SeqCst), 0);
        assert_eq!(fake.finishes.load(Ordering::SeqCst), 1);
        assert_eq!(stream.positions().captured, before);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_freeze_that_panics_is_thawed_and_reported() {
        let fake = Arc::new(Fake {
            panic: true,
            ..Default::default()
        });
        let (_d, _stream, app) = setup(fake.clone(), quick());
        let e = app.take("x").await.unwrap_err();
        assert!(e.to_string().contains("freeze panicked"), "{e}");
        assert!(!*fake.frozen.lock().unwrap(), "left frozen");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_abandoned_attempt_is_thawed_by_its_guard() {
        let fake = Arc::new(Fake {
            freeze_for: Duration::from_millis(300),
            ..Default::default()
        });
        let (_d, _stream, app) = setup(fake.clone(), quick());
        // The control connection's task is dropped mid-freeze.
        let _ = tokio::time::timeout(Duration::from_millis(100), app.take("x")).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(fake.thaws.load(Ordering::SeqCst) >= 1);
        assert!(!*fake.frozen.lock().unwrap(), "left frozen");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nothing_configured_is_refused_by_name_and_one_attempt_runs_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, replay) = crate::journal::Journal::open(dir.path()).unwrap();
        let stream = Stream::new(journal, replay, 16 << 20);
        stream.mark_welcomed();
        let app = AppPoints::new(AppConfig::default(), stream.clone(), vec![]);
        let e = app.take("x").await.unwrap_err();
        assert!(e.to_string().contains("[app] freeze"), "{e}");
        let fake = Arc::new(Fake {
            freeze_for: Duration::from_millis(500),
            ..Default::default()
        });
        let (_d, _s, app) = setup(fake, quick());
        let (a, b) = tokio::join!(app.take("a"), async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            app.take("b").await
        });
        assert!(a.is_ok());
        assert!(matches!(b, Err(AppPointError::Busy)), "{b:?}");
    }
}
