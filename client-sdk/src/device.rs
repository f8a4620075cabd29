//! A device on a tokio runtime: the courier link, SIP over TLS with the
//! device certificate, a UDP socket per call, the audio clock, and the
//! identity service for lookups and relay credentials, all driving one
//! [`Phone`]. The app talks to it through [`Device`]'s async methods and
//! its event stream.
//!
//! A device is either online (SIP registered) or asleep (only the courier
//! link, as a phone in the background): a VoIP push wakes it, it
//! registers, and the call that was waiting forks to it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use wire::handle::Handle;
use wire::keys::{DeviceId, SigningKey};

use crate::call::{CallEvent, Phone};
use crate::courier::{ClientError, ClientEvent, DeviceClient, DeviceCredentials, Transport};
use crate::ids::{IdsClient, IdsError};
use crate::media::audio::{Tone, FRAME_SAMPLES};
use crate::media::video::{self, TestPattern};
use crate::media::MediaConfig;
use crate::sip::{CallId, PushContact, UaConfig};
use crate::turn;
use wire::push::CloseReason;

mod group;
mod media_link;
mod platform;

use crate::turn_stream::TlsTo;
use media_link::MediaLink;

pub use group::KEYS_TYPE;

pub use platform::{read_platform_push, PlatformPush};

const TICK: Duration = Duration::from_millis(20);
/// Reconnection of the courier link and of SIP: the first retry, and the
/// most it backs off to.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// Rounds over the couriers at start while one asks to be tried again
/// (it is shutting down, or a cluster node is moving the device's queue).
const START_ROUNDS: u32 = 4;
/// How long one courier reconnection attempt may take.
const COURIER_CONNECT_LIMIT: Duration = Duration::from_secs(10);

/// When to try a lost connection again: doubling waits from
/// [`RETRY_FIRST`] to [`RETRY_MAX`], less up to 20% by a per-device
/// jitter so a restarted service is not hit by every device at once.
#[derive(Debug)]
struct Retry {
    at: Option<tokio::time::Instant>,
    wait: Duration,
    jitter: f64,
}

impl Retry {
    fn new(jitter: f64) -> Retry {
        Retry {
            at: None,
            wait: RETRY_FIRST,
            jitter: jitter.clamp(0.0, 1.0) * 0.2,
        }
    }

    /// Schedules the first attempt after a loss; returns its delay.
    fn start(&mut self) -> Duration {
        self.wait = RETRY_FIRST;
        self.at = Some(tokio::time::Instant::now() + RETRY_FIRST);
        RETRY_FIRST
    }

    /// The attempt failed: the next waits twice as long.
    fn failed(&mut self) {
        self.wait = (self.wait * 2).min(RETRY_MAX);
        let d = self.wait - self.wait.mul_f64(self.jitter);
        self.at = Some(tokio::time::Instant::now() + d);
    }

    fn stop(&mut self) {
        self.at = None;
    }

    /// Fires when the attempt is due; never while none is scheduled.
    async fn due(at: Option<tokio::time::Instant>) {
        match at {
            Some(t) => tokio::time::sleep_until(t).await,
            None => std::future::pending().await,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(transparent)]
    Ids(#[from] IdsError),
    #[error("courier: {0}")]
    Courier(String),
    #[error("signaling: {0}")]
    Signaling(String),
    #[error("call: {0}")]
    Call(String),
    #[error("the device task stopped")]
    Stopped,
    #[error("{0} is not in the key directory")]
    Unknown(String),
}

/// Where the services are and how this device shows up.
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    pub name: String,
    pub handle: Handle,
    pub sip_domain: String,
    /// Signaling's SIP/TLS address.
    pub sip: SocketAddr,
    /// The courier's device port, and how to reach it: TLS over TCP, or
    /// QUIC, which keeps the link across a change of network.
    pub courier: SocketAddr,
    /// Other couriers on the same database: when the link to one is lost
    /// or cannot be made, the device tries the next (with the same
    /// backoff), keeping its tokens.
    pub courier_fallbacks: Vec<SocketAddr>,
    pub courier_transport: Transport,
    /// Name in the services' certificates, and their trust anchors.
    pub server_name: String,
    pub roots: rustls::RootCertStore,
    /// The app's VoIP push topic.
    pub voip_topic: String,
    /// Local address for media sockets.
    pub media_ip: IpAddr,
    /// Offer only relayed candidates.
    pub relay_only: bool,
    /// How to reach the TURN relay: over UDP, TCP or TLS; `None` tries
    /// them in that order at start and keeps the first that answers.
    pub turn_transport: Option<turn::Transport>,
    /// What this device "speaks" in every call.
    pub microphone: AudioSource,
    /// Where the audio it plays goes as it plays (a sound card's output),
    /// besides what it keeps for [`Device::heard`].
    pub speaker: Option<LiveAudio>,
    /// How much of the audio it played it keeps per call, for
    /// [`Device::heard`] (the most recent part).
    pub keep_heard: Duration,
    /// Send and receive video (the test pattern stands in for a camera).
    pub video: bool,
    /// Check the own handle's key transparency history regularly.
    pub audit: Option<OwnAudit>,
    /// Take calls from SIP phones outside the key directory (no PASSporT,
    /// no devices for the caller's handle): they ring, unauthenticated,
    /// instead of being refused (438). Off by default.
    pub accept_unverified: bool,
}

impl DeviceConfig {
    /// Every courier address, the first one first.
    pub fn couriers(&self) -> Vec<SocketAddr> {
        std::iter::once(self.courier)
            .chain(self.courier_fallbacks.iter().copied())
            .collect()
    }
}

/// What a device checks its own handle's published history against: the
/// account key, and the devices it knows of. A change it did not expect
/// raises [`DeviceEvent::Unapproved`], once.
#[derive(Clone, Debug)]
pub struct OwnAudit {
    pub account_key: wire::keys::PublicKey,
    /// The account's devices as this device knows them; a device that
    /// appears beyond them is reported (then known). The account key and
    /// deletions are always checked.
    pub known_devices: Vec<DeviceId>,
    pub every: Duration,
}

/// The first device of a new account: proves the handle with `token` and
/// creates the account; returns the device, the account key and the
/// account's first device list.
pub async fn first_device(
    ids: &IdsClient,
    token: String,
    handle: &Handle,
    name: &str,
) -> Result<(Identity, SigningKey, wire::device_list::DeviceList), IdsError> {
    let account = SigningKey::generate();
    let key = SigningKey::generate();
    let device = DeviceId::random();
    let reg = ids
        .create_account(
            &account,
            device,
            &key,
            std::slice::from_ref(handle),
            &[token],
            name,
        )
        .await?;
    let list = crate::ids::first_list(&account, device, &key, std::slice::from_ref(handle));
    Ok((
        Identity {
            device: reg.device_id,
            key,
            certificate: reg.certificate,
        },
        account,
        list,
    ))
}

/// 48 kHz mono samples passed between the device and a sound card (or
/// anything else that produces or consumes audio in real time).
#[derive(Clone, Debug, Default)]
pub struct LiveAudio(Arc<std::sync::Mutex<std::collections::VecDeque<i16>>>);

impl LiveAudio {
    /// At most this much is kept (200 ms): a consumer that falls behind
    /// loses the oldest samples rather than adding delay.
    const MAX: usize = 48 * 200;

