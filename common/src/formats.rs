//! One home for every persisted format: each record type names its magic,
//! format version and what it is called in errors ([`Record`]), and every
//! writer and reader goes through the envelope here (layout in `codec.rs`:
//! magic, version, length, crc32c, payload).
//!
//! | record | magic | version | where |
//! |---|---|---|---|
//! | [`JournalRecord`] | `LBJR` | 1 | agent `journal/<first:016x>.jnl`, one per entry |
//! | [`SyncState`] | `LBSY` | 1 | agent `sync-<disk>.rec` (JSON) |
//! | [`ChecksumPlan`] | `LBCK` | 1 | agent `checksum-resync.rec` (JSON) |
//! | [`ActivityLog`] | `LBAL` | 1 | agent `al-<disk>.rec` |
//! | [`DiskTable`] | `LBDT` | 1 | agent `disks.rec` (JSON) |
//! | [`FailedOver`] | `LBFO` | 1 | agent `failed-over.rec` (JSON) |
//! | [`AppliedPosition`] | `LBAP` | 1 | master target `<state-dir>/<machine>.applied` (JSON) |
//! | [`InstantLayer`] | `LBIL` | 1 | `lifeboat-mt serve-point` `<state-dir>/layer.rec` (JSON) |
//! | [`InstantWrite`] | `LBIW` | 1 | `lifeboat-mt serve-point` `<state-dir>/writes.log`, one per logged write |
//! | [`InstantHydration`] | `LBIH` | 1 | `lifeboat-mt serve-point` `<state-dir>/hydration.rec` (JSON) |
//! | [`CacheValue`] | `LBCV` | 1 | process-server RocksDB `log` values (protocol entry) |
//! | [`CachePosition`] | `LBPO` | 1 | process-server RocksDB `meta` positions (u64) |
//! | [`CacheMachine`] | `LBMR` | 1 | process-server RocksDB `meta` machine records (JSON) |
//! | [`CacheOwnerEpoch`] | `LBOE` | 1 | process-server RocksDB `meta` owner epochs (u64) |
//! | [`SegmentRecord`] | `LBSG` | 1 | store `log/<first>-<last>.seg`, inside the seal |
//! | [`DataKeyRecord`] | `LBDK` | 1 | store `keys/data-key.sealed`, inside the seal |
//!
//! A record of the right magic but another version is a named
//! [`DecodeError::Version`], never taken for a torn tail. Each format and
//! version has a kept fixture under `common/fixtures/` that a test of its
//! owner reads back ([`fixture`]).

use crate::codec::{envelope, open_envelope, DecodeError, Reader, Writer, ENVELOPE_HEADER};

/// A persisted record type: its envelope's magic and version.
pub trait Record {
    const MAGIC: [u8; 4];
    const VERSION: u16;
    /// What the record is called in errors ("journal record").
    const WHAT: &'static str;
}

