//! Parley's identity service (`ids`): handles → accounts → devices → keys,
//! with key transparency.
//!
//! - [`core`]: sans-IO state machines (verification codes, rate limits).
//! - [`store`]: sqlx storage, SQLite or PostgreSQL.
//! - [`kt`]: the akd directory on that storage, signed epoch roots.
//! - [`certs`]: device certificates and the revocation list.
//! - [`service`]: the operations; [`api`]: them over HTTPS JSON.
//! - [`runtime`]: the tokio shell.

pub mod api;
pub mod certs;
pub mod core;
pub mod error;
pub mod kt;
mod record_cache;
pub mod runtime;
pub mod sender;
pub mod service;
pub mod store;
mod vrf;

pub use error::Error;
pub use service::{
    AccountEvent, AccountNotifier, Config, Ids, Lists, Revoked, Submitted, TurnConfig,
};
