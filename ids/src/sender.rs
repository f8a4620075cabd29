//! Delivering verification codes.
//!
//! - [`OutboxSender`] (development default): each message becomes a file.
//! - [`SmtpSender`]: email through an SMTP relay (lettre; TLS required
//!   except to a loopback relay).
//! - [`WebhookSender`]: an HTTPS POST per message, for SMS providers or a
//!   gateway of the operator's: `{"to": "+14155550123", "kind": "phone",
//!   "text": "…"}` with an optional bearer token; any 2xx is success.
//! - [`ByKind`]: email handles to one sender, phone numbers to another.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use wire::Handle;

use crate::core::verification::Code;
use crate::error::Error;

/// Something that can deliver a code to a handle.
#[async_trait]
pub trait CodeSender: Send + Sync + std::fmt::Debug {
    async fn send(&self, to: &Handle, code: &Code) -> Result<(), Error>;
}

pub const SUBJECT: &str = "Your Parley code";

/// The message every sender delivers.
pub fn message_text(code: &Code) -> String {
    format!(
        "Your Parley verification code is {}.\nIt expires in 10 minutes. Never share it.\n",
        code.0
    )
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> Error {
    tracing::warn!(error = %e, "{what} failed");
    Error::Unavailable(format!("could not deliver the code ({what}); retry later"))
}

/// Writes `<outbox>/<unix-nanos>-<handle>.txt` containing a mail-like
/// message. For development and tests only: codes land on disk.
#[derive(Debug, Clone)]
pub struct OutboxSender {
    pub dir: PathBuf,
}

impl OutboxSender {
    /// The file name used for a handle (characters other than
    /// `[A-Za-z0-9@.+-]` become `_`).
    pub fn file_stem(to: &Handle) -> String {
        to.as_str()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "@.+-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    }
}

#[async_trait]
impl CodeSender for OutboxSender {
    async fn send(&self, to: &Handle, code: &Code) -> Result<(), Error> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| Error::Internal(format!("outbox {}: {e}", self.dir.display())))?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let path = self
            .dir
            .join(format!("{nanos}-{}.txt", Self::file_stem(to)));
        let body = format!("To: {to}\nSubject: {SUBJECT}\n\n{}", message_text(code));
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, body)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|e| Error::Internal(format!("outbox {}: {e}", path.display())))
    }
}

/// Email through an SMTP relay.
#[derive(Debug, Clone)]
pub struct SmtpSender {
    transport: lettre::AsyncSmtpTransport<lettre::Tokio1Executor>,
    from: lettre::message::Mailbox,
}

impl SmtpSender {
    /// `url`: `smtps://user:pass@host:465`, `smtp://host:587?tls=required`,
    /// or plain `smtp://127.0.0.1:port` to a relay on loopback only.
    /// `from`: `Parley <no-reply@example.com>`.
    pub fn new(url: &str, from: &str) -> Result<SmtpSender, Error> {
        let parsed =
            url::Url::parse(url).map_err(|e| Error::Config(format!("ids.email_smtp_url: {e}")))?;
        let tls = parsed.scheme() == "smtps"
            || parsed
                .query_pairs()
                .any(|(k, v)| k == "tls" && v == "required");
        // smtp: is not a special scheme to `url`, so hosts come back as text.
        let loopback = parsed.host_str().is_some_and(is_loopback_host);
        if !tls && !loopback {
            return Err(Error::Config(
                "ids.email_smtp_url: codes would cross the network in clear; use smtps:// or ?tls=required"
                    .into(),
            ));
        }
        let transport = lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::from_url(url)
            .map_err(|e| Error::Config(format!("ids.email_smtp_url: {e}")))?
            .timeout(Some(Duration::from_secs(15)))
            .build();
        let from = from
            .parse()
            .map_err(|e| Error::Config(format!("ids.email_from: {e}")))?;
        Ok(SmtpSender { transport, from })
    }
}

