//! Consistency groups: three agents in one group on one process server, each
//! writing its own disk through its NBD export at the same time. Group points
//! (scheduled and on demand) exist, and a group failover gives each machine
//! an image equal to its source at that point — and the three cuts are one
//! moment. A member stopped with SIGSTOP makes the attempt time out: the
//! others are released (a write held by the attempt completes after the
//! bound) and no group point is recorded. App-consistent group points:
//! each member quiesces with its own quiescer (vss-test, scripts, a real
//! FIFREEZE of an ext4 on a loop device) before the hold, is thawed after
//! it, and `failover --group --point latest-app` recovers the same cut; a
//! member whose pre-freeze script hangs fails the point (named, with its
//! step) while every member is released and thawed.
//!
//! How the test knows each source at a point: every writer writes one 4 KiB
//! block at a time (the next only after the last was acknowledged), each
//! block stamped with its write number. A tag lies between two writes, so a
//! recovered image must equal "the first k writes" for some k, read from the
//! image's highest stamp; and the cut is one moment when every machine's
//! write k started before every machine's write k+1 was acknowledged.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lifeboat_tests::nbd::NbdClient;
use lifeboat_tests::*;

const MACHINES: [&str; 3] = ["grp-a", "grp-b", "grp-c"];
const GROUP: &str = "g1";
const BLOCK: u64 = 4096;
const DISK: u64 = 8 * 1024 * 1024;
const BLOCKS: u64 = DISK / BLOCK;
const HOLD: Duration = Duration::from_secs(3);

/// One acknowledged write: its number, block, and when it was issued and acked.
#[derive(Clone, Copy)]
struct Done {
    block: u64,
    start: Instant,
    ack: Instant,
}

fn block_of(m: usize, k: u64) -> u64 {
    (k.wrapping_mul(2654435761) ^ (m as u64 * 977)) % BLOCKS
}

fn pattern(m: usize, k: u64) -> Vec<u8> {
    let mut b = vec![(m as u8 + 1).wrapping_mul(k as u8 | 1); BLOCK as usize];
    b[..8].copy_from_slice(&k.to_le_bytes());
    b[8] = m as u8 + 1;
    b
}

/// The source as it was after the first `k` writes (`log[i]` is write i+1).
fn state(m: usize, log: &[Done], k: u64) -> Vec<u8> {
    let mut img = vec![0u8; DISK as usize];
    for (i, d) in log.iter().take(k as usize).enumerate() {
        let o = (d.block * BLOCK) as usize;
        img[o..o + BLOCK as usize].copy_from_slice(&pattern(m, i as u64 + 1));
    }
    img
}

