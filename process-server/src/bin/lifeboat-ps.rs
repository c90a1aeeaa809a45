//! `lifeboat-ps`: init | issue-cert | serve | resync | status | group-tag.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use lifeboat_ps::config::{PsConfig, DEFAULT_LISTEN};
use lifeboat_ps::pki;

#[derive(Parser)]
#[command(name = "lifeboat-ps", version, about = "Lifeboat process server")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    #[command(flatten)]
    log: lifeboat_common::LogArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a CA, server and first machine certificates, the key-encryption key,
    /// the registration passphrase (printed) and a config with the embedded
    /// defaults in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Id of the first machine to protect.
        #[arg(long, default_value = "machine-1")]
        machine: String,
        #[arg(long, default_value = DEFAULT_LISTEN)]
        listen: String,
        /// Store URL (default: file://DIR/store).
        #[arg(long)]
        store: Option<String>,
    },
    /// Issue a client certificate for another machine (into DIR/machines/<machine>),
    /// recorded in DIR/registration when it exists. Registration
    /// (`lifeboat-agent register`) does the same without copying files.
    IssueCert {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        machine: String,
    },
    /// Accept agents and replicate their streams to the object store.
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
    /// Make a machine's replica equal to its disks by comparing checksums and
    /// sending only the 4 KiB blocks that differ (the agent must be connected).
    Resync {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        machine: String,
        /// Only this disk (default: every disk of the machine).
        #[arg(long)]
        disk: Option<String>,
    },
    /// The running server's health (cache free space, upload backlog,
    /// backpressure) and, per machine and disk: state and reason, RPO, churn,
    /// cache use and upload backlog, the last points with their suspect-churn
    /// marks, and the owning process server; then the active alerts and the
    /// machines lost to another server (fenced). --json prints the document
    /// GET /status serves.
    Status {
        #[arg(long)]
        config: PathBuf,
        /// The status as JSON (the same data as GET /status).
        #[arg(long)]
        json: bool,
    },
    /// Take a consistency-group point now: hold every member's writes, tag
    /// each, release ([[group]] in ps.toml; every member must be connected).
    /// With --app an app-consistent one: every member first quiesces with
    /// its own [app] quiescer (pre-freeze scripts, freeze; within the
    /// group's quiesce-timeout), is held, tagged `app`, released, thawed.
    /// Prints the group point's id and each member's seq, as JSON with
    /// --json; fails (exit 1) naming the member and the step when no group
    /// point was recorded.
    GroupTag {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        group: String,
        /// A label for the point (kept in each member's tag).
        #[arg(long)]
        label: Option<String>,
        /// An app-consistent group point (each member quiesced first).
        #[arg(long)]
        app: bool,
        #[arg(long)]
        json: bool,
    },
    /// The machines this server's CA issued certificates to, removal, and
    /// the registration passphrases ([registration] of ps.toml).
    Machines {
        #[command(subcommand)]
        cmd: MachinesCmd,
    },
}

