//! Whole calls across a cluster of `parley up` nodes (127.0.0.2, .3, .4)
//! on one PostgreSQL and one NATS, with two stand-alone relays (127.0.0.5
//! and .6) that ids hands out in that order; the devices are `parley
//! client` processes, each using the services of the nodes it is given.
//!
//! - Alice uses every service of node a, Bob every service of node b; both
//!   send media through a relay only. Mid-call the relay carrying it is
//!   killed with SIGKILL: both clients move to the other relay and each
//!   hears the other again to the end of the call.
//! - Bob's device sleeps with its push link at node b and registers at
//!   node c; Alice calls at node a: the VoIP push wakes Bob's device, it
//!   registers at c, the waiting call rings it there, and it answers.
//! - A device removed through node a's ids is cut off at node b at once:
//!   the revocation travels over NATS.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Child;
use std::time::Duration;

use parley_tests::up::{start_node, Up};

mod support;
use support::clients::{
    activate, client, client_sip_at, finish, heard, link_device, run, spawn, tone_wav, wait_line,
};

const BIN: &str = env!("CARGO_BIN_EXE_parley");
const ALICE: &str = "alice@example.com";
const BOB: &str = "+14155550123";

/// `parley turn` alone on a free port of `ip`; the process and its UDP
/// address.
fn relay(data: &std::path::Path, ip: &str) -> (Child, SocketAddr) {
    let listen = format!("{ip}:0");
    let (child, printed) = parley_tests::tool::start_until_ready(
        BIN,
        &[
            "--data",
            data.to_str().unwrap(),
            "--admin",
            &listen,
            "--log",
            "warn",
            "turn",
            "--listen",
            &listen,
            "--allow-peer",
            "127.0.0.0/8",
        ],
    );
    let udp = printed
        .iter()
        .find_map(|l| l.strip_prefix("parley: turn udp="))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no relay address in {printed:?}"));
    (child, udp)
}

