//! NBD server: serves [`BlockBackend`]s to QEMU, libnbd tools, fio and nbdfuse over a
//! unix socket or TCP. The agent serves its protected disks with it, so that every
//! write passes the agent; the master target serves recovery points with it
//! (`lifeboat-mt serve-point`, instant recovery).
//!
//! # Handshake subset (fixed newstyle only)
//!
//! All integers are big-endian.
//!
//! ```text
//! server: "NBDMAGIC" u64 | "IHAVEOPT" u64 | u16 flags = FIXED_NEWSTYLE(1) | NO_ZEROES(2)
//! client: u32 flags (FIXED_NEWSTYLE must be set; NO_ZEROES honoured; others refused)
//! option: u64 "IHAVEOPT" | u32 option | u32 length | data[length]   (length <= 64 KiB)
//! reply:  u64 0x0003e889045565a9 | u32 option | u32 reply type | u32 length | data
//! ```
//!
//! | option | handling |
//! |---|---|
//! | `EXPORT_NAME` (1) | data = name; reply `u64 size, u16 transmission flags` + 124 zero bytes unless NO_ZEROES; unknown name closes the connection |
//! | `ABORT` (2) | `REP_ACK`, close |
//! | `LIST` (3) | one `REP_SERVER` (`u32 len, name`) per export, `REP_ACK` |
//! | `INFO` (6) / `GO` (7) | data = `u32 len, name, u16 n, n × u16 info`; replies `REP_INFO` `EXPORT` (`u16 0, u64 size, u16 flags`), plus `NAME` (`u16 1, name`) and `BLOCK_SIZE` (`u16 3, u32 min 1, u32 preferred 4096, u32 max 32 MiB`) when requested, then `REP_ACK`; `GO` enters transmission. Unknown name: `REP_ERR_UNKNOWN` |
//! | anything else | `REP_ERR_UNSUP` (so no TLS, structured replies, meta contexts or extended headers) |
//!
//! The empty export name selects the export named "" if there is one, else the only
//! export if there is exactly one.
//!
//! # Transmission (simple replies only)
//!
//! ```text
//! request: u32 0x25609513 | u16 flags | u16 type | u64 cookie | u64 offset | u32 length
//!          | data[length] for WRITE only                                      (28 bytes + data)
//! reply:   u32 0x67446698 | u32 error | u64 cookie | data[length] for a successful READ
//! ```
//!
//! Commands: READ, WRITE (FUA), DISC, FLUSH (whole-disk), TRIM and WRITE_ZEROES (FUA;
//! NO_HOLE ignored: both make the range read as zeros). Transmission flags: HAS_FLAGS,
//! SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES, CAN_MULTI_CONN.
//!
//! # Concurrency and bounds
//!
//! Per connection one reader decodes requests from a buffer (a write's payload is a
//! zero-copy slice of it) and spawns one task per request; one writer task coalesces
//! ready replies into one socket write. At most [`MAX_IN_FLIGHT`] requests and
//! [`MAX_BYTES_IN_FLIGHT`] payload bytes are outstanding: the reader takes both
//! permits before it reads a write's payload, and the writer releases them, so a
//! client cannot make the server buffer more. A request's reply is sent only after
//! the backend completed it, so FLUSH covers every write already replied to.
//!
//! Errors: out-of-range READ/TRIM get EINVAL, out-of-range WRITE/WRITE_ZEROES ENOSPC
//! (as the NBD spec asks); a READ over [`MAX_REQUEST_LEN`] gets EINVAL; a WRITE over it
//! closes the connection (its payload cannot be skipped safely). Backend errors map
//! to EPERM, ENOMEM, EINVAL, ENOSPC, ENOTSUP or EIO. A bad request magic closes the
//! connection after in-flight replies are sent.
//!
//! Shutdown: the listener stops accepting, each connection stops reading requests,
//! in-flight requests complete and their replies are sent, then the socket closes.

use crate::SpawnHere;
use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::nbd_proto::*;

/// A disk as an NBD server sees it. Calls may run concurrently; a call's
/// future completes when the operation has completed on the disk (and, with
/// `fua`, is durable on it).
pub trait BlockBackend: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> impl std::future::Future<Output = io::Result<Bytes>> + Send;
    fn write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> impl std::future::Future<Output = io::Result<()>> + Send;
    /// Trim and write-zeroes: afterwards the range reads as zeros.
    fn zero(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> impl std::future::Future<Output = io::Result<()>> + Send;
    /// Makes every completed write durable.
    fn flush(&self) -> impl std::future::Future<Output = io::Result<()>> + Send;
}

