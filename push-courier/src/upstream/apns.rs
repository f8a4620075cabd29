//! Apple's push service (APNs), reached as a provider.
//!
//! - [`ProviderToken`]: the ES256 provider token (JWT with the key id as
//!   `kid` and the team id as `iss`), kept between 20 and 60 minutes as
//!   APNs requires: reused for [`TOKEN_REUSE`], never renewed sooner than
//!   [`TOKEN_MIN_AGE`] after the last one (APNs answers
//!   `TooManyProviderTokenUpdates`), except when APNs says it expired.
//! - [`classify`]: an APNs answer, as what to do with the push and the
//!   token: accepted; the token is gone (`410 Unregistered` with its
//!   timestamp, `400 BadDeviceToken`, `DeviceTokenNotForTopic`): drop it
//!   and report the device unreachable; try again later (`429`, `5xx`,
//!   honouring `Retry-After`); or refused for good.
//! - [`ApnsClient`]: one HTTP/2 connection, many concurrent streams,
//!   connected on first use and again after a failure.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use super::{Connection, Outcome, DEFAULT_RETRY};
use crate::provider::Response;

/// A provider token is reused this long (APNs: refresh between 20 and 60
/// minutes).
pub const TOKEN_REUSE: Duration = Duration::from_secs(40 * 60);
/// A new provider token no sooner than this after the last.
pub const TOKEN_MIN_AGE: Duration = Duration::from_secs(20 * 60);

/// Where APNs is and who we are to it.
#[derive(Debug, Clone)]
pub struct ApnsConfig {
    /// The APNs endpoint (api.push.apple.com:443 resolved, or a stand-in).
    pub addr: SocketAddr,
    /// The name its certificate carries.
    pub server_name: String,
    pub roots: rustls::RootCertStore,
    /// The `.p8` signing key, PKCS#8 DER.
    pub key_pkcs8: Vec<u8>,
    pub key_id: String,
    pub team_id: String,
}

/// One push to an APNs device token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApnsPush {
    /// The device token the app got from APNs, hex.
    pub token: String,
    /// `apns-topic`: the bundle id, with `.voip` for VoIP pushes.
    pub topic: String,
    pub push_type: wire::push::PushType,
    /// 10 immediate, 5 power-considerate.
    pub priority: u8,
    /// Unix seconds after which APNs drops it; 0: deliver now or never.
    pub expiration: u64,
    pub collapse_id: Option<String>,
    /// `apns-id`: the same on every retry, so nothing is shown twice.
    pub id: wire::push::NotificationId,
    pub payload: Vec<u8>,
}

/// Reads APNs's answer (status, headers, `{"reason": …, "timestamp": …}`).
pub fn classify(r: &Response) -> Outcome {
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
    let reason = body["reason"].as_str().unwrap_or_default().to_owned();
    let retry_after = r
        .header("retry-after")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(DEFAULT_RETRY, Duration::from_secs);
    match r.status {
        200 => Outcome::Accepted {
            id: r.header("apns-id").unwrap_or_default().to_owned(),
        },
        410 => Outcome::Gone {
            reason,
            // APNs sends milliseconds since the epoch.
            since: body["timestamp"].as_i64(),
        },
        400 if matches!(
            reason.as_str(),
            "BadDeviceToken" | "DeviceTokenNotForTopic" | "Unregistered"
        ) =>
        {
            Outcome::Gone {
                reason,
                since: None,
            }
        }
        403 if matches!(
            reason.as_str(),
            "ExpiredProviderToken" | "InvalidProviderToken" | "MissingProviderToken"
        ) =>
        {
            Outcome::RenewToken { reason }
        }
        429 | 500..=599 => Outcome::Retry {
            after: retry_after,
            reason: if reason.is_empty() {
                format!("status {}", r.status)
            } else {
                reason
            },
        },
        status => Outcome::Refused { status, reason },
    }
}

/// The provider token and when it was made.
#[derive(Debug)]
pub struct ProviderToken {
    key_pkcs8: Vec<u8>,
    key_id: String,
    team_id: String,
    /// (issued at, unix seconds; `bearer …`)
    current: Option<(i64, String)>,
}

