//! A real-socket call on loopback through `parley up`, with `parley client`
//! processes as the devices: Alice and Bob activate (Bob's second device
//! is approved by his first with a link code), Bob listens and answers,
//! Alice calls him with a WAV file as her microphone, and each side's
//! recording holds the other's tone. And interop: the client calls a
//! baresip phone (a digest account at signaling, outside the key
//! directory) and each side hears the other.

use std::path::Path;
use std::process::Child;
use std::time::Duration;

mod support;
use support::clients::{
    activate, client, client_via, finish, heard, link_device, run, shares, spawn, tone_wav,
    wait_line,
};

const BIN: &str = env!("CARGO_BIN_EXE_parley");
const ALICE: &str = "alice@example.com";
const BOB: &str = "+14155550123";

/// `parley up` in a temporary directory; (dir, data directory, stack).
fn stack() -> Stack {
    let dir = tempfile::tempdir().unwrap();
    let (data, up) = parley_tests::up::start_lab(BIN, dir.path());
    (dir, data, up)
}

/// Alice and Bob activated, Bob listening (answering one call with a
/// 660 Hz tone): Alice's state directory, Bob's client and its lines.
fn bob_listens(
    up: &parley_tests::up::Up,
    data: &Path,
    dir: &Path,
) -> (
    std::path::PathBuf,
    Child,
    std::sync::mpsc::Receiver<String>,
    Vec<String>,
) {
    let (alice, bob) = (dir.join("alice"), dir.join("bob"));
    activate(up, data, &alice, ALICE);
    activate(up, data, &bob, BOB);
    let mut c = client(up, data, &bob);
    c.args(["listen", "--answer", "--calls", "1", "--tone", "660"]);
    let (listen, rx) = spawn(c);
    let mut seen = Vec::new();
    wait_line(&rx, "listening as", &mut seen);
    (alice, listen, rx, seen)
}

#[test]
fn two_desktop_clients_call_each_other_through_parley_up() {
    let (dir, data, up) = stack();
    let (alice, bob, bob2) = (
        dir.path().join("alice"),
        dir.path().join("bob"),
        dir.path().join("bob-phone"),
    );
    let limit = Duration::from_secs(60);
    activate(&up, &data, &alice, ALICE);
    activate(&up, &data, &bob, BOB);
    // A second activation into the same state is refused.
    let mut again = client(&up, &data, &alice);
    again.args(["activate", "--handle", ALICE, "--code", "000000"]);
    let out = again.output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds a device"));

    // Bob's phone joins his account with a link code his laptop approves.
    let (_, approved) = link_device(&up, &data, &bob, &bob2, BOB, "phone");
    assert!(approved.contains("2 devices"), "{approved}");

    // Bob's laptop takes one call, speaking 660 Hz; Alice speaks 440 Hz
    // from a WAV file, relay only, reaching the relay over TCP (as on a
    // network that blocks UDP).
    let (alice_wav, alice_rec, bob_rec) = (
        dir.path().join("alice-says.wav"),
        dir.path().join("alice-heard.wav"),
        dir.path().join("bob-heard.wav"),
    );
    tone_wav(&alice_wav, 440.0, 10.0);
    // Bob's push link runs over QUIC, Alice's over TLS.
    let mut c = client(&up, &data, &bob);
    c.args([
        "--quic", "listen", "--answer", "--calls", "1", "--tone", "660", "--record",
    ])
    .arg(&bob_rec);
    let (listen, listen_out) = spawn(c);
    let mut bob_seen = Vec::new();
    wait_line(&listen_out, "listening as", &mut bob_seen);
    let mut call = client(&up, &data, &alice);
    call.args([
        "call",
        BOB,
        "--seconds",
        "3",
        "--relay-only",
        "--turn-transport",
        "tcp",
        "--play",
    ])
    .arg(&alice_wav)
    .arg("--record")
    .arg(&alice_rec);
    let out = run(call, limit, "call");
    assert!(out.contains("media connected"), "{out}");
    assert!(out.contains("MOS"), "{out}");
    finish(listen, limit, "listen");
    for l in listen_out.try_iter() {
        bob_seen.push(l);
    }
    let bob_text = bob_seen.join("\n");
    assert!(bob_text.contains("ringing"), "{bob_text}");
    assert!(bob_text.contains("answered"), "{bob_text}");

    let (f, share, n) = heard(&bob_rec);
    assert!(n >= 48_000 * 2, "Bob recorded {n} samples");
    assert_eq!(f, 440.0, "Bob heard {f} Hz ({share:.2} of the energy)");
    let (f, share, n) = heard(&alice_rec);
    assert!(n >= 48_000 * 2, "Alice recorded {n} samples");
    assert_eq!(f, 660.0, "Alice heard {f} Hz ({share:.2} of the energy)");
}

