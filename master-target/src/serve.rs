//! The master target server (`lifeboat-mt serve --config mt.toml`): accepts
//! the agents' protocol with mutual TLS on its own port, through the shared
//! receiving code (`lifeboat_common::receiver`), and applies each machine's
//! stream to its target disks (image files or block devices) in seq order.
//!
//! ```toml
//! listen = "0.0.0.0:9445"
//! ca-cert = "/var/lib/lifeboat-ps/ca.pem"         # the CA of the agents' certificates
//! server-cert = "/etc/lifeboat/mt/server.pem"     # this server's, from that CA
//! server-key = "/etc/lifeboat/mt/server.key"
//! state-dir = "/var/lib/lifeboat-mt"              # one applied position per machine
//!
//! [[machine]]
//! name = "web-1"
//! disks = { root = "/dev/sdb", data = "/srv/onprem/web-1-data.img" }
//! ```
//!
//! Applying (the sink's append): writes and zeroes go to the disk's target
//! at their offsets, a resize sets an image file's length; tags, checksums
//! and sync marks change no byte. Then every target touched is synced, and
//! only then the applied position (`<state-dir>/<machine>.applied`, record
//! `LBAP`: the seq, the stream id and each disk's size at that seq) is
//! replaced durably and acknowledged.
//! A restart resumes after that position: an entry applied but not yet
//! recorded is applied again, in order, which leaves the same bytes (each
//! entry sets its range), so the disks end as if each entry were applied
//! exactly once.
//!
//! Checksum resync: the replica's block hashes are its targets' blocks read
//! back and hashed, so only blocks that differ are resent (the agent
//! resyncs by itself after it lost its state, or after a resize).
//!
//! Machines come from the config's `[[machine]]` tables and from
//! `<state-dir>/machines.d/<machine>.toml` (one such table each), which
//! `lifeboat-mt reprotect` writes; those are read at each session's start,
//! so a reprotect needs no restart.
//!
//! The control socket (`<state-dir>/control.sock`, mode 0600), one JSON
//! request and one reply per line:
//!
//! ```text
//! {"cmd":"status"}  → {"ok":true,"machines":[{machine, connected, state, applied-seq,
//!                      last-point, disks:[{id,target,size}], received:{..}}]}
//! {"cmd":"final-point","machine":M,"quiesce-ms":N,"timeout-ms":T}
//!                   → {"ok":true,"seq":S,"kind":..,"applied-seq":S,"verified":[{disk,equal,..}]}
//! ```
//!
//! `final-point` is a failback's last step: the agent's final point, asked
//! through its session as a planned failover asks it
//! (`lifeboat_common::receiver::finalpoint`), applied here, and the agent's
//! checksums at that point (its SUMS entry) compared with the targets'
//! own, hashed here.
//!
//! A machine not in the config, a disk of the hello without a target (a
//! retired one is skipped), a block device smaller than its disk, a target
//! missing after entries were applied to it (an image file is created only
//! before), or one that cannot be opened is refused at the session's start,
//! naming it; the agent keeps its journal and retries. At open a file only
//! grows, to the disk's size at the applied position (not the hello's: a
//! replay after a crash may write past a shrink it then applies again).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use lifeboat_common::formats::AppliedPosition;
use lifeboat_common::protocol::{DiskInfo, Entry, Op, StreamId};
use lifeboat_common::receiver::{serve_tls, Deadlines, Opened, Sessions, StreamSink};
use lifeboat_common::resync::{BlockHash, HashScheme, BLOCK};
use lifeboat_common::tls;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Time for a TLS handshake, and for the hello after it.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// A session with nothing received for this long is closed (the agent
/// pings every 10 s).
const IDLE_TIMEOUT: Duration = Duration::from_secs(45);

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// The CA's revocation list (the process server's
    /// `<registration dir>/revoked.crl`), checked at every handshake.
    #[serde(default)]
    pub crl_file: Option<PathBuf>,
    pub state_dir: PathBuf,
    #[serde(default, rename = "machine")]
    pub machines: Vec<MachineTargets>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct MachineTargets {
    pub name: String,
    /// Disk id → target (an image file or a block device).
    /// Disk id → target (image file or block device).
    pub disks: BTreeMap<String, PathBuf>,
}

