//! Durable state on sqlx: SQLite (default, embedded) or PostgreSQL (by URL).
//!
//! Every identity change is one transaction that also queues the handle's
//! new directory value in `kt_pending`; the publisher moves queued values
//! into the key transparency directory and removes them. So a change that
//! was acknowledged is in the database, and reaches the directory even if
//! the process dies before the next epoch.

use std::time::Duration;

use sqlx::{AnyPool, Row};
use wire::DeviceId;

use crate::error::Error;

pub use sqlstore::Backend;

#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

/// A device row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRow {
    pub id: DeviceId,
    pub account_id: String,
    pub identity_key: Vec<u8>,
    pub name: String,
    /// JSON array of strings.
    pub capabilities: String,
    /// JSON array of {topic, token}.
    pub push_tokens: String,
    pub cert_serial: String,
    pub certificate: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

/// An account row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountRow {
    pub id: String,
    pub account_key: Vec<u8>,
    pub seq: i64,
    /// The current signed device list (wire encoding).
    pub list: Vec<u8>,
}

/// A link code row (new device waiting for approval).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkRow {
    pub code_hash: Vec<u8>,
    pub account_id: String,
    pub expires_at: i64,
    pub claim_device: Option<String>,
    pub claim_key: Option<Vec<u8>>,
    pub claim_name: Option<String>,
    pub claim_capabilities: Option<String>,
    pub claim_transfer_key: Option<Vec<u8>>,
    pub sealed_account_key: Option<Vec<u8>>,
    pub approved: bool,
}

/// A new device's claim on a link code.
#[derive(Debug, Clone, Copy)]
pub struct Claim<'a> {
    pub device: DeviceId,
    pub key: &'a [u8],
    pub name: &'a str,
    /// JSON array of strings.
    pub capabilities: &'a str,
    pub transfer_key: Option<&'a [u8]>,
}

/// A reset of the accounts of some handles, waiting for its delay or for
/// a device of those accounts to approve or cancel it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResetRow {
    pub id: String,
    /// The new device's identity key.
    pub device_key: Vec<u8>,
    /// The new account's signed device list (wire encoding).
    pub list: Vec<u8>,
    pub name: String,
    /// JSON array of strings.
    pub capabilities: String,
    /// The accounts it retires (their devices may approve or cancel).
    pub accounts: Vec<String>,
    pub created_at: i64,
    pub effective_at: i64,
    pub state: ResetState,
    /// The new device's registration (JSON), once done.
    pub result: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetState {
    Pending = 0,
    Done = 1,
    Cancelled = 2,
}

/// A verification session as stored (times in Unix milliseconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    pub handle: String,
    pub started_ms: i64,
    pub code_mac: Vec<u8>,
    pub sends: i64,
    pub last_send_ms: i64,
    pub checks: i64,
    pub next_check_ms: i64,
}

/// A handle's wrong codes as stored (times in Unix milliseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailureRow {
    pub count: i64,
    pub last_ms: i64,
    pub locked_until_ms: Option<i64>,
}

