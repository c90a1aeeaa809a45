//! Registration of an agent with a passphrase: the two messages and the
//! passphrase proofs. No I/O beyond one message on an async stream.
//!
//! An agent without a certificate connects to the process server's TLS port
//! without a client certificate, accepting whatever server certificate it is
//! shown, and sends one `register` message; the server answers `registered`
//! or `refused` and closes. Both sides prove that they know the passphrase
//! with an HMAC-SHA256 keyed by it, over the TLS session's exported keying
//! material: a man in the middle holds two TLS sessions with two different
//! exports, so it can neither forward a proof nor make one. Only after the
//! server's proof checks out does the agent trust the CA the reply carries
//! (and it checks that the server's own certificate chains to it).
//!
//! Messages use the framing of the stream protocol (`protocol.rs`): length u32
//! (of type + body) | type u8 | body; integers big-endian, `str16` = u16
//! length + UTF-8, `bytes32` = u32 length + bytes. Types 64..=66 are not used
//! by the stream protocol, so a process server that does not know
//! registration refuses the message as an unknown frame.
//!
//! ```text
//! register   (agent → server) 64: magic b"LBRG" | version u16 | machine str16
//!            | csr bytes32 (PKCS #10, DER) | proof [32]
//!            proof = HMAC(K, "lifeboat register request v1" | export | machine
//!                             | csr)
//! registered (server → agent) 65: cert bytes32 (PEM) | ca bytes32 (PEM)
//!            | proof [32]
//!            proof = HMAC(K, "lifeboat register reply v1" | export
//!                             | request proof | cert | ca)
//! refused    (server → agent) 66: code u16 | message str16
//! ```
//!
//! `K` = SHA-256("lifeboat registration passphrase v1" | 0 | the passphrase
//! with spaces and '-' removed, in upper case); `export` = 32 bytes of the TLS
//! exporter with label [`EXPORTER_LABEL`] and no context. A passphrase is
//! [`PASSPHRASE_GROUPS`] groups of 5 characters of a 32-letter alphabet (125
//! random bits), so the proof an impostor server collects cannot be searched
//! for the passphrase.

use ring::hmac;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::codec::{DecodeError, Reader, Writer};

pub const MSG_REGISTER: u8 = 64;
pub const MSG_REGISTERED: u8 = 65;
pub const MSG_REFUSED: u8 = 66;
pub const MAGIC: [u8; 4] = *b"LBRG";
pub const VERSION: u16 = 1;
/// Bound of one registration message (type + body).
pub const MAX_MESSAGE_LEN: u32 = 64 * 1024;
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-lifeboat-registration";
pub const PROOF_LEN: usize = 32;
pub const PASSPHRASE_GROUPS: usize = 5;
/// Crockford's base32 alphabet: no I, L, O or U to misread.
const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// Refusal codes.
pub mod refusal {
    /// The passphrase proof did not check out.
    pub const PASSPHRASE: u16 = 1;
    /// The machine already has a certificate that is not revoked.
    pub const REGISTERED: u16 = 2;
    /// The request was malformed.
    pub const REQUEST: u16 = 3;
    /// The server could not issue (its registry or CA key).
    pub const SERVER: u16 = 4;
    /// The server does not take registrations (no `[registration]`).
    pub const DISABLED: u16 = 5;
}

/// A new random passphrase: [`PASSPHRASE_GROUPS`] groups of five characters of
/// the alphabet above, joined by '-'.
pub fn new_passphrase() -> String {
    use ring::rand::SecureRandom;
    let mut raw = [0u8; PASSPHRASE_GROUPS * 5];
    ring::rand::SystemRandom::new()
        .fill(&mut raw)
        .expect("the system's random source failed");
    let mut out = String::with_capacity(raw.len() + PASSPHRASE_GROUPS);
    for (i, b) in raw.iter().enumerate() {
        if i > 0 && i % 5 == 0 {
            out.push('-');
        }
        out.push(ALPHABET[(*b & 31) as usize] as char);
    }
    out
}

/// The proof key of a passphrase; `None` when nothing is left of it.
pub fn passphrase_key(passphrase: &str) -> Option<[u8; 32]> {
    let norm: String = passphrase
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '-')
        .flat_map(char::to_uppercase)
        .collect();
    if norm.is_empty() {
        return None;
    }
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"lifeboat registration passphrase v1\0");
    ctx.update(norm.as_bytes());
    let mut key = [0u8; 32];
    key.copy_from_slice(ctx.finish().as_ref());
    Some(key)
}

/// Each part with its length, so that no two splits of the same bytes give
/// the same message.
fn proof_message(parts: &[&[u8]]) -> Vec<u8> {
    let mut m = Vec::with_capacity(parts.iter().map(|p| p.len() + 8).sum());
    for p in parts {
        m.extend_from_slice(&(p.len() as u64).to_be_bytes());
        m.extend_from_slice(p);
    }
    m
}

