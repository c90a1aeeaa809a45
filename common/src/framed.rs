//! Reading and writing protocol frames on an async byte stream.
//!
//! A frame's length is checked against the bound before its buffer is allocated;
//! a stream that ends inside a frame is a [`FrameError::Truncated`], one that ends
//! between frames is a clean end (`Ok(None)`).

use bytes::{Bytes, BytesMut};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::codec::DecodeError;
use crate::protocol::Frame;

#[derive(Debug, Error)]
pub enum FrameError {
    #[error("connection closed inside a frame ({got} of {expected} bytes read)")]
    Truncated { got: usize, expected: usize },
    #[error("malformed frame: {0}")]
    Decode(#[from] DecodeError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads one frame; `Ok(None)` at a clean end of stream.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    limit: u32,
) -> Result<Option<Frame>, FrameError> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut header[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(FrameError::Truncated { got, expected: 4 });
        }
        got += n;
    }
    let len = Frame::check_header(header, limit)? as usize;
    let mut body = BytesMut::zeroed(len);
    let mut got = 0;
    while got < len {
        let n = r.read(&mut body[got..]).await?;
        if n == 0 {
            return Err(FrameError::Truncated {
                got: got + 4,
                expected: len + 4,
            });
        }
        got += n;
    }
    Ok(Some(Frame::decode(Bytes::from(body))?))
}

/// Writes one frame (not flushed).
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> std::io::Result<()> {
    let buf = frame.to_bytes();
    w.write_all(&buf).await
}
