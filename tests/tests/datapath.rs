//! End-to-end: real NBD clients write through the agent, the process server
//! stores the stream, and `lifeboat-mt failover` must give images byte-equal to
//! the source disk at each recovery point.

use std::process::Command;
use std::time::Duration;

use lifeboat_tests::*;

const MACHINE: &str = "machine-1";
const MIB: u64 = 1024 * 1024;

struct Setup {
    _tmp: tempfile::TempDir,
    root: std::path::PathBuf,
    ps: ProcessServer,
    agent: Agent,
    options: Vec<String>,
}

fn setup(disks: &[(&str, u64)], store: Option<&str>, store_opts: &[(String, String)]) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let pairs: Vec<(&str, &str)> = store_opts
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut ps = ProcessServer::init(&root.join("ps"), store, &pairs).unwrap();
    ps.start().unwrap();
    let certs = ps.dir.join("machines").join(MACHINE);
    let mut agent =
        Agent::configure(&root.join("agent"), MACHINE, &certs, ps.port, disks, "").unwrap();
    agent.start().unwrap();
    agent.wait_synced(Duration::from_secs(120)).unwrap();
    let options = store_opts.iter().map(|(k, v)| format!("{k}={v}")).collect();
    Setup {
        _tmp: tmp,
        root,
        ps,
        agent,
        options,
    }
}

