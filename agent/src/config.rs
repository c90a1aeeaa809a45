//! The agent's configuration file (`agent.toml`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Crash-consistent points are taken this often.
pub const DEFAULT_TAG_INTERVAL: Duration = Duration::from_secs(300);
/// Captured-but-unacknowledged bytes the journal may hold.
pub const DEFAULT_JOURNAL_MAX_BYTES: u64 = 256 * 1024 * 1024;

fn default_tag_interval() -> Duration {
    DEFAULT_TAG_INTERVAL
}
fn default_journal_max_bytes() -> u64 {
    DEFAULT_JOURNAL_MAX_BYTES
}
fn default_server_name() -> String {
    "localhost".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DiskConfig {
    /// Disk id (lowercase letters, digits, '-'); also the NBD export name.
    pub id: String,
    /// The real disk: a raw image file or a block device.
    pub path: PathBuf,
    /// Unix socket the NBD export is served on.
    pub socket: PathBuf,
    /// Optional loopback TCP address for the same export.
    #[serde(default)]
    pub tcp: Option<SocketAddr>,
    /// Disk I/O engine: auto (portable for files, io_uring for block devices),
    /// uring or portable.
    #[serde(default = "default_io_mode")]
    pub io_mode: String,
}

fn default_io_mode() -> String {
    "auto".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AgentConfig {
    /// This machine's id; must match its client certificate.
    pub machine: String,
    /// Process server address (host:port), port 9443 by default.
    pub server: String,
    /// Name the process server's certificate is checked against.
    #[serde(default = "default_server_name")]
    pub server_name: String,
    pub ca_cert: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// Journal, control socket and state.
    pub state_dir: PathBuf,
    #[serde(default = "default_journal_max_bytes")]
    pub journal_max_bytes: u64,
    #[serde(default = "default_tag_interval", with = "humantime_serde")]
    pub tag_interval: Duration,
    /// Upper bound of the initial sync's read rate, in bytes per second (none by default).
    #[serde(default)]
    pub sync_rate_limit: Option<u64>,
    #[serde(rename = "disk")]
    pub disks: Vec<DiskConfig>,
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<AgentConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        let mut cfg: AgentConfig =
            toml::from_str(&text).with_context(|| format!("parsing config {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut paths: Vec<&mut PathBuf> = vec![
            &mut cfg.ca_cert,
            &mut cfg.client_cert,
            &mut cfg.client_key,
            &mut cfg.state_dir,
        ];
        for d in cfg.disks.iter_mut() {
            paths.push(&mut d.path);
            paths.push(&mut d.socket);
        }
        for p in paths {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        cfg.validate()
            .with_context(|| format!("checking config {}", path.display()))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        lifeboat_common::ids::validate_id("machine", &self.machine).map_err(anyhow::Error::msg)?;
        if self.disks.is_empty() {
            bail!("no [[disk]] configured");
        }
        if self.disks.len() > u16::MAX as usize {
            bail!("too many disks");
        }
        let mut seen = std::collections::HashSet::new();
        for d in &self.disks {
            lifeboat_common::ids::validate_id("disk", &d.id).map_err(anyhow::Error::msg)?;
            d.io_mode
                .parse::<crate::diskio::IoMode>()
                .map_err(|e| anyhow::anyhow!("disk {}: io-mode: {e}", d.id))?;
            if !seen.insert(&d.id) {
                bail!("disk id {:?} is configured twice", d.id);
            }
        }
        if self.journal_max_bytes < 16 * 1024 * 1024 {
            bail!("journal-max-bytes must be at least 16 MiB");
        }
        if self.tag_interval < Duration::from_secs(1) {
            bail!("tag-interval must be at least 1s");
        }
        Ok(())
    }

    pub fn control_socket(&self) -> PathBuf {
        self.state_dir.join("control.sock")
    }

    pub fn journal_dir(&self) -> PathBuf {
        self.state_dir.join("journal")
    }
}
