//! Retention: a workload that rewrites the same 64 MiB many times, under a
//! short retention, keeps the store bounded (folded into a base of shared
//! chunks, old segments deleted), and every point still listed fails over
//! byte for byte; a folded point is refused with a clear error. A process
//! server killed with SIGKILL while it folds loses nothing: after a restart
//! every retained point is still exact.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use lifeboat_tests::nbd::NbdClient;
use lifeboat_tests::*;

const MACHINE: &str = "machine-1";
const MIB: u64 = 1024 * 1024;
const REGION: u64 = 64 * MIB;
const DISK: u64 = 96 * MIB;

fn sha(path: &Path) -> String {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().to_hex().to_string()
}

/// Total bytes of the machine's objects in a file:// store.
fn store_bytes(store_url: &str) -> u64 {
    let root = store_url.strip_prefix("file://").unwrap();
    let mut total = 0;
    let mut stack = vec![Path::new(root).join("machines").join(MACHINE)];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            // Deleted since the listing: retention at work.
            let Ok(m) = e.metadata() else {
                continue;
            };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.len();
            }
        }
    }
    total
}

fn set_retention(ps: &ProcessServer, keep: &str) {
    let cfg = ps.dir.join("ps.toml");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(&format!(
        "\n[retention]\nkeep = \"{keep}\"\nfine-window = \"{keep}\"\ntiers = []\ncompact-every = \"2s\"\nreader-grace = \"0s\"\n"
    ));
    std::fs::write(&cfg, text).unwrap();
}

struct Workload {
    nbd: NbdClient,
    rng: Rng,
    /// Point seq → hash of the source disk at it.
    expected: BTreeMap<u64, String>,
}

impl Workload {
    /// Rewrites the whole region once (random 1 MiB writes in order), then
    /// places a point and records the disk's hash at it.
    fn cycle(&mut self, agent: &Agent) -> u64 {
        let mut buf = vec![0u8; MIB as usize];
        for i in 0..REGION / MIB {
            self.rng.fill(&mut buf);
            self.nbd.write(i * MIB, &buf, 0).unwrap();
        }
        self.nbd.flush().unwrap();
        let seq = agent.tag().unwrap();
        self.expected.insert(seq, sha(&agent.image("root")));
        seq
    }
}

