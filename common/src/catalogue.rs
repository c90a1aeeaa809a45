//! The object-store layout of a protected machine and the formats of its objects.
//! The catalogue lives in the store itself, so recovery needs nothing else.
//!
//! ```text
//! machines/<machine>/
//!     machine.json                               identity, disks, format version
//!     keys/data-key.sealed                       data key sealed by the key-encryption key
//!     log/<first:016x>-<last:016x>-<epoch:016x>-<time-ms:016x>.seg
//!                                                sealed segment, written by the
//!                                                owner of that epoch; every entry
//!                                                was durable at time-ms (older
//!                                                names: `<first>-<last>-<epoch>.seg`,
//!                                                time unknown; `<first>-<last>.seg`:
//!                                                epoch 0, before epochs were named)
//!     points/<seq:016x>.json                     recovery point
//!     inconsistent/<seq:016x>.json               the stream is not crash-consistent
//!                                                from this seq until the next point
//!     epochs/<epoch:016x>.json                   a takeover: the owner of this epoch
//!                                                continued the stream after seq `after`
//!     failed-over.json                           the machine was failed over (written
//!                                                by `lifeboat-mt failover`, removed by
//!                                                the process server when the agent
//!                                                rebases; [`FailedOverRecord`])
//! ```
//!
//! Takeovers ([`EpochRecord`], `owner.rs`): a process server that takes a
//! machine over continues the stored stream after the end it found. The old
//! owner may still land one request after that (its ownership check and its
//! put are two requests), and its objects would then hold seqs the new owner
//! numbers anew. So every segment, point and mark names the owner epoch that
//! wrote it, and an object of an older epoch counts only up to the `after` of
//! every later takeover ([`Fences`]); a segment straddling it counts up to
//! there. Whatever lands late is ignored by every reader, never spliced in.
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
use crate::protocol::{DiskInfo, Entry, TagKind, TagSource};
use crate::seal::{self, Key, SealError};
use crate::store::{Store, StoreError};

pub const FORMAT_VERSION: u32 = 1;
/// The format `machine.json` is written in: 2 since segment names carry the
/// owner epoch (a reader that knows only format 1 would ignore those
/// segments; it refuses the record instead), 3 since they carry the time
/// their entries were durable. Formats 1 and 2 are still read.
pub const MACHINE_FORMAT: u32 = 3;

pub fn machine_dir(machine: &str) -> String {
    format!("machines/{machine}")
}
pub fn machine_json(machine: &str) -> String {
    format!("machines/{machine}/machine.json")
}
pub fn data_key_object(machine: &str) -> String {
    format!("machines/{machine}/keys/data-key.sealed")
}
pub fn segment_object(machine: &str, name: &SegmentName) -> String {
    format!("machines/{machine}/log/{name}")
}
pub fn epoch_object(machine: &str, epoch: u64) -> String {
    format!("machines/{machine}/epochs/{epoch:016x}.json")
}
pub fn point_object(machine: &str, seq: u64) -> String {
    format!("machines/{machine}/points/{seq:016x}.json")
}
pub fn failed_over_object(machine: &str) -> String {
    format!("machines/{machine}/failed-over.json")
}

/// `failed-over.json`: a failover (not a drill) recovered the machine at
/// `point`, or a reprotect of that failover is about to write its original
/// disks (`by`). From then on the machine's disks may be written by something its
/// agent's journal does not describe (a failback applies the recovered
/// side's writes to them), so the process server does not let the agent
/// resume that journal: the next session rebases (a checksum resync of every
/// disk against the stored replica), and the record is removed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct FailedOverRecord {
    pub format: u32,
    /// `failover` or `reprotect`: the command that wrote it.
    pub by: String,
    /// The point's id and seq.
    pub point: String,
    pub seq: u64,
    pub at_ms: u64,
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
    /// The owner epoch that recorded it (0: recorded before epochs were kept).
    #[serde(default)]
    pub epoch: u64,
    /// How an app-consistent point was made (`fsfreeze`, `script`, `vss`);
    /// absent on crash-consistent points and on points recorded before
    /// sources were kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<TagSource>,
    /// The churn since the previous point (`churn.rs`); absent on points
    /// recorded before it was kept, and on the first point after a process
    /// server restart (the churn before it was not counted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub churn: Option<crate::churn::Churn>,
}

impl PointRecord {
    /// The source as listings show it: `-` when the point has none.
    pub fn source_str(&self) -> &'static str {
        self.source.map_or("-", TagSource::as_str)
    }
}

