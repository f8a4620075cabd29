//! Device certificates the identity service revokes reach the courier (its
//! links close) and signaling (its bindings go) at once: ids hands each
//! revocation to a [`Feed`] after the commit, which applies it in this
//! process and, in a cluster, publishes it on NATS for every other node.
//! The full list is also read at start and then every
//! [`CATCH_UP`] (from ids' store, or the operator's CRL file), so a
//! notice missed while NATS was down is caught up. A revocation is never
//! taken back, so every source only adds.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;

/// The NATS subject revocations are published on.
pub const SUBJECT: &str = "parley.ids.revoked";

/// How often the whole list is read again besides the notices.
pub const CATCH_UP: Duration = Duration::from_secs(30);

/// Where revocations are heard in this process.
#[derive(Clone)]
pub struct Feed {
    local: broadcast::Sender<Arc<[ids::Revoked]>>,
    bus: Option<async_nats::Client>,
    /// Certificates heard revoked: by ids in this process, and from other
    /// nodes over NATS.
    heard: Arc<[AtomicU64; 2]>,
}

const HERE: usize = 0;
const NATS: usize = 1;

#[derive(serde::Serialize, serde::Deserialize)]
struct Notice {
    device: String,
    serial: String,
}

impl Feed {
    /// `bus`: the cluster's NATS, or none for one process.
    pub fn new(bus: Option<async_nats::Client>) -> Feed {
        Feed {
            local: broadcast::channel(64).0,
            bus,
            heard: Arc::new([AtomicU64::new(0), AtomicU64::new(0)]),
        }
    }

    /// Applies `revoked` here and, in a cluster, tells the other nodes.
    pub fn publish(&self, revoked: Vec<ids::Revoked>) {
        self.heard[HERE].fetch_add(revoked.len() as u64, Ordering::Relaxed);
        if let Some(bus) = &self.bus {
            let notices: Vec<Notice> = revoked
                .iter()
                .map(|r| Notice {
                    device: r.device.to_string(),
                    serial: r.serial.clone(),
                })
                .collect();
            let bus = bus.clone();
            tokio::spawn(async move {
                let body = serde_json::to_vec(&notices).unwrap_or_default();
                if let Err(e) = bus.publish(SUBJECT, body.into()).await {
                    // The other nodes read the list within CATCH_UP.
                    tracing::warn!(error = %e, "cannot publish a revocation on NATS");
                }
            });
        }
        let _ = self.local.send(revoked.into());
    }

    /// Revocations other nodes publish are applied here too.
    pub async fn listen(&self) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
        let Some(bus) = &self.bus else {
            return Ok(None);
        };
        let mut sub = bus.subscribe(SUBJECT).await?;
        let local = self.local.clone();
        let heard = self.heard.clone();
        Ok(Some(tokio::spawn(async move {
            use futures_util::StreamExt;
            while let Some(m) = sub.next().await {
                let Ok(notices) = serde_json::from_slice::<Vec<Notice>>(&m.payload) else {
                    tracing::warn!("a revocation notice that does not parse; ignored");
                    continue;
                };
                let revoked: Vec<ids::Revoked> = notices
                    .into_iter()
                    .filter_map(|n| {
                        Some(ids::Revoked {
                            device: n.device.parse().ok()?,
                            serial: n.serial,
                        })
                    })
                    .collect();
                heard[NATS].fetch_add(revoked.len() as u64, Ordering::Relaxed);
                let _ = local.send(revoked.into());
            }
        })))
    }

    /// Applies every revocation heard from now on to this process's
    /// services.
    pub fn apply(&self, to: Targets) -> tokio::task::JoinHandle<()> {
        let mut rx = self.local.subscribe();
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(revoked) => to.revoke(&revoked).await,
                    // The next reading of the whole list catches up.
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "revocation notices missed")
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        })
    }
}

impl crate::admin::MetricsSource for Feed {
    fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(
            out,
            "# HELP parley_revocations_heard_total Device certificates heard revoked, by ids in \
             this process (here) or at another node (nats).\n\
             # TYPE parley_revocations_heard_total counter\n\
             parley_revocations_heard_total{{via=\"here\"}} {}\n\
             parley_revocations_heard_total{{via=\"nats\"}} {}",
            self.heard[HERE].load(Ordering::Relaxed),
            self.heard[NATS].load(Ordering::Relaxed),
        );
    }
}

/// This process's services that act on revocations.
pub struct Targets {
    pub courier: Option<Arc<push_courier::courier::Courier>>,
    pub signaling: Option<Arc<signaling::runtime::Server>>,
    pub ids: Option<Arc<ids::Ids>>,
}

impl Targets {
    async fn revoke(&self, revoked: &[ids::Revoked]) {
        if let Some(c) = &self.courier {
            c.revoke_serials(serials(revoked.iter().map(|r| r.serial.as_str())));
        }
        if let Some(s) = &self.signaling {
            s.revoke_devices(revoked.iter().map(|r| r.device).collect())
                .await;
        }
        if let Some(i) = &self.ids {
            // Another node's change: authentication reads the database.
            i.forget_devices();
        }
    }
}

/// Normalized serials of certificates, from their hex.
fn serials<'a>(hex: impl IntoIterator<Item = &'a str>) -> impl Iterator<Item = Vec<u8>> {
    hex.into_iter()
        .filter_map(wire::keys::unhex)
        .map(|s| push_courier::device::normalize_serial(&s))
}

/// Reads ids' whole revocation list now and every [`CATCH_UP`] for the
/// courier and signaling of this process.
pub async fn catch_up_from_store(
    store: ids::store::Store,
    courier: Option<Arc<push_courier::courier::Courier>>,
    signaling: Option<Arc<signaling::runtime::Server>>,
) {
    let mut tick = tokio::time::interval(CATCH_UP);
    loop {
        tick.tick().await;
        if let Some(c) = &courier {
            match store.revoked().await {
                Ok(list) => c.revoke_serials(serials(list.iter().map(|(s, _)| s.as_str()))),
                Err(e) => tracing::warn!(error = %e, "cannot read revoked device certificates"),
            }
        }
        if let Some(s) = &signaling {
            match store.revoked_devices().await {
                Ok(list) => s.revoke_devices(list.into_iter().collect()).await,
                Err(e) => tracing::warn!(error = %e, "cannot read revoked devices"),
            }
        }
    }
}

/// A courier without ids' store re-reads the operator's copy of the
/// revocation list every [`CATCH_UP`].
pub async fn catch_up_from_file(path: PathBuf, courier: Arc<push_courier::courier::Courier>) {
    let mut tick = tokio::time::interval(CATCH_UP);
    loop {
        tick.tick().await;
        match read_crl(&path) {
            Ok(serials) => courier.revoke_serials(serials),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read courier.device_crl; keeping the previous list")
            }
        }
    }
}

/// The normalized serials the CRL file at `path` lists.
pub fn read_crl(path: &std::path::Path) -> anyhow::Result<HashSet<Vec<u8>>> {
    use anyhow::Context;
    let b = std::fs::read(path)
        .with_context(|| format!("courier.device_crl: cannot read {}", path.display()))?;
    push_courier::device::crl_serials(&b)
        .with_context(|| format!("courier.device_crl: {}", path.display()))
}
