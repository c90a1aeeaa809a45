//! Starting, crashing and unmounting `lifeboat-powerfs` (the power-loss
//! filesystem of the `powerfs` crate) from tests: one [`PowerMount`] per
//! mounted directory, its process known by PID, every wait bounded.
//!
//! - [`PowerMount::crash`]: SIGUSR1 — everything not fsynced is gone, the
//!   backing directory holds exactly what was durable; then the mount is
//!   detached (if the process could not).
//! - [`PowerMount::start`] again over the same backing directory: "power on".
//! - [`PowerMount::stop`] / drop: SIGTERM — a clean unmount (everything made
//!   durable first); SIGKILL and a lazy unmount if that does not finish.
//! - [`PowerMount::fill`] / [`PowerMount::free`]: SIGUSR2 / SIGHUP — the disk
//!   is full (requests that need space fail with ENOSPC) / has room again;
//!   each returns once `statfs` on the mount shows it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Result};

use crate::{bin, wait_for, Proc};

const MOUNT_TIMEOUT: Duration = Duration::from_secs(30);
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

fn stamp() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Whether `path` is a mount point now (per /proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    // Field 5 is the mount point (spaces escaped as \040).
    info.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .is_some_and(|m| m.replace("\\040", " ") == want)
    })
}

/// Detaches whatever is mounted at `path` (a dead FUSE mount included).
pub fn detach(path: &Path) {
    if let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) {
        // SAFETY: umount2(2) with a valid C string.
        unsafe {
            libc::umount2(c.as_ptr(), libc::MNT_DETACH);
        }
    }
}

/// Whether FUSE mounts can work here (/dev/fuse exists and we are root).
pub fn fuse_available() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    Path::new("/dev/fuse").exists() && unsafe { libc::geteuid() } == 0
}

/// A powerfs mounted at `mount`, mirroring `backing`.
pub struct PowerMount {
    pub backing: PathBuf,
    pub mount: PathBuf,
    pub fsync_persists_name: bool,
    /// `--statfs-free-max`: the free space `statfs` reports at most.
    pub statfs_free_max: Option<u64>,
    pub proc: Option<Proc>,
    log_dir: PathBuf,
    pub crashes: u64,
}

impl PowerMount {
    /// Creates both directories and mounts. Logs go to `log_dir`.
    pub fn mount(backing: &Path, mount: &Path, log_dir: &Path) -> Result<PowerMount> {
        PowerMount::mount_small(backing, mount, log_dir, None)
    }

    /// [`PowerMount::mount`], with `statfs` reporting at most `free_max`
    /// free bytes (if given).
    pub fn mount_small(
        backing: &Path,
        mount: &Path,
        log_dir: &Path,
        free_max: Option<u64>,
    ) -> Result<PowerMount> {
        std::fs::create_dir_all(backing)?;
        std::fs::create_dir_all(mount)?;
        let mut m = PowerMount {
            backing: backing.canonicalize()?,
            mount: mount.canonicalize()?,
            fsync_persists_name: false,
            statfs_free_max: free_max,
            proc: None,
            log_dir: log_dir.to_path_buf(),
            crashes: 0,
        };
        m.start()?;
        Ok(m)
    }

    /// Mounts (again) over the backing directory.
    pub fn start(&mut self) -> Result<()> {
        if is_mounted(&self.mount) {
            detach(&self.mount);
        }
        let name = self
            .mount
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let log = self.log_dir.join(format!("powerfs-{name}-{}.log", stamp()));
        let mut cmd = Command::new(bin("lifeboat-powerfs"));
        cmd.arg("--backing")
            .arg(&self.backing)
            .arg("--mount")
            .arg(&self.mount);
        if self.fsync_persists_name {
            cmd.arg("--fsync-persists-name");
        }
        if let Some(n) = self.statfs_free_max {
            cmd.arg("--statfs-free-max").arg(n.to_string());
        }
        let mut p = Proc::spawn("lifeboat-powerfs", &mut cmd, &log)?;
        let mount = self.mount.clone();
        let ok = wait_for("powerfs to mount", MOUNT_TIMEOUT, || {
            if !p.is_running() {
                return Some(false);
            }
            is_mounted(&mount).then_some(true)
        })?;
        if !ok {
            bail!("lifeboat-powerfs exited at start:\n{}", p.log_text());
        }
        self.proc = Some(p);
        Ok(())
    }

    fn signal_and_wait(&mut self, sig: i32) -> bool {
        let Some(mut p) = self.proc.take() else {
            return true;
        };
        let pid = p.pid() as i32;
        // SAFETY: kill(2) on our own child's PID.
        unsafe {
            libc::kill(pid, sig);
        }
        let exited = wait_for("powerfs to exit", EXIT_TIMEOUT, || {
            (!p.is_running()).then_some(())
        })
        .is_ok();
        if !exited {
            p.kill9();
        }
        if is_mounted(&self.mount) {
            detach(&self.mount);
        }
        exited
    }

    /// Power loss: every unsynced write and directory change is dropped. The
    /// processes using the mount must be killed first.
    pub fn crash(&mut self) -> Result<()> {
        self.crashes += 1;
        if !self.signal_and_wait(libc::SIGUSR1) {
            bail!(
                "powerfs at {} did not exit on SIGUSR1",
                self.mount.display()
            );
        }
        Ok(())
    }

    /// Clean unmount: everything is made durable first.
    pub fn stop(&mut self) -> bool {
        self.signal_and_wait(libc::SIGTERM)
    }

    /// The disk fills up: requests that need new space fail with ENOSPC
    /// until [`PowerMount::free`] (or a power loss).
    pub fn fill(&mut self) -> Result<()> {
        self.set_full(true)
    }

    /// The disk has room again.
    pub fn free(&mut self) -> Result<()> {
        self.set_full(false)
    }

    fn set_full(&mut self, full: bool) -> Result<()> {
        let Some(p) = self.proc.as_ref() else {
            bail!("powerfs at {} is not running", self.mount.display());
        };
        // SAFETY: kill(2) on our own child's PID.
        unsafe {
            libc::kill(
                p.pid() as i32,
                if full { libc::SIGUSR2 } else { libc::SIGHUP },
            );
        }
        let mount = self.mount.clone();
        wait_for(
            if full {
                "powerfs to report itself full"
            } else {
                "powerfs to report free space"
            },
            MOUNT_TIMEOUT,
            || (free_bytes(&mount)? == 0).eq(&full).then_some(()),
        )
    }
}

/// Free bytes `statfs` reports for the filesystem at `path`.
pub fn free_bytes(path: &Path) -> Option<u64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs(3) fills the zeroed struct we pass; the path is a C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail * st.f_frsize)
}

impl Drop for PowerMount {
    fn drop(&mut self) {
        self.stop();
    }
}
