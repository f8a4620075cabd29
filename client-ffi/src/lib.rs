//! The client SDK for apps in Swift, Kotlin and Python, through UniFFI.
//!
//! A blocking surface over the SDK's async one: [`Parley`] activates a
//! device against the services, [`PhoneDevice`] is a running device
//! (courier link, SIP, calls, media) with an event queue the app polls.
//! Every call runs on a tokio runtime the library owns, so the app needs
//! none. Generate the bindings with the `uniffi-bindgen` binary of this
//! crate: `uniffi-bindgen generate --library libparley_ffi.so --language
//! python|swift|kotlin --out-dir DIR`.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use client_sdk::call::CallEvent;
use client_sdk::device::{AudioSource, Device, DeviceConfig, DeviceEvent, Identity};
use client_sdk::ids::IdsClient;
use wire::handle::Handle;
use wire::keys::{DeviceId, SigningKey};

uniffi::setup_scaffolding!();

/// The app's VoIP push topic for devices started here.
const VOIP_TOPIC: &str = "org.parley.app.voip";

#[derive(Debug, thiserror::Error, uniffi::Error)]
#[uniffi(flat_error)]
pub enum ParleyError {
    /// Bad input: a handle, an address, a key.
    #[error("invalid: {0}")]
    Invalid(String),
    /// A service refused or could not be reached, or a proof failed.
    #[error("{0}")]
    Failed(String),
}

fn invalid(e: impl std::fmt::Display) -> ParleyError {
    ParleyError::Invalid(e.to_string())
}

fn failed(e: impl std::fmt::Display) -> ParleyError {
    ParleyError::Failed(e.to_string())
}

/// Where the services are (`parley up` prints these) and whom to trust.
#[derive(Debug, Clone, uniffi::Record)]
pub struct Services {
    /// The identity service, `host:port`.
    pub ids: String,
    /// The push courier's device port; several, comma-separated, for
    /// couriers on one database (tried in turn when the link is lost). A
    /// name (`courier.example.com:5223`) gives every address it resolves
    /// to.
    pub courier: String,
    /// Signaling's SIP over TLS port.
    pub sip: String,
    /// PEM of the CA the services' certificates chain to.
    pub ca_pem: String,
    /// Name in the services' certificates.
    pub server_name: String,
    /// SIP domain of the handles.
    pub domain: String,
}

/// What activation gives a device. The app keeps it in its secure
/// storage: it holds the device's and the account's private keys.
#[derive(Clone, uniffi::Record)]
pub struct DeviceIdentity {
    pub handle: String,
    pub device_id: String,
    /// PKCS#8.
    pub identity_key: Vec<u8>,
    /// PKCS#8; approves the account's next devices.
    pub account_key: Vec<u8>,
    pub certificate: String,
}

impl std::fmt::Debug for DeviceIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceIdentity")
            .field("handle", &self.handle)
            .field("device_id", &self.device_id)
            .finish_non_exhaustive()
    }
}

/// What happened on a device, in the order it happened.
#[derive(Debug, Clone, PartialEq, uniffi::Enum)]
pub enum PhoneEvent {
    Registered,
    /// A VoIP push woke the device.
    Woken,
    Incoming {
        call: String,
        from: String,
    },
    /// This device rings (the caller is verified): answer or hang up.
    Ringing {
        call: String,
    },
    /// `from` asks to join our group call by its link (the directory
    /// lists their device): answer `call` to admit them, hang up to refuse.
    JoinRequest {
        call: String,
        from: String,
    },
    /// A group call rings: `from` rang us with `members` (handles), every
    /// device of whom the directory listed. Answer or hang up with `call`.
    IncomingGroup {
        call: String,
        from: String,
        members: Vec<String>,
    },
    /// The far end's devices ring.
    Alerting {
        call: String,
    },
    /// Answered by `device` (hex id), whose key the directory proved;
    /// empty for an unverified call to a phone outside the directory.
    Answered {
        call: String,
        device: String,
    },
    MediaConnected {
        call: String,
    },
    Ended {
        call: String,
        reason: String,
    },
    /// Another device removed a device and rotated the account key: the
    /// new key (PKCS#8), checked against the directory, which the app
    /// stores in place of the old one (as the credentials'
    /// `account_key`).
    AccountKeyRotated {
        account_key: Vec<u8>,
    },
    /// This device was removed from its account (its certificate is
    /// revoked): it no longer connects; forget its credentials.
    Revoked,
    /// Anything else, described.
    Other {
        description: String,
    },
}

