//! The HTTP status endpoint (`[http]` in ps.toml; off when absent), axum on
//! HTTP/1.1:
//!
//! ```text
//! GET /status    the status snapshot as JSON, the data `lifeboat-ps status --json` prints
//! GET /metrics   the same snapshot in the Prometheus text format (metrics.rs)
//! ```
//!
//! Every request needs `Authorization: Bearer <token>`, the token being the
//! content of `token-file` (surrounding whitespace ignored; `lifeboat-ps init`
//! writes a random one to `http.token`, 0600); without it the answer is 401.
//! The token is compared in constant time. Plain HTTP: put it on loopback or
//! a management network, or behind a TLS proxy.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::status::Hub;

/// Reads the bearer token, refusing an unreadable or empty file by name.
pub fn read_token(path: &Path) -> Result<String> {
    let t = std::fs::read_to_string(path).with_context(|| {
        format!(
            "reading the HTTP token file {} ([http] token-file; `lifeboat-ps init` writes one, or put any secret in it)",
            path.display()
        )
    })?;
    let t = t.trim().to_string();
    if t.is_empty() {
        bail!("the HTTP token file {} is empty", path.display());
    }
    Ok(t)
}

/// A new random token (64 hex digits).
pub fn new_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    lifeboat_common::hex(&b)
}

fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Clone)]
struct App {
    hub: Arc<Hub>,
    token: Arc<String>,
}

async fn auth(State(app): State<App>, headers: HeaderMap, req: Request, next: Next) -> Response {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(t) if same(t.as_bytes(), app.token.as_bytes()) => next.run(req).await,
        _ => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "401: send Authorization: Bearer <the token in [http] token-file>\n",
        )
            .into_response(),
    }
}

fn failed(e: anyhow::Error) -> Response {
    warn!("HTTP status: {e:#}");
    (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")).into_response()
}

async fn status(State(app): State<App>) -> Response {
    match app.hub.snapshot().await {
        Ok(st) => Json(st).into_response(),
        Err(e) => failed(e),
    }
}

async fn metrics(State(app): State<App>) -> Response {
    match app.hub.snapshot().await {
        Ok(st) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            crate::metrics::render(&st, &app.hub.alerts),
        )
            .into_response(),
        Err(e) => failed(e),
    }
}

/// Binds `listen` (an error names it) and returns the server's future,
/// which runs until `cancel`.
pub async fn bind(
    listen: SocketAddr,
    token: String,
    hub: Arc<Hub>,
    cancel: CancellationToken,
) -> Result<impl std::future::Future<Output = ()>> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening for HTTP on {listen} ([http] listen)"))?;
    info!("status and metrics on http://{}", listener.local_addr()?);
    let app = App {
        hub,
        token: Arc::new(token),
    };
    let router = Router::new()
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(app.clone(), auth))
        .with_state(app);
    Ok(async move {
        let r = axum::serve(listener, router)
            .with_graceful_shutdown(async move { cancel.cancelled().await })
            .await;
        if let Err(e) = r {
            warn!("HTTP server on {listen}: {e}");
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
        let t = new_token();
        assert_eq!(t.len(), 64);
        assert_ne!(t, new_token());
    }

    #[test]
    fn an_empty_or_missing_token_file_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        let e = read_token(&p).unwrap_err().to_string();
        assert!(e.contains(&p.display().to_string()), "{e}");
        std::fs::write(&p, "\n").unwrap();
        assert!(read_token(&p).unwrap_err().to_string().contains("empty"));
        std::fs::write(&p, " s3cret\n").unwrap();
        assert_eq!(read_token(&p).unwrap(), "s3cret");
    }
}
