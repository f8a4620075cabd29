//! The media keys of a group call, end to end (sans-IO): each
//! participant's device encrypts its frames with SFrame under a sender key
//! of its own, and hands that key to the other participants' devices in
//! [`KeyMessage`]s (sealed to each, signed by it). Servers carry the
//! messages and forward the frames; they read neither.
//!
//! Keys change with the membership, as Signal's and LiveKit's group calls
//! do:
//! - someone joins: every sender ratchets its key forward (a one-way
//!   step every member can take alone) and sends the new one to the
//!   joiner only, so the joiner cannot read what was said before;
//! - someone leaves: every sender draws a new random key and sends it to
//!   those who remain, so the leaver cannot read what follows.
//!
//! A KID names the sender (its index in the call, from signaling) and the
//! key's generation: `index << 16 | generation`. Only devices the app
//! passed in, from a verified directory lookup, are members: a key from
//! any other device, or one not signed by the device it names, is refused.

use std::collections::HashMap;

use wire::group_key::{GroupKeyError, KeyMessage, SenderKey};
use wire::keys::{DeviceId, PublicKey, SigningKey};
use wire::sframe::{CipherSuite, Key, Receiver, Sender, SframeError};

const SUITE: CipherSuite = CipherSuite::Aes128GcmSha256;
/// Ratchet steps a receiver takes by itself to catch up with a sender
/// whose key moved on with joins it has not heard of yet.
const CATCH_UP: u16 = 8;

/// A member device: its id, its identity key (from a verified directory
/// lookup) and its index in the call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub device: DeviceId,
    pub identity: PublicKey,
    pub index: u16,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GroupError {
    #[error("{0}")]
    Key(#[from] GroupKeyError),
    #[error("{0}")]
    Frame(#[from] SframeError),
    #[error("key from a device that is not a member of the call")]
    NotAMember,
    #[error("key names a KID that is not its sender's")]
    ForeignKid,
}

fn kid(index: u16, generation: u16) -> u64 {
    (u64::from(index) << 16) | u64::from(generation)
}

fn split(kid: u64) -> (u16, u16) {
    ((kid >> 16) as u16, kid as u16)
}

/// The next key in a sender's chain: a one-way step.
fn ratchet(base: &[u8; 32]) -> [u8; 32] {
    let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"parley sframe ratchet");
    let mut out = [0u8; 32];
    let _ = salt
        .extract(base)
        .expand(&[b"next"], ring::hkdf::HKDF_SHA256)
        .and_then(|okm| okm.fill(&mut out));
    out
}

fn random_key() -> [u8; 32] {
    let mut k = [0u8; 32];
    // Fails only if the system RNG does; a zero key would then be shared
    // by nobody else either way, but say so.
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut k).is_err() {
        tracing::error!("system random number generator failed");
    }
    k
}

/// One device's view of a group call's keys.
pub struct GroupKeys {
    call: String,
    me: Member,
    generation: u16,
    base: [u8; 32],
    sender: Sender,
    members: HashMap<DeviceId, Member>,
    /// Other senders' base keys by KID (to ratchet from) and their
    /// derived keys.
    bases: HashMap<u64, [u8; 32]>,
    receiver: Receiver,
}

impl std::fmt::Debug for GroupKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupKeys")
            .field("call", &self.call)
            .field("index", &self.me.index)
            .field("generation", &self.generation)
            .field("members", &self.members.len())
            .finish_non_exhaustive()
    }
}

impl GroupKeys {
    /// This device (`me`) in `call`, with a fresh sender key.
    pub fn new(call: &str, me: Member) -> Result<GroupKeys, GroupError> {
        let base = random_key();
        Ok(GroupKeys {
            call: call.to_owned(),
            sender: Sender::new(Key::derive(SUITE, kid(me.index, 0), &base)?),
            me,
            generation: 0,
            base,
            members: HashMap::new(),
            bases: HashMap::new(),
            receiver: Receiver::default(),
        })
    }

    /// This device's current KID.
    pub fn kid(&self) -> u64 {
        kid(self.me.index, self.generation)
    }

    fn rekey(&mut self, base: [u8; 32]) -> Result<(), GroupError> {
        self.generation = self.generation.wrapping_add(1);
        self.base = base;
        self.sender = Sender::new(Key::derive(SUITE, self.kid(), &base)?);
        Ok(())
    }

