//! `/metrics`: the status snapshot (`status.rs`) in the Prometheus text
//! exposition format (version 0.0.4). Every family has HELP and TYPE lines;
//! label values are escaped. Names:
//!
//! ```text
//! lifeboat_health_level                    gauge 0 ok, 1 warning, 2 critical
//! lifeboat_backpressure                    gauge 1 while new entries are refused
//! lifeboat_cache_writable                  gauge
//! lifeboat_cache_free_bytes / _used_bytes  gauge
//! lifeboat_cache_free_ratio                gauge 0..1: free / (free + used)
//! lifeboat_upload_backlog_seconds          gauge the oldest unstored write, all machines
//! lifeboat_machine_rpo_seconds{machine}    gauge
//! lifeboat_machine_rpo_alert_seconds{machine}
//! lifeboat_machine_state{machine,state}    gauge 1 for the machine's state
//! lifeboat_machine_connected{machine}
//! lifeboat_machine_churn_bytes_per_second{machine}
//! lifeboat_disk_churn_bytes_per_second{machine,disk}
//! lifeboat_machine_durable_seq / _uploaded_seq{machine}
//! lifeboat_machine_backlog_entries / _backlog_bytes / _backlog_seconds{machine}
//! lifeboat_machine_last_point_timestamp_seconds{machine}
//! lifeboat_machine_suspect_churn{machine}
//! lifeboat_machine_fenced{machine}
//! lifeboat_alert_active{machine,kind}      gauge 1 per active alert
//! lifeboat_alert_events_total{kind}        counter alerts raised since start
//! lifeboat_webhook_posts_total{result}     counter "ok" / "failed"
//! ```

use std::fmt::Write;
use std::sync::atomic::Ordering;

use crate::alerts::Alerts;
use crate::status::Status;

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    /// One gauge with one sample per machine.
    fn per_machine(
        &mut self,
        st: &Status,
        name: &str,
        help: &str,
        f: impl Fn(&crate::status::MachineStatus) -> f64,
    ) {
        self.family(name, "gauge", help);
        for m in &st.machines {
            self.sample(name, &[("machine", &m.machine)], f(m));
        }
    }
}

const STATES: [&str; 6] = [
    "streaming",
    "initial-sync",
    "resync",
    "disconnected",
    "resync-required",
    "fenced",
];

