//! Registration messages (`register.rs`): the first byte is the type, the
//! rest the body. What decodes must round-trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lifeboat_common::register::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&ty, body)) = data.split_first() else {
        return;
    };
    if let Ok(m) = Message::decode(ty, body) {
        let wire = m.encode();
        let again = Message::decode(wire[4], &wire[5..])
            .unwrap_or_else(|e| panic!("{m:?} encodes to something that does not decode: {e}"));
        assert_eq!(m, again);
    }
});
