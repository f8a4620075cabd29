//! Key transparency: what a client checks before it uses any key the
//! identity service hands out.
//!
//! The directory maps each handle URI (the label) to a [`DirectoryValue`]:
//! the account-signed device list. It is an akd directory with Parley's
//! domain label; proofs travel as akd's protobuf messages (base64url in the
//! JSON API). Each epoch's root hash is signed by the service's Ed25519
//! root key so that roots can be compared between clients and auditors.
//!
//! A client pins a [`TrustAnchor`] (VRF public key + root signing key) and
//! accepts a device only if all of these hold:
//! 1. the epoch root is signed by the anchor's root key;
//! 2. the akd proof verifies against that root for the handle's label;
//! 3. the value is an active device list whose signature verifies under
//!    its account key, and which names the handle that was looked up;
//! 4. the root is no older than the newest this client has seen, and is
//!    the same root it saw before for that epoch ([`SeenRoots`]): an old
//!    signed root and its proof still verify (one still listing a removed
//!    device, say), and two different trees signed for one epoch are a
//!    split view.

use akd_core::proto::specs::types as pb;
use akd_core::{AkdLabel, DomainLabel, ExperimentalConfiguration};
use protobuf::Message;

use crate::device_list::{DeviceListError, DirectoryValue};

/// Domain separation for every hash in Parley's directory.
#[derive(Clone, Debug)]
pub struct ParleyDomain;

impl DomainLabel for ParleyDomain {
    fn domain_label() -> &'static [u8] {
        b"parley-ids-v1"
    }
}

/// The akd tree configuration the service and clients share.
pub type KtConfig = ExperimentalConfiguration<ParleyDomain>;

const ROOT_CONTEXT: &[u8] = b"parley-kt-root-v1\0";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KtError {
    #[error("epoch root signature does not verify under the pinned root key")]
    RootSignature,
    #[error("proof is not a valid akd protobuf message: {0}")]
    ProofEncoding(String),
    #[error("transparency proof does not verify: {0}")]
    Proof(String),
    #[error("directory value is malformed: {0}")]
    Value(#[from] DeviceListError),
    #[error("device list is not signed by its account key")]
    ListSignature,
    #[error("device list does not name the handle {0}")]
    WrongHandle(String),
    #[error("history does not end at the looked-up value")]
    HistoryMismatch,
    #[error("the directory answered from epoch {got} after this client saw epoch {seen}: a stale or replayed view")]
    StaleRoot { seen: u64, got: u64 },
    #[error("the directory signed two different roots for epoch {0}: a split view")]
    ForkedRoot(u64),
}

/// What a client pins for a deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustAnchor {
    /// akd VRF public key (32 bytes).
    pub vrf_public_key: Vec<u8>,
    /// Ed25519 public key that signs epoch roots (32 bytes).
    pub root_key: Vec<u8>,
}

/// An epoch root hash signed by the directory's root key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedRoot {
    pub epoch: u64,
    pub root_hash: [u8; 32],
    pub signature: Vec<u8>,
}

impl SignedRoot {
    /// The bytes the root key signs.
    pub fn signing_bytes(epoch: u64, root_hash: &[u8; 32]) -> Vec<u8> {
        let mut b = ROOT_CONTEXT.to_vec();
        b.extend_from_slice(&epoch.to_be_bytes());
        b.extend_from_slice(root_hash);
        b
    }

    pub fn verify(&self, anchor: &TrustAnchor) -> Result<(), KtError> {
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &anchor.root_key)
            .verify(
                &Self::signing_bytes(self.epoch, &self.root_hash),
                &self.signature,
            )
            .map_err(|_| KtError::RootSignature)
    }
}

/// The roots a client has accepted: the newest epoch, and the root hash
/// of the most recent epochs. Keep one per client (an app persists
/// [`SeenRoots::highest_epoch`] across restarts and passes it back with
/// [`SeenRoots::starting_at`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeenRoots {
    highest: u64,
    recent: std::collections::BTreeMap<u64, [u8; 32]>,
}

/// Root hashes kept for fork detection.
const SEEN_ROOTS: usize = 1024;

impl SeenRoots {
    /// A client that has seen up to `epoch` before (0: nothing).
    pub fn starting_at(epoch: u64) -> SeenRoots {
        SeenRoots {
            highest: epoch,
            recent: Default::default(),
        }
    }

    /// Accepts a root whose signature verified, or says why not: older
    /// than the newest seen, or another hash for an epoch seen before.
    pub fn observe(&mut self, root: &SignedRoot) -> Result<(), KtError> {
        if let Some(h) = self.recent.get(&root.epoch) {
            if *h != root.root_hash {
                return Err(KtError::ForkedRoot(root.epoch));
            }
            return Ok(());
        }
        if root.epoch < self.highest {
            return Err(KtError::StaleRoot {
                seen: self.highest,
                got: root.epoch,
            });
        }
        self.highest = root.epoch;
        self.recent.insert(root.epoch, root.root_hash);
        while self.recent.len() > SEEN_ROOTS {
            self.recent.pop_first();
        }
        Ok(())
    }

    /// The newest epoch accepted.
    pub fn highest_epoch(&self) -> u64 {
        self.highest
    }
}

/// A value the directory proved for a handle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedValue {
    /// Epoch in which this value was published.
    pub epoch: u64,
    /// 1-based version of the handle's value.
    pub version: u64,
    pub value: DirectoryValue,
}