fn proof(key: &[u8; 32], parts: &[&[u8]]) -> [u8; PROOF_LEN] {
    let k = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut out = [0u8; PROOF_LEN];
    out.copy_from_slice(hmac::sign(&k, &proof_message(parts)).as_ref());
    out
}

/// Compared in constant time (`ring::hmac::verify`).
fn proof_matches(key: &[u8; 32], parts: &[&[u8]], got: &[u8; PROOF_LEN]) -> bool {
    let k = hmac::Key::new(hmac::HMAC_SHA256, key);
    hmac::verify(&k, &proof_message(parts), got).is_ok()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub machine: String,
    pub csr_der: Vec<u8>,
    pub proof: [u8; PROOF_LEN],
}

impl Request {
    pub fn new(key: &[u8; 32], export: &[u8; 32], machine: &str, csr_der: Vec<u8>) -> Request {
        let proof = proof(key, &request_parts(export, machine, &csr_der));
        Request {
            machine: machine.to_string(),
            csr_der,
            proof,
        }
    }

    /// Whether `key` made this request's proof in the session of `export`.
    pub fn proven_by(&self, key: &[u8; 32], export: &[u8; 32]) -> bool {
        proof_matches(
            key,
            &request_parts(export, &self.machine, &self.csr_der),
            &self.proof,
        )
    }
}

fn request_parts<'a>(export: &'a [u8; 32], machine: &'a str, csr: &'a [u8]) -> [&'a [u8]; 4] {
    [
        b"lifeboat register request v1",
        export,
        machine.as_bytes(),
        csr,
    ]
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub cert_pem: String,
    pub ca_pem: String,
    pub proof: [u8; PROOF_LEN],
}

impl Reply {
    pub fn new(
        key: &[u8; 32],
        export: &[u8; 32],
        request: &Request,
        cert_pem: String,
        ca_pem: String,
    ) -> Reply {
        let proof = proof(
            key,
            &reply_parts(export, &request.proof, &cert_pem, &ca_pem),
        );
        Reply {
            cert_pem,
            ca_pem,
            proof,
        }
    }

    /// Whether the server that sent this reply to `request` knew `key`.
    pub fn proven_by(&self, key: &[u8; 32], export: &[u8; 32], request: &Request) -> bool {
        proof_matches(
            key,
            &reply_parts(export, &request.proof, &self.cert_pem, &self.ca_pem),
            &self.proof,
        )
    }
}

fn reply_parts<'a>(
    export: &'a [u8; 32],
    request_proof: &'a [u8; PROOF_LEN],
    cert: &'a str,
    ca: &'a str,
) -> [&'a [u8]; 5] {
    [
        b"lifeboat register reply v1",
        export,
        request_proof,
        cert.as_bytes(),
        ca.as_bytes(),
    ]
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Register(Request),
    Registered(Reply),
    Refused { code: u16, message: String },
}

fn put_bytes32(out: &mut Vec<u8>, b: &[u8]) {
    out.put_u32(b.len() as u32);
    out.extend_from_slice(b);
}

fn bytes32<'a>(r: &mut Reader<'a>, what: &'static str) -> Result<&'a [u8], DecodeError> {
    let n = r.u32(what)? as usize;
    r.bytes(n, what)
}

fn text32(r: &mut Reader<'_>, what: &'static str) -> Result<String, DecodeError> {
    String::from_utf8(bytes32(r, what)?.to_vec()).map_err(|_| DecodeError::Invalid {
        what,
        detail: "not UTF-8".into(),
    })
}

