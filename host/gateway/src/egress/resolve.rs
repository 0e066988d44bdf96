//! Names to addresses, from the gateway's side: its own table first
//! (`--egress-hosts`, a hosts file: `ADDRESS NAME...` lines, `#` comments),
//! then the system resolver. Resolved once per connection; the dial uses
//! exactly the addresses the policy checked.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, Default)]
pub struct Resolver {
    hosts: BTreeMap<String, Vec<IpAddr>>,
}

#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    #[error("cannot read the egress hosts file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} line {line}: {reason}")]
    Line {
        path: String,
        line: usize,
        reason: String,
    },
}

fn normal(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl Resolver {
    /// Parses a hosts file.
    pub fn from_hosts_file(path: &Path) -> Result<Self, HostsError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| HostsError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text).map_err(|(line, reason)| HostsError::Line {
            path: shown,
            line,
            reason,
        })
    }

    fn parse(text: &str) -> Result<Self, (usize, String)> {
        let mut hosts: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or_default();
            let mut words = line.split_whitespace();
            let Some(addr) = words.next() else { continue };
            let ip: IpAddr = addr
                .parse()
                .map_err(|_| (i + 1, format!("{addr:?} is not an IP address")))?;
            let mut named = false;
            for name in words {
                hosts.entry(normal(name)).or_default().push(ip);
                named = true;
            }
            if !named {
                return Err((i + 1, format!("{addr} names no host")));
            }
        }
        Ok(Self { hosts })
    }

    pub async fn lookup(&self, name: &str, port: u16) -> std::io::Result<Vec<IpAddr>> {
        if let Some(addrs) = self.hosts.get(&normal(name)) {
            return Ok(addrs.clone());
        }
        // Fully qualified: the gateway's search domains never apply.
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        let found = tokio::time::timeout(
            LOOKUP_TIMEOUT,
            tokio::net::lookup_host((fqdn.as_str(), port)),
        )
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "lookup timed out"))??;
        let mut out: Vec<IpAddr> = Vec::new();
        for a in found {
            if !out.contains(&a.ip()) {
                out.push(a.ip());
            }
        }
        Ok(out)
    }
}

/// Whether `ip` is one of this host's own addresses (a listener on the
/// unspecified address answers on each).
pub fn is_local(ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    if ip.is_loopback() || ip.is_unspecified() {
        return true;
    }
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        // Cannot tell: treat it as ours, refusing rather than reaching in.
        return true;
    };
    addrs.into_iter().any(|a| {
        let Some(sa) = a.address else { return false };
        sa.as_sockaddr_in().map(|s| IpAddr::V4(s.ip())) == Some(ip)
            || sa.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())) == Some(ip)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hosts_file_maps_names_case_blind_and_refuses_bad_lines() {
        let r = Resolver::parse(
            "# test names\n127.0.0.1 Allowed.Test other.test. # x\n::1 allowed.test\n\n",
        )
        .unwrap();
        assert_eq!(
            r.hosts["allowed.test"],
            [
                "127.0.0.1".parse::<IpAddr>().unwrap(),
                "::1".parse().unwrap()
            ]
        );
        assert!(r.hosts.contains_key("other.test"));
        assert_eq!(Resolver::parse("a.b.c.d name\n").unwrap_err().0, 1);
        assert_eq!(Resolver::parse("\n10.0.0.1\n").unwrap_err().0, 2);
    }

    #[tokio::test]
    async fn the_table_answers_before_the_system() {
        let r = Resolver::parse("192.0.2.7 localhost\n").unwrap();
        let got = r.lookup("LOCALHOST.", 80).await.unwrap();
        assert_eq!(got, ["192.0.2.7".parse::<IpAddr>().unwrap()]);
    }
}
