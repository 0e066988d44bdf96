//! Why a policy document was refused, and where.
//!
//! [`PolicyError`] carries the position (line, field path, or both) and a
//! [`PolicyErrorKind`] saying what is wrong and what to write instead. Every
//! refusal the loader can produce is a variant here, so this file is also the
//! list of rules a user can trip over.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::addr::AddrClass;
use crate::host::HostError;

/// A refused policy document.
///
/// Displays as `line N: path: reason`, dropping whichever of line and path is
/// unknown: YAML syntax errors know a line but not a path; errors found after
/// deserialising know both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    line: Option<u64>,
    path: String,
    kind: PolicyErrorKind,
}

impl PolicyError {
    pub(crate) fn new(line: Option<u64>, path: impl Into<String>, kind: PolicyErrorKind) -> Self {
        Self {
            line,
            path: path.into(),
            kind,
        }
    }

    /// The 1-based line the problem is on, when known.
    pub fn line(&self) -> Option<u64> {
        self.line
    }

    /// The field the problem is in, e.g. `network_policies.github.endpoints[0].host`;
    /// empty for problems with the whole document (size, syntax).
    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn kind(&self) -> &PolicyErrorKind {
        &self.kind
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        write!(f, "{}", self.kind)
    }
}

impl std::error::Error for PolicyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.kind.source()
    }
}

/// What is wrong with a policy document. Messages name the fix; the field is
/// in [`PolicyError::path`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyErrorKind {
    #[error("the document is {bytes} bytes; the limit is {limit} bytes")]
    TooLarge { bytes: usize, limit: usize },
    /// Invalid YAML, or YAML of the wrong shape (unknown key, missing key,
    /// wrong type). The YAML library's message, without its position (that is
    /// in [`PolicyError::line`]), so this error stays independent of its types.
    #[error("{message}")]
    Yaml { message: String },
    #[error("more than {limit} {what}: use fewer (wildcards and CIDRs cover several)")]
    TooMany { what: &'static str, limit: usize },
    #[error("`{field}` has no value: give one, or omit the key")]
    Null { field: &'static str },
    #[error("`{field}` is empty: list at least one entry, or omit the key")]
    Empty { field: &'static str },
    #[error("`version` must be 1{}", found.map(|v| format!(", not {v}")).unwrap_or_default())]
    Version { found: Option<i64> },
    #[error("`{field}` is not supported yet: remove it")]
    NotSupported { field: &'static str },
    #[error(
        "`{field}` is not supported yet (L7 rules come with HTTP inspection): remove it for a TCP passthrough rule"
    )]
    L7NotSupported { field: &'static str },
    #[error("rule key `{key}` appears twice: keys must be unique")]
    DuplicateKey { key: String },
    #[error("rule key `{key}` is invalid: use 1 to 128 characters from A-Z a-z 0-9 _ . -")]
    RuleKey { key: String },
    #[error("`name` must be 1 to 256 characters with no control characters")]
    Name,
    #[error("`endpoints` is empty: a rule needs at least one endpoint")]
    NoEndpoints,
    #[error(
        "`binaries` is empty, which would allow no binary: omit the key to allow any binary, or list at least one `{{ path: ... }}`"
    )]
    NoBinaries,
    #[error("binary path `{path}` is relative: give an absolute path (starting with /)")]
    RelativeBinary { path: String },
    #[error("binary path `{path}` is not a valid glob")]
    BinaryGlob {
        path: String,
        #[source]
        source: globset::Error,
    },
    #[error("host `{host}` is invalid: {source}")]
    Host {
        host: String,
        #[source]
        source: HostError,
    },
    #[error("host {ip} is {class}, which a sandbox may never reach")]
    HostNeverReachable { ip: IpAddr, class: AddrClass },
    #[error("host {ip} is loopback, which is reachable only when `allowed_ips` names it")]
    LoopbackHost { ip: IpAddr },
    #[error("give either `port` or `ports`, not both")]
    PortAndPorts,
    #[error("give `port` (one TCP port) or `ports` (a list)")]
    NoPort,
    #[error("a port must be an integer from 1 to 65535{}", found.map(|v| format!(", not {v}")).unwrap_or_default())]
    Port { found: Option<i64> },
    #[error("`{value}` is not an IP address or CIDR (e.g. 10.0.0.0/8 or 2001:db8::/32)")]
    Cidr { value: String },
    #[error(
        "{net} is too broad: the shortest prefix allowed is /8 for IPv4 and /16 for IPv6 (ordinary endpoints without `allowed_ips` already reach public addresses)"
    )]
    BroadCidr { net: IpNet },
    #[error(
        "{net} overlaps {class} addresses, which a sandbox may never reach whatever the policy says"
    )]
    CidrNeverReachable { net: IpNet, class: AddrClass },
    #[error(
        "the address allow set would hold {pairs} (CIDR, port) pairs; the limit is {limit}: use fewer ports or `allowed_ips` per endpoint"
    )]
    AllowSetTooLarge { pairs: usize, limit: usize },
}

/// Room for a user-supplied value quoted in a message.
pub(crate) const VALUE_CHARS: usize = 80;

/// A user-supplied string fit for an error message: control characters
/// escaped first, then cut, so that neither an escape storm nor a huge value
/// makes the message unbounded.
pub(crate) fn excerpt(s: &str, max_chars: usize) -> String {
    let mut out = String::new();
    let mut kept = 0;
    for c in s.chars() {
        let piece = if c.is_control() {
            c.escape_default().to_string()
        } else {
            c.to_string()
        };
        for c in piece.chars() {
            if kept == max_chars {
                out.push('…');
                return out;
            }
            out.push(c);
            kept += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_puts_line_then_path_then_reason() {
        let both = PolicyError::new(
            Some(7),
            "network_policies.a.endpoints[0]",
            PolicyErrorKind::NoPort,
        );
        assert_eq!(
            both.to_string(),
            "line 7: network_policies.a.endpoints[0]: give `port` (one TCP port) or `ports` (a list)"
        );
        let path_only =
            PolicyError::new(None, "version", PolicyErrorKind::Version { found: Some(2) });
        assert_eq!(path_only.to_string(), "version: `version` must be 1, not 2");
        let neither = PolicyError::new(None, "", PolicyErrorKind::TooLarge { bytes: 9, limit: 8 });
        assert_eq!(
            neither.to_string(),
            "the document is 9 bytes; the limit is 8 bytes"
        );
    }

    #[test]
    fn excerpt_escapes_control_characters_and_bounds_the_length() {
        assert_eq!(excerpt("a\nb\u{1b}", 80), "a\\nb\\u{1b}");
        let long = excerpt(&"\u{1b}".repeat(10_000), 80);
        assert_eq!(long.chars().count(), 81, "{long}");
        assert!(long.ends_with('…'));
        assert_eq!(excerpt("short", 5), "short");
        assert_eq!(excerpt("shorter", 5), "short…");
    }
}
