//! Ownership of a machine's stream in the object store (fencing).
//!
//! ```text
//! machines/<machine>/owner   signed catalogue record (see catalogue.rs):
//!     {"format":1,"machine":..,"server":"<server id>","address":"<host listen>",
//!      "epoch":N,"since-ms":..,"since":"<RFC 3339>"}
//! ```
//!
//! Only the owner uploads a machine's segments, points and marks. Rules:
//!
//! - Taken with a conditional put: created with create-if-absent (epoch 1),
//!   taken over with an ETag-matched update that bumps the epoch. file://
//!   stores do the ETag match under a lock (see `Store::update_versioned`).
//! - A process server that never held the machine (a new or rebuilt one)
//!   takes it over. One that held it at epoch E and finds another server's
//!   record at an epoch above E has lost it: it is *fenced* — it stops
//!   uploading the machine and refuses its agent, naming the new owner.
//! - The owner re-checks the record's ETag (one HEAD) before every segment
//!   it puts; objects it writes are created, never overwritten, so a stale
//!   owner that passed its check just before a takeover can at worst add a
//!   segment the store already holds identically or fail on a conflict that
//!   names the object — never replace the new owner's.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::catalogue::{self, CatalogueError, CatalogueKey};
use crate::store::Store;

pub const OWNER_FORMAT: u32 = 1;
/// Conditional-put rounds before giving up on a contended record.
const CLAIM_ATTEMPTS: usize = 8;

pub fn owner_object(machine: &str) -> String {
    format!("machines/{machine}/owner")
}

/// Who owns a machine's stream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct OwnerRecord {
    pub format: u32,
    pub machine: String,
    /// The owning process server's id (random, kept in its cache directory).
    pub server: String,
    /// Where that server runs (host name and listen address), for people.
    pub address: String,
    pub epoch: u64,
    pub since_ms: u64,
    pub since: String,
}

impl std::fmt::Display for OwnerRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "process server {} at {} (epoch {}, since {})",
            self.server, self.address, self.epoch, self.since
        )
    }
}

/// This process server, as it names itself in owner records.
#[derive(Debug, Clone)]
pub struct ServerIdentity {
    pub id: String,
    pub address: String,
}

/// Ownership held: the record as written and its ETag.
#[derive(Debug, Clone)]
pub struct Held {
    pub record: OwnerRecord,
    pub etag: String,
}

#[derive(Debug)]
pub enum Claim {
    /// This server owns the machine; `previous` is the owner it took it from.
    Owned {
        held: Held,
        previous: Option<OwnerRecord>,
    },
    /// Another server took the machine over after this one held it.
    Fenced { by: OwnerRecord, held_epoch: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    #[error(transparent)]
    Catalogue(#[from] CatalogueError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("{object}: the ownership record kept changing under {CLAIM_ATTEMPTS} conditional puts; another process server is claiming machine {machine} at the same time")]
    Contended { object: String, machine: String },
}

fn record(machine: &str, me: &ServerIdentity, epoch: u64) -> OwnerRecord {
    let since_ms = crate::now_ms();
    OwnerRecord {
        format: OWNER_FORMAT,
        machine: machine.to_string(),
        server: me.id.clone(),
        address: me.address.clone(),
        epoch,
        since_ms,
        since: catalogue::format_time_ms(since_ms),
    }
}

/// The current owner record and its ETag, authenticated.
pub async fn current(
    store: &Store,
    key: &CatalogueKey,
    machine: &str,
) -> Result<Option<(OwnerRecord, String)>, OwnerError> {
    let name = owner_object(machine);
    match store.get_versioned(&name).await? {
        None => Ok(None),
        Some((bytes, etag)) => {
            let rec: OwnerRecord = catalogue::open_record(key, store, &name, &bytes)?;
            if rec.machine != machine {
                return Err(CatalogueError::Invalid {
                    object: store.describe(&name),
                    detail: format!("names machine {:?}", rec.machine),
                }
                .into());
            }
            Ok(Some((rec, etag)))
        }
    }
}

/// Takes or confirms ownership of `machine` for `me`. `held_epoch` is the
/// epoch this server last held (persisted by the caller), `None` if it never
/// held the machine.
pub async fn claim(
    store: &Store,
    key: &CatalogueKey,
    machine: &str,
    me: &ServerIdentity,
    held_epoch: Option<u64>,
) -> Result<Claim, OwnerError> {
    let name = owner_object(machine);
    for _ in 0..CLAIM_ATTEMPTS {
        match current(store, key, machine).await? {
            None => {
                let rec = record(machine, me, held_epoch.unwrap_or(0) + 1);
                let body = Bytes::from(catalogue::sign_record(key, &name, &rec));
                if let Some(etag) = store.create_versioned(&name, body).await? {
                    return Ok(Claim::Owned {
                        held: Held { record: rec, etag },
                        previous: None,
                    });
                }
            }
            Some((cur, etag)) if cur.server == me.id => {
                return Ok(Claim::Owned {
                    held: Held { record: cur, etag },
                    previous: None,
                });
            }
            Some((cur, etag)) => {
                if let Some(e) = held_epoch {
                    if cur.epoch > e {
                        return Ok(Claim::Fenced {
                            by: cur,
                            held_epoch: e,
                        });
                    }
                }
                let rec = record(machine, me, cur.epoch.max(held_epoch.unwrap_or(0)) + 1);
                let body = Bytes::from(catalogue::sign_record(key, &name, &rec));
                if let Some(new) = store.update_versioned(&name, body, &etag).await? {
                    return Ok(Claim::Owned {
                        held: Held {
                            record: rec,
                            etag: new,
                        },
                        previous: Some(cur),
                    });
                }
            }
        }
    }
    Err(OwnerError::Contended {
        object: store.describe(&name),
        machine: machine.to_string(),
    })
}

/// Checks that `held` is still the machine's owner record (one HEAD when it
/// is); returns the new owner if another server took it over.
pub async fn verify(
    store: &Store,
    key: &CatalogueKey,
    machine: &str,
    held: &mut Held,
) -> Result<Option<OwnerRecord>, OwnerError> {
    if store.etag(&owner_object(machine)).await?.as_deref() == Some(held.etag.as_str()) {
        return Ok(None);
    }
    match current(store, key, machine).await? {
        Some((cur, etag)) if cur.server == held.record.server && cur.epoch == held.record.epoch => {
            held.etag = etag; // rewritten by ourselves (or the backend changed its ETag)
            Ok(None)
        }
        Some((cur, _)) => Ok(Some(cur)),
        // Deleted: nobody else claims it; take it back at a higher epoch on
        // the next claim. Until then, stop: ownership must be explicit.
        None => Ok(Some(OwnerRecord {
            format: OWNER_FORMAT,
            machine: machine.to_string(),
            server: "(none: the owner record was deleted)".into(),
            address: "-".into(),
            epoch: held.record.epoch,
            since_ms: 0,
            since: "-".into(),
        })),
    }
}
