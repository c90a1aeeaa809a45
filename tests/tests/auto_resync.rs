//! Checksum resyncs the agent starts by itself, because it knows the replica may
//! differ but not where: its state was lost (wiped, or the journal lost its
//! tail), or a disk was resized while it was stopped. Each must end in a
//! `checksum-resync-complete` point whose image equals the source, sending
//! only what differs.

use std::time::Duration;

use lifeboat_tests::*;

const MACHINE: &str = "machine-1";
const MIB: u64 = 1024 * 1024;
const BLOCK: u64 = 4096;

/// Waits for the agent's own resync, checks what it sent, and that the point
/// it placed recovers the disk exactly.
fn resync_is_exact(
    ps: &ProcessServer,
    agent: &Agent,
    changed_bytes: u64,
    out: &std::path::Path,
) -> serde_json::Value {
    let report = agent
        .wait_checksum_resync(Duration::from_secs(300))
        .unwrap();
    assert_eq!(report["error"], "", "{report}");
    assert_eq!(
        report["block-bytes"].as_u64(),
        Some(changed_bytes),
        "exactly the changed blocks are sent: {report}"
    );
    ps.assert_point_exact(
        MACHINE,
        "checksum-resync-complete",
        report["tag-seq"].as_u64().unwrap(),
        &agent.image("root"),
        out,
    );
    report
}

#[test]
fn lost_agent_state_is_repaired_by_a_checksum_resync() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let size = 64 * MIB;
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let (mut ps, mut agent) = synced_random_disk(root, size, &mut rng, |ps| ps.port);
    let state = agent.dir.join("state");

    // 1. The state directory is wiped (a reinstalled agent) and blocks change.
    agent.stop_clean();
    let changed = change_blocks(&agent.image("root"), size, 100, &mut rng);
    std::fs::remove_dir_all(&state).unwrap();
    agent.start().unwrap();
    let report = resync_is_exact(
        &ps,
        &agent,
        changed.len() as u64 * BLOCK,
        &root.join("out1"),
    );
    assert_eq!(report["hashed-bytes"].as_u64(), Some(size), "{report}");
    let log = agent.proc.as_ref().unwrap().log_text();
    assert!(
        log.contains("another numbering"),
        "the agent must say why it rebased:\n{log}"
    );
    assert!(
        ps.log().contains("must rebase"),
        "the process server must say it refused the other numbering"
    );
    // The initial sync was replaced, not run: the disk is not copied again.
    let s = agent.status().unwrap();
    let sent = s["sync"][0]["sent-bytes"].as_u64().unwrap();
    assert!(sent < size / 2, "the initial sync sent {sent} bytes: {s}");

    // 2. Only the journal is lost (same stream id), the disk grew by 16 MiB,
    //    and, while the process server is down, the agent takes more seqs than
    //    the server holds before it hears the welcome: the server's seqs are
    //    still not the agent's own, and the resize entry the rebase drops is
    //    made again.
    let durable = agent.status().unwrap()["positions"]["acked"]
        .as_u64()
        .unwrap();
    agent.stop_clean();
    ps.proc.as_mut().unwrap().stop(Duration::from_secs(30));
    let changed = change_blocks(&agent.image("root"), size, 50, &mut rng);
    let grown = size + 16 * MIB;
    resize_file(&agent.image("root"), grown);
    fill_random(&agent.image("root"), size, 16 * MIB, &mut rng);
    std::fs::remove_dir_all(state.join("journal")).unwrap();
    agent.start().unwrap();
    let writes: Vec<String> = (0..durable + 100)
        .map(|i| format!("write -P 0x{:02x} {} 4k", i % 251, (i % 4096) * BLOCK))
        .collect();
    let cmds: Vec<&str> = writes.iter().map(String::as_str).collect();
    qemu_io(&agent.uri("root"), &cmds).unwrap();
    let captured = agent.status().unwrap()["positions"]["captured"]
        .as_u64()
        .unwrap();
    assert!(
        captured > durable,
        "{captured} seqs taken, the server holds {durable}"
    );
    ps.start().unwrap();
    // The rebase drops those writes (never sent): the resync finds their
    // blocks, the changed ones and the grown space.
    let rewritten: std::collections::BTreeSet<u64> = (0..(durable + 100).min(4096)).collect();
    let differ = changed.union(&rewritten).count() as u64;
    resync_is_exact(&ps, &agent, differ * BLOCK + 16 * MIB, &root.join("out2"));
    let log = agent.proc.as_ref().unwrap().log_text();
    assert!(log.contains("lost its tail"), "{log}");

    // Writes after the rebase are replicated as usual.
    qemu_io(&agent.uri("root"), &["write -P 0x5c 1M 64k"]).unwrap();
    let acked = agent.wait_acked(Duration::from_secs(60)).unwrap();
    wait_stored(&ps.store_url, MACHINE, &[], acked, Duration::from_secs(120)).unwrap();
    let out = ps.failover_ok(MACHINE, "latest", &root.join("out3"));
    assert_same(&out.join("root.raw"), &agent.image("root"));
    agent.stop_clean();
}

