//! The HTTP status endpoint (`[http]` in ps.toml; off when absent), axum on
//! HTTP/1.1:
//!
//! ```text
//! GET /          the status page (page.rs): HTML, inline SVG, no script
//! GET /status    the status snapshot as JSON, the data `lifeboat-ps status --json` prints
//! GET /metrics   the same snapshot in the Prometheus text format (metrics.rs)
//! POST /machines/<machine>/final-point[?quiesce-timeout=60s]
//!                a planned failover's final point (lifeboat_common::receiver::finalpoint): 200 with
//!                {"machine","seq","kind","source","label"}; 409 with
//!                {"error"} when the agent cannot take it (an old agent, an
//!                initial sync, a failed quiesce or settle), 503 when no
//!                session is live or it ended first (ask again); bearer
//!                token only (no cookie: a page cannot make a browser send it)
//! ```
//!
//! Every request needs the token, the content of `token-file` (surrounding
//! whitespace ignored; `lifeboat-ps init` writes a random one of 64 hex
//! digits to `http.token`, 0600): as `Authorization: Bearer <token>`, or as
//! the cookie `lifeboat-token`. A browser opens `/?token=<token>` once: the
//! answer sets the cookie (HttpOnly, SameSite=Strict) and redirects to `/`,
//! so the token does not stay in the address bar. Without it the answer is
//! 401. The token is compared in constant time. Plain HTTP: put it on loopback or
//! a management network, or behind a TLS proxy.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
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

/// The cookie a browser keeps the token in.
const COOKIE: &str = "lifeboat-token";

/// The token a request presents, and whether it came in the query of `/`.
fn presented(headers: &HeaderMap, req: &Request) -> Option<(String, bool)> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| (t.trim().to_string(), false));
    let cookie = || {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
            .map(|t| (t.to_string(), false))
    };
    let query = || {
        (req.uri().path() == "/")
            .then(|| req.uri().query())
            .flatten()?
            .split('&')
            .find_map(|kv| kv.strip_prefix("token="))
            .map(|t| (t.to_string(), true))
    };
    bearer.or_else(cookie).or_else(query)
}

async fn auth(State(app): State<App>, headers: HeaderMap, req: Request, next: Next) -> Response {
    match presented(&headers, &req) {
        Some((t, from_query)) if same(t.as_bytes(), app.token.as_bytes()) => {
            if from_query {
                let cookie = format!("{COOKIE}={t}; HttpOnly; SameSite=Strict; Path=/");
                return (
                    StatusCode::SEE_OTHER,
                    [(header::SET_COOKIE, cookie), (header::LOCATION, "/".into())],
                )
                    .into_response();
            }
            next.run(req).await
        }
        _ => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "401: send Authorization: Bearer <the token in [http] token-file>, or open /?token=<it> in a browser\n",
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

async fn page(State(app): State<App>) -> Response {
    match app.hub.snapshot().await {
        Ok(st) => {
            let now = lifeboat_common::now_ms() / 1000;
            let monitor = &app.hub.monitor;
            axum::response::Html(crate::page::render(
                &st,
                now,
                crate::monitor::RPO_HISTORY_SPAN,
                |m| monitor.rpo_history(m),
            ))
            .into_response()
        }
        Err(e) => failed(e),
    }
}

async fn final_point(
    State(app): State<App>,
    headers: HeaderMap,
    axum::extract::Path(machine): axum::extract::Path<String>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Response {
    let error = |code: StatusCode, e: String| {
        (code, Json(serde_json::json!({ "error": e }))).into_response()
    };
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim());
    if !bearer.is_some_and(|t| same(t.as_bytes(), app.token.as_bytes())) {
        return error(
            StatusCode::UNAUTHORIZED,
            "a final point needs the token as Authorization: Bearer (a cookie is not enough)"
                .into(),
        );
    }
    if let Err(e) = lifeboat_common::ids::validate_id("machine", &machine) {
        return error(StatusCode::BAD_REQUEST, e.to_string());
    }
    let asked = query
        .iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("quiesce-timeout="));
    let quiesce = match asked.map(humantime::parse_duration) {
        None => lifeboat_common::receiver::finalpoint::DEFAULT_QUIESCE,
        Some(Ok(d)) => d,
        Some(Err(e)) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("quiesce-timeout is not a duration (60s, 5m): {e}"),
            )
        }
    };
    use lifeboat_common::receiver::finalpoint::Failed;
    match lifeboat_common::receiver::finalpoint::final_point(&app.hub.sessions, &machine, quiesce)
        .await
    {
        Ok(p) => Json(p).into_response(),
        Err(Failed::Refused(e)) => error(StatusCode::CONFLICT, e),
        Err(Failed::Lost(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e),
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
        .route("/", get(page))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/machines/{machine}/final-point", post(final_point))
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
