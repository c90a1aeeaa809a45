//! The process server cannot be held by clients that connect and say
//! nothing, nor flooded from one address, and what it and `lifeboat-mt`
//! write of a machine's data is private to their user.

use std::io::Read;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use lifeboat_tests::*;

const MACHINE: &str = "machine-1";
const MIB: u64 = 1024 * 1024;

/// Seconds until the server closes `s` (reads 0 bytes or fails), at most `limit`.
fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 4096];
    while start.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return Some(start.elapsed()),
        }
    }
    None
}

/// A TLS client with machine-1's real certificate that completes the
/// handshake and then sends nothing; returns how long until the server hung
/// up (`None`: not within `limit`).
fn silent_tls_client(ps: &ProcessServer, limit: Duration) -> Option<Duration> {
    let certs = ps.dir.join("machines").join(MACHINE);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use tokio::io::AsyncReadExt;
        lifeboat_common::tls::install_crypto_provider();
        let cfg = lifeboat_common::tls::client_config(
            &certs.join("ca.pem"),
            &certs.join("client.pem"),
            &certs.join("client.key"),
        )
        .unwrap();
        let conn = tokio_rustls::TlsConnector::from(cfg);
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", ps.port))
            .await
            .unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = conn.connect(name, tcp).await.expect("TLS handshake");
        let start = Instant::now();
        let mut buf = [0u8; 1024];
        match tokio::time::timeout(limit, tls.read(&mut buf)).await {
            Ok(_) => Some(start.elapsed()),
            Err(_) => None,
        }
    })
}

fn assert_private(path: &Path) {
    let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode & 0o077,
        0,
        "{} is mode {mode:o}: readable by others",
        path.display()
    );
}

fn walk(dir: &Path, f: &mut impl FnMut(&Path)) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        f(&p);
        if p.is_dir() {
            walk(&p, f);
        }
    }
}

#[test]
fn silent_clients_are_dropped_and_one_source_cannot_take_every_slot() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // The defaults: handshake and hello 10 s, 16 connections per source.
    let mut ps = ProcessServer::init(&root.join("ps"), None, &[]).unwrap();
    ps.start().unwrap();

    // Handshake done, no hello: dropped after the hello timeout.
    let t = silent_tls_client(&ps, Duration::from_secs(15));
    let t = t.expect("a client that sends no hello must be dropped");
    assert!(t < Duration::from_secs(13), "dropped after {t:?}");

    // Sixteen silent TCP connections hold this source's slots; the
    // seventeenth is refused at once, with a log line that says why.
    let mut held: Vec<TcpStream> = (0..16)
        .map(|_| TcpStream::connect(("127.0.0.1", ps.port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut extra = TcpStream::connect(("127.0.0.1", ps.port)).unwrap();
    let refused = closed_within(&mut extra, Duration::from_secs(2));
    assert!(
        refused.is_some(),
        "the 17th connection from one source must be refused"
    );
    wait_for("the refusal in the log", Duration::from_secs(5), || {
        ps.log()
            .lines()
            .any(|l| {
                l.contains("refusing the connection")
                    && l.contains("max-connections-per-source = 16")
            })
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", ps.log()));
    // The silent ones are dropped by the handshake timeout.
    for s in &mut held {
        assert!(
            closed_within(s, Duration::from_secs(15)).is_some(),
            "a silent TCP client must be dropped by the handshake timeout"
        );
    }

    // A real agent still connects, and its disk is recovered exactly.
    let certs = ps.dir.join("machines").join(MACHINE);
    let mut agent = Agent::configure(
        &root.join("agent"),
        MACHINE,
        &certs,
        ps.port,
        &[("root", 16 * MIB)],
        "",
    )
    .unwrap();
    fill_random(&agent.image("root"), 0, 16 * MIB, &mut Rng(0x11));
    agent.start().unwrap();
    agent.wait_synced(Duration::from_secs(120)).unwrap();
    let seq = agent.tag().unwrap();
    wait_stored(&ps.store_url, MACHINE, &[], seq, Duration::from_secs(60)).unwrap();
    agent.stop_clean();
    let out = root.join("out");
    ps.failover_ok(MACHINE, &seq.to_string(), &out);
    assert_same(&out.join("root.raw"), &agent.image("root"));

    // Plaintext at rest on the appliance and the recovery site is private.
    let cache = ps.dir.join("cache");
    assert_private(&cache);
    walk(&cache, &mut |p| assert_private(p));
    let image = out.join("root.raw");
    let mode = std::fs::metadata(&image).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "recovered image mode {mode:o}");
}
