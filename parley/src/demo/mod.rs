//! `parley demo`: the whole stack in this process on free loopback ports
//! with a temporary data directory, three devices on the client SDK, and
//! one call, printed as a timeline and checked.
//!
//! Alice has one device. Bob has a laptop (online) and a phone that is
//! asleep: it registered once with its push token and closed its SIP
//! connection, keeping only the courier link. Alice calls Bob; both of
//! Bob's devices ring (the phone woken by a VoIP push); the laptop
//! answers and the phone hears "answered elsewhere"; a tone flows each way
//! and an H.264 test pattern flow each way through the relay only, end to
//! end encrypted; then Alice hangs up. The demo exits 0 only if each side
//! detected the other's tone and decoded the other's test pattern, and
//! the relay was handed nothing but STUN, DTLS and SRTP.
//!
//! `--group N` shows a group call instead ([`group`]).

mod group;
#[cfg(test)]
mod strangers;

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::client::{describe, prove_from_outbox};
use anyhow::{anyhow, bail, Result};
use client_sdk::call::{CallEvent, EndReason};
use client_sdk::device::first_device;
use client_sdk::device::{AudioSource, Device, DeviceConfig, DeviceEvent, Identity};
use client_sdk::ids::IdsClient;
use client_sdk::media::audio::dominant_frequency;
use toml::Value;
use wire::handle::Handle;
use wire::keys::{DeviceId, SigningKey};

use crate::stack::Stack;
use crate::{config, data};

const ALICE: &str = "alice@example.com";
const BOB: &str = "+14155550123";
const ALICE_HZ: f64 = 440.0;
const BOB_HZ: f64 = 660.0;
const TOPIC: &str = "com.example.parley.voip";

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Seconds of audio once the call is answered.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Keep the temporary data directory (its path is printed).
    #[arg(long)]
    keep: bool,
    /// After the shown call, place this many more (quietly) and report
    /// dial → first audio at the callee and push-wake → ringing (p50/p95)
    /// and the process's CPU during calls; for bench/call.sh.
    #[arg(long, default_value_t = 0)]
    calls: u32,
    /// Audio only.
    #[arg(long)]
    no_video: bool,
    /// A group call of this many people (3 to 8) through the SFU instead:
    /// one of them asleep and woken by push, each hearing the others'
    /// tones and decoding their test patterns, end to end encrypted.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(3..=8))]
    group: Option<u8>,
}

