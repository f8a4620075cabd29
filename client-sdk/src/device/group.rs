//! Group calls on the device. The caller picks a random room, looks every
//! handle up in the key directory (verified), numbers every device of the
//! call (itself first) into a roster and rings each handle with an INVITE
//! naming the room. Signaling gives every participant a room token; each
//! device that takes part joins the SFU with its own [`GroupSession`] and
//! sends its sender key, sealed to each other member device and signed
//! (a [`KeyMessage`]), in a SIP MESSAGE to that member's handle.
//!
//! A callee believes no key the roster could name: it looks every handle
//! up itself and takes a member only if the directory lists that device
//! for that handle, so a device that signaling or the caller added is
//! refused; the call is refused if the roster names a device the
//! directory does not. Keys come only from members, sealed to this device
//! and signed by theirs ([`GroupKeys::accept`]).

use super::media_link::MediaLink;
use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use wire::group_key::KeyMessage;
use wire::handle::Handle;
use wire::keys::DeviceId;

use super::{CallEvent, DeviceError, DeviceEvent, Speaking, Task};
use crate::call::{handle_of, EndReason};
use crate::group::{GroupConfig, GroupSession, SfuClient};
use crate::group_keys::{GroupKeys, Member};
use crate::sip::{CallId, RoomPass, UaEvent};

/// The content type of a MESSAGE carrying sender keys (a JSON array of
/// [`KeyMessage`]s, each for one device).
pub const KEYS_TYPE: &str = "application/vnd.parley.keys+json";

/// The content type of a MESSAGE saying a device left a group call
/// ([`Left`]): the others draw new keys, so it cannot read what follows.
pub const LEFT_TYPE: &str = "application/vnd.parley.left+json";

/// The content type of a MESSAGE saying a member admitted someone by a
/// call link ([`Joined`]): the others send it their keys.
pub const JOINED_TYPE: &str = "application/vnd.parley.joined+json";

/// Someone admitted into a group call by a call link.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
struct Joined {
    room: String,
    handle: String,
    device: String,
    index: u16,
}

/// The call link parameter naming the room.
const LINK_ROOM: &str = ";parley-room=";

/// A call link: who admits (a member's handle) and the room.
pub fn parse_link(link: &str) -> Option<(Handle, String)> {
    let (uri, room) = link.trim().split_once(LINK_ROOM)?;
    let room = room.split(';').next()?.to_string();
    if !wire::room_token::valid_room(&room) {
        return None;
    }
    let na = wire::sip::uri::Uri::parse(uri).ok()?;
    Some((Handle::parse(&na.user_unescaped()?).ok()?, room))
}

/// A device leaving a group call.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
struct Left {
    room: String,
    device: String,
}

/// Who is in a group call, as the caller numbered them.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
struct Roster {
    room: String,
    members: Vec<RosterEntry>,
    /// The one-to-one call (its Call-ID) this group call takes over:
    /// someone was added to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    upgrade: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
struct RosterEntry {
    handle: String,
    device: String,
    index: u16,
}

/// The group call this device is in (one at a time).
pub(super) struct GroupCall {
    pub(super) room: String,
    /// Its SIP dialogs: the handles the caller rang, or the caller.
    dialogs: HashMap<CallId, Handle>,
    /// Everyone else, with the keys the directory gave.
    members: Vec<(Handle, Member)>,
    keys: Option<GroupKeys>,
    pass: Option<RoomPass>,
    session: Option<GroupSession>,
    socket: Option<MediaLink>,
    /// Where to leave the SFU: its client, our resource and token.
    joined: Option<(SfuClient, String, String)>,
    /// Keys that came before this device joined the SFU.
    pending: Vec<KeyMessage>,
    /// Callee: the dialog that rang us, until answered.
    ringing: Option<CallId>,
    /// Joining by a call link: the place in the call comes with the
    /// answer, not the INVITE.
    by_link: bool,
    /// The one-to-one call this group call takes over, hung up (by the
    /// caller) once the peer has answered the group call.
    upgrade: Option<CallId>,
    /// Someone asking to join by a call link, until admitted: the dialog,
    /// their handle and their device as the directory lists it.
    join_request: Option<(CallId, Handle, Member)>,
    placed: bool,
    alerted: bool,
    answered: bool,
    connected: bool,
    speaking: Option<Speaking>,
    /// Key MESSAGEs not yet taken: by their id, the handle, the body and
    /// the tries so far. One to a member that sleeps (waking for the
    /// call) fails; it is sent again.
    unsent: HashMap<String, (Handle, Vec<u8>, u8)>,
    /// Key MESSAGEs to send again, and when.
    resend: Vec<(std::time::Instant, Handle, Vec<u8>, u8)>,
}

/// A member whose frames stopped this long ago has left.
const VANISHED: std::time::Duration = std::time::Duration::from_secs(10);

/// How often, and how far apart, a key MESSAGE is tried.
const KEY_TRIES: u8 = 10;
const KEY_RETRY: std::time::Duration = std::time::Duration::from_millis(700);

impl GroupCall {
    /// A call placed (no pass yet, nothing ringing here) or ringing here
    /// (with its pass, and the dialog to answer).
    fn new(
        room: String,
        dialogs: HashMap<CallId, Handle>,
        members: Vec<(Handle, Member)>,
        keys: GroupKeys,
        pass: Option<RoomPass>,
        ringing: Option<CallId>,
    ) -> GroupCall {
        GroupCall {
            room,
            dialogs,
            members,
            keys: Some(keys),
            placed: ringing.is_none(),
            pass,
            session: None,
            socket: None,
            joined: None,
            pending: Vec::new(),
            ringing,
            by_link: false,
            upgrade: None,
            join_request: None,
            alerted: false,
            answered: false,
            connected: false,
            speaking: None,
            unsent: HashMap::new(),
            resend: Vec::new(),
        }
    }

    /// The key under which the device's socket map holds the SFU's socket.
    pub(super) fn media_key(&self) -> String {
        format!("group:{}", self.room)
    }

    pub(super) fn session(&mut self) -> Option<&mut GroupSession> {
        self.session.as_mut()
    }
}

/// A random room id: 128 bits, hex.
fn random_room() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    wire::keys::hex(&b)
}

