//! Sans-IO parts of the SFU: no sockets, no clocks but the ones passed in.

pub mod forward;
pub mod forwarder;
pub mod room;
pub mod rtp;
