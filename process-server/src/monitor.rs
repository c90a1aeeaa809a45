//! What the process server knows of each machine's replication as it goes,
//! in memory, for status, metrics and alerts: when each appended batch was
//! acknowledged, how far the uploader got, the write churn of the last
//! minute per disk, whether a sync or resync is open in the stream, the
//! recent recovery points (with their churn: the encryption alarm), and
//! whether the agent is connected. Fed by the cache sink (`server.rs`) and
//! the uploader (`uploader.rs`); read by `status.rs`. The current backpressure
//! decision (`health.rs`) lives here too, so the sink checks it without I/O.
//!
//! RPO (recovery point objective actually met) of a machine: now minus the
//! acknowledgement time of the oldest write not yet durable in the object
//! store, or, when the agent is not connected, minus the time its session
//! ended if that is older (writes made since cannot have reached the store);
//! 0 when connected and everything acknowledged is stored. Acknowledgement
//! times are kept per appended batch ([`ACK_MARKS`] of them; when more are
//! outstanding the newest are merged, which only makes the RPO look older).
//! Entries a previous run of the server left in the cache count from this
//! run's start (their own times are not kept): the RPO is then at least that.
//!
//! Invariants: `uploaded ≤ durable`, both monotonic here as in the cache;
//! marks are ordered by seq and all above `uploaded`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use lifeboat_common::churn::Churn;
use lifeboat_common::protocol::{Entry, Op, TagKind};

/// Outstanding acknowledgement marks kept per machine.
pub const ACK_MARKS: usize = 4096;
/// The churn rate is averaged over this many seconds.
pub const CHURN_WINDOW_SECS: u64 = 60;
/// Recent points kept per machine (status shows the newest few; the
/// encryption alarm judges all of them).
pub const POINTS_KEPT: usize = 64;

/// The status page's RPO chart: the worst RPO of each step, over the span.
pub const RPO_HISTORY_STEP: Duration = Duration::from_secs(10);
pub const RPO_HISTORY_SPAN: Duration = Duration::from_secs(6 * 3600);

/// One acknowledged batch: its last seq, when, and its encoded bytes.
#[derive(Debug, Clone, Copy)]
struct Mark {
    seq: u64,
    time_ms: u64,
    bytes: u64,
}

/// A recovery point the uploader stored (its segment is in the store).
#[derive(Debug, Clone, PartialEq)]
pub struct PointSeen {
    pub seq: u64,
    pub kind: TagKind,
    pub time_ms: u64,
    pub label: String,
    pub churn: Option<Churn>,
}

#[derive(Debug, Default)]
struct Live {
    durable: u64,
    uploaded: u64,
    marks: VecDeque<Mark>,
    /// Bytes of the marks (entries acknowledged, not yet stored).
    cached_bytes: u64,
    /// Per second: write bytes per disk number.
    churn: VecDeque<(u64, HashMap<u16, u64>)>,
    /// An `inconsistent` entry with no tag after it: (seq, label).
    open_sync: Option<(u64, String)>,
    points: VecDeque<PointSeen>,
    connected: bool,
    /// When the last session ended (ms).
    disconnected_since: Option<u64>,
    /// (step start, Unix seconds; the worst RPO in it, seconds).
    rpo_history: VecDeque<(u64, f64)>,
}

/// The monitor's view of one machine at one moment.
#[derive(Debug, Clone, Default)]
pub struct MachineView {
    pub durable: u64,
    pub uploaded: u64,
    pub cached_bytes: u64,
    /// Acknowledgement time of the oldest write not yet stored (ms).
    pub oldest_unstored_ms: Option<u64>,
    pub connected: bool,
    pub disconnected_since: Option<u64>,
    /// Write bytes per second over the last [`CHURN_WINDOW_SECS`], per disk number.
    pub churn_per_disk: HashMap<u16, f64>,
    pub open_sync: Option<(u64, String)>,
    pub points: Vec<PointSeen>,
}

pub struct Monitor {
    started_ms: u64,
    machines: Mutex<HashMap<String, Live>>,
    backpressure: Mutex<Option<String>>,
    under_backpressure: AtomicBool,
}

