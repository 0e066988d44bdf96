//! The validated policy: rules keyed by their stable identity, and the
//! questions the gateway asks before any connection (may this name be
//! resolved, which addresses may the packet filter pass).

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::binary::BinaryGlob;
use crate::error::PolicyError;
use crate::host::{self, HostPattern};

/// A validated, immutable network policy. Build one with [`Policy::parse`]
/// or [`Policy::deny_all`]; there is no other way, so every `Policy` has
/// passed the load-time checks.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Iterated in key order, which is also the order rules are tried in.
    pub(crate) rules: BTreeMap<String, Rule>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Rule {
    pub(crate) name: Option<String>,
    pub(crate) endpoints: Vec<Endpoint>,
    /// `None`: any binary. Never `Some(empty)`: the loader refuses it.
    pub(crate) binaries: Option<Vec<BinaryGlob>>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Endpoint {
    pub(crate) host: Host,
    pub(crate) ports: Vec<u16>,
    /// Canonical (IPv4-mapped nets stored as IPv4); empty when absent.
    pub(crate) allowed_ips: Vec<IpNet>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Host {
    /// Canonical: an IPv4-mapped literal is stored as IPv4.
    Ip(IpAddr),
    Name(HostPattern),
}

impl Host {
    pub(crate) fn is_exact(&self) -> bool {
        match self {
            Host::Ip(_) => true,
            Host::Name(pattern) => pattern.is_exact(),
        }
    }
}

impl Rule {
    /// `binaries[0]` is the caller, the rest its ancestors: a rule admits a
    /// connection when any of them matches, so a tool run by an admitted
    /// shell or agent is admitted too.
    pub(crate) fn admits(&self, binaries: &[&str]) -> bool {
        match &self.binaries {
            None => true,
            Some(globs) => binaries
                .iter()
                .any(|path| globs.iter().any(|glob| glob.matches(path))),
        }
    }
}

impl Policy {
    /// Parse and validate a policy document (YAML, the incumbent's schema).
    pub fn parse(yaml: &str) -> Result<Policy, PolicyError> {
        crate::load::parse(yaml)
    }

    /// The policy of a sandbox nobody gave one: version 1, no rules, so
    /// nothing is allowed.
    pub fn deny_all() -> Policy {
        Policy {
            rules: BTreeMap::new(),
        }
    }

    /// Rule keys, in the order rules are tried.
    pub fn rule_keys(&self) -> impl Iterator<Item = &str> {
        self.rules.keys().map(String::as_str)
    }

    /// A rule's display name (`name`), for logs; `None` if the rule has none
    /// or there is no such rule.
    pub fn display_name(&self, key: &str) -> Option<&str> {
        self.rules.get(key)?.name.as_deref()
    }

    /// May this DNS name be resolved at all (some endpoint's host pattern
    /// matches it, any port, any binary)? The gateway's DNS stub answers
    /// NXDOMAIN otherwise, so a sandbox cannot even learn addresses it may
    /// not dial (or leak data through lookups of made-up names).
    pub fn allows_name(&self, name: &str) -> bool {
        let name = host::normalize(name);
        self.endpoints().any(|ep| match &ep.host {
            Host::Name(pattern) => pattern.matches(&name),
            Host::Ip(_) => false,
        })
    }

    /// The ports a DNS name may be dialled on, by any rule and any binary
    /// (sorted, deduplicated); empty when no rule names it, which is when
    /// [`Policy::allows_name`] is false. The sandbox's DNS stub listens for
    /// exactly these on the address it hands out for the name.
    pub fn ports_for_name(&self, name: &str) -> Vec<u16> {
        let name = host::normalize(name);
        let mut ports: Vec<u16> = self
            .endpoints()
            .filter(|ep| matches!(&ep.host, Host::Name(pattern) if pattern.matches(&name)))
            .flat_map(|ep| ep.ports.iter().copied())
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    /// The address-level allow set: (CIDR, port) pairs from endpoints whose
    /// host is an IP literal or that carry `allowed_ips`, sorted and
    /// deduplicated. Pushed into the sandbox's packet filter so most denials
    /// are refused at SYN; the gateway still decides every connection, so
    /// this may be wider than a decision (it ignores binaries) but never
    /// names an address [`Policy::decide`] refuses for every request.
    pub fn address_allow_set(&self) -> Vec<(IpNet, u16)> {
        let mut set = Vec::new();
        for ep in self.endpoints() {
            for net in address_nets(ep) {
                set.extend(ep.ports.iter().map(|&port| (net, port)));
            }
        }
        set.sort_unstable();
        set.dedup();
        set
    }

    pub(crate) fn endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.rules.values().flat_map(|rule| &rule.endpoints)
    }
}

/// The nets an endpoint can be dialled at directly: its `allowed_ips`, which
/// then bound every address (the host IP included); else its host IP.
pub(crate) fn address_nets(ep: &Endpoint) -> Vec<IpNet> {
    match (&ep.host, ep.allowed_ips.is_empty()) {
        (_, false) => ep.allowed_ips.clone(),
        (Host::Ip(ip), true) => vec![IpNet::from(*ip)],
        (Host::Name(_), true) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(rules: &str) -> Policy {
        Policy::parse(&format!("version: 1\nnetwork_policies:\n{rules}")).unwrap()
    }

    #[test]
    fn allows_name_matches_host_patterns_on_any_port_and_binary() {
        let p = policy(
            "  a:\n    endpoints: [{host: api.example.com, port: 443}, {host: \"*.cdn.example.net\", port: 80}]\n    binaries: [{path: /usr/bin/curl}]\n  b:\n    endpoints: [{host: 1.1.1.1, port: 53}]\n",
        );
        assert!(p.allows_name("api.example.com"));
        assert!(p.allows_name("API.EXAMPLE.COM."));
        assert!(p.allows_name("x.cdn.example.net"));
        assert!(!p.allows_name("cdn.example.net"));
        assert!(!p.allows_name("example.com"));
        assert!(!p.allows_name("1.1.1.1"));
        assert!(!p.allows_name(""));
    }

    #[test]
    fn ports_for_name_are_the_union_of_every_rule_naming_it() {
        let p = policy(
            "  a:\n    endpoints: [{host: api.example.com, ports: [443, 8443]}, {host: \"*.example.com\", port: 80}]\n    binaries: [{path: /usr/bin/curl}]\n  b:\n    endpoints: [{host: API.example.com, port: 443}, {host: 1.1.1.1, port: 53}]\n",
        );
        assert_eq!(p.ports_for_name("api.example.com."), vec![80, 443, 8443]);
        assert_eq!(p.ports_for_name("www.example.com"), vec![80]);
        assert_eq!(p.ports_for_name("example.com"), Vec::<u16>::new());
        assert_eq!(p.ports_for_name("1.1.1.1"), Vec::<u16>::new());
        for name in ["api.example.com", "www.example.com", "example.com", "x.y"] {
            assert_eq!(p.allows_name(name), !p.ports_for_name(name).is_empty());
        }
    }

    #[test]
    fn the_address_allow_set_holds_ip_hosts_and_allowed_ips_by_port() {
        let p = policy(
            "  dns:\n    endpoints: [{host: 8.8.8.8, ports: [53, 853]}]\n  corp:\n    endpoints: [{host: git.corp.example.com, port: 22, allowed_ips: [10.2.0.0/16, \"fd00:1::/64\"]}]\n  web:\n    endpoints: [{host: example.com, port: 443}]\n  dup:\n    endpoints: [{host: 8.8.8.8, port: 53}]\n  pinned:\n    endpoints: [{host: 192.168.1.10, port: 8080, allowed_ips: [192.168.1.0/24]}]\n",
        );
        let pairs: Vec<(IpNet, u16)> = [
            ("8.8.8.8/32", 53),
            ("8.8.8.8/32", 853),
            ("10.2.0.0/16", 22),
            ("192.168.1.0/24", 8080),
            ("fd00:1::/64", 22),
        ]
        .iter()
        .map(|&(net, port)| (net.parse().unwrap(), port))
        .collect();
        let mut expected = pairs.clone();
        expected.sort_unstable();
        assert_eq!(p.address_allow_set(), expected);
    }

    #[test]
    fn display_names_come_from_name() {
        let p = policy(
            "  a:\n    name: Alpha\n    endpoints: [{host: a.example.com, port: 1}]\n  b:\n    endpoints: [{host: b.example.com, port: 1}]\n",
        );
        assert_eq!(p.display_name("a"), Some("Alpha"));
        assert_eq!(p.display_name("b"), None);
        assert_eq!(p.display_name("c"), None);
    }
}
