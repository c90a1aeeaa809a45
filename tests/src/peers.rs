//! Real object-store servers for tests, each on a free port of 127.0.0.1 and
//! stopped by PID when dropped:
//!
//! - [`Azurite`]: the Azure Blob emulator (`azurite-blob`), with a container
//!   created through a Shared Key–signed request (object_store creates none).
//! - [`S3sFs`]: `s3s-fs`, an S3 server keeping objects as files (checks SigV4
//!   signatures, supports `If-None-Match: *`).
//!
//! Both binaries live outside the clone in `$LIFEBOAT_TOOLS` (default
//! `$HOME/.cache/lifeboat/tools`); `scripts/install-deps.sh` installs them.
//!
//! ```no_run
//! # use lifeboat_tests::ObjectStorePeer;
//! # fn main() -> anyhow::Result<()> {
//! let dir = tempfile::tempdir()?;
//! let az = lifeboat_tests::peers::Azurite::start(dir.path())?;
//! let cfg = az.config("machine-a"); // az://lifeboat/machine-a + options
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use lifeboat_common::store::StoreConfig;

use crate::{free_port, wait_for, Proc};

/// The container (Azurite) and bucket (s3s-fs) the helpers create.
pub const BUCKET: &str = "lifeboat";
/// The prefix under the bucket that [`Azurite::store_url`] and [`S3sFs::store_url`] use.
pub const DEFAULT_PREFIX: &str = "test";

/// Azurite's well-known development account and its published key
/// (<https://learn.microsoft.com/azure/storage/common/storage-use-azurite#well-known-storage-account-and-key>).
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// Credentials s3s-fs is started with.
pub const S3_ACCESS_KEY: &str = "test";
pub const S3_SECRET_KEY: &str = "testtest";

const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_GRACE: Duration = Duration::from_secs(2);
/// Attempts with a fresh port when a server exits at start (port taken meanwhile).
const START_ATTEMPTS: usize = 3;

/// Where `scripts/install-deps.sh` caches the servers.
pub fn tools_dir() -> PathBuf {
    match std::env::var_os("LIFEBOAT_TOOLS") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            PathBuf::from(home).join(".cache/lifeboat/tools")
        }
    }
}

fn tool(rel: &str) -> Result<PathBuf> {
    let p = tools_dir().join(rel);
    if !p.is_file() {
        bail!(
            "{} is missing; run scripts/install-deps.sh (installs into $LIFEBOAT_TOOLS, default ~/.cache/lifeboat/tools)",
            p.display()
        );
    }
    Ok(p)
}

/// Path of the `azurite-blob` launcher, or an error naming the install script.
pub fn azurite_bin() -> Result<PathBuf> {
    tool("azurite/node_modules/.bin/azurite-blob")
}

/// Path of the `s3s-fs` binary, or an error naming the install script.
pub fn s3s_fs_bin() -> Result<PathBuf> {
    tool("s3s-fs/bin/s3s-fs")
}

/// Starts a server on a fresh free port (up to [`START_ATTEMPTS`] ports) and waits
/// until it accepts TCP connections on 127.0.0.1.
fn spawn_listening(
    name: &str,
    log_dir: &Path,
    mut command: impl FnMut(u16) -> Command,
) -> Result<(Proc, u16)> {
    let mut last_err = None;
    for attempt in 0..START_ATTEMPTS {
        let port = free_port();
        let log = log_dir.join(format!("{name}-{port}.log"));
        let mut p = Proc::spawn(name, &mut command(port), &log)?;
        let up = wait_for(
            &format!("{name} to listen on port {port}"),
            START_TIMEOUT,
            || {
                if !p.is_running() {
                    return Some(false);
                }
                TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1))
                    .ok()
                    .map(|_| true)
            },
        );
        match up {
            Ok(true) => return Ok((p, port)),
            Ok(false) => {
                last_err = Some(anyhow!(
                    "{name} exited at start (attempt {}, port {port}):\n{}",
                    attempt + 1,
                    p.log_text()
                ))
            }
            Err(e) => {
                p.stop(STOP_GRACE);
                return Err(e.context(format!("{name} log:\n{}", p.log_text())));
            }
        }
    }
    Err(last_err.unwrap_or_else(|| anyhow!("{name} did not start")))
}