fn highest_stamp(img: &[u8]) -> u64 {
    img.chunks(BLOCK as usize)
        .map(|b| u64::from_le_bytes(b[..8].try_into().unwrap()))
        .max()
        .unwrap_or(0)
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

struct Writer {
    log: Arc<Mutex<Vec<Done>>>,
    thread: JoinHandle<()>,
}

fn start_writer(m: usize, agent: &Agent, stop: Arc<AtomicBool>) -> Writer {
    let log = Arc::new(Mutex::new(Vec::new()));
    let (l, sock) = (log.clone(), agent.disks[0].2.clone());
    let thread = std::thread::spawn(move || {
        let mut c = NbdClient::connect(&sock, "d0").unwrap();
        let mut k = 0u64;
        while !stop.load(Ordering::Relaxed) {
            k += 1;
            let block = block_of(m, k);
            let start = Instant::now();
            c.write(block * BLOCK, &pattern(m, k), 0).unwrap();
            l.lock().unwrap().push(Done {
                block,
                start,
                ack: Instant::now(),
            });
            std::thread::sleep(Duration::from_millis(3));
        }
        c.disconnect();
    });
    Writer { log, thread }
}

/// A writer on every member's disk, and the flag that stops them.
fn start_writers(g: &Group) -> (Arc<AtomicBool>, Vec<Writer>) {
    let stop = Arc::new(AtomicBool::new(false));
    let writers = g
        .agents
        .iter()
        .enumerate()
        .map(|(m, a)| start_writer(m, a, stop.clone()))
        .collect();
    (stop, writers)
}

struct Group {
    ps: ProcessServer,
    agents: Vec<Agent>,
}

fn start_group(root: &Path, every: &str) -> Group {
    start_group_with(root, every, "", ["", "", ""])
}

/// `group_extra` goes into the `[[group]]`, `apps[m]` into machine m's
/// agent.toml.
fn start_group_with(root: &Path, every: &str, group_extra: &str, apps: [&str; 3]) -> Group {
    let mut ps = ProcessServer::init(&root.join("ps"), None, &[]).unwrap();
    let cfg = ps.dir.join("ps.toml");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(&format!(
        "\n[[group]]\nname = \"{GROUP}\"\nmachines = [{}]\nevery = \"{every}\"\nhold-timeout = \"{}s\"\n{group_extra}\n",
        MACHINES.map(|m| format!("\"{m}\"")).join(", "),
        HOLD.as_secs()
    ));
    std::fs::write(&cfg, text).unwrap();
    ps.start().unwrap();
    let mut agents = Vec::new();
    for (m, app) in MACHINES.into_iter().zip(apps) {
        let certs = ps.issue_cert(m).unwrap();
        let mut a =
            Agent::configure(&root.join(m), m, &certs, ps.port, &[("d0", DISK)], app).unwrap();
        a.start().unwrap();
        agents.push(a);
    }
    for a in &agents {
        a.wait_synced(Duration::from_secs(60)).unwrap();
    }
    Group { ps, agents }
}

fn group_tag(ps: &ProcessServer) -> std::process::Output {
    group_tag_with(ps, &[])
}

fn group_tag_with(ps: &ProcessServer, extra: &[&str]) -> std::process::Output {
    run_timeout(
        Command::new(bin("lifeboat-ps"))
            .args(["group-tag", "--json", "--group", GROUP])
            .args(extra)
            .arg("--config")
            .arg(ps.dir.join("ps.toml")),
        Duration::from_secs(60),
    )
    .unwrap()
}

/// Stops the writers; checks each source is "all its writes" and waits until
/// every agent's writes are acknowledged.
fn stop_writers(g: &Group, stop: &AtomicBool, writers: Vec<Writer>) -> Vec<Vec<Done>> {
    stop.store(true, Ordering::Relaxed);
    let logs: Vec<Vec<Done>> = writers
        .into_iter()
        .map(|w| {
            w.thread.join().unwrap();
            w.log.lock().unwrap().clone()
        })
        .collect();
    // The model is right: each source is "all its writes".
    for (m, a) in g.agents.iter().enumerate() {
        let src = std::fs::read(a.image("d0")).unwrap();
        let want = state(m, &logs[m], logs[m].len() as u64);
        assert_eq!(
            first_difference(&src, &want),
            None,
            "source of {}",
            MACHINES[m]
        );
        assert!(
            logs[m].len() > 100,
            "{} wrote only {} blocks",
            MACHINES[m],
            logs[m].len()
        );
        a.wait_acked(Duration::from_secs(60)).unwrap();
    }
    logs
}

/// `failover --group --point spec` must recover group point `id` (`latest`:
/// `id` or a newer one): each
/// machine's image its source after its first k writes, the cuts one moment.
fn fail_over_and_check(root: &Path, g: &Group, logs: &[Vec<Done>], spec: &str, id: u64) {
    let out = root.join(format!("out-{spec}"));
    let o = run_timeout(
        Command::new(bin("lifeboat-mt"))
            .args([
                "failover",
                "--group",
                GROUP,
                "--point",
                spec,
                "--store",
                &g.ps.store_url,
            ])
            .arg("--out")
            .arg(&out)
            .arg("--key-file")
            .arg(g.ps.kek()),
        Duration::from_secs(300),
    )
    .unwrap();
    assert!(
        o.status.success(),
        "group failover at {spec}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let text = String::from_utf8_lossy(&o.stdout);
    let got: u64 = text
        .split("group point ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no group point in {text}"));
    // `latest` may be a point the schedule recorded since it was listed.
    if spec == "latest" {
        assert!(got >= id, "latest recovered {got}, older than {id}: {text}");
    } else {
        assert_eq!(got, id, "{text}");
    }
    let mut cut = Vec::new();
    for (m, name) in MACHINES.iter().enumerate() {
        let img = std::fs::read(out.join(name).join("d0.raw")).unwrap();
        let k = highest_stamp(&img);
        let want = state(m, &logs[m], k);
        assert_eq!(
            first_difference(&img, &want),
            None,
            "{name} at group point {spec}: not the source after its first {k} writes"
        );
        cut.push(k);
    }
    // One moment: every write before the cut was issued before any write
    // after it was acknowledged.
    let latest_start = (0..3)
        .filter(|&m| cut[m] > 0)
        .map(|m| logs[m][cut[m] as usize - 1].start)
        .max();
    let earliest_ack = (0..3)
        .filter_map(|m| logs[m].get(cut[m] as usize).map(|d| d.ack))
        .min();
    if let (Some(s), Some(a)) = (latest_start, earliest_ack) {
        assert!(
            s < a,
            "group point {spec}: the cuts {cut:?} are not one moment"
        );
    }
}

fn group_points(ps: &ProcessServer) -> serde_json::Value {
    let out = run_ok(
        Command::new(bin("lifeboat-mt"))
            .args([
                "points",
                "--json",
                "--group",
                GROUP,
                "--store",
                &ps.store_url,
                "--key-file",
            ])
            .arg(ps.kek()),
        Duration::from_secs(60),
    )
    .unwrap();
    serde_json::from_str(&out).unwrap()
}

#[test]
fn group_points_fail_over_every_member_to_one_moment() {
    let root = tempfile::tempdir().unwrap();
    let g = start_group(root.path(), "3s");
    let (stop, writers) = start_writers(&g);

    // On demand, while the schedule also takes its points.
    let mut on_demand = Vec::new();
    while on_demand.len() < 2 {
        std::thread::sleep(Duration::from_millis(1500));
        let o = group_tag(&g.ps);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        if !o.status.success() {
            assert!(
                err.contains("being taken already"),
                "group-tag failed: {err}"
            );
            continue;
        }
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["members"].as_array().unwrap().len(), 3, "{v}");
        on_demand.push(v["id"].as_u64().unwrap());
    }
    std::thread::sleep(Duration::from_secs(4));
    let logs = stop_writers(&g, &stop, writers);

    let listed = group_points(&g.ps);
    let points = listed["points"].as_array().unwrap().clone();
    assert!(listed["verified"].as_bool().unwrap());
    assert!(
        listed["unusable"].as_array().unwrap().is_empty(),
        "{listed}"
    );
    let ids: Vec<u64> = points.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    for id in &on_demand {
        assert!(
            ids.contains(id),
            "on-demand point {id} not listed: {listed}"
        );
    }
    let scheduled: Vec<u64> = points
        .iter()
        .filter(|p| p["label"].as_str().unwrap().ends_with("scheduled"))
        .map(|p| p["id"].as_u64().unwrap())
        .collect();
    assert!(!scheduled.is_empty(), "no scheduled group point: {listed}");

    let mut check: Vec<(String, u64)> = on_demand.iter().map(|id| (id.to_string(), *id)).collect();
    check.push((scheduled[0].to_string(), scheduled[0]));
    check.push(("latest".into(), *ids.last().unwrap()));
    for (spec, id) in check {
        fail_over_and_check(root.path(), &g, &logs, &spec, id);
    }
}

