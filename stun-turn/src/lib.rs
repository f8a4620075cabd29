//! STUN (RFC 8489) and TURN (RFC 8656, RFC 6156) server for Parley.
//!
//! - [`message`] and [`channel_data`]: the wire codec, zero-copy on decode.
//! - [`core`]: the sans-IO server. Feed it datagrams and `now`; drain
//!   `poll_transmit`, `poll_event` and `poll_timeout`. Tests drive it with
//!   hand-moved time.
//! - [`runtime`]: the tokio shell: one worker thread per core, each with its
//!   own `SO_REUSEPORT` sockets and its own [`core::Server`].
//! - [`config`]: every knob, with production-safe defaults.

pub mod channel_data;
pub mod config;
pub mod core;
pub mod error;
pub mod message;
pub mod metrics;
pub mod runtime;

pub use config::Config;
pub use error::{DecodeError, Error};
