//! The directory's VRF key, prepared once, with a memo of recent proofs.
//!
//! akd's default key storage rebuilds the expanded key and the public key
//! (a base-point multiplication) on every call, and a lookup asks for each
//! of its three labels twice: first the tree label (a VRF evaluation), then
//! the proof (a VRF proof, which contains the evaluation). Here the key is
//! expanded once, a label is always derived from its proof, and the proofs
//! of the latest lookups are kept, so a lookup costs three proofs instead of
//! three evaluations, three proofs and six key expansions. Proofs are a
//! deterministic function of the key and the input, so the memo can never
//! answer differently from a fresh computation.
//!
//! A lookup of a label at version v needs three proofs: (fresh, v), (fresh,
//! the marker version) and (stale, v). Those depend only on the published
//! value state, so the publisher computes them once ([`VrfKey::lookup_proofs`])
//! and stores them beside the state; a lookup reads them with the state and
//! hands them back ([`VrfKey::remember`]) instead of proving anew.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use akd::configuration::Configuration;
use akd::ecvrf::{
    Proof, VRFExpandedPrivateKey, VRFKeyStorage, VRFPrivateKey, VRFPublicKey, VrfError,
};
use akd::{AkdLabel, AkdValue, NodeLabel, VersionFreshness};
use async_trait::async_trait;

use crate::error::Error;

/// Proofs held per generation; two generations are kept, so the memo holds
/// between `MEMO` and `2 * MEMO` proofs (~300 bytes each with the key and
/// label). A publish of up to `MEMO` labels finds the proofs it made when
/// it stores their lookup proofs.
const MEMO: usize = 65_536;

type Input = (Vec<u8>, VersionFreshness, u64);

/// An ECVRF-EDWARDS25519-SHA512-TAI proof: Gamma, c (16 bytes), s.
const PROOF_LENGTH: usize = 80;

/// One stored proof: the proof's bytes, then the node label it gives.
const STORED: usize = PROOF_LENGTH + 32;

/// The stored lookup proofs of one value state (see [`VrfKey::lookup_proofs`]).
pub const LOOKUP_PROOFS_LEN: usize = 3 * STORED;

/// The VRF private key, kept in the data directory.
#[derive(Clone)]
pub struct VrfKey(Arc<Inner>);

struct Inner {
    secret: [u8; 32],
    expanded: VRFExpandedPrivateKey,
    public: VRFPublicKey,
    memo: Mutex<Memo>,
}

/// A proof and the node label it gives.
type Proven = (Proof, NodeLabel);

#[derive(Default)]
struct Memo {
    young: HashMap<Input, Proven>,
    old: HashMap<Input, Proven>,
}

impl Memo {
    fn get(&self, input: &Input) -> Option<Proven> {
        self.young
            .get(input)
            .or_else(|| self.old.get(input))
            .copied()
    }

    fn put(&mut self, input: Input, proven: Proven) {
        if self.young.len() >= MEMO {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(input, proven);
    }
}

/// The three inputs a lookup of version `version` proves, in stored order.
fn lookup_inputs(version: u64) -> [(VersionFreshness, u64); 3] {
    let marker = 1u64 << version.max(1).ilog2();
    [
        (VersionFreshness::Fresh, version),
        (VersionFreshness::Fresh, marker),
        (VersionFreshness::Stale, version),
    ]
}

impl VrfKey {
    pub fn new(secret: [u8; 32]) -> Result<VrfKey, Error> {
        let key = VRFPrivateKey::try_from(&secret[..])
            .map_err(|e| Error::Internal(format!("VRF key: {e}")))?;
        Ok(VrfKey(Arc::new(Inner {
            secret,
            expanded: VRFExpandedPrivateKey::from(&key),
            public: VRFPublicKey::from(&key),
            memo: Mutex::default(),
        })))
    }

    fn memo(&self) -> std::sync::MutexGuard<'_, Memo> {
        // Every mutation is a single insert or swap: a panic cannot leave
        // the maps inconsistent.
        self.0.memo.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn proof<TC: Configuration>(
        &self,
        label: &AkdLabel,
        freshness: VersionFreshness,
        version: u64,
    ) -> Proven {
        let input = (label.0.clone(), freshness, version);
        if let Some(p) = self.memo().get(&input) {
            return p;
        }
        let alpha = TC::get_hash_from_label_input(label, freshness, version);
        let proof = self.0.expanded.prove(&self.0.public, &alpha);
        let proven = (
            proof,
            self.node_label::<TC>(proof, label, freshness, version),
        );
        self.memo().put(input, proven);
        proven
    }

