//! Registration of agents and the machines the CA issued certificates to.
//!
//! It owns the registration directory (`[registration] dir` of ps.toml):
//!
//! ```text
//! passphrase    the standing registration passphrase (0600; `rotate-passphrase`
//!               replaces it, the old one stops working at once)
//! registry.json every certificate issued (machine, serial, when, how, and
//!               when it was removed) and the one-time passphrases (their
//!               proof keys, which register as well as the passphrase does:
//!               the file is 0600; a used one records who used it and when)
//! revoked.crl   the CA-signed revocation list of every removed machine's
//!               certificates; the TLS listener reads it again whenever it
//!               changes, so a removal holds from the next handshake on
//! lock          flock'd around every read-modify-write of the above
//! ```
//!
//! Every change is written to a temporary file, synced, renamed over the old
//! one and the directory synced, so a crash leaves the old or the new state.
//! Passphrases are printed by the commands that make them and never logged.
//!
//! The server side of a registration connection (`register.rs` has the wire
//! format): a client without a certificate sends one `register`; its proof
//! must check against the standing passphrase or an unused one-time one; the
//! machine must not hold a certificate that is not revoked; then the CA signs
//! the request's key for the machine, the registry records it (and uses up a
//! one-time passphrase) before the reply goes out.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use lifeboat_common::ids::validate_id;
use lifeboat_common::register::{self as reg, refusal, Message, Reply, Request};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::config::RegistrationConfig;
use crate::pki;

pub const PASSPHRASE_FILE: &str = "passphrase";
pub const REGISTRY_FILE: &str = "registry.json";
pub const CRL_FILE: &str = "revoked.crl";
const LOCK_FILE: &str = "lock";
/// Bound of a certificate request (a P-256 one takes about 300 bytes, an
/// RSA-4096 one under 2 KiB).
const MAX_CSR_LEN: usize = 8 * 1024;

/// What `registry.json` holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Registry {
    #[serde(default)]
    pub machines: Vec<Issued>,
    #[serde(default)]
    pub one_time: Vec<OneTime>,
    /// The number of the newest revocation list.
    #[serde(default)]
    pub crl_number: u64,
}

/// One certificate the CA issued to a machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Issued {
    pub machine: String,
    /// Serial number, hex.
    pub serial: String,
    pub issued: String,
    /// `init`, `issue-cert` or `register`.
    pub how: String,
    /// The address a registration came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// When `machines remove` revoked it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removed: Option<String>,
}

/// A one-time passphrase, by its proof key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct OneTime {
    /// The proof key (`register::passphrase_key`), hex; not the passphrase.
    pub key: String,
    /// Only this machine may register with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    pub created: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used: Option<Used>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Used {
    pub machine: String,
    pub time: String,
}

fn now_text() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// The registration directory with the CA that signs for it.
#[derive(Debug, Clone)]
pub struct Registrar {
    pub dir: PathBuf,
    pub ca_key: PathBuf,
    pub ca_cert: PathBuf,
}

/// Writes `contents` to `path` (0600) durably (`fsutil::replace_file_owned`).
/// The new file keeps the old one's owner, or the directory's: an operator
/// running `lifeboat-ps machines` as root must not leave the service user a
/// revocation list it cannot read (that would refuse every machine).
fn replace_file(path: &Path, contents: &[u8]) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let owner = std::fs::metadata(path)
        .or_else(|_| std::fs::metadata(path.parent().unwrap_or(Path::new("."))))
        .map(|m| (m.uid(), m.gid()))
        .ok();
    lifeboat_common::fsutil::replace_file_owned(path, contents, 0o600, owner)
        .with_context(|| format!("writing {}", path.display()))
}

impl Registrar {
    pub fn new(cfg: &RegistrationConfig, ca_cert: &Path) -> Registrar {
        Registrar {
            dir: cfg.dir.clone(),
            ca_key: cfg.ca_key.clone(),
            ca_cert: ca_cert.to_path_buf(),
        }
    }

    pub fn crl_path(&self) -> PathBuf {
        self.dir.join(CRL_FILE)
    }

