//! The agent's configuration file (`agent.toml`): one struct, kebab-case
//! keys, unknown keys refused, every value checked by [`AgentConfig::validate`]
//! with an error that names the key. Every key is documented in
//! `packaging/examples/agent.toml`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Crash-consistent points are taken this often.
pub const DEFAULT_TAG_INTERVAL: Duration = Duration::from_secs(300);
/// Captured-but-unacknowledged bytes the journal may hold.
pub const DEFAULT_JOURNAL_MAX_BYTES: u64 = 256 * 1024 * 1024;

/// Smallest `journal-max-bytes`.
pub const MIN_JOURNAL_MAX_BYTES: u64 = 16 * 1024 * 1024;
/// Smallest `queue-memory-bytes` (the default is the stream's
/// `DEFAULT_QUEUE_MEMORY_BYTES`).
pub const MIN_QUEUE_MEMORY_BYTES: u64 = 1024 * 1024;
/// Longest `tag-interval`.
pub const MAX_TAG_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// Most `[[disk]]` blocks (disks are numbered by u16 in the stream).
pub const MAX_DISKS: usize = 1024;

/// App-consistent points are taken this often by default.
pub const DEFAULT_APP_INTERVAL: Duration = Duration::from_secs(4 * 3600);
/// Shortest and longest `[app] interval`.
pub const MIN_APP_INTERVAL: Duration = Duration::from_secs(3600);
pub const MAX_APP_INTERVAL: Duration = Duration::from_secs(12 * 3600);
/// Longest one pre-freeze or post-thaw script may run before it is killed.
pub const DEFAULT_SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest FIFREEZE of every listed filesystem may take (it flushes them).
pub const DEFAULT_FREEZE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest the filesystems stay frozen once frozen (the tag is placed then).
pub const DEFAULT_FREEZE_HOLD: Duration = Duration::from_secs(10);
/// Upper bound of `script-timeout`.
pub const MAX_SCRIPT_TIMEOUT: Duration = Duration::from_secs(3600);
/// Upper bound of `freeze-timeout` and `freeze-hold`: writers to a frozen
/// filesystem wait, so both stay short.
pub const MAX_FREEZE_BOUND: Duration = Duration::from_secs(60);

fn default_tag_interval() -> Duration {
    DEFAULT_TAG_INTERVAL
}
fn default_journal_max_bytes() -> u64 {
    DEFAULT_JOURNAL_MAX_BYTES
}
fn default_queue_memory_bytes() -> u64 {
    crate::stream::DEFAULT_QUEUE_MEMORY_BYTES
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
    /// Optional TCP address for the same export: loopback only, unless
    /// `allow-remote` is set.
    #[serde(default)]
    pub tcp: Option<SocketAddr>,
    /// Lets `tcp` listen on a non-loopback address (the export has no
    /// authentication and carries the disk's plaintext; a warning is logged).
    #[serde(default)]
    pub allow_remote: bool,
    /// Disk I/O engine: auto (portable for files, io_uring for block devices),
    /// uring or portable.
    #[serde(default = "default_io_mode")]
    pub io_mode: String,
}

fn default_io_mode() -> String {
    "auto".into()
}

/// How app-consistent points quiesce the machine (`[app] quiesce`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QuiesceMode {
    /// Pre-freeze scripts, FIFREEZE of `freeze`, FITHAW, post-thaw scripts.
    #[default]
    Fsfreeze,
    /// TEST ONLY: quiesces nothing and records the point as made by VSS, so
    /// tests can carry a `vss` point through stream, catalogue and CLI on
    /// Linux. Never use it on a protected machine.
    VssTest,
}

/// App-consistent points (`[app]`): see `agent/src/apppoint.rs`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AppConfig {
    /// How often the agent takes an app-consistent point by itself (1h to 12h).
    #[serde(default = "default_app_interval", with = "humantime_serde")]
    pub interval: Duration,
    #[serde(default)]
    pub quiesce: QuiesceMode,
    /// Mount points to freeze, in order (thawed in reverse). Listed, not
    /// discovered: the agent serves its disks over NBD and cannot always tell
    /// which mount sits on them.
    #[serde(default)]
    pub freeze: Vec<PathBuf>,
    /// Programs run, in order, before the freeze; one that fails or times out
    /// cancels the point.
    #[serde(default)]
    pub pre_freeze: Vec<PathBuf>,
    /// Programs run, in order, after the thaw (also after a failed attempt).
    #[serde(default)]
    pub post_thaw: Vec<PathBuf>,
    /// Longest one script may run; it is killed (its process group) then.
    #[serde(default = "default_script_timeout", with = "humantime_serde")]
    pub script_timeout: Duration,
    /// Longest freezing every listed filesystem may take.
    #[serde(default = "default_freeze_timeout", with = "humantime_serde")]
    pub freeze_timeout: Duration,
    /// Longest the filesystems stay frozen after the freeze completed.
    #[serde(default = "default_freeze_hold", with = "humantime_serde")]
    pub freeze_hold: Duration,
}

