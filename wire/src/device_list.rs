//! The account-signed device list: the value the identity service publishes
//! in its key transparency directory under each of an account's handles.
//!
//! Only a device that holds the account key can produce one, so a server
//! that adds a device of its own to a handle must either publish a list
//! whose signature does not verify (every client rejects it) or replace the
//! account key (every device of the account sees the change in its
//! handle's history).
//!
//! Binary format (all integers big-endian):
//!
//! ```text
//! "PLY1"            magic
//! u8                kind: 1 = active list, 0 = tombstone (deleted handle;
//!                   nothing follows)
//! [65]              account public key (uncompressed P-256)
//! u64               seq: strictly increasing per account
//! u8                handle count (1..=16), then each: u8 length, URI bytes
//!                   (`tel:+14155550123`, `mailto:alice@example.com`), sorted
//! u8                device count (1..=32), then each:
//!                   [16] device id, [65] identity public key; sorted by id
//! [64]              ECDSA P-256 SHA-256 signature (r‖s) by the account key
//!                   over "parley-device-list-v1\0" ‖ every byte above
//! ```
//!
//! Kind 2 is an active list that rotates the account key (a device was
//! removed, so the key it held must stop counting). Before the signature
//! it carries the key it replaces and that key's endorsement of the new
//! one:
//!
//! ```text
//! [65]              previous account public key
//! [64]              signature by the previous key over
//!                   "parley-account-key-rotation-v1\0" ‖ new key ‖ seq
//! ```
//!
//! A device that holds the previous key accepts the new one on the strength
//! of that endorsement (`transparency::unapproved_changes`); a key that
//! appears without one is an account reset, or a directory that lies.

use crate::keys::{DeviceId, KeyError, PublicKey, SigningKey, PUBLIC_KEY_LEN, SIGNATURE_LEN};

pub const MAGIC: &[u8; 4] = b"PLY1";
pub const MAX_DEVICES: usize = 32;
pub const MAX_HANDLES: usize = 16;
const CONTEXT: &[u8] = b"parley-device-list-v1\0";
const ROTATION_CONTEXT: &[u8] = b"parley-account-key-rotation-v1\0";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceListError {
    #[error("device list is truncated or has trailing bytes")]
    Length,
    #[error("device list does not start with PLY1")]
    Magic,
    #[error("unknown device list kind {0}")]
    Kind(u8),
    #[error("a device list holds 1 to {MAX_DEVICES} devices and 1 to {MAX_HANDLES} handles")]
    Count,
    #[error("devices must be sorted by id without duplicates, handles sorted without duplicates")]
    Order,
    #[error("handle is not UTF-8")]
    Utf8,
    #[error("a key rotation must name another key than the new one")]
    Rotation,
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// One device as the account key vouches for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceEntry {
    pub id: DeviceId,
    pub identity_key: PublicKey,
}

/// The content an account key signs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceList {
    pub account_key: PublicKey,
    pub seq: u64,
    /// Handle URIs (`Handle::uri`).
    pub handles: Vec<String>,
    pub devices: Vec<DeviceEntry>,
}

/// A device list with the account key's signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedDeviceList {
    pub list: DeviceList,
    /// Set when this list replaces the account key (boxed: most lists
    /// carry none).
    pub rotation: Option<Box<Rotation>>,
    pub signature: [u8; SIGNATURE_LEN],
}

/// The account key a list replaces, and that key's endorsement of the new
/// one at the list's seq.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    pub previous_key: PublicKey,
    pub endorsement: [u8; SIGNATURE_LEN],
}

impl Rotation {
    fn message(new_key: &PublicKey, seq: u64) -> Vec<u8> {
        let mut m = ROTATION_CONTEXT.to_vec();
        m.extend_from_slice(&new_key.0);
        m.extend_from_slice(&seq.to_be_bytes());
        m
    }
}

/// What the directory holds for a handle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirectoryValue {
    Active(SignedDeviceList),
    /// The handle was deleted; no personal data remains.
    Tombstone,
}