/// Nodes, relays and what they share. Fields drop in order: nodes and
/// relays before the database and NATS they use.
struct Cluster {
    /// Stand-alone `parley signaling` processes.
    signaling: Vec<(Child, SocketAddr)>,
    nodes: Vec<Up>,
    relays: Vec<(Child, SocketAddr)>,
    _nats: parley_tests::nats::Nats,
    _pg: parley_tests::postgres::Postgres,
    data: PathBuf,
    config: PathBuf,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// `n` nodes (a, b, c… on 127.0.0.2…) and two relays.
    fn start(name: &str, n: u8) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let pg = parley_tests::postgres::Postgres::start(name);
        let nats = parley_tests::nats::Nats::start(name);
        // The first relay makes the shared data directory (CA, secrets).
        let relays: Vec<(Child, SocketAddr)> = ["127.0.0.5", "127.0.0.6"]
            .iter()
            .map(|ip| relay(&data, ip))
            .collect();
        let uris: Vec<String> = relays
            .iter()
            .map(|(_, a)| format!("\"turn:{a}?transport=udp\""))
            .collect();
        let config = dir.path().join("parley.toml");
        std::fs::write(
            &config,
            format!(
                "[ids]\ndatabase = \"{pg}\"\npublish_interval_secs = 0.2\nturn_uris = [{uris}]\n\n\
                 [courier]\ndatabase = \"{pg}\"\n\n[signaling]\ndatabase = \"{pg}\"\n\n\
                 [turn]\nallow_peers = [\"127.0.0.0/8\"]\n\n[cluster]\nnats = \"{nats}\"\n",
                pg = pg.url(),
                uris = uris.join(", "),
                nats = nats.url(),
            ),
        )
        .unwrap();
        let nodes = (0..n)
            .map(|i| {
                let name = char::from(b'a' + i).to_string();
                start_node(
                    BIN,
                    &data,
                    &config,
                    IpAddr::from([127, 0, 0, 2 + i]),
                    &["--log", "warn", "--cluster-node", &name],
                )
            })
            .collect();
        Cluster {
            signaling: Vec::new(),
            nodes,
            relays,
            _nats: nats,
            _pg: pg,
            data,
            config,
            dir,
        }
    }

    /// `parley signaling` alone on `ip`, as node `name` of the cluster
    /// (no ids or courier in its process); its SIP/TLS address.
    fn start_signaling(&mut self, ip: &str, name: &str) -> SocketAddr {
        let any = format!("{ip}:0");
        let (child, printed) = parley_tests::tool::start_until_ready(
            BIN,
            &[
                "--data",
                self.data.to_str().unwrap(),
                "--config",
                self.config.to_str().unwrap(),
                "--admin",
                &any,
                "--log",
                "warn",
                "--cluster-node",
                name,
                "signaling",
                "--sip-listen",
                &any,
                "--sip-tls-listen",
                &any,
                "--sip-wss-listen",
                &any,
            ],
        );
        let tls = printed
            .iter()
            .filter(|l| l.starts_with("parley: signaling "))
            .find_map(|l| l.split("tls=").nth(1))
            .and_then(|rest| rest.split([' ', ',']).next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no SIP/TLS address in {printed:?}"));
        self.signaling.push((child, tls));
        tls
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Alice's microphone (`seconds` of 440 Hz), and where Alice's and
    /// Bob's recordings go.
    fn recordings(&self, seconds: f64) -> (PathBuf, PathBuf, PathBuf) {
        let says = self.path("alice-says.wav");
        tone_wav(&says, 440.0, seconds);
        (
            says,
            self.path("alice-heard.wav"),
            self.path("bob-heard.wav"),
        )
    }
}

#[test]
fn a_call_across_nodes_moves_to_another_relay_when_its_relay_dies() {
    let mut cl = Cluster::start("call-cluster", 2);
    let (a, b, data) = (&cl.nodes[0], &cl.nodes[1], cl.data.clone());
    let (alice, bob) = (cl.path("alice"), cl.path("bob"));
    activate(a, &data, &alice, ALICE);
    activate(b, &data, &bob, BOB);
    let (alice_wav, alice_rec, bob_rec) = cl.recordings(20.0);
    let mut c = client(b, &data, &bob);
    c.args([
        "listen",
        "--answer",
        "--calls",
        "1",
        "--tone",
        "660",
        "--relay-only",
        "--record",
    ])
    .arg(&bob_rec);
    let (listen, bob_out) = spawn(c);
    let mut bob_seen = Vec::new();
    wait_line(&bob_out, "listening as", &mut bob_seen);

    let mut c = client(a, &data, &alice);
    c.args(["call", BOB, "--seconds", "12", "--relay-only", "--play"])
        .arg(&alice_wav)
        .arg("--record")
        .arg(&alice_rec);
    let (call, alice_out) = spawn(c);
    let mut alice_seen = Vec::new();
    wait_line(&alice_out, "media connected", &mut alice_seen);
    std::thread::sleep(Duration::from_secs(2));

    // The relay both ends use dies.
    let (mut dead, dead_at) = cl.relays.remove(0);
    dead.kill().unwrap();
    dead.wait().unwrap();
    let (_, spare) = &cl.relays[0];
    for (out, seen) in [(&alice_out, &mut alice_seen), (&bob_out, &mut bob_seen)] {
        let moved = wait_line(out, "stopped answering", seen);
        assert!(
            moved.contains(&dead_at.to_string()) && moved.contains(&spare.to_string()),
            "{moved}"
        );
    }
    let limit = Duration::from_secs(60);
    finish(call, limit, "call");
    finish(listen, limit, "listen");
    let bob_text = bob_seen.join("\n");
    assert!(!bob_text.contains("error"), "{bob_text}");

    // The last two seconds of each recording carry the far end's tone.
    let (f, share, n) = heard(&bob_rec);
    assert!(n >= 48_000 * 10, "Bob recorded {n} samples");
    assert_eq!(f, 440.0, "Bob heard {f} Hz ({share:.2} of the energy)");
    let (f, share, n) = heard(&alice_rec);
    assert!(n >= 48_000 * 10, "Alice recorded {n} samples");
    assert_eq!(f, 660.0, "Alice heard {f} Hz ({share:.2} of the energy)");
}

/// Bob listens asleep (only the push link between calls), answering one
/// call with 660 Hz and recording it to `rec`; returns once he sleeps.
fn bob_sleeps(
    mut cmd: std::process::Command,
    rec: &std::path::Path,
) -> (Child, std::sync::mpsc::Receiver<String>, Vec<String>) {
    cmd.args([
        "listen", "--asleep", "--answer", "--calls", "1", "--tone", "660", "--record",
    ])
    .arg(rec);
    let (listen, out) = spawn(cmd);
    let mut seen = Vec::new();
    wait_line(&out, "asleep: only the push link is open", &mut seen);
    (listen, out, seen)
}

/// Alice's call (`call`, with its lines) wakes Bob's sleeping `listen`:
/// he is woken by push, rings and answers, media connects, and both
/// clients finish. Alice's lines.
fn bob_wakes_and_answers(
    (call, alice_out): (Child, std::sync::mpsc::Receiver<String>),
    listen: Child,
    bob_out: &std::sync::mpsc::Receiver<String>,
    bob_seen: &mut Vec<String>,
) -> Vec<String> {
    let mut alice_seen = Vec::new();
    for line in ["woken by a VoIP push", "incoming call from", "answered"] {
        wait_line(bob_out, line, bob_seen);
    }
    wait_line(&alice_out, "media connected", &mut alice_seen);
    let limit = Duration::from_secs(60);
    finish(call, limit, "call");
    finish(listen, limit, "listen");
    alice_seen.extend(alice_out.try_iter());
    alice_seen
}

#[test]
fn a_sleeping_device_woken_by_push_registers_at_another_node_and_answers() {
    let cl = Cluster::start("wake-cluster", 3);
    let (a, b, c, data) = (&cl.nodes[0], &cl.nodes[1], &cl.nodes[2], cl.data.clone());
    let (alice, bob) = (cl.path("alice"), cl.path("bob"));
    activate(a, &data, &alice, ALICE);
    activate(b, &data, &bob, BOB);
    let (alice_wav, alice_rec, bob_rec) = cl.recordings(10.0);
    // Bob's push link is at node b, his SIP at node c; between calls only
    // the push link is open.
    let (listen, bob_out, mut bob_seen) =
        bob_sleeps(client_sip_at(b, c.sip_tls, &data, &bob), &bob_rec);

    let mut cmd = client(a, &data, &alice);
    cmd.args(["call", BOB, "--seconds", "3", "--play"])
        .arg(&alice_wav)
        .arg("--record")
        .arg(&alice_rec);
    let alice_seen = bob_wakes_and_answers(spawn(cmd), listen, &bob_out, &mut bob_seen);
    let alice_text = alice_seen.join("\n");
    assert!(alice_text.contains("answered by device"), "{alice_text}");

    let (f, share, _) = heard(&bob_rec);
    assert_eq!(f, 440.0, "Bob heard {f} Hz ({share:.2} of the energy)");
    let (f, share, _) = heard(&alice_rec);
    assert_eq!(f, 660.0, "Alice heard {f} Hz ({share:.2} of the energy)");
}

/// `parley signaling` alone in a cluster has neither ids nor a courier in
/// its process: it checks devices against ids' store in PostgreSQL (a
/// device certificate registers only for the handle the directory gives
/// it) and wakes sleeping devices through the courier nodes over NATS.
#[test]
fn a_standalone_signaling_node_checks_the_directory_and_wakes_through_the_couriers() {
    let mut cl = Cluster::start("sig-cluster", 2);
    let sip = cl.start_signaling("127.0.0.4", "s");
    let (a, b, data) = (&cl.nodes[0], &cl.nodes[1], cl.data.clone());
    let (alice, bob) = (cl.path("alice"), cl.path("bob"));
    activate(a, &data, &alice, ALICE);
    activate(b, &data, &bob, BOB);
    let bob_rec = cl.path("bob-heard.wav");
    // Bob registers at the stand-alone node (the directory check), then
    // sleeps with his push link at node b.
    let (listen, bob_out, mut bob_seen) = bob_sleeps(client_sip_at(b, sip, &data, &bob), &bob_rec);

    // Alice calls through the stand-alone node too: the wake-up for Bob
    // leaves it over NATS.
    let mut cmd = client_sip_at(a, sip, &data, &alice);
    cmd.args(["call", BOB, "--seconds", "2", "--tone", "440"]);
    bob_wakes_and_answers(spawn(cmd), listen, &bob_out, &mut bob_seen);
    let (f, share, _) = heard(&bob_rec);
    assert_eq!(f, 440.0, "Bob heard {f} Hz ({share:.2} of the energy)");
}

/// A number from a node's /metrics.
fn metric(node: &Up, name: &str) -> Option<f64> {
    let (_, body) = parley_tests::tool::http_get(node.admin, "/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Bob removes his tablet through node a while the tablet listens through
/// node b: node b hears the revocation over NATS (its metric counts it;
/// the nodes read the whole list only every 30 s) and closes the
/// tablet's push link, and the tablet stops, saying it was removed.
#[test]
fn a_device_removed_at_one_node_is_cut_off_at_another_at_once() {
    let cl = Cluster::start("revoke-cluster", 2);
    let (a, b, data) = (&cl.nodes[0], &cl.nodes[1], cl.data.clone());
    let (laptop, tablet) = (cl.path("laptop"), cl.path("tablet"));
    activate(a, &data, &laptop, BOB);
    let (tablet_id, _) = link_device(a, &data, &laptop, &tablet, BOB, "tablet");
    let heard = |node: &Up| metric(node, "parley_revocations_heard_total{via=\"nats\"}");
    assert_eq!(heard(b), Some(0.0));

    let mut c = client(b, &data, &tablet);
    c.arg("listen");
    let (listen, out) = spawn(c);
    let mut seen = Vec::new();
    wait_line(&out, "listening as", &mut seen);
    let mut c = client(a, &data, &laptop);
    c.args(["remove", &tablet_id]);
    run(c, Duration::from_secs(30), "remove");
    let removed = std::time::Instant::now();
    wait_line(&out, "removed from its account", &mut seen);
    let took = removed.elapsed();
    assert_eq!(heard(b), Some(1.0));
    assert!(!listen_succeeded(listen), "{}", seen.join("\n"));
    eprintln!("the tablet was cut off at node b {took:?} after the removal");
}

/// Whether a finished (or finishing) client exited 0.
fn listen_succeeded(mut child: Child) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.success();
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the removed device's client did not stop");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `kill -9` of the node publishing the key directory: the other takes the
/// publisher lease within 10 s, publishes what comes next, and the
/// directory's roots stay one contiguous, append-only chain across the
/// takeover (a device's audit of its own history checks it).
#[test]
fn the_key_directory_publisher_killed_another_node_takes_over() {
    let mut cl = Cluster::start("kt-cluster", 2);
    let data = cl.data.clone();
    let alice = cl.path("alice");
    activate(&cl.nodes[0], &data, &alice, ALICE);
    let publisher = |cl: &Cluster| {
        (0..cl.nodes.len()).find(|&i| metric(&cl.nodes[i], "parley_ids_publisher") == Some(1.0))
    };
    // The lease may be between holders for a moment (a renewal late on
    // a loaded machine): one of them publishes within 10 s.
    let waited = std::time::Instant::now();
    let p = loop {
        if let Some(p) = publisher(&cl) {
            break p;
        }
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "no node publishes"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // The other node follows the publisher's epochs.
    let published = metric(&cl.nodes[p], "parley_ids_epoch").unwrap();
    let waited = std::time::Instant::now();
    let epoch = loop {
        let e = metric(&cl.nodes[1 - p], "parley_ids_epoch").unwrap();
        if e >= published {
            break e;
        }
        assert!(waited.elapsed() < Duration::from_secs(5), "follower at {e}");
        std::thread::sleep(Duration::from_millis(50));
    };
    cl.nodes.remove(p).kill();
    let killed = std::time::Instant::now();
    let survivor = &cl.nodes[0];
    while metric(survivor, "parley_ids_publisher") != Some(1.0) {
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "no takeover within 10 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = killed.elapsed();
    // The survivor publishes the next activation, and Alice's device,
    // auditing her handle's history from the roots it pinned before,
    // finds the chain whole.
    let bob = cl.path("bob");
    activate(survivor, &data, &bob, BOB);
    let waited = std::time::Instant::now();
    while metric(survivor, "parley_ids_epoch").unwrap() <= epoch {
        assert!(
            waited.elapsed() < Duration::from_secs(5),
            "the survivor publishes no new epoch"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut c = client(survivor, &data, &alice);
    c.args(["listen", "--audit-every", "1", "--calls", "1"]);
    let (mut listen, out) = spawn(c);
    let mut seen = Vec::new();
    wait_line(&out, "listening as", &mut seen);
    std::thread::sleep(Duration::from_secs(3));
    let _ = listen.kill();
    let _ = listen.wait();
    seen.extend(out.try_iter());
    let text = seen.join("\n");
    assert!(
        !text.contains("WARNING") && !text.contains("error"),
        "{text}"
    );
    eprintln!("publisher takeover after {took:?}");
}
