//! Checksum resync: the agent cannot tell what changed (the image was changed
//! behind its back and its activity logs are gone), `lifeboat-ps resync` finds
//! the differing 4 KiB blocks by their hashes and sends only those.

use std::process::Command;
use std::time::Duration;

use lifeboat_tests::*;

const MACHINE: &str = "machine-1";
const MIB: u64 = 1024 * 1024;
const BLOCK: u64 = 4096;

#[test]
fn checksum_resync_sends_only_changed_blocks_and_the_point_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let size = 64 * MIB;
    // The disk holds data before protection starts: the initial sync sends it.
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (ps, mut agent) = synced_random_disk(root, size, &mut rng, |ps| ps.port);
    agent.stop_clean();

    // 1 % of the blocks change behind the agent's back.
    let changed = change_blocks(&agent.image("root"), size, size / BLOCK / 100, &mut rng);
    let changed_bytes = changed.len() as u64 * BLOCK;
    // Without activity logs the agent cannot know what changed.
    for e in std::fs::read_dir(agent.dir.join("state")).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with("al-") && name.ends_with(".rec") {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
    agent.start().unwrap();
    wait_for("the agent to connect", Duration::from_secs(60), || {
        let s = agent.status().ok()?;
        (s["connected"] == true && s["state"] == "streaming").then_some(())
    })
    .unwrap();
    let before = agent.status().unwrap();
    assert_eq!(
        before["resync-bytes"], 0,
        "nothing may be resent before the checksum resync: {before}"
    );

    let out = run_ok(
        Command::new(bin("lifeboat-ps"))
            .args(["resync", "--config"])
            .arg(ps.dir.join("ps.toml"))
            .args(["--machine", MACHINE]),
        Duration::from_secs(300),
    )
    .unwrap();
    let done: serde_json::Value = serde_json::from_str(out.lines().last().unwrap())
        .unwrap_or_else(|e| panic!("resync output {out:?}: {e}"));
    let hash_bytes = done["hash-bytes"].as_u64().unwrap();
    let block_bytes = done["block-bytes"].as_u64().unwrap();
    assert_eq!(done["hashed-bytes"].as_u64().unwrap(), size, "{done}");
    assert_eq!(
        block_bytes, changed_bytes,
        "exactly the changed blocks are sent: {done}"
    );
    let sent = hash_bytes + block_bytes;
    assert!(
        sent as f64 <= 1.3 * changed_bytes as f64,
        "sent {sent} bytes ({hash_bytes} of hashes) for {changed_bytes} changed bytes: {done}"
    );
    let s = agent.status().unwrap();
    assert_eq!(s["state"], "streaming", "{s}");
    assert_eq!(
        s["checksum-resync"]["block-bytes"].as_u64(),
        Some(block_bytes),
        "{s}"
    );
    assert_eq!(
        s["checksum-resync"]["blocks-sent"].as_u64(),
        Some(changed.len() as u64),
        "{s}"
    );

    ps.assert_point_exact(
        MACHINE,
        "checksum-resync-complete",
        done["tag-seq"].as_u64().unwrap(),
        &agent.image("root"),
        &root.join("out"),
    );
    // The resync's window is marked in the store: `latest` inside it would
    // not have been crash-consistent.
    let tag_seq = done["tag-seq"].as_u64().unwrap();
    let pts = points(&ps.store_url, MACHINE, &[]).unwrap();
    let marked = pts["inconsistent-from"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["label"] == "checksum resync" && m["seq"].as_u64().unwrap() < tag_seq);
    assert!(
        marked,
        "no checksum resync mark before seq {tag_seq}: {pts}"
    );
    assert_eq!(pts["stream-end-consistent"], true, "{pts}");

    // A second resync finds nothing to send.
    let out = run_ok(
        Command::new(bin("lifeboat-ps"))
            .args(["resync", "--config"])
            .arg(ps.dir.join("ps.toml"))
            .args(["--machine", MACHINE, "--disk", "root"]),
        Duration::from_secs(300),
    )
    .unwrap();
    let again: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(again["block-bytes"], 0, "{again}");
    assert_eq!(
        again["hash-bytes"].as_u64(),
        Some(size / MIB * 16),
        "only region hashes when nothing differs: {again}"
    );
    // Errors name what failed.
    let o = run_timeout(
        Command::new(bin("lifeboat-ps"))
            .args(["resync", "--config"])
            .arg(ps.dir.join("ps.toml"))
            .args(["--machine", MACHINE, "--disk", "nope"]),
        Duration::from_secs(60),
    )
    .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no disk \"nope\""),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
