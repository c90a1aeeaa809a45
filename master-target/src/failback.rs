//! Reprotect and failback, the master target's commands of the way home.
//!
//! - `reprotect` registers a recovered machine's original (on-prem) disks as
//!   the targets of its stream (`<state-dir>/machines.d/<machine>.toml`,
//!   read by a running `lifeboat-mt serve` at the machine's next session),
//!   and writes the agent config of the recovered side: that agent serves the
//!   recovered disks, streams to this master target and starts with a
//!   checksum resync (`initial-copy = "checksum"`), so only the blocks that
//!   differ from the original disks are sent. With `--wait` it follows the
//!   resync to its end and reports what the stream brought.
//! - `failback` asks the recovered side's agent, through the master target's
//!   session, for a final point (it refuses writes after it), waits until
//!   the point is applied to the original disks and compares the agent's
//!   checksums at it with the disks' own: equal, the original disks are the
//!   recovered machine's, byte for byte.
//! - `status` prints what the master target applies, machine by machine.
//!
//! The forward direction then resumes on the original machine with
//! `lifeboat-agent reprotect` (a checksum resync against the stored
//! replica), see agent/src/bin/lifeboat-agent.rs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::output::{Format, MachineDescription, DESCRIPTION_FILE};
use crate::serve::{self, MachineTargets, Request, ServeConfig};

/// What `lifeboat-mt reprotect` is asked.
pub struct Reprotect {
    pub machine: String,
    /// Disk id → the original disk (an image file or a block device).
    pub to: BTreeMap<String, PathBuf>,
    /// The failover's output directory (recovered-machine.json).
    pub recovered: Option<PathBuf>,
    /// Where the recovered side's agent config is written.
    pub agent_config: Option<PathBuf>,
    /// The machine's certificate directory (ca.pem, client.pem, client.key).
    pub certs: Option<PathBuf>,
    /// host:port the recovered side's agent connects to.
    pub mt_address: Option<String>,
    pub server_name: String,
}

/// Parses `DISK=TARGET`.
pub fn parse_target(s: &str) -> Result<(String, PathBuf), String> {
    let (disk, path) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected DISK=TARGET, e.g. root=/dev/sdb"))?;
    lifeboat_common::ids::validate_id("disk", disk)?;
    if path.is_empty() {
        return Err(format!("{s:?}: the target of disk {disk} is empty"));
    }
    Ok((disk.to_string(), PathBuf::from(path)))
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))
}

/// A reprotect request that passed every check ([`check_reprotect`]);
/// [`register`] writes it.
pub struct Checked {
    /// The failover's `recovered-machine.json` (with `--recovered`).
    pub description: Option<MachineDescription>,
    to: BTreeMap<String, PathBuf>,
    agent_config: Option<(PathBuf, String)>,
}

/// Checks a reprotect request; writes nothing.
pub fn check_reprotect(cfg: &ServeConfig, r: &Reprotect) -> Result<Checked> {
    lifeboat_common::ids::validate_id("machine", &r.machine).map_err(anyhow::Error::msg)?;
    if r.to.is_empty() {
        bail!(
            "--to names no disk: give DISK=TARGET for every disk of {}",
            r.machine
        );
    }
    if cfg.machines.iter().any(|m| m.name == r.machine) {
        bail!(
            "machine {} is already a [[machine]] of the master target's config: its targets are there",
            r.machine
        );
    }
    let description = match &r.recovered {
        Some(dir) => {
            let path = dir.join(DESCRIPTION_FILE);
            let text = std::fs::read_to_string(&path).with_context(|| {
                format!(
                    "reading {} (is {} a failover's --out?)",
                    path.display(),
                    dir.display()
                )
            })?;
            let d: MachineDescription = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", path.display()))?;
            if d.machine != r.machine {
                bail!(
                    "{} describes machine {}, not {}",
                    path.display(),
                    d.machine,
                    r.machine
                );
            }
            Some(d)
        }
        None => None,
    };
    let mut to = BTreeMap::new();
    for (disk, t) in &r.to {
        to.insert(disk.clone(), absolute(t)?);
    }
    if let Some(d) = &description {
        for disk in &d.disks {
            let Some(t) = to.get(&disk.id) else {
                bail!(
                    "disk {} of {} has no target: add --to {}=<its original disk>",
                    disk.id,
                    r.machine,
                    disk.id
                );
            };
            check_target(&disk.id, t, disk.size)?;
        }
        if let Some(extra) = to.keys().find(|k| !d.disks.iter().any(|x| &x.id == *k)) {
            bail!("--to names disk {extra}, which {} does not have", r.machine);
        }
    }
    // Each target serves one disk, across the config and every registration.
    // Paths compare canonical (symlinks, `..`), so /dev/disk/by-id/X and
    // /dev/sdb are one target.
    let mut used: BTreeMap<PathBuf, String> = BTreeMap::new();
    for m in &cfg.machines {
        for (disk, t) in &m.disks {
            used.insert(serve::target_identity(t), format!("{}/{disk}", m.name));
        }
    }
    for m in serve::registered_names(&cfg.state_dir) {
        if m == r.machine {
            continue;
        }
        // A registration that cannot be read may still name a target.
        let reg = serve::load_registered(&cfg.state_dir, &m)
            .with_context(|| format!("reading the registration of {m}; mend or remove it first"))?;
        for (disk, t) in reg.into_iter().flat_map(|reg| reg.disks) {
            used.insert(serve::target_identity(&t), format!("{m}/{disk}"));
        }
    }
    for (disk, t) in &to {
        let id = serve::target_identity(t);
        if let Some(other) = used.get(&id) {
            bail!(
                "{} is already the target of {other}: {}/{disk} needs its own",
                t.display(),
                r.machine
            );
        }
        used.insert(id, format!("{}/{disk}", r.machine));
    }
    // Everything is checked before anything is written.
    let agent_config = match &r.agent_config {
        Some(path) => {
            let d = description
                .as_ref()
                .context("--agent-config needs --recovered DIR (the failover's --out)")?;
            let certs = r
                .certs
                .as_ref()
                .context("--agent-config needs --certs DIR (the machine's ca.pem, client.pem, client.key, from `lifeboat-ps issue-cert`)")?;
            let address = match &r.mt_address {
                Some(a) => a.clone(),
                None if !cfg.listen.ip().is_unspecified() => cfg.listen.to_string(),
                None => bail!(
                    "the master target listens on {}: give --mt-address HOST:PORT, the address the recovered side reaches it at",
                    cfg.listen
                ),
            };
            let dir = absolute(r.recovered.as_ref().expect("description read"))?;
            let path = absolute(path)?;
            // Another file there is not ours to replace: only a config an
            // earlier reprotect wrote (a reprotect asked again) is.
            match std::fs::read_to_string(&path) {
                Ok(old) if !old.starts_with(AGENT_CONFIG_HEADER) => bail!(
                    "{} exists and was not written by lifeboat-mt reprotect: name another --agent-config, or remove it",
                    path.display()
                ),
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => bail!(
                    "{} exists and was not written by lifeboat-mt reprotect: name another --agent-config, or remove it",
                    path.display()
                ),
                _ => {}
            }
            let text = agent_config(&path, d, &dir, &absolute(certs)?, &address, &r.server_name)?;
            Some((path, text))
        }
        None => None,
    };
    Ok(Checked {
        description,
        to,
        agent_config,
    })
}

