//! Materialising a recovery point: the machine's disks as sparse raw images,
//! read from the object store alone (the process server may be gone).
//!
//! Newest first: the images start as fresh all-zero files sized to each
//! disk's largest known size. Every segment after the newest base up to the
//! point's seq is fetched and decoded (up to `FETCH_CONCURRENCY` at once),
//! authenticated and decrypted, checked against its name, and taken newest
//! segment first, its entries with `base < seq ≤ point` newest entry first
//! (`lifeboat_common::image::Overlay`): of each write only the bytes no newer
//! write, zero/trim or resize covered are written; zeros are never written.
//! Overlapping segments (a re-upload) give each seq once, from the first
//! segment holding it, as an oldest-first pass would. Last, the base's chunks
//! that still have an uncovered part are fetched (each authenticated and
//! checked against its id) and only those parts written; a chunk later
//! writes cover whole is not needed for the point and not read. So every byte of an image is
//! written at most once, and the writes are disjoint: they go to the disk
//! engine (`lifeboat_common::diskio`: io_uring or the portable threads,
//! `--io-engine`; aligned writes `O_DIRECT`) many at once, in no order.
//! The result is exactly the source disk after the point's last write.
//! Each image is written as `.<disk>.raw.partial-<attempt>` and renamed to
//! `<disk>.raw` once complete and synced; a failed attempt removes its files.
//!
//! Memory: decoded segments are held while fetched ahead (`FETCH_CONCURRENCY`)
//! and while their writes are in flight (`SEGMENTS_WRITING`, at most
//! `WRITES_IN_FLIGHT` bytes), so at most `FETCH_CONCURRENCY + 2` segments of
//! up to `segment-max-bytes` of entries each (default 32 MiB: ~320 MiB); the
//! covered ranges per disk are merged as they grow (one per entry at most,
//! see `image`).
//!
//! `--time T` recovers the stream as it stood at T: up to the last segment
//! whose name says its entries were all durable by T. A missing segment (a gap
//! in the stream), a tampered object or a write outside a disk is an error
//! naming the object, and the images are then not to be used. The tag at the
//! point and the stream's consistency marks are checked before the base is
//! read.
//!
//! A disk resized while protected has a resize entry in the stream: bytes past
//! a shrunk end read as zeros (also after a later grow), and each image gets
//! the size its disk had at the point (set by the last resize entry ≤ the
//! point, else recorded in the point, else the base's, else machine.json's).
//!
//! Nothing from the catalogue is trusted unauthenticated: `machine.json`,
//! points and marks are checked with the machine's catalogue key, ids pass
//! the machine-id rule before they become file names under `--out`, and a
//! stream end after an `inconsistent` entry with no later tag is refused at
//! `latest` from the segments themselves, whether or not its mark exists.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use futures::StreamExt;
use lifeboat_common::base::{self, BaseManifest, ChunkNamer, CHUNK_SIZE};
use lifeboat_common::catalogue::{
    self, decode_segment, format_time_ms, list_points, segment_object, CatalogueKey,
    InconsistentRecord, PointRecord, Span,
};
use lifeboat_common::diskio::DiskFile;
pub use lifeboat_common::diskio::IoMode;
use lifeboat_common::image::Overlay;
use lifeboat_common::protocol::Entry;
use lifeboat_common::seal::{self, Key};
use lifeboat_common::store::Store;
use tokio::task::JoinSet;

pub const FETCH_CONCURRENCY: usize = 8;

/// Which point to recover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PointSpec {
    /// The end of the durable stream in the store.
    Latest,
    /// The newest app-consistent point.
    LatestApp,
    /// The newest crash-consistent point.
    LatestCrash,
    /// The newest point before the first one the encryption alarm marks
    /// suspect (`lifeboat_common::churn`).
    LastClean,
    /// A point id as listed by `points`.
    Id(String),
    /// The newest point at or before this time (ms since the epoch).
    Time(u64),
}

impl std::str::FromStr for PointSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "latest" => Ok(PointSpec::Latest),
            "latest-app" => Ok(PointSpec::LatestApp),
            "latest-crash" => Ok(PointSpec::LatestCrash),
            "last-clean" => Ok(PointSpec::LastClean),
            _ if s.bytes().all(|b| b.is_ascii_digit()) && !s.is_empty() => {
                Ok(PointSpec::Id(s.to_string()))
            }
            _ => chrono::DateTime::parse_from_rfc3339(s)
                .map(|t| PointSpec::Time(t.timestamp_millis().max(0) as u64))
                .map_err(|_| {
                    format!("{s:?} is not a point: use latest, latest-app, latest-crash, last-clean, a point id or an RFC 3339 time")
                }),
        }
    }
}

