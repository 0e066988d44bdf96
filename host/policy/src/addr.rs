//! Address classes: what kind of place an IP address leads to.
//!
//! One table drives both [`classify`] (per connection) and the load-time
//! check that `allowed_ips` never overlaps a class a sandbox may never
//! reach, so the two cannot disagree.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// What kind of destination an address is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddrClass {
    Public,
    /// RFC 1918, CGNAT (100.64.0.0/10), IPv6 ULA (fc00::/7).
    Private,
    Loopback,
    /// 169.254.0.0/16 and fe80::/10, cloud metadata aside.
    LinkLocal,
    /// Cloud instance metadata services (credentials live there).
    Metadata,
    /// 0.0.0.0/8 and `::`; Linux dials 0.0.0.0 as the local host.
    Unspecified,
    Multicast,
    /// 255.255.255.255.
    Broadcast,
    /// 240.0.0.0/4 and IPv4-compatible IPv6 (`::a.b.c.d`): not routed.
    Reserved,
}

impl AddrClass {
    /// Classes no policy can open: dialling them leaks credentials
    /// (metadata), reaches the host's own link, or means nothing.
    pub fn is_never_reachable(self) -> bool {
        match self {
            Self::LinkLocal
            | Self::Metadata
            | Self::Unspecified
            | Self::Multicast
            | Self::Broadcast
            | Self::Reserved => true,
            Self::Public | Self::Private | Self::Loopback => false,
        }
    }
}

impl fmt::Display for AddrClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Public => "public",
            Self::Private => "private",
            Self::Loopback => "loopback",
            Self::LinkLocal => "link-local",
            Self::Metadata => "cloud metadata",
            Self::Unspecified => "unspecified",
            Self::Multicast => "multicast",
            Self::Broadcast => "broadcast",
            Self::Reserved => "reserved",
        })
    }
}

/// First match wins, so the specific entries come before the ranges that
/// hold them. Anything not listed is public.
const TABLE: &[(IpNet, AddrClass)] = &[
    (v4(169, 254, 169, 254, 32), AddrClass::Metadata), // AWS, GCP, Azure, ...
    (v4(100, 100, 100, 200, 32), AddrClass::Metadata), // Alibaba Cloud, inside CGNAT
    (v4(168, 63, 129, 16, 32), AddrClass::Metadata),   // Azure WireServer (goal state, extensions)
    (v4(169, 254, 0, 0, 16), AddrClass::LinkLocal),
    (v4(0, 0, 0, 0, 8), AddrClass::Unspecified),
    (v4(127, 0, 0, 0, 8), AddrClass::Loopback),
    (v4(10, 0, 0, 0, 8), AddrClass::Private),
    (v4(172, 16, 0, 0, 12), AddrClass::Private),
    (v4(192, 168, 0, 0, 16), AddrClass::Private),
    (v4(100, 64, 0, 0, 10), AddrClass::Private),
    (v4(224, 0, 0, 0, 4), AddrClass::Multicast),
    (v4(255, 255, 255, 255, 32), AddrClass::Broadcast),
    (v4(240, 0, 0, 0, 4), AddrClass::Reserved),
    (
        v6([0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254], 128),
        AddrClass::Metadata,
    ), // AWS over IPv6
    (v6([0; 8], 128), AddrClass::Unspecified),
    (v6([0, 0, 0, 0, 0, 0, 0, 1], 128), AddrClass::Loopback),
    (v6([0; 8], 96), AddrClass::Reserved),
    (v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), AddrClass::LinkLocal),
    (v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7), AddrClass::Private),
    (v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8), AddrClass::Multicast),
];

/// IPv6 ranges that carry an IPv4 address in their last 32 bits: IPv4-mapped
/// (`::ffff:a.b.c.d`, how dual-stack sockets show IPv4 peers) and NAT64
/// (`64:ff9b::a.b.c.d`, which a NAT64 gateway dials as that IPv4 address).
/// Both are classified as the address they carry.
const EMBEDS_V4: &[Ipv6Net] = &[
    Ipv6Net::new_assert(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0), 96),
    Ipv6Net::new_assert(Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96),
];

