//! The device side of the push courier: `parley-push/1` frames.
//!
//! A device holds one TLS 1.3 (TCP) or QUIC connection to the courier,
//! ALPN `parley-push/1`, authenticated by its device certificate. Both
//! directions carry the same framing:
//!
//! ```text
//! frame  = type:u8  length:u16 (big endian)  body[length]      length ≤ 8192
//! str8   = len:u8 UTF-8[len]
//! ```
//!
//! | type | frame | direction | body |
//! |------|-------|-----------|------|
//! | 0x01 | Hello | device → courier | version:u8 (=1), ping interval s:u16 (0 = server's), n:u8 (≤32), topic:str8 × n |
//! | 0x02 | Tokens | courier → device | server ping interval s:u16, n:u8, (topic:str8, token:32) × n |
//! | 0x03 | Subscribe | device → courier | request:u32, topic:str8, application server key: len:u8 (0 or 65) + bytes |
//! | 0x04 | Subscription | courier → device | request:u32, token:32, endpoint: len:u16 + UTF-8 |
//! | 0x05 | Revoke | device → courier | token:32 |
//! | 0x06 | Notification | courier → device | id:16, token:32, push type:u8, priority:u8, expires unix s:u64 (0 = none), collapse:str8, topic:str8, payload: len:u16 + bytes |
//! | 0x07 | Ack | device → courier | n:u8 (1..=64), id:16 × n |
//! | 0x08 | Ping | either | opaque:u64 |
//! | 0x09 | Pong | either | the ping's opaque:u64 |
//! | 0x0a | Close | courier → device | reason:u8, text:str8 |
//! | 0x0b | Platform | device → courier | request:u32, platform:u8 (1 APNs, 2 FCM), flags:u8 (1 calls, 2 other pushes, 4 APNs sandbox), topic:str8, token: len:u16 (≤ 4096) + UTF-8, seal-to: len:u8 (0, or 81: P-256 point:65, auth:16) |
//! | 0x0c | PlatformAnswer | courier → device | request:u32, status:u8, text:str8 |
//!
//! After the TLS handshake the device sends Hello; the courier answers with
//! Tokens (one stable token per topic) and then delivers every queued
//! Notification. The device acks each Notification by id once the app has
//! it; unacked notifications are delivered again on the next connection, so
//! a device must drop an id it has already seen. Either side may ping; a
//! peer that hears nothing for two ping intervals considers the link dead.
//!
//! A device that cannot hold the link (an iPhone app in the background)
//! tells the courier its token at Apple's or Google's push service with
//! Platform; while it is away, the courier wakes it through that service
//! with an opaque id, and the device comes back for what waits. An empty
//! token withdraws the device's tokens of that platform and kinds.

use std::fmt;

/// ALPN protocol id of the device link.
pub const ALPN: &[u8] = b"parley-push/1";
/// Protocol version carried in Hello.
pub const VERSION: u8 = 1;
/// Largest frame body.
pub const MAX_BODY: usize = 8192;
/// Frame header: type and length.
pub const HEADER_LEN: usize = 3;
/// Largest number of topics in one Hello.
pub const MAX_TOPICS: usize = 32;
/// Largest number of ids in one Ack.
pub const MAX_ACK_IDS: usize = 64;
/// Largest notification payload (APNs VoIP limit).
pub const MAX_PAYLOAD: usize = 5120;
/// Length of a device token.
pub const TOKEN_LEN: usize = 32;
/// The topic on which a device hears of changes to its own account (a
/// device added or removed, an account reset): background pushes from
/// the identity service, next to the app's own topics.
pub const ACCOUNT_TOPIC: &str = "parley.account";

/// Topics that only Parley's own services push to: VoIP wake-ups for
/// calls (`<app>.voip`, as APNs names VoIP topics; signaling sends them
/// for a call it is routing) and [`ACCOUNT_TOPIC`] (ids). A third-party
/// provider pushing there could ring or wake a device outside any call.
pub fn is_parley_topic(topic: &str) -> bool {
    topic == ACCOUNT_TOPIC || topic.ends_with(".voip")
}

/// A device token: 32 unguessable bytes, one per (device, topic) or per Web
/// Push subscription.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceToken(pub [u8; TOKEN_LEN]);