/// A resolved point: where in the stream it is and what it is.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub seq: u64,
    /// The tag at `seq`, if the point is a tag (not the stream's end).
    pub point: Option<PointRecord>,
    pub description: String,
}

/// What the store holds for a machine: its stream end and points.
pub struct Inventory {
    pub end: u64,
    /// The first seq of a stored segment beyond a gap, if the stream has one.
    pub after_gap: Option<u64>,
    /// The base the stream starts from (retention folded everything up to
    /// its seq into it); `None`: the stream starts at seq 1.
    pub base: Option<BaseManifest>,
    /// The segments after the base that make up the stream, each counted up
    /// to its fence.
    pub segments: Vec<Span>,
    /// Each stored segment's sealed size.
    pub segment_bytes: BTreeMap<catalogue::SegmentName, u64>,
    /// The recoverable points: at or after the base's seq.
    pub points: Vec<PointRecord>,
    /// Where syncs and resyncs began (see [`Inventory::unsettled_end`]).
    pub inconsistent: Vec<InconsistentRecord>,
    /// The machine's takeovers by another process server.
    pub fences: catalogue::Fences,
}

impl Inventory {
    /// What is missing after the stream's end up to `upto`, for an error
    /// message: the seqs no stored segment holds, and where they belong.
    pub fn missing(&self, upto: u64) -> String {
        match self.after_gap {
            Some(next) => format!(
                "no segment holds seqs {}..={} (the next stored segment starts at seq {next}); \
                 segments are log/<first>-<last>-<epoch>.seg under the machine's prefix",
                self.end + 1,
                next - 1
            ),
            None => format!(
                "no segment holds seqs {}..={upto} (the stored stream ends at seq {}); \
                 segments are log/<first>-<last>-<epoch>.seg under the machine's prefix",
                self.end + 1,
                self.end
            ),
        }
    }

    /// The seq the stream starts after (its base's; 0: no base).
    pub fn start(&self) -> u64 {
        self.base.as_ref().map_or(0, |b| b.seq)
    }

    /// If the stream's end is not crash-consistent (a sync or resync began
    /// after the last point at or before it), the record saying so.
    pub fn unsettled_end(&self) -> Option<&InconsistentRecord> {
        let last_point = self
            .points
            .iter()
            .filter(|p| p.seq <= self.end)
            .map(|p| p.seq)
            .max()
            .unwrap_or(0)
            .max(self.start());
        self.inconsistent
            .iter()
            .rev()
            .find(|m| m.seq > last_point && m.seq <= self.end)
    }
}

/// The machine's keys, opened with the key-encryption key.
pub struct MachineKeys {
    pub data: Key,
    pub catalogue: CatalogueKey,
}

pub async fn machine_keys(store: &Store, kek: &Key, machine: &str) -> Result<MachineKeys> {
    lifeboat_common::ids::validate_id("machine", machine).map_err(anyhow::Error::msg)?;
    let data = match catalogue::load_data_key(store, kek, machine).await {
        Err(catalogue::CatalogueError::Missing { object }) => anyhow::bail!(
            "machine {machine} has nothing in this store ({object} is missing): \
             it has never been replicated here, or the machine id or the store is wrong"
        ),
        r => r?,
    };
    Ok(MachineKeys {
        catalogue: CatalogueKey::derive(&data),
        data,
    })
}

