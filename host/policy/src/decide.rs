//! The per-connection decision: which rule, if any, admits this target,
//! port and binary, and which of the resolved addresses may be dialled.
//!
//! Rules are tried in key order and the first that admits wins. A denial
//! names the most specific reason found: a rule that matched everything but
//! its addresses, else a rule that matched host and port but not the binary,
//! else no rule.

use std::fmt;
use std::net::IpAddr;

use crate::addr::{self, AddrClass};
use crate::host;
use crate::policy::{Endpoint, Host, Policy};

/// What the sandbox asked to connect to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// A DNS name (a CONNECT host). Never matches an IP-literal host; use
    /// [`Target::from_host`] when the text may be an address.
    Name(&'a str),
    /// An address, as the gateway sees it (a CONNECT to an IP, or a direct dial).
    Ip(IpAddr),
}

impl<'a> Target<'a> {
    /// A CONNECT host as a target: an IP literal (`10.0.0.1`, `[::1]`) is
    /// [`Target::Ip`], anything else [`Target::Name`].
    pub fn from_host(host: &'a str) -> Target<'a> {
        let bare = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        match bare.parse() {
            Ok(ip) => Target::Ip(ip),
            Err(_) => Target::Name(host),
        }
    }
}

/// One outbound TCP connection to decide.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub target: Target<'a>,
    pub port: u16,
    /// The calling process's executable path (symlinks resolved), then its
    /// ancestors' paths. Empty when unknown, which only rules without
    /// `binaries` admit.
    pub binaries: &'a [&'a str],
    /// The addresses the gateway resolved the name to; for [`Target::Ip`], that IP.
    pub resolved: &'a [IpAddr],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow {
        /// The admitting rule's key.
        rule: String,
        /// The subset of `resolved` that may be dialled, in the order given;
        /// never empty. Dial only these (DNS is not consulted again).
        addrs: Vec<IpAddr>,
    },
    Deny {
        /// The rule that matched host, port and binary but whose address
        /// check failed, or matched host and port but not the binary.
        rule: Option<String>,
        reason: DenyReason,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenyReason {
    /// No rule has an endpoint for this host and port.
    NoRule,
    /// A rule has an endpoint for this host and port, but admits other binaries.
    Binary,
    /// The name resolved to no addresses.
    NoAddresses,
    /// Every resolved address was refused; this is the first, by its class.
    AddressRefused { addr: IpAddr, class: AddrClass },
    /// Every resolved address was refused; this first one lies outside the
    /// endpoint's `allowed_ips` (or is not its IP-literal host).
    AddressNotListed { addr: IpAddr },
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoRule => write!(f, "no rule allows this host and port"),
            Self::Binary => write!(
                f,
                "the rule for this host and port does not allow this binary"
            ),
            Self::NoAddresses => write!(f, "the name resolved to no addresses"),
            Self::AddressRefused { addr, class } => match class {
                AddrClass::Private => write!(
                    f,
                    "{addr} is private: allowed only for an exact host or through `allowed_ips`"
                ),
                AddrClass::Loopback => {
                    write!(f, "{addr} is loopback: allowed only through `allowed_ips`")
                }
                _ => write!(f, "{addr} is {class}: never allowed"),
            },
            Self::AddressNotListed { addr } => {
                write!(f, "{addr} is outside the rule's `allowed_ips`")
            }
        }
    }
}

