//! Long-term credentials (RFC 8489 §9.2): key derivation, USERHASH,
//! coturn-compatible REST ephemeral credentials, and stateless nonces.
//!
//! A nonce is `obMatJos2` + the security-feature bits (§9.2, "nonce
//! cookie") + base64url(issue time as 32-bit Unix seconds ‖ 64-bit
//! HMAC-SHA256(server key, time, client 5-tuple)): 29 bytes in all.
//! Checking one needs only the server key: nothing is stored per source
//! before a request authenticates.

use crate::message::PasswordAlgorithm;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use md5::{Digest, Md5};
use ring::digest;
use std::collections::HashMap;

use super::ClientAddr;

/// RFC 8489 §9.2 nonce cookie prefix.
pub const NONCE_COOKIE: &str = "obMatJos2";
/// Feature bits "password algorithms" and "username anonymity", base64 of
/// 0xC00000 (bit 0 and bit 1 are the most significant).
const FEATURES: &str = "wAAA";

/// The long-term key for a user (RFC 8489 §9.2.2): MD5 or SHA-256 of
/// `username ":" realm ":" password`. Usernames, realms and passwords are
/// used as given; the operator supplies them already in OpaqueString form.
pub fn long_term_key(alg: PasswordAlgorithm, user: &str, realm: &str, password: &str) -> Vec<u8> {
    let input = [
        user.as_bytes(),
        b":",
        realm.as_bytes(),
        b":",
        password.as_bytes(),
    ];
    match alg {
        PasswordAlgorithm::Md5 => {
            let mut h = Md5::new();
            for part in input {
                h.update(part);
            }
            h.finalize().to_vec()
        }
        PasswordAlgorithm::Sha256 => {
            let mut h = digest::Context::new(&digest::SHA256);
            for part in input {
                h.update(part);
            }
            h.finish().as_ref().to_vec()
        }
    }
}

/// USERHASH = SHA-256(username ":" realm) (RFC 8489 §14.4).
pub fn userhash(user: &str, realm: &str) -> [u8; 32] {
    let mut h = digest::Context::new(&digest::SHA256);
    h.update(user.as_bytes());
    h.update(b":");
    h.update(realm.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(h.finish().as_ref());
    out
}

/// The password of a REST ephemeral credential: base64(HMAC-SHA1(secret,
/// username)), as coturn's `use-auth-secret` computes it.
pub fn rest_password(secret: &str, username: &str) -> String {
    STANDARD.encode(crate::message::hmac_sha1(
        secret.as_bytes(),
        username.as_bytes(),
    ))
}

/// The expiry (Unix seconds) of a REST username `expiry[:user]`.
pub fn rest_expiry(username: &str) -> Option<u64> {
    username.split(':').next()?.parse().ok()
}

/// The user table: static users and REST secrets, replaceable at runtime.
#[derive(Clone, Default)]
pub struct Credentials {
    realm: String,
    users: HashMap<String, String>,
    by_userhash: HashMap<[u8; 32], String>,
    rest_secrets: Vec<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print passwords or secrets.
        f.debug_struct("Credentials")
            .field("realm", &self.realm)
            .field("users", &self.users.len())
            .field("rest_secrets", &self.rest_secrets.len())
            .finish()
    }
}

/// What a username resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Candidate passwords to try, in order (several while a REST secret rotates).
    Passwords(Vec<String>),
    /// A REST username whose expiry is in the past.
    Expired,
    Unknown,
}

impl Credentials {
    pub fn new(realm: &str, users: &[(String, String)], rest_secrets: &[String]) -> Self {
        let mut c = Credentials {
            realm: realm.to_owned(),
            ..Default::default()
        };
        for (u, p) in users {
            c.users.insert(u.clone(), p.clone());
            c.by_userhash.insert(userhash(u, realm), u.clone());
        }
        c.rest_secrets = rest_secrets.to_vec();
        c
    }

    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// The username behind a USERHASH (static users only: a REST username
    /// changes with every credential and cannot be found from its hash).
    pub fn user_for_hash(&self, hash: &[u8]) -> Option<&str> {
        let h: [u8; 32] = hash.try_into().ok()?;
        self.by_userhash.get(&h).map(String::as_str)
    }

    /// Passwords for `username` at Unix time `unix_now`. Static users take
    /// precedence; otherwise a REST username must not have expired.
    pub fn lookup(&self, username: &str, unix_now: u64) -> Lookup {
        if let Some(p) = self.users.get(username) {
            return Lookup::Passwords(vec![p.clone()]);
        }
        if self.rest_secrets.is_empty() {
            return Lookup::Unknown;
        }
        match rest_expiry(username) {
            None => Lookup::Unknown,
            Some(exp) if exp <= unix_now => Lookup::Expired,
            Some(_) => Lookup::Passwords(
                self.rest_secrets
                    .iter()
                    .map(|s| rest_password(s, username))
                    .collect(),
            ),
        }
    }
}

/// Issues and checks stateless nonces.
#[derive(Clone)]
pub struct NonceKey {
    key: ring::hmac::Key,
}

impl std::fmt::Debug for NonceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NonceKey(..)")
    }
}

/// Why a nonce was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceError {
    /// Well formed and ours, but older than the nonce lifetime: 438.
    Stale,
    /// Not a nonce we issued to this client: also 438 (RFC 8489 §9.2.4),
    /// counted separately.
    Invalid,
}