/// What the store holds for `machine`; points and marks are authenticated with
/// `key` (`None`: a listing for display only, never for recovery).
pub async fn inventory(
    store: &Store,
    key: Option<&CatalogueKey>,
    machine: &str,
) -> Result<Inventory> {
    lifeboat_common::ids::validate_id("machine", machine).map_err(anyhow::Error::msg)?;
    // The order of the listings: segments, then points and marks, then
    // takeovers and bases. The uploader stores a segment's points and marks
    // before the segment, so whoever lists a segment lists them too; a fold
    // creates its base before it deletes the points and segments it
    // replaces, so a base listed after them is never older than a point
    // missing from their listing (points listed after the base showed a
    // just-folded point as gone while the old base was still the start: fault
    // seed 217027, "point 668 was acknowledged by the process server but is
    // not listed"). Takeovers fence what an old owner wrote late (see
    // catalogue.rs), by the fences read with the shape; the stream starts
    // from the newest base.
    let sized = catalogue::list_segments_sized(store, machine).await?;
    let unfenced = catalogue::Fences::default();
    let points = list_points(store, key, machine, &unfenced).await?;
    let inconsistent = catalogue::list_inconsistent(store, key, machine, &unfenced).await?;
    let view = base::stream_view_from(store, key, machine, sized).await?;
    let start = view.start();
    let fences = view.fences.clone();
    let points: Vec<_> = points
        .into_iter()
        .filter(|p| fences.counts(p.epoch, p.seq))
        .collect();
    let inconsistent: Vec<_> = inconsistent
        .into_iter()
        .filter(|m| fences.counts(m.epoch, m.seq))
        .collect();
    Ok(Inventory {
        end: view.prefix.end,
        after_gap: view.prefix.after_gap,
        base: view.base().cloned(),
        segments: view.prefix.spans,
        segment_bytes: view.segment_bytes,
        points: points.into_iter().filter(|p| p.seq >= start).collect(),
        inconsistent: inconsistent.into_iter().filter(|m| m.seq > start).collect(),
        fences,
    })
}

/// Resolves `spec`; `latest` at a stream end that is not crash-consistent is
/// refused unless `allow_inconsistent`.
pub fn resolve(
    inv: &Inventory,
    machine: &str,
    spec: &PointSpec,
    allow_inconsistent: bool,
) -> Result<Resolved> {
    let stored: Vec<&PointRecord> = inv.points.iter().filter(|p| p.seq <= inv.end).collect();
    let pick = |p: &PointRecord| Resolved {
        seq: p.seq,
        point: Some(p.clone()),
        description: format!(
            "point {} ({}{}, {}, seq {})",
            p.id,
            p.kind.as_str(),
            p.source
                .map(|s| format!(" by {}", s.as_str()))
                .unwrap_or_default(),
            p.time,
            p.seq
        ),
    };
    match spec {
        PointSpec::Latest => {
            if let Some(next) = inv.after_gap {
                bail!(
                    "the segment(s) holding seqs {}..={} of machine {machine} are missing from the store \
                     (the next stored segment starts at seq {next}); `latest` cannot be recovered. \
                     Restore the missing object, or recover a point at or before seq {}",
                    inv.end + 1,
                    next - 1,
                    inv.end
                );
            }
            if inv.end == 0 {
                bail!("the store holds no data for machine {machine} yet");
            }
            if let Some(m) = inv.unsettled_end() {
                let newest = stored
                    .last()
                    .map(|p| format!("point {} ({}, {})", p.id, p.kind.as_str(), p.time))
                    .unwrap_or_else(|| "none yet".into());
                if !allow_inconsistent {
                    bail!(
                        "the stream of machine {machine} ends (seq {}) inside the {} that began at seq {}: \
                         the disks there are not crash-consistent. Recover the newest point — {newest} — \
                         or pass --allow-inconsistent to write them anyway",
                        inv.end,
                        m.label,
                        m.seq
                    );
                }
            }
            Ok(Resolved {
                seq: inv.end,
                point: stored
                    .iter()
                    .find(|p| p.seq == inv.end)
                    .map(|p| (*p).clone()),
                description: format!("latest (end of the durable stream, seq {})", inv.end),
            })
        }
        PointSpec::LatestApp => stored
            .iter()
            .rev()
            .find(|p| p.kind == lifeboat_common::protocol::TagKind::App)
            .map(|p| pick(p))
            .ok_or_else(|| anyhow!("machine {machine} has no app-consistent point in the store")),
        PointSpec::LastClean => {
            let suspect = lifeboat_common::churn::suspects(
                &stored.iter().map(|p| p.churn).collect::<Vec<_>>(),
            );
            let first = suspect.iter().position(|s| *s);
            let clean = &stored[..first.unwrap_or(stored.len())];
            clean.last().map(|p| pick(p)).ok_or_else(|| match first {
                Some(_) => anyhow!(
                    "every stored point of machine {machine} is suspect (incompressible churn from the first one on)"
                ),
                None => anyhow!("machine {machine} has no point in the store yet"),
            })
        }
        PointSpec::LatestCrash => stored
            .iter()
            .rev()
            .find(|p| p.kind == lifeboat_common::protocol::TagKind::Crash)
            .map(|p| pick(p))
            .ok_or_else(|| anyhow!("machine {machine} has no crash-consistent point in the store")),
        PointSpec::Id(id) => {
            if let Some(p) = stored.iter().find(|p| &p.id == id) {
                return Ok(pick(p));
            }
            if let Some(b) = inv
                .base
                .as_ref()
                .filter(|b| id.parse::<u64>().is_ok_and(|n| n < b.seq))
            {
                bail!(
                    "point {id} of machine {machine} is older than the retention kept: the stream now starts \
                     from the base at seq {} ({}); `lifeboat-mt points` lists what can be recovered",
                    b.seq,
                    b.time
                );
            }
            if let Some(p) = inv.points.iter().find(|p| &p.id == id) {
                bail!(
                    "point {id} of machine {machine} is recorded, but the stream up to it is incomplete in the store: {}",
                    inv.missing(p.seq)
                );
            }
            bail!("machine {machine} has no point {id}; `lifeboat-mt points` lists them")
        }
        PointSpec::Time(t) => {
            let t = *t;
            if let Some(b) = inv.base.as_ref().filter(|b| t < b.time_ms) {
                bail!(
                    "{} is older than the retention kept for machine {machine}: the stream now starts \
                     from the base at seq {} ({})",
                    format_time_ms(t),
                    b.seq,
                    b.time
                );
            }
            // The stream as it stood at T: up to the last segment whose
            // entries were all durable by then (segment names say when).
            let mut at = None;
            for s in &inv.segments {
                if s.name.time_ms > t {
                    break;
                }
                if s.name.time_ms != 0 {
                    at = Some(s.upto);
                }
            }
            let newest_point = stored.iter().rev().find(|p| p.time_ms <= t);
            let seq = match (at, &inv.base) {
                (Some(seq), _) => seq,
                (None, Some(b)) => b.seq,
                (None, None) => 0,
            };
            let unsettled = inv
                .inconsistent
                .iter()
                .filter(|m| m.seq <= seq)
                .map(|m| m.seq)
                .max()
                .is_some_and(|m| {
                    !stored.iter().any(|p| p.seq >= m && p.seq <= seq) && inv.start() < m
                });
            match newest_point {
                // A point at exactly that prefix, or a better-known one when
                // the times do not reach T or the prefix is not consistent.
                Some(p) if p.seq == seq || (p.seq > seq && at.is_none()) || unsettled => {
                    Ok(pick(p))
                }
                _ if seq == 0 || unsettled => Err(anyhow!(
                    "machine {machine} has no point at or before {}",
                    format_time_ms(t)
                )),
                _ => Ok(Resolved {
                    seq,
                    point: stored.iter().find(|p| p.seq == seq).map(|p| (*p).clone()),
                    description: format!(
                        "the stream as it stood at {} (seq {seq})",
                        format_time_ms(t)
                    ),
                }),
            }
        }
    }
}

