//! Instant recovery (`lifeboat-mt serve-point`): a point whose history is a
//! folded base plus segments is served as an NBD export before any data is
//! copied. qemu-img reads it while hydration runs and finds it equal to a
//! failover of the same point; qemu-io and a raw NBD client write to the
//! overlay (odd sizes and offsets, write-zeroes, below and above the
//! hydrated position); kill -9 of the export during hydration and a restart
//! lose no flushed write; after hydration the target equals the export's
//! view, also after later writes; the process server is gone all along.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use lifeboat_tests::nbd::NbdClient;
use lifeboat_tests::*;

const MACHINE: &str = "machine-1";
const MIB: u64 = 1024 * 1024;
/// Not a multiple of a chunk (1 MiB) nor of 4 KiB.
const SIZE: u64 = 48 * MIB + 1000;

fn base_seq(ps: &ProcessServer) -> u64 {
    points(&ps.store_url, MACHINE, &[]).unwrap()["base"]["seq"]
        .as_u64()
        .unwrap_or(0)
}

/// A stored history of a base (the whole disk written, folded) and
/// segments after it (odd writes, a zeroed range); returns the process
/// server (stopped) and the point's seq, and the source disk at the point
/// in `at_point`.
fn history(r: &Path, at_point: &Path) -> (ProcessServer, u64) {
    let mut ps = ProcessServer::init(&r.join("ps"), None, &[]).unwrap();
    ps.append_config(
        "[retention]\nkeep = \"10s\"\nfine-window = \"10s\"\ntiers = []\ncompact-every = \"1s\"\nreader-grace = \"0s\"\n",
    );
    ps.start().unwrap();
    let certs = ps.dir.join("machines").join(MACHINE);
    let mut agent = Agent::configure(
        &r.join("agent"),
        MACHINE,
        &certs,
        ps.port,
        &[("root", SIZE)],
        "",
    )
    .unwrap();
    agent.start().unwrap();
    agent.wait_synced(Duration::from_secs(120)).unwrap();
    let mut nbd = NbdClient::connect(&agent.disks[0].2, "root").unwrap();
    let mut rng = Rng(7_001);
    let mut buf = vec![0u8; MIB as usize];
    // Every chunk written but chunks 5 and 6 (zeros: no chunk in the base).
    for i in (0..SIZE.div_ceil(MIB)).filter(|i| !(5..7).contains(i)) {
        let len = (SIZE - i * MIB).min(MIB) as usize;
        rng.fill(&mut buf[..len]);
        nbd.write(i * MIB, &buf[..len], 0).unwrap();
    }
    nbd.flush().unwrap();
    let folded = agent.tag().unwrap();
    // Folds reach points older than the retention (10 s, its least).
    std::thread::sleep(Duration::from_secs(11));
    wait_for(
        "a base holding the written disk",
        Duration::from_secs(120),
        || (base_seq(&ps) >= folded).then_some(()),
    )
    .unwrap();
    // No further fold: the later writes stay in segments after the base.
    ps.proc.as_mut().unwrap().stop(Duration::from_secs(30));
    let cfg = ps.dir.join("ps.toml");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("keep = \"10s\"", "keep = \"1h\"");
    std::fs::write(&cfg, text).unwrap();
    ps.start().unwrap();
    agent.wait_acked(Duration::from_secs(60)).unwrap();
    for i in 0..60u64 {
        let len = [1usize, 511, 4097, 70_001, 1 << 20][i as usize % 5];
        let off = rng.next_u64() % (SIZE - len as u64);
        rng.fill(&mut buf[..len]);
        nbd.write(off, &buf[..len], 0).unwrap();
    }
    nbd.write_zeroes(9 * MIB + 3, 2 * MIB as u32, 0).unwrap();
    nbd.flush().unwrap();
    let point = agent.tag().unwrap();
    wait_stored(&ps.store_url, MACHINE, &[], point, Duration::from_secs(120)).unwrap();
    snapshot(&agent.image("root"), at_point);
    drop(nbd);
    // Recovery reads the store alone.
    drop(agent);
    ps.proc.as_mut().unwrap().stop(Duration::from_secs(30));
    (ps, point)
}