/// The SFU's address and TLS name from its URL (`https://host:port`).
async fn sfu_address(url: &str) -> Result<(std::net::SocketAddr, String), DeviceError> {
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| DeviceError::Call(format!("the SFU's address is not https: {url}")))?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let host = match authority.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
        None => authority,
    };
    let addr = tokio::net::lookup_host(if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:443")
    })
    .await
    .map_err(|e| DeviceError::Call(format!("the SFU at {url}: {e}")))?
    .next()
    .ok_or_else(|| DeviceError::Call(format!("the SFU at {url} has no address")))?;
    Ok((addr, host.to_string()))
}

impl Task {
    /// Rings `handles` into a new group call; its id (the room).
    pub(super) async fn group_call(
        &mut self,
        now: std::time::Instant,
        handles: &[Handle],
        upgrade: Option<String>,
    ) -> Result<CallId, DeviceError> {
        if self.group.is_some() {
            return Err(DeviceError::Call("already in a group call".into()));
        }
        let found = self.ids.lookup(&self.me.key, handles).await?;
        let room = random_room();
        let me = Member {
            device: self.me.device,
            identity: self.me.key.public(),
            index: 1,
        };
        let mut members = Vec::new();
        let mut roster = vec![RosterEntry {
            handle: self.config.handle.as_str().to_string(),
            device: self.me.device.to_string(),
            index: 1,
        }];
        for h in handles {
            let devices = found
                .iter()
                .find(|f| f.handle == *h)
                .map(|f| f.devices.clone())
                .filter(|d| !d.is_empty())
                .ok_or_else(|| DeviceError::Unknown(h.redacted()))?;
            for d in devices {
                let index = roster.len() as u16 + 1;
                roster.push(RosterEntry {
                    handle: h.as_str().to_string(),
                    device: d.device.to_string(),
                    index,
                });
                members.push((
                    h.clone(),
                    Member {
                        device: d.device,
                        identity: d.key,
                        index,
                    },
                ));
            }
        }
        let roster = serde_json::to_string(&Roster {
            room: room.clone(),
            members: roster,
            upgrade: upgrade.clone(),
        })
        .map_err(|e| DeviceError::Call(e.to_string()))?;
        let keys =
            GroupKeys::new(&room, me.clone()).map_err(|e| DeviceError::Call(e.to_string()))?;
        let mut dialogs = HashMap::new();
        for h in handles {
            let call = self
                .phone
                .invite_group(now, h, &room, &roster)
                .map_err(|e| DeviceError::Call(e.to_string()))?;
            dialogs.insert(call, h.clone());
        }
        let mut g = GroupCall::new(room.clone(), dialogs, members, keys, None, None);
        g.upgrade = upgrade;
        self.group = Some(g);
        Ok(room)
    }

    /// Adds `handle` to the one-to-one call `call`: a group call rings the
    /// peer (whose device takes it at once) and `handle`; the one-to-one
    /// call ends once the group's media flows.
    pub(super) async fn add_to_call(
        &mut self,
        now: std::time::Instant,
        call: &str,
        handle: &Handle,
    ) -> Result<CallId, DeviceError> {
        let peer = self
            .phone
            .peer(call)
            .cloned()
            .ok_or_else(|| DeviceError::Call("no such call in progress".into()))?;
        self.group_call(now, &[peer, handle.clone()], Some(call.to_string()))
            .await
    }

    /// A link others can join this group call by (a member admits them).
    pub(super) fn call_link(&self, call: &str) -> Result<String, DeviceError> {
        let g = self
            .group
            .as_ref()
            .filter(|g| g.room == call && g.session.is_some())
            .ok_or_else(|| DeviceError::Call("not in that group call".into()))?;
        Ok(format!(
            "{}{LINK_ROOM}{}",
            crate::sip::handle_uri(self.config.handle.as_str(), &self.config.sip_domain),
            g.room
        ))
    }

    /// Asks to join a group call by its link: the member it names rings,
    /// and admitting us answers with our place in the call.
    pub(super) fn join_link(
        &mut self,
        now: std::time::Instant,
        link: &str,
    ) -> Result<CallId, DeviceError> {
        if self.group.is_some() {
            return Err(DeviceError::Call("already in a group call".into()));
        }
        let (member, room) = parse_link(link)
            .ok_or_else(|| DeviceError::Call(format!("not a call link: {link}")))?;
        let roster = serde_json::to_string(&Roster {
            room: room.clone(),
            members: vec![RosterEntry {
                handle: self.config.handle.as_str().to_string(),
                device: self.me.device.to_string(),
                index: 0,
            }],
            upgrade: None,
        })
        .map_err(|e| DeviceError::Call(e.to_string()))?;
        let call = self
            .phone
            .invite_group(now, &member, &room, &roster)
            .map_err(|e| DeviceError::Call(e.to_string()))?;
        let mut dialogs = HashMap::new();
        dialogs.insert(call, member);
        // Keys wait for our place in the call.
        let me = Member {
            device: self.me.device,
            identity: self.me.key.public(),
            index: 0,
        };
        let keys = GroupKeys::new(&room, me).map_err(|e| DeviceError::Call(e.to_string()))?;
        let mut g = GroupCall::new(room.clone(), dialogs, Vec::new(), keys, None, None);
        g.by_link = true;
        self.group = Some(g);
        Ok(room)
    }

    /// Our place in a call joined by link, from the admitting member's
    /// answer: the members (checked against the directory), then the SFU.
    async fn admitted(&mut self, call: &str, roster: &str) -> Result<(), DeviceError> {
        let roster: Roster = serde_json::from_str(roster)
            .map_err(|e| DeviceError::Call(format!("the admission's roster: {e}")))?;
        let (me, members) = self
            .check_roster(&roster)
            .await
            .map_err(|e| DeviceError::Call(format!("the admission's roster: {e}")))?;
        let Some(g) = self.group.as_mut().filter(|g| g.dialogs.contains_key(call)) else {
            return Ok(());
        };
        g.keys = Some(GroupKeys::new(&g.room, me).map_err(|e| DeviceError::Call(e.to_string()))?);
        g.members = members;
        g.by_link = false;
        self.join_sfu().await
    }

