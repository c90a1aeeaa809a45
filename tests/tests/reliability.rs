//! End-to-end regressions of the agent's silent-loss defects (issue 7): every
//! write the export accepts replicates, journal and disk I/O errors never skip
//! data, and the state tells the truth when replication does not progress.

use std::time::Duration;

use lifeboat_tests::*;

const MACHINE: &str = "machine-1";
const MIB: u64 = 1024 * 1024;

/// Writes of 9 MiB, 16 MiB and the export's maximum (32 MiB) through qemu-io,
/// and 16 MiB blocks through fio's NBD engine, replicate: the stream keeps
/// being acknowledged, a point is taken after them and fails over byte-equal,
/// and a restarted agent reads its journal back.
#[test]
fn writes_up_to_the_export_maximum_replicate() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (ps, mut agent) = start_pair(root, &[("root", 128 * MIB)], "").unwrap();
    let uri = agent.uri("root");
    qemu_io(
        &uri,
        &[
            "write -P 0x11 0 9M",
            "write -P 0x22 10M 16M",
            "write -P 0x33 32M 32M",
            "write -P 0x44 65k 9M",
            "flush",
        ],
    )
    .unwrap();
    fio_randwrite(
        &uri,
        &root.join("fio.json"),
        &["--bs=16M", "--iodepth=2", "--size=128M", "--io_size=64M"],
    )
    .unwrap();
    let acked = agent.wait_acked(Duration::from_secs(120)).unwrap();
    let s = agent.status().unwrap();
    assert_eq!(s["state"], "streaming", "status after large writes: {s}");
    let tag = agent.tag().unwrap();
    assert!(tag > acked);
    assert_tag_exact(&ps, &agent, tag, &root.join("out1"));

    // The journal holds records of the largest size and reads them back:
    // with the process server down they stay unacknowledged in it across a
    // kill -9 of the agent.
    let mut ps = ps;
    ps.proc.as_mut().unwrap().kill9();
    qemu_io(
        &uri,
        &["write -P 0x55 0 32M", "write -P 0x66 96M 31M", "flush"],
    )
    .unwrap();
    agent.proc.as_mut().unwrap().kill9();
    agent.start().unwrap();
    ps.start().unwrap();
    agent.wait_acked(Duration::from_secs(120)).unwrap();
    wait_for("streaming again", Duration::from_secs(120), || {
        (agent.status().ok()?["state"] == "streaming").then_some(())
    })
    .unwrap();
    let tag = agent.tag().unwrap();
    assert_tag_exact(&ps, &agent, tag, &root.join("out2"));
}

/// qemu-io without failing on the tool's own error reports: returns whether
/// every command succeeded, and the output.
fn qemu_io_status(uri: &str, cmds: &[&str]) -> (bool, String) {
    let mut cmd = std::process::Command::new("qemu-io");
    cmd.args(["-f", "raw", "-t", "writeback", uri]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    let o = run_timeout(&mut cmd, Duration::from_secs(120)).unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success() && !text.contains("failed"), text)
}

fn wait_state(agent: &Agent, state: &str, timeout: Duration) -> serde_json::Value {
    wait_for(&format!("agent state {state}"), timeout, || {
        let s = agent.status().ok()?;
        (s["state"] == state).then_some(s)
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}; status {:?}\nagent log:\n{}",
            agent.status().ok(),
            agent
                .proc
                .as_ref()
                .map(|p| p.log_text())
                .unwrap_or_default()
        )
    })
}

