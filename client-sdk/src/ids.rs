//! The identity service from the device's side, over HTTPS: proving a
//! handle, creating the account (first device) or joining it (approved by
//! an existing device through a link code), the device certificate,
//! looking up handles with their key transparency proofs verified, the
//! own-history audit, push tokens and relay credentials.
//!
//! Every key handed out by [`IdsClient::lookup`] comes from a device list
//! that verified against the pinned transparency keys and its account
//! signature; the server's own routing data never supplies a key.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD as B64};
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use wire::device_list::{DeviceEntry, DeviceList, DirectoryValue, SignedDeviceList};
use wire::handle::Handle;
use wire::keys::{DeviceId, PublicKey, SigningKey};
use wire::transparency::{self, SignedRoot, TrustAnchor, Unapproved};

use crate::call::DeviceKey;

/// Every request is bounded.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum IdsError {
    #[error("cannot reach the identity service: {0}")]
    Connect(String),
    /// The service refused: HTTP status and its problem detail.
    #[error("identity service: {status} {detail}")]
    Refused { status: u16, detail: String },
    #[error("identity service sent something unexpected: {0}")]
    Protocol(String),
    /// A transparency proof or list signature failed: the keys must not
    /// be used.
    #[error("key transparency: {0}")]
    Transparency(String),
}

/// What registration gives a device.
#[derive(Clone, Debug)]
pub struct Registered {
    pub account_id: String,
    pub device_id: DeviceId,
    /// The device certificate (PEM) for mutual TLS with the courier and
    /// signaling, and the CA that issued it.
    pub certificate: String,
    pub ca: String,
}

/// A new device's claim on a link code, as the approving device sees it.
#[derive(Clone, Debug)]
pub struct Claim {
    pub link: String,
    pub device: DeviceId,
    /// The name the new device gave itself (the service relays it).
    pub name: String,
    pub identity_key: wire::keys::PublicKey,
    pub transfer_key: Vec<u8>,
}

impl Claim {
    /// The digits the new device shows for this claim if it is the new
    /// device's own (see [`wire::key_transfer::link_fingerprint`]).
    pub fn fingerprint(&self, code: &str) -> String {
        wire::key_transfer::link_fingerprint(
            code,
            self.device,
            &self.identity_key,
            &self.transfer_key,
        )
    }

    /// Whether this claim is on `code`, as [`IdsClient::create_link`]
    /// returned it (the service names links by the code's SHA-256).
    pub fn is_for(&self, code: &str) -> bool {
        let hash = ring::digest::digest(&ring::digest::SHA256, code.as_bytes());
        self.link
            .eq_ignore_ascii_case(&wire::keys::hex(hash.as_ref()))
    }
}

/// Relay credentials.
#[derive(Clone, Debug)]
pub struct TurnCredentials {
    pub username: String,
    pub password: String,
    pub ttl: Duration,
    pub uris: Vec<String>,
}

/// One handle's verified lookup.
#[derive(Clone, Debug)]
pub struct Found {
    pub handle: Handle,
    /// From the verified, account-signed device list.
    pub devices: Vec<DeviceKey>,
    /// The key that signed that list; none for a deleted handle.
    pub account_key: Option<wire::keys::PublicKey>,
    pub epoch: u64,
}

#[derive(Clone)]
pub struct IdsClient {
    addr: SocketAddr,
    server_name: rustls::pki_types::ServerName<'static>,
    roots: rustls::RootCertStore,
    tls: tokio_rustls::TlsConnector,
    /// This device's certificate, for requests by its identity key: they
    /// go over mutual TLS instead of carrying a signature.
    certificate: Option<(PublicKey, tokio_rustls::TlsConnector)>,
    anchor: Option<TrustAnchor>,
    /// Every root this client accepted: none may be older than the newest,
    /// nor differ from one seen for the same epoch.
    seen: transparency::SeenRoots,
}

/// One HTTP/1.1 request over a new TLS connection to `addr` (named
/// `name`), answered within `limit`: its status, headers and body. An
/// error says what failed to connect or answer.
pub(crate) async fn one_request(
    tls: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
    name: rustls::pki_types::ServerName<'static>,
    req: hyper::Request<Full<Bytes>>,
    limit: std::time::Duration,
) -> Result<(u16, hyper::HeaderMap, Bytes), String> {
    let run = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let tls = tls.connect(name, tcp).await.map_err(|e| e.to_string())?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, headers, body))
    };
    tokio::time::timeout(limit, run)
        .await
        .map_err(|_| format!("no answer within {limit:?}"))?
}

