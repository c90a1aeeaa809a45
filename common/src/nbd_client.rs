//! A small NBD client: what failover needs to write a recovered disk onto an
//! export served by qemu-nbd or nbdkit on the target host, and to read it back
//! for the checksum comparison.
//!
//! URIs (the NBD URI specification's forms without TLS):
//!
//! ```text
//! nbd://HOST[:PORT][/EXPORT]              TCP, port 10809 by default
//! nbd+unix:///[EXPORT]?socket=PATH        a unix socket
//! ```
//!
//! Handshake: fixed newstyle only. `NBD_OPT_GO` with the export name, reading
//! the `NBD_INFO_EXPORT` reply (size, transmission flags); a server that does
//! not know `GO` gets `NBD_OPT_EXPORT_NAME` instead. A read-only export is
//! refused. Transmission: simple replies only (no structured replies are
//! negotiated); READ, WRITE, WRITE_ZEROES (where the export offers it, else
//! zero buffers are written), FLUSH, DISC. Up to [`WINDOW`] requests are in
//! flight: a request is sent, and a reply read once the window is full, so
//! writes stream at the socket's speed. An error reply names the request.
//!
//! Written here, not taken from a crate: the `nbd` crate (0.3) is synchronous,
//! handshakes with `EXPORT_NAME` only and has no write-zeroes; libnbd's
//! bindings need the C library on every target host.

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use crate::nbd_proto::*;

/// The IANA port of NBD.
pub const DEFAULT_PORT: u16 = 10809;
/// Requests in flight at once.
pub const WINDOW: usize = 16;
/// The largest READ or WRITE sent (servers accept at least 32 MiB).
pub const MAX_IO: usize = 4 << 20;
/// The largest WRITE_ZEROES sent.
const MAX_ZEROES: u64 = 1 << 30;

/// Where an export is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddr {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub addr: NbdAddr,
    pub export: String,
    /// The URI as given, for messages.
    pub text: String,
}

impl NbdUri {
    /// Whether `s` is meant as an NBD URI (so a path is never taken for one).
    pub fn looks_like(s: &str) -> bool {
        s.starts_with("nbd://") || s.starts_with("nbd+unix://")
    }

    pub fn parse(s: &str) -> Result<NbdUri> {
        let url = url::Url::parse(s).with_context(|| format!("{s} is not an NBD URI"))?;
        let export = url.path().strip_prefix('/').unwrap_or(url.path());
        let export = percent_encoding::percent_decode_str(export)
            .decode_utf8()
            .with_context(|| format!("{s}: the export name is not UTF-8"))?
            .into_owned();
        let addr = match url.scheme() {
            "nbd" => NbdAddr::Tcp {
                host: url
                    .host_str()
                    .ok_or_else(|| anyhow!("{s}: an nbd:// URI needs a host"))?
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string(),
                port: url.port().unwrap_or(DEFAULT_PORT),
            },
            "nbd+unix" => {
                let socket = url
                    .query_pairs()
                    .find(|(k, _)| k == "socket")
                    .map(|(_, v)| PathBuf::from(v.into_owned()))
                    .ok_or_else(|| anyhow!("{s}: an nbd+unix:// URI needs ?socket=PATH"))?;
                NbdAddr::Unix(socket)
            }
            other => bail!(
                "{s}: scheme {other} is not supported (nbd:// or nbd+unix://; TLS schemes are not)"
            ),
        };
        Ok(NbdUri {
            addr,
            export,
            text: s.to_string(),
        })
    }
}

trait Conn: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Conn for T {}

/// What a request in flight expects back.
struct Pending {
    what: &'static str,
    offset: u64,
    len: u64,
    /// For a READ: where its data goes once the reply arrives.
    read: bool,
}

/// A connected export in transmission.
pub struct NbdClient {
    conn: BufReader<Pin<Box<dyn Conn>>>,
    uri: String,
    size: u64,
    flags: u16,
    cookie: u64,
    pending: HashMap<u64, Pending>,
    /// Data of completed READs, by cookie.
    reads: HashMap<u64, Vec<u8>>,
}

impl NbdClient {
    /// Connects and negotiates the export `uri` names.
    pub async fn connect(uri: &NbdUri) -> Result<NbdClient> {
        let conn: Pin<Box<dyn Conn>> = match &uri.addr {
            NbdAddr::Tcp { host, port } => {
                let s = tokio::net::TcpStream::connect((host.as_str(), *port))
                    .await
                    .with_context(|| format!("connecting to {}", uri.text))?;
                s.set_nodelay(true)
                    .with_context(|| format!("setting TCP_NODELAY on {}", uri.text))?;
                Box::pin(s)
            }
            NbdAddr::Unix(path) => Box::pin(
                tokio::net::UnixStream::connect(path)
                    .await
                    .with_context(|| format!("connecting to {}", uri.text))?,
            ),
        };
        let mut c = NbdClient {
            conn: BufReader::with_capacity(MAX_IO + 64, conn),
            uri: uri.text.clone(),
            size: 0,
            flags: 0,
            cookie: 0,
            pending: HashMap::new(),
            reads: HashMap::new(),
        };
        tokio::time::timeout(std::time::Duration::from_secs(30), c.handshake(&uri.export))
            .await
            .map_err(|_| anyhow!("{}: the NBD handshake did not finish in 30 s", uri.text))?
            .with_context(|| format!("negotiating {}", uri.text))?;
        if c.flags & TF_READ_ONLY != 0 {
            bail!("{} is a read-only export", uri.text);
        }
        Ok(c)
    }

