//! Churn statistics and the encryption alarm.
//!
//! Each point records the churn since the previous point ([`Churn`]): bytes
//! written, and how well they compressed (the uploader seals every segment
//! with zstd, so it knows both sizes). Ransomware that encrypts files
//! rewrites them with data zstd cannot compress, so a machine's
//! incompressible fraction jumps and stays high. The rule ([`suspects`]):
//!
//! - a point's incompressible fraction f = sealed bytes / plain bytes of the
//!   segments since the previous point (at most 1);
//! - its baseline is the median f of the up to [`BASELINE_POINTS`] points
//!   before it that carry churn and are not themselves candidates;
//! - a point is a candidate when it wrote at least [`MIN_BYTES`], f is at
//!   least [`HIGH`] and at least [`RISE`] above its baseline (with no
//!   baseline yet, nothing is a candidate);
//! - two candidates in a row (sustained, not one burst of compressed
//!   backups) make both and every later point `suspect` — the encrypted
//!   data stays in every later image. Points without statistics (the first
//!   after a process-server restart) and points with less churn than
//!   [`MIN_BYTES`] neither count nor break a run.
//!
//! `last-clean` is the newest point before the first suspect one.
//!
//! Limits: the rule sees the points that are still stored. Thinning merges
//! the churn of deleted points into none (a kept point's churn covers only
//! the time since the point before it), and retention removes the history a
//! baseline needs; an encryption that fits between two kept points of an
//! old tier, or a run that began before the base, is not seen. Encryption
//! finished within one point interval gives one candidate and no alarm.

use serde::{Deserialize, Serialize};

/// Points of history the baseline is taken from.
pub const BASELINE_POINTS: usize = 6;
/// A candidate's incompressible fraction at the least.
pub const HIGH: f64 = 0.85;
/// ... and its rise over the baseline at the least.
pub const RISE: f64 = 0.25;
/// Churn below this is too small to judge (a few metadata blocks).
pub const MIN_BYTES: u64 = 4 << 20;

/// The churn since the previous point.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Churn {
    /// Bytes of write data (zeroed ranges not counted).
    pub write_bytes: u64,
    /// Bytes of segment plaintext and of the sealed (compressed) segments.
    pub plain_bytes: u64,
    pub sealed_bytes: u64,
}

impl Churn {
    pub fn plus(self, o: Churn) -> Churn {
        Churn {
            write_bytes: self.write_bytes + o.write_bytes,
            plain_bytes: self.plain_bytes + o.plain_bytes,
            sealed_bytes: self.sealed_bytes + o.sealed_bytes,
        }
    }

    /// The fraction zstd could not compress away (0 when nothing was written).
    pub fn incompressible(&self) -> f64 {
        if self.plain_bytes == 0 {
            return 0.0;
        }
        (self.sealed_bytes as f64 / self.plain_bytes as f64).min(1.0)
    }
}

/// Which of `points` (by seq, each with its churn if recorded) are suspect.
pub fn suspects(points: &[Option<Churn>]) -> Vec<bool> {
    let mut out = vec![false; points.len()];
    let mut history: Vec<f64> = Vec::new();
    // The last candidate not yet followed by a judged point.
    let mut previous_candidate: Option<usize> = None;
    let mut latched = false;
    for (i, c) in points.iter().enumerate() {
        if latched {
            out[i] = true;
            continue;
        }
        // Unknown or too little churn: neither counts nor breaks a run.
        let Some(c) = c.filter(|c| c.write_bytes >= MIN_BYTES) else {
            continue;
        };
        let f = c.incompressible();
        let candidate = !history.is_empty() && f >= HIGH && f >= median(&history) + RISE;
        if let (true, Some(first)) = (candidate, previous_candidate) {
            latched = true;
            for o in &mut out[first..=i] {
                *o = true;
            }
            continue;
        }
        if !candidate {
            history.push(f);
            if history.len() > BASELINE_POINTS {
                history.remove(0);
            }
        }
        previous_candidate = candidate.then_some(i);
    }
    out
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[s.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(mib: u64, f: f64) -> Option<Churn> {
        let plain = mib << 20;
        Some(Churn {
            write_bytes: plain,
            plain_bytes: plain,
            sealed_bytes: (plain as f64 * f) as u64,
        })
    }

    #[test]
    fn a_sustained_jump_in_incompressible_churn_latches_suspect() {
        let pts = [
            c(64, 0.4),
            c(64, 0.45),
            c(64, 0.5),
            c(64, 0.98),
            c(64, 0.99),
            c(8, 0.3),
        ];
        // Both candidates: the first already holds encrypted data.
        assert_eq!(suspects(&pts), [false, false, false, true, true, true]);
        // Unknown and small churn between them do not break the run.
        let pts = [
            c(64, 0.4),
            c(64, 0.45),
            c(64, 0.98),
            None,
            c(1, 0.2),
            c(64, 0.99),
        ];
        assert_eq!(suspects(&pts), [false, false, true, true, true, true]);
    }

    #[test]
    fn one_burst_small_churn_or_no_history_is_not_suspect() {
        // One compressed backup: a single candidate.
        let pts = [c(64, 0.4), c(64, 0.98), c(64, 0.4), c(64, 0.97), c(64, 0.4)];
        assert!(suspects(&pts).iter().all(|s| !s));
        // Tiny churn never counts.
        let pts = [c(64, 0.4), c(1, 1.0), c(1, 1.0), c(1, 1.0)];
        assert!(suspects(&pts).iter().all(|s| !s));
        // A machine that always wrote incompressible data has that baseline.
        let pts = [c(64, 0.99), c(64, 0.99), c(64, 0.99), c(64, 0.99)];
        assert!(suspects(&pts).iter().all(|s| !s));
        // A clean point between two candidates breaks the run.
        let pts = [c(64, 0.4), c(64, 0.98), c(64, 0.4), c(64, 0.98)];
        assert!(suspects(&pts).iter().all(|s| !s));
    }
}
