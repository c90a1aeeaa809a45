//! Sealing of objects at rest: zstd, then AES-256-GCM with a per-object key.
//!
//! ```text
//! sealed object (integers big-endian)
//! offset size field
//! 0      4    magic b"LBSL"
//! 4      2    version (1)
//! 6      1    compression (0 none, 1 zstd)
//! 7      1    reserved (0)
//! 8      8    plaintext length
//! 16     12   nonce (random)
//! 28     4    crc32c of bytes 0..28
//! 32     n    AES-256-GCM ciphertext of the compressed payload, then 16-byte tag
//! ```
//!
//! Key: HKDF-SHA256(data key, salt "lifeboat-seal-v1", info = object name).
//! Associated data: object name, chunk index (u32, 0 for whole objects) and
//! bytes 0..32 of the header. A renamed, swapped, truncated or altered object
//! fails to open, and the error names the object.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use thiserror::Error;

use crate::codec::{Reader, Writer};

pub const SEAL_MAGIC: [u8; 4] = *b"LBSL";
pub const SEAL_VERSION: u16 = 1;
const HEADER_LEN: usize = 32;
/// The largest plaintext a sealed object may claim (guards decompression).
pub const MAX_PLAINTEXT: u64 = 1 << 30;

#[derive(Debug, Error)]
pub enum SealError {
    #[error("object {object}: {detail}")]
    Corrupt { object: String, detail: String },
    #[error(
        "object {object}: authentication failed (tampered or truncated object, or the wrong key)"
    )]
    Auth { object: String },
}

/// A 256-bit key (data key or key-encryption key).
#[derive(Clone)]
pub struct Key([u8; 32]);

impl Key {
    pub fn generate() -> Key {
        let mut k = [0u8; 32];
        SystemRandom::new()
            .fill(&mut k)
            .expect("the system random generator works");
        Key(k)
    }
    pub fn from_bytes(b: [u8; 32]) -> Key {
        Key(b)
    }
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
    pub fn from_hex(s: &str) -> Result<Key, String> {
        let s = s.trim();
        if s.len() != 64 {
            return Err(format!("expected 64 hex digits, found {}", s.len()));
        }
        let mut k = [0u8; 32];
        for (i, k) in k.iter_mut().enumerate() {
            *k = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
                .map_err(|_| "not a hex string".to_string())?;
        }
        Ok(Key(k))
    }

    fn derive(&self, object: &str) -> LessSafeKey {
        struct Len;
        impl hkdf::KeyType for Len {
            fn len(&self) -> usize {
                32
            }
        }
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"lifeboat-seal-v1").extract(&self.0);
        let info = [object.as_bytes()];
        let okm = prk
            .expand(&info, Len)
            .expect("32 bytes is a valid HKDF length");
        let mut k = [0u8; 32];
        okm.fill(&mut k).expect("32 bytes is a valid HKDF length");
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &k).expect("32-byte AES key"))
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

fn aad(object: &str, chunk: u32, header: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(object.len() + 4 + header.len());
    a.extend_from_slice(object.as_bytes());
    a.put_u32(chunk);
    a.extend_from_slice(header);
    a
}

/// Compresses (zstd `level`, 0 = store) and encrypts `plain` as `object`.
pub fn seal(key: &Key, object: &str, chunk: u32, plain: &[u8], level: i32) -> Vec<u8> {
    let (compression, mut body) = if level > 0 {
        (
            1u8,
            zstd::bulk::compress(plain, level).expect("zstd compression of memory"),
        )
    } else {
        (0u8, plain.to_vec())
    };
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .expect("the system random generator works");
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(&SEAL_MAGIC);
    header.put_u16(SEAL_VERSION);
    header.put_u8(compression);
    header.put_u8(0);
    header.put_u64(plain.len() as u64);
    header.extend_from_slice(&nonce);
    let crc = crc32c::crc32c(&header);
    header.put_u32(crc);
    key.derive(object)
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad(object, chunk, &header)),
            &mut body,
        )
        .expect("AES-GCM sealing of an in-memory buffer");
    header.extend_from_slice(&body);
    header
}

