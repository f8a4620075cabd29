use super::*;
use proptest::prelude::*;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

// RFC 5769 §2.1: sample request with short-term credentials.
const RFC5769_REQUEST: &str = "
    00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74
    00 24 00 04 6e 00 01 ff
    80 29 00 08 93 2f f9 b1 51 26 3b 36
    00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20
    00 08 00 14 9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2
    80 28 00 04 e5 7a 3b cf";

// RFC 5769 §2.2: IPv4 response.
const RFC5769_RESPONSE_V4: &str = "
    01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 08 00 01 a1 47 e1 12 a6 43
    00 08 00 14 2b 91 f5 99 fd 9e 90 c3 8c 74 89 f9 2a f9 ba 53 f0 6b e7 d7
    80 28 00 04 c0 7d 4c 96";

// RFC 5769 §2.3: IPv6 response.
const RFC5769_RESPONSE_V6: &str = "
    01 01 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 14 00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9
    00 08 00 14 a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75 bf e3 ed 41
    80 28 00 04 c8 fb 0b 4c";

// RFC 5769 §2.4: request with long-term credentials.
const RFC5769_LONG_TERM: &str = "
    00 01 00 60 21 12 a4 42 78 ad 34 33 c6 ad 72 c0 29 da 41 2e
    00 06 00 12 e3 83 9e e3 83 88 e3 83 aa e3 83 83 e3 82 af e3 82 b9 00 00
    00 15 00 1c 66 2f 2f 34 39 39 6b 39 35 34 64 36 4f 4c 33 34 6f 4c 39 46 53 54 76 79 36 34 73 41
    00 14 00 0b 65 78 61 6d 70 6c 65 2e 6f 72 67 00
    00 08 00 14 f6 70 24 65 6d d6 4a 3e 02 b8 e0 71 2e 85 c9 a2 8c a8 96 66";

const SHORT_TERM_PASSWORD: &[u8] = b"VOkJxbRl1RmTxUk/WvJxBt";

#[test]
fn rfc5769_request_verifies() {
    let raw = hex(RFC5769_REQUEST);
    let m = Message::decode(&raw).unwrap();
    assert_eq!(m.class(), Class::Request);
    assert_eq!(m.method(), Method::Binding);
    assert_eq!(
        m.text_attr(AttrType::Software, 128).unwrap(),
        Some("STUN test client")
    );
    assert_eq!(
        m.text_attr(AttrType::Username, 513).unwrap(),
        Some("evtj:h6vY")
    );
    assert!(m.check_fingerprint().unwrap());
    assert_eq!(
        m.verify_integrity(SHORT_TERM_PASSWORD).unwrap(),
        Some(IntegrityKind::Sha1)
    );
    assert_eq!(
        m.verify_integrity(b"wrong"),
        Err(DecodeError::IntegrityMismatch)
    );
}

#[test]
fn rfc5769_responses_verify_and_decode_addresses() {
    let v4 = hex(RFC5769_RESPONSE_V4);
    let m = Message::decode(&v4).unwrap();
    assert_eq!(m.class(), Class::Success);
    assert!(m.check_fingerprint().unwrap());
    assert_eq!(
        m.verify_integrity(SHORT_TERM_PASSWORD).unwrap(),
        Some(IntegrityKind::Sha1)
    );
    assert_eq!(
        m.xor_address(AttrType::XorMappedAddress).unwrap(),
        Some(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
            32853
        ))
    );

    let v6 = hex(RFC5769_RESPONSE_V6);
    let m = Message::decode(&v6).unwrap();
    assert!(m.check_fingerprint().unwrap());
    assert_eq!(
        m.verify_integrity(SHORT_TERM_PASSWORD).unwrap(),
        Some(IntegrityKind::Sha1)
    );
    let ip: Ipv6Addr = "2001:db8:1234:5678:11:2233:4455:6677".parse().unwrap();
    assert_eq!(
        m.xor_address(AttrType::XorMappedAddress).unwrap(),
        Some(SocketAddr::new(IpAddr::V6(ip), 32853))
    );
}