/// Most requests of one connection being served at once.
pub const MAX_IN_FLIGHT: usize = 128;
/// Most READ/WRITE payload bytes of one connection held at once.
pub const MAX_BYTES_IN_FLIGHT: usize = 128 << 20;
/// Largest READ or WRITE (also the advertised maximum block size): the data
/// path's one write limit, so every write accepted here fits one stream entry.
pub const MAX_REQUEST_LEN: u32 = crate::protocol::MAX_WRITE_LEN;
/// Most connections served at once by one listener.
pub const MAX_CONNECTIONS: usize = 64;
/// Time a client has to finish the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest option payload accepted during the handshake.
const MAX_OPTION_LEN: u32 = 64 << 10;
/// Most options one client may send before choosing an export.
const MAX_OPTIONS: usize = 1024;
/// Preferred block size advertised in `NBD_INFO_BLOCK_SIZE`.
const PREFERRED_BLOCK: u32 = 4096;
/// Socket read granularity of the request reader.
const READ_CHUNK: usize = 256 << 10;
/// Reply bytes gathered before a socket write.
const WRITE_BATCH: usize = 256 << 10;
/// Read payloads at least this large are written directly, not copied into the batch.
const DIRECT_WRITE_MIN: usize = 64 << 10;

const TRANSMISSION_FLAGS: u16 = TF_HAS_FLAGS
    | TF_SEND_FLUSH
    | TF_SEND_FUA
    | TF_SEND_TRIM
    | TF_SEND_WRITE_ZEROES
    | TF_CAN_MULTI_CONN;

const NBD_EPERM: u32 = 1;
const NBD_EIO: u32 = 5;
const NBD_ENOMEM: u32 = 12;
const NBD_EINVAL: u32 = 22;
const NBD_ENOSPC: u32 = 28;
const NBD_ENOTSUP: u32 = 95;

const REQUEST_HEADER_LEN: usize = 28;

/// The exports a server offers, by name.
pub struct Exports<B> {
    exports: BTreeMap<String, Arc<B>>,
}

impl<B> Default for Exports<B> {
    fn default() -> Self {
        Exports {
            exports: BTreeMap::new(),
        }
    }
}

impl<B> Exports<B> {
    pub fn new() -> Self {
        Self::default()
    }

    /// One export, which the empty name also selects.
    pub fn single(name: impl Into<String>, backend: Arc<B>) -> Self {
        let mut e = Self::new();
        e.insert(name, backend);
        e
    }

    /// Adds or replaces an export; returns the one it replaced.
    pub fn insert(&mut self, name: impl Into<String>, backend: Arc<B>) -> Option<Arc<B>> {
        self.exports.insert(name.into(), backend)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.exports.keys().map(String::as_str)
    }

    /// Looks up an export. The empty name selects the export named "" if any, else
    /// the only export if there is exactly one.
    pub fn get(&self, name: &str) -> Option<(&str, &Arc<B>)> {
        if let Some((n, b)) = self.exports.get_key_value(name) {
            return Some((n.as_str(), b));
        }
        if name.is_empty() && self.exports.len() == 1 {
            return self.exports.iter().next().map(|(n, b)| (n.as_str(), b));
        }
        None
    }
}

/// A bound listener the NBD server accepts clients from.
trait Listener: Send {
    type Read: AsyncRead + Unpin + Send + 'static;
    type Write: AsyncWrite + Unpin + Send + 'static;
    /// Accepts one client, split in halves, with a name for logs.
    fn accept_split(
        &self,
    ) -> impl std::future::Future<Output = io::Result<(Self::Read, Self::Write, String)>> + Send;
}

impl Listener for UnixListener {
    type Read = tokio::net::unix::OwnedReadHalf;
    type Write = tokio::net::unix::OwnedWriteHalf;
    async fn accept_split(&self) -> io::Result<(Self::Read, Self::Write, String)> {
        let (stream, _) = self.accept().await?;
        let (r, w) = stream.into_split();
        Ok((r, w, "unix client".into()))
    }
}

impl Listener for TcpListener {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    async fn accept_split(&self) -> io::Result<(Self::Read, Self::Write, String)> {
        let (stream, peer) = self.accept().await?;
        let _ = stream.set_nodelay(true);
        let (r, w) = stream.into_split();
        Ok((r, w, peer.to_string()))
    }
}

