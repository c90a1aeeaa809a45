//! Durable file replacement, shared by the agent's state records and the
//! master target's failover outputs and applied positions: write
//! `<name>.partial`, fsync, rename, fsync the directory, so that a crash
//! leaves the old file or the new one; the enveloped JSON records
//! (`formats.rs`) read and replaced that way; a state directory's lock.

use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Replaces `path` with `data`, a new file created with `mode` (under the
/// process's umask).
pub fn replace_file_mode(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    replace_file_owned(path, data, mode, None)
}

/// [`replace_file_mode`], the new file given `owner` (uid, gid) before it
/// takes the old one's place (best effort: only root may give files away).
pub fn replace_file_owned(
    path: &Path,
    data: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    if let Some((uid, gid)) = owner {
        let _ = std::os::unix::fs::fchown(&f, Some(uid), Some(gid));
    }
    f.write_all(data)?;
    f.sync_data()?;
    std::fs::rename(&tmp, path)?;
    sync_parent(path)
}

/// Makes a change to `path`'s directory entry durable.
pub fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => std::fs::File::open(d)?.sync_all(),
        _ => Ok(()),
    }
}

/// An exclusive lock on `<dir>/lock`, held while the value lives: one
/// process per state directory. Taken without waiting: a holder is an error.
pub struct DirLock(#[allow(dead_code)] std::fs::File);

impl DirLock {
    pub fn acquire(dir: &Path) -> io::Result<DirLock> {
        use std::os::unix::io::AsRawFd;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(DirLock(f))
    }
}

/// Reads a JSON state record in an envelope of record type `R`
/// (`formats.rs`); `None` when the file does not exist. Errors name the file.
pub fn load_record<R: crate::formats::Record, T: serde::de::DeserializeOwned>(
    path: &Path,
) -> anyhow::Result<Option<T>> {
    use anyhow::Context;
    match std::fs::read(path) {
        Ok(b) => {
            let p = crate::formats::open::<R>(&b)
                .with_context(|| format!("reading {}", path.display()))?;
            Ok(Some(
                serde_json::from_slice(p).with_context(|| format!("parsing {}", path.display()))?,
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Replaces a JSON state record in an envelope of record type `R` durably
/// ([`replace_file_mode`]).
pub fn store_record<R: crate::formats::Record, T: serde::Serialize>(
    path: &Path,
    value: &T,
    mode: u32,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let bytes = crate::formats::seal::<R>(&serde_json::to_vec(value)?);
    replace_file_mode(path, &bytes, mode).with_context(|| format!("writing {}", path.display()))
}
