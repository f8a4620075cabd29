//! The key transparency directory: akd on our own sqlx storage.
//!
//! akd keeps three kinds of records: the tree header (`Azks`), tree nodes
//! and per-label value states. Records go in `akd_records` keyed by akd's
//! binary id; value states go in `akd_states` keyed by (label, epoch) so the
//! version queries akd needs are indexed SQL. Both hold the record's
//! bincode encoding. Beside each label's latest state, `akd_lookup_vrf`
//! keeps the VRF proofs a lookup of it needs (see `vrf.rs`), read in the
//! same query as the state. Writes of one publish land in one SQL
//! transaction.

use std::collections::HashMap;

use akd::errors::StorageError;
use akd::storage::types::{
    DbRecord, KeyData, StorageType, ValueState, ValueStateKey, ValueStateRetrievalFlag,
};
use akd::storage::{Database, DbSetState, Storable, StorageManager};
use akd::{AkdLabel, AkdValue, AzksParallelismConfig, Directory, EpochHash};
use async_trait::async_trait;
use ring::signature::{Ed25519KeyPair, KeyPair};
use sqlx::Row;
use wire::transparency::{KtConfig, SignedRoot, TrustAnchor};

use crate::error::Error;
use crate::record_cache::RecordCache;
use crate::store::Store;

/// akd storage backed by the service's database.
#[derive(Clone, Debug)]
pub struct SqlDatabase {
    store: Store,
    cache: std::sync::Arc<RecordCache>,
    vrf: VrfKey,
    /// Whether [`SqlDatabase::warm`] has run (it runs once).
    warmed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Who may write the tree: see [`Fence`].
    fence: std::sync::Arc<std::sync::Mutex<Fence>>,
}

/// The publisher lease a write must hold. Once the directory is open,
/// every write (an epoch) checks in its own transaction that the lease is
/// still this node's at the term it took, and locks the lease row until
/// it commits: a publisher that lost the lease (paused past its expiry,
/// partitioned) cannot write an epoch after another took over.
#[derive(Debug, Default)]
struct Fence {
    required: bool,
    holder: String,
    term: Option<i64>,
}

fn se(e: impl std::fmt::Display) -> StorageError {
    StorageError::Connection(e.to_string())
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, StorageError> {
    bincode::serialize(v).map_err(|e| StorageError::Other(e.to_string()))
}

fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, StorageError> {
    bincode::deserialize(b).map_err(|e| StorageError::Other(e.to_string()))
}

const STATE_COLUMNS: &str = "SELECT data FROM akd_states WHERE label = $1";
/// The publisher lease: renewed every publish interval (2 s by default),
/// so a dead publisher's lease has run out, and another node has taken
/// it, within 9 s.
const DEFAULT_LEASE: std::time::Duration = std::time::Duration::from_secs(7);
/// Epochs whose changed records stay noted in `akd_changes`: a node
/// further behind than this reloads its cache instead.
const CHANGES_KEPT: i64 = 1000;

impl SqlDatabase {
    /// `cached_records`: how many tree records to keep in memory. `vrf`
    /// is the directory's key, for the lookup proofs stored at publish.
    pub fn new(store: Store, cached_records: usize, vrf: VrfKey) -> SqlDatabase {
        SqlDatabase {
            store,
            cache: std::sync::Arc::new(RecordCache::new(cached_records)),
            vrf,
            warmed: Default::default(),
            fence: Default::default(),
        }
    }

    fn fence(&self) -> std::sync::MutexGuard<'_, Fence> {
        self.fence.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads tree records into the cache in id order until it is full or
    /// every record is in; returns how many it holds. A chunk read while a
    /// publish committed is read again. Only the first call reads.
    async fn warm(&self) -> Result<usize, StorageError> {
        const CHUNK: i64 = 10_000;
        if self.warmed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Ok(self.cache.len());
        }
        let mut after: Vec<u8> = Vec::new();
        let mut retries = 0;
        while !self.cache.is_full() {
            let ticket = self.cache.ticket();
            let rows =
                sqlx::query("SELECT id, data FROM akd_records WHERE id > $1 ORDER BY id LIMIT $2")
                    .bind(after.clone())
                    .bind(CHUNK)
                    .fetch_all(self.store.pool())
                    .await
                    .map_err(se)?;
            let Some(last) = rows.last() else { break };
            let last: Vec<u8> = last.get(0);
            let records = rows
                .iter()
                .map(|r| Ok((r.get::<Vec<u8>, _>(0), decode(&r.get::<Vec<u8>, _>(1))?)))
                .collect::<Result<Vec<_>, StorageError>>()?;
            if self.cache.fill(ticket, records) {
                after = last;
                retries = 0;
            } else {
                retries += 1;
                if retries > 100 {
                    return Err(StorageError::Other(
                        "publishes kept racing the cache warm-up".into(),
                    ));
                }
            }
        }
        Ok(self.cache.len())
    }

    /// The latest state of `label` at or before `epoch`, for a lookup: its
    /// stored lookup proofs, read in the same query, go to the VRF key.
    async fn state_for_lookup(
        &self,
        label: &AkdLabel,
        epoch: u64,
    ) -> Result<Option<ValueState>, StorageError> {
        let row = sqlx::query(
            "SELECT s.data, v.proofs FROM akd_states s
             LEFT JOIN akd_lookup_vrf v ON v.label = s.label AND v.epoch = s.epoch
             WHERE s.label = $1 AND s.epoch <= $2 ORDER BY s.epoch DESC LIMIT 1",
        )
        .bind(label.0.clone())
        .bind(epoch as i64)
        .fetch_optional(self.store.pool())
        .await
        .map_err(se)?;
        let Some(row) = row else { return Ok(None) };
        let state = decode::<ValueState>(&row.get::<Vec<u8>, _>(0))?;
        if let Some(proofs) = row.get::<Option<Vec<u8>>, _>(1) {
            self.vrf.remember(label, state.version, &proofs);
        }
        Ok(Some(state))
    }

    /// One state of `label`, chosen as akd's flag says.
    async fn state(
        &self,
        label: &AkdLabel,
        flag: ValueStateRetrievalFlag,
    ) -> Result<Option<ValueState>, StorageError> {
        let (tail, arg) = match flag {
            ValueStateRetrievalFlag::MaxEpoch => ("ORDER BY epoch DESC LIMIT 1", None),
            ValueStateRetrievalFlag::MinEpoch => ("ORDER BY epoch ASC LIMIT 1", None),
            ValueStateRetrievalFlag::SpecificEpoch(e) => ("AND epoch = $2", Some(e as i64)),
            ValueStateRetrievalFlag::SpecificVersion(v) => ("AND version = $2", Some(v as i64)),
            ValueStateRetrievalFlag::LeqEpoch(e) => (
                "AND epoch <= $2 ORDER BY epoch DESC LIMIT 1",
                Some(e as i64),
            ),
        };
        let sql = format!("{STATE_COLUMNS} {tail}");
        let mut q = sqlx::query(&sql).bind(label.0.clone());
        if let Some(a) = arg {
            q = q.bind(a);
        }
        let row = q.fetch_optional(self.store.pool()).await.map_err(se)?;
        row.map(|r| decode::<ValueState>(&r.get::<Vec<u8>, _>(0)))
            .transpose()
    }
}