const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> IpNet {
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), prefix))
}

const fn v6(s: [u16; 8], prefix: u8) -> IpNet {
    let ip = Ipv6Addr::new(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]);
    IpNet::V6(Ipv6Net::new_assert(ip, prefix))
}

/// The class of an address. An IPv6 address carrying an IPv4 one (mapped or
/// NAT64) is classified as that IPv4 address.
pub fn classify(ip: IpAddr) -> AddrClass {
    let ip = match ip {
        IpAddr::V6(v6) => embedded_v4(v6).map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    };
    TABLE
        .iter()
        .find(|(net, _)| net.contains(&ip))
        .map_or(AddrClass::Public, |&(_, class)| class)
}

fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let carried = Ipv4Addr::from_bits(ip.to_bits() as u32);
    EMBEDS_V4
        .iter()
        .any(|net| net.contains(&ip))
        .then_some(carried)
}

/// IPv4-mapped IPv6 as the IPv4 address it maps, so that `::ffff:10.0.0.1`
/// and `10.0.0.1` compare equal against hosts and `allowed_ips`.
pub(crate) fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// The same for a network: a net inside `::ffff:0:0/96` becomes the IPv4 net it maps.
pub(crate) fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.network().to_ipv4_mapped() {
            Some(v4) => IpNet::V4(Ipv4Net::new_assert(v4, v6.prefix_len() - 96)),
            None => net,
        },
        _ => net,
    }
}

