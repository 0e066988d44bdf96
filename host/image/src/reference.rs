//! Image references: Docker's normalisation rules, applied once, so the store
//! and the registry client see the same full name (`python:3.12` is
//! `docker.io/library/python:3.12`).
//!
//! The grammar is oci-spec's `Reference` (a port of Docker's
//! `distribution/reference`); on top of it digests must be sha256, the only
//! algorithm the store addresses by.

use oci_client::Reference;

use crate::{Digest, ImageError};

/// A reference as Docker would normalise it: registry (defaulting to
/// `docker.io`, with `library/` for single-component names there), repository,
/// and a tag (default `latest`) unless it is pinned by digest.
pub fn normalize_reference(r: &str) -> Result<String, ImageError> {
    Ok(ImageRef::parse(r)?.to_string())
}

/// A parsed, normalised reference.
#[derive(Clone, Debug)]
pub(crate) struct ImageRef {
    pub(crate) inner: Reference,
    pub(crate) digest: Option<Digest>,
}

impl ImageRef {
    pub(crate) fn parse(r: &str) -> Result<ImageRef, ImageError> {
        let invalid = |reason, source| ImageError::InvalidReference {
            reference: r.to_string(),
            reason,
            source,
        };
        if r.len() > 1024 {
            return Err(invalid("longer than 1024 bytes", None));
        }
        // A bare digest is a store lookup, not something to pull.
        if r.starts_with("sha256:") {
            return Err(invalid("a bare digest names no repository", None));
        }
        let inner: Reference = r
            .parse()
            .map_err(|e| invalid("not NAME[:TAG][@DIGEST]", Some(e)))?;
        // The grammar lets an uppercase first component through as a
        // "domain" that is then not one; Docker refuses it.
        if inner.repository().bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(invalid("repository names are lowercase", None));
        }
        let digest = match inner.digest() {
            None => None,
            Some(d) => Some(
                Digest::parse(d)
                    .map_err(|_| invalid("the digest must be sha256 in lowercase hex", None))?,
            ),
        };
        Ok(ImageRef { inner, digest })
    }

    /// The registry as written in the name (`docker.io`, `127.0.0.1:5000`);
    /// what insecure-registry lists and docker config `auths` are keyed by.
    pub(crate) fn registry(&self) -> &str {
        self.inner.registry()
    }

    /// The same repository pinned to `digest` (the tag dropped): how a
    /// platform's manifest is fetched from an index.
    pub(crate) fn with_digest(&self, digest: &Digest) -> Reference {
        Reference::with_digest(
            self.inner.registry().to_string(),
            self.inner.repository().to_string(),
            digest.to_string(),
        )
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.inner.whole())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    #[test]
    fn references_normalise_as_docker_does() {
        let cases = [
            ("python:3.12", "docker.io/library/python:3.12".to_string()),
            ("python", "docker.io/library/python:latest".to_string()),
            ("team/x", "docker.io/team/x:latest".to_string()),
            (
                "docker.io/python",
                "docker.io/library/python:latest".to_string(),
            ),
            ("index.docker.io/team/x:1", "docker.io/team/x:1".to_string()),
            ("127.0.0.1:5000/a/b:t", "127.0.0.1:5000/a/b:t".to_string()),
            ("localhost/a", "localhost/a:latest".to_string()),
            ("ghcr.io/o/r/deep:v1.2", "ghcr.io/o/r/deep:v1.2".to_string()),
            (
                &format!("name@{D}") as &str,
                format!("docker.io/library/name@{D}"),
            ),
            (
                &format!("reg.io:443/n:t@{D}"),
                format!("reg.io:443/n:t@{D}"),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(normalize_reference(input).unwrap(), want, "{input}");
        }
    }

    #[test]
    fn malformed_references_are_refused_naming_them() {
        for bad in [
            "",
            "UPPER/case",
            "a b",
            "name:",
            "name@sha256:abc",
            "name@sha512:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b98242cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
            "name@sha256:2CF24DBA5FB0A30E26E83B2AC5B9E29E1B161E5C1FA7425E73043362938B9824",
            D,
            "-leading/dash",
        ] {
            match normalize_reference(bad) {
                Err(e @ ImageError::InvalidReference { .. }) => {
                    assert!(e.to_string().contains(&format!("`{bad}`")), "{e}")
                }
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn a_digest_reference_keeps_its_digest() {
        let r = ImageRef::parse(&format!("127.0.0.1:5000/a@{D}")).unwrap();
        assert_eq!(r.digest.as_ref().unwrap().to_string(), D);
        assert_eq!(r.registry(), "127.0.0.1:5000");
    }
}
