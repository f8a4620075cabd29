//! The tokio shell: the HTTPS listener, the epoch publisher and
//! housekeeping.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tower::ServiceExt;

use crate::error::Error;
use crate::service::Ids;

/// The identity key a request's TLS connection proved with a device
/// certificate (mutual TLS), as a request extension.
#[derive(Debug, Clone)]
pub struct ClientCertKey(pub wire::keys::PublicKey);

/// The service's TLS configuration: TLS 1.3, ALPN `http/1.1`, and, given
/// the device CA, an optional client certificate chained to it (a device
/// that presents its certificate needs no request signatures).
pub fn tls_config(
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    device_roots: Option<rustls::RootCertStore>,
) -> Result<Arc<rustls::ServerConfig>, Error> {
    wire::tls::server_config(chain, key, device_roots, &[b"http/1.1"])
        .map_err(|e| Error::Config(format!("ids TLS: {e}")))
}

/// A running identity service.
#[derive(Debug)]
pub struct Server {
    pub ids: Arc<Ids>,
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Server {
    /// Binds `listen` and serves the API over TLS (`tls` should offer
    /// ALPN `http/1.1`; see [`tls_config`]), publishing queued changes
    /// every `publish_interval`.
    pub async fn start(
        ids: Ids,
        listen: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
    ) -> Result<Server, Error> {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| Error::Config(format!("ids listen {listen}: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::Internal(e.to_string()))?;
        let ids = Arc::new(ids);
        let (shutdown, rx) = watch::channel(false);
        let tasks = vec![
            tokio::spawn(serve(listener, tls, ids.clone(), rx.clone())),
            tokio::spawn(publisher(ids.clone(), rx.clone())),
            tokio::spawn(follower(ids.clone(), rx.clone())),
            tokio::spawn(warm(ids.clone(), rx.clone())),
        ];
        tracing::info!(%addr, "ids listening");
        Ok(Server {
            ids,
            addr,
            shutdown,
            tasks,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, publishes what is queued, and returns.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        if let Err(e) = self.ids.kt.publish_pending(100_000).await {
            tracing::warn!(error = %e, "final publish failed; changes stay queued");
        }
        // Another node (or this one, restarted) publishes at once instead
        // of waiting out the lease.
        if let Err(e) = self.ids.kt.release().await {
            tracing::warn!(error = %e, "releasing the publisher lease failed");
        }
    }
}

async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    ids: Arc<Ids>,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let app = crate::api::router(ids);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "ids accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    _ => return,
                };
            // The verifier has chained the certificate to the device CA;
            // whether its key is a device's, and an active one, is the
            // request's check, as for a signature.
            let cert_key = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| wire::device_cert::public_key(c))
                .map(ClientCertKey);
            let svc = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut()
                        .insert(axum::extract::ConnectInfo(peer));
                    if let Some(k) = &cert_key {
                        req.extensions_mut().insert(k.clone());
                    }
                    app.clone().oneshot(req.map(axum::body::Body::new))
                },
            );
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}

/// Loads the key directory's tree into memory while the service already
/// answers, logging how long it took.
async fn warm(ids: Arc<Ids>, mut shutdown: watch::Receiver<bool>) {
    let started = std::time::Instant::now();
    tokio::select! {
        r = ids.kt.warm_cache() => match r {
            Ok(n) => tracing::info!(
                records = n,
                secs = started.elapsed().as_secs(),
                "key directory tree loaded into memory"
            ),
            Err(e) => tracing::warn!(error = %e, "key directory warm-up stopped; proofs read the database"),
        },
        _ = shutdown.changed() => {}
    }
}

/// Looks for another node's new epoch four times per publish interval,
/// so that a lookup here rarely spans two of its publishes (see
/// `Transparency::follow`).
async fn follower(ids: Arc<Ids>, mut shutdown: watch::Receiver<bool>) {
    let every = (ids.config.publish_interval / 4).max(Duration::from_millis(10));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        if let Err(e) = ids.kt.follow().await {
            tracing::warn!(error = %e, "checking for a new epoch failed");
        }
    }
}

async fn publisher(ids: Arc<Ids>, mut shutdown: watch::Receiver<bool>) {
    let every = ids.config.publish_interval;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        ids.tick().await;
        let started = std::time::Instant::now();
        match ids.kt.publish_pending(100_000).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                values = n,
                ms = started.elapsed().as_millis() as u64,
                "epoch published"
            ),
            Err(e) => tracing::error!(error = %e, "epoch publish failed; will retry"),
        }
    }
}
