//! Google's Firebase Cloud Messaging (HTTP v1), reached as a provider.
//!
//! - [`ServiceAccount`]: the operator's service-account JSON (its
//!   `client_email`, RSA `private_key`, `token_uri`, `project_id`).
//! - Access tokens come from the OAuth 2.0 JWT bearer grant (RFC 7523): an
//!   RS256 assertion for the `firebase.messaging` scope, posted to the
//!   token URI; the token is kept until a minute before it expires, and
//!   fetched again at once if FCM calls it invalid.
//! - [`classify`]: FCM's answers into an [`Outcome`]: `UNREGISTERED` (404)
//!   and `SENDER_ID_MISMATCH` drop the token; `QUOTA_EXCEEDED` (429),
//!   `UNAVAILABLE` (503) and `INTERNAL` (500) are retried, honouring
//!   `Retry-After`; `UNAUTHENTICATED` (401) renews the access token.
//! - [`FcmClient`]: data-only messages with Android priority HIGH and a
//!   TTL, over one HTTP/2 connection to each host.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;

use super::{Connection, Outcome, DEFAULT_RETRY};
use crate::provider::Response;

/// The scope an access token must carry to send.
pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// An access token is used until this long before it expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(60);
/// How long an assertion is good for (Google accepts at most an hour).
const ASSERTION_LIFE: i64 = 3600;

/// The parts of a service-account JSON file FCM needs.
#[derive(Clone)]
pub struct ServiceAccount {
    pub project_id: String,
    pub client_email: String,
    /// The RSA key, PKCS#8 DER.
    pub private_key: Vec<u8>,
    /// Where access tokens come from (`https://oauth2.googleapis.com/token`).
    pub token_uri: String,
}

impl std::fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key stays out of logs.
        f.debug_struct("ServiceAccount")
            .field("project_id", &self.project_id)
            .field("client_email", &self.client_email)
            .field("token_uri", &self.token_uri)
            .finish_non_exhaustive()
    }
}

impl ServiceAccount {
    /// Reads the JSON Google issues for a service account.
    pub fn from_json(json: &[u8]) -> Result<ServiceAccount, crate::error::Error> {
        let bad = |what: &str| crate::error::Error::Config(format!("service account: {what}"));
        let v: serde_json::Value =
            serde_json::from_slice(json).map_err(|e| bad(&format!("not JSON ({e})")))?;
        let field = |name: &str| {
            v[name]
                .as_str()
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .ok_or_else(|| bad(&format!("no {name}")))
        };
        let pem = field("private_key")?;
        let private_key = match rustls_pemfile::private_key(&mut pem.as_bytes()) {
            Ok(Some(rustls::pki_types::PrivateKeyDer::Pkcs8(k))) => k.secret_pkcs8_der().to_vec(),
            _ => return Err(bad("private_key is not a PKCS#8 PEM key")),
        };
        ring::signature::RsaKeyPair::from_pkcs8(&private_key)
            .map_err(|_| bad("private_key is not an RSA key"))?;
        Ok(ServiceAccount {
            project_id: field("project_id")?,
            client_email: field("client_email")?,
            private_key,
            token_uri: field("token_uri")?,
        })
    }

    /// The signed JWT asking for an access token at `now` (unix seconds).
    pub fn assertion(&self, now: i64) -> Result<String, crate::error::Error> {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = b64.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
        let claims = b64.encode(
            serde_json::json!({
                "iss": self.client_email,
                "scope": SCOPE,
                "aud": self.token_uri,
                "iat": now,
                "exp": now + ASSERTION_LIFE,
            })
            .to_string(),
        );
        let input = format!("{header}.{claims}");
        let key = ring::signature::RsaKeyPair::from_pkcs8(&self.private_key)
            .map_err(|_| crate::error::Error::Config("service account key".into()))?;
        let mut sig = vec![0u8; key.public().modulus_len()];
        key.sign(
            &ring::signature::RSA_PKCS1_SHA256,
            &ring::rand::SystemRandom::new(),
            input.as_bytes(),
            &mut sig,
        )
        .map_err(|_| crate::error::Error::Internal("RS256 signing failed".into()))?;
        Ok(format!("{input}.{}", b64.encode(sig)))
    }
}