impl ServeConfig {
    /// Reads and checks `path`; relative paths are taken from its directory.
    pub fn load(path: &Path) -> Result<ServeConfig> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut cfg: ServeConfig =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let absolute = std::path::absolute(path)
            .with_context(|| format!("making {} absolute", path.display()))?;
        let base = absolute.parent().unwrap_or(Path::new("/"));
        for p in [
            &mut cfg.ca_cert,
            &mut cfg.server_cert,
            &mut cfg.server_key,
            &mut cfg.state_dir,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(p) = cfg.crl_file.as_mut().filter(|p| p.is_relative()) {
            *p = base.join(&*p);
        }
        let mut seen = std::collections::BTreeSet::new();
        let mut targets = std::collections::BTreeMap::new();
        for m in &mut cfg.machines {
            lifeboat_common::ids::validate_id("machine", &m.name)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            if !seen.insert(m.name.clone()) {
                bail!("{}: machine {} is listed twice", path.display(), m.name);
            }
            for (disk, t) in &mut m.disks {
                if t.is_relative() {
                    *t = base.join(&*t);
                }
                if let Some(other) =
                    targets.insert(target_identity(t), format!("{}/{disk}", m.name))
                {
                    bail!(
                        "{}: {} is the target of {other} and of {}/{disk}: each disk needs its own",
                        path.display(),
                        t.display(),
                        m.name
                    );
                }
            }
        }
        Ok(cfg)
    }
}

/// What a target path names, in one spelling, to find a target used twice:
/// the canonical path (symlinks such as `/dev/disk/by-id/…` and `..`
/// resolved) where it exists, else the absolute path.
pub fn target_identity(p: &Path) -> PathBuf {
    std::fs::canonicalize(p)
        .or_else(|_| std::path::absolute(p))
        .unwrap_or_else(|_| p.to_path_buf())
}

/// `<state-dir>/machines.d`: the machines `lifeboat-mt reprotect` registered.
pub fn machines_d(state_dir: &Path) -> PathBuf {
    state_dir.join("machines.d")
}

/// The control socket of a server with this state directory.
pub fn control_socket(state_dir: &Path) -> PathBuf {
    state_dir.join("control.sock")
}

/// The machines `machines.d` holds a registration for.
pub fn registered_names(state_dir: &Path) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(machines_d(state_dir)) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_suffix(".toml").map(str::to_string)
        })
        .collect()
}

/// Reads `machines.d/<machine>.toml` (`None`: not registered).
pub fn load_registered(state_dir: &Path, machine: &str) -> Result<Option<MachineTargets>> {
    let path = machines_d(state_dir).join(format!("{machine}.toml"));
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let m: MachineTargets =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    if m.name != machine {
        bail!("{} names machine {:?}", path.display(), m.name);
    }
    if let Some((disk, t)) = m.disks.iter().find(|(_, t)| t.is_relative()) {
        bail!(
            "{}: the target of disk {disk}, {}, is not an absolute path",
            path.display(),
            t.display()
        );
    }
    let mut seen = BTreeMap::new();
    for (disk, t) in &m.disks {
        if let Some(other) = seen.insert(target_identity(t), disk) {
            bail!(
                "{}: {} is the target of disks {other} and {disk}: each disk needs its own",
                path.display(),
                t.display()
            );
        }
    }
    Ok(Some(m))
}

/// Writes `machines.d/<machine>.toml` durably.
pub fn store_registered(state_dir: &Path, m: &MachineTargets) -> Result<PathBuf> {
    let dir = machines_d(state_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{}.toml", m.name));
    let text = format!(
        "# Registered by `lifeboat-mt reprotect`: the master target applies\n\
         # {}'s stream to these disks.\n{}",
        m.name,
        toml::to_string(m).with_context(|| format!("the targets of {}", m.name))?
    );
    lifeboat_common::fsutil::replace_file_mode(&path, text.as_bytes(), 0o644)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// What `<state-dir>/<machine>.applied` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Applied {
    /// Every entry up to this seq is on the target disks.
    pub seq: u64,
    /// The numbering it belongs to (hex).
    pub stream_id: String,
    /// Each disk's size in the stream at `seq` (by disk id): a replay after
    /// a crash checks its writes against these, not the agent's size now.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sizes: BTreeMap<String, u64>,
    /// The last checksums the agent sent up to `seq` (a point's), kept with
    /// the position: a failback's final point is verifiable after a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sums: Option<AppliedSums>,
}

/// The checksums of a point: its seq and, per disk number, size and
/// `lifeboat-disk-v1` sum (hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct AppliedSums {
    pub point: u64,
    pub disks: Vec<(u16, u64, String)>,
}

impl AppliedSums {
    fn new(point: u64, disks: &[lifeboat_common::protocol::DiskSum]) -> AppliedSums {
        AppliedSums {
            point,
            disks: disks
                .iter()
                .map(|d| (d.disk, d.size, lifeboat_common::hex(&d.sum)))
                .collect(),
        }
    }

