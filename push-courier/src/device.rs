//! The device listeners: TLS 1.3 over TCP and QUIC on the same port, both
//! ALPN `parley-push/1`, both requiring a device certificate from the
//! device CA. Each connection drives one [`Session`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use wire::push::{CloseReason, ALPN};
use wire::DeviceId;

use crate::core::session::{Session, SessionEvent};
use crate::courier::{ConnCommand, Courier};
use crate::error::Error;

pub use wire::device_cert::{identity, normalize_serial, DeviceIdentity};

/// The revoked serials (normalized) in a certificate revocation list, DER
/// or PEM. The list is trusted as given: it comes from the operator's own
/// identity service.
pub fn crl_serials(crl: &[u8]) -> Result<std::collections::HashSet<Vec<u8>>, Error> {
    let der = if crl.starts_with(b"-----BEGIN") {
        match rustls_pemfile::read_one(&mut &crl[..]) {
            Ok(Some(rustls_pemfile::Item::Crl(d))) => d.as_ref().to_vec(),
            _ => return Err(Error::Config("not a PEM X509 CRL".into())),
        }
    } else {
        crl.to_vec()
    };
    use x509_parser::prelude::FromDer;
    let (_, list) = x509_parser::revocation_list::CertificateRevocationList::from_der(&der)
        .map_err(|e| Error::Config(format!("not a certificate revocation list: {e}")))?;
    Ok(list
        .iter_revoked_certificates()
        .map(|r| normalize_serial(r.raw_serial()))
        .collect())
}

/// The TLS configuration for device links: TLS 1.3 only, client
/// certificate required and chained to `device_roots`.
pub fn tls_config(
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    device_roots: rustls::RootCertStore,
    crls: Vec<rustls::pki_types::CertificateRevocationListDer<'static>>,
) -> Result<Arc<rustls::ServerConfig>, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(device_roots),
        provider.clone(),
    )
    .with_crls(crls)
    .allow_unknown_revocation_status()
    .build()
    .map_err(|e| Error::Config(format!("device CA: {e}")))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| Error::Config(format!("courier certificate: {e}")))?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    // Small session state per connection: no resumption tickets to hold.
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// Accepts TLS device connections until `shutdown`.
pub async fn serve_tcp(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    courier: Arc<Courier>,
    shutdown: watch::Receiver<bool>,
) {
    let mut stop = shutdown.clone();
    let handshakes = Arc::new(tokio::sync::Semaphore::new(
        courier.config.max_handshakes.max(1),
    ));
    let per_source = wire::net::PerSourceLimit::new(courier.config.max_handshakes_per_source);
    while let Some((tcp, peer)) = crate::http::accept(&listener, &mut stop, "device").await {
        let tls = tls.clone();
        let courier = courier.clone();
        let shutdown = shutdown.clone();
        // Past max_handshakes at once, or the source's share of them, new
        // connections are dropped (devices retry with backoff) rather than
        // running unbounded handshakes.
        let Some(claim) = per_source.claim(peer.ip()) else {
            tracing::debug!("too many handshakes from this source; connection dropped");
            continue;
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            tracing::debug!("too many handshakes in progress; connection dropped");
            continue;
        };
        tokio::spawn(async move {
            let timeout = courier.config.handshake_timeout;
            let accepted = tokio::time::timeout(timeout, crate::lean_tls::accept(tcp, tls)).await;
            drop(permit);
            drop(claim);
            let tls = match accepted {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "device TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!("device TLS handshake timed out");
                    return;
                }
            };
            let id = tls
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| identity(c));
            let Some(id) = id else {
                tracing::debug!("device certificate names no device id");
                return;
            };
            // The connection's long-lived task holds only what `run` needs
            // (see `run`); this one, sized for the handshake, ends here.
            tokio::spawn(run(Box::new(tls), id, courier, shutdown));
        });
    }
}

/// A QUIC endpoint for devices on `addr` (UDP).
pub fn quic_endpoint(
    addr: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    idle_timeout: Duration,
) -> Result<quinn::Endpoint, Error> {
    let cfg = quic_server_config(tls, idle_timeout)?;
    quinn::Endpoint::server(cfg, addr).map_err(Error::Io)
}

/// The QUIC server configuration for device links (see
/// [`quic_endpoint`]).
pub fn quic_server_config(
    tls: Arc<rustls::ServerConfig>,
    idle_timeout: Duration,
) -> Result<quinn::ServerConfig, Error> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from((*tls).clone())
        .map_err(|e| Error::Config(format!("QUIC TLS: {e}")))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(idle_timeout)
                .map_err(|e| Error::Config(format!("QUIC idle timeout: {e}")))?,
        ))
        // One stream per device; nothing else may be opened.
        .max_concurrent_bidi_streams(1u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window((64u32 * 1024).into())
        .receive_window((128u32 * 1024).into())
        .send_window(256 * 1024)
        // Devices send tiny frames: no unreliable datagrams, no path MTU
        // probing, so idle connections keep less state.
        .datagram_receive_buffer_size(None)
        .datagram_send_buffer_size(0)
        .mtu_discovery_config(None);
    cfg.transport_config(Arc::new(transport));
    cfg.migration(true);
    Ok(cfg)
}

