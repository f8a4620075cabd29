//! DTLS-SRTP over OpenSSL, for calls with third-party SIP phones.
//!
//! str0m's own DTLS stack (dimpl) speaks only ECDSA, which is what WebRTC
//! endpoints and our devices use. Common SIP phones authenticate with RSA
//! certificates (baresip 1.0 always does), which it cannot verify, so the
//! handshake fails. Calls to such phones use this stack instead, through
//! str0m's crypto provider interface: the rest of str0m's provider (SRTP,
//! hashes, the certificate it generates) stays as it is.
//!
//! OpenSSL runs over in-memory datagram queues, sans-IO like everything
//! else here. The peer's certificate is accepted as presented: str0m
//! checks its fingerprint against the SDP when it is reported.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use openssl::pkey::PKey;
use openssl::srtp::SrtpProfileId;
use openssl::ssl::{
    ErrorCode, Ssl, SslContext, SslMethod, SslOptions, SslStream, SslVerifyMode, SslVersion,
};
use openssl::x509::X509;
use str0m_proto::crypto::dtls::{
    DtlsCert, DtlsImplError, DtlsInstance, DtlsOutput, DtlsProvider, KeyingMaterial,
    ProtocolVersion, SrtpProfile,
};
use str0m_proto::crypto::{CryptoError, CryptoProvider, DtlsVersion};

/// Forward-secret AEAD suites only, for either certificate type.
const CIPHERS: &str = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:\
    ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:\
    ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305";
/// RFC 7714 GCM first, then RFC 5764's mandatory profile.
const SRTP_PROFILES: &str = "SRTP_AEAD_AES_128_GCM:SRTP_AES128_CM_SHA1_80";
/// Records stay below this (a relayed path's MTU with headroom).
const MTU: u32 = 1150;
/// How often a handshake in progress is woken to resend what was lost;
/// OpenSSL keeps its own doubling timer and resends only when it ran out.
const HANDSHAKE_TICK: Duration = Duration::from_millis(100);
/// After the handshake, how often str0m is asked to wake this instance
/// (it has nothing to do on a timer then).
const SETTLED_TICK: Duration = Duration::from_secs(3600);
/// At most this many datagrams wait in either direction.
const QUEUE: usize = 64;

/// str0m's default provider with OpenSSL for DTLS.
pub(crate) fn provider() -> CryptoProvider {
    static DTLS: OpensslDtls = OpensslDtls;
    CryptoProvider {
        dtls_provider: &DTLS,
        ..str0m_aws_lc_rs::default_provider()
    }
}

#[derive(Debug)]
struct OpensslDtls;

impl DtlsProvider for OpensslDtls {
    fn generate_certificate(&self) -> Option<DtlsCert> {
        str0m_aws_lc_rs::default_provider()
            .dtls_provider
            .generate_certificate()
    }

    fn new_dtls(
        &self,
        cert: &DtlsCert,
        now: Instant,
        _version: DtlsVersion,
        _mtu: Option<usize>,
    ) -> Result<Box<dyn DtlsInstance>, CryptoError> {
        let context = context(cert).map_err(|e| CryptoError::Other(format!("OpenSSL: {e}")))?;
        Ok(Box::new(OpensslInstance {
            context,
            state: State::Idle(Datagrams::default()),
            active: false,
            events: VecDeque::new(),
            next_tick: now + HANDSHAKE_TICK,
            closing: false,
        }))
    }
}

fn context(cert: &DtlsCert) -> Result<SslContext, openssl::error::ErrorStack> {
    let mut b = SslContext::builder(SslMethod::dtls())?;
    b.set_min_proto_version(Some(SslVersion::DTLS1_2))?;
    b.set_cipher_list(CIPHERS)?;
    b.set_tlsext_use_srtp(SRTP_PROFILES)?;
    let certificate = X509::from_der(&cert.certificate)?;
    b.set_certificate(&certificate)?;
    let key = PKey::private_key_from_pkcs8(&cert.private_key)
        .or_else(|_| PKey::private_key_from_der(&cert.private_key))?;
    b.set_private_key(&key)?;
    b.check_private_key()?;
    // Self-signed on both sides: the fingerprint in the SDP is the trust.
    b.set_verify_callback(
        SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT,
        |_, _| true,
    );
    b.set_options(SslOptions::NO_QUERY_MTU | SslOptions::NO_TICKET);
    Ok(b.build())
}

/// The datagram "socket" OpenSSL reads and writes.
#[derive(Debug, Default)]
struct Datagrams {
    incoming: VecDeque<Vec<u8>>,
    outgoing: VecDeque<Vec<u8>>,
}