fn default_app_interval() -> Duration {
    DEFAULT_APP_INTERVAL
}
fn default_script_timeout() -> Duration {
    DEFAULT_SCRIPT_TIMEOUT
}
fn default_freeze_timeout() -> Duration {
    DEFAULT_FREEZE_TIMEOUT
}
fn default_freeze_hold() -> Duration {
    DEFAULT_FREEZE_HOLD
}

impl Default for AppConfig {
    fn default() -> AppConfig {
        AppConfig {
            interval: DEFAULT_APP_INTERVAL,
            quiesce: QuiesceMode::default(),
            freeze: Vec::new(),
            pre_freeze: Vec::new(),
            post_thaw: Vec::new(),
            script_timeout: DEFAULT_SCRIPT_TIMEOUT,
            freeze_timeout: DEFAULT_FREEZE_TIMEOUT,
            freeze_hold: DEFAULT_FREEZE_HOLD,
        }
    }
}

impl AppConfig {
    /// Whether anything quiesces the machine: without it no app point is taken.
    pub fn configured(&self) -> bool {
        self.quiesce == QuiesceMode::VssTest
            || !self.freeze.is_empty()
            || !self.pre_freeze.is_empty()
            || !self.post_thaw.is_empty()
    }

    fn validate(&self) -> Result<()> {
        let fmt = |d: Duration| humantime::format_duration(d).to_string();
        if self.interval < MIN_APP_INTERVAL || self.interval > MAX_APP_INTERVAL {
            bail!(
                "[app] interval = {}: must be between 1h and 12h",
                fmt(self.interval)
            );
        }
        for (key, d, max) in [
            ("script-timeout", self.script_timeout, MAX_SCRIPT_TIMEOUT),
            ("freeze-timeout", self.freeze_timeout, MAX_FREEZE_BOUND),
            ("freeze-hold", self.freeze_hold, MAX_FREEZE_BOUND),
        ] {
            if d < Duration::from_secs(1) || d > max {
                bail!(
                    "[app] {key} = {}: must be between 1s and {}",
                    fmt(d),
                    fmt(max)
                );
            }
        }
        let mut seen = std::collections::HashSet::new();
        for m in &self.freeze {
            if !m.is_absolute() {
                bail!("[app] freeze: {} is not an absolute path", m.display());
            }
            if m == Path::new("/") {
                bail!("[app] freeze: / cannot be frozen (the agent and its journal run on it)");
            }
            if !seen.insert(m) {
                bail!("[app] freeze: {} is listed twice", m.display());
            }
        }
        for (key, list) in [
            ("pre-freeze", &self.pre_freeze),
            ("post-thaw", &self.post_thaw),
        ] {
            if let Some(p) = list.iter().find(|p| !p.is_absolute()) {
                bail!("[app] {key}: {} is not an absolute path", p.display());
            }
        }
        Ok(())
    }
}

