//! The whole disaster-recovery loop on one machine (issue 9, item 4),
//! disks compared byte for byte at every stage: protect → write → failover
//! → write on the recovered copy → `lifeboat-mt reprotect` (the recovered
//! side's agent streams to the master target, which writes the original
//! disk; a checksum resync sends only what differs) → writes through the
//! recovered side's export → `lifeboat-mt failback` (a final point, applied
//! and checked against the agent's checksums) → `lifeboat-agent reprotect`
//! and forward protection again, by checksum resync against the stored
//! replica. Both resyncs must send exactly the blocks that differ, as
//! their reports count them, never the disk.

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use lifeboat_tests::*;

const MIB: u64 = 1024 * 1024;
const BLOCK: u64 = 4096;
const MACHINE: &str = "machine-1";

/// The 4 KiB blocks in which two images differ.
fn differing_blocks(a: &Path, b: &Path) -> BTreeSet<u64> {
    let (fa, fb) = (
        std::fs::File::open(a).unwrap(),
        std::fs::File::open(b).unwrap(),
    );
    let len = fa.metadata().unwrap().len();
    assert_eq!(len, fb.metadata().unwrap().len(), "sizes differ");
    let (mut x, mut y) = (vec![0u8; BLOCK as usize], vec![0u8; BLOCK as usize]);
    let mut out = BTreeSet::new();
    for blk in 0..len / BLOCK {
        fa.read_exact_at(&mut x, blk * BLOCK).unwrap();
        fb.read_exact_at(&mut y, blk * BLOCK).unwrap();
        if x != y {
            out.insert(blk);
        }
    }
    out
}