struct ServePoint {
    proc: Proc,
    socket: PathBuf,
}

fn serve_point(
    ps: &ProcessServer,
    point: u64,
    state: &Path,
    target: &Path,
    log: &Path,
) -> ServePoint {
    let socket = state.join("nbd.sock");
    let _ = std::fs::remove_file(&socket);
    let proc = Proc::spawn(
        "lifeboat-mt serve-point",
        Command::new(bin("lifeboat-mt"))
            .args([
                "serve-point",
                "--store",
                &ps.store_url,
                "--machine",
                MACHINE,
            ])
            .args(["--point", &point.to_string(), "--key-file"])
            .arg(ps.kek())
            .arg("--state-dir")
            .arg(state)
            .arg("--hydrate")
            .arg(format!("root={}", target.display()))
            // Slow enough to act while it runs; a small cache that evicts.
            .args(["--hydrate-limit", "4", "--cache-mib", "4"]),
        log,
    )
    .unwrap();
    let mut sp = ServePoint { proc, socket };
    wait_for("the export answering", Duration::from_secs(60), || {
        if !sp.proc.is_running() {
            panic!("serve-point exited: {}", sp.proc.log_text());
        }
        sp.proc.log_text().contains("ready in").then_some(())
    })
    .unwrap();
    sp
}

impl ServePoint {
    fn uri(&self) -> String {
        format!("nbd+unix:///root?socket={}", self.socket.display())
    }

    fn hydrated(&self) -> u64 {
        self.proc
            .log_text()
            .lines()
            .filter_map(|l| l.strip_prefix("hydrating root: "))
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .max()
            .unwrap_or(0)
    }
}

/// Writes `data` at `off` through the export and into `expected`.
fn write_both(nbd: &mut NbdClient, expected: &Path, off: u64, data: &[u8]) {
    nbd.write(off, data, 0).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(expected)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, data, off).unwrap();
}

/// The whole export read back through NBD.
fn read_export(sp: &ServePoint, into: &Path) {
    let mut nbd = NbdClient::connect(&sp.socket, "root").unwrap();
    let mut out = vec![0u8; SIZE as usize];
    for (i, piece) in out.chunks_mut(4 * MIB as usize).enumerate() {
        nbd.read(i as u64 * 4 * MIB, piece).unwrap();
    }
    std::fs::write(into, out).unwrap();
}