impl DeviceList {
    /// Sorts handles and devices into canonical order.
    pub fn normalise(&mut self) {
        self.handles.sort();
        self.handles.dedup();
        self.devices.sort_by_key(|d| d.id);
        self.devices.dedup_by_key(|d| d.id);
    }

    fn body(&self, rotation: Option<&Rotation>) -> Vec<u8> {
        let mut b = Vec::with_capacity(210 + self.devices.len() * 81 + self.handles.len() * 32);
        b.extend_from_slice(MAGIC);
        b.push(if rotation.is_some() { 2 } else { 1 });
        b.extend_from_slice(&self.account_key.0);
        b.extend_from_slice(&self.seq.to_be_bytes());
        b.push(self.handles.len() as u8);
        for h in &self.handles {
            b.push(h.len() as u8);
            b.extend_from_slice(h.as_bytes());
        }
        b.push(self.devices.len() as u8);
        for d in &self.devices {
            b.extend_from_slice(&d.id.0);
            b.extend_from_slice(&d.identity_key.0);
        }
        if let Some(r) = rotation {
            b.extend_from_slice(&r.previous_key.0);
            b.extend_from_slice(&r.endorsement);
        }
        b
    }

    fn check_shape(&self) -> Result<(), DeviceListError> {
        if self.devices.is_empty()
            || self.devices.len() > MAX_DEVICES
            || self.handles.is_empty()
            || self.handles.len() > MAX_HANDLES
            || self.handles.iter().any(|h| h.is_empty() || h.len() > 255)
        {
            return Err(DeviceListError::Count);
        }
        if !self.devices.windows(2).all(|w| w[0].id < w[1].id)
            || !self.handles.windows(2).all(|w| w[0] < w[1])
        {
            return Err(DeviceListError::Order);
        }
        Ok(())
    }

    /// Signs the list with the account key, which must match
    /// `account_key`.
    pub fn sign(self, account: &SigningKey) -> Result<SignedDeviceList, DeviceListError> {
        self.sign_with(account, None)
    }

    /// Signs the list with a new account key (`account_key` must be its
    /// public half), endorsed by the key it replaces.
    pub fn sign_rotated(
        self,
        account: &SigningKey,
        previous: &SigningKey,
    ) -> Result<SignedDeviceList, DeviceListError> {
        let endorsement = previous.sign(&Rotation::message(&self.account_key, self.seq));
        let rotation = Rotation {
            previous_key: previous.public(),
            endorsement,
        };
        self.sign_with(account, Some(Box::new(rotation)))
    }

    fn sign_with(
        mut self,
        account: &SigningKey,
        rotation: Option<Box<Rotation>>,
    ) -> Result<SignedDeviceList, DeviceListError> {
        self.normalise();
        self.check_shape()?;
        if account.public() != self.account_key {
            return Err(KeyError::BadSignature.into());
        }
        let mut msg = CONTEXT.to_vec();
        msg.extend_from_slice(&self.body(rotation.as_deref()));
        Ok(SignedDeviceList {
            signature: account.sign(&msg),
            list: self,
            rotation,
        })
    }

    /// This list naming only `uri`: what the directory publishes under
    /// one handle of an account with several, so that a lookup of one does
    /// not reveal the others.
    pub fn for_handle(&self, uri: &str) -> DeviceList {
        DeviceList {
            handles: vec![uri.to_owned()],
            ..self.clone()
        }
    }

    pub fn device(&self, id: DeviceId) -> Option<&DeviceEntry> {
        self.devices.iter().find(|d| d.id == id)
    }
}