impl DeviceToken {
    /// Lower-case hex, as APNs tokens are written (64 characters).
    pub fn to_hex(&self) -> String {
        crate::keys::hex(&self.0)
    }

    /// Parses 64 hex digits, either case.
    pub fn from_hex(s: &str) -> Option<DeviceToken> {
        if s.len() != 2 * TOKEN_LEN {
            return None;
        }
        let v = crate::keys::unhex(s)?;
        Some(DeviceToken(v.try_into().ok()?))
    }

    /// Unpadded base64url, as used in Web Push endpoint URLs.
    pub fn to_b64(&self) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.0)
    }

    pub fn from_b64(s: &str) -> Option<DeviceToken> {
        use base64::Engine;
        let v = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .ok()?;
        Some(DeviceToken(v.try_into().ok()?))
    }
}

/// Tokens are capabilities: only a prefix is ever shown.
impl fmt::Debug for DeviceToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceToken({}…)", &self.to_hex()[..8])
    }
}

/// A notification id (the APNs `apns-id` UUID, or a Web Push message id).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NotificationId(pub [u8; 16]);

impl NotificationId {
    /// The canonical UUID form, upper-case as APNs returns it.
    pub fn to_uuid(&self) -> String {
        let mut out = Vec::with_capacity(36);
        for (i, group) in [0..4, 4..6, 6..8, 8..10, 10..16].into_iter().enumerate() {
            if i > 0 {
                out.push(b'-');
            }
            crate::keys::push_hex(&mut out, &self.0[group], true);
        }
        // Only ASCII digits, letters and dashes were pushed.
        String::from_utf8(out).unwrap_or_default()
    }

    /// Parses `8-4-4-4-12` hex digits, either case.
    pub fn from_uuid(s: &str) -> Option<NotificationId> {
        let b = s.as_bytes();
        if b.len() != 36 || [8, 13, 18, 23].iter().any(|&i| b[i] != b'-') {
            return None;
        }
        let hex: String = s.chars().filter(|c| *c != '-').collect();
        if hex.len() != 32 {
            return None;
        }
        let v = crate::keys::unhex(&hex)?;
        Some(NotificationId(v.try_into().ok()?))
    }
}

impl fmt::Debug for NotificationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_uuid())
    }
}

impl fmt::Display for NotificationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_uuid())
    }
}

/// What kind of push a notification is (`apns-push-type`, or Web Push).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PushType {
    Alert,
    Background,
    Voip,
    Complication,
    FileProvider,
    Mdm,
    Location,
    LiveActivity,
    PushToTalk,
    /// An RFC 8030 message; the payload is the (encrypted) request body.
    WebPush,
}

impl PushType {
    pub const ALL: [PushType; 10] = [
        PushType::Alert,
        PushType::Background,
        PushType::Voip,
        PushType::Complication,
        PushType::FileProvider,
        PushType::Mdm,
        PushType::Location,
        PushType::LiveActivity,
        PushType::PushToTalk,
        PushType::WebPush,
    ];

    /// The `apns-push-type` header value.
    pub fn as_str(self) -> &'static str {
        match self {
            PushType::Alert => "alert",
            PushType::Background => "background",
            PushType::Voip => "voip",
            PushType::Complication => "complication",
            PushType::FileProvider => "fileprovider",
            PushType::Mdm => "mdm",
            PushType::Location => "location",
            PushType::LiveActivity => "liveactivity",
            PushType::PushToTalk => "pushtotalk",
            PushType::WebPush => "webpush",
        }
    }

    /// Parses an `apns-push-type` value (Web Push is not one).
    pub fn from_apns(s: &str) -> Option<PushType> {
        PushType::ALL
            .into_iter()
            .find(|t| *t != PushType::WebPush && t.as_str() == s)
    }

    fn code(self) -> u8 {
        PushType::ALL
            .iter()
            .position(|t| *t == self)
            .map(|i| i as u8)
            .unwrap_or(0)
    }

    fn from_code(c: u8) -> Option<PushType> {
        PushType::ALL.get(c as usize).copied()
    }
}

