//! The fault harness's CI run: a few seeds of the seeded schedule (agent and
//! process-server kill -9, link cuts/stalls/delays, s3s-fs outages, power loss
//! of the agent's state directory and of the process server's cache,
//! process-server takeovers, disk reorders, and in pinned seeds of their
//! own full filesystems and kill -9 of a master target), each ending with
//! every recovery point failed over (or the master target's disk) compared
//! byte for byte.
//! `LIFEBOAT_FAULT_SEED=N` re-runs one seed (in `reproduce_seed_from_env`),
//! `LIFEBOAT_FAULT_SECS` sets each run's length (default 20 s here).
//!
//! Pinned seeds that found bugs get their own test below.

use lifeboat_tests::faults::{self, FaultKind, Outcome, Scenario};
use lifeboat_tests::powerfs::fuse_available;

/// Workload seconds per CI seed (the final checks add ~20-40 s each).
const CI_SECS: u64 = 20;

fn scenario(seed: u64) -> Scenario {
    let mut s = Scenario::new(seed);
    s.secs = faults::fault_secs(CI_SECS);
    s
}

fn check(s: Scenario) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join(format!("seed-{}", s.seed));
    let o = faults::run(&s, &root);
    if !o.failures.is_empty() {
        // Keep the logs for the post-mortem.
        let kept = dir.keep();
        panic!(
            "seed {} broke {} invariant(s) (re-run: LIFEBOAT_FAULT_SEED={} LIFEBOAT_FAULT_SECS={} cargo test --release -p lifeboat-tests --test faults reproduce_seed_from_env -- --ignored --nocapture); work dir {}:\n{}\nschedule:\n{}",
            s.seed,
            o.failures.len(),
            s.seed,
            s.secs,
            kept.display(),
            o.failures.join("\n"),
            o.schedule.join("\n")
        );
    }
    assert_eq!(o.writes_lost, 0);
    assert_eq!(o.failovers_compared, o.failovers_equal);
    assert!(
        o.failovers_compared >= 2,
        "latest and the final point at least"
    );
    o
}

/// A seed of the long run (`bench/faults.sh --kinds <all> --secs 100`), up
/// to `max_ops` operations (the one that found its bug, and a little more).
fn long_run_seed(seed: u64, max_ops: u64) -> Scenario {
    let mut s = scenario(seed);
    s.secs = faults::fault_secs(100);
    s.kinds = FaultKind::ALL
        .into_iter()
        .filter(|k| *k != FaultKind::MtKill)
        .collect();
    s.max_ops = Some(max_ops);
    s
}

fn needs_fuse() -> bool {
    if !fuse_available() {
        eprintln!("skipping: needs root and /dev/fuse for the power-loss filesystem");
        return false;
    }
    true
}

/// Also the pinned regression of writes over 8 MiB (seed 1 with writes up to
/// the export's 32 MiB, now the default): the process server ended every
/// session at the first such write ("frame is 32735772 bytes, over the limit
/// of 16781312") and a killed agent could not replay its journal.
#[test]
fn seed_1_every_fault_kind() {
    if needs_fuse() {
        check(scenario(1));
    }
}

#[test]
fn seed_2_every_fault_kind() {
    if needs_fuse() {
        check(scenario(2));
    }
}

#[test]
fn seed_3_kills_and_power_loss_only() {
    if needs_fuse() {
        let mut s = scenario(3);
        s.kinds = vec![
            FaultKind::AgentKill,
            FaultKind::PsKill,
            FaultKind::AgentPowerLoss,
            FaultKind::PsPowerLoss,
        ];
        s.ops_per_fault = 25;
        check(s);
    }
}

/// Power loss of the file:// store directory on the appliance (with the
/// process server and its cache): segments and points the server counted as
/// uploaded must survive. Expected to fail today: the file:// store does not
/// fsync its puts (object_store's LocalFileSystem writes a temporary file and
/// renames it, with no fsync of the file or the directory). Pinned: failed
/// before `with_fsync(true)` (after 32 power losses the store kept only
/// segments from seq 0x69 on, `latest` unrecoverable).
#[test]
fn store_power_loss_keeps_uploaded_segments() {
    if needs_fuse() {
        let mut s = scenario(11);
        s.kinds = vec![FaultKind::StorePowerLoss];
        s.ops_per_fault = 30;
        check(s);
    }
}

/// Process-server takeovers and disk reorders among kills and power losses:
/// a rebuilt server (empty cache, same store) takes the machine over while
/// the old one keeps running with what it had not uploaded, and the agent
/// restarts with its two disks listed the other way round. The stream
/// continues after the store's end in the new server's epoch; nothing the
/// old one still uploads is counted; every listed point fails over exact,
/// each disk with its own content.
#[test]
fn seed_6_process_server_takeovers_and_disk_reorders() {
    if needs_fuse() {
        let mut s = scenario(6);
        s.kinds = vec![
            FaultKind::PsTakeover,
            FaultKind::DiskReorder,
            FaultKind::PsKill,
            FaultKind::AgentKill,
            FaultKind::LinkCut,
            FaultKind::AgentPowerLoss,
            FaultKind::PsPowerLoss,
        ];
        s.ops_per_fault = 25;
        check(s);
    }
}

