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
//!   owner that passed its check just before a takeover can at worst add an
//!   object — never replace the new owner's — and what it adds carries its
//!   epoch, which readers fence at the takeover (catalogue.rs).
//! - Epochs never repeat: a new record's epoch is above every epoch the
//!   store has seen (the owner record, takeover records, segment names), so
//!   a deleted owner record cannot hand a second server an epoch that shares
//!   the first one's fence; and a server that held epoch E finding any epoch
//!   above E there has lost the machine, record or not.

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
        let cur = current(store, key, machine).await?;
        if cur.as_ref().is_some_and(|(c, _)| c.server == me.id) {
            let (cur, etag) = cur.expect("checked");
            return Ok(Claim::Owned {
                held: Held { record: cur, etag },
                previous: None,
            });
        }
        // Taking or retaking the machine: above every epoch seen so far.
        let (floor, floor_server) = epoch_floor(store, key, machine).await?;
        if let Some(e) = held_epoch {
            let by = match &cur {
                Some((c, _)) if c.epoch > e => Some(c.clone()),
                _ if floor > e => Some(OwnerRecord {
                    format: OWNER_FORMAT,
                    machine: machine.to_string(),
                    server: floor_server.clone(),
                    address: "(from the store's takeover records and segment names)".into(),
                    epoch: floor,
                    since_ms: 0,
                    since: "-".into(),
                }),
                _ => None,
            };
            if let Some(by) = by {
                return Ok(Claim::Fenced { by, held_epoch: e });
            }
        }
        match cur {
            None => {
                let rec = record(machine, me, held_epoch.unwrap_or(0).max(floor) + 1);
                let body = Bytes::from(catalogue::sign_record(key, &name, &rec));
                if let Some(etag) = store.create_versioned(&name, body).await? {
                    return Ok(Claim::Owned {
                        held: Held { record: rec, etag },
                        previous: None,
                    });
                }
            }
            Some((cur, etag)) => {
                let rec = record(
                    machine,
                    me,
                    cur.epoch.max(held_epoch.unwrap_or(0)).max(floor) + 1,
                );
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

/// The highest owner epoch the store shows for `machine` outside its owner
/// record (takeover records, segment names), and who held it if a takeover
/// record says so.
async fn epoch_floor(
    store: &Store,
    key: &CatalogueKey,
    machine: &str,
) -> Result<(u64, String), OwnerError> {
    let fences = catalogue::list_fences(store, Some(key), machine).await?;
    let segments = catalogue::list_segments(store, machine).await?;
    // Retention deletes old segments, but only into a base written by the
    // owner of that time or a later one (epochs only grow): the bases'
    // epochs cover what the folded segments named.
    let all = catalogue::Fences::default();
    let bases = crate::base::list_bases(store, Some(key), machine, &all).await?;
    let from_segments = segments
        .iter()
        .map(|s| s.epoch)
        .chain(bases.iter().map(|b| b.epoch))
        .max()
        .unwrap_or(0);
    let newest = fences.records().iter().max_by_key(|r| r.epoch);
    Ok(match newest {
        Some(r) if r.epoch >= from_segments => (r.epoch, r.server.clone()),
        _ => (
            from_segments,
            "(unknown: named by its segments or bases)".into(),
        ),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue::{EpochRecord, SegmentName, FORMAT_VERSION};
    use crate::seal::Key;
    use crate::store::StoreConfig;

    fn server(id: &str) -> ServerIdentity {
        ServerIdentity {
            id: id.into(),
            address: format!("{id}-host 127.0.0.1:9443"),
        }
    }

    fn epoch_of(c: &Claim) -> u64 {
        match c {
            Claim::Owned { held, .. } => held.record.epoch,
            Claim::Fenced { .. } => 0,
        }
    }

    /// A deleted owner record never hands out an epoch the store has seen:
    /// the fences of a takeover would otherwise cover the new owner too.
    #[tokio::test]
    async fn epochs_never_repeat_after_the_owner_record_is_deleted() {
        let dir = std::env::temp_dir().join(format!(
            "lifeboat-owner-test-{}-{}",
            std::process::id(),
            crate::now_ms()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::open(&StoreConfig::new(format!("file://{}", dir.display()))).unwrap();
        let key = CatalogueKey::derive(&Key::from_bytes([3; 32]));
        let m = "m";
        // a owns it at 1; b (a rebuilt server) takes it over at 2.
        let a = claim(&store, &key, m, &server("a"), None).await.unwrap();
        assert_eq!(epoch_of(&a), 1);
        let b = claim(&store, &key, m, &server("b"), None).await.unwrap();
        assert_eq!(epoch_of(&b), 2);
        let rec = EpochRecord {
            format: FORMAT_VERSION,
            epoch: 2,
            after: 100,
            server: "b".into(),
        };
        let name = catalogue::epoch_object(m, 2);
        store
            .put(
                &name,
                Bytes::from(catalogue::sign_record(&key, &name, &rec)),
            )
            .await
            .unwrap();
        // The owner record is deleted.
        store.delete(&owner_object(m)).await.unwrap();
        // a, which held epoch 1, has lost the machine to b: record or not.
        match claim(&store, &key, m, &server("a"), Some(1)).await.unwrap() {
            Claim::Fenced { by, held_epoch } => {
                assert_eq!((by.epoch, by.server.as_str(), held_epoch), (2, "b", 1));
            }
            c => panic!("a must be fenced, got {c:?}"),
        }
        // A third server gets an epoch above every one seen: 3, not 1.
        let d = claim(&store, &key, m, &server("d"), None).await.unwrap();
        assert_eq!(epoch_of(&d), 3);
        // Segment names count too.
        store.delete(&owner_object(m)).await.unwrap();
        let seg = catalogue::segment_object(m, &SegmentName::new(101, 110, 7));
        store.put(&seg, Bytes::from_static(b"x")).await.unwrap();
        let e = claim(&store, &key, m, &server("e"), None).await.unwrap();
        assert_eq!(epoch_of(&e), 8);
        // The owner itself keeps its epoch.
        let again = claim(&store, &key, m, &server("e"), Some(8)).await.unwrap();
        assert_eq!(epoch_of(&again), 8);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