/// Why the courier closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The same device connected again; this connection is replaced.
    Replaced,
    /// The courier is shutting down; reconnect (elsewhere) after a backoff.
    Shutdown,
    /// Nothing heard for two ping intervals.
    Idle,
    /// The device sent something that is not `parley-push/1`.
    Protocol,
    /// The device does not read fast enough; its queue stays stored.
    SlowReader,
    /// The device's certificate was revoked.
    Revoked,
    /// Any other code, for forward compatibility.
    Other(u8),
}

impl CloseReason {
    fn code(self) -> u8 {
        match self {
            CloseReason::Replaced => 1,
            CloseReason::Shutdown => 2,
            CloseReason::Idle => 3,
            CloseReason::Protocol => 4,
            CloseReason::SlowReader => 5,
            CloseReason::Revoked => 6,
            CloseReason::Other(c) => c,
        }
    }

    fn from_code(c: u8) -> CloseReason {
        match c {
            1 => CloseReason::Replaced,
            2 => CloseReason::Shutdown,
            3 => CloseReason::Idle,
            4 => CloseReason::Protocol,
            5 => CloseReason::SlowReader,
            6 => CloseReason::Revoked,
            c => CloseReason::Other(c),
        }
    }
}

/// The platforms' push services a device can be woken through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Platform {
    /// Apple Push Notification service (PushKit VoIP or alert tokens).
    Apns,
    /// Firebase Cloud Messaging (registration tokens).
    Fcm,
}

impl Platform {
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Apns => "apns",
            Platform::Fcm => "fcm",
        }
    }

    /// Parses `apns` or `fcm` (as RFC 8599 `pn-provider` names them).
    pub fn parse(s: &str) -> Option<Platform> {
        match s {
            "apns" => Some(Platform::Apns),
            "fcm" => Some(Platform::Fcm),
            _ => None,
        }
    }

    fn code(self) -> u8 {
        match self {
            Platform::Apns => 1,
            Platform::Fcm => 2,
        }
    }

    fn from_code(c: u8) -> Option<Platform> {
        match c {
            1 => Some(Platform::Apns),
            2 => Some(Platform::Fcm),
            _ => None,
        }
    }
}

/// Longest platform token (FCM registration tokens run to a few hundred
/// characters; APNs tokens are 64 hex digits).
pub const MAX_PLATFORM_TOKEN: usize = 4096;

/// A device's token at a platform's push service, and what it is for.
#[derive(Clone, PartialEq, Eq)]
pub struct PlatformToken {
    pub platform: Platform,
    /// Wakes the device for calls (a PushKit token, or an FCM token).
    pub calls: bool,
    /// Tells the device of other pushes waiting (an APNs alert token, or
    /// an FCM token).
    pub others: bool,
    /// APNs: the token is of the sandbox (development) environment.
    pub sandbox: bool,
    /// APNs: the app's bundle id (VoIP pushes go to `<bundle>.voip`);
    /// FCM: the Firebase project id.
    pub topic: String,
    /// The token; empty to withdraw.
    pub token: String,
    /// Keys a call's wake-up may carry its details sealed to (RFC 8291:
    /// a P-256 public key and a 16-byte auth secret), so the app can show
    /// who calls before it is back on its link; Apple and Google see
    /// ciphertext. `None`: the wake-up carries an opaque id only.
    pub seal_to: Option<SealTo>,
}

/// The device's keys for sealed wake-up details: the `p256dh` and `auth`
/// of an RFC 8291 subscription.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SealTo {
    pub p256dh: [u8; 65],
    pub auth: [u8; 16],
}

impl fmt::Debug for SealTo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealTo(..)")
    }
}

impl PlatformToken {
    const CALLS: u8 = 1;
    const OTHERS: u8 = 2;
    const SANDBOX: u8 = 4;

    fn flags(&self) -> u8 {
        (if self.calls { Self::CALLS } else { 0 })
            | (if self.others { Self::OTHERS } else { 0 })
            | (if self.sandbox { Self::SANDBOX } else { 0 })
    }
}

/// Tokens are capabilities: only a prefix is ever shown.
impl fmt::Debug for PlatformToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let prefix: String = self.token.chars().take(8).collect();
        f.debug_struct("PlatformToken")
            .field("platform", &self.platform)
            .field("calls", &self.calls)
            .field("others", &self.others)
            .field("sandbox", &self.sandbox)
            .field("topic", &self.topic)
            .field("token", &format_args!("{prefix}…"))
            .field("seal_to", &self.seal_to.is_some())
            .finish()
    }
}