/// The journal's filesystem fills up while the process server is away: the
/// agent degrades to `bitmap` (a FLUSH that cannot be made durable fails),
/// keeps the journal readable, and recovers by itself once acknowledgements
/// free space: FLUSH works again, the dirty regions are resent, a point
/// fails over byte-equal, and a kill -9 afterwards restarts cleanly.
#[test]
fn a_full_journal_filesystem_degrades_and_recovers_by_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (mut ps, mut agent) =
        configured_pair(root, &[("root", 96 * MIB)], "journal-max-bytes = 16777216").unwrap();
    let fs = SmallFs::mount(&agent.dir.join("state/journal"), "48m");
    agent.start().unwrap();
    agent.wait_synced(Duration::from_secs(120)).unwrap();
    let uri = agent.uri("root");

    // Something else fills the journal's filesystem, and the process server
    // is away (nothing acknowledged frees journal space meanwhile).
    ps.proc.as_mut().unwrap().kill9();
    let filler = fs.0.join("filler");
    std::fs::write(&filler, vec![0u8; (fs.free() - 3 * MIB) as usize]).unwrap();
    let mut rng = Rng(0x7e57_0001);
    let data = root.join("data.bin");
    fill_random_file(&data, 4 * MIB, &mut rng);
    // 3 writes of 4 MiB: more than the 3 MiB left.
    let mut cmds: Vec<String> = (0..3)
        .map(|i| format!("write -s {} {}M 4M", data.display(), i * 5 + 1))
        .collect();
    cmds.push("flush".into());
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let (ok, out) = qemu_io_status(&uri, &cmds);
    assert!(
        !ok,
        "a FLUSH the journal cannot make durable must fail:\n{out}"
    );
    let s = wait_state(&agent, "bitmap", Duration::from_secs(30));
    assert!(
        s["state-reason"]
            .as_str()
            .unwrap()
            .contains("journal write failed"),
        "{s}"
    );
    assert!(!s["journal-error"].is_null(), "{s}");
    let refused = agent.tag().unwrap_err().to_string();
    assert!(refused.contains("journal write failed"), "{refused}");

    // Space returns and so does the process server: the kept records are
    // written, the dirty regions resent, and FLUSH works again.
    std::fs::remove_file(&filler).unwrap();
    ps.start().unwrap();
    wait_state(&agent, "streaming", Duration::from_secs(180));
    qemu_io(&uri, &["write -P 0x6b 90M 1M", "flush"]).unwrap();
    agent.wait_acked(Duration::from_secs(120)).unwrap();
    let tag = agent.tag().unwrap();
    assert_tag_exact(&ps, &agent, tag, &root.join("out1"));

    // After a kill -9 the journal opens (its acknowledged file is freed once
    // the welcome says so) and replication goes on.
    agent.proc.as_mut().unwrap().kill9();
    agent.start().unwrap();
    wait_state(&agent, "streaming", Duration::from_secs(180));
    qemu_io(&uri, &["write -P 0x7c 92M 2M", "flush"])
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.proc.as_ref().unwrap().log_text()));
    wait_state(&agent, "streaming", Duration::from_secs(180));
    agent.wait_acked(Duration::from_secs(120)).unwrap();
    let tag = agent.tag().unwrap();
    assert_tag_exact(&ps, &agent, tag, &root.join("out2"));
}

/// A write that fails on the protected disk after part of it landed (ENOSPC
/// on a sparse image whose filesystem is full) is resent from the disk: the
/// replica ends byte-equal to whatever the disk holds.
#[test]
fn a_disk_write_that_fails_part_way_is_resent() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut ps = ProcessServer::init(&root.join("ps"), None, &[]).unwrap();
    ps.start().unwrap();
    let certs = ps.dir.join("machines").join(MACHINE);
    let adir = root.join("agent");
    // The disk image lives on a 24 MiB filesystem but is 64 MiB (sparse).
    let fs = SmallFs::mount(&adir, "24m");
    let mut agent =
        Agent::configure(&adir, MACHINE, &certs, ps.port, &[("root", 64 * MIB)], "").unwrap();
    // The agent's state has room of its own: only the disk fills up.
    let _state = SmallFs::mount(&adir.join("state"), "64m");
    let filler = adir.join("filler");
    agent.start().unwrap();
    agent.wait_synced(Duration::from_secs(120)).unwrap();
    // Leave about 6 MiB for the disk's data (the state dir needs a little).
    let free = fs.free();
    std::fs::write(&filler, vec![0u8; (free - 6 * MIB) as usize]).unwrap();
    let uri = agent.uri("root");
    let mut rng = Rng(0x7e57_0002);
    let data = root.join("data.bin");
    fill_random_file(&data, 12 * MIB, &mut rng);
    let (ok, out) = qemu_io_status(&uri, &[&format!("write -s {} 0 12M", data.display())]);
    assert!(!ok, "the write must fail for lack of space:\n{out}");
    // The range went dirty (state bitmap, briefly) and a resync resent it.
    wait_for(
        "the failed write to be resent",
        Duration::from_secs(60),
        || {
            let log = agent.proc.as_ref()?.log_text();
            (log.contains("-> bitmap: write of") && log.contains("failed on disk root"))
                .then_some(())
        },
    )
    .unwrap();
    std::fs::remove_file(&filler).unwrap();
    wait_state(&agent, "streaming", Duration::from_secs(180));
    qemu_io(&uri, &["write -P 0x42 40M 1M", "flush"]).unwrap();
    agent.wait_acked(Duration::from_secs(120)).unwrap();
    let tag = agent.tag().unwrap();
    assert_tag_exact(&ps, &agent, tag, &root.join("out"));
    agent.stop_clean();
}

/// `len` random bytes from `rng` into a new file.
fn fill_random_file(path: &std::path::Path, len: u64, rng: &mut Rng) {
    std::fs::File::create(path).unwrap().set_len(len).unwrap();
    fill_random(path, 0, len, rng);
}

