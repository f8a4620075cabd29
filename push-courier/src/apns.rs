//! The APNs-compatible provider API: `POST /3/device/{token}`.
//!
//! Headers, limits, status codes and `reason` strings follow Apple's
//! provider API so that existing APNs client libraries work when pointed at
//! this host. One addition: `GET /3/status/{apns-id}` tells the provider
//! what became of a message (queued, delivered, expired, dropped,
//! replaced, unregistered).

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Extension, Router};
use wire::push::{DeviceToken, NotificationId, PushType};

use crate::core::jwt::{Jwt, VerifiedCache};
use crate::courier::{random, unix_now, Courier, PushError, PushRequest};
use crate::http::{header, ClientCertName};
use crate::Provider;

/// Largest payload for every push type but VoIP.
pub const MAX_PAYLOAD: usize = 4096;
/// Largest VoIP payload.
pub const MAX_VOIP_PAYLOAD: usize = 5120;
/// Largest request body read at all.
const MAX_REQUEST_BODY: usize = 64 * 1024;
/// Provider tokens older than this are refused (`ExpiredProviderToken`).
pub const TOKEN_MAX_AGE_S: i64 = 3600;
/// Allowed clock skew for a token's `iat` in the future.
const IAT_SKEW_S: i64 = 300;
/// Verified tokens remembered, so a provider reusing its token (as APNs
/// asks) costs one signature check per hour, not one per push.
const TOKEN_CACHE: usize = 4096;

#[derive(Debug)]
pub struct ApnsState {
    courier: Arc<Courier>,
    providers: Vec<Provider>,
    verified: VerifiedCache<(usize, i64)>,
}

pub fn router(courier: Arc<Courier>) -> Router {
    let state = Arc::new(ApnsState {
        providers: courier.config.providers.clone(),
        courier,
        verified: VerifiedCache::new(TOKEN_CACHE),
    });
    Router::new()
        .route("/3/device/{token}", any(push))
        .route("/3/status/{id}", get(status))
        .with_state(state)
}

/// An APNs error: status, `reason`, and for 410 the time the token
/// stopped being valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApnsError {
    pub status: StatusCode,
    pub reason: &'static str,
    pub timestamp_ms: Option<i64>,
}

fn err(status: StatusCode, reason: &'static str) -> ApnsError {
    ApnsError {
        status,
        reason,
        timestamp_ms: None,
    }
}

fn respond(id: NotificationId, r: Result<(), ApnsError>) -> Response {
    let mut resp = match r {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => {
            let body = match e.timestamp_ms {
                Some(t) => serde_json::json!({"reason": e.reason, "timestamp": t}),
                None => serde_json::json!({"reason": e.reason}),
            };
            let mut r = (e.status, body.to_string()).into_response();
            r.headers_mut().insert(
                "content-type",
                HeaderValue::from_static("application/json; charset=utf-8"),
            );
            // Worth trying again shortly: storage or the device's shard
            // owner was busy or moving, or the provider went too fast.
            if matches!(
                e.status,
                StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS
            ) {
                r.headers_mut()
                    .insert("retry-after", HeaderValue::from_static("1"));
            }
            r
        }
    };
    if let Ok(v) = HeaderValue::from_str(&id.to_uuid()) {
        resp.headers_mut().insert("apns-id", v);
    }
    resp
}

