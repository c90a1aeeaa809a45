//! powerfs: a passthrough FUSE filesystem that can lose power.
//!
//! It mirrors a *backing* directory and keeps everything that has not been made
//! durable in memory and in scratch files; the backing directory holds only what
//! was durable. Killing the process (the `crash` in the harness: SIGUSR1) drops
//! every unsynced write and every unsynced directory change, exactly as a power
//! loss of a disk with a volatile cache would. A clean stop (SIGTERM) makes
//! everything durable first, as an unmount does.
//!
//! # The durability model (strict POSIX, per object)
//!
//! | operation | durable when |
//! |---|---|
//! | `write`, `truncate`, `fallocate` of a file | `fsync`/`fdatasync` of that file (data and size; not its name) |
//! | a name created, replaced or removed in directory D (`create`, `mknod`, `mkdir`, `symlink`, `link`, `unlink`, `rmdir`, either side of `rename`) | `fsync` of D |
//! | a file whose data was fsynced but whose name never was | lost (an orphan inode, freed at the next mount) |
//! | a name made durable for a file whose data was never fsynced | the name survives, with the file's durable data (empty if none) |
//! | a rename between two directories | each side when its directory is fsynced; with only the destination fsynced both names survive (hard links); a *directory* moves when either side is fsynced |
//! | mode, owner, times | not modelled: kept in memory, the backing's are whatever creation gave |
//!
//! With `--fsync-persists-name` an fsync of a file also makes its current names
//! durable in their directories (what ext4 and XFS do in practice for a newly
//! created file). The default is the strict model.
//!
//! # Layout
//!
//! - Per inode: the view (its names, size, a set of dirty byte ranges whose bytes
//!   live in `<scratch>/<ino>`, and a *floor*: clean bytes at or past it read as
//!   zeros because of an unsynced truncate), and its durable object in the backing
//!   directory, if any: at its first durable name, or at
//!   `<backing>/.powerfs-orphans/<ino>` while it has none.
//! - Per directory: the view's entries and the durable entries; an `fsync` of the
//!   directory applies the difference to the backing directory (removals first).
//! - Every request runs under one lock, and the crash handler takes that lock
//!   before the process exits, so the backing directory is never left half-changed
//!   by an operation of this filesystem.
//!
//! The backing directory's own writes are not fsynced: powerfs models the power
//! loss of the disk it serves, not of the host it runs on.
//!
//! # A full disk
//!
//! `Options::statfs_free_max` makes `statfs` report at most that much free
//! (a small disk as software that decides by free space sees it, e.g.
//! RocksDB resuming after ENOSPC); writes are not limited by it.
//!
//! [`State::set_full`] (the binary: SIGUSR2 on, SIGHUP off) makes the disk
//! full, as a filesystem with no free block: every request that needs new
//! space fails with ENOSPC — a write or an allocating `fallocate` that reaches
//! past the file's size, `mkdir`, `symlink` — and `statfs` reports no free
//! space. Everything else goes on: overwrites inside a file, creating empty
//! files (inodes are left), truncates, unlinks, renames and every fsync. The
//! flag is not durable: a power loss ends it (the harness fills the disk
//! again after power on if it should still be full).

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

/// Name (in the backing root) of the directory holding durable objects without a
/// durable name; emptied at every mount (fsck freeing orphan inodes).
pub const ORPHANS: &str = ".powerfs-orphans";
const ROOT: u64 = 1;
const TTL: Duration = Duration::from_secs(1);
const COPY_CHUNK: usize = 1 << 20;

/// Options of one mount.
#[derive(Clone, Debug)]
pub struct Options {
    pub backing: PathBuf,
    pub scratch: PathBuf,
    /// fsync of a file also makes its names durable (ext4-like).
    pub fsync_persists_name: bool,
    /// `statfs` reports at most this many free bytes (a small disk, as seen
    /// by software that decides by the free space; writes are not limited).
    pub statfs_free_max: Option<u64>,
}

#[derive(Clone, Debug, PartialEq)]
enum Kind {
    File,
    Dir,
    Symlink(PathBuf),
    /// A socket, fifo or device node: `mode` holds its type bits.
    Special,
}

/// Byte ranges `[start, end)`, disjoint and not touching.
#[derive(Default, Debug)]
struct Ranges(BTreeMap<u64, u64>);

