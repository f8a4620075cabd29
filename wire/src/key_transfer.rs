//! Handing the account key to a newly approved device without the server
//! learning it.
//!
//! The new device makes an ephemeral P-256 key ([`TransferKey`]) and sends
//! its public half with its link claim. The approving device seals the
//! account key to it ([`seal_account_key`]): ECDH with a fresh ephemeral
//! key, HKDF-SHA256 (salt = both public keys, info = context ‖ device id),
//! AES-256-GCM. The server stores and relays the sealed bytes:
//!
//! ```text
//! [65] approver's ephemeral public key ‖ AES-256-GCM(account key PKCS#8) ‖ [16] tag
//! ```
//!
//! Each derived key seals exactly one message, so the nonce is fixed.
//!
//! The server relays the claim too, so the approver must know the claim
//! it seals to is the new device's own, not one the server put in its
//! place: the new device shows a [`link_fingerprint`] of the code and its
//! keys, the approving device computes the same from the claim it sees, and
//! the person confirms they match (typing the new device's digits) before
//! anything is sealed — the numeric comparison of Bluetooth pairing, over
//! the two screens the person holds. 64 bits: a server cannot grind keys
//! of its own to the same digits in the link's lifetime.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey, ECDH_P256};
use ring::hkdf;
use ring::rand::SystemRandom;

use crate::keys::{DeviceId, PublicKey, SigningKey, PUBLIC_KEY_LEN};

const INFO: &[u8] = b"parley-account-key-transfer-v1";
/// Info for a rotated account key sealed to a device's identity key.
const ROTATION_INFO: &[u8] = b"parley-account-key-rotation-seal-v1";
const FINGERPRINT_CONTEXT: &[u8] = b"parley-link-fingerprint-v1\0";

/// The 20 digits (four groups of five) that commit to a link claim: the
/// link code (as typed, case and separators aside), the new device's id,
/// identity key and transfer key.
pub fn link_fingerprint(
    code: &str,
    device: DeviceId,
    identity_key: &PublicKey,
    transfer_key: &[u8],
) -> String {
    let code: String = code
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_uppercase())
        .collect();
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(FINGERPRINT_CONTEXT);
    ctx.update(&(code.len() as u32).to_be_bytes());
    ctx.update(code.as_bytes());
    ctx.update(&device.0);
    ctx.update(&identity_key.0);
    ctx.update(transfer_key);
    let d = ctx.finish();
    let mut n = [0u8; 8];
    n.copy_from_slice(&d.as_ref()[..8]);
    let digits = format!("{:020}", u64::from_be_bytes(n));
    let groups: Vec<&str> = (0..4).map(|i| &digits[i * 5..i * 5 + 5]).collect();
    groups.join(" ")
}

/// Whether what a person typed is `fingerprint` (digits compared, spaces
/// and dashes ignored).
pub fn same_fingerprint(fingerprint: &str, typed: &str) -> bool {
    let digits = |s: &str| -> String { s.chars().filter(char::is_ascii_digit).collect() };
    let (a, b) = (digits(fingerprint), digits(typed));
    a.len() == 20 && a == b
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    #[error("transfer key must be 65 bytes of uncompressed P-256")]
    BadTransferKey,
    #[error("sealed account key does not open with this transfer key")]
    Open,
    #[error("the opened account key is not a P-256 PKCS#8 document")]
    BadAccountKey,
}

/// The new device's half; lives in memory until the approval arrives.
#[derive(Debug)]
pub struct TransferKey {
    private: EphemeralPrivateKey,
    public: Vec<u8>,
}

impl TransferKey {
    pub fn generate() -> TransferKey {
        let rng = SystemRandom::new();
        let private = EphemeralPrivateKey::generate(&ECDH_P256, &rng)
            .expect("system random number generator failed");
        let public = private
            .compute_public_key()
            .expect("public key of a fresh P-256 key")
            .as_ref()
            .to_vec();
        TransferKey { private, public }
    }

    /// The public half to send with the link claim.
    pub fn public(&self) -> &[u8] {
        &self.public
    }

    /// Opens what the approving device sealed for `device`.
    pub fn open(self, sealed: &[u8], device: DeviceId) -> Result<SigningKey, TransferError> {
        if sealed.len() < PUBLIC_KEY_LEN + AES_256_GCM.tag_len() {
            return Err(TransferError::Open);
        }
        let (their_public, ciphertext) = sealed.split_at(PUBLIC_KEY_LEN);
        let public = &self.public;
        let key = agreement::agree_ephemeral(
            self.private,
            &UnparsedPublicKey::new(&ECDH_P256, their_public),
            |shared| aead_key(shared, their_public, public, INFO, device),
        )
        .ok()
        .flatten()
        .ok_or(TransferError::Open)?;
        open_sealed(key, ciphertext)
    }
}

