//! One device connection, courier side: bytes and time in; bytes, events
//! and the next deadline out.
//!
//! States: waiting for Hello (bounded by `hello_timeout`), open, closed.
//! Keepalive: if the device announces a ping interval it drives keepalive
//! (the courier only answers, so a phone's radio wakes on its own
//! schedule); otherwise the courier pings after `ping_interval` of silence
//! on its side. Either way the connection is dead after two intervals with
//! nothing received. Deliveries beyond `max_inflight` unacked wait in the
//! session until acks make room.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use wire::push::{
    CloseReason, DeviceToken, Frame, Notification, NotificationId, PlatformStatus, PlatformToken,
    VERSION,
};

#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Courier ping interval when the device does not choose one.
    pub ping_interval: Duration,
    /// Bounds on a device-chosen interval.
    pub min_ping_interval: Duration,
    pub max_ping_interval: Duration,
    /// Time from connection to Hello.
    pub hello_timeout: Duration,
    /// Unacked notifications on the wire at once.
    pub max_inflight: usize,
    /// Notifications held back behind a full window before the device
    /// counts as a slow reader and is disconnected (they stay stored).
    pub max_waiting: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            ping_interval: Duration::from_secs(240),
            min_ping_interval: Duration::from_secs(10),
            max_ping_interval: Duration::from_secs(3600),
            hello_timeout: Duration::from_secs(10),
            max_inflight: 128,
            max_waiting: 1024,
        }
    }
}

/// What the device asked for or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    Hello {
        topics: Vec<String>,
    },
    Subscribe {
        request: u32,
        topic: String,
        server_key: Option<[u8; 65]>,
    },
    Revoke {
        token: DeviceToken,
    },
    /// The device's token at Apple's or Google's push service.
    Platform {
        request: u32,
        token: PlatformToken,
    },
    Acked(Vec<NotificationId>),
    /// The session is over; `by_peer` if the device went away or broke the
    /// protocol, false if the courier closed it.
    Closed {
        reason: CloseReason,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitHello,
    Open,
    Closed,
}

/// The one timer a session has armed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timer {
    Hello(Instant),
    Keepalive {
        ping: Option<Instant>,
        dead: Instant,
    },
    None,
}

#[derive(Debug)]
pub struct Session {
    cfg: SessionConfig,
    state: State,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    inflight: HashSet<NotificationId>,
    waiting: VecDeque<Notification>,
    events: VecDeque<SessionEvent>,
    interval: Duration,
    device_pings: bool,
    last_rx: Instant,
    last_tx: Instant,
    timer: Timer,
    ping_seq: u64,
    /// Tokens go first; notifications wait until they are out.
    tokens_sent: bool,
}

impl Session {
    pub fn new(cfg: SessionConfig, now: Instant) -> Session {
        let timer = Timer::Hello(now + cfg.hello_timeout);
        let interval = cfg.ping_interval;
        Session {
            cfg,
            state: State::AwaitHello,
            inbuf: Vec::new(),
            out: Vec::new(),
            inflight: HashSet::new(),
            waiting: VecDeque::new(),
            events: VecDeque::new(),
            interval,
            device_pings: false,
            last_rx: now,
            last_tx: now,
            timer,
            ping_seq: 0,
            tokens_sent: false,
        }
    }

    /// Bytes from the device.
    pub fn handle_bytes(&mut self, bytes: &[u8], now: Instant) {
        if self.state == State::Closed {
            return;
        }
        self.last_rx = now;
        self.inbuf.extend_from_slice(bytes);
        let mut used = 0;
        loop {
            match Frame::decode(&self.inbuf[used..]) {
                Ok(Some((frame, n))) => {
                    used += n;
                    self.on_frame(frame, now);
                    if self.state == State::Closed {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "device sent a malformed frame");
                    self.close(CloseReason::Protocol, &e.to_string(), now);
                    break;
                }
            }
        }
        self.inbuf.drain(..used);
        if self.inbuf.is_empty() && self.inbuf.capacity() > 1024 {
            // Idle connections should not keep a large buffer.
            self.inbuf = Vec::new();
        }
        self.rearm(now);
    }

    /// The device's side went away (EOF, reset, QUIC close).
    pub fn handle_disconnect(&mut self) {
        if self.state != State::Closed {
            self.state = State::Closed;
            self.timer = Timer::None;
            self.events.push_back(SessionEvent::Closed {
                reason: CloseReason::Other(0),
            });
        }
    }

