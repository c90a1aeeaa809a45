//! `lifeboat-mt verify`: checks that a recovery point can be recovered,
//! without failing over.
//!
//! - The chain: the base the stream starts from (if any) and segments
//!   covering every seq from it to the point, without a gap.
//! - Every object the point needs is fetched and authenticated: each chunk of
//!   the base (AES-GCM, and its content against its id), each segment
//!   (AES-GCM, its entries against its name), and the catalogue records.
//! - Each disk's SHA-256 at the point (comparable with `sha256sum` of the
//!   source disk or of a recovered image), and its `lifeboat-disk-v1`
//!   checksum, compared with the one the agent recorded at the point
//!   (`sums.rs`; a difference is an error naming the disk).
//!
//! The disks are assembled in a temporary directory (sparse files, private,
//! removed when verify ends, also on failure): no recovery target is
//! written. The first missing or tampered object ends it with an error that
//! names the object.

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};

use crate::materialize::{self, Inventory, MachineKeys, PointSpec, Resolved};
use lifeboat_common::store::Store;

/// One disk's checksum at the point.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DiskSum {
    pub id: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    pub machine: String,
    pub point: String,
    pub seq: u64,
    pub base: Option<u64>,
    pub chunks_checked: usize,
    pub segments_checked: usize,
    pub bytes_fetched: u64,
    /// False when the point is the stream's end inside a sync or resync: the
    /// objects are sound, but failover refuses it without
    /// `--allow-inconsistent` (the disks are not crash-consistent there).
    pub consistent: bool,
    pub disks: Vec<DiskSum>,
    pub checksums: crate::sums::Checked,
}

/// Verifies `spec` of `machine` (see the module header); `work` is where the
/// temporary images go.
pub async fn verify(
    store: &Store,
    keys: &MachineKeys,
    machine: &str,
    spec: &PointSpec,
    work: &Path,
    progress: impl Fn(materialize::Progress) + Send + Sync,
) -> Result<VerifyReport> {
    let inv: Inventory = materialize::inventory(store, Some(&keys.catalogue), machine).await?;
    let resolved: Resolved = materialize::resolve(&inv, machine, spec, true)?;
    let consistent = resolved.point.is_some() || inv.unsettled_end().is_none();
    if resolved.seq > inv.end {
        anyhow::bail!(
            "point at seq {} of machine {machine} cannot be recovered: {}",
            resolved.seq,
            inv.missing(resolved.seq)
        );
    }
    let tmp = tempfile::Builder::new()
        .prefix("lifeboat-verify-")
        .tempdir_in(work)
        .with_context(|| format!("creating a temporary directory in {}", work.display()))?;
    let report = materialize::materialize(
        store,
        keys,
        machine,
        &inv,
        &resolved,
        tmp.path(),
        true,
        progress,
    )
    .await?;
    let images: Vec<_> = report
        .disks
        .iter()
        .map(|d| (d.id.clone(), d.path.clone(), d.size))
        .collect();
    // Failover skips base chunks that later writes cover whole (the point
    // does not need them); older points do, so verify authenticates every
    // chunk of the base.
    let chunks_checked = check_base_chunks(store, keys, machine, &inv).await?;
    let points: Vec<u64> = inv.points.iter().map(|p| p.seq).collect();
    let checksums = crate::sums::check_images(
        store,
        keys,
        machine,
        &inv.fences,
        &points,
        resolved.seq,
        &images,
    )
    .await?;
    let mut disks = Vec::new();
    for d in &report.disks {
        let path = d.path.clone();
        let sum = tokio::task::spawn_blocking(move || sha256_file(&path)).await??;
        disks.push(DiskSum {
            id: d.id.clone(),
            size: d.size,
            sha256: sum,
        });
    }
    Ok(VerifyReport {
        machine: machine.to_string(),
        point: resolved.description,
        seq: resolved.seq,
        base: report.base,
        chunks_checked,
        segments_checked: report.segments_read,
        bytes_fetched: report.bytes_fetched,
        consistent,
        disks,
        checksums,
    })
}

/// Fetches and authenticates every chunk the base lists (AES-GCM, and its
/// content against its id); returns how many. The first missing or
/// tampered one is an error naming it.
async fn check_base_chunks(
    store: &Store,
    keys: &MachineKeys,
    machine: &str,
    inv: &Inventory,
) -> Result<usize> {
    use futures::StreamExt;
    use lifeboat_common::base;
    let Some(b) = &inv.base else {
        return Ok(0);
    };
    let ids: std::collections::BTreeSet<String> = b.chunk_ids().map(String::from).collect();
    let key = std::sync::Arc::new(keys.data.clone());
    let namer = std::sync::Arc::new(base::ChunkNamer::derive(&keys.data));
    let mut checks = futures::stream::iter(ids.iter().cloned())
        .map(|id| {
            let (store, key, namer) = (store.clone(), key.clone(), namer.clone());
            let machine = machine.to_string();
            async move {
                base::fetch_chunk(&store, key, namer, &machine, &id)
                    .await
                    .map(|_| ())
                    .map_err(|e| anyhow::anyhow!("{e} (a chunk of the base at seq {})", b.seq))
            }
        })
        .buffer_unordered(8);
    while let Some(r) = checks.next().await {
        r?;
    }
    Ok(ids.len())
}

/// Lower-case hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(lifeboat_common::hex(ctx.finish().as_ref()))
}
