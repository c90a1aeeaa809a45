//! The status document: one snapshot of the process server (health, cache,
//! fencing, groups, active alerts) and of every machine it holds (state and
//! reason, RPO, churn, cache use, upload backlog, recent points with their
//! suspect-churn marks, disks, owner). `lifeboat-ps status` (control socket),
//! `GET /status` (`http.rs`) and `/metrics` (`metrics.rs`) all come from
//! [`collect`], so they show the same data; the monitor's tick
//! ([`tick`]) judges health and alerts from it too.
//!
//! Machine states as the process server sees them (the agent's own view, e.g.
//! `bitmap`, is in `lifeboat-agent status`; the protocol does not carry it):
//!
//! ```text
//! fenced           another process server took the machine over
//! resync-required  the replica's block hashes are unknown (this server took the
//!                  stream from the store after losing its cache) and no resync
//!                  is under way: only a full checksum resync makes it whole
//! disconnected     no live session (reason: since when)
//! initial-sync     an `inconsistent` entry "initial sync" with no tag after it
//! resync           another open `inconsistent` entry (label as reason)
//! streaming        otherwise
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use lifeboat_common::catalogue::format_time_ms;
use lifeboat_common::churn;
use serde::{Deserialize, Serialize};

use crate::alerts::{Active, Alerts, Condition};
use crate::cache::{Cache, CacheHealth};
use crate::config::{AlertsConfig, HealthConfig};
use crate::health::{self, Health, Level};
use crate::monitor::{self, Monitor, PointSeen};
use crate::ownership::Ownership;

