//! HTTPS JSON API under `/v1/`. Errors are `application/problem+json`
//! (RFC 9457); refusals for rate limits carry `Retry-After`. Binary fields
//! (keys, device lists, proofs) are base64url without padding. The OpenAPI
//! document (`openapi.json` in this crate) is served at `/v1/openapi.json`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequest, Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use wire::transparency::SignedRoot;
use wire::{DeviceId, PublicKey};

use crate::error::Error;
use crate::service::{AuthedDevice, Ids, LookupResult, Registered, ResetOutcome, Submitted};

/// The OpenAPI document, served as is.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// Request bodies larger than this get 413.
pub const MAX_BODY: usize = 64 * 1024;

pub fn router(ids: Arc<Ids>) -> Router {
    Router::new()
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/verifications", post(start_verification))
        .route("/v1/verifications/{id}/resend", post(resend_verification))
        .route("/v1/verifications/{id}/check", post(check_verification))
        .route("/v1/accounts", post(create_account))
        .route("/v1/accounts/reset", post(reset_account))
        .route("/v1/accounts/reset/{id}", get(reset_status))
        .route("/v1/account/resets", get(list_resets))
        .route("/v1/account/resets/{id}/approve", post(approve_reset))
        .route("/v1/account/resets/{id}/cancel", post(cancel_reset))
        .route("/v1/account", get(account).delete(delete_account))
        .route("/v1/account/device-list", put(update_device_list))
        .route("/v1/account/key", get(rotated_account_key))
        .route("/v1/account/links", post(create_link).get(list_links))
        .route("/v1/links/{code}/claim", post(claim_link))
        .route("/v1/links/{code}", get(link_status))
        .route("/v1/device/push-tokens", put(set_push_tokens))
        .route("/v1/device/events", get(events))
        .route("/v1/lookup", post(lookup))
        .route("/v1/turn-credentials", post(turn_credentials))
        .route("/v1/history/{handle}", get(history))
        .route("/v1/kt/keys", get(kt_keys))
        .route("/v1/kt/root", get(kt_root))
        .route("/v1/kt/audit", get(kt_audit))
        .route("/v1/crl", get(crl))
        .route("/v1/ca.pem", get(ca))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::map_response(as_problem))
        .with_state(ids)
}

type S = State<Arc<Ids>>;

// ---- errors ---------------------------------------------------------------

/// An error as HTTP: status, problem type and detail.
#[derive(Debug)]
pub struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind) = match &self.0 {
            Error::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad-request"),
            Error::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Error::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Error::NotFound(_) => (StatusCode::NOT_FOUND, "not-found"),
            Error::Gone(_) => (StatusCode::GONE, "gone"),
            Error::HandleTaken => (StatusCode::CONFLICT, "handle-taken"),
            Error::DeviceExists => (StatusCode::CONFLICT, "device-exists"),
            Error::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Error::RetryAfter(_) => (StatusCode::TOO_MANY_REQUESTS, "rate-limited"),
            Error::Busy => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
            Error::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "delivery-failed"),
            Error::Config(_) | Error::Database(_) | Error::Directory(_) | Error::Internal(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        let detail = if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %self.0, "internal error");
            "internal error; the operator's log has details".to_owned()
        } else {
            tracing::debug!(error = %self.0, "request refused");
            self.0.to_string()
        };
        problem(
            status,
            kind,
            &detail,
            match &self.0 {
                Error::RetryAfter(d) => Some(d.as_secs().max(1)),
                _ => None,
            },
        )
    }
}

