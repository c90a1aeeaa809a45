//! The degradation path: a full journal never blocks writers (bitmap state), and
//! an unclean agent stop resends only the regions its activity log marks.

use std::process::Command;
use std::time::Duration;

use lifeboat_tests::*;

const MACHINE: &str = "machine-1";
const MIB: u64 = 1024 * 1024;

fn wait_state(agent: &Agent, state: &str, timeout: Duration) -> serde_json::Value {
    wait_for(&format!("agent state {state}"), timeout, || {
        let s = agent.status().ok()?;
        (s["state"] == state).then_some(s)
    })
    .unwrap()
}

#[test]
fn full_journal_goes_bitmap_then_resync_and_the_next_point_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (mut ps, agent) =
        start_pair(root, &[("root", 256 * MIB)], "journal-max-bytes = 16777216").unwrap();
    qemu_io(&agent.uri("root"), &["write -P 0x01 0 4M", "flush"]).unwrap();
    agent.wait_acked(Duration::from_secs(60)).unwrap();

    // The process server goes away; 96 MiB of writes (6x the journal) must still complete.
    ps.proc.as_mut().unwrap().kill9();
    fio_randwrite(
        &agent.uri("root"),
        &root.join("fio.json"),
        &["--bs=64k", "--iodepth=16", "--size=96M"],
    )
    .expect("writes must not block or fail while the process server is down");
    let s = agent.status().unwrap();
    assert_eq!(s["state"], "bitmap", "{s}");
    assert!(
        agent.tag().is_err(),
        "no recovery point while in bitmap state"
    );
    let snap = root.join("snap.raw");
    snapshot(&agent.image("root"), &snap);

    ps.start().unwrap();
    let s = wait_state(&agent, "streaming", Duration::from_secs(180));
    assert!(s["resync-bytes"].as_u64().unwrap() > 0, "{s}");
    let acked = agent.wait_acked(Duration::from_secs(120)).unwrap();
    wait_stored(&ps.store_url, MACHINE, &[], acked, Duration::from_secs(120)).unwrap();
    let point = ps.point_labelled(MACHINE, "resync-complete");
    let out = ps.failover_ok(MACHINE, &point, &root.join("out"));
    assert_same(&out.join("root.raw"), &snap);
    let log = std::fs::read_dir(&agent.dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("agent-"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect::<String>();
    assert!(
        log.contains("-> bitmap") && log.contains("resync -> streaming"),
        "state changes must be logged:\n{log}"
    );
}

#[test]
fn kill9_agent_resends_only_recently_written_regions() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let size = 1024 * MIB;
    let (ps, mut agent) = start_pair(root, &[("root", size)], "").unwrap();
    // Writes confined to 8 MiB of the disk, in flight when the agent dies.
    let uri = agent.uri("root");
    let mut fio = Proc::spawn(
        "fio",
        Command::new("fio").args([
            "--name=w",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--offset=100M",
            "--size=8M",
            "--time_based",
            "--runtime=30",
        ]),
        &root.join("fio.log"),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    agent.proc.as_mut().unwrap().kill9();
    fio.kill9();
    agent.start().unwrap();
    let s = wait_state(&agent, "streaming", Duration::from_secs(120));
    let resent = s["resync-bytes"].as_u64().unwrap();
    assert!(
        resent > 0,
        "an unclean stop during writes must resend something: {s}"
    );
    assert!(
        resent <= 16 * MIB,
        "resent {resent} bytes of a {size}-byte disk: only the written regions should go"
    );
    qemu_io(&agent.uri("root"), &["flush"]).unwrap();
    let acked = agent.wait_acked(Duration::from_secs(120)).unwrap();
    wait_stored(&ps.store_url, MACHINE, &[], acked, Duration::from_secs(120)).unwrap();
    let out = ps.failover_ok(MACHINE, "latest", &root.join("out"));
    assert_same(&out.join("root.raw"), &agent.image("root"));
}

#[test]
fn clean_stop_in_bitmap_state_still_resends_the_dirty_regions() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (mut ps, mut agent) =
        start_pair(root, &[("root", 128 * MIB)], "journal-max-bytes = 16777216").unwrap();
    ps.proc.as_mut().unwrap().kill9();
    fio_randwrite(
        &agent.uri("root"),
        &root.join("fio.json"),
        &["--bs=64k", "--iodepth=16", "--size=64M"],
    )
    .unwrap();
    assert_eq!(agent.status().unwrap()["state"], "bitmap");
    // An orderly stop while regions are dirty must not pretend the journal is complete.
    assert!(
        agent.proc.as_mut().unwrap().stop(Duration::from_secs(30)),
        "the agent should stop on SIGTERM"
    );
    let snap = root.join("snap.raw");
    snapshot(&agent.image("root"), &snap);
    ps.start().unwrap();
    agent.start().unwrap();
    let s = wait_state(&agent, "streaming", Duration::from_secs(180));
    assert!(s["resync-bytes"].as_u64().unwrap() > 0, "{s}");
    let acked = agent.wait_acked(Duration::from_secs(120)).unwrap();
    wait_stored(&ps.store_url, MACHINE, &[], acked, Duration::from_secs(120)).unwrap();
    let out = ps.failover_ok(MACHINE, "latest", &root.join("out"));
    assert_same(&out.join("root.raw"), &snap);
}

