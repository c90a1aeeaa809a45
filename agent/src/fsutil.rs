//! Small durable-file helpers for the agent's state records: replace a file
//! atomically (`lifeboat_common::fsutil`) and remove one durably; read and
//! write enveloped JSON state records; lock the state directory.

use std::path::Path;

use lifeboat_common::formats::Record;

/// Replaces `path` with `data` so that a crash leaves the old or the new file.
pub fn replace_file(path: &Path, data: &[u8]) -> std::io::Result<()> {
    lifeboat_common::fsutil::replace_file_mode(path, data, 0o666)
}

/// Removes `path` (absent is fine) and makes the removal durable.
pub fn remove_file(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        r => r?,
    }
    lifeboat_common::fsutil::sync_parent(path)
}

/// An exclusive lock on `<dir>/lock`: one agent per state directory (two
/// would number the same stream twice).
pub use lifeboat_common::fsutil::DirLock;

/// Reads a JSON state record in an envelope of record type `R`
/// (`lifeboat_common::fsutil::load_record`).
pub fn load_record<R: Record, T: serde::de::DeserializeOwned>(
    path: &Path,
) -> anyhow::Result<Option<T>> {
    lifeboat_common::fsutil::load_record::<R, T>(path)
}

/// Replaces a JSON state record in an envelope of record type `R` (see
/// [`replace_file`]).
pub fn store_record<R: Record, T: serde::Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    lifeboat_common::fsutil::store_record::<R, T>(path, value, 0o666)
}
