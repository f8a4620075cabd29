//! Wake-ups through Apple's and Google's services for devices that sleep
//! without our link: which of a device's platform tokens to use, what
//! Apple or Google get to see, and counters of what became of them.
//!
//! The wake-up carries an opaque id and its kind, nothing else: no
//! handle, no caller, no payload. The app comes back over its link for
//! what waits (the push, or the call's INVITE).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use wire::push::{Platform, PlatformToken, PushType};

use super::fcm::{FcmClient, FcmPush};
use super::{ApnsClient, ApnsPush, Outcome};
use crate::store::Owed;

/// The services this courier has credentials for.
#[derive(Debug, Default, Clone)]
pub struct Platforms {
    /// APNs production (`api.push.apple.com`).
    pub apns: Option<Arc<ApnsClient>>,
    /// APNs sandbox, for development builds of an app.
    pub apns_sandbox: Option<Arc<ApnsClient>>,
    pub fcm: Option<Arc<FcmClient>>,
}

/// Longest an FCM message or a call's wake-up is kept trying by the
/// platform when the push itself has no expiry.
const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

impl Platforms {
    pub fn is_empty(&self) -> bool {
        self.apns.is_none() && self.apns_sandbox.is_none() && self.fcm.is_none()
    }

    fn apns_for(&self, t: &PlatformToken) -> Option<&Arc<ApnsClient>> {
        match t.sandbox {
            true => self.apns_sandbox.as_ref(),
            false => self.apns.as_ref(),
        }
    }

    /// Whether this courier can reach the service `t` belongs to.
    pub fn serves(&self, t: &PlatformToken) -> bool {
        match t.platform {
            Platform::Apns => self.apns_for(t).is_some(),
            Platform::Fcm => self.fcm.is_some(),
        }
    }

    /// The token among `tokens` that wakes the device for a call (`calls`)
    /// or for other pushes, on a service this courier reaches. APNs first:
    /// on an iPhone only PushKit wakes an app for a call.
    pub fn pick<'a>(&self, tokens: &'a [PlatformToken], calls: bool) -> Option<&'a PlatformToken> {
        let mut usable: Vec<&PlatformToken> = tokens
            .iter()
            .filter(|t| if calls { t.calls } else { t.others })
            .filter(|t| self.serves(t))
            .collect();
        usable.sort_by_key(|t| t.platform);
        usable.first().copied()
    }

    /// Sends the wake-up `o` through `t`, with the call's details sealed to
    /// the device (`sealed`, base64url) if there are any.
    pub async fn send(
        &self,
        t: &PlatformToken,
        o: &Owed,
        sealed: Option<&str>,
        now: i64,
    ) -> Outcome {
        let ttl = match o.expires {
            0 => DEFAULT_TTL,
            e => Duration::from_secs(e.saturating_sub(now).max(1) as u64),
        };
        let kind = if o.calls { "call" } else { "wake" };
        match t.platform {
            Platform::Apns => {
                let Some(apns) = self.apns_for(t) else {
                    return unreachable_service();
                };
                let push = ApnsPush {
                    token: t.token.clone(),
                    topic: match o.calls {
                        true => format!("{}.voip", t.topic),
                        false => t.topic.clone(),
                    },
                    push_type: match o.calls {
                        true => PushType::Voip,
                        false => PushType::Alert,
                    },
                    priority: 10,
                    expiration: (now + ttl.as_secs() as i64) as u64,
                    collapse_id: Some(format!("parley-{kind}")),
                    id: o.id,
                    payload: apns_payload(o, sealed).into_bytes(),
                };
                apns.send(&push).await
            }
            Platform::Fcm => {
                let Some(fcm) = &self.fcm else {
                    return unreachable_service();
                };
                let mut data: std::collections::BTreeMap<String, String> = [
                    ("type".to_owned(), kind.to_owned()),
                    ("id".to_owned(), o.id.to_uuid()),
                ]
                .into();
                if let Some(s) = sealed {
                    data.insert("sealed".to_owned(), s.to_owned());
                }
                let push = FcmPush {
                    token: t.token.clone(),
                    data,
                    ttl,
                    collapse_key: Some(format!("parley-{kind}")),
                    high: o.calls,
                };
                fcm.send(&push).await
            }
        }
    }
}