    /// Admits whoever asks to join by link: their place goes back in the
    /// answer, our key (ratcheted, so they read nothing said before) to
    /// them, and the news to the other members, who do the same.
    pub(super) async fn admit(&mut self, now: std::time::Instant) -> Result<(), DeviceError> {
        let my_handle = self.config.handle.clone();
        let identity = self.me.key.clone();
        let Some(g) = self.group.as_mut() else {
            return Err(DeviceError::Call("no group call".into()));
        };
        let Some((call, handle, mut joiner)) = g.join_request.take() else {
            return Err(DeviceError::Call("nobody asks to join".into()));
        };
        let Some(session) = g.session.as_mut() else {
            return Err(DeviceError::Call("not in the room yet".into()));
        };
        let mine = session.keys().kid() >> 16;
        // A random index above the ringing's (1..=255): two members who
        // admit someone at the same moment do not hand out the same one
        // (it would be the same SFrame key id), as "highest + 1" would.
        let taken = |i: u16| u64::from(i) == mine || g.members.iter().any(|(_, m)| m.index == i);
        joiner.index = (0..64)
            .find_map(|_| {
                use ring::rand::SecureRandom;
                let mut b = [0u8; 2];
                let _ = ring::rand::SystemRandom::new().fill(&mut b);
                let i = u16::from_be_bytes(b).max(256);
                (!taken(i)).then_some(i)
            })
            .ok_or_else(|| DeviceError::Call("no free place in the call".into()))?;
        let mut entries: Vec<RosterEntry> = g
            .members
            .iter()
            .map(|(h, m)| RosterEntry {
                handle: h.as_str().to_string(),
                device: m.device.to_string(),
                index: m.index,
            })
            .collect();
        entries.push(RosterEntry {
            handle: my_handle.as_str().to_string(),
            device: self.me.device.to_string(),
            index: mine as u16,
        });
        entries.push(RosterEntry {
            handle: handle.as_str().to_string(),
            device: joiner.device.to_string(),
            index: joiner.index,
        });
        let roster = serde_json::to_string(&Roster {
            room: g.room.clone(),
            members: entries,
            upgrade: None,
        })
        .map_err(|e| DeviceError::Call(e.to_string()))?;
        let key = session
            .keys()
            .join(&identity, joiner.clone())
            .map_err(|e| DeviceError::Call(e.to_string()))?;
        let news = serde_json::to_vec(&Joined {
            room: g.room.clone(),
            handle: handle.as_str().to_string(),
            device: joiner.device.to_string(),
            index: joiner.index,
        })
        .unwrap_or_default();
        let mut told: Vec<Handle> = Vec::new();
        for (h, _) in &g.members {
            if !told.contains(h) {
                told.push(h.clone());
            }
        }
        g.members.push((handle.clone(), joiner));
        g.dialogs.insert(call.clone(), handle.clone());
        self.phone
            .ua()
            .answer_group(now, &call, Some(&roster))
            .map_err(|e| DeviceError::Call(e.to_string()))?;
        for h in told {
            let _ = self.phone.ua().message(now, h.as_str(), JOINED_TYPE, &news);
        }
        self.send_keys(vec![(handle, vec![key])]);
        Ok(())
    }

    /// A member says it admitted someone: they become a member here too,
    /// if the directory lists their device, and get our key (ratcheted).
    async fn member_joined(&mut self, from: &str, body: &[u8]) {
        let Ok(joined) = serde_json::from_slice::<Joined>(body) else {
            return;
        };
        let known = self.group.as_ref().is_some_and(|g| {
            g.room == joined.room && g.session.is_some() && is_member(&g.members, from)
        });
        let (Ok(handle), Ok(device)) = (
            Handle::parse(&joined.handle),
            joined.device.parse::<DeviceId>(),
        ) else {
            return;
        };
        if !known {
            return;
        }
        let found = match self
            .ids
            .lookup(&self.me.key, std::slice::from_ref(&handle))
            .await
        {
            Ok(f) => f,
            Err(e) => {
                tracing::info!(error = %e, "lookup of a member joining by link");
                return;
            }
        };
        let Some(key) = found
            .iter()
            .find(|f| f.handle == handle)
            .and_then(|f| f.devices.iter().find(|d| d.device == device))
        else {
            tracing::warn!("a member admitted a device the directory does not list; ignored");
            return;
        };
        let joiner = Member {
            device,
            identity: key.key,
            index: joined.index,
        };
        let identity = self.me.key.clone();
        let Some(g) = self.group.as_mut() else {
            return;
        };
        if g.members
            .iter()
            .any(|(_, m)| m.device == device || m.index == joiner.index)
        {
            return;
        }
        let Some(session) = g.session.as_mut() else {
            return;
        };
        let Ok(key) = session.keys().join(&identity, joiner.clone()) else {
            return;
        };
        g.members.push((handle.clone(), joiner));
        let room = g.room.clone();
        self.send_keys(vec![(handle.clone(), vec![key])]);
        self.event(DeviceEvent::Call(CallEvent::MemberJoined {
            call: room,
            handle,
        }))
        .await;
    }

    /// Someone waits to be admitted by link.
    pub(super) fn join_pending(&self) -> bool {
        self.group
            .as_ref()
            .is_some_and(|g| g.join_request.is_some())
    }

    /// Turns away whoever asks to join by link.
    pub(super) fn refuse_join(&mut self) {
        if let Some((call, _, _)) = self.group.as_mut().and_then(|g| g.join_request.take()) {
            let _ = self.phone.ua().decline(&call, 603);
        }
    }

    /// Answers the group call that rings: joins the SFU and sends keys.
    pub(super) async fn answer_group(
        &mut self,
        now: std::time::Instant,
    ) -> Result<(), DeviceError> {
        let Some(g) = self.group.as_mut() else {
            return Err(DeviceError::Call("no group call".into()));
        };
        let Some(call) = g.ringing.take() else {
            return Err(DeviceError::Call("the group call does not ring".into()));
        };
        self.phone
            .ua()
            .answer_group(now, &call, None)
            .map_err(|e| DeviceError::Call(e.to_string()))?;
        g.answered = true;
        self.join_sfu().await
    }

