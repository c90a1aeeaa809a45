//! `lifeboat-agent register`: gets this machine a client certificate from the
//! process server with a registration passphrase (`lifeboat_common::register`
//! has the exchange and why it is safe against an impostor server).
//!
//! The key is made here and never leaves the machine: the server receives a
//! signed certificate request and returns the certificate its CA made for the
//! machine id of agent.toml. Nothing is written unless the server proved the
//! passphrase, its own certificate chains to the CA it sent and names the
//! config's `server-name`, and the certificate it issued names this machine
//! and holds this key. Then the key (0600), the certificate and the CA are
//! written to the config's `client-key`, `client-cert` and `ca-cert`, each by
//! a synced temporary file and a rename.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use lifeboat_common::ids::machine_cert_name;
use lifeboat_common::register::{self as reg, refusal, Message, Request};
use lifeboat_common::tls;
use rustls::pki_types::ServerName;

use crate::config::AgentConfig;

/// What a registration wrote.
#[derive(Debug)]
pub struct Registered {
    pub server: String,
    pub written: Vec<std::path::PathBuf>,
}

/// Registers `cfg.machine` with the process server at `server` (host:port).
pub async fn register(cfg: &AgentConfig, server: &str, passphrase: &str) -> Result<Registered> {
    let key = reg::passphrase_key(passphrase).ok_or_else(|| anyhow!("the passphrase is empty"))?;
    for p in [&cfg.client_key, &cfg.client_cert] {
        if p.exists() {
            bail!(
                "{} already exists: this machine has a certificate. To register it again (its certificate was removed with lifeboat-ps machines remove), move the old files away first",
                p.display()
            );
        }
    }
    let keypair = rcgen::KeyPair::generate().context("making the machine's key")?;
    let mut params = rcgen::CertificateParams::new(vec![machine_cert_name(&cfg.machine)])?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cfg.machine.as_str());
    let csr = params
        .serialize_request(&keypair)
        .context("making the certificate request")?;

    tls::install_crypto_provider();
    let (client_cfg, seen) = tls::registration_client_config()?;
    let tcp = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        tokio::net::TcpStream::connect(server),
    )
    .await
    .map_err(|_| anyhow!("connecting to {server}: timed out after 30 s"))?
    .with_context(|| format!("connecting to {server}"))?;
    let host = server
        .rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
        .unwrap_or(server);
    let name = ServerName::try_from(host.to_string())
        .or_else(|_| ServerName::try_from(cfg.server_name.clone()))
        .map_err(|e| anyhow!("{host:?} is not a host name: {e}"))?;
    let mut conn = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        tokio_rustls::TlsConnector::from(client_cfg).connect(name, tcp),
    )
    .await
    .map_err(|_| anyhow!("TLS handshake with {server}: timed out after 30 s"))?
    .with_context(|| format!("TLS handshake with {server}"))?;
    let mut export = [0u8; 32];
    conn.get_ref()
        .1
        .export_keying_material(&mut export, reg::EXPORTER_LABEL, None)
        .map_err(|e| anyhow!("exporting the TLS session's keying material: {e}"))?;

    let q = Request::new(&key, &export, &cfg.machine, csr.der().to_vec());
    reg::write_message(&mut conn, &Message::Register(q.clone()))
        .await
        .with_context(|| format!("sending the registration request to {server}"))?;
    let answer = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        reg::read_message(&mut conn),
    )
    .await
    .map_err(|_| anyhow!("{server} did not answer the registration within 60 s"))?
    .with_context(|| {
        format!("reading {server}'s answer (is it a lifeboat-ps that takes registrations?)")
    })?;
    let reply = match answer {
        Message::Registered(r) => r,
        Message::Refused { code, message } => {
            let hint = match code {
                refusal::PASSPHRASE => " (ask the process server's operator for the current passphrase, or a one-time one: lifeboat-ps machines one-time-passphrase)",
                _ => "",
            };
            bail!(
                "{server} refused to register machine {}: {message}{hint} (the server's words, not authenticated)",
                cfg.machine
            )
        }
        Message::Register(_) => bail!("{server} answered with a registration request"),
    };
    if !reply.proven_by(&key, &export, &q) {
        bail!(
            "{server} answered without proof that it knows the passphrase: it is not the process server the passphrase came from (or something in between is impersonating it). Nothing was written"
        );
    }

    let ca = tls::parse_certs(&reply.ca_pem, "the CA certificate the server sent")?;
    let server_cert = seen
        .get()
        .ok_or_else(|| anyhow!("{server} presented no certificate"))?;
    tls::cert_chains_to(&ca, &server_cert, true, &cfg.server_name).map_err(|e| {
        anyhow!(
            "{server}'s own certificate does not check against the CA it sent ({e:#}); set server-name in the agent's config to a name the process server's certificate holds"
        )
    })?;
    let cert = tls::parse_certs(&reply.cert_pem, "the certificate the server issued")?;
    tls::cert_chains_to(&ca, &cert[0], false, &machine_cert_name(&cfg.machine))
        .context("the issued certificate")?;
    let key_der = rustls::pki_types::PrivateKeyDer::try_from(keypair.serialize_der())
        .map_err(|e| anyhow!("the machine's key: {e}"))?;
    // Refuses a certificate for another key.
    rustls::sign::CertifiedKey::from_der(
        cert.clone(),
        key_der,
        &rustls::crypto::ring::default_provider(),
    )
    .map_err(|e| anyhow!("the issued certificate does not hold this machine's key: {e}"))?;

    // The key first: a certificate without its key is of no use, a key
    // without its certificate is only left over.
    let mut written = Vec::new();
    for (path, contents, private) in [
        (&cfg.client_key, keypair.serialize_pem(), true),
        (&cfg.ca_cert, reply.ca_pem.clone(), false),
        (&cfg.client_cert, reply.cert_pem.clone(), false),
    ] {
        write_file(path, contents.as_bytes(), private)?;
        written.push(path.clone());
    }
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut conn).await;
    Ok(Registered {
        server: server.to_string(),
        written,
    })
}

fn write_file(path: &Path, contents: &[u8], private: bool) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mode = if private { 0o600 } else { 0o644 };
    lifeboat_common::fsutil::replace_file_mode(path, contents, mode)
        .with_context(|| format!("writing {}", path.display()))
}

/// The passphrase from its file (surrounding whitespace ignored).
pub fn read_passphrase(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the passphrase file {}", path.display()))?;
    let text = text.trim().to_string();
    if text.is_empty() {
        bail!("the passphrase file {} is empty", path.display());
    }
    Ok(text)
}