/// How a disk is first replicated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InitialCopy {
    /// Every disk is read and sent (zero chunks as zero entries).
    #[default]
    Full,
    /// The replica already holds a copy (a failback's original disks, a
    /// restored image): a checksum resync compares every block and sends
    /// only those that differ.
    Checksum,
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
    /// Unacknowledged writes kept in memory; the rest of the queue is read
    /// back from the journal when it is sent.
    #[serde(default = "default_queue_memory_bytes")]
    pub queue_memory_bytes: u64,
    #[serde(default = "default_tag_interval", with = "humantime_serde")]
    pub tag_interval: Duration,
    /// Upper bound of the initial sync's read rate, in bytes per second (none by default).
    #[serde(default)]
    pub sync_rate_limit: Option<u64>,
    /// How a disk this agent has not replicated before gets to the replica.
    #[serde(default)]
    pub initial_copy: InitialCopy,
    /// App-consistent points: schedule, scripts, filesystems to freeze.
    #[serde(default)]
    pub app: AppConfig,
    /// What the agent sends to the process server, at most this fast, by
    /// time of day (`lifeboat_common::bandwidth`); unlimited by default.
    #[serde(default)]
    pub bandwidth: lifeboat_common::bandwidth::Schedule,
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

    /// Checks every value; an error names the key (and the disk).
    pub fn validate(&self) -> Result<()> {
        self.bandwidth
            .validate()
            .map_err(|e| anyhow::anyhow!("[bandwidth]: {e}"))?;
        lifeboat_common::ids::validate_id("machine", &self.machine).map_err(anyhow::Error::msg)?;
        if self
            .server
            .rsplit_once(':')
            .and_then(|(h, p)| {
                (!h.is_empty()).then_some(())?;
                p.parse::<u16>().ok().filter(|p| *p != 0)
            })
            .is_none()
        {
            bail!("server: {:?} is not host:port", self.server);
        }
        if self.server_name.is_empty() {
            bail!("server-name must not be empty");
        }
        if self.disks.is_empty() {
            bail!("no [[disk]] configured");
        }
        if self.disks.len() > MAX_DISKS {
            bail!("{} [[disk]] blocks: at most {MAX_DISKS}", self.disks.len());
        }
        let mut seen = std::collections::HashSet::new();
        let mut sockets = std::collections::HashSet::new();
        for d in &self.disks {
            lifeboat_common::ids::validate_id("disk", &d.id).map_err(anyhow::Error::msg)?;
            d.io_mode
                .parse::<crate::diskio::IoMode>()
                .map_err(|e| anyhow::anyhow!("disk {}: io-mode: {e}", d.id))?;
            if !seen.insert(&d.id) {
                bail!("disk id {:?} is configured twice", d.id);
            }
            if !sockets.insert(&d.socket) {
                bail!(
                    "disk {}: socket {} is used by another disk",
                    d.id,
                    d.socket.display()
                );
            }
            // sockaddr_un holds 108 bytes, the terminating NUL included.
            if d.socket.as_os_str().len() > 107 {
                bail!(
                    "disk {}: socket path {} is longer than 107 bytes",
                    d.id,
                    d.socket.display()
                );
            }
            if let Some(addr) = d.tcp {
                if !addr.ip().is_loopback() && !d.allow_remote {
                    bail!(
                        "disk {}: tcp = \"{addr}\" is not a loopback address; the export is unauthenticated plaintext, so set allow-remote = true to serve it beyond this host",
                        d.id
                    );
                }
            }
        }
        if self.journal_max_bytes < MIN_JOURNAL_MAX_BYTES {
            bail!(
                "journal-max-bytes = {}: must be at least {MIN_JOURNAL_MAX_BYTES} (16 MiB)",
                self.journal_max_bytes
            );
        }
        if self.queue_memory_bytes < MIN_QUEUE_MEMORY_BYTES {
            bail!(
                "queue-memory-bytes = {}: must be at least {MIN_QUEUE_MEMORY_BYTES} (1 MiB)",
                self.queue_memory_bytes
            );
        }
        if self.tag_interval < Duration::from_secs(1) || self.tag_interval > MAX_TAG_INTERVAL {
            bail!(
                "tag-interval = {}: must be between 1s and 24h",
                humantime::format_duration(self.tag_interval)
            );
        }
        self.app.validate()?;
        if self.sync_rate_limit == Some(0) {
            bail!("sync-rate-limit = 0: must be at least 1 (bytes per second); leave it out for no limit");
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &str, disk_extra: &str) -> Result<AgentConfig> {
        let text = format!(
            "machine = \"m-1\"\nserver = \"127.0.0.1:9443\"\nca-cert = \"ca\"\nclient-cert = \"c\"\n\
             client-key = \"k\"\nstate-dir = \"s\"\n{extra}\n[[disk]]\nid = \"root\"\npath = \"r.img\"\n\
             socket = \"r.sock\"\n{disk_extra}\n"
        );
        let cfg: AgentConfig = toml::from_str(&text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn refused(extra: &str, disk_extra: &str, key: &str) {
        let e = format!("{:#}", parse(extra, disk_extra).unwrap_err());
        assert!(e.contains(key), "{extra}{disk_extra}: {e}");
    }

    #[test]
    fn every_bad_value_is_refused_by_its_key() {
        parse("", "").unwrap();
        parse("sync-rate-limit = 1", "tcp = \"127.0.0.1:10809\"").unwrap();
        parse("", "tcp = \"0.0.0.0:10809\"\nallow-remote = true").unwrap();
        refused("sync-rate-limit = 0", "", "sync-rate-limit");
        refused("journal-max-bytes = 1000", "", "journal-max-bytes");
        refused("queue-memory-bytes = 1000", "", "queue-memory-bytes");
        refused("tag-interval = \"0s\"", "", "tag-interval");
        refused("tag-interval = \"30d\"", "", "tag-interval");
        refused("server-name = \"\"", "", "server-name");
        refused("", "tcp = \"0.0.0.0:10809\"", "allow-remote");
        refused("", "io-mode = \"fast\"", "io-mode");
        refused("bogus-key = 1", "", "bogus-key");
    }

    #[test]
    fn app_keys_are_checked_by_name() {
        let cfg = parse("", "").unwrap();
        assert_eq!(cfg.app.interval, DEFAULT_APP_INTERVAL);
        assert!(!cfg.app.configured());
        let cfg = parse(
            "[app]\ninterval = \"1h\"\nfreeze = [\"/srv/db\"]\npre-freeze = [\"/etc/lb/pre\"]\n\
             script-timeout = \"5s\"\nfreeze-hold = \"3s\"",
            "",
        )
        .unwrap();
        assert!(cfg.app.configured());
        assert_eq!(cfg.app.freeze_hold, Duration::from_secs(3));
        parse("[app]\ninterval = \"12h\"\nquiesce = \"vss-test\"", "").unwrap();
        refused("[app]\ninterval = \"59m\"", "", "[app] interval = 59m");
        refused("[app]\ninterval = \"13h\"", "", "between 1h and 12h");
        refused("[app]\nscript-timeout = \"0s\"", "", "script-timeout");
        refused("[app]\nfreeze-timeout = \"2m\"", "", "freeze-timeout");
        refused("[app]\nfreeze-hold = \"61s\"", "", "freeze-hold");
        refused("[app]\nfreeze = [\"db\"]", "", "not an absolute path");
        refused("[app]\nfreeze = [\"/\"]", "", "/ cannot be frozen");
        refused("[app]\nfreeze = [\"/a\", \"/a\"]", "", "listed twice");
        refused("[app]\npost-thaw = [\"x.sh\"]", "", "post-thaw");
        refused("[app]\nquiesce = \"vss\"", "", "quiesce");
        refused("[app]\nbogus = 1", "", "bogus");
    }

    #[test]
    fn the_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/examples/agent.toml");
        let cfg = AgentConfig::load(&path).unwrap();
        assert_eq!(cfg.journal_max_bytes, DEFAULT_JOURNAL_MAX_BYTES);
        assert_eq!(cfg.tag_interval, DEFAULT_TAG_INTERVAL);
        assert_eq!(cfg.app.interval, DEFAULT_APP_INTERVAL);
        assert_eq!(cfg.app.script_timeout, DEFAULT_SCRIPT_TIMEOUT);
        assert_eq!(cfg.app.freeze_timeout, DEFAULT_FREEZE_TIMEOUT);
        assert_eq!(cfg.app.freeze_hold, DEFAULT_FREEZE_HOLD);
        assert_eq!(cfg.app.quiesce, QuiesceMode::Fsfreeze);
        assert_eq!(cfg.server_name, default_server_name());
        assert_eq!(cfg.sync_rate_limit, None);
        assert_eq!(cfg.initial_copy, InitialCopy::Full);
        assert_eq!(cfg.disks[0].io_mode, default_io_mode());
        assert!(cfg.disks[0].tcp.is_none() && !cfg.disks[0].allow_remote);
    }

    #[test]
    fn a_server_without_a_port_is_refused() {
        let text = "machine = \"m-1\"\nserver = \"ps.example\"\nca-cert = \"ca\"\nclient-cert = \"c\"\n\
                    client-key = \"k\"\nstate-dir = \"s\"\n[[disk]]\nid = \"root\"\npath = \"r\"\nsocket = \"s\"\n";
        let cfg: AgentConfig = toml::from_str(text).unwrap();
        assert!(format!("{:#}", cfg.validate().unwrap_err()).contains("server"));
    }
}
