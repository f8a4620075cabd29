//! Test support shared by the scenario and interop tests:
//!
//! - [`baresip`]: baresip as a peer, in network namespaces of its own;
//! - [`courier`]: `parley courier` alone as a separate process;
//! - [`fcm`]: a local FCM HTTP v1 stand-in (token endpoint and
//!   `messages:send`);
//! - [`tool`]: runs third-party clients (coturn's `turnutils_*`, `stun`)
//!   with a time bound, and fails loudly when one is not installed;
//! - [`relay`]: starts the real relay in-process on loopback;
//! - [`peer`]: a UDP echo peer that records what reaches it;
//! - [`nats`]: a throwaway NATS server on loopback;
//! - [`pki`]: a throwaway CA with a localhost server certificate;
//! - [`postgres`]: a throwaway PostgreSQL server on loopback;
//! - [`turn_client`]: a small blocking TURN client for byte-level checks;
//! - [`up`]: `parley up` as a separate process on free loopback ports.

pub mod baresip;
pub mod courier;
pub mod fcm;
pub mod nats;
pub mod peer;
pub mod pki;
pub mod postgres;
pub mod relay;
pub mod tool;
pub mod turn_client;
pub mod up;
