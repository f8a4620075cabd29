//! Web Push (RFC 8030) for application servers, with VAPID (RFC 8292) and
//! `aes128gcm` bodies (RFC 8291) passed through untouched.
//!
//! | resource | method | RFC 8030 |
//! |----------|--------|----------|
//! | `/wp/{subscription}` | POST | push resource: `TTL` (required), `Urgency`, `Topic`, `Prefer: respond-async` + `Push-Receipt`; 201 + `Location` |
//! | `/wp/receipts` | POST | receipt subscribe resource; 201 + `Location` |
//! | `/wp/r/{id}` | GET | receipt subscription |
//!
//! Subscriptions are created by devices over their courier link (frame
//! Subscribe), which returns the push resource URL. VAPID is required on
//! every push: 401 without it, 403 if it does not verify or the
//! subscription is restricted to another key. Unknown subscriptions get
//! 404, revoked ones 410.
//!
//! Receipts: RFC 8030 delivers them by HTTP/2 server push, which HTTP
//! libraries and clients rarely support; here a GET on the receipt
//! subscription long-polls (up to 30 s) and returns a JSON list of
//! `{"message": <push message URL>, "status": "delivered" | "expired" |
//! "dropped" | "replaced" | "unregistered"}`, or 204 when nothing finished.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine;
use wire::push::{DeviceToken, PushType};

use crate::core::jwt::{Jwt, VerifiedCache};
use crate::courier::{random, unix_now, Courier, PushError, PushOutcome, PushRequest};
use crate::http::header;
use crate::store::Write;

/// Largest body a push service must accept (RFC 8030 §7.2).
pub const MAX_BODY: usize = 4096;
/// Largest request body read at all.
const MAX_REQUEST_BODY: usize = 64 * 1024;
/// TTLs are capped at 28 days.
pub const MAX_TTL: u64 = 28 * 24 * 3600;
/// VAPID tokens may not be valid for more than 24 hours (RFC 8292 §2).
const MAX_VAPID_LIFETIME_S: i64 = 24 * 3600;
const RECEIPT_POLL: Duration = Duration::from_secs(30);
const VAPID_CACHE: usize = 4096;

#[derive(Debug)]
struct WebPushState {
    courier: Arc<Courier>,
    origin: String,
    verified: VerifiedCache<([u8; 65], i64)>,
    /// Receipt subscriptions made per source (a VAPID key costs nothing
    /// to make, so the key is no budget).
    receipt_starts: std::sync::Mutex<wire::ratelimit::RateLimiter<std::net::IpAddr>>,
}

/// Receipt subscriptions one source address (IPv6: /64) may make per
/// minute.
const RECEIPT_SUBSCRIPTIONS_PER_MINUTE: u32 = 10;

pub fn router(courier: Arc<Courier>) -> Router {
    let origin = origin_of(&courier.config.public_url);
    let state = Arc::new(WebPushState {
        courier,
        origin,
        verified: VerifiedCache::new(VAPID_CACHE),
        receipt_starts: std::sync::Mutex::new(wire::ratelimit::RateLimiter::new(
            RECEIPT_SUBSCRIPTIONS_PER_MINUTE,
            Duration::from_secs(60),
        )),
    });
    Router::new()
        .route("/wp/receipts", post(new_receipt_subscription))
        .route("/wp/r/{id}", get(receipts))
        .route("/wp/{sub}", post(push))
        .with_state(state)
}

/// An RFC 9457 problem response.
fn problem(status: StatusCode, detail: &str) -> Response {
    let body = serde_json::json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or(""),
        "status": status.as_u16(),
        "detail": detail,
    });
    let mut r = (status, body.to_string()).into_response();
    r.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("application/problem+json"),
    );
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert("www-authenticate", HeaderValue::from_static("vapid"));
    }
    r
}

