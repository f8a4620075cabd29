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
//!
//! A handle the directory says it does not know comes with an absence
//! proof ([`verify_absence`]): the VRF label of its first version, and a
//! proof that this label is not in the tree. Without one, "not found" would
//! be the server's word, and a server could hide a handle from a caller.
//!
//! The roots a client accepted must also form one append-only chain:
//! [`SeenRoots::audit_span`] names the span not yet checked, and
//! [`SeenRoots::audited`] takes the root hashes an append-only proof over
//! that span verified. A server that showed this client a tree of its own
//! (a split view) cannot rejoin the tree everyone else sees without failing
//! that check.

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
    #[error("the directory's audit of epochs {start} to {end} does not match the roots this client saw: a split view")]
    AuditMismatch { start: u64, end: u64 },
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

/// The roots a client has accepted: the newest epoch, the root hash of
/// the most recent epochs, and how far they are known to be one
/// append-only chain. Keep one per client; an app persists
/// [`SeenRoots::checkpoint`] across restarts and passes it back with
/// [`SeenRoots::resuming_from`] (or only the epoch, to
/// [`SeenRoots::starting_at`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeenRoots {
    highest: u64,
    recent: std::collections::BTreeMap<u64, [u8; 32]>,
    /// The newest root proven to extend, append-only, the first root this
    /// client accepted (which is trusted on first use).
    audited: Option<(u64, [u8; 32])>,
}

/// Root hashes kept for fork detection.
const SEEN_ROOTS: usize = 1024;

impl SeenRoots {
    /// A client that has seen up to `epoch` before (0: nothing).
    pub fn starting_at(epoch: u64) -> SeenRoots {
        SeenRoots {
            highest: epoch,
            ..Default::default()
        }
    }