#[async_trait]
impl Database for SqlDatabase {
    async fn set(&self, record: DbRecord) -> Result<(), StorageError> {
        self.batch_set(vec![record], DbSetState::General).await
    }

    async fn batch_set(
        &self,
        records: Vec<DbRecord>,
        _state: DbSetState,
    ) -> Result<(), StorageError> {
        // Multi-row upserts: a publish writes a few records per changed
        // leaf, and one statement per record made it row-at-a-time.
        const ROWS: usize = 200;
        let mut states = Vec::new();
        let mut others = Vec::new();
        for r in &records {
            match r {
                DbRecord::ValueState(s) => states.push(s),
                other => others.push(other),
            }
        }
        // The lookup proofs of each label's newest state, proved on every
        // core before the transaction opens.
        let mut newest: HashMap<&[u8], &ValueState> = HashMap::new();
        for s in &states {
            let e = newest.entry(&s.username.0).or_insert(s);
            if e.epoch < s.epoch {
                *e = s;
            }
        }
        let newest: Vec<&ValueState> = newest.into_values().collect();
        let vrf = self.vrf.clone();
        let proofs = crate::vrf::on_every_core(
            newest
                .iter()
                .map(|s| (s.username.clone(), s.version))
                .collect(),
            move |(label, version)| vrf.lookup_proofs::<KtConfig>(&label, version),
        )
        .await
        .map_err(se)?;
        let mut tx = self.store.begin().await.map_err(se)?;
        let fence = {
            let f = self.fence();
            f.required.then(|| (f.holder.clone(), f.term))
        };
        if let Some((holder, term)) = fence {
            // A no-op update: it checks the lease and locks its row. Not
            // its expiry: only another node's takeover (a new term) makes a
            // write unsafe, and a long publish may outlast the lease.
            let held = sqlx::query(
                "UPDATE kt_lease SET term = term WHERE id = 1 AND holder = $1 AND term = $2",
            )
            .bind(holder)
            .bind(term.unwrap_or(-1))
            .execute(&mut *tx)
            .await
            .map_err(se)?;
            if held.rows_affected() != 1 {
                return Err(StorageError::Other(
                    "this node no longer holds the publisher lease".into(),
                ));
            }
        }
        for (chunk, proofs) in newest.chunks(ROWS).zip(proofs.chunks(ROWS)) {
            let sql = format!(
                "INSERT INTO akd_lookup_vrf (label, epoch, proofs) VALUES {}
                 ON CONFLICT (label) DO UPDATE SET epoch = excluded.epoch, proofs = excluded.proofs",
                placeholders(chunk.len(), 3)
            );
            let mut q = sqlx::query(&sql);
            for (s, p) in chunk.iter().zip(proofs) {
                q = q
                    .bind(s.username.0.clone())
                    .bind(s.epoch as i64)
                    .bind(p.to_vec());
            }
            q.execute(&mut *tx).await.map_err(se)?;
        }
        for chunk in states.chunks(ROWS) {
            let sql = format!(
                "INSERT INTO akd_states (label, epoch, version, data) VALUES {}
                 ON CONFLICT (label, epoch) DO UPDATE SET version = excluded.version, data = excluded.data",
                placeholders(chunk.len(), 4)
            );
            let mut q = sqlx::query(&sql);
            for s in chunk {
                q = q
                    .bind(s.username.0.clone())
                    .bind(s.epoch as i64)
                    .bind(s.version as i64)
                    .bind(encode(*s)?);
            }
            q.execute(&mut *tx).await.map_err(se)?;
        }
        for chunk in others.chunks(ROWS) {
            let sql = format!(
                "INSERT INTO akd_records (id, data) VALUES {}
                 ON CONFLICT (id) DO UPDATE SET data = excluded.data",
                placeholders(chunk.len(), 2)
            );
            let mut q = sqlx::query(&sql);
            for r in chunk {
                q = q.bind(r.get_full_binary_id()).bind(encode(*r)?);
            }
            q.execute(&mut *tx).await.map_err(se)?;
        }
        // A publish commits the tree with its new Azks record: note which
        // records the epoch changed, so the other nodes refresh just
        // those (see `Transparency::follow`).
        let epoch = others.iter().find_map(|r| match r {
            DbRecord::Azks(a) => Some(a.latest_epoch as i64),
            _ => None,
        });
        if let Some(epoch) = epoch {
            for chunk in others.chunks(ROWS) {
                let sql = format!(
                    "INSERT INTO akd_changes (epoch, id) VALUES {} ON CONFLICT DO NOTHING",
                    placeholders(chunk.len(), 2)
                );
                let mut q = sqlx::query(&sql);
                for r in chunk {
                    q = q.bind(epoch).bind(r.get_full_binary_id());
                }
                q.execute(&mut *tx).await.map_err(se)?;
            }
            sqlx::query("DELETE FROM akd_changes WHERE epoch <= $1")
                .bind(epoch - CHANGES_KEPT)
                .execute(&mut *tx)
                .await
                .map_err(se)?;
        }
        tx.commit().await.map_err(se)?;
        self.cache.committed(others);
        Ok(())
    }

