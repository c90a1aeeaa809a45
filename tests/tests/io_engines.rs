//! Failover newest first, through each write engine: a base, then a shrink
//! and a grow (what the shrink cut off must come back as zeros, not as the
//! data written there before), then many overlapping writes of odd sizes and
//! alignments (1, 511, 4097 bytes and more) with trims and write-zeroes over
//! NBD, recovered with `--io-engine portable`, `uring` and `auto`: each image
//! equals the source byte for byte.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use lifeboat_tests::nbd::NbdClient;
use lifeboat_tests::*;

const MACHINE: &str = "machine-1";
const MIB: u64 = 1024 * 1024;

/// Writes of odd sizes at odd offsets, overlapping each other, with trims
/// and write-zeroes among them, all inside the first `size` bytes.
fn scribble(nbd: &mut NbdClient, rng: &mut Rng, size: u64, count: usize) {
    let mut buf = vec![0u8; 70_000];
    for i in 0..count {
        let len = [
            1u64,
            511,
            4097,
            4096,
            65_536 + 3,
            rng.next_u64() % 70_000 + 1,
        ][i % 6];
        let offset = rng.next_u64() % (size - len);
        match rng.next_u64() % 10 {
            0 => nbd.trim(offset, len as u32).unwrap(),
            1 => nbd.write_zeroes(offset, len as u32, 0).unwrap(),
            _ => {
                rng.fill(&mut buf[..len as usize]);
                nbd.write(offset, &buf[..len as usize], 0).unwrap();
            }
        }
        // Now and then the same place again, a little shifted.
        if i % 7 == 0 {
            let again = (offset + len / 2).min(size - 511);
            rng.fill(&mut buf[..511]);
            nbd.write(again, &buf[..511], 0).unwrap();
        }
    }
    nbd.flush().unwrap();
}

fn failover_with(ps: &ProcessServer, engine: &str, out: &Path) -> String {
    let o = run_timeout(
        Command::new(bin("lifeboat-mt"))
            .args(["failover", "--store", &ps.store_url, "--machine", MACHINE])
            .args([
                "--point",
                "latest",
                "--io-engine",
                engine,
                "--json",
                "--out",
            ])
            .arg(out)
            .arg("--key-file")
            .arg(ps.kek()),
        Duration::from_secs(300),
    )
    .unwrap();
    assert!(
        o.status.success(),
        "failover with --io-engine {engine}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        report["base"].as_u64().is_some() && report["segments_read"].as_u64() > Some(0),
        "segments over a base: {report}"
    );
    report["io-engine"]
        .as_str()
        .or_else(|| report["io_engine"].as_str())
        .unwrap_or_default()
        .to_string()
}

#[test]
fn failover_is_byte_equal_with_the_uring_and_the_portable_engine() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let size = 12 * MIB + 3000;
    let (mut ps, mut agent) = start_pair(r, &[("root", size)], "").unwrap();
    let cfg = ps.dir.join("ps.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    // The process server again, with retention folding after `keep`.
    let restart_keeping = |ps: &mut ProcessServer, keep: &str| {
        ps.proc.as_mut().unwrap().stop(Duration::from_secs(30));
        let retention = format!("\n[retention]\nkeep = \"{keep}\"\nfine-window = \"{keep}\"\ntiers = []\ncompact-every = \"1s\"\nreader-grace = \"0s\"\n");
        std::fs::write(&cfg, format!("{text}{retention}")).unwrap();
        ps.start().unwrap();
    };
    restart_keeping(&mut ps, "10s");
    let image = agent.image("root");
    let mut rng = Rng(8_007);
    let sock = agent.disks[0].2.clone();
    let mut nbd = NbdClient::connect(&sock, "root").unwrap();
    let mut buf = vec![0u8; MIB as usize];
    for i in 0..size / MIB {
        rng.fill(&mut buf);
        nbd.write(i * MIB, &buf, 0).unwrap();
    }
    scribble(&mut nbd, &mut rng, size, 200);
    let a = agent.tag().unwrap();
    wait_for(
        "a base holding the first point",
        Duration::from_secs(120),
        || {
            let p = points(&ps.store_url, MACHINE, &[]).ok()?;
            (p["base"]["seq"].as_u64().unwrap_or(0) >= a).then_some(())
        },
    )
    .unwrap();
    // From here on the stream stays in segments over that base.
    restart_keeping(&mut ps, "1h");
    // Writes, also past where the disk is about to end.
    scribble(&mut nbd, &mut rng, size, 300);
    drop(nbd);
    // Shrunk, then grown again while the agent is stopped: the grown part
    // reads as zeros on the source, so it must on the replica.
    for new_size in [5 * MIB + 777, 9 * MIB + 4097] {
        agent.stop_clean();
        resize_file(&image, new_size);
        agent.start().unwrap();
        agent
            .wait_checksum_resync(Duration::from_secs(120))
            .unwrap();
    }
    let size = 9 * MIB + 4097;
    let mut nbd = NbdClient::connect(&sock, "root").unwrap();
    scribble(&mut nbd, &mut rng, size, 400);
    drop(nbd);
    let end = agent.tag().unwrap();
    wait_stored(&ps.store_url, MACHINE, &[], end, Duration::from_secs(60)).unwrap();

    for engine in ["portable", "uring", "auto"] {
        let out = r.join(format!("out-{engine}"));
        let used = failover_with(&ps, engine, &out);
        if engine != "auto" {
            assert!(
                used.starts_with(if engine == "uring" {
                    "io_uring"
                } else {
                    "portable"
                }),
                "{engine}: {used}"
            );
        }
        assert_same(&out.join("root.raw"), &image);
    }
}