/// The first never-reachable class that some address in `net` belongs to.
pub(crate) fn never_reachable_in(net: IpNet) -> Option<AddrClass> {
    // Two CIDR blocks overlap exactly when one contains the other. In table
    // order: a range holding all of `net` classifies whatever earlier,
    // smaller entries left of it, so the search ends there.
    for &(range, class) in TABLE {
        if range.contains(&net) {
            return class.is_never_reachable().then_some(class);
        }
        if net.contains(&range) && class.is_never_reachable() {
            return Some(class);
        }
    }
    let IpNet::V6(v6) = net else { return None };
    EMBEDS_V4.iter().find_map(|embed| {
        if embed.contains(&v6) {
            // Inside an embedding range: check the IPv4 net it carries.
            let carried = Ipv4Addr::from_bits(v6.network().to_bits() as u32);
            never_reachable_in(IpNet::V4(Ipv4Net::new_assert(
                carried,
                v6.prefix_len() - 96,
            )))
        } else if v6.contains(embed) {
            // Holds all of IPv4, metadata included.
            Some(AddrClass::Metadata)
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(s: &str) -> AddrClass {
        classify(s.parse().unwrap())
    }

    #[test]
    fn every_class_is_recognised_in_ipv4_ipv6_and_mapped_form() {
        let table = [
            ("8.8.8.8", AddrClass::Public),
            ("1.1.1.1", AddrClass::Public),
            ("100.63.255.255", AddrClass::Public),
            ("100.128.0.0", AddrClass::Public),
            ("172.32.0.1", AddrClass::Public),
            ("2606:4700::1111", AddrClass::Public),
            ("10.1.2.3", AddrClass::Private),
            ("172.16.0.1", AddrClass::Private),
            ("172.31.255.255", AddrClass::Private),
            ("192.168.1.1", AddrClass::Private),
            ("100.64.0.1", AddrClass::Private),
            ("100.127.255.255", AddrClass::Private),
            ("fd12:3456::1", AddrClass::Private),
            ("fc00::1", AddrClass::Private),
            ("127.0.0.1", AddrClass::Loopback),
            ("127.255.0.9", AddrClass::Loopback),
            ("::1", AddrClass::Loopback),
            ("169.254.1.1", AddrClass::LinkLocal),
            ("fe80::1", AddrClass::LinkLocal),
            ("febf::1", AddrClass::LinkLocal),
            ("169.254.169.254", AddrClass::Metadata),
            ("100.100.100.200", AddrClass::Metadata),
            ("168.63.129.16", AddrClass::Metadata),
            ("fd00:ec2::254", AddrClass::Metadata),
            ("0.0.0.0", AddrClass::Unspecified),
            ("0.1.2.3", AddrClass::Unspecified),
            ("::", AddrClass::Unspecified),
            ("224.0.0.1", AddrClass::Multicast),
            ("239.255.255.255", AddrClass::Multicast),
            ("ff02::1", AddrClass::Multicast),
            ("255.255.255.255", AddrClass::Broadcast),
            ("240.0.0.1", AddrClass::Reserved),
            ("::7f00:1", AddrClass::Reserved),
            // IPv4-mapped and NAT64 IPv6 are the IPv4 address they carry.
            ("::ffff:8.8.8.8", AddrClass::Public),
            ("::ffff:10.0.0.1", AddrClass::Private),
            ("::ffff:127.0.0.1", AddrClass::Loopback),
            ("::ffff:169.254.1.1", AddrClass::LinkLocal),
            ("::ffff:169.254.169.254", AddrClass::Metadata),
            ("::ffff:0.0.0.0", AddrClass::Unspecified),
            ("::ffff:224.0.0.1", AddrClass::Multicast),
            ("::ffff:255.255.255.255", AddrClass::Broadcast),
            ("64:ff9b::169.254.169.254", AddrClass::Metadata),
            ("64:ff9b::8.8.8.8", AddrClass::Public),
        ];
        for (ip, expected) in table {
            assert_eq!(class(ip), expected, "{ip}");
        }
    }

    #[test]
    fn nets_overlapping_never_reachable_ranges_are_found() {
        let table = [
            ("169.254.169.254/32", Some(AddrClass::Metadata)),
            ("169.0.0.0/8", Some(AddrClass::Metadata)),
            ("169.254.10.0/24", Some(AddrClass::LinkLocal)),
            ("100.100.0.0/16", Some(AddrClass::Metadata)),
            ("0.0.0.0/8", Some(AddrClass::Unspecified)),
            ("224.0.0.0/8", Some(AddrClass::Multicast)),
            ("fe80::/64", Some(AddrClass::LinkLocal)),
            ("fd00:ec2::/32", Some(AddrClass::Metadata)),
            ("::ffff:169.254.0.0/112", Some(AddrClass::Metadata)),
            ("::ffff:0:0/96", Some(AddrClass::Metadata)),
            ("64:ff9b::a9fe:a9fe/128", Some(AddrClass::Metadata)),
            ("::/16", Some(AddrClass::Unspecified)),
            ("10.0.0.0/8", None),
            ("127.0.0.0/8", None),
            ("192.168.0.0/16", None),
            ("8.8.8.0/24", None),
            ("::1/128", None),
            ("::2/128", Some(AddrClass::Reserved)),
            ("::/127", Some(AddrClass::Unspecified)),
            ("fd12::/16", None),
            ("2001:db8::/32", None),
            ("::ffff:10.0.0.0/104", None),
            ("::ffff:169.254.1.0/120", Some(AddrClass::LinkLocal)),
            ("64:ff9b::808:808/128", None),
        ];
        for (net, expected) in table {
            assert_eq!(never_reachable_in(net.parse().unwrap()), expected, "{net}");
        }
    }

    #[test]
    fn mapped_addresses_and_nets_become_ipv4() {
        assert_eq!(
            canonical("::ffff:10.0.0.1".parse().unwrap()),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            canonical("::1".parse().unwrap()),
            "::1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            canonical_net("::ffff:10.0.0.0/104".parse().unwrap()),
            "10.0.0.0/8".parse::<IpNet>().unwrap()
        );
        assert_eq!(
            canonical_net("::ffff:0:0/96".parse().unwrap()),
            "0.0.0.0/0".parse::<IpNet>().unwrap()
        );
        assert_eq!(
            canonical_net("fd00::/8".parse().unwrap()),
            "fd00::/8".parse::<IpNet>().unwrap()
        );
    }
}