/// A read error during the initial sync (here: the image shrank under the
/// agent) ends one run, not the sync: the supervisor starts it again, and once
/// the disk reads again the sync completes with an exact first point.
#[test]
fn an_initial_sync_read_error_is_retried_until_the_sync_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let size = 192 * MIB;
    let (ps, mut agent) =
        configured_pair(root, &[("root", size)], "sync-rate-limit = 33554432").unwrap();
    let mut rng = Rng(0x7e57_0003);
    fill_random(&agent.image("root"), 0, size, &mut rng);
    let original = root.join("original.img");
    snapshot(&agent.image("root"), &original);
    agent.start().unwrap();
    // Cut the image below the sync's cursor for a while: its reads fail.
    std::thread::sleep(Duration::from_secs(2));
    resize_file(&agent.image("root"), 32 * MIB);
    wait_for(
        "the sync to report a read error",
        Duration::from_secs(60),
        || {
            agent
                .proc
                .as_ref()
                .unwrap()
                .log_text()
                .contains("initial sync stopped")
                .then_some(())
        },
    )
    .unwrap();
    // The disk comes back as it was.
    copy_range(&original, &agent.image("root"), 32 * MIB, size - 32 * MIB);
    agent.wait_synced(Duration::from_secs(180)).unwrap();
    let label = "initial-sync-complete";
    let point = wait_for(
        "the first point in the store",
        Duration::from_secs(120),
        || {
            let pts = points(&ps.store_url, MACHINE, &[]).ok()?;
            let p = pts["points"]
                .as_array()?
                .iter()
                .find(|p| p["label"] == label)?;
            p["id"].as_str().map(String::from)
        },
    )
    .unwrap();
    ps.assert_point_exact(
        MACHINE,
        label,
        point.parse().unwrap(),
        &agent.image("root"),
        &root.join("out"),
    );
}

/// With the process server gone, status says `stalled` (not `streaming`)
/// after a while, with the reason and since when.
#[test]
fn replication_that_does_not_progress_shows_as_stalled() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (mut ps, agent) = start_pair(root, &[("root", 32 * MIB)], "").unwrap();
    ps.proc.as_mut().unwrap().kill9();
    qemu_io(&agent.uri("root"), &["write -P 0x11 0 1M", "flush"]).unwrap();
    let s = wait_state(&agent, "stalled", Duration::from_secs(90));
    let reason = s["state-reason"].as_str().unwrap();
    assert!(reason.contains("nothing acknowledged"), "{s}");
    assert!(reason.contains("connect"), "the link error is named: {s}");
    assert!(s["state-since"].as_str().is_some(), "{s}");
    ps.start().unwrap();
    wait_state(&agent, "streaming", Duration::from_secs(60));
}

/// Copies `len` bytes at `offset` from `src` into `dst` (synced).
fn copy_range(src: &std::path::Path, dst: &std::path::Path, offset: u64, len: u64) {
    use std::os::unix::fs::FileExt;
    let s = std::fs::File::open(src).unwrap();
    let d = std::fs::OpenOptions::new().write(true).open(dst).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        s.read_exact_at(&mut buf[..n], offset + at).unwrap();
        d.write_all_at(&buf[..n], offset + at).unwrap();
        at += n as u64;
    }
    d.sync_all().unwrap();
}

/// Every file, directory and socket the agent creates is private to its
/// owner: the journal and state hold plaintext disk data, and the sockets
/// accept writes to the disk.
#[test]
fn the_agent_creates_nothing_others_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (_ps, agent) = start_pair(root, &[("root", 16 * MIB)], "").unwrap();
    qemu_io(&agent.uri("root"), &["write -P 0x11 0 1M", "flush"]).unwrap();
    let mut checked = 0;
    let mut stack = vec![agent.dir.join("state")];
    stack.push(agent.disks[0].2.clone());
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        let mode = meta.permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{} has mode {mode:o}", p.display());
        checked += 1;
        if meta.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
    assert!(
        checked >= 5,
        "state dir, journal, sockets: {checked} checked"
    );
}

/// Waits until the point of the tag at `seq` is stored and checks that
/// failover there gives the agent's disk byte for byte.
fn assert_tag_exact(ps: &ProcessServer, agent: &Agent, seq: u64, out: &std::path::Path) {
    wait_stored(&ps.store_url, MACHINE, &[], seq, Duration::from_secs(180)).unwrap();
    let dir = ps.failover_ok(MACHINE, &seq.to_string(), out);
    assert_same(&dir.join("root.raw"), &agent.image("root"));
}
