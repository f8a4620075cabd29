//! Which peers the relay may reach (RFC 8656 §21.1, "relaying to internal
//! addresses"). Strict by default: every IANA special-purpose range is
//! refused, after IPv4-embedded IPv6 forms are turned back into the IPv4
//! address they carry, so `::ffff:127.0.0.1`, `::127.0.0.1`,
//! `64:ff9b::7f00:1` and `2002:7f00:1::` are all judged as `127.0.0.1`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

pub use wire::net::IpNet;

/// IPv4 special-purpose ranges (IANA registry, plus multicast and class E).
const DENY_V4: &[([u8; 4], u8)] = &[
    ([0, 0, 0, 0], 8),       // "this network" (RFC 791), incl. 0.0.0.0
    ([10, 0, 0, 0], 8),      // private (RFC 1918)
    ([100, 64, 0, 0], 10),   // shared address space / CGNAT (RFC 6598)
    ([127, 0, 0, 0], 8),     // loopback
    ([169, 254, 0, 0], 16),  // link-local, cloud metadata 169.254.169.254
    ([172, 16, 0, 0], 12),   // private
    ([192, 0, 0, 0], 24),    // IETF protocol assignments
    ([192, 0, 2, 0], 24),    // TEST-NET-1
    ([192, 31, 196, 0], 24), // AS112-v4
    ([192, 52, 193, 0], 24), // AMT
    ([192, 88, 99, 0], 24),  // deprecated 6to4 relay anycast
    ([192, 168, 0, 0], 16),  // private
    ([192, 175, 48, 0], 24), // direct delegation AS112
    ([198, 18, 0, 0], 15),   // benchmarking
    ([198, 51, 100, 0], 24), // TEST-NET-2
    ([203, 0, 113, 0], 24),  // TEST-NET-3
    ([224, 0, 0, 0], 4),     // multicast
    ([240, 0, 0, 0], 4),     // reserved, incl. broadcast 255.255.255.255
];

/// IPv6 special-purpose ranges that do not carry an IPv4 address.
const DENY_V6: &[(u128, u8)] = &[
    (0, 128),                     // unspecified ::
    (1, 128),                     // loopback ::1
    (0x0064_ff9b_0001 << 80, 48), // local-use NAT64 (RFC 8215)
    (0x0100 << 112, 64),          // discard-only (RFC 6666)
    (0x2001 << 112, 23),          // IETF protocol assignments, incl. Teredo 2001::/32
    (0x2001_0db8 << 96, 32),      // documentation
    (0x3fff << 112, 20),          // documentation (RFC 9637)
    (0x5f00 << 112, 16),          // SRv6 SIDs
    (0xfc00 << 112, 7),           // unique local, incl. fd00:ec2::254 metadata
    (0xfe80 << 112, 10),          // link-local
    (0xfec0 << 112, 10),          // deprecated site-local
    (0xff00 << 112, 8),           // multicast
];

/// Turns an IPv6 address that embeds an IPv4 address back into that IPv4
/// address: IPv4-mapped `::ffff:0:0/96`, IPv4-compatible `::/96`, IPv4-
/// translated `::ffff:0:0:0/96`, NAT64 `64:ff9b::/96` and 6to4 `2002::/16`.
pub fn canonicalize(ip: IpAddr) -> IpAddr {
    let v6 = match ip {
        IpAddr::V4(_) => return ip,
        IpAddr::V6(v6) => v6,
    };
    let bits = u128::from(v6);
    let low32 = Ipv4Addr::from(bits as u32);
    let top96 = bits >> 32;
    if top96 == 0xffff || top96 == 0xffff_0000 || top96 == 0x0064_ff9b_0000_0000_0000_0000 {
        return IpAddr::V4(low32);
    }
    // ::/96 except :: and ::1, which stay IPv6 and are denied as such.
    if top96 == 0 && bits > 1 {
        return IpAddr::V4(low32);
    }
    if bits >> 112 == 0x2002 {
        return IpAddr::V4(Ipv4Addr::from((bits >> 80) as u32));
    }
    IpAddr::V6(v6)
}

/// Why a peer was refused, for the 403 reason and the metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    SpecialPurpose,
    OwnAddress,
    Operator,
}

/// The peer filter: an explicit allow-list wins, then the built-in special
/// ranges, the server's own addresses and the operator's deny-list refuse.
#[derive(Debug, Clone, Default)]
pub struct PeerPolicy {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
    own_ips: Vec<IpAddr>,
    own_sockets: Vec<SocketAddr>,
}

impl PeerPolicy {
    pub fn new(
        allow: Vec<IpNet>,
        deny: Vec<IpNet>,
        own_ips: Vec<IpAddr>,
        own_sockets: Vec<SocketAddr>,
    ) -> Self {
        PeerPolicy {
            allow,
            deny,
            own_ips: own_ips.into_iter().map(canonicalize).collect(),
            own_sockets,
        }
    }

    /// Checks a peer transport address.
    pub fn check(&self, peer: SocketAddr) -> Result<(), Denied> {
        let ip = canonicalize(peer.ip());
        // The server's own listeners are never a peer: that would loop.
        if self
            .own_sockets
            .iter()
            .any(|s| canonicalize(s.ip()) == ip && s.port() == peer.port())
        {
            return Err(Denied::OwnAddress);
        }
        self.check_ip(peer.ip())
    }