/// Registers the checked targets and writes the agent config; returns what
/// it wrote.
pub fn register(cfg: &ServeConfig, r: &Reprotect, checked: Checked) -> Result<serde_json::Value> {
    let Checked {
        to, agent_config, ..
    } = checked;
    let registered = serve::store_registered(
        &cfg.state_dir,
        &MachineTargets {
            name: r.machine.clone(),
            disks: to.clone(),
        },
    )?;
    let agent_config = match agent_config {
        Some((path, text)) => {
            lifeboat_common::fsutil::replace_file_mode(&path, text.as_bytes(), 0o600)
                .with_context(|| format!("writing {}", path.display()))?;
            Some(path)
        }
        None => None,
    };
    Ok(serde_json::json!({
        "machine": r.machine,
        "registered": registered,
        "targets": to,
        "agent-config": agent_config,
    }))
}

/// A target must be able to hold its disk: a block device at least its
/// size; an image file is created or grown by the master target.
fn check_target(disk: &str, t: &Path, size: u64) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata(t) {
        Ok(m) if m.file_type().is_block_device() => {
            use std::io::{Seek, SeekFrom};
            let cap = std::fs::File::open(t)
                .and_then(|mut f| f.seek(SeekFrom::End(0)))
                .with_context(|| format!("opening {}", t.display()))?;
            if cap < size {
                bail!("{} holds {cap} bytes: disk {disk} has {size}", t.display());
            }
        }
        Ok(m) if m.is_dir() => bail!("the target of disk {disk}, {}, is a directory", t.display()),
        Ok(_) => {}
        Err(_) if t.starts_with("/dev") => {
            bail!("the target of disk {disk}, {}, does not exist", t.display())
        }
        Err(_) => eprintln!(
            "note: {} does not exist: the whole disk {disk} will be sent (an original disk makes it a checksum resync of what differs)",
            t.display()
        ),
    }
    Ok(())
}

/// The recovered side's agent.toml.
/// How a recovered side's agent config written by `reprotect` begins.
const AGENT_CONFIG_HEADER: &str = "# The recovered side's agent of ";

