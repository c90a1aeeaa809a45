//! The NBD server (`nbd_server.rs`): the input is everything a client sends
//! (handshake, options, requests) on one connection to an 8 MiB in-memory
//! export; the server's replies are drained and dropped. It must neither
//! panic nor hang (the client's end closes after the input).
#![no_main]

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use lifeboat_common::nbd_server::{serve_connection, BlockBackend, Exports};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SIZE: u64 = 8 << 20;

struct Mem(Mutex<Vec<u8>>);

impl BlockBackend for Mem {
    fn size(&self) -> u64 {
        SIZE
    }
    async fn read(&self, offset: u64, len: u32) -> std::io::Result<Bytes> {
        let d = self.0.lock().unwrap();
        let (o, n) = (offset as usize, len as usize);
        assert!(
            o + n <= d.len(),
            "read past the end reached the backend: {o}+{n}"
        );
        Ok(Bytes::copy_from_slice(&d[o..o + n]))
    }
    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> std::io::Result<()> {
        let mut d = self.0.lock().unwrap();
        let o = offset as usize;
        assert!(
            o + data.len() <= d.len(),
            "write past the end reached the backend"
        );
        d[o..o + data.len()].copy_from_slice(&data);
        Ok(())
    }
    async fn zero(&self, offset: u64, len: u32, _fua: bool) -> std::io::Result<()> {
        let mut d = self.0.lock().unwrap();
        let (o, n) = (offset as usize, len as usize);
        assert!(o + n <= d.len(), "zero past the end reached the backend");
        d[o..o + n].fill(0);
        Ok(())
    }
    async fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let backend = Arc::new(Mem(Mutex::new(vec![0; SIZE as usize])));
        let exports = Arc::new(Exports::single("disk", backend));
        let (client, server) = tokio::io::duplex(1 << 20);
        let srv = tokio::spawn(serve_connection(
            server,
            exports,
            tokio_util::sync::CancellationToken::new(),
        ));
        let (mut rd, mut wr) = tokio::io::split(client);
        let drain = tokio::spawn(async move {
            let mut buf = vec![0u8; 1 << 16];
            while let Ok(n) = rd.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        });
        let _ = wr.write_all(data).await;
        let _ = wr.shutdown().await;
        let done = tokio::time::timeout(std::time::Duration::from_secs(5), srv).await;
        assert!(
            done.is_ok(),
            "the server did not finish within 5 s of the client's end"
        );
        drop(wr);
        let _ = drain.await;
    });
});