impl Read for Datagrams {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(d) = self.incoming.pop_front() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let n = d.len().min(buf.len());
        buf[..n].copy_from_slice(&d[..n]);
        Ok(n)
    }
}

impl Write for Datagrams {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.outgoing.len() >= QUEUE {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.outgoing.push_back(buf.to_vec());
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum State {
    /// No role yet; datagrams that arrive wait in `incoming`.
    Idle(Datagrams),
    Handshaking(SslStream<Datagrams>),
    Connected(SslStream<Datagrams>),
    /// The handshake failed; the alert OpenSSL wrote waits in `outgoing`.
    Failed(Datagrams),
}

enum Event {
    Connected,
    PeerCert(Vec<u8>),
    Keying(KeyingMaterial, SrtpProfile),
    Data(Vec<u8>),
    CloseNotify,
}

struct OpensslInstance {
    context: SslContext,
    state: State,
    active: bool,
    events: VecDeque<Event>,
    next_tick: Instant,
    closing: bool,
}

fn failed(what: &str, e: impl std::fmt::Display) -> DtlsImplError {
    tracing::warn!(error = %e, "DTLS (OpenSSL) {what} failed");
    DtlsImplError::ConnectionClosed
}

impl OpensslInstance {
    fn start(&mut self) -> Result<(), DtlsImplError> {
        let mut ssl = Ssl::new(&self.context).map_err(|e| failed("setup", e))?;
        ssl.set_mtu(MTU).map_err(|e| failed("setup", e))?;
        if self.active {
            ssl.set_connect_state();
        } else {
            ssl.set_accept_state();
        }
        let io = match &mut self.state {
            State::Idle(early) => std::mem::take(early),
            _ => Datagrams::default(),
        };
        let stream = SslStream::new(ssl, io).map_err(|e| failed("setup", e))?;
        self.state = State::Handshaking(stream);
        self.progress()
    }

    /// Moves the handshake on with what has arrived; reads what the
    /// connection delivers.
    fn progress(&mut self) -> Result<(), DtlsImplError> {
        match std::mem::replace(&mut self.state, State::Failed(Datagrams::default())) {
            State::Handshaking(mut stream) => match stream.do_handshake() {
                Ok(()) => {
                    self.connected(&stream)?;
                    self.state = State::Connected(stream);
                    self.read_data()
                }
                Err(e) if e.code() == ErrorCode::WANT_READ || e.code() == ErrorCode::WANT_WRITE => {
                    self.state = State::Handshaking(stream);
                    Ok(())
                }
                Err(e) => {
                    // Whatever alert OpenSSL wrote still goes out.
                    self.state = State::Failed(std::mem::take(stream.get_mut()));
                    Err(failed("handshake", e))
                }
            },
            State::Connected(stream) => {
                self.state = State::Connected(stream);
                self.read_data()
            }
            other => {
                self.state = other;
                Ok(())
            }
        }
    }

    fn connected(&mut self, stream: &SslStream<Datagrams>) -> Result<(), DtlsImplError> {
        let ssl = stream.ssl();
        let peer = ssl
            .peer_certificate()
            .ok_or_else(|| failed("handshake", "the peer sent no certificate"))?
            .to_der()
            .map_err(|e| failed("handshake", e))?;
        let id = ssl
            .selected_srtp_profile()
            .map(|p| p.id())
            .ok_or_else(|| failed("handshake", "no SRTP profile was agreed"))?;
        let profile = if id == SrtpProfileId::SRTP_AEAD_AES_128_GCM {
            SrtpProfile::AEAD_AES_128_GCM
        } else if id == SrtpProfileId::SRTP_AES128_CM_SHA1_80 {
            SrtpProfile::AES128_CM_SHA1_80
        } else {
            return Err(failed("handshake", "an SRTP profile we did not offer"));
        };
        let mut material = vec![0u8; profile.keying_material_len()];
        ssl.export_keying_material(&mut material, "EXTRACTOR-dtls_srtp", None)
            .map_err(|e| failed("keying", e))?;
        self.events.push_back(Event::Connected);
        self.events.push_back(Event::PeerCert(peer));
        self.events
            .push_back(Event::Keying(KeyingMaterial::new(&material), profile));
        Ok(())
    }

    fn read_data(&mut self) -> Result<(), DtlsImplError> {
        let State::Connected(stream) = &mut self.state else {
            return Ok(());
        };
        let mut buf = vec![0u8; 16_384];
        loop {
            match stream.ssl_read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => self.events.push_back(Event::Data(buf[..n].to_vec())),
                Err(e) if e.code() == ErrorCode::WANT_READ => return Ok(()),
                Err(e) if e.code() == ErrorCode::ZERO_RETURN => {
                    self.events.push_back(Event::CloseNotify);
                    return Ok(());
                }
                Err(e) => return Err(failed("read", e)),
            }
        }
    }