impl Default for Monitor {
    fn default() -> Self {
        Monitor::new(lifeboat_common::now_ms())
    }
}

impl Monitor {
    pub fn new(started_ms: u64) -> Monitor {
        Monitor {
            started_ms,
            machines: Mutex::new(HashMap::new()),
            backpressure: Mutex::new(None),
            under_backpressure: AtomicBool::new(false),
        }
    }

    pub fn started_ms(&self) -> u64 {
        self.started_ms
    }

    fn with<T>(&self, machine: &str, f: impl FnOnce(&mut Live) -> T) -> T {
        let mut m = self.machines.lock().unwrap_or_else(|p| p.into_inner());
        f(m.entry(machine.to_string()).or_default())
    }

    /// A session opened at the cache's positions.
    pub fn opened(&self, machine: &str, durable: u64, uploaded: u64) {
        let started = self.started_ms;
        self.with(machine, |l| {
            l.connected = true;
            l.disconnected_since = None;
            l.uploaded = l.uploaded.max(uploaded);
            if durable > l.durable {
                // Entries of an earlier run: their times are not known.
                if l.marks.is_empty() && durable > l.uploaded {
                    l.marks.push_back(Mark {
                        seq: durable,
                        time_ms: started,
                        bytes: 0,
                    });
                }
                l.durable = durable;
            }
        });
    }

    /// Which machines have a live session now; a machine seen connected
    /// that has none any more is disconnected from `now_ms` on.
    pub fn sessions(&self, live: &[String], now_ms: u64) {
        let mut m = self.machines.lock().unwrap_or_else(|p| p.into_inner());
        for (name, l) in m.iter_mut() {
            let is_live = live.iter().any(|x| x == name);
            if l.connected && !is_live {
                l.disconnected_since = Some(now_ms);
            }
            l.connected = is_live;
        }
    }

    /// `entries` were made durable (and acknowledged up to `durable`) at `now_ms`.
    pub fn appended(&self, machine: &str, entries: &[Entry], durable: u64, now_ms: u64) {
        let bytes: u64 = entries.iter().map(|e| e.encoded_len() as u64).sum();
        self.with(machine, |l| {
            l.connected = true;
            l.durable = l.durable.max(durable);
            if l.marks.len() >= ACK_MARKS {
                // Merge into the newest: its time stays, so the RPO of the
                // merged entries can only look older than it is.
                if let Some(last) = l.marks.back_mut() {
                    last.seq = durable;
                    last.bytes += bytes;
                }
            } else {
                l.marks.push_back(Mark {
                    seq: durable,
                    time_ms: now_ms,
                    bytes,
                });
            }
            l.cached_bytes += bytes;
            let sec = now_ms / 1000;
            if l.churn.back().map(|(s, _)| *s) != Some(sec) {
                l.churn.push_back((sec, HashMap::new()));
            }
            while l
                .churn
                .front()
                .is_some_and(|(s, _)| *s + CHURN_WINDOW_SECS <= sec)
            {
                l.churn.pop_front();
            }
            let (_, per_disk) = l.churn.back_mut().expect("pushed above");
            for e in entries {
                match &e.op {
                    Op::Write { disk, data, .. } => {
                        *per_disk.entry(*disk).or_default() += data.len() as u64;
                    }
                    Op::Inconsistent { label } => l.open_sync = Some((e.seq, label.clone())),
                    Op::Tag { .. } => l.open_sync = None,
                    _ => {}
                }
            }
        });
    }

    /// Everything up to `upto` is in the object store.
    pub fn uploaded(&self, machine: &str, upto: u64) {
        self.with(machine, |l| {
            l.uploaded = l.uploaded.max(upto);
            while l.marks.front().is_some_and(|m| m.seq <= upto) {
                let m = l.marks.pop_front().expect("checked");
                l.cached_bytes = l.cached_bytes.saturating_sub(m.bytes);
            }
            if l.marks.is_empty() {
                l.cached_bytes = 0;
            }
        });
    }

