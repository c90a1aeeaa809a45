//! The agent ↔ receiver wire protocol: frames and stream entries. No I/O here.
//!
//! Every frame on the wire (inside TLS) is
//!
//! ```text
//! offset size field
//! 0      4    length   bytes that follow (type + body), at most MAX_FRAME_LEN
//! 4      1    type     1 hello, 2 welcome, 3 writes, 4 tag, 5 ack, 6 error, 7 ping,
//!                      checksum resync: 8 resync-start, 9 region-hashes,
//!                      10 regions-differ, 11 block-hashes, 12 blocks-differ,
//!                      13 resync-done,
//!                      consistency groups (protocol 5): 14 group-prepare,
//!                      15 group-prepared, 16 group-commit, 17 group-committed,
//!                      18 group-release, 19 group-quiesce, 20 group-quiesced
//! 5      n    body
//! 5      n    body
//! ```
//!
//! Bodies (integers big-endian, `str16` = u16 length + UTF-8):
//!
//! ```text
//! hello   magic b"LBOT" | min_version u16 | max_version u16 | machine str16
//!         | disk_count u16 | { disk_id str16 | size u64 | flags u8 }* | stream_id [16]
//!         (flags from version 3: bit 0 = retired; a disk's position in the
//!         list is its number in stream entries, stable for its id)
//! welcome version u16 | durable u64 | max_frame u32 | stream_id [16]
//! writes  count u32 | entry*          (entries with consecutive seqs)
//! tag     entry                       (an entry whose op is TAG)
//! ack     durable u64                 (every seq <= durable is durable)
//! error   code u16 | message str16
//! ping    nonce u64 | is_reply u8
//! ```
//!
//! The *stream id* names one numbering of the machine's stream: the agent makes
//! one with a fresh journal, the receiver keeps the first it saw and returns it
//! in the welcome. A hello with another id (the agent lost its state) gets a
//! welcome whose id differs: the receiver then refuses entries until the agent
//! has rebased its numbering on `durable` and adopted that id.
//!
//! Checksum resync (geometry and hashes in `resync.rs`: 4 KiB blocks, 1 MiB
//! regions, 16-byte region hashes, 8-byte block hashes on the wire). The
//! receiver starts it; every agent frame gets exactly one reply, in order; the
//! differing blocks travel as ordinary writes entries, so they keep their seqs:
//!
//! ```text
//! resync-start   (receiver → agent) count u16 | disk u16*      (≤ 1024 disks)
//! region-hashes  (agent → receiver) disk u16 | first_region u64 | count u32
//!                | hash[16]*count                              (≤ 65536 regions)
//! regions-differ (receiver → agent) disk u16 | first_region u64 | count u32
//!                | region u64*count        (regions of that batch that differ)
//! block-hashes   (agent → receiver) disk u16 | region u64 | count u16
//!                | hash[8]*count                               (≤ 256 blocks)
//! blocks-differ  (receiver → agent) disk u16 | region u64 | count u16
//!                | block u8*count          (indexes in the region that differ)
//! resync-done    (agent → receiver) disk_count u16 | hashed_bytes u64
//!                | hash_bytes u64 | block_bytes u64 | blocks u64 | tag_seq u64
//!                | error str16             (tag_seq 0: no point; error "" = ok)
//! ```
//!
//! Consistency groups (protocol 5; `process-server/src/groups.rs` runs them).
//! The receiver prepares every member of a group, commits each once all
//! are held, then releases; `id` names one attempt (the group point id):
//!
//! ```text
//! group-prepare   (receiver → agent) id u64 | hold_ms u32 | group str16
//!                 (hold new writes, drain those in flight; the agent releases
//!                 by itself after hold_ms, which it caps at its own bound)
//! group-prepared  (agent → receiver) id u64 | error str16   (error "" = held)
//! group-commit    (receiver → agent) id u64 | label str16
//!                 (place the group tag under the hold, then release it)
//! group-committed (agent → receiver) id u64 | seq u64 | error str16
//!                 (seq of the tag; 0 and an error when none was placed)
//! group-release   (receiver → agent) id u64  (end the hold of `id`, if any,
//!                 then thaw what a group-quiesce of `id` froze)
//! group-quiesce   (receiver → agent) id u64 | quiesce_ms u32 | hold_ms u32
//!                 | group str16
//!                 (an app-consistent group point, before its group-prepare:
//!                 quiesce with the agent's own [app] quiescer — pre-freeze
//!                 scripts, freeze — within quiesce_ms; stay quiesced until the
//!                 commit or release of `id`, at most quiesce_ms + hold_ms)
//! group-quiesced  (agent → receiver) id u64 | source u8 | error str16
//!                 (source as in op=6, 0 with an error; error "" = quiesced)
//! ```
//!
//! A commit of a quiesced `id` places an `app` tag with that source (op=6)
//! instead of a `group` tag. Frames 19–20 came with app-consistent group
//! points, still at protocol 5 (before any release): an agent of an earlier
//! protocol-5 build ends its session on a group-quiesce, and the app group
//! point fails naming it; crash group points are unchanged.
//!
//! Only a session negotiated at version 5 or later gets group frames; the
//! group tag itself is an ordinary op=3 entry of kind group, so no stored
//! format changes.
//!
//! A stream *entry* — also the unit stored in the process server's cache and in
//! segments — is
//!
//! ```text
//! seq u64 | op u8 | op=1 WRITE  disk u16 | offset u64 | len u32 | data[len]
//!                 | op=2 ZERO   disk u16 | offset u64 | len u32   (trim / write-zeroes:
//!                 |                                               the range reads as zeros)
//!                 | op=3 TAG    kind u8 | time_ms u64 | label str16
//!                 | op=4 RESIZE disk u16 | size u64              (the disk has this size
//!                 |                                               from this seq on)
//!                 | op=5 INCONSISTENT label str16                (from this seq until the
//!                 |                    next tag the replica is not crash-consistent:
//!                 |                    a sync or resync is under way)
//!                 | op=6 TAG_SOURCED kind u8 | source u8 | time_ms u64 | label str16
//!                 |                    (protocol 4: a tag that says how the point was
//!                 |                    made; source 1 fsfreeze, 2 script, 3 vss)
//!                 | op=7 SUMS   point u64 | count u16 | { disk u16 | size u64
//!                 |                    | sum[32] }*count               (≤ 1024 disks)
//!                 |                    (protocol 6: each disk's checksum at the
//!                 |                    earlier tag `point`, `disksum.rs`)
//!                 | op=8 HASHES disk u16 | count u16 | { block u64
//!                 |                    | before[16] | after[16] }*count  (≤ 256 blocks)
//!                 |                    (protocol 8: XXH3-128 of the 4 KiB blocks the
//!                 |                    write before covered in part, on the agent's
//!                 |                    disk before and after that write)
//! ```
//!
//! A tag without a source (every crash-consistent tag) is still written as
//! op=3, byte for byte as before, so journals, caches and segments written
//! before protocol 4 read unchanged; op=6 is only written for a tag with a
//! source. A session negotiated at version 3 carries such a tag as op=3
//! ([`Frame::for_version`]): the point stays, its source is dropped.
//!
//! The agent hashes the chunks a point needs after placing its tag, while
//! writes go on, and sends the result as a later SUMS entry with its own seq.
//! A session negotiated below version 6 carries it as a zero of 0 bytes on
//! disk 0 (the seq stays, the checksums are dropped; nothing changes on disk).
//! A HASHES entry is carried the same way below version 8: the blocks it
//! names stay unknown to the receiver, and a checksum resync resends them.
//!
//! Decoding is fallible everywhere: a frame whose claimed length exceeds the bound
//! is refused before any buffer of that size is allocated.

