//! Room tokens as a stranger sends them to the SFU's join API: never a
//! panic, and nothing but a token made with the secret opens the room.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    if sfu::token::check(b"fuzz secret", "room", token, 0).is_ok() {
        assert_eq!(
            token.trim(),
            sfu::token::make(b"fuzz secret", "room", {
                use base64::Engine;
                let b = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(token.trim())
                    .unwrap();
                u64::from_be_bytes(b[..8].try_into().unwrap())
            })
        );
    }
});