/// Serves `exports` on a unix socket at `path` until `shutdown` is cancelled. A stale
/// socket file at `path` is replaced; the socket file is removed on return.
pub async fn serve_unix<B: BlockBackend>(
    path: &Path,
    exports: Arc<Exports<B>>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    remove_stale_socket(path)?;
    let listener = UnixListener::bind(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("binding NBD socket {}: {e}", path.display()),
        )
    })?;
    tracing::info!(socket = %path.display(), exports = ?exports.names().collect::<Vec<_>>(), "NBD server listening");
    accept_loop(listener, exports, shutdown).await;
    let _ = std::fs::remove_file(path);
    tracing::info!(socket = %path.display(), "NBD server stopped");
    Ok(())
}

/// Serves `exports` on TCP at `addr` until `shutdown` is cancelled.
pub async fn serve_tcp<B: BlockBackend>(
    addr: SocketAddr,
    exports: Arc<Exports<B>>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("binding NBD address {addr}: {e}")))?;
    serve_tcp_listener(listener, exports, shutdown).await
}

/// Serves `exports` on an already bound TCP listener (e.g. port 0 in tests).
pub async fn serve_tcp_listener<B: BlockBackend>(
    listener: TcpListener,
    exports: Arc<Exports<B>>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    tracing::info!(addr = ?listener.local_addr().ok(), "NBD server listening");
    accept_loop(listener, exports, shutdown).await;
    Ok(())
}

/// Accepts clients (a permit each, `MAX_CONNECTIONS` at most) until `shutdown`,
/// then closes the listener and waits for the connections to finish.
async fn accept_loop<B: BlockBackend, L: Listener>(
    listener: L,
    exports: Arc<Exports<B>>,
    shutdown: CancellationToken,
) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = JoinSet::new();
    loop {
        let Some(permit) = acquire_conn_permit(&limit, &shutdown, &mut conns).await else {
            break;
        };
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = conns.join_next() => continue,
            r = listener.accept_split() => r,
        };
        match accepted {
            Ok((r, w, peer)) => {
                let (exports, cancel) = (exports.clone(), shutdown.clone());
                conns.spawn_here(async move {
                    if let Err(e) = serve_split(r, w, exports, cancel).await {
                        tracing::warn!(%peer, error = %e, "NBD connection ended with an error");
                    }
                    drop(permit);
                });
            }
            Err(e) => accept_failed(e).await,
        }
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
}

/// Serves one client on `stream`: handshake, then transmission until the client
/// disconnects or `shutdown` is cancelled.
pub async fn serve_connection<B, S>(
    stream: S,
    exports: Arc<Exports<B>>,
    shutdown: CancellationToken,
) -> io::Result<()>
where
    B: BlockBackend,
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (r, w) = tokio::io::split(stream);
    serve_split(r, w, exports, shutdown).await
}

async fn acquire_conn_permit<T: 'static>(
    limit: &Arc<Semaphore>,
    shutdown: &CancellationToken,
    conns: &mut JoinSet<T>,
) -> Option<OwnedSemaphorePermit> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            p = limit.clone().acquire_owned() => return p.ok(),
            Some(_) = conns.join_next() => {}
        }
    }
}

async fn accept_failed(e: io::Error) {
    // EMFILE and friends: back off instead of spinning.
    tracing::warn!(error = %e, "accepting an NBD connection failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

fn remove_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            ),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

async fn serve_split<B, R, W>(
    mut r: R,
    mut w: W,
    exports: Arc<Exports<B>>,
    shutdown: CancellationToken,
) -> io::Result<()>
where
    B: BlockBackend,
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let hs = tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut r, &mut w, &exports)) => r,
    };
    let backend = match hs {
        Ok(Ok(Some(b))) => b,
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return Err(protocol_error(
                "client did not finish the handshake in time",
            ))
        }
    };
    transmission(r, w, backend, shutdown).await
}

