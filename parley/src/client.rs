//! `parley client`: a desktop device over the client SDK, against the
//! services of `parley up`. Its keys, certificate and pinned transparency
//! keys live in a state directory; audio comes from and goes to WAV files.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use clap::{Args, Subcommand};
use client_sdk::call::{CallEvent, EndReason};
use client_sdk::courier::Transport;
use client_sdk::device::{
    first_device, AudioSource, Device, DeviceConfig, DeviceEvent, Identity, LiveAudio, OwnAudit,
};
use client_sdk::ids::IdsClient;
use client_sdk::media::CallStats;
use serde::{Deserialize, Serialize};
use wire::handle::Handle;
use wire::keys::{DeviceId, SigningKey};
use wire::transparency::{TrustAnchor, Unapproved};

/// The VoIP push topic of this client.
pub const VOIP_TOPIC: &str = "org.parley.client.voip";
const SAMPLE_RATE: u32 = 48_000;
/// How long a device waits for its first SIP registration.
const REGISTER_WAIT: Duration = Duration::from_secs(15);
/// How long a call may take to end once we hung up.
const HANGUP_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// This device's state directory: identity key, account key, device
    /// certificate, pinned transparency keys. Created by `activate`,
    /// readable by its owner only.
    #[arg(long, default_value = "parley-client", env = "PARLEY_CLIENT_STATE")]
    state: PathBuf,
    /// The identity service (HTTPS).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8444")]
    ids: SocketAddr,
    /// The push courier's device port (TLS). Several, comma-separated:
    /// couriers on one database; when the link to one is lost the client
    /// tries the next. A name (host:port) gives every address it resolves
    /// to.
    #[arg(long, value_name = "ADDR[,ADDR…]", default_value = "127.0.0.1:5223")]
    courier: String,
    /// Reach the courier over QUIC (the same port, UDP) instead of TLS over
    /// TCP: the push link then survives a change of network.
    #[arg(long)]
    quic: bool,
    /// Signaling's SIP over TLS port.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:5061")]
    sip: SocketAddr,
    /// The SIP domain of handles' addresses-of-record.
    #[arg(long, default_value = "localhost")]
    domain: String,
    /// CA certificate(s) the services' certificates chain to [default: the
    /// development CA of `parley up`, <data>/ca.pem].
    #[arg(long, value_name = "PEM")]
    ca: Option<PathBuf>,
    /// Name the services' certificates carry.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    #[command(subcommand)]
    command: ClientCommand,
}

#[derive(Debug, Subcommand)]
enum ClientCommand {
    /// Make this machine a device of a handle (a phone number or email).
    ///
    /// The first device of a handle proves it with the 6-digit code the
    /// identity service sends (typed in, --code, or read from a development
    /// outbox with --outbox) and creates the account. A later device runs
    /// `parley client approve` on an existing one and passes the code it
    /// prints with --link.
    Activate(ActivateArgs),
    /// Let a new device join this account: prints a link code, waits for a
    /// device to claim it, and approves it.
    Approve(ApproveArgs),
    /// Call a handle: every device of it rings; talk, then hang up.
    Call(CallArgs),
    /// Stay reachable and show incoming calls; answer them with --answer.
    Listen(ListenArgs),
    /// Show this device's handle, id and key fingerprint.
    Whoami,
    /// List the account's devices (id, name, key fingerprint).
    Devices,
    /// Remove devices from the account (a lost or sold phone): their
    /// certificates are revoked and the account key is rotated, since they
    /// hold the old one. The new key is stored here and sealed to every
    /// other device, which takes it when it next checks its account.
    Remove(RemoveArgs),
}

#[derive(Debug, Args)]
struct RemoveArgs {
    /// Device ids, as `parley client devices` shows them.
    #[arg(required = true)]
    device: Vec<String>,
}

#[derive(Debug, Args)]
struct ActivateArgs {
    /// The handle: an E.164 number (+14155550123) or an email address.
    #[arg(long)]
    handle: String,
    /// A name for this device, shown to the account's other devices.
    #[arg(long, default_value = "desktop")]
    name: String,
    /// Join an existing account with a link code from `parley client approve`.
    #[arg(long, conflicts_with_all = ["code", "outbox"])]
    link: Option<String>,
    /// The verification code, if already known.
    #[arg(long)]
    code: Option<String>,
    /// Read the code from a development outbox (<data>/outbox of `parley up`).
    #[arg(long, value_name = "DIR")]
    outbox: Option<PathBuf>,
    /// How long to wait for an approval (with --link), in seconds.
    #[arg(long, default_value_t = 600)]
    wait: u64,
}

#[derive(Debug, Args)]
struct ApproveArgs {
    /// How long to wait for a device to claim the code, in seconds.
    #[arg(long, default_value_t = 600)]
    wait: u64,
}