/// Where FCM and its token endpoint are, and who we are to them.
#[derive(Debug, Clone)]
pub struct FcmConfig {
    pub account: ServiceAccount,
    /// `fcm.googleapis.com:443` resolved, or a stand-in.
    pub api: SocketAddr,
    pub api_name: String,
    /// The token URI's host, resolved, and its name.
    pub token: SocketAddr,
    pub token_name: String,
    pub roots: rustls::RootCertStore,
}

/// One data message to an FCM registration token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FcmPush {
    pub token: String,
    /// Data-only: the app handles it (no notification shown by the system).
    pub data: BTreeMap<String, String>,
    /// How long FCM keeps trying (`android.ttl`).
    pub ttl: Duration,
    pub collapse_key: Option<String>,
    /// Android priority HIGH (wakes a dozing phone: calls); else NORMAL.
    pub high: bool,
}

/// Reads FCM's answer: status and `{"error": {"status", "details": [{"errorCode"}]}}`.
pub fn classify(r: &Response) -> Outcome {
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
    let status = body["error"]["status"].as_str().unwrap_or_default();
    let code = body["error"]["details"]
        .as_array()
        .and_then(|d| d.iter().find_map(|x| x["errorCode"].as_str()))
        .unwrap_or(status)
        .to_owned();
    let after = r
        .header("retry-after")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(DEFAULT_RETRY, Duration::from_secs);
    match (r.status, code.as_str()) {
        (200, _) => Outcome::Accepted {
            id: body["name"].as_str().unwrap_or_default().to_owned(),
        },
        (_, "UNREGISTERED") | (404, _) | (_, "SENDER_ID_MISMATCH") => Outcome::Gone {
            reason: code,
            since: None,
        },
        (401, _) | (_, "UNAUTHENTICATED") => Outcome::RenewToken { reason: code },
        (429, _) | (500..=599, _) | (_, "QUOTA_EXCEEDED" | "UNAVAILABLE" | "INTERNAL") => {
            Outcome::Retry {
                after,
                reason: if code.is_empty() {
                    format!("status {}", r.status)
                } else {
                    code
                },
            }
        }
        (status, _) => Outcome::Refused {
            status,
            reason: code,
        },
    }
}

/// An access token and when it stops being used (unix seconds).
#[derive(Debug, Clone)]
struct AccessToken {
    bearer: String,
    until: i64,
}

/// Sends to FCM, fetching access tokens as needed.
#[derive(Debug)]
pub struct FcmClient {
    account: ServiceAccount,
    api: Connection,
    token_host: Connection,
    access: Mutex<Option<AccessToken>>,
}

impl FcmClient {
    pub fn new(config: FcmConfig) -> FcmClient {
        FcmClient {
            api: Connection::new(config.api, &config.api_name, config.roots.clone()),
            token_host: Connection::new(config.token, &config.token_name, config.roots),
            account: config.account,
            access: Mutex::new(None),
        }
    }

    fn cached(&self, now: i64) -> Option<String> {
        let a = self.access.lock().unwrap_or_else(|p| p.into_inner());
        a.as_ref()
            .filter(|t| now < t.until)
            .map(|t| t.bearer.clone())
    }