impl Setup {
    /// Failover at `point` into a fresh directory; panics with the tool's output on failure.
    fn failover(&self, point: &str, name: &str) -> std::path::PathBuf {
        let out = self.root.join(name);
        let o = failover(
            &self.ps.store_url,
            MACHINE,
            point,
            &out,
            &self.ps.kek(),
            &self.options,
        )
        .unwrap();
        assert!(
            o.status.success(),
            "failover at {point} failed:\n{}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        out
    }

    fn wait_all_stored(&self) -> u64 {
        let acked = self.agent.wait_acked(Duration::from_secs(120)).unwrap();
        wait_stored(
            &self.ps.store_url,
            MACHINE,
            &self.options,
            acked,
            Duration::from_secs(120),
        )
        .unwrap();
        acked
    }
}

/// qemu-io patterns, overlapping rewrites, write-zeroes and discard on two disks;
/// failover at an earlier crash-consistent tag and at `latest`.
fn qemu_io_scenario(s: &Setup) {
    let a = s.agent.uri("root");
    let b = s.agent.uri("data");
    qemu_io(
        &a,
        &["write -P 0xab 0 1M", "write -P 0x11 3M 512k", "flush"],
    )
    .unwrap();
    qemu_io(&b, &["write -P 0xcd 1M 2M", "flush"]).unwrap();
    let tag = s.agent.tag().unwrap();
    let snap = s.root.join("snap-tag");
    std::fs::create_dir_all(&snap).unwrap();
    snapshot(&s.agent.image("root"), &snap.join("root.raw"));
    snapshot(&s.agent.image("data"), &snap.join("data.raw"));

    // After the tag: overwrite part of the first pattern, zero and discard ranges.
    qemu_io(
        &a,
        &[
            "write -P 0x22 512k 1M",
            "write -z 3M 64k",
            "discard 3M 128k",
            "write -P 0x33 7M 4k",
            "flush",
        ],
    )
    .unwrap();
    qemu_io(&b, &["write -P 0xee 0 4k", "write -z 2M 1M", "flush"]).unwrap();
    s.wait_all_stored();

    let at_tag = s.failover(&tag.to_string(), "out-tag");
    assert_same(&at_tag.join("root.raw"), &snap.join("root.raw"));
    assert_same(&at_tag.join("data.raw"), &snap.join("data.raw"));
    let latest = s.failover("latest", "out-latest");
    assert_same(&latest.join("root.raw"), &s.agent.image("root"));
    assert_same(&latest.join("data.raw"), &s.agent.image("data"));

    // The tag is listed as a crash-consistent point.
    let p = points(&s.ps.store_url, MACHINE, &s.options).unwrap();
    let listed = p["points"].as_array().unwrap();
    assert!(
        listed
            .iter()
            .any(|x| x["seq"] == tag && x["kind"] == "crash"),
        "points: {p}"
    );
}

#[test]
fn file_store_qemu_io_tag_and_latest_are_byte_equal() {
    let s = setup(&[("root", 16 * MIB), ("data", 8 * MIB)], None, &[]);
    qemu_io_scenario(&s);
}

#[test]
fn azurite_store_qemu_io_tag_and_latest_are_byte_equal() {
    let peer_dir = tempfile::tempdir().unwrap();
    let az = peers::Azurite::start(peer_dir.path()).unwrap();
    let s = setup(
        &[("root", 16 * MIB), ("data", 8 * MIB)],
        Some(&az.store_url()),
        &az.options(),
    );
    qemu_io_scenario(&s);
}

#[test]
fn s3_store_qemu_io_tag_and_latest_are_byte_equal() {
    let peer_dir = tempfile::tempdir().unwrap();
    let s3 = peers::S3sFs::start(peer_dir.path()).unwrap();
    let s = setup(
        &[("root", 16 * MIB), ("data", 8 * MIB)],
        Some(&s3.store_url()),
        &s3.options(),
    );
    qemu_io_scenario(&s);
}

#[test]
fn fio_random_writes_replicate_exactly() {
    let s = setup(&[("root", 64 * MIB), ("data", 4 * MIB)], None, &[]);
    let uri = s.agent.uri("root");
    let run = |seed: &str, size: &str| {
        fio_randwrite(
            &uri,
            &s.root.join(format!("fio-{seed}.json")),
            &[
                "--bs=4k",
                "--iodepth=32",
                &format!("--size={size}"),
                &format!("--randseed={seed}"),
                "--refill_buffers=1",
            ],
        )
        .unwrap();
    };
    run("1", "32M");
    let tag = s.agent.tag().unwrap();
    let snap = s.root.join("snap.raw");
    snapshot(&s.agent.image("root"), &snap);
    run("2", "64M");
    s.wait_all_stored();
    let at_tag = s.failover(&tag.to_string(), "out-tag");
    assert_same(&at_tag.join("root.raw"), &snap);
    let latest = s.failover("latest", "out-latest");
    assert_same(&latest.join("root.raw"), &s.agent.image("root"));
}

#[test]
fn kill9_process_server_mid_stream_loses_nothing() {
    let mut s = setup(&[("root", 32 * MIB), ("data", 4 * MIB)], None, &[]);
    let uri = s.agent.uri("root");
    // A writer in the background while the process server dies and comes back.
    let writer = std::thread::spawn(move || {
        for i in 0..24u64 {
            let off = (i * 1337 * 4096) % (30 * MIB);
            qemu_io(&uri, &[&format!("write -P {} {off} 256k", (i % 250) + 1)]).unwrap();
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    std::thread::sleep(Duration::from_millis(700));
    s.ps.proc.as_mut().unwrap().kill9();
    std::thread::sleep(Duration::from_millis(1000));
    s.ps.start().unwrap();
    writer.join().unwrap();
    qemu_io(&s.agent.uri("root"), &["flush"]).unwrap();
    s.wait_all_stored();
    let latest = s.failover("latest", "out");
    assert_same(&latest.join("root.raw"), &s.agent.image("root"));
    assert_same(&latest.join("data.raw"), &s.agent.image("data"));
}

#[test]
fn ext4_over_nbdfuse_recovers_clean_with_every_file() {
    let s = setup(&[("root", 128 * MIB), ("data", 4 * MIB)], None, &[]);
    let fs = Ext4OverExport::create(&s.root, &s.agent.disks[0].2);
    let mnt = fs.mnt.clone();
    let mut sums = Vec::new();
    for i in 0..20u32 {
        let data: Vec<u8> = (0..(50_000 + i * 7919))
            .map(|j| (j.wrapping_mul(31) ^ i) as u8)
            .collect();
        let name = format!("file-{i}.bin");
        std::fs::write(mnt.join(&name), &data).unwrap();
        sums.push((name, blake3::hash(&data)));
    }
    std::fs::create_dir_all(mnt.join("dir/sub")).unwrap();
    std::fs::write(mnt.join("dir/sub/note.txt"), b"lifeboat").unwrap();
    run_ok(
        Command::new("sync").arg("-f").arg(&mnt),
        Duration::from_secs(60),
    )
    .unwrap();
    drop(fs); // umount, detach the loop device, unmount nbdfuse
    let tag = s.agent.tag().unwrap();
    s.wait_all_stored();
    let out = s.failover(&tag.to_string(), "out");
    let img = out.join("root.raw");
    assert_same(&img, &s.agent.image("root"));
    run_ok(
        Command::new("e2fsck").arg("-fn").arg(&img),
        Duration::from_secs(120),
    )
    .unwrap();
    // Mount the recovered image read-only and check every file.
    let rmnt = s.root.join("rmnt");
    std::fs::create_dir_all(&rmnt).unwrap();
    run_ok(
        Command::new("mount")
            .args(["-o", "ro,loop"])
            .arg(&img)
            .arg(&rmnt),
        Duration::from_secs(60),
    )
    .unwrap();
    let check = || {
        for (name, sum) in &sums {
            let data = std::fs::read(rmnt.join(name)).unwrap();
            assert_eq!(blake3::hash(&data), *sum, "{name} differs after recovery");
        }
        assert_eq!(
            std::fs::read(rmnt.join("dir/sub/note.txt")).unwrap(),
            b"lifeboat"
        );
    };
    let r = std::panic::catch_unwind(check);
    let _ = Command::new("umount").arg(&rmnt).status();
    r.unwrap();
}