pub fn run(args: DemoArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let dir = std::env::temp_dir().join(format!("parley-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let result = rt.block_on(demo(&dir, &args));
    if !args.keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

/// The timeline: milliseconds since the start, who, what.
struct Timeline {
    start: Instant,
    lines: Vec<(Duration, String, String)>,
    quiet: bool,
}

impl Timeline {
    #[allow(clippy::print_stdout)]
    fn note(&mut self, who: &str, what: impl Into<String>) {
        let at = self.start.elapsed();
        let what = what.into();
        if !self.quiet {
            println!("{:>8.1} ms  {who:<7} {what}", at.as_secs_f64() * 1000.0);
        }
        self.lines.push((at, who.to_string(), what));
    }

    /// When `who` last noted something starting with `what`.
    fn last(&self, who: &str, what: &str) -> Option<Duration> {
        self.lines
            .iter()
            .rev()
            .find(|(_, w, x)| w == who && x.starts_with(what))
            .map(|(t, _, _)| *t)
    }
}

/// This process's CPU time so far (user + system, all threads), from
/// /proc/self/stat in clock ticks of 10 ms (Linux's USER_HZ).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are
    // the 14th and 15th of the whole line.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

struct Dev {
    name: &'static str,
    device: Device,
    events: Vec<DeviceEvent>,
}

/// Waits (bounded) until `done` holds, recording every device event.
async fn until(
    devs: &mut [Dev],
    t: &mut Timeline,
    max: Duration,
    what: &str,
    done: impl Fn(&[Dev]) -> bool,
) -> Result<()> {
    let deadline = Instant::now() + max;
    while !done(devs) {
        if Instant::now() >= deadline {
            let seen: Vec<String> = devs
                .iter()
                .map(|d| {
                    let evs: Vec<String> = d
                        .events
                        .iter()
                        .filter(|e| !matches!(e, DeviceEvent::Call(CallEvent::Stats { .. })))
                        .map(describe)
                        .collect();
                    format!("{}: [{}]", d.name, evs.join("; "))
                })
                .collect();
            bail!(
                "timed out after {max:?} waiting for {what}; events: {}",
                seen.join(" | ")
            );
        }
        pump(devs, t).await;
    }
    Ok(())
}

/// Records every device event that has come, noting it.
async fn pump(devs: &mut [Dev], t: &mut Timeline) {
    for d in devs.iter_mut() {
        while let Some(e) = d.device.next_event(Duration::from_millis(2)).await {
            match &e {
                DeviceEvent::Call(CallEvent::Stats { .. }) => {}
                other => t.note(d.name, describe(other)),
            }
            d.events.push(e);
        }
    }
}

fn has(devs: &[Dev], name: &str, f: impl Fn(&DeviceEvent) -> bool) -> bool {
    devs.iter()
        .find(|d| d.name == name)
        .is_some_and(|d| d.events.iter().any(f))
}

fn dev<'a>(devs: &'a [Dev], name: &str) -> &'a Device {
    &devs
        .iter()
        .find(|d| d.name == name)
        .expect("known device")
        .device
}

#[allow(clippy::print_stdout)]
async fn demo(dir: &Path, args: &DemoArgs) -> Result<()> {
    let mut t = Timeline {
        start: Instant::now(),
        lines: Vec::new(),
        quiet: false,
    };
    // A one-to-one call needs no SFU.
    let (stack, data, settings) = start_stack(dir, args.group.is_some()).await?;
    let result = match args.group {
        Some(n) => group::scenario(&stack, &data, &settings, args, usize::from(n), &mut t).await,
        None => scenario(&stack, &data, &settings, args, &mut t).await,
    };
    stack.shutdown().await?;
    if args.keep {
        println!("data directory kept: {}", dir.display());
    }
    result
}

/// Every service (the SFU if `sfu`) on free loopback ports with its data
/// in `dir`.
async fn start_stack(dir: &Path, sfu: bool) -> Result<(Stack, data::DataDir, config::Settings)> {
    let any = Value::String("127.0.0.1:0".into());
    let overrides: Vec<(String, Value)> = vec![
        ("turn.listen".into(), any.clone()),
        ("turn.tls".into(), any.clone()),
        // The relay's peers are the other device's relayed addresses, on
        // loopback here.
        (
            "turn.allow_peers".into(),
            Value::Array(vec![Value::String("127.0.0.0/8".into())]),
        ),
        ("ids.listen".into(), any.clone()),
        ("ids.publish_interval_secs".into(), Value::Float(0.05)),
        ("courier.device_listen".into(), any.clone()),
        ("courier.provider_listen".into(), any.clone()),
        ("courier.quic".into(), Value::Boolean(false)),
        ("signaling.listen".into(), any.clone()),
        ("signaling.tls".into(), any.clone()),
        ("signaling.wss".into(), any.clone()),
        ("sfu.listen".into(), any.clone()),
        ("sfu.api_listen".into(), any.clone()),
        (
            "signaling.domains".into(),
            Value::Array(vec![Value::String("localhost".into())]),
        ),
    ];
    let settings = config::load(None, std::iter::empty(), &overrides)?;
    let data = data::open(dir)?;
    let turn_config = settings.turn.to_config(&data.turn_secret)?;
    let mut ids_config = settings.ids.to_config(&data.root)?;
    ids_config.turn.secret = Some(data.turn_secret.clone());
    let courier_config = settings.courier.to_config(&data.root)?;
    let mut signaling_config = settings.signaling.to_config()?;
    settings.signaling.advertise(&mut signaling_config);
    let (cert, key) = crate::stack::tls_files(&settings.turn, &data);
    let tls = crate::tls::server_config(&cert, &key, &[crate::ALPN_STUN_TURN])?;
    let services = crate::Services {
        turn: true,
        ids: true,
        courier: true,
        signaling: true,
        sfu,
    };
    // Signaling makes the room tokens the SFU checks: one secret.
    let secret = crate::data::sip_secret(&data.sip_secret)?;
    signaling_config.secret = Some(secret);
    let sfu_config = crate::stack::sfu_config(&settings, &data, secret)?;
    let stack = Stack::start(
        &settings,
        &data,
        services,
        (
            turn_config,
            ids_config,
            courier_config,
            signaling_config,
            sfu_config,
        ),
        tls,
    )
    .await?;
    Ok((stack, data, settings))
}

/// A device on this stack, saying `hz` (audio only, directly to its
/// peers, keeping 4 s of what it heard).
fn device_config(
    name: &str,
    handle: &Handle,
    (signaling, courier, roots): (
        &signaling::runtime::Server,
        &push_courier::runtime::Server,
        &rustls::RootCertStore,
    ),
    hz: f64,
) -> DeviceConfig {
    DeviceConfig {
        name: name.into(),
        handle: handle.clone(),
        sip_domain: "localhost".into(),
        sip: signaling.tls_addrs()[0],
        courier: courier.device_addr(),
        courier_fallbacks: Vec::new(),
        courier_transport: client_sdk::courier::Transport::Tls,
        server_name: "localhost".into(),
        roots: roots.clone(),
        voip_topic: TOPIC.into(),
        media_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        relay_only: false,
        turn_transport: None,
        microphone: AudioSource::Tone(hz),
        speaker: None,
        keep_heard: Duration::from_secs(4),
        video: false,
        audit: None,
        accept_unverified: false,
    }
}

/// How a scenario reaches the stack: its services, and a client of ids
/// trusting the data directory's CA.
struct Reach<'a> {
    ids_addr: std::net::SocketAddr,
    courier: &'a push_courier::runtime::Server,
    signaling: &'a signaling::runtime::Server,
    roots: rustls::RootCertStore,
    ids: IdsClient,
    /// Where the development sender writes verification codes.
    outbox: std::path::PathBuf,
}

