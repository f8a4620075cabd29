//! `parley demo` end to end on real loopback sockets: the whole stack in
//! one process and three SDK devices; it exits 0 only if the call went
//! through (ringing on both of Bob's devices, the phone woken by push,
//! answered elsewhere), each side detected the other's tone and decoded
//! the other's H.264 test pattern, and the relay carried only STUN, DTLS
//! and SRTP.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_parley");

/// `parley demo` with `args`, which must pass: what it printed.
fn demo(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .arg("demo")
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("parley demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    stdout
}

#[test]
fn the_demo_call_goes_through_and_its_checks_hold() {
    let stdout = demo(&["--seconds", "2"]);
    for line in [
        "woken by a VoIP push",
        "call ended: AnsweredElsewhere",
        "media connected",
        "Alice heard 660 Hz",
        "the laptop heard 440 Hz",
        "0 other datagrams",
        "showed the test pattern, 0 not decodable",
        "demo: OK",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
    // The timeline has millisecond timestamps.
    assert!(stdout.lines().any(|l| l
        .trim_start()
        .split(' ')
        .next()
        .is_some_and(|t| t.contains('.'))));
}

/// `parley demo --group 4`: four people through the SFU, one woken by
/// push; each hears the other three and decodes their test patterns, and
/// what the SFU forwarded is SFrame ciphertext that plays as no tone.
#[test]
fn the_group_demo_goes_through_and_its_checks_hold() {
    let stdout = demo(&["--group", "4", "--seconds", "2"]);
    for line in [
        "dave    woken by a VoIP push",
        "incoming group call from alice@example.com",
        "answered and joins the group call",
        "each SFrame under a member's key; none plays as a member's tone, none decodes as H.264",
        "OK: 4 people heard and saw each other",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
}