use bytes::Bytes;

use crate::codec::{DecodeError, Reader, Writer};

/// Protocol versions this build speaks.
/// Version 2 added the stream id (hello, welcome), the resize and the
/// inconsistent entries; version 3 the hello's per-disk flags (retired disks:
/// a disk's number, its position in the hello, is stable for its id);
/// version 4 the tag's source (op=6, [`TagSource`]); version 5 the
/// consistency-group frames (group-prepare … group-release); version 6 the
/// per-point disk checksums (op=7); version 7 the planned failover's final
/// point (final-point, final-point-taken); version 8 the XXH3-128 block and
/// region hashes of checksum resync (`resync::HashScheme`) and the hashes
/// entry (op=8) of blocks a write covered in part.
pub const PROTOCOL_MIN: u16 = 3;
pub const PROTOCOL_MAX: u16 = 8;
/// The first version whose tags carry their source.
pub const PROTOCOL_TAG_SOURCE: u16 = 4;
/// The first version that takes part in consistency groups.
pub const PROTOCOL_GROUPS: u16 = 5;
/// The first version whose streams carry disk checksums (op=7).
pub const PROTOCOL_SUMS: u16 = 6;
/// The first version that takes a planned failover's final point.
pub const PROTOCOL_FINAL: u16 = 7;
/// The first version whose checksum-resync hashes are XXH3-128.
pub const PROTOCOL_XXH3: u16 = 8;
/// The most disks one SUMS entry lists.
pub const MAX_SUM_DISKS: usize = 1024;
/// The most blocks one HASHES entry lists (a write has two edges).
pub const MAX_HASH_BLOCKS: usize = 256;
pub const HELLO_MAGIC: [u8; 4] = *b"LBOT";

/// The largest write, defined once for the whole data path: the NBD export
/// advertises and accepts it (`agent::capture::nbd::MAX_REQUEST_LEN`), one stream
/// entry carries it, the journal stores and reads it back, and one frame holds it.
/// Every write the export accepts therefore replicates as one entry.
pub const MAX_WRITE_LEN: u32 = 32 * 1024 * 1024;
/// Room in a frame for everything but the write data: the type byte, the writes
/// frame's count and one entry's header (far less than this).
pub const FRAME_OVERHEAD: u32 = 64 * 1024;
/// Upper bound of `type + body` of one frame: one entry of [`MAX_WRITE_LEN`]
/// bytes always fits. Writes frames are batched well below it (several small
/// entries) or carry a single large entry.
pub const MAX_FRAME_LEN: u32 = MAX_WRITE_LEN + FRAME_OVERHEAD;
pub const FRAME_HEADER_LEN: usize = 5;

/// Most region hashes in one region-hashes frame (and regions in its reply).
pub const MAX_RESYNC_REGIONS: u32 = 65536;
/// Most block hashes in one block-hashes frame (the blocks of a region).
pub const MAX_RESYNC_BLOCKS: u16 = 256;
/// Most disks named by one resync-start.
pub const MAX_RESYNC_DISKS: u16 = 1024;

/// Counters and outcome of a checksum resync, as reported by the agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ResyncReport {
    pub disk_count: u16,
    /// Bytes of disk read and hashed.
    pub hashed_bytes: u64,
    /// Bytes of hashes sent (both levels).
    pub hash_bytes: u64,
    /// Bytes of block data sent.
    pub block_bytes: u64,
    /// 4 KiB blocks sent.
    pub blocks: u64,
    /// Seq of the `checksum-resync-complete` tag, 0 when none was placed.
    pub tag_seq: u64,
    /// Empty when the resync succeeded.
    pub error: String,
}

/// Kinds of recovery-point tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TagKind {
    Crash,
    App,
    Group,
}

impl TagKind {
    fn code(self) -> u8 {
        match self {
            TagKind::Crash => 1,
            TagKind::App => 2,
            TagKind::Group => 3,
        }
    }
    fn from_code(c: u8) -> Result<Self, DecodeError> {
        Ok(match c {
            1 => TagKind::Crash,
            2 => TagKind::App,
            3 => TagKind::Group,
            _ => {
                return Err(DecodeError::Invalid {
                    what: "tag kind",
                    detail: format!("unknown code {c}"),
                })
            }
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            TagKind::Crash => "crash",
            TagKind::App => "app",
            TagKind::Group => "group",
        }
    }
}

/// How an app-consistent point was made (absent on crash-consistent ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TagSource {
    /// Pre-freeze scripts, FIFREEZE of the configured filesystems, FITHAW,
    /// post-thaw scripts (Linux).
    Fsfreeze,
    /// Pre-freeze and post-thaw scripts only: no filesystem was frozen.
    Script,
    /// A VSS copy backup (Windows; see docs/VSS.md).
    Vss,
}

impl TagSource {
    fn code(self) -> u8 {
        match self {
            TagSource::Fsfreeze => 1,
            TagSource::Script => 2,
            TagSource::Vss => 3,
        }
    }
    fn from_code(c: u8) -> Result<Self, DecodeError> {
        Ok(match c {
            1 => TagSource::Fsfreeze,
            2 => TagSource::Script,
            3 => TagSource::Vss,
            _ => {
                return Err(DecodeError::Invalid {
                    what: "tag source",
                    detail: format!("unknown code {c}"),
                })
            }
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            TagSource::Fsfreeze => "fsfreeze",
            TagSource::Script => "script",
            TagSource::Vss => "vss",
        }
    }
}

/// What one stream entry does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Write {
        disk: u16,
        offset: u64,
        data: Bytes,
    },
    Zero {
        disk: u16,
        offset: u64,
        len: u32,
    },
    Tag {
        kind: TagKind,
        /// How the point was made; `None` for crash-consistent tags (and for
        /// every tag written before protocol 4).
        source: Option<TagSource>,
        time_ms: u64,
        label: String,
    },
    /// The disk has `size` bytes from this entry on (it was resized while the
    /// agent was stopped).
    Resize {
        disk: u16,
        size: u64,
    },
    /// From this entry until the next tag, the replica is not crash-consistent
    /// (an initial sync or a resync is under way); `label` says which.
    Inconsistent {
        label: String,
    },
    /// Each disk's checksum (`disksum.rs`) at the earlier tag `point`,
    /// hashed by the agent after it placed the tag.
    Sums {
        point: u64,
        disks: Vec<DiskSum>,
    },
    /// The blocks of `disk` that the write or zeroing just before covered
    /// only in part, which the receiver cannot hash from that entry: each
    /// with its XXH3-128 hash (`resync::HashScheme::Xxh3`; the disk's short
    /// last block padded with zeros) on the agent's disk just before that
    /// write and just after. A receiver whose replica block hashed `before`
    /// now holds `after`; one whose did not (the replica differs, or its
    /// hash is unknown) keeps the block unknown. Protocol 8 on.
    Hashes {
        disk: u16,
        blocks: Vec<PartialBlock>,
    },
}

