//! The location service nodes of a cluster share: each node's bindings in
//! one table (PostgreSQL; SQLite for one machine), with the path through
//! the node that holds each device's flow, and a heartbeat row per node.
//!
//! A binding whose node stopped beating counts as asleep (its path is not
//! handed out): a call wakes the device by push, and the device registers
//! wherever it lands. A node that starts marks the bindings it left as
//! asleep too: the connections their paths name died with it.
//!
//! With NATS, each store is also told to the other nodes as it happens
//! (`parley.sip.bound`), so that a call waiting at one node for a device
//! it woke rings the device at whichever node it registers (as Flexisip's
//! registrar does with Redis publish/subscribe). NATS only hurries this
//! along: without it the call rings the devices that were awake.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::{AnyPool, Row};
use wire::handle::Handle;

use crate::core::registrar::PushParams;
use crate::runtime::{Location, Notice, SharedBinding};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sip_bindings (
    node TEXT NOT NULL,
    handle TEXT NOT NULL,
    id TEXT NOT NULL,
    contact TEXT NOT NULL,
    path TEXT,
    push_provider TEXT,
    push_prid TEXT,
    push_param TEXT,
    device TEXT,
    expires BIGINT NOT NULL,
    PRIMARY KEY (node, handle, id)
);
CREATE INDEX IF NOT EXISTS sip_bindings_handle ON sip_bindings (handle);
CREATE TABLE IF NOT EXISTS sip_nodes (
    node TEXT PRIMARY KEY,
    alive_until BIGINT NOT NULL
)
";

/// How often a node says it is alive, and for how long each time.
const BEAT: Duration = Duration::from_secs(3);
const ALIVE_FOR: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct SqlLocation {
    pool: AnyPool,
    node: String,
    nats: Option<async_nats::Client>,
}

const SUBJECT: &str = "parley.sip.bound";
const NONCE_SUBJECT: &str = "parley.sip.nonce";
const PUSH_GONE_SUBJECT: &str = "parley.sip.pushgone";

/// What a node tells the others when a push service calls a token dead.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PushGoneNotice {
    pub node: String,
    pub handle: String,
    pub prid: String,
}

/// What a node tells the others when it takes a digest answer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NonceNotice {
    pub node: String,
    pub nonce: String,
    pub nc: u32,
}

/// What a node tells the others when it stores a handle's bindings.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BoundNotice {
    pub node: String,
    pub handle: String,
    pub bindings: Vec<SharedBinding>,
}

impl BoundNotice {
    /// Reads a notice, its handle in normal form; `None` for anything
    /// malformed.
    pub fn decode(bytes: &[u8]) -> Option<(BoundNotice, Handle)> {
        let mut n: BoundNotice = serde_json::from_slice(bytes).ok()?;
        let handle = Handle::parse(&n.handle).ok()?;
        n.handle = handle.as_str().to_owned();
        Some((n, handle))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LocationError {
    #[error("location database: {0}")]
    Database(String),
}

fn db(e: impl std::fmt::Display) -> LocationError {
    LocationError::Database(e.to_string())
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl SqlLocation {
    /// Opens the table at `url` for node `node`, marks what this node
    /// left from before as asleep, and starts its heartbeat (a tokio
    /// task, for as long as the runtime runs).
    pub async fn open(url: &str, node: &str) -> Result<SqlLocation, LocationError> {
        let (pool, backend) = sqlstore::open(url, sqlstore::Options::default())
            .await
            .map_err(db)?;
        sqlstore::migrate(&pool, backend, SCHEMA)
            .await
            .map_err(db)?;
        let loc = SqlLocation {
            pool,
            node: node.to_owned(),
            nats: None,
        };
        sqlx::query("UPDATE sip_bindings SET path = NULL WHERE node = $1")
            .bind(&loc.node)
            .execute(&loc.pool)
            .await
            .map_err(db)?;
        loc.beat().await?;
        let beating = loc.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(BEAT);
            loop {
                tick.tick().await;
                if let Err(e) = beating.beat().await {
                    tracing::warn!(error = %e, "location heartbeat failed");
                }
            }
        });
        Ok(loc)
    }

    /// Tells other nodes of every store over NATS (`urls`), and hears of
    /// theirs ([`Location::watch`]).
    pub async fn with_nats(self, urls: &[String]) -> Result<SqlLocation, LocationError> {
        self.with_nats_options(urls, async_nats::ConnectOptions::new())
            .await
    }

    /// As [`SqlLocation::with_nats`], starting from `options` (the
    /// operator's credentials and trusted CAs).
    pub async fn with_nats_options(
        mut self,
        urls: &[String],
        options: async_nats::ConnectOptions,
    ) -> Result<SqlLocation, LocationError> {
        let client = options
            .name(format!("parley-signaling-{}", self.node))
            .retry_on_initial_connect()
            .connect(urls.to_vec())
            .await
            .map_err(db)?;
        self.nats = Some(client);
        Ok(self)
    }

    /// Whether the bindings can be read and shared now: the database
    /// answers, and NATS (if used) is connected. For `/readyz`.
    pub async fn ready(&self) -> Result<(), String> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(|e| format!("database: {e}"))?;
        match &self.nats {
            Some(n) if n.connection_state() != async_nats::connection::State::Connected => {
                Err("NATS not connected".into())
            }
            _ => Ok(()),
        }
    }

