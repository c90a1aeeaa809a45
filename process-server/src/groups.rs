//! Consistency-group points: the coordinator of the two-phase group tag.
//!
//! Groups come from ps.toml (`[[group]] name, machines, every, hold-timeout,
//! app-interval, quiesce-timeout`; see `config.rs`). One attempt, `id` = its
//! start in ms (made unique):
//!
//! ```text
//! 1. open a group link to every member's live session (refused by name:
//!    no session, an agent without protocol 5, a member busy elsewhere)
//! 1a. app-consistent points only: group-quiesce to all → every agent runs
//!    its own [app] quiescer (pre-freeze scripts, freeze); all must answer
//!    group-quiesced ok within `quiesce-timeout` (the agents bound their
//!    steps by it too, so a failure names the member and the step)
//! 2. group-prepare to all → every agent holds new writes and drains
//! 3. all group-prepared ok → group-commit to all → each places its tag
//!    under its hold (an `app` tag with its source where it quiesced) and
//!    releases, then thaws; group-committed carries the tag's seq
//! 4. group-release to all (a no-op where the commit released already;
//!    otherwise it ends the hold, then thaws)
//! 5. record: each member's signed copy, then the index (`common/src/group.rs`)
//! ```
//!
//! Freeze before hold, thaw after the hold's release (the agent keeps that
//! order, see `agent/src/grouppoint.rs`): a freeze flushes dirty pages, which
//! are writes that need the hold's gate. Step 1a has its own bound, so the
//! write hold is no longer than a crash point's. Steps 2–3 must end within
//! the group's `hold-timeout`; any failure or
//! overrun (1a's included) sends group-release to every member and records nothing, so no
//! group point exists (a member that already placed its tag keeps a `group`
//! point of its own that no group point names). The agents bound their hold
//! by the same time on their own, so a coordinator that vanishes never holds
//! writes longer. Consistency: every member's writes are held at one moment
//! (all prepared before any commit), so each member's tag cuts its stream at
//! that moment: nothing a member wrote after the cut can precede a tag.
//!
//! Schedule: each group with a non-zero `every` gets a crash-consistent point
//! that often, and with an `app-interval` an app-consistent one that often;
//! `lifeboat-ps group-tag [--app]` takes one on demand (control socket). One
//! attempt per group at a time. The last point and the last failure of each
//! group are in `lifeboat-ps status` (`groups`).

use lifeboat_common::TrackHere;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use lifeboat_common::group::{self, GroupIndex, GroupKind, GroupMember, GroupRecord, GROUP_FORMAT};
use lifeboat_common::protocol::{Frame, TagSource};
use lifeboat_common::receiver::{GroupLink, Sessions};
use lifeboat_common::seal::Key;
use lifeboat_common::store::Store;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::GroupConfig;

/// Attempts to record a group point's objects before giving up.
const RECORD_ATTEMPTS: u32 = 3;
/// Time over `quiesce-timeout` for the members' answers to arrive (the
/// agents give up at the bound itself and say which step overran).
const QUIESCE_REPLY_SLACK: Duration = Duration::from_secs(2);

/// What `lifeboat-ps status` shows of one group.
#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct GroupStatus {
    pub last_point: Option<PointSummary>,
    pub last_failure: Option<FailureSummary>,
}

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PointSummary {
    pub id: u64,
    pub kind: GroupKind,
    pub time: String,
}

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct FailureSummary {
    pub kind: GroupKind,
    pub time: String,
    pub error: String,
}

pub struct Groups {
    groups: Vec<GroupConfig>,
    sessions: Arc<Sessions>,
    store: Store,
    kek: Key,
    last_id: Mutex<u64>,
    busy: Mutex<HashSet<String>>,
    status: Mutex<HashMap<String, GroupStatus>>,
}

/// Marks a group busy while an attempt runs.
struct Busy<'a>(&'a Groups, String);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0
            .busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.1);
    }
}