#[test]
fn a_stopped_member_times_out_releases_the_others_and_records_nothing() {
    let root = tempfile::tempdir().unwrap();
    let g = start_group(root.path(), "0s");
    let o = group_tag(&g.ps);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let before = group_points(&g.ps)["points"].as_array().unwrap().len();
    assert_eq!(before, 1);

    let stopped = g.agents[2].proc.as_ref().unwrap().pid() as i32;
    // SAFETY: signals a process this test started.
    unsafe { libc::kill(stopped, libc::SIGSTOP) };
    let started = Instant::now();
    let ps_dir = g.ps.dir.clone();
    let attempt = std::thread::spawn(move || {
        run_timeout(
            Command::new(bin("lifeboat-ps"))
                .args(["group-tag", "--group", GROUP, "--config"])
                .arg(ps_dir.join("ps.toml")),
            Duration::from_secs(60),
        )
        .unwrap()
    });
    // The others hold their writes now: a write waits, then completes after
    // the bound released them.
    std::thread::sleep(Duration::from_millis(700));
    let mut c = NbdClient::connect(&g.agents[0].disks[0].2, "d0").unwrap();
    c.write(0, &pattern(0, 1), 0).unwrap();
    let done = started.elapsed();
    let o = attempt.join().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    // SAFETY: as above.
    unsafe { libc::kill(stopped, libc::SIGCONT) };
    assert!(
        !o.status.success(),
        "the group point with a stopped member succeeded"
    );
    assert!(
        err.contains(MACHINES[2]) && err.contains("hold-timeout"),
        "{err}"
    );
    assert!(err.contains("no group point was recorded"), "{err}");
    assert!(
        done < HOLD + Duration::from_secs(3),
        "the write waited {done:?}"
    );
    // Writes go on.
    let t = Instant::now();
    c.write(BLOCK, &pattern(0, 2), 0).unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "a write after the release waited {:?}",
        t.elapsed()
    );
    c.disconnect();

    let after = group_points(&g.ps);
    assert_eq!(after["points"].as_array().unwrap().len(), before, "{after}");
    assert!(after["unusable"].as_array().unwrap().is_empty(), "{after}");
    // The stopped member, resumed, holds at most its bound, and the group
    // works again.
    std::thread::sleep(HOLD + Duration::from_secs(1));
    let o = group_tag(&g.ps);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        group_points(&g.ps)["points"].as_array().unwrap().len(),
        before + 1
    );
}