/// The device's token at Apple's or Google's push service, as the app
/// got it from the platform (PushKit, `UNUserNotificationCenter`, or
/// Firebase Messaging).
#[derive(Debug, Clone, uniffi::Record)]
pub struct PlatformToken {
    /// `apns` or `fcm`.
    pub platform: String,
    /// The token: hex for APNs; empty to withdraw.
    pub token: String,
    /// APNs: the app's bundle id; FCM: the Firebase project id.
    pub topic: String,
    /// It wakes the app for calls (a PushKit token; an FCM token).
    pub calls: bool,
    /// It tells the app of other pushes (an alert token; an FCM token).
    pub others: bool,
    /// APNs: a development build's token (the sandbox environment).
    pub sandbox: bool,
}

/// A push from Apple or Google that [`PhoneDevice::handle_push`] read.
#[derive(Debug, Clone, PartialEq, uniffi::Enum)]
pub enum PlatformPush {
    /// A call waits: report it to CallKit now, with `id` as its UUID and
    /// `caller` (if the wake-up carried it, sealed to this device) as who
    /// calls; it rings as [`PhoneEvent::Incoming`] once the device is back.
    Call { id: String, caller: Option<String> },
    /// Pushes wait; the device fetches them.
    Wake { id: String },
}

fn phone_event(e: DeviceEvent) -> Option<PhoneEvent> {
    Some(match e {
        DeviceEvent::Registered => PhoneEvent::Registered,
        DeviceEvent::Woken { .. } => PhoneEvent::Woken,
        DeviceEvent::Call(c) => match c {
            CallEvent::Incoming { call, from, .. } => PhoneEvent::Incoming {
                call,
                from: from.as_str().to_string(),
            },
            CallEvent::Ringing { call } => PhoneEvent::Ringing { call },
            CallEvent::IncomingGroup {
                call,
                from,
                members,
            } => PhoneEvent::IncomingGroup {
                call,
                from: from.as_str().to_string(),
                members: members.iter().map(|h| h.as_str().to_string()).collect(),
            },
            CallEvent::Alerting { call } => PhoneEvent::Alerting { call },
            CallEvent::Answered { call, device } => PhoneEvent::Answered {
                call,
                device: device.map(|d| d.to_string()).unwrap_or_default(),
            },
            CallEvent::MediaConnected { call } => PhoneEvent::MediaConnected { call },
            CallEvent::Ended { call, reason } => PhoneEvent::Ended {
                call,
                reason: format!("{reason:?}"),
            },
            // Statistics arrive every second; the app asks for them.
            CallEvent::Stats { .. } => return None,
            moved @ CallEvent::RelayMoved { .. } => PhoneEvent::Other {
                description: format!("{moved:?}"),
            },
            CallEvent::Upgraded { from, to } => PhoneEvent::Other {
                description: format!("call {from} became the group call {to}"),
            },
            CallEvent::JoinRequest { call, from } => PhoneEvent::JoinRequest {
                call,
                from: from.as_str().to_string(),
            },
            CallEvent::MemberJoined { handle, .. } => PhoneEvent::Other {
                description: format!("{} joined the group call", handle.as_str()),
            },
            CallEvent::MemberLeft { handle, .. } => PhoneEvent::Other {
                description: format!("{} left the group call", handle.as_str()),
            },
        },
        DeviceEvent::Revoked => PhoneEvent::Revoked,
        DeviceEvent::AccountKeyRotated(key) => PhoneEvent::AccountKeyRotated {
            account_key: key.pkcs8().to_vec(),
        },
        other => PhoneEvent::Other {
            description: format!("{other:?}"),
        },
    })
}

/// Normalises a phone number (E.164) or email address as the identity
/// service does.
#[uniffi::export]
pub fn normalize_handle(input: String) -> Result<String, ParleyError> {
    Handle::parse(&input)
        .map(|h| h.as_str().to_string())
        .map_err(invalid)
}

/// The frequency (Hz, 200–2000 in 20 Hz steps) that dominates 48 kHz
/// samples, and nothing else: a check that a test tone arrived.
#[uniffi::export]
pub fn dominant_frequency(samples: Vec<i16>) -> f64 {
    client_sdk::media::audio::dominant_frequency(&samples, (200..2000).step_by(20).map(f64::from)).0
}

