//! Interop with SIPp (Debian `sip-tester`): registration with digest, and
//! calls from a SIPp caller through the proxy to SIPp devices over UDP and
//! TCP, including a fork to three devices where one answers and the other
//! two must get CANCEL with the RFC 3326 Reason, and the same fork with
//! the devices spread over two nodes that share their bindings in
//! PostgreSQL. The scenarios are in `tests/sipp/`.

use parley_tests::tool::{require, run_in, Output};
use signaling::location::SqlLocation;
use signaling::runtime::{Config, NoDirectory, NoWaker, Server};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wire::handle::Handle;

const ALICE: &str = "+14155550100";
const BOB: &str = "+14155550123";
const LIMIT: Duration = Duration::from_secs(40);

struct Proxy {
    rt: tokio::runtime::Runtime,
    server: Option<Server>,
    port: u16,
}

impl Proxy {
    fn start() -> Proxy {
        Proxy::start_with(None)
    }

    /// A node of a cluster whose bindings are in `location`.
    fn start_shared(location: SqlLocation) -> Proxy {
        Proxy::start_with(Some(location))
    }

    fn start_with(location: Option<SqlLocation>) -> Proxy {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        // UDP and TCP on one port number, as SIP expects (bounded retries
        // if another test took the TCP side first).
        for _ in 0..20 {
            let port = free_port();
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let mut config = Config {
                udp: vec![addr],
                tcp: vec![addr],
                tls: vec![],
                ..Config::default()
            };
            config.proxy.domains = vec!["parley.test".into()];
            config.proxy.realm = "parley.test".into();
            for (h, pw) in [(ALICE, "alice-password"), (BOB, "bob-password")] {
                config
                    .proxy
                    .accounts
                    .insert(Handle::parse(h).unwrap(), pw.into());
            }
            let started = rt.block_on(async {
                match &location {
                    Some(l) => {
                        Server::start_shared(
                            config,
                            None,
                            Arc::new(NoDirectory),
                            Arc::new(NoWaker),
                            Arc::new(l.clone()),
                        )
                        .await
                    }
                    None => {
                        Server::start(config, None, Arc::new(NoDirectory), Arc::new(NoWaker)).await
                    }
                }
            });
            if let Ok(server) = started {
                return Proxy {
                    rt,
                    server: Some(server),
                    port,
                };
            }
        }
        panic!("no free port pair for the proxy");
    }

    fn metrics(&self) -> signaling::core::proxy::Metrics {
        // The runtime publishes its counters once a second.
        std::thread::sleep(Duration::from_millis(1100));
        self.server.as_ref().unwrap().metrics()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            self.rt.block_on(s.shutdown(Duration::ZERO));
        }
    }
}

/// A port free on loopback for both UDP and TCP right now.
fn free_port() -> u16 {
    for _ in 0..100 {
        let u = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = u.local_addr().unwrap().port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port");
}

fn scenario(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sipp")
        .join(name)
        .display()
        .to_string()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Runs SIPp for one call in `dir`, with its error trace there.
fn sipp(dir: &Path, transport: &str, port: u16, extra: &[&str]) -> Output {
    let port = port.to_string();
    let mut a = args(&[
        "-i",
        "127.0.0.1",
        "-p",
        &port,
        "-t",
        transport,
        "-m",
        "1",
        "-nostdin",
        "-timeout",
        "30s",
        "-timeout_error",
        "-trace_err",
        "-trace_msg",
    ]);
    a.extend(args(extra));
    run_in(Some(dir), "sipp", &a, LIMIT)
}

/// What SIPp logged, for a failure message.
fn logs(dir: &Path) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p: PathBuf = e.path();
        if p.extension().is_some_and(|x| x == "log") {
            out.push_str(&format!("--- {}\n", p.display()));
            out.push_str(&std::fs::read_to_string(&p).unwrap_or_default());
        }
    }
    out
}

