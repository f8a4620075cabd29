//! Parley signaling: a SIP (RFC 3261) registrar and forking proxy.
//!
//! A call to `sip:<handle>@<domain>` rings every device registered for the
//! handle at once; devices that are asleep (registered with RFC 8599 push
//! parameters, connection closed) are woken by a VoIP push and join the
//! call when they register again. The first answer wins and the other
//! devices are told `Call completed elsewhere`; a decline on one device
//! ends the call on all of them.
//!
//! - [`core`]: the protocol state machines, no I/O — start at
//!   [`core::proxy::Proxy`].
//! - [`runtime`]: UDP, TCP, TLS and secure WebSocket listeners (5060,
//!   5061, 8445) around one core.
//! - [`location`]: the bindings nodes of a cluster share (PostgreSQL),
//!   behind [`runtime::Location`].

pub mod core;
pub mod error;
pub mod location;
pub mod runtime;
mod websocket;

pub use error::Error;
