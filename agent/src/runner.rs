//! `lifeboat-agent run`: opens the journal and the disks, serves each disk as an
//! NBD export, ships the stream, takes a crash-consistent tag every
//! `tag-interval`, and answers the control socket, until shutdown.

use lifeboat_common::SpawnHere;
use std::sync::Arc;

use anyhow::{Context, Result};
use lifeboat_common::protocol::TagKind;
use lifeboat_common::supervise::supervise;
use lifeboat_common::tls;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::capture::nbd::{self, Exports};
use crate::config::AgentConfig;
use crate::control::{self, Control};
use crate::disk::ProtectedDisk;
use crate::diskio::{DiskFile, IoMode};
use crate::journal::Journal;
use crate::sender::{self, Link, SenderConfig};
use crate::stream::Stream;

/// How long shutdown waits for a group point's thaw and post-thaw scripts.
const THAW_AT_SHUTDOWN: std::time::Duration = std::time::Duration::from_secs(30);

pub async fn run(cfg: AgentConfig, shutdown: CancellationToken) -> Result<()> {
    tls::install_crypto_provider();
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating {}", cfg.state_dir.display()))?;
    let _lock = crate::fsutil::DirLock::acquire(&cfg.state_dir).with_context(|| {
        format!(
            "locking the state directory {} (is another lifeboat-agent running with it?)",
            cfg.state_dir.display()
        )
    })?;
    let tls_cfg = tls::client_config(&cfg.ca_cert, &cfg.client_cert, &cfg.client_key)?;
    let (journal, replay) = Journal::open(&cfg.journal_dir())?;
    if !replay.is_empty() {
        info!(
            "journal holds seqs {}..={} from the previous run",
            replay[0].seq,
            replay[replay.len() - 1].seq
        );
    }
    let stream = Stream::with_memory(
        journal,
        replay,
        cfg.journal_max_bytes,
        cfg.queue_memory_bytes,
    );
    let stream_id = Arc::new(crate::rebase::StreamIdFile::open(&cfg.state_dir)?);
    // A clean stop leaves this marker: the journal then holds every unacknowledged
    // write and nothing needs resending. Without it, the activity log decides.
    let clean_marker = cfg.state_dir.join("clean-shutdown");
    let clean = clean_marker.exists();
    let _ = std::fs::remove_file(&clean_marker);

    let mut files = Vec::new();
    for d in &cfg.disks {
        let mode: IoMode = d.io_mode.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
        let file = DiskFile::open(&d.path, mode)
            .with_context(|| format!("opening disk {} ({})", d.id, d.path.display()))?;
        files.push(file);
    }
    // Disks are numbered by id, not by their place in the config.
    let configured: Vec<(String, u64)> = cfg
        .disks
        .iter()
        .zip(&files)
        .map(|(d, f)| (d.id.clone(), f.size()))
        .collect();
    let table = crate::disks::DiskTable::open(&cfg.state_dir, &configured)?;
    let infos = table.hello();
    let mut disks = Vec::new();
    let mut held_regions = Vec::new();
    for (d, file) in cfg.disks.iter().zip(files) {
        info!(
            "disk {}: {} ({} bytes, {} I/O{})",
            d.id,
            d.path.display(),
            file.size(),
            file.mode(),
            if file.uring_bulk_reads() {
                ", io_uring for sync and resync reads"
            } else {
                ""
            }
        );
        let (dirty, held) = crate::dirty::DirtyMap::open(&cfg.state_dir, &d.id, file.size())?;
        held_regions.push(held);
        disks.push(Arc::new(ProtectedDisk::new(
            d.id.clone(),
            table.number(&d.id),
            file,
            stream.clone(),
            dirty,
        )));
    }

    stream.set_point_sums(crate::pointsum::PointSums::new(&disks, &stream));
    let checksum = crate::checksum::Checksum::open(&cfg.state_dir, &disks, &stream)?;
    let progress =
        crate::sync::prepare(&cfg.state_dir, &disks, &stream, &checksum, cfg.initial_copy).await?;
    // After an unclean stop, what the activity log held is resent, unless a
    // checksum resync compares the whole disk anyway.
    let plan = checksum.pending();
    for (d, held) in disks.iter().zip(held_regions) {
        let whole = plan.as_ref().is_some_and(|p| {
            p.disks
                .iter()
                .any(|pd| pd.id == d.id && pd.next_region == 0)
        });
        if clean || held.is_empty() || whole {
            continue;
        }
        warn!(
            "disk {}: the agent did not stop cleanly; {} regions ({} MiB) written recently will be resent",
            d.id,
            held.len(),
            (held.len() as u64 * crate::dirty::REGION) >> 20
        );
        d.dirty.mark_regions_dirty(&held);
    }
    // Before the exports serve a write: the regions resent after an unclean
    // stop make the stream inconsistent until the resync's point.
    if disks.iter().any(|d| d.dirty.dirty_count() > 0) {
        stream.enter_resync("the agent did not stop cleanly: resending the regions it was writing");
    }
    // The agent's own files: their filesystems are never frozen.
    let keep_writable = std::iter::once(cfg.state_dir.clone())
        .chain(cfg.disks.iter().map(|d| d.path.clone()))
        .collect();
    let app = Arc::new(crate::apppoint::AppPoints::new(
        cfg.app.clone(),
        stream.clone(),
        keep_writable,
    ));
    let groups = Arc::new(crate::grouppoint::GroupHold::new(app.clone()));
    // Before any export serves: after a planned failover writes stay refused.
    let finals = Arc::new(crate::finalpoint::FinalPoints::open(
        &cfg.state_dir,
        stream.clone(),
        app.clone(),
    )?);
    let cancel = shutdown.child_token();
    let link = Arc::new(Link::default());
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn_here(sender::run(
        SenderConfig {
            machine: cfg.machine.clone(),
            server: cfg.server.clone(),
            server_name: cfg.server_name.clone(),
            tls: tls_cfg,
            disks: infos.clone(),
            protected: disks.clone(),
            checksum: checksum.clone(),
            stream_id,
            groups: groups.clone(),
            finals: finals.clone(),
            bandwidth: Arc::new(lifeboat_common::bandwidth::Limiter::new(
                cfg.bandwidth.clone(),
            )),
        },
        stream.clone(),
        link.clone(),
        cancel.clone(),
    ));

    for (d, disk) in cfg.disks.iter().zip(&disks) {
        let exports = Arc::new(Exports::single(d.id.clone(), disk.clone()));
        let path = d.socket.clone();
        let c = cancel.clone();
        let ex = exports.clone();
        tasks.spawn_here(async move {
            if let Err(e) = nbd::serve_unix(&path, ex, c.clone()).await {
                error!("NBD export on {}: {e}", path.display());
                c.cancel();
            }
        });
        info!(
            "disk {} exported on nbd+unix:///{}?socket={}",
            d.id,
            d.id,
            d.socket.display()
        );
        if let Some(addr) = d.tcp {
            if !addr.ip().is_loopback() {
                warn!(
                    "disk {}: the NBD export listens on {addr} beyond this host (allow-remote = true): anyone who reaches it can read and write the disk",
                    d.id
                );
            }
            let c = cancel.clone();
            tasks.spawn_here(async move {
                if let Err(e) = nbd::serve_tcp(addr, exports, c.clone()).await {
                    error!("NBD export on {addr}: {e}");
                    c.cancel();
                }
            });
        }
    }

    {
        let (dir, disks, progress, s, c) = (
            cfg.state_dir.clone(),
            disks.clone(),
            progress.clone(),
            stream.clone(),
            cancel.clone(),
        );
        let limit = cfg.sync_rate_limit;
        // Supervised: a read error ends one run, not the sync; the next run
        // continues each disk from its progress.
        tasks.spawn_here(supervise("initial sync", c.clone(), move || {
            crate::sync::run(
                dir.clone(),
                disks.clone(),
                progress.clone(),
                s.clone(),
                limit,
                c.clone(),
            )
        }));
    }

    tasks.spawn_here(app.clone().schedule(cancel.clone()));
    let control = Arc::new(Control {
        machine: cfg.machine.clone(),
        disks: infos,
        stream: stream.clone(),
        link,
        sync: progress,
        dirty: disks.clone(),
        checksum,
        app,
        finals,
    });

    {
        let (disks, s, c) = (disks.clone(), stream.clone(), cancel.clone());
        // Supervised: a resync loop that failed or panicked starts again (a
        // region it held is dirty again), or the stream would stay in resync.
        tasks.spawn_here(supervise("resync of dirty regions", c.clone(), move || {
            crate::sync::run_resync(disks.clone(), s.clone(), c.clone())
        }));
    }
    {
        // Retire acknowledged regions from the activity logs.
        let (disks, s, c) = (disks.clone(), stream.clone(), cancel.clone());
        tasks.spawn_here(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                    _ = c.cancelled() => break,
                }
                let acked = s.positions().acked;
                for d in &disks {
                    if !d.dirty.retirable(acked) {
                        continue;
                    }
                    // The source disk first: writes still in its page cache
                    // would be lost by a power loss the log then forgot.
                    if let Err(e) = d.sync_disk().await {
                        warn!(disk = %d.id, "syncing the disk before retiring activity-log regions: {e}");
                        continue;
                    }
                    if let Err(e) = d.dirty.retire(acked).await {
                        warn!(disk = %d.id, "writing the activity log: {e}");
                    }
                }
            }
        });
    }
    let sock = cfg.control_socket();
    let c = cancel.clone();
    tasks.spawn_here(async move {
        if let Err(e) = control::serve(&sock, control, c.clone()).await {
            error!("control socket {}: {e:#}", sock.display());
            c.cancel();
        }
    });

    let interval = cfg.tag_interval;
    let s = stream.clone();
    let c = cancel.clone();
    tasks.spawn_here(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if s.writes_refused().is_some() {
                        // Nothing is written after a final point.
                        continue;
                    }
                    if let Some(why) = s.why_inconsistent() {
                        info!("no recovery point this interval: {why}");
                        continue;
                    }
                    match s.tag(TagKind::Crash, None, "").await {
                        Some(seq) => info!(seq, "crash-consistent tag placed"),
                        None => info!(
                            "no recovery point this interval: {}",
                            s.why_inconsistent().unwrap_or_else(|| "the state changed while writes drained".into())
                        ),
                    }
                }
                _ = c.cancelled() => break,
            }
        }
    });
    info!("lifeboat-agent running for machine {}", cfg.machine);

    cancel.cancelled().await;
    info!("shutting down");
    while tasks.join_next().await.is_some() {}
    // The session's end released any group hold and began a thaw.
    groups.release(None, "the agent is shutting down");
    groups.wait_thawed(THAW_AT_SHUTDOWN).await;
    let mut synced = stream.sync_journal().await;
    // The disks too: the marker says nothing needs resending, which holds
    // only if the source keeps every write the journal holds.
    for d in &disks {
        if let Err(e) = d.sync_disk().await {
            warn!(disk = %d.id, "syncing the disk at shutdown: {e}");
            synced = Err(e);
        }
    }
    stream.close();
    // Clean only if the journal holds everything: not while dirty regions wait
    // for a resync (they are in the activity log and are resent at the next start).
    let nothing_dirty = stream.mode().0 == crate::stream::Mode::Streaming
        && disks.iter().all(|d| d.dirty.dirty_count() == 0);
    if synced.is_ok() && nothing_dirty {
        std::fs::File::create(&clean_marker)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("writing {}", clean_marker.display()))?;
    }
    Ok(())
}
