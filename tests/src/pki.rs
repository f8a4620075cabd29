//! A throwaway certificate authority for tests: a CA, a server certificate
//! for `localhost` and 127.0.0.1 issued by it, and the same CA's PEM and
//! key so a test can issue device certificates from it as ids does.

use rustls::pki_types::CertificateDer;

#[derive(Debug)]
pub struct TestPki {
    pub ca_pem: String,
    pub ca_key_pem: String,
    pub ca_der: CertificateDer<'static>,
    pub server_cert: CertificateDer<'static>,
    /// The server key, PKCS#8 DER.
    pub server_key: Vec<u8>,
}

impl TestPki {
    pub fn new() -> TestPki {
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "test CA");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = p.self_signed(&ca_key).expect("CA certificate");
        let ca_key_pem = ca_key.serialize_pem();
        let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_cert.pem(), ca_key).expect("issuer");
        let server_key = rcgen::KeyPair::generate().expect("server key");
        let mut sp =
            rcgen::CertificateParams::new(vec!["localhost".into()]).expect("server params");
        sp.subject_alt_names
            .push(rcgen::SanType::IpAddress([127, 0, 0, 1].into()));
        let server_cert = sp
            .signed_by(&server_key, &issuer)
            .expect("server certificate");
        TestPki {
            ca_pem: ca_cert.pem(),
            ca_key_pem,
            ca_der: ca_cert.der().clone(),
            server_cert: server_cert.der().clone(),
            server_key: server_key.serialize_der(),
        }
    }

    /// Trust anchors holding the CA.
    pub fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.ca_der.clone())
            .expect("CA is a valid anchor");
        roots
    }
}

impl Default for TestPki {
    fn default() -> Self {
        TestPki::new()
    }
}