impl Message {
    /// The message with its length header.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        let ty = match self {
            Message::Register(q) => {
                body.extend_from_slice(&MAGIC);
                body.put_u16(VERSION);
                body.put_str16(&q.machine);
                put_bytes32(&mut body, &q.csr_der);
                body.extend_from_slice(&q.proof);
                MSG_REGISTER
            }
            Message::Registered(r) => {
                put_bytes32(&mut body, r.cert_pem.as_bytes());
                put_bytes32(&mut body, r.ca_pem.as_bytes());
                body.extend_from_slice(&r.proof);
                MSG_REGISTERED
            }
            Message::Refused { code, message } => {
                body.put_u16(*code);
                body.put_str16(message);
                MSG_REFUSED
            }
        };
        let mut out = Vec::with_capacity(5 + body.len());
        out.put_u32(1 + body.len() as u32);
        out.put_u8(ty);
        out.extend_from_slice(&body);
        out
    }

    /// Decodes a message of type `ty` with `body`.
    pub fn decode(ty: u8, body: &[u8]) -> Result<Message, DecodeError> {
        let mut r = Reader::new(body);
        let m = match ty {
            MSG_REGISTER => {
                let magic: [u8; 4] = r.array("register magic")?;
                if magic != MAGIC {
                    return Err(DecodeError::Invalid {
                        what: "register magic",
                        detail: format!("{magic:02x?}"),
                    });
                }
                let version = r.u16("register version")?;
                if version != VERSION {
                    return Err(DecodeError::Invalid {
                        what: "register version",
                        detail: format!("{version} (this side speaks {VERSION})"),
                    });
                }
                let machine = r.str16("register machine")?;
                let csr_der = bytes32(&mut r, "register csr")?.to_vec();
                let proof = r.array("register proof")?;
                Message::Register(Request {
                    machine,
                    csr_der,
                    proof,
                })
            }
            MSG_REGISTERED => {
                let cert_pem = text32(&mut r, "registered certificate")?;
                let ca_pem = text32(&mut r, "registered ca")?;
                let proof = r.array("registered proof")?;
                Message::Registered(Reply {
                    cert_pem,
                    ca_pem,
                    proof,
                })
            }
            MSG_REFUSED => Message::Refused {
                code: r.u16("refused code")?,
                message: r.str16("refused message")?,
            },
            other => {
                return Err(DecodeError::Invalid {
                    what: "registration message type",
                    detail: format!("{other} (a stream-protocol frame on a connection without a client certificate?)"),
                })
            }
        };
        r.finish("registration message")?;
        Ok(m)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("the peer closed the connection before a registration message")]
    Closed,
    #[error("registration message of {0} bytes (at most {MAX_MESSAGE_LEN})")]
    TooLong(u32),
    #[error("malformed registration message: {0}")]
    Decode(#[from] DecodeError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads one message (at most [`MAX_MESSAGE_LEN`] bytes).
pub async fn read_message<R: AsyncRead + Unpin>(r: &mut R) -> Result<Message, ReadError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(ReadError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len);
    if len == 0 || len > MAX_MESSAGE_LEN {
        return Err(ReadError::TooLong(len));
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf).await?;
    Ok(Message::decode(buf[0], &buf[1..])?)
}

pub async fn write_message<W: AsyncWrite + Unpin>(w: &mut W, m: &Message) -> std::io::Result<()> {
    w.write_all(&m.encode()).await?;
    w.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXPORT: [u8; 32] = [7; 32];

    #[test]
    fn passphrases_are_random_grouped_and_normalised() {
        let a = new_passphrase();
        let b = new_passphrase();
        assert_ne!(a, b);
        assert_eq!(a.len(), PASSPHRASE_GROUPS * 6 - 1);
        assert_eq!(a.split('-').count(), PASSPHRASE_GROUPS);
        let typed = format!("  {} \n", a.to_lowercase().replace('-', " "));
        assert_eq!(passphrase_key(&a), passphrase_key(&typed));
        assert_ne!(passphrase_key(&a), passphrase_key(&b));
        assert_eq!(passphrase_key(" - \n"), None);
    }

    #[test]
    fn a_request_proves_its_passphrase_only_in_its_own_session() {
        let k = passphrase_key("ABCDE-FGHJK").unwrap();
        let q = Request::new(&k, &EXPORT, "web-1", vec![1, 2, 3]);
        assert!(q.proven_by(&k, &EXPORT));
        let other = passphrase_key("ABCDE-FGHJM").unwrap();
        assert!(!q.proven_by(&other, &EXPORT), "another passphrase");
        assert!(!q.proven_by(&k, &[8; 32]), "another TLS session");
        let mut renamed = q.clone();
        renamed.machine = "web-2".into();
        assert!(!renamed.proven_by(&k, &EXPORT), "another machine");

        let r = Reply::new(&k, &EXPORT, &q, "cert".into(), "ca".into());
        assert!(r.proven_by(&k, &EXPORT, &q));
        assert!(!r.proven_by(&other, &EXPORT, &q));
        let mut swapped = r.clone();
        swapped.ca_pem = "another ca".into();
        assert!(!swapped.proven_by(&k, &EXPORT, &q), "a replaced CA");
    }

    #[test]
    fn messages_round_trip_and_damage_is_named() {
        let k = passphrase_key("X").unwrap();
        let q = Request::new(&k, &EXPORT, "db-1", vec![9; 300]);
        let msgs = [
            Message::Register(q.clone()),
            Message::Registered(Reply::new(&k, &EXPORT, &q, "c".into(), "a".into())),
            Message::Refused {
                code: refusal::PASSPHRASE,
                message: "no".into(),
            },
        ];
        for m in msgs {
            let wire = m.encode();
            assert_eq!(
                u32::from_be_bytes(wire[..4].try_into().unwrap()) as usize,
                wire.len() - 4
            );
            assert_eq!(Message::decode(wire[4], &wire[5..]).unwrap(), m);
            let cut = Message::decode(wire[4], &wire[5..wire.len() - 1]).unwrap_err();
            assert!(!cut.to_string().is_empty());
        }
        let hello_like = Message::decode(1, b"LBOT").unwrap_err().to_string();
        assert!(
            hello_like.contains("registration message type"),
            "{hello_like}"
        );
    }

    #[tokio::test]
    async fn an_oversized_length_is_refused_before_allocation() {
        let mut wire: &[u8] = &[0xff, 0xff, 0xff, 0xff, 64];
        let e = read_message(&mut wire).await.unwrap_err();
        assert!(matches!(e, ReadError::TooLong(_)), "{e}");
    }
}
