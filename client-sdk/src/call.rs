//! Calls end to end, sans-IO: the SIP user agent, one media session per
//! call, and the PASSporTs that bind each side's DTLS key to a device key
//! that `ids` proved belongs to the handle.
//!
//! The app supplies the far side's device keys, from an `ids` lookup
//! whose key transparency proof verified: before dialing (the callee's
//! devices) and when a call comes in (the caller's, [`Phone::ring`]).
//! Nothing is keyed, rung or answered before the far device's PASSporT
//! verified against one of those keys over the SDP actually received;
//! a mismatch ends the call with [`CallError::Security`].
//!
//! I/O: one stream to the proxy (`sip` calls) and one UDP socket per call
//! for its media (`media` calls), plus the audio clock.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use wire::handle::Handle;
use wire::keys::{DeviceId, PublicKey, SigningKey};
use wire::passport::{self, Claims};

use crate::media::audio::Decoded;
use crate::media::{
    CallStats, Datagram, MediaConfig, MediaError, MediaEvent, MediaSession, VerifiedSdp,
};
use crate::sip::{CallId, UaConfig, UaError, UaEvent, UserAgent};

/// After a glare (RFC 3261 §14.1): the owner of the Call-ID offers again
/// after 2.1–4 s, the other end after 0–2 s. Fixed points in those ranges
/// keep the two apart.
const GLARE_WAIT_OWNER: Duration = Duration::from_millis(2500);
const GLARE_WAIT_OTHER: Duration = Duration::from_millis(1000);
/// A restart that could not go out because a re-INVITE was under way.
const RESTART_RETRY: Duration = Duration::from_millis(500);

/// A device and its identity key, from a verified `ids` lookup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceKey {
    pub device: DeviceId,
    pub key: PublicKey,
}

/// 20 ms for the speaker, and how it was made (`None`: silence, nothing
/// has arrived yet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Played {
    pub pcm: Vec<i16>,
    pub how: Option<Decoded>,
}

/// Why a call ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndReason {
    /// We hung up.
    Local,
    /// The far end hung up.
    Remote,
    /// Another of our devices answered.
    AnsweredElsewhere,
    /// The caller gave up before we answered (or the call was declined
    /// on another of our devices).
    Cancelled(Option<String>),
    /// The call was refused or failed: SIP status and reason.
    Failed(u16, String),
    /// The far end's keys could not be authenticated.
    Security(String),
}

