//! SFrame (RFC 9605): media frames encrypted end to end by the sending
//! device, so that a selective forwarding unit in the middle forwards what
//! it cannot read.
//!
//! A frame becomes `header ‖ AEAD(sframe_key, nonce, header ‖ metadata,
//! frame)`. The header carries the sender's key id (KID) and a counter
//! (CTR), each as a compact big-endian integer; the nonce is the key's
//! salt XOR the counter. A key and salt are derived from a `base_key`
//! with HKDF, labelled with the KID and the cipher suite, so every sender
//! has keys of its own. `metadata` is what the application authenticates
//! without encrypting (what the SFU must read to forward the frame).
//!
//! The AES-GCM suites are here (`AES_128_GCM_SHA256_128`, 0x0004, and
//! `AES_256_GCM_SHA512_128`, 0x0005). The AES-CTR + HMAC suites with short
//! tags are not.

use std::collections::HashMap;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;

/// A cipher suite (RFC 9605 §4.5, IANA "SFrame Cipher Suites").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CipherSuite {
    /// 0x0004: AES-128-GCM, HKDF-SHA256, 16-byte tag.
    Aes128GcmSha256,
    /// 0x0005: AES-256-GCM, HKDF-SHA512, 16-byte tag.
    Aes256GcmSha512,
}

impl CipherSuite {
    pub fn id(self) -> u16 {
        match self {
            CipherSuite::Aes128GcmSha256 => 0x0004,
            CipherSuite::Aes256GcmSha512 => 0x0005,
        }
    }

    fn aead(self) -> &'static ring::aead::Algorithm {
        match self {
            CipherSuite::Aes128GcmSha256 => &ring::aead::AES_128_GCM,
            CipherSuite::Aes256GcmSha512 => &ring::aead::AES_256_GCM,
        }
    }

    fn hkdf(self) -> hkdf::Algorithm {
        match self {
            CipherSuite::Aes128GcmSha256 => hkdf::HKDF_SHA256,
            CipherSuite::Aes256GcmSha512 => hkdf::HKDF_SHA512,
        }
    }

    /// What encryption adds to a frame's length, besides the header.
    pub fn overhead(self) -> usize {
        TAG_LEN
    }
}

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// Why a frame does not encrypt or decrypt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SframeError {
    #[error("SFrame header is truncated")]
    Header,
    #[error("no key for KID {0}")]
    UnknownKid(u64),
    #[error("frame does not authenticate")]
    Open,
    #[error("the sender's counter is exhausted; a new key is needed")]
    Exhausted,
    #[error("key derivation failed")]
    Derive,
}

/// The KID and CTR a frame names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kid: u64,
    pub ctr: u64,
}

/// Bytes a value takes in its minimal big-endian encoding (at least one).
fn width(v: u64) -> usize {
    (8 - (v.leading_zeros() as usize / 8)).max(1)
}

impl Header {
    /// Appends the encoded header (RFC 9605 §4.3): a config byte
    /// `X|K|Y|C`, then the KID and the CTR when they do not fit in its
    /// three bits.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let field = |v: u64| -> (u8, Option<usize>) {
            match v < 8 {
                true => (v as u8, None),
                false => (0x8 | (width(v) as u8 - 1), Some(width(v))),
            }
        };
        let (k, kid_len) = field(self.kid);
        let (c, ctr_len) = field(self.ctr);
        out.push((k << 4) | c);
        for (v, len) in [(self.kid, kid_len), (self.ctr, ctr_len)] {
            if let Some(n) = len {
                out.extend_from_slice(&v.to_be_bytes()[8 - n..]);
            }
        }
    }

    /// The header at the front of `frame`, and its length.
    pub fn decode(frame: &[u8]) -> Result<(Header, usize), SframeError> {
        let config = *frame.first().ok_or(SframeError::Header)?;
        let mut at = 1;
        let mut field = |bits: u8| -> Result<u64, SframeError> {
            if bits & 0x8 == 0 {
                return Ok(u64::from(bits & 0x7));
            }
            let n = usize::from(bits & 0x7) + 1;
            let bytes = frame.get(at..at + n).ok_or(SframeError::Header)?;
            at += n;
            Ok(bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
        };
        let kid = field(config >> 4)?;
        let ctr = field(config & 0xf)?;
        Ok((Header { kid, ctr }, at))
    }
}

