//! TURN over TCP or TLS, for networks that block UDP (RFC 8656 §3.1):
//! the runtime's half of [`crate::turn`] on a stream. One connection to
//! the TURN server carries the client's requests and its ChannelData and
//! Send indications; what comes back is cut into STUN messages and
//! ChannelData frames (§12.5) and handed on one at a time, as datagrams
//! from the server would be.
//!
//! TLS is `turns:`: the server's certificate is checked against the
//! deployment's roots, with ALPN `stun.turn` (RFC 7443).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::turn::Transport;

/// How long connecting (and the TLS handshake) may take.
const CONNECT_WITHIN: Duration = Duration::from_secs(5);
/// Frames queued each way; media beyond this is dropped, as a full
/// socket buffer would.
const QUEUE: usize = 1024;
/// The largest frame: a STUN message or ChannelData of up to 64 KiB and
/// its padding.
const MAX_FRAME: usize = 4 + 65_535 + 3;

/// Where a `turns:` connection goes: the TLS configuration (the
/// deployment's roots) and the name the server's certificate must carry.
#[derive(Clone)]
pub struct TlsTo {
    pub config: Arc<rustls::ClientConfig>,
    pub name: ServerName<'static>,
}

impl TlsTo {
    /// TLS 1.3, as on the device's other links ([`crate::ids::tls_client`]),
    /// the server checked against `roots` as `name`.
    pub fn new(roots: rustls::RootCertStore, name: &str) -> std::io::Result<TlsTo> {
        let mut config = crate::ids::tls_client(roots, None).map_err(std::io::Error::other)?;
        config.alpn_protocols = vec![b"stun.turn".to_vec()];
        let name = ServerName::try_from(name.to_owned()).map_err(std::io::Error::other)?;
        Ok(TlsTo {
            config: Arc::new(config),
            name,
        })
    }
}

impl std::fmt::Debug for TlsTo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsTo").field("name", &self.name).finish()
    }
}

/// The sending half: frames for the server. Cheap to clone; the
/// connection closes once every sender and the receiving half are gone.
#[derive(Clone, Debug)]
pub struct StreamSender {
    server: SocketAddr,
    out: mpsc::Sender<Vec<u8>>,
}

impl StreamSender {
    /// The TURN server this stream goes to.
    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// Queues one frame (what [`crate::turn::TurnClient`] gave to send);
    /// false if the stream is gone or its queue is full.
    pub fn send(&self, frame: &[u8]) -> bool {
        self.out.try_send(frame.to_vec()).is_ok()
    }
}

/// Connects to the TURN server at `server` over `transport` (TCP, or TLS
/// with `tls`) and returns the sending half and the frames that arrive;
/// the receiver ends when the connection does.
pub async fn connect(
    server: SocketAddr,
    transport: Transport,
    tls: Option<&TlsTo>,
) -> std::io::Result<(StreamSender, mpsc::Receiver<Vec<u8>>)> {
    let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, "TURN server");
    let tcp = tokio::time::timeout(CONNECT_WITHIN, TcpStream::connect(server))
        .await
        .map_err(|_| timed_out())??;
    let _ = tcp.set_nodelay(true);
    let (out_tx, out_rx) = mpsc::channel(QUEUE);
    let (in_tx, in_rx) = mpsc::channel(QUEUE);
    match (transport, tls) {
        (Transport::Udp, _) => {
            return Err(std::io::Error::other("TURN over UDP has no stream"));
        }
        (Transport::Tcp, _) => run(tcp, out_rx, in_tx),
        (Transport::Tls, None) => {
            return Err(std::io::Error::other(
                "TURN over TLS without a TLS configuration",
            ));
        }
        (Transport::Tls, Some(t)) => {
            let connector = tokio_rustls::TlsConnector::from(t.config.clone());
            let stream =
                tokio::time::timeout(CONNECT_WITHIN, connector.connect(t.name.clone(), tcp))
                    .await
                    .map_err(|_| timed_out())??;
            run(stream, out_rx, in_tx);
        }
    }
    Ok((
        StreamSender {
            server,
            out: out_tx,
        },
        in_rx,
    ))
}

/// One task writes what is queued; another cuts what comes in into
/// frames. Either ends the connection when its side goes.
fn run<S>(stream: S, mut out: mpsc::Receiver<Vec<u8>>, incoming: mpsc::Sender<Vec<u8>>)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    tokio::spawn(async move {
        while let Some(frame) = out.recv().await {
            if wr.write_all(&frame).await.is_err() {
                return;
            }
        }
        let _ = wr.shutdown().await;
    });
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2 * MAX_FRAME];
        let mut filled = 0;
        loop {
            let n = tokio::select! {
                r = rd.read(&mut buf[filled..]) => match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                },
                _ = incoming.closed() => return,
            };
            filled += n;
            let mut start = 0;
            while let Ok(Some(len)) = stun_turn::message::stream_frame_len(&buf[start..filled]) {
                // A full queue drops the frame, as a full socket would.
                if let Err(mpsc::error::TrySendError::Closed(_)) =
                    incoming.try_send(buf[start..start + len].to_vec())
                {
                    return;
                }
                start += len;
            }
            // Neither STUN nor ChannelData: the stream is out of step.
            if stun_turn::message::stream_frame_len(&buf[start..filled]).is_err() {
                tracing::debug!("the TURN stream carried something else; closing it");
                return;
            }
            buf.copy_within(start..filled, 0);
            filled -= start;
        }
    });
}
