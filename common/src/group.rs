//! Consistency-group points in the catalogue.
//!
//! A group point exists when every member machine placed the group tag under
//! one common hold (see `process-server/src/groups.rs`). The process server
//! records it only after every member's commit succeeded, in this order:
//!
//! ```text
//! machines/<m>/groups/<group>/<id:016x>.json   one per member, signed with m's
//!                                              catalogue key: the whole record
//! groups/<group>/<id:016x>.json                the index, unsigned, written
//!                                              last: names the members
//! ```
//!
//! Both are JSON (`format` 1). A record says its `kind`: `crash` (absent in
//! records written before app-consistent group points, and still left out
//! for crash points, so they read as before) or `app` (every member
//! quiesced inside the hold, each member's `source` saying how: fsfreeze,
//! script, vss). The index only says where to look: a reader
//! (failover) opens every member's signed copy and uses the point only when
//! all exist, authenticate and agree; the member list it trusts is the one
//! the signed copies carry. An attempt that timed out or failed has no index
//! and no complete set of copies, so it is no group point — even where some
//! members placed their tag (their own catalogue then shows a `group` point
//! that no group point names).

use serde::{Deserialize, Serialize};

use crate::catalogue::{
    format_time_ms, open_record, open_record_unverified, CatalogueError, CatalogueKey,
};
use crate::protocol::TagSource;
use crate::store::Store;

pub const GROUP_FORMAT: u32 = 1;

/// The member's signed copy of group point `id` of `group`.
pub fn member_object(machine: &str, group: &str, id: u64) -> String {
    format!("machines/{machine}/groups/{group}/{id:016x}.json")
}

/// The index object of group point `id` of `group`.
pub fn index_object(group: &str, id: u64) -> String {
    format!("groups/{group}/{id:016x}.json")
}

/// What a group point is consistent for.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum GroupKind {
    /// Every member's writes held at one moment (its tag is a `group` tag).
    #[default]
    Crash,
    /// Every member quiesced, then held at one moment (its tag is an `app`
    /// tag with the member's source).
    App,
}

impl GroupKind {
    pub fn is_crash(&self) -> bool {
        *self == GroupKind::Crash
    }
    pub fn as_str(self) -> &'static str {
        match self {
            GroupKind::Crash => "crash",
            GroupKind::App => "app",
        }
    }
}

/// One member's place in a group point: its group tag's seq (and, for an
/// app-consistent point, how the member quiesced).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct GroupMember {
    pub machine: String,
    pub seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<TagSource>,
}

/// A group point: each member's seq of the tag placed under the common hold.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct GroupRecord {
    pub format: u32,
    pub group: String,
    pub id: u64,
    pub time_ms: u64,
    pub time: String,
    pub label: String,
    #[serde(default, skip_serializing_if = "GroupKind::is_crash")]
    pub kind: GroupKind,
    /// Sorted by machine.
    pub members: Vec<GroupMember>,
}

impl GroupRecord {
    pub fn new(
        group: &str,
        id: u64,
        time_ms: u64,
        label: &str,
        kind: GroupKind,
        mut members: Vec<GroupMember>,
    ) -> GroupRecord {
        members.sort_by(|a, b| a.machine.cmp(&b.machine));
        GroupRecord {
            format: GROUP_FORMAT,
            group: group.to_string(),
            id,
            time_ms,
            time: format_time_ms(time_ms),
            label: label.to_string(),
            kind,
            members,
        }
    }

    pub fn seq_of(&self, machine: &str) -> Option<u64> {
        self.members
            .iter()
            .find(|m| m.machine == machine)
            .map(|m| m.seq)
    }
}

/// `groups/<group>/<id>.json`: where the member copies are.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct GroupIndex {
    pub format: u32,
    pub group: String,
    pub id: u64,
    pub machines: Vec<String>,
}

/// The ids of the group's recorded points (those with an index), oldest first.
pub async fn list_ids(store: &Store, group: &str) -> Result<Vec<u64>, CatalogueError> {
    crate::ids::validate_id("group", group).map_err(|detail| CatalogueError::Invalid {
        object: store.describe(&format!("groups/{group}/")),
        detail,
    })?;
    let dir = format!("groups/{group}/");
    let mut ids: Vec<u64> = store
        .list(&dir)
        .await?
        .into_iter()
        .filter_map(|(rel, _)| {
            let name = rel.strip_prefix(&dir)?.strip_suffix(".json")?;
            (name.len() == 16).then(|| u64::from_str_radix(name, 16).ok())?
        })
        .collect();
    ids.sort_unstable();
    Ok(ids)
}

fn invalid(store: &Store, object: &str, detail: impl Into<String>) -> CatalogueError {
    CatalogueError::Invalid {
        object: store.describe(object),
        detail: detail.into(),
    }
}