/// Seals `account` to the new device's transfer key.
pub fn seal_account_key(
    account: &SigningKey,
    transfer_public: &[u8],
    device: DeviceId,
) -> Result<Vec<u8>, TransferError> {
    if transfer_public.len() != PUBLIC_KEY_LEN {
        return Err(TransferError::BadTransferKey);
    }
    seal(account, transfer_public, INFO, device)
}

/// ECDH from a fresh ephemeral key to `recipient`, then [`aead_key`] with
/// `context`: the ephemeral public key followed by the sealed PKCS#8.
fn seal(
    account: &SigningKey,
    recipient: &[u8],
    context: &[u8],
    device: DeviceId,
) -> Result<Vec<u8>, TransferError> {
    let rng = SystemRandom::new();
    let mine = EphemeralPrivateKey::generate(&ECDH_P256, &rng)
        .expect("system random number generator failed");
    let my_public = mine
        .compute_public_key()
        .expect("public key of a fresh P-256 key")
        .as_ref()
        .to_vec();
    let key = agreement::agree_ephemeral(
        mine,
        &UnparsedPublicKey::new(&ECDH_P256, recipient),
        |shared| aead_key(shared, &my_public, recipient, context, device),
    )
    .ok()
    .flatten()
    .ok_or(TransferError::BadTransferKey)?;
    let mut buf = account.pkcs8().to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key([0; 12]),
        Aad::empty(),
        &mut buf,
    )
    .map_err(|_| TransferError::BadTransferKey)?;
    let mut out = my_public;
    out.extend_from_slice(&buf);
    Ok(out)
}

/// Opens the sealed PKCS#8 with the derived key.
fn open_sealed(key: LessSafeKey, ciphertext: &[u8]) -> Result<SigningKey, TransferError> {
    let mut buf = ciphertext.to_vec();
    let plain = key
        .open_in_place(
            Nonce::assume_unique_for_key([0; 12]),
            Aad::empty(),
            &mut buf,
        )
        .map_err(|_| TransferError::Open)?;
    SigningKey::from_pkcs8(plain).map_err(|_| TransferError::BadAccountKey)
}

/// HKDF-SHA256 of an ECDH secret (salt = sealer's ‖ opener's public key,
/// info = context ‖ device id) to an AES-256-GCM key.
fn aead_key(
    shared: &[u8],
    sealer_public: &[u8],
    opener_public: &[u8],
    context: &[u8],
    device: DeviceId,
) -> Option<LessSafeKey> {
    let mut salt = sealer_public.to_vec();
    salt.extend_from_slice(opener_public);
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &salt).extract(shared);
    let info = [context, &device.0[..]];
    let okm = prk.expand(&info, &AES_256_GCM).ok()?;
    let mut key = [0u8; 32];
    okm.fill(&mut key).ok()?;
    Some(LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key).ok()?))
}

/// Seals a rotated account key to an existing device of the account, to
/// the identity key the device list names for it (the device opens it
/// with [`open_with_identity`]). Same construction as a link's transfer,
/// with the identity key as the recipient's half and its own context.
pub fn seal_to_device(
    account: &SigningKey,
    identity: &PublicKey,
    device: DeviceId,
) -> Result<Vec<u8>, TransferError> {
    seal(account, &identity.0, ROTATION_INFO, device)
}