/// The courier's answer to [`Frame::Platform`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlatformStatus {
    /// Kept (or withdrawn).
    Ok,
    /// Another device registered this token: a token wakes one device
    /// only, and never one its registrant does not hold.
    Taken,
    /// This courier has no credentials for that platform.
    Unsupported,
    /// Malformed (an APNs token that is not hex, no topic, …).
    Invalid,
    /// Storage is unavailable; try again later.
    Unavailable,
    /// Any other code, for forward compatibility.
    Other(u8),
}

impl PlatformStatus {
    fn code(self) -> u8 {
        match self {
            PlatformStatus::Ok => 0,
            PlatformStatus::Taken => 1,
            PlatformStatus::Unsupported => 2,
            PlatformStatus::Invalid => 3,
            PlatformStatus::Unavailable => 4,
            PlatformStatus::Other(c) => c,
        }
    }

    fn from_code(c: u8) -> PlatformStatus {
        match c {
            0 => PlatformStatus::Ok,
            1 => PlatformStatus::Taken,
            2 => PlatformStatus::Unsupported,
            3 => PlatformStatus::Invalid,
            4 => PlatformStatus::Unavailable,
            c => PlatformStatus::Other(c),
        }
    }
}

/// A notification as the device receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub id: NotificationId,
    pub token: DeviceToken,
    pub push_type: PushType,
    /// APNs priority (10 immediate, 5 power-considerate, 1 low); Web Push
    /// urgency maps high → 10, normal → 5, low → 1, very-low → 0.
    pub priority: u8,
    /// Unix seconds after which it must not be shown; 0 = no expiry.
    pub expires: u64,
    pub collapse_id: String,
    pub topic: String,
    pub payload: Vec<u8>,
}

/// One frame of `parley-push/1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello {
        version: u8,
        ping_interval_s: u16,
        topics: Vec<String>,
    },
    Tokens {
        ping_interval_s: u16,
        tokens: Vec<(String, DeviceToken)>,
    },
    Subscribe {
        request: u32,
        topic: String,
        server_key: Option<[u8; 65]>,
    },
    Subscription {
        request: u32,
        token: DeviceToken,
        endpoint: String,
    },
    Revoke {
        token: DeviceToken,
    },
    Notification(Notification),
    Ack {
        ids: Vec<NotificationId>,
    },
    Ping(u64),
    Pong(u64),
    Close {
        reason: CloseReason,
        text: String,
    },
    Platform {
        request: u32,
        token: PlatformToken,
    },
    PlatformAnswer {
        request: u32,
        status: PlatformStatus,
        text: String,
    },
}

