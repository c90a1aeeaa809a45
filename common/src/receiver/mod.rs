//! The receiving side of a replication session, shared by the process server
//! (sink: RocksDB cache) and the master target (sink: disks).
//!
//! One connection = one reader loop (decode, dedup, gap check via
//! [`ReceiverState`]) → a bounded queue of batches (`PERSIST_QUEUE_DEPTH`) → one
//! persister that coalesces queued batches into a single sink append (group
//! commit) and sends the ack for the new durable position. Only one session per
//! machine runs at a time: a newer connection for the same machine supersedes the
//! older one, which is cancelled and fully stopped before the new one starts.
//!
//! Parts: `registry.rs` (one live session per machine, resync watchers),
//! `limited.rs` (the hello and idle deadlines of a connection),
//! `compare.rs` (the resync comparison as plain functions); this file is the
//! connection driver.
//!
//! Checksum resync: [`Sessions::start_resync`] injects a resync-start frame into
//! the machine's live session and returns a channel of [`ResyncEvent`]s. The
//! agent's hash frames travel through the persist queue, so each is answered
//! (from [`StreamSink::block_hashes`]) only after every entry received before it
//! is durable, i.e. against the replica as the stream left it. Whoever started
//! a resync keeps receiving its events across reconnects: the watcher belongs
//! to the machine, not to the session, because the agent resumes a resync cut
//! by a lost link on its own when it is back.
//!
//! Stream ids: [`StreamSink::open`] returns the id of the numbering the sink
//! holds; when it is not the hello's, the welcome says so and entries are
//! refused (see `protocol.rs`).

use std::future::Future;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::framed::{read_frame, write_frame, FrameError};
use crate::protocol::{error_code, DiskInfo, Entry, Frame, ResyncReport, StreamId, MAX_FRAME_LEN};
use crate::resync::{self, BlockHash, HashScheme, REGION_BLOCKS};
use crate::session::{Action, ReceiverState, SessionError};

mod compare;
pub mod finalpoint;
mod limited;
mod registry;

pub use limited::Limited;
use registry::SessionCtl;
pub use registry::{GroupLink, ResyncEvent, ResyncProgress, Sessions};

/// Batches waiting for the persister, per connection.
pub const PERSIST_QUEUE_DEPTH: usize = 64;
/// Most entry bytes of one session decoded and waiting to be persisted (a
/// frame larger than this waits until the queue is empty, then goes alone).
pub const PERSIST_QUEUE_BYTES: usize = 64 * 1024 * 1024;
/// Frames waiting for the writer, per connection.
pub const REPLY_QUEUE_DEPTH: usize = 64;
/// The most entry bytes one sink append coalesces.
pub const MAX_COALESCED_BYTES: usize = 32 * 1024 * 1024;

/// What a sink holds of a machine's stream when a session opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    /// Every seq up to this one is durable.
    pub durable: u64,
    /// The numbering those seqs belong to: the first stream id the sink saw
    /// for the machine (the hello's when it saw none).
    pub stream_id: StreamId,
}

/// Where received entries go.
pub trait StreamSink: Send + Sync + 'static {
    /// Called once per session after the hello.
    fn open(
        &self,
        machine: &str,
        disks: &[DiskInfo],
        stream_id: StreamId,
    ) -> impl Future<Output = anyhow::Result<Opened>> + Send;
    /// Makes `entries` (consecutive seqs) durable; returns the new durable position.
    fn append(
        &self,
        machine: &str,
        entries: Vec<Entry>,
    ) -> impl Future<Output = anyhow::Result<u64>> + Send;
    /// The agent finished a checksum resync (`report.error` empty) or gave up.
    fn resync_done(
        &self,
        machine: &str,
        report: &ResyncReport,
        disks: &[DiskInfo],
    ) -> impl Future<Output = anyhow::Result<()>> + Send {
        let _ = (machine, report, disks);
        async { Ok(()) }
    }
    /// Hashes of the replica's 4 KiB blocks `first..first + count` of `disk`
    /// under `scheme` (see `resync.rs`), for checksum resync. A sink that
    /// cannot compute that scheme returns [`resync::UNKNOWN_HASH`] for the
    /// blocks it cannot: they are resent.
    fn block_hashes(
        &self,
        machine: &str,
        disk: u16,
        first: u64,
        count: u64,
        scheme: HashScheme,
    ) -> impl Future<Output = anyhow::Result<Vec<BlockHash>>> + Send {
        let _ = (machine, disk, first, count, scheme);
        async {
            Err(anyhow::anyhow!(
                "this receiver keeps no block hashes: checksum resync is not supported"
            ))
        }
    }
}