    async fn handshake(&mut self, export: &str) -> Result<()> {
        let c = &mut self.conn;
        if c.read_u64().await? != NBDMAGIC || c.read_u64().await? != IHAVEOPT {
            bail!("not an NBD server speaking the newstyle handshake");
        }
        let server = c.read_u16().await?;
        if server & FLAG_FIXED_NEWSTYLE == 0 {
            bail!("the server does not offer the fixed newstyle handshake");
        }
        let no_zeroes = server & FLAG_NO_ZEROES != 0;
        let mine = FLAG_FIXED_NEWSTYLE as u32 | if no_zeroes { FLAG_NO_ZEROES as u32 } else { 0 };
        c.write_u32(mine).await?;
        // GO: u32 name length, name, u16 0 information requests.
        let mut data = Vec::with_capacity(export.len() + 6);
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        send_option(c, OPT_GO, &data).await?;
        let mut got_export = false;
        loop {
            if c.read_u64().await? != OPT_REPLY_MAGIC {
                bail!("bad option reply magic");
            }
            let _opt = c.read_u32().await?;
            let kind = c.read_u32().await?;
            let len = c.read_u32().await?;
            if len > 64 << 10 {
                bail!("option reply of {len} bytes");
            }
            let mut body = vec![0u8; len as usize];
            c.read_exact(&mut body).await?;
            match kind {
                REP_ACK if got_export => return Ok(()),
                REP_ACK => bail!("the server ended GO without the export's size"),
                REP_INFO
                    if body.len() >= 12
                        && u16::from_be_bytes([body[0], body[1]]) == INFO_EXPORT =>
                {
                    self.size = u64::from_be_bytes(body[2..10].try_into().expect("8 bytes"));
                    self.flags = u16::from_be_bytes([body[10], body[11]]);
                    got_export = true;
                }
                REP_INFO => {}
                REP_ERR_UNSUP => break,
                k if k & 0x8000_0000 != 0 => bail!(
                    "the server refused export {export:?} (error {:#x}{})",
                    k,
                    if body.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", String::from_utf8_lossy(&body))
                    }
                ),
                _ => {}
            }
        }
        // An old server: EXPORT_NAME, answered with size and flags directly.
        send_option(c, OPT_EXPORT_NAME, export.as_bytes()).await?;
        self.size = c.read_u64().await?;
        self.flags = c.read_u16().await?;
        if !no_zeroes {
            let mut pad = [0u8; 124];
            c.read_exact(&mut pad).await?;
        }
        Ok(())
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the export takes WRITE_ZEROES (else [`Self::write_zeroes`]
    /// writes zero buffers).
    pub fn can_write_zeroes(&self) -> bool {
        self.flags & TF_SEND_WRITE_ZEROES != 0
    }

    fn check(&self, what: &str, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            bail!(
                "{}: {what} of {len} bytes at {offset} is past the export's end ({} bytes)",
                self.uri,
                self.size
            );
        }
        Ok(())
    }

