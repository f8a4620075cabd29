//! HPKE (RFC 9180), base mode, single-shot, with one suite:
//! DHKEM(P-256, HKDF-SHA256), HKDF-SHA256, AES-128-GCM. A device seals a
//! small secret (a group call's sender key) to another device's P-256
//! public key; only the holder of the matching private key opens it.
//!
//! The recipient's key pair is long-lived, so ECDH uses the `p256` crate
//! (ring offers single-use ECDH keys only); HMAC, HKDF-Expand and AES-GCM
//! come from ring.

use p256::elliptic_curve::sec1::ToEncodedPoint;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
use ring::{hkdf, hmac};

/// `kem_id` of DHKEM(P-256, HKDF-SHA256).
const KEM_ID: u16 = 0x0010;
/// `kdf_id` of HKDF-SHA256 and `aead_id` of AES-128-GCM.
const KDF_ID: u16 = 0x0001;
const AEAD_ID: u16 = 0x0001;
/// The encapsulated key: an uncompressed P-256 point.
pub const ENC_LEN: usize = 65;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HpkeError {
    #[error("not an uncompressed P-256 public key")]
    PublicKey,
    #[error("ciphertext does not open")]
    Open,
    #[error("random number generator failed")]
    Random,
}

fn kem_suite() -> Vec<u8> {
    [&b"KEM"[..], &KEM_ID.to_be_bytes()].concat()
}

fn hpke_suite() -> Vec<u8> {
    [
        &b"HPKE"[..],
        &KEM_ID.to_be_bytes(),
        &KDF_ID.to_be_bytes(),
        &AEAD_ID.to_be_bytes(),
    ]
    .concat()
}

/// `LabeledExtract(salt, label, ikm)`: HMAC-SHA256 keyed by the salt.
fn labeled_extract(suite: &[u8], salt: &[u8], label: &[u8], ikm: &[u8]) -> [u8; 32] {
    let key = hmac::Key::new(hmac::HMAC_SHA256, salt);
    let mut ctx = hmac::Context::with_key(&key);
    for part in [&b"HPKE-v1"[..], suite, label, ikm] {
        ctx.update(part);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.sign().as_ref());
    out
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// `LabeledExpand(prk, label, info, L)`.
fn labeled_expand<const L: usize>(
    suite: &[u8],
    prk: &[u8; 32],
    label: &[u8],
    info: &[u8],
) -> [u8; L] {
    let prk = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, prk);
    let len = (L as u16).to_be_bytes();
    let parts = [&len[..], b"HPKE-v1", suite, label, info];
    let mut out = [0u8; L];
    // L is at most 32 here, far below HKDF's limit: this cannot fail.
    let _ = prk
        .expand(&parts, Len(L))
        .and_then(|okm| okm.fill(&mut out));
    out
}

fn point(k: &p256::PublicKey) -> [u8; ENC_LEN] {
    let mut out = [0u8; ENC_LEN];
    out.copy_from_slice(k.to_encoded_point(false).as_bytes());
    out
}

/// The KEM's shared secret from a DH result and `enc ‖ pkR`.
fn shared_secret(dh: &[u8], enc: &[u8], pk_r: &[u8]) -> [u8; 32] {
    let suite = kem_suite();
    let prk = labeled_extract(&suite, b"", b"eae_prk", dh);
    labeled_expand::<32>(&suite, &prk, b"shared_secret", &[enc, pk_r].concat())
}

/// The base mode's key and nonce for `shared` and `info`.
fn key_schedule(shared: &[u8; 32], info: &[u8]) -> ([u8; 16], [u8; 12]) {
    let suite = hpke_suite();
    let psk_id_hash = labeled_extract(&suite, b"", b"psk_id_hash", b"");
    let info_hash = labeled_extract(&suite, b"", b"info_hash", info);
    let context = [&[0u8][..], &psk_id_hash, &info_hash].concat();
    let secret = labeled_extract(&suite, shared, b"secret", b"");
    (
        labeled_expand::<16>(&suite, &secret, b"key", &context),
        labeled_expand::<12>(&suite, &secret, b"base_nonce", &context),
    )
}

/// A recipient's key pair.
#[derive(Clone)]
pub struct RecipientKey(p256::SecretKey);

impl std::fmt::Debug for RecipientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecipientKey(..)")
    }
}

impl RecipientKey {
    /// From a 32-byte private scalar (`None` if it is not one).
    pub fn from_scalar(b: &[u8]) -> Option<RecipientKey> {
        p256::SecretKey::from_slice(b).ok().map(RecipientKey)
    }

    /// A new key pair from the system's random number generator.
    pub fn generate() -> Result<RecipientKey, HpkeError> {
        random_secret().map(RecipientKey)
    }

    /// The public key to seal to, uncompressed.
    pub fn public(&self) -> [u8; ENC_LEN] {
        point(&self.0.public_key())
    }