/// A TLS 1.3 client trusting `roots`, presenting `identity` (a device's
/// certificate chain and key, see [`tls_identity`]) when given.
pub fn tls_connector(
    roots: rustls::RootCertStore,
    identity: Option<(
        Vec<rustls::pki_types::CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    )>,
) -> Result<tokio_rustls::TlsConnector, IdsError> {
    Ok(tokio_rustls::TlsConnector::from(Arc::new(tls_client(
        roots, identity,
    )?)))
}

/// The TLS client configuration behind [`tls_connector`]: TLS 1.3 with
/// the ring provider, the servers checked against `roots`.
pub fn tls_client(
    roots: rustls::RootCertStore,
    identity: Option<(
        Vec<rustls::pki_types::CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    )>,
) -> Result<rustls::ClientConfig, IdsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| IdsError::Connect(e.to_string()))?
        .with_root_certificates(roots);
    let cfg = match identity {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| IdsError::Protocol(format!("device certificate: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    Ok(cfg)
}

impl std::fmt::Debug for IdsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdsClient")
            .field("addr", &self.addr)
            .finish()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn str_field<'a>(v: &'a Value, k: &str) -> Result<&'a str, IdsError> {
    v[k].as_str()
        .ok_or_else(|| IdsError::Protocol(format!("no {k:?} in {v}")))
}

/// A new account's first device list: `handles` and the one device.
pub fn first_list(
    account: &SigningKey,
    device: DeviceId,
    key: &SigningKey,
    handles: &[Handle],
) -> DeviceList {
    DeviceList {
        account_key: account.public(),
        seq: 1,
        handles: handles.iter().map(Handle::uri).collect(),
        devices: vec![DeviceEntry {
            id: device,
            identity_key: key.public(),
        }],
    }
}

impl IdsClient {
    /// `roots`: trust anchors for the service's certificate.
    pub fn new(
        addr: SocketAddr,
        server_name: &str,
        roots: rustls::RootCertStore,
    ) -> Result<IdsClient, IdsError> {
        let server_name = rustls::pki_types::ServerName::try_from(server_name.to_string())
            .map_err(|e| IdsError::Connect(e.to_string()))?;
        Ok(IdsClient {
            addr,
            server_name,
            tls: tls_connector(roots.clone(), None)?,
            roots,
            certificate: None,
            anchor: None,
            seen: transparency::SeenRoots::default(),
        })
    }

    /// From now on, requests by `key` present its device certificate
    /// (mutual TLS) instead of signing each request.
    pub fn with_certificate(
        mut self,
        certificate_pem: &str,
        key: &SigningKey,
    ) -> Result<IdsClient, IdsError> {
        let identity = tls_identity(certificate_pem, key)?;
        self.certificate = Some((
            key.public(),
            tls_connector(self.roots.clone(), Some(identity))?,
        ));
        Ok(self)
    }

