//! Checksum resync: the agent cannot tell what changed (the image was changed
//! behind its back and its activity logs are gone), `lifeboat-ps resync` finds
//! the differing 4 KiB blocks by their hashes and sends only those.

use std::process::Command;
use std::time::Duration;

use lifeboat_tests::nbd::NbdClient;
use lifeboat_tests::*;

const MACHINE: &str = "machine-1";
const MIB: u64 = 1024 * 1024;
const BLOCK: u64 = 4096;

/// Restarts a stopped agent without its activity logs: it cannot know what
/// changed while it was stopped. Returns once it streams again.
fn restart_forgetting(agent: &mut Agent) {
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
}

/// The point the resync `done` closed with recovers the agent's disk exactly.
fn assert_resync_point_exact(
    ps: &ProcessServer,
    done: &serde_json::Value,
    agent: &Agent,
    root: &std::path::Path,
) {
    ps.assert_point_exact(
        MACHINE,
        "checksum-resync-complete",
        done["tag-seq"].as_u64().unwrap(),
        &agent.image("root"),
        &root.join("out"),
    );
}

/// `lifeboat-ps resync --machine machine-1 [args]`: its closing report.
fn resync(ps: &ProcessServer, args: &[&str]) -> serde_json::Value {
    let out = run_ok(
        Command::new(bin("lifeboat-ps"))
            .args(["resync", "--config"])
            .arg(ps.dir.join("ps.toml"))
            .args(["--machine", MACHINE])
            .args(args),
        Duration::from_secs(300),
    )
    .unwrap();
    serde_json::from_str(out.lines().last().unwrap())
        .unwrap_or_else(|e| panic!("resync output {out:?}: {e}"))
}

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
    restart_forgetting(&mut agent);
    let before = agent.status().unwrap();
    assert_eq!(
        before["resync-bytes"], 0,
        "nothing may be resent before the checksum resync: {before}"
    );

    let done = resync(&ps, &[]);
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

    assert_resync_point_exact(&ps, &done, &agent, root);
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
    let again = resync(&ps, &["--disk", "root"]);
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

/// Writers of less than 4 KiB (databases, 512-byte sectors): the receiver
/// cannot hash a block from a partial write, so the agent sends the block's
/// hash after it. After 2000 random 512-byte-aligned writes and zeroings of
/// 512–3584 bytes from two connections at once, half of them into the same
/// 16 blocks, and writes into the disk's short last block, a checksum resync
/// resends exactly the 4 blocks changed behind the agent's back, not every
/// block such a write touched, and also those of the changed blocks that
/// sub-4 KiB writes went into afterwards.
#[test]
fn after_sub_4k_writes_a_checksum_resync_resends_only_what_changed() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let size = 16 * MIB + 1536; // the last block holds 1536 bytes
    let mut rng = Rng(0x5b4_0512);
    let (ps, mut agent) = synced_random_disk(root, size, &mut rng, |ps| ps.port);
    let sock = agent.disks[0].2.clone();
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let mut nbd = NbdClient::connect(&sock, "root").unwrap();
                let mut rng = Rng(0xa11 + w);
                let mut buf = vec![0u8; 3584];
                for i in 0..1000u64 {
                    let len = 512 * (1 + rng.next_u64() % 7);
                    let span = if i % 2 == 0 { 16 * BLOCK } else { size };
                    let off = rng.next_u64() % ((span - len) / 512 + 1) * 512;
                    if i % 10 == 9 {
                        nbd.write_zeroes(off, len as u32, 0).unwrap();
                    } else {
                        rng.fill(&mut buf[..len as usize]);
                        nbd.write(off, &buf[..len as usize], 0).unwrap();
                    }
                }
                nbd.write(size - 1024, &buf[..512], 0).unwrap();
                nbd.flush().unwrap();
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    agent.wait_acked(Duration::from_secs(120)).unwrap();
    agent.stop_clean();

    let changed = change_blocks(&agent.image("root"), size, 4, &mut rng);
    let changed_bytes = changed.len() as u64 * BLOCK;
    restart_forgetting(&mut agent);
    // Sub-4 KiB writes into two of the changed blocks: the replica's rest of
    // those blocks is not the disk's, so they must still be resent.
    let mut nbd = NbdClient::connect(&sock, "root").unwrap();
    for &b in changed.iter().take(2) {
        nbd.write(b * BLOCK + 1024, &[0x5a; 512], 0).unwrap();
    }
    nbd.flush().unwrap();
    drop(nbd);
    agent.wait_acked(Duration::from_secs(120)).unwrap();
    let done = resync(&ps, &[]);
    assert_eq!(done["hashed-bytes"].as_u64(), Some(size), "{done}");
    // The disk's short last block (1536 bytes) is resent too: the receiver
    // never knows its hash, since an entry does not say that it ends at the
    // disk's end (a known gap, 1 block per disk per resync).
    assert_eq!(
        done["block-bytes"].as_u64(),
        Some(changed_bytes + size % BLOCK),
        "only the {} changed blocks (and the short last one) may be resent after sub-4 KiB writes: {done}",
        changed.len()
    );
    assert_resync_point_exact(&ps, &done, &agent, root);
}
