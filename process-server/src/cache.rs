//! The durable cache: every received entry, in RocksDB, until it is in the object
//! store.
//!
//! Column families and records:
//!
//! ```text
//! log   key   machine bytes | 0x00 | seq u64 big-endian   (ordered by machine, seq)
//!       value envelope(b"LBCV", 1) of the protocol entry encoding
//! meta  key   "uploaded/<machine>"  value envelope(b"LBPO", 1) of u64: uploaded
//!       key   "machine/<machine>"   value envelope(b"LBMR", 1) of machine.json
//! ```
//!
//! Positions per machine: `durable` = the last seq in `log` (or `uploaded` when
//! the log is empty) ≥ `uploaded`. An append returns only after a synced write,
//! so whatever it returns may be acknowledged. `uploaded` is persisted before the
//! cached range is deleted, so a crash in between only leaves entries that are
//! skipped on restart.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use lifeboat_common::catalogue::MachineRecord;
use lifeboat_common::codec::{envelope, open_envelope, Reader, ENVELOPE_HEADER};
use lifeboat_common::protocol::{Entry, Op};
use rocksdb::{
    ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB,
};

const CF_LOG: &str = "log";
const CF_META: &str = "meta";
const VALUE_MAGIC: [u8; 4] = *b"LBCV";
const POS_MAGIC: [u8; 4] = *b"LBPO";
const MACHINE_MAGIC: [u8; 4] = *b"LBMR";

pub struct Cache {
    db: Arc<DB>,
}

