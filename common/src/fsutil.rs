//! Durable file replacement, shared by the agent's state records and the
//! master target's failover outputs: write `<name>.partial`, fsync, rename,
//! fsync the directory, so that a crash leaves the old file or the new one.

use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Replaces `path` with `data`, a new file created with `mode` (under the
/// process's umask).
pub fn replace_file_mode(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
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