pub fn problem(status: StatusCode, kind: &str, detail: &str, retry_after: Option<u64>) -> Response {
    let mut body = json!({
        "type": format!("https://parley.dev/problems/{kind}"),
        "title": status.canonical_reason().unwrap_or("error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    if let Some(s) = retry_after {
        body["retry_after"] = json!(s);
    }
    let mut r = (status, body.to_string()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    if let Some(s) = retry_after {
        if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    r
}

/// Rejections from axum's own extractors (a bad query string, an
/// undecodable path, a body over the limit, a wrong method) come as plain
/// text; rewrite every error that is not problem+json yet into one, keeping
/// its status and message.
async fn as_problem(resp: Response) -> Response {
    let status = resp.status();
    let is_problem = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == b"application/problem+json");
    if status.as_u16() < 400 || is_problem {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let body = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let detail = String::from_utf8_lossy(&body);
    let detail = match detail.trim() {
        "" => status.canonical_reason().unwrap_or("error"),
        d => d,
    };
    let kind = match status {
        StatusCode::METHOD_NOT_ALLOWED => "method-not-allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload-too-large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported-media-type",
        s if s.is_server_error() => "internal",
        _ => "bad-request",
    };
    let mut out = problem(status, kind, detail, None);
    if let Some(allow) = parts.headers.get(header::ALLOW) {
        out.headers_mut().insert(header::ALLOW, allow.clone());
    }
    out
}

async fn not_found() -> Response {
    problem(StatusCode::NOT_FOUND, "not-found", "no such endpoint", None)
}

type R = Result<Response, ApiError>;

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Error> {
    if body.is_empty() {
        return Err(Error::BadRequest("a JSON body is required".into()));
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        Error::BadRequest(format!("body: {path}: {}", e.inner()))
    })
}

fn b64(field: &str, s: &str) -> Result<Vec<u8>, Error> {
    B64.decode(s)
        .map_err(|_| Error::BadRequest(format!("{field} must be base64url without padding")))
}

fn path_of(uri: &Uri) -> &str {
    uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")
}

/// A request signed by a device key (registered or not), or sent without a
/// signature over a connection that presented a device certificate: the
/// key and the body. A signature, when present, is what counts. Refusals
/// are problem+json like every other error.
#[derive(Debug)]
pub struct Signed {
    pub key: PublicKey,
    pub body: Bytes,
}

impl FromRequest<Arc<Ids>> for Signed {
    type Rejection = Response;

    async fn from_request(req: Request, ids: &Arc<Ids>) -> Result<Self, Response> {
        let method = req.method().clone();
        let uri = req.uri().clone();
        let auth = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.to_str().unwrap_or_default().to_owned());
        let cert_key = req
            .extensions()
            .get::<crate::runtime::ClientCertKey>()
            .map(|k| k.0);
        // Bytes honours DefaultBodyLimit (413).
        let body = Bytes::from_request(req, ids)
            .await
            .map_err(IntoResponse::into_response)?;
        let key = match (auth, cert_key) {
            (None, Some(key)) => key,
            (auth, _) => ids
                .verify_request(auth.as_deref(), method.as_str(), path_of(&uri), &body)
                .map_err(|e| ApiError(e).into_response())?,
        };
        Ok(Signed { key, body })
    }
}

/// A signed request from a registered, active device.
#[derive(Debug)]
pub struct Device {
    pub me: AuthedDevice,
    pub body: Bytes,
}

impl FromRequest<Arc<Ids>> for Device {
    type Rejection = Response;

    async fn from_request(req: Request, ids: &Arc<Ids>) -> Result<Self, Response> {
        let Signed { key, body } = Signed::from_request(req, ids).await?;
        let me = ids
            .device(&key)
            .await
            .map_err(|e| ApiError(e).into_response())?;
        Ok(Device { me, body })
    }
}

fn ok(status: StatusCode, v: Value) -> R {
    Ok((status, Json(v)).into_response())
}

fn root_json(r: &SignedRoot) -> Value {
    json!({
        "epoch": r.epoch,
        "root_hash": B64.encode(r.root_hash),
        "signature": B64.encode(&r.signature),
    })
}

// ---- handlers ----------------------------------------------------------------

async fn openapi() -> Response {
    let mut r = OPENAPI.into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartVerification {
    handle: String,
}

fn verification_json(v: &crate::service::VerificationView) -> Value {
    json!({
        "id": v.id,
        "handle": v.handle.uri(),
        "expires_in": v.expires_in.as_secs(),
        "resend_in": v.resend_in.map(|d| d.as_secs()),
        "checks_left": v.checks_left,
    })
}

async fn start_verification(
    State(ids): S,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Bytes,
) -> R {
    let req: StartVerification = parse(&body)?;
    let v = ids.start_verification(&req.handle, peer.ip()).await?;
    ok(StatusCode::CREATED, verification_json(&v))
}

async fn resend_verification(State(ids): S, Path(id): Path<String>) -> R {
    let v = ids.resend_verification(&id).await?;
    ok(StatusCode::OK, verification_json(&v))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckVerification {
    code: String,
}

async fn check_verification(State(ids): S, Path(id): Path<String>, body: Bytes) -> R {
    let req: CheckVerification = parse(&body)?;
    let (handle, token) = ids.check_verification(&id, &req.code).await?;
    ok(
        StatusCode::OK,
        json!({"handle": handle.uri(), "handle_token": token}),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewDevice {
    #[serde(default)]
    name: String,
    #[serde(default)]
    capabilities: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateAccount {
    handle_tokens: Vec<String>,
    device_list: String,
    /// Handle URI → a list naming only that handle (needed when the device
    /// list names several; see `service::Lists`).
    #[serde(default)]
    handle_lists: HashMap<String, String>,
    device: NewDevice,
}

/// Decodes `handle_lists` (handle URI → base64url list).
fn handle_lists(
    given: &HashMap<String, String>,
) -> Result<std::collections::BTreeMap<String, Vec<u8>>, Error> {
    given
        .iter()
        .map(|(k, v)| Ok((k.clone(), b64("handle_lists", v)?)))
        .collect()
}

fn registered_json(r: &Registered) -> Value {
    json!({
        "account_id": r.account_id,
        "device_id": r.device_id.to_string(),
        "certificate": r.certificate,
        "ca": r.ca,
    })
}

async fn create_account(State(ids): S, signed: Signed) -> R {
    register(&ids, signed, false).await
}

async fn reset_account(State(ids): S, signed: Signed) -> R {
    register(&ids, signed, true).await
}

/// `POST /v1/accounts` and `/v1/accounts/reset` take the same body. A
/// reset of an account that still has devices is 202: it waits for them
/// (see `GET /v1/accounts/reset/{id}`).
async fn register(ids: &Ids, Signed { key, body }: Signed, reset: bool) -> R {
    let req: CreateAccount = parse(&body)?;
    let list = b64("device_list", &req.device_list)?;
    let per_handle = handle_lists(&req.handle_lists)?;
    let submitted = Submitted {
        list: &list,
        per_handle: &per_handle,
    };
    let (tokens, name, caps) = (
        &req.handle_tokens,
        &req.device.name,
        &req.device.capabilities,
    );
    if reset {
        return reset_answer(
            ids.reset_account(&key, tokens, submitted, name, caps)
                .await?,
        );
    }
    let r = ids
        .create_account(&key, tokens, submitted, name, caps)
        .await?;
    ok(StatusCode::CREATED, registered_json(&r))
}

fn reset_answer(r: ResetOutcome) -> R {
    match r {
        ResetOutcome::Done(r) => ok(StatusCode::CREATED, registered_json(&r)),
        ResetOutcome::Pending { id, effective_at } => ok(
            StatusCode::ACCEPTED,
            json!({"reset": id, "status": "pending", "effective_at": effective_at}),
        ),
        ResetOutcome::Cancelled => {
            Err(Error::Gone("a device of the account cancelled this reset".into()).into())
        }
    }
}

/// The new device's view of its reset: 202 while it waits, 201 with its
/// registration once done, 410 if cancelled.
async fn reset_status(State(ids): S, Path(id): Path<String>, Signed { key, .. }: Signed) -> R {
    reset_answer(ids.reset_status(&key, &id).await?)
}

/// Resets waiting to retire this device's account.
async fn list_resets(State(ids): S, Device { me, .. }: Device) -> R {
    let resets: Vec<Value> = ids
        .resets_for(&me)
        .await?
        .iter()
        .map(|r| {
            json!({
                "id": r.id,
                "device_name": r.name,
                "requested_at": r.created_at,
                "effective_at": r.effective_at,
            })
        })
        .collect();
    ok(StatusCode::OK, json!({"resets": resets}))
}

async fn approve_reset(State(ids): S, Path(id): Path<String>, Device { me, .. }: Device) -> R {
    ids.approve_reset(&me, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn cancel_reset(State(ids): S, Path(id): Path<String>, Device { me, .. }: Device) -> R {
    ids.cancel_reset(&me, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn device_json(d: &crate::store::DeviceRow) -> Value {
    json!({
        "id": d.id.to_string(),
        "identity_key": B64.encode(&d.identity_key),
        "name": d.name,
        "capabilities": serde_json::from_str::<Value>(&d.capabilities).unwrap_or(json!([])),
        "push_tokens": serde_json::from_str::<Value>(&d.push_tokens).unwrap_or(json!([])),
    })
}

/// A device as a lookup shows it: what a caller needs to verify and reach
/// it (id, key, capabilities). Never its push tokens (only signaling, for
/// a call it routes, and the account's own devices may make it wake), and
/// its name only to the account's own devices.
fn looked_up_device_json(d: &crate::store::DeviceRow, own: bool) -> Value {
    let mut v = json!({
        "id": d.id.to_string(),
        "identity_key": B64.encode(&d.identity_key),
        "capabilities": serde_json::from_str::<Value>(&d.capabilities).unwrap_or(json!([])),
    });
    if own {
        v["name"] = json!(d.name);
    }
    v
}

async fn account(State(ids): S, Device { me, .. }: Device) -> R {
    let a = ids
        .store
        .account(&me.device.account_id)
        .await?
        .ok_or_else(|| Error::NotFound("account".into()))?;
    let devices: Vec<Value> = ids
        .store
        .devices_of(&a.id)
        .await?
        .iter()
        .filter(|d| d.revoked_at.is_none())
        .map(device_json)
        .collect();
    ok(
        StatusCode::OK,
        json!({
            "account_id": a.id,
            "device_id": me.device.id.to_string(),
            "certificate": me.device.certificate,
            "handles": ids.store.handles_of(&a.id).await?,
            "seq": a.seq,
            "device_list": B64.encode(&a.list),
            "devices": devices,
        }),
    )
}

async fn delete_account(State(ids): S, Device { me, .. }: Device) -> R {
    ids.delete_account(&me).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateDeviceList {
    device_list: String,
    #[serde(default)]
    handle_tokens: Vec<String>,
    /// Handle URI → a list naming only that handle (see `CreateAccount`).
    #[serde(default)]
    handle_lists: HashMap<String, String>,
    /// Link code hash (hex) → account key sealed to the new device.
    #[serde(default)]
    sealed_account_keys: HashMap<String, String>,
    /// When the list rotates the account key: device id (hex) → the new
    /// key sealed to that device's identity key, for every device that
    /// stays except the sender.
    #[serde(default)]
    rotated_account_keys: HashMap<String, String>,
}

async fn update_device_list(State(ids): S, Device { me, body }: Device) -> R {
    let req: UpdateDeviceList = parse(&body)?;
    let list = b64("device_list", &req.device_list)?;
    let mut sealed = HashMap::new();
    for (k, v) in &req.sealed_account_keys {
        sealed.insert(k.clone(), b64("sealed_account_keys", v)?);
    }
    let mut rotated = HashMap::new();
    for (k, v) in &req.rotated_account_keys {
        rotated.insert(k.clone(), b64("rotated_account_keys", v)?);
    }
    let per_handle = handle_lists(&req.handle_lists)?;
    let submitted = Submitted {
        list: &list,
        per_handle: &per_handle,
    };
    let seq = ids
        .update_device_list(&me, submitted, &req.handle_tokens, &sealed, &rotated)
        .await?;
    ok(StatusCode::OK, json!({"seq": seq}))
}

/// The account key as the last rotation sealed it to this device.
async fn rotated_account_key(State(ids): S, Device { me, .. }: Device) -> R {
    let (seq, sealed) = ids
        .store
        .rotated_key(&me.device.id.to_string())
        .await?
        .ok_or_else(|| {
            Error::NotFound("the account key was not rotated since this device joined".into())
        })?;
    ok(
        StatusCode::OK,
        json!({"seq": seq, "sealed": B64.encode(sealed)}),
    )
}

async fn create_link(State(ids): S, Device { me, .. }: Device) -> R {
    let (code, ttl) = ids.create_link(&me).await?;
    ok(
        StatusCode::CREATED,
        json!({"code": code, "expires_in": ttl.as_secs()}),
    )
}

async fn list_links(State(ids): S, Device { me, .. }: Device) -> R {
    let links = ids
        .store
        .links_of(&me.device.account_id, crate::kt::unix_now())
        .await?;
    let claims: Vec<Value> = links
        .iter()
        .filter(|l| l.claim_key.is_some() && !l.approved)
        .map(|l| {
            json!({
                "link": wire::keys::hex(&l.code_hash),
                "device_id": l.claim_device,
                "identity_key": l.claim_key.as_ref().map(|k| B64.encode(k)),
                "name": l.claim_name,
                "capabilities": l.claim_capabilities.as_deref().and_then(|c| serde_json::from_str::<Value>(c).ok()),
                "transfer_key": l.claim_transfer_key.as_ref().map(|k| B64.encode(k)),
            })
        })
        .collect();
    ok(StatusCode::OK, json!({"claims": claims}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClaimLink {
    device_id: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    capabilities: Vec<String>,
    #[serde(default)]
    transfer_key: Option<String>,
}

async fn claim_link(State(ids): S, Path(code): Path<String>, Signed { key, body }: Signed) -> R {
    let req: ClaimLink = parse(&body)?;
    let device_id: DeviceId = req
        .device_id
        .parse()
        .map_err(|e: wire::keys::KeyError| Error::BadRequest(format!("device_id: {e}")))?;
    let transfer = req
        .transfer_key
        .as_deref()
        .map(|t| b64("transfer_key", t))
        .transpose()?;
    ids.claim_link(
        &key,
        &code,
        device_id,
        &req.name,
        &req.capabilities,
        transfer.as_deref(),
    )
    .await?;
    ok(StatusCode::ACCEPTED, json!({"status": "pending"}))
}

async fn link_status(State(ids): S, Path(code): Path<String>, Signed { key, .. }: Signed) -> R {
    let (link, device) = ids.link_status(&key, &code).await?;
    let v = match device {
        Some(d) if link.approved => json!({
            "status": "approved",
            "account_id": d.account_id,
            "device_id": d.id.to_string(),
            "certificate": d.certificate,
            "ca": ids.ca_pem(),
            "sealed_account_key": link.sealed_account_key.as_ref().map(|k| B64.encode(k)),
        }),
        _ if link.expires_at <= crate::kt::unix_now() => json!({"status": "expired"}),
        _ => json!({"status": "pending"}),
    };
    ok(StatusCode::OK, v)
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct PushToken {
    topic: String,
    token: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PushTokens {
    tokens: Vec<PushToken>,
}

async fn set_push_tokens(State(ids): S, Device { me, body }: Device) -> R {
    let req: PushTokens = parse(&body)?;
    if req.tokens.len() > 16
        || req.tokens.iter().any(|t| {
            t.topic.is_empty() || t.topic.len() > 255 || t.token.is_empty() || t.token.len() > 255
        })
    {
        return Err(Error::BadRequest(
            "at most 16 tokens; topic and token 1 to 255 characters".into(),
        )
        .into());
    }
    let json = serde_json::to_string(&req.tokens).map_err(|e| Error::Internal(e.to_string()))?;
    ids.set_push_tokens(&me, &json).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
struct EventsQuery {
    #[serde(default)]
    after: i64,
}

async fn events(State(ids): S, Query(q): Query<EventsQuery>, Device { me, .. }: Device) -> R {
    let evs = ids
        .store
        .events_after(&me.device.account_id, q.after, 100)
        .await?;
    let evs: Vec<Value> = evs
        .iter()
        .map(|e| json!({"seq": e.seq, "kind": e.kind, "device_id": e.device_id, "at": e.at}))
        .collect();
    ok(StatusCode::OK, json!({"events": evs}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Lookup {
    handles: Vec<String>,
}

async fn turn_credentials(State(ids): S, Device { me, .. }: Device) -> R {
    let c = ids.turn_credential(&me)?;
    Ok(Json(json!({
        "username": c.username,
        "password": c.password,
        "ttl": c.ttl.as_secs(),
        "uris": c.uris,
    }))
    .into_response())
}

async fn lookup(
    State(ids): S,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Device { me, body }: Device,
) -> R {
    let req: Lookup = parse(&body)?;
    let results = ids.lookup(&me, peer.ip(), &req.handles).await?;
    let results: Vec<Value> = results
        .iter()
        .map(|(handle, r)| match r {
            LookupResult::Invalid(e) => json!({"handle": handle, "status": "invalid", "detail": e}),
            LookupResult::NotFound(a) => json!({
                "handle": handle,
                "status": "not_found",
                "vrf_proof": B64.encode(&a.vrf_proof),
                "proof": B64.encode(&a.proof),
                "root": root_json(&a.root),
            }),
            LookupResult::Found {
                value,
                proof,
                root,
                devices,
            } => json!({
                "handle": handle,
                "status": "found",
                "value": B64.encode(value),
                "proof": B64.encode(proof),
                "root": root_json(root),
                "devices": devices
                    .iter()
                    .map(|d| looked_up_device_json(d, d.account_id == me.device.account_id))
                    .collect::<Vec<_>>(),
            }),
        })
        .collect();
    ok(StatusCode::OK, json!({"results": results}))
}

async fn history(
    State(ids): S,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(handle): Path<String>,
    Device { me, .. }: Device,
) -> R {
    let h = wire::Handle::parse(&handle).map_err(|e| Error::BadRequest(e.to_string()))?;
    // A history read says whether a handle exists, as a lookup does: it
    // spends the same budget.
    ids.spend_lookups(&me, peer.ip(), 1).await?;
    let (proof, root) = ids
        .kt
        .history(&h.uri())
        .await?
        .ok_or_else(|| Error::NotFound("this handle was never published".into()))?;
    ok(
        StatusCode::OK,
        json!({"handle": h.uri(), "proof": B64.encode(proof), "root": root_json(&root)}),
    )
}

async fn kt_keys(State(ids): S) -> R {
    let a = ids.kt.anchor();
    ok(
        StatusCode::OK,
        json!({
            "vrf_public_key": B64.encode(&a.vrf_public_key),
            "root_key": B64.encode(&a.root_key),
        }),
    )
}

async fn kt_root(State(ids): S) -> R {
    let r = ids.kt.root().await?;
    ok(StatusCode::OK, root_json(&r))
}

#[derive(Deserialize)]
struct AuditQuery {
    start: u64,
    end: u64,
}

async fn kt_audit(State(ids): S, Query(q): Query<AuditQuery>) -> R {
    if q.end.saturating_sub(q.start) > MAX_AUDIT_EPOCHS {
        return Err(Error::BadRequest(format!(
            "audit at most {MAX_AUDIT_EPOCHS} epochs at a time"
        ))
        .into());
    }
    let latest = ids.kt.root().await?.epoch;
    if q.start < 1 || q.start >= q.end || q.end > latest {
        return Err(Error::BadRequest(format!(
            "need 1 <= start < end <= {latest} (the latest epoch)"
        ))
        .into());
    }
    let (proof, roots) = ids.audit(q.start, q.end).await?;
    ok(
        StatusCode::OK,
        json!({
            "start": q.start,
            "end": q.end,
            "proof": B64.encode(proof),
            "root_hashes": roots.iter().map(|(e, h)| json!({"epoch": e, "root_hash": B64.encode(h)})).collect::<Vec<_>>(),
        }),
    )
}

/// Epochs one audit may span: the span bounds the work and the answer's
/// size (each epoch's proof holds the directory's read lock only while it
/// is built).
const MAX_AUDIT_EPOCHS: u64 = 100;

async fn crl(State(ids): S) -> R {
    let revoked = ids.store.revoked().await?;
    let der = ids.crl(&revoked)?;
    let mut r = der.into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/pkix-crl"),
    );
    Ok(r)
}

async fn ca(State(ids): S) -> Response {
    let mut r = ids.ca_pem().to_owned().into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-pem-file"),
    );
    r
}