/// A KID's key and salt, derived from its `base_key`.
pub struct Key {
    suite: CipherSuite,
    kid: u64,
    key: LessSafeKey,
    salt: [u8; NONCE_LEN],
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("suite", &self.suite)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

impl Key {
    /// RFC 9605 §4.4.2: `sframe_secret = HKDF-Extract("", base_key)`, then
    /// the key and the salt expanded with labels naming the KID (8 bytes)
    /// and the suite (2 bytes).
    pub fn derive(suite: CipherSuite, kid: u64, base_key: &[u8]) -> Result<Key, SframeError> {
        let secret = hkdf::Salt::new(suite.hkdf(), &[]).extract(base_key);
        let expand = |what: &[u8], out: &mut [u8]| -> Result<(), SframeError> {
            let label = [
                &b"SFrame 1.0 Secret "[..],
                what,
                &kid.to_be_bytes(),
                &suite.id().to_be_bytes(),
            ]
            .concat();
            secret
                .expand(&[&label], Len(out.len()))
                .and_then(|okm| okm.fill(out))
                .map_err(|_| SframeError::Derive)
        };
        let mut key = vec![0u8; suite.aead().key_len()];
        expand(b"key ", &mut key)?;
        let mut salt = [0u8; NONCE_LEN];
        expand(b"salt ", &mut salt)?;
        let key = UnboundKey::new(suite.aead(), &key).map_err(|_| SframeError::Derive)?;
        Ok(Key {
            suite,
            kid,
            key: LessSafeKey::new(key),
            salt,
        })
    }

    fn nonce(&self, ctr: u64) -> Nonce {
        let mut n = self.salt;
        for (b, c) in n[NONCE_LEN - 8..].iter_mut().zip(ctr.to_be_bytes()) {
            *b ^= c;
        }
        Nonce::assume_unique_for_key(n)
    }

    /// The frame encrypted under counter `ctr`, header first. Each
    /// counter must be used once per key: [`Sender`] sees to it.
    pub fn seal(&self, ctr: u64, metadata: &[u8], frame: &[u8]) -> Result<Vec<u8>, SframeError> {
        let mut out = Vec::with_capacity(17 + frame.len() + TAG_LEN);
        Header { kid: self.kid, ctr }.encode(&mut out);
        let header_len = out.len();
        let aad = [&out[..], metadata].concat();
        out.extend_from_slice(frame);
        let tag = self
            .key
            .seal_in_place_separate_tag(self.nonce(ctr), Aad::from(&aad), &mut out[header_len..])
            .map_err(|_| SframeError::Open)?;
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    /// The frame inside `sframe` (whose header names this key), if it
    /// authenticates with `metadata`.
    pub fn open(&self, metadata: &[u8], sframe: &[u8]) -> Result<Vec<u8>, SframeError> {
        let (h, header_len) = Header::decode(sframe)?;
        if h.kid != self.kid {
            return Err(SframeError::UnknownKid(h.kid));
        }
        let aad = [&sframe[..header_len], metadata].concat();
        let mut buf = sframe[header_len..].to_vec();
        let plain = self
            .key
            .open_in_place(self.nonce(h.ctr), Aad::from(&aad), &mut buf)
            .map_err(|_| SframeError::Open)?;
        Ok(plain.to_vec())
    }
}

/// A sender's key: encrypts each frame under the next counter.
#[derive(Debug)]
pub struct Sender {
    key: Key,
    next: u64,
}

impl Sender {
    pub fn new(key: Key) -> Sender {
        Sender { key, next: 0 }
    }

    pub fn kid(&self) -> u64 {
        self.key.kid
    }

    /// The next frame, encrypted. Fails only when every counter of this
    /// key was used (then a new key is needed).
    pub fn encrypt(&mut self, metadata: &[u8], frame: &[u8]) -> Result<Vec<u8>, SframeError> {
        let ctr = self.next;
        self.next = self.next.checked_add(1).ok_or(SframeError::Exhausted)?;
        self.key.seal(ctr, metadata, frame)
    }
}

/// The keys a receiver decrypts with, by KID: one per sender (and per
/// generation, as keys rotate).
#[derive(Debug, Default)]
pub struct Receiver {
    keys: HashMap<u64, Key>,
}

impl Receiver {
    pub fn add(&mut self, key: Key) {
        self.keys.insert(key.kid, key);
    }

    /// Forgets a KID: frames under it no longer decrypt (a sender that
    /// left, or a key rotated away).
    pub fn remove(&mut self, kid: u64) {
        self.keys.remove(&kid);
    }

