//! SFrame (RFC 9605) as a receiver meets it from the network: any bytes,
//! as a header and as a whole frame. Headers that decode encode back to
//! the same bytes; frames never panic, and only a real one opens.
#![no_main]

use libfuzzer_sys::fuzz_target;
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
    let _ = rx.decrypt(b"", data);
});