fn protocol_error(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

// ---------------------------------------------------------------------------------
// Handshake

/// Negotiates an export; `None` when the client aborted or asked for an unknown
/// export with `NBD_OPT_EXPORT_NAME`.
async fn handshake<B, R, W>(
    r: &mut R,
    w: &mut W,
    exports: &Exports<B>,
) -> io::Result<Option<Arc<B>>>
where
    B: BlockBackend,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&hello).await?;
    w.flush().await?;

    let client_flags = r.read_u32().await?;
    if client_flags & u32::from(FLAG_FIXED_NEWSTYLE) == 0 {
        return Err(protocol_error(
            "client does not speak fixed newstyle negotiation",
        ));
    }
    if client_flags & !u32::from(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) != 0 {
        return Err(protocol_error(format!(
            "client sent unknown handshake flags {client_flags:#x}"
        )));
    }
    let no_zeroes = client_flags & u32::from(FLAG_NO_ZEROES) != 0;

    let mut out = Vec::new();
    for _ in 0..MAX_OPTIONS {
        let magic = r.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(protocol_error(format!("bad option magic {magic:#x}")));
        }
        let opt = r.read_u32().await?;
        let len = r.read_u32().await?;
        if len > MAX_OPTION_LEN {
            // Skip the payload without buffering it, then refuse.
            let mut rest = u64::from(len);
            let mut sink = [0u8; 4096];
            while rest > 0 {
                let n = rest.min(sink.len() as u64) as usize;
                r.read_exact(&mut sink[..n]).await?;
                rest -= n as u64;
            }
            opt_reply(&mut out, opt, REP_ERR_TOO_BIG, b"option too large");
            send(w, &mut out).await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await?;

        match opt {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                let Some((_, backend)) = exports.get(&name) else {
                    tracing::info!(export = %name, "client asked for an unknown export; closing");
                    return Ok(None);
                };
                out.extend_from_slice(&backend.size().to_be_bytes());
                out.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                send(w, &mut out).await?;
                return Ok(Some(backend.clone()));
            }
            OPT_ABORT => {
                opt_reply(&mut out, opt, REP_ACK, &[]);
                // The client may already have closed its end.
                let _ = send(w, &mut out).await;
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    opt_reply(&mut out, opt, REP_ERR_INVALID, b"LIST takes no data");
                } else {
                    for name in exports.names() {
                        let mut d = Vec::with_capacity(4 + name.len());
                        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                        d.extend_from_slice(name.as_bytes());
                        opt_reply(&mut out, opt, REP_SERVER, &d);
                    }
                    opt_reply(&mut out, opt, REP_ACK, &[]);
                }
                send(w, &mut out).await?;
            }
            OPT_INFO | OPT_GO => {
                let chosen = info_reply(&mut out, opt, &data, exports);
                send(w, &mut out).await?;
                if opt == OPT_GO {
                    if let Some(b) = chosen {
                        return Ok(Some(b));
                    }
                }
            }
            _ => {
                opt_reply(&mut out, opt, REP_ERR_UNSUP, b"option not supported");
                send(w, &mut out).await?;
            }
        }
    }
    Err(protocol_error(format!(
        "client sent more than {MAX_OPTIONS} options without choosing an export"
    )))
}

async fn send<W: AsyncWrite + Unpin>(w: &mut W, out: &mut Vec<u8>) -> io::Result<()> {
    w.write_all(out).await?;
    w.flush().await?;
    out.clear();
    Ok(())
}

