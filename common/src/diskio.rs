//! Disk I/O on the hot paths — the agent's protected disks and the master
//! target's failover images: [`DiskFile`] is a raw image file or a block device
//! opened read-write, with async `read_at` / `write_at` / `zero_range` / `sync`.
//!
//! # Engines
//!
//! Every operation becomes an [`Op`] that owns its buffer (the data to write, or the
//! buffer being read into) and a oneshot sender for its result. Ops go to one of two
//! engines, chosen at open time by [`IoMode`] and reported by [`DiskFile::mode`]:
//!
//! - **io_uring** ([`IoMode::Uring`]): one dedicated thread per disk owns an
//!   `io_uring` instance. Callers push ops onto a mutex-protected queue; the thread
//!   drains the queue into SQEs in batches, submits them with one `io_uring_enter`,
//!   and completes the oneshots as CQEs arrive. While the thread sleeps in the kernel
//!   it keeps a read of an eventfd armed in the ring; a caller that queues an op while
//!   the thread is asleep (flag `sleeping`) writes that eventfd to wake it, so a busy
//!   ring takes new work without any extra syscall and a slow op (an fsync) never
//!   delays the submission of others. Short reads/writes are resubmitted for the rest.
//! - **portable** ([`IoMode::Portable`]): a small pool of [`PORTABLE_THREADS`] threads
//!   per disk running `pread` / `pwritev2` / `fallocate` / `fdatasync`. Used where the
//!   kernel refuses io_uring (`io_uring_setup` gives ENOSYS or EPERM under seccomp,
//!   gVisor, `kernel.io_uring_disabled`), and kept selectable for benchmarks.
//!
//! [`IoMode::Auto`] uses the portable engine for regular (page-cached) files and tries
//! io_uring (setup plus one NOP round trip) for block devices, falling back to the
//! portable engine and logging why. For files it also starts an io_uring engine
//! for *bulk reads* ([`DiskFile::read_bulk`]: initial sync and checksum resync,
//! large sequential units) when the kernel allows it, where io_uring measured
//! ahead (bench/sync.sh, bench/resync.sh). Measured on ext4 (bench/nbd-frontend.sh): the
//! kernel punts buffered io_uring writes to its io-wq workers and serialises writes
//! to one file there, so for cached files io_uring lost to pread/pwrite threads
//! (10k vs 19k IOPS of 4k random writes at qd32); both stay selectable.
//!
//! # Direct writes
//!
//! [`DiskFile::open_direct`] also opens an `O_DIRECT` descriptor where the file
//! system takes one. A write whose offset and length are multiples of
//! [`DIRECT_ALIGN`] then goes through it (copied into an aligned buffer first),
//! skipping the page-cache copy and the first touch of fresh cache pages (the
//! master target measured both as most of a failover's CPU); any other write is
//! buffered. A direct write the file refuses after all (EINVAL) is redone
//! buffered, and direct writes are not tried again for that file. The two agree
//! for writes that completed: the kernel writes back and drops the cached pages
//! of a range before a direct write to it.
//!
//! Why dedicated threads and not `spawn_blocking` or I/O on the runtime: a buffered
//! write to the page cache can block for milliseconds in dirty-page throttling and an
//! `fdatasync` for much longer; on dedicated threads that never stalls a tokio worker,
//! and one thread per disk batching SQEs costs one wake-up per batch, not per op.
//!
//! # Invariants
//!
//! - A buffer handed to the kernel is owned by its op until the CQE arrives, so
//!   dropping (cancelling) the caller's future is memory-safe: the op completes, its
//!   result is discarded.
//! - Dropping the [`DiskFile`] lets queued and in-flight ops finish; the engine threads
//!   then exit. The file descriptor stays open until the last op completes.
//! - Ops in flight at the same time are not ordered with respect to each other
//!   (the ring and the portable threads run them in parallel): a caller that
//!   writes a range again waits for the earlier write to complete first (the
//!   agent's range locks; the master target writes each byte once). In
//!   particular a direct and a buffered write over one page are never in flight
//!   together.
//! - Every op is bounds-checked against the size found at open: nothing reads or
//!   writes past the end of the disk.
//! - After [`DiskFile::zero_range`] the range reads as zeros: `FALLOC_FL_PUNCH_HOLE`
//!   (keep size), else `FALLOC_FL_ZERO_RANGE`, else writing zeros. A method the file
//!   does not support (EOPNOTSUPP) is not tried again for that file.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;

