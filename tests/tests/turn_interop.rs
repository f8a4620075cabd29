//! Interop with the standard clients from Debian's `coturn` and
//! `stun-client` packages against the real relay on loopback.

use parley_tests::peer::EchoPeer;
use parley_tests::relay::{self, PASSWORD, SECRET, USER};
use parley_tests::tool::{args, run};
use std::time::Duration;
use stun_turn::runtime::Relay;

const LIMIT: Duration = Duration::from_secs(60);
const CLIENTS: usize = 10;
const MESSAGES: usize = 100;

/// turnutils_uclient's closing counters.
#[derive(Debug)]
struct Totals {
    sent: usize,
    received: usize,
    lost: usize,
}

fn totals(text: &str) -> Totals {
    let num_after = |key: &str| -> Option<usize> {
        let i = text.rfind(key)? + key.len();
        text[i..]
            .trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    Totals {
        sent: num_after("tot_send_msgs=").unwrap_or_else(|| panic!("no totals in:\n{text}")),
        received: num_after("tot_recv_msgs=").expect("tot_recv_msgs"),
        lost: num_after("Total lost packets").expect("lost packets"),
    }
}

/// Runs turnutils_uclient with `mode` flags against `port`, echoing via `peer`.
fn uclient(mode: &[&str], port: u16, peer: Option<&EchoPeer>, creds: &[&str]) -> Totals {
    uclient_sized(mode, port, peer, creds, CLIENTS, MESSAGES)
}

/// Runs turnutils_uclient with `clients` × `messages` of 120 bytes and
/// fails the test if the relay refused any request.
fn uclient_sized(
    mode: &[&str],
    port: u16,
    peer: Option<&EchoPeer>,
    creds: &[&str],
    clients: usize,
    messages: usize,
) -> Totals {
    let mut a = args(mode);
    if let Some(p) = peer {
        a.extend(args(&[
            "-e",
            "127.0.0.1",
            "-r",
            &p.addr().port().to_string(),
        ]));
    }
    a.extend(args(creds));
    let (m, n, port) = (clients.to_string(), messages.to_string(), port.to_string());
    a.extend(args(&[
        "-X",
        "-g",
        "-m",
        &m,
        "-n",
        &n,
        "-l",
        "120",
        "-z",
        "5",
        "-p",
        &port,
        "127.0.0.1",
    ]));
    let out = run("turnutils_uclient", &a, LIMIT);
    assert!(
        !out.text.contains("error 4") && !out.text.contains("error 5"),
        "relay refused a request:\n{}",
        out.text
    );
    totals(&out.text)
}

fn assert_lossless(t: &Totals, expected: usize) {
    assert_eq!(t.sent, expected, "{t:?}");
    assert_eq!(t.received, expected, "{t:?}");
    assert_eq!(t.lost, 0, "{t:?}");
}

fn relayed(relay: &Relay) -> (u64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    relay.metrics().iter().fold((0, 0), |(a, b), m| {
        (
            a + m.packets_to_peer.load(Relaxed),
            b + m.packets_to_client.load(Relaxed),
        )
    })
}

/// RFC 6062 data connections bound through ConnectionBind, all workers.
fn tcp_bound(relay: &Relay) -> u64 {
    use std::sync::atomic::Ordering::Relaxed;
    relay
        .metrics()
        .iter()
        .map(|m| m.tcp_connections_bound.load(Relaxed))
        .sum()
}

const STATIC: &[&str] = &["-u", USER, "-w", PASSWORD];

/// One client, five messages over UDP: for runs that must be refused.
fn uclient_once(relay: &Relay, peer: &EchoPeer, creds: &[&str]) -> parley_tests::tool::Output {
    let mut a = args(creds);
    let (peer_port, port) = (
        peer.addr().port().to_string(),
        relay.udp_addrs()[0].port().to_string(),
    );
    a.extend(args(&[
        "-e",
        "127.0.0.1",
        "-r",
        &peer_port,
        "-m",
        "1",
        "-n",
        "5",
        "-p",
        &port,
        "127.0.0.1",
    ]));
    run("turnutils_uclient", &a, LIMIT)
}

#[test]
fn uclient_udp_channels_lossless() {
    let relay = relay::start(relay::lab_config());
    let peer = EchoPeer::start();
    let t = uclient(&[], relay.udp_addrs()[0].port(), Some(&peer), STATIC);
    assert_lossless(&t, CLIENTS * MESSAGES);
    assert_eq!(
        peer.count(),
        CLIENTS * MESSAGES,
        "every datagram reached the peer through the relay"
    );
    assert!(
        peer.received()
            .iter()
            .all(|(from, _)| from.ip().is_loopback() && from.port() >= 49152),
        "the peer only ever hears from relay ports"
    );
    let (up, down) = relayed(&relay);
    assert_eq!(
        (up, down),
        ((CLIENTS * MESSAGES) as u64, (CLIENTS * MESSAGES) as u64)
    );
}

#[test]
fn uclient_tcp_lossless() {
    let relay = relay::start(relay::lab_config());
    let peer = EchoPeer::start();
    let t = uclient(&["-t"], relay.tcp_addrs()[0].port(), Some(&peer), STATIC);
    assert_lossless(&t, CLIENTS * MESSAGES);
    assert_eq!(peer.count(), CLIENTS * MESSAGES);
}

#[test]
fn uclient_send_indications_lossless() {
    let relay = relay::start(relay::lab_config());
    let peer = EchoPeer::start();
    let t = uclient(&["-s"], relay.udp_addrs()[0].port(), Some(&peer), STATIC);
    assert_lossless(&t, CLIENTS * MESSAGES);
    assert_eq!(peer.count(), CLIENTS * MESSAGES);
}

#[test]
fn uclient_client_to_client_lossless() {
    let relay = relay::start(relay::lab_config());
    let t = uclient(&["-y"], relay.udp_addrs()[0].port(), None, STATIC);
    // Client pairs talk to each other; uclient counts both directions.
    assert!(t.sent >= CLIENTS * MESSAGES, "{t:?}");
    assert_lossless(&t, t.sent);
    let (up, down) = relayed(&relay);
    assert!(
        up >= (CLIENTS * MESSAGES) as u64 && down >= (CLIENTS * MESSAGES) as u64,
        "{up} {down}"
    );
}

#[test]
fn uclient_tls_lossless() {
    let relay = relay::start(relay::lab_config());
    let peer = EchoPeer::start();
    let t = uclient(
        &["-S", "-t"],
        relay.tls_addrs()[0].port(),
        Some(&peer),
        STATIC,
    );
    assert_lossless(&t, CLIENTS * MESSAGES);
    assert_eq!(peer.count(), CLIENTS * MESSAGES);
}

#[test]
fn uclient_rest_credentials_lossless() {
    let relay = relay::start(relay::lab_config());
    let peer = EchoPeer::start();
    let t = uclient(
        &[],
        relay.udp_addrs()[0].port(),
        Some(&peer),
        &["-u", "carol", "-W", SECRET],
    );
    assert_lossless(&t, CLIENTS * MESSAGES);
    assert_eq!(peer.count(), CLIENTS * MESSAGES);
}

#[test]
fn uclient_with_wrong_rest_secret_is_refused() {
    let relay = relay::start(relay::lab_config());
    let peer = EchoPeer::start();
    let out = uclient_once(&relay, &peer, &["-u", "carol", "-W", "not-the-secret"]);
    assert!(
        out.text.contains("Cannot complete Allocation"),
        "{}",
        out.text
    );
    assert_eq!(peer.count(), 0);
    let refused: u64 = relay
        .metrics()
        .iter()
        .map(|m| m.auth_failures(stun_turn::metrics::AuthFailure::BadIntegrity))
        .sum();
    assert!(refused > 0, "the relay counted the bad MESSAGE-INTEGRITY");
}

#[test]
fn default_policy_refuses_a_loopback_peer() {
    let relay = relay::start(relay::loopback_config());
    let peer = EchoPeer::start();
    let out = uclient_once(&relay, &peer, STATIC);
    assert!(
        out.text.contains("error 403"),
        "expected 403 Forbidden:\n{}",
        out.text
    );
    assert_eq!(peer.count(), 0, "nothing may reach a loopback peer");
}

#[test]
fn stunclient_gets_its_reflexive_address() {
    let relay = relay::start(relay::loopback_config());
    let out = run(
        "turnutils_stunclient",
        &args(&["-p", &relay.udp_addrs()[0].port().to_string(), "127.0.0.1"]),
        LIMIT,
    );
    assert!(
        out.text.contains("UDP reflexive addr: 127.0.0.1:"),
        "{}",
        out.text
    );
}

#[test]
fn classic_rfc3489_stun_client_sees_an_open_internet() {
    let relay = relay::start_with_alternate(relay::loopback_config());
    let port = relay.udp_addrs()[0].port();
    let out = run("stun", &args(&["-v", &format!("127.0.0.1:{port}")]), LIMIT);
    assert!(
        out.text.contains("MappedAddress = 127.0.0.1:"),
        "{}",
        out.text
    );
    assert!(
        out.text.contains("Primary: Open"),
        "loopback has no NAT:\n{}",
        out.text
    );
}

#[test]
fn natdiscovery_reports_endpoint_independent_behaviour() {
    let relay = relay::start_with_alternate(relay::loopback_config());
    let port = relay.udp_addrs()[0].port();
    let out = run(
        "turnutils_natdiscovery",
        &args(&["-m", "-f", "-p", &port.to_string(), "127.0.0.1"]),
        LIMIT,
    );
    assert!(
        out.text.contains("NAT with Endpoint Independent Mapping"),
        "{}",
        out.text
    );
    assert!(
        out.text.contains("NAT with Endpoint Independent Filtering"),
        "{}",
        out.text
    );
    assert!(
        out.text.contains("Other addr: : 127.0.0.2:"),
        "OTHER-ADDRESS names the alternate:\n{}",
        out.text
    );
}

/// RFC 6062: turnutils_uclient -T makes TCP allocations and relays over
/// TCP connections set up with Connect / ConnectionAttempt / ConnectionBind.
fn tcp_relay(mode: &[&str], tls: bool) {
    let relay = relay::start(relay::lab_config());
    let peer = EchoPeer::start();
    let port = if tls {
        relay.tls_addrs()[0].port()
    } else {
        relay.tcp_addrs()[0].port()
    };
    let mut flags = mode.to_vec();
    flags.extend(["-T", "-c"]);
    // uclient paces its TCP-relay mode at about one message a second per
    // client whatever -z says, so keep the run short.
    let t = uclient_sized(&flags, port, Some(&peer), STATIC, 2, 10);
    assert!(t.sent >= 20, "{t:?}");
    assert_lossless(&t, t.sent);
    let bound = tcp_bound(&relay);
    assert!(
        bound >= 2,
        "data connections were bound through ConnectionBind: {bound}"
    );
}

#[test]
fn uclient_rfc6062_tcp_relay_lossless() {
    tcp_relay(&["-t"], false);
}

#[test]
fn uclient_rfc6062_tcp_relay_over_tls_lossless() {
    tcp_relay(&["-S", "-t"], true);
}

/// RFC 6062 between the clients themselves (no outside peer), several
/// pairs at once: each client Connects to every other client's relayed
/// address and each side binds its data connection. turnutils_uclient
/// presents its allocation's nonce on every new data connection and then
/// keeps using the nonce it got last; with nonces bound to the client's
/// port, 14 of 30 connections completed after a 37 s wait.
#[test]
fn uclient_rfc6062_client_to_client_with_several_pairs() {
    let relay = relay::start(relay::lab_config());
    let port = relay.tcp_addrs()[0].port().to_string();
    let mut a = args(STATIC);
    a.extend(args(&[
        "-X",
        "-T",
        "-m",
        "5",
        "-n",
        "10",
        "-l",
        "120",
        "-z",
        "5",
        "-p",
        &port,
        "127.0.0.1",
    ]));
    let out = run("turnutils_uclient", &a, LIMIT);
    assert!(
        out.text.contains("connections are completed") && !out.text.contains("not enough"),
        "not every RFC 6062 connection completed:\n{}",
        out.text
    );
    let t = totals(&out.text);
    assert!(t.sent > 0, "{t:?}");
    assert_lossless(&t, t.sent);
    let bound = tcp_bound(&relay);
    assert!(bound >= 20, "{bound} data connections bound");
}