    pub fn push(&self, samples: &[i16]) {
        let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        q.extend(samples.iter().copied());
        let excess = q.len().saturating_sub(Self::MAX);
        q.drain(..excess);
    }

    /// Fills `out` with the oldest samples, zeros where there are none.
    pub fn pull(&self, out: &mut [i16]) {
        let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for s in out.iter_mut() {
            *s = q.pop_front().unwrap_or(0);
        }
    }
}

/// A device's microphone: where its outgoing audio comes from.
#[derive(Clone, Debug)]
pub enum AudioSource {
    Silence,
    /// A sine tone at this frequency (Hz).
    Tone(f64),
    /// 48 kHz mono samples, from the start of each call; silence after.
    Samples(Arc<[i16]>),
    /// Samples as they come (a sound card's input), shared by every call.
    Live(LiveAudio),
}

/// One call's position in its [`AudioSource`].
enum Speaking {
    Silence,
    Tone(Tone),
    Samples(Arc<[i16]>, usize),
    Live(LiveAudio),
}

impl Speaking {
    fn new(source: &AudioSource) -> Speaking {
        match source {
            AudioSource::Silence => Speaking::Silence,
            AudioSource::Tone(hz) => Speaking::Tone(Tone::new(*hz, 0.3)),
            AudioSource::Samples(s) => Speaking::Samples(s.clone(), 0),
            AudioSource::Live(l) => Speaking::Live(l.clone()),
        }
    }

