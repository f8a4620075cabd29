//! Micro-benchmarks of the hot paths: decoding and authenticating a STUN
//! request, and the ChannelData relay decision in the core.

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use stun_turn::message::{
    AttrType, Class, IntegrityKind, Message, MessageBuilder, Method, TransactionId,
};

fn codec(c: &mut Criterion) {
    let mut buf = Vec::new();
    let mut b = MessageBuilder::new(
        &mut buf,
        Class::Request,
        Method::Refresh,
        TransactionId([1; 12]),
    );
    b.add_attr(AttrType::Username, b"1700000000:alice");
    b.add_attr(AttrType::Realm, b"parley");
    b.add_attr(
        AttrType::Nonce,
        b"obMatJos2wAAAabcdefghijklmnopqrstuvwxyz01",
    );
    b.add_u32(AttrType::Lifetime, 600);
    b.add_integrity(IntegrityKind::Sha1, &[7; 16]);
    b.add_fingerprint();
    c.bench_function("decode_request", |bench| {
        bench.iter(|| Message::decode(black_box(&buf)).unwrap().method())
    });
    c.bench_function("decode_and_verify_sha1", |bench| {
        bench.iter(|| {
            let m = Message::decode(black_box(&buf)).unwrap();
            m.check_fingerprint().unwrap();
            m.verify_integrity(&[7; 16]).unwrap()
        })
    });
    let frame = {
        let mut f = vec![0x40, 0x00, 0x00, 120];
        f.extend_from_slice(&[0xab; 120]);
        f
    };
    c.bench_function("channel_data_decode", |bench| {
        bench.iter(|| stun_turn::channel_data::decode(black_box(&frame)).unwrap())
    });
}

criterion_group!(benches, codec);

/// A server with one allocation and channel 0x4000 bound to a peer, set up
/// through the public request path the way a client would.
fn relay_with_channel() -> (
    stun_turn::core::Server,
    stun_turn::core::ClientAddr,
    stun_turn::core::RelayId,
    std::net::SocketAddr,
) {
    use stun_turn::core::{auth::long_term_key, ClientAddr, Event, Server, Shared, Transport};
    use stun_turn::message::PasswordAlgorithm;
    let now = std::time::Instant::now();
    let config = stun_turn::Config {
        udp: vec!["192.0.2.10:3478".parse().unwrap()],
        relay_ipv4: Some("192.0.2.10".parse().unwrap()),
        users: vec![("alice".into(), "pw".into())],
        max_bytes_per_sec: 0,
        ..stun_turn::Config::default()
    };
    let shared = Shared::new(config, [3; 32], vec![], now, 1_700_000_000);
    let mut server = Server::new(
        shared,
        std::sync::Arc::new(stun_turn::metrics::Metrics::default()),
        0,
        1,
        1,
    );
    let client = ClientAddr {
        transport: Transport::Udp,
        remote: "198.51.100.1:5000".parse().unwrap(),
        local: "192.0.2.10:3478".parse().unwrap(),
    };
    let peer: std::net::SocketAddr = "203.0.114.9:7000".parse().unwrap();
    let key = long_term_key(PasswordAlgorithm::Md5, "alice", "parley", "pw");
    let request = |server: &mut Server,
                   method: Method,
                   nonce: &str,
                   tid: u8,
                   attrs: &dyn Fn(&mut MessageBuilder<'_>)|
     -> Vec<u8> {
        let mut buf = Vec::new();
        let mut b = MessageBuilder::new(&mut buf, Class::Request, method, TransactionId([tid; 12]));
        attrs(&mut b);
        if !nonce.is_empty() {
            b.add_attr(AttrType::Username, b"alice");
            b.add_attr(AttrType::Realm, b"parley");
            b.add_attr(AttrType::Nonce, nonce.as_bytes());
            b.add_integrity(IntegrityKind::Sha1, &key);
        }
        server.handle_client_input(client, &buf, now);
        while let Some(ev) = server.poll_event() {
            if let Event::BindRelay { relay, addr, .. } = ev {
                server.handle_relay_bound(relay, Some(addr), now);
            }
        }
        server.poll_transmit().expect("a response").bytes
    };
    let transport = |b: &mut MessageBuilder<'_>| {
        b.add_attr(AttrType::RequestedTransport, &[17, 0, 0, 0]);
    };
    let challenge = request(&mut server, Method::Allocate, "", 1, &transport);
    let nonce = Message::decode(&challenge)
        .unwrap()
        .text_attr(AttrType::Nonce, 763)
        .unwrap()
        .unwrap()
        .to_owned();
    request(&mut server, Method::Allocate, &nonce, 2, &transport);
    request(&mut server, Method::ChannelBind, &nonce, 3, &|b| {
        b.add(AttrType::ChannelNumber as u16, &[0x40, 0, 0, 0]);
        b.add_xor_address(AttrType::XorPeerAddress, peer);
    });
    // Relay ids start at 1 and this is the only allocation.
    (server, client, stun_turn::core::RelayId(1), peer)
}

fn relay_path(c: &mut Criterion) {
    let (mut server, client, relay, peer) = relay_with_channel();
    let now = std::time::Instant::now();
    let mut frame = vec![0x40, 0x00, 0x00, 120];
    frame.extend_from_slice(&[0xab; 120]);
    c.bench_function("core_channel_data_to_peer", |b| {
        b.iter(
            || match server.handle_client_input(client, black_box(&frame), now) {
                stun_turn::core::ClientOutcome::Forward { payload, .. } => payload.len(),
                other => panic!("{other:?}"),
            },
        )
    });
    let payload = [0xcd; 120];
    c.bench_function("core_peer_to_channel_data", |b| {
        b.iter(
            || match server.handle_peer_input(relay, peer, black_box(&payload), now) {
                stun_turn::core::PeerOutcome::ChannelData { channel, .. } => channel.get(),
                other => panic!("{other:?}"),
            },
        )
    });
}

criterion_group!(relay, relay_path);
criterion_main!(benches, relay);
