//! The device's SIP user agent, sans-IO: registration (RFC 5626 outbound,
//! RFC 8599 push parameters, digest when the account has a password),
//! and calls as caller and callee (INVITE, ringing, answer, decline,
//! CANCEL, BYE, re-INVITE for an ICE restart).
//!
//! It speaks over one reliable flow to the proxy (TLS with the device
//! certificate, TCP or a WebSocket): bytes in from the stream, messages
//! out, so there are no retransmissions, only the RFC 3261 transaction
//! timeouts (Timer B/F, 32 s). The stream keepalive is the RFC 5626 CRLF
//! ping at the proxy's `Flow-Timer`.
//!
//! SDP bodies and `Identity` headers are the caller's business (the media
//! session and the PASSporT); this layer carries them.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use wire::sip::digest;
use wire::sip::message::{self, Frame, HeaderName, Message, Method, StartLine};
use wire::sip::uri::{escape_user, NameAddr, Uri};

/// RFC 3261 Timer B and F for T1 = 500 ms.
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(32);
/// Registration is refreshed at this share of its lifetime.
const REFRESH_AT: f64 = 0.8;
/// Keepalive interval when the proxy names none.
const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(120);
/// Bytes of an incomplete message we keep before giving up on the stream.
const MAX_BUFFER: usize = 2 * message::MAX_MESSAGE;
const ALLOW: &str = "INVITE, ACK, CANCEL, BYE, UPDATE, OPTIONS, MESSAGE";

/// The RFC 8599 push parameters a sleeping device leaves in its Contact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushContact {
    pub provider: String,
    pub prid: String,
    pub param: Option<String>,
}

#[derive(Clone, Debug)]
pub struct UaConfig {
    /// The handle this device answers for (`+14155550123`,
    /// `alice@example.com`).
    pub handle: String,
    /// The service's SIP domain.
    pub domain: String,
    /// Our end of the flow, for Via and Contact.
    pub local: SocketAddr,
    /// Via transport token: `TLS`, `TCP` or `WSS`.
    pub transport: &'static str,
    /// `urn:uuid:…`: the same on every registration of this device.
    pub instance: String,
    /// Digest account (standard accounts); devices use their certificate.
    pub credentials: Option<(String, String)>,
    pub push: Option<PushContact>,
    /// Registration lifetime asked for. Default 600 s.
    pub expires: u32,
}

impl UaConfig {
    pub fn new(handle: &str, domain: &str, local: SocketAddr, instance: &str) -> UaConfig {
        UaConfig {
            handle: handle.into(),
            domain: domain.into(),
            local,
            transport: "TLS",
            instance: instance.into(),
            credentials: None,
            push: None,
            expires: 600,
        }
    }

    /// `sip:<handle>@<domain>`.
    pub fn aor(&self) -> String {
        handle_uri(&self.handle, &self.domain)
    }
}

/// `sip:<handle>@<domain>`, the handle's `@` escaped.
pub fn handle_uri(handle: &str, domain: &str) -> String {
    format!("sip:{}@{domain}", escape_user(handle))
}

/// A call, by its Call-ID.
pub type CallId = String;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UaEvent {
    Registered {
        expires: u32,
    },
    /// Registration refused or lost: status code (0: timeout) and reason.
    RegistrationFailed {
        code: u16,
        reason: String,
    },
    Unregistered,
    /// A call for us: ring, then [`UserAgent::answer`] or
    /// [`UserAgent::decline`].
    Incoming {
        call: CallId,
        from: String,
        sdp: String,
        identity: Option<String>,
    },
    /// The far end rings.
    Ringing {
        call: CallId,
    },
    /// The far end answered: its SDP and PASSporT.
    Answered {
        call: CallId,
        sdp: String,
        identity: Option<String>,
    },
    /// The call could not be made: the final status and reason phrase.
    Failed {
        call: CallId,
        code: u16,
        reason: String,
    },
    /// The caller gave up, or the call was answered on another device of
    /// ours (`reason` carries the Reason header's text, e.g. "Call
    /// completed elsewhere").
    Cancelled {
        call: CallId,
        reason: Option<String>,
    },
    /// A new offer inside the call (ICE restart): answer with
    /// [`UserAgent::answer_reoffer`].
    ReOffer {
        call: CallId,
        sdp: String,
        identity: Option<String>,
    },
    /// Our re-offer was refused (491 when both ends re-offered at once,
    /// RFC 3261 §14.1) or went unanswered (408): the media stays as it
    /// was.
    ReOfferRefused {
        call: CallId,
        code: u16,
    },
    /// The far end's answer to our re-offer.
    ReAnswered {
        call: CallId,
        sdp: String,
        identity: Option<String>,
    },
    /// The call is over (BYE either way).
    Ended {
        call: CallId,
        by_peer: bool,
    },
    /// A group call for us (an INVITE naming a room): its roster as the
    /// caller wrote it, and the room token the proxy gave. Ring, then
    /// [`UserAgent::answer_group`] or [`UserAgent::decline`].
    IncomingGroup {
        call: CallId,
        from: String,
        room: String,
        pass: Option<RoomPass>,
        roster: String,
    },
    /// The proxy's room token for a group call we placed (with its
    /// ringing or its answer), once per call.
    RoomPass {
        call: CallId,
        pass: RoomPass,
    },
    /// A MESSAGE for us (already answered 200).
    Message {
        from: String,
        content_type: String,
        body: Vec<u8>,
    },
    /// What became of a MESSAGE we sent: its final status (0: no answer).
    MessageDone {
        id: String,
        code: u16,
    },
}

/// A room token of a group call and where the SFU takes it, as the proxy
/// gave them (`Parley-Room-Token`, `Parley-Sfu`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoomPass {
    pub token: String,
    pub sfu: String,
}

/// The headers of group calls (see signaling's proxy).
const GROUP: HeaderName = HeaderName::from_static("Parley-Group");
const ROOM_TOKEN: HeaderName = HeaderName::from_static("Parley-Room-Token");
const SFU: HeaderName = HeaderName::from_static("Parley-Sfu");

