//! Group calls. A caller rings a group by sending each person an INVITE
//! that names the call's room at the SFU (`Parley-Group: <room>`, a
//! random id the caller picks). The proxy hands every participant a room
//! token for it, with where the SFU is: the callee's devices in the
//! forwarded INVITE, the caller in the ringing and answering responses
//! (`Parley-Room-Token`, `Parley-Sfu`). Only a request the proxy admitted
//! (an authenticated caller, as for any call) gets one, and what a device
//! wrote in those headers itself is dropped, so a token comes from the
//! proxy alone. Media keys never pass here: the devices exchange them end
//! to end.

use super::*;

pub(super) const GROUP: HeaderName = HeaderName::from_static("Parley-Group");
pub(super) const ROOM_TOKEN: HeaderName = HeaderName::from_static("Parley-Room-Token");
pub(super) const SFU: HeaderName = HeaderName::from_static("Parley-Sfu");

/// How long a room token opens the room: a call that rings, then lasts.
const ROOM_TOKEN_LIFETIME: u64 = 12 * 3600;

/// The room a request names, if it is a group call's: `Some(Err)` for a
/// name that is not a room id.
pub(super) fn group_room(m: &Message) -> Option<Result<String, ()>> {
    let room = m.header(&GROUP)?.trim();
    Some(match wire::room_token::valid_room(room) {
        true => Ok(room.to_string()),
        false => Err(()),
    })
}

/// Drops the room headers a device wrote itself.
pub(super) fn strip_room_headers(m: &mut Message) {
    m.remove(&ROOM_TOKEN);
    m.remove(&SFU);
}

impl Proxy {
    /// Why a group INVITE cannot be rung, if it cannot.
    pub(super) fn group_refusal(&self, req: &Message) -> Option<(u16, &'static str)> {
        match group_room(req)? {
            Err(()) => Some((400, "Bad Parley-Group")),
            Ok(_) if self.config.sfu.is_none() => Some((488, "Group Calls Unavailable")),
            Ok(_) => None,
        }
    }

    /// Gives `m` (a request to a callee, or a response to the caller of a
    /// group INVITE `req`) a token for the room and the SFU's address.
    pub(super) fn add_room_headers(&self, req: &Message, m: &mut Message, now: Instant) {
        strip_room_headers(m);
        let (Some(Ok(room)), Some(sfu)) = (group_room(req), self.config.sfu.as_ref()) else {
            return;
        };
        let expires = self.clock(now) + ROOM_TOKEN_LIFETIME;
        m.push(
            ROOM_TOKEN,
            wire::room_token::make(&self.room_secret, &room, expires),
        );
        m.push(SFU, sfu.clone());
    }
}
