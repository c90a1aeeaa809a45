//! `lifeboat-faults`: runs the seeded fault harness (tests/src/faults.rs).
//!
//! ```text
//! lifeboat-faults [--seed N] [--secs N] [--max-ops N] [--minutes N] [--kinds k1,k2,..]
//!                 [--disk-mib N] [--ops-per-fault N] [--failovers N] [--no-flush]
//!                 [--no-wait-welcome] [--idle-before-power-loss SECS] [--retention SECS]
//!                 [--work DIR] [--keep]
//!                 [--show-ops FROM-TO]   (print the seed's operations, run nothing)
//! ```
//!
//! One seed (`--seed`, else `LIFEBOAT_FAULT_SEED`, else one drawn from the
//! clock) for `--secs` (else `LIFEBOAT_FAULT_SECS`, else 40) seconds; with
//! `--minutes`, seeds back to back (seed, seed+1, ...) until that much time
//! has passed. Each run prints its schedule and one `FAULTS-RESULT` line; the
//! exit status is 1 if any run broke an invariant (its work directory is kept
//! and named).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use lifeboat_tests::faults::{self, FaultKind, Scenario};

fn usage() -> ! {
    eprintln!(
        "usage: lifeboat-faults [--seed N] [--secs N] [--max-ops N] [--minutes N] [--kinds {}] [--disk-mib N] [--ops-per-fault N] [--failovers N] [--no-flush] [--no-wait-welcome] [--idle-before-power-loss SECS] [--show-ops FROM-TO] [--retention SECS (0: off)] [--work DIR] [--keep]",
        FaultKind::ALL.iter().map(|k| k.name()).collect::<Vec<_>>().join(",")
    );
    std::process::exit(2)
}

fn main() {
    let mut seed = faults::seed_from_env();
    let mut secs = None;
    let mut max_ops = None;
    let mut minutes = None;
    let mut kinds = None;
    let mut disk_mib = None;
    let mut ops_per_fault = None;
    let mut failovers = None;
    let mut no_flush = false;
    let mut idle = None;
    let mut no_wait_welcome = false;
    let mut show_ops = None;
    let mut work = None;
    let mut keep = false;
    let mut retention = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        let num = |v: String| v.parse::<u64>().unwrap_or_else(|_| usage());
        match a.as_str() {
            "--seed" => seed = Some(num(val())),
            "--secs" => secs = Some(num(val())),
            "--max-ops" => max_ops = Some(num(val())),
            "--minutes" => minutes = Some(num(val())),
            "--disk-mib" => disk_mib = Some(num(val())),
            "--ops-per-fault" => ops_per_fault = Some(num(val())),
            "--failovers" => failovers = Some(num(val())),
            "--work" => work = Some(PathBuf::from(val())),
            "--keep" => keep = true,
            "--retention" => retention = Some(num(val())),
            "--no-flush" => no_flush = true,
            "--no-wait-welcome" => no_wait_welcome = true,
            "--show-ops" => {
                let v = val();
                let (a, b) = v.split_once('-').unwrap_or_else(|| usage());
                show_ops = Some((num(a.to_string()), num(b.to_string())));
            }
            "--idle-before-power-loss" => idle = Some(num(val())),
            "--kinds" => {
                let v = val();
                kinds = Some(
                    v.split(',')
                        .filter(|s| !s.is_empty())
                        .map(|k| FaultKind::parse(k).unwrap_or_else(|| usage()))
                        .collect::<Vec<_>>(),
                )
            }
            _ => usage(),
        }
    }
    let first = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() % 1_000_000)
            .unwrap_or(1)
    });
    let work = work.unwrap_or_else(std::env::temp_dir);
    let until = minutes.map(|m| Instant::now() + Duration::from_secs(m * 60));
    let mut failed = 0;
    let mut seed = first;
    loop {
        let mut s = Scenario::new(seed);
        if let Some(v) = secs {
            s.secs = v;
        }
        s.max_ops = max_ops;
        if let Some(k) = &kinds {
            s.kinds = k.clone();
        }
        if let Some(m) = disk_mib {
            s.disk_size = m << 20;
        }
        if let Some(n) = ops_per_fault {
            s.ops_per_fault = n;
        }
        if let Some(n) = failovers {
            s.max_point_failovers = n as usize;
        }
        s.keep = keep;
        if let Some(r) = retention {
            s.retention = (r > 0).then(|| Duration::from_secs(r));
        }
        if let Some((a, b)) = show_ops {
            for l in faults::describe_ops(&s, a, b) {
                println!("{l}");
            }
            return;
        }
        s.flushes = !no_flush;
        if no_wait_welcome {
            s.wait_welcome_after_restart = false;
            s.tag_after_agent_restart = true;
        }
        if let Some(i) = idle {
            s.idle_before_agent_power_loss = Duration::from_secs(i);
        }
        let root = work.join(format!("lifeboat-faults-{seed}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let o = faults::run(&s, &root);
        if o.failures.is_empty() && !keep {
            let _ = std::fs::remove_dir_all(&root);
        } else if let Some(d) = &o.work_dir {
            eprintln!("work directory kept: {}", d.display());
        }
        if !o.failures.is_empty() {
            failed += 1;
        }
        seed += 1;
        match until {
            Some(t) if Instant::now() < t => continue,
            _ => break,
        }
    }
    std::process::exit(if failed > 0 { 1 } else { 0 });
}
