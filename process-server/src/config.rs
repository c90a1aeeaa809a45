//! The process server's configuration file (`ps.toml`), with the embedded
//! defaults `lifeboat-ps init` writes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use lifeboat_common::store::StoreConfig;
use serde::{Deserialize, Serialize};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:9443";
/// A segment is cut when it holds this many bytes of entries...
pub const DEFAULT_SEGMENT_MAX_BYTES: u64 = 32 * 1024 * 1024;
/// ...or when its oldest entry has waited this long. It bounds the RPO and
/// how closely `--time` recovers a moment (a segment's name says when its
/// last entry was durable); under steady churn about two PUTs per second per
/// machine (bench/rpo.sh at 2 x 20 MB/s: RPO p99 0.66 s, 1.98 objects/s;
/// with 1 s: 1.14 s, 1.25 objects/s).
pub const DEFAULT_SEGMENT_MAX_AGE: Duration = Duration::from_millis(500);
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;
/// Segments sealed and uploaded at the same time, per machine.
pub const DEFAULT_UPLOAD_CONCURRENCY: usize = 4;

/// A TLS handshake must finish within this long after accept.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The agent's hello must arrive within this long after the handshake.
pub const DEFAULT_HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection that sends nothing for this long is closed (agents ping
/// every 10 s when they have nothing to send).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections open at once from one source IP address.
pub const DEFAULT_MAX_CONNECTIONS_PER_SOURCE: usize = 16;

fn default_handshake_timeout() -> Duration {
    DEFAULT_HANDSHAKE_TIMEOUT
}
fn default_hello_timeout() -> Duration {
    DEFAULT_HELLO_TIMEOUT
}
fn default_idle_timeout() -> Duration {
    DEFAULT_IDLE_TIMEOUT
}
fn default_max_connections_per_source() -> usize {
    DEFAULT_MAX_CONNECTIONS_PER_SOURCE
}
fn default_segment_max_bytes() -> u64 {
    DEFAULT_SEGMENT_MAX_BYTES
}
fn default_segment_max_age() -> Duration {
    DEFAULT_SEGMENT_MAX_AGE
}
fn default_zstd_level() -> i32 {
    DEFAULT_ZSTD_LEVEL
}
fn default_upload_concurrency() -> usize {
    DEFAULT_UPLOAD_CONCURRENCY
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PsConfig {
    /// Address agents connect to (TLS).
    pub listen: SocketAddr,
    /// RocksDB cache directory.
    pub cache_dir: PathBuf,
    /// CA certificate that signs agents' client certificates.
    pub ca_cert: PathBuf,
    /// This server's certificate and key.
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// The key-encryption key (64 hex digits). Never stored in the object store.
    pub kek_file: PathBuf,
    #[serde(default = "default_segment_max_bytes")]
    pub segment_max_bytes: u64,
    #[serde(default = "default_segment_max_age", with = "humantime_serde")]
    pub segment_max_age: Duration,
    #[serde(default = "default_zstd_level")]
    pub zstd_level: i32,
    #[serde(default = "default_upload_concurrency")]
    pub upload_concurrency: usize,
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
    #[serde(default = "default_hello_timeout", with = "humantime_serde")]
    pub hello_timeout: Duration,
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    #[serde(default = "default_max_connections_per_source")]
    pub max_connections_per_source: usize,
    pub store: StoreConfig,
    /// How long history is kept, and how it is thinned and compacted.
    #[serde(default)]
    pub retention: Retention,
    /// Consistency groups (`[[group]]`): machines that share group points.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub group: Vec<GroupConfig>,
    /// The status and metrics endpoint (`http.rs`); off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpConfig>,
    /// Alert thresholds and the webhook (`alerts.rs`).
    #[serde(default)]
    pub alerts: AlertsConfig,
    /// Where backpressure begins (`health.rs`).
    #[serde(default)]
    pub health: HealthConfig,
    /// Registration of agents with a passphrase, and the revocation list
    /// every handshake is checked against (`registration.rs`); off when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration: Option<RegistrationConfig>,
    /// Upload limits by time of day (`lifeboat_common::bandwidth`).
    #[serde(default)]
    pub bandwidth: BandwidthConfig,
}

/// `[bandwidth]` of ps.toml.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BandwidthConfig {
    /// Every segment upload of this server together (default unlimited).
    #[serde(default)]
    pub upload: lifeboat_common::bandwidth::Schedule,
    /// A machine's own upload limit, on top of the server's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub machine: Vec<MachineBandwidth>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct MachineBandwidth {
    pub name: String,
    pub upload: lifeboat_common::bandwidth::Schedule,
}

/// `[registration]` of ps.toml.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RegistrationConfig {
    /// The CA's key, which signs the certificates registration issues.
    pub ca_key: PathBuf,
    /// The passphrase, the one-time passphrases, the machines issued and
    /// the revocation list.
    pub dir: PathBuf,
}