    /// This device's current key, for `to`.
    fn message_for(&self, identity: &SigningKey, to: &Member) -> Result<KeyMessage, GroupError> {
        let key = SenderKey {
            kid: self.kid(),
            base_key: self.base,
        };
        Ok(KeyMessage::seal(
            &self.call,
            identity,
            self.me.device,
            to.device,
            &to.identity,
            &key,
        )?)
    }

    /// The members at the call's start (or when this device joins): each
    /// gets this device's key.
    pub fn start(
        &mut self,
        identity: &SigningKey,
        members: &[Member],
    ) -> Result<Vec<KeyMessage>, GroupError> {
        for m in members {
            self.members.insert(m.device, m.clone());
        }
        members
            .iter()
            .map(|m| self.message_for(identity, m))
            .collect()
    }

    /// `m` joined: this device's key ratchets forward (so `m` cannot read
    /// earlier frames) and goes to `m` alone; the others ratchet it
    /// themselves when frames under the next generation arrive.
    pub fn join(&mut self, identity: &SigningKey, m: Member) -> Result<KeyMessage, GroupError> {
        let next = ratchet(&self.base);
        self.rekey(next)?;
        self.members.insert(m.device, m.clone());
        self.message_for(identity, &m)
    }

    /// `device` left: its keys go, and this device draws a new random key
    /// for those who remain (so the leaver cannot read what follows).
    pub fn leave(
        &mut self,
        identity: &SigningKey,
        device: DeviceId,
    ) -> Result<Vec<KeyMessage>, GroupError> {
        if let Some(gone) = self.members.remove(&device) {
            let theirs: Vec<u64> = self
                .bases
                .keys()
                .copied()
                .filter(|k| split(*k).0 == gone.index)
                .collect();
            for k in theirs {
                self.bases.remove(&k);
                self.receiver.remove(k);
            }
        }
        self.rekey(random_key())?;
        let members: Vec<Member> = self.members.values().cloned().collect();
        members
            .iter()
            .map(|m| self.message_for(identity, m))
            .collect()
    }

    /// A key from another member, checked against that member's identity
    /// key and kept.
    pub fn accept(&mut self, identity: &SigningKey, m: &KeyMessage) -> Result<(), GroupError> {
        let from = self.members.get(&m.from).ok_or(GroupError::NotAMember)?;
        if split(m.kid).0 != from.index {
            return Err(GroupError::ForeignKid);
        }
        let key = m.open(&self.call, identity, self.me.device, &from.identity)?;
        self.keep(key.kid, key.base_key)
    }

    fn keep(&mut self, kid: u64, base: [u8; 32]) -> Result<(), GroupError> {
        self.receiver.add(Key::derive(SUITE, kid, &base)?);
        self.bases.insert(kid, base);
        Ok(())
    }

    /// A frame of this device's, encrypted under its current key.
    pub fn encrypt(&mut self, metadata: &[u8], frame: &[u8]) -> Result<Vec<u8>, GroupError> {
        Ok(self.sender.encrypt(metadata, frame)?)
    }

