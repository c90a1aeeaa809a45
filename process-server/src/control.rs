//! The process server's local control socket (`<cache-dir>/control.sock`, mode
//! 0600): one JSON request per line; replies are JSON lines.
//!
//! ```text
//! {"cmd":"resync","machine":"web-1","disk":null}
//!   → {"event":"progress","regions-compared":..,"regions-differ":..,..}*
//!     and {"event":"interrupted","reason":".."} when the session ends before
//!     the resync (the agent resumes it when it reconnects; events go on)
//!   → {"ok":true,"event":"done","hashed-bytes":..,"hash-bytes":..,"block-bytes":..,..}
//!   or {"ok":false,"error":".."}
//! {"cmd":"status"}
//!   → {"ok":true,"server-id":"..","address":"..","time":"..","health":{..},
//!      "cache":{"dir":"..","writable":true,"error":null,"since":null,
//!               "free-bytes":..,"total-bytes":..},
//!      "fenced":{"<machine>":"<why>",..},"groups":{..},"machines":[..],"alerts":[..]}
//!     (the status snapshot of status.rs, the same document as GET /status;
//!     fenced: machines this server lost to another, ownership.rs; cache:
//!     whether the RocksDB cache takes writes and why not, cache.rs;
//!     groups: each [[group]]'s last point and last failure:
//!     "groups":{"<group>":{"last-point":{"id":..,"kind":"app","time":".."},
//!     "last-failure":{"kind":"app","time":"..","error":".."}},..})
//! {"cmd":"group-tag","group":"billing","label":null,"app":false}
//!   → {"ok":true,"group":"billing","id":..,"time":"..","label":"..",
//!      ("kind":"app",) "members":[{"machine":"db-1","seq":..(,"source":"fsfreeze")},..]}
//!      (a group point; groups.rs; `app`: every member quiesced first)
//!   or {"ok":false,"error":".."}   (none recorded: why, naming the member
//!      and the step)
//! {"cmd":"machine-removed","machine":"web-1"}
//!   → {"ok":true,"session-ended":true|false}  (`lifeboat-ps machines
//!      remove` revoked its certificates; its live session, if any, ends)
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use lifeboat_common::receiver::{ResyncEvent, Sessions};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;
use tracing::warn;

pub const SOCKET_NAME: &str = "control.sock";

pub fn socket_path(cache_dir: &Path) -> PathBuf {
    cache_dir.join(SOCKET_NAME)
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Resync {
        machine: String,
        #[serde(default)]
        disk: Option<String>,
    },
    Status,
    GroupTag {
        group: String,
        #[serde(default)]
        label: Option<String>,
        /// An app-consistent group point (every member quiesced first).
        #[serde(default)]
        app: bool,
    },
    /// `lifeboat-ps machines remove` revoked the machine's certificates:
    /// end its live session (it cannot come back).
    MachineRemoved {
        machine: String,
    },
}

/// What the control socket acts on.
pub struct Control {
    pub sessions: Arc<Sessions>,
    pub groups: Arc<crate::groups::Groups>,
    /// What `status` reports (`status.rs`).
    pub hub: Arc<crate::status::Hub>,
}

fn line(v: &serde_json::Value) -> Vec<u8> {
    let mut s = v.to_string();
    s.push('\n');
    s.into_bytes()
}

