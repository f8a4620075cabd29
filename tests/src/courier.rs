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
    /// The admin listener (/metrics, /readyz).
    pub admin: SocketAddr,
}

impl Drop for Courier {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `bin courier` on `data` and `config`; returns once it is ready.
pub fn start(bin: &str, data: &Path, config: &Path) -> Courier {
    start_with(bin, data, config, &[], "127.0.0.1")
}

/// As [`start`], with more flags after the subcommand (`--cluster-node
/// n1`, `--courier-database URL`…), listening on loopback address `host`.
pub fn start_with(bin: &str, data: &Path, config: &Path, flags: &[&str], host: &str) -> Courier {
    let any = format!("{host}:0");
    let mut args = vec![
        "--data",
        data.to_str().expect("utf8 path"),
        "--config",
        config.to_str().expect("utf8 path"),
        "--admin",
        &any,
        "courier",
        "--courier-device-listen",
        &any,
        "--courier-provider-listen",
        &any,
    ];
    args.extend_from_slice(flags);
    let (child, printed) = crate::tool::start_until_ready(bin, &args);
    let unset = SocketAddr::from(([0, 0, 0, 0], 0));
    let mut c = Courier {
        child,
        device: unset,
        provider: unset,
        admin: unset,
    };
    for line in &printed {
        if let Some(rest) = line.strip_prefix("parley: admin http://") {
            c.admin = rest
                .split_whitespace()
                .next()
                .and_then(|w| w.parse().ok())
                .expect("admin address");
        }
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

impl Courier {
    /// The value of an unlabelled metric on the admin listener's
    /// /metrics, if present.
    pub fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = crate::tool::http_get(self.admin, "/metrics");
        body.lines().find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == name).then(|| v.trim().parse().ok()).flatten()
        })
    }

    /// The status code of GET /readyz (0: no answer).
    pub fn readyz(&self) -> u16 {
        crate::tool::http_get(self.admin, "/readyz").0
    }

    /// Sends SIGSTOP (`true`) or SIGCONT (`false`) to the process.
    pub fn pause(&self, stop: bool) {
        crate::tool::signal(self.child.id(), if stop { "-STOP" } else { "-CONT" });
    }
}