fn default_backpressure_free() -> u8 {
    crate::health::BACKPRESSURE_FREE_PERCENT
}

/// `[health]` of ps.toml.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct HealthConfig {
    /// Below this percentage of free cache space new entries are refused
    /// (0: never).
    #[serde(default = "default_backpressure_free")]
    pub backpressure_free: u8,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            backpressure_free: crate::health::BACKPRESSURE_FREE_PERCENT,
        }
    }
}

/// `[http]` of ps.toml: `/status` (JSON), `/metrics` (Prometheus text) and
/// `/` (the status page), every request with the token (`http.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// A file holding the bearer token (`lifeboat-ps init` writes `http.token`).
    pub token_file: PathBuf,
}

/// RPO alert threshold unless a machine has its own. Azure Site Recovery's
/// default RPO threshold.
pub const DEFAULT_RPO_ALERT: Duration = Duration::from_secs(15 * 60);
pub const DEFAULT_WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);

fn default_rpo_alert() -> Duration {
    DEFAULT_RPO_ALERT
}
fn default_webhook_timeout() -> Duration {
    DEFAULT_WEBHOOK_TIMEOUT
}

/// `[alerts]` of ps.toml.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AlertsConfig {
    /// An RPO above this raises an `rpo` alert.
    #[serde(default = "default_rpo_alert", with = "humantime_serde")]
    pub rpo_alert: Duration,
    /// Each event is POSTed here as JSON (http:// or https://).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
    #[serde(default = "default_webhook_timeout", with = "humantime_serde")]
    pub webhook_timeout: Duration,
    /// Machines with their own threshold (`[[alerts.machine]]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub machine: Vec<MachineAlert>,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            rpo_alert: DEFAULT_RPO_ALERT,
            webhook: None,
            webhook_timeout: DEFAULT_WEBHOOK_TIMEOUT,
            machine: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct MachineAlert {
    pub name: String,
    #[serde(with = "humantime_serde")]
    pub rpo_alert: Duration,
}

impl AlertsConfig {
    /// The RPO threshold of `machine`.
    pub fn rpo_alert_of(&self, machine: &str) -> Duration {
        self.machine
            .iter()
            .find(|m| m.name == machine)
            .map(|m| m.rpo_alert)
            .unwrap_or(self.rpo_alert)
    }

