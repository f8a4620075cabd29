//! Interop with baresip (Debian `baresip-core` 1.0): two headless baresip
//! instances register through `parley signaling` with digest accounts and
//! complete an audio call whose ICE goes through `parley turn` and whose
//! media is DTLS-SRTP, driven over baresip's ctrl_tcp module.
//!
//! Each instance runs in a network namespace of its own
//! ([`parley_tests::baresip::Lab`]); signaling and the relay listen on the
//! host end of the first one's link. The two namespaces cannot reach each
//! other directly, so the only working ICE pair is through the relay.
//! Needs root (namespaces) and `ip` from iproute2.

use parley_tests::baresip::{configure, wait_registered, Account, Ctrl, Lab, TURN_PASSWORD};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_parley");
const HOST: &str = "10.213.1.1";
const ALICE: &str = "+14155550100";
const BOB: &str = "+14155550123";

/// Starts `parley <args>`, kept for clean-up; returns its admin address.
fn start_parley(lab: &mut Lab, args: &[&str]) -> SocketAddr {
    let (child, printed) = parley_tests::tool::start_until_ready(BIN, args);
    lab.keep(child);
    printed
        .iter()
        .find_map(|l| l.strip_prefix("parley: admin http://"))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|a| a.parse().ok())
        .expect("admin address")
}

fn metric(admin: SocketAddr, line_prefix: &str) -> u64 {
    let mut s = TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn two_baresips_call_through_parley_signaling_and_turn_with_dtls_srtp() {
    let mut lab = Lab::open();
    lab.add_namespace('a', 1);
    lab.add_namespace('b', 2);
    let tmp = tempfile::tempdir().unwrap();

    let config = tmp.path().join("parley.toml");
    std::fs::write(
        &config,
        format!(
            "[signaling]\ndomains = [\"parley.test\"]\n\
             [[signaling.accounts]]\nhandle = \"{ALICE}\"\npassword = \"alice-password\"\n\
             [[signaling.accounts]]\nhandle = \"{BOB}\"\npassword = \"bob-password\"\n"
        ),
    )
    .unwrap();
    let sip = format!("{HOST}:5060");
    let data_sig = tmp.path().join("sig");
    start_parley(
        &mut lab,
        &[
            "--data",
            data_sig.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "--admin",
            "127.0.0.1:0",
            "signaling",
            "--sip-listen",
            &sip,
            "--sip-tls-listen",
            &format!("{HOST}:5061"),
            "--sip-wss-listen",
            &format!("{HOST}:8445"),
        ],
    );
    let data_turn = tmp.path().join("turn");
    let turn_admin = start_parley(
        &mut lab,
        &[
            "--data",
            data_turn.to_str().unwrap(),
            "--admin",
            "127.0.0.1:0",
            "turn",
            "--listen",
            &format!("{HOST}:3478"),
            "--tls-listen",
            &format!("{HOST}:5349"),
            "--relay-ip",
            HOST,
            "--allow-peer",
            "10.213.0.0/16",
            "--user",
            &format!("alice:{TURN_PASSWORD}"),
            "--user",
            &format!("bob:{TURN_PASSWORD}"),
        ],
    );

    let dirs: Vec<PathBuf> = ['a', 'b']
        .iter()
        .map(|s| tmp.path().join(format!("baresip-{s}")))
        .collect();
    let turn = format!("{HOST}:3478");
    for (i, (n, handle, password, user)) in [
        (1, ALICE, "alice-password", "alice"),
        (2, BOB, "bob-password", "bob"),
    ]
    .into_iter()
    .enumerate()
    {
        let account = Account {
            handle,
            password,
            registrar: HOST,
            turn: &turn,
            turn_user: user,
            rtcp_mux: false,
        };
        configure(&dirs[i], n, &account);
        lab.baresip(['a', 'b'][i], &dirs[i]);
    }
    for d in &dirs {
        wait_registered(&d.join("out.log"));
    }

    let mut alice = Ctrl::connect("10.213.1.2:4444");
    let mut bob = Ctrl::connect("10.213.2.2:4444");
    alice.command("dial", &format!("sip:{BOB}@{HOST}"));
    // Both sides must see the call established, secured by DTLS-SRTP and
    // carrying RTP.
    let want = ["CALL_ESTABLISHED", "CALL_MENC", "CALL_RTPESTAB"];
    let mut seen: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline
        && !seen
            .iter()
            .all(|s| want.iter().all(|w| s.iter().any(|x| x == w)))
    {
        for (i, c) in [&mut alice, &mut bob].into_iter().enumerate() {
            if let Some(v) = c.next_message() {
                if let Some(t) = v["type"].as_str() {
                    assert_ne!(t, "CALL_CLOSED", "call closed: {v}");
                    seen[i].push(t.to_owned());
                }
            }
        }
    }
    for (i, who) in ["caller", "callee"].iter().enumerate() {
        for w in want {
            assert!(
                seen[i].iter().any(|x| x == w),
                "{who} never saw {w}; events {:?}\n{}",
                seen[i],
                std::fs::read_to_string(dirs[i].join("out.log")).unwrap_or_default()
            );
        }
    }
    let log = std::fs::read_to_string(dirs[0].join("out.log")).unwrap();
    assert!(log.contains("DTLS-SRTP complete"), "{log}");

    // Media flowed through the relay, both ways.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut to_peer, mut to_client) = (0, 0);
    while Instant::now() < deadline && (to_peer < 100 || to_client < 100) {
        to_peer = metric(
            turn_admin,
            "parley_turn_relayed_packets_total{direction=\"to_peer\"}",
        );
        to_client = metric(
            turn_admin,
            "parley_turn_relayed_packets_total{direction=\"to_client\"}",
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        to_peer >= 100 && to_client >= 100,
        "relayed {to_peer} to peers and {to_client} to clients"
    );

    alice.command("hangup", "");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut closed = false;
    while Instant::now() < deadline && !closed {
        if let Some(v) = bob.next_message() {
            closed = v["type"] == "CALL_CLOSED";
        }
    }
    assert!(closed, "the callee saw the BYE");
}