/// Accepts QUIC device connections until `shutdown`.
pub async fn serve_quic(
    endpoint: quinn::Endpoint,
    courier: Arc<Courier>,
    shutdown: watch::Receiver<bool>,
) {
    let mut stop = shutdown.clone();
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => return,
            },
            _ = stop.changed() => {
                endpoint.close(0u32.into(), b"shutdown");
                return;
            }
        };
        let courier = courier.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let timeout = courier.config.handshake_timeout;
            let conn = match tokio::time::timeout(timeout, async { incoming.accept()?.await }).await
            {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "device QUIC handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let id = conn
                .peer_identity()
                .and_then(|p| {
                    p.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                        .ok()
                })
                .and_then(|c| c.first().and_then(|c| identity(c)));
            let Some(id) = id else {
                conn.close(1u32.into(), b"no device id");
                return;
            };
            let hello_timeout = courier.config.session.hello_timeout;
            let (send, recv) = match tokio::time::timeout(hello_timeout, conn.accept_bi()).await {
                Ok(Ok(s)) => s,
                _ => {
                    conn.close(1u32.into(), b"no stream");
                    return;
                }
            };
            tokio::spawn(async move {
                run(Box::new(tokio::io::join(recv, send)), id, courier, shutdown).await;
                conn.close(0u32.into(), b"closed");
            });
        });
    }
}

/// Drives one device connection until it ends.
///
/// Its future is most of an idle connection's memory, so it is kept small:
/// the stream comes boxed (an async fn's arguments are held twice in its
/// future, and a TLS stream is over 1 KiB), storage work is boxed while it
/// runs, and reads go through a small buffer (devices send small frames).
async fn run<S>(
    mut io: S,
    id: DeviceIdentity,
    courier: Arc<Courier>,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let device = id.device;
    let Some((generation, mut rx)) = courier.connect(device, id.serial) else {
        let mut s = Session::new(courier.config.session.clone(), Instant::now());
        s.close(CloseReason::Revoked, "certificate revoked", Instant::now());
        let _ = tokio::time::timeout(Duration::from_secs(2), io.write_all(s.output())).await;
        return;
    };
    let mut s = Session::new(courier.config.session.clone(), Instant::now());
    let write_timeout = courier.config.session.hello_timeout;
    let mut buf = [0u8; 256];
    loop {
        while let Some(ev) = s.poll_event() {
            Box::pin(on_event(&courier, device, generation, &mut s, ev)).await;
        }
        if !s.output().is_empty() {
            if s.output().len() > courier.config.max_write_buffer {
                tracing::debug!("device is a slow reader; disconnecting");
                break;
            }
            let n = s.output().len();
            let wrote = tokio::time::timeout(write_timeout, async {
                io.write_all(s.output()).await?;
                io.flush().await
            })
            .await;
            match wrote {
                Ok(Ok(())) => s.consume_output(n),
                _ => break,
            }
        }
        if s.is_closed() {
            break;
        }
        let deadline = s
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            r = io.read(&mut buf) => match r {
                Ok(0) | Err(_) => s.handle_disconnect(),
                Ok(n) => s.handle_bytes(&buf[..n], Instant::now()),
            },
            cmd = rx.recv() => {
                let now = Instant::now();
                let mut next = cmd;
                // Take what else is waiting so it goes out in one write.
                for _ in 0..64 {
                    match next {
                        Some(ConnCommand::Deliver(n)) => s.deliver(*n, now),
                        Some(ConnCommand::Close(r, t)) => { s.close(r, t, now); break; }
                        None => { s.close(CloseReason::Shutdown, "courier stopping", now); break; }
                    }
                    match rx.try_recv() {
                        Some(c) => next = Some(c),
                        None => break,
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline.into()) => s.handle_timeout(Instant::now()),
            _ = shutdown.changed() => s.close(CloseReason::Shutdown, "courier shutting down", Instant::now()),
        }
    }
    courier.disconnect(device, generation);
    let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
}

async fn on_event(
    courier: &Courier,
    device: DeviceId,
    generation: u64,
    s: &mut Session,
    ev: SessionEvent,
) {
    match ev {
        SessionEvent::Hello { topics } => {
            let tokens = courier.tokens_for(device, &topics).await;
            let backlog = courier.backlog(device, generation).await;
            let now = Instant::now();
            match (tokens, backlog) {
                (Ok(t), Ok(b)) => {
                    s.send_tokens(t, now);
                    for n in b {
                        s.deliver_stored(n, now);
                    }
                }
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(error = %e, "cannot serve device hello");
                    s.close(CloseReason::Shutdown, "storage unavailable; retry", now);
                }
            }
        }
        SessionEvent::Subscribe {
            request,
            topic,
            server_key,
        } => match courier.subscribe(device, &topic, server_key).await {
            Ok(token) => {
                let endpoint = format!(
                    "{}/wp/{}",
                    courier.config.public_url.trim_end_matches('/'),
                    token.to_b64()
                );
                s.send_subscription(request, token, endpoint, Instant::now());
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot create subscription");
                s.close(
                    CloseReason::Shutdown,
                    "storage unavailable; retry",
                    Instant::now(),
                );
            }
        },
        SessionEvent::Revoke { token } => {
            if let Err(e) = courier.revoke(device, token).await {
                tracing::warn!(error = %e, "cannot revoke token");
            }
        }
        SessionEvent::Platform { request, token } => {
            let (status, why) = courier.register_platform(device, &token).await;
            s.send_platform_answer(request, status, why, Instant::now());
        }
        SessionEvent::Acked(ids) => courier.acked(device, ids),
        SessionEvent::Closed { reason } => {
            tracing::debug!(?reason, "device session closed");
        }
    }
}
