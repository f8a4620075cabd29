//! Server TLS over TCP on rustls' unbuffered API, for device links.
//!
//! rustls' buffered connection (what tokio-rustls drives) keeps a 4 KiB
//! read buffer for its whole life, allocated while a read is pending, so
//! every idle device link held one: a third of its memory. Here the
//! received, decrypted and outgoing bytes live in buffers that are freed
//! whenever they are empty; an idle link holds none.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 4096;
/// Encrypted bytes a writer may queue before `poll_write` waits for the
/// socket.
const MAX_QUEUED: usize = 64 * 1024;

/// A TLS server stream; see the module documentation.
pub struct LeanTls {
    tcp: TcpStream,
    conn: UnbufferedServerConnection,
    /// TLS bytes received and not yet processed.
    incoming: Vec<u8>,
    /// Application data decrypted and not yet read, from `plain_at`.
    plain: Vec<u8>,
    plain_at: usize,
    /// TLS bytes to send, from `sent`.
    outgoing: Vec<u8>,
    sent: usize,
    /// The peer sent close_notify, or the socket reached its end.
    peer_done: bool,
    /// Both sides closed: nothing more can be sent.
    closed: bool,
}

/// Runs the server side of a TLS handshake on `tcp`.
pub async fn accept(tcp: TcpStream, config: Arc<ServerConfig>) -> io::Result<LeanTls> {
    let conn = UnbufferedServerConnection::new(config).map_err(tls_err)?;
    let mut t = LeanTls {
        tcp,
        conn,
        incoming: Vec::new(),
        plain: Vec::new(),
        plain_at: 0,
        outgoing: Vec::new(),
        sent: 0,
        peer_done: false,
        closed: false,
    };
    loop {
        t.drive(None)?;
        poll_fn(|cx| t.poll_send(cx)).await?;
        if !t.conn.is_handshaking() {
            return Ok(t);
        }
        if t.closed || t.peer_done {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed during the TLS handshake",
            ));
        }
        poll_fn(|cx| t.poll_receive(cx)).await?;
    }
}

fn encrypt_room(e: &EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(s) => Some(s.required_size),
        _ => None,
    }
}

fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Fills `out`'s tail with `f`, growing it when `f` says it needs more.
fn append<E>(
    out: &mut Vec<u8>,
    guess: usize,
    mut f: impl FnMut(&mut [u8]) -> Result<usize, E>,
    needed: impl Fn(&E) -> Option<usize>,
) -> Result<(), E> {
    let start = out.len();
    let mut room = guess;
    loop {
        out.resize(start + room, 0);
        match f(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(e) => match needed(&e) {
                Some(n) if n > room => room = n,
                _ => {
                    out.truncate(start);
                    return Err(e);
                }
            },
        }
    }
}

impl LeanTls {
    /// The peer's certificate chain, once the handshake is over.
    pub fn peer_certificates(&self) -> Option<&[rustls::pki_types::CertificateDer<'static>]> {
        self.conn.peer_certificates()
    }

    /// Processes what was received, queuing what must be sent; with
    /// `write`, also encrypts that application data. Returns whether it
    /// was written (only once the handshake allows application data).
    fn drive(&mut self, mut write: Option<&[u8]>) -> io::Result<bool> {
        let mut wrote = false;
        loop {
            let UnbufferedStatus { mut discard, state } =
                self.conn.process_tls_records(&mut self.incoming);
            let mut again = true;
            match state.map_err(tls_err)? {
                ConnectionState::ReadTraffic(mut r) => {
                    while let Some(rec) = r.next_record() {
                        let rec = rec.map_err(tls_err)?;
                        discard += rec.discard;
                        self.plain.extend_from_slice(rec.payload);
                    }
                }
                ConnectionState::EncodeTlsData(mut e) => {
                    append(
                        &mut self.outgoing,
                        1024,
                        |b| e.encode(b),
                        |e| match e {
                            EncodeError::InsufficientSize(s) => Some(s.required_size),
                            _ => None,
                        },
                    )
                    .map_err(|e| io::Error::other(format!("TLS encode: {e}")))?;
                }
                ConnectionState::TransmitTlsData(t) => {
                    // The bytes are queued in `outgoing`, sent in order
                    // before anything encoded later.
                    t.done();
                }
                ConnectionState::PeerClosed => self.peer_done = true,
                ConnectionState::Closed => {
                    self.peer_done = true;
                    self.closed = true;
                    again = false;
                }
                ConnectionState::BlockedHandshake => again = false,
                ConnectionState::WriteTraffic(mut w) => {
                    if let Some(data) = write.take() {
                        append(
                            &mut self.outgoing,
                            data.len() + 64,
                            |b| w.encrypt(data, b),
                            encrypt_room,
                        )
                        .map_err(|e| io::Error::other(format!("TLS encrypt: {e}")))?;
                        wrote = true;
                    }
                    again = false;
                }
                ConnectionState::ReadEarlyData(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "early data is not accepted",
                    ))
                }
                _ => {
                    return Err(io::Error::other("unexpected TLS connection state"));
                }
            }
            self.incoming.drain(..discard);
            if self.incoming.is_empty() {
                self.incoming = Vec::new();
            }
            if !again {
                return Ok(wrote);
            }
        }
    }

    /// Sends everything queued.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.outgoing[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.outgoing = Vec::new();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Reads what the socket has into `incoming`; at its end, marks the
    /// peer done.
    fn poll_receive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.tcp.poll_read_ready(cx))?;
            let start = self.incoming.len();
            self.incoming.resize(start + READ_CHUNK, 0);
            match self.tcp.try_read(&mut self.incoming[start..]) {
                Ok(n) => {
                    self.incoming.truncate(start + n);
                    if n == 0 {
                        self.peer_done = true;
                    }
                    return Poll::Ready(Ok(()));
                }
                Err(e) => {
                    self.incoming.truncate(start);
                    if self.incoming.is_empty() {
                        self.incoming = Vec::new();
                    }
                    if e.kind() != io::ErrorKind::WouldBlock {
                        return Poll::Ready(Err(e));
                    }
                }
            }
        }
    }
}

