//! Serves a raw image file or block device over NBD on a unix socket, with no
//! replication: the baseline for `bench/nbd-frontend.sh`.
//!
//! `cargo run --release -p lifeboat-agent --example nbd-file -- IMAGE SOCKET [auto|uring|portable|null]`
//!
//! `null` serves a disk of IMAGE's size that discards writes and reads zeros: it
//! measures the NBD layer alone.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use lifeboat_agent::capture::file::FileBackend;
use lifeboat_agent::capture::nbd::{serve_unix, Exports};
use lifeboat_agent::capture::BlockBackend;
use lifeboat_agent::diskio::{DiskFile, IoMode};
use tokio_util::sync::CancellationToken;

/// Discards writes, reads zeros.
struct NullBackend(u64);

impl BlockBackend for NullBackend {
    fn size(&self) -> u64 {
        self.0
    }
    async fn read(&self, _offset: u64, len: u32) -> io::Result<Bytes> {
        Ok(Bytes::from(vec![0; len as usize]))
    }
    async fn write(&self, _offset: u64, _data: Bytes, _fua: bool) -> io::Result<()> {
        Ok(())
    }
    async fn zero(&self, _offset: u64, _len: u32, _fua: bool) -> io::Result<()> {
        Ok(())
    }
    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

async fn serve<B: BlockBackend>(socket: &std::path::Path, backend: B) -> anyhow::Result<()> {
    let exports = Arc::new(Exports::single("disk", Arc::new(backend)));
    let shutdown = CancellationToken::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let stop = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        stop.cancel();
    });
    serve_unix(socket, exports, shutdown).await?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: nbd-file IMAGE SOCKET [auto|uring|portable]";
    let image = PathBuf::from(args.next().ok_or_else(|| anyhow::anyhow!(usage))?);
    let socket = PathBuf::from(args.next().ok_or_else(|| anyhow::anyhow!(usage))?);
    let mode = args.next().unwrap_or_else(|| "auto".to_string());
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        if mode == "null" {
            let size = std::fs::metadata(&image)?.len();
            eprintln!(
                "serving a null disk of {size} bytes on {}",
                socket.display()
            );
            return serve(&socket, NullBackend(size)).await;
        }
        let mode: IoMode = mode.parse().map_err(anyhow::Error::msg)?;
        let disk = DiskFile::open(&image, mode)?;
        eprintln!(
            "serving {} ({} bytes, {}) on {}",
            image.display(),
            disk.size(),
            disk.mode(),
            socket.display()
        );
        serve(&socket, FileBackend(disk)).await
    })
}