/// Frames the receiver sends into a live session on its own (resync-start).
pub const INJECT_QUEUE_DEPTH: usize = 16;
/// Regions whose block hashes are looked up at once.
const LOOKUP_REGIONS: usize = 64;

/// Which machine a connection's certificate allows.
pub trait PeerAuth: Send + Sync {
    fn allows(&self, machine: &str) -> bool;
}

impl<F: Fn(&str) -> bool + Send + Sync> PeerAuth for F {
    fn allows(&self, machine: &str) -> bool {
        self(machine)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("protocol: {0}")]
    Session(#[from] SessionError),
    #[error("machine {0:?} is not allowed by the client certificate")]
    NotAllowed(String),
    #[error("invalid hello: {0}")]
    BadHello(String),
    #[error("sink: {0:#}")]
    Sink(anyhow::Error),
    #[error("superseded by a newer connection of the same machine")]
    Superseded,
    /// A second agent presents the machine while another is live with
    /// another stream id (a cloned machine?); never merged.
    #[error("{0}")]
    Conflict(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// The deadlines of one TLS connection.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    pub handshake: std::time::Duration,
    pub hello: std::time::Duration,
    pub idle: std::time::Duration,
}

/// Serves one TCP connection of an agent: the TLS handshake (bounded), the
/// client certificate (it admits the machine it names), then
/// [`serve_connection`] under [`Limited`]'s deadlines. Failures are logged
/// naming the peer.
pub async fn serve_tls<S: StreamSink>(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    deadlines: Deadlines,
    sink: std::sync::Arc<S>,
    sessions: &Sessions,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let Some(tls) = accept_tls(acceptor, tcp, peer, &deadlines).await else {
        return;
    };
    serve_authenticated(tls, peer, deadlines, sink, sessions, shutdown).await
}

/// The TLS handshake within its deadline; a failure is logged with the peer.
pub async fn accept_tls(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    deadlines: &Deadlines,
) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
    match tokio::time::timeout(deadlines.handshake, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            tracing::warn!("TLS handshake with {peer} failed: {e}");
            None
        }
        Err(_) => {
            tracing::warn!("TLS handshake with {peer} timed out");
            None
        }
    }
}

/// Serves a handshaken connection whose client certificate names the
/// machines it may send; one without a certificate is closed.
pub async fn serve_authenticated<S: StreamSink>(
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    peer: std::net::SocketAddr,
    deadlines: Deadlines,
    sink: std::sync::Arc<S>,
    sessions: &Sessions,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let Some(cert) = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.clone().into_owned())
    else {
        tracing::warn!("{peer} presented no client certificate");
        return;
    };
    // A machine removed after this handshake is refused, even though its
    // certificate passed the revocation list as it was then.
    let authenticated = std::time::Instant::now();
    let auth = |machine: &str| {
        crate::tls::cert_allows_machine(&cert, machine)
            && !sessions.removed_since(machine, authenticated)
    };
    let io = Limited::new(tls, deadlines.hello, deadlines.idle);
    if let Err(e) = serve_connection(io, &peer.to_string(), &auth, sink, sessions, shutdown).await {
        tracing::warn!("connection from {peer}: {e}");
    }
}

