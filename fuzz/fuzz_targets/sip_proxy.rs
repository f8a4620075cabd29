//! The proxy core fed a sequence of messages from a few peers over UDP and
//! TCP, connection closes and timeouts, with one device registered first so
//! forking, CANCEL and in-dialog paths are reachable.
#![no_main]

use libfuzzer_sys::fuzz_target;
use signaling::core::flow::{ConnId, Flow, Source, Transport};
use signaling::core::proxy::{Config, Event, Proxy};
use std::time::{Duration, Instant};

const REGISTER: &str = "REGISTER sip:parley.test SIP/2.0\r\n\
    Via: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKreg;rport\r\n\
    From: <sip:+14155550123@parley.test>;tag=r\r\n\
    To: <sip:+14155550123@parley.test>\r\n\
    Call-ID: reg\r\n\
    CSeq: 1 REGISTER\r\n\
    Contact: <sip:dev@10.0.0.2:5060;pn-provider=parley;pn-prid=ab>;+sip.instance=\"<urn:x>\"\r\n\
    Content-Length: 0\r\n\r\n";

fn source(b: u8) -> Source {
    let transport = if b & 1 == 0 {
        Transport::Udp
    } else {
        Transport::Tcp
    };
    let port = 5060 + u16::from(b % 4);
    Source {
        flow: Flow {
            transport,
            remote: std::net::SocketAddr::from(([10, 0, 0, 1 + b % 3], port)),
            conn: (transport == Transport::Tcp).then_some(ConnId(u64::from(b % 4))),
        },
        device: (b & 2 != 0).then(wire::keys::DeviceId::random),
    }
}

fuzz_target!(|data: &[u8]| {
    let t0 = Instant::now();
    let config = Config {
        domains: vec!["parley.test".into()],
        allow_unauthenticated_calls: true,
        ..Config::default()
    };
    let mut p = Proxy::new(config, [1; 32], t0);
    p.handle_input(source(2), REGISTER.as_bytes(), t0);
    // Messages are separated by a 0xFF byte; the byte after it picks the
    // peer, and a 0xFE instead closes that peer's connection.
    for (i, chunk) in data.split(|b| *b == 0xff).enumerate() {
        let now = t0 + Duration::from_millis(i as u64 * 700);
        let Some((&who, msg)) = chunk.split_first() else {
            continue;
        };
        if who == 0xfe {
            p.handle_conn_closed(
                ConnId(u64::from(msg.first().copied().unwrap_or(0) % 4)),
                now,
            );
        } else {
            p.handle_input(source(who), msg, now);
        }
        p.handle_timeout(now);
        while p.poll_transmit().is_some() {}
        while let Some(e) = p.poll_event() {
            if let Event::Authorize { id, .. } = e {
                p.handle_authorization(id, who & 4 != 0, now);
            }
        }
    }
    // Let every timer run, in order: nothing is left ringing.
    let end = t0 + Duration::from_secs(3600);
    for _ in 0..100_000 {
        match p.poll_timeout() {
            Some(t) if t < end => p.handle_timeout(t),
            _ => break,
        }
        while p.poll_transmit().is_some() {}
    }
    assert!(p.is_idle(), "a call outlived every timer");
});
