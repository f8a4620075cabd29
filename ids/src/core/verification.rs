//! Proving a handle: a 6-digit code goes out, comes back, and is checked.
//!
//! Sans-IO: time and randomness come in as arguments, the code to deliver
//! comes out in the result. Sessions and a handle's wrong-code count are
//! kept by the caller between requests (in the database, so that any node
//! of a cluster can take the next request): it puts them in with
//! [`Verifications::put_session`] / [`Verifications::put_failures`] and
//! reads them back after the operation. What a passed check proves is a
//! single-use handle token, which the caller makes and keeps.
//!
//! Rules (defaults in [`VerificationConfig`]):
//! - a session expires 10 minutes after it starts; codes are stored as
//!   HMAC-SHA256(key, session id ‖ code) and compared in constant time;
//! - at most 5 sends per session, each resend waiting longer (30 s, 1 min,
//!   2 min, 4 min);
//! - at most 5 checks per session: two right away, then 1 min, 2 min,
//!   4 min after each wrong code;
//! - new sessions are rate-limited per handle and per client address
//!   (IPv4 per address, IPv6 per /64 — what one host or site is given —
//!   and, for volume, per /48);
//! - wrong codes count per handle across sessions: every
//!   [`VerificationConfig::lockout_after`] of them lock the handle (no new
//!   sessions, no checks) for a time that doubles with each lockout, from
//!   15 minutes up to a day. So a handle takes a few dozen guesses a day
//!   however many sessions an attacker starts, where the per-session limit
//!   alone allowed 25 an hour, forever; a success clears the count;
//! - every refusal says when to retry.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ring::hmac;
use wire::Handle;

use wire::net::source_key;
use wire::ratelimit::RateLimiter;

#[derive(Debug, Clone)]
pub struct VerificationConfig {
    /// How long a session (and its code) is valid. Default 10 min.
    pub session_ttl: Duration,
    /// Sends per session, the first included. Default 5.
    pub max_sends: u32,
    /// Wait before resend n (n = 1, 2, …); the last entry repeats.
    pub resend_delays: Vec<Duration>,
    /// Code checks per session. Default 5.
    pub max_checks: u32,
    /// Wait after wrong check n before check n+1; the last entry repeats.
    pub check_delays: Vec<Duration>,
    /// New sessions per handle per hour. Default 5.
    pub starts_per_handle_per_hour: u32,
    /// New sessions per client address (IPv6: per /64) per hour. Default 20.
    pub starts_per_ip_per_hour: u32,
    /// New sessions per IPv6 /48 per hour. Default 100.
    pub starts_per_v6_48_per_hour: u32,
    /// Wrong codes for one handle (across its sessions) before it is
    /// locked. Default 10.
    pub lockout_after: u32,
    /// The first lockout; each next one doubles. Default 15 min.
    pub lockout_base: Duration,
    /// The longest lockout, and how long a handle's wrong codes are
    /// remembered after the last one. Default 24 h.
    pub lockout_max: Duration,
    /// How long a handle token from a passed check is valid. Default 10 min.
    pub token_ttl: Duration,
    /// Sessions kept at most; beyond this new sessions are refused. Default 100 000.
    pub max_sessions: usize,
}

impl Default for VerificationConfig {
    fn default() -> Self {
        VerificationConfig {
            session_ttl: Duration::from_secs(600),
            max_sends: 5,
            resend_delays: [30, 60, 120, 240].map(Duration::from_secs).to_vec(),
            max_checks: 5,
            check_delays: [0, 60, 120, 240].map(Duration::from_secs).to_vec(),
            starts_per_handle_per_hour: 5,
            starts_per_ip_per_hour: 20,
            starts_per_v6_48_per_hour: 100,
            lockout_after: 10,
            lockout_base: Duration::from_secs(15 * 60),
            lockout_max: Duration::from_secs(24 * 3600),
            token_ttl: Duration::from_secs(600),
            max_sessions: 100_000,
        }
    }
}

/// A verification session id (16 random bytes, hex on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId(pub [u8; 16]);

/// What the caller learns about a live session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionState {
    pub id: SessionId,
    pub handle: Handle,
    pub expires_at: Instant,
    /// When the next resend is allowed, or None if no sends are left.
    pub next_send_at: Option<Instant>,
    pub checks_left: u32,
    /// When the next check is allowed.
    pub next_check_at: Instant,
}

