//! Consistency-group points as the master target reads them: the group's
//! recorded points (`common/src/group.rs`), each usable only when every
//! member's signed copy exists, authenticates with that member's catalogue
//! key and agrees with the others; and the choice of one for a group
//! failover (`latest`, `latest-app`, `latest-crash` — by the record's kind,
//! crash when absent — or an id). Recovering the members themselves is
//! `materialize` at each member's group-tag seq.

use std::collections::HashMap;

use anyhow::{bail, Result};
use lifeboat_common::catalogue::CatalogueKey;
use lifeboat_common::group::{self, GroupKind, GroupRecord};
use lifeboat_common::seal::Key;
use lifeboat_common::store::Store;

use crate::materialize::machine_keys;

/// What the store holds of a group.
pub struct GroupPoints {
    /// Usable group points, oldest first.
    pub points: Vec<GroupRecord>,
    /// Recorded ids that are no group point, with why.
    pub unusable: Vec<(u64, String)>,
    /// Whether the records were authenticated (a key was given).
    pub verified: bool,
}

/// Lists the group's points; with `kek` every member copy is authenticated
/// (without it the listing is for display only).
pub async fn list(store: &Store, kek: Option<&Key>, name: &str) -> Result<GroupPoints> {
    lifeboat_common::ids::validate_id("group", name).map_err(anyhow::Error::msg)?;
    let mut keys: HashMap<String, CatalogueKey> = HashMap::new();
    let mut out = GroupPoints {
        points: Vec::new(),
        unusable: Vec::new(),
        verified: kek.is_some(),
    };
    for id in group::list_ids(store, name).await? {
        if let Some(kek) = kek {
            let idx = group::load_index(store, name, id).await?;
            for m in &idx.machines {
                if !keys.contains_key(m) {
                    keys.insert(m.clone(), machine_keys(store, kek, m).await?.catalogue);
                }
            }
        }
        let key_of = |m: &str| keys.get(m);
        match group::check_point(store, name, id, |m| {
            if kek.is_some() {
                key_of(m)
            } else {
                None
            }
        })
        .await?
        {
            Ok(rec) => out.points.push(rec),
            Err(why) => out.unusable.push((id, why)),
        }
    }
    Ok(out)
}

/// The group point `spec` names: `latest`, `latest-app`, `latest-crash` or
/// an id as `points --group` lists.
pub fn pick<'a>(points: &'a GroupPoints, name: &str, spec: &str) -> Result<&'a GroupRecord> {
    let newest = |kind: GroupKind| points.points.iter().rev().find(|p| p.kind == kind);
    let found = match spec {
        "latest" => points.points.last(),
        "latest-app" => newest(GroupKind::App),
        "latest-crash" => newest(GroupKind::Crash),
        id => {
            let Ok(id) = id.parse::<u64>() else {
                bail!("with --group, --point is latest, latest-app, latest-crash or a group point id (as `lifeboat-mt points --group {name}` lists), not {id:?}");
            };
            if let Some((_, why)) = points.unusable.iter().find(|(i, _)| *i == id) {
                bail!("group point {id} of {name} cannot be used: {why}");
            }
            points.points.iter().find(|p| p.id == id)
        }
    };
    match found {
        Some(p) => Ok(p),
        None if points.points.is_empty() => bail!(
            "group {name} has no group point in the store (is the group configured in ps.toml, with every member connected?)"
        ),
        None if spec == "latest-app" => bail!(
            "group {name} has no app-consistent group point (`lifeboat-ps group-tag --group {name} --app` takes one; each member needs [app] quiescing configured)"
        ),
        None => bail!(
            "group {name} has no group point {spec}; `lifeboat-mt points --group {name}` lists them"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lifeboat_common::group::GroupMember;

    fn rec(id: u64, kind: GroupKind) -> GroupRecord {
        let m = |machine: &str| GroupMember {
            machine: machine.into(),
            seq: id,
            source: None,
        };
        GroupRecord::new("g", id, id, "l", kind, vec![m("a"), m("b")])
    }

    #[test]
    fn points_are_picked_by_kind_and_id() {
        let gp = GroupPoints {
            points: vec![
                rec(1, GroupKind::App),
                rec(2, GroupKind::Crash),
                rec(3, GroupKind::App),
                rec(4, GroupKind::Crash),
            ],
            unusable: vec![(5, "a copy is missing".into())],
            verified: true,
        };
        let id = |spec: &str| pick(&gp, "g", spec).map(|p| p.id);
        assert_eq!(id("latest").unwrap(), 4);
        assert_eq!(id("latest-app").unwrap(), 3);
        assert_eq!(id("latest-crash").unwrap(), 4);
        assert_eq!(id("1").unwrap(), 1);
        assert!(id("5").unwrap_err().to_string().contains("missing"));
        assert!(id("newest").is_err());
        let crash_only = GroupPoints {
            points: vec![rec(2, GroupKind::Crash)],
            unusable: vec![],
            verified: true,
        };
        let e = pick(&crash_only, "g", "latest-app")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no app-consistent group point"), "{e}");
    }
}