fn unreachable_service() -> Outcome {
    Outcome::Refused {
        status: 0,
        reason: "no credentials for this platform".into(),
    }
}

/// What Apple carries: for a call, a VoIP push whose id the app reports
/// to CallKit at once (Apple requires every VoIP push to be reported as a
/// call), with the call's details sealed to the device if it asked;
/// otherwise an alert the app's notification service extension replaces
/// with what it fetches over the link.
pub fn apns_payload(o: &Owed, sealed: Option<&str>) -> String {
    let id = o.id.to_uuid();
    match o.calls {
        true => {
            let mut p = serde_json::json!({"type": "call", "id": id});
            if let Some(s) = sealed {
                p["sealed"] = s.into();
            }
            serde_json::json!({"aps": {}, "parley": p})
        }
        false => serde_json::json!({
            "aps": {"alert": {"loc-key": "PARLEY_WAKE"}, "mutable-content": 1},
            "parley": {"type": "wake", "id": id},
        }),
    }
    .to_string()
}

/// Largest push payload sealed into a call's wake-up (APNs takes 5 KiB
/// for VoIP, FCM 4 KiB for all of a message).
pub const MAX_SEALED: usize = 2048;

/// `payload` sealed to the device's keys (RFC 8291 `aes128gcm`, as a Web
/// Push body), base64url: only the device opens it.
pub fn seal(to: &wire::push::SealTo, payload: &[u8]) -> Option<String> {
    use base64::Engine as _;
    if payload.len() > MAX_SEALED {
        return None;
    }
    let seed = crate::courier::random::<48>().ok()?;
    let body = wire::webpush::encrypt(&to.p256dh, &to.auth, payload, seed).ok()?;
    Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(body))
}

/// Why a device's platform token is refused before it is stored.
pub fn check(t: &PlatformToken) -> Result<(), &'static str> {
    let withdraws = t.token.is_empty();
    if !(withdraws || t.calls || t.others) {
        return Err("a platform token must wake for calls, other pushes, or both");
    }
    match t.platform {
        Platform::Apns => {
            let hex = t.token.bytes().all(|b| b.is_ascii_hexdigit());
            if !t.token.is_empty() && (!hex || !(64..=200).contains(&t.token.len())) {
                return Err("an APNs device token is 64 to 200 hex digits");
            }
            let bundle = t
                .topic
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
            if t.topic.is_empty() || !bundle || t.topic.ends_with(".voip") {
                return Err("an APNs token names the app's bundle id (without .voip)");
            }
        }
        Platform::Fcm => {
            let printable = t.token.bytes().all(|b| b.is_ascii_graphic());
            if !printable {
                return Err("an FCM registration token is printable ASCII");
            }
            if t.sandbox {
                return Err("FCM has no sandbox");
            }
        }
    }
    Ok(())
}

/// What became of wake-ups sent through the platforms, for /metrics.
#[derive(Debug, Default)]
pub struct WakeMetrics {
    /// [platform][outcome]: see [`WakeMetrics::OUTCOMES`].
    counts: [[AtomicU64; 5]; 2],
}

