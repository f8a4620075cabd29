//! A courier on loopback with a throwaway CA, device certificates issued
//! the way the identity service issues them, a registered APNs-style
//! provider, and curl as the provider's HTTP client.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use client_sdk::courier::{DeviceClient, DeviceCredentials, Transport};
use push_courier::runtime::{Server, Tls};
use push_courier::{Config, Provider};
use ring::signature::KeyPair;
use wire::push::DeviceToken;
use wire::{DeviceId, SigningKey};

pub const TEAM: &str = "TEAM123456";
pub const KID: &str = "KEY1234567";
pub const TOPIC: &str = "com.example.chat";

pub struct Env {
    pub dir: tempfile::TempDir,
    pub server: Option<Server>,
    pub ca_pem: PathBuf,
    device_ca: ids::certs::DeviceCa,
    pub roots: rustls::RootCertStore,
    /// The provider's ES256 key (PKCS#8).
    pub provider_key: Vec<u8>,
    pub config: Config,
    server_chain: Option<(rustls::pki_types::CertificateDer<'static>, Vec<u8>)>,
    ca_issuer: (String, String),
    /// A PostgreSQL server, when the test runs on one.
    _pg: Option<parley_tests::postgres::Postgres>,
}

pub fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

pub fn p256_keypair() -> (Vec<u8>, Vec<u8>) {
    let rng = ring::rand::SystemRandom::new();
    let alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
    let doc = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
    let kp = ring::signature::EcdsaKeyPair::from_pkcs8(alg, doc.as_ref(), &rng).unwrap();
    (doc.as_ref().to_vec(), kp.public_key().as_ref().to_vec())
}

/// The raw 32-byte scalar inside a ring P-256 PKCS#8 document.
pub fn p256_scalar(pkcs8: &[u8]) -> Vec<u8> {
    let pat = [0x02, 0x01, 0x01, 0x04, 0x20];
    let i = pkcs8.windows(5).position(|w| w == pat).unwrap() + 5;
    pkcs8[i..i + 32].to_vec()
}

#[allow(unused_imports)]
pub use parley_tests::tool::pem;

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

impl Env {
    pub async fn start(tweak: impl FnOnce(&mut Config)) -> Env {
        Env::start_on(None, tweak).await
    }

    /// As [`Env::start`], on a throwaway PostgreSQL server.
    pub async fn start_postgres(name: &str, tweak: impl FnOnce(&mut Config)) -> Env {
        let pg = tokio::task::spawn_blocking({
            let name = name.to_owned();
            move || parley_tests::postgres::Postgres::start(&name)
        })
        .await
        .unwrap();
        Env::start_on(Some(pg), tweak).await
    }

    async fn start_on(
        pg: Option<parley_tests::postgres::Postgres>,
        tweak: impl FnOnce(&mut Config),
    ) -> Env {
        let dir = tempfile::tempdir().unwrap();
        // CA and a localhost server certificate.
        let pki = parley_tests::pki::TestPki::new();
        let ca_pem = dir.path().join("ca.pem");
        std::fs::write(&ca_pem, &pki.ca_pem).unwrap();
        // The same CA issues device certificates, as in `parley up`.
        let device_ca = ids::certs::DeviceCa::from_pem(&pki.ca_pem, &pki.ca_key_pem).unwrap();
        let roots = pki.roots();

        let (provider_key, provider_pub) = p256_keypair();
        let mut config = Config {
            device_listen: "127.0.0.1:0".parse().unwrap(),
            provider_listen: "127.0.0.1:0".parse().unwrap(),
            database_url: match &pg {
                Some(pg) => pg.url(),
                None => format!("sqlite://{}", dir.path().join("courier.db").display()),
            },
            providers: vec![
                Provider {
                    name: "acme".into(),
                    team_id: TEAM.into(),
                    key_id: KID.into(),
                    public_key: Some(provider_pub.try_into().unwrap()),
                    topics: vec![],
                },
                Provider {
                    name: "certco".into(),
                    team_id: String::new(),
                    key_id: String::new(),
                    public_key: None,
                    topics: vec![TOPIC.into()],
                },
                Provider {
                    name: "narrow".into(),
                    team_id: "TEAMNARROW".into(),
                    key_id: "KEYNARROW0".into(),
                    public_key: Some(p256_keypair().1.try_into().unwrap()),
                    topics: vec!["com.example.other".into()],
                },
            ],
            ..Config::default()
        };
        tweak(&mut config);
        let mut env = Env {
            dir,
            server: None,
            ca_pem,
            device_ca,
            roots,
            provider_key,
            config,
            server_chain: None,
            ca_issuer: (pki.ca_pem.clone(), pki.ca_key_pem.clone()),
            _pg: pg,
        };
        env.server_chain = Some((pki.server_cert.clone(), pki.server_key.clone()));
        env.restart().await;
        env
    }