    async fn send(
        &mut self,
        cmd: u16,
        offset: u64,
        len: u32,
        data: &[u8],
        p: Pending,
    ) -> Result<u64> {
        while self.pending.len() >= WINDOW {
            self.reply().await?;
        }
        self.cookie += 1;
        let mut hdr = [0u8; 28];
        hdr[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        hdr[6..8].copy_from_slice(&cmd.to_be_bytes());
        hdr[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        hdr[16..24].copy_from_slice(&offset.to_be_bytes());
        hdr[24..28].copy_from_slice(&len.to_be_bytes());
        let w = self.conn.get_mut();
        w.write_all(&hdr).await.map_err(|e| self.lost(e))?;
        if !data.is_empty() {
            let w = self.conn.get_mut();
            w.write_all(data).await.map_err(|e| self.lost(e))?;
        }
        self.pending.insert(self.cookie, p);
        Ok(self.cookie)
    }

    fn lost(&self, e: io::Error) -> anyhow::Error {
        anyhow!("{}: the connection failed: {e}", self.uri)
    }

    /// Reads one reply; an error reply fails, naming its request.
    async fn reply(&mut self) -> Result<()> {
        let c = &mut self.conn;
        let magic = c
            .read_u32()
            .await
            .map_err(|e| anyhow!("{}: reading a reply: {e}", self.uri))?;
        if magic != SIMPLE_REPLY_MAGIC {
            bail!("{}: bad reply magic {magic:#x}", self.uri);
        }
        let error = c
            .read_u32()
            .await
            .map_err(|e| anyhow!("{}: reading a reply: {e}", self.uri))?;
        let cookie = c
            .read_u64()
            .await
            .map_err(|e| anyhow!("{}: reading a reply: {e}", self.uri))?;
        let p = self
            .pending
            .remove(&cookie)
            .ok_or_else(|| anyhow!("{}: a reply to no request (cookie {cookie})", self.uri))?;
        if error != 0 {
            bail!(
                "{}: the server failed {} of {} bytes at {} with error {} ({})",
                self.uri,
                p.what,
                p.len,
                p.offset,
                error,
                io::Error::from_raw_os_error(error as i32)
            );
        }
        if p.read {
            let mut buf = vec![0u8; p.len as usize];
            self.conn
                .read_exact(&mut buf)
                .await
                .map_err(|e| anyhow!("{}: reading data: {e}", self.uri))?;
            self.reads.insert(cookie, buf);
        }
        Ok(())
    }

    /// Queues a write of `data` at `offset` (split at [`MAX_IO`]).
    pub async fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.check("a write", offset, data.len() as u64)?;
        for (i, piece) in data.chunks(MAX_IO).enumerate() {
            let at = offset + (i * MAX_IO) as u64;
            let p = Pending {
                what: "a write",
                offset: at,
                len: piece.len() as u64,
                read: false,
            };
            self.send(CMD_WRITE, at, piece.len() as u32, piece, p)
                .await?;
        }
        Ok(())
    }

    /// Queues making `offset..offset+len` read as zeros.
    pub async fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check("a zeroing", offset, len)?;
        let mut pos = offset;
        let end = offset + len;
        if !self.can_write_zeroes() {
            let zeros = vec![0u8; MAX_IO];
            while pos < end {
                let n = (end - pos).min(MAX_IO as u64) as usize;
                self.write(pos, &zeros[..n]).await?;
                pos += n as u64;
            }
            return Ok(());
        }
        while pos < end {
            let n = (end - pos).min(MAX_ZEROES);
            let p = Pending {
                what: "a zeroing",
                offset: pos,
                len: n,
                read: false,
            };
            self.send(CMD_WRITE_ZEROES, pos, n as u32, &[], p).await?;
            pos += n;
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset` (at most [`MAX_IO`]).
    pub async fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>> {
        if len > MAX_IO {
            bail!("a read of {len} bytes is over {MAX_IO}");
        }
        self.check("a read", offset, len as u64)?;
        let p = Pending {
            what: "a read",
            offset,
            len: len as u64,
            read: true,
        };
        let cookie = self.send(CMD_READ, offset, len as u32, &[], p).await?;
        while !self.reads.contains_key(&cookie) {
            self.reply().await?;
        }
        Ok(self.reads.remove(&cookie).expect("present"))
    }

    /// Waits for every request in flight, then (where the export offers it)
    /// FLUSH: everything written is durable on the server afterwards.
    pub async fn flush(&mut self) -> Result<()> {
        while !self.pending.is_empty() {
            self.reply().await?;
        }
        if self.flags & TF_SEND_FLUSH != 0 {
            let p = Pending {
                what: "a flush",
                offset: 0,
                len: 0,
                read: false,
            };
            self.send(CMD_FLUSH, 0, 0, &[], p).await?;
            while !self.pending.is_empty() {
                self.reply().await?;
            }
        }
        Ok(())
    }

    /// Flushes, then ends the session politely.
    pub async fn disconnect(mut self) -> Result<()> {
        self.flush().await?;
        let mut hdr = [0u8; 28];
        hdr[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        hdr[6..8].copy_from_slice(&CMD_DISC.to_be_bytes());
        let w = self.conn.get_mut();
        let _ = w.write_all(&hdr).await;
        let _ = w.shutdown().await;
        Ok(())
    }
}

async fn send_option<W: AsyncWrite + Unpin>(w: &mut W, opt: u32, data: &[u8]) -> io::Result<()> {
    let mut hdr = Vec::with_capacity(16 + data.len());
    hdr.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hdr.extend_from_slice(&opt.to_be_bytes());
    hdr.extend_from_slice(&(data.len() as u32).to_be_bytes());
    hdr.extend_from_slice(data);
    w.write_all(&hdr).await?;
    w.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse_as_the_nbd_uri_spec_says() {
        let u = NbdUri::parse("nbd://10.0.0.5:10900/disk0").unwrap();
        assert_eq!(
            u.addr,
            NbdAddr::Tcp {
                host: "10.0.0.5".into(),
                port: 10900
            }
        );
        assert_eq!(u.export, "disk0");
        let u = NbdUri::parse("nbd://host").unwrap();
        assert_eq!(
            u.addr,
            NbdAddr::Tcp {
                host: "host".into(),
                port: DEFAULT_PORT
            }
        );
        assert_eq!(u.export, "");
        let u = NbdUri::parse("nbd+unix:///exp%20one?socket=/run/q.sock").unwrap();
        assert_eq!(u.addr, NbdAddr::Unix("/run/q.sock".into()));
        assert_eq!(u.export, "exp one");
        assert!(NbdUri::parse("nbd+unix:///x").is_err());
        assert!(NbdUri::parse("nbds://host/x").is_err());
        assert!(NbdUri::looks_like("nbd://h/e"));
        assert!(!NbdUri::looks_like("/dev/sdb"));
    }
}
