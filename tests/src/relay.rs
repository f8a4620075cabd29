//! Starting the real relay in-process, on loopback only.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use stun_turn::runtime::{Relay, ALPN_STUN_TURN};
use stun_turn::Config;

pub const USER: &str = "bench";
pub const PASSWORD: &str = "pass";
pub const SECRET: &str = "test-rest-secret";

/// A loopback configuration: ephemeral ports, a static user, a REST
/// secret, two workers. Peers on loopback are *not* allowed; tests that
/// need them say so.
pub fn loopback_config() -> Config {
    let lo = SocketAddr::from(([127, 0, 0, 1], 0));
    Config {
        udp: vec![lo],
        tcp: vec![lo],
        tls: vec![lo],
        relay_ipv4: Some([127, 0, 0, 1].into()),
        users: vec![(USER.into(), PASSWORD.into())],
        rest_secrets: vec![SECRET.into()],
        workers: 2,
        ..Config::default()
    }
}

/// The same, with 127.0.0.0/8 peers allowed (turnutils_peer and our echo
/// peer live there).
pub fn lab_config() -> Config {
    Config {
        allow_peers: vec!["127.0.0.0/8".parse().expect("prefix")],
        ..loopback_config()
    }
}

/// Starts a relay with a self-signed certificate for TLS.
pub fn start(config: Config) -> Relay {
    Relay::start(config, Some(test_tls())).expect("relay starts")
}

/// Starts a relay with an RFC 5780 alternate address on 127.0.0.2. Both
/// addresses need fixed ports, so free ones are found first (and the start
/// retried if another process takes one meanwhile).
pub fn start_with_alternate(mut config: Config) -> Relay {
    for _ in 0..10 {
        let (p, q) = (free_port(), free_port());
        let free_on_alt = [p, q]
            .iter()
            .all(|&port| UdpSocket::bind(("127.0.0.2", port)).is_ok());
        if p == q || !free_on_alt {
            continue;
        }
        config.udp = vec![SocketAddr::from(([127, 0, 0, 1], p))];
        config.alternate = Some(SocketAddr::from(([127, 0, 0, 2], q)));
        if let Ok(r) = Relay::start(config.clone(), Some(test_tls())) {
            return r;
        }
    }
    panic!("no free port pair for the RFC 5780 addresses after 10 tries");
}

fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A TLS 1.3 configuration with a fresh self-signed localhost certificate.
pub fn test_tls() -> Arc<rustls::ServerConfig> {
    let key = rcgen::KeyPair::generate().expect("key");
    let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
    let cert = params.self_signed(&key).expect("cert");
    let der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key der");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], der)
        .expect("server config");
    cfg.alpn_protocols = vec![ALPN_STUN_TURN.to_vec()];
    Arc::new(cfg)
}
