//! Devices' tokens at Apple's and Google's push services, and the
//! wake-ups owed through them.
//!
//! A platform token belongs to one device: the first to register it over
//! its authenticated link. Another device naming the same token is
//! refused, so an account cannot make a stranger's phone ring by
//! registering that phone's token as its own.
//!
//! A wake-up is owed (a row in `upstream`) from the commit that made it
//! owed (the push for a sleeping device, with the provider's 2xx) until
//! the platform took it: a courier killed in between sends it after its
//! restart. One row per device: the newest push it is for, and whether a
//! call waits.

use sqlx::Row;
use wire::push::{NotificationId, Platform, PlatformToken, SealTo};
use wire::DeviceId;

use super::{Backend, Store, Write};
use crate::error::Error;

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS platform_tokens (
    platform TEXT NOT NULL,
    token TEXT NOT NULL,
    device TEXT NOT NULL,
    calls BIGINT NOT NULL,
    others BIGINT NOT NULL,
    sandbox BIGINT NOT NULL,
    topic TEXT NOT NULL,
    seal_to {blob},
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (platform, token)
);
CREATE INDEX IF NOT EXISTS platform_tokens_device ON platform_tokens (device);
CREATE TABLE IF NOT EXISTS upstream (
    device TEXT PRIMARY KEY,
    seq BIGINT NOT NULL,
    id TEXT NOT NULL,
    calls BIGINT NOT NULL,
    expires BIGINT NOT NULL,
    created_at BIGINT NOT NULL
)
";

/// What became of a platform token a device registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registered {
    /// Kept for the device (or withdrawn).
    Kept,
    /// Another device holds it.
    Taken,
}

/// A wake-up owed to a sleeping device through its platform token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owed {
    pub device: DeviceId,
    /// The newest push it is for (the row goes only once a wake-up sent
    /// after it was taken).
    pub seq: i64,
    /// The id the wake-up carries: the newest push's (the app comes back
    /// over its link for the push itself).
    pub id: NotificationId,
    /// A call waits: a VoIP push (or a high-priority FCM message).
    pub calls: bool,
    /// Unix seconds after which it is no use; 0: none.
    pub expires: i64,
}

impl Store {
    /// Keeps `t` as `device`'s token for its kinds (replacing the token it
    /// had for them: the platform rotated it), unless another device holds
    /// it. An empty token withdraws the device's tokens of that platform
    /// and kinds.
    pub async fn set_platform_token(
        &self,
        device: DeviceId,
        t: &PlatformToken,
        now: i64,
    ) -> Result<Registered, Error> {
        let mut tx = match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
            Backend::Postgres => self.pool.begin().await,
        }
        .map_err(Error::db)?;
        let holder =
            sqlx::query("SELECT device FROM platform_tokens WHERE platform = $1 AND token = $2")
                .bind(t.platform.as_str())
                .bind(t.token.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(Error::db)?
                .map(|r| r.get::<String, _>(0));
        let me = device.to_string();
        if holder.as_ref().is_some_and(|h| *h != me) {
            return Ok(Registered::Taken);
        }
        sqlx::query(
            "DELETE FROM platform_tokens WHERE device = $1 AND platform = $2 \
             AND ((calls = 1 AND $3 = 1) OR (others = 1 AND $4 = 1))",
        )
        .bind(&me)
        .bind(t.platform.as_str())
        .bind(i64::from(t.calls))
        .bind(i64::from(t.others))
        .execute(&mut *tx)
        .await
        .map_err(Error::db)?;
        if !t.token.is_empty() {
            // Another device's insert racing this one fails on the key:
            // this one is then refused, as if it had come second.
            let inserted = sqlx::query(
                "INSERT INTO platform_tokens \
                 (platform, token, device, calls, others, sandbox, topic, seal_to, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (platform, token) DO NOTHING",
            )
            .bind(t.platform.as_str())
            .bind(t.token.as_str())
            .bind(&me)
            .bind(i64::from(t.calls))
            .bind(i64::from(t.others))
            .bind(i64::from(t.sandbox))
            .bind(t.topic.as_str())
            .bind(t.seal_to.map(|k| [&k.p256dh[..], &k.auth[..]].concat()))
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(Error::db)?
            .rows_affected();
            if inserted == 0 {
                return Ok(Registered::Taken);
            }
        }
        tx.commit().await.map_err(Error::db)?;
        Ok(Registered::Kept)
    }

