//! A decrypted segment (`catalogue::decode_segment`): the first 16 bytes are
//! the name's first and last seq, the rest the segment's plaintext. What
//! decodes must be entries in seq order within the name's range.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lifeboat_common::catalogue::{decode_segment, SegmentName};

fuzz_target!(|data: &[u8]| {
    if data.len() < 16 {
        return;
    }
    let first = u64::from_be_bytes(data[..8].try_into().unwrap());
    let last = u64::from_be_bytes(data[8..16].try_into().unwrap());
    let name = SegmentName::new(first, last, 1);
    let _ = SegmentName::parse(&String::from_utf8_lossy(&data[16..data.len().min(96)]));
    if let Ok(entries) = decode_segment(&data[16..], "m-1", name) {
        for e in &entries {
            assert!(
                e.seq >= first && e.seq <= last,
                "seq {} outside {first}..={last}",
                e.seq
            );
        }
    }
});
