//! The courier's one error type.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Config(String),
    #[error("database: {0}")]
    Database(String),
    /// A write for a shard whose lease this node no longer holds.
    #[error("shard {0} is held by another node now; retry")]
    Fenced(u16),
    /// No node holds the shard right now: it is between owners (given up
    /// and not yet taken, or its node died and the lease has not run out).
    #[error("no node serves shard {0} right now; retry shortly")]
    NoOwner(u16),
    #[error("internal: {0}")]
    Internal(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    pub(crate) fn db(e: sqlx::Error) -> Error {
        Error::Database(e.to_string())
    }

    pub(crate) fn from_sqlstore(e: sqlstore::Error) -> Error {
        match e {
            sqlstore::Error::Url(_) => Error::Config(e.to_string()),
            sqlstore::Error::Sqlx(e) => Error::db(e),
        }
    }
}