fn reach<'a>(
    stack: &'a Stack,
    data: &data::DataDir,
    settings: &config::Settings,
) -> Result<Reach<'a>> {
    let ids_addr = stack.ids.as_ref().ok_or_else(|| anyhow!("no ids"))?.addr();
    let courier = stack
        .courier
        .as_ref()
        .ok_or_else(|| anyhow!("no courier"))?;
    let signaling = stack
        .signaling
        .as_ref()
        .ok_or_else(|| anyhow!("no signaling"))?;
    let ca = std::fs::read_to_string(&data.ca_cert)?;
    let mut roots = rustls::RootCertStore::empty();
    for c in client_sdk::ids::pem_certs(&ca)? {
        roots.add(c)?;
    }
    let ids = IdsClient::new(ids_addr, "localhost", roots.clone())?;
    let outbox = settings
        .ids
        .outbox
        .clone()
        .unwrap_or_else(|| data.root.join("outbox"));
    Ok(Reach {
        ids_addr,
        courier,
        signaling,
        roots,
        ids,
        outbox,
    })
}

#[allow(clippy::print_stdout)]
async fn scenario(
    stack: &Stack,
    data: &data::DataDir,
    settings: &config::Settings,
    args: &DemoArgs,
    t: &mut Timeline,
) -> Result<()> {
    let Reach {
        ids_addr,
        courier,
        signaling,
        roots,
        ids,
        outbox,
    } = reach(stack, data, settings)?;
    let relay = stack.relay.as_ref().ok_or_else(|| anyhow!("no relay"))?;
    t.note(
        "stack",
        format!(
            "up: relay udp {}, ids https://{ids_addr}, courier {}, signaling tls {}",
            relay.udp_addrs()[0],
            courier.device_addr(),
            signaling.tls_addrs()[0]
        ),
    );
    // Activation.
    let alice_h = Handle::parse(ALICE)?;
    let bob_h = Handle::parse(BOB)?;
    let (alice_id, _, _) = first_device(
        &ids,
        prove_from_outbox(&ids, &outbox, &alice_h).await?,
        &alice_h,
        "Alice's phone",
    )
    .await?;
    t.note(
        "alice",
        "activated: handle proven, account created, certificate issued",
    );
    let (laptop_id, bob_account, bob_list) = first_device(
        &ids,
        prove_from_outbox(&ids, &outbox, &bob_h).await?,
        &bob_h,
        "Bob's laptop",
    )
    .await?;
    t.note("laptop", "activated: Bob's first device");
    // Bob's phone joins his account, approved by the laptop.
    let phone_key = SigningKey::generate();
    let phone_device = DeviceId::random();
    let transfer = wire::key_transfer::TransferKey::generate();
    let code = ids.create_link(&laptop_id.key).await?;
    // The phone shows its link fingerprint; Bob types it on the laptop.
    let shown = ids
        .claim_link(&code, phone_device, &phone_key, &transfer, "Bob's phone")
        .await?;
    let claim = ids
        .pending_claims(&laptop_id.key)
        .await?
        .into_iter()
        .find(|c| c.device == phone_device)
        .ok_or_else(|| anyhow!("the phone's claim did not reach the laptop"))?;
    ids.approve(
        &laptop_id.key,
        &bob_account,
        &bob_list,
        &claim,
        &code,
        &shown,
    )
    .await?;
    let (phone_reg, phone_account) = ids
        .await_approval(&code, &phone_key, transfer, Duration::from_secs(10))
        .await?;
    if phone_account.public() != bob_account.public() {
        bail!("the phone did not receive Bob's account key");
    }
    let mut phone_ids = ids.clone();
    phone_ids
        .verify_joined(
            &phone_key,
            &bob_h,
            &phone_account,
            phone_reg.device_id,
            Duration::from_secs(10),
        )
        .await?;
    let phone_id = Identity {
        device: phone_reg.device_id,
        key: phone_key,
        certificate: phone_reg.certificate,
    };
    t.note(
        "phone",
        "activated: approved by the laptop with a link code",
    );

    let cfg = |name: &str, handle: &Handle, hz: f64| DeviceConfig {
        relay_only: true,
        turn_transport: None,
        keep_heard: Duration::from_secs(10),
        video: !args.no_video,
        ..device_config(name, handle, (signaling, courier, &roots), hz)
    };
    let alice = Device::start(
        cfg("alice", &alice_h, ALICE_HZ),
        alice_id,
        ids.clone(),
        true,
    )
    .await?;
    let laptop = Device::start(cfg("laptop", &bob_h, BOB_HZ), laptop_id, ids.clone(), true).await?;
    let phone = Device::start(cfg("phone", &bob_h, BOB_HZ), phone_id, ids.clone(), true).await?;
    let mut devs = vec![
        Dev {
            name: "alice",
            device: alice,
            events: Vec::new(),
        },
        Dev {
            name: "laptop",
            device: laptop,
            events: Vec::new(),
        },
        Dev {
            name: "phone",
            device: phone,
            events: Vec::new(),
        },
    ];
    until(
        &mut devs,
        t,
        Duration::from_secs(10),
        "every device registered",
        |d| {
            d.iter()
                .all(|x| x.events.contains(&DeviceEvent::Registered))
        },
    )
    .await?;
    dev(&devs, "phone").sleep().await?;
    t.note("phone", "asleep: SIP connection closed, courier link kept");
    // Let the last device list change reach a published epoch.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The call.
    let dialed = Instant::now();
    let call = dev(&devs, "alice").dial(&bob_h).await?;
    t.note(
        "alice",
        format!("dials {BOB} (lookup verified: Bob's devices and keys)"),
    );
    let ringing = |name: &'static str| {
        move |d: &[Dev]| {
            has(d, name, |e| {
                matches!(e, DeviceEvent::Call(CallEvent::Ringing { .. }))
            })
        }
    };
    until(
        &mut devs,
        t,
        Duration::from_secs(15),
        "both of Bob's devices ringing",
        |d| ringing("laptop")(d) && ringing("phone")(d),
    )
    .await?;
    dev(&devs, "laptop").answer(&call).await?;
    t.note("laptop", "answers");
    until(
        &mut devs,
        t,
        Duration::from_secs(10),
        "the answer and media",
        |d| {
            has(d, "alice", |e| {
                matches!(e, DeviceEvent::Call(CallEvent::MediaConnected { .. }))
            }) && has(d, "laptop", |e| {
                matches!(e, DeviceEvent::Call(CallEvent::MediaConnected { .. }))
            }) && has(d, "phone", |e| {
                matches!(
                    e,
                    DeviceEvent::Call(CallEvent::Ended {
                        reason: EndReason::AnsweredElsewhere,
                        ..
                    })
                )
            })
        },
    )
    .await?;
    let connected = dialed.elapsed();
    t.note(
        "demo",
        format!("{} s of audio and video each way", args.seconds),
    );
    let talk = Duration::from_secs(args.seconds);
    let _ = until(&mut devs, t, talk, "the talk", |_| false).await;

    let alice_heard = dev(&devs, "alice").heard(&call).await?;
    let laptop_heard = dev(&devs, "laptop").heard(&call).await?;
    let alice_stats = dev(&devs, "alice").stats(&call).await?;
    let laptop_stats = dev(&devs, "laptop").stats(&call).await?;
    dev(&devs, "alice").hangup(&call).await?;
    until(&mut devs, t, Duration::from_secs(5), "the hang-up", |d| {
        has(d, "laptop", |e| {
            matches!(e, DeviceEvent::Call(CallEvent::Ended { .. }))
        })
    })
    .await?;

    // Checks.
    let freq = |pcm: &[i16]| {
        let tail = &pcm[pcm.len().saturating_sub(48_000 * 3)..];
        dominant_frequency(tail, (200..2000).step_by(20).map(f64::from))
    };
    let (fa, sa) = freq(&alice_heard);
    let (fl, sl) = freq(&laptop_heard);
    println!();
    println!("dial → media connected: {} ms", connected.as_millis());
    println!(
        "Alice heard {fa:.0} Hz ({:.0}% of the energy); expected {BOB_HZ:.0} Hz",
        sa * 100.0
    );
    println!(
        "the laptop heard {fl:.0} Hz ({:.0}% of the energy); expected {ALICE_HZ:.0} Hz",
        sl * 100.0
    );
    let mut ok = fa == BOB_HZ && fl == ALICE_HZ;
    for (who, s) in [("alice", &alice_stats), ("laptop", &laptop_stats)] {
        let Some(s) = s else {
            println!("{who}: no stats");
            ok = false;
            continue;
        };
        println!(
            "{who}: setup {:?}, first audio {:?}, rtt {:?}, loss in {:.1}%, jitter {:.1} ms, \
             bitrate out {} bps in {} bps, playout delay {:?}, concealed {:.1}%, MOS {:.2}",
            s.setup,
            s.first_audio,
            s.rtt,
            s.loss_in * 100.0,
            s.jitter_ms,
            s.bitrate_out,
            s.bitrate_in,
            s.playout_delay,
            s.concealed * 100.0,
            s.mos
        );
        let v = s.video;
        println!(
            "{who}: video sent {} frames, decoded {} ({} showed the test pattern, {} not decodable), last {:?}",
            v.frames_sent,
            v.frames_decoded,
            v.pattern_frames,
            v.decode_errors,
            v.last.map(|p| (p.width, p.height))
        );
        // About 15 frames/s, nearly all decoded to the pattern.
        let expected = args.seconds * 15 / 2;
        if !args.no_video
            && (v.frames_decoded < expected || v.pattern_frames + 3 < v.frames_decoded)
        {
            ok = false;
        }
        let r = s.relay_payloads;
        println!(
            "{who}: handed the relay {} STUN, {} DTLS, {} SRTP/SRTCP, {} other datagrams",
            r.stun, r.dtls, r.srtp, r.other
        );
        if r.other != 0 || r.srtp < 50 {
            ok = false;
        }
    }
    if !ok {
        bail!("the demo's checks failed (see above)");
    }
    if args.calls > 0 {
        bench(&mut devs, t, &bob_h, args).await?;
    }
    println!("demo: OK");
    Ok(())
}

