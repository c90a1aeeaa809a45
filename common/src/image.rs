//! Applying stream entries to disk images (sparse files): shared by the
//! master target's failover and the process server's fold into a base.
//!
//! Two ways, with one result:
//!
//! - [`apply`] (the fold): entries in seq order, each seq once, written to the
//!   image as they come; a shrink zeroes what lies past the new end (it reads
//!   as zeros if the disk grows again). Optionally each target records the byte
//!   ranges the entries covered ([`Ranges`]), so that the fold knows which
//!   chunks changed and which bytes of them still come from the older base.
//! - [`Overlay`] (failover): entries newest first into a fresh, all-zero image.
//!   Per disk it keeps the byte ranges already decided by a newer entry — a
//!   write, a zero/trim, or everything past the end a resize set (a shrink
//!   followed by a grow re-exposes zeros, never older data) — and hands out
//!   only the parts of an older write not yet covered ([`Piece`]s). Zeros are
//!   never written: the image already reads as zeros there. What stays
//!   uncovered at the end comes from the base ([`Overlay::uncovered`]). So every
//!   byte is written at most once, and the pieces are disjoint: they can be in
//!   flight in any order at once.
//!
//! Both check the same things: a write outside a disk's largest size (as it
//! stood at the write's seq), or to a disk the machine does not list, is an
//! error naming the seq. The covered set is merged as it grows (adjacent and
//! overlapping ranges become one), so it holds at most one range per entry
//! applied and never more than half the disk's bytes in ranges — about 50 bytes
//! a range; 1 GiB of scattered 4 KiB writes is ~262 k ranges, ~13 MiB.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

use anyhow::{anyhow, bail, Context, Result};

use crate::protocol::{Entry, Op};

/// Disjoint, non-adjacent byte ranges `[start, end)`, merged as they are added.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Ranges(BTreeMap<u64, u64>);

impl Ranges {
    pub fn add(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut s, mut e) = (start, end);
        // Merge with the range that starts at or before `start`, if it reaches it.
        if let Some((&ps, &pe)) = self.0.range(..=s).next_back() {
            if pe >= s {
                s = ps;
                e = e.max(pe);
            }
        }
        // Swallow every range that starts inside [s, e].
        let inside: Vec<(u64, u64)> = self.0.range(s..=e).map(|(a, b)| (*a, *b)).collect();
        for (a, b) in inside {
            self.0.remove(&a);
            e = e.max(b);
        }
        self.0.insert(s, e);
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.0.iter().map(|(a, b)| (*a, *b))
    }

    /// The parts of `[start, end)` not covered.
    pub fn gaps(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut at = start;
        let first = self
            .0
            .range(..=start)
            .next_back()
            .map(|(a, _)| *a)
            .unwrap_or(start);
        for (a, b) in self.0.range(first..end) {
            if *b <= at {
                continue;
            }
            if *a > at {
                out.push((at, (*a).min(end)));
            }
            at = at.max(*b);
            if at >= end {
                break;
            }
        }
        if at < end {
            out.push((at, end));
        }
        out
    }

    /// Indexes of the `unit`-sized blocks any range touches.
    pub fn touched(&self, unit: u64) -> std::collections::BTreeSet<u64> {
        let mut out = std::collections::BTreeSet::new();
        for (a, b) in self.iter() {
            out.extend(a / unit..b.div_ceil(unit));
        }
        out
    }
}

/// One disk image being written.
pub struct Target {
    pub file: File,
    /// No write may reach past this (the largest size the disk had).
    pub limit: u64,
    /// The size set by the last resize entry applied.
    pub resized_to: Option<u64>,
    /// Bytes of write data applied.
    pub written: u64,
    /// What the entries covered, when asked for.
    pub covered: Option<Ranges>,
}

impl Target {
    pub fn new(file: File, limit: u64, track: bool) -> Target {
        Target {
            file,
            limit,
            resized_to: None,
            written: 0,
            covered: track.then(Ranges::default),
        }
    }

