//! Group media's end-to-end encryption as a receiver meets it from the
//! network: SFrame (RFC 9605) headers and frames, and sender keys sealed
//! with HPKE (RFC 9180) in their signed messages. Headers and messages
//! that decode encode back to the same; nothing panics, and forgeries do
//! not open.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wire::hpke::RecipientKey;
use wire::sframe::{CipherSuite, Header, Key, Receiver};

fuzz_target!(|data: &[u8]| {
    if let Ok((h, n)) = Header::decode(data) {
        let mut out = Vec::new();
        h.encode(&mut out);
        assert_eq!(out, &data[..n]);
    }
    let mut rx = Receiver::default();
    for kid in [0, 7, 0x123] {
        if let Ok(k) = Key::derive(CipherSuite::Aes128GcmSha256, kid, b"fuzzing base key") {
            rx.add(k);
        }
    }
    assert!(rx.decrypt(b"", data).is_err() || data.len() >= 17);
    if let Some(me) = RecipientKey::from_scalar(&[7; 32]) {
        let (enc, ct) = data.split_at(data.len().min(wire::hpke::ENC_LEN));
        assert!(me.open(enc, b"", b"", ct).is_err());
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(m) = wire::group_key::KeyMessage::from_json(text) {
            let again = wire::group_key::KeyMessage::from_json(&m.to_json());
            assert_eq!(again.as_ref(), Ok(&m));
        }
    }
});