fn config_with(url: String, options: Vec<(String, String)>) -> StoreConfig {
    StoreConfig {
        url,
        options: options.into_iter().collect::<BTreeMap<_, _>>(),
    }
}

/// A running Azurite blob service with container [`BUCKET`].
pub struct Azurite {
    pub proc: Proc,
    pub port: u16,
    /// Azurite's workspace (`--location`).
    pub dir: PathBuf,
    pub container: String,
}

impl Azurite {
    /// Starts `azurite-blob` with its workspace in `dir` (created if missing) and
    /// creates the container [`BUCKET`].
    pub fn start(dir: &Path) -> Result<Azurite> {
        let bin = azurite_bin()?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let dir = dir.canonicalize()?;
        let (proc, port) = spawn_listening("azurite-blob", &dir, |port| {
            let mut c = Command::new(&bin);
            c.args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
                .arg("--location")
                .arg(&dir)
                .args([
                    "--skipApiVersionCheck",
                    "--silent",
                    "--disableTelemetry",
                    "--disableProductStyleUrl",
                ]);
            c
        })?;
        let az = Azurite {
            proc,
            port,
            dir,
            container: BUCKET.to_string(),
        };
        az.create_container(&az.container)?;
        Ok(az)
    }

    /// Creates a container (idempotent: an existing one is fine).
    pub fn create_container(&self, name: &str) -> Result<()> {
        // Azurite may accept connections a moment before it serves requests.
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match azure_create_container(self.port, name) {
                Ok((201, _)) | Ok((409, _)) => return Ok(()),
                Ok((code, body)) if code < 500 || Instant::now() >= deadline => {
                    bail!("Azurite refused to create container {name}: HTTP {code}: {body}")
                }
                Err(e) if Instant::now() >= deadline => {
                    return Err(e.context(format!("creating container {name} in Azurite")))
                }
                // Transport error or 5xx while Azurite is still starting: retry.
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// `http://127.0.0.1:PORT/devstoreaccount1` (path-style account URL).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{AZURITE_ACCOUNT}", self.port)
    }

    /// `object_store` Azure options that reach this Azurite.
    ///
    /// `azure_storage_use_emulator` is NOT set: with it object_store ignores
    /// `azure_endpoint` and always uses `AZURITE_BLOB_STORAGE_URL` or
    /// 127.0.0.1:10000. A plain endpoint with the account in its path gives the same
    /// path-style URLs (`/devstoreaccount1/<container>/<blob>`) on any port; it is set
    /// to `false` explicitly so an `AZURE_STORAGE_USE_EMULATOR` variable cannot
    /// redirect the store.
    pub fn options(&self) -> Vec<(String, String)> {
        [
            ("azure_storage_account_name", AZURITE_ACCOUNT.to_string()),
            ("azure_storage_account_key", AZURITE_KEY.to_string()),
            ("azure_endpoint", self.endpoint()),
            ("azure_allow_http", "true".to_string()),
            ("azure_storage_use_emulator", "false".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

impl ObjectStorePeer for Azurite {
    fn bucket_url(&self) -> String {
        format!("az://{}", self.container)
    }
    fn options(&self) -> Vec<(String, String)> {
        Azurite::options(self)
    }
    /// Azurite sometimes ignores SIGTERM: the grace period ends in SIGKILL.
    fn proc_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `PUT /devstoreaccount1/NAME?restype=container`, signed with Shared Key; returns
/// the HTTP status and body.
fn azure_create_container(port: u16, name: &str) -> Result<(u16, String)> {
    let date = chrono::Utc::now()
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string();
    let version = "2021-08-06";
    let path = format!("/{AZURITE_ACCOUNT}/{name}");
    // https://learn.microsoft.com/rest/api/storageservices/authorize-with-shared-key
    // VERB, then 11 standard headers (all empty; Content-Length 0 is empty), then the
    // x-ms-* headers sorted, then "/account" + URI path and the query parameters.
    let string_to_sign = format!(
        "PUT\n{empty}x-ms-date:{date}\nx-ms-version:{version}\n/{AZURITE_ACCOUNT}{path}\nrestype:container",
        empty = "\n".repeat(11)
    );
    let key = base64::engine::general_purpose::STANDARD
        .decode(AZURITE_KEY)
        .context("decoding the Azurite key")?;
    let hmac_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
    let sig = base64::engine::general_purpose::STANDARD
        .encode(ring::hmac::sign(&hmac_key, string_to_sign.as_bytes()).as_ref());
    let request = format!(
        "PUT {path}?restype=container HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nx-ms-date: {date}\r\n\
         x-ms-version: {version}\r\nContent-Length: 0\r\n\
         Authorization: SharedKey {AZURITE_ACCOUNT}:{sig}\r\nConnection: close\r\n\r\n"
    );
    http_exchange(port, request.as_bytes())
}

/// Sends a raw HTTP/1.1 request with `Connection: close`; returns status and body.
pub(crate) fn http_exchange(port: u16, request: &[u8]) -> Result<(u16, String)> {
    let timeout = Duration::from_secs(10);
    let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(request)?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| anyhow!("malformed HTTP response: {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// A running s3s-fs with bucket [`BUCKET`].
pub struct S3sFs {
    pub proc: Proc,
    pub port: u16,
    /// The server's root; each bucket is a directory in it.
    pub data_dir: PathBuf,
    pub bucket: String,
}

impl S3sFs {
    /// Starts `s3s-fs` with its data in `dir/data` (bucket [`BUCKET`] is the
    /// directory `dir/data/lifeboat`) and its log in `dir`.
    pub fn start(dir: &Path) -> Result<S3sFs> {
        let bin = s3s_fs_bin()?;
        let data_dir = dir.join("data");
        // s3s-fs maps a bucket to a directory of its root; it has no other state.
        std::fs::create_dir_all(data_dir.join(BUCKET))
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let dir = dir.canonicalize()?;
        let data_dir = data_dir.canonicalize()?;
        let (proc, port) = spawn_listening("s3s-fs", &dir, |port| {
            let mut c = Command::new(&bin);
            c.args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["--access-key", S3_ACCESS_KEY, "--secret-key", S3_SECRET_KEY])
                .arg(&data_dir);
            c
        })?;
        Ok(S3sFs {
            proc,
            port,
            data_dir,
            bucket: BUCKET.to_string(),
        })
    }

    /// Creates another bucket (a directory of the server's root).
    pub fn create_bucket(&self, name: &str) -> Result<()> {
        std::fs::create_dir_all(self.data_dir.join(name))?;
        Ok(())
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `object_store` S3 options that reach this server: path-style requests
    /// (`aws_virtual_hosted_style_request=false`, also the default) and conditional
    /// puts with `If-None-Match: *` (`aws_conditional_put=etag`, also the default).
    pub fn options(&self) -> Vec<(String, String)> {
        [
            ("aws_endpoint", self.endpoint()),
            ("aws_access_key_id", S3_ACCESS_KEY.to_string()),
            ("aws_secret_access_key", S3_SECRET_KEY.to_string()),
            ("aws_region", "us-east-1".to_string()),
            ("aws_allow_http", "true".to_string()),
            ("aws_virtual_hosted_style_request", "false".to_string()),
            ("aws_conditional_put", "etag".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

impl ObjectStorePeer for S3sFs {
    fn bucket_url(&self) -> String {
        format!("s3://{}", self.bucket)
    }
    fn options(&self) -> Vec<(String, String)> {
        S3sFs::options(self)
    }
    fn proc_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }
}

/// What the tests need of an object-store server they started.
pub trait ObjectStorePeer {
    /// `az://<container>` or `s3://<bucket>`.
    fn bucket_url(&self) -> String;
    /// `object_store` options that reach this server.
    fn options(&self) -> Vec<(String, String)>;
    fn proc_mut(&mut self) -> &mut Proc;

    /// The store URL under the default prefix (`.../test`).
    fn store_url(&self) -> String {
        self.store_url_at(DEFAULT_PREFIX)
    }

    /// The store URL under `prefix`.
    fn store_url_at(&self, prefix: &str) -> String {
        format!("{}/{}", self.bucket_url(), prefix.trim_matches('/'))
    }

    /// Options as `key=value` strings (for `--store-option`).
    fn option_args(&self) -> Vec<String> {
        self.options()
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect()
    }

    /// A store config for `prefix` on this server.
    fn config(&self, prefix: &str) -> StoreConfig {
        config_with(self.store_url_at(prefix), self.options())
    }

    /// SIGTERM, then SIGKILL after a grace period.
    fn stop(&mut self) {
        self.proc_mut().stop(STOP_GRACE);
    }
}

impl Drop for S3sFs {
    fn drop(&mut self) {
        self.stop();
    }
}