    /// A client whose roots up to `epoch` were one append-only chain
    /// ending in `root_hash` (a [`SeenRoots::checkpoint`]).
    pub fn resuming_from(epoch: u64, root_hash: [u8; 32]) -> SeenRoots {
        SeenRoots {
            highest: epoch,
            recent: [(epoch, root_hash)].into(),
            audited: Some((epoch, root_hash)),
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
        self.audited.get_or_insert((root.epoch, root.root_hash));
        while self.recent.len() > SEEN_ROOTS {
            self.recent.pop_first();
        }
        Ok(())
    }

    /// The newest epoch accepted.
    pub fn highest_epoch(&self) -> u64 {
        self.highest
    }

    /// The newest root known to extend every root before it: what an app
    /// persists.
    pub fn checkpoint(&self) -> Option<(u64, [u8; 32])> {
        self.audited
    }

    /// The epochs whose append-only proof this client still needs, at most
    /// `max_epochs` of them from the last audited root: None when every
    /// accepted root is audited.
    pub fn audit_span(&self, max_epochs: u64) -> Option<(u64, u64)> {
        let (from, _) = self.audited?;
        (self.highest > from).then(|| (from, self.highest.min(from + max_epochs.max(1))))
    }

    /// Checks the root hashes a directory lists for `start..=end` against
    /// the roots this client accepted: they must run without a gap, begin
    /// at the audited root and agree with every root seen in the span.
    /// Returns them in order, for the append-only proof to verify.
    pub fn audit_hashes(
        &self,
        start: u64,
        end: u64,
        listed: &[(u64, [u8; 32])],
    ) -> Result<Vec<[u8; 32]>, KtError> {
        let mismatch = KtError::AuditMismatch { start, end };
        let contiguous = end > start
            && listed.len() as u64 == end - start + 1
            && listed
                .iter()
                .zip(start..)
                .all(|((epoch, _), want)| *epoch == want);
        if !contiguous || self.audited.is_none_or(|(e, _)| e != start) {
            return Err(mismatch);
        }
        let agrees = |(epoch, hash): &(u64, [u8; 32])| {
            let audited = self.audited.filter(|(e, _)| e == epoch).map(|(_, h)| h);
            let seen = self.recent.get(epoch).copied();
            [audited, seen].into_iter().flatten().all(|h| h == *hash)
        };
        if !listed.iter().all(agrees) {
            return Err(mismatch);
        }
        Ok(listed.iter().map(|(_, h)| *h).collect())
    }

    /// Records that the roots up to `epoch` (whose hash is `root_hash`)
    /// were proven one append-only chain.
    pub fn audited(&mut self, epoch: u64, root_hash: [u8; 32]) {
        if self.audited.is_none_or(|(e, _)| e < epoch) {
            self.audited = Some((epoch, root_hash));
        }
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

/// Verifies that `handle_uri` has no value in the directory at `root`:
/// `vrf_proof` (80 bytes) proves the VRF label of the handle's first
/// version, and `proof` (akd protobuf `NonMembershipProof`) that no leaf
/// of the tree has that label.
pub fn verify_absence(
    anchor: &TrustAnchor,
    root: &SignedRoot,
    handle_uri: &str,
    vrf_proof: &[u8],
    proof: &[u8],
) -> Result<(), KtError> {
    use akd_core::configuration::Configuration;
    use akd_core::ecvrf::{Proof, VRFPublicKey};
    root.verify(anchor)?;
    let msg = pb::NonMembershipProof::parse_from_bytes(proof)
        .map_err(|e| KtError::ProofEncoding(e.to_string()))?;
    let absent = akd_core::NonMembershipProof::try_from(&msg)
        .map_err(|e| KtError::ProofEncoding(e.to_string()))?;
    // The label must be this handle's: the VRF proof verifies for the
    // handle's first version, and its output is the label.
    let bad_vrf = |e: String| KtError::Proof(format!("VRF: {e}"));
    let key = VRFPublicKey::try_from(anchor.vrf_public_key.as_slice())
        .map_err(|e| bad_vrf(e.to_string()))?;
    let input = KtConfig::get_hash_from_label_input(
        &AkdLabel(handle_uri.as_bytes().to_vec()),
        akd_core::VersionFreshness::Fresh,
        1,
    );
    let vrf = Proof::try_from(vrf_proof).map_err(|e| bad_vrf(e.to_string()))?;
    key.verify(&vrf, &input)
        .map_err(|e| bad_vrf(e.to_string()))?;
    if vrf_node_label(vrf_proof).ok_or_else(|| bad_vrf("no point".into()))?
        != absent.label.label_val
        || absent.label.label_len != 256
    {
        return Err(KtError::Proof(
            "the absence proof is for another label".into(),
        ));
    }
    // An empty tree (no epoch published yet) has no leaf at all; its root
    // is akd's empty-root constant, which no other tree hashes to.
    if root.root_hash == KtConfig::compute_root_hash_from_val(&KtConfig::empty_root_value()) {
        return Ok(());
    }
    // akd exposes its non-membership check under `public_tests` because
    // on its own it says nothing about whose label it is; with the VRF
    // check above it is akd's own `verify_nonexistence`.
    akd_core::verify::verify_nonmembership_for_tests_only::<KtConfig>(root.root_hash, &absent)
        .map_err(|e| KtError::Proof(e.to_string()))
}

/// The tree label a VRF proof (80 bytes: Gamma, c, s) stands for: the
/// first 32 bytes of ECVRF_proof_to_hash (RFC 9381 §5.2,
/// ECVRF-EDWARDS25519-SHA512-TAI, suite 0x03). None if Gamma is not a
/// curve point.
pub fn vrf_node_label(vrf_proof: &[u8]) -> Option<[u8; 32]> {
    use sha2::Digest;
    let gamma = curve25519_dalek::edwards::CompressedEdwardsY::from_slice(vrf_proof.get(..32)?)
        .ok()?
        .decompress()?;
    let out = sha2::Sha512::new()
        .chain_update([0x03, 0x03])
        .chain_update(gamma.mul_by_cofactor().compress().as_bytes())
        .chain_update([0x00])
        .finalize();
    out[..32].try_into().ok()
}

/// Encodes an akd non-membership proof for the wire.
pub fn encode_absence_proof(p: &akd_core::NonMembershipProof) -> Vec<u8> {
    pb::NonMembershipProof::from(p)
        .write_to_bytes()
        .expect("protobuf encoding of a non-membership proof")
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

/// The account key that `held` leads to through the endorsed rotations in
/// a handle's verified history (oldest first): the key a device holding
/// `held` should hold now; `held` itself if none follows it.
pub fn current_account_key(history: &[VerifiedValue], held: &crate::PublicKey) -> crate::PublicKey {
    let mut current = *held;
    for v in history.iter().rev() {
        if let DirectoryValue::Active(l) = &v.value {
            if l.rotated_from() == Some(&current) {
                current = l.list.account_key;
            }
        }
    }
    current
}

/// A device's check of its own handle's verified history: every value
/// published since `since_epoch` must be signed by `account_key`, or by a
/// key the account rotated to or from along an unbroken chain of
/// endorsements (a device removed elsewhere rotates the key; see
/// `device_list::Rotation`), and list only devices in `approved`. Returns
/// what did not hold, oldest first.
pub fn unapproved_changes(
    history: &[VerifiedValue],
    since_epoch: u64,
    account_key: &crate::PublicKey,
    approved: &[crate::DeviceId],
) -> Vec<Unapproved> {
    let oldest_first: Vec<&VerifiedValue> = history.iter().rev().collect();
    let rotated_from = |key: &crate::PublicKey| {
        oldest_first.iter().find_map(|v| match &v.value {
            DirectoryValue::Active(l) if l.list.account_key == *key => l.rotated_from().copied(),
            _ => None,
        })
    };
    // The key the chain that ends in the held key starts from.
    let mut current = *account_key;
    for _ in 0..oldest_first.len() {
        match rotated_from(&current) {
            Some(previous) => current = previous,
            None => break,
        }
    }
    let mut out = Vec::new();
    for v in oldest_first {
        let report = v.epoch >= since_epoch;
        match &v.value {
            DirectoryValue::Tombstone => {
                if report {
                    out.push(Unapproved::Tombstone { epoch: v.epoch });
                }
            }
            DirectoryValue::Active(l) => {
                if l.list.account_key != current {
                    if l.rotated_from() == Some(&current) {
                        current = l.list.account_key;
                    } else {
                        if report {
                            out.push(Unapproved::AccountKey { epoch: v.epoch });
                        }
                        continue;
                    }
                }
                if !report {
                    continue;
                }
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

    #[test]
    fn audits_cover_every_accepted_root_once() {
        let mut seen = SeenRoots::default();
        assert_eq!(seen.audit_span(100), None);
        seen.observe(&root(5, 1)).unwrap();
        // The first root is where audits start.
        assert_eq!(seen.checkpoint(), Some((5, [1; 32])));
        assert_eq!(seen.audit_span(100), None);
        seen.observe(&root(9, 2)).unwrap();
        seen.observe(&root(300, 3)).unwrap();
        assert_eq!(seen.audit_span(100), Some((5, 105)));
        let listed = |from: u64, to: u64| -> Vec<(u64, [u8; 32])> {
            (from..=to)
                .map(|e| {
                    let h = match e {
                        5 => 1,
                        9 => 2,
                        300 => 3,
                        _ => 0,
                    };
                    (e, [h; 32])
                })
                .collect()
        };
        let hashes = seen.audit_hashes(5, 105, &listed(5, 105)).unwrap();
        assert_eq!(hashes.len(), 101);
        seen.audited(105, hashes[100]);
        assert_eq!(seen.audit_span(100), Some((105, 205)));
        let mismatch = Err(KtError::AuditMismatch {
            start: 105,
            end: 205,
        });
        // A listing that skips an epoch, starts elsewhere or ends early.
        let mut gap = listed(105, 205);
        gap.remove(50);
        assert_eq!(seen.audit_hashes(105, 205, &gap), mismatch);
        assert_eq!(seen.audit_hashes(105, 205, &listed(104, 204)), mismatch);
        assert_eq!(seen.audit_hashes(105, 205, &listed(105, 204)), mismatch);
        // Another hash for the audited root, or for a root this client saw.
        let mut other = listed(105, 205);
        other[0].1 = [7; 32];
        assert_eq!(seen.audit_hashes(105, 205, &other), mismatch);
        seen.audited(205, [0; 32]);
        let mut other = listed(205, 300);
        other[95].1 = [7; 32];
        assert_eq!(
            seen.audit_hashes(205, 300, &other),
            Err(KtError::AuditMismatch {
                start: 205,
                end: 300
            })
        );
        seen.audit_hashes(205, 300, &listed(205, 300)).unwrap();
        seen.audited(300, [3; 32]);
        assert_eq!(seen.audit_span(100), None);
        // An older audit never moves the checkpoint back.
        seen.audited(200, [0; 32]);
        assert_eq!(seen.checkpoint(), Some((300, [3; 32])));
        // A checkpoint persisted across a restart is where audits resume.
        let mut again = SeenRoots::resuming_from(300, [3; 32]);
        assert_eq!(again.observe(&root(300, 4)), Err(KtError::ForkedRoot(300)));
        again.observe(&root(301, 5)).unwrap();
        assert_eq!(again.audit_span(100), Some((300, 301)));
    }

    proptest::proptest! {
        /// Whatever a server sends as an absence proof is refused or
        /// accepted without a panic, under a root the anchor did sign.
        #[test]
        fn absence_proofs_never_panic(
            hash in proptest::array::uniform32(proptest::prelude::any::<u8>()),
            vrf in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..100),
            proof in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
        ) {
            let rng = ring::rand::SystemRandom::new();
            let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
            let key = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
            let anchor = TrustAnchor {
                vrf_public_key: [9; 32].to_vec(),
                root_key: ring::signature::KeyPair::public_key(&key).as_ref().to_vec(),
            };
            let signed = SignedRoot {
                epoch: 3,
                root_hash: hash,
                signature: key.sign(&SignedRoot::signing_bytes(3, &hash)).as_ref().to_vec(),
            };
            let _ = verify_absence(&anchor, &signed, "mailto:a@example.com", &vrf, &proof);
            let _ = verify_lookup(&anchor, &signed, "mailto:a@example.com", &proof);
        }
    }

    #[test]
    fn a_rotation_endorsed_along_the_chain_is_approved() {
        use crate::device_list::{DeviceEntry, DeviceList};
        use crate::{DeviceId, SigningKey};
        let (k1, k2, thief) = (
            SigningKey::generate(),
            SigningKey::generate(),
            SigningKey::generate(),
        );
        let (a, b, c) = (DeviceId([1; 16]), DeviceId([2; 16]), DeviceId([3; 16]));
        let entry = |id| DeviceEntry {
            id,
            identity_key: SigningKey::generate().public(),
        };
        let list = |key: &SigningKey, seq, ids: &[DeviceId]| DeviceList {
            account_key: key.public(),
            seq,
            handles: vec!["mailto:a@example.com".into()],
            devices: ids.iter().map(|i| entry(*i)).collect(),
        };
        let at = |epoch, s| VerifiedValue {
            epoch,
            version: epoch,
            value: DirectoryValue::Active(s),
        };
        // k1 with devices a, b, c; c removed and the key rotated to k2.
        let mut history = vec![
            at(3, list(&k2, 2, &[a, b]).sign_rotated(&k2, &k1).unwrap()),
            at(1, list(&k1, 1, &[a, b, c]).sign(&k1).unwrap()),
        ];
        history.sort_by_key(|v| std::cmp::Reverse(v.epoch));
        // Device a holds k2 now, or still k1 (it has not fetched k2 yet).
        for held in [&k2, &k1] {
            assert_eq!(
                unapproved_changes(&history, 0, &held.public(), &[a, b, c]),
                vec![]
            );
        }
        // The removed device c kept k1 and endorses a key of its own; the
        // server publishes it. The rotation does not follow from k2.
        history.insert(
            0,
            at(
                5,
                list(&thief, 3, &[a, b]).sign_rotated(&thief, &k1).unwrap(),
            ),
        );
        assert_eq!(
            unapproved_changes(&history, 0, &k2.public(), &[a, b, c]),
            vec![Unapproved::AccountKey { epoch: 5 }]
        );
        // A device still holding k1 is led to k2, not to the later fork.
        assert_eq!(current_account_key(&history, &k1.public()), k2.public());
        assert_eq!(current_account_key(&history, &k2.public()), k2.public());
        // A key with no endorsement at all (a reset) is reported as before.
        let other = SigningKey::generate();
        let reset = vec![
            at(7, list(&other, 1, &[a]).sign(&other).unwrap()),
            at(3, list(&k2, 2, &[a, b]).sign_rotated(&k2, &k1).unwrap()),
        ];
        assert_eq!(
            unapproved_changes(&reset, 4, &k2.public(), &[a, b]),
            vec![Unapproved::AccountKey { epoch: 7 }]
        );
    }
}