/// One block of a HASHES entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartialBlock {
    pub block: u64,
    pub before: [u8; 16],
    pub after: [u8; 16],
}

/// One disk's checksum at a point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSum {
    pub disk: u16,
    pub size: u64,
    pub sum: [u8; 32],
}

/// One numbered element of a machine's write stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub op: Op,
}

impl Entry {
    /// Bytes this entry takes when encoded.
    pub fn encoded_len(&self) -> usize {
        9 + match &self.op {
            Op::Write { data, .. } => 14 + data.len(),
            Op::Zero { .. } => 14,
            Op::Tag { source, label, .. } => {
                11 + usize::from(source.is_some()) + label.len().min(u16::MAX as usize)
            }
            Op::Resize { .. } => 10,
            Op::Inconsistent { label } => 2 + label.len().min(u16::MAX as usize),
            Op::Sums { disks, .. } => 10 + 42 * disks.len(),
            Op::Hashes { blocks, .. } => 4 + 40 * blocks.len(),
        }
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.put_u64(self.seq);
        match &self.op {
            Op::Write { disk, offset, data } => {
                out.put_u8(1);
                out.put_u16(*disk);
                out.put_u64(*offset);
                out.put_u32(data.len() as u32);
                out.extend_from_slice(data);
            }
            Op::Zero { disk, offset, len } => {
                out.put_u8(2);
                out.put_u16(*disk);
                out.put_u64(*offset);
                out.put_u32(*len);
            }
            Op::Tag {
                kind,
                source,
                time_ms,
                label,
            } => {
                match source {
                    None => {
                        out.put_u8(3);
                        out.put_u8(kind.code());
                    }
                    Some(s) => {
                        out.put_u8(6);
                        out.put_u8(kind.code());
                        out.put_u8(s.code());
                    }
                }
                out.put_u64(*time_ms);
                out.put_str16(label);
            }
            Op::Resize { disk, size } => {
                out.put_u8(4);
                out.put_u16(*disk);
                out.put_u64(*size);
            }
            Op::Inconsistent { label } => {
                out.put_u8(5);
                out.put_str16(label);
            }
            Op::Sums { point, disks } => {
                out.put_u8(7);
                out.put_u64(*point);
                out.put_u16(disks.len() as u16);
                for d in disks {
                    out.put_u16(d.disk);
                    out.put_u64(d.size);
                    out.extend_from_slice(&d.sum);
                }
            }
            Op::Hashes { disk, blocks } => {
                out.put_u8(8);
                out.put_u16(*disk);
                out.put_u16(blocks.len() as u16);
                for b in blocks {
                    out.put_u64(b.block);
                    out.extend_from_slice(&b.before);
                    out.extend_from_slice(&b.after);
                }
            }
        }
    }

    /// Decodes one entry. `src` lets write data be shared without a copy.
    pub fn decode(r: &mut Reader<'_>, src: &Bytes) -> Result<Entry, DecodeError> {
        let seq = r.u64("entry seq")?;
        let op = match r.u8("entry op")? {
            1 => {
                let disk = r.u16("write disk")?;
                let offset = r.u64("write offset")?;
                let len = r.u32("write length")?;
                if len > MAX_WRITE_LEN {
                    return Err(DecodeError::TooLarge {
                        what: "write data",
                        len: len as u64,
                        limit: MAX_WRITE_LEN as u64,
                    });
                }
                let data = r.bytes(len as usize, "write data")?;
                Op::Write {
                    disk,
                    offset,
                    data: src.slice_ref(data),
                }
            }
            2 => Op::Zero {
                disk: r.u16("zero disk")?,
                offset: r.u64("zero offset")?,
                len: r.u32("zero length")?,
            },
            3 => Op::Tag {
                kind: TagKind::from_code(r.u8("tag kind")?)?,
                source: None,
                time_ms: r.u64("tag time")?,
                label: r.str16("tag label")?,
            },
            6 => Op::Tag {
                kind: TagKind::from_code(r.u8("tag kind")?)?,
                source: Some(TagSource::from_code(r.u8("tag source")?)?),
                time_ms: r.u64("tag time")?,
                label: r.str16("tag label")?,
            },
            4 => Op::Resize {
                disk: r.u16("resize disk")?,
                size: r.u64("resize size")?,
            },
            5 => Op::Inconsistent {
                label: r.str16("inconsistent label")?,
            },
            7 => {
                let point = r.u64("sums point")?;
                let n = r.u16("sums disk count")?;
                too_many("sums disks", n as u64, MAX_SUM_DISKS as u64)?;
                let mut disks = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    disks.push(DiskSum {
                        disk: r.u16("sums disk")?,
                        size: r.u64("sums size")?,
                        sum: r.array("sums checksum")?,
                    });
                }
                Op::Sums { point, disks }
            }
            8 => {
                let disk = r.u16("hashes disk")?;
                let n = r.u16("hashes count")?;
                too_many("hashes blocks", n as u64, MAX_HASH_BLOCKS as u64)?;
                let mut blocks = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    blocks.push(PartialBlock {
                        block: r.u64("hashes block")?,
                        before: r.array("hashes before")?,
                        after: r.array("hashes after")?,
                    });
                }
                Op::Hashes { disk, blocks }
            }
            other => {
                return Err(DecodeError::Invalid {
                    what: "entry op",
                    detail: format!("unknown op {other}"),
                })
            }
        };
        Ok(Entry { seq, op })
    }
}

/// A disk as announced in the hello. Its position in the hello is its number
/// in stream entries, fixed for its id by the agent's disk table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskInfo {
    pub id: String,
    pub size: u64,
    /// No longer protected (removed from the agent's config): kept, at its
    /// last size, so that its number is never reused and its history stays.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retired: bool,
}

impl DiskInfo {
    pub fn new(id: impl Into<String>, size: u64) -> DiskInfo {
        DiskInfo {
            id: id.into(),
            size,
            retired: false,
        }
    }
}

const DISK_RETIRED: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub min_version: u16,
    pub max_version: u16,
    pub machine: String,
    pub disks: Vec<DiskInfo>,
    pub stream_id: StreamId,
}

/// Names one numbering of a machine's stream (see the module header).
pub type StreamId = [u8; 16];