    /// Leaves the group call: its dialogs end, the SFU lets us go.
    pub(super) async fn hangup_group(&mut self, reason: EndReason) {
        let Some(mut g) = self.group.take() else {
            return;
        };
        if let Some(s) = g.session.as_ref() {
            self.group_ended = Some((g.room.clone(), s.stats().clone()));
        }
        let now = std::time::Instant::now();
        if let Some(call) = g.ringing.take() {
            let _ = self.phone.ua().decline(&call, 603);
        }
        if g.session.is_some() {
            // The others draw new keys, so this device cannot read what
            // follows.
            let left = serde_json::to_vec(&Left {
                room: g.room.clone(),
                device: self.me.device.to_string(),
            })
            .unwrap_or_default();
            let mut told: Vec<&Handle> = Vec::new();
            for (h, _) in &g.members {
                if !told.contains(&h) {
                    told.push(h);
                    let _ = self.phone.ua().message(now, h.as_str(), LEFT_TYPE, &left);
                }
            }
        }
        for call in g.dialogs.keys() {
            let _ = self.phone.ua().hangup(now, call);
        }
        if let Some((sfu, resource, token)) = g.joined.take() {
            let _ = sfu.leave(&resource, &token).await;
        }
        self.sockets.remove(&g.media_key());
        self.event(DeviceEvent::Call(CallEvent::Ended {
            call: g.room.clone(),
            reason,
        }))
        .await;
    }

    /// Joins the SFU with the room token: the session, its socket, the
    /// answer; then this device's key goes to every member.
    async fn join_sfu(&mut self) -> Result<(), DeviceError> {
        let Some(g) = self.group.as_mut() else {
            return Ok(());
        };
        let (Some(pass), Some(keys)) = (g.pass.clone(), g.keys.take()) else {
            return Err(DeviceError::Call("no room token for the group call".into()));
        };
        let (addr, name) = sfu_address(&pass.sfu).await?;
        let sfu = SfuClient::new(addr, &name, self.config.roots.clone())
            .map_err(|e| DeviceError::Call(e.to_string()))?;
        let (link, incoming) =
            MediaLink::open(self.config.media_ip, &self.relay, &self.turn_tls).await?;
        let local = link.local_addr()?;
        let config = GroupConfig {
            turn: Some(self.relay.clone()),
            relay_only: self.config.relay_only,
            video_slots: if self.config.video { 4 } else { 0 },
            ..GroupConfig::default()
        };
        let now = std::time::Instant::now();
        let (mut session, offer) = GroupSession::new(now, local, keys, config)
            .map_err(|e| DeviceError::Call(e.to_string()))?;
        let joined = sfu
            .join(&g.room, &pass.token, &offer)
            .await
            .map_err(|e| DeviceError::Call(e.to_string()))?;
        session
            .accept_answer(now, &joined.answer)
            .map_err(|e| DeviceError::Call(e.to_string()))?;
        // Ours to everyone (which makes them members to us), then the
        // keys that came early.
        let identity = self.me.key.clone();
        let others: Vec<Member> = g.members.iter().map(|(_, m)| m.clone()).collect();
        let ours = session
            .keys()
            .start(&identity, &others)
            .map_err(|e| DeviceError::Call(e.to_string()))?;
        for m in std::mem::take(&mut g.pending) {
            if let Err(e) = session.keys().accept(&identity, &m) {
                tracing::info!(error = %e, "a sender key refused");
            }
        }
        g.socket = Some(link.clone());
        g.session = Some(session);
        g.joined = Some((sfu, joined.resource, pass.token));
        g.speaking = Some(Speaking::new(&self.config.microphone));
        let key = g.media_key();
        let by_handle = group_by_handle(&g.members, ours);
        self.add_link(&key, link, incoming);
        self.send_keys(by_handle);
        Ok(())
    }

    /// What the user agent said of the group call's dialogs, or a MESSAGE.
    pub(super) async fn on_group_signal(&mut self, e: UaEvent) {
        match e {
            UaEvent::IncomingGroup {
                call,
                from,
                room,
                pass,
                roster,
            } => self.incoming_group(call, from, room, pass, roster).await,
            UaEvent::RoomPass { call, pass } => {
                let join = match self.group.as_mut() {
                    Some(g) if g.dialogs.contains_key(&call) && g.pass.is_none() => {
                        g.pass = Some(pass);
                        // Joining by link: our place comes with the answer.
                        !g.by_link
                    }
                    _ => false,
                };
                if join {
                    if let Err(e) = self.join_sfu().await {
                        self.event(DeviceEvent::Error(format!("group call: {e}")))
                            .await;
                        self.hangup_group(EndReason::Failed(500, e.to_string()))
                            .await;
                    }
                }
            }
            UaEvent::Ringing { call } => {
                let room = match self.group.as_mut() {
                    Some(g) if g.dialogs.contains_key(&call) && !g.alerted => {
                        g.alerted = true;
                        Some(g.room.clone())
                    }
                    _ => None,
                };
                if let Some(call) = room {
                    self.event(DeviceEvent::Call(CallEvent::Alerting { call }))
                        .await;
                }
            }
            UaEvent::Answered { call, sdp, .. }
                if self.group.as_ref().is_some_and(|g| g.by_link) =>
            {
                if let Err(e) = self.admitted(&call, &sdp).await {
                    self.event(DeviceEvent::Error(format!("group call: {e}")))
                        .await;
                    self.hangup_group(EndReason::Failed(488, e.to_string()))
                        .await;
                }
            }
            UaEvent::Answered { call, .. } => {
                let joined = match self.group.as_mut() {
                    Some(g) if g.placed => {
                        g.answered = true;
                        g.dialogs.get(&call).map(|h| (g.room.clone(), h.clone()))
                    }
                    _ => None,
                };
                let Some((room, handle)) = joined else {
                    return;
                };
                // The one-to-one call's peer is in the group call now: the
                // one-to-one call ends.
                let upgraded = self
                    .group
                    .as_ref()
                    .and_then(|g| g.upgrade.clone())
                    .filter(|old| self.phone.peer(old) == Some(&handle));
                if let Some(old) = upgraded {
                    if let Some(g) = self.group.as_mut() {
                        g.upgrade = None;
                    }
                    let _ = self.phone.hangup(std::time::Instant::now(), &old);
                    self.event(DeviceEvent::Call(CallEvent::Upgraded {
                        from: old,
                        to: room.clone(),
                    }))
                    .await;
                }
                self.event(DeviceEvent::Call(CallEvent::MemberJoined {
                    call: room,
                    handle,
                }))
                .await;
            }
            UaEvent::Failed { call, code, reason } => {
                // Everyone the caller rang refused: the call is over.
                let over = match self.group.as_mut() {
                    Some(g) => {
                        g.dialogs.remove(&call).is_some()
                            && g.placed
                            && g.dialogs.is_empty()
                            && !g.answered
                    }
                    None => false,
                };
                if over {
                    self.hangup_group(EndReason::Failed(code, reason)).await;
                }
            }
            UaEvent::Cancelled { call, reason } => {
                let rang = self
                    .group
                    .as_ref()
                    .is_some_and(|g| g.ringing.as_deref() == Some(&call));
                if rang {
                    self.hangup_group(EndReason::Cancelled(reason)).await;
                }
            }
            UaEvent::Ended { call, .. } => {
                // A dialog ends; the room goes on while we are in it.
                if let Some(g) = self.group.as_mut() {
                    g.dialogs.remove(&call);
                }
            }
            UaEvent::Message {
                content_type, body, ..
            } if content_type.trim() == KEYS_TYPE => self.keys_arrived(&body),
            UaEvent::MessageDone { id, code } => self.key_message_done(&id, code),
            UaEvent::Message {
                content_type,
                body,
                from,
            } if content_type.trim() == LEFT_TYPE => self.member_left(&from, &body).await,
            UaEvent::Message {
                content_type,
                body,
                from,
            } if content_type.trim() == JOINED_TYPE => self.member_joined(&from, &body).await,
            _ => {}
        }
    }