    fn forget(&self) {
        *self.access.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// A valid access token: the cached one, or a new one from the token
    /// endpoint.
    async fn access_token(&self) -> Result<String, Outcome> {
        let now = crate::courier::unix_now();
        if let Some(b) = self.cached(now) {
            return Ok(b);
        }
        let retry = |reason: String| Outcome::Retry {
            after: DEFAULT_RETRY,
            reason,
        };
        let assertion = self.account.assertion(now).map_err(|e| Outcome::Refused {
            status: 0,
            reason: e.to_string(),
        })?;
        let path = self
            .account
            .token_uri
            .split_once("://")
            .and_then(|(_, rest)| rest.find('/').map(|i| rest[i..].to_owned()))
            .unwrap_or_else(|| "/token".into());
        let body = format!(
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={assertion}"
        );
        let r = self
            .token_host
            .request(
                &path,
                &[("content-type", "application/x-www-form-urlencoded")],
                body.into_bytes(),
            )
            .await
            .map_err(retry)?;
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
        match (
            r.status,
            v["access_token"].as_str(),
            v["expires_in"].as_i64(),
        ) {
            (200, Some(t), Some(secs)) => {
                let bearer = format!("Bearer {t}");
                *self.access.lock().unwrap_or_else(|p| p.into_inner()) = Some(AccessToken {
                    bearer: bearer.clone(),
                    until: now + secs - TOKEN_MARGIN.as_secs() as i64,
                });
                Ok(bearer)
            }
            (500..=599, _, _) => Err(retry(format!("token endpoint: status {}", r.status))),
            (status, _, _) => Err(Outcome::Refused {
                status,
                reason: format!(
                    "the token endpoint refused the service account: {}",
                    v["error"].as_str().unwrap_or_default()
                ),
            }),
        }
    }

    /// Sends `push` (fetching a new access token and sending again once if
    /// FCM calls the current one invalid).
    pub async fn send(&self, push: &FcmPush) -> Outcome {
        for attempt in 0..2 {
            let outcome = self.send_once(push).await;
            match outcome {
                Outcome::RenewToken { .. } if attempt == 0 => self.forget(),
                other => return other,
            }
        }
        Outcome::Refused {
            status: 401,
            reason: "FCM refused a fresh access token".into(),
        }
    }

    async fn send_once(&self, push: &FcmPush) -> Outcome {
        let bearer = match self.access_token().await {
            Ok(b) => b,
            Err(o) => return o,
        };
        let mut android = serde_json::json!({
            "priority": if push.high { "HIGH" } else { "NORMAL" },
            "ttl": format!("{}s", push.ttl.as_secs()),
        });
        if let Some(c) = &push.collapse_key {
            android["collapse_key"] = c.clone().into();
        }
        let body = serde_json::json!({
            "message": {"token": push.token, "data": push.data, "android": android}
        })
        .to_string();
        let path = format!("/v1/projects/{}/messages:send", self.account.project_id);
        let headers = [
            ("authorization", bearer.as_str()),
            ("content-type", "application/json"),
        ];
        self.api
            .send(&path, &headers, body.into_bytes(), classify)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::response;

    fn error(code: u16, status: &str, fcm: &str) -> String {
        format!(
            r#"{{"error":{{"code":{code},"status":"{status}","details":[{{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"{fcm}"}}]}}}}"#
        )
    }

    #[test]
    fn fcm_answers_say_what_to_do() {
        assert_eq!(
            classify(&response(200, &[], r#"{"name":"projects/p/messages/1"}"#)),
            Outcome::Accepted {
                id: "projects/p/messages/1".into()
            }
        );
        assert!(matches!(
            classify(&response(404, &[], &error(404, "NOT_FOUND", "UNREGISTERED"))),
            Outcome::Gone { ref reason, .. } if reason == "UNREGISTERED"
        ));
        assert!(matches!(
            classify(&response(
                403,
                &[],
                &error(403, "PERMISSION_DENIED", "SENDER_ID_MISMATCH")
            )),
            Outcome::Gone { .. }
        ));
        assert_eq!(
            classify(&response(
                429,
                &[("retry-after", "5")],
                &error(429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED")
            )),
            Outcome::Retry {
                after: Duration::from_secs(5),
                reason: "QUOTA_EXCEEDED".into()
            }
        );
        for (code, status, fcm) in [
            (503, "UNAVAILABLE", "UNAVAILABLE"),
            (500, "INTERNAL", "INTERNAL"),
        ] {
            assert!(matches!(
                classify(&response(code, &[], &error(code, status, fcm))),
                Outcome::Retry { .. }
            ));
        }
        assert!(matches!(
            classify(&response(
                401,
                &[],
                r#"{"error":{"code":401,"status":"UNAUTHENTICATED"}}"#
            )),
            Outcome::RenewToken { .. }
        ));
        assert!(matches!(
            classify(&response(
                400,
                &[],
                &error(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT")
            )),
            Outcome::Refused { status: 400, .. }
        ));
    }
}
