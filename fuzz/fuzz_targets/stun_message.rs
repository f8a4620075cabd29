//! Decodes arbitrary bytes as a STUN message and reads every attribute the
//! server reads. Nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stun_turn::message::{AttrType, ErrorCode, Message, PasswordAlgorithm};

fuzz_target!(|data: &[u8]| {
    let Ok(m) = Message::decode(data) else { return };
    let _ = m.check_fingerprint();
    let _ = m.verify_integrity(b"fuzz-key");
    for t in [
        AttrType::XorPeerAddress,
        AttrType::XorMappedAddress,
        AttrType::XorRelayedAddress,
    ] {
        let _ = m.xor_address(t);
        for a in m.xor_addresses(t) {
            let _ = a;
        }
    }
    for t in [
        AttrType::Lifetime,
        AttrType::ChangeRequest,
        AttrType::ConnectionId,
    ] {
        let _ = m.u32_attr(t);
    }
    for t in [
        AttrType::Username,
        AttrType::Realm,
        AttrType::Nonce,
        AttrType::Software,
    ] {
        let _ = m.text_attr(t, 763);
    }
    if let Some(v) = m.attr(AttrType::ErrorCode) {
        let _ = ErrorCode::decode(v);
    }
    if let Some(v) = m.attr(AttrType::PasswordAlgorithm) {
        let _ = PasswordAlgorithm::decode(v);
    }
    for a in m.attributes() {
        let _ = stun_turn::message::attr::decode_address(a.value);
    }
    let _ = m.unknown_required().count();
});