#[async_trait]
impl CodeSender for SmtpSender {
    async fn send(&self, to: &Handle, code: &Code) -> Result<(), Error> {
        use lettre::AsyncTransport;
        let Handle::Email(address) = to else {
            return Err(Error::BadRequest(
                "this server does not send codes to phone numbers".into(),
            ));
        };
        let to: lettre::message::Mailbox = address
            .parse()
            .map_err(|e| Error::BadRequest(format!("cannot mail this address: {e}")))?;
        let msg = lettre::Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(SUBJECT)
            .body(message_text(code))
            .map_err(|e| Error::Internal(format!("building the email: {e}")))?;
        self.transport
            .send(msg)
            .await
            .map(|_| ())
            .map_err(|e| unavailable("smtp", e))
    }
}

/// An HTTP(S) POST per message.
#[derive(Clone)]
pub struct WebhookSender {
    uri: hyper::Uri,
    token: Option<String>,
    tls: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for WebhookSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSender")
            .field("uri", &self.uri)
            .field("token", &self.token.as_ref().map(|_| "…"))
            .finish()
    }
}

impl WebhookSender {
    /// `url`: `https://…` (public roots), or `http://` to loopback only.
    pub fn new(url: &str, token: Option<String>) -> Result<WebhookSender, Error> {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| Error::Config(format!("ids.sms_webhook_url: {e}")))?;
        let loopback = uri.host().is_some_and(is_loopback_host);
        match uri.scheme_str() {
            Some("https") => {}
            Some("http") if loopback => {}
            _ => {
                return Err(Error::Config(
                    "ids.sms_webhook_url: must be https:// (http:// only to loopback)".into(),
                ))
            }
        }
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Internal(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(WebhookSender {
            uri,
            token,
            tls: Arc::new(tls),
        })
    }

    async fn post(&self, body: String) -> Result<hyper::StatusCode, String> {
        use http_body_util::Full;
        let host = self.uri.host().ok_or("no host")?.to_owned();
        let https = self.uri.scheme_str() == Some("https");
        let port = self.uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tcp = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
            .await
            .map_err(|e| e.to_string())?;
        let mut req =
            hyper::Request::post(self.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
                .header(hyper::header::HOST, &host)
                .header(hyper::header::CONTENT_TYPE, "application/json");
        if let Some(t) = &self.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req
            .body(Full::new(hyper::body::Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        if https {
            let name =
                rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
            let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| e.to_string())?;
            exchange(tls, req).await
        } else {
            exchange(tcp, req).await
        }
    }
}

#[async_trait]
impl CodeSender for WebhookSender {
    async fn send(&self, to: &Handle, code: &Code) -> Result<(), Error> {
        let body = serde_json::json!({
            "to": to.as_str(),
            "kind": to.kind(),
            "text": message_text(code),
        })
        .to_string();
        match tokio::time::timeout(Duration::from_secs(15), self.post(body)).await {
            Ok(Ok(s)) if s.is_success() => Ok(()),
            Ok(Ok(s)) => Err(unavailable("webhook", format!("status {s}"))),
            Ok(Err(e)) => Err(unavailable("webhook", e)),
            Err(_) => Err(unavailable("webhook", "timed out after 15 s")),
        }
    }
}

/// `localhost` or a loopback IP literal (brackets allowed).
fn is_loopback_host(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// One HTTP/1.1 request on `io`; returns the status.
async fn exchange<IO>(
    io: IO,
    req: hyper::Request<http_body_util::Full<hyper::body::Bytes>>,
) -> Result<hyper::StatusCode, String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use http_body_util::BodyExt;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    Ok(status)
}

/// Email handles to `email`, phone numbers to `phone`.
#[derive(Debug)]
pub struct ByKind {
    pub email: Box<dyn CodeSender>,
    pub phone: Box<dyn CodeSender>,
}

#[async_trait]
impl CodeSender for ByKind {
    async fn send(&self, to: &Handle, code: &Code) -> Result<(), Error> {
        match to {
            Handle::Email(_) => self.email.send(to, code).await,
            Handle::Phone(_) => self.phone.send(to, code).await,
        }
    }
}