impl Ranges {
    fn insert(&mut self, mut start: u64, mut end: u64) {
        if start >= end {
            return;
        }
        // Merge with every range that overlaps or touches [start, end).
        let touching: Vec<(u64, u64)> = self
            .0
            .range(..=end)
            .rev()
            .take_while(|(_, &e)| e >= start)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in touching {
            self.0.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.0.insert(start, end);
    }

    /// Forgets everything at or past `n`.
    fn cut(&mut self, n: u64) {
        let past: Vec<u64> = self.0.range(n..).map(|(&s, _)| s).collect();
        for s in past {
            self.0.remove(&s);
        }
        if let Some((_, e)) = self.0.range_mut(..n).next_back() {
            if *e > n {
                *e = n;
            }
        }
    }

    /// The parts of the ranges inside `[start, end)`.
    fn within(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let first = self
            .0
            .range(..=start)
            .next_back()
            .map(|(&s, _)| s)
            .unwrap_or(start);
        for (&s, &e) in self.0.range(first..end) {
            let (a, b) = (s.max(start), e.min(end));
            if a < b {
                out.push((a, b));
            }
        }
        out
    }
}

struct Inode {
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
    rdev: u32,
    atime: SystemTime,
    mtime: SystemTime,
    ctime: SystemTime,
    /// Names in the view: (parent, name).
    vlinks: Vec<(u64, OsString)>,
    open: u64,
    lookups: u64,
    /// Directories: entries in the view and durable entries.
    children: BTreeMap<OsString, u64>,
    dchildren: BTreeMap<OsString, u64>,
    /// Durable names: (parent, name); empty: an orphan (if `dexists`).
    dnames: Vec<(u64, OsString)>,
    /// A durable object exists in the backing directory.
    dexists: bool,
    /// Files: size in the view, unsynced ranges, truncate floor, files.
    size: u64,
    dirty: Ranges,
    floor: u64,
    scratch: Option<File>,
    dfile: Option<File>,
}

impl Inode {
    fn new(kind: Kind, mode: u32, uid: u32, gid: u32, rdev: u32) -> Inode {
        let now = SystemTime::now();
        Inode {
            kind,
            mode,
            uid,
            gid,
            rdev,
            atime: now,
            mtime: now,
            ctime: now,
            vlinks: Vec::new(),
            open: 0,
            lookups: 0,
            children: BTreeMap::new(),
            dchildren: BTreeMap::new(),
            dnames: Vec::new(),
            dexists: false,
            size: 0,
            dirty: Ranges::default(),
            floor: u64::MAX,
            scratch: None,
            dfile: None,
        }
    }

    fn alive(&self) -> bool {
        !self.vlinks.is_empty() || self.open > 0
    }

    fn file_type(&self) -> FileType {
        match self.kind {
            Kind::File => FileType::RegularFile,
            Kind::Dir => FileType::Directory,
            Kind::Symlink(_) => FileType::Symlink,
            Kind::Special => match self.mode & libc::S_IFMT {
                libc::S_IFSOCK => FileType::Socket,
                libc::S_IFIFO => FileType::NamedPipe,
                libc::S_IFCHR => FileType::CharDevice,
                _ => FileType::BlockDevice,
            },
        }
    }
}

type Res<T> = Result<T, Errno>;

fn io(e: std::io::Error) -> Errno {
    Errno::from(e)
}

/// The filesystem's state; every request holds its lock.
pub struct State {
    opts: Options,
    inodes: HashMap<u64, Inode>,
    next: u64,
    /// The disk is full: requests that need new space fail (ENOSPC).
    full: bool,
}

impl State {
    /// Loads the backing directory (everything in it is durable), empties the
    /// orphans and the scratch directory.
    pub fn load(opts: Options) -> anyhow::Result<State> {
        let orphans = opts.backing.join(ORPHANS);
        if orphans.exists() {
            std::fs::remove_dir_all(&orphans)?;
        }
        std::fs::create_dir_all(&orphans)?;
        if opts.scratch.exists() {
            std::fs::remove_dir_all(&opts.scratch)?;
        }
        std::fs::create_dir_all(&opts.scratch)?;
        let meta = std::fs::metadata(&opts.backing)?;
        let mut root = Inode::new(Kind::Dir, meta.mode() & 0o7777, meta.uid(), meta.gid(), 0);
        root.dexists = true;
        root.lookups = 1;
        let mut st = State {
            opts,
            inodes: HashMap::from([(ROOT, root)]),
            next: ROOT + 1,
            full: false,
        };
        let mut by_backing_ino: HashMap<u64, u64> = HashMap::new();
        let mut todo = vec![(ROOT, st.opts.backing.clone())];
        while let Some((dir, path)) = todo.pop() {
            for entry in std::fs::read_dir(&path)? {
                let entry = entry?;
                let name = entry.file_name();
                if dir == ROOT && name == ORPHANS {
                    continue;
                }
                let m = std::fs::symlink_metadata(entry.path())?;
                let ino = if let Some(&ino) = by_backing_ino.get(&m.ino()).filter(|_| m.is_file()) {
                    ino
                } else {
                    let ft = m.file_type();
                    let kind = if ft.is_dir() {
                        Kind::Dir
                    } else if ft.is_file() {
                        Kind::File
                    } else if ft.is_symlink() {
                        Kind::Symlink(std::fs::read_link(entry.path())?)
                    } else {
                        Kind::Special
                    };
                    let mode = if kind == Kind::Special {
                        m.mode()
                    } else {
                        m.mode() & 0o7777
                    };
                    let mut i = Inode::new(kind.clone(), mode, m.uid(), m.gid(), m.rdev() as u32);
                    i.dexists = true;
                    i.size = if kind == Kind::File { m.len() } else { 0 };
                    let ino = st.next;
                    st.next += 1;
                    st.inodes.insert(ino, i);
                    by_backing_ino.insert(m.ino(), ino);
                    if kind == Kind::Dir {
                        todo.push((ino, entry.path()));
                    }
                    ino
                };
                let i = st.inodes.get_mut(&ino).expect("just inserted");
                i.vlinks.push((dir, name.clone()));
                i.dnames.push((dir, name.clone()));
                let d = st.inodes.get_mut(&dir).expect("parent");
                d.children.insert(name.clone(), ino);
                d.dchildren.insert(name, ino);
            }
        }
        Ok(st)
    }