/// One written disk image.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DiskReport {
    pub id: String,
    pub path: PathBuf,
    pub size: u64,
    /// Bytes of segment writes put into the image (newest first: the parts a
    /// newer entry covers are not written, nor counted).
    pub bytes_written: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub machine: String,
    pub seq: u64,
    pub point: String,
    /// The base the images started from (its seq), if the stream has one.
    pub base: Option<u64>,
    /// The base's chunks fetched: those the segments did not cover whole.
    pub chunks_read: usize,
    pub segments_read: usize,
    pub bytes_fetched: u64,
    /// The write engine used (`io_uring` or `portable`, and whether aligned
    /// writes went `O_DIRECT`).
    pub io_engine: String,
    pub disks: Vec<DiskReport>,
}

/// Progress of a materialisation: objects (segments, then base chunks) done
/// of the total, bytes fetched and bytes written to the images so far.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
    pub bytes: u64,
    pub written: u64,
}

impl Progress {
    /// One more object done; whether to report it now (the last one is
    /// reported once every write completed).
    fn advance(&mut self, fetched: u64, written: u64) -> bool {
        self.bytes += fetched;
        self.written = written;
        self.done += 1;
        self.done < self.total
    }
}

/// Image bytes handed to the disk engines and not yet completed, at most.
pub const WRITES_IN_FLIGHT: u64 = 64 << 20;
/// Segments whose writes may be in flight at once: a piece keeps its whole
/// decoded segment in memory until it completes.
const SEGMENTS_WRITING: usize = 2;
/// Base chunks whose writes may be in flight at once.
const CHUNKS_WRITING: usize = 16;