#[derive(Subcommand)]
enum MachinesCmd {
    /// Every certificate issued: machine, serial, when, how (init,
    /// issue-cert, register) and whether it was removed.
    List {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Revoke every certificate of a machine: from the next TLS handshake on
    /// the server refuses it, and a running server ends its session. The
    /// machine's history in the store stays (failover still works); to
    /// protect it again, register it again.
    Remove {
        #[arg(long)]
        config: PathBuf,
        machine: String,
    },
    /// Replace the standing registration passphrase and print the new one;
    /// the old one stops working at once (machines registered with it keep
    /// their certificates).
    RotatePassphrase {
        #[arg(long)]
        config: PathBuf,
    },
    /// Make a passphrase that registers one machine only once, and print it.
    OneTimePassphrase {
        #[arg(long)]
        config: PathBuf,
        /// Only this machine id may register with it.
        #[arg(long)]
        machine: Option<String>,
    },
}

fn main() {
    // Everything this process creates (the RocksDB cache of plaintext writes,
    // keys, certificates, the control socket) is private to its user.
    // SAFETY: umask only sets the process's file-creation mask.
    unsafe {
        libc::umask(0o077);
    }
    lifeboat_common::tune_allocator();
    let cli = Cli::parse();
    lifeboat_common::init_logging("info", cli.log.log_format);
    if let Err(e) = real_main(cli) {
        eprintln!("lifeboat-ps: error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Init {
            dir,
            machine,
            listen,
            store,
        } => init(&dir, &machine, &listen, store),
        Cmd::IssueCert { dir, machine } => {
            let out = dir.join("machines").join(&machine);
            let serial = pki::issue_machine_cert(&dir, &machine, &out)?;
            // Recorded where ps.toml's [registration] says, else where init
            // puts it, so that `machines remove` can revoke it.
            let config = dir.join("ps.toml");
            let registrar = match config.exists() {
                true => {
                    let cfg = PsConfig::load(&config)?;
                    cfg.registration
                        .as_ref()
                        .map(|r| lifeboat_ps::registration::Registrar::new(r, &cfg.ca_cert))
                }
                false => Some(registrar_in(&dir)).filter(|r| r.dir.is_dir()),
            };
            match registrar {
                Some(r) => r.record(&machine, &serial, "issue-cert")?,
                None => eprintln!(
                    "lifeboat-ps: warning: no [registration] to record the certificate in: `machines remove` cannot revoke it"
                ),
            }
            println!(
                "issued a client certificate for {machine} in {} (serial {serial})",
                out.display()
            );
            Ok(())
        }
        Cmd::Machines { cmd } => machines(cmd),
        Cmd::Resync {
            config,
            machine,
            disk,
        } => resync(&config, machine, disk),
        Cmd::Status { config, json } => {
            use lifeboat_ps::control;
            let cfg = PsConfig::load(&config)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let v = rt.block_on(control::request(
                &control::socket_path(&cfg.cache_dir),
                &control::Request::Status,
                |_| {},
            ))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let st: lifeboat_ps::status::Status = serde_json::from_value(v)
                .context("reading the server's status (is it an older lifeboat-ps? try --json)")?;
            print!("{}", lifeboat_ps::status::render_text(&st));
            Ok(())
        }
        Cmd::GroupTag {
            config,
            group,
            label,
            app,
            json,
        } => {
            use lifeboat_ps::control;
            let cfg = PsConfig::load(&config)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let v = rt
                .block_on(control::request(
                    &control::socket_path(&cfg.cache_dir),
                    &control::Request::GroupTag {
                        group: group.clone(),
                        label,
                        app,
                    },
                    |_| {},
                ))
                .with_context(|| format!("group point of {group}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let members: Vec<String> = v["members"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| match m["source"].as_str() {
                    Some(src) => format!(
                        "{} seq {} ({src})",
                        m["machine"].as_str().unwrap_or("?"),
                        m["seq"]
                    ),
                    None => format!("{} seq {}", m["machine"].as_str().unwrap_or("?"), m["seq"]),
                })
                .collect();
            println!(
                "{} group point {} of {group} at {}: {}",
                v["kind"].as_str().unwrap_or("crash"),
                v["id"],
                v["time"].as_str().unwrap_or("?"),
                members.join(", ")
            );
            Ok(())
        }
        Cmd::Serve { config } => {
            let cfg = PsConfig::load(&config)?;
            lifeboat_common::trim_freed_memory();
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async {
                lifeboat_ps::run(cfg, lifeboat_common::cancel_on_signals()?).await
            })
        }
    }
}

/// Where `init` keeps the registration state.
const REGISTRATION_DIR: &str = "registration";

fn registrar_in(dir: &Path) -> lifeboat_ps::registration::Registrar {
    lifeboat_ps::registration::Registrar {
        dir: dir.join(REGISTRATION_DIR),
        ca_key: dir.join(pki::CA_KEY),
        ca_cert: dir.join(pki::CA_CERT),
    }
}

fn registrar_of(cfg: &PsConfig, config: &Path) -> Result<lifeboat_ps::registration::Registrar> {
    let r = cfg.registration.as_ref().with_context(|| {
        format!(
            "{} has no [registration] table (ca-key and dir): add it to manage machines",
            config.display()
        )
    })?;
    Ok(lifeboat_ps::registration::Registrar::new(r, &cfg.ca_cert))
}

