//! `lifeboat-mt`: points | failover | test-failover (and --cleanup) | checksum | verify | serve
//! | reprotect | failback | status | serve-point.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use lifeboat_common::seal::Key;
use lifeboat_common::store::{Store, StoreConfig};
use lifeboat_mt::materialize::{self, PointSpec};

#[derive(Parser)]
#[command(
    name = "lifeboat-mt",
    version,
    about = "Lifeboat master target: recovery"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    #[command(flatten)]
    log: lifeboat_common::LogArgs,
}

#[derive(Args)]
struct StoreArgs {
    /// Object store URL: file:///dir, s3://bucket/prefix or az://container/prefix.
    #[arg(long)]
    store: String,
    /// Backend option KEY=VALUE (e.g. aws_endpoint=http://127.0.0.1:8014); repeatable.
    #[arg(long = "store-option", value_name = "KEY=VALUE")]
    options: Vec<String>,
    /// The machine (required, except that `points` and `failover` take
    /// --group instead for a consistency group, and `failover --plan` names
    /// its machines in the plan).
    #[arg(long, conflicts_with = "group")]
    machine: Option<String>,
}

/// The store and one machine (what every command but `--group` works on).
struct MachineArgs {
    store: String,
    options: Vec<String>,
    machine: String,
}

impl StoreArgs {
    fn for_machine(self) -> Result<MachineArgs> {
        let machine = self.machine.context("--machine (or --group) is required")?;
        lifeboat_common::ids::validate_id("machine", &machine).map_err(anyhow::Error::msg)?;
        Ok(MachineArgs {
            store: self.store,
            options: self.options,
            machine,
        })
    }

    fn open(&self) -> Result<Store> {
        open_store(&self.store, &self.options)
    }
}

impl MachineArgs {
    fn open(&self) -> Result<Store> {
        open_store(&self.store, &self.options)
    }
}

fn open_store(url: &str, opts: &[String]) -> Result<Store> {
    {
        let mut options = BTreeMap::new();
        for o in opts {
            let (k, v) = o
                .split_once('=')
                .with_context(|| format!("--store-option {o:?} is not KEY=VALUE"))?;
            options.insert(k.to_string(), v.to_string());
        }
        Ok(Store::open(&StoreConfig {
            url: url.to_string(),
            options,
        })?)
    }
}

#[derive(Args)]
struct FailoverArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// latest | latest-app | latest-crash | last-clean | <point id> | <RFC 3339 time>;
    /// with --group: latest | latest-app | latest-crash | <group point id>.
    #[arg(long, default_value = "latest")]
    point: PointSpec,
    /// Directory for the disk images (<disk>.raw or .qcow2; with --group each
    /// machine's in <machine>/), the machine description
    /// (recovered-machine.json) and start-vm.sh, a QEMU command line that
    /// boots it. A disk sent to a --target is assembled here first.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    outputs: Outputs,
    /// Recover every machine of this consistency group at one group point.
    #[arg(long)]
    group: Option<String>,
    /// Recover the machines of a recovery plan (TOML: ordered [[group]]s of
    /// machines, each group's machines in parallel, its point, scripts
    /// before and after it, an optional manual pause; see
    /// packaging/examples/recovery-plan.toml), each into <out>/<machine>/,
    /// group by group; the first failure stops the plan. The report goes to
    /// <out>/recovery-plan-report.json. Not with --machine, --group,
    /// --point, --planned or --target.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["machine", "group", "point", "planned", "targets"])]
    plan: Option<PathBuf>,
    /// The key-encryption key file (kek.key from `lifeboat-ps init`).
    #[arg(long, env = "LIFEBOAT_KEK_FILE")]
    key_file: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Write `latest` even where the stream ends inside a sync or resync (the
    /// disks are then not crash-consistent).
    #[arg(long)]
    allow_inconsistent: bool,
    /// Do not re-read the images to compare them with the disk checksums the
    /// agent recorded at the point (by default a difference fails the
    /// failover, naming the disk).
    #[arg(long)]
    skip_checksum: bool,
    /// How the images are written: auto (io_uring where the kernel allows it,
    /// else portable), uring (io_uring or fail), portable (pwrite threads).
    /// Aligned writes go O_DIRECT where the file system takes it.
    #[arg(long, default_value = "auto")]
    io_engine: materialize::IoMode,
    /// A planned failover, with no data loss: the machine's agent takes a
    /// final point through its process server (app-consistent when its
    /// [app] quiesces, else crash-consistent) and refuses every write after
    /// it; the failover waits until that point is in the store and recovers
    /// exactly it. Needs --ps and --ps-token-file; not with --point or
    /// --group, nor in test-failover (it stops the machine's writes).
    #[arg(long, conflicts_with_all = ["point", "group"], requires_all = ["ps", "ps_token_file"])]
    planned: bool,
    /// With --planned: the process server's HTTP endpoint, http://HOST:PORT
    /// (its [http] listen).
    #[arg(long, value_name = "URL", requires = "planned")]
    ps: Option<String>,
    /// With --planned: the file holding the process server's HTTP token (its
    /// [http] token-file).
    #[arg(long, env = "LIFEBOAT_PS_TOKEN_FILE")]
    ps_token_file: Option<PathBuf>,
    /// With --planned: how long the agent may quiesce for the final point.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    quiesce_timeout: std::time::Duration,
    /// With --planned: how long to wait for the final point to reach the store.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    store_timeout: std::time::Duration,
}

