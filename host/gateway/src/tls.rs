//! Secure defaults: the gateway's own CA, its server certificate, and the
//! gateway token, all kept in the state dir with mode 0600.
//!
//! The CA and the token are created once and reused, so clients configured
//! against a gateway keep working across restarts. The server certificate
//! is issued afresh at every start, so new addresses (`--tls-san`, the bind
//! address) take effect without touching the CA.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// The name every gateway certificate carries; clients that know the CA
/// (the CLI, supervisors) verify against it whatever address they dial.
pub const SERVER_NAME: &str = "openshell-gateway";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create a certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("{path} is not a usable key: {source}")]
    BadKey {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
}

/// What a server needs to serve TLS, and a client to trust it.
#[derive(Clone)]
pub struct Pki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pki { .. }")
    }
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TlsError {
    let path = path.to_owned();
    move |source| TlsError::Io { what, path, source }
}

/// Writes a file only the gateway's user can read (the host's one
/// private-file writer).
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), TlsError> {
    openshell_plugin::write_private(path, contents).map_err(io("write", path))
}

/// How long the CA is valid; see SECURITY.md for rotating it.
const CA_VALIDITY: time::Duration = time::Duration::days(3650);
/// How long a server certificate is valid: a fresh one is issued at every
/// start, so this bounds how long a stolen server key is useful.
const SERVER_VALIDITY: time::Duration = time::Duration::days(90);
/// Allowance for clocks a little behind ours.
const SKEW: time::Duration = time::Duration::hours(1);

fn validity(p: &mut CertificateParams, lasts: time::Duration) {
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - SKEW;
    p.not_after = now + lasts;
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name
        .push(DnType::CommonName, "openshell gateway CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut p, CA_VALIDITY);
    p
}

/// Loads (or creates) the CA and issues a server certificate for `sans`
/// (plus localhost, loopback and [`SERVER_NAME`]).
pub fn ensure_pki(state_dir: &Path, sans: &[String], bind: IpAddr) -> Result<Pki, TlsError> {
    let dir = state_dir.join("tls");
    std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
    let (ca_key_path, ca_path) = (dir.join("ca.key"), dir.join("ca.crt"));
    let (ca_key, ca_pem) = match (
        std::fs::read_to_string(&ca_key_path),
        std::fs::read_to_string(&ca_path),
    ) {
        (Ok(k), Ok(c)) => {
            let key = KeyPair::from_pem(&k).map_err(|source| TlsError::BadKey {
                path: ca_key_path.clone(),
                source,
            })?;
            (key, c)
        }
        _ => {
            let key = KeyPair::generate()?;
            let cert = ca_params().self_signed(&key)?;
            write_private(&ca_key_path, key.serialize_pem().as_bytes())?;
            write_private(&ca_path, cert.pem().as_bytes())?;
            (key, cert.pem())
        }
    };
    let issuer = Issuer::new(ca_params(), &ca_key);

    let mut names: Vec<SanType> = vec![
        SanType::DnsName(SERVER_NAME.try_into()?),
        SanType::DnsName("localhost".try_into()?),
        SanType::IpAddress("127.0.0.1".parse().expect("literal")),
        SanType::IpAddress("::1".parse().expect("literal")),
    ];
    if !bind.is_unspecified() && !bind.is_loopback() {
        names.push(SanType::IpAddress(bind));
    }
    for s in sans {
        names.push(match s.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(s.as_str().try_into()?),
        });
    }
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, SERVER_NAME);
    p.subject_alt_names = names;
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    validity(&mut p, SERVER_VALIDITY);
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer)?;
    write_private(&dir.join("server.key"), key.serialize_pem().as_bytes())?;
    write_private(&dir.join("server.crt"), cert.pem().as_bytes())?;
    Ok(Pki {
        ca_pem,
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Loads (or creates) the gateway token.
pub fn ensure_token(state_dir: &Path) -> Result<String, TlsError> {
    let path = state_dir.join("token");
    if let Ok(t) = std::fs::read_to_string(&path) {
        let t = t.trim().to_owned();
        if t.len() >= 32 {
            return Ok(t);
        }
    }
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let token = hex::encode(bytes);
    write_private(&path, token.as_bytes())?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// Whether `cert` is still valid `days` from now, as openssl reads it.
    fn valid_in(cert: &Path, days: i64) -> bool {
        let seconds = (days * 86_400).to_string();
        std::process::Command::new("openssl")
            .args(["x509", "-noout", "-checkend", &seconds, "-in"])
            .arg(cert)
            .status()
            .expect("openssl runs")
            .success()
    }

    #[test]
    fn the_ca_lasts_ten_years_and_each_server_certificate_ninety_days() {
        if std::process::Command::new("openssl")
            .arg("version")
            .output()
            .is_err()
        {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED certificate validity: no openssl binary"
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        ensure_pki(dir.path(), &[], "127.0.0.1".parse().unwrap()).unwrap();
        let (ca, server) = (
            dir.path().join("tls/ca.crt"),
            dir.path().join("tls/server.crt"),
        );
        assert!(
            valid_in(&ca, 3640) && !valid_in(&ca, 3651),
            "the CA lasts ten years"
        );
        assert!(
            valid_in(&server, 89) && !valid_in(&server, 91),
            "a server certificate lasts 90 days"
        );
    }

    #[test]
    fn the_ca_and_token_persist_and_every_secret_file_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let a = ensure_pki(
            dir.path(),
            &["gw.example".into()],
            "0.0.0.0".parse().unwrap(),
        )
        .unwrap();
        let b = ensure_pki(dir.path(), &[], "127.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(a.ca_pem, b.ca_pem, "the CA is reused");
        assert_ne!(a.cert_pem, b.cert_pem, "the server certificate is reissued");
        let t1 = ensure_token(dir.path()).unwrap();
        assert_eq!(t1, ensure_token(dir.path()).unwrap());
        assert_eq!(t1.len(), 64);
        for f in [
            "tls/ca.key",
            "tls/ca.crt",
            "tls/server.key",
            "tls/server.crt",
            "token",
        ] {
            let mode = std::fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
    }
}