/// Opens a fresh image for failover writes on `engine`; `Auto` is io_uring
/// where the kernel allows it, else the portable threads (logged). Aligned
/// writes go `O_DIRECT` where the file system takes it.
pub fn open_image(path: &Path, engine: IoMode) -> Result<DiskFile> {
    let open = |mode| {
        DiskFile::open_direct(path, mode)
            .with_context(|| format!("opening {} for writing ({mode} engine)", path.display()))
    };
    match engine {
        IoMode::Auto => open(IoMode::Uring).or_else(|e| {
            tracing::warn!(error = %format!("{e:#}"), "io_uring unavailable; writing images with portable pwrite threads");
            open(IoMode::Portable)
        }),
        mode => open(mode),
    }
}

/// Writes every disk of `machine` at `resolved` into `out_dir/<disk>.raw`
/// with the default engine ([`IoMode::Auto`]); see [`materialize_with`].
#[allow(clippy::too_many_arguments)]
pub async fn materialize(
    store: &Store,
    keys: &MachineKeys,
    machine: &str,
    inv: &Inventory,
    resolved: &Resolved,
    out_dir: &Path,
    allow_inconsistent: bool,
    progress: impl Fn(Progress) + Send + Sync,
) -> Result<Report> {
    materialize_with(
        store,
        keys,
        machine,
        inv,
        resolved,
        out_dir,
        allow_inconsistent,
        IoMode::Auto,
        progress,
    )
    .await
}

/// Writes every disk of `machine` at `resolved` into `out_dir/<disk>.raw`
/// (each created 0600) through `engine`. `inv` must have been read with
/// `keys.catalogue`. Where `resolved` is the stream's end (no point) and the
/// segments themselves show a sync or resync began after the last tag, it is
/// refused unless `allow_inconsistent` — whether or not its mark is in the store.
#[allow(clippy::too_many_arguments)]
pub async fn materialize_with(
    store: &Store,
    keys: &MachineKeys,
    machine: &str,
    inv: &Inventory,
    resolved: &Resolved,
    out_dir: &Path,
    allow_inconsistent: bool,
    engine: IoMode,
    progress: impl Fn(Progress) + Send + Sync,
) -> Result<Report> {
    let how = Layers {
        engine,
        with_base: true,
    };
    materialize_layers(
        store,
        keys,
        machine,
        inv,
        resolved,
        out_dir,
        allow_inconsistent,
        how,
        progress,
    )
    .await
    .map(|(report, _)| report)
}

/// What [`materialize_layers`] writes: with `with_base`, whole images
/// (`<disk>.raw`); without, only what the segments after the base put there
/// (`<disk>.layer`, the rest left as holes) — the local layer instant
/// recovery serves the point from, the base's chunks fetched on demand.
#[derive(Debug, Clone, Copy)]
pub struct Layers {
    pub engine: IoMode,
    pub with_base: bool,
}

