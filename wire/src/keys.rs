//! P-256 ECDSA keys (device identity keys and account keys) and device ids.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{self, EcdsaKeyPair, KeyPair};

/// Length of an uncompressed SEC1 P-256 public key.
pub const PUBLIC_KEY_LEN: usize = 65;
/// Length of a fixed-size (r‖s) P-256 ECDSA signature.
pub const SIGNATURE_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("a public key must be 65 bytes of uncompressed P-256 (base64url)")]
    BadPublicKey,
    #[error("a device id is 32 hex digits")]
    BadDeviceId,
    #[error("private key is not a P-256 PKCS#8 document")]
    BadPrivateKey,
    #[error("signature does not verify")]
    BadSignature,
}

/// An uncompressed P-256 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; PUBLIC_KEY_LEN]);

/// DER prefix of a SubjectPublicKeyInfo holding an uncompressed P-256
/// point: SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING 0x00 ‖ point }.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

impl PublicKey {
    /// The key as a DER SubjectPublicKeyInfo (what certificates and
    /// `-----BEGIN PUBLIC KEY-----` files hold).
    pub fn to_spki_der(&self) -> Vec<u8> {
        let mut v = P256_SPKI_PREFIX.to_vec();
        v.extend_from_slice(&self.0);
        v
    }

    /// The key in a DER SubjectPublicKeyInfo, if it is an uncompressed
    /// P-256 point.
    pub fn from_spki_der(der: &[u8]) -> Result<PublicKey, KeyError> {
        match der.strip_prefix(&P256_SPKI_PREFIX[..]) {
            Some(point) => PublicKey::from_slice(point),
            None => Err(KeyError::BadPublicKey),
        }
    }

    pub fn from_slice(b: &[u8]) -> Result<PublicKey, KeyError> {
        let arr: [u8; PUBLIC_KEY_LEN] = b.try_into().map_err(|_| KeyError::BadPublicKey)?;
        if arr[0] != 4 {
            return Err(KeyError::BadPublicKey);
        }
        Ok(PublicKey(arr))
    }

    /// Verifies an ECDSA P-256 SHA-256 signature in fixed (r‖s) form.
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> Result<(), KeyError> {
        signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &self.0)
            .verify(msg, sig)
            .map_err(|_| KeyError::BadSignature)
    }

    /// base64url without padding.
    pub fn to_b64(&self) -> String {
        B64.encode(self.0)
    }

    pub fn from_b64(s: &str) -> Result<PublicKey, KeyError> {
        let b = B64.decode(s).map_err(|_| KeyError::BadPublicKey)?;
        PublicKey::from_slice(&b)
    }

    /// A short, stable fingerprint for display and indexing (hex of the
    /// first 8 bytes of SHA-256).
    pub fn fingerprint(&self) -> String {
        let d = ring::digest::digest(&ring::digest::SHA256, &self.0);
        hex(&d.as_ref()[..8])
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.fingerprint())
    }
}

/// A P-256 signing key with its PKCS#8 document, so it can be stored.
pub struct SigningKey {
    pair: EcdsaKeyPair,
    pkcs8: Vec<u8>,
}

impl SigningKey {
    pub fn generate() -> SigningKey {
        let rng = SystemRandom::new();
        // Generation fails only if the system RNG fails, which leaves
        // nothing sensible to do.
        let doc = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .expect("system random number generator failed");
        SigningKey::from_pkcs8(doc.as_ref()).expect("freshly generated key parses")
    }

    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<SigningKey, KeyError> {
        let pair = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8,
            &SystemRandom::new(),
        )
        .map_err(|_| KeyError::BadPrivateKey)?;
        Ok(SigningKey {
            pair,
            pkcs8: pkcs8.to_vec(),
        })
    }

    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    pub fn public(&self) -> PublicKey {
        PublicKey::from_slice(self.pair.public_key().as_ref())
            .expect("ring returns an uncompressed P-256 point")
    }

    pub fn sign(&self, msg: &[u8]) -> [u8; SIGNATURE_LEN] {
        let sig = self
            .pair
            .sign(&SystemRandom::new(), msg)
            .expect("system random number generator failed");
        sig.as_ref()
            .try_into()
            .expect("fixed P-256 signatures are 64 bytes")
    }
}

