//! Local control sockets, shared by the agent, the process server and the
//! master target: a Unix socket bound private to its user (mode 0600 is the
//! authentication: only that user, or root, can connect), one JSON request
//! per line; the serving loop of one-reply requests, and their client side.

use std::path::Path;

use anyhow::{Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

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

/// Serves `listener` (bound at `path`, removed at the end) until `cancel`:
/// each connection in its own task, each line a request `R` answered by
/// `handle` with one reply line; a line that is not an `R` is answered
/// `bad request`.
pub async fn serve_requests<R, F, Fut>(
    listener: UnixListener,
    path: &Path,
    cancel: CancellationToken,
    handle: F,
) -> Result<()>
where
    R: serde::de::DeserializeOwned + Send + 'static,
    F: Fn(R) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = serde_json::Value> + Send + 'static,
{
    loop {
        let (conn, _) = tokio::select! {
            r = listener.accept() => r?,
            _ = cancel.cancelled() => break,
        };
        let handle = handle.clone();
        crate::spawn(async move {
            let (rd, mut wr) = conn.into_split();
            let mut lines = BufReader::new(rd).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let reply = match serde_json::from_str::<R>(&line) {
                    Ok(req) => handle(req).await,
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