    async fn beat(&self) -> Result<(), LocationError> {
        let now = unix_now();
        sqlx::query(
            "INSERT INTO sip_nodes (node, alive_until) VALUES ($1, $2) \
             ON CONFLICT (node) DO UPDATE SET alive_until = excluded.alive_until",
        )
        .bind(&self.node)
        .bind(now + ALIVE_FOR.as_secs() as i64)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        // Bindings long expired go, whoever left them.
        sqlx::query("DELETE FROM sip_bindings WHERE expires < $1")
            .bind(now - 3600)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(())
    }

    /// Replaces this node's rows for `handle` with `bindings`.
    pub async fn put(
        &self,
        handle: &Handle,
        bindings: &[SharedBinding],
    ) -> Result<(), LocationError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        sqlx::query("DELETE FROM sip_bindings WHERE node = $1 AND handle = $2")
            .bind(&self.node)
            .bind(handle.as_str())
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        for b in bindings {
            let push = b.push.as_ref();
            sqlx::query(
                "INSERT INTO sip_bindings (node, handle, id, contact, path, push_provider, \
                 push_prid, push_param, device, expires) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            )
            .bind(&self.node)
            .bind(handle.as_str())
            .bind(&b.id)
            .bind(&b.contact)
            .bind(b.path.clone())
            .bind(push.map(|p| p.provider.clone()))
            .bind(push.map(|p| p.prid.clone()))
            .bind(push.and_then(|p| p.param.clone()))
            .bind(b.device.map(|d| d.to_string()))
            .bind(b.expires as i64)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        }
        tx.commit().await.map_err(db)?;
        if let Some(nats) = &self.nats {
            let notice = BoundNotice {
                node: self.node.clone(),
                handle: handle.as_str().to_owned(),
                bindings: bindings.to_vec(),
            };
            if let Ok(bytes) = serde_json::to_vec(&notice) {
                if let Err(e) = nats.publish(SUBJECT, bytes.into()).await {
                    tracing::debug!(error = %e, "cannot tell other nodes of a binding");
                }
            }
        }
        Ok(())
    }

    /// The unexpired bindings of `handle` at other nodes; those of a node
    /// that stopped beating come without their path (asleep).
    pub async fn get(&self, handle: &Handle) -> Result<Vec<SharedBinding>, LocationError> {
        let now = unix_now();
        let rows = sqlx::query(
            "SELECT b.id, b.contact, b.path, b.push_provider, b.push_prid, b.push_param, \
             b.device, b.expires, COALESCE(n.alive_until, 0) \
             FROM sip_bindings b LEFT JOIN sip_nodes n ON n.node = b.node \
             WHERE b.handle = $1 AND b.node <> $2 AND b.expires > $3",
        )
        .bind(handle.as_str())
        .bind(&self.node)
        .bind(now)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        Ok(rows
            .iter()
            .map(|r| {
                let alive = r.get::<i64, _>(8) > now;
                let push = match (r.get::<Option<String>, _>(3), r.get::<Option<String>, _>(4)) {
                    (Some(provider), Some(prid)) => Some(PushParams {
                        provider,
                        prid,
                        param: r.get(5),
                    }),
                    _ => None,
                };
                SharedBinding {
                    id: r.get(0),
                    contact: r.get(1),
                    path: r.get::<Option<String>, _>(2).filter(|_| alive),
                    push,
                    device: r.get::<Option<String>, _>(6).and_then(|d| d.parse().ok()),
                    expires: r.get::<i64, _>(7) as u64,
                }
            })
            .collect())
    }
}

