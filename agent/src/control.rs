//! The agent's local control socket (`<state-dir>/control.sock`, mode 0600):
//! one JSON request per line, one JSON reply per line.
//!
//! ```text
//! {"cmd":"status"}                 → {"ok":true,"machine":..,"connected":..,"positions":{..},"disks":[..]}
//! {"cmd":"tag","label":"before-upgrade"} → {"ok":true,"seq":N}
//! {"cmd":"tag","label":"L","app":true} → {"ok":true,"seq":N,"kind":"app","source":"fsfreeze"[,"warning":".."]}
//!                                  or {"ok":false,"error":"app-consistent point: pre-freeze failed: .."}
//! {"cmd":"resume-writes"}          → {"ok":true,"final-point":{"seq":N,..}|null}
//!                                  (writes refused after a planned failover's
//!                                  final point are taken again; finalpoint.rs)
//! ```
//!
//! An app-consistent tag runs the whole quiesce sequence (`apppoint.rs`)
//! before it replies; each connection is served by its own task, so status
//! and crash-consistent tags are answered meanwhile.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Result;
use lifeboat_common::protocol::{DiskInfo, TagKind};
use serde::{Deserialize, Serialize};

use tokio_util::sync::CancellationToken;

use crate::sender::Link;
use crate::stream::Stream;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    /// Take writes again after a planned failover's final point.
    ResumeWrites,
    Tag {
        #[serde(default)]
        label: String,
        /// An app-consistent point (quiesce first) instead of a crash-consistent one.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        app: bool,
    },
}

pub struct Control {
    pub machine: String,
    pub disks: Vec<DiskInfo>,
    pub stream: Arc<Stream>,
    pub link: Arc<Link>,
    pub sync: Vec<Arc<crate::sync::SyncProgress>>,
    pub dirty: Vec<Arc<crate::disk::ProtectedDisk>>,
    pub checksum: Arc<crate::checksum::Checksum>,
    pub app: Arc<crate::apppoint::AppPoints>,
    pub finals: Arc<crate::finalpoint::FinalPoints>,
}

/// Unacknowledged entries with no acknowledgement for this long: `stalled`.
pub const STALL_AFTER: std::time::Duration = std::time::Duration::from_secs(30);

impl Control {
    /// The state status shows, its reason and since when (RFC 3339; for
    /// `stalled` only): the replication mode, unless entries wait for an
    /// acknowledgement that has not come for [`STALL_AFTER`].
    fn state(
        &self,
        positions: &crate::stream::Positions,
    ) -> (&'static str, String, Option<String>) {
        if let Some(t) = self.finals.status() {
            return ("failed-over", t.why(), Some(t.time));
        }
        if let Some(why) = self.stream.writes_refused() {
            return ("final-point", why, None);
        }
        let (mode, reason) = self.stream.mode();
        let quiet = self.link.since_progress();
        if positions.captured > positions.acked && quiet >= STALL_AFTER {
            let why = match (
                self.link.connected.load(Ordering::Relaxed),
                self.link.last_error(),
            ) {
                (_, Some(e)) => format!("nothing acknowledged for {}s: {e}", quiet.as_secs()),
                (true, None) => format!(
                    "connected, but nothing acknowledged for {}s ({} entries waiting)",
                    quiet.as_secs(),
                    positions.captured - positions.acked
                ),
                (false, None) => format!("not connected for {}s", quiet.as_secs()),
            };
            let since = chrono::Utc::now()
                - chrono::Duration::from_std(quiet).unwrap_or(chrono::Duration::zero());
            return (
                "stalled",
                format!("{why} (mode {}: {reason})", mode.as_str()),
                Some(since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
            );
        }
        if mode == crate::stream::Mode::Streaming && !self.stream.repl().snapshot().welcomed {
            return (
                "connecting",
                "waiting for the process server's welcome (it confirms the stream's numbering)"
                    .into(),
                None,
            );
        }
        (mode.as_str(), reason, None)
    }

    async fn handle(&self, req: Request) -> serde_json::Value {
        match req {
            Request::Status => {
                let positions = self.stream.positions();
                let (state, reason, since) = self.state(&positions);
                serde_json::json!({
                "ok": true,
                "machine": self.machine,
                "connected": self.link.connected.load(Ordering::Relaxed),
                "last-error": self.link.last_error(),
                "positions": positions,
                "disks": self.disks,
                "sync": self.sync.iter().map(|p| p.snapshot()).collect::<Vec<_>>(),
                "state": state,
                "state-reason": reason,
                "state-since": since,
                "mode": self.stream.mode().0,
                "journal-error": self.stream.journal_failing(),
                "resync-bytes": self.stream.resync_bytes.load(std::sync::atomic::Ordering::Relaxed),
                "checksum-resync": self.checksum.snapshot(),
                "app-points": self.app.status(),
                "final-point": self.finals.status(),
                "dirty-regions": self.dirty.iter().map(|d| serde_json::json!({
                    "disk": d.id, "dirty": d.dirty.dirty_count(), "activity-log": d.dirty.logged_count(),
                })).collect::<Vec<_>>(),
                })
            }
            Request::ResumeWrites => match self.finals.resume() {
                Ok(t) => serde_json::json!({"ok": true, "final-point": t}),
                Err(e) => serde_json::json!({"ok": false, "error": format!("{e:#}")}),
            },
            Request::Tag { label, app: true } => match self.app.take(&label).await {
                Ok(p) => serde_json::json!({
                    "ok": true, "seq": p.seq, "kind": "app", "source": p.source, "warning": p.warning,
                }),
                Err(e) => serde_json::json!({"ok": false, "error": format!(
                    "app-consistent point: {e} (see `lifeboat-agent status`, app-points)")}),
            },
            Request::Tag { label, app: false } => {
                let refused = |why: String| {
                    serde_json::json!({"ok": false, "error": format!(
                    "no recovery point can be taken now: {why} (see `lifeboat-agent status`)")})
                };
                if let Some(why) = self.stream.why_inconsistent() {
                    return refused(why);
                }
                match self.stream.tag(TagKind::Crash, None, &label).await {
                    Some(seq) => serde_json::json!({"ok": true, "seq": seq}),
                    None => refused(
                        self.stream
                            .why_inconsistent()
                            .unwrap_or_else(|| "the state changed while writes drained".into()),
                    ),
                }
            }
        }
    }
}

pub async fn serve(path: &Path, control: Arc<Control>, cancel: CancellationToken) -> Result<()> {
    let listener = lifeboat_common::control::bind_private(path)?;
    lifeboat_common::control::serve_requests(listener, path, cancel, move |req: Request| {
        let control = control.clone();
        async move { control.handle(req).await }
    })
    .await
}

/// Sends one request to a running agent and returns its reply.
pub async fn request(path: &Path, req: &Request) -> Result<serde_json::Value> {
    lifeboat_common::control::request_one(path, "the agent", "lifeboat-agent run", req).await
}
