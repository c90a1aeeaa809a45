//! Failover outputs: qcow2 images that `qemu-img check` accepts and
//! `qemu-img compare` finds equal to the raw ones; an existing image file
//! full of other data; exports of qemu-nbd (unix socket) and nbdkit (TCP);
//! the machine description and QEMU command line; a test failover's drill
//! record and `--cleanup`, which removes what the drill wrote and nothing
//! else, the store untouched. Every disk is compared byte for byte with the
//! source at the point.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use lifeboat_tests::nbd::NbdClient;
use lifeboat_tests::*;

const MACHINE: &str = "machine-1";
const MIB: u64 = 1024 * 1024;

fn mt(ps: &ProcessServer, cmd: &str, out: &Path, extra: &[&str]) -> std::process::Output {
    run_timeout(
        Command::new(bin("lifeboat-mt"))
            .args([cmd, "--store", &ps.store_url, "--machine", MACHINE])
            .args(["--point", "latest", "--out"])
            .arg(out)
            .arg("--key-file")
            .arg(ps.kek())
            .args(extra),
        Duration::from_secs(300),
    )
    .unwrap()
}

fn ok(o: std::process::Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A file of `size` bytes of 0xA5: an old disk the failover must overwrite
/// whole, holes included.
fn stale_image(path: &Path, size: u64) {
    std::fs::write(path, vec![0xA5u8; size as usize]).unwrap();
}

/// Every file under `dir`, relative, sorted.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn failover_writes_qcow2_existing_files_and_nbd_exports_equal_to_the_source() {
    for tool in ["qemu-img", "qemu-nbd", "nbdkit"] {
        assert!(have(tool), "{tool} is needed (scripts/install-deps.sh)");
    }
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    // Sizes that are not multiples of a MiB or of 4 KiB.
    let (root_size, data_size) = (12 * MIB + 3000, 5 * MIB + 511);
    let (mut ps, agent) = start_pair(r, &[("root", root_size), ("data", data_size)], "").unwrap();
    let mut rng = Rng(4_242);
    for (disk, size) in [("root", root_size), ("data", data_size)] {
        let mut nbd =
            NbdClient::connect(&agent.disks[if disk == "root" { 0 } else { 1 }].2, disk).unwrap();
        // Data with holes between: a few MiB written, odd pieces, zeros.
        let mut buf = vec![0u8; 70_001];
        for i in 0..40u64 {
            let len = [1u64, 511, 4097, 70_001][i as usize % 4];
            let off = rng.next_u64() % (size - len);
            rng.fill(&mut buf[..len as usize]);
            nbd.write(off, &buf[..len as usize], 0).unwrap();
        }
        rng.fill(&mut buf[..3000]);
        nbd.write(size - 3000, &buf[..3000], 0).unwrap();
        nbd.flush().unwrap();
    }
    let end = agent.tag().unwrap();
    wait_stored(&ps.store_url, MACHINE, &[], end, Duration::from_secs(60)).unwrap();
    let (src_root, src_data) = (agent.image("root"), agent.image("data"));

    // Raw, with the machine description and its QEMU command line.
    let raw = r.join("raw");
    ok(mt(&ps, "failover", &raw, &[]), "raw failover");
    assert_same(&raw.join("root.raw"), &src_root);
    assert_same(&raw.join("data.raw"), &src_data);
    let desc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(raw.join("recovered-machine.json")).unwrap())
            .unwrap();
    assert_eq!(desc["machine"], MACHINE);
    assert_eq!(desc["seq"].as_u64(), Some(end));
    let disks = desc["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2);
    for (i, (id, size)) in [("root", root_size), ("data", data_size)]
        .iter()
        .enumerate()
    {
        assert_eq!(disks[i]["id"], *id);
        assert_eq!(disks[i]["boot_index"].as_u64(), Some(i as u64));
        assert_eq!(disks[i]["size"].as_u64(), Some(*size));
        assert_eq!(disks[i]["format"], "raw");
        let at = PathBuf::from(disks[i]["location"].as_str().unwrap());
        assert!(
            at.is_absolute() && at.ends_with(format!("{id}.raw")),
            "{at:?}"
        );
    }
    let script = std::fs::read_to_string(raw.join("start-vm.sh")).unwrap();
    assert!(script.starts_with("#!/bin/sh"), "{script}");
    for want in [
        "qemu-system-x86_64".to_string(),
        format!(
            "format=raw,file={}",
            raw.join("root.raw").canonicalize().unwrap().display()
        ),
        "bootindex=0".into(),
        "bootindex=1".into(),
    ] {
        assert!(script.contains(&want), "start-vm.sh lacks {want}: {script}");
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(raw.join("start-vm.sh"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o700, 0o700, "start-vm.sh is executable");
    let sh = Command::new("sh")
        .arg("-n")
        .arg(raw.join("start-vm.sh"))
        .status()
        .unwrap();
    assert!(sh.success(), "start-vm.sh parses as a shell script");

    // qcow2: accepted by qemu-img check, equal to the raw output.
    let q = r.join("qcow2");
    ok(
        mt(&ps, "failover", &q, &["--format", "qcow2"]),
        "qcow2 failover",
    );
    assert!(
        !q.join("root.raw").exists(),
        "the raw image is removed after conversion"
    );
    for disk in ["root", "data"] {
        let img = q.join(format!("{disk}.qcow2"));
        let check = run_timeout(
            Command::new("qemu-img")
                .args(["check", "-f", "qcow2"])
                .arg(&img),
            Duration::from_secs(60),
        )
        .unwrap();
        assert!(check.status.success(), "qemu-img check {disk}: {check:?}");
        let cmp = run_timeout(
            Command::new("qemu-img")
                .args(["compare", "-f", "raw", "-F", "qcow2"])
                .arg(raw.join(format!("{disk}.raw")))
                .arg(&img),
            Duration::from_secs(60),
        )
        .unwrap();
        assert!(cmp.status.success(), "qemu-img compare {disk}: {cmp:?}");
    }
    let qdesc = std::fs::read_to_string(q.join("recovered-machine.json")).unwrap();
    assert!(qdesc.contains("\"qcow2\""), "{qdesc}");

    // Onto an existing image file (larger, full of other bytes) and a
    // qemu-nbd export on a unix socket.
    let existing = r.join("old-root.img");
    stale_image(&existing, root_size + 5 * MIB);
    let exported = r.join("exported-data.img");
    stale_image(&exported, data_size);
    let sock = r.join("qemu-nbd.sock");
    let mut qemu_nbd = Proc::spawn(
        "qemu-nbd",
        Command::new("qemu-nbd")
            .args(["-f", "raw", "-x", "data", "-t", "-k"])
            .arg(&sock)
            .arg(&exported),
        &r.join("qemu-nbd.log"),
    )
    .unwrap();
    wait_for("qemu-nbd's socket", Duration::from_secs(20), || {
        sock.exists().then_some(())
    })
    .unwrap();
    let t = r.join("targets");
    let root_target = format!("root={}", existing.display());
    let data_target = format!("data=nbd+unix:///data?socket={}", sock.display());
    let report = ok(
        mt(
            &ps,
            "failover",
            &t,
            &["--target", &root_target, "--target", &data_target],
        ),
        "failover onto a file and a qemu-nbd export",
    );
    assert!(report.contains("read back"), "{report}");
    qemu_nbd.stop(Duration::from_secs(10));
    assert_same(&existing, &src_root);
    assert_same(&exported, &src_data);
    assert!(
        !t.join("root.raw").exists() && !t.join("data.raw").exists(),
        "assembled images removed"
    );

    // nbdkit's file plugin over TCP, in a test failover, then --cleanup.
    let kit_file = r.join("nbdkit-root.img");
    stale_image(&kit_file, root_size);
    let port = free_port();
    let mut nbdkit = Proc::spawn(
        "nbdkit",
        Command::new("nbdkit")
            .args(["-f", "-i", "127.0.0.1", "-p", &port.to_string(), "file"])
            .arg(format!("file={}", kit_file.display())),
        &r.join("nbdkit.log"),
    )
    .unwrap();
    wait_for("nbdkit's port", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    })
    .unwrap();
    // The process server stopped: nothing else writes the store now.
    ps.proc.as_mut().unwrap().stop(Duration::from_secs(30));
    let store_dir = ps.dir.join("store");
    let objects_before = tree(&store_dir);
    assert!(!objects_before.is_empty());
    let drill = r.join("drill");
    std::fs::create_dir_all(&drill).unwrap();
    std::fs::write(drill.join("operator-notes.txt"), b"not the drill's").unwrap();
    let kit_target = format!("root=nbd://127.0.0.1:{port}/");
    ok(
        mt(
            &ps,
            "test-failover",
            &drill,
            &["--target", &kit_target, "--format", "qcow2"],
        ),
        "test failover onto nbdkit",
    );
    nbdkit.stop(Duration::from_secs(10));
    assert_same(&kit_file, &src_root);
    assert!(drill.join("data.qcow2").exists() && drill.join("lifeboat-drill.json").exists());
    assert_eq!(
        tree(&store_dir),
        objects_before,
        "a drill writes nothing to the store"
    );
    let cleaned = ok(
        run_timeout(
            Command::new(bin("lifeboat-mt"))
                .args(["test-failover", "--cleanup"])
                .arg(&drill),
            Duration::from_secs(60),
        )
        .unwrap(),
        "test-failover --cleanup",
    );
    assert!(
        cleaned.contains(&format!("left nbd://127.0.0.1:{port}/")),
        "{cleaned}"
    );
    assert_eq!(
        tree(&drill),
        vec![PathBuf::from("operator-notes.txt")],
        "--cleanup removes the drill's files and only those"
    );
    assert!(kit_file.exists(), "the operator's target stays");

    // Bad targets: named, and nothing written.
    let bad = r.join("bad");
    let o = mt(&ps, "failover", &bad, &["--target", "nosuch=/tmp/x"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("has no disk nosuch"),
        "{o:?}"
    );
    assert!(!bad.join("root.raw").exists());
    let small = r.join("small.img");
    let small_dev = format!("root={}", small.display());
    let o = mt(&ps, "failover", &bad, &["--target", &small_dev]);
    assert!(!o.status.success(), "a missing target path is refused");
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("must be an existing block device or image file"),
        "{o:?}"
    );
    let o = mt(
        &ps,
        "failover",
        &bad,
        &["--target", "root=nbd://127.0.0.1:1/x"],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("connecting to nbd://127.0.0.1:1/x"),
        "{o:?}"
    );
    let data_onto_existing = format!("data={}", existing.display());
    let twice = ["--target", &root_target, "--target", &data_onto_existing];
    let o = mt(&ps, "failover", &bad, &twice);
    assert!(!o.status.success(), "two disks onto one target are refused");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("for two disks"),
        "{o:?}"
    );
    assert_same(&existing, &src_root);
    let itself = format!("root={}", bad.join("root.raw").display());
    let o = mt(&ps, "failover", &bad, &["--target", &itself]);
    assert!(!o.status.success(), "the assembled image is no target");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("the image assembled in --out itself"),
        "{o:?}"
    );
    assert_same(&bad.join("root.raw"), &src_root);
}