/// Error codes carried by the error frame.
pub mod error_code {
    pub const PROTOCOL: u16 = 1;
    pub const VERSION: u16 = 2;
    pub const AUTH: u16 = 3;
    pub const SERVER: u16 = 4;
    pub const SUPERSEDED: u16 = 5;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    Welcome {
        version: u16,
        durable: u64,
        max_frame: u32,
        stream_id: StreamId,
    },
    Writes(Vec<Entry>),
    Tag(Entry),
    Ack {
        durable: u64,
    },
    Error {
        code: u16,
        message: String,
    },
    Ping {
        nonce: u64,
        reply: bool,
    },
    ResyncStart {
        disks: Vec<u16>,
    },
    RegionHashes {
        disk: u16,
        first_region: u64,
        hashes: Vec<[u8; 16]>,
    },
    RegionsDiffer {
        disk: u16,
        first_region: u64,
        count: u32,
        regions: Vec<u64>,
    },
    BlockHashes {
        disk: u16,
        region: u64,
        hashes: Vec<[u8; 8]>,
    },
    BlocksDiffer {
        disk: u16,
        region: u64,
        blocks: Vec<u8>,
    },
    ResyncDone(ResyncReport),
    GroupPrepare {
        id: u64,
        hold_ms: u32,
        group: String,
    },
    GroupPrepared {
        id: u64,
        error: String,
    },
    GroupCommit {
        id: u64,
        label: String,
    },
    GroupCommitted {
        id: u64,
        seq: u64,
        error: String,
    },
    GroupRelease {
        id: u64,
    },
    GroupQuiesce {
        id: u64,
        quiesce_ms: u32,
        hold_ms: u32,
        group: String,
    },
    GroupQuiesced {
        id: u64,
        /// `None` with an error.
        source: Option<TagSource>,
        error: String,
    },
    /// A planned failover's final point: quiesce (when the agent has an
    /// `[app]` quiescer, bounded by `quiesce_ms`), place the tag, then refuse
    /// every later write (`agent/src/finalpoint.rs`).
    FinalPoint {
        id: u64,
        quiesce_ms: u32,
        label: String,
    },
    /// The final point's tag seq and source (`None`: crash-consistent), or
    /// an error (no tag placed, writes go on).
    FinalPointTaken {
        id: u64,
        seq: u64,
        source: Option<TagSource>,
        error: String,
    },
}

fn too_many(what: &'static str, n: u64, limit: u64) -> Result<(), DecodeError> {
    if n > limit {
        return Err(DecodeError::TooLarge {
            what,
            len: n,
            limit,
        });
    }
    Ok(())
}

impl Frame {
    /// This frame as a peer that speaks `version` can read it: below
    /// [`PROTOCOL_TAG_SOURCE`] a tag loses its source (op=3 instead of op=6);
    /// below [`PROTOCOL_SUMS`] a sums entry, and below [`PROTOCOL_XXH3`] a
    /// hashes entry, becomes a zero of 0 bytes (the seq stays taken).
    pub fn for_version(self, version: u16) -> Frame {
        let unknown = |op: &Op| match op {
            Op::Sums { .. } => version < PROTOCOL_SUMS,
            Op::Hashes { .. } => version < PROTOCOL_XXH3,
            _ => false,
        };
        match self {
            Frame::Writes(entries) if entries.iter().any(|e| unknown(&e.op)) => Frame::Writes(
                entries
                    .into_iter()
                    .map(|e| {
                        if unknown(&e.op) {
                            Entry {
                                seq: e.seq,
                                op: Op::Zero {
                                    disk: 0,
                                    offset: 0,
                                    len: 0,
                                },
                            }
                        } else {
                            e
                        }
                    })
                    .collect(),
            ),
            Frame::Tag(Entry {
                seq,
                op:
                    Op::Tag {
                        kind,
                        source: Some(_),
                        time_ms,
                        label,
                    },
            }) if version < PROTOCOL_TAG_SOURCE => Frame::Tag(Entry {
                seq,
                op: Op::Tag {
                    kind,
                    source: None,
                    time_ms,
                    label,
                },
            }),
            other => other,
        }
    }

    fn type_code(&self) -> u8 {
        match self {
            Frame::Hello(_) => 1,
            Frame::Welcome { .. } => 2,
            Frame::Writes(_) => 3,
            Frame::Tag(_) => 4,
            Frame::Ack { .. } => 5,
            Frame::Error { .. } => 6,
            Frame::Ping { .. } => 7,
            Frame::ResyncStart { .. } => 8,
            Frame::RegionHashes { .. } => 9,
            Frame::RegionsDiffer { .. } => 10,
            Frame::BlockHashes { .. } => 11,
            Frame::BlocksDiffer { .. } => 12,
            Frame::ResyncDone(_) => 13,
            Frame::GroupPrepare { .. } => 14,
            Frame::GroupPrepared { .. } => 15,
            Frame::GroupCommit { .. } => 16,
            Frame::GroupCommitted { .. } => 17,
            Frame::GroupRelease { .. } => 18,
            Frame::GroupQuiesce { .. } => 19,
            Frame::GroupQuiesced { .. } => 20,
            Frame::FinalPoint { .. } => 21,
            Frame::FinalPointTaken { .. } => 22,
        }
    }