/// An ext4 on a loop device over an image file, mounted at `.0` (a real
/// filesystem to FIFREEZE; not on a protected disk); unmounted on drop.
struct LoopExt4(std::path::PathBuf);

impl LoopExt4 {
    fn create(root: &Path) -> LoopExt4 {
        let img = root.join("freeze-fs.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(32 << 20)
            .unwrap();
        run_ok(
            Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img),
            Duration::from_secs(60),
        )
        .unwrap();
        let mnt = root.join("freeze-mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        run_ok(
            Command::new("mount")
                .args(["-o", "loop"])
                .arg(&img)
                .arg(&mnt),
            Duration::from_secs(60),
        )
        .expect("mounting an ext4 on a loop device (the suite runs as root)");
        LoopExt4(mnt)
    }

    /// A write and fsync on it finish within `bound` (it is not frozen).
    fn writable_within(&self, bound: Duration) -> bool {
        let p = self.0.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let r = std::fs::write(p.join("probe"), b"thawed")
                .and_then(|_| std::fs::File::open(p.join("probe"))?.sync_all());
            let _ = tx.send(r.is_ok());
        });
        rx.recv_timeout(bound).unwrap_or(false)
    }
}

impl Drop for LoopExt4 {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze").arg("-u").arg(&self.0).status();
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The three members' quiescers: vss-test, scripts, FIFREEZE of `fs`.
fn app_sections(root: &Path, fs: &LoopExt4, pre_b: &str, extra_b: &str) -> [String; 3] {
    let pre = write_script(&root.join("b-pre.sh"), pre_b);
    let post = write_script(
        &root.join("b-post.sh"),
        &format!(
            "echo \"$LIFEBOAT_LABEL\" >> {}",
            root.join("b-post-ran").display()
        ),
    );
    [
        "[app]\nquiesce = \"vss-test\"\n".to_string(),
        format!(
            "[app]\npre-freeze = [\"{}\"]\npost-thaw = [\"{}\"]\n{extra_b}",
            pre.display(),
            post.display()
        ),
        format!("[app]\nfreeze = [\"{}\"]\n", fs.0.display()),
    ]
}

/// The group with [`app_sections`] quiescers (no scheduled points), writers
/// running on all three.
fn start_app_group(
    root: &Path,
    pre_b: &str,
    extra_b: &str,
    quiesce_timeout: &str,
) -> (LoopExt4, Group, Arc<AtomicBool>, Vec<Writer>) {
    let fs = LoopExt4::create(root);
    let apps = app_sections(root, &fs, pre_b, extra_b);
    let g = start_group_with(
        root,
        "0s",
        &format!("app-interval = \"off\"\nquiesce-timeout = \"{quiesce_timeout}\""),
        [&apps[0], &apps[1], &apps[2]],
    );
    let (stop, writers) = start_writers(&g);
    std::thread::sleep(Duration::from_secs(1));
    (fs, g, stop, writers)
}

#[test]
fn app_group_points_quiesce_every_member_and_fail_over_to_one_moment() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().canonicalize().unwrap();
    let pre_ran = root.join("b-pre-ran");
    let pre = format!("echo \"$LIFEBOAT_LABEL\" >> {}", pre_ran.display());
    let (fs, g, stop, writers) = start_app_group(&root, &pre, "", "20s");