#[derive(Debug, Args, Clone)]
struct MediaArgs {
    /// Send this WAV file as the microphone (any rate, mixed to mono; then
    /// silence).
    #[arg(long, value_name = "WAV", conflicts_with = "tone")]
    play: Option<PathBuf>,
    /// Send a sine tone at this frequency (Hz) instead.
    #[arg(long, value_name = "HZ")]
    tone: Option<f64>,
    /// Write what the far end said to this WAV file (48 kHz mono) when the
    /// call ends.
    #[arg(long, value_name = "WAV")]
    record: Option<PathBuf>,
    /// Offer only relayed candidates (hides this machine's addresses).
    #[arg(long)]
    relay_only: bool,
    /// Reach the TURN relay over this transport [default: the first of
    /// udp, tcp and tls that answers; tcp and tls pass networks that
    /// block UDP].
    #[arg(long, value_name = "udp|tcp|tls", value_parser = turn_transport)]
    turn_transport: Option<client_sdk::turn::Transport>,
    /// Send and receive video (a test pattern stands in for the camera).
    #[arg(long)]
    video: bool,
    /// Local address for media [default: the one that reaches the services].
    #[arg(long, value_name = "IP")]
    media_ip: Option<IpAddr>,
    /// Speak into the sound card: its default input, or the cpal device
    /// id given.
    #[cfg(feature = "sound-card")]
    #[arg(long, value_name = "DEVICE", num_args = 0..=1, default_missing_value = "default",
          conflicts_with_all = ["play", "tone"])]
    mic: Option<String>,
    /// Hear the far end on the sound card: its default output, or the
    /// cpal device id given.
    #[cfg(feature = "sound-card")]
    #[arg(long, value_name = "DEVICE", num_args = 0..=1, default_missing_value = "default")]
    speaker: Option<String>,
}

/// The sound card's streams, kept open while the device runs.
#[cfg(feature = "sound-card")]
type Sound = Option<crate::sound::SoundCard>;
#[cfg(not(feature = "sound-card"))]
type Sound = ();

/// Opens the sound card if the media flags ask for it: (streams,
/// microphone, speaker).
#[cfg(feature = "sound-card")]
fn sound(m: &MediaArgs) -> Result<(Sound, Option<LiveAudio>, Option<LiveAudio>)> {
    if m.mic.is_none() && m.speaker.is_none() {
        return Ok((None, None, None));
    }
    let (card, mic, speaker) = crate::sound::open(m.mic.clone(), m.speaker.clone())?;
    Ok((Some(card), mic, speaker))
}

#[cfg(not(feature = "sound-card"))]
fn sound(_: &MediaArgs) -> Result<(Sound, Option<LiveAudio>, Option<LiveAudio>)> {
    Ok(((), None, None))
}

#[derive(Debug, Args)]
struct CallArgs {
    /// Who to call. Two or more (or --group) ring them all into a group
    /// call through the SFU, end to end encrypted.
    #[arg(required_unless_present = "link", num_args = 1..)]
    handles: Vec<String>,
    /// Join a group call by the link one of its members shared (that
    /// member admits this device).
    #[arg(long, value_name = "LINK", conflicts_with_all = ["handles", "group", "unverified"])]
    link: Option<String>,
    /// Once the one-to-one call has talked for --add-after seconds, add
    /// this handle: the call becomes a group call.
    #[arg(long, value_name = "HANDLE", conflicts_with_all = ["link", "group"])]
    add: Option<String>,
    /// Seconds into the call before --add.
    #[arg(long, default_value_t = 2, value_name = "SECS")]
    add_after: u64,
    /// A group call even with one handle.
    #[arg(long)]
    group: bool,
    /// Talk this long after media connects, then hang up (seconds).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Give up if nobody answers within this many seconds.
    #[arg(long, default_value_t = 60)]
    ring: u64,
    /// Call a SIP phone that is not in the key directory (one with a
    /// digest account at signaling, say baresip): no lookup, and whoever
    /// answers is not authenticated. Media is still encrypted, but the
    /// signaling server could sit in the middle unnoticed.
    #[arg(long)]
    unverified: bool,
    #[command(flatten)]
    media: MediaArgs,
}

#[derive(Debug, Args)]
struct ListenArgs {
    /// Answer every call that rings.
    #[arg(long)]
    answer: bool,
    /// Hang up each answered call after this many seconds (0: stay until
    /// the far end hangs up; a group call goes on while others are in it).
    #[arg(long, default_value_t = 0, value_name = "SECS")]
    hangup_after: u64,
    /// Exit after this many calls have ended (0: never).
    #[arg(long, default_value_t = 0)]
    calls: u32,
    /// Check the handle's key transparency history this often (seconds;
    /// 0: never) and warn of any device or account key change this device
    /// did not know of.
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    audit_every: u64,
    /// Also take calls from SIP phones that are not in the key directory
    /// (digest accounts at signaling, say baresip). They ring without any
    /// proof of who is calling: encrypted, but not authenticated. Without
    /// this they are refused (438).
    #[arg(long)]
    accept_unverified: bool,
    /// Between calls keep only the push link, as a phone in the
    /// background does: the SIP connection closes once registered, and a
    /// VoIP push wakes the device to register again and take the call.
    #[arg(long)]
    asleep: bool,
    #[command(flatten)]
    media: MediaArgs,
}

/// What `activate` keeps in <state>/device.json (mode 0600).
#[derive(Serialize, Deserialize)]
struct State {
    handle: String,
    name: String,
    device_id: String,
    /// PKCS#8, base64.
    identity_key: String,
    certificate: String,
    /// The account key (PKCS#8, base64), which approves new devices.
    account_key: String,
    /// Transparency keys pinned at activation, base64.
    kt_vrf_public_key: String,
    kt_root_key: String,
}

impl State {
    fn path(dir: &Path) -> PathBuf {
        dir.join("device.json")
    }

