//! What providers send the courier: provider tokens and VAPID JWTs, VAPID
//! headers, token and id path segments, and Web Push bodies (as a device
//! opens them).
#![no_main]

use libfuzzer_sys::fuzz_target;
use push_courier::core::jwt::Jwt;
use wire::push::{DeviceToken, NotificationId};
use wire::webpush::SubscriptionKeys;

fuzz_target!(|data: &[u8]| {
    let keys = SubscriptionKeys::from_random([7u8; 48]).expect("fixed seed is a valid key");
    let _ = keys.decrypt(data);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(jwt) = Jwt::parse(text) {
        let _ = jwt.verify(&keys.public());
        let _ = jwt.str_claim("iss");
        let _ = jwt.int_claim("iat");
    }
    let _ = push_courier::webpush::parse_vapid(text, Some(text));
    if let Some(t) = DeviceToken::from_hex(text) {
        assert_eq!(DeviceToken::from_hex(&t.to_hex()), Some(t));
    }
    if let Some(t) = DeviceToken::from_b64(text) {
        assert_eq!(DeviceToken::from_b64(&t.to_b64()), Some(t));
    }
    if let Some(id) = NotificationId::from_uuid(text) {
        assert_eq!(NotificationId::from_uuid(&id.to_uuid()), Some(id));
    }
});
