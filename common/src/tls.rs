//! TLS 1.3 with mutual authentication (rustls, ring provider).
//!
//! The process server's own CA signs every certificate. An agent's client
//! certificate carries the DNS name `<machine>.machine.lifeboat`; a connection may
//! only send the stream of the machine its certificate names.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::pki_types::{CertificateRevocationListDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};

use crate::ids::machine_cert_name;

/// Installs ring as the process-wide rustls provider (idempotent).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let pem =
        std::fs::read(path).with_context(|| format!("reading certificate {}", path.display()))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing certificate {}", path.display()))?;
    if certs.is_empty() {
        return Err(anyhow!("no certificate found in {}", path.display()));
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let pem =
        std::fs::read(path).with_context(|| format!("reading private key {}", path.display()))?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .with_context(|| format!("parsing private key {}", path.display()))?
        .ok_or_else(|| anyhow!("no private key found in {}", path.display()))
}

fn roots(ca: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(ca)? {
        roots
            .add(c)
            .with_context(|| format!("adding CA certificate from {}", ca.display()))?;
    }
    Ok(roots)
}

/// Server side: requires a client certificate signed by `ca`.
pub fn server_config(ca: &Path, cert: &Path, key: &Path) -> Result<Arc<ServerConfig>> {
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
        .build()
        .context("building the client-certificate verifier")?;
    server_config_with(verifier, cert, key)
}

/// Server side with a revocation list and, for registration, clients
/// without a certificate: a client certificate must be signed by `ca` and
/// not be revoked by the CRL in `crl` (read again whenever the file changes,
/// so a revocation holds from the next handshake on; a file that is missing
/// or cannot be read or parsed refuses every certificate, naming it: moving
/// the list away must not bring revoked machines back). With `allow_anonymous` a client may present no certificate
/// at all: such a connection can only register (`register.rs`).
pub fn server_config_revocable(
    ca: &Path,
    cert: &Path,
    key: &Path,
    crl: &Path,
    allow_anonymous: bool,
) -> Result<Arc<ServerConfig>> {
    let roots = Arc::new(roots(ca)?);
    let verifier = RevocableVerifier {
        subjects: roots.subjects(),
        roots,
        crl: crl.to_path_buf(),
        allow_anonymous,
        current: std::sync::Mutex::new(None),
    };
    // Fails now, naming the file, rather than at the first handshake.
    verifier.current()?;
    server_config_with(Arc::new(verifier), cert, key)
}

fn server_config_with(
    verifier: Arc<dyn ClientCertVerifier>,
    cert: &Path,
    key: &Path,
) -> Result<Arc<ServerConfig>> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .context("loading the server certificate and key")?;
    // No session resumption: a resumed session carries the client
    // certificate of its first handshake without verifying it again, so a
    // revoked machine could come back. Agents reconnect rarely; a full
    // handshake each time costs nothing that matters.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// Client side: trusts only `ca` and presents the machine's certificate.
pub fn client_config(ca: &Path, cert: &Path, key: &Path) -> Result<Arc<ClientConfig>> {
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
        .context("loading the client certificate and key")?;
    Ok(Arc::new(cfg))
}

/// Whether the (already chain-verified) client certificate names `machine`.
pub fn cert_allows_machine(cert: &CertificateDer<'_>, machine: &str) -> bool {
    let Ok(ee) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    let Ok(name) = ServerName::try_from(machine_cert_name(machine)) else {
        return false;
    };
    ee.verify_is_valid_for_subject_name(&name).is_ok()
}

/// The handshake-signature checks of a certificate verifier: the provider's
/// algorithms, as the webpki verifiers do.
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &provider().signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &provider().signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

/// What identifies one version of a file: a change of any of these is a
/// rewrite (the CRL is replaced by rename, so the inode changes too).
fn file_stamp(path: &Path) -> std::io::Result<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    Ok((m.ino(), m.len(), m.mtime(), m.mtime_nsec()))
}

type Stamp = (u64, u64, i64, i64);

/// A client-certificate verifier that checks the CA's revocation list as the
/// file is now.
#[derive(Debug)]
struct RevocableVerifier {
    roots: Arc<RootCertStore>,
    subjects: Vec<DistinguishedName>,
    crl: std::path::PathBuf,
    allow_anonymous: bool,
    current: std::sync::Mutex<Option<(Stamp, Arc<dyn ClientCertVerifier>)>>,
}

