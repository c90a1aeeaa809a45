//! Checking recovered images against the checksums the agent recorded at the
//! point (`sums/<point>.json`, `lifeboat_common::disksum`): proof that an
//! image is what the source disk held, beyond the objects being authentic.
//!
//! Every image is re-read and hashed (on every core) when there is a record
//! to compare with: that of the point recovered, or — for `latest` or a time
//! — that of the newest point before it when the stream after that point
//! holds only its checksums (nothing was written since). Otherwise (a point
//! whose hashing was skipped, one recorded by an older agent, a stream end
//! with writes after the last point) nothing is re-read and the report says
//! why, never claiming a match. A difference is an error naming the disk,
//! both sums and the record.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use lifeboat_common::catalogue::{self, Fences};
use lifeboat_common::disksum;
use lifeboat_common::store::Store;

use crate::materialize::MachineKeys;

/// One image and its checksum.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImageSum {
    pub id: String,
    pub size: u64,
    /// `lifeboat-disk-v1` of the image, lower-case hex (`None`: nothing to
    /// compare with, not computed).
    pub checksum: Option<String>,
    /// What the agent recorded at the point; equal to `checksum` whenever
    /// present (a difference is an error).
    pub recorded: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Checked {
    /// The record the images were compared with, or why there is none.
    pub against: String,
    pub matched: bool,
    pub disks: Vec<ImageSum>,
}

/// The `lifeboat-disk-v1` sum of the image at `path`, its first `size` bytes.
pub fn sum_image(path: &Path, size: u64) -> Result<String> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let sum = disksum::sum_file(&file, size, threads, &|_| {})
        .with_context(|| format!("checksumming {}", path.display()))?;
    Ok(disksum::hex(&sum))
}

/// Hashes each image (`id`, path, size) of the stream at `seq` and compares
/// it with the checksums the agent recorded there (see the module header);
/// `points`: the machine's recovery points.
pub async fn check_images(
    store: &Store,
    keys: &MachineKeys,
    machine: &str,
    fences: &Fences,
    points: &[u64],
    seq: u64,
    images: &[(String, std::path::PathBuf, u64)],
) -> Result<Checked> {
    let load = |p: u64| catalogue::load_sums(store, &keys.catalogue, machine, p, fences);
    let (record, why_none) = if points.contains(&seq) {
        (
            load(seq).await?,
            format!(
                "no checksums are recorded at point {seq} (the agent skipped its hashing, its record is not uploaded yet, or the agent is older)"
            ),
        )
    } else {
        // The stream's end or a time: the newest point before it, when
        // nothing but its checksums follows it.
        let before = points.iter().copied().filter(|&p| p < seq).max();
        let rec = match before {
            Some(p) => load(p).await?.filter(|r| r.seq == p + 1 && seq == p + 1),
            None => None,
        };
        (
            rec,
            format!("seq {seq} is not a recovery point and writes followed the last point before it (checksums are recorded at points)"),
        )
    };
    let Some(record) = record else {
        return Ok(Checked {
            against: format!("nothing: {why_none}"),
            matched: false,
            disks: images
                .iter()
                .map(|(id, _, size)| ImageSum {
                    id: id.clone(),
                    size: *size,
                    checksum: None,
                    recorded: None,
                })
                .collect(),
        });
    };
    let seq = record.point;
    let object = store.describe(&catalogue::sums_object(machine, seq));
    let mut disks = Vec::new();
    for (id, path, size) in images {
        // A disk the record does not hold is not read: nothing to compare.
        let Some(r) = record.disk(id) else {
            disks.push(ImageSum {
                id: id.clone(),
                size: *size,
                checksum: None,
                recorded: None,
            });
            continue;
        };
        if r.size != *size {
            bail!(
                "disk {id}: the recovered image has {size} bytes, but the source had {} at seq {seq} ({object}); \
                 the image is not the source's and is not to be used",
                r.size
            );
        }
        let (p, s) = (path.clone(), *size);
        let checksum = tokio::task::spawn_blocking(move || sum_image(&p, s))
            .await
            .map_err(|e| anyhow!("checksum task: {e}"))??;
        if r.sum != checksum {
            bail!(
                "disk {id}: the recovered image {} has checksum {checksum}, but the source's at seq {seq} was {} ({object}); \
                 the image is not the source's and is not to be used",
                path.display(),
                r.sum
            );
        }
        disks.push(ImageSum {
            id: id.clone(),
            size: *size,
            checksum: Some(checksum),
            recorded: Some(r.sum.clone()),
        });
    }
    let missing: Vec<&str> = disks
        .iter()
        .filter(|d| d.recorded.is_none())
        .map(|d| d.id.as_str())
        .collect();
    let matched = missing.is_empty();
    let against = if matched {
        object
    } else {
        format!(
            "{object}, which holds no checksum for disk {} (reading it failed on the agent); the other disks match",
            missing.join(", ")
        )
    };
    Ok(Checked {
        against,
        matched,
        disks,
    })
}

