//! A group call's sender key on its way from one participant's device to
//! another's: sealed to the recipient device's identity key with HPKE
//! (RFC 9180) and signed by the sending device's identity key. Signaling
//! and the forwarding unit only carry it: they cannot read the key, and
//! they cannot swap in a key of their own, because the recipient checks
//! the signature against the sender's key from a verified directory
//! lookup.
//!
//! The recipient's identity key is an ECDSA key; its scalar serves as the
//! HPKE recipient key too, so a device has one key pair to protect.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use p256::pkcs8::DecodePrivateKey;

use crate::hpke::{self, RecipientKey, ENC_LEN};
use crate::keys::{DeviceId, PublicKey, SigningKey, SIGNATURE_LEN};

/// A participant device's SFrame sender key: its KID and `base_key`.
#[derive(Clone, PartialEq, Eq)]
pub struct SenderKey {
    pub kid: u64,
    pub base_key: [u8; 32],
}

impl std::fmt::Debug for SenderKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SenderKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupKeyError {
    #[error("key message is malformed")]
    Malformed,
    #[error("key message is for another call or device")]
    Misaddressed,
    #[error("key message is not signed by the device it names")]
    BadSignature,
    #[error("key message does not open with this device's key")]
    Open,
    #[error("cannot seal: {0}")]
    Seal(String),
}

/// One sender key, for one recipient device, in one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyMessage {
    pub call: String,
    pub from: DeviceId,
    pub to: DeviceId,
    pub kid: u64,
    enc: [u8; ENC_LEN],
    sealed: Vec<u8>,
    signature: [u8; SIGNATURE_LEN],
}

/// What is authenticated besides the key itself: who sends which KID to
/// whom in which call.
fn context(call: &str, from: DeviceId, to: DeviceId, kid: u64) -> Vec<u8> {
    [
        &b"parley group key v1\0"[..],
        &(call.len() as u32).to_be_bytes(),
        call.as_bytes(),
        &from.0,
        &to.0,
        &kid.to_be_bytes(),
    ]
    .concat()
}

/// The HPKE recipient key behind an identity key.
pub fn recipient_key(identity: &SigningKey) -> Option<RecipientKey> {
    let secret = p256::SecretKey::from_pkcs8_der(identity.pkcs8()).ok()?;
    RecipientKey::from_scalar(secret.to_bytes().as_slice())
}

impl KeyMessage {
    /// `key`, sealed to device `to` (identity key `to_key`) and signed by
    /// this device (`from`, `me`).
    pub fn seal(
        call: &str,
        me: &SigningKey,
        from: DeviceId,
        to: DeviceId,
        to_key: &PublicKey,
        key: &SenderKey,
    ) -> Result<KeyMessage, GroupKeyError> {
        let ctx = context(call, from, to, key.kid);
        let (enc, sealed) = hpke::seal(&to_key.0, &ctx, &[], &key.base_key)
            .map_err(|e| GroupKeyError::Seal(e.to_string()))?;
        let signature = me.sign(&[&ctx[..], &enc, &sealed].concat());
        Ok(KeyMessage {
            call: call.to_owned(),
            from,
            to,
            kid: key.kid,
            enc,
            sealed,
            signature,
        })
    }

    /// The sender key inside, for this device (`me`, `my_id`) in `call`,
    /// if the device it names as sender (whose identity key, from a
    /// verified lookup, is `from_key`) signed it.
    pub fn open(
        &self,
        call: &str,
        me: &SigningKey,
        my_id: DeviceId,
        from_key: &PublicKey,
    ) -> Result<SenderKey, GroupKeyError> {
        if self.call != call || self.to != my_id {
            return Err(GroupKeyError::Misaddressed);
        }
        let ctx = context(call, self.from, self.to, self.kid);
        from_key
            .verify(
                &[&ctx[..], &self.enc, &self.sealed].concat(),
                &self.signature,
            )
            .map_err(|_| GroupKeyError::BadSignature)?;
        let recipient = recipient_key(me).ok_or(GroupKeyError::Open)?;
        let base = recipient
            .open(&self.enc, &ctx, &[], &self.sealed)
            .map_err(|_| GroupKeyError::Open)?;
        Ok(SenderKey {
            kid: self.kid,
            base_key: base.try_into().map_err(|_| GroupKeyError::Open)?,
        })
    }