/// An event for the devices of an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRow {
    pub seq: i64,
    pub kind: String,
    pub device_id: Option<String>,
    pub at: i64,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS accounts (
    id TEXT PRIMARY KEY,
    account_key {blob} NOT NULL,
    seq BIGINT NOT NULL,
    list {blob} NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS handles (
    uri TEXT PRIMARY KEY,
    account_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS handles_account ON handles (account_id);
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL,
    identity_key {blob} NOT NULL,
    name TEXT NOT NULL,
    capabilities TEXT NOT NULL,
    push_tokens TEXT NOT NULL,
    cert_serial TEXT NOT NULL,
    certificate TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE UNIQUE INDEX IF NOT EXISTS devices_key ON devices (identity_key);
CREATE INDEX IF NOT EXISTS devices_account ON devices (account_id);
CREATE TABLE IF NOT EXISTS links (
    code_hash {blob} PRIMARY KEY,
    account_id TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    claim_device TEXT,
    claim_key {blob},
    claim_name TEXT,
    claim_capabilities TEXT,
    claim_transfer_key {blob},
    sealed_account_key {blob},
    approved BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS account_key_seals (
    device_id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    sealed {blob} NOT NULL
);
CREATE INDEX IF NOT EXISTS account_key_seals_account ON account_key_seals (account_id);
CREATE TABLE IF NOT EXISTS pending_resets (
    id TEXT PRIMARY KEY,
    device_key {blob} NOT NULL,
    list {blob} NOT NULL,
    name TEXT NOT NULL,
    capabilities TEXT NOT NULL,
    accounts TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    effective_at BIGINT NOT NULL,
    state BIGINT NOT NULL DEFAULT 0,
    result TEXT
);
CREATE TABLE IF NOT EXISTS verification_sessions (
    id {blob} PRIMARY KEY,
    handle TEXT NOT NULL,
    started_ms BIGINT NOT NULL,
    code_mac {blob} NOT NULL,
    sends BIGINT NOT NULL,
    last_send_ms BIGINT NOT NULL,
    checks BIGINT NOT NULL,
    next_check_ms BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS verification_failures (
    handle TEXT PRIMARY KEY,
    count BIGINT NOT NULL,
    last_ms BIGINT NOT NULL,
    locked_until_ms BIGINT
);
CREATE TABLE IF NOT EXISTS budgets (
    key TEXT PRIMARY KEY,
    tokens DOUBLE PRECISION NOT NULL,
    at_ms BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS verification_starts (
    key TEXT NOT NULL,
    at_ms BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS verification_starts_key ON verification_starts (key, at_ms);
CREATE TABLE IF NOT EXISTS handle_tokens (
    token_hash {blob} PRIMARY KEY,
    handle TEXT NOT NULL,
    expires_ms BIGINT NOT NULL,
    spent BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS pending_reset_values (
    reset_id TEXT NOT NULL,
    uri TEXT NOT NULL,
    value {blob} NOT NULL,
    PRIMARY KEY (reset_id, uri)
);
CREATE TABLE IF NOT EXISTS events (
    seq {serial},
    account_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    device_id TEXT,
    at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_account ON events (account_id, seq);
CREATE TABLE IF NOT EXISTS kt_pending (
    uri TEXT PRIMARY KEY,
    value {blob} NOT NULL,
    queued_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS kt_lease (
    id BIGINT PRIMARY KEY,
    holder TEXT NOT NULL,
    term BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS kt_roots (
    epoch BIGINT PRIMARY KEY,
    root_hash {blob} NOT NULL,
    signature {blob} NOT NULL,
    published_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS akd_records (
    id {blob} PRIMARY KEY,
    data {blob} NOT NULL
);
CREATE TABLE IF NOT EXISTS akd_changes (
    epoch BIGINT NOT NULL,
    id {blob} NOT NULL,
    PRIMARY KEY (epoch, id)
);
CREATE TABLE IF NOT EXISTS akd_states (
    label {blob} NOT NULL,
    epoch BIGINT NOT NULL,
    version BIGINT NOT NULL,
    data {blob} NOT NULL,
    PRIMARY KEY (label, epoch)
);
CREATE TABLE IF NOT EXISTS akd_lookup_vrf (
    label {blob} PRIMARY KEY,
    epoch BIGINT NOT NULL,
    proofs {blob} NOT NULL
);
";

/// A token bucket kept in the database, shared by every instance on it:
/// `capacity` tokens, one earned every `per_token`.
#[derive(Debug, Clone)]
pub struct Budget {
    pub key: String,
    pub capacity: f64,
    pub per_token: Duration,
}

impl Store {
    /// Takes `n` tokens from every budget, or none from any: `Ok(None)`
    /// when taken, else how long until the emptiest would have them. One
    /// statement per budget, each a guarded upsert (refill, check, take),
    /// so instances sharing the database never overspend.
    pub async fn spend_budgets(
        &self,
        budgets: &[Budget],
        n: u32,
        now_ms: i64,
    ) -> Result<Option<Duration>, Error> {
        let least = match self.backend {
            Backend::Postgres => "LEAST",
            Backend::Sqlite => "MIN",
        };
        let level = format!(
            "{least}($2, budgets.tokens + (CASE WHEN $4 > budgets.at_ms THEN $4 - budgets.at_ms \
             ELSE 0 END) / $5)"
        );
        let take = format!(
            "INSERT INTO budgets (key, tokens, at_ms) VALUES ($1, $2 - $3, $4)
             ON CONFLICT (key) DO UPDATE SET tokens = {level} - $3, at_ms = $4
             WHERE {level} >= $3
             RETURNING tokens"
        );
        let n = f64::from(n);
        let mut t = self.begin().await?;
        for b in budgets {
            let ms_per_token = b.per_token.as_secs_f64() * 1000.0;
            let taken = sqlx::query(&take)
                .bind(&b.key)
                .bind(b.capacity)
                .bind(n)
                .bind(now_ms)
                .bind(ms_per_token)
                .fetch_optional(&mut *t)
                .await
                .map_err(Error::db)?;
            if taken.is_some() {
                continue;
            }
            let row = sqlx::query("SELECT tokens, at_ms FROM budgets WHERE key = $1")
                .bind(&b.key)
                .fetch_one(&mut *t)
                .await
                .map_err(Error::db)?;
            let (tokens, at_ms): (f64, i64) = (row.get(0), row.get(1));
            let earned = (now_ms - at_ms).max(0) as f64 / ms_per_token;
            let missing = n - (tokens + earned).min(b.capacity);
            // Whole seconds: Retry-After is in seconds.
            let wait = (missing.max(0.0) * ms_per_token / 1000.0).ceil().max(1.0);
            return Ok(Some(Duration::from_secs(wait as u64)));
        }
        t.commit().await.map_err(Error::db)?;
        Ok(None)
    }

    /// Opens (creating if needed) the database at `url`:
    /// `sqlite:///path/ids.db` or `postgres://user@host/db`.
    pub async fn open(url: &str) -> Result<Store, Error> {
        let (pool, backend) = sqlstore::open(url, sqlstore::Options::default())
            .await
            .map_err(Error::from_sqlstore)?;
        let store = Store { pool, backend };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), Error> {
        sqlstore::migrate(&self.pool, self.backend, SCHEMA)
            .await
            .map_err(Error::from_sqlstore)
    }

    /// One round trip to the database: whether it answers.
    pub async fn ping(&self) -> Result<(), Error> {
        sqlstore::ping(&self.pool)
            .await
            .map_err(Error::from_sqlstore)
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Starts a write transaction. On SQLite it takes the write lock at
    /// once (`BEGIN IMMEDIATE`): a deferred transaction that reads first
    /// and writes later fails with SQLITE_BUSY, without waiting, if another
    /// connection committed in between.
    pub async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, Error> {
        match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
            Backend::Postgres => self.pool.begin().await,
        }
        .map_err(Error::db)
    }

    pub async fn account_of_handle(&self, uri: &str) -> Result<Option<String>, Error> {
        let row = sqlx::query("SELECT account_id FROM handles WHERE uri = $1")
            .bind(uri)
            .fetch_optional(&self.pool)
            .await
            .map_err(Error::db)?;
        Ok(row.map(|r| r.get(0)))
    }

    /// The account key the last rotation sealed to `device`, and the list
    /// seq of that rotation.
    pub async fn rotated_key(&self, device: &str) -> Result<Option<(i64, Vec<u8>)>, Error> {
        let row = sqlx::query("SELECT seq, sealed FROM account_key_seals WHERE device_id = $1")
            .bind(device)
            .fetch_optional(&self.pool)
            .await
            .map_err(Error::db)?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    pub async fn account(&self, id: &str) -> Result<Option<AccountRow>, Error> {
        let row = sqlx::query("SELECT id, account_key, seq, list FROM accounts WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(Error::db)?;
        Ok(row.map(|r| AccountRow {
            id: r.get(0),
            account_key: r.get(1),
            seq: r.get(2),
            list: r.get(3),
        }))
    }

    pub async fn handles_of(&self, account_id: &str) -> Result<Vec<String>, Error> {
        let rows = sqlx::query("SELECT uri FROM handles WHERE account_id = $1 ORDER BY uri")
            .bind(account_id)
            .fetch_all(&self.pool)
            .await
            .map_err(Error::db)?;
        Ok(rows.into_iter().map(|r| r.get(0)).collect())
    }

    pub async fn device_by_key(&self, key: &[u8]) -> Result<Option<DeviceRow>, Error> {
        let row = sqlx::query(&format!("{DEVICE_SELECT} WHERE identity_key = $1"))
            .bind(key.to_vec())
            .fetch_optional(&self.pool)
            .await
            .map_err(Error::db)?;
        row.map(device_row).transpose()
    }

    pub async fn devices_of(&self, account_id: &str) -> Result<Vec<DeviceRow>, Error> {
        self.devices_where("account_id = $1", account_id).await
    }

    /// The devices of the account holding handle `uri` (none if no account
    /// holds it), in one query: lookups run this for every handle.
    pub async fn devices_of_handle(&self, uri: &str) -> Result<Vec<DeviceRow>, Error> {
        self.devices_where(
            "account_id = (SELECT account_id FROM handles WHERE uri = $1)",
            uri,
        )
        .await
    }

    async fn devices_where(&self, condition: &str, arg: &str) -> Result<Vec<DeviceRow>, Error> {
        let rows = sqlx::query(&format!("{DEVICE_SELECT} WHERE {condition} ORDER BY id"))
            .bind(arg)
            .fetch_all(&self.pool)
            .await
            .map_err(Error::db)?;
        rows.into_iter().map(device_row).collect()
    }

    pub async fn set_push_tokens(&self, device: DeviceId, json: &str) -> Result<(), Error> {
        sqlx::query("UPDATE devices SET push_tokens = $1 WHERE id = $2")
            .bind(json)
            .bind(device.to_string())
            .execute(&self.pool)
            .await
            .map_err(Error::db)?;
        Ok(())
    }

    pub async fn link(&self, code_hash: &[u8]) -> Result<Option<LinkRow>, Error> {
        let row = sqlx::query(&format!("{LINK_SELECT} WHERE code_hash = $1"))
            .bind(code_hash.to_vec())
            .fetch_optional(&self.pool)
            .await
            .map_err(Error::db)?;
        Ok(row.map(link_row))
    }

    /// Stores a pending reset with the values to publish under its
    /// handles when it is done (handle URI → wire encoding).
    pub async fn insert_reset(
        &self,
        r: &ResetRow,
        values: &std::collections::BTreeMap<String, Vec<u8>>,
    ) -> Result<(), Error> {
        let mut t = self.begin().await?;
        sqlx::query(
            "INSERT INTO pending_resets (id, device_key, list, name, capabilities, accounts,
                created_at, effective_at, state) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 0)",
        )
        .bind(&r.id)
        .bind(r.device_key.clone())
        .bind(r.list.clone())
        .bind(&r.name)
        .bind(&r.capabilities)
        .bind(serde_json::to_string(&r.accounts).map_err(|e| Error::Internal(e.to_string()))?)
        .bind(r.created_at)
        .bind(r.effective_at)
        .execute(&mut *t)
        .await
        .map_err(Error::db)?;
        for (uri, value) in values {
            sqlx::query(
                "INSERT INTO pending_reset_values (reset_id, uri, value) VALUES ($1, $2, $3)",
            )
            .bind(&r.id)
            .bind(uri)
            .bind(value.clone())
            .execute(&mut *t)
            .await
            .map_err(Error::db)?;
        }
        t.commit().await.map_err(Error::db)
    }

    /// The values stored with a pending reset, by handle URI.
    pub async fn reset_values(
        &self,
        id: &str,
    ) -> Result<std::collections::BTreeMap<String, Vec<u8>>, Error> {
        let rows = sqlx::query("SELECT uri, value FROM pending_reset_values WHERE reset_id = $1")
            .bind(id)
            .fetch_all(&self.pool)
            .await
            .map_err(Error::db)?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    pub async fn reset(&self, id: &str) -> Result<Option<ResetRow>, Error> {
        let row = sqlx::query(&format!("{RESET_SELECT} WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(Error::db)?;
        row.map(reset_row).transpose()
    }

    /// Pending resets that would retire `account_id`.
    pub async fn resets_of(&self, account_id: &str) -> Result<Vec<ResetRow>, Error> {
        // Account ids are hex: a quoted one cannot match anything else.
        let rows = sqlx::query(&format!(
            "{RESET_SELECT} WHERE state = 0 AND accounts LIKE $1"
        ))
        .bind(format!("%\"{account_id}\"%"))
        .fetch_all(&self.pool)
        .await
        .map_err(Error::db)?;
        rows.into_iter().map(reset_row).collect()
    }

    /// Cancels a pending reset; false if it was not pending.
    pub async fn cancel_reset(&self, id: &str) -> Result<bool, Error> {
        let r = sqlx::query("UPDATE pending_resets SET state = 2 WHERE id = $1 AND state = 0")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(Error::db)?;
        Ok(r.rows_affected() == 1)
    }

    pub async fn links_of(&self, account_id: &str, now: i64) -> Result<Vec<LinkRow>, Error> {
        let rows = sqlx::query(&format!(
            "{LINK_SELECT} WHERE account_id = $1 AND expires_at > $2"
        ))
        .bind(account_id)
        .bind(now)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::db)?;
        Ok(rows.into_iter().map(link_row).collect())
    }

    pub async fn insert_link(
        &self,
        code_hash: &[u8],
        account_id: &str,
        expires_at: i64,
    ) -> Result<(), Error> {
        sqlx::query("DELETE FROM links WHERE expires_at <= $1")
            .bind(expires_at - 3600)
            .execute(&self.pool)
            .await
            .map_err(Error::db)?;
        sqlx::query("INSERT INTO links (code_hash, account_id, expires_at) VALUES ($1, $2, $3)")
            .bind(code_hash.to_vec())
            .bind(account_id)
            .bind(expires_at)
            .execute(&self.pool)
            .await
            .map_err(Error::db)?;
        Ok(())
    }

    /// Records a claim on an unclaimed, unexpired link. Returns false if
    /// the link was already claimed.
    pub async fn claim_link(
        &self,
        code_hash: &[u8],
        claim: &Claim<'_>,
        now: i64,
    ) -> Result<bool, Error> {
        let r = sqlx::query(
            "UPDATE links SET claim_device = $1, claim_key = $2, claim_name = $3,
                claim_capabilities = $4, claim_transfer_key = $5
             WHERE code_hash = $6 AND claim_key IS NULL AND expires_at > $7",
        )
        .bind(claim.device.to_string())
        .bind(claim.key.to_vec())
        .bind(claim.name)
        .bind(claim.capabilities)
        .bind(claim.transfer_key.map(<[u8]>::to_vec))
        .bind(code_hash.to_vec())
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(Error::db)?;
        Ok(r.rows_affected() == 1)
    }

    pub async fn events_after(
        &self,
        account_id: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<EventRow>, Error> {
        let rows = sqlx::query(
            "SELECT seq, kind, device_id, at FROM events
             WHERE account_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(account_id)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::db)?;
        Ok(rows
            .into_iter()
            .map(|r| EventRow {
                seq: r.get(0),
                kind: r.get(1),
                device_id: r.get(2),
                at: r.get(3),
            })
            .collect())
    }

    /// Serial numbers (hex) of revoked device certificates with when.
    pub async fn revoked(&self) -> Result<Vec<(String, i64)>, Error> {
        let rows = sqlx::query(
            "SELECT cert_serial, revoked_at FROM devices WHERE revoked_at IS NOT NULL ORDER BY revoked_at",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(Error::db)?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Ids of devices whose certificates are revoked.
    pub async fn revoked_devices(&self) -> Result<Vec<DeviceId>, Error> {
        let rows = sqlx::query("SELECT id FROM devices WHERE revoked_at IS NOT NULL")
            .fetch_all(&self.pool)
            .await
            .map_err(Error::db)?;
        Ok(rows
            .into_iter()
            .filter_map(|r| r.get::<String, _>(0).parse().ok())
            .collect())
    }

    pub async fn pending(&self, limit: i64) -> Result<Vec<(String, Vec<u8>)>, Error> {
        let rows = sqlx::query("SELECT uri, value FROM kt_pending ORDER BY queued_at LIMIT $1")
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(Error::db)?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Removes published values, unless a newer value was queued meanwhile.
    pub async fn unqueue(&self, published: &[(String, Vec<u8>)]) -> Result<(), Error> {
        let mut tx = self.begin().await?;
        for (uri, value) in published {
            sqlx::query("DELETE FROM kt_pending WHERE uri = $1 AND value = $2")
                .bind(uri)
                .bind(value.clone())
                .execute(&mut *tx)
                .await
                .map_err(Error::db)?;
        }
        tx.commit().await.map_err(Error::db)
    }

    pub async fn pending_count(&self) -> Result<i64, Error> {
        let r = sqlx::query("SELECT COUNT(*) FROM kt_pending")
            .fetch_one(&self.pool)
            .await
            .map_err(Error::db)?;
        Ok(r.get(0))
    }

    pub async fn save_root(
        &self,
        epoch: u64,
        root_hash: &[u8],
        signature: &[u8],
        now: i64,
    ) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO kt_roots (epoch, root_hash, signature, published_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (epoch) DO NOTHING",
        )
        .bind(epoch as i64)
        .bind(root_hash.to_vec())
        .bind(signature.to_vec())
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(Error::db)?;
        Ok(())
    }

    /// Root hashes of epochs `start..=end` in order.
    pub async fn roots(&self, start: u64, end: u64) -> Result<Vec<(u64, Vec<u8>)>, Error> {
        let rows = sqlx::query(
            "SELECT epoch, root_hash FROM kt_roots WHERE epoch >= $1 AND epoch <= $2 ORDER BY epoch",
        )
        .bind(start as i64)
        .bind(end as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::db)?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get::<i64, _>(0) as u64, r.get(1)))
            .collect())
    }

    /// Spends handle tokens (by their SHA-256): all of them, once each,
    /// unexpired at `now_ms`, or none. Returns the handles they prove, in
    /// order, or None.
    pub async fn spend_tokens(
        &self,
        hashes: &[[u8; 32]],
        now_ms: i64,
    ) -> Result<Option<Vec<String>>, Error> {
        let mut t = self.begin().await?;
        let mut out = Vec::with_capacity(hashes.len());
        for h in hashes {
            let row = sqlx::query(
                "UPDATE handle_tokens SET spent = 1
                 WHERE token_hash = $1 AND spent = 0 AND expires_ms > $2 RETURNING handle",
            )
            .bind(h.to_vec())
            .bind(now_ms)
            .fetch_optional(&mut *t)
            .await
            .map_err(Error::db)?;
            match row {
                Some(r) => out.push(r.get(0)),
                None => return Ok(None), // dropped: rolled back
            }
        }
        t.commit().await.map_err(Error::db)?;
        Ok(Some(out))
    }

    /// Puts spent tokens back (the request that spent them failed), with
    /// the lifetime they had: an expired one stays spent.
    pub async fn unspend_tokens(&self, hashes: &[[u8; 32]], now_ms: i64) -> Result<(), Error> {
        for h in hashes {
            sqlx::query(
                "UPDATE handle_tokens SET spent = 0 WHERE token_hash = $1 AND expires_ms > $2",
            )
            .bind(h.to_vec())
            .bind(now_ms)
            .execute(&self.pool)
            .await
            .map_err(Error::db)?;
        }
        Ok(())
    }

    /// Deletes verification sessions started before `sessions_before_ms`,
    /// tokens expired at `now_ms`, and wrong-code counts last changed
    /// before `failures_before_ms` that lock nothing any more.
    pub async fn prune_verifications(
        &self,
        now_ms: i64,
        sessions_before_ms: i64,
        failures_before_ms: i64,
    ) -> Result<(), Error> {
        for (sql, at) in [
            (
                "DELETE FROM verification_sessions WHERE started_ms < $1",
                sessions_before_ms,
            ),
            ("DELETE FROM handle_tokens WHERE expires_ms <= $1", now_ms),
        ] {
            sqlx::query(sql)
                .bind(at)
                .execute(&self.pool)
                .await
                .map_err(Error::db)?;
        }
        sqlx::query("DELETE FROM verification_starts WHERE at_ms < $1")
            .bind(now_ms - 3_600_000)
            .execute(&self.pool)
            .await
            .map_err(Error::db)?;
        sqlx::query(
            "DELETE FROM verification_failures WHERE last_ms < $1
             AND (locked_until_ms IS NULL OR locked_until_ms < $2)",
        )
        .bind(failures_before_ms)
        .bind(now_ms)
        .execute(&self.pool)
        .await
        .map_err(Error::db)?;
        Ok(())
    }

    /// The newest epoch with a signed root.
    pub async fn latest_root_epoch(&self) -> Result<u64, Error> {
        let row = sqlx::query("SELECT COALESCE(MAX(epoch), 0) FROM kt_roots")
            .fetch_one(&self.pool)
            .await
            .map_err(Error::db)?;
        Ok(row.get::<i64, _>(0) as u64)
    }

    /// Keeps or takes the publisher lease: `holder` keeps it if it holds
    /// `term` and it has not expired, or takes it (the next term) if it
    /// expired or was already `holder`'s (the same node, restarted: the
    /// new term fences off anything the old process still had in flight).
    /// Returns the term `holder` now holds, if any. Times are Unix
    /// milliseconds.
    pub async fn lease(
        &self,
        holder: &str,
        term: Option<i64>,
        now_ms: i64,
        until_ms: i64,
    ) -> Result<Option<i64>, Error> {
        if let Some(t) = term {
            let kept = sqlx::query(
                "UPDATE kt_lease SET expires_at = $1
                 WHERE id = 1 AND holder = $2 AND term = $3 AND expires_at > $4",
            )
            .bind(until_ms)
            .bind(holder)
            .bind(t)
            .bind(now_ms)
            .execute(&self.pool)
            .await
            .map_err(Error::db)?;
            if kept.rows_affected() == 1 {
                return Ok(Some(t));
            }
        }
        sqlx::query(
            "INSERT INTO kt_lease (id, holder, term, expires_at) VALUES (1, $1, 1, $2)
             ON CONFLICT (id) DO UPDATE
             SET holder = excluded.holder, term = kt_lease.term + 1, expires_at = excluded.expires_at
             WHERE kt_lease.expires_at <= $3 OR kt_lease.holder = excluded.holder",
        )
        .bind(holder)
        .bind(until_ms)
        .bind(now_ms)
        .execute(&self.pool)
        .await
        .map_err(Error::db)?;
        let row = sqlx::query("SELECT holder, term FROM kt_lease WHERE id = 1")
            .fetch_one(&self.pool)
            .await
            .map_err(Error::db)?;
        let (h, t): (String, i64) = (row.get(0), row.get(1));
        Ok((h == holder).then_some(t))
    }

    /// Ends `holder`'s lease at `term` now, so that another takes it.
    pub async fn release_lease(&self, holder: &str, term: i64) -> Result<(), Error> {
        sqlx::query(
            "UPDATE kt_lease SET expires_at = 0 WHERE id = 1 AND holder = $1 AND term = $2",
        )
        .bind(holder)
        .bind(term)
        .execute(&self.pool)
        .await
        .map_err(Error::db)?;
        Ok(())
    }

    pub async fn root(&self, epoch: u64) -> Result<Option<(Vec<u8>, Vec<u8>)>, Error> {
        let row = sqlx::query("SELECT root_hash, signature FROM kt_roots WHERE epoch = $1")
            .bind(epoch as i64)
            .fetch_optional(&self.pool)
            .await
            .map_err(Error::db)?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }
}

/// Writes inside one identity-change transaction.
pub mod tx {
    use super::*;
    use sqlx::AnyConnection;

    /// Row locks for a read that a write in the same transaction follows:
    /// PostgreSQL's `FOR UPDATE`; SQLite's write transactions are
    /// exclusive already.
    fn for_update(backend: Backend) -> &'static str {
        match backend {
            Backend::Postgres => " FOR UPDATE",
            Backend::Sqlite => "",
        }
    }

    pub async fn session(
        c: &mut AnyConnection,
        backend: Backend,
        id: &[u8],
    ) -> Result<Option<SessionRow>, Error> {
        let row = sqlx::query(&format!(
            "SELECT handle, started_ms, code_mac, sends, last_send_ms, checks, next_check_ms
             FROM verification_sessions WHERE id = $1{}",
            for_update(backend)
        ))
        .bind(id.to_vec())
        .fetch_optional(c)
        .await
        .map_err(Error::db)?;
        Ok(row.map(|r| SessionRow {
            handle: r.get(0),
            started_ms: r.get(1),
            code_mac: r.get(2),
            sends: r.get(3),
            last_send_ms: r.get(4),
            checks: r.get(5),
            next_check_ms: r.get(6),
        }))
    }

    /// Stores a session, or deletes it (None).
    pub async fn put_session(
        c: &mut AnyConnection,
        id: &[u8],
        s: Option<&SessionRow>,
    ) -> Result<(), Error> {
        let Some(s) = s else {
            sqlx::query("DELETE FROM verification_sessions WHERE id = $1")
                .bind(id.to_vec())
                .execute(c)
                .await
                .map_err(Error::db)?;
            return Ok(());
        };
        sqlx::query(
            "INSERT INTO verification_sessions
                (id, handle, started_ms, code_mac, sends, last_send_ms, checks, next_check_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (id) DO UPDATE SET code_mac = excluded.code_mac, sends = excluded.sends,
                last_send_ms = excluded.last_send_ms, checks = excluded.checks,
                next_check_ms = excluded.next_check_ms",
        )
        .bind(id.to_vec())
        .bind(&s.handle)
        .bind(s.started_ms)
        .bind(s.code_mac.clone())
        .bind(s.sends)
        .bind(s.last_send_ms)
        .bind(s.checks)
        .bind(s.next_check_ms)
        .execute(c)
        .await
        .map_err(Error::db)?;
        Ok(())
    }

    pub async fn failures(
        c: &mut AnyConnection,
        backend: Backend,
        handle: &str,
    ) -> Result<Option<FailureRow>, Error> {
        let row = sqlx::query(&format!(
            "SELECT count, last_ms, locked_until_ms FROM verification_failures WHERE handle = $1{}",
            for_update(backend)
        ))
        .bind(handle)
        .fetch_optional(c)
        .await
        .map_err(Error::db)?;
        Ok(row.map(|r| FailureRow {
            count: r.get(0),
            last_ms: r.get(1),
            locked_until_ms: r.get(2),
        }))
    }

    /// Stores a handle's wrong codes, or deletes them (None).
    pub async fn put_failures(
        c: &mut AnyConnection,
        handle: &str,
        f: Option<&FailureRow>,
    ) -> Result<(), Error> {
        let Some(f) = f else {
            sqlx::query("DELETE FROM verification_failures WHERE handle = $1")
                .bind(handle)
                .execute(c)
                .await
                .map_err(Error::db)?;
            return Ok(());
        };
        sqlx::query(
            "INSERT INTO verification_failures (handle, count, last_ms, locked_until_ms)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (handle) DO UPDATE SET count = excluded.count, last_ms = excluded.last_ms,
                locked_until_ms = excluded.locked_until_ms",
        )
        .bind(handle)
        .bind(f.count)
        .bind(f.last_ms)
        .bind(f.locked_until_ms)
        .execute(c)
        .await
        .map_err(Error::db)?;
        Ok(())
    }

    /// Verification sessions started under `key` since `since_ms` (on any
    /// node), and when the oldest of them started.
    pub async fn starts(
        c: &mut AnyConnection,
        key: &str,
        since_ms: i64,
    ) -> Result<(i64, Option<i64>), Error> {
        let r = sqlx::query(
            "SELECT COUNT(*), MIN(at_ms) FROM verification_starts WHERE key = $1 AND at_ms >= $2",
        )
        .bind(key)
        .bind(since_ms)
        .fetch_one(c)
        .await
        .map_err(Error::db)?;
        Ok((r.get(0), r.get(1)))
    }

    /// Counts a session started under `key` at `at_ms`.
    pub async fn record_start(c: &mut AnyConnection, key: &str, at_ms: i64) -> Result<(), Error> {
        sqlx::query("INSERT INTO verification_starts (key, at_ms) VALUES ($1, $2)")
            .bind(key)
            .bind(at_ms)
            .execute(c)
            .await
            .map_err(Error::db)?;
        Ok(())
    }

    /// A handle token (by its SHA-256) proving `handle` until `expires_ms`.
    pub async fn insert_token(
        c: &mut AnyConnection,
        hash: &[u8; 32],
        handle: &str,
        expires_ms: i64,
    ) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO handle_tokens (token_hash, handle, expires_ms) VALUES ($1, $2, $3)",
        )
        .bind(hash.to_vec())
        .bind(handle)
        .bind(expires_ms)
        .execute(c)
        .await
        .map_err(Error::db)?;
        Ok(())
    }

    pub async fn upsert_account(
        c: &mut AnyConnection,
        a: &AccountRow,
        now: i64,
    ) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO accounts (id, account_key, seq, list, created_at) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (id) DO UPDATE SET account_key = excluded.account_key,
                seq = excluded.seq, list = excluded.list",
        )
        .bind(&a.id)
        .bind(a.account_key.clone())
        .bind(a.seq)
        .bind(a.list.clone())
        .bind(now)
        .execute(c)
        .await
        .map_err(Error::db)?;
        Ok(())
    }

    /// Moves an existing account to a new device list, if its list is
    /// still the one at `prev_seq`: the seq check and the write are one
    /// statement in the change's transaction, so of two concurrent
    /// updates from the same seq only one commits (the other gets 409).
    /// It runs first in the transaction: on PostgreSQL it takes the row
    /// lock that makes a concurrent updater wait, then fail.
    pub async fn advance_account(
        c: &mut AnyConnection,
        a: &AccountRow,
        prev_seq: i64,
    ) -> Result<(), Error> {
        let done = sqlx::query(
            "UPDATE accounts SET account_key = $2, seq = $3, list = $4
             WHERE id = $1 AND seq = $5 AND $3 > seq",
        )
        .bind(&a.id)
        .bind(a.account_key.clone())
        .bind(a.seq)
        .bind(a.list.clone())
        .bind(prev_seq)
        .execute(c)
        .await
        .map_err(Error::db)?;
        if done.rows_affected() != 1 {
            return Err(Error::Conflict(format!(
                "the device list changed meanwhile (it is no longer at seq {prev_seq}); read it again"
            )));
        }
        Ok(())
    }

    /// Binds a handle to an account. Fails with `HandleTaken` if another
    /// account holds it.
    pub async fn bind_handle(
        c: &mut AnyConnection,
        uri: &str,
        account_id: &str,
    ) -> Result<(), Error> {
        let owner: Option<String> = sqlx::query("SELECT account_id FROM handles WHERE uri = $1")
            .bind(uri)
            .fetch_optional(&mut *c)
            .await
            .map_err(Error::db)?
            .map(|r| r.get(0));
        match owner {
            Some(o) if o == account_id => Ok(()),
            Some(_) => Err(Error::HandleTaken),
            None => {
                // Another transaction may bind it between our read and this
                // insert (PostgreSQL, read committed): that is HandleTaken too.
                sqlx::query("INSERT INTO handles (uri, account_id) VALUES ($1, $2)")
                    .bind(uri)
                    .bind(account_id)
                    .execute(c)
                    .await
                    .map_err(|e| unique_or(e, Error::HandleTaken))?;
                Ok(())
            }
        }
    }

    pub async fn unbind_handle(c: &mut AnyConnection, uri: &str) -> Result<(), Error> {
        sqlx::query("DELETE FROM handles WHERE uri = $1")
            .bind(uri)
            .execute(c)
            .await
            .map_err(Error::db)?;
        Ok(())
    }

    pub async fn insert_device(c: &mut AnyConnection, d: &DeviceRow) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO devices (id, account_id, identity_key, name, capabilities, push_tokens,
                cert_serial, certificate, created_at, revoked_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, NULL)",
        )
        .bind(d.id.to_string())
        .bind(&d.account_id)
        .bind(d.identity_key.clone())
        .bind(&d.name)
        .bind(&d.capabilities)
        .bind(&d.push_tokens)
        .bind(&d.cert_serial)
        .bind(&d.certificate)
        .bind(d.created_at)
        .execute(c)
        .await
        .map_err(|e| unique_or(e, Error::DeviceExists))?;
        Ok(())
    }

    pub async fn revoke_device(c: &mut AnyConnection, id: &str, now: i64) -> Result<(), Error> {
        sqlx::query("UPDATE devices SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
            .bind(now)
            .bind(id)
            .execute(c)
            .await
            .map_err(Error::db)?;
        Ok(())
    }

    /// Personal data goes; the serial stays for the revocation list.
    pub async fn scrub_device(c: &mut AnyConnection, id: &str) -> Result<(), Error> {
        sqlx::query(
            "UPDATE devices SET name = '', capabilities = '[]', push_tokens = '[]', certificate = ''
             WHERE id = $1",
        )
        .bind(id)
        .execute(&mut *c)
        .await
        .map_err(Error::db)?;
        forget_rotated_key(c, id).await
    }

    /// Drops the account key sealed to `device` by an earlier rotation.
    pub async fn forget_rotated_key(c: &mut AnyConnection, device: &str) -> Result<(), Error> {
        sqlx::query("DELETE FROM account_key_seals WHERE device_id = $1")
            .bind(device)
            .execute(c)
            .await
            .map_err(Error::db)?;
        Ok(())
    }

    /// Keeps the rotated account key sealed to `device` (replacing an
    /// older one) until the device fetches it again or is removed.
    pub async fn seal_rotated_key(
        c: &mut AnyConnection,
        device: &str,
        account_id: &str,
        seq: i64,
        sealed: &[u8],
    ) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO account_key_seals (device_id, account_id, seq, sealed)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (device_id) DO UPDATE
             SET account_id = excluded.account_id, seq = excluded.seq, sealed = excluded.sealed",
        )
        .bind(device)
        .bind(account_id)
        .bind(seq)
        .bind(sealed.to_vec())
        .execute(c)
        .await
        .map_err(Error::db)?;
        Ok(())
    }

    /// Marks a pending reset done with the new device's registration; false
    /// if it was no longer pending (done or cancelled meanwhile).
    pub async fn finish_reset(
        c: &mut AnyConnection,
        id: &str,
        result: &str,
    ) -> Result<bool, Error> {
        let r = sqlx::query(
            "UPDATE pending_resets SET state = 1, result = $1 WHERE id = $2 AND state = 0",
        )
        .bind(result)
        .bind(id)
        .execute(c)
        .await
        .map_err(Error::db)?;
        Ok(r.rows_affected() == 1)
    }

    pub async fn event(
        c: &mut AnyConnection,
        account_id: &str,
        kind: &str,
        device_id: Option<&str>,
        now: i64,
    ) -> Result<(), Error> {
        sqlx::query("INSERT INTO events (account_id, kind, device_id, at) VALUES ($1, $2, $3, $4)")
            .bind(account_id)
            .bind(kind)
            .bind(device_id)
            .bind(now)
            .execute(c)
            .await
            .map_err(Error::db)?;
        Ok(())
    }

    pub async fn queue_publish(
        c: &mut AnyConnection,
        uri: &str,
        value: &[u8],
        now: i64,
    ) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO kt_pending (uri, value, queued_at) VALUES ($1, $2, $3)
             ON CONFLICT (uri) DO UPDATE SET value = excluded.value, queued_at = excluded.queued_at",
        )
        .bind(uri)
        .bind(value.to_vec())
        .bind(now)
        .execute(c)
        .await
        .map_err(Error::db)?;
        Ok(())
    }

    pub async fn approve_link(
        c: &mut AnyConnection,
        code_hash: &[u8],
        sealed_account_key: Option<&[u8]>,
    ) -> Result<(), Error> {
        sqlx::query("UPDATE links SET approved = 1, sealed_account_key = $1 WHERE code_hash = $2")
            .bind(sealed_account_key.map(<[u8]>::to_vec))
            .bind(code_hash.to_vec())
            .execute(c)
            .await
            .map_err(Error::db)?;
        Ok(())
    }

    pub async fn delete_account_rows(c: &mut AnyConnection, id: &str) -> Result<(), Error> {
        for q in [
            "DELETE FROM accounts WHERE id = $1",
            "DELETE FROM links WHERE account_id = $1",
            "DELETE FROM events WHERE account_id = $1",
            "DELETE FROM account_key_seals WHERE account_id = $1",
        ] {
            sqlx::query(q)
                .bind(id)
                .execute(&mut *c)
                .await
                .map_err(Error::db)?;
        }
        Ok(())
    }
}

/// `conflict` for a unique-constraint violation, else a database error.
fn unique_or(e: sqlx::Error, conflict: Error) -> Error {
    if e.as_database_error()
        .is_some_and(|d| d.is_unique_violation())
    {
        conflict
    } else {
        Error::db(e)
    }
}

const DEVICE_SELECT: &str = "SELECT id, account_id, identity_key, name, capabilities, push_tokens,
    cert_serial, certificate, created_at, revoked_at FROM devices";

fn device_row(r: sqlx::any::AnyRow) -> Result<DeviceRow, Error> {
    let id: String = r.get(0);
    Ok(DeviceRow {
        id: id
            .parse()
            .map_err(|_| Error::Internal(format!("bad device id in database: {id}")))?,
        account_id: r.get(1),
        identity_key: r.get(2),
        name: r.get(3),
        capabilities: r.get(4),
        push_tokens: r.get(5),
        cert_serial: r.get(6),
        certificate: r.get(7),
        created_at: r.get(8),
        revoked_at: r.get(9),
    })
}

const RESET_SELECT: &str = "SELECT id, device_key, list, name, capabilities, accounts,
    created_at, effective_at, state, result FROM pending_resets";

fn reset_row(r: sqlx::any::AnyRow) -> Result<ResetRow, Error> {
    let accounts: String = r.get(5);
    Ok(ResetRow {
        id: r.get(0),
        device_key: r.get(1),
        list: r.get(2),
        name: r.get(3),
        capabilities: r.get(4),
        accounts: serde_json::from_str(&accounts).map_err(|e| Error::Internal(e.to_string()))?,
        created_at: r.get(6),
        effective_at: r.get(7),
        state: match r.get::<i64, _>(8) {
            0 => ResetState::Pending,
            1 => ResetState::Done,
            _ => ResetState::Cancelled,
        },
        result: r.get(9),
    })
}

const LINK_SELECT: &str = "SELECT code_hash, account_id, expires_at, claim_device, claim_key,
    claim_name, claim_capabilities, claim_transfer_key, sealed_account_key, approved FROM links";

fn link_row(r: sqlx::any::AnyRow) -> LinkRow {
    LinkRow {
        code_hash: r.get(0),
        account_id: r.get(1),
        expires_at: r.get(2),
        claim_device: r.get(3),
        claim_key: r.get(4),
        claim_name: r.get(5),
        claim_capabilities: r.get(6),
        claim_transfer_key: r.get(7),
        sealed_account_key: r.get(8),
        approved: r.get::<i64, _>(9) != 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The guarded upsert behind shared budgets, on SQLite (the tests of
    /// two nodes run it on PostgreSQL).
    #[tokio::test]
    async fn budgets_take_all_or_nothing_and_refill() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("sqlite://{}", dir.path().join("ids.db").display()))
            .await
            .unwrap();
        let budget = |key: &str| Budget {
            key: key.into(),
            capacity: 4.0,
            per_token: Duration::from_secs(2),
        };
        let both = [budget("a"), budget("b")];
        let t0 = 1_000_000;
        assert_eq!(store.spend_budgets(&both, 3, t0).await.unwrap(), None);
        // One left in each: two more are refused, and take nothing.
        assert_eq!(
            store.spend_budgets(&both, 2, t0).await.unwrap(),
            Some(Duration::from_secs(2))
        );
        assert_eq!(store.spend_budgets(&both[..1], 1, t0).await.unwrap(), None);
        // "b" still has its one; "a" is empty until it earns one in 2 s.
        assert!(store.spend_budgets(&both, 1, t0).await.unwrap().is_some());
        assert_eq!(store.spend_budgets(&both[1..], 1, t0).await.unwrap(), None);
        assert_eq!(
            store.spend_budgets(&both, 1, t0 + 2_000).await.unwrap(),
            None
        );
        // Refills stop at the capacity.
        let later = t0 + 3_600_000;
        assert_eq!(store.spend_budgets(&both, 4, later).await.unwrap(), None);
        assert!(store
            .spend_budgets(&both, 1, later)
            .await
            .unwrap()
            .is_some());
    }
}
