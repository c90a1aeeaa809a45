//! The agent's local control socket (`<state-dir>/control.sock`, mode 0600):
//! one JSON request per line, one JSON reply per line.
//!
//! ```text
//! {"cmd":"status"}                 → {"ok":true,"machine":..,"connected":..,"positions":{..},"disks":[..]}
//! {"cmd":"tag","label":"before-upgrade"} → {"ok":true,"seq":N}
//! ```

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{Context, Result};
use lifeboat_common::protocol::{DiskInfo, TagKind};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::sender::Link;
use crate::stream::Stream;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Tag {
        #[serde(default)]
        label: String,
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
}

impl Control {
    async fn handle(&self, req: Request) -> serde_json::Value {
        match req {
            Request::Status => serde_json::json!({
                "ok": true,
                "machine": self.machine,
                "connected": self.link.connected.load(Ordering::Relaxed),
                "last-error": *self.link.last_error.lock().unwrap_or_else(|p| p.into_inner()),
                "positions": self.stream.positions(),
                "disks": self.disks,
                "sync": self.sync.iter().map(|p| p.snapshot()).collect::<Vec<_>>(),
                "state": self.stream.mode().0,
                "state-reason": self.stream.mode().1,
                "resync-bytes": self.stream.resync_bytes.load(std::sync::atomic::Ordering::Relaxed),
                "checksum-resync": self.checksum.snapshot(),
                "dirty-regions": self.dirty.iter().map(|d| serde_json::json!({
                    "disk": d.id, "dirty": d.dirty.dirty_count(), "activity-log": d.dirty.logged_count(),
                })).collect::<Vec<_>>(),
            }),
            Request::Tag { label } => {
                if !self.stream.consistent() {
                    return serde_json::json!({"ok": false, "error": "initial sync in progress: the replica is not consistent yet, so no recovery point can be taken (see `lifeboat-agent status`)"});
                }
                match self.stream.tag(TagKind::Crash, &label).await {
                    Some(seq) => serde_json::json!({"ok": true, "seq": seq}),
                    None => serde_json::json!({"ok": false, "error": format!(
                        "the replica is not consistent now (state {:?}: {}), so no recovery point can be taken",
                        self.stream.mode().0, self.stream.mode().1)}),
                }
            }
        }
    }
}

pub async fn serve(path: &Path, control: Arc<Control>, cancel: CancellationToken) -> Result<()> {
    let _ = std::fs::remove_file(path);
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    loop {
        let (conn, _) = tokio::select! {
            r = listener.accept() => r?,
            _ = cancel.cancelled() => break,
        };
        let control = control.clone();
        tokio::spawn(async move {
            let (rd, mut wr) = conn.into_split();
            let mut lines = BufReader::new(rd).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let reply = match serde_json::from_str::<Request>(&line) {
                    Ok(req) => control.handle(req).await,
                    Err(e) => {
                        serde_json::json!({"ok": false, "error": format!("bad request: {e}")})
                    }
                };
                let mut out = reply.to_string();
                out.push('\n');
                if wr.write_all(out.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
    let _ = std::fs::remove_file(path);
    Ok(())
}

/// Sends one request to a running agent and returns its reply.
pub async fn request(path: &Path, req: &Request) -> Result<serde_json::Value> {
    let conn = UnixStream::connect(path).await.with_context(|| {
        format!(
            "connecting to the agent's control socket {} (is `lifeboat-agent run` running?)",
            path.display()
        )
    })?;
    let (rd, mut wr) = conn.into_split();
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    wr.write_all(line.as_bytes()).await?;
    let mut lines = BufReader::new(rd).lines();
    let reply = lines
        .next_line()
        .await?
        .context("the agent closed the control connection without a reply")?;
    let v: serde_json::Value = serde_json::from_str(&reply)?;
    if v.get("ok") != Some(&serde_json::Value::Bool(true)) {
        let msg = v
            .get("error")
            .and_then(|e| e.as_str())
            .unwrap_or("no reason given");
        anyhow::bail!("the agent refused: {msg}");
    }
    Ok(v)
}