impl WakeMetrics {
    const PLATFORMS: [Platform; 2] = [Platform::Apns, Platform::Fcm];
    /// Taken; retried (each retry); the token was gone; refused; not
    /// taken before it stopped being of use.
    pub const OUTCOMES: [&'static str; 5] = ["accepted", "retried", "gone", "refused", "expired"];

    pub fn count(&self, platform: Platform, outcome: &str) {
        let p = Self::PLATFORMS.iter().position(|x| *x == platform);
        let o = Self::OUTCOMES.iter().position(|x| *x == outcome);
        if let (Some(p), Some(o)) = (p, o) {
            self.counts[p][o].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(out, "# TYPE parley_upstream_wakes_total counter");
        for (p, platform) in Self::PLATFORMS.iter().enumerate() {
            for (o, outcome) in Self::OUTCOMES.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "parley_upstream_wakes_total{{platform=\"{}\",outcome=\"{outcome}\"}} {}",
                    platform.as_str(),
                    self.counts[p][o].load(Ordering::Relaxed)
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(platform: Platform, calls: bool, others: bool, token: &str) -> PlatformToken {
        PlatformToken {
            platform,
            calls,
            others,
            sandbox: false,
            topic: "com.example.app".into(),
            token: token.into(),
            seal_to: None,
        }
    }

    #[test]
    fn tokens_are_checked_before_they_are_kept() {
        let hex = "ab".repeat(32);
        assert!(check(&token(Platform::Apns, true, false, &hex)).is_ok());
        assert!(check(&token(Platform::Apns, true, false, "xyz")).is_err());
        assert!(check(&token(Platform::Apns, false, false, &hex)).is_err());
        let mut voip = token(Platform::Apns, true, false, &hex);
        voip.topic = "com.example.app.voip".into();
        assert!(check(&voip).is_err(), "the bundle id, not the VoIP topic");
        assert!(check(&token(Platform::Fcm, true, true, "fcm:tok_1-2")).is_ok());
        assert!(check(&token(Platform::Fcm, true, true, "a b")).is_err());
        // Withdrawing names no token.
        assert!(check(&token(Platform::Apns, true, false, "")).is_ok());
    }

    #[test]
    fn a_call_goes_to_pushkit_and_other_pushes_to_the_alert_token() {
        let p = Platforms {
            apns: Some(Arc::new(ApnsClient::new(crate::upstream::ApnsConfig {
                addr: "127.0.0.1:1".parse().unwrap(),
                server_name: "localhost".into(),
                roots: rustls::RootCertStore::empty(),
                key_pkcs8: Vec::new(),
                key_id: "K".into(),
                team_id: "T".into(),
            }))),
            ..Platforms::default()
        };
        let voip = token(Platform::Apns, true, false, "v");
        let alert = token(Platform::Apns, false, true, "a");
        let fcm = token(Platform::Fcm, true, true, "f");
        let all = [fcm.clone(), alert.clone(), voip.clone()];
        assert_eq!(p.pick(&all, true), Some(&voip));
        assert_eq!(p.pick(&all, false), Some(&alert));
        // No FCM credentials here: an FCM-only device is not woken.
        assert_eq!(p.pick(&[fcm], true), None);
        let mut sandbox = voip;
        sandbox.sandbox = true;
        assert_eq!(p.pick(&[sandbox], true), None);
    }

    #[test]
    fn sealed_details_open_only_with_the_devices_keys() {
        use base64::Engine as _;
        let keys = wire::webpush::SubscriptionKeys::generate().unwrap();
        let to = wire::push::SealTo {
            p256dh: keys.public(),
            auth: keys.auth,
        };
        let details = br#"{"parley":{"type":"call","from":"alice@example.com"}}"#;
        let sealed = seal(&to, details).unwrap();
        assert!(!sealed.contains("alice"));
        let body = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&sealed)
            .unwrap();
        assert_eq!(keys.decrypt(&body).unwrap(), details);
        let other = wire::webpush::SubscriptionKeys::generate().unwrap();
        assert!(other.decrypt(&body).is_err());
        assert!(seal(&to, &[b' '; MAX_SEALED + 1]).is_none());
    }

    #[test]
    fn apple_sees_the_kind_and_an_opaque_id_only() {
        let o = Owed {
            device: wire::DeviceId([1; 16]),
            seq: 7,
            id: wire::push::NotificationId([2; 16]),
            calls: true,
            expires: 0,
        };
        let v: serde_json::Value = serde_json::from_str(&apns_payload(&o, None)).unwrap();
        assert_eq!(v["parley"]["type"], "call");
        assert_eq!(v["parley"]["id"], o.id.to_uuid());
        assert_eq!(v["parley"].as_object().unwrap().len(), 2);
        assert_eq!(v["aps"], serde_json::json!({}));
    }
}
