//! Code shared by every Lifeboat deployable: the wire protocol and its session
//! logic (no I/O), the receiving side of a session, the object-store layout and
//! its formats, sealing (zstd + AES-256-GCM), TLS helpers, ids.

pub mod bandwidth;
pub mod base;
pub mod catalogue;
pub mod churn;
pub mod codec;
pub mod control;
pub mod diskio;
pub mod disksum;
pub mod formats;
pub mod framed;
pub mod fsutil;
pub mod group;
pub mod ids;
pub mod image;
pub mod nbd_client;
pub mod nbd_proto;
pub mod nbd_server;
pub mod owner;
pub mod protocol;
pub mod receiver;
pub mod register;
pub mod resync;
pub mod seal;
pub mod session;
pub mod store;
pub mod supervise;
pub mod tls;

/// How log lines are written to stderr (`--log-format`, or the environment
/// variable `LIFEBOAT_LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event, its spans' fields (machine, disk)
    /// in front.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `fields` (with
    /// `message`), `target`, and `spans` — every enclosing span with its
    /// fields, so data-path events carry `machine` and `disk`.
    Json,
}

/// The `--log-format` option every binary takes.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log lines on stderr as text or as JSON objects (one per line, with
    /// the machine and disk of data-path events).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t,
        env = "LIFEBOAT_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
}

/// Sets up logging to stderr; `RUST_LOG` overrides `default` (e.g. "info").
pub fn init_logging(default: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // A log line that cannot be written (stderr on a full filesystem) is
    // dropped: by default the subscriber reports the failure with
    // `eprintln!`, which panics when stderr fails too — killing whatever
    // task logged (seen: the agent's resync supervisor, when the disk
    // holding its log filled up with the protected disk's data).
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(false)
            .with_span_list(true)
            .try_init(),
    };
}

/// Makes every file, directory and socket this process creates private to its
/// owner (umask 077): journals, caches, state files and recovered images hold
/// plaintext disk data, and a socket gets its mode at bind with no window in
/// which others could connect. Called first in every `main`.
pub fn restrict_umask() {
    // SAFETY: umask only changes this process's file-creation mask.
    unsafe {
        libc::umask(0o077);
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Tunes glibc's allocator for a data path that moves multi-megabyte buffers:
/// without it every frame-sized allocation is a fresh `mmap` whose pages fault
/// in and are zeroed (measured: ~10% of CPU in page faults at 1 MiB writes).
/// One arena per core instead of glibc's eight per core: each arena keeps what
/// it freed, and with sixteen of them the agent held 594 MiB after 2 GiB of
/// writes whose queue was 32 MiB (209 MiB with two arenas, same run). The
/// daemons also run [`trim_freed_memory`].
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let arenas = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
        // SAFETY: mallopt only adjusts allocator parameters; called at start-up,
        // before the runtime's threads exist.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
            libc::mallopt(libc::M_ARENA_MAX, arenas as libc::c_int);
        }
    }
}

/// Starts a thread that gives free heap pages back every [`TRIM_INTERVAL`]
/// (for the long-running daemons; a command that ends soon needs none).
pub fn trim_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let _ = std::thread::Builder::new()
            .name("malloc-trim".into())
            .spawn(|| loop {
                std::thread::sleep(TRIM_INTERVAL);
                // SAFETY: malloc_trim only returns free pages to the kernel.
                unsafe {
                    libc::malloc_trim(0);
                }
            });
    }
}

/// How often [`trim_freed_memory`]'s thread returns free heap pages.
pub const TRIM_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// Whether every byte of `buf` is zero: compared 4 KiB at a time against a
/// zero page (`memcmp`, vectorised), stopping at the first block with data.
/// A byte-wise `iter().all` ran at about a fifth of `cat`'s read rate on the
/// initial sync's scan.
pub fn is_zero(buf: &[u8]) -> bool {
    const ZEROS: [u8; 4096] = [0; 4096];
    buf.chunks(ZEROS.len()).all(|c| c == &ZEROS[..c.len()])
}

/// Lower-case hex of `bytes` (stream ids in logs, records and messages).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses [`hex`] output of exactly `N` bytes.
pub fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// `tokio::spawn` inside the caller's span: the task's events keep the
/// span's fields (the machine, the disk) in every log line.
pub fn spawn<F>(f: F) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    use tracing::Instrument;
    tokio::spawn(f.in_current_span())
}

/// A token cancelled at the first SIGINT or SIGTERM: a daemon's shutdown.
/// Call it inside the runtime.
pub fn cancel_on_signals() -> std::io::Result<tokio_util::sync::CancellationToken> {
    let token = tokio_util::sync::CancellationToken::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let t = token.clone();
    spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        t.cancel();
    });
    Ok(token)
}

/// `spawn` on a `JoinSet`, inside the caller's span (see [`spawn`]).
pub trait SpawnHere<F: std::future::Future> {
    fn spawn_here(&mut self, f: F);
}

impl<F> SpawnHere<F> for tokio::task::JoinSet<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn spawn_here(&mut self, f: F) {
        use tracing::Instrument;
        self.spawn(f.in_current_span());
    }
}

/// [`SpawnHere`] for a `TaskTracker` (shared, not `&mut`).
pub trait TrackHere<F: std::future::Future> {
    fn spawn_here(&self, f: F);
}

impl<F> TrackHere<F> for tokio_util::task::TaskTracker
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn spawn_here(&self, f: F) {
        use tracing::Instrument;
        self.spawn(f.in_current_span());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_check_finds_a_byte_anywhere() {
        assert!(is_zero(&[]));
        let mut buf = vec![0u8; 3 * 4096 + 17];
        assert!(is_zero(&buf));
        for at in [0, 4095, 4096, 8191, 3 * 4096 + 16] {
            buf[at] = 1;
            assert!(!is_zero(&buf), "{at}");
            buf[at] = 0;
        }
    }
}
