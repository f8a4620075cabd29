//! Test support shared by the scenario and interop tests:
//!
//! - [`tool`]: runs third-party clients (coturn's `turnutils_*`, `stun`)
//!   with a time bound, and fails loudly when one is not installed;
//! - [`http2`]: an HTTP/2 client for provider-side pushes;
//! - [`relay`]: starts the real relay in-process on loopback;
//! - [`peer`]: a UDP echo peer that records what reaches it;
//! - [`postgres`]: a throwaway PostgreSQL server on loopback;
//! - [`turn_client`]: a small blocking TURN client for byte-level checks.

pub mod http2;
pub mod peer;
pub mod postgres;
pub mod relay;
pub mod tool;
pub mod turn_client;
