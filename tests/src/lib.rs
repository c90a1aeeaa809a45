//! Harness for end-to-end tests: starts the real binaries (`lifeboat-ps`,
//! `lifeboat-agent`, `lifeboat-mt`) and real peers (qemu-io, fio, nbdfuse,
//! Azurite, s3s-fs) on 127.0.0.1, stops them by PID, and bounds every wait.

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

pub mod faults;
pub mod http;
pub mod nbd;
pub mod peers;
pub mod powerfs;
pub mod proxy;
pub use peers::ObjectStorePeer;

/// Directory of the workspace's built binaries (next to the test executable).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> → target/<profile>; a binary of this crate
    // (target/<profile>/lifeboat-faults) is already there.
    let dir = exe.parent().expect("target dir");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("target dir").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// Where tests leave files for a person to look at (screenshots):
/// `$LIFEBOAT_TEST_ARTIFACTS`, or `target/test-artifacts` (created).
pub fn artifact_dir() -> PathBuf {
    let dir = std::env::var_os("LIFEBOAT_TEST_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| bin_dir().join("..").join("test-artifacts"));
    std::fs::create_dir_all(&dir).expect("creating the test artifact directory");
    dir
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is not built; run `cargo build --release --workspace --bins` first (the test script does)",
        p.display()
    );
    p
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A child process killed (SIGKILL, by PID) when dropped.
pub struct Proc {
    pub name: String,
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Proc> {
        let out = std::fs::File::create(log)?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Proc {
            name: name.into(),
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on our own child's PID.
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL. Returns whether it exited by itself.
    pub fn stop(&mut self, grace: Duration) -> bool {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(_)) = c.try_wait() {
                    self.child = None;
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill9();
        false
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs a command to completion within `timeout`; kills it otherwise.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {desc}"))?;
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let t1 = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t2 = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{desc} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Output {
        status,
        stdout: t1.join().unwrap_or_default(),
        stderr: t2.join().unwrap_or_default(),
    })
}

/// Runs a command that must succeed; returns stdout.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Result<String> {
    let desc = format!("{cmd:?}");
    let out = run_timeout(cmd, timeout)?;
    if !out.status.success() {
        bail!(
            "{desc} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `f` until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An initialised, running process server.
pub struct ProcessServer {
    pub dir: PathBuf,
    pub port: u16,
    pub store_url: String,
    pub proc: Option<Proc>,
}

impl ProcessServer {
    /// `lifeboat-ps init` into `dir`, with the store and config tweaks given.
    pub fn init(
        dir: &Path,
        store_url: Option<&str>,
        extra_store_options: &[(&str, &str)],
    ) -> Result<ProcessServer> {
        let port = free_port();
        let mut cmd = Command::new(bin("lifeboat-ps"));
        cmd.args(["init", "--dir"]).arg(dir);
        cmd.args(["--listen", &format!("127.0.0.1:{port}")]);
        if let Some(u) = store_url {
            cmd.args(["--store", u]);
        }
        run_ok(&mut cmd, Duration::from_secs(30))?;
        let cfg_path = dir.join("ps.toml");
        let mut cfg = std::fs::read_to_string(&cfg_path)?;
        // Short segments so tests see data in the store quickly.
        cfg = cfg.replace("segment-max-age = \"500ms\"", "segment-max-age = \"300ms\"");
        if !extra_store_options.is_empty() {
            let opts: Vec<String> = extra_store_options
                .iter()
                .map(|(k, v)| format!("{k} = \"{v}\""))
                .collect();
            // Right below the store's url: [store] need not be the last table.
            let url = cfg
                .find("\n[store]\nurl = ")
                .expect("init writes [store] with its url first");
            let eol = url + 1 + cfg[url + 1..].find('\n').unwrap() + 1;
            let eol = eol + cfg[eol..].find('\n').unwrap() + 1;
            cfg.insert_str(eol, &format!("options = {{ {} }}\n", opts.join(", ")));
        }
        std::fs::write(&cfg_path, cfg)?;
        let store_url = store_url
            .map(String::from)
            .unwrap_or_else(|| format!("file://{}/store", dir.canonicalize().unwrap().display()));
        Ok(ProcessServer {
            dir: dir.canonicalize()?,
            port,
            store_url,
            proc: None,
        })
    }

    pub fn start(&mut self) -> Result<()> {
        let log = self.dir.join(format!("ps-{}.log", std::process::id()));
        let log = if log.exists() {
            self.dir
                .join(format!("ps-{}-{}.log", std::process::id(), now_nanos()))
        } else {
            log
        };
        let mut cmd = Command::new(bin("lifeboat-ps"));
        cmd.args(["serve", "--config"])
            .arg(self.dir.join("ps.toml"));
        let mut p = Proc::spawn("lifeboat-ps", &mut cmd, &log)?;
        let port = self.port;
        wait_for("lifeboat-ps to listen", Duration::from_secs(30), || {
            if !p.is_running() {
                return Some(false);
            }
            std::net::TcpStream::connect(("127.0.0.1", port))
                .ok()
                .map(|_| true)
        })
        .and_then(|ok| {
            if ok {
                Ok(())
            } else {
                Err(anyhow!("lifeboat-ps exited at start:\n{}", p.log_text()))
            }
        })?;
        self.proc = Some(p);
        Ok(())
    }

    pub fn issue_cert(&self, machine: &str) -> Result<PathBuf> {
        run_ok(
            Command::new(bin("lifeboat-ps"))
                .args(["issue-cert", "--dir"])
                .arg(&self.dir)
                .args(["--machine", machine]),
            Duration::from_secs(30),
        )?;
        Ok(self.dir.join("machines").join(machine))
    }

    /// [`failover`] (a drill) from this server's store (no store options)
    /// that must succeed; returns the output directory.
    pub fn failover_ok(&self, machine: &str, point: &str, out: &Path) -> PathBuf {
        self.must_fail_over("test-failover", machine, point, out)
    }

    /// [`real_failover`] that must succeed; returns the output directory.
    pub fn real_failover_ok(&self, machine: &str, point: &str, out: &Path) -> PathBuf {
        self.must_fail_over("failover", machine, point, out)
    }

    fn must_fail_over(&self, verb: &str, machine: &str, point: &str, out: &Path) -> PathBuf {
        let o =
            failover_command(verb, &self.store_url, machine, point, out, &self.kek(), &[]).unwrap();
        assert!(
            o.status.success(),
            "{verb} at {point}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        out.to_path_buf()
    }

    /// The id of the newest stored point with this label.
    pub fn point_labelled(&self, machine: &str, label: &str) -> String {
        let pts = points(&self.store_url, machine, &[]).unwrap();
        pts["points"]
            .as_array()
            .unwrap()
            .iter()
            .rev()
            .find(|p| p["label"] == label)
            .and_then(|p| p["id"].as_str().map(String::from))
            .unwrap_or_else(|| panic!("no {label} point: {pts}"))
    }

    /// Appends `text` (whole tables) to the server's ps.toml.
    pub fn append_config(&self, text: &str) {
        let path = self.dir.join("ps.toml");
        let mut cfg = std::fs::read_to_string(&path).unwrap();
        cfg.push('\n');
        cfg.push_str(text);
        std::fs::write(&path, cfg).unwrap();
    }

    /// `lifeboat-ps status`: its text, or with `json` its JSON document
    /// (which must parse).
    pub fn status(&self, json: bool) -> Result<String> {
        let mut cmd = Command::new(bin("lifeboat-ps"));
        cmd.arg("status");
        if json {
            cmd.arg("--json");
        }
        run_ok(
            cmd.arg("--config").arg(self.dir.join("ps.toml")),
            Duration::from_secs(30),
        )
    }

    /// `lifeboat-ps status --json`, parsed.
    pub fn status_json(&self) -> serde_json::Value {
        let out = self.status(true).unwrap();
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("status {out:?}: {e}"))
    }

    /// An agent of `machine` (whose certificate `init` or `issue_cert`
    /// made) in `dir`, protecting `disks`, started and synced.
    pub fn synced_agent(&self, dir: &Path, machine: &str, disks: &[(&str, u64)]) -> Agent {
        let certs = self.dir.join("machines").join(machine);
        let mut agent = Agent::configure(dir, machine, &certs, self.port, disks, "").unwrap();
        agent.start().unwrap();
        agent.wait_synced(Duration::from_secs(120)).unwrap();
        agent
    }

    pub fn kek(&self) -> PathBuf {
        self.dir.join("kek.key")
    }

    pub fn log(&self) -> String {
        self.proc.as_ref().map(|p| p.log_text()).unwrap_or_default()
    }
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// A running agent protecting image files.
pub struct Agent {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub disks: Vec<(String, PathBuf, PathBuf)>,
    pub proc: Option<Proc>,
}

impl Agent {
    /// Writes agent.toml for `disks` (id, size) backed by zero-filled sparse images.
    pub fn configure(
        dir: &Path,
        machine: &str,
        certs: &Path,
        ps_port: u16,
        disks: &[(&str, u64)],
        extra: &str,
    ) -> Result<Agent> {
        std::fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        let mut toml = format!(
            "machine = \"{machine}\"\nserver = \"127.0.0.1:{ps_port}\"\nserver-name = \"localhost\"\n\
             ca-cert = \"{c}/ca.pem\"\nclient-cert = \"{c}/client.pem\"\nclient-key = \"{c}/client.key\"\n\
             state-dir = \"{d}/state\"\n{extra}\n",
            c = certs.display(),
            d = dir.display()
        );
        let mut list = Vec::new();
        for (id, size) in disks {
            let img = dir.join(format!("{id}.img"));
            if !img.exists() {
                let f = std::fs::File::create(&img)?;
                f.set_len(*size)?;
            }
            let sock = dir.join(format!("{id}.sock"));
            toml.push_str(&format!(
                "\n[[disk]]\nid = \"{id}\"\npath = \"{}\"\nsocket = \"{}\"\n",
                img.display(),
                sock.display()
            ));
            list.push((id.to_string(), img, sock));
        }
        let config = dir.join("agent.toml");
        std::fs::write(&config, toml)?;
        Ok(Agent {
            dir,
            config,
            disks: list,
            proc: None,
        })
    }

    pub fn start(&mut self) -> Result<()> {
        let log = self.dir.join(format!("agent-{}.log", now_nanos()));
        // A killed agent leaves its sockets behind: wait for the new ones.
        for (_, _, sock) in &self.disks {
            let _ = std::fs::remove_file(sock);
        }
        let _ = std::fs::remove_file(self.dir.join("state/control.sock"));
        let mut cmd = Command::new(bin("lifeboat-agent"));
        cmd.args(["run", "--config"]).arg(&self.config);
        let mut p = Proc::spawn("lifeboat-agent", &mut cmd, &log)?;
        let socks: Vec<PathBuf> = self.disks.iter().map(|d| d.2.clone()).collect();
        let ctl = self.dir.join("state/control.sock");
        let ok = wait_for("the agent's sockets", Duration::from_secs(30), || {
            if !p.is_running() {
                return Some(false);
            }
            (socks.iter().all(|s| s.exists()) && ctl.exists()).then_some(true)
        })?;
        if !ok {
            bail!("lifeboat-agent exited at start:\n{}", p.log_text());
        }
        self.proc = Some(p);
        Ok(())
    }

    /// Waits until every disk finished its initial sync (the first point exists).
    pub fn wait_synced(&self, timeout: Duration) -> Result<()> {
        wait_for("the initial sync to finish", timeout, || {
            let s = self.status().ok()?;
            let disks = s["sync"].as_array()?.clone();
            disks
                .iter()
                .all(|d| d["state"] == "streaming")
                .then_some(())
        })
    }

    pub fn uri(&self, disk: &str) -> String {
        let (_, _, sock) = self
            .disks
            .iter()
            .find(|d| d.0 == disk)
            .expect("disk configured");
        format!("nbd+unix:///{disk}?socket={}", sock.display())
    }

    pub fn image(&self, disk: &str) -> PathBuf {
        self.disks
            .iter()
            .find(|d| d.0 == disk)
            .expect("disk configured")
            .1
            .clone()
    }

    /// Places a crash-consistent tag now; returns its seq.
    pub fn tag(&self) -> Result<u64> {
        let out = run_ok(
            Command::new(bin("lifeboat-agent"))
                .args(["tag", "--config"])
                .arg(&self.config),
            Duration::from_secs(30),
        )?;
        out.trim()
            .parse()
            .with_context(|| format!("tag printed {out:?}"))
    }

    /// `lifeboat-agent tag --app --label <label>`; returns the command's
    /// output (success not required).
    pub fn tag_app(&self, label: &str) -> Result<Output> {
        run_timeout(
            Command::new(bin("lifeboat-agent"))
                .args(["tag", "--app", "--label", label, "--config"])
                .arg(&self.config),
            Duration::from_secs(300),
        )
    }

    pub fn status(&self) -> Result<serde_json::Value> {
        let out = run_ok(
            Command::new(bin("lifeboat-agent"))
                .args(["status", "--config"])
                .arg(&self.config),
            Duration::from_secs(30),
        )?;
        Ok(serde_json::from_str(&out)?)
    }

    /// Waits until the process server acknowledged everything captured so far.
    pub fn wait_acked(&self, timeout: Duration) -> Result<u64> {
        let captured = self.status()?["positions"]["captured"]
            .as_u64()
            .unwrap_or(0);
        wait_for("the agent's stream to be acknowledged", timeout, || {
            let s = self.status().ok()?;
            let acked = s["positions"]["acked"].as_u64()?;
            (acked >= captured).then_some(acked)
        })
    }
}

/// A started process server (file:// store) and an agent for "machine-1"
/// configured but not started, under `root/ps` and `root/agent`; `extra` is
/// added to agent.toml.
pub fn configured_pair(
    root: &Path,
    disks: &[(&str, u64)],
    extra: &str,
) -> Result<(ProcessServer, Agent)> {
    let mut ps = ProcessServer::init(&root.join("ps"), None, &[])?;
    ps.start()?;
    let certs = ps.dir.join("machines").join("machine-1");
    let agent = Agent::configure(
        &root.join("agent"),
        "machine-1",
        &certs,
        ps.port,
        disks,
        extra,
    )?;
    Ok((ps, agent))
}

/// [`configured_pair`], with the agent started and synced.
pub fn start_pair(
    root: &Path,
    disks: &[(&str, u64)],
    extra: &str,
) -> Result<(ProcessServer, Agent)> {
    let (ps, mut agent) = configured_pair(root, disks, extra)?;
    agent.start()?;
    agent.wait_synced(Duration::from_secs(120))?;
    Ok((ps, agent))
}

/// `lifeboat-mt points --json`.
pub fn points(store: &str, machine: &str, options: &[String]) -> Result<serde_json::Value> {
    let mut cmd = Command::new(bin("lifeboat-mt"));
    cmd.args(["points", "--store", store, "--machine", machine, "--json"]);
    for o in options {
        cmd.args(["--store-option", o]);
    }
    let out = run_ok(&mut cmd, Duration::from_secs(60))?;
    Ok(serde_json::from_str(&out)?)
}

/// Waits until the store's durable stream reaches `seq`.
pub fn wait_stored(
    store: &str,
    machine: &str,
    options: &[String],
    seq: u64,
    timeout: Duration,
) -> Result<()> {
    let mut seen = String::from("nothing yet");
    wait_for(
        &format!("seq {seq} in the store"),
        timeout,
        || match points(store, machine, options) {
            Ok(v) => {
                let end = v["stream-end"].as_u64();
                seen = format!("stream end {end:?}");
                (end? >= seq).then_some(())
            }
            Err(e) => {
                seen = format!("`lifeboat-mt points` failed: {e:#}");
                None
            }
        },
    )
    .map_err(|e| anyhow!("{e} (last seen: {seen})"))
}

/// `lifeboat-mt test-failover`: the disks at a point, checked, with the
/// replication state untouched (a real failover makes the agent's next
/// session rebase: [`real_failover`]); returns the command's output (success
/// not required).
pub fn failover(
    store: &str,
    machine: &str,
    point: &str,
    out: &Path,
    kek: &Path,
    options: &[String],
) -> Result<Output> {
    failover_command("test-failover", store, machine, point, out, kek, options)
}

/// `lifeboat-mt failover`, recorded in the store (`failed-over.json`).
pub fn real_failover(
    store: &str,
    machine: &str,
    point: &str,
    out: &Path,
    kek: &Path,
    options: &[String],
) -> Result<Output> {
    failover_command("failover", store, machine, point, out, kek, options)
}

fn failover_command(
    verb: &str,
    store: &str,
    machine: &str,
    point: &str,
    out: &Path,
    kek: &Path,
    options: &[String],
) -> Result<Output> {
    let mut cmd = Command::new(bin("lifeboat-mt"));
    cmd.args([
        verb,
        "--store",
        store,
        "--machine",
        machine,
        "--point",
        point,
        "--out",
    ])
    .arg(out)
    .arg("--key-file")
    .arg(kek);
    for o in options {
        cmd.args(["--store-option", o]);
    }
    run_timeout(&mut cmd, Duration::from_secs(300))
}

/// Asserts two files are byte-for-byte equal, naming the first differing offset.
pub fn assert_same(a: &Path, b: &Path) {
    let mut fa = std::fs::File::open(a).unwrap_or_else(|e| panic!("{}: {e}", a.display()));
    let mut fb = std::fs::File::open(b).unwrap_or_else(|e| panic!("{}: {e}", b.display()));
    let la = fa.metadata().unwrap().len();
    let lb = fb.metadata().unwrap().len();
    assert_eq!(la, lb, "{} and {} differ in size", a.display(), b.display());
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        let n = fa.read(&mut ba).unwrap();
        if n == 0 {
            break;
        }
        fb.read_exact(&mut bb[..n]).unwrap();
        if ba[..n] != bb[..n] {
            let i = ba[..n]
                .iter()
                .zip(&bb[..n])
                .position(|(x, y)| x != y)
                .unwrap();
            panic!(
                "{} and {} differ at byte {} (0x{:x})",
                a.display(),
                b.display(),
                off + i as u64,
                off + i as u64
            );
        }
        off += n as u64;
    }
}

/// Copies a file (a snapshot of a source disk at some moment).
pub fn snapshot(src: &Path, dst: &Path) {
    std::fs::copy(src, dst).unwrap_or_else(|e| panic!("copying {}: {e}", src.display()));
}

/// Whether an external program is on PATH.
pub fn have(prog: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {prog}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// qemu-io against an NBD URI with writeback cache (no implicit FUA).
pub fn qemu_io(uri: &str, cmds: &[&str]) -> Result<String> {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", "-t", "writeback", uri]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    let out = run_ok(&mut cmd, Duration::from_secs(120))?;
    if out.contains("failed") || out.contains("Pattern verification failed") {
        bail!("qemu-io reported a failure:\n{out}");
    }
    Ok(out)
}

/// xorshift64*: deterministic test data without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Overwrites `len` bytes of `path` from `offset` with random data (synced).
pub fn fill_random(path: &Path, offset: u64, len: u64, rng: &mut Rng) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all_at(&buf[..n], offset + at).unwrap();
        at += n as u64;
    }
    f.sync_all().unwrap();
}

/// Gives `count` distinct random 4 KiB blocks below `limit` new random content
/// behind the agent's back; returns the changed blocks.
pub fn change_blocks(
    path: &Path,
    limit: u64,
    count: u64,
    rng: &mut Rng,
) -> std::collections::BTreeSet<u64> {
    use std::os::unix::fs::FileExt;
    const BLOCK: u64 = 4096;
    let blocks = limit / BLOCK;
    let mut changed = std::collections::BTreeSet::new();
    while (changed.len() as u64) < count {
        changed.insert(rng.next_u64() % blocks);
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut old = vec![0u8; BLOCK as usize];
    let mut new = vec![0u8; BLOCK as usize];
    for &b in &changed {
        f.read_exact_at(&mut old, b * BLOCK).unwrap();
        rng.fill(&mut new);
        assert_ne!(old, new);
        f.write_all_at(&new, b * BLOCK).unwrap();
    }
    f.sync_all().unwrap();
    changed
}

impl Agent {
    /// Waits until a checksum resync the agent started by itself finished and
    /// the stream is `streaming` again; returns the run's report.
    pub fn wait_checksum_resync(&self, timeout: Duration) -> Result<serde_json::Value> {
        wait_for("the checksum resync to finish", timeout, || {
            let s = self.status().ok()?;
            let c = &s["checksum-resync"];
            (c["pending"].is_null()
                && c["running"] == false
                && !c["last"].is_null()
                && s["state"] == "streaming")
                .then(|| c["last"].clone())
        })
    }
}

/// A running process server and a synced, fully acknowledged agent for
/// "machine-1" whose one disk "root" (`size` bytes) held random data from `rng`
/// before protection began. `port` says where the agent connects: the
/// server's port, or a proxy's in front of it.
pub fn synced_random_disk(
    root: &Path,
    size: u64,
    rng: &mut Rng,
    port: impl FnOnce(&ProcessServer) -> u16,
) -> (ProcessServer, Agent) {
    let mut ps = ProcessServer::init(&root.join("ps"), None, &[]).unwrap();
    ps.start().unwrap();
    let certs = ps.dir.join("machines").join("machine-1");
    let port = port(&ps);
    let mut agent = Agent::configure(
        &root.join("agent"),
        "machine-1",
        &certs,
        port,
        &[("root", size)],
        "",
    )
    .unwrap();
    fill_random(&agent.image("root"), 0, size, rng);
    agent.start().unwrap();
    agent.wait_synced(Duration::from_secs(300)).unwrap();
    agent.wait_acked(Duration::from_secs(120)).unwrap();
    (ps, agent)
}

impl Agent {
    /// Stops the agent, which must stop cleanly.
    pub fn stop_clean(&mut self) {
        let stopped = self.proc.as_mut().map(|p| p.stop(Duration::from_secs(30)));
        assert_eq!(stopped, Some(true), "the agent must stop cleanly");
    }
}

/// `lifeboat-mt serve --config <config>`, logging to `log`, once it listens.
pub fn start_master_target(config: &Path, log: &Path) -> Proc {
    let mut p = Proc::spawn(
        "lifeboat-mt",
        Command::new(bin("lifeboat-mt"))
            .args(["serve", "--config"])
            .arg(config),
        log,
    )
    .unwrap();
    wait_for(
        "the master target to listen",
        Duration::from_secs(30),
        || {
            assert!(
                p.is_running(),
                "lifeboat-mt serve exited:\n{}",
                p.log_text()
            );
            p.log_text().contains("lifeboat-mt serving").then_some(())
        },
    )
    .unwrap();
    p
}

/// Sets a disk image's size (the disk was resized).
pub fn resize_file(path: &Path, size: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(size))
        .unwrap_or_else(|e| panic!("resizing {}: {e}", path.display()));
}

impl ProcessServer {
    /// Waits until the point at `tag_seq` (labelled `label`) is stored, then
    /// checks that failover there writes `image` byte for byte into `out`.
    pub fn assert_point_exact(
        &self,
        machine: &str,
        label: &str,
        tag_seq: u64,
        image: &Path,
        out: &Path,
    ) {
        wait_stored(
            &self.store_url,
            machine,
            &[],
            tag_seq,
            Duration::from_secs(180),
        )
        .unwrap();
        let point = self.point_labelled(machine, label);
        assert_eq!(point, tag_seq.to_string(), "the newest {label} point");
        let disk = image.file_stem().unwrap().to_string_lossy().to_string();
        self.failover_ok(machine, &point, out);
        assert_same(&out.join(format!("{disk}.raw")), image);
    }
}

/// An executable `#!/bin/sh` script at `path` running `body`.
pub fn write_script(path: &Path, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.to_path_buf()
}

/// fio's NBD engine writing at random offsets into `uri` in the background,
/// with `args` added (block sizes, depth, runtime); its output goes to `log`.
pub fn spawn_fio_randwrite(uri: &str, log: &Path, args: &[&str]) -> Proc {
    Proc::spawn("fio", &mut fio_command(uri, args), log).unwrap()
}

/// fio's NBD engine, random writes into `uri`, `args` added.
fn fio_command(uri: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("fio");
    cmd.args([
        "--name=w",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--randrepeat=0",
    ])
    .args(args);
    cmd
}

/// fio's NBD engine writing at random offsets into `uri`, with `args` added
/// (block size, depth, size or runtime, ...); its JSON report goes to
/// `report`. Fails if fio does.
pub fn fio_randwrite(uri: &str, report: &Path, args: &[&str]) -> Result<String> {
    let mut cmd = fio_command(uri, args);
    cmd.arg(format!("--output={}", report.display()));
    run_ok(&mut cmd, Duration::from_secs(300))
}

/// A size-limited tmpfs mounted at `.0` (created), unmounted (lazily) on drop:
/// a filesystem a test can fill up.
pub struct SmallFs(pub PathBuf);

impl SmallFs {
    pub fn mount(dir: &Path, size: &str) -> SmallFs {
        std::fs::create_dir_all(dir).unwrap();
        run_ok(
            Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={size},mode=0700"),
                    "tmpfs",
                ])
                .arg(dir),
            Duration::from_secs(30),
        )
        .expect("mounting a tmpfs (the suite runs as root)");
        SmallFs(dir.to_path_buf())
    }

    /// Fills the filesystem with the file `name` (written until it is
    /// refused for lack of space); returns its path.
    pub fn fill(&self, name: &str) -> PathBuf {
        use std::io::Write;
        let path = self.0.join(name);
        let mut f = std::fs::File::create(&path).unwrap();
        let mut chunk = vec![0u8; 1 << 20];
        while chunk.len() >= 512 {
            match f.write_all(&chunk) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => {
                    let half = chunk.len() / 2;
                    chunk.truncate(half);
                }
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        path
    }

    /// The filesystem's size in bytes.
    pub fn total(&self) -> u64 {
        self.statvfs().0
    }

    /// Bytes an unprivileged writer could still allocate.
    pub fn free(&self) -> u64 {
        self.statvfs().1
    }

    /// (size, free for an unprivileged writer) in bytes.
    fn statvfs(&self) -> (u64, u64) {
        // SAFETY: statvfs(3) fills the zeroed struct we pass.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        let c = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid path and an out-parameter of the right type.
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
        (st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize)
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// ext4 on a loop device over nbdfuse over one of the agent's NBD exports,
/// mounted at `mnt` (the way a host without the kernel NBD client puts a
/// real filesystem on a protected disk). Dropped: unmount, detach the loop
/// device, unmount nbdfuse, stop it — in that order, each by name.
pub struct Ext4OverExport {
    pub mnt: PathBuf,
    pub loopdev: String,
    fuse_dir: PathBuf,
    nbdfuse: Option<Proc>,
}

impl Ext4OverExport {
    /// Makes a fresh ext4 on `socket`'s export, under `root` (`fuse/`, `mnt/`).
    pub fn create(root: &Path, socket: &Path) -> Ext4OverExport {
        assert!(
            Path::new("/dev/fuse").exists(),
            "/dev/fuse is missing: this test needs FUSE"
        );
        let fuse_dir = root.join("fuse");
        let mnt = root.join("mnt");
        std::fs::create_dir_all(&fuse_dir).unwrap();
        std::fs::create_dir_all(&mnt).unwrap();
        let nbdfuse = Proc::spawn(
            "nbdfuse",
            Command::new("nbdfuse")
                .arg(fuse_dir.join("disk"))
                .args(["--unix"])
                .arg(socket),
            &root.join("nbdfuse.log"),
        )
        .unwrap();
        let fuse_file = fuse_dir.join("disk");
        wait_for("nbdfuse", Duration::from_secs(20), || {
            fuse_file.metadata().ok().filter(|m| m.len() > 0)
        })
        .unwrap();
        let mut fs = Ext4OverExport {
            mnt: mnt.clone(),
            loopdev: String::new(),
            fuse_dir,
            nbdfuse: Some(nbdfuse),
        };
        fs.loopdev = run_ok(
            Command::new("losetup")
                .args(["-f", "--show"])
                .arg(&fuse_file),
            Duration::from_secs(30),
        )
        .unwrap()
        .trim()
        .to_string();
        run_ok(
            Command::new("mkfs.ext4").args(["-q", "-F", &fs.loopdev]),
            Duration::from_secs(120),
        )
        .unwrap();
        run_ok(
            Command::new("mount").arg(&fs.loopdev).arg(&mnt),
            Duration::from_secs(60),
        )
        .unwrap();
        fs
    }
}

impl Drop for Ext4OverExport {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
        if !self.loopdev.is_empty() {
            let _ = Command::new("losetup").args(["-d", &self.loopdev]).status();
        }
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.fuse_dir)
            .status();
        drop(self.nbdfuse.take());
    }
}
