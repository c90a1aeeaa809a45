//! Materialising a recovery point: the machine's disks as sparse raw images,
//! read from the object store alone (the process server may be gone).
//!
//! The newest base's chunks are written first (each authenticated and checked
//! against its id), then every segment after the base up to the point's seq is
//! fetched (up to `FETCH_CONCURRENCY` at once), authenticated and decrypted,
//! checked against its name, and its entries with `base < seq ≤ point` are
//! applied in seq order — so the image is exactly the source disk after the
//! point's last write. `--time T` recovers the stream as it stood at T: up to
//! the last segment whose name says its entries were all durable by T. A missing
//! segment (a gap in the stream), a tampered object or a write outside a disk is
//! an error naming the object, and the images are then not to be used.
//!
//! A disk resized while protected has a resize entry in the stream: bytes past
//! a shrunk end are zeroed, and each image gets the size its disk had at the
//! point (set by the last resize entry applied, else recorded in the point).
//!
//! Nothing from the catalogue is trusted unauthenticated: `machine.json`,
//! points and marks are checked with the machine's catalogue key, ids pass
//! the machine-id rule before they become file names under `--out`, and a
//! stream end after an `inconsistent` entry with no later tag is refused at
//! `latest` from the segments themselves, whether or not its mark exists.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use futures::StreamExt;
use lifeboat_common::base::{self, BaseManifest, ChunkNamer, CHUNK_SIZE};
use lifeboat_common::catalogue::{
    self, decode_segment, format_time_ms, list_points, segment_object, CatalogueKey,
    InconsistentRecord, PointRecord, Span,
};
use lifeboat_common::image::{apply, StreamMarks, Target};
use lifeboat_common::protocol::Entry;
use lifeboat_common::seal::{self, Key};
use lifeboat_common::store::Store;

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
    let data = catalogue::load_data_key(store, kek, machine).await?;
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
    // Takeovers fence what an old owner wrote late (see catalogue.rs); the
    // stream starts from the newest base.
    let view = base::stream_view(store, key, machine).await?;
    let start = view.start();
    let fences = view.fences.clone();
    let points = list_points(store, key, machine, &fences).await?;
    let inconsistent = catalogue::list_inconsistent(store, key, machine, &fences).await?;
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
    pub bytes_written: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub machine: String,
    pub seq: u64,
    pub point: String,
    /// The base the images started from (its seq), if the stream has one.
    pub base: Option<u64>,
    pub chunks_read: usize,
    pub segments_read: usize,
    pub bytes_fetched: u64,
    pub disks: Vec<DiskReport>,
}

/// Progress of a materialisation: objects (chunks, then segments) done of
/// the total, and bytes fetched so far.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
    pub bytes: u64,
}

