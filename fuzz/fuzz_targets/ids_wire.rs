//! The identity service's parsers of untrusted input: directory values
//! (from the server, on clients), device lists (from clients, on the
//! server), request signature headers and handles.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wire::device_list::DirectoryValue;

fuzz_target!(|data: &[u8]| {
    if let Ok(DirectoryValue::Active(list)) = DirectoryValue::decode(data) {
        // Whatever decodes re-encodes to the same bytes and verifies or not
        // without panicking.
        assert_eq!(DirectoryValue::Active(list.clone()).encode(), data);
        let _ = list.verify();
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(auth) = wire::request_auth::RequestAuth::parse(text) {
            let _ = auth.verify("POST", "/v1/lookup", b"{}", auth.ts, 0);
        }
        if let Ok(h) = wire::Handle::parse(text) {
            assert_eq!(wire::Handle::parse(&h.uri()), Ok(h));
        }
        // Identity headers and SDP fingerprints as a callee reads them.
        let fps = wire::passport::sdp_fingerprints(text);
        let key = KEY.get_or_init(wire::SigningKey::generate).public();
        let _ = wire::passport::verify_identity(text, &key, &fps, 1_790_000_000, 60);
    }
});

/// One key for the whole run: no input can carry a valid signature by it,
/// so only the parsing and the checks before the signature are exercised.
static KEY: std::sync::OnceLock<wire::SigningKey> = std::sync::OnceLock::new();
