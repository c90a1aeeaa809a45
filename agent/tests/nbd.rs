//! The NBD server driven by real clients (qemu-io, nbdinfo, nbdsh, nbdcopy, fio) over a
//! unix socket, serving a plain image file through `DiskFile` (no replication). Every
//! test checks the bytes that ended up in the backing file.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use lifeboat_agent::capture::file::FileBackend;
use lifeboat_agent::capture::nbd::{serve_unix, Exports};
use lifeboat_agent::diskio::{DiskFile, IoMode};
use tokio::process::Command;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);
const MIB: u64 = 1 << 20;

struct Server {
    dir: tempfile::TempDir,
    image: PathBuf,
    socket: PathBuf,
    shutdown: CancellationToken,
    task: JoinHandle<io::Result<()>>,
}

impl Server {
    async fn start(size: u64, mode: IoMode) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("disk.raw");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(size))
            .expect("create image");
        let socket = dir.path().join("nbd.sock");
        let disk = DiskFile::open(&image, mode).expect("open image");
        let exports = Arc::new(Exports::single("disk", Arc::new(FileBackend(disk))));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let (socket, shutdown) = (socket.clone(), shutdown.clone());
            async move { serve_unix(&socket, exports, shutdown).await }
        });
        for _ in 0..500 {
            if tokio::net::UnixStream::connect(&socket).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Server {
            dir,
            image,
            socket,
            shutdown,
            task,
        }
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// Stops the server; returns the backing file's bytes.
    async fn stop(self) -> Vec<u8> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("server stops within 30 s")
            .expect("server task")
            .expect("server result");
        assert!(!self.socket.exists(), "socket file removed on shutdown");
        let bytes = std::fs::read(&self.image).expect("read image");
        drop(self.dir);
        bytes
    }
}

/// Runs a client to completion (killed after CLIENT_TIMEOUT); returns its output.
async fn run(program: &str, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // nbdsh needs Debian's python, not a virtualenv's.
    let path = std::env::var("PATH").unwrap_or_default();
    cmd.env("PATH", format!("/usr/bin:{path}"));
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("starting {program}: {e}"));
    tokio::time::timeout(CLIENT_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} did not finish in {CLIENT_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("waiting for {program}: {e}"))
}

async fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args).await;
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// qemu-io commands: patterns, write-zeroes, discard, FUA and flush, with reads that
/// check the pattern through the server.
const QEMU_IO_OPS: &[&str] = &[
    "write -P 0xab 0 1M",
    "write -P 0xcd 1M 2M",
    "write -z 1536k 512k",
    "discard 2304k 100k",
    "write -f -P 0x5a 3M 4k",
    "write -P 0x11 5246973 10",
    "flush",
    "read -P 0xab 0 1M",
    "read -P 0 1536k 512k",
    "read -P 0x5a 3M 4k",
];