    fn get(&self, ino: u64) -> Res<&Inode> {
        self.inodes.get(&ino).ok_or(Errno::ENOENT)
    }

    /// The disk fills up (`true`: requests that need new space fail with
    /// ENOSPC) or has room again.
    pub fn set_full(&mut self, full: bool) {
        self.full = full;
    }

    pub fn is_full(&self) -> bool {
        self.full
    }

    /// ENOSPC when the disk is full and `ino` would grow to `end`.
    fn room_for(&self, ino: u64, end: u64) -> Res<()> {
        if self.full && end > self.get(ino)?.size {
            return Err(Errno::ENOSPC);
        }
        Ok(())
    }

    fn get_mut(&mut self, ino: u64) -> Res<&mut Inode> {
        self.inodes.get_mut(&ino).ok_or(Errno::ENOENT)
    }

    fn orphan_path(&self, ino: u64) -> PathBuf {
        self.opts.backing.join(ORPHANS).join(ino.to_string())
    }

    /// Where the inode's durable object is in the backing directory.
    fn dpath(&self, ino: u64) -> PathBuf {
        if ino == ROOT {
            return self.opts.backing.clone();
        }
        match self.inodes.get(&ino).and_then(|i| i.dnames.first()) {
            Some((p, n)) => self.dpath(*p).join(n),
            None => self.orphan_path(ino),
        }
    }