impl ProviderToken {
    pub fn new(key_pkcs8: Vec<u8>, key_id: &str, team_id: &str) -> ProviderToken {
        ProviderToken {
            key_pkcs8,
            key_id: key_id.to_owned(),
            team_id: team_id.to_owned(),
            current: None,
        }
    }

    /// The `authorization` value at `now` (unix seconds): the current
    /// token while younger than [`TOKEN_REUSE`], else a new one.
    pub fn bearer(&mut self, now: i64) -> Result<String, crate::error::Error> {
        match &self.current {
            Some((at, b)) if now - at < TOKEN_REUSE.as_secs() as i64 && now >= *at => Ok(b.clone()),
            _ => self.issue(now),
        }
    }

    /// APNs refused the token (expired, or invalid): a new one, unless the
    /// current one is younger than [`TOKEN_MIN_AGE`] (then the fault is
    /// not its age, and a new one would only be refused as too frequent).
    /// Whether a new one was made.
    pub fn renew(&mut self, now: i64) -> Result<bool, crate::error::Error> {
        if let Some((at, _)) = &self.current {
            if now - at < TOKEN_MIN_AGE.as_secs() as i64 && now >= *at {
                return Ok(false);
            }
        }
        self.issue(now).map(|_| true)
    }

    fn issue(&mut self, now: i64) -> Result<String, crate::error::Error> {
        let jwt = crate::core::jwt::sign(
            &self.key_pkcs8,
            Some(&self.key_id),
            &serde_json::json!({"iss": self.team_id, "iat": now}),
        )
        .map_err(|e| crate::error::Error::Config(format!("APNs signing key: {e}")))?;
        let b = format!("bearer {jwt}");
        self.current = Some((now, b.clone()));
        Ok(b)
    }

    /// When the current token was made (unix seconds).
    pub fn issued_at(&self) -> Option<i64> {
        self.current.as_ref().map(|(at, _)| *at)
    }
}

/// Pushes to APNs over one HTTP/2 connection.
#[derive(Debug)]
pub struct ApnsClient {
    apns: Connection,
    token: Mutex<ProviderToken>,
}

impl ApnsClient {
    pub fn new(config: ApnsConfig) -> ApnsClient {
        let token = ProviderToken::new(config.key_pkcs8, &config.key_id, &config.team_id);
        ApnsClient {
            apns: Connection::new(config.addr, &config.server_name, config.roots),
            token: Mutex::new(token),
        }
    }