    /// Opens what [`seal`] sealed to this key with `info` and `aad`.
    pub fn open(
        &self,
        enc: &[u8],
        info: &[u8],
        aad: &[u8],
        ct: &[u8],
    ) -> Result<Vec<u8>, HpkeError> {
        let pk_e = p256::PublicKey::from_sec1_bytes(enc).map_err(|_| HpkeError::PublicKey)?;
        let dh = p256::ecdh::diffie_hellman(self.0.to_nonzero_scalar(), pk_e.as_affine());
        let shared = shared_secret(dh.raw_secret_bytes().as_slice(), enc, &self.public());
        let (key, nonce) = key_schedule(&shared, info);
        let key =
            LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &key).map_err(|_| HpkeError::Open)?);
        let mut buf = ct.to_vec();
        let pt = key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut buf,
            )
            .map_err(|_| HpkeError::Open)?;
        Ok(pt.to_vec())
    }
}

fn random_secret() -> Result<p256::SecretKey, HpkeError> {
    let rng = ring::rand::SystemRandom::new();
    loop {
        let mut b = [0u8; 32];
        ring::rand::SecureRandom::fill(&rng, &mut b).map_err(|_| HpkeError::Random)?;
        if let Ok(k) = p256::SecretKey::from_slice(&b) {
            return Ok(k);
        }
    }
}

/// Seals `pt` to `pk_r` (uncompressed P-256) with `info` and `aad`:
/// the encapsulated key and the ciphertext.
pub fn seal(
    pk_r: &[u8],
    info: &[u8],
    aad: &[u8],
    pt: &[u8],
) -> Result<([u8; ENC_LEN], Vec<u8>), HpkeError> {
    seal_with(&random_secret()?, pk_r, info, aad, pt)
}

/// [`seal`] with a given ephemeral key (the RFC's test vectors).
fn seal_with(
    sk_e: &p256::SecretKey,
    pk_r: &[u8],
    info: &[u8],
    aad: &[u8],
    pt: &[u8],
) -> Result<([u8; ENC_LEN], Vec<u8>), HpkeError> {
    let recipient = p256::PublicKey::from_sec1_bytes(pk_r).map_err(|_| HpkeError::PublicKey)?;
    let enc = point(&sk_e.public_key());
    let dh = p256::ecdh::diffie_hellman(sk_e.to_nonzero_scalar(), recipient.as_affine());
    let shared = shared_secret(dh.raw_secret_bytes().as_slice(), &enc, &point(&recipient));
    let (key, nonce) = key_schedule(&shared, info);
    let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &key).map_err(|_| HpkeError::Open)?);
    let mut ct = pt.to_vec();
    key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut ct)
        .map_err(|_| HpkeError::Open)?;
    Ok((enc, ct))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        crate::keys::unhex(&s.split_whitespace().collect::<String>()).unwrap()
    }

    /// RFC 9180 Appendix A.3.1: DHKEM(P-256, HKDF-SHA256), HKDF-SHA256,
    /// AES-128-GCM, base mode, the first encryption.
    #[test]
    fn sealing_matches_the_rfc() {
        let info = unhex("4f6465206f6e2061204772656369616e2055726e");
        let sk_e = p256::SecretKey::from_slice(&unhex(
            "4995788ef4b9d6132b249ce59a77281493eb39af373d236a1fe415cb0c2d7beb",
        ))
        .unwrap();
        let sk_r = RecipientKey::from_scalar(&unhex(
            "f3ce7fdae57e1a310d87f1ebbde6f328be0a99cdbcadf4d6589cf29de4b8ffd2",
        ))
        .unwrap();
        assert_eq!(
            sk_r.public().to_vec(),
            unhex(
                "04fe8c19ce0905191ebc298a9245792531f26f0cece2460639e8bc39cb7f70\
                 6a826a779b4cf969b8a0e539c7f62fb3d30ad6aa8f80e30f1d128aafd68a2ce72ea0"
            )
        );
        let pt = unhex("4265617574792069732074727574682c20747275746820626561757479");
        let aad = unhex("436f756e742d30");
        let (enc, ct) = seal_with(&sk_e, &sk_r.public(), &info, &aad, &pt).unwrap();
        assert_eq!(
            enc.to_vec(),
            unhex(
                "04a92719c6195d5085104f469a8b9814d5838ff72b60501e2c4466e5e67b325\
                 ac98536d7b61a1af4b78e5b7f951c0900be863c403ce65c9bfcb9382657222d18c4"
            )
        );
        assert_eq!(
            ct,
            unhex(
                "5ad590bb8baa577f8619db35a36311226a896e7342a6d836d8b7bcd2f20b6c7f\
                 9076ac232e3ab2523f39513434"
            )
        );
        assert_eq!(sk_r.open(&enc, &info, &aad, &ct).unwrap(), pt);
    }

    #[test]
    fn only_the_recipient_with_the_same_info_and_aad_opens() {
        let me = RecipientKey::generate().unwrap();
        let (enc, ct) = seal(&me.public(), b"call 1", b"kid 7", b"sender key").unwrap();
        assert_eq!(
            me.open(&enc, b"call 1", b"kid 7", &ct).unwrap(),
            b"sender key"
        );
        assert_eq!(
            me.open(&enc, b"call 2", b"kid 7", &ct),
            Err(HpkeError::Open)
        );
        assert_eq!(
            me.open(&enc, b"call 1", b"kid 8", &ct),
            Err(HpkeError::Open)
        );
        let other = RecipientKey::generate().unwrap();
        assert_eq!(
            other.open(&enc, b"call 1", b"kid 7", &ct),
            Err(HpkeError::Open)
        );
        assert_eq!(me.open(&[4; 65], b"", b"", &ct), Err(HpkeError::PublicKey));
    }
}