fn opt_reply(out: &mut Vec<u8>, opt: u32, kind: u32, data: &[u8]) {
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Answers `NBD_OPT_INFO`/`NBD_OPT_GO` into `out`; the export on success.
fn info_reply<B: BlockBackend>(
    out: &mut Vec<u8>,
    opt: u32,
    data: &[u8],
    exports: &Exports<B>,
) -> Option<Arc<B>> {
    let mut d = data;
    let parsed = (|| {
        if d.len() < 4 {
            return None;
        }
        let name_len = d.get_u32() as usize;
        if d.len() < name_len + 2 {
            return None;
        }
        let name = String::from_utf8(d[..name_len].to_vec()).ok()?;
        d.advance(name_len);
        let n = d.get_u16() as usize;
        if d.len() != n * 2 {
            return None;
        }
        let infos: Vec<u16> = (0..n).map(|_| d.get_u16()).collect();
        Some((name, infos))
    })();
    let Some((name, infos)) = parsed else {
        opt_reply(out, opt, REP_ERR_INVALID, b"malformed INFO/GO request");
        return None;
    };
    let Some((canonical, backend)) = exports.get(&name) else {
        let msg = format!("unknown export {name:?}");
        opt_reply(out, opt, REP_ERR_UNKNOWN, msg.as_bytes());
        return None;
    };
    let mut info = Vec::with_capacity(12);
    info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    info.extend_from_slice(&backend.size().to_be_bytes());
    info.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
    opt_reply(out, opt, REP_INFO, &info);
    for kind in infos {
        info.clear();
        match kind {
            INFO_NAME => {
                info.extend_from_slice(&INFO_NAME.to_be_bytes());
                info.extend_from_slice(canonical.as_bytes());
            }
            INFO_BLOCK_SIZE => {
                info.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                info.extend_from_slice(&1u32.to_be_bytes());
                info.extend_from_slice(&PREFERRED_BLOCK.to_be_bytes());
                info.extend_from_slice(&MAX_REQUEST_LEN.to_be_bytes());
            }
            // EXPORT is always sent; DESCRIPTION and unknown requests are optional.
            _ => continue,
        }
        opt_reply(out, opt, REP_INFO, &info);
    }
    opt_reply(out, opt, REP_ACK, &[]);
    Some(backend.clone())
}

// ---------------------------------------------------------------------------------
// Transmission

struct Reply {
    cookie: u64,
    error: u32,
    data: Option<Bytes>,
    _permits: Permits,
}

struct Permits {
    _request: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

enum Command {
    Read { len: u32 },
    Write { data: Bytes, fua: bool },
    Zero { len: u32, fua: bool },
    Flush,
}

async fn transmission<B, R, W>(
    mut r: R,
    w: W,
    backend: Arc<B>,
    shutdown: CancellationToken,
) -> io::Result<()>
where
    B: BlockBackend,
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Reply>(MAX_IN_FLIGHT);
    // Cancelled by shutdown, or by the writer when the client stops reading.
    let stop = shutdown.child_token();
    let writer = crate::spawn(write_replies(w, rx, stop.clone()));
    let read = read_requests(&mut r, &backend, tx, &stop).await;
    // Every in-flight request holds a sender; the writer ends after the last reply.
    let written = writer
        .await
        .unwrap_or_else(|e| Err(io::Error::other(format!("NBD reply writer failed: {e}"))));
    read.and(written)
}

async fn write_replies<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::Receiver<Reply>,
    stop: CancellationToken,
) -> io::Result<()> {
    let r = write_loop(&mut w, &mut rx).await;
    if r.is_err() {
        stop.cancel();
        return r;
    }
    let _ = w.shutdown().await;
    Ok(())
}

async fn write_loop<W: AsyncWrite + Unpin>(
    w: &mut W,
    rx: &mut mpsc::Receiver<Reply>,
) -> io::Result<()> {
    let mut out: Vec<u8> = Vec::with_capacity(WRITE_BATCH + DIRECT_WRITE_MIN);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(reply) = next {
            out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
            out.extend_from_slice(&reply.error.to_be_bytes());
            out.extend_from_slice(&reply.cookie.to_be_bytes());
            if let Some(data) = &reply.data {
                if data.len() >= DIRECT_WRITE_MIN {
                    w.write_all(&out).await?;
                    out.clear();
                    w.write_all(data).await?;
                } else {
                    out.extend_from_slice(data);
                }
            }
            drop(reply);
            if out.len() >= WRITE_BATCH {
                w.write_all(&out).await?;
                out.clear();
            }
            next = rx.try_recv().ok();
        }
        if !out.is_empty() {
            w.write_all(&out).await?;
            out.clear();
        }
        w.flush().await?;
    }
    Ok(())
}

/// Makes `buf` hold at least `want` bytes; `false` at a clean end of stream (no
/// partial request buffered) or when `stop` is cancelled.
async fn fill<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    want: usize,
    stop: &CancellationToken,
) -> io::Result<bool> {
    while buf.len() < want {
        if buf.capacity() - buf.len() < (want - buf.len()).max(READ_CHUNK / 4) {
            buf.reserve((want - buf.len()).max(READ_CHUNK));
        }
        let n = tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(false),
            n = r.read_buf(buf) => n?,
        };
        if n == 0 {
            if buf.is_empty() {
                return Ok(false);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "client closed the connection in the middle of a request",
            ));
        }
    }
    Ok(true)
}

