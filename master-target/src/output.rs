//! Failover outputs beyond the sparse raw images in `--out`, and what every
//! failover writes beside its disks.
//!
//! Outputs, like the transport modes of Veeam's restore:
//! - `--format qcow2`: each image in `--out` becomes `<disk>.qcow2`. The raw
//!   image is assembled first, converted with `qemu-img convert` (qemu-utils),
//!   compared with `qemu-img compare`, then removed.
//! - `--target DISK=PATH`: an existing block device or image file named by the
//!   operator (direct storage access). A file is cut or grown to the disk's
//!   size; a device must hold at least the disk (bytes past it are left alone).
//! - `--target DISK=nbd://HOST[:PORT]/EXPORT` or `nbd+unix:///EXPORT?socket=P`:
//!   an export of qemu-nbd or nbdkit on the target host (network mode), written
//!   with `lifeboat_common::nbd_client`.
//!
//! A target is written from the image assembled in `--out` (checked against
//! the point's checksums first): its data extents are copied (found with
//! `SEEK_DATA`/`SEEK_HOLE`), its holes zeroed on the target (`fallocate` or
//! NBD `WRITE_ZEROES`), the target flushed, then read back whole and its
//! `lifeboat-disk-v1` checksum compared with the image's; a difference is an
//! error naming the target. The assembled image is then removed unless
//! `--keep-local`, so `--out` needs room for a disk's allocated data while it
//! is delivered.
//!
//! Every failover also writes, in `--out`:
//! - `recovered-machine.json`: the machine, the point, and each disk in boot
//!   order (id, size, format, where it is);
//! - `start-vm.sh`: a QEMU command line that boots the recovered machine
//!   (memory and CPUs from `--vm-memory`/`--vm-cpus`; the store does not
//!   know them).
//!
//! A test failover also writes `lifeboat-drill.json`, the list of every file
//! it created; `lifeboat-mt test-failover --cleanup --out DIR` removes exactly
//! those (targets named with `--target` are the operator's and stay).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use lifeboat_common::disksum;
use lifeboat_common::nbd_client::{NbdClient, NbdUri, MAX_IO};

/// Where one disk goes besides `--out`.
#[derive(Debug, Clone)]
pub enum Dest {
    /// An existing block device or image file.
    Path(PathBuf),
    Nbd(NbdUri),
}

impl std::fmt::Display for Dest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dest::Path(p) => write!(f, "{}", p.display()),
            Dest::Nbd(u) => f.write_str(&u.text),
        }
    }
}

impl Dest {
    /// The destination in one spelling: an absolute path where it resolves,
    /// else as given; an NBD URI as given.
    pub fn resolved(&self) -> String {
        match self {
            Dest::Path(p) => std::fs::canonicalize(p)
                .unwrap_or_else(|_| p.clone())
                .display()
                .to_string(),
            Dest::Nbd(u) => u.text.clone(),
        }
    }
}

/// `--target DISK=DEST`.
#[derive(Debug, Clone)]
pub struct Target {
    pub disk: String,
    pub dest: Dest,
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (disk, dest) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: a target is DISK=PATH or DISK=nbd://HOST/EXPORT"))?;
        if disk.is_empty() || dest.is_empty() {
            return Err(format!(
                "{s:?}: a target is DISK=PATH or DISK=nbd://HOST/EXPORT"
            ));
        }
        let dest = if NbdUri::looks_like(dest) {
            Dest::Nbd(NbdUri::parse(dest).map_err(|e| format!("{e:#}"))?)
        } else {
            Dest::Path(PathBuf::from(dest))
        };
        Ok(Target {
            disk: disk.to_string(),
            dest,
        })
    }
}

/// The format of the images left in `--out`.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Sparse raw images (`<disk>.raw`).
    #[default]
    Raw,
    /// qcow2 images (`<disk>.qcow2`, by `qemu-img convert`).
    Qcow2,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

/// What one target received.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Delivered {
    pub target: String,
    /// Data bytes copied from the image.
    pub copied: u64,
    /// Bytes zeroed on the target (the image's holes).
    pub zeroed: u64,
    /// `lifeboat-disk-v1` of the target's first `size` bytes, read back.
    pub checksum: String,
    pub seconds: f64,
}