/// The share (0..1) of `samples`' energy at `freq` (48 kHz), as the mean
/// over 100 ms windows: whether a tone is in a mix of several speakers.
#[uniffi::export]
pub fn tone_share(samples: Vec<i16>, freq: f64) -> f64 {
    let windows: Vec<&[i16]> = samples.chunks_exact(4_800).collect();
    let sum: f64 = windows
        .iter()
        .map(|w| client_sdk::media::audio::tone_share(w, freq))
        .sum();
    sum / windows.len().max(1) as f64
}

fn addr(what: &str, s: &str) -> Result<SocketAddr, ParleyError> {
    s.parse()
        .map_err(|e| ParleyError::Invalid(format!("{what} {s:?}: {e}")))
}

/// The services of one deployment, for activating and starting devices.
#[derive(uniffi::Object)]
pub struct Parley {
    rt: Arc<tokio::runtime::Runtime>,
    services: Services,
    roots: rustls::RootCertStore,
    ids: Mutex<IdsClient>,
}

impl std::fmt::Debug for Parley {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parley")
            .field("services", &self.services)
            .finish_non_exhaustive()
    }
}

impl Parley {
    fn ids(&self) -> IdsClient {
        self.ids.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[uniffi::export]
impl Parley {
    #[uniffi::constructor]
    pub fn new(services: Services) -> Result<Arc<Parley>, ParleyError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in client_sdk::ids::pem_certs(&services.ca_pem).map_err(invalid)? {
            roots.add(c).map_err(invalid)?;
        }
        let ids = IdsClient::new(
            addr("ids", &services.ids)?,
            &services.server_name,
            roots.clone(),
        )
        .map_err(invalid)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(failed)?;
        Ok(Arc::new(Parley {
            rt: Arc::new(rt),
            services,
            roots,
            ids: Mutex::new(ids),
        }))
    }

    /// Sends a code to `handle`; returns the verification's id.
    pub fn start_verification(&self, handle: String) -> Result<String, ParleyError> {
        let h = Handle::parse(&handle).map_err(invalid)?;
        let ids = self.ids();
        self.rt.block_on(ids.start_verification(&h)).map_err(failed)
    }

    /// Checks the code; returns the token that proves the handle.
    pub fn check_verification(
        &self,
        verification: String,
        code: String,
    ) -> Result<String, ParleyError> {
        let ids = self.ids();
        self.rt
            .block_on(ids.check_verification(&verification, code.trim()))
            .map_err(failed)
    }

    /// Creates the account of a proven handle with this as its first
    /// device.
    pub fn create_account(
        &self,
        handle: String,
        token: String,
        name: String,
    ) -> Result<DeviceIdentity, ParleyError> {
        let h = Handle::parse(&handle).map_err(invalid)?;
        let ids = self.ids();
        let (me, account, _) = self
            .rt
            .block_on(async {
                // Pin the transparency keys before the first lookup.
                let mut ids = ids;
                ids.anchor().await?;
                *self.ids.lock().unwrap_or_else(|e| e.into_inner()) = ids.clone();
                client_sdk::device::first_device(&ids, token, &h, &name).await
            })
            .map_err(failed)?;
        Ok(DeviceIdentity {
            handle: h.as_str().to_string(),
            device_id: me.device.to_string(),
            identity_key: me.key.pkcs8().to_vec(),
            account_key: account.pkcs8().to_vec(),
            certificate: me.certificate,
        })
    }

    /// Starts a device: its courier link and SIP registration. It speaks a
    /// tone of `tone_hz` (0: silence) in calls, as a stand-in for the
    /// microphone; `relay_only` hides its addresses behind the relay.
    pub fn start_device(
        &self,
        identity: DeviceIdentity,
        tone_hz: f64,
        relay_only: bool,
    ) -> Result<Arc<PhoneDevice>, ParleyError> {
        let handle = Handle::parse(&identity.handle).map_err(invalid)?;
        let device: DeviceId = identity
            .device_id
            .parse()
            .map_err(|_| invalid("device_id is not 32 hex digits"))?;
        let key = SigningKey::from_pkcs8(&identity.identity_key).map_err(invalid)?;
        let sip = addr("sip", &self.services.sip)?;
        let media_ip = if sip.ip().is_loopback() {
            sip.ip()
        } else {
            IpAddr::from([0, 0, 0, 0])
        };
        let couriers = client_sdk::courier::courier_addrs(&self.services.courier).map_err(|e| {
            ParleyError::Invalid(format!("courier {:?}: {e}", self.services.courier))
        })?;
        let config = DeviceConfig {
            name: "app".into(),
            handle,
            sip_domain: self.services.domain.clone(),
            sip,
            courier: couriers[0],
            courier_fallbacks: couriers[1..].to_vec(),
            courier_transport: client_sdk::courier::Transport::Tls,
            server_name: self.services.server_name.clone(),
            roots: self.roots.clone(),
            voip_topic: VOIP_TOPIC.into(),
            media_ip,
            relay_only,
            turn_transport: None,
            microphone: if tone_hz > 0.0 {
                AudioSource::Tone(tone_hz)
            } else {
                AudioSource::Silence
            },
            speaker: None,
            keep_heard: Duration::from_secs(60),
            video: false,
            audit: None,
            accept_unverified: false,
        };
        let me = Identity {
            device,
            key,
            certificate: identity.certificate,
        };
        let ids = self.ids();
        let device = self
            .rt
            .block_on(Device::start(config, me, ids, true))
            .map_err(failed)?;
        Ok(Arc::new(PhoneDevice {
            rt: self.rt.clone(),
            device: tokio::sync::Mutex::new(device),
        }))
    }
}

/// A running device.
#[derive(Debug, uniffi::Object)]
pub struct PhoneDevice {
    rt: Arc<tokio::runtime::Runtime>,
    device: tokio::sync::Mutex<Device>,
}

#[uniffi::export]
impl PhoneDevice {
    /// Calls every device of `handle` (their keys verified first);
    /// returns the call's id.
    pub fn dial(&self, handle: String) -> Result<String, ParleyError> {
        let h = Handle::parse(&handle).map_err(invalid)?;
        self.rt
            .block_on(async { self.device.lock().await.dial(&h).await })
            .map_err(failed)
    }