/// [`materialize_with`], also returning the overlay of the segments taken
/// (what they cover on each disk); `how.with_base` false leaves the base out.
#[allow(clippy::too_many_arguments)]
pub async fn materialize_layers(
    store: &Store,
    keys: &MachineKeys,
    machine: &str,
    inv: &Inventory,
    resolved: &Resolved,
    out_dir: &Path,
    allow_inconsistent: bool,
    how: Layers,
    progress: impl Fn(Progress) + Send + Sync,
) -> Result<(Report, Overlay)> {
    let Layers { engine, with_base } = how;
    let ext = if with_base { "raw" } else { "layer" };
    let rec = catalogue::load_machine(store, &keys.catalogue, machine).await?;
    let key = Arc::new(keys.data.clone());
    if resolved.seq > inv.end {
        bail!(
            "seq {} is beyond the end of the stored stream ({}): a segment is missing",
            resolved.seq,
            inv.end
        );
    }
    let start = inv.start();
    if resolved.seq < start {
        bail!(
            "seq {} is older than the base the stream starts from (seq {start}): retention folded it",
            resolved.seq
        );
    }
    if !out_dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(out_dir)
            .with_context(|| format!("creating {}", out_dir.display()))?;
    }
    // Images are sized to the largest size the disk is known to have had (a
    // shrink may follow older writes), then cut to the size at the point.
    let size_at =
        |p: &PointRecord, i: usize, id: &str| p.disks.get(i).filter(|d| d.id == id).map(|d| d.size);
    let base_disk = |i: usize, id: &str| {
        inv.base
            .as_ref()
            .and_then(|b| b.disks.get(i))
            .filter(|d| d.id == id)
    };
    let mut images = Vec::new();
    let mut limits = Vec::new();
    // Each image is written under a name of its own attempt and renamed
    // into place only once complete and synced: a failed attempt leaves no
    // image that looks recovered, and writes of an attempt that failed (the
    // engine finishes ops already queued) can never land in a retry's image.
    let mut partial = PartialImages(Vec::new());
    let attempt = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    for (i, d) in rec.disks.iter().enumerate() {
        let final_path = out_dir.join(format!("{}.{ext}", d.id));
        let path = out_dir.join(format!(".{}.{ext}.partial-{attempt}", d.id));
        partial.0.push(path.clone());
        let limit = inv
            .points
            .iter()
            .filter_map(|p| size_at(p, i, &d.id))
            .chain(base_disk(i, &d.id).map(|b| b.largest.max(b.size)))
            .fold(rec.largest(i), u64::max);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        // The image holds the machine's plaintext data: owner only, also
        // when it replaces an existing file.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("making {} private (0600)", path.display()))?;
        file.set_len(limit)
            .with_context(|| format!("sizing {} to {limit} bytes", path.display()))?;
        // Fresh and all zeros: the overlay never writes zeros.
        let io = Arc::new(open_image(&path, engine)?);
        images.push(Image {
            file,
            io,
            path,
            final_path,
        });
        limits.push((i as u16, limit));
    }
    let io_engine = images.first().map_or_else(
        || engine.to_string(),
        |im| {
            format!(
                "{}{}",
                im.io.mode(),
                if im.io.direct_writes() {
                    ", O_DIRECT for aligned writes"
                } else {
                    ", buffered"
                }
            )
        },
    );

    let needed: Vec<Span> = inv
        .segments
        .iter()
        .copied()
        .filter(|s| s.name.first <= resolved.seq && s.upto > start)
        .collect();
    // Segments may overlap (a re-upload after a crash): each seq comes from
    // the first segment holding it, as an oldest-first pass would take it.
    // A segment fenced by a later takeover counts only up to the fence.
    let mut applied = start;
    let mut takes = Vec::new();
    for span in &needed {
        let upto = resolved.seq.min(span.upto);
        takes.push((*span, applied, upto));
        applied = applied.max(upto);
    }
    let mut chunk_jobs = Vec::new();
    if let Some(b) = inv.base.as_ref().filter(|_| with_base) {
        for (i, d) in rec.disks.iter().enumerate() {
            if let Some(bd) = base_disk(i, &d.id) {
                for (index, id) in &bd.chunks {
                    chunk_jobs.push((i, *index, id.clone()));
                }
            } else if b.disks.iter().any(|x| x.id == d.id) {
                bail!(
                    "{} lists disk {} at another position than machine.json; refusing to guess",
                    store.describe(&base::base_object(machine, b.seq)),
                    d.id
                );
            }
        }
    }
    let mut done = Progress {
        total: (chunk_jobs.len() + needed.len()) as u64,
        ..Progress::default()
    };

    // Newest first: segments fetched and decoded up to FETCH_CONCURRENCY at
    // once, taken in reverse seq order; only what no newer entry covered is
    // written, and the pieces are disjoint, so they are written in parallel.
    let mut overlay = Overlay::new(limits);
    let mut writes = Writes::new(SEGMENTS_WRITING);
    let mut fetches = futures::stream::iter(takes.into_iter().rev())
        .map(|(span, after, upto)| {
            let store = store.clone();
            let key = key.clone();
            let machine = machine.to_string();
            let s = span.name;
            async move {
                let name = segment_object(&machine, &s);
                let sealed = store
                    .get(&name)
                    .await?
                    .ok_or_else(|| anyhow!("{} is missing", store.describe(&name)))?;
                let fetched = sealed.len() as u64;
                let described = store.describe(&name);
                let entries = tokio::task::spawn_blocking(move || -> Result<Vec<Entry>> {
                    let plain = seal::open(&key, &name, 0, &sealed).map_err(|e| {
                        anyhow!("{described}: {e}; refusing to use this recovery point")
                    })?;
                    decode_segment(&plain, &machine, s).map_err(|e| anyhow!("{described}: {e}"))
                })
                .await??;
                Ok::<_, anyhow::Error>((span, after, upto, fetched, entries))
            }
        })
        .buffered(FETCH_CONCURRENCY);
    while let Some(item) = fetches.next().await {
        let (span, after, upto, fetched, entries) = item?;
        let mut pieces = Vec::new();
        overlay
            .take(&entries, after, upto, resolved.seq, &mut |p| pieces.push(p))
            .with_context(|| {
                format!(
                    "applying {}",
                    store.describe(&segment_object(machine, &span.name))
                )
            })?;
        drop(entries);
        grow_images(&images, &overlay)?;
        writes.batch().await?;
        for p in pieces {
            let im = &images[p.disk as usize];
            writes.put(&im.io, &im.path, p.offset, p.data).await?;
        }
        if done.advance(fetched, writes.written) {
            progress(done);
        }
    }
    drop(fetches);
    overlay.finish()?;
    // The base sits at a point: its tag was folded into it.
    let saw_point_tag =
        overlay.saw_point_tag || resolved.point.is_none() || (start > 0 && resolved.seq == start);
    if !saw_point_tag {
        bail!(
            "the stream holds no tag at seq {} although point {} says so; the catalogue does not match the data",
            resolved.seq,
            resolved.point.as_ref().map(|p| p.id.as_str()).unwrap_or("?")
        );
    }
    // What the authenticated stream itself says about consistency up to the
    // point: the last tag and the last sync/resync start taken.
    let mut marks = overlay.marks.clone();
    marks.last_tag = marks.last_tag.max(start);
    if let (None, Some((seq, label))) = (&resolved.point, marks.unsettled()) {
        if !allow_inconsistent {
            let recorded = inv.inconsistent.iter().any(|m| m.seq == seq);
            bail!(
                "the stream of machine {machine} ends (seq {}) inside the {label} that began at seq {seq} \
                 (an entry of segment data{}): the disks there are not crash-consistent. The images in {} \
                 are not to be used. Recover the newest point, or pass --allow-inconsistent to write them anyway",
                resolved.seq,
                if recorded {
                    String::new()
                } else {
                    format!(
                        "; its mark {} is missing from the store",
                        store.describe(&catalogue::inconsistent_object(machine, seq))
                    )
                },
                out_dir.display()
            );
        }
    }

    // Last, the base: only chunks with a part no entry covered are fetched
    // (one that later writes cover whole is not needed for the point), and only those parts written.
    let mut fetch_jobs = Vec::new();
    for (i, index, id) in chunk_jobs {
        let at = index * CHUNK_SIZE;
        let gaps = overlay.uncovered(i as u16, at, at + CHUNK_SIZE);
        if gaps.is_empty() {
            done.done += 1;
        } else {
            fetch_jobs.push((i, index, id, gaps));
        }
    }
    let chunks_read = fetch_jobs.len();
    let namer = Arc::new(ChunkNamer::derive(&keys.data));
    let mut writes = writes.with_window(CHUNKS_WRITING).await?;
    let mut fetches = futures::stream::iter(fetch_jobs)
        .map(|(i, index, id, gaps)| {
            let (store, key, namer) = (store.clone(), key.clone(), namer.clone());
            let machine = machine.to_string();
            async move {
                let (plain, fetched) = base::fetch_chunk(&store, key, namer, &machine, &id)
                    .await
                    .map_err(|e| {
                    anyhow!("{e} (a chunk of the base); refusing to use this recovery point")
                })?;
                Ok::<_, anyhow::Error>((i, index, gaps, bytes::Bytes::from(plain), fetched))
            }
        })
        .buffer_unordered(FETCH_CONCURRENCY);
    while let Some(item) = fetches.next().await {
        let (i, index, gaps, plain, fetched) = item?;
        let at = index * CHUNK_SIZE;
        let end = at + plain.len() as u64;
        writes.batch().await?;
        for (a, b) in gaps {
            let b = b.min(end);
            if a < b {
                let data = plain.slice((a - at) as usize..(b - at) as usize);
                writes.put(&images[i].io, &images[i].path, a, data).await?;
            }
        }
        if done.advance(fetched, writes.written) {
            progress(done);
        }
    }
    drop(fetches);
    writes.drain().await?;
    done.written = writes.written;
    progress(done);

    let mut disks = Vec::new();
    for (i, (im, d)) in images.into_iter().zip(rec.disks.iter()).enumerate() {
        // The authenticated stream wins: the last resize entry ≤ the point,
        // then the (authenticated) point, then the base, then machine.json.
        let size = overlay
            .disk(i as u16)
            .and_then(|o| o.resized_to)
            .or_else(|| resolved.point.as_ref().and_then(|p| size_at(p, i, &d.id)))
            .or_else(|| base_disk(i, &d.id).map(|b| b.size))
            .unwrap_or(d.size);
        drop(im.io);
        im.file
            .set_len(size)
            .and_then(|()| im.file.sync_all())
            .with_context(|| format!("sizing and syncing {}", im.path.display()))?;
        disks.push(DiskReport {
            id: d.id.clone(),
            path: im.final_path,
            size,
            bytes_written: overlay.disk(i as u16).map_or(0, |o| o.written),
        });
    }
    // Complete: every image into its place, then the directory synced.
    for (tmp, d) in partial.0.iter().zip(&disks) {
        std::fs::rename(tmp, &d.path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), d.path.display()))?;
    }
    partial.0.clear();
    File::open(out_dir)
        .and_then(|dir| dir.sync_all())
        .with_context(|| format!("syncing {}", out_dir.display()))?;
    Ok((
        Report {
            machine: machine.to_string(),
            seq: resolved.seq,
            point: resolved.description.clone(),
            base: inv.base.as_ref().map(|b| b.seq),
            chunks_read,
            segments_read: needed.len(),
            bytes_fetched: done.bytes,
            io_engine,
            disks,
        },
        overlay,
    ))
}

