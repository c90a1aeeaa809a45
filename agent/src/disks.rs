//! The agent's disk table (`<state-dir>/disks.rec`, envelope `LBDT` of JSON):
//! every disk this agent has protected, in the order it first saw them. A
//! disk's position is its number in stream entries and in the hello, so the
//! number belongs to the disk's id, not to its place in `agent.toml`:
//!
//! - a reorder of `[[disk]]` blocks changes nothing;
//! - an added disk takes the next number (and gets an initial sync: it has no
//!   sync record);
//! - a removed disk stays, `retired`, at its last size: its number is never
//!   reused and the replica keeps its history and points.
//!
//! The table is made durable before the exports serve a write.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use lifeboat_common::formats::DiskTable as DiskTableRecord;
use lifeboat_common::protocol::DiskInfo;
use tracing::{info, warn};

pub const DISK_TABLE_FILE: &str = "disks.rec";

/// The persisted table; `disks[n]` is disk number `n`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Table {
    disks: Vec<DiskInfo>,
}

pub struct DiskTable {
    path: PathBuf,
    table: Table,
}

impl DiskTable {
    /// Loads the table and brings it up to date with the configured disks
    /// (`(id, size)` in config order): known ids keep their numbers and take
    /// their current size, new ids are appended, ids no longer configured are
    /// retired. Persists the result when it changed.
    pub fn open(state_dir: &Path, configured: &[(String, u64)]) -> Result<DiskTable> {
        let path = state_dir.join(DISK_TABLE_FILE);
        let mut table: Table =
            crate::fsutil::load_record::<DiskTableRecord, _>(&path)?.unwrap_or_default();
        let before = table.clone();
        for (id, size) in configured {
            match table.disks.iter_mut().find(|d| &d.id == id) {
                Some(d) => {
                    if d.retired {
                        info!("disk {id} is protected again (number kept)");
                    }
                    d.size = *size;
                    d.retired = false;
                }
                None => {
                    if !table.disks.is_empty() {
                        info!(
                            "disk {id} is new (number {}): it gets an initial sync",
                            table.disks.len()
                        );
                    }
                    table.disks.push(DiskInfo::new(id.clone(), *size));
                }
            }
        }
        for d in table.disks.iter_mut() {
            if !d.retired && !configured.iter().any(|(id, _)| id == &d.id) {
                warn!(
                    "disk {} is no longer configured: retired, its replica and points are kept",
                    d.id
                );
                d.retired = true;
            }
        }
        if table.disks.len() > crate::config::MAX_DISKS {
            bail!(
                "{} disks in {} (retired ones included): at most {}",
                table.disks.len(),
                path.display(),
                crate::config::MAX_DISKS
            );
        }
        if table != before {
            crate::fsutil::store_record::<DiskTableRecord, _>(&path, &table)?;
        }
        Ok(DiskTable { path, table })
    }

    /// The number of the configured disk `id`.
    pub fn number(&self, id: &str) -> u16 {
        self.table
            .disks
            .iter()
            .position(|d| d.id == id)
            .expect("every configured disk is in the table") as u16
    }

    /// The hello's disk list: every disk in number order, retired ones included.
    pub fn hello(&self) -> Vec<DiskInfo> {
        self.table.disks.clone()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(disks: &[(&str, u64)]) -> Vec<(String, u64)> {
        disks.iter().map(|(i, s)| (i.to_string(), *s)).collect()
    }

    #[test]
    fn numbers_follow_ids_through_reorders_additions_and_removals() {
        let dir = tempfile::tempdir().unwrap();
        let t = DiskTable::open(dir.path(), &cfg(&[("a", 1), ("b", 2)])).unwrap();
        assert_eq!((t.number("a"), t.number("b")), (0, 1));
        // Swapped blocks: same numbers.
        let t = DiskTable::open(dir.path(), &cfg(&[("b", 2), ("a", 1)])).unwrap();
        assert_eq!((t.number("a"), t.number("b")), (0, 1));
        // a removed, c added: a keeps number 0, retired, at its size.
        let t = DiskTable::open(dir.path(), &cfg(&[("c", 3), ("b", 5)])).unwrap();
        assert_eq!((t.number("b"), t.number("c")), (1, 2));
        let hello = t.hello();
        assert_eq!(
            hello[0],
            DiskInfo {
                id: "a".into(),
                size: 1,
                retired: true
            }
        );
        assert_eq!(hello[1].size, 5);
        // a comes back with its number.
        let t = DiskTable::open(dir.path(), &cfg(&[("a", 1)])).unwrap();
        assert_eq!(t.number("a"), 0);
        assert!(!t.hello()[0].retired && t.hello()[1].retired && t.hello()[2].retired);
    }

    #[test]
    fn the_kept_version_1_table_reads_back() {
        use lifeboat_common::formats;
        let table = Table {
            disks: vec![
                DiskInfo {
                    id: "root".into(),
                    size: 1 << 30,
                    retired: false,
                },
                DiskInfo {
                    id: "old".into(),
                    size: 1 << 20,
                    retired: true,
                },
            ],
        };
        let bytes = formats::read_fixture::<DiskTableRecord>("disk-table", || {
            formats::seal::<DiskTableRecord>(&serde_json::to_vec(&table).unwrap())
        });
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(DISK_TABLE_FILE), bytes).unwrap();
        let t = DiskTable::open(dir.path(), &cfg(&[("root", 1 << 30)])).unwrap();
        assert_eq!(t.table, table);
    }
}
