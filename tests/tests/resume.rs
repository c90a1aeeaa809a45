//! Resuming the replication stream exactly across broken connections: a TCP
//! proxy between the agent and the process server cuts every connection every
//! few seconds during the initial sync, and cuts a checksum resync twice in
//! the middle.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lifeboat_tests::*;

const MACHINE: &str = "machine-1";
const MIB: u64 = 1024 * 1024;
/// How often the proxy cuts every live connection.
const CUT_EVERY: Duration = Duration::from_millis(1500);

/// A TCP proxy on 127.0.0.1 that, while `cutting`, abruptly closes every live
/// connection (both sockets, both directions) every `CUT_EVERY`, and keeps
/// accepting new ones.
struct CuttingProxy {
    port: u16,
    cutting: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    cut: Arc<AtomicU64>,
    accepted: Arc<AtomicU64>,
    conns: Arc<Mutex<HashMap<u64, (TcpStream, TcpStream)>>>,
    threads: Vec<JoinHandle<()>>,
}

impl CuttingProxy {
    fn start(target_port: u16) -> CuttingProxy {
        let port = free_port();
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("binding the proxy");
        listener.set_nonblocking(true).unwrap();
        let cutting = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let cut = Arc::new(AtomicU64::new(0));
        let accepted = Arc::new(AtomicU64::new(0));
        let conns: Arc<Mutex<HashMap<u64, (TcpStream, TcpStream)>>> = Arc::default();

        let acceptor = {
            let (stop, accepted, conns) = (stop.clone(), accepted.clone(), conns.clone());
            std::thread::spawn(move || {
                let mut next_id = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let client = match listener.accept() {
                        Ok((c, _)) => c,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(10));
                            continue;
                        }
                        Err(e) => {
                            eprintln!("proxy accept: {e}");
                            std::thread::sleep(Duration::from_millis(10));
                            continue;
                        }
                    };
                    client.set_nonblocking(false).unwrap();
                    let server = match TcpStream::connect(("127.0.0.1", target_port)) {
                        Ok(s) => s,
                        Err(_) => {
                            let _ = client.shutdown(Shutdown::Both);
                            continue;
                        }
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    next_id += 1;
                    let id = next_id;
                    accepted.fetch_add(1, Ordering::Relaxed);
                    conns.lock().unwrap().insert(
                        id,
                        (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    );
                    pump(
                        id,
                        client.try_clone().unwrap(),
                        server.try_clone().unwrap(),
                        &conns,
                    );
                    pump(id, server, client, &conns);
                }
            })
        };