    /// Appends the frame (header included) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.put_u32(0);
        out.put_u8(self.type_code());
        match self {
            Frame::Hello(h) => {
                out.extend_from_slice(&HELLO_MAGIC);
                out.put_u16(h.min_version);
                out.put_u16(h.max_version);
                out.put_str16(&h.machine);
                out.put_u16(h.disks.len() as u16);
                for d in &h.disks {
                    out.put_str16(&d.id);
                    out.put_u64(d.size);
                    if h.max_version >= 3 {
                        out.put_u8(if d.retired { DISK_RETIRED } else { 0 });
                    }
                }
                out.extend_from_slice(&h.stream_id);
            }
            Frame::Welcome {
                version,
                durable,
                max_frame,
                stream_id,
            } => {
                out.put_u16(*version);
                out.put_u64(*durable);
                out.put_u32(*max_frame);
                out.extend_from_slice(stream_id);
            }
            Frame::Writes(entries) => {
                out.put_u32(entries.len() as u32);
                for e in entries {
                    e.encode(out);
                }
            }
            Frame::Tag(e) => e.encode(out),
            Frame::Ack { durable } => out.put_u64(*durable),
            Frame::Error { code, message } => {
                out.put_u16(*code);
                out.put_str16(message);
            }
            Frame::Ping { nonce, reply } => {
                out.put_u64(*nonce);
                out.put_u8(*reply as u8);
            }
            Frame::ResyncStart { disks } => {
                out.put_u16(disks.len() as u16);
                for d in disks {
                    out.put_u16(*d);
                }
            }
            Frame::RegionHashes {
                disk,
                first_region,
                hashes,
            } => {
                out.put_u16(*disk);
                out.put_u64(*first_region);
                out.put_u32(hashes.len() as u32);
                for h in hashes {
                    out.extend_from_slice(h);
                }
            }
            Frame::RegionsDiffer {
                disk,
                first_region,
                count,
                regions,
            } => {
                out.put_u16(*disk);
                out.put_u64(*first_region);
                out.put_u32(*count);
                out.put_u32(regions.len() as u32);
                for r in regions {
                    out.put_u64(*r);
                }
            }
            Frame::BlockHashes {
                disk,
                region,
                hashes,
            } => {
                out.put_u16(*disk);
                out.put_u64(*region);
                out.put_u16(hashes.len() as u16);
                for h in hashes {
                    out.extend_from_slice(h);
                }
            }
            Frame::BlocksDiffer {
                disk,
                region,
                blocks,
            } => {
                out.put_u16(*disk);
                out.put_u64(*region);
                out.put_u16(blocks.len() as u16);
                out.extend_from_slice(blocks);
            }
            Frame::ResyncDone(r) => {
                out.put_u16(r.disk_count);
                out.put_u64(r.hashed_bytes);
                out.put_u64(r.hash_bytes);
                out.put_u64(r.block_bytes);
                out.put_u64(r.blocks);
                out.put_u64(r.tag_seq);
                out.put_str16(&r.error);
            }
            Frame::GroupPrepare { id, hold_ms, group } => {
                out.put_u64(*id);
                out.put_u32(*hold_ms);
                out.put_str16(group);
            }
            Frame::GroupPrepared { id, error } => {
                out.put_u64(*id);
                out.put_str16(error);
            }
            Frame::GroupCommit { id, label } => {
                out.put_u64(*id);
                out.put_str16(label);
            }
            Frame::GroupCommitted { id, seq, error } => {
                out.put_u64(*id);
                out.put_u64(*seq);
                out.put_str16(error);
            }
            Frame::GroupRelease { id } => out.put_u64(*id),
            Frame::GroupQuiesce {
                id,
                quiesce_ms,
                hold_ms,
                group,
            } => {
                out.put_u64(*id);
                out.put_u32(*quiesce_ms);
                out.put_u32(*hold_ms);
                out.put_str16(group);
            }
            Frame::GroupQuiesced { id, source, error } => {
                out.put_u64(*id);
                out.put_u8(source.map_or(0, TagSource::code));
                out.put_str16(error);
            }
            Frame::FinalPoint {
                id,
                quiesce_ms,
                label,
            } => {
                out.put_u64(*id);
                out.put_u32(*quiesce_ms);
                out.put_str16(label);
            }
            Frame::FinalPointTaken {
                id,
                seq,
                source,
                error,
            } => {
                out.put_u64(*id);
                out.put_u64(*seq);
                out.put_u8(source.map_or(0, TagSource::code));
                out.put_str16(error);
            }
        }
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }

    /// Checks a frame header and returns the length of `type + body` to read next.
    pub fn check_header(header: [u8; 4], limit: u32) -> Result<u32, DecodeError> {
        let len = u32::from_be_bytes(header);
        if len == 0 {
            return Err(DecodeError::Invalid {
                what: "frame",
                detail: "zero length".into(),
            });
        }
        if len > limit {
            return Err(DecodeError::TooLarge {
                what: "frame",
                len: len as u64,
                limit: limit as u64,
            });
        }
        Ok(len)
    }

    /// Decodes `type + body` (the bytes after the 4-byte length).
    pub fn decode(body: Bytes) -> Result<Frame, DecodeError> {
        let mut r = Reader::new(&body);
        let t = r.u8("frame type")?;
        let frame = match t {
            1 => {
                let magic: [u8; 4] = r.array("hello magic")?;
                if magic != HELLO_MAGIC {
                    return Err(DecodeError::BadMagic {
                        expected: HELLO_MAGIC,
                        found: magic,
                    });
                }
                let min_version = r.u16("hello min version")?;
                let max_version = r.u16("hello max version")?;
                let machine = r.str16("hello machine")?;
                let n = r.u16("hello disk count")?;
                let mut disks = Vec::with_capacity((n as usize).min(r.remaining() / 10));
                for _ in 0..n {
                    let id = r.str16("hello disk id")?;
                    let size = r.u64("hello disk size")?;
                    // Older hellos have no flags; negotiation refuses them.
                    let flags = if max_version >= 3 {
                        r.u8("hello disk flags")?
                    } else {
                        0
                    };
                    disks.push(DiskInfo {
                        id,
                        size,
                        retired: flags & DISK_RETIRED != 0,
                    });
                }
                Frame::Hello(Hello {
                    min_version,
                    max_version,
                    machine,
                    disks,
                    // Absent in a version 1 hello, which negotiation refuses by
                    // name; a version 2 hello without one is refused as well.
                    stream_id: if r.remaining() == 0 {
                        [0; 16]
                    } else {
                        r.array("hello stream id")?
                    },
                })
            }
            2 => Frame::Welcome {
                version: r.u16("welcome version")?,
                durable: r.u64("welcome durable")?,
                max_frame: r.u32("welcome max frame")?,
                stream_id: r.array("welcome stream id")?,
            },
            3 => {
                let n = r.u32("writes count")?;
                // Each entry is at least 9 bytes: never trust `n` for the allocation.
                let mut entries = Vec::with_capacity((n as usize).min(r.remaining() / 9));
                for _ in 0..n {
                    entries.push(Entry::decode(&mut r, &body)?);
                }
                Frame::Writes(entries)
            }
            4 => {
                let e = Entry::decode(&mut r, &body)?;
                if !matches!(e.op, Op::Tag { .. }) {
                    return Err(DecodeError::Invalid {
                        what: "tag frame",
                        detail: "entry is not a tag".into(),
                    });
                }
                Frame::Tag(e)
            }
            5 => Frame::Ack {
                durable: r.u64("ack durable")?,
            },
            6 => Frame::Error {
                code: r.u16("error code")?,
                message: r.str16("error message")?,
            },
            7 => Frame::Ping {
                nonce: r.u64("ping nonce")?,
                reply: r.u8("ping reply")? != 0,
            },
            8 => {
                let n = r.u16("resync-start disk count")?;
                too_many("resync-start disks", n as u64, MAX_RESYNC_DISKS as u64)?;
                let mut disks = Vec::with_capacity((n as usize).min(r.remaining() / 2));
                for _ in 0..n {
                    disks.push(r.u16("resync-start disk")?);
                }
                Frame::ResyncStart { disks }
            }
            9 => {
                let disk = r.u16("region-hashes disk")?;
                let first_region = r.u64("region-hashes first region")?;
                let n = r.u32("region-hashes count")?;
                too_many("region hashes", n as u64, MAX_RESYNC_REGIONS as u64)?;
                let mut hashes = Vec::with_capacity((n as usize).min(r.remaining() / 16));
                for _ in 0..n {
                    hashes.push(r.array("region hash")?);
                }
                Frame::RegionHashes {
                    disk,
                    first_region,
                    hashes,
                }
            }
            10 => {
                let disk = r.u16("regions-differ disk")?;
                let first_region = r.u64("regions-differ first region")?;
                let count = r.u32("regions-differ batch count")?;
                too_many(
                    "regions-differ batch",
                    count as u64,
                    MAX_RESYNC_REGIONS as u64,
                )?;
                let n = r.u32("regions-differ count")?;
                too_many("differing regions", n as u64, count as u64)?;
                let mut regions = Vec::with_capacity((n as usize).min(r.remaining() / 8));
                for _ in 0..n {
                    regions.push(r.u64("differing region")?);
                }
                Frame::RegionsDiffer {
                    disk,
                    first_region,
                    count,
                    regions,
                }
            }
            11 => {
                let disk = r.u16("block-hashes disk")?;
                let region = r.u64("block-hashes region")?;
                let n = r.u16("block-hashes count")?;
                too_many("block hashes", n as u64, MAX_RESYNC_BLOCKS as u64)?;
                let mut hashes = Vec::with_capacity((n as usize).min(r.remaining() / 8));
                for _ in 0..n {
                    hashes.push(r.array("block hash")?);
                }
                Frame::BlockHashes {
                    disk,
                    region,
                    hashes,
                }
            }
            12 => {
                let disk = r.u16("blocks-differ disk")?;
                let region = r.u64("blocks-differ region")?;
                let n = r.u16("blocks-differ count")?;
                too_many("differing blocks", n as u64, MAX_RESYNC_BLOCKS as u64)?;
                let blocks = r.bytes(n as usize, "differing blocks")?.to_vec();
                Frame::BlocksDiffer {
                    disk,
                    region,
                    blocks,
                }
            }
            13 => Frame::ResyncDone(ResyncReport {
                disk_count: r.u16("resync-done disk count")?,
                hashed_bytes: r.u64("resync-done hashed bytes")?,
                hash_bytes: r.u64("resync-done hash bytes")?,
                block_bytes: r.u64("resync-done block bytes")?,
                blocks: r.u64("resync-done blocks")?,
                tag_seq: r.u64("resync-done tag seq")?,
                error: r.str16("resync-done error")?,
            }),
            14 => Frame::GroupPrepare {
                id: r.u64("group-prepare id")?,
                hold_ms: r.u32("group-prepare hold")?,
                group: r.str16("group-prepare group")?,
            },
            15 => Frame::GroupPrepared {
                id: r.u64("group-prepared id")?,
                error: r.str16("group-prepared error")?,
            },
            16 => Frame::GroupCommit {
                id: r.u64("group-commit id")?,
                label: r.str16("group-commit label")?,
            },
            17 => Frame::GroupCommitted {
                id: r.u64("group-committed id")?,
                seq: r.u64("group-committed seq")?,
                error: r.str16("group-committed error")?,
            },
            18 => Frame::GroupRelease {
                id: r.u64("group-release id")?,
            },
            19 => Frame::GroupQuiesce {
                id: r.u64("group-quiesce id")?,
                quiesce_ms: r.u32("group-quiesce bound")?,
                hold_ms: r.u32("group-quiesce hold")?,
                group: r.str16("group-quiesce group")?,
            },
            20 => Frame::GroupQuiesced {
                id: r.u64("group-quiesced id")?,
                source: match r.u8("group-quiesced source")? {
                    0 => None,
                    c => Some(TagSource::from_code(c)?),
                },
                error: r.str16("group-quiesced error")?,
            },
            21 => Frame::FinalPoint {
                id: r.u64("final-point id")?,
                quiesce_ms: r.u32("final-point bound")?,
                label: r.str16("final-point label")?,
            },
            22 => Frame::FinalPointTaken {
                id: r.u64("final-point-taken id")?,
                seq: r.u64("final-point-taken seq")?,
                source: match r.u8("final-point-taken source")? {
                    0 => None,
                    c => Some(TagSource::from_code(c)?),
                },
                error: r.str16("final-point-taken error")?,
            },
            other => {
                return Err(DecodeError::Invalid {
                    what: "frame type",
                    detail: format!("unknown type {other}"),
                })
            }
        };
        r.finish("frame")?;
        Ok(frame)
    }
}