fn mt(args: &[&str], config: &Path) -> serde_json::Value {
    let out = run_ok(
        Command::new(bin("lifeboat-mt"))
            .args(args)
            .arg("--config")
            .arg(config)
            .arg("--json"),
        Duration::from_secs(300),
    )
    .unwrap();
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn the_whole_loop_sends_only_what_changed_at_every_step() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let size = 64 * MIB;
    let mut rng = Rng(0x6662_1009);

    // Protect, and write through the export (whole blocks: a block whose
    // last write was partial is resent by every checksum resync, issue 11).
    let (ps, mut onprem) = synced_random_disk(root, size, &mut rng, |ps| ps.port);
    qemu_io(
        &onprem.uri("root"),
        &["write -P 0x31 1M 3M", "write -P 0x32 40960 8192", "flush"],
    )
    .unwrap();
    let label = "before-the-disaster";
    let seq = run_ok(
        Command::new(bin("lifeboat-agent"))
            .args(["tag", "--label", label, "--config"])
            .arg(&onprem.config),
        Duration::from_secs(30),
    )
    .unwrap();
    wait_stored(
        &ps.store_url,
        MACHINE,
        &[],
        seq.trim().parse().unwrap(),
        Duration::from_secs(120),
    )
    .unwrap();
    onprem.stop_clean();
    let original = onprem.image("root");

    // Fail over; the recovered machine runs and writes.
    let out = root.join("recovered");
    ps.real_failover_ok(MACHINE, &ps.point_labelled(MACHINE, label), &out);
    let recovered = out.join("root.raw");
    assert_same(&recovered, &original);
    let at_failover = root.join("at-failover.img");
    snapshot(&recovered, &at_failover);
    let written = change_blocks(&recovered, size, 60, &mut rng);

    // The original site comes back before the failback and its agent starts
    // (systemd would): it uses up the failover's record in a rebase (nothing
    // differs yet) and is stopped for the reprotect.
    onprem.start().unwrap();
    let early = onprem
        .wait_checksum_resync(Duration::from_secs(120))
        .unwrap();
    assert_eq!(early["blocks"].as_u64(), Some(0), "{early}");
    onprem.stop_clean();

    // Reprotect: the master target takes the original disk as the target,
    // recording that in the store first.
    let port = free_port();
    let mt_config = root.join("mt.toml");
    std::fs::write(
        &mt_config,
        format!(
            "listen = \"127.0.0.1:{port}\"\nca-cert = \"{d}/ca.pem\"\nserver-cert = \"{d}/server.pem\"\n\
             server-key = \"{d}/server.key\"\nstate-dir = \"{s}\"\n",
            d = ps.dir.display(),
            s = root.join("mt-state").display()
        ),
    )
    .unwrap();
    let mut server = start_master_target(&mt_config, &root.join("mt.log"));
    let agent_config = root.join("recovered-agent.toml");
    let certs = ps.dir.join("machines").join(MACHINE);
    let to = format!("root={}", original.display());
    let reprotect = |wait: bool| {
        let mut args = vec!["reprotect", "--machine", MACHINE, "--to", &to];
        if wait {
            args.extend(["--wait", "--timeout", "240s"]);
        }
        let mut cmd = Command::new(bin("lifeboat-mt"));
        cmd.args(&args)
            .arg("--recovered")
            .arg(&out)
            .arg("--agent-config")
            .arg(&agent_config)
            .arg("--certs")
            .arg(&certs)
            .args(["--store", &ps.store_url, "--key-file"])
            .arg(ps.kek())
            .arg("--config")
            .arg(&mt_config)
            .arg("--json");
        let o = run_ok(&mut cmd, Duration::from_secs(300)).unwrap();
        serde_json::from_str::<serde_json::Value>(&o).unwrap()
    };
    let r = reprotect(false);
    assert_eq!(r["agent-config"], agent_config.to_str().unwrap(), "{r}");
    // The test's Agent finds its control socket under <dir>/state.
    let away_dir = root.join("away");
    std::fs::create_dir_all(&away_dir).unwrap();
    std::os::unix::fs::symlink(out.join("agent-state"), away_dir.join("state")).unwrap();
    let mut away = Agent {
        dir: away_dir,
        config: agent_config.clone(),
        disks: vec![("root".into(), recovered.clone(), out.join("root.sock"))],
        proc: None,
    };
    away.start().unwrap();
    let r = reprotect(true);
    let resync = away.wait_checksum_resync(Duration::from_secs(120)).unwrap();
    assert_eq!(resync["error"], "", "{resync}");
    assert_eq!(
        resync["blocks"].as_u64(),
        Some(written.len() as u64),
        "reprotect resends exactly the blocks written on the recovered side: {resync}"
    );
    let received = &r["resync"]["received"];
    assert_eq!(
        received["write-bytes"].as_u64(),
        Some(written.len() as u64 * BLOCK),
        "{r}"
    );
    let synced = away.status().unwrap()["sync"][0]["sent-bytes"]
        .as_u64()
        .unwrap();
    assert!(synced < MIB, "reprotect copied the disk ({synced} bytes)");
    away.wait_acked(Duration::from_secs(60)).unwrap();
    assert_same(&original, &recovered);

    // Writes through the recovered side's export, of every size and
    // alignment, and a zeroed range; then fail back.
    qemu_io(
        &away.uri("root"),
        &[
            "write -P 0x44 5000 12345",
            "write -P 0x45 8M 1M",
            "write -z 20M 1M",
            "write -P 0x46 33554431 3",
            "flush",
        ],
    )
    .unwrap();
    let fb = mt(&["failback", "--machine", MACHINE], &mt_config);
    assert_eq!(fb["equal"], true, "{fb}");
    assert_eq!(fb["verified"][0]["disk"], "root", "{fb}");
    assert_same(&original, &recovered);
    assert!(
        qemu_io(&away.uri("root"), &["write -P 0x47 0 4096", "flush"]).is_err(),
        "the recovered side takes writes after the failback's final point"
    );
    let status = mt(&["status"], &mt_config);
    let m = &status[0];
    assert_eq!(m["machine"], MACHINE, "{status}");
    assert_eq!(m["source"], "reprotect", "{status}");
    assert_eq!(m["connected"], true, "{status}");
    assert_eq!(m["applied-seq"], fb["applied-seq"], "{status}");
    away.stop_clean();
    server.stop(Duration::from_secs(20));

    // Forward again, and the operator skips `lifeboat-agent reprotect`: the
    // agent starts with its journal, which does not describe what the
    // failback wrote. The process server knows of the reprotect
    // (failed-over.json) and does not let it resume: the agent rebases and
    // resyncs by checksum against the stored replica (which holds the disk
    // at the failover), sending only the blocks the failback changed.
    let changed = differing_blocks(&at_failover, &original);
    assert!(changed.len() > written.len(), "{}", changed.len());
    onprem.start().unwrap();
    let forward = onprem
        .wait_checksum_resync(Duration::from_secs(180))
        .unwrap();
    assert_eq!(forward["error"], "", "{forward}");
    assert_eq!(
        forward["blocks"].as_u64(),
        Some(changed.len() as u64),
        "forward protection resends exactly the blocks that differ from the replica: {forward}"
    );
    let synced = onprem.status().unwrap()["sync"][0]["sent-bytes"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        synced < MIB,
        "forward protection copied the disk ({synced} bytes)"
    );
    assert_eq!(
        ps.log()
            .matches(&format!("machine {MACHINE} was failed over at point"))
            .count(),
        2,
        "the process server says why the journal was not resumed, after the failover and after the failback"
    );
    assert!(ps.log().contains("recorded by lifeboat-mt reprotect"));
    let seq = onprem.tag().unwrap();
    wait_stored(&ps.store_url, MACHINE, &[], seq, Duration::from_secs(120)).unwrap();
    let home = root.join("home");
    let _ = ps.failover_ok(MACHINE, "latest", &home);
    assert_same(&home.join("root.raw"), &original);
    onprem.stop_clean();
}