    /// Checks a peer IP address, as a permission names it (RFC 8656 §9:
    /// its port is ignored). Data to one of the server's own listeners is
    /// still refused where a port is named: ChannelBind, Send, Connect.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), Denied> {
        let ip = canonicalize(ip);
        if self.allow.iter().any(|n| n.contains(ip)) {
            return Ok(());
        }
        if is_special(ip) {
            return Err(Denied::SpecialPurpose);
        }
        if self.own_ips.contains(&ip) {
            return Err(Denied::OwnAddress);
        }
        if self.deny.iter().any(|n| n.contains(ip)) {
            return Err(Denied::Operator);
        }
        Ok(())
    }
}

fn is_special(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let a = u32::from(v4);
            DENY_V4.iter().any(|&(net, p)| {
                let mask = u32::MAX.checked_shl(32 - u32::from(p)).unwrap_or(0);
                u32::from(Ipv4Addr::from(net)) & mask == a & mask
            })
        }
        IpAddr::V6(v6) => {
            let a = u128::from(v6);
            DENY_V6.iter().any(|&(net, p)| {
                let mask = u128::MAX.checked_shl(128 - u32::from(p)).unwrap_or(0);
                net & mask == a & mask
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v6(s: &str) -> std::net::Ipv6Addr {
        s.parse().unwrap()
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn every_embedded_loopback_form_is_denied() {
        let p = PeerPolicy::default();
        for peer in [
            "127.0.0.1:80",
            "127.255.255.254:80",
            "0.0.0.0:80",
            "[::]:80",
            "[::1]:80",
            "[::ffff:127.0.0.1]:80",
            "[::127.0.0.1]:80",
            "[::ffff:0:127.0.0.1]:80",
            "[64:ff9b::127.0.0.1]:80",
            "[64:ff9b:1::7f00:1]:80",
            "[2002:7f00:1::]:80",
            "[2001:0:4136:e378:8000:63bf:3fff:fdd2]:80",
        ] {
            assert!(p.check(sa(peer)).is_err(), "{peer} must be denied");
        }
    }

    #[test]
    fn special_ranges_are_denied() {
        let p = PeerPolicy::default();
        for peer in [
            "10.1.2.3:1",
            "172.16.0.1:1",
            "172.31.255.255:1",
            "192.168.1.1:1",
            "100.64.0.1:1",
            "100.127.255.255:1",
            "169.254.169.254:80",
            "224.0.0.1:1",
            "239.255.255.250:1900",
            "255.255.255.255:1",
            "240.0.0.1:1",
            "192.0.2.1:1",
            "198.51.100.7:1",
            "203.0.113.9:1",
            "198.18.0.1:1",
            "192.0.0.8:1",
            "[fd00:ec2::254]:80",
            "[fc00::1]:1",
            "[fe80::1]:1",
            "[ff02::1]:1",
            "[2001:db8::1]:1",
            "[::ffff:10.0.0.1]:1",
            "[::ffff:169.254.169.254]:80",
            "[64:ff9b::192.168.0.1]:1",
            "[2002:c0a8:101::1]:1",
            "[100::1]:1",
            "[fec0::1]:1",
        ] {
            assert_eq!(p.check(sa(peer)), Err(Denied::SpecialPurpose), "{peer}");
        }
    }

    #[test]
    fn public_peers_are_allowed_including_embedded_forms() {
        let p = PeerPolicy::default();
        for peer in [
            "8.8.8.8:53",
            "1.1.1.1:3478",
            "[2606:4700::1111]:443",
            "[::ffff:8.8.8.8]:53",
            "[64:ff9b::8.8.8.8]:53",
            "[2002:808:808::1]:1",
            "100.128.0.1:1",
            "172.32.0.1:1",
        ] {
            assert_eq!(p.check(sa(peer)), Ok(()), "{peer}");
        }
    }

    #[test]
    fn allow_list_overrides_but_own_listeners_never_do() {
        let listener = sa("127.0.0.1:3478");
        let p = PeerPolicy::new(
            vec!["127.0.0.0/8".parse().unwrap()],
            vec![],
            vec![listener.ip()],
            vec![listener],
        );
        assert_eq!(p.check(sa("127.0.0.1:3480")), Ok(()));
        assert_eq!(p.check(sa("[::ffff:127.0.0.1]:3480")), Ok(()));
        assert_eq!(p.check(listener), Err(Denied::OwnAddress));
        assert_eq!(
            p.check(sa("[::ffff:127.0.0.1]:3478")),
            Err(Denied::OwnAddress)
        );
        assert_eq!(p.check(sa("[::1]:3480")), Err(Denied::SpecialPurpose));
        // A permission names no port: the listener's IP is allowed there.
        assert_eq!(p.check_ip(listener.ip()), Ok(()));
        assert_eq!(
            p.check_ip("::1".parse().unwrap()),
            Err(Denied::SpecialPurpose)
        );
    }

    #[test]
    fn own_and_operator_denied_addresses() {
        let own: IpAddr = "203.0.114.5".parse().unwrap();
        let p = PeerPolicy::new(
            vec![],
            vec!["198.100.0.0/16".parse().unwrap()],
            vec![own],
            vec![],
        );
        assert_eq!(p.check(SocketAddr::new(own, 9)), Err(Denied::OwnAddress));
        assert_eq!(
            p.check(sa("[::ffff:203.0.114.5]:9")),
            Err(Denied::OwnAddress)
        );
        assert_eq!(p.check(sa("198.100.3.4:9")), Err(Denied::Operator));
    }

    #[test]
    fn ipnet_parsing_and_errors() {
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        assert!("nonsense".parse::<IpNet>().is_err());
        let n: IpNet = "::1".parse().unwrap();
        assert!(n.contains("::1".parse().unwrap()));
        assert_eq!(
            canonicalize(IpAddr::V6(v6("::ffff:1.2.3.4"))),
            IpAddr::V4([1, 2, 3, 4].into())
        );
    }
}