/// Writes queued beyond `queue-memory-bytes` are kept only in the journal:
/// they are read back when the process server returns, also after the agent
/// restarted meanwhile (its replay spills too), and the point after them is
/// exact.
#[test]
fn writes_beyond_the_queue_memory_are_read_back_from_the_journal() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (mut ps, mut agent) = start_pair(
        root,
        &[("root", 128 * MIB)],
        "journal-max-bytes = 134217728\nqueue-memory-bytes = 1048576",
    )
    .unwrap();
    ps.proc.as_mut().unwrap().kill9();
    // 40 MiB of writes of every size from 512 bytes to 128 KiB wait for the
    // process server, in the journal and not in the agent's memory.
    fio_randwrite(
        &agent.uri("root"),
        &root.join("fio.json"),
        &["--bsrange=512-128k", "--iodepth=16", "--io_size=40M"],
    )
    .unwrap();
    let pos = agent.status().unwrap()["positions"].clone();
    assert!(pos["queued-bytes"].as_u64().unwrap() > 40 * MIB, "{pos}");
    assert!(
        pos["queued-in-memory-bytes"].as_u64().unwrap() <= MIB + 4096,
        "{pos}"
    );
    agent.stop_clean();
    agent.start().unwrap();
    let pos = agent.status().unwrap()["positions"].clone();
    assert!(
        pos["queued-in-memory-bytes"].as_u64().unwrap() <= MIB + 4096,
        "after replay: {pos}"
    );
    qemu_io(&agent.uri("root"), &["write -P 0x5a 1000 3000", "flush"]).unwrap();
    let snap = root.join("snap.raw");
    snapshot(&agent.image("root"), &snap);

    // A restarted agent places points once the process server confirmed its
    // numbering: the spilled writes are sent first.
    ps.start().unwrap();
    let seq = wait_for(
        "a point after the restart",
        Duration::from_secs(120),
        || agent.tag().ok(),
    )
    .unwrap();
    let acked = agent.wait_acked(Duration::from_secs(180)).unwrap();
    assert!(acked >= seq);
    wait_stored(&ps.store_url, MACHINE, &[], seq, Duration::from_secs(120)).unwrap();
    let s = agent.status().unwrap();
    assert_eq!(s["state"], "streaming", "no overflow, no resync: {s}");
    let out = ps.failover_ok(MACHINE, &seq.to_string(), &root.join("out"));
    assert_same(&out.join("root.raw"), &snap);
}