#[test]
fn a_point_is_served_before_it_is_copied_and_hydration_survives_kill9_with_the_overlay_writes() {
    for tool in ["qemu-img", "qemu-io"] {
        assert!(have(tool), "{tool} is needed (scripts/install-deps.sh)");
    }
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let expected = r.join("expected.raw");
    let (ps, point) = history(r, &expected);

    // The reference: a failover of the same point.
    let out = r.join("failover");
    ps.failover_ok(MACHINE, &point.to_string(), &out);
    assert_same(&out.join("root.raw"), &expected);

    let state = r.join("instant");
    let target = r.join("hydrated.raw");
    let log = r.join("serve-point.log");
    let mut sp = serve_point(&ps, point, &state, &target, &log);
    let text = sp.proc.log_text();
    assert!(
        text.contains("segments after the base read"),
        "the layers come from the segments after the base: {text}"
    );
    // qemu-img reads the whole point through the export while hydration runs.
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw", &sp.uri()])
            .arg(&expected),
        Duration::from_secs(120),
    )
    .unwrap();
    assert!(
        sp.hydrated() < SIZE,
        "hydration should still run while qemu-img read (4 MB/s)"
    );

    // Writes to the overlay: below and above the hydrated position, odd
    // sizes, and write-zeroes through qemu-io, then a flush.
    let mut rng = Rng(99);
    let mut nbd = NbdClient::connect(&sp.socket, "root").unwrap();
    let below = sp.hydrated().saturating_sub(MIB);
    for (off, len) in [
        (below / 2 + 3, 5000usize),
        (SIZE - 777, 777),
        (20 * MIB - 100, 3 * MIB as usize / 2),
        (5 * MIB + 512, 512),
    ] {
        let mut data = vec![0u8; len];
        rng.fill(&mut data);
        write_both(&mut nbd, &expected, off, &data);
    }
    nbd.flush().unwrap();
    drop(nbd);
    qemu_io(
        &sp.uri(),
        &[
            "write -z 30000 70000",
            "write -P 0x5a 44040192 4096",
            "flush",
        ],
    )
    .unwrap();
    {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&expected)
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &vec![0u8; 70000], 30000).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[0x5au8; 4096], 44_040_192).unwrap();
    }

    // kill -9 during hydration, then the same command again: it resumes.
    let before = sp.hydrated();
    assert!(before < SIZE, "the kill must come while hydration runs");
    sp.proc.kill9();
    let log2 = r.join("serve-point-2.log");
    let mut sp = serve_point(&ps, point, &state, &target, &log2);
    let text = sp.proc.log_text();
    assert!(text.contains("resuming"), "{text}");
    let view = r.join("view.raw");
    read_export(&sp, &view);
    assert_same(&view, &expected);
    wait_for("hydration to complete", Duration::from_secs(120), || {
        sp.proc
            .log_text()
            .contains("hydration complete")
            .then_some(())
    })
    .unwrap();
    assert_same(&target, &expected);

    // After hydration writes keep reaching the target at each flush.
    let mut nbd = NbdClient::connect(&sp.socket, "root").unwrap();
    let mut data = vec![0u8; 12_345];
    rng.fill(&mut data);
    write_both(&mut nbd, &expected, 7 * MIB + 1, &data);
    nbd.flush().unwrap();
    drop(nbd);
    read_export(&sp, &view);
    assert_same(&view, &expected);
    assert_same(&target, &expected);
    assert!(
        sp.proc.stop(Duration::from_secs(30)),
        "serve-point stops at SIGTERM"
    );
    // The hydrated target is a disk qemu-img takes as the point plus the writes.
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&target)
            .arg(&expected),
        Duration::from_secs(60),
    )
    .unwrap();
}

#[test]
fn serve_point_refuses_another_point_in_the_same_state_dir_and_an_unknown_disk() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let (mut ps, agent) = start_pair(r, &[("root", 4 * MIB)], "").unwrap();
    let mut nbd = NbdClient::connect(&agent.disks[0].2, "root").unwrap();
    nbd.write(4096, &[7u8; 4096], 0).unwrap();
    nbd.flush().unwrap();
    let point = agent.tag().unwrap();
    wait_stored(&ps.store_url, MACHINE, &[], point, Duration::from_secs(60)).unwrap();
    ps.proc.as_mut().unwrap().stop(Duration::from_secs(30));
    let state = r.join("state");
    let run = |point: &str, hydrate: &str| {
        run_timeout(
            Command::new(bin("lifeboat-mt"))
                .args([
                    "serve-point",
                    "--store",
                    &ps.store_url,
                    "--machine",
                    MACHINE,
                ])
                .args(["--point", point, "--key-file"])
                .arg(ps.kek())
                .arg("--state-dir")
                .arg(&state)
                .args(["--hydrate", hydrate]),
            Duration::from_secs(60),
        )
        .unwrap()
    };
    let o = run("latest", "vdz=/tmp/never-written.raw");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("has no disk vdz") && err.contains("root"),
        "{err}"
    );
    assert!(!Path::new("/tmp/never-written.raw").exists());
    let o = run(
        &point.to_string(),
        &format!("root={}", r.join("t.raw").display()),
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("serves machine machine-1 at point \"latest\""),
        "{err}"
    );
}