async fn push(
    State(st): State<Arc<ApnsState>>,
    Path(token): Path<String>,
    req: Request,
) -> Response {
    // The request's own parts, not the extractors' copies of the headers.
    let (parts, body) = req.into_parts();
    let (method, headers) = (parts.method, parts.headers);
    let cert = parts
        .extensions
        .get::<ClientCertName>()
        .cloned()
        .unwrap_or(ClientCertName(None));
    // apns-id first: every answer carries it.
    let (id, early) = match header(&headers, "apns-id") {
        Some(v) => match NotificationId::from_uuid(v) {
            Some(id) => (id, None),
            None => (
                NotificationId(random().unwrap_or([0; 16])),
                Some(err(StatusCode::BAD_REQUEST, "BadMessageId")),
            ),
        },
        None => match Courier::new_id() {
            Ok(id) => (id, None),
            Err(_) => (
                NotificationId([0; 16]),
                Some(err(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalServerError",
                )),
            ),
        },
    };
    // What is wrong before the body is kept, and who asks: a refused
    // request's body is read and thrown away as it comes (never buffered:
    // up to 64 KiB per stream, 1000 streams a connection), within the same
    // deadline, and answered once it ended — an HTTP/2 answer sent while
    // the client is still sending ends in a stream reset that clients
    // report as a failure.
    let verdict = match early {
        Some(e) => Err(e),
        None if method != Method::POST => {
            Err(err(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed"))
        }
        None => st.authenticate(&headers, &cert),
    };
    let provider = match verdict {
        Ok(p) => p,
        Err(e) => {
            discard(body, st.courier.config.provider_body_timeout).await;
            return respond(id, Err(e));
        }
    };
    // A provider's body is read whole before any verdict (an HTTP/2
    // answer sent while the client is still sending ends in a stream
    // reset many clients report as a failure instead of the answer), and
    // within a deadline, so a stalled body does not hold its stream.
    let payload = tokio::time::timeout(
        st.courier.config.provider_body_timeout,
        axum::body::to_bytes(body, MAX_REQUEST_BODY),
    )
    .await;
    let r = match payload {
        Ok(Ok(p)) => accept(&st, &token, provider, &headers, p, id).await,
        Ok(Err(_)) => Err(err(StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLarge")),
        Err(_) => Err(err(StatusCode::BAD_REQUEST, "IdleTimeout")),
    };
    respond(id, r)
}

/// The answer to a request no route takes (an unknown path, a method a
/// path does not have), in Apple's form with a fresh `apns-id`, after its
/// body was read and thrown away (an answer sent while the client is still
/// sending resets the stream).
pub(crate) async fn unrouted(
    req: Request,
    within: std::time::Duration,
    status: StatusCode,
    reason: &'static str,
) -> Response {
    discard(req.into_body(), within).await;
    let id = Courier::new_id().unwrap_or(NotificationId([0; 16]));
    respond(id, Err(err(status, reason)))
}

/// Reads a body to its end, keeping none of it; stops past
/// [`MAX_REQUEST_BODY`] bytes or after `within`.
async fn discard(body: axum::body::Body, within: std::time::Duration) {
    use http_body_util::BodyExt;
    let drain = async {
        let mut body = body;
        let mut seen = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            if let Some(data) = frame.data_ref() {
                seen += data.len();
                if seen > MAX_REQUEST_BODY {
                    return;
                }
            }
        }
    };
    let _ = tokio::time::timeout(within, drain).await;
}

async fn accept(
    st: &ApnsState,
    token: &str,
    provider: &Provider,
    headers: &HeaderMap,
    payload: bytes::Bytes,
    id: NotificationId,
) -> Result<(), ApnsError> {
    let token =
        DeviceToken::from_hex(token).ok_or(err(StatusCode::BAD_REQUEST, "BadDeviceToken"))?;
    let push_type = match header(headers, "apns-push-type") {
        None => PushType::Alert,
        Some(v) => PushType::from_apns(v).ok_or(err(StatusCode::BAD_REQUEST, "InvalidPushType"))?,
    };
    let priority = match header(headers, "apns-priority") {
        None => 10,
        Some("10") => 10,
        Some("5") => 5,
        Some("1") => 1,
        Some(_) => return Err(err(StatusCode::BAD_REQUEST, "BadPriority")),
    };
    let (expires, now_or_never) = match header(headers, "apns-expiration") {
        None => (0, false),
        Some(v) => match v.parse::<u64>() {
            Ok(0) => (0, true),
            Ok(t) if (t as i64) <= unix_now() => (0, true),
            Ok(t) => (t, false),
            Err(_) => return Err(err(StatusCode::BAD_REQUEST, "BadExpirationDate")),
        },
    };
    let collapse_id = header(headers, "apns-collapse-id").unwrap_or("");
    if collapse_id.len() > 64 {
        return Err(err(StatusCode::BAD_REQUEST, "BadCollapseId"));
    }
    let topic = match header(headers, "apns-topic") {
        Some(t) if !t.is_empty() && t.len() <= 255 => t.to_owned(),
        Some(_) => return Err(err(StatusCode::BAD_REQUEST, "BadTopic")),
        None => match provider.topics.as_slice() {
            // A certificate provider with one topic may leave it out, as
            // with APNs certificates.
            [only] if provider.public_key.is_none() => only.clone(),
            _ => return Err(err(StatusCode::BAD_REQUEST, "MissingTopic")),
        },
    };
    if !provider.topics.is_empty() && !provider.topics.contains(&topic) {
        return Err(err(StatusCode::BAD_REQUEST, "TopicDisallowed"));
    }
    // A VoIP topic only by name: "any topic" grants none of them.
    let operator_granted = provider.topics.contains(&topic);
    let limit = if push_type == PushType::Voip {
        MAX_VOIP_PAYLOAD
    } else {
        MAX_PAYLOAD
    };
    if payload.len() > limit {
        return Err(err(StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLarge"));
    }
    if payload.is_empty() {
        return Err(err(StatusCode::BAD_REQUEST, "PayloadEmpty"));
    }
    let req = PushRequest {
        id,
        token,
        push_type,
        priority,
        expires,
        now_or_never,
        collapse_id: collapse_id.to_owned(),
        topic: Some(topic),
        payload: payload.to_vec(),
        provider: provider.name.clone(),
        vapid_key: None,
        receipt: None,
        for_device: None,
        operator_granted,
    };
    match st.courier.push(req).await {
        Ok(_) => Ok(()),
        Err(e) => Err(match e {
            PushError::UnknownToken | PushError::WrongKind => {
                err(StatusCode::BAD_REQUEST, "BadDeviceToken")
            }
            PushError::Unregistered { at } => ApnsError {
                status: StatusCode::GONE,
                reason: "Unregistered",
                timestamp_ms: Some(at * 1000),
            },
            PushError::TopicMismatch => err(StatusCode::BAD_REQUEST, "DeviceTokenNotForTopic"),
            PushError::TopicReserved => err(StatusCode::BAD_REQUEST, "TopicDisallowed"),
            PushError::KeyMismatch => err(StatusCode::FORBIDDEN, "Forbidden"),
            PushError::TooManyRequests => err(StatusCode::TOO_MANY_REQUESTS, "TooManyRequests"),
            PushError::Unavailable(_) => err(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable"),
        }),
    }
}

async fn status(
    State(st): State<Arc<ApnsState>>,
    Path(id): Path<String>,
    Extension(cert): Extension<ClientCertName>,
    headers: HeaderMap,
) -> Response {
    let Some(nid) = NotificationId::from_uuid(&id) else {
        return respond(
            NotificationId([0; 16]),
            Err(err(StatusCode::BAD_REQUEST, "BadMessageId")),
        );
    };
    let provider = match st.authenticate(&headers, &cert) {
        Ok(p) => p,
        Err(e) => return respond(nid, Err(e)),
    };
    match st.courier.store.status(&nid).await {
        Ok(Some(s)) if s.provider == provider.name => {
            let body = serde_json::json!({
                "apns-id": nid.to_uuid(),
                "status": s.state.as_str(),
                "timestamp": s.updated_at * 1000,
            });
            let mut r = (StatusCode::OK, body.to_string()).into_response();
            r.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/json"));
            r
        }
        Ok(_) => respond(nid, Err(err(StatusCode::NOT_FOUND, "NotFound"))),
        Err(_) => respond(
            nid,
            Err(err(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable")),
        ),
    }
}

impl ApnsState {
    /// Provider token (`authorization: bearer <ES256 JWT>`) or, without
    /// one, the provider's client certificate.
    fn authenticate(
        &self,
        headers: &HeaderMap,
        cert: &ClientCertName,
    ) -> Result<&Provider, ApnsError> {
        let Some(auth) = header(headers, "authorization") else {
            return cert
                .0
                .as_ref()
                .and_then(|cn| self.providers.iter().find(|p| p.name == *cn))
                .ok_or(err(StatusCode::FORBIDDEN, "MissingProviderToken"));
        };
        let invalid = err(StatusCode::FORBIDDEN, "InvalidProviderToken");
        let token = auth
            .strip_prefix("bearer ")
            .or_else(|| auth.strip_prefix("Bearer "))
            .ok_or(invalid.clone())?
            .trim();
        let now = unix_now();
        if let Some((i, iat)) = self.verified.get(token) {
            return check_age(iat, now).map(|()| &self.providers[i]);
        }
        let jwt = Jwt::parse(token).map_err(|_| invalid.clone())?;
        let (Some(kid), Some(iss), Some(iat)) = (
            jwt.kid.as_deref(),
            jwt.str_claim("iss"),
            jwt.int_claim("iat"),
        ) else {
            return Err(invalid);
        };
        let (i, p) = self
            .providers
            .iter()
            .enumerate()
            .find(|(_, p)| p.key_id == kid && p.team_id == iss)
            .ok_or(invalid.clone())?;
        let key = p.public_key.as_ref().ok_or(invalid.clone())?;
        jwt.verify(key).map_err(|_| invalid.clone())?;
        check_age(iat, now)?;
        self.verified.insert(token, (i, iat));
        Ok(p)
    }
}

fn check_age(iat: i64, now: i64) -> Result<(), ApnsError> {
    if iat > now + IAT_SKEW_S {
        return Err(err(StatusCode::FORBIDDEN, "InvalidProviderToken"));
    }
    if now - iat > TOKEN_MAX_AGE_S {
        return Err(err(StatusCode::FORBIDDEN, "ExpiredProviderToken"));
    }
    Ok(())
}