pub fn render(st: &Status, alerts: &Alerts) -> String {
    let mut o = Out(String::new());
    let b = |x: bool| if x { 1.0 } else { 0.0 };
    o.family(
        "lifeboat_health_level",
        "gauge",
        "Process-server health: 0 ok, 1 warning, 2 critical.",
    );
    o.sample("lifeboat_health_level", &[], st.health.level as u8 as f64);
    o.family(
        "lifeboat_backpressure",
        "gauge",
        "1 while the cache refuses agents' new entries (cache free below 20%).",
    );
    o.sample(
        "lifeboat_backpressure",
        &[],
        b(st.health.backpressure.is_some()),
    );
    o.family(
        "lifeboat_cache_writable",
        "gauge",
        "1 when the RocksDB cache takes writes.",
    );
    o.sample("lifeboat_cache_writable", &[], b(st.cache.writable));
    if let (Some(free), Some(used)) = (st.cache.free_bytes, st.cache.used_bytes) {
        o.family(
            "lifeboat_cache_free_bytes",
            "gauge",
            "Free bytes of the cache filesystem.",
        );
        o.sample("lifeboat_cache_free_bytes", &[], free as f64);
        o.family(
            "lifeboat_cache_used_bytes",
            "gauge",
            "Used bytes of the cache filesystem.",
        );
        o.sample("lifeboat_cache_used_bytes", &[], used as f64);
    }
    if let Some(f) = st.health.cache_free {
        o.family(
            "lifeboat_cache_free_ratio",
            "gauge",
            "Free fraction of the cache filesystem.",
        );
        o.sample("lifeboat_cache_free_ratio", &[], f);
    }
    o.family(
        "lifeboat_upload_backlog_seconds",
        "gauge",
        "Age of the oldest write not yet in the object store, over all machines.",
    );
    o.sample(
        "lifeboat_upload_backlog_seconds",
        &[],
        st.health.backlog_seconds,
    );

    o.per_machine(st, "lifeboat_machine_rpo_seconds", "Now minus the acknowledgement time of the oldest write not yet in the object store (or the end of the last session).", |m| m.rpo_seconds);
    o.per_machine(
        st,
        "lifeboat_machine_rpo_alert_seconds",
        "The RPO alert threshold of the machine.",
        |m| m.rpo_alert_seconds,
    );
    o.family(
        "lifeboat_machine_state",
        "gauge",
        "1 for the machine's replication state as the process server sees it.",
    );
    for m in &st.machines {
        for s in STATES {
            o.sample(
                "lifeboat_machine_state",
                &[("machine", &m.machine), ("state", s)],
                b(m.state == s),
            );
        }
    }
    o.per_machine(
        st,
        "lifeboat_machine_connected",
        "1 while the machine's agent has a live session.",
        |m| b(m.connected),
    );
    o.per_machine(
        st,
        "lifeboat_machine_churn_bytes_per_second",
        "Write bytes per second over the last minute.",
        |m| m.churn_mb_per_s * 1e6,
    );
    o.family(
        "lifeboat_disk_churn_bytes_per_second",
        "gauge",
        "Write bytes per second over the last minute, per disk.",
    );
    for m in &st.machines {
        for d in &m.disks {
            o.sample(
                "lifeboat_disk_churn_bytes_per_second",
                &[("machine", &m.machine), ("disk", &d.id)],
                d.churn_mb_per_s * 1e6,
            );
        }
    }
    o.per_machine(
        st,
        "lifeboat_machine_durable_seq",
        "The last seq durable in the cache (acknowledged).",
        |m| m.durable as f64,
    );
    o.per_machine(
        st,
        "lifeboat_machine_uploaded_seq",
        "The last seq stored in the object store.",
        |m| m.uploaded as f64,
    );
    o.per_machine(
        st,
        "lifeboat_machine_backlog_entries",
        "Entries acknowledged and not yet stored.",
        |m| m.backlog.entries as f64,
    );
    o.per_machine(
        st,
        "lifeboat_machine_backlog_bytes",
        "Bytes of those entries in the cache.",
        |m| m.backlog.bytes as f64,
    );
    o.per_machine(
        st,
        "lifeboat_machine_backlog_seconds",
        "Age of the oldest of those entries.",
        |m| m.backlog.seconds,
    );
    o.family(
        "lifeboat_machine_last_point_timestamp_seconds",
        "gauge",
        "Time of the newest stored recovery point (Unix seconds).",
    );
    for m in &st.machines {
        if let Some(p) = m.last_points.last() {
            if let Ok(t) = chrono::DateTime::parse_from_rfc3339(&p.time) {
                o.sample(
                    "lifeboat_machine_last_point_timestamp_seconds",
                    &[("machine", &m.machine)],
                    t.timestamp_millis() as f64 / 1000.0,
                );
            }
        }
    }
    o.per_machine(
        st,
        "lifeboat_machine_suspect_churn",
        "1 while the churn (encryption) alarm is on.",
        |m| b(m.suspect_churn),
    );
    o.per_machine(
        st,
        "lifeboat_machine_fenced",
        "1 when another process server took the machine over.",
        |m| b(m.state == "fenced"),
    );

    o.family(
        "lifeboat_alert_active",
        "gauge",
        "1 per active alert (machine empty: the process server itself).",
    );
    for a in &st.alerts {
        o.sample(
            "lifeboat_alert_active",
            &[("machine", &a.machine), ("kind", &a.kind)],
            1.0,
        );
    }
    o.family(
        "lifeboat_alert_events_total",
        "counter",
        "Alerts raised since the server started.",
    );
    for (kind, n) in alerts.raised() {
        o.sample("lifeboat_alert_events_total", &[("kind", &kind)], n as f64);
    }
    o.family(
        "lifeboat_webhook_posts_total",
        "counter",
        "Webhook POSTs since the server started, by result.",
    );
    o.sample(
        "lifeboat_webhook_posts_total",
        &[("result", "ok")],
        alerts.webhook_sent.load(Ordering::Relaxed) as f64,
    );
    o.sample(
        "lifeboat_webhook_posts_total",
        &[("result", "failed")],
        alerts.webhook_failures.load(Ordering::Relaxed) as f64,
    );
    o.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