    fn check(&self, path: &Path) -> Result<()> {
        let bad = |what: String| anyhow::anyhow!("{}: [alerts] {what}", path.display());
        let d = humantime::format_duration;
        for (what, t) in std::iter::once(("rpo-alert".to_string(), self.rpo_alert)).chain(
            self.machine
                .iter()
                .map(|m| (format!("rpo-alert of machine {:?}", m.name), m.rpo_alert)),
        ) {
            if t < Duration::from_secs(1) || t > Duration::from_secs(7 * 24 * 3600) {
                return Err(bad(format!(
                    "{what} must be between 1s and 7days, not {}",
                    d(t)
                )));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for m in &self.machine {
            lifeboat_common::ids::validate_id("machine", &m.name).map_err(bad)?;
            if !seen.insert(m.name.as_str()) {
                return Err(bad(format!("machine {:?} is listed twice", m.name)));
            }
        }
        if let Some(w) = &self.webhook {
            let u =
                url::Url::parse(w).map_err(|e| bad(format!("webhook {w:?} is not a URL: {e}")))?;
            if !matches!(u.scheme(), "http" | "https") {
                return Err(bad(format!(
                    "webhook {w:?} must be an http:// or https:// URL"
                )));
            }
        }
        if self.webhook_timeout < Duration::from_millis(100)
            || self.webhook_timeout > Duration::from_secs(60)
        {
            return Err(bad(format!(
                "webhook-timeout must be between 100ms and 1m, not {}",
                d(self.webhook_timeout)
            )));
        }
        Ok(())
    }
}

/// Group points are taken this often by default (like crash points).
pub const DEFAULT_GROUP_EVERY: Duration = Duration::from_secs(300);
/// How long a group point may hold the members' writes by default: prepare
/// and commit of every member must finish within it.
pub const DEFAULT_GROUP_HOLD_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest hold a group may configure (agents cap theirs at 60 s too).
pub const MAX_GROUP_HOLD_TIMEOUT: Duration = Duration::from_secs(60);

/// App-consistent group points by default this often, between these bounds
/// (as the agent's `[app] interval`), or `"off"`.
pub const DEFAULT_GROUP_APP_INTERVAL: Duration = Duration::from_secs(4 * 3600);
pub const MIN_GROUP_APP_INTERVAL: Duration = Duration::from_secs(3600);
pub const MAX_GROUP_APP_INTERVAL: Duration = Duration::from_secs(12 * 3600);
/// How long the members of an app-consistent group point may take to quiesce
/// (pre-freeze scripts and freeze) by default, and at most. Its own bound:
/// the write hold (`hold-timeout`) begins only once every member quiesced.
pub const DEFAULT_GROUP_QUIESCE_TIMEOUT: Duration = Duration::from_secs(120);
pub const MAX_GROUP_QUIESCE_TIMEOUT: Duration = Duration::from_secs(600);

fn default_group_every() -> Duration {
    DEFAULT_GROUP_EVERY
}
fn default_group_app_interval() -> Option<Duration> {
    Some(DEFAULT_GROUP_APP_INTERVAL)
}
fn default_group_quiesce_timeout() -> Duration {
    DEFAULT_GROUP_QUIESCE_TIMEOUT
}

/// A duration, or `"off"` (`None`).
mod duration_or_off {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            None => s.serialize_str("off"),
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(d)?;
        if text == "off" {
            return Ok(None);
        }
        humantime::parse_duration(&text)
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("{text:?}: {e} (or \"off\")")))
    }
}
fn default_group_hold_timeout() -> Duration {
    DEFAULT_GROUP_HOLD_TIMEOUT
}

/// One `[[group]]` of ps.toml (see `groups.rs`). Every member must be served
/// by this process server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct GroupConfig {
    pub name: String,
    pub machines: Vec<String>,
    /// A group point this often; 0 takes them only on demand
    /// (`lifeboat-ps group-tag`).
    #[serde(default = "default_group_every", with = "humantime_serde")]
    pub every: Duration,
    /// The bound of one attempt: every member held and committed within it,
    /// or every member is released and no group point is recorded.
    #[serde(default = "default_group_hold_timeout", with = "humantime_serde")]
    pub hold_timeout: Duration,
    /// An app-consistent group point this often (every member quiesced
    /// first, with its own `[app]` quiescer); `None` (`"off"`): only on
    /// demand (`lifeboat-ps group-tag --app`).
    #[serde(default = "default_group_app_interval", with = "duration_or_off")]
    pub app_interval: Option<Duration>,
    /// The bound of the quiesce of an app-consistent group point: every
    /// member quiesced within it, or every member is thawed and no group
    /// point is recorded.
    #[serde(default = "default_group_quiesce_timeout", with = "humantime_serde")]
    pub quiesce_timeout: Duration,
}