    /// Another member's frame. A KID a few generations past the newest
    /// key this device has of that sender is reached by ratcheting (joins
    /// it has not heard of yet).
    pub fn decrypt(&mut self, metadata: &[u8], sframe: &[u8]) -> Result<Vec<u8>, GroupError> {
        let (h, _) = wire::sframe::Header::decode(sframe)?;
        if !self.bases.contains_key(&h.kid) {
            let (index, generation) = split(h.kid);
            let known = (1..=CATCH_UP).find_map(|back| {
                let g = generation.checked_sub(back)?;
                self.bases.get(&kid(index, g)).map(|b| (back, *b))
            });
            if let Some((back, mut base)) = known {
                for _ in 0..back {
                    base = ratchet(&base);
                }
                self.keep(h.kid, base)?;
            }
        }
        Ok(self.receiver.decrypt(metadata, sframe)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Phone {
        identity: SigningKey,
        member: Member,
        keys: GroupKeys,
    }

    fn phone(index: u16) -> Phone {
        let identity = SigningKey::generate();
        let member = Member {
            device: DeviceId::random(),
            identity: identity.public(),
            index,
        };
        let keys = GroupKeys::new("call-9", member.clone()).unwrap();
        Phone {
            identity,
            member,
            keys,
        }
    }

    /// Delivers each message to the phone it is for.
    fn deliver(phones: &mut [&mut Phone], messages: Vec<KeyMessage>) {
        for m in messages {
            if let Some(p) = phones.iter_mut().find(|p| p.member.device == m.to) {
                p.keys.accept(&p.identity, &m).unwrap();
            }
        }
    }

    /// Three start, each hears the others; Dave joins and reads only what
    /// follows; Carol leaves and reads nothing that follows.
    #[test]
    fn joiners_read_no_earlier_frames_and_leavers_no_later_ones() {
        let (mut a, mut b, mut c) = (phone(1), phone(2), phone(3));
        let all = [a.member.clone(), b.member.clone(), c.member.clone()];
        let mut out = Vec::new();
        for p in [&mut a, &mut b, &mut c] {
            let others: Vec<Member> = all.iter().filter(|m| **m != p.member).cloned().collect();
            out.extend(p.keys.start(&p.identity, &others).unwrap());
        }
        deliver(&mut [&mut a, &mut b, &mut c], out);
        let before = a.keys.encrypt(b"", b"before dave").unwrap();
        assert_eq!(b.keys.decrypt(b"", &before).unwrap(), b"before dave");
        assert_eq!(c.keys.decrypt(b"", &before).unwrap(), b"before dave");

        // Dave joins: everyone ratchets and sends Dave its key alone.
        let mut d = phone(4);
        let mut to_dave = Vec::new();
        for p in [&mut a, &mut b, &mut c] {
            to_dave.push(p.keys.join(&p.identity, d.member.clone()).unwrap());
        }
        let olds = [a.member.clone(), b.member.clone(), c.member.clone()];
        to_dave.extend(d.keys.start(&d.identity, &olds).unwrap());
        deliver(&mut [&mut a, &mut b, &mut c, &mut d], to_dave);
        assert!(d.keys.decrypt(b"", &before).is_err(), "Dave read the past");
        let after = a.keys.encrypt(b"", b"hello dave").unwrap();
        assert_eq!(d.keys.decrypt(b"", &after).unwrap(), b"hello dave");
        // B and C ratchet Alice's key themselves.
        assert_eq!(b.keys.decrypt(b"", &after).unwrap(), b"hello dave");
        assert_eq!(c.keys.decrypt(b"", &after).unwrap(), b"hello dave");

        // Carol leaves: the others draw new keys for those who remain.
        let mut out = Vec::new();
        for p in [&mut a, &mut b, &mut d] {
            out.extend(p.keys.leave(&p.identity, c.member.device).unwrap());
        }
        assert!(out.iter().all(|m| m.to != c.member.device));
        deliver(&mut [&mut a, &mut b, &mut d], out);
        let later = a.keys.encrypt(b"", b"carol is gone").unwrap();
        assert_eq!(b.keys.decrypt(b"", &later).unwrap(), b"carol is gone");
        assert_eq!(d.keys.decrypt(b"", &later).unwrap(), b"carol is gone");
        assert!(
            c.keys.decrypt(b"", &later).is_err(),
            "Carol read what followed her leaving"
        );
    }

    /// A key from a device the verified lookup did not list (a malicious
    /// directory or signaling adding one), or one signed by another key
    /// than its sender's, is refused.
    #[test]
    fn keys_from_outside_the_call_or_forged_are_refused() {
        let (mut a, b) = (phone(1), phone(2));
        a.keys
            .start(&a.identity, std::slice::from_ref(&b.member))
            .unwrap();
        // An intruder's key: not a member.
        let mut intruder = phone(7);
        let m = intruder
            .keys
            .start(&intruder.identity, &[a.member.clone()])
            .unwrap()
            .remove(0);
        assert_eq!(a.keys.accept(&a.identity, &m), Err(GroupError::NotAMember));
        // Signed by the intruder in Bob's name.
        let forged = KeyMessage::seal(
            "call-9",
            &intruder.identity,
            b.member.device,
            a.member.device,
            &a.member.identity,
            &SenderKey {
                kid: kid(2, 0),
                base_key: [1; 32],
            },
        )
        .unwrap();
        assert_eq!(
            a.keys.accept(&a.identity, &forged),
            Err(GroupError::Key(GroupKeyError::BadSignature))
        );
        // Bob claiming another sender's KID.
        let stolen = KeyMessage::seal(
            "call-9",
            &b.identity,
            b.member.device,
            a.member.device,
            &a.member.identity,
            &SenderKey {
                kid: kid(1, 0),
                base_key: [1; 32],
            },
        )
        .unwrap();
        assert_eq!(
            a.keys.accept(&a.identity, &stolen),
            Err(GroupError::ForeignKid)
        );
    }
}