/// The content type of a group INVITE's roster.
pub const ROSTER_TYPE: &str = "application/vnd.parley.group+json";

fn room_pass(m: &Message) -> Option<RoomPass> {
    Some(RoomPass {
        token: m.header(&ROOM_TOKEN)?.trim().to_string(),
        sfu: m.header(&SFU)?.trim().to_string(),
    })
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UaError {
    #[error("no such call")]
    NoCall,
    #[error("{0} is not possible in this state of the call")]
    State(&'static str),
    #[error("bad target: {0}")]
    Target(String),
    #[error("the stream from the proxy cannot be read: {0}")]
    Stream(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CallState {
    /// Outgoing, INVITE sent, no final answer.
    Calling,
    /// Incoming, ringing here.
    Ringing,
    /// Incoming, answered: waiting for the ACK.
    Answered,
    Confirmed,
    Ended,
}

#[derive(Debug)]
struct Call {
    state: CallState,
    local_tag: String,
    remote_tag: Option<String>,
    /// Our From (caller) or To (callee) value, with our tag.
    local_uri: String,
    /// Their From or To value, with their tag once known.
    remote_uri: String,
    remote_target: Option<Uri>,
    /// Route headers for in-dialog requests, in order.
    route: Vec<String>,
    local_cseq: u32,
    /// The INVITE we sent (for CANCEL and ACK) or received (for
    /// responses).
    invite: Message,
    /// A re-INVITE of ours awaiting its answer, or theirs awaiting ours.
    reinvite: Option<Message>,
    deadline: Option<Instant>,
    auth_tries: u32,
    cancel_sent: bool,
    /// A group call we placed whose room token has not come yet.
    awaiting_pass: bool,
}

#[derive(Debug)]
struct Registration {
    call_id: String,
    tag: String,
    cseq: u32,
    /// Outstanding REGISTER: its branch, expiry asked and when it fails.
    pending: Option<(String, u32, Instant)>,
    auth_tries: u32,
    refresh_at: Option<Instant>,
    registered: bool,
    wanted: bool,
}

/// The user agent.
#[derive(Debug)]
pub struct UserAgent {
    config: UaConfig,
    reg: Registration,
    calls: HashMap<CallId, Call>,
    /// MESSAGEs sent and not yet answered: when they are given up.
    messages: HashMap<String, Instant>,
    buf: Vec<u8>,
    out: VecDeque<Vec<u8>>,
    events: VecDeque<UaEvent>,
    keepalive: Duration,
    next_keepalive: Option<Instant>,
    rng: u64,
    nc: u32,
}

impl UserAgent {
    /// `seed`: fresh randomness for tags, branches and Call-IDs.
    pub fn new(config: UaConfig, seed: u64) -> UserAgent {
        let mut ua = UserAgent {
            config,
            reg: Registration {
                call_id: String::new(),
                tag: String::new(),
                cseq: 0,
                pending: None,
                auth_tries: 0,
                refresh_at: None,
                registered: false,
                wanted: false,
            },
            calls: HashMap::new(),
            messages: HashMap::new(),
            buf: Vec::new(),
            out: VecDeque::new(),
            events: VecDeque::new(),
            keepalive: DEFAULT_KEEPALIVE,
            next_keepalive: None,
            rng: seed | 1,
            nc: 0,
        };
        ua.reg.call_id = format!("{}@parley", ua.token());
        ua.reg.tag = ua.token();
        ua
    }

    pub fn config(&self) -> &UaConfig {
        &self.config
    }

    /// Registers this device (and keeps the registration fresh).
    pub fn register(&mut self, now: Instant) {
        self.reg.wanted = true;
        self.reg.auth_tries = 0;
        self.send_register(now, self.config.expires, None);
    }

    /// Removes the registration (expires 0).
    pub fn unregister(&mut self, now: Instant) {
        self.reg.wanted = false;
        self.reg.refresh_at = None;
        self.send_register(now, 0, None);
    }

    pub fn is_registered(&self) -> bool {
        self.reg.registered
    }

    /// Calls `handle` (a handle of this domain, or a full `sip:` URI)
    /// with an SDP offer and our PASSporT.
    pub fn invite(
        &mut self,
        now: Instant,
        target: &str,
        sdp: &str,
        identity: Option<&str>,
    ) -> Result<CallId, UaError> {
        let call_id = self.next_call_id();
        self.invite_as(now, &call_id, target, sdp, identity)?;
        Ok(call_id)
    }

    /// A fresh Call-ID, for a call set up before its INVITE is sent.
    pub fn next_call_id(&mut self) -> CallId {
        format!("{}@parley", self.token())
    }

    /// [`UserAgent::invite`] with a Call-ID from
    /// [`UserAgent::next_call_id`].
    pub fn invite_as(
        &mut self,
        now: Instant,
        call_id: &str,
        target: &str,
        sdp: &str,
        identity: Option<&str>,
    ) -> Result<(), UaError> {
        self.invite_with(
            now,
            call_id,
            target,
            ("application/sdp", sdp),
            None,
            identity,
        )
    }

    /// Rings `target` for a group call in `room`: the INVITE names the
    /// room and carries `roster` (JSON, [`ROSTER_TYPE`]); the room token
    /// comes back as [`UaEvent::RoomPass`].
    pub fn invite_group(
        &mut self,
        now: Instant,
        call_id: &str,
        target: &str,
        room: &str,
        roster: &str,
    ) -> Result<(), UaError> {
        self.invite_with(
            now,
            call_id,
            target,
            (ROSTER_TYPE, roster),
            Some(room),
            None,
        )
    }

    fn invite_with(
        &mut self,
        now: Instant,
        call_id: &str,
        target: &str,
        (content_type, body): (&str, &str),
        room: Option<&str>,
        identity: Option<&str>,
    ) -> Result<(), UaError> {
        let call_id = call_id.to_string();
        let uri_text = if target.starts_with("sip:") || target.starts_with("sips:") {
            target.to_string()
        } else {
            handle_uri(target, &self.config.domain)
        };
        let uri = Uri::parse(&uri_text).map_err(|e| UaError::Target(format!("{target}: {e}")))?;
        let local_tag = self.token();
        let local_uri = format!("<{}>;tag={local_tag}", self.config.aor());
        let remote_uri = format!("<{uri_text}>");
        let mut m = Message::request(Method::Invite, uri);
        self.push_via(&mut m);
        m.push(HeaderName::MAX_FORWARDS, "70");
        m.push(HeaderName::FROM, local_uri.clone());
        m.push(HeaderName::TO, remote_uri.clone());
        m.push(HeaderName::CALL_ID, call_id.clone());
        m.push(HeaderName::CSEQ, "1 INVITE");
        m.push(HeaderName::CONTACT, self.contact(false));
        m.push(HeaderName::ALLOW, ALLOW);
        m.push(HeaderName::SUPPORTED, "outbound");
        if let Some(id) = identity {
            m.push(HeaderName::IDENTITY, id);
        }
        if let Some(room) = room {
            m.push(GROUP, room);
        }
        m.push(HeaderName::CONTENT_TYPE, content_type);
        m.body = body.as_bytes().to_vec();
        self.out.push_back(m.to_bytes());
        self.calls.insert(
            call_id.clone(),
            Call {
                state: CallState::Calling,
                local_tag,
                remote_tag: None,
                local_uri,
                remote_uri,
                remote_target: None,
                route: Vec::new(),
                local_cseq: 1,
                invite: m,
                reinvite: None,
                deadline: Some(now + TRANSACTION_TIMEOUT),
                auth_tries: 0,
                cancel_sent: false,
                awaiting_pass: room.is_some(),
            },
        );
        Ok(())
    }

    /// Answers an incoming call with our SDP and PASSporT.
    pub fn answer(
        &mut self,
        now: Instant,
        call: &str,
        sdp: &str,
        identity: Option<&str>,
    ) -> Result<(), UaError> {
        self.answer_with(now, call, Some(("application/sdp", sdp)), identity)
    }

    /// Answers a group call: no SDP, since the media goes to the SFU;
    /// `roster` when admitting someone who joins by a call link (their
    /// place in the call).
    pub fn answer_group(
        &mut self,
        now: Instant,
        call: &str,
        roster: Option<&str>,
    ) -> Result<(), UaError> {
        self.answer_with(now, call, roster.map(|r| (ROSTER_TYPE, r)), None)
    }

    fn answer_with(
        &mut self,
        now: Instant,
        call: &str,
        body: Option<(&str, &str)>,
        identity: Option<&str>,
    ) -> Result<(), UaError> {
        let contact = self.contact(false);
        let c = self.calls.get_mut(call).ok_or(UaError::NoCall)?;
        if c.state != CallState::Ringing {
            return Err(UaError::State("answer"));
        }
        let mut r = Message::dialog_response(&c.invite, 200, "OK", &c.local_tag);
        r.push(HeaderName::CONTACT, contact);
        r.push(HeaderName::ALLOW, ALLOW);
        if let Some(id) = identity {
            r.push(HeaderName::IDENTITY, id);
        }
        if let Some((content_type, body)) = body {
            r.push(HeaderName::CONTENT_TYPE, content_type);
            r.body = body.as_bytes().to_vec();
        }
        c.state = CallState::Answered;
        c.deadline = Some(now + TRANSACTION_TIMEOUT);
        self.out.push_back(r.to_bytes());
        Ok(())
    }

    /// Sends a MESSAGE (RFC 3428) to `target` (a handle or URI); its
    /// outcome comes as [`UaEvent::MessageDone`] with the returned id.
    pub fn message(
        &mut self,
        now: Instant,
        target: &str,
        content_type: &str,
        body: &[u8],
    ) -> Result<String, UaError> {
        let uri_text = if target.starts_with("sip:") || target.starts_with("sips:") {
            target.to_string()
        } else {
            handle_uri(target, &self.config.domain)
        };
        let uri = Uri::parse(&uri_text).map_err(|e| UaError::Target(format!("{target}: {e}")))?;
        let id = self.next_call_id();
        let tag = self.token();
        let mut m = Message::request(Method::Message, uri);
        self.push_via(&mut m);
        m.push(HeaderName::MAX_FORWARDS, "70");
        m.push(
            HeaderName::FROM,
            format!("<{}>;tag={tag}", self.config.aor()),
        );
        m.push(HeaderName::TO, format!("<{uri_text}>"));
        m.push(HeaderName::CALL_ID, id.clone());
        m.push(HeaderName::CSEQ, "1 MESSAGE");
        m.push(HeaderName::CONTENT_TYPE, content_type);
        m.body = body.to_vec();
        self.out.push_back(m.to_bytes());
        self.messages.insert(id.clone(), now + TRANSACTION_TIMEOUT);
        Ok(id)
    }

    /// Declines an incoming call: 603 Decline (which the proxy relays at
    /// once, ending the call on every device), or another code such as
    /// 486 Busy Here (this device only).
    pub fn decline(&mut self, call: &str, code: u16) -> Result<(), UaError> {
        let c = self.calls.get_mut(call).ok_or(UaError::NoCall)?;
        if c.state != CallState::Ringing {
            return Err(UaError::State("decline"));
        }
        let reason = match code {
            486 => "Busy Here",
            600 => "Busy Everywhere",
            603 => "Decline",
            400 => "Bad Request",
            438 => "Invalid Identity Header",
            488 => "Not Acceptable Here",
            _ => "Declined",
        };
        let r = Message::response_to(&c.invite, code, reason, Some(&c.local_tag));
        c.state = CallState::Ended;
        self.out.push_back(r.to_bytes());
        self.calls.remove(call);
        Ok(())
    }

    /// Ends a call: CANCEL while it rings, BYE once answered.
    pub fn hangup(&mut self, now: Instant, call: &str) -> Result<(), UaError> {
        let state = self.calls.get(call).ok_or(UaError::NoCall)?.state;
        match state {
            CallState::Calling => {
                let c = self.calls.get_mut(call).ok_or(UaError::NoCall)?;
                if c.cancel_sent {
                    return Ok(());
                }
                let m = cancel_for(&c.invite);
                c.cancel_sent = true;
                self.out.push_back(m.to_bytes());
                Ok(())
            }
            CallState::Ringing => self.decline(call, 486),
            CallState::Answered | CallState::Confirmed => {
                let m = self.in_dialog(now, call, Method::Bye, None, None)?;
                self.out.push_back(m.to_bytes());
                if let Some(c) = self.calls.get_mut(call) {
                    c.state = CallState::Ended;
                }
                self.calls.remove(call);
                self.events.push_back(UaEvent::Ended {
                    call: call.into(),
                    by_peer: false,
                });
                Ok(())
            }
            CallState::Ended => Err(UaError::State("hangup")),
        }
    }

    /// A new offer inside an established call (an ICE restart).
    pub fn reoffer(
        &mut self,
        now: Instant,
        call: &str,
        sdp: &str,
        identity: Option<&str>,
    ) -> Result<(), UaError> {
        let c = self.calls.get(call).ok_or(UaError::NoCall)?;
        if c.state != CallState::Confirmed || c.reinvite.is_some() {
            return Err(UaError::State("reoffer"));
        }
        let m = self.in_dialog(now, call, Method::Invite, Some(sdp), identity)?;
        self.out.push_back(m.to_bytes());
        if let Some(c) = self.calls.get_mut(call) {
            c.reinvite = Some(m);
            c.deadline = Some(now + TRANSACTION_TIMEOUT);
        }
        Ok(())
    }

    /// Our answer to the far end's re-offer.
    pub fn answer_reoffer(
        &mut self,
        call: &str,
        sdp: &str,
        identity: Option<&str>,
    ) -> Result<(), UaError> {
        let contact = self.contact(false);
        let c = self.calls.get_mut(call).ok_or(UaError::NoCall)?;
        let req = c.reinvite.take().ok_or(UaError::State("answer_reoffer"))?;
        let mut r = Message::response_to(&req, 200, "OK", None);
        r.push(HeaderName::CONTACT, contact);
        if let Some(id) = identity {
            r.push(HeaderName::IDENTITY, id);
        }
        r.push(HeaderName::CONTENT_TYPE, "application/sdp");
        r.body = sdp.as_bytes().to_vec();
        self.out.push_back(r.to_bytes());
        Ok(())
    }

    /// Bytes from the stream to the proxy.
    pub fn handle_input(&mut self, now: Instant, bytes: &[u8]) -> Result<(), UaError> {
        self.buf.extend_from_slice(bytes);
        loop {
            match message::frame(&self.buf) {
                Ok(None) => {
                    if self.buf.len() > MAX_BUFFER {
                        return Err(UaError::Stream("message too large".into()));
                    }
                    return Ok(());
                }
                Ok(Some(Frame::Keepalive { n, ping })) => {
                    self.buf.drain(..n);
                    if ping {
                        self.out.push_back(b"\r\n".to_vec());
                    }
                }
                Ok(Some(Frame::Message(n))) => {
                    let bytes: Vec<u8> = self.buf.drain(..n).collect();
                    // A message we cannot read is dropped: the proxy
                    // already answered it if it was a request.
                    if let Ok(m) = Message::parse(&bytes) {
                        self.handle_message(now, m);
                    }
                }
                Err(e) => return Err(UaError::Stream(e.to_string())),
            }
        }
    }

    /// The stream dropped: the registration is gone (a sleeping device
    /// with push parameters stays reachable by push).
    pub fn handle_disconnected(&mut self) {
        self.buf.clear();
        self.reg.registered = false;
        self.reg.pending = None;
        self.next_keepalive = None;
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let lost: Vec<String> = self
            .messages
            .iter()
            .filter(|(_, d)| now >= **d)
            .map(|(id, _)| id.clone())
            .collect();
        for id in lost {
            self.messages.remove(&id);
            self.events.push_back(UaEvent::MessageDone { id, code: 0 });
        }
        if let Some((_, _, deadline)) = &self.reg.pending {
            if now >= *deadline {
                self.reg.pending = None;
                self.reg.registered = false;
                self.events.push_back(UaEvent::RegistrationFailed {
                    code: 0,
                    reason: "no answer from the proxy".into(),
                });
            }
        }
        if self.reg.refresh_at.is_some_and(|t| now >= t) && self.reg.pending.is_none() {
            self.reg.refresh_at = None;
            self.reg.auth_tries = 0;
            self.send_register(now, self.config.expires, None);
        }
        if self.next_keepalive.is_some_and(|t| now >= t) {
            self.out.push_back(b"\r\n\r\n".to_vec());
            self.next_keepalive = Some(now + self.keepalive);
        }
        let expired: Vec<CallId> = self
            .calls
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| now >= d))
            .map(|(k, _)| k.clone())
            .collect();
        for id in expired {
            let Some(c) = self.calls.get_mut(&id) else {
                continue;
            };
            c.deadline = None;
            match c.state {
                CallState::Calling => {
                    self.calls.remove(&id);
                    self.events.push_back(UaEvent::Failed {
                        call: id,
                        code: 408,
                        reason: "Request Timeout".into(),
                    });
                }
                CallState::Answered => {
                    // No ACK: the call is dead (RFC 3261 §13.3.1.4).
                    if let Ok(m) = self.in_dialog(now, &id, Method::Bye, None, None) {
                        self.out.push_back(m.to_bytes());
                    }
                    self.calls.remove(&id);
                    self.events.push_back(UaEvent::Ended {
                        call: id,
                        by_peer: false,
                    });
                }
                _ => {
                    if c.outgoing_reinvite() {
                        self.events.push_back(UaEvent::ReOfferRefused {
                            call: id.clone(),
                            code: 408,
                        });
                    }
                    c.reinvite = None;
                }
            }
        }
    }

    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.out.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<UaEvent> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t = self.reg.refresh_at;
        for x in [self.next_keepalive, self.reg.pending.as_ref().map(|p| p.2)]
            .into_iter()
            .flatten()
            .chain(self.calls.values().filter_map(|c| c.deadline))
            .chain(self.messages.values().copied())
        {
            t = Some(t.map_or(x, |t: Instant| t.min(x)));
        }
        t
    }

    fn handle_message(&mut self, now: Instant, m: Message) {
        match &m.start {
            StartLine::Response { .. } => self.on_response(now, m),
            StartLine::Request { .. } => self.on_request(now, m),
        }
    }

    fn on_response(&mut self, now: Instant, m: Message) {
        let Some((cseq, method)) = m.cseq() else {
            return;
        };
        let code = m.code().unwrap_or(0);
        if method == Method::Register && m.call_id() == self.reg.call_id {
            self.on_register_response(now, &m, cseq, code);
            return;
        }
        let call_id = m.call_id().to_string();
        if method == Method::Message {
            if code >= 200 && self.messages.remove(&call_id).is_some() {
                self.events
                    .push_back(UaEvent::MessageDone { id: call_id, code });
            }
            return;
        }
        if let Some(c) = self.calls.get_mut(&call_id) {
            if c.awaiting_pass && method == Method::Invite && (180..300).contains(&code) {
                if let Some(pass) = room_pass(&m) {
                    c.awaiting_pass = false;
                    self.events.push_back(UaEvent::RoomPass {
                        call: call_id.clone(),
                        pass,
                    });
                }
            }
        }
        let Some(c) = self.calls.get_mut(&call_id) else {
            // A 2xx for a call we no longer have (a second answer after a
            // fork, or a retransmission): nothing to do for a stream
            // transport beyond what the proxy does.
            return;
        };
        match method {
            Method::Invite
                if c.reinvite.is_some()
                    && cseq == c.local_cseq
                    && c.outgoing_reinvite()
                    && code >= 200 =>
            {
                c.reinvite = None;
                c.deadline = None;
                let ack = ack_for(c, cseq, &m);
                self.out.push_back(ack.to_bytes());
                if (200..300).contains(&code) {
                    self.events.push_back(UaEvent::ReAnswered {
                        call: call_id,
                        sdp: body(&m),
                        identity: m.header(&HeaderName::IDENTITY).map(str::to_string),
                    });
                } else {
                    self.events.push_back(UaEvent::ReOfferRefused {
                        call: call_id,
                        code,
                    });
                }
            }
            Method::Invite if c.state == CallState::Calling => {
                if code < 200 {
                    if (180..190).contains(&code) {
                        self.events.push_back(UaEvent::Ringing { call: call_id });
                    }
                    return;
                }
                if (code == 401 || code == 407) && c.auth_tries == 0 {
                    if let Some(retry) = self.authorized_retry(&call_id, &m, code) {
                        self.out.push_back(retry);
                        return;
                    }
                }
                let Some(c) = self.calls.get_mut(&call_id) else {
                    return;
                };
                if (200..300).contains(&code) {
                    c.remote_tag = m.tag(&HeaderName::TO).map(str::to_string);
                    if let Some(to) = m.header(&HeaderName::TO) {
                        c.remote_uri = to.to_string();
                    }
                    c.remote_target = m
                        .header(&HeaderName::CONTACT)
                        .and_then(|v| NameAddr::parse(v).ok())
                        .map(|na| na.uri);
                    // The UAC's route set is the Record-Route reversed.
                    c.route = m
                        .values(&HeaderName::RECORD_ROUTE)
                        .map(str::to_string)
                        .collect();
                    c.route.reverse();
                    c.state = CallState::Confirmed;
                    c.deadline = None;
                    let ack = ack_for(c, cseq, &m);
                    self.out.push_back(ack.to_bytes());
                    self.events.push_back(UaEvent::Answered {
                        call: call_id,
                        sdp: body(&m),
                        identity: m.header(&HeaderName::IDENTITY).map(str::to_string),
                    });
                } else {
                    // A non-2xx final: the proxy absorbs our ACK (same
                    // branch as the INVITE, RFC 3261 §17.1.1.3).
                    let ack = ack_non_2xx(&c.invite, &m);
                    self.out.push_back(ack.to_bytes());
                    self.calls.remove(&call_id);
                    let reason = match &m.start {
                        StartLine::Response { reason, .. } => reason.clone(),
                        _ => String::new(),
                    };
                    self.events.push_back(UaEvent::Failed {
                        call: call_id,
                        code,
                        reason,
                    });
                }
            }
            _ => {}
        }
    }

    fn on_register_response(&mut self, now: Instant, m: &Message, cseq: u32, code: u16) {
        let Some((branch, expires, _)) = self.reg.pending.clone() else {
            return;
        };
        if cseq != self.reg.cseq
            || m.header(&HeaderName::VIA)
                .is_none_or(|v| !v.contains(&branch))
        {
            return;
        }
        if code < 200 {
            return;
        }
        self.reg.pending = None;
        if (code == 401 || code == 407) && self.reg.auth_tries == 0 {
            if let Some((user, pass)) = self.config.credentials.clone() {
                let name = if code == 401 {
                    HeaderName::WWW_AUTHENTICATE
                } else {
                    HeaderName::PROXY_AUTHENTICATE
                };
                let challenges: Vec<&str> = m.lines(&name).collect();
                let uri = format!("sip:{}", self.config.domain);
                self.nc += 1;
                let cnonce = self.token();
                if let Some(auth) = digest::respond(
                    &challenges,
                    "REGISTER",
                    &uri,
                    &user,
                    &pass,
                    &cnonce,
                    self.nc,
                ) {
                    self.reg.auth_tries += 1;
                    let header = if code == 401 {
                        HeaderName::AUTHORIZATION
                    } else {
                        HeaderName::PROXY_AUTHORIZATION
                    };
                    self.send_register(now, expires, Some((header, auth)));
                    return;
                }
            }
        }
        if (200..300).contains(&code) {
            if expires == 0 {
                self.reg.registered = false;
                self.next_keepalive = None;
                self.events.push_back(UaEvent::Unregistered);
                return;
            }
            let granted = granted_expires(m, &self.config.instance).unwrap_or(expires);
            self.reg.registered = true;
            self.reg.refresh_at =
                Some(now + Duration::from_secs_f64(f64::from(granted) * REFRESH_AT));
            if let Some(ft) = m
                .header(&HeaderName::FLOW_TIMER)
                .and_then(|v| v.trim().parse::<u64>().ok())
            {
                self.keepalive = Duration::from_secs(ft.max(5));
            }
            self.next_keepalive = Some(now + self.keepalive);
            self.events
                .push_back(UaEvent::Registered { expires: granted });
        } else {
            self.reg.registered = false;
            let reason = match &m.start {
                StartLine::Response { reason, .. } => reason.clone(),
                _ => String::new(),
            };
            self.events
                .push_back(UaEvent::RegistrationFailed { code, reason });
        }
    }

    fn on_request(&mut self, now: Instant, m: Message) {
        let Some(method) = m.method().cloned() else {
            return;
        };
        let call_id = m.call_id().to_string();
        let has_to_tag = m.tag(&HeaderName::TO).is_some();
        match method {
            Method::Invite if !has_to_tag => {
                if self.calls.contains_key(&call_id) {
                    return; // a retransmission
                }
                let local_tag = self.token();
                let from = m.header(&HeaderName::FROM).unwrap_or("").to_string();
                let mut to = m.header(&HeaderName::TO).unwrap_or("").to_string();
                to.push_str(";tag=");
                to.push_str(&local_tag);
                let mut ringing = Message::dialog_response(&m, 180, "Ringing", &local_tag);
                ringing.push(HeaderName::CONTACT, self.contact(false));
                self.out.push_back(ringing.to_bytes());
                let call = Call {
                    state: CallState::Ringing,
                    local_tag,
                    remote_tag: m.tag(&HeaderName::FROM).map(str::to_string),
                    local_uri: to,
                    remote_uri: from.clone(),
                    remote_target: m
                        .header(&HeaderName::CONTACT)
                        .and_then(|v| NameAddr::parse(v).ok())
                        .map(|na| na.uri),
                    // The UAS's route set is the Record-Route in order.
                    route: m
                        .values(&HeaderName::RECORD_ROUTE)
                        .map(str::to_string)
                        .collect(),
                    local_cseq: 0,
                    invite: m.clone(),
                    reinvite: None,
                    deadline: None,
                    auth_tries: 0,
                    cancel_sent: false,
                    awaiting_pass: false,
                };
                self.calls.insert(call_id.clone(), call);
                match m.header(&GROUP) {
                    Some(room) => self.events.push_back(UaEvent::IncomingGroup {
                        call: call_id,
                        from,
                        room: room.trim().to_string(),
                        pass: room_pass(&m),
                        roster: body(&m),
                    }),
                    None => self.events.push_back(UaEvent::Incoming {
                        call: call_id,
                        from,
                        sdp: body(&m),
                        identity: m.header(&HeaderName::IDENTITY).map(str::to_string),
                    }),
                }
            }
            Method::Invite => {
                // A re-INVITE.
                let Some(c) = self.calls.get_mut(&call_id) else {
                    let r = Message::response_to(&m, 481, "Call/Transaction Does Not Exist", None);
                    self.out.push_back(r.to_bytes());
                    return;
                };
                if c.reinvite.is_some() {
                    let r = Message::response_to(&m, 491, "Request Pending", None);
                    self.out.push_back(r.to_bytes());
                    return;
                }
                c.reinvite = Some(m.clone());
                self.events.push_back(UaEvent::ReOffer {
                    call: call_id,
                    sdp: body(&m),
                    identity: m.header(&HeaderName::IDENTITY).map(str::to_string),
                });
            }
            Method::Ack => {
                if let Some(c) = self.calls.get_mut(&call_id) {
                    if c.state == CallState::Answered {
                        c.state = CallState::Confirmed;
                        c.deadline = None;
                    }
                }
            }
            Method::Cancel => {
                let ok = Message::response_to(&m, 200, "OK", None);
                self.out.push_back(ok.to_bytes());
                let ringing = self
                    .calls
                    .get(&call_id)
                    .is_some_and(|c| c.state == CallState::Ringing);
                if ringing {
                    if let Some(c) = self.calls.remove(&call_id) {
                        let r = Message::response_to(
                            &c.invite,
                            487,
                            "Request Terminated",
                            Some(&c.local_tag),
                        );
                        self.out.push_back(r.to_bytes());
                    }
                    let reason = m.header(&HeaderName::REASON).and_then(reason_text);
                    self.events.push_back(UaEvent::Cancelled {
                        call: call_id,
                        reason,
                    });
                }
            }
            Method::Bye => {
                let known = self.calls.remove(&call_id).is_some();
                let r = if known {
                    Message::response_to(&m, 200, "OK", None)
                } else {
                    Message::response_to(&m, 481, "Call/Transaction Does Not Exist", None)
                };
                self.out.push_back(r.to_bytes());
                if known {
                    self.events.push_back(UaEvent::Ended {
                        call: call_id,
                        by_peer: true,
                    });
                }
            }
            Method::Options => {
                let mut r = Message::response_to(&m, 200, "OK", None);
                r.push(HeaderName::ALLOW, ALLOW);
                self.out.push_back(r.to_bytes());
            }
            Method::Message => {
                let r = Message::response_to(&m, 200, "OK", Some(&self.token()));
                self.out.push_back(r.to_bytes());
                self.events.push_back(UaEvent::Message {
                    from: m.header(&HeaderName::FROM).unwrap_or("").to_string(),
                    content_type: m
                        .header(&HeaderName::CONTENT_TYPE)
                        .unwrap_or("")
                        .to_string(),
                    body: m.body.clone(),
                });
            }
            _ => {
                let mut r = Message::response_to(&m, 405, "Method Not Allowed", None);
                r.push(HeaderName::ALLOW, ALLOW);
                self.out.push_back(r.to_bytes());
            }
        }
        let _ = now;
    }

    /// Re-sends the INVITE with credentials for a 401/407.
    fn authorized_retry(&mut self, call_id: &str, m: &Message, code: u16) -> Option<Vec<u8>> {
        let (user, pass) = self.config.credentials.clone()?;
        let name = if code == 401 {
            HeaderName::WWW_AUTHENTICATE
        } else {
            HeaderName::PROXY_AUTHENTICATE
        };
        let challenges: Vec<&str> = m.lines(&name).collect();
        self.nc += 1;
        let cnonce = self.token();
        let branch = self.branch();
        let c = self.calls.get_mut(call_id)?;
        let uri = match &c.invite.start {
            StartLine::Request { uri, .. } => uri.to_string(),
            _ => return None,
        };
        let auth = digest::respond(&challenges, "INVITE", &uri, &user, &pass, &cnonce, self.nc)?;
        // ACK the challenge, then a new INVITE transaction.
        let ack = ack_non_2xx(&c.invite, m);
        self.out.push_back(ack.to_bytes());
        let mut inv = c.invite.clone();
        c.local_cseq += 1;
        inv.set(HeaderName::CSEQ, format!("{} INVITE", c.local_cseq));
        inv.remove(&HeaderName::VIA);
        inv.prepend(
            HeaderName::VIA,
            format!(
                "SIP/2.0/{} {};branch={branch};rport",
                self.config.transport, self.config.local
            ),
        );
        let header = if code == 401 {
            HeaderName::AUTHORIZATION
        } else {
            HeaderName::PROXY_AUTHORIZATION
        };
        inv.set(header, auth);
        c.auth_tries += 1;
        c.invite = inv.clone();
        Some(inv.to_bytes())
    }

    /// An in-dialog request (BYE, re-INVITE).
    fn in_dialog(
        &mut self,
        _now: Instant,
        call: &str,
        method: Method,
        sdp: Option<&str>,
        identity: Option<&str>,
    ) -> Result<Message, UaError> {
        let via = self.via_value();
        let contact = self.contact(false);
        let c = self.calls.get_mut(call).ok_or(UaError::NoCall)?;
        let target = c
            .remote_target
            .clone()
            .ok_or(UaError::State("request in a call without a Contact"))?;
        c.local_cseq = c.local_cseq.max(first_cseq(&c.invite)) + 1;
        let mut m = Message::request(method.clone(), target);
        m.push(HeaderName::VIA, via);
        m.push(HeaderName::MAX_FORWARDS, "70");
        for r in &c.route {
            m.push(HeaderName::ROUTE, r.clone());
        }
        m.push(HeaderName::FROM, c.local_uri.clone());
        m.push(HeaderName::TO, c.remote_uri.clone());
        m.push(HeaderName::CALL_ID, call.to_string());
        m.push(
            HeaderName::CSEQ,
            format!("{} {}", c.local_cseq, method.as_str()),
        );
        if method == Method::Invite {
            m.push(HeaderName::CONTACT, contact);
        }
        if let Some(id) = identity {
            m.push(HeaderName::IDENTITY, id);
        }
        if let Some(sdp) = sdp {
            m.push(HeaderName::CONTENT_TYPE, "application/sdp");
            m.body = sdp.as_bytes().to_vec();
        }
        Ok(m)
    }

    fn send_register(&mut self, now: Instant, expires: u32, auth: Option<(HeaderName, String)>) {
        let uri = Uri::parse(&format!("sip:{}", self.config.domain))
            .unwrap_or_else(|_| Uri::host_port(&self.config.domain, None));
        self.reg.cseq += 1;
        let branch = self.branch();
        let mut m = Message::request(Method::Register, uri);
        m.push(
            HeaderName::VIA,
            format!(
                "SIP/2.0/{} {};branch={branch};rport",
                self.config.transport, self.config.local
            ),
        );
        m.push(HeaderName::MAX_FORWARDS, "70");
        let aor = self.config.aor();
        m.push(HeaderName::FROM, format!("<{aor}>;tag={}", self.reg.tag));
        m.push(HeaderName::TO, format!("<{aor}>"));
        m.push(HeaderName::CALL_ID, self.reg.call_id.clone());
        m.push(HeaderName::CSEQ, format!("{} REGISTER", self.reg.cseq));
        m.push(HeaderName::CONTACT, self.contact(true));
        m.push(HeaderName::EXPIRES, expires.to_string());
        m.push(HeaderName::SUPPORTED, "outbound, path");
        m.push(HeaderName::ALLOW, ALLOW);
        if let Some((name, value)) = auth {
            m.push(name, value);
        }
        self.reg.pending = Some((branch, expires, now + TRANSACTION_TIMEOUT));
        self.out.push_back(m.to_bytes());
    }

    /// Our Contact; for REGISTER with the outbound instance and reg-id and
    /// the push parameters.
    fn contact(&self, register: bool) -> String {
        let transport = self.config.transport.to_ascii_lowercase();
        let mut uri = format!(
            "sip:{}@{};transport={}",
            escape_user(&self.config.handle),
            self.config.local,
            if transport == "wss" { "ws" } else { &transport }
        );
        if let Some(p) = self.config.push.as_ref().filter(|_| register) {
            uri.push_str(&format!(";pn-provider={};pn-prid={}", p.provider, p.prid));
            if let Some(param) = &p.param {
                uri.push_str(&format!(";pn-param={param}"));
            }
        }
        let mut out = format!("<{uri}>;+sip.instance=\"<{}>\"", self.config.instance);
        if register {
            out.push_str(";reg-id=1");
        }
        out
    }

    fn via_value(&mut self) -> String {
        let branch = self.branch();
        format!(
            "SIP/2.0/{} {};branch={branch};rport",
            self.config.transport, self.config.local
        )
    }

    fn push_via(&mut self, m: &mut Message) {
        let v = self.via_value();
        m.push(HeaderName::VIA, v);
    }

    fn branch(&mut self) -> String {
        format!("z9hG4bK{}", self.token())
    }

    /// 64 random-looking bits as hex (xorshift from the seed).
    fn token(&mut self) -> String {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        format!("{x:016x}")
    }
}

impl Call {
    fn outgoing_reinvite(&self) -> bool {
        self.reinvite
            .as_ref()
            .is_some_and(|m| m.tag(&HeaderName::FROM) == Some(self.local_tag.as_str()))
    }
}

fn first_cseq(m: &Message) -> u32 {
    m.cseq().map_or(0, |(n, _)| n)
}

fn body(m: &Message) -> String {
    String::from_utf8_lossy(&m.body).into_owned()
}

/// The expiry the registrar granted our instance's binding.
fn granted_expires(m: &Message, instance: &str) -> Option<u32> {
    for v in m.values(&HeaderName::CONTACT) {
        if let Ok(na) = NameAddr::parse(v) {
            let ours = na
                .param("+sip.instance")
                .flatten()
                .is_some_and(|i| i.contains(instance));
            if ours {
                if let Some(Some(e)) = na.param("expires") {
                    return e.parse().ok();
                }
            }
        }
    }
    m.header(&HeaderName::EXPIRES)?.trim().parse().ok()
}

/// `text="…"` of a Reason header.
fn reason_text(v: &str) -> Option<String> {
    let i = v.find("text=")?;
    let t = v[i + 5..].trim_start();
    let t = t
        .strip_prefix('"')
        .map_or(t, |t| t.split('"').next().unwrap_or(t));
    Some(t.split(';').next().unwrap_or(t).to_string())
}

/// CANCEL for a pending INVITE (RFC 3261 §9.1): same Request-URI,
/// Call-ID, From, To, CSeq number and top Via.
fn cancel_for(invite: &Message) -> Message {
    let uri = match &invite.start {
        StartLine::Request { uri, .. } => uri.clone(),
        _ => unreachable_uri(),
    };
    let mut m = Message::request(Method::Cancel, uri);
    if let Some(v) = invite.header(&HeaderName::VIA) {
        m.push(HeaderName::VIA, v.to_string());
    }
    m.push(HeaderName::MAX_FORWARDS, "70");
    for name in [HeaderName::FROM, HeaderName::TO, HeaderName::CALL_ID] {
        if let Some(v) = invite.header(&name) {
            m.push(name, v.to_string());
        }
    }
    for r in invite.values(&HeaderName::ROUTE) {
        m.push(HeaderName::ROUTE, r.to_string());
    }
    m.push(HeaderName::CSEQ, format!("{} CANCEL", first_cseq(invite)));
    m
}

/// ACK for a non-2xx final response: the INVITE's branch and Request-URI,
/// the response's To (RFC 3261 §17.1.1.3).
fn ack_non_2xx(invite: &Message, resp: &Message) -> Message {
    let uri = match &invite.start {
        StartLine::Request { uri, .. } => uri.clone(),
        _ => unreachable_uri(),
    };
    let mut m = Message::request(Method::Ack, uri);
    if let Some(v) = invite.header(&HeaderName::VIA) {
        m.push(HeaderName::VIA, v.to_string());
    }
    m.push(HeaderName::MAX_FORWARDS, "70");
    if let Some(v) = invite.header(&HeaderName::FROM) {
        m.push(HeaderName::FROM, v.to_string());
    }
    if let Some(v) = resp.header(&HeaderName::TO) {
        m.push(HeaderName::TO, v.to_string());
    }
    m.push(HeaderName::CALL_ID, invite.call_id().to_string());
    m.push(HeaderName::CSEQ, format!("{} ACK", first_cseq(invite)));
    m
}

/// ACK for a 2xx: a new transaction to the remote target along the route
/// set (RFC 3261 §13.2.2.4).
fn ack_for(c: &Call, cseq: u32, resp: &Message) -> Message {
    let target = c
        .remote_target
        .clone()
        .unwrap_or_else(|| match &c.invite.start {
            StartLine::Request { uri, .. } => uri.clone(),
            _ => unreachable_uri(),
        });
    let mut m = Message::request(Method::Ack, target);
    let via = c
        .invite
        .header(&HeaderName::VIA)
        .map(|v| match v.find("branch=") {
            Some(i) => {
                let end = v[i..].find(';').map_or(v.len(), |e| i + e);
                format!(
                    "{}branch=z9hG4bK{}a{cseq}{}",
                    &v[..i],
                    c.local_tag,
                    &v[end..]
                )
            }
            None => v.to_string(),
        })
        .unwrap_or_default();
    m.push(HeaderName::VIA, via);
    m.push(HeaderName::MAX_FORWARDS, "70");
    for r in &c.route {
        m.push(HeaderName::ROUTE, r.clone());
    }
    m.push(HeaderName::FROM, c.local_uri.clone());
    let to = resp
        .header(&HeaderName::TO)
        .map(str::to_string)
        .unwrap_or_else(|| c.remote_uri.clone());
    m.push(HeaderName::TO, to);
    m.push(HeaderName::CALL_ID, c.invite.call_id().to_string());
    m.push(HeaderName::CSEQ, format!("{cseq} ACK"));
    m
}

fn unreachable_uri() -> Uri {
    Uri::host_port("invalid", None)
}