    /// The platform tokens `device` registered.
    pub async fn platform_tokens_of(&self, device: DeviceId) -> Result<Vec<PlatformToken>, Error> {
        let rows = sqlx::query(
            "SELECT platform, token, calls, others, sandbox, topic, seal_to FROM platform_tokens \
             WHERE device = $1 ORDER BY platform, token",
        )
        .bind(device.to_string())
        .fetch_all(&self.pool)
        .await
        .map_err(Error::db)?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                Some(PlatformToken {
                    platform: Platform::parse(&r.get::<String, _>(0))?,
                    token: r.get(1),
                    calls: r.get::<i64, _>(2) != 0,
                    others: r.get::<i64, _>(3) != 0,
                    sandbox: r.get::<i64, _>(4) != 0,
                    topic: r.get(5),
                    seal_to: r
                        .get::<Option<Vec<u8>>, _>(6)
                        .filter(|k| k.len() == 81)
                        .map(|k| SealTo {
                            p256dh: k[..65].try_into().unwrap_or([0; 65]),
                            auth: k[65..].try_into().unwrap_or([0; 16]),
                        }),
                })
            })
            .collect())
    }

    /// The platform said the token is dead.
    pub async fn drop_platform_token(&self, platform: Platform, token: &str) -> Result<(), Error> {
        sqlx::query("DELETE FROM platform_tokens WHERE platform = $1 AND token = $2")
            .bind(platform.as_str())
            .bind(token)
            .execute(&self.pool)
            .await
            .map_err(Error::db)?;
        Ok(())
    }

    /// The wake-ups owed to devices whose ids start with one of the bytes
    /// `shards`, or to every device.
    pub async fn owed(&self, shards: Option<&[u8]>) -> Result<Vec<Owed>, Error> {
        let rows = sqlx::query("SELECT device, seq, id, calls, expires FROM upstream")
            .fetch_all(&self.pool)
            .await
            .map_err(Error::db)?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let device: DeviceId = r.get::<String, _>(0).parse().ok()?;
                if let Some(s) = shards {
                    if !s.contains(&device.0[0]) {
                        return None;
                    }
                }
                Some(Owed {
                    device,
                    seq: r.get(1),
                    id: NotificationId::from_uuid(&r.get::<String, _>(2))?,
                    calls: r.get::<i64, _>(3) != 0,
                    expires: r.get(4),
                })
            })
            .collect())
    }

    /// Inside a batch: the batch's wake-ups owed, one row per device (a
    /// call makes a call wake-up of one owed for other pushes; the newest
    /// push and the latest expiry win), then those settled.
    pub(super) async fn owe_all(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        writes: &[Write],
        at: i64,
    ) -> Result<(), Error> {
        let mut owed: Vec<Owed> = Vec::new();
        let mut done: Vec<(DeviceId, i64)> = Vec::new();
        for w in writes {
            match w {
                Write::Owe(o) => match owed.iter_mut().find(|x| x.device == o.device) {
                    // One row per device in a statement: PostgreSQL
                    // refuses to update a row twice in one upsert.
                    Some(x) => {
                        if o.seq > x.seq {
                            x.seq = o.seq;
                            x.id = o.id;
                        }
                        x.calls |= o.calls;
                        x.expires = x.expires.max(o.expires);
                    }
                    None => owed.push(o.clone()),
                },
                Write::OwedDone { device, seq } => done.push((*device, *seq)),
                _ => {}
            }
        }
        for chunk in super::shaped(&owed) {
            let rows: Vec<String> = (0..chunk.len())
                .map(|i| format!("({})", self.placeholders(i * 6 + 1, 6)))
                .collect();
            let sql = format!(
                "INSERT INTO upstream (device, seq, id, calls, expires, created_at) VALUES {} \
                 ON CONFLICT (device) DO UPDATE SET \
                 seq = CASE WHEN excluded.seq > upstream.seq THEN excluded.seq ELSE upstream.seq END, \
                 id = CASE WHEN excluded.seq > upstream.seq THEN excluded.id ELSE upstream.id END, \
                 calls = CASE WHEN excluded.calls > upstream.calls THEN excluded.calls ELSE upstream.calls END, \
                 expires = CASE WHEN excluded.expires > upstream.expires THEN excluded.expires ELSE upstream.expires END",
                rows.join(",")
            );
            let mut q = sqlx::query(&sql);
            for o in chunk {
                q = q
                    .bind(o.device.to_string())
                    .bind(o.seq)
                    .bind(o.id.to_uuid())
                    .bind(i64::from(o.calls))
                    .bind(o.expires)
                    .bind(at);
            }
            q.execute(&mut **tx).await.map_err(Error::db)?;
        }
        for chunk in super::shaped(&done) {
            let sql = format!(
                "DELETE FROM upstream WHERE {}",
                (0..chunk.len())
                    .map(|i| format!(
                        "(device = {} AND seq <= {})",
                        self.param(2 * i + 1),
                        self.param(2 * i + 2)
                    ))
                    .collect::<Vec<_>>()
                    .join(" OR ")
            );
            let mut q = sqlx::query(&sql);
            for (device, seq) in chunk {
                q = q.bind(device.to_string()).bind(*seq);
            }
            q.execute(&mut **tx).await.map_err(Error::db)?;
        }
        Ok(())
    }
}