/// Picks the protocol version both sides speak, if any.
pub fn negotiate(min: u16, max: u16) -> Option<u16> {
    let hi = max.min(PROTOCOL_MAX);
    let lo = min.max(PROTOCOL_MIN);
    (lo <= hi).then_some(hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(f: Frame) {
        let bytes = f.to_bytes();
        let len = Frame::check_header(bytes[..4].try_into().unwrap(), MAX_FRAME_LEN).unwrap();
        assert_eq!(len as usize, bytes.len() - 4);
        let back = Frame::decode(Bytes::copy_from_slice(&bytes[4..])).unwrap();
        assert_eq!(back, f);
    }

    #[test]
    fn a_version_1_hello_decodes_and_is_refused_by_negotiation() {
        let mut body = vec![1u8];
        body.extend_from_slice(&HELLO_MAGIC);
        body.extend_from_slice(&[0, 1, 0, 1, 0, 1, b'm', 0, 0]);
        let Frame::Hello(h) = Frame::decode(Bytes::from(body)).unwrap() else {
            panic!("not a hello")
        };
        assert_eq!((h.max_version, h.stream_id), (1, [0; 16]));
        assert_eq!(negotiate(h.min_version, h.max_version), None);
    }

    #[test]
    fn the_largest_write_fits_one_entry_and_one_frame() {
        // The batching rule sends a large entry alone in its writes frame.
        let big = Entry {
            seq: u64::MAX,
            op: Op::Write {
                disk: u16::MAX,
                offset: u64::MAX,
                data: Bytes::from(vec![0xa5; MAX_WRITE_LEN as usize]),
            },
        };
        round_trip(Frame::Writes(vec![big.clone()]));
        let mut session = crate::session::SenderState::new(0);
        for seq in 1..=3 {
            session.push(Entry { seq, ..big.clone() });
        }
        for o in session.poll_transmit(4 << 20) {
            let crate::session::Outgoing::Frame(f) = o else {
                panic!("nothing spills without a memory limit");
            };
            let bytes = f.to_bytes();
            assert!(bytes.len() - 4 <= MAX_FRAME_LEN as usize);
        }
        let one_more = Entry {
            seq: 1,
            op: Op::Write {
                disk: 0,
                offset: 0,
                data: Bytes::from(vec![0; MAX_WRITE_LEN as usize + 1]),
            },
        };
        let mut out = Vec::new();
        one_more.encode(&mut out);
        let b = Bytes::from(out);
        assert!(matches!(
            Entry::decode(&mut Reader::new(&b), &b),
            Err(DecodeError::TooLarge { .. })
        ));
    }

    #[test]
    fn frames_round_trip() {
        round_trip(Frame::Hello(Hello {
            min_version: PROTOCOL_MIN,
            max_version: PROTOCOL_MAX,
            machine: "web-1".into(),
            disks: vec![DiskInfo::new("root", 1 << 30)],
            stream_id: [7; 16],
        }));
        round_trip(Frame::Welcome {
            version: 2,
            durable: 42,
            max_frame: MAX_FRAME_LEN,
            stream_id: [9; 16],
        });
        round_trip(Frame::Writes(vec![
            Entry {
                seq: 1,
                op: Op::Write {
                    disk: 0,
                    offset: 4096,
                    data: Bytes::from_static(b"abcd"),
                },
            },
            Entry {
                seq: 2,
                op: Op::Zero {
                    disk: 1,
                    offset: 0,
                    len: 512,
                },
            },
            Entry {
                seq: 3,
                op: Op::Resize {
                    disk: 1,
                    size: 3 << 30,
                },
            },
            Entry {
                seq: 4,
                op: Op::Inconsistent {
                    label: "resync".into(),
                },
            },
        ]));
        round_trip(Frame::Tag(Entry {
            seq: 3,
            op: Op::Tag {
                kind: TagKind::Crash,
                source: None,
                time_ms: 17,
                label: "x".into(),
            },
        }));
        for source in [TagSource::Fsfreeze, TagSource::Script, TagSource::Vss] {
            round_trip(Frame::Tag(Entry {
                seq: 4,
                op: Op::Tag {
                    kind: TagKind::App,
                    source: Some(source),
                    time_ms: 18,
                    label: "nightly".into(),
                },
            }));
        }
        round_trip(Frame::Ack { durable: 9 });
        round_trip(Frame::Error {
            code: 1,
            message: "no".into(),
        });
        round_trip(Frame::Ping {
            nonce: 5,
            reply: true,
        });
    }

    #[test]
    fn oversized_and_truncated_frames_are_errors() {
        assert!(matches!(
            Frame::check_header((MAX_FRAME_LEN + 1).to_be_bytes(), MAX_FRAME_LEN),
            Err(DecodeError::TooLarge { .. })
        ));
        let f = Frame::Writes(vec![Entry {
            seq: 1,
            op: Op::Write {
                disk: 0,
                offset: 0,
                data: Bytes::from(vec![7u8; 100]),
            },
        }]);
        let bytes = f.to_bytes();
        for cut in 5..bytes.len() {
            assert!(Frame::decode(Bytes::copy_from_slice(&bytes[4..cut])).is_err());
        }
        // A count that claims billions of entries must not allocate for them.
        let mut evil = vec![3u8];
        evil.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(Frame::decode(Bytes::from(evil)).is_err());
    }

    fn resync_frames() -> Vec<Frame> {
        vec![
            Frame::ResyncStart { disks: vec![0, 3] },
            Frame::RegionHashes {
                disk: 1,
                first_region: 64,
                hashes: vec![[1; 16], [2; 16]],
            },
            Frame::RegionsDiffer {
                disk: 1,
                first_region: 64,
                count: 2,
                regions: vec![65],
            },
            Frame::BlockHashes {
                disk: 1,
                region: 65,
                hashes: vec![[3; 8]; 256],
            },
            Frame::BlocksDiffer {
                disk: 1,
                region: 65,
                blocks: vec![0, 7, 255],
            },
            Frame::ResyncDone(ResyncReport {
                disk_count: 2,
                hashed_bytes: 1 << 30,
                hash_bytes: 4096,
                block_bytes: 8192,
                blocks: 2,
                tag_seq: 99,
                error: String::new(),
            }),
        ]
    }

    #[test]
    fn resync_frames_round_trip_and_truncation_is_an_error() {
        for f in resync_frames() {
            round_trip(f.clone());
            let bytes = f.to_bytes();
            for cut in 5..bytes.len() {
                assert!(
                    Frame::decode(Bytes::copy_from_slice(&bytes[4..cut])).is_err(),
                    "{f:?} cut at {cut}"
                );
            }
        }
    }

    /// Group frames round-trip, a cut anywhere is an error, and their bytes
    /// are pinned (a kept fixture of the protocol 5 layout).
    #[test]
    fn group_frames_round_trip_keep_their_bytes_and_truncation_is_an_error() {
        let frames = vec![
            Frame::GroupPrepare {
                id: 7,
                hold_ms: 10_000,
                group: "g".into(),
            },
            Frame::GroupPrepared {
                id: 7,
                error: String::new(),
            },
            Frame::GroupCommit {
                id: 7,
                label: "l".into(),
            },
            Frame::GroupCommitted {
                id: 7,
                seq: 42,
                error: "e".into(),
            },
            Frame::GroupRelease { id: 7 },
            Frame::GroupQuiesce {
                id: 7,
                quiesce_ms: 60_000,
                hold_ms: 10_000,
                group: "g".into(),
            },
            Frame::GroupQuiesced {
                id: 7,
                source: Some(TagSource::Vss),
                error: String::new(),
            },
            Frame::GroupQuiesced {
                id: 7,
                source: None,
                error: "e".into(),
            },
            Frame::FinalPoint {
                id: 9,
                quiesce_ms: 60_000,
                label: "planned".into(),
            },
            Frame::FinalPointTaken {
                id: 9,
                seq: 42,
                source: Some(TagSource::Fsfreeze),
                error: String::new(),
            },
            Frame::FinalPointTaken {
                id: 9,
                seq: 0,
                source: None,
                error: "e".into(),
            },
        ];
        for f in &frames {
            round_trip(f.clone());
            let bytes = f.to_bytes();
            for cut in 5..bytes.len() {
                assert!(
                    Frame::decode(Bytes::copy_from_slice(&bytes[4..cut])).is_err(),
                    "{f:?} cut at {cut}"
                );
            }
        }
        let hex: Vec<String> = frames.iter().map(|f| crate::hex(&f.to_bytes())).collect();
        assert_eq!(
            hex,
            [
                "000000100e000000000000000700002710000167",
                "0000000b0f00000000000000070000",
                "0000000c10000000000000000700016c",
                "00000014110000000000000007000000000000002a000165",
                "00000009120000000000000007",
                "000000141300000000000000070000ea6000002710000167",
                "0000000c140000000000000007030000",
                "0000000d14000000000000000700000165",
                "000000161500000000000000090000ea600007706c616e6e6564",
                "00000014160000000000000009000000000000002a010000",
                "00000015160000000000000009000000000000000000000165",
            ]
        );
    }

    #[test]
    fn resync_counts_are_bounded() {
        // region-hashes claiming more than the bound.
        let mut evil = vec![9u8, 0, 0];
        evil.extend_from_slice(&0u64.to_be_bytes());
        evil.extend_from_slice(&(MAX_RESYNC_REGIONS + 1).to_be_bytes());
        assert!(matches!(
            Frame::decode(Bytes::from(evil)),
            Err(DecodeError::TooLarge { .. })
        ));
        // block-hashes with 257 hashes.
        let f = Frame::BlockHashes {
            disk: 0,
            region: 0,
            hashes: vec![[0; 8]; 257],
        };
        assert!(matches!(
            Frame::decode(Bytes::copy_from_slice(&f.to_bytes()[4..])),
            Err(DecodeError::TooLarge { .. })
        ));
        // regions-differ listing more regions than its batch.
        let f = Frame::RegionsDiffer {
            disk: 0,
            first_region: 0,
            count: 1,
            regions: vec![0, 1],
        };
        assert!(Frame::decode(Bytes::copy_from_slice(&f.to_bytes()[4..])).is_err());
        // A count claiming u32::MAX disks-worth of bytes must not allocate.
        let mut evil = vec![8u8];
        evil.extend_from_slice(&u16::MAX.to_be_bytes());
        assert!(Frame::decode(Bytes::from(evil)).is_err());
    }

    #[test]
    fn encoded_len_matches() {
        let e = Entry {
            seq: 1,
            op: Op::Tag {
                kind: TagKind::App,
                source: None,
                time_ms: 1,
                label: "abc".into(),
            },
        };
        let mut v = Vec::new();
        e.encode(&mut v);
        assert_eq!(v.len(), e.encoded_len());
        let e = Entry {
            seq: 1,
            op: Op::Tag {
                kind: TagKind::App,
                source: Some(TagSource::Vss),
                time_ms: 1,
                label: "abc".into(),
            },
        };
        let mut v = Vec::new();
        e.encode(&mut v);
        assert_eq!(v.len(), e.encoded_len());
    }

    /// The bytes of tag entries are pinned: op=3 as every version wrote it
    /// (journals, caches and segments from before protocol 4 hold it), op=6
    /// with its source from protocol 4 on.
    #[test]
    fn tag_entries_keep_their_bytes_and_older_ones_read() {
        let old: &[u8] = &[
            0, 0, 0, 0, 0, 0, 0, 7, // seq 7
            3, 2, // TAG, kind app
            0, 0, 0, 0, 0, 0, 0, 42, // time_ms
            0, 2, b'h', b'i', // label "hi"
        ];
        let sourced: &[u8] = &[
            0, 0, 0, 0, 0, 0, 0, 7, // seq 7
            6, 2, 1, // TAG_SOURCED, kind app, source fsfreeze
            0, 0, 0, 0, 0, 0, 0, 42, // time_ms
            0, 2, b'h', b'i', // label "hi"
        ];
        let entry = |source| Entry {
            seq: 7,
            op: Op::Tag {
                kind: TagKind::App,
                source,
                time_ms: 42,
                label: "hi".into(),
            },
        };
        for (bytes, want) in [
            (old, entry(None)),
            (sourced, entry(Some(TagSource::Fsfreeze))),
        ] {
            let b = Bytes::copy_from_slice(bytes);
            assert_eq!(Entry::decode(&mut Reader::new(&b), &b).unwrap(), want);
            let mut out = Vec::new();
            want.encode(&mut out);
            assert_eq!(out, bytes);
            for cut in 0..bytes.len() {
                let b = Bytes::copy_from_slice(&bytes[..cut]);
                assert!(Entry::decode(&mut Reader::new(&b), &b).is_err());
            }
        }
        let mut bad = sourced.to_vec();
        bad[10] = 9;
        let b = Bytes::from(bad);
        assert!(matches!(
            Entry::decode(&mut Reader::new(&b), &b),
            Err(DecodeError::Invalid {
                what: "tag source",
                ..
            })
        ));
    }

    #[test]
    fn a_version_3_peer_gets_tags_without_their_source() {
        let tag = |source| {
            Frame::Tag(Entry {
                seq: 9,
                op: Op::Tag {
                    kind: TagKind::App,
                    source,
                    time_ms: 1,
                    label: "x".into(),
                },
            })
        };
        assert_eq!(tag(Some(TagSource::Vss)).for_version(3), tag(None));
        assert_eq!(
            tag(Some(TagSource::Vss)).for_version(PROTOCOL_TAG_SOURCE),
            tag(Some(TagSource::Vss))
        );
        assert_eq!(
            tag(Some(TagSource::Vss)).for_version(3).to_bytes()[5 + 8],
            3
        );
    }

    #[test]
    fn a_sums_entry_round_trips_and_becomes_an_empty_zero_below_version_6() {
        let e = Entry {
            seq: 9,
            op: Op::Sums {
                point: 7,
                disks: vec![
                    DiskSum {
                        disk: 0,
                        size: 12345,
                        sum: [3u8; 32],
                    },
                    DiskSum {
                        disk: 2,
                        size: 1 << 40,
                        sum: [0xa5u8; 32],
                    },
                ],
            },
        };
        let f = Frame::Writes(vec![e.clone()]);
        let bytes = f.to_bytes();
        assert_eq!(bytes.len(), 5 + 4 + e.encoded_len());
        let back = Frame::decode(Bytes::copy_from_slice(&bytes[4..])).unwrap();
        assert_eq!(back, f);
        let old = f.for_version(5);
        assert_eq!(
            old,
            Frame::Writes(vec![Entry {
                seq: 9,
                op: Op::Zero {
                    disk: 0,
                    offset: 0,
                    len: 0
                }
            }])
        );
    }

    #[test]
    fn a_hashes_entry_round_trips_and_becomes_an_empty_zero_below_version_8() {
        let hashes = Entry {
            seq: 11,
            op: Op::Hashes {
                disk: 1,
                blocks: vec![
                    PartialBlock {
                        block: 0,
                        before: [7u8; 16],
                        after: [8u8; 16],
                    },
                    PartialBlock {
                        block: u64::MAX / 4096,
                        before: [0xc3u8; 16],
                        after: [0x3cu8; 16],
                    },
                ],
            },
        };
        let write = Entry {
            seq: 10,
            op: Op::Write {
                disk: 1,
                offset: 512,
                data: Bytes::from_static(b"abc"),
            },
        };
        let f = Frame::Writes(vec![write.clone(), hashes.clone()]);
        let bytes = f.to_bytes();
        assert_eq!(
            bytes.len(),
            5 + 4 + write.encoded_len() + hashes.encoded_len()
        );
        let back = Frame::decode(Bytes::copy_from_slice(&bytes[4..])).unwrap();
        assert_eq!(back, f);
        assert_eq!(f.clone().for_version(PROTOCOL_XXH3), f);
        let empty = Entry {
            seq: 11,
            op: Op::Zero {
                disk: 0,
                offset: 0,
                len: 0,
            },
        };
        assert_eq!(
            f.for_version(PROTOCOL_XXH3 - 1),
            Frame::Writes(vec![write, empty])
        );
        // A count beyond the bound is refused before anything is read.
        let mut e = Vec::new();
        e.put_u64(1);
        e.put_u8(8);
        e.put_u16(0);
        e.put_u16(MAX_HASH_BLOCKS as u16 + 1);
        let src = Bytes::from(e);
        let mut r = Reader::new(&src[..]);
        assert!(matches!(
            Entry::decode(&mut r, &src),
            Err(DecodeError::TooLarge {
                what: "hashes blocks",
                ..
            })
        ));
    }

    #[test]
    fn version_negotiation() {
        assert_eq!(negotiate(1, 5), Some(5));
        assert_eq!(negotiate(1, 9), Some(PROTOCOL_MAX));
        assert_eq!(negotiate(1, 1), None);
        assert_eq!(negotiate(PROTOCOL_MAX + 1, PROTOCOL_MAX + 3), None);
    }
}
