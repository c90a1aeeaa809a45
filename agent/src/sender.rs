//! Shipping the stream: one TLS 1.3 connection (client certificate) to the
//! process server, hello → welcome (resume after the server's durable position)
//! → frames of queued entries; acks free the journal. Reconnects with capped
//! backoff forever; the journal holds the stream meanwhile.
//!
//! The welcome may show that this agent lost its state (another stream id, or
//! more durable than the journal kept): the agent then rebases (`rebase.rs`)
//! and reconnects.
//!
//! A checksum resync (`checksum.rs`) runs as a task of the session whose frames
//! share the writer: started by the process server's resync-start, or by the
//! agent when a plan is pending (a resize, lost state, a resync cut short) and
//! no initial sync runs (a failed run is retried after a growing pause). It is aborted when the session ends; its persisted
//! plan makes the next session resume it.
//!
//! Group frames (quiesce, prepare, commit, release) go to the machine's group
//! hold (`grouppoint.rs`); a hold still in place when the session ends is
//! released, and a quiesce thawed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use lifeboat_common::framed::{read_frame, write_frame};
use lifeboat_common::protocol::{
    DiskInfo, Frame, Hello, MAX_FRAME_LEN, PROTOCOL_MAX, PROTOCOL_MIN,
};
use lifeboat_common::session::Welcome;
use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::checksum::Checksum;
use crate::rebase::StreamIdFile;
use crate::stream::Stream;

/// Entry bytes per writes frame.
pub const BATCH_BYTES: usize = 4 * 1024 * 1024;
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A ping is sent after this long without traffic; the connection is dropped
/// when nothing arrives for `IDLE_TIMEOUT`.
pub const PING_INTERVAL: Duration = Duration::from_secs(10);
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(45);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

pub struct SenderConfig {
    pub machine: String,
    pub server: String,
    pub server_name: String,
    pub tls: Arc<rustls::ClientConfig>,
    pub disks: Vec<DiskInfo>,
    /// The configured disks, each with its number (checksum resync reads them).
    pub protected: Vec<Arc<crate::disk::ProtectedDisk>>,
    pub checksum: Arc<Checksum>,
    pub stream_id: Arc<StreamIdFile>,
    /// The consistency-group hold (`grouppoint.rs`).
    pub groups: Arc<crate::grouppoint::GroupHold>,
    /// A planned failover's final point (`finalpoint.rs`).
    pub finals: Arc<crate::finalpoint::FinalPoints>,
    /// `[bandwidth]`: the stream's entries go at most this fast.
    pub bandwidth: Arc<lifeboat_common::bandwidth::Limiter>,
}

/// How often a session looks for a pending checksum resync to resume.
const RESUME_POLL: Duration = Duration::from_millis(250);
/// Pauses before a pending resync whose run failed is started again.
const RESUME_RETRY_MIN: Duration = Duration::from_secs(5);
const RESUME_RETRY_MAX: Duration = Duration::from_secs(300);

/// Aborts the task when dropped (a resync does not outlive its session).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The session's checksum resync task and the channel of its replies.
#[derive(Default)]
struct ResyncSlot(std::sync::Mutex<Option<(AbortOnDrop, mpsc::UnboundedSender<Frame>)>>);

impl ResyncSlot {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, Option<(AbortOnDrop, mpsc::UnboundedSender<Frame>)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn running(&self) -> bool {
        self.lock()
            .as_ref()
            .is_some_and(|(t, _)| !t.0.is_finished())
    }

    /// Starts the pending plan unless a run is going on; returns whether it
    /// did. `version` is the session's: it decides the hashes.
    fn start(
        &self,
        cfg: &SenderConfig,
        stream: &Arc<Stream>,
        out: &mpsc::Sender<Frame>,
        version: u16,
    ) -> bool {
        let mut slot = self.lock();
        if slot.as_ref().is_some_and(|(t, _)| !t.0.is_finished()) {
            return false;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let task = lifeboat_common::spawn(crate::checksum::run(
            cfg.checksum.clone(),
            cfg.protected.clone(),
            stream.clone(),
            out.clone(),
            rx,
            lifeboat_common::resync::HashScheme::for_version(version),
        ));
        *slot = Some((AbortOnDrop(task), tx));
        true
    }

    fn forward(&self, f: Frame) -> bool {
        self.lock()
            .as_ref()
            .is_some_and(|(_, tx)| tx.send(f).is_ok())
    }
}

/// Whether a session with the process server is up, and when the stream last
/// made progress (status shows a stream that does not as `stalled`).
pub struct Link {
    pub connected: AtomicBool,
    pub last_error: std::sync::Mutex<Option<String>>,
    /// When an acknowledgement last moved `acked` (or a session began).
    pub last_progress: std::sync::Mutex<std::time::Instant>,
}

impl Default for Link {
    fn default() -> Self {
        Link {
            connected: AtomicBool::new(false),
            last_error: std::sync::Mutex::new(None),
            last_progress: std::sync::Mutex::new(std::time::Instant::now()),
        }
    }
}

impl Link {
    fn progressed(&self) {
        *self.last_progress.lock().unwrap_or_else(|p| p.into_inner()) = std::time::Instant::now();
    }

