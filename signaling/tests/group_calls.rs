//! Group calls through the proxy core: an INVITE naming a room gets every
//! participant a room token for the SFU from the proxy, and only from it.

mod sim;

use signaling::core::message::{HeaderName, Message};
use signaling::core::proxy::Config;
use sim::*;

const SECRET: [u8; 32] = [7; 32];
const ROOM: &str = "room-0123456789abcdef";
const SFU: &str = "https://sfu.example:8446";

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn world(sfu: Option<&str>) -> World {
    let config = Config {
        sfu: sfu.map(str::to_owned),
        ..config()
    };
    World::node(config, SECRET, unix_now(), 1)
}

/// Alice's INVITE to Bob for `room`, with room headers of her own making.
fn group_invite(
    w: &mut World,
    alice: &Ua,
    room: &str,
) -> Vec<(signaling::core::flow::Flow, Message)> {
    let text = invite_text(alice, BOB, "group-call", "inv-g").replacen(
        "Max-Forwards: 70\n",
        &format!(
            "Max-Forwards: 70\nParley-Group: {room}\nParley-Room-Token: forged\nParley-Sfu: https://evil.example\n"
        ),
        1,
    );
    w.send(alice, &text)
}

fn room_token(m: &Message) -> Vec<&str> {
    m.values(&HeaderName::from_static("Parley-Room-Token"))
        .collect()
}

fn sfu(m: &Message) -> Vec<&str> {
    m.values(&HeaderName::from_static("Parley-Sfu")).collect()
}

/// One token, for `ROOM`, made with the proxy's secret.
fn assert_opens_the_room(m: &Message) {
    let tokens = room_token(m);
    assert_eq!(tokens.len(), 1, "{m:?}");
    assert_eq!(
        wire::room_token::check(&SECRET, ROOM, tokens[0], unix_now()),
        Ok(())
    );
    assert_eq!(sfu(m), vec![SFU]);
}

#[test]
fn every_participant_of_a_group_call_gets_a_room_token_from_the_proxy_alone() {
    let mut w = world(Some(SFU));
    let devices = bob_devices();
    for ua in devices.values() {
        w.register(ua, BOB);
    }
    let alice = Ua::new("alice", udp("10.0.0.1:5060"));
    let out = group_invite(&mut w, &alice, ROOM);
    let phone = &devices["phone"];
    let inv = requests(&out, phone, "INVITE")[0].clone();
    // Bob's devices get a token the proxy made, not the one Alice wrote.
    assert_opens_the_room(&inv);
    for name in ["laptop", "tablet"] {
        assert_opens_the_room(requests(&out, &devices[name], "INVITE")[0]);
    }

    // The phone rings and answers, writing room headers of its own: Alice
    // gets the proxy's.
    let mut ringing = reply(&inv, 180, "Ringing", "phone");
    ringing.push(HeaderName::from_static("Parley-Room-Token"), "forged");
    let out = w.send_msg(phone, &ringing);
    let to_alice = to(&out, &alice);
    assert_eq!(to_alice.len(), 1);
    assert_opens_the_room(to_alice[0]);
    let mut ok = reply(&inv, 200, "OK", "phone");
    ok.push(
        HeaderName::from_static("Parley-Sfu"),
        "https://evil.example",
    );
    let out = w.send_msg(phone, &ok);
    let answer = to(&out, &alice)
        .into_iter()
        .find(|m| m.code() == Some(200))
        .unwrap();
    assert_opens_the_room(answer);
}

#[test]
fn a_group_call_needs_an_sfu_and_a_room_id() {
    let mut w = world(None);
    let devices = bob_devices();
    w.register(&devices["phone"], BOB);
    let alice = Ua::new("alice", udp("10.0.0.1:5060"));
    let out = group_invite(&mut w, &alice, ROOM);
    assert_eq!(codes(&out, &alice), vec![100, 488]);
    assert!(requests(&out, &devices["phone"], "INVITE").is_empty());

    let mut w = world(Some(SFU));
    w.register(&devices["phone"], BOB);
    let out = group_invite(&mut w, &alice, "short");
    assert_eq!(codes(&out, &alice), vec![100, 400]);
}

#[test]
fn a_one_to_one_call_carries_no_room_headers_either_way() {
    let mut w = world(Some(SFU));
    let devices = bob_devices();
    let phone = &devices["phone"];
    w.register(phone, BOB);
    let alice = Ua::new("alice", udp("10.0.0.1:5060"));
    let text = invite_text(&alice, BOB, "plain", "inv-p").replacen(
        "Max-Forwards: 70\n",
        "Max-Forwards: 70\nParley-Room-Token: forged\n",
        1,
    );
    let out = w.send(&alice, &text);
    let inv = requests(&out, phone, "INVITE")[0].clone();
    assert!(room_token(&inv).is_empty() && sfu(&inv).is_empty());
    let mut ok = reply(&inv, 200, "OK", "phone");
    ok.push(HeaderName::from_static("Parley-Room-Token"), "forged");
    let out = w.send_msg(phone, &ok);
    let answer = to(&out, &alice)[0];
    assert!(room_token(answer).is_empty());
}
