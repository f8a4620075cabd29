//! Opening a service database: `sqlite://PATH` (embedded; created if
//! missing, WAL journal, a busy timeout, `synchronous = FULL` unless asked
//! otherwise, and read through a memory map so a page the kernel already
//! caches costs no system call and no copy) or `postgres://…`, through
//! sqlx's `Any` driver so one set of
//! queries serves both. The identity service and the push courier each
//! keep their own schema and queries; this is only how they open and
//! create them.

use std::str::FromStr;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::AnyPool;

/// Which database a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database URL must start with sqlite: or postgres:, got {0:?}")]
    Url(String),
    #[error(transparent)]
    Sqlx(#[from] sqlx::Error),
}

/// How to open.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// SQLite: wait for the disk on every commit (`synchronous = FULL`);
    /// false is `NORMAL`, which survives a killed process but not a power
    /// loss. Ignored on PostgreSQL.
    pub fsync: bool,
    /// Pool size for SQLite and PostgreSQL.
    pub sqlite_connections: u32,
    pub postgres_connections: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            fsync: true,
            sqlite_connections: 4,
            postgres_connections: 16,
        }
    }
}

/// Opens (creating an SQLite file if needed) the database at `url`.
pub async fn open(url: &str, opts: Options) -> Result<(AnyPool, Backend), Error> {
    sqlx::any::install_default_drivers();
    let backend = if url.starts_with("sqlite:") {
        Backend::Sqlite
    } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        Backend::Postgres
    } else {
        return Err(Error::Url(url.split(':').next().unwrap_or("").to_owned()));
    };
    let url = match backend {
        Backend::Sqlite if !url.contains('?') => format!("{url}?mode=rwc"),
        _ => url.to_owned(),
    };
    let connect = AnyConnectOptions::from_str(&url)?;
    let fsync = opts.fsync;
    let pool = AnyPoolOptions::new()
        .max_connections(match backend {
            Backend::Sqlite => opts.sqlite_connections,
            Backend::Postgres => opts.postgres_connections,
        })
        // A pooled SQLite connection is a file handle that cannot go stale;
        // pinging it before every use was a round trip to its worker thread
        // per query. PostgreSQL connections cross a network: keep the test.
        .test_before_acquire(backend == Backend::Postgres)
        .after_connect(move |conn, _| {
            Box::pin(async move {
                if backend == Backend::Sqlite {
                    let sync = if fsync {
                        "PRAGMA synchronous = FULL"
                    } else {
                        "PRAGMA synchronous = NORMAL"
                    };
                    // Up to 16 GiB of the file mapped (address space, not memory):
                    // a 1M-handle identity directory spent 8% of its lookup
                    // CPU in pread() without it.
                    let mmap = "PRAGMA mmap_size = 17179869184";
                    for p in ["PRAGMA busy_timeout = 10000", sync, mmap] {
                        sqlx::query(p).execute(&mut *conn).await?;
                    }
                }
                Ok(())
            })
        })
        .connect_with(connect)
        .await?;
    if backend == Backend::Sqlite {
        sqlx::query("PRAGMA journal_mode = WAL")
            .execute(&pool)
            .await?;
    }
    Ok((pool, backend))
}

/// One round trip to the database: whether it answers (a readiness
/// probe).
pub async fn ping(pool: &AnyPool) -> Result<(), Error> {
    sqlx::query("SELECT 1").execute(pool).await?;
    Ok(())
}

/// Runs `schema` (statements separated by `;`) in one transaction, with
/// `{blob}` and `{serial}` replaced by each backend's type.
pub async fn migrate(pool: &AnyPool, backend: Backend, schema: &str) -> Result<(), Error> {
    let (blob, serial) = match backend {
        Backend::Sqlite => ("BLOB", "INTEGER PRIMARY KEY AUTOINCREMENT"),
        Backend::Postgres => ("BYTEA", "BIGSERIAL PRIMARY KEY"),
    };
    let ddl = schema.replace("{blob}", blob).replace("{serial}", serial);
    let mut tx = pool.begin().await?;
    for stmt in ddl.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        sqlx::query(stmt).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sqlite_opens_migrates_and_refuses_other_urls() {
        let dir = std::env::temp_dir().join(format!("sqlstore-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("sqlite://{}", dir.join("t.db").display());
        let (pool, backend) = open(&url, Options::default()).await.unwrap();
        assert_eq!(backend, Backend::Sqlite);
        migrate(
            &pool,
            backend,
            "CREATE TABLE IF NOT EXISTS t (id {serial}, b {blob});",
        )
        .await
        .unwrap();
        sqlx::query("INSERT INTO t (b) VALUES ($1)")
            .bind(vec![1u8, 2])
            .execute(&pool)
            .await
            .unwrap();
        assert!(matches!(
            open("mysql://x", Options::default()).await,
            Err(Error::Url(s)) if s == "mysql"
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
