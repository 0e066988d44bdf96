//! Sandbox names: DNS labels, user-chosen or generated.

use std::fmt;

/// Longest name a sandbox may have (a DNS label).
pub const MAX_NAME_LEN: usize = 63;

/// A validated DNS label: 1..=63 chars of `[a-z0-9-]`, not starting or ending with `-`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SandboxName(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("sandbox name must not be empty")]
    Empty,
    #[error("sandbox name is {len} characters; the limit is {MAX_NAME_LEN}")]
    TooLong { len: usize },
    #[error(
        "sandbox name {name} is not a DNS label: use lowercase letters, digits and '-', starting and ending with a letter or digit"
    )]
    NotDnsLabel { name: String },
}

impl SandboxName {
    pub fn parse(raw: &str) -> Result<Self, NameError> {
        if raw.is_empty() {
            return Err(NameError::Empty);
        }
        if raw.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong { len: raw.len() });
        }
        let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
        if !raw.chars().all(ok_char) || raw.starts_with('-') || raw.ends_with('-') {
            return Err(NameError::NotDnsLabel {
                name: crate::quote::excerpt(raw, 80),
            });
        }
        Ok(Self(raw.to_owned()))
    }

    /// A readable random name such as `brisk-otter-4821`. The caller retries
    /// on the (rare) collision with a stored name.
    pub fn generate(rng: &mut impl rand::Rng) -> Self {
        const ADJECTIVES: &[&str] = &[
            "amber", "brisk", "calm", "deft", "eager", "fond", "glad", "hardy", "keen", "lucid",
            "merry", "nimble", "plucky", "quiet", "rapid", "sly", "tidy", "vivid", "witty",
            "zesty",
        ];
        const NOUNS: &[&str] = &[
            "otter", "heron", "lynx", "marten", "newt", "osprey", "panda", "quail", "raven",
            "stoat", "tapir", "vole", "walrus", "yak", "badger", "crane", "dingo", "egret",
            "ferret", "gecko",
        ];
        let a = ADJECTIVES[rng.random_range(0..ADJECTIVES.len())];
        let n = NOUNS[rng.random_range(0..NOUNS.len())];
        let d: u16 = rng.random_range(1000..10000);
        Self(format!("{a}-{n}-{d}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SandboxName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_labels() {
        for ok in ["a", "a-b", "sb0", "x".repeat(63).as_str()] {
            assert!(SandboxName::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_what_dns_rejects() {
        assert_eq!(SandboxName::parse(""), Err(NameError::Empty));
        assert_eq!(
            SandboxName::parse(&"x".repeat(64)),
            Err(NameError::TooLong { len: 64 })
        );
        for bad in ["-a", "a-", "A", "a_b", "a.b", "a b", "é"] {
            assert!(
                matches!(SandboxName::parse(bad), Err(NameError::NotDnsLabel { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn generated_names_are_valid() {
        let mut rng = rand::rng();
        for _ in 0..200 {
            let n = SandboxName::generate(&mut rng);
            assert_eq!(SandboxName::parse(n.as_str()).as_ref(), Ok(&n));
        }
    }

    proptest::proptest! {
        /// Fuzzing (issue 8): any input is either refused or a DNS label.
        #[test]
        fn parse_never_panics_and_accepts_only_dns_labels(raw in "\\PC{0,80}|[a-z0-9-]{0,70}") {
            if let Ok(n) = SandboxName::parse(&raw) {
                let s = n.as_str();
                proptest::prop_assert!((1..=MAX_NAME_LEN).contains(&s.len()));
                proptest::prop_assert!(s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
                proptest::prop_assert!(!s.starts_with('-') && !s.ends_with('-'));
                proptest::prop_assert_eq!(s, raw.as_str());
            }
        }

        /// Error messages quote at most 80 characters of what was sent.
        #[test]
        fn name_errors_are_bounded(raw in "\\PC{0,400}") {
            if let Err(e) = SandboxName::parse(&raw) {
                proptest::prop_assert!(e.to_string().chars().count() < 300);
            }
        }
    }
}