#[test]
fn a_listening_client_rides_out_a_restart_of_the_services() {
    let (dir, data, up) = stack();
    let limit = Duration::from_secs(60);
    let (alice, listen, rx, mut seen) = bob_listens(&up, &data, dir.path());

    // The stack dies without a goodbye and comes back: Bob's client
    // reconnects its push link and registers again by itself.
    let up = up.restart();
    wait_line(&rx, "push link lost; reconnecting", &mut seen);
    wait_line(&rx, "push link back", &mut seen);
    wait_line(&rx, "SIP registered", &mut seen);

    let mut call = client(&up, &data, &alice);
    call.args(["call", BOB, "--seconds", "1", "--tone", "440"]);
    let out = run(call, limit, "call after the restart");
    assert!(out.contains("media connected"), "{out}");
    finish(listen, limit, "listen");
}

#[test]
fn a_listening_client_warns_of_a_device_another_one_approved() {
    let (dir, data, up) = stack();
    let (laptop, phone, tablet) = (
        dir.path().join("laptop"),
        dir.path().join("phone"),
        dir.path().join("tablet"),
    );
    activate(&up, &data, &laptop, BOB);
    link_device(&up, &data, &laptop, &phone, BOB, "phone");

    // The laptop knows itself and the phone; it checks its history every
    // second while it listens.
    let mut c = client(&up, &data, &laptop);
    c.args(["listen", "--audit-every", "1"]);
    let (mut listen, rx) = spawn(c);
    let mut seen = Vec::new();
    wait_line(&rx, "listening as", &mut seen);
    // Nothing to report about devices it knows.
    std::thread::sleep(Duration::from_millis(1500));
    while let Ok(l) = rx.try_recv() {
        seen.push(l);
    }
    assert!(
        !seen.iter().any(|l| l.contains("WARNING")),
        "{}",
        seen.join("\n")
    );
    // The phone approves a tablet: the laptop tells its user, first from
    // ids' push through the courier, then from its own audit.
    let (tablet_id, _) = link_device(&up, &data, &phone, &tablet, BOB, "tablet");
    let news = wait_line(&rx, "pushed by ids", &mut seen);
    assert!(
        news.contains(&format!("a device was added: {tablet_id}")),
        "{news}"
    );
    let warning = wait_line(&rx, "WARNING", &mut seen);
    assert!(
        warning.contains(&format!("device {tablet_id} joined this account")),
        "{warning}"
    );

    // The tablet is lost: the phone removes it, which rotates the account
    // key. The listening laptop takes the new key and stores it.
    let mut c = client(&up, &data, &phone);
    c.arg("devices");
    let listed = run(c, Duration::from_secs(30), "devices");
    assert_eq!(listed.lines().count(), 3, "{listed}");
    assert!(listed.contains(&tablet_id), "{listed}");
    let mut c = client(&up, &data, &phone);
    c.args(["remove", &tablet_id]);
    let removed = run(c, Duration::from_secs(30), "remove");
    assert!(removed.contains("account key is rotated"), "{removed}");
    wait_line(&rx, "rotated the account key", &mut seen);
    let key_of = |state: &Path| -> String {
        let text = std::fs::read_to_string(state.join("device.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["account_key"].as_str().unwrap().to_owned()
    };
    assert_eq!(key_of(&laptop), key_of(&phone));
    let _ = listen.kill();
    let _ = listen.wait();
    assert!(
        !seen
            .iter()
            .any(|l| l.contains("WARNING") && l.contains("account key")),
        "a rotation endorsed by the old key is not a warning:\n{}",
        seen.join("\n")
    );
    let mut c = client(&up, &data, &laptop);
    c.arg("devices");
    let listed = run(c, Duration::from_secs(30), "devices");
    assert_eq!(listed.lines().count(), 2, "{listed}");
    assert!(!listed.contains(&tablet_id), "{listed}");
}

/// Interop: the SDK, as `parley client`, calls baresip through `parley
/// signaling`. baresip registers with a digest account and is not in the
/// key directory, so the call is placed unverified (and says so); media
/// is ICE (both through `parley turn`) + DTLS-SRTP + Opus, and each side
/// hears the other's tone.
#[test]
fn the_client_calls_baresip_and_each_hears_the_other() {
    use parley_tests::baresip::{configure, heard_wav, wait_registered, Account, Ctrl, Lab};
    const PHONE: &str = "+14155550177";
    let mut lab = Lab::open();
    lab.add_namespace('c', 3);
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "users = [\"baresip:{}\"]\n\
         [[signaling.accounts]]\nhandle = \"{PHONE}\"\npassword = \"phone-password\"\n",
        parley_tests::baresip::TURN_PASSWORD
    );
    let (data, up) = parley_tests::up::start_lab_on(
        BIN,
        dir.path(),
        Some("10.213.3.1".parse().unwrap()),
        &["10.213.3.0/24"],
        &extra,
    );
    let phone = dir.path().join("baresip");
    configure(
        &phone,
        3,
        &Account {
            handle: PHONE,
            password: "phone-password",
            registrar: &up.sip_udp.to_string(),
            turn: &up.turn.to_string(),
            turn_user: "baresip",
            rtcp_mux: true,
        },
    );
    lab.baresip('c', &phone);
    wait_registered(&phone.join("out.log"));
    let mut ctrl = Ctrl::connect("10.213.3.2:4444");

    let alice = dir.path().join("alice");
    activate(&up, &data, &alice, ALICE);
    // Without --unverified the directory has no such handle.
    let mut verified = client(&up, &data, &alice);
    verified.args(["call", PHONE, "--seconds", "1"]);
    let out = verified.output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not in the key directory"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let alice_rec = dir.path().join("alice-heard.wav");
    let mut call = client(&up, &data, &alice);
    call.args([
        "call",
        PHONE,
        "--unverified",
        "--ring",
        "10",
        "--relay-only",
        "--seconds",
        "3",
        "--tone",
        "660",
        "--record",
    ])
    .arg(&alice_rec);
    let out = run(call, Duration::from_secs(60), "call baresip");
    assert!(out.contains("NOT authenticated"), "{out}");
    assert!(out.contains("media connected"), "{out}");

    let events = ctrl.events_until(&["CALL_CLOSED"], Duration::from_secs(10));
    let log = std::fs::read_to_string(phone.join("out.log")).unwrap_or_default();
    for want in [
        "CALL_ESTABLISHED",
        "CALL_MENC",
        "CALL_RTPESTAB",
        "CALL_CLOSED",
    ] {
        assert!(
            events.iter().any(|e| e == want),
            "baresip never reported {want}: {events:?}\n{log}"
        );
    }
    assert!(log.contains("DTLS-SRTP complete"), "{log}");

    let (f, share, n) = heard(&alice_rec);
    assert!(n >= 48_000 * 2, "the client recorded {n} samples");
    assert_eq!(
        f, 440.0,
        "the client heard {f} Hz ({share:.2} of the energy)"
    );
    let phone_rec =
        heard_wav(&phone).unwrap_or_else(|| panic!("baresip wrote no recording\n{log}"));
    let (f, share, n) = heard(&phone_rec);
    assert!(n >= 48_000 * 2, "baresip recorded {n} samples");
    assert_eq!(f, 660.0, "baresip heard {f} Hz ({share:.2} of the energy)");

    // And the other way: baresip calls the client, which takes calls from
    // phones outside the directory only when told to.
    let alice_rec = dir.path().join("alice-heard-2.wav");
    let mut c = client(&up, &data, &alice);
    c.args([
        "listen",
        "--answer",
        "--calls",
        "1",
        "--accept-unverified",
        "--audit-every",
        "0",
        "--record",
    ])
    .arg(&alice_rec);
    let (listen, rx) = spawn(c);
    let mut seen = Vec::new();
    wait_line(&rx, "listening as", &mut seen);
    ctrl.command("dial", &format!("sip:alice%40example.com@{}", up.sip_udp));
    wait_line(&rx, "NOT authenticated", &mut seen);
    let events = ctrl.events_until(&["CALL_RTPESTAB"], Duration::from_secs(10));
    assert!(
        events.iter().any(|e| e == "CALL_RTPESTAB"),
        "baresip's call to the client: {events:?}"
    );
    std::thread::sleep(Duration::from_secs(3));
    ctrl.command("hangup", "");
    finish(listen, Duration::from_secs(20), "listen");
    let (f, share, n) = heard(&alice_rec);
    assert!(n >= 48_000 * 2, "the client recorded {n} samples");
    assert_eq!(
        f, 440.0,
        "the client heard {f} Hz ({share:.2} of the energy)"
    );
}

/// With the `sound-card` feature: a call whose caller speaks from and
/// listens to the sound card. ALSA's null device stands in for one (it
/// needs no hardware): the streams open and run, and the call is whole.
#[cfg(feature = "sound-card")]
#[test]
fn sound_card_streams_carry_a_call() {
    let (dir, data, up) = stack();
    let limit = Duration::from_secs(60);
    // `_rx` keeps reading Bob's output until he exits.
    let (alice, listen, _rx, _) = bob_listens(&up, &data, dir.path());
    let mut call = client(&up, &data, &alice);
    call.args([
        "call",
        BOB,
        "--seconds",
        "2",
        "--mic",
        "alsa:null",
        "--speaker",
        "alsa:null",
    ]);
    let out = run(call, limit, "call on the sound card");
    assert!(out.contains("media connected"), "{out}");
    finish(listen, limit, "listen");
}

/// Two couriers on one PostgreSQL database: a listening client whose
/// courier dies moves its push link to the other, keeps its tokens, and
/// still hears what ids pushes (which goes through the other courier).
#[test]
fn a_client_moves_to_another_courier_when_its_courier_dies() {
    let pg = parley_tests::postgres::Postgres::start("client-failover");
    let dir = tempfile::tempdir().unwrap();
    let courier_db = format!("[courier]\ndatabase = \"{}\"\n", pg.url());
    let (data, up) = parley_tests::up::start_lab_on(BIN, dir.path(), None, &[], &courier_db);
    let config = dir.path().join("courier.toml");
    std::fs::write(&config, &courier_db).unwrap();
    let second = parley_tests::courier::start(BIN, &data, &config);
    let (laptop, phone, tablet) = (
        dir.path().join("laptop"),
        dir.path().join("phone"),
        dir.path().join("tablet"),
    );
    activate(&up, &data, &laptop, BOB);
    link_device(&up, &data, &laptop, &phone, BOB, "phone");

    // The laptop's push link goes to the second courier first.
    let couriers = format!("{},{}", second.device, up.courier);
    let mut c = client_via(&up, &data, &laptop, &couriers);
    c.args(["listen", "--audit-every", "1"]);
    let (mut listen, rx) = spawn(c);
    let mut seen = Vec::new();
    wait_line(&rx, "listening as", &mut seen);
    drop(second);
    wait_line(&rx, "push link lost", &mut seen);
    wait_line(&rx, "push link back", &mut seen);
    // The phone approves a tablet: ids pushes the news through `parley
    // up`'s courier, which now holds the laptop's link (with the tokens
    // the other courier gave it).
    let (tablet_id, _) = link_device(&up, &data, &phone, &tablet, BOB, "tablet");
    let news = wait_line(&rx, "pushed by ids", &mut seen);
    assert!(
        news.contains(&format!("a device was added: {tablet_id}")),
        "{news}"
    );
    let _ = listen.kill();
    let _ = listen.wait();
}

/// A listening group member: its name, process, output lines and the
/// lines seen so far.
type Listener = (
    &'static str,
    Child,
    std::sync::mpsc::Receiver<String>,
    Vec<String>,
);

/// `name` (state in `dir/name`) listens with `extra` flags, answers one
/// call with a `hz` tone, hangs up `stay` seconds after answering and
/// records to `dir/name.wav`; returns once it listens.
fn listener(
    up: &parley_tests::up::Up,
    data: &Path,
    dir: &Path,
    (name, hz, stay): (&'static str, &str, &str),
    extra: &[&str],
) -> Listener {
    let mut c = client(up, data, &dir.join(name));
    c.arg("listen")
        .args(extra)
        .args([
            "--answer",
            "--calls",
            "1",
            "--hangup-after",
            stay,
            "--tone",
            hz,
            "--record",
        ])
        .arg(dir.join(format!("{name}.wav")));
    let (child, rx) = spawn(c);
    let mut seen = Vec::new();
    wait_line(&rx, "listening as", &mut seen);
    (name, child, rx, seen)
}

/// Each of `names` (recording `dir/<name>.wav`, saying `freqs[i]`) heard
/// every other's tone above `min` of its mix and its own below 0.02.
fn each_hears_the_others(dir: &Path, names: &[&str], freqs: &[f64], min: f64) {
    for (i, name) in names.iter().enumerate() {
        let s = shares(&dir.join(format!("{name}.wav")), freqs);
        eprintln!("{name} heard {s:?}");
        for (j, share) in s.iter().enumerate() {
            match i == j {
                true => assert!(*share < 0.02, "{name} heard itself: {s:?}"),
                false => assert!(*share > min, "{name} heard {s:?}"),
            }
        }
    }
}

const CAROL: &str = "carol@example.com";

/// A fresh stack: its directory, data directory and services.
type Stack = (tempfile::TempDir, std::path::PathBuf, parley_tests::up::Up);
/// A client running, and its output lines.
type Running = (std::process::Child, std::sync::mpsc::Receiver<String>);

/// Alice, Bob and Carol on a fresh stack; Bob and Carol listening
/// (answering, saying 660 and 880 Hz, leaving after `stays` seconds;
/// `carol_flags` for Carol's client), and Alice ringing both with `call
/// BOB CAROL` for `seconds`, saying 440 Hz and recording `alice.wav`.
/// Alice's client and its output come last.
fn alice_rings_bob_and_carol(
    stays: (&str, &str),
    carol_flags: &[&str],
    seconds: &str,
) -> (Stack, [Listener; 2], Running) {
    let (dir, data, up) = stack();
    let state = |n: &str| dir.path().join(n);
    for (name, handle) in [("alice", ALICE), ("bob", BOB), ("carol", CAROL)] {
        activate(&up, &data, &state(name), handle);
    }
    let listeners = [
        listener(&up, &data, dir.path(), ("bob", "660", stays.0), &[]),
        listener(
            &up,
            &data,
            dir.path(),
            ("carol", "880", stays.1),
            carol_flags,
        ),
    ];
    let mut c = client(&up, &data, &state("alice"));
    c.args([
        "call",
        BOB,
        CAROL,
        "--seconds",
        seconds,
        "--tone",
        "440",
        "--record",
    ])
    .arg(state("alice.wav"));
    let alice = spawn(c);
    ((dir, data, up), listeners, alice)
}

/// A group call through `parley up`: Alice rings Bob and Carol together
/// (`parley client call BOB CAROL`); each answers on their listening
/// client. Media goes through the SFU, sealed end to end with keys the
/// devices exchanged over SIP MESSAGE; each of the three hears the other
/// two's tones, and nobody hears their own (Carol through the relay
/// only, which she reaches over TLS as on a network that passes only web
/// traffic). Carol leaves after 4 s: Alice
/// and Bob hear of it and send each other new keys (so Carol could not
/// read what follows); they leave after about 6 s.
#[test]
fn three_desktop_clients_talk_in_a_group_call_through_parley_up() {
    let limit = Duration::from_secs(60);
    // Carol reaches the SFU through the relay only, over TLS.
    let carol = ["--relay-only", "--turn-transport", "tls"];
    let ((dir, _data, _up), mut listeners, (call, rx)) =
        alice_rings_bob_and_carol(("6", "4"), &carol, "6");
    let mut alice_seen = Vec::new();
    wait_line(&rx, "group call with", &mut alice_seen);
    wait_line(&rx, "media connected", &mut alice_seen);
    for (_, _, rx, seen) in &mut listeners {
        wait_line(rx, "incoming group call from", seen);
        wait_line(rx, "media connected", seen);
    }
    finish(call, limit, "call");
    while let Ok(l) = rx.recv_timeout(Duration::from_secs(2)) {
        alice_seen.push(l);
    }
    let out = alice_seen.join("\n");
    assert!(out.contains("group: sent"), "{out}");
    // Frames sent under a new key before the key arrived do not decrypt:
    // a few, around Carol's leaving.
    let undecrypted = |text: &str| -> u64 {
        let line = text
            .lines()
            .find(|l| l.contains("frames did not decrypt"))
            .unwrap_or_else(|| panic!("no group summary in\n{text}"));
        line.rsplit("; ")
            .next()
            .and_then(|t| t.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{line}"))
    };
    for (name, child, rx, mut seen) in listeners {
        finish(child, limit, name);
        seen.extend(rx.try_iter());
        let text = seen.join("\n");
        assert!(undecrypted(&text) <= 25, "{name}:\n{text}");
        if name == "bob" {
            assert!(
                text.contains("carol@example.com left the group call; new keys sent"),
                "{text}"
            );
        }
    }
    assert!(undecrypted(&out) <= 25, "{out}");
    assert!(
        out.contains("carol@example.com left the group call"),
        "{out}"
    );
    each_hears_the_others(
        dir.path(),
        &["alice", "bob", "carol"],
        &[440.0, 660.0, 880.0],
        0.2,
    );
}

/// A member whose device dies sends no "left": Carol's client is killed
/// mid-call. Alice and Bob stop hearing her frames, and ten seconds on
/// each drops her and sends the other new keys, as if she had left, so
/// what she held no longer opens what follows.
#[test]
fn a_member_whose_device_dies_is_dropped_and_the_keys_rotate() {
    let limit = Duration::from_secs(60);
    let (_stack, [bob, carol], (call, rx)) = alice_rings_bob_and_carol(("20", "60"), &[], "20");
    let (_, bob, bob_rx, mut bob_seen) = bob;
    let (_, mut carol, carol_rx, mut carol_seen) = carol;
    let mut alice_seen = Vec::new();
    wait_line(&rx, "media connected", &mut alice_seen);
    wait_line(&carol_rx, "media connected", &mut carol_seen);
    wait_line(&bob_rx, "media connected", &mut bob_seen);
    std::thread::sleep(Duration::from_secs(2));
    let killed = std::time::Instant::now();
    carol.kill().unwrap();
    let _ = carol.wait();
    wait_line(
        &rx,
        "carol@example.com left the group call",
        &mut alice_seen,
    );
    let after = killed.elapsed();
    eprintln!("alice dropped carol {after:?} after her client died");
    assert!(after < Duration::from_secs(16), "{after:?}");
    wait_line(
        &bob_rx,
        "carol@example.com left the group call; new keys sent",
        &mut bob_seen,
    );
    finish(call, limit, "call");
    finish(bob, limit, "bob");
}

/// A call link: Alice rings Bob into a group call; Bob's client shows the
/// call's link; Dave asks to join by it and Bob admits him. Dave hears
/// Alice and Bob, and they hear him; his keys came from the directory.
#[test]
fn a_fourth_joins_a_group_call_by_its_link() {
    const DAVE: &str = "dave@example.com";
    let (dir, data, up) = stack();
    let state = |n: &str| dir.path().join(n);
    for (name, handle) in [("alice", ALICE), ("bob", BOB), ("dave", DAVE)] {
        activate(&up, &data, &state(name), handle);
    }
    let limit = Duration::from_secs(60);
    let (_, bob, bob_rx, mut bob_seen) = listener(&up, &data, dir.path(), ("bob", "660", "9"), &[]);
    let mut c = client(&up, &data, &state("alice"));
    c.args([
        "call",
        BOB,
        "--group",
        "--seconds",
        "9",
        "--tone",
        "440",
        "--record",
    ])
    .arg(state("alice.wav"));
    let (alice, alice_rx) = spawn(c);
    let link = wait_line(&bob_rx, "call link: ", &mut bob_seen)
        .split("call link: ")
        .nth(1)
        .unwrap()
        .trim()
        .to_string();
    assert!(
        link.starts_with("sip:") && link.contains(";parley-room="),
        "{link}"
    );
    let mut c = client(&up, &data, &state("dave"));
    c.args([
        "call",
        "--link",
        &link,
        "--seconds",
        "4",
        "--tone",
        "1100",
        "--record",
    ])
    .arg(state("dave.wav"));
    let (dave, dave_rx) = spawn(c);
    let mut dave_seen = Vec::new();
    wait_line(
        &bob_rx,
        "asks to join the group call by its link",
        &mut bob_seen,
    );
    wait_line(&bob_rx, "admitted", &mut bob_seen);
    wait_line(&dave_rx, "media connected", &mut dave_seen);
    finish(dave, limit, "dave");
    finish(alice, limit, "alice");
    finish(bob, limit, "bob");
    drop(alice_rx);
    let freqs = [440.0, 660.0, 1100.0];
    let dave_heard = shares(&state("dave.wav"), &freqs);
    eprintln!("Dave heard {dave_heard:?}");
    assert!(
        dave_heard[0] > 0.2 && dave_heard[1] > 0.2 && dave_heard[2] < 0.02,
        "Dave heard {dave_heard:?}"
    );
    for name in ["alice", "bob"] {
        let s = shares(&state(&format!("{name}.wav")), &freqs);
        eprintln!("{name} heard {s:?}");
        assert!(s[2] > 0.05, "{name} did not hear Dave: {s:?}");
    }
}

/// Adding someone to a call: Alice and Bob talk one to one; Alice adds
/// Carol. The call becomes a group call through the SFU: Bob's device
/// moves to it without ringing, Carol's rings and answers, and the one to
/// one call ends. Each then hears the other two.
#[test]
fn a_one_to_one_call_becomes_a_group_call_when_someone_is_added() {
    let (dir, data, up) = stack();
    let state = |n: &str| dir.path().join(n);
    for (name, handle) in [("alice", ALICE), ("bob", BOB), ("carol", CAROL)] {
        activate(&up, &data, &state(name), handle);
    }
    let limit = Duration::from_secs(60);
    let mut listeners = vec![
        listener(&up, &data, dir.path(), ("bob", "660", "6"), &[]),
        listener(&up, &data, dir.path(), ("carol", "880", "6"), &[]),
    ];
    let mut c = client(&up, &data, &state("alice"));
    c.args([
        "call",
        BOB,
        "--add",
        CAROL,
        "--add-after",
        "2",
        "--seconds",
        "8",
        "--tone",
        "440",
        "--record",
    ])
    .arg(state("alice.wav"));
    let (alice, alice_rx) = spawn(c);
    let mut alice_seen = Vec::new();
    wait_line(&alice_rx, "adding carol@example.com", &mut alice_seen);
    {
        let (_, _, rx, seen) = &mut listeners[0];
        wait_line(rx, "the call moved to a group call", seen);
    }
    {
        let (_, _, rx, seen) = &mut listeners[1];
        wait_line(rx, "incoming group call from alice@example.com", seen);
    }
    finish(alice, limit, "alice");
    for (name, child, _, _) in listeners {
        finish(child, limit, name);
    }
    each_hears_the_others(
        dir.path(),
        &["alice", "bob", "carol"],
        &[440.0, 660.0, 880.0],
        0.15,
    );
}
