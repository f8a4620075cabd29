//! The provider side: an HTTP/2 client over TLS (one connection, many
//! concurrent streams) and [`ApnsSender`], which pushes through the
//! APNs-style API with an ES256 provider token it refreshes itself. Used by
//! the load simulator and tests.
//!
//! The client sits on `h2` (hyper's HTTP/2 layer) directly: hyper's client
//! spawns a task and a dispatch channel per request, which cost a load
//! generator sharing the courier's cores about as much CPU per push as the
//! courier's own HTTP/2 handling.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use h2::client::{ResponseFuture, SendRequest};
use h2::SendStream;
use hyper::http::{HeaderName, HeaderValue, Method, Request, Uri};

/// One HTTP/2 connection; clone it to send from many tasks.
#[derive(Debug, Clone)]
pub struct Http2 {
    send: SendRequest<Bytes>,
    authority: String,
}

/// A finished response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl Http2 {
    /// Connects to `addr`, trusting `roots`, expecting a certificate for
    /// `server_name`, offering ALPN `h2` only.
    pub async fn connect(
        addr: SocketAddr,
        server_name: &str,
        roots: rustls::RootCertStore,
    ) -> std::io::Result<Http2> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(std::io::Error::other)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let name = rustls::pki_types::ServerName::try_from(server_name.to_owned())
            .map_err(std::io::Error::other)?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await?;
        let (send, conn) = h2::client::Builder::new()
            .max_concurrent_reset_streams(1024)
            .handshake(tls)
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "provider HTTP/2 connection ended");
            }
        });
        Ok(Http2 {
            send,
            authority: format!("{server_name}:{}", addr.port()),
        })
    }

    /// Sends one request and reads the whole response.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> std::io::Result<Response> {
        let (response, _stream) = self.start(method, path, headers, body, true).await?;
        let (parts, mut recv) = response.await.map_err(std::io::Error::other)?.into_parts();
        let mut body = BytesMut::new();
        while let Some(chunk) = recv.data().await {
            let chunk = chunk.map_err(std::io::Error::other)?;
            let _ = recv.flow_control().release_capacity(chunk.len());
            body.extend_from_slice(&chunk);
        }
        Ok(Response {
            status: parts.status.as_u16(),
            headers: parts
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
                .collect(),
            body: body.freeze(),
        })
    }
}

impl Http2 {
    /// Sends the headers and the first `body` bytes of a request whose
    /// body never ends, and returns the status the server answers with
    /// meanwhile: what a server says before it has read a whole body.
    pub async fn request_unfinished(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> std::io::Result<u16> {
        let (response, stream) = self.start(method, path, headers, body, false).await?;
        let response = response.await.map_err(std::io::Error::other)?;
        // Keep the stream open until the answer is read.
        drop(stream);
        Ok(response.status().as_u16())
    }

    /// Opens a stream for a request and sends its head and `body`;
    /// `end` says whether the body ends there.
    async fn start(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
        end: bool,
    ) -> std::io::Result<(ResponseFuture, SendStream<Bytes>)> {
        let req = self.head(method, path, headers)?;
        // Waits while the server's stream limit is reached.
        poll_fn(|cx| self.send.poll_ready(cx))
            .await
            .map_err(std::io::Error::other)?;
        let only_head = end && body.is_empty();
        let (response, mut stream) = self
            .send
            .send_request(req, only_head)
            .map_err(std::io::Error::other)?;
        if !only_head {
            stream
                .send_data(Bytes::from(body), end)
                .map_err(std::io::Error::other)?;
        }
        Ok((response, stream))
    }

    /// A request's head: method, this connection's authority, headers.
    fn head(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> std::io::Result<Request<()>> {
        let uri = Uri::builder()
            .scheme("https")
            .authority(self.authority.as_str())
            .path_and_query(path)
            .build()
            .map_err(std::io::Error::other)?;
        let mut req = Request::new(());
        *req.method_mut() = Method::from_bytes(method.as_bytes()).map_err(std::io::Error::other)?;
        *req.uri_mut() = uri;
        for (k, v) in headers {
            req.headers_mut().append(
                HeaderName::from_bytes(k.as_bytes()).map_err(std::io::Error::other)?,
                HeaderValue::from_str(v).map_err(std::io::Error::other)?,
            );
        }
        Ok(req)
    }
}

/// Pushes through the APNs-style API as one provider.
#[derive(Debug, Clone)]
pub struct ApnsSender {
    http: Http2,
    pkcs8: Arc<Vec<u8>>,
    key_id: String,
    team_id: String,
    token: Arc<std::sync::Mutex<(i64, String)>>,
}

/// Provider tokens are renewed after this long (APNs: between 20 and 60
/// minutes).
const TOKEN_REFRESH_S: i64 = 30 * 60;

impl ApnsSender {
    pub fn new(http: Http2, pkcs8: Vec<u8>, key_id: &str, team_id: &str) -> ApnsSender {
        ApnsSender {
            http,
            pkcs8: Arc::new(pkcs8),
            key_id: key_id.to_owned(),
            team_id: team_id.to_owned(),
            token: Arc::new(std::sync::Mutex::new((0, String::new()))),
        }
    }

    fn bearer(&self) -> std::io::Result<String> {
        let now = crate::courier::unix_now();
        let mut t = self.token.lock().unwrap_or_else(|p| p.into_inner());
        if now - t.0 >= TOKEN_REFRESH_S {
            let jwt = crate::core::jwt::sign(
                &self.pkcs8,
                Some(&self.key_id),
                &serde_json::json!({"iss": self.team_id, "iat": now}),
            )
            .map_err(std::io::Error::other)?;
            *t = (now, format!("bearer {jwt}"));
        }
        Ok(t.1.clone())
    }

    /// `POST /3/device/<token>` with `apns-topic` and extra headers
    /// (`apns-push-type`, `apns-priority`, `apns-id`, …).
    pub async fn push(
        &mut self,
        token: &wire::push::DeviceToken,
        topic: &str,
        headers: &[(&str, &str)],
        payload: Vec<u8>,
    ) -> std::io::Result<Response> {
        let auth = self.bearer()?;
        let mut h: Vec<(&str, &str)> = vec![("authorization", &auth), ("apns-topic", topic)];
        h.extend_from_slice(headers);
        self.http
            .request(
                "POST",
                &format!("/3/device/{}", token.to_hex()),
                &h,
                payload,
            )
            .await
    }
}
