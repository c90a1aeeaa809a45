//! Which regions of a disk may differ from the replica.
//!
//! Two region sets per disk, at `REGION` (4 MiB) granularity:
//! - `dirty`: regions written while the stream was in `bitmap` state (the write
//!   was not queued); they are resent by the resync. In memory only: an unclean
//!   restart falls back to the activity log, which covers them.
//! - the *activity log*: every region that may hold a write the process server
//!   has not acknowledged. A region is added, and the log made durable, before the
//!   first write to it proceeds (concurrent writers share one log write: group
//!   commit); it is retired once every write to it is acknowledged and it has
//!   been cold for `AL_COLD` (`retire`, periodically). After an unclean stop,
//!   exactly these regions are resynced, not the whole disk.
//!
//! Activity log file: `<state-dir>/al-<disk>.rec` = envelope(b"LBAL", 1) of
//! `region_count u64 | bitmap (1 bit per region, LSB first)`, written to a
//! `.partial` file, fsynced and renamed.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use lifeboat_common::codec::Reader;
use lifeboat_common::formats::{self, ActivityLog};

pub const REGION: u64 = 4 << 20;
/// A region leaves the activity log only when acknowledged and not written for
/// this long: hot regions stay logged, so steady writes cost no log updates.
pub const AL_COLD: std::time::Duration = std::time::Duration::from_secs(30);

struct Inner {
    /// Per region: in the persisted activity log.
    logged: Vec<bool>,
    /// Per region: a writer waits for it to be logged.
    wanted: Vec<bool>,
    /// Per region: when it was last written.
    touched: Vec<Option<std::time::Instant>>,
    /// Per region: the last seq captured for it (0 = none since start).
    last_seq: Vec<u64>,
    /// Per region: must be resynced.
    dirty: Vec<bool>,
    /// Regions taken for a resend that is not captured yet (they still count
    /// as dirty, so nothing leaves `resync` before they are in the stream).
    resending: usize,
}

/// A region taken by [`DirtyMap::take_dirty`]; it counts as dirty until
/// [`TakenRegion::resent`] (its resend was captured) or until dropped without
/// that (an error, a cancel, a panic), which marks it dirty again.
pub struct TakenRegion<'a> {
    map: &'a DirtyMap,
    pub region: usize,
    resent: bool,
}

impl TakenRegion<'_> {
    /// The region's resend is in the stream (or it went dirty again there).
    pub fn resent(mut self) {
        self.resent = true;
    }
}

impl Drop for TakenRegion<'_> {
    fn drop(&mut self) {
        let mut g = self.map.lock();
        g.resending -= 1;
        if !self.resent {
            g.dirty[self.region] = true;
        }
    }
}

pub struct DirtyMap {
    path: PathBuf,
    regions: usize,
    inner: Mutex<Inner>,
    /// Serialises activity-log writes (slow: an fsync) apart from the state lock.
    file_lock: tokio::sync::Mutex<()>,
}

/// The activity log of `bits` (one per region), sealed in its envelope.
pub fn encode(bits: &[bool]) -> Vec<u8> {
    let mut out = (bits.len() as u64).to_be_bytes().to_vec();
    let mut bytes = vec![0u8; bits.len().div_ceil(8)];
    for (i, b) in bits.iter().enumerate() {
        if *b {
            bytes[i / 8] |= 1 << (i % 8);
        }
    }
    out.extend(bytes);
    formats::seal::<ActivityLog>(&out)
}

/// Reads an activity log of a disk of `regions` regions (public for the
/// fuzz target).
pub fn decode(buf: &[u8], regions: usize) -> Result<Vec<bool>> {
    let p = formats::open::<ActivityLog>(buf)?;
    let mut r = Reader::new(p);
    let n = r.u64("region count")? as usize;
    if n != regions {
        bail!("activity log covers {n} regions, the disk has {regions}");
    }
    let bytes = r.bytes(n.div_ceil(8), "activity log bitmap")?;
    Ok((0..n).map(|i| bytes[i / 8] & (1 << (i % 8)) != 0).collect())
}