macro_rules! record {
    ($(#[$doc:meta])* $name:ident, $magic:literal, $version:literal, $what:literal) => {
        $(#[$doc])*
        pub struct $name;
        impl Record for $name {
            const MAGIC: [u8; 4] = *$magic;
            const VERSION: u16 = $version;
            const WHAT: &'static str = $what;
        }
    };
}

record!(
    /// One stream entry in the agent's journal.
    JournalRecord, b"LBJR", 1, "journal record"
);
record!(
    /// An initial sync's progress for one disk (JSON).
    SyncState, b"LBSY", 1, "sync record"
);
record!(
    /// The checksum resync plan (JSON).
    ChecksumPlan, b"LBCK", 1, "checksum resync plan"
);
record!(
    /// The activity log of one disk.
    ActivityLog, b"LBAL", 1, "activity log"
);
record!(
    /// The agent's disk table: every disk it protected, by number (JSON).
    DiskTable, b"LBDT", 1, "disk table"
);
record!(
    /// A planned failover's final point: the agent refuses writes (JSON).
    FailedOver, b"LBFO", 1, "failed-over record"
);
record!(
    /// What the master target applied of a machine's stream to its disks (JSON).
    AppliedPosition, b"LBAP", 1, "applied position"
);
record!(
    /// The point an instant-recovery export serves: its local layers and base chunks (JSON).
    InstantLayer, b"LBIL", 1, "instant-recovery layer record"
);
record!(
    /// A range written to an instant-recovery export: `u16 disk, u64 offset, u64 len`.
    InstantWrite, b"LBIW", 1, "instant-recovery write record"
);
record!(
    /// How far an instant recovery's hydration has copied each disk (JSON).
    InstantHydration, b"LBIH", 1, "instant-recovery hydration record"
);
record!(
    /// One stream entry in the process server's cache.
    CacheValue, b"LBCV", 1, "cache value"
);
record!(
    /// A position (u64) in the process server's cache.
    CachePosition, b"LBPO", 1, "cache position"
);
record!(
    /// A machine record in the process server's cache (JSON).
    CacheMachine, b"LBMR", 1, "machine record"
);
record!(
    /// The owner epoch the process server last held for a machine (u64).
    CacheOwnerEpoch, b"LBOE", 1, "owner epoch"
);

record!(
    /// A segment's plaintext (index + entries) before sealing.
    SegmentRecord, b"LBSG", 1, "segment"
);
record!(
    /// A machine's data key before it is sealed with the key-encryption key.
    DataKeyRecord, b"LBDK", 1, "data key"
);

/// Every record type above: (what, magic, version). Magics are unique.
pub const ALL: &[(&str, [u8; 4], u16)] = &[
    (
        JournalRecord::WHAT,
        JournalRecord::MAGIC,
        JournalRecord::VERSION,
    ),
    (SyncState::WHAT, SyncState::MAGIC, SyncState::VERSION),
    (
        ChecksumPlan::WHAT,
        ChecksumPlan::MAGIC,
        ChecksumPlan::VERSION,
    ),
    (ActivityLog::WHAT, ActivityLog::MAGIC, ActivityLog::VERSION),
    (DiskTable::WHAT, DiskTable::MAGIC, DiskTable::VERSION),
    (FailedOver::WHAT, FailedOver::MAGIC, FailedOver::VERSION),
    (
        AppliedPosition::WHAT,
        AppliedPosition::MAGIC,
        AppliedPosition::VERSION,
    ),
    (
        InstantLayer::WHAT,
        InstantLayer::MAGIC,
        InstantLayer::VERSION,
    ),
    (
        InstantWrite::WHAT,
        InstantWrite::MAGIC,
        InstantWrite::VERSION,
    ),
    (
        InstantHydration::WHAT,
        InstantHydration::MAGIC,
        InstantHydration::VERSION,
    ),
    (CacheValue::WHAT, CacheValue::MAGIC, CacheValue::VERSION),
    (
        CachePosition::WHAT,
        CachePosition::MAGIC,
        CachePosition::VERSION,
    ),
    (
        CacheMachine::WHAT,
        CacheMachine::MAGIC,
        CacheMachine::VERSION,
    ),
];

/// `payload` in an envelope of record type `R`.
pub fn seal<R: Record>(payload: &[u8]) -> Vec<u8> {
    envelope(R::MAGIC, R::VERSION, payload)
}

/// Appends an envelope of type `R` to `out` whose payload `body` writes in
/// place (no copy of large payloads).
pub fn append<R: Record>(out: &mut Vec<u8>, body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&R::MAGIC);
    out.put_u16(R::VERSION);
    out.put_u32(0);
    out.put_u32(0);
    body(out);
    let len = (out.len() - start - ENVELOPE_HEADER) as u32;
    let crc = crc32c::crc32c(&out[start + ENVELOPE_HEADER..]);
    out[start + 6..start + 10].copy_from_slice(&len.to_be_bytes());
    out[start + 10..start + 14].copy_from_slice(&crc.to_be_bytes());
}

/// The payload of a buffer that is exactly one envelope of type `R`.
pub fn open<R: Record>(buf: &[u8]) -> Result<&[u8], DecodeError> {
    open_envelope(buf, R::MAGIC, R::VERSION, R::WHAT)
}

/// The record at the start of a log of envelopes (the journal).
#[derive(Debug, PartialEq, Eq)]
pub enum Next<'a> {
    /// A whole record: its payload and the bytes it takes.
    Record { payload: &'a [u8], len: usize },
    /// Not a whole record: short, foreign bytes, or a checksum mismatch (a
    /// torn write at the tail of a log). Says what is wrong.
    Torn(String),
}

/// Reads the record at the start of `buf`. A record of this magic but
/// another version is an error, not a torn tail.
pub fn next<R: Record>(buf: &[u8]) -> Result<Next<'_>, DecodeError> {
    let mut r = Reader::new(buf);
    let torn = |why: &str| Ok(Next::Torn(why.to_string()));
    let Ok(magic) = r.array::<4>(R::WHAT) else {
        return torn("short header");
    };
    if magic != R::MAGIC {
        return torn("no record magic");
    }
    let Ok(version) = r.u16(R::WHAT) else {
        return torn("short header");
    };
    if version != R::VERSION {
        return Err(DecodeError::Version {
            what: R::WHAT,
            found: version,
            supported: R::VERSION,
        });
    }
    let (Ok(len), Ok(crc)) = (r.u32(R::WHAT), r.u32(R::WHAT)) else {
        return torn("short header");
    };
    let len = len as usize;
    let Ok(payload) = r.bytes(len, R::WHAT) else {
        return torn("short payload");
    };
    if crc32c::crc32c(payload) != crc {
        return torn("checksum mismatch");
    }
    Ok(Next::Record {
        payload,
        len: ENVELOPE_HEADER + len,
    })
}

