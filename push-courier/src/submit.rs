//! Pushes from Parley's own services on other machines: in a cluster a
//! stand-alone signaling node wakes sleeping devices, and a stand-alone
//! identity service tells an account's devices of changes, through the
//! courier nodes over NATS rather than a provider API.
//!
//! The sender publishes a request on [`SUBJECT`]; every courier node
//! listens in one queue group, so exactly one takes it, runs it through
//! [`Courier::push`] (which forwards it to the owner of the device's
//! shard) and answers once the push is durable. The request names the
//! device the push is for ([`PushRequest::for_device`]): a token that is
//! not that device's own reaches nobody, as in one process. NATS must be
//! private to the cluster: whoever can publish here can wake devices.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use wire::push::{DeviceToken, NotificationId, PushType};
use wire::DeviceId;

use crate::courier::{Courier, PushRequest, Woken};
use wire::push::Platform;

/// Where services hand pushes to the courier cluster.
pub const SUBJECT: &str = "parley.courier.submit";
/// Where signaling hands wake-ups through a platform token
/// ([`Courier::wake_platform`]).
pub const WAKE_SUBJECT: &str = "parley.courier.wake";
/// The courier nodes' queue group on [`SUBJECT`].
const GROUP: &str = "couriers";
/// How long a sender waits for a courier node.
const TIMEOUT: Duration = Duration::from_secs(3);

/// A push as it crosses NATS.
#[derive(Debug, Serialize, Deserialize)]
struct Submission {
    id: String,
    token: String,
    push_type: String,
    priority: u8,
    expires: u64,
    collapse_id: String,
    topic: Option<String>,
    /// Base64.
    payload: String,
    provider: String,
    for_device: String,
}

/// A call's wake-up through a platform token, as it crosses NATS.
#[derive(Debug, Serialize, Deserialize)]
struct PlatformWake {
    device: String,
    platform: String,
    token: String,
    expires: i64,
}

#[derive(Debug, Serialize, Deserialize)]
enum WakeAnswer {
    Woken(String),
    Refused(String),
}

fn woken_name(w: Woken) -> &'static str {
    match w {
        Woken::Accepted => "accepted",
        Woken::Pending => "pending",
        Woken::Gone => "gone",
        Woken::Failed => "failed",
    }
}

/// Hands a call's wake-up through `device`'s platform token to the
/// courier cluster; what the platform said first, if it answered quickly.
pub async fn wake(
    nats: &async_nats::Client,
    device: DeviceId,
    platform: Platform,
    token: &str,
    expires: i64,
) -> Result<Woken, SubmitError> {
    let msg = PlatformWake {
        device: device.to_string(),
        platform: platform.as_str().into(),
        token: token.into(),
        expires,
    };
    let body = serde_json::to_vec(&msg).unwrap_or_default();
    // The courier waits a little for the platform's first answer.
    let reply = tokio::time::timeout(2 * TIMEOUT, nats.request(WAKE_SUBJECT, body.into()))
        .await
        .map_err(|_| SubmitError::Unreachable("timed out".into()))?
        .map_err(|e| SubmitError::Unreachable(e.to_string()))?;
    match serde_json::from_slice::<WakeAnswer>(&reply.payload) {
        Ok(WakeAnswer::Woken(w)) => [Woken::Accepted, Woken::Pending, Woken::Gone, Woken::Failed]
            .into_iter()
            .find(|x| woken_name(*x) == w)
            .ok_or_else(|| SubmitError::Unreachable("malformed answer".into())),
        Ok(WakeAnswer::Refused(why)) => Err(SubmitError::Refused(why)),
        Err(_) => Err(SubmitError::Unreachable("malformed answer".into())),
    }
}

#[derive(Debug, Serialize, Deserialize)]
enum Answer {
    Accepted,
    /// The token is unknown, another device's, or revoked.
    Gone(String),
    Refused(String),
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("a push between services must name its device")]
    NoDevice,
    #[error("no courier node answered: {0}")]
    Unreachable(String),
    #[error("the courier refused the push: {0}")]
    Refused(String),
    /// The token is unknown, not the named device's, or revoked: whoever
    /// holds it will not be reached through it.
    #[error("the token is gone: {0}")]
    Gone(String),
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

impl Submission {
    fn of(req: &PushRequest) -> Result<Submission, SubmitError> {
        let device = req.for_device.ok_or(SubmitError::NoDevice)?;
        Ok(Submission {
            id: req.id.to_uuid(),
            token: req.token.to_hex(),
            push_type: req.push_type.as_str().into(),
            priority: req.priority,
            expires: req.expires,
            collapse_id: req.collapse_id.clone(),
            topic: req.topic.clone(),
            payload: b64().encode(&req.payload),
            provider: req.provider.clone(),
            for_device: device.to_string(),
        })
    }