/// A code to deliver to the handle. Never log it.
#[derive(Clone, PartialEq, Eq)]
pub struct Code(pub String);

impl std::fmt::Debug for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Code(******)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("too many requests; retry in {0:?}")]
    RetryAfter(Duration),
    #[error("no such verification session, or it expired")]
    NotFound,
    #[error("no sends or checks left in this session; start a new one")]
    Exhausted,
    #[error("wrong code; {checks_left} checks left")]
    WrongCode {
        checks_left: u32,
        next_check_in: Duration,
    },
    #[error("the service is busy; retry later")]
    Busy,
}

/// A session as the caller keeps it between requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub handle: Handle,
    pub started: Instant,
    /// HMAC-SHA256(key, session id ‖ code).
    pub code_mac: [u8; 32],
    pub sends: u32,
    pub last_send: Instant,
    pub checks: u32,
    pub next_check_at: Instant,
}

/// All verification sessions of one node.
pub struct Verifications {
    config: VerificationConfig,
    key: hmac::Key,
    sessions: HashMap<SessionId, Session>,
    per_handle: RateLimiter<Handle>,
    per_ip: RateLimiter<IpAddr>,
    per_v6_48: RateLimiter<IpAddr>,
    /// Wrong codes per handle, across sessions.
    failures: HashMap<Handle, Failures>,
}

/// A handle's wrong codes since its last success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failures {
    pub count: u32,
    pub last: Instant,
    /// Locked (no starts, no checks) until then.
    pub locked_until: Option<Instant>,
}

impl std::fmt::Debug for Verifications {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifications")
            .field("sessions", &self.sessions.len())
            .finish()
    }
}

const HOUR: Duration = Duration::from_secs(3600);

impl Verifications {
    /// `key` is the HMAC key codes are stored under (32 random bytes).
    pub fn new(config: VerificationConfig, key: &[u8]) -> Verifications {
        Verifications {
            per_handle: RateLimiter::new(config.starts_per_handle_per_hour, HOUR),
            per_ip: RateLimiter::new(config.starts_per_ip_per_hour, HOUR),
            per_v6_48: RateLimiter::new(config.starts_per_v6_48_per_hour, HOUR),
            failures: HashMap::new(),
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
            sessions: HashMap::new(),
            config,
        }
    }

    /// Starts a session. `id` and `code_seed` come from a CSPRNG.
    pub fn start(
        &mut self,
        handle: Handle,
        ip: IpAddr,
        now: Instant,
        id: [u8; 16],
        code_seed: u32,
    ) -> Result<(SessionState, Code), Refusal> {
        self.handle_timeout(now);
        if self.sessions.len() >= self.config.max_sessions {
            return Err(Refusal::Busy);
        }
        self.locked(&handle, now)?;
        let ip = source_key(ip);
        let net48 = wide_key(ip);
        // Check every limit before consuming any.
        let mut wait = self
            .per_ip
            .wait_time(&ip, now)
            .max(self.per_handle.wait_time(&handle, now));
        if let Some(n) = net48 {
            wait = wait.max(self.per_v6_48.wait_time(&n, now));
        }
        if !wait.is_zero() {
            return Err(Refusal::RetryAfter(wait));
        }
        self.per_ip.take(ip, now);
        self.per_handle.take(handle.clone(), now);
        if let Some(n) = net48 {
            self.per_v6_48.take(n, now);
        }
        let id = SessionId(id);
        let code = code_from(code_seed);
        let session = Session {
            handle,
            started: now,
            code_mac: self.mac(&id, &code),
            sends: 1,
            last_send: now,
            checks: 0,
            next_check_at: now,
        };
        self.sessions.insert(id, session);
        Ok((self.state(id), code))
    }

    /// Sends a new code for a session (the old one stops working).
    pub fn resend(
        &mut self,
        id: SessionId,
        now: Instant,
        code_seed: u32,
    ) -> Result<(SessionState, Code), Refusal> {
        self.handle_timeout(now);
        let s = self.sessions.get(&id).ok_or(Refusal::NotFound)?;
        if s.sends >= self.config.max_sends {
            return Err(Refusal::Exhausted);
        }
        let at = s.last_send + delay(&self.config.resend_delays, s.sends);
        if now < at {
            return Err(Refusal::RetryAfter(at - now));
        }
        let code = code_from(code_seed);
        let mac = self.mac(&id, &code);
        let s = self.sessions.get_mut(&id).ok_or(Refusal::NotFound)?;
        s.code_mac = mac;
        s.sends += 1;
        s.last_send = now;
        Ok((self.state(id), code))
    }