pub fn sums_object(machine: &str, point: u64) -> String {
    format!("machines/{machine}/sums/{point:016x}.json")
}

/// `sums/<point seq>.json`: each disk's checksum (`disksum.rs`) at a point,
/// as the agent hashed its disks there. Written when the stream's SUMS
/// entry (seq `seq`, after the point's tag) is uploaded; a point without one
/// (hashing skipped or still running, older versions) has no record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct SumsRecord {
    pub format: u32,
    pub point: u64,
    pub seq: u64,
    pub disks: Vec<DiskChecksum>,
    #[serde(default)]
    pub epoch: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct DiskChecksum {
    pub id: String,
    pub size: u64,
    /// `lifeboat-disk-v1`, lower-case hex.
    pub sum: String,
}

impl SumsRecord {
    /// The checksum of disk `id`, if the record holds one.
    pub fn disk(&self, id: &str) -> Option<&DiskChecksum> {
        self.disks.iter().find(|d| d.id == id)
    }
}

/// The points that have a checksums record, by their seq, from one listing
/// of `sums/` (not authenticated: for listings and for deleting).
pub async fn list_sums_points(
    store: &Store,
    machine: &str,
) -> Result<std::collections::BTreeSet<u64>, CatalogueError> {
    let dir = format!("{}/sums/", machine_dir(machine));
    Ok(store
        .list(&dir)
        .await?
        .into_iter()
        .filter_map(|(name, _)| {
            let f = name.strip_prefix(&dir)?.strip_suffix(".json")?;
            u64::from_str_radix(f, 16).ok()
        })
        .collect())
}

/// The checksums recorded for the point at `point`, authenticated; `None`
/// when none were recorded (or the record of an epoch a takeover fenced).
pub async fn load_sums(
    store: &Store,
    key: &CatalogueKey,
    machine: &str,
    point: u64,
    fences: &Fences,
) -> Result<Option<SumsRecord>, CatalogueError> {
    let name = sums_object(machine, point);
    let Some(bytes) = store.get(&name).await? else {
        return Ok(None);
    };
    let rec: SumsRecord = open_record(key, store, &name, &bytes)?;
    if rec.point != point || rec.seq <= point {
        return Err(CatalogueError::Invalid {
            object: store.describe(&name),
            detail: format!(
                "holds the checksums of point {} (entry {})",
                rec.point, rec.seq
            ),
        });
    }
    Ok(fences.counts(rec.epoch, rec.seq).then_some(rec))
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
    /// The owner epoch that recorded it (0: recorded before epochs were kept).
    #[serde(default)]
    pub epoch: u64,
}

/// `epochs/<epoch>.json`: the owner of `epoch` took the machine over and
/// continued the stream after seq `after` (the stored end it found). Objects
/// of older epochs beyond `after` are not part of the stream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct EpochRecord {
    pub format: u32,
    pub epoch: u64,
    pub after: u64,
    /// The server that took over (for the operator).
    pub server: String,
}

/// Every takeover of a machine: how far each epoch's objects count.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fences(Vec<EpochRecord>);

impl Fences {
    pub fn new(mut records: Vec<EpochRecord>) -> Fences {
        records.sort_by_key(|r| r.epoch);
        Fences(records)
    }

    pub fn records(&self) -> &[EpochRecord] {
        &self.0
    }

    /// The last seq an object written at `epoch` may hold: the smallest
    /// `after` of the takeovers that came after it (`u64::MAX`: none did).
    pub fn limit(&self, epoch: u64) -> u64 {
        self.0
            .iter()
            .filter(|r| r.epoch > epoch)
            .map(|r| r.after)
            .min()
            .unwrap_or(u64::MAX)
    }

    /// Whether a point or mark at `seq` recorded at `epoch` belongs to the stream.
    pub fn counts(&self, epoch: u64, seq: u64) -> bool {
        seq <= self.limit(epoch)
    }
}

pub fn point_id(seq: u64) -> String {
    format!("{seq}")
}

pub fn format_time_ms(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| format!("{ms}ms"))
}

/// A segment's name, parsed: its seqs, the owner epoch that wrote it, and
/// when its entries were all durable on the process server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SegmentName {
    pub first: u64,
    pub last: u64,
    /// 0 for a name without an epoch (written before epochs were named).
    pub epoch: u64,
    /// Milliseconds since the Unix epoch at which every entry of the segment
    /// was durable on the process server (at or a little after the last
    /// one's acknowledgement); 0: not recorded (older names). The name is
    /// authenticated: it is the seal's associated data.
    pub time_ms: u64,
}

