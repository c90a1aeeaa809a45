//! Bases: a machine's disks as they stood at a seq (the retention horizon),
//! kept as content-addressed chunks, so that the segments before it can be
//! deleted and a recovery need not replay the stream from seq 1.
//!
//! ```text
//! machines/<machine>/
//!     base/<seq:016x>.json        signed manifest: every disk at seq, chunk by chunk
//!     chunks/<id:32 hex>          sealed chunk (zstd + AES-256-GCM, as segments)
//! ```
//!
//! - A chunk is [`CHUNK_SIZE`] bytes of one disk at a chunk-aligned offset
//!   (a disk's last chunk may be shorter). An all-zero chunk is not stored:
//!   the manifest leaves it out.
//! - A chunk's id is the keyed BLAKE3 of its plaintext, 16 bytes, under a key
//!   derived from the machine's data key (HKDF, salt
//!   `lifeboat-chunk-id-v1`): equal chunks share one object across disks and
//!   bases, and the id says nothing about the content to whoever lacks the
//!   key. The chunk is sealed under its own object name, and a reader checks
//!   the id against the opened plaintext, so a chunk cannot be swapped.
//! - The manifest lists, per disk, its size and largest size at `seq` and the
//!   `[index, id]` of every chunk that is not zeros. It carries the owner
//!   epoch that wrote it: like a point, a base counts only if its seq is at
//!   or below the fence of every later takeover (`catalogue.rs`).
//!
//! A base is written after its chunks, and the segments and points it makes
//! unnecessary are deleted only after it (see the process server's
//! `compact.rs`). The stream is then: the newest counted base, then the
//! segments after its seq.

use serde::{Deserialize, Serialize};

use ring::hkdf;

use crate::catalogue::{
    self, machine_dir, CatalogueError, CatalogueKey, Fences, Prefix, SegmentName,
};
use crate::seal::{self, Key};
use crate::store::Store;

/// Bytes per chunk: small enough that a scattered rewrite stores little
/// more than it changed, large enough that a 1 TiB disk is a million
/// objects at most.
pub const CHUNK_SIZE: u64 = 1 << 20;
pub const BASE_FORMAT: u32 = 1;
pub const CHUNK_ID_LEN: usize = 16;

pub fn base_object(machine: &str, seq: u64) -> String {
    format!("machines/{machine}/base/{seq:016x}.json")
}

pub fn chunk_dir(machine: &str) -> String {
    format!("machines/{machine}/chunks/")
}

pub fn chunk_object(machine: &str, id: &str) -> String {
    format!("machines/{machine}/chunks/{id}")
}

/// One disk of a base.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct BaseDisk {
    pub id: String,
    /// The disk's size at the base's seq.
    pub size: u64,
    /// The largest size the disk had up to then (writes reach up to it).
    pub largest: u64,
    /// `(chunk index, chunk id)` of every chunk that is not all zeros, by index.
    pub chunks: Vec<(u64, String)>,
}

/// `base/<seq>.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct BaseManifest {
    pub format: u32,
    pub seq: u64,
    /// The owner epoch that wrote it.
    pub epoch: u64,
    pub chunk_size: u64,
    /// When the stream reached `seq` (the point there), ms since the epoch.
    pub time_ms: u64,
    pub time: String,
    /// When the base was stored, ms since the Unix epoch: what it replaces
    /// is deleted only a grace period later (readers in flight).
    #[serde(default)]
    pub created_ms: u64,
    /// The disks in the machine's disk order (disk number = index).
    pub disks: Vec<BaseDisk>,
}

impl BaseManifest {
    /// Every chunk id the base needs.
    pub fn chunk_ids(&self) -> impl Iterator<Item = &str> {
        self.disks
            .iter()
            .flat_map(|d| d.chunks.iter().map(|(_, id)| id.as_str()))
    }

    /// Bytes of non-zero chunks (the data the base holds).
    pub fn data_bytes(&self) -> u64 {
        self.disks
            .iter()
            .map(|d| {
                d.chunks
                    .iter()
                    .map(|(i, _)| chunk_len(d.largest.max(d.size), *i))
                    .sum::<u64>()
            })
            .sum()
    }