use bytes::Bytes;
use io_uring::{opcode, squeue, types, IoUring};
use tokio::sync::oneshot;

/// Entries of each disk's submission ring; also the most ops in the kernel at once.
pub const RING_ENTRIES: u32 = 256;
/// Threads of the portable engine, per disk.
pub const PORTABLE_THREADS: usize = 4;
/// Largest single read or write (the kernel's result is an `i32`).
pub const MAX_IO_LEN: usize = 1 << 30;
/// Offset, length and memory alignment of a direct (`O_DIRECT`) write.
pub const DIRECT_ALIGN: usize = 4096;
/// Chunk written when zeroing has to fall back to writing zeros.
const ZERO_CHUNK: usize = 1 << 20;
static ZEROS: [u8; ZERO_CHUNK] = [0; ZERO_CHUNK];

/// `_IOR(0x12, 114, size_t)`: size of a block device in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// Which I/O engine a [`DiskFile`] uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoMode {
    /// io_uring if the kernel allows it, else portable.
    Auto,
    /// io_uring or fail to open.
    Uring,
    /// Thread pool doing `pread`/`pwrite`.
    Portable,
}

impl std::fmt::Display for IoMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IoMode::Auto => "auto",
            IoMode::Uring => "io_uring",
            IoMode::Portable => "portable",
        })
    }
}

impl std::str::FromStr for IoMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(IoMode::Auto),
            "uring" | "io_uring" | "io-uring" => Ok(IoMode::Uring),
            "portable" => Ok(IoMode::Portable),
            other => Err(format!(
                "unknown I/O mode {other:?}: expected auto, uring or portable"
            )),
        }
    }
}

/// A raw image file or block device, opened read-write.
pub struct DiskFile {
    path: PathBuf,
    file: Arc<File>,
    size: AtomicU64,
    block_device: bool,
    engine: Engine,
    /// io_uring for bulk reads where `engine` is the portable one (auto mode, files).
    bulk: Option<UringEngine>,
    /// First zeroing method worth trying: [`ZERO_PUNCH`], [`ZERO_RANGE`], or (2) writing zeros.
    zero_method: AtomicU8,
    /// Aligned writes go through the `O_DIRECT` descriptor (see "Direct writes").
    direct: AtomicBool,
}

const ZERO_PUNCH: u8 = 0;
const ZERO_RANGE: u8 = 1;

impl std::fmt::Debug for DiskFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskFile")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("block_device", &self.block_device)
            .field("mode", &self.mode())
            .finish()
    }
}

impl DiskFile {
    /// Opens `path` read-write. For a block device the size comes from
    /// `BLKGETSIZE64`, for a file from its metadata.
    pub fn open(path: &Path, mode: IoMode) -> io::Result<DiskFile> {
        Self::open_with(path, mode, false)
    }

    /// Like [`Self::open`], and aligned writes go through an `O_DIRECT`
    /// descriptor where the file system takes one (see "Direct writes").
    pub fn open_direct(path: &Path, mode: IoMode) -> io::Result<DiskFile> {
        Self::open_with(path, mode, true)
    }

