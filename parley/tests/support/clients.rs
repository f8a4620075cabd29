//! `parley client` processes as devices: commands against a stack, their
//! output, and the tones they play and record.

use client_sdk::media::audio::dominant_frequency;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_parley");

/// `parley client` with the state directory and the stack's addresses.
pub fn client(up: &parley_tests::up::Up, data: &Path, state: &Path) -> Command {
    client_via(up, data, state, &up.courier.to_string())
}

/// As [`client`], with SIP at `sip` (another node of a cluster).
pub fn client_sip_at(
    up: &parley_tests::up::Up,
    sip: std::net::SocketAddr,
    data: &Path,
    state: &Path,
) -> Command {
    client_to(up, data, state, &up.courier.to_string(), sip)
}

/// As [`client`], with `couriers` (comma-separated) for the push link.
pub fn client_via(up: &parley_tests::up::Up, data: &Path, state: &Path, couriers: &str) -> Command {
    client_to(up, data, state, couriers, up.sip_tls)
}

fn client_to(
    up: &parley_tests::up::Up,
    data: &Path,
    state: &Path,
    couriers: &str,
    sip: std::net::SocketAddr,
) -> Command {
    let mut c = Command::new(BIN);
    c.arg("client")
        .arg("--state")
        .arg(state)
        .arg("--ids")
        .arg(up.ids.to_string())
        .arg("--courier")
        .arg(couriers)
        .arg("--sip")
        .arg(sip.to_string())
        // The CA comes from `parley up`'s data directory.
        .arg("--data")
        .arg(data)
        .stdin(Stdio::null());
    c
}

/// Runs a client command to completion within `limit`; its output.
pub fn finish(mut child: Child, limit: Duration, what: &str) -> String {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(status.success(), "{what} failed ({status}):\n{text}");
            return text;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{what} did not finish within {limit:?}:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn run(mut c: Command, limit: Duration, what: &str) -> String {
    let child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    finish(child, limit, what)
}

/// Waits (bounded) for a line containing `needle`, among those `seen`
/// so far or arriving; returns it.
pub fn wait_line(
    rx: &std::sync::mpsc::Receiver<String>,
    needle: &str,
    seen: &mut Vec<String>,
) -> String {
    if let Some(l) = seen.iter().find(|l| l.contains(needle)) {
        return l.clone();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
            seen.push(l.clone());
            if l.contains(needle) {
                return l;
            }
        }
    }
    panic!("no line with {needle:?}; saw:\n{}", seen.join("\n"));
}

pub fn tone_wav(path: &Path, hz: f64, seconds: f64) {
    // 16 kHz stereo, so the client's conversion to 48 kHz mono is used.
    let spec = hound::WavSpec {
        channels: 2,
        sample_rate: 16_000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    for i in 0..(16_000.0 * seconds) as usize {
        let t = i as f64 / 16_000.0;
        let s = (0.3 * 32767.0 * (2.0 * std::f64::consts::PI * hz * t).sin()) as i16;
        w.write_sample(s).unwrap();
        w.write_sample(s).unwrap();
    }
    w.finalize().unwrap();
}

/// The dominant frequency of a 48 kHz recording's last 2 s (its first
/// channel), its share, and the recording's length in samples.
pub fn heard(path: &Path) -> (f64, f64, usize) {
    let mut wav = hound::WavReader::open(path).unwrap();
    let spec = wav.spec();
    assert_eq!(spec.sample_rate, 48_000, "{}", path.display());
    let pcm: Vec<i16> = wav
        .samples::<i16>()
        .map(Result::unwrap)
        .step_by(usize::from(spec.channels))
        .collect();
    let tail = &pcm[pcm.len().saturating_sub(96_000)..];
    let (f, share) = dominant_frequency(tail, (200..2000).step_by(20).map(f64::from));
    (f, share, pcm.len())
}

/// The share of a 48 kHz recording (its first channel, after its first
/// half second) at each of `freqs`, as the mean over 100 ms windows: a
/// mix of several streams shifts one stream's phase whenever its delay
/// moves by a frame, which a single long window would count against it.
pub fn shares(path: &Path, freqs: &[f64]) -> Vec<f64> {
    let mut wav = hound::WavReader::open(path).unwrap();
    let spec = wav.spec();
    let pcm: Vec<i16> = wav
        .samples::<i16>()
        .map(Result::unwrap)
        .step_by(usize::from(spec.channels))
        .collect();
    let body = &pcm[pcm.len().min(24_000)..];
    let windows: Vec<&[i16]> = body.chunks_exact(4_800).collect();
    freqs
        .iter()
        .map(|f| {
            let sum: f64 = windows
                .iter()
                .map(|w| client_sdk::media::audio::tone_share(w, *f))
                .sum();
            sum / windows.len().max(1) as f64
        })
        .collect()
}

/// A client command left running, with its output lines (stdout and
/// stderr, as they come).
pub fn spawn(mut c: Command) -> (Child, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let out: Box<dyn std::io::Read + Send> = Box::new(child.stdout.take().unwrap());
    let err: Box<dyn std::io::Read + Send> = Box::new(child.stderr.take().unwrap());
    for stream in [out, err] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stream)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    (child, rx)
}

/// Activates `handle` into `state` with the code from the outbox.
pub fn activate(up: &parley_tests::up::Up, data: &Path, state: &Path, handle: &str) {
    let mut c = client(up, data, state);
    c.args(["activate", "--handle", handle, "--outbox"])
        .arg(data.join("outbox"));
    let out = run(c, Duration::from_secs(60), "activate");
    assert!(out.contains("activated"), "{out}");
}

/// Joins a new device to `approver`'s account (as `approve` and `activate
/// --link` do, in two processes); returns the new device's id and the
/// approver's last line.
pub fn link_device(
    up: &parley_tests::up::Up,
    data: &Path,
    approver: &Path,
    state: &Path,
    handle: &str,
    name: &str,
) -> (String, String) {
    use std::io::Write;
    let limit = Duration::from_secs(60);
    let mut c = client(up, data, approver);
    c.args(["approve", "--wait", "60"]).stdin(Stdio::piped());
    let (mut approve, rx) = spawn(c);
    let mut seen = Vec::new();
    let code = wait_line(&rx, "link code: ", &mut seen)
        .split("link code: ")
        .nth(1)
        .unwrap()
        .trim()
        .to_string();
    let mut join = client(up, data, state);
    join.args([
        "activate", "--handle", handle, "--name", name, "--link", &code,
    ]);
    let (join, join_rx) = spawn(join);
    // The person reads the new device's fingerprint and types it on the
    // approving one.
    let mut join_seen = Vec::new();
    let fingerprint = wait_line(&join_rx, "link fingerprint: ", &mut join_seen)
        .split("link fingerprint: ")
        .nth(1)
        .unwrap()
        .split(" (")
        .next()
        .unwrap()
        .to_string();
    writeln!(approve.stdin.take().unwrap(), "{fingerprint}").unwrap();
    finish(join, limit, "activate --link");
    // Its remaining lines (the readers end with the process).
    while let Ok(l) = join_rx.recv_timeout(Duration::from_secs(5)) {
        join_seen.push(l);
    }
    finish(approve, limit, "approve");
    let approved = wait_line(&rx, "approved", &mut seen);
    let out = join_seen.join("\n");
    let id = out
        .split("as device ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no device id in {out}"))
        .to_string();
    (id, approved)
}
