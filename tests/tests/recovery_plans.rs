//! Recovery plans (issue 9, item 5): `lifeboat-mt failover --plan FILE`
//! recovers ordered groups of machines, a group's machines in parallel, with
//! scripts before and after each group and a manual pause; the recovered
//! disks equal their sources; the first failure stops the plan with a report
//! of what was done and what was not; a drill stopped at its pause records
//! what it wrote, and `--cleanup` removes it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use lifeboat_tests::*;

const MIB: u64 = 1024 * 1024;
const MACHINES: [&str; 3] = ["db-1", "app-1", "app-2"];

/// `lifeboat-mt <cmd> --plan PLAN --json`, `stdin` written to its input
/// (`None`: closed at once), bounded.
fn run_plan(ps: &ProcessServer, cmd: &str, plan: &Path, out: &Path, stdin: Option<&str>) -> Output {
    let mut child = Command::new(bin("lifeboat-mt"))
        .args([cmd, "--json", "--store", &ps.store_url, "--plan"])
        .arg(plan)
        .arg("--out")
        .arg(out)
        .arg("--key-file")
        .arg(ps.kek())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            panic!("lifeboat-mt {cmd} --plan did not finish within 300 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.wait_with_output().unwrap()
}

fn report(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}):\n{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

fn group<'a>(r: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    r["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == name)
        .unwrap_or_else(|| panic!("no group {name} in {r}"))
}