async fn push(
    State(st): State<Arc<WebPushState>>,
    Path(sub): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // Read the body first (see apns.rs: early HTTP/2 answers reset
    // streams), within the body deadline, so a stalled body does not hold
    // its stream.
    let payload = tokio::time::timeout(
        st.courier.config.provider_body_timeout,
        axum::body::to_bytes(body, MAX_REQUEST_BODY),
    )
    .await;
    let payload = match payload {
        Ok(Ok(b)) if b.len() <= MAX_BODY => b,
        Err(_) => {
            return problem(
                StatusCode::REQUEST_TIMEOUT,
                "the push message body did not arrive in time",
            )
        }
        _ => {
            return problem(
                StatusCode::PAYLOAD_TOO_LARGE,
                "push message body is larger than 4096 bytes",
            )
        }
    };
    let Some(token) = DeviceToken::from_b64(&sub) else {
        return problem(StatusCode::NOT_FOUND, "no such subscription");
    };
    let key = match st.vapid(&headers) {
        Ok(k) => k,
        Err(r) => return r,
    };
    let ttl = match header(&headers, "ttl").map(|v| v.trim().parse::<u64>()) {
        None => return problem(StatusCode::BAD_REQUEST, "TTL header is required"),
        Some(Err(_)) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "TTL must be a non-negative integer",
            )
        }
        Some(Ok(t)) => t.min(MAX_TTL),
    };
    let priority = match header(&headers, "urgency").map(str::trim) {
        None | Some("normal") => 5,
        Some("very-low") => 0,
        Some("low") => 1,
        Some("high") => 10,
        Some(_) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "Urgency must be very-low, low, normal or high",
            )
        }
    };
    let topic = header(&headers, "topic").unwrap_or("").trim();
    if topic.len() > 32
        || !topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return problem(
            StatusCode::BAD_REQUEST,
            "Topic must be at most 32 base64url characters",
        );
    }
    if !payload.is_empty() {
        match header(&headers, "content-encoding") {
            Some(e) if e.trim().eq_ignore_ascii_case("aes128gcm") => {}
            _ => {
                return problem(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "body must be Content-Encoding: aes128gcm (RFC 8291)",
                )
            }
        }
    }
    let wants_receipt = header(&headers, "prefer")
        .is_some_and(|p| p.split(',').any(|x| x.trim() == "respond-async"));
    let receipt = match (wants_receipt, header(&headers, "push-receipt")) {
        (true, Some(url)) => match url.rsplit_once("/wp/r/") {
            Some((_, id))
                if st
                    .courier
                    .store
                    .receipt_subscription(id)
                    .await
                    .ok()
                    .flatten()
                    .is_some() =>
            {
                Some(id.to_owned())
            }
            _ => return problem(StatusCode::BAD_REQUEST, "unknown Push-Receipt subscription"),
        },
        _ => None,
    };
    let id = match Courier::new_id() {
        Ok(id) => id,
        Err(_) => return problem(StatusCode::INTERNAL_SERVER_ERROR, "no randomness"),
    };
    let req = PushRequest {
        id,
        token,
        push_type: PushType::WebPush,
        priority,
        expires: if ttl == 0 { 0 } else { unix_now() as u64 + ttl },
        now_or_never: ttl == 0,
        collapse_id: topic.to_owned(),
        topic: None,
        payload: payload.to_vec(),
        provider: key_name(&key),
        vapid_key: Some(key),
        receipt,
        for_device: None,
        operator_granted: false,
    };
    match st.courier.push(req).await {
        Ok(outcome) => {
            let mut r = StatusCode::CREATED.into_response();
            let h = r.headers_mut();
            let location = format!(
                "{}/wp/m/{}",
                st.courier.config.public_url.trim_end_matches('/'),
                id.to_uuid().to_lowercase()
            );
            if let Ok(v) = HeaderValue::from_str(&location) {
                h.insert("location", v);
            }
            // A message that could not be delivered now is not kept.
            let ttl = if outcome == PushOutcome::Discarded {
                0
            } else {
                ttl
            };
            h.insert("ttl", HeaderValue::from(ttl));
            r
        }
        Err(PushError::UnknownToken | PushError::WrongKind | PushError::TopicReserved) => {
            problem(StatusCode::NOT_FOUND, "no such subscription")
        }
        Err(PushError::Unregistered { .. }) => {
            problem(StatusCode::GONE, "subscription has expired")
        }
        Err(PushError::KeyMismatch) => problem(
            StatusCode::FORBIDDEN,
            "subscription is restricted to another application server key",
        ),
        Err(PushError::TopicMismatch) => problem(StatusCode::BAD_REQUEST, "topic mismatch"),
        Err(PushError::TooManyRequests) => {
            let mut r = problem(StatusCode::TOO_MANY_REQUESTS, "too many push messages");
            r.headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
            r
        }
        Err(PushError::Unavailable(_)) => {
            let mut r = problem(StatusCode::SERVICE_UNAVAILABLE, "storage unavailable");
            r.headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
            r
        }
    }
}

