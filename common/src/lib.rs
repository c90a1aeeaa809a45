//! Code shared by every Lifeboat deployable: the wire protocol and its session
//! logic (no I/O), the receiving side of a session, the object-store layout and
//! its formats, sealing (zstd + AES-256-GCM), TLS helpers, ids.

pub mod base;
pub mod catalogue;
pub mod churn;
pub mod codec;
pub mod diskio;
pub mod formats;
pub mod framed;
pub mod group;
pub mod ids;
pub mod image;
pub mod owner;
pub mod protocol;
pub mod receiver;
pub mod resync;
pub mod seal;
pub mod session;
pub mod store;
pub mod supervise;
pub mod tls;

/// Sets up logging to stderr; `RUST_LOG` overrides `default` (e.g. "info").
pub fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
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
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator thresholds; called at start-up.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
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