impl SegmentName {
    pub fn new(first: u64, last: u64, epoch: u64) -> SegmentName {
        SegmentName {
            first,
            last,
            epoch,
            time_ms: 0,
        }
    }

    pub fn with_time(self, time_ms: u64) -> SegmentName {
        SegmentName { time_ms, ..self }
    }

    pub fn parse(file: &str) -> Option<SegmentName> {
        let stem = file.strip_suffix(".seg")?;
        let mut parts = stem.split('-');
        let mut hex = || {
            parts
                .next()
                .filter(|p| p.len() == 16)
                .and_then(|p| u64::from_str_radix(p, 16).ok())
        };
        let (first, last) = (hex()?, hex()?);
        // An epoch or time that is present is never 0 (0 means absent): one
        // name per segment.
        let mut opt = || match parts.next() {
            None => Some(0),
            Some(p) if p.len() == 16 => u64::from_str_radix(p, 16).ok().filter(|v| *v > 0),
            Some(_) => None,
        };
        let (epoch, time_ms) = (opt()?, opt()?);
        if parts.next().is_some() || first > last || (time_ms > 0 && epoch == 0) {
            return None;
        }
        Some(SegmentName {
            first,
            last,
            epoch,
            time_ms,
        })
    }
}

impl fmt::Display for SegmentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.epoch == 0 {
            write!(f, "{:016x}-{:016x}.seg", self.first, self.last)
        } else if self.time_ms == 0 {
            write!(
                f,
                "{:016x}-{:016x}-{:016x}.seg",
                self.first, self.last, self.epoch
            )
        } else {
            write!(
                f,
                "{:016x}-{:016x}-{:016x}-{:016x}.seg",
                self.first, self.last, self.epoch, self.time_ms
            )
        }
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

/// Fetches an object that must exist: a missing one is
/// [`CatalogueError::Missing`], naming it.
pub async fn get_required(store: &Store, name: &str) -> Result<bytes::Bytes, CatalogueError> {
    store
        .get(name)
        .await?
        .ok_or_else(|| CatalogueError::Missing {
            object: store.describe(name),
        })
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
    let sealed = get_required(store, &name).await?;
    open_data_key(kek, machine, &sealed, store)
}