#[derive(Clone, Debug, PartialEq)]
pub enum CallEvent {
    /// A call for us. Look up `from` in `ids` and pass the verified
    /// device keys to [`Phone::ring`], with a socket for the media.
    Incoming {
        call: CallId,
        from: Handle,
        device: Option<DeviceId>,
    },
    /// Our phone rings (the caller is authenticated): answer or decline.
    Ringing {
        call: CallId,
    },
    /// A group call rings (its id is the room): `from` rang us with
    /// `members`, every device of whom the directory listed. Answer or
    /// decline it as any call.
    IncomingGroup {
        call: CallId,
        from: Handle,
        members: Vec<Handle>,
    },
    /// The far end's devices ring.
    Alerting {
        call: CallId,
    },
    /// The call is answered by `device` of the far handle, whose key the
    /// directory proved; `None` for a call placed with
    /// [`Phone::dial_unverified`], which nothing authenticates.
    Answered {
        call: CallId,
        device: Option<DeviceId>,
    },
    /// Media flows (ICE and DTLS up).
    MediaConnected {
        call: CallId,
    },
    /// `from` asks to join our group call by its link (the directory
    /// lists their device): answer the call to admit them, decline to
    /// refuse.
    JoinRequest {
        call: CallId,
        from: Handle,
    },
    /// The one-to-one call `from` became the group call `to` (someone was
    /// added): the media moves to the group call, and `from` ends.
    Upgraded {
        from: CallId,
        to: CallId,
    },
    /// `handle` answered our group call (one of its devices joins the
    /// room).
    MemberJoined {
        call: CallId,
        handle: Handle,
    },
    /// A device of `handle` left the group call: this device's key is
    /// new, sent to those who remain.
    MemberLeft {
        call: CallId,
        handle: Handle,
    },
    /// The relay carrying the call stopped answering; the call moves to
    /// another (an ICE restart).
    RelayMoved {
        call: CallId,
        from: SocketAddr,
        to: SocketAddr,
    },
    Stats {
        call: CallId,
        stats: Box<CallStats>,
    },
    Ended {
        call: CallId,
        reason: EndReason,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("security: {0}")]
    Security(String),
    #[error(transparent)]
    Media(#[from] MediaError),
    #[error(transparent)]
    Sip(#[from] UaError),
    #[error("no such call")]
    NoCall,
    #[error("{0}")]
    Handle(String),
}

#[derive(Debug, PartialEq, Eq)]
enum Stage {
    /// Caller: gathering candidates before the INVITE.
    Gathering,
    /// Caller: INVITE sent.
    Calling,
    /// Callee: waiting for the app's keys ([`Phone::ring`]).
    Incoming,
    /// Callee: gathering before ringing.
    Preparing,
    /// Callee: ringing, our answer SDP made.
    Ringing,
    Active,
}

#[derive(Debug)]
struct Call {
    stage: Stage,
    peer: Handle,
    /// The far side's devices; after the answer, the one that answered.
    keys: Vec<DeviceKey>,
    media: Option<MediaSession>,
    /// Callee: the offer and its Identity header; caller: unused.
    offer: Option<(String, Option<String>)>,
    answer_sdp: Option<String>,
    /// An ICE restart to offer once gathering is over (a network change,
    /// a new relay, stalled media).
    restart_pending: bool,
    /// When to offer the restart again after a glare (491) or a re-offer
    /// that could not go out.
    restart_at: Option<Instant>,
    /// The far end's re-offer, waiting for our gathering to end: the
    /// answer must carry the new candidates.
    deferred_reoffer: Option<(String, Option<String>)>,
    /// We placed the call (we own its Call-ID, RFC 3261 §14.1).
    placed: bool,
    /// Caller: Alerting was reported.
    alerted: bool,
    /// The far end is a SIP phone outside the key directory (placed with
    /// `dial_unverified`, or taken with `ring_unverified`); its SDP is
    /// taken as signaling delivered it.
    unverified: bool,
}

/// This device's calls.
#[derive(Debug)]
pub struct Phone {
    ua: UserAgent,
    handle: Handle,
    device: DeviceId,
    key: SigningKey,
    media_config: MediaConfig,
    calls: HashMap<CallId, Call>,
    events: VecDeque<CallEvent>,
    media_out: VecDeque<(CallId, Datagram)>,
    dial_seq: u64,
    /// The SIP dialogs of group calls, whose media is the device's own
    /// business (the SFU), and what the user agent said of them and of
    /// MESSAGEs: see [`Phone::poll_group_event`].
    group_calls: std::collections::HashSet<CallId>,
    group_events: VecDeque<UaEvent>,
}

/// The Identity header's `info` URI naming the signing device.
fn device_info(device: DeviceId) -> String {
    format!("urn:parley:device:{device}")
}

fn info_device(identity: &str) -> Option<DeviceId> {
    let info = passport::info(identity)?;
    let hex = info.strip_prefix("urn:parley:device:")?;
    let bytes = wire::keys::unhex(hex)?;
    Some(DeviceId(bytes.try_into().ok()?))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The handle a SIP From/To value names (`sip:<handle>@domain`).
pub(crate) fn handle_of(value: &str) -> Option<Handle> {
    let na = wire::sip::uri::NameAddr::parse(value).ok()?;
    Handle::parse(&na.uri.user_unescaped()?).ok()
}

impl Phone {
    pub fn new(
        ua: UaConfig,
        handle: Handle,
        device: DeviceId,
        key: SigningKey,
        media_config: MediaConfig,
        seed: u64,
    ) -> Phone {
        Phone {
            ua: UserAgent::new(ua, seed),
            handle,
            device,
            key,
            media_config,
            calls: HashMap::new(),
            events: VecDeque::new(),
            media_out: VecDeque::new(),
            dial_seq: 0,
            group_calls: std::collections::HashSet::new(),
            group_events: VecDeque::new(),
        }
    }

    /// Rings `handle` into the group call in `room` (see
    /// [`UserAgent::invite_group`]); its SIP dialog's id.
    pub fn invite_group(
        &mut self,
        now: Instant,
        handle: &Handle,
        room: &str,
        roster: &str,
    ) -> Result<CallId, CallError> {
        let call = self.ua.next_call_id();
        self.ua
            .invite_group(now, &call, handle.as_str(), room, roster)?;
        self.group_calls.insert(call.clone());
        Ok(call)
    }

    /// What the user agent said of group calls' dialogs (incoming, room
    /// passes, answers, ends) and of MESSAGEs, for the device to act on.
    pub fn poll_group_event(&mut self) -> Option<UaEvent> {
        self.group_events.pop_front()
    }

    pub fn ua(&mut self) -> &mut UserAgent {
        &mut self.ua
    }

    /// Calls `callee`, whose devices (from a verified lookup) are `keys`,
    /// with media on the socket bound at `local`. The INVITE goes out once
    /// candidates are gathered. Returns the call's id (its Call-ID).
    pub fn dial(
        &mut self,
        now: Instant,
        callee: &Handle,
        keys: Vec<DeviceKey>,
        local: SocketAddr,
    ) -> Result<CallId, CallError> {
        self.place(now, callee, keys, local, false)
    }

    /// Calls whatever answers for `callee` at signaling (a SIP phone with
    /// a digest account, outside the key directory), like [`Phone::dial`]
    /// but without a PASSporT check on the answer: media is still
    /// encrypted (DTLS-SRTP), but nothing proves who holds the far key,
    /// so signaling could sit in the middle. Only for peers that cannot
    /// be in the directory, and the app should say so.
    pub fn dial_unverified(
        &mut self,
        now: Instant,
        callee: &Handle,
        local: SocketAddr,
    ) -> Result<CallId, CallError> {
        self.place(now, callee, Vec::new(), local, true)
    }

    fn place(
        &mut self,
        now: Instant,
        callee: &Handle,
        keys: Vec<DeviceKey>,
        local: SocketAddr,
        unverified: bool,
    ) -> Result<CallId, CallError> {
        self.dial_seq += 1;
        let id = self.ua.next_call_id();
        let mut config = self.media_config.clone();
        config.seed = config.seed.wrapping_add(self.dial_seq);
        config.sip_phone = unverified;
        let media = MediaSession::new(now, config, local)?;
        self.calls.insert(
            id.clone(),
            Call {
                stage: Stage::Gathering,
                peer: callee.clone(),
                keys,
                media: Some(media),
                offer: None,
                answer_sdp: None,
                restart_pending: false,
                restart_at: None,
                deferred_reoffer: None,
                placed: true,
                alerted: false,
                unverified,
            },
        );
        self.drive(now, &id)?;
        Ok(id)
    }

    /// An incoming call from a SIP phone outside the key directory (no
    /// PASSporT, no devices in a lookup of `from`), with a socket for its
    /// media: the phone rings without any check, as for
    /// [`Phone::dial_unverified`]. Only when the app chose to take such
    /// calls; [`Phone::ring`] refuses them.
    pub fn ring_unverified(
        &mut self,
        now: Instant,
        call: &str,
        local: SocketAddr,
    ) -> Result<(), CallError> {
        self.take_incoming(now, call, None, local)
    }

    /// An incoming call's caller keys (from a verified lookup of the
    /// `from` handle) and the socket for its media: the PASSporT is
    /// checked and, if it holds, the phone rings. If it does not, the
    /// call is refused with 438 (RFC 8224) and ends with a security
    /// reason.
    pub fn ring(
        &mut self,
        now: Instant,
        call: &str,
        keys: Vec<DeviceKey>,
        local: SocketAddr,
    ) -> Result<(), CallError> {
        self.take_incoming(now, call, Some(keys), local)
    }

    /// Rings an incoming call: checked against `keys`, or (`None`) an
    /// unverified SIP phone's.
    fn take_incoming(
        &mut self,
        now: Instant,
        call: &str,
        keys: Option<Vec<DeviceKey>>,
        local: SocketAddr,
    ) -> Result<(), CallError> {
        let c = self.calls.get_mut(call).ok_or(CallError::NoCall)?;
        if c.stage != Stage::Incoming {
            return Err(CallError::Sip(UaError::State("ring")));
        }
        let sip_phone = keys.is_none();
        match keys {
            Some(keys) => c.keys = keys,
            None => c.unverified = true,
        }
        let (sdp, identity) = c.offer.clone().unwrap_or_default();
        if let Err(e) = c.check(&sdp, identity.as_deref()) {
            let _ = self.ua.decline(call, 438);
            self.end(call, EndReason::Security(e.to_string()));
            return Err(e);
        }
        let mut config = self.media_config.clone();
        config.seed = config.seed.wrapping_add(call.len() as u64 + self.dial_seq);
        config.sip_phone = sip_phone;
        let c = self.calls.get_mut(call).ok_or(CallError::NoCall)?;
        c.media = Some(MediaSession::new(now, config, local)?);
        c.stage = Stage::Preparing;
        self.drive(now, call)
    }

    /// Answers a ringing call.
    pub fn answer(&mut self, now: Instant, call: &str) -> Result<(), CallError> {
        let c = self.calls.get_mut(call).ok_or(CallError::NoCall)?;
        if c.stage != Stage::Ringing {
            return Err(CallError::Sip(UaError::State("answer")));
        }
        let sdp = c.answer_sdp.clone().unwrap_or_default();
        let identity = self.sign(call, &sdp, false)?;
        self.ua.answer(now, call, &sdp, Some(&identity))?;
        if let Some(c) = self.calls.get_mut(call) {
            c.stage = Stage::Active;
        }
        Ok(())
    }

    /// Declines a call: 603 ends it on all the handle's devices.
    pub fn decline(&mut self, call: &str) -> Result<(), CallError> {
        if self.calls.get(call).is_some_and(|c| {
            c.stage == Stage::Incoming || c.stage == Stage::Preparing || c.stage == Stage::Ringing
        }) {
            self.ua.decline(call, 603)?;
            self.end(call, EndReason::Local);
            return Ok(());
        }
        Err(CallError::NoCall)
    }

    pub fn hangup(&mut self, now: Instant, call: &str) -> Result<(), CallError> {
        let c = self.calls.get(call).ok_or(CallError::NoCall)?;
        if c.stage != Stage::Gathering {
            self.ua.hangup(now, call)?;
        }
        // A caller's CANCEL ends with the 487; everything else now.
        if c.stage != Stage::Calling {
            self.end(call, EndReason::Local);
        }
        Ok(())
    }

    /// The device's network changed; the call's media socket is now
    /// bound at `local`. ICE restarts (re-INVITE) once gathered.
    pub fn network_changed(
        &mut self,
        now: Instant,
        call: &str,
        local: SocketAddr,
    ) -> Result<(), CallError> {
        let c = self.calls.get_mut(call).ok_or(CallError::NoCall)?;
        let m = c.media.as_mut().ok_or(CallError::NoCall)?;
        m.network_changed(now, local)?;
        c.restart_pending = true;
        self.drive(now, call)
    }

    pub fn mute(&mut self, call: &str, muted: bool) {
        if let Some(m) = self.calls.get_mut(call).and_then(|c| c.media.as_mut()) {
            m.set_muted(muted);
        }
    }

    /// Who a one-to-one call in progress is with (answered, either way).
    pub fn peer(&self, call: &str) -> Option<&Handle> {
        self.calls
            .get(call)
            .filter(|c| c.stage == Stage::Active)
            .map(|c| &c.peer)
    }

    pub fn stats(&self, call: &str, now: Instant) -> Option<CallStats> {
        self.calls
            .get(call)
            .and_then(|c| c.media.as_ref())
            .map(|m| m.stats(now))
    }

    /// One 20 ms microphone frame for the call.
    pub fn send_audio(&mut self, now: Instant, call: &str, pcm: &[i16]) -> Result<(), CallError> {
        if let Some(m) = self.calls.get_mut(call).and_then(|c| c.media.as_mut()) {
            // Every frame, connected or not: the RTP clock must keep time
            // through an outage, or the far end's playout runs ahead of
            // it and drops what comes after as late.
            m.send_audio(now, pcm)?;
        }
        self.collect(now, call);
        Ok(())
    }

    /// One camera frame for the call (see [`MediaSession::send_video`]).
    pub fn send_video(
        &mut self,
        now: Instant,
        call: &str,
        frame: &openh264::formats::YUVBuffer,
    ) -> Result<(), CallError> {
        if let Some(m) = self.calls.get_mut(call).and_then(|c| c.media.as_mut()) {
            if m.is_connected() {
                m.send_video(now, frame)?;
            }
        }
        self.collect(now, call);
        Ok(())
    }

    pub fn set_camera(&mut self, call: &str, on: bool) {
        if let Some(m) = self.calls.get_mut(call).and_then(|c| c.media.as_mut()) {
            m.set_camera(on);
        }
    }

    /// The call's next 20 ms for the speaker.
    pub fn play_audio(&mut self, now: Instant, call: &str) -> Result<Option<Played>, CallError> {
        let Some(m) = self.calls.get_mut(call).and_then(|c| c.media.as_mut()) else {
            return Ok(None);
        };
        let (pcm, how) = m.play_audio(now)?;
        Ok(Some(Played {
            pcm: pcm.to_vec(),
            how,
        }))
    }

    /// Bytes from the stream to the proxy.
    pub fn handle_sip_input(&mut self, now: Instant, bytes: &[u8]) -> Result<(), CallError> {
        self.ua.handle_input(now, bytes)?;
        self.ua_events(now);
        Ok(())
    }

    /// A datagram on a call's media socket.
    pub fn handle_media_input(
        &mut self,
        now: Instant,
        call: &str,
        from: SocketAddr,
        data: &[u8],
    ) -> Result<(), CallError> {
        if let Some(m) = self.calls.get_mut(call).and_then(|c| c.media.as_mut()) {
            m.handle_input(now, from, data)?;
        }
        self.drive(now, call)
    }

    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), CallError> {
        self.ua.handle_timeout(now);
        self.ua_events(now);
        let ids: Vec<CallId> = self.calls.keys().cloned().collect();
        for id in ids {
            if let Some(c) = self.calls.get_mut(&id) {
                if c.restart_at.is_some_and(|t| t <= now) {
                    c.restart_at = None;
                    c.restart_pending = true;
                    self.on_gathered(now, &id)?;
                }
            }
            if let Some(m) = self.calls.get_mut(&id).and_then(|c| c.media.as_mut()) {
                if m.poll_timeout() <= now {
                    m.handle_timeout(now)?;
                }
            }
            self.drive(now, &id)?;
        }
        Ok(())
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let media = self
            .calls
            .values()
            .filter_map(|c| c.media.as_ref().map(MediaSession::poll_timeout))
            .chain(self.calls.values().filter_map(|c| c.restart_at))
            .min();
        match (self.ua.poll_timeout(), media) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn poll_sip_transmit(&mut self) -> Option<Vec<u8>> {
        self.ua.poll_transmit()
    }

    /// A datagram for a call's media socket.
    pub fn poll_media_transmit(&mut self) -> Option<(CallId, Datagram)> {
        self.media_out.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<CallEvent> {
        self.events.pop_front()
    }

    /// Checks the far end's re-offer and answers it from the media as it
    /// is now.
    fn answer_reoffer(
        &mut self,
        now: Instant,
        call: &str,
        sdp: &str,
        identity: Option<&str>,
    ) -> Result<(), CallError> {
        let Some(c) = self.calls.get_mut(call) else {
            return Ok(());
        };
        match c.check(sdp, identity) {
            Ok((_, verified)) => {
                let media = c.media.as_mut().ok_or(CallError::NoCall)?;
                let answer = media.accept_offer(now, &verified)?;
                // Our current candidates go with the answer, and the far
                // end's restart renews ICE both ways.
                c.restart_pending = false;
                c.restart_at = None;
                let identity = self.sign(call, &answer, false)?;
                self.ua.answer_reoffer(call, &answer, Some(&identity))?;
                self.collect(now, call);
            }
            Err(e) => {
                let _ = self.ua.hangup(now, call);
                self.end(call, EndReason::Security(e.to_string()));
            }
        }
        Ok(())
    }

    /// Moves a call on after its media changed.
    fn drive(&mut self, now: Instant, id: &str) -> Result<(), CallError> {
        let mut gathered = false;
        let mut media_events = Vec::new();
        if let Some(m) = self.calls.get_mut(id).and_then(|c| c.media.as_mut()) {
            while let Some(e) = m.poll_event() {
                if matches!(e, MediaEvent::Gathered { .. }) {
                    gathered = true;
                }
                media_events.push(e);
            }
        }
        for e in media_events {
            match e {
                MediaEvent::Gathered { .. } => {
                    // Gathered again mid-call: the far end needs the new
                    // candidates.
                    if let Some(c) = self.calls.get_mut(id) {
                        if c.stage == Stage::Active {
                            c.restart_pending = true;
                        }
                    }
                }
                MediaEvent::RelayMoved { from, to } => {
                    self.events.push_back(CallEvent::RelayMoved {
                        call: id.into(),
                        from,
                        to,
                    })
                }
                MediaEvent::Connected => self
                    .events
                    .push_back(CallEvent::MediaConnected { call: id.into() }),
                MediaEvent::Stats(stats) => self.events.push_back(CallEvent::Stats {
                    call: id.into(),
                    stats,
                }),
                MediaEvent::Stalled => {
                    // A NAT rebound under us, or the far end moved: find a
                    // path again.
                    if let Some(c) = self.calls.get_mut(id) {
                        if c.stage == Stage::Active {
                            c.restart_pending = true;
                            gathered = true;
                        }
                    }
                }
                _ => {}
            }
        }
        if gathered {
            if let Err(e) = self.on_gathered(now, id) {
                // No usable candidates (say the relay refused): the call
                // cannot have media, so it ends rather than rings.
                match self.calls.get(id).map(|c| &c.stage) {
                    Some(Stage::Preparing) => {
                        let _ = self.ua.decline(id, 488);
                        self.end(id, EndReason::Failed(488, e.to_string()));
                    }
                    Some(Stage::Gathering) | Some(Stage::Calling) => {
                        self.end(id, EndReason::Failed(0, e.to_string()));
                    }
                    Some(Stage::Active) => {
                        // No relay left to restart through: the call
                        // stays on the path it has, which may come back.
                        tracing::warn!(call = id, error = %e, "ICE restart");
                    }
                    _ => return Err(e),
                }
            }
        }
        self.collect(now, id);
        Ok(())
    }

    fn collect(&mut self, _now: Instant, id: &str) {
        if let Some(m) = self.calls.get_mut(id).and_then(|c| c.media.as_mut()) {
            while let Some(d) = m.poll_transmit() {
                self.media_out.push_back((id.to_string(), d));
            }
        }
    }

    fn on_gathered(&mut self, now: Instant, id: &str) -> Result<(), CallError> {
        let Some(c) = self.calls.get_mut(id) else {
            return Ok(());
        };
        match c.stage {
            Stage::Gathering => {
                let media = c.media.as_mut().ok_or(CallError::NoCall)?;
                let offer = media.create_offer(now)?;
                c.stage = Stage::Calling;
                let peer = c.peer.clone();
                let identity = self.sign_for(&peer, &offer, true);
                self.ua
                    .invite_as(now, id, peer.as_str(), &offer, Some(&identity))?;
            }
            Stage::Preparing => {
                let (sdp, identity) = c.offer.clone().unwrap_or_default();
                // ring() checked the PASSporT; the check hands over the
                // verified SDP for the media engine.
                let (_, verified) = c.check(&sdp, identity.as_deref())?;
                let media = c.media.as_mut().ok_or(CallError::NoCall)?;
                let answer = media.accept_offer(now, &verified)?;
                c.answer_sdp = Some(answer);
                c.stage = Stage::Ringing;
                self.events
                    .push_back(CallEvent::Ringing { call: id.into() });
            }
            Stage::Active if c.media.as_ref().is_some_and(|m| !m.is_gathered()) => {
                // Still gathering: the Gathered event brings us back.
            }
            Stage::Active if c.deferred_reoffer.is_some() => {
                // The far end's restart waited for our candidates; the
                // answer carries them, so ours is not needed.
                let (sdp, identity) = c.deferred_reoffer.take().unwrap_or_default();
                c.restart_pending = false;
                c.restart_at = None;
                self.answer_reoffer(now, id, &sdp, identity.as_deref())?;
            }
            Stage::Active if c.restart_pending => {
                c.restart_pending = false;
                let media = c.media.as_mut().ok_or(CallError::NoCall)?;
                let offer = media.create_restart_offer(now)?;
                let peer = c.peer.clone();
                let identity = self.sign_for(&peer, &offer, true);
                if self.ua.reoffer(now, id, &offer, Some(&identity)).is_err() {
                    // A re-INVITE is already under way (ours or the far
                    // end's): try again after it.
                    if let Some(c) = self.calls.get_mut(id) {
                        c.restart_at = Some(now + RESTART_RETRY);
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn ua_events(&mut self, now: Instant) {
        while let Some(e) = self.ua.poll_event() {
            if let Err(err) = self.on_ua_event(now, e) {
                tracing::warn!(error = %err, "call event");
            }
        }
    }

    fn on_ua_event(&mut self, now: Instant, e: UaEvent) -> Result<(), CallError> {
        let group = match &e {
            UaEvent::IncomingGroup { call, .. } => {
                self.group_calls.insert(call.clone());
                true
            }
            UaEvent::RoomPass { .. } | UaEvent::Message { .. } | UaEvent::MessageDone { .. } => {
                true
            }
            UaEvent::Ringing { call } | UaEvent::Answered { call, .. } => {
                self.group_calls.contains(call)
            }
            UaEvent::Failed { call, .. }
            | UaEvent::Cancelled { call, .. }
            | UaEvent::Ended { call, .. } => self.group_calls.remove(call),
            _ => false,
        };
        if group {
            self.group_events.push_back(e);
            return Ok(());
        }
        match e {
            UaEvent::Incoming {
                call,
                from,
                sdp,
                identity,
            } => {
                let Some(peer) = handle_of(&from) else {
                    self.ua.decline(&call, 400)?;
                    return Ok(());
                };
                let device = identity.as_deref().and_then(info_device);
                self.calls.insert(
                    call.clone(),
                    Call {
                        stage: Stage::Incoming,
                        peer: peer.clone(),
                        keys: Vec::new(),
                        media: None,
                        offer: Some((sdp, identity)),
                        answer_sdp: None,
                        restart_pending: false,
                        restart_at: None,
                        deferred_reoffer: None,
                        placed: false,
                        alerted: false,
                        unverified: false,
                    },
                );
                self.events.push_back(CallEvent::Incoming {
                    call,
                    from: peer,
                    device,
                });
            }
            UaEvent::Answered {
                call,
                sdp,
                identity,
            } => {
                let Some(c) = self.calls.get_mut(&call) else {
                    return Ok(());
                };
                match c.check(&sdp, identity.as_deref()) {
                    Ok((device, verified)) => {
                        c.keys.retain(|k| Some(k.device) == device);
                        c.stage = Stage::Active;
                        let accepted = match c.media.as_mut() {
                            Some(m) => m.accept_answer(now, &verified),
                            None => Ok(()),
                        };
                        if let Err(e) = accepted {
                            // Answered, but with media we cannot take:
                            // the far end must not stay in a silent call.
                            let _ = self.ua.hangup(now, &call);
                            self.end(&call, EndReason::Failed(488, e.to_string()));
                            return Ok(());
                        }
                        self.events.push_back(CallEvent::Answered {
                            call: call.clone(),
                            device,
                        });
                        self.collect(now, &call);
                    }
                    Err(e) => {
                        let _ = self.ua.hangup(now, &call);
                        self.end(&call, EndReason::Security(e.to_string()));
                    }
                }
            }
            UaEvent::Ringing { call } => {
                // Once, however many devices ring.
                let first = self
                    .calls
                    .get_mut(&call)
                    .is_some_and(|c| !std::mem::replace(&mut c.alerted, true));
                if first {
                    self.events.push_back(CallEvent::Alerting { call });
                }
            }
            UaEvent::Failed { call, code, reason } => {
                self.end(&call, EndReason::Failed(code, reason));
            }
            UaEvent::Cancelled { call, reason } => {
                let r = if reason.as_deref() == Some("Call completed elsewhere") {
                    EndReason::AnsweredElsewhere
                } else {
                    EndReason::Cancelled(reason)
                };
                self.end(&call, r);
            }
            UaEvent::Ended { call, by_peer } => {
                if self.calls.contains_key(&call) {
                    self.end(
                        &call,
                        if by_peer {
                            EndReason::Remote
                        } else {
                            EndReason::Local
                        },
                    );
                }
            }
            UaEvent::ReOffer {
                call,
                sdp,
                identity,
            } => {
                let Some(c) = self.calls.get_mut(&call) else {
                    return Ok(());
                };
                if c.media.as_ref().is_some_and(|m| !m.is_gathered()) {
                    c.deferred_reoffer = Some((sdp, identity));
                    return Ok(());
                }
                self.answer_reoffer(now, &call, &sdp, identity.as_deref())?;
            }
            UaEvent::ReOfferRefused { call, code } => {
                let Some(c) = self.calls.get_mut(&call) else {
                    return Ok(());
                };
                // RFC 3261 §14.1: after a glare the owner of the Call-ID
                // waits 2.1–4 s and the other end under 2 s, so the two
                // restarts do not meet again. Our candidates may still be
                // unknown to the far end, so offer again either way.
                let wait = if c.placed {
                    GLARE_WAIT_OWNER
                } else {
                    GLARE_WAIT_OTHER
                };
                tracing::debug!(call, code, "re-offer refused; offering again later");
                c.restart_at = Some(now + wait);
            }
            UaEvent::ReAnswered {
                call,
                sdp,
                identity,
            } => {
                let Some(c) = self.calls.get_mut(&call) else {
                    return Ok(());
                };
                match c.check(&sdp, identity.as_deref()) {
                    Ok((_, verified)) => {
                        if let Some(m) = c.media.as_mut() {
                            m.accept_answer(now, &verified)?;
                        }
                        self.collect(now, &call);
                    }
                    Err(e) => {
                        let _ = self.ua.hangup(now, &call);
                        self.end(&call, EndReason::Security(e.to_string()));
                    }
                }
            }
            UaEvent::IncomingGroup { .. } => {}
            UaEvent::Registered { .. }
            | UaEvent::RegistrationFailed { .. }
            | UaEvent::Unregistered
            | UaEvent::RoomPass { .. }
            | UaEvent::Message { .. }
            | UaEvent::MessageDone { .. } => {}
        }
        Ok(())
    }

    fn end(&mut self, call: &str, reason: EndReason) {
        if let Some(mut c) = self.calls.remove(call) {
            if let Some(m) = c.media.as_mut() {
                m.close(Instant::now());
                while let Some(d) = m.poll_transmit() {
                    self.media_out.push_back((call.to_string(), d));
                }
            }
            self.events.push_back(CallEvent::Ended {
                call: call.into(),
                reason,
            });
        }
    }

    /// Our PASSporT over `sdp` for the call's far handle.
    fn sign(&mut self, call: &str, sdp: &str, caller: bool) -> Result<String, CallError> {
        let peer = self.calls.get(call).ok_or(CallError::NoCall)?.peer.clone();
        Ok(self.sign_for(&peer, sdp, caller))
    }

    fn sign_for(&self, peer: &Handle, sdp: &str, caller: bool) -> String {
        let (orig, dest) = if caller {
            (self.handle.uri(), peer.uri())
        } else {
            (peer.uri(), self.handle.uri())
        };
        let claims = Claims {
            orig,
            dest: vec![dest],
            iat: unix_now(),
            mky: passport::sdp_fingerprints(sdp),
        };
        passport::identity_header(&claims, &self.key, &device_info(self.device))
    }
}

impl Call {
    /// The far end's SDP, checked as the call requires: against its
    /// devices' PASSporT, or (an unverified call) not at all. The device
    /// that signed, if any.
    fn check(
        &self,
        sdp: &str,
        identity: Option<&str>,
    ) -> Result<(Option<DeviceId>, VerifiedSdp), CallError> {
        if self.unverified {
            return Ok((None, VerifiedSdp::unauthenticated(sdp)));
        }
        let (device, verified) = verify(&self.peer, &self.keys, sdp, identity)?;
        Ok((Some(device), verified))
    }
}

/// Checks a PASSporT from one of `keys` (the devices of `peer`) over
/// `sdp`: the device it names, its signature and age, the fingerprints,
/// and that it speaks for `peer`.
fn verify(
    peer: &Handle,
    keys: &[DeviceKey],
    sdp: &str,
    identity: Option<&str>,
) -> Result<(DeviceId, VerifiedSdp), CallError> {
    let identity =
        identity.ok_or_else(|| CallError::Security("the far end sent no PASSporT".into()))?;
    let device = info_device(identity)
        .ok_or_else(|| CallError::Security("the PASSporT names no device".into()))?;
    let key = keys.iter().find(|k| k.device == device).ok_or_else(|| {
        CallError::Security(format!(
            "device {device} is not one of {}'s devices in the key directory",
            peer.redacted()
        ))
    })?;
    let verified = VerifiedSdp::verify(sdp, identity, &key.key, unix_now())
        .map_err(|e| CallError::Security(e.to_string()))?;
    let claims = verified
        .claims()
        .ok_or_else(|| CallError::Security("no claims".into()))?;
    let peer_uri = peer.uri();
    if claims.orig != peer_uri && !claims.dest.contains(&peer_uri) {
        return Err(CallError::Security(
            "the PASSporT is for another handle".into(),
        ));
    }
    Ok((device, verified))
}