#[test]
fn rfc5769_long_term_request_verifies_with_saslprepped_password() {
    let raw = hex(RFC5769_LONG_TERM);
    let m = Message::decode(&raw).unwrap();
    let user = m.text_attr(AttrType::Username, 513).unwrap().unwrap();
    assert_eq!(user, "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}");
    let realm = m.text_attr(AttrType::Realm, 763).unwrap().unwrap();
    assert_eq!(realm, "example.org");
    // "The<U+00AD>M<U+00AA>tr<U+2168>" after SASLprep/OpaqueString is "TheMatrIX".
    let key = crate::core::auth::long_term_key(PasswordAlgorithm::Md5, user, realm, "TheMatrIX");
    assert_eq!(m.verify_integrity(&key).unwrap(), Some(IntegrityKind::Sha1));
}

#[test]
fn builder_output_matches_rfc5769_response() {
    // Rebuild the §2.2 response byte for byte (its SOFTWARE pads with a space).
    let mut buf = Vec::new();
    let tid = TransactionId(
        hex("b7 e7 a7 01 bc 34 d6 86 fa 87 df ae")
            .try_into()
            .unwrap(),
    );
    let mut b = MessageBuilder::new(&mut buf, Class::Success, Method::Binding, tid);
    b.add_with(AttrType::Software as u16, 11, |o| {
        o.extend_from_slice(b"test vector")
    });
    let n = b.len();
    // The RFC pads with 0x20; our builder pads with zeros, so patch before MACs.
    buf[n - 1] = 0x20;
    let mut b = MessageBuilder {
        buf: &mut buf,
        start: 0,
    };
    b.add_xor_address(
        AttrType::XorMappedAddress,
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 32853),
    );
    b.add_integrity(IntegrityKind::Sha1, SHORT_TERM_PASSWORD);
    b.add_fingerprint();
    assert_eq!(buf, hex(RFC5769_RESPONSE_V4));
}

#[test]
fn classic_rfc3489_header_is_recognised() {
    let mut raw = vec![0x00, 0x01, 0x00, 0x00];
    raw.extend_from_slice(&[0xAB; 16]);
    let m = Message::decode(&raw).unwrap();
    assert!(m.is_classic());
    assert_eq!(m.classic_transaction_id(), [0xAB; 16]);
}

#[test]
fn attributes_after_integrity_are_ignored() {
    let mut buf = Vec::new();
    let mut b = MessageBuilder::new(
        &mut buf,
        Class::Request,
        Method::Allocate,
        TransactionId([1; 12]),
    );
    b.add_integrity(IntegrityKind::Sha1, b"k");
    b.add_u32(AttrType::Lifetime, 5);
    let m = Message::decode(&buf).unwrap();
    assert_eq!(m.u32_attr(AttrType::Lifetime).unwrap(), None);
}

#[test]
fn sha256_integrity_round_trip_and_both_present() {
    let mut buf = Vec::new();
    let mut b = MessageBuilder::new(
        &mut buf,
        Class::Request,
        Method::Allocate,
        TransactionId([3; 12]),
    );
    b.add_u32(AttrType::Lifetime, 600);
    b.add_integrity(IntegrityKind::Sha1, b"key");
    b.add_integrity(IntegrityKind::Sha256, b"key");
    b.add_fingerprint();
    let m = Message::decode(&buf).unwrap();
    assert!(m.check_fingerprint().unwrap());
    assert_eq!(
        m.verify_integrity(b"key").unwrap(),
        Some(IntegrityKind::Sha256)
    );
    assert_eq!(m.u32_attr(AttrType::Lifetime).unwrap(), Some(600));
}

#[test]
fn malformed_headers_are_named() {
    assert_eq!(
        Message::decode(&[0; 19]).unwrap_err(),
        DecodeError::TooShort
    );
    let mut raw = vec![0u8; 20];
    raw[0] = 0x80;
    assert_eq!(Message::decode(&raw).unwrap_err(), DecodeError::NotStun);
    raw[0] = 0;
    raw[3] = 3;
    assert_eq!(Message::decode(&raw).unwrap_err(), DecodeError::BadLength);
    raw[3] = 4;
    assert_eq!(
        Message::decode(&raw).unwrap_err(),
        DecodeError::LengthMismatch
    );
    raw.extend_from_slice(&[0, 6, 0, 8]);
    assert_eq!(
        Message::decode(&raw).unwrap_err(),
        DecodeError::TruncatedAttribute
    );
}