    fn next_frame(&mut self) -> Vec<i16> {
        match self {
            Speaking::Silence => vec![0; FRAME_SAMPLES],
            Speaking::Tone(t) => t.next_frame(),
            Speaking::Samples(s, at) => {
                let mut f = vec![0; FRAME_SAMPLES];
                let end = (*at + FRAME_SAMPLES).min(s.len());
                if *at < end {
                    f[..end - *at].copy_from_slice(&s[*at..end]);
                }
                *at = end;
                f
            }
            Speaking::Live(l) => {
                let mut f = vec![0; FRAME_SAMPLES];
                l.pull(&mut f);
                f
            }
        }
    }
}

/// Who the device is: from activation.
#[derive(Clone, Debug)]
pub struct Identity {
    pub device: DeviceId,
    pub key: SigningKey,
    /// Certificate PEM from `ids`.
    pub certificate: String,
}

/// After a notice of a rotated account key, how soon and how many times
/// the device looks for it before the audit's own pace resumes: the
/// directory publishes every few seconds.
const ROTATION_CHECK: Duration = Duration::from_secs(2);
const ROTATION_CHECKS: u8 = 10;

#[derive(Clone, Debug, PartialEq)]
pub enum DeviceEvent {
    Call(CallEvent),
    /// SIP registration holds.
    Registered,
    /// A VoIP push arrived (the device was asleep): its call id, or for a
    /// wake-up through Apple or Google the push's opaque id.
    Woken {
        call_id: String,
    },
    /// The courier link dropped; the device reconnects with backoff (it
    /// does not when the same device connected elsewhere).
    CourierLost {
        retry_in: Option<Duration>,
    },
    /// The courier link is back after a loss.
    CourierConnected,
    /// This device was removed from its account: the courier closed its
    /// link because its certificate is revoked. It does not reconnect; the
    /// app should forget the device's credentials.
    Revoked,
    /// `ids` pushed news of this device's account: `device_added`,
    /// `device_removed` (with the device) or `account_reset`. A prompt
    /// hint, not proof: the own-history audit ([`DeviceConfig::audit`])
    /// checks what the directory actually published.
    AccountChanged {
        kind: String,
        device: Option<DeviceId>,
    },
    /// The own handle's verified history shows what this device did not
    /// expect: a device it did not know of, another account key (an
    /// account reset, or a directory that lies), or a deletion.
    Unapproved(Vec<wire::transparency::Unapproved>),
    /// The directory's roots are not one append-only chain, or not the
    /// roots this device accepted: it showed this device (or everyone
    /// else) a tree of its own. Its answers can no longer be trusted; the
    /// app tells its user and its operator.
    SplitView(String),
    /// Another device of the account removed a device and rotated the
    /// account key (the removed device holds the old one). This is the new
    /// key, sealed to this device and checked against the directory: the
    /// app stores it in place of the old one.
    AccountKeyRotated(SigningKey),
    /// Something went wrong outside a call.
    Error(String),
}

enum Command {
    /// The handle, and whether a phone outside the directory may answer.
    Dial(Handle, bool, oneshot::Sender<Result<CallId, DeviceError>>),
    Answer(CallId, oneshot::Sender<Result<(), DeviceError>>),
    Decline(CallId, oneshot::Sender<Result<(), DeviceError>>),
    Hangup(CallId, oneshot::Sender<Result<(), DeviceError>>),
    Register(oneshot::Sender<Result<(), DeviceError>>),
    Platform(
        wire::push::PlatformToken,
        oneshot::Sender<Result<wire::push::PlatformStatus, DeviceError>>,
    ),
    Background(oneshot::Sender<()>),
    Woken(PlatformPush),
    Sleep(oneshot::Sender<()>),
    Heard(CallId, oneshot::Sender<Vec<i16>>),
    Stats(CallId, oneshot::Sender<Option<crate::media::CallStats>>),
    GroupCall(Vec<Handle>, oneshot::Sender<Result<CallId, DeviceError>>),
    CallLink(CallId, oneshot::Sender<Result<String, DeviceError>>),
    Add(CallId, Handle, oneshot::Sender<Result<CallId, DeviceError>>),
    JoinLink(String, oneshot::Sender<Result<CallId, DeviceError>>),
    GroupStats(CallId, oneshot::Sender<Option<crate::group::GroupStats>>),
}

/// The app's handle on a running device.
#[derive(Debug)]
pub struct Device {
    commands: mpsc::Sender<Command>,
    events: mpsc::Receiver<DeviceEvent>,
    task: tokio::task::JoinHandle<()>,
    /// The courier token for VoIP pushes.
    pub voip_token: String,
    /// The keys a call's wake-up through Apple or Google is sealed to.
    seal_keys: wire::webpush::SubscriptionKeys,
}

impl Drop for Device {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Device {
    /// Connects the courier link (always) and, if `online`, registers
    /// over SIP. Relay credentials come from `ids`.
    pub async fn start(
        config: DeviceConfig,
        me: Identity,
        ids: IdsClient,
        online: bool,
    ) -> Result<Device, DeviceError> {
        let (chain, key) = crate::ids::tls_identity(&me.certificate, &me.key)?;
        let ids = ids.with_certificate(&me.certificate, &me.key)?;
        let creds = DeviceCredentials {
            chain,
            key,
            roots: config.roots.clone(),
            server_name: config.server_name.clone(),
        };
        let ((courier, tokens), courier_at) =
            first_answering(&config.couriers(), RETRY_FIRST, |addr| {
                connect_courier(&config, addr, &creds)
            })
            .await
            .map_err(|e| DeviceError::Courier(e.to_string()))?;
        ids.set_push_tokens(&me.key, &tokens.pairs(&config)).await?;
        let voip_token = tokens.voip.clone();
        let turn = ids.turn_credentials(&me.key).await?;
        // The relays ids names, over the first transport that answers:
        // the first carries calls, the others take over when it dies
        // mid-call.
        let relays = media_link::choose(
            &turn.uris,
            (&turn.username, &turn.password),
            config.turn_transport,
            config.media_ip,
        )
        .await?;
        let relay = relays.first.clone();
        let turn_tls = TlsTo::new(config.roots.clone(), &config.server_name)
            .map_err(|e| DeviceError::Call(format!("TURN over TLS: {e}")))?;
        let media = MediaConfig {
            turn: Some(relays.first),
            spare_turn: relays.spares,
            relay_only: config.relay_only,
            video: config.video,
            seed: u64::from_le_bytes(me.device.0[..8].try_into().unwrap_or([7; 8])),
            ..MediaConfig::default()
        };
        let mut ua = UaConfig::new(
            config.handle.as_str(),
            &config.sip_domain,
            // Our end of the TLS flow is not known before connecting; the
            // proxy uses the connection, and Contact needs an address.
            SocketAddr::new(config.media_ip, 5061),
            &format!("urn:uuid:{}", uuid_of(me.device)),
        );
        ua.transport = "TLS";
        ua.push = Some(PushContact {
            provider: "parley".into(),
            prid: voip_token.clone(),
            param: Some(config.voip_topic.clone()),
        });
        let phone = Phone::new(
            ua,
            config.handle.clone(),
            me.device,
            me.key.clone(),
            media,
            u64::from_le_bytes(me.device.0[8..].try_into().unwrap_or([9; 8])),
        );
        let (ctx, crx) = mpsc::channel(64);
        let (etx, erx) = mpsc::channel(1024);
        let (mtx, mrx) = mpsc::channel(4096);
        let jitter = |i: usize| f64::from(me.device.0[i]) / 255.0;
        let (courier_retry, sip_retry) = (Retry::new(jitter(0)), Retry::new(jitter(1)));
        let mut task = Task {
            config,
            me,
            creds: Arc::new(creds),
            ids,
            phone,
            courier: Some(courier),
            courier_retry,
            courier_at,
            tokens,
            sip: None,
            online,
            sip_retry,
            audit: None,
            sip_buf: vec![0; 16 * 1024],
            sockets: HashMap::new(),
            media_tx: mtx,
            events: etx,
            speaking: HashMap::new(),
            heard: HashMap::new(),
            registered_reported: false,
            camera: TestPattern::default(),
            rotation_checks: 0,
            platform: platform::Platform::default(),
            group: None,
            group_ended: None,
            relay,
            turn_tls,
        };
        if online {
            task.connect_sip().await?;
            task.phone.ua().register(Instant::now());
            task.flush().await;
        }
        task.audit = task
            .config
            .audit
            .clone()
            .map(|a| (a, tokio::time::Instant::now(), 0));
        let seal_keys = platform::seal_keys(&task.me.key);
        let handle = tokio::spawn(task.run(crx, mrx));
        Ok(Device {
            commands: ctx,
            events: erx,
            task: handle,
            voip_token,
            seal_keys,
        })
    }

    async fn ask<T>(
        &self,
        f: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, DeviceError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(f(tx))
            .await
            .map_err(|_| DeviceError::Stopped)?;
        rx.await.map_err(|_| DeviceError::Stopped)
    }

    /// Rings every device of every handle into a group call through the
    /// SFU, end to end encrypted; its id (the room). Answer, decline and
    /// hang up take that id as for any call.
    pub async fn group_call(&self, handles: &[Handle]) -> Result<CallId, DeviceError> {
        self.ask(|tx| Command::GroupCall(handles.to_vec(), tx))
            .await?
    }

    /// Adds `handle` to the one-to-one call `call`: it becomes a group
    /// call (its id returned) ringing `handle`; the far end's device moves
    /// to it at once, and both see `CallEvent::Upgraded`.
    pub async fn add_to_call(&self, call: &str, handle: &Handle) -> Result<CallId, DeviceError> {
        self.ask(|tx| Command::Add(call.to_string(), handle.clone(), tx))
            .await?
    }