    /// A member says one of its devices left: it goes, and this device
    /// draws a new key for those who remain. Only a device's own handle
    /// may say it left (signaling checks who a MESSAGE is from).
    async fn member_left(&mut self, from: &str, body: &[u8]) {
        let Ok(left) = serde_json::from_slice::<Left>(body) else {
            return;
        };
        let Some(g) = self.group.as_ref().filter(|g| g.room == left.room) else {
            return;
        };
        let Some(at) = leaver(&g.members, from, &left) else {
            tracing::info!("a \"left\" not from the leaver's own handle; ignored");
            return;
        };
        self.drop_member(at).await;
    }

    /// Members not heard from for [`VANISHED`] (a device that crashed or
    /// lost its network sends no "left") are dropped as if they had left.
    async fn drop_vanished(&mut self, now: std::time::Instant) {
        let Some(g) = self.group.as_ref() else {
            return;
        };
        let Some(session) = g.session.as_ref() else {
            return;
        };
        let gone = g.members.iter().position(|(_, m)| {
            session
                .last_heard(m.index)
                .is_some_and(|t| now.saturating_duration_since(t) > VANISHED)
        });
        if let Some(at) = gone {
            tracing::info!("a member sent nothing for {VANISHED:?}: new keys without it");
            self.drop_member(at).await;
        }
    }

    /// Member `at` is out: the others get new keys it does not hold.
    async fn drop_member(&mut self, at: usize) {
        let Some(g) = self.group.as_mut() else {
            return;
        };
        let (handle, left) = g.members.remove(at);
        let device = left.device;
        let identity = self.me.key.clone();
        let fresh = match g.session.as_mut() {
            Some(s) => s.keys().leave(&identity, device),
            None => return,
        };
        let room = g.room.clone();
        match fresh {
            Ok(messages) => {
                let by_handle = group_by_handle(&g.members, messages);
                self.send_keys(by_handle);
                self.event(DeviceEvent::Call(CallEvent::MemberLeft {
                    call: room,
                    handle,
                }))
                .await;
            }
            Err(e) => tracing::warn!(error = %e, "new keys after a leave"),
        }
    }

    /// Sends key messages, one MESSAGE per member handle.
    fn send_keys(&mut self, by_handle: Vec<(Handle, Vec<KeyMessage>)>) {
        let now = std::time::Instant::now();
        for (handle, messages) in by_handle {
            let body = format!(
                "[{}]",
                messages
                    .iter()
                    .map(KeyMessage::to_json)
                    .collect::<Vec<_>>()
                    .join(",")
            );
            self.send_key_message(now, handle, body.into_bytes(), 1);
        }
    }

    fn send_key_message(
        &mut self,
        now: std::time::Instant,
        handle: Handle,
        body: Vec<u8>,
        tries: u8,
    ) {
        if let Ok(id) = self
            .phone
            .ua()
            .message(now, handle.as_str(), KEYS_TYPE, &body)
        {
            if let Some(g) = self.group.as_mut() {
                g.unsent.insert(id, (handle, body, tries));
            }
        }
    }

    /// What became of a key MESSAGE: taken, or to be sent again.
    fn key_message_done(&mut self, id: &str, code: u16) {
        let Some(g) = self.group.as_mut() else {
            return;
        };
        let Some((handle, body, tries)) = g.unsent.remove(id) else {
            return;
        };
        if !(200..300).contains(&code) && tries < KEY_TRIES {
            g.resend.push((
                std::time::Instant::now() + KEY_RETRY,
                handle,
                body,
                tries + 1,
            ));
        }
    }