    /// Checks a code. On success the session ends, the handle's wrong
    /// codes are forgotten, and the caller makes a handle token for it
    /// (valid [`VerificationConfig::token_ttl`]).
    pub fn check(&mut self, id: SessionId, code: &str, now: Instant) -> Result<Handle, Refusal> {
        self.handle_timeout(now);
        let s = self.sessions.get(&id).ok_or(Refusal::NotFound)?;
        if s.checks >= self.config.max_checks {
            return Err(Refusal::Exhausted);
        }
        let handle = s.handle.clone();
        self.locked(&handle, now)?;
        if now < s.next_check_at {
            return Err(Refusal::RetryAfter(s.next_check_at - now));
        }
        let ok =
            code.len() == 6 && hmac::verify(&self.key, &mac_input(&id, code), &s.code_mac).is_ok();
        let s = self.sessions.get_mut(&id).ok_or(Refusal::NotFound)?;
        s.checks += 1;
        if ok {
            self.sessions.remove(&id);
            self.failures.remove(&handle);
            return Ok(handle);
        }
        let checks = s.checks;
        if let Some(lock) = self.failed(&handle, now) {
            // The handle is locked: this session is over, and the next
            // one waits for the lock.
            self.sessions.remove(&id);
            return Err(Refusal::RetryAfter(lock));
        }
        let Some(s) = self.sessions.get_mut(&id) else {
            return Err(Refusal::NotFound);
        };
        debug_assert_eq!(s.checks, checks);
        let wait = delay(&self.config.check_delays, s.checks);
        s.next_check_at = now + wait;
        let checks_left = self.config.max_checks - s.checks;
        if checks_left == 0 {
            self.sessions.remove(&id);
            return Err(Refusal::Exhausted);
        }
        Err(Refusal::WrongCode {
            checks_left,
            next_check_in: wait,
        })
    }

    /// A session as it is now, for the caller to keep (None: it ended).
    pub fn session(&self, id: SessionId) -> Option<Session> {
        self.sessions.get(&id).cloned()
    }

    /// Puts in a session the caller kept (or forgets it, for None),
    /// replacing what this node had for it.
    pub fn put_session(&mut self, id: SessionId, s: Option<Session>) {
        match s {
            Some(s) => self.sessions.insert(id, s),
            None => self.sessions.remove(&id),
        };
    }

    /// A handle's wrong codes as they are now, for the caller to keep.
    pub fn failures(&self, handle: &Handle) -> Option<Failures> {
        self.failures.get(handle).copied()
    }

    /// Puts in a handle's wrong codes the caller kept (or none).
    pub fn put_failures(&mut self, handle: &Handle, f: Option<Failures>) {
        match f {
            Some(f) => self.failures.insert(handle.clone(), f),
            None => self.failures.remove(handle),
        };
    }

    pub fn state_of(&self, id: SessionId) -> Option<SessionState> {
        self.sessions.contains_key(&id).then(|| self.state(id))
    }

