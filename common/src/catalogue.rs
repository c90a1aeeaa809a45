//! The object-store layout of a protected machine and the formats of its objects.
//! The catalogue lives in the store itself, so recovery needs nothing else.
//!
//! ```text
//! machines/<machine>/
//!     machine.json                               identity, disks, format version
//!     keys/data-key.sealed                       data key sealed by the key-encryption key
//!     log/<first-seq:016x>-<last-seq:016x>.seg   sealed segment
//!     points/<seq:016x>.json                     recovery point
//!     inconsistent/<seq:016x>.json               the stream is not crash-consistent
//!                                                from this seq until the next point
//! ```
//!
//! Segment plaintext (before sealing; integers big-endian):
//!
//! ```text
//! envelope(magic b"LBSG", version 1) of
//!     machine str16 | first_seq u64 | last_seq u64 | count u32 | entry*
//! ```
//!
//! where the entries are the protocol's stream entries with consecutive seqs from
//! `first_seq` to `last_seq`. The data key object is `envelope(b"LBDK", 1)` of the
//! 32 key bytes, sealed with the key-encryption key.

use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::codec::{envelope, open_envelope, DecodeError, Reader, Writer};
use crate::protocol::{DiskInfo, Entry, TagKind};
use crate::seal::{self, Key, SealError};
use crate::store::{Store, StoreError};

pub const FORMAT_VERSION: u32 = 1;
const SEGMENT_MAGIC: [u8; 4] = *b"LBSG";
const SEGMENT_VERSION: u16 = 1;
const DATA_KEY_MAGIC: [u8; 4] = *b"LBDK";

pub fn machine_dir(machine: &str) -> String {
    format!("machines/{machine}")
}
pub fn machine_json(machine: &str) -> String {
    format!("machines/{machine}/machine.json")
}
pub fn data_key_object(machine: &str) -> String {
    format!("machines/{machine}/keys/data-key.sealed")
}
pub fn segment_object(machine: &str, first: u64, last: u64) -> String {
    format!("machines/{machine}/log/{first:016x}-{last:016x}.seg")
}
pub fn point_object(machine: &str, seq: u64) -> String {
    format!("machines/{machine}/points/{seq:016x}.json")
}

/// `machine.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct MachineRecord {
    pub format: u32,
    pub machine: String,
    pub disks: Vec<DiskInfo>,
    /// Hex of the stream id whose numbering the stored seqs follow (see
    /// `protocol.rs`); absent in records written before stream ids existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_id: Option<String>,
    /// Per disk (same order), the largest size it ever had: writes from
    /// before a shrink reach up to it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub largest_sizes: Vec<u64>,
}

impl MachineRecord {
    /// The largest size disk `i` ever had, as far as this record knows.
    pub fn largest(&self, i: usize) -> u64 {
        let now = self.disks.get(i).map(|d| d.size).unwrap_or(0);
        self.largest_sizes.get(i).copied().unwrap_or(0).max(now)
    }

    /// Raises the largest sizes with `other`'s (same disks) and the current ones.
    pub fn widen(&mut self, other: Option<&MachineRecord>) {
        let same = other.filter(|o| o.disks.len() == self.disks.len());
        self.largest_sizes = (0..self.disks.len())
            .map(|i| self.largest(i).max(same.map_or(0, |o| o.largest(i))))
            .collect();
    }
}

/// `points/<seq>.json`: a recovery point.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct PointRecord {
    pub format: u32,
    pub id: String,
    pub kind: TagKind,
    pub seq: u64,
    pub time_ms: u64,
    pub time: String,
    pub label: String,
    pub disks: Vec<DiskInfo>,
}

pub fn inconsistent_object(machine: &str, seq: u64) -> String {
    format!("machines/{machine}/inconsistent/{seq:016x}.json")
}

/// `inconsistent/<seq>.json`: an initial sync or resync began at `seq`; until
/// the next point the stream's prefixes are not crash-consistent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct InconsistentRecord {
    pub format: u32,
    pub seq: u64,
    pub label: String,
}

pub fn point_id(seq: u64) -> String {
    format!("{seq}")
}

pub fn format_time_ms(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| format!("{ms}ms"))
}

/// A segment's name, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SegmentName {
    pub first: u64,
    pub last: u64,
}

impl SegmentName {
    pub fn parse(file: &str) -> Option<SegmentName> {
        let stem = file.strip_suffix(".seg")?;
        let (a, b) = stem.split_once('-')?;
        if a.len() != 16 || b.len() != 16 {
            return None;
        }
        let first = u64::from_str_radix(a, 16).ok()?;
        let last = u64::from_str_radix(b, 16).ok()?;
        (first <= last).then_some(SegmentName { first, last })
    }
}

