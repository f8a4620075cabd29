//! A device that sleeps without its link, as an iPhone app in the
//! background does: it tells the courier its token at Apple's or
//! Google's push service, and the app hands what those services deliver
//! to [`Device::handle_push`], which brings the device back for the call
//! or the pushes that wait.

use std::collections::HashMap;

use tokio::sync::oneshot;
use wire::push::{PlatformStatus, PlatformToken};

use super::{Command, Device, DeviceError, DeviceEvent, Task};

/// A push from Apple or Google, as [`Device::handle_push`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlatformPush {
    /// A call waits. On iOS, report it to CallKit at once, with `id` as
    /// the call's UUID (Apple ends an app that does not report a VoIP
    /// push as a call) and `caller` as who calls, when the wake-up carried
    /// it sealed to this device; the device comes online and the call
    /// rings as [`crate::call::CallEvent::Incoming`] once signaling sends
    /// it (with the caller verified).
    Call { id: String, caller: Option<String> },
    /// Pushes wait: the device reconnects its link and gets them.
    Wake { id: String },
}

/// Reads the payload of a push from Apple (`{"parley": {"type", "id"}}`,
/// next to `aps`) or the data of an FCM message (`{"type", "id"}`, as
/// JSON); `None` if it is not one of Parley's. A call's details sealed to
/// this device (`sealed`) are opened with `keys`.
pub fn read_platform_push(
    payload: &[u8],
    keys: Option<&wire::webpush::SubscriptionKeys>,
) -> Option<PlatformPush> {
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    let p = if v["parley"].is_object() {
        &v["parley"]
    } else {
        &v
    };
    let id = p["id"].as_str()?;
    // An id the courier made, or not one of ours.
    wire::push::NotificationId::from_uuid(id)?;
    let id = id.to_owned();
    match p["type"].as_str()? {
        "call" => {
            let caller = match (p["sealed"].as_str(), keys) {
                (Some(sealed), Some(k)) => opened_caller(sealed, k),
                _ => None,
            };
            Some(PlatformPush::Call { id, caller })
        }
        "wake" => Some(PlatformPush::Wake { id }),
        _ => None,
    }
}

/// Who calls, from a call's details sealed to `keys` (the push signaling
/// sent: `{"parley": {"from": …}}`); `None` if they do not open.
fn opened_caller(sealed: &str, keys: &wire::webpush::SubscriptionKeys) -> Option<String> {
    use base64::Engine as _;
    let body = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(sealed)
        .ok()?;
    let details: serde_json::Value = serde_json::from_slice(&keys.decrypt(&body).ok()?).ok()?;
    details["parley"]["from"].as_str().map(str::to_owned)
}

/// The keys a device's call wake-ups are sealed to, derived from its
/// identity key (so the app keeps nothing more).
pub(super) fn seal_keys(key: &wire::SigningKey) -> wire::webpush::SubscriptionKeys {
    let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"parley wake-up sealing");
    let prk = salt.extract(key.pkcs8());
    for counter in 0u8..=255 {
        let mut seed = [0u8; 48];
        let info = [&[counter][..]];
        let filled = prk
            .expand(&info, SeedLen)
            .and_then(|okm| okm.fill(&mut seed));
        if filled.is_ok() {
            if let Some(k) = wire::webpush::SubscriptionKeys::from_random(seed) {
                return k;
            }
        }
    }
    // Not reached but with negligible probability: fresh keys, which
    // seal only until the device restarts.
    wire::webpush::SubscriptionKeys::generate().unwrap_or_else(|_| {
        wire::webpush::SubscriptionKeys::from_random([1; 48]).expect("a valid scalar")
    })
}

struct SeedLen;

impl ring::hkdf::KeyType for SeedLen {
    fn len(&self) -> usize {
        48
    }
}

/// What the device task keeps of its platform tokens.
#[derive(Default)]
pub(super) struct Platform {
    /// The tokens the app set, sent again on every new link.
    tokens: Vec<PlatformToken>,
    /// Answers the app waits for, by request number.
    waiting: HashMap<u32, oneshot::Sender<Result<PlatformStatus, DeviceError>>>,
    /// In the background: nothing reconnects until a push or a register.
    pub(super) suspended: bool,
}

impl Device {
    /// Tells the courier this device's token at Apple's or Google's push
    /// service (again whenever the platform rotates it; an empty token
    /// withdraws it), so that it is woken through it while it has no link.
    /// The courier's answer: [`PlatformStatus::Taken`] if another device
    /// holds the token. Sent again on every new link.
    pub async fn set_platform_token(
        &self,
        mut token: PlatformToken,
    ) -> Result<PlatformStatus, DeviceError> {
        // A token that wakes for calls gets the caller sealed to us.
        if token.calls && token.seal_to.is_none() && !token.token.is_empty() {
            token.seal_to = Some(wire::push::SealTo {
                p256dh: self.seal_keys.public(),
                auth: self.seal_keys.auth,
            });
        }
        self.ask(|tx| Command::Platform(token, tx)).await?
    }

    /// Goes to the background as an iPhone app does: the SIP connection
    /// and the courier link close, and nothing reconnects until
    /// [`Device::handle_push`] or [`Device::register`]. Calls and pushes
    /// wake it through its platform token.
    pub async fn background(&self) -> Result<(), DeviceError> {
        self.ask(Command::Background).await
    }

