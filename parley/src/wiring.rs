//! How the services join: signaling asks the identity service's store
//! which devices a handle has, and wakes sleeping devices through the
//! courier; ids tells devices of account changes through the courier. In
//! `parley up` the courier is in the same process; a stand-alone service
//! of a cluster reaches the courier nodes over NATS and reads ids' store
//! in the shared PostgreSQL.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use wire::handle::Handle;
use wire::keys::DeviceId;

/// "Is this device one of the handle's active devices?", from ids' store.
pub struct IdsDirectory(pub ids::store::Store);

impl signaling::runtime::Directory for IdsDirectory {
    fn authorize(
        &self,
        device: DeviceId,
        handle: Handle,
    ) -> Pin<Box<dyn Future<Output = bool> + Send + 'static>> {
        let store = self.0.clone();
        Box::pin(async move {
            let account = match store.account_of_handle(&handle.uri()).await {
                Ok(Some(a)) => a,
                Ok(None) => return false,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the identity store; refusing REGISTER");
                    return false;
                }
            };
            match store.devices_of(&account).await {
                Ok(devices) => devices
                    .iter()
                    .any(|d| d.id == device && d.revoked_at.is_none()),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the identity store; refusing REGISTER");
                    false
                }
            }
        })
    }
}

/// Where pushes from Parley's own services go.
#[derive(Clone)]
pub enum CourierLink {
    /// The courier in this process.
    Local(Arc<push_courier::courier::Courier>),
    /// The courier nodes of a cluster, over NATS.
    Cluster(async_nats::Client),
}

impl CourierLink {
    /// Hands `req` over without waiting; a refusal is logged, and a token
    /// that is gone (unknown, another device's, revoked) is reported
    /// through `report` if there is one.
    fn spawn_push(
        &self,
        req: push_courier::courier::PushRequest,
        refused: &'static str,
        report: Option<signaling::runtime::WakeReport>,
    ) {
        use push_courier::courier::PushError;
        let link = self.clone();
        tokio::spawn(async move {
            let r = match &link {
                CourierLink::Local(c) => c.push(req).await.map(|_| ()).map_err(|e| {
                    let gone =
                        matches!(e, PushError::UnknownToken | PushError::Unregistered { .. });
                    (gone, e.to_string())
                }),
                CourierLink::Cluster(nats) => {
                    push_courier::submit::submit(nats, &req).await.map_err(|e| {
                        let gone = matches!(e, push_courier::submit::SubmitError::Gone(_));
                        (gone, e.to_string())
                    })
                }
            };
            if let Err((gone, e)) = r {
                tracing::info!(error = %e, "{refused}");
                if let (true, Some(report)) = (gone, report) {
                    report.token_gone().await;
                }
            }
        });
    }
}

/// Sends VoIP pushes for calls waiting on a sleeping device. Contacts name
/// the courier with `pn-provider=parley`, the device token in hex as
/// `pn-prid` and the app topic as `pn-param`; or Apple's service with
/// `pn-provider=apns` (RFC 8599), the APNs device token as `pn-prid` and
/// `<team id>.<bundle id>.voip` as `pn-param`, sent through
/// `[courier.upstream.apns]`.
pub struct CourierWaker {
    pub link: CourierLink,
    pub upstream: Upstream,
}

/// The platforms' push services the courier may hand wake-ups to.
#[derive(Default)]
pub struct Upstream {
    pub apns: Option<Arc<push_courier::upstream::ApnsClient>>,
    pub fcm: Option<Arc<push_courier::upstream::fcm::FcmClient>>,
    pub metrics: Arc<UpstreamMetrics>,
}

/// What became of wake-ups sent through the platforms, for /metrics.
#[derive(Debug, Default)]
pub struct UpstreamMetrics {
    /// [platform][outcome]: see [`UpstreamMetrics::OUTCOMES`].
    counts: [[std::sync::atomic::AtomicU64; 5]; 2],
}