    fn cover(&mut self, offset: u64, len: u64) {
        if let Some(c) = &mut self.covered {
            c.add(offset, offset + len);
        }
    }
}

/// The last tag and the last sync/resync start (seq, label) seen in the stream.
#[derive(Debug, Default, Clone)]
pub struct StreamMarks {
    pub last_tag: u64,
    pub last_inconsistent: Option<(u64, String)>,
}

impl StreamMarks {
    pub fn merge(&mut self, later: StreamMarks) {
        self.last_tag = self.last_tag.max(later.last_tag);
        if let Some(m) = later.last_inconsistent {
            if self.last_inconsistent.as_ref().is_none_or(|o| o.0 < m.0) {
                self.last_inconsistent = Some(m);
            }
        }
    }

    /// The sync/resync start not followed by a tag, if any.
    pub fn unsettled(&self) -> Option<(u64, String)> {
        self.last_inconsistent
            .clone()
            .filter(|(seq, _)| *seq > self.last_tag)
    }
}

/// Applies `entries` with `after < seq <= upto`; returns whether one of them
/// is the tag at `point` (the seq being recovered) and the marks seen.
pub fn apply(
    targets: &mut BTreeMap<u16, Target>,
    entries: &[Entry],
    after: u64,
    upto: u64,
    point: u64,
) -> Result<(bool, StreamMarks)> {
    let mut saw_tag = false;
    let mut marks = StreamMarks::default();
    for e in entries.iter().filter(|e| e.seq > after) {
        if e.seq > upto {
            break;
        }
        match &e.op {
            Op::Write { disk, offset, data } => {
                let t = target(targets, *disk, e.seq)?;
                check_range(t, *disk, e.seq, *offset, data.len() as u64)?;
                t.file
                    .write_all_at(data, *offset)
                    .with_context(|| format!("writing seq {} to disk {disk}", e.seq))?;
                t.written += data.len() as u64;
                t.cover(*offset, data.len() as u64);
            }
            Op::Zero { disk, offset, len } => {
                let t = target(targets, *disk, e.seq)?;
                check_range(t, *disk, e.seq, *offset, *len as u64)?;
                zero_range(&t.file, *offset, *len as u64)
                    .with_context(|| format!("zeroing seq {} on disk {disk}", e.seq))?;
                t.cover(*offset, *len as u64);
            }
            Op::Resize { disk, size } => {
                let t = target(targets, *disk, e.seq)?;
                // What lies past a shrunk disk's end reads as zeros if it grows again.
                if *size < t.limit {
                    zero_range(&t.file, *size, t.limit - *size)
                        .with_context(|| format!("resizing disk {disk} at seq {}", e.seq))?;
                    let (start, len) = (*size, t.limit - *size);
                    t.cover(start, len);
                } else {
                    t.file.set_len(*size)?;
                    t.limit = *size;
                }
                t.resized_to = Some(*size);
            }
            Op::Inconsistent { label } => {
                marks.last_inconsistent = Some((e.seq, label.clone()));
            }
            // Checksums of an earlier point, hashes of blocks already
            // written: nothing to write.
            Op::Sums { .. } | Op::Hashes { .. } => {}
            Op::Tag { .. } => {
                marks.last_tag = e.seq;
                if e.seq == point {
                    saw_tag = true;
                }
            }
        }
    }
    Ok((saw_tag, marks))
}

/// Part of a write that an [`Overlay`] found still uncovered: to be written
/// to the image, disjoint from every other piece of the overlay.
#[derive(Debug, Clone)]
pub struct Piece {
    pub disk: u16,
    pub offset: u64,
    pub data: bytes::Bytes,
}

