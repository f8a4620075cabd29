//! A whole call across a cluster: two `parley up` nodes (127.0.0.2 and
//! 127.0.0.3) on one PostgreSQL and one NATS, and two stand-alone relays
//! (127.0.0.5 and 127.0.0.6) that ids hands out in that order. Alice uses
//! every service of node a, Bob every service of node b; both send media
//! through a relay only. Mid-call the relay carrying it is killed with
//! SIGKILL: both clients move to the other relay and each hears the other
//! again to the end of the call.

use std::net::{IpAddr, SocketAddr};
use std::process::Child;
use std::time::Duration;

use parley_tests::up::{start_node, Up};

mod support;
use support::clients::{activate, client, finish, heard, spawn, tone_wav, wait_line};

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

#[test]
fn a_call_across_nodes_moves_to_another_relay_when_its_relay_dies() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let pg = parley_tests::postgres::Postgres::start("call-cluster");
    let nats = parley_tests::nats::Nats::start("call-cluster");
    // The first relay makes the shared data directory (CA, secrets).
    let mut relays: Vec<(Child, SocketAddr)> = ["127.0.0.5", "127.0.0.6"]
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
    let node = |ip: [u8; 4], name: &str| -> Up {
        start_node(
            BIN,
            &data,
            &config,
            IpAddr::from(ip),
            &["--log", "warn", "--cluster-node", name],
        )
    };
    let (a, b) = (node([127, 0, 0, 2], "a"), node([127, 0, 0, 3], "b"));

    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));
    activate(&a, &data, &alice, ALICE);
    activate(&b, &data, &bob, BOB);
    let (alice_wav, alice_rec, bob_rec) = (
        dir.path().join("alice-says.wav"),
        dir.path().join("alice-heard.wav"),
        dir.path().join("bob-heard.wav"),
    );
    tone_wav(&alice_wav, 440.0, 20.0);
    let mut c = client(&b, &data, &bob);
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

    let mut c = client(&a, &data, &alice);
    c.args(["call", BOB, "--seconds", "12", "--relay-only", "--play"])
        .arg(&alice_wav)
        .arg("--record")
        .arg(&alice_rec);
    let (call, alice_out) = spawn(c);
    let mut alice_seen = Vec::new();
    wait_line(&alice_out, "media connected", &mut alice_seen);
    std::thread::sleep(Duration::from_secs(2));

    // The relay both ends use dies.
    let (mut dead, dead_at) = relays.remove(0);
    dead.kill().unwrap();
    dead.wait().unwrap();
    let (_, spare) = &relays[0];
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
    drop((a, b, relays, nats, pg));
}