fn machines(cmd: MachinesCmd) -> Result<()> {
    match cmd {
        MachinesCmd::List { config, json } => {
            let cfg = PsConfig::load(&config)?;
            let list = registrar_of(&cfg, &config)?.list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list.machines)?);
                return Ok(());
            }
            println!(
                "{:<24} {:<8} {:<34} {:<21} {:<10} removed",
                "machine", "state", "serial", "issued", "how"
            );
            for m in &list.machines {
                println!(
                    "{:<24} {:<8} {:<34} {:<21} {:<10} {}",
                    m.machine,
                    if m.removed.is_some() {
                        "removed"
                    } else {
                        "active"
                    },
                    m.serial,
                    m.issued,
                    m.how,
                    m.removed.as_deref().unwrap_or("-")
                );
            }
            let open = list.one_time.iter().filter(|o| o.used.is_none()).count();
            println!(
                "{} certificates ({} active); {open} unused one-time passphrases",
                list.machines.len(),
                list.machines.iter().filter(|m| m.removed.is_none()).count()
            );
            Ok(())
        }
        MachinesCmd::Remove { config, machine } => {
            let cfg = PsConfig::load(&config)?;
            let serials = registrar_of(&cfg, &config)?.remove(&machine)?;
            println!(
                "removed machine {machine}: revoked certificate serial {} (the process server refuses it from the next handshake on)",
                serials.join(", ")
            );
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let path = lifeboat_ps::control::socket_path(&cfg.cache_dir);
            match rt.block_on(lifeboat_ps::control::request(
                &path,
                &lifeboat_ps::control::Request::MachineRemoved {
                    machine: machine.clone(),
                },
                |_| {},
            )) {
                Ok(v) if v["session-ended"] == true => {
                    println!("its live session on the running server was ended")
                }
                Ok(_) => println!("it had no live session"),
                Err(e) => println!(
                    "the running server was not told ({e:#}): it refuses the machine's next connection, but a session it has open goes on until it ends or the server restarts"
                ),
            }
            Ok(())
        }
        MachinesCmd::RotatePassphrase { config } => {
            let cfg = PsConfig::load(&config)?;
            let r = registrar_of(&cfg, &config)?;
            let pass = r.rotate_passphrase()?;
            println!("{pass}");
            eprintln!(
                "the registration passphrase is replaced (kept in {}); the previous one no longer registers a machine",
                r.passphrase_path().display()
            );
            Ok(())
        }
        MachinesCmd::OneTimePassphrase { config, machine } => {
            let cfg = PsConfig::load(&config)?;
            let pass = registrar_of(&cfg, &config)?.one_time_passphrase(machine.as_deref())?;
            println!("{pass}");
            match machine {
                Some(m) => eprintln!("registers machine {m} once"),
                None => eprintln!("registers one machine once"),
            }
            Ok(())
        }
    }
}

fn resync(config: &Path, machine: String, disk: Option<String>) -> Result<()> {
    use lifeboat_ps::control;
    let cfg = PsConfig::load(config)?;
    let path = control::socket_path(&cfg.cache_dir);
    let started = std::time::Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let req = control::Request::Resync {
        machine: machine.clone(),
        disk,
    };
    let done = rt
        .block_on(control::request(&path, &req, |ev| {
            if ev["event"] == "interrupted" {
                println!(
                    "the session ended ({}); the agent resumes the resync when it reconnects (Ctrl-C stops waiting, not the resync)",
                    ev["reason"].as_str().unwrap_or("no reason given")
                );
                return;
            }
            let g = |k: &str| ev.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
            println!(
                "compared {} MiB: {} of {} regions differ",
                g("regions-compared"),
                g("regions-differ"),
                g("regions-compared")
            );
        }))
        .with_context(|| format!("checksum resync of {machine}"))?;
    let g = |k: &str| done.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    println!(
        "checksum resync of {machine} done in {:.1} s: hashed {} bytes; sent {} bytes ({} bytes of hashes + {} bytes in {} blocks); point seq {}",
        started.elapsed().as_secs_f64(),
        g("hashed-bytes"),
        g("hash-bytes") + g("block-bytes"),
        g("hash-bytes"),
        g("block-bytes"),
        g("blocks"),
        g("tag-seq"),
    );
    println!("{done}");
    Ok(())
}

/// The HTTP bearer token `init` writes (0600, like everything it creates).
const HTTP_TOKEN_FILE: &str = "http.token";

