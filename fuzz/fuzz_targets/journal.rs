//! The agent's journal reader (`journal::read_records`): a file of enveloped
//! entries. What it returns must be contiguous seqs within the valid prefix.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.journal");
    if let Ok((entries, valid, _torn)) =
        lifeboat_agent::journal::read_records(Bytes::copy_from_slice(data), path)
    {
        assert!(valid as usize <= data.len());
        for w in entries.windows(2) {
            assert_eq!(w[1].seq, w[0].seq + 1);
        }
    }
});
