//! Initial replication of a disk that already holds data, while it is written.

use std::time::Duration;

use lifeboat_tests::*;

const MACHINE: &str = "machine-1";
const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;

/// An agent for the disk "root" of `size` bytes that holds random data
/// before protection starts, configured with `extra`, not started.
fn agent_on_random_disk(
    ps: &ProcessServer,
    root: &std::path::Path,
    size: u64,
    extra: &str,
) -> Agent {
    let certs = ps.dir.join("machines").join(MACHINE);
    let agent = Agent::configure(
        &root.join("agent"),
        MACHINE,
        &certs,
        ps.port,
        &[("root", size)],
        extra,
    )
    .unwrap();
    fill_random(&agent.image("root"), 0, size, &mut Rng(size ^ 0x5eed));
    agent
}

#[test]
fn disk_with_data_syncs_under_writes_and_every_point_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut ps = ProcessServer::init(&root.join("ps"), None, &[]).unwrap();
    ps.start().unwrap();
    // A rate limit keeps the sync running while fio writes (1 GiB at 256 MiB/s ≥ 4 s).
    let mut agent = agent_on_random_disk(&ps, root, GIB, "sync-rate-limit = 268435456");
    agent.start().unwrap();

    // Writes during the sync.
    fio_randwrite(
        &agent.uri("root"),
        &root.join("fio.json"),
        &["--bs=4k", "--iodepth=16", "--runtime=2", "--time_based"],
    )
    .unwrap();
    let during = agent.status().unwrap();
    assert_eq!(
        during["sync"][0]["state"], "initial-sync",
        "the sync should still run when fio ends: {during}"
    );
    assert!(during["sync"][0]["percent"].as_f64().unwrap() < 100.0);
    // No recovery point while the replica is not consistent.
    assert!(
        agent.tag().is_err(),
        "a tag during the initial sync must be refused"
    );
    // Nor a silently inconsistent `latest`: failover there is refused by name
    // once some of the sync is in the store, and `points` says why.
    wait_for(
        "part of the sync to be stored",
        Duration::from_secs(60),
        || {
            let p = points(&ps.store_url, MACHINE, &[]).ok()?;
            (p["stream-end"].as_u64()? > 0).then_some(())
        },
    )
    .unwrap();
    let pts = points(&ps.store_url, MACHINE, &[]).unwrap();
    assert_eq!(pts["stream-end-consistent"], false, "{pts}");
    let o = failover(
        &ps.store_url,
        MACHINE,
        "latest",
        &root.join("early"),
        &ps.kek(),
        &[],
    )
    .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "failover inside the initial sync must be refused"
    );
    assert!(
        err.contains("inside the initial sync") && err.contains("--allow-inconsistent"),
        "{err}"
    );

    agent.wait_synced(Duration::from_secs(300)).unwrap();
    let synced = agent.status().unwrap();
    let sent = synced["sync"][0]["sent-bytes"].as_u64().unwrap();
    assert!(
        sent >= GIB * 9 / 10,
        "random data must be sent, sent {sent}"
    );
    let snap1 = root.join("snap1.raw");
    snapshot(&agent.image("root"), &snap1);

    // Later writes and a second point.
    qemu_io(
        &agent.uri("root"),
        &["write -P 0x42 100M 3M", "write -z 0 1M", "flush"],
    )
    .unwrap();
    let tag2 = agent.tag().unwrap();
    let snap2 = root.join("snap2.raw");
    snapshot(&agent.image("root"), &snap2);
    qemu_io(&agent.uri("root"), &["write -P 0x43 500M 1M", "flush"]).unwrap();
    let acked = agent.wait_acked(Duration::from_secs(300)).unwrap();
    wait_stored(&ps.store_url, MACHINE, &[], acked, Duration::from_secs(300)).unwrap();

    let pts = points(&ps.store_url, MACHINE, &[]).unwrap();
    let list = pts["points"].as_array().unwrap();
    let first = &list[0];
    assert_eq!(first["label"], "initial-sync-complete", "{pts}");
    let first_id = first["id"].as_str().unwrap().to_string();

    ps.failover_ok(MACHINE, &first_id, &root.join("o1"));
    assert_same(&root.join("o1/root.raw"), &snap1);
    ps.failover_ok(MACHINE, &tag2.to_string(), &root.join("o2"));
    assert_same(&root.join("o2/root.raw"), &snap2);
    ps.failover_ok(MACHINE, "latest", &root.join("o3"));
    assert_same(&root.join("o3/root.raw"), &agent.image("root"));
}

#[test]
fn agent_killed_during_initial_sync_resumes_where_it_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut ps = ProcessServer::init(&root.join("ps"), None, &[]).unwrap();
    ps.start().unwrap();
    let size = 256 * MIB;
    let mut agent = agent_on_random_disk(&ps, root, size, "sync-rate-limit = 33554432");
    agent.start().unwrap();
    // Let it pass a few checkpoints (every 2 s), then kill it.
    wait_for("sync progress past 25%", Duration::from_secs(60), || {
        let s = agent.status().ok()?;
        (s["sync"][0]["percent"].as_f64()? > 25.0).then_some(())
    })
    .unwrap();
    agent.proc.as_mut().unwrap().kill9();
    agent.start().unwrap();
    let resumed = agent.status().unwrap();
    let from = resumed["sync"][0]["resumed-from"].as_u64().unwrap();
    assert!(
        from >= size / 8,
        "the sync restarted from {from}, not from its checkpoint"
    );
    agent.wait_synced(Duration::from_secs(300)).unwrap();
    let sent_after_restart = agent.status().unwrap()["sync"][0]["sent-bytes"]
        .as_u64()
        .unwrap();
    assert!(
        sent_after_restart <= size - from,
        "after the restart {sent_after_restart} bytes were sent, more than the {} left",
        size - from
    );
    let acked = agent.wait_acked(Duration::from_secs(120)).unwrap();
    wait_stored(&ps.store_url, MACHINE, &[], acked, Duration::from_secs(120)).unwrap();
    ps.failover_ok(MACHINE, "latest", &root.join("out"));
    assert_same(&root.join("out/root.raw"), &agent.image("root"));
}
