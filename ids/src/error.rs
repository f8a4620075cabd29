//! The identity service's one error type. `api` maps each variant to an
//! HTTP status and a problem+json body.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Config(String),
    #[error("database: {0}")]
    Database(String),
    #[error("key transparency directory: {0}")]
    Directory(String),
    #[error("internal: {0}")]
    Internal(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Gone(String),
    #[error("the handle belongs to another account")]
    HandleTaken,
    #[error("a device with this identity key is already registered")]
    DeviceExists,
    #[error("{0}")]
    Conflict(String),
    #[error("too many requests; retry in {} s", .0.as_secs())]
    RetryAfter(Duration),
    #[error("service is busy; retry later")]
    Busy,
    /// A dependency (SMTP relay, SMS webhook) failed; the message says what.
    #[error("{0}")]
    Unavailable(String),
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