impl NonceKey {
    pub fn new(secret: &[u8; 32]) -> Self {
        NonceKey {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret),
        }
    }

    /// A 64-bit MAC: forging one online takes ~2^63 requests, and a nonce
    /// lives ten minutes. It binds the client's address and the server
    /// address it reached, not the client's port nor the transport: an RFC
    /// 6062 client opens a new TCP connection for every ConnectionBind and
    /// presents its allocation's nonce there (coturn accepts it, as the
    /// allocation's session nonce), then uses whatever nonce it got last on
    /// its control connection too.
    fn mac(&self, issued: u32, client: &ClientAddr) -> [u8; 8] {
        let mut ctx = ring::hmac::Context::with_key(&self.key);
        ctx.update(&issued.to_be_bytes());
        for ip in [client.remote.ip(), client.local.ip()] {
            match ip {
                std::net::IpAddr::V4(ip) => ctx.update(&ip.octets()),
                std::net::IpAddr::V6(ip) => ctx.update(&ip.octets()),
            }
        }
        ctx.update(&client.local.port().to_be_bytes());
        let tag = ctx.sign();
        let mut out = [0u8; 8];
        out.copy_from_slice(&tag.as_ref()[..8]);
        out
    }

    /// A nonce for `client` issued at `unix_now`.
    pub fn issue(&self, client: &ClientAddr, unix_now: u64) -> String {
        // Unix seconds fit 32 bits until 2106.
        let issued = unix_now as u32;
        let mut raw = [0u8; 12];
        raw[..4].copy_from_slice(&issued.to_be_bytes());
        raw[4..].copy_from_slice(&self.mac(issued, client));
        let mut s = String::with_capacity(32);
        s.push_str(NONCE_COOKIE);
        s.push_str(FEATURES);
        URL_SAFE_NO_PAD.encode_string(raw, &mut s);
        s
    }

    /// Checks a nonce presented by `client`.
    pub fn check(
        &self,
        nonce: &str,
        client: &ClientAddr,
        unix_now: u64,
        lifetime_secs: u64,
    ) -> Result<(), NonceError> {
        let rest = nonce
            .strip_prefix(NONCE_COOKIE)
            .and_then(|r| r.strip_prefix(FEATURES))
            .ok_or(NonceError::Invalid)?;
        let mut raw = [0u8; 12];
        if rest.len() != 16 || URL_SAFE_NO_PAD.decode_slice(rest, &mut raw) != Ok(12) {
            return Err(NonceError::Invalid);
        }
        let issued32 = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]);
        if !crate::message::ct_eq(&self.mac(issued32, client), &raw[4..]) {
            return Err(NonceError::Invalid);
        }
        let issued = u64::from(issued32);
        // A nonce from the future (clock stepped back) is treated as stale.
        if issued > unix_now || unix_now - issued >= lifetime_secs {
            return Err(NonceError::Stale);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Transport;

    fn client(port: u16) -> ClientAddr {
        ClientAddr {
            transport: Transport::Udp,
            remote: ([192, 0, 2, 1], port).into(),
            local: ([127, 0, 0, 1], 3478).into(),
        }
    }

    #[test]
    fn nonce_is_bound_to_client_and_time() {
        let k = NonceKey::new(&[7; 32]);
        let n = k.issue(&client(1000), 1_000_000);
        assert!(n.starts_with("obMatJos2wAAA"));
        assert_eq!(k.check(&n, &client(1000), 1_000_100, 600), Ok(()));
        // Another port of the same client (an RFC 6062 data connection)
        // may present it; another address may not.
        assert_eq!(k.check(&n, &client(1001), 1_000_100, 600), Ok(()));
        let mut elsewhere = client(1000);
        elsewhere.remote = ([192, 0, 2, 2], 1000).into();
        assert_eq!(
            k.check(&n, &elsewhere, 1_000_100, 600),
            Err(NonceError::Invalid)
        );
        let mut other_server = client(1000);
        other_server.local = ([127, 0, 0, 1], 3479).into();
        assert_eq!(
            k.check(&n, &other_server, 1_000_100, 600),
            Err(NonceError::Invalid)
        );
        assert_eq!(
            k.check(&n, &client(1000), 1_000_600, 600),
            Err(NonceError::Stale)
        );
        assert_eq!(
            k.check(&n, &client(1000), 999_999, 600),
            Err(NonceError::Stale)
        );
        let other = NonceKey::new(&[8; 32]);
        assert_eq!(
            other.check(&n, &client(1000), 1_000_100, 600),
            Err(NonceError::Invalid)
        );
        assert_eq!(
            k.check("obMatJos2wAAAgarbage", &client(1000), 1_000_100, 600),
            Err(NonceError::Invalid)
        );
    }

    #[test]
    fn rest_credentials_match_coturn_formula() {
        // base64(HMAC-SHA1("secret", "1700000000:alice")), computed independently.
        let p = rest_password("secret", "1700000000:alice");
        assert_eq!(p.len(), 28);
        let c = Credentials::new("r", &[], &["old".into(), "secret".into()]);
        match c.lookup("1700000000:alice", 1_600_000_000) {
            Lookup::Passwords(ps) => assert_eq!(ps[1], p),
            other => panic!("{other:?}"),
        }
        assert_eq!(c.lookup("1700000000:alice", 1_700_000_000), Lookup::Expired);
        assert_eq!(c.lookup("alice", 1), Lookup::Unknown);
    }

    #[test]
    fn userhash_matches_rfc8489_appendix_b() {
        // RFC 8489 Appendix B.1: USERHASH for "マトリックス" at "example.org".
        let h = userhash(
            "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}",
            "example.org",
        );
        assert_eq!(&h[..4], &[0x4a, 0x3c, 0xf3, 0x8f]);
    }
}