    /// A link others can join the group call by: a member (this device)
    /// admits each who asks ([`CallEvent::JoinRequest`]).
    pub async fn call_link(&self, call: &str) -> Result<String, DeviceError> {
        self.ask(|tx| Command::CallLink(call.to_string(), tx))
            .await?
    }

    /// Asks to join a group call by its link; the call's id once a member
    /// admits this device (it is `Answered`, then media connects).
    pub async fn join_link(&self, link: &str) -> Result<CallId, DeviceError> {
        self.ask(|tx| Command::JoinLink(link.to_string(), tx))
            .await?
    }

    /// What the group call's media did: frames sent, and per member
    /// heard and seen.
    pub async fn group_stats(
        &self,
        call: &str,
    ) -> Result<Option<crate::group::GroupStats>, DeviceError> {
        self.ask(|tx| Command::GroupStats(call.to_string(), tx))
            .await
    }

    /// Looks the handle up (verified) and calls every one of its devices.
    pub async fn dial(&self, handle: &Handle) -> Result<CallId, DeviceError> {
        self.ask(|tx| Command::Dial(handle.clone(), false, tx))
            .await?
    }

    /// Calls a SIP phone registered for `handle` at signaling that is not
    /// in the key directory (a third-party phone with a digest account):
    /// no lookup, and the answer is not authenticated — see
    /// [`crate::call::Phone::dial_unverified`].
    pub async fn dial_unverified(&self, handle: &Handle) -> Result<CallId, DeviceError> {
        self.ask(|tx| Command::Dial(handle.clone(), true, tx))
            .await?
    }

    pub async fn answer(&self, call: &str) -> Result<(), DeviceError> {
        self.ask(|tx| Command::Answer(call.into(), tx)).await?
    }

    pub async fn decline(&self, call: &str) -> Result<(), DeviceError> {
        self.ask(|tx| Command::Decline(call.into(), tx)).await?
    }

    pub async fn hangup(&self, call: &str) -> Result<(), DeviceError> {
        self.ask(|tx| Command::Hangup(call.into(), tx)).await?
    }

    /// Connects to signaling and registers.
    pub async fn register(&self) -> Result<(), DeviceError> {
        self.ask(Command::Register).await?
    }

    /// Goes to the background: the SIP connection closes; the courier
    /// link stays.
    pub async fn sleep(&self) -> Result<(), DeviceError> {
        self.ask(Command::Sleep).await
    }

    /// The audio this device played for a call so far (the last
    /// [`DeviceConfig::keep_heard`] of it), 48 kHz mono.
    pub async fn heard(&self, call: &str) -> Result<Vec<i16>, DeviceError> {
        self.ask(|tx| Command::Heard(call.into(), tx)).await
    }

    pub async fn stats(&self, call: &str) -> Result<Option<crate::media::CallStats>, DeviceError> {
        self.ask(|tx| Command::Stats(call.into(), tx)).await
    }

    /// The next event within `t`.
    pub async fn next_event(&mut self, t: Duration) -> Option<DeviceEvent> {
        tokio::time::timeout(t, self.events.recv())
            .await
            .ok()
            .flatten()
    }
}

/// A UUID (RFC 4122 form) from the device id, for `+sip.instance`.
fn uuid_of(d: DeviceId) -> String {
    let h = wire::keys::hex(&d.0);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

type Sip = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

struct Task {
    config: DeviceConfig,
    me: Identity,
    creds: Arc<DeviceCredentials>,
    ids: IdsClient,
    phone: Phone,
    courier: Option<DeviceClient>,
    courier_retry: Retry,
    /// Which of [`DeviceConfig::couriers`] the link is to, or is tried
    /// next.
    courier_at: usize,
    tokens: Tokens,
    sip: Option<Sip>,
    /// The device wants to be registered (it is not asleep).
    online: bool,
    sip_retry: Retry,
    /// The own-history audit: its settings, the next run, the first epoch
    /// not yet checked.
    audit: Option<(OwnAudit, tokio::time::Instant, u64)>,
    sip_buf: Vec<u8>,
    sockets: HashMap<CallId, MediaLink>,
    media_tx: mpsc::Sender<(CallId, SocketAddr, Vec<u8>)>,
    events: mpsc::Sender<DeviceEvent>,
    speaking: HashMap<CallId, Speaking>,
    heard: HashMap<CallId, Vec<i16>>,
    registered_reported: bool,
    camera: TestPattern,
    /// Quick checks left for an account key that a notice says was
    /// rotated but the directory does not show yet.
    rotation_checks: u8,
    platform: platform::Platform,
    /// The group call this device is in.
    group: Option<group::GroupCall>,
    /// The last group call's room and what its media did.
    group_ended: Option<(CallId, crate::group::GroupStats)>,
    /// The relay calls go through (and group calls reach the SFU
    /// through), and what a TLS connection to it trusts.
    relay: turn::Config,
    turn_tls: TlsTo,
}

/// The 20 ms audio clock. It keeps real time: a microphone goes on
/// capturing and a speaker on playing while the device's task is busy (a
/// video frame being encoded, say), so ticks it missed are made up at once.
/// Were they skipped, the RTP clock (one frame per tick) would fall behind
/// the wall clock, and every listener's jitter buffer would run dry and
/// play this sender's frames as late.
fn audio_clock() -> tokio::time::Interval {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    tick
}

impl Task {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut media: mpsc::Receiver<(CallId, SocketAddr, Vec<u8>)>,
    ) {
        let mut tick = audio_clock();
        let mut frame_tick =
            tokio::time::interval(Duration::from_millis(1000 / u64::from(video::FPS)));
        frame_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let wake = [self.phone.poll_timeout(), self.group_timeout()]
                .into_iter()
                .flatten()
                .min()
                .map(tokio::time::Instant::from_std)
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                cmd = commands.recv() => {
                    let Some(cmd) = cmd else { return };
                    self.command(cmd).await;
                }
                read = read_sip(&mut self.sip, &mut self.sip_buf) => {
                    match read {
                        Ok(n) if n > 0 => {
                            let bytes = self.sip_buf[..n].to_vec();
                            if let Err(e) = self.phone.handle_sip_input(Instant::now(), &bytes) {
                                self.event(DeviceEvent::Error(e.to_string())).await;
                                self.drop_sip();
                            }
                        }
                        _ => {
                            self.drop_sip();
                        }
                    }
                }
                ev = next_push(&mut self.courier) => {
                    match ev {
                        Some(ClientEvent::Notification(n)) => {
                            if let Some(c) = self.courier.as_mut() {
                                let _ = c.ack(&[n.id]).await;
                            }
                            self.on_push(&n.payload).await;
                        }
                        Some(ClientEvent::Closed(Some((CloseReason::Revoked, _)))) => {
                            if self.courier.take().is_some() {
                                self.event(DeviceEvent::Revoked).await;
                            }
                        }
                        Some(ClientEvent::Closed(reason)) => {
                            let replaced = matches!(reason, Some((CloseReason::Replaced, _)));
                            self.courier_lost(!replaced).await;
                        }
                        Some(ClientEvent::Platform { request, status, text }) => {
                            self.platform_answered(request, status, text).await;
                        }
                        Some(_) => {}
                        None => self.courier_lost(true).await,
                    }
                }
                _ = Retry::due(self.courier_retry.at) => self.courier_reconnect().await,
                _ = Retry::due(self.sip_retry.at) => self.sip_reconnect().await,
                _ = Retry::due(self.audit.as_ref().map(|a| a.1)) => self.audit_own().await,
                Some((call, from, data)) = media.recv() => {
                    if self.group.as_ref().is_some_and(|g| g.media_key() == call) {
                        self.group_datagram(from, &data);
                    } else if let Err(e) = self.phone.handle_media_input(Instant::now(), &call, from, &data) {
                        self.event(DeviceEvent::Error(e.to_string())).await;
                    }
                }
                _ = tokio::time::sleep_until(wake) => {
                    if let Err(e) = self.phone.handle_timeout(Instant::now()) {
                        self.event(DeviceEvent::Error(e.to_string())).await;
                    }
                }
                _ = tick.tick() => {
                    self.audio();
                    self.group_audio();
                }
                _ = frame_tick.tick(), if self.config.video => {
                    self.video();
                    self.group_video();
                }
            }
            self.flush().await;
        }
    }