impl Policy {
    /// Decide one connection. Pure: the gateway resolves names, identifies
    /// the binary, and dials; this only says whether and where.
    pub fn decide(&self, req: &Request<'_>) -> Decision {
        let name = match req.target {
            Target::Name(name) => Some(host::normalize(name)),
            Target::Ip(_) => None,
        };
        let mut refused: Option<(&str, DenyReason)> = None;
        let mut wrong_binary: Option<&str> = None;
        for (key, rule) in &self.rules {
            let mut matching = rule
                .endpoints
                .iter()
                .filter(|ep| {
                    ep.ports.contains(&req.port) && targets(ep, &req.target, name.as_deref())
                })
                .peekable();
            if matching.peek().is_none() {
                continue;
            }
            if !rule.admits(req.binaries) {
                wrong_binary.get_or_insert(key);
                continue;
            }
            for ep in matching {
                match dialable(ep, req.resolved) {
                    Ok(addrs) => {
                        return Decision::Allow {
                            rule: key.clone(),
                            addrs,
                        };
                    }
                    Err(reason) => {
                        refused.get_or_insert((key, reason));
                    }
                }
            }
        }
        let (rule, reason) = match (refused, wrong_binary) {
            (Some((key, reason)), _) => (Some(key), reason),
            (None, Some(key)) => (Some(key), DenyReason::Binary),
            (None, None) => (None, DenyReason::NoRule),
        };
        Decision::Deny {
            rule: rule.map(str::to_owned),
            reason,
        }
    }
}

/// Whether an endpoint is for this target. `name` is the normalized name.
fn targets(ep: &Endpoint, target: &Target<'_>, name: Option<&str>) -> bool {
    match (target, &ep.host) {
        (Target::Name(_), Host::Name(pattern)) => name.is_some_and(|name| pattern.matches(name)),
        (Target::Name(_), Host::Ip(_)) => false,
        (Target::Ip(ip), host) => {
            let ip = addr::canonical(*ip);
            matches!(host, Host::Ip(h) if *h == ip)
                || ep.allowed_ips.iter().any(|net| net.contains(&ip))
        }
    }
}

/// The resolved addresses this endpoint lets the gateway dial, in order, or
/// why none: the first refusal.
fn dialable(ep: &Endpoint, resolved: &[IpAddr]) -> Result<Vec<IpAddr>, DenyReason> {
    let mut first_refusal = None;
    let mut addrs = Vec::new();
    for &addr in resolved {
        match guard(ep, addr) {
            Ok(()) => addrs.push(addr),
            Err(reason) => {
                first_refusal.get_or_insert(reason);
            }
        }
    }
    if addrs.is_empty() {
        return Err(first_refusal.unwrap_or(DenyReason::NoAddresses));
    }
    Ok(addrs)
}

