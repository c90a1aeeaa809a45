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
//!
//! Catalogue objects (`machine.json`, points, inconsistent marks, the owner
//! record) are JSON, authenticated (not encrypted):
//!
//! ```text
//! {"signed": 1, "record": "<the record's JSON, as a string>", "mac": "<64 hex>"}
//! mac = HMAC-SHA256(catalogue key, "lifeboat-catalogue-v1" 0x00 object-name 0x00 record)
//! catalogue key = HKDF-SHA256(data key, salt "lifeboat-catalogue-mac-v1")
//! ```
//!
//! The object name (relative to the store root) is bound into the MAC, so a
//! record cannot be moved to another name; an edited, unsigned or moved record
//! is refused with an error naming the object. Every id read from a record is
//! checked with [`crate::ids::validate_id`] before it can become a path.

use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use ring::{hkdf, hmac};

use crate::codec::{DecodeError, Reader, Writer};
use crate::formats::{self, DataKeyRecord, SegmentRecord};
use crate::protocol::{DiskInfo, Entry, TagKind};
use crate::seal::{self, Key, SealError};
use crate::store::{Store, StoreError};

pub const FORMAT_VERSION: u32 = 1;

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
    formats::seal::<SegmentRecord>(&p)
}

/// Decodes a segment and checks it is what its name says.
pub fn decode_segment(
    plain: &[u8],
    machine: &str,
    name: SegmentName,
) -> Result<Vec<Entry>, DecodeError> {
    let payload = formats::open::<SegmentRecord>(plain)?;
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

/// The key that authenticates a machine's catalogue objects, derived from its
/// data key (so whoever can read the machine's data can check its catalogue).
#[derive(Clone)]
pub struct CatalogueKey(hmac::Key);

impl std::fmt::Debug for CatalogueKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CatalogueKey(..)")
    }
}

const MAC_SALT: &[u8] = b"lifeboat-catalogue-mac-v1";
const MAC_DOMAIN: &[u8] = b"lifeboat-catalogue-v1";
/// The version of the signed wrapper.
pub const SIGNED_VERSION: u32 = 1;

