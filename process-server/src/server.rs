//! Accepting agents: TLS 1.3 with client certificates on the listen address, one
//! task per connection, each driving the shared receiver with the cache as sink.
//!
//! A connection permit is taken before `accept` (`MAX_CONNECTIONS`); a source
//! IP holding `max-connections-per-source` connections is refused; the TLS
//! handshake must finish within `handshake-timeout`, the hello must be read
//! (and answered) within `hello-timeout` after it, and a connection that sends
//! nothing for `idle-timeout` is closed ([`Limited`]). A failed handshake or a
//! misbehaving agent is logged and closed without disturbing the others.

use lifeboat_common::TrackHere;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use lifeboat_common::catalogue::{self, MachineRecord, FORMAT_VERSION};
use lifeboat_common::protocol::{DiskInfo, Entry, StreamId};
use lifeboat_common::receiver::{
    accept_tls, serve_authenticated, Deadlines, Opened, Sessions, StreamSink,
};
use lifeboat_common::seal::Key;
use lifeboat_common::store::Store;
use lifeboat_common::tls;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::cache::Cache;
use crate::config::PsConfig;
use crate::monitor::Monitor;
use crate::ownership::Ownership;
use crate::uploader::{self, MachineUploader};

pub const MAX_CONNECTIONS: usize = 1024;
/// How long a hello waits to learn whether the machine was failed over
/// (`failed-over.json`) before the session goes on without knowing.
const FAILED_OVER_LOOKUP: Duration = Duration::from_secs(3);
/// How often a cache that failed a write is probed (and, with room again,
/// reopened): [`Cache::recover`].
pub const CACHE_RECOVERY_INTERVAL: Duration = Duration::from_secs(1);

/// Connections open per source address.
#[derive(Default)]
struct PerSource(Mutex<HashMap<IpAddr, usize>>);

/// One connection counted against its source; uncounted when dropped.
struct SourceSlot {
    table: Arc<PerSource>,
    ip: IpAddr,
}

