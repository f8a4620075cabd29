//! Durable state on sqlx: SQLite (default; WAL, `synchronous = FULL`) or
//! PostgreSQL (by URL).
//!
//! Writes go through one writer task ([`crate::courier`]) that commits
//! many pushes per transaction (group commit), so a push is on disk before
//! its 2xx and the fsync cost is shared. Messages keep their row after
//! delivery (state changes, payload cleared) for the delivery-status
//! endpoint and receipts, until `status_retention` passes.
//!
//! Every index grows at its end, so a batch touches few pages: rows are
//! keyed by the courier's increasing sequence number, queued rows are
//! found through a partial index on it (the courier's memory knows which
//! sequence numbers each device has waiting), and ids the courier makes
//! are time-ordered. An index keyed by device would put every row of a
//! batch on a different page.

use sqlx::{AnyPool, Row};
use wire::push::{DeviceToken, Notification, NotificationId, PushType};
use wire::DeviceId;

use crate::error::Error;

mod platform;

pub use platform::{Owed, Registered};
pub use sqlstore::Backend;

/// Where a message is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageState {
    Queued = 0,
    Delivered = 1,
    Expired = 2,
    /// Dropped because the device's queue was full.
    Dropped = 3,
    /// Replaced by a newer message with the same collapse id or Topic.
    Replaced = 4,
    /// Its token was revoked before delivery.
    Unregistered = 5,
}

impl MessageState {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageState::Queued => "queued",
            MessageState::Delivered => "delivered",
            MessageState::Expired => "expired",
            MessageState::Dropped => "dropped",
            MessageState::Replaced => "replaced",
            MessageState::Unregistered => "unregistered",
        }
    }

    fn from_i64(v: i64) -> MessageState {
        match v {
            1 => MessageState::Delivered,
            2 => MessageState::Expired,
            3 => MessageState::Dropped,
            4 => MessageState::Replaced,
            5 => MessageState::Unregistered,
            _ => MessageState::Queued,
        }
    }
}

/// What kind of address a token is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// An APNs-style device token for one app topic.
    Topic = 0,
    /// A Web Push subscription.
    WebPush = 1,
}

/// A token row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    pub token: DeviceToken,
    pub device: DeviceId,
    pub topic: String,
    pub kind: TokenKind,
    /// The VAPID key a Web Push subscription is restricted to.
    pub server_key: Option<Vec<u8>>,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

/// A message as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub seq: i64,
    pub device: DeviceId,
    pub note: Notification,
    /// Web Push receipt subscription to report delivery to.
    pub receipt: Option<String>,
    /// Which provider sent it (for status queries).
    pub provider: String,
    pub created_at: i64,
}

