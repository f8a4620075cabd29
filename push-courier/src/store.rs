//! Durable state on sqlx: SQLite (default; WAL, `synchronous = FULL`) or
//! PostgreSQL (by URL).
//!
//! Writes go through one writer task ([`crate::courier`]) that commits
//! many pushes per transaction (group commit), so a push is on disk before
//! its 2xx and the fsync cost is shared. Messages keep their row after
//! delivery (state changes, payload cleared) for the delivery-status
//! endpoint and receipts, until `status_retention` passes.

use std::str::FromStr;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Row};
use wire::push::{DeviceToken, Notification, NotificationId, PushType};
use wire::DeviceId;

use crate::error::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

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
CREATE INDEX IF NOT EXISTS messages_queued ON messages (device, state, seq);
CREATE INDEX IF NOT EXISTS messages_id ON messages (id);
CREATE INDEX IF NOT EXISTS messages_receipt ON messages (receipt, receipt_sent);
CREATE TABLE IF NOT EXISTS receipt_subscriptions (
    id TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    created_at BIGINT NOT NULL
)
";

#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

/// A write the writer task applies inside its batch transaction.
#[derive(Debug)]
pub enum Write {
    Insert(Box<StoredMessage>),
    /// Sets the state of messages of a device by id (acks, expiry,
    /// displacement).
    State {
        device: DeviceId,
        ids: Vec<NotificationId>,
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
}

impl Store {
    /// Opens (creating if needed) `sqlite:///path/courier.db` or
    /// `postgres://user@host/db`.
    pub async fn open(url: &str) -> Result<Store, Error> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(Error::Config(format!(
                "database URL must start with sqlite: or postgres:, got {:?}",
                url.split(':').next().unwrap_or("")
            )));
        };
        let url = match backend {
            Backend::Sqlite if !url.contains('?') => format!("{url}?mode=rwc"),
            _ => url.to_owned(),
        };
        let opts = AnyConnectOptions::from_str(&url).map_err(Error::db)?;
        let pool = AnyPoolOptions::new()
            .max_connections(if backend == Backend::Sqlite { 4 } else { 16 })
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        for p in ["PRAGMA busy_timeout = 10000", "PRAGMA synchronous = FULL"] {
                            sqlx::query(p).execute(&mut *conn).await?;
                        }
                    }
                    Ok(())
                })
            })
            .connect_with(opts)
            .await
            .map_err(Error::db)?;
        let store = Store { pool, backend };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), Error> {
        let blob = match self.backend {
            Backend::Sqlite => "BLOB",
            Backend::Postgres => "BYTEA",
        };
        if self.backend == Backend::Sqlite {
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&self.pool)
                .await
                .map_err(Error::db)?;
        }
        let ddl = SCHEMA.replace("{blob}", blob);
        let mut tx = self.pool.begin().await.map_err(Error::db)?;
        for stmt in ddl.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            sqlx::query(stmt)
                .execute(&mut *tx)
                .await
                .map_err(Error::db)?;
        }
        tx.commit().await.map_err(Error::db)?;
        Ok(())
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Applies a batch of writes in one transaction.
    pub async fn apply(&self, writes: &[Write]) -> Result<(), Error> {
        let mut tx = match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
            Backend::Postgres => self.pool.begin().await,
        }
        .map_err(Error::db)?;
        for w in writes {
            match w {
                Write::Insert(m) => {
                    let n = &m.note;
                    sqlx::query(
                        "INSERT INTO messages (seq, id, device, token, push_type, priority, \
                         expires, collapse, topic, payload, receipt, provider, state, \
                         created_at, updated_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, 0, $13, $13)",
                    )
                    .bind(m.seq)
                    .bind(n.id.0.to_vec())
                    .bind(m.device.to_string())
                    .bind(n.token.0.to_vec())
                    .bind(push_type_code(n.push_type))
                    .bind(i64::from(n.priority))
                    .bind(n.expires as i64)
                    .bind(n.collapse_id.clone())
                    .bind(n.topic.clone())
                    .bind(n.payload.clone())
                    .bind(m.receipt.clone())
                    .bind(m.provider.clone())
                    .bind(m.created_at)
                    .execute(&mut *tx)
                    .await
                    .map_err(Error::db)?;
                }
                Write::State {
                    device,
                    ids,
                    state,
                    at,
                } => {
                    for id in ids {
                        sqlx::query(
                            "UPDATE messages SET state = $1, updated_at = $2, payload = NULL \
                             WHERE device = $3 AND id = $4 AND state = 0",
                        )
                        .bind(*state as i64)
                        .bind(*at)
                        .bind(device.to_string())
                        .bind(id.0.to_vec())
                        .execute(&mut *tx)
                        .await
                        .map_err(Error::db)?;
                    }
                }
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
                Write::Revoke { token, at } => {
                    sqlx::query(
                        "UPDATE tokens SET revoked_at = $1 WHERE token = $2 AND revoked_at IS NULL",
                    )
                    .bind(*at)
                    .bind(token.0.to_vec())
                    .execute(&mut *tx)
                    .await
                    .map_err(Error::db)?;
                    sqlx::query(
                        "UPDATE messages SET state = 5, updated_at = $1, payload = NULL \
                         WHERE token = $2 AND state = 0",
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
                    for s in seqs {
                        sqlx::query("UPDATE messages SET receipt_sent = 1 WHERE seq = $1")
                            .bind(*s)
                            .execute(&mut *tx)
                            .await
                            .map_err(Error::db)?;
                    }
                }
            }
        }
        tx.commit().await.map_err(Error::db)
    }

    /// Every token, for the in-memory index at start.
    pub async fn tokens(&self) -> Result<Vec<TokenRow>, Error> {
        let rows = sqlx::query(
            "SELECT token, device, topic, kind, server_key, created_at, revoked_at FROM tokens",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(Error::db)?;
        rows.into_iter()
            .map(|r| {
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
            })
            .collect()
    }

    /// Queued messages: of one device, or of all (`None`) at start.
    pub async fn queued(&self, device: Option<DeviceId>) -> Result<Vec<StoredMessage>, Error> {
        const COLS: &str = "SELECT seq, id, device, token, push_type, priority, expires, \
                            collapse, topic, payload, receipt, provider, created_at FROM messages";
        let rows = match device {
            Some(d) => {
                sqlx::query(&format!(
                    "{COLS} WHERE device = $1 AND state = 0 ORDER BY seq"
                ))
                .bind(d.to_string())
                .fetch_all(&self.pool)
                .await
            }
            None => {
                sqlx::query(&format!("{COLS} WHERE state = 0 ORDER BY seq"))
                    .fetch_all(&self.pool)
                    .await
            }
        }
        .map_err(Error::db)?;
        rows.into_iter()
            .map(|r| {
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
            })
            .collect()
    }

    /// The highest message sequence number used so far.
    pub async fn max_seq(&self) -> Result<i64, Error> {
        let r = sqlx::query("SELECT COALESCE(MAX(seq), 0) FROM messages")
            .fetch_one(&self.pool)
            .await
            .map_err(Error::db)?;
        Ok(r.get(0))
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

    /// Deletes finished messages last changed before `before`.
    pub async fn purge(&self, before: i64) -> Result<u64, Error> {
        let r = sqlx::query("DELETE FROM messages WHERE state <> 0 AND updated_at < $1")
            .bind(before)
            .execute(&self.pool)
            .await
            .map_err(Error::db)?;
        Ok(r.rows_affected())
    }
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
