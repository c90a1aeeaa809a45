//! The stream protocol's frame decoder (`protocol.rs`): a frame header, then
//! `type + body`. Whatever decodes must encode back to a frame that decodes
//! to the same value.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use lifeboat_common::protocol::{Frame, MAX_FRAME_LEN};

fuzz_target!(|data: &[u8]| {
    if let Some(h) = data.get(..4) {
        let _ = Frame::check_header(h.try_into().unwrap(), MAX_FRAME_LEN);
    }
    if let Ok(f) = Frame::decode(Bytes::copy_from_slice(data)) {
        let wire = f.to_bytes();
        let again = Frame::decode(Bytes::copy_from_slice(&wire[4..]))
            .unwrap_or_else(|e| panic!("{f:?} encodes to something that does not decode: {e}"));
        assert_eq!(f, again, "a frame changed through encode and decode");
    }
});