/// One disk of an [`Overlay`].
#[derive(Debug)]
pub struct OverlayDisk {
    /// The disk's largest known size: writes past it need an older grow.
    limit: u64,
    /// How far the image must reach for the pieces handed out (≥ `limit`).
    pub extent: u64,
    /// The size set by the newest resize entry taken (the last one ≤ the point).
    pub resized_to: Option<u64>,
    /// Bytes of write data handed out as pieces.
    pub written: u64,
    covered: Ranges,
    /// Writes past `limit`, checked once every older entry was seen: (seq, end).
    past_limit: Vec<(u64, u64)>,
    /// Resize entries past `limit`: (seq, size).
    grows: Vec<(u64, u64)>,
}

/// The newest-first overlay of a stream's entries onto fresh images (see the
/// module header). Feed it the entries newest first ([`Overlay::take`], one
/// segment at a time, segments newest first), then [`Overlay::finish`].
#[derive(Debug)]
pub struct Overlay {
    disks: BTreeMap<u16, OverlayDisk>,
    /// The last tag and sync/resync start taken.
    pub marks: StreamMarks,
    /// Whether the tag at the point being recovered was taken.
    pub saw_point_tag: bool,
    /// The oldest seq taken so far (entries must come newest first).
    oldest: u64,
}

impl Overlay {
    /// Disks by number, each with its largest known size.
    pub fn new(limits: impl IntoIterator<Item = (u16, u64)>) -> Overlay {
        Overlay {
            disks: limits
                .into_iter()
                .map(|(disk, limit)| {
                    let d = OverlayDisk {
                        limit,
                        extent: limit,
                        resized_to: None,
                        written: 0,
                        covered: Ranges::default(),
                        past_limit: Vec::new(),
                        grows: Vec::new(),
                    };
                    (disk, d)
                })
                .collect(),
            marks: StreamMarks::default(),
            saw_point_tag: false,
            oldest: u64::MAX,
        }
    }

    pub fn disk(&self, disk: u16) -> Option<&OverlayDisk> {
        self.disks.get(&disk)
    }

    /// What the entries taken cover on `disk` (written, zeroed or cut off
    /// by a shrink): everything but these ranges comes from the base.
    pub fn covered(&self, disk: u16) -> Vec<(u64, u64)> {
        self.disks
            .get(&disk)
            .map_or_else(Vec::new, |d| d.covered.iter().collect())
    }

    /// Takes `entries` (one segment's, in seq order) with `after < seq <= upto`,
    /// newest first, below every seq taken before; `put` gets each piece of
    /// write data not yet covered. `point` is the seq being recovered.
    pub fn take(
        &mut self,
        entries: &[Entry],
        after: u64,
        upto: u64,
        point: u64,
        put: &mut impl FnMut(Piece),
    ) -> Result<()> {
        let upto = upto.min(self.oldest.saturating_sub(1));
        for e in entries
            .iter()
            .rev()
            .filter(|e| e.seq > after && e.seq <= upto)
        {
            if e.seq >= self.oldest {
                bail!(
                    "seq {} comes after seq {} in the stream (entries out of order)",
                    e.seq,
                    self.oldest
                );
            }
            self.oldest = e.seq;
            match &e.op {
                Op::Write { disk, offset, data } => {
                    let d = self.overlay_disk(*disk, e.seq, *offset, data.len() as u64)?;
                    for (a, b) in d.covered.gaps(*offset, *offset + data.len() as u64) {
                        let at = (a - offset) as usize..(b - offset) as usize;
                        d.written += b - a;
                        put(Piece {
                            disk: *disk,
                            offset: a,
                            data: data.slice(at),
                        });
                    }
                    d.covered.add(*offset, *offset + data.len() as u64);
                }
                Op::Zero { disk, offset, len } => {
                    let d = self.overlay_disk(*disk, e.seq, *offset, *len as u64)?;
                    d.covered.add(*offset, *offset + *len as u64);
                }
                Op::Resize { disk, size } => {
                    let d = overlay_disk(&mut self.disks, *disk, e.seq)?;
                    d.resized_to.get_or_insert(*size);
                    // What an older entry put past the new end is gone: it
                    // reads as zeros if the disk grows again.
                    d.covered.add(*size, u64::MAX);
                    if *size > d.limit {
                        d.grows.push((e.seq, *size));
                        d.extent = d.extent.max(*size);
                    }
                }
                Op::Inconsistent { label } => {
                    if self.marks.last_inconsistent.is_none() {
                        self.marks.last_inconsistent = Some((e.seq, label.clone()));
                    }
                }
                Op::Tag { .. } => {
                    self.marks.last_tag = self.marks.last_tag.max(e.seq);
                    self.saw_point_tag |= e.seq == point;
                }
                // Checksums of an earlier point, hashes of blocks already
                // written: nothing to write.
                Op::Sums { .. } | Op::Hashes { .. } => {}
            }
        }
        Ok(())
    }

