//! The SDK's TURN client against Parley's own relay core, both sans-IO,
//! in one simulated network with hand-moved time: allocation through the
//! 401 challenge, permissions, Send/Data indications, channels, refreshes
//! that keep everything alive past every lifetime, and a silent server;
//! the same over a TCP stream.

use client_sdk::turn::{Config, Event, Transport as Over, TurnClient};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use stun_turn::core::{ClientAddr, ClientOutcome, PeerOutcome, Server, Shared, Transport};

const SERVER: &str = "192.0.2.10:3478";
const ME: &str = "198.51.100.7:40000";
const PEER: &str = "203.0.113.9:5000";

struct Net {
    /// How the client reaches the server.
    over: Over,
    client: TurnClient,
    server: Server,
    now: Instant,
    /// What reached the peer: (relay address it came from, payload).
    at_peer: Vec<Vec<u8>>,
    events: Vec<Event>,
    relay: Option<(stun_turn::core::RelayId, SocketAddr)>,
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn client_addr() -> ClientAddr {
    client_over(Over::Udp)
}

fn client_over(over: Over) -> ClientAddr {
    ClientAddr {
        transport: match over {
            Over::Udp => Transport::Udp,
            Over::Tcp => Transport::Tcp,
            Over::Tls => Transport::Tls,
        },
        remote: addr(ME),
        local: addr(SERVER),
    }
}

impl Net {
    fn new(password: &str) -> Net {
        Net::over(password, Over::Udp)
    }

    fn over(password: &str, over: Over) -> Net {
        let now = Instant::now();
        let config = stun_turn::Config {
            realm: "parley".into(),
            udp: vec![addr(SERVER)],
            relay_ipv4: Some("192.0.2.10".parse().unwrap()),
            users: vec![("alice".into(), "wonderland".into())],
            allow_peers: vec!["203.0.113.0/24".parse().unwrap()],
            ..stun_turn::Config::default()
        };
        let shared = Shared::new(config, [7; 32], vec![addr(SERVER)], now, 1_700_000_000);
        let server = Server::new(
            shared,
            Arc::new(stun_turn::metrics::Metrics::default()),
            0,
            1,
            9,
        );
        let config = Config::new(addr(SERVER), "alice", password).over(over);
        let client = TurnClient::new(config, 42);
        Net {
            over,
            client,
            server,
            now,
            at_peer: Vec::new(),
            events: Vec::new(),
            relay: None,
        }
    }

    /// Moves every datagram until both sides are quiet.
    fn pump(&mut self) {
        for _ in 0..100 {
            let mut moved = false;
            while let Some(bytes) = self.client.poll_transmit() {
                moved = true;
                self.deliver_to_server(&bytes);
            }
            while let Some(e) = self.server.poll_event() {
                moved = true;
                if let stun_turn::core::Event::BindRelay { relay, addr, .. } = e {
                    let bound = SocketAddr::new(addr.ip(), 50_000);
                    self.relay = Some((relay, bound));
                    self.server.handle_relay_bound(relay, Some(bound), self.now);
                }
            }
            while let Some(t) = self.server.poll_transmit() {
                moved = true;
                self.client.handle_input(&t.bytes, self.now);
            }
            while let Some(e) = self.client.poll_event() {
                self.events.push(e);
            }
            if !moved {
                return;
            }
        }
        panic!("the network never went quiet");
    }

    fn deliver_to_server(&mut self, bytes: &[u8]) {
        match self
            .server
            .handle_client_input(client_over(self.over), bytes, self.now)
        {
            ClientOutcome::Forward { payload, .. } => self.at_peer.push(bytes[payload].to_vec()),
            ClientOutcome::Handled => {}
        }
    }

    /// The peer sends to our relayed address.
    fn peer_sends(&mut self, data: &[u8]) {
        let (relay, _) = self.relay.expect("allocated");
        let out = match self
            .server
            .handle_peer_input(relay, addr(PEER), data, self.now)
        {
            PeerOutcome::Drop => None,
            PeerOutcome::ChannelData { channel, .. } => {
                let mut f = stun_turn::channel_data::encode_header(channel, data.len()).to_vec();
                f.extend_from_slice(data);
                Some(f)
            }
            PeerOutcome::Indication { message, .. } => Some(message.to_vec()),
        };
        if let Some(bytes) = out {
            self.client.handle_input(&bytes, self.now);
        }
        while let Some(e) = self.client.poll_event() {
            self.events.push(e);
        }
    }

