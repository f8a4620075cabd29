//! `parley courier` alone as a separate process on free loopback ports,
//! on a data directory and configuration the test gives; killed on drop.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Child;

#[derive(Debug)]
pub struct Courier {
    pub child: Child,
    /// The device port (TLS).
    pub device: SocketAddr,
    /// The provider API (HTTPS).
    pub provider: SocketAddr,
}

impl Drop for Courier {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `bin courier` on `data` and `config`; returns once it is ready.
pub fn start(bin: &str, data: &Path, config: &Path) -> Courier {
    let (child, printed) = crate::tool::start_until_ready(
        bin,
        &[
            "--data",
            data.to_str().expect("utf8 path"),
            "--config",
            config.to_str().expect("utf8 path"),
            "--admin",
            "127.0.0.1:0",
            "courier",
            "--courier-device-listen",
            "127.0.0.1:0",
            "--courier-provider-listen",
            "127.0.0.1:0",
        ],
    );
    let unset = SocketAddr::from(([0, 0, 0, 0], 0));
    let mut c = Courier {
        child,
        device: unset,
        provider: unset,
    };
    for line in &printed {
        if let Some(rest) = line.strip_prefix("parley: courier devices tls=") {
            let mut words = rest.split_whitespace();
            c.device = words
                .next()
                .and_then(|w| w.parse().ok())
                .expect("device address");
            c.provider = words
                .find_map(|w| w.strip_prefix("https://"))
                .and_then(|w| w.parse().ok())
                .expect("provider address");
        }
    }
    assert_ne!(c.provider.port(), 0, "courier line before ready");
    c
}