#[derive(Subcommand)]
enum Cmd {
    /// List a machine's recovery points: id, kind (crash, app, group), source
    /// of an app-consistent point (fsfreeze, script, vss), time, seq, the
    /// bytes it adds, whether it carries the disks' checksums and whether
    /// churn marks it suspect; the base the history starts from; with
    /// --group, the group's points: id, kind (crash, app), time and each
    /// member's seq (and source of an app-consistent one).
    Points {
        #[command(flatten)]
        store: StoreArgs,
        /// List this consistency group's points instead.
        #[arg(long)]
        group: Option<String>,
        #[arg(long)]
        json: bool,
        /// The key-encryption key file: with it the listed points are
        /// authenticated (failover always authenticates them).
        #[arg(long, env = "LIFEBOAT_KEK_FILE")]
        key_file: Option<PathBuf>,
    },
    /// Write the machine's disks at a recovery point. The failover is
    /// recorded in the store (failed-over.json): the machine's agent then
    /// resyncs its disks by checksum at its next connection instead of
    /// resuming its journal (a failback may write them meanwhile).
    Failover(FailoverArgs),
    /// Serve as a master target: accept agents (mutual TLS, the process
    /// server's protocol) and apply each machine's stream to its target
    /// disks (files or block devices) in seq order, resuming after its last
    /// applied position; checksum resync hashes the targets. See
    /// packaging/examples/mt.toml.
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
    /// After a failover: register the original disks as the targets of the
    /// recovered machine's stream (a running `serve` takes them at the
    /// machine's next session) and write the recovered side's agent config:
    /// it serves the recovered disks and starts with a checksum resync, so
    /// only the blocks that differ from the original disks are sent. With
    /// --wait, follow that resync to its end and report what it sent.
    Reprotect {
        /// The master target's config (its state-dir, listen address).
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        machine: String,
        /// DISK=TARGET: an original disk (block device or image file) per
        /// disk of the machine; repeatable, or comma-separated.
        #[arg(long, required = true, value_delimiter = ',', value_parser = lifeboat_mt::failback::parse_target)]
        to: Vec<(String, PathBuf)>,
        /// The failover's --out (its recovered-machine.json): every disk
        /// must have a target, and the agent config serves these images.
        #[arg(long)]
        recovered: Option<PathBuf>,
        /// Write the recovered side's agent config here (needs --recovered,
        /// --certs and, when `listen` is 0.0.0.0, --mt-address).
        #[arg(long)]
        agent_config: Option<PathBuf>,
        /// The machine's certificate directory from `lifeboat-ps issue-cert`
        /// (ca.pem, client.pem, client.key).
        #[arg(long)]
        certs: Option<PathBuf>,
        /// HOST:PORT at which the recovered side reaches this master target
        /// (default: the config's listen address).
        #[arg(long)]
        mt_address: Option<String>,
        /// The name the master target's certificate is checked against.
        #[arg(long, default_value = "localhost")]
        server_name: String,
        /// The machine's object store (the failover's --store): the
        /// reprotect is recorded there (failed-over.json) before this master
        /// target writes the original disks, so that the original machine's
        /// agent, started after the failback, resyncs by checksum instead of
        /// resuming its journal. Without it, only `lifeboat-agent reprotect`
        /// on that machine guards this.
        #[arg(long, requires = "key_file")]
        store: Option<String>,
        /// Backend option KEY=VALUE for --store; repeatable.
        #[arg(long = "store-option", value_name = "KEY=VALUE", requires = "store")]
        store_options: Vec<String>,
        /// The key-encryption key (signs the record).
        #[arg(long, env = "LIFEBOAT_KEK_FILE")]
        key_file: Option<PathBuf>,
        /// Wait until the agent connected and its checksum resync ended,
        /// then report what it sent.
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        #[arg(long)]
        json: bool,
    },
    /// A planned failover home: ask the recovered side's agent, through the
    /// running master target, for a final point (it refuses writes after
    /// it), wait until the point is on the original disks, and compare the
    /// agent's checksums at it with the disks' own. Exits non-zero unless
    /// every disk is equal.
    Failback {
        /// The master target's config (its state-dir).
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        machine: String,
        /// How long the agent may quiesce for the final point.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        quiesce_timeout: std::time::Duration,
        /// How long the point may take to be applied and its checksums to come.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        #[arg(long)]
        json: bool,
    },
    /// What a running master target applies: per machine its session,
    /// state (resync, streaming), applied seq, last point, targets and the
    /// bytes received since it started.
    Status {
        /// The master target's config (its state-dir).
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Instant recovery: serve each disk of the machine at a point as an NBD
    /// export (named by the disk's id) within seconds, before its data is
    /// copied. Only the segments after the base are fetched first; reads
    /// fetch the base's chunks on demand through a bounded cache, writes go
    /// to a local overlay in --state-dir (durable at each FLUSH or FUA).
    /// With --hydrate the disk is copied to a target meanwhile; when the copy
    /// ends the target holds the point with the export's writes applied
    /// (each later flush copies the new writes to it and syncs it), and the
    /// machine can switch to it. Run the same command again after a crash or
    /// kill: it resumes from --state-dir without losing a flushed write. A
    /// failed copy leaves the exports serving. Stops at SIGINT/SIGTERM. The
    /// base's chunks are read from the store while it serves: keep retention
    /// from folding the machine meanwhile (a fold may delete them).
    ServePoint {
        #[command(flatten)]
        store: StoreArgs,
        /// latest | latest-app | latest-crash | last-clean | <point id> | <RFC 3339 time>
        #[arg(long, default_value = "latest")]
        point: String,
        /// The key-encryption key file (kek.key from `lifeboat-ps init`).
        #[arg(long, env = "LIFEBOAT_KEK_FILE")]
        key_file: PathBuf,
        /// The export's local state: the layers the segments after the base
        /// wrote, the overlay of the export's writes, the hydration's
        /// checkpoint. Holds the machine's plaintext (0700).
        #[arg(long)]
        state_dir: PathBuf,
        /// Serve on this unix socket (default <state-dir>/nbd.sock):
        /// nbd+unix:///<disk>?socket=PATH.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Also serve over TCP at HOST:PORT: nbd://HOST:PORT/<disk>.
        #[arg(long, value_name = "HOST:PORT")]
        listen: Option<std::net::SocketAddr>,
        /// Copy disk DISK to DEST while the export is live: an image file
        /// (created or sized to the disk), a block device that holds it, or
        /// an NBD export (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=P).
        /// Repeatable.
        #[arg(long = "hydrate", value_name = "DISK=DEST")]
        hydrate: Vec<lifeboat_mt::output::Target>,
        /// Most MB/s the hydration copies (0: no limit), leaving the store
        /// and disks to the running machine's reads.
        #[arg(long, default_value_t = 0, value_name = "MB/S")]
        hydrate_limit: u64,
        /// Bound of the cache of base chunks fetched for reads (MiB).
        #[arg(long, default_value_t = lifeboat_mt::instant::DEFAULT_CACHE_MIB)]
        cache_mib: u64,
        /// Serve `latest` even where the stream ends inside a sync or resync.
        #[arg(long)]
        allow_inconsistent: bool,
        /// How the local layers and file targets are read and written: auto,
        /// uring or portable.
        #[arg(long, default_value = "auto")]
        io_engine: materialize::IoMode,
    },
    /// The same as failover, without touching replication state (it never
    /// writes to the store): a drill. It also writes lifeboat-drill.json in
    /// --out, listing every file it created; --cleanup DIR removes them.
    TestFailover {
        #[command(flatten)]
        run: FailoverArgs,
        /// `test-failover --cleanup DIR` alone: remove what the test failover
        /// into DIR (its --out) wrote, as its lifeboat-drill.json lists it;
        /// targets named with --target are the operator's and stay.
        #[arg(long, value_name = "DIR")]
        cleanup: Option<PathBuf>,
    },
    /// Print the lifeboat-disk-v1 checksum of image files or block devices
    /// (what points record and failover compares; see docs/ARCHITECTURE.md).
    Checksum {
        /// Images or block devices.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Check that a point can be recovered, without failing over: the chain
    /// of base and segments is complete, every object it needs
    /// authenticates, each disk's SHA-256 and lifeboat-disk-v1 checksum at
    /// the point are printed, and the latter is compared with the checksum
    /// the agent recorded there. Exits non-zero naming the first missing or
    /// tampered object, or a disk whose checksum differs.
    Verify {
        #[command(flatten)]
        store: StoreArgs,
        /// latest | latest-app | latest-crash | last-clean | <point id> | <RFC 3339 time>
        #[arg(long, default_value = "latest")]
        point: PointSpec,
        /// The key-encryption key file (kek.key from `lifeboat-ps init`).
        #[arg(long, env = "LIFEBOAT_KEK_FILE")]
        key_file: PathBuf,
        /// Where the disks are assembled meanwhile (sparse, removed at the end).
        #[arg(long, env = "TMPDIR", default_value = "/tmp")]
        work_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    // Recovered images hold the machine's plaintext: private to this user
    // (each image is also set 0600 explicitly).
    // SAFETY: umask only sets the process's file-creation mask.
    unsafe {
        libc::umask(0o077);
    }
    lifeboat_common::tune_allocator();
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if is_cleanup(&args) {
        let c = CleanupCli::parse_from(
            args.iter()
                .enumerate()
                .filter(|(i, _)| *i != 1)
                .map(|(_, a)| a),
        );
        lifeboat_common::init_logging("warn", c.log.log_format);
        if let Err(e) = cleanup_drill(&c.cleanup) {
            eprintln!("lifeboat-mt: error: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    let cli = Cli::parse_from(args);
    // The server logs what it applies; the commands only what goes wrong.
    let level = if matches!(cli.cmd, Cmd::Serve { .. }) {
        "info"
    } else {
        "warn"
    };
    lifeboat_common::init_logging(level, cli.log.log_format);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lifeboat-mt: error: starting the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(real_main(cli)) {
        eprintln!("lifeboat-mt: error: {e:#}");
        std::process::exit(1);
    }
}

async fn real_main(cli: Cli) -> Result<()> {
    lifeboat_common::tls::install_crypto_provider();
    match cli.cmd {
        Cmd::Points {
            store,
            group: Some(group),
            json,
            key_file,
        } => group_points(store, &group, json, key_file).await,
        Cmd::Points {
            store,
            group: None,
            json,
            key_file,
        } => {
            let store = store.for_machine()?;
            let s = store.open()?;
            let keys = match &key_file {
                Some(f) => {
                    Some(materialize::machine_keys(&s, &read_kek(f)?, &store.machine).await?)
                }
                None => {
                    eprintln!("note: no --key-file: the points listed are not authenticated");
                    None
                }
            };
            let inv =
                materialize::inventory(&s, keys.as_ref().map(|k| &k.catalogue), &store.machine)
                    .await?;
            // What each point adds: the sealed bytes of the segments after
            // the previous point up to it (segments are cut at every tag).
            let seg_size = |sp: &lifeboat_common::catalogue::Span| {
                inv.segment_bytes.get(&sp.name).copied().unwrap_or(0)
            };
            let listed: Vec<_> = inv.points.iter().filter(|p| p.seq <= inv.end).collect();
            let mut adds = Vec::new();
            let mut prev = inv.start();
            for p in &listed {
                let b: u64 = inv
                    .segments
                    .iter()
                    .filter(|sp| sp.name.first > prev && sp.name.first <= p.seq)
                    .map(seg_size)
                    .sum();
                adds.push(b);
                prev = p.seq;
            }
            // Which points carry the disks' checksums (one listing).
            let summed = lifeboat_common::catalogue::list_sums_points(&s, &store.machine).await?;
            let has_sums = |p: &lifeboat_common::catalogue::PointRecord| summed.contains(&p.seq);
            let suspect = lifeboat_common::churn::suspects(
                &listed.iter().map(|p| p.churn).collect::<Vec<_>>(),
            );
            let base = inv.base.as_ref().map(|b| {
                serde_json::json!({
                    "seq": b.seq,
                    "time": b.time,
                    "chunks": b.chunk_ids().count(),
                    "data-bytes": b.data_bytes(),
                })
            });
            if json {
                let points: Vec<serde_json::Value> = listed
                    .iter()
                    .zip(&adds)
                    .zip(&suspect)
                    .map(|((p, a), sus)| {
                        let mut v = serde_json::to_value(p).unwrap_or_default();
                        v["adds-bytes"] = (*a).into();
                        v["suspect"] = (*sus).into();
                        v["checksums"] = has_sums(p).into();
                        if let Some(c) = p.churn {
                            v["incompressible"] = c.incompressible().into();
                        }
                        v
                    })
                    .collect();
                let v = serde_json::json!({
                    "machine": store.machine,
                    "stream-end": inv.end,
                    "stream-end-consistent": inv.unsettled_end().is_none(),
                    "inconsistent-from": inv.inconsistent.iter().filter(|m| m.seq <= inv.end).collect::<Vec<_>>(),
                    "gap-before": inv.after_gap,
                    "base": base,
                    "points": points,
                    "takeovers": inv.fences.records(),
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            if let Some(b) = &inv.base {
                println!(
                    "history starts from the base at seq {} ({}): {} chunks, {} bytes of data; older points were folded into it",
                    b.seq,
                    b.time,
                    b.chunk_ids().count(),
                    b.data_bytes()
                );
            }
            println!(
                "{:<12} {:<6} {:<8} {:<26} {:>12} {:>14} {:<4}  LABEL",
                "ID", "KIND", "SOURCE", "TIME", "SEQ", "ADDS (BYTES)", "SUMS"
            );
            for ((p, a), sus) in listed.iter().zip(&adds).zip(&suspect) {
                println!(
                    "{:<12} {:<6} {:<8} {:<26} {:>12} {:>14} {:<4}  {}{}",
                    p.id,
                    p.kind.as_str(),
                    p.source_str(),
                    p.time,
                    p.seq,
                    a,
                    if has_sums(p) { "yes" } else { "-" },
                    p.label,
                    if *sus {
                        "  SUSPECT: incompressible churn (encryption?)"
                    } else {
                        ""
                    }
                );
            }
            if let Some(i) = suspect.iter().position(|s| *s) {
                println!(
                    "warning: a sustained rise in incompressible churn marks points from {} on as suspect; `--point last-clean` recovers the newest point before it",
                    listed[i].id
                );
            }
            println!(
                "{:<12} {:<6} {:<8} {:<26} {:>12}{}",
                "latest",
                "stream",
                "-",
                "-",
                inv.end,
                match inv.unsettled_end() {
                    Some(m) => format!("  not crash-consistent: {} since seq {}", m.label, m.seq),
                    None => String::new(),
                }
            );
            for t in inv.fences.records() {
                println!(
                    "note: process server {} took the machine over at seq {} (owner epoch {}); what older owners wrote after it is not part of the stream",
                    t.server, t.after, t.epoch
                );
            }
            if let Some(next) = inv.after_gap {
                println!("warning: segments for seqs {}..={} are missing; later data cannot be recovered until they are restored", inv.end + 1, next - 1);
            }
            Ok(())
        }
        Cmd::Checksum { files } => {
            for f in files {
                let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
                let (size, sum) = lifeboat_common::disksum::sum_path(&f, threads)
                    .with_context(|| format!("checksumming {}", f.display()))?;
                println!(
                    "{}  {size}  {}",
                    lifeboat_common::disksum::hex(&sum),
                    f.display()
                );
            }
            Ok(())
        }
        Cmd::TestFailover {
            cleanup: Some(dir), ..
        } => cleanup_drill(&dir),
        Cmd::Failover(a) => run_failover(a, false).await,
        Cmd::Serve { config } => {
            let cfg = lifeboat_mt::serve::ServeConfig::load(&config)?;
            lifeboat_mt::serve::run(cfg, lifeboat_common::cancel_on_signals()?).await
        }
        Cmd::Reprotect {
            config,
            machine,
            to,
            recovered,
            agent_config,
            certs,
            mt_address,
            server_name,
            store,
            store_options,
            key_file,
            wait,
            timeout,
            json,
        } => {
            use lifeboat_mt::failback;
            let cfg = lifeboat_mt::serve::ServeConfig::load(&config)?;
            let mut targets = BTreeMap::new();
            for (disk, t) in to {
                if targets.insert(disk.clone(), t).is_some() {
                    anyhow::bail!("--to names disk {disk} twice");
                }
            }
            let r = failback::Reprotect {
                machine: machine.clone(),
                to: targets,
                recovered,
                agent_config,
                certs,
                mt_address,
                server_name,
            };
            let checked = failback::check_reprotect(&cfg, &r)?;
            // Recorded after the checks and before any target is
            // registered: nothing is written to the original disks without it.
            match (&store, &key_file) {
                (Some(url), Some(kf)) => {
                    let store = open_store(url, &store_options)?;
                    let kek = read_kek(kf)?;
                    let keys = materialize::machine_keys(&store, &kek, &machine).await?;
                    let (point, seq) = match &checked.description {
                        Some(d) => (d.point.clone(), d.seq),
                        None => ("(not known: no --recovered)".to_string(), 0),
                    };
                    record_failover(&store, &keys.catalogue, &machine, "reprotect", &point, seq)
                        .await
                        .context("nothing was registered")?;
                }
                _ => eprintln!(
                    "warning: without --store and --key-file this reprotect is not recorded in the store: after the failback, run `lifeboat-agent reprotect` on {machine} before `lifeboat-agent run`, or its agent resumes a journal that does not describe the disks written here"
                ),
            }
            let mut report = failback::register(&cfg, &r, checked)?;
            if !json {
                println!(
                    "registered {machine}'s targets in {}",
                    report["registered"].as_str().unwrap_or("?")
                );
                if let Some(a) = report["agent-config"].as_str() {
                    println!("the recovered side's agent: lifeboat-agent run --config {a}");
                }
            }
            if wait {
                let started = Instant::now();
                let m = failback::wait_reprotected(&cfg.state_dir, &machine, timeout).await?;
                report["resync"] = m.clone();
                report["seconds"] = serde_json::json!(started.elapsed().as_secs_f64());
                if !json {
                    let r = &m["received"];
                    println!(
                        "{machine} is protected by this master target: its checksum resync compared {} blocks and sent {} bytes of writes ({} zeroed) in {:.1} s; applied up to seq {}",
                        r["hashed-blocks"].as_u64().unwrap_or(0),
                        r["write-bytes"].as_u64().unwrap_or(0),
                        r["zero-bytes"].as_u64().unwrap_or(0),
                        started.elapsed().as_secs_f64(),
                        m["applied-seq"].as_u64().unwrap_or(0),
                    );
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            }
            Ok(())
        }
        Cmd::Failback {
            config,
            machine,
            quiesce_timeout,
            timeout,
            json,
        } => {
            let cfg = lifeboat_mt::serve::ServeConfig::load(&config)?;
            eprintln!("asking the recovered side's agent of {machine} for its final point (it refuses writes after it)");
            let started = Instant::now();
            let mut r =
                lifeboat_mt::failback::failback(&cfg.state_dir, &machine, quiesce_timeout, timeout)
                    .await?;
            r["seconds"] = serde_json::json!(started.elapsed().as_secs_f64());
            let verified = r["verified"].as_array().cloned().unwrap_or_default();
            let equal = !verified.is_empty() && verified.iter().all(|d| d["equal"] == true);
            r["equal"] = serde_json::json!(equal);
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "failback of {machine}: final point seq {} ({}), applied to the original disks in {:.1} s",
                    r["seq"],
                    r["kind"].as_str().unwrap_or("?"),
                    started.elapsed().as_secs_f64()
                );
                for d in &verified {
                    println!(
                        "  disk {} ({}): {} (lifeboat-disk-v1 {})",
                        d["disk"].as_str().unwrap_or("?"),
                        d["target"].as_str().unwrap_or("?"),
                        if d["equal"] == true {
                            "equal to the recovered disk"
                        } else {
                            d["reason"].as_str().unwrap_or("DIFFERS")
                        },
                        d["got"].as_str().unwrap_or("none")
                    );
                }
                if equal {
                    println!("no acknowledged write was left behind. Next, on the original machine: lifeboat-agent reprotect --config <its agent.toml>, then lifeboat-agent run (forward protection resumes with a checksum resync against the stored replica)");
                }
            }
            if !equal {
                anyhow::bail!("the original disks of {machine} do not match the recovered side's checksums at the final point");
            }
            Ok(())
        }
        Cmd::Status { config, json } => {
            let cfg = lifeboat_mt::serve::ServeConfig::load(&config)?;
            let v =
                lifeboat_mt::serve::request(&cfg.state_dir, &lifeboat_mt::serve::Request::Status)
                    .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v["machines"])?);
            } else {
                lifeboat_mt::failback::print_status(&v);
            }
            Ok(())
        }
        Cmd::ServePoint {
            store,
            point,
            key_file,
            state_dir,
            socket,
            listen,
            hydrate,
            hydrate_limit,
            cache_mib,
            allow_inconsistent,
            io_engine,
        } => {
            let store = store.for_machine()?;
            let opts = lifeboat_mt::instant::Options {
                machine: store.machine.clone(),
                point,
                state_dir,
                hydrate,
                hydrate_limit: hydrate_limit * 1_000_000,
                cache_bytes: cache_mib << 20,
                allow_inconsistent,
                engine: io_engine,
            };
            serve_point(store.open()?, &read_kek(&key_file)?, opts, socket, listen).await
        }
        Cmd::TestFailover { run, .. } => run_failover(run, true).await,
        Cmd::Verify {
            store,
            point,
            key_file,
            work_dir,
            json,
        } => {
            let kek = read_kek(&key_file)?;
            let store = store.for_machine()?;
            let s = store.open()?;
            let keys = materialize::machine_keys(&s, &kek, &store.machine).await?;
            let started = Instant::now();
            let r =
                lifeboat_mt::verify::verify(&s, &keys, &store.machine, &point, &work_dir, |p| {
                    if p.done == p.total {
                        eprintln!("  {}/{} objects authenticated", p.done, p.total);
                    }
                })
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
                return Ok(());
            }
            println!(
                "verified {} at {}: {}{} segments authenticated ({} bytes) in {:.2?}",
                r.machine,
                r.point,
                r.base
                    .map(|b| format!("the base at seq {b} ({} chunks) and ", r.chunks_checked))
                    .unwrap_or_default(),
                r.segments_checked,
                r.bytes_fetched,
                started.elapsed()
            );
            for d in &r.disks {
                println!("  disk {}: {} bytes, sha256 {}", d.id, d.size, d.sha256);
            }
            r.checksums.print();
            if !r.consistent {
                println!(
                    "  warning: the stream ends inside a sync or resync here: failover refuses it without --allow-inconsistent"
                );
            }
            Ok(())
        }
    }
}

/// How often, and how far apart, `latest` looks again at a gap in the stream.
const GAP_RECHECKS: usize = 5;
const GAP_RECHECK_PAUSE: std::time::Duration = std::time::Duration::from_secs(2);

/// `serve-point`: the exports up within seconds, hydration behind them.
async fn serve_point(
    store: Store,
    kek: &Key,
    opts: lifeboat_mt::instant::Options,
    socket: Option<PathBuf>,
    listen: Option<std::net::SocketAddr>,
) -> Result<()> {
    use lifeboat_mt::instant::{rate, secs};
    let started = Instant::now();
    let shutdown = lifeboat_common::cancel_on_signals()?;
    let socket = socket.unwrap_or_else(|| opts.state_dir.join("nbd.sock"));
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        anyhow::bail!(
            "a server answers on {} already (another serve-point of this state directory?)",
            socket.display()
        );
    }
    // Left by a killed run: the server binds a new one.
    let _ = std::fs::remove_file(&socket);
    let served = std::sync::Arc::new(lifeboat_mt::instant::open(&store, kek, &opts).await?);
    let r = &served.record;
    if served.prepared {
        eprintln!(
            "serve-point: {} at {} (seq {}): {} segments after the base read ({} bytes) in {}",
            r.machine,
            r.point,
            r.seq,
            served.segments_read,
            served.bytes_fetched,
            secs(started)
        );
    } else {
        eprintln!(
            "serve-point: resuming {} at {} (seq {}) from {}: {} logged writes to the exports",
            r.machine,
            r.point,
            r.seq,
            opts.state_dir.display(),
            served.writes_logged
        );
    }
    let server = {
        let (served, socket, shutdown) = (served.clone(), socket.clone(), shutdown.clone());
        tokio::spawn(async move { served.serve(Some(&socket), listen, shutdown).await })
    };
    // The listener binds at once: wait until the socket is there.
    let is_socket = |p: &std::path::Path| {
        use std::os::unix::fs::FileTypeExt;
        std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
    };
    while !is_socket(&socket) && !server.is_finished() {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    if server.is_finished() {
        server
            .await
            .map_err(|e| anyhow::anyhow!("the NBD server task failed: {e}"))??;
        anyhow::bail!("the NBD server stopped before it served");
    }
    for d in &served.disks {
        eprintln!(
            "ready in {}: disk {} ({} bytes) at nbd+unix:///{}?socket={}{}",
            secs(started),
            d.id,
            d.export_size(),
            d.id,
            socket.display(),
            listen.map_or(String::new(), |a| format!(" and nbd://{a}/{}", d.id))
        );
    }
    let mut failed = None;
    if !opts.hydrate.is_empty() && !served.complete() {
        let h_started = Instant::now();
        let copied = served
            .hydrate(&shutdown, |disk, at, size| {
                eprintln!(
                    "hydrating {disk}: {at} of {size} bytes ({:.0} %)",
                    at as f64 * 100.0 / size.max(1) as f64
                )
            })
            .await;
        match copied {
            Ok(n) if !shutdown.is_cancelled() => {
                let (chunks, fetched) = served.chunks_fetched();
                eprintln!(
                    "hydration complete: {n} bytes copied in {} ({}); {chunks} base chunks fetched ({fetched} bytes); {} now hold{} the point with the export's writes",
                    secs(h_started),
                    rate(n, h_started.elapsed()),
                    opts.hydrate.iter().map(|t| t.dest.to_string()).collect::<Vec<_>>().join(", "),
                    if opts.hydrate.len() == 1 { "s" } else { "" }
                );
            }
            Ok(_) => eprintln!("hydration stopped by a signal; run the same command to resume"),
            Err(e) => {
                // The export stays up: the machine runs from it.
                eprintln!("error: hydration failed: {e:#}; the exports keep serving (stop with SIGTERM, then run the same command to resume the copy)");
                failed = Some(e);
            }
        }
    } else if served.complete() {
        eprintln!("hydration was complete already; the exports keep their targets up to date at each flush");
    }
    server
        .await
        .map_err(|e| anyhow::anyhow!("the NBD server task failed: {e}"))??;
    eprintln!(
        "serve-point: stopped; the exports' flushed writes are in {}",
        opts.state_dir.display()
    );
    match failed {
        Some(e) => Err(e.context("hydration failed; run the same command to resume")),
        None => Ok(()),
    }
}

fn read_kek(path: &std::path::Path) -> Result<Key> {
    Key::from_hex(
        &std::fs::read_to_string(path)
            .with_context(|| format!("reading the key-encryption key {}", path.display()))?,
    )
    .map_err(|e| anyhow::anyhow!("{} is not a key-encryption key: {e}", path.display()))
}

/// `failover` and `test-failover` (a drill: also `lifeboat-drill.json`).
async fn run_failover(a: FailoverArgs, drill: bool) -> Result<()> {
    if drill && a.planned {
        anyhow::bail!("test-failover --planned: a drill changes no replication state, and a planned failover stops the machine's writes; use failover --planned");
    }
    if a.group.is_some() && !a.outputs.targets.is_empty() {
        anyhow::bail!("--target names one machine's disks; with --group the images go to --out");
    }
    let started = lifeboat_common::catalogue::format_time_ms(lifeboat_common::now_ms());
    let out = a.out.clone();
    let mut stopped = None;
    // Files written besides the machines' (a plan's report).
    let mut extra = Vec::new();
    let reports = if a.plan.is_some() {
        let (reports, files, failed) = plan_failover(a, drill).await;
        stopped = failed;
        extra = files;
        reports
    } else if a.group.is_some() {
        group_failover(a, drill).await?
    } else {
        vec![failover(a, drill).await?]
    };
    // A drill records what it wrote even when its plan stopped part way.
    if drill && (!reports.is_empty() || !extra.is_empty()) {
        let record = lifeboat_mt::output::Drill {
            machines: reports.iter().map(|r| r.report.machine.clone()).collect(),
            started,
            // One spelling for every path, as `--cleanup` resolves its DIR.
            files: reports
                .iter()
                .flat_map(|r| r.files.iter())
                .chain(&extra)
                .map(|f| {
                    std::fs::canonicalize(f).with_context(|| format!("resolving {}", f.display()))
                })
                .collect::<Result<_>>()?,
            targets: reports
                .iter()
                .flat_map(|r| r.delivered.iter().map(|d| d.target.clone()))
                .collect(),
        };
        lifeboat_mt::output::write_drill(&out, &record)?;
        eprintln!(
            "drill recorded in {}; `lifeboat-mt test-failover --cleanup {}` removes what it wrote",
            out.join(lifeboat_mt::output::DRILL_FILE).display(),
            out.display()
        );
    }
    match stopped {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// `failover --plan`: group by group (see `lifeboat_mt::plan`); returns what
/// was recovered and, when the plan stopped, why.
async fn plan_failover(
    a: FailoverArgs,
    drill: bool,
) -> (Vec<Recovered>, Vec<PathBuf>, Option<anyhow::Error>) {
    use lifeboat_mt::plan::{self, MachineRun, Plan, Report, State};
    let started = Instant::now();
    let prepared = (|| -> Result<_> {
        let path = a.plan.clone().context("--plan FILE")?;
        let plan = Plan::load(&path)?;
        let kek = read_kek(&a.key_file)?;
        let store = a.store.open()?;
        Ok((plan, kek, store))
    })();
    let (plan, kek, store) = match prepared {
        Ok(p) => p,
        Err(e) => {
            return (
                Vec::new(),
                Vec::new(),
                Some(e.context("nothing was recovered")),
            )
        }
    };
    // Every machine's keys, stream and point before anything runs.
    for g in &plan.groups {
        for m in &g.machines {
            let checked = async {
                let keys = materialize::machine_keys(&store, &kek, m).await?;
                let inv = materialize::inventory(&store, Some(&keys.catalogue), m).await?;
                materialize::resolve(&inv, m, &g.point, a.allow_inconsistent)
            }
            .await;
            if let Err(e) = checked {
                return (
                    Vec::new(),
                    Vec::new(),
                    Some(e.context(format!(
                        "recovery plan {}: machine {m} of group {} at {}; nothing was recovered",
                        plan.name, g.name, g.point_text
                    ))),
                );
            }
        }
    }
    let how = How {
        allow_inconsistent: a.allow_inconsistent,
        check: !a.skip_checksum,
        io_engine: a.io_engine,
        record: !drill,
    };
    let mut report = Report::new(&plan, drill);
    let mut recovered = Vec::new();
    let mut stopped: Option<String> = None;
    for (gi, g) in plan.groups.iter().enumerate() {
        let g_started = Instant::now();
        if g.pause && !plan::pause(&plan, g).await {
            stopped = Some(format!(
                "at the manual pause before group {} (stdin closed)",
                g.name
            ));
            break;
        }
        eprintln!(
            "recovery plan {}: group {} ({}) at {}",
            plan.name,
            g.name,
            g.machines.join(", "),
            g.point_text
        );
        let outcome: Result<(), String> = async {
            plan::run_scripts(
                "before",
                &plan,
                g,
                &a.out,
                drill,
                &mut report.groups[gi].scripts,
            )
            .await?;
            let runs = futures::future::join_all(g.machines.iter().map(|m| {
                let out = a.out.join(m);
                let (store, kek, outputs, point) = (&store, &kek, &a.outputs, &g.point);
                async move {
                    let r = failover_machine(store, kek, m, point, &out, how, outputs).await;
                    (m, out, r)
                }
            }))
            .await;
            let mut failed = Vec::new();
            for (i, (m, out, r)) in runs.into_iter().enumerate() {
                let slot = &mut report.groups[gi].machines[i];
                match r {
                    Ok(rec) => {
                        *slot = MachineRun {
                            machine: m.clone(),
                            state: State::Done,
                            point: Some(rec.report.point.clone()),
                            seq: Some(rec.report.seq),
                            out: Some(out),
                            error: None,
                        };
                        recovered.push(rec);
                    }
                    Err(e) => {
                        slot.state = State::Failed;
                        slot.error = Some(format!("{e:#}"));
                        failed.push(m.clone());
                    }
                }
            }
            if !failed.is_empty() {
                return Err(format!(
                    "at group {}: {} could not be recovered",
                    g.name,
                    failed.join(", ")
                ));
            }
            plan::run_scripts(
                "after",
                &plan,
                g,
                &a.out,
                drill,
                &mut report.groups[gi].scripts,
            )
            .await
        }
        .await;
        report.groups[gi].state = if outcome.is_ok() {
            State::Done
        } else {
            State::Failed
        };
        report.groups[gi].seconds = plan::secs(g_started);
        if let Err(e) = outcome {
            stopped = Some(e);
            break;
        }
    }
    report.completed = stopped.is_none();
    report.stopped = stopped.clone();
    report.seconds = plan::secs(started);
    let written = report.write(&a.out);
    if a.json {
        match serde_json::to_string_pretty(&report) {
            Ok(t) => println!("{t}"),
            Err(e) => eprintln!("lifeboat-mt: printing the report: {e}"),
        }
    } else {
        report.print();
    }
    let mut error = stopped.map(|s| anyhow::anyhow!("recovery plan {} stopped {s}", plan.name));
    let mut files = Vec::new();
    match written {
        Ok(path) => {
            eprintln!("plan report: {}", path.display());
            files.push(path);
        }
        Err(e) => {
            error = Some(error.map_or(e, |s| s.context("and the report could not be written")))
        }
    }
    (recovered, files, error)
}

/// `lifeboat-mt test-failover --cleanup DIR`: parsed on its own, as it
/// takes none of a test failover's required options.
#[derive(Parser)]
#[command(name = "lifeboat-mt test-failover")]
struct CleanupCli {
    /// Remove what the test failover into DIR (its --out) wrote.
    #[arg(long, value_name = "DIR")]
    cleanup: PathBuf,
    #[command(flatten)]
    log: lifeboat_common::LogArgs,
}

/// Whether the command line is `test-failover --cleanup …`.
fn is_cleanup(args: &[std::ffi::OsString]) -> bool {
    args.get(1).is_some_and(|a| a == "test-failover")
        && args
            .iter()
            .any(|a| a == "--cleanup" || a.to_string_lossy().starts_with("--cleanup="))
}

/// `test-failover --cleanup DIR`.
fn cleanup_drill(dir: &std::path::Path) -> Result<()> {
    let (drill, removed) = lifeboat_mt::output::cleanup(dir)?;
    for p in &removed {
        println!("removed {}", p.display());
    }
    for t in &drill.targets {
        println!("left {t} (a --target of the drill: the operator's)");
    }
    println!(
        "cleaned up the test failover of {} started {}",
        drill.machines.join(", "),
        drill.started
    );
    Ok(())
}

/// What `failover` writes besides the images: see `lifeboat_mt::output`.
#[derive(Args)]
struct Outputs {
    /// The format of the images in --out: raw (sparse) or qcow2 (converted
    /// with qemu-img, which must be installed, and compared with the raw).
    #[arg(long, default_value = "raw")]
    format: lifeboat_mt::output::Format,
    /// Write disk DISK onto DEST instead of leaving it in --out: an existing
    /// block device or image file (a file is sized to the disk; a device must
    /// hold it), or an NBD export: nbd://HOST[:PORT]/EXPORT or
    /// nbd+unix:///EXPORT?socket=PATH (qemu-nbd, nbdkit). Written from the
    /// image assembled in --out, then read back and compared with its
    /// checksum. Repeatable; not with --group.
    #[arg(long = "target", value_name = "DISK=DEST")]
    targets: Vec<lifeboat_mt::output::Target>,
    /// Keep the image assembled in --out for a disk sent to a --target.
    #[arg(long)]
    keep_local: bool,
    /// Memory (MiB) in start-vm.sh's QEMU command line.
    #[arg(long, default_value_t = 2048)]
    vm_memory: u64,
    /// CPUs in start-vm.sh's QEMU command line.
    #[arg(long, default_value_t = 2)]
    vm_cpus: u32,
}

async fn failover(a: FailoverArgs, drill: bool) -> Result<Recovered> {
    let machine = a
        .store
        .machine
        .clone()
        .context("--machine (or --group, or --plan) is required")?;
    lifeboat_common::ids::validate_id("machine", &machine).map_err(anyhow::Error::msg)?;
    let kek = read_kek(&a.key_file)?;
    let store = a.store.open()?;
    let started = Instant::now();
    let (point, planned) = if a.planned {
        let (p, planned) = final_point(&a, &store, &kek, &machine).await?;
        (PointSpec::Id(p.id), Some(planned))
    } else {
        (a.point.clone(), None)
    };
    let mut report = failover_machine(
        &store,
        &kek,
        &machine,
        &point,
        &a.out,
        How {
            allow_inconsistent: a.allow_inconsistent,
            check: !a.skip_checksum,
            io_engine: a.io_engine,
            record: !drill,
        },
        &a.outputs,
    )
    .await?;
    report.planned = planned;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report, started.elapsed());
    }
    Ok(report)
}

/// `failover --planned`: asks for the final point, waits until the store
/// holds it; returns it and what the report says of it.
async fn final_point(
    a: &FailoverArgs,
    store: &Store,
    kek: &Key,
    machine: &str,
) -> Result<(lifeboat_common::catalogue::PointRecord, Planned)> {
    use lifeboat_mt::planned;
    let (Some(ps), Some(token_file)) = (&a.ps, &a.ps_token_file) else {
        anyhow::bail!("--planned needs --ps http://HOST:PORT and --ps-token-file FILE");
    };
    let token = std::fs::read_to_string(token_file).with_context(|| {
        format!(
            "reading the process server's token {}",
            token_file.display()
        )
    })?;
    // The store must be readable before the machine's writes stop.
    let keys = materialize::machine_keys(store, kek, machine).await?;
    eprintln!("asking {ps} for the final point of {machine} (the agent refuses writes after it)");
    let fp = planned::ask_final_point(ps, token.trim(), machine, a.quiesce_timeout).await?;
    eprintln!(
        "final point placed at seq {} ({}{}); waiting for it to reach the store",
        fp.seq,
        fp.kind,
        fp.source
            .as_deref()
            .map(|s| format!(", {s}"))
            .unwrap_or_default()
    );
    let p = planned::wait_in_store(
        store,
        &keys.catalogue,
        machine,
        fp.seq,
        !a.skip_checksum,
        a.store_timeout,
    )
    .await?;
    eprintln!("final point {} (seq {}) is in the store", p.id, p.seq);
    Ok((
        p,
        Planned {
            final_seq: fp.seq,
            kind: fp.kind,
            source: fp.source,
            acknowledged_writes_left_behind: 0,
            statement: format!(
                "no acknowledged write was left behind: the agent acknowledged every write before seq {} and refuses writes since (`lifeboat-agent resume-writes` takes them again)",
                fp.seq
            ),
        },
    ))
}

/// What a planned failover's report adds.
#[derive(serde::Serialize)]
#[serde(rename_all = "kebab-case")]
struct Planned {
    final_seq: u64,
    kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<String>,
    /// Always 0: the final point follows every acknowledged write (see
    /// `lifeboat_mt::planned`).
    acknowledged_writes_left_behind: u64,
    statement: String,
}

/// A failover's report: what was written, and how it compared with the
/// checksums recorded at the point.
#[derive(serde::Serialize)]
struct Recovered {
    /// A planned failover's final point.
    #[serde(skip_serializing_if = "Option::is_none")]
    planned: Option<Planned>,
    #[serde(flatten)]
    report: materialize::Report,
    /// `None`: not compared (`--skip-checksum`).
    checksums: Option<lifeboat_mt::sums::Checked>,
    /// The disks written onto a `--target`.
    delivered: Vec<lifeboat_mt::output::Delivered>,
    /// `recovered-machine.json`'s content.
    description: lifeboat_mt::output::MachineDescription,
    /// Every file this failover created under `--out`.
    files: Vec<PathBuf>,
}

/// How a failover writes and checks.
#[derive(Clone, Copy)]
struct How {
    /// Write `latest` inside a sync or resync.
    allow_inconsistent: bool,
    /// Compare the images with the checksums recorded at the point.
    check: bool,
    io_engine: materialize::IoMode,
    /// A failover, not a drill: record it in the store (`failed-over.json`).
    record: bool,
}

/// Recovers `machine` at `point` into `out` (see [`How`]).
async fn failover_machine(
    store: &Store,
    kek: &Key,
    machine: &str,
    point: &PointSpec,
    out: &std::path::Path,
    how: How,
    outputs: &Outputs,
) -> Result<Recovered> {
    let How {
        allow_inconsistent,
        check,
        io_engine,
        record,
    } = how;
    let started = Instant::now();
    let keys = materialize::machine_keys(store, kek, machine).await?;
    let rec = lifeboat_common::catalogue::load_machine(store, &keys.catalogue, machine).await?;
    let mut seen_disks = std::collections::BTreeSet::new();
    let mut seen_dests = std::collections::BTreeSet::new();
    for t in &outputs.targets {
        let dest = t.dest.resolved();
        if !seen_disks.insert(t.disk.clone()) {
            anyhow::bail!("--target names disk {} twice; nothing was written", t.disk);
        }
        if !seen_dests.insert(dest.clone()) {
            anyhow::bail!(
                "--target names {dest} for two disks: the second would overwrite the first; nothing was written"
            );
        }
        if !rec.disks.iter().any(|d| d.id == t.disk) {
            anyhow::bail!(
                "--target {}={}: {machine} has no disk {} (its disks: {}); nothing was written",
                t.disk,
                t.dest,
                t.disk,
                rec.disks
                    .iter()
                    .map(|d| d.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let mut inv = materialize::inventory(store, Some(&keys.catalogue), machine).await?;
    // A gap with later segments behind it is usually uploads still in flight
    // (a process server puts several segments at once): look again for a
    // little while before `latest` is refused for it.
    for _ in 0..GAP_RECHECKS {
        if inv.after_gap.is_none() || *point != PointSpec::Latest {
            break;
        }
        eprintln!(
            "segments after seq {} are not all stored yet; looking again in {GAP_RECHECK_PAUSE:?}",
            inv.end
        );
        tokio::time::sleep(GAP_RECHECK_PAUSE).await;
        inv = materialize::inventory(store, Some(&keys.catalogue), machine).await?;
    }
    // Retention may fold the stream while this runs, deleting segments it
    // was about to read; then it starts again from the new base.
    let mut attempt = 0;
    let report = loop {
        attempt += 1;
        let resolved = materialize::resolve(&inv, machine, point, allow_inconsistent)?;
        if let (Some(m), PointSpec::Latest) = (inv.unsettled_end(), point) {
            eprintln!(
                "warning: the stream ends inside a {} (from seq {}): these disks are not crash-consistent",
                m.label, m.seq
            );
        }
        eprintln!("recovering {machine} at {}", resolved.description);
        let last_print = std::sync::Mutex::new(Instant::now());
        let result = materialize::materialize_with(
            store,
            &keys,
            machine,
            &inv,
            &resolved,
            out,
            allow_inconsistent,
            io_engine,
            |p: materialize::Progress| {
                let mut t = last_print.lock().unwrap_or_else(|p| p.into_inner());
                if t.elapsed().as_millis() >= 1000 || p.done == p.total {
                    let secs = started.elapsed().as_secs_f64().max(1e-3);
                    eprintln!(
                        "  {}/{} objects applied (segments newest first, then base chunks), {:.1} MiB fetched, {:.1} MiB/s, {:.1} MiB written, {:.1} MiB/s",
                        p.done,
                        p.total,
                        p.bytes as f64 / 1048576.0,
                        p.bytes as f64 / 1048576.0 / secs,
                        p.written as f64 / 1048576.0,
                        p.written as f64 / 1048576.0 / secs
                    );
                    *t = Instant::now();
                }
            },
        )
        .await;
        match result {
            Ok(r) => {
                eprintln!("  images written with {}", r.io_engine);
                break r;
            }
            Err(e) if attempt < 3 => {
                let again = materialize::inventory(store, Some(&keys.catalogue), machine).await?;
                if again.start() == inv.start() {
                    return Err(e);
                }
                eprintln!(
                    "retention folded the stream into a new base (seq {}) while recovering ({e:#}); starting again from it",
                    again.start()
                );
                inv = again;
            }
            Err(e) => return Err(e),
        }
    };
    // Recorded as soon as the images exist, before checks and outputs that
    // may fail with usable images in place. A store that refuses the write
    // (read-only credentials) does not fail the failover, which has
    // recovered the disks: the operator is told what then guards nothing.
    if record {
        if let Err(e) = record_failover(
            store,
            &keys.catalogue,
            machine,
            "failover",
            &report.point,
            report.seq,
        )
        .await
        {
            eprintln!(
                "warning: {e:#}; give `lifeboat-mt reprotect` --store and --key-file (it records the reprotect), or after a failback run `lifeboat-agent reprotect` on {machine} before `lifeboat-agent run`"
            );
        }
    }
    let checksums = if check {
        let images: Vec<_> = report
            .disks
            .iter()
            .map(|d| (d.id.clone(), d.path.clone(), d.size))
            .collect();
        let points: Vec<u64> = inv.points.iter().map(|p| p.seq).collect();
        Some(
            lifeboat_mt::sums::check_images(
                store,
                &keys,
                machine,
                &inv.fences,
                &points,
                report.seq,
                &images,
            )
            .await?,
        )
    } else {
        None
    };
    let (delivered, description, files) =
        write_outputs(&report, checksums.as_ref(), out, outputs).await?;
    Ok(Recovered {
        planned: None,
        report,
        checksums,
        delivered,
        description,
        files,
    })
}

/// Writes `failed-over.json` (see `FailedOverRecord`): the process server
/// then does not let the machine's agent resume its journal, which does not
/// describe what a failback writes to its disks. Written by a failover and
/// again by `reprotect`, just before the master target writes those disks
/// (an agent that connected in between used up the failover's).
async fn record_failover(
    store: &Store,
    key: &lifeboat_common::catalogue::CatalogueKey,
    machine: &str,
    what: &str,
    point: &str,
    seq: u64,
) -> Result<()> {
    use lifeboat_common::catalogue::{self, FailedOverRecord};
    let rec = FailedOverRecord {
        format: catalogue::FORMAT_VERSION,
        by: what.to_string(),
        point: point.to_string(),
        seq,
        at_ms: lifeboat_common::now_ms(),
    };
    let name = catalogue::failed_over_object(machine);
    let body = bytes::Bytes::from(catalogue::sign_record(key, &name, &rec));
    store.put(&name, body).await.with_context(|| {
        format!(
            "recording the {what} in {} (the master target needs write access to the store)",
            store.describe(&name)
        )
    })?;
    eprintln!(
        "recorded in {}: {machine}'s agent will resync its disks by checksum at its next connection instead of resuming its journal",
        store.describe(&name)
    );
    Ok(())
}

/// Turns the images in `out` into the outputs asked for (qcow2, targets),
/// then writes the machine description and its QEMU command line.
async fn write_outputs(
    report: &materialize::Report,
    checksums: Option<&lifeboat_mt::sums::Checked>,
    out: &std::path::Path,
    outputs: &Outputs,
) -> Result<(
    Vec<lifeboat_mt::output::Delivered>,
    lifeboat_mt::output::MachineDescription,
    Vec<PathBuf>,
)> {
    use lifeboat_mt::output::{self, DiskDescription, Format};
    let mut delivered = Vec::new();
    let mut files = Vec::new();
    let mut disks = Vec::new();
    for (i, d) in report.disks.iter().enumerate() {
        let known = checksums
            .and_then(|c| c.disks.iter().find(|x| x.id == d.id))
            .and_then(|x| x.checksum.clone());
        let absolute = || {
            std::fs::canonicalize(&d.path)
                .with_context(|| format!("resolving {}", d.path.display()))
        };
        let (format, location, checksum) = if let Some(t) =
            outputs.targets.iter().find(|t| t.disk == d.id)
        {
            let expected = match known {
                Some(sum) => sum,
                None => {
                    let (p, size) = (d.path.clone(), d.size);
                    tokio::task::spawn_blocking(move || lifeboat_mt::sums::sum_image(&p, size))
                        .await??
                }
            };
            eprintln!("writing disk {} onto {}", d.id, t.dest);
            let last = std::sync::Mutex::new(Instant::now());
            let r = output::deliver(&d.path, d.size, &expected, &t.dest, |done, total| {
                let mut at = last.lock().unwrap_or_else(|p| p.into_inner());
                if at.elapsed().as_millis() >= 1000 {
                    eprintln!(
                        "  {:.1} of {:.1} MiB onto {}",
                        done as f64 / 1048576.0,
                        total as f64 / 1048576.0,
                        t.dest
                    );
                    *at = Instant::now();
                }
            })
            .await
            .with_context(|| format!("writing disk {} onto {}", d.id, t.dest))?;
            eprintln!(
                "  disk {} onto {}: {} bytes copied, {} zeroed, read back equal to the recovered image, {:.2} s",
                d.id, t.dest, r.copied, r.zeroed, r.seconds
            );
            if outputs.keep_local {
                files.push(d.path.clone());
            } else {
                std::fs::remove_file(&d.path)
                    .with_context(|| format!("removing {}", d.path.display()))?;
            }
            let sum = r.checksum.clone();
            delivered.push(r);
            (Format::Raw, t.dest.resolved(), Some(sum))
        } else if outputs.format == Format::Qcow2 {
            let raw = absolute()?;
            let qcow2 = raw.with_extension("qcow2");
            eprintln!("converting {} to qcow2", d.path.display());
            let q = qcow2.clone();
            tokio::task::spawn_blocking(move || output::to_qcow2(&raw, &q)).await??;
            files.push(qcow2.clone());
            (Format::Qcow2, qcow2.display().to_string(), known)
        } else {
            files.push(d.path.clone());
            (Format::Raw, absolute()?.display().to_string(), known)
        };
        disks.push(DiskDescription {
            id: d.id.clone(),
            size: d.size,
            format,
            location,
            boot_index: i,
            checksum,
        });
    }
    let qemu_command =
        output::qemu_command(&report.machine, &disks, outputs.vm_memory, outputs.vm_cpus);
    let description = output::MachineDescription {
        machine: report.machine.clone(),
        point: report.point.clone(),
        seq: report.seq,
        disks,
        memory_mib: outputs.vm_memory,
        cpus: outputs.vm_cpus,
        qemu_command,
    };
    files.extend(output::write_description(out, &description)?);
    Ok((delivered, description, files))
}

fn print_report(recovered: &Recovered, elapsed: std::time::Duration) {
    let report = &recovered.report;
    let from_base = match report.base {
        Some(seq) => format!("the base at seq {seq} ({} chunks) and ", report.chunks_read),
        None => String::new(),
    };
    println!(
        "recovered {} at {} from {from_base}{} segments ({} bytes fetched) in {:.2?}",
        report.machine, report.point, report.segments_read, report.bytes_fetched, elapsed
    );
    for d in &report.disks {
        println!(
            "  disk {}: {} ({} bytes, {} bytes of writes applied)",
            d.id,
            d.path.display(),
            d.size,
            d.bytes_written
        );
    }
    match &recovered.checksums {
        Some(c) => c.print(),
        None => println!("  checksums not compared (--skip-checksum)"),
    }
    if let Some(p) = &recovered.planned {
        println!("  planned failover: {}", p.statement);
    }
    for d in &recovered.description.disks {
        println!(
            "  disk {} is at {} ({})",
            d.id,
            d.location,
            d.format.as_str()
        );
    }
    for t in &recovered.delivered {
        println!(
            "  {}: {} bytes copied, {} zeroed, read back: checksum {}",
            t.target, t.copied, t.zeroed, t.checksum
        );
    }
    if let Some(f) = recovered
        .files
        .iter()
        .rev()
        .find(|f| f.ends_with(lifeboat_mt::output::START_SCRIPT))
    {
        println!(
            "  machine description and QEMU command line: {}",
            f.display()
        );
    }
}

/// `points --group`: the group's points, each member's seq.
async fn group_points(
    store: StoreArgs,
    group: &str,
    json: bool,
    key_file: Option<PathBuf>,
) -> Result<()> {
    let s = store.open()?;
    let kek = key_file.as_deref().map(read_kek).transpose()?;
    if kek.is_none() {
        eprintln!("note: no --key-file: the group points listed are not authenticated");
    }
    let gp = lifeboat_mt::group::list(&s, kek.as_ref(), group).await?;
    if json {
        let v = serde_json::json!({
            "group": group,
            "verified": gp.verified,
            "points": gp.points,
            "unusable": gp.unusable.iter().map(|(id, why)| serde_json::json!({"id": id, "why": why})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{:<16} {:<5} {:<26} {:<40}  LABEL",
        "ID", "KIND", "TIME", "MEMBERS (SEQ, SOURCE)"
    );
    for p in &gp.points {
        let members: Vec<String> = p
            .members
            .iter()
            .map(|m| match m.source {
                Some(s) => format!("{}={}({})", m.machine, m.seq, s.as_str()),
                None => format!("{}={}", m.machine, m.seq),
            })
            .collect();
        println!(
            "{:<16} {:<5} {:<26} {:<40}  {}",
            p.id,
            p.kind.as_str(),
            p.time,
            members.join(" "),
            p.label
        );
    }
    for (id, why) in &gp.unusable {
        println!("note: group point {id} is not usable: {why}");
    }
    Ok(())
}

/// `failover --group`: every member of the group at one group point, each
/// into `<out>/<machine>/`.
async fn group_failover(a: FailoverArgs, drill: bool) -> Result<Vec<Recovered>> {
    let group = a.group.clone().unwrap_or_default();
    let kek = read_kek(&a.key_file)?;
    let store = a.store.open()?;
    let spec = match &a.point {
        PointSpec::Latest => "latest".to_string(),
        PointSpec::LatestApp => "latest-app".to_string(),
        PointSpec::LatestCrash => "latest-crash".to_string(),
        PointSpec::Id(id) => id.clone(),
        other => {
            anyhow::bail!("with --group, --point is latest, latest-app, latest-crash or a group point id, not {other:?}")
        }
    };
    let gp = lifeboat_mt::group::list(&store, Some(&kek), &group).await?;
    let point = lifeboat_mt::group::pick(&gp, &group, &spec)?.clone();
    eprintln!(
        "recovering group {group} at {} group point {} ({}): {}",
        point.kind.as_str(),
        point.id,
        point.time,
        point
            .members
            .iter()
            .map(|m| format!("{} seq {}", m.machine, m.seq))
            .collect::<Vec<_>>()
            .join(", ")
    );
    // Every member's tag must be stored before anything is written.
    for m in &point.members {
        let keys = materialize::machine_keys(&store, &kek, &m.machine).await?;
        let mut stored = false;
        for _ in 0..GAP_RECHECKS {
            let inv = materialize::inventory(&store, Some(&keys.catalogue), &m.machine).await?;
            // The member's own group tag, not any point at that seq: an agent
            // that lost its journal's tail may have numbered the seq anew. An
            // app-consistent group point's tag is an `app` tag with the
            // member's source.
            let kind = match point.kind {
                lifeboat_common::group::GroupKind::Crash => {
                    lifeboat_common::protocol::TagKind::Group
                }
                lifeboat_common::group::GroupKind::App => lifeboat_common::protocol::TagKind::App,
            };
            let tagged = inv.points.iter().any(|p| {
                p.seq == m.seq
                    && p.kind == kind
                    && p.label == point.label
                    && (m.source.is_none() || p.source == m.source)
            });
            if tagged && m.seq <= inv.end {
                stored = true;
                break;
            }
            eprintln!(
                "the group tag of {} (seq {}) is not stored yet; looking again in {GAP_RECHECK_PAUSE:?}",
                m.machine, m.seq
            );
            tokio::time::sleep(GAP_RECHECK_PAUSE).await;
        }
        if !stored {
            anyhow::bail!(
                "the group tag of {} (seq {}) of group point {} is not in the store (is the process server still uploading it?); nothing was written",
                m.machine, m.seq, point.id
            );
        }
    }
    let started = Instant::now();
    let mut reports = Vec::new();
    for m in &point.members {
        let out = a.out.join(&m.machine);
        let r = failover_machine(
            &store,
            &kek,
            &m.machine,
            &PointSpec::Id(lifeboat_common::catalogue::point_id(m.seq)),
            &out,
            How {
                allow_inconsistent: false,
                check: !a.skip_checksum,
                io_engine: a.io_engine,
                record: !drill,
            },
            &a.outputs,
        )
        .await
        .with_context(|| format!("recovering {} of group {group}", m.machine))?;
        reports.push(r);
    }
    if a.json {
        let v = serde_json::json!({"group": group, "point": point, "machines": reports});
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(reports);
    }
    println!(
        "recovered group {group} at group point {} ({}) in {:.2?}",
        point.id,
        point.time,
        started.elapsed()
    );
    for r in &reports {
        print_report(r, started.elapsed());
    }
    Ok(reports)
}
