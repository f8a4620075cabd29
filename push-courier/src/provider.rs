//! A minimal HTTP/2 client over TLS for provider-side tests and the load
//! simulator: one connection, many concurrent streams.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// One HTTP/2 connection; clone it to send from many tasks.
#[derive(Debug, Clone)]
pub struct Http2 {
    send: SendRequest<Full<Bytes>>,
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
        let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .max_concurrent_reset_streams(1024)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(conn);
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
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(format!("https://{}{path}", self.authority));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(std::io::Error::other)?;
        self.send.ready().await.map_err(std::io::Error::other)?;
        let resp = self
            .send
            .send_request(req)
            .await
            .map_err(std::io::Error::other)?;
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
            .collect();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(std::io::Error::other)?
            .to_bytes();
        Ok(Response {
            status,
            headers,
            body,
        })
    }
}
