//! End-to-end: app-consistent points (`lifeboat-agent tag --app`). ext4 on
//! nbdfuse + loop over the agent's export, quiesced by pre-freeze scripts and
//! FIFREEZE while SQLite writes to it; a pre-freeze script that hangs; a
//! `vss` point (test-only quiescer) carried to the catalogue and the listing.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use lifeboat_tests::*;

const MACHINE: &str = "machine-1";
const MIB: u64 = 1024 * 1024;

/// agent.toml's `[app]`: freeze `mnt`, one pre-freeze and one post-thaw script.
fn app_section(mnt: &Path, pre: &Path, post: &Path, extra: &str) -> String {
    format!(
        "[app]\nfreeze = [\"{}\"]\npre-freeze = [\"{}\"]\npost-thaw = [\"{}\"]\n{extra}",
        mnt.display(),
        pre.display(),
        post.display()
    )
}

/// The stored point at `seq` (waits until the store holds it).
fn stored_point(ps: &ProcessServer, seq: u64) -> serde_json::Value {
    wait_stored(&ps.store_url, MACHINE, &[], seq, Duration::from_secs(60)).unwrap();
    let pts = points(&ps.store_url, MACHINE, &[]).unwrap();
    pts["points"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["seq"] == seq)
        .cloned()
        .unwrap_or_else(|| panic!("no point at seq {seq}: {pts}"))
}

/// Writes rows 1, 2, 3, … into `db`, one transaction each, and appends each
/// id to `log` once its commit returned; stops when `stop` exists.
const SQLITE_WRITER: &str = r#"
import os, sqlite3, sys
db, log, stop = sys.argv[1], sys.argv[2], sys.argv[3]
c = sqlite3.connect(db, isolation_level=None)
c.execute("PRAGMA synchronous=FULL")
c.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, payload TEXT NOT NULL)")
with open(log, "a") as out:
    i = 0
    while not os.path.exists(stop):
        i += 1
        c.execute("BEGIN")
        c.execute("INSERT INTO t VALUES (?, ?)", (i, ("row %d " % i) * 200))
        c.execute("COMMIT")
        out.write("%d\n" % i)
        out.flush()
"#;

fn committed(log: &Path) -> u64 {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.parse().ok())
        .max()
        .unwrap_or(0)
}

