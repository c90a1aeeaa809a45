//! Bad input: wrong or missing certificates, malformed frames, tampered or
//! missing objects, a wrong key-encryption key. Each must be a clear error, and
//! the process server must keep serving the well-behaved agent meanwhile.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use lifeboat_common::framed::read_frame;
use lifeboat_common::protocol::{
    DiskInfo, Frame, Hello, MAX_FRAME_LEN, PROTOCOL_MAX, PROTOCOL_MIN,
};
use lifeboat_tests::*;
use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const MACHINE: &str = "machine-1";
const MIB: u64 = 1024 * 1024;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn connect(
    port: u16,
    cfg: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let name = ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
}

fn client_cfg(certs: &Path) -> Arc<rustls::ClientConfig> {
    lifeboat_common::tls::client_config(
        &certs.join("ca.pem"),
        &certs.join("client.pem"),
        &certs.join("client.key"),
    )
    .unwrap()
}

fn hello(machine: &str) -> Frame {
    Frame::Hello(Hello {
        min_version: PROTOCOL_MIN,
        max_version: PROTOCOL_MAX,
        machine: machine.into(),
        disks: vec![DiskInfo::new("root", MIB)],
        stream_id: [0x5a; 16],
    })
}

/// What the server answers (or whether it just closes) after `send`.
async fn exchange(
    port: u16,
    cfg: Arc<rustls::ClientConfig>,
    send: &[u8],
) -> Result<Vec<Frame>, String> {
    let mut s = connect(port, cfg)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    // With TLS 1.3 a rejected client certificate surfaces on the first read/write.
    if let Err(e) = s.write_all(send).await {
        return Err(format!("write: {e}"));
    }
    let _ = s.flush().await;
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), read_frame(&mut s, MAX_FRAME_LEN)).await
        {
            Err(_) => return Err("no answer within 10 s".into()),
            Ok(Ok(Some(f))) => got.push(f),
            Ok(Ok(None)) => return Ok(got),
            Ok(Err(e)) => {
                if got.is_empty() {
                    return Err(format!("read: {e}"));
                }
                return Ok(got);
            }
        }
    }
}

