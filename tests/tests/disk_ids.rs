//! Disks are identified by id end to end: swapping `[[disk]]` blocks changes
//! nothing, an added disk gets an initial sync, and a removed disk stays in
//! the history with its points. Every failover is compared byte for byte.

use std::time::Duration;

use lifeboat_tests::*;

const MACHINE: &str = "machine-1";
const MIB: u64 = 1024 * 1024;

/// Reconfigures the agent (same directory, images kept) with `disks` in this
/// order and starts it.
fn restart_with(agent: &mut Agent, ps: &ProcessServer, disks: &[(&str, u64)]) {
    agent.stop_clean();
    let certs = ps.dir.join("machines").join(MACHINE);
    *agent = Agent::configure(&agent.dir.clone(), MACHINE, &certs, ps.port, disks, "").unwrap();
    agent.start().unwrap();
    agent.wait_synced(Duration::from_secs(120)).unwrap();
}

/// Tags, waits until the point is stored, and snapshots every disk image.
fn tag_and_snapshot(
    ps: &ProcessServer,
    agent: &Agent,
    root: &std::path::Path,
    name: &str,
) -> (u64, Vec<(String, std::path::PathBuf)>) {
    agent.wait_acked(Duration::from_secs(120)).unwrap();
    let seq = agent.tag().unwrap();
    wait_stored(&ps.store_url, MACHINE, &[], seq, Duration::from_secs(120)).unwrap();
    let mut snaps = Vec::new();
    for (id, img, _) in &agent.disks {
        let snap = root.join(format!("{name}-{id}.img"));
        snapshot(img, &snap);
        snaps.push((id.clone(), snap));
    }
    (seq, snaps)
}

fn assert_point(
    ps: &ProcessServer,
    seq: u64,
    snaps: &[(String, std::path::PathBuf)],
    out: &std::path::Path,
) {
    ps.failover_ok(MACHINE, &seq.to_string(), out);
    for (id, snap) in snaps {
        assert_same(&out.join(format!("{id}.raw")), snap);
    }
}

#[test]
fn reordered_added_and_removed_disks_keep_their_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (ps, mut agent) = start_pair(root, &[("alpha", 16 * MIB), ("beta", 24 * MIB)], "").unwrap();
    qemu_io(&agent.uri("alpha"), &["write -P 0xaa 0 4M", "flush"]).unwrap();
    qemu_io(&agent.uri("beta"), &["write -P 0xbb 1M 4M", "flush"]).unwrap();
    let (p1, s1) = tag_and_snapshot(&ps, &agent, root, "p1");

    // Swapped blocks: each disk keeps its data and its number.
    restart_with(&mut agent, &ps, &[("beta", 24 * MIB), ("alpha", 16 * MIB)]);
    qemu_io(&agent.uri("alpha"), &["write -P 0xa1 8M 2M", "flush"]).unwrap();
    qemu_io(&agent.uri("beta"), &["write -P 0xb1 9M 2M", "flush"]).unwrap();
    let (p2, s2) = tag_and_snapshot(&ps, &agent, root, "p2");
    assert_point(&ps, p2, &s2, &root.join("out2"));
    assert_point(&ps, p1, &s1, &root.join("out1"));

    // An added disk (with data already on it) gets an initial sync.
    let gamma = agent.dir.join("gamma.img");
    std::fs::File::create(&gamma)
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    fill_random(&gamma, 0, 8 * MIB, &mut Rng(0xd15c));
    restart_with(
        &mut agent,
        &ps,
        &[("beta", 24 * MIB), ("gamma", 8 * MIB), ("alpha", 16 * MIB)],
    );
    let (p3, s3) = tag_and_snapshot(&ps, &agent, root, "p3");
    assert_point(&ps, p3, &s3, &root.join("out3"));

    // A removed disk stays in the history: its old points still recover it,
    // and later points keep it as it was.
    let beta_last = s3.iter().find(|(id, _)| id == "beta").unwrap().1.clone();
    restart_with(&mut agent, &ps, &[("gamma", 8 * MIB), ("alpha", 16 * MIB)]);
    qemu_io(&agent.uri("alpha"), &["write -P 0xa2 12M 1M", "flush"]).unwrap();
    let (p4, mut s4) = tag_and_snapshot(&ps, &agent, root, "p4");
    s4.push(("beta".into(), beta_last));
    assert_point(&ps, p4, &s4, &root.join("out4"));
    assert_point(&ps, p2, &s2, &root.join("out2b"));
}
