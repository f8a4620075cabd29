use super::*;
use crate::message::attr::decode_address;
use proptest::prelude::*;

const REALM: &str = "parley";
const SECRET: &str = "rest-secret";

struct Harness {
    server: Server,
    now: Instant,
    relay_port: u16,
    /// Ports the server asked to hold for reservations.
    held: Vec<SocketAddr>,
    tid: u32,
}

fn config() -> Config {
    Config {
        realm: REALM.into(),
        udp: vec!["192.0.2.10:3478".parse().unwrap()],
        relay_ipv4: Some("192.0.2.10".parse().unwrap()),
        relay_ipv6: Some("2001:db8::10".parse().unwrap()),
        users: vec![
            ("alice".into(), "wonderland".into()),
            ("bob".into(), "builder".into()),
        ],
        rest_secrets: vec![SECRET.into()],
        ..Config::default()
    }
}

fn harness_with(cfg: Config) -> Harness {
    let now = Instant::now();
    let own = cfg.udp.clone();
    let shared = Shared::new(cfg, [9; 32], own, now, 1_700_000_000);
    Harness {
        server: Server::new(shared, Arc::new(Metrics::default()), 0, 1, 42),
        now,
        relay_port: 50000,
        held: Vec::new(),
        tid: 0,
    }
}

fn harness() -> Harness {
    harness_with(config())
}

fn client(port: u16) -> ClientAddr {
    ClientAddr {
        transport: Transport::Udp,
        remote: SocketAddr::from(([198, 51, 100, 1], port)),
        local: "192.0.2.10:3478".parse().unwrap(),
    }
}

/// What the client knows after a challenge.
#[derive(Clone)]
struct Creds {
    user: String,
    pass: String,
    nonce: String,
    alg: Option<PasswordAlgorithm>,
    userhash: bool,
}

impl Creds {
    fn key(&self) -> Vec<u8> {
        auth::long_term_key(
            self.alg.unwrap_or(PasswordAlgorithm::Md5),
            &self.user,
            REALM,
            &self.pass,
        )
    }
}

impl Harness {
    fn tid(&mut self) -> TransactionId {
        self.tid += 1;
        let mut t = [0u8; 12];
        t[..4].copy_from_slice(&self.tid.to_be_bytes());
        TransactionId(t)
    }