fn error_message(frames: &[Frame]) -> String {
    frames
        .iter()
        .find_map(|f| match f {
            Frame::Error { message, .. } => Some(message.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

#[test]
fn hostile_clients_are_refused_and_the_good_agent_keeps_replicating() {
    lifeboat_common::tls::install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (ps, agent) = start_pair(root, &[("root", 8 * MIB)], "").unwrap();
    let certs = ps.dir.join("machines").join(MACHINE);
    qemu_io(&agent.uri("root"), &["write -P 0x5a 0 1M", "flush"]).unwrap();

    let rogue_certs = ps.issue_cert("rogue").unwrap();
    let other = ProcessServer::init(&root.join("other-ca"), None, &[]).unwrap();
    let other_certs = other.dir.join("machines").join(MACHINE);
    let port = ps.port;
    let rt = rt();

    // 1. No client certificate.
    let roots = {
        let mut r = rustls::RootCertStore::empty();
        for c in lifeboat_common::tls::load_certs(&certs.join("ca.pem")).unwrap() {
            r.add(c).unwrap();
        }
        r
    };
    let no_cert = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let r = rt.block_on(exchange(port, no_cert, &hello(MACHINE).to_bytes()));
    assert!(
        r.is_err() || r.as_ref().unwrap().is_empty(),
        "no-cert client got {r:?}"
    );

    // 2. A certificate from another CA (same machine name).
    let r = rt.block_on(async {
        let cfg = lifeboat_common::tls::client_config(
            &certs.join("ca.pem"),           // trusts our server...
            &other_certs.join("client.pem"), // ...but presents another CA's certificate
            &other_certs.join("client.key"),
        )
        .unwrap();
        exchange(port, cfg, &hello(MACHINE).to_bytes()).await
    });
    assert!(
        r.is_err() || r.as_ref().unwrap().is_empty(),
        "foreign-CA client got {r:?}"
    );

    // 3. A valid certificate for "rogue" that claims to be machine-1.
    let frames = rt
        .block_on(exchange(
            port,
            client_cfg(&rogue_certs),
            &hello(MACHINE).to_bytes(),
        ))
        .unwrap();
    let msg = error_message(&frames);
    assert!(
        msg.contains("not allowed"),
        "impersonation answer: {frames:?}"
    );

    // 4. An oversized frame: the server must refuse it without allocating it.
    let mut bytes = hello("rogue").to_bytes();
    bytes.extend_from_slice(&(u32::MAX - 1).to_be_bytes());
    bytes.push(3);
    let frames = rt
        .block_on(exchange(port, client_cfg(&rogue_certs), &bytes))
        .unwrap();
    assert!(matches!(frames[0], Frame::Welcome { .. }), "{frames:?}");
    assert!(
        error_message(&frames).contains("over the limit"),
        "oversized answer: {frames:?}"
    );

    // 5. A truncated frame, then the connection closes.
    let mut bytes = hello("rogue").to_bytes();
    let mut w = Vec::new();
    Frame::Writes(vec![lifeboat_common::protocol::Entry {
        seq: 1,
        op: lifeboat_common::protocol::Op::Write {
            disk: 0,
            offset: 0,
            data: bytes::Bytes::from(vec![1u8; 4096]),
        },
    }])
    .encode(&mut w);
    bytes.extend_from_slice(&w[..w.len() - 100]);
    let frames = rt
        .block_on(exchange(port, client_cfg(&rogue_certs), &bytes))
        .unwrap_or_default();
    assert!(
        !frames.iter().any(|f| matches!(f, Frame::Ack { .. })),
        "a truncated frame was acknowledged: {frames:?}"
    );

    // 6. A malformed frame body (unknown frame type).
    let mut bytes = hello("rogue").to_bytes();
    bytes.extend_from_slice(&[0, 0, 0, 2, 99, 0]);
    let frames = rt
        .block_on(exchange(port, client_cfg(&rogue_certs), &bytes))
        .unwrap();
    assert!(
        error_message(&frames).contains("malformed"),
        "malformed answer: {frames:?}"
    );

    // 7. machine-1's own certificate with another stream id while the real
    //    agent is connected (a cloned machine): refused, naming both sides,
    //    nothing acknowledged; the live session and its numbering are kept.
    //    (Without a live session such a hello is welcomed with the server's
    //    id and its entries refused: an agent that lost its state rebases.)
    let mut bytes = hello(MACHINE).to_bytes();
    Frame::Writes(vec![lifeboat_common::protocol::Entry {
        seq: 1,
        op: lifeboat_common::protocol::Op::Write {
            disk: 0,
            offset: 0,
            data: bytes::Bytes::from(vec![0xeeu8; 4096]),
        },
    }])
    .encode(&mut bytes);
    let frames = rt
        .block_on(exchange(port, client_cfg(&certs), &bytes))
        .unwrap();
    assert!(
        !frames.iter().any(|f| matches!(f, Frame::Welcome { .. })),
        "a second stream for a live machine was welcomed: {frames:?}"
    );
    let err = error_message(&frames);
    assert!(
        err.contains("two agents claim one machine")
            && err.contains(&lifeboat_common::hex(&[0x5a; 16])),
        "foreign stream id answer: {frames:?}"
    );
    assert!(
        !frames.iter().any(|f| matches!(f, Frame::Ack { .. })),
        "entries of another numbering were acknowledged: {frames:?}"
    );

    // The server is still up and the real agent still replicates exactly.
    qemu_io(&agent.uri("root"), &["write -P 0x6b 2M 1M", "flush"]).unwrap();
    let acked = agent.wait_acked(Duration::from_secs(60)).unwrap();
    wait_stored(&ps.store_url, MACHINE, &[], acked, Duration::from_secs(60)).unwrap();
    let out = ps.failover_ok(MACHINE, "latest", &root.join("out"));
    assert_same(&out.join("root.raw"), &agent.image("root"));
    let log = ps.log();
    assert!(
        log.contains("TLS handshake"),
        "the server log should name the failed handshakes:\n{log}"
    );

    // A second agent on the same state directory is refused, naming it, and
    // the running one is undisturbed.
    let o = run_timeout(
        std::process::Command::new(bin("lifeboat-agent"))
            .args(["run", "--config"])
            .arg(&agent.config),
        Duration::from_secs(30),
    )
    .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("another lifeboat-agent running"), "{err}");
    qemu_io(&agent.uri("root"), &["write -P 0x7c 3M 64k", "flush"]).unwrap();
    let acked = agent.wait_acked(Duration::from_secs(60)).unwrap();
    wait_stored(&ps.store_url, MACHINE, &[], acked, Duration::from_secs(60)).unwrap();
    let out = ps.failover_ok(MACHINE, "latest", &root.join("out2"));
    assert_same(&out.join("root.raw"), &agent.image("root"));
}

#[test]
fn tampered_or_missing_objects_and_wrong_key_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (mut ps, agent) = start_pair(root, &[("root", 8 * MIB)], "").unwrap();
    let uri = agent.uri("root");
    // Several segments: each tag cuts one.
    for i in 0..4u64 {
        qemu_io(
            &uri,
            &[&format!("write -P {} {} 512k", i + 1, i * MIB), "flush"],
        )
        .unwrap();
        agent.tag().unwrap();
    }
    let acked = agent.wait_acked(Duration::from_secs(60)).unwrap();
    wait_stored(&ps.store_url, MACHINE, &[], acked, Duration::from_secs(60)).unwrap();
    drop(agent);
    ps.proc.as_mut().unwrap().stop(Duration::from_secs(10));

    // Wrong key-encryption key.
    let wrong = root.join("wrong.key");
    std::fs::write(&wrong, lifeboat_common::seal::Key::generate().to_hex()).unwrap();
    let o = failover(
        &ps.store_url,
        MACHINE,
        "latest",
        &root.join("o1"),
        &wrong,
        &[],
    )
    .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("data-key.sealed") && err.contains("key-encryption key"),
        "{err}"
    );

    // A tampered segment: failover names it and refuses.
    let log_dir = ps.dir.join("store/machines").join(MACHINE).join("log");
    let mut segs: Vec<_> = std::fs::read_dir(&log_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segs.sort();
    assert!(segs.len() >= 3, "expected several segments, found {segs:?}");
    let victim = segs[1].clone();
    let original = std::fs::read(&victim).unwrap();
    let mut bad = original.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x01;
    std::fs::write(&victim, &bad).unwrap();
    let o = failover(
        &ps.store_url,
        MACHINE,
        "latest",
        &root.join("o2"),
        &ps.kek(),
        &[],
    )
    .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    let vname = victim.file_name().unwrap().to_string_lossy().to_string();
    assert!(!o.status.success());
    assert!(
        err.contains(&vname) && err.contains("authentication failed"),
        "{err}"
    );

    // A missing segment: `latest` is refused rather than silently earlier.
    std::fs::remove_file(&victim).unwrap();
    let o = failover(
        &ps.store_url,
        MACHINE,
        "latest",
        &root.join("o3"),
        &ps.kek(),
        &[],
    )
    .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("missing"), "{err}");

    // Restored, everything works again.
    std::fs::write(&victim, &original).unwrap();
    let o = failover(
        &ps.store_url,
        MACHINE,
        "latest",
        &root.join("o4"),
        &ps.kek(),
        &[],
    )
    .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