    fn check(&self, store: &Store, object: &str) -> Result<(), CatalogueError> {
        let invalid = |detail: String| CatalogueError::Invalid {
            object: store.describe(object),
            detail,
        };
        if self.chunk_size != CHUNK_SIZE {
            return Err(invalid(format!(
                "chunk size {} (this build reads {CHUNK_SIZE})",
                self.chunk_size
            )));
        }
        for d in &self.disks {
            crate::ids::validate_id("disk", &d.id).map_err(&invalid)?;
            let span = d.largest.max(d.size);
            let mut last = None;
            for (i, id) in &d.chunks {
                if last.is_some_and(|l| *i <= l) || i.saturating_mul(CHUNK_SIZE) >= span {
                    return Err(invalid(format!(
                        "disk {}: chunk index {i} is out of order or beyond the disk ({span} bytes)",
                        d.id
                    )));
                }
                if crate::unhex::<CHUNK_ID_LEN>(id).is_none() {
                    return Err(invalid(format!("disk {}: malformed chunk id {id:?}", d.id)));
                }
                last = Some(*i);
            }
        }
        Ok(())
    }
}

/// The length of chunk `index` of a disk of `size` bytes.
pub fn chunk_len(size: u64, index: u64) -> u64 {
    size.saturating_sub(index * CHUNK_SIZE).min(CHUNK_SIZE)
}

/// The key that names chunks, derived from the machine's data key.
#[derive(Clone)]
pub struct ChunkNamer([u8; 32]);

impl ChunkNamer {
    pub fn derive(data_key: &Key) -> ChunkNamer {
        struct Len;
        impl hkdf::KeyType for Len {
            fn len(&self) -> usize {
                32
            }
        }
        let mut out = [0u8; 32];
        hkdf::Salt::new(hkdf::HKDF_SHA256, b"lifeboat-chunk-id-v1")
            .extract(data_key.as_bytes())
            .expand(&[b"chunk-id"], Len)
            .and_then(|okm| okm.fill(&mut out))
            .expect("32 bytes is a valid HKDF length");
        ChunkNamer(out)
    }

    /// The id of a chunk holding `data`.
    pub fn id(&self, data: &[u8]) -> String {
        let h = blake3::keyed_hash(&self.0, data);
        crate::hex(&h.as_bytes()[..CHUNK_ID_LEN])
    }
}

/// Seals a chunk for `chunk_object(machine, id)`.
pub fn seal_chunk(key: &Key, machine: &str, id: &str, data: &[u8], level: i32) -> Vec<u8> {
    seal::seal(key, &chunk_object(machine, id), 0, data, level)
}

/// Fetches chunk `id` of `machine` from `store` and opens it ([`open_chunk`],
/// off the runtime's threads): its plaintext and the sealed bytes fetched.
/// A missing chunk is [`CatalogueError::Missing`], naming the object.
pub async fn fetch_chunk(
    store: &Store,
    key: std::sync::Arc<Key>,
    namer: std::sync::Arc<ChunkNamer>,
    machine: &str,
    id: &str,
) -> Result<(Vec<u8>, u64), CatalogueError> {
    let name = chunk_object(machine, id);
    let sealed = crate::catalogue::get_required(store, &name).await?;
    let fetched = sealed.len() as u64;
    let (store, machine, id) = (store.clone(), machine.to_string(), id.to_string());
    let plain = tokio::task::spawn_blocking(move || {
        open_chunk(&key, &namer, &store, &machine, &id, &sealed)
    })
    .await
    .map_err(|e| CatalogueError::Invalid {
        object: name.clone(),
        detail: format!("opening it failed: {e}"),
    })??;
    Ok((plain, fetched))
}

/// Opens a sealed chunk and checks that its content has its id.
pub fn open_chunk(
    key: &Key,
    namer: &ChunkNamer,
    store: &Store,
    machine: &str,
    id: &str,
    sealed: &[u8],
) -> Result<Vec<u8>, CatalogueError> {
    let name = chunk_object(machine, id);
    let plain = seal::open(key, &name, 0, sealed)?;
    if namer.id(&plain) != id {
        return Err(CatalogueError::Invalid {
            object: store.describe(&name),
            detail: "its content does not have its id; refusing to use it".into(),
        });
    }
    Ok(plain)
}