    let o = group_tag_with(&g.ps, &["--app", "--label", "nightly"]);
    assert!(
        o.status.success(),
        "group-tag --app: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let app: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(app["kind"], "app", "{app}");
    let sources: Vec<&str> = app["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["source"].as_str().unwrap_or("none"))
        .collect();
    assert_eq!(sources, ["vss", "script", "fsfreeze"], "{app}");
    let app_id = app["id"].as_u64().unwrap();
    // Thawed after the hold: the frozen filesystem takes writes again, the
    // post-thaw script ran, writes went on.
    assert!(
        fs.writable_within(Duration::from_secs(5)),
        "the FIFREEZE member stayed frozen"
    );
    wait_for("the post-thaw script", Duration::from_secs(10), || {
        std::fs::read_to_string(root.join("b-post-ran"))
            .ok()
            .filter(|t| t.contains(&format!("{GROUP}:{app_id}")))
    })
    .unwrap();
    assert!(std::fs::read_to_string(&pre_ran)
        .unwrap()
        .contains(&format!("{GROUP}:{app_id}")));
    std::thread::sleep(Duration::from_millis(1500));
    let o = group_tag(&g.ps);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let crash: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(crash.get("kind").is_none(), "{crash}");
    let crash_id = crash["id"].as_u64().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let logs = stop_writers(&g, &stop, writers);

    let listed = group_points(&g.ps);
    let points = listed["points"].as_array().unwrap();
    assert_eq!(points.len(), 2, "{listed}");
    assert_eq!(points[0]["kind"], "app", "{listed}");
    assert_eq!(points[0]["members"][2]["source"], "fsfreeze", "{listed}");
    // The stored member tags are app points with their sources.
    for (m, want) in MACHINES.iter().zip(["vss", "script", "fsfreeze"]) {
        let pts = points_of(&g.ps, m);
        let seq = app["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["machine"] == *m)
            .unwrap()["seq"]
            .clone();
        let p = pts
            .iter()
            .find(|p| p["seq"] == seq)
            .unwrap_or_else(|| panic!("{m}: no point at {seq}"));
        assert_eq!(
            (p["kind"].as_str(), p["source"].as_str()),
            (Some("app"), Some(want)),
            "{p}"
        );
    }
    fail_over_and_check(&root, &g, &logs, "latest-app", app_id);
    fail_over_and_check(&root, &g, &logs, "latest-crash", crash_id);
    fail_over_and_check(&root, &g, &logs, &app_id.to_string(), app_id);
}

fn points_of(ps: &ProcessServer, machine: &str) -> Vec<serde_json::Value> {
    points(&ps.store_url, machine, &[]).unwrap()["points"]
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn a_hung_pre_freeze_script_fails_the_app_point_and_releases_and_thaws_every_member() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().canonicalize().unwrap();
    let (fs, g, stop, writers) =
        start_app_group(&root, "sleep 600", "script-timeout = \"3s\"\n", "10s");
    let t = Instant::now();
    let o = group_tag_with(&g.ps, &["--app"]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "the app group point succeeded");
    assert!(
        t.elapsed() < Duration::from_secs(9),
        "the failure took {:?}",
        t.elapsed()
    );
    assert!(
        err.contains(&format!("{} could not quiesce", MACHINES[1]))
            && err.contains("pre-freeze failed")
            && err.contains("b-pre.sh"),
        "{err}"
    );
    assert!(err.contains("no group point was recorded"), "{err}");
    // Every member released and thawed: writes go on everywhere, the frozen
    // filesystem takes writes.
    assert!(
        fs.writable_within(Duration::from_secs(5)),
        "the FIFREEZE member stayed frozen"
    );
    let counts =
        |w: &[Writer]| -> Vec<usize> { w.iter().map(|w| w.log.lock().unwrap().len()).collect() };
    let before = counts(&writers);
    std::thread::sleep(Duration::from_secs(1));
    let after = counts(&writers);
    for m in 0..3 {
        assert!(
            after[m] > before[m] + 20,
            "{} wrote {} blocks in a second after the failure",
            MACHINES[m],
            after[m] - before[m]
        );
    }
    assert!(group_points(&g.ps)["points"].as_array().unwrap().is_empty());
    // The failure is in both statuses.
    let status = g.ps.status_json();
    let failure = &status["groups"][GROUP]["last-failure"];
    assert_eq!(failure["kind"], "app", "{status}");
    assert!(
        failure["error"].as_str().unwrap().contains("pre-freeze"),
        "{status}"
    );
    let agent = g.agents[1].status().unwrap();
    assert!(
        agent["app-points"]["last-failure"]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("pre-freeze"),
        "{agent}"
    );
    // The group works again: a crash point, and an app point once the
    // script no longer hangs.
    write_script(&root.join("b-pre.sh"), "true");
    let o = group_tag_with(&g.ps, &["--app"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let logs = stop_writers(&g, &stop, writers);
    let id = group_points(&g.ps)["points"][0]["id"].as_u64().unwrap();
    fail_over_and_check(&root, &g, &logs, "latest-app", id);
}