    fn request(
        &mut self,
        method: Method,
        creds: Option<&Creds>,
        attrs: impl FnOnce(&mut MessageBuilder<'_>),
    ) -> Vec<u8> {
        let tid = self.tid();
        let mut buf = Vec::new();
        let mut b = MessageBuilder::new(&mut buf, Class::Request, method, tid);
        attrs(&mut b);
        if let Some(c) = creds {
            if c.userhash {
                b.add_attr(AttrType::Userhash, &auth::userhash(&c.user, REALM));
            } else {
                b.add_attr(AttrType::Username, c.user.as_bytes());
            }
            b.add_attr(AttrType::Realm, REALM.as_bytes());
            b.add_attr(AttrType::Nonce, c.nonce.as_bytes());
            if let Some(alg) = c.alg {
                b.add_with(AttrType::PasswordAlgorithm as u16, 4, |o| {
                    o.extend_from_slice(&[0, alg as u8, 0, 0])
                });
                b.add_with(AttrType::PasswordAlgorithms as u16, 8, |o| {
                    PasswordAlgorithm::encode_list(OFFERED_ALGORITHMS, o)
                });
            }
            let kind = if c.alg == Some(PasswordAlgorithm::Sha256) {
                IntegrityKind::Sha256
            } else {
                IntegrityKind::Sha1
            };
            b.add_integrity(kind, &c.key());
        }
        b.add_fingerprint();
        buf
    }

    fn send(&mut self, from: ClientAddr, bytes: &[u8]) -> ClientOutcome {
        let out = self.server.handle_client_input(from, bytes, self.now);
        self.bind_all();
        out
    }

    /// Confirms every BindRelay with sequential fake ports.
    fn bind_all(&mut self) {
        while let Some(ev) = self.server.poll_event() {
            match ev {
                Event::BindRelay { relay, addr, .. } => {
                    self.relay_port += 1;
                    self.server.handle_relay_bound(relay, Some(addr), self.now);
                }
                Event::HoldPort { addr, until } => {
                    assert_eq!(until, self.now + Duration::from_secs(30));
                    self.held.push(addr);
                }
                _ => {}
            }
        }
    }

    fn response(&mut self) -> Vec<u8> {
        let t = self.server.poll_transmit().expect("a response");
        assert!(
            self.server.poll_transmit().is_none(),
            "exactly one response"
        );
        t.bytes
    }

    fn challenge(&mut self, from: ClientAddr, user: &str, pass: &str) -> Creds {
        let req = self.request(Method::Allocate, None, |b| {
            b.add_attr(AttrType::RequestedTransport, &[17, 0, 0, 0]);
        });
        self.send(from, &req);
        let resp = self.response();
        let m = Message::decode(&resp).unwrap();
        assert_eq!(error_code(&m), Some(401));
        assert_eq!(m.text_attr(AttrType::Realm, 763).unwrap(), Some(REALM));
        let nonce = m
            .text_attr(AttrType::Nonce, 763)
            .unwrap()
            .unwrap()
            .to_owned();
        assert!(nonce.starts_with("obMatJos2"));
        Creds {
            user: user.into(),
            pass: pass.into(),
            nonce,
            alg: None,
            userhash: false,
        }
    }

    fn allocate_with(
        &mut self,
        from: ClientAddr,
        creds: &Creds,
        extra: impl FnOnce(&mut MessageBuilder<'_>),
    ) -> Vec<u8> {
        let req = self.request(Method::Allocate, Some(creds), |b| {
            b.add_attr(AttrType::RequestedTransport, &[17, 0, 0, 0]);
            extra(b);
        });
        self.send(from, &req);
        self.response()
    }

    fn allocate(&mut self, from: ClientAddr, user: &str, pass: &str) -> (Creds, SocketAddr) {
        let creds = self.challenge(from, user, pass);
        let resp = self.allocate_with(from, &creds, |_| {});
        let m = Message::decode(&resp).unwrap();
        assert_eq!(
            m.class(),
            Class::Success,
            "allocate failed: {:?}",
            error_code(&m)
        );
        assert_eq!(
            m.verify_integrity(&creds.key()).unwrap(),
            Some(IntegrityKind::Sha1)
        );
        let relay = m.xor_address(AttrType::XorRelayedAddress).unwrap().unwrap();
        (creds, relay)
    }

    fn simple(
        &mut self,
        from: ClientAddr,
        method: Method,
        creds: &Creds,
        attrs: impl FnOnce(&mut MessageBuilder<'_>),
    ) -> Option<u16> {
        let req = self.request(method, Some(creds), attrs);
        self.send(from, &req);
        let resp = self.response();
        let m = Message::decode(&resp).unwrap();
        error_code(&m)
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.server.handle_timeout(self.now);
    }
}

fn error_code(m: &Message<'_>) -> Option<u16> {
    m.attr(AttrType::ErrorCode)
        .map(|v| ErrorCode::decode(v).unwrap().0 .0)
}

fn peer(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn binding_reports_the_reflexive_address() {
    let mut h = harness();
    let req = h.request(Method::Binding, None, |_| {});
    h.send(client(4000), &req);
    let t = h.server.poll_transmit().unwrap();
    assert_eq!(t.from, client(4000).local);
    let m = Message::decode(&t.bytes).unwrap();
    assert_eq!(m.class(), Class::Success);
    assert_eq!(
        m.xor_address(AttrType::XorMappedAddress).unwrap(),
        Some(client(4000).remote)
    );
    assert!(m.check_fingerprint().unwrap());
    assert!(!m.has(AttrType::Software), "SOFTWARE is off by default");
}

#[test]
fn classic_rfc3489_binding_gets_mapped_and_source_address() {
    let mut h = harness();
    let mut req = vec![0x00, 0x01, 0x00, 0x00];
    req.extend_from_slice(&[0x5a; 16]);
    h.send(client(4001), &req);
    let resp = h.response();
    assert_eq!(&resp[4..20], &[0x5a; 16], "the 128-bit id is echoed");
    let m = Message::decode(&resp).unwrap();
    assert_eq!(m.class(), Class::Success);
    assert_eq!(
        decode_address(m.attr(AttrType::MappedAddress).unwrap()).unwrap(),
        client(4001).remote
    );
    assert_eq!(
        decode_address(m.attr(AttrType::SourceAddress).unwrap()).unwrap(),
        client(4001).local
    );
}

#[test]
fn change_request_without_alternate_is_unknown_attribute() {
    let mut h = harness();
    let req = h.request(Method::Binding, None, |b| {
        b.add_u32(AttrType::ChangeRequest, 0x6);
    });
    h.send(client(4002), &req);
    let resp = h.response();
    let m = Message::decode(&resp).unwrap();
    assert_eq!(error_code(&m), Some(420));
    assert_eq!(m.attr(AttrType::UnknownAttributes), Some(&[0x00, 0x03][..]));
}

#[test]
fn response_port_is_refused() {
    let mut h = harness();
    let req = h.request(Method::Binding, None, |b| {
        b.add_u32(AttrType::ResponsePort, 0x1234_0000);
    });
    h.send(client(4004), &req);
    let resp = h.response();
    assert_eq!(error_code(&Message::decode(&resp).unwrap()), Some(420));
}

#[test]
fn even_port_reserves_the_next_port_for_a_token() {
    let mut h = harness_with(Config {
        workers: 2,
        ..config()
    });
    h.server.workers = 2;
    let c = client(4010);
    let creds = h.challenge(c, "alice", "wonderland");
    let resp = h.allocate_with(c, &creds, |b| {
        b.add_with(AttrType::EvenPort as u16, 1, |o| o.push(0x80));
    });
    let m = Message::decode(&resp).unwrap();
    assert_eq!(m.class(), Class::Success, "{:?}", error_code(&m));
    let relay = m.xor_address(AttrType::XorRelayedAddress).unwrap().unwrap();
    assert_eq!(relay.port() % 2, 0);
    assert_eq!((relay.port() / 2) % 2, 0, "worker 0 owns this pair");
    let token = m.attr(AttrType::ReservationToken).unwrap().to_vec();
    let odd = SocketAddr::new(relay.ip(), relay.port() + 1);
    assert_eq!(h.held, [odd], "the runtime is asked to hold the odd port");
    // Another client claims the odd port with the token.
    let d = client(4011);
    let creds = h.challenge(d, "alice", "wonderland");
    let resp = h.allocate_with(d, &creds, |b| {
        b.add_attr(AttrType::ReservationToken, &token);
    });
    let m = Message::decode(&resp).unwrap();
    let odd = m.xor_address(AttrType::XorRelayedAddress).unwrap().unwrap();
    assert_eq!(odd.port(), relay.port() + 1);
    // A token works once; with EVEN-PORT beside it it is a 400.
    let e = client(4012);
    let creds = h.challenge(e, "alice", "wonderland");
    let resp = h.allocate_with(e, &creds, |b| {
        b.add_attr(AttrType::ReservationToken, &token);
    });
    assert_eq!(error_code(&Message::decode(&resp).unwrap()), Some(508));
    let resp = h.allocate_with(e, &creds, |b| {
        b.add_attr(AttrType::ReservationToken, &token);
        b.add_with(AttrType::EvenPort as u16, 1, |o| o.push(0));
    });
    assert_eq!(error_code(&Message::decode(&resp).unwrap()), Some(400));
}

#[test]
fn reservation_expires_after_30_seconds() {
    let mut h = harness();
    let c = client(4020);
    let creds = h.challenge(c, "alice", "wonderland");
    let resp = h.allocate_with(c, &creds, |b| {
        b.add_with(AttrType::EvenPort as u16, 1, |o| o.push(0x80));
    });
    let token = Message::decode(&resp)
        .unwrap()
        .attr(AttrType::ReservationToken)
        .unwrap()
        .to_vec();
    h.advance(Duration::from_secs(30));
    let d = client(4021);
    let creds = h.challenge(d, "alice", "wonderland");
    let resp = h.allocate_with(d, &creds, |b| {
        b.add_attr(AttrType::ReservationToken, &token);
    });
    assert_eq!(error_code(&Message::decode(&resp).unwrap()), Some(508));
}

#[test]
fn rfc5780_change_request_answers_from_the_other_address() {
    let mut cfg = config();
    cfg.alternate = Some("192.0.2.11:3479".parse().unwrap());
    let mut h = harness_with(cfg);
    for (flags, want) in [
        (0u32, "192.0.2.10:3478"),
        (0x2, "192.0.2.10:3479"),
        (0x4, "192.0.2.11:3478"),
        (0x6, "192.0.2.11:3479"),
    ] {
        let req = h.request(Method::Binding, None, |b| {
            b.add_u32(AttrType::ChangeRequest, flags);
        });
        h.send(client(4003), &req);
        let t = h.server.poll_transmit().unwrap();
        assert_eq!(t.from, peer(want), "flags {flags:#x}");
        let m = Message::decode(&t.bytes).unwrap();
        assert_eq!(
            decode_address(m.attr(AttrType::OtherAddress).unwrap()).unwrap(),
            peer("192.0.2.11:3479")
        );
        assert_eq!(
            decode_address(m.attr(AttrType::ResponseOrigin).unwrap()).unwrap(),
            peer(want)
        );
    }
}

#[test]
fn allocate_challenge_then_success() {
    let mut h = harness();
    let (_, relay) = h.allocate(client(5000), "alice", "wonderland");
    assert_eq!(relay.ip(), "192.0.2.10".parse::<IpAddr>().unwrap());
    assert!(relay.port() >= 49152);
    assert_eq!(h.server.allocation_count(), 1);
}

#[test]
fn unauthenticated_requests_keep_no_state_and_get_small_answers() {
    let mut h = harness();
    for port in 1..=2000u16 {
        let req = h.request(Method::Allocate, None, |b| {
            b.add_attr(AttrType::RequestedTransport, &[17, 0, 0, 0]);
            b.add_u32(AttrType::Lifetime, 600);
        });
        h.send(client(port), &req);
        let resp = h.response();
        // REALM, a 29-byte NONCE, PASSWORD-ALGORITHMS, FINGERPRINT, no reason phrase.
        assert!(resp.len() <= 96, "challenge is {} bytes", resp.len());
    }
    assert_eq!(h.server.allocation_count(), 0);
    assert!(
        h.server.pending.is_empty() && h.server.by_client.is_empty() && h.server.timers.is_empty()
    );
    assert_eq!(
        h.server.metrics.auth_failures(AuthFailure::Challenged),
        2000
    );
}

#[test]
fn sha256_password_algorithm_and_integrity() {
    let mut h = harness();
    let mut creds = h.challenge(client(5001), "bob", "builder");
    creds.alg = Some(PasswordAlgorithm::Sha256);
    let resp = h.allocate_with(client(5001), &creds, |_| {});
    let m = Message::decode(&resp).unwrap();
    assert_eq!(m.class(), Class::Success);
    assert_eq!(
        m.verify_integrity(&creds.key()).unwrap(),
        Some(IntegrityKind::Sha256)
    );
}

#[test]
fn password_algorithms_bid_down_is_refused() {
    let mut h = harness();
    let creds = h.challenge(client(5002), "bob", "builder");
    // PASSWORD-ALGORITHM without the list we offered: a man in the middle
    // stripped SHA-256. RFC 8489 §9.2.4 says 400.
    let tid = h.tid();
    let mut buf = Vec::new();
    let mut b = MessageBuilder::new(&mut buf, Class::Request, Method::Allocate, tid);
    b.add_attr(AttrType::RequestedTransport, &[17, 0, 0, 0]);
    b.add_attr(AttrType::Username, b"bob");
    b.add_attr(AttrType::Realm, REALM.as_bytes());
    b.add_attr(AttrType::Nonce, creds.nonce.as_bytes());
    b.add_with(AttrType::PasswordAlgorithm as u16, 4, |o| {
        o.extend_from_slice(&[0, 1, 0, 0])
    });
    b.add_with(AttrType::PasswordAlgorithms as u16, 4, |o| {
        o.extend_from_slice(&[0, 1, 0, 0])
    });
    b.add_integrity(IntegrityKind::Sha1, &creds.key());
    h.send(client(5002), &buf);
    let resp = h.response();
    assert_eq!(error_code(&Message::decode(&resp).unwrap()), Some(400));
    assert_eq!(h.server.allocation_count(), 0);
}

#[test]
fn userhash_authenticates_static_users() {
    let mut h = harness();
    let mut creds = h.challenge(client(5003), "alice", "wonderland");
    creds.userhash = true;
    creds.alg = Some(PasswordAlgorithm::Sha256);
    let resp = h.allocate_with(client(5003), &creds, |_| {});
    assert_eq!(Message::decode(&resp).unwrap().class(), Class::Success);
}

#[test]
fn wrong_password_is_challenged_again() {
    let mut h = harness();
    let mut creds = h.challenge(client(5004), "alice", "wonderland");
    creds.pass = "nope".into();
    let resp = h.allocate_with(client(5004), &creds, |_| {});
    let m = Message::decode(&resp).unwrap();
    assert_eq!(error_code(&m), Some(401));
    assert!(m.has(AttrType::Nonce));
    assert_eq!(h.server.metrics.auth_failures(AuthFailure::BadIntegrity), 1);
}

#[test]
fn nonce_goes_stale_with_time_and_from_another_address_not_another_port() {
    let mut h = harness();
    let (creds, _) = h.allocate(client(5005), "alice", "wonderland");
    h.advance(Duration::from_secs(601));
    let code = h.simple(client(5005), Method::Refresh, &creds, |_| {});
    assert_eq!(code, Some(438));
    // The same nonce presented from another address is not ours to
    // honour; from another port of the same client (an RFC 6062 data
    // connection, a second socket) it is.
    let fresh = h.challenge(client(5006), "alice", "wonderland");
    let mut elsewhere = client(5007);
    elsewhere.remote = SocketAddr::from(([198, 51, 100, 2], 5007));
    let resp = h.allocate_with(elsewhere, &fresh, |_| {});
    assert_eq!(error_code(&Message::decode(&resp).unwrap()), Some(438));
    let resp = h.allocate_with(client(5007), &fresh, |_| {});
    assert_eq!(error_code(&Message::decode(&resp).unwrap()), None);
}

#[test]
fn rest_credentials_work_and_expire_on_refresh() {
    let mut h = harness();
    let user = format!("{}:carol", 1_700_000_000 + 100);
    let pass = auth::rest_password(SECRET, &user);
    let (mut creds, _) = h.allocate(client(5008), &user, &pass);
    assert_eq!(
        h.simple(client(5008), Method::Refresh, &creds, |_| {}),
        None
    );
    h.advance(Duration::from_secs(101));
    // The nonce is still fresh, but the credential is not.
    let code = h.simple(client(5008), Method::Refresh, &creds, |_| {});
    assert_eq!(code, Some(401));
    creds.user = format!("{}:carol", 1_700_000_000 - 1);
    assert_eq!(
        h.server
            .metrics
            .auth_failures(AuthFailure::ExpiredCredential),
        1
    );
}

#[test]
fn rotated_rest_secrets_are_all_accepted() {
    let mut cfg = config();
    cfg.rest_secrets = vec!["new".into(), "old".into()];
    let mut h = harness_with(cfg);
    let user = format!("{}:dave", 1_700_000_000 + 3600);
    let (_, _) = h.allocate(client(5009), &user, &auth::rest_password("old", &user));
    let (_, _) = h.allocate(client(5010), &user, &auth::rest_password("new", &user));
    assert_eq!(h.server.allocation_count(), 2);
}

#[test]
fn refresh_zero_deletes_and_releases_the_relay() {
    let mut h = harness();
    let (creds, _) = h.allocate(client(5011), "alice", "wonderland");
    assert_eq!(
        h.simple(client(5011), Method::Refresh, &creds, |b| {
            b.add_u32(AttrType::Lifetime, 0);
        }),
        None
    );
    assert_eq!(h.server.allocation_count(), 0);
    // The Refresh already drained events through bind_all; delete emitted a release.
    assert_eq!(
        h.simple(client(5011), Method::Refresh, &creds, |_| {}),
        Some(437)
    );
}

#[test]
fn allocation_expires_on_timeout() {
    let mut h = harness();
    h.allocate(client(5012), "alice", "wonderland");
    assert_eq!(
        h.server.poll_timeout(),
        Some(h.now + Duration::from_secs(600))
    );
    // An early call does nothing.
    h.advance(Duration::from_secs(599));
    assert_eq!(h.server.allocation_count(), 1);
    h.advance(Duration::from_secs(1));
    assert_eq!(h.server.allocation_count(), 0);
    assert!(matches!(
        h.server.poll_event(),
        Some(Event::ReleaseRelay { .. })
    ));
}

#[test]
fn lifetime_is_clamped() {
    let mut h = harness();
    let creds = h.challenge(client(5013), "alice", "wonderland");
    let resp = h.allocate_with(client(5013), &creds, |b| {
        b.add_u32(AttrType::Lifetime, 1_000_000);
    });
    let m = Message::decode(&resp).unwrap();
    assert_eq!(m.u32_attr(AttrType::Lifetime).unwrap(), Some(3600));
}

#[test]
fn permission_gates_both_directions_and_expires() {
    let mut h = harness();
    let c = client(5014);
    let (creds, relay) = h.allocate(c, "alice", "wonderland");
    let p = peer("203.0.114.7:9000");
    let relay_id = h.server.slots[h.server.by_client[&c]]
        .as_ref()
        .unwrap()
        .relays[0]
        .unwrap()
        .0;
    // Nothing passes before a permission.
    assert_eq!(
        h.server.handle_peer_input(relay_id, p, b"hi", h.now),
        PeerOutcome::Drop
    );
    assert_eq!(
        h.simple(c, Method::CreatePermission, &creds, |b| {
            b.add_xor_address(AttrType::XorPeerAddress, p);
        }),
        None
    );
    // Send indication goes out…
    let tid = h.tid();
    let mut send = Vec::new();
    let mut b = MessageBuilder::new(&mut send, Class::Indication, Method::Send, tid);
    b.add_xor_address(AttrType::XorPeerAddress, p);
    b.add_attr(AttrType::Data, b"payload");
    match h.send(c, &send) {
        ClientOutcome::Forward {
            relay: r,
            peer: to,
            payload,
        } => {
            assert_eq!((r, to), (relay_id, p));
            assert_eq!(&send[payload], b"payload");
        }
        other => panic!("{other:?}"),
    }
    // …and the answer comes back as a Data indication, from any port of that IP.
    let other_port = peer("203.0.114.7:9999");
    match h
        .server
        .handle_peer_input(relay_id, other_port, b"pong", h.now)
    {
        PeerOutcome::Indication { to, message } => {
            assert_eq!(to, c);
            let m = Message::decode(message).unwrap();
            assert_eq!(m.method(), Method::Data);
            assert_eq!(
                m.xor_address(AttrType::XorPeerAddress).unwrap(),
                Some(other_port)
            );
            assert_eq!(m.attr(AttrType::Data), Some(&b"pong"[..]));
        }
        other => panic!("{other:?}"),
    }
    let _ = relay;
    h.advance(Duration::from_secs(300));
    assert_eq!(
        h.server.handle_peer_input(relay_id, p, b"late", h.now),
        PeerOutcome::Drop
    );
    assert_eq!(h.send(c, &send), ClientOutcome::Handled);
}

#[test]
fn channel_bind_forwards_channel_data_and_guards_rebinding() {
    let mut h = harness();
    let c = client(5015);
    let (creds, _) = h.allocate(c, "alice", "wonderland");
    let p = peer("203.0.114.8:7000");
    let q = peer("203.0.114.9:7000");
    let bind = |b: &mut MessageBuilder<'_>, n: u16, to: SocketAddr| {
        b.add(
            AttrType::ChannelNumber as u16,
            &[(n >> 8) as u8, n as u8, 0, 0],
        );
        b.add_xor_address(AttrType::XorPeerAddress, to);
    };
    assert_eq!(
        h.simple(c, Method::ChannelBind, &creds, |b| bind(b, 0x4001, p)),
        None
    );
    let frame = [0x40, 0x01, 0x00, 0x03, 7, 8, 9, 0];
    match h.send(c, &frame) {
        ClientOutcome::Forward {
            peer: to, payload, ..
        } => {
            assert_eq!(to, p);
            assert_eq!(&frame[payload], &[7, 8, 9]);
        }
        other => panic!("{other:?}"),
    }
    let relay_id = h.server.slots[h.server.by_client[&c]]
        .as_ref()
        .unwrap()
        .relays[0]
        .unwrap()
        .0;
    assert_eq!(
        h.server.handle_peer_input(relay_id, p, b"x", h.now),
        PeerOutcome::ChannelData {
            to: c,
            channel: ChannelNumber::new(0x4001).unwrap()
        }
    );
    // Same number to another peer, or the same peer on another number: 400.
    assert_eq!(
        h.simple(c, Method::ChannelBind, &creds, |b| bind(b, 0x4001, q)),
        Some(400)
    );
    assert_eq!(
        h.simple(c, Method::ChannelBind, &creds, |b| bind(b, 0x4002, p)),
        Some(400)
    );
    // Refreshing the same binding is fine; an invalid number is not.
    assert_eq!(
        h.simple(c, Method::ChannelBind, &creds, |b| bind(b, 0x4001, p)),
        None
    );
    assert_eq!(
        h.simple(c, Method::ChannelBind, &creds, |b| bind(b, 0x3fff, q)),
        Some(400)
    );
    // After expiry the channel stops relaying but stays reserved for 5 minutes.
    h.advance(Duration::from_secs(590));
    assert_eq!(
        h.simple(c, Method::Refresh, &creds, |b| {
            b.add_u32(AttrType::Lifetime, 3600);
        }),
        None
    );
    h.advance(Duration::from_secs(10));
    // The first nonce is stale now: a 438 hands out the next one.
    let refreshed = h.refresh_nonce(c, creds.clone());
    assert_ne!(refreshed.nonce, creds.nonce);
    assert_eq!(h.send(c, &frame), ClientOutcome::Handled);
    assert_eq!(
        h.simple(c, Method::ChannelBind, &refreshed, |b| bind(b, 0x4001, q)),
        Some(400)
    );
    h.advance(Duration::from_secs(300));
    assert_eq!(
        h.simple(c, Method::ChannelBind, &refreshed, |b| bind(b, 0x4001, q)),
        None
    );
}

impl Harness {
    /// Gets a fresh nonce the way a client does after a 438.
    fn refresh_nonce(&mut self, c: ClientAddr, mut creds: Creds) -> Creds {
        let req = self.request(Method::Refresh, Some(&creds), |_| {});
        self.send(c, &req);
        let resp = self.response();
        let m = Message::decode(&resp).unwrap();
        if error_code(&m) == Some(438) {
            creds.nonce = m
                .text_attr(AttrType::Nonce, 763)
                .unwrap()
                .unwrap()
                .to_owned();
        }
        creds
    }
}

#[test]
fn loopback_and_private_peers_are_forbidden_in_every_form() {
    let mut h = harness();
    let c = client(5016);
    let (creds, _) = h.allocate(c, "alice", "wonderland");
    for p in [
        "127.0.0.1:80",
        "0.0.0.0:80",
        "10.0.0.1:80",
        "169.254.169.254:80",
        "192.0.2.10:3478",
    ] {
        let p = peer(p);
        assert_eq!(
            h.simple(c, Method::CreatePermission, &creds, |b| {
                b.add_xor_address(AttrType::XorPeerAddress, p);
            }),
            Some(403),
            "{p}"
        );
        let ch = |b: &mut MessageBuilder<'_>| {
            b.add(AttrType::ChannelNumber as u16, &[0x40, 0x10, 0, 0]);
            b.add_xor_address(AttrType::XorPeerAddress, p);
        };
        assert_eq!(
            h.simple(c, Method::ChannelBind, &creds, ch),
            Some(403),
            "{p}"
        );
    }
    // IPv6 forms go to the IPv6 relay, where they are judged the same way.
    let (creds6, _) = {
        let c6 = client(5017);
        let creds = h.challenge(c6, "alice", "wonderland");
        let resp = h.allocate_with(c6, &creds, |b| {
            b.add_with(AttrType::RequestedAddressFamily as u16, 4, |o| {
                o.extend_from_slice(&[2, 0, 0, 0])
            });
        });
        let m = Message::decode(&resp).unwrap();
        (
            creds,
            m.xor_address(AttrType::XorRelayedAddress).unwrap().unwrap(),
        )
    };
    for p in [
        "[::1]:80",
        "[::]:80",
        "[::ffff:127.0.0.1]:80",
        "[::127.0.0.1]:80",
        "[64:ff9b::7f00:1]:80",
        "[2002:7f00:1::]:80",
        "[fd00:ec2::254]:80",
    ] {
        let p = peer(p);
        assert_eq!(
            h.simple(client(5017), Method::CreatePermission, &creds6, |b| {
                b.add_xor_address(AttrType::XorPeerAddress, p);
            }),
            Some(403),
            "{p}"
        );
    }
    // A permission for a mix of allowed and denied peers installs nothing.
    let ok = peer("203.0.114.1:1");
    let code = h.simple(c, Method::CreatePermission, &creds, |b| {
        b.add_xor_address(AttrType::XorPeerAddress, ok);
        b.add_xor_address(AttrType::XorPeerAddress, peer("127.0.0.1:1"));
    });
    assert_eq!(code, Some(403));
    assert!(h.server.slots[h.server.by_client[&c]]
        .as_ref()
        .unwrap()
        .permissions
        .is_empty());
}

#[test]
fn peer_family_must_match_the_relay() {
    let mut h = harness();
    let c = client(5018);
    let (creds, _) = h.allocate(c, "alice", "wonderland");
    let code = h.simple(c, Method::CreatePermission, &creds, |b| {
        b.add_xor_address(AttrType::XorPeerAddress, peer("[2606:4700::1111]:1"));
    });
    assert_eq!(code, Some(443));
}

#[test]
fn dual_allocation_gives_two_relayed_addresses() {
    let mut h = harness();
    let c = client(5019);
    let creds = h.challenge(c, "alice", "wonderland");
    let resp = h.allocate_with(c, &creds, |b| {
        b.add_with(AttrType::AdditionalAddressFamily as u16, 4, |o| {
            o.extend_from_slice(&[2, 0, 0, 0])
        });
    });
    let m = Message::decode(&resp).unwrap();
    let relays: Vec<_> = m
        .xor_addresses(AttrType::XorRelayedAddress)
        .map(Result::unwrap)
        .collect();
    assert_eq!(relays.len(), 2);
    assert!(relays[0].is_ipv4() && relays[1].is_ipv6());
}

#[test]
fn dual_allocation_without_ipv6_reports_address_error() {
    let mut cfg = config();
    cfg.relay_ipv6 = None;
    let mut h = harness_with(cfg);
    let c = client(5020);
    let creds = h.challenge(c, "alice", "wonderland");
    let resp = h.allocate_with(c, &creds, |b| {
        b.add_with(AttrType::AdditionalAddressFamily as u16, 4, |o| {
            o.extend_from_slice(&[2, 0, 0, 0])
        });
    });
    let m = Message::decode(&resp).unwrap();
    assert_eq!(m.class(), Class::Success);
    assert_eq!(m.attr(AttrType::AddressErrorCode), Some(&[2, 0, 4, 40][..]));
}

#[test]
fn quotas_per_user_per_ip_and_total() {
    let mut cfg = config();
    cfg.max_allocations_per_user = 2;
    cfg.max_allocations_per_ip = 3;
    cfg.max_allocations = 4;
    let mut h = harness_with(cfg);
    h.allocate(client(6001), "alice", "wonderland");
    h.allocate(client(6002), "alice", "wonderland");
    let creds = h.challenge(client(6003), "alice", "wonderland");
    let resp = h.allocate_with(client(6003), &creds, |_| {});
    assert_eq!(
        error_code(&Message::decode(&resp).unwrap()),
        Some(486),
        "per user"
    );
    h.allocate(client(6004), "bob", "builder");
    let creds = h.challenge(client(6005), "bob", "builder");
    let resp = h.allocate_with(client(6005), &creds, |_| {});
    assert_eq!(
        error_code(&Message::decode(&resp).unwrap()),
        Some(486),
        "per IP"
    );
    let mut other_ip = client(6006);
    other_ip.remote.set_ip("198.51.100.2".parse().unwrap());
    h.allocate(other_ip, "bob", "builder");
    let mut third_ip = client(6007);
    third_ip.remote.set_ip("198.51.100.3".parse().unwrap());
    let user = format!("{}:erin", 1_700_000_000 + 3600);
    let creds = h.challenge(third_ip, &user, &auth::rest_password(SECRET, &user));
    let resp = h.allocate_with(third_ip, &creds, |_| {});
    assert_eq!(
        error_code(&Message::decode(&resp).unwrap()),
        Some(508),
        "total"
    );
}

#[test]
fn quota_is_released_when_allocations_go() {
    let mut cfg = config();
    cfg.max_allocations_per_user = 1;
    let mut h = harness_with(cfg);
    let (creds, _) = h.allocate(client(6010), "alice", "wonderland");
    h.simple(client(6010), Method::Refresh, &creds, |b| {
        b.add_u32(AttrType::Lifetime, 0);
    });
    h.allocate(client(6011), "alice", "wonderland");
}

#[test]
fn port_taken_by_another_process_is_retried() {
    let mut h = harness();
    let c = client(6020);
    let creds = h.challenge(c, "alice", "wonderland");
    let req = h.request(Method::Allocate, Some(&creds), |b| {
        b.add_attr(AttrType::RequestedTransport, &[17, 0, 0, 0]);
    });
    h.server.handle_client_input(c, &req, h.now);
    let Some(Event::BindRelay { relay, .. }) = h.server.poll_event() else {
        panic!("bind expected")
    };
    h.server.handle_relay_bound(relay, None, h.now);
    let Some(Event::BindRelay {
        relay: second,
        addr,
        ..
    }) = h.server.poll_event()
    else {
        panic!("retry expected")
    };
    assert_ne!(relay, second);
    h.server.handle_relay_bound(second, Some(addr), h.now);
    let resp = h.response();
    let m = Message::decode(&resp).unwrap();
    assert_eq!(
        m.xor_address(AttrType::XorRelayedAddress).unwrap(),
        Some(addr)
    );
}

#[test]
fn other_users_credentials_on_an_allocation_get_441() {
    let mut h = harness();
    let c = client(6030);
    h.allocate(c, "alice", "wonderland");
    let bob = Creds {
        user: "bob".into(),
        pass: "builder".into(),
        ..h.challenge(client(6031), "bob", "builder")
    };
    // Bob's nonce is bound to his own address; fetch one for this 5-tuple.
    let bob = h.refresh_nonce(c, bob);
    assert_eq!(h.simple(c, Method::Refresh, &bob, |_| {}), Some(441));
    // Allocating again on that 5-tuple is a mismatch, not a credential error.
    let resp = h.allocate_with(c, &bob, |_| {});
    assert_eq!(error_code(&Message::decode(&resp).unwrap()), Some(437));
}

#[test]
fn retransmitted_allocate_gets_the_same_success_and_a_new_one_437() {
    let mut h = harness();
    let c = client(6040);
    let creds = h.challenge(c, "alice", "wonderland");
    let req = h.request(Method::Allocate, Some(&creds), |b| {
        b.add_attr(AttrType::RequestedTransport, &[17, 0, 0, 0]);
    });
    h.send(c, &req);
    let first = h.response();
    h.send(c, &req);
    let again = h.response();
    let (a, b) = (
        Message::decode(&first).unwrap(),
        Message::decode(&again).unwrap(),
    );
    assert_eq!(
        a.xor_address(AttrType::XorRelayedAddress).unwrap(),
        b.xor_address(AttrType::XorRelayedAddress).unwrap()
    );
    let resp = h.allocate_with(c, &creds, |_| {});
    assert_eq!(error_code(&Message::decode(&resp).unwrap()), Some(437));
}

#[test]
fn unsupported_transport_and_unknown_attributes() {
    let mut h = harness();
    let c = client(6050);
    let creds = h.challenge(c, "alice", "wonderland");
    let req = h.request(Method::Allocate, Some(&creds), |b| {
        b.add_attr(AttrType::RequestedTransport, &[132, 0, 0, 0]);
    });
    h.send(c, &req);
    assert_eq!(
        error_code(&Message::decode(&h.response()).unwrap()),
        Some(442)
    );
    let req = h.request(Method::Allocate, Some(&creds), |b| {
        b.add_attr(AttrType::RequestedTransport, &[17, 0, 0, 0]);
        b.add(0x7777, b"??");
    });
    h.send(c, &req);
    let resp = h.response();
    let m = Message::decode(&resp).unwrap();
    assert_eq!(error_code(&m), Some(420));
    assert_eq!(m.attr(AttrType::UnknownAttributes), Some(&[0x77, 0x77][..]));
}

#[test]
fn bandwidth_quota_drops_excess() {
    let mut cfg = config();
    cfg.max_bytes_per_sec = 1000;
    let mut h = harness_with(cfg);
    let c = client(6060);
    let (creds, _) = h.allocate(c, "alice", "wonderland");
    let p = peer("203.0.114.8:7000");
    h.simple(c, Method::ChannelBind, &creds, |b| {
        b.add(AttrType::ChannelNumber as u16, &[0x40, 0x00, 0, 0]);
        b.add_xor_address(AttrType::XorPeerAddress, p);
    });
    let mut frame = vec![0x40, 0x00, 0x01, 0x90];
    frame.extend_from_slice(&[0; 400]);
    let sent = (0..10)
        .filter(|_| matches!(h.send(c, &frame), ClientOutcome::Forward { .. }))
        .count();
    assert_eq!(sent, 2, "1000 B/s admits two 400-byte packets");
    h.advance(Duration::from_secs(1));
    assert!(matches!(h.send(c, &frame), ClientOutcome::Forward { .. }));
}

#[test]
fn malformed_requests_get_400_and_count() {
    let mut h = harness();
    // A readable header whose attribute overruns the message.
    let mut raw = vec![0x00, 0x03, 0x00, 0x04, 0x21, 0x12, 0xa4, 0x42];
    raw.extend_from_slice(&[1; 12]);
    raw.extend_from_slice(&[0x00, 0x19, 0x00, 0x08]);
    h.send(client(6070), &raw);
    let resp = h.response();
    assert_eq!(error_code(&Message::decode(&resp).unwrap()), Some(400));
    assert_eq!(
        h.server
            .metrics
            .malformed
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn tcp_close_deletes_the_allocation() {
    let mut h = harness();
    let mut c = client(6080);
    c.transport = Transport::Tcp;
    h.allocate(c, "alice", "wonderland");
    h.server.handle_client_closed(c);
    assert_eq!(h.server.allocation_count(), 0);
    assert!(matches!(
        h.server.poll_event(),
        Some(Event::ReleaseRelay { .. })
    ));
}

proptest! {
    #[test]
    fn random_input_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200), first in 0u8..=0x7f) {
        let mut h = harness();
        let mut b = bytes.clone();
        if !b.is_empty() { b[0] = first; }
        let _ = h.server.handle_client_input(client(7000), &b, h.now);
        while h.server.poll_transmit().is_some() {}
        let _ = h.server.handle_peer_input(RelayId(1), peer("203.0.114.1:1"), &b, h.now);
    }
}

mod tcp_allocations {
    use super::*;

    fn tcp_client(port: u16) -> ClientAddr {
        ClientAddr {
            transport: Transport::Tcp,
            ..client(port)
        }
    }

    fn tcp_allocate(h: &mut Harness, c: ClientAddr) -> (Creds, RelayId) {
        let creds = h.challenge(c, "alice", "wonderland");
        let req = h.request(Method::Allocate, Some(&creds), |b| {
            b.add_attr(AttrType::RequestedTransport, &[6, 0, 0, 0]);
        });
        h.server.handle_client_input(c, &req, h.now);
        let Some(Event::BindRelay {
            relay,
            addr,
            tcp: true,
            ..
        }) = h.server.poll_event()
        else {
            panic!("a TCP relay listener is requested")
        };
        h.server.handle_relay_bound(relay, Some(addr), h.now);
        let resp = h.response();
        assert_eq!(Message::decode(&resp).unwrap().class(), Class::Success);
        (creds, relay)
    }

    fn connect(h: &mut Harness, c: ClientAddr, creds: &Creds, peer: SocketAddr) -> Vec<u8> {
        let req = h.request(Method::Connect, Some(creds), |b| {
            b.add_xor_address(AttrType::XorPeerAddress, peer);
        });
        h.server.handle_client_input(c, &req, h.now);
        req
    }

    fn connection_id(resp: &[u8]) -> u32 {
        Message::decode(resp)
            .unwrap()
            .u32_attr(AttrType::ConnectionId)
            .unwrap()
            .unwrap()
    }

    fn bind(h: &mut Harness, data: ClientAddr, creds: &Creds, id: u32) -> Option<u16> {
        let req = h.request(Method::ConnectionBind, Some(creds), |b| {
            b.add_u32(AttrType::ConnectionId, id);
        });
        h.server.handle_client_input(data, &req, h.now);
        let resp = h.response();
        error_code(&Message::decode(&resp).unwrap())
    }

    #[test]
    fn tcp_allocation_over_udp_is_a_bad_request() {
        let mut h = harness();
        let c2 = client(8002);
        let creds = h.challenge(c2, "alice", "wonderland");
        let req = h.request(Method::Allocate, Some(&creds), |b| {
            b.add_attr(AttrType::RequestedTransport, &[6, 0, 0, 0]);
        });
        h.send(c2, &req);
        assert_eq!(
            error_code(&Message::decode(&h.response()).unwrap()),
            Some(400)
        );
    }

    #[test]
    fn connect_then_connection_bind_splices() {
        let mut h = harness();
        let c = tcp_client(8010);
        let (creds, _) = tcp_allocate(&mut h, c);
        let peer = peer("203.0.114.20:80");
        connect(&mut h, c, &creds, peer);
        let Some(Event::ConnectPeer {
            conn,
            from,
            peer: to,
        }) = h.server.poll_event()
        else {
            panic!("connect expected")
        };
        assert_eq!(to, peer);
        assert_eq!(from.ip(), "192.0.2.10".parse::<IpAddr>().unwrap());
        h.server.handle_peer_connected(conn, true, h.now);
        let resp = h.response();
        let id = connection_id(&resp);
        assert_eq!(id, conn.0);
        // A second Connect to the same peer: 446.
        connect(&mut h, c, &creds, peer);
        assert_eq!(
            error_code(&Message::decode(&h.response()).unwrap()),
            Some(446)
        );
        // The data connection binds it; binding twice fails.
        let data = tcp_client(8011);
        let data_creds = h.challenge(data, "alice", "wonderland");
        assert_eq!(bind(&mut h, data, &data_creds, id), None);
        assert_eq!(
            h.server.poll_event(),
            Some(Event::Splice { conn, client: data })
        );
        let data2 = tcp_client(8012);
        let creds2 = h.challenge(data2, "alice", "wonderland");
        assert_eq!(bind(&mut h, data2, &creds2, id), Some(400));
        // Bound connections outlive the 30 s window, and close with the allocation.
        h.advance(Duration::from_secs(31));
        assert_eq!(h.server.poll_event(), None);
        h.server.handle_client_closed(c);
        let events: Vec<_> = std::iter::from_fn(|| h.server.poll_event()).collect();
        assert!(events.contains(&Event::ClosePeer { conn }), "{events:?}");
    }

    #[test]
    fn connect_failure_is_447_and_policy_is_403() {
        let mut h = harness();
        let c = tcp_client(8020);
        let (creds, _) = tcp_allocate(&mut h, c);
        connect(&mut h, c, &creds, peer("203.0.114.21:80"));
        let Some(Event::ConnectPeer { conn, .. }) = h.server.poll_event() else {
            panic!()
        };
        h.server.handle_peer_connected(conn, false, h.now);
        assert_eq!(
            error_code(&Message::decode(&h.response()).unwrap()),
            Some(447)
        );
        connect(&mut h, c, &creds, peer("127.0.0.1:80"));
        assert_eq!(
            error_code(&Message::decode(&h.response()).unwrap()),
            Some(403)
        );
        assert_eq!(h.server.poll_event(), None);
    }

    #[test]
    fn unbound_connection_closes_after_30_seconds() {
        let mut h = harness();
        let c = tcp_client(8030);
        let (creds, _) = tcp_allocate(&mut h, c);
        connect(&mut h, c, &creds, peer("203.0.114.22:80"));
        let Some(Event::ConnectPeer { conn, .. }) = h.server.poll_event() else {
            panic!()
        };
        h.server.handle_peer_connected(conn, true, h.now);
        let id = connection_id(&h.response());
        h.advance(Duration::from_secs(29));
        assert_eq!(h.server.poll_event(), None);
        h.advance(Duration::from_secs(1));
        assert_eq!(h.server.poll_event(), Some(Event::ClosePeer { conn }));
        let data = tcp_client(8031);
        let creds = h.challenge(data, "alice", "wonderland");
        assert_eq!(bind(&mut h, data, &creds, id), Some(400));
    }

    #[test]
    fn incoming_peer_needs_a_permission_and_gets_a_connection_attempt() {
        let mut h = harness();
        let c = tcp_client(8040);
        let (creds, relay) = tcp_allocate(&mut h, c);
        let p = peer("203.0.114.23:5555");
        assert_eq!(h.server.handle_peer_accepted(relay, p, h.now), None);
        assert_eq!(
            h.simple(c, Method::CreatePermission, &creds, |b| {
                b.add_xor_address(AttrType::XorPeerAddress, p);
            }),
            None
        );
        let conn = h
            .server
            .handle_peer_accepted(relay, p, h.now)
            .expect("accepted");
        let t = h.server.poll_transmit().unwrap();
        assert_eq!(t.to, c);
        let m = Message::decode(&t.bytes).unwrap();
        assert_eq!(
            (m.class(), m.method()),
            (Class::Indication, Method::ConnectionAttempt)
        );
        assert_eq!(m.xor_address(AttrType::XorPeerAddress).unwrap(), Some(p));
        assert_eq!(m.u32_attr(AttrType::ConnectionId).unwrap(), Some(conn.0));
        // Someone else's credentials cannot bind it.
        let data = tcp_client(8041);
        let bob = h.challenge(data, "bob", "builder");
        assert_eq!(bind(&mut h, data, &bob, conn.0), Some(400));
        let alice = h.challenge(data, "alice", "wonderland");
        assert_eq!(bind(&mut h, data, &alice, conn.0), None);
    }

    #[test]
    fn channels_do_not_exist_on_tcp_allocations() {
        let mut h = harness();
        let c = tcp_client(8050);
        let (creds, _) = tcp_allocate(&mut h, c);
        let code = h.simple(c, Method::ChannelBind, &creds, |b| {
            b.add(AttrType::ChannelNumber as u16, &[0x40, 0, 0, 0]);
            b.add_xor_address(AttrType::XorPeerAddress, peer("203.0.114.24:1"));
        });
        assert_eq!(code, Some(400));
    }
}
