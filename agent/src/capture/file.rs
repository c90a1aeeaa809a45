//! A plain image file served without replication: the reference backend for the
//! NBD front-end's tests and its benchmark (`examples/nbd-file.rs`).

use std::io;

use bytes::Bytes;

use super::BlockBackend;
use crate::diskio::DiskFile;

/// Serves a [`DiskFile`] as it is; FUA writes use `RWF_DSYNC`.
pub struct FileBackend(pub DiskFile);

impl BlockBackend for FileBackend {
    fn size(&self) -> u64 {
        self.0.size()
    }
    async fn read(&self, offset: u64, len: u32) -> io::Result<Bytes> {
        self.0.read_at(offset, len as usize).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> io::Result<()> {
        if fua {
            self.0.write_at_durable(offset, data).await
        } else {
            self.0.write_at(offset, data).await
        }
    }
    async fn zero(&self, offset: u64, len: u32, fua: bool) -> io::Result<()> {
        self.0.zero_range(offset, u64::from(len)).await?;
        if fua {
            self.0.sync().await?;
        }
        Ok(())
    }
    async fn flush(&self) -> io::Result<()> {
        self.0.sync().await
    }
}