    /// A write's disk, its range checked: past the disk's largest size it is
    /// an error unless an older grow allowed it (checked in `finish`).
    fn overlay_disk(
        &mut self,
        disk: u16,
        seq: u64,
        offset: u64,
        len: u64,
    ) -> Result<&mut OverlayDisk> {
        let d = overlay_disk(&mut self.disks, disk, seq)?;
        let Some(end) = offset.checked_add(len) else {
            bail!(
                "seq {seq} writes {len} bytes at {offset} on disk #{disk}, beyond its size {}",
                d.limit
            );
        };
        if end > d.limit {
            d.past_limit.push((seq, end));
            d.extent = d.extent.max(end);
        }
        Ok(d)
    }

    /// The parts of `[start, end)` of `disk` that no entry taken covers.
    pub fn uncovered(&self, disk: u16, start: u64, end: u64) -> Vec<(u64, u64)> {
        self.disks
            .get(&disk)
            .map_or_else(|| vec![(start, end)], |d| d.covered.gaps(start, end))
    }

    /// Once every entry was taken: a write past a disk's largest size with no
    /// older grow to that size is the error `apply` would have given.
    pub fn finish(&self) -> Result<()> {
        for (disk, d) in &self.disks {
            for &(seq, end) in &d.past_limit {
                let limit = d
                    .grows
                    .iter()
                    .filter(|g| g.0 < seq)
                    .map(|g| g.1)
                    .fold(d.limit, u64::max);
                if end > limit {
                    bail!("seq {seq} writes past {limit} on disk #{disk}, beyond its size {limit}");
                }
            }
        }
        Ok(())
    }
}

fn overlay_disk(
    disks: &mut BTreeMap<u16, OverlayDisk>,
    disk: u16,
    seq: u64,
) -> Result<&mut OverlayDisk> {
    disks
        .get_mut(&disk)
        .ok_or_else(|| anyhow!("seq {seq} writes disk #{disk}, which machine.json does not list"))
}

fn target(targets: &mut BTreeMap<u16, Target>, disk: u16, seq: u64) -> Result<&mut Target> {
    targets
        .get_mut(&disk)
        .ok_or_else(|| anyhow!("seq {seq} writes disk #{disk}, which machine.json does not list"))
}

fn check_range(t: &Target, disk: u16, seq: u64, offset: u64, len: u64) -> Result<()> {
    if offset.checked_add(len).is_none_or(|end| end > t.limit) {
        bail!(
            "seq {seq} writes {len} bytes at {offset} on disk #{disk}, beyond its size {}",
            t.limit
        );
    }
    Ok(())
}