/// A failover is recorded in the store; the original machine's agent, started
/// again with its old journal, is not let resume it (its disks may have been
/// written by a failback): it resyncs by checksum, and only the blocks that
/// changed under it are sent. A drill records nothing; a record that does
/// not authenticate counts as a failover, by name; `lifeboat-agent
/// reprotect` takes the same path on purpose.
#[test]
fn after_a_failover_the_agent_resyncs_instead_of_resuming_its_journal() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let size = 16 * MIB;
    let mut rng = Rng(0x6662_1010);
    let (ps, mut agent) = synced_random_disk(root, size, &mut rng, |ps| ps.port);
    let store_root = std::path::PathBuf::from(ps.store_url.strip_prefix("file://").unwrap());
    let record = store_root.join(format!("machines/{MACHINE}/failed-over.json"));
    let image = agent.image("root");
    let restart_and_resync = |agent: &mut Agent| {
        agent.start().unwrap();
        let r = agent
            .wait_checksum_resync(Duration::from_secs(120))
            .unwrap();
        assert_eq!(r["error"], "", "{r}");
        r
    };
    // A drill at latest (`failover_ok` runs test-failover: it records nothing).
    let drill = |name: &str| ps.failover_ok(MACHINE, "latest", &root.join(name));
    let latest_is_the_disk = |agent: &Agent, name: &str| {
        // Refused until a welcome confirmed the numbering (after a start).
        let seq = wait_for("a tag", Duration::from_secs(60), || agent.tag().ok()).unwrap();
        wait_stored(&ps.store_url, MACHINE, &[], seq, Duration::from_secs(120)).unwrap();
        assert_same(&drill(name).join("root.raw"), &image);
    };
    let id_file = agent.dir.join("state").join("stream-id");
    let stream_id = || std::fs::read_to_string(&id_file).unwrap();
    latest_is_the_disk(&agent, "before");
    agent.stop_clean();

    // A drill changes no replication state: the journal is resumed.
    let id = stream_id();
    drill("drill");
    assert!(!record.exists(), "a drill recorded a failover");
    agent.start().unwrap();
    // A tag is taken only after a welcome: the hello was answered.
    latest_is_the_disk(&agent, "after-drill");
    let s = agent.status().unwrap();
    assert!(s["checksum-resync"]["last"].is_null(), "{s}");
    assert_eq!(stream_id(), id, "the agent rebased after a drill");
    assert!(
        !ps.log().contains("was failed over"),
        "a drill fenced the machine"
    );
    agent.stop_clean();

    // A failover; then the disk is written beside the agent, as a failback
    // writes it. The next session resyncs exactly those blocks.
    ps.real_failover_ok(MACHINE, "latest", &root.join("failover"));
    assert!(record.exists(), "the failover was not recorded");
    let changed = change_blocks(&image, size, 7, &mut rng);
    let r = restart_and_resync(&mut agent);
    assert_eq!(r["blocks"].as_u64(), Some(changed.len() as u64), "{r}");
    assert!(!record.exists(), "the record outlived the rebase");
    latest_is_the_disk(&agent, "after-rebase");
    agent.stop_clean();

    // A record that does not authenticate still counts, and is named.
    ps.real_failover_ok(MACHINE, "latest", &root.join("failover-2"));
    std::fs::write(
        &record,
        b"{\"signed\": 1, \"record\": \"{}\", \"mac\": \"00\"}",
    )
    .unwrap();
    let changed = change_blocks(&image, size, 3, &mut rng);
    let r = restart_and_resync(&mut agent);
    assert_eq!(r["blocks"].as_u64(), Some(changed.len() as u64), "{r}");
    assert!(
        ps.log().contains("failed-over.json does not authenticate"),
        "the process server names the record it could not authenticate"
    );
    latest_is_the_disk(&agent, "after-tampered");
    agent.stop_clean();

    // `lifeboat-agent reprotect`: the same rebase, asked for; nothing differs.
    let said = run_ok(
        Command::new(bin("lifeboat-agent"))
            .args(["reprotect", "--config"])
            .arg(&agent.config),
        Duration::from_secs(30),
    )
    .unwrap();
    assert!(said.contains("resyncs every disk"), "{said}");
    let r = restart_and_resync(&mut agent);
    assert_eq!(r["blocks"].as_u64(), Some(0), "{r}");
    latest_is_the_disk(&agent, "after-reprotect");
    agent.stop_clean();
}

