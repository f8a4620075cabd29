//! A local FCM HTTP v1 stand-in: Google's OAuth 2.0 token endpoint (JWT
//! bearer grant; the RS256 assertion is checked against the service
//! account's key, with its scope, issuer and audience) and
//! `projects/<project>/messages:send` (the bearer must be a live access
//! token), over TLS and HTTP/2 on loopback. It makes its own service
//! account; registration tokens named `gone`, `busy` and `down` get FCM's
//! errors (404 UNREGISTERED, 429 QUOTA_EXCEEDED with Retry-After: 3, 503
//! UNAVAILABLE), and every other message is recorded.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use http_body_util::BodyExt;

/// The stand-in's project and service account.
pub const PROJECT: &str = "parley-test";
pub const CLIENT_EMAIL: &str = "parley@example.iam.gserviceaccount.com";
/// The scope a token request must ask for.
const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";

pub struct FakeFcm {
    pub addr: SocketAddr,
    pub roots: rustls::RootCertStore,
    /// Its CA, PEM, for a configuration's `ca`.
    pub ca_pem: String,
    account_json: String,
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    issued: u32,
    live: Vec<String>,
    expires_in: i64,
    revoke_next: bool,
    sent: Vec<serde_json::Value>,
    /// Where each message taken is also appended, one JSON per line.
    log: Option<std::path::PathBuf>,
}

impl FakeFcm {
    /// Starts it; access tokens it issues live `expires_in` seconds.
    pub async fn start(expires_in: i64) -> FakeFcm {
        let rsa = openssl::rsa::Rsa::generate(2048).expect("RSA key");
        let public = Arc::new(rsa.public_key_to_der_pkcs1().expect("public key"));
        let pem = openssl::pkey::PKey::from_rsa(rsa)
            .and_then(|k| k.private_key_to_pem_pkcs8())
            .expect("PKCS#8");
        let pki = crate::pki::TestPki::new();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![pki.server_cert.clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(pki.server_key.clone().into()),
            )
            .expect("server certificate");
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let state = Arc::new(Mutex::new(State {
            expires_in,
            ..State::default()
        }));
        let serving = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, state, public) = (acceptor.clone(), serving.clone(), public.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req| {
                        let (state, public) = (state.clone(), public.clone());
                        async move {
                            Ok::<_, std::convert::Infallible>(answer(req, &state, &public).await)
                        }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
                });
            }
        });
        let account_json = serde_json::json!({
            "type": "service_account",
            "project_id": PROJECT,
            "private_key_id": "k1",
            "private_key": String::from_utf8(pem).expect("PEM"),
            "client_email": CLIENT_EMAIL,
            "token_uri": format!("https://127.0.0.1:{}/token", addr.port()),
        })
        .to_string();
        FakeFcm {
            addr,
            roots: pki.roots(),
            ca_pem: pki.ca_pem.clone(),
            account_json,
            state,
        }
    }

    /// The service-account JSON for it (as Google's console gives it).
    pub fn service_account_json(&self) -> String {
        self.account_json.clone()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Access tokens issued so far.
    pub fn issued(&self) -> u32 {
        self.state().issued
    }

    /// The messages taken, as sent (`{"message": …}`).
    pub fn sent(&self) -> Vec<serde_json::Value> {
        self.state().sent.clone()
    }

    /// Appends every message taken from now on to `path`, one JSON object
    /// per line (for a test in another process to read).
    pub fn log_to(&self, path: std::path::PathBuf) {
        self.state().log = Some(path);
    }

    /// Refuses the next send's access token as if it had expired.
    pub fn revoke_next(&self) {
        self.state().revoke_next = true;
    }
}

impl std::fmt::Debug for FakeFcm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeFcm")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

type Response = hyper::Response<http_body_util::Full<bytes::Bytes>>;

fn json(status: u16, headers: &[(&str, &str)], body: serde_json::Value) -> Response {
    let mut r = hyper::Response::builder().status(status);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.body(http_body_util::Full::new(bytes::Bytes::from(
        body.to_string(),
    )))
    .expect("response")
}

fn fcm_error(status: u16, code: &str) -> serde_json::Value {
    serde_json::json!({"error": {"code": status, "status": code, "details": [
        {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}
    ]}})
}

async fn answer(
    req: hyper::Request<hyper::body::Incoming>,
    state: &Mutex<State>,
    public_pkcs1: &[u8],
) -> Response {
    let path = req.uri().path().to_owned();
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return json(400, &[], serde_json::json!({})),
    };
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    if path == "/token" {
        return match granted(&body, public_pkcs1) {
            true => {
                s.issued += 1;
                let token = format!("tok-{}", s.issued);
                s.live.push(token.clone());
                json(
                    200,
                    &[],
                    serde_json::json!({"access_token": token, "expires_in": s.expires_in, "token_type": "Bearer"}),
                )
            }
            false => json(400, &[], serde_json::json!({"error": "invalid_grant"})),
        };
    }
    if path != format!("/v1/projects/{PROJECT}/messages:send") {
        return json(404, &[], serde_json::json!({}));
    }
    let token = auth.strip_prefix("Bearer ").unwrap_or_default().to_owned();
    if s.revoke_next {
        s.revoke_next = false;
        s.live.retain(|t| *t != token);
    }
    if !s.live.contains(&token) {
        return json(
            401,
            &[],
            serde_json::json!({"error": {"code": 401, "status": "UNAUTHENTICATED"}}),
        );
    }
    let msg: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    match msg["message"]["token"].as_str().unwrap_or_default() {
        "gone" => json(404, &[], fcm_error(404, "UNREGISTERED")),
        "busy" => json(
            429,
            &[("retry-after", "3")],
            fcm_error(429, "QUOTA_EXCEEDED"),
        ),
        "down" => json(503, &[], fcm_error(503, "UNAVAILABLE")),
        _ => {
            if let Some(path) = &s.log {
                use std::io::Write as _;
                let line = format!("{msg}\n");
                let appended = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .and_then(|mut f| f.write_all(line.as_bytes()));
                if let Err(e) = appended {
                    eprintln!("fake FCM: cannot log to {}: {e}", path.display());
                }
            }
            s.sent.push(msg);
            let name = format!("projects/{PROJECT}/messages/{}", s.sent.len());
            json(200, &[], serde_json::json!({ "name": name }))
        }
    }
}

/// A JWT bearer grant with an assertion this service account signed.
fn granted(form: &[u8], public_pkcs1: &[u8]) -> bool {
    let form = String::from_utf8_lossy(form);
    let grant = form
        .split('&')
        .any(|kv| kv == "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer");
    let assertion = form
        .split('&')
        .find_map(|kv| kv.strip_prefix("assertion="))
        .unwrap_or_default();
    let parts: Vec<&str> = assertion.split('.').collect();
    let [header, claims, sig] = parts.as_slice() else {
        return false;
    };
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let signed = ring::signature::UnparsedPublicKey::new(
        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        public_pkcs1,
    )
    .verify(
        format!("{header}.{claims}").as_bytes(),
        &b64.decode(sig).unwrap_or_default(),
    )
    .is_ok();
    let claims: serde_json::Value = b64
        .decode(claims)
        .ok()
        .and_then(|c| serde_json::from_slice(&c).ok())
        .unwrap_or_default();
    grant
        && signed
        && claims["scope"] == SCOPE
        && claims["iss"] == CLIENT_EMAIL
        && claims["aud"]
            .as_str()
            .is_some_and(|a| a.ends_with("/token"))
}
