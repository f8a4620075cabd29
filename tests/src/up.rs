//! `parley up` as a separate process on free loopback ports, for tests
//! that use the stack the way an operator runs it.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Child;

/// A running `parley up`; killed when dropped.
#[derive(Debug)]
pub struct Up {
    child: Child,
    bin: String,
    data: PathBuf,
    config: PathBuf,
    /// The relay's UDP (and TCP) address.
    pub turn: SocketAddr,
    pub ids: SocketAddr,
    /// The courier's device port (TLS).
    pub courier: SocketAddr,
    pub sip_udp: SocketAddr,
    pub sip_tls: SocketAddr,
    /// The SFU's join API (HTTPS).
    pub sfu: SocketAddr,
    /// The admin listener (/metrics, /healthz, /readyz).
    pub admin: SocketAddr,
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
    launch(bin, data, config, None, None)
}

/// `parley up` for calls on one machine, in `dir`: epochs every 200 ms
/// (activation → lookup stays short) and a relay that may reach loopback
/// peers (the other device's relayed address). Returns the data directory
/// and the stack.
pub fn start_lab(bin: &str, dir: &Path) -> (PathBuf, Up) {
    start_lab_on(bin, dir, None, &[], "")
}

/// [`start_lab`] with the relay and SIP over UDP/TCP listening on
/// `public` (an address other machines, or network namespaces, reach)
/// instead of loopback, the relay also reaching peers in `allow_peers`
/// (prefixes), and `extra` appended to the configuration: more `[turn]`
/// keys, then other sections.
pub fn start_lab_on(
    bin: &str,
    dir: &Path,
    public: Option<IpAddr>,
    allow_peers: &[&str],
    extra: &str,
) -> (PathBuf, Up) {
    let data = dir.join("data");
    let config = dir.join("parley.toml");
    let peers: Vec<String> = std::iter::once("127.0.0.0/8")
        .chain(allow_peers.iter().copied())
        .map(|p| format!("\"{p}\""))
        .collect();
    std::fs::write(
        &config,
        format!(
            "[ids]\npublish_interval_secs = 0.2\n[turn]\nallow_peers = [{}]\n{extra}",
            peers.join(", ")
        ),
    )
    .expect("write the config");
    let up = launch(bin, &data, &config, None, public);
    (data, up)
}

/// One node of a cluster: `parley up` with every listener on a free port
/// of `ip` (127.0.0.x), `args` before `up` (say `--cluster-node n1`), and
/// `config` naming the shared PostgreSQL and NATS.
pub fn start_node(bin: &str, data: &Path, config: &Path, ip: IpAddr, args: &[&str]) -> Up {
    launch_at(bin, data, config, None, None, ip, args)
}

impl Up {
    /// `kill -9`: the process dies at once, as in a crash.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills the process (as a crash would) and starts it again on the
    /// same data directory and addresses.
    pub fn restart(self) -> Up {
        let (bin, data, config) = (self.bin.clone(), self.data.clone(), self.config.clone());
        let addrs = [
            self.turn,
            self.ids,
            self.courier,
            self.sip_udp,
            self.sip_tls,
        ];
        drop(self);
        launch(&bin, &data, &config, Some(addrs), None)
    }
}

/// `fixed`: turn, ids, courier, SIP (UDP and TCP), SIP/TLS addresses.
/// `public`: where the relay and SIP over UDP/TCP listen, if not on
/// loopback.
fn launch(
    bin: &str,
    data: &Path,
    config: &Path,
    fixed: Option<[SocketAddr; 5]>,
    public: Option<IpAddr>,
) -> Up {
    launch_at(bin, data, config, fixed, public, [127, 0, 0, 1].into(), &[])
}

fn launch_at(
    bin: &str,
    data: &Path,
    config: &Path,
    fixed: Option<[SocketAddr; 5]>,
    public: Option<IpAddr>,
    ip: IpAddr,
    args: &[&str],
) -> Up {
    let any = SocketAddr::new(ip, 0).to_string();
    // The services' ports stay the same across a restart, so they are
    // taken outside the ephemeral range: a client reconnecting meanwhile
    // cannot be holding one.
    let fixed =
        fixed.unwrap_or_else(|| [0; 5].map(|_| SocketAddr::new(ip, crate::tool::stable_port(ip))));
    let at = |i: usize| fixed[i].to_string();
    let (mut turn, ids, courier, mut sip, sip_tls) = (at(0), at(1), at(2), at(3), at(4));
    if let Some(ip) = public {
        turn = SocketAddr::new(ip, 0).to_string();
        sip = turn.clone();
    }
    let mut all: Vec<&str> = args.to_vec();
    all.extend_from_slice(&[
        "--data",
        data.to_str().expect("UTF-8 path"),
        "--config",
        config.to_str().expect("UTF-8 path"),
        "--admin",
        &any,
        "up",
        "--listen",
        &turn,
        "--tls-listen",
        &any,
        "--ids-listen",
        &ids,
        "--courier-device-listen",
        &courier,
        "--courier-provider-listen",
        &any,
        "--sip-listen",
        &sip,
        "--sip-tls-listen",
        &sip_tls,
        "--sip-wss-listen",
        &any,
        "--sfu-listen",
        &any,
        "--sfu-api-listen",
        &any,
    ]);
    let (child, printed) = crate::tool::start_until_ready(bin, &all);
    let find = |service: &str, key: &str| {
        printed
            .iter()
            .filter(|l| l.starts_with(&format!("parley: {service} ")))
            .find_map(|l| addr_after(l, key))
            .unwrap_or_else(|| panic!("no {service} {key} address in {printed:?}"))
    };
    Up {
        turn: find("turn", "udp="),
        ids: find("ids", "https://"),
        courier: find("courier", "tls="),
        sip_udp: find("signaling", "udp="),
        sip_tls: find("signaling", "tls="),
        sfu: find("sfu", "https://"),
        admin: find("admin", "http://"),
        child,
        bin: bin.to_string(),
        data: data.to_path_buf(),
        config: config.to_path_buf(),
    }
}
