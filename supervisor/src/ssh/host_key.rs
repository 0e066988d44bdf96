//! The SSH server's identity: an ed25519 host key made at start and kept
//! only in memory (here and in the gateway's session registry), and the
//! russh configuration every connection shares.

use std::sync::Arc;
use std::time::Duration;

use russh::keys::PrivateKey;
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::{MethodKind, MethodSet};

/// Why the server has no identity.
#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    #[error("cannot encode the SSH host key")]
    Encode(#[source] russh::keys::ssh_key::Error),
}

/// The SSH server: a host key and the configuration built around it.
pub struct SshServer {
    pub(super) config: Arc<russh::server::Config>,
    public_key: String,
}

impl SshServer {
    /// A server with a fresh ed25519 host key.
    pub fn generate() -> Result<Self, HostKeyError> {
        let seed: [u8; 32] = rand::random();
        let key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
        let public_key = key
            .public_key()
            .to_openssh()
            .map_err(HostKeyError::Encode)?
            .trim()
            .to_owned();
        let config = russh::server::Config {
            keys: vec![key],
            methods: MethodSet::from(&[MethodKind::None, MethodKind::PublicKey][..]),
            // Nothing is ever rejected (see the module docs), so there is no
            // timing to hide.
            auth_rejection_time: Duration::ZERO,
            auth_rejection_time_initial: Some(Duration::ZERO),
            // The gateway closes idle relays; the client sends keepalives.
            inactivity_timeout: None,
            ..Default::default()
        };
        Ok(Self {
            config: Arc::new(config),
            public_key,
        })
    }

    /// The host key as an OpenSSH public-key line, `ssh-ed25519 AAAA...`.
    pub fn public_key(&self) -> &str {
        &self.public_key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_server_reports_an_ed25519_public_key_line() {
        let a = SshServer::generate().unwrap();
        let b = SshServer::generate().unwrap();
        let line = a.public_key();
        assert!(line.starts_with("ssh-ed25519 AAAA"), "{line}");
        assert_eq!(line.split(' ').count(), 2, "no comment: {line}");
        assert_ne!(line, b.public_key(), "every start makes a new key");
        russh::keys::PublicKey::from_openssh(line).unwrap();
    }
}
