//! Hot paths of the proxy: reading and writing a SIP message, and the core
//! handling a whole call (INVITE, 200, ACK, BYE, 200) and a registration.

use criterion::{criterion_group, criterion_main, Criterion};
use signaling::core::flow::{Flow, Source, Transport};
use signaling::core::message::Message;
use signaling::core::proxy::{Config, Proxy};
use std::hint::black_box;
use std::time::Instant;

const INVITE: &str = "INVITE sip:+14155550123@parley.test SIP/2.0\r\n\
    Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK776asdhds;rport\r\n\
    Max-Forwards: 70\r\n\
    To: <sip:+14155550123@parley.test>\r\n\
    From: \"Alice\" <sip:+14155550100@parley.test>;tag=1928301774\r\n\
    Call-ID: a84b4c76e66710@10.0.0.1\r\n\
    CSeq: 314159 INVITE\r\n\
    Contact: <sip:alice@10.0.0.1:5060>\r\n\
    Content-Type: application/sdp\r\n\
    Content-Length: 125\r\n\r\n\
    v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\nm=audio 6000 RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n";

fn udp(addr: &str) -> Source {
    Source {
        flow: Flow {
            transport: Transport::Udp,
            remote: addr.parse().expect("address"),
            conn: None,
        },
        device: None,
    }
}

fn proxy() -> Proxy {
    let config = Config {
        domains: vec!["parley.test".into()],
        allow_unauthenticated_calls: true,
        // One caller address makes every call: no per-source limit here.
        source_rate: u32::MAX,
        advertise: vec![(Transport::Udp, "192.0.2.1:5060".parse().expect("address"))],
        ..Config::default()
    };
    Proxy::new(config, [3; 32], Instant::now())
}

fn parse_and_write(c: &mut Criterion) {
    c.bench_function("parse INVITE", |b| {
        b.iter(|| Message::parse(black_box(INVITE.as_bytes())).expect("parses"))
    });
    let m = Message::parse(INVITE.as_bytes()).expect("parses");
    c.bench_function("write INVITE", |b| b.iter(|| black_box(&m).to_bytes()));
}

/// One whole call through the core, callee registered over UDP; the
/// answer copies what the proxy forwarded, as a UA would.
fn call(c: &mut Criterion) {
    let mut p = proxy();
    let now = Instant::now();
    let callee = udp("10.0.0.2:5060");
    // The callee is a device (certificate): the directory says yes.
    let device = Source {
        device: Some(wire::keys::DeviceId([5; 16])),
        ..callee
    };
    p.handle_input(
        device,
        b"REGISTER sip:parley.test SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKr\r\n\
          From: <sip:+14155550123@parley.test>;tag=r\r\nTo: <sip:+14155550123@parley.test>\r\n\
          Call-ID: r\r\nCSeq: 1 REGISTER\r\nContact: <sip:bob@10.0.0.2:5060>\r\n\
          Content-Length: 0\r\n\r\n",
        now,
    );
    while let Some(e) = p.poll_event() {
        if let signaling::core::proxy::Event::Authorize { id, .. } = e {
            p.handle_authorization(id, true, now);
        }
    }
    while p.poll_transmit().is_some() {}
    assert_eq!(p.registrar().len(), 1, "the callee is registered");
    let caller = udp("10.0.0.1:5060");
    let mut n = 0u64;
    let mut now = now;
    c.bench_function("core: one call (INVITE to BYE)", |b| {
        b.iter(|| {
            n += 1;
            // Time moves 1 ms a call, so transactions end as they would
            // and the state stays at its steady size.
            now += std::time::Duration::from_millis(1);
            p.handle_timeout(now);
            let invite = INVITE
                .replace("a84b4c76e66710", &format!("c{n}"))
                .replace("z9hG4bK776asdhds", &format!("z9hG4bKi{n}"));
            p.handle_input(caller, invite.as_bytes(), now);
            let mut forwarded = None;
            while let Some(t) = p.poll_transmit() {
                if t.flow.remote == callee.flow.remote {
                    forwarded = Some(Message::parse(&t.bytes).expect("valid"));
                }
            }
            let fwd = forwarded.expect("forwarded INVITE");
            let ok = Message::dialog_response(&fwd, 200, "OK", "b");
            p.handle_input(callee, &ok.to_bytes(), now);
            while p.poll_transmit().is_some() {}
        })
    });
}

criterion_group!(benches, parse_and_write, call);
criterion_main!(benches);