        let cutter = {
            let (cutting, stop, cut, conns) =
                (cutting.clone(), stop.clone(), cut.clone(), conns.clone());
            std::thread::spawn(move || {
                let mut last = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(20));
                    if last.elapsed() < CUT_EVERY {
                        continue;
                    }
                    last = Instant::now();
                    if !cutting.load(Ordering::Relaxed) {
                        continue;
                    }
                    let live: Vec<_> = conns.lock().unwrap().drain().collect();
                    for (_, (a, b)) in live {
                        let _ = a.shutdown(Shutdown::Both);
                        let _ = b.shutdown(Shutdown::Both);
                        cut.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };

        CuttingProxy {
            port,
            cutting,
            stop,
            cut,
            accepted,
            conns,
            threads: vec![acceptor, cutter],
        }
    }

    fn cut_count(&self) -> u64 {
        self.cut.load(Ordering::Relaxed)
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Cuts every live connection now.
    fn cut_now(&self) {
        let live: Vec<_> = self.conns.lock().unwrap().drain().collect();
        for (_, (a, b)) in live {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
            self.cut.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Stops cutting; connections are forwarded untouched from now on.
    fn stop_cutting(&self) {
        self.cutting.store(false, Ordering::Relaxed);
    }

    /// Stops accepting, closes every connection and joins the threads.
    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        for (_, (a, b)) in self.conns.lock().unwrap().drain() {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Copies `from` → `to` on its own thread; when either side ends, closes both
/// and forgets the connection (it ended by itself, not by a cut).
fn pump(
    id: u64,
    mut from: TcpStream,
    mut to: TcpStream,
    conns: &Arc<Mutex<HashMap<u64, (TcpStream, TcpStream)>>>,
) {
    let conns = conns.clone();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
        conns.lock().unwrap().remove(&id);
    });
}

/// The log without its terminal colour codes.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // ESC [ parameters final-byte
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn initial_sync_survives_a_connection_cut_every_few_seconds() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut ps = ProcessServer::init(&root.join("ps"), None, &[]).unwrap();
    ps.start().unwrap();
    let mut proxy = CuttingProxy::start(ps.port);

    let agent_dir = root.join("agent");
    let size = 512 * MIB;
    let certs = ps.dir.join("machines").join(MACHINE);
    // All replication traffic goes through the proxy. 512 MiB at 64 MiB/s: ≥ 8 s
    // of sync, several cuts.
    let mut agent = Agent::configure(
        &agent_dir,
        MACHINE,
        &certs,
        proxy.port,
        &[("root", size)],
        "sync-rate-limit = 67108864",
    )
    .unwrap();
    fill_random(
        &agent.image("root"),
        0,
        size,
        &mut Rng(0x5eed_0000_cafe_0004),
    );
    agent.start().unwrap();

    agent.wait_synced(Duration::from_secs(300)).unwrap();
    let cut_during_sync = proxy.cut_count();
    proxy.stop_cutting();
    eprintln!(
        "proxy: {cut_during_sync} connections cut during the sync, {} accepted",
        proxy.accepted()
    );
    assert!(
        cut_during_sync >= 3,
        "only {cut_during_sync} connections were cut during the sync"
    );

    let acked = agent.wait_acked(Duration::from_secs(120)).unwrap();
    wait_stored(&ps.store_url, MACHINE, &[], acked, Duration::from_secs(120)).unwrap();

    // The agent is back on an uncut connection (after at most its capped
    // backoff) and everything is acknowledged.
    let status = wait_for("the agent to reconnect", Duration::from_secs(30), || {
        let s = agent.status().ok()?;
        (s["connected"] == true).then_some(s)
    })
    .unwrap();
    assert_eq!(
        status["positions"]["acked"], status["positions"]["captured"],
        "{status}"
    );
    assert!(
        proxy.accepted() > cut_during_sync,
        "the agent never reconnected after the last cut ({} accepted, {cut_during_sync} cut)",
        proxy.accepted()
    );

    let pts = points(&ps.store_url, MACHINE, &[]).unwrap();
    let first = &pts["points"][0];
    assert_eq!(first["label"], "initial-sync-complete", "{pts}");

    let out = root.join("out");
    let o = failover(&ps.store_url, MACHINE, "latest", &out, &ps.kek(), &[]).unwrap();
    assert!(
        o.status.success(),
        "failover at latest: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_same(&out.join("root.raw"), &agent.image("root"));

    // Resume must be exact: the server never saw a gap in the stream, and the
    // sessions after the cuts resumed mid-stream, never going back.
    let log = strip_ansi(&ps.log());
    // (Without the random temporary path, which could spell "gap" by chance.)
    let unpathed = log.replace(&*root.to_string_lossy(), "");
    let unpathed = unpathed.replace(&*ps.dir.to_string_lossy(), "");
    assert!(
        !unpathed.to_lowercase().contains("gap"),
        "the process server reported a gap:\n{log}"
    );
    let resumed_at: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("session started") && l.contains("machine=machine-1"))
        .filter_map(|l| {
            l.split("durable=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    eprintln!("sessions resumed after seq {resumed_at:?}");
    assert!(
        resumed_at.windows(2).all(|w| w[0] <= w[1]),
        "the durable position went back: {resumed_at:?}"
    );
    assert!(
        resumed_at.iter().filter(|&&d| d > 0).count() >= 3,
        "fewer than 3 sessions resumed mid-stream: {resumed_at:?}\n{log}"
    );

    proxy.shutdown();
    agent.proc.as_mut().unwrap().stop(Duration::from_secs(10));
}

/// The first region the agent's pending checksum resync has not compared yet.
fn next_region(agent: &Agent) -> Option<u64> {
    agent.status().ok()?["checksum-resync"]["pending"]["disks"][0]["next-region"].as_u64()
}

#[test]
fn checksum_resync_resumes_where_the_link_was_cut() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let size = 512 * MIB;
    let mut rng = Rng(0x5eed_0000_cafe_0003);
    let mut proxy = None;
    let (ps, mut agent) = synced_random_disk(root, size, &mut rng, |ps| {
        let p = CuttingProxy::start(ps.port);
        p.stop_cutting(); // this test cuts by hand
        let port = p.port;
        proxy = Some(p);
        port
    });
    let mut proxy = proxy.unwrap();
    agent.stop_clean();

    // Half the disk changes behind the agent's back: 256 MiB to resend.
    fill_random(&agent.image("root"), 0, size / 2, &mut rng);
    agent.start().unwrap();
    wait_for("the agent to connect", Duration::from_secs(60), || {
        (agent.status().ok()?["connected"] == true).then_some(())
    })
    .unwrap();
    let cli = {
        let config = ps.dir.join("ps.toml");
        std::thread::spawn(move || {
            run_ok(
                Command::new(bin("lifeboat-ps"))
                    .args(["resync", "--config"])
                    .arg(config)
                    .args(["--machine", MACHINE]),
                Duration::from_secs(600),
            )
        })
    };
    // Cut twice, each time after the plan advanced past the previous cut.
    let regions = size / MIB;
    let mut cut_at = Vec::new();
    for _ in 0..2 {
        let last = cut_at.last().copied().unwrap_or(0);
        let at = wait_for("the resync to advance", Duration::from_secs(120), || {
            next_region(&agent).filter(|&r| r > last && r < regions)
        })
        .unwrap();
        proxy.cut_now();
        cut_at.push(at);
    }
    eprintln!("cut the link at regions {cut_at:?} of {regions}");

    let out = cli.join().unwrap().unwrap();
    assert!(
        out.contains("the agent resumes the resync when it reconnects"),
        "the CLI must report the cut and keep waiting:\n{out}"
    );
    let done: serde_json::Value = serde_json::from_str(out.lines().last().unwrap())
        .unwrap_or_else(|e| panic!("resync output {out:?}: {e}"));
    // The last run started where the second cut left the plan, not from zero.
    let hashed = done["hashed-bytes"].as_u64().unwrap();
    assert!(
        hashed <= size - cut_at[1] * MIB,
        "the resumed run hashed {hashed} bytes; the plan was at region {} when cut: {done}",
        cut_at[1]
    );
    let log = agent.proc.as_ref().unwrap().log_text();
    assert!(log.contains("checksum resync resumes at region"), "{log}");

    ps.assert_point_exact(
        MACHINE,
        "checksum-resync-complete",
        done["tag-seq"].as_u64().unwrap(),
        &agent.image("root"),
        &root.join("out"),
    );
    proxy.shutdown();
    agent.proc.as_mut().unwrap().stop(Duration::from_secs(10));
}