    fn load(dir: &Path) -> Result<State> {
        let p = State::path(dir);
        let text = std::fs::read_to_string(&p).with_context(|| {
            format!(
                "no device in {} (run `parley client activate` first)",
                dir.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("{} is damaged", p.display()))
    }

    fn save(&self, dir: &Path) -> Result<()> {
        use std::io::Write;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        let tmp = dir.join("device.json.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(serde_json::to_string_pretty(self)?.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, State::path(dir))?;
        Ok(())
    }

    fn key(b64: &str) -> Result<SigningKey> {
        Ok(SigningKey::from_pkcs8(&B64.decode(b64)?)?)
    }

    fn identity(&self) -> Result<Identity> {
        let id: DeviceId = self
            .device_id
            .parse()
            .map_err(|_| anyhow!("bad device id in the state"))?;
        Ok(Identity {
            device: id,
            key: State::key(&self.identity_key)?,
            certificate: self.certificate.clone(),
        })
    }

    fn anchor(&self) -> Result<TrustAnchor> {
        Ok(TrustAnchor {
            vrf_public_key: B64.decode(&self.kt_vrf_public_key)?,
            root_key: B64.decode(&self.kt_root_key)?,
        })
    }
}

/// `data`: the global --data directory, where `parley up` keeps its CA.
pub fn run(mut args: ClientArgs, data: Option<PathBuf>) -> Result<()> {
    if args.ca.is_none() {
        let data = data.unwrap_or_else(|| PathBuf::from("parley-data"));
        args.ca = Some(data.join("ca.pem"));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        match &args.command {
            ClientCommand::Activate(a) => activate(&args, a).await,
            ClientCommand::Approve(a) => approve(&args, a).await,
            ClientCommand::Call(a) => call(&args, a).await,
            ClientCommand::Listen(a) => listen(&args, a).await,
            ClientCommand::Whoami => whoami(&args),
            ClientCommand::Devices => devices(&args).await,
            ClientCommand::Remove(a) => remove(&args, a).await,
        }
    })
}

fn roots(args: &ClientArgs) -> Result<rustls::RootCertStore> {
    let ca = args
        .ca
        .as_deref()
        .unwrap_or(Path::new("parley-data/ca.pem"));
    let pem = std::fs::read_to_string(ca)
        .with_context(|| format!("reading the CA certificate {}", ca.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in client_sdk::ids::pem_certs(&pem)? {
        roots.add(c)?;
    }
    Ok(roots)
}

fn ids_client(args: &ClientArgs) -> Result<IdsClient> {
    Ok(IdsClient::new(args.ids, &args.server_name, roots(args)?)?)
}

/// Seconds since `start`, for progress lines.
fn stamp(start: Instant) -> String {
    format!("{:>9.3}", start.elapsed().as_secs_f64())
}

#[allow(clippy::print_stdout)]
fn say(start: Instant, what: impl std::fmt::Display) {
    println!("{} {what}", stamp(start));
}

/// Reads the newest code the development sender wrote for `handle`
/// (bounded: about 2 s).
pub async fn read_code(outbox: &Path, handle: &Handle) -> Result<String> {
    let stem = handle.as_str().to_string();
    for _ in 0..200 {
        if let Ok(rd) = std::fs::read_dir(outbox) {
            let mut files: Vec<PathBuf> = rd
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().contains(&stem))
                .collect();
            files.sort();
            if let Some(f) = files.last() {
                let text = std::fs::read_to_string(f)?;
                let code: String = text
                    .split("code is ")
                    .nth(1)
                    .ok_or_else(|| anyhow!("no code in {}", f.display()))?
                    .chars()
                    .take(6)
                    .collect();
                std::fs::remove_file(f)?;
                return Ok(code);
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("no code for {} in {}", handle.as_str(), outbox.display())
}

/// Proves a handle with the code from the outbox; returns its token.
pub async fn prove_from_outbox(ids: &IdsClient, outbox: &Path, handle: &Handle) -> Result<String> {
    let id = ids.start_verification(handle).await?;
    let code = read_code(outbox, handle).await?;
    Ok(ids.check_verification(&id, &code).await?)
}

async fn activate(args: &ClientArgs, a: &ActivateArgs) -> Result<()> {
    let start = Instant::now();
    if State::path(&args.state).exists() {
        bail!(
            "{} already holds a device; use another --state",
            args.state.display()
        );
    }
    let handle = Handle::parse(&a.handle).map_err(|e| anyhow!("--handle: {e}"))?;
    let mut ids = ids_client(args)?;
    let anchor = ids.anchor().await?;
    let (me, account) = match &a.link {
        None => {
            let id = ids.start_verification(&handle).await?;
            say(start, format!("a code was sent to {}", handle.as_str()));
            let code = match (&a.code, &a.outbox) {
                (Some(c), _) => c.clone(),
                (None, Some(dir)) => read_code(dir, &handle).await?,
                (None, None) => prompt(
                    "the 6-digit code: ",
                    "no code given (pass --code, or --outbox for a development server)",
                )?,
            };
            let token = ids.check_verification(&id, code.trim()).await?;
            say(start, "handle proven");
            let (me, account, _) = first_device(&ids, token, &handle, &a.name).await?;
            (me, account)
        }
        Some(code) => {
            let key = SigningKey::generate();
            let device = DeviceId::random();
            let transfer = wire::key_transfer::TransferKey::generate();
            let fingerprint = ids
                .claim_link(code, device, &key, &transfer, &a.name)
                .await?;
            say(
                start,
                format!(
                    "link fingerprint: {fingerprint} (type it on the approving device); waiting for the approval"
                ),
            );
            let (reg, account) = ids
                .await_approval(code, &key, transfer, Duration::from_secs(a.wait))
                .await?;
            // What arrived must be what the directory publishes for the
            // handle: the account key, and this device in its list.
            ids.verify_joined(
                &key,
                &handle,
                &account,
                reg.device_id,
                Duration::from_secs(a.wait.min(60)),
            )
            .await?;
            say(
                start,
                "the directory lists this device under the account key it received",
            );
            let me = Identity {
                device: reg.device_id,
                key,
                certificate: reg.certificate,
            };
            (me, account)
        }
    };
    let state = State {
        handle: handle.as_str().to_string(),
        name: a.name.clone(),
        device_id: me.device.to_string(),
        identity_key: B64.encode(me.key.pkcs8()),
        certificate: me.certificate.clone(),
        account_key: B64.encode(account.pkcs8()),
        kt_vrf_public_key: B64.encode(&anchor.vrf_public_key),
        kt_root_key: B64.encode(&anchor.root_key),
    };
    state.save(&args.state)?;
    say(
        start,
        format!(
            "activated {} as device {} (key {}); state in {}",
            handle.as_str(),
            state.device_id,
            me.key.public().fingerprint(),
            args.state.display()
        ),
    );
    Ok(())
}

/// Asks on stderr and reads a line from stdin; `missing` says what to do
/// when nothing comes.
fn prompt(what: &str, missing: &str) -> Result<String> {
    use std::io::{BufRead, Write};
    eprint!("{what}");
    std::io::stderr().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    if line.trim().is_empty() {
        bail!("{missing}");
    }
    Ok(line)
}

#[allow(clippy::print_stdout)]
async fn approve(args: &ClientArgs, a: &ApproveArgs) -> Result<()> {
    let start = Instant::now();
    let mut state = State::load(&args.state)?;
    let me = state.identity()?;
    let mut ids = ids_client(args)?;
    ids.pin(state.anchor()?);
    let account = account_key(args, &mut state, &mut ids, &me, start).await?;
    let code = ids.create_link(&me.key).await?;
    // The code on a line of its own, for scripts.
    println!("link code: {code}");
    say(
        start,
        format!(
            "run `parley client activate --handle {} --link {code}` on the new device",
            state.handle
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(a.wait);
    let claim = loop {
        let claims = ids.pending_claims(&me.key).await?;
        if let Some(c) = claims.into_iter().find(|c| c.is_for(&code)) {
            break c;
        }
        if Instant::now() >= deadline {
            bail!("no device claimed the code within {} s", a.wait);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    say(
        start,
        format!(
            "device {} \"{}\" (key {}) claimed the code",
            claim.device,
            claim.name,
            claim.identity_key.fingerprint()
        ),
    );
    // The person confirms the claim is the device in their hand: the
    // digits it shows must be this claim's (the service relays claims and
    // could put its own in their place).
    let typed = tokio::task::spawn_blocking(|| {
        prompt(
            "type the link fingerprint the new device shows: ",
            "no fingerprint typed: nothing approved",
        )
    })
    .await??;
    let current = ids.account_list(&me.key, &account).await?;
    let list = ids
        .approve(&me.key, &account, &current, &claim, &code, &typed)
        .await?;
    say(
        start,
        format!("approved: the account has {} devices", list.devices.len()),
    );
    Ok(())
}

/// The account key this device should use: the stored one, or the one
/// another device rotated to since (then stored in its place).
async fn account_key(
    args: &ClientArgs,
    state: &mut State,
    ids: &mut IdsClient,
    me: &Identity,
    start: Instant,
) -> Result<SigningKey> {
    let held = State::key(&state.account_key)?;
    let handle = Handle::parse(&state.handle)?;
    match ids
        .rotated_account_key(&me.key, me.device, &handle, &held.public())
        .await?
    {
        Some(k) => {
            adopt(args, state, &k, start)?;
            Ok(k)
        }
        None => Ok(held),
    }
}

/// Stores an account key another device rotated to.
fn adopt(args: &ClientArgs, state: &mut State, key: &SigningKey, start: Instant) -> Result<()> {
    state.account_key = B64.encode(key.pkcs8());
    state.save(&args.state)?;
    say(
        start,
        "another device rotated the account key (it removed a device); stored the new one",
    );
    Ok(())
}

#[allow(clippy::print_stdout)]
async fn devices(args: &ClientArgs) -> Result<()> {
    let state = State::load(&args.state)?;
    let me = state.identity()?;
    let mut ids = ids_client(args)?;
    ids.pin(state.anchor()?);
    let (status, v) = ids.call("GET", "/v1/account", None, Some(&me.key)).await?;
    if status != 200 {
        bail!("identity service: {status} {}", v["detail"]);
    }
    for d in v["devices"].as_array().cloned().unwrap_or_default() {
        let id = d["id"].as_str().unwrap_or("?");
        let key = d["identity_key"]
            .as_str()
            .and_then(|k| wire::keys::PublicKey::from_b64(k).ok())
            .map_or_else(|| "?".into(), |k| k.fingerprint());
        let mine = if id == state.device_id {
            " (this device)"
        } else {
            ""
        };
        println!(
            "{id}  {:<16} key {key}{mine}",
            d["name"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

async fn remove(args: &ClientArgs, a: &RemoveArgs) -> Result<()> {
    let start = Instant::now();
    let mut state = State::load(&args.state)?;
    let me = state.identity()?;
    let mut ids = ids_client(args)?;
    ids.pin(state.anchor()?);
    let gone = a
        .device
        .iter()
        .map(|d| {
            d.parse::<DeviceId>()
                .map_err(|_| anyhow!("{d} is not a device id"))
        })
        .collect::<Result<Vec<_>>>()?;
    let account = account_key(args, &mut state, &mut ids, &me, start).await?;
    let (fresh, list) = ids
        .remove_devices(&me.key, me.device, &account, &gone)
        .await?;
    state.account_key = B64.encode(fresh.pkcs8());
    state.save(&args.state)?;
    say(
        start,
        format!(
            "removed {} device(s); the account key is rotated (new key {}) and sealed to the {} other device(s)",
            gone.len(),
            fresh.public().fingerprint(),
            list.devices.len().saturating_sub(1),
        ),
    );
    Ok(())
}

fn whoami(args: &ClientArgs) -> Result<()> {
    let state = State::load(&args.state)?;
    let me = state.identity()?;
    say(
        Instant::now(),
        format!(
            "{} ({}): device {}, key {}",
            state.handle,
            state.name,
            state.device_id,
            me.key.public().fingerprint(),
        ),
    );
    Ok(())
}

/// The microphone the media flags ask for.
fn microphone(m: &MediaArgs) -> Result<AudioSource> {
    if let Some(p) = &m.play {
        return Ok(AudioSource::Samples(read_wav(p)?.into()));
    }
    Ok(m.tone.map_or(AudioSource::Silence, AudioSource::Tone))
}

/// The local address that routes to `to` (no packet is sent).
fn local_ip_towards(to: SocketAddr) -> Result<IpAddr> {
    let any: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let s = std::net::UdpSocket::bind(any)?;
    s.connect(to)?;
    Ok(s.local_addr()?.ip())
}

/// `audit_every`: how often to audit the own handle's history, if at all.
async fn start_device(
    args: &ClientArgs,
    m: &MediaArgs,
    audit_every: Option<Duration>,
    accept_unverified: bool,
) -> Result<(Device, State, Sound)> {
    let mut state = State::load(&args.state)?;
    let me = state.identity()?;
    let mut ids = ids_client(args)?;
    ids.pin(state.anchor()?);
    let handle = Handle::parse(&state.handle)?;
    let (card, mic, speaker) = sound(m)?;
    let audit = match audit_every {
        Some(every) => {
            // What this device knows of its account now: the list the
            // account key signed, as ids holds it (checked).
            let account = account_key(args, &mut state, &mut ids, &me, Instant::now()).await?;
            let list = ids.account_list(&me.key, &account).await?;
            Some(OwnAudit {
                account_key: account.public(),
                known_devices: list.devices.iter().map(|d| d.id).collect(),
                every,
            })
        }
        None => None,
    };
    let couriers = client_sdk::courier::courier_addrs(&args.courier)
        .with_context(|| format!("--courier {}", args.courier))?;
    let config = DeviceConfig {
        name: state.name.clone(),
        handle,
        sip_domain: args.domain.clone(),
        sip: args.sip,
        courier: couriers[0],
        courier_fallbacks: couriers[1..].to_vec(),
        courier_transport: if args.quic {
            Transport::Quic
        } else {
            Transport::Tls
        },
        server_name: args.server_name.clone(),
        roots: roots(args)?,
        voip_topic: VOIP_TOPIC.into(),
        media_ip: match m.media_ip {
            Some(ip) => ip,
            None => local_ip_towards(args.sip)?,
        },
        relay_only: m.relay_only,
        turn_transport: m.turn_transport,
        microphone: match mic {
            Some(live) => AudioSource::Live(live),
            None => microphone(m)?,
        },
        speaker,
        keep_heard: Duration::from_secs(600),
        video: m.video,
        audit,
        accept_unverified,
    };
    let device = Device::start(config, me, ids, true).await?;
    Ok((device, state, card))
}

/// Waits for the first registration, showing events.
async fn registered(device: &mut Device, start: Instant) -> Result<()> {
    let deadline = Instant::now() + REGISTER_WAIT;
    while Instant::now() < deadline {
        match device.next_event(Duration::from_millis(200)).await {
            Some(DeviceEvent::Registered) => {
                say(start, "registered with signaling");
                return Ok(());
            }
            // Not fatal: say it and keep waiting.
            Some(e @ DeviceEvent::Error(_)) => say(start, describe(&e)),
            _ => {}
        }
    }
    bail!("not registered with signaling within {REGISTER_WAIT:?}")
}

/// A human line for a device event.
pub fn describe(e: &DeviceEvent) -> String {
    match e {
        DeviceEvent::Registered => "SIP registered".into(),
        DeviceEvent::Woken { .. } => "woken by a VoIP push".into(),
        DeviceEvent::CourierLost { retry_in: Some(d) } => {
            format!("push link lost; reconnecting in {} ms", d.as_millis())
        }
        DeviceEvent::CourierLost { retry_in: None } => {
            "push link taken over by another connection of this device".into()
        }
        DeviceEvent::CourierConnected => "push link back".into(),
        DeviceEvent::Revoked => {
            "this device was removed from its account: its certificate is revoked".into()
        }
        DeviceEvent::AccountChanged { kind, device } => {
            let what = match kind.as_str() {
                "device_added" => "a device was added",
                "device_removed" => "a device was removed",
                "account_reset" => "the account was reset (this device is no longer in it)",
                "reset_requested" => {
                    "WARNING: someone proved a handle of this account and asked to reset it; \
                     it takes effect in 7 days unless a device cancels it \
                     (GET /v1/account/resets)"
                }
                "reset_cancelled" => "a pending reset of the account was cancelled",
                _ => "the account changed",
            };
            match device {
                Some(d) => format!("account: {what}: {d} (pushed by ids)"),
                None => format!("account: {what} (pushed by ids)"),
            }
        }
        DeviceEvent::Unapproved(found) => found
            .iter()
            .map(|u| match u {
                Unapproved::Device { epoch, device } => format!(
                    "WARNING: device {device} joined this account (epoch {epoch}), approved \
                     by another device; revoke it if it is not yours"
                ),
                Unapproved::AccountKey { epoch } => format!(
                    "WARNING: the handle is bound to another account key since epoch {epoch} \
                     (an account reset, or a directory that lies)"
                ),
                Unapproved::Tombstone { epoch } => {
                    format!("WARNING: the handle was deleted at epoch {epoch}")
                }
            })
            .collect::<Vec<_>>()
            .join("; "),
        DeviceEvent::SplitView(e) => format!(
            "WARNING: the identity service showed this device a view of the directory that \
             others do not see ({e}); do not trust keys from it"
        ),
        DeviceEvent::AccountKeyRotated(k) => format!(
            "another device rotated the account key (it removed a device); the new key is {}",
            k.public().fingerprint()
        ),
        DeviceEvent::Error(e) => format!("error: {e}"),
        DeviceEvent::Call(c) => match c {
            CallEvent::Incoming { from, .. } => format!("incoming call from {}", from.as_str()),
            CallEvent::Upgraded { .. } => {
                "someone was added: the call moved to a group call through the SFU".into()
            }
            CallEvent::JoinRequest { from, .. } => {
                format!("{} asks to join the group call by its link", from.as_str())
            }
            CallEvent::IncomingGroup { from, members, .. } => format!(
                "incoming group call from {} with {} (every device's key verified against ids)",
                from.as_str(),
                members
                    .iter()
                    .map(|h| h.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            CallEvent::Ringing { .. } => "ringing (caller's PASSporT verified against ids)".into(),
            CallEvent::Alerting { .. } => "the callee's devices ring".into(),
            CallEvent::Answered {
                device: Some(device),
                ..
            } => format!("answered by device {device} (its key verified against ids)"),
            CallEvent::Answered { device: None, .. } => {
                "answered by a phone outside the key directory: encrypted, but NOT authenticated"
                    .into()
            }
            CallEvent::MediaConnected { .. } => "media connected (ICE + DTLS-SRTP)".into(),
            CallEvent::MemberJoined { handle, .. } => {
                format!("{} answered and joins the group call", handle.as_str())
            }
            CallEvent::MemberLeft { handle, .. } => format!(
                "{} left the group call; new keys sent to those who remain",
                handle.as_str()
            ),
            CallEvent::RelayMoved { from, to, .. } => {
                format!("the relay {from} stopped answering; media moves to the relay {to}")
            }
            CallEvent::Ended { reason, .. } => format!("call ended: {reason:?}"),
            CallEvent::Stats { .. } => "stats".into(),
        },
    }
}

/// What a group call's media did, if `call` is one: per member, the
/// frames heard and pictures seen.
async fn group_summary(device: &Device, call: &str, start: Instant) {
    let Ok(Some(s)) = device.group_stats(call).await else {
        return;
    };
    let members: Vec<String> = s
        .heard
        .iter()
        .map(|(i, h)| {
            let seen = s.seen.get(i).map_or(0, |v| v.pictures);
            format!("member {i}: {} audio frames, {seen} pictures", h.frames)
        })
        .collect();
    say(
        start,
        format!(
            "group: sent {} audio frames; {}; {} frames did not decrypt",
            s.frames_out,
            if members.is_empty() {
                "heard nobody".to_string()
            } else {
                members.join("; ")
            },
            s.undecryptable
        ),
    );
}

fn summary(s: &CallStats) -> String {
    format!(
        "rtt {} ms, loss in {:.1}% out {:.1}%, jitter {:.1} ms, audio {} kbps out, {} kbps in, \
         concealed {:.1}%, MOS {:.2}",
        s.rtt.map_or("-".into(), |r| r.as_millis().to_string()),
        s.loss_in * 100.0,
        s.loss_out * 100.0,
        s.jitter_ms,
        s.bitrate_out / 1000,
        s.bitrate_in / 1000,
        s.concealed * 100.0,
        s.mos
    )
}

/// Writes what was heard on `call` to the --record file, if any.
async fn record(device: &Device, call: &str, to: Option<&Path>, start: Instant) -> Result<()> {
    let Some(path) = to else { return Ok(()) };
    let pcm = device.heard(call).await?;
    write_wav(path, &pcm)?;
    say(
        start,
        format!(
            "wrote {:.1} s of the far end's audio to {}",
            pcm.len() as f64 / f64::from(SAMPLE_RATE),
            path.display()
        ),
    );
    Ok(())
}

async fn call(args: &ClientArgs, a: &CallArgs) -> Result<()> {
    let start = Instant::now();
    let handles = a
        .handles
        .iter()
        .map(|h| Handle::parse(h).map_err(|e| anyhow!("{h}: {e}")))
        .collect::<Result<Vec<_>>>()?;
    let group = a.group || handles.len() > 1 || a.link.is_some();
    if group && a.unverified {
        bail!("a group call is always verified: --unverified is for one SIP phone");
    }
    let (mut device, _, _sound) = start_device(args, &a.media, None, false).await?;
    registered(&mut device, start).await?;
    let dialed = Instant::now();
    let call = if let Some(link) = &a.link {
        let call = device.join_link(link).await?;
        say(start, format!("asking to join the group call at {link}"));
        call
    } else if group {
        let call = device.group_call(&handles).await?;
        say(
            start,
            format!(
                "group call with {} (every device's key verified; media end to end encrypted \
                 through the SFU)",
                a.handles.join(", ")
            ),
        );
        call
    } else if a.unverified {
        let callee = handles[0].clone();
        let call = device.dial_unverified(&callee).await?;
        say(
            start,
            format!(
                "calling {} WITHOUT verification: the far end's key will not be authenticated",
                callee.as_str()
            ),
        );
        call
    } else {
        let callee = handles[0].clone();
        let call = device.dial(&callee).await?;
        say(
            start,
            format!("calling {} (its devices' keys verified)", callee.as_str()),
        );
        call
    };
    let mut call = call;
    let mut added = a
        .add
        .as_deref()
        .map(|h| Handle::parse(h).map_err(|e| anyhow!("{h}: {e}")))
        .transpose()?;
    let mut group = group;
    let mut connected: Option<Instant> = None;
    // When we hung up: the call must end within HANGUP_WAIT of it.
    let mut hung_up: Option<Instant> = None;
    let mut last: Option<CallStats> = None;
    let ring_deadline = dialed + Duration::from_secs(a.ring);
    let reason = loop {
        let now = Instant::now();
        let hang_up_due = match connected {
            Some(c) => now >= c + Duration::from_secs(a.seconds),
            None => now >= ring_deadline,
        };
        if hang_up_due && hung_up.is_none() {
            hung_up = Some(now);
            if connected.is_none() {
                say(start, format!("no answer within {} s", a.ring));
            }
            device.hangup(&call).await?;
        }
        if hung_up.is_some_and(|h| now >= h + HANGUP_WAIT) {
            bail!("the call did not end after hanging up");
        }
        let add_due = connected.is_some_and(|c| now >= c + Duration::from_secs(a.add_after));
        if let (true, None) = (add_due, hung_up) {
            if let Some(h) = added.take() {
                let room = device.add_to_call(&call, &h).await?;
                say(
                    start,
                    format!("adding {}: a group call rings it", h.as_str()),
                );
                // The group call carries on from here; its own clock.
                call = room;
                group = true;
            }
        }
        let ev = tokio::select! {
            ev = device.next_event(Duration::from_millis(100)) => ev,
            _ = tokio::signal::ctrl_c(), if hung_up.is_none() => {
                hung_up = Some(Instant::now());
                device.hangup(&call).await?;
                continue;
            }
        };
        let Some(ev) = ev else { continue };
        match &ev {
            DeviceEvent::Call(CallEvent::Stats { stats, .. }) => {
                last = Some((**stats).clone());
                continue;
            }
            DeviceEvent::Call(CallEvent::MediaConnected { .. }) if connected.is_none() => {
                connected = Some(Instant::now());
                say(
                    start,
                    format!(
                        "{} ({} ms after dialing); talking for {} s",
                        describe(&ev),
                        dialed.elapsed().as_millis(),
                        a.seconds
                    ),
                );
                continue;
            }
            DeviceEvent::Call(CallEvent::Ended { call: c, .. }) if *c != call => {
                // The one-to-one call a group call took over.
                say(start, describe(&ev));
                continue;
            }
            DeviceEvent::Call(CallEvent::Ended { reason, .. }) => {
                say(start, describe(&ev));
                break reason.clone();
            }
            _ => {}
        }
        say(start, describe(&ev));
    };
    if let Some(s) = &last {
        say(start, summary(s));
    }
    if group {
        group_summary(&device, &call, start).await;
    }
    record(&device, &call, a.media.record.as_deref(), start).await?;
    match (connected, reason) {
        (Some(_), EndReason::Local | EndReason::Remote) => Ok(()),
        (_, r) => bail!("the call did not go through: {r:?}"),
    }
}

async fn listen(args: &ClientArgs, a: &ListenArgs) -> Result<()> {
    let start = Instant::now();
    let audit = (a.audit_every > 0).then(|| Duration::from_secs(a.audit_every));
    let (mut device, mut state, _sound) =
        start_device(args, &a.media, audit, a.accept_unverified).await?;
    registered(&mut device, start).await?;
    say(start, format!("listening as {}", state.handle));
    if a.asleep {
        device.sleep().await?;
        say(start, "asleep: only the push link is open");
    }
    let mut ended = 0u32;
    // Calls that came with no PASSporT (from phones outside the directory).
    let mut unverified = std::collections::HashSet::new();
    let mut last: Option<CallStats> = None;
    // Answered calls to hang up, and when.
    let mut hang_up: Vec<(String, Instant)> = Vec::new();
    // One-to-one calls that became group calls: their end is not a call's.
    let mut upgraded = std::collections::HashSet::new();
    loop {
        let now = Instant::now();
        for (call, _) in hang_up.iter().filter(|(_, at)| now >= *at) {
            say(start, format!("hanging up after {} s", a.hangup_after));
            device.hangup(call).await?;
        }
        hang_up.retain(|(_, at)| now < *at);
        let ev = tokio::select! {
            ev = device.next_event(Duration::from_millis(200)) => ev,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let Some(ev) = ev else { continue };
        match &ev {
            DeviceEvent::Call(CallEvent::Stats { stats, .. }) => {
                last = Some((**stats).clone());
                continue;
            }
            DeviceEvent::Call(CallEvent::Incoming {
                call, device: None, ..
            }) => {
                unverified.insert(call.clone());
            }
            DeviceEvent::Call(
                CallEvent::IncomingGroup { call, .. } | CallEvent::Ringing { call },
            ) => {
                if unverified.remove(call) {
                    say(
                        start,
                        "ringing: a phone outside the key directory; encrypted, but NOT \
                         authenticated",
                    );
                } else {
                    say(start, describe(&ev));
                }
                if a.answer {
                    device.answer(call).await?;
                    say(start, "answered");
                    if a.hangup_after > 0 {
                        hang_up.push((call.clone(), now + Duration::from_secs(a.hangup_after)));
                    }
                }
                continue;
            }
            DeviceEvent::Call(CallEvent::Upgraded { from, to }) => {
                say(start, describe(&ev));
                upgraded.insert(from.clone());
                // The group call carries the hang-up time on.
                for (c, _) in hang_up.iter_mut().filter(|(c, _)| c == from) {
                    *c = to.clone();
                }
                continue;
            }
            DeviceEvent::Call(CallEvent::Ended { call, .. }) if upgraded.remove(call) => {
                say(start, describe(&ev));
                continue;
            }
            DeviceEvent::Call(CallEvent::JoinRequest { call, .. }) => {
                say(start, describe(&ev));
                if a.answer {
                    device.answer(call).await?;
                    say(start, "admitted");
                }
                continue;
            }
            DeviceEvent::Call(CallEvent::MediaConnected { call }) => {
                say(start, describe(&ev));
                // A group call: others may join by its link.
                if let Ok(link) = device.call_link(call).await {
                    say(start, format!("call link: {link}"));
                }
                continue;
            }
            DeviceEvent::Call(CallEvent::Ended { call, .. }) => {
                unverified.remove(call);
                group_summary(&device, call, start).await;
                say(start, describe(&ev));
                if let Some(s) = last.take() {
                    say(start, summary(&s));
                }
                ended += 1;
                let path = a.media.record.as_deref().map(|p| numbered(p, ended));
                record(&device, call, path.as_deref(), start).await?;
                if a.calls != 0 && ended >= a.calls {
                    return Ok(());
                }
                if a.asleep {
                    device.sleep().await?;
                    say(start, "asleep again");
                }
                continue;
            }
            DeviceEvent::CourierLost { retry_in: None } | DeviceEvent::Revoked => {
                bail!("{}", describe(&ev));
            }
            DeviceEvent::AccountKeyRotated(key) => {
                adopt(args, &mut state, key, start)?;
                continue;
            }
            _ => {}
        }
        say(start, describe(&ev));
    }
}

/// `out.wav` for the first call, `out-2.wav`, `out-3.wav`… after.
fn numbered(p: &Path, n: u32) -> PathBuf {
    if n <= 1 {
        return p.to_path_buf();
    }
    let stem = p
        .file_stem()
        .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
    let ext = p
        .extension()
        .map_or_else(String::new, |e| format!(".{}", e.to_string_lossy()));
    p.with_file_name(format!("{stem}-{n}{ext}"))
}

/// Reads a WAV file as 48 kHz mono samples: channels are averaged and
/// other rates resampled (linear interpolation).
pub fn read_wav(path: &Path) -> Result<Vec<i16>> {
    let mut r =
        hound::WavReader::open(path).with_context(|| format!("reading {}", path.display()))?;
    let spec = r.spec();
    let channels = usize::from(spec.channels.max(1));
    let samples: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Float => r.samples::<f32>().collect::<Result<_, _>>()?,
        hound::SampleFormat::Int => {
            let scale = 1.0 / (1u64 << (spec.bits_per_sample.clamp(1, 32) - 1)) as f32;
            r.samples::<i32>()
                .map(|s| s.map(|v| v as f32 * scale))
                .collect::<Result<_, _>>()?
        }
    };
    let mono: Vec<f32> = samples
        .chunks(channels)
        .map(|c| c.iter().sum::<f32>() / c.len() as f32)
        .collect();
    let out = resample(&mono, spec.sample_rate, SAMPLE_RATE);
    Ok(out
        .iter()
        .map(|s| (s * 32768.0).round().clamp(-32768.0, 32767.0) as i16)
        .collect())
}

/// Linear-interpolation resampling of mono samples from `from` Hz to `to`.
pub(crate) fn resample(x: &[f32], from: u32, to: u32) -> Vec<f32> {
    if from == to || x.is_empty() || from == 0 {
        return x.to_vec();
    }
    let n = (x.len() as u64 * u64::from(to) / u64::from(from)) as usize;
    let step = f64::from(from) / f64::from(to);
    (0..n)
        .map(|i| {
            let pos = i as f64 * step;
            let j = pos as usize;
            let frac = (pos - j as f64) as f32;
            let a = x[j.min(x.len() - 1)];
            let b = x[(j + 1).min(x.len() - 1)];
            a + (b - a) * frac
        })
        .collect()
}

/// Writes 48 kHz mono 16-bit samples as a WAV file.
pub fn write_wav(path: &Path, pcm: &[i16]) -> Result<()> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: SAMPLE_RATE,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec)
        .with_context(|| format!("writing {}", path.display()))?;
    for &s in pcm {
        w.write_sample(s)?;
    }
    w.finalize()?;
    Ok(())
}

/// `--turn-transport`.
fn turn_transport(s: &str) -> Result<client_sdk::turn::Transport, String> {
    use client_sdk::turn::Transport;
    match s {
        "udp" => Ok(Transport::Udp),
        "tcp" => Ok(Transport::Tcp),
        "tls" => Ok(Transport::Tls),
        _ => Err(format!("{s:?} is not udp, tcp or tls")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wav_round_trips_and_resamples_to_48k_mono() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.wav");
        let pcm: Vec<i16> = (0..4800)
            .map(|i| ((i % 100) * 300 - 15000) as i16)
            .collect();
        write_wav(&p, &pcm).unwrap();
        assert_eq!(read_wav(&p).unwrap(), pcm);
        // 16 kHz stereo: a third as many frames; both channels equal.
        let q = dir.path().join("b.wav");
        let spec = hound::WavSpec {
            channels: 2,
            sample_rate: 16_000,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut w = hound::WavWriter::create(&q, spec).unwrap();
        for _ in 0..1600 {
            w.write_sample(8192i16).unwrap();
            w.write_sample(8192i16).unwrap();
        }
        w.finalize().unwrap();
        let up = read_wav(&q).unwrap();
        assert_eq!(up.len(), 4800);
        assert!(up.iter().all(|&s| s == 8192), "{:?}", &up[..4]);
    }

    #[test]
    fn later_recordings_get_numbered_names() {
        assert_eq!(numbered(Path::new("x/out.wav"), 1), Path::new("x/out.wav"));
        assert_eq!(
            numbered(Path::new("x/out.wav"), 3),
            Path::new("x/out-3.wav")
        );
    }
}
