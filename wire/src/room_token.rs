//! Room tokens: who may join a group call's room at the SFU. Signaling,
//! which rings the group, makes them for the room and a time; the SFU
//! checks them with the secret they share (as relays check TURN
//! credentials), so the SFU keeps no accounts and a token for one room
//! opens no other.
//!
//! A token is `base64url(expires as 8 bytes big-endian ‖ tag)` where the
//! tag is the first 16 bytes of HMAC-SHA256(secret, "parley-sfu-room\0" ‖
//! room ‖ "\0" ‖ expires).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::hmac;

const LABEL: &[u8] = b"parley-sfu-room\0";
const TAG_LEN: usize = 16;

/// Why a token does not open a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the room token is malformed")]
    Malformed,
    #[error("the room token has expired")]
    Expired,
    #[error("the room token is not for this room")]
    Forged,
}

fn tag(secret: &[u8], room: &str, expires: u64) -> hmac::Tag {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(LABEL);
    ctx.update(room.as_bytes());
    ctx.update(b"\0");
    ctx.update(&expires.to_be_bytes());
    ctx.sign()
}

/// A token for `room` valid until `expires` (Unix seconds).
pub fn make(secret: &[u8], room: &str, expires: u64) -> String {
    let mut b = expires.to_be_bytes().to_vec();
    b.extend_from_slice(&tag(secret, room, expires).as_ref()[..TAG_LEN]);
    URL_SAFE_NO_PAD.encode(b)
}

/// Checks `token` for `room` at `now` (Unix seconds).
pub fn check(secret: &[u8], room: &str, token: &str, now: u64) -> Result<(), TokenError> {
    let b = URL_SAFE_NO_PAD
        .decode(token.trim())
        .map_err(|_| TokenError::Malformed)?;
    if b.len() != 8 + TAG_LEN {
        return Err(TokenError::Malformed);
    }
    let mut e = [0u8; 8];
    e.copy_from_slice(&b[..8]);
    let expires = u64::from_be_bytes(e);
    let want = tag(secret, room, expires);
    // Compared in constant time.
    if !constant_eq(&want.as_ref()[..TAG_LEN], &b[8..]) {
        return Err(TokenError::Forged);
    }
    if expires < now {
        return Err(TokenError::Expired);
    }
    Ok(())
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A room id as callers choose them: 16 to 64 letters, digits, `-` or
/// `_` (a random one is unguessable; the SFU takes the same).
pub fn valid_room(room: &str) -> bool {
    (16..=64).contains(&room.len())
        && room
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_opens_its_room_until_it_expires_and_no_other() {
        let t = make(b"secret", "room-1", 1000);
        assert_eq!(check(b"secret", "room-1", &t, 999), Ok(()));
        assert_eq!(check(b"secret", "room-1", &t, 1000), Ok(()));
        assert_eq!(
            check(b"secret", "room-1", &t, 1001),
            Err(TokenError::Expired)
        );
        assert_eq!(check(b"secret", "room-2", &t, 999), Err(TokenError::Forged));
        assert_eq!(check(b"other", "room-1", &t, 999), Err(TokenError::Forged));
        // A later expiry cannot be written in without the secret.
        let mut b = URL_SAFE_NO_PAD.decode(&t).unwrap();
        b[7] = 0xff;
        let moved = URL_SAFE_NO_PAD.encode(b);
        assert_eq!(
            check(b"secret", "room-1", &moved, 999),
            Err(TokenError::Forged)
        );
        assert_eq!(
            check(b"secret", "room-1", "not base64!", 0),
            Err(TokenError::Malformed)
        );
    }
}