/// Verifies and decrypts an object sealed by [`seal`].
pub fn open(key: &Key, object: &str, chunk: u32, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
    let corrupt = |detail: String| SealError::Corrupt {
        object: object.to_string(),
        detail,
    };
    let mut r = Reader::new(sealed);
    let magic: [u8; 4] = r.array("seal magic").map_err(|e| corrupt(e.to_string()))?;
    if magic != SEAL_MAGIC {
        return Err(corrupt(format!("not a sealed object (magic {magic:?})")));
    }
    let version = r.u16("seal version").map_err(|e| corrupt(e.to_string()))?;
    if version != SEAL_VERSION {
        return Err(corrupt(format!("unsupported seal version {version}")));
    }
    let compression = r.u8("compression").map_err(|e| corrupt(e.to_string()))?;
    let _ = r.u8("reserved").map_err(|e| corrupt(e.to_string()))?;
    let plain_len = r
        .u64("plaintext length")
        .map_err(|e| corrupt(e.to_string()))?;
    let nonce: [u8; NONCE_LEN] = r.array("nonce").map_err(|e| corrupt(e.to_string()))?;
    let crc = r.u32("header crc").map_err(|e| corrupt(e.to_string()))?;
    if crc32c::crc32c(&sealed[..HEADER_LEN - 4]) != crc {
        return Err(corrupt("header checksum mismatch".into()));
    }
    if plain_len > MAX_PLAINTEXT {
        return Err(corrupt(format!("claims {plain_len} bytes, over the limit")));
    }
    let mut body = sealed[HEADER_LEN..].to_vec();
    let plain = key
        .derive(object)
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad(object, chunk, &sealed[..HEADER_LEN])),
            &mut body,
        )
        .map_err(|_| SealError::Auth {
            object: object.to_string(),
        })?;
    let out = match compression {
        0 => plain.to_vec(),
        1 => zstd::bulk::decompress(plain, plain_len as usize)
            .map_err(|e| corrupt(format!("zstd: {e}")))?,
        c => return Err(corrupt(format!("unknown compression {c}"))),
    };
    if out.len() as u64 != plain_len {
        return Err(corrupt(format!(
            "decompressed to {} bytes, header says {plain_len}",
            out.len()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tamper() {
        let k = Key::generate();
        let plain = vec![42u8; 100_000];
        let s = seal(&k, "a/b", 0, &plain, 1);
        assert!(s.len() < 2000, "compressible data compresses");
        assert_eq!(open(&k, "a/b", 0, &s).unwrap(), plain);
        // Wrong name, wrong chunk, wrong key, flipped byte, truncation: all refused.
        assert!(matches!(
            open(&k, "a/c", 0, &s),
            Err(SealError::Auth { .. })
        ));
        assert!(matches!(
            open(&k, "a/b", 1, &s),
            Err(SealError::Auth { .. })
        ));
        assert!(open(&Key::generate(), "a/b", 0, &s).is_err());
        for i in [0, 10, 40, s.len() - 1] {
            let mut t = s.clone();
            t[i] ^= 0x40;
            let e = open(&k, "a/b", 0, &t).unwrap_err();
            assert!(e.to_string().contains("a/b"), "{e}");
        }
        assert!(open(&k, "a/b", 0, &s[..s.len() - 3]).is_err());
        assert!(open(&k, "a/b", 0, &s[..10]).is_err());
    }

    #[test]
    fn uncompressed_mode() {
        let k = Key::generate();
        let s = seal(&k, "x", 0, b"abc", 0);
        assert_eq!(open(&k, "x", 0, &s).unwrap(), b"abc");
    }

    #[test]
    fn hex_keys() {
        let k = Key::generate();
        assert_eq!(Key::from_hex(&k.to_hex()).unwrap().0, k.0);
        assert!(Key::from_hex("zz").is_err());
    }
}
