//! Bandwidth limits with time-of-day windows: the agent's sending
//! (`[bandwidth]` of agent.toml) and the process server's uploads
//! (`[bandwidth]` of ps.toml, per server and per machine).
//!
//! A [`Schedule`] is a default rate and windows (`from`–`to`, local time,
//! minutes of the day; a window that ends before it starts runs over
//! midnight) each with its own rate; the first window that holds the current
//! minute wins. A rate is text: `"20MB/s"`, `"500KiB/s"`, `"100Mbit/s"`,
//! `"unlimited"`. A [`Limiter`] is a token bucket at the schedule's rate now,
//! holding at most one second of it (or one request, when a request is
//! larger): `acquire(n)` waits until `n` bytes may go.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// A rate in bytes per second; `None`: unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rate(pub Option<u64>);

impl Rate {
    pub fn parse(text: &str) -> Result<Rate, String> {
        let t = text.trim();
        if t.eq_ignore_ascii_case("unlimited") {
            return Ok(Rate(None));
        }
        let bad = || {
            format!("{text:?} is not a rate (e.g. \"20MB/s\", \"512KiB/s\", \"100Mbit/s\", \"unlimited\")")
        };
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let (num, unit) = t.split_at(split);
        let n: f64 = num.parse().map_err(|_| bad())?;
        let mult = match unit.trim() {
            "B/s" => 1.0,
            "KB/s" | "kB/s" => 1e3,
            "MB/s" => 1e6,
            "GB/s" => 1e9,
            "KiB/s" => 1024.0,
            "MiB/s" => 1048576.0,
            "GiB/s" => 1073741824.0,
            "kbit/s" | "Kbit/s" => 125.0,
            "Mbit/s" => 125e3,
            "Gbit/s" => 125e6,
            _ => return Err(bad()),
        };
        let bytes = n * mult;
        if !(bytes >= 1.0 && bytes.is_finite()) {
            return Err(format!(
                "{text:?}: a rate must be at least 1 B/s (or \"unlimited\")"
            ));
        }
        Ok(Rate(Some(bytes as u64)))
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            None => write!(f, "unlimited"),
            Some(b) => write!(f, "{b}B/s"),
        }
    }
}

impl Serialize for Rate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Rate, D::Error> {
        let s = String::deserialize(d)?;
        Rate::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// `"HH:MM"` as minutes of the day.
fn minute_of_day(text: &str) -> Result<u16, String> {
    let bad = || format!("{text:?} is not a time of day \"HH:MM\" (00:00 to 24:00)");
    let (h, m) = text.trim().split_once(':').ok_or_else(bad)?;
    let (h, m): (u16, u16) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if m > 59 || h > 24 || (h == 24 && m > 0) {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

/// One window of a schedule (`[[bandwidth.window]]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Window {
    /// Start, local time "HH:MM" (inclusive).
    pub from: String,
    /// End, local time "HH:MM" (exclusive); before `from`: over midnight.
    pub to: String,
    pub limit: Rate,
}

/// A default rate and its windows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Schedule {
    /// Outside every window (default unlimited).
    #[serde(default)]
    pub limit: Rate,
    #[serde(default, rename = "window", skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<Window>,
}

impl Schedule {
    /// Checks every window's times (an error names the window).
    pub fn validate(&self) -> Result<(), String> {
        for (i, w) in self.windows.iter().enumerate() {
            let (a, b) = (minute_of_day(&w.from), minute_of_day(&w.to));
            let (a, b) = (
                a.map_err(|e| format!("window {}: {e}", i + 1))?,
                b.map_err(|e| format!("window {}: {e}", i + 1))?,
            );
            if a == b {
                return Err(format!(
                    "window {}: from and to are both {} (an empty window)",
                    i + 1,
                    w.from
                ));
            }
        }
        Ok(())
    }

    /// The rate at `minute` (of the local day).
    pub fn rate_at(&self, minute: u16) -> Rate {
        for w in &self.windows {
            let (Ok(a), Ok(b)) = (minute_of_day(&w.from), minute_of_day(&w.to)) else {
                continue;
            };
            let inside = if a < b {
                minute >= a && minute < b
            } else {
                minute >= a || minute < b
            };
            if inside {
                return w.limit;
            }
        }
        self.limit
    }

    /// The rate now, in local time.
    pub fn rate_now(&self) -> Rate {
        use chrono::Timelike;
        let now = chrono::Local::now();
        self.rate_at((now.hour() * 60 + now.minute()) as u16)
    }

