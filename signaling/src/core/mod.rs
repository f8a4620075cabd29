//! The protocol, with no I/O: messages, URIs, digest authentication, the
//! registrar and the forking proxy with its transactions and timers.

pub mod flow;
pub mod proxy;
pub mod registrar;
pub mod timer;

pub use wire::sip::{digest, message, uri, via};
