//! Quiescing the machine for an app-consistent point: the [`Quiescer`]
//! trait, and its Linux implementation [`FsFreeze`] (pre-freeze scripts,
//! FIFREEZE, FITHAW, post-thaw scripts).
//!
//! A quiescer is made for one attempt and its methods are blocking: the
//! sequence in `apppoint.rs` calls each on a thread of its own under that
//! step's bound, so a call that hangs in the kernel (FIFREEZE flushes the
//! filesystem, whose writeback may come through this agent's own NBD export)
//! never holds the runtime, the write path or a crash-consistent tag.
//!
//! Invariants:
//! - [`Quiescer::thaw`] may be called at any time, from any thread, more
//!   than once, also while [`Quiescer::freeze`] still runs: it thaws what is
//!   frozen and marks the attempt thawed, and a freeze that completes after
//!   it thaws at once what it froze. So no path — success, error, timeout,
//!   panic — leaves a filesystem frozen.
//! - Only filesystems this attempt froze are thawed (one already frozen by
//!   someone else makes FIFREEZE fail with EBUSY and is left alone).
//! - A script runs in a process group of its own; past its bound the group is
//!   killed, so a hung script leaves nothing behind.
//!
//! The Windows implementation (a VSS copy backup, `cfg(windows)`) is
//! described in `docs/VSS.md`; it is not built here. `VssTest` is a
//! test-only stand-in that records points as `vss` without quiescing.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lifeboat_common::protocol::TagSource;

/// What went wrong in one step; every message names the script or mount.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuiesceError {
    #[error("{phase} script {path}: {why}")]
    Script {
        phase: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error("freezing {mount}: {why}")]
    Freeze { mount: PathBuf, why: String },
    #[error("thawing {mount}: {why}")]
    Thaw { mount: PathBuf, why: String },
}

/// One attempt at quiescing the machine. Blocking methods (see the module
/// header for how they are called and bounded).
pub trait Quiescer: Send + Sync {
    /// What a point made with this quiescer records.
    fn source(&self) -> TagSource;
    /// Before the freeze: the pre-freeze scripts.
    fn prepare(&self) -> Result<(), QuiesceError>;
    /// Freezes the filesystems. May block (flushing); see [`Self::thaw`].
    fn freeze(&self) -> Result<(), QuiesceError>;
    /// Thaws whatever this attempt froze; idempotent, safe at any time,
    /// also while `freeze` runs. Returns the first thaw that failed.
    fn thaw(&self) -> Result<(), QuiesceError>;
    /// After the thaw: the post-thaw scripts (run after failed attempts too).
    fn finish(&self) -> Result<(), QuiesceError>;
}

// linux/fs.h: _IOWR('X', 119, int) and _IOWR('X', 120, int).
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

