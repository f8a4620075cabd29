//! The server side of TLS as the services set it up: TLS 1.3 only, on
//! ring, with an optional client certificate.

use std::sync::Arc;

/// Why a TLS configuration could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("client CA: {0}")]
    ClientCa(String),
    #[error("certificate: {0}")]
    Certificate(String),
}

/// TLS 1.3 with `chain` and `key`, offering `alpn`. With `client_roots`, a
/// client certificate chained to them is accepted but not required (the
/// service authenticates the request some other way when there is none).
pub fn server_config(
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    client_roots: Option<rustls::RootCertStore>,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, TlsConfigError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsConfigError::Certificate(e.to_string()))?;
    let builder = match client_roots {
        Some(roots) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsConfigError::ClientCa(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsConfigError::Certificate(e.to_string()))?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}
