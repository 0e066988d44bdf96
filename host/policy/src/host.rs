//! Endpoint host patterns: an exact DNS name, or a wildcard in the first label.
//!
//! `*` may appear only in the first label, which keeps matching a suffix
//! comparison plus one label check, and keeps every pattern anchored to a
//! domain its author names. A wildcard needs at least two labels after it, so
//! `*.com` is refused; without a public-suffix list, `*.co.uk` is not.

/// A validated host pattern, lowercased, without a trailing dot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HostPattern {
    /// `api.example.com`: that name only.
    Exact(String),
    /// `prefix*suffix.rest`: `*` stands for one or more characters other than a dot.
    Label {
        prefix: String,
        suffix: String,
        rest: String,
    },
    /// `**.rest`: one or more whole labels before `rest`.
    AnyDepth { rest: String },
}

/// Why a host is not a valid DNS name or pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("it is empty")]
    Empty,
    #[error("it is longer than 253 characters")]
    TooLong,
    #[error("it has an empty label (two dots in a row, or a leading dot)")]
    EmptyLabel,
    #[error("a label is longer than 63 characters")]
    LabelTooLong,
    #[error(
        "`{0}` is not allowed in a DNS name (use punycode, `xn--...`, for international names)"
    )]
    Character(char),
    #[error("a label starts or ends with `-`")]
    Hyphen,
    #[error("its last label is numeric, so it is neither a DNS name nor an IP address")]
    NumericTld,
    #[error("`*` is allowed only in the first label, e.g. `*.example.com`")]
    WildcardNotFirst,
    #[error(
        "use one `*` in the first label (`*-api.example.com`), or `**` alone (`**.example.com`)"
    )]
    WildcardForm,
    #[error(
        "a wildcard needs at least two labels after it (`*.example.com`): `*`, `**` and `*.com` would match too much"
    )]
    WildcardTooBroad,
}

impl HostPattern {
    /// Parse a host that is not an IP literal.
    pub(crate) fn parse(raw: &str) -> Result<Self, HostError> {
        let host = normalize(raw);
        if host.is_empty() {
            return Err(HostError::Empty);
        }
        if host.len() > 253 {
            return Err(HostError::TooLong);
        }
        let (first, rest) = host.split_once('.').unwrap_or((&host, ""));
        if !first.contains('*') {
            if host.contains('*') {
                return Err(HostError::WildcardNotFirst);
            }
            check_labels(&host)?;
            return Ok(Self::Exact(host));
        }
        if rest.contains('*') {
            return Err(HostError::WildcardNotFirst);
        }
        if rest.split('.').filter(|l| !l.is_empty()).count() < 2 {
            return Err(HostError::WildcardTooBroad);
        }
        check_labels(rest)?;
        let rest = rest.to_owned();
        if first == "**" {
            return Ok(Self::AnyDepth { rest });
        }
        let Some((prefix, suffix)) = first.split_once('*').filter(|(_, s)| !s.contains('*')) else {
            return Err(HostError::WildcardForm);
        };
        if let Some(c) = prefix
            .chars()
            .chain(suffix.chars())
            .find(|&c| !is_label_char(c))
        {
            return Err(HostError::Character(c));
        }
        if first.len() > 63 {
            return Err(HostError::LabelTooLong);
        }
        if prefix.starts_with('-') || suffix.ends_with('-') {
            return Err(HostError::Hyphen);
        }
        Ok(Self::Label {
            prefix: prefix.to_owned(),
            suffix: suffix.to_owned(),
            rest,
        })
    }

    /// Whether a name, already [`normalize`]d, matches.
    pub(crate) fn matches(&self, name: &str) -> bool {
        match self {
            Self::Exact(host) => name == host,
            Self::Label {
                prefix,
                suffix,
                rest,
            } => below(name, rest).is_some_and(|label| {
                !label.contains('.')
                    && label.len() > prefix.len() + suffix.len()
                    && label.starts_with(prefix.as_str())
                    && label.ends_with(suffix.as_str())
            }),
            Self::AnyDepth { rest } => {
                below(name, rest).is_some_and(|labels| labels.split('.').all(|l| !l.is_empty()))
            }
        }
    }

    /// Exact hosts may reach private addresses; wildcards may not, since
    /// anyone who controls a name under the wildcard could point it inside.
    pub(crate) fn is_exact(&self) -> bool {
        matches!(self, Self::Exact(_))
    }
}

/// Lowercase and drop one trailing dot: `API.Example.com.` and
/// `api.example.com` are the same name.
pub(crate) fn normalize(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// The part of `name` before `.rest`, if `name` ends with `.rest`.
fn below<'a>(name: &'a str, rest: &str) -> Option<&'a str> {
    name.strip_suffix(rest)?.strip_suffix('.')
}

fn check_labels(name: &str) -> Result<(), HostError> {
    for label in name.split('.') {
        if label.is_empty() {
            return Err(HostError::EmptyLabel);
        }
        if label.len() > 63 {
            return Err(HostError::LabelTooLong);
        }
        if let Some(c) = label.chars().find(|&c| !is_label_char(c)) {
            return Err(HostError::Character(c));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(HostError::Hyphen);
        }
    }
    // A numeric top-level label means a mistyped IP (`10.0.0.256`) or a
    // wildcard over one (`*.0.0.1`); no real TLD is numeric.
    if name
        .rsplit('.')
        .next()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(HostError::NumericTld);
    }
    Ok(())
}