/// Recent points shown per machine.
pub const POINTS_SHOWN: usize = 5;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Status {
    pub ok: bool,
    pub server_id: String,
    pub address: String,
    /// RFC 3339, when this snapshot was taken.
    pub time: String,
    pub health: Health,
    pub cache: CacheHealth,
    /// Machines this server lost to another, and why.
    pub fenced: BTreeMap<String, String>,
    /// Each `[[group]]`'s last point and last failure (`groups.rs`).
    pub groups: serde_json::Value,
    pub machines: Vec<MachineStatus>,
    pub alerts: Vec<Active>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MachineStatus {
    pub machine: String,
    pub state: String,
    pub reason: Option<String>,
    /// The process server that uploads it: this one, unless fenced.
    pub owner: Option<String>,
    pub connected: bool,
    /// See `monitor.rs`.
    pub rpo_seconds: f64,
    pub rpo_alert_seconds: f64,
    /// Write bytes per second over the last minute, in MB (10^6 bytes).
    pub churn_mb_per_s: f64,
    pub durable: u64,
    pub uploaded: u64,
    pub backlog: Backlog,
    pub last_points: Vec<PointStatus>,
    /// The churn alarm is on: the newest point is suspect.
    pub suspect_churn: bool,
    /// The newest point before the first suspect one (`null`: none suspect,
    /// or none clean among the points this server saw).
    pub last_clean: Option<u64>,
    pub disks: Vec<DiskStatus>,
}

/// What waits in the cache for the object store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Backlog {
    /// Entries acknowledged, not yet stored (`durable - uploaded`).
    pub entries: u64,
    /// Their bytes in the cache (as sent; entries left by an earlier run
    /// of the server are not counted).
    pub bytes: u64,
    /// How long the oldest of them has waited.
    pub seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct PointStatus {
    pub seq: u64,
    pub kind: String,
    pub time: String,
    pub label: String,
    pub suspect: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DiskStatus {
    pub id: String,
    pub size: u64,
    pub state: String,
    pub churn_mb_per_s: f64,
}

/// What [`collect`] reads.
pub struct Hub {
    pub cache: Arc<Cache>,
    pub sessions: Arc<lifeboat_common::receiver::Sessions>,
    pub ownership: Arc<Ownership>,
    pub groups: Arc<crate::groups::Groups>,
    pub monitor: Arc<Monitor>,
    pub alerts: Arc<Alerts>,
    pub alerts_cfg: AlertsConfig,
    pub health_cfg: HealthConfig,
}

impl Hub {
    /// A snapshot now (the cache is read on a blocking thread).
    pub async fn snapshot(self: &Arc<Self>) -> anyhow::Result<Status> {
        let hub = self.clone();
        tokio::task::spawn_blocking(move || collect(&hub, lifeboat_common::now_ms())).await?
    }
}

/// The state and its reason (see the module header).
pub fn state_of(
    fenced: Option<&str>,
    hashes_unknown: bool,
    disconnected_since: Option<u64>,
    open_sync: Option<&str>,
) -> (String, Option<String>) {
    if let Some(why) = fenced {
        return ("fenced".into(), Some(why.into()));
    }
    if hashes_unknown && open_sync.is_none() {
        return (
            "resync-required".into(),
            Some("this process server took the stream from the store (its cache was lost): the replica's block hashes are unknown until a full checksum resync, which the agent starts when it connects (or `lifeboat-ps resync`)".into()),
        );
    }
    if let Some(t) = disconnected_since {
        return (
            "disconnected".into(),
            Some(format!("no session since {}", format_time_ms(t))),
        );
    }
    match open_sync {
        Some(l) if l == "initial sync" => ("initial-sync".into(), Some(l.into())),
        Some(l) => ("resync".into(), Some(l.into())),
        None => ("streaming".into(), None),
    }
}

fn mb(bytes_per_s: f64) -> f64 {
    (bytes_per_s / 1e6 * 1000.0).round() / 1000.0
}

/// One machine's part of the snapshot.
fn machine_status(
    src: &Hub,
    rec: &lifeboat_common::catalogue::MachineRecord,
    fenced: &BTreeMap<String, String>,
    now_ms: u64,
) -> anyhow::Result<MachineStatus> {
    let m = rec.machine.clone();
    let v = src.monitor.view(&m, now_ms);
    let durable = src.cache.durable(&m)?;
    let uploaded = src.cache.uploaded(&m)?;
    let hashes_unknown = src.cache.hashes_unknown(&m)?;
    let fenced_why = fenced.get(&m).map(String::as_str);
    let (state, reason) = state_of(
        fenced_why,
        hashes_unknown,
        v.disconnected_since,
        v.open_sync.as_ref().map(|(_, l)| l.as_str()),
    );
    // Entries an earlier run left in the cache count from this run's start.
    let backlog_s = if durable > uploaded {
        let since = v.oldest_unstored_ms.unwrap_or(src.monitor.started_ms());
        now_ms.saturating_sub(since) as f64 / 1000.0
    } else {
        0.0
    };
    let suspects = churn::suspects(&v.points.iter().map(|p| p.churn).collect::<Vec<_>>());
    let suspect_churn = suspects.last().copied().unwrap_or(false);
    let last_clean = suspects.iter().position(|s| *s).and_then(|first| {
        first
            .checked_sub(1)
            .and_then(|i| v.points.get(i))
            .map(|p| p.seq)
    });
    let point = |(p, s): (&PointSeen, &bool)| PointStatus {
        seq: p.seq,
        kind: p.kind.as_str().into(),
        time: format_time_ms(p.time_ms),
        label: p.label.clone(),
        suspect: *s,
    };
    let skip = v.points.len().saturating_sub(POINTS_SHOWN);
    let last_points = v
        .points
        .iter()
        .zip(suspects.iter())
        .skip(skip)
        .map(point)
        .collect();
    let disks = rec
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| DiskStatus {
            id: d.id.clone(),
            size: d.size,
            state: state.clone(),
            churn_mb_per_s: mb(v.churn_per_disk.get(&(i as u16)).copied().unwrap_or(0.0)),
        })
        .collect();
    Ok(MachineStatus {
        machine: m.clone(),
        state,
        reason,
        owner: fenced_why.is_none().then(|| src.ownership.me.id.clone()),
        connected: v.connected,
        rpo_seconds: monitor::rpo_ms(&v, now_ms) as f64 / 1000.0,
        rpo_alert_seconds: src.alerts_cfg.rpo_alert_of(&m).as_secs_f64(),
        churn_mb_per_s: mb(v.churn_per_disk.values().sum()),
        durable,
        uploaded,
        backlog: Backlog {
            entries: durable.saturating_sub(uploaded),
            bytes: v.cached_bytes,
            seconds: backlog_s,
        },
        last_points,
        suspect_churn,
        last_clean,
        disks,
    })
}

/// One snapshot (blocking: reads the cache).
pub fn collect(src: &Hub, now_ms: u64) -> anyhow::Result<Status> {
    let cache_health = src.cache.health();
    let live: Vec<String> = src.sessions.live().into_iter().map(|(m, _)| m).collect();
    src.monitor.sessions(&live, now_ms);
    let fenced = src.ownership.fenced_all();
    let mut machines = Vec::new();
    let mut backlog_max = Duration::ZERO;
    for rec in src.cache.machines()? {
        let m = machine_status(src, &rec, &fenced, now_ms)?;
        backlog_max = backlog_max.max(Duration::from_secs_f64(m.backlog.seconds));
        machines.push(m);
    }
    // Free of what this server could use: blocks reserved for root (or
    // beyond a quota) are neither free nor used here.
    let free = match (cache_health.free_bytes, cache_health.used_bytes) {
        (Some(f), Some(u)) if f + u > 0 => Some(f as f64 / (f + u) as f64),
        _ => None,
    };
    let mut health = health::judge(
        free,
        backlog_max,
        f64::from(src.health_cfg.backpressure_free) / 100.0,
        src.monitor.backpressure().is_some(),
    );
    // Decided here, so that what any status shows is what the sink applies.
    src.monitor.set_backpressure(health.backpressure.clone());
    if !cache_health.writable {
        health.level = Level::Critical;
        health.reasons.push(format!(
            "the cache refuses writes: {}",
            cache_health.error.as_deref().unwrap_or("unknown error")
        ));
    }
    Ok(Status {
        ok: true,
        server_id: src.ownership.me.id.clone(),
        address: src.ownership.me.address.clone(),
        time: format_time_ms(now_ms),
        health,
        cache: cache_health,
        fenced,
        groups: serde_json::to_value(src.groups.status()).unwrap_or_default(),
        machines,
        alerts: src.alerts.active(),
    })
}

/// The alert conditions a snapshot shows (`alerts.rs`).
pub fn conditions(st: &Status) -> Vec<Condition> {
    let d = |s: f64| humantime::format_duration(Duration::from_secs(s as u64)).to_string();
    let mut out = Vec::new();
    for m in &st.machines {
        if m.rpo_seconds > m.rpo_alert_seconds {
            out.push(Condition {
                machine: m.machine.clone(),
                kind: "rpo",
                message: format!(
                    "RPO of {} is {}, over its threshold {} ({})",
                    m.machine,
                    d(m.rpo_seconds),
                    d(m.rpo_alert_seconds),
                    m.reason.as_deref().unwrap_or(&m.state)
                ),
            });
        }
        if m.state == "resync-required" {
            out.push(Condition {
                machine: m.machine.clone(),
                kind: "resync-required",
                message: format!(
                    "{} needs a resync: {}",
                    m.machine,
                    m.reason.as_deref().unwrap_or("")
                ),
            });
        }
        if m.suspect_churn {
            out.push(Condition {
                machine: m.machine.clone(),
                kind: "encryption",
                message: format!(
                    "the writes of {} stopped compressing (encryption?): its newest points are suspect; last clean point: {}",
                    m.machine,
                    m.last_clean
                        .map(|s| format!("seq {s}"))
                        .unwrap_or_else(|| "none seen by this server".into())
                ),
            });
        }
    }
    if st.health.level != Level::Ok {
        let mut why = st.health.reasons.join("; ");
        if let Some(bp) = &st.health.backpressure {
            why.push_str(&format!("; backpressure: {bp}"));
        }
        out.push(Condition {
            machine: String::new(),
            kind: "health",
            message: format!("process server health {}: {why}", st.health.level.as_str()),
        });
    }
    out
}

/// How often health and alerts are judged.
pub const TICK: Duration = Duration::from_secs(1);

/// Every [`TICK`] until `cancel`: a snapshot (which also makes the
/// backpressure decision from its health, [`collect`]) and the alert events
/// (logged, and POSTed to the webhook).
pub async fn tick(
    hub: Arc<Hub>,
    webhook: Option<crate::alerts::Webhook>,
    cancel: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = cancel.cancelled() => return,
        }
        let st = match hub.snapshot().await {
            Ok(st) => st,
            Err(e) => {
                tracing::warn!("taking the status snapshot: {e:#}");
                continue;
            }
        };
        let now = lifeboat_common::now_ms();
        for m in &st.machines {
            hub.monitor
                .record_rpo(&m.machine, now / 1000, m.rpo_seconds);
        }
        for e in hub.alerts.update(&st.server_id, now, conditions(&st)) {
            crate::alerts::log(&e);
            if let Some(w) = &webhook {
                w.send(e);
            }
        }
    }
}