impl Location for SqlLocation {
    fn store(
        &self,
        handle: Handle,
        bindings: Vec<SharedBinding>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        let me = self.clone();
        Box::pin(async move {
            if let Err(e) = me.put(&handle, &bindings).await {
                tracing::warn!(error = %e, handle = %handle.redacted(), "cannot store bindings");
            }
        })
    }

    fn lookup(
        &self,
        handle: Handle,
    ) -> Pin<Box<dyn Future<Output = Vec<SharedBinding>> + Send + 'static>> {
        let me = self.clone();
        Box::pin(async move {
            me.get(&handle).await.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot read other nodes' bindings");
                Vec::new()
            })
        })
    }

    fn watch(&self) -> Option<tokio::sync::mpsc::Receiver<Notice>> {
        let nats = self.nats.clone()?;
        let me = self.node.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        tokio::spawn(async move {
            use futures_util::StreamExt;
            let subs = async {
                Ok::<_, async_nats::SubscribeError>((
                    nats.subscribe(SUBJECT).await?,
                    nats.subscribe(NONCE_SUBJECT).await?,
                    nats.subscribe(PUSH_GONE_SUBJECT).await?,
                ))
            };
            let (bound, nonces, gone) = match subs.await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot hear other signaling nodes");
                    return;
                }
            };
            let mut all =
                futures_util::stream::select(futures_util::stream::select(bound, nonces), gone);
            while let Some(m) = all.next().await {
                let notice = match m.subject.as_str() {
                    SUBJECT => match BoundNotice::decode(&m.payload) {
                        Some((n, handle)) if n.node != me => Notice::Bound(handle, n.bindings),
                        _ => continue,
                    },
                    NONCE_SUBJECT => match serde_json::from_slice::<NonceNotice>(&m.payload) {
                        Ok(n) if n.node != me => Notice::NonceUsed(n.nonce, n.nc),
                        _ => continue,
                    },
                    _ => match serde_json::from_slice::<PushGoneNotice>(&m.payload) {
                        Ok(n) if n.node != me => match Handle::parse(&n.handle) {
                            Ok(h) => Notice::PushGone(h, n.prid),
                            Err(_) => continue,
                        },
                        _ => continue,
                    },
                };
                if tx.send(notice).await.is_err() {
                    return;
                }
            }
        });
        Some(rx)
    }

    fn nonce_used(&self, nonce: String, nc: u32) {
        let Some(nats) = self.nats.clone() else {
            return;
        };
        let notice = NonceNotice {
            node: self.node.clone(),
            nonce,
            nc,
        };
        let Ok(bytes) = serde_json::to_vec(&notice) else {
            return;
        };
        tokio::spawn(async move {
            if let Err(e) = nats.publish(NONCE_SUBJECT, bytes.into()).await {
                tracing::debug!(error = %e, "cannot tell other nodes of a digest answer");
            }
        });
    }

    fn push_gone(&self, handle: Handle, prid: String) {
        let Some(nats) = self.nats.clone() else {
            return;
        };
        let notice = PushGoneNotice {
            node: self.node.clone(),
            handle: handle.as_str().to_owned(),
            prid,
        };
        let Ok(bytes) = serde_json::to_vec(&notice) else {
            return;
        };
        tokio::spawn(async move {
            if let Err(e) = nats.publish(PUSH_GONE_SUBJECT, bytes.into()).await {
                tracing::debug!(error = %e, "cannot tell other nodes of a dead push token");
            }
        });
    }
}