    /// The node label `proof` (for this input) gives. akd offers this only
    /// as an async method that never waits, so it is polled once; were it
    /// ever to wait, the label is computed from the input instead.
    fn node_label<TC: Configuration>(
        &self,
        proof: Proof,
        label: &AkdLabel,
        freshness: VersionFreshness,
        version: u64,
    ) -> NodeLabel {
        use std::future::Future;
        use std::task::{Context, Poll, Waker};
        let mut from_proof = std::pin::pin!(self.get_node_label_from_vrf_proof(proof));
        match from_proof
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
        {
            Poll::Ready(node) => node,
            Poll::Pending => Self::get_node_label_with_expanded_key::<TC>(
                &self.0.expanded,
                &self.0.public,
                label,
                freshness,
                version,
            ),
        }
    }

    /// The proofs a lookup of `label` at `version` needs, with their node
    /// labels, for storing beside the value state.
    pub fn lookup_proofs<TC: Configuration>(
        &self,
        label: &AkdLabel,
        version: u64,
    ) -> [u8; LOOKUP_PROOFS_LEN] {
        let mut out = [0u8; LOOKUP_PROOFS_LEN];
        for ((freshness, v), slot) in lookup_inputs(version)
            .into_iter()
            .zip(out.chunks_exact_mut(STORED))
        {
            let (proof, node) = self.proof::<TC>(label, freshness, v);
            slot[..PROOF_LENGTH].copy_from_slice(&proof.to_bytes());
            slot[PROOF_LENGTH..].copy_from_slice(&node.label_val);
        }
        out
    }

    /// Takes back what [`VrfKey::lookup_proofs`] made for `label` at
    /// `version`, so the lookup about to run finds its proofs made. Bytes
    /// that are not such a record are ignored (the lookup proves anew).
    pub fn remember(&self, label: &AkdLabel, version: u64, stored: &[u8]) {
        if stored.len() != LOOKUP_PROOFS_LEN {
            return;
        }
        let mut parsed = Vec::with_capacity(3);
        for ((freshness, v), slot) in lookup_inputs(version)
            .into_iter()
            .zip(stored.chunks_exact(STORED))
        {
            let Ok(proof) = Proof::try_from(&slot[..PROOF_LENGTH]) else {
                return;
            };
            let mut node = [0u8; 32];
            node.copy_from_slice(&slot[PROOF_LENGTH..]);
            parsed.push((
                (label.0.clone(), freshness, v),
                (proof, NodeLabel::new(node, 256)),
            ));
        }
        let mut memo = self.memo();
        for (input, proven) in parsed {
            memo.put(input, proven);
        }
    }
}

impl std::fmt::Debug for VrfKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VrfKey(…)")
    }
}

#[async_trait]
impl VRFKeyStorage for VrfKey {
    async fn retrieve(&self) -> Result<Vec<u8>, VrfError> {
        Ok(self.0.secret.to_vec())
    }

    async fn get_vrf_public_key(&self) -> Result<VRFPublicKey, VrfError> {
        Ok(self.0.public.clone())
    }

    async fn get_node_label<TC: Configuration>(
        &self,
        label: &AkdLabel,
        freshness: VersionFreshness,
        version: u64,
    ) -> Result<NodeLabel, VrfError> {
        Ok(self.proof::<TC>(label, freshness, version).1)
    }

    /// A publish asks for the labels of every changed leaf at once; they
    /// are proved on every core, and kept for storing the lookup proofs.
    async fn get_node_labels<TC: Configuration>(
        &self,
        labels: &[(AkdLabel, VersionFreshness, u64, AkdValue)],
    ) -> Result<Vec<((AkdLabel, VersionFreshness, u64, AkdValue), NodeLabel)>, VrfError> {
        let key = self.clone();
        on_every_core(
            labels.to_vec(),
            move |(label, freshness, version, value)| {
                let node = key.proof::<TC>(&label, freshness, version).1;
                ((label, freshness, version, value), node)
            },
        )
        .await
        .map_err(|e| VrfError::SigningKey(format!("VRF worker: {e}")))
    }

    async fn get_label_proof<TC: Configuration>(
        &self,
        label: &AkdLabel,
        freshness: VersionFreshness,
        version: u64,
    ) -> Result<Proof, VrfError> {
        Ok(self.proof::<TC>(label, freshness, version).0)
    }
}

