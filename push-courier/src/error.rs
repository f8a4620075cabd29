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