#[test]
fn app_point_under_sqlite_writes_recovers_clean_with_every_committed_row() {
    assert!(
        have("python3"),
        "python3 is missing (scripts/install-deps.sh)"
    );
    assert!(
        have("sqlite3"),
        "sqlite3 is missing (scripts/install-deps.sh)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().canonicalize().unwrap();
    let mnt = root.join("mnt");
    let pre = write_script(
        &root.join("pre.sh"),
        &format!(
            "echo \"pre-freeze $LIFEBOAT_LABEL\" > {}/quiesced-by-pre-freeze",
            mnt.display()
        ),
    );
    let post_ran = root.join("post-ran");
    let post = write_script(
        &root.join("post.sh"),
        &format!("echo \"$LIFEBOAT_PHASE\" > {}", post_ran.display()),
    );
    let app = app_section(&mnt, &pre, &post, "");
    let (ps, agent) = start_pair(&root, &[("root", 128 * MIB)], &app).unwrap();
    let fs = Ext4OverExport::create(&root, &agent.disks[0].2);
    assert_eq!(fs.mnt, mnt);

    let log = root.join("committed.log");
    let stop = root.join("stop");
    let mut writer = Proc::spawn(
        "sqlite writer",
        Command::new("python3")
            .args(["-c", SQLITE_WRITER])
            .arg(mnt.join("app.db"))
            .arg(&log)
            .arg(&stop),
        &root.join("writer.log"),
    )
    .unwrap();
    wait_for("100 committed rows", Duration::from_secs(60), || {
        (committed(&log) >= 100).then_some(())
    })
    .unwrap();

    // Every row committed before the point is requested must be in it.
    let before = committed(&log);
    let t = Instant::now();
    let out = agent.tag_app("sqlite").unwrap();
    assert!(
        out.status.success(),
        "tag --app failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seq: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    eprintln!(
        "app point at seq {seq} after {:?}, {before} rows committed before",
        t.elapsed()
    );
    // Thawed: the writer goes on.
    wait_for(
        "rows committed after the point",
        Duration::from_secs(30),
        || (committed(&log) > before + 50).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}: the filesystem stayed frozen? {}", writer.log_text()));
    std::fs::write(&stop, b"").unwrap();
    wait_for("the writer to stop", Duration::from_secs(30), || {
        (!writer.is_running()).then_some(())
    })
    .unwrap();
    assert_eq!(std::fs::read_to_string(&post_ran).unwrap(), "post-thaw\n");
    let status = agent.status().unwrap();
    assert_eq!(status["app-points"]["last-point"]["seq"], seq, "{status}");
    assert!(status["app-points"]["last-failure"].is_null(), "{status}");
    drop(fs);

    let point = stored_point(&ps, seq);
    assert_eq!(point["kind"], "app", "{point}");
    assert_eq!(point["source"], "fsfreeze", "{point}");
    assert_eq!(point["label"], "sqlite", "{point}");
    let out = ps.failover_ok(MACHINE, point["id"].as_str().unwrap(), &root.join("out"));
    let img = out.join("root.raw");

    // Frozen ext4 has its journal flushed: clean without any replay.
    let sb = run_ok(
        Command::new("dumpe2fs").arg("-h").arg(&img),
        Duration::from_secs(60),
    )
    .unwrap();
    let features = sb
        .lines()
        .find(|l| l.starts_with("Filesystem features:"))
        .unwrap_or_else(|| panic!("no features in dumpe2fs output:\n{sb}"));
    assert!(
        !features.contains("needs_recovery"),
        "the point's journal needs replay: {features}"
    );
    let fsck = run_timeout(
        Command::new("e2fsck").arg("-fn").arg(&img),
        Duration::from_secs(120),
    )
    .unwrap();
    let fsck_out =
        String::from_utf8_lossy(&fsck.stdout).to_string() + &String::from_utf8_lossy(&fsck.stderr);
    assert!(fsck.status.success(), "e2fsck -fn: {fsck_out}");
    assert!(!fsck_out.contains("journal"), "e2fsck -fn: {fsck_out}");

    // The database at the point: intact, with every row committed before.
    let rmnt = root.join("rmnt");
    std::fs::create_dir_all(&rmnt).unwrap();
    run_ok(
        Command::new("mount")
            .args(["-o", "ro,loop,noload"])
            .arg(&img)
            .arg(&rmnt),
        Duration::from_secs(60),
    )
    .unwrap();
    let copy = root.join("recovered");
    std::fs::create_dir_all(&copy).unwrap();
    let copied = (|| {
        for e in std::fs::read_dir(&rmnt)? {
            let e = e?;
            if e.file_type()?.is_file() {
                std::fs::copy(e.path(), copy.join(e.file_name()))?;
            }
        }
        Ok::<_, std::io::Error>(())
    })();
    let _ = Command::new("umount").arg(&rmnt).status();
    copied.unwrap();
    assert_eq!(
        std::fs::read_to_string(copy.join("quiesced-by-pre-freeze")).unwrap(),
        "pre-freeze sqlite\n",
        "the pre-freeze script's write is not in the point"
    );
    let sql = |q: &str| {
        run_ok(
            Command::new("sqlite3").arg(copy.join("app.db")).arg(q),
            Duration::from_secs(60),
        )
        .unwrap()
        .trim()
        .to_string()
    };
    assert_eq!(sql("PRAGMA integrity_check"), "ok");
    let rows: Vec<u64> = sql(&format!(
        "SELECT count(*), coalesce(max(id), 0) FROM t WHERE id <= {before}"
    ))
    .split('|')
    .map(|v| v.parse().unwrap())
    .collect();
    assert_eq!(
        rows,
        vec![before, before],
        "rows committed before the point are missing"
    );
    let total: u64 = sql("SELECT count(*) FROM t").parse().unwrap();
    eprintln!("recovered {total} rows; {before} were committed before the point was requested");
}

#[test]
fn a_hanging_pre_freeze_script_is_killed_at_its_bound_and_no_point_is_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().canonicalize().unwrap();
    let mnt = root.join("mnt");
    let started = root.join("hang.pid");
    let hang = write_script(
        &root.join("hang.sh"),
        &format!("sleep 600 &\necho $! > {}\nwait", started.display()),
    );
    let post_ran = root.join("post-ran");
    let post = write_script(
        &root.join("post.sh"),
        &format!("touch {}", post_ran.display()),
    );
    let app = app_section(&mnt, &hang, &post, "script-timeout = \"3s\"\n");
    let (ps, agent) = start_pair(&root, &[("root", 64 * MIB)], &app).unwrap();
    let fs = Ext4OverExport::create(&root, &agent.disks[0].2);

    let t = Instant::now();
    let attempt = {
        let config = agent.config.clone();
        std::thread::spawn(move || {
            run_timeout(
                Command::new(bin("lifeboat-agent"))
                    .args(["tag", "--app", "--label", "hung", "--config"])
                    .arg(config),
                Duration::from_secs(120),
            )
            .unwrap()
        })
    };
    wait_for(
        "the pre-freeze script to start",
        Duration::from_secs(30),
        || {
            std::fs::read_to_string(&started)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
        },
    )
    .unwrap();
    // While it hangs: writes and crash-consistent points go on.
    let during = Instant::now();
    let crash = agent.tag().unwrap();
    std::fs::write(mnt.join("during"), b"written while the script hung").unwrap();
    run_ok(
        Command::new("sync").arg("-f").arg(&mnt),
        Duration::from_secs(20),
    )
    .unwrap();
    assert!(
        during.elapsed() < Duration::from_secs(3),
        "a crash tag and a write waited {:?} behind the quiesce",
        during.elapsed()
    );
    assert_eq!(
        agent.status().unwrap()["app-points"]["running"],
        "prepare",
        "the attempt is not in its pre-freeze step"
    );

    let out = attempt.join().unwrap();
    let elapsed = t.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "tag --app succeeded: {stderr}");
    assert!(
        stderr.contains("pre-freeze failed")
            && stderr.contains(&hang.display().to_string())
            && stderr.contains("did not finish within 3s"),
        "{stderr}"
    );
    assert!(
        elapsed >= Duration::from_secs(3) && elapsed < Duration::from_secs(20),
        "the bound fired after {elapsed:?}"
    );
    // The script's child is gone with its process group.
    let pid = std::fs::read_to_string(&started).unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z "),
        "the hung script's child survived: {stat}"
    );
    assert!(
        post_ran.exists(),
        "post-thaw scripts did not run after the failure"
    );
    let status = agent.status().unwrap();
    let app = &status["app-points"];
    assert!(app["last-point"].is_null(), "{status}");
    assert!(app["running"].is_null(), "{status}");
    let failure = app["last-failure"]["error"].as_str().unwrap_or_default();
    assert!(failure.contains("did not finish within 3s"), "{status}");

    // Not frozen: a write after the failure completes.
    let after = run_timeout(
        Command::new("sh").args([
            "-c",
            &format!("echo after > {m}/after && sync -f {m}", m = mnt.display()),
        ]),
        Duration::from_secs(20),
    )
    .unwrap();
    assert!(
        after.status.success(),
        "a write after the failed attempt: {after:?}"
    );
    drop(fs);

    // No app point in the store, the crash point is there.
    let last = agent.tag().unwrap();
    assert!(last > crash);
    let crash_point = stored_point(&ps, crash);
    assert_eq!(crash_point["kind"], "crash");
    let pts = points(&ps.store_url, MACHINE, &[]).unwrap();
    assert!(
        !pts["points"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["kind"] == "app"),
        "an app point was recorded: {pts}"
    );
}