impl fmt::Display for SegmentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}-{:016x}.seg", self.first, self.last)
    }
}

pub fn encode_segment(machine: &str, entries: &[Entry]) -> Vec<u8> {
    let first = entries.first().map(|e| e.seq).unwrap_or(0);
    let last = entries.last().map(|e| e.seq).unwrap_or(0);
    let mut p = Vec::with_capacity(entries.iter().map(Entry::encoded_len).sum::<usize>() + 64);
    p.put_str16(machine);
    p.put_u64(first);
    p.put_u64(last);
    p.put_u32(entries.len() as u32);
    for e in entries {
        e.encode(&mut p);
    }
    envelope(SEGMENT_MAGIC, SEGMENT_VERSION, &p)
}

/// Decodes a segment and checks it is what its name says.
pub fn decode_segment(
    plain: &[u8],
    machine: &str,
    name: SegmentName,
) -> Result<Vec<Entry>, DecodeError> {
    let payload = open_envelope(plain, SEGMENT_MAGIC, SEGMENT_VERSION, "segment")?;
    let src = Bytes::copy_from_slice(payload);
    let mut r = Reader::new(&src);
    let m = r.str16("segment machine")?;
    let first = r.u64("segment first seq")?;
    let last = r.u64("segment last seq")?;
    let count = r.u32("segment count")?;
    if m != machine || first != name.first || last != name.last {
        return Err(DecodeError::Invalid {
            what: "segment header",
            detail: format!(
                "holds machine {m:?} seqs {first}..={last}, its name says {machine:?} {}..={}",
                name.first, name.last
            ),
        });
    }
    let mut out = Vec::with_capacity((count as usize).min(r.remaining() / 9));
    let mut expect = first;
    for _ in 0..count {
        let e = Entry::decode(&mut r, &src)?;
        if e.seq != expect {
            return Err(DecodeError::Invalid {
                what: "segment entries",
                detail: format!("expected seq {expect}, found {}", e.seq),
            });
        }
        expect += 1;
        out.push(e);
    }
    r.finish("segment")?;
    if expect != last + 1 {
        return Err(DecodeError::Invalid {
            what: "segment entries",
            detail: format!("entries end at {}, name says {last}", expect - 1),
        });
    }
    Ok(out)
}

/// Errors of reading the catalogue; each names the object concerned.
#[derive(Debug, thiserror::Error)]
pub enum CatalogueError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error("{object}: {source}")]
    Decode {
        object: String,
        #[source]
        source: DecodeError,
    },
    #[error("{object}: {detail}")]
    Invalid { object: String, detail: String },
    #[error("{object} is missing")]
    Missing { object: String },
}

pub fn seal_data_key(kek: &Key, machine: &str, data_key: &Key) -> Vec<u8> {
    seal::seal(
        kek,
        &data_key_object(machine),
        0,
        &envelope(DATA_KEY_MAGIC, 1, data_key.as_bytes()),
        0,
    )
}

pub fn open_data_key(
    kek: &Key,
    machine: &str,
    sealed: &[u8],
    store: &Store,
) -> Result<Key, CatalogueError> {
    let name = data_key_object(machine);
    let plain = seal::open(kek, &name, 0, sealed).map_err(|e| match e {
        SealError::Auth { .. } => CatalogueError::Invalid {
            object: store.describe(&name),
            detail: "cannot be opened with this key-encryption key (wrong key, or the object was altered)".into(),
        },
        other => other.into(),
    })?;
    let payload = open_envelope(&plain, DATA_KEY_MAGIC, 1, "data key").map_err(|source| {
        CatalogueError::Decode {
            object: store.describe(&name),
            source,
        }
    })?;
    let arr: [u8; 32] = payload.try_into().map_err(|_| CatalogueError::Invalid {
        object: store.describe(&name),
        detail: "data key is not 32 bytes".into(),
    })?;
    Ok(Key::from_bytes(arr))
}

/// Loads the machine's data key from the store.
pub async fn load_data_key(store: &Store, kek: &Key, machine: &str) -> Result<Key, CatalogueError> {
    let name = data_key_object(machine);
    let sealed = store
        .get(&name)
        .await?
        .ok_or_else(|| CatalogueError::Missing {
            object: store.describe(&name),
        })?;
    open_data_key(kek, machine, &sealed, store)
}