    fn request(self) -> Option<PushRequest> {
        Some(PushRequest {
            id: NotificationId::from_uuid(&self.id)?,
            token: DeviceToken::from_hex(&self.token)?,
            push_type: PushType::from_apns(&self.push_type)?,
            priority: self.priority,
            expires: self.expires,
            now_or_never: false,
            collapse_id: self.collapse_id,
            topic: self.topic,
            payload: b64().decode(&self.payload).ok()?,
            provider: self.provider,
            vapid_key: None,
            receipt: None,
            for_device: Some(self.for_device.parse::<DeviceId>().ok()?),
            operator_granted: false,
        })
    }
}

/// Hands `req` to the courier cluster; `Ok` once a node stored it.
pub async fn submit(nats: &async_nats::Client, req: &PushRequest) -> Result<(), SubmitError> {
    let body = serde_json::to_vec(&Submission::of(req)?).unwrap_or_default();
    let reply = tokio::time::timeout(TIMEOUT, nats.request(SUBJECT, body.into()))
        .await
        .map_err(|_| SubmitError::Unreachable("timed out".into()))?
        .map_err(|e| SubmitError::Unreachable(e.to_string()))?;
    match serde_json::from_slice::<Answer>(&reply.payload) {
        Ok(Answer::Accepted) => Ok(()),
        Ok(Answer::Refused(why)) => Err(SubmitError::Refused(why)),
        Ok(Answer::Gone(why)) => Err(SubmitError::Gone(why)),
        Err(_) => Err(SubmitError::Unreachable("malformed answer".into())),
    }
}

/// This node's part: takes submissions and wake-ups from the queue group
/// until the subscriptions end.
pub(crate) async fn serve(courier: Arc<Courier>, nats: async_nats::Client) {
    let c = courier.clone();
    tokio::spawn(respond(
        nats.clone(),
        WAKE_SUBJECT,
        "wake-ups from signaling",
        move |body| take_wake(c.clone(), body),
    ));
    respond(nats, SUBJECT, "pushes from other services", move |body| {
        take_push(courier.clone(), body)
    })
    .await
}

/// Answers each request on `subject` in the couriers' queue group, in a
/// task of its own, with what `answer` makes of its body.
async fn respond<A, F, Fut>(
    nats: async_nats::Client,
    subject: &'static str,
    what: &'static str,
    answer: F,
) where
    A: Serialize + Send,
    F: Fn(bytes::Bytes) -> Fut,
    Fut: std::future::Future<Output = A> + Send + 'static,
{
    let mut sub = match nats.queue_subscribe(subject, GROUP.into()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot take {what}");
            return;
        }
    };
    while let Some(m) = sub.next().await {
        let (nats, answer) = (nats.clone(), answer(m.payload));
        tokio::spawn(async move {
            let answer = answer.await;
            if let Some(to) = m.reply {
                let body = serde_json::to_vec(&answer).unwrap_or_default();
                let _ = nats.publish(to, body.into()).await;
            }
        });
    }
}

async fn take_wake(courier: Arc<Courier>, body: bytes::Bytes) -> WakeAnswer {
    let parsed = serde_json::from_slice::<PlatformWake>(&body)
        .ok()
        .and_then(|w| {
            Some((
                w.device.parse::<DeviceId>().ok()?,
                Platform::parse(&w.platform)?,
                w.token,
                w.expires,
            ))
        });
    let Some((device, platform, token, expires)) = parsed else {
        return WakeAnswer::Refused("malformed wake-up".into());
    };
    match courier
        .wake_platform(device, platform, &token, expires)
        .await
    {
        Ok(w) => WakeAnswer::Woken(woken_name(w).into()),
        Err(e) => WakeAnswer::Refused(e.to_string()),
    }
}

async fn take_push(courier: Arc<Courier>, body: bytes::Bytes) -> Answer {
    let Some(req) = serde_json::from_slice::<Submission>(&body)
        .ok()
        .and_then(Submission::request)
    else {
        return Answer::Refused("malformed push".into());
    };
    match courier.push(req).await {
        Ok(_) => Answer::Accepted,
        Err(
            e @ (crate::courier::PushError::UnknownToken
            | crate::courier::PushError::Unregistered { .. }),
        ) => Answer::Gone(e.to_string()),
        Err(e) => Answer::Refused(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_submission_carries_every_field_across() {
        let req = PushRequest {
            id: NotificationId([7; 16]),
            token: DeviceToken([9; 32]),
            push_type: PushType::Voip,
            priority: 10,
            expires: 1_800_000_000,
            now_or_never: false,
            collapse_id: "call-1".into(),
            topic: Some("com.example.app.voip".into()),
            payload: b"{\"aps\":{}}".to_vec(),
            provider: "signaling".into(),
            vapid_key: None,
            receipt: None,
            for_device: Some(DeviceId([3; 16])),
            operator_granted: false,
        };
        let wire = serde_json::to_vec(&Submission::of(&req).unwrap()).unwrap();
        let back = serde_json::from_slice::<Submission>(&wire)
            .unwrap()
            .request()
            .unwrap();
        assert_eq!(format!("{back:?}"), format!("{req:?}"));
        let anonymous = PushRequest {
            for_device: None,
            operator_granted: false,
            ..req
        };
        assert!(matches!(
            Submission::of(&anonymous),
            Err(SubmitError::NoDevice)
        ));
    }
}
