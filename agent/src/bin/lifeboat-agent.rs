//! `lifeboat-agent`: run | register | tag [--app] | status | progress | resume-writes | reprotect.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use lifeboat_agent::config::AgentConfig;
use lifeboat_agent::control::{self, Request};

#[derive(Parser)]
#[command(
    name = "lifeboat-agent",
    version,
    about = "Lifeboat agent: protects this machine's disks"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    #[command(flatten)]
    log: lifeboat_common::LogArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the protected disks and replicate every write.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Ask the running agent for a recovery point now (crash-consistent, or
    /// app-consistent with --app); prints its seq.
    ///
    /// With --app, an app-consistent point: pre-freeze scripts, freeze of the
    /// filesystems in [app] freeze, the tag, thaw, post-thaw scripts. Exits
    /// non-zero naming the step and the reason when quiescing fails (no
    /// point is placed then; the filesystems are thawed).
    Tag {
        #[arg(long)]
        config: PathBuf,
        #[arg(long, default_value = "")]
        label: String,
        /// Quiesce first: an app-consistent point (see [app] in agent.toml).
        #[arg(long)]
        app: bool,
    },
    /// Print the running agent's status as JSON.
    Status {
        #[arg(long)]
        config: PathBuf,
    },
    /// Take writes again after a planned failover's final point (the agent
    /// refuses every write from that point on, across restarts). What is
    /// written afterwards is not in the recovered copy: use it when the
    /// failover is abandoned and this machine stays the one in use. (A
    /// completed failover is recorded in the store: the agent's next
    /// connection resyncs every disk by checksum.)
    ResumeWrites {
        #[arg(long)]
        config: PathBuf,
    },
    /// After a failback wrote this machine's disks (the master target
    /// applied the recovered side's writes to them): forget what the agent's
    /// state says of them, so that at its next start it resumes forward
    /// protection with a checksum resync against the stored replica (only
    /// the blocks that differ are sent), never with a journal that no
    /// longer describes the disks. The agent must be stopped. Also after a
    /// failover without failback, when the disks were restored by other means.
    Reprotect {
        #[arg(long)]
        config: PathBuf,
    },
    /// Get this machine a client certificate from the process server with its
    /// registration passphrase (`lifeboat-ps init` printed it; or a one-time
    /// one from `lifeboat-ps machines one-time-passphrase`). The key is made
    /// here and never leaves the machine. Writes client-key, client-cert and
    /// ca-cert of the config only after the server proved it knows the
    /// passphrase; refuses when client-key or client-cert already exist.
    Register {
        #[arg(long)]
        config: PathBuf,
        /// The process server as host:port (default: `server` of the config).
        #[arg(long)]
        ps: Option<String>,
        /// A file holding the passphrase (surrounding whitespace ignored; it
        /// is never logged).
        #[arg(long)]
        passphrase_file: PathBuf,
    },
    /// Show the initial sync's progress as a bar until every disk is streaming.
    Progress {
        #[arg(long)]
        config: PathBuf,
    },
}

fn main() {
    lifeboat_common::restrict_umask();
    lifeboat_common::tune_allocator();
    let cli = Cli::parse();
    lifeboat_common::init_logging("info", cli.log.log_format);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lifeboat-agent: error: starting the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(real_main(cli)) {
        eprintln!("lifeboat-agent: error: {e:#}");
        std::process::exit(1);
    }
}

async fn real_main(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Run { config } => {
            let cfg = AgentConfig::load(&config)?;
            lifeboat_common::trim_freed_memory();
            let shutdown = lifeboat_common::cancel_on_signals()?;
            // Every event of the run carries the machine's id.
            let span = tracing::info_span!("agent", machine = %cfg.machine);
            tracing::Instrument::instrument(lifeboat_agent::run(cfg, shutdown), span).await
        }
        Cmd::Tag { config, label, app } => {
            let cfg = AgentConfig::load(&config)?;
            let v = control::request(&cfg.control_socket(), &Request::Tag { label, app }).await?;
            println!("{}", v["seq"]);
            if let Some(w) = v["warning"].as_str() {
                eprintln!("lifeboat-agent: warning: the point was placed, but {w}");
            }
            Ok(())
        }
        Cmd::Progress { config } => progress(&config).await,
        Cmd::Register {
            config,
            ps,
            passphrase_file,
        } => {
            let cfg = AgentConfig::load(&config)?;
            let pass = lifeboat_agent::register::read_passphrase(&passphrase_file)?;
            let server = ps.unwrap_or_else(|| cfg.server.clone());
            let done = lifeboat_agent::register::register(&cfg, &server, &pass).await?;
            println!(
                "registered machine {} with {}; wrote {}",
                cfg.machine,
                done.server,
                done.written
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            println!(
                "start replication: lifeboat-agent run --config {}",
                config.display()
            );
            Ok(())
        }
        Cmd::Reprotect { config } => {
            let cfg = AgentConfig::load(&config)?;
            let removed =
                lifeboat_agent::rebase::forget_state(&cfg.state_dir, &cfg.control_socket())?;
            println!(
                "removed {removed} entries of {}: at its next start (lifeboat-agent run --config {}) the agent resyncs every disk against the stored replica by checksum",
                cfg.state_dir.display(),
                config.display()
            );
            Ok(())
        }
        Cmd::ResumeWrites { config } => {
            let cfg = AgentConfig::load(&config)?;
            let v = control::request(&cfg.control_socket(), &Request::ResumeWrites).await?;
            match v["final-point"]["seq"].as_u64() {
                Some(seq) => println!(
                    "writes are taken again (they were refused after the final point at seq {seq})"
                ),
                None => println!("writes were not refused; nothing changed"),
            }
            Ok(())
        }
        Cmd::Status { config } => {
            let cfg = AgentConfig::load(&config)?;
            let v = control::request(&cfg.control_socket(), &Request::Status).await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
    }
}

async fn progress(config: &std::path::Path) -> Result<()> {
    use std::io::Write;
    let cfg = AgentConfig::load(config)?;
    loop {
        let v = control::request(&cfg.control_socket(), &Request::Status).await?;
        let disks = v["sync"].as_array().cloned().unwrap_or_default();
        let mut line = String::new();
        let mut all_done = true;
        for d in &disks {
            let pct = d["percent"].as_f64().unwrap_or(0.0);
            let filled = (pct / 5.0).round() as usize;
            let rate = d["rate-bytes-per-s"].as_u64().unwrap_or(0) as f64 / 1048576.0;
            all_done &= d["state"] == "streaming";
            line.push_str(&format!(
                "{} [{}{}] {:5.1}% {:7.1} MiB/s eta {}s  ",
                d["disk"].as_str().unwrap_or("?"),
                "#".repeat(filled.min(20)),
                ".".repeat(20 - filled.min(20)),
                pct,
                rate,
                d["eta-s"]
            ));
        }
        print!("\r{line}");
        std::io::stdout().flush()?;
        if all_done {
            println!("\nall disks are streaming");
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}