/// Why bytes are not a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame body of {0} bytes exceeds {MAX_BODY}")]
    TooLong(usize),
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    #[error("{0} frame is truncated")]
    Truncated(&'static str),
    #[error("{0} frame has {1} trailing bytes")]
    Trailing(&'static str, usize),
    #[error("{0}: text is not UTF-8")]
    Utf8(&'static str),
    #[error("{0}: field out of range")]
    Range(&'static str),
}

impl Frame {
    fn name(type_: u8) -> &'static str {
        match type_ {
            0x01 => "hello",
            0x02 => "tokens",
            0x03 => "subscribe",
            0x04 => "subscription",
            0x05 => "revoke",
            0x06 => "notification",
            0x07 => "ack",
            0x08 => "ping",
            0x09 => "pong",
            0x0a => "close",
            0x0b => "platform",
            0x0c => "platform answer",
            _ => "unknown",
        }
    }

    /// Appends the encoded frame to `out`. Fails only if a field is out of
    /// range (too many topics, a string over 255 bytes, a payload over
    /// [`MAX_PAYLOAD`]); nothing is appended then.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), FrameError> {
        let start = out.len();
        out.extend_from_slice(&[0, 0, 0]);
        let r = self.encode_body(out);
        let len = out.len() - start - HEADER_LEN;
        if r.is_err() || len > MAX_BODY {
            out.truncate(start);
            return r.and(Err(FrameError::TooLong(len)));
        }
        out[start] = self.type_code();
        out[start + 1..start + 3].copy_from_slice(&(len as u16).to_be_bytes());
        Ok(())
    }

    /// The encoded frame as a new buffer.
    pub fn to_bytes(&self) -> Result<Vec<u8>, FrameError> {
        let mut v = Vec::new();
        self.encode(&mut v)?;
        Ok(v)
    }

    fn type_code(&self) -> u8 {
        match self {
            Frame::Hello { .. } => 0x01,
            Frame::Tokens { .. } => 0x02,
            Frame::Subscribe { .. } => 0x03,
            Frame::Subscription { .. } => 0x04,
            Frame::Revoke { .. } => 0x05,
            Frame::Notification(_) => 0x06,
            Frame::Ack { .. } => 0x07,
            Frame::Ping(_) => 0x08,
            Frame::Pong(_) => 0x09,
            Frame::Close { .. } => 0x0a,
            Frame::Platform { .. } => 0x0b,
            Frame::PlatformAnswer { .. } => 0x0c,
        }
    }

    fn encode_body(&self, out: &mut Vec<u8>) -> Result<(), FrameError> {
        let name = Frame::name(self.type_code());
        match self {
            Frame::Hello {
                version,
                ping_interval_s,
                topics,
            } => {
                if topics.len() > MAX_TOPICS {
                    return Err(FrameError::Range(name));
                }
                out.push(*version);
                out.extend_from_slice(&ping_interval_s.to_be_bytes());
                out.push(topics.len() as u8);
                for t in topics {
                    put_str8(out, t, name)?;
                }
            }
            Frame::Tokens {
                ping_interval_s,
                tokens,
            } => {
                if tokens.len() > MAX_TOPICS {
                    return Err(FrameError::Range(name));
                }
                out.extend_from_slice(&ping_interval_s.to_be_bytes());
                out.push(tokens.len() as u8);
                for (topic, token) in tokens {
                    put_str8(out, topic, name)?;
                    out.extend_from_slice(&token.0);
                }
            }
            Frame::Subscribe {
                request,
                topic,
                server_key,
            } => {
                out.extend_from_slice(&request.to_be_bytes());
                put_str8(out, topic, name)?;
                match server_key {
                    Some(k) => {
                        out.push(65);
                        out.extend_from_slice(k);
                    }
                    None => out.push(0),
                }
            }
            Frame::Subscription {
                request,
                token,
                endpoint,
            } => {
                out.extend_from_slice(&request.to_be_bytes());
                out.extend_from_slice(&token.0);
                if endpoint.len() > 2048 {
                    return Err(FrameError::Range(name));
                }
                out.extend_from_slice(&(endpoint.len() as u16).to_be_bytes());
                out.extend_from_slice(endpoint.as_bytes());
            }
            Frame::Revoke { token } => out.extend_from_slice(&token.0),
            Frame::Notification(n) => {
                if n.payload.len() > MAX_PAYLOAD {
                    return Err(FrameError::Range(name));
                }
                out.extend_from_slice(&n.id.0);
                out.extend_from_slice(&n.token.0);
                out.push(n.push_type.code());
                out.push(n.priority);
                out.extend_from_slice(&n.expires.to_be_bytes());
                put_str8(out, &n.collapse_id, name)?;
                put_str8(out, &n.topic, name)?;
                out.extend_from_slice(&(n.payload.len() as u16).to_be_bytes());
                out.extend_from_slice(&n.payload);
            }
            Frame::Ack { ids } => {
                if ids.is_empty() || ids.len() > MAX_ACK_IDS {
                    return Err(FrameError::Range(name));
                }
                out.push(ids.len() as u8);
                for id in ids {
                    out.extend_from_slice(&id.0);
                }
            }
            Frame::Ping(v) | Frame::Pong(v) => out.extend_from_slice(&v.to_be_bytes()),
            Frame::Close { reason, text } => {
                out.push(reason.code());
                put_str8(out, text, name)?;
            }
            Frame::Platform { request, token } => {
                if token.token.len() > MAX_PLATFORM_TOKEN {
                    return Err(FrameError::Range(name));
                }
                out.extend_from_slice(&request.to_be_bytes());
                out.push(token.platform.code());
                out.push(token.flags());
                put_str8(out, &token.topic, name)?;
                out.extend_from_slice(&(token.token.len() as u16).to_be_bytes());
                out.extend_from_slice(token.token.as_bytes());
                match &token.seal_to {
                    Some(k) => {
                        out.push(81);
                        out.extend_from_slice(&k.p256dh);
                        out.extend_from_slice(&k.auth);
                    }
                    None => out.push(0),
                }
            }
            Frame::PlatformAnswer {
                request,
                status,
                text,
            } => {
                out.extend_from_slice(&request.to_be_bytes());
                out.push(status.code());
                put_str8(out, text, name)?;
            }
        }
        Ok(())
    }

    /// Decodes one frame from the front of `buf`. `Ok(None)` means more
    /// bytes are needed; otherwise returns the frame and how many bytes it
    /// took. An error means the stream is not `parley-push/1`; close it.
    pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, FrameError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let type_ = buf[0];
        let len = u16::from_be_bytes([buf[1], buf[2]]) as usize;
        if len > MAX_BODY {
            return Err(FrameError::TooLong(len));
        }
        if !(0x01..=0x0c).contains(&type_) {
            return Err(FrameError::UnknownType(type_));
        }
        if buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let name = Frame::name(type_);
        let mut r = Reader {
            b: &buf[HEADER_LEN..HEADER_LEN + len],
            name,
        };
        let frame = match type_ {
            0x01 => {
                let version = r.u8()?;
                let ping_interval_s = r.u16()?;
                let n = r.u8()? as usize;
                if n > MAX_TOPICS {
                    return Err(FrameError::Range(name));
                }
                let topics = (0..n).map(|_| r.str8()).collect::<Result<_, _>>()?;
                Frame::Hello {
                    version,
                    ping_interval_s,
                    topics,
                }
            }
            0x02 => {
                let ping_interval_s = r.u16()?;
                let n = r.u8()? as usize;
                if n > MAX_TOPICS {
                    return Err(FrameError::Range(name));
                }
                let tokens = (0..n)
                    .map(|_| Ok((r.str8()?, DeviceToken(r.array()?))))
                    .collect::<Result<_, FrameError>>()?;
                Frame::Tokens {
                    ping_interval_s,
                    tokens,
                }
            }
            0x03 => {
                let request = r.u32()?;
                let topic = r.str8()?;
                let server_key = match r.u8()? {
                    0 => None,
                    65 => Some(r.array()?),
                    _ => return Err(FrameError::Range(name)),
                };
                Frame::Subscribe {
                    request,
                    topic,
                    server_key,
                }
            }
            0x04 => {
                let request = r.u32()?;
                let token = DeviceToken(r.array()?);
                let n = r.u16()? as usize;
                let endpoint = r.utf8(n)?;
                Frame::Subscription {
                    request,
                    token,
                    endpoint,
                }
            }
            0x05 => Frame::Revoke {
                token: DeviceToken(r.array()?),
            },
            0x06 => {
                let id = NotificationId(r.array()?);
                let token = DeviceToken(r.array()?);
                let push_type = PushType::from_code(r.u8()?).ok_or(FrameError::Range(name))?;
                let priority = r.u8()?;
                let expires = r.u64()?;
                let collapse_id = r.str8()?;
                let topic = r.str8()?;
                let n = r.u16()? as usize;
                if n > MAX_PAYLOAD {
                    return Err(FrameError::Range(name));
                }
                let payload = r.take(n)?.to_vec();
                Frame::Notification(Notification {
                    id,
                    token,
                    push_type,
                    priority,
                    expires,
                    collapse_id,
                    topic,
                    payload,
                })
            }
            0x07 => {
                let n = r.u8()? as usize;
                if n == 0 || n > MAX_ACK_IDS {
                    return Err(FrameError::Range(name));
                }
                let ids = (0..n)
                    .map(|_| Ok(NotificationId(r.array()?)))
                    .collect::<Result<_, FrameError>>()?;
                Frame::Ack { ids }
            }
            0x08 => Frame::Ping(r.u64()?),
            0x09 => Frame::Pong(r.u64()?),
            0x0b => {
                let request = r.u32()?;
                let platform = Platform::from_code(r.u8()?).ok_or(FrameError::Range(name))?;
                let flags = r.u8()?;
                if flags & !(PlatformToken::CALLS | PlatformToken::OTHERS | PlatformToken::SANDBOX)
                    != 0
                {
                    return Err(FrameError::Range(name));
                }
                let topic = r.str8()?;
                let n = r.u16()? as usize;
                if n > MAX_PLATFORM_TOKEN {
                    return Err(FrameError::Range(name));
                }
                let token = r.utf8(n)?;
                let seal_to = match r.u8()? {
                    0 => None,
                    81 => Some(SealTo {
                        p256dh: r.array()?,
                        auth: r.array()?,
                    }),
                    _ => return Err(FrameError::Range(name)),
                };
                Frame::Platform {
                    request,
                    token: PlatformToken {
                        platform,
                        calls: flags & PlatformToken::CALLS != 0,
                        others: flags & PlatformToken::OTHERS != 0,
                        sandbox: flags & PlatformToken::SANDBOX != 0,
                        topic,
                        token,
                        seal_to,
                    },
                }
            }
            0x0c => Frame::PlatformAnswer {
                request: r.u32()?,
                status: PlatformStatus::from_code(r.u8()?),
                text: r.str8()?,
            },
            _ => {
                let reason = CloseReason::from_code(r.u8()?);
                let text = r.str8()?;
                Frame::Close { reason, text }
            }
        };
        if !r.b.is_empty() {
            return Err(FrameError::Trailing(name, r.b.len()));
        }
        Ok(Some((frame, HEADER_LEN + len)))
    }
}