/// Letters, digits, hyphen, and underscore, which real names use (`_dmarc`)
/// even though RFC 1123 hostnames do not.
fn is_label_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(pattern: &str, name: &str) -> bool {
        HostPattern::parse(pattern)
            .unwrap()
            .matches(&normalize(name))
    }

    #[test]
    fn patterns_match_names_as_the_table_says() {
        let table = [
            ("api.example.com", "api.example.com", true),
            ("api.example.com", "API.Example.COM", true),
            ("api.example.com", "api.example.com.", true),
            ("API.example.com.", "api.example.com", true),
            ("api.example.com", "example.com", false),
            ("api.example.com", "x.api.example.com", false),
            ("api.example.com", "api.example.com.evil.net", false),
            ("api.example.com", "api.example.co", false),
            ("*.example.com", "a.example.com", true),
            ("*.example.com", "A.EXAMPLE.com.", true),
            ("*.example.com", "example.com", false),
            ("*.example.com", "a.b.example.com", false),
            ("*.example.com", ".example.com", false),
            ("*.example.com", "evil-example.com", false),
            ("*.example.com", "aexample.com", false),
            ("*.example.com", "a.example.com.evil.net", false),
            ("**.example.com", "a.example.com", true),
            ("**.example.com", "a.b.c.example.com", true),
            ("**.example.com", "example.com", false),
            ("**.example.com", "evil-example.com", false),
            ("**.example.com", "a..example.com", false),
            ("**.example.com", ".example.com", false),
            ("*-api.example.com", "foo-api.example.com", true),
            ("*-api.example.com", "FOO-API.example.com", true),
            ("*-api.example.com", "-api.example.com", false),
            ("*-api.example.com", "foo-api2.example.com", false),
            ("*-api.example.com", "x.foo-api.example.com", false),
            ("*-api.example.com", "fooapi.example.com", false),
            ("api-*.example.com", "api-eu.example.com", true),
            ("api-*.example.com", "api-.example.com", false),
            ("a*z.example.com", "abz.example.com", true),
            ("a*z.example.com", "az.example.com", false),
            ("*.sub.example.com", "a.sub.example.com", true),
            ("*.sub.example.com", "a.example.com", false),
        ];
        for (pattern, name, expected) in table {
            assert_eq!(matches(pattern, name), expected, "{pattern} vs {name}");
        }
    }

    #[test]
    fn only_exact_hosts_are_exact() {
        assert!(HostPattern::parse("a.example.com").unwrap().is_exact());
        assert!(!HostPattern::parse("*.example.com").unwrap().is_exact());
        assert!(!HostPattern::parse("**.example.com").unwrap().is_exact());
    }

    #[test]
    fn hosts_are_stored_lowercase_without_the_trailing_dot() {
        assert_eq!(
            HostPattern::parse("API.Example.com.").unwrap(),
            HostPattern::Exact("api.example.com".into())
        );
        assert_eq!(
            HostPattern::parse("localhost").unwrap(),
            HostPattern::Exact("localhost".into())
        );
    }

    #[test]
    fn bad_hosts_are_refused_with_the_reason() {
        let long_label = format!("{}.example.com", "a".repeat(64));
        let long_name = format!("{}.com", "a.".repeat(130));
        let long_wild_label = format!("{}*.example.com", "a".repeat(63));
        let table: &[(&str, HostError)] = &[
            ("", HostError::Empty),
            (".", HostError::Empty),
            ("*", HostError::WildcardTooBroad),
            ("**", HostError::WildcardTooBroad),
            ("*.com", HostError::WildcardTooBroad),
            ("**.com", HostError::WildcardTooBroad),
            ("*-api.com", HostError::WildcardTooBroad),
            ("*.", HostError::WildcardTooBroad),
            ("a.*.example.com", HostError::WildcardNotFirst),
            ("example.*", HostError::WildcardNotFirst),
            ("*.*.example.com", HostError::WildcardNotFirst),
            ("a**.example.com", HostError::WildcardForm),
            ("*a*.example.com", HostError::WildcardForm),
            ("***.example.com", HostError::WildcardForm),
            ("*.0.0.1", HostError::NumericTld),
            ("10.0.0.256", HostError::NumericTld),
            ("1.2.3", HostError::NumericTld),
            ("a..example.com", HostError::EmptyLabel),
            (".example.com", HostError::EmptyLabel),
            ("*..example.com", HostError::EmptyLabel),
            ("exa mple.com", HostError::Character(' ')),
            ("exämple.com", HostError::Character('ä')),
            ("[::1]", HostError::Character('[')),
            ("example.com:443", HostError::Character(':')),
            ("*!.example.com", HostError::Character('!')),
            ("-a.example.com", HostError::Hyphen),
            ("a-.example.com", HostError::Hyphen),
            ("-*.example.com", HostError::Hyphen),
            (&long_label, HostError::LabelTooLong),
            (&long_wild_label, HostError::LabelTooLong),
            (&long_name, HostError::TooLong),
        ];
        for (host, expected) in table {
            assert_eq!(HostPattern::parse(host).as_ref(), Err(expected), "{host}");
        }
    }
}