    async fn get<St: Storable>(&self, id: &St::StorageKey) -> Result<DbRecord, StorageError> {
        let bin = St::get_full_binary_key_id(id);
        if St::data_type() == StorageType::ValueState {
            let ValueStateKey(label, epoch) =
                ValueState::key_from_full_binary(&bin).map_err(StorageError::Other)?;
            return self
                .state(
                    &AkdLabel(label),
                    ValueStateRetrievalFlag::SpecificEpoch(epoch),
                )
                .await?
                .map(DbRecord::ValueState)
                .ok_or_else(|| StorageError::NotFound(format!("ValueState {id:?}")));
        }
        let ticket = match self.cache.get(&bin) {
            Ok(hit) => return Ok(hit),
            Err(t) => t,
        };
        let row = sqlx::query("SELECT data FROM akd_records WHERE id = $1")
            .bind(bin.clone())
            .fetch_optional(self.store.pool())
            .await
            .map_err(se)?
            .ok_or_else(|| StorageError::NotFound(format!("{:?} {id:?}", St::data_type())))?;
        let record: DbRecord = decode(&row.get::<Vec<u8>, _>(0))?;
        self.cache.fill(ticket, [(bin, record.clone())]);
        Ok(record)
    }

    async fn batch_get<St: Storable>(
        &self,
        ids: &[St::StorageKey],
    ) -> Result<Vec<DbRecord>, StorageError> {
        if St::data_type() == StorageType::ValueState {
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                if let Ok(r) = self.get::<St>(id).await {
                    out.push(r);
                }
            }
            return Ok(out);
        }
        let ticket = self.cache.ticket();
        let mut out = Vec::with_capacity(ids.len());
        let mut missing = Vec::new();
        for id in ids {
            let bin = St::get_full_binary_key_id(id);
            match self.cache.get(&bin) {
                Ok(hit) => out.push(hit),
                Err(_) => missing.push(bin),
            }
        }
        let mut found = Vec::new();
        for chunk in missing.chunks(500) {
            let sql = format!(
                "SELECT id, data FROM akd_records WHERE id IN ({})",
                (1..=chunk.len())
                    .map(|i| format!("${i}"))
                    .collect::<Vec<_>>()
                    .join(",")
            );
            let mut q = sqlx::query(&sql);
            for bin in chunk {
                q = q.bind(bin.clone());
            }
            for row in q.fetch_all(self.store.pool()).await.map_err(se)? {
                let record: DbRecord = decode(&row.get::<Vec<u8>, _>(1))?;
                found.push((row.get::<Vec<u8>, _>(0), record));
            }
        }
        out.extend(found.iter().map(|(_, r)| r.clone()));
        self.cache.fill(ticket, found);
        Ok(out)
    }

    async fn get_user_data(&self, username: &AkdLabel) -> Result<KeyData, StorageError> {
        let rows = sqlx::query(&format!("{STATE_COLUMNS} ORDER BY epoch"))
            .bind(username.0.clone())
            .fetch_all(self.store.pool())
            .await
            .map_err(se)?;
        if rows.is_empty() {
            return Err(StorageError::NotFound(format!("ValueState {username:?}")));
        }
        let states = rows
            .iter()
            .map(|r| decode::<ValueState>(&r.get::<Vec<u8>, _>(0)))
            .collect::<Result<_, _>>()?;
        Ok(KeyData { states })
    }

    /// One state of one label. akd asks for the latest at or before an
    /// epoch when it builds a lookup proof (and only then one at a time).
    async fn get_user_state(
        &self,
        username: &AkdLabel,
        flag: ValueStateRetrievalFlag,
    ) -> Result<ValueState, StorageError> {
        let state = match flag {
            ValueStateRetrievalFlag::LeqEpoch(e) => self.state_for_lookup(username, e).await?,
            _ => self.state(username, flag).await?,
        };
        state.ok_or_else(|| StorageError::NotFound(format!("ValueState {username:?}")))
    }

    async fn get_user_state_versions(
        &self,
        usernames: &[AkdLabel],
        flag: ValueStateRetrievalFlag,
    ) -> Result<HashMap<AkdLabel, (u64, AkdValue)>, StorageError> {
        let mut map = HashMap::new();
        for u in usernames {
            if let Some(s) = self.state(u, flag).await? {
                map.insert(u.clone(), (s.version, s.value));
            }
        }
        Ok(map)
    }
}