fn qemu_io_args<'a>(target: &'a str, format_opts: &[&'a str]) -> Vec<&'a str> {
    let mut args = format_opts.to_vec();
    args.push(target);
    for op in QEMU_IO_OPS {
        args.push("-c");
        args.push(op);
    }
    args
}

async fn qemu_io_matches_reference(mode: IoMode) {
    let server = Server::start(64 * MIB, mode).await;
    let uri = server.uri("disk");
    let out = run_ok(
        "qemu-io",
        &qemu_io_args(&uri, &["-f", "raw", "-t", "writeback"]),
    )
    .await;
    assert!(!out.contains("Pattern verification failed"), "{out}");

    // The same ops straight onto a local file are the reference.
    let reference = server.dir.path().join("ref.raw");
    std::fs::File::create(&reference)
        .and_then(|f| f.set_len(64 * MIB))
        .expect("create reference");
    let reference_s = reference.to_str().expect("utf-8 path").to_string();
    let out = run_ok("qemu-io", &qemu_io_args(&reference_s, &["-f", "raw"])).await;
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let expected = std::fs::read(&reference).expect("read reference");

    let got = server.stop().await;
    assert_eq!(got.len(), expected.len());
    assert!(got[..MIB as usize].iter().all(|&b| b == 0xab));
    assert!(got[1536 * 1024..2048 * 1024].iter().all(|&b| b == 0));
    assert!(got[2304 * 1024..2404 * 1024].iter().all(|&b| b == 0));
    assert!(got[3 * MIB as usize..3 * MIB as usize + 4096]
        .iter()
        .all(|&b| b == 0x5a));
    assert!(got == expected, "image differs from the qemu-io reference");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_uring() {
    qemu_io_matches_reference(IoMode::Uring).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_portable() {
    qemu_io_matches_reference(IoMode::Portable).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_reports_size_and_flags() {
    let server = Server::start(48 * MIB, IoMode::Auto).await;
    let out = run_ok("nbdinfo", &["--json", &server.uri("disk")]).await;
    let j: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo json");
    assert_eq!(j["protocol"], "newstyle-fixed");
    let e = &j["exports"][0];
    assert_eq!(e["export-name"], "disk");
    assert_eq!(e["export-size"], 48 * MIB);
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
    ] {
        assert_eq!(e[flag], true, "{flag} in {e}");
    }
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["block_size_maximum"], 32 * MIB);

    // The empty name selects the only export.
    let out = run_ok("nbdinfo", &["--size", &server.uri("")]).await;
    assert_eq!(out.trim(), (48 * MIB).to_string());
    let out = run_ok("nbdinfo", &["--list", &server.uri("")]).await;
    assert!(out.contains("export=\"disk\""), "{out}");
    // An unknown export is refused.
    let out = run("nbdinfo", &["--size", &server.uri("nope")]).await;
    assert!(!out.status.success(), "unknown export must be refused");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_requests_fail_and_connection_survives() {
    let server = Server::start(16 * MIB, IoMode::Auto).await;
    // libnbd checks bounds itself unless strict mode is off.
    let script = format!(
        r#"
h.set_strict_mode(0)
h.connect_uri("{uri}")
for what, f in [("read", lambda: h.pread(4096, 16*1024*1024 - 100)),
                ("write", lambda: h.pwrite(b"x" * 4096, 16*1024*1024 - 100)),
                ("trim", lambda: h.trim(8192, 16*1024*1024)),
                ("zero", lambda: h.zero(8192, 2**63))]:
    try:
        f()
        raise SystemExit(what + " beyond the end succeeded")
    except nbd.Error as e:
        print(what, "refused:", e.errno)
h.pwrite(b"\x42" * 4096, 8192)
assert h.pread(4096, 8192) == b"\x42" * 4096
h.flush()
h.shutdown()
print("ok")
"#,
        uri = server.uri("disk")
    );
    let out = run_ok("nbdsh", &["-c", &script]).await;
    assert!(out.contains("read refused: EINVAL"), "{out}");
    assert!(out.contains("write refused: ENOSPC"), "{out}");
    assert!(out.contains("trim refused: EINVAL"), "{out}");
    assert!(out.contains("ok"), "{out}");
    let got = server.stop().await;
    assert!(got[8192..12288].iter().all(|&b| b == 0x42));
    assert!(got[16 * MIB as usize - 100..].iter().all(|&b| b == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_multi_conn_copies_exactly() {
    let server = Server::start(24 * MIB, IoMode::Auto).await;
    let src = server.dir.path().join("src.raw");
    // Deterministic pseudo-random content with zero runs (nbdcopy writes those as zeroes).
    let mut data = vec![0u8; 24 * MIB as usize];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for (i, chunk) in data.chunks_mut(64 * 1024).enumerate() {
        if i % 5 == 3 {
            continue;
        }
        for b in chunk.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
    std::fs::write(&src, &data).expect("write source");
    // Dirty the target first so zero runs must really be zeroed.
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-t",
            "writeback",
            &server.uri("disk"),
            "-c",
            "write -P 0xee 0 24M",
        ],
    )
    .await;
    let src_s = src.to_str().expect("utf-8 path");
    run_ok(
        "nbdcopy",
        &["--flush", "--connections=4", src_s, &server.uri("disk")],
    )
    .await;
    let got = server.stop().await;
    assert!(got == data, "image differs from the copied source");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_randwrite_qd32_verifies_on_disk() {
    let server = Server::start(32 * MIB, IoMode::Auto).await;
    let uri = server.uri("disk");
    let common = [
        "--name=w",
        "--rw=randwrite",
        "--bs=4k",
        "--size=32M",
        "--verify=crc32c",
        "--randseed=42",
        "--verify_state_save=0",
    ];
    // Write every block once at queue depth 32 through the server, then read it
    // all back through the server and verify.
    let mut args: Vec<String> = common.iter().map(|s| s.to_string()).collect();
    args.extend([
        "--ioengine=nbd".to_string(),
        format!("--uri={uri}"),
        "--iodepth=32".to_string(),
        "--do_verify=1".to_string(),
        "--output-format=json".to_string(),
        format!("--output={}", server.dir.path().join("fio.json").display()),
    ]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    run_ok("fio", &argv).await;
    let report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(server.dir.path().join("fio.json")).expect("fio output"),
    )
    .expect("fio json");
    assert_eq!(report["jobs"][0]["error"], 0, "{report}");
    assert_eq!(report["jobs"][0]["write"]["io_bytes"], 32 * MIB);
    let got = server.stop().await;
    assert_eq!(got.len() as u64, 32 * MIB);

    // Verify the backing file itself, without the server: same seed, same blocks.
    let offline = tempfile::tempdir().expect("tempdir");
    let image = offline.path().join("disk.raw");
    std::fs::write(&image, &got).expect("copy image for offline verify");
    let mut args: Vec<String> = common.iter().map(|s| s.to_string()).collect();
    args.extend([
        "--ioengine=psync".to_string(),
        format!("--filename={}", image.display()),
        "--verify_only".to_string(),
    ]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    run_ok("fio", &argv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_socket_replaced_and_regular_file_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.raw");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(MIB))
        .expect("image");
    let disk = DiskFile::open(&image, IoMode::Auto).expect("open");
    let exports = Arc::new(Exports::single("disk", Arc::new(FileBackend(disk))));

    let not_socket = dir.path().join("file");
    std::fs::write(&not_socket, b"keep me").expect("file");
    let r = serve_unix(&not_socket, exports.clone(), CancellationToken::new()).await;
    assert!(r.is_err());
    assert_eq!(std::fs::read(&not_socket).expect("still there"), b"keep me");

    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("stale socket"));
    assert!(stale.exists());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn({
        let (stale, shutdown) = (stale.clone(), shutdown.clone());
        async move { serve_unix(&stale, exports, shutdown).await }
    });
    let uri = format!("nbd+unix:///disk?socket={}", stale.display());
    let mut size = String::new();
    for _ in 0..100 {
        let out = run("nbdinfo", &["--size", &uri]).await;
        if out.status.success() {
            size = String::from_utf8_lossy(&out.stdout).trim().to_string();
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(size, MIB.to_string());
    shutdown.cancel();
    task.await.expect("join").expect("serve");
    assert!(!Path::new(&stale).exists());
}
