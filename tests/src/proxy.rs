//! A TCP proxy on 127.0.0.1 for link faults between the agent and the process
//! server: it forwards every connection to a target port and, on command, cuts
//! every live connection, stalls them (holds all bytes, both directions, for a
//! while, keeping the sockets open), delays every forwarded chunk, or sends
//! new connections to another target (a partition from one process server
//! and a route to another).
//!
//! One acceptor thread and two pump threads per connection; [`FaultProxy`]
//! stops them all (and closes every socket) when dropped.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::free_port;

const CHUNK: usize = 256 << 10;
const POLL: Duration = Duration::from_millis(10);

#[derive(Default)]
struct Faults {
    stall_until: Option<Instant>,
    delay: Option<(Instant, Duration)>,
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    target: AtomicU16,
    cut: AtomicU64,
    accepted: AtomicU64,
    faults: Mutex<Faults>,
    conns: Mutex<HashMap<u64, (TcpStream, TcpStream)>>,
}

impl Shared {
    /// How long to hold the next chunk (a stall or a delay), if at all.
    fn hold(&self) -> Option<Duration> {
        let f = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if f.stall_until.is_some_and(|u| u > now) {
            return Some(POLL);
        }
        match f.delay {
            Some((until, d)) if until > now => Some(d),
            _ => None,
        }
    }
}

pub struct FaultProxy {
    pub port: u16,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `target_port`.
    pub fn start(target_port: u16) -> std::io::Result<FaultProxy> {
        let port = free_port();
        let listener = TcpListener::bind(("127.0.0.1", port))?;
        listener.set_nonblocking(true)?;
        let shared = Arc::new(Shared::default());
        shared.target.store(target_port, Ordering::Relaxed);
        let s = shared.clone();
        let acceptor = std::thread::spawn(move || {
            let mut next = 0u64;
            while !s.stop.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(POLL);
                        continue;
                    }
                    Err(_) => {
                        std::thread::sleep(POLL);
                        continue;
                    }
                };
                let _ = client.set_nonblocking(false);
                let target = s.target.load(Ordering::Relaxed);
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                next += 1;
                s.accepted.fetch_add(1, Ordering::Relaxed);
                let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = (
                    client.try_clone(),
                    server.try_clone(),
                    client.try_clone(),
                    server.try_clone(),
                ) else {
                    continue;
                };
                s.conns
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(next, (c2, s2));
                pump(next, client, server, s.clone());
                pump(next, s3, c3, s.clone());
            }
        });
        Ok(FaultProxy {
            port,
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// Abruptly closes every live connection (both sockets, both directions).
    pub fn cut(&self) -> u64 {
        let live: Vec<_> = self
            .shared
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect();
        let n = live.len() as u64;
        for (_, (a, b)) in live {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
        self.shared.cut.fetch_add(n, Ordering::Relaxed);
        n
    }

    /// Sends new connections to `port` from now on and cuts the live ones.
    pub fn retarget(&self, port: u16) -> u64 {
        self.shared.target.store(port, Ordering::Relaxed);
        self.cut()
    }

    /// Holds every byte in both directions for `d` (connections stay open).
    pub fn stall(&self, d: Duration) {
        self.shared
            .faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .stall_until = Some(Instant::now() + d);
    }

    /// Delays every forwarded chunk by `each` for the next `d`.
    pub fn delay(&self, each: Duration, d: Duration) {
        self.shared
            .faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .delay = Some((Instant::now() + d, each));
    }

    /// Ends every stall and delay now.
    pub fn heal(&self) {
        *self.shared.faults.lock().unwrap_or_else(|p| p.into_inner()) = Faults::default();
    }

    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        self.cut();
    }
}

/// Copies `from` → `to` on its own thread, honouring stalls and delays; when
/// either side ends, closes both and forgets the connection.
fn pump(id: u64, mut from: TcpStream, mut to: TcpStream, s: Arc<Shared>) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            while let Some(d) = s.hold() {
                if s.stop.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(d);
                if d != POLL {
                    break; // a delay holds one chunk once
                }
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
        s.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    });
}
