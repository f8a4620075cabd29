//! `parley demo --group N`: a group call of N people through the SFU.
//!
//! Alice rings the others into one call. The last of them is asleep with
//! only the push link and is woken by a VoIP push. Each answers; every
//! device joins the SFU and sends its sender key to every other one.
//! Each says a tone of its own (and shows the H.264 test pattern). The
//! demo exits 0 only if every device heard every other's tone in its mix
//! and none its own, decoded every other's test pattern, and every
//! payload the SFU forwarded is SFrame ciphertext under a member's key
//! that, played as Opus, is not its sender's tone, and decoded as H.264
//! gives no picture.

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use client_sdk::call::CallEvent;
use client_sdk::device::{first_device, Device, DeviceEvent};
use client_sdk::media::audio::{tone_share, AudioDecoder};
use client_sdk::media::video::{is_pattern, VideoDecoder};
use wire::handle::Handle;

use super::{device_config, has, pump, reach, until, DemoArgs, Dev, Reach, Timeline};
use crate::client::prove_from_outbox;
use crate::stack::Stack;
use crate::{config, data};

const NAMES: [&str; 8] = [
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi",
];

fn tone(i: usize) -> f64 {
    440.0 + 220.0 * i as f64
}

/// The share of `pcm` at `hz`, as the mean over 100 ms windows.
fn share(pcm: &[i16], hz: f64) -> f64 {
    let windows: Vec<&[i16]> = pcm.chunks_exact(4_800).collect();
    windows.iter().map(|w| tone_share(w, hz)).sum::<f64>() / windows.len().max(1) as f64
}

/// What is wrong with a payload the SFU forwarded in a call of `n`, if
/// anything: it is readable media (Opus that plays as one of the
/// members' tones, H.264 that decodes to a picture), or it is not SFrame
/// under a member's key id.
fn readable(is_audio: bool, payload: &[u8], n: usize) -> Result<Option<&'static str>> {
    if is_audio {
        // A member's own Opus frames play as its tone (a share near 1):
        // the SFU's copy must not.
        let mut pcm = Vec::new();
        let played = AudioDecoder::new()?
            .decode(Some(payload), false, &mut pcm)
            .is_ok();
        if played && (0..n).any(|i| tone_share(&pcm, tone(i)) > 0.5) {
            return Ok(Some("a forwarded payload plays as a member's tone"));
        }
    } else if let Ok(Some(_)) = VideoDecoder::new()?.decode(payload) {
        return Ok(Some("a forwarded payload decodes as H.264"));
    }
    let member = wire::sframe::Header::decode(payload)
        .ok()
        .map(|(h, _)| (h.kid >> 16) as usize)
        .filter(|i| (1..=n).contains(i));
    if member.is_none() {
        return Ok(Some(
            "the SFU forwarded a payload that is not a member's SFrame",
        ));
    }
    Ok(None)
}

