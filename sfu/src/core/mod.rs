//! Sans-IO parts of the SFU: no sockets, no clocks but the ones passed in.

pub mod room;