#[test]
fn message_type_round_trips_for_all_classes_and_methods() {
    for m in 0u16..0x1000 {
        for c in [
            Class::Request,
            Class::Indication,
            Class::Success,
            Class::Error,
        ] {
            let t = message_type(c, Method::from_code(m));
            assert_eq!(split_type(t), (c, Method::from_code(m)));
        }
    }
}

fn arb_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>())
            .prop_map(|(o, p)| SocketAddr::new(IpAddr::V4(o.into()), p)),
        (any::<[u8; 16]>(), any::<u16>())
            .prop_map(|(o, p)| SocketAddr::new(IpAddr::V6(o.into()), p)),
    ]
}

proptest! {
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(m) = Message::decode(&bytes) {
            let _ = m.check_fingerprint();
            let _ = m.verify_integrity(b"k");
            let _ = m.xor_address(AttrType::XorPeerAddress);
            for a in m.attributes() { let _ = a.value.len(); }
            let _ = m.unknown_required().count();
        }
    }

    #[test]
    fn random_bodies_behind_a_valid_header_never_panic(body in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut raw = vec![0x00, 0x03];
        let len = body.len() & !3;
        raw.extend_from_slice(&(len as u16).to_be_bytes());
        raw.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        raw.extend_from_slice(&[9; 12]);
        raw.extend_from_slice(&body[..len]);
        if let Ok(m) = Message::decode(&raw) {
            let _ = m.verify_integrity(b"k");
            let _ = m.check_fingerprint();
            for a in m.xor_addresses(AttrType::XorPeerAddress) { let _ = a; }
        }
    }

    #[test]
    fn built_messages_round_trip(
        tid in any::<[u8; 12]>(),
        method in 0u16..0x1000,
        peer in arb_addr(),
        lifetime in any::<u32>(),
        user in "[a-z0-9:]{0,40}",
        data in proptest::collection::vec(any::<u8>(), 0..300),
        key in proptest::collection::vec(any::<u8>(), 1..40),
        sha256 in any::<bool>(),
    ) {
        let mut buf = Vec::new();
        let mut b = MessageBuilder::new(&mut buf, Class::Request, Method::from_code(method), TransactionId(tid));
        b.add_xor_address(AttrType::XorPeerAddress, peer);
        b.add_u32(AttrType::Lifetime, lifetime);
        b.add_attr(AttrType::Username, user.as_bytes());
        b.add_attr(AttrType::Data, &data);
        b.add_error(ErrorCode::STALE_NONCE, "Stale Nonce");
        let kind = if sha256 { IntegrityKind::Sha256 } else { IntegrityKind::Sha1 };
        b.add_integrity(kind, &key);
        b.add_fingerprint();
        let m = Message::decode(&buf).unwrap();
        prop_assert_eq!(m.transaction_id(), TransactionId(tid));
        prop_assert_eq!(m.method(), Method::from_code(method));
        prop_assert_eq!(m.xor_address(AttrType::XorPeerAddress).unwrap(), Some(peer));
        prop_assert_eq!(m.u32_attr(AttrType::Lifetime).unwrap(), Some(lifetime));
        prop_assert_eq!(m.text_attr(AttrType::Username, 513).unwrap(), Some(user.as_str()));
        prop_assert_eq!(m.attr(AttrType::Data), Some(&data[..]));
        let (code, reason) = ErrorCode::decode(m.attr(AttrType::ErrorCode).unwrap()).unwrap();
        prop_assert_eq!(code, ErrorCode::STALE_NONCE);
        prop_assert_eq!(reason, "Stale Nonce");
        prop_assert!(m.check_fingerprint().unwrap());
        prop_assert_eq!(m.verify_integrity(&key).unwrap(), Some(kind));
    }

    #[test]
    fn stream_framing_finds_message_boundaries(len in 0usize..200) {
        let mut buf = Vec::new();
        let mut b = MessageBuilder::new(&mut buf, Class::Request, Method::Send, TransactionId([0; 12]));
        b.add_attr(AttrType::Data, &vec![1u8; len]);
        let n = buf.len();
        buf.extend_from_slice(&[0x40, 0x00, 0x00, 0x03, 1, 2, 3, 0]);
        prop_assert_eq!(stream_frame_len(&buf).unwrap(), Some(n));
        prop_assert_eq!(stream_frame_len(&buf[n..]).unwrap(), Some(8));
        prop_assert_eq!(stream_frame_len(&buf[..n - 1]).unwrap(), None);
    }
}
