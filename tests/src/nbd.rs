//! A small synchronous NBD client for tests: fixed newstyle handshake with
//! `NBD_OPT_GO`, simple replies, one request at a time, any request size the
//! server accepts (the agent's export takes up to 32 MiB).
//!
//! ```text
//! server: "NBDMAGIC" | "IHAVEOPT" | u16 flags
//! client: u32 flags (FIXED_NEWSTYLE | NO_ZEROES)
//! option: "IHAVEOPT" | u32 GO(7) | u32 len | u32 name-len, name, u16 0 (no info requests)
//! reply:  u64 0x3e889045565a9 | u32 option | u32 type | u32 len | data  … until ACK(1)
//! request: u32 0x25609513 | u16 flags | u16 type | u64 cookie | u64 offset | u32 len | data
//! reply:   u32 0x67446698 | u32 error | u64 cookie | data (READ)
//! ```
//!
//! Every call has a socket timeout ([`IO_TIMEOUT`]), so a wedged server fails
//! the test instead of hanging it.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// Longest any one request (or handshake step) may take.
pub const IO_TIMEOUT: Duration = Duration::from_secs(120);

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const INFO_EXPORT: u16 = 0;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
/// Command flag: force unit access.
pub const FLAG_FUA: u16 = 1;

/// The export answered a request with an NBD error (the connection is
/// fine); a transport failure is another error.
#[derive(Debug)]
pub struct NbdReplyError {
    pub what: String,
    pub code: u32,
}

impl std::fmt::Display for NbdReplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "server answered {} with NBD error {}",
            self.what, self.code
        )
    }
}

impl std::error::Error for NbdReplyError {}

/// One NBD connection in transmission phase.
pub struct NbdClient {
    sock: UnixStream,
    /// The export's size in bytes.
    pub size: u64,
    /// Transmission flags the server sent.
    pub flags: u16,
    cookie: u64,
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

impl NbdClient {
    /// Connects to the unix socket and negotiates export `name` with `NBD_OPT_GO`.
    pub fn connect(socket: &Path, name: &str) -> Result<NbdClient> {
        let mut sock = UnixStream::connect(socket)
            .with_context(|| format!("connecting to NBD socket {}", socket.display()))?;
        sock.set_read_timeout(Some(IO_TIMEOUT))?;
        sock.set_write_timeout(Some(IO_TIMEOUT))?;
        let mut hello = [0u8; 18];
        sock.read_exact(&mut hello)
            .context("reading the NBD greeting")?;
        if u64::from_be_bytes(hello[..8].try_into()?) != NBDMAGIC
            || u64::from_be_bytes(hello[8..16].try_into()?) != IHAVEOPT
        {
            bail!("not a fixed-newstyle NBD server: {hello:02x?}");
        }
        // FIXED_NEWSTYLE | NO_ZEROES
        sock.write_all(&3u32.to_be_bytes())?;
        let mut data = Vec::new();
        data.extend_from_slice(&(name.len() as u32).to_be_bytes());
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut opt = Vec::new();
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
        opt.extend_from_slice(&data);
        sock.write_all(&opt)?;
        let (mut size, mut flags) = (None, 0u16);
        loop {
            let mut h = [0u8; 20];
            sock.read_exact(&mut h).context("reading an option reply")?;
            if u64::from_be_bytes(h[..8].try_into()?) != OPT_REPLY_MAGIC {
                bail!("bad option reply magic: {h:02x?}");
            }
            let kind = u32::from_be_bytes(h[12..16].try_into()?);
            let len = u32::from_be_bytes(h[16..20].try_into()?);
            if len > 64 << 10 {
                bail!("option reply of {len} bytes");
            }
            let mut body = vec![0u8; len as usize];
            sock.read_exact(&mut body)?;
            match kind {
                REP_ACK => break,
                REP_INFO if body.len() >= 12 && be_u16(&body) == INFO_EXPORT => {
                    size = Some(u64::from_be_bytes(body[2..10].try_into()?));
                    flags = be_u16(&body[10..12]);
                }
                REP_INFO => {}
                k if k & 0x8000_0000 != 0 => bail!(
                    "server refused NBD_OPT_GO for export {name:?}: error 0x{k:x} {}",
                    String::from_utf8_lossy(&body)
                ),
                k => bail!("unexpected option reply type {k}"),
            }
        }
        let size = size.context("NBD_OPT_GO ended without NBD_INFO_EXPORT")?;
        Ok(NbdClient {
            sock,
            size,
            flags,
            cookie: 0,
        })
    }

    fn request(&mut self, kind: u16, flags: u16, offset: u64, len: u32, data: &[u8]) -> Result<()> {
        self.cookie += 1;
        let mut h = Vec::with_capacity(28);
        h.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h.extend_from_slice(&flags.to_be_bytes());
        h.extend_from_slice(&kind.to_be_bytes());
        h.extend_from_slice(&self.cookie.to_be_bytes());
        h.extend_from_slice(&offset.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        self.sock.write_all(&h)?;
        if !data.is_empty() {
            self.sock.write_all(data)?;
        }
        Ok(())
    }

    /// Reads the simple reply to the last request; `Err` for a transport
    /// failure or a nonzero NBD error (named in the message).
    fn reply(&mut self, what: &str, data: &mut [u8]) -> Result<()> {
        let mut r = [0u8; 16];
        self.sock
            .read_exact(&mut r)
            .with_context(|| format!("reading the reply to {what}"))?;
        if u32::from_be_bytes(r[..4].try_into()?) != SIMPLE_REPLY_MAGIC {
            bail!("bad reply magic to {what}: {r:02x?}");
        }
        let err = u32::from_be_bytes(r[4..8].try_into()?);
        let cookie = u64::from_be_bytes(r[8..16].try_into()?);
        if cookie != self.cookie {
            bail!("reply cookie {cookie} to {what}, expected {}", self.cookie);
        }
        if err != 0 {
            return Err(NbdReplyError {
                what: what.to_string(),
                code: err,
            }
            .into());
        }
        if !data.is_empty() {
            self.sock.read_exact(data)?;
        }
        Ok(())
    }

    pub fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> Result<()> {
        self.request(CMD_WRITE, flags, offset, data.len() as u32, data)?;
        self.reply(&format!("WRITE {}@{offset}", data.len()), &mut [])
    }

    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.request(CMD_READ, 0, offset, buf.len() as u32, &[])?;
        self.reply(&format!("READ {}@{offset}", buf.len()), buf)
    }

    pub fn flush(&mut self) -> Result<()> {
        self.request(CMD_FLUSH, 0, 0, 0, &[])?;
        self.reply("FLUSH", &mut [])
    }

    pub fn trim(&mut self, offset: u64, len: u32) -> Result<()> {
        self.request(CMD_TRIM, 0, offset, len, &[])?;
        self.reply(&format!("TRIM {len}@{offset}"), &mut [])
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u32, flags: u16) -> Result<()> {
        self.request(CMD_WRITE_ZEROES, flags, offset, len, &[])?;
        self.reply(&format!("WRITE_ZEROES {len}@{offset}"), &mut [])
    }

    /// Sends NBD_CMD_DISC (no reply) and closes.
    pub fn disconnect(mut self) {
        let _ = self.request(CMD_DISC, 0, 0, 0, &[]);
    }
}