async fn read_requests<B, R>(
    r: &mut R,
    backend: &Arc<B>,
    tx: mpsc::Sender<Reply>,
    stop: &CancellationToken,
) -> io::Result<()>
where
    B: BlockBackend,
    R: AsyncRead + Unpin,
{
    let requests = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let bytes = Arc::new(Semaphore::new(MAX_BYTES_IN_FLIGHT));
    let size = backend.size();
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        if !fill(r, &mut buf, REQUEST_HEADER_LEN, stop).await? {
            return Ok(());
        }
        let mut h = &buf[..REQUEST_HEADER_LEN];
        let magic = h.get_u32();
        let flags = h.get_u16();
        let kind = h.get_u16();
        let cookie = h.get_u64();
        let offset = h.get_u64();
        let len = h.get_u32();
        buf.advance(REQUEST_HEADER_LEN);
        if magic != REQUEST_MAGIC {
            return Err(protocol_error(format!("bad request magic {magic:#x}")));
        }
        if kind == CMD_DISC {
            tracing::debug!("NBD client disconnected");
            return Ok(());
        }
        if kind == CMD_WRITE && len > MAX_REQUEST_LEN {
            tracing::error!(
                len,
                max = MAX_REQUEST_LEN,
                "NBD write larger than the maximum block size; closing the connection"
            );
            return Err(protocol_error(format!(
                "write of {len} bytes exceeds the maximum of {MAX_REQUEST_LEN}"
            )));
        }

        // Permits first: they bound what the reader buffers, payload included.
        let request_permit = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            p = requests.clone().acquire_owned() => p.map_err(io::Error::other)?,
        };
        let payload = matches!(kind, CMD_READ | CMD_WRITE) && len <= MAX_REQUEST_LEN;
        let bytes_permit = if payload && len > 0 {
            Some(tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                p = bytes.clone().acquire_many_owned(len) => p.map_err(io::Error::other)?,
            })
        } else {
            None
        };
        let permits = Permits {
            _request: request_permit,
            _bytes: bytes_permit,
        };

        let in_range = offset
            .checked_add(u64::from(len))
            .is_some_and(|end| end <= size);
        let fua = flags & CMD_FLAG_FUA != 0;
        let known_flags = flags & !(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE) == 0;
        let cmd = match kind {
            CMD_WRITE => {
                if !fill(r, &mut buf, len as usize, stop).await? {
                    return Ok(());
                }
                let data = buf.split_to(len as usize).freeze();
                if !known_flags {
                    Err(NBD_EINVAL)
                } else if !in_range {
                    Err(NBD_ENOSPC)
                } else {
                    Ok(Command::Write { data, fua })
                }
            }
            _ if !known_flags => Err(NBD_EINVAL),
            CMD_READ if len > MAX_REQUEST_LEN || !in_range => Err(NBD_EINVAL),
            CMD_READ => Ok(Command::Read { len }),
            CMD_FLUSH => Ok(Command::Flush),
            CMD_TRIM if !in_range => Err(NBD_EINVAL),
            CMD_WRITE_ZEROES if !in_range => Err(NBD_ENOSPC),
            CMD_TRIM | CMD_WRITE_ZEROES => Ok(Command::Zero { len, fua }),
            _ => Err(NBD_EINVAL),
        };
        match cmd {
            Err(error) => {
                tracing::debug!(kind, offset, len, error, "refusing NBD request");
                let reply = Reply {
                    cookie,
                    error,
                    data: None,
                    _permits: permits,
                };
                if tx.send(reply).await.is_err() {
                    return Ok(());
                }
            }
            Ok(cmd) => {
                let (backend, tx) = (backend.clone(), tx.clone());
                crate::spawn(async move {
                    let reply = execute(&*backend, cmd, offset, cookie, permits).await;
                    // The writer has gone only if the client went away.
                    let _ = tx.send(reply).await;
                });
            }
        }
    }
}

async fn execute<B: BlockBackend>(
    backend: &B,
    cmd: Command,
    offset: u64,
    cookie: u64,
    permits: Permits,
) -> Reply {
    let (what, result) = match cmd {
        Command::Read { len } => (
            "read",
            match backend.read(offset, len).await {
                Ok(d) if d.len() == len as usize => Ok(Some(d)),
                Ok(d) => Err(io::Error::other(format!(
                    "backend returned {} bytes for a read of {len}",
                    d.len()
                ))),
                Err(e) => Err(e),
            },
        ),
        Command::Write { data, fua } => (
            "write",
            backend.write(offset, data, fua).await.map(|()| None),
        ),
        Command::Zero { len, fua } => ("zero", backend.zero(offset, len, fua).await.map(|()| None)),
        Command::Flush => ("flush", backend.flush().await.map(|()| None)),
    };
    let (error, data) = match result {
        Ok(data) => (0, data),
        // A refused write (after a planned failover) is expected and said
        // once by the agent: at debug level, or a writer floods the log.
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            tracing::debug!(op = what, offset, error = %e, "NBD request refused");
            (nbd_errno(&e), None)
        }
        Err(e) => {
            tracing::warn!(op = what, offset, error = %e, "NBD request failed");
            (nbd_errno(&e), None)
        }
    };
    Reply {
        cookie,
        error,
        data,
        _permits: permits,
    }
}