    fn open_with(path: &Path, mode: IoMode, direct: bool) -> io::Result<DiskFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| annotate(e, format!("opening disk {}", path.display())))?;
        let meta = file.metadata()?;
        let block_device = meta.file_type().is_block_device();
        let size = if block_device {
            block_device_size(&file)
                .map_err(|e| annotate(e, format!("reading size of {}", path.display())))?
        } else if meta.is_file() {
            meta.len()
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is neither a regular file nor a block device",
                    path.display()
                ),
            ));
        };
        // Refused by some file systems (tmpfs, FUSE without direct_io): buffered only.
        // Also where a block is larger than the direct alignment: a buffered
        // write of a few bytes would dirty the whole block, and its
        // writeback could overwrite a direct write elsewhere in that block.
        use std::os::unix::fs::MetadataExt;
        let direct = direct && meta.blksize() <= DIRECT_ALIGN as u64;
        let direct_file = direct
            .then(|| {
                OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_CLOEXEC | libc::O_DIRECT)
                    .open(path)
                    .ok()
            })
            .flatten();
        let fds = Fds::new(file, direct_file);
        let file = fds.file.clone();
        let direct = fds.direct.is_some();
        let file_for_bulk = fds.clone();
        let engine = match mode {
            IoMode::Portable => Engine::Portable(PortableEngine::start(fds)?),
            IoMode::Uring => Engine::Uring(UringEngine::start(fds).map_err(|e| {
                annotate(
                    e,
                    "io_uring requested but the kernel refused it".to_string(),
                )
            })?),
            IoMode::Auto if !block_device => Engine::Portable(PortableEngine::start(fds)?),
            IoMode::Auto => match UringEngine::start(fds.clone()) {
                Ok(e) => Engine::Uring(e),
                Err(e) => {
                    tracing::info!(
                        path = %path.display(),
                        error = %e,
                        "io_uring unavailable, using portable pread/pwrite threads"
                    );
                    Engine::Portable(PortableEngine::start(fds)?)
                }
            },
        };
        let bulk = match (&engine, mode) {
            (Engine::Portable(_), IoMode::Auto) => UringEngine::start(file_for_bulk).ok(),
            _ => None,
        };
        Ok(DiskFile {
            path: path.to_path_buf(),
            file,
            size: AtomicU64::new(size),
            block_device,
            engine,
            bulk,
            zero_method: AtomicU8::new(ZERO_PUNCH),
            direct: AtomicBool::new(direct),
        })
    }

    /// Size in bytes, as found at open (or set by [`Self::set_len`]).
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Sets the length of an image file (not of a block device).
    pub fn set_len(&self, size: u64) -> io::Result<()> {
        if self.block_device {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is a block device: its size is not ours to set",
                    self.path.display()
                ),
            ));
        }
        self.file.set_len(size)?;
        self.size.store(size, Ordering::Release);
        Ok(())
    }

    /// Whether aligned writes still go through an `O_DIRECT` descriptor.
    pub fn direct_writes(&self) -> bool {
        self.direct.load(Ordering::Relaxed)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// The engine in use: [`IoMode::Uring`] or [`IoMode::Portable`], never `Auto`.
    pub fn mode(&self) -> IoMode {
        match self.engine {
            Engine::Uring(_) => IoMode::Uring,
            Engine::Portable(_) => IoMode::Portable,
        }
    }

    /// Whether bulk reads use io_uring while the rest uses the portable engine.
    pub fn uring_bulk_reads(&self) -> bool {
        self.bulk.is_some()
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read_at(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        self.read(offset, len, false).await
    }

    /// Like [`Self::read_at`], for large sequential reads (initial sync, checksum
    /// resync): on io_uring even where other I/O uses the portable engine.
    pub async fn read_bulk(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        self.read(offset, len, true).await
    }

    async fn read(&self, offset: u64, len: usize, bulk: bool) -> io::Result<Bytes> {
        self.check_range(offset, len as u64)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        // Capacity only: the kernel fills the buffer and `Op::advance` exposes each
        // byte once it is written, so an 8 MiB bulk read pays no memset.
        let kind = OpKind::Read {
            buf: Vec::with_capacity(len),
            want: len,
        };
        let done = match (&self.bulk, bulk) {
            (Some(engine), true) => self.run_on(Some(engine), kind, offset).await?,
            _ => self.run(kind, offset).await?,
        };
        match done {
            Done::Read(b) => Ok(b),
            Done::Unit => Err(io::Error::other("disk engine returned no data for a read")),
        }
    }

    /// Writes `data` at `offset`; completes when the data is in the page cache (or
    /// on the device for `O_DIRECT`-like devices).
    pub async fn write_at(&self, offset: u64, data: Bytes) -> io::Result<()> {
        self.write(offset, data, false).await
    }

    /// Writes `data` at `offset` and makes it durable (`RWF_DSYNC`), as a FUA write.
    pub async fn write_at_durable(&self, offset: u64, data: Bytes) -> io::Result<()> {
        self.write(offset, data, true).await
    }

    async fn write(&self, offset: u64, data: Bytes, dsync: bool) -> io::Result<()> {
        self.check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return if dsync { self.sync().await } else { Ok(()) };
        }
        if self.direct_writes()
            && offset.is_multiple_of(DIRECT_ALIGN as u64)
            && data.len().is_multiple_of(DIRECT_ALIGN)
        {
            let buf = AlignedBuf::copy_of(&data);
            match self.run(OpKind::WriteDirect { buf, dsync }, offset).await {
                Ok(_) => return Ok(()),
                // Refused for this file after all: buffered from now on.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.direct.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        self.run(OpKind::Write { data, dsync }, offset).await?;
        Ok(())
    }

    /// Makes `offset..offset+len` read as zeros, deallocating it where the file
    /// system or device can.
    pub async fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_range(offset, 0)?;
        let size = self.size();
        if len > size - offset {
            return Err(out_of_range(offset, len, size));
        }
        if len == 0 {
            return Ok(());
        }
        for (method, mode) in [
            (
                ZERO_PUNCH,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            ),
            (
                ZERO_RANGE,
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            ),
        ] {
            if self.zero_method.load(Ordering::Relaxed) > method {
                continue;
            }
            match self.run(OpKind::Fallocate { mode, len }, offset).await {
                Ok(_) => return Ok(()),
                Err(e) => match e.raw_os_error() {
                    // Not supported here at all: never try this method again.
                    Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => {
                        self.zero_method.fetch_max(method + 1, Ordering::Relaxed);
                    }
                    // Unaligned for this device, or refused for this range: next method.
                    Some(libc::EINVAL) | Some(libc::ENODEV) => {}
                    _ => return Err(e),
                },
            }
        }
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (end - pos).min(ZERO_CHUNK as u64) as usize;
            self.write(pos, Bytes::from_static(&ZEROS[..n]), false)
                .await?;
            pos += n as u64;
        }
        Ok(())
    }

    /// `fdatasync`: every completed write is durable afterwards.
    pub async fn sync(&self) -> io::Result<()> {
        self.run(OpKind::Sync, 0).await?;
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if len > MAX_IO_LEN as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("I/O of {len} bytes is over the limit of {MAX_IO_LEN}"),
            ));
        }
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(out_of_range(offset, len, size)),
        }
    }

    async fn run(&self, kind: OpKind, offset: u64) -> io::Result<Done> {
        self.run_on(None, kind, offset).await
    }

    /// Runs `kind` on `engine`, or on the main engine.
    async fn run_on(
        &self,
        engine: Option<&UringEngine>,
        kind: OpKind,
        offset: u64,
    ) -> io::Result<Done> {
        let (tx, rx) = oneshot::channel();
        let op = Op {
            kind,
            offset,
            done: 0,
            reply: tx,
        };
        match (engine, &self.engine) {
            (Some(e), _) | (None, Engine::Uring(e)) => e.submit(op),
            (None, Engine::Portable(e)) => e.submit(op),
        }
        rx.await
            .map_err(|_| io::Error::other("disk I/O engine stopped before completing the op"))?
    }
}

