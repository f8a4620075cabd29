//! The Via header (RFC 3261 §20.42, §18.2.1) with `received` and `rport`
//! (RFC 3581).

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// Every branch we create starts with the RFC 3261 magic cookie.
pub const MAGIC_COOKIE: &str = "z9hG4bK";

/// One Via value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Via {
    /// `UDP`, `TCP`, `TLS`, `WS`, `WSS`… upper-cased.
    pub transport: String,
    pub host: String,
    pub port: Option<u16>,
    pub params: Vec<(String, Option<String>)>,
}

impl Via {
    pub fn parse(s: &str) -> Option<Via> {
        let s = s.trim();
        let (proto, rest) = s.split_once(|c: char| c.is_ascii_whitespace())?;
        let mut p = proto.split('/');
        let (name, version, transport) = (p.next()?, p.next()?, p.next()?);
        if !name.trim().eq_ignore_ascii_case("SIP") || version.trim() != "2.0" || p.next().is_some()
        {
            return None;
        }
        let transport = transport.trim().to_ascii_uppercase();
        if transport.is_empty() {
            return None;
        }
        let mut parts = rest.trim().split(';');
        let sent_by = parts.next()?.trim();
        let (host, port) = if let Some(r) = sent_by.strip_prefix('[') {
            let (h, after) = r.split_once(']')?;
            h.parse::<std::net::Ipv6Addr>().ok()?;
            let port = match after.strip_prefix(':') {
                Some(p) => Some(p.parse().ok()?),
                None if after.is_empty() => None,
                None => return None,
            };
            (h.to_string(), port)
        } else {
            match sent_by.split_once(':') {
                Some((h, p)) => (h.to_string(), Some(p.trim().parse().ok()?)),
                None => (sent_by.to_string(), None),
            }
        };
        if host.is_empty()
            || !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b':')
        {
            return None;
        }
        let mut params = Vec::new();
        for p in parts.map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = match p.split_once('=') {
                Some((k, v)) => (k.trim(), Some(v.trim().to_string())),
                None => (p, None),
            };
            params.push((k.to_ascii_lowercase(), v));
        }
        Some(Via {
            transport,
            host,
            port,
            params,
        })
    }

    pub fn param(&self, name: &str) -> Option<Option<&str>> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_deref())
    }

    pub fn branch(&self) -> Option<&str> {
        self.param("branch").flatten()
    }

    pub fn set_param(&mut self, name: &str, value: Option<String>) {
        match self.params.iter_mut().find(|(k, _)| k == name) {
            Some(slot) => slot.1 = value,
            None => self.params.push((name.to_string(), value)),
        }
    }

    /// RFC 3261 §18.2.1 and RFC 3581 §4: note where the request really
    /// came from.
    /// A `received` the sender wrote itself is dropped first: responses go
    /// to the address the request came from, never one it names.
    pub fn stamp_source(&mut self, from: SocketAddr) {
        self.params.retain(|(k, _)| k != "received");
        let sent_ip = self.host.parse::<IpAddr>().ok();
        if sent_ip != Some(from.ip()) {
            self.set_param("received", Some(from.ip().to_string()));
        }
        if self.param("rport").is_some() {
            self.set_param("rport", Some(from.port().to_string()));
            if self.param("received").is_none() {
                self.set_param("received", Some(from.ip().to_string()));
            }
        }
    }

    /// Where a response to this Via goes (RFC 3261 §18.2.2, RFC 3581 §4):
    /// `received`/`rport` if present, else the sent-by address. `None` if
    /// that is a name, not an address: we do not resolve names.
    pub fn response_addr(&self) -> Option<SocketAddr> {
        let ip: IpAddr = match self.param("received").flatten() {
            Some(r) => r.parse().ok()?,
            None => self.host.parse().ok()?,
        };
        let port = match self.param("rport").flatten() {
            Some(p) => p.parse().ok()?,
            None => self.port.unwrap_or(default_port(&self.transport)),
        };
        Some(SocketAddr::new(ip, port))
    }
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SIP/2.0/{} ", self.transport)?;
        crate::sip::uri::write_hostport(f, &self.host, self.port)?;
        crate::sip::uri::write_params(f, &self.params)?;
        Ok(())
    }
}

/// The default port of a transport (RFC 3261 §19.1.2, RFC 7118 §5).
pub fn default_port(transport: &str) -> u16 {
    match transport {
        "TLS" => 5061,
        "WS" => 80,
        "WSS" => 443,
        _ => 5060,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stamps_and_answers() {
        let mut v = Via::parse("SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK1;rport").unwrap();
        assert_eq!(v.branch(), Some("z9hG4bK1"));
        v.stamp_source("192.0.2.7:40000".parse().unwrap());
        assert_eq!(
            v.to_string(),
            "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK1;rport=40000;received=192.0.2.7"
        );
        assert_eq!(v.response_addr(), Some("192.0.2.7:40000".parse().unwrap()));
        let v6 = Via::parse("SIP/2.0/tls [::1]:5061 ; branch=z9hG4bKx").unwrap();
        assert_eq!(v6.transport, "TLS");
        assert_eq!(v6.response_addr(), Some("[::1]:5061".parse().unwrap()));
        assert!(Via::parse("SIP/3.0/UDP a").is_none());
        assert!(Via::parse("SIP/2.0/UDP a:99999").is_none());
        let named = Via::parse("SIP/2.0/TCP host.example;branch=z9hG4bK2").unwrap();
        assert_eq!(named.response_addr(), None);
        // A `received` of the sender's own choosing goes.
        for text in [
            "SIP/2.0/UDP 192.0.2.7:5060;branch=z9hG4bK3;received=127.0.0.1",
            "SIP/2.0/UDP 192.0.2.7:5060;received=127.0.0.1;branch=z9hG4bK3;received=10.0.0.1",
        ] {
            let mut forged = Via::parse(text).unwrap();
            forged.stamp_source("192.0.2.7:5060".parse().unwrap());
            assert_eq!(forged.param("received"), None, "{forged}");
            assert_eq!(
                forged.response_addr(),
                Some("192.0.2.7:5060".parse().unwrap())
            );
        }
    }
}