/// The path of the kept fixture of record type `R` (`name`) at its current
/// version: `common/fixtures/<name>-v<version>.bin`. Tests read it back; set
/// `LIFEBOAT_WRITE_FIXTURES=1` to write a fixture that does not exist yet
/// (an existing one is never rewritten: it pins the format).
pub fn fixture<R: Record>(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(format!("{name}-v{}.bin", R::VERSION))
}

/// Reads the kept fixture `name` of type `R`, writing `make()` first when it
/// is absent and `LIFEBOAT_WRITE_FIXTURES=1` is set. Panics (a test helper)
/// when the fixture is missing.
pub fn read_fixture<R: Record>(name: &str, make: impl FnOnce() -> Vec<u8>) -> Vec<u8> {
    let path = fixture::<R>(name);
    if !path.exists() && std::env::var_os("LIFEBOAT_WRITE_FIXTURES").is_some() {
        std::fs::create_dir_all(path.parent().expect("fixtures dir")).expect("fixtures dir");
        std::fs::write(&path, make()).expect("writing the fixture");
    }
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "fixture {} ({e}); run the test once with LIFEBOAT_WRITE_FIXTURES=1 and commit it",
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magics_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for (what, magic, _) in ALL {
            assert!(seen.insert(magic), "{what} reuses a magic");
        }
    }

    #[test]
    fn append_next_round_trip_and_a_newer_version_is_named() {
        let mut log = Vec::new();
        append::<JournalRecord>(&mut log, |o| o.extend_from_slice(b"one"));
        append::<JournalRecord>(&mut log, |o| o.extend_from_slice(b"two!"));
        let Next::Record { payload, len } = next::<JournalRecord>(&log).unwrap() else {
            panic!("a record")
        };
        assert_eq!(payload, b"one");
        assert_eq!(
            next::<JournalRecord>(&log[len..]).unwrap(),
            Next::Record {
                payload: b"two!",
                len: ENVELOPE_HEADER + 4
            }
        );
        // Every cut of the second record is torn, never an error.
        for cut in len..log.len() {
            assert!(matches!(
                next::<JournalRecord>(&log[len..cut]),
                Ok(Next::Torn(_))
            ));
        }
        let mut newer = log.clone();
        newer[4..6].copy_from_slice(&2u16.to_be_bytes());
        assert_eq!(
            next::<JournalRecord>(&newer),
            Err(DecodeError::Version {
                what: "journal record",
                found: 2,
                supported: 1
            })
        );
        assert_eq!(open::<SyncState>(&seal::<SyncState>(b"{}")).unwrap(), b"{}");
    }
}
