//! Registration material: the process server's CA, its server certificate, the
//! client certificates bound to machine ids, and the key-encryption key.
//!
//! The CA's distinguished name is fixed, so the CA can sign new machine
//! certificates from its key alone (`lifeboat-ps issue-cert`).

use std::path::Path;

use anyhow::{Context, Result};
use lifeboat_common::ids::{machine_cert_name, validate_id};
use lifeboat_common::seal::Key;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
pub const SERVER_CERT: &str = "server.pem";
pub const SERVER_KEY: &str = "server.key";
pub const KEK_FILE: &str = "kek.key";

fn ca_params() -> Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Lifeboat process server CA");
    dn.push(DnType::OrganizationName, "Lifeboat");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2124, 1, 1);
    Ok(p)
}

pub fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    f.sync_all()?;
    Ok(())
}

/// The CA as an issuer, from its key file.
pub fn load_ca(key_path: &Path) -> Result<Issuer<'static, KeyPair>> {
    let pem = std::fs::read_to_string(key_path)
        .with_context(|| format!("reading the CA key {}", key_path.display()))?;
    let key = KeyPair::from_pem(&pem).with_context(|| format!("parsing {}", key_path.display()))?;
    Ok(Issuer::new(ca_params()?, key))
}

/// Creates the CA, the server certificate (for `server_names`) and the KEK.
pub fn create_authority(dir: &Path, server_names: &[String]) -> Result<()> {
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params()?.self_signed(&ca_key)?;
    std::fs::write(dir.join(CA_CERT), ca_cert.pem())?;
    write_private(&dir.join(CA_KEY), &ca_key.serialize_pem())?;
    let issuer = Issuer::new(ca_params()?, ca_key);

    let mut sp = CertificateParams::new(server_names.to_vec())?;
    sp.distinguished_name
        .push(DnType::CommonName, "Lifeboat process server");
    sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let skey = KeyPair::generate()?;
    let scert = sp.signed_by(&skey, &issuer)?;
    std::fs::write(dir.join(SERVER_CERT), scert.pem())?;
    write_private(&dir.join(SERVER_KEY), &skey.serialize_pem())?;

    write_private(
        &dir.join(KEK_FILE),
        &format!("{}\n", Key::generate().to_hex()),
    )?;
    Ok(())
}

/// A new random certificate serial number (16 bytes, positive), as hex.
pub fn new_serial() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .expect("the system's random source failed");
    b[0] &= 0x7f;
    b[0] |= 0x01;
    lifeboat_common::hex(&b)
}

pub fn serial_number(serial_hex: &str) -> Result<SerialNumber> {
    let b = lifeboat_common::unhex::<16>(serial_hex)
        .ok_or_else(|| anyhow::anyhow!("{serial_hex:?} is not a serial number (32 hex digits)"))?;
    Ok(SerialNumber::from_slice(&b))
}

/// The parameters of a client certificate for `machine` with `serial`.
pub fn machine_cert_params(machine: &str, serial: &str) -> Result<CertificateParams> {
    validate_id("machine", machine).map_err(anyhow::Error::msg)?;
    let mut p = CertificateParams::new(vec![machine_cert_name(machine)])?;
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, machine);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.serial_number = Some(serial_number(serial)?);
    Ok(p)
}

/// Issues a client certificate for `machine` into `out` (ca.pem, client.pem,
/// client.key) and returns its serial number (hex).
pub fn issue_machine_cert(dir: &Path, machine: &str, out: &Path) -> Result<String> {
    let issuer = load_ca(&dir.join(CA_KEY))?;
    let serial = new_serial();
    let key = KeyPair::generate()?;
    let cert = machine_cert_params(machine, &serial)?.signed_by(&key, &issuer)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::copy(dir.join(CA_CERT), out.join("ca.pem"))
        .with_context(|| format!("copying the CA certificate to {}", out.display()))?;
    std::fs::write(out.join("client.pem"), cert.pem())?;
    write_private(&out.join("client.key"), &key.serialize_pem())?;
    Ok(serial)
}

pub fn load_kek(path: &Path) -> Result<Key> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the key-encryption key {}", path.display()))?;
    Key::from_hex(&text)
        .map_err(|e| anyhow::anyhow!("{} is not a key-encryption key: {e}", path.display()))
}
