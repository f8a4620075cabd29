//! Web Push message encryption (RFC 8291 over RFC 8188 `aes128gcm`).
//!
//! The courier passes encrypted bodies through untouched; a device holds the
//! subscription's P-256 key pair and 16-byte auth secret and opens each body
//! itself with [`SubscriptionKeys::decrypt`]. [`encrypt`] is the application
//! server's side, for tools and tests.
//!
//! The key pair is long-lived (it is published with the subscription), so it
//! uses the `p256` crate: ring only offers single-use ECDH keys.

use p256::elliptic_curve::sec1::ToEncodedPoint;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
use ring::hkdf;

/// Why a body does not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebPushError {
    #[error("aes128gcm header is truncated or malformed")]
    Header,
    #[error("sender key is not an uncompressed P-256 point")]
    SenderKey,
    #[error("record does not authenticate")]
    Open,
    #[error("record padding is malformed")]
    Padding,
    #[error("only single-record bodies are used by Web Push")]
    Records,
    #[error("random number generator failed")]
    Random,
}

/// A subscription's keys, as the user agent (device) holds them.
#[derive(Clone)]
pub struct SubscriptionKeys {
    secret: p256::SecretKey,
    /// The `auth` secret shared with the application server.
    pub auth: [u8; 16],
}

impl std::fmt::Debug for SubscriptionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SubscriptionKeys(..)")
    }
}

impl SubscriptionKeys {
    /// New keys from 48 random bytes (32 for the key, 16 for auth). Returns
    /// `None` in the 2^-128 case that the bytes are not a valid scalar.
    pub fn from_random(seed: [u8; 48]) -> Option<SubscriptionKeys> {
        let secret = p256::SecretKey::from_slice(&seed[..32]).ok()?;
        let mut auth = [0u8; 16];
        auth.copy_from_slice(&seed[32..]);
        Some(SubscriptionKeys { secret, auth })
    }

    /// New keys from the system random number generator.
    pub fn generate() -> Result<SubscriptionKeys, WebPushError> {
        let rng = ring::rand::SystemRandom::new();
        loop {
            let mut seed = [0u8; 48];
            ring::rand::SecureRandom::fill(&rng, &mut seed).map_err(|_| WebPushError::Random)?;
            if let Some(k) = SubscriptionKeys::from_random(seed) {
                return Ok(k);
            }
        }
    }

    /// The `p256dh` public key, 65 bytes uncompressed.
    pub fn public(&self) -> [u8; 65] {
        point(&self.secret.public_key())
    }

    /// Opens an `aes128gcm` body addressed to these keys.
    pub fn decrypt(&self, body: &[u8]) -> Result<Vec<u8>, WebPushError> {
        if body.len() < 21 {
            return Err(WebPushError::Header);
        }
        let salt = &body[..16];
        let rs = u32::from_be_bytes([body[16], body[17], body[18], body[19]]) as usize;
        let idlen = body[20] as usize;
        if idlen != 65 || body.len() < 21 + idlen || rs < 18 {
            return Err(WebPushError::Header);
        }
        let sender = &body[21..21 + idlen];
        let records = &body[21 + idlen..];
        if records.len() > rs {
            return Err(WebPushError::Records);
        }
        let sender_key =
            p256::PublicKey::from_sec1_bytes(sender).map_err(|_| WebPushError::SenderKey)?;
        let shared =
            p256::ecdh::diffie_hellman(self.secret.to_nonzero_scalar(), sender_key.as_affine());
        let (cek, nonce) = derive(
            shared.raw_secret_bytes().as_slice(),
            &self.auth,
            &self.public(),
            sender,
            salt,
        );
        let mut buf = records.to_vec();
        let key =
            LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &cek).map_err(|_| WebPushError::Open)?);
        let plain = key
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut buf)
            .map_err(|_| WebPushError::Open)?;
        // RFC 8188 §2: data ‖ delimiter (2 = last record) ‖ zero padding.
        let end = plain
            .iter()
            .rposition(|b| *b != 0)
            .ok_or(WebPushError::Padding)?;
        if plain[end] != 2 {
            return Err(WebPushError::Padding);
        }
        Ok(plain[..end].to_vec())
    }
}