/// Verifies a lookup proof (akd protobuf `LookupProof`) for `handle_uri`.
pub fn verify_lookup(
    anchor: &TrustAnchor,
    root: &SignedRoot,
    handle_uri: &str,
    proof: &[u8],
) -> Result<VerifiedValue, KtError> {
    root.verify(anchor)?;
    let msg = pb::LookupProof::parse_from_bytes(proof)
        .map_err(|e| KtError::ProofEncoding(e.to_string()))?;
    let proof =
        akd_core::LookupProof::try_from(&msg).map_err(|e| KtError::ProofEncoding(e.to_string()))?;
    let r = akd_core::verify::lookup_verify::<KtConfig>(
        &anchor.vrf_public_key,
        root.root_hash,
        root.epoch,
        AkdLabel(handle_uri.as_bytes().to_vec()),
        proof,
    )
    .map_err(|e| KtError::Proof(e.to_string()))?;
    checked_value(handle_uri, r)
}

/// Verifies a complete history proof (akd protobuf `HistoryProof`) for
/// `handle_uri`; returns every value the handle has had, newest first.
pub fn verify_history(
    anchor: &TrustAnchor,
    root: &SignedRoot,
    handle_uri: &str,
    proof: &[u8],
) -> Result<Vec<VerifiedValue>, KtError> {
    root.verify(anchor)?;
    let msg = pb::HistoryProof::parse_from_bytes(proof)
        .map_err(|e| KtError::ProofEncoding(e.to_string()))?;
    let proof = akd_core::HistoryProof::try_from(&msg)
        .map_err(|e| KtError::ProofEncoding(e.to_string()))?;
    let results = akd_core::verify::key_history_verify::<KtConfig>(
        &anchor.vrf_public_key,
        root.root_hash,
        root.epoch,
        AkdLabel(handle_uri.as_bytes().to_vec()),
        proof,
        akd_core::verify::HistoryVerificationParams::default(),
    )
    .map_err(|e| KtError::Proof(e.to_string()))?;
    results
        .into_iter()
        .map(|r| checked_value(handle_uri, r))
        .collect()
}

fn checked_value(handle_uri: &str, r: akd_core::VerifyResult) -> Result<VerifiedValue, KtError> {
    let value = DirectoryValue::decode(&r.value.0)?;
    if let DirectoryValue::Active(list) = &value {
        list.verify().map_err(|_| KtError::ListSignature)?;
        if !list.list.handles.iter().any(|h| h == handle_uri) {
            return Err(KtError::WrongHandle(handle_uri.to_owned()));
        }
    }
    Ok(VerifiedValue {
        epoch: r.epoch,
        version: r.version,
        value,
    })
}

/// Encodes an akd lookup proof for the wire.
pub fn encode_lookup_proof(p: &akd_core::LookupProof) -> Vec<u8> {
    // Encoding a message we built from valid types cannot fail.
    pb::LookupProof::from(p)
        .write_to_bytes()
        .expect("protobuf encoding of a lookup proof")
}

/// Encodes an akd history proof for the wire.
pub fn encode_history_proof(p: &akd_core::HistoryProof) -> Vec<u8> {
    pb::HistoryProof::from(p)
        .write_to_bytes()
        .expect("protobuf encoding of a history proof")
}

/// Something in a handle's history that this device did not approve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unapproved {
    /// The handle was bound to another account key (an account reset, or
    /// a server substituting its own key).
    AccountKey { epoch: u64 },
    /// A device this device never approved appeared in the list.
    Device { epoch: u64, device: crate::DeviceId },
    /// The handle was deleted.
    Tombstone { epoch: u64 },
}

/// A device's check of its own handle's verified history: every value
/// published since `since_epoch` must be signed by `account_key` and list
/// only devices in `approved`. Returns what did not hold, oldest first.
pub fn unapproved_changes(
    history: &[VerifiedValue],
    since_epoch: u64,
    account_key: &crate::PublicKey,
    approved: &[crate::DeviceId],
) -> Vec<Unapproved> {
    let mut out = Vec::new();
    for v in history.iter().rev().filter(|v| v.epoch >= since_epoch) {
        match &v.value {
            DirectoryValue::Tombstone => out.push(Unapproved::Tombstone { epoch: v.epoch }),
            DirectoryValue::Active(l) if l.list.account_key != *account_key => {
                out.push(Unapproved::AccountKey { epoch: v.epoch })
            }
            DirectoryValue::Active(l) => {
                for d in &l.list.devices {
                    if !approved.contains(&d.id) {
                        out.push(Unapproved::Device {
                            epoch: v.epoch,
                            device: d.id,
                        });
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(epoch: u64, h: u8) -> SignedRoot {
        SignedRoot {
            epoch,
            root_hash: [h; 32],
            signature: Vec::new(),
        }
    }

    #[test]
    fn roots_must_not_go_back_nor_fork() {
        let mut seen = SeenRoots::default();
        seen.observe(&root(5, 1)).unwrap();
        seen.observe(&root(7, 2)).unwrap();
        // The same root again is fine, newer ones too.
        seen.observe(&root(7, 2)).unwrap();
        seen.observe(&root(5, 1)).unwrap();
        // A replayed older epoch never seen is stale.
        assert_eq!(
            seen.observe(&root(6, 9)),
            Err(KtError::StaleRoot { seen: 7, got: 6 })
        );
        // Another tree for an epoch already seen is a fork.
        assert_eq!(seen.observe(&root(7, 3)), Err(KtError::ForkedRoot(7)));
        assert_eq!(seen.highest_epoch(), 7);
        // An app that persisted its highest epoch starts from it.
        let mut again = SeenRoots::starting_at(7);
        assert!(matches!(
            again.observe(&root(3, 1)),
            Err(KtError::StaleRoot { .. })
        ));
        again.observe(&root(8, 4)).unwrap();
    }
}
