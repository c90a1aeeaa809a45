//! The process server's cache filesystem fills up (issue 7) while an agent
//! keeps writing: RocksDB's writes fail with ENOSPC. Nothing is acknowledged
//! that the cache did not make durable, the server names the cache directory
//! and the lack of space (its log, `lifeboat-ps status`, the agent's
//! `last-error`), the agent keeps what it captured in its journal, and once
//! space returns the same server process goes on by itself: the stream is
//! acknowledged, and failover of the latest point (and of a point taken
//! while the cache was full) is the source byte for byte.

use std::path::Path;
use std::time::Duration;

use lifeboat_tests::*;

const MACHINE: &str = "machine-1";
const MIB: u64 = 1024 * 1024;

fn positions(agent: &Agent) -> (u64, u64) {
    let s = agent.status().unwrap();
    let p = &s["positions"];
    (
        p["captured"].as_u64().unwrap(),
        p["acked"].as_u64().unwrap(),
    )
}

/// `len` random bytes from `rng` into a new file.
fn random_file(path: &Path, len: u64, rng: &mut Rng) {
    std::fs::File::create(path).unwrap().set_len(len).unwrap();
    fill_random(path, 0, len, rng);
}

/// A small cache filesystem: 48 MiB, smaller than RocksDB's WAL
/// preallocation (1.1 × the log family's 64 MiB write buffer), which tmpfs
/// then refuses as a whole, so WAL appends allocate as they go and meet the
/// full filesystem at once: none of the writes made while it is full is
/// acknowledged. With room again it has less free than the 64 MiB RocksDB
/// needs to resume by itself: the server reopens its cache.
#[test]
fn a_full_cache_filesystem_acknowledges_nothing_and_recovers_by_itself() {
    full_cache("48m", 3, true);
}

/// A larger cache filesystem (768 MiB): the WAL's 70 MiB preallocation
/// holds the first writes made while the rest is full (they are durable and
/// acknowledged), the memtable's flush and the next WAL then hit ENOSPC.
/// With room again RocksDB's own recovery (it polls every 5 s once 64 MiB
/// are free) and the server's reopen both may run.
#[test]
fn a_full_cache_filesystem_with_room_for_rocksdb_to_resume_recovers_by_itself() {
    full_cache("768m", 48, false);
}