impl Groups {
    pub fn new(
        groups: Vec<GroupConfig>,
        sessions: Arc<Sessions>,
        store: Store,
        kek: Key,
    ) -> Groups {
        Groups {
            groups,
            sessions,
            store,
            kek,
            last_id: Mutex::new(0),
            busy: Mutex::new(HashSet::new()),
            status: Mutex::new(HashMap::new()),
        }
    }

    /// Each configured group's last point and last failure.
    pub fn status(&self) -> HashMap<String, GroupStatus> {
        let st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        self.groups
            .iter()
            .map(|g| (g.name.clone(), st.get(&g.name).cloned().unwrap_or_default()))
            .collect()
    }

    fn note(&self, name: &str, kind: GroupKind, r: &Result<GroupRecord, String>) {
        let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        let s = st.entry(name.to_string()).or_default();
        match r {
            Ok(rec) => {
                s.last_point = Some(PointSummary {
                    id: rec.id,
                    kind,
                    time: rec.time.clone(),
                })
            }
            Err(e) => {
                s.last_failure = Some(FailureSummary {
                    kind,
                    time: lifeboat_common::catalogue::format_time_ms(lifeboat_common::now_ms()),
                    error: e.clone(),
                })
            }
        }
    }

    fn next_id(&self) -> u64 {
        let mut last = self.last_id.lock().unwrap_or_else(|p| p.into_inner());
        *last = lifeboat_common::now_ms().max(*last + 1);
        *last
    }

    /// Takes one group point of `name` of `kind`; the error says why none
    /// was recorded (naming the member and the step).
    pub async fn take(
        &self,
        name: &str,
        label: Option<&str>,
        kind: GroupKind,
    ) -> Result<GroupRecord, String> {
        let r = self.take_inner(name, label, kind).await;
        self.note(name, kind, &r);
        r
    }

