//! Devices that sleep without the link, woken through their platform
//! tokens: registration over the device's own link, the wake-ups owed
//! (stored with the push that made them owed) and one task per device
//! that sends them until Apple or Google take them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use wire::push::{Notification, Platform, PlatformStatus, PlatformToken, PushType};
use wire::DeviceId;

use super::{unix_now, Courier, PushError};
use crate::store::{Owed, Registered, Write};
use crate::upstream::wake::{self, Platforms, WakeMetrics};
use crate::upstream::Outcome;

/// A device's platform tokens are read again after this long (a token
/// registered at another node of a cluster is used within it).
const TOKENS_FOR: Duration = Duration::from_secs(5);
/// Devices whose tokens are remembered at most (then all are forgotten).
const TOKENS_KEPT: usize = 100_000;
/// Longest pause between tries when a platform keeps saying "later".
const LONGEST_PAUSE: Duration = Duration::from_secs(300);
/// How long signaling waits to hear whether a call's wake-up was taken
/// (a dead token ends the call's wait at once).
const FIRST_ANSWER: Duration = Duration::from_secs(3);

/// What became of a wake-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woken {
    /// The platform took it.
    Accepted,
    /// Not known yet: it is stored and being tried.
    Pending,
    /// The token is dead; the device cannot be woken through it.
    Gone,
    /// Refused, or no use any more.
    Failed,
}

/// Those waiting to hear of a device's wake-ups: (its seq, where to tell).
type Waiting = HashMap<DeviceId, Vec<(i64, oneshot::Sender<Woken>)>>;
/// Devices' platform tokens, and when they were read.
type TokenCache = HashMap<DeviceId, (Instant, Arc<[PlatformToken]>)>;

/// The courier's side of the platforms.
#[derive(Debug)]
pub(crate) struct Upstream {
    platforms: Platforms,
    pub(crate) metrics: WakeMetrics,
    /// The newest wake-up owed to each device whose task runs, and that
    /// task's number (a task whose entry was taken away ends, even if a
    /// new one for the device has started since).
    owed: Mutex<HashMap<DeviceId, (Owed, u64)>>,
    tasks: std::sync::atomic::AtomicU64,
    /// Who waits to hear of a device's wake-up: (its seq, where to tell).
    waiting: Mutex<Waiting>,
    /// Devices' platform tokens as last read.
    tokens: Mutex<TokenCache>,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Upstream {
    pub(crate) fn new(platforms: Platforms) -> Upstream {
        Upstream {
            platforms,
            metrics: WakeMetrics::default(),
            owed: Mutex::new(HashMap::new()),
            tasks: std::sync::atomic::AtomicU64::new(0),
            waiting: Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
        }
    }

    fn forget_tokens(&self, device: DeviceId) {
        locked(&self.tokens).remove(&device);
    }

    /// Tells those waiting on wake-ups up to `seq` of `device` what
    /// became of them.
    fn tell(&self, device: DeviceId, seq: i64, what: Woken) {
        let mut waiting = locked(&self.waiting);
        if let Some(list) = waiting.get_mut(&device) {
            let (done, rest): (Vec<_>, Vec<_>) = list.drain(..).partition(|(s, _)| *s <= seq);
            *list = rest;
            for (_, tx) in done {
                let _ = tx.send(what);
            }
            if list.is_empty() {
                waiting.remove(&device);
            }
        }
    }
}

impl Courier {
    /// Wakes sleeping devices through the platforms of its configuration,
    /// starting with the wake-ups owed before a restart (in a cluster,
    /// those of each shard as this node takes it).
    pub(super) fn start_waking(self: &Arc<Self>) {
        let platforms = self.config.platforms.clone();
        if platforms.is_empty() || self.upstream.set(Upstream::new(platforms)).is_err() {
            return;
        }
        if self.config.cluster.is_none() {
            let me = self.clone();
            tokio::spawn(async move { me.resume_owed(None).await });
        }
    }

    /// Counters of wake-ups through the platforms, if any are set up.
    pub(crate) fn render_wake_metrics(&self, out: &mut String) {
        if let Some(up) = self.upstream.get() {
            up.metrics.render(out);
        }
    }