    pub fn passphrase_path(&self) -> PathBuf {
        self.dir.join(PASSPHRASE_FILE)
    }

    /// Creates the directory with a new standing passphrase, an empty
    /// registry and an empty revocation list; returns the passphrase.
    pub fn create(&self) -> Result<String> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        if self.dir.join(REGISTRY_FILE).exists() {
            bail!(
                "{} already holds a registry: refusing to start it again",
                self.dir.display()
            );
        }
        let pass = self.rotate_passphrase()?;
        self.locked(|r| write_crl(self, r))?;
        Ok(pass)
    }

    /// Runs `f` on the registry under the directory's lock; what `f` changed
    /// is written back before the lock is released.
    pub fn locked<T>(&self, f: impl FnOnce(&mut Registry) -> Result<T>) -> Result<T> {
        let lock_path = self.dir.join(LOCK_FILE);
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| {
                format!(
                    "opening {} (is [registration] dir right?)",
                    lock_path.display()
                )
            })?;
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor this function owns; released when
        // `lock` is closed at the end of the function.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("locking {}", lock_path.display()));
        }
        let path = self.dir.join(REGISTRY_FILE);
        let before = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice::<Registry>(&b)
                .with_context(|| format!("parsing the registry {}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Registry::default(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let mut r = before.clone();
        let out = f(&mut r)?;
        if r != before {
            replace_file(&path, &serde_json::to_vec_pretty(&r)?)?;
        }
        drop(lock);
        Ok(out)
    }

    /// Replaces the standing passphrase and returns the new one (under the
    /// lock, so that no registration is judged against the old one after
    /// this returns).
    pub fn rotate_passphrase(&self) -> Result<String> {
        self.locked(|_| {
            let pass = reg::new_passphrase();
            replace_file(&self.passphrase_path(), format!("{pass}\n").as_bytes())?;
            Ok(pass)
        })
    }

    /// Makes a one-time passphrase (only for `machine`, when given).
    pub fn one_time_passphrase(&self, machine: Option<&str>) -> Result<String> {
        if let Some(m) = machine {
            validate_id("machine", m).map_err(anyhow::Error::msg)?;
        }
        let pass = reg::new_passphrase();
        let key = reg::passphrase_key(&pass).expect("a new passphrase is not empty");
        self.locked(|r| {
            r.one_time.push(OneTime {
                key: lifeboat_common::hex(&key),
                machine: machine.map(str::to_string),
                created: now_text(),
                used: None,
            });
            Ok(())
        })?;
        Ok(pass)
    }

    /// Records a certificate issued by `init` or `issue-cert`.
    pub fn record(&self, machine: &str, serial: &str, how: &str) -> Result<()> {
        self.locked(|r| {
            r.machines.push(Issued {
                machine: machine.to_string(),
                serial: serial.to_string(),
                issued: now_text(),
                how: how.to_string(),
                peer: None,
                removed: None,
            });
            Ok(())
        })
    }

    /// Revokes every certificate of `machine`; returns their serials. A
    /// machine that holds none that is not revoked is an error (after the
    /// revocation list is written again: a removal whose list was never
    /// written is completed). The registry is written before the list, so
    /// the list never revokes what the registry does not.
    pub fn remove(&self, machine: &str) -> Result<Vec<String>> {
        let revoked = self.locked(|r| {
            if !r.machines.iter().any(|m| m.machine == machine) {
                bail!(
                    "no certificate was issued to machine {machine:?} (see lifeboat-ps machines list)"
                );
            }
            let now = now_text();
            let mut revoked = Vec::new();
            for m in r.machines.iter_mut().filter(|m| m.machine == machine) {
                if m.removed.is_none() {
                    m.removed = Some(now.clone());
                    revoked.push(m.serial.clone());
                }
            }
            Ok(revoked)
        })?;
        self.locked(|r| write_crl(self, r))?;
        if revoked.is_empty() {
            bail!("machine {machine:?} was already removed");
        }
        Ok(revoked)
    }

    pub fn list(&self) -> Result<Registry> {
        self.locked(|r| Ok(r.clone()))
    }

    /// Answers one registration request made in the TLS session of `export`.
    pub fn register(&self, q: &Request, export: &[u8; 32], peer: &str) -> Message {
        match self.try_register(q, export, peer) {
            Ok(m) => m,
            Err(e) => {
                // The details stay in the log: the peer is not authenticated.
                warn!("registration from {peer}: {e:#}");
                Message::Refused {
                    code: refusal::SERVER,
                    message: "the process server could not register the machine (its log says why)"
                        .into(),
                }
            }
        }
    }

    fn try_register(&self, q: &Request, export: &[u8; 32], peer: &str) -> Result<Message> {
        let refuse = |code, message: String| {
            warn!(
                "registration of {:?} from {peer} refused: {message}",
                q.machine
            );
            Ok(Message::Refused { code, message })
        };
        if let Err(e) = validate_id("machine", &q.machine) {
            return refuse(refusal::REQUEST, e);
        }
        if q.csr_der.len() > MAX_CSR_LEN {
            return refuse(
                refusal::REQUEST,
                format!(
                    "a certificate request of {} bytes (at most {MAX_CSR_LEN})",
                    q.csr_der.len()
                ),
            );
        }
        let ca_pem = std::fs::read_to_string(&self.ca_cert)
            .with_context(|| format!("reading the CA certificate {}", self.ca_cert.display()))?;
        self.locked(|r| {
            // Under the lock: a rotation that returned has taken effect.
            let standing = std::fs::read_to_string(self.passphrase_path())
                .with_context(|| format!("reading {}", self.passphrase_path().display()))?;
            let standing_key = reg::passphrase_key(&standing);
            let mut used_one_time = None;
            let proven_standing = standing_key.is_some_and(|k| q.proven_by(&k, export));
            if !proven_standing {
                let found = r.one_time.iter().position(|o| {
                    lifeboat_common::unhex::<32>(&o.key).is_some_and(|k| q.proven_by(&k, export))
                });
                match found {
                    None => {
                        return refuse(
                            refusal::PASSPHRASE,
                            "the passphrase is not this process server's (mistyped, rotated, or never issued here)"
                                .into(),
                        )
                    }
                    Some(i) => {
                        let o = &r.one_time[i];
                        if let Some(u) = &o.used {
                            return refuse(
                                refusal::PASSPHRASE,
                                format!(
                                    "that one-time passphrase was already used (by machine {} at {}); make another with lifeboat-ps machines one-time-passphrase",
                                    u.machine, u.time
                                ),
                            );
                        }
                        if let Some(m) = o.machine.as_deref().filter(|m| *m != q.machine) {
                            return refuse(
                                refusal::PASSPHRASE,
                                format!(
                                    "that one-time passphrase is for machine {m}, not {}",
                                    q.machine
                                ),
                            );
                        }
                        used_one_time = Some(i);
                    }
                }
            }
            if let Some(m) = r
                .machines
                .iter()
                .find(|m| m.machine == q.machine && m.removed.is_none())
            {
                return refuse(
                    refusal::REGISTERED,
                    format!(
                        "machine {} already holds a certificate (serial {}, issued {} by {}); if this is a replacement, run lifeboat-ps machines remove {} first",
                        q.machine, m.serial, m.issued, m.how, q.machine
                    ),
                );
            }
            let csr = rcgen::CertificateSigningRequestParams::from_der(&q.csr_der.as_slice().into());
            let mut csr = match csr {
                Ok(c) => c,
                Err(e) => {
                    return refuse(
                        refusal::REQUEST,
                        format!("the certificate request is not a valid signed PKCS #10 request: {e}"),
                    )
                }
            };
            let serial = pki::new_serial();
            // Only the request's key is taken from it: the name, the use and
            // the serial are the CA's.
            csr.params = pki::machine_cert_params(&q.machine, &serial)?;
            let issuer = pki::load_ca(&self.ca_key)?;
            let cert = csr
                .signed_by(&issuer)
                .map_err(|e| anyhow!("signing the certificate: {e}"))?;
            let now = now_text();
            if let Some(i) = used_one_time {
                r.one_time[i].used = Some(Used {
                    machine: q.machine.clone(),
                    time: now.clone(),
                });
            }
            r.machines.push(Issued {
                machine: q.machine.clone(),
                serial: serial.clone(),
                issued: now,
                how: "register".into(),
                peer: Some(peer.to_string()),
                removed: None,
            });
            let key = if proven_standing {
                standing_key.expect("proven")
            } else {
                lifeboat_common::unhex::<32>(&r.one_time[used_one_time.expect("proven")].key).expect("parsed")
            };
            info!(
                "registered machine {} from {peer}: certificate serial {serial} ({} passphrase)",
                q.machine,
                if proven_standing { "standing" } else { "one-time" }
            );
            Ok(Message::Registered(Reply::new(
                &key,
                export,
                q,
                cert.pem(),
                ca_pem.clone(),
            )))
        })
    }
}

