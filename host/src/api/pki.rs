//! `ferry cluster init-ca` and `issue-cert`: a cluster CA and node
//! certificates, so TLS between nodes takes three commands. A certificate
//! serves its node both as a server and as a client of the other members.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};

/// Where `init-ca` writes the CA, and `issue-cert` reads it.
pub fn ca_paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("ca.crt"), dir.join("ca.key"))
}

/// Makes a new cluster CA in `dir` (`ca.crt`, and `ca.key` readable by its
/// owner only). Refuses to overwrite an existing one.
pub fn init_ca(dir: &Path, name: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (cert_path, key_path) = ca_paths(dir);
    anyhow::ensure!(!key_path.exists(), "{} exists: a cluster has one CA", key_path.display());
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = rcgen::date_time_ymd(2025, 1, 1);
    params.not_after = rcgen::date_time_ymd(2045, 1, 1);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write_private(&key_path, &key.serialize_pem())?;
    std::fs::write(&cert_path, cert.pem()).with_context(|| format!("writing {}", cert_path.display()))?;
    Ok((cert_path, key_path))
}

/// Issues a certificate for node `name`, valid for `hosts` (IP addresses or
/// DNS names: what other nodes put in its URL), signed by the CA in `ca_dir`.
/// Writes `<out>/<name>.crt` and `<out>/<name>.key`.
pub fn issue_cert(ca_dir: &Path, name: &str, hosts: &[String], out: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    anyhow::ensure!(!hosts.is_empty(), "give at least one --host the node is reached at");
    anyhow::ensure!(
        !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')),
        "node name {name:?} must be letters, digits, '-', '_' or '.'"
    );
    let (ca_cert_path, ca_key_path) = ca_paths(ca_dir);
    let ca_key_pem =
        std::fs::read_to_string(&ca_key_path).with_context(|| format!("reading {}", ca_key_path.display()))?;
    let ca_cert_pem =
        std::fs::read_to_string(&ca_cert_path).with_context(|| format!("reading {}", ca_cert_path.display()))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).with_context(|| format!("{}", ca_key_path.display()))?;
    let issuer =
        Issuer::from_ca_cert_pem(&ca_cert_pem, ca_key).with_context(|| format!("{}", ca_cert_path.display()))?;

    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.subject_alt_names = hosts
        .iter()
        .map(|host| match host.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => host.as_str().try_into().map(SanType::DnsName).map_err(anyhow::Error::from),
        })
        .collect::<anyhow::Result<_>>()?;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = rcgen::date_time_ymd(2025, 1, 1);
    params.not_after = rcgen::date_time_ymd(2045, 1, 1);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let (cert_path, key_path) = (out.join(format!("{name}.crt")), out.join(format!("{name}.key")));
    write_private(&key_path, &key.serialize_pem())?;
    std::fs::write(&cert_path, cert.pem()).with_context(|| format!("writing {}", cert_path.display()))?;
    Ok((cert_path, key_path))
}

/// Writes a file only its owner can read.
fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_verify_against_the_ca_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = init_ca(dir.path(), "test CA").unwrap();
        assert!(init_ca(dir.path(), "again").is_err(), "a second CA over the first");
        let (cert, key) =
            issue_cert(dir.path(), "alpha", &["127.0.0.1".into(), "alpha.test".into()], dir.path()).unwrap();
        assert!(!crate::node::credentials::is_loose(&key));
        let files = crate::http::tls::TlsFiles { cert_file: cert, key_file: key, ca_file: ca.clone() };
        crate::http::tls::server_config(&files).unwrap();
        crate::http::tls::client_config(&ca, Some((&files.cert_file, &files.key_file))).unwrap();
        assert!(issue_cert(dir.path(), "bad name", &["x".into()], dir.path()).is_err());
        assert!(issue_cert(dir.path(), "beta", &[], dir.path()).is_err());
    }
}
