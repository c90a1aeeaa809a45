//! Every recovery point records each disk's checksum, hashed by the agent
//! from its own disk while writes go on (`agent/src/pointsum.rs`): the
//! recorded sum equals `lifeboat-mt checksum` of the source at a quiet
//! point, and at points taken while another connection keeps writing odd
//! sizes across chunk boundaries, failover and verify find the recovered
//! images equal to what the agent hashed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lifeboat_tests::nbd::NbdClient;
use lifeboat_tests::*;

const MACHINE: &str = "machine-1";
const MIB: u64 = 1024 * 1024;
const DISK: u64 = 40 * MIB + 12345;

/// `lifeboat-mt checksum FILE`: the sum it prints.
fn checksum(path: &std::path::Path) -> String {
    let out = run_ok(
        std::process::Command::new(bin("lifeboat-mt"))
            .arg("checksum")
            .arg(path),
        Duration::from_secs(60),
    )
    .unwrap();
    out.split_whitespace().next().unwrap().to_string()
}

/// The sum recorded at `seq` for disk "root", once the record is stored.
fn recorded(store_url: &str, seq: u64) -> String {
    let root = store_url.strip_prefix("file://").unwrap();
    let path = std::path::Path::new(root)
        .join("machines")
        .join(MACHINE)
        .join("sums")
        .join(format!("{seq:016x}.json"));
    let text = wait_for(
        "the point's checksums in the store",
        Duration::from_secs(60),
        || std::fs::read_to_string(&path).ok(),
    )
    .unwrap();
    let signed: serde_json::Value = serde_json::from_str(&text).unwrap();
    let rec: serde_json::Value = serde_json::from_str(signed["record"].as_str().unwrap()).unwrap();
    assert_eq!(rec["point"], seq);
    let d = &rec["disks"][0];
    assert_eq!(d["id"], "root");
    assert_eq!(d["size"], DISK);
    d["sum"].as_str().unwrap().to_string()
}

#[test]
fn points_carry_the_source_checksum_and_failover_matches_it_under_concurrent_writes() {
    let root = tempfile::tempdir().unwrap();
    let (ps, agent) = start_pair(root.path(), &[("root", DISK)], "").unwrap();
    let sock = agent.disks[0].2.clone();
    let mut nbd = NbdClient::connect(&sock, "root").unwrap();
    let mut rng = Rng(77);

    // A quiet point: the recorded sum is the source's.
    let mut buf = vec![0u8; 3 * MIB as usize];
    for (off, len) in [
        (0u64, 1usize),
        (MIB - 1, 2),
        (5 * MIB + 17, 2 * MIB as usize + 3),
    ] {
        rng.fill(&mut buf[..len]);
        nbd.write(off, &buf[..len], 0).unwrap();
    }
    // The disk's short last chunk too.
    nbd.write(DISK - 100, &buf[..100], 0).unwrap();
    nbd.flush().unwrap();
    let quiet = agent.tag().unwrap();
    let source = checksum(&agent.image("root"));
    assert_eq!(
        recorded(&ps.store_url, quiet),
        source,
        "the checksum recorded at the quiet point is not the source disk's"
    );

    // Busy points: another connection writes odd sizes at odd offsets
    // (crossing chunk edges) while points are taken. The writer is paced
    // (about 1 MiB per 15 ms at most) so that it cannot outrun the
    // agent's 256 MiB journal on a loaded machine: a full journal puts
    // the agent in the bitmap state, where it rightly refuses points.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, sock) = (stop.clone(), sock.clone());
        std::thread::spawn(move || {
            let mut nbd = NbdClient::connect(&sock, "root").unwrap();
            let mut rng = Rng(91);
            let mut buf = vec![0u8; 2 * MIB as usize + 4096];
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let len = 1 + (rng.next_u64() % (buf.len() as u64)) as usize;
                let off = rng.next_u64() % (DISK - len as u64);
                rng.fill(&mut buf[..len]);
                if n % 7 == 3 {
                    nbd.write_zeroes(off, len as u32, 0).unwrap();
                } else {
                    nbd.write(off, &buf[..len], 0).unwrap();
                }
                n += 1;
                std::thread::sleep(Duration::from_millis(15));
            }
            nbd.flush().unwrap();
            n
        })
    };
    let mut busy = Vec::new();
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(400));
        busy.push(agent.tag().unwrap());
    }
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().unwrap();
    assert!(writes > 20, "the writer wrote only {writes} times");
    agent.wait_acked(Duration::from_secs(120)).unwrap();

    let out = root.path().join("out");
    for &seq in &busy {
        let want = recorded(&ps.store_url, seq);
        let dir = out.join(seq.to_string());
        let o = failover(
            &ps.store_url,
            MACHINE,
            &seq.to_string(),
            &dir,
            &ps.kek(),
            &[],
        )
        .unwrap();
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "failover at {seq}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            stdout.contains("checksums match the source's at the point"),
            "failover at {seq} did not compare with the recorded checksum: {stdout}"
        );
        assert_eq!(checksum(&dir.join("root.raw")), want);
        std::fs::remove_dir_all(&dir).unwrap();
    }
    // verify compares too, without writing a recovery target.
    let o = run_timeout(
        std::process::Command::new(bin("lifeboat-mt"))
            .args(["verify", "--store", &ps.store_url, "--machine", MACHINE])
            .args(["--point", &busy[2].to_string()])
            .arg("--key-file")
            .arg(ps.kek()),
        Duration::from_secs(120),
    )
    .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout.contains("checksums match the source's at the point"),
        "{stdout}"
    );
    // Every point with a record is listed as carrying checksums.
    let listed = points(&ps.store_url, MACHINE, &[]).unwrap();
    for p in listed["points"].as_array().unwrap() {
        let seq = p["seq"].as_u64().unwrap();
        if busy.contains(&seq) || seq == quiet {
            assert_eq!(p["checksums"], true, "point {seq}: {p}");
        }
    }
}