#[allow(clippy::print_stdout)]
pub(super) async fn scenario(
    stack: &Stack,
    data: &data::DataDir,
    settings: &config::Settings,
    args: &DemoArgs,
    n: usize,
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
    let sfu = stack.sfu.as_ref().ok_or_else(|| anyhow!("no SFU"))?;
    t.note(
        "stack",
        format!(
            "up: ids https://{ids_addr}, courier {}, signaling tls {}, SFU media {} https://{}",
            courier.device_addr(),
            signaling.tls_addrs()[0],
            sfu.media,
            sfu.http
        ),
    );

    let names = &NAMES[..n];
    let handles: Vec<Handle> = names
        .iter()
        .map(|name| Handle::parse(&format!("{name}@example.com")))
        .collect::<Result<_, _>>()?;
    let mut devs = Vec::new();
    for (i, (name, handle)) in names.iter().zip(&handles).enumerate() {
        let (id, _, _) = first_device(
            &ids,
            prove_from_outbox(&ids, &outbox, handle).await?,
            handle,
            &format!("{name}'s phone"),
        )
        .await?;
        let mut config = device_config(name, handle, (signaling, courier, &roots), tone(i));
        config.keep_heard = Duration::from_secs(args.seconds.max(2) + 2);
        config.video = !args.no_video;
        let device = Device::start(config, id, ids.clone(), true).await?;
        devs.push(Dev {
            name,
            device,
            events: Vec::new(),
        });
        t.note(name, format!("activated; says {} Hz", tone(i)));
    }
    until(
        &mut devs,
        t,
        Duration::from_secs(20),
        "registrations",
        |d| {
            d.iter()
                .all(|x| has(d, x.name, |e| matches!(e, DeviceEvent::Registered)))
        },
    )
    .await?;
    // The last one sleeps: only its push link stays open.
    let sleeper = names[n - 1];
    devs[n - 1].device.sleep().await?;
    t.note(sleeper, "asleep: only the push link is open");
    // Let the new accounts reach a published epoch before the lookups.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let room = devs[0].device.group_call(&handles[1..]).await?;
    t.note(
        "alice",
        format!(
            "rings {} into a group call (every device's key verified)",
            names[1..].join(", ")
        ),
    );
    // Everyone answers as their call rings.
    let mut answered = vec![false; n];
    answered[0] = true;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while answered.iter().any(|a| !a) {
        if std::time::Instant::now() >= deadline {
            bail!("not everyone's group call rang within 30 s");
        }
        pump(&mut devs, t).await;
        for (i, d) in devs.iter().enumerate() {
            let rang = d.events.iter().any(|e| {
                matches!(e, DeviceEvent::Call(CallEvent::IncomingGroup { call, .. }) if *call == room)
            });
            if rang && !answered[i] {
                d.device.answer(&room).await?;
                answered[i] = true;
                t.note(d.name, "answers");
            }
        }
    }
    until(
        &mut devs,
        t,
        Duration::from_secs(20),
        "everyone's media",
        |d| {
            d.iter().all(|x| {
                has(d, x.name, |e| {
                    matches!(e, DeviceEvent::Call(CallEvent::MediaConnected { .. }))
                })
            })
        },
    )
    .await?;
    if !has(&devs, sleeper, |e| matches!(e, DeviceEvent::Woken { .. })) {
        bail!("{sleeper} was not woken by a push");
    }
    let talk = Duration::from_secs(args.seconds.max(2));
    t.note(
        "all",
        format!("in the room; talking for {} s", talk.as_secs()),
    );
    let until_at = std::time::Instant::now() + talk;
    until(
        &mut devs,
        t,
        talk + Duration::from_secs(1),
        "the talk",
        |_| std::time::Instant::now() >= until_at,
    )
    .await?;

    // What each heard and saw, before anyone leaves.
    let mut failures = Vec::new();
    println!();
    println!(
        "{:<7} heard (share of the mix per speaker)          saw (pictures)",
        ""
    );
    for (i, d) in devs.iter().enumerate() {
        let heard = d.device.heard(&room).await?;
        let tail = &heard[heard.len().saturating_sub(96_000)..];
        let stats = d
            .device
            .group_stats(&room)
            .await?
            .ok_or_else(|| anyhow!("{} has no group stats", d.name))?;
        let mut line = Vec::new();
        for (j, other) in names.iter().enumerate() {
            let s = share(tail, tone(j));
            if i == j {
                if s > 0.02 {
                    failures.push(format!("{} heard itself ({s:.2})", d.name));
                }
                continue;
            }
            line.push(format!("{other} {s:.2}"));
            if s < 0.5 / (n - 1) as f64 {
                // How its frames fared says whether they were lost, late
                // or never sent.
                let j = stats.heard.get(&(j as u16 + 1)).map(|h| h.jitter);
                let fared = j.map_or("none arrived".into(), |j| {
                    format!(
                        "{} frames arrived, {} of {} played concealed, {} late",
                        j.received, j.concealed, j.played, j.late
                    )
                });
                failures.push(format!(
                    "{} heard {other} faintly ({s:.2}): {fared}",
                    d.name
                ));
            }
            if !args.no_video {
                let seen = stats.seen.get(&(j as u16 + 1)).copied().unwrap_or_default();
                match seen.last {
                    Some(p) if is_pattern(&p.quadrants) && seen.pictures >= 5 => {}
                    _ => failures.push(format!(
                        "{} saw {} pictures of {other}, the last {:?}",
                        d.name, seen.pictures, seen.last
                    )),
                }
            }
        }
        let seen: Vec<String> = stats
            .seen
            .iter()
            .map(|(k, s)| format!("{}:{}", NAMES[usize::from(*k) - 1], s.pictures))
            .collect();
        println!("{:<7} {:<46} {}", d.name, line.join(", "), seen.join(" "));
        // Frames that came before their sender's key (a woken device's
        // keys come once it is back): a few, never many.
        let heard_frames: u64 = stats.heard.values().map(|h| h.frames).sum();
        if stats.undecryptable > 20.max(heard_frames / 10) {
            failures.push(format!(
                "{}: {} frames did not decrypt",
                d.name, stats.undecryptable
            ));
        }
    }

    // What the SFU forwarded: SFrame under a member's key, and nothing
    // that plays as any of the tones or shows a picture.
    let samples = sfu.metrics.sampled();
    let audio = samples.iter().filter(|(a, _)| *a).count();
    for (is_audio, payload) in &samples {
        if let Some(f) = readable(*is_audio, payload, n)? {
            failures.push(f.into());
        }
    }
    if samples.is_empty() {
        failures.push("the SFU forwarded nothing".into());
    }
    println!();
    println!(
        "SFU: {} payloads sampled ({audio} audio), each SFrame under a member's key; none plays as a member's tone, none decodes as H.264",
        samples.len()
    );
    let mut m = String::new();
    sfu.metrics.render(&mut m);
    for l in m.lines().filter(|l| !l.starts_with('#')) {
        println!("SFU: {l}");
    }

    for d in &devs {
        d.device.hangup(&room).await?;
    }
    until(
        &mut devs,
        t,
        Duration::from_secs(10),
        "everyone leaving",
        |d| {
            d.iter().all(|x| {
                has(d, x.name, |e| {
                    matches!(e, DeviceEvent::Call(CallEvent::Ended { .. }))
                })
            })
        },
    )
    .await?;
    if failures.is_empty() {
        println!("\nOK: {n} people heard and saw each other, end to end encrypted through the SFU");
        Ok(())
    } else {
        bail!("the group call fell short:\n  {}", failures.join("\n  "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use client_sdk::media::audio::{AudioEncoder, Tone};
    use client_sdk::media::video::{TestPattern, VideoEncoder};
    use wire::sframe::{CipherSuite, Key, Sender};

    /// Bob's (member 2) key id, as the SDK forms it: index above 16 bits.
    fn sealer() -> Sender {
        Sender::new(Key::derive(CipherSuite::Aes128GcmSha256, 2 << 16, b"bob").unwrap())
    }

    /// The check has teeth: Bob's own Opus frame and H.264 key frame in
    /// the clear are caught as what they are; sealed, they pass.
    #[test]
    fn readable_media_is_caught_and_ciphertext_passes() {
        let mut tx = sealer();
        let mut say = Tone::new(tone(1), 0.3);
        let mut enc = AudioEncoder::new(Default::default()).unwrap();
        let mut opus = Vec::new();
        for _ in 0..5 {
            if let Some(f) = enc.encode(&say.next_frame()).unwrap() {
                opus = f;
            }
        }
        let sealed = tx.encrypt(b"", &opus).unwrap();
        assert_eq!(readable(true, &sealed, 4).unwrap(), None);
        assert_eq!(
            readable(true, &opus, 4).unwrap(),
            Some("a forwarded payload plays as a member's tone")
        );

        let mut video = VideoEncoder::new(300_000).unwrap();
        let key = video.encode(&TestPattern::default().next_frame()).unwrap();
        let sealed = tx.encrypt(b"", &key).unwrap();
        assert_eq!(readable(false, &sealed, 4).unwrap(), None);
        assert_eq!(
            readable(false, &key, 4).unwrap(),
            Some("a forwarded payload decodes as H.264")
        );
    }
}