impl PerSource {
    /// A slot for `ip`, or the number already open if it is at `max`.
    fn take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Result<SourceSlot, usize> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return Err(*n);
        }
        *n += 1;
        Ok(SourceSlot {
            table: self.clone(),
            ip,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut m = self.table.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// The process server's sink: the RocksDB cache, with an uploader per machine.
pub struct PsSink {
    cfg: Arc<PsConfig>,
    cache: Arc<Cache>,
    store: Store,
    kek: Key,
    ownership: Arc<Ownership>,
    monitor: Arc<Monitor>,
    limits: Arc<uploader::UploadLimits>,
    uploaders: Mutex<HashMap<String, Arc<MachineUploader>>>,
    tasks: tokio_util::task::TaskTracker,
    cancel: CancellationToken,
}

impl PsSink {
    fn uploader(&self, machine: &str) -> Arc<MachineUploader> {
        let mut map = self.uploaders.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(u) = map.get(machine) {
            return u.clone();
        }
        let u = Arc::new(MachineUploader {
            machine: machine.to_string(),
            notify: tokio::sync::Notify::new(),
            tail: Default::default(),
        });
        map.insert(machine.to_string(), u.clone());
        let env = uploader::UploadEnv {
            cfg: self.cfg.clone(),
            cache: self.cache.clone(),
            store: self.store.clone(),
            kek: self.kek.clone(),
            ownership: self.ownership.clone(),
            monitor: self.monitor.clone(),
            limits: self.limits.clone(),
            cancel: self.cancel.clone(),
        };
        let span = tracing::info_span!("upload", machine = %machine);
        self.tasks.spawn_here(tracing::Instrument::instrument(
            uploader::supervise(env, u.clone()),
            span,
        ));
        u
    }

    /// Takes a machine's record and stream end from the store into an empty
    /// cache (the process server was rebuilt), in one synced batch. Block
    /// hashes are then unknown until a full checksum resync: the agent, told
    /// the server lost what it acknowledged, runs one.
    ///
    /// A stored stream with a gap (uploads were in flight when the old server
    /// died) continues after the gap's start: the segments and points beyond
    /// it cannot be reached by any recovery and would collide with the new
    /// seqs, so they are moved under `orphaned/` (kept, not deleted), and
    /// marks beyond it removed. Segments without `machine.json` are refused.
    ///
    /// The server takes ownership of the machine in the store first (a
    /// takeover bumps the epoch; see `ownership.rs`), so the server it
    /// replaces stops uploading before anything is moved.
    async fn adopt_from_store(&self, machine: &str) -> Result<()> {
        let keys = uploader::machine_keys(&self.store, &self.kek, machine).await?;
        let ck = &keys.catalogue;
        let held = self
            .ownership
            .claim(&self.store, &self.cache, ck, machine)
            .await?;
        let epoch = held.record.epoch;
        let segments = catalogue::list_segments(&self.store, machine).await?;
        let all = catalogue::Fences::default();
        let bases = lifeboat_common::base::list_bases(&self.store, Some(ck), machine, &all).await?;
        let rec = match catalogue::load_machine(&self.store, ck, machine).await {
            Ok(r) => r,
            Err(catalogue::CatalogueError::Missing { .. })
                if segments.is_empty() && bases.is_empty() =>
            {
                return Ok(()); // a new machine
            }
            Err(catalogue::CatalogueError::Missing { object }) => anyhow::bail!(
                "the store holds {} segments and {} bases of {machine} but not its record {object}: restore it before this machine can continue",
                segments.len(),
                bases.len()
            ),
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("reading the record of {machine} in the store"))
            }
        };
        // Where this epoch continues the stream, recorded before anything
        // else: what the old owner lands after it is not part of the stream
        // (catalogue.rs, fences). A retry after a crash keeps the first answer.
        // The stream end under every fence, ours included: on a retry after a
        // crash that is our record's `after` again (nothing of ours was
        // uploaded yet), and if this server did upload in its epoch before it
        // lost its cache, its own segments count.
        let view = lifeboat_common::base::stream_view(&self.store, Some(ck), machine).await?;
        let fences = &view.fences;
        let end = match fences.records().iter().find(|r| r.epoch == epoch) {
            Some(r) if r.server != self.ownership.me.id => anyhow::bail!(
                "{} says process server {} took machine {machine} over at owner epoch {epoch}, the epoch this server ({}) was just given: refusing to continue its stream",
                self.store.describe(&catalogue::epoch_object(machine, epoch)),
                r.server,
                self.ownership.me.id
            ),
            Some(_) => view.prefix.end,
            None => {
                let end = view.prefix.end;
                let r = catalogue::EpochRecord {
                    format: FORMAT_VERSION,
                    epoch,
                    after: end,
                    server: self.ownership.me.id.clone(),
                };
                let name = catalogue::epoch_object(machine, epoch);
                let body = bytes::Bytes::from(catalogue::sign_record(ck, &name, &r));
                self.store.create(&name, body, |_| false).await?;
                end
            }
        };
        // Tidy: segments wholly beyond the end (after a gap, or landed late)
        // and the points and marks after it go under orphaned/ (kept).
        let beyond: Vec<_> = segments.iter().filter(|s| s.first > end).collect();
        if !beyond.is_empty() {
            warn!(
                %machine,
                "the stored stream has a gap or late uploads after seq {end}; moving {} unreachable segments and the points after it under orphaned/",
                beyond.len()
            );
            for s in &beyond {
                self.orphan(&catalogue::segment_object(machine, s)).await?;
            }
        }
        let all = catalogue::Fences::default();
        for p in catalogue::list_points(&self.store, Some(ck), machine, &all).await? {
            if p.seq > end {
                self.orphan(&catalogue::point_object(machine, p.seq))
                    .await?;
            }
        }
        for m in catalogue::list_inconsistent(&self.store, Some(ck), machine, &all).await? {
            if m.seq > end {
                self.store
                    .delete(&catalogue::inconsistent_object(machine, m.seq))
                    .await?;
            }
        }
        warn!(
            %machine,
            end,
            epoch,
            "the cache knows nothing of this machine, but the store holds its stream up to seq {end}: continuing from there as owner epoch {epoch}"
        );
        let cache = self.cache.clone();
        tokio::task::spawn_blocking(move || cache.adopt(&rec, end)).await??;
        Ok(())
    }

    /// What `failed-over.json` says, and its bytes, if the machine was
    /// failed over since its last rebase. One that does not authenticate counts too (a rebase
    /// costs a resync; resuming a journal the disks outgrew loses data). The
    /// store unreachable: `None` with a warning, so that sessions still open
    /// in an outage (the cache takes the writes); the next hello looks again.
    async fn failed_over(&self, machine: &str) -> Option<(String, bytes::Bytes)> {
        let name = catalogue::failed_over_object(machine);
        let what = self.store.describe(&name);
        let got = tokio::time::timeout(FAILED_OVER_LOOKUP, self.store.get(&name)).await;
        let bytes = match got {
            Ok(Ok(Some(b))) => b,
            Ok(Ok(None)) => return None,
            Ok(Err(e)) => {
                warn!(%machine, "cannot read {what} ({e}); the session resumes the agent's journal");
                return None;
            }
            Err(_) => {
                warn!(%machine, "reading {what} took over {FAILED_OVER_LOOKUP:?}; the session resumes the agent's journal");
                return None;
            }
        };
        let opened = async {
            let data = catalogue::load_data_key(&self.store, &self.kek, machine).await?;
            let key = catalogue::CatalogueKey::derive(&data);
            catalogue::open_record::<catalogue::FailedOverRecord>(&key, &self.store, &name, &bytes)
        }
        .await;
        let what = match opened {
            Ok(r) => format!(
                "machine {machine} was failed over at point {} (seq {}; recorded by lifeboat-mt {} at {})",
                r.point,
                r.seq,
                r.by,
                catalogue::format_time_ms(r.at_ms)
            ),
            Err(e) => format!("{what} does not authenticate ({e:#}); taking it as a failover"),
        };
        Some((what, bytes))
    }

    /// Moves `machines/<m>/<rest>` to `machines/<m>/orphaned/<rest>`.
    async fn orphan(&self, object: &str) -> Result<()> {
        let (dir, rest) = object
            .split_once('/')
            .and_then(|(a, r)| {
                r.split_once('/')
                    .map(|(m, rest)| (format!("{a}/{m}"), rest))
            })
            .with_context(|| format!("unexpected object name {object}"))?;
        let data = self
            .store
            .get(object)
            .await?
            .with_context(|| format!("{} vanished", self.store.describe(object)))?;
        self.store
            .put(&format!("{dir}/orphaned/{rest}"), data)
            .await?;
        self.store.delete(object).await?;
        Ok(())
    }
}

