//! Byte-level building blocks shared by every Lifeboat format: a bounds-checked
//! reader, a writer, and the *envelope* that wraps every persisted record.
//!
//! Envelope layout (all integers big-endian):
//!
//! ```text
//! offset size field
//! 0      4    magic        identifies the record type, e.g. b"LBCV" (cache value)
//! 4      2    version      format version of the payload
//! 6      4    length       payload length in bytes
//! 10     4    crc32c       CRC-32C of the payload
//! 14     n    payload
//! ```
//!
//! Invariant: a read never panics and never allocates more than the caller's buffer
//! already holds; a short or inconsistent buffer is a [`DecodeError`].

use thiserror::Error;

/// Why a buffer could not be decoded. Always names the field that failed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("truncated: needed {needed} more bytes for {what}")]
    Truncated { what: &'static str, needed: usize },
    #[error("bad magic: expected {expected:?}, found {found:?}")]
    BadMagic { expected: [u8; 4], found: [u8; 4] },
    #[error("unsupported format version {found} for {what} (this build reads {supported})")]
    Version {
        what: &'static str,
        found: u16,
        supported: u16,
    },
    #[error("checksum mismatch in {what}")]
    Checksum { what: &'static str },
    #[error("invalid {what}: {detail}")]
    Invalid { what: &'static str, detail: String },
    #[error("{what} is {len} bytes, over the limit of {limit}")]
    TooLarge {
        what: &'static str,
        len: u64,
        limit: u64,
    },
}

/// A cursor over a byte slice whose every read is checked.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated {
                what,
                needed: n - self.buf.len(),
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let b = self.bytes(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    pub fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    pub fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    pub fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    pub fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    /// A UTF-8 string prefixed by its u16 length.
    pub fn str16(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let n = self.u16(what)? as usize;
        let b = self.bytes(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::Invalid {
            what,
            detail: "not UTF-8".into(),
        })
    }

    /// Everything left; fails if `what` requires the reader to be consumed exactly.
    pub fn finish(self, what: &'static str) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Invalid {
                what,
                detail: format!("{} trailing bytes", self.buf.len()),
            })
        }
    }
}

/// Appends big-endian fields to a `Vec<u8>`.
pub trait Writer {
    fn put_u8(&mut self, v: u8);
    fn put_u16(&mut self, v: u16);
    fn put_u32(&mut self, v: u32);
    fn put_u64(&mut self, v: u64);
    fn put_str16(&mut self, s: &str);
}

impl Writer for Vec<u8> {
    fn put_u8(&mut self, v: u8) {
        self.push(v);
    }
    fn put_u16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_str16(&mut self, s: &str) {
        let b = s.as_bytes();
        let n = b.len().min(u16::MAX as usize);
        self.put_u16(n as u16);
        self.extend_from_slice(&b[..n]);
    }
}

pub const ENVELOPE_HEADER: usize = 14;

/// Wraps `payload` in the envelope described in the module header.
pub fn envelope(magic: [u8; 4], version: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ENVELOPE_HEADER + payload.len());
    out.extend_from_slice(&magic);
    out.put_u16(version);
    out.put_u32(payload.len() as u32);
    out.put_u32(crc32c::crc32c(payload));
    out.extend_from_slice(payload);
    out
}

/// Checks magic, version, length and checksum; returns the payload.
pub fn open_envelope<'a>(
    buf: &'a [u8],
    magic: [u8; 4],
    version: u16,
    what: &'static str,
) -> Result<&'a [u8], DecodeError> {
    let mut r = Reader::new(buf);
    let found: [u8; 4] = r.array(what)?;
    if found != magic {
        return Err(DecodeError::BadMagic {
            expected: magic,
            found,
        });
    }
    let v = r.u16(what)?;
    if v != version {
        return Err(DecodeError::Version {
            what,
            found: v,
            supported: version,
        });
    }
    let len = r.u32(what)? as usize;
    let crc = r.u32(what)?;
    let payload = r.bytes(len, what)?;
    r.finish(what)?;
    if crc32c::crc32c(payload) != crc {
        return Err(DecodeError::Checksum { what });
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trip_and_corruption() {
        let e = envelope(*b"TEST", 1, b"hello");
        assert_eq!(open_envelope(&e, *b"TEST", 1, "t").unwrap(), b"hello");
        let mut bad = e.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(
            open_envelope(&bad, *b"TEST", 1, "t"),
            Err(DecodeError::Checksum { what: "t" })
        );
        assert!(matches!(
            open_envelope(&e[..e.len() - 1], *b"TEST", 1, "t"),
            Err(DecodeError::Truncated { .. })
        ));
        assert!(matches!(
            open_envelope(&e, *b"TEST", 2, "t"),
            Err(DecodeError::Version { found: 1, .. })
        ));
        assert!(matches!(
            open_envelope(&e, *b"ZZZZ", 1, "t"),
            Err(DecodeError::BadMagic { .. })
        ));
    }

    #[test]
    fn reader_never_panics_on_short_input() {
        let mut r = Reader::new(&[0, 5, b'a']);
        assert!(matches!(r.str16("s"), Err(DecodeError::Truncated { .. })));
    }
}