    /// Sends the wake-ups owed to the devices of `shards` (all if `None`).
    pub(crate) async fn resume_owed(&self, shards: Option<&[u8]>) {
        if self.upstream.get().is_none() {
            return;
        }
        match self.store.owed(shards).await {
            Ok(rows) => {
                if !rows.is_empty() {
                    tracing::info!(count = rows.len(), "sending wake-ups owed before");
                }
                for o in rows {
                    self.kick(o);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the wake-ups owed"),
        }
    }

    /// A device registers (or withdraws) its token at a platform over its
    /// own link.
    pub async fn register_platform(
        &self,
        device: DeviceId,
        t: &PlatformToken,
    ) -> (PlatformStatus, &'static str) {
        let Some(up) = self.upstream.get() else {
            return (
                PlatformStatus::Unsupported,
                "this courier wakes no device through a platform",
            );
        };
        if let Err(why) = wake::check(t) {
            return (PlatformStatus::Invalid, why);
        }
        if !t.token.is_empty() && !up.platforms.serves(t) {
            return (
                PlatformStatus::Unsupported,
                "this courier has no credentials for that platform or environment",
            );
        }
        let r = self.store.set_platform_token(device, t, unix_now()).await;
        up.forget_tokens(device);
        match r {
            Ok(Registered::Kept) => (PlatformStatus::Ok, ""),
            Ok(Registered::Taken) => {
                tracing::info!(
                    platform = t.platform.as_str(),
                    "a device named another device's platform token"
                );
                (
                    PlatformStatus::Taken,
                    "another device registered this token",
                )
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot keep a platform token");
                (PlatformStatus::Unavailable, "storage unavailable; retry")
            }
        }
    }

    /// The device's platform tokens (briefly remembered).
    async fn platform_tokens(
        &self,
        device: DeviceId,
    ) -> Result<Arc<[PlatformToken]>, crate::error::Error> {
        let Some(up) = self.upstream.get() else {
            return Ok(Arc::from(Vec::new()));
        };
        if let Some((at, t)) = locked(&up.tokens).get(&device) {
            if at.elapsed() < TOKENS_FOR {
                return Ok(t.clone());
            }
        }
        let t: Arc<[PlatformToken]> = self.store.platform_tokens_of(device).await?.into();
        let mut cache = locked(&up.tokens);
        if cache.len() >= TOKENS_KEPT {
            cache.clear();
        }
        cache.insert(device, (Instant::now(), t.clone()));
        Ok(t)
    }

    /// The device is back on a link (here, or through another node): what
    /// waits goes over it, so no wake-up is owed any more, even one whose
    /// task sleeps until the platform's Retry-After.
    pub(super) fn awake(&self, device: DeviceId) {
        let Some(up) = self.upstream.get() else {
            return;
        };
        let Some((o, _)) = locked(&up.owed).remove(&device) else {
            return;
        };
        self.commit_later(vec![Write::OwedDone { device, seq: o.seq }]);
        up.tell(device, o.seq, Woken::Accepted);
    }

    /// Whether the device is on a link, here or at another node.
    fn attached(&self, device: DeviceId) -> bool {
        let inner = self.lock();
        inner.online.contains_key(&device) || inner.remote.contains_key(&device)
    }

    /// For a push about to be stored: the wake-up it makes owed, if the
    /// device sleeps and has a platform token for it.
    pub(super) async fn owed_by(&self, device: DeviceId, note: &Notification) -> Option<bool> {
        let up = self.upstream.get()?;
        if self.attached(device) {
            return None;
        }
        let calls = note.push_type == PushType::Voip;
        let tokens = self.platform_tokens(device).await.ok()?;
        up.platforms.pick(&tokens, calls).map(|_| calls)
    }

    /// The push `seq` (still queued) sealed to `to`, if it fits.
    async fn sealed_details(&self, seq: i64, to: &wire::push::SealTo) -> Option<String> {
        let rows = self.store.queued_by_seq(&[seq]).await.ok()?;
        let m = rows.into_iter().next()?;
        wake::seal(to, &m.note.payload)
    }

    /// Starts (or feeds) the task that sends `o`.
    pub(super) fn kick(&self, o: Owed) {
        let Some(up) = self.upstream.get() else {
            return;
        };
        let device = o.device;
        let task = up.tasks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        {
            let mut owed = locked(&up.owed);
            match owed.get_mut(&device) {
                Some((cur, _)) => {
                    // The task running for the device takes the newest.
                    if o.seq > cur.seq {
                        cur.seq = o.seq;
                        cur.id = o.id;
                        cur.expires = cur.expires.max(o.expires);
                    }
                    cur.calls |= o.calls;
                    return;
                }
                None => {
                    owed.insert(device, (o, task));
                }
            }
        }
        tokio::spawn(send_owed(self.me.clone(), device, task));
    }

    /// Signaling wakes `device` for a call through the platform token its
    /// binding names, which must be one the device registered over its
    /// own link: someone else's token wakes nobody. Durable before it
    /// answers; waits a little for the platform's first answer.
    pub async fn wake_platform(
        &self,
        device: DeviceId,
        platform: Platform,
        token: &str,
        expires: i64,
    ) -> Result<Woken, PushError> {
        let Some(up) = self.upstream.get() else {
            return Err(PushError::Unavailable(
                "this courier wakes no device through a platform".into(),
            ));
        };
        let tokens = self
            .platform_tokens(device)
            .await
            .map_err(|e| PushError::Unavailable(e.to_string()))?;
        let own = tokens
            .iter()
            .any(|t| t.platform == platform && t.token == token && t.calls);
        if !own {
            return Err(PushError::UnknownToken);
        }
        let id = Courier::new_id().map_err(|e| PushError::Unavailable(e.to_string()))?;
        let seq = self.seqs.take().ok_or_else(|| {
            PushError::Unavailable("reserving message numbers; retry shortly".into())
        })?;
        let o = Owed {
            device,
            seq,
            id,
            calls: true,
            expires,
        };
        let (tx, rx) = oneshot::channel();
        locked(&up.waiting)
            .entry(device)
            .or_default()
            .push((seq, tx));
        if let Err(e) = self.commit(vec![Write::Owe(o.clone())]).await {
            up.tell(device, seq, Woken::Failed);
            return Err(PushError::Unavailable(e.to_string()));
        }
        self.kick(o);
        Ok(tokio::time::timeout(FIRST_ANSWER, rx)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(Woken::Pending))
    }

    /// The wake-up `o` is settled (taken, dead, refused, or not needed):
    /// its row goes, and whoever waits on it hears. Whether a newer one is
    /// owed (else the device's task ends: the next kick starts another).
    async fn settle(&self, o: &Owed, what: Woken) -> bool {
        let Some(up) = self.upstream.get() else {
            return false;
        };
        // Group-committed with the pushes; lost in a crash, the wake-up
        // is sent again after the restart: at least once.
        self.commit_later(vec![Write::OwedDone {
            device: o.device,
            seq: o.seq,
        }]);
        up.tell(o.device, o.seq, what);
        let mut owed = locked(&up.owed);
        if owed.get(&o.device).is_some_and(|(cur, _)| cur.seq == o.seq) {
            owed.remove(&o.device);
            return false;
        }
        owed.contains_key(&o.device)
    }
}

/// Sends what is owed to `device` until nothing is: each wake-up until
/// the platform takes it, the token turns out dead, or it is no use any
/// more (expired, or the device came back on its link).
async fn send_owed(me: Weak<Courier>, device: DeviceId, task: u64) {
    let mut pause = Duration::ZERO;
    loop {
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        let Some(c) = me.upgrade() else {
            return;
        };
        let Some(up) = c.upstream.get() else {
            return;
        };
        let Some(o) = locked(&up.owed)
            .get(&device)
            .filter(|(_, t)| *t == task)
            .map(|(o, _)| o.clone())
        else {
            return;
        };
        let now = unix_now();
        if c.attached(device) {
            // Awake: what waits goes over its link.
            if !c.settle(&o, Woken::Accepted).await {
                return;
            }
            pause = Duration::ZERO;
            continue;
        }
        let tokens = match c.platform_tokens(device).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read a device's platform tokens");
                pause = Duration::from_secs(1);
                continue;
            }
        };
        let Some(t) = up.platforms.pick(&tokens, o.calls).cloned() else {
            // Withdrawn, or dropped as dead since.
            if !c.settle(&o, Woken::Gone).await {
                return;
            }
            continue;
        };
        if o.expires != 0 && o.expires <= now {
            up.metrics.count(t.platform, "expired");
            if !c.settle(&o, Woken::Failed).await {
                return;
            }
            continue;
        }
        // A call's details, sealed to the device if it gave keys.
        let sealed = match (&t.seal_to, o.calls) {
            (Some(k), true) => c.sealed_details(o.seq, k).await,
            _ => None,
        };
        match up.platforms.send(&t, &o, sealed.as_deref(), now).await {
            Outcome::Accepted { .. } => {
                let more = c.settle(&o, Woken::Accepted).await;
                // Counted once settled: the row is gone by then.
                up.metrics.count(t.platform, "accepted");
                if !more {
                    return;
                }
                pause = Duration::ZERO;
            }
            Outcome::Gone { reason, .. } => {
                tracing::info!(platform = t.platform.as_str(), %reason, "a platform token is dead; dropped");
                if let Err(e) = c.store.drop_platform_token(t.platform, &t.token).await {
                    tracing::warn!(error = %e, "cannot drop a dead platform token");
                }
                up.forget_tokens(device);
                let more = c.settle(&o, Woken::Gone).await;
                up.metrics.count(t.platform, "gone");
                if !more {
                    return;
                }
                pause = Duration::ZERO;
            }
            Outcome::Retry { after, reason } => {
                up.metrics.count(t.platform, "retried");
                tracing::debug!(platform = t.platform.as_str(), %reason, "wake-up to be tried again");
                pause = after.clamp(Duration::from_millis(100), LONGEST_PAUSE);
                if o.expires != 0 {
                    // Not past the moment it stops being of use.
                    let left = Duration::from_secs(o.expires.saturating_sub(now).max(0) as u64);
                    pause = pause.min(left);
                }
            }
            Outcome::RenewToken { reason } | Outcome::Refused { reason, .. } => {
                up.metrics.count(t.platform, "refused");
                tracing::warn!(platform = t.platform.as_str(), %reason, "a wake-up was refused");
                if !c.settle(&o, Woken::Failed).await {
                    return;
                }
                pause = Duration::ZERO;
            }
        }
    }
}
