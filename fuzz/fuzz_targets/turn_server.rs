//! Feeds arbitrary datagrams, from a few client addresses, into the sans-IO
//! relay core with a fixed configuration, confirming every relay bind, and
//! drains its output. The core must never panic on hostile input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use std::time::{Duration, Instant};
use stun_turn::core::{ClientAddr, Event, RelayId, Server, Shared, Transport};
use stun_turn::metrics::Metrics;
use stun_turn::Config;

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let config = Config {
        udp: vec!["192.0.2.10:3478".parse().unwrap()],
        relay_ipv4: Some("192.0.2.10".parse().unwrap()),
        users: vec![("alice".into(), "pw".into())],
        rest_secrets: vec!["s".into()],
        alternate: Some("192.0.2.11:3479".parse().unwrap()),
        ..Config::default()
    };
    let shared = Shared::new(config, [1; 32], vec![], now, 1_700_000_000);
    let mut server = Server::new(shared, Arc::new(Metrics::default()), 0, 1, 7);
    // Input: records of [selector, len, bytes...].
    let mut rest = data;
    let mut t = now;
    while rest.len() >= 2 {
        let (sel, len) = (rest[0], rest[1] as usize);
        let body = &rest[2..(2 + len).min(rest.len())];
        rest = &rest[(2 + len).min(rest.len())..];
        let transport = if sel & 1 == 0 {
            Transport::Udp
        } else {
            Transport::Tcp
        };
        let client = ClientAddr {
            transport,
            remote: std::net::SocketAddr::from((
                [198, 51, 100, sel >> 4],
                4000 + u16::from(sel & 0x0e),
            )),
            local: "192.0.2.10:3478".parse().unwrap(),
        };
        match sel % 5 {
            4 => {
                let _ = server.handle_peer_input(
                    RelayId(u32::from(sel)),
                    "203.0.113.1:9".parse().unwrap(),
                    body,
                    t,
                );
            }
            3 => server.handle_client_closed(client),
            _ => {
                let _ = server.handle_client_input(client, body, t);
            }
        }
        while let Some(ev) = server.poll_event() {
            if let Event::BindRelay { relay, addr, .. } = ev {
                server.handle_relay_bound(relay, Some(addr), t);
            }
        }
        while server.poll_transmit().is_some() {}
        t += Duration::from_secs(u64::from(sel));
        server.handle_timeout(t);
    }
});
