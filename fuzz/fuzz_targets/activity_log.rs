//! The agent's activity log (`dirty::decode`): the first 2 bytes are the
//! disk's region count, the rest the log file.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let regions = u16::from_be_bytes([data[0], data[1]]) as usize;
    if let Ok(bits) = lifeboat_agent::dirty::decode(&data[2..], regions) {
        assert_eq!(bits.len(), regions);
        assert_eq!(
            lifeboat_agent::dirty::decode(&lifeboat_agent::dirty::encode(&bits), regions).unwrap(),
            bits
        );
    }
});