/// Encrypts `plain` for a subscription (`p256dh`, `auth`) as one
/// `aes128gcm` record, with the sender's ephemeral key and salt drawn from
/// `seed` (48 random bytes).
pub fn encrypt(
    p256dh: &[u8],
    auth: &[u8],
    plain: &[u8],
    seed: [u8; 48],
) -> Result<Vec<u8>, WebPushError> {
    let ua = p256::PublicKey::from_sec1_bytes(p256dh).map_err(|_| WebPushError::SenderKey)?;
    let eph = p256::SecretKey::from_slice(&seed[..32]).map_err(|_| WebPushError::Random)?;
    let salt = &seed[32..];
    let as_public = point(&eph.public_key());
    let shared = p256::ecdh::diffie_hellman(eph.to_nonzero_scalar(), ua.as_affine());
    let (cek, nonce) = derive(
        shared.raw_secret_bytes().as_slice(),
        auth,
        &point(&ua),
        &as_public,
        salt,
    );
    let mut rec = plain.to_vec();
    rec.push(2);
    let key =
        LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &cek).map_err(|_| WebPushError::Open)?);
    key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut rec)
        .map_err(|_| WebPushError::Open)?;
    let rs = (rec.len() as u32).max(4096);
    let mut out = Vec::with_capacity(86 + rec.len());
    out.extend_from_slice(salt);
    out.extend_from_slice(&rs.to_be_bytes());
    out.push(65);
    out.extend_from_slice(&as_public);
    out.extend_from_slice(&rec);
    Ok(out)
}

fn point(k: &p256::PublicKey) -> [u8; 65] {
    let mut out = [0u8; 65];
    out.copy_from_slice(k.to_encoded_point(false).as_bytes());
    out
}

/// RFC 8291 §3.3–3.4 and RFC 8188 §2.2–2.3: the content-encryption key and
/// the nonce of the first (only) record.
fn derive(ecdh: &[u8], auth: &[u8], ua: &[u8], sender: &[u8], salt: &[u8]) -> ([u8; 16], [u8; 12]) {
    let mut key_info = b"WebPush: info\0".to_vec();
    key_info.extend_from_slice(ua);
    key_info.extend_from_slice(sender);
    let ikm: [u8; 32] = expand(
        hkdf::Salt::new(hkdf::HKDF_SHA256, auth).extract(ecdh),
        &key_info,
    );
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(&ikm);
    let cek: [u8; 16] = expand_ref(&prk, b"Content-Encoding: aes128gcm\0");
    let nonce: [u8; 12] = expand_ref(&prk, b"Content-Encoding: nonce\0");
    (cek, nonce)
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn expand<const N: usize>(prk: hkdf::Prk, info: &[u8]) -> [u8; N] {
    expand_ref(&prk, info)
}

fn expand_ref<const N: usize>(prk: &hkdf::Prk, info: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    let info = [info];
    // N ≤ 32 is far below HKDF-SHA256's 255 × 32 limit, so neither fails.
    #[allow(clippy::expect_used)]
    prk.expand(&info, Len(N))
        .and_then(|okm| okm.fill(&mut out))
        .expect("HKDF output length within limits");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn b64(s: &str) -> Vec<u8> {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .unwrap()
    }

    /// RFC 8291 Appendix A: the worked example opens to its plaintext.
    #[test]
    fn rfc8291_appendix_a() {
        let ua_private = b64("q1dXpw3UpT5VOmu_cf_v6ih07Aems3njxI-JWgLcM94");
        let auth = b64("BTBZMqHH6r4Tts7J_aSIgg");
        let body = b64(concat!(
            "DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27ml",
            "mlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A_yl95bQpu6cVPT",
            "pK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj_Qulcy4a-fN"
        ));
        let mut seed = [0u8; 48];
        seed[..32].copy_from_slice(&ua_private);
        seed[32..].copy_from_slice(&auth);
        let keys = SubscriptionKeys::from_random(seed).unwrap();
        assert_eq!(
            keys.public().to_vec(),
            b64("BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4")
        );
        assert_eq!(
            keys.decrypt(&body).unwrap(),
            b"When I grow up, I want to be a watermelon"
        );
        let mut tampered = body.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert_eq!(keys.decrypt(&tampered), Err(WebPushError::Open));
        assert_eq!(keys.decrypt(&body[..30]), Err(WebPushError::Header));
    }

    #[test]
    fn encrypt_then_decrypt() {
        let keys = SubscriptionKeys::generate().unwrap();
        let mut seed = [7u8; 48];
        seed[0] = 1;
        let body = encrypt(&keys.public(), &keys.auth, b"ring ring", seed).unwrap();
        assert_eq!(keys.decrypt(&body).unwrap(), b"ring ring");
        let other = SubscriptionKeys::generate().unwrap();
        assert!(other.decrypt(&body).is_err());
    }
}