    /// The one-to-one calls with a socket (the group call's is the SFU's).
    fn calls(&self) -> Vec<CallId> {
        let group = self.group.as_ref().map(group::GroupCall::media_key);
        self.sockets
            .keys()
            .filter(|k| Some(*k) != group.as_ref())
            .cloned()
            .collect()
    }

    /// One camera frame for every call with a socket.
    fn video(&mut self) {
        let now = Instant::now();
        let calls = self.calls();
        for call in calls {
            let frame = self.camera.next_frame();
            let _ = self.phone.send_video(now, &call, &frame);
        }
    }

    /// One audio clock tick for every call with a socket.
    fn audio(&mut self) {
        let now = Instant::now();
        let calls = self.calls();
        for call in calls {
            let frame = self
                .speaking
                .entry(call.clone())
                .or_insert_with(|| Speaking::new(&self.config.microphone))
                .next_frame();
            let _ = self.phone.send_audio(now, &call, &frame);
            if let Ok(Some(p)) = self.phone.play_audio(now, &call) {
                if let Some(speaker) = &self.config.speaker {
                    speaker.push(&p.pcm);
                }
                let h = self.heard.entry(call).or_default();
                h.extend_from_slice(&p.pcm);
                let max = (self.config.keep_heard.as_millis() * 48) as usize;
                if h.len() > max {
                    h.drain(..h.len() - max);
                }
            }
        }
    }

    async fn command(&mut self, cmd: Command) {
        let now = Instant::now();
        match cmd {
            Command::Dial(handle, unverified, reply) => {
                let r = self.dial(now, &handle, unverified).await;
                let _ = reply.send(r);
            }
            Command::Answer(call, reply) if self.is_group(&call) && self.join_pending() => {
                let r = self.admit(now).await;
                let _ = reply.send(r);
            }
            Command::Answer(call, reply) if self.is_group(&call) => {
                let r = self.answer_group(now).await;
                let _ = reply.send(r);
            }
            Command::Answer(call, reply) => {
                let r = self
                    .phone
                    .answer(now, &call)
                    .map_err(|e| DeviceError::Call(e.to_string()));
                let _ = reply.send(r);
            }
            Command::Decline(call, reply) if self.is_group(&call) && self.join_pending() => {
                self.refuse_join();
                let _ = reply.send(Ok(()));
            }
            Command::Decline(call, reply) if self.is_group(&call) => {
                self.hangup_group(crate::call::EndReason::Failed(603, "Declined".into()))
                    .await;
                let _ = reply.send(Ok(()));
            }
            Command::Decline(call, reply) => {
                let r = self
                    .phone
                    .decline(&call)
                    .map_err(|e| DeviceError::Call(e.to_string()));
                let _ = reply.send(r);
            }
            Command::Hangup(call, reply) if self.is_group(&call) => {
                self.hangup_group(crate::call::EndReason::Local).await;
                let _ = reply.send(Ok(()));
            }
            Command::Hangup(call, reply) => {
                let r = self
                    .phone
                    .hangup(now, &call)
                    .map_err(|e| DeviceError::Call(e.to_string()));
                let _ = reply.send(r);
            }
            Command::GroupCall(handles, reply) => {
                let r = self.group_call(now, &handles, None).await;
                let _ = reply.send(r);
            }
            Command::Add(call, handle, reply) => {
                let r = self.add_to_call(now, &call, &handle).await;
                let _ = reply.send(r);
            }
            Command::CallLink(call, reply) => {
                let _ = reply.send(self.call_link(&call));
            }
            Command::JoinLink(link, reply) => {
                let r = self.join_link(now, &link);
                let _ = reply.send(r);
            }
            Command::GroupStats(call, reply) => {
                let _ = reply.send(self.group_stats(&call));
            }
            Command::Register(reply) => {
                if self.platform.suspended {
                    // Back in the foreground.
                    self.platform.suspended = false;
                    if self.courier.is_none() {
                        self.courier_reconnect().await;
                    }
                }
                self.online = true;
                let r = self.connect_sip().await;
                if r.is_ok() {
                    self.phone.ua().register(now);
                }
                let _ = reply.send(r);
            }
            Command::Sleep(reply) => {
                self.go_to_sleep().await;
                let _ = reply.send(());
            }
            Command::Platform(token, reply) => self.set_platform(token, reply).await,
            Command::Background(reply) => {
                self.go_background().await;
                let _ = reply.send(());
            }
            Command::Woken(push) => self.woken(push).await,
            Command::Heard(call, reply) => {
                let _ = reply.send(self.heard.get(&call).cloned().unwrap_or_default());
            }
            Command::Stats(call, reply) => {
                let _ = reply.send(self.phone.stats(&call, now));
            }
        }
    }