    fn advance(&mut self, d: Duration) {
        let until = self.now + d;
        loop {
            let next = [self.client.poll_timeout(), self.server.poll_timeout()]
                .into_iter()
                .flatten()
                .min();
            match next {
                Some(t) if t <= until => {
                    self.now = self.now.max(t);
                    self.client.handle_timeout(self.now);
                    self.server.handle_timeout(self.now);
                    self.pump();
                }
                _ => break,
            }
        }
        self.now = until;
        self.client.handle_timeout(self.now);
        self.server.handle_timeout(self.now);
        self.pump();
    }

    fn take_data(&mut self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        self.events.retain(|e| match e {
            Event::Data { peer, data } => {
                assert_eq!(*peer, addr(PEER));
                out.push(data.clone());
                false
            }
            _ => true,
        });
        out
    }
}

#[test]
fn allocates_relays_both_ways_and_stays_alive_past_every_lifetime() {
    let mut n = Net::new("wonderland");
    n.client.allocate(n.now);
    n.pump();
    let relayed = match n.events.first() {
        Some(Event::Allocated { relayed, mapped }) => {
            assert_eq!(*mapped, Some(addr(ME)));
            *relayed
        }
        other => panic!("expected an allocation, got {other:?}"),
    };
    assert_eq!(
        relayed.ip(),
        "192.0.2.10".parse::<std::net::IpAddr>().unwrap()
    );
    assert_eq!(n.client.relayed(), Some(relayed));

    // Without a permission the relay drops the peer's datagrams.
    n.peer_sends(b"early");
    assert!(n.take_data().is_empty());

    n.client.create_permission(addr(PEER), n.now);
    n.pump();
    assert!(n.events.contains(&Event::PermissionCreated {
        peer: addr(PEER).ip()
    }));

    // Send indication out, Data indication back.
    let d = n.client.wrap(addr(PEER), b"hello peer");
    n.deliver_to_server(&d);
    assert_eq!(n.at_peer.pop().as_deref(), Some(&b"hello peer"[..]));
    n.peer_sends(b"hello client");
    assert_eq!(n.take_data(), vec![b"hello client".to_vec()]);

    // A channel: ChannelData both ways.
    let ch = n.client.bind_channel(addr(PEER), n.now);
    n.pump();
    assert!(n.events.contains(&Event::ChannelBound {
        peer: addr(PEER),
        channel: ch
    }));
    let d = n.client.wrap(addr(PEER), b"over the channel");
    assert_eq!(&d[..2], &ch.to_be_bytes());
    n.deliver_to_server(&d);
    assert_eq!(n.at_peer.pop().as_deref(), Some(&b"over the channel"[..]));
    n.peer_sends(b"channel back");
    assert_eq!(n.take_data(), vec![b"channel back".to_vec()]);

    // Half an hour later — past the allocation (10 min), permission (5)
    // and channel (10) lifetimes — everything still works: the client
    // refreshed each in time.
    n.advance(Duration::from_secs(1800));
    assert!(n.server.has_allocation(&client_addr()));
    let d = n.client.wrap(addr(PEER), b"still here");
    n.deliver_to_server(&d);
    assert_eq!(n.at_peer.pop().as_deref(), Some(&b"still here"[..]));
    n.peer_sends(b"me too");
    assert_eq!(n.take_data(), vec![b"me too".to_vec()]);
    assert!(
        !n.events.iter().any(|e| matches!(e, Event::Failed { .. })),
        "{:?}",
        n.events
    );
}

#[test]
fn a_released_allocation_is_gone_from_the_relay() {
    let mut n = Net::new("wonderland");
    n.client.allocate(n.now);
    n.pump();
    n.client.create_permission(addr(PEER), n.now);
    n.pump();
    n.peer_sends(b"before");
    assert_eq!(n.take_data(), vec![b"before".to_vec()]);
    let (relay, _) = n.relay.expect("allocated");
    n.client.release(n.now);
    n.pump();
    assert_eq!(n.client.relayed(), None);
    // The relay no longer knows the allocation: a peer's datagram to it
    // goes nowhere.
    let out = n
        .server
        .handle_peer_input(relay, addr(PEER), b"after", n.now);
    assert_eq!(out, PeerOutcome::Drop);
    // Releasing twice sends nothing more.
    n.client.release(n.now);
    assert!(n.client.poll_transmit().is_none());
}

#[test]
fn a_wrong_password_fails_with_the_servers_code() {
    let mut n = Net::new("not-the-password");
    n.client.allocate(n.now);
    n.pump();
    assert!(
        n.events
            .iter()
            .any(|e| matches!(e, Event::Failed { code: 401, .. })),
        "{:?}",
        n.events
    );
    assert_eq!(n.client.relayed(), None);
}

#[test]
fn a_silent_server_is_retried_then_reported() {
    let mut c = TurnClient::new(Config::new(addr(SERVER), "alice", "wonderland"), 1);
    let t0 = Instant::now();
    c.allocate(t0);
    let mut sends = vec![0u64];
    assert!(c.poll_transmit().is_some());
    let mut failed = None;
    while failed.is_none() {
        let now = c.poll_timeout().expect("a retransmission is scheduled");
        c.handle_timeout(now);
        while c.poll_transmit().is_some() {
            sends.push(now.duration_since(t0).as_millis() as u64);
        }
        failed = c.poll_event();
        assert!(now.duration_since(t0) < Duration::from_secs(120));
    }
    // RFC 8489 §6.2.1: 7 sends at 0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5 s.
    assert_eq!(sends, vec![0, 500, 1500, 3500, 7500, 15500, 31500]);
    assert!(matches!(failed, Some(Event::Failed { code: 0, .. })));
}

/// Over TCP: the same allocation, permission and channel; ChannelData
/// padded to four bytes each way, the payloads exact; refreshes keep it
/// alive.
#[test]
fn over_a_stream_channel_data_is_padded_and_everything_stays_alive() {
    let mut n = Net::over("wonderland", Over::Tcp);
    n.client.allocate(n.now);
    n.pump();
    assert!(
        matches!(n.events.first(), Some(Event::Allocated { .. })),
        "{:?}",
        n.events
    );
    let ch = n.client.bind_channel(addr(PEER), n.now);
    n.pump();
    assert!(n.events.contains(&Event::ChannelBound {
        peer: addr(PEER),
        channel: ch
    }));
    for payload in [&b"a"[..], b"ab", b"abc", b"abcd", b"abcde"] {
        let d = n.client.wrap(addr(PEER), payload);
        assert_eq!(d.len() % 4, 0, "{d:?}");
        assert_eq!(
            stun_turn::message::stream_frame_len(&d).unwrap(),
            Some(d.len())
        );
        n.deliver_to_server(&d);
        assert_eq!(n.at_peer.pop().as_deref(), Some(payload));
        n.peer_sends(payload);
        assert_eq!(n.take_data(), vec![payload.to_vec()]);
    }
    n.advance(Duration::from_secs(1800));
    assert!(n.server.has_allocation(&client_over(Over::Tcp)));
    let d = n.client.wrap(addr(PEER), b"still here");
    n.deliver_to_server(&d);
    assert_eq!(n.at_peer.pop().as_deref(), Some(&b"still here"[..]));
}

/// Over a stream a request goes once (the stream carries it or breaks),
/// and a server that never answers is reported as late as over UDP.
#[test]
fn over_a_stream_a_silent_server_is_sent_one_request_then_reported() {
    let config = Config::new(addr(SERVER), "alice", "wonderland").over(Over::Tls);
    let mut c = TurnClient::new(config, 1);
    let t0 = Instant::now();
    c.allocate(t0);
    assert!(c.poll_transmit().is_some());
    let mut failed = None;
    let mut at = t0;
    while failed.is_none() {
        at = c.poll_timeout().expect("a deadline is set");
        c.handle_timeout(at);
        assert!(c.poll_transmit().is_none(), "sent again over a stream");
        failed = c.poll_event();
        assert!(at.duration_since(t0) < Duration::from_secs(120));
    }
    assert!(matches!(failed, Some(Event::Failed { code: 0, .. })));
    assert_eq!(at.duration_since(t0), Duration::from_millis(63_500));
}

proptest::proptest! {
    /// Whatever the network delivers, the client does not panic.
    #[test]
    fn never_panics_on_what_arrives(packets in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..200), 0..20)) {
        let mut c = TurnClient::new(Config::new(addr(SERVER), "alice", "wonderland"), 3);
        let t0 = Instant::now();
        c.allocate(t0);
        c.bind_channel(addr(PEER), t0);
        for (i, p) in packets.iter().enumerate() {
            let now = t0 + Duration::from_millis(i as u64 * 300);
            c.handle_input(p, now);
            c.handle_timeout(now);
            while c.poll_transmit().is_some() {}
            while c.poll_event().is_some() {}
        }
    }
}