/// More calls, quietly, measured: dial → first audio at the callee,
/// push-wake → ringing on the sleeping phone, and CPU while talking.
#[allow(clippy::print_stdout)]
async fn bench(devs: &mut [Dev], t: &mut Timeline, bob_h: &Handle, args: &DemoArgs) -> Result<()> {
    t.quiet = true;
    // Idle baseline: registered devices, no call.
    let (c0, w0) = (cpu_time(), Instant::now());
    let _ = until(devs, t, Duration::from_secs(2), "idle", |_| false).await;
    let idle = (cpu_time() - c0).as_secs_f64() / w0.elapsed().as_secs_f64();
    let (mut first_audio, mut wake, mut busy) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..args.calls {
        for d in devs.iter_mut() {
            d.events.clear();
        }
        dev(devs, "phone").sleep().await?;
        let dialed = Instant::now();
        let call = dev(devs, "alice").dial(bob_h).await?;
        let ringing = |name: &'static str| {
            move |d: &[Dev]| {
                has(d, name, |e| {
                    matches!(e, DeviceEvent::Call(CallEvent::Ringing { .. }))
                })
            }
        };
        until(devs, t, Duration::from_secs(15), "both ringing", |d| {
            ringing("laptop")(d) && ringing("phone")(d)
        })
        .await?;
        if let (Some(w), Some(r)) = (t.last("phone", "woken"), t.last("phone", "ringing")) {
            wake.push(r.saturating_sub(w).as_secs_f64() * 1000.0);
        }
        dev(devs, "laptop").answer(&call).await?;
        // The first audio the laptop plays.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let heard = dev(devs, "laptop").heard(&call).await?;
            if heard.iter().any(|x| x.unsigned_abs() > 1000) {
                first_audio.push(dialed.elapsed().as_secs_f64() * 1000.0);
                break;
            }
            if Instant::now() >= deadline {
                bail!("call {i}: no audio at the laptop");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let (c, w) = (cpu_time(), Instant::now());
        let _ = until(devs, t, Duration::from_secs(args.seconds), "talk", |_| {
            false
        })
        .await;
        busy.push((cpu_time() - c).as_secs_f64() / w.elapsed().as_secs_f64());
        dev(devs, "alice").hangup(&call).await?;
        until(devs, t, Duration::from_secs(5), "hang-up", |d| {
            has(d, "laptop", |e| {
                matches!(e, DeviceEvent::Call(CallEvent::Ended { .. }))
            })
        })
        .await?;
    }
    let n = first_audio.len();
    let (fa50, fa95) = (
        percentile(&mut first_audio, 0.5),
        percentile(&mut first_audio, 0.95),
    );
    let (w50, w95) = (percentile(&mut wake, 0.5), percentile(&mut wake, 0.95));
    let b50 = percentile(&mut busy, 0.5);
    println!();
    println!(
        "bench: {n} calls ({}), {} s each",
        if args.no_video {
            "audio"
        } else {
            "audio + video"
        },
        args.seconds
    );
    println!("bench: dial → first audio at the callee: p50 {fa50:.0} ms, p95 {fa95:.0} ms");
    println!("bench: push wake → ringing: p50 {w50:.0} ms, p95 {w95:.0} ms");
    println!(
        "bench: CPU of the whole process (services, relay, three devices): idle {:.1}%, in a call {:.1}% of one core (median); the call costs {:.1}%",
        idle * 100.0,
        b50 * 100.0,
        (b50 - idle) * 100.0
    );
    Ok(())
}