async fn new_receipt_subscription(
    State(st): State<Arc<WebPushState>>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let key = match st.vapid(&headers) {
        Ok(k) => k,
        Err(r) => return r,
    };
    let source = wire::net::source_key(peer.ip());
    let allowed = st
        .receipt_starts
        .lock()
        .map(|mut l| l.take(source, std::time::Instant::now()))
        .unwrap_or(false);
    if !allowed {
        let mut r = problem(
            StatusCode::TOO_MANY_REQUESTS,
            "too many receipt subscriptions from this address",
        );
        r.headers_mut()
            .insert("retry-after", HeaderValue::from_static("60"));
        return r;
    }
    let id = match random::<16>() {
        Ok(r) => base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r),
        Err(_) => return problem(StatusCode::INTERNAL_SERVER_ERROR, "no randomness"),
    };
    let w = Write::ReceiptSubscription {
        id: id.clone(),
        provider: key_name(&key),
        at: unix_now(),
    };
    if st.courier.commit(vec![w]).await.is_err() {
        return problem(StatusCode::SERVICE_UNAVAILABLE, "storage unavailable");
    }
    let mut r = StatusCode::CREATED.into_response();
    let location = format!(
        "{}/wp/r/{id}",
        st.courier.config.public_url.trim_end_matches('/')
    );
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert("location", v);
    }
    r
}

async fn receipts(
    State(st): State<Arc<WebPushState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let key = match st.vapid(&headers) {
        Ok(k) => k,
        Err(r) => return r,
    };
    match st.courier.store.receipt_subscription(&id).await {
        Ok(Some(owner)) if owner == key_name(&key) => {}
        Ok(_) => return problem(StatusCode::NOT_FOUND, "no such receipt subscription"),
        Err(_) => return problem(StatusCode::SERVICE_UNAVAILABLE, "storage unavailable"),
    }
    let deadline = tokio::time::Instant::now() + RECEIPT_POLL;
    loop {
        // Register for wake-ups before looking, so none is missed.
        let notified = st.courier.receipts.notified();
        let pending = match st.courier.store.pending_receipts(&id).await {
            Ok(p) => p,
            Err(_) => return problem(StatusCode::SERVICE_UNAVAILABLE, "storage unavailable"),
        };
        if !pending.is_empty() {
            let base = st
                .courier
                .config
                .public_url
                .trim_end_matches('/')
                .to_owned();
            let list: Vec<_> = pending
                .iter()
                .map(|(_, id, state)| {
                    serde_json::json!({
                        "message": format!("{base}/wp/m/{}", id.to_uuid().to_lowercase()),
                        "status": state.as_str(),
                    })
                })
                .collect();
            let seqs = pending.iter().map(|(s, _, _)| *s).collect();
            if st
                .courier
                .commit(vec![Write::ReceiptsSent { seqs }])
                .await
                .is_err()
            {
                return problem(StatusCode::SERVICE_UNAVAILABLE, "storage unavailable");
            }
            let mut r = (
                StatusCode::OK,
                serde_json::json!({ "receipts": list }).to_string(),
            )
                .into_response();
            r.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/json"));
            return r;
        }
        // State changes wake us once committed; nothing to poll meanwhile.
        let wait = deadline.saturating_duration_since(tokio::time::Instant::now());
        if wait.is_zero() {
            return StatusCode::NO_CONTENT.into_response();
        }
        let _ = tokio::time::timeout(wait, notified).await;
    }
}