/// Full filesystems (issue 7): the process server's cache and the agent's
/// state directory fill up for 1-6 s at a time, between kills of the server
/// and power losses of the agent; once it has room the cache's disk reports
/// 48 MiB free. Not in the default kinds: pinned here. Failed before
/// `Cache::recover`: RocksDB resumes from ENOSPC by itself only with its
/// write buffer free (128 MiB then, 64 MiB now), so the server refused every
/// hello with "IO error: No space left on device: While appending to file:
/// .../ps-cache/000..." long after the disk had room ("timed out after 300s waiting for the agent to be welcomed").
#[test]
fn full_filesystems_under_the_cache_and_the_journal() {
    if needs_fuse() {
        let mut s = scenario(4);
        s.kinds = vec![
            FaultKind::CacheFull,
            FaultKind::JournalFull,
            FaultKind::PsKill,
            FaultKind::AgentPowerLoss,
        ];
        s.ops_per_fault = 30;
        s.until_injected = vec![FaultKind::CacheFull, FaultKind::JournalFull];
        let o = check(s);
        for k in ["cache-full", "journal-full"] {
            assert!(o.faults.contains_key(k), "no {k} in {:?}", o.schedule);
        }
    }
}

/// The agent streams to a master target (`lifeboat-mt serve`, the failback
/// direction) killed with -9 while it applies, between agent kills, power
/// losses and link faults: restarted, it resumes after its applied position
/// and its disk ends byte-equal to the source.
#[test]
fn seed_9_master_target_kills_while_it_applies() {
    if needs_fuse() {
        let mut s = scenario(9);
        s.kinds = FaultKind::WITH_MT.to_vec();
        s.ops_per_fault = 25;
        s.until_injected = vec![FaultKind::MtKill];
        let o = check(s);
        assert!(o.faults.contains_key("mt-kill"), "{:?}", o.schedule);
    }
}

/// `LIFEBOAT_FAULT_SEED=N [LIFEBOAT_FAULT_SECS=S] cargo test --release -p
/// lifeboat-tests --test faults reproduce_seed_from_env -- --ignored --nocapture`
#[test]
#[ignore = "runs the seed in LIFEBOAT_FAULT_SEED"]
fn reproduce_seed_from_env() {
    let seed = faults::seed_from_env().expect("set LIFEBOAT_FAULT_SEED");
    if needs_fuse() {
        check(scenario(seed));
    }
}

/// Seed 21: a tag taken right after the agent restarted from a power loss
/// that cost its journal's tail (no FLUSH: the journal was never synced; the
/// disk idle for 40 s first, so no region is left in the activity log and the
/// agent starts `streaming`), before the process server's welcome. The
/// agent accepts it and prints its seq (e.g. 68: the next after the 67 its
/// journal kept), the welcome then says the server holds up to 71, the agent
/// rebases ("the journal lost its tail; continuing after seq 71") and the
/// point is silently gone: never stored, its seq is one the server already
/// had. Found as "point 68 ("final") was acknowledged by the process server
/// but is not listed" (and `latest` compared at the old stream end). Fix: no
/// tags (and no seqs handed out) before the welcome confirmed the numbering.
/// Pinned: the agent now refuses such a tag by name (counted as refused).
#[test]
fn seed_21_tag_before_the_welcome_is_stored() {
    if needs_fuse() {
        let mut s = scenario(21);
        s.secs = faults::fault_secs(15);
        s.kinds = vec![FaultKind::AgentPowerLoss];
        s.flushes = false;
        s.ops_per_fault = 60;
        // Idle past the activity log's 30 s: the unclean restart finds no
        // region to resync and starts `streaming`, so the tag is accepted.
        s.idle_before_agent_power_loss = std::time::Duration::from_secs(40);
        s.wait_welcome_after_restart = false;
        s.tag_after_agent_restart = true;
        check(s);
    }
}

/// Seed 217027 of the long run (every fault kind, 100 s per seed): the
/// agent's journal filesystem full, then a process server rebuilt without its
/// cache, so the agent rebased on the store's end (seq 503). The journal's
/// rebase returned the failing write's old error at once while its writer did
/// the rebase later; the stream kept numbering after its old seqs (549…)
/// into the new file named for 504, and after the next kill the agent refused
/// to start: "journal …/00000000000001f8.jnl does not start at the seq its
/// name says". Pinned (up to the op of that kill); the mechanism is also
/// pinned by `journal::tests::a_rebase_while_writes_fail_is_done_and_reported_as_done`.
#[test]
fn seed_217027_a_rebase_while_the_journal_is_full() {
    if needs_fuse() {
        check(long_run_seed(217027, 1700));
    }
}

/// Seed 219740 of the long run (every fault kind): a point tagged right
/// after a process-server takeover, before the new server's welcome, was
/// numbered in the old server's numbering (seq 637); the welcome said the new
/// server held only up to 539 of the 618 acknowledged, so the agent rebased
/// and dropped it (never acknowledged; the agent now says so by name). The
/// harness took `acked` in the new numbering passing 637 for its
/// acknowledgement ("point 637 was acknowledged by the process server but is
/// not listed"). Pinned: such a point counts as lost to the takeover.
#[test]
fn seed_219740_a_point_numbered_before_the_rebase_of_a_takeover() {
    if needs_fuse() {
        check(long_run_seed(219740, 1900));
    }
}