/// Reads the index of group point `id`; its machine ids are checked.
pub async fn load_index(store: &Store, group: &str, id: u64) -> Result<GroupIndex, CatalogueError> {
    let name = index_object(group, id);
    let bytes = crate::catalogue::get_required(store, &name).await?;
    let idx: GroupIndex =
        serde_json::from_slice(&bytes).map_err(|e| invalid(store, &name, e.to_string()))?;
    if idx.format != GROUP_FORMAT || idx.group != group || idx.id != id {
        return Err(invalid(
            store,
            &name,
            format!(
                "holds format {} point {} of group {:?} (this build reads format {GROUP_FORMAT})",
                idx.format, idx.id, idx.group
            ),
        ));
    }
    for m in &idx.machines {
        crate::ids::validate_id("machine", m).map_err(|d| invalid(store, &name, d))?;
    }
    Ok(idx)
}

/// Opens `machine`'s copy of group point `id` (authenticated with `key`;
/// `None`: unverified, for listings only) and checks that it names this
/// group, id and machine; `Ok(None)` when the copy does not exist.
pub async fn open_member(
    store: &Store,
    key: Option<&CatalogueKey>,
    machine: &str,
    group: &str,
    id: u64,
) -> Result<Option<GroupRecord>, CatalogueError> {
    let name = member_object(machine, group, id);
    let Some(bytes) = store.get(&name).await? else {
        return Ok(None);
    };
    let rec: GroupRecord = match key {
        Some(k) => open_record(k, store, &name, &bytes)?,
        None => open_record_unverified(store, &name, &bytes)?,
    };
    if rec.group != group || rec.id != id || rec.seq_of(machine).is_none() {
        return Err(invalid(
            store,
            &name,
            format!(
                "holds point {} of group {:?}, not naming {machine}",
                rec.id, rec.group
            ),
        ));
    }
    for m in &rec.members {
        crate::ids::validate_id("machine", &m.machine).map_err(|d| invalid(store, &name, d))?;
    }
    Ok(Some(rec))
}

/// Why a recorded group point cannot be used, or the record every member's
/// copy agrees on. `key_of` gives each machine's catalogue key (`None`:
/// unverified listing).
pub async fn check_point<'a>(
    store: &Store,
    group: &str,
    id: u64,
    key_of: impl Fn(&str) -> Option<&'a CatalogueKey>,
) -> Result<Result<GroupRecord, String>, CatalogueError> {
    let idx = load_index(store, group, id).await?;
    let Some(first) = idx.machines.first() else {
        return Ok(Err("its index names no machine".into()));
    };
    let Some(rec) = open_member(store, key_of(first), first, group, id).await? else {
        return Ok(Err(format!(
            "{} is missing",
            store.describe(&member_object(first, group, id))
        )));
    };
    let listed: Vec<&str> = rec.members.iter().map(|m| m.machine.as_str()).collect();
    let mut indexed: Vec<&str> = idx.machines.iter().map(String::as_str).collect();
    indexed.sort_unstable();
    if listed != indexed {
        return Ok(Err(format!(
            "its index names {} but the signed record names {}",
            indexed.join(", "),
            listed.join(", ")
        )));
    }
    for m in &rec.members[..] {
        match open_member(store, key_of(&m.machine), &m.machine, group, id).await? {
            None => {
                return Ok(Err(format!(
                    "{} is missing",
                    store.describe(&member_object(&m.machine, group, id))
                )))
            }
            Some(other) if other != rec => {
                return Ok(Err(format!(
                    "the copies of {} and {} disagree",
                    m.machine, first
                )))
            }
            Some(_) => {}
        }
    }
    Ok(Ok(rec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_members() {
        assert_eq!(
            member_object("a", "g", 255),
            "machines/a/groups/g/00000000000000ff.json"
        );
        assert_eq!(index_object("g", 255), "groups/g/00000000000000ff.json");
        let r = GroupRecord::new(
            "g",
            1,
            0,
            "l",
            GroupKind::Crash,
            vec![
                GroupMember {
                    machine: "b".into(),
                    seq: 2,
                    source: None,
                },
                GroupMember {
                    machine: "a".into(),
                    seq: 9,
                    source: None,
                },
            ],
        );
        assert_eq!(r.members[0].machine, "a");
        assert_eq!(r.seq_of("b"), Some(2));
        assert_eq!(r.seq_of("c"), None);
        let back: GroupRecord = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }

    /// A record written before app-consistent group points (no kind, no
    /// sources) reads as a crash point, and a crash point is still written
    /// without them; an app point keeps its kind and sources.
    #[test]
    fn old_records_read_as_crash_and_app_records_round_trip() {
        let old = r#"{"format":1,"group":"g","id":5,"time-ms":0,"time":"1970-01-01T00:00:00.000Z","label":"g:5","members":[{"machine":"a","seq":3},{"machine":"b","seq":4}]}"#;
        let r: GroupRecord = serde_json::from_str(old).unwrap();
        assert_eq!(r.kind, GroupKind::Crash);
        assert!(r.members.iter().all(|m| m.source.is_none()));
        assert_eq!(serde_json::to_string(&r).unwrap(), old);
        let mut app = r.clone();
        app.kind = GroupKind::App;
        app.members[0].source = Some(TagSource::Fsfreeze);
        app.members[1].source = Some(TagSource::Vss);
        let text = serde_json::to_string(&app).unwrap();
        assert!(
            text.contains(r#""kind":"app""#) && text.contains(r#""source":"vss""#),
            "{text}"
        );
        let back: GroupRecord = serde_json::from_str(&text).unwrap();
        assert_eq!(back, app);
    }
}