fn out_of_range(offset: u64, len: u64, size: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("range {offset}+{len} is beyond the end of the disk ({size} bytes)"),
    )
}

fn annotate(e: io::Error, what: String) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
    if r == 0 {
        return Ok(size);
    }
    // Other ioctl encodings (some architectures): seeking to the end works too.
    // SAFETY: lseek on a valid descriptor.
    let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
    if end < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(end as u64)
}

// ---------------------------------------------------------------------------------
// Ops

/// The descriptors an engine runs ops on: the file, and its `O_DIRECT` twin.
#[derive(Clone)]
struct Fds {
    file: Arc<File>,
    direct: Option<Arc<File>>,
}

impl Fds {
    fn new(file: File, direct: Option<File>) -> Fds {
        Fds {
            file: Arc::new(file),
            direct: direct.map(Arc::new),
        }
    }

    /// The descriptor `kind` runs on.
    fn fd(&self, kind: &OpKind) -> RawFd {
        match (kind, &self.direct) {
            (OpKind::WriteDirect { .. }, Some(d)) => d.as_raw_fd(),
            _ => self.file.as_raw_fd(),
        }
    }
}

/// A copy of write data at a [`DIRECT_ALIGN`]-aligned address.
struct AlignedBuf {
    mem: Vec<u8>,
    at: usize,
    len: usize,
}

impl AlignedBuf {
    fn copy_of(data: &[u8]) -> AlignedBuf {
        let mut mem = vec![0u8; data.len() + DIRECT_ALIGN];
        let at = mem.as_ptr().align_offset(DIRECT_ALIGN);
        mem[at..at + data.len()].copy_from_slice(data);
        AlignedBuf {
            mem,
            at,
            len: data.len(),
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.mem[self.at..self.at + self.len]
    }
}

enum OpKind {
    /// `buf.len()` bytes have been read so far (the rest of its capacity, up to
    /// `want`, is not yet initialised).
    Read {
        buf: Vec<u8>,
        want: usize,
    },
    Write {
        data: Bytes,
        dsync: bool,
    },
    /// A write on the `O_DIRECT` descriptor (offset and length aligned).
    WriteDirect {
        buf: AlignedBuf,
        dsync: bool,
    },
    Fallocate {
        mode: i32,
        len: u64,
    },
    Sync,
}

enum Done {
    Read(Bytes),
    Unit,
}

struct Op {
    kind: OpKind,
    offset: u64,
    /// Bytes already transferred (short reads/writes are continued).
    done: usize,
    reply: oneshot::Sender<io::Result<Done>>,
}

impl Op {
    fn finish(self, r: io::Result<()>) {
        let out = r.map(|()| match self.kind {
            OpKind::Read { buf, .. } => Done::Read(Bytes::from(buf)),
            _ => Done::Unit,
        });
        // The caller may have gone away (cancelled); the op is complete either way.
        let _ = self.reply.send(out);
    }

