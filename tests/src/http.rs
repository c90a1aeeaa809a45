//! The process server's HTTP side for tests: `[http]` switched on in a
//! `ps.toml`, authenticated GETs of `/status` and `/metrics`, the status
//! page loaded in headless Chromium (its DOM, a screenshot), and a webhook
//! receiver on 127.0.0.1 that records every JSON body POSTed to it.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::{free_port, ProcessServer};

/// Appends `[http]` (a free port, the token `init` wrote) and `extra` (e.g.
/// an `[alerts]` table) to the server's ps.toml; returns the HTTP port.
pub fn enable_http(ps: &ProcessServer, extra: &str) -> u16 {
    let port = free_port();
    ps.append_config(&format!(
        "[http]\nlisten = \"127.0.0.1:{port}\"\ntoken-file = \"http.token\"\n{extra}\n"
    ));
    port
}

/// The bearer token `lifeboat-ps init` wrote.
pub fn token(ps: &ProcessServer) -> String {
    std::fs::read_to_string(ps.dir.join("http.token"))
        .unwrap()
        .trim()
        .to_string()
}

/// `GET path` on 127.0.0.1:`port`, with `Authorization: Bearer` when a
/// token is given; returns the status code and body.
pub fn get(port: u16, path: &str, token: Option<&str>) -> Result<(u16, String)> {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n");
    crate::peers::http_exchange(port, req.as_bytes())
}

/// `GET /status` as JSON (must answer 200).
pub fn status(port: u16, token: &str) -> Result<serde_json::Value> {
    let (code, body) = get(port, "/status", Some(token))?;
    anyhow::ensure!(code == 200, "GET /status: {code} {body}");
    serde_json::from_str(&body).with_context(|| format!("GET /status body {body:?}"))
}

/// Loads `url` in headless Chromium (Debian's `chromium`, run as root: no
/// sandbox; its profile in `profile`) and returns the DOM after load; with
/// `screenshot`, also saves a PNG of the page there.
pub fn chromium_dom(
    url: &str,
    profile: &std::path::Path,
    screenshot: Option<&std::path::Path>,
) -> Result<String> {
    let run = |extra: &[String]| {
        let mut cmd = std::process::Command::new("chromium");
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            "--window-size=1280,1600",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url);
        crate::run_ok(&mut cmd, Duration::from_secs(120))
    };
    let dom = run(&["--dump-dom".to_string()])?;
    if let Some(png) = screenshot {
        run(&[format!("--screenshot={}", png.display())])?;
        anyhow::ensure!(png.exists(), "chromium wrote no {}", png.display());
    }
    Ok(dom)
}

/// A webhook endpoint: records each POSTed JSON body, answers 200.
pub struct WebhookSink {
    pub port: u16,
    pub bodies: Arc<Mutex<Vec<serde_json::Value>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl WebhookSink {
    pub fn start() -> WebhookSink {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (bodies, stop) = (bodies.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((mut s, _)) => {
                            let _ = s.set_nonblocking(false);
                            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                            if let Some(body) = read_request(&mut s) {
                                if let Ok(v) = serde_json::from_slice(&body) {
                                    bodies.lock().unwrap().push(v);
                                }
                            }
                            let _ = s.write_all(
                                b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                            );
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            })
        };
        WebhookSink {
            port,
            bodies,
            stop,
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    pub fn events(&self) -> Vec<serde_json::Value> {
        self.bodies.lock().unwrap().clone()
    }
}

impl Drop for WebhookSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The body of one HTTP request (headers up to the blank line, then
/// `Content-Length` bytes); `None` if it is cut short.
fn read_request(s: &mut std::net::TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).ok()?;
        if n == 0 || buf.len() > 1 << 20 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len.min(1 << 20) {
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(buf[head_end..head_end + len.min(1 << 20)].to_vec())
}