#[test]
fn a_resized_disk_is_compared_and_every_point_keeps_its_size() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let size = 64 * MIB;
    let mut rng = Rng(0x5eed_1234_abcd_0002);
    let (ps, mut agent) = synced_random_disk(root, size, &mut rng, |ps| ps.port);
    let image = agent.image("root");

    // A point at the original size, kept as a snapshot.
    let before = agent.tag().unwrap();
    wait_stored(&ps.store_url, MACHINE, &[], before, Duration::from_secs(60)).unwrap();
    snapshot(&image, &root.join("at-64m.img"));
    agent.stop_clean();

    // Grown by 32 MiB while the agent is stopped: 8 MiB of the new space hold
    // data, and some old blocks change too.
    resize_file(&image, 96 * MIB);
    fill_random(&image, 80 * MIB, 8 * MIB, &mut rng);
    let changed = change_blocks(&image, size, 64, &mut rng);
    agent.start().unwrap();
    resync_is_exact(
        &ps,
        &agent,
        8 * MIB + changed.len() as u64 * BLOCK,
        &root.join("grown"),
    );
    snapshot(&image, &root.join("at-96m.img"));
    let log = agent.proc.as_ref().unwrap().log_text();
    assert!(
        log.contains("was resized from 67108864 to 100663296 bytes"),
        "{log}"
    );
    agent.stop_clean();

    // Shrunk to 48 MiB: nothing differs below the new end, nothing is sent.
    resize_file(&image, 48 * MIB);
    agent.start().unwrap();
    resync_is_exact(&ps, &agent, 0, &root.join("shrunk"));

    // Grown again to 96 MiB: the space past 48 MiB reads as zeros on both
    // sides, so again nothing is sent, and the image is exact.
    agent.stop_clean();
    resize_file(&image, 96 * MIB);
    agent.start().unwrap();
    resync_is_exact(&ps, &agent, 0, &root.join("regrown"));

    // Older points still recover at the size they had.
    let out = ps.failover_ok(MACHINE, &before.to_string(), &root.join("old"));
    assert_same(&out.join("root.raw"), &root.join("at-64m.img"));
    let pts = points(&ps.store_url, MACHINE, &[]).unwrap();
    let grown = pts["points"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["label"] == "checksum-resync-complete")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let out = ps.failover_ok(MACHINE, &grown, &root.join("old-grown"));
    assert_same(&out.join("root.raw"), &root.join("at-96m.img"));
    agent.stop_clean();
}

#[test]
fn a_process_server_rebuilt_without_its_cache_gets_back_what_it_had_acknowledged() {
    rebuilt_process_server(false);
}

#[test]
fn a_rebuilt_process_server_continues_before_a_gap_in_the_stored_stream() {
    rebuilt_process_server(true);
}

