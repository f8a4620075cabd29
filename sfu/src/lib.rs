//! Parley's selective forwarding unit for group calls (in progress).
//!
//! The participants' devices encrypt their media end to end (SFrame, with
//! keys the SFU never sees); the SFU forwards RTP without decoding it and
//! decides, per subscriber, whose audio and video to send and at which
//! simulcast layer. [`core::room`] holds those decisions, sans-IO, under
//! the caller's clock; the media path on str0m is yet to come.

pub mod core;