    fn attr(&self, ino: u64) -> Res<FileAttr> {
        let i = self.get(ino)?;
        let size = match &i.kind {
            Kind::File => i.size,
            Kind::Symlink(t) => t.as_os_str().len() as u64,
            _ => 0,
        };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: i.atime,
            mtime: i.mtime,
            ctime: i.ctime,
            crtime: i.ctime,
            kind: i.file_type(),
            perm: (i.mode & 0o7777) as u16,
            nlink: if i.kind == Kind::Dir {
                2
            } else {
                i.vlinks.len() as u32
            },
            uid: i.uid,
            gid: i.gid,
            rdev: i.rdev,
            blksize: 4096,
            flags: 0,
        })
    }

    fn child(&self, parent: u64, name: &OsStr) -> Res<u64> {
        let p = self.get(parent)?;
        if p.kind != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        p.children.get(name).copied().ok_or(Errno::ENOENT)
    }

    /// Adds a new inode under `parent`/`name` in the view.
    fn make(&mut self, parent: u64, name: &OsStr, mut inode: Inode) -> Res<u64> {
        if parent == ROOT && name == ORPHANS {
            return Err(Errno::EPERM);
        }
        match self.child(parent, name) {
            Ok(_) => return Err(Errno::EEXIST),
            Err(e) if e != Errno::ENOENT => return Err(e),
            Err(_) => {}
        }
        let ino = self.next;
        self.next += 1;
        inode.vlinks.push((parent, name.to_os_string()));
        inode.lookups = 1;
        self.inodes.insert(ino, inode);
        let p = self.get_mut(parent)?;
        p.children.insert(name.to_os_string(), ino);
        p.mtime = SystemTime::now();
        Ok(ino)
    }

    /// Removes `parent`/`name` from the view (not from the durable state).
    fn unlink_view(&mut self, parent: u64, name: &OsStr) -> Res<u64> {
        let ino = self.child(parent, name)?;
        self.get_mut(parent)?.children.remove(name);
        let i = self.get_mut(ino)?;
        i.vlinks.retain(|(p, n)| !(*p == parent && n == name));
        i.ctime = SystemTime::now();
        Ok(ino)
    }

    /// Forgets an inode nothing refers to any more (view, kernel, handles,
    /// durable names); deletes its orphaned durable object.
    fn maybe_free(&mut self, ino: u64) {
        let Some(i) = self.inodes.get(&ino) else {
            return;
        };
        if ino == ROOT || i.alive() || i.lookups > 0 || !i.dnames.is_empty() {
            return;
        }
        if i.dexists {
            let p = self.orphan_path(ino);
            let _ = if i.kind == Kind::Dir {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
        self.inodes.remove(&ino);
        let _ = std::fs::remove_file(self.opts.scratch.join(ino.to_string()));
    }

    fn scratch(&mut self, ino: u64) -> Res<&File> {
        let path = self.opts.scratch.join(ino.to_string());
        let i = self.get_mut(ino)?;
        if i.scratch.is_none() {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)
                .map_err(io)?;
            i.scratch = Some(f);
        }
        Ok(i.scratch.as_ref().expect("just opened"))
    }

    fn dfile(&mut self, ino: u64) -> Res<Option<&File>> {
        let path = self.dpath(ino);
        let i = self.get_mut(ino)?;
        if !i.dexists || i.kind != Kind::File {
            return Ok(None);
        }
        if i.dfile.is_none() {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(io)?;
            i.dfile = Some(f);
        }
        Ok(i.dfile.as_ref())
    }

    fn read(&mut self, ino: u64, off: u64, len: u64) -> Res<Vec<u8>> {
        let (size, floor) = {
            let i = self.get(ino)?;
            if i.kind != Kind::File {
                return Err(Errno::EISDIR);
            }
            (i.size, i.floor)
        };
        let end = off.saturating_add(len).min(size);
        if off >= end {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; (end - off) as usize];
        let clean_end = end.min(floor);
        if off < clean_end {
            if let Some(f) = self.dfile(ino)? {
                read_full_at(f, &mut buf[..(clean_end - off) as usize], off).map_err(io)?;
            }
        }
        let dirty = self.get(ino)?.dirty.within(off, end);
        if !dirty.is_empty() {
            let s = self.scratch(ino)?;
            for (a, b) in dirty {
                read_full_at(s, &mut buf[(a - off) as usize..(b - off) as usize], a).map_err(io)?;
            }
        }
        Ok(buf)
    }

    fn write(&mut self, ino: u64, off: u64, data: &[u8]) -> Res<()> {
        if self.get(ino)?.kind != Kind::File {
            return Err(Errno::EISDIR);
        }
        self.room_for(ino, off + data.len() as u64)?;
        self.scratch(ino)?.write_all_at(data, off).map_err(io)?;
        let i = self.get_mut(ino)?;
        let end = off + data.len() as u64;
        i.dirty.insert(off, end);
        i.size = i.size.max(end);
        i.mtime = SystemTime::now();
        Ok(())
    }

    fn zero(&mut self, ino: u64, off: u64, end: u64) -> Res<()> {
        let zeros = vec![0u8; COPY_CHUNK];
        let mut at = off;
        while at < end {
            let n = ((end - at) as usize).min(COPY_CHUNK);
            self.write(ino, at, &zeros[..n])?;
            at += n as u64;
        }
        Ok(())
    }

    fn truncate(&mut self, ino: u64, n: u64) -> Res<()> {
        let i = self.get_mut(ino)?;
        match i.kind {
            Kind::File => {}
            Kind::Dir => return Err(Errno::EISDIR),
            _ => return Err(Errno::EINVAL),
        }
        if n < i.size {
            i.dirty.cut(n);
            i.floor = i.floor.min(n);
            if let Some(s) = &i.scratch {
                let _ = s.set_len(n);
            }
        }
        i.size = n;
        i.mtime = SystemTime::now();
        Ok(())
    }

    /// Creates the inode's durable object (at its orphan path) if it has none.
    fn ensure_dobject(&mut self, ino: u64) -> Res<()> {
        let i = self.get(ino)?;
        if i.dexists {
            return Ok(());
        }
        let path = self.orphan_path(ino);
        match &i.kind {
            Kind::File => {
                File::create(&path).map_err(io)?;
            }
            Kind::Dir => std::fs::create_dir(&path).map_err(io)?,
            Kind::Symlink(t) => std::os::unix::fs::symlink(t, &path).map_err(io)?,
            Kind::Special => {
                let c = std::ffi::CString::new(path.as_os_str().as_bytes())
                    .map_err(|_| Errno::EINVAL)?;
                // SAFETY: a valid C string; mknod(2) does not keep the pointer.
                let rc = unsafe { libc::mknod(c.as_ptr(), i.mode, i.rdev as libc::dev_t) };
                if rc != 0 {
                    return Err(io(std::io::Error::last_os_error()));
                }
            }
        }
        self.get_mut(ino)?.dexists = true;
        Ok(())
    }

    /// fsync of a file: its data and size become durable.
    fn persist_data(&mut self, ino: u64) -> Res<()> {
        if self.get(ino)?.kind != Kind::File {
            return self.ensure_dobject(ino);
        }
        self.ensure_dobject(ino)?;
        let (size, floor, dirty) = {
            let i = self.get(ino)?;
            (i.size, i.floor, i.dirty.within(0, u64::MAX))
        };
        let d = self
            .dfile(ino)?
            .expect("a file with a durable object")
            .try_clone();
        let d = d.map_err(io)?;
        if floor < d.metadata().map_err(io)?.len() {
            d.set_len(floor).map_err(io)?;
        }
        if !dirty.is_empty() {
            let s = self.scratch(ino)?.try_clone().map_err(io)?;
            let mut buf = vec![0u8; COPY_CHUNK];
            for (a, b) in dirty {
                let mut at = a;
                while at < b {
                    let n = ((b - at) as usize).min(COPY_CHUNK);
                    read_full_at(&s, &mut buf[..n], at).map_err(io)?;
                    d.write_all_at(&buf[..n], at).map_err(io)?;
                    at += n as u64;
                }
            }
        }
        d.set_len(size).map_err(io)?;
        let i = self.get_mut(ino)?;
        i.dirty = Ranges::default();
        i.floor = u64::MAX;
        if let Some(s) = &i.scratch {
            let _ = s.set_len(0);
        }
        Ok(())
    }

    /// fsync of a directory: its durable entries become its view's entries.
    fn persist_dir(&mut self, dir: u64) -> Res<()> {
        if self.get(dir)?.kind != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        self.ensure_dobject(dir)?;
        let (view, durable) = {
            let d = self.get(dir)?;
            (d.children.clone(), d.dchildren.clone())
        };
        for (name, t) in &durable {
            if view.get(name) != Some(t) {
                self.remove_durable(dir, name, *t)?;
            }
        }
        for (name, t) in &view {
            if self.get(dir)?.dchildren.get(name) != Some(t) {
                self.add_durable(dir, name, *t)?;
            }
        }
        Ok(())
    }

    /// ext4-like: the inode's view names become durable in their directories.
    fn persist_names(&mut self, ino: u64) -> Res<()> {
        for (dir, name) in self.get(ino)?.vlinks.clone() {
            let cur = self.get(dir)?.dchildren.get(&name).copied();
            if cur == Some(ino) {
                continue;
            }
            self.ensure_dobject(dir)?;
            if let Some(old) = cur {
                self.remove_durable(dir, &name, old)?;
            }
            self.add_durable(dir, &name, ino)?;
        }
        Ok(())
    }

    fn remove_durable(&mut self, dir: u64, name: &OsStr, t: u64) -> Res<()> {
        let dir_path = self.dpath(dir);
        self.remove_durable_at(dir, &dir_path, name, t)
    }

    /// Removes the durable entry `name` (in `dir`, at `dir_path`) of inode `t`:
    /// unlinked if `t` has another durable name, moved to the orphans if `t` is
    /// still in use, deleted otherwise (a directory's durable entries first,
    /// since their inodes may live on elsewhere).
    fn remove_durable_at(&mut self, dir: u64, dir_path: &Path, name: &OsStr, t: u64) -> Res<()> {
        let path = dir_path.join(name);
        self.get_mut(dir)?.dchildren.remove(name);
        let ti = self.get_mut(t)?;
        ti.dnames.retain(|(p, n)| !(*p == dir && n == name));
        let (is_dir, other_names, alive) =
            (ti.kind == Kind::Dir, !ti.dnames.is_empty(), ti.alive());
        if other_names {
            std::fs::remove_file(&path).map_err(io)?;
        } else if alive {
            std::fs::rename(&path, self.orphan_path(t)).map_err(io)?;
        } else {
            if is_dir {
                let kids = self.get(t)?.dchildren.clone();
                for (n, c) in kids {
                    self.remove_durable_at(t, &path, &n, c)?;
                }
                std::fs::remove_dir(&path).map_err(io)?;
            } else {
                std::fs::remove_file(&path).map_err(io)?;
            }
            let ti = self.get_mut(t)?;
            ti.dexists = false;
            ti.dfile = None;
            self.maybe_free(t);
        }
        Ok(())
    }

    fn add_durable(&mut self, dir: u64, name: &OsStr, t: u64) -> Res<()> {
        self.ensure_dobject(t)?;
        let new_path = self.dpath(dir).join(name);
        let old_path = self.dpath(t);
        let ti = self.get(t)?;
        if ti.dnames.is_empty() {
            std::fs::rename(&old_path, &new_path).map_err(io)?;
        } else if ti.kind == Kind::Dir {
            // A directory has one name: it moves (its old parent loses the entry).
            std::fs::rename(&old_path, &new_path).map_err(io)?;
            let (op, on) = ti.dnames[0].clone();
            self.get_mut(op)?.dchildren.remove(&on);
            self.get_mut(t)?.dnames.clear();
        } else {
            std::fs::hard_link(&old_path, &new_path).map_err(io)?;
        }
        self.get_mut(t)?.dnames.push((dir, name.to_os_string()));
        self.get_mut(dir)?.dchildren.insert(name.to_os_string(), t);
        Ok(())
    }

    /// Makes everything durable (a clean unmount).
    pub fn sync_all(&mut self) -> Res<()> {
        let files: Vec<u64> = self
            .inodes
            .iter()
            .filter(|(_, i)| i.kind == Kind::File && i.alive())
            .map(|(&n, _)| n)
            .collect();
        for f in files {
            self.persist_data(f)?;
        }
        let mut dirs = vec![ROOT];
        while let Some(d) = dirs.pop() {
            self.persist_dir(d)?;
            for (_, &c) in self.get(d)?.children.iter() {
                if self.get(c)?.kind == Kind::Dir {
                    dirs.push(c);
                }
            }
        }
        Ok(())
    }

    fn is_ancestor(&self, a: u64, mut d: u64) -> bool {
        loop {
            if a == d {
                return true;
            }
            match self.inodes.get(&d).and_then(|i| i.vlinks.first()) {
                Some((p, _)) => d = *p,
                None => return false,
            }
        }
    }

    fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: RenameFlags,
    ) -> Res<()> {
        if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            return Err(Errno::EINVAL);
        }
        if newparent == ROOT && newname == ORPHANS {
            return Err(Errno::EPERM);
        }
        let src = self.child(parent, name)?;
        let src_dir = self.get(src)?.kind == Kind::Dir;
        if src_dir && self.is_ancestor(src, newparent) {
            return Err(Errno::EINVAL);
        }
        match self.child(newparent, newname) {
            Ok(dst) if dst == src => return Ok(()),
            Ok(dst) => {
                if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                    return Err(Errno::EEXIST);
                }
                let d = self.get(dst)?;
                match (src_dir, d.kind == Kind::Dir) {
                    (true, false) => return Err(Errno::ENOTDIR),
                    (false, true) => return Err(Errno::EISDIR),
                    (true, true) if !d.children.is_empty() => return Err(Errno::ENOTEMPTY),
                    _ => {}
                }
                self.unlink_view(newparent, newname)?;
                self.maybe_free(dst);
            }
            Err(e) if e == Errno::ENOENT => {}
            Err(e) => return Err(e),
        }
        self.unlink_view(parent, name)?;
        self.get_mut(newparent)?
            .children
            .insert(newname.to_os_string(), src);
        self.get_mut(src)?
            .vlinks
            .push((newparent, newname.to_os_string()));
        Ok(())
    }
}