    /// Fires due timers; early calls do nothing.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.timer {
            Timer::Hello(at) if now >= at => {
                self.close(CloseReason::Protocol, "no hello", now);
            }
            Timer::Keepalive { dead, .. } if now >= dead => {
                self.close(CloseReason::Idle, "no traffic for two ping intervals", now);
            }
            Timer::Keepalive { ping: Some(p), .. } if now >= p => {
                self.ping_seq += 1;
                self.send(&Frame::Ping(self.ping_seq), now);
                self.rearm(now);
            }
            _ => {}
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.timer {
            Timer::Hello(at) => Some(at),
            Timer::Keepalive { ping, dead } => Some(ping.map_or(dead, |p| p.min(dead))),
            Timer::None => None,
        }
    }

    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        self.events.pop_front()
    }

    /// Bytes waiting to be written.
    pub fn output(&self) -> &[u8] {
        &self.out
    }

    /// Marks `n` bytes of [`Session::output`] as written.
    pub fn consume_output(&mut self, n: usize) {
        self.out.drain(..n.min(self.out.len()));
        if self.out.is_empty() && self.out.capacity() > 4096 {
            self.out = Vec::new();
        }
    }

    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// The keepalive interval in force.
    pub fn ping_interval(&self) -> Duration {
        self.interval
    }

    /// Answers Hello with the device's tokens.
    /// Answers Hello with the device's tokens; notifications that arrived
    /// before it go out right after.
    pub fn send_tokens(&mut self, tokens: Vec<(String, DeviceToken)>, now: Instant) {
        let secs = self.interval.as_secs().min(u16::MAX as u64) as u16;
        self.send(
            &Frame::Tokens {
                ping_interval_s: secs,
                tokens,
            },
            now,
        );
        self.tokens_sent = true;
        self.fill_window(now);
    }

    /// Moves waiting notifications onto the wire while the window allows.
    fn fill_window(&mut self, now: Instant) {
        if !self.tokens_sent || self.state != State::Open {
            return;
        }
        while self.inflight.len() < self.cfg.max_inflight {
            let Some(n) = self.waiting.pop_front() else {
                break;
            };
            self.inflight.insert(n.id);
            self.send(&Frame::Notification(n), now);
        }
    }

    pub fn send_subscription(
        &mut self,
        request: u32,
        token: DeviceToken,
        endpoint: String,
        now: Instant,
    ) {
        self.send(
            &Frame::Subscription {
                request,
                token,
                endpoint,
            },
            now,
        );
    }

    pub fn send_platform_answer(
        &mut self,
        request: u32,
        status: PlatformStatus,
        text: &str,
        now: Instant,
    ) {
        let text: String = text.chars().take(120).collect();
        self.send(
            &Frame::PlatformAnswer {
                request,
                status,
                text,
            },
            now,
        );
    }

    /// Queues a live notification for the device. One already in flight or
    /// waiting is not sent twice; past `max_inflight` + `max_waiting` the
    /// device is a slow reader and is closed.
    pub fn deliver(&mut self, n: Notification, now: Instant) {
        self.enqueue(n, now, true);
    }

    /// Queues the device's stored backlog after Hello: bounded by the queue
    /// cap already, so never a reason to close.
    pub fn deliver_stored(&mut self, n: Notification, now: Instant) {
        self.enqueue(n, now, false);
    }

    fn enqueue(&mut self, n: Notification, now: Instant, live: bool) {
        if self.state == State::Closed
            || self.inflight.contains(&n.id)
            || self.waiting.iter().any(|w| w.id == n.id)
        {
            return;
        }
        if self.tokens_sent && self.inflight.len() < self.cfg.max_inflight {
            self.inflight.insert(n.id);
            self.send(&Frame::Notification(n), now);
        } else if !live || self.waiting.len() < self.cfg.max_waiting {
            self.waiting.push_back(n);
        } else {
            // Everything it has not acked is stored; it gets it all again
            // on its next connection.
            self.close(
                CloseReason::SlowReader,
                "too many unacked notifications",
                now,
            );
        }
    }

    /// Notifications sent and not yet acked, plus those waiting.
    pub fn unacked(&self) -> usize {
        self.inflight.len() + self.waiting.len()
    }

    /// Closes with a reason the device sees.
    pub fn close(&mut self, reason: CloseReason, text: &str, now: Instant) {
        if self.state == State::Closed {
            return;
        }
        let text: String = text.chars().take(120).collect();
        self.send(&Frame::Close { reason, text }, now);
        self.state = State::Closed;
        self.timer = Timer::None;
        self.events.push_back(SessionEvent::Closed { reason });
    }

    fn on_frame(&mut self, frame: Frame, now: Instant) {
        match (self.state, frame) {
            (
                State::AwaitHello,
                Frame::Hello {
                    version,
                    ping_interval_s,
                    topics,
                },
            ) => {
                if version != VERSION {
                    self.close(CloseReason::Protocol, "unsupported version", now);
                    return;
                }
                if ping_interval_s != 0 {
                    self.device_pings = true;
                    self.interval = Duration::from_secs(ping_interval_s.into())
                        .clamp(self.cfg.min_ping_interval, self.cfg.max_ping_interval);
                }
                self.state = State::Open;
                self.events.push_back(SessionEvent::Hello { topics });
            }
            (State::AwaitHello, _) => self.close(CloseReason::Protocol, "expected hello", now),
            (State::Open, Frame::Ack { ids }) => {
                let acked: Vec<_> = ids
                    .into_iter()
                    .filter(|id| self.inflight.remove(id))
                    .collect();
                self.fill_window(now);
                if !acked.is_empty() {
                    self.events.push_back(SessionEvent::Acked(acked));
                }
            }
            (State::Open, Frame::Ping(v)) => self.send(&Frame::Pong(v), now),
            (State::Open, Frame::Pong(_)) => {}
            (
                State::Open,
                Frame::Subscribe {
                    request,
                    topic,
                    server_key,
                },
            ) => self.events.push_back(SessionEvent::Subscribe {
                request,
                topic,
                server_key,
            }),
            (State::Open, Frame::Revoke { token }) => {
                self.events.push_back(SessionEvent::Revoke { token })
            }
            (State::Open, Frame::Platform { request, token }) => self
                .events
                .push_back(SessionEvent::Platform { request, token }),
            (State::Open, _) => self.close(
                CloseReason::Protocol,
                "frame not allowed from a device",
                now,
            ),
            (State::Closed, _) => {}
        }
    }

    fn send(&mut self, f: &Frame, now: Instant) {
        if let Err(e) = f.encode(&mut self.out) {
            // Our own frames are built within limits; log rather than panic.
            tracing::error!(error = %e, "courier built an unencodable frame");
            return;
        }
        self.last_tx = now;
    }

    fn rearm(&mut self, _now: Instant) {
        if self.state != State::Open {
            return;
        }
        let dead = self.last_rx + 2 * self.interval;
        let ping = (!self.device_pings).then(|| self.last_tx + self.interval);
        self.timer = Timer::Keepalive { ping, dead };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(ping: u16) -> Vec<u8> {
        Frame::Hello {
            version: VERSION,
            ping_interval_s: ping,
            topics: vec!["com.example.chat".into()],
        }
        .to_bytes()
        .unwrap()
    }

    fn frames(s: &mut Session) -> Vec<Frame> {
        let mut v = Vec::new();
        let mut used = 0;
        while let Some((f, n)) = Frame::decode(&s.output()[used..]).unwrap() {
            v.push(f);
            used += n;
        }
        s.consume_output(used);
        v
    }

    fn note(i: u8) -> Notification {
        Notification {
            id: NotificationId([i; 16]),
            token: DeviceToken([1; 32]),
            push_type: wire::push::PushType::Alert,
            priority: 10,
            expires: 0,
            collapse_id: String::new(),
            topic: "com.example.chat".into(),
            payload: b"{}".to_vec(),
        }
    }

    #[test]
    fn hello_must_come_in_time() {
        let t0 = Instant::now();
        let mut s = Session::new(SessionConfig::default(), t0);
        s.handle_timeout(t0 + Duration::from_secs(9));
        assert!(!s.is_closed(), "early timeout does nothing");
        s.handle_timeout(t0 + Duration::from_secs(10));
        assert!(s.is_closed());
        assert!(matches!(
            frames(&mut s)[..],
            [Frame::Close {
                reason: CloseReason::Protocol,
                ..
            }]
        ));
    }

    #[test]
    fn first_frame_must_be_hello() {
        let t0 = Instant::now();
        let mut s = Session::new(SessionConfig::default(), t0);
        s.handle_bytes(&Frame::Ping(1).to_bytes().unwrap(), t0);
        assert!(s.is_closed());
        let mut s = Session::new(SessionConfig::default(), t0);
        s.handle_bytes(&[0x77, 0, 0], t0);
        assert!(s.is_closed(), "garbage closes");
    }

    #[test]
    fn hello_split_across_reads_opens() {
        let t0 = Instant::now();
        let mut s = Session::new(SessionConfig::default(), t0);
        let h = hello(0);
        s.handle_bytes(&h[..4], t0);
        assert!(!s.is_open());
        s.handle_bytes(&h[4..], t0);
        assert!(s.is_open());
        assert_eq!(
            s.poll_event(),
            Some(SessionEvent::Hello {
                topics: vec!["com.example.chat".into()]
            })
        );
    }

    #[test]
    fn courier_pings_and_declares_dead_after_two_intervals() {
        let t0 = Instant::now();
        let cfg = SessionConfig {
            ping_interval: Duration::from_secs(60),
            ..SessionConfig::default()
        };
        let mut s = Session::new(cfg, t0);
        s.handle_bytes(&hello(0), t0);
        s.send_tokens(vec![], t0);
        frames(&mut s);
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(60)));
        s.handle_timeout(t0 + Duration::from_secs(60));
        assert!(matches!(frames(&mut s)[..], [Frame::Ping(_)]));
        // A pong keeps it alive.
        s.handle_bytes(
            &Frame::Pong(1).to_bytes().unwrap(),
            t0 + Duration::from_secs(61),
        );
        s.handle_timeout(t0 + Duration::from_secs(121));
        assert!(!s.is_closed());
        // Silence for two intervals after the last receive: dead.
        s.handle_timeout(t0 + Duration::from_secs(181));
        assert!(s.is_closed());
        assert!(matches!(
            frames(&mut s).last(),
            Some(Frame::Close {
                reason: CloseReason::Idle,
                ..
            })
        ));
    }

    #[test]
    fn device_chosen_interval_means_the_courier_only_answers() {
        let t0 = Instant::now();
        let mut s = Session::new(SessionConfig::default(), t0);
        s.handle_bytes(&hello(1), t0); // clamped up to 10 s
        assert_eq!(s.ping_interval(), Duration::from_secs(10));
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(20)));
        s.handle_bytes(
            &Frame::Ping(7).to_bytes().unwrap(),
            t0 + Duration::from_secs(10),
        );
        assert_eq!(frames(&mut s), vec![Frame::Pong(7)]);
        s.handle_timeout(t0 + Duration::from_secs(29));
        assert!(!s.is_closed());
        s.handle_timeout(t0 + Duration::from_secs(30));
        assert!(s.is_closed());
    }

    #[test]
    fn inflight_window_and_acks() {
        let t0 = Instant::now();
        let cfg = SessionConfig {
            max_inflight: 2,
            ..SessionConfig::default()
        };
        let mut s = Session::new(cfg, t0);
        s.handle_bytes(&hello(0), t0);
        s.poll_event();
        s.send_tokens(vec![], t0);
        frames(&mut s);
        for i in 1..=3 {
            s.deliver(note(i), t0);
        }
        s.deliver(note(1), t0); // duplicate: ignored
        let sent = frames(&mut s);
        assert_eq!(sent.len(), 2);
        assert_eq!(s.unacked(), 3);
        let ack = Frame::Ack {
            ids: vec![NotificationId([1; 16]), NotificationId([9; 16])],
        };
        s.handle_bytes(&ack.to_bytes().unwrap(), t0);
        assert_eq!(
            s.poll_event(),
            Some(SessionEvent::Acked(vec![NotificationId([1; 16])])),
            "unknown ids are not reported"
        );
        assert_eq!(frames(&mut s), vec![Frame::Notification(note(3))]);
        assert_eq!(s.unacked(), 2);
    }

    #[test]
    fn notifications_before_hello_follow_the_tokens() {
        let t0 = Instant::now();
        let mut s = Session::new(SessionConfig::default(), t0);
        // A push lands between the handshake and Hello.
        s.deliver(note(1), t0);
        assert!(s.output().is_empty());
        s.handle_bytes(&hello(0), t0);
        s.poll_event();
        // The backlog from the store holds it too: not sent twice.
        s.deliver_stored(note(1), t0);
        assert!(s.output().is_empty(), "nothing before the tokens");
        s.send_tokens(vec![], t0);
        let sent = frames(&mut s);
        assert!(matches!(sent[0], Frame::Tokens { .. }));
        assert_eq!(sent[1..], [Frame::Notification(note(1))]);
    }

    #[test]
    fn a_device_that_never_acks_is_a_slow_reader() {
        let t0 = Instant::now();
        let cfg = SessionConfig {
            max_inflight: 2,
            max_waiting: 2,
            ..SessionConfig::default()
        };
        let mut s = Session::new(cfg, t0);
        s.handle_bytes(&hello(0), t0);
        s.poll_event();
        s.send_tokens(vec![], t0);
        for i in 1..=4 {
            s.deliver(note(i), t0);
        }
        assert!(!s.is_closed(), "two in flight, two waiting");
        s.deliver(note(5), t0);
        assert!(s.is_closed());
        assert_eq!(
            s.poll_event(),
            Some(SessionEvent::Closed {
                reason: CloseReason::SlowReader
            })
        );
    }

    #[test]
    fn devices_may_not_send_courier_frames() {
        let t0 = Instant::now();
        let mut s = Session::new(SessionConfig::default(), t0);
        s.handle_bytes(&hello(0), t0);
        s.handle_bytes(&Frame::Notification(note(1)).to_bytes().unwrap(), t0);
        assert!(s.is_closed());
    }
}