async fn handle<W: AsyncWriteExt + Unpin>(
    req: Request,
    ctl: &Control,
    wr: &mut W,
) -> std::io::Result<()> {
    let Control {
        sessions,
        groups,
        hub,
    } = ctl;
    let (machine, disk) = match req {
        Request::Resync { machine, disk } => (machine, disk),
        Request::GroupTag { group, label, app } => {
            let kind = if app {
                lifeboat_common::group::GroupKind::App
            } else {
                lifeboat_common::group::GroupKind::Crash
            };
            let reply = match groups.take(&group, label.as_deref(), kind).await {
                Ok(rec) => {
                    let mut v = serde_json::to_value(&rec).unwrap_or_default();
                    v["ok"] = serde_json::Value::Bool(true);
                    v
                }
                Err(e) => serde_json::json!({"ok": false, "error": e}),
            };
            return wr.write_all(&line(&reply)).await;
        }
        Request::MachineRemoved { machine } => {
            let cut = sessions.cut(&machine);
            if cut {
                warn!("machine {machine} was removed: its session is ended (its certificate is revoked)");
            }
            return wr
                .write_all(&line(
                    &serde_json::json!({"ok": true, "session-ended": cut}),
                ))
                .await;
        }
        Request::Status => {
            let reply = match hub.snapshot().await {
                Ok(st) => serde_json::to_value(&st).unwrap_or_default(),
                Err(e) => serde_json::json!({"ok": false, "error": format!("{e:#}")}),
            };
            return wr.write_all(&line(&reply)).await;
        }
    };
    let mut events = match sessions.start_resync(&machine, disk.as_deref()) {
        Ok(rx) => rx,
        Err(e) => {
            return wr
                .write_all(&line(&serde_json::json!({"ok": false, "error": e})))
                .await
        }
    };
    while let Some(ev) = events.recv().await {
        let mut v = serde_json::to_value(&ev).unwrap_or_default();
        if let ResyncEvent::Done(r) = &ev {
            v["ok"] = serde_json::Value::Bool(r.error.is_empty());
            if !r.error.is_empty() {
                v["error"] = serde_json::Value::String(format!("agent: {}", r.error));
            }
            return wr.write_all(&line(&v)).await;
        }
        wr.write_all(&line(&v)).await?;
    }
    wr.write_all(&line(&serde_json::json!({
        "ok": false,
        "error": format!("the process server stopped before the resync of {machine} finished"),
    })))
    .await
}

pub async fn serve(path: PathBuf, ctl: Control, cancel: CancellationToken) -> Result<()> {
    let ctl = Arc::new(ctl);
    let listener = lifeboat_common::control::bind_private(&path)?;
    loop {
        let (conn, _) = tokio::select! {
            r = listener.accept() => r?,
            _ = cancel.cancelled() => break,
        };
        let ctl = ctl.clone();
        lifeboat_common::spawn(async move {
            let (rd, mut wr) = conn.into_split();
            let mut lines = BufReader::new(rd).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                let r = match serde_json::from_str::<Request>(&l) {
                    Ok(req) => handle(req, &ctl, &mut wr).await,
                    Err(e) => {
                        wr.write_all(&line(
                            &serde_json::json!({"ok": false, "error": format!("bad request: {e}")}),
                        ))
                        .await
                    }
                };
                if let Err(e) = r {
                    warn!("control connection: {e}");
                    break;
                }
            }
        });
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// Sends `req` to a running server; calls `on_event` for every reply line and
/// returns the final one (`ok` true), or an error naming what failed.
pub async fn request(
    path: &Path,
    req: &Request,
    mut on_event: impl FnMut(&serde_json::Value),
) -> Result<serde_json::Value> {
    let conn = UnixStream::connect(path).await.with_context(|| {
        format!(
            "connecting to the process server's control socket {} (is `lifeboat-ps serve` running?)",
            path.display()
        )
    })?;
    let (rd, mut wr) = conn.into_split();
    let mut l = serde_json::to_string(req)?;
    l.push('\n');
    wr.write_all(l.as_bytes()).await?;
    let mut lines = BufReader::new(rd).lines();
    while let Some(reply) = lines.next_line().await? {
        let v: serde_json::Value = serde_json::from_str(&reply)
            .with_context(|| format!("parsing the server's reply {reply:?}"))?;
        if let Some(ok) = v.get("ok").and_then(|o| o.as_bool()) {
            if !ok {
                let msg = v
                    .get("error")
                    .and_then(|e| e.as_str())
                    .unwrap_or("no reason given");
                bail!("the process server refused: {msg}");
            }
            return Ok(v);
        }
        on_event(&v);
    }
    bail!("the process server closed the control connection without a final reply")
}