fn log_key(machine: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(machine.len() + 9);
    k.extend_from_slice(machine.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn seq_of(machine: &str, key: &[u8]) -> Option<u64> {
    let rest = key.strip_prefix(machine.as_bytes())?.strip_prefix(&[0])?;
    Some(u64::from_be_bytes(rest.try_into().ok()?))
}

/// `envelope(VALUE_MAGIC, 1, entry)` written in place, without an extra copy.
fn envelope_entry(out: &mut Vec<u8>, e: &Entry) {
    out.extend_from_slice(&VALUE_MAGIC);
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&[0; 8]);
    e.encode(out);
    let len = (out.len() - ENVELOPE_HEADER) as u32;
    let crc = crc32c::crc32c(&out[ENVELOPE_HEADER..]);
    out[6..10].copy_from_slice(&len.to_be_bytes());
    out[10..14].copy_from_slice(&crc.to_be_bytes());
}

/// A range of entries read for one segment.
#[derive(Default)]
pub struct Batch {
    pub entries: Vec<Entry>,
    pub bytes: usize,
    /// Whether the batch ends at a tag (segments are always cut there).
    pub ends_at_tag: bool,
}

impl Cache {
    pub fn open(dir: &Path) -> Result<Cache> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        let mut log_opts = Options::default();
        // Entries live briefly: a large memtable lets most be deleted before a flush.
        log_opts.set_write_buffer_size(128 * 1024 * 1024);
        log_opts.set_max_write_buffer_number(4);
        log_opts.set_compression_type(rocksdb::DBCompressionType::None);
        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_LOG, log_opts),
            ColumnFamilyDescriptor::new(CF_META, Options::default()),
        ];
        let db = DB::open_cf_descriptors(&opts, dir, cfs)
            .with_context(|| format!("opening the RocksDB cache in {}", dir.display()))?;
        Ok(Cache { db: Arc::new(db) })
    }

    fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| anyhow!("cache has no column family {name}"))
    }

    /// Makes `entries` durable (synced) and returns the new durable position.
    pub fn append(&self, machine: &str, entries: &[Entry]) -> Result<u64> {
        let cf = self.cf(CF_LOG)?;
        let mut batch = WriteBatch::default();
        let mut buf = Vec::new();
        for e in entries {
            buf.clear();
            envelope_entry(&mut buf, e);
            batch.put_cf(cf, log_key(machine, e.seq), &buf);
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(batch, &wo).with_context(|| {
            format!(
                "writing {} entries of {machine} to the cache",
                entries.len()
            )
        })?;
        Ok(entries.last().map(|e| e.seq).unwrap_or(0))
    }

    pub fn uploaded(&self, machine: &str) -> Result<u64> {
        let cf = self.cf(CF_META)?;
        match self.db.get_cf(cf, format!("uploaded/{machine}"))? {
            None => Ok(0),
            Some(v) => {
                let p = open_envelope(&v, POS_MAGIC, 1, "uploaded position")
                    .with_context(|| format!("reading the uploaded position of {machine}"))?;
                Ok(Reader::new(p).u64("uploaded position")?)
            }
        }
    }

    /// The last durable seq of the machine.
    pub fn durable(&self, machine: &str) -> Result<u64> {
        let cf = self.cf(CF_LOG)?;
        let end = log_key(machine, u64::MAX);
        let mut it = self
            .db
            .iterator_cf(cf, IteratorMode::From(&end, Direction::Reverse));
        let last = match it.next() {
            Some(Ok((k, _))) => seq_of(machine, &k),
            Some(Err(e)) => return Err(e.into()),
            None => None,
        };
        Ok(last.unwrap_or(0).max(self.uploaded(machine)?))
    }

    /// Reads entries from `from` on, up to about `max_bytes`, stopping after a tag.
    pub fn read_batch(&self, machine: &str, from: u64, max_bytes: usize) -> Result<Batch> {
        let cf = self.cf(CF_LOG)?;
        let start = log_key(machine, from);
        let mut out = Batch::default();
        let iter = self
            .db
            .iterator_cf(cf, IteratorMode::From(&start, Direction::Forward));
        for (expect, item) in (from..).zip(iter) {
            let (k, v) = item?;
            let Some(seq) = seq_of(machine, &k) else {
                break;
            };
            if seq != expect {
                return Err(anyhow!(
                    "cache of {machine} has a gap: expected seq {expect}, found {seq}"
                ));
            }
            let payload = open_envelope(&v, VALUE_MAGIC, 1, "cache value")
                .with_context(|| format!("cache entry {machine}/{seq}"))?;
            let src = Bytes::copy_from_slice(payload);
            let e = Entry::decode(&mut Reader::new(&src), &src)
                .with_context(|| format!("cache entry {machine}/{seq}"))?;
            out.bytes += e.encoded_len();
            let is_tag = matches!(e.op, Op::Tag { .. });
            out.entries.push(e);
            if is_tag {
                out.ends_at_tag = true;
                break;
            }
            if out.bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// Records that everything up to `upto` is in the object store, then frees it.
    pub fn mark_uploaded(&self, machine: &str, from: u64, upto: u64) -> Result<()> {
        let meta = self.cf(CF_META)?;
        let log = self.cf(CF_LOG)?;
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.put_cf_opt(
            meta,
            format!("uploaded/{machine}"),
            envelope(POS_MAGIC, 1, &upto.to_be_bytes()),
            &wo,
        )?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            log,
            log_key(machine, from.min(upto)),
            log_key(machine, upto + 1),
        );
        self.db.write(batch)?;
        Ok(())
    }

    pub fn put_machine(&self, rec: &MachineRecord) -> Result<()> {
        let meta = self.cf(CF_META)?;
        let json = serde_json::to_vec(rec)?;
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.put_cf_opt(
            meta,
            format!("machine/{}", rec.machine),
            envelope(MACHINE_MAGIC, 1, &json),
            &wo,
        )?;
        Ok(())
    }

    /// Every machine this cache has seen, with its last announced disks.
    pub fn machines(&self) -> Result<Vec<MachineRecord>> {
        let meta = self.cf(CF_META)?;
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(meta, IteratorMode::From(b"machine/", Direction::Forward))
        {
            let (k, v) = item?;
            if !k.starts_with(b"machine/") {
                break;
            }
            let p = open_envelope(&v, MACHINE_MAGIC, 1, "machine record")?;
            out.push(serde_json::from_slice(p)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lifeboat_common::protocol::TagKind;

    fn w(seq: u64) -> Entry {
        Entry {
            seq,
            op: Op::Write {
                disk: 0,
                offset: seq * 4096,
                data: Bytes::from(vec![seq as u8; 4096]),
            },
        }
    }

    #[test]
    fn positions_survive_reopen_and_batches_cut_at_tags() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = Cache::open(dir.path()).unwrap();
            assert_eq!(c.durable("m").unwrap(), 0);
            let mut es: Vec<Entry> = (1..=3).map(w).collect();
            es.push(Entry {
                seq: 4,
                op: Op::Tag {
                    kind: TagKind::Crash,
                    time_ms: 1,
                    label: String::new(),
                },
            });
            es.push(w(5));
            assert_eq!(c.append("m", &es).unwrap(), 5);
            c.append("m2", &[w(1)]).unwrap();
            let b = c.read_batch("m", 1, 1 << 20).unwrap();
            assert_eq!(b.entries.len(), 4);
            assert!(b.ends_at_tag);
            c.mark_uploaded("m", 1, 4).unwrap();
        }
        let c = Cache::open(dir.path()).unwrap();
        assert_eq!(c.uploaded("m").unwrap(), 4);
        assert_eq!(c.durable("m").unwrap(), 5);
        assert_eq!(c.durable("m2").unwrap(), 1);
        let b = c.read_batch("m", 5, 1 << 20).unwrap();
        assert_eq!(b.entries, vec![w(5)]);
        c.mark_uploaded("m", 5, 5).unwrap();
        assert_eq!(c.durable("m").unwrap(), 5, "durable never moves back");
        assert!(c.read_batch("m", 6, 1 << 20).unwrap().entries.is_empty());
    }
}