pub async fn load_machine(store: &Store, machine: &str) -> Result<MachineRecord, CatalogueError> {
    let name = machine_json(machine);
    let bytes = store
        .get(&name)
        .await?
        .ok_or_else(|| CatalogueError::Missing {
            object: store.describe(&name),
        })?;
    let rec: MachineRecord =
        serde_json::from_slice(&bytes).map_err(|e| CatalogueError::Invalid {
            object: store.describe(&name),
            detail: e.to_string(),
        })?;
    if rec.format != FORMAT_VERSION || rec.machine != machine {
        return Err(CatalogueError::Invalid {
            object: store.describe(&name),
            detail: format!("format {} for machine {:?}", rec.format, rec.machine),
        });
    }
    Ok(rec)
}

/// All segments of a machine, ordered by first seq.
pub async fn list_segments(
    store: &Store,
    machine: &str,
) -> Result<Vec<SegmentName>, CatalogueError> {
    let dir = format!("{}/log/", machine_dir(machine));
    let mut out = Vec::new();
    for (rel, _) in store.list(&dir).await? {
        let file = rel.rsplit('/').next().unwrap_or("");
        match SegmentName::parse(file) {
            Some(s) => out.push(s),
            None => {
                if !file.ends_with(".tmp") {
                    tracing::warn!("ignoring unexpected object {}", store.describe(&rel));
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The end of the stream that segments cover without a gap from seq 1, and the
/// segments that make it up.
pub fn contiguous_prefix(segments: &[SegmentName]) -> (u64, Vec<SegmentName>) {
    let mut end = 0u64;
    let mut used = Vec::new();
    for s in segments {
        if s.last <= end {
            continue; // already covered (a re-upload after a crash)
        }
        if s.first > end + 1 {
            break;
        }
        end = s.last;
        used.push(*s);
    }
    (end, used)
}

pub async fn list_points(store: &Store, machine: &str) -> Result<Vec<PointRecord>, CatalogueError> {
    let mut out: Vec<PointRecord> =
        list_json(store, &format!("{}/points/", machine_dir(machine))).await?;
    out.sort_by_key(|p| p.seq);
    Ok(out)
}

/// The `inconsistent/` records of a machine, by seq.
pub async fn list_inconsistent(
    store: &Store,
    machine: &str,
) -> Result<Vec<InconsistentRecord>, CatalogueError> {
    let mut out: Vec<InconsistentRecord> =
        list_json(store, &format!("{}/inconsistent/", machine_dir(machine))).await?;
    out.sort_by_key(|p| p.seq);
    Ok(out)
}

/// Every `*.json` object under `dir`, parsed.
async fn list_json<T: serde::de::DeserializeOwned>(
    store: &Store,
    dir: &str,
) -> Result<Vec<T>, CatalogueError> {
    let mut out = Vec::new();
    for (rel, _) in store.list(dir).await? {
        if !rel.ends_with(".json") {
            continue;
        }
        let bytes = store
            .get(&rel)
            .await?
            .ok_or_else(|| CatalogueError::Missing {
                object: store.describe(&rel),
            })?;
        out.push(
            serde_json::from_slice(&bytes).map_err(|e| CatalogueError::Invalid {
                object: store.describe(&rel),
                detail: e.to_string(),
            })?,
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Op;

    #[test]
    fn segment_round_trip_and_checks() {
        let entries: Vec<Entry> = (5..=7)
            .map(|s| Entry {
                seq: s,
                op: Op::Write {
                    disk: 0,
                    offset: s * 512,
                    data: Bytes::from(vec![s as u8; 512]),
                },
            })
            .collect();
        let enc = encode_segment("m", &entries);
        let name = SegmentName { first: 5, last: 7 };
        assert_eq!(decode_segment(&enc, "m", name).unwrap(), entries);
        assert!(decode_segment(&enc, "other", name).is_err());
        assert!(decode_segment(&enc, "m", SegmentName { first: 5, last: 8 }).is_err());
        assert!(decode_segment(&enc[..enc.len() - 1], "m", name).is_err());
        assert_eq!(SegmentName::parse(&name.to_string()), Some(name));
    }

    #[test]
    fn contiguity() {
        let s = |a, b| SegmentName { first: a, last: b };
        assert_eq!(contiguous_prefix(&[s(1, 4), s(5, 9), s(11, 12)]).0, 9);
        assert_eq!(contiguous_prefix(&[s(2, 4)]).0, 0);
        assert_eq!(contiguous_prefix(&[s(1, 4), s(1, 4), s(5, 5)]).0, 5);
    }
}