    pub fn decrypt(&self, metadata: &[u8], sframe: &[u8]) -> Result<Vec<u8>, SframeError> {
        let (h, _) = Header::decode(sframe)?;
        self.keys
            .get(&h.kid)
            .ok_or(SframeError::UnknownKid(h.kid))?
            .open(metadata, sframe)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn unhex(s: &str) -> Vec<u8> {
        crate::keys::unhex(&s.split_whitespace().collect::<String>()).unwrap()
    }

    /// RFC 9605 Appendix C.1.
    #[test]
    fn headers_encode_as_the_rfc_shows() {
        for (kid, ctr, hex) in [
            (0u64, 0u64, "00"),
            (0, 1, "01"),
            (0, 0xff, "08ff"),
            (0, 0x100, "090100"),
            (0, 0xffff, "09ffff"),
            (0, 0x1_0000, "0a010000"),
            (0, 0xff_ffff, "0affffff"),
            (0x123, 0x4567, "9901234567"),
            (u64::MAX, 0, "f0ffffffffffffffff"),
            (u64::MAX, 1, "f1ffffffffffffffff"),
            (u64::MAX, 0xff, "f8ffffffffffffffffff"),
            (u64::MAX, 0x100, "f9ffffffffffffffff0100"),
        ] {
            let mut out = Vec::new();
            Header { kid, ctr }.encode(&mut out);
            assert_eq!(out, unhex(hex), "kid {kid:#x} ctr {ctr:#x}");
            assert_eq!(Header::decode(&out), Ok((Header { kid, ctr }, out.len())));
        }
        assert_eq!(Header::decode(&[]), Err(SframeError::Header));
        assert_eq!(Header::decode(&[0x99, 1, 2, 3]), Err(SframeError::Header));
    }

    /// RFC 9605 Appendix C.3, the AES-GCM suites.
    #[test]
    fn frames_encrypt_as_the_rfc_shows() {
        let base_key = unhex("000102030405060708090a0b0c0d0e0f");
        let metadata = unhex("4945544620534672616d65205747");
        let pt = unhex("64726166742d696574662d736672616d652d656e63");
        for (suite, ct) in [
            (
                CipherSuite::Aes128GcmSha256,
                "9901234567b7412c2513a1b66dbb48841bbaf17f598751176ad847681a69c6d0b091c07018ce4adb34eb",
            ),
            (
                CipherSuite::Aes256GcmSha512,
                "990123456794f509d36e9beacb0e261d99c7d1e972f1fed787d4049f17ca21353c1cc24d56ceabced279",
            ),
        ] {
            let key = Key::derive(suite, 0x123, &base_key).unwrap();
            let sealed = key.seal(0x4567, &metadata, &pt).unwrap();
            assert_eq!(sealed, unhex(ct), "{suite:?}");
            assert_eq!(key.open(&metadata, &sealed).unwrap(), pt);
            // Other metadata, or a flipped bit, does not authenticate.
            assert_eq!(key.open(b"other", &sealed), Err(SframeError::Open));
            let mut bad = sealed.clone();
            *bad.last_mut().unwrap() ^= 1;
            assert_eq!(key.open(&metadata, &bad), Err(SframeError::Open));
        }
    }

    /// A receiver decrypts each sender by its KID; a sender removed (it
    /// left) no longer decrypts, and no frame shares a counter.
    #[test]
    fn receivers_pick_keys_by_kid_and_forget_removed_senders() {
        let suite = CipherSuite::Aes128GcmSha256;
        let mut alice = Sender::new(Key::derive(suite, 1, b"alice's base key").unwrap());
        let mut bob = Sender::new(Key::derive(suite, 2, b"bob's base key").unwrap());
        let mut rx = Receiver::default();
        rx.add(Key::derive(suite, 1, b"alice's base key").unwrap());
        rx.add(Key::derive(suite, 2, b"bob's base key").unwrap());
        let a1 = alice.encrypt(b"", b"frame one").unwrap();
        let a2 = alice.encrypt(b"", b"frame one").unwrap();
        assert_ne!(a1, a2, "a counter is never reused");
        let b1 = bob.encrypt(b"", b"bob's frame").unwrap();
        assert_eq!(rx.decrypt(b"", &a2).unwrap(), b"frame one");
        assert_eq!(rx.decrypt(b"", &b1).unwrap(), b"bob's frame");
        rx.remove(2);
        assert_eq!(rx.decrypt(b"", &b1), Err(SframeError::UnknownKid(2)));
        // The wrong base key for a KID does not authenticate.
        let mut forged = Receiver::default();
        forged.add(Key::derive(suite, 1, b"a guess").unwrap());
        assert_eq!(forged.decrypt(b"", &a1), Err(SframeError::Open));
    }

    proptest! {
        #[test]
        fn headers_round_trip(kid in any::<u64>(), ctr in any::<u64>()) {
            let mut out = Vec::new();
            Header { kid, ctr }.encode(&mut out);
            prop_assert_eq!(out.len(), 1 + [kid, ctr].iter().filter(|v| **v >= 8).map(|v| width(*v)).sum::<usize>());
            prop_assert_eq!(Header::decode(&out), Ok((Header { kid, ctr }, out.len())));
        }

        #[test]
        fn random_bytes_never_panic(b in prop::collection::vec(any::<u8>(), 0..64)) {
            let key = Key::derive(CipherSuite::Aes128GcmSha256, 7, b"k").unwrap();
            let _ = Header::decode(&b);
            let _ = key.open(b"", &b);
        }
    }
}
