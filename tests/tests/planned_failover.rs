//! Planned failover (issue 9, item 2): `lifeboat-mt failover --planned`
//! under a running fio workload asks the agent, through its process
//! server's HTTP endpoint, for a final app-consistent point; the agent
//! refuses every write after it (fio stops on EPERM), the failover waits
//! for the point in the store and recovers exactly it: byte-equal to the
//! source disks as they were when writes stopped. The refusal survives an
//! agent restart, a second planned failover answers the same point,
//! `resume-writes` takes writes again, and the failures (wrong token, no
//! live session, a drill) are refused by name.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use lifeboat_tests::http;
use lifeboat_tests::*;

const MACHINE: &str = "machine-1";
const MIB: u64 = 1024 * 1024;

fn planned(ps: &ProcessServer, port: u16, token_file: &Path, out: &Path) -> Output {
    planned_of(MACHINE, ps, port, token_file, out)
}

/// `lifeboat-mt failover --planned --json` of `machine`.
fn planned_of(
    machine: &str,
    ps: &ProcessServer,
    port: u16,
    token_file: &Path,
    out: &Path,
) -> Output {
    run_timeout(
        Command::new(bin("lifeboat-mt"))
            .args(["failover", "--planned", "--json", "--store", &ps.store_url])
            .args([
                "--machine",
                machine,
                "--ps",
                &format!("http://127.0.0.1:{port}"),
            ])
            .arg("--ps-token-file")
            .arg(token_file)
            .arg("--out")
            .arg(out)
            .arg("--key-file")
            .arg(ps.kek())
            .args(["--store-timeout", "120s"]),
        Duration::from_secs(300),
    )
    .unwrap()
}

fn report(o: &Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "planned failover failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A write through the agent's export: refused (EPERM) or taken.
fn write_refused(agent: &Agent, disk: &str) -> bool {
    match qemu_io(&agent.uri(disk), &["write -P 0x77 4096 4096", "flush"]) {
        Ok(_) => false,
        Err(e) => {
            let e = format!("{e:#}");
            assert!(e.contains("Operation not permitted"), "{e}");
            true
        }
    }
}

#[test]
fn a_planned_failover_under_fio_recovers_every_acknowledged_write() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let pre = write_script(
        &root.join("pre.sh"),
        &format!(
            "echo \"$LIFEBOAT_LABEL\" >> {}",
            root.join("pre-ran").display()
        ),
    );
    let app = format!("[app]\npre-freeze = [\"{}\"]\n", pre.display());
    let disks = [("root", 64 * MIB), ("data", 32 * MIB)];
    let (mut ps, mut agent) = configured_pair(root, &disks, &app).unwrap();
    ps.proc.as_mut().unwrap().stop(Duration::from_secs(10));
    let port = http::enable_http(&ps, "");
    ps.start().unwrap();
    let token_file = ps.dir.join("http.token");
    agent.start().unwrap();
    agent.wait_synced(Duration::from_secs(120)).unwrap();
    qemu_io(&agent.uri("data"), &["write -P 0x5a 1M 3M", "flush"]).unwrap();

    // Refused by name: a wrong token, a drill.
    let bad_token = root.join("bad.token");
    std::fs::write(&bad_token, "not-the-token\n").unwrap();
    let o = planned(&ps, port, &bad_token, &root.join("never"));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("401"), "{}", stderr(&o));
    assert!(
        !write_refused(&agent, "data"),
        "a refused request stopped writes"
    );
    let o = run_timeout(
        Command::new(bin("lifeboat-mt"))
            .args(["test-failover", "--planned", "--store", &ps.store_url])
            .args(["--machine", MACHINE, "--ps", "http://127.0.0.1:1"])
            .arg("--ps-token-file")
            .arg(&token_file)
            .arg("--out")
            .arg(root.join("drill"))
            .arg("--key-file")
            .arg(ps.kek()),
        Duration::from_secs(60),
    )
    .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("a drill changes no replication state"),
        "{}",
        stderr(&o)
    );

    // fio writes blocks of every size and 512-byte alignment until the
    // final point refuses them.
    let mut fio = spawn_fio_randwrite(
        &agent.uri("root"),
        &root.join("fio.log"),
        &[
            "--bsrange=512-128k",
            "--blockalign=512",
            "--iodepth=16",
            "--time_based",
            "--runtime=240",
        ],
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(fio.is_running(), "fio stopped early:\n{}", fio.log_text());

    let out = root.join("recovered");
    let r = report(&planned(&ps, port, &token_file, &out));
    let p = &r["planned"];
    let seq = p["final-seq"].as_u64().unwrap();
    assert_eq!(p["kind"], "app", "{r}");
    assert_eq!(p["source"], "script", "{r}");
    assert_eq!(p["acknowledged-writes-left-behind"], 0, "{r}");
    assert!(
        p["statement"]
            .as_str()
            .unwrap()
            .contains("no acknowledged write was left behind"),
        "{r}"
    );
    assert_eq!(r["seq"].as_u64(), Some(seq), "{r}");
    assert_eq!(r["checksums"]["matched"], true, "{r}");
    assert!(
        std::fs::read_to_string(root.join("pre-ran"))
            .unwrap()
            .contains("planned-failover"),
        "the final point did not quiesce"
    );

    // fio ends on the refused writes; nothing changes the source since.
    wait_for(
        "fio to stop on the refused writes",
        Duration::from_secs(60),
        || (!fio.is_running()).then_some(()),
    )
    .unwrap();
    let fio_log = fio.log_text();
    assert!(fio_log.contains("Operation not permitted"), "{fio_log}");
    for (disk, _) in disks {
        assert_same(&out.join(format!("{disk}.raw")), &agent.image(disk));
    }
    let s = agent.status().unwrap();
    assert_eq!(s["state"], "failed-over", "{s}");
    assert_eq!(s["final-point"]["seq"].as_u64(), Some(seq), "{s}");
    assert!(write_refused(&agent, "data"));

    // Restarted, the agent still refuses writes; asked again, it answers
    // the same point, and the second failover is the same disks.
    agent.stop_clean();
    agent.start().unwrap();
    assert!(write_refused(&agent, "root"));
    let out2 = root.join("again");
    let r2 = report(&planned(&ps, port, &token_file, &out2));
    assert_eq!(r2["planned"]["final-seq"].as_u64(), Some(seq), "{r2}");
    for (disk, _) in disks {
        assert_same(&out2.join(format!("{disk}.raw")), &agent.image(disk));
    }

    // resume-writes: writes are taken again.
    let said = run_ok(
        Command::new(bin("lifeboat-agent"))
            .args(["resume-writes", "--config"])
            .arg(&agent.config),
        Duration::from_secs(30),
    )
    .unwrap();
    assert!(said.contains(&format!("seq {seq}")), "{said}");
    assert!(!write_refused(&agent, "data"));
    assert_ne!(agent.status().unwrap()["state"], "failed-over");

    // No live session: refused by name, nothing recovered.
    agent.stop_clean();
    let o = planned(&ps, port, &token_file, &root.join("none"));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no live session"), "{}", stderr(&o));
}