/// `($1, $2), ($3, $4), …` for `rows` rows of `cols` values.
fn placeholders(rows: usize, cols: usize) -> String {
    (0..rows)
        .map(|r| {
            let vals: Vec<String> = (1..=cols).map(|c| format!("${}", r * cols + c)).collect();
            format!("({})", vals.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

pub use crate::vrf::VrfKey;

/// A lookup answer: the proof (akd protobuf), the value it proves (the
/// directory value, unverified here; clients verify) and the signed root.
#[derive(Debug, Clone)]
pub struct Proven {
    pub proof: Vec<u8>,
    pub value: Vec<u8>,
    pub root: SignedRoot,
}

/// Proof that a label has no value at `root`: the VRF proof of its first
/// version's tree label, and a non-membership proof of that label
/// (`wire::transparency::verify_absence`).
#[derive(Debug, Clone)]
pub struct Absence {
    pub vrf_proof: Vec<u8>,
    pub proof: Vec<u8>,
    pub root: SignedRoot,
}

/// What a lookup proves.
#[derive(Debug, Clone)]
pub enum Looked {
    Found(Proven),
    Absent(Absence),
}

/// The directory plus the key that signs its epoch roots.
pub struct Transparency {
    dir: Directory<KtConfig, SqlDatabase, VrfKey>,
    /// The directory's storage and VRF key, for the absence proofs akd's
    /// `Directory` does not make.
    manager: StorageManager<SqlDatabase>,
    vrf: VrfKey,
    /// The same storage as `dir`'s (the record cache is shared).
    db: SqlDatabase,
    store: Store,
    root_key: Ed25519KeyPair,
    anchor: TrustAnchor,
    /// akd lets proofs be built while an epoch is being published: a reader
    /// that started at epoch N finds epoch N's version of every tree node
    /// beside the new one. It keeps only one previous version, so a reader
    /// must not span two publishes. Proof builders hold this lock shared;
    /// each publish first takes it exclusively for an instant, waiting out
    /// the readers that started before the previous publish.
    readers: tokio::sync::RwLock<()>,
    /// akd allows one writer at a time.
    publishing: tokio::sync::Mutex<()>,
    /// The newest signed root seen: every lookup answers with the root
    /// of the current epoch, and a root never changes once signed.
    latest_root: std::sync::Mutex<Option<SignedRoot>>,
    /// How long the publisher lease lasts unless renewed.
    lease: std::time::Duration,
    /// The newest epoch this node knows of; another node's publish past it
    /// refreshes the cached tree records it changed.
    seen_epoch: std::sync::atomic::AtomicU64,
    /// Times this node took the publisher lease (its first included).
    takeovers: std::sync::atomic::AtomicU64,
    /// Tree records refreshed from other nodes' epochs.
    refreshed: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Transparency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transparency").finish_non_exhaustive()
    }
}

impl Transparency {
    /// `root_key_pkcs8` is an Ed25519 PKCS#8 document.
    pub async fn open(
        store: Store,
        vrf: VrfKey,
        root_key_pkcs8: &[u8],
    ) -> Result<Transparency, Error> {
        let root_key = Ed25519KeyPair::from_pkcs8(root_key_pkcs8)
            .map_err(|_| Error::Config("KT root key is not an Ed25519 PKCS#8 document".into()))?;
        // Not akd's cache: it takes a new epoch, tree header included,
        // before the database has the epoch's value states, and a proof
        // built in that gap does not verify. SqlDatabase caches tree records
        // only after they commit (record_cache.rs).
        let db = SqlDatabase::new(store.clone(), 4_000_000, vrf.clone());
        let manager = StorageManager::new_no_cache(db.clone());
        let dir = Directory::<KtConfig, _, _>::new(
            manager.clone(),
            vrf.clone(),
            AzksParallelismConfig::default(),
        )
        .await
        .map_err(dir_err)?;
        let vrf_pk = dir.get_public_key().await.map_err(dir_err)?;
        let anchor = TrustAnchor {
            vrf_public_key: vrf_pk.to_bytes().to_vec(),
            root_key: root_key.public_key().as_ref().to_vec(),
        };
        let t = Transparency {
            dir,
            manager,
            vrf,
            db,
            store,
            root_key,
            anchor,
            readers: tokio::sync::RwLock::new(()),
            publishing: tokio::sync::Mutex::new(()),
            latest_root: std::sync::Mutex::new(None),
            lease: DEFAULT_LEASE,
            seen_epoch: Default::default(),
            takeovers: Default::default(),
            refreshed: Default::default(),
        };
        // Sign the current root if this epoch has none yet (a new directory,
        // or a crash between publish and signing).
        let EpochHash(epoch, hash) = t.dir.get_epoch_hash().await.map_err(dir_err)?;
        if t.store.root(epoch).await?.is_none() {
            t.sign_root(epoch, hash).await?;
        }
        t.seen_epoch
            .store(epoch, std::sync::atomic::Ordering::SeqCst);
        // From now on only the lease holder writes the tree.
        let mut random = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random)
            .map_err(|_| Error::Internal("no system randomness".into()))?;
        {
            let mut f = t.db.fence();
            f.required = true;
            f.holder = wire::keys::hex(&random);
        }
        Ok(t)
    }

    /// Names this node in the publisher lease (default: random per
    /// process). A node restarted with its name takes the lease back at
    /// once instead of waiting out its previous run's; two running nodes
    /// must never share one.
    pub fn with_node(self, node: &str) -> Transparency {
        self.db.fence().holder = node.to_owned();
        self
    }

    /// How long the publisher lease lasts unless renewed (default 7 s):
    /// when the publisher dies, another node takes over within this and
    /// one publish interval.
    pub fn with_lease(mut self, lease: std::time::Duration) -> Transparency {
        self.lease = lease;
        self
    }

    /// Keeps or takes the publisher lease; whether this node publishes.
    /// A node that takes it over first catches up with what the last
    /// publisher wrote (see [`Transparency::follow`]).
    async fn lead(&self) -> Result<bool, Error> {
        let (holder, term) = {
            let f = self.db.fence();
            (f.holder.clone(), f.term)
        };
        let now = unix_now_ms();
        let held = self
            .store
            .lease(&holder, term, now, now + self.lease.as_millis() as i64)
            .await?;
        if held.is_some() && held != term {
            tracing::info!(node = %holder, term = held, "took the key directory publisher lease");
            self.takeovers
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // Another node may have published since this one last looked.
            self.follow().await?;
        }
        self.db.fence().term = held;
        Ok(held.is_some())
    }

    /// Prometheus text: the newest epoch this node knows, whether it is
    /// the publisher, and how often it took the lease.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        use std::sync::atomic::Ordering;
        let publisher = u8::from(self.db.fence().term.is_some());
        let _ = writeln!(
            out,
            "# TYPE parley_ids_epoch gauge\nparley_ids_epoch {}\n\
             # TYPE parley_ids_publisher gauge\nparley_ids_publisher {publisher}\n\
             # TYPE parley_ids_publisher_takeovers_total counter\n\
             parley_ids_publisher_takeovers_total {}\n\
             # TYPE parley_ids_tree_cache_records gauge\n\
             parley_ids_tree_cache_records {}\n\
             # TYPE parley_ids_tree_records_refreshed_total counter\n\
             parley_ids_tree_records_refreshed_total {}",
            self.seen_epoch.load(Ordering::SeqCst),
            self.takeovers.load(Ordering::Relaxed),
            self.db.cache.len(),
            self.refreshed.load(Ordering::Relaxed),
        );
    }

    /// Gives the publisher lease up, if this node holds it (at shutdown).
    pub async fn release(&self) -> Result<(), Error> {
        let (holder, term) = {
            let mut f = self.db.fence();
            (f.holder.clone(), f.term.take())
        };
        match term {
            Some(t) => self.store.release_lease(&holder, t).await,
            None => Ok(()),
        }
    }

    /// Once another node's newest epoch is signed, refreshes the cached
    /// tree records those epochs changed (as the publisher's commit does
    /// for its own cache), so that lookups prove from the new epoch; if
    /// the changes are no longer all noted (a node far behind), forgets
    /// the cached tree instead. A lookup that spans two such publishes
    /// may not verify (akd keeps one previous version of each tree node):
    /// the runtime calls this several times per publish interval.
    pub async fn follow(&self) -> Result<(), Error> {
        use std::sync::atomic::Ordering;
        let newest = self.store.latest_root_epoch().await?;
        let seen = self.seen_epoch.load(Ordering::SeqCst);
        if newest > seen {
            let changed = match seen {
                0 => None,
                _ => self.changes_since(seen, newest).await?,
            };
            match changed {
                Some(records) => {
                    self.db.cache.committed(&records);
                    self.refreshed
                        .fetch_add(records.len() as u64, Ordering::Relaxed);
                }
                None => self.db.cache.clear(),
            }
            self.seen_epoch.store(newest, Ordering::SeqCst);
        }
        Ok(())
    }

    pub fn anchor(&self) -> &TrustAnchor {
        &self.anchor
    }

    /// The tree records `(seen, newest]` changed, from the database, if
    /// every one of those epochs is still noted; `None` otherwise.
    async fn changes_since(&self, seen: u64, newest: u64) -> Result<Option<Vec<DbRecord>>, Error> {
        let noted: i64 = sqlx::query_scalar(
            "SELECT COUNT(DISTINCT epoch) FROM akd_changes WHERE epoch > $1 AND epoch <= $2",
        )
        .bind(seen as i64)
        .bind(newest as i64)
        .fetch_one(self.store.pool())
        .await
        .map_err(Error::db)?;
        if noted != (newest - seen) as i64 {
            return Ok(None);
        }
        let rows = sqlx::query(
            "SELECT DISTINCT r.id, r.data FROM akd_changes c JOIN akd_records r ON r.id = c.id
             WHERE c.epoch > $1 AND c.epoch <= $2",
        )
        .bind(seen as i64)
        .bind(newest as i64)
        .fetch_all(self.store.pool())
        .await
        .map_err(Error::db)?;
        rows.iter()
            .map(|r| decode::<DbRecord>(&r.get::<Vec<u8>, _>(1)))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
            .map_err(|e| Error::Directory(e.to_string()))
    }

    /// Loads the directory's tree into memory. Until a record is cached a
    /// proof reads it from the database, one query per tree level: a
    /// restarted 1M-handle directory served a few hundred lookups a second
    /// until warm. Returns the number of records now held.
    pub async fn warm_cache(&self) -> Result<usize, Error> {
        self.db
            .warm()
            .await
            .map_err(|e| Error::Directory(e.to_string()))
    }

    async fn sign_root(&self, epoch: u64, hash: [u8; 32]) -> Result<SignedRoot, Error> {
        let sig = self.root_key.sign(&SignedRoot::signing_bytes(epoch, &hash));
        self.store
            .save_root(epoch, &hash, sig.as_ref(), unix_now())
            .await?;
        Ok(self.remember_root(SignedRoot {
            epoch,
            root_hash: hash,
            signature: sig.as_ref().to_vec(),
        }))
    }

    fn latest_root(&self) -> std::sync::MutexGuard<'_, Option<SignedRoot>> {
        // Only ever replaced whole: a panic cannot leave it half-written.
        self.latest_root.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `root` if it is the newest seen; returns it.
    fn remember_root(&self, root: SignedRoot) -> SignedRoot {
        let mut latest = self.latest_root();
        if latest.as_ref().is_none_or(|l| l.epoch < root.epoch) {
            *latest = Some(root.clone());
        }
        root
    }

    /// Publishes every queued value as one new epoch. Returns the number
    /// of values published (0: no epoch was made).
    pub async fn publish_pending(&self, max: i64) -> Result<usize, Error> {
        let _writer = self.publishing.lock().await;
        if !self.lead().await? {
            self.follow().await?;
            return Ok(0);
        }
        let pending = self.store.pending(max).await?;
        if pending.is_empty() {
            return Ok(0);
        }
        drop(self.readers.write().await);
        let updates = pending
            .iter()
            .map(|(uri, v)| (AkdLabel(uri.as_bytes().to_vec()), AkdValue(v.clone())))
            .collect();
        let EpochHash(epoch, hash) = self.dir.publish(updates).await.map_err(dir_err)?;
        // Known here before its root is signed: `follow` must not take
        // this node's own epoch for another node's and drop the cache.
        self.seen_epoch
            .store(epoch, std::sync::atomic::Ordering::SeqCst);
        self.sign_root(epoch, hash).await?;
        self.store.unqueue(&pending).await?;
        Ok(pending.len())
    }

    /// A lookup proof for a label, with the value it proves and the root
    /// it verifies against; or, if the label was never published, the
    /// proof that it is absent.
    pub async fn lookup(&self, uri: &str) -> Result<Looked, Error> {
        let _reading = self.readers.read().await;
        let label = AkdLabel(uri.as_bytes().to_vec());
        // A publish may add the label between akd's lookup and the absence
        // proof, which then does not verify: the second round finds it.
        for _ in 0..2 {
            match self.dir.lookup(label.clone()).await {
                Ok((proof, EpochHash(epoch, hash))) => {
                    let root = self.root_at(epoch, hash).await?;
                    return Ok(Looked::Found(Proven {
                        proof: wire::transparency::encode_lookup_proof(&proof),
                        value: proof.value.0,
                        root,
                    }));
                }
                Err(akd::errors::AkdError::Storage(StorageError::NotFound(_))) => {
                    let absence = self.absence(&label).await?;
                    if wire::transparency::verify_absence(
                        &self.anchor,
                        &absence.root,
                        uri,
                        &absence.vrf_proof,
                        &absence.proof,
                    )
                    .is_ok()
                    {
                        return Ok(Looked::Absent(absence));
                    }
                }
                Err(e) => return Err(dir_err(e)),
            }
        }
        Err(Error::Directory(format!(
            "no verifiable lookup or absence proof for {uri}"
        )))
    }

    /// The absence proof of `label` in the current epoch (see [`Absence`]).
    async fn absence(&self, label: &AkdLabel) -> Result<Absence, Error> {
        use akd::ecvrf::VRFKeyStorage;
        let azks = match self
            .manager
            .get::<akd::Azks>(&akd::append_only_zks::DEFAULT_AZKS_KEY)
            .await
        {
            Ok(DbRecord::Azks(azks)) => azks,
            Ok(_) => return Err(Error::Directory("the tree header is not a tree".into())),
            Err(e) => return Err(Error::Directory(e.to_string())),
        };
        let vrf = self
            .vrf
            .get_label_proof::<KtConfig>(label, akd::VersionFreshness::Fresh, 1)
            .await
            .map_err(|e| Error::Directory(e.to_string()))?;
        let node = self.vrf.get_node_label_from_vrf_proof(vrf).await;
        let proof = azks
            .get_non_membership_proof::<KtConfig, _>(&self.manager, node)
            .await
            .map_err(dir_err)?;
        let hash = azks
            .get_root_hash::<KtConfig, _>(&self.manager)
            .await
            .map_err(dir_err)?;
        Ok(Absence {
            vrf_proof: vrf.to_bytes().to_vec(),
            proof: wire::transparency::encode_absence_proof(&proof),
            root: self.root_at(azks.get_latest_epoch(), hash).await?,
        })
    }

    /// A complete history proof (protobuf) for a label.
    pub async fn history(&self, uri: &str) -> Result<Option<(Vec<u8>, SignedRoot)>, Error> {
        let _reading = self.readers.read().await;
        let label = AkdLabel(uri.as_bytes().to_vec());
        match self
            .dir
            .key_history(&label, akd::HistoryParams::Complete)
            .await
        {
            Ok((proof, EpochHash(epoch, hash))) => {
                let root = self.root_at(epoch, hash).await?;
                Ok(Some((
                    wire::transparency::encode_history_proof(&proof),
                    root,
                )))
            }
            Err(akd::errors::AkdError::Storage(StorageError::NotFound(_))) => Ok(None),
            Err(e) => Err(dir_err(e)),
        }
    }

    /// An append-only proof (protobuf) between two epochs, with the root
    /// hashes of every epoch from `start` to `end`. Built one epoch at a
    /// time, each under the readers lock on its own: a publish (and the
    /// lookups queued behind it) waits for one epoch's proof, never for a
    /// whole span's.
    pub async fn audit(
        &self,
        start: u64,
        end: u64,
    ) -> Result<(Vec<u8>, Vec<(u64, Vec<u8>)>), Error> {
        use protobuf::Message;
        let mut proof = akd::AppendOnlyProof {
            proofs: Vec::new(),
            epochs: Vec::new(),
        };
        for epoch in start..end {
            let _reading = self.readers.read().await;
            let one = self.dir.audit(epoch, epoch + 1).await.map_err(dir_err)?;
            proof.proofs.extend(one.proofs);
            proof.epochs.extend(one.epochs);
        }
        let bytes = akd::proto::specs::types::AppendOnlyProof::from(&proof)
            .write_to_bytes()
            .map_err(|e| Error::Internal(e.to_string()))?;
        Ok((bytes, self.store.roots(start, end).await?))
    }

    /// The signed root of `epoch`, signing it now if the publisher has
    /// not yet (a proof can be served between publish and signing).
    async fn root_at(&self, epoch: u64, hash: [u8; 32]) -> Result<SignedRoot, Error> {
        if let Some(r) = self.latest_root().as_ref() {
            if r.epoch == epoch && r.root_hash == hash {
                return Ok(r.clone());
            }
        }
        match self.store.root(epoch).await? {
            Some((h, sig)) if h == hash => Ok(self.remember_root(SignedRoot {
                epoch,
                root_hash: hash,
                signature: sig,
            })),
            Some(_) => Err(Error::Internal(format!(
                "stored root of epoch {epoch} differs from the directory's"
            ))),
            None => self.sign_root(epoch, hash).await,
        }
    }

    /// The latest signed root.
    pub async fn root(&self) -> Result<SignedRoot, Error> {
        let EpochHash(epoch, hash) = self.dir.get_epoch_hash().await.map_err(dir_err)?;
        self.root_at(epoch, hash).await
    }
}

fn dir_err(e: akd::errors::AkdError) -> Error {
    Error::Directory(e.to_string())
}

pub(crate) fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::device_list::{DeviceEntry, DeviceList, DirectoryValue};
    use wire::transparency::{verify_absence, verify_history, verify_lookup, KtError};
    use wire::{DeviceId, SigningKey};

    /// A store in a fresh directory, removed when the returned guard drops.
    pub(crate) async fn temp_store(name: &str) -> (tempfile::TempDir, Store) {
        let dir = tempfile::Builder::new()
            .prefix(&format!("parley-ids-{name}-"))
            .tempdir()
            .unwrap();
        let store = Store::open(&format!("sqlite://{}", dir.path().join("ids.db").display()))
            .await
            .unwrap();
        (dir, store)
    }

    fn root_key() -> Vec<u8> {
        Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
            .unwrap()
            .as_ref()
            .to_vec()
    }

    fn list(account: &SigningKey, uri: &str, seq: u64, devices: usize) -> Vec<u8> {
        DirectoryValue::Active(
            DeviceList {
                account_key: account.public(),
                seq,
                handles: vec![uri.into()],
                devices: (0..devices)
                    .map(|_| DeviceEntry {
                        id: DeviceId::random(),
                        identity_key: SigningKey::generate().public(),
                    })
                    .collect(),
            }
            .sign(account)
            .unwrap(),
        )
        .encode()
    }

    async fn queue(store: &Store, uri: &str, value: &[u8]) {
        let mut tx = store.begin().await.unwrap();
        crate::store::tx::queue_publish(&mut tx, uri, value, unix_now())
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn published_values_verify_on_the_client_and_survive_reopen() {
        let (_dir, store) = temp_store("kt").await;
        let key = root_key();
        let kt = Transparency::open(store.clone(), VrfKey::new([7; 32]).unwrap(), &key)
            .await
            .unwrap();
        let anchor = kt.anchor().clone();
        let account = SigningKey::generate();
        let alice = "mailto:alice@example.com";
        // Before anything is published every handle is proven absent.
        let Looked::Absent(a) = kt.lookup(alice).await.unwrap() else {
            panic!("nothing is published")
        };
        verify_absence(&anchor, &a.root, alice, &a.vrf_proof, &a.proof).unwrap();
        let v1 = list(&account, alice, 1, 1);
        queue(&store, alice, &v1).await;
        queue(
            &store,
            "tel:+14155550123",
            &list(&SigningKey::generate(), "tel:+14155550123", 1, 2),
        )
        .await;
        assert_eq!(kt.publish_pending(1000).await.unwrap(), 2);
        assert_eq!(kt.publish_pending(1000).await.unwrap(), 0, "queue drained");
        let v2 = list(&account, alice, 2, 2);
        queue(&store, alice, &v2).await;
        assert_eq!(kt.publish_pending(1000).await.unwrap(), 1);

        let Looked::Found(Proven { proof, value, root }) = kt.lookup(alice).await.unwrap() else {
            panic!("alice is published")
        };
        assert_eq!(root.epoch, 2);
        assert_eq!(value, v2);
        let got = verify_lookup(&anchor, &root, alice, &proof).unwrap();
        assert_eq!(got.version, 2);
        assert_eq!(got.value.encode(), v2);
        // The same proof does not verify for another label or another root.
        assert!(matches!(
            verify_lookup(&anchor, &root, "tel:+14155550123", &proof),
            Err(KtError::Proof(_))
        ));
        let mut bad_root = root.clone();
        bad_root.root_hash[0] ^= 1;
        assert_eq!(
            verify_lookup(&anchor, &bad_root, alice, &proof),
            Err(KtError::RootSignature)
        );
        // A handle never published is proven absent, and only that handle.
        let nobody = "mailto:nobody@example.com";
        let Looked::Absent(absent) = kt.lookup(nobody).await.unwrap() else {
            panic!("nobody was never published")
        };
        let Absence {
            vrf_proof,
            proof: nm,
            root: nm_root,
        } = &absent;
        verify_absence(&anchor, nm_root, nobody, vrf_proof, nm).unwrap();
        // The same proof does not say another handle is absent, nor a
        // published one; nor does it verify against another root.
        assert!(matches!(
            verify_absence(
                &anchor,
                nm_root,
                "mailto:somebody@example.com",
                vrf_proof,
                nm
            ),
            Err(KtError::Proof(_))
        ));
        assert!(verify_absence(&anchor, nm_root, alice, vrf_proof, nm).is_err());
        let mut other = nm_root.clone();
        other.root_hash[1] ^= 1;
        assert_eq!(
            verify_absence(&anchor, &other, nobody, vrf_proof, nm),
            Err(KtError::RootSignature)
        );
        // Our proof-to-hash gives akd's label for every VRF proof.
        for uri in [alice, nobody, "tel:+14155550123"] {
            use akd::ecvrf::VRFKeyStorage;
            let label = AkdLabel(uri.as_bytes().to_vec());
            for (freshness, version) in [
                (akd::VersionFreshness::Fresh, 1),
                (akd::VersionFreshness::Stale, 2),
            ] {
                let vrf = VrfKey::new([7; 32])
                    .unwrap()
                    .get_label_proof::<KtConfig>(&label, freshness, version)
                    .await
                    .unwrap();
                let akd_label = VrfKey::new([7; 32])
                    .unwrap()
                    .get_node_label_from_vrf_proof(vrf)
                    .await;
                assert_eq!(
                    wire::transparency::vrf_node_label(&vrf.to_bytes()),
                    Some(akd_label.label_val)
                );
            }
        }

        let (hproof, hroot) = kt.history(alice).await.unwrap().unwrap();
        let history = verify_history(&anchor, &hroot, alice, &hproof).unwrap();
        let versions: Vec<_> = history.iter().map(|v| v.value.encode()).collect();
        assert_eq!(versions, vec![v2.clone(), v1.clone()], "newest first");

        let (audit, roots) = kt.audit(1, 2).await.unwrap();
        let proof = akd::proto::specs::types::AppendOnlyProof::parse_from_bytes(&audit).unwrap();
        let proof = akd::AppendOnlyProof::try_from(&proof).unwrap();
        let hashes = roots
            .into_iter()
            .map(|(_, h)| <[u8; 32]>::try_from(h).unwrap())
            .collect();
        akd::auditor::audit_verify::<KtConfig>(hashes, proof)
            .await
            .unwrap();

        // Reopen from the same database: same anchor, same data.
        drop(kt);
        let kt = Transparency::open(store.clone(), VrfKey::new([7; 32]).unwrap(), &key)
            .await
            .unwrap();
        assert_eq!(kt.anchor(), &anchor);
        // The tree is read into memory whole, once.
        let records: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM akd_records")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert!(records > 2);
        assert_eq!(kt.warm_cache().await.unwrap(), records as usize);
        assert_eq!(kt.warm_cache().await.unwrap(), records as usize);
        let Looked::Found(Proven { proof, root, .. }) = kt.lookup(alice).await.unwrap() else {
            panic!("alice is published")
        };
        assert_eq!(
            verify_lookup(&anchor, &root, alice, &proof)
                .unwrap()
                .version,
            2
        );
        // A lookup proves from the proofs stored at publish, and still
        // proves when they are gone.
        sqlx::query("DELETE FROM akd_lookup_vrf")
            .execute(store.pool())
            .await
            .unwrap();
        let kt = Transparency::open(store.clone(), VrfKey::new([7; 32]).unwrap(), &key)
            .await
            .unwrap();
        let Looked::Found(Proven { proof, root, .. }) = kt.lookup(alice).await.unwrap() else {
            panic!("alice is published")
        };
        verify_lookup(&anchor, &root, alice, &proof).unwrap();
    }

    /// A node restarted after a crash (its lease not given back) takes
    /// the lease again at once under its name; another name waits.
    #[tokio::test]
    async fn a_node_restarted_under_its_name_publishes_at_once() {
        let (_dir, store) = temp_store("kt-restart").await;
        let key = root_key();
        let open = |node: &'static str| {
            let store = store.clone();
            let key = key.clone();
            async move {
                Transparency::open(store, VrfKey::new([7; 32]).unwrap(), &key)
                    .await
                    .unwrap()
                    .with_node(node)
            }
        };
        let first = open("node-a").await;
        let uri = |n: u32| format!("mailto:user{n}@example.com");
        queue(
            &store,
            &uri(1),
            &list(&SigningKey::generate(), &uri(1), 1, 1),
        )
        .await;
        assert_eq!(first.publish_pending(10).await.unwrap(), 1);
        drop(first); // a crash: the lease is not given back
        queue(
            &store,
            &uri(2),
            &list(&SigningKey::generate(), &uri(2), 1, 1),
        )
        .await;
        let other = open("node-b").await;
        assert_eq!(
            other.publish_pending(10).await.unwrap(),
            0,
            "the lease is node-a's"
        );
        let again = open("node-a").await;
        assert_eq!(again.publish_pending(10).await.unwrap(), 1);
        // The takeover is a new term: node-b still does not publish.
        assert_eq!(other.publish_pending(10).await.unwrap(), 0);
    }

    /// A lone node takes the publisher lease at its first publish without
    /// dropping the tree it loaded: nobody else published meanwhile.
    #[tokio::test]
    async fn taking_the_lease_keeps_a_warm_cache_when_nothing_changed() {
        let (_dir, store) = temp_store("kt-warm").await;
        let key = root_key();
        let kt = Transparency::open(store.clone(), VrfKey::new([7; 32]).unwrap(), &key)
            .await
            .unwrap();
        let alice = "mailto:alice@example.com";
        queue(&store, alice, &list(&SigningKey::generate(), alice, 1, 1)).await;
        assert_eq!(kt.publish_pending(10).await.unwrap(), 1);
        // Restarted (the lease given back at shutdown): it warms its
        // cache, then publishes as the new holder.
        kt.release().await.unwrap();
        drop(kt);
        let kt = Transparency::open(store.clone(), VrfKey::new([7; 32]).unwrap(), &key)
            .await
            .unwrap()
            .with_lease(std::time::Duration::from_millis(1));
        let warm = kt.warm_cache().await.unwrap();
        assert!(warm > 2);
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let bob = "mailto:bob@example.com";
        queue(&store, bob, &list(&SigningKey::generate(), bob, 1, 1)).await;
        assert_eq!(kt.publish_pending(10).await.unwrap(), 1);
        assert!(kt.db.cache.len() >= warm, "the warm cache was dropped");
    }

    use protobuf::Message;
}