impl WebPushState {
    /// RFC 8292: `Authorization: vapid t=<JWT>, k=<key>` (or the draft
    /// form `WebPush <JWT>` with `Crypto-Key: p256ecdsa=<key>`). Returns
    /// the verified application server key.
    #[allow(clippy::result_large_err)]
    fn vapid(&self, headers: &HeaderMap) -> Result<[u8; 65], Response> {
        let unauthorized = || problem(StatusCode::UNAUTHORIZED, "VAPID authorization required");
        let forbidden = |why: &str| problem(StatusCode::FORBIDDEN, why);
        let auth = header(headers, "authorization").ok_or_else(unauthorized)?;
        let (t, k) = parse_vapid(auth, header(headers, "crypto-key")).ok_or_else(unauthorized)?;
        let key: [u8; 65] = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(k.trim_end_matches('='))
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| forbidden("VAPID key is not an uncompressed P-256 point"))?;
        let now = unix_now();
        if let Some((cached_key, exp)) = self.verified.get(t) {
            if cached_key == key && exp > now {
                return Ok(key);
            }
        }
        let jwt = Jwt::parse(t).map_err(|_| forbidden("VAPID token is malformed"))?;
        jwt.verify(&key)
            .map_err(|_| forbidden("VAPID signature does not verify"))?;
        if jwt.str_claim("aud").map(|a| a.trim_end_matches('/')) != Some(self.origin.as_str()) {
            return Err(forbidden("VAPID aud is not this push service's origin"));
        }
        let exp = jwt
            .int_claim("exp")
            .ok_or_else(|| forbidden("VAPID exp missing"))?;
        if exp <= now {
            return Err(forbidden("VAPID token has expired"));
        }
        if exp > now + MAX_VAPID_LIFETIME_S + 60 {
            return Err(forbidden("VAPID exp is more than 24 hours ahead"));
        }
        self.verified.insert(t, (key, exp));
        Ok(key)
    }
}

/// Splits a VAPID `Authorization` (and draft `Crypto-Key`) into (token, key).
pub fn parse_vapid<'a>(auth: &'a str, crypto_key: Option<&'a str>) -> Option<(&'a str, &'a str)> {
    let (scheme, rest) = auth.trim().split_once(' ')?;
    if scheme.eq_ignore_ascii_case("vapid") {
        let mut t = None;
        let mut k = None;
        for part in rest.split(',') {
            let (name, value) = part.trim().split_once('=')?;
            match name.trim() {
                "t" => t = Some(value.trim()),
                "k" => k = Some(value.trim()),
                _ => {}
            }
        }
        return Some((t?, k?));
    }
    if scheme.eq_ignore_ascii_case("webpush") {
        let k = crypto_key?
            .split([';', ','])
            .find_map(|p| p.trim().strip_prefix("p256ecdsa="))?;
        return Some((rest.trim(), k));
    }
    None
}

/// A provider name for a VAPID key (for statuses and receipt ownership).
fn key_name(key: &[u8; 65]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, key);
    format!("vapid:{}", wire::keys::hex(&d.as_ref()[..8]))
}

fn origin_of(url: &str) -> String {
    let url = url.trim_end_matches('/');
    match url.find("://") {
        Some(i) => match url[i + 3..].find('/') {
            Some(j) => url[..i + 3 + j].to_owned(),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vapid_header_forms() {
        assert_eq!(
            parse_vapid("vapid t=abc.def.ghi, k=BKEY", None),
            Some(("abc.def.ghi", "BKEY"))
        );
        assert_eq!(
            parse_vapid("WebPush abc.def.ghi", Some("dh=x;p256ecdsa=BKEY")),
            Some(("abc.def.ghi", "BKEY"))
        );
        assert_eq!(parse_vapid("vapid t=abc", None), None);
        assert_eq!(parse_vapid("Bearer x", None), None);
    }

    #[test]
    fn origins() {
        assert_eq!(
            origin_of("https://push.example:8443/"),
            "https://push.example:8443"
        );
        assert_eq!(origin_of("https://h/base"), "https://h");
    }
}
