//! Identifiers: machine and disk ids, and the certificate name bound to a machine.
//!
//! A machine id is a DNS label (`[a-z0-9-]`, 1–63 characters, not starting or
//! ending with `-`), so that the registration CA can bind it to a client
//! certificate as the DNS name `<machine>.machine.lifeboat`.
//!
//! Stream ids (see `protocol.rs`) are 16 random bytes.

/// Suffix of the DNS name in an agent's client certificate.
pub const MACHINE_NAME_SUFFIX: &str = "machine.lifeboat";

/// Checks a machine or disk id; the error says what is allowed.
pub fn validate_id(kind: &str, id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 63
        && !id.starts_with('-')
        && !id.ends_with('-')
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid {kind} id {id:?}: use 1-63 lowercase letters, digits and '-', not starting or ending with '-'"
        ))
    }
}

/// The DNS name a machine's client certificate carries.
pub fn machine_cert_name(machine: &str) -> String {
    format!("{machine}.{MACHINE_NAME_SUFFIX}")
}

/// A fresh random stream id.
pub fn new_stream_id() -> crate::protocol::StreamId {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut id = [0u8; 16];
    SystemRandom::new()
        .fill(&mut id)
        .expect("the system random source works");
    id
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn ids() {
        assert!(validate_id("machine", "web-01").is_ok());
        assert!(validate_id("machine", "Web").is_err());
        assert!(validate_id("machine", "-a").is_err());
        assert!(validate_id("machine", "a.b").is_err());
        assert!(validate_id("machine", "").is_err());
    }
}