    /// (Re)starts the courier on the same database and ports.
    pub async fn restart(&mut self) {
        if let Some(s) = self.server.take() {
            let device = s.device_addr();
            let provider = s.provider_addr();
            s.shutdown().await;
            self.config.device_listen = device;
            self.config.provider_listen = provider;
        }
        self.server = Some(self.node(self.config.clone()).await);
    }

    /// Another courier with this one's certificates and providers, on
    /// `config` (another node of a cluster on the same database).
    pub async fn node(&self, config: Config) -> Server {
        let (cert, key) = self.server_chain.clone().unwrap();
        let tls = Tls {
            chain: vec![cert],
            key: rustls::pki_types::PrivateKeyDer::Pkcs8(key.into()),
            device_roots: self.roots.clone(),
            device_crls: vec![],
            provider_roots: Some(self.roots.clone()),
        };
        Server::start(config, tls).await.unwrap()
    }

    pub fn server(&self) -> &Server {
        self.server.as_ref().unwrap()
    }

    pub fn provider_port(&self) -> u16 {
        self.server().provider_addr().port()
    }

    /// An HTTP/2 connection to the provider API.
    pub async fn provider_http2(&self) -> std::io::Result<push_courier::provider::Http2> {
        self.provider_http2_to(self.server().provider_addr()).await
    }

    /// An HTTP/2 connection to the provider API at `addr` (another node).
    pub async fn provider_http2_to(
        &self,
        addr: std::net::SocketAddr,
    ) -> std::io::Result<push_courier::provider::Http2> {
        push_courier::provider::Http2::connect(addr, "localhost", self.roots.clone()).await
    }

    /// A new device: its id and credentials with an `ids`-issued cert.
    pub fn device(&self) -> (DeviceId, DeviceCredentials) {
        let (id, creds, _) = self.device_with_serial();
        (id, creds)
    }

    /// As [`Env::device`], with the certificate's serial (hex).
    pub fn device_with_serial(&self) -> (DeviceId, DeviceCredentials, String) {
        let key = SigningKey::generate();
        let id = DeviceId::random();
        let serial: [u8; 16] = push_courier::courier::random().unwrap();
        let (serial_hex, cert_pem) = self
            .device_ca
            .issue(id, &key.public(), serial, unix_now())
            .unwrap();
        let chain = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        (id, self.creds_for(chain, key.pkcs8().to_vec()), serial_hex)
    }

    /// A revocation list naming these serials, as `ids` serves it.
    pub fn crl(&self, serials: &[&str]) -> Vec<u8> {
        let revoked: Vec<(String, i64)> = serials
            .iter()
            .map(|s| ((*s).to_owned(), unix_now()))
            .collect();
        self.device_ca.crl(&revoked, unix_now()).unwrap()
    }

    pub fn creds_for(
        &self,
        chain: Vec<rustls::pki_types::CertificateDer<'static>>,
        pkcs8: Vec<u8>,
    ) -> DeviceCredentials {
        DeviceCredentials {
            chain,
            key: rustls::pki_types::PrivateKeyDer::Pkcs8(pkcs8.into()),
            roots: self.roots.clone(),
            server_name: "localhost".into(),
        }
    }

    pub async fn connect(
        &self,
        creds: &DeviceCredentials,
        transport: Transport,
        topics: &[&str],
    ) -> (DeviceClient, Vec<(String, DeviceToken)>) {
        let addr = match transport {
            Transport::Tls => self.server().device_addr(),
            Transport::Quic => self.server().quic_addr().unwrap(),
        };
        DeviceClient::connect(addr, transport, creds, topics, 0)
            .await
            .unwrap()
    }

    /// A fresh provider token.
    pub fn jwt(&self) -> String {
        self.jwt_at(unix_now())
    }

    pub fn jwt_at(&self, iat: i64) -> String {
        push_courier::core::jwt::sign(
            &self.provider_key,
            Some(KID),
            &serde_json::json!({"iss": TEAM, "iat": iat}),
        )
        .unwrap()
    }

    /// A provider client certificate (CN = `name`) from the test CA;
    /// returns the certificate and key file paths.
    pub fn provider_cert(&self, name: &str) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::from_pem(&self.ca_issuer.1).unwrap();
        let issuer = rcgen::Issuer::from_ca_cert_pem(&self.ca_issuer.0, key).unwrap();
        let own = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = p.signed_by(&own, &issuer).unwrap();
        let c = self.dir.path().join(format!("{name}.pem"));
        let k = self.dir.path().join(format!("{name}-key.pem"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, own.serialize_pem()).unwrap();
        (c, k)
    }