/// Two signing keys are equal when their public halves are.
impl PartialEq for SigningKey {
    fn eq(&self, other: &SigningKey) -> bool {
        self.public() == other.public()
    }
}

impl Eq for SigningKey {}

impl Clone for SigningKey {
    fn clone(&self) -> SigningKey {
        SigningKey::from_pkcs8(&self.pkcs8).expect("a key's own PKCS#8 parses")
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({:?})", self.public())
    }
}

/// A device's id: 16 random bytes, shown as 32 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(pub [u8; 16]);

impl DeviceId {
    pub fn random() -> DeviceId {
        let mut b = [0u8; 16];
        SystemRandom::new()
            .fill(&mut b)
            .expect("system random number generator failed");
        DeviceId(b)
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({self})")
    }
}

impl FromStr for DeviceId {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<DeviceId, KeyError> {
        let b = unhex(s).ok_or(KeyError::BadDeviceId)?;
        Ok(DeviceId(b.try_into().map_err(|_| KeyError::BadDeviceId)?))
    }
}

/// Compares two MACs (or digests of secrets) in time that depends only on
/// their length.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Lower-case hex. (Tokens and ids are written on every push, so this
/// avoids the formatting machinery.)
pub fn hex(b: &[u8]) -> String {
    let mut out = Vec::with_capacity(b.len() * 2);
    push_hex(&mut out, b, false);
    // Only ASCII digits and letters were pushed.
    String::from_utf8(out).unwrap_or_default()
}

/// Appends the hex digits of `b`, upper or lower case.
pub(crate) fn push_hex(out: &mut Vec<u8>, b: &[u8], upper: bool) {
    let digits = match upper {
        true => b"0123456789ABCDEF",
        false => b"0123456789abcdef",
    };
    for x in b {
        out.push(digits[usize::from(x >> 4)]);
        out.push(digits[usize::from(x & 0xf)]);
    }
}

/// The value of one hex digit, either case.
fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Hex digits (either case) to bytes; `None` for an odd length or a
/// non-digit.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    if b.len() % 2 != 0 {
        return None;
    }
    b.chunks_exact(2)
        .map(|p| Some(hex_digit(p[0])? << 4 | hex_digit(p[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn hex_round_trips_in_either_case(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let h = hex(&b);
            proptest::prop_assert!(h.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)));
            proptest::prop_assert_eq!(unhex(&h), Some(b.clone()));
            proptest::prop_assert_eq!(unhex(&h.to_ascii_uppercase()), Some(b));
        }
    }

    #[test]
    fn unhex_refuses_odd_lengths_and_non_digits() {
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("0g"), None);
        assert_eq!(unhex("+1"), None);
        assert_eq!(unhex(""), Some(vec![]));
    }

    #[test]
    fn spki_round_trip() {
        let k = SigningKey::generate().public();
        let der = k.to_spki_der();
        assert_eq!(der.len(), 91);
        assert_eq!(PublicKey::from_spki_der(&der), Ok(k));
        assert!(PublicKey::from_spki_der(&der[1..]).is_err());
        assert!(PublicKey::from_spki_der(&der[..90]).is_err());
    }

    #[test]
    fn sign_and_verify() {
        let k = SigningKey::generate();
        let sig = k.sign(b"hello");
        assert_eq!(k.public().verify(b"hello", &sig), Ok(()));
        assert_eq!(
            k.public().verify(b"hellO", &sig),
            Err(KeyError::BadSignature)
        );
        let again = SigningKey::from_pkcs8(k.pkcs8()).unwrap();
        assert_eq!(again.public(), k.public());
        assert_eq!(PublicKey::from_b64(&k.public().to_b64()), Ok(k.public()));
    }

    #[test]
    fn device_ids_round_trip() {
        let id = DeviceId::random();
        assert_eq!(id.to_string().parse::<DeviceId>(), Ok(id));
        assert!("xyz".parse::<DeviceId>().is_err());
        assert!("00".parse::<DeviceId>().is_err());
    }
}