/// Makes a range of an image read as zeros (punching a hole where possible).
pub fn zero_range(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on a valid open descriptor with plain integer arguments.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let zeros = vec![0u8; (len as usize).min(1 << 20)];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_and_report_gaps() {
        let mut r = Ranges::default();
        r.add(10, 20);
        r.add(30, 40);
        r.add(20, 25); // adjacent: merged
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![(10, 25), (30, 40)]);
        r.add(5, 35); // swallows both
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![(5, 40)]);
        r.add(100, 110);
        assert_eq!(r.gaps(0, 120), vec![(0, 5), (40, 100), (110, 120)]);
        assert_eq!(r.gaps(6, 39), vec![]);
        assert_eq!(r.gaps(38, 101), vec![(40, 100)]);
        assert_eq!(
            r.touched(16).into_iter().collect::<Vec<_>>(),
            vec![0, 1, 2, 6]
        );
    }

    /// A seeded xorshift: `next(n)` is in `0..n` (0 for n = 0).
    fn seeded(mut state: u64) -> impl FnMut(u64) -> u64 {
        move |n| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n.max(1)
        }
    }

    /// The newest-first overlay against the oldest-first `apply` (the model):
    /// seeded random streams of odd-sized, overlapping writes, zeros, shrinks,
    /// grows (also past the largest known size) and tags on two disks over a
    /// base, cut into segments, recovered at a point inside the stream.
    #[test]
    fn overlay_matches_oldest_first_apply() {
        use crate::protocol::TagKind;
        use bytes::Bytes;
        let mut next = seeded(0x853c49e6748fea9b);
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut refused, mut resized) = (0, 0);
        for round in 0..300 {
            const LIMIT: u64 = 20_000;
            let base_seq = next(3) * 5;
            let bases: Vec<Vec<u8>> = (0..2)
                .map(|d| {
                    (0..LIMIT)
                        .map(|i| (i * 7 + d * 13 + round) as u8 | 1)
                        .collect()
                })
                .collect();
            let mut size = [LIMIT; 2];
            let n = 1 + next(60);
            let mut entries = Vec::new();
            for seq in base_seq + 1..=base_seq + n {
                let disk = next(2) as usize;
                let op = match next(10) {
                    0 => Op::Resize {
                        disk: disk as u16,
                        size: {
                            size[disk] = 1 + next(LIMIT * 3 / 2);
                            size[disk]
                        },
                    },
                    1 | 2 => {
                        let offset = next(size[disk]);
                        let len = 1 + next(size[disk] - offset).min(next(6000));
                        Op::Zero {
                            disk: disk as u16,
                            offset,
                            len: len as u32,
                        }
                    }
                    3 => Op::Tag {
                        kind: TagKind::Crash,
                        source: None,
                        time_ms: seq,
                        label: String::new(),
                    },
                    4 if next(40) == 0 => {
                        // Past the largest known size: an error unless an older grow allowed it.
                        let data = Bytes::from(vec![1u8; 1 + next(100) as usize]);
                        Op::Write {
                            disk: disk as u16,
                            offset: LIMIT + next(LIMIT / 4),
                            data,
                        }
                    }
                    _ => {
                        let offset = next(size[disk]);
                        let len = [1, 511, 4097, 1 + next(9000)][next(4) as usize]
                            .min(size[disk] - offset)
                            .max(1);
                        let data: Vec<u8> = (0..len).map(|i| (seq + i) as u8).collect();
                        Op::Write {
                            disk: disk as u16,
                            offset,
                            data: Bytes::from(data),
                        }
                    }
                };
                entries.push(Entry { seq, op });
            }
            let point = base_seq + 1 + next(n);
            // Segments: cut at random places.
            let mut cuts = vec![0usize];
            while *cuts.last().unwrap() < entries.len() {
                let at = cuts.last().unwrap() + 1 + next(8) as usize;
                cuts.push(at.min(entries.len()));
            }
            let segments: Vec<&[Entry]> = cuts.windows(2).map(|w| &entries[w[0]..w[1]]).collect();

            // The model: the base, then every segment oldest first.
            let mut targets = BTreeMap::new();
            for (d, base) in bases.iter().enumerate() {
                let path = dir.path().join(format!("{round}-{d}.raw"));
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&path)
                    .expect("create");
                file.write_all_at(base, 0).expect("base");
                targets.insert(d as u16, (Target::new(file, LIMIT, false), path));
            }
            let mut plain: BTreeMap<u16, Target> = targets
                .iter_mut()
                .map(|(d, (t, _))| (*d, Target::new(t.file.try_clone().unwrap(), LIMIT, false)))
                .collect();
            let mut model_err = None;
            let mut model_tag = false;
            let mut model_marks = StreamMarks::default();
            for seg in &segments {
                match apply(&mut plain, seg, base_seq, point, point) {
                    Ok((t, m)) => {
                        model_tag |= t;
                        model_marks.merge(m);
                    }
                    Err(e) => {
                        model_err = Some(e);
                        break;
                    }
                }
            }

            // The overlay: newest first into zeroed images, then the base.
            let mut overlay = Overlay::new((0..2).map(|d| (d as u16, LIMIT)));
            let mut images = vec![vec![0u8; LIMIT as usize * 2]; 2];
            let mut err = None;
            for seg in segments.iter().rev() {
                let r = overlay.take(seg, base_seq, point, point, &mut |p: Piece| {
                    let img = &mut images[p.disk as usize];
                    let at = p.offset as usize;
                    assert!(
                        img[at..at + p.data.len()].iter().all(|&b| b == 0),
                        "a byte written twice"
                    );
                    img[at..at + p.data.len()].copy_from_slice(&p.data);
                });
                if let Err(e) = r {
                    err = Some(e);
                    break;
                }
            }
            let err = err.or_else(|| overlay.finish().err());
            assert_eq!(
                err.is_some(),
                model_err.is_some(),
                "round {round}: {err:?} vs {model_err:?}"
            );
            if err.is_some() {
                refused += 1;
                continue;
            }
            resized += overlay
                .disks
                .values()
                .filter(|d| d.resized_to.is_some())
                .count();
            assert_eq!(overlay.saw_point_tag, model_tag, "round {round}");
            assert_eq!(
                overlay.marks.last_tag.max(base_seq),
                model_marks.last_tag.max(base_seq)
            );
            for d in 0..2u16 {
                for (a, b) in overlay.uncovered(d, 0, LIMIT) {
                    images[d as usize][a as usize..b as usize]
                        .copy_from_slice(&bases[d as usize][a as usize..b as usize]);
                }
                let t = &plain[&d];
                let final_size = overlay.disk(d).unwrap().resized_to.unwrap_or(LIMIT);
                assert_eq!(t.resized_to.unwrap_or(LIMIT), final_size, "round {round}");
                let mut want = std::fs::read(&targets[&d].1).expect("read");
                want.resize(final_size as usize, 0);
                let got = &images[d as usize][..final_size as usize];
                let first = want.iter().zip(got).position(|(a, b)| a != b);
                assert!(
                    first.is_none(),
                    "round {round} disk {d}: first difference at {first:?}"
                );
            }
        }
        // Both paths were walked.
        assert!(refused > 5 && refused < 100, "{refused} streams refused");
        assert!(resized > 100, "{resized} disks resized");
    }

    #[test]
    fn ranges_agree_with_a_byte_map() {
        // A seeded walk: every add/gaps answer matches a plain bitmap.
        let mut next = seeded(0x9e3779b97f4a7c15);
        let mut r = Ranges::default();
        let mut map = vec![false; 512];
        for _ in 0..300 {
            let a = next(500);
            let b = a + next(12);
            r.add(a, b);
            for m in &mut map[a as usize..b as usize] {
                *m = true;
            }
            let (s, e) = (next(256), 256 + next(256));
            let mut want = Vec::new();
            let mut i = s;
            while i < e {
                if !map[i as usize] {
                    let g = i;
                    while i < e && !map[i as usize] {
                        i += 1;
                    }
                    want.push((g, i));
                } else {
                    i += 1;
                }
            }
            assert_eq!(r.gaps(s, e), want);
        }
    }
}