impl UpstreamMetrics {
    const PLATFORMS: [&'static str; 2] = ["apns", "fcm"];
    /// Taken; retried (each retry); the token was gone; refused; not
    /// taken before the call stopped waiting.
    const OUTCOMES: [&'static str; 5] = ["accepted", "retried", "gone", "refused", "expired"];

    fn count(&self, platform: &str, outcome: &str) {
        let p = Self::PLATFORMS.iter().position(|x| *x == platform);
        let o = Self::OUTCOMES.iter().position(|x| *x == outcome);
        if let (Some(p), Some(o)) = (p, o) {
            self.counts[p][o].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl crate::admin::MetricsSource for UpstreamMetrics {
    fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(out, "# TYPE parley_upstream_wakes_total counter");
        for (p, platform) in Self::PLATFORMS.iter().enumerate() {
            for (o, outcome) in Self::OUTCOMES.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "parley_upstream_wakes_total{{platform=\"{platform}\",outcome=\"{outcome}\"}} {}",
                    self.counts[p][o].load(std::sync::atomic::Ordering::Relaxed)
                );
            }
        }
    }
}

/// A wake-up is useless once the call has stopped waiting for the device.
const WAKE_TTL: Duration = Duration::from_secs(30);

impl signaling::runtime::Waker for CourierWaker {
    fn wake(&self, wake: signaling::runtime::Wake, report: signaling::runtime::WakeReport) {
        let signaling::runtime::Wake {
            handle,
            push,
            device,
            call_id,
            caller,
        } = wake;
        match (
            push.provider.as_str(),
            &self.upstream.apns,
            &self.upstream.fcm,
        ) {
            ("apns", Some(apns), _) => {
                let metrics = self.upstream.metrics.clone();
                return wake_through_apns(apns.clone(), &push, &call_id, (metrics, report));
            }
            ("fcm", _, Some(fcm)) => {
                let metrics = self.upstream.metrics.clone();
                return wake_through_fcm(fcm.clone(), &push, &call_id, (metrics, report));
            }
            (p @ ("apns" | "fcm"), _, _) => {
                tracing::warn!(
                    provider = p,
                    "a binding asks for a wake-up through a platform not set up in [courier.upstream]"
                );
                return;
            }
            _ => {}
        }
        if push.provider != "parley" {
            tracing::warn!(provider = %push.provider, "cannot wake a device through this push provider");
            return;
        }
        let Some(token) = wire::push::DeviceToken::from_hex(&push.prid) else {
            tracing::debug!("pn-prid is not a courier device token");
            return;
        };
        // The VoIP topic the binding named: a wake-up goes only to a token
        // of that topic, and only to the registering device's own token.
        let Some(topic) = push
            .param
            .clone()
            .filter(|t| wire::push::is_parley_topic(t))
        else {
            tracing::debug!("binding names no VoIP topic (pn-param); not woken");
            return;
        };
        let Ok(id) = push_courier::courier::Courier::new_id() else {
            return;
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let payload = serde_json::json!({
            "aps": {},
            "parley": {"type": "call", "call_id": call_id, "from": caller, "to": handle.as_str()},
        });
        let collapse: String = call_id.chars().take(64).collect();
        let req = push_courier::courier::PushRequest {
            id,
            token,
            push_type: wire::push::PushType::Voip,
            priority: 10,
            expires: (now + WAKE_TTL).as_secs(),
            now_or_never: false,
            collapse_id: collapse,
            topic: Some(topic),
            payload: payload.to_string().into_bytes(),
            provider: "signaling".into(),
            vapid_key: None,
            receipt: None,
            for_device: Some(device),
            operator_granted: false,
        };
        self.link
            .spawn_push(req, "VoIP push for a waiting call refused", Some(report));
    }
}

/// A VoIP push through Apple for a waiting call, retried as APNs says
/// until the call would no longer wait. Apple sees only the call's id:
/// no handle, no caller.
fn wake_through_apns(
    apns: Arc<push_courier::upstream::ApnsClient>,
    push: &signaling::core::registrar::PushParams,
    call_id: &str,
    (metrics, report): (Arc<UpstreamMetrics>, signaling::runtime::WakeReport),
) {
    use push_courier::upstream::ApnsPush;
    let token = push.prid.to_ascii_lowercase();
    if token.is_empty() || token.len() > 200 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        tracing::debug!("pn-prid is not an APNs device token");
        return;
    }
    // pn-param is `<team id>.<bundle id>.voip`; the topic drops the team.
    let Some(topic) = push
        .param
        .as_deref()
        .and_then(|p| p.split_once('.'))
        .map(|(_, t)| t.to_owned())
        .filter(|t| !t.is_empty())
    else {
        tracing::debug!("binding names no APNs topic (pn-param); not woken");
        return;
    };
    let Ok(id) = push_courier::courier::Courier::new_id() else {
        return;
    };
    let until = SystemTime::now() + WAKE_TTL;
    let wake = ApnsPush {
        token,
        topic,
        push_type: wire::push::PushType::Voip,
        priority: 10,
        expiration: until
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
        collapse_id: Some(call_id.chars().take(64).collect()),
        id,
        payload: serde_json::json!({"aps": {}, "parley": {"type": "call", "call_id": call_id}})
            .to_string()
            .into_bytes(),
    };
    tokio::spawn(async move {
        retried("apns", until, &metrics, report, || apns.send(&wake)).await;
    });
}

/// A high-priority data message through FCM for a waiting call, retried
/// until the call would no longer wait. Google sees only the call's id.
fn wake_through_fcm(
    fcm: Arc<push_courier::upstream::fcm::FcmClient>,
    push: &signaling::core::registrar::PushParams,
    call_id: &str,
    (metrics, report): (Arc<UpstreamMetrics>, signaling::runtime::WakeReport),
) {
    if push.prid.is_empty() || push.prid.len() > 4096 {
        tracing::debug!("pn-prid is not an FCM registration token");
        return;
    }
    let wake = push_courier::upstream::fcm::FcmPush {
        token: push.prid.clone(),
        data: [
            ("type".to_owned(), "call".to_owned()),
            ("call_id".to_owned(), call_id.to_owned()),
        ]
        .into(),
        ttl: WAKE_TTL,
        collapse_key: Some(call_id.chars().take(64).collect()),
    };
    let until = SystemTime::now() + WAKE_TTL;
    tokio::spawn(async move {
        retried("fcm", until, &metrics, report, || fcm.send(&wake)).await;
    });
}

/// Sends through a platform until it takes the push, the token turns out
/// dead (signaling hears of it through `report`), or `until` (the call
/// stops waiting) would pass before a retry.
async fn retried<F, Fut>(
    platform: &str,
    until: SystemTime,
    metrics: &UpstreamMetrics,
    report: signaling::runtime::WakeReport,
    send: F,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = push_courier::upstream::Outcome>,
{
    use push_courier::upstream::Outcome;
    loop {
        match send().await {
            Outcome::Accepted { .. } => {
                metrics.count(platform, "accepted");
                return;
            }
            Outcome::Retry { after, reason } => {
                if SystemTime::now() + after >= until {
                    metrics.count(platform, "expired");
                    tracing::info!(platform, %reason, "the wake-up was not taken before the call gave up");
                    return;
                }
                metrics.count(platform, "retried");
                tokio::time::sleep(after).await;
            }
            Outcome::Gone { reason, .. } => {
                metrics.count(platform, "gone");
                tracing::info!(platform, %reason, "the device's token is gone; not woken");
                report.token_gone().await;
                return;
            }
            Outcome::RenewToken { reason } | Outcome::Refused { reason, .. } => {
                metrics.count(platform, "refused");
                tracing::warn!(platform, %reason, "the wake-up was refused");
                return;
            }
        }
    }
}

/// The identity service tells an account's devices of a change (a device
/// added or removed, an account reset) by a background push on their
/// [`wire::push::ACCOUNT_TOPIC`] tokens.
pub struct CourierAccountNotifier(pub CourierLink);

/// A device that stays offline longer than this reads the event stream.
const ACCOUNT_EVENT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

impl ids::AccountNotifier for CourierAccountNotifier {
    fn notify(&self, tokens: Vec<(DeviceId, String)>, event: ids::AccountEvent) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let payload = serde_json::json!({
            "aps": {"content-available": 1},
            "parley": {
                "type": "account",
                "kind": event.kind,
                "device": event.device.map(|d| d.to_string()),
            },
        })
        .to_string()
        .into_bytes();
        for (device, token) in tokens {
            let Some(token) = wire::push::DeviceToken::from_hex(&token) else {
                continue;
            };
            let Ok(id) = push_courier::courier::Courier::new_id() else {
                return;
            };
            let req = push_courier::courier::PushRequest {
                id,
                token,
                push_type: wire::push::PushType::Background,
                priority: 5,
                expires: (now + ACCOUNT_EVENT_TTL).as_secs(),
                now_or_never: false,
                collapse_id: String::new(),
                topic: Some(wire::push::ACCOUNT_TOPIC.into()),
                payload: payload.clone(),
                provider: "ids".into(),
                vapid_key: None,
                receipt: None,
                for_device: Some(device),
                operator_granted: false,
            };
            self.0.spawn_push(req, "account change push refused", None);
        }
    }
}
