//! The Parley client SDK: what a device runs. It grows protocol by
//! protocol; each piece is a sans-IO core driven by the app's runtime.
//!
//! - [`turn`]: the TURN client behind the relayed ICE candidate (str0m,
//!   the media engine, has none).

pub mod turn;