    fn sums(&self) -> Option<(u64, Vec<lifeboat_common::protocol::DiskSum>)> {
        let disks = self
            .disks
            .iter()
            .map(|(disk, size, sum)| {
                Some(lifeboat_common::protocol::DiskSum {
                    disk: *disk,
                    size: *size,
                    sum: lifeboat_common::unhex::<32>(sum)?,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some((self.point, disks))
    }
}

fn applied_path(state_dir: &Path, machine: &str) -> PathBuf {
    state_dir.join(format!("{machine}.applied"))
}

/// Reads a machine's applied position (`None`: nothing applied yet).
pub fn load_applied(state_dir: &Path, machine: &str) -> Result<Option<Applied>> {
    lifeboat_common::fsutil::load_record::<AppliedPosition, _>(&applied_path(state_dir, machine))
}

fn store_applied(state_dir: &Path, machine: &str, a: &Applied) -> Result<()> {
    lifeboat_common::fsutil::store_record::<AppliedPosition, _>(
        &applied_path(state_dir, machine),
        a,
        0o600,
    )
}

/// One target disk, open.
struct Target {
    id: String,
    path: PathBuf,
    file: std::fs::File,
    /// A block device: its size is fixed.
    device: bool,
    /// The disk's size as the stream last said.
    size: u64,
}

impl Target {
    /// Opens the target of disk `id` whose size in the stream is `size`. A
    /// missing file is created only when nothing was applied yet (`fresh`),
    /// and never under /dev; a file only grows here (a shrink is a resize
    /// entry of the stream).
    fn open(id: &str, path: &Path, size: u64, fresh: bool) -> Result<Target> {
        let exists = path.exists();
        if !exists && (!fresh || path.starts_with("/dev")) {
            bail!(
                "the target of disk {id}, {}, does not exist{}",
                path.display(),
                if fresh {
                    " (a block device must be there; only image files are created)".to_string()
                } else {
                    " though entries were applied to it: restore it, or remove the machine's .applied file in state-dir to start over (the agent then resyncs the whole disk)".to_string()
                }
            );
        }
        let is_device = {
            use std::os::unix::fs::FileTypeExt;
            std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
        };
        let mut opts = std::fs::OpenOptions::new();
        opts.read(true).write(true).create(!exists).truncate(false);
        if is_device {
            // A device mounted or opened exclusively elsewhere is refused
            // (EBUSY) rather than written under its user.
            use std::os::unix::fs::OpenOptionsExt;
            opts.custom_flags(libc::O_EXCL);
        }
        let file = opts.open(path).with_context(|| {
            format!(
                "opening the target of disk {id}, {}{}",
                path.display(),
                if is_device {
                    " (a block device must not be mounted or in use)"
                } else {
                    ""
                }
            )
        })?;
        if !exists {
            lifeboat_common::fsutil::sync_parent(path)
                .with_context(|| format!("creating {}", path.display()))?;
        }
        let meta = file.metadata()?;
        let device = {
            use std::os::unix::fs::FileTypeExt;
            meta.file_type().is_block_device()
        };
        let mut t = Target {
            id: id.to_string(),
            path: path.to_path_buf(),
            file,
            device,
            size,
        };
        if t.device || t.capacity()? < size {
            t.resize(size)?;
        }
        Ok(t)
    }

    fn capacity(&self) -> Result<u64> {
        if self.device {
            use std::io::{Seek, SeekFrom};
            let mut f = &self.file;
            return Ok(f.seek(SeekFrom::End(0))?);
        }
        Ok(self.file.metadata()?.len())
    }

    /// A file takes the disk's size; a device must hold it.
    fn resize(&mut self, size: u64) -> Result<()> {
        if self.device {
            let cap = self.capacity()?;
            if cap < size {
                bail!(
                    "the target of disk {}, {}, holds {cap} bytes: the disk has {size}",
                    self.id,
                    self.path.display()
                );
            }
        } else if self.capacity()? != size {
            self.file
                .set_len(size)
                .with_context(|| format!("sizing {} to {size} bytes", self.path.display()))?;
        }
        self.size = size;
        Ok(())
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            bail!(
                "an entry for disk {} writes {len} bytes at {offset}, past its size {}",
                self.id,
                self.size
            );
        }
        Ok(())
    }

    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len)?;
        if !self.device {
            use std::os::fd::AsRawFd;
            // SAFETY: fallocate on a descriptor this target owns.
            let r = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_ZERO_RANGE,
                    offset as libc::off_t,
                    len as libc::off_t,
                )
            };
            if r == 0 {
                return Ok(());
            }
        }
        static ZEROS: [u8; 1 << 20] = [0; 1 << 20];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(ZEROS.len() as u64) as usize;
            self.file
                .write_all_at(&ZEROS[..n], at)
                .with_context(|| format!("zeroing {}", self.path.display()))?;
            at += n as u64;
        }
        Ok(())
    }
}

/// A machine's targets by disk number (`None`: a retired disk without a
/// target, whose entries are skipped), its applied position, and what its
/// stream brought.
struct MachineState {
    targets: Vec<Option<Target>>,
    applied: Applied,
    received: Received,
}