    /// Rings every device of every handle into a group call through the
    /// SFU, end to end encrypted (each handle's keys verified first);
    /// returns the call's id.
    pub fn group_call(&self, handles: Vec<String>) -> Result<String, ParleyError> {
        let hs = handles
            .iter()
            .map(|h| Handle::parse(h).map_err(invalid))
            .collect::<Result<Vec<_>, _>>()?;
        self.rt
            .block_on(async { self.device.lock().await.group_call(&hs).await })
            .map_err(failed)
    }

    /// Adds `handle` to the one-to-one call `call`, which becomes a group
    /// call; returns the group call's id.
    pub fn add_to_call(&self, call: String, handle: String) -> Result<String, ParleyError> {
        let h = Handle::parse(&handle).map_err(invalid)?;
        self.rt
            .block_on(async { self.device.lock().await.add_to_call(&call, &h).await })
            .map_err(failed)
    }

    /// A link others can join the group call `call` by (this device
    /// admits them as they ask).
    pub fn call_link(&self, call: String) -> Result<String, ParleyError> {
        self.rt
            .block_on(async { self.device.lock().await.call_link(&call).await })
            .map_err(failed)
    }

    /// Asks to join a group call by its link; the call's id.
    pub fn join_link(&self, link: String) -> Result<String, ParleyError> {
        self.rt
            .block_on(async { self.device.lock().await.join_link(&link).await })
            .map_err(failed)
    }

    pub fn answer(&self, call: String) -> Result<(), ParleyError> {
        self.rt
            .block_on(async { self.device.lock().await.answer(&call).await })
            .map_err(failed)
    }

    pub fn hangup(&self, call: String) -> Result<(), ParleyError> {
        self.rt
            .block_on(async { self.device.lock().await.hangup(&call).await })
            .map_err(failed)
    }

    /// The next event, waiting at most `timeout_ms`.
    pub fn next_event(&self, timeout_ms: u64) -> Option<PhoneEvent> {
        self.rt.block_on(async {
            let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
            let mut d = self.device.lock().await;
            loop {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                let e = d.next_event(left).await?;
                if let Some(e) = phone_event(e) {
                    return Some(e);
                }
            }
        })
    }