impl Checked {
    /// Lines for the human report.
    pub fn print(&self) {
        if self.matched {
            println!(
                "  checksums match the source's at the point ({})",
                self.against
            );
        } else {
            println!("  checksums not compared: {}", self.against);
        }
        for d in &self.disks {
            if let Some(c) = &d.checksum {
                println!("  disk {}: checksum {c}", d.id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lifeboat_common::catalogue::{CatalogueKey, DiskChecksum, SumsRecord};
    use lifeboat_common::seal::Key;
    use lifeboat_common::store::StoreConfig;

    /// A store with a sums record for point 5 of `m`, and an image of 3 MiB + 7.
    async fn setup(
        dir: &Path,
        recorded: impl Fn(&str) -> String,
    ) -> (Store, MachineKeys, std::path::PathBuf, u64) {
        let store = Store::open(&StoreConfig::new(format!("file://{}", dir.display()))).unwrap();
        let data = Key::generate();
        let keys = MachineKeys {
            catalogue: CatalogueKey::derive(&data),
            data,
        };
        let size = 3 * disksum::CHUNK + 7;
        let img = dir.join("root.raw");
        std::fs::write(&img, (0..size).map(|i| (i % 253) as u8).collect::<Vec<_>>()).unwrap();
        let sum = sum_image(&img, size).unwrap();
        let rec = SumsRecord {
            format: 1,
            point: 5,
            seq: 6,
            disks: vec![DiskChecksum {
                id: "root".into(),
                size,
                sum: recorded(&sum),
            }],
            epoch: 1,
        };
        let name = catalogue::sums_object("m", 5);
        let signed = catalogue::sign_record(&keys.catalogue, &name, &rec);
        store.put(&name, signed.into()).await.unwrap();
        (store, keys, img, size)
    }

    #[tokio::test]
    async fn a_matching_image_is_reported_and_a_differing_one_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let (store, keys, img, size) = setup(dir.path(), |s| s.to_string()).await;
        let images = vec![("root".to_string(), img.clone(), size)];
        let fences = Fences::default();
        let ok = check_images(&store, &keys, "m", &fences, &[5, 9], 5, &images)
            .await
            .unwrap();
        assert!(ok.matched, "{ok:?}");
        // The stream's end right after the point's checksums is the point.
        let end = check_images(&store, &keys, "m", &fences, &[5], 6, &images)
            .await
            .unwrap();
        assert!(end.matched, "{end:?}");
        // A point without a record, or writes after the point: unchecked,
        // never a match, nothing re-read.
        let none = check_images(&store, &keys, "m", &fences, &[5, 9], 9, &images)
            .await
            .unwrap();
        assert!(!none.matched && none.against.contains("no checksums are recorded"));
        assert!(none.disks[0].checksum.is_none());
        let later = check_images(&store, &keys, "m", &fences, &[5], 7, &images)
            .await
            .unwrap();
        assert!(!later.matched && later.against.contains("writes followed"));

        // One byte differs from what the source had.
        let bytes = std::fs::read(&img).unwrap();
        let mut changed = bytes.clone();
        changed[disksum::CHUNK as usize + 3] ^= 1;
        std::fs::write(&img, &changed).unwrap();
        let e = check_images(&store, &keys, "m", &fences, &[5], 5, &images)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("disk root") && e.contains("sums/0000000000000005.json"),
            "{e}"
        );

        // A record signed with another key is refused, not trusted.
        let dir2 = tempfile::tempdir().unwrap();
        let (store2, _, img2, _) = setup(dir2.path(), |s| s.to_string()).await;
        let other = MachineKeys {
            catalogue: CatalogueKey::derive(&Key::generate()),
            data: Key::generate(),
        };
        let images2 = vec![("root".to_string(), img2, size)];
        let e = check_images(&store2, &other, "m", &fences, &[5], 5, &images2)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("authentication failed"), "{e}");
    }
}
