//! `parley up` as a separate process on free loopback ports, for tests
//! that use the stack the way an operator runs it.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Child;

/// A running `parley up`; killed when dropped.
#[derive(Debug)]
pub struct Up {
    child: Child,
    pub ids: SocketAddr,
    /// The courier's device port (TLS).
    pub courier: SocketAddr,
    pub sip_udp: SocketAddr,
    pub sip_tls: SocketAddr,
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn addr_after(line: &str, key: &str) -> Option<SocketAddr> {
    line.split(key)
        .nth(1)?
        .split([' ', ','])
        .next()?
        .parse()
        .ok()
}

/// Starts `bin up` with `data` and `config`, every listener on a free
/// loopback port, and reads the bound addresses from its start-up lines.
pub fn start(bin: &str, data: &Path, config: &Path) -> Up {
    let any = "127.0.0.1:0";
    let (child, printed) = crate::tool::start_until_ready(
        bin,
        &[
            "--data",
            data.to_str().expect("UTF-8 path"),
            "--config",
            config.to_str().expect("UTF-8 path"),
            "--admin",
            any,
            "up",
            "--listen",
            any,
            "--tls-listen",
            any,
            "--ids-listen",
            any,
            "--courier-device-listen",
            any,
            "--courier-provider-listen",
            any,
            "--sip-listen",
            any,
            "--sip-tls-listen",
            any,
            "--sip-wss-listen",
            any,
        ],
    );
    let find = |service: &str, key: &str| {
        printed
            .iter()
            .filter(|l| l.starts_with(&format!("parley: {service} ")))
            .find_map(|l| addr_after(l, key))
            .unwrap_or_else(|| panic!("no {service} {key} address in {printed:?}"))
    };
    Up {
        ids: find("ids", "https://"),
        courier: find("courier", "tls="),
        sip_udp: find("signaling", "udp="),
        sip_tls: find("signaling", "tls="),
        child,
    }
}
