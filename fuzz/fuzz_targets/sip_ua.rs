//! The SDK's SIP user agent reading whatever the stream from the proxy
//! carries, in a call and out of one: it must never panic, and whatever
//! it sends must be a message our parser reads.
#![no_main]

use client_sdk::sip::{UaConfig, UserAgent};
use libfuzzer_sys::fuzz_target;
use std::time::{Duration, Instant};
use wire::sip::message::{frame, Frame, Message};

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let cfg = UaConfig::new(
        "+14155550123",
        "parley.test",
        "192.0.2.1:5061".parse().unwrap(),
        "urn:uuid:fuzz",
    );
    let mut ua = UserAgent::new(cfg, 7);
    ua.register(now);
    let call = ua
        .invite(now, "alice@example.com", "v=0", Some("id"))
        .unwrap();
    // The input in pieces, as a stream delivers it.
    for (i, chunk) in data.chunks(97).enumerate() {
        let t = now + Duration::from_millis(i as u64 * 10);
        if ua.handle_input(t, chunk).is_err() {
            break;
        }
        ua.handle_timeout(t);
    }
    let _ = ua.hangup(now + Duration::from_secs(1), &call);
    ua.handle_timeout(now + Duration::from_secs(60));
    while let Some(out) = ua.poll_transmit() {
        if out == b"\r\n" {
            continue; // the pong to a CRLF ping (RFC 5626)
        }
        match frame(&out) {
            Ok(Some(Frame::Message(n))) => {
                assert_eq!(n, out.len());
                Message::parse(&out).expect("the user agent writes what it can read");
            }
            Ok(Some(Frame::Keepalive { .. })) => {}
            other => panic!("unframeable output {other:?}"),
        }
    }
    while ua.poll_event().is_some() {}
});