fn check_groups(groups: &[GroupConfig], path: &Path) -> Result<()> {
    let d = humantime::format_duration;
    let mut member_of = std::collections::HashMap::new();
    let mut names = std::collections::HashSet::new();
    for g in groups {
        let bad =
            |what: String| anyhow::anyhow!("{}: [[group]] {:?}: {what}", path.display(), g.name);
        lifeboat_common::ids::validate_id("group", &g.name).map_err(bad)?;
        if !names.insert(g.name.as_str()) {
            return Err(bad("a second group has this name".into()));
        }
        if g.machines.len() < 2 {
            return Err(bad(format!(
                "lists {} machine(s); a group needs at least 2",
                g.machines.len()
            )));
        }
        for m in &g.machines {
            lifeboat_common::ids::validate_id("machine", m).map_err(bad)?;
            if let Some(other) = member_of.insert(m.as_str(), g.name.as_str()) {
                return Err(bad(if other == g.name {
                    format!("lists machine {m:?} twice")
                } else {
                    format!("machine {m:?} is already in group {other:?}; a machine is in one group at most")
                }));
            }
        }
        if !g.every.is_zero()
            && (g.every < Duration::from_secs(1) || g.every > Duration::from_secs(24 * 3600))
        {
            return Err(bad(format!(
                "every must be 0 (on demand only) or between 1s and 24h, not {}",
                d(g.every)
            )));
        }
        if g.hold_timeout < Duration::from_millis(100) || g.hold_timeout > MAX_GROUP_HOLD_TIMEOUT {
            return Err(bad(format!(
                "hold-timeout must be between 100ms and {}, not {}",
                d(MAX_GROUP_HOLD_TIMEOUT),
                d(g.hold_timeout)
            )));
        }
        if let Some(every) = g.app_interval {
            if !(MIN_GROUP_APP_INTERVAL..=MAX_GROUP_APP_INTERVAL).contains(&every) {
                return Err(bad(format!(
                    "app-interval must be \"off\" or between 1h and 12h, not {}",
                    d(every)
                )));
            }
        }
        if g.quiesce_timeout < Duration::from_secs(1)
            || g.quiesce_timeout > MAX_GROUP_QUIESCE_TIMEOUT
        {
            return Err(bad(format!(
                "quiesce-timeout must be between 1s and {}, not {}",
                d(MAX_GROUP_QUIESCE_TIMEOUT),
                d(g.quiesce_timeout)
            )));
        }
    }
    Ok(())
}

/// Retention defaults: a day of history, every point for the last two hours.
pub const DEFAULT_KEEP: Duration = Duration::from_secs(24 * 3600);
pub const MAX_KEEP: Duration = Duration::from_secs(30 * 24 * 3600);
pub const DEFAULT_FINE_WINDOW: Duration = Duration::from_secs(2 * 3600);
pub const DEFAULT_COMPACT_EVERY: Duration = Duration::from_secs(600);

/// One thinning tier: points older than `older-than` keep one per `every`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Tier {
    #[serde(with = "humantime_serde")]
    pub older_than: Duration,
    #[serde(with = "humantime_serde")]
    pub every: Duration,
}

fn default_keep() -> Duration {
    DEFAULT_KEEP
}
fn default_fine_window() -> Duration {
    DEFAULT_FINE_WINDOW
}
pub const DEFAULT_READER_GRACE: Duration = Duration::from_secs(3600);
fn default_reader_grace() -> Duration {
    DEFAULT_READER_GRACE
}
fn default_compact_every() -> Duration {
    DEFAULT_COMPACT_EVERY
}
fn default_tiers() -> Vec<Tier> {
    vec![
        Tier {
            older_than: DEFAULT_FINE_WINDOW,
            every: Duration::from_secs(3600),
        },
        Tier {
            older_than: Duration::from_secs(24 * 3600),
            every: Duration::from_secs(24 * 3600),
        },
    ]
}

