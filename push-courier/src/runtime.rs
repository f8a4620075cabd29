//! The tokio shell: binds the device (TCP + QUIC) and provider listeners,
//! runs housekeeping, and shuts down cleanly.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use wire::push::CloseReason;

use crate::courier::{unix_now, Courier};
use crate::error::Error;
use crate::store::Store;
use crate::Config;

/// Certificates and trust anchors the courier needs.
#[derive(Debug)]
pub struct Tls {
    /// The courier's server certificate chain and key (both listeners).
    pub chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    pub key: rustls::pki_types::PrivateKeyDer<'static>,
    /// CA that issues device certificates (the identity service's).
    pub device_roots: rustls::RootCertStore,
    /// Revocation lists for device certificates.
    pub device_crls: Vec<rustls::pki_types::CertificateRevocationListDer<'static>>,
    /// CA for provider client certificates; `None` = JWT only.
    pub provider_roots: Option<rustls::RootCertStore>,
}

/// A running courier.
#[derive(Debug)]
pub struct Server {
    pub courier: Arc<Courier>,
    device_addr: SocketAddr,
    quic_addr: Option<SocketAddr>,
    provider_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    quic: Option<quinn::Endpoint>,
}

impl Server {
    pub async fn start(config: Config, tls: Tls) -> Result<Server, Error> {
        let store = Store::open_with(&config.database_url, config.fsync).await?;
        if config.cluster.is_some() && store.backend() != crate::store::Backend::Postgres {
            return Err(Error::Config(
                "courier cluster mode needs PostgreSQL (database_url = postgres://…)".into(),
            ));
        }
        let device_tls = crate::device::tls_config(
            tls.chain.clone(),
            tls.key.clone_key(),
            tls.device_roots,
            tls.device_crls,
        )?;
        let provider_tls = crate::http::tls_config(tls.chain, tls.key, tls.provider_roots)?;
        let device_listener = TcpListener::bind(config.device_listen).await.map_err(|e| {
            Error::Config(format!(
                "courier device listen {}: {e}",
                config.device_listen
            ))
        })?;
        let device_addr = device_listener.local_addr()?;
        let provider_listener = TcpListener::bind(config.provider_listen)
            .await
            .map_err(|e| {
                Error::Config(format!(
                    "courier provider listen {}: {e}",
                    config.provider_listen
                ))
            })?;
        let provider_addr = provider_listener.local_addr()?;
        let quic = if config.quic {
            // Same port as TCP, so devices need one address for both.
            let idle = 2 * config.session.max_ping_interval + Duration::from_secs(30);
            Some(crate::device::quic_endpoint(
                device_addr,
                device_tls.clone(),
                idle,
            )?)
        } else {
            None
        };
        let quic_addr = quic.as_ref().map(|e| e.local_addr()).transpose()?;

        let mut config = config;
        if config.public_url.is_empty() {
            config.public_url = format!("https://localhost:{}", provider_addr.port());
        }
        let cluster = match &config.cluster {
            Some(c) => Some(Arc::new(crate::cluster::Cluster::connect(c.clone()).await?)),
            None => None,
        };
        let courier = Courier::open(config, store).await?;
        let (shutdown, rx) = watch::channel(false);
        // Whatever no route takes is answered in Apple's form too.
        let within = courier.config.provider_body_timeout;
        let app = crate::apns::router(courier.clone())
            .merge(crate::webpush::router(courier.clone()))
            .fallback(move |req: axum::extract::Request| {
                crate::apns::unrouted(req, within, axum::http::StatusCode::NOT_FOUND, "BadPath")
            })
            .method_not_allowed_fallback(move |req: axum::extract::Request| {
                crate::apns::unrouted(
                    req,
                    within,
                    axum::http::StatusCode::METHOD_NOT_ALLOWED,
                    "MethodNotAllowed",
                )
            });
        let mut tasks = vec![
            tokio::spawn(crate::device::serve_tcp(
                device_listener,
                device_tls,
                courier.clone(),
                rx.clone(),
            )),
            tokio::spawn(crate::http::serve(
                provider_listener,
                provider_tls,
                app,
                crate::http::Limits {
                    connections: courier.config.max_provider_connections,
                    per_source: courier.config.max_provider_connections_per_source,
                },
                rx.clone(),
            )),
            tokio::spawn(housekeeping(courier.clone(), rx.clone())),
        ];
        if let Some(c) = cluster {
            courier.join(c.clone());
            tasks.push(tokio::spawn(crate::cluster::run(
                courier.clone(),
                c,
                rx.clone(),
            )));
        }
        if let Some(ep) = &quic {
            tasks.push(tokio::spawn(crate::device::serve_quic(
                ep.clone(),
                courier.clone(),
                rx.clone(),
            )));
        }
        tracing::info!(devices = %device_addr, providers = %provider_addr, quic = quic.is_some(), "courier listening");
        Ok(Server {
            courier,
            device_addr,
            quic_addr,
            provider_addr,
            shutdown,
            tasks,
            quic,
        })
    }

    /// Device TLS listener.
    pub fn device_addr(&self) -> SocketAddr {
        self.device_addr
    }

    /// Device QUIC endpoint, if enabled.
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.quic_addr
    }

    /// Provider HTTPS listener.
    pub fn provider_addr(&self) -> SocketAddr {
        self.provider_addr
    }

    /// Stops accepting, tells every device to reconnect later, waits for
    /// connections to close (bounded).
    pub async fn shutdown(self) {
        self.courier
            .close_all(CloseReason::Shutdown, "courier shutting down");
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        if let Some(q) = self.quic {
            let _ = tokio::time::timeout(Duration::from_secs(2), q.wait_idle()).await;
        }
    }
}

async fn housekeeping(courier: Arc<Courier>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        courier.expire();
        if let Err(e) = courier.catch_up_revocations().await {
            tracing::warn!(error = %e, "reading other couriers' revocations failed");
        }
        n += 1;
        if n % 60 == 0 {
            let retention = courier.config.status_retention.as_secs() as i64;
            let Some(before) = courier.purge_cutoff(unix_now(), retention) else {
                continue;
            };
            match courier.store.purge(before, unix_now() - retention).await {
                Ok(0) => {}
                Ok(k) => tracing::debug!(rows = k, "purged old message statuses"),
                Err(e) => tracing::warn!(error = %e, "status purge failed"),
            }
            // A receipt subscription lives as long as the statuses it
            // reports on.
            let made_before = unix_now() - retention;
            match courier.store.purge_receipt_subscriptions(made_before).await {
                Ok(0) => {}
                Ok(k) => tracing::debug!(rows = k, "purged old receipt subscriptions"),
                Err(e) => tracing::warn!(error = %e, "receipt subscription purge failed"),
            }
        }
    }
}