    /// Key MESSAGEs due to be sent again.
    fn resend_keys(&mut self) {
        let now = std::time::Instant::now();
        let due: Vec<(Handle, Vec<u8>, u8)> = match self.group.as_mut() {
            Some(g) => {
                let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut g.resend)
                    .into_iter()
                    .partition(|r| r.0 <= now);
                g.resend = later;
                due.into_iter().map(|(_, h, b, t)| (h, b, t)).collect()
            }
            None => return,
        };
        for (handle, body, tries) in due {
            self.send_key_message(now, handle, body, tries);
        }
    }

    /// Sender keys in a MESSAGE: those for this device are kept (they
    /// open only if a member sealed them to us).
    fn keys_arrived(&mut self, body: &[u8]) {
        let Some(g) = self.group.as_mut() else {
            return;
        };
        let Ok(values) = serde_json::from_slice::<Vec<serde_json::Value>>(body) else {
            return;
        };
        let identity = self.me.key.clone();
        for v in values {
            let Ok(m) = KeyMessage::from_json(&v.to_string()) else {
                continue;
            };
            if m.to != self.me.device {
                continue;
            }
            match g.session.as_mut() {
                Some(s) => {
                    if let Err(e) = s.keys().accept(&identity, &m) {
                        tracing::info!(error = %e, "a sender key refused");
                    }
                }
                None => g.pending.push(m),
            }
        }
    }

    /// A group call rings: the roster is checked against the directory.
    async fn incoming_group(
        &mut self,
        call: CallId,
        from: String,
        room: String,
        pass: Option<RoomPass>,
        roster: String,
    ) {
        let refuse = |this: &mut Task, code: u16| {
            let _ = this.phone.ua().decline(&call, code);
        };
        let in_room = self
            .group
            .as_ref()
            .is_some_and(|g| g.room == room && g.session.is_some());
        if in_room {
            self.join_request(call, from, roster).await;
            return;
        }
        if self.group.is_some() {
            refuse(self, 486);
            return;
        }
        let (Some(pass), Ok(roster)) = (pass, serde_json::from_str::<Roster>(&roster)) else {
            refuse(self, 400);
            return;
        };
        if roster.room != room {
            refuse(self, 400);
            return;
        }
        let Some(caller) = handle_of(&from) else {
            refuse(self, 400);
            return;
        };
        match self.check_roster(&roster).await {
            Ok((me, members)) => {
                let others: Vec<Handle> = {
                    let mut hs: Vec<Handle> = members.iter().map(|(h, _)| h.clone()).collect();
                    hs.dedup();
                    hs
                };
                let keys = match GroupKeys::new(&room, me.clone()) {
                    Ok(k) => k,
                    Err(_) => {
                        refuse(self, 500);
                        return;
                    }
                };
                let mut dialogs = HashMap::new();
                dialogs.insert(call.clone(), caller.clone());
                self.group = Some(GroupCall::new(
                    room.clone(),
                    dialogs,
                    members,
                    keys,
                    Some(pass),
                    Some(call),
                ));
                // Someone added to our one-to-one call with the caller:
                // the call moves to the group at once, without ringing.
                let upgrade = roster
                    .upgrade
                    .clone()
                    .filter(|c| self.phone.peer(c) == Some(&caller));
                match upgrade {
                    Some(old) => {
                        // The caller ends the one-to-one call once we
                        // are in the group call.
                        if let Err(e) = self.answer_group(std::time::Instant::now()).await {
                            self.event(DeviceEvent::Error(format!("group call: {e}")))
                                .await;
                        }
                        self.event(DeviceEvent::Call(CallEvent::Upgraded {
                            from: old,
                            to: room,
                        }))
                        .await;
                    }
                    None => {
                        self.event(DeviceEvent::Call(CallEvent::IncomingGroup {
                            call: room.clone(),
                            from: caller,
                            members: others,
                        }))
                        .await
                    }
                }
            }
            Err(why) => {
                refuse(self, 488);
                self.event(DeviceEvent::Error(format!("a group call refused: {why}")))
                    .await;
            }
        }
    }

    /// Someone asks to join our group call by its link: they must ask for
    /// themselves (their roster entry is their own handle, which
    /// signaling checked), and the directory must list their device. The
    /// app admits them by answering the call ([`CallEvent::JoinRequest`]).
    async fn join_request(&mut self, call: CallId, from: String, roster: String) {
        let asked = serde_json::from_str::<Roster>(&roster)
            .ok()
            .and_then(|r| r.members.into_iter().next().filter(|e| e.index == 0));
        let (Some(entry), Some(handle)) = (asked, handle_of(&from)) else {
            let _ = self.phone.ua().decline(&call, 400);
            return;
        };
        let listed = match joiner_as_itself(&from, &entry) {
            Some((h, device)) => self
                .ids
                .lookup(&self.me.key, std::slice::from_ref(&h))
                .await
                .ok()
                .and_then(|found| {
                    found
                        .into_iter()
                        .find(|f| f.handle == h)
                        .and_then(|f| f.devices.into_iter().find(|d| d.device == device))
                }),
            None => None,
        };
        let Some(key) = listed else {
            let _ = self.phone.ua().decline(&call, 488);
            return;
        };
        let Some(g) = self.group.as_mut() else {
            return;
        };
        if let Some((old, _, _)) = g.join_request.take() {
            let _ = self.phone.ua().decline(&old, 486);
        }
        let joiner = Member {
            device: key.device,
            identity: key.key,
            index: 0,
        };
        g.join_request = Some((call, handle.clone(), joiner));
        let room = g.room.clone();
        self.event(DeviceEvent::Call(CallEvent::JoinRequest {
            call: room,
            from: handle,
        }))
        .await;
    }

    /// This device's place in `roster`, and every other member with the
    /// key the directory gives it (looked up here, verified).
    async fn check_roster(
        &mut self,
        roster: &Roster,
    ) -> Result<(Member, Vec<(Handle, Member)>), String> {
        let mut handles: Vec<Handle> = Vec::new();
        for e in &roster.members {
            let h = Handle::parse(&e.handle).map_err(|e| e.to_string())?;
            if !handles.contains(&h) {
                handles.push(h);
            }
        }
        let found = self
            .ids
            .lookup(&self.me.key, &handles)
            .await
            .map_err(|e| e.to_string())?;
        members_from(roster, self.me.device, self.me.key.public(), &found)
    }

    /// One 20 ms tick of the group call's audio.
    pub(super) fn group_audio(&mut self) {
        let Some(g) = self.group.as_mut() else {
            return;
        };
        let (Some(session), Some(speaking)) = (g.session.as_mut(), g.speaking.as_mut()) else {
            return;
        };
        let now = std::time::Instant::now();
        let frame = speaking.next_frame();
        let _ = session.send_audio(now, &frame);
        let mix = session.mix(now);
        if let Some(speaker) = &self.config.speaker {
            speaker.push(&mix);
        }
        let h = self.heard.entry(g.room.clone()).or_default();
        h.extend_from_slice(&mix);
        let max = (self.config.keep_heard.as_millis() * 48) as usize;
        if h.len() > max {
            h.drain(..h.len() - max);
        }
    }

    /// One camera frame for the group call.
    pub(super) fn group_video(&mut self) {
        let frame = self.camera.next_frame();
        if let Some(s) = self.group.as_mut().and_then(GroupCall::session) {
            let _ = s.send_video(std::time::Instant::now(), &frame);
        }
    }

    /// A datagram on the SFU's socket.
    pub(super) fn group_datagram(&mut self, from: std::net::SocketAddr, data: &[u8]) {
        if let Some(s) = self.group.as_mut().and_then(GroupCall::session) {
            let _ = s.handle_datagram(std::time::Instant::now(), from, data);
        }
    }

    /// The group session's timers, its datagrams out, and whether media
    /// came up.
    pub(super) async fn group_flush(&mut self) -> bool {
        self.resend_keys();
        let mut busy = false;
        let Some(g) = self.group.as_mut() else {
            return false;
        };
        let now = std::time::Instant::now();
        let (Some(session), Some(socket)) = (g.session.as_mut(), g.socket.clone()) else {
            return false;
        };
        if session.poll_timeout() <= now {
            let _ = session.handle_timeout(now);
        }
        while let Some(d) = session.poll_transmit() {
            busy = true;
            socket.send_to(&d.data, d.to).await;
        }
        let connected = session.is_connected() && !g.connected;
        let closed = session.is_closed();
        if connected {
            g.connected = true;
            let call = g.room.clone();
            self.event(DeviceEvent::Call(CallEvent::MediaConnected { call }))
                .await;
        }
        if closed {
            self.hangup_group(EndReason::Failed(503, "the SFU went away".into()))
                .await;
        }
        self.drop_vanished(now).await;
        busy
    }

    /// When the group session's timers, or a key MESSAGE to send again,
    /// are due.
    pub(super) fn group_timeout(&self) -> Option<std::time::Instant> {
        let g = self.group.as_ref()?;
        g.session
            .as_ref()
            .map(GroupSession::poll_timeout)
            .into_iter()
            .chain(g.resend.iter().map(|r| r.0))
            .min()
    }

    /// What the group call's session measured.
    pub(super) fn group_stats(&self, call: &str) -> Option<crate::group::GroupStats> {
        match self.group.as_ref().filter(|g| g.room == call) {
            Some(g) => g.session.as_ref().map(|s| s.stats().clone()),
            // The call just ended: what its media did to the end.
            None => self
                .group_ended
                .as_ref()
                .filter(|(room, _)| room == call)
                .map(|(_, s)| s.clone()),
        }
    }
}