    pub fn is_unlimited(&self) -> bool {
        self.limit.0.is_none() && self.windows.iter().all(|w| w.limit.0.is_none())
    }
}

/// A token bucket following a schedule; shared by every task it limits.
#[derive(Debug)]
pub struct Limiter {
    schedule: Schedule,
    /// Overrides the clock's minute (tests).
    fixed_rate: Option<Rate>,
    state: tokio::sync::Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Limiter {
    pub fn new(schedule: Schedule) -> Limiter {
        Limiter {
            schedule,
            fixed_rate: None,
            state: tokio::sync::Mutex::new(Bucket {
                tokens: 0.0,
                at: Instant::now(),
            }),
        }
    }

    /// A limiter at one rate whatever the time (tests, benchmarks).
    pub fn fixed(rate: Rate) -> Limiter {
        let mut l = Limiter::new(Schedule::default());
        l.fixed_rate = Some(rate);
        l
    }

    /// Never limits (no rate in any window): callers may skip the bucket.
    pub fn is_unlimited(&self) -> bool {
        match self.fixed_rate {
            Some(r) => r.0.is_none(),
            None => self.schedule.is_unlimited(),
        }
    }

    /// The rate in force now.
    pub fn rate(&self) -> Rate {
        self.fixed_rate.unwrap_or_else(|| self.schedule.rate_now())
    }

    /// Waits until `n` bytes may be sent at the rate in force. Callers are
    /// served in turn (the bucket's lock is fair).
    pub async fn acquire(&self, n: u64) {
        if self.is_unlimited() {
            return;
        }
        let mut b = self.state.lock().await;
        loop {
            let Rate(Some(rate)) = self.rate() else {
                b.tokens = 0.0;
                b.at = Instant::now();
                return;
            };
            let rate = rate as f64;
            let now = Instant::now();
            let cap = rate.max(n as f64);
            b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(cap);
            b.at = now;
            if b.tokens >= n as f64 {
                b.tokens -= n as f64;
                return;
            }
            // At most a second at a time, so that a window that opens (or a
            // rate that rises) takes effect soon.
            let wait = ((n as f64 - b.tokens) / rate).min(1.0);
            tokio::time::sleep(Duration::from_secs_f64(wait.max(0.001))).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_with_their_units_and_bad_ones_are_named() {
        assert_eq!(Rate::parse("20MB/s").unwrap(), Rate(Some(20_000_000)));
        assert_eq!(Rate::parse("512KiB/s").unwrap(), Rate(Some(524_288)));
        assert_eq!(Rate::parse("100Mbit/s").unwrap(), Rate(Some(12_500_000)));
        assert_eq!(Rate::parse("1.5 GB/s").unwrap(), Rate(Some(1_500_000_000)));
        assert_eq!(Rate::parse("unlimited").unwrap(), Rate(None));
        for bad in ["", "20", "20MB", "fast", "0B/s", "-1MB/s", "0.1B/s"] {
            let e = Rate::parse(bad).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn windows_pick_the_rate_including_over_midnight() {
        let s = Schedule {
            limit: Rate(Some(100)),
            windows: vec![
                Window {
                    from: "08:00".into(),
                    to: "18:00".into(),
                    limit: Rate(Some(10)),
                },
                Window {
                    from: "22:00".into(),
                    to: "06:00".into(),
                    limit: Rate(None),
                },
            ],
        };
        s.validate().unwrap();
        assert_eq!(s.rate_at(8 * 60), Rate(Some(10)));
        assert_eq!(s.rate_at(18 * 60 - 1), Rate(Some(10)));
        assert_eq!(s.rate_at(18 * 60), Rate(Some(100)));
        assert_eq!(s.rate_at(23 * 60), Rate(None));
        assert_eq!(s.rate_at(5 * 60 + 59), Rate(None));
        assert_eq!(s.rate_at(6 * 60), Rate(Some(100)));
        let mut bad = s.clone();
        bad.windows[1].to = "25:00".into();
        assert!(bad.validate().unwrap_err().contains("window 2"));
        bad.windows[1].to = "22:00".into();
        assert!(bad.validate().unwrap_err().contains("empty window"));
    }

    #[tokio::test(start_paused = true)]
    async fn the_bucket_holds_the_rate_on_the_clock() {
        // 1 MB/s: 10 MB in 64 KiB pieces takes about 10 s of (virtual) time.
        let l = Limiter::fixed(Rate(Some(1_000_000)));
        let start = Instant::now();
        let mut sent = 0u64;
        while sent < 10_000_000 {
            l.acquire(65536).await;
            sent += 65536;
        }
        let took = start.elapsed().as_secs_f64();
        assert!((9.9..=10.2).contains(&took), "{took} s");
        // A request larger than a second's worth still goes.
        l.acquire(3_000_000).await;
        // Unlimited never waits.
        let free = Limiter::fixed(Rate(None));
        let t = Instant::now();
        free.acquire(u64::MAX / 2).await;
        assert_eq!(t.elapsed(), Duration::ZERO);
    }
}