    /// Drops expired sessions and rate-limit entries.
    pub fn handle_timeout(&mut self, now: Instant) {
        let ttl = self.config.session_ttl;
        self.sessions.retain(|_, s| now < s.started + ttl);
        self.per_handle.prune(now);
        self.per_ip.prune(now);
        self.per_v6_48.prune(now);
        let keep = self.config.lockout_max;
        self.failures
            .retain(|_, f| now < f.last + keep || f.locked_until.is_some_and(|until| now < until));
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let ttl = self.config.session_ttl;
        self.sessions.values().map(|s| s.started + ttl).min()
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    fn state(&self, id: SessionId) -> SessionState {
        let s = &self.sessions[&id];
        SessionState {
            id,
            handle: s.handle.clone(),
            expires_at: s.started + self.config.session_ttl,
            next_send_at: (s.sends < self.config.max_sends)
                .then(|| s.last_send + delay(&self.config.resend_delays, s.sends)),
            checks_left: self.config.max_checks - s.checks,
            next_check_at: s.next_check_at,
        }
    }

    fn mac(&self, id: &SessionId, code: &Code) -> [u8; 32] {
        hmac::sign(&self.key, &mac_input(id, &code.0))
            .as_ref()
            .try_into()
            .expect("HMAC-SHA256 is 32 bytes")
    }

    /// Refuses while `handle` is locked.
    fn locked(&self, handle: &Handle, now: Instant) -> Result<(), Refusal> {
        match self.failures.get(handle).and_then(|f| f.locked_until) {
            Some(until) if now < until => Err(Refusal::RetryAfter(until - now)),
            _ => Ok(()),
        }
    }

    /// Counts a wrong code for `handle`; returns how long it is now locked,
    /// if this failure locked it.
    fn failed(&mut self, handle: &Handle, now: Instant) -> Option<Duration> {
        let c = &self.config;
        let f = self.failures.entry(handle.clone()).or_insert(Failures {
            count: 0,
            last: now,
            locked_until: None,
        });
        if now >= f.last + c.lockout_max {
            // Quiet for a day: start over.
            f.count = 0;
        }
        f.count += 1;
        f.last = now;
        let every = c.lockout_after.max(1);
        if f.count % every != 0 {
            return None;
        }
        let nth = f.count / every - 1;
        let lock = c
            .lockout_base
            .saturating_mul(2u32.saturating_pow(nth.min(16)))
            .min(c.lockout_max);
        f.locked_until = Some(now + lock);
        Some(lock)
    }
}

/// The /48 an IPv6 source belongs to, counted for volume; none for IPv4.
pub fn wide_key(ip: IpAddr) -> Option<IpAddr> {
    match ip {
        IpAddr::V4(_) => None,
        IpAddr::V6(v6) => Some(IpAddr::V6((u128::from(v6) & !((1u128 << 80) - 1)).into())),
    }
}

fn mac_input(id: &SessionId, code: &str) -> Vec<u8> {
    let mut b = id.0.to_vec();
    b.extend_from_slice(code.as_bytes());
    b
}

/// Six decimal digits. `seed` is uniform over u32; the modulo bias of
/// 2^32 mod 10^6 is below 2^-12 per code and irrelevant at 5 guesses.
fn code_from(seed: u32) -> Code {
    Code(format!("{:06}", seed % 1_000_000))
}

/// `delays[n-1]`, the last entry repeating; zero if empty.
fn delay(delays: &[Duration], n: u32) -> Duration {
    let i = (n as usize)
        .saturating_sub(1)
        .min(delays.len().saturating_sub(1));
    delays.get(i).copied().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, 7));

    fn handle() -> Handle {
        Handle::parse("+14155550123").unwrap()
    }

    fn v() -> Verifications {
        Verifications::new(VerificationConfig::default(), b"test key")
    }

    #[test]
    fn right_code_proves_the_handle_once() {
        let mut v = v();
        let t0 = Instant::now();
        let (s, code) = v.start(handle(), IP, t0, [1; 16], 123_456).unwrap();
        assert_eq!(code.0, "123456");
        assert_eq!(s.checks_left, 5);
        assert_eq!(s.expires_at, t0 + Duration::from_secs(600));
        assert_eq!(v.check(s.id, "123456", t0), Ok(handle()));
        assert_eq!(v.check(s.id, "123456", t0), Err(Refusal::NotFound));
    }

    #[test]
    fn codes_expire_after_ten_minutes() {
        let mut v = v();
        let t0 = Instant::now();
        let (s, code) = v.start(handle(), IP, t0, [1; 16], 42).unwrap();
        assert_eq!(code.0, "000042");
        let late = t0 + Duration::from_secs(600);
        assert_eq!(v.check(s.id, "000042", late), Err(Refusal::NotFound));
        assert_eq!(v.session_count(), 0);
    }

    #[test]
    fn a_session_and_failures_put_in_from_elsewhere_carry_on() {
        // Node A starts a session and takes a wrong code; node B, given
        // what A kept, takes the next check where A left off.
        let mut a = v();
        let t0 = Instant::now();
        let (s, _) = a.start(handle(), IP, t0, [1; 16], 777_777).unwrap();
        assert!(a.check(s.id, "000000", t0).is_err());
        let (kept, failures) = (a.session(s.id), a.failures(&handle()));
        assert_eq!(kept.as_ref().map(|k| k.checks), Some(1));
        assert_eq!(failures.map(|f| f.count), Some(1));
        let mut b = v();
        b.put_session(s.id, kept);
        b.put_failures(&handle(), failures);
        assert_eq!(b.state_of(s.id).map(|st| st.checks_left), Some(4));
        assert_eq!(b.check(s.id, "777777", t0), Ok(handle()));
        assert_eq!(b.session(s.id), None, "ended");
        assert_eq!(b.failures(&handle()), None, "cleared");
        // Put back as gone, a session is gone.
        a.put_session(s.id, None);
        assert_eq!(a.check(s.id, "777777", t0), Err(Refusal::NotFound));
    }

    #[test]
    fn wrong_codes_get_growing_delays_then_the_session_ends() {
        let mut v = v();
        let mut now = Instant::now();
        let (s, _) = v.start(handle(), IP, now, [1; 16], 111_111).unwrap();
        // Two immediate tries, then 1 min, 2 min, 4 min.
        let expect = [0, 60, 120, 240];
        for (i, wait) in expect.iter().enumerate() {
            let r = v.check(s.id, "000000", now);
            assert_eq!(
                r,
                Err(Refusal::WrongCode {
                    checks_left: 4 - i as u32,
                    next_check_in: Duration::from_secs(*wait)
                })
            );
            if *wait > 0 {
                assert_eq!(
                    v.check(s.id, "111111", now),
                    Err(Refusal::RetryAfter(Duration::from_secs(*wait))),
                    "too early, even with the right code"
                );
            }
            now += Duration::from_secs(*wait);
        }
        // The fifth check is the last; wrong again ends the session.
        assert_eq!(v.check(s.id, "000000", now), Err(Refusal::Exhausted));
        assert_eq!(v.check(s.id, "111111", now), Err(Refusal::NotFound));
    }

    #[test]
    fn resends_are_limited_and_spaced() {
        let mut v = v();
        let mut now = Instant::now();
        let (s, first) = v.start(handle(), IP, now, [1; 16], 1).unwrap();
        assert_eq!(s.next_send_at, Some(now + Duration::from_secs(30)));
        assert_eq!(
            v.resend(s.id, now, 2).map(|x| x.1),
            Err(Refusal::RetryAfter(Duration::from_secs(30)))
        );
        let mut last = first;
        for wait in [30, 60, 120, 240] {
            now += Duration::from_secs(wait);
            let (_, code) = v.resend(s.id, now, wait as u32).unwrap();
            assert_ne!(code, last);
            last = code;
        }
        // Five sends in 7.5 minutes; a sixth is refused outright.
        assert_eq!(v.resend(s.id, now, 9).map(|x| x.1), Err(Refusal::Exhausted));
        // Only the newest code works.
        assert!(v.check(s.id, "000001", now).is_err());
        assert_eq!(v.check(s.id, &last.0, now), Ok(handle()));
    }

    #[test]
    fn starts_are_rate_limited_per_handle_and_per_ip() {
        let mut v = v();
        let now = Instant::now();
        for i in 0..5u8 {
            v.start(handle(), IP, now, [i; 16], 1).unwrap();
        }
        let Err(Refusal::RetryAfter(wait)) = v.start(handle(), IP, now, [9; 16], 1) else {
            panic!("sixth start for one handle must be refused")
        };
        assert_eq!(wait, Duration::from_secs(720), "one token per 12 min");
        // Another handle from the same IP still works, up to 20 per hour.
        let mut refused = None;
        for i in 0..20u32 {
            let h = Handle::parse(&format!("user{i}@example.com")).unwrap();
            if let Err(e) = v.start(h, IP, now, [100 + i as u8; 16], 1) {
                refused = Some((i, e));
                break;
            }
        }
        assert_eq!(
            refused,
            Some((15, Refusal::RetryAfter(Duration::from_secs(180))))
        );
        // A refused start consumed nothing: after the wait it works.
        let later = now + Duration::from_secs(720);
        v.start(handle(), IP, later, [77; 16], 1).unwrap();
    }

    #[test]
    fn wrong_codes_count_per_handle_across_sessions_and_lock_it_longer_each_time() {
        let mut v = v();
        let mut now = Instant::now();
        let mut seed = 0u8;
        let mut guesses = 0;
        let mut locks = Vec::new();
        // An attacker starts session after session (from ever new
        // addresses) and guesses as fast as each allows, for a day.
        let end = now + Duration::from_secs(24 * 3600);
        while now < end {
            seed = seed.wrapping_add(1);
            let ip = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, seed, 1));
            let s = match v.start(handle(), ip, now, [seed; 16], 999_999) {
                Ok((s, _)) => s,
                Err(Refusal::RetryAfter(w)) => {
                    now += w;
                    continue;
                }
                Err(e) => panic!("{e:?}"),
            };
            loop {
                match v.check(s.id, "000000", now) {
                    Err(Refusal::WrongCode { next_check_in, .. }) => {
                        guesses += 1;
                        now += next_check_in;
                    }
                    Err(Refusal::RetryAfter(lock)) => {
                        guesses += 1;
                        locks.push(lock.as_secs() / 60);
                        break;
                    }
                    Err(Refusal::Exhausted) => {
                        guesses += 1;
                        break;
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
        assert_eq!(&locks[..4], &[15, 30, 60, 120], "minutes, doubling");
        assert!(guesses <= 70, "{guesses} guesses in a day");
        // Another handle is not affected.
        let other = Handle::parse("+14155550100").unwrap();
        assert!(v.start(other, IP, now, [201; 16], 1).is_ok());
    }

    #[test]
    fn a_locked_handle_takes_no_session_and_no_check() {
        let mut v = v();
        let mut now = Instant::now();
        // Ten wrong codes over three sessions lock the handle.
        let mut sessions = Vec::new();
        for i in 0..3u8 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, i));
            sessions.push(v.start(handle(), ip, now, [i; 16], 123_456).unwrap().0);
        }
        let mut last = None;
        for n in 0..10 {
            let s = &sessions[n / 4];
            let r = v.check(s.id, "000000", now);
            if let Err(Refusal::WrongCode { next_check_in, .. }) = &r {
                if n % 4 == 3 {
                    continue; // the next session starts at once
                }
                now += *next_check_in;
            }
            last = Some(r);
        }
        let lock = Duration::from_secs(15 * 60);
        assert_eq!(last, Some(Err(Refusal::RetryAfter(lock))));
        // Even the right code in a session still open is refused now.
        now += Duration::from_secs(1);
        assert_eq!(
            v.check(sessions[1].id, "123456", now),
            Err(Refusal::RetryAfter(lock - Duration::from_secs(1)))
        );
        assert_eq!(
            v.start(handle(), IP, now, [50; 16], 1).map(|x| x.1),
            Err(Refusal::RetryAfter(lock - Duration::from_secs(1)))
        );
        // After the lock a new session works.
        now += lock;
        let (s, _) = v.start(handle(), IP, now, [51; 16], 654_321).unwrap();
        assert_eq!(v.check(s.id, "654321", now), Ok(handle()));
    }

    #[test]
    fn a_right_code_clears_the_handles_failures() {
        let mut v = v();
        let now = Instant::now();
        let (s, _) = v.start(handle(), IP, now, [1; 16], 123_456).unwrap();
        for _ in 0..2 {
            assert!(v.check(s.id, "000000", now).is_err());
        }
        let now = now + Duration::from_secs(60);
        assert_eq!(v.check(s.id, "123456", now), Ok(handle()));
        assert!(v.failures.is_empty());
    }

    #[test]
    fn an_ipv6_host_is_one_source_and_a_48_is_bounded() {
        let mut v = v();
        let now = Instant::now();
        let mut ok = 0;
        // Twenty-five handles from addresses of one /64: 20 pass.
        for i in 0..25u32 {
            let h = Handle::parse(&format!("v{i}@example.com")).unwrap();
            let ip: IpAddr = format!("2001:db8:1:2::{:x}", i + 1).parse().unwrap();
            if v.start(h, ip, now, [i as u8; 16], 1).is_ok() {
                ok += 1;
            }
        }
        assert_eq!(ok, 20);
        // Many /64s of one /48: bounded by the /48's 100 an hour.
        let mut ok = 0;
        for i in 0..150u32 {
            let h = Handle::parse(&format!("w{i}@example.com")).unwrap();
            let ip: IpAddr = format!("2001:db8:7:{:x}::1", i).parse().unwrap();
            if v.start(h, ip, now, [(i % 250) as u8; 16], 1).is_ok() {
                ok += 1;
            }
        }
        assert_eq!(ok, 100);
    }

    #[test]
    fn codes_look_random_and_are_six_digits() {
        for seed in [0, 7, 999_999, 1_000_000, u32::MAX] {
            let c = code_from(seed);
            assert_eq!(c.0.len(), 6);
            assert!(c.0.bytes().all(|b| b.is_ascii_digit()));
        }
        assert_eq!(format!("{:?}", code_from(5)), "Code(******)");
    }
}