/// A disk image being written: its file (sized and synced at the end) and
/// the engine writing it; `path` is the attempt's own name, `final_path`
/// where it goes once complete.
struct Image {
    file: File,
    io: Arc<DiskFile>,
    path: PathBuf,
    final_path: PathBuf,
}

/// The images of an attempt not yet renamed into place: removed when the
/// attempt fails (ops still queued finish on the unlinked files).
struct PartialImages(Vec<PathBuf>);

impl Drop for PartialImages {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Makes each image reach as far as the overlay's pieces do (a grow past the
/// largest size known beforehand).
fn grow_images(images: &[Image], overlay: &Overlay) -> Result<()> {
    for (i, im) in images.iter().enumerate() {
        if let Some(o) = overlay.disk(i as u16).filter(|o| o.extent > im.io.size()) {
            im.io
                .set_len(o.extent)
                .with_context(|| format!("growing {} to {} bytes", im.path.display(), o.extent))?;
        }
    }
    Ok(())
}

/// Image writes in flight, in batches (a segment's or a chunk's pieces): at
/// most `window` batches and [`WRITES_IN_FLIGHT`] bytes at once. The pieces
/// of an overlay are disjoint, so their order does not matter.
struct Writes {
    batches: VecDeque<JoinSet<Result<u64>>>,
    window: usize,
    bytes: u64,
    /// Bytes whose writes completed.
    written: u64,
}

impl Writes {
    fn new(window: usize) -> Writes {
        Writes {
            batches: VecDeque::new(),
            window,
            bytes: 0,
            written: 0,
        }
    }