/// Without `[app]` the final point is crash-consistent. With the process
/// server stopped, fio's 1 MiB writes overflow the 16 MiB journal: the
/// stream goes to bitmap state, writes acknowledged there are only marked
/// dirty, and the final point, asked as soon as the server is back, waits
/// (settle) until the resync has resent them; the recovered disk is still
/// the source. An agent still in its initial sync refuses a final
/// point by name and keeps taking writes.
#[test]
fn a_crash_consistent_final_point_waits_out_a_journal_overflow() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let disks = [("root", 64 * MIB)];
    let (mut ps, mut agent) =
        configured_pair(root, &disks, "journal-max-bytes = 16777216\n").unwrap();
    ps.proc.as_mut().unwrap().stop(Duration::from_secs(10));
    let port = http::enable_http(&ps, "");
    ps.start().unwrap();
    let token_file = ps.dir.join("http.token");
    agent.start().unwrap();
    agent.wait_synced(Duration::from_secs(120)).unwrap();

    let mut fio = spawn_fio_randwrite(
        &agent.uri("root"),
        &root.join("fio.log"),
        &["--bs=1M", "--iodepth=8", "--time_based", "--runtime=240"],
    );
    std::thread::sleep(Duration::from_secs(1));
    ps.proc.as_mut().unwrap().stop(Duration::from_secs(10));
    wait_for("the journal to overflow", Duration::from_secs(60), || {
        let log = agent.proc.as_ref().unwrap().log_text();
        log.contains("-> bitmap").then_some(())
    })
    .unwrap();
    ps.start().unwrap();
    let out = root.join("recovered");
    let r = report(&planned(&ps, port, &token_file, &out));
    assert_eq!(r["planned"]["kind"], "crash", "{r}");
    assert!(r["planned"].get("source").is_none(), "{r}");
    wait_for(
        "fio to stop on the refused writes",
        Duration::from_secs(60),
        || (!fio.is_running()).then_some(()),
    )
    .unwrap();
    let log = agent.proc.as_ref().unwrap().log_text();
    assert!(log.contains("resync -> streaming"), "{log}");
    assert_same(&out.join("root.raw"), &agent.image("root"));
    assert_eq!(r["checksums"]["matched"], true, "{r}");

    // A second machine, still in its initial sync (1 MiB/s over 256 MiB).
    let certs = ps.issue_cert("machine-2").unwrap();
    let mut second = Agent::configure(
        &root.join("agent-2"),
        "machine-2",
        &certs,
        ps.port,
        &[("root", 256 * MIB)],
        "sync-rate-limit = 1048576\n",
    )
    .unwrap();
    lifeboat_tests::fill_random(&second.image("root"), 0, 256 * MIB, &mut Rng(7));
    second.start().unwrap();
    wait_for("machine-2 to be connected", Duration::from_secs(60), || {
        (second.status().ok()?["connected"] == true).then_some(())
    })
    .unwrap();
    let o = planned_of("machine-2", &ps, port, &token_file, &root.join("never"));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("initial sync"), "{}", stderr(&o));
    assert!(
        !write_refused(&second, "root"),
        "a refused final point stopped writes"
    );
}