    /// Accounts for a transfer of `n` bytes; `Some(result)` once the op is finished.
    fn advance(&mut self, n: usize) -> Option<io::Result<()>> {
        let total = match &self.kind {
            OpKind::Read { want, .. } => *want,
            OpKind::Write { data, .. } => data.len(),
            OpKind::WriteDirect { buf, .. } => buf.len,
            _ => return Some(Ok(())),
        };
        if n == 0 {
            return Some(Err(match self.kind {
                OpKind::Read { .. } => io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "read past the end of the disk",
                ),
                _ => io::Error::new(io::ErrorKind::WriteZero, "the disk accepted no bytes"),
            }));
        }
        if let OpKind::Read { buf, want } = &mut self.kind {
            if self.done + n > *want || self.done + n > buf.capacity() {
                return Some(Err(io::Error::other(format!(
                    "the kernel reported {n} bytes read where {} were asked",
                    *want - self.done
                ))));
            }
            // SAFETY: the read that just completed wrote `n` bytes at `buf.len()`
            // (= `self.done`), so every byte below `self.done + n` is
            // initialised, and they are inside the capacity (checked above).
            unsafe { buf.set_len(self.done + n) };
        }
        self.done += n;
        if self.done >= total {
            Some(Ok(()))
        } else {
            None
        }
    }
}

enum Engine {
    Uring(UringEngine),
    Portable(PortableEngine),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave the queues inconsistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------------
// io_uring engine

struct UringShared {
    queue: Mutex<Vec<Op>>,
    /// The ring thread is (about to be) blocked in `io_uring_enter`: wake it.
    sleeping: AtomicBool,
    closed: AtomicBool,
    eventfd: OwnedFd,
}

impl UringShared {
    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd. A failure can only
        // be a full counter, which means a wake-up is already pending.
        unsafe {
            libc::write(
                self.eventfd.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            )
        };
    }
}

struct UringEngine {
    shared: Arc<UringShared>,
}

const EVENTFD_TOKEN: u64 = u64::MAX;

impl UringEngine {
    fn start(fds: Fds) -> io::Result<UringEngine> {
        let mut ring = IoUring::new(RING_ENTRIES)?;
        // One NOP round trip: some sandboxes allow setup but not submission.
        let nop = opcode::Nop::new().build().user_data(0);
        // SAFETY: a NOP references no memory.
        unsafe { ring.submission().push(&nop) }
            .map_err(|_| io::Error::other("io_uring submission queue full at setup"))?;
        ring.submit_and_wait(1)?;
        if let Some(cqe) = ring.completion().next() {
            if cqe.result() < 0 {
                return Err(io::Error::from_raw_os_error(-cqe.result()));
            }
        }
        // SAFETY: eventfd returns a new descriptor or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: efd is a fresh descriptor that we own.
        let eventfd = unsafe { OwnedFd::from_raw_fd(efd) };
        let shared = Arc::new(UringShared {
            queue: Mutex::new(Vec::new()),
            sleeping: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            eventfd,
        });
        let s = shared.clone();
        thread::Builder::new()
            .name("diskio-uring".into())
            .spawn(move || uring_thread(ring, fds, s))?;
        Ok(UringEngine { shared })
    }

    fn submit(&self, op: Op) {
        lock(&self.shared.queue).push(op);
        if self.shared.sleeping.swap(false, Ordering::SeqCst) {
            self.shared.wake();
        }
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        self.shared.wake();
    }
}

fn op_sqe(op: &mut Op, fds: &Fds) -> squeue::Entry {
    let fd = types::Fd(fds.fd(&op.kind));
    let off = op.offset + op.done as u64;
    match &mut op.kind {
        OpKind::Read { buf, want } => {
            let rest = &mut buf.spare_capacity_mut()[..*want - op.done];
            opcode::Read::new(fd, rest.as_mut_ptr().cast(), rest.len() as u32)
                .offset(off)
                .build()
        }
        OpKind::Write { data, dsync } => write_sqe(fd, &data[op.done..], off, *dsync),
        OpKind::WriteDirect { buf, dsync } => write_sqe(fd, &buf.bytes()[op.done..], off, *dsync),
        OpKind::Fallocate { mode, len } => opcode::Fallocate::new(fd, *len)
            .offset(op.offset)
            .mode(*mode)
            .build(),
        OpKind::Sync => opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
    }
}

