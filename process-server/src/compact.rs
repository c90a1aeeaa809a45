//! Retention and compaction: keeps a machine's history in the store bounded.
//!
//! Every `compact-every` the owner of a machine (the same server that
//! uploads it; the task runs beside its uploader) does, in this order:
//!
//! 1. **Fold.** The horizon H is the newest point at least `keep` old, already
//!    uploaded (at or below this server's `uploaded` and the stored stream's
//!    end). The disks at H are built from the current base (if any) and the
//!    segments after it, but only where the stream changed them: the entries
//!    are applied to sparse work files while the byte ranges they cover are
//!    recorded; each touched chunk's bytes that no entry covered come from the
//!    old base's chunk. Every touched chunk that is not zeros is put under
//!    its content id unless it exists (chunks are shared, never stored
//!    twice); untouched chunks keep their ids. Then the manifest
//!    `base/<H>.json` is created (ownership checked first).
//! 2. **Tidy**, only below a base that is durable: segments wholly at or
//!    below its seq, older bases, points before it and marks at or before it
//!    are deleted. A crash between the fold and the tidy leaves extra
//!    objects that the next run deletes; nothing a reader needs is deleted
//!    before the base that replaces it is stored.
//! 3. **Thin** the points after H: every point younger than `fine-window`
//!    stays; older ones keep, per tier, the newest point of each `every`
//!    bucket. App-consistent points follow `app-every` (0: all kept). The
//!    stream's newest point and the base's point are never thinned.
//! 4. **Collect** chunks no base references. A chunk is deleted only when two
//!    runs in a row found it unreferenced, so a chunk a fold just found
//!    existing (and reused) is not deleted under it.
//!
//! Readers (failover, `points`, a takeover) start from the newest base and
//! take the segments after it (`lifeboat_common::base::stream_view`).

use std::collections::{BTreeMap, HashSet};
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use futures::StreamExt;
use lifeboat_common::base::{
    self, chunk_len, BaseDisk, BaseManifest, ChunkNamer, StreamView, CHUNK_SIZE,
};
use lifeboat_common::catalogue::{self, decode_segment, segment_object, PointRecord};
use lifeboat_common::image::{apply, Target};
use lifeboat_common::protocol::{Entry, TagKind};
use lifeboat_common::seal;
use lifeboat_common::store::Store;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::cache::Cache;
use crate::config::{PsConfig, Retention};
use crate::ownership::Fenced;
use crate::uploader::{MachineKeys, OwnerCheck};

/// Free space a fold leaves on its work filesystem at the least.
const FOLD_RESERVE: u64 = 256 << 20;

/// Folds running at once on this server (work files and CPU are shared).
static FOLDS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

/// Segments fetched and decoded at once by a fold (each up to
/// `segment-max-bytes` sealed, and about as much again decoded).
const FOLD_FETCH: usize = 2;
/// Chunks read, sealed and put at once.
const CHUNK_PUTS: usize = 4;

/// A touched chunk whose uncovered ranges come from the old base: (chunk
/// index, old chunk id, the byte ranges not covered by the stream).
type Fill = (u64, String, Vec<(u64, u64)>);

/// What one machine's compactor works with.
pub struct Compactor {
    pub cfg: Arc<PsConfig>,
    pub cache: Arc<Cache>,
    pub store: Store,
    pub keys: MachineKeys,
    pub check: Arc<OwnerCheck>,
    pub machine: String,
    pub cancel: CancellationToken,
}

/// What one run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RunReport {
    /// The new base's seq, if the run folded.
    pub folded: Option<u64>,
    pub chunks_put: usize,
    pub chunk_bytes_put: u64,
    pub chunks_reused: usize,
    pub segments_deleted: usize,
    pub points_deleted: usize,
    pub chunks_deleted: usize,
}

impl RunReport {
    fn is_empty(&self) -> bool {
        *self == RunReport::default()
    }
}