fn put_str8(out: &mut Vec<u8>, s: &str, name: &'static str) -> Result<(), FrameError> {
    if s.len() > 255 {
        return Err(FrameError::Range(name));
    }
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

struct Reader<'a> {
    b: &'a [u8],
    name: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.b.len() < n {
            return Err(FrameError::Truncated(self.name));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    fn utf8(&mut self, n: usize) -> Result<String, FrameError> {
        let b = self.take(n)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| FrameError::Utf8(self.name))
    }
    fn str8(&mut self) -> Result<String, FrameError> {
        let n = self.u8()? as usize;
        self.utf8(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_token() -> impl Strategy<Value = DeviceToken> {
        any::<[u8; 32]>().prop_map(DeviceToken)
    }

    fn arb_str() -> impl Strategy<Value = String> {
        "[a-z0-9.\\-é]{0,40}"
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            (
                any::<u8>(),
                any::<u16>(),
                prop::collection::vec(arb_str(), 0..5)
            )
                .prop_map(|(version, ping_interval_s, topics)| Frame::Hello {
                    version,
                    ping_interval_s,
                    topics
                }),
            (
                any::<u16>(),
                prop::collection::vec((arb_str(), arb_token()), 0..5)
            )
                .prop_map(|(ping_interval_s, tokens)| Frame::Tokens {
                    ping_interval_s,
                    tokens
                }),
            (
                any::<u32>(),
                arb_str(),
                prop::option::of(prop::collection::vec(any::<u8>(), 65))
            )
                .prop_map(|(request, topic, k)| Frame::Subscribe {
                    request,
                    topic,
                    server_key: k.map(|k| k.try_into().unwrap()),
                }),
            (any::<u32>(), arb_token(), arb_str()).prop_map(|(request, token, endpoint)| {
                Frame::Subscription {
                    request,
                    token,
                    endpoint,
                }
            }),
            arb_token().prop_map(|token| Frame::Revoke { token }),
            (
                any::<[u8; 16]>(),
                arb_token(),
                0usize..10,
                any::<u8>(),
                any::<u64>(),
                arb_str(),
                arb_str(),
                prop::collection::vec(any::<u8>(), 0..300)
            )
                .prop_map(|(id, token, t, priority, expires, c, topic, payload)| {
                    Frame::Notification(Notification {
                        id: NotificationId(id),
                        token,
                        push_type: PushType::ALL[t],
                        priority,
                        expires,
                        collapse_id: c,
                        topic,
                        payload,
                    })
                }),
            prop::collection::vec(any::<[u8; 16]>(), 1..=64).prop_map(|ids| Frame::Ack {
                ids: ids.into_iter().map(NotificationId).collect()
            }),
            any::<u64>().prop_map(Frame::Ping),
            any::<u64>().prop_map(Frame::Pong),
            (1u8..=6, arb_str()).prop_map(|(c, text)| Frame::Close {
                reason: CloseReason::from_code(c),
                text
            }),
            (
                any::<u32>(),
                any::<bool>(),
                any::<[bool; 3]>(),
                arb_str(),
                "[A-Za-z0-9:_\\-]{0,300}",
                prop::option::of((prop::collection::vec(any::<u8>(), 65), any::<[u8; 16]>()))
            )
                .prop_map(
                    |(request, apns, [calls, others, sandbox], topic, token, seal)| {
                        Frame::Platform {
                            request,
                            token: PlatformToken {
                                platform: if apns { Platform::Apns } else { Platform::Fcm },
                                calls,
                                others,
                                sandbox,
                                topic,
                                token,
                                seal_to: seal.map(|(p, auth)| SealTo {
                                    p256dh: p.try_into().unwrap(),
                                    auth,
                                }),
                            },
                        }
                    }
                ),
            (any::<u32>(), any::<u8>(), arb_str()).prop_map(|(request, c, text)| {
                Frame::PlatformAnswer {
                    request,
                    status: PlatformStatus::from_code(c),
                    text,
                }
            }),
        ]
    }

    proptest! {
        #[test]
        fn frames_round_trip(f in arb_frame()) {
            let b = f.to_bytes().unwrap();
            let (g, n) = Frame::decode(&b).unwrap().unwrap();
            prop_assert_eq!(n, b.len());
            prop_assert_eq!(&g, &f);
            // Every strict prefix asks for more bytes.
            for cut in 0..b.len() {
                prop_assert_eq!(Frame::decode(&b[..cut]).unwrap(), None);
            }
        }

        #[test]
        fn random_bytes_never_panic(b in prop::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(Some((f, n))) = Frame::decode(&b) {
                prop_assert!(n <= b.len());
                prop_assert_eq!(f.to_bytes().unwrap(), b[..n].to_vec());
            }
        }
    }

    #[test]
    fn oversized_fields_are_refused_at_encode() {
        let mut out = vec![7];
        let long = "x".repeat(256);
        let f = Frame::Hello {
            version: 1,
            ping_interval_s: 0,
            topics: vec![long],
        };
        assert_eq!(f.encode(&mut out), Err(FrameError::Range("hello")));
        assert_eq!(out, vec![7], "nothing appended on error");
        let f = Frame::Ack { ids: vec![] };
        assert!(f.to_bytes().is_err());
    }

    #[test]
    fn hostile_headers_are_errors() {
        assert_eq!(
            Frame::decode(&[0x01, 0xff, 0xff]),
            Err(FrameError::TooLong(0xffff))
        );
        assert_eq!(
            Frame::decode(&[0x42, 0, 0]),
            Err(FrameError::UnknownType(0x42))
        );
        assert_eq!(
            Frame::decode(&[0x08, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(FrameError::Trailing("ping", 1))
        );
        assert_eq!(
            Frame::decode(&[0x07, 0, 1, 0]),
            Err(FrameError::Range("ack"))
        );
    }

    #[test]
    fn ids_and_tokens_print_their_standard_forms() {
        let id = NotificationId([0xab; 16]);
        let s = id.to_uuid();
        assert_eq!(s, "ABABABAB-ABAB-ABAB-ABAB-ABABABABABAB");
        assert_eq!(NotificationId::from_uuid(&s.to_lowercase()), Some(id));
        assert_eq!(NotificationId::from_uuid("ABABABAB-ABAB-ABAB-ABAB"), None);
        let seq = NotificationId(std::array::from_fn(|i| i as u8));
        assert_eq!(seq.to_uuid(), "00010203-0405-0607-0809-0A0B0C0D0E0F");
        assert_eq!(NotificationId::from_uuid(&seq.to_uuid()), Some(seq));
        let t = DeviceToken([0x0f; 32]);
        assert_eq!(DeviceToken::from_hex(&t.to_hex().to_uppercase()), Some(t));
        assert_eq!(DeviceToken::from_b64(&t.to_b64()), Some(t));
        assert_eq!(DeviceToken::from_hex("0f"), None);
        assert!(!format!("{t:?}").contains(&t.to_hex()));
    }
}