    async fn take_inner(
        &self,
        name: &str,
        label: Option<&str>,
        kind: GroupKind,
    ) -> Result<GroupRecord, String> {
        let Some(cfg) = self.groups.iter().find(|g| g.name == name) else {
            let known: Vec<&str> = self.groups.iter().map(|g| g.name.as_str()).collect();
            return Err(format!(
                "no group {name:?} in this process server's ps.toml (groups: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ));
        };
        if !self
            .busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string())
        {
            return Err(format!("a group point of {name} is being taken already"));
        }
        let _busy = Busy(self, name.to_string());
        let id = self.next_id();
        let label = match label {
            Some(l) if !l.is_empty() => format!("{name}:{id} {l}"),
            _ => format!("{name}:{id}"),
        };
        let record = self.attempt(cfg, id, &label, kind).await.map_err(|e| {
            format!(
                "{} group point {id} of {name} not taken: {e}; no group point was recorded",
                kind.as_str()
            )
        })?;
        self.record(&record)
            .await
            .map_err(|e| format!("group point {id} of {name} not recorded: {e:#}"))?;
        info!(
            group = name,
            id,
            "{} group point recorded: {}",
            kind.as_str(),
            members_str(&record.members)
        );
        Ok(record)
    }

    /// Steps 1–4 of the module header.
    async fn attempt(
        &self,
        cfg: &GroupConfig,
        id: u64,
        label: &str,
        kind: GroupKind,
    ) -> Result<GroupRecord, String> {
        let mut links = Vec::new();
        let mut refused = Vec::new();
        for m in &cfg.machines {
            match self.sessions.group_link(m) {
                Ok(l) => links.push(l),
                Err(e) => refused.push(e),
            }
        }
        if !refused.is_empty() {
            return Err(refused.join("; "));
        }
        let hold_ms = millis(cfg.hold_timeout);
        let result = async {
            let mut sources = vec![None; links.len()];
            if kind == GroupKind::App {
                sources = self.quiesce(cfg, &mut links, id).await?;
            }
            // The hold's bound starts once every member is quiesced.
            let deadline = Instant::now() + cfg.hold_timeout;
            let hold = (cfg.hold_timeout, "hold-timeout");
            send_all(&links, |_| Frame::GroupPrepare {
                id,
                hold_ms,
                group: cfg.name.clone(),
            })?;
            let replies = collect(&mut links, id, deadline, hold, "group-prepare").await;
            let mut failed = Vec::new();
            for (link, r) in links.iter().zip(replies) {
                match r {
                    Ok(Frame::GroupPrepared { error, .. }) if error.is_empty() => {}
                    Ok(Frame::GroupPrepared { error, .. }) => failed.push(format!(
                        "{} cannot hold its writes: {error}",
                        link.machine()
                    )),
                    Ok(other) => failed.push(format!("{} answered {other:?}", link.machine())),
                    Err(e) => failed.push(e),
                }
            }
            if !failed.is_empty() {
                return Err(failed.join("; "));
            }
            send_all(&links, |_| Frame::GroupCommit {
                id,
                label: label.to_string(),
            })?;
            let replies = collect(&mut links, id, deadline, hold, "group-commit").await;
            let mut members = Vec::new();
            for ((link, r), source) in links.iter().zip(replies).zip(sources) {
                match r {
                    Ok(Frame::GroupCommitted { seq, error, .. }) if error.is_empty() && seq > 0 => {
                        members.push(GroupMember {
                            machine: link.machine().to_string(),
                            seq,
                            source,
                        })
                    }
                    Ok(Frame::GroupCommitted { error, .. }) => {
                        failed.push(format!("{} placed no tag: {error}", link.machine()))
                    }
                    Ok(other) => failed.push(format!("{} answered {other:?}", link.machine())),
                    Err(e) => failed.push(e),
                }
            }
            if !failed.is_empty() {
                return Err(failed.join("; "));
            }
            Ok(GroupRecord::new(
                &cfg.name,
                id,
                lifeboat_common::now_ms(),
                label,
                kind,
                members,
            ))
        }
        .await;
        // Every member is released whatever happened (after a commit this
        // changes nothing; after a failure it ends the holds at once, then
        // thaws what was quiesced).
        for l in &links {
            let _ = l.send(Frame::GroupRelease { id });
        }
        if let Err(e) = &result {
            warn!(
                group = cfg.name,
                id,
                "{} group point abandoned, every member released: {e}",
                kind.as_str()
            );
        }
        result
    }

    /// Step 1a: every member quiesced, within `quiesce-timeout`; each one's
    /// source, in the links' order.
    async fn quiesce(
        &self,
        cfg: &GroupConfig,
        links: &mut [GroupLink],
        id: u64,
    ) -> Result<Vec<Option<TagSource>>, String> {
        send_all(links, |_| Frame::GroupQuiesce {
            id,
            quiesce_ms: millis(cfg.quiesce_timeout),
            hold_ms: millis(cfg.hold_timeout),
            group: cfg.name.clone(),
        })?;
        let deadline = Instant::now() + cfg.quiesce_timeout + QUIESCE_REPLY_SLACK;
        let bound = (cfg.quiesce_timeout, "quiesce-timeout");
        let replies = collect(links, id, deadline, bound, "group-quiesce").await;
        let mut sources = Vec::new();
        let mut failed = Vec::new();
        for (link, r) in links.iter().zip(replies) {
            match r {
                Ok(Frame::GroupQuiesced {
                    source: Some(s),
                    error,
                    ..
                }) if error.is_empty() => sources.push(Some(s)),
                Ok(Frame::GroupQuiesced { error, .. }) => {
                    failed.push(format!("{} could not quiesce: {error}", link.machine()))
                }
                Ok(other) => failed.push(format!("{} answered {other:?}", link.machine())),
                Err(e) => failed.push(e),
            }
        }
        if failed.is_empty() {
            Ok(sources)
        } else {
            Err(failed.join("; "))
        }
    }

    /// Step 5: each member's signed copy, then the index.
    async fn record(&self, rec: &GroupRecord) -> anyhow::Result<()> {
        for m in &rec.members {
            let keys = crate::uploader::machine_keys(&self.store, &self.kek, &m.machine).await?;
            let name = group::member_object(&m.machine, &rec.group, rec.id);
            let body = lifeboat_common::catalogue::sign_record(&keys.catalogue, &name, rec);
            self.create(&name, body).await?;
        }
        let idx = GroupIndex {
            format: GROUP_FORMAT,
            group: rec.group.clone(),
            id: rec.id,
            machines: rec.members.iter().map(|m| m.machine.clone()).collect(),
        };
        let name = group::index_object(&rec.group, rec.id);
        self.create(&name, serde_json::to_vec_pretty(&idx)?).await
    }

    async fn create(&self, name: &str, body: Vec<u8>) -> anyhow::Result<()> {
        let body = Bytes::from(body);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let r = self.store.create(name, body.clone(), |_| false).await;
            match r {
                Ok(()) => return Ok(()),
                Err(e) if e.is_transient() && attempt < RECORD_ATTEMPTS => {
                    warn!("recording {}: {e}; trying again", self.store.describe(name));
                    tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Takes each scheduled group's points until `cancel`.
    pub async fn run_schedule(self: Arc<Self>, cancel: CancellationToken) {
        let tasks = tokio_util::task::TaskTracker::new();
        // Each group's crash schedule (`every`, 0: none) and app schedule.
        let schedules = self.groups.iter().flat_map(|g| {
            let crash = (!g.every.is_zero()).then_some((g, g.every, GroupKind::Crash));
            let app = g.app_interval.map(|every| (g, every, GroupKind::App));
            crash.into_iter().chain(app)
        });
        for (g, every, kind) in schedules {
            let (me, c, name) = (self.clone(), cancel.clone(), g.name.clone());
            tasks.spawn_here(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(every) => {}
                        _ = c.cancelled() => return,
                    }
                    if let Err(e) = me.take(&name, Some("scheduled"), kind).await {
                        warn!(group = name, "scheduled {} group point: {e}", kind.as_str());
                    }
                }
            });
        }
        tasks.close();
        tasks.wait().await;
    }
}

fn members_str(members: &[GroupMember]) -> String {
    members
        .iter()
        .map(|m| format!("{} seq {}", m.machine, m.seq))
        .collect::<Vec<_>>()
        .join(", ")
}

fn millis(d: Duration) -> u32 {
    d.as_millis().min(u32::MAX as u128) as u32
}

fn send_all(links: &[GroupLink], frame: impl Fn(&GroupLink) -> Frame) -> Result<(), String> {
    let errors: Vec<String> = links
        .iter()
        .filter_map(|l| l.send(frame(l)).err())
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// Every link's reply to `id` (other ids are stale replies: skipped), each
/// by `deadline`; `bound` is the configured bound it comes from, and its name.
async fn collect(
    links: &mut [GroupLink],
    id: u64,
    deadline: Instant,
    (bound, bound_name): (Duration, &str),
    step: &str,
) -> Vec<Result<Frame, String>> {
    let waits = links.iter_mut().map(|l| async move {
        loop {
            match tokio::time::timeout_at(deadline, l.recv()).await {
                Err(_) => {
                    return Err(format!(
                        "{} did not answer the {step} within the {bound_name} ({bound:?}; is its agent stopped or its link slow?)",
                        l.machine()
                    ))
                }
                Ok(None) => return Err(format!("{}: its session ended", l.machine())),
                Ok(Some(f)) => {
                    let of = match &f {
                        Frame::GroupPrepared { id, .. }
                        | Frame::GroupCommitted { id, .. }
                        | Frame::GroupQuiesced { id, .. } => *id,
                        _ => 0,
                    };
                    if of == id {
                        return Ok(f);
                    }
                }
            }
        }
    });
    futures::future::join_all(waits).await
}