    /// A point whose segment is stored.
    pub fn point(&self, machine: &str, p: PointSeen) {
        self.with(machine, |l| {
            // Segments are stored in parallel: points may come out of order.
            match l.points.binary_search_by_key(&p.seq, |q| q.seq) {
                Ok(_) => return, // a re-upload
                Err(i) => l.points.insert(i, p),
            }
            if l.points.len() > POINTS_KEPT {
                l.points.pop_front();
            }
        });
    }

    pub fn view(&self, machine: &str, now_ms: u64) -> MachineView {
        let m = self.machines.lock().unwrap_or_else(|p| p.into_inner());
        let Some(l) = m.get(machine) else {
            return MachineView {
                disconnected_since: Some(self.started_ms),
                ..MachineView::default()
            };
        };
        let sec = now_ms / 1000;
        let mut churn_per_disk: HashMap<u16, f64> = HashMap::new();
        for (s, per_disk) in &l.churn {
            if s + CHURN_WINDOW_SECS > sec {
                for (d, b) in per_disk {
                    *churn_per_disk.entry(*d).or_default() += *b as f64;
                }
            }
        }
        for v in churn_per_disk.values_mut() {
            *v /= CHURN_WINDOW_SECS as f64;
        }
        MachineView {
            durable: l.durable,
            uploaded: l.uploaded,
            cached_bytes: l.cached_bytes,
            oldest_unstored_ms: l.marks.front().map(|m| m.time_ms),
            connected: l.connected,
            disconnected_since: if l.connected {
                None
            } else {
                Some(l.disconnected_since.unwrap_or(self.started_ms))
            },
            churn_per_disk,
            open_sync: l.open_sync.clone(),
            points: l.points.iter().cloned().collect(),
        }
    }

    /// Adds an RPO sample (the tick's) to the machine's history.
    pub fn record_rpo(&self, machine: &str, now_s: u64, rpo_s: f64) {
        let step = RPO_HISTORY_STEP.as_secs();
        let at = now_s - now_s % step;
        self.with(machine, |l| {
            match l.rpo_history.back_mut() {
                Some((t, r)) if *t == at => *r = r.max(rpo_s),
                _ => l.rpo_history.push_back((at, rpo_s)),
            }
            while l
                .rpo_history
                .front()
                .is_some_and(|(t, _)| t + RPO_HISTORY_SPAN.as_secs() < now_s)
            {
                l.rpo_history.pop_front();
            }
        });
    }