impl SignedDeviceList {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = self.list.body(self.rotation.as_deref());
        b.extend_from_slice(&self.signature);
        b
    }

    /// Checks the account key's signature and, for a rotation, the
    /// previous key's endorsement of the new one.
    pub fn verify(&self) -> Result<(), DeviceListError> {
        self.list.check_shape()?;
        if let Some(r) = &self.rotation {
            if r.previous_key == self.list.account_key {
                return Err(DeviceListError::Rotation);
            }
            r.previous_key.verify(
                &Rotation::message(&self.list.account_key, self.list.seq),
                &r.endorsement,
            )?;
        }
        let mut msg = CONTEXT.to_vec();
        msg.extend_from_slice(&self.list.body(self.rotation.as_deref()));
        self.list.account_key.verify(&msg, &self.signature)?;
        Ok(())
    }

    /// The account key this list replaces, if it rotates it.
    pub fn rotated_from(&self) -> Option<&PublicKey> {
        self.rotation.as_ref().map(|r| &r.previous_key)
    }
}

impl DirectoryValue {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            DirectoryValue::Active(s) => s.encode(),
            DirectoryValue::Tombstone => {
                let mut b = MAGIC.to_vec();
                b.push(0);
                b
            }
        }
    }

    /// Parses a directory value. Shape is checked; the signature is not
    /// (call [`SignedDeviceList::verify`]).
    pub fn decode(b: &[u8]) -> Result<DirectoryValue, DeviceListError> {
        let mut r = Reader(b);
        if r.take(4)? != MAGIC {
            return Err(DeviceListError::Magic);
        }
        let rotated = match r.u8()? {
            0 => {
                r.end()?;
                return Ok(DirectoryValue::Tombstone);
            }
            1 => false,
            2 => true,
            k => return Err(DeviceListError::Kind(k)),
        };
        let account_key = PublicKey::from_slice(r.take(PUBLIC_KEY_LEN)?)?;
        let seq = u64::from_be_bytes(r.take(8)?.try_into().map_err(|_| DeviceListError::Length)?);
        let nh = r.u8()? as usize;
        let mut handles = Vec::with_capacity(nh);
        for _ in 0..nh {
            let len = r.u8()? as usize;
            let s = std::str::from_utf8(r.take(len)?).map_err(|_| DeviceListError::Utf8)?;
            handles.push(s.to_owned());
        }
        let nd = r.u8()? as usize;
        let mut devices = Vec::with_capacity(nd);
        for _ in 0..nd {
            let id = DeviceId(
                r.take(16)?
                    .try_into()
                    .map_err(|_| DeviceListError::Length)?,
            );
            let identity_key = PublicKey::from_slice(r.take(PUBLIC_KEY_LEN)?)?;
            devices.push(DeviceEntry { id, identity_key });
        }
        let rotation = match rotated {
            true => Some(Box::new(Rotation {
                previous_key: PublicKey::from_slice(r.take(PUBLIC_KEY_LEN)?)?,
                endorsement: r
                    .take(SIGNATURE_LEN)?
                    .try_into()
                    .map_err(|_| DeviceListError::Length)?,
            })),
            false => None,
        };
        let signature = r
            .take(SIGNATURE_LEN)?
            .try_into()
            .map_err(|_| DeviceListError::Length)?;
        r.end()?;
        let list = DeviceList {
            account_key,
            seq,
            handles,
            devices,
        };
        list.check_shape()?;
        Ok(DirectoryValue::Active(SignedDeviceList {
            list,
            rotation,
            signature,
        }))
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DeviceListError> {
        if self.0.len() < n {
            return Err(DeviceListError::Length);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, DeviceListError> {
        Ok(self.take(1)?[0])
    }
    fn end(&self) -> Result<(), DeviceListError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(DeviceListError::Length)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(account: &SigningKey, n: usize) -> DeviceList {
        DeviceList {
            account_key: account.public(),
            seq: 7,
            handles: vec!["tel:+14155550123".into(), "mailto:a@example.com".into()],
            devices: (0..n)
                .map(|_| DeviceEntry {
                    id: DeviceId::random(),
                    identity_key: SigningKey::generate().public(),
                })
                .collect(),
        }
    }

    #[test]
    fn signed_list_round_trips_and_verifies() {
        let account = SigningKey::generate();
        let signed = sample(&account, 3).sign(&account).unwrap();
        let bytes = signed.encode();
        let DirectoryValue::Active(back) = DirectoryValue::decode(&bytes).unwrap() else {
            panic!("tombstone")
        };
        assert_eq!(back, signed);
        back.verify().unwrap();
        assert_eq!(back.list.handles[0], "mailto:a@example.com", "sorted");
    }

    #[test]
    fn any_change_breaks_the_signature() {
        let account = SigningKey::generate();
        let signed = sample(&account, 2).sign(&account).unwrap();
        let mut forged = signed.clone();
        forged.list.devices.push(DeviceEntry {
            id: DeviceId([0xff; 16]),
            identity_key: SigningKey::generate().public(),
        });
        assert_eq!(
            forged.verify(),
            Err(DeviceListError::Key(KeyError::BadSignature))
        );
        let mut bumped = signed.clone();
        bumped.list.seq += 1;
        assert!(bumped.verify().is_err());
        // A list signed by another key under this account key is refused.
        let other = SigningKey::generate();
        assert!(sample(&account, 1).sign(&other).is_err());
    }

    #[test]
    fn tombstone_round_trips() {
        let b = DirectoryValue::Tombstone.encode();
        assert_eq!(DirectoryValue::decode(&b), Ok(DirectoryValue::Tombstone));
        assert_eq!(
            DirectoryValue::decode(b"PLY1\x00x"),
            Err(DeviceListError::Length)
        );
    }

    #[test]
    fn shape_limits() {
        let account = SigningKey::generate();
        assert_eq!(
            sample(&account, 0).sign(&account),
            Err(DeviceListError::Count)
        );
        assert!(sample(&account, MAX_DEVICES).sign(&account).is_ok());
        assert_eq!(
            sample(&account, MAX_DEVICES + 1).sign(&account),
            Err(DeviceListError::Count)
        );
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            let _ = DirectoryValue::decode(&b);
            let mut framed = b"PLY1\x01".to_vec();
            framed.extend_from_slice(&b);
            let _ = DirectoryValue::decode(&framed);
        }
    }

    #[test]
    fn a_rotation_is_endorsed_by_the_key_it_replaces() {
        let (old, new) = (SigningKey::generate(), SigningKey::generate());
        let mut list = sample(&new, 2);
        list.seq = 9;
        let signed = list.clone().sign_rotated(&new, &old).unwrap();
        signed.verify().unwrap();
        assert_eq!(signed.rotated_from(), Some(&old.public()));
        let bytes = signed.encode();
        assert_eq!(bytes[4], 2, "kind 2");
        let DirectoryValue::Active(back) = DirectoryValue::decode(&bytes).unwrap() else {
            panic!("tombstone")
        };
        assert_eq!(back, signed);
        back.verify().unwrap();
        // A plain list stays kind 1.
        assert_eq!(list.clone().sign(&new).unwrap().encode()[4], 1);

        // Endorsed by another key than the one it names, or for another
        // seq: refused.
        let mut stranger = signed.clone();
        stranger.rotation.as_mut().unwrap().previous_key = SigningKey::generate().public();
        assert!(stranger.verify().is_err());
        let mut other_seq = list.clone();
        other_seq.seq = 10;
        let mut replayed = other_seq.sign_rotated(&new, &old).unwrap();
        replayed.rotation = signed.rotation.clone();
        assert!(replayed.verify().is_err());
        // Dropping the rotation breaks the account signature.
        let mut bare = signed.clone();
        bare.rotation = None;
        assert!(bare.verify().is_err());
        // A key cannot "rotate" to itself.
        let same = sample(&old, 1).sign_rotated(&old, &old).unwrap();
        assert_eq!(same.verify(), Err(DeviceListError::Rotation));
        // Truncated inside the rotation.
        assert_eq!(
            DirectoryValue::decode(&bytes[..bytes.len() - 70]),
            Err(DeviceListError::Length)
        );
    }
}