/// One message's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub id: NotificationId,
    pub state: MessageState,
    pub provider: String,
    pub updated_at: i64,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tokens (
    token {blob} PRIMARY KEY,
    device TEXT NOT NULL,
    topic TEXT NOT NULL,
    kind BIGINT NOT NULL,
    server_key {blob},
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE INDEX IF NOT EXISTS tokens_device ON tokens (device);
CREATE INDEX IF NOT EXISTS tokens_revoked ON tokens (revoked_at) WHERE revoked_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS messages (
    seq BIGINT PRIMARY KEY,
    id {blob} NOT NULL,
    device TEXT NOT NULL,
    token {blob} NOT NULL,
    push_type BIGINT NOT NULL,
    priority BIGINT NOT NULL,
    expires BIGINT NOT NULL,
    collapse TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload {blob},
    receipt TEXT,
    provider TEXT NOT NULL,
    state BIGINT NOT NULL,
    receipt_sent BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_live ON messages (seq) WHERE state = 0;
CREATE INDEX IF NOT EXISTS messages_id ON messages (id);
CREATE INDEX IF NOT EXISTS messages_receipt ON messages (receipt, receipt_sent)
    WHERE receipt IS NOT NULL;
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    next BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS receipt_subscriptions (
    id TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS courier_shards (
    shard BIGINT PRIMARY KEY,
    holder TEXT NOT NULL DEFAULT '',
    term BIGINT NOT NULL DEFAULT 0,
    expires_at BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS courier_nodes (
    node TEXT PRIMARY KEY,
    expires_at BIGINT NOT NULL
)
";

/// Batch statements come in these row counts only (largest first), so a
/// handful of prepared statements serve every batch: preparing a new
/// 500-row statement per batch would cost more than it saves. 256 rows of
/// 13 parameters stay under SQLite's 32766.
const SHAPES: [usize; 4] = [256, 32, 4, 1];

/// Splits `items` into chunks whose lengths are in [`SHAPES`].
fn shaped<T>(mut items: &[T]) -> Vec<&[T]> {
    let mut out = Vec::new();
    for size in SHAPES {
        while items.len() >= size {
            let (h, t) = items.split_at(size);
            out.push(h);
            items = t;
        }
    }
    out
}

/// The batch's state changes, in order, with consecutive changes to the
/// same state at the same time joined into one: every push to a full
/// queue drops one message and every ack marks one, and a statement per
/// message cost a round trip to SQLite's worker thread each (a flood to
/// full queues ran at half the rate). Only neighbours are joined, so a
/// message named by two changes still gets the first (updates apply to
/// queued rows only).
fn merged_states(writes: &[Write]) -> Vec<(MessageState, i64, Vec<i64>)> {
    let mut out: Vec<(MessageState, i64, Vec<i64>)> = Vec::new();
    for w in writes {
        if let Write::State { seqs, state, at } = w {
            match out.last_mut() {
                Some((s, a, all)) if s == state && a == at => all.extend_from_slice(seqs),
                _ => out.push((*state, *at, seqs.clone())),
            }
        }
    }
    out
}

#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

/// A write the writer task applies inside its batch transaction.
#[derive(Debug)]
pub enum Write {
    Insert(Box<StoredMessage>),
    /// Sets the state of queued messages by sequence number (acks, expiry,
    /// displacement).
    State {
        seqs: Vec<i64>,
        state: MessageState,
        at: i64,
    },
    Token(TokenRow),
    Revoke {
        token: DeviceToken,
        at: i64,
    },
    ReceiptSubscription {
        id: String,
        provider: String,
        at: i64,
    },
    ReceiptsSent {
        seqs: Vec<i64>,
    },
    /// A wake-up through the device's platform token is owed from this
    /// batch on (see [`Owed`]).
    Owe(Owed),
    /// The wake-up owed to `device` for pushes up to `seq` was taken.
    OwedDone {
        device: DeviceId,
        seq: i64,
    },
    /// The batch commits only if this node still holds `shard`'s lease at
    /// `term` (cluster mode): the writes of a node that lost the lease
    /// (paused, partitioned) are refused, whole.
    Fence {
        shard: u16,
        term: i64,
    },
}

impl Store {
    /// Opens (creating if needed) `sqlite:///path/courier.db` or
    /// `postgres://user@host/db`.
    pub async fn open(url: &str) -> Result<Store, Error> {
        Store::open_with(url, true).await
    }

    /// As [`Store::open`]; with `fsync` false, SQLite commits without
    /// waiting for the disk (`synchronous = NORMAL` in WAL mode): a commit
    /// survives the process being killed, not the machine losing power.
    pub async fn open_with(url: &str, fsync: bool) -> Result<Store, Error> {
        let (pool, backend) = sqlstore::open(
            url,
            sqlstore::Options {
                fsync,
                ..sqlstore::Options::default()
            },
        )
        .await
        .map_err(Error::from_sqlstore)?;
        let store = Store { pool, backend };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), Error> {
        for schema in [SCHEMA, platform::SCHEMA] {
            sqlstore::migrate(&self.pool, self.backend, schema)
                .await
                .map_err(Error::from_sqlstore)?;
        }
        Ok(())
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Parameter `i` (1-based) in a statement whose parameters are all in
    /// order. SQLite gets `?`: sqlx resolves `$N` names one by one through
    /// SQLite's linear name list, which is quadratic in a 3000-parameter
    /// batch statement.
    fn param(&self, i: usize) -> String {
        match self.backend {
            Backend::Sqlite => "?".to_owned(),
            Backend::Postgres => format!("${i}"),
        }
    }

    /// `n` parameters from `first` on, comma-separated.
    fn placeholders(&self, first: usize, n: usize) -> String {
        (first..first + n)
            .map(|i| self.param(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Applies a batch of writes in one transaction, as few statements as
    /// possible: tokens, then messages (multi-row inserts), then state
    /// changes (one statement per state), then the rest.
    pub async fn apply(&self, writes: &[Write]) -> Result<(), Error> {
        let mut tx = match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
            Backend::Postgres => self.pool.begin().await,
        }
        .map_err(Error::db)?;
        self.check_fences(&mut tx, writes).await?;
        let mut inserts: Vec<&StoredMessage> = Vec::new();
        let states = merged_states(writes);
        for w in writes {
            match w {
                Write::Insert(m) => inserts.push(m),
                Write::Token(t) => {
                    sqlx::query(
                        "INSERT INTO tokens (token, device, topic, kind, server_key, created_at) \
                         VALUES ($1, $2, $3, $4, $5, $6)",
                    )
                    .bind(t.token.0.to_vec())
                    .bind(t.device.to_string())
                    .bind(t.topic.clone())
                    .bind(t.kind as i64)
                    .bind(t.server_key.clone())
                    .bind(t.created_at)
                    .execute(&mut *tx)
                    .await
                    .map_err(Error::db)?;
                }
                _ => {}
            }
        }
        for chunk in shaped(&inserts) {
            let mut sql = String::from(
                "INSERT INTO messages (seq, id, device, token, push_type, priority, expires, \
                 collapse, topic, payload, receipt, provider, state, created_at, updated_at) VALUES ",
            );
            for i in 0..chunk.len() {
                if i > 0 {
                    sql.push(',');
                }
                sql.push('(');
                for c in 1..=12 {
                    sql.push_str(&self.param(i * 13 + c));
                    sql.push(',');
                }
                // created_at and updated_at: the 13th value, bound twice
                // (positional `?` cannot repeat).
                sql.push_str(&format!(
                    "0,{},{})",
                    self.param(i * 13 + 13),
                    self.param(i * 13 + 13)
                ));
            }
            let mut q = sqlx::query(&sql);
            for m in chunk {
                let n = &m.note;
                // Borrowed: the writes outlive the statement.
                q = q
                    .bind(m.seq)
                    .bind(&n.id.0[..])
                    .bind(m.device.to_string())
                    .bind(&n.token.0[..])
                    .bind(push_type_code(n.push_type))
                    .bind(i64::from(n.priority))
                    .bind(n.expires as i64)
                    .bind(n.collapse_id.as_str())
                    .bind(n.topic.as_str())
                    .bind(&n.payload[..])
                    .bind(m.receipt.as_deref())
                    .bind(m.provider.as_str())
                    .bind(m.created_at);
                if self.backend == Backend::Sqlite {
                    q = q.bind(m.created_at);
                }
            }
            q.execute(&mut *tx).await.map_err(Error::db)?;
        }
        for (state, at, seqs) in states {
            for chunk in shaped(&seqs) {
                let sql = format!(
                    "UPDATE messages SET state = {}, updated_at = {}, payload = NULL \
                     WHERE state = 0 AND seq IN ({})",
                    self.param(1),
                    self.param(2),
                    self.placeholders(3, chunk.len())
                );
                let mut q = sqlx::query(&sql).bind(state as i64).bind(at);
                for s in chunk {
                    q = q.bind(*s);
                }
                q.execute(&mut *tx).await.map_err(Error::db)?;
            }
        }
        for w in writes {
            match w {
                Write::Revoke { token, at } => {
                    // Its queued messages arrive as a State write.
                    sqlx::query(
                        "UPDATE tokens SET revoked_at = $1 WHERE token = $2 AND revoked_at IS NULL",
                    )
                    .bind(*at)
                    .bind(token.0.to_vec())
                    .execute(&mut *tx)
                    .await
                    .map_err(Error::db)?;
                }
                Write::ReceiptSubscription { id, provider, at } => {
                    sqlx::query(
                        "INSERT INTO receipt_subscriptions (id, provider, created_at) \
                         VALUES ($1, $2, $3)",
                    )
                    .bind(id.clone())
                    .bind(provider.clone())
                    .bind(*at)
                    .execute(&mut *tx)
                    .await
                    .map_err(Error::db)?;
                }
                Write::ReceiptsSent { seqs } => {
                    for chunk in shaped(seqs) {
                        let sql = format!(
                            "UPDATE messages SET receipt_sent = 1 WHERE seq IN ({})",
                            self.placeholders(1, chunk.len())
                        );
                        let mut q = sqlx::query(&sql);
                        for s in chunk {
                            q = q.bind(*s);
                        }
                        q.execute(&mut *tx).await.map_err(Error::db)?;
                    }
                }
                _ => {}
            }
        }
        self.owe_all(&mut tx, writes, crate::courier::unix_now())
            .await?;
        tx.commit().await.map_err(Error::db)
    }

    /// Checks the batch's fences first thing in its transaction, locking
    /// the lease rows until commit so that no takeover (an update of the
    /// row) comes between the check and the commit.
    async fn check_fences(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        writes: &[Write],
    ) -> Result<(), Error> {
        let mut fences: Vec<(u16, i64)> = writes
            .iter()
            .filter_map(|w| match w {
                Write::Fence { shard, term } => Some((*shard, *term)),
                _ => None,
            })
            .collect();
        if fences.is_empty() {
            return Ok(());
        }
        fences.sort_unstable();
        fences.dedup();
        let lock = match self.backend {
            Backend::Postgres => " FOR SHARE",
            Backend::Sqlite => "",
        };
        let sql = format!(
            "SELECT shard, term, expires_at FROM courier_shards WHERE shard IN ({}){lock}",
            self.placeholders(1, fences.len())
        );
        let mut q = sqlx::query(&sql);
        for (shard, _) in &fences {
            q = q.bind(i64::from(*shard));
        }
        let rows = q.fetch_all(&mut **tx).await.map_err(Error::db)?;
        let held: std::collections::HashMap<i64, (i64, i64)> = rows
            .iter()
            .map(|r| (r.get::<i64, _>(0), (r.get::<i64, _>(1), r.get::<i64, _>(2))))
            .collect();
        let now = crate::courier::unix_now_ms();
        for (shard, term) in fences {
            match held.get(&i64::from(shard)) {
                Some((t, until)) if *t == term && *until > now => {}
                _ => return Err(Error::Fenced(shard)),
            }
        }
        Ok(())
    }

    /// Makes the lease rows of `shards` shards (cluster mode).
    pub async fn ensure_shards(&self, shards: u16) -> Result<(), Error> {
        let values: Vec<String> = (0..shards).map(|s| format!("({s})")).collect();
        sqlx::query(&format!(
            "INSERT INTO courier_shards (shard) VALUES {} ON CONFLICT (shard) DO NOTHING",
            values.join(",")
        ))
        .execute(&self.pool)
        .await
        .map_err(Error::db)?;
        Ok(())
    }

    /// Extends every lease `node` still holds to `until_ms`; returns them
    /// as (shard, term). A lease that ran out is not extended: someone may
    /// have taken it, and the node has stopped serving it anyway.
    pub async fn renew_shards(
        &self,
        node: &str,
        until_ms: i64,
        now_ms: i64,
    ) -> Result<Vec<(u16, i64)>, Error> {
        let rows = sqlx::query(
            "UPDATE courier_shards SET expires_at = $1 \
             WHERE holder = $2 AND expires_at > $3 RETURNING shard, term",
        )
        .bind(until_ms)
        .bind(node)
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::db)?;
        Ok(shard_terms(rows))
    }

    /// Takes up to `want` shards whose lease ran out (at random, so nodes
    /// starting together spread), each with its term raised; returns them.
    pub async fn claim_shards(
        &self,
        node: &str,
        want: usize,
        until_ms: i64,
        now_ms: i64,
    ) -> Result<Vec<(u16, i64)>, Error> {
        if want == 0 {
            return Ok(Vec::new());
        }
        let skip = match self.backend {
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        };
        let rows = sqlx::query(&format!(
            "UPDATE courier_shards SET holder = $1, term = term + 1, expires_at = $2 \
             WHERE expires_at <= $3 AND shard IN (SELECT shard FROM courier_shards \
             WHERE expires_at <= $3 ORDER BY random() LIMIT $4{skip}) RETURNING shard, term"
        ))
        .bind(node)
        .bind(until_ms)
        .bind(now_ms)
        .bind(want as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::db)?;
        Ok(shard_terms(rows))
    }

    /// Every shard's lease: (shard, holder, term, expires_at ms).
    pub async fn shard_leases(&self) -> Result<Vec<(u16, String, i64, i64)>, Error> {
        let rows = sqlx::query(
            "SELECT shard, holder, term, expires_at FROM courier_shards ORDER BY shard",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(Error::db)?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<i64, _>(0) as u16, r.get(1), r.get(2), r.get(3)))
            .collect())
    }

    /// Gives up `node`'s lease on `shard` at `term` now.
    pub async fn release_shard(&self, node: &str, shard: u16, term: i64) -> Result<(), Error> {
        sqlx::query(
            "UPDATE courier_shards SET expires_at = 0 \
             WHERE shard = $1 AND holder = $2 AND term = $3",
        )
        .bind(i64::from(shard))
        .bind(node)
        .bind(term)
        .execute(&self.pool)
        .await
        .map_err(Error::db)?;
        Ok(())
    }

    /// Says `node` is alive until `until_ms`; returns how many nodes are
    /// (this one included). Nodes gone for an hour are forgotten.
    pub async fn heartbeat(&self, node: &str, until_ms: i64, now_ms: i64) -> Result<usize, Error> {
        sqlx::query(
            "INSERT INTO courier_nodes (node, expires_at) VALUES ($1, $2) \
             ON CONFLICT (node) DO UPDATE SET expires_at = excluded.expires_at",
        )
        .bind(node)
        .bind(until_ms)
        .execute(&self.pool)
        .await
        .map_err(Error::db)?;
        sqlx::query("DELETE FROM courier_nodes WHERE expires_at < $1")
            .bind(now_ms - 3_600_000)
            .execute(&self.pool)
            .await
            .map_err(Error::db)?;
        let r = sqlx::query("SELECT COUNT(*) FROM courier_nodes WHERE expires_at > $1")
            .bind(now_ms)
            .fetch_one(&self.pool)
            .await
            .map_err(Error::db)?;
        Ok(r.get::<i64, _>(0).max(1) as usize)
    }

    /// Every token, for the in-memory index at start.
    pub async fn tokens(&self) -> Result<Vec<TokenRow>, Error> {
        self.tokens_where("", None).await
    }

    /// One token, whichever node made it.
    pub async fn token(&self, token: &DeviceToken) -> Result<Option<TokenRow>, Error> {
        let rows = self
            .tokens_where("WHERE token = $1", Some(token.0.to_vec()))
            .await?;
        Ok(rows.into_iter().next())
    }

    /// A device's tokens, whichever node made them.
    pub async fn tokens_of(&self, device: DeviceId) -> Result<Vec<TokenRow>, Error> {
        let rows = sqlx::query(&format!("{TOKEN_COLS} FROM tokens WHERE device = $1"))
            .bind(device.to_string())
            .fetch_all(&self.pool)
            .await
            .map_err(Error::db)?;
        rows.into_iter().map(token_row).collect()
    }

    /// Tokens revoked at or after `since` (Unix seconds), by any node.
    pub async fn revoked_since(&self, since: i64) -> Result<Vec<TokenRow>, Error> {
        let rows = sqlx::query(&format!("{TOKEN_COLS} FROM tokens WHERE revoked_at >= $1"))
            .bind(since)
            .fetch_all(&self.pool)
            .await
            .map_err(Error::db)?;
        rows.into_iter().map(token_row).collect()
    }

    async fn tokens_where(
        &self,
        clause: &str,
        blob: Option<Vec<u8>>,
    ) -> Result<Vec<TokenRow>, Error> {
        let sql = format!("{TOKEN_COLS} FROM tokens {clause}");
        let mut q = sqlx::query(&sql);
        if let Some(b) = blob {
            q = q.bind(b);
        }
        let rows = q.fetch_all(&self.pool).await.map_err(Error::db)?;
        rows.into_iter().map(token_row).collect()
    }

    /// Every queued message without its payload, for the in-memory
    /// queue index at start.
    pub async fn queued_index(&self) -> Result<Vec<StoredMessage>, Error> {
        let rows = sqlx::query(&format!(
            "{MESSAGE_COLS_NO_PAYLOAD} FROM messages WHERE state = 0 ORDER BY seq"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(Error::db)?;
        rows.into_iter().map(message_row).collect()
    }

    /// The queued messages of devices whose ids start with one of the
    /// bytes `shards`, without payloads: the queue index of shards a node
    /// takes over, in one scan. Device ids are stored as lower-case hex,
    /// so a shard is a range of them.
    pub async fn queued_index_of(&self, shards: &[u8]) -> Result<Vec<StoredMessage>, Error> {
        if shards.is_empty() {
            return Ok(Vec::new());
        }
        let ranges: Vec<String> = (0..shards.len())
            .map(|i| {
                format!(
                    "(device >= {} AND device < {})",
                    self.param(2 * i + 1),
                    self.param(2 * i + 2)
                )
            })
            .collect();
        let sql = format!(
            "{MESSAGE_COLS_NO_PAYLOAD} FROM messages WHERE state = 0 AND ({}) ORDER BY seq",
            ranges.join(" OR ")
        );
        let mut q = sqlx::query(&sql);
        for s in shards {
            // Past "ff…" come no hex digits.
            let hi = s
                .checked_add(1)
                .map_or_else(|| "g".to_owned(), |n| format!("{n:02x}"));
            q = q.bind(format!("{s:02x}")).bind(hi);
        }
        let rows = q.fetch_all(&self.pool).await.map_err(Error::db)?;
        rows.into_iter().map(message_row).collect()
    }

    /// The queued messages among `seqs`, with payloads, in sequence order.
    pub async fn queued_by_seq(&self, seqs: &[i64]) -> Result<Vec<StoredMessage>, Error> {
        let mut out = Vec::with_capacity(seqs.len());
        for chunk in shaped(seqs) {
            let sql = format!(
                "{MESSAGE_COLS} FROM messages WHERE state = 0 AND seq IN ({})",
                self.placeholders(1, chunk.len())
            );
            let mut q = sqlx::query(&sql);
            for s in chunk {
                q = q.bind(*s);
            }
            for r in q.fetch_all(&self.pool).await.map_err(Error::db)? {
                out.push(message_row(r)?);
            }
        }
        out.sort_by_key(|m| m.seq);
        Ok(out)
    }

    /// One round trip to the database: whether it answers.
    pub async fn ping(&self) -> Result<(), Error> {
        sqlstore::ping(&self.pool)
            .await
            .map_err(Error::from_sqlstore)
    }

    /// Reserves `n` message sequence numbers for this node alone: every
    /// courier on the database takes its numbers from one counter row, so
    /// two never hand out the same (the counter starts past the messages a
    /// database already holds).
    pub async fn reserve_seqs(&self, n: i64) -> Result<std::ops::Range<i64>, Error> {
        sqlx::query(
            // `WHERE true`: SQLite reads `ON` after a bare `FROM messages`
            // as a join's.
            "INSERT INTO counters (name, next) \
             SELECT 'messages', COALESCE(MAX(seq), 0) + 1 FROM messages WHERE true \
             ON CONFLICT (name) DO NOTHING",
        )
        .execute(&self.pool)
        .await
        .map_err(Error::db)?;
        let r = sqlx::query(
            "UPDATE counters SET next = next + $1 WHERE name = 'messages' RETURNING next",
        )
        .bind(n)
        .fetch_one(&self.pool)
        .await
        .map_err(Error::db)?;
        let end: i64 = r.get(0);
        Ok(end - n..end)
    }

    /// The latest status of a message id sent by `provider`.
    pub async fn status(&self, id: &NotificationId) -> Result<Option<Status>, Error> {
        let r = sqlx::query(
            "SELECT state, provider, updated_at FROM messages WHERE id = $1 \
             ORDER BY seq DESC LIMIT 1",
        )
        .bind(id.0.to_vec())
        .fetch_optional(&self.pool)
        .await
        .map_err(Error::db)?;
        Ok(r.map(|r| Status {
            id: *id,
            state: MessageState::from_i64(r.get(0)),
            provider: r.get(1),
            updated_at: r.get(2),
        }))
    }

    /// The provider that owns a receipt subscription.
    pub async fn receipt_subscription(&self, id: &str) -> Result<Option<String>, Error> {
        let r = sqlx::query("SELECT provider FROM receipt_subscriptions WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(Error::db)?;
        Ok(r.map(|r| r.get(0)))
    }

    /// Finished messages on a receipt subscription not yet reported:
    /// (seq, id, state).
    pub async fn pending_receipts(
        &self,
        sub: &str,
    ) -> Result<Vec<(i64, NotificationId, MessageState)>, Error> {
        let rows = sqlx::query(
            "SELECT seq, id, state FROM messages WHERE receipt = $1 AND receipt_sent = 0 \
             AND state <> 0 ORDER BY seq LIMIT 100",
        )
        .bind(sub)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::db)?;
        rows.into_iter()
            .map(|r| {
                Ok((
                    r.get(0),
                    NotificationId(blob_array(r.get::<Vec<u8>, _>(1))?),
                    MessageState::from_i64(r.get(2)),
                ))
            })
            .collect()
    }

    /// Deletes finished messages with a sequence number below `before`.
    /// Forgets receipt subscriptions made before `before` (unix seconds).
    pub async fn purge_receipt_subscriptions(&self, before: i64) -> Result<u64, Error> {
        let r = sqlx::query("DELETE FROM receipt_subscriptions WHERE created_at < $1")
            .bind(before)
            .execute(&self.pool)
            .await
            .map_err(Error::db)?;
        Ok(r.rows_affected())
    }

    /// Deletes the statuses of finished messages numbered below `before`
    /// and last changed before `changed_before` (Unix seconds). Numbers come
    /// in blocks per node, so a low number may still be recent: the time
    /// keeps those.
    pub async fn purge(&self, before: i64, changed_before: i64) -> Result<u64, Error> {
        let r =
            sqlx::query("DELETE FROM messages WHERE seq < $1 AND state <> 0 AND updated_at < $2")
                .bind(before)
                .bind(changed_before)
                .execute(&self.pool)
                .await
                .map_err(Error::db)?;
        Ok(r.rows_affected())
    }
}

fn shard_terms(rows: Vec<sqlx::any::AnyRow>) -> Vec<(u16, i64)> {
    rows.iter()
        .map(|r| (r.get::<i64, _>(0) as u16, r.get::<i64, _>(1)))
        .collect()
}

const TOKEN_COLS: &str = "SELECT token, device, topic, kind, server_key, created_at, revoked_at";

fn token_row(r: sqlx::any::AnyRow) -> Result<TokenRow, Error> {
    Ok(TokenRow {
        token: DeviceToken(blob_array(r.get::<Vec<u8>, _>(0))?),
        device: device_id(&r.get::<String, _>(1))?,
        topic: r.get(2),
        kind: if r.get::<i64, _>(3) == 1 {
            TokenKind::WebPush
        } else {
            TokenKind::Topic
        },
        server_key: r.get(4),
        created_at: r.get(5),
        revoked_at: r.get(6),
    })
}

const MESSAGE_COLS: &str = "SELECT seq, id, device, token, push_type, priority, expires, \
                            collapse, topic, payload, receipt, provider, created_at";
const MESSAGE_COLS_NO_PAYLOAD: &str = "SELECT seq, id, device, token, push_type, priority, \
                                       expires, collapse, topic, NULL, receipt, provider, created_at";

fn message_row(r: sqlx::any::AnyRow) -> Result<StoredMessage, Error> {
    Ok(StoredMessage {
        seq: r.get(0),
        device: device_id(&r.get::<String, _>(2))?,
        note: Notification {
            id: NotificationId(blob_array(r.get::<Vec<u8>, _>(1))?),
            token: DeviceToken(blob_array(r.get::<Vec<u8>, _>(3))?),
            push_type: push_type_from(r.get(4)),
            priority: r.get::<i64, _>(5).clamp(0, 255) as u8,
            expires: r.get::<i64, _>(6).max(0) as u64,
            collapse_id: r.get(7),
            topic: r.get(8),
            payload: r.get::<Option<Vec<u8>>, _>(9).unwrap_or_default(),
        },
        receipt: r.get(10),
        provider: r.get(11),
        created_at: r.get(12),
    })
}

fn push_type_code(t: PushType) -> i64 {
    PushType::ALL.iter().position(|x| *x == t).unwrap_or(0) as i64
}

fn push_type_from(c: i64) -> PushType {
    usize::try_from(c)
        .ok()
        .and_then(|i| PushType::ALL.get(i).copied())
        .unwrap_or(PushType::Alert)
}

fn blob_array<const N: usize>(v: Vec<u8>) -> Result<[u8; N], Error> {
    v.try_into()
        .map_err(|_| Error::Database("stored id has the wrong length".into()))
}

fn device_id(s: &str) -> Result<DeviceId, Error> {
    s.parse()
        .map_err(|_| Error::Database(format!("stored device id {s:?} is malformed")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_use_few_statement_shapes() {
        let v: Vec<u32> = (0..300).collect();
        let chunks = shaped(&v);
        assert_eq!(
            chunks.iter().map(|c| c.len()).collect::<Vec<_>>(),
            vec![256, 32, 4, 4, 4]
        );
        assert_eq!(chunks.concat(), v);
        assert!(shaped::<u8>(&[]).is_empty());
    }

    #[test]
    fn neighbouring_state_changes_share_a_statement_in_order() {
        let st = |seqs: &[i64], state, at| Write::State {
            seqs: seqs.to_vec(),
            state,
            at,
        };
        let rev = Write::Revoke {
            token: DeviceToken([0; 32]),
            at: 7,
        };
        use MessageState::*;
        let writes = [
            st(&[1], Dropped, 7),
            rev,
            st(&[2, 3], Dropped, 7),
            st(&[4], Delivered, 7),
            st(&[5], Delivered, 8),
            st(&[6], Dropped, 8),
            st(&[4], Dropped, 8),
        ];
        assert_eq!(
            merged_states(&writes),
            vec![
                (Dropped, 7, vec![1, 2, 3]),
                (Delivered, 7, vec![4]),
                (Delivered, 8, vec![5]),
                (Dropped, 8, vec![6, 4]),
            ]
        );
    }

    /// Numbers are reserved past the messages a database holds (one made
    /// before the counter existed included), and no two reservations
    /// overlap, from one store or two on the same file.
    #[tokio::test]
    async fn reservations_start_past_stored_messages_and_never_overlap() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("c.db").display());
        let store = Store::open(&url).await.unwrap();
        let message = |seq| {
            Write::Insert(Box::new(StoredMessage {
                seq,
                device: wire::DeviceId([1; 16]),
                note: wire::push::Notification {
                    id: wire::push::NotificationId([seq as u8; 16]),
                    token: DeviceToken([2; 32]),
                    push_type: wire::push::PushType::Alert,
                    priority: 5,
                    expires: 0,
                    collapse_id: String::new(),
                    topic: "t".into(),
                    payload: Vec::new(),
                },
                receipt: None,
                provider: "p".into(),
                created_at: 1,
            }))
        };
        store.apply(&[message(40), message(41)]).await.unwrap();
        let other = Store::open(&url).await.unwrap();
        let mut got = Vec::new();
        for i in 0..20 {
            let s = if i % 2 == 0 { &store } else { &other };
            got.push(s.reserve_seqs(7).await.unwrap());
        }
        assert_eq!(got[0], 42..49);
        for w in got.windows(2) {
            assert_eq!(w[0].end, w[1].start, "{got:?}");
        }
    }
}
