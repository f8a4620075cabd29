//! Upstream delivery through the platforms' push services: a device that
//! cannot hold our link (an iPhone in the background, an Android phone
//! without a foreground service) is woken through Apple's APNs or Google's
//! FCM, which Parley reaches as a provider. Both clients read the
//! service's answers into one [`Outcome`], so what to do with a push and
//! a token is decided the same way for both.
//!
//! The services' addresses are configurable: that is how tests (and the
//! benchmark) point them at local stand-ins.

use std::time::Duration;

pub mod apns;
pub mod fcm;

pub use apns::{classify, ApnsClient, ApnsConfig, ApnsPush, ProviderToken};

/// A retry without `Retry-After`.
pub(crate) const DEFAULT_RETRY: Duration = Duration::from_secs(1);

/// What a push service's answer means for the push and the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The service took it; `id` is its id as the service names it.
    Accepted { id: String },
    /// The token is no good any more: drop it and report the device as
    /// unreachable. `since` is when the service last saw it valid (APNs
    /// 410, milliseconds), if said.
    Gone { reason: String, since: Option<i64> },
    /// Try again after `after` (429, 5xx, or no answer).
    Retry { after: Duration, reason: String },
    /// Our credential expired or was refused: renew it and retry.
    RenewToken { reason: String },
    /// Refused for a reason retrying does not fix (a bad topic, a payload
    /// too large…).
    Refused { status: u16, reason: String },
}