fn init(dir: &Path, machine: &str, listen: &str, store: Option<String>) -> Result<()> {
    lifeboat_common::ids::validate_id("machine", machine).map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    let config_path = dir.join("ps.toml");
    if config_path.exists() {
        anyhow::bail!(
            "{} already exists: refusing to overwrite an initialised process server",
            config_path.display()
        );
    }
    // Without ps.toml the keys may still be the ones the store was written
    // with: a new key-encryption key would make every point unreadable.
    for name in [pki::KEK_FILE, pki::CA_KEY] {
        let key = dir.join(name);
        if key.exists() {
            anyhow::bail!(
                "{} already exists (ps.toml does not): refusing to replace the keys of a process server; restore ps.toml, or move the old keys away (keep a copy: recovery needs {})",
                key.display(),
                pki::KEK_FILE
            );
        }
    }
    pki::create_authority(&dir, &["localhost".to_string(), "127.0.0.1".to_string()])?;
    let registrar = registrar_in(&dir);
    let passphrase = registrar.create()?;
    let serial = pki::issue_machine_cert(&dir, machine, &dir.join("machines").join(machine))?;
    registrar.record(machine, &serial, "init")?;
    let token_path = dir.join(HTTP_TOKEN_FILE);
    if !token_path.exists() {
        std::fs::write(&token_path, format!("{}\n", lifeboat_ps::http::new_token()))
            .with_context(|| format!("writing {}", token_path.display()))?;
    }
    let store = store.unwrap_or_else(|| format!("file://{}/store", dir.display()));
    let cfg = format!(
        r#"# lifeboat-ps configuration, written by `lifeboat-ps init`.
# Address agents connect to (TLS 1.3, client certificates required; without
# one an agent can only register, see [registration]).
listen = "{listen}"
# Durable RocksDB cache of received writes.
cache-dir = "cache"
# Registration CA and this server's certificate.
ca-cert = "{ca}"
server-cert = "{sc}"
server-key = "{sk}"
# Key-encryption key. Keep a copy OFFLINE: without it no recovery point can be read.
kek-file = "{kek}"
# Segments are cut at this size, after this age, and always at a recovery point.
segment-max-bytes = 33554432
segment-max-age = "500ms"
# zstd level for segments (0 stores uncompressed).
zstd-level = 1
upload-concurrency = 4
# Limits on agents' connections: TLS handshake, then the hello, must finish
# within these; a connection silent for idle-timeout (>= 20s; agents ping
# every 10s) is closed; at most this many connections per source IP.
handshake-timeout = "10s"
hello-timeout = "10s"
idle-timeout = "60s"
max-connections-per-source = 16

# Registration: agents without a certificate connect to `listen` and get one
# with the passphrase in {reg}/passphrase (lifeboat-agent register); every
# certificate is checked against the revocation list of removed machines
# (lifeboat-ps machines list|remove|rotate-passphrase|one-time-passphrase).
[registration]
ca-key = "{cakey}"
dir = "{reg}"

[store]
url = "{store}"
# options = {{ aws_endpoint = "http://127.0.0.1:8014", aws_region = "us-east-1" }}

# History kept in the store (these are the defaults; uncomment to change).
# Older points are folded into a base of shared chunks and deleted.
# [retention]
# keep = "24h"            # 10s .. 30days
# fine-window = "2h"      # every point younger than this is kept
# tiers = [{{ older-than = "2h", every = "1h" }}, {{ older-than = "24h", every = "1day" }}]
# app-every = "0s"        # app-consistent points beyond the fine window: one per this; 0 keeps all
# compact-every = "10m"   # how often retention runs per machine
# reader-grace = "1h"     # what a new base replaces is deleted this long after it
# work-dir = "cache/fold" # fold work files (what the stream wrote since the last base)

# The status page, /status (JSON) and /metrics (Prometheus) over HTTP; off
# while this section is commented out. Requests need the header
# `Authorization: Bearer <the content of token-file>` (a browser: open
# /?token=<it> once); init wrote a random token to {token}.
# [http]
# listen = "127.0.0.1:9444"
# token-file = "{token}"

# Health: warning below 30% cache free or 30m of upload backlog, critical below
# 25% or 45m; below backpressure-free % new writes are refused (0: never).
# [health]
# backpressure-free = 20

# Alerts: a log line, the metric lifeboat_alert_active and, with a webhook, a
# JSON POST when an alert starts and when it clears (defaults shown).
# [alerts]
# rpo-alert = "15m"       # RPO above this raises an `rpo` alert (1s .. 7days)
# webhook = "http://alerts.example.internal/lifeboat"
# webhook-timeout = "5s"
# [[alerts.machine]]      # a machine's own threshold
# name = "db-1"
# rpo-alert = "5m"
"#,
        ca = pki::CA_CERT,
        sc = pki::SERVER_CERT,
        sk = pki::SERVER_KEY,
        kek = pki::KEK_FILE,
        token = HTTP_TOKEN_FILE,
        cakey = pki::CA_KEY,
        reg = REGISTRATION_DIR,
    );
    std::fs::write(&config_path, cfg)?;
    PsConfig::load(&config_path).context("checking the written config")?;
    println!("initialised {}", dir.display());
    println!("  config:           {}", config_path.display());
    println!("  object store:     {store}");
    println!(
        "  machine {machine}: certificate in {}",
        dir.join("machines").join(machine).display()
    );
    println!(
        "  key-encryption key: {} -- this is the RECOVERY KEY. Copy it somewhere safe\n    and offline now (e.g. `install -m 0400 {} /media/offline/lifeboat-kek.key`,\n    or print it: `cat {}`); recovery (lifeboat-mt failover --key-file) is\n    impossible without it, and it is never written to the object store.",
        dir.join(pki::KEK_FILE).display(),
        dir.join(pki::KEK_FILE).display(),
        dir.join(pki::KEK_FILE).display()
    );
    println!(
        "  registration passphrase: {passphrase}\n    (kept in {}; on each protected machine: lifeboat-agent register --config agent.toml\n    --passphrase-file <a file holding it>; lifeboat-ps machines rotate-passphrase replaces it)",
        registrar.passphrase_path().display()
    );
    println!(
        "  HTTP status token: {} (for [http], off until enabled in ps.toml)",
        token_path.display()
    );
    Ok(())
}