impl DirtyMap {
    /// Opens the disk's activity log; returns the map and the regions the log
    /// held (what may differ after an unclean stop).
    pub fn open(state_dir: &Path, disk: &str, size: u64) -> Result<(DirtyMap, Vec<usize>)> {
        let regions = size.div_ceil(REGION) as usize;
        let path = state_dir.join(format!("al-{disk}.rec"));
        let logged = match std::fs::read(&path) {
            Ok(b) => match decode(&b, regions) {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(
                        "{}: {e:#}; treating every region as possibly changed",
                        path.display()
                    );
                    vec![true; regions]
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![false; regions],
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let held: Vec<usize> = (0..regions).filter(|&i| logged[i]).collect();
        Ok((
            DirtyMap {
                path,
                regions,
                inner: Mutex::new(Inner {
                    wanted: vec![false; regions],
                    touched: vec![None; regions],
                    logged,
                    last_seq: vec![0; regions],
                    dirty: vec![false; regions],
                    resending: 0,
                }),
                file_lock: tokio::sync::Mutex::new(()),
            },
            held,
        ))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn span(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        let a = (offset / REGION) as usize;
        let b = (offset + len.max(1)).div_ceil(REGION) as usize;
        a.min(self.regions)..b.min(self.regions)
    }

    /// Makes sure the regions of a write are in the durable activity log; call
    /// before the write touches the disk.
    pub async fn before_write(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let span = self.span(offset, len);
        {
            let mut g = self.lock();
            let now = std::time::Instant::now();
            for i in span.clone() {
                g.touched[i] = Some(now);
            }
            if g.logged[span.clone()].iter().all(|b| *b) {
                return Ok(());
            }
            for i in span.clone() {
                g.wanted[i] = true;
            }
        }
        let _file = self.file_lock.lock().await;
        let (data, newly) = {
            let g = self.lock();
            if g.logged[span.clone()].iter().all(|b| *b) {
                return Ok(()); // persisted by another writer's log write
            }
            // Persist every region any writer waits for: one write for all of them.
            let next: Vec<bool> = g
                .logged
                .iter()
                .zip(&g.wanted)
                .map(|(l, w)| *l || *w)
                .collect();
            let newly: Vec<usize> = (0..self.regions).filter(|&i| g.wanted[i]).collect();
            (encode(&next), newly)
        };
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || crate::fsutil::replace_file(&path, &data))
            .await
            .map_err(std::io::Error::other)??;
        let mut g = self.lock();
        for i in newly {
            g.logged[i] = true;
            g.wanted[i] = false;
        }
        Ok(())
    }

    /// A write to this range got `seq` in the stream.
    pub fn captured(&self, offset: u64, len: u64, seq: u64) {
        let span = self.span(offset, len);
        let mut g = self.lock();
        for i in span {
            g.last_seq[i] = seq;
        }
    }

    /// A write to this range was not queued (bitmap state): resend the regions.
    pub fn mark_dirty(&self, offset: u64, len: u64) {
        let span = self.span(offset, len);
        let mut g = self.lock();
        for i in span {
            g.dirty[i] = true;
        }
    }

    pub fn mark_regions_dirty(&self, regions: &[usize]) {
        let mut g = self.lock();
        for &i in regions {
            if i < self.regions {
                g.dirty[i] = true;
            }
        }
    }

    /// Takes the next dirty region (clearing its bit), if any.
    pub fn take_dirty(&self) -> Option<TakenRegion<'_>> {
        let mut g = self.lock();
        let i = g.dirty.iter().position(|d| *d)?;
        g.dirty[i] = false;
        g.last_seq[i] = u64::MAX; // stays in the log until its resync is acknowledged
        g.resending += 1;
        Some(TakenRegion {
            map: self,
            region: i,
            resent: false,
        })
    }

    /// Regions that must still be resent, those being resent included.
    pub fn dirty_count(&self) -> usize {
        let g = self.lock();
        g.dirty.iter().filter(|d| **d).count() + g.resending
    }

    pub fn logged_count(&self) -> usize {
        self.lock().logged.iter().filter(|d| **d).count()
    }

    /// Whether [`Self::retire`] would drop a region now.
    pub fn retirable(&self, acked: u64) -> bool {
        let g = self.lock();
        let now = std::time::Instant::now();
        (0..self.regions).any(|i| Self::can_retire(&g, i, acked, now))
    }

    fn can_retire(g: &Inner, i: usize, acked: u64, now: std::time::Instant) -> bool {
        let cold = g.touched[i].is_none_or(|t| now.duration_since(t) >= AL_COLD);
        g.logged[i] && !g.dirty[i] && g.last_seq[i] <= acked && cold && !g.wanted[i]
    }

    /// Drops from the activity log every region whose writes are all
    /// acknowledged (and that is not dirty), and persists the log. The caller
    /// has made the disk itself durable first (a region retired while the
    /// source still held its writes only in the page cache would not be
    /// resent after a power loss took them from the source).
    pub async fn retire(&self, acked: u64) -> std::io::Result<()> {
        let _file = self.file_lock.lock().await;
        let data = {
            let mut g = self.lock();
            let mut changed = false;
            let now = std::time::Instant::now();
            for i in 0..self.regions {
                if Self::can_retire(&g, i, acked, now) {
                    g.logged[i] = false;
                    changed = true;
                }
            }
            if !changed {
                return Ok(());
            }
            encode(&g.logged)
        };
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || crate::fsutil::replace_file(&path, &data))
            .await
            .map_err(std::io::Error::other)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kept_version_1_activity_log_reads_back() {
        let bits: Vec<bool> = (0..20).map(|i| i % 3 == 0).collect();
        let bytes = formats::read_fixture::<ActivityLog>("activity-log", || encode(&bits));
        assert_eq!(decode(&bytes, 20).unwrap(), bits);
        assert!(decode(&bytes, 21).is_err(), "another disk size is refused");
    }

    #[tokio::test]
    async fn activity_log_survives_and_retires() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (m, held) = DirtyMap::open(dir.path(), "d", 10 * REGION).unwrap();
            assert!(held.is_empty());
            m.before_write(3 * REGION + 5, 4096).await.unwrap();
            m.captured(3 * REGION + 5, 4096, 7);
            m.before_write(REGION - 1, 2).await.unwrap(); // spans regions 0 and 1
            m.captured(REGION - 1, 2, 9);
            m.retire(9).await.unwrap(); // all acknowledged, but still hot: kept
            assert_eq!(m.logged_count(), 3);
            m.lock().touched[3] = None; // region 3 went cold
            m.retire(7).await.unwrap(); // region 3 retired, 0 and 1 unacked (seq 9 > 7)
            assert_eq!(m.logged_count(), 2);
        }
        let (m, held) = DirtyMap::open(dir.path(), "d", 10 * REGION).unwrap();
        assert_eq!(held, vec![0, 1]);
        m.mark_regions_dirty(&held);
        let first = m.take_dirty().unwrap();
        assert_eq!(first.region, 0);
        // A region being resent still counts until its resend is done...
        assert_eq!(m.dirty_count(), 2);
        first.resent();
        assert_eq!(m.dirty_count(), 1);
        // ...and one dropped without a resend (error, cancel) is dirty again.
        let second = m.take_dirty().unwrap();
        assert_eq!(second.region, 1);
        drop(second);
        assert_eq!(m.dirty_count(), 1);
        m.take_dirty().unwrap().resent();
        assert!(m.take_dirty().is_none());
        assert_eq!(m.dirty_count(), 0);
        // A damaged log means every region may differ.
        std::fs::write(dir.path().join("al-d.rec"), b"junk").unwrap();
        let (_, held) = DirtyMap::open(dir.path(), "d", 10 * REGION).unwrap();
        assert_eq!(held.len(), 10);
    }
}