fn bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// What `lifeboat-ps status` prints without `--json`.
pub fn render_text(st: &Status) -> String {
    use std::fmt::Write;
    let d = |s: f64| humantime::format_duration(Duration::from_secs(s as u64)).to_string();
    let mut o = String::new();
    let _ = writeln!(
        o,
        "process server {} ({}) at {}",
        st.server_id, st.address, st.time
    );
    let free = match (st.cache.free_bytes, st.health.cache_free) {
        (Some(b), Some(f)) => format!("{:.0}% free ({})", f * 100.0, bytes(b)),
        _ => "free space unknown".into(),
    };
    let _ = writeln!(
        o,
        "health: {}{}",
        st.health.level.as_str(),
        if st.health.reasons.is_empty() {
            String::new()
        } else {
            format!(" ({})", st.health.reasons.join("; "))
        }
    );
    if let Some(bp) = &st.health.backpressure {
        let _ = writeln!(o, "backpressure: {bp}");
    }
    let _ = writeln!(
        o,
        "cache: {} {}, {}; upload backlog {}",
        st.cache.dir.display(),
        if st.cache.writable {
            "writable"
        } else {
            "NOT WRITABLE"
        },
        free,
        d(st.health.backlog_seconds)
    );
    if let Some(e) = &st.cache.error {
        let _ = writeln!(o, "  cache error: {e}");
    }
    for m in &st.machines {
        let _ = writeln!(
            o,
            "\nmachine {}: {}{}",
            m.machine,
            m.state,
            m.reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        );
        let _ = writeln!(
            o,
            "  RPO {} (alert over {}), churn {:.3} MB/s, owner {}",
            d(m.rpo_seconds),
            d(m.rpo_alert_seconds),
            m.churn_mb_per_s,
            m.owner
                .as_deref()
                .unwrap_or("another process server (fenced)")
        );
        let _ = writeln!(
            o,
            "  durable {} uploaded {}; backlog {} entries, {} in the cache, oldest {}",
            m.durable,
            m.uploaded,
            m.backlog.entries,
            bytes(m.backlog.bytes),
            d(m.backlog.seconds)
        );
        for disk in &m.disks {
            let _ = writeln!(
                o,
                "  disk {}: {}, {}, churn {:.3} MB/s",
                disk.id,
                bytes(disk.size),
                disk.state,
                disk.churn_mb_per_s
            );
        }
        if m.last_points.is_empty() {
            let _ = writeln!(o, "  no point stored since this server started");
        }
        for p in &m.last_points {
            let _ = writeln!(
                o,
                "  point {} {} {}{}{}",
                p.seq,
                p.kind,
                p.time,
                if p.label.is_empty() {
                    String::new()
                } else {
                    format!(" {:?}", p.label)
                },
                if p.suspect { " SUSPECT churn" } else { "" }
            );
        }
        if m.suspect_churn {
            let _ = writeln!(
                o,
                "  churn alarm: newest points suspect; last clean {}",
                m.last_clean
                    .map(|s| format!("seq {s}"))
                    .unwrap_or_else(|| "unknown".into())
            );
        }
    }
    for (m, why) in &st.fenced {
        let _ = writeln!(o, "\nfenced {m}: {why}");
    }
    if st.alerts.is_empty() {
        let _ = writeln!(o, "\nalerts: none");
    } else {
        let _ = writeln!(o, "\nalerts:");
        for a in &st.alerts {
            let _ = writeln!(o, "  {} since {}: {}", a.kind, a.since, a.message);
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(rpo: f64, state: &str, suspect: bool) -> MachineStatus {
        MachineStatus {
            machine: "m".into(),
            state: state.into(),
            reason: None,
            owner: Some("ps".into()),
            connected: true,
            rpo_seconds: rpo,
            rpo_alert_seconds: 5.0,
            churn_mb_per_s: 0.0,
            durable: 0,
            uploaded: 0,
            backlog: Backlog {
                entries: 0,
                bytes: 0,
                seconds: 0.0,
            },
            last_points: Vec::new(),
            suspect_churn: suspect,
            last_clean: None,
            disks: Vec::new(),
        }
    }

    fn status(machines: Vec<MachineStatus>, free: f64) -> Status {
        Status {
            ok: true,
            server_id: "ps".into(),
            address: "a".into(),
            time: String::new(),
            health: health::judge(Some(free), Duration::ZERO, 0.2, false),
            cache: CacheHealth {
                dir: "/c".into(),
                writable: true,
                error: None,
                since: None,
                free_bytes: None,
                used_bytes: None,
            },
            fenced: BTreeMap::new(),
            groups: serde_json::Value::Null,
            machines,
            alerts: Vec::new(),
        }
    }

    #[test]
    fn conditions_of_a_snapshot() {
        let kinds = |st: &Status| -> Vec<&'static str> {
            conditions(st).into_iter().map(|c| c.kind).collect()
        };
        assert!(kinds(&status(vec![machine(5.0, "streaming", false)], 0.9)).is_empty());
        assert_eq!(
            kinds(&status(vec![machine(6.0, "streaming", false)], 0.9)),
            vec!["rpo"]
        );
        assert_eq!(
            kinds(&status(vec![machine(0.0, "resync-required", true)], 0.9)),
            vec!["resync-required", "encryption"]
        );
        let st = status(vec![], 0.1);
        let c = conditions(&st);
        assert_eq!(c[0].kind, "health");
        assert!(c[0].message.contains("backpressure"), "{}", c[0].message);
        // The text form names what matters.
        let text = render_text(&status(vec![machine(6.0, "streaming", false)], 0.1));
        assert!(text.contains("health: critical"), "{text}");
        assert!(
            text.contains("backpressure: cache free 10% < 20%"),
            "{text}"
        );
        assert!(text.contains("machine m: streaming"), "{text}");
    }

    #[test]
    fn states_in_order_of_precedence() {
        assert_eq!(state_of(Some("x"), true, Some(1), None).0, "fenced");
        assert_eq!(state_of(None, true, Some(1), None).0, "resync-required");
        assert_eq!(
            state_of(None, true, None, Some("checksum resync")).0,
            "resync"
        );
        assert_eq!(state_of(None, false, Some(1), None).0, "disconnected");
        assert_eq!(
            state_of(None, false, None, Some("initial sync")).0,
            "initial-sync"
        );
        assert_eq!(
            state_of(None, false, None, None),
            ("streaming".into(), None)
        );
    }
}