/// The address guard, whatever the rule says about names:
/// - metadata, link-local, unspecified, multicast, broadcast, reserved: never;
/// - with `allowed_ips`: only inside them, and then private and loopback too
///   (loopback only this way: our one deviation from upstream, for tests);
/// - without: public; private only for an exact host (a wildcard's names may
///   be pointed anywhere by whoever controls them); loopback never.
fn guard(ep: &Endpoint, addr: IpAddr) -> Result<(), DenyReason> {
    let class = addr::classify(addr);
    let refused = DenyReason::AddressRefused { addr, class };
    if class.is_never_reachable() {
        return Err(refused);
    }
    let ip = addr::canonical(addr);
    if !ep.allowed_ips.is_empty() {
        let listed = ep.allowed_ips.iter().any(|net| net.contains(&ip));
        return if listed {
            Ok(())
        } else {
            Err(DenyReason::AddressNotListed { addr })
        };
    }
    if matches!(ep.host, Host::Ip(host) if host != ip) {
        return Err(DenyReason::AddressNotListed { addr });
    }
    match class {
        AddrClass::Public => Ok(()),
        AddrClass::Private if ep.host.is_exact() => Ok(()),
        AddrClass::Private | AddrClass::Loopback => Err(refused),
        // Refused above already; listed so that a new class must be placed.
        AddrClass::LinkLocal
        | AddrClass::Metadata
        | AddrClass::Unspecified
        | AddrClass::Multicast
        | AddrClass::Broadcast
        | AddrClass::Reserved => Err(refused),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A policy from rule lines under `network_policies:` (indented by two).
    fn policy(rules: &str) -> Policy {
        Policy::parse(&format!("version: 1\nnetwork_policies:\n{rules}")).unwrap()
    }

    fn ask(
        policy: &Policy,
        target: Target<'_>,
        port: u16,
        binaries: &[&str],
        resolved: &[&str],
    ) -> Decision {
        let resolved: Vec<IpAddr> = resolved.iter().map(|s| ip(s)).collect();
        policy.decide(&Request {
            target,
            port,
            binaries,
            resolved: &resolved,
        })
    }

    fn name(policy: &Policy, host: &str, resolved: &[&str]) -> Decision {
        ask(
            policy,
            Target::Name(host),
            443,
            &["/usr/bin/curl"],
            resolved,
        )
    }

    fn allow(rule: &str, addrs: &[&str]) -> Decision {
        Decision::Allow {
            rule: rule.into(),
            addrs: addrs.iter().map(|s| ip(s)).collect(),
        }
    }

    fn deny(rule: Option<&str>, reason: DenyReason) -> Decision {
        Decision::Deny {
            rule: rule.map(str::to_owned),
            reason,
        }
    }

    fn refused(addr: &str, class: AddrClass) -> DenyReason {
        DenyReason::AddressRefused {
            addr: ip(addr),
            class,
        }
    }

    #[test]
    fn deny_all_denies_everything() {
        let p = Policy::deny_all();
        assert_eq!(
            name(&p, "example.com", &["1.1.1.1"]),
            deny(None, DenyReason::NoRule)
        );
        assert_eq!(
            ask(&p, Target::Ip(ip("1.1.1.1")), 443, &[], &["1.1.1.1"]),
            deny(None, DenyReason::NoRule)
        );
        assert!(!p.allows_name("example.com"));
        assert!(p.address_allow_set().is_empty());
    }

    #[test]
    fn a_matching_host_and_port_allows_public_addresses() {
        let p = policy("  web:\n    endpoints: [{host: example.com, ports: [80, 443]}]\n");
        assert_eq!(
            name(&p, "example.com", &["93.184.216.34"]),
            allow("web", &["93.184.216.34"])
        );
        assert_eq!(
            name(&p, "EXAMPLE.com.", &["93.184.216.34"]),
            allow("web", &["93.184.216.34"])
        );
        assert_eq!(
            ask(
                &p,
                Target::Name("example.com"),
                8443,
                &[],
                &["93.184.216.34"]
            ),
            deny(None, DenyReason::NoRule)
        );
        assert_eq!(
            name(&p, "www.example.com", &["93.184.216.34"]),
            deny(None, DenyReason::NoRule)
        );
    }

    #[test]
    fn rules_are_tried_in_key_order_and_the_first_allowing_rule_wins() {
        let p = policy(
            "  zeta:\n    endpoints: [{host: a.example.com, port: 443}]\n  alpha:\n    endpoints: [{host: \"*.example.com\", port: 443}]\n",
        );
        assert_eq!(p.rule_keys().collect::<Vec<_>>(), ["alpha", "zeta"]);
        assert_eq!(
            name(&p, "a.example.com", &["1.1.1.1"]),
            allow("alpha", &["1.1.1.1"])
        );
        // alpha (a wildcard) refuses the private address; zeta (exact) allows it.
        assert_eq!(
            name(&p, "a.example.com", &["10.0.0.1"]),
            allow("zeta", &["10.0.0.1"])
        );
    }

    #[test]
    fn the_allowed_addresses_are_the_permitted_subset_in_the_given_order() {
        let p = policy("  w:\n    endpoints: [{host: \"*.example.com\", port: 443}]\n");
        let resolved = [
            "10.0.0.1",
            "8.8.8.8",
            "169.254.169.254",
            "1.1.1.1",
            "127.0.0.1",
            "2606:4700::1111",
        ];
        assert_eq!(
            name(&p, "a.example.com", &resolved),
            allow("w", &["8.8.8.8", "1.1.1.1", "2606:4700::1111"])
        );
    }

    #[test]
    fn no_resolved_addresses_is_a_denial_naming_the_rule() {
        let p = policy("  w:\n    endpoints: [{host: example.com, port: 443}]\n");
        assert_eq!(
            name(&p, "example.com", &[]),
            deny(Some("w"), DenyReason::NoAddresses)
        );
    }

    #[test]
    fn never_reachable_addresses_are_refused_whatever_the_rule() {
        let p = policy(
            "  exact:\n    endpoints: [{host: example.com, port: 443}]\n  listed:\n    endpoints: [{host: internal.example.com, port: 443, allowed_ips: [10.0.0.0/8, 127.0.0.0/8]}]\n",
        );
        let cases = [
            ("169.254.169.254", AddrClass::Metadata),
            ("::ffff:169.254.169.254", AddrClass::Metadata),
            ("fd00:ec2::254", AddrClass::Metadata),
            ("100.100.100.200", AddrClass::Metadata),
            ("169.254.10.1", AddrClass::LinkLocal),
            ("fe80::1", AddrClass::LinkLocal),
            ("0.0.0.0", AddrClass::Unspecified),
            ("::", AddrClass::Unspecified),
            ("224.0.0.251", AddrClass::Multicast),
            ("ff02::fb", AddrClass::Multicast),
            ("255.255.255.255", AddrClass::Broadcast),
            ("240.1.2.3", AddrClass::Reserved),
        ];
        for (addr, class) in cases {
            assert_eq!(
                name(&p, "example.com", &[addr]),
                deny(Some("exact"), refused(addr, class)),
                "{addr}"
            );
            let got = name(&p, "internal.example.com", &[addr]);
            assert_eq!(got, deny(Some("listed"), refused(addr, class)), "{addr}");
        }
    }

    #[test]
    fn loopback_is_reachable_only_through_allowed_ips() {
        let p = policy(
            "  plain:\n    endpoints: [{host: localhost, port: 8080}]\n  listed:\n    endpoints: [{host: test.internal, port: 8080, allowed_ips: [127.0.0.1]}]\n  ip:\n    endpoints: [{host: 127.0.0.1, port: 9090, allowed_ips: [127.0.0.0/8]}]\n",
        );
        let at = |host, port, addr| ask(&p, Target::Name(host), port, &[], &[addr]);
        assert_eq!(
            at("localhost", 8080, "127.0.0.1"),
            deny(Some("plain"), refused("127.0.0.1", AddrClass::Loopback))
        );
        assert_eq!(
            at("localhost", 8080, "::1"),
            deny(Some("plain"), refused("::1", AddrClass::Loopback))
        );
        assert_eq!(
            at("test.internal", 8080, "127.0.0.1"),
            allow("listed", &["127.0.0.1"])
        );
        assert_eq!(
            at("test.internal", 8080, "::ffff:127.0.0.1"),
            allow("listed", &["::ffff:127.0.0.1"])
        );
        let other = at("test.internal", 8080, "127.0.0.2");
        assert_eq!(
            other,
            deny(
                Some("listed"),
                DenyReason::AddressNotListed {
                    addr: ip("127.0.0.2")
                }
            )
        );
        let direct = ask(&p, Target::Ip(ip("127.0.0.1")), 9090, &[], &["127.0.0.1"]);
        assert_eq!(direct, allow("ip", &["127.0.0.1"]));
    }

    #[test]
    fn private_addresses_need_an_exact_host_or_allowed_ips() {
        let p = policy(
            "  exact:\n    endpoints: [{host: db.example.com, port: 443}]\n  wild:\n    endpoints: [{host: \"*.corp.example.com\", port: 443}]\n  wild_listed:\n    endpoints: [{host: \"**.lab.example.com\", port: 443, allowed_ips: [192.168.0.0/16]}]\n",
        );
        for addr in [
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "fd12::1",
            "::ffff:10.1.2.3",
        ] {
            assert_eq!(
                name(&p, "db.example.com", &[addr]),
                allow("exact", &[addr]),
                "{addr}"
            );
            let wild = name(&p, "x.corp.example.com", &[addr]);
            assert_eq!(
                wild,
                deny(Some("wild"), refused(addr, AddrClass::Private)),
                "{addr}"
            );
        }
        assert_eq!(
            name(&p, "a.b.lab.example.com", &["192.168.7.7"]),
            allow("wild_listed", &["192.168.7.7"])
        );
    }

    #[test]
    fn allowed_ips_bound_every_address_public_ones_included() {
        let p = policy(
            "  r:\n    endpoints: [{host: api.example.com, port: 443, allowed_ips: [203.0.113.0/24]}]\n",
        );
        assert_eq!(
            name(&p, "api.example.com", &["203.0.113.9"]),
            allow("r", &["203.0.113.9"])
        );
        let outside = name(&p, "api.example.com", &["8.8.8.8"]);
        assert_eq!(
            outside,
            deny(
                Some("r"),
                DenyReason::AddressNotListed {
                    addr: ip("8.8.8.8")
                }
            )
        );
    }

    #[test]
    fn an_ip_target_matches_an_ip_host_or_allowed_ips_but_never_a_name() {
        let p = policy(
            "  dns:\n    endpoints: [{host: 8.8.8.8, port: 53}]\n  corp:\n    endpoints: [{host: git.corp.example.com, port: 22, allowed_ips: [10.2.0.0/16]}]\n  web:\n    endpoints: [{host: example.com, port: 443}]\n",
        );
        let direct = |addr: &str, port| ask(&p, Target::Ip(ip(addr)), port, &[], &[addr]);
        assert_eq!(direct("8.8.8.8", 53), allow("dns", &["8.8.8.8"]));
        assert_eq!(
            direct("::ffff:8.8.8.8", 53),
            allow("dns", &["::ffff:8.8.8.8"])
        );
        assert_eq!(direct("8.8.4.4", 53), deny(None, DenyReason::NoRule));
        assert_eq!(direct("10.2.3.4", 22), allow("corp", &["10.2.3.4"]));
        assert_eq!(direct("10.3.0.1", 22), deny(None, DenyReason::NoRule));
        // A name endpoint without allowed_ips is reachable by name only.
        assert_eq!(direct("93.184.216.34", 443), deny(None, DenyReason::NoRule));
        // An IP-literal host is reachable by address only, even spelled as a name.
        let by_name = ask(&p, Target::Name("8.8.8.8"), 53, &[], &["8.8.8.8"]);
        assert_eq!(by_name, deny(None, DenyReason::NoRule));
    }

    #[test]
    fn an_ip_host_dials_only_its_own_address() {
        let p = policy("  dns:\n    endpoints: [{host: 8.8.8.8, port: 53}]\n");
        let got = ask(&p, Target::Ip(ip("8.8.8.8")), 53, &[], &["1.1.1.1"]);
        assert_eq!(
            got,
            deny(
                Some("dns"),
                DenyReason::AddressNotListed {
                    addr: ip("1.1.1.1")
                }
            )
        );
    }

    #[test]
    fn binaries_match_the_caller_or_an_ancestor() {
        let p = policy(
            "  r:\n    endpoints: [{host: example.com, port: 443}]\n    binaries: [{path: /usr/bin/curl}, {path: \"/opt/agent/**\"}]\n",
        );
        let with =
            |binaries: &[&str]| ask(&p, Target::Name("example.com"), 443, binaries, &["1.1.1.1"]);
        assert_eq!(with(&["/usr/bin/curl"]), allow("r", &["1.1.1.1"]));
        assert_eq!(
            with(&["/usr/bin/git", "/bin/bash", "/opt/agent/bin/node"]),
            allow("r", &["1.1.1.1"])
        );
        assert_eq!(
            with(&["/usr/bin/wget", "/bin/bash"]),
            deny(Some("r"), DenyReason::Binary)
        );
        assert_eq!(with(&[]), deny(Some("r"), DenyReason::Binary));
    }

    #[test]
    fn a_rule_without_binaries_admits_any_binary_even_an_unknown_one() {
        let p = policy("  r:\n    endpoints: [{host: example.com, port: 443}]\n");
        assert_eq!(
            ask(&p, Target::Name("example.com"), 443, &[], &["1.1.1.1"]),
            allow("r", &["1.1.1.1"])
        );
    }

    #[test]
    fn a_denial_names_the_most_specific_failure() {
        let p = policy(
            "  a_curl_only:\n    endpoints: [{host: \"*.example.com\", port: 443}]\n    binaries: [{path: /usr/bin/curl}]\n  b_wild:\n    endpoints: [{host: \"*.example.com\", port: 443}]\n  c_wild:\n    endpoints: [{host: \"*.example.com\", port: 443}]\n",
        );
        let wget = |resolved: &[&str]| {
            ask(
                &p,
                Target::Name("x.example.com"),
                443,
                &["/usr/bin/wget"],
                resolved,
            )
        };
        // b_wild matched host, port and binary but refused the address: it beats a_curl_only's binary miss.
        assert_eq!(
            wget(&["10.0.0.1"]),
            deny(Some("b_wild"), refused("10.0.0.1", AddrClass::Private))
        );
        // The first refused address is named.
        let both = wget(&["127.0.0.1", "10.0.0.1"]);
        assert_eq!(
            both,
            deny(Some("b_wild"), refused("127.0.0.1", AddrClass::Loopback))
        );
        let only_binary = policy(
            "  a:\n    endpoints: [{host: example.com, port: 443}]\n    binaries: [{path: /a}]\n  b:\n    endpoints: [{host: example.com, port: 443}]\n    binaries: [{path: /b}]\n",
        );
        let got = ask(
            &only_binary,
            Target::Name("example.com"),
            443,
            &["/c"],
            &["1.1.1.1"],
        );
        assert_eq!(got, deny(Some("a"), DenyReason::Binary));
    }

    #[test]
    fn a_later_endpoint_of_the_same_rule_can_allow_what_an_earlier_refused() {
        let p = policy(
            "  r:\n    endpoints:\n      - {host: \"*.example.com\", port: 443}\n      - {host: db.example.com, port: 443}\n",
        );
        assert_eq!(
            name(&p, "db.example.com", &["10.0.0.5"]),
            allow("r", &["10.0.0.5"])
        );
    }

    #[test]
    fn target_from_host_recognises_ip_literals() {
        assert_eq!(Target::from_host("10.0.0.1"), Target::Ip(ip("10.0.0.1")));
        assert_eq!(Target::from_host("[::1]"), Target::Ip(ip("::1")));
        assert_eq!(Target::from_host("::1"), Target::Ip(ip("::1")));
        assert_eq!(
            Target::from_host("example.com"),
            Target::Name("example.com")
        );
        assert_eq!(
            Target::from_host("[example.com]"),
            Target::Name("[example.com]")
        );
    }

    #[test]
    fn deny_reasons_read_as_one_line() {
        let reasons = [
            (DenyReason::NoRule, "no rule allows this host and port"),
            (
                DenyReason::Binary,
                "the rule for this host and port does not allow this binary",
            ),
            (DenyReason::NoAddresses, "the name resolved to no addresses"),
            (
                refused("10.0.0.1", AddrClass::Private),
                "10.0.0.1 is private: allowed only for an exact host or through `allowed_ips`",
            ),
            (
                refused("::1", AddrClass::Loopback),
                "::1 is loopback: allowed only through `allowed_ips`",
            ),
            (
                refused("169.254.169.254", AddrClass::Metadata),
                "169.254.169.254 is cloud metadata: never allowed",
            ),
            (
                DenyReason::AddressNotListed {
                    addr: ip("8.8.8.8"),
                },
                "8.8.8.8 is outside the rule's `allowed_ips`",
            ),
        ];
        for (reason, text) in reasons {
            assert_eq!(reason.to_string(), text);
        }
    }
}