/// The data extents of `file` within `0..size` (`SEEK_DATA`/`SEEK_HOLE`; the
/// whole range where the file system cannot tell).
fn data_extents(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        // SAFETY: lseek on a valid descriptor with integer arguments.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENXIO) => Ok(out), // no data after pos
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(vec![(0, size)]),
                _ => Err(e),
            };
        }
        let data = (data as u64).min(size);
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let hole = (hole as u64).min(size);
        if hole > data {
            out.push((data, hole));
        }
        pos = hole.max(data + 1);
    }
    Ok(out)
}

/// The holes between `extents` within `0..size`.
fn holes(extents: &[(u64, u64)], size: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut pos = 0;
    for &(s, e) in extents {
        if s > pos {
            out.push((pos, s));
        }
        pos = pos.max(e);
    }
    if pos < size {
        out.push((pos, size));
    }
    out
}

/// Writes the first `size` bytes of the image at `image` onto `dest` and
/// checks it by reading it back (see the module header). `progress` gets the
/// bytes done of the total now and then.
pub async fn deliver(
    image: &Path,
    size: u64,
    expected: &str,
    dest: &Dest,
    progress: impl Fn(u64, u64),
) -> Result<Delivered> {
    let started = Instant::now();
    let src = File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let extents = data_extents(&src, size)
        .with_context(|| format!("finding the data in {}", image.display()))?;
    let zero = holes(&extents, size);
    let copied: u64 = extents.iter().map(|(s, e)| e - s).sum();
    let zeroed: u64 = zero.iter().map(|(s, e)| e - s).sum();
    let checksum = match dest {
        Dest::Path(path) => {
            let (src, path, extents, zero) = (src, path.clone(), extents, zero);
            let total = size;
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let job = tokio::task::spawn_blocking(move || {
                deliver_to_path(&src, size, &path, &extents, &zero, &|d| {
                    let _ = tx.send(d);
                })
            });
            while let Some(d) = rx.recv().await {
                progress(d, total);
            }
            job.await.map_err(|e| anyhow!("delivery thread: {e}"))??
        }
        Dest::Nbd(uri) => deliver_to_nbd(&src, size, uri, &extents, &zero, &progress).await?,
    };
    if checksum != expected {
        bail!(
            "{dest} read back differs from the recovered image {}: lifeboat-disk-v1 {checksum}, expected {expected}; do not boot from it",
            image.display()
        );
    }
    Ok(Delivered {
        target: dest.to_string(),
        copied,
        zeroed,
        checksum,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The extents cut into reads of at most [`MAX_IO`]: (offset, length).
fn pieces(extents: &[(u64, u64)]) -> impl Iterator<Item = (u64, usize)> + '_ {
    extents.iter().flat_map(|&(s, e)| {
        (s..e)
            .step_by(MAX_IO)
            .map(move |pos| (pos, (e - pos).min(MAX_IO as u64) as usize))
    })
}

fn read_piece<'a>(src: &File, buf: &'a mut [u8], pos: u64, n: usize) -> Result<&'a [u8]> {
    src.read_exact_at(&mut buf[..n], pos)
        .with_context(|| format!("reading the recovered image at {pos}"))?;
    Ok(&buf[..n])
}

