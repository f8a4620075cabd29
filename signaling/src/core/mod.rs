//! The protocol, with no I/O: messages, URIs, digest authentication, the
//! registrar and the forking proxy with its transactions and timers.

pub mod digest;
pub mod flow;
pub mod message;
pub mod proxy;
pub mod registrar;
pub mod timer;
pub mod uri;
pub mod via;