/// Maps an I/O error to the NBD error numbers.
fn nbd_errno(e: &io::Error) -> u32 {
    if let Some(code) = e.raw_os_error() {
        return match code {
            libc::EPERM | libc::EACCES | libc::EROFS => NBD_EPERM,
            libc::ENOMEM => NBD_ENOMEM,
            libc::EINVAL => NBD_EINVAL,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => NBD_ENOSPC,
            libc::EOPNOTSUPP => NBD_ENOTSUP,
            _ => NBD_EIO,
        };
    }
    match e.kind() {
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => NBD_EPERM,
        io::ErrorKind::OutOfMemory => NBD_ENOMEM,
        io::ErrorKind::InvalidInput => NBD_EINVAL,
        io::ErrorKind::StorageFull | io::ErrorKind::FileTooLarge | io::ErrorKind::QuotaExceeded => {
            NBD_ENOSPC
        }
        io::ErrorKind::Unsupported => NBD_ENOTSUP,
        _ => NBD_EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// An in-memory disk.
    struct Mem(Mutex<Vec<u8>>);

    impl BlockBackend for Mem {
        fn size(&self) -> u64 {
            self.0.lock().map(|v| v.len() as u64).unwrap_or(0)
        }
        async fn read(&self, offset: u64, len: u32) -> io::Result<Bytes> {
            let v = self.0.lock().map_err(|_| io::Error::other("poisoned"))?;
            Ok(Bytes::copy_from_slice(
                &v[offset as usize..offset as usize + len as usize],
            ))
        }
        async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> io::Result<()> {
            let mut v = self.0.lock().map_err(|_| io::Error::other("poisoned"))?;
            v[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
            Ok(())
        }
        async fn zero(&self, offset: u64, len: u32, _fua: bool) -> io::Result<()> {
            let mut v = self.0.lock().map_err(|_| io::Error::other("poisoned"))?;
            v[offset as usize..offset as usize + len as usize].fill(0);
            Ok(())
        }
        async fn flush(&self) -> io::Result<()> {
            Ok(())
        }
    }

    fn option(opt: u32, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&opt.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    fn request(kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v
    }

    async fn read_opt_reply<S: AsyncRead + Unpin>(s: &mut S) -> (u32, u32, Vec<u8>) {
        assert_eq!(s.read_u64().await.expect("magic"), OPT_REPLY_MAGIC);
        let opt = s.read_u32().await.expect("opt");
        let kind = s.read_u32().await.expect("kind");
        let len = s.read_u32().await.expect("len");
        let mut d = vec![0; len as usize];
        s.read_exact(&mut d).await.expect("data");
        (opt, kind, d)
    }

    async fn read_reply<S: AsyncRead + Unpin>(s: &mut S) -> (u32, u64) {
        assert_eq!(s.read_u32().await.expect("magic"), SIMPLE_REPLY_MAGIC);
        let err = s.read_u32().await.expect("error");
        (err, s.read_u64().await.expect("cookie"))
    }

    #[tokio::test]
    async fn raw_protocol() {
        let mem = Arc::new(Mem(Mutex::new(vec![0; 1 << 20])));
        let exports = Arc::new(Exports::single("disk", mem.clone()));
        let (mut c, s) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(serve_connection(s, exports, CancellationToken::new()));

        assert_eq!(c.read_u64().await.expect("magic"), NBDMAGIC);
        assert_eq!(c.read_u64().await.expect("opt"), IHAVEOPT);
        assert_eq!(c.read_u16().await.expect("flags"), 3);
        c.write_u32(3).await.expect("client flags");

        c.write_all(&option(8, &[])).await.expect("structured");
        assert_eq!(read_opt_reply(&mut c).await.1, REP_ERR_UNSUP);

        c.write_all(&option(OPT_LIST, &[])).await.expect("list");
        let (_, kind, d) = read_opt_reply(&mut c).await;
        assert_eq!((kind, &d[4..]), (REP_SERVER, &b"disk"[..]));
        assert_eq!(read_opt_reply(&mut c).await.1, REP_ACK);

        let mut go = Vec::new();
        go.extend_from_slice(&3u32.to_be_bytes());
        go.extend_from_slice(b"nop");
        go.extend_from_slice(&0u16.to_be_bytes());
        c.write_all(&option(OPT_GO, &go)).await.expect("go");
        assert_eq!(read_opt_reply(&mut c).await.1, REP_ERR_UNKNOWN);

        // Truncated GO payload.
        c.write_all(&option(OPT_GO, &[0, 0, 0, 9]))
            .await
            .expect("go");
        assert_eq!(read_opt_reply(&mut c).await.1, REP_ERR_INVALID);

        let mut go = Vec::new();
        go.extend_from_slice(&0u32.to_be_bytes());
        go.extend_from_slice(&2u16.to_be_bytes());
        go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        go.extend_from_slice(&INFO_NAME.to_be_bytes());
        c.write_all(&option(OPT_GO, &go)).await.expect("go");
        let (_, kind, d) = read_opt_reply(&mut c).await;
        assert_eq!(kind, REP_INFO);
        assert_eq!(&d[..2], &[0, 0]);
        assert_eq!(u64::from_be_bytes(d[2..10].try_into().expect("8")), 1 << 20);
        assert_eq!(u16::from_be_bytes([d[10], d[11]]), TRANSMISSION_FLAGS);
        let (_, _, d) = read_opt_reply(&mut c).await;
        assert_eq!(u16::from_be_bytes([d[0], d[1]]), INFO_BLOCK_SIZE);
        let (_, _, d) = read_opt_reply(&mut c).await;
        assert_eq!(&d[..], b"\x00\x01disk");
        assert_eq!(read_opt_reply(&mut c).await.1, REP_ACK);

        // Pipelined: write, out-of-range write, unknown command, read.
        let mut reqs = request(CMD_WRITE, CMD_FLAG_FUA, 1, 4096, 4);
        reqs.extend_from_slice(b"abcd");
        reqs.extend(request(CMD_WRITE, 0, 2, (1 << 20) - 2, 4));
        reqs.extend_from_slice(b"wxyz");
        reqs.extend(request(99, 0, 3, 0, 0));
        c.write_all(&reqs).await.expect("requests");
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(read_reply(&mut c).await);
        }
        got.sort_by_key(|g| g.1);
        assert_eq!(got, vec![(0, 1), (NBD_ENOSPC, 2), (NBD_EINVAL, 3)]);
        c.write_all(&request(CMD_READ, 0, 4, 4094, 8))
            .await
            .expect("read");
        assert_eq!(read_reply(&mut c).await, (0, 4));
        let mut d = [0u8; 8];
        c.read_exact(&mut d).await.expect("data");
        assert_eq!(&d, b"\0\0abcd\0\0");
        c.write_all(&request(CMD_READ, 0, 5, 0, MAX_REQUEST_LEN + 1))
            .await
            .expect("read");
        assert_eq!(read_reply(&mut c).await, (NBD_EINVAL, 5));

        c.write_all(&request(CMD_DISC, 0, 6, 0, 0))
            .await
            .expect("disc");
        server.await.expect("join").expect("server");
        assert_eq!(&mem.0.lock().expect("lock")[4096..4100], b"abcd");
    }

    #[tokio::test]
    async fn oversized_write_closes() {
        let mem = Arc::new(Mem(Mutex::new(vec![0; 4096])));
        let exports = Arc::new(Exports::single("", mem));
        let (mut c, s) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(serve_connection(s, exports, CancellationToken::new()));
        let mut hello = [0u8; 18];
        c.read_exact(&mut hello).await.expect("hello");
        c.write_u32(3).await.expect("flags");
        c.write_all(&option(OPT_EXPORT_NAME, b""))
            .await
            .expect("export");
        let mut info = [0u8; 10];
        c.read_exact(&mut info).await.expect("info");
        c.write_all(&request(CMD_WRITE, 0, 1, 0, u32::MAX))
            .await
            .expect("write");
        assert!(server.await.expect("join").is_err());
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(
            nbd_errno(&io::Error::from_raw_os_error(libc::ENOSPC)),
            NBD_ENOSPC
        );
        assert_eq!(
            nbd_errno(&io::Error::from_raw_os_error(libc::EROFS)),
            NBD_EPERM
        );
        assert_eq!(nbd_errno(&io::Error::other("x")), NBD_EIO);
        assert_eq!(
            nbd_errno(&io::Error::from(io::ErrorKind::InvalidInput)),
            NBD_EINVAL
        );
    }
}