/// `[retention]` of ps.toml (see `compact.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Retention {
    /// History kept: older points are folded into a base and deleted.
    #[serde(default = "default_keep", with = "humantime_serde")]
    pub keep: Duration,
    /// Every point younger than this is kept (and `--time` recovers to the second).
    #[serde(default = "default_fine_window", with = "humantime_serde")]
    pub fine_window: Duration,
    /// Thinning beyond the fine window, by increasing age.
    #[serde(default = "default_tiers")]
    pub tiers: Vec<Tier>,
    /// App-consistent points keep one per this much time beyond the fine
    /// window; 0 keeps every one (until `keep`).
    #[serde(default, with = "humantime_serde")]
    pub app_every: Duration,
    /// How often retention runs per machine.
    #[serde(default = "default_compact_every", with = "humantime_serde")]
    pub compact_every: Duration,
    /// What a new base replaces is deleted only this long after the base
    /// was stored, so that a failover or verify that began from the older
    /// base still finds what it reads.
    #[serde(default = "default_reader_grace", with = "humantime_serde")]
    pub reader_grace: Duration,
    /// Work files of a fold (sparse images of the changed chunks); default
    /// `<cache-dir>/fold`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_dir: Option<PathBuf>,
}

impl Default for Retention {
    fn default() -> Retention {
        Retention {
            keep: DEFAULT_KEEP,
            fine_window: DEFAULT_FINE_WINDOW,
            tiers: default_tiers(),
            app_every: Duration::ZERO,
            compact_every: DEFAULT_COMPACT_EVERY,
            reader_grace: DEFAULT_READER_GRACE,
            work_dir: None,
        }
    }
}

impl Retention {
    fn check(&self, path: &Path) -> Result<()> {
        let d = humantime::format_duration;
        let bad = |what: String| anyhow::anyhow!("{}: [retention] {what}", path.display());
        if self.keep < Duration::from_secs(10) || self.keep > MAX_KEEP {
            return Err(bad(format!(
                "keep must be between 10s and 30days, not {}",
                d(self.keep)
            )));
        }
        if self.fine_window > self.keep {
            return Err(bad(format!(
                "fine-window ({}) must not exceed keep ({})",
                d(self.fine_window),
                d(self.keep)
            )));
        }
        if self.compact_every < Duration::from_secs(1)
            || self.compact_every > Duration::from_secs(24 * 3600)
        {
            return Err(bad(format!(
                "compact-every must be between 1s and 24h, not {}",
                d(self.compact_every)
            )));
        }
        if self.reader_grace > Duration::from_secs(7 * 24 * 3600) {
            return Err(bad(format!(
                "reader-grace must be at most 7days, not {}",
                d(self.reader_grace)
            )));
        }
        let mut prev = Duration::ZERO;
        for t in &self.tiers {
            if t.older_than < self.fine_window || t.older_than < prev || t.every.is_zero() {
                return Err(bad(format!(
                    "tiers must be in increasing older-than order, none younger than fine-window ({}), each with a non-zero every (found older-than = {}, every = {})",
                    d(self.fine_window),
                    d(t.older_than),
                    d(t.every)
                )));
            }
            prev = t.older_than;
        }
        Ok(())
    }
}