impl StreamSink for PsSink {
    /// Keeps the first stream id a machine presented; a later hello with
    /// another id changes nothing here (the agent must rebase first). A
    /// machine the cache does not know may still have a stream in the store
    /// (the process server lost its cache): it continues from there.
    async fn open(&self, machine: &str, disks: &[DiskInfo], stream_id: StreamId) -> Result<Opened> {
        if let Some(why) = self.ownership.fenced(machine) {
            anyhow::bail!("{why}");
        }
        if let Some(why) = self.monitor.backpressure() {
            anyhow::bail!("process server under backpressure: {why}");
        }
        let known = {
            let (cache, m) = (self.cache.clone(), machine.to_string());
            tokio::task::spawn_blocking(move || cache.machine(&m)).await??
        };
        if known.is_none() {
            self.adopt_from_store(machine).await?;
        }
        let failed_over = self.failed_over(machine).await;
        let cache = self.cache.clone();
        let m = machine.to_string();
        let disks = disks.to_vec();
        let fenced = failed_over.is_some();
        let opened = tokio::task::spawn_blocking(move || -> Result<(Opened, u64)> {
            let old = cache.machine(&m)?;
            let mut held = match old.as_ref().and_then(|r| r.stream_id.as_deref()) {
                Some(h) => lifeboat_common::unhex::<16>(h).with_context(|| {
                    format!("the machine record of {m} has a malformed stream id {h:?}")
                })?,
                None => stream_id,
            };
            // The agent must not resume its journal: a new numbering here
            // makes it rebase (a checksum resync of every disk).
            if fenced && held == stream_id {
                held = lifeboat_common::ids::new_stream_id();
            }
            let disks = match &old {
                Some(old) if held != stream_id => old.disks.clone(),
                Some(old) => {
                    check_disk_numbers(&m, &old.disks, &disks)?;
                    disks
                }
                None => disks,
            };
            let mut rec = MachineRecord {
                format: FORMAT_VERSION,
                machine: m.clone(),
                disks,
                stream_id: Some(lifeboat_common::hex(&held)),
                largest_sizes: Vec::new(),
            };
            rec.widen(old.as_ref());
            cache.put_machine(&rec)?;
            Ok((
                Opened {
                    durable: cache.durable(&m)?,
                    stream_id: held,
                },
                cache.uploaded(&m)?,
            ))
        })
        .await??;
        let (opened, uploaded) = opened;
        if let Some((what, seen)) = failed_over {
            // The new numbering is durable in the cache: the agent rebases
            // whether or not the record is still there.
            warn!(
                %machine,
                "{what}: its disks may since have been written by a failback, which its journal does not describe; the agent does not resume the journal but rebases (a checksum resync of every disk against the stored replica)"
            );
            // Only the record acted on: one a reprotect wrote meanwhile
            // stays for the next session.
            let name = catalogue::failed_over_object(machine);
            let removed = match self.store.get(&name).await {
                Ok(Some(now)) if now == seen => self.store.delete(&name).await,
                Ok(_) => Ok(()),
                Err(e) => Err(e),
            };
            if let Err(e) = removed {
                warn!(%machine, "removing {}: {e} (the next session rebases again)", self.store.describe(&name));
            }
        }
        self.monitor.opened(machine, opened.durable, uploaded);
        self.uploader(machine);
        Ok(opened)
    }

