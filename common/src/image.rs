//! Applying stream entries to disk images (sparse files): shared by the
//! master target's failover and the process server's fold into a base.
//!
//! Entries are applied in seq order, each seq once; a write outside a disk's
//! largest size, or to a disk the machine does not list, is an error naming
//! the seq. A shrink zeroes what lies past the new end (it reads as zeros if
//! the disk grows again). Optionally each target records the byte ranges the
//! entries covered ([`Ranges`]), so that the fold knows which chunks changed
//! and which bytes of them still come from the older base.

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
            // Checksums of an earlier point: nothing to write.
            Op::Sums { .. } => {}
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

    #[test]
    fn ranges_agree_with_a_byte_map() {
        // A seeded walk: every add/gaps answer matches a plain bitmap.
        let mut state = 0x9e3779b97f4a7c15u64;
        let mut next = |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
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
