//! The signaling runtime started on loopback for tests that speak raw
//! SIP over real sockets.

#![allow(dead_code)]

use signaling::runtime::{Config, NoDirectory, NoWaker, Server};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// A config for `parley.test` with UDP and TCP on `ip` at ephemeral
/// ports, and nothing else.
pub fn config(ip: IpAddr) -> Config {
    let any = SocketAddr::new(ip, 0);
    let mut config = Config {
        udp: vec![any],
        tcp: vec![any],
        tls: vec![],
        wss: vec![],
        ..Config::default()
    };
    config.proxy.domains = vec!["parley.test".into()];
    config
}

/// Serves `config` with no directory and no waker.
pub fn serve(rt: &tokio::runtime::Runtime, config: Config) -> Server {
    rt.block_on(Server::start(
        config,
        None,
        Arc::new(NoDirectory),
        Arc::new(NoWaker),
    ))
    .unwrap()
}

/// [`config`] on `ip`, served.
pub fn start(rt: &tokio::runtime::Runtime, ip: IpAddr) -> Server {
    serve(rt, config(ip))
}