    /// One request; `key` signs it (`wire::request_auth`), or, if it is
    /// the key of the certificate given to [`IdsClient::with_certificate`],
    /// the connection presents that certificate instead (and the request
    /// is sent again signed if the service did not take the certificate).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        key: Option<&SigningKey>,
    ) -> Result<(u16, Value), IdsError> {
        let bytes = Bytes::from(body.map(|b| b.to_string().into_bytes()).unwrap_or_default());
        if let (Some(k), Some((cert_key, mtls))) = (key, &self.certificate) {
            if k.public() == *cert_key {
                let (status, v) = self.send(mtls, method, path, bytes.clone(), None).await?;
                if status != 401 {
                    return Ok((status, v));
                }
            }
        }
        self.send(&self.tls, method, path, bytes, key).await
    }

    /// One request over a new connection made with `tls`, signed by `key`.
    async fn send(
        &self,
        tls: &tokio_rustls::TlsConnector,
        method: &str,
        path: &str,
        bytes: Bytes,
        key: Option<&SigningKey>,
    ) -> Result<(u16, Value), IdsError> {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string())
            .header("content-type", "application/json");
        if let Some(k) = key {
            req = req.header(
                "authorization",
                wire::request_auth::sign(k, method, path, unix_now(), &bytes),
            );
        }
        let req = req
            .body(Full::new(bytes))
            .map_err(|e| IdsError::Protocol(e.to_string()))?;
        let (status, _, body) = one_request(
            tls,
            self.addr,
            self.server_name.clone(),
            req,
            REQUEST_TIMEOUT,
        )
        .await
        .map_err(IdsError::Connect)?;
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        Ok((status, v))
    }

    /// [`IdsClient::call`] expecting `want`; other statuses are refusals.
    async fn expect(
        &self,
        want: u16,
        method: &str,
        path: &str,
        body: Option<Value>,
        key: Option<&SigningKey>,
    ) -> Result<Value, IdsError> {
        let (s, v) = self.call(method, path, body, key).await?;
        if s != want {
            let detail = v["detail"]
                .as_str()
                .or(v["title"].as_str())
                .unwrap_or("")
                .to_string();
            return Err(IdsError::Refused { status: s, detail });
        }
        Ok(v)
    }

    /// Starts proving a handle: a code goes to it. Returns the
    /// verification id.
    pub async fn start_verification(&self, handle: &Handle) -> Result<String, IdsError> {
        let v = self
            .expect(
                201,
                "POST",
                "/v1/verifications",
                Some(json!({"handle": handle.as_str()})),
                None,
            )
            .await?;
        Ok(str_field(&v, "id")?.to_string())
    }

    /// The code that arrived; returns the handle token for registration.
    pub async fn check_verification(&self, id: &str, code: &str) -> Result<String, IdsError> {
        let v = self
            .expect(
                200,
                "POST",
                &format!("/v1/verifications/{id}/check"),
                Some(json!({"code": code})),
                None,
            )
            .await?;
        Ok(str_field(&v, "handle_token")?.to_string())
    }

    /// The first device of a new account: `account` is the account key
    /// this device just made; the list names `handles` and this device.
    pub async fn create_account(
        &self,
        account: &SigningKey,
        device: DeviceId,
        key: &SigningKey,
        handles: &[Handle],
        tokens: &[String],
        name: &str,
    ) -> Result<Registered, IdsError> {
        let list = first_list(account, device, key, handles);
        let mut body = signed_lists(&list, account, None)?;
        body.insert("handle_tokens".into(), json!(tokens));
        body.insert(
            "device".into(),
            json!({"name": name, "capabilities": ["audio", "video"]}),
        );
        let v = self
            .expect(
                201,
                "POST",
                "/v1/accounts",
                Some(Value::Object(body)),
                Some(key),
            )
            .await?;
        registered(&v)
    }

    /// An existing device opens a link code for a new one.
    pub async fn create_link(&self, key: &SigningKey) -> Result<String, IdsError> {
        let v = self
            .expect(201, "POST", "/v1/account/links", None, Some(key))
            .await?;
        Ok(str_field(&v, "code")?.to_string())
    }

    /// The new device claims the code with its identity key and a
    /// transfer key for receiving the account key. Returns the link
    /// fingerprint the new device must show: the person types it on the
    /// approving device, which approves only the claim it matches.
    pub async fn claim_link(
        &self,
        code: &str,
        device: DeviceId,
        key: &SigningKey,
        transfer: &wire::key_transfer::TransferKey,
        name: &str,
    ) -> Result<String, IdsError> {
        self.expect(
            202,
            "POST",
            &format!("/v1/links/{}/claim", code.to_lowercase()),
            Some(json!({
                "device_id": device.to_string(),
                "name": name,
                "transfer_key": B64.encode(transfer.public()),
            })),
            Some(key),
        )
        .await?;
        Ok(wire::key_transfer::link_fingerprint(
            code,
            device,
            &key.public(),
            transfer.public(),
        ))
    }

    /// The account's current device list, as this device's account key
    /// signed it: the service's copy is checked against `account` (the
    /// signature, and that it is this account's key), so a list the
    /// service altered is refused.
    pub async fn account_list(
        &self,
        key: &SigningKey,
        account: &SigningKey,
    ) -> Result<DeviceList, IdsError> {
        let v = self
            .expect(200, "GET", "/v1/account", None, Some(key))
            .await?;
        let bytes = B64
            .decode(str_field(&v, "device_list")?)
            .map_err(|e| IdsError::Protocol(e.to_string()))?;
        let signed = match DirectoryValue::decode(&bytes) {
            Ok(DirectoryValue::Active(s)) => s,
            Ok(DirectoryValue::Tombstone) => {
                return Err(IdsError::Protocol("the account is deleted".into()))
            }
            Err(e) => return Err(IdsError::Protocol(e.to_string())),
        };
        if signed.list.account_key != account.public() || signed.verify().is_err() {
            return Err(IdsError::Transparency(
                "the service's device list is not signed by this account's key".into(),
            ));
        }
        Ok(signed.list)
    }

    /// Claims waiting for this account's approval.
    pub async fn pending_claims(&self, key: &SigningKey) -> Result<Vec<Claim>, IdsError> {
        let v = self
            .expect(200, "GET", "/v1/account/links", None, Some(key))
            .await?;
        let mut out = Vec::new();
        for c in v["claims"].as_array().cloned().unwrap_or_default() {
            let device = wire::keys::unhex(str_field(&c, "device_id")?)
                .and_then(|b| b.try_into().ok())
                .map(DeviceId)
                .ok_or_else(|| IdsError::Protocol("bad device id".into()))?;
            out.push(Claim {
                link: str_field(&c, "link")?.to_string(),
                device,
                name: c["name"].as_str().unwrap_or("").to_string(),
                identity_key: wire::keys::PublicKey::from_b64(str_field(&c, "identity_key")?)
                    .map_err(|e| IdsError::Protocol(e.to_string()))?,
                transfer_key: B64
                    .decode(str_field(&c, "transfer_key")?)
                    .map_err(|e| IdsError::Protocol(e.to_string()))?,
            });
        }
        Ok(out)
    }

    /// Approves a claim on `code`: the account's new list (`current` plus
    /// the device, next sequence number) and the account key sealed to the
    /// new device. `confirmed` is the fingerprint the person read on the
    /// new device and typed here: a claim it does not match (one the
    /// service injected or altered) is refused and nothing is sealed.
    /// Returns the new list.
    pub async fn approve(
        &self,
        key: &SigningKey,
        account: &SigningKey,
        current: &DeviceList,
        claim: &Claim,
        code: &str,
        confirmed: &str,
    ) -> Result<DeviceList, IdsError> {
        if !claim.is_for(code)
            || !wire::key_transfer::same_fingerprint(&claim.fingerprint(code), confirmed)
        {
            return Err(IdsError::Transparency(
                "the claim on this link code is not the one the new device shows \
                 (its fingerprint differs): not approved"
                    .into(),
            ));
        }
        let mut list = current.clone();
        list.seq += 1;
        list.devices.push(DeviceEntry {
            id: claim.device,
            identity_key: claim.identity_key,
        });
        let sealed =
            wire::key_transfer::seal_account_key(account, &claim.transfer_key, claim.device)
                .map_err(|e| IdsError::Protocol(e.to_string()))?;
        let mut body = signed_lists(&list, account, None)?;
        body.insert(
            "sealed_account_keys".into(),
            json!({claim.link.clone(): B64.encode(&sealed)}),
        );
        self.put_list(key, body).await?;
        Ok(list)
    }

    /// Removes `remove` from the account and rotates the account key, which
    /// the removed devices hold: the new list is signed by a fresh key that
    /// `account` endorses, and the fresh key is sealed to the identity key
    /// of every device that stays but this one (`me`). Returns the new
    /// account key, which replaces `account` from now on, and the new list.
    pub async fn remove_devices(
        &self,
        key: &SigningKey,
        me: DeviceId,
        account: &SigningKey,
        remove: &[DeviceId],
    ) -> Result<(SigningKey, DeviceList), IdsError> {
        let current = self.account_list(key, account).await?;
        if remove.contains(&me) {
            return Err(IdsError::Protocol(
                "a device cannot remove itself this way; delete the account or let another device remove it".into(),
            ));
        }
        if let Some(d) = remove.iter().find(|d| current.device(**d).is_none()) {
            return Err(IdsError::Protocol(format!(
                "device {d} is not on this account"
            )));
        }
        let fresh = SigningKey::generate();
        let mut list = current;
        list.seq += 1;
        list.account_key = fresh.public();
        list.devices.retain(|d| !remove.contains(&d.id));
        let mut sealed = serde_json::Map::new();
        for d in list.devices.iter().filter(|d| d.id != me) {
            let blob = wire::key_transfer::seal_to_device(&fresh, &d.identity_key, d.id)
                .map_err(|e| IdsError::Protocol(e.to_string()))?;
            sealed.insert(d.id.to_string(), json!(B64.encode(blob)));
        }
        let mut body = signed_lists(&list, &fresh, Some(account))?;
        body.insert("rotated_account_keys".into(), Value::Object(sealed));
        self.put_list(key, body).await?;
        Ok((fresh, list))
    }

    /// The account key another device rotated to (it removed a device),
    /// sealed to this device (`me`, whose identity key is `key`). Taken
    /// only if `handle`'s verified history shows the rotation endorsed
    /// from `held`, the key this device holds, and ending at it. None
    /// while there is nothing newer than `held`, or while the directory
    /// does not show it yet (it publishes every few seconds).
    pub async fn rotated_account_key(
        &mut self,
        key: &SigningKey,
        me: DeviceId,
        handle: &Handle,
        held: &PublicKey,
    ) -> Result<Option<SigningKey>, IdsError> {
        let v = match self
            .expect(200, "GET", "/v1/account/key", None, Some(key))
            .await
        {
            Ok(v) => v,
            Err(IdsError::Refused { status: 404, .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let sealed = B64
            .decode(str_field(&v, "sealed")?)
            .map_err(|e| IdsError::Protocol(e.to_string()))?;
        let fresh = wire::key_transfer::open_with_identity(key, &sealed, me)
            .map_err(|e| IdsError::Transparency(format!("the sealed account key: {e}")))?;
        if fresh.public() == *held {
            return Ok(None);
        }
        let history = match self.verified_history(key, handle).await {
            Ok(h) => h,
            // Not in a published epoch yet.
            Err(IdsError::Refused { status: 404, .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        match transparency::current_account_key(&history, held) {
            k if k == *held => Ok(None),
            k if k == fresh.public() => Ok(Some(fresh)),
            _ => Err(IdsError::Transparency(
                "the account key sealed to this device is not the one the directory \
                 shows endorsed by this device's key"
                    .into(),
            )),
        }
    }

    /// Replaces the account's device list (`PUT /v1/account/device-list`).
    async fn put_list(
        &self,
        key: &SigningKey,
        body: serde_json::Map<String, Value>,
    ) -> Result<(), IdsError> {
        self.expect(
            200,
            "PUT",
            "/v1/account/device-list",
            Some(Value::Object(body)),
            Some(key),
        )
        .await
        .map(drop)
    }

    /// The new device waits (bounded) for approval; returns its
    /// registration and the account key the approver sealed to it.
    pub async fn await_approval(
        &self,
        code: &str,
        key: &SigningKey,
        transfer: wire::key_transfer::TransferKey,
        max: Duration,
    ) -> Result<(Registered, SigningKey), IdsError> {
        let deadline = tokio::time::Instant::now() + max;
        loop {
            let v = self
                .expect(200, "GET", &format!("/v1/links/{code}"), None, Some(key))
                .await?;
            match v["status"].as_str() {
                Some("approved") => {
                    let reg = registered(&v)?;
                    let sealed = B64
                        .decode(str_field(&v, "sealed_account_key")?)
                        .map_err(|e| IdsError::Protocol(e.to_string()))?;
                    let account = transfer
                        .open(&sealed, reg.device_id)
                        .map_err(|e| IdsError::Protocol(e.to_string()))?;
                    return Ok((reg, account));
                }
                Some("expired") => {
                    return Err(IdsError::Refused {
                        status: 410,
                        detail: "the link code expired".into(),
                    })
                }
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(IdsError::Connect("no approval in time".into()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The new device, once approved, checks what it was given against
    /// the directory: a verified lookup of `handle` must publish a list
    /// signed by `account` that names this device. A service that sealed
    /// its own account key to the new device, or never published it, is
    /// found out here. Waits (bounded by `max`) for the next epoch.
    pub async fn verify_joined(
        &mut self,
        key: &SigningKey,
        handle: &Handle,
        account: &SigningKey,
        device: DeviceId,
        max: Duration,
    ) -> Result<(), IdsError> {
        let deadline = tokio::time::Instant::now() + max;
        loop {
            let found = self.lookup(key, std::slice::from_ref(handle)).await?;
            if let Some(f) = found.first().filter(|f| f.account_key.is_some()) {
                if f.account_key != Some(account.public()) {
                    return Err(IdsError::Transparency(format!(
                        "the account key this device received is not the one the directory \
                         publishes for {}",
                        handle.as_str()
                    )));
                }
                if f.devices.iter().any(|d| d.device == device) {
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(IdsError::Transparency(format!(
                    "the directory does not list this device for {} yet",
                    handle.as_str()
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Fetches and pins the transparency keys (trust on first use; an
    /// app that ships them pins them with [`IdsClient::pin`]).
    pub async fn anchor(&mut self) -> Result<TrustAnchor, IdsError> {
        if let Some(a) = &self.anchor {
            return Ok(a.clone());
        }
        let v = self.expect(200, "GET", "/v1/kt/keys", None, None).await?;
        let decode = |k: &str| -> Result<Vec<u8>, IdsError> {
            B64.decode(str_field(&v, k)?)
                .map_err(|e| IdsError::Protocol(e.to_string()))
        };
        let a = TrustAnchor {
            vrf_public_key: decode("vrf_public_key")?,
            root_key: decode("root_key")?,
        };
        self.anchor = Some(a.clone());
        Ok(a)
    }

    pub fn pin(&mut self, anchor: TrustAnchor) {
        self.anchor = Some(anchor);
    }

    /// The newest directory epoch this client accepted: an app keeps it
    /// across restarts and hands it to [`IdsClient::resume_from_epoch`],
    /// so that an older (replayed) view is refused after a restart too.
    pub fn highest_epoch(&self) -> u64 {
        self.seen.highest_epoch()
    }

    /// Refuses any root older than `epoch` from now on.
    pub fn resume_from_epoch(&mut self, epoch: u64) {
        if epoch > self.seen.highest_epoch() {
            self.seen = transparency::SeenRoots::starting_at(epoch);
        }
    }

    /// A root whose signature verified joins what this client has seen.
    fn observe(&mut self, root: &SignedRoot) -> Result<(), IdsError> {
        self.seen
            .observe(root)
            .map_err(|e| IdsError::Transparency(e.to_string()))
    }

    /// Looks handles up and verifies each proof and list before any key
    /// is returned. A handle that is not found has no entry, but only if
    /// the directory proved its absence: an answer that skips a handle, or
    /// says "not found" without a proof, is refused.
    pub async fn lookup(
        &mut self,
        key: &SigningKey,
        handles: &[Handle],
    ) -> Result<Vec<Found>, IdsError> {
        let anchor = self.anchor().await?;
        let names: Vec<&str> = handles.iter().map(Handle::as_str).collect();
        let v = self
            .expect(
                200,
                "POST",
                "/v1/lookup",
                Some(json!({"handles": names})),
                Some(key),
            )
            .await?;
        let results = v["results"].as_array().cloned().unwrap_or_default();
        let mut out = Vec::new();
        for h in handles {
            let uri = h.uri();
            let r = results
                .iter()
                .find(|r| r["handle"].as_str() == Some(uri.as_str()))
                .ok_or_else(|| {
                    IdsError::Transparency(format!("the directory did not answer for {uri}"))
                })?;
            let (found, root) = verified_result(&anchor, h, r)?;
            self.observe(&root)?;
            out.extend(found);
        }
        Ok(out)
    }

    /// Proves that every directory root this client accepted since the
    /// last audit extends the ones before it, append-only (akd's audit
    /// proof), and that the directory lists the same root for every epoch
    /// this client saw. A split view — this client shown a tree of its
    /// own — fails here as soon as the directory shows it a root of the
    /// tree everyone else sees. Checks at most [`AUDIT_EPOCHS`] epochs per
    /// request; returns the epoch audited to.
    pub async fn audit_roots(&mut self) -> Result<u64, IdsError> {
        while let Some((start, end)) = self.seen.audit_span(AUDIT_EPOCHS) {
            let path = format!("/v1/kt/audit?start={start}&end={end}");
            let v = self.expect(200, "GET", &path, None, None).await?;
            let bad = |what: &str| IdsError::Protocol(format!("bad audit answer: {what}"));
            let listed = v["root_hashes"]
                .as_array()
                .ok_or_else(|| bad("root_hashes"))?
                .iter()
                .map(|r| {
                    let epoch = r["epoch"].as_u64().ok_or_else(|| bad("epoch"))?;
                    let hash = r["root_hash"]
                        .as_str()
                        .and_then(|h| B64.decode(h).ok())
                        .and_then(|h| <[u8; 32]>::try_from(h).ok())
                        .ok_or_else(|| bad("root_hash"))?;
                    Ok((epoch, hash))
                })
                .collect::<Result<Vec<_>, IdsError>>()?;
            let hashes = self
                .seen
                .audit_hashes(start, end, &listed)
                .map_err(|e| IdsError::Transparency(e.to_string()))?;
            let proof = B64
                .decode(str_field(&v, "proof")?)
                .map_err(|e| IdsError::Protocol(e.to_string()))?;
            verify_append_only(hashes, &proof).await?;
            self.seen.audited(end, listed[listed.len() - 1].1);
        }
        Ok(self.seen.checkpoint().map_or(0, |(e, _)| e))
    }

    /// The newest root this client proved one append-only chain with every
    /// root it accepted before (epoch, root hash): an app persists it and
    /// hands it to [`IdsClient::resume_from_checkpoint`].
    pub fn checkpoint(&self) -> Option<(u64, [u8; 32])> {
        self.seen.checkpoint()
    }

    /// Starts from a [`IdsClient::checkpoint`] saved before: older roots
    /// are refused, and the next [`IdsClient::audit_roots`] proves the
    /// roots accepted from now on extend this one.
    pub fn resume_from_checkpoint(&mut self, epoch: u64, root_hash: [u8; 32]) {
        if epoch >= self.seen.highest_epoch() {
            self.seen = transparency::SeenRoots::resuming_from(epoch, root_hash);
        }
    }

    /// Audits this device's own handle: its whole verified history from
    /// `since_epoch`, and every change this account did not make (a
    /// device it did not approve, a swapped account key, a tombstone).
    pub async fn audit_own(
        &mut self,
        key: &SigningKey,
        handle: &Handle,
        account: &wire::keys::PublicKey,
        approved: &[DeviceId],
        since_epoch: u64,
    ) -> Result<Vec<Unapproved>, IdsError> {
        let history = self.verified_history(key, handle).await?;
        Ok(transparency::unapproved_changes(
            &history,
            since_epoch,
            account,
            approved,
        ))
    }

    /// `handle`'s whole history, verified (newest first); a 404 while the
    /// handle is in no published epoch yet.
    async fn verified_history(
        &mut self,
        key: &SigningKey,
        handle: &Handle,
    ) -> Result<Vec<transparency::VerifiedValue>, IdsError> {
        let anchor = self.anchor().await?;
        let path = format!("/v1/history/{}", handle.as_str().replace('+', "%2B"));
        let v = self.expect(200, "GET", &path, None, Some(key)).await?;
        let proof = B64
            .decode(str_field(&v, "proof")?)
            .map_err(|e| IdsError::Protocol(e.to_string()))?;
        let root = root_of(&v["root"])?;
        let history = transparency::verify_history(&anchor, &root, &handle.uri(), &proof)
            .map_err(|e| IdsError::Transparency(e.to_string()))?;
        self.observe(&root)?;
        Ok(history)
    }

    /// Tells `ids` which push tokens reach this device.
    pub async fn set_push_tokens(
        &self,
        key: &SigningKey,
        tokens: &[(String, String)],
    ) -> Result<(), IdsError> {
        let t: Vec<Value> = tokens
            .iter()
            .map(|(topic, token)| json!({"topic": topic, "token": token}))
            .collect();
        self.expect(
            204,
            "PUT",
            "/v1/device/push-tokens",
            Some(json!({"tokens": t})),
            Some(key),
        )
        .await?;
        Ok(())
    }

    pub async fn turn_credentials(&self, key: &SigningKey) -> Result<TurnCredentials, IdsError> {
        let v = self
            .expect(200, "POST", "/v1/turn-credentials", None, Some(key))
            .await?;
        Ok(TurnCredentials {
            username: str_field(&v, "username")?.to_string(),
            password: str_field(&v, "password")?.to_string(),
            ttl: Duration::from_secs(v["ttl"].as_u64().unwrap_or(0)),
            uris: v["uris"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|u| u.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
        })
    }
}

/// Epochs one audit request spans (the service's limit).
pub const AUDIT_EPOCHS: u64 = 100;

/// Verifies akd's append-only proof (protobuf `AppendOnlyProof`) over the
/// root hashes of consecutive epochs.
async fn verify_append_only(hashes: Vec<[u8; 32]>, proof: &[u8]) -> Result<(), IdsError> {
    use protobuf::Message;
    let msg = akd::proto::specs::types::AppendOnlyProof::parse_from_bytes(proof)
        .map_err(|e| IdsError::Protocol(format!("audit proof: {e}")))?;
    let proof = akd::AppendOnlyProof::try_from(&msg)
        .map_err(|e| IdsError::Protocol(format!("audit proof: {e}")))?;
    akd::auditor::audit_verify::<transparency::KtConfig>(hashes, proof)
        .await
        .map_err(|e| IdsError::Transparency(format!("append-only proof: {e}")))
}

/// Verifies one entry of a lookup answer for `handle`: a lookup proof and
/// a signed list naming it (the keys it gives), or a proof that the handle
/// was never published (nothing). Returns the root it verified against,
/// which the caller must still check against the roots it has seen.
pub fn verified_result(
    anchor: &TrustAnchor,
    handle: &Handle,
    r: &Value,
) -> Result<(Option<Found>, SignedRoot), IdsError> {
    let uri = handle.uri();
    let b64 = |k: &str| {
        B64.decode(str_field(r, k)?)
            .map_err(|e| IdsError::Protocol(e.to_string()))
    };
    let refuse = |e: transparency::KtError| IdsError::Transparency(format!("{uri}: {e}"));
    match r["status"].as_str() {
        Some("found") => {
            let root = root_of(&r["root"])?;
            let verified =
                transparency::verify_lookup(anchor, &root, &uri, &b64("proof")?).map_err(refuse)?;
            let (devices, account_key) = match verified.value {
                DirectoryValue::Active(l) => (
                    l.list
                        .devices
                        .iter()
                        .map(|d| DeviceKey {
                            device: d.id,
                            key: d.identity_key,
                        })
                        .collect(),
                    Some(l.list.account_key),
                ),
                _ => (Vec::new(), None),
            };
            let found = Found {
                handle: handle.clone(),
                devices,
                account_key,
                epoch: verified.epoch,
            };
            Ok((Some(found), root))
        }
        Some("not_found") => {
            let root = root_of(&r["root"]).map_err(|_| {
                IdsError::Transparency(format!("{uri}: \"not found\" without an absence proof"))
            })?;
            let (vrf, proof) = match (b64("vrf_proof"), b64("proof")) {
                (Ok(v), Ok(p)) => (v, p),
                _ => {
                    return Err(IdsError::Transparency(format!(
                        "{uri}: \"not found\" without an absence proof"
                    )))
                }
            };
            transparency::verify_absence(anchor, &root, &uri, &vrf, &proof).map_err(refuse)?;
            Ok((None, root))
        }
        _ => Err(IdsError::Protocol(format!(
            "the directory refused {uri}: {}",
            r["detail"].as_str().unwrap_or("no detail")
        ))),
    }
}

/// A list as a request carries it: `device_list`, signed by `account`
/// (endorsed by `previous` when it rotates the key), and, when it names
/// several handles, `handle_lists`: the same list naming each handle
/// alone, which is what the directory publishes under that handle.
fn signed_lists(
    list: &DeviceList,
    account: &SigningKey,
    previous: Option<&SigningKey>,
) -> Result<serde_json::Map<String, Value>, IdsError> {
    let sign = |l: DeviceList| -> Result<Value, IdsError> {
        let signed: SignedDeviceList = match previous {
            Some(p) => l.sign_rotated(account, p),
            None => l.sign(account),
        }
        .map_err(|e| IdsError::Protocol(e.to_string()))?;
        Ok(json!(B64.encode(DirectoryValue::Active(signed).encode())))
    };
    let mut fields = serde_json::Map::new();
    fields.insert("device_list".into(), sign(list.clone())?);
    if list.handles.len() > 1 {
        let per_handle = list
            .handles
            .iter()
            .map(|h| Ok((h.clone(), sign(list.for_handle(h))?)))
            .collect::<Result<serde_json::Map<_, _>, IdsError>>()?;
        fields.insert("handle_lists".into(), Value::Object(per_handle));
    }
    Ok(fields)
}

fn registered(v: &Value) -> Result<Registered, IdsError> {
    let device_id = wire::keys::unhex(str_field(v, "device_id")?)
        .and_then(|b| b.try_into().ok())
        .map(DeviceId)
        .ok_or_else(|| IdsError::Protocol("bad device id".into()))?;
    Ok(Registered {
        account_id: str_field(v, "account_id")?.to_string(),
        device_id,
        certificate: str_field(v, "certificate")?.to_string(),
        ca: str_field(v, "ca")?.to_string(),
    })
}

fn root_of(v: &Value) -> Result<SignedRoot, IdsError> {
    let bad = || IdsError::Protocol(format!("bad root {v}"));
    Ok(SignedRoot {
        epoch: v["epoch"].as_u64().ok_or_else(bad)?,
        root_hash: B64
            .decode(v["root_hash"].as_str().ok_or_else(bad)?)
            .map_err(|_| bad())?
            .try_into()
            .map_err(|_| bad())?,
        signature: B64
            .decode(v["signature"].as_str().ok_or_else(bad)?)
            .map_err(|_| bad())?,
    })
}

/// The certificate (PEM) and key as rustls wants them.
pub fn tls_identity(
    certificate_pem: &str,
    key: &SigningKey,
) -> Result<
    (
        Vec<rustls::pki_types::CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ),
    IdsError,
> {
    let chain = pem_certs(certificate_pem)?;
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.pkcs8().to_vec().into());
    Ok((chain, key))
}

/// The DER certificates of a PEM bundle.
pub fn pem_certs(pem: &str) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, IdsError> {
    let mut out = Vec::new();
    let mut in_cert = false;
    let mut b64 = String::new();
    for line in pem.lines() {
        let line = line.trim();
        if line == "-----BEGIN CERTIFICATE-----" {
            in_cert = true;
            b64.clear();
        } else if line == "-----END CERTIFICATE-----" {
            in_cert = false;
            let der = STANDARD
                .decode(&b64)
                .map_err(|e| IdsError::Protocol(format!("certificate PEM: {e}")))?;
            out.push(rustls::pki_types::CertificateDer::from(der));
        } else if in_cert {
            b64.push_str(line);
        }
    }
    if out.is_empty() {
        return Err(IdsError::Protocol("no certificate in the PEM".into()));
    }
    Ok(out)
}