/// Waits until SIPp holds `port` (it binds before it takes calls).
fn wait_bound(port: u16, transport: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let taken = match transport {
            "t1" => TcpListener::bind(("127.0.0.1", port)).is_err(),
            _ => UdpSocket::bind(("127.0.0.1", port)).is_err(),
        };
        if taken {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("SIPp did not bind port {port}");
}

/// Runs SIPp's REGISTER for Bob with `contact_port` (another SIPp's
/// address) as the Contact, answering the digest challenge for
/// `auth_uri` (SIPp's default without it: the remote address).
fn sipp_register(
    dir: &Path,
    proxy: &Proxy,
    transport: &str,
    contact_port: u16,
    auth_uri: Option<&str>,
) -> Output {
    let target = format!("127.0.0.1:{}", proxy.port);
    let cp = contact_port.to_string();
    let scenario = scenario("register.xml");
    let mut args = vec![
        target.as_str(),
        "-sf",
        &scenario,
        "-s",
        BOB,
        "-au",
        BOB,
        "-ap",
        "bob-password",
        "-key",
        "contact_port",
        &cp,
    ];
    if let Some(uri) = auth_uri {
        args.extend(["-auth_uri", uri]);
    }
    sipp(dir, transport, free_port(), &args)
}

/// Registers `contact_port` (another SIPp's address) for Bob.
fn register(dir: &Path, proxy: &Proxy, transport: &str, contact_port: u16) {
    // The digest `uri` must name the Request-URI (SIPp's default is the
    // remote address, which the proxy refuses with 400).
    let out = sipp_register(dir, proxy, transport, contact_port, Some("parley.test"));
    assert!(
        out.success,
        "SIPp registration failed:\n{}\n{}",
        out.text,
        logs(dir)
    );
}

/// Starts a device scenario in the background.
fn device(
    dir: &Path,
    transport: &'static str,
    file: &str,
) -> (u16, std::thread::JoinHandle<Output>) {
    let port = free_port();
    let dir = dir.to_path_buf();
    let file = scenario(file);
    let handle = std::thread::spawn(move || sipp(&dir, transport, port, &["-sf", &file]));
    wait_bound(port, transport);
    (port, handle)
}

fn call(dir: &Path, proxy: &Proxy, transport: &str) -> Output {
    let target = format!("127.0.0.1:{}", proxy.port);
    sipp(
        dir,
        transport,
        free_port(),
        &[
            &target,
            "-sf",
            &scenario("call.xml"),
            "-s",
            BOB,
            "-key",
            "caller",
            ALICE,
            "-au",
            ALICE,
            "-ap",
            "alice-password",
            "-auth_uri",
            &format!("{BOB}@parley.test"),
        ],
    )
}

fn call_through_the_proxy(transport: &'static str) {
    require("sipp");
    let proxy = Proxy::start();
    let dir = tempfile::tempdir().unwrap();
    let (port, uas) = device(dir.path(), transport, "uas_answer.xml");
    register(dir.path(), &proxy, transport, port);
    let caller = call(dir.path(), &proxy, transport);
    let uas = uas.join().unwrap();
    assert!(
        caller.success,
        "SIPp caller failed:\n{}\n{}",
        caller.text,
        logs(dir.path())
    );
    assert!(
        uas.success,
        "SIPp device failed:\n{}\n{}",
        uas.text,
        logs(dir.path())
    );
    let m = proxy.metrics();
    assert_eq!(m.calls_answered, 1);
    assert_eq!(m.registrations, 1);
}

#[test]
fn sipp_call_through_the_proxy_over_udp() {
    call_through_the_proxy("u1");
}

#[test]
fn sipp_call_through_the_proxy_over_tcp() {
    call_through_the_proxy("t1");
}

/// The caller calls Bob at `proxy`: its scenario and every device's must
/// pass (the cancelled ones see the Reason), and `proxy` counts one
/// answer, three branches and two CANCELs.
fn call_the_fork(
    dir: &Path,
    proxy: &Proxy,
    transport: &str,
    devices: Vec<(&str, std::thread::JoinHandle<Output>)>,
) {
    let caller = call(dir, proxy, transport);
    assert!(
        caller.success,
        "SIPp caller failed:\n{}\n{}",
        caller.text,
        logs(dir)
    );
    for (file, handle) in devices {
        let out = handle.join().unwrap();
        assert!(
            out.success,
            "SIPp device {file} failed (a cancelled device must see the Reason):\n{}\n{}",
            out.text,
            logs(dir)
        );
    }
    let m = proxy.metrics();
    assert_eq!(m.calls_answered, 1);
    assert_eq!(m.fork_branches, 3);
    assert_eq!(m.cancels_sent, 2);
}

fn fork_to_three(transport: &'static str) {
    require("sipp");
    let proxy = Proxy::start();
    let dir = tempfile::tempdir().unwrap();
    let mut devices = Vec::new();
    for file in ["uas_cancelled.xml", "uas_answer.xml", "uas_cancelled.xml"] {
        let (port, handle) = device(dir.path(), transport, file);
        register(dir.path(), &proxy, transport, port);
        devices.push((file, handle));
    }
    call_the_fork(dir.path(), &proxy, transport, devices);
}

#[test]
fn sipp_fork_to_three_devices_one_answers_two_are_cancelled_over_udp() {
    fork_to_three("u1");
}

#[test]
fn sipp_fork_to_three_devices_one_answers_two_are_cancelled_over_tcp() {
    fork_to_three("t1");
}

/// SIPp's digest answer names the remote address as its `uri` unless told
/// otherwise (`-auth_uri`); the REGISTER's Request-URI is `sip:parley.test`,
/// so the answer is for another resource (RFC 3261 §22.4): 400, and no
/// registration.
#[test]
fn sipp_digest_for_another_uri_is_refused() {
    require("sipp");
    let proxy = Proxy::start();
    let dir = tempfile::tempdir().unwrap();
    let out = sipp_register(dir.path(), &proxy, "u1", 5999, None);
    assert!(
        !out.success,
        "SIPp registered with a digest for another URI"
    );
    let text = format!("{}\n{}", out.text, logs(dir.path()));
    assert!(
        text.contains("400 Bad Request (Digest URI Mismatch)"),
        "{text}"
    );
    assert_eq!(proxy.metrics().registrations, 0);
}

/// The fork to three with the devices spread over two nodes: one device
/// at node A, two at node B, the call at A. The device that answers is
/// at B; the other two, one at each node, get CANCEL with the Reason,
/// B's through B.
fn fork_across_two_nodes(transport: &'static str) {
    require("sipp");
    let pg = parley_tests::postgres::Postgres::start(&format!("sipp-fork-{transport}"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let open = |name: &str| rt.block_on(SqlLocation::open(&pg.url(), name)).unwrap();
    let a = Proxy::start_shared(open("a"));
    let b = Proxy::start_shared(open("b"));
    let probe = open("probe");
    let dir = tempfile::tempdir().unwrap();
    let mut devices = Vec::new();
    for (file, node) in [
        ("uas_cancelled.xml", &a),
        ("uas_answer.xml", &b),
        ("uas_cancelled.xml", &b),
    ] {
        let (port, handle) = device(dir.path(), transport, file);
        register(dir.path(), node, transport, port);
        devices.push((file, handle));
    }
    // B's two bindings are stored in the background.
    let bob = Handle::parse(BOB).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while rt.block_on(probe.get(&bob)).unwrap().len() < 3 {
        assert!(
            Instant::now() < deadline,
            "bindings never reached the database"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    call_the_fork(dir.path(), &a, transport, devices);
}

#[test]
fn sipp_fork_across_two_nodes_over_udp() {
    fork_across_two_nodes("u1");
}

#[test]
fn sipp_fork_across_two_nodes_over_tcp() {
    fork_across_two_nodes("t1");
}
