//! The master target server (issue 9, item 3): `lifeboat-mt serve` takes an
//! agent's stream over mutual TLS and applies it to a target image in seq
//! order; killed with -9 while fio writes, it resumes after its applied
//! position and ends byte-equal to the source; after the agent lost its
//! state, a checksum resync against the target's own blocks sends exactly
//! the blocks that differ; a machine or disk it has no target for is
//! refused by name.

use std::path::Path;
use std::time::Duration;

use lifeboat_tests::*;

const MIB: u64 = 1024 * 1024;
const BLOCK: u64 = 4096;

/// mt.toml for machine-1's disk `root` onto `target`, with the process
/// server's CA and server certificate, listening on `port`.
fn write_config(root: &Path, ps: &ProcessServer, port: u16, target: &Path) -> std::path::PathBuf {
    let config = root.join("mt.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\nca-cert = \"{d}/ca.pem\"\nserver-cert = \"{d}/server.pem\"\n\
             server-key = \"{d}/server.key\"\nstate-dir = \"{s}\"\n\n[[machine]]\nname = \"machine-1\"\n\
             disks = {{ root = \"{t}\" }}\n",
            d = ps.dir.display(),
            s = root.join("mt-state").display(),
            t = target.display()
        ),
    )
    .unwrap();
    config
}

#[test]
fn the_master_target_applies_resumes_after_kill9_and_resyncs_as_the_replica() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let size = 64 * MIB;
    let mut rng = Rng(0x6d74_0009);
    // The process server's CA and certificates; it does not run.
    let ps = ProcessServer::init(&root.join("ps"), None, &[]).unwrap();
    let port = free_port();
    let target = root.join("onprem").join("root.img");
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    let config = write_config(root, &ps, port, &target);
    let mut mt = start_master_target(&config, &root.join("mt-1.log"));
    let certs = ps.dir.join("machines").join("machine-1");
    let mut agent = Agent::configure(
        &root.join("agent"),
        "machine-1",
        &certs,
        port,
        &[("root", size)],
        "",
    )
    .unwrap();
    fill_random(&agent.image("root"), 0, 24 * MIB, &mut rng);
    agent.start().unwrap();
    agent.wait_synced(Duration::from_secs(120)).unwrap();

    // fio writes of every size and 512-byte alignment; the master target is
    // killed -9 among them and started again.
    let mut fio = spawn_fio_randwrite(
        &agent.uri("root"),
        &root.join("fio.log"),
        &[
            "--bsrange=512-128k",
            "--blockalign=512",
            "--iodepth=8",
            "--time_based",
            "--runtime=6",
        ],
    );
    std::thread::sleep(Duration::from_secs(2));
    mt.kill9();
    std::thread::sleep(Duration::from_millis(500));
    let mut mt = start_master_target(&config, &root.join("mt-2.log"));
    wait_for("fio to finish", Duration::from_secs(120), || {
        (!fio.is_running()).then_some(())
    })
    .unwrap();
    assert!(
        fio.log_text().contains("err= 0"),
        "fio failed:\n{}",
        fio.log_text()
    );
    // A backlog past the journal's bound while the target was away goes to
    // `bitmap`: its dirty regions are in the stream once `streaming` is back.
    wait_for(
        "the agent streaming again",
        Duration::from_secs(180),
        || (agent.status().ok()?["state"] == "streaming").then_some(()),
    )
    .unwrap();
    agent.wait_acked(Duration::from_secs(120)).unwrap();
    assert_same(&target, &agent.image("root"));
    let resumed = mt.log_text();
    let from: u64 = resumed
        .split("applying to 1 disk(s) from seq ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no resume line:\n{resumed}"));
    assert!(
        from > 1,
        "the restarted master target did not resume: {resumed}"
    );

    // The agent loses its state while 40 blocks change behind its back: the
    // checksum resync compares with the target's own blocks.
    agent.stop_clean();
    let changed = change_blocks(&agent.image("root"), size, 40, &mut rng);
    std::fs::remove_dir_all(agent.dir.join("state")).unwrap();
    agent.start().unwrap();
    let report = agent
        .wait_checksum_resync(Duration::from_secs(180))
        .unwrap();
    assert_eq!(report["error"], "", "{report}");
    assert_eq!(
        report["block-bytes"].as_u64(),
        Some(changed.len() as u64 * BLOCK),
        "exactly the changed blocks are sent: {report}"
    );
    agent.wait_acked(Duration::from_secs(60)).unwrap();
    assert_same(&target, &agent.image("root"));

    // A machine without targets is refused by name; nothing is applied.
    let certs2 = ps.issue_cert("machine-2").unwrap();
    let mut other = Agent::configure(
        &root.join("agent-2"),
        "machine-2",
        &certs2,
        port,
        &[("root", MIB)],
        "",
    )
    .unwrap();
    other.start().unwrap();
    wait_for("the refusal", Duration::from_secs(30), || {
        mt.log_text()
            .contains("machine machine-2 is not in this master target's config")
            .then_some(())
    })
    .unwrap();
    other.stop_clean();
    agent.stop_clean();
    assert!(
        mt.stop(Duration::from_secs(20)),
        "lifeboat-mt serve did not stop on SIGTERM"
    );
}

/// The failback direction: the recovered machine's agent, with
/// `initial-copy = "checksum"`, streams to a master target whose target is
/// the original disk, which already holds the disk as it was at the
/// failover; only the blocks written on the recovered side since are sent,
/// and the original disk ends byte-equal to the recovered one.
#[test]
fn a_failback_onto_the_original_disk_sends_only_what_changed() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let size = 64 * MIB;
    let mut rng = Rng(0x6662_0004);
    let ps = ProcessServer::init(&root.join("ps"), None, &[]).unwrap();
    let port = free_port();
    // The recovered disk: the failover's image, then 60 blocks written on
    // the recovered side; the original keeps the failover's content.
    let mut agent = Agent::configure(
        &root.join("recovered"),
        "machine-1",
        &ps.dir.join("machines").join("machine-1"),
        port,
        &[("root", size)],
        "initial-copy = \"checksum\"\n",
    )
    .unwrap();
    fill_random(&agent.image("root"), 0, 40 * MIB, &mut rng);
    let original = root.join("onprem").join("root.img");
    std::fs::create_dir_all(original.parent().unwrap()).unwrap();
    std::fs::copy(agent.image("root"), &original).unwrap();
    let changed = change_blocks(&agent.image("root"), size, 60, &mut rng);
    let config = write_config(root, &ps, port, &original);
    let mut mt = start_master_target(&config, &root.join("mt.log"));
    agent.start().unwrap();
    let report = agent
        .wait_checksum_resync(Duration::from_secs(180))
        .unwrap();
    assert_eq!(report["error"], "", "{report}");
    assert_eq!(
        report["block-bytes"].as_u64(),
        Some(changed.len() as u64 * BLOCK),
        "only the blocks written since the failover are sent: {report}"
    );
    let s = agent.status().unwrap();
    let synced = s["sync"][0]["sent-bytes"].as_u64().unwrap();
    assert!(synced < MIB, "the disk was copied ({synced} bytes): {s}");
    agent.wait_acked(Duration::from_secs(60)).unwrap();
    assert_same(&original, &agent.image("root"));
    agent.stop_clean();
    mt.stop(Duration::from_secs(20));
}