    /// The datagram queues, in whichever state.
    fn io(&mut self) -> &mut Datagrams {
        match &mut self.state {
            State::Idle(d) | State::Failed(d) => d,
            State::Handshaking(s) | State::Connected(s) => s.get_mut(),
        }
    }

    fn io_ref(&self) -> &Datagrams {
        match &self.state {
            State::Idle(d) | State::Failed(d) => d,
            State::Handshaking(s) | State::Connected(s) => s.get_ref(),
        }
    }
}

impl DtlsInstance for OpensslInstance {
    fn set_active(&mut self, active: bool) {
        self.active = active;
        if matches!(self.state, State::Idle(_)) {
            if let Err(e) = self.start() {
                tracing::warn!(error = ?e, "DTLS (OpenSSL) did not start");
            }
        }
    }

    fn handle_packet(&mut self, packet: &[u8]) -> Result<(), DtlsImplError> {
        if packet.is_empty() {
            // str0m nudges with an empty packet; to OpenSSL a read of
            // nothing would be the end of the stream.
            return self.progress();
        }
        if matches!(self.state, State::Failed(_)) {
            return Err(DtlsImplError::ConnectionClosed);
        }
        let incoming = &mut self.io().incoming;
        if incoming.len() < QUEUE {
            incoming.push_back(packet.to_vec());
        }
        // Before a role is set, they wait for it.
        self.progress()
    }

    fn poll_output<'a>(&mut self, buf: &'a mut [u8]) -> DtlsOutput<'a> {
        if let Some(d) = self.io().outgoing.pop_front() {
            if d.len() > buf.len() {
                let needed = d.len();
                // Keep it for a retry with a bigger buffer.
                self.io().outgoing.push_front(d);
                return DtlsOutput::BufferTooSmall { needed };
            }
            buf[..d.len()].copy_from_slice(&d);
            return DtlsOutput::Packet(&buf[..d.len()]);
        }
        match self.events.pop_front() {
            Some(Event::Connected) => DtlsOutput::Connected,
            Some(Event::PeerCert(der)) => {
                let n = der.len().min(buf.len());
                buf[..n].copy_from_slice(&der[..n]);
                DtlsOutput::PeerCert(&buf[..n])
            }
            Some(Event::Keying(m, p)) => DtlsOutput::KeyingMaterial(m, p),
            Some(Event::Data(d)) => {
                let n = d.len().min(buf.len());
                buf[..n].copy_from_slice(&d[..n]);
                DtlsOutput::ApplicationData(&buf[..n])
            }
            Some(Event::CloseNotify) => DtlsOutput::CloseNotify,
            None => DtlsOutput::Timeout(self.next_tick),
        }
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<(), DtlsImplError> {
        if now < self.next_tick {
            return Ok(());
        }
        // Once the handshake is over there is nothing to resend.
        let settled = matches!(self.state, State::Connected(_) | State::Failed(_));
        self.next_tick = now
            + if settled {
                SETTLED_TICK
            } else {
                HANDSHAKE_TICK
            };
        if matches!(self.state, State::Handshaking(_)) {
            // OpenSSL resends a flight whose timer ran out when it next
            // runs the handshake.
            return self.progress();
        }
        Ok(())
    }

    fn send_application_data(&mut self, data: &[u8]) -> Result<usize, DtlsImplError> {
        let State::Connected(s) = &mut self.state else {
            return Ok(0);
        };
        match s.ssl_write(data) {
            Ok(n) => Ok(n),
            Err(e) if e.code() == ErrorCode::WANT_WRITE => Ok(0),
            Err(e) => Err(failed("write", e)),
        }
    }

    fn is_active(&self) -> bool {
        self.active
    }

    fn protocol_version(&self) -> Option<ProtocolVersion> {
        matches!(self.state, State::Connected(_)).then_some(ProtocolVersion::DTLS1_2)
    }

    fn is_closing(&self) -> bool {
        self.closing
    }

    fn is_closed(&self) -> bool {
        self.closing && self.io_ref().outgoing.is_empty()
    }

    fn close(&mut self) -> Result<(), DtlsImplError> {
        self.closing = true;
        if let State::Connected(s) = &mut self.state {
            let _ = s.shutdown();
        }
        Ok(())
    }
}

impl std::fmt::Debug for OpensslInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpensslInstance")
            .field("active", &self.active)
            .finish()
    }
}