impl AsyncRead for LeanTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let t = self.get_mut();
        loop {
            if t.plain_at < t.plain.len() {
                let n = buf.remaining().min(t.plain.len() - t.plain_at);
                buf.put_slice(&t.plain[t.plain_at..t.plain_at + n]);
                t.plain_at += n;
                if t.plain_at == t.plain.len() {
                    t.plain = Vec::new();
                    t.plain_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if t.peer_done {
                return Poll::Ready(Ok(()));
            }
            ready!(t.poll_receive(cx))?;
            t.drive(None)?;
            // Whatever reading produced (alerts, key updates) goes out now
            // if the socket takes it, else with the next write or flush.
            if let Poll::Ready(Err(e)) = t.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
        }
    }
}

impl AsyncWrite for LeanTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let t = self.get_mut();
        if t.outgoing.len() - t.sent >= MAX_QUEUED {
            ready!(t.poll_send(cx))?;
        }
        if t.closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if !t.drive(Some(data))? {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "TLS is not ready for application data",
            )));
        }
        if let Poll::Ready(Err(e)) = t.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let t = self.get_mut();
        ready!(t.poll_send(cx))?;
        Pin::new(&mut t.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let t = self.get_mut();
        if !t.closed {
            t.closed = true;
            if let ConnectionState::WriteTraffic(mut w) = t
                .conn
                .process_tls_records(&mut [][..])
                .state
                .map_err(tls_err)?
            {
                let _ = append(
                    &mut t.outgoing,
                    64,
                    |b| w.queue_close_notify(b),
                    encrypt_room,
                );
            }
        }
        ready!(t.poll_send(cx))?;
        Pin::new(&mut t.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn configs() -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let der = CertificateDer::from(cert.cert.der().to_vec());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![der.clone()], key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    /// A lean server and a tokio-rustls client over loopback.
    async fn pair() -> (LeanTls, tokio_rustls::client::TlsStream<TcpStream>) {
        let (server, client) = configs();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            accept(tcp, server).await.unwrap()
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let c = tokio_rustls::TlsConnector::from(client)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        (accept.await.unwrap(), c)
    }

    fn holds_nothing(t: &LeanTls) -> bool {
        t.incoming.capacity() == 0 && t.plain.capacity() == 0 && t.outgoing.capacity() == 0
    }

    #[tokio::test]
    async fn carries_data_both_ways_and_idles_with_no_buffers() {
        let within = Duration::from_secs(10);
        let (mut s, mut c) = pair().await;
        // Larger than a TLS record (16 KiB) and than one read chunk.
        let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let sent = big.clone();
        let writer = tokio::spawn(async move {
            c.write_all(&sent).await.unwrap();
            c.flush().await.unwrap();
            c
        });
        let mut got = vec![0u8; big.len()];
        tokio::time::timeout(within, s.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, big);
        let mut c = writer.await.unwrap();
        s.write_all(&big).await.unwrap();
        s.flush().await.unwrap();
        let mut back = vec![0u8; big.len()];
        tokio::time::timeout(within, c.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, big);
        assert!(holds_nothing(&s), "an idle stream keeps no buffers");

        // The client closes cleanly: the server reads its end.
        c.shutdown().await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(within, s.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn a_server_shutdown_reaches_the_client_as_a_clean_end() {
        let (mut s, mut c) = pair().await;
        s.write_all(b"bye").await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut got))
            .await
            .unwrap()
            .expect("close_notify, not a truncation");
        assert_eq!(got, b"bye");
    }

    #[tokio::test]
    async fn a_peer_that_is_not_tls_is_refused() {
        let (server, _) = configs();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let (srv, _) = listener.accept().await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let r = tokio::time::timeout(Duration::from_secs(10), accept(srv, server))
            .await
            .unwrap();
        assert!(r.is_err());
        drop(tcp);
    }
}