/// What a machine's stream brought since this server started (status, and
/// the figures a reprotect and a failback report). An entry applied again
/// after a crash counts again.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Received {
    pub entries: u64,
    /// Bytes of writes applied to the targets.
    pub write_bytes: u64,
    pub zero_bytes: u64,
    /// Blocks read back and hashed for the agent's checksum resyncs.
    pub hashed_blocks: u64,
    /// The seq of the last tag applied: the targets held that point then.
    pub last_point: Option<u64>,
    /// From an inconsistent mark to the next tag (an initial sync or a
    /// resync under way): the mark's label.
    pub inconsistent: Option<String>,
    /// The last checksums the agent sent: the point's seq and each disk's.
    #[serde(skip)]
    pub sums: Option<(u64, Vec<lifeboat_common::protocol::DiskSum>)>,
}

/// The master target's sink: the machines' target disks.
pub struct DiskSink {
    state_dir: PathBuf,
    machines: BTreeMap<String, BTreeMap<String, PathBuf>>,
    open: Mutex<HashMap<String, Arc<Mutex<MachineState>>>>,
}

impl DiskSink {
    pub fn new(cfg: &ServeConfig) -> Result<DiskSink> {
        std::fs::create_dir_all(&cfg.state_dir)
            .with_context(|| format!("creating {}", cfg.state_dir.display()))?;
        Ok(DiskSink {
            state_dir: cfg.state_dir.clone(),
            machines: cfg
                .machines
                .iter()
                .map(|m| (m.name.clone(), m.disks.clone()))
                .collect(),
            open: Mutex::new(HashMap::new()),
        })
    }

    fn state(&self, machine: &str) -> Result<Arc<Mutex<MachineState>>> {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(machine)
            .cloned()
            .with_context(|| format!("no session of {machine} opened its disks"))
    }