/// Fills the cache's filesystem (`size`), makes `writes` 4 MiB writes
/// through the agent, checks that the server says why and acknowledges
/// nothing more (`none_acked`: not even the first write), frees the space
/// and checks that the same server process goes on and both points fail
/// over exact.
fn full_cache(size: &str, writes: u64, none_acked: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut ps = ProcessServer::init(&root.join("ps"), None, &[]).unwrap();
    let cache_dir = ps.dir.join("cache");
    let fs = SmallFs::mount(&cache_dir, size);
    // What is tested here is a filesystem that fills faster than the server
    // looks (its backpressure would refuse the writes first, see
    // status_metrics.rs): backpressure off.
    ps.append_config("[health]\nbackpressure-free = 0\n");
    ps.start().unwrap();
    let ps_pid = ps.proc.as_ref().unwrap().pid();
    let mut agent = ps.synced_agent(&root.join("agent"), MACHINE, &[("root", 64 * MIB)]);
    let uri = agent.uri("root");
    qemu_io(&uri, &["write -P 0x11 0 4M", "flush"]).unwrap();
    let before = agent.wait_acked(Duration::from_secs(120)).unwrap();

    // Something else takes the cache's filesystem (256 KiB left), and the
    // agent keeps writing 4 MiB writes, each larger than what is left.
    let filler = fs.0.join("filler");
    std::fs::write(&filler, vec![0u8; (fs.free() - 256 * 1024) as usize]).unwrap();
    let mut rng = Rng(0x7e57_00c1);
    let data = root.join("data.bin");
    random_file(&data, 4 * MIB, &mut rng);
    let cmds: Vec<String> = (0..writes)
        .map(|i| format!("write -s {} {}M 4M", data.display(), 8 + i % 9 * 6))
        .chain(["flush".to_string()])
        .collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    // The agent's own journal has room: the writes and the FLUSH succeed.
    qemu_io(&uri, &cmds).unwrap();
    let while_full = agent.tag().unwrap();
    let full_image = root.join("while-full.img");
    snapshot(&agent.image("root"), &full_image);

    // The server says why, naming the cache directory and the lack of space.
    let cache_name = cache_dir.display().to_string();
    wait_for(
        "the process server to log the full cache",
        Duration::from_secs(60),
        || {
            let log = ps.log();
            log.lines()
                .any(|l| l.contains(&cache_name) && l.to_lowercase().contains("no space"))
                .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", ps.log()));
    let st = wait_for(
        "`lifeboat-ps status` to report the full cache",
        Duration::from_secs(60),
        || {
            let st = ps.status_json();
            st["cache"]["error"].as_str().is_some().then_some(st)
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {}", ps.status_json()));
    let why = st["cache"]["error"].as_str().unwrap();
    assert!(
        why.contains(&cache_name) && why.to_lowercase().contains("no space"),
        "status: {st}"
    );
    assert_eq!(st["cache"]["writable"], false, "status: {st}");
    // The agent is told too, and keeps everything unacknowledged in its
    // journal (it stays out of `bitmap`: nothing is dropped from it).
    let s = wait_for(
        "the agent to name the full cache",
        Duration::from_secs(60),
        || {
            let s = agent.status().ok()?;
            s["last-error"]
                .as_str()?
                .to_lowercase()
                .contains("no space")
                .then_some(s)
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}", agent.status().ok()));
    assert_ne!(s["mode"], "bitmap", "agent status: {s}");
    // Not everything written while the cache is full was acknowledged (with
    // a small cache: nothing; none of it fits in what is left), and an
    // acknowledgement follows only a synced write.
    let (captured, acked) = positions(&agent);
    assert!(captured >= while_full, "captured {captured}");
    assert!(acked < while_full, "the tag at {while_full} acknowledged");
    if none_acked {
        assert_eq!(
            acked,
            before,
            "acknowledged while the cache could not hold it; server log:\n{}",
            ps.log()
        );
    }
    // Still nothing after the agent was refused twice more.
    let refusals = |ps: &ProcessServer| ps.log().matches("session ended: sink:").count();
    let seen = refusals(&ps);
    wait_for(
        "the agent to be refused twice more",
        Duration::from_secs(120),
        || (refusals(&ps) >= seen + 2).then_some(()),
    )
    .unwrap();
    assert_eq!(positions(&agent).1, acked);

    // Space returns: the same server process goes on by itself.
    std::fs::remove_file(&filler).unwrap();
    agent
        .wait_acked(Duration::from_secs(180))
        .unwrap_or_else(|e| panic!("{e}; server log:\n{}", ps.log()));
    let p = ps.proc.as_mut().unwrap();
    assert!(p.is_running(), "the server exited:\n{}", ps.log());
    assert_eq!(p.pid(), ps_pid);
    let st = wait_for(
        "`lifeboat-ps status` to report the cache writable",
        Duration::from_secs(60),
        || {
            let st = ps.status_json();
            (st["cache"]["writable"] == true).then_some(st)
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {}", ps.status_json()));
    assert!(st["cache"]["error"].is_null(), "status: {st}");
    qemu_io(&uri, &["write -P 0x22 40M 3M", "flush"]).unwrap();
    agent.wait_acked(Duration::from_secs(120)).unwrap();
    let last = agent.tag().unwrap();
    wait_stored(&ps.store_url, MACHINE, &[], last, Duration::from_secs(180)).unwrap();

    // The point taken while the cache was full, and the latest, are exact.
    let out = ps.failover_ok(MACHINE, &while_full.to_string(), &root.join("out-full"));
    assert_same(&out.join("root.raw"), &full_image);
    let out = ps.failover_ok(MACHINE, "latest", &root.join("out-latest"));
    assert_same(&out.join("root.raw"), &agent.image("root"));
    agent.stop_clean();
    drop(fs);
}