    /// The same writes, now at most `window` batches at once.
    async fn with_window(mut self, window: usize) -> Result<Writes> {
        self.window = window;
        self.batch().await?;
        Ok(self)
    }

    /// Starts a new batch, once the oldest ones beyond the window completed.
    async fn batch(&mut self) -> Result<()> {
        while self.batches.len() >= self.window.max(1) {
            self.reap_front(true).await?;
        }
        self.batches.push_back(JoinSet::new());
        Ok(())
    }

    /// Queues a write into the newest batch.
    async fn put(
        &mut self,
        io: &Arc<DiskFile>,
        path: &Path,
        offset: u64,
        data: Bytes,
    ) -> Result<()> {
        while self.bytes >= WRITES_IN_FLIGHT && !self.batches.is_empty() {
            self.reap_front(false).await?;
        }
        if self.batches.is_empty() {
            self.batches.push_back(JoinSet::new());
        }
        let len = data.len() as u64;
        let (io, path) = (io.clone(), path.to_path_buf());
        self.bytes += len;
        let batch = self.batches.back_mut().expect("a batch exists");
        batch.spawn(async move {
            io.write_at(offset, data).await.with_context(|| {
                format!("writing {len} bytes at {offset} to {}", path.display())
            })?;
            Ok(len)
        });
        Ok(())
    }

    /// Waits for one write of the oldest batch (all of them: `whole`).
    async fn reap_front(&mut self, whole: bool) -> Result<()> {
        let Some(front) = self.batches.front_mut() else {
            return Ok(());
        };
        loop {
            match front.join_next().await {
                Some(r) => {
                    let n = r.map_err(|e| anyhow!("an image write panicked: {e}"))??;
                    self.bytes -= n;
                    self.written += n;
                    if !whole {
                        return Ok(());
                    }
                }
                None => {
                    self.batches.pop_front();
                    return Ok(());
                }
            }
        }
    }

    /// Waits for every write.
    async fn drain(&mut self) -> Result<()> {
        while !self.batches.is_empty() {
            self.reap_front(true).await?;
        }
        Ok(())
    }
}
