//! This process server's ownership of machines in the object store (the
//! rules are in `lifeboat_common::owner`).
//!
//! The server names itself by a random id kept in `<cache-dir>/server-id`
//! (a rebuilt server, with a new cache, is a new owner). The epoch it last
//! held per machine is kept in the cache (`Cache::owner_epoch`), so a server
//! that comes back after a partition knows it held the machine and that a
//! higher epoch means it lost it. A machine lost to another server is
//! *fenced* here until restart: its uploader stops, its agent is refused,
//! and both say which server owns it now.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use lifeboat_common::catalogue::CatalogueKey;
use lifeboat_common::owner::{self, Claim, Held, OwnerRecord, ServerIdentity};
use lifeboat_common::store::Store;
use tracing::{error, info, warn};

use crate::cache::Cache;

pub const SERVER_ID_FILE: &str = "server-id";

/// This server lost the machine to another: not retryable.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Fenced(pub String);

pub struct Ownership {
    pub me: ServerIdentity,
    fenced: Mutex<HashMap<String, String>>,
}

impl Ownership {
    /// Reads (or creates, 0600) the server id in `cache_dir`.
    pub fn load(cache_dir: &Path, listen: SocketAddr) -> Result<Ownership> {
        let path = cache_dir.join(SERVER_ID_FILE);
        let id = match std::fs::read_to_string(&path) {
            Ok(s) if !s.trim().is_empty() => s.trim().to_string(),
            Ok(_) | Err(_) => {
                let id = lifeboat_common::hex(&lifeboat_common::ids::new_stream_id()[..8]);
                write_private(&path, id.as_bytes())
                    .with_context(|| format!("writing {}", path.display()))?;
                id
            }
        };
        Ok(Ownership {
            me: ServerIdentity {
                id,
                address: format!("{} {listen}", hostname()),
            },
            fenced: Mutex::new(HashMap::new()),
        })
    }

    /// Why this server no longer serves `machine`, if it lost it.
    pub fn fenced(&self, machine: &str) -> Option<String> {
        self.fenced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(machine)
            .cloned()
    }

    /// Every machine this server lost, with why.
    pub fn fenced_all(&self) -> std::collections::BTreeMap<String, String> {
        self.fenced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Marks `machine` fenced (logged once) and returns the error to stop with.
    pub fn fence(&self, machine: &str, why: String) -> anyhow::Error {
        let mut map = self.fenced.lock().unwrap_or_else(|p| p.into_inner());
        if !map.contains_key(machine) {
            error!(%machine, "FENCED: {why}");
            map.insert(machine.to_string(), why.clone());
        }
        Fenced(why).into()
    }

    fn lost(&self, machine: &str, by: &OwnerRecord, held_epoch: u64) -> anyhow::Error {
        self.fence(
            machine,
            format!(
                "machine {machine} is owned by {by}; this process server ({} at {}) held it at epoch {held_epoch} and lost it: \
                 it stops uploading the machine and refuses its agent. Point the agent at the owner, \
                 or remove this server's cache to let it take the machine over again",
                self.me.id, self.me.address
            ),
        )
    }

    /// Takes or confirms ownership of `machine`; a [`Fenced`] error if
    /// another server took it over from this one.
    pub async fn claim(
        &self,
        store: &Store,
        cache: &Arc<Cache>,
        key: &CatalogueKey,
        machine: &str,
    ) -> Result<Held> {
        if let Some(why) = self.fenced(machine) {
            return Err(Fenced(why).into());
        }
        let held_epoch = {
            let (c, m) = (cache.clone(), machine.to_string());
            tokio::task::spawn_blocking(move || c.owner_epoch(&m)).await??
        };
        match owner::claim(store, key, machine, &self.me, held_epoch).await? {
            Claim::Fenced { by, held_epoch } => Err(self.lost(machine, &by, held_epoch)),
            Claim::Owned { held, previous } => {
                let epoch = held.record.epoch;
                if held_epoch != Some(epoch) {
                    let (c, m) = (cache.clone(), machine.to_string());
                    tokio::task::spawn_blocking(move || c.set_owner_epoch(&m, epoch)).await??;
                }
                match previous {
                    Some(p) => warn!(
                        %machine,
                        "took machine {machine} over from {p}: this server ({}) owns it now at epoch {epoch}",
                        self.me.id
                    ),
                    None if held_epoch != Some(epoch) => {
                        info!(%machine, epoch, "this server ({}) owns machine {machine}", self.me.id)
                    }
                    None => {}
                }
                Ok(held)
            }
        }
    }

    /// Checks, before an upload, that this server still owns `machine`.
    pub async fn verify(
        &self,
        store: &Store,
        key: &CatalogueKey,
        machine: &str,
        held: &Mutex<Held>,
    ) -> Result<()> {
        if let Some(why) = self.fenced(machine) {
            return Err(Fenced(why).into());
        }
        let mut h = held.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match owner::verify(store, key, machine, &mut h).await? {
            None => {
                *held.lock().unwrap_or_else(|p| p.into_inner()) = h;
                Ok(())
            }
            Some(by) if by.epoch > h.record.epoch => Err(self.lost(machine, &by, h.record.epoch)),
            Some(by) => anyhow::bail!(
                "the owner record of machine {machine} changed ({by}); claiming it again before uploading"
            ),
        }
    }
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into the buffer.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return "unknown-host".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}