/// The members a roster names, with the keys `found` (a verified lookup
/// of its handles) gives them, and this device's place. A device the
/// directory does not list for its handle, an index or device named
/// twice (two senders under one key id), or a roster without this device
/// fails.
fn members_from(
    roster: &Roster,
    me: DeviceId,
    my_key: wire::keys::PublicKey,
    found: &[crate::ids::Found],
) -> Result<(Member, Vec<(Handle, Member)>), String> {
    let mut indices = std::collections::HashSet::new();
    let mut devices = std::collections::HashSet::new();
    let mut mine = None;
    let mut members = Vec::new();
    for e in &roster.members {
        let device: DeviceId = e
            .device
            .parse()
            .map_err(|_| "a bad device id".to_string())?;
        let handle = Handle::parse(&e.handle).map_err(|e| e.to_string())?;
        if e.index == 0 || !indices.insert(e.index) || !devices.insert(device) {
            return Err(format!(
                "the roster names index {} or device {device} twice",
                e.index
            ));
        }
        if device == me {
            mine = Some(Member {
                device,
                identity: my_key,
                index: e.index,
            });
            continue;
        }
        let key = found
            .iter()
            .find(|f| f.handle == handle)
            .and_then(|f| f.devices.iter().find(|d| d.device == device))
            .ok_or_else(|| {
                format!(
                    "the roster names device {device} for {}, which the directory does not list",
                    handle.redacted()
                )
            })?;
        members.push((
            handle,
            Member {
                device,
                identity: key.key,
                index: e.index,
            },
        ));
    }
    let mine = mine.ok_or_else(|| "this device is not in the roster".to_string())?;
    Ok((mine, members))
}

/// Key messages grouped by the member handle whose devices they are for.
fn group_by_handle(
    members: &[(Handle, Member)],
    messages: Vec<KeyMessage>,
) -> Vec<(Handle, Vec<KeyMessage>)> {
    let mut out: Vec<(Handle, Vec<KeyMessage>)> = Vec::new();
    for m in messages {
        let Some((h, _)) = members.iter().find(|(_, mm)| mm.device == m.to) else {
            continue;
        };
        match out.iter_mut().find(|(x, _)| x == h) {
            Some((_, v)) => v.push(m),
            None => out.push((h.clone(), vec![m])),
        }
    }
    out
}

/// Which member a "left" from `from` takes out: the device it names, and
/// only if that device is a member for the handle the MESSAGE is from
/// (signaling checks who a MESSAGE is from; nobody may say someone else
/// left).
fn leaver(members: &[(Handle, Member)], from: &str, left: &Left) -> Option<usize> {
    let device = left.device.parse::<DeviceId>().ok()?;
    let sender = handle_of(from)?;
    members
        .iter()
        .position(|(h, m)| m.device == device && *h == sender)
}

/// Whether a MESSAGE from `from` comes from a member's handle: only a
/// member may say it admitted someone.
fn is_member(members: &[(Handle, Member)], from: &str) -> bool {
    let sender = handle_of(from);
    members.iter().any(|(h, _)| Some(h) == sender.as_ref())
}

