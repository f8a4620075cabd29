//! The provider listener: HTTPS with HTTP/2 and HTTP/1.1 (by ALPN), and an
//! optional provider client certificate whose subject CN names the
//! provider.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceExt;

use crate::error::Error;

/// The CN of a verified provider client certificate, as a request
/// extension.
#[derive(Debug, Clone)]
pub struct ClientCertName(pub Option<String>);

/// TLS 1.3 for the provider API, ALPN `h2` and `http/1.1`. With
/// `provider_roots`, a client certificate chained to them is accepted (not
/// required: JWT is the other way in).
pub fn tls_config(
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    provider_roots: Option<rustls::RootCertStore>,
) -> Result<Arc<rustls::ServerConfig>, Error> {
    wire::tls::server_config(chain, key, provider_roots, &[b"h2", b"http/1.1"])
        .map_err(|e| Error::Config(format!("provider TLS: {e}")))
}

/// How many provider connections may be open, in all and per source.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub connections: usize,
    pub per_source: usize,
}

/// Serves `app` over TLS (HTTP/2 or HTTP/1.1 by ALPN) on `listener` until
/// `shutdown`.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: axum::Router,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let open = Arc::new(tokio::sync::Semaphore::new(limits.connections.max(1)));
    let per_source = wire::net::PerSourceLimit::new(limits.per_source);
    while let Some((tcp, peer)) = accept(&listener, &mut shutdown, "provider").await {
        // Past either cap the connection is closed at once: an
        // unauthenticated peer holds nothing beyond its share.
        let Some(claim) = per_source.claim(peer.ip()) else {
            tracing::debug!("provider connections from this source at their limit");
            continue;
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            tracing::debug!("provider connections at their limit");
            continue;
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let _held = (claim, permit);
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    _ => return,
                };
            let cert_name = ClientCertName(
                tls.get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| common_name(c)),
            );
            let svc = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(cert_name.clone());
                    req.extensions_mut()
                        .insert(axum::extract::ConnectInfo(peer));
                    app.clone().oneshot(req.map(axum::body::Body::new))
                },
            );
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10));
            builder
                .http2()
                .timer(hyper_util::rt::TokioTimer::new())
                .max_concurrent_streams(1000)
                .keep_alive_interval(Duration::from_secs(60));
            let _ = builder.serve_connection(TokioIo::new(tls), svc).await;
        });
    }
}

fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// A header's value, if present and visible ASCII.
pub(crate) fn header<'a>(h: &'a axum::http::HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// The next TCP connection (Nagle off), or `None` once `shutdown` fires.
/// Accept errors (out of file descriptors and the like) back off and go on.
pub(crate) async fn accept(
    listener: &TcpListener,
    shutdown: &mut watch::Receiver<bool>,
    what: &'static str,
) -> Option<(tokio::net::TcpStream, std::net::SocketAddr)> {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    return Some((tcp, peer));
                }
                Err(e) => {
                    tracing::warn!(error = %e, listener = what, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => return None,
        }
    }
}
