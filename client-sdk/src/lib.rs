//! The Parley client SDK: what a device runs. It grows protocol by
//! protocol; each piece is a sans-IO core driven by the app's runtime.
//!
//! - [`call`]: calls end to end: the user agent, a media session per
//!   call, and the PASSporTs that authenticate each side's DTLS key.
//! - [`courier`]: the push courier's device link (`parley-push/1` over
//!   TLS or QUIC), reconnect-safe and deduplicating.
//! - [`device`]: all of it on tokio: a running device with the courier
//!   link, SIP over TLS, media sockets and the audio clock.
//! - [`ids`]: the identity service: activation, device approval,
//!   verified lookups, the own-history audit, relay credentials.
//! - [`media`]: one call's audio over ICE and DTLS-SRTP (str0m), with
//!   Opus, an adaptive jitter buffer, loss-driven bitrate and call stats.
//! - [`sip`]: the SIP user agent: registration with push parameters,
//!   calls as caller and callee.
//! - [`turn`]: the TURN client behind the relayed ICE candidate (str0m,
//!   the media engine, has none).

pub mod call;
pub mod courier;
pub mod device;
pub mod group;
pub mod group_keys;
pub mod ids;
pub mod media;
pub mod sip;
pub mod turn;
pub mod turn_stream;