    /// As carried in signaling (a SIP MESSAGE body): JSON, binary fields
    /// in base64url.
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "call": self.call,
            "from": self.from.to_string(),
            "to": self.to.to_string(),
            "kid": self.kid,
            "enc": B64.encode(self.enc),
            "sealed": B64.encode(&self.sealed),
            "sig": B64.encode(self.signature),
        })
        .to_string()
    }

    pub fn from_json(s: &str) -> Result<KeyMessage, GroupKeyError> {
        let v: serde_json::Value = serde_json::from_str(s).map_err(|_| GroupKeyError::Malformed)?;
        let text = |k: &str| v[k].as_str().ok_or(GroupKeyError::Malformed);
        let bytes = |k: &str| B64.decode(text(k)?).map_err(|_| GroupKeyError::Malformed);
        let device = |k: &str| {
            text(k)?
                .parse::<DeviceId>()
                .map_err(|_| GroupKeyError::Malformed)
        };
        let sealed = bytes("sealed")?;
        if sealed.len() > 256 {
            return Err(GroupKeyError::Malformed);
        }
        Ok(KeyMessage {
            call: text("call")?.to_owned(),
            from: device("from")?,
            to: device("to")?,
            kid: v["kid"].as_u64().ok_or(GroupKeyError::Malformed)?,
            enc: bytes("enc")?
                .try_into()
                .map_err(|_| GroupKeyError::Malformed)?,
            sealed,
            signature: bytes("sig")?
                .try_into()
                .map_err(|_| GroupKeyError::Malformed)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Device {
        id: DeviceId,
        key: SigningKey,
    }

    fn device() -> Device {
        Device {
            id: DeviceId::random(),
            key: SigningKey::generate(),
        }
    }

    fn key() -> SenderKey {
        SenderKey {
            kid: 0x1_0007,
            base_key: [9; 32],
        }
    }

    #[test]
    fn a_sender_key_reaches_its_device_and_no_one_else() {
        let (alice, bob, carol) = (device(), device(), device());
        let m = KeyMessage::seal(
            "call-1",
            &alice.key,
            alice.id,
            bob.id,
            &bob.key.public(),
            &key(),
        )
        .unwrap();
        let carried = KeyMessage::from_json(&m.to_json()).unwrap();
        assert_eq!(carried, m);
        assert_eq!(
            carried.open("call-1", &bob.key, bob.id, &alice.key.public()),
            Ok(key())
        );
        // Carol, or Bob in another call, cannot use it.
        assert_eq!(
            carried.open("call-1", &carol.key, carol.id, &alice.key.public()),
            Err(GroupKeyError::Misaddressed)
        );
        assert_eq!(
            carried.open("call-2", &bob.key, bob.id, &alice.key.public()),
            Err(GroupKeyError::Misaddressed)
        );
        // Readdressed to Carol by a server, it no longer verifies.
        let mut moved = carried.clone();
        moved.to = carol.id;
        assert_eq!(
            moved.open("call-1", &carol.key, carol.id, &alice.key.public()),
            Err(GroupKeyError::BadSignature)
        );
    }

    /// Signaling swaps in a key of its own, signed by a key of its own:
    /// refused, since the sender's key comes from the verified directory.
    #[test]
    fn a_key_forged_by_a_server_is_refused() {
        let (alice, bob, mallory) = (device(), device(), device());
        let forged = KeyMessage::seal(
            "call-1",
            &mallory.key,
            alice.id,
            bob.id,
            &bob.key.public(),
            &SenderKey {
                kid: key().kid,
                base_key: [6; 32],
            },
        )
        .unwrap();
        assert_eq!(
            forged.open("call-1", &bob.key, bob.id, &alice.key.public()),
            Err(GroupKeyError::BadSignature)
        );
        // Tampering with the sealed key is caught too.
        let mut m = KeyMessage::seal(
            "call-1",
            &alice.key,
            alice.id,
            bob.id,
            &bob.key.public(),
            &key(),
        )
        .unwrap();
        m.sealed[0] ^= 1;
        assert_eq!(
            m.open("call-1", &bob.key, bob.id, &alice.key.public()),
            Err(GroupKeyError::BadSignature)
        );
        assert_eq!(KeyMessage::from_json("{}"), Err(GroupKeyError::Malformed));
    }
}