impl PsConfig {
    pub fn load(path: &Path) -> Result<PsConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        let mut cfg: PsConfig =
            toml::from_str(&text).with_context(|| format!("parsing config {}", path.display()))?;
        // Relative paths are relative to the config file's directory.
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut cfg.cache_dir,
            &mut cfg.ca_cert,
            &mut cfg.server_cert,
            &mut cfg.server_key,
            &mut cfg.kek_file,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(r) = cfg.registration.as_mut() {
            for p in [&mut r.ca_key, &mut r.dir] {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
        }
        {
            let b = &cfg.bandwidth;
            b.upload
                .validate()
                .map_err(|e| anyhow::anyhow!("{}: [bandwidth] upload: {e}", path.display()))?;
            let mut seen = std::collections::BTreeSet::new();
            for m in &b.machine {
                m.upload.validate().map_err(|e| {
                    anyhow::anyhow!("{}: [[bandwidth.machine]] {}: {e}", path.display(), m.name)
                })?;
                if !seen.insert(m.name.as_str()) {
                    anyhow::bail!(
                        "{}: [[bandwidth.machine]] {} is listed twice",
                        path.display(),
                        m.name
                    );
                }
            }
        }
        if cfg.segment_max_bytes == 0 || cfg.segment_max_bytes > 256 * 1024 * 1024 {
            anyhow::bail!(
                "{}: segment-max-bytes must be between 1 and 268435456",
                path.display()
            );
        }
        for (key, d, min, max) in [
            (
                "handshake-timeout",
                cfg.handshake_timeout,
                Duration::from_millis(100),
                Duration::from_secs(300),
            ),
            (
                "hello-timeout",
                cfg.hello_timeout,
                Duration::from_millis(100),
                Duration::from_secs(300),
            ),
            (
                "segment-max-age",
                cfg.segment_max_age,
                Duration::from_millis(100),
                Duration::from_secs(3600),
            ),
            // Above the agents' ping interval (10 s) with room to spare.
            (
                "idle-timeout",
                cfg.idle_timeout,
                Duration::from_secs(20),
                Duration::from_secs(3600),
            ),
        ] {
            if d < min || d > max {
                anyhow::bail!(
                    "{}: {key} must be between {} and {}, not {}",
                    path.display(),
                    humantime::format_duration(min),
                    humantime::format_duration(max),
                    humantime::format_duration(d)
                );
            }
        }
        if cfg.max_connections_per_source == 0 {
            anyhow::bail!(
                "{}: max-connections-per-source must be at least 1",
                path.display()
            );
        }
        if !(0..=22).contains(&cfg.zstd_level) {
            anyhow::bail!(
                "{}: zstd-level must be between 0 (store) and 22, not {}",
                path.display(),
                cfg.zstd_level
            );
        }
        cfg.retention.check(path)?;
        cfg.alerts.check(path)?;
        if cfg.health.backpressure_free > 50 {
            anyhow::bail!(
                "{}: [health] backpressure-free must be between 0 (off) and 50 (percent), not {}",
                path.display(),
                cfg.health.backpressure_free
            );
        }
        if let Some(h) = &mut cfg.http {
            if h.token_file.is_relative() {
                h.token_file = base.join(&h.token_file);
            }
        }
        check_groups(&cfg.group, path)?;
        if let Some(w) = &mut cfg.retention.work_dir {
            if w.is_relative() {
                *w = base.join(&*w);
            }
        }
        if cfg.upload_concurrency == 0 {
            anyhow::bail!("{}: upload-concurrency must be at least 1", path.display());
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/examples/ps.toml");
        let cfg = PsConfig::load(&path).unwrap();
        // The example shows every default it names as one.
        assert_eq!(cfg.segment_max_bytes, DEFAULT_SEGMENT_MAX_BYTES);
        assert_eq!(cfg.segment_max_age, DEFAULT_SEGMENT_MAX_AGE);
        assert_eq!(cfg.zstd_level, DEFAULT_ZSTD_LEVEL);
        assert_eq!(cfg.upload_concurrency, DEFAULT_UPLOAD_CONCURRENCY);
        assert_eq!(cfg.handshake_timeout, DEFAULT_HANDSHAKE_TIMEOUT);
        assert_eq!(cfg.hello_timeout, DEFAULT_HELLO_TIMEOUT);
        assert_eq!(cfg.idle_timeout, DEFAULT_IDLE_TIMEOUT);
        assert_eq!(
            cfg.max_connections_per_source,
            DEFAULT_MAX_CONNECTIONS_PER_SOURCE
        );
        assert_eq!(cfg.retention, Retention::default());
        assert!(cfg.store.url.starts_with("s3://"));
        assert_eq!(cfg.group.len(), 1);
        assert_eq!(cfg.group[0].every, DEFAULT_GROUP_EVERY);
        assert_eq!(cfg.group[0].hold_timeout, DEFAULT_GROUP_HOLD_TIMEOUT);
        assert_eq!(cfg.group[0].app_interval, Some(DEFAULT_GROUP_APP_INTERVAL));
        assert_eq!(cfg.group[0].quiesce_timeout, DEFAULT_GROUP_QUIESCE_TIMEOUT);
        let http = cfg.http.as_ref().unwrap();
        assert!(http.token_file.ends_with("http.token"));
        assert_eq!(cfg.alerts.rpo_alert, DEFAULT_RPO_ALERT);
        assert_eq!(cfg.health, HealthConfig::default());
        assert_eq!(cfg.alerts.webhook_timeout, DEFAULT_WEBHOOK_TIMEOUT);
        assert_eq!(cfg.alerts.rpo_alert_of("db-1"), Duration::from_secs(300));
        assert_eq!(cfg.alerts.rpo_alert_of("other"), DEFAULT_RPO_ALERT);
    }

    #[test]
    fn bad_alerts_are_refused_by_name() {
        let p = Path::new("ps.toml");
        let parse = |t: &str| toml::from_str::<AlertsConfig>(t).unwrap();
        assert!(parse("").check(p).is_ok());
        for (text, want) in [
            ("rpo-alert = \"0s\"", "rpo-alert must be between"),
            ("webhook = \"ftp://x\"", "http:// or https://"),
            ("webhook = \"not a url\"", "is not a URL"),
            ("webhook-timeout = \"10m\"", "webhook-timeout"),
            (
                "[[machine]]\nname = \"a\"\nrpo-alert = \"1m\"\n[[machine]]\nname = \"a\"\nrpo-alert = \"2m\"",
                "listed twice",
            ),
        ] {
            let e = parse(text).check(p).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn a_groups_app_interval_is_a_duration_or_off() {
        let parse = |extra: &str| -> GroupConfig {
            toml::from_str(&format!("name = \"g\"\nmachines = [\"a\", \"b\"]\n{extra}")).unwrap()
        };
        assert_eq!(parse("").app_interval, Some(DEFAULT_GROUP_APP_INTERVAL));
        assert_eq!(parse("app-interval = \"off\"").app_interval, None);
        assert_eq!(
            parse("app-interval = \"2h\"").app_interval,
            Some(Duration::from_secs(7200))
        );
        let e =
            toml::from_str::<GroupConfig>("name = \"g\"\nmachines = []\napp-interval = \"never\"")
                .unwrap_err()
                .to_string();
        assert!(e.contains("off"), "{e}");
    }

    #[test]
    fn bad_groups_are_refused_by_name() {
        let g = |name: &str, machines: &[&str]| GroupConfig {
            name: name.into(),
            machines: machines.iter().map(|m| m.to_string()).collect(),
            every: DEFAULT_GROUP_EVERY,
            hold_timeout: DEFAULT_GROUP_HOLD_TIMEOUT,
            app_interval: Some(DEFAULT_GROUP_APP_INTERVAL),
            quiesce_timeout: DEFAULT_GROUP_QUIESCE_TIMEOUT,
        };
        let p = Path::new("ps.toml");
        assert!(check_groups(&[g("db", &["a", "b"]), g("web", &["c", "d"])], p).is_ok());
        for (groups, want) in [
            (vec![g("db", &["a"])], "at least 2"),
            (vec![g("db", &["a", "a"])], "twice"),
            (
                vec![g("db", &["a", "b"]), g("web", &["b", "c"])],
                "already in group \"db\"",
            ),
            (
                vec![g("db", &["a", "b"]), g("db", &["c", "d"])],
                "second group",
            ),
            (vec![g("../x", &["a", "b"])], "group"),
            (
                vec![GroupConfig {
                    hold_timeout: Duration::from_secs(600),
                    ..g("db", &["a", "b"])
                }],
                "hold-timeout",
            ),
            (
                vec![GroupConfig {
                    app_interval: Some(Duration::from_secs(600)),
                    ..g("db", &["a", "b"])
                }],
                "app-interval must be \"off\" or between 1h and 12h",
            ),
            (
                vec![GroupConfig {
                    quiesce_timeout: Duration::from_millis(10),
                    ..g("db", &["a", "b"])
                }],
                "quiesce-timeout",
            ),
        ] {
            let e = check_groups(&groups, p).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }
}