    /// The machine's RPO samples, oldest first.
    pub fn rpo_history(&self, machine: &str) -> Vec<(u64, f64)> {
        let m = self.machines.lock().unwrap_or_else(|p| p.into_inner());
        m.get(machine)
            .map(|l| l.rpo_history.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Sets the backpressure decision (`None`: entries are taken); logs
    /// when it starts and ends.
    pub fn set_backpressure(&self, why: Option<String>) {
        let mut bp = self.backpressure.lock().unwrap_or_else(|p| p.into_inner());
        match (bp.is_some(), &why) {
            (false, Some(w)) => tracing::warn!("BACKPRESSURE on: {w}"),
            (true, None) => tracing::info!("backpressure off: the cache has room again"),
            _ => {}
        }
        self.under_backpressure
            .store(why.is_some(), Ordering::Release);
        *bp = why;
    }

    /// Why new entries are refused now, if they are.
    pub fn backpressure(&self) -> Option<String> {
        if !self.under_backpressure.load(Ordering::Acquire) {
            return None;
        }
        self.backpressure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The RPO in ms (see the module header).
pub fn rpo_ms(v: &MachineView, now_ms: u64) -> u64 {
    let since = match (v.oldest_unstored_ms, v.disconnected_since) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    since.map(|t| now_ms.saturating_sub(t)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn write(seq: u64, len: usize) -> Entry {
        Entry {
            seq,
            op: Op::Write {
                disk: 0,
                offset: 0,
                data: Bytes::from(vec![1; len]),
            },
        }
    }

    #[test]
    fn rpo_is_the_age_of_the_oldest_unstored_write() {
        let m = Monitor::new(0);
        m.opened("m", 0, 0);
        assert_eq!(rpo_ms(&m.view("m", 1_000), 1_000), 0);
        m.appended("m", &[write(1, 10), write(2, 10)], 2, 1_000);
        m.appended("m", &[write(3, 10)], 3, 3_000);
        assert_eq!(rpo_ms(&m.view("m", 5_000), 5_000), 4_000);
        // A segment cut inside the first batch leaves that batch's time.
        m.uploaded("m", 1);
        assert_eq!(rpo_ms(&m.view("m", 5_000), 5_000), 4_000);
        m.uploaded("m", 2);
        assert_eq!(rpo_ms(&m.view("m", 5_000), 5_000), 2_000);
        m.uploaded("m", 3);
        let v = m.view("m", 5_000);
        assert_eq!(rpo_ms(&v, 5_000), 0);
        assert_eq!(v.cached_bytes, 0);
        // Disconnected: it grows from the session's end.
        m.sessions(&[], 6_000);
        assert_eq!(rpo_ms(&m.view("m", 9_000), 9_000), 3_000);
        m.opened("m", 3, 3);
        assert_eq!(rpo_ms(&m.view("m", 9_000), 9_000), 0);
    }

    #[test]
    fn a_machine_never_seen_counts_from_the_start_and_old_entries_too() {
        let m = Monitor::new(10_000);
        assert_eq!(rpo_ms(&m.view("x", 12_000), 12_000), 2_000);
        // The cache held entries 5..=9 from an earlier run.
        m.opened("x", 9, 4);
        assert_eq!(rpo_ms(&m.view("x", 12_000), 12_000), 2_000);
        m.uploaded("x", 9);
        assert_eq!(rpo_ms(&m.view("x", 12_000), 12_000), 0);
    }

    #[test]
    fn churn_is_a_rate_over_the_window_and_a_tag_closes_a_sync() {
        let m = Monitor::new(0);
        let inconsistent = Entry {
            seq: 1,
            op: Op::Inconsistent {
                label: "initial sync".into(),
            },
        };
        m.appended("m", &[inconsistent, write(2, 6_000_000)], 2, 1_000);
        let v = m.view("m", 2_000);
        assert_eq!(v.churn_per_disk[&0], 100_000.0);
        assert_eq!(v.open_sync, Some((1, "initial sync".into())));
        let tag = Entry {
            seq: 3,
            op: Op::Tag {
                kind: TagKind::Crash,
                source: None,
                time_ms: 0,
                label: String::new(),
            },
        };
        m.appended("m", &[tag], 3, 100_000);
        let v = m.view("m", 100_000);
        assert!(v.open_sync.is_none());
        assert!(v.churn_per_disk.is_empty() || v.churn_per_disk[&0] == 0.0);
    }

    #[test]
    fn rpo_history_keeps_the_worst_of_each_step_over_the_span() {
        let m = Monitor::new(0);
        m.record_rpo("m", 100, 1.0);
        m.record_rpo("m", 105, 3.0);
        m.record_rpo("m", 109, 2.0);
        m.record_rpo("m", 110, 0.5);
        assert_eq!(m.rpo_history("m"), vec![(100, 3.0), (110, 0.5)]);
        m.record_rpo("m", 110 + RPO_HISTORY_SPAN.as_secs(), 0.0);
        assert_eq!(m.rpo_history("m").len(), 2);
        assert_eq!(m.rpo_history("m")[0].0, 110);
    }

    #[test]
    fn marks_are_bounded_and_merging_keeps_the_oldest_time() {
        let m = Monitor::new(0);
        for s in 1..=(ACK_MARKS as u64 + 10) {
            m.appended("m", &[write(s, 1)], s, 1_000 + s);
        }
        let v = m.view("m", 100_000);
        assert_eq!(v.oldest_unstored_ms, Some(1_001));
        m.uploaded("m", ACK_MARKS as u64 + 5);
        // The merged mark (holding the newest seqs) keeps its earlier time.
        assert!(rpo_ms(&m.view("m", 100_000), 100_000) > 0);
        m.uploaded("m", ACK_MARKS as u64 + 10);
        assert_eq!(rpo_ms(&m.view("m", 100_000), 100_000), 0);
    }
}