fn fs_ioctl(dir: &std::fs::File, request: libc::c_ulong) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: FIFREEZE/FITHAW take an (unused) int argument and only act on
    // the open directory's filesystem.
    let r = unsafe { libc::ioctl(dir.as_raw_fd(), request as _, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[derive(Default)]
struct Frozen {
    /// Frozen by this attempt, in freeze order.
    mounts: Vec<(PathBuf, std::fs::File)>,
    /// `thaw` was called: a freeze completing now thaws at once.
    thawed: bool,
}

/// Linux: pre-freeze scripts, FIFREEZE of the listed mount points, FITHAW,
/// post-thaw scripts. Without mount points it runs the scripts only (source
/// `script`).
pub struct FsFreeze {
    mounts: Vec<PathBuf>,
    pre_freeze: Vec<PathBuf>,
    post_thaw: Vec<PathBuf>,
    script_timeout: Duration,
    label: String,
    /// Paths whose filesystem must not be frozen (the agent's state
    /// directory, the protected disks' backing files): freezing it would stop
    /// the agent's own writes.
    keep_writable: Vec<PathBuf>,
    frozen: Mutex<Frozen>,
}

impl FsFreeze {
    pub fn new(
        app: &crate::config::AppConfig,
        label: &str,
        keep_writable: Vec<PathBuf>,
    ) -> FsFreeze {
        FsFreeze {
            mounts: app.freeze.clone(),
            pre_freeze: app.pre_freeze.clone(),
            post_thaw: app.post_thaw.clone(),
            script_timeout: app.script_timeout,
            label: label.to_string(),
            keep_writable,
            frozen: Mutex::new(Frozen::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Frozen> {
        self.frozen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens `mount` and checks it is a mount point the agent may freeze.
    fn open_mount(&self, mount: &Path) -> Result<std::fs::File, QuiesceError> {
        let err = |why: String| QuiesceError::Freeze {
            mount: mount.to_path_buf(),
            why,
        };
        let dir = std::fs::File::open(mount).map_err(|e| err(format!("opening it: {e}")))?;
        let meta = dir.metadata().map_err(|e| err(e.to_string()))?;
        let parent = std::fs::metadata(mount.join(".."))
            .map_err(|e| err(format!("reading its parent: {e}")))?;
        if !meta.is_dir() || meta.dev() == parent.dev() {
            return Err(err(
                "not a mount point (freezing it would freeze the filesystem it sits on); \
                 list the filesystem's mount point in [app] freeze"
                    .into(),
            ));
        }
        for p in &self.keep_writable {
            if std::fs::metadata(p).is_ok_and(|m| m.dev() == meta.dev()) {
                return Err(err(format!(
                    "it holds {}, which the agent itself writes; freezing it would stop the agent",
                    p.display()
                )));
            }
        }
        Ok(dir)
    }
}

impl Quiescer for FsFreeze {
    fn source(&self) -> TagSource {
        if self.mounts.is_empty() {
            TagSource::Script
        } else {
            TagSource::Fsfreeze
        }
    }

    fn prepare(&self) -> Result<(), QuiesceError> {
        // The mounts first: a point that cannot freeze runs no script.
        for m in &self.mounts {
            self.open_mount(m)?;
        }
        for s in &self.pre_freeze {
            run_script("pre-freeze", s, &self.label, self.script_timeout)?;
        }
        Ok(())
    }

    fn freeze(&self) -> Result<(), QuiesceError> {
        for m in &self.mounts {
            let dir = self.open_mount(m)?;
            if self.lock().thawed {
                return Err(QuiesceError::Freeze {
                    mount: m.clone(),
                    why: "the attempt was given up before this filesystem was frozen".into(),
                });
            }
            // Outside the lock: this flushes the filesystem and may take long;
            // a thaw meanwhile thaws the others and marks the attempt.
            fs_ioctl(&dir, FIFREEZE).map_err(|e| QuiesceError::Freeze {
                mount: m.clone(),
                why: match e.raw_os_error() {
                    Some(libc::EBUSY) => "it is already frozen (by another tool?)".into(),
                    Some(libc::EOPNOTSUPP) => "the filesystem does not support freezing".into(),
                    _ => format!("FIFREEZE: {e}"),
                },
            })?;
            let mut frozen = self.lock();
            if frozen.thawed {
                drop(frozen);
                let _ = fs_ioctl(&dir, FITHAW);
                return Err(QuiesceError::Freeze {
                    mount: m.clone(),
                    why: "it froze after the attempt was given up; thawed again".into(),
                });
            }
            frozen.mounts.push((m.clone(), dir));
        }
        Ok(())
    }

    fn thaw(&self) -> Result<(), QuiesceError> {
        let mounts = {
            let mut frozen = self.lock();
            frozen.thawed = true;
            std::mem::take(&mut frozen.mounts)
        };
        let mut first = Ok(());
        for (m, dir) in mounts.into_iter().rev() {
            if let Err(e) = fs_ioctl(&dir, FITHAW) {
                tracing::error!("thawing {}: FITHAW: {e}", m.display());
                if first.is_ok() {
                    first = Err(QuiesceError::Thaw {
                        mount: m,
                        why: format!("FITHAW: {e}"),
                    });
                }
            }
        }
        first
    }

    fn finish(&self) -> Result<(), QuiesceError> {
        let mut first = Ok(());
        for s in &self.post_thaw {
            if let Err(e) = run_script("post-thaw", s, &self.label, self.script_timeout) {
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }
}

/// TEST ONLY (`[app] quiesce = "vss-test"`): quiesces nothing and records
/// the point as made by VSS, so the `vss` source can be carried through the
/// stream, the catalogue and the CLI on Linux.
pub struct VssTest;

impl Quiescer for VssTest {
    fn source(&self) -> TagSource {
        TagSource::Vss
    }
    fn prepare(&self) -> Result<(), QuiesceError> {
        Ok(())
    }
    fn freeze(&self) -> Result<(), QuiesceError> {
        Ok(())
    }
    fn thaw(&self) -> Result<(), QuiesceError> {
        Ok(())
    }
    fn finish(&self) -> Result<(), QuiesceError> {
        Ok(())
    }
}

/// How often a running script is looked at.
const SCRIPT_POLL: Duration = Duration::from_millis(20);

/// Runs `path` (no arguments, stdin closed, output to the agent's) in a
/// process group of its own; past `timeout` the group is killed.
pub fn run_script(
    phase: &'static str,
    path: &Path,
    label: &str,
    timeout: Duration,
) -> Result<(), QuiesceError> {
    let err = |why: String| QuiesceError::Script {
        phase,
        path: path.to_path_buf(),
        why,
    };
    let start = Instant::now();
    let mut child = Command::new(path)
        .env("LIFEBOAT_PHASE", phase)
        .env("LIFEBOAT_LABEL", label)
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| err(format!("starting it: {e}")))?;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                return Err(err(format!(
                    "{status} after {:.1}s (its output is in the agent's log)",
                    start.elapsed().as_secs_f64()
                )))
            }
            Ok(None) => {}
            Err(e) => return Err(err(format!("waiting for it: {e}"))),
        }
        if start.elapsed() >= timeout {
            // SAFETY: kill(2) of the script's own process group (its pid).
            unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
            let _ = child.wait();
            return Err(err(format!(
                "did not finish within {} (script-timeout); killed with its process group",
                humantime::format_duration(timeout)
            )));
        }
        std::thread::sleep(SCRIPT_POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn scripts_succeed_fail_and_are_killed_at_their_bound() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let ok = script(
            dir.path(),
            "ok.sh",
            &format!(
                "echo \"$LIFEBOAT_PHASE $LIFEBOAT_LABEL\" > {}",
                out.display()
            ),
        );
        run_script("pre-freeze", &ok, "nightly", Duration::from_secs(10)).unwrap();
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "pre-freeze nightly\n"
        );
        let bad = script(dir.path(), "bad.sh", "exit 3");
        let e = run_script("post-thaw", &bad, "", Duration::from_secs(10)).unwrap_err();
        assert!(
            e.to_string().contains("bad.sh") && e.to_string().contains("3"),
            "{e}"
        );
        // A hung script and the child it started are both killed.
        let pidfile = dir.path().join("child.pid");
        let hung = script(
            dir.path(),
            "hung.sh",
            &format!("sleep 1000 & echo $! > {}; wait", pidfile.display()),
        );
        let t = Instant::now();
        let e = run_script("pre-freeze", &hung, "", Duration::from_millis(500)).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert!(e.to_string().contains("did not finish within 500ms"), "{e}");
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            stat.is_empty() || stat.contains(") Z "),
            "the script's child survived: {stat}"
        );
        let e = run_script(
            "pre-freeze",
            &dir.path().join("missing"),
            "",
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(e.to_string().contains("missing: starting it"), "{e}");
    }

    #[test]
    fn a_directory_that_is_not_a_mount_point_is_never_frozen() {
        let dir = tempfile::tempdir().unwrap();
        let app = crate::config::AppConfig {
            freeze: vec![dir.path().to_path_buf()],
            ..Default::default()
        };
        let q = FsFreeze::new(&app, "", vec![]);
        assert_eq!(q.source(), TagSource::Fsfreeze);
        let e = q.prepare().unwrap_err();
        assert!(e.to_string().contains("not a mount point"), "{e}");
        let e = q.freeze().unwrap_err();
        assert!(e.to_string().contains("not a mount point"), "{e}");
        q.thaw().unwrap();
        let scripts_only = FsFreeze::new(&crate::config::AppConfig::default(), "", vec![]);
        assert_eq!(scripts_only.source(), TagSource::Script);
    }
}
