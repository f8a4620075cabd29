//! The SFU's join API, from the device: post the offer with the room
//! token signaling gave, take the answer; delete the participant's
//! resource on leaving.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum SfuError {
    #[error("cannot reach the SFU: {0}")]
    Connect(String),
    #[error("the SFU refused ({status}): {reason}")]
    Refused { status: u16, reason: String },
}

/// A join's answer, and the resource to delete on leaving.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    pub answer: String,
    pub resource: String,
}

/// The SFU's HTTPS API at one address.
#[derive(Clone)]
pub struct SfuClient {
    addr: SocketAddr,
    server_name: rustls::pki_types::ServerName<'static>,
    tls: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for SfuClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SfuClient")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl SfuClient {
    /// The SFU at `addr`, whose certificate names `server_name` and
    /// chains to `roots`.
    pub fn new(
        addr: SocketAddr,
        server_name: &str,
        roots: rustls::RootCertStore,
    ) -> Result<SfuClient, SfuError> {
        let server_name = rustls::pki_types::ServerName::try_from(server_name.to_owned())
            .map_err(|e| SfuError::Connect(format!("server name {server_name}: {e}")))?;
        let tls =
            crate::ids::tls_connector(roots, None).map_err(|e| SfuError::Connect(e.to_string()))?;
        Ok(SfuClient {
            addr,
            server_name,
            tls,
        })
    }

    /// Joins `room` with `offer` (SDP).
    pub async fn join(&self, room: &str, token: &str, offer: &str) -> Result<Joined, SfuError> {
        let (status, location, body) = self
            .send(
                "POST",
                &format!("/v1/rooms/{room}/participants"),
                token,
                Some(offer),
            )
            .await?;
        if status != 201 {
            return Err(SfuError::Refused {
                status,
                reason: body.trim().to_string(),
            });
        }
        let resource = location.ok_or_else(|| SfuError::Refused {
            status,
            reason: "no participant resource in the answer".into(),
        })?;
        Ok(Joined {
            answer: body,
            resource,
        })
    }

    /// Leaves: `resource` is [`Joined::resource`].
    pub async fn leave(&self, resource: &str, token: &str) -> Result<(), SfuError> {
        let (status, _, body) = self.send("DELETE", resource, token, None).await?;
        match status {
            204 | 404 => Ok(()),
            _ => Err(SfuError::Refused {
                status,
                reason: body.trim().to_string(),
            }),
        }
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        token: &str,
        sdp: Option<&str>,
    ) -> Result<(u16, Option<String>, String), SfuError> {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string())
            .header("authorization", format!("Bearer {token}"));
        if sdp.is_some() {
            req = req.header("content-type", "application/sdp");
        }
        let body = Bytes::from(sdp.unwrap_or_default().to_owned());
        let req = req
            .body(Full::new(body))
            .map_err(|e| SfuError::Connect(e.to_string()))?;
        let (status, headers, body) = crate::ids::one_request(
            &self.tls,
            self.addr,
            self.server_name.clone(),
            req,
            REQUEST_TIMEOUT,
        )
        .await
        .map_err(SfuError::Connect)?;
        let location = headers
            .get("location")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Ok((
            status,
            location,
            String::from_utf8_lossy(&body).into_owned(),
        ))
    }
}
