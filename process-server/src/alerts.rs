//! Alerts: conditions the monitor finds on every tick, turned into events
//! when they start and once when they clear (never on every tick).
//!
//! Kinds: `rpo` (a machine's RPO above its `rpo-alert`), `resync-required`
//! (a machine whose replica can only be trusted again after a full checksum
//! resync), `encryption` (the churn alarm: the newest points' writes stopped
//! compressing, see `common/src/churn.rs`), `health` (the process server's
//! health is warning or critical, `health.rs`; machine empty).
//!
//! An event is a log line (WARN when raised, INFO when cleared), the metric
//! `lifeboat_alert_active{machine,kind}` (`metrics.rs`) and, when
//! `[alerts] webhook` is set, a JSON POST:
//!
//! ```text
//! {"event":"raised"|"cleared","kind":"rpo","machine":"web-1","server":"<id>",
//!  "time":"<RFC 3339>","since":"<RFC 3339>","message":"RPO 12s is over its threshold 5s"}
//! ```
//!
//! Webhooks go through a bounded queue ([`WEBHOOK_QUEUE`]) to one sender
//! task, in order, each bounded by `webhook-timeout`; a failed POST is logged
//! with the URL and the error and not retried (the next event is sent as
//! usual); a full queue drops the event with a log line. Replication never
//! waits for a webhook.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Webhook events waiting to be sent.
pub const WEBHOOK_QUEUE: usize = 256;

/// One condition found on a tick: (machine, kind) and what it says.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Condition {
    pub machine: String,
    pub kind: &'static str,
    pub message: String,
}

/// An alert that is active now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Active {
    pub machine: String,
    pub kind: String,
    /// RFC 3339.
    pub since: String,
    pub message: String,
}

/// What a webhook receives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Event {
    pub event: String,
    pub kind: String,
    pub machine: String,
    pub server: String,
    pub time: String,
    pub since: String,
    pub message: String,
}

/// The active alerts and the counters metrics show.
#[derive(Default)]
pub struct Alerts {
    active: Mutex<BTreeMap<(String, String), Active>>,
    /// Events raised, per kind.
    raised: Mutex<BTreeMap<String, u64>>,
    pub webhook_failures: AtomicU64,
    pub webhook_sent: AtomicU64,
}

impl Alerts {
    /// Compares this tick's conditions with the active alerts: returns the
    /// events (raised, then cleared) and updates the set. A condition whose
    /// message changes (the RPO grows) stays one alert.
    pub fn update(&self, server: &str, now_ms: u64, found: Vec<Condition>) -> Vec<Event> {
        let now = lifeboat_common::catalogue::format_time_ms(now_ms);
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        let mut events = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for c in found {
            let key = (c.machine.clone(), c.kind.to_string());
            seen.insert(key.clone());
            match active.get_mut(&key) {
                Some(a) => a.message = c.message,
                None => {
                    events.push(Event {
                        event: "raised".into(),
                        kind: c.kind.into(),
                        machine: c.machine.clone(),
                        server: server.into(),
                        time: now.clone(),
                        since: now.clone(),
                        message: c.message.clone(),
                    });
                    *self
                        .raised
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(c.kind.to_string())
                        .or_default() += 1;
                    active.insert(
                        key,
                        Active {
                            machine: c.machine,
                            kind: c.kind.into(),
                            since: now.clone(),
                            message: c.message,
                        },
                    );
                }
            }
        }
        let gone: Vec<_> = active
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        for k in gone {
            let a = active.remove(&k).expect("listed");
            events.push(Event {
                event: "cleared".into(),
                kind: a.kind,
                machine: a.machine,
                server: server.into(),
                time: now.clone(),
                since: a.since,
                message: a.message,
            });
        }
        events
    }

    pub fn active(&self) -> Vec<Active> {
        let a = self.active.lock().unwrap_or_else(|p| p.into_inner());
        a.values().cloned().collect()
    }

    /// Events raised since the start, per kind.
    pub fn raised(&self) -> BTreeMap<String, u64> {
        self.raised
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Logs an event (WARN raised, INFO cleared).
pub fn log(e: &Event) {
    let machine = e.machine.as_str();
    if e.event == "raised" {
        warn!(machine, kind = %e.kind, "ALERT raised: {}", e.message);
    } else {
        info!(machine, kind = %e.kind, since = %e.since, "ALERT cleared: {}", e.message);
    }
}

/// Sends events to the webhook, one at a time, until `cancel`.
pub struct Webhook {
    tx: mpsc::Sender<Event>,
}

impl Webhook {
    pub fn start(
        url: String,
        timeout: Duration,
        alerts: Arc<Alerts>,
        cancel: CancellationToken,
    ) -> anyhow::Result<Webhook> {
        lifeboat_common::tls::install_crypto_provider();
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| anyhow::anyhow!("building the webhook client for {url}: {e}"))?;
        let (tx, mut rx) = mpsc::channel::<Event>(WEBHOOK_QUEUE);
        lifeboat_common::spawn(async move {
            loop {
                let e = tokio::select! {
                    e = rx.recv() => match e { Some(e) => e, None => break },
                    _ = cancel.cancelled() => break,
                };
                let body = match serde_json::to_vec(&e) {
                    Ok(b) => b,
                    Err(err) => {
                        warn!("encoding a webhook event: {err}");
                        continue;
                    }
                };
                let r = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .and_then(|r| r.error_for_status());
                match r {
                    Ok(_) => {
                        alerts.webhook_sent.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(err) => {
                        alerts.webhook_failures.fetch_add(1, Ordering::Relaxed);
                        let of = if e.machine.is_empty() {
                            String::new()
                        } else {
                            format!(" of {}", e.machine)
                        };
                        warn!(
                            "webhook POST to {url} failed ({} alert {}{of}): {err}; not retried, the next event is sent as usual",
                            e.kind, e.event
                        );
                    }
                }
            }
        });
        Ok(Webhook { tx })
    }

    /// Queues an event; never waits.
    pub fn send(&self, e: Event) {
        if let Err(err) = self.tx.try_send(e) {
            warn!("webhook queue full or stopped; event dropped: {err}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(machine: &str, kind: &'static str, message: &str) -> Condition {
        Condition {
            machine: machine.into(),
            kind,
            message: message.into(),
        }
    }

    #[test]
    fn an_event_when_a_condition_starts_and_once_when_it_clears() {
        let a = Alerts::default();
        assert!(a.update("ps", 0, vec![]).is_empty());
        let ev = a.update("ps", 1_000, vec![c("m", "rpo", "RPO 6s")]);
        assert_eq!(ev.len(), 1);
        assert_eq!(
            (ev[0].event.as_str(), ev[0].kind.as_str()),
            ("raised", "rpo")
        );
        // Still on: no event, the message follows.
        assert!(a
            .update("ps", 2_000, vec![c("m", "rpo", "RPO 7s")])
            .is_empty());
        assert_eq!(a.active()[0].message, "RPO 7s");
        let ev = a.update("ps", 3_000, vec![c("m", "encryption", "suspect")]);
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[0].event, "raised");
        assert_eq!(
            (ev[1].event.as_str(), ev[1].kind.as_str()),
            ("cleared", "rpo")
        );
        assert_eq!(
            ev[1].since,
            lifeboat_common::catalogue::format_time_ms(1_000)
        );
        assert!(a
            .update("ps", 4_000, vec![c("m", "encryption", "x")])
            .is_empty());
        assert_eq!(a.raised()["rpo"], 1);
    }
}
