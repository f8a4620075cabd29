//! Relay configuration. Every field has a production-safe default.

use crate::core::policy::IpNet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// Configuration of the STUN/TURN service. Its `Debug` output hides
/// passwords and secrets.
#[derive(Clone)]
pub struct Config {
    /// REALM sent in challenges. Default `parley`.
    pub realm: String,
    /// UDP listen addresses. Default `0.0.0.0:3478` and `[::]:3478`.
    pub udp: Vec<SocketAddr>,
    /// TCP listen addresses. Default `0.0.0.0:3478` and `[::]:3478`.
    pub tcp: Vec<SocketAddr>,
    /// TLS listen addresses (ALPN `stun.turn`, RFC 7443). Default `0.0.0.0:5349`
    /// and `[::]:5349`; served only when certificates are configured.
    pub tls: Vec<SocketAddr>,
    /// Address relayed IPv4 allocations bind to; `None` disables IPv4 relaying.
    pub relay_ipv4: Option<IpAddr>,
    /// Address relayed IPv6 allocations bind to; `None` disables IPv6 relaying.
    pub relay_ipv6: Option<IpAddr>,
    /// Address advertised instead of `relay_ipv4` (1:1 NAT); `None` means the same.
    pub external_ipv4: Option<IpAddr>,
    /// Relay port range, inclusive. Default 49152–65535.
    pub min_port: u16,
    pub max_port: u16,
    /// Lifetime when the client asks for none. Default 600 s (RFC 8656 §7.2).
    pub default_lifetime: Duration,
    /// Upper bound on a requested lifetime. Default 3600 s.
    pub max_lifetime: Duration,
    /// Permission lifetime; fixed at 300 s by RFC 8656 §9.
    pub permission_lifetime: Duration,
    /// Channel binding lifetime; 600 s by RFC 8656 §12.
    pub channel_lifetime: Duration,
    /// How long a nonce stays valid before a 438. Default 600 s.
    pub nonce_lifetime: Duration,
    /// Static users (name, password).
    pub users: Vec<(String, String)>,
    /// REST shared secrets; all are accepted, the first is current.
    pub rest_secrets: Vec<String>,
    /// Allocations in total across the server. Default 16384 (one port each
    /// in the default range).
    pub max_allocations: u32,
    /// Allocations per username. Default 32.
    pub max_allocations_per_user: u32,
    /// Allocations per client IP address. Default 64.
    pub max_allocations_per_ip: u32,
    /// Relayed bytes per second per allocation, each direction; 0 is no limit.
    /// Default 2 MB/s (16 Mbit/s, several HD video streams).
    pub max_bytes_per_sec: u64,
    /// Peers allowed even though they are in a denied range (labs and tests).
    pub allow_peers: Vec<IpNet>,
    /// Extra peers to deny on top of the built-in special-purpose ranges.
    pub deny_peers: Vec<IpNet>,
    /// SOFTWARE attribute text; off by default so responses stay small.
    pub software: Option<String>,
    /// A second address (other IP and port) for RFC 5780 behaviour discovery.
    /// When set, Binding answers carry OTHER-ADDRESS and honour CHANGE-REQUEST.
    pub alternate: Option<SocketAddr>,
    /// Worker threads, each with its own sockets (SO_REUSEPORT). 0 = one per core.
    pub workers: usize,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let users: Vec<&str> = self.users.iter().map(|(u, _)| u.as_str()).collect();
        f.debug_struct("Config")
            .field("realm", &self.realm)
            .field("udp", &self.udp)
            .field("tcp", &self.tcp)
            .field("tls", &self.tls)
            .field("relay_ipv4", &self.relay_ipv4)
            .field("relay_ipv6", &self.relay_ipv6)
            .field("external_ipv4", &self.external_ipv4)
            .field("ports", &(self.min_port..=self.max_port))
            .field("users", &users)
            .field(
                "rest_secrets",
                &format_args!("[{} hidden]", self.rest_secrets.len()),
            )
            .field("max_allocations", &self.max_allocations)
            .field("allow_peers", &self.allow_peers)
            .field("deny_peers", &self.deny_peers)
            .field("alternate", &self.alternate)
            .field("workers", &self.workers)
            .finish_non_exhaustive()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            realm: "parley".into(),
            udp: vec![SocketAddr::from(([0, 0, 0, 0], 3478))],
            tcp: vec![SocketAddr::from(([0, 0, 0, 0], 3478))],
            tls: vec![SocketAddr::from(([0, 0, 0, 0], 5349))],
            relay_ipv4: None,
            relay_ipv6: None,
            external_ipv4: None,
            min_port: 49152,
            max_port: 65535,
            default_lifetime: Duration::from_secs(600),
            max_lifetime: Duration::from_secs(3600),
            permission_lifetime: Duration::from_secs(300),
            channel_lifetime: Duration::from_secs(600),
            nonce_lifetime: Duration::from_secs(600),
            users: Vec::new(),
            rest_secrets: Vec::new(),
            max_allocations: 16384,
            max_allocations_per_user: 32,
            max_allocations_per_ip: 64,
            max_bytes_per_sec: 2_000_000,
            allow_peers: Vec::new(),
            deny_peers: Vec::new(),
            software: None,
            alternate: None,
            workers: 0,
        }
    }
}

impl Config {
    /// Checks the values once at startup; the error names the bad key.
    pub fn validate(&self) -> Result<(), crate::Error> {
        let bad = |key: &'static str, reason: &str| {
            Err(crate::Error::Config {
                key,
                reason: reason.to_owned(),
            })
        };
        if self.realm.is_empty() || self.realm.len() > 127 {
            return bad("realm", "must be 1 to 127 bytes");
        }
        if self.min_port == 0 || self.min_port > self.max_port {
            return bad("min_port", "must be non-zero and not above max_port");
        }
        if self.default_lifetime.is_zero() || self.default_lifetime > self.max_lifetime {
            return bad(
                "default_lifetime",
                "must be non-zero and at most max_lifetime",
            );
        }
        if self.nonce_lifetime < Duration::from_secs(10) {
            return bad("nonce_lifetime", "must be at least 10 s");
        }
        if self.relay_ipv4.is_some_and(|ip| !ip.is_ipv4()) {
            return bad("relay_ipv4", "must be an IPv4 address");
        }
        if self.relay_ipv6.is_some_and(|ip| !ip.is_ipv6()) {
            return bad("relay_ipv6", "must be an IPv6 address");
        }
        if self.relay_ipv4.is_none() && self.relay_ipv6.is_none() {
            return bad("relay_ipv4", "at least one relay address is needed");
        }
        if self.users.is_empty() && self.rest_secrets.is_empty() {
            return bad(
                "rest_secrets",
                "no static users and no REST secret: nobody could allocate",
            );
        }
        if self
            .users
            .iter()
            .any(|(u, p)| u.is_empty() || p.is_empty() || u.len() > 512)
        {
            return bad(
                "users",
                "every user needs a name (at most 512 bytes) and a password",
            );
        }
        if self.rest_secrets.iter().any(String::is_empty) {
            return bad("rest_secrets", "secrets must not be empty");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_hides_passwords_and_secrets() {
        let c = Config {
            users: vec![("alice".into(), "hunter2".into())],
            rest_secrets: vec!["s3cr3t-value".into()],
            ..Config::default()
        };
        let text = format!("{c:?}");
        assert!(text.contains("alice"));
        assert!(
            !text.contains("hunter2") && !text.contains("s3cr3t-value"),
            "{text}"
        );
    }
}
