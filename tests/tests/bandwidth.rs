//! Bandwidth limits (`[bandwidth]` of agent.toml and ps.toml): replication
//! under a limit still recovers byte for byte, and takes at least as long as
//! the limit allows. Only lower bounds on time are asserted: a slow machine
//! makes a run longer, never shorter, so they cannot fail by noise; the
//! limiter's own timing is tested on a paused clock
//! (`common/src/bandwidth.rs`).

use std::time::{Duration, Instant};

use lifeboat_tests::*;

const MIB: u64 = 1024 * 1024;
const SIZE: u64 = 12 * MIB;
/// 4 MB/s: 12 MiB of random data take at least 3.1 s.
const RATE: &str = "4MB/s";
const AT_LEAST: f64 = SIZE as f64 / 4e6 * 0.8;

/// A `size`-byte random disk protected from scratch with `agent_extra` in
/// agent.toml, after `edit_ps` changed the server's config; returns once its
/// point is stored and failed over byte-equal, with the seconds it took.
fn protect(
    root: &std::path::Path,
    size: u64,
    agent_extra: &str,
    edit_ps: impl FnOnce(&ProcessServer),
) -> (ProcessServer, Agent, f64) {
    let mut ps = ProcessServer::init(&root.join("ps"), None, &[]).unwrap();
    edit_ps(&ps);
    ps.start().unwrap();
    let certs = ps.dir.join("machines/machine-1");
    let mut agent = Agent::configure(
        &root.join("agent"),
        "machine-1",
        &certs,
        ps.port,
        &[("root", size)],
        agent_extra,
    )
    .unwrap();
    fill_random(&agent.image("root"), 0, size, &mut Rng(0xba4d));
    let start = Instant::now();
    agent.start().unwrap();
    agent.wait_synced(Duration::from_secs(180)).unwrap();
    let seq = agent.tag().unwrap();
    wait_stored(
        &ps.store_url,
        "machine-1",
        &[],
        seq,
        Duration::from_secs(120),
    )
    .unwrap();
    let took = start.elapsed().as_secs_f64();
    eprintln!("{size} bytes protected and stored in {took:.2} s");
    let out = ps.failover_ok("machine-1", &seq.to_string(), &root.join("out"));
    assert_same(&out.join("root.raw"), &agent.image("root"));
    (ps, agent, took)
}

#[test]
fn the_agents_limit_paces_what_it_sends() {
    let tmp = tempfile::tempdir().unwrap();
    // A window that covers the whole day but one minute, and the same rate
    // outside it: whatever the local time, 4 MB/s.
    let extra = format!(
        "[bandwidth]\nlimit = \"{RATE}\"\n[[bandwidth.window]]\nfrom = \"00:00\"\nto = \"23:59\"\nlimit = \"{RATE}\"\n"
    );
    let (_ps, mut agent, took) = protect(tmp.path(), SIZE, &extra, |_| {});
    assert!(took >= AT_LEAST, "12 MiB at {RATE} arrived in {took:.2} s");
    agent.stop_clean();
}

#[test]
fn the_process_servers_upload_limit_paces_its_puts() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = format!(
        "[bandwidth]\nupload = {{ limit = \"unlimited\", window = [{{ from = \"00:00\", to = \"24:00\", limit = \"{RATE}\" }}] }}\n\
         [[bandwidth.machine]]\nname = \"machine-1\"\nupload = {{ limit = \"1GB/s\" }}\n"
    );
    let (_ps, mut agent, took) = protect(tmp.path(), SIZE, "", |ps| ps.append_config(&extra));
    assert!(took >= AT_LEAST, "12 MiB uploaded at {RATE} in {took:.2} s");
    agent.stop_clean();
}

/// A rate so low that one batch waits longer than the server's idle timeout:
/// the agent pings while it waits, so its session is never closed for
/// silence (one session from start to end), and the data arrives whole.
#[test]
fn a_batch_held_longer_than_the_idle_timeout_keeps_its_session() {
    let tmp = tempfile::tempdir().unwrap();
    // 3 MiB at 100 kB/s: about 31 s, most of it one batch.
    let (ps, mut agent, _) = protect(
        tmp.path(),
        3 * MIB,
        "[bandwidth]\nlimit = \"100kB/s\"\n",
        |ps| {
            let cfg = ps.dir.join("ps.toml");
            let text = std::fs::read_to_string(&cfg)
                .unwrap()
                .replace("idle-timeout = \"60s\"", "idle-timeout = \"20s\"");
            std::fs::write(&cfg, text).unwrap();
        },
    );
    let log = ps.log();
    assert_eq!(
        log.matches("session started").count(),
        1,
        "the session was closed and restarted:\n{log}"
    );
    agent.stop_clean();
}
