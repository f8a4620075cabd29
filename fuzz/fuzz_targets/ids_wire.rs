//! The identity service's parsers of untrusted input: directory values
//! and transparency proofs (from the server, on clients), device lists
//! (from clients, on the server), request signature headers and handles.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wire::device_list::DirectoryValue;

fuzz_target!(|data: &[u8]| {
    proofs(data);
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

/// Lookup, history and absence proofs as a client checks them, against a
/// root this harness signs (so that the proof parsers and akd's checks run,
/// not only the signature check): the first 32 bytes are the root hash.
fn proofs(data: &[u8]) {
    use wire::transparency::{
        verify_absence, verify_history, verify_lookup, SignedRoot, TrustAnchor,
    };
    let Some((hash, proof)) = data.split_first_chunk::<32>() else {
        return;
    };
    let (anchor, root_key) = ANCHOR.get_or_init(|| {
        let pkcs8 =
            ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
                .expect("key");
        let key = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key");
        let anchor = TrustAnchor {
            vrf_public_key: [9; 32].to_vec(),
            root_key: ring::signature::KeyPair::public_key(&key).as_ref().to_vec(),
        };
        (anchor, key)
    });
    let root = SignedRoot {
        epoch: 7,
        root_hash: *hash,
        signature: root_key
            .sign(&SignedRoot::signing_bytes(7, hash))
            .as_ref()
            .to_vec(),
    };
    let uri = "mailto:alice@example.com";
    let _ = verify_lookup(anchor, &root, uri, proof);
    let _ = verify_history(anchor, &root, uri, proof);
    let (vrf, rest) = proof.split_at(proof.len().min(80));
    let _ = verify_absence(anchor, &root, uri, vrf, rest);
}

static ANCHOR: std::sync::OnceLock<(
    wire::transparency::TrustAnchor,
    ring::signature::Ed25519KeyPair,
)> = std::sync::OnceLock::new();