/// The machine's bases, authenticated, by seq; a base fenced by a later
/// takeover is left out.
pub async fn list_bases(
    store: &Store,
    key: Option<&CatalogueKey>,
    machine: &str,
    fences: &Fences,
) -> Result<Vec<BaseManifest>, CatalogueError> {
    let mut out: Vec<(String, BaseManifest)> =
        catalogue::list_signed(store, key, &format!("{}/base/", machine_dir(machine)), true)
            .await?;
    for (name, b) in &out {
        if *name != base_object(machine, b.seq) {
            return Err(CatalogueError::Invalid {
                object: store.describe(name),
                detail: format!("holds the base at seq {}", b.seq),
            });
        }
        b.check(store, name)?;
    }
    out.sort_by_key(|(_, b)| b.seq);
    Ok(out
        .into_iter()
        .map(|(_, b)| b)
        .filter(|b| fences.counts(b.epoch, b.seq))
        .collect())
}

/// The newest base the stream starts from (`None`: it starts at seq 1).
pub fn newest(bases: &[BaseManifest]) -> Option<&BaseManifest> {
    bases.iter().max_by_key(|b| b.seq)
}

/// What the store holds of a machine's stream: its takeovers, the base it
/// starts from, and the segments after that base without a gap.
#[derive(Debug, Clone, Default)]
pub struct StreamView {
    pub fences: Fences,
    /// Every counted base, by seq (the stream starts from the newest).
    pub bases: Vec<BaseManifest>,
    /// Every segment in the store, counted or not, by name.
    pub segments: Vec<SegmentName>,
    /// Each segment's stored (sealed) size, from the same listing.
    pub segment_bytes: std::collections::BTreeMap<SegmentName, u64>,
    /// The segments after the newest base, up to the stream's end.
    pub prefix: Prefix,
}

impl StreamView {
    /// The seq the stream starts after: the newest base's (0: none).
    pub fn start(&self) -> u64 {
        newest(&self.bases).map_or(0, |b| b.seq)
    }

    pub fn base(&self) -> Option<&BaseManifest> {
        newest(&self.bases)
    }
}

/// Reads the stream's shape (`key` `None`: for display only).
pub async fn stream_view(
    store: &Store,
    key: Option<&CatalogueKey>,
    machine: &str,
) -> Result<StreamView, CatalogueError> {
    let sized = catalogue::list_segments_sized(store, machine).await?;
    stream_view_from(store, key, machine, sized).await
}

/// The stream's shape from a listing of its segments (`sized`, by
/// `catalogue::list_segments_sized`) made first: a fold creates its base
/// before it deletes the segments it replaces, so a base listed after the
/// segments is never newer than what they cover (the other order could show
/// a gap). What must be listed between (points and marks, which the uploader
/// stores before their segment and a fold deletes after its base) goes
/// between the two calls.
pub async fn stream_view_from(
    store: &Store,
    key: Option<&CatalogueKey>,
    machine: &str,
    sized: Vec<(SegmentName, u64)>,
) -> Result<StreamView, CatalogueError> {
    let segments: Vec<SegmentName> = sized.iter().map(|(s, _)| *s).collect();
    let fences = catalogue::list_fences(store, key, machine).await?;
    let bases = list_bases(store, key, machine, &fences).await?;
    let start = newest(&bases).map_or(0, |b| b.seq);
    let prefix = catalogue::contiguous_prefix(&segments, &fences, start);
    Ok(StreamView {
        fences,
        bases,
        segments,
        segment_bytes: sized.into_iter().collect(),
        prefix,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_ids_are_keyed_and_stable() {
        let k1 = Key::from_bytes([1; 32]);
        let k2 = Key::from_bytes([2; 32]);
        let (a, b) = (ChunkNamer::derive(&k1), ChunkNamer::derive(&k2));
        let data = vec![7u8; 4096];
        assert_eq!(a.id(&data), a.id(&data.clone()));
        assert_ne!(
            a.id(&data),
            b.id(&data),
            "another machine's key names it differently"
        );
        assert_ne!(a.id(&data), a.id(&[7u8; 4095]));
        assert_eq!(a.id(&data).len(), 2 * CHUNK_ID_LEN);
    }

    #[test]
    fn chunk_lengths_cover_the_disk() {
        let size = 3 * CHUNK_SIZE + 5;
        let total: u64 = (0..4).map(|i| chunk_len(size, i)).sum();
        assert_eq!(total, size);
        assert_eq!(chunk_len(size, 3), 5);
        assert_eq!(chunk_len(size, 4), 0);
    }
}