/// Rewrites the revocation list from the registry (under its lock).
fn write_crl(reg: &Registrar, r: &mut Registry) -> Result<()> {
    use rcgen::{
        CertificateRevocationListParams, KeyIdMethod, RevocationReason, RevokedCertParams,
    };
    let parse_time = |t: &str| -> Result<time::OffsetDateTime> {
        let st = humantime::parse_rfc3339(t).with_context(|| format!("time {t:?}"))?;
        Ok(time::OffsetDateTime::from(st))
    };
    let mut revoked = Vec::new();
    for m in &r.machines {
        if let Some(t) = &m.removed {
            revoked.push(RevokedCertParams {
                serial_number: pki::serial_number(&m.serial)?,
                revocation_time: parse_time(t)?,
                reason_code: Some(RevocationReason::CessationOfOperation),
                invalidity_date: None,
            });
        }
    }
    r.crl_number += 1;
    let now = time::OffsetDateTime::now_utc();
    let params = CertificateRevocationListParams {
        this_update: now,
        // Not enforced by the listener; a reader that does enforce it sees
        // a list valid for as long as the CA is.
        next_update: now + time::Duration::days(3650),
        crl_number: rcgen::SerialNumber::from(r.crl_number),
        issuing_distribution_point: None,
        revoked_certs: revoked,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let issuer = pki::load_ca(&reg.ca_key)?;
    let crl = params
        .signed_by(&issuer)
        .map_err(|e| anyhow!("signing the revocation list: {e}"))?;
    replace_file(&reg.crl_path(), crl.pem()?.as_bytes())
}

/// Serves one connection that presented no client certificate: one
/// registration request, one answer.
pub async fn serve(
    mut tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    peer: std::net::SocketAddr,
    registrar: Option<std::sync::Arc<Registrar>>,
    deadline: std::time::Duration,
) {
    let mut export = [0u8; 32];
    if let Err(e) = tls
        .get_ref()
        .1
        .export_keying_material(&mut export, reg::EXPORTER_LABEL, None)
    {
        warn!("registration from {peer}: exporting keying material: {e}");
        return;
    }
    let req = match tokio::time::timeout(deadline, reg::read_message(&mut tls)).await {
        Ok(Ok(Message::Register(q))) => q,
        Ok(Ok(_)) => {
            warn!("{peer} presented no client certificate and sent no registration request");
            return;
        }
        Ok(Err(e)) => {
            warn!("{peer} presented no client certificate: {e}");
            let _ = reg::write_message(
                &mut tls,
                &Message::Refused {
                    code: refusal::REQUEST,
                    message: "no client certificate: this connection can only register a machine (lifeboat-agent register)".into(),
                },
            )
            .await;
            return;
        }
        Err(_) => {
            warn!("{peer} presented no client certificate and sent nothing within {deadline:?}");
            return;
        }
    };
    let answer = match registrar {
        Some(r) => {
            let peer_s = peer.to_string();
            match tokio::task::spawn_blocking(move || r.register(&req, &export, &peer_s)).await {
                Ok(m) => m,
                Err(e) => Message::Refused {
                    code: refusal::SERVER,
                    message: format!("registration failed: {e}"),
                },
            }
        }
        None => Message::Refused {
            code: refusal::DISABLED,
            message: "this process server takes no registrations (no [registration] in ps.toml)"
                .into(),
        },
    };
    if let Err(e) = reg::write_message(&mut tls, &answer).await {
        warn!("registration from {peer}: sending the answer: {e}");
        return;
    }
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use lifeboat_common::register::passphrase_key;

    fn registrar(dir: &Path) -> Registrar {
        pki::create_authority(dir, &["localhost".to_string()]).unwrap();
        Registrar {
            dir: dir.join("registration"),
            ca_key: dir.join(pki::CA_KEY),
            ca_cert: dir.join(pki::CA_CERT),
        }
    }

    fn request(pass: &str, machine: &str, export: &[u8; 32]) -> Request {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["ignored".to_string()]).unwrap();
        let csr = params.serialize_request(&key).unwrap();
        Request::new(
            &passphrase_key(pass).unwrap(),
            export,
            machine,
            csr.der().to_vec(),
        )
    }

    fn refusal_of(m: Message) -> (u16, String) {
        match m {
            Message::Refused { code, message } => (code, message),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn passphrases_issue_once_and_removal_revokes() {
        let tmp = tempfile::tempdir().unwrap();
        let r = registrar(tmp.path());
        let pass = r.create().unwrap();
        assert!(r.create().is_err(), "a second create is refused");
        let export = [3u8; 32];

        let (code, msg) =
            refusal_of(r.register(&request("WRONG-PASS", "web-1", &export), &export, "p"));
        assert_eq!(code, refusal::PASSPHRASE, "{msg}");
        assert!(r.list().unwrap().machines.is_empty());

        let q = request(&pass, "web-1", &export);
        let Message::Registered(reply) = r.register(&q, &export, "p") else {
            panic!("the standing passphrase registers")
        };
        assert!(reply.proven_by(&passphrase_key(&pass).unwrap(), &export, &q));
        let ca = lifeboat_common::tls::parse_certs(&reply.ca_pem, "ca").unwrap();
        let cert = lifeboat_common::tls::parse_certs(&reply.cert_pem, "cert").unwrap();
        lifeboat_common::tls::cert_chains_to(
            &ca,
            &cert[0],
            false,
            &lifeboat_common::ids::machine_cert_name("web-1"),
        )
        .unwrap();

        let (code, msg) = refusal_of(r.register(&request(&pass, "web-1", &export), &export, "p"));
        assert_eq!(code, refusal::REGISTERED, "{msg}");

        let once = r.one_time_passphrase(Some("db-1")).unwrap();
        let (code, msg) = refusal_of(r.register(&request(&once, "web-2", &export), &export, "p"));
        assert_eq!(code, refusal::PASSPHRASE);
        assert!(msg.contains("for machine db-1"), "{msg}");
        assert!(matches!(
            r.register(&request(&once, "db-1", &export), &export, "p"),
            Message::Registered(_)
        ));
        r.remove("db-1").unwrap();
        let (code, msg) = refusal_of(r.register(&request(&once, "db-1", &export), &export, "p"));
        assert_eq!(code, refusal::PASSPHRASE);
        assert!(msg.contains("already used"), "{msg}");

        let old = pass;
        let new = r.rotate_passphrase().unwrap();
        let (code, _) = refusal_of(r.register(&request(&old, "app-1", &export), &export, "p"));
        assert_eq!(
            code,
            refusal::PASSPHRASE,
            "a rotated passphrase stops working"
        );
        assert!(matches!(
            r.register(&request(&new, "app-1", &export), &export, "p"),
            Message::Registered(_)
        ));

        let list = r.list().unwrap();
        let removed: Vec<_> = list
            .machines
            .iter()
            .filter(|m| m.removed.is_some())
            .collect();
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].machine, "db-1");
        assert!(r.remove("db-1").is_err(), "removed twice");
        assert!(r.remove("nobody").is_err());
        let crl = std::fs::read_to_string(r.crl_path()).unwrap();
        assert!(crl.contains("BEGIN X509 CRL"));
        // create, the removal, and the refused second removal (which writes
        // the list again).
        assert_eq!(r.list().unwrap().crl_number, 3);
    }
}