#[test]
fn a_recovery_plan_recovers_group_by_group_and_stops_at_the_first_failure() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut ps = ProcessServer::init(&root.join("ps"), None, &[]).unwrap();
    ps.start().unwrap();
    let mut agents = Vec::new();
    for (i, m) in MACHINES.iter().enumerate() {
        ps.issue_cert(m).unwrap();
        let a = ps.synced_agent(&root.join(m), m, &[("root", 32 * MIB)]);
        qemu_io(
            &a.uri("root"),
            &[&format!("write -P 0x{:x} {}M 2M", 0x41 + i, i + 1), "flush"],
        )
        .unwrap();
        let seq = a.tag().unwrap();
        wait_stored(&ps.store_url, m, &[], seq, Duration::from_secs(120)).unwrap();
        agents.push(a);
    }
    let log = root.join("scripts.log");
    let note = write_script(
        &root.join("note.sh"),
        &format!(
            "echo \"$LIFEBOAT_PHASE $LIFEBOAT_GROUP $LIFEBOAT_MACHINES drill=$LIFEBOAT_DRILL\" >> {}",
            log.display()
        ),
    );
    let fail = write_script(&root.join("fail.sh"), "echo refusing >&2; exit 3");
    let plan_with = |name: &str, db_after: &Path, apps_before: &Path| -> PathBuf {
        let p = root.join(format!("{name}.toml"));
        std::fs::write(
            &p,
            format!(
                "name = \"{name}\"\nscript-timeout = \"60s\"\n\
                 [[group]]\nname = \"databases\"\nmachines = [\"db-1\"]\nbefore = [\"{n}\"]\nafter = [\"{a}\"]\n\
                 [[group]]\nname = \"applications\"\nmachines = [\"app-1\", \"app-2\"]\npause = true\nbefore = [\"{b}\"]\nafter = [\"{n}\"]\n",
                n = note.display(),
                a = db_after.display(),
                b = apps_before.display()
            ),
        )
        .unwrap();
        p
    };
    let plan = |name: &str, apps_before: &Path| plan_with(name, &note, apps_before);

    // The whole plan: the pause answered with Enter.
    let out = root.join("recovered");
    let o = run_plan(&ps, "failover", &plan("dr", &note), &out, Some("\n"));
    let r = report(&o);
    assert!(
        o.status.success(),
        "{r}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(r["completed"], true, "{r}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("paused before group applications"));
    for g in ["databases", "applications"] {
        assert_eq!(group(&r, g)["state"], "done", "{r}");
    }
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "before databases db-1 drill=0\nafter databases db-1 drill=0\n\
         before applications app-1 app-2 drill=0\nafter applications app-1 app-2 drill=0\n"
    );
    for (m, a) in MACHINES.iter().zip(&agents) {
        assert_same(&out.join(m).join("root.raw"), &a.image("root"));
        assert!(out.join(m).join("start-vm.sh").exists());
    }
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("recovery-plan-report.json")).unwrap())
            .unwrap();
    assert_eq!(written, r);

    // A failing script before the second group: the first is done, the
    // second's machines are not recovered, the report says where it stopped.
    std::fs::remove_file(&log).unwrap();
    let out2 = root.join("stopped");
    let o = run_plan(&ps, "failover", &plan("broken", &fail), &out2, Some("\n"));
    assert!(!o.status.success());
    let r = report(&o);
    assert_eq!(r["completed"], false, "{r}");
    let stopped = r["stopped"].as_str().unwrap();
    assert!(
        stopped.contains("at group applications: before script")
            && stopped.contains("exited with status 3"),
        "{r}"
    );
    assert_eq!(group(&r, "databases")["state"], "done", "{r}");
    let apps = group(&r, "applications");
    assert_eq!(apps["state"], "failed", "{r}");
    for m in apps["machines"].as_array().unwrap() {
        assert_eq!(m["state"], "not-run", "{r}");
    }
    assert!(out2.join("db-1/root.raw").exists());
    assert!(!out2.join("app-1").exists() && !out2.join("app-2").exists());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("recovery plan broken stopped at group applications"),
        "{stderr}"
    );
    assert!(
        stderr.contains("refusing"),
        "the script's output is not shown:\n{stderr}"
    );

    // A failing post-script of the first group: its machine is recovered,
    // the report names the step, the second group does not run.
    let out3 = root.join("post");
    let o = run_plan(
        &ps,
        "failover",
        &plan_with("post", &fail, &note),
        &out3,
        Some("\n"),
    );
    assert!(!o.status.success());
    let r = report(&o);
    let stopped = r["stopped"].as_str().unwrap();
    assert!(stopped.contains("at group databases: after script"), "{r}");
    let db = group(&r, "databases");
    assert_eq!(db["state"], "failed", "{r}");
    assert_eq!(db["machines"][0]["state"], "done", "{r}");
    assert_eq!(db["scripts"][1]["state"], "failed", "{r}");
    let apps = group(&r, "applications");
    assert_eq!(apps["state"], "not-run", "{r}");
    assert!(
        apps["scripts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["state"] == "not-run")
            && apps["scripts"].as_array().unwrap().len() == 2,
        "every script is listed: {r}"
    );
    assert_same(&out3.join("db-1/root.raw"), &agents[0].image("root"));
    assert!(!out3.join("app-1").exists());

    // A drill whose pause finds stdin closed: it stops there, records what
    // it wrote, and --cleanup removes it.
    std::fs::remove_file(&log).unwrap();
    let drill = root.join("drill");
    let o = run_plan(&ps, "test-failover", &plan("drill", &note), &drill, None);
    assert!(!o.status.success());
    let r = report(&o);
    assert_eq!(r["drill"], true, "{r}");
    assert!(
        r["stopped"]
            .as_str()
            .unwrap()
            .contains("manual pause before group applications"),
        "{r}"
    );
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "before databases db-1 drill=1\nafter databases db-1 drill=1\n"
    );
    assert!(drill.join("db-1/root.raw").exists());
    run_ok(
        Command::new(bin("lifeboat-mt"))
            .args(["test-failover", "--cleanup"])
            .arg(&drill),
        Duration::from_secs(60),
    )
    .unwrap();
    assert!(!drill.join("db-1/root.raw").exists());
    assert!(!drill.join("recovery-plan-report.json").exists());

    // A plan naming a machine twice is refused before anything runs.
    let twice = root.join("twice.toml");
    std::fs::write(
        &twice,
        "[[group]]\nname = \"a\"\nmachines = [\"db-1\"]\n[[group]]\nname = \"b\"\nmachines = [\"db-1\"]\n",
    )
    .unwrap();
    let o = run_plan(&ps, "failover", &twice, &root.join("never"), None);
    assert!(!o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("machine db-1 is in group \"a\" and in group \"b\""),
        "{stderr}"
    );
    assert!(stderr.contains("nothing was recovered"), "{stderr}");
    assert!(!root.join("never").exists());

    // So is a plan whose last group names a machine the store does not
    // have: the first group is not recovered either. A relative script
    // path is taken from the plan's directory.
    let ghost = root.join("ghost.toml");
    std::fs::write(
        &ghost,
        "[[group]]\nname = \"a\"\nmachines = [\"db-1\"]\nbefore = [\"note.sh\"]\n[[group]]\nname = \"b\"\nmachines = [\"ghost-1\"]\n",
    )
    .unwrap();
    let o = run_plan(&ps, "failover", &ghost, &root.join("never"), None);
    assert!(!o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("machine ghost-1 of group b") && stderr.contains("nothing was recovered"),
        "{stderr}"
    );
    assert!(!root.join("never").exists());
}