/// Serves one connection (from `peer`, named in messages) until the peer
/// leaves, an error, or `shutdown`.
pub async fn serve_connection<IO, S, A>(
    io: IO,
    peer: &str,
    auth: &A,
    sink: Arc<S>,
    sessions: &Sessions,
    shutdown: CancellationToken,
) -> Result<(), ReceiveError>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    S: StreamSink,
    A: PeerAuth + ?Sized,
{
    let (mut rd, mut wr) = tokio::io::split(io);
    let mut state = ReceiverState::new();

    // Hello: checked before anything else is accepted.
    let first = match read_frame(&mut rd, MAX_FRAME_LEN).await {
        Ok(Some(f)) => f,
        Ok(None) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let hello = match state.on_hello(first) {
        Ok(h) => h.clone(),
        Err(e) => {
            let code = match e {
                SessionError::Version { .. } => error_code::VERSION,
                _ => error_code::PROTOCOL,
            };
            send_error(&mut wr, code, &e.to_string()).await;
            return Err(e.into());
        }
    };
    if let Err(msg) = validate_hello(&hello.machine, &hello.disks, &hello.stream_id) {
        send_error(&mut wr, error_code::PROTOCOL, &msg).await;
        return Err(ReceiveError::BadHello(msg));
    }
    if !auth.allows(&hello.machine) {
        let e = ReceiveError::NotAllowed(hello.machine.clone());
        send_error(&mut wr, error_code::AUTH, &e.to_string()).await;
        return Err(e);
    }
    let machine = hello.machine.clone();
    // The connection's span (if its caller made one with an empty
    // `machine` field) names the machine from here on.
    tracing::Span::current().record("machine", machine.as_str());
    let (inject, inject_rx) = mpsc::channel(INJECT_QUEUE_DEPTH);
    let ctl = Arc::new(SessionCtl {
        machine: machine.clone(),
        inject,
        disks: hello.disks.clone(),
        watchers: sessions.watchers.clone(),
        version: state.version(),
        groups: sessions.groups.clone(),
    });
    let (generation, cancel, lock) =
        match sessions.claim(&machine, ctl.clone(), hello.stream_id, peer) {
            Ok(c) => c,
            Err(msg) => {
                warn!(%machine, "refused: {msg}");
                send_error(&mut wr, error_code::AUTH, &msg).await;
                return Err(ReceiveError::Conflict(msg));
            }
        };
    // Again now that the slot is taken: a removal between the check above
    // and the claim found no slot to cut.
    if !auth.allows(&machine) {
        sessions.release(&machine, generation);
        let e = ReceiveError::NotAllowed(machine.clone());
        send_error(&mut wr, error_code::AUTH, &e.to_string()).await;
        return Err(e);
    }
    let result = async {
        let _exclusive = tokio::select! {
            g = lock.lock() => g,
            _ = cancel.cancelled() => return Err(ReceiveError::Superseded),
        };
        let opened = match sink.open(&machine, &hello.disks, hello.stream_id).await {
            Ok(o) => o,
            Err(e) => {
                send_error(&mut wr, error_code::SERVER, &format!("{e:#}")).await;
                return Err(ReceiveError::Sink(e));
            }
        };
        let durable = opened.durable;
        let welcome = state.welcome(durable, opened.stream_id);
        write_frame(&mut wr, &welcome).await?;
        wr.flush().await?;
        if opened.stream_id != hello.stream_id {
            warn!(
                %machine,
                durable,
                "the agent's stream id {} is not the one held here ({}): it lost its state and must rebase",
                crate::hex(&hello.stream_id),
                crate::hex(&opened.stream_id)
            );
        }
        info!(%machine, durable, "session started");
        let io = SessionIo {
            ctl,
            inject_rx,
            cancel: cancel.clone(),
            shutdown,
        };
        run_session(&mut rd, wr, state, &machine, sink, io).await
    }
    .await;
    sessions.release(&machine, generation);
    match &result {
        Ok(()) => info!(%machine, "session ended"),
        Err(e) => warn!(%machine, "session ended: {e}"),
    }
    if !matches!(result, Err(ReceiveError::Superseded)) {
        let reason = match &result {
            Ok(()) => "the agent closed the session".to_string(),
            Err(e) => e.to_string(),
        };
        sessions.interrupted(&machine, reason);
    }
    result
}

fn validate_hello(machine: &str, disks: &[DiskInfo], stream_id: &StreamId) -> Result<(), String> {
    crate::ids::validate_id("machine", machine)?;
    if stream_id == &[0; 16] {
        return Err("hello carries no stream id".into());
    }
    if disks.is_empty() {
        return Err("hello lists no disks".into());
    }
    for d in disks {
        crate::ids::validate_id("disk", &d.id)?;
    }
    Ok(())
}

async fn send_error<W: AsyncWrite + Unpin>(wr: &mut W, code: u16, message: &str) {
    let f = Frame::Error {
        code,
        message: message.to_string(),
    };
    let _ = write_frame(wr, &f).await;
    let _ = wr.flush().await;
}

/// What a session needs besides the connection and the sink.
struct SessionIo {
    ctl: Arc<SessionCtl>,
    inject_rx: mpsc::Receiver<Frame>,
    cancel: CancellationToken,
    shutdown: CancellationToken,
}

/// What the reader hands the persister, in stream order.
enum Work {
    /// Entries to persist, with the share of [`PERSIST_QUEUE_BYTES`] they hold.
    Entries(Vec<Entry>, tokio::sync::OwnedSemaphorePermit),
    Resync(Frame),
}

/// Answers one checksum-resync frame of the agent (`None`: no reply).
async fn answer_resync<S: StreamSink>(
    sink: &S,
    machine: &str,
    ctl: &SessionCtl,
    frame: Frame,
) -> anyhow::Result<Option<Frame>> {
    let scheme = HashScheme::for_version(ctl.version);
    let size_of = |disk: u16| {
        ctl.disks.get(disk as usize).map(|d| d.size).ok_or_else(|| {
            anyhow::anyhow!("resync frame names disk {disk}, which the hello did not announce")
        })
    };
    match frame {
        Frame::RegionHashes {
            disk,
            first_region,
            hashes,
        } => {
            let size = size_of(disk)?;
            let end = first_region.saturating_add(hashes.len() as u64);
            if end > resync::region_count(size) {
                anyhow::bail!(
                    "region hashes {first_region}..{end} of disk {disk} go beyond its {} regions",
                    resync::region_count(size)
                );
            }
            let mut regions = Vec::new();
            for (i, chunk) in hashes.chunks(LOOKUP_REGIONS).enumerate() {
                let first = first_region + (i * LOOKUP_REGIONS) as u64;
                let first_block = first * REGION_BLOCKS;
                let count: u64 = (first..first + chunk.len() as u64)
                    .map(|r| resync::blocks_in_region(size, r))
                    .sum();
                let mine = sink
                    .block_hashes(machine, disk, first_block, count, scheme)
                    .await?;
                regions.extend(compare::differing_regions(
                    size, first, chunk, &mine, scheme,
                )?);
            }
            let differ = regions.len() as u64;
            ctl.event(|p| {
                p.regions_compared += hashes.len() as u64;
                p.regions_differ += differ;
                Some(ResyncEvent::Progress(p.clone()))
            });
            Ok(Some(Frame::RegionsDiffer {
                disk,
                first_region,
                count: hashes.len() as u32,
                regions,
            }))
        }
        Frame::BlockHashes {
            disk,
            region,
            hashes,
        } => {
            let size = size_of(disk)?;
            let n = resync::blocks_in_region(size, region);
            if hashes.len() as u64 != n {
                anyhow::bail!(
                    "block hashes of disk {disk} region {region}: {} hashes, the region has {n} blocks",
                    hashes.len()
                );
            }
            let mine = sink
                .block_hashes(machine, disk, region * REGION_BLOCKS, n, scheme)
                .await?;
            if mine.len() as u64 != n {
                anyhow::bail!("block hash lookup returned {} of {n} hashes", mine.len());
            }
            let blocks = compare::differing_blocks(&hashes, &mine)?;
            let differ = blocks.len() as u64;
            ctl.event(|p| {
                p.blocks_compared += n;
                p.blocks_differ += differ;
                None
            });
            Ok(Some(Frame::BlocksDiffer {
                disk,
                region,
                blocks,
            }))
        }
        Frame::ResyncDone(report) => {
            if report.error.is_empty() {
                info!(%machine, ?report, "checksum resync finished");
            } else {
                warn!(%machine, "checksum resync failed on the agent: {}", report.error);
            }
            sink.resync_done(machine, &report, &ctl.disks).await?;
            ctl.event(|_| Some(ResyncEvent::Done(report)));
            Ok(None)
        }
        other => anyhow::bail!("not a resync frame: {other:?}"),
    }
}

async fn run_session<R, W, S>(
    rd: &mut R,
    mut wr: W,
    mut state: ReceiverState,
    machine: &str,
    sink: Arc<S>,
    io: SessionIo,
) -> Result<(), ReceiveError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Send + Unpin + 'static,
    S: StreamSink,
{
    let SessionIo {
        ctl,
        mut inject_rx,
        cancel,
        shutdown,
    } = io;
    let (persist_tx, mut persist_rx) = mpsc::channel::<Work>(PERSIST_QUEUE_DEPTH);
    let queue_bytes = Arc::new(tokio::sync::Semaphore::new(PERSIST_QUEUE_BYTES));
    let (reply_tx, mut reply_rx) = mpsc::channel::<Frame>(REPLY_QUEUE_DEPTH);

    let writer = crate::spawn(async move {
        loop {
            // Replies end the writer when every sender is gone; injected frames
            // (their sender lives in the session slot) never do.
            let f = tokio::select! {
                biased;
                f = reply_rx.recv() => match f {
                    Some(f) => f,
                    None => break,
                },
                Some(f) = inject_rx.recv() => f,
            };
            write_frame(&mut wr, &f).await?;
            if reply_rx.is_empty() && inject_rx.is_empty() {
                wr.flush().await?;
            }
        }
        let _ = wr.shutdown().await;
        Ok::<(), std::io::Error>(())
    });

    let persister = {
        let reply_tx = reply_tx.clone();
        let machine = machine.to_string();
        let ctl = ctl.clone();
        async move {
            let mut next: Option<Work> = None;
            loop {
                let work = match next.take() {
                    Some(w) => w,
                    None => match persist_rx.recv().await {
                        Some(w) => w,
                        None => break,
                    },
                };
                let mut held = Vec::new();
                let mut batch = match work {
                    Work::Entries(batch, permit) => {
                        held.push(permit);
                        batch
                    }
                    Work::Resync(frame) => {
                        match answer_resync(&*sink, &machine, &ctl, frame).await {
                            Ok(Some(reply)) => {
                                if reply_tx.send(reply).await.is_err() {
                                    break;
                                }
                            }
                            Ok(None) => {}
                            Err(e) => {
                                let e = e.context("checksum resync");
                                let _ = reply_tx
                                    .send(Frame::Error {
                                        code: error_code::SERVER,
                                        message: format!("{e:#}"),
                                    })
                                    .await;
                                return Err(ReceiveError::Sink(e));
                            }
                        }
                        continue;
                    }
                };
                let mut bytes: usize = batch.iter().map(Entry::encoded_len).sum();
                while bytes < MAX_COALESCED_BYTES {
                    match persist_rx.try_recv() {
                        Ok(Work::Entries(more, permit)) => {
                            bytes += more.iter().map(Entry::encoded_len).sum::<usize>();
                            batch.extend(more);
                            held.push(permit);
                        }
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let durable = sink
                    .append(&machine, batch)
                    .await
                    .map_err(ReceiveError::Sink)?;
                drop(held); // the queue may take more
                if reply_tx.send(Frame::Ack { durable }).await.is_err() {
                    break;
                }
            }
            Ok::<(), ReceiveError>(())
        }
    };

    let reader = async move {
        let reply_tx = reply_tx;
        loop {
            let frame = tokio::select! {
                f = read_frame(rd, MAX_FRAME_LEN) => f,
                _ = cancel.cancelled() => return Err(ReceiveError::Superseded),
                _ = shutdown.cancelled() => return Ok(()),
            };
            let frame = match frame {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(()),
                Err(e) => {
                    if let FrameError::Decode(d) = &e {
                        let _ = reply_tx
                            .send(Frame::Error {
                                code: error_code::PROTOCOL,
                                message: format!("malformed frame: {d}"),
                            })
                            .await;
                    }
                    return Err(e.into());
                }
            };
            match state.on_frame(frame) {
                Ok(Action::None) => {}
                Ok(Action::Reply(f)) => {
                    let _ = reply_tx.send(f).await;
                }
                Ok(Action::Persist(entries)) => {
                    debug!(n = entries.len(), "batch received");
                    let bytes: usize = entries.iter().map(Entry::encoded_len).sum();
                    let share = bytes.clamp(1, PERSIST_QUEUE_BYTES) as u32;
                    let Ok(permit) = queue_bytes.clone().acquire_many_owned(share).await else {
                        return Ok(());
                    };
                    if persist_tx
                        .send(Work::Entries(entries, permit))
                        .await
                        .is_err()
                    {
                        return Ok(()); // persister failed; its error is reported below
                    }
                }
                Ok(Action::Group(f)) => ctl.group_reply(f),
                Ok(Action::Resync(f)) => {
                    if persist_tx.send(Work::Resync(f)).await.is_err() {
                        return Ok(());
                    }
                }
                Err(e) => {
                    let _ = reply_tx
                        .send(Frame::Error {
                            code: error_code::PROTOCOL,
                            message: e.to_string(),
                        })
                        .await;
                    return Err(e.into());
                }
            }
        }
    };

    // The reader ends first (peer closed, error or shutdown); the persister then
    // drains what was queued so that everything received is made durable and acked.
    let (read_result, persist_result) = tokio::join!(reader, persister);
    let _ = writer.await;
    persist_result?;
    read_result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Hello, Op, PROTOCOL_MAX, PROTOCOL_MIN};
    use bytes::Bytes;
    use std::sync::Mutex as StdMutex;

    /// A sink that records what it persisted.
    #[derive(Default)]
    struct MemSink {
        entries: StdMutex<Vec<u64>>,
    }

    impl StreamSink for MemSink {
        async fn open(&self, _m: &str, _d: &[DiskInfo], id: StreamId) -> anyhow::Result<Opened> {
            Ok(Opened {
                durable: self.entries.lock().unwrap().last().copied().unwrap_or(0),
                stream_id: id,
            })
        }
        async fn append(&self, _m: &str, entries: Vec<Entry>) -> anyhow::Result<u64> {
            let mut v = self.entries.lock().unwrap();
            v.extend(entries.iter().map(|e| e.seq));
            Ok(*v.last().unwrap())
        }
        /// Every block is zero except block 1 of disk 0, which is unknown.
        async fn block_hashes(
            &self,
            _m: &str,
            disk: u16,
            first: u64,
            count: u64,
            scheme: HashScheme,
        ) -> anyhow::Result<Vec<BlockHash>> {
            Ok((first..first + count)
                .map(|b| {
                    if disk == 0 && b == 1 {
                        resync::UNKNOWN_HASH
                    } else {
                        scheme.zero_block()
                    }
                })
                .collect())
        }
    }

    async fn next<R: AsyncRead + Unpin>(rd: &mut R) -> Frame {
        read_frame(rd, MAX_FRAME_LEN).await.unwrap().unwrap()
    }

    #[tokio::test]
    async fn resync_is_injected_and_hash_frames_are_answered_in_order() {
        resync_at(PROTOCOL_MAX).await;
    }

    /// A session of protocol 7 compares BLAKE3 hashes, and still finds only
    /// the block that differs.
    #[tokio::test]
    async fn a_protocol_7_resync_compares_blake3_hashes() {
        assert_eq!(HashScheme::for_version(7), HashScheme::Blake3);
        resync_at(7).await;
    }

    async fn resync_at(version: u16) {
        let scheme = HashScheme::for_version(version);
        let sink = Arc::new(MemSink::default());
        let sessions = Arc::new(Sessions::default());
        assert!(sessions
            .start_resync("m", None)
            .unwrap_err()
            .contains("no live session"));
        let (client, server) = tokio::io::duplex(1 << 20);
        let srv = {
            let sessions = sessions.clone();
            tokio::spawn(async move {
                let allow = |_: &str| true;
                serve_connection(
                    server,
                    "test-peer",
                    &allow,
                    sink,
                    &sessions,
                    CancellationToken::new(),
                )
                .await
            })
        };
        let (mut rd, mut wr) = tokio::io::split(client);
        write_frame(&mut wr, &hello_at("m", version)).await.unwrap();
        wr.flush().await.unwrap();
        assert!(matches!(next(&mut rd).await, Frame::Welcome { .. }));
        let e = sessions.start_resync("m", Some("nope")).unwrap_err();
        assert!(e.contains("no disk \"nope\""), "{e}");
        let mut events = sessions.start_resync("m", Some("d")).unwrap();
        assert!(sessions
            .start_resync("m", None)
            .unwrap_err()
            .contains("already running"));
        assert_eq!(next(&mut rd).await, Frame::ResyncStart { disks: vec![0] });

        let zeros = vec![scheme.zero_block(); 256];
        write_frame(
            &mut wr,
            &Frame::RegionHashes {
                disk: 0,
                first_region: 0,
                hashes: vec![scheme.region(&zeros)],
            },
        )
        .await
        .unwrap();
        write_frame(
            &mut wr,
            &Frame::BlockHashes {
                disk: 0,
                region: 0,
                hashes: zeros.iter().map(resync::wire_block_hash).collect(),
            },
        )
        .await
        .unwrap();
        write_frame(&mut wr, &Frame::ResyncDone(ResyncReport::default()))
            .await
            .unwrap();
        wr.flush().await.unwrap();
        assert_eq!(
            next(&mut rd).await,
            Frame::RegionsDiffer {
                disk: 0,
                first_region: 0,
                count: 1,
                regions: vec![0],
            }
        );
        assert_eq!(
            next(&mut rd).await,
            Frame::BlocksDiffer {
                disk: 0,
                region: 0,
                blocks: vec![1],
            }
        );
        assert!(matches!(
            events.recv().await,
            Some(ResyncEvent::Progress(ResyncProgress {
                regions_compared: 1,
                regions_differ: 1,
                ..
            }))
        ));
        assert_eq!(
            events.recv().await,
            Some(ResyncEvent::Done(ResyncReport::default()))
        );

        // Hashes beyond the disk end the session with an error naming them.
        write_frame(
            &mut wr,
            &Frame::RegionHashes {
                disk: 0,
                first_region: 1,
                hashes: vec![[0; 16]],
            },
        )
        .await
        .unwrap();
        wr.flush().await.unwrap();
        match next(&mut rd).await {
            Frame::Error { message, .. } => assert!(message.contains("beyond"), "{message}"),
            other => panic!("expected an error, got {other:?}"),
        }
        drop(wr);
        drop(rd);
        assert!(srv.await.unwrap().is_err());
    }

    fn hello(machine: &str) -> Frame {
        hello_at(machine, PROTOCOL_MAX)
    }

    fn hello_at(machine: &str, max_version: u16) -> Frame {
        Frame::Hello(Hello {
            min_version: PROTOCOL_MIN,
            max_version,
            machine: machine.into(),
            disks: vec![DiskInfo::new("d", 1 << 20)],
            stream_id: [3; 16],
        })
    }

    fn writes(range: std::ops::RangeInclusive<u64>) -> Frame {
        Frame::Writes(
            range
                .map(|seq| Entry {
                    seq,
                    op: Op::Write {
                        disk: 0,
                        offset: 0,
                        data: Bytes::from_static(b"x"),
                    },
                })
                .collect(),
        )
    }

    async fn session(
        sink: Arc<MemSink>,
        sessions: Arc<Sessions>,
        machine: &'static str,
        frames: Vec<Frame>,
    ) -> (Vec<Frame>, Result<(), ReceiveError>) {
        let (client, server) = tokio::io::duplex(1 << 20);
        let allow = |m: &str| m != "intruder";
        let srv = tokio::spawn(async move {
            serve_connection(
                server,
                "test-peer",
                &allow,
                sink,
                &sessions,
                CancellationToken::new(),
            )
            .await
        });
        let (mut rd, mut wr) = tokio::io::split(client);
        write_frame(&mut wr, &hello(machine)).await.unwrap();
        for f in &frames {
            write_frame(&mut wr, f).await.unwrap();
        }
        wr.flush().await.unwrap();
        // Read until the last ack covers what was sent, or the server closes.
        let want = frames
            .iter()
            .filter_map(|f| match f {
                Frame::Writes(es) => es.last().map(|e| e.seq),
                _ => None,
            })
            .max();
        let mut got = Vec::new();
        while let Ok(Some(f)) = read_frame(&mut rd, MAX_FRAME_LEN).await {
            let done = matches!(f, Frame::Ack { durable } if Some(durable) == want)
                || matches!(f, Frame::Error { .. });
            got.push(f);
            if done {
                break;
            }
        }
        drop(wr);
        drop(rd);
        (got, srv.await.unwrap())
    }

    #[tokio::test]
    async fn resend_after_reconnect_is_applied_once() {
        let sink = Arc::new(MemSink::default());
        let sessions = Arc::new(Sessions::default());
        let (got, _) = session(sink.clone(), sessions.clone(), "m", vec![writes(1..=5)]).await;
        assert!(matches!(got[0], Frame::Welcome { durable: 0, .. }));
        assert_eq!(got.last(), Some(&Frame::Ack { durable: 5 }));
        // The agent did not see the ack and resends 3..=8: 3..=5 are dropped.
        let (got, _) = session(sink.clone(), sessions, "m", vec![writes(3..=8)]).await;
        assert!(matches!(got[0], Frame::Welcome { durable: 5, .. }));
        assert_eq!(*sink.entries.lock().unwrap(), (1..=8).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn gaps_and_unauthorised_machines_get_an_error_frame() {
        let sink = Arc::new(MemSink::default());
        let sessions = Arc::new(Sessions::default());
        let (got, r) = session(sink.clone(), sessions.clone(), "m", vec![writes(2..=3)]).await;
        assert!(
            matches!(got.last(), Some(Frame::Error { message, .. }) if message.contains("gap"))
        );
        assert!(r.is_err());
        let (got, r) = session(sink.clone(), sessions, "intruder", vec![]).await;
        assert!(matches!(
            got.last(),
            Some(Frame::Error {
                code: error_code::AUTH,
                ..
            })
        ));
        assert!(matches!(r, Err(ReceiveError::NotAllowed(_))));
        assert!(sink.entries.lock().unwrap().is_empty());
    }
}