    /// The targets of `machine`: from the config, else registered by
    /// `lifeboat-mt reprotect` (read now, so a new registration needs no restart).
    fn targets_of(&self, machine: &str) -> Result<BTreeMap<String, PathBuf>> {
        if let Some(t) = self.machines.get(machine) {
            return Ok(t.clone());
        }
        match load_registered(&self.state_dir, machine)? {
            Some(m) => Ok(m.disks),
            None => bail!(
                "machine {machine} is not in this master target's config ([[machine]] name = \"{machine}\") \
                 and `lifeboat-mt reprotect` registered no targets for it ({})",
                machines_d(&self.state_dir).display()
            ),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Applies consecutive entries and records the position (see the header).
/// On an error the position and counters in memory are put back as they
/// were: nothing may count as applied (a final point's wait, `status`) that
/// was not synced and recorded.
fn apply(state_dir: &Path, machine: &str, st: &mut MachineState, entries: &[Entry]) -> Result<u64> {
    let saved = (st.applied.clone(), st.received.clone());
    let r = apply_unsaved(state_dir, machine, st, entries);
    if r.is_err() {
        (st.applied, st.received) = saved;
    }
    r
}

fn apply_unsaved(
    state_dir: &Path,
    machine: &str,
    st: &mut MachineState,
    entries: &[Entry],
) -> Result<u64> {
    let mut touched = std::collections::BTreeSet::new();
    // `None`: a retired disk without a target (its entries are skipped).
    let target = |st: &mut MachineState, disk: u16| -> Result<Option<usize>> {
        let i = disk as usize;
        match st.targets.get(i) {
            Some(Some(_)) => Ok(Some(i)),
            Some(None) => Ok(None),
            None => {
                bail!("an entry names disk number {disk}, which {machine}'s hello did not list")
            }
        }
    };
    for e in entries {
        if e.seq != st.applied.seq + 1 {
            bail!(
                "entry seq {} does not follow the applied position {} of {machine}",
                e.seq,
                st.applied.seq
            );
        }
        match &e.op {
            Op::Write { disk, offset, data } => {
                if let Some(i) = target(st, *disk)? {
                    let t = st.targets[i].as_ref().expect("checked");
                    t.check(*offset, data.len() as u64)?;
                    t.file.write_all_at(data, *offset).with_context(|| {
                        format!("writing disk {} of {machine} to {}", t.id, t.path.display())
                    })?;
                    st.received.write_bytes += data.len() as u64;
                    touched.insert(i);
                }
            }
            Op::Zero { disk, offset, len } => {
                if let Some(i) = target(st, *disk)? {
                    let t = st.targets[i].as_ref().expect("checked");
                    t.zero(*offset, u64::from(*len))
                        .with_context(|| format!("disk {} of {machine}", t.id))?;
                    st.received.zero_bytes += u64::from(*len);
                    touched.insert(i);
                }
            }
            Op::Resize { disk, size } => {
                if let Some(i) = target(st, *disk)? {
                    st.targets[i].as_mut().expect("checked").resize(*size)?;
                    touched.insert(i);
                }
            }
            Op::Tag { .. } => {
                st.received.last_point = Some(e.seq);
                st.received.inconsistent = None;
            }
            Op::Inconsistent { label } => st.received.inconsistent = Some(label.clone()),
            Op::Sums { point, disks } => {
                st.received.sums = Some((*point, disks.clone()));
                st.applied.sums = Some(AppliedSums::new(*point, disks));
            }
            // This sink hashes its disks when asked (`block_hashes`).
            Op::Hashes { .. } => {}
        }
        st.received.entries += 1;
        st.applied.seq = e.seq;
    }
    for i in touched {
        let t = st.targets[i].as_ref().expect("touched");
        t.file
            .sync_data()
            .with_context(|| format!("syncing disk {} of {machine}, {}", t.id, t.path.display()))?;
    }
    st.applied.sizes = st
        .targets
        .iter()
        .flatten()
        .map(|t| (t.id.clone(), t.size))
        .collect();
    store_applied(state_dir, machine, &st.applied)?;
    Ok(st.applied.seq)
}

impl StreamSink for DiskSink {
    /// Keeps the first stream id it applied; another one changes nothing
    /// here (the agent rebases onto this numbering, then resyncs).
    async fn open(&self, machine: &str, disks: &[DiskInfo], stream_id: StreamId) -> Result<Opened> {
        let paths = self.targets_of(machine)?;
        // What earlier sessions of this machine brought stays counted. The
        // earlier session's state goes first: its targets are open with
        // O_EXCL, which a block device grants once.
        let earlier = lock(&self.open).remove(machine);
        let received = earlier
            .map(|st| lock(&st).received.clone())
            .unwrap_or_default();
        let (dir, m, disks) = (self.state_dir.clone(), machine.to_string(), disks.to_vec());
        let st = tokio::task::spawn_blocking(move || -> Result<MachineState> {
            let applied = match load_applied(&dir, &m)? {
                Some(a) => a,
                None => {
                    let a = Applied {
                        seq: 0,
                        stream_id: lifeboat_common::hex(&stream_id),
                        sizes: BTreeMap::new(),
                        sums: None,
                    };
                    store_applied(&dir, &m, &a)?;
                    a
                }
            };
            let fresh = applied.seq == 0;
            let mut targets = Vec::new();
            for d in &disks {
                // The size at the applied position; the hello's is the
                // agent's now, which the stream's resize entries reach.
                let size = applied.sizes.get(&d.id).copied().unwrap_or(d.size);
                match paths.get(&d.id) {
                    Some(path) => targets.push(Some(Target::open(&d.id, path, size, fresh)?)),
                    None if d.retired => {
                        warn!(machine = %m, "disk {} is retired and has no target: its entries are skipped", d.id);
                        targets.push(None);
                    }
                    None => bail!(
                        "disk {} of {m} has no target in this master target's config (disks = {{ {} = \"...\" }})",
                        d.id,
                        d.id
                    ),
                }
            }
            // An agent of another numbering (a new reprotect's, fresh) starts
            // the counts again: `reprotect --wait` follows its resync, not an
            // earlier one's.
            let mut received = if lifeboat_common::hex(&stream_id) == applied.stream_id {
                received
            } else {
                Received::default()
            };
            // Checksums that came before a restart still verify a point.
            if received.sums.is_none() {
                received.sums = applied.sums.as_ref().and_then(AppliedSums::sums);
            }
            Ok(MachineState {
                targets,
                applied,
                received,
            })
        })
        .await??;
        let held = lifeboat_common::unhex::<16>(&st.applied.stream_id).with_context(|| {
            format!(
                "{} has a malformed stream id",
                applied_path(&self.state_dir, machine).display()
            )
        })?;
        let durable = st.applied.seq;
        info!(
            machine,
            "applying to {} disk(s) from seq {}",
            st.targets.iter().flatten().count(),
            durable + 1
        );
        lock(&self.open).insert(machine.to_string(), Arc::new(Mutex::new(st)));
        Ok(Opened {
            durable,
            stream_id: held,
        })
    }

    async fn append(&self, machine: &str, entries: Vec<Entry>) -> Result<u64> {
        let st = self.state(machine)?;
        let (dir, m) = (self.state_dir.clone(), machine.to_string());
        tokio::task::spawn_blocking(move || apply(&dir, &m, &mut lock(&st), &entries)).await?
    }

    async fn block_hashes(
        &self,
        machine: &str,
        disk: u16,
        first: u64,
        count: u64,
        scheme: HashScheme,
    ) -> Result<Vec<BlockHash>> {
        let st = self.state(machine)?;
        let m = machine.to_string();
        tokio::task::spawn_blocking(move || -> Result<Vec<BlockHash>> {
            let mut st = lock(&st);
            st.received.hashed_blocks += count;
            let Some(Some(t)) = st.targets.get(disk as usize) else {
                bail!("{m} has no target for disk number {disk}");
            };
            let mut out = Vec::with_capacity(count as usize);
            let mut buf = vec![0u8; BLOCK as usize];
            for b in first..first + count {
                let at = b * BLOCK;
                let n = t.size.saturating_sub(at).min(BLOCK) as usize;
                t.file
                    .read_exact_at(&mut buf[..n], at)
                    .with_context(|| format!("reading {} at {at}", t.path.display()))?;
                out.push(scheme.block(&buf[..n]));
            }
            Ok(out)
        })
        .await?
    }
}

/// A control request (see the header).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    /// A failback's final point: asked, applied, verified.
    FinalPoint {
        machine: String,
        #[serde(rename = "quiesce-ms")]
        quiesce_ms: u64,
        /// How long the point may take to be applied and its checksums to come.
        #[serde(rename = "timeout-ms")]
        timeout_ms: u64,
    },
}

/// What the control socket answers from.
struct Control {
    sink: Arc<DiskSink>,
    sessions: Arc<Sessions>,
}

impl Control {
    async fn handle(&self, req: Request) -> serde_json::Value {
        let r = match req {
            Request::Status => self.status(),
            Request::FinalPoint {
                machine,
                quiesce_ms,
                timeout_ms,
            } => {
                self.final_point(
                    &machine,
                    Duration::from_millis(quiesce_ms),
                    Duration::from_millis(timeout_ms),
                )
                .await
            }
        };
        r.unwrap_or_else(|e| serde_json::json!({"ok": false, "error": format!("{e:#}")}))
    }

    /// Every machine of the config, registered or seen, with its session,
    /// position, targets and what it brought.
    fn status(&self) -> Result<serde_json::Value> {
        let sink = &self.sink;
        let mut names: std::collections::BTreeSet<String> = sink.machines.keys().cloned().collect();
        names.extend(registered_names(&sink.state_dir));
        names.extend(lock(&sink.open).keys().cloned());
        let mut machines = Vec::new();
        for m in names {
            let connected = self.sessions.session_of(&m).is_some();
            let open = lock(&sink.open).get(&m).cloned();
            let (applied, received, disks) = match &open {
                Some(st) => {
                    let st = lock(st);
                    let disks: Vec<_> = st
                        .targets
                        .iter()
                        .flatten()
                        .map(|t| serde_json::json!({"id": t.id, "target": t.path, "size": t.size}))
                        .collect();
                    (Some(st.applied.seq), st.received.clone(), disks)
                }
                None => {
                    let applied = load_applied(&sink.state_dir, &m)
                        .ok()
                        .flatten()
                        .map(|a| a.seq);
                    let disks = sink
                        .targets_of(&m)
                        .map(|t| {
                            t.iter()
                                .map(|(id, p)| serde_json::json!({"id": id, "target": p}))
                                .collect()
                        })
                        .unwrap_or_default();
                    (applied, Received::default(), disks)
                }
            };
            let state = match (connected, &received.inconsistent) {
                (false, _) => "disconnected".to_string(),
                (true, Some(label)) => format!("resync ({label})"),
                (true, None) => "streaming".to_string(),
            };
            machines.push(serde_json::json!({
                "machine": m,
                "source": if sink.machines.contains_key(&m) { "config" } else { "reprotect" },
                "connected": connected,
                "state": state,
                "applied-seq": applied,
                "last-point": received.last_point,
                "disks": disks,
                "received": received,
            }));
        }
        Ok(serde_json::json!({"ok": true, "machines": machines}))
    }

    /// Asks `machine`'s agent for its final point, waits until it is applied
    /// and the agent's checksums at it came, then compares them with the
    /// targets' own.
    async fn final_point(
        &self,
        machine: &str,
        quiesce: Duration,
        timeout: Duration,
    ) -> Result<serde_json::Value> {
        use lifeboat_common::receiver::finalpoint::{self, Failed};
        let fp = finalpoint::final_point(&self.sessions, machine, quiesce)
            .await
            .map_err(|e| match e {
                Failed::Refused(s) | Failed::Lost(s) => anyhow::anyhow!(s),
            })?;
        let deadline = tokio::time::Instant::now() + timeout;
        let st = loop {
            let st = self.sink.state(machine)?;
            let ready = {
                let g = lock(&st);
                (g.applied.seq, g.received.sums.as_ref().map(|s| s.0))
            };
            match ready {
                (applied, Some(p)) if applied >= fp.seq && p == fp.seq => break st,
                (applied, _) if tokio::time::Instant::now() >= deadline => bail!(
                    "the final point of {machine} is seq {}, and within {timeout:?} {}",
                    fp.seq,
                    if applied < fp.seq {
                        format!("only seq {applied} was applied (the agent refuses writes; ask again to wait longer)")
                    } else {
                        "the agent sent no checksums for it: the targets hold the point, unverified"
                            .into()
                    }
                ),
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        let m = machine.to_string();
        let (verified, applied, received) = tokio::task::spawn_blocking(move || -> Result<_> {
            // What to hash, taken under the lock; the hashing runs without it
            // (the agent refuses writes after its final point), so `status`
            // and sessions do not wait for whole disks to be read.
            let (sums, targets, applied, received) = {
                let st = lock(&st);
                let (_, sums) = st.received.sums.clone().expect("waited for");
                let mut targets = Vec::new();
                for t in &st.targets {
                    targets.push(match t {
                        Some(t) => Some(Target {
                            id: t.id.clone(),
                            path: t.path.clone(),
                            file: t
                                .file
                                .try_clone()
                                .with_context(|| format!("reopening {}", t.path.display()))?,
                            device: t.device,
                            size: t.size,
                        }),
                        None => None,
                    });
                }
                (sums, targets, st.applied.seq, st.received.clone())
            };
            let mut verified = Vec::new();
            // Every target is reported: one the agent sent no checksum for
            // (a read error on its side) is not equal, whatever the others say.
            for (i, t) in targets.iter().enumerate() {
                let Some(t) = t else {
                    continue; // retired, without a target
                };
                let Some(s) = sums.iter().find(|s| s.disk as usize == i) else {
                    verified.push(serde_json::json!({
                        "disk": t.id,
                        "target": t.path,
                        "size": t.size,
                        "equal": false,
                        "reason": "the agent sent no checksum for this disk at the final point",
                    }));
                    continue;
                };
                let got = lifeboat_common::disksum::sum_file(&t.file, t.size, 2, &|_| {})
                    .with_context(|| {
                        format!("hashing {} (disk {} of {m})", t.path.display(), t.id)
                    })?;
                verified.push(serde_json::json!({
                    "disk": t.id,
                    "target": t.path,
                    "size": t.size,
                    "expected": lifeboat_common::disksum::hex(&s.sum),
                    "got": lifeboat_common::disksum::hex(&got),
                    "equal": got == s.sum && t.size == s.size,
                }));
            }
            Ok((verified, applied, received))
        })
        .await??;
        info!(
            machine,
            seq = fp.seq,
            "failback final point applied and compared"
        );
        Ok(serde_json::json!({
            "ok": true,
            "machine": machine,
            "seq": fp.seq,
            "kind": fp.kind,
            "source": fp.source,
            "applied-seq": applied,
            "verified": verified,
            "received": received,
        }))
    }
}

/// Sends one request to a running `lifeboat-mt serve` whose state directory
/// is `state_dir`.
pub async fn request(state_dir: &Path, req: &Request) -> Result<serde_json::Value> {
    lifeboat_common::control::request_one(
        &control_socket(state_dir),
        "the master target",
        "lifeboat-mt serve",
        req,
    )
    .await
}

/// Runs the master target server until `shutdown`.
pub async fn run(cfg: ServeConfig, shutdown: CancellationToken) -> Result<()> {
    tls::install_crypto_provider();
    let tls_cfg = match &cfg.crl_file {
        Some(crl) => tls::server_config_revocable(
            &cfg.ca_cert,
            &cfg.server_cert,
            &cfg.server_key,
            crl,
            false,
        )?,
        None => tls::server_config(&cfg.ca_cert, &cfg.server_cert, &cfg.server_key)?,
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls_cfg);
    let sink = Arc::new(DiskSink::new(&cfg)?);
    // One server per state directory: a second would take the control
    // socket and apply to the same targets.
    let _lock = lifeboat_common::fsutil::DirLock::acquire(&cfg.state_dir).with_context(|| {
        format!(
            "another lifeboat-mt serve uses {} ({} is locked)",
            cfg.state_dir.display(),
            cfg.state_dir.join("lock").display()
        )
    })?;
    let sessions = Arc::new(Sessions::default());
    let control = Arc::new(Control {
        sink: sink.clone(),
        sessions: sessions.clone(),
    });
    let socket = control_socket(&cfg.state_dir);
    let listener = lifeboat_common::control::bind_private(&socket)?;
    let cancel = shutdown.clone();
    let control = lifeboat_common::spawn(async move {
        lifeboat_common::control::serve_requests(listener, &socket, cancel, move |req: Request| {
            let control = control.clone();
            async move { control.handle(req).await }
        })
        .await
    });
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("listening on {} (listen)", cfg.listen))?;
    info!(
        "lifeboat-mt serving {} machine(s) on {}",
        cfg.machines.len(),
        listener.local_addr()?
    );
    let conns = tokio_util::task::TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, sink, sessions, shutdown) = (
            acceptor.clone(),
            sink.clone(),
            sessions.clone(),
            shutdown.clone(),
        );
        let deadlines = Deadlines {
            handshake: HANDSHAKE_TIMEOUT,
            hello: HELLO_TIMEOUT,
            idle: IDLE_TIMEOUT,
        };
        conns.spawn(async move {
            serve_tls(acceptor, tcp, peer, deadlines, sink, &sessions, shutdown).await
        });
    }
    conns.close();
    let _ = tokio::time::timeout(Duration::from_secs(10), conns.wait()).await;
    let _ = control.await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_applied_position_keeps_its_bytes() {
        let a = Applied {
            seq: 4242,
            stream_id: "00112233445566778899aabbccddeeff".into(),
            sizes: BTreeMap::new(),
            sums: None,
        };
        let bytes =
            lifeboat_common::formats::read_fixture::<AppliedPosition>("applied-position", || {
                lifeboat_common::formats::seal::<AppliedPosition>(&serde_json::to_vec(&a).unwrap())
            });
        let back: Applied = serde_json::from_slice(
            lifeboat_common::formats::open::<AppliedPosition>(&bytes).unwrap(),
        )
        .unwrap();
        assert_eq!(back, a);
    }

    #[test]
    fn entries_apply_in_order_and_a_replayed_suffix_leaves_the_same_bytes() {
        use bytes::Bytes;
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("root.img");
        let mut st = MachineState {
            targets: vec![Some(Target::open("root", &img, 1 << 20, true).unwrap())],
            applied: Applied {
                seq: 0,
                stream_id: "00".repeat(16),
                sizes: BTreeMap::new(),
                sums: None,
            },
            received: Received::default(),
        };
        let w = |seq, offset, b: u8, n: usize| Entry {
            seq,
            op: Op::Write {
                disk: 0,
                offset,
                data: Bytes::from(vec![b; n]),
            },
        };
        let entries = vec![
            w(1, 0, 0xaa, 8192),
            w(2, 4096, 0xbb, 512),
            Entry {
                seq: 3,
                op: Op::Zero {
                    disk: 0,
                    offset: 0,
                    len: 1024,
                },
            },
        ];
        assert_eq!(apply(dir.path(), "m", &mut st, &entries).unwrap(), 3);
        let once = std::fs::read(&img).unwrap();
        assert_eq!(&once[..1024], &[0u8; 1024][..]);
        assert_eq!(once[1024], 0xaa);
        assert_eq!(once[4096], 0xbb);
        assert_eq!(once[4608], 0xaa);
        assert_eq!(load_applied(dir.path(), "m").unwrap().unwrap().seq, 3);
        // A crash after applying 2..=3 but recording only 1: 2..=3 again.
        st.applied.seq = 1;
        apply(dir.path(), "m", &mut st, &entries[1..]).unwrap();
        assert_eq!(std::fs::read(&img).unwrap(), once);
        // A gap or a write past the disk is refused, naming it; the
        // position in memory stays where it was recorded.
        let e = apply(dir.path(), "m", &mut st, &[w(9, 0, 1, 1)]).unwrap_err();
        assert!(format!("{e:#}").contains("does not follow"), "{e:#}");
        let before = (st.applied.clone(), st.received.entries);
        let e = apply(dir.path(), "m", &mut st, &[w(4, 0, 7, 7), w(6, 0, 1, 1)]).unwrap_err();
        assert!(format!("{e:#}").contains("does not follow"), "{e:#}");
        assert_eq!((st.applied.clone(), st.received.entries), before);
        let e = apply(dir.path(), "m", &mut st, &[w(4, (1 << 20) - 1, 1, 2)]).unwrap_err();
        assert!(format!("{e:#}").contains("past its size"), "{e:#}");
        // A shrink recorded: reopened at the recorded size, the file is not
        // truncated by a larger hello nor grown by a smaller one.
        let shrink = Entry {
            seq: 4,
            op: Op::Resize {
                disk: 0,
                size: 1 << 19,
            },
        };
        apply(dir.path(), "m", &mut st, &[shrink]).unwrap();
        let a = load_applied(dir.path(), "m").unwrap().unwrap();
        assert_eq!(a.sizes.get("root"), Some(&(1 << 19)));
        // A point's checksums are kept with the position (a restart between
        // a failback's final point and its comparison still verifies it).
        let sums = vec![lifeboat_common::protocol::DiskSum {
            disk: 0,
            size: 1 << 19,
            sum: [7; 32],
        }];
        let sums_entry = Entry {
            seq: 5,
            op: Op::Sums {
                point: 4,
                disks: sums.clone(),
            },
        };
        apply(dir.path(), "m", &mut st, &[sums_entry]).unwrap();
        let a = load_applied(dir.path(), "m").unwrap().unwrap();
        assert_eq!(a.sums.and_then(|s| s.sums()), Some((4, sums)));
        assert_eq!(std::fs::metadata(&img).unwrap().len(), 1 << 19);
        // A target that vanished after entries were applied is refused.
        std::fs::remove_file(&img).unwrap();
        let e = Target::open("root", &img, 1 << 19, false).err().unwrap();
        assert!(
            format!("{e:#}").contains("does not exist though entries were applied"),
            "{e:#}"
        );
    }
}