fn write_sqe(fd: types::Fd, rest: &[u8], off: u64, dsync: bool) -> squeue::Entry {
    opcode::Write::new(fd, rest.as_ptr(), rest.len() as u32)
        .offset(off)
        .rw_flags(if dsync { libc::RWF_DSYNC } else { 0 })
        .build()
}

fn uring_thread(mut ring: IoUring, fds: Fds, shared: Arc<UringShared>) {
    let max_ops = RING_ENTRIES as usize - 1; // one entry stays for the eventfd read
                                             // In-flight ops by slot; user_data is the slot index.
    let mut slots: Vec<Option<Op>> = (0..max_ops).map(|_| None).collect();
    let mut free: Vec<usize> = (0..max_ops).rev().collect();
    let mut waiting: VecDeque<Op> = VecDeque::new();
    let mut incoming: Vec<Op> = Vec::new();
    let mut resubmit: Vec<usize> = Vec::new();
    // The eventfd read's target. Leaked on purpose: the kernel may still hold the
    // read when the ring is torn down, so the 8 bytes must outlive the ring.
    let efd_buf: &'static mut [u8; 8] = Box::leak(Box::new([0u8; 8]));
    let efd_ptr = efd_buf.as_mut_ptr();
    let efd_sqe = opcode::Read::new(types::Fd(shared.eventfd.as_raw_fd()), efd_ptr, 8)
        .build()
        .user_data(EVENTFD_TOKEN);
    let mut efd_armed = false;
    let mut inflight = 0usize;

    loop {
        std::mem::swap(&mut incoming, &mut *lock(&shared.queue));
        waiting.extend(incoming.drain(..));

        let mut sq = ring.submission();
        if !efd_armed {
            // SAFETY: the buffer is 'static.
            if unsafe { sq.push(&efd_sqe) }.is_ok() {
                efd_armed = true;
            }
        }
        for slot in resubmit.drain(..) {
            let Some(op) = slots[slot].as_mut() else {
                continue;
            };
            let sqe = op_sqe(op, &fds).user_data(slot as u64);
            // SAFETY: the op (and its buffer) stays in `slots` until its CQE. The
            // queue has room: at most `max_ops` ops are ever in the ring.
            if unsafe { sq.push(&sqe) }.is_err() {
                if let Some(op) = slots[slot].take() {
                    free.push(slot);
                    inflight -= 1;
                    op.finish(Err(io::Error::other("io_uring submission queue full")));
                }
            }
        }
        while !sq.is_full() {
            let Some(slot) = free.pop() else { break };
            let Some(mut op) = waiting.pop_front() else {
                free.push(slot);
                break;
            };
            let sqe = op_sqe(&mut op, &fds).user_data(slot as u64);
            slots[slot] = Some(op);
            // SAFETY: as above; `is_full` was checked.
            if unsafe { sq.push(&sqe) }.is_err() {
                if let Some(op) = slots[slot].take() {
                    free.push(slot);
                    op.finish(Err(io::Error::other("io_uring submission queue full")));
                }
                break;
            }
            inflight += 1;
        }
        drop(sq);

        if shared.closed.load(Ordering::SeqCst) && inflight == 0 && waiting.is_empty() {
            let queued = lock(&shared.queue).is_empty();
            if queued {
                return;
            }
            continue;
        }

        // Sleep in the kernel unless more work arrived meanwhile (see `submit`).
        shared.sleeping.store(true, Ordering::SeqCst);
        let more = !lock(&shared.queue).is_empty()
            || shared.closed.load(Ordering::SeqCst) && inflight == 0;
        let want = if more || (!waiting.is_empty() && !free.is_empty()) {
            0
        } else {
            1
        };
        let r = ring.submit_and_wait(want);
        shared.sleeping.store(false, Ordering::SeqCst);
        if let Err(e) = r {
            match e.raw_os_error() {
                Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY) => {}
                _ => {
                    tracing::error!(error = %e, "io_uring_enter failed; failing queued disk ops");
                    for op in waiting.drain(..) {
                        op.finish(Err(io::Error::new(e.kind(), e.to_string())));
                    }
                }
            }
        }

        for cqe in ring.completion() {
            let token = cqe.user_data();
            let res = cqe.result();
            if token == EVENTFD_TOKEN {
                efd_armed = false;
                continue;
            }
            let slot = token as usize;
            let Some(op) = slots.get_mut(slot).and_then(|s| s.as_mut()) else {
                continue;
            };
            let outcome = if res < 0 {
                match -res {
                    libc::EINTR | libc::EAGAIN => None,
                    errno => Some(Err(io::Error::from_raw_os_error(errno))),
                }
            } else {
                op.advance(res as usize)
            };
            match outcome {
                None => resubmit.push(slot),
                Some(r) => {
                    if let Some(op) = slots[slot].take() {
                        op.finish(r);
                    }
                    free.push(slot);
                    inflight -= 1;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// Portable engine

struct PortableQueue {
    ops: VecDeque<Op>,
    closed: bool,
}

struct PortableShared {
    queue: Mutex<PortableQueue>,
    ready: Condvar,
}

struct PortableEngine {
    shared: Arc<PortableShared>,
}

impl PortableEngine {
    fn start(fds: Fds) -> io::Result<PortableEngine> {
        let shared = Arc::new(PortableShared {
            queue: Mutex::new(PortableQueue {
                ops: VecDeque::new(),
                closed: false,
            }),
            ready: Condvar::new(),
        });
        for i in 0..PORTABLE_THREADS {
            let (s, f) = (shared.clone(), fds.clone());
            thread::Builder::new()
                .name(format!("diskio-p{i}"))
                .spawn(move || portable_thread(&s, &f))?;
        }
        Ok(PortableEngine { shared })
    }

    fn submit(&self, op: Op) {
        lock(&self.shared.queue).ops.push_back(op);
        self.shared.ready.notify_one();
    }
}

impl Drop for PortableEngine {
    fn drop(&mut self) {
        lock(&self.shared.queue).closed = true;
        self.shared.ready.notify_all();
    }
}

fn portable_thread(shared: &PortableShared, fds: &Fds) {
    loop {
        let mut op = {
            let mut q = lock(&shared.queue);
            loop {
                if let Some(op) = q.ops.pop_front() {
                    break op;
                }
                if q.closed {
                    return;
                }
                q = shared.ready.wait(q).unwrap_or_else(|p| p.into_inner());
            }
        };
        let fd = fds.fd(&op.kind);
        let r = run_blocking(&mut op, fd);
        op.finish(r);
    }
}

fn run_blocking(op: &mut Op, fd: RawFd) -> io::Result<()> {
    loop {
        let off = (op.offset + op.done as u64) as libc::off_t;
        // SAFETY (all calls): valid descriptor; pointers and lengths come from
        // buffers owned by the op for the duration of the call.
        let r: isize = match &mut op.kind {
            OpKind::Read { buf, want } => {
                let rest = &mut buf.spare_capacity_mut()[..*want - op.done];
                unsafe { libc::pread(fd, rest.as_mut_ptr().cast(), rest.len(), off) }
            }
            OpKind::Write { data, dsync } => pwrite(fd, &data[op.done..], off, *dsync),
            OpKind::WriteDirect { buf, dsync } => pwrite(fd, &buf.bytes()[op.done..], off, *dsync),
            OpKind::Fallocate { mode, len } => {
                let r = unsafe {
                    libc::fallocate(fd, *mode, op.offset as libc::off_t, *len as libc::off_t)
                };
                if r == 0 {
                    return Ok(());
                }
                r as isize
            }
            OpKind::Sync => {
                if unsafe { libc::fdatasync(fd) } == 0 {
                    return Ok(());
                }
                -1
            }
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if let Some(done) = op.advance(r as usize) {
            return done;
        }
    }
}

fn pwrite(fd: RawFd, rest: &[u8], off: libc::off_t, dsync: bool) -> isize {
    let iov = libc::iovec {
        iov_base: rest.as_ptr() as *mut libc::c_void,
        iov_len: rest.len(),
    };
    let flags = if dsync { libc::RWF_DSYNC } else { 0 };
    // SAFETY: valid descriptor; the iovec points into `rest`, alive for the call.
    unsafe { libc::pwritev2(fd, &iov, 1, off, flags) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(len: u64) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk.raw");
        let f = File::create(&path).expect("create");
        f.set_len(len).expect("set_len");
        (dir, path)
    }

    async fn exercise(mode: IoMode) {
        let (_dir, path) = image(8 << 20);
        let d = DiskFile::open(&path, mode).expect("open");
        if mode != IoMode::Auto {
            assert_eq!(d.mode(), mode);
        }
        assert_eq!(d.size(), 8 << 20);
        let pattern: Vec<u8> = (0..3 << 20).map(|i| (i % 251) as u8).collect();
        d.write_at(4096, Bytes::from(pattern.clone()))
            .await
            .expect("write");
        d.write_at_durable(0, Bytes::from_static(b"hello"))
            .await
            .expect("fua");
        assert_eq!(&d.read_at(0, 5).await.expect("read")[..], b"hello");
        assert_eq!(
            &d.read_at(4096, pattern.len()).await.expect("read")[..],
            &pattern[..]
        );
        // Unaligned zeroing in the middle of the pattern.
        d.zero_range(4096 + 1000, 70_000).await.expect("zero");
        let back = d.read_at(4096, pattern.len()).await.expect("read");
        assert!(back[1000..71_000].iter().all(|&b| b == 0));
        assert_eq!(&back[..1000], &pattern[..1000]);
        assert_eq!(&back[71_000..], &pattern[71_000..]);
        d.sync().await.expect("sync");
        // Read buffers are not zeroed before the read: a freed heap buffer full
        // of 0xAA (below glibc's mmap threshold, so likely handed out again)
        // must not show through a read of zeros.
        drop(std::hint::black_box(vec![0xAAu8; 64 << 10]));
        let tail = d.read_bulk(5 << 20, 64 << 10).await.expect("bulk read");
        assert!(tail.len() == 64 << 10 && tail.iter().all(|&b| b == 0));
        // Bounds.
        assert!(d.read_at((8 << 20) - 10, 11).await.is_err());
        assert!(d.write_at(8 << 20, Bytes::from_static(b"x")).await.is_err());
        assert!(d.zero_range(u64::MAX, 2).await.is_err());
        // Many concurrent small ops.
        let d = Arc::new(d);
        let mut tasks = Vec::new();
        for i in 0..512u64 {
            let d = d.clone();
            tasks.push(tokio::spawn(async move {
                let block = vec![(i % 256) as u8; 4096];
                d.write_at(i * 4096, Bytes::from(block))
                    .await
                    .expect("write");
                d.read_at(i * 4096, 4096).await.expect("read")
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            let got = t.await.expect("join");
            assert!(got.iter().all(|&b| b == (i % 256) as u8), "block {i}");
        }
        drop(d);
        let on_disk = std::fs::read(&path).expect("read back");
        assert!(on_disk[4096 * 511..4096 * 512].iter().all(|&b| b == 255));
    }

    /// Direct (aligned) and buffered (unaligned) writes, one after the other
    /// over the same pages, read back as a plain model says.
    async fn direct_and_buffered_agree(mode: IoMode) {
        let (_dir, path) = image(1 << 20);
        let d = DiskFile::open_direct(&path, mode).expect("open");
        let mut model = vec![0u8; 1 << 20];
        let mut rng = 0x2545f4914f6cdd1du64;
        for i in 0..200u64 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let (offset, len) = if i % 2 == 0 {
                ((rng % 200) * 4096, 4096 * (1 + rng % 8) as usize)
            } else {
                (rng % 900_000, 1 + (rng % 9000) as usize)
            };
            let data: Vec<u8> = (0..len).map(|j| (i as usize + j) as u8).collect();
            model[offset as usize..offset as usize + len].copy_from_slice(&data);
            d.write_at(offset, Bytes::from(data)).await.expect("write");
        }
        assert_eq!(&d.read_at(0, 1 << 20).await.expect("read")[..], &model[..]);
        d.sync().await.expect("sync");
        drop(d);
        assert_eq!(std::fs::read(&path).expect("read back"), model);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn direct_writes_portable() {
        direct_and_buffered_agree(IoMode::Portable).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn direct_writes_uring() {
        // Only where the kernel allows io_uring (not in every sandbox).
        if UringEngine::start(Fds::new(File::open("/dev/null").expect("null"), None)).is_ok() {
            direct_and_buffered_agree(IoMode::Uring).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn portable_engine() {
        exercise(IoMode::Portable).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn auto_engine() {
        exercise(IoMode::Auto).await;
    }

    #[test]
    fn mode_parses() {
        assert_eq!("uring".parse::<IoMode>(), Ok(IoMode::Uring));
        assert!("fast".parse::<IoMode>().is_err());
    }
}