    /// curl arguments presenting a provider client certificate for `name`.
    pub fn cert_args(&self, name: &str) -> Vec<String> {
        let (cert, key) = self.provider_cert(name);
        vec![
            "--cert".to_owned(),
            cert.display().to_string(),
            "--key".to_owned(),
            key.display().to_string(),
        ]
    }

    /// Runs curl against the provider API. Returns (status, headers, body).
    pub async fn curl(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: Option<&[u8]>,
    ) -> Curl {
        self.curl_with(&[], method, path, headers, body).await
    }

    /// As [`Env::curl`], with extra curl arguments first.
    pub async fn curl_with(
        &self,
        extra: &[String],
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: Option<&[u8]>,
    ) -> Curl {
        let dir = self.dir.path().to_owned();
        let port = self.provider_port();
        let ca = self.ca_pem.display().to_string();
        let n: u64 = u64::from_le_bytes(push_courier::courier::random().unwrap());
        let body_in = dir.join(format!("req-{n}"));
        let body_out = dir.join(format!("resp-{n}"));
        let head_out = dir.join(format!("head-{n}"));
        let mut args: Vec<String> = vec![
            "-sS".into(),
            "--http2".into(),
            "--cacert".into(),
            ca,
            "--resolve".into(),
            format!("localhost:{port}:127.0.0.1"),
            "-X".into(),
            method.into(),
            "-o".into(),
            body_out.display().to_string(),
            "-D".into(),
            head_out.display().to_string(),
            "-w".into(),
            "%{http_code} %{http_version}".into(),
        ];
        args.extend(extra.iter().cloned());
        for (k, v) in headers {
            args.push("-H".into());
            args.push(format!("{k}: {v}"));
        }
        if let Some(b) = body {
            std::fs::write(&body_in, b).unwrap();
            args.push("--data-binary".into());
            args.push(format!("@{}", body_in.display()));
        }
        args.push(format!("https://localhost:{port}{path}"));
        let out = tokio::task::spawn_blocking(move || {
            parley_tests::tool::run("curl", &args, Duration::from_secs(20))
        })
        .await
        .unwrap();
        let mut parts = out.text.split_whitespace();
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("curl printed {:?}", out.text));
        let version = parts.next().unwrap_or("").to_owned();
        Curl {
            status,
            version,
            headers: std::fs::read_to_string(&head_out).unwrap_or_default(),
            body: std::fs::read_to_string(&body_out).unwrap_or_default(),
        }
    }

    /// An APNs push with a valid provider token.
    pub async fn apns(&self, token: &DeviceToken, extra: &[(&str, String)], body: &[u8]) -> Curl {
        let mut h = vec![
            ("authorization", format!("bearer {}", self.jwt())),
            ("apns-topic", TOPIC.to_owned()),
        ];
        h.extend(extra.iter().cloned());
        self.curl(
            "POST",
            &format!("/3/device/{}", token.to_hex()),
            &h,
            Some(body),
        )
        .await
    }
}

#[derive(Debug)]
pub struct Curl {
    pub status: u16,
    pub version: String,
    pub headers: String,
    pub body: String,
}

impl Curl {
    pub fn reason(&self) -> String {
        serde_json::from_str::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["reason"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }
}

/// The courier's answer to a platform token the device sends over `dev`
/// (within 5 s).
pub async fn platform_answer(
    dev: &mut DeviceClient,
    token: wire::push::PlatformToken,
) -> wire::push::PlatformStatus {
    let request = dev.register_platform(token).await.unwrap();
    match dev.next_within(Duration::from_secs(5)).await.unwrap() {
        client_sdk::courier::ClientEvent::Platform {
            request: r, status, ..
        } if r == request => status,
        other => panic!("expected the platform answer, got {other:?}"),
    }
}

/// A local FCM stand-in whose access tokens live `expires_in` seconds,
/// and an FCM client pointed at it.
pub async fn fcm(
    expires_in: i64,
) -> (
    parley_tests::fcm::FakeFcm,
    push_courier::upstream::fcm::FcmClient,
) {
    let fake = parley_tests::fcm::FakeFcm::start(expires_in).await;
    let account = push_courier::upstream::fcm::ServiceAccount::from_json(
        fake.service_account_json().as_bytes(),
    )
    .unwrap();
    let client =
        push_courier::upstream::fcm::FcmClient::new(push_courier::upstream::fcm::FcmConfig {
            account,
            api: fake.addr,
            api_name: "localhost".into(),
            token: fake.addr,
            token_name: "localhost".into(),
            roots: fake.roots.clone(),
        });
    (fake, client)
}
