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
pub mod wake;

pub use apns::{classify, ApnsClient, ApnsConfig, ApnsPush, ProviderToken};

/// One HTTP/2 connection to a host (many concurrent streams), made on
/// first use and again after it fails.
#[derive(Debug)]
pub(crate) struct Connection {
    addr: std::net::SocketAddr,
    name: String,
    roots: rustls::RootCertStore,
    slot: tokio::sync::Mutex<Option<crate::provider::Http2>>,
}

impl Connection {
    pub(crate) fn new(
        addr: std::net::SocketAddr,
        name: &str,
        roots: rustls::RootCertStore,
    ) -> Connection {
        Connection {
            addr,
            name: name.to_owned(),
            roots,
            slot: tokio::sync::Mutex::new(None),
        }
    }

    /// One request; `Err` says why the host could not be asked (the next
    /// request connects anew).
    pub(crate) async fn request(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<crate::provider::Response, String> {
        let mut http = {
            let mut slot = self.slot.lock().await;
            match slot.as_ref() {
                Some(h) => h.clone(),
                None => {
                    let connect =
                        crate::provider::Http2::connect(self.addr, &self.name, self.roots.clone());
                    let h = tokio::time::timeout(CONNECT_TIMEOUT, connect)
                        .await
                        .map_err(|_| format!("{} did not answer in time", self.name))?
                        .map_err(|e| format!("cannot reach {}: {e}", self.name))?;
                    *slot = Some(h.clone());
                    h
                }
            }
        };
        let answer =
            tokio::time::timeout(REQUEST_TIMEOUT, http.request("POST", path, headers, body)).await;
        match answer {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => {
                *self.slot.lock().await = None;
                Err(format!("connection to {} lost: {e}", self.name))
            }
            Err(_) => {
                *self.slot.lock().await = None;
                Err(format!("{} did not answer in time", self.name))
            }
        }
    }
}

impl Connection {
    /// One request, its answer read by `classify`; a host that cannot be
    /// asked is a retry.
    pub(crate) async fn send(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
        classify: fn(&crate::provider::Response) -> Outcome,
    ) -> Outcome {
        match self.request(path, headers, body).await {
            Ok(r) => classify(&r),
            Err(reason) => Outcome::Retry {
                after: DEFAULT_RETRY,
                reason,
            },
        }
    }
}

/// A response as a push service would give it, for the classifiers'
/// tests.
#[cfg(test)]
pub(crate) fn response(
    status: u16,
    headers: &[(&str, &str)],
    body: &str,
) -> crate::provider::Response {
    crate::provider::Response {
        status,
        headers: headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        body: bytes::Bytes::copy_from_slice(body.as_bytes()),
    }
}

/// A service that takes longer than these to connect, or to answer a
/// request, is tried again on a new connection: a hung connection must not
/// hold every wake-up behind it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

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