    async fn dial(
        &mut self,
        now: Instant,
        handle: &Handle,
        unverified: bool,
    ) -> Result<CallId, DeviceError> {
        let keys = if unverified {
            Vec::new()
        } else {
            let found = self
                .ids
                .lookup(&self.me.key, std::slice::from_ref(handle))
                .await?;
            found
                .into_iter()
                .find(|f| f.handle == *handle)
                .map(|f| f.devices)
                .filter(|d| !d.is_empty())
                .ok_or_else(|| DeviceError::Unknown(handle.redacted()))?
        };
        let (link, incoming) = self.open_media().await?;
        let local = link.local_addr()?;
        let call = if unverified {
            self.phone.dial_unverified(now, handle, local)
        } else {
            self.phone.dial(now, handle, keys, local)
        }
        .map_err(|e| DeviceError::Call(e.to_string()))?;
        self.add_link(&call, link, incoming);
        Ok(call)
    }

    /// A media link: a UDP socket and, when the relay is reached over
    /// TCP or TLS, a stream to the relay.
    async fn open_media(
        &mut self,
    ) -> Result<(MediaLink, Option<media_link::Incoming>), DeviceError> {
        MediaLink::open(self.config.media_ip, &self.relay, &self.turn_tls).await
    }

    /// `call`'s media goes out on `link`, and what comes in on it goes
    /// to the task.
    fn add_link(&mut self, call: &str, link: MediaLink, incoming: Option<media_link::Incoming>) {
        link.deliver(call, incoming, self.media_tx.clone());
        self.sockets.insert(call.to_string(), link);
    }

