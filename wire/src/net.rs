//! Address prefixes, the key a rate limit counts a source under, and a
//! cap on what one source may hold at once.

use std::collections::HashMap;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

/// An address prefix such as `127.0.0.0/8` or `fc00::/7`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    pub fn new(addr: IpAddr, prefix: u8) -> Option<IpNet> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(IpNet { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for IpNet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("`{s}` is not an address or prefix"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p
                .parse::<u8>()
                .map_err(|_| format!("bad prefix length in `{s}`"))?,
            None => max,
        };
        IpNet::new(addr, prefix).ok_or_else(|| format!("prefix length in `{s}` exceeds {max}"))
    }
}

impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The key a per-source limit counts `ip` under: an IPv4 address as it is,
/// an IPv6 address by its /64, the smallest prefix a site or a host is
/// given (RFC 6177), so a host cannot step past a limit by changing its
/// interface identifier.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

/// A cap on what each source (by [`source_key`]) holds at once:
/// connections, handshakes. A claim is given back when dropped.
#[derive(Clone, Debug)]
pub struct PerSourceLimit {
    cap: usize,
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One thing a source holds; dropping it gives it back.
#[derive(Debug)]
pub struct SourceClaim {
    key: IpAddr,
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl PerSourceLimit {
    pub fn new(cap: usize) -> PerSourceLimit {
        PerSourceLimit {
            cap: cap.max(1),
            counts: Arc::default(),
        }
    }

    /// A claim for `ip`'s source, or `None` if it holds `cap` already.
    pub fn claim(&self, ip: IpAddr) -> Option<SourceClaim> {
        let key = source_key(ip);
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = c.entry(key).or_insert(0);
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(SourceClaim {
            key,
            counts: self.counts.clone(),
        })
    }

    /// Sources holding anything now.
    pub fn sources(&self) -> usize {
        self.counts.lock().map(|c| c.len()).unwrap_or(0)
    }
}

impl Drop for SourceClaim {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = c.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_contain_their_addresses() {
        let n: IpNet = "10.1.0.0/16".parse().unwrap();
        assert!(n.contains("10.1.200.3".parse().unwrap()));
        assert!(!n.contains("10.2.0.1".parse().unwrap()));
        let one: IpNet = "::1".parse().unwrap();
        assert!(one.contains("::1".parse().unwrap()));
        assert!(!one.contains("127.0.0.1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        assert!("nope".parse::<IpNet>().is_err());
    }

    #[test]
    fn a_source_holds_at_most_its_cap_and_drops_give_back() {
        let limit = PerSourceLimit::new(2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let (x, y) = (limit.claim(a).unwrap(), limit.claim(a).unwrap());
        assert!(limit.claim(a).is_none());
        // Another address of the same /64 is the same source.
        let v6a: IpAddr = "2001:db8::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8::2".parse().unwrap();
        let _z = limit.claim(v6a).unwrap();
        let _w = limit.claim(v6b).unwrap();
        assert!(limit.claim(v6a).is_none());
        drop(x);
        let _again = limit.claim(a).unwrap();
        drop(y);
        assert_eq!(limit.sources(), 2);
    }

    #[test]
    fn an_ipv6_source_counts_by_its_64() {
        let a = source_key("2001:db8:1:2:aaaa::1".parse().unwrap());
        let b = source_key("2001:db8:1:2:ffff:1:2:3".parse().unwrap());
        let c = source_key("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a, "2001:db8:1:2::".parse::<IpAddr>().unwrap());
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(source_key(v4), v4);
        assert_eq!(source_key("::ffff:192.0.2.7".parse().unwrap()), v4);
    }
}