/// Fails over every listed point that the workload recorded and compares it.
fn check_retained(ps: &ProcessServer, expected: &BTreeMap<u64, String>, out: &Path) -> usize {
    let listed = points(&ps.store_url, MACHINE, &[]).unwrap();
    let mut checked = 0;
    for p in listed["points"].as_array().unwrap() {
        let seq = p["seq"].as_u64().unwrap();
        let Some(want) = expected.get(&seq) else {
            continue;
        };
        let dir = out.join(seq.to_string());
        ps.failover_ok(MACHINE, &seq.to_string(), &dir);
        assert_eq!(
            &sha(&dir.join("root.raw")),
            want,
            "point {seq} recovered other content than the source had at it"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        checked += 1;
    }
    checked
}

/// A process server with retention `keep`, and a synced agent whose disk
/// the returned workload writes through its NBD export.
fn start(root: &Path, keep: &str, seed: u64) -> (ProcessServer, Agent, Workload) {
    start_sized(root, keep, seed, DISK)
}

fn start_sized(root: &Path, keep: &str, seed: u64, size: u64) -> (ProcessServer, Agent, Workload) {
    let mut ps = ProcessServer::init(&root.join("ps"), None, &[]).unwrap();
    set_retention(&ps, keep);
    ps.start().unwrap();
    let certs = ps.dir.join("machines").join(MACHINE);
    let mut agent = Agent::configure(
        &root.join("agent"),
        MACHINE,
        &certs,
        ps.port,
        &[("root", size)],
        "",
    )
    .unwrap();
    agent.start().unwrap();
    agent.wait_synced(Duration::from_secs(120)).unwrap();
    let sock = agent.disks[0].2.clone();
    let w = Workload {
        nbd: NbdClient::connect(&sock, "root").unwrap(),
        rng: Rng(seed),
        expected: BTreeMap::new(),
    };
    (ps, agent, w)
}

fn base_seq(ps: &ProcessServer) -> u64 {
    points(&ps.store_url, MACHINE, &[]).unwrap()["base"]["seq"]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn rewriting_the_same_64_mib_keeps_the_store_bounded_and_retained_points_exact() {
    let root = tempfile::tempdir().unwrap();
    let (ps, agent, mut w) = start(root.path(), "15s", 11);
    const CYCLES: usize = 10;
    let mut seqs = Vec::new();
    for _ in 0..CYCLES {
        seqs.push(w.cycle(&agent));
        std::thread::sleep(Duration::from_millis(1500));
    }
    let last = *seqs.last().unwrap();
    wait_stored(&ps.store_url, MACHINE, &[], last, Duration::from_secs(120)).unwrap();
    let written = CYCLES as u64 * REGION;
    // Folds reach the cycles older than 15 s; chunks no base needs go after
    // two runs. The bound: one base of the region, the segments of the
    // cycles still inside retention, unreferenced chunks awaiting collection.
    let ceiling = 5 * REGION;
    let t0 = Instant::now();
    let reached = wait_for(
        "the store to shrink under its ceiling",
        Duration::from_secs(120),
        || {
            let b = store_bytes(&ps.store_url);
            (b <= ceiling && base_seq(&ps) >= seqs[CYCLES / 2]).then_some(b)
        },
    );
    let now = store_bytes(&ps.store_url);
    eprintln!(
        "store holds {} MiB for {} MiB written ({} s to fold); base at seq {}",
        now / MIB,
        written / MIB,
        t0.elapsed().as_secs(),
        base_seq(&ps)
    );
    reached.unwrap_or_else(|e| panic!("{e}: the store holds {now} bytes; log:\n{}", ps.log()));
    let base = base_seq(&ps);

    // Every listed point the workload recorded is exact; the folded ones
    // are refused by name.
    let out = root.path().join("out");
    let checked = check_retained(&ps, &w.expected, &out);
    assert!(checked >= 1, "no recorded point is still listed");
    let folded = seqs.iter().find(|s| **s < base).expect("a folded point");
    let o = failover(
        &ps.store_url,
        MACHINE,
        &folded.to_string(),
        &out.join("old"),
        &ps.kek(),
        &[],
    )
    .unwrap();
    assert!(!o.status.success(), "a folded point must be refused");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("older than the retention"),
        "unclear refusal: {err}"
    );
    // `latest` is the disk as it is now.
    let latest = out.join("latest");
    ps.failover_ok(MACHINE, "latest", &latest);
    assert_eq!(sha(&latest.join("root.raw")), sha(&agent.image("root")));
}

#[test]
fn a_process_server_killed_while_it_folds_loses_no_retained_point() {
    let root = tempfile::tempdir().unwrap();
    let (mut ps, agent, mut w) = start(root.path(), "10s", 23);
    let mut rng = Rng(5);
    let mut kills = 0;
    let mut last = 0;
    for round in 0..6 {
        last = w.cycle(&agent);
        // Once folds have started, kill the server at a seeded moment of the
        // next retention run (they come every 2 s and take about as long).
        if round >= 2 {
            std::thread::sleep(Duration::from_millis(200 + rng.next_u64() % 2500));
            ps.proc.as_mut().unwrap().kill9();
            kills += 1;
            ps.start().unwrap();
        } else {
            std::thread::sleep(Duration::from_secs(4));
        }
    }
    agent.wait_acked(Duration::from_secs(120)).unwrap();
    wait_stored(&ps.store_url, MACHINE, &[], last, Duration::from_secs(120)).unwrap();
    wait_for("a base after the kills", Duration::from_secs(90), || {
        (base_seq(&ps) > 0).then_some(())
    })
    .unwrap();
    let checked = check_retained(&ps, &w.expected, &root.path().join("out"));
    eprintln!(
        "{kills} kills; {checked} retained points exact; base at seq {}",
        base_seq(&ps)
    );
    assert!(checked >= 1);
    let latest = root.path().join("out/latest");
    ps.failover_ok(MACHINE, "latest", &latest);
    assert_eq!(sha(&latest.join("root.raw")), sha(&agent.image("root")));
}

/// The objects of one kind in a file:// store, by name.
fn objects(store_url: &str, kind: &str) -> Vec<std::path::PathBuf> {
    let root = store_url.strip_prefix("file://").unwrap();
    let dir = Path::new(root).join("machines").join(MACHINE).join(kind);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

fn verify(ps: &ProcessServer, point: &str) -> std::process::Output {
    run_timeout(
        std::process::Command::new(bin("lifeboat-mt"))
            .args([
                "verify",
                "--store",
                &ps.store_url,
                "--machine",
                MACHINE,
                "--point",
                point,
            ])
            .arg("--key-file")
            .arg(ps.kek()),
        Duration::from_secs(120),
    )
    .unwrap()
}

/// The sha256 sum of a file, as `sha256sum` prints it.
fn sha256sum(path: &Path) -> String {
    let out = run_ok(
        std::process::Command::new("sha256sum").arg(path),
        Duration::from_secs(60),
    )
    .unwrap();
    out.split_whitespace().next().unwrap().to_string()
}

#[test]
fn verify_checks_a_point_and_names_a_deleted_segment_a_truncated_chunk_and_a_flipped_byte() {
    let root = tempfile::tempdir().unwrap();
    let (mut ps, agent, mut w) = start(root.path(), "10s", 31);
    let cycled = w.cycle(&agent);
    std::thread::sleep(Duration::from_secs(11));
    // A base that holds the cycle's data (a fold that ran before the cycle
    // aged past the horizon holds only the synced zeros and no chunk).
    wait_for("a base holding the cycle", Duration::from_secs(90), || {
        (base_seq(&ps) >= cycled).then_some(())
    })
    .unwrap();
    // No further fold (a slow machine would fold the later writes too): the
    // server comes back with a long retention.
    ps.proc.as_mut().unwrap().stop(Duration::from_secs(30));
    let cfg = ps.dir.join("ps.toml");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("keep = \"10s\"", "keep = \"1h\"");
    std::fs::write(&cfg, text).unwrap();
    ps.start().unwrap();
    agent.wait_acked(Duration::from_secs(60)).unwrap();
    // Later writes in segments after the base: half the region again.
    let mut buf = vec![0u8; MIB as usize];
    for i in 0..REGION / MIB / 2 {
        w.rng.fill(&mut buf);
        w.nbd.write(i * 2 * MIB, &buf, 0).unwrap();
    }
    w.nbd.flush().unwrap();
    let last = agent.tag().unwrap();
    wait_stored(&ps.store_url, MACHINE, &[], last, Duration::from_secs(120)).unwrap();
    wait_for("a base", Duration::from_secs(60), || {
        (base_seq(&ps) > 0).then_some(())
    })
    .unwrap();
    // No more folds while objects are tampered with.
    ps.proc.as_mut().unwrap().stop(Duration::from_secs(30));

    let o = verify(&ps, &last.to_string());
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "verify: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let want = sha256sum(&agent.image("root"));
    assert!(
        stdout.contains(&format!("sha256 {want}")),
        "verify must print the source's sha256 {want}: {stdout}"
    );
    assert!(stdout.contains("the base at seq"), "{stdout}");

    let refused = |what: &str, name: &str| {
        let o = verify(&ps, &last.to_string());
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(!o.status.success(), "verify passed with {what}");
        assert!(
            err.contains(name),
            "verify must name {name} for {what}: {err}"
        );
    };
    // A deleted segment: the missing seqs are named.
    // One the point needs: the agent's checksums entry after the tag may sit
    // in a later segment, which the point does not read.
    let segs = objects(&ps.store_url, "log");
    let first_seq = |p: &std::path::PathBuf| {
        let f = p.file_name().unwrap().to_string_lossy().to_string();
        u64::from_str_radix(f.split('-').next().unwrap(), 16).unwrap()
    };
    let seg = segs.iter().rfind(|p| first_seq(p) <= last).unwrap().clone();
    let aside = root.path().join("aside");
    std::fs::copy(&seg, &aside).unwrap();
    std::fs::remove_file(&seg).unwrap();
    let file = seg.file_name().unwrap().to_string_lossy().to_string();
    let first = u64::from_str_radix(file.split('-').next().unwrap(), 16).unwrap();
    refused(
        "a deleted segment",
        &format!("no segment holds seqs {first}..="),
    );
    std::fs::copy(&aside, &seg).unwrap();
    // A flipped byte in a segment.
    let mut bytes = std::fs::read(&seg).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&seg, &bytes).unwrap();
    refused("a flipped byte", &file);
    std::fs::copy(&aside, &seg).unwrap();
    // A truncated chunk.
    let chunk = objects(&ps.store_url, "chunks")[0].clone();
    let id = chunk.file_name().unwrap().to_string_lossy().to_string();
    let bytes = std::fs::read(&chunk).unwrap();
    std::fs::write(&chunk, &bytes[..bytes.len() / 2]).unwrap();
    refused("a truncated chunk", &id);
    std::fs::write(&chunk, &bytes).unwrap();
    let o = verify(&ps, &last.to_string());
    assert!(
        o.status.success(),
        "restored: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn time_recovers_the_stream_as_it_stood_at_that_moment_between_points() {
    let root = tempfile::tempdir().unwrap();
    // Nothing is folded in this test: every moment is inside retention.
    let (ps, agent, mut w) = start(root.path(), "1h", 41);
    let mut moments = Vec::new();
    let mut buf = vec![0u8; MIB as usize];
    for round in 0..4u64 {
        // A burst of writes (no point is taken), acknowledged, then a
        // quiet moment T, then the next burst.
        for i in 0..3 {
            w.rng.fill(&mut buf);
            w.nbd.write((round * 8 + i) * MIB, &buf, 0).unwrap();
        }
        w.nbd.flush().unwrap();
        agent.wait_acked(Duration::from_secs(60)).unwrap();
        std::thread::sleep(Duration::from_millis(700));
        let t = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        moments.push((t, sha(&agent.image("root"))));
        std::thread::sleep(Duration::from_millis(700));
    }
    let captured = agent.status().unwrap()["positions"]["captured"]
        .as_u64()
        .unwrap();
    wait_stored(
        &ps.store_url,
        MACHINE,
        &[],
        captured,
        Duration::from_secs(60),
    )
    .unwrap();
    let listed = points(&ps.store_url, MACHINE, &[]).unwrap();
    let out = root.path().join("out");
    for (i, (t, want)) in moments.iter().enumerate() {
        let dir = out.join(i.to_string());
        let o = failover(&ps.store_url, MACHINE, t, &dir, &ps.kek(), &[]).unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "failover --point {t}: {err}");
        assert!(
            err.contains("as it stood at"),
            "not recovered to the moment: {err}"
        );
        assert_eq!(
            &sha(&dir.join("root.raw")),
            want,
            "--point {t} is not the disk as it was then (points: {listed})"
        );
    }
}

#[test]
fn a_workload_that_turns_to_random_overwrites_marks_points_suspect_and_last_clean_is_before_it() {
    let root = tempfile::tempdir().unwrap();
    let (ps, agent, mut w) = start(root.path(), "1h", 53);
    let mut buf = vec![0u8; MIB as usize];
    let mut write_cycle = |w: &mut Workload, compressible: bool| {
        for i in 0..16u64 {
            w.rng.fill(&mut buf);
            if compressible {
                // Half of every 4 KiB block is zeros: zstd halves it.
                for block in buf.chunks_mut(4096) {
                    block[2048..].fill(0);
                }
            }
            w.nbd.write(i * MIB, &buf, 0).unwrap();
        }
        w.nbd.flush().unwrap();
        let seq = agent.tag().unwrap();
        w.expected.insert(seq, sha(&agent.image("root")));
        seq
    };
    let clean: Vec<u64> = (0..4).map(|_| write_cycle(&mut w, true)).collect();
    let encrypted: Vec<u64> = (0..3).map(|_| write_cycle(&mut w, false)).collect();
    wait_stored(
        &ps.store_url,
        MACHINE,
        &[],
        *encrypted.last().unwrap(),
        Duration::from_secs(60),
    )
    .unwrap();
    let listed = points(&ps.store_url, MACHINE, &[]).unwrap();
    let suspect = |seq: u64| {
        listed["points"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["seq"] == seq)
            .unwrap_or_else(|| panic!("point {seq} not listed: {listed}"))["suspect"]
            .as_bool()
            .unwrap()
    };
    for s in &clean {
        assert!(
            !suspect(*s),
            "compressible churn marked suspect at {s}: {listed}"
        );
    }
    // Sustained (two incompressible points in a row): both, and every later one.
    assert!(encrypted.iter().all(|s| suspect(*s)), "{listed}");
    // last-clean is the newest point before the first suspect one: before
    // the first random overwrite.
    let out = root.path().join("clean");
    let o = failover(&ps.store_url, MACHINE, "last-clean", &out, &ps.kek(), &[]).unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let last = *clean.last().unwrap();
    assert!(err.contains(&format!("point {last}")), "{err}");
    assert_eq!(&sha(&out.join("root.raw")), &w.expected[&last]);
}

#[test]
fn a_disk_grown_and_shrunk_across_bases_with_a_partial_last_chunk_recovers_exactly() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    // Not a multiple of the 1 MiB chunk: the last chunk is partial.
    let size = 10 * MIB + 3 * 4096 + 512;
    let (ps, mut agent, mut w) = start_sized(r, "10s", 61, size);
    let image = agent.image("root");
    let mut buf = vec![0u8; 4096];
    for i in 0..(size / 4096) {
        w.rng.fill(&mut buf);
        w.nbd.write(i * 4096, &buf, 0).unwrap();
    }
    w.rng.fill(&mut buf[..512]);
    w.nbd.write(size - 512, &buf[..512], 0).unwrap();
    w.nbd.flush().unwrap();
    let mut snaps = BTreeMap::new();
    let a = agent.tag().unwrap();
    snaps.insert(a, sha(&image));
    let folded_to = |seq: u64| {
        wait_for(
            &format!("a base at or after seq {seq}"),
            Duration::from_secs(90),
            || (base_seq(&ps) >= seq).then_some(()),
        )
        .unwrap()
    };
    std::thread::sleep(Duration::from_secs(10));
    folded_to(a);
    drop(w);
    // Grown while stopped (its new end holds data), then shrunk below the
    // first size: each a checksum resync and its point, each folded.
    let mut rng = Rng(62);
    for (i, new_size) in [14 * MIB + 1000, 6 * MIB + 700].into_iter().enumerate() {
        agent.stop_clean();
        resize_file(&image, new_size);
        if i == 0 {
            fill_random(&image, 12 * MIB, 2 * MIB + 1000, &mut rng);
        }
        agent.start().unwrap();
        let report = agent
            .wait_checksum_resync(Duration::from_secs(120))
            .unwrap();
        let seq = report["tag-seq"].as_u64().unwrap();
        snaps.insert(seq, sha(&image));
        wait_stored(&ps.store_url, MACHINE, &[], seq, Duration::from_secs(60)).unwrap();
        std::thread::sleep(Duration::from_secs(10));
        folded_to(seq);
    }
    // And writes after the last base.
    let sock = agent.disks[0].2.clone();
    let mut nbd = NbdClient::connect(&sock, "root").unwrap();
    rng.fill(&mut buf);
    nbd.write(6 * MIB - 4096, &buf, 0).unwrap();
    nbd.flush().unwrap();
    let d = agent.tag().unwrap();
    snaps.insert(d, sha(&image));
    wait_stored(&ps.store_url, MACHINE, &[], d, Duration::from_secs(60)).unwrap();
    let out = r.join("out");
    let checked = check_retained(&ps, &snaps, &out);
    assert!(
        checked >= 2,
        "the base's point and the later one: {checked}"
    );
    let latest = out.join("latest");
    ps.failover_ok(MACHINE, "latest", &latest);
    assert_eq!(
        std::fs::metadata(latest.join("root.raw")).unwrap().len(),
        6 * MIB + 700
    );
    assert_eq!(sha(&latest.join("root.raw")), sha(&image));
}
