//! The process server's health, judged from two numbers: the cache
//! filesystem's free space (free / (free + used), so blocks reserved for
//! root or beyond a quota count as neither) and the upload backlog
//! (how long the oldest write not yet in the object store has waited). Plain
//! functions, no I/O; the monitor (`monitor.rs`) measures and calls them.
//!
//! Thresholds follow Azure Site Recovery's process-server health:
//!
//! ```text
//! level      cache free          upload backlog
//! warning    below 30 %     or   over 30 minutes
//! critical   below 25 %     or   over 45 minutes
//! backpressure: below 20 % free, until free is back at 22 % (hysteresis);
//!               `[health] backpressure-free` moves the 20 % (0: off)
//! ```
//!
//! Under backpressure the server takes no new entries: a hello is refused and
//! an append in a live session is refused before anything is written, with
//! the reason (`cache free 18% < 20%`), so nothing unacknowledged is lost and
//! the agent keeps its writes in its journal (then its dirty bitmap) as on a
//! full cache, resending them once the cache has room.

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub const WARN_FREE: f64 = 0.30;
pub const CRITICAL_FREE: f64 = 0.25;
/// The default `[health] backpressure-free` (percent).
pub const BACKPRESSURE_FREE_PERCENT: u8 = 20;
/// Backpressure ends once the free fraction is this much above where it began.
pub const BACKPRESSURE_HYSTERESIS: f64 = 0.02;
pub const WARN_BACKLOG: Duration = Duration::from_secs(30 * 60);
pub const CRITICAL_BACKLOG: Duration = Duration::from_secs(45 * 60);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Level {
    Ok,
    Warning,
    Critical,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warning => "warning",
            Level::Critical => "critical",
        }
    }
}

/// What status shows as `health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Health {
    pub level: Level,
    /// Why the level is not `ok`, one line per threshold passed.
    pub reasons: Vec<String>,
    /// `Some(why)` while new entries are refused.
    pub backpressure: Option<String>,
    /// Free fraction of the cache filesystem (0..1); `None` if unknown.
    pub cache_free: Option<f64>,
    /// Age of the oldest write not yet in the object store, in seconds.
    pub backlog_seconds: f64,
}

fn pct(f: f64) -> String {
    // Floored (19.9% is shown as 19%, below 20%), past float noise.
    format!("{:.0}%", (f * 100.0 + 1e-9).floor())
}

/// Judges the health; `backpressure_free` is the free fraction below which
/// entries are refused (0: never), `was_backpressure` the previous
/// judgement's (for the hysteresis). An unknown free fraction judges the
/// backlog only.
pub fn judge(
    cache_free: Option<f64>,
    backlog: Duration,
    backpressure_free: f64,
    was_backpressure: bool,
) -> Health {
    let mut level = Level::Ok;
    let mut reasons = Vec::new();
    let mut backpressure = None;
    if let Some(f) = cache_free {
        if f < CRITICAL_FREE {
            level = Level::Critical;
            reasons.push(format!("cache free {} < {}", pct(f), pct(CRITICAL_FREE)));
        } else if f < WARN_FREE {
            level = Level::Warning;
            reasons.push(format!("cache free {} < {}", pct(f), pct(WARN_FREE)));
        }
        let release = backpressure_free + BACKPRESSURE_HYSTERESIS;
        let limit = if was_backpressure {
            release
        } else {
            backpressure_free
        };
        if backpressure_free > 0.0 && f < limit {
            backpressure = Some(format!(
                "cache free {} < {}: agents' new writes are refused (they keep them) until {} is free",
                pct(f),
                pct(backpressure_free),
                pct(release)
            ));
        }
    }
    let d = |d: Duration| humantime::format_duration(d).to_string();
    let backlog_s = Duration::from_secs(backlog.as_secs());
    if backlog > CRITICAL_BACKLOG {
        level = Level::Critical;
        reasons.push(format!(
            "upload backlog {} > {}",
            d(backlog_s),
            d(CRITICAL_BACKLOG)
        ));
    } else if backlog > WARN_BACKLOG {
        level = level.max(Level::Warning);
        reasons.push(format!(
            "upload backlog {} > {}",
            d(backlog_s),
            d(WARN_BACKLOG)
        ));
    }
    Health {
        level,
        reasons,
        backpressure,
        cache_free,
        backlog_seconds: backlog.as_secs_f64(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);
    const BP: f64 = 0.20;

    #[test]
    fn thresholds_of_free_space() {
        assert_eq!(judge(Some(0.5), Duration::ZERO, BP, false).level, Level::Ok);
        let h = judge(Some(0.29), Duration::ZERO, BP, false);
        assert_eq!(h.level, Level::Warning);
        assert_eq!(h.reasons, vec!["cache free 29% < 30%"]);
        assert!(h.backpressure.is_none());
        let h = judge(Some(0.24), Duration::ZERO, BP, false);
        assert_eq!(h.level, Level::Critical);
        assert!(h.backpressure.is_none());
        let h = judge(Some(0.18), Duration::ZERO, BP, false);
        assert_eq!(h.level, Level::Critical);
        let bp = h.backpressure.unwrap();
        assert!(bp.starts_with("cache free 18% < 20%"), "{bp}");
    }

    #[test]
    fn backpressure_ends_only_at_the_release_level() {
        assert!(judge(Some(0.21), Duration::ZERO, BP, true)
            .backpressure
            .is_some());
        assert!(judge(Some(0.21), Duration::ZERO, BP, false)
            .backpressure
            .is_none());
        assert!(judge(Some(0.22), Duration::ZERO, BP, true)
            .backpressure
            .is_none());
    }

    #[test]
    fn backpressure_can_be_moved_or_turned_off() {
        assert!(judge(Some(0.0), Duration::ZERO, 0.0, false)
            .backpressure
            .is_none());
        assert!(judge(Some(0.09), Duration::ZERO, 0.10, false)
            .backpressure
            .is_some());
        assert!(judge(Some(0.11), Duration::ZERO, 0.10, true)
            .backpressure
            .is_some());
    }

    #[test]
    fn thresholds_of_the_backlog() {
        assert_eq!(judge(Some(0.9), 30 * MIN, BP, false).level, Level::Ok);
        let h = judge(Some(0.9), 31 * MIN, BP, false);
        assert_eq!(h.level, Level::Warning);
        assert_eq!(h.reasons, vec!["upload backlog 31m > 30m"]);
        assert_eq!(judge(None, 46 * MIN, BP, false).level, Level::Critical);
        // Both: the worse level, both reasons.
        let h = judge(Some(0.24), 31 * MIN, BP, false);
        assert_eq!(h.level, Level::Critical);
        assert_eq!(h.reasons.len(), 2);
    }
}