/// The handle and device a join request from `from` asks in for: the
/// device its roster entry names, and only for the requester's own
/// handle (nobody joins as someone else).
fn joiner_as_itself(from: &str, entry: &RosterEntry) -> Option<(Handle, DeviceId)> {
    let handle = Handle::parse(&entry.handle).ok()?;
    let device = entry.device.parse::<DeviceId>().ok()?;
    (Some(&handle) == handle_of(from).as_ref()).then_some((handle, device))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Alice's phone (0) and laptop (1) and Bob's phone (2) in a call.
    fn call() -> (Vec<(Handle, Member)>, [DeviceId; 3]) {
        let devices = [DeviceId::random(), DeviceId::random(), DeviceId::random()];
        let member = |i: usize| Member {
            device: devices[i],
            identity: wire::keys::SigningKey::generate().public(),
            index: i as u16 + 1,
        };
        let alice = Handle::parse("alice@example.com").unwrap();
        let bob = Handle::parse("bob@example.com").unwrap();
        (
            vec![
                (alice.clone(), member(0)),
                (alice, member(1)),
                (bob, member(2)),
            ],
            devices,
        )
    }

    /// A From header for `handle`, as signaling passes it on.
    fn from(handle: &str) -> String {
        format!("<{}>;tag=t", crate::sip::handle_uri(handle, "localhost"))
    }

    fn left(device: DeviceId) -> Left {
        Left {
            room: "r".into(),
            device: device.to_string(),
        }
    }

    #[test]
    fn only_a_devices_own_handle_may_say_it_left() {
        let (members, d) = call();
        let alice = &from("alice@example.com");
        let bob = &from("bob@example.com");
        let eve = &from("eve@example.com");
        assert_eq!(leaver(&members, alice, &left(d[1])), Some(1));
        assert_eq!(leaver(&members, bob, &left(d[2])), Some(2));
        // Bob may not say Alice's laptop left, nor a stranger anyone.
        assert_eq!(leaver(&members, bob, &left(d[1])), None);
        assert_eq!(leaver(&members, eve, &left(d[0])), None);
        assert_eq!(leaver(&members, eve, &left(d[2])), None);
        // A device that is not in the call, or no device at all.
        assert_eq!(leaver(&members, alice, &left(DeviceId::random())), None);
        let garbage = Left {
            room: "r".into(),
            device: "not a device".into(),
        };
        assert_eq!(leaver(&members, alice, &garbage), None);
    }

    #[test]
    fn only_a_member_may_say_it_admitted_someone() {
        let (members, _) = call();
        assert!(is_member(&members, &from("bob@example.com")));
        assert!(!is_member(&members, &from("eve@example.com")));
        assert!(!is_member(&members, "not a from header"));
    }

    #[test]
    fn a_join_request_asks_in_only_as_its_own_handle() {
        let eve_phone = DeviceId::random();
        let from = &from("eve@example.com");
        let as_eve = entry("eve@example.com", eve_phone, 0);
        assert_eq!(
            joiner_as_itself(from, &as_eve),
            Some((Handle::parse("eve@example.com").unwrap(), eve_phone))
        );
        // Eve asking in as Alice (whose device the directory would list).
        let as_alice = entry("alice@example.com", DeviceId::random(), 0);
        assert_eq!(joiner_as_itself(from, &as_alice), None);
        let bad_device = RosterEntry {
            device: "nope".into(),
            ..as_eve
        };
        assert_eq!(joiner_as_itself(from, &bad_device), None);
    }

    #[tokio::test]
    async fn the_sfu_url_gives_its_address_and_name() {
        let (a, n) = sfu_address("https://127.0.0.1:8446").await.unwrap();
        assert_eq!(
            (a.to_string(), n.as_str()),
            ("127.0.0.1:8446".into(), "127.0.0.1")
        );
        assert!(sfu_address("http://127.0.0.1:8446").await.is_err());
        let (a, n) = sfu_address("https://[::1]:9000/").await.unwrap();
        assert_eq!((a.port(), n.as_str()), (9000, "::1"));
    }

    fn entry(handle: &str, device: DeviceId, index: u16) -> RosterEntry {
        RosterEntry {
            handle: handle.into(),
            device: device.to_string(),
            index,
        }
    }

    /// The roster against what the directory says: a device it does not
    /// list (signaling or the caller added it) fails the call, as does a
    /// key id given twice; keys come from the directory, not the roster.
    #[test]
    fn a_roster_is_believed_only_as_far_as_the_directory_goes() {
        use crate::call::DeviceKey;
        let (me, alice, bob, mallory) = (
            DeviceId::random(),
            DeviceId::random(),
            DeviceId::random(),
            DeviceId::random(),
        );
        let key = |_: u8| wire::keys::SigningKey::generate().public();
        let (alice_key, bob_key) = (key(1), key(2));
        let found = vec![
            crate::ids::Found {
                handle: Handle::parse("alice@example.com").unwrap(),
                devices: vec![DeviceKey {
                    device: alice,
                    key: alice_key,
                }],
                account_key: None,
                epoch: 1,
            },
            crate::ids::Found {
                handle: Handle::parse("+14155550123").unwrap(),
                devices: vec![DeviceKey {
                    device: bob,
                    key: bob_key,
                }],
                account_key: None,
                epoch: 1,
            },
        ];
        let my_key = key(3);
        let good = Roster {
            upgrade: None,
            room: random_room(),
            members: vec![
                entry("alice@example.com", alice, 1),
                entry("+14155550123", bob, 2),
                entry("carol@example.com", me, 3),
            ],
        };
        let (mine, members) = members_from(&good, me, my_key, &found).unwrap();
        assert_eq!((mine.index, mine.identity), (3, my_key));
        assert_eq!(members.len(), 2);
        assert_eq!(members[0].1.identity, alice_key, "the directory's key");
        // Mallory's device named as one of Bob's: refused.
        let mut added = good.clone();
        added.members.push(entry("+14155550123", mallory, 4));
        let e = members_from(&added, me, my_key, &found).unwrap_err();
        assert!(e.contains("does not list"), "{e}");
        // Bob's device named as Alice's: refused too.
        let mut moved = good.clone();
        moved.members[1] = entry("alice@example.com", bob, 2);
        assert!(members_from(&moved, me, my_key, &found).is_err());
        // Two members under one index (one could speak as the other).
        let mut twice = good.clone();
        twice.members[1].index = 1;
        assert!(members_from(&twice, me, my_key, &found)
            .unwrap_err()
            .contains("twice"));
        // A roster that leaves this device out.
        let mut without = good.clone();
        without.members.pop();
        assert!(members_from(&without, me, my_key, &found).is_err());
    }

    #[test]
    fn rosters_round_trip_and_rooms_are_unguessable() {
        let r = Roster {
            room: random_room(),
            members: vec![RosterEntry {
                handle: "+14155550123".into(),
                device: DeviceId::random().to_string(),
                index: 1,
            }],
            upgrade: None,
        };
        assert!(wire::room_token::valid_room(&r.room));
        assert_ne!(r.room, random_room());
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Roster>(&text).unwrap(), r);
    }
}