    async fn append(&self, machine: &str, entries: Vec<Entry>) -> Result<u64> {
        // Refused before anything is written: the agent keeps these entries
        // and resends them once the cache has room (health.rs).
        if let Some(why) = self.monitor.backpressure() {
            anyhow::bail!("process server under backpressure: {why}");
        }
        let cache = self.cache.clone();
        let m = machine.to_string();
        let (durable, entries) =
            tokio::task::spawn_blocking(move || cache.append(&m, &entries).map(|d| (d, entries)))
                .await??;
        self.monitor
            .appended(machine, &entries, durable, lifeboat_common::now_ms());
        let u = self.uploader(machine);
        u.tail
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(&entries);
        u.notify.notify_one();
        Ok(durable)
    }

    /// A full resync that succeeded stored every block's hash.
    async fn resync_done(
        &self,
        machine: &str,
        report: &lifeboat_common::protocol::ResyncReport,
        disks: &[DiskInfo],
    ) -> Result<()> {
        if report.error.is_empty() && report.disk_count as usize == disks.len() {
            let (cache, m) = (self.cache.clone(), machine.to_string());
            tokio::task::spawn_blocking(move || cache.set_hashes_unknown(&m, false)).await??;
        }
        Ok(())
    }

    async fn block_hashes(
        &self,
        machine: &str,
        disk: u16,
        first: u64,
        count: u64,
        scheme: lifeboat_common::resync::HashScheme,
    ) -> Result<Vec<lifeboat_common::resync::BlockHash>> {
        use lifeboat_common::resync::{HashScheme, UNKNOWN_HASH};
        if scheme != HashScheme::CURRENT {
            // The table holds this build's hashes only: an agent of an
            // older protocol gets every block resent (safe, not cheap).
            if first == 0 {
                warn!(
                    %machine,
                    disk,
                    "the agent's resync hashes are {scheme:?}, this process server keeps {:?}: every block of the disk is resent (upgrade the agent)",
                    HashScheme::CURRENT
                );
            }
            return Ok(vec![UNKNOWN_HASH; count as usize]);
        }
        let cache = self.cache.clone();
        let m = machine.to_string();
        tokio::task::spawn_blocking(move || cache.block_hashes(&m, disk, first, count)).await?
    }
}