    fn token(&self) -> std::sync::MutexGuard<'_, ProviderToken> {
        self.token.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends `push` once (renewing the provider token and sending again
    /// if APNs refused it for its age).
    pub async fn send(&self, push: &ApnsPush) -> Outcome {
        let mut renewed = false;
        loop {
            let outcome = self.send_once(push).await;
            match outcome {
                Outcome::RenewToken { ref reason } if !renewed => {
                    let now = crate::courier::unix_now();
                    match self.token().renew(now) {
                        Ok(true) => renewed = true,
                        Ok(false) => {
                            return Outcome::Refused {
                                status: 403,
                                reason: reason.clone(),
                            }
                        }
                        Err(e) => {
                            return Outcome::Refused {
                                status: 403,
                                reason: e.to_string(),
                            }
                        }
                    }
                }
                other => return other,
            }
        }
    }

    async fn send_once(&self, push: &ApnsPush) -> Outcome {
        let bearer = match self.token().bearer(crate::courier::unix_now()) {
            Ok(b) => b,
            Err(e) => {
                return Outcome::Refused {
                    status: 0,
                    reason: e.to_string(),
                }
            }
        };
        let (priority, expiration, id) = (
            push.priority.to_string(),
            push.expiration.to_string(),
            push.id.to_uuid(),
        );
        let mut headers: Vec<(&str, &str)> = vec![
            ("authorization", &bearer),
            ("apns-topic", &push.topic),
            ("apns-push-type", push.push_type.as_str()),
            ("apns-priority", &priority),
            ("apns-expiration", &expiration),
            ("apns-id", &id),
        ];
        if let Some(c) = &push.collapse_id {
            headers.push(("apns-collapse-id", c));
        }
        let path = format!("/3/device/{}", push.token);
        self.apns
            .send(&path, &headers, push.payload.clone(), classify)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::response;

    #[test]
    fn apns_answers_say_what_to_do() {
        let id = "8A1B2C3D-0000-0000-0000-000000000001";
        assert_eq!(
            classify(&response(200, &[("apns-id", id)], "")),
            Outcome::Accepted { id: id.into() }
        );
        assert_eq!(
            classify(&response(
                410,
                &[],
                r#"{"reason":"Unregistered","timestamp":1700000000000}"#
            )),
            Outcome::Gone {
                reason: "Unregistered".into(),
                since: Some(1_700_000_000_000)
            }
        );
        for reason in ["BadDeviceToken", "DeviceTokenNotForTopic"] {
            assert!(matches!(
                classify(&response(400, &[], &format!(r#"{{"reason":"{reason}"}}"#))),
                Outcome::Gone { since: None, .. }
            ));
        }
        assert_eq!(
            classify(&response(
                429,
                &[("retry-after", "7")],
                r#"{"reason":"TooManyRequests"}"#
            )),
            Outcome::Retry {
                after: Duration::from_secs(7),
                reason: "TooManyRequests".into()
            }
        );
        assert!(matches!(
            classify(&response(503, &[], r#"{"reason":"ServiceUnavailable"}"#)),
            Outcome::Retry { after, .. } if after == DEFAULT_RETRY
        ));
        assert!(matches!(
            classify(&response(500, &[], "")),
            Outcome::Retry { .. }
        ));
        assert!(matches!(
            classify(&response(403, &[], r#"{"reason":"ExpiredProviderToken"}"#)),
            Outcome::RenewToken { .. }
        ));
        assert_eq!(
            classify(&response(413, &[], r#"{"reason":"PayloadTooLarge"}"#)),
            Outcome::Refused {
                status: 413,
                reason: "PayloadTooLarge".into()
            }
        );
        assert!(matches!(
            classify(&response(400, &[], r#"{"reason":"BadTopic"}"#)),
            Outcome::Refused { status: 400, .. }
        ));
    }

    fn key() -> Vec<u8> {
        let rng = ring::rand::SystemRandom::new();
        ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &rng,
        )
        .unwrap()
        .as_ref()
        .to_vec()
    }

    #[test]
    fn provider_tokens_live_between_twenty_and_sixty_minutes() {
        let mut t = ProviderToken::new(key(), "KEY1234567", "TEAM123456");
        let t0 = 1_800_000_000;
        let first = t.bearer(t0).unwrap();
        assert!(first.starts_with("bearer "));
        // Reused for 40 minutes.
        assert_eq!(t.bearer(t0 + 39 * 60).unwrap(), first);
        let second = t.bearer(t0 + 40 * 60).unwrap();
        assert_ne!(second, first);
        assert_eq!(t.issued_at(), Some(t0 + 40 * 60));
        // APNs calls it expired: not renewed within 20 minutes of the
        // last, renewed after.
        assert!(!t.renew(t0 + 40 * 60 + 19 * 60).unwrap());
        assert_eq!(t.bearer(t0 + 40 * 60 + 19 * 60).unwrap(), second);
        assert!(t.renew(t0 + 40 * 60 + 20 * 60).unwrap());
        assert_ne!(t.bearer(t0 + 60 * 60).unwrap(), second);
        // The claims APNs reads.
        let b = t.bearer(t0 + 60 * 60).unwrap();
        let jwt = b.trim_start_matches("bearer ");
        let jwt = crate::core::jwt::Jwt::parse(jwt).unwrap();
        assert_eq!(jwt.kid.as_deref(), Some("KEY1234567"));
        assert_eq!(jwt.str_claim("iss"), Some("TEAM123456"));
        assert_eq!(jwt.int_claim("iat"), Some(t0 + 60 * 60));
    }
}