impl RevocableVerifier {
    fn current(&self) -> Result<Arc<dyn ClientCertVerifier>> {
        let stamp = file_stamp(&self.crl).with_context(|| {
            format!(
                "reading the revocation list {} (lifeboat-ps init writes it; restore it from a backup)",
                self.crl.display()
            )
        })?;
        let mut g = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((s, v)) = g.as_ref() {
            if *s == stamp {
                return Ok(v.clone());
            }
        }
        let mut b = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider());
        let pem = std::fs::read(&self.crl)
            .with_context(|| format!("reading the revocation list {}", self.crl.display()))?;
        let crls: Vec<CertificateRevocationListDer<'static>> =
            rustls_pemfile::crls(&mut pem.as_slice())
                .collect::<Result<_, _>>()
                .with_context(|| format!("parsing the revocation list {}", self.crl.display()))?;
        if crls.is_empty() {
            return Err(anyhow!(
                "no revocation list found in {}",
                self.crl.display()
            ));
        }
        b = b.with_crls(crls);
        if self.allow_anonymous {
            b = b.allow_unauthenticated();
        }
        let v = b.build().with_context(|| {
            format!(
                "building the client-certificate verifier with {}",
                self.crl.display()
            )
        })?;
        *g = Some((stamp, v.clone()));
        Ok(v)
    }

    fn now(&self) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        self.current().map_err(|e| {
            tracing::error!("refusing client certificates: {e:#}");
            rustls::Error::General(format!("{e:#}"))
        })
    }
}

impl ClientCertVerifier for RevocableVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        !self.allow_anonymous
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.subjects
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.now()?
            .verify_client_cert(end_entity, intermediates, now)
    }

    handshake_signatures!();
}

/// The server certificate a registration connection was shown, kept for the
/// check after the server has proven the passphrase.
#[derive(Debug, Default)]
pub struct SeenServerCert(std::sync::Mutex<Option<CertificateDer<'static>>>);

impl SeenServerCert {
    pub fn get(&self) -> Option<CertificateDer<'static>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl ServerCertVerifier for SeenServerCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // Not trusted yet: registration trusts the server only once it has
        // proven the passphrase, and then checks this certificate against
        // the CA it sent (`cert_chains_to`).
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(end_entity.clone().into_owned());
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures!();
}

/// Client side for registration: no client certificate, and the server's
/// certificate is recorded in the returned [`SeenServerCert`], not checked.
pub fn registration_client_config() -> Result<(Arc<ClientConfig>, Arc<SeenServerCert>)> {
    let seen = Arc::new(SeenServerCert::default());
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(seen.clone())
        .with_no_client_auth();
    Ok((Arc::new(cfg), seen))
}

/// The certificates of a PEM text.
pub fn parse_certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing {what}"))?;
    if certs.is_empty() {
        return Err(anyhow!("no certificate found in {what}"));
    }
    Ok(certs)
}

/// Checks that `cert` is signed by one of `ca` (valid now), for server
/// (`server = true`) or client use, and names `name`.
pub fn cert_chains_to(
    ca: &[CertificateDer<'_>],
    cert: &CertificateDer<'_>,
    server: bool,
    name: &str,
) -> Result<()> {
    let anchors: Vec<_> = ca
        .iter()
        .map(|c| webpki::anchor_from_trusted_cert(c).map(|a| a.to_owned()))
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow!("the CA certificate is not usable: {e:?}"))?;
    let ee = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| anyhow!("the certificate is malformed: {e:?}"))?;
    let usage = if server {
        webpki::KeyUsage::server_auth()
    } else {
        webpki::KeyUsage::client_auth()
    };
    ee.verify_for_usage(
        provider().signature_verification_algorithms.all,
        &anchors,
        &[],
        UnixTime::now(),
        usage,
        None,
        None,
    )
    .map_err(|e| anyhow!("the certificate is not signed by that CA: {e:?}"))?;
    let sn = ServerName::try_from(name.to_string())
        .map_err(|e| anyhow!("{name:?} is not a name a certificate can hold: {e}"))?;
    ee.verify_is_valid_for_subject_name(&sn)
        .map_err(|_| anyhow!("the certificate does not name {name:?}"))?;
    Ok(())
}
