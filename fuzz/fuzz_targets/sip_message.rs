//! SIP messages as they arrive: framing a stream, parsing a message, and
//! every header reader the proxy uses on what it parsed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use signaling::core::digest::{same_resource, Credentials, NonceCounts};
use signaling::core::flow::FlowTokens;
use signaling::core::message::{frame, Frame, Framer, HeaderName, Message};
use signaling::core::uri::{NameAddr, Uri};
use signaling::core::via::Via;

fuzz_target!(|data: &[u8]| {
    // Framing consumes what it says, never more than there is.
    let mut rest = data;
    while let Ok(Some(f)) = frame(rest) {
        let n = match f {
            Frame::Keepalive { n, .. } | Frame::Message(n) => n,
        };
        assert!(n > 0 && n <= rest.len());
        rest = &rest[n..];
    }
    // The incremental framer, fed the same bytes in pieces of 7, cuts
    // them where `frame` does.
    let mut whole = Vec::new();
    let mut rest = data;
    while let Ok(Some(f)) = frame(rest) {
        let n = match f {
            Frame::Keepalive { n, .. } | Frame::Message(n) => n,
        };
        whole.push(f);
        rest = &rest[n..];
    }
    let mut pieces = Vec::new();
    let (mut framer, mut buf, mut fed) = (Framer::default(), Vec::new(), 0);
    'feed: while fed < data.len() {
        let n = 7.min(data.len() - fed);
        buf.extend_from_slice(&data[fed..fed + n]);
        fed += n;
        loop {
            match framer.next(&buf) {
                Ok(Some(f)) => {
                    let n = match f {
                        Frame::Keepalive { n, .. } | Frame::Message(n) => n,
                    };
                    pieces.push(f);
                    buf.drain(..n);
                }
                Ok(None) => break,
                Err(_) => break 'feed,
            }
        }
    }
    assert_eq!(&pieces[..], &whole[..pieces.len().min(whole.len())]);
    if let Ok(m) = Message::parse(data) {
        // What we write reads back and writes the same again.
        let again = Message::parse(&m.to_bytes()).expect("our own output parses");
        assert_eq!(again.to_bytes(), m.to_bytes());
        for v in m.values(&HeaderName::VIA) {
            if let Some(via) = Via::parse(v) {
                let _ = via.response_addr();
                assert!(Via::parse(&via.to_string()).is_some());
            }
        }
        for name in [
            HeaderName::FROM,
            HeaderName::TO,
            HeaderName::CONTACT,
            HeaderName::ROUTE,
            HeaderName::RECORD_ROUTE,
        ] {
            for v in m.values(&name) {
                if let Ok(na) = NameAddr::parse(v) {
                    let _ = na.uri.user_unescaped();
                    let _ = Uri::parse(&na.uri.to_string());
                }
            }
        }
        let mut counts = NonceCounts::default();
        for v in m.lines(&HeaderName::AUTHORIZATION) {
            if let Some(c) = Credentials::parse(v) {
                if let Some(u) = m.uri() {
                    let _ = same_resource(&c.uri, u);
                }
                let _ = counts.accept(&c);
            }
        }
        // Route tokens from hostile peers: only ours decode.
        let tokens = FlowTokens::new(&[3; 32]);
        for v in m.values(&HeaderName::ROUTE) {
            if let Ok(na) = NameAddr::parse(v) {
                if let Some(Some(t)) = na.uri.param("pf") {
                    assert!(tokens.decode(t, m.call_id(), 0).is_none());
                }
            }
        }
        let _ = m.cseq();
        let _ = m.tag(&HeaderName::TO);
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(u) = Uri::parse(s) {
            assert_eq!(Uri::parse(&u.to_string()), Ok(u));
        }
    }
});
