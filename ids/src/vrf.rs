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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use akd::configuration::Configuration;
use akd::ecvrf::{
    Proof, VRFExpandedPrivateKey, VRFKeyStorage, VRFPrivateKey, VRFPublicKey, VrfError,
};
use akd::{AkdLabel, NodeLabel, VersionFreshness};
use async_trait::async_trait;

use crate::error::Error;

/// Proofs held per generation; two generations are kept, so the memo holds
/// between `MEMO` and `2 * MEMO` proofs (~200 bytes each with the key).
const MEMO: usize = 4096;

type Input = (Vec<u8>, VersionFreshness, u64);

/// The VRF private key, kept in the data directory.
#[derive(Clone)]
pub struct VrfKey(Arc<Inner>);

struct Inner {
    secret: [u8; 32],
    expanded: VRFExpandedPrivateKey,
    public: VRFPublicKey,
    memo: Mutex<Memo>,
}

#[derive(Default)]
struct Memo {
    young: HashMap<Input, Proof>,
    old: HashMap<Input, Proof>,
}

impl Memo {
    fn get(&self, input: &Input) -> Option<Proof> {
        self.young
            .get(input)
            .or_else(|| self.old.get(input))
            .copied()
    }

    fn put(&mut self, input: Input, proof: Proof) {
        if self.young.len() >= MEMO {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(input, proof);
    }
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
    ) -> Proof {
        let input = (label.0.clone(), freshness, version);
        if let Some(p) = self.memo().get(&input) {
            return p;
        }
        let alpha = TC::get_hash_from_label_input(label, freshness, version);
        let proof = self.0.expanded.prove(&self.0.public, &alpha);
        self.memo().put(input, proof);
        proof
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
        let proof = self.proof::<TC>(label, freshness, version);
        Ok(self.get_node_label_from_vrf_proof(proof).await)
    }

    async fn get_label_proof<TC: Configuration>(
        &self,
        label: &AkdLabel,
        freshness: VersionFreshness,
        version: u64,
    ) -> Result<Proof, VrfError> {
        Ok(self.proof::<TC>(label, freshness, version))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::transparency::KtConfig;

    /// A plain key storage: akd's own default methods.
    #[derive(Clone)]
    struct Plain([u8; 32]);

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
                let a = ours
                    .get_node_label::<KtConfig>(&label, fresh, i)
                    .await
                    .unwrap();
                let b = plain
                    .get_node_label::<KtConfig>(&label, fresh, i)
                    .await
                    .unwrap();
                assert_eq!(a, b, "label, round {round}");
                let p = ours
                    .get_label_proof::<KtConfig>(&label, fresh, i)
                    .await
                    .unwrap();
                let q = plain
                    .get_label_proof::<KtConfig>(&label, fresh, i)
                    .await
                    .unwrap();
                assert_eq!(p.to_bytes(), q.to_bytes(), "proof, round {round}");
                let alpha = KtConfig::get_hash_from_label_input(&label, fresh, i);
                pk.verify(&p, &alpha).unwrap();
            }
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