/// Copies and zeroes onto an existing file or block device, syncs it, and
/// returns the checksum of what it reads back.
fn deliver_to_path(
    src: &File,
    size: u64,
    path: &Path,
    extents: &[(u64, u64)],
    zero: &[(u64, u64)],
    progress: &dyn Fn(u64),
) -> Result<String> {
    let meta = std::fs::metadata(path).with_context(|| {
        format!(
            "{}: a --target path must be an existing block device or image file (use --out for new images)",
            path.display()
        )
    })?;
    let dev = meta.file_type().is_block_device();
    if !dev && !meta.is_file() {
        bail!("{} is neither a block device nor a file", path.display());
    }
    {
        use std::os::unix::fs::MetadataExt;
        let s = src.metadata()?;
        if s.dev() == meta.dev() && s.ino() == meta.ino() {
            bail!(
                "{} is the image assembled in --out itself; name another target",
                path.display()
            );
        }
    }
    let dst = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(if dev { libc::O_EXCL } else { 0 })
        .open(path)
        .with_context(|| format!("opening {} for writing", path.display()))?;
    if dev {
        use std::io::Seek;
        let have = (&dst)
            .seek(io::SeekFrom::End(0))
            .with_context(|| format!("sizing {}", path.display()))?;
        if have < size {
            bail!(
                "{} holds {have} bytes; the disk needs {size}",
                path.display()
            );
        }
        if have > size {
            tracing::warn!(
                target_path = %path.display(),
                "the device holds {have} bytes, the disk {size}: bytes past {size} are left as they are"
            );
        }
    } else {
        dst.set_len(size)
            .with_context(|| format!("sizing {} to {size} bytes", path.display()))?;
    }
    let mut done = 0u64;
    let mut buf = vec![0u8; MAX_IO];
    for (pos, n) in pieces(extents) {
        let data = read_piece(src, &mut buf, pos, n)?;
        dst.write_all_at(data, pos)
            .with_context(|| format!("writing {n} bytes at {pos} of {}", path.display()))?;
        done += n as u64;
        progress(done);
    }
    for &(s, e) in zero {
        lifeboat_common::image::zero_range(&dst, s, e - s)
            .with_context(|| format!("zeroing {} bytes at {s} of {}", e - s, path.display()))?;
        done += e - s;
        progress(done);
    }
    dst.sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    // Read back from the device or file, not from the pages just written.
    // SAFETY: posix_fadvise and ioctl on a valid descriptor, integer arguments.
    unsafe {
        use std::os::fd::AsRawFd;
        libc::posix_fadvise(dst.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
        if dev {
            // BLKFLSBUF: drop the device's buffer cache.
            libc::ioctl(dst.as_raw_fd(), 0x1261 as _);
        }
    }
    drop(dst);
    crate::sums::sum_image(path, size)
}

async fn deliver_to_nbd(
    src: &File,
    size: u64,
    uri: &NbdUri,
    extents: &[(u64, u64)],
    zero: &[(u64, u64)],
    progress: &impl Fn(u64, u64),
) -> Result<String> {
    let mut c = NbdClient::connect(uri).await?;
    if c.size() < size {
        bail!(
            "{} holds {} bytes; the disk needs {size}",
            uri.text,
            c.size()
        );
    }
    if c.size() > size {
        tracing::warn!(
            target_uri = %uri.text,
            "the export holds {} bytes, the disk {size}: bytes past {size} are left as they are",
            c.size()
        );
    }
    // Reading and sending take turns in this task; a 4 MiB read of a
    // page-cached image is far faster than the socket.
    let mut done = 0u64;
    let mut buf = vec![0u8; MAX_IO];
    for (pos, n) in pieces(extents) {
        c.write(pos, read_piece(src, &mut buf, pos, n)?).await?;
        done += n as u64;
        progress(done, size);
    }
    for &(s, e) in zero {
        c.write_zeroes(s, e - s).await?;
        done += e - s;
        progress(done, size);
    }
    c.flush().await?;
    // Read back whole, as a checksum reader would see it.
    let chunks = disksum::chunks(size);
    let mut leaves = Vec::with_capacity(chunks as usize);
    for i in 0..chunks {
        let off = i * disksum::CHUNK;
        let len = disksum::CHUNK.min(size - off) as usize;
        let data = c.read(off, len).await?;
        leaves.push(disksum::leaf(&data));
    }
    c.disconnect().await?;
    Ok(disksum::hex(&disksum::combine(size, &leaves)))
}

/// Converts the raw image `raw` into `qcow2` with `qemu-img convert`, checks
/// the result with `qemu-img compare`, and removes `raw`.
pub fn to_qcow2(raw: &Path, qcow2: &Path) -> Result<()> {
    let partial = qcow2.with_extension("qcow2.partial");
    let run = |args: &[&std::ffi::OsStr], what: &str| -> Result<()> {
        let out = std::process::Command::new("qemu-img")
            .args(args)
            .output()
            .with_context(|| format!("running qemu-img to {what} (is qemu-utils installed?)"))?;
        if !out.status.success() {
            bail!(
                "qemu-img {what} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    };
    let _ = std::fs::remove_file(&partial);
    run(
        &[
            "convert".as_ref(),
            "-f".as_ref(),
            "raw".as_ref(),
            "-O".as_ref(),
            "qcow2".as_ref(),
            raw.as_os_str(),
            partial.as_os_str(),
        ],
        &format!("convert {} to qcow2", raw.display()),
    )?;
    run(
        &[
            "compare".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "raw".as_ref(),
            "-F".as_ref(),
            "qcow2".as_ref(),
            raw.as_os_str(),
            partial.as_os_str(),
        ],
        &format!("compare {} with its qcow2 copy", raw.display()),
    )?;
    // qemu-img creates it under the process's umask (0077, set in main);
    // 0600 also where it was started otherwise.
    std::fs::set_permissions(
        &partial,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .with_context(|| format!("making {} private (0600)", partial.display()))?;
    File::open(&partial)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", partial.display()))?;
    std::fs::rename(&partial, qcow2)
        .with_context(|| format!("renaming {} to {}", partial.display(), qcow2.display()))?;
    if let Some(dir) = qcow2.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {}", dir.display()))?;
    }
    // Only now, with the qcow2 durable, the raw image goes.
    std::fs::remove_file(raw).with_context(|| format!("removing {}", raw.display()))?;
    Ok(())
}

/// One disk of a recovered machine, in boot order.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DiskDescription {
    pub id: String,
    pub size: u64,
    pub format: Format,
    /// A path, or an NBD URI.
    pub location: String,
    /// 0 boots first (the protected machine's first disk).
    pub boot_index: usize,
    /// `lifeboat-disk-v1` of the disk as written, where it was computed.
    pub checksum: Option<String>,
}

/// `recovered-machine.json`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MachineDescription {
    pub machine: String,
    pub point: String,
    pub seq: u64,
    pub disks: Vec<DiskDescription>,
    pub memory_mib: u64,
    pub cpus: u32,
    /// The command `start-vm.sh` runs.
    pub qemu_command: Vec<String>,
}

pub const DESCRIPTION_FILE: &str = "recovered-machine.json";
pub const START_SCRIPT: &str = "start-vm.sh";
pub const DRILL_FILE: &str = "lifeboat-drill.json";

/// The QEMU command line that boots `disks` (virtio disks in boot order,
/// user-mode network, serial console on stdio).
pub fn qemu_command(
    machine: &str,
    disks: &[DiskDescription],
    memory_mib: u64,
    cpus: u32,
) -> Vec<String> {
    let mut cmd: Vec<String> = [
        "qemu-system-x86_64",
        "-name",
        machine,
        "-machine",
        "q35",
        "-accel",
        "kvm",
        "-accel",
        "tcg",
        "-cpu",
        "max",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    cmd.extend([
        "-m".into(),
        memory_mib.to_string(),
        "-smp".into(),
        cpus.to_string(),
    ]);
    for (i, d) in disks.iter().enumerate() {
        // Commas in a -drive value are doubled, as QEMU's option syntax asks.
        let file = d.location.replace(',', ",,");
        cmd.push("-drive".into());
        cmd.push(format!(
            "if=none,id=disk{i},format={},file={file}",
            d.format.as_str()
        ));
        cmd.push("-device".into());
        cmd.push(format!(
            "virtio-blk-pci,drive=disk{i},bootindex={}",
            d.boot_index
        ));
    }
    cmd.extend(
        [
            "-nic",
            "user,model=virtio-net-pci",
            "-serial",
            "mon:stdio",
            "-display",
            "none",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    cmd
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_=,./:+@%".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Writes `recovered-machine.json` and `start-vm.sh` into `out`; the paths
/// written.
pub fn write_description(out: &Path, d: &MachineDescription) -> Result<Vec<PathBuf>> {
    let json = out.join(DESCRIPTION_FILE);
    write_file(&json, serde_json::to_string_pretty(d)?.as_bytes(), 0o600)?;
    let script = out.join(START_SCRIPT);
    let line = d
        .qemu_command
        .iter()
        .map(|s| shell_quote(s))
        .collect::<Vec<_>>()
        .join(" \\\n    ");
    let text = format!(
        "#!/bin/sh\n# Boots {} as recovered at {} (seq {}), written by lifeboat-mt.\n# Memory and CPUs are --vm-memory/--vm-cpus; change them to the machine's own.\nexec {line} \"$@\"\n",
        d.machine, d.point, d.seq
    );
    write_file(&script, text.as_bytes(), 0o700)?;
    Ok(vec![json, script])
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    lifeboat_common::fsutil::replace_file_mode(path, data, mode)
        .with_context(|| format!("writing {}", path.display()))
}

/// `lifeboat-drill.json`: what a test failover wrote.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Drill {
    pub machines: Vec<String>,
    pub started: String,
    /// Every file the drill created, under `--out`.
    pub files: Vec<PathBuf>,
    /// Targets it wrote that are the operator's (left by `--cleanup`).
    pub targets: Vec<String>,
}

pub fn write_drill(out: &Path, drill: &Drill) -> Result<()> {
    write_file(
        &out.join(DRILL_FILE),
        serde_json::to_string_pretty(drill)?.as_bytes(),
        0o600,
    )
}

/// `test-failover --cleanup`: removes the files the drill in `out` listed,
/// then its record, then the directories it leaves empty. The paths removed.
pub fn cleanup(out: &Path) -> Result<(Drill, Vec<PathBuf>)> {
    let out =
        &std::fs::canonicalize(out).with_context(|| format!("resolving {}", out.display()))?;
    let record = out.join(DRILL_FILE);
    let text = std::fs::read(&record).with_context(|| {
        format!(
            "reading {} (is {} the --out of a test failover?)",
            record.display(),
            out.display()
        )
    })?;
    let drill: Drill = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a drill record", record.display()))?;
    let mut removed = Vec::new();
    let mut dirs = std::collections::BTreeSet::new();
    for f in &drill.files {
        // Only what lies under this --out: a record edited to name other
        // files removes nothing outside it.
        if !f.starts_with(out) || f.components().any(|c| c == std::path::Component::ParentDir) {
            bail!(
                "{} names {}, outside {}; removing nothing",
                record.display(),
                f.display(),
                out.display()
            );
        }
    }
    for f in &drill.files {
        match std::fs::remove_file(f) {
            Ok(()) => removed.push(f.clone()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(anyhow!("removing {}: {e}", f.display())),
        }
        if let Some(p) = f.parent() {
            dirs.insert(p.to_path_buf());
        }
    }
    std::fs::remove_file(&record).with_context(|| format!("removing {}", record.display()))?;
    removed.push(record);
    dirs.insert(out.to_path_buf());
    // Deepest first; a directory holding anything else stays.
    for d in dirs.iter().rev() {
        if std::fs::remove_dir(d).is_ok() {
            removed.push(d.clone());
        }
    }
    Ok((drill, removed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_and_holes_of_a_sparse_file_cover_it_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        let size = 64u64 << 20;
        f.set_len(size).unwrap();
        f.write_all_at(&[1u8; 4096], 8 << 20).unwrap();
        f.write_all_at(&[2u8; 100], size - 100).unwrap();
        let ext = data_extents(&f, size).unwrap();
        let hol = holes(&ext, size);
        let mut all: Vec<_> = ext.iter().chain(hol.iter()).copied().collect();
        all.sort();
        let mut pos = 0;
        for (s, e) in &all {
            assert_eq!(*s, pos);
            pos = *e;
        }
        assert_eq!(pos, size);
        let data: u64 = ext.iter().map(|(s, e)| e - s).sum();
        assert!(data >= 4196 && data < size / 2, "{ext:?}");
        assert!(ext
            .iter()
            .any(|(s, e)| *s <= 8 << 20 && *e >= (8 << 20) + 4096));
        assert!(ext.iter().any(|(s, e)| *s <= size - 100 && *e == size));
    }

    #[test]
    fn targets_parse_paths_and_nbd_uris() {
        let t: Target = "sda=/dev/vdb".parse().unwrap();
        assert_eq!(t.disk, "sda");
        assert!(matches!(t.dest, Dest::Path(ref p) if p == Path::new("/dev/vdb")));
        let t: Target = "d1=nbd://10.0.0.9:10809/d1".parse().unwrap();
        assert!(matches!(t.dest, Dest::Nbd(ref u) if u.export == "d1"));
        assert!("nodisk".parse::<Target>().is_err());
        assert!("=x".parse::<Target>().is_err());
    }

    #[test]
    fn cleanup_removes_only_what_the_drill_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("drill");
        std::fs::create_dir_all(out.join("m1")).unwrap();
        let mine = out.join("m1/sda.raw");
        std::fs::write(&mine, b"x").unwrap();
        let theirs = out.join("notes.txt");
        std::fs::write(&theirs, b"keep").unwrap();
        let drill = Drill {
            machines: vec!["m1".into()],
            started: "now".into(),
            files: vec![mine.clone()],
            targets: vec![],
        };
        write_drill(&out, &drill).unwrap();
        cleanup(&out).unwrap();
        assert!(!mine.exists() && !out.join("m1").exists());
        assert!(theirs.exists(), "a file the drill did not write stays");
        // A record naming a file outside --out removes nothing.
        let outside = dir.path().join("precious");
        std::fs::write(&outside, b"p").unwrap();
        let bad = Drill {
            files: vec![outside.clone()],
            ..drill
        };
        write_drill(&out, &bad).unwrap();
        assert!(cleanup(&out).is_err());
        assert!(outside.exists());
    }
}