pub async fn load_machine(
    store: &Store,
    key: &CatalogueKey,
    machine: &str,
) -> Result<MachineRecord, CatalogueError> {
    let name = machine_json(machine);
    let bytes = get_required(store, &name).await?;
    let rec: MachineRecord = open_record(key, store, &name, &bytes)?;
    if !(1..=MACHINE_FORMAT).contains(&rec.format) || rec.machine != machine {
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
    Ok(list_segments_sized(store, machine)
        .await?
        .into_iter()
        .map(|(s, _)| s)
        .collect())
}

/// The machine's segments with their stored (sealed) sizes, by name.
pub async fn list_segments_sized(
    store: &Store,
    machine: &str,
) -> Result<Vec<(SegmentName, u64)>, CatalogueError> {
    let dir = format!("{}/log/", machine_dir(machine));
    let mut out = Vec::new();
    for (rel, size) in store.list(&dir).await? {
        let file = rel.rsplit('/').next().unwrap_or("");
        match SegmentName::parse(file) {
            Some(s) => out.push((s, size)),
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

/// A segment of the stream and the last seq of it that counts (below its
/// `last` when a later takeover fenced its epoch there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub name: SegmentName,
    pub upto: u64,
}

/// What the stored segments make of the stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prefix {
    /// The end of the stream that segments cover without a gap from the
    /// start (seq 1, or just after the base the stream starts from).
    pub end: u64,
    /// The segments that make it up, by first seq.
    pub spans: Vec<Span>,
    /// The first seq of the next counted segment after a gap, if any.
    pub after_gap: Option<u64>,
}

/// The stream the segments cover without a gap after `start` (0, or the seq
/// of the base the stream starts from: segments wholly at or below it are
/// folded into it), each segment counted up to its epoch's fence (see the
/// module header).
pub fn contiguous_prefix(segments: &[SegmentName], fences: &Fences, start: u64) -> Prefix {
    let mut sorted: Vec<Span> = segments
        .iter()
        .map(|s| Span {
            name: *s,
            upto: s.last.min(fences.limit(s.epoch)),
        })
        .filter(|s| s.upto >= s.name.first)
        .collect();
    sorted.sort_by_key(|s| (s.name.first, s.upto, s.name.epoch));
    let mut p = Prefix {
        end: start,
        ..Prefix::default()
    };
    for s in sorted {
        if s.upto <= p.end {
            continue; // already covered (a re-upload after a crash)
        }
        if s.name.first > p.end + 1 {
            p.after_gap = Some(s.name.first);
            break;
        }
        p.end = s.upto;
        p.spans.push(s);
    }
    p
}

/// The machine's takeover records, authenticated (`key` `None`: display only).
pub async fn list_fences(
    store: &Store,
    key: Option<&CatalogueKey>,
    machine: &str,
) -> Result<Fences, CatalogueError> {
    let recs: Vec<(String, EpochRecord)> = list_signed(
        store,
        key,
        &format!("{}/epochs/", machine_dir(machine)),
        false,
    )
    .await?;
    for (name, r) in &recs {
        if *name != epoch_object(machine, r.epoch) {
            return Err(CatalogueError::Invalid {
                object: store.describe(name),
                detail: format!("holds the takeover record of epoch {}", r.epoch),
            });
        }
    }
    Ok(Fences::new(recs.into_iter().map(|(_, r)| r).collect()))
}

/// The machine's points, authenticated, by seq; a point whose name and
/// content disagree is refused.
pub async fn list_points(
    store: &Store,
    key: Option<&CatalogueKey>,
    machine: &str,
    fences: &Fences,
) -> Result<Vec<PointRecord>, CatalogueError> {
    let mut out: Vec<(String, PointRecord)> = list_signed(
        store,
        key,
        &format!("{}/points/", machine_dir(machine)),
        true,
    )
    .await?;
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
    Ok(out
        .into_iter()
        .map(|(_, p)| p)
        .filter(|p| fences.counts(p.epoch, p.seq))
        .collect())
}

/// The `inconsistent/` records of a machine, authenticated, by seq.
pub async fn list_inconsistent(
    store: &Store,
    key: Option<&CatalogueKey>,
    machine: &str,
    fences: &Fences,
) -> Result<Vec<InconsistentRecord>, CatalogueError> {
    let mut out: Vec<(String, InconsistentRecord)> = list_signed(
        store,
        key,
        &format!("{}/inconsistent/", machine_dir(machine)),
        true,
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
    Ok(out
        .into_iter()
        .map(|(_, m)| m)
        .filter(|m| fences.counts(m.epoch, m.seq))
        .collect())
}

/// Every `*.json` object under `dir`, authenticated (unless `key` is `None`:
/// listing for display only, never for recovery) and parsed, with its name.
/// An object deleted between the listing and its read is left out when
/// `vanish_ok` (retention deletes points, marks and bases), else an error.
pub(crate) async fn list_signed<T: serde::de::DeserializeOwned>(
    store: &Store,
    key: Option<&CatalogueKey>,
    dir: &str,
    vanish_ok: bool,
) -> Result<Vec<(String, T)>, CatalogueError> {
    let mut out = Vec::new();
    for (rel, _) in store.list(dir).await? {
        if !rel.ends_with(".json") {
            continue;
        }
        let Some(bytes) = store.get(&rel).await? else {
            if vanish_ok {
                continue; // deleted by retention since the listing
            }
            return Err(CatalogueError::Missing {
                object: store.describe(&rel),
            });
        };
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
        let name = SegmentName::new(5, 7, 3);
        assert_eq!(decode_segment(&enc, "m", name).unwrap(), entries);
        assert!(decode_segment(&enc, "other", name).is_err());
        assert!(decode_segment(&enc, "m", SegmentName::new(5, 8, 3)).is_err());
        assert!(decode_segment(&enc[..enc.len() - 1], "m", name).is_err());
        assert_eq!(SegmentName::parse(&name.to_string()), Some(name));
        assert_eq!(
            name.to_string(),
            "0000000000000005-0000000000000007-0000000000000003.seg"
        );
        // Names written before epochs were named are epoch 0.
        let old = SegmentName::parse("0000000000000005-0000000000000007.seg").unwrap();
        assert_eq!(old, SegmentName::new(5, 7, 0));
        assert_eq!(old.to_string(), "0000000000000005-0000000000000007.seg");
        // Names with the time their entries were durable.
        let timed = name.with_time(0x1234);
        assert_eq!(
            timed.to_string(),
            "0000000000000005-0000000000000007-0000000000000003-0000000000001234.seg"
        );
        assert_eq!(SegmentName::parse(&timed.to_string()), Some(timed));
        for bad in [
            "0000000000000007-0000000000000005.seg",
            "5-7.seg",
            "0000000000000005-0000000000000007-3.seg",
            "0000000000000005-0000000000000007-0000000000000000-0000000000000001.seg",
            "0000000000000005-0000000000000007-0000000000000000.seg",
            "0000000000000005-0000000000000007-0000000000000003-0000000000000000.seg",
            "0000000000000005-0000000000000007-0000000000000003-0000000000000001-0000000000000001.seg",
        ] {
            assert_eq!(SegmentName::parse(bad), None, "{bad}");
        }
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
            epoch: 1,
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
        let s = |a, b| SegmentName::new(a, b, 1);
        let none = Fences::default();
        let end = |segs: &[SegmentName]| contiguous_prefix(segs, &none, 0).end;
        assert_eq!(end(&[s(1, 4), s(5, 9), s(11, 12)]), 9);
        assert_eq!(
            contiguous_prefix(&[s(1, 4), s(5, 9), s(11, 12)], &none, 0).after_gap,
            Some(11)
        );
        assert_eq!(end(&[s(2, 4)]), 0);
        assert_eq!(end(&[s(1, 4), s(1, 4), s(5, 5)]), 5);
    }

    /// A takeover at seq 9 (epoch 2): epoch-1 objects beyond 9 landed late
    /// and are not part of the stream, whatever their names.
    #[test]
    fn a_late_segment_of_the_old_owner_is_not_spliced_in() {
        let fences = Fences::new(vec![EpochRecord {
            format: FORMAT_VERSION,
            epoch: 2,
            after: 9,
            server: "b".into(),
        }]);
        let old = |a, b| SegmentName::new(a, b, 1);
        let new = |a, b| SegmentName::new(a, b, 2);
        // The old owner's [10..12] sorts before the new owner's [10..20].
        let p = contiguous_prefix(&[old(1, 9), old(10, 12), new(10, 20)], &fences, 0);
        assert_eq!(p.end, 20);
        assert_eq!(
            p.spans.iter().map(|s| s.name).collect::<Vec<_>>(),
            vec![old(1, 9), new(10, 20)]
        );
        // A straddling old segment counts up to the fence only.
        let p = contiguous_prefix(&[old(1, 5), old(6, 14), new(10, 11)], &fences, 0);
        assert_eq!(p.end, 11);
        assert_eq!(
            p.spans[1],
            Span {
                name: old(6, 14),
                upto: 9
            }
        );
        // Without the new owner's segment the stream ends at the fence.
        assert_eq!(
            contiguous_prefix(&[old(1, 9), old(10, 12)], &fences, 0).end,
            9
        );
        // Legacy names (epoch 0) are older than every takeover.
        let legacy = SegmentName::new(10, 12, 0);
        assert_eq!(contiguous_prefix(&[old(1, 9), legacy], &fences, 0).end, 9);
        // Points and marks: the same rule.
        assert!(fences.counts(1, 9) && !fences.counts(1, 10));
        assert!(fences.counts(2, 10) && fences.counts(0, 3) && !fences.counts(0, 12));
        // A second takeover fences both older epochs at its own point.
        let two = Fences::new(vec![
            fences.records()[0].clone(),
            EpochRecord {
                format: FORMAT_VERSION,
                epoch: 3,
                after: 15,
                server: "c".into(),
            },
        ]);
        assert_eq!(two.limit(1), 9);
        assert_eq!(two.limit(2), 15);
        assert_eq!(two.limit(3), u64::MAX);
    }

    #[test]
    fn a_point_without_a_source_reads_and_one_with_it_round_trips() {
        // A point recorded before sources were kept.
        let old = r#"{"format":1,"id":"p-1","kind":"crash","seq":1,"time-ms":5,
            "time":"t","label":"","disks":[{"id":"root","size":4096}],"epoch":1}"#;
        let p: PointRecord = serde_json::from_str(old).unwrap();
        assert_eq!((p.source, p.source_str()), (None, "-"));
        assert!(!serde_json::to_string(&p).unwrap().contains("source"));
        let app = PointRecord {
            kind: TagKind::App,
            source: Some(TagSource::Vss),
            ..p
        };
        let text = serde_json::to_string(&app).unwrap();
        assert!(text.contains(r#""source":"vss""#), "{text}");
        let back: PointRecord = serde_json::from_str(&text).unwrap();
        assert_eq!((back.source_str(), back), ("vss", app));
    }
}