/// Writes every disk of `machine` at `resolved` into `out_dir/<disk>.raw`
/// (each created 0600). `inv` must have been read with `keys.catalogue`.
/// Where `resolved` is the stream's end (no point) and the segments
/// themselves show a sync or resync began after the last tag, it is refused
/// unless `allow_inconsistent` — whether or not its mark is in the store.
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
    let mut targets = BTreeMap::new();
    let mut paths = Vec::new();
    for (i, d) in rec.disks.iter().enumerate() {
        let path = out_dir.join(format!("{}.raw", d.id));
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
        targets.insert(i as u16, Target::new(file, limit, false));
        paths.push(path);
    }

    let needed: Vec<Span> = inv
        .segments
        .iter()
        .copied()
        .filter(|s| s.name.first <= resolved.seq && s.upto > start)
        .collect();
    // The base's chunks first (any order: they do not overlap), then the
    // segments after it in seq order.
    let mut chunk_jobs = Vec::new();
    if let Some(b) = &inv.base {
        for (i, d) in rec.disks.iter().enumerate() {
            if let Some(bd) = base_disk(i, &d.id) {
                let file = Arc::new(ChunkOut::open(&targets[&(i as u16)].file, &paths[i])?);
                for (index, id) in &bd.chunks {
                    chunk_jobs.push((file.clone(), *index, id.clone(), paths[i].clone()));
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
    let total = (chunk_jobs.len() + needed.len()) as u64;
    let mut done = Progress {
        total,
        ..Progress::default()
    };
    let chunks_read = chunk_jobs.len();
    let namer = Arc::new(ChunkNamer::derive(&keys.data));
    // Chunks are fetched and opened in parallel, and written one at a time:
    // parallel writes to one file only contend for its inode lock
    // (measured: a third of the CPU spinning in ext4's write path).
    let mut fetches = futures::stream::iter(chunk_jobs)
        .map(|(file, index, id, path)| {
            let (store, key, namer) = (store.clone(), key.clone(), namer.clone());
            let machine = machine.to_string();
            async move {
                let name = base::chunk_object(&machine, &id);
                let sealed = store.get(&name).await?.ok_or_else(|| {
                    anyhow!(
                        "{} is missing (a chunk of the base); refusing to use this recovery point",
                        store.describe(&name)
                    )
                })?;
                let fetched = sealed.len() as u64;
                let plain = tokio::task::spawn_blocking(move || {
                    base::open_chunk(&key, &namer, &store, &machine, &id, &sealed)
                        .map_err(|e| anyhow!("{e}; refusing to use this recovery point"))
                })
                .await??;
                Ok::<_, anyhow::Error>((file, index, path, plain, fetched))
            }
        })
        .buffer_unordered(FETCH_CONCURRENCY);
    while let Some(item) = fetches.next().await {
        let (file, index, path, plain, fetched) = item?;
        tokio::task::block_in_place(|| file.write(&plain, index * CHUNK_SIZE))
            .with_context(|| format!("writing {}", path.display()))?;
        done.bytes += fetched;
        done.done += 1;
        progress(done);
    }
    drop(fetches);
    let targets = Arc::new(std::sync::Mutex::new(targets));

    let mut fetches = futures::stream::iter(needed.clone())
        .map(|span: Span| {
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
                Ok::<_, anyhow::Error>((span, fetched, entries))
            }
        })
        .buffered(FETCH_CONCURRENCY);

    // Segments may overlap (a re-upload after a crash): apply each seq once.
    let mut applied = start;
    // The base sits at a point: its tag was folded into it.
    let mut saw_point_tag = resolved.point.is_none() || (start > 0 && resolved.seq == start);
    // What the authenticated stream itself says about consistency up to the
    // point: the last tag and the last sync/resync start applied.
    let mut marks = StreamMarks {
        last_tag: start,
        ..StreamMarks::default()
    };
    while let Some(item) = fetches.next().await {
        let (span, fetched, entries) = item?;
        let targets = targets.clone();
        // A segment fenced by a later takeover counts only up to the fence.
        let upto = resolved.seq.min(span.upto);
        let point = resolved.seq;
        let seg_name = store.describe(&segment_object(machine, &span.name));
        let from = applied;
        let (found_tag, seen) = tokio::task::spawn_blocking(move || -> Result<_> {
            let mut t = targets.lock().unwrap_or_else(|p| p.into_inner());
            apply(&mut t, &entries, from, upto, point)
                .with_context(|| format!("applying {seg_name}"))
        })
        .await??;
        applied = applied.max(upto);
        saw_point_tag |= found_tag;
        marks.merge(seen);
        done.bytes += fetched;
        done.done += 1;
        progress(done);
    }
    if !saw_point_tag {
        bail!(
            "the stream holds no tag at seq {} although point {} says so; the catalogue does not match the data",
            resolved.seq,
            resolved.point.as_ref().map(|p| p.id.as_str()).unwrap_or("?")
        );
    }
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
    let mut disks = Vec::new();
    let t = Arc::try_unwrap(targets)
        .map_err(|_| anyhow!("internal: targets still shared"))?
        .into_inner()
        .unwrap_or_else(|p| p.into_inner());
    for (i, ((_, target), (d, path))) in t.into_iter().zip(rec.disks.iter().zip(paths)).enumerate()
    {
        // The authenticated stream wins: the last resize entry applied, then
        // the (authenticated) point, then the base, then machine.json.
        let size = target
            .resized_to
            .or_else(|| resolved.point.as_ref().and_then(|p| size_at(p, i, &d.id)))
            .or_else(|| base_disk(i, &d.id).map(|b| b.size))
            .unwrap_or(d.size);
        target
            .file
            .set_len(size)
            .and_then(|()| target.file.sync_all())
            .with_context(|| format!("sizing and syncing {}", path.display()))?;
        disks.push(DiskReport {
            id: d.id.clone(),
            path,
            size,
            bytes_written: target.written,
        });
    }
    Ok(Report {
        machine: machine.to_string(),
        seq: resolved.seq,
        point: resolved.description.clone(),
        base: inv.base.as_ref().map(|b| b.seq),
        chunks_read,
        segments_read: needed.len(),
        bytes_fetched: done.bytes,
        disks,
    })
}

/// Where a disk's base chunks are written: whole, aligned chunks with
/// O_DIRECT where the filesystem takes it (the page-cache copy of buffered
/// writes was 69 % of a failover's CPU profile, and fresh page-cache pages
/// are slow to first touch in a VM), the rest through the image's buffered
/// descriptor. The segments applied afterwards go through the buffered one;
/// a direct write drops the cached pages it covers first, so both agree.
struct ChunkOut {
    buffered: File,
    direct: Option<File>,
}

impl ChunkOut {
    const ALIGN: usize = 4096;

    fn open(image: &File, path: &Path) -> Result<ChunkOut> {
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        Ok(ChunkOut {
            buffered: image
                .try_clone()
                .with_context(|| format!("opening {}", path.display()))?,
            direct,
        })
    }

    fn write(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        if let Some(d) = &self.direct {
            if data.len().is_multiple_of(Self::ALIGN) && offset.is_multiple_of(Self::ALIGN as u64) {
                let mut buf = vec![0u8; data.len() + Self::ALIGN];
                let at = buf.as_ptr().align_offset(Self::ALIGN);
                let aligned = &mut buf[at..at + data.len()];
                aligned.copy_from_slice(data);
                match d.write_all_at(aligned, offset) {
                    Ok(()) => return Ok(()),
                    // Refused for this file after all: the buffered way.
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        self.buffered.write_all_at(data, offset)
    }
}