/// Runs the machine's compactor until cancelled or fenced.
pub async fn run(c: Compactor) {
    let every = c.cfg.retention.compact_every;
    // Chunks the previous run found unreferenced.
    let mut unreferenced = HashSet::new();
    // A first run soon after start tidies what a crash left behind.
    let mut pause = Duration::from_secs(5).min(every);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = c.cancel.cancelled() => return,
        }
        pause = every;
        match run_once(&c, &mut unreferenced, lifeboat_common::now_ms()).await {
            Ok(r) if r.is_empty() => {}
            Ok(r) => info!(
                machine = %c.machine,
                "retention: {}{} chunks put ({} bytes), {} reused; deleted {} segments, {} points, {} chunks",
                r.folded.map(|s| format!("folded the stream up to seq {s} into a base; ")).unwrap_or_default(),
                r.chunks_put,
                r.chunk_bytes_put,
                r.chunks_reused,
                r.segments_deleted,
                r.points_deleted,
                r.chunks_deleted
            ),
            Err(e) if e.is::<Fenced>() => {
                warn!(machine = %c.machine, "retention stopped: {e:#}");
                return;
            }
            Err(e) => {
                warn!(machine = %c.machine, "retention run failed (retried in {}): {e:#}", humantime::format_duration(every))
            }
        }
    }
}

/// One retention run at time `now_ms`.
pub async fn run_once(
    c: &Compactor,
    unreferenced: &mut HashSet<String>,
    now_ms: u64,
) -> Result<RunReport> {
    let (store, ck, m) = (&c.store, &c.keys.catalogue, c.machine.as_str());
    let r = &c.cfg.retention;
    let mut report = RunReport::default();
    // One run that may fold at a time on this server (work files and CPU
    // are shared), and the view read after the wait, not before it.
    let _one = FOLDS.acquire().await?;
    let mut view = base::stream_view(store, Some(ck), m).await?;
    let points = catalogue::list_points(store, Some(ck), m, &view.fences).await?;
    let uploaded = {
        let (cache, m) = (c.cache.clone(), m.to_string());
        tokio::task::spawn_blocking(move || cache.uploaded(&m)).await??
    };
    let horizon_ms = now_ms.saturating_sub(r.keep.as_millis() as u64);
    let ready = view.prefix.end.min(uploaded);
    let start = view.start();
    let horizon = points
        .iter()
        .filter(|p| p.seq > start && p.seq <= ready && p.time_ms <= horizon_ms)
        .max_by_key(|p| p.seq);
    // A failed fold does not hold up the rest: what an earlier base
    // replaced is still tidied, points thinned and chunks collected.
    let mut folded = Ok(());
    if let Some(point) = horizon {
        folded = fold(c, &view, point, &mut report).await;
        if folded.as_ref().is_err_and(|e| e.is::<Fenced>()) {
            return folded.map(|()| report);
        }
        view = base::stream_view(store, Some(ck), m).await?;
    }
    tidy(c, &view, now_ms, &mut report).await?;
    let points = catalogue::list_points(store, Some(ck), m, &view.fences).await?;
    thin(c, &points, view.start(), now_ms, &mut report).await?;
    collect(c, unreferenced, &mut report).await?;
    folded.map(|()| report)
}

/// Where the fold's work files of `machine` go.
fn work_dir(cfg: &PsConfig, machine: &str) -> PathBuf {
    cfg.retention
        .work_dir
        .clone()
        .unwrap_or_else(|| cfg.cache_dir.join("fold"))
        .join(machine)
}