#[test]
fn a_vss_point_is_carried_through_stream_catalogue_and_listing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().canonicalize().unwrap();
    let (ps, agent) = start_pair(
        &root,
        &[("root", 4 * MIB)],
        "[app]\nquiesce = \"vss-test\"\n",
    )
    .unwrap();
    qemu_io(&agent.uri("root"), &["write -P 7 0 64k", "flush"]).unwrap();
    let out = agent.tag_app("vss").unwrap();
    assert!(out.status.success(), "{out:?}");
    let seq: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let source = agent.image("root");
    let at_point = root.join("at-point.img");
    snapshot(&source, &at_point);
    qemu_io(&agent.uri("root"), &["write -P 9 0 64k", "flush"]).unwrap();
    let crash = agent.tag().unwrap();
    assert_eq!(stored_point(&ps, seq)["source"], "vss");
    let crash_point = stored_point(&ps, crash);
    assert!(crash_point.get("source").is_none(), "{crash_point}");

    let listing = run_ok(
        Command::new(bin("lifeboat-mt"))
            .args(["points", "--store", &ps.store_url, "--machine", MACHINE])
            .arg("--key-file")
            .arg(ps.kek()),
        Duration::from_secs(60),
    )
    .unwrap();
    let row = |seq: u64| {
        listing
            .lines()
            .find(|l| l.split_whitespace().nth(4) == Some(&seq.to_string()))
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_else(|| panic!("no row for seq {seq}:\n{listing}"))
    };
    assert!(
        listing.lines().next().unwrap().contains("SOURCE"),
        "{listing}"
    );
    assert_eq!(row(seq)[1..3], ["app", "vss"], "{listing}");
    assert_eq!(row(crash)[1..3], ["crash", "-"], "{listing}");

    // latest-app picks it, and recovers the disk as it was at the point.
    let out = ps.failover_ok(MACHINE, "latest-app", &root.join("out"));
    assert_same(&out.join("root.raw"), &at_point);
}