impl CatalogueKey {
    pub fn derive(data_key: &Key) -> CatalogueKey {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, MAC_SALT).extract(data_key.as_bytes());
        let okm = prk
            .expand(&[b"catalogue"], hmac::HMAC_SHA256)
            .expect("the HMAC key length is a valid HKDF length");
        CatalogueKey(hmac::Key::from(okm))
    }

    fn message(object: &str, record: &[u8]) -> Vec<u8> {
        let mut m = Vec::with_capacity(MAC_DOMAIN.len() + object.len() + record.len() + 2);
        m.extend_from_slice(MAC_DOMAIN);
        m.push(0);
        m.extend_from_slice(object.as_bytes());
        m.push(0);
        m.extend_from_slice(record);
        m
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Signed {
    signed: u32,
    record: String,
    mac: String,
}

/// The signed JSON of `value`, to be stored as `object` (a name relative to
/// the store root).
pub fn sign_record<T: Serialize>(key: &CatalogueKey, object: &str, value: &T) -> Vec<u8> {
    let record = serde_json::to_string_pretty(value).expect("catalogue records serialise");
    let tag = hmac::sign(&key.0, &CatalogueKey::message(object, record.as_bytes()));
    let signed = Signed {
        signed: SIGNED_VERSION,
        record,
        mac: crate::hex(tag.as_ref()),
    };
    serde_json::to_vec_pretty(&signed).expect("the signed wrapper serialises")
}

/// Checks the MAC of the signed object `object` (read from `store`) and parses
/// its record.
pub fn open_record<T: serde::de::DeserializeOwned>(
    key: &CatalogueKey,
    store: &Store,
    object: &str,
    bytes: &[u8],
) -> Result<T, CatalogueError> {
    let invalid = |detail: String| CatalogueError::Invalid {
        object: store.describe(object),
        detail,
    };
    let signed: Signed = serde_json::from_slice(bytes).map_err(|e| {
        invalid(format!(
            "not a signed catalogue record ({e}); it was altered or written by an older version"
        ))
    })?;
    if signed.signed != SIGNED_VERSION {
        return Err(invalid(format!(
            "signed-record version {} (this build reads {SIGNED_VERSION})",
            signed.signed
        )));
    }
    let tag = crate::unhex::<32>(&signed.mac).ok_or_else(|| invalid("malformed MAC".into()))?;
    hmac::verify(
        &key.0,
        &CatalogueKey::message(object, signed.record.as_bytes()),
        &tag,
    )
    .map_err(|_| {
        invalid(
            "authentication failed: the record was altered, moved from another name, or signed with another machine's key; refusing to use it"
                .into(),
        )
    })?;
    serde_json::from_str(&signed.record).map_err(|e| invalid(e.to_string()))
}

/// Parses a signed record WITHOUT checking its MAC: for listings shown to a
/// person who gave no key, never for anything that writes disks.
pub fn open_record_unverified<T: serde::de::DeserializeOwned>(
    store: &Store,
    object: &str,
    bytes: &[u8],
) -> Result<T, CatalogueError> {
    let invalid = |detail: String| CatalogueError::Invalid {
        object: store.describe(object),
        detail,
    };
    let signed: Signed = serde_json::from_slice(bytes)
        .map_err(|e| invalid(format!("not a signed catalogue record ({e})")))?;
    serde_json::from_str(&signed.record).map_err(|e| invalid(e.to_string()))
}

/// Checks every id a machine record carries; the error names the object.
pub fn validate_machine_record(
    rec: &MachineRecord,
    store: &Store,
    object: &str,
) -> Result<(), CatalogueError> {
    let invalid = |detail: String| CatalogueError::Invalid {
        object: store.describe(object),
        detail,
    };
    crate::ids::validate_id("machine", &rec.machine).map_err(invalid)?;
    let mut seen = std::collections::BTreeSet::new();
    for d in &rec.disks {
        crate::ids::validate_id("disk", &d.id).map_err(invalid)?;
        if !seen.insert(d.id.as_str()) {
            return Err(invalid(format!("disk id {:?} is listed twice", d.id)));
        }
    }
    Ok(())
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
        &formats::seal::<DataKeyRecord>(data_key.as_bytes()),
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
    let payload =
        formats::open::<DataKeyRecord>(&plain).map_err(|source| CatalogueError::Decode {
            object: store.describe(&name),
            source,
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

pub async fn load_machine(
    store: &Store,
    key: &CatalogueKey,
    machine: &str,
) -> Result<MachineRecord, CatalogueError> {
    let name = machine_json(machine);
    let bytes = store
        .get(&name)
        .await?
        .ok_or_else(|| CatalogueError::Missing {
            object: store.describe(&name),
        })?;
    let rec: MachineRecord = open_record(key, store, &name, &bytes)?;
    if rec.format != FORMAT_VERSION || rec.machine != machine {
        return Err(CatalogueError::Invalid {
            object: store.describe(&name),
            detail: format!("format {} for machine {:?}", rec.format, rec.machine),
        });
    }
    validate_machine_record(&rec, store, &name)?;
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

/// The machine's points, authenticated, by seq; a point whose name and
/// content disagree is refused.
pub async fn list_points(
    store: &Store,
    key: Option<&CatalogueKey>,
    machine: &str,
) -> Result<Vec<PointRecord>, CatalogueError> {
    let mut out: Vec<(String, PointRecord)> =
        list_signed(store, key, &format!("{}/points/", machine_dir(machine))).await?;
    for (name, p) in &out {
        if *name != point_object(machine, p.seq) || p.id != point_id(p.seq) {
            return Err(CatalogueError::Invalid {
                object: store.describe(name),
                detail: format!("holds point {} at seq {}", p.id, p.seq),
            });
        }
        for d in &p.disks {
            crate::ids::validate_id("disk", &d.id).map_err(|detail| CatalogueError::Invalid {
                object: store.describe(name),
                detail,
            })?;
        }
    }
    out.sort_by_key(|(_, p)| p.seq);
    Ok(out.into_iter().map(|(_, p)| p).collect())
}

/// The `inconsistent/` records of a machine, authenticated, by seq.
pub async fn list_inconsistent(
    store: &Store,
    key: Option<&CatalogueKey>,
    machine: &str,
) -> Result<Vec<InconsistentRecord>, CatalogueError> {
    let mut out: Vec<(String, InconsistentRecord)> = list_signed(
        store,
        key,
        &format!("{}/inconsistent/", machine_dir(machine)),
    )
    .await?;
    for (name, m) in &out {
        if *name != inconsistent_object(machine, m.seq) {
            return Err(CatalogueError::Invalid {
                object: store.describe(name),
                detail: format!("holds the mark of seq {}", m.seq),
            });
        }
    }
    out.sort_by_key(|(_, m)| m.seq);
    Ok(out.into_iter().map(|(_, m)| m).collect())
}

/// Every `*.json` object under `dir`, authenticated (unless `key` is `None`:
/// listing for display only, never for recovery) and parsed, with its name.
async fn list_signed<T: serde::de::DeserializeOwned>(
    store: &Store,
    key: Option<&CatalogueKey>,
    dir: &str,
) -> Result<Vec<(String, T)>, CatalogueError> {
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
        let v = match key {
            Some(key) => open_record(key, store, &rel, &bytes)?,
            None => open_record_unverified(store, &rel, &bytes)?,
        };
        out.push((rel, v));
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
    fn signed_records_bind_content_name_and_key() {
        let store = Store::open(&crate::store::StoreConfig::new(format!(
            "file://{}",
            std::env::temp_dir().join("lifeboat-cat-test").display()
        )))
        .unwrap();
        let key = CatalogueKey::derive(&Key::from_bytes([7; 32]));
        let rec = InconsistentRecord {
            format: FORMAT_VERSION,
            seq: 9,
            label: "initial sync".into(),
        };
        let name = inconsistent_object("m", 9);
        let signed = sign_record(&key, &name, &rec);
        let back: InconsistentRecord = open_record(&key, &store, &name, &signed).unwrap();
        assert_eq!(back, rec);
        // Another name, another key, an edited record, a plain record: refused by name.
        let other = inconsistent_object("m", 10);
        let e = open_record::<InconsistentRecord>(&key, &store, &other, &signed).unwrap_err();
        assert!(e.to_string().contains(&other), "{e}");
        let k2 = CatalogueKey::derive(&Key::from_bytes([8; 32]));
        assert!(open_record::<InconsistentRecord>(&k2, &store, &name, &signed).is_err());
        let edited = String::from_utf8(signed.clone())
            .unwrap()
            .replace("initial sync", "initial-sync");
        assert!(open_record::<InconsistentRecord>(&key, &store, &name, edited.as_bytes()).is_err());
        let plain = serde_json::to_vec(&rec).unwrap();
        assert!(open_record::<InconsistentRecord>(&key, &store, &name, &plain).is_err());
    }

    #[test]
    fn machine_record_ids_are_checked() {
        let store = Store::open(&crate::store::StoreConfig::new(format!(
            "file://{}",
            std::env::temp_dir().join("lifeboat-cat-test").display()
        )))
        .unwrap();
        let mut rec = MachineRecord {
            format: FORMAT_VERSION,
            machine: "m".into(),
            disks: vec![DiskInfo::new("root", 4096)],
            stream_id: None,
            largest_sizes: vec![],
        };
        assert!(validate_machine_record(&rec, &store, "x").is_ok());
        for bad in ["../../x", "a/b", "", "ROOT"] {
            rec.disks[0].id = bad.into();
            assert!(validate_machine_record(&rec, &store, "x").is_err(), "{bad}");
        }
    }

    #[test]
    fn contiguity() {
        let s = |a, b| SegmentName { first: a, last: b };
        assert_eq!(contiguous_prefix(&[s(1, 4), s(5, 9), s(11, 12)]).0, 9);
        assert_eq!(contiguous_prefix(&[s(2, 4)]).0, 0);
        assert_eq!(contiguous_prefix(&[s(1, 4), s(1, 4), s(5, 5)]).0, 5);
    }
}