/// The appliance is rebuilt (same store and keys, no cache) after it had
/// acknowledged writes it never uploaded; with `gap`, a stored segment is
/// missing too (its upload was in flight).
fn rebuilt_process_server(gap: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let size = 32 * MIB;
    let mut rng = Rng(0x5eed_1234_abcd_0003);
    let (mut ps, agent) = synced_random_disk(root, size, &mut rng, |ps| ps.port);
    let config = ps.dir.join("ps.toml");
    let set_age = |age: &str| {
        let text = std::fs::read_to_string(&config).unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with("segment-max-age"))
            .unwrap()
            .to_string();
        std::fs::write(
            &config,
            text.replace(&line, &format!("segment-max-age = \"{age}\"")),
        )
        .unwrap();
    };

    // A second stored segment (a point cuts one), so that one can go missing.
    qemu_io(&agent.uri("root"), &["write -P 0x11 0 64k", "flush"]).unwrap();
    let second = agent.tag().unwrap();
    wait_stored(&ps.store_url, MACHINE, &[], second, Duration::from_secs(60)).unwrap();

    // Writes the server acknowledges but keeps in its cache (no tag, no age cut).
    ps.proc.as_mut().unwrap().stop(Duration::from_secs(30));
    set_age("1h");
    ps.start().unwrap();
    wait_for("the agent to reconnect", Duration::from_secs(60), || {
        (agent.status().ok()?["connected"] == true).then_some(())
    })
    .unwrap();
    // Data, and zeros over data the store already holds (a trim): both were
    // acknowledged, both are lost with the cache, both must come back.
    qemu_io(
        &agent.uri("root"),
        &["write -P 0x3c 8M 4M", "write -z 16M 2M", "flush"],
    )
    .unwrap();
    agent.wait_acked(Duration::from_secs(60)).unwrap();

    // The appliance is rebuilt: same store, same keys, no cache.
    ps.proc.as_mut().unwrap().stop(Duration::from_secs(30));
    std::fs::remove_dir_all(ps.dir.join("cache")).unwrap();
    let log_dir = ps.dir.join("store/machines").join(MACHINE).join("log");
    if gap {
        let mut segs: Vec<_> = std::fs::read_dir(&log_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        segs.sort();
        assert!(segs.len() >= 2, "need two segments for a gap: {segs:?}");
        std::fs::remove_file(&segs[0]).unwrap();
    }
    set_age("300ms");
    ps.start().unwrap();
    let expected = if gap {
        // Nothing before the gap: the stream restarts empty, and every
        // non-zero block (all but the 2 MiB trimmed) is sent.
        size - 2 * MIB
    } else {
        // Nothing stored has its hashes any more: every block is resent
        // (the zeroed ones as zero entries).
        size
    };
    resync_is_exact(&ps, &agent, expected, &root.join("out"));
    if gap {
        let orphaned = ps
            .dir
            .join("store/machines")
            .join(MACHINE)
            .join("orphaned/log");
        assert!(
            std::fs::read_dir(&orphaned).unwrap().count() >= 1,
            "the unreachable segments are kept under orphaned/"
        );
    }
    // Once that full resync succeeded, the hashes are known again: a second
    // one finds nothing to send.
    let out = run_ok(
        std::process::Command::new(bin("lifeboat-ps"))
            .args(["resync", "--config"])
            .arg(&config)
            .args(["--machine", MACHINE]),
        Duration::from_secs(300),
    )
    .unwrap();
    let again: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(again["block-bytes"], 0, "{again}");
    let log = agent.proc.as_ref().unwrap().log_text();
    assert!(log.contains("lost acknowledged data"), "{log}");
    assert!(
        ps.log().contains("the cache knows nothing of this machine"),
        "the process server must say it continued from the store"
    );
}

/// The seeded fault run 4: a resync planned before a restart runs while the
/// journal still holds entries from before it. The receiver answers against
/// the replica as of the entries it holds, so those must be in it before the
/// disk is compared: one landing after its region was judged equal would
/// overwrite it with data the disk no longer holds, and nothing resends it.
#[test]
fn a_resync_compares_after_the_journal_backlog_is_in_the_replica() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let size = 64 * MIB;
    let mut rng = Rng(0x5eed_0000_0004_0004);
    let (mut ps, mut agent) = synced_random_disk(root, size, &mut rng, |ps| ps.port);
    let image = agent.image("root");
    let region = 52 * MIB;
    let old = {
        use std::os::unix::fs::FileExt;
        let mut b = vec![0u8; MIB as usize];
        std::fs::File::open(&image)
            .unwrap()
            .read_exact_at(&mut b, region)
            .unwrap();
        b
    };

    // 1. While the process server is down the journal fills with a backlog
    //    (160 MiB elsewhere, then new data for one region); the agent stops.
    ps.proc.as_mut().unwrap().stop(Duration::from_secs(30));
    let source = root.join("random.bin");
    std::fs::write(&source, []).unwrap();
    fill_random(&source, 0, 16 * MIB, &mut rng);
    let src = source.display().to_string();
    let mut writes: Vec<String> = (0..10)
        .map(|i| format!("write -s {src} {} 16M", (i % 3) * 16 * MIB))
        .collect();
    writes.push(format!("write -P 0x5a {region} 1M"));
    let cmds: Vec<&str> = writes.iter().map(String::as_str).collect();
    qemu_io(&agent.uri("root"), &cmds).unwrap();
    agent.stop_clean();

    // 2. While it is stopped the region gets its old content back (the write
    //    that restored it is not in the journal, as a write the journal had no
    //    room for), and the disk grows: the agent plans a resync of all of it.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap();
        f.write_all_at(&old, region).unwrap();
        f.sync_all().unwrap();
    }
    resize_file(&image, size + MIB);
    agent.start().unwrap();
    ps.start().unwrap();

    // 3. After the backlog the replica holds the new data there: the resync
    //    must find that region (its 1 MiB is all it sends) and the point must
    //    equal the disk.
    resync_is_exact(&ps, &agent, MIB, &root.join("out"));
    agent.stop_clean();
}