    /// How long the stream has gone without an acknowledgement.
    pub fn since_progress(&self) -> Duration {
        self.last_progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Runs until `cancel`, reconnecting as needed.
pub async fn run(
    cfg: SenderConfig,
    stream: Arc<Stream>,
    link: Arc<Link>,
    cancel: CancellationToken,
) {
    let mut backoff = BACKOFF_MIN;
    while !cancel.is_cancelled() {
        let result = tokio::select! {
            r = session(&cfg, &stream, &link, &cancel) => r,
            _ = cancel.cancelled() => Ok(()),
        };
        if link.connected.load(Ordering::Relaxed) {
            backoff = BACKOFF_MIN; // the session worked: a cut is not a failing server
        }
        link.connected.store(false, Ordering::Relaxed);
        stream.lock_state().on_disconnect();
        match result {
            Ok(()) => backoff = BACKOFF_MIN,
            Err(e) => {
                warn!(
                    "replication link to {}: {e:#}; retrying in {backoff:?}",
                    cfg.server
                );
                *link.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("{e:#}"));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = cancel.cancelled() => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// The next keep-alive ping.
fn ping(nonce: &mut u64) -> Frame {
    *nonce += 1;
    Frame::Ping {
        nonce: *nonce,
        reply: false,
    }
}

/// Writes `f` and flushes: a frame that must not wait behind a batch.
async fn send_now<W: tokio::io::AsyncWrite + Unpin>(wr: &mut W, f: &Frame) -> std::io::Result<()> {
    write_frame(wr, f).await?;
    wr.flush().await
}

/// A read error of the first reply, with what the server's TLS alert means
/// for this machine when it refused the certificate (TLS 1.3 reports the
/// client certificate's verdict only after the handshake).
fn certificate_refused(e: lifeboat_common::framed::FrameError, server: &str) -> anyhow::Error {
    let text = e.to_string();
    if text.contains("CertificateRevoked") {
        anyhow!(
            "{server} refused this machine's certificate: it is revoked (the machine was removed with lifeboat-ps machines remove); to protect it again, move the certificate files away and run lifeboat-agent register ({text})"
        )
    } else if text.contains("BadCertificate")
        || text.contains("UnknownCA")
        || text.contains("CertificateRequired")
    {
        anyhow!("{server} refused this machine's certificate ({text}): is it issued by this process server's CA?")
    } else {
        e.into()
    }
}

async fn session(
    cfg: &SenderConfig,
    stream: &Arc<Stream>,
    link: &Link,
    cancel: &CancellationToken,
) -> Result<()> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&cfg.server))
        .await
        .map_err(|_| anyhow!("connecting to {} timed out", cfg.server))?
        .with_context(|| format!("connecting to {}", cfg.server))?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(cfg.server_name.clone())
        .map_err(|_| anyhow!("invalid server name {:?}", cfg.server_name))?;
    let tls = tokio::time::timeout(
        CONNECT_TIMEOUT,
        TlsConnector::from(cfg.tls.clone()).connect(name, tcp),
    )
    .await
    .map_err(|_| anyhow!("TLS handshake with {} timed out", cfg.server))?
    .with_context(|| format!("TLS handshake with {}", cfg.server))?;
    let (mut rd, mut wr) = tokio::io::split(tls);
    let hello = Frame::Hello(Hello {
        min_version: PROTOCOL_MIN,
        max_version: PROTOCOL_MAX,
        machine: cfg.machine.clone(),
        disks: cfg.disks.clone(),
        stream_id: cfg.stream_id.get(),
    });
    write_frame(&mut wr, &hello).await?;
    wr.flush().await?;
    let (durable, theirs, version) = match tokio::time::timeout(CONNECT_TIMEOUT, read_frame(&mut rd, MAX_FRAME_LEN)).await {
        Err(_) => bail!("no welcome from {} within {CONNECT_TIMEOUT:?}", cfg.server),
        Ok(r) => match r.map_err(|e| certificate_refused(e, &cfg.server))? {
            Some(Frame::Welcome { durable, stream_id, version, .. }) => (durable, stream_id, version),
            Some(Frame::Error { code, message }) => bail!("process server refused the session (code {code}): {message}"),
            Some(other) => bail!("expected a welcome, got {other:?}"),
            None => bail!("process server closed the connection during the hello (is this machine's certificate accepted?)"),
        },
    };
    let welcome = stream
        .lock_state()
        .on_welcome(cfg.stream_id.get(), theirs, durable);
    if let Welcome::LostState(why) = welcome {
        let _ = wr.shutdown().await;
        crate::rebase::rebase(
            &why.to_string(),
            durable,
            theirs,
            &cfg.stream_id,
            stream,
            &cfg.checksum,
            &cfg.protected,
        )
        .await?;
        return Ok(()); // reconnect with the adopted numbering
    }
    stream.released(durable);
    stream.mark_welcomed();
    link.connected.store(true, Ordering::Relaxed);
    *link.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
    info!("replicating to {} from seq {}", cfg.server, durable + 1);
    if version < lifeboat_common::protocol::PROTOCOL_TAG_SOURCE {
        warn!("the process server speaks protocol {version}: app-consistent points are recorded without their source");
    }

    // Frames of the checksum resync task, written between stream frames.
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<Frame>(64);
    let resync = ResyncSlot::default();
    let reader = async {
        loop {
            let f = match tokio::time::timeout(IDLE_TIMEOUT, read_frame(&mut rd, MAX_FRAME_LEN))
                .await
            {
                Err(_) => bail!("nothing heard from the process server for {IDLE_TIMEOUT:?}"),
                Ok(r) => r?,
            };
            match f {
                Some(Frame::Ack { durable }) => {
                    let moved = {
                        let mut s = stream.lock_state();
                        let before = s.acked();
                        s.on_ack(durable)?;
                        s.acked() > before
                    };
                    if moved {
                        link.progressed();
                    }
                    stream.released(durable);
                }
                Some(Frame::Ping { .. }) => {}
                Some(Frame::ResyncStart { disks }) => {
                    let refused = if resync.running() {
                        Some("a checksum resync is already running".to_string())
                    } else {
                        cfg.checksum
                            .request(
                                &cfg.protected,
                                &disks,
                                "checksum resync requested by the process server",
                                stream,
                                false,
                            )
                            .await
                            .err()
                            .map(|e| format!("{e:#}"))
                    };
                    match refused {
                        Some(error) => {
                            warn!("checksum resync refused: {error}");
                            let _ = ctl_tx
                                .send(Frame::ResyncDone(lifeboat_common::protocol::ResyncReport {
                                    disk_count: disks.len() as u16,
                                    error,
                                    ..Default::default()
                                }))
                                .await;
                        }
                        None => {
                            info!("checksum resync requested by the process server");
                            resync.start(cfg, stream, &ctl_tx, version);
                        }
                    }
                }
                Some(Frame::GroupPrepare { id, hold_ms, group }) => {
                    // The drain may take a while: acks go on meanwhile.
                    let (groups, stream, tx) = (cfg.groups.clone(), stream.clone(), ctl_tx.clone());
                    lifeboat_common::spawn(async move {
                        let hold = Duration::from_millis(hold_ms.into());
                        let error = match groups.prepare(&stream, id, &group, hold).await {
                            Ok(()) => String::new(),
                            Err(e) => {
                                warn!("group point {id} of {group}: cannot hold writes: {e}");
                                e
                            }
                        };
                        let _ = tx.send(Frame::GroupPrepared { id, error }).await;
                    });
                }
                Some(Frame::GroupQuiesce {
                    id,
                    quiesce_ms,
                    hold_ms,
                    group,
                }) => {
                    // Scripts and the freeze take a while: acks go on meanwhile.
                    let (groups, tx) = (cfg.groups.clone(), ctl_tx.clone());
                    tokio::spawn(async move {
                        let bound = Duration::from_millis(quiesce_ms.into());
                        let hold = Duration::from_millis(hold_ms.into());
                        let (source, error) = match groups.quiesce(id, &group, bound, hold).await {
                            Ok(source) => (Some(source), String::new()),
                            Err(e) => {
                                warn!("group point {id} of {group}: cannot quiesce: {e}");
                                (None, e)
                            }
                        };
                        let _ = tx.send(Frame::GroupQuiesced { id, source, error }).await;
                    });
                }
                Some(Frame::GroupCommit { id, label }) => {
                    let (seq, error) = match cfg.groups.commit(stream, id, &label) {
                        Ok(seq) => (seq, String::new()),
                        Err(e) => {
                            warn!("group point {id}: no tag placed: {e}");
                            (0, e)
                        }
                    };
                    let _ = ctl_tx.send(Frame::GroupCommitted { id, seq, error }).await;
                }
                Some(Frame::FinalPoint {
                    id,
                    quiesce_ms,
                    label,
                }) => {
                    // Quiescing takes a while: acks go on meanwhile.
                    let (finals, tx) = (cfg.finals.clone(), ctl_tx.clone());
                    lifeboat_common::spawn(async move {
                        let bound = Duration::from_millis(quiesce_ms.into());
                        let (seq, source, error) = match finals.take(bound, &label).await {
                            Ok(t) => (t.seq, t.source, String::new()),
                            Err(e) => {
                                warn!("no final point for the planned failover: {e}");
                                (0, None, e)
                            }
                        };
                        let _ = tx
                            .send(Frame::FinalPointTaken {
                                id,
                                seq,
                                source,
                                error,
                            })
                            .await;
                    });
                }
                Some(Frame::GroupRelease { id }) => {
                    cfg.groups
                        .release(Some(id), "the process server released it");
                }
                Some(f @ (Frame::RegionsDiffer { .. } | Frame::BlocksDiffer { .. })) => {
                    if !resync.forward(f) {
                        bail!("resync reply from the process server while no resync runs");
                    }
                }
                Some(Frame::Error { code, message }) => {
                    bail!("process server error (code {code}): {message}")
                }
                Some(other) => bail!("unexpected frame from the process server: {other:?}"),
                None => bail!("process server closed the connection"),
            }
        }
        #[allow(unreachable_code)]
        Ok::<(), anyhow::Error>(())
    };
    // Starts a pending checksum resync once no initial sync runs; a run that
    // failed is retried after a growing pause.
    let resumer = async {
        let mut pause = RESUME_RETRY_MIN;
        let mut next_try = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(RESUME_POLL).await;
            if cfg.checksum.pending().is_none() {
                pause = RESUME_RETRY_MIN; // the last run completed
                continue;
            }
            let due = tokio::time::Instant::now() >= next_try;
            if due && !stream.syncing() && !resync.running() {
                if resync.start(cfg, stream, &ctl_tx, version) {
                    info!("starting the pending checksum resync");
                }
                next_try = tokio::time::Instant::now() + pause;
                pause = (pause * 2).min(RESUME_RETRY_MAX);
            }
        }
        #[allow(unreachable_code)]
        Ok::<(), anyhow::Error>(())
    };
    let writer = async {
        let mut nonce = 0u64;
        let journal_written = stream.journal_written();
        loop {
            let notified = journal_written.notified();
            let mut wrote = false;
            while let Ok(f) = ctl_rx.try_recv() {
                write_frame(&mut wr, &f).await?;
                wrote = true;
            }
            let frames = stream.transmit(BATCH_BYTES).await?;
            if frames.is_empty() {
                let idle = {
                    let s = stream.lock_state();
                    s.acked() >= s.captured()
                };
                if idle {
                    link.progressed(); // nothing waits: not stalled
                }
                if wrote {
                    wr.flush().await?;
                }
                tokio::select! {
                    _ = notified => {}
                    Some(f) = ctl_rx.recv() => send_now(&mut wr, &f).await?,
                    _ = tokio::time::sleep(PING_INTERVAL) => {
                        send_now(&mut wr, &ping(&mut nonce)).await?;
                    }
                    _ = cancel.cancelled() => {
                        let _ = wr.shutdown().await;
                        return Ok(());
                    }
                }
                continue;
            }
            for f in frames {
                if let (Frame::Writes(entries), false) = (&f, cfg.bandwidth.is_unlimited()) {
                    // Flushed first: what is buffered is sent while waiting.
                    wr.flush().await?;
                    let bytes: usize = entries.iter().map(|e| e.encoded_len()).sum();
                    // A low rate can hold a 4 MiB batch for longer than the
                    // server's idle timeout: pings go on while it waits.
                    let allowed = cfg.bandwidth.acquire(bytes as u64);
                    tokio::pin!(allowed);
                    loop {
                        tokio::select! {
                            _ = &mut allowed => break,
                            // Replies to the receiver (group points, final
                            // points, resync hashes) do not wait for data.
                            Some(c) = ctl_rx.recv() => send_now(&mut wr, &c).await?,
                            _ = tokio::time::sleep(PING_INTERVAL) => {
                                send_now(&mut wr, &ping(&mut nonce)).await?;
                            }
                            _ = cancel.cancelled() => {
                                let _ = wr.shutdown().await;
                                return Ok(());
                            }
                        }
                    }
                }
                // A version 3 server reads tags without their source.
                write_frame(&mut wr, &f.for_version(version)).await?;
            }
            wr.flush().await?;
        }
        #[allow(unreachable_code)]
        Ok::<(), anyhow::Error>(())
    };
    let r = tokio::select! {
        r = reader => r,
        r = writer => r,
        r = resumer => r,
    };
    cfg.groups
        .release(None, "the session with the process server ended");
    r
}