/// Reprotect refuses, naming the thing: a disk without a target, a target
/// another disk has, a recovered image it cannot serve, and a failback of a
/// machine with no live session.
#[test]
fn reprotect_and_failback_refuse_bad_requests_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let out = root.join("recovered");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("recovered-machine.json"),
        serde_json::json!({
            "machine": MACHINE, "point": "p", "seq": 9, "memory_mib": 1024, "cpus": 1,
            "qemu_command": [],
            "disks": [
                {"id": "root", "size": 1048576, "format": "raw", "location": out.join("root.raw"), "boot_index": 0, "checksum": null},
                {"id": "data", "size": 1048576, "format": "qcow2", "location": out.join("data.qcow2"), "boot_index": 1, "checksum": null},
            ],
        })
        .to_string(),
    )
    .unwrap();
    let config = root.join("mt.toml");
    let state = root.join("state");
    std::fs::write(
        &config,
        format!(
            "listen = \"0.0.0.0:9\"\nca-cert = \"ca.pem\"\nserver-cert = \"s.pem\"\nserver-key = \"s.key\"\n\
             state-dir = \"{}\"\n\n[[machine]]\nname = \"machine-0\"\ndisks = {{ root = \"{}\" }}\n",
            state.display(),
            root.join("taken.img").display()
        ),
    )
    .unwrap();
    let refused = |args: &[&str]| -> String {
        let o = run_timeout(
            Command::new(bin("lifeboat-mt"))
                .args(args)
                .arg("--config")
                .arg(&config),
            Duration::from_secs(30),
        )
        .unwrap();
        assert!(!o.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let recovered = out.to_str().unwrap();
    let one = format!("root={}", root.join("root.img").display());
    let e = refused(&[
        "reprotect",
        "--machine",
        MACHINE,
        "--to",
        &one,
        "--recovered",
        recovered,
    ]);
    assert!(e.contains("disk data of machine-1 has no target"), "{e}");
    let taken = format!(
        "root={},data={}",
        root.join("taken.img").display(),
        root.join("d.img").display()
    );
    let e = refused(&[
        "reprotect",
        "--machine",
        MACHINE,
        "--to",
        &taken,
        "--recovered",
        recovered,
    ]);
    assert!(e.contains("already the target of machine-0/root"), "{e}");
    let both = format!(
        "root={},data={}",
        root.join("root.img").display(),
        root.join("d.img").display()
    );
    let agent = root.join("a.toml");
    let with_agent_config = || {
        refused(&[
            "reprotect",
            "--machine",
            MACHINE,
            "--to",
            &both,
            "--recovered",
            recovered,
            "--agent-config",
            agent.to_str().unwrap(),
            "--certs",
            root.to_str().unwrap(),
            "--mt-address",
            "127.0.0.1:9",
        ])
    };
    let e = with_agent_config();
    assert!(
        e.contains("disk data was recovered to") && e.contains("qcow2"),
        "{e}"
    );
    // A file at --agent-config that reprotect did not write is not replaced.
    std::fs::write(&agent, "# the operator's own\n").unwrap();
    let e = with_agent_config();
    assert!(
        e.contains("was not written by lifeboat-mt reprotect"),
        "{e}"
    );
    assert_eq!(
        std::fs::read_to_string(&agent).unwrap(),
        "# the operator's own\n"
    );
    // Two disks of the machine onto one target.
    let twice = format!(
        "root={},data={}",
        root.join("d.img").display(),
        root.join("d.img").display()
    );
    let e = refused(&["reprotect", "--machine", MACHINE, "--to", &twice]);
    assert!(e.contains("already the target of machine-1/"), "{e}");
    let e = refused(&["reprotect", "--machine", "machine-0", "--to", &one]);
    assert!(e.contains("already a [[machine]]"), "{e}");
    let e = refused(&["failback", "--machine", MACHINE]);
    assert!(
        e.contains("control socket") && e.contains("lifeboat-mt serve"),
        "{e}"
    );
    assert!(
        !state.join("machines.d").join("machine-1.toml").exists(),
        "a refused reprotect registered targets"
    );
}