/// Runs the process server until `shutdown` fires.
pub async fn run(cfg: PsConfig, shutdown: CancellationToken) -> Result<()> {
    tls::install_crypto_provider();
    let cfg = Arc::new(cfg);
    // With [registration], clients without a certificate may connect to
    // register, and every certificate is checked against the revocation
    // list of removed machines.
    let registrar = cfg
        .registration
        .as_ref()
        .map(|r| Arc::new(crate::registration::Registrar::new(r, &cfg.ca_cert)));
    let tls_cfg = match &registrar {
        Some(r) => tls::server_config_revocable(
            &cfg.ca_cert,
            &cfg.server_cert,
            &cfg.server_key,
            &r.crl_path(),
            true,
        )?,
        None => tls::server_config(&cfg.ca_cert, &cfg.server_cert, &cfg.server_key)?,
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls_cfg);
    let kek = crate::pki::load_kek(&cfg.kek_file)?;
    let store = Store::open(&cfg.store)?;
    let cache = Arc::new(Cache::open(&cfg.cache_dir)?);
    let ownership = Arc::new(Ownership::load(&cfg.cache_dir, cfg.listen)?);
    info!("process server id {}", ownership.me.id);
    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("listening on {}", cfg.listen))?;
    info!(
        "lifeboat-ps listening on {} (cache {}, store {})",
        listener.local_addr()?,
        cfg.cache_dir.display(),
        store.url()
    );
    // The status endpoint's token is read before anything runs, so a bad
    // [http] stops the server at start with the reason.
    let http_token = match &cfg.http {
        Some(h) => Some(crate::http::read_token(&h.token_file)?),
        None => None,
    };
    let monitor = Arc::new(Monitor::default());
    let upload_cancel = CancellationToken::new();
    let sink = Arc::new(PsSink {
        cfg: cfg.clone(),
        cache: cache.clone(),
        store,
        kek,
        ownership,
        monitor: monitor.clone(),
        limits: Arc::new(uploader::UploadLimits::new(&cfg.bandwidth)),
        uploaders: Mutex::new(HashMap::new()),
        tasks: tokio_util::task::TaskTracker::new(),
        cancel: upload_cancel.clone(),
    });
    // Resume uploading whatever a previous run left in the cache.
    for rec in cache.machines()? {
        if cache.durable(&rec.machine)? > cache.uploaded(&rec.machine)? {
            sink.uploader(&rec.machine);
        }
    }

    // A cache that failed a write (a full filesystem) goes on by itself.
    let recovery_task = {
        let (cache, c) = (cache.clone(), shutdown.clone());
        lifeboat_common::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(CACHE_RECOVERY_INTERVAL) => {}
                    _ = c.cancelled() => break,
                }
                let cache = cache.clone();
                let _ = tokio::task::spawn_blocking(move || cache.recover()).await;
            }
        })
    };

    let sessions = Arc::new(Sessions::default());
    let groups = Arc::new(crate::groups::Groups::new(
        cfg.group.clone(),
        sessions.clone(),
        sink.store.clone(),
        sink.kek.clone(),
    ));
    let group_task = lifeboat_common::spawn(groups.clone().run_schedule(shutdown.clone()));
    let alerts = Arc::new(crate::alerts::Alerts::default());
    let hub = Arc::new(crate::status::Hub {
        cache: cache.clone(),
        sessions: sessions.clone(),
        ownership: sink.ownership.clone(),
        groups: groups.clone(),
        monitor: monitor.clone(),
        alerts: alerts.clone(),
        alerts_cfg: cfg.alerts.clone(),
        health_cfg: cfg.health.clone(),
    });
    let webhook = match &cfg.alerts.webhook {
        Some(url) => Some(crate::alerts::Webhook::start(
            url.clone(),
            cfg.alerts.webhook_timeout,
            alerts.clone(),
            shutdown.clone(),
        )?),
        None => None,
    };
    let tick_task =
        lifeboat_common::spawn(crate::status::tick(hub.clone(), webhook, shutdown.clone()));
    let http_task = match (&cfg.http, http_token) {
        (Some(h), Some(token)) => Some(lifeboat_common::spawn(
            crate::http::bind(h.listen, token, hub.clone(), shutdown.clone()).await?,
        )),
        _ => None,
    };
    let control_task = {
        let path = crate::control::socket_path(&cfg.cache_dir);
        let (sessions, c) = (sessions.clone(), shutdown.clone());
        let groups = groups.clone();
        let hub = hub.clone();
        lifeboat_common::spawn(async move {
            let ctl = crate::control::Control {
                sessions,
                groups,
                hub,
            };
            if let Err(e) = crate::control::serve(path.clone(), ctl, c).await {
                warn!("control socket {}: {e:#}", path.display());
            }
        })
    };
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_source = Arc::new(PerSource::default());
    let conns = tokio_util::task::TaskTracker::new();
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p?,
            _ = shutdown.cancelled() => break,
        };
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let slot = match per_source.take(peer.ip(), cfg.max_connections_per_source) {
            Ok(s) => s,
            Err(open) => {
                warn!(
                    "refusing the connection from {peer}: {open} connections from {} are open already (max-connections-per-source = {})",
                    peer.ip(),
                    cfg.max_connections_per_source
                );
                drop(tcp);
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (handshake_timeout, hello_timeout, idle_timeout) =
            (cfg.handshake_timeout, cfg.hello_timeout, cfg.idle_timeout);
        let acceptor = acceptor.clone();
        let registrar = registrar.clone();
        let sink = sink.clone();
        let sessions = sessions.clone();
        let shutdown = shutdown.clone();
        // Every event of the connection carries the peer, and the machine
        // once its hello named it.
        let span = tracing::info_span!("session", %peer, machine = tracing::field::Empty);
        let _in_span = span.enter();
        conns.spawn_here(async move {
            let _permit = permit;
            let _slot = slot;
            let deadlines = Deadlines {
                handshake: handshake_timeout,
                hello: hello_timeout,
                idle: idle_timeout,
            };
            let Some(tls) = accept_tls(acceptor, tcp, peer, &deadlines).await else {
                return;
            };
            if tls.get_ref().1.peer_certificates().is_none() {
                crate::registration::serve(tls, peer, registrar, deadlines.hello).await;
                return;
            }
            serve_authenticated(tls, peer, deadlines, sink, &sessions, shutdown).await;
        });
        drop(_in_span);
    }
    info!("shutting down: closing sessions");
    let _ = control_task.await;
    let _ = tick_task.await;
    if let Some(t) = http_task {
        // Bounded: a client may hold a connection open.
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    let _ = group_task.await;
    let _ = recovery_task.await;
    conns.close();
    let _ = tokio::time::timeout(Duration::from_secs(10), conns.wait()).await;
    upload_cancel.cancel();
    sink.tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(10), sink.tasks.wait()).await;
    Ok(())
}

/// A disk's number (its position in the hello) belongs to its id: a hello
/// that gives a known number to another disk, or leaves out a known disk, is
/// refused by name (it would write one disk's data into another's history).
fn check_disk_numbers(machine: &str, known: &[DiskInfo], hello: &[DiskInfo]) -> Result<()> {
    for (i, k) in known.iter().enumerate() {
        match hello.get(i) {
            Some(h) if h.id == k.id => {}
            Some(h) => anyhow::bail!(
                "machine {machine}: the agent calls disk number {i} {:?}, but the replica's history has {:?} there; its disk table (disks.rec in its state directory) does not match this machine's history",
                h.id,
                k.id
            ),
            None => anyhow::bail!(
                "machine {machine}: the agent's hello lists {} disks, but the replica's history has {} (disk {:?} is missing); its disk table (disks.rec in its state directory) does not match this machine's history",
                hello.len(),
                known.len(),
                k.id
            ),
        }
    }
    Ok(())
}