    /// Tells the courier this device's platform token (again whenever the
    /// platform rotates it), so that calls wake it through Apple or Google
    /// while it has no link. Fails if another device holds the token or
    /// the courier cannot use it.
    pub fn set_platform_token(&self, token: PlatformToken) -> Result<(), ParleyError> {
        use wire::push::{Platform, PlatformStatus};
        let platform = Platform::parse(&token.platform)
            .ok_or_else(|| invalid(format!("platform {:?}: apns or fcm", token.platform)))?;
        let t = wire::push::PlatformToken {
            platform,
            calls: token.calls,
            others: token.others,
            sandbox: token.sandbox,
            topic: token.topic,
            token: token.token,
            // The SDK seals callers to this device's own keys.
            seal_to: None,
        };
        let status = self
            .rt
            .block_on(async { self.device.lock().await.set_platform_token(t).await })
            .map_err(failed)?;
        match status {
            PlatformStatus::Ok => Ok(()),
            PlatformStatus::Invalid => Err(invalid("the courier refused the token as malformed")),
            other => Err(failed(format!(
                "the courier did not take the token: {other:?}"
            ))),
        }
    }

    /// Goes to the background as an iPhone app does: no SIP connection,
    /// no courier link, until a push ([`PhoneDevice::handle_push`]) comes.
    pub fn background(&self) -> Result<(), ParleyError> {
        self.rt
            .block_on(async { self.device.lock().await.background().await })
            .map_err(failed)
    }

    /// Hands the device a push the app got from Apple (the payload, JSON)
    /// or Google (the message's data, as a JSON object). Returns at once
    /// what it is; the device comes back on its own. `None`: not Parley's.
    pub fn handle_push(&self, payload: String) -> Result<Option<PlatformPush>, ParleyError> {
        use client_sdk::device::PlatformPush as P;
        let p = self
            .rt
            .block_on(async {
                self.device
                    .lock()
                    .await
                    .handle_push(payload.as_bytes())
                    .await
            })
            .map_err(failed)?;
        Ok(p.map(|p| match p {
            P::Call { id, caller } => PlatformPush::Call { id, caller },
            P::Wake { id } => PlatformPush::Wake { id },
        }))
    }

    /// The audio this device played for `call` (48 kHz mono), up to the
    /// last minute.
    pub fn heard(&self, call: String) -> Result<Vec<i16>, ParleyError> {
        self.rt
            .block_on(async { self.device.lock().await.heard(&call).await })
            .map_err(failed)
    }

    /// What this device heard and saw of each other participant of the
    /// group call `call`, and what its uplink carries; none if it is not
    /// (or was not last) in that call.
    pub fn group_stats(&self, call: String) -> Result<Option<GroupCallStats>, ParleyError> {
        let stats = self
            .rt
            .block_on(async { self.device.lock().await.group_stats(&call).await })
            .map_err(failed)?;
        Ok(stats.map(|s| GroupCallStats::from(&s)))
    }
}

/// Another participant of a group call, as this device heard and saw it.
#[derive(Debug, Clone, uniffi::Record)]
pub struct Participant {
    /// Its place in the call's roster.
    pub index: u16,
    /// Its audio frames that opened.
    pub frames: u64,
    /// The newest one's level (RFC 6464: -dBov, 0 loudest, 127 silence).
    pub level: u8,
    /// Share of its audio played concealed (lost or late).
    pub concealed: f64,
    /// Pictures of its video decoded, and the newest one's size (0 × 0
    /// before the first).
    pub pictures: u64,
    pub width: u32,
    pub height: u32,
}

/// A group call as this device had it.
#[derive(Debug, Clone, uniffi::Record)]
pub struct GroupCallStats {
    pub participants: Vec<Participant>,
    /// Simulcast layers this device sends now (those its uplink carries).
    pub layers_sent: u32,
    /// Its uplink's bandwidth estimate, RTP payload bits per second.
    pub send_estimate_bps: Option<u64>,
}

impl From<&client_sdk::group::GroupStats> for GroupCallStats {
    fn from(s: &client_sdk::group::GroupStats) -> GroupCallStats {
        let indices: std::collections::BTreeSet<u16> =
            s.heard.keys().chain(s.seen.keys()).copied().collect();
        let participants = indices
            .into_iter()
            .map(|index| {
                let heard = s.heard.get(&index).copied().unwrap_or_default();
                let seen = s.seen.get(&index).copied().unwrap_or_default();
                let (width, height) = seen
                    .last
                    .map_or((0, 0), |p| (p.width as u32, p.height as u32));
                Participant {
                    index,
                    frames: heard.frames,
                    level: heard.level,
                    concealed: heard.concealed,
                    pictures: seen.pictures,
                    width,
                    height,
                }
            })
            .collect();
        GroupCallStats {
            participants,
            layers_sent: s.layers_sent as u32,
            send_estimate_bps: s.send_estimate,
        }
    }
}
