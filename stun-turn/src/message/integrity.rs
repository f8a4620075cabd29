//! MESSAGE-INTEGRITY (HMAC-SHA1, RFC 8489 §14.5), MESSAGE-INTEGRITY-SHA256
//! (§14.6) and FINGERPRINT (CRC-32 XOR 0x5354554e, §14.7).
//!
//! Both are computed over the message up to the attribute, with the header
//! length rewritten as if the attribute were the last one. Received messages
//! are never copied: the adjusted header is fed to the digest separately.

use ring::hmac;

/// Which integrity attribute protects a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IntegrityKind {
    /// MESSAGE-INTEGRITY, HMAC-SHA1, 20 bytes.
    Sha1,
    /// MESSAGE-INTEGRITY-SHA256, HMAC-SHA256, 16..=32 bytes (we send 32).
    Sha256,
}

/// HMAC-SHA1 of `data` with `key`.
pub fn hmac_sha1(key: &[u8], data: &[u8]) -> [u8; 20] {
    let k = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, key);
    let tag = hmac::sign(&k, data);
    let mut out = [0u8; 20];
    out.copy_from_slice(tag.as_ref());
    out
}

/// HMAC-SHA256 of `data` with `key`.
pub fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let k = hmac::Key::new(hmac::HMAC_SHA256, key);
    let tag = hmac::sign(&k, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

/// The MAC over `raw[..offset]` where `offset` is where the integrity
/// attribute starts. Returns 32 bytes; SHA-1 uses the first 20.
pub(crate) fn mac_over(kind: IntegrityKind, key: &[u8], raw: &[u8], offset: usize) -> [u8; 32] {
    let (alg, value_len) = match kind {
        IntegrityKind::Sha1 => (hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, 20),
        IntegrityKind::Sha256 => (hmac::HMAC_SHA256, mac_value_len(raw, offset).unwrap_or(32)),
    };
    let k = hmac::Key::new(alg, key);
    let mut ctx = hmac::Context::with_key(&k);
    let len = (offset - super::HEADER_LEN + 4 + value_len) as u16;
    ctx.update(&raw[0..2]);
    ctx.update(&len.to_be_bytes());
    ctx.update(&raw[4..offset]);
    let tag = ctx.sign();
    let mut out = [0u8; 32];
    out[..tag.as_ref().len()].copy_from_slice(tag.as_ref());
    out
}

/// The value length of a MESSAGE-INTEGRITY-SHA256 attribute already present
/// at `offset` (a received message), or `None` while building.
fn mac_value_len(raw: &[u8], offset: usize) -> Option<usize> {
    let h = raw.get(offset..offset + 4)?;
    let len = u16::from_be_bytes([h[2], h[3]]) as usize;
    (raw.len() >= offset + 4 + len).then_some(len)
}

/// The FINGERPRINT value for a message whose FINGERPRINT attribute starts at `offset`.
pub(crate) fn fingerprint_over(raw: &[u8], offset: usize) -> u32 {
    let mut h = crc32fast::Hasher::new();
    let len = (offset - super::HEADER_LEN + 8) as u16;
    h.update(&raw[0..2]);
    h.update(&len.to_be_bytes());
    h.update(&raw[4..offset]);
    h.finalize() ^ 0x5354_554e
}

/// CRC-32 (IEEE) of `data`, as FINGERPRINT uses before the XOR.
pub fn fingerprint_crc(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

pub use wire::keys::ct_eq;
