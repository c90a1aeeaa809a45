//! A connection's stream with the hello and idle deadlines, for both
//! receivers (process server, master target).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A connection's stream with the hello and idle deadlines: reads fail with
/// `TimedOut` once `hello` passes before the server first wrote (the welcome
/// or an error answers the hello), or once nothing arrived for `idle`.
pub struct Limited<IO> {
    io: IO,
    hello: Option<Pin<Box<tokio::time::Sleep>>>,
    idle: Duration,
    idle_timer: Pin<Box<tokio::time::Sleep>>,
    /// A read is waiting (the idle clock runs only while the server waits
    /// for the peer, not while it is busy elsewhere).
    waiting: bool,
}

impl<IO> Limited<IO> {
    pub fn new(io: IO, hello: Duration, idle: Duration) -> Self {
        Limited {
            io,
            hello: Some(Box::pin(tokio::time::sleep(hello))),
            idle,
            idle_timer: Box::pin(tokio::time::sleep(idle)),
            waiting: false,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Limited<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if let Some(h) = this.hello.as_mut() {
            if h.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no hello within hello-timeout",
                )));
            }
        }
        if !this.waiting {
            this.waiting = true;
            let at = tokio::time::Instant::now() + this.idle;
            this.idle_timer.as_mut().reset(at);
        }
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                this.waiting = false;
                Poll::Ready(r)
            }
            Poll::Pending => {
                if this.idle_timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "idle for idle-timeout",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Limited<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.hello = None; // the hello was answered
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
