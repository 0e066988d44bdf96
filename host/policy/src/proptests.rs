//! Properties over random input: parsing never panics, and decisions keep
//! their promises (deny-all denies; an Allow dials only permitted addresses).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;

use crate::{AddrClass, Decision, Policy, Request, Target, classify};

const VALID: &str = "\
version: 1
network_policies:
  api:
    name: API
    endpoints:
      - host: api.example.com
        ports: [443, 8443]
      - host: \"*.cdn.example.com\"
        port: 443
    binaries:
      - { path: /usr/bin/curl }
      - { path: \"/opt/**\" }
  corp:
    endpoints:
      - host: \"**.corp.example.com\"
        port: 22
        allowed_ips: [10.0.0.0/8, \"fd00:1::/64\", 127.0.0.1]
      - host: 192.168.1.10
        port: 8080
      - host: 127.0.0.1
        port: 9000
        allowed_ips: [127.0.0.0/8]
      - host: \"*-api.example.org\"
        port: 443
";

/// Names and ports `VALID` has endpoints for (and a few it has not), so
/// that random requests often reach the address guard.
const NAMES: &[(&str, u16)] = &[
    ("api.example.com", 443),
    ("API.EXAMPLE.COM.", 8443),
    ("x.cdn.example.com", 443),
    ("a.b.corp.example.com", 22),
    ("foo-api.example.org", 443),
    ("example.com", 443),
    ("localhost", 9000),
];

/// Addresses and ports `VALID` has endpoints for.
const ADDRS: &[(&str, u16)] = &[
    ("192.168.1.10", 8080),
    ("127.0.0.1", 9000),
    ("10.9.8.7", 22),
    ("fd00:1::5", 22),
];

fn interesting_ip() -> impl Strategy<Value = IpAddr> {
    let fixed: Vec<IpAddr> = [
        "169.254.169.254",
        "169.254.1.1",
        "100.100.100.200",
        "fd00:ec2::254",
        "fe80::1",
        "::ffff:169.254.169.254",
        "64:ff9b::a9fe:a9fe",
        "0.0.0.0",
        "::",
        "224.0.0.1",
        "255.255.255.255",
        "127.0.0.1",
        "::1",
        "::ffff:127.0.0.1",
        "10.1.2.3",
        "::ffff:10.1.2.3",
        "192.168.1.10",
        "fd00:1::5",
        "8.8.8.8",
        "2606:4700::1111",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    prop_oneof![
        proptest::sample::select(fixed),
        any::<u32>().prop_map(|n| IpAddr::V4(Ipv4Addr::from_bits(n))),
        any::<u128>().prop_map(|n| IpAddr::V6(Ipv6Addr::from_bits(n))),
        any::<u32>().prop_map(|n| IpAddr::V6(Ipv4Addr::from_bits(n).to_ipv6_mapped())),
    ]
}

fn binaries() -> impl Strategy<Value = Vec<&'static str>> {
    proptest::collection::vec(
        proptest::sample::select(vec![
            "/usr/bin/curl",
            "/usr/bin/wget",
            "/opt/a/b",
            "/bin/sh",
        ]),
        0..3,
    )
}

/// A target (a name, or an address) and a port: mostly ones `VALID` knows.
fn target_and_port() -> impl Strategy<Value = ((Option<String>, Option<IpAddr>), u16)> {
    let known_name =
        proptest::sample::select(NAMES).prop_map(|(n, p)| ((Some(n.to_owned()), None), p));
    let known_addr =
        proptest::sample::select(ADDRS).prop_map(|(a, p)| ((None, Some(a.parse().unwrap())), p));
    let random_name = ("[a-z*.-]{0,20}", any::<u16>()).prop_map(|(n, p)| ((Some(n), None), p));
    let random_addr = (interesting_ip(), any::<u16>()).prop_map(|(ip, p)| ((None, Some(ip)), p));
    prop_oneof![3 => known_name, 2 => known_addr, 1 => random_name, 1 => random_addr]
}

fn decide(
    policy: &Policy,
    target: &(Option<String>, Option<IpAddr>),
    port: u16,
    binaries: &[&str],
    resolved: &[IpAddr],
) -> Decision {
    let target = match target {
        (Some(name), _) => Target::Name(name),
        (None, Some(ip)) => Target::Ip(*ip),
        (None, None) => unreachable!("the strategy gives one or the other"),
    };
    policy.decide(&Request {
        target,
        port,
        binaries,
        resolved,
    })
}

/// `sub` appears in `all` in order (a subsequence).
fn is_subsequence(sub: &[IpAddr], all: &[IpAddr]) -> bool {
    let mut rest = all.iter();
    sub.iter().all(|a| rest.any(|b| a == b))
}

proptest! {
    #[test]
    fn parse_never_panics_on_arbitrary_text(text in any::<String>()) {
        let _ = Policy::parse(&text);
    }

    #[test]
    fn parse_never_panics_on_yaml_like_text(text in "[a-z_0-9:{}\\[\\],*&!|>'\"#. /\n-]{0,300}") {
        let _ = Policy::parse(&format!("version: 1\n{text}"));
    }

    #[test]
    fn parse_never_panics_on_mutations_of_a_valid_policy(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..3, any::<char>()), 1..8),
    ) {
        let mut doc: Vec<char> = VALID.chars().collect();
        for (at, op, c) in edits {
            let i = at.index(doc.len() + 1);
            match op {
                0 => doc.insert(i, c),
                1 if i < doc.len() => { doc.remove(i); }
                _ if i < doc.len() => doc[i] = c,
                _ => doc.push(c),
            }
        }
        let doc: String = doc.into_iter().collect();
        if let Err(err) = Policy::parse(&doc) {
            // A refusal found after the YAML parsed always names its field.
            let yaml = matches!(err.kind(), crate::PolicyErrorKind::Yaml { .. });
            prop_assert!(yaml || !err.path().is_empty(), "{err}");
            prop_assert!(!err.to_string().contains('\n'), "{err:?}");
        }
    }

    #[test]
    fn deny_all_never_allows(
        (target, port) in target_and_port(),
        binaries in binaries(),
        resolved in proptest::collection::vec(interesting_ip(), 0..4),
    ) {
        let decision = decide(&Policy::deny_all(), &target, port, &binaries, &resolved);
        prop_assert_eq!(decision, Decision::Deny { rule: None, reason: crate::DenyReason::NoRule });
    }

    #[test]
    fn an_allow_dials_only_permitted_resolved_addresses(
        (target, port) in target_and_port(),
        binaries in binaries(),
        resolved in proptest::collection::vec(interesting_ip(), 0..5),
    ) {
        let policy = Policy::parse(VALID).unwrap();
        // A direct dial resolves to itself; but also try a gateway that
        // passes more addresses than the target, which must not widen anything.
        let resolved = match target.1 {
            Some(ip) if resolved.len() % 2 == 0 => vec![ip],
            Some(ip) => std::iter::once(ip).chain(resolved).collect(),
            None => resolved,
        };
        if let Decision::Allow { rule, addrs } = decide(&policy, &target, port, &binaries, &resolved) {
            prop_assert!(policy.rule_keys().any(|k| k == rule));
            prop_assert!(!addrs.is_empty());
            prop_assert!(is_subsequence(&addrs, &resolved), "{addrs:?} from {resolved:?}");
            for addr in &addrs {
                let class = classify(*addr);
                prop_assert!(!class.is_never_reachable(), "{addr} is {class}");
                prop_assert!(class != AddrClass::LinkLocal && class != AddrClass::Metadata);
            }
            match &target {
                // The DNS stub answered for every name a connection may use.
                (Some(name), _) => prop_assert!(policy.allows_name(name), "{name}"),
                // The packet filter passes every address a direct dial may use.
                (None, Some(_)) => {
                    let set = policy.address_allow_set();
                    for ip in addrs.iter().map(|a| a.to_canonical()) {
                        prop_assert!(set.iter().any(|(net, p)| *p == port && net.contains(&ip)), "{ip}:{port}");
                    }
                }
                (None, None) => unreachable!(),
            }
        }
    }
}