fn read_full_at(f: &File, mut buf: &mut [u8], mut off: u64) -> std::io::Result<()> {
    while !buf.is_empty() {
        match f.read_at(buf, off) {
            Ok(0) => {
                buf.fill(0);
                return Ok(());
            }
            Ok(n) => {
                buf = &mut buf[n..];
                off += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The FUSE front of a [`State`].
pub struct PowerFs {
    pub state: Arc<Mutex<State>>,
    pub fsync_persists_name: bool,
}

impl PowerFs {
    fn st(&self) -> MutexGuard<'_, State> {
        // A panic in one request must not wedge the others: take the state as is.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn entry(&self, st: &State, ino: u64, reply: ReplyEntry) {
        match st.attr(ino) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }
}

fn empty(reply: ReplyEmpty, r: Res<()>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

impl Filesystem for PowerFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut st = self.st();
        match st.child(parent.0, name) {
            Ok(ino) => {
                if let Ok(i) = st.get_mut(ino) {
                    i.lookups += 1;
                }
                self.entry(&st, ino, reply)
            }
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let mut st = self.st();
        if let Ok(i) = st.get_mut(ino.0) {
            i.lookups = i.lookups.saturating_sub(nlookup);
        }
        st.maybe_free(ino.0);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.st().attr(ino.0) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut st = self.st();
        let r = (|| {
            if let Some(n) = size {
                st.truncate(ino.0, n)?;
            }
            let i = st.get_mut(ino.0)?;
            let t = |t: TimeOrNow| match t {
                TimeOrNow::SpecificTime(t) => t,
                TimeOrNow::Now => SystemTime::now(),
            };
            if let Some(m) = mode {
                i.mode = (i.mode & libc::S_IFMT) | (m & 0o7777);
            }
            if let Some(u) = uid {
                i.uid = u;
            }
            if let Some(g) = gid {
                i.gid = g;
            }
            if let Some(a) = atime {
                i.atime = t(a);
            }
            if let Some(m) = mtime {
                i.mtime = t(m);
            }
            i.ctime = SystemTime::now();
            st.attr(ino.0)
        })();
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.st().get(ino.0).map(|i| i.kind.clone()) {
            Ok(Kind::Symlink(t)) => reply.data(t.as_os_str().as_bytes()),
            Ok(_) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let mut st = self.st();
        let kind = if mode & libc::S_IFMT == libc::S_IFREG {
            Kind::File
        } else {
            Kind::Special
        };
        let m = if kind == Kind::File {
            mode & !umask & 0o7777
        } else {
            (mode & libc::S_IFMT) | (mode & !umask & 0o7777)
        };
        match st.make(
            parent.0,
            name,
            Inode::new(kind, m, req.uid(), req.gid(), rdev),
        ) {
            Ok(ino) => self.entry(&st, ino, reply),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let mut st = self.st();
        if st.full {
            return reply.error(Errno::ENOSPC);
        }
        let i = Inode::new(Kind::Dir, mode & !umask & 0o7777, req.uid(), req.gid(), 0);
        match st.make(parent.0, name, i) {
            Ok(ino) => self.entry(&st, ino, reply),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut st = self.st();
        let r = (|| {
            let ino = st.child(parent.0, name)?;
            if st.get(ino)?.kind == Kind::Dir {
                return Err(Errno::EISDIR);
            }
            st.unlink_view(parent.0, name)?;
            st.maybe_free(ino);
            Ok(())
        })();
        empty(reply, r)
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut st = self.st();
        let r = (|| {
            let ino = st.child(parent.0, name)?;
            let i = st.get(ino)?;
            if i.kind != Kind::Dir {
                return Err(Errno::ENOTDIR);
            }
            if !i.children.is_empty() {
                return Err(Errno::ENOTEMPTY);
            }
            st.unlink_view(parent.0, name)?;
            st.maybe_free(ino);
            Ok(())
        })();
        empty(reply, r)
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let mut st = self.st();
        if st.full {
            return reply.error(Errno::ENOSPC);
        }
        let i = Inode::new(
            Kind::Symlink(target.to_path_buf()),
            0o777,
            req.uid(),
            req.gid(),
            0,
        );
        match st.make(parent.0, link_name, i) {
            Ok(ino) => self.entry(&st, ino, reply),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = self
            .st()
            .rename(parent.0, name, newparent.0, newname, flags);
        empty(reply, r)
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let mut st = self.st();
        let r = (|| {
            if st.get(ino.0)?.kind == Kind::Dir {
                return Err(Errno::EPERM);
            }
            if st.child(newparent.0, newname).is_ok() {
                return Err(Errno::EEXIST);
            }
            st.get_mut(newparent.0)?
                .children
                .insert(newname.to_os_string(), ino.0);
            let i = st.get_mut(ino.0)?;
            i.vlinks.push((newparent.0, newname.to_os_string()));
            i.lookups += 1;
            i.ctime = SystemTime::now();
            Ok(())
        })();
        match r {
            Ok(()) => self.entry(&st, ino.0, reply),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let mut st = self.st();
        match st.get_mut(ino.0) {
            Ok(i) => {
                i.open += 1;
                reply.opened(FileHandle(0), FopenFlags::empty())
            }
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.st().read(ino.0, offset, size as u64) {
            Ok(b) => reply.data(&b),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.st().write(ino.0, offset, data) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let mut st = self.st();
        if let Ok(i) = st.get_mut(ino.0) {
            i.open = i.open.saturating_sub(1);
        }
        st.maybe_free(ino.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut st = self.st();
        let mut r = st.persist_data(ino.0);
        if r.is_ok() && self.fsync_persists_name {
            r = st.persist_names(ino.0);
        }
        empty(reply, r)
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.st().get(ino.0) {
            Ok(i) if i.kind == Kind::Dir => reply.opened(FileHandle(0), FopenFlags::empty()),
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let st = self.st();
        let Ok(d) = st.get(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let parent = d.vlinks.first().map(|(p, _)| *p).unwrap_or(ROOT);
        let mut entries: Vec<(u64, FileType, OsString)> = vec![
            (ino.0, FileType::Directory, ".".into()),
            (parent, FileType::Directory, "..".into()),
        ];
        for (n, &c) in &d.children {
            if let Ok(ci) = st.get(c) {
                entries.push((c, ci.file_type(), n.clone()));
            }
        }
        for (i, (c, ft, n)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(c), (i + 1) as u64, ft, &n) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = self.st().persist_dir(ino.0);
        empty(reply, r)
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let (backing, full, free_max) = {
            let st = self.st();
            (st.opts.backing.clone(), st.full, st.opts.statfs_free_max)
        };
        let c = match std::ffi::CString::new(backing.as_os_str().as_bytes()) {
            Ok(c) => c,
            Err(_) => return reply.error(Errno::EINVAL),
        };
        // SAFETY: statvfs(3) fills the zeroed struct we pass; the path is a C string.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
            return reply.error(Errno::EIO);
        }
        let (bfree, bavail) = match (full, free_max) {
            (true, _) => (0, 0),
            (false, Some(max)) => {
                let blocks = max / (s.f_frsize.max(1) as u64);
                (s.f_bfree.min(blocks), s.f_bavail.min(blocks))
            }
            (false, None) => (s.f_bfree, s.f_bavail),
        };
        reply.statfs(
            s.f_blocks,
            bfree,
            bavail,
            s.f_files,
            s.f_ffree,
            s.f_bsize as u32,
            255,
            s.f_frsize as u32,
        );
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        let r = self.st().get(ino.0).map(|_| ());
        empty(reply, r)
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let mut st = self.st();
        let mut i = Inode::new(Kind::File, mode & !umask & 0o7777, req.uid(), req.gid(), 0);
        i.open = 1;
        match st.make(parent.0, name, i).and_then(|ino| st.attr(ino)) {
            Ok(a) => reply.created(&TTL, &a, Generation(0), FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let mut st = self.st();
        let end = offset.saturating_add(length);
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let r = (|| {
            let size = st.get(ino.0)?.size;
            match mode & !libc::FALLOC_FL_KEEP_SIZE {
                0 => st.room_for(ino.0, end)?,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE => {
                    st.zero(ino.0, offset, end.min(size))?;
                }
                _ => return Err(Errno::EOPNOTSUPP),
            }
            if !keep && end > size {
                let i = st.get_mut(ino.0)?;
                i.size = end;
            }
            Ok(())
        })();
        empty(reply, r)
    }
}

#[cfg(test)]
mod tests {
    use super::Ranges;

    #[test]
    fn ranges_merge_cut_and_clip() {
        let mut r = Ranges::default();
        r.insert(10, 20);
        r.insert(30, 40);
        r.insert(20, 30); // touches both: one range
        assert_eq!(r.within(0, 100), vec![(10, 40)]);
        r.insert(50, 60);
        assert_eq!(r.within(15, 55), vec![(15, 40), (50, 55)]);
        r.cut(35);
        assert_eq!(r.within(0, 100), vec![(10, 35)]);
        r.insert(0, 5);
        r.insert(3, 12);
        assert_eq!(r.within(0, 100), vec![(0, 35)]);
    }
}
