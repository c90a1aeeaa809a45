//! The agent's stream id and the rebase that follows lost state.
//!
//! The stream id (`<state-dir>/stream-id`, hex) names this agent's numbering of
//! the stream; it is made with a fresh state directory and sent in the hello.
//! The welcome tells where the receiver's stream ends and whose numbering it
//! holds; `SenderState::on_welcome` judges it (one typed outcome: resume, or
//! which kind of lost state). The agent lost its state when the receiver holds another numbering
//! (the state directory was wiped or the agent reinstalled) or holds more than
//! the journal kept (the journal lost its tail); the receiver lost state when
//! it holds less than it acknowledged (a process server rebuilt without its
//! cache). Then the two sides' entries cannot be matched, so the agent
//! *rebases*, in this order, each step durable before the next:
//!
//! 1. a checksum resync of every disk is planned (it replaces any initial sync);
//! 2. the journal and the queue drop every entry and continue after the
//!    receiver's durable seq, starting with an inconsistent mark and a resize
//!    entry per disk at its current size (a resize entry the rebase dropped,
//!    or one never made because the state was gone, would leave the replica
//!    at an old size);
//! 3. the receiver's stream id is adopted;
//!
//! then reconnects. A crash in between repeats the rebase on the next welcome.
//!
//! `lifeboat-agent reprotect` ([`forget_state`]) loses the state on purpose:
//! after a failback the disks hold what the master target wrote, which no
//! journal entry describes, so the next start must take this path.
//! Nothing acknowledged to a writer is lost: the dropped entries' data is on
//! the disk, and the checksum resync sends whatever the replica lacks.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Context, Result};
use lifeboat_common::protocol::{Op, StreamId};
use lifeboat_common::{hex, unhex};
use tracing::{info, warn};

use crate::checksum::Checksum;
use crate::disk::ProtectedDisk;
use crate::stream::Stream;

pub const STREAM_ID_FILE: &str = "stream-id";

/// The persisted stream id.
pub struct StreamIdFile {
    path: PathBuf,
    id: Mutex<StreamId>,
}

impl StreamIdFile {
    /// Loads the id, or makes and stores a new one.
    pub fn open(state_dir: &Path) -> Result<StreamIdFile> {
        let path = state_dir.join(STREAM_ID_FILE);
        let id = match std::fs::read_to_string(&path) {
            Ok(s) => unhex::<16>(s.trim()).ok_or_else(|| {
                anyhow!(
                    "{} does not hold a stream id (32 hex digits); remove it to start a new numbering (the replica is then compared by a checksum resync)",
                    path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = lifeboat_common::ids::new_stream_id();
                crate::fsutil::replace_file(&path, hex(&id).as_bytes())
                    .with_context(|| format!("writing {}", path.display()))?;
                info!("new stream id {}", hex(&id));
                id
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(StreamIdFile {
            path,
            id: Mutex::new(id),
        })
    }

    pub fn get(&self) -> StreamId {
        *self.id.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn adopt(&self, id: StreamId) -> Result<()> {
        crate::fsutil::replace_file(&self.path, hex(&id).as_bytes())
            .with_context(|| format!("writing {}", self.path.display()))?;
        *self.id.lock().unwrap_or_else(|p| p.into_inner()) = id;
        Ok(())
    }
}

/// Rebases the stream on the receiver's `durable` position and adopts its
/// stream id (see the module header).
pub async fn rebase(
    why: &str,
    durable: u64,
    theirs: StreamId,
    ids: &StreamIdFile,
    stream: &Arc<Stream>,
    checksum: &Arc<Checksum>,
    disks: &[Arc<ProtectedDisk>],
) -> Result<()> {
    warn!("{why}; continuing after seq {durable} and comparing every disk with the replica");
    let all: Vec<u16> = disks.iter().map(|d| d.index).collect();
    checksum.request(disks, &all, why, stream, true).await?;
    stream.supersede_sync();
    let first = std::iter::once(Op::Inconsistent {
        label: "rebase after lost agent state".into(),
    })
    .chain(disks.iter().map(|d| Op::Resize {
        disk: d.index,
        size: d.size_bytes(),
    }))
    .collect();
    let s = stream.clone();
    tokio::task::spawn_blocking(move || s.rebase(durable, first))
        .await?
        .context("rebasing the journal")?;
    ids.adopt(theirs)?;
    info!(
        "stream rebased: next seq {}, stream id {}",
        durable + 1,
        hex(&theirs)
    );
    Ok(())
}

/// Empties the state directory of a stopped agent (see the header); returns
/// how many entries it removed. A running agent is refused: it holds the
/// directory's lock from its start (before its control socket answers)
/// to its end, and this holds it while it deletes. A directory that holds
/// what is plainly not agent state (a config, a certificate, a key) is
/// refused too: `state-dir` then points at the wrong place.
pub fn forget_state(state_dir: &Path, control: &Path) -> Result<usize> {
    if std::os::unix::net::UnixStream::connect(control).is_ok() {
        anyhow::bail!(
            "the agent is running ({} answers): stop it first",
            control.display()
        );
    }
    let entries: Vec<_> = match std::fs::read_dir(state_dir) {
        Ok(d) => d
            .collect::<std::io::Result<_>>()
            .with_context(|| format!("reading {}", state_dir.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("reading {}", state_dir.display())),
    };
    if let Some(foreign) = entries.iter().map(|e| e.path()).find(|p| {
        matches!(
            p.extension().and_then(|x| x.to_str()),
            Some("toml" | "pem" | "key" | "crt" | "img" | "raw" | "qcow2")
        )
    }) {
        anyhow::bail!(
            "{} is in {}, which is not agent state: is state-dir right? Nothing was removed",
            foreign.display(),
            state_dir.display()
        );
    }
    let _lock = crate::fsutil::DirLock::acquire(state_dir).with_context(|| {
        format!(
            "the agent is running ({} is locked): stop it first",
            state_dir.join("lock").display()
        )
    })?;
    let mut removed = 0;
    for e in entries {
        let path = e.path();
        if e.file_name() == "lock" {
            continue;
        }
        let kind = e
            .file_type()
            .with_context(|| format!("reading {}", path.display()))?;
        let r = if kind.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        r.with_context(|| format!("removing {}", path.display()))?;
        removed += 1;
    }
    std::fs::File::open(state_dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", state_dir.display()))?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_id_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = StreamIdFile::open(dir.path()).unwrap().get();
        let f = StreamIdFile::open(dir.path()).unwrap();
        assert_eq!(f.get(), a);
        f.adopt([4; 16]).unwrap();
        assert_eq!(StreamIdFile::open(dir.path()).unwrap().get(), [4; 16]);
        std::fs::write(dir.path().join(STREAM_ID_FILE), "junk").unwrap();
        let e = StreamIdFile::open(dir.path()).err().unwrap().to_string();
        assert!(e.contains("stream id"), "{e}");
    }
}