/// `f` over `items`, in order, spread over the blocking pool one chunk per
/// core (inline when there are few).
pub async fn on_every_core<T, R, F>(items: Vec<T>, f: F) -> Result<Vec<R>, tokio::task::JoinError>
where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(T) -> R + Send + Sync + 'static,
{
    const INLINE: usize = 16;
    if items.len() <= INLINE {
        return Ok(items.into_iter().map(f).collect());
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = items.len().div_ceil(cores);
    let f = Arc::new(f);
    let mut items = items.into_iter();
    let mut chunks = Vec::new();
    loop {
        let chunk: Vec<T> = items.by_ref().take(per).collect();
        if chunk.is_empty() {
            break;
        }
        let f = f.clone();
        chunks.push(tokio::task::spawn_blocking(move || {
            chunk.into_iter().map(|t| f(t)).collect::<Vec<R>>()
        }));
    }
    let mut out = Vec::new();
    for c in chunks {
        out.extend(c.await?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::transparency::KtConfig;

    /// A plain key storage: akd's own default methods.
    #[derive(Clone)]
    struct Plain([u8; 32]);

    impl Plain {
        /// akd's own proof (as bytes) and node label for an input.
        async fn says(
            &self,
            label: &AkdLabel,
            fresh: VersionFreshness,
            version: u64,
        ) -> ([u8; PROOF_LENGTH], NodeLabel) {
            let p = self
                .get_label_proof::<KtConfig>(label, fresh, version)
                .await
                .unwrap();
            let n = self
                .get_node_label::<KtConfig>(label, fresh, version)
                .await
                .unwrap();
            (p.to_bytes(), n)
        }
    }

    #[async_trait]
    impl VRFKeyStorage for Plain {
        async fn retrieve(&self) -> Result<Vec<u8>, VrfError> {
            Ok(self.0.to_vec())
        }
    }

    #[tokio::test]
    async fn labels_and_proofs_match_akds_own_computation_memoised_or_not() {
        let ours = VrfKey::new([9; 32]).unwrap();
        let plain = Plain([9; 32]);
        let pk = plain.get_vrf_public_key().await.unwrap();
        assert_eq!(
            ours.get_vrf_public_key().await.unwrap().to_bytes(),
            pk.to_bytes()
        );
        for round in 0..2 {
            for (i, fresh) in [
                (1u64, VersionFreshness::Fresh),
                (2, VersionFreshness::Stale),
            ] {
                let label = AkdLabel(format!("mailto:user{i}@example.com").into_bytes());
                let (q, b) = plain.says(&label, fresh, i).await;
                let a = ours
                    .get_node_label::<KtConfig>(&label, fresh, i)
                    .await
                    .unwrap();
                assert_eq!(a, b, "label, round {round}");
                let p = ours
                    .get_label_proof::<KtConfig>(&label, fresh, i)
                    .await
                    .unwrap();
                assert_eq!(p.to_bytes(), q, "proof, round {round}");
                let alpha = KtConfig::get_hash_from_label_input(&label, fresh, i);
                pk.verify(&p, &alpha).unwrap();
            }
        }
        // Stored lookup proofs, taken back by another instance of the key,
        // answer as proving would; bytes of the wrong size are ignored.
        let label = AkdLabel(b"mailto:stored@example.com".to_vec());
        for version in [1u64, 2, 3, 6] {
            let stored = ours.lookup_proofs::<KtConfig>(&label, version);
            let other = VrfKey::new([9; 32]).unwrap();
            other.remember(&label, version, &stored[1..]);
            assert!(other.memo().young.is_empty(), "a short record was taken");
            other.remember(&label, version, &stored);
            let distinct: std::collections::HashSet<_> =
                lookup_inputs(version).into_iter().collect();
            assert_eq!(other.memo().young.len(), distinct.len());
            for (fresh, v) in lookup_inputs(version) {
                let remembered = other.memo().get(&(label.0.clone(), fresh, v)).unwrap();
                let (p, n) = plain.says(&label, fresh, v).await;
                assert_eq!(remembered.0.to_bytes(), p, "v{version} {fresh:?} {v}");
                assert_eq!(remembered.1, n, "v{version} {fresh:?} {v}");
            }
        }
        assert_eq!(
            lookup_inputs(6),
            [
                (VersionFreshness::Fresh, 6),
                (VersionFreshness::Fresh, 4),
                (VersionFreshness::Stale, 6)
            ]
        );
        // A publish's batch of labels (proved on the blocking pool) matches.
        let batch: Vec<_> = (0..40u64)
            .map(|i| {
                (
                    AkdLabel(format!("tel:+1555000{i:04}").into_bytes()),
                    VersionFreshness::Fresh,
                    i + 1,
                    AkdValue(vec![]),
                )
            })
            .collect();
        let got = ours.get_node_labels::<KtConfig>(&batch).await.unwrap();
        assert_eq!(got.len(), batch.len());
        for ((input, node), want) in got.iter().zip(&batch) {
            assert_eq!(input, want, "order kept");
            let n = plain
                .get_node_label::<KtConfig>(&want.0, want.1, want.2)
                .await
                .unwrap();
            assert_eq!(*node, n);
        }
        // Past two generations the memo forgets, and still answers right.
        let p = ours.proof::<KtConfig>(&AkdLabel(b"x".to_vec()), VersionFreshness::Fresh, 1);
        let mut m = ours.memo();
        for v in 0..(2 * MEMO as u64 + 10) {
            m.put((b"y".to_vec(), VersionFreshness::Fresh, v), p);
        }
        assert!(m.young.len() + m.old.len() <= 2 * MEMO);
    }
}