/// Builds and stores the base at `point` (see the module header).
async fn fold(
    c: &Compactor,
    view: &StreamView,
    point: &PointRecord,
    report: &mut RunReport,
) -> Result<()> {
    let (store, m) = (&c.store, c.machine.as_str());
    let rec = catalogue::load_machine(store, &c.keys.catalogue, m).await?;
    let old = view.base();
    let start = view.start();
    let h = point.seq;
    // Disk numbers are positions: the point, the old base and machine.json
    // must agree on the id at each (disks are only ever appended).
    for (i, d) in point.disks.iter().enumerate() {
        let clash = |other: Option<&str>, what: &str| match other {
            Some(o) if o != d.id => Err(anyhow!(
                "disk #{i} is {:?} in point {} but {o:?} in {what}; not folding",
                d.id,
                point.id
            )),
            _ => Ok(()),
        };
        clash(
            old.and_then(|b| b.disks.get(i)).map(|x| x.id.as_str()),
            "the current base",
        )?;
        clash(rec.disks.get(i).map(|x| x.id.as_str()), "machine.json")?;
    }
    if let Some(b) = old.filter(|b| b.disks.len() > point.disks.len()) {
        bail!(
            "the current base (seq {}) has {} disks, point {} only {}; not folding",
            b.seq,
            b.disks.len(),
            point.id,
            point.disks.len()
        );
    }
    let dir = work_dir(&c.cfg, m);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let _cleanup = RemoveOnDrop(dir.clone());
    // The work files hold what the stream wrote since the old base (at most
    // the disks' sizes): refuse to start a fold that would fill their
    // filesystem (it is the cache's by default, and a full cache stops
    // acknowledgements).
    let sealed: u64 = view
        .prefix
        .spans
        .iter()
        .filter(|s| s.name.first <= h && s.upto > start)
        .filter_map(|s| view.segment_bytes.get(&s.name))
        .sum();
    let disks_total: u64 = point.disks.iter().map(|d| d.size).sum();
    let need = disks_total.min(sealed.saturating_mul(4)) + FOLD_RESERVE;
    if let Some(free) = crate::cache::free_bytes(&dir).filter(|f| *f < need) {
        bail!(
            "{} has {free} bytes free; folding up to seq {h} may need {need}: not folding until there is room",
            dir.display()
        );
    }

    // The disks at H are the point's; each may reach up to its largest size.
    let old_disk = |i: usize, id: &str| {
        old.and_then(|b| b.disks.get(i))
            .filter(|d| d.id == id)
            .cloned()
    };
    let mut targets = BTreeMap::new();
    let mut largest = Vec::new();
    for (i, d) in point.disks.iter().enumerate() {
        let prev = old_disk(i, &d.id);
        let same_in_rec = rec.disks.get(i).is_some_and(|r| r.id == d.id);
        let l = prev
            .as_ref()
            .map_or(0, |p| p.largest.max(p.size))
            .max(d.size)
            .max(if same_in_rec { rec.largest(i) } else { 0 });
        let path = dir.join(format!("{i}.img"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        file.set_len(l)
            .with_context(|| format!("sizing {}", path.display()))?;
        targets.insert(i as u16, Target::new(file, l, true));
        largest.push(l);
    }

    // The segments after the old base up to H, applied in order.
    let spans: Vec<_> = view
        .prefix
        .spans
        .iter()
        .copied()
        .filter(|s| s.name.first <= h && s.upto > start)
        .collect();
    let key = Arc::new(c.keys.data.clone());
    let mut fetches = futures::stream::iter(spans)
        .map(|span| {
            let (store, key, machine) = (store.clone(), key.clone(), m.to_string());
            async move {
                let name = segment_object(&machine, &span.name);
                let sealed = store
                    .get(&name)
                    .await?
                    .ok_or_else(|| anyhow!("{} is missing", store.describe(&name)))?;
                let described = store.describe(&name);
                let entries = tokio::task::spawn_blocking(move || -> Result<Vec<Entry>> {
                    let plain = seal::open(&key, &name, 0, &sealed)
                        .map_err(|e| anyhow!("{described}: {e}"))?;
                    decode_segment(&plain, &machine, span.name)
                        .map_err(|e| anyhow!("{described}: {e}"))
                })
                .await??;
                Ok::<_, anyhow::Error>((span, entries))
            }
        })
        .buffered(FOLD_FETCH);
    let mut applied = start;
    let mut saw_tag = false;
    let mut targets = Some(targets);
    while let Some(item) = fetches.next().await {
        if c.cancel.is_cancelled() {
            bail!("cancelled");
        }
        let (span, entries) = item?;
        let upto = h.min(span.upto);
        let from = applied;
        let mut t = targets
            .take()
            .expect("targets are put back after each segment");
        let seg = store.describe(&segment_object(m, &span.name));
        let (t, r) = tokio::task::spawn_blocking(move || {
            let r =
                apply(&mut t, &entries, from, upto, h).with_context(|| format!("folding {seg}"));
            (t, r)
        })
        .await?;
        targets = Some(t);
        saw_tag |= r?.0;
        applied = applied.max(upto);
    }
    drop(fetches);
    if applied != h || !saw_tag {
        bail!(
            "the stream up to point {} (seq {h}) could not be read whole (read up to seq {applied}); not folding",
            point.id
        );
    }
    let targets = targets.expect("targets are back");
    // Every touched chunk is filled in whole from the old base: check the
    // room for that before filling (scattered small writes touch many).
    let touched_bytes: u64 = targets
        .values()
        .map(|t| {
            t.covered
                .as_ref()
                .map_or(0, |c| c.touched(CHUNK_SIZE).len() as u64)
                * CHUNK_SIZE
        })
        .sum();
    if let Some(free) = crate::cache::free_bytes(&dir).filter(|f| *f < touched_bytes + FOLD_RESERVE)
    {
        bail!(
            "{} has {free} bytes free; filling the {touched_bytes} bytes of chunks the stream touched up to seq {h} needs more: not folding until there is room",
            dir.display()
        );
    }
    // A resize entry may have grown a disk past what the records said.
    for (i, l) in largest.iter_mut().enumerate() {
        *l = (*l).max(targets[&(i as u16)].limit);
    }

    // Per disk: the chunks the stream touched get their uncovered bytes from
    // the old base, then each is named and put unless stored.
    let namer = Arc::new(ChunkNamer::derive(&c.keys.data));
    let mut disks = Vec::new();
    for (i, d) in point.disks.iter().enumerate() {
        let t = &targets[&(i as u16)];
        let covered = t.covered.clone().unwrap_or_default();
        let touched = covered.touched(CHUNK_SIZE);
        let mut chunks: BTreeMap<u64, String> = old_disk(i, &d.id)
            .map(|b| b.chunks.into_iter().collect())
            .unwrap_or_default();
        let file = Arc::new(t.file.try_clone()?);
        // Old content under the uncovered parts of touched chunks.
        let fills: Vec<Fill> = touched
            .iter()
            .filter_map(|&ci| {
                let id = chunks.get(&ci)?;
                let (s, e) = (ci * CHUNK_SIZE, ci * CHUNK_SIZE + chunk_len(largest[i], ci));
                let gaps = covered.gaps(s, e);
                (!gaps.is_empty()).then(|| (ci, id.clone(), gaps))
            })
            .collect();
        let mut fill = futures::stream::iter(fills)
            .map(|(ci, id, gaps)| {
                let (store, key, namer, file) =
                    (store.clone(), key.clone(), namer.clone(), file.clone());
                let machine = m.to_string();
                async move {
                    let (plain, _) = base::fetch_chunk(&store, key, namer, &machine, &id)
                        .await
                        .map_err(|e| anyhow!("{e} (a chunk of the current base)"))?;
                    tokio::task::spawn_blocking(move || -> Result<()> {
                        let at = ci * CHUNK_SIZE;
                        for (s, e) in gaps {
                            let (a, b) = ((s - at) as usize, ((e - at) as usize).min(plain.len()));
                            if a < b {
                                file.write_all_at(&plain[a..b], s)?;
                            }
                        }
                        Ok(())
                    })
                    .await?
                }
            })
            .buffer_unordered(CHUNK_PUTS);
        while let Some(r) = fill.next().await {
            r?;
        }
        drop(fill);
        // Name and store the touched chunks.
        let level = c.cfg.zstd_level;
        let jobs: Vec<u64> = touched
            .iter()
            .copied()
            .filter(|ci| ci * CHUNK_SIZE < largest[i])
            .collect();
        let mut puts = futures::stream::iter(jobs)
            .map(|ci| {
                let (store, key, namer, file) =
                    (store.clone(), key.clone(), namer.clone(), file.clone());
                let machine = m.to_string();
                let len = chunk_len(largest[i], ci) as usize;
                async move {
                    let mach = machine.clone();
                    let (id, sealed) = tokio::task::spawn_blocking(move || -> Result<_> {
                        let mut buf = vec![0u8; len];
                        file.read_exact_at(&mut buf, ci * CHUNK_SIZE)?;
                        if lifeboat_common::is_zero(&buf) {
                            return Ok(None);
                        }
                        let id = namer.id(&buf);
                        let sealed = base::seal_chunk(&key, &mach, &id, &buf, level);
                        Ok(Some((id, sealed)))
                    })
                    .await??
                    .map_or((None, None), |(id, s)| (Some(id), Some(s)));
                    let mut put = None;
                    if let (Some(id), Some(sealed)) = (&id, sealed) {
                        let name = base::chunk_object(&machine, id);
                        let n = sealed.len() as u64;
                        // Content-addressed: an existing chunk is the same data.
                        let created = store.put_if_absent(&name, Bytes::from(sealed)).await?;
                        put = created.then_some(n);
                    }
                    Ok::<_, anyhow::Error>((ci, id, put))
                }
            })
            .buffer_unordered(CHUNK_PUTS);
        while let Some(r) = puts.next().await {
            let (ci, id, put) = r?;
            match id {
                Some(id) => {
                    chunks.insert(ci, id);
                    match put {
                        Some(n) => {
                            report.chunks_put += 1;
                            report.chunk_bytes_put += n;
                        }
                        None => report.chunks_reused += 1,
                    }
                }
                None => {
                    chunks.remove(&ci);
                }
            }
        }
        chunks.retain(|ci, _| ci * CHUNK_SIZE < largest[i]);
        disks.push(BaseDisk {
            id: d.id.clone(),
            size: t.resized_to.unwrap_or(d.size),
            largest: largest[i],
            chunks: chunks.into_iter().collect(),
        });
    }
    let manifest = BaseManifest {
        format: base::BASE_FORMAT,
        seq: h,
        epoch: c.check.epoch(),
        chunk_size: CHUNK_SIZE,
        time_ms: point.time_ms,
        time: point.time.clone(),
        created_ms: lifeboat_common::now_ms(),
        disks,
    };
    // Every chunk the base names must be stored before the base is: the
    // ones this fold put or found, and those carried over from the old base.
    let stored: HashSet<String> = store
        .list(&base::chunk_dir(m))
        .await?
        .into_iter()
        .filter_map(|(rel, _)| rel.rsplit('/').next().map(str::to_string))
        .collect();
    if let Some(id) = manifest.chunk_ids().find(|id| !stored.contains(*id)) {
        bail!(
            "{} is missing although the new base needs it; not folding",
            store.describe(&base::chunk_object(m, id))
        );
    }
    let name = base::base_object(m, h);
    c.check.verify(store).await?;
    let body = Bytes::from(catalogue::sign_record(&c.keys.catalogue, &name, &manifest));
    let ck = &c.keys.catalogue;
    let fences = &view.fences;
    let mut stale = false;
    let created = store
        .create(&name, body.clone(), |existing| {
            match catalogue::open_record::<BaseManifest>(ck, store, &name, existing) {
                Ok(b) if !fences.counts(b.epoch, b.seq) => {
                    stale = true; // an older owner's, landed after a takeover
                    true
                }
                Ok(b) => {
                    BaseManifest { created_ms: 0, ..b }
                        == BaseManifest {
                            created_ms: 0,
                            ..manifest.clone()
                        }
                }
                Err(_) => false,
            }
        })
        .await;
    created?;
    if stale {
        warn!(machine = %m, "{} was written by an older owner after a takeover; replacing it", store.describe(&name));
        c.check.verify(store).await?;
        store.put(&name, body).await?;
    }
    report.folded = Some(h);
    Ok(())
}

/// Deletes, every this many objects, only after checking ownership again.
const DELETES_PER_CHECK: usize = 64;

/// Deletes `names`, checking ownership before the first and every
/// [`DELETES_PER_CHECK`] after it.
async fn delete_all(c: &Compactor, names: &[String]) -> Result<usize> {
    for (i, n) in names.iter().enumerate() {
        if i % DELETES_PER_CHECK == 0 {
            c.check.verify(&c.store).await?;
        }
        c.store.delete(n).await?;
    }
    Ok(names.len())
}

/// Deletes what a base made unnecessary (see the module header): below the
/// newest base stored at least `reader-grace` ago, so that a failover that
/// began from an older base still finds what it reads; and bases no reader
/// counts (an older owner's, landed after a takeover).
async fn tidy(c: &Compactor, view: &StreamView, now_ms: u64, report: &mut RunReport) -> Result<()> {
    let (store, m, ck) = (&c.store, c.machine.as_str(), &c.keys.catalogue);
    let grace = c.cfg.retention.reader_grace.as_millis() as u64;
    let all = catalogue::Fences::default();
    let every_base = base::list_bases(store, Some(ck), m, &all).await?;
    let h = view
        .bases
        .iter()
        .filter(|b| b.created_ms.saturating_add(grace) <= now_ms)
        .map(|b| b.seq)
        .max()
        .unwrap_or(0);
    let mut names: Vec<String> = every_base
        .iter()
        .filter(|b| b.seq < h || !view.fences.counts(b.epoch, b.seq))
        .map(|b| base::base_object(m, b.seq))
        .collect();
    if h > 0 {
        let segments = view.segments.iter().filter(|s| s.last <= h);
        names.extend(segments.map(|s| segment_object(m, s)));
        let points = catalogue::list_points(store, Some(ck), m, &all).await?;
        let dropped: Vec<String> = points
            .iter()
            .filter(|p| p.seq < h)
            .map(|p| catalogue::point_object(m, p.seq))
            .collect();
        report.points_deleted += dropped.len();
        names.extend(dropped);
        // Their checksums (`sums/<point>.json`), also of points thinned earlier.
        let summed = catalogue::list_sums_points(store, m).await?;
        names.extend(summed.range(..h).map(|&seq| catalogue::sums_object(m, seq)));
        let marks = catalogue::list_inconsistent(store, Some(ck), m, &all).await?;
        names.extend(
            marks
                .iter()
                .filter(|x| x.seq <= h)
                .map(|x| catalogue::inconsistent_object(m, x.seq)),
        );
        report.segments_deleted += view.segments.iter().filter(|s| s.last <= h).count();
    }
    delete_all(c, &names).await?;
    Ok(())
}

/// The points to thin away (see the module header): `points` by seq;
/// `marks`: the seqs where a sync or resync began. The first point after
/// each mark is kept: it is what says the stream is consistent again.
pub fn thinned(
    r: &Retention,
    points: &[PointRecord],
    base: u64,
    now_ms: u64,
    marks: &[u64],
) -> Vec<u64> {
    let newest = points.iter().map(|p| p.seq).max().unwrap_or(0);
    let closing: HashSet<u64> = marks
        .iter()
        .filter_map(|m| points.iter().map(|p| p.seq).find(|s| s >= m))
        .collect();
    let fine_ms = r.fine_window.as_millis() as u64;
    // Newest first: the first point seen in a bucket is kept.
    let mut kept_buckets: HashSet<(bool, usize, u64)> = HashSet::new();
    let mut out = Vec::new();
    for p in points.iter().rev() {
        if p.seq == base || p.seq == newest || p.seq < base || closing.contains(&p.seq) {
            continue;
        }
        let age = now_ms.saturating_sub(p.time_ms);
        if age < fine_ms {
            continue;
        }
        if p.kind == TagKind::Group {
            continue; // shared with other machines: thinned by none alone
        }
        let app = p.kind == TagKind::App;
        let every = if app {
            if r.app_every.is_zero() {
                continue;
            }
            Some((usize::MAX, r.app_every))
        } else {
            r.tiers
                .iter()
                .enumerate()
                .rev()
                .find(|(_, t)| age >= t.older_than.as_millis() as u64)
                .map(|(i, t)| (i, t.every))
        };
        let Some((tier, every)) = every else {
            continue; // younger than every tier: kept
        };
        let bucket = p.time_ms / (every.as_millis() as u64).max(1);
        if !kept_buckets.insert((app, tier, bucket)) {
            out.push(p.seq);
        }
    }
    out
}

async fn thin(
    c: &Compactor,
    points: &[PointRecord],
    base: u64,
    now_ms: u64,
    report: &mut RunReport,
) -> Result<()> {
    let marks: Vec<u64> = catalogue::list_inconsistent(
        &c.store,
        Some(&c.keys.catalogue),
        &c.machine,
        &catalogue::Fences::default(),
    )
    .await?
    .into_iter()
    .map(|m| m.seq)
    .collect();
    let seqs = thinned(&c.cfg.retention, points, base, now_ms, &marks);
    let names: Vec<String> = seqs
        .iter()
        .map(|&seq| catalogue::point_object(&c.machine, seq))
        .collect();
    report.points_deleted += delete_all(c, &names).await?;
    // The thinned points' checksums after the points themselves.
    let sums: Vec<String> = seqs
        .iter()
        .map(|&seq| catalogue::sums_object(&c.machine, seq))
        .collect();
    delete_all(c, &sums).await?;
    Ok(())
}

/// Deletes chunks that no base referenced in this run and the last.
async fn collect(
    c: &Compactor,
    unreferenced: &mut HashSet<String>,
    report: &mut RunReport,
) -> Result<()> {
    let (store, m) = (&c.store, c.machine.as_str());
    // Every base in the store counts here, fenced or not: deleting a chunk
    // is the one step that cannot be undone.
    let all = catalogue::Fences::default();
    let bases = base::list_bases(store, Some(&c.keys.catalogue), m, &all).await?;
    let referenced: HashSet<&str> = bases.iter().flat_map(|b| b.chunk_ids()).collect();
    let dir = base::chunk_dir(m);
    let mut now_unreferenced = HashSet::new();
    for (rel, _) in store.list(&dir).await? {
        let id = rel.rsplit('/').next().unwrap_or("").to_string();
        if !referenced.contains(id.as_str()) {
            now_unreferenced.insert(id);
        }
    }
    let doomed: Vec<String> = now_unreferenced
        .iter()
        .filter(|id| unreferenced.contains(*id))
        .cloned()
        .collect();
    let names: Vec<String> = doomed.iter().map(|id| base::chunk_object(m, id)).collect();
    report.chunks_deleted += delete_all(c, &names).await?;
    for id in &doomed {
        now_unreferenced.remove(id);
    }
    *unreferenced = now_unreferenced;
    Ok(())
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lifeboat_common::protocol::DiskInfo;

    fn point(seq: u64, time_ms: u64, kind: TagKind) -> PointRecord {
        PointRecord {
            format: 1,
            id: seq.to_string(),
            kind,
            seq,
            time_ms,
            time: String::new(),
            label: String::new(),
            disks: vec![DiskInfo::new("root", 1)],
            epoch: 1,
            source: None,
            churn: None,
        }
    }

    #[test]
    fn thinning_keeps_the_fine_window_and_one_point_per_bucket() {
        let r = Retention::default();
        let hour = 3_600_000u64;
        let now = 100 * hour;
        // A crash point every 5 minutes for the last 30 hours.
        let mut points: Vec<PointRecord> = (0..360)
            .map(|i| point(i + 1, now - 30 * hour + i * 300_000, TagKind::Crash))
            .collect();
        points.push(point(1000, now - 5 * hour, TagKind::App));
        points.sort_by_key(|p| p.seq);
        let dropped: HashSet<u64> = thinned(&r, &points, 0, now, &[]).into_iter().collect();
        let kept: Vec<&PointRecord> = points
            .iter()
            .filter(|p| !dropped.contains(&p.seq))
            .collect();
        // Everything younger than 2 h is kept.
        assert!(points
            .iter()
            .filter(|p| now - p.time_ms < 2 * hour)
            .all(|p| !dropped.contains(&p.seq)));
        // Between 2 h and 24 h: one crash point per hour bucket.
        let mid: Vec<_> = kept
            .iter()
            .filter(|p| p.kind == TagKind::Crash)
            .filter(|p| (2 * hour..24 * hour).contains(&(now - p.time_ms)))
            .map(|p| p.time_ms / hour)
            .collect();
        let unique: HashSet<_> = mid.iter().collect();
        assert_eq!(mid.len(), unique.len(), "one per hour");
        assert!(
            mid.len() >= 21,
            "about one per hour for 22 h, got {}",
            mid.len()
        );
        // Older than 24 h: one per day bucket.
        let old: Vec<_> = kept
            .iter()
            .filter(|p| now - p.time_ms >= 24 * hour)
            .map(|p| p.time_ms / (24 * hour))
            .collect();
        let unique: HashSet<_> = old.iter().collect();
        assert_eq!(old.len(), unique.len(), "one per day");
        // App points keep their own rule (default: all).
        assert!(!dropped.contains(&1000));
        // The newest point and the base's point are never thinned.
        let dropped = thinned(&r, &points, 2, now, &[]);
        assert!(!dropped.contains(&2));
        // The first point after a sync or resync began is kept.
        let plain = thinned(&r, &points, 0, now, &[]);
        let victim = *plain.first().expect("something is thinned");
        let kept = thinned(&r, &points, 0, now, &[victim]);
        assert!(
            !kept.contains(&victim),
            "the point closing a resync was thinned"
        );
    }
}