    async fn connect_sip(&mut self) -> Result<(), DeviceError> {
        if self.sip.is_some() {
            return Ok(());
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| DeviceError::Signaling(e.to_string()))?
            .with_root_certificates(self.creds.roots.clone())
            .with_client_auth_cert(self.creds.chain.clone(), self.creds.key.clone_key())
            .map_err(|e| DeviceError::Signaling(e.to_string()))?;
        let tcp = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect(self.config.sip),
        )
        .await
        .map_err(|_| DeviceError::Signaling("connect timed out".into()))?
        .map_err(|e| DeviceError::Signaling(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let name = rustls::pki_types::ServerName::try_from(self.config.server_name.clone())
            .map_err(|e| DeviceError::Signaling(e.to_string()))?;
        let stream = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp),
        )
        .await
        .map_err(|_| DeviceError::Signaling("TLS handshake timed out".into()))?
        .map_err(|e| DeviceError::Signaling(e.to_string()))?;
        self.sip = Some(stream);
        Ok(())
    }

    /// The SIP flow failed. An online device connects and registers again
    /// (RFC 5626 flow recovery), with backoff.
    fn drop_sip(&mut self) {
        self.sip = None;
        self.registered_reported = false;
        self.phone.ua().handle_disconnected();
        if self.online && self.sip_retry.at.is_none() {
            self.sip_retry.start();
        }
    }

    /// Checks the own handle's history since the last check; whatever
    /// this device did not expect is reported once.
    async fn audit_own(&mut self) {
        let Some((mut audit, _, since)) = self.audit.take() else {
            return;
        };
        // A key another device rotated to comes first: the history is
        // then checked against it.
        let rotated = self
            .ids
            .rotated_account_key(
                &self.me.key,
                self.me.device,
                &self.config.handle,
                &audit.account_key,
            )
            .await;
        let mut soon = false;
        match rotated {
            Ok(Some(key)) => {
                audit.account_key = key.public();
                self.rotation_checks = 0;
                self.event(DeviceEvent::AccountKeyRotated(key)).await;
            }
            Ok(None) if self.rotation_checks > 0 => {
                self.rotation_checks -= 1;
                soon = true;
            }
            Ok(None) => {}
            Err(e) => {
                self.event(DeviceEvent::Error(format!("account key rotation: {e}")))
                    .await
            }
        }
        let result = self
            .ids
            .audit_own(
                &self.me.key,
                &self.config.handle,
                &audit.account_key,
                &audit.known_devices,
                since,
            )
            .await;
        let mut since = since;
        match result {
            Ok(found) if !found.is_empty() => {
                use wire::transparency::Unapproved as U;
                let epoch = |u: &U| match u {
                    U::AccountKey { epoch } | U::Tombstone { epoch } | U::Device { epoch, .. } => {
                        *epoch
                    }
                };
                since = found.iter().map(epoch).max().unwrap_or(since) + 1;
                // One report per device, however many epochs list it.
                let mut report = Vec::new();
                for u in found {
                    if let U::Device { device, .. } = &u {
                        if audit.known_devices.contains(device) {
                            continue;
                        }
                        audit.known_devices.push(*device);
                    }
                    report.push(u);
                }
                self.event(DeviceEvent::Unapproved(report)).await;
            }
            Ok(_) => {}
            // Not in a published epoch yet (a handle just activated):
            // nothing to check.
            Err(IdsError::Refused { status: 404, .. }) => {}
            Err(e) => {
                self.event(DeviceEvent::Error(format!("own history audit: {e}")))
                    .await;
            }
        }
        // Every root this device accepted, its own history's included,
        // must extend the ones before.
        match self.ids.audit_roots().await {
            // Another audit is being built: the next round catches up.
            Ok(_) | Err(IdsError::Refused { status: 429, .. }) => {}
            Err(IdsError::Transparency(e)) => self.event(DeviceEvent::SplitView(e)).await,
            Err(e) => {
                self.event(DeviceEvent::Error(format!("directory audit: {e}")))
                    .await
            }
        }
        let next = tokio::time::Instant::now()
            + match soon {
                true => ROTATION_CHECK.min(audit.every),
                false => audit.every,
            };
        self.audit = Some((audit, next, since));
    }

    /// One SIP reconnection attempt.
    async fn sip_reconnect(&mut self) {
        self.sip_retry.stop();
        if !self.online || self.sip.is_some() {
            return;
        }
        match self.connect_sip().await {
            Ok(()) => self.phone.ua().register(Instant::now()),
            Err(_) => self.sip_retry.failed(),
        }
    }

    /// The courier link is gone: retry later unless `retry` is false (the
    /// same device connected elsewhere, which must not be fought).
    async fn courier_lost(&mut self, retry: bool) {
        if self.courier.take().is_none() {
            return;
        }
        let retry_in = (retry && !self.platform.suspended).then(|| self.courier_retry.start());
        self.event(DeviceEvent::CourierLost { retry_in }).await;
    }

    /// One courier reconnection attempt.
    async fn courier_reconnect(&mut self) {
        self.courier_retry.stop();
        let couriers = self.config.couriers();
        let addr = couriers[self.courier_at % couriers.len()];
        let attempt = tokio::time::timeout(
            COURIER_CONNECT_LIMIT,
            connect_courier(&self.config, addr, &self.creds),
        )
        .await;
        match attempt {
            Ok(Ok((client, tokens))) => {
                self.courier = Some(client);
                if tokens != self.tokens {
                    // Tokens are stable per device and topic; should the
                    // courier have issued new ones, ids must know them.
                    if self
                        .ids
                        .set_push_tokens(&self.me.key, &tokens.pairs(&self.config))
                        .await
                        .is_ok()
                    {
                        self.tokens = tokens;
                    }
                }
                self.resend_platform().await;
                self.event(DeviceEvent::CourierConnected).await;
            }
            _ => {
                // The next courier, if there is another.
                self.courier_at = (self.courier_at + 1) % couriers.len();
                self.courier_retry.failed()
            }
        }
    }

    /// Asleep: the SIP connection closes; the courier link stays.
    async fn go_to_sleep(&mut self) {
        self.online = false;
        self.sip_retry.stop();
        if let Some(mut s) = self.sip.take() {
            let _ = s.shutdown().await;
        }
        self.phone.ua().handle_disconnected();
    }

    /// A call waits for this device: it registers, and the call follows.
    async fn come_online(&mut self) {
        self.online = true;
        if self.connect_sip().await.is_ok() {
            self.phone.ua().register(Instant::now());
        }
    }

    /// A push: a call waits for this device, so come online; or the
    /// account changed.
    async fn on_push(&mut self, payload: &[u8]) {
        let v: serde_json::Value = serde_json::from_slice(payload).unwrap_or_default();
        if v["parley"]["type"] == "account" {
            let kind = v["parley"]["kind"].as_str().unwrap_or("").to_string();
            let device = v["parley"]["device"]
                .as_str()
                .and_then(|d| d.parse::<DeviceId>().ok());
            if kind == "account_key_rotated" {
                // Check soon, and again until the directory shows it.
                self.rotation_checks = ROTATION_CHECKS;
                if let Some(a) = self.audit.as_mut() {
                    a.1 = tokio::time::Instant::now() + ROTATION_CHECK;
                }
            }
            self.event(DeviceEvent::AccountChanged { kind, device })
                .await;
            return;
        }
        if v["parley"]["type"] != "call" {
            return;
        }
        let call_id = v["parley"]["call_id"].as_str().unwrap_or("").to_string();
        self.event(DeviceEvent::Woken { call_id }).await;
        self.come_online().await;
    }

    /// Whether `call` names the group call.
    fn is_group(&self, call: &str) -> bool {
        self.group.as_ref().is_some_and(|g| g.room == call)
    }

    async fn event(&mut self, e: DeviceEvent) {
        let _ = self.events.send(e).await;
    }

    /// Sends what the phone queued and handles its events.
    async fn flush(&mut self) {
        for _ in 0..64 {
            let mut busy = false;
            while let Some(bytes) = self.phone.poll_sip_transmit() {
                busy = true;
                if let Some(s) = self.sip.as_mut() {
                    if s.write_all(&bytes).await.is_err() {
                        self.drop_sip();
                    }
                }
            }
            while let Some((call, d)) = self.phone.poll_media_transmit() {
                busy = true;
                if let Some(s) = self.sockets.get(&call) {
                    let _ = s.send_to(&d.data, d.to).await;
                }
            }
            while let Some(e) = self.phone.poll_event() {
                busy = true;
                self.on_call_event(e).await;
            }
            while let Some(e) = self.phone.poll_group_event() {
                busy = true;
                self.on_group_signal(e).await;
            }
            busy |= self.group_flush().await;
            if self.phone.ua().is_registered() && !self.registered_reported {
                self.registered_reported = true;
                self.event(DeviceEvent::Registered).await;
            }
            if !busy {
                return;
            }
        }
    }

    async fn on_call_event(&mut self, e: CallEvent) {
        match &e {
            CallEvent::Incoming { call, from, device } => {
                // Who calls? Only a verified lookup gives their keys.
                let now = Instant::now();
                let keys = match self
                    .ids
                    .lookup(&self.me.key, std::slice::from_ref(from))
                    .await
                {
                    Ok(f) => f
                        .into_iter()
                        .find(|x| x.handle == *from)
                        .map(|x| x.devices)
                        .unwrap_or_default(),
                    Err(err) => {
                        self.event(DeviceEvent::Error(format!("lookup of the caller: {err}")))
                            .await;
                        Vec::new()
                    }
                };
                // A phone outside the directory: no devices, no PASSporT.
                let sip_phone = keys.is_empty() && device.is_none();
                match self.open_media().await {
                    Ok((link, incoming)) => {
                        let local = link.local_addr().ok();
                        if let Some(local) = local {
                            self.add_link(call, link, incoming);
                            if sip_phone && self.config.accept_unverified {
                                let _ = self.phone.ring_unverified(now, call, local);
                            } else {
                                // A failed check declines with 438 and ends
                                // the call with a security reason (an event).
                                let _ = self.phone.ring(now, call, keys, local);
                            }
                        }
                    }
                    Err(err) => self.event(DeviceEvent::Error(err.to_string())).await,
                }
            }
            CallEvent::Ended { call, .. } => {
                self.sockets.remove(call);
                self.speaking.remove(call);
            }
            _ => {}
        }
        self.event(DeviceEvent::Call(e)).await;
    }
}

