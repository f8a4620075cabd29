//! SIP over secure WebSocket (RFC 7118): TLS, then an HTTP upgrade that
//! must offer the `sip` subprotocol; each WebSocket message is one whole
//! SIP message, sent as text.

use crate::core::flow::{Source, Transport};
use crate::core::message::MAX_MESSAGE;
use crate::runtime::{Input, Shared};
use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::{Message as WsMessage, WebSocketConfig};

/// RFC 7118 §4.1: the subprotocol both sides must agree on.
const SUBPROTOCOL: &str = "sip";

pub(crate) async fn accept_loop(
    listener: TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
) {
    let mut stop = shared.shutdown.clone();
    while let Some((stream, remote, permit)) =
        crate::runtime::accept_next(&listener, &shared, &mut stop).await
    {
        let shared = shared.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let upgrade = async {
                let stream = tls.accept(stream).await.ok()?;
                let device = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| wire::device_cert::identity(c.as_ref()))
                    .map(|i| i.device);
                let config = WebSocketConfig {
                    max_message_size: Some(MAX_MESSAGE),
                    max_frame_size: Some(MAX_MESSAGE),
                    ..WebSocketConfig::default()
                };
                let ws = tokio_tungstenite::accept_hdr_async_with_config(
                    stream,
                    choose_sip,
                    Some(config),
                )
                .await
                .ok()?;
                Some((ws, device))
            };
            let Ok(Some((ws, device))) =
                tokio::time::timeout(Duration::from_secs(10), upgrade).await
            else {
                tracing::debug!(%remote, "WebSocket handshake failed");
                return;
            };
            let (flow, tx, mut rx) = shared.open_conn(Transport::Wss, remote);
            let (mut sink, mut stream) = ws.split();
            let writer = tokio::spawn(async move {
                while let Some(b) = rx.recv().await {
                    let msg = match String::from_utf8(b) {
                        Ok(text) => WsMessage::Text(text),
                        Err(e) => WsMessage::Binary(e.into_bytes()),
                    };
                    if sink.send(msg).await.is_err() {
                        break;
                    }
                }
                let _ = sink.close().await;
            });
            let mut stop = shared.shutdown.clone();
            // As on TCP: without a device certificate, a short time to send
            // a first message before the idle timeout applies.
            let mut proven = device.is_some();
            loop {
                let wait = if proven {
                    shared.idle_timeout
                } else {
                    shared.first_message_timeout
                };
                let next = tokio::select! {
                    n = tokio::time::timeout(wait, stream.next()) => n,
                    _ = stop.changed() => break,
                };
                let bytes = match next {
                    Ok(Some(Ok(WsMessage::Text(t)))) => t.into_bytes(),
                    Ok(Some(Ok(WsMessage::Binary(b)))) => b,
                    // Pings are answered by the library; pongs just count
                    // as life.
                    Ok(Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_)))) => continue,
                    _ => break,
                };
                proven = true;
                let source = Source { flow, device };
                if shared
                    .inputs
                    .send(Input::Message(source, bytes))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            drop(tx);
            shared.close_conn(flow, writer).await;
        });
    }
}

/// Accepts the upgrade only if the client offers `sip` (RFC 7118 §4.1),
/// and says so in the response.
// The signature is tungstenite's handshake callback; the large error type
// is its HTTP response.
#[allow(clippy::result_large_err)]
fn choose_sip(req: &Request, mut resp: Response) -> Result<Response, ErrorResponse> {
    let offered = req
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case(SUBPROTOCOL));
    if !offered {
        let mut refuse =
            ErrorResponse::new(Some("the sip WebSocket subprotocol is required".into()));
        *refuse.status_mut() = tokio_tungstenite::tungstenite::http::StatusCode::BAD_REQUEST;
        return Err(refuse);
    }
    resp.headers_mut().insert(
        "sec-websocket-protocol",
        tokio_tungstenite::tungstenite::http::HeaderValue::from_static(SUBPROTOCOL),
    );
    Ok(resp)
}
