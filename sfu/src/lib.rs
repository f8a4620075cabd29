//! Parley's selective forwarding unit for group calls.
//!
//! The participants' devices encrypt their media end to end (SFrame, with
//! keys the SFU never sees); the SFU forwards RTP without decoding it and
//! decides, per subscriber, whose audio and video to send and at which
//! simulcast layer. [`core`] holds those decisions, sans-IO, under the
//! caller's clock; [`runtime`] runs them on str0m (one peer connection per
//! participant) behind an HTTP join API; [`token`] says who may join.

pub mod core;
pub mod runtime;
/// Room tokens ([`wire::room_token`]), which signaling makes.
pub use wire::room_token as token;