/// Connects the courier link for the VoIP topic; returns it and the
/// topic's token (hex).
/// The device's courier tokens (hex): VoIP pushes for calls, and
/// background pushes from ids about the account.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Tokens {
    voip: String,
    account: String,
}

impl Tokens {
    /// (topic, token) pairs, as ids keeps them.
    fn pairs(&self, config: &DeviceConfig) -> Vec<(String, String)> {
        vec![
            (config.voip_topic.clone(), self.voip.clone()),
            (wire::push::ACCOUNT_TOPIC.into(), self.account.clone()),
        ]
    }
}

async fn connect_courier(
    config: &DeviceConfig,
    addr: SocketAddr,
    creds: &DeviceCredentials,
) -> Result<(DeviceClient, Tokens), ClientError> {
    let (courier, tokens) = DeviceClient::connect(
        addr,
        config.courier_transport,
        creds,
        &[config.voip_topic.as_str(), wire::push::ACCOUNT_TOPIC],
        0,
    )
    .await?;
    let token = |topic: &str| {
        tokens
            .iter()
            .find(|(t, _)| t == topic)
            .map(|(_, t)| t.to_hex())
            .ok_or_else(|| ClientError::Protocol(format!("no token for the topic {topic}")))
    };
    Ok((
        courier,
        Tokens {
            voip: token(&config.voip_topic)?,
            account: token(wire::push::ACCOUNT_TOPIC)?,
        },
    ))
}

/// The first courier in `addrs` that answers, and its index. While one
/// asked to be tried again, the list is gone round again after a pause
/// (doubling from `pause`), [`START_ROUNDS`] times at most.
async fn first_answering<T, F, Fut>(
    addrs: &[SocketAddr],
    mut pause: Duration,
    mut connect: F,
) -> Result<(T, usize), ClientError>
where
    F: FnMut(SocketAddr) -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let mut last = ClientError::Protocol("no courier address".into());
    for round in 0..START_ROUNDS {
        if round > 0 {
            tokio::time::sleep(pause).await;
            pause *= 2;
        }
        let mut again = false;
        for (i, addr) in addrs.iter().enumerate() {
            match connect(*addr).await {
                Ok(t) => return Ok((t, i)),
                Err(e) => {
                    again |= e.asks_to_retry();
                    last = e;
                }
            }
        }
        if !again {
            break;
        }
    }
    Err(last)
}

/// The courier's next event, or never while there is no link.
async fn next_push(courier: &mut Option<DeviceClient>) -> Option<ClientEvent> {
    match courier {
        Some(c) => c.next().await,
        None => std::future::pending().await,
    }
}

async fn read_sip(sip: &mut Option<Sip>, buf: &mut [u8]) -> std::io::Result<usize> {
    match sip {
        Some(s) => s.read(buf).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn the_audio_clock_makes_up_the_ticks_a_busy_task_missed() {
        let mut clock = super::audio_clock();
        clock.tick().await;
        // The task is busy for over 100 ms: five frames' worth of time.
        std::thread::sleep(std::time::Duration::from_millis(110));
        // Ticks that come at once (well under the 20 ms between ticks).
        let mut at_once = 0;
        while at_once < 10
            && tokio::time::timeout(std::time::Duration::from_millis(15), clock.tick())
                .await
                .is_ok()
        {
            at_once += 1;
        }
        assert!(at_once >= 5, "{at_once} ticks made up");
    }

    use super::*;
    use std::cell::RefCell;

    const PAUSE: Duration = Duration::from_millis(5);

    fn addrs() -> Vec<SocketAddr> {
        vec![
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        ]
    }

    /// Both couriers ask to be tried again twice (a cluster moving the
    /// device's queue): the third round reaches the first, after two
    /// pauses, the second twice the first.
    #[tokio::test]
    async fn start_goes_round_again_while_a_courier_says_retry() {
        let tried = RefCell::new(Vec::new());
        let started = std::time::Instant::now();
        let r = first_answering(&addrs(), PAUSE, |a| {
            tried.borrow_mut().push(a.port());
            let n = tried.borrow().len();
            async move {
                if n <= 4 {
                    Err(ClientError::Closed(
                        CloseReason::Shutdown,
                        "storage unavailable; retry".into(),
                    ))
                } else {
                    Ok(a.port())
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(r, (1, 0));
        assert_eq!(*tried.borrow(), [1, 2, 1, 2, 1]);
        assert!(started.elapsed() >= PAUSE * 3);
    }

    /// A refusal that is not "retry" (a revoked device, a dead address)
    /// ends the start after one round, with the last error.
    #[tokio::test]
    async fn start_gives_up_after_one_round_without_a_retry() {
        let tried = RefCell::new(0);
        let r: Result<((), usize), _> = first_answering(&addrs(), PAUSE, |_| {
            *tried.borrow_mut() += 1;
            async { Err(ClientError::Closed(CloseReason::Revoked, "revoked".into())) }
        })
        .await;
        assert!(matches!(
            r,
            Err(ClientError::Closed(CloseReason::Revoked, _))
        ));
        assert_eq!(*tried.borrow(), 2);
    }

    /// A courier that keeps saying retry is given up on after
    /// `START_ROUNDS` rounds.
    #[tokio::test]
    async fn start_is_bounded_when_every_courier_keeps_saying_retry() {
        let tried = RefCell::new(0);
        let r: Result<((), usize), _> = first_answering(&addrs()[..1], PAUSE, |_| {
            *tried.borrow_mut() += 1;
            async { Err(ClientError::Closed(CloseReason::Shutdown, "retry".into())) }
        })
        .await;
        assert!(r.unwrap_err().asks_to_retry());
        assert_eq!(*tried.borrow(), START_ROUNDS);
    }
}
