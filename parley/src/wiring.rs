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

impl CourierLink {
    /// Hands a call's wake-up through a platform token to the courier
    /// without waiting; a token that is dead, or not the device's own, is
    /// reported through `report` (the call stops waiting for the device).
    fn spawn_platform_wake(
        &self,
        device: DeviceId,
        platform: wire::push::Platform,
        token: String,
        expires: i64,
        report: signaling::runtime::WakeReport,
    ) {
        use push_courier::courier::Woken;
        let link = self.clone();
        tokio::spawn(async move {
            let r = match &link {
                CourierLink::Local(c) => c
                    .wake_platform(device, platform, &token, expires)
                    .await
                    .map_err(|e| e.to_string()),
                CourierLink::Cluster(nats) => {
                    push_courier::submit::wake(nats, device, platform, &token, expires)
                        .await
                        .map_err(|e| e.to_string())
                }
            };
            match r {
                Ok(Woken::Accepted | Woken::Pending) => {}
                Ok(what) => {
                    tracing::info!(
                        platform = platform.as_str(),
                        ?what,
                        "a sleeping device could not be woken"
                    );
                    report.token_gone().await;
                }
                Err(e) => {
                    tracing::info!(platform = platform.as_str(), error = %e, "wake-up through a platform refused");
                    report.token_gone().await;
                }
            }
        });
    }
}

/// Sends VoIP pushes for calls waiting on a sleeping device. Contacts name
/// the courier with `pn-provider=parley`, the device token in hex as
/// `pn-prid` and the app topic as `pn-param` (the courier goes through
/// Apple or Google itself if the device sleeps without its link); or a
/// platform directly (RFC 8599): `pn-provider=apns` or `fcm` and the
/// device's platform token as `pn-prid`, which must be one the device
/// registered with the courier over its own link.
pub struct CourierWaker {
    pub link: CourierLink,
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
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        if let Some(platform) = wire::push::Platform::parse(&push.provider) {
            let expires = (now + WAKE_TTL).as_secs() as i64;
            self.link
                .spawn_platform_wake(device, platform, push.prid, expires, report);
            return;
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

/// The identity service tells an account's devices of a change (a device
/// added or removed, an account reset) by a background push on their
/// [`wire::push::ACCOUNT_TOPIC`] tokens, and revokes the certificates of
/// devices it removes everywhere at once.
pub struct IdsNotifier {
    pub courier: Option<CourierLink>,
    pub revocations: crate::revocations::Feed,
}

/// A device that stays offline longer than this reads the event stream.
const ACCOUNT_EVENT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

impl ids::AccountNotifier for IdsNotifier {
    fn revoked(&self, devices: Vec<ids::Revoked>) {
        self.revocations.publish(devices);
    }

    fn notify(&self, tokens: Vec<(DeviceId, String)>, event: ids::AccountEvent) {
        let Some(courier) = &self.courier else {
            return;
        };
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
            courier.spawn_push(req, "account change push refused", None);
        }
    }
}