/// Opens what [`seal_to_device`] sealed to this device's identity key.
pub fn open_with_identity(
    identity: &SigningKey,
    sealed: &[u8],
    device: DeviceId,
) -> Result<SigningKey, TransferError> {
    use p256::pkcs8::DecodePrivateKey;
    if sealed.len() < PUBLIC_KEY_LEN + AES_256_GCM.tag_len() {
        return Err(TransferError::Open);
    }
    let (their_public, ciphertext) = sealed.split_at(PUBLIC_KEY_LEN);
    let secret =
        p256::SecretKey::from_pkcs8_der(identity.pkcs8()).map_err(|_| TransferError::Open)?;
    let sealer = p256::PublicKey::from_sec1_bytes(their_public).map_err(|_| TransferError::Open)?;
    let shared = p256::ecdh::diffie_hellman(secret.to_nonzero_scalar(), sealer.as_affine());
    let key = aead_key(
        shared.raw_secret_bytes().as_slice(),
        their_public,
        &identity.public().0,
        ROTATION_INFO,
        device,
    )
    .ok_or(TransferError::Open)?;
    open_sealed(key, ciphertext)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_fingerprint_commits_to_the_code_and_both_keys() {
        let id = DeviceId([3; 16]);
        let key = SigningKey::generate().public();
        let t = TransferKey::generate();
        let fp = link_fingerprint("ABCD-EFGH-JKMN-PQRS", id, &key, t.public());
        assert_eq!(fp.len(), 23);
        // The code as the person typed it.
        assert_eq!(
            fp,
            link_fingerprint("abcd efgh jkmn pqrs", id, &key, t.public())
        );
        assert!(same_fingerprint(&fp, &fp.replace(' ', "-")));
        assert!(!same_fingerprint(&fp, "1234"));
        // Anything else gives other digits.
        let other = TransferKey::generate();
        assert_ne!(
            fp,
            link_fingerprint("ABCD-EFGH-JKMN-PQRS", id, &key, other.public())
        );
        let other_key = SigningKey::generate().public();
        assert_ne!(
            fp,
            link_fingerprint("ABCD-EFGH-JKMN-PQRS", id, &other_key, t.public())
        );
        assert_ne!(
            fp,
            link_fingerprint("ABCD-EFGH-JKMN-PQRT", id, &key, t.public())
        );
        assert_ne!(
            fp,
            link_fingerprint("ABCD-EFGH-JKMN-PQRS", DeviceId([4; 16]), &key, t.public())
        );
    }

    #[test]
    fn the_new_device_recovers_the_account_key() {
        let account = SigningKey::generate();
        let device = DeviceId::random();
        let t = TransferKey::generate();
        let sealed = seal_account_key(&account, t.public(), device).unwrap();
        let opened = t.open(&sealed, device).unwrap();
        assert_eq!(opened.public(), account.public());
    }

    #[test]
    fn wrong_key_device_or_tampering_fails() {
        let account = SigningKey::generate();
        let device = DeviceId::random();
        let t = TransferKey::generate();
        let sealed = seal_account_key(&account, t.public(), device).unwrap();
        assert_eq!(
            TransferKey::generate().open(&sealed, device).unwrap_err(),
            TransferError::Open
        );
        let t2 = TransferKey::generate();
        let sealed2 = seal_account_key(&account, t2.public(), device).unwrap();
        assert_eq!(
            t2.open(&sealed2, DeviceId::random()).unwrap_err(),
            TransferError::Open,
            "bound to the device id"
        );
        let t3 = TransferKey::generate();
        let mut sealed3 = seal_account_key(&account, t3.public(), device).unwrap();
        let last = sealed3.len() - 1;
        sealed3[last] ^= 1;
        assert_eq!(t3.open(&sealed3, device).unwrap_err(), TransferError::Open);
        assert_eq!(
            seal_account_key(&account, &[4; 10], device),
            Err(TransferError::BadTransferKey)
        );
        assert!(TransferKey::generate().open(&[1, 2, 3], device).is_err());
    }

    #[test]
    fn a_rotated_key_opens_only_for_its_device() {
        let account = SigningKey::generate();
        let (phone, laptop) = (SigningKey::generate(), SigningKey::generate());
        let (phone_id, laptop_id) = (DeviceId([1; 16]), DeviceId([2; 16]));
        let sealed = seal_to_device(&account, &phone.public(), phone_id).unwrap();
        let opened = open_with_identity(&phone, &sealed, phone_id).unwrap();
        assert_eq!(opened.public(), account.public());
        // Another device's key, another device id, a flipped byte.
        assert!(open_with_identity(&laptop, &sealed, phone_id).is_err());
        assert!(open_with_identity(&phone, &sealed, laptop_id).is_err());
        let mut bad = sealed.clone();
        bad[70] ^= 1;
        assert!(open_with_identity(&phone, &bad, phone_id).is_err());
        assert!(open_with_identity(&phone, &sealed[..40], phone_id).is_err());
        // A link transfer's sealed key does not open as a rotation's.
        let t = TransferKey::generate();
        let linked = seal_account_key(&account, t.public(), phone_id).unwrap();
        assert!(open_with_identity(&phone, &linked, phone_id).is_err());
    }
}
