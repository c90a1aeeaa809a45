//! Local control sockets, shared by the agent, the process server and the
//! master target: a Unix socket bound private to its user (mode 0600 is the
//! authentication: only that user, or root, can connect), one JSON request
//! per line; and the client side of a one-reply request.

use std::path::Path;

use anyhow::{Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// Binds `path` (a stale socket there is replaced) and makes it private.
pub fn bind_private(path: &Path) -> Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making {} private", path.display()))?;
    Ok(listener)
}

/// Sends one request to the server `who` names (e.g. "the agent") and
/// returns its reply; a reply without `"ok": true` is an error carrying its
/// reason. `serving` is the command that serves the socket, for the error
/// when nothing listens.
pub async fn request_one(
    path: &Path,
    who: &str,
    serving: &str,
    req: &impl serde::Serialize,
) -> Result<serde_json::Value> {
    let conn = UnixStream::connect(path).await.with_context(|| {
        format!(
            "connecting to {who}'s control socket {} (is `{serving}` running?)",
            path.display()
        )
    })?;
    let (rd, mut wr) = conn.into_split();
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    wr.write_all(line.as_bytes()).await?;
    let reply = BufReader::new(rd)
        .lines()
        .next_line()
        .await?
        .with_context(|| format!("{who} closed the control connection without a reply"))?;
    let v: serde_json::Value = serde_json::from_str(&reply)
        .with_context(|| format!("{who} replied {reply:?}, which is not JSON"))?;
    if v.get("ok") != Some(&serde_json::Value::Bool(true)) {
        let msg = v
            .get("error")
            .and_then(|e| e.as_str())
            .unwrap_or("no reason given");
        anyhow::bail!("{who} refused: {msg}");
    }
    Ok(v)
}
