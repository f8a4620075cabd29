//! Group calls: the device's end of the SFU (its join API and its media),
//! with every frame encrypted end to end under [`crate::group_keys`].

pub mod session;
pub mod sfu;
mod uplink;

pub use session::{GroupConfig, GroupMediaError, GroupSession, GroupStats, Heard, Seen};
pub use sfu::{Joined, SfuClient, SfuError};