fn agent_config(
    path: &Path,
    d: &MachineDescription,
    dir: &Path,
    certs: &Path,
    address: &str,
    server_name: &str,
) -> Result<String> {
    let q = |p: &Path| -> Result<String> {
        let s = p
            .to_str()
            .with_context(|| format!("{} is not UTF-8", p.display()))?;
        Ok(toml::Value::String(s.to_string()).to_string())
    };
    let mut text = format!(
        "{AGENT_CONFIG_HEADER}{m}, written by `lifeboat-mt reprotect`.\n\
         # It serves the recovered disks as NBD exports (run the recovered machine\n\
         # on these sockets) and streams their writes to the master target, which\n\
         # writes them onto the original disks. Its first copy is a checksum\n\
         # resync: only the blocks that differ from the original disks are sent.\n\
         # Start it with: lifeboat-agent run --config {cfg}\n\
         machine = {mq}\nserver = {a}\nserver-name = {n}\n\
         ca-cert = {ca}\nclient-cert = {cc}\nclient-key = {ck}\n\
         state-dir = {sd}\ninitial-copy = \"checksum\"\n",
        m = d.machine,
        cfg = path.display(),
        mq = toml::Value::String(d.machine.clone()),
        a = toml::Value::String(address.to_string()),
        n = toml::Value::String(server_name.to_string()),
        ca = q(&certs.join("ca.pem"))?,
        cc = q(&certs.join("client.pem"))?,
        ck = q(&certs.join("client.key"))?,
        sd = q(&dir.join("agent-state"))?,
    );
    for disk in &d.disks {
        if disk.format != Format::Raw || disk.location.contains("://") {
            bail!(
                "disk {} was recovered to {} ({}): the agent serves raw images and block devices; fail over to raw output to reprotect",
                disk.id,
                disk.location,
                disk.format.as_str()
            );
        }
        let location = Path::new(&disk.location);
        let location = if location.is_relative() {
            dir.join(location)
        } else {
            location.to_path_buf()
        };
        text.push_str(&format!(
            "\n[[disk]]\nid = {}\npath = {}\nsocket = {}\n",
            toml::Value::String(disk.id.clone()),
            q(&location)?,
            q(&dir.join(format!("{}.sock", disk.id)))?,
        ));
    }
    Ok(text)
}

/// One machine's entry of the master target's status.
fn machine_status(v: &serde_json::Value, machine: &str) -> Option<serde_json::Value> {
    v["machines"]
        .as_array()?
        .iter()
        .find(|m| m["machine"] == machine)
        .cloned()
}

/// Follows the reprotect until the machine's agent is connected, its
/// checksum resync ended (a point applied, no inconsistent mark open) and
/// the stream is caught up; returns the machine's status then.
pub async fn wait_reprotected(
    state_dir: &Path,
    machine: &str,
    timeout: Duration,
) -> Result<serde_json::Value> {
    let started = Instant::now();
    let mut said = String::new();
    loop {
        let v = serve::request(state_dir, &Request::Status).await?;
        let m = machine_status(&v, machine).with_context(|| {
            format!("the master target does not list {machine}: is it registered?")
        })?;
        let r = &m["received"];
        if m["connected"] == true && r["inconsistent"].is_null() && !r["last-point"].is_null() {
            return Ok(m);
        }
        let now = format!(
            "{machine}: {}; {} MiB of writes applied, {} blocks compared",
            m["state"].as_str().unwrap_or("?"),
            r["write-bytes"].as_u64().unwrap_or(0) >> 20,
            r["hashed-blocks"].as_u64().unwrap_or(0)
        );
        if now != said {
            eprintln!("{now}");
            said = now;
        }
        if started.elapsed() > timeout {
            bail!(
                "{machine} did not finish its checksum resync within {timeout:?} ({said}); \
                 is its agent running with the config reprotect wrote?"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The failback's final point: asked, applied, compared.
pub async fn failback(
    state_dir: &Path,
    machine: &str,
    quiesce: Duration,
    timeout: Duration,
) -> Result<serde_json::Value> {
    lifeboat_common::ids::validate_id("machine", machine).map_err(anyhow::Error::msg)?;
    serve::request(
        state_dir,
        &Request::FinalPoint {
            machine: machine.to_string(),
            quiesce_ms: quiesce.as_millis() as u64,
            timeout_ms: timeout.as_millis() as u64,
        },
    )
    .await
}

/// The status as lines for a person.
pub fn print_status(v: &serde_json::Value) {
    let machines = v["machines"].as_array().cloned().unwrap_or_default();
    if machines.is_empty() {
        println!(
            "no machines (none in the config's [[machine]] tables, none registered by reprotect)"
        );
    }
    for m in machines {
        let r = &m["received"];
        println!(
            "{} ({}): {}, applied seq {}, last point {}",
            m["machine"].as_str().unwrap_or("?"),
            m["source"].as_str().unwrap_or("?"),
            m["state"].as_str().unwrap_or("?"),
            m["applied-seq"]
                .as_u64()
                .map_or("-".into(), |s| s.to_string()),
            r["last-point"]
                .as_u64()
                .map_or("-".into(), |s| s.to_string()),
        );
        println!(
            "  received since start: {} entries, {} bytes written, {} zeroed, {} blocks compared",
            r["entries"].as_u64().unwrap_or(0),
            r["write-bytes"].as_u64().unwrap_or(0),
            r["zero-bytes"].as_u64().unwrap_or(0),
            r["hashed-blocks"].as_u64().unwrap_or(0),
        );
        for d in m["disks"].as_array().cloned().unwrap_or_default() {
            println!(
                "  disk {} -> {}{}",
                d["id"].as_str().unwrap_or("?"),
                d["target"].as_str().unwrap_or("?"),
                d["size"]
                    .as_u64()
                    .map_or(String::new(), |s| format!(" ({s} bytes)")),
            );
        }
    }
}