    /// Hands the device a push Apple or Google delivered to the app. For
    /// a call the device comes online (link and SIP) and the call rings;
    /// for other pushes it reconnects its link. Returns what the push was
    /// at once (so the app can report a call to CallKit before the network
    /// work is done); `None` if it is not one of Parley's.
    pub async fn handle_push(&self, payload: &[u8]) -> Result<Option<PlatformPush>, DeviceError> {
        let Some(push) = read_platform_push(payload, Some(&self.seal_keys)) else {
            return Ok(None);
        };
        self.commands
            .send(Command::Woken(push.clone()))
            .await
            .map_err(|_| DeviceError::Stopped)?;
        Ok(Some(push))
    }
}

impl Task {
    /// The app set a platform token: kept (replacing one of the same
    /// platform and kinds) and sent over the link if there is one.
    pub(super) async fn set_platform(
        &mut self,
        token: PlatformToken,
        reply: oneshot::Sender<Result<PlatformStatus, DeviceError>>,
    ) {
        let p = &mut self.platform;
        p.tokens.retain(|t| {
            t.platform != token.platform
                || !((t.calls && token.calls) || (t.others && token.others))
        });
        if !token.token.is_empty() {
            p.tokens.push(token.clone());
        }
        let Some(c) = self.courier.as_mut() else {
            let _ = reply.send(Err(DeviceError::Courier(
                "no courier link now; the token goes with the next one".into(),
            )));
            return;
        };
        match c.register_platform(token).await {
            Ok(request) => {
                self.platform.waiting.insert(request, reply);
            }
            Err(e) => {
                let _ = reply.send(Err(DeviceError::Courier(e.to_string())));
            }
        }
    }

    /// The courier answered a platform token.
    pub(super) async fn platform_answered(
        &mut self,
        request: u32,
        status: PlatformStatus,
        text: String,
    ) {
        if status == PlatformStatus::Taken {
            self.event(DeviceEvent::Error(format!(
                "platform token refused: {text}"
            )))
            .await;
        }
        if let Some(tx) = self.platform.waiting.remove(&request) {
            let _ = tx.send(Ok(status));
        }
    }

    /// A new link: the tokens go again (the courier keeps what it has).
    pub(super) async fn resend_platform(&mut self) {
        let Some(c) = self.courier.as_mut() else {
            return;
        };
        for t in self.platform.tokens.clone() {
            if c.register_platform(t).await.is_err() {
                return;
            }
        }
    }

    /// To the background: no SIP, no link, no reconnecting.
    pub(super) async fn go_background(&mut self) {
        self.platform.suspended = true;
        self.courier_retry.stop();
        self.courier = None;
        self.go_to_sleep().await;
    }

    /// Woken by a push through Apple or Google.
    pub(super) async fn woken(&mut self, push: PlatformPush) {
        self.platform.suspended = false;
        if self.courier.is_none() {
            self.courier_reconnect().await;
        }
        if let PlatformPush::Call { id, .. } = push {
            self.event(DeviceEvent::Woken { call_id: id }).await;
            self.come_online().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "01890A5D-AC96-774B-BCCE-B302099A8057";

    #[test]
    fn apple_and_google_payloads_read_the_same() {
        let apns = format!(r#"{{"aps":{{}},"parley":{{"type":"call","id":"{ID}"}}}}"#);
        let fcm = format!(r#"{{"type":"call","id":"{ID}"}}"#);
        let call = Some(PlatformPush::Call {
            id: ID.into(),
            caller: None,
        });
        assert_eq!(read_platform_push(apns.as_bytes(), None), call);
        assert_eq!(read_platform_push(fcm.as_bytes(), None), call);
        let wake = format!(
            r#"{{"aps":{{"alert":{{"loc-key":"PARLEY_WAKE"}},"mutable-content":1}},"parley":{{"type":"wake","id":"{ID}"}}}}"#
        );
        assert_eq!(
            read_platform_push(wake.as_bytes(), None),
            Some(PlatformPush::Wake { id: ID.into() })
        );
    }

    #[test]
    fn a_sealed_caller_opens_with_the_devices_keys_only() {
        use base64::Engine as _;
        let me = wire::SigningKey::generate();
        let keys = seal_keys(&me);
        assert_eq!(keys.public(), seal_keys(&me).public(), "derived, not drawn");
        let details = br#"{"aps":{},"parley":{"type":"call","from":"alice@example.com"}}"#;
        let body = wire::webpush::encrypt(&keys.public(), &keys.auth, details, [7; 48]).unwrap();
        let sealed = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(body);
        let push = format!(r#"{{"type":"call","id":"{ID}","sealed":"{sealed}"}}"#);
        assert_eq!(
            read_platform_push(push.as_bytes(), Some(&keys)),
            Some(PlatformPush::Call {
                id: ID.into(),
                caller: Some("alice@example.com".into())
            })
        );
        let stranger = seal_keys(&wire::SigningKey::generate());
        assert_eq!(
            read_platform_push(push.as_bytes(), Some(&stranger)),
            Some(PlatformPush::Call {
                id: ID.into(),
                caller: None
            })
        );
    }

    #[test]
    fn other_pushes_are_not_parleys() {
        for p in [
            "not json",
            r#"{"aps":{"alert":"hi"}}"#,
            r#"{"type":"call"}"#,
            r#"{"type":"call","id":"not-a-uuid"}"#,
            r#"{"type":"dance","id":"01890A5D-AC96-774B-BCCE-B302099A8057"}"#,
        ] {
            assert_eq!(read_platform_push(p.as_bytes(), None), None, "{p}");
        }
    }
}
