"""Calls between two devices through the Python binding, against a
running `parley up`: both activate with codes from the development
outbox, Alice calls Bob, Bob answers, and each hears the other's tone.
Then Bob goes to the background as a phone app does (no link, no SIP)
with only his FCM token registered; Alice's next call reaches him
through FCM (a local stand-in), the app hands the push to the device,
and the call rings and is answered. Last, Alice rings Bob and Carol
into a group call through the SFU, end to end encrypted: each hears the
other two's tones in the mix, and nobody their own.

Environment: PARLEY_IDS, PARLEY_COURIER, PARLEY_SIP (host:port),
PARLEY_CA (PEM file), PARLEY_OUTBOX (the outbox directory),
PARLEY_FCM_SENT (where the FCM stand-in logs what it takes, one JSON
message per line).
"""

import json
import os
import sys
import time

import parley_ffi as parley

ALICE, BOB, CAROL = "alice@example.com", "+14155550123", "carol@example.com"
ALICE_HZ, BOB_HZ, CAROL_HZ = 440.0, 660.0, 880.0


def code_for(handle, outbox):
    """The newest code the development sender wrote for `handle`."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        files = sorted(f for f in os.listdir(outbox) if handle in f)
        if files:
            path = os.path.join(outbox, files[-1])
            with open(path, encoding="utf-8") as f:
                text = f.read()
            os.remove(path)
            return text.split("code is ")[1][:6]
        time.sleep(0.05)
    raise RuntimeError(f"no code for {handle} in {outbox}")


def activate(p, handle, outbox):
    verification = p.start_verification(handle)
    token = p.check_verification(verification, code_for(handle, outbox))
    return p.create_account(handle, token, "python")


def wait_for(device, want, seconds=20):
    """Events until one of type `want` arrives; returns it."""
    deadline = time.monotonic() + seconds
    seen = []
    while time.monotonic() < deadline:
        e = device.next_event(200)
        if e is None:
            continue
        seen.append(e)
        if isinstance(e, want):
            return e
    raise RuntimeError(f"no {want.__name__} within {seconds} s; saw {seen}")


def fcm_message(log, seconds=15):
    """The first message the FCM stand-in took, as the app would get it."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if os.path.exists(log):
            with open(log, encoding="utf-8") as f:
                lines = [l for l in f.read().splitlines() if l.strip()]
            if lines:
                return json.loads(lines[0])["message"]
        time.sleep(0.05)
    raise RuntimeError(f"nothing reached FCM within {seconds} s")


def woken_through_fcm(alice, bob):
    """Bob sleeps as an Android app without a foreground service; Alice's
    call wakes him through FCM, and he answers."""
    bob.set_platform_token(parley.PlatformToken(
        platform="fcm", token="python-bob-fcm", topic="parley-test",
        calls=True, others=True, sandbox=False))
    try:
        bob.set_platform_token(parley.PlatformToken(
            platform="apns", token="zz", topic="org.parley.app",
            calls=True, others=False, sandbox=False))
        raise AssertionError("a malformed APNs token was taken")
    except parley.ParleyError.Invalid:
        pass
    bob.background()
    time.sleep(0.5)

    call = alice.dial(BOB)
    message = fcm_message(os.environ["PARLEY_FCM_SENT"])
    assert message["token"] == "python-bob-fcm", message
    assert message["android"]["priority"] == "HIGH", message
    data = message["data"]
    # Google sees that a call waits, under an opaque id, and the call's
    # details sealed to Bob's device: nothing it can read.
    assert set(data) == {"type", "id", "sealed"}, data
    assert BOB not in json.dumps(message) and ALICE not in json.dumps(message)

    # The app's FirebaseMessagingService hands the data to the device,
    # which opens who calls before it is back on its link.
    push = bob.handle_push(json.dumps(data))
    assert push == parley.PlatformPush.CALL(id=data["id"], caller=ALICE), push
    assert bob.handle_push('{"aps": {"alert": "not ours"}}') is None
    ringing = wait_for(bob, parley.PhoneEvent.RINGING)
    bob.answer(ringing.call)
    wait_for(alice, parley.PhoneEvent.MEDIA_CONNECTED)
    wait_for(bob, parley.PhoneEvent.MEDIA_CONNECTED)
    time.sleep(1)
    bob_heard = parley.dominant_frequency(bob.heard(ringing.call))
    alice.hangup(call)
    wait_for(bob, parley.PhoneEvent.ENDED)
    print(f"woken through FCM, Bob heard {bob_heard} Hz")
    assert bob_heard == ALICE_HZ, bob_heard


def group_call(alice, bob, carol):
    """Alice rings Bob and Carol together; both answer; each of the three
    hears the other two (each about half of the mix) and not itself."""
    room = alice.group_call([BOB, CAROL])
    for callee, own in ((bob, BOB), (carol, CAROL)):
        incoming = wait_for(callee, parley.PhoneEvent.INCOMING_GROUP)
        assert incoming.call == room, incoming
        assert set(incoming.members) == {ALICE, BOB, CAROL} - {own}, incoming
        callee.answer(room)
    for d in (alice, bob, carol):
        wait_for(d, parley.PhoneEvent.MEDIA_CONNECTED)
    time.sleep(3)
    heard = {}
    for d, name, own in ((alice, "Alice", ALICE_HZ), (bob, "Bob", BOB_HZ),
                         (carol, "Carol", CAROL_HZ)):
        # Each of the other two, by its place in the call: 3 s of audio
        # (some 150 frames), and loud (the tones are at -10 dBov or so).
        stats = d.group_stats(room)
        assert stats is not None, name
        assert len(stats.participants) == 2, (name, stats)
        for p in stats.participants:
            assert p.frames > 50, (name, p)
            assert p.level < 40, (name, p)
        samples = d.heard(room)[-96000:]
        shares = {hz: round(parley.tone_share(samples, hz), 3)
                  for hz in (ALICE_HZ, BOB_HZ, CAROL_HZ)}
        heard[name] = shares
        for hz, share in shares.items():
            if hz == own:
                assert share < 0.02, (name, shares)
            else:
                assert share > 0.2, (name, shares)
    for d in (alice, bob, carol):
        d.hangup(room)
    print(f"group call: {heard}")


def main():
    services = parley.Services(
        ids=os.environ["PARLEY_IDS"],
        courier=os.environ["PARLEY_COURIER"],
        sip=os.environ["PARLEY_SIP"],
        ca_pem=open(os.environ["PARLEY_CA"], encoding="utf-8").read(),
        server_name="localhost",
        domain="localhost",
    )
    outbox = os.environ["PARLEY_OUTBOX"]
    p = parley.Parley(services)

    assert parley.normalize_handle("Alice@Example.COM") == ALICE
    try:
        parley.normalize_handle("not a handle")
        raise AssertionError("a bad handle was accepted")
    except parley.ParleyError.Invalid:
        pass

    alice_id = activate(p, ALICE, outbox)
    bob_id = activate(p, BOB, outbox)
    assert alice_id.handle == ALICE and len(alice_id.device_id) == 32
    alice = p.start_device(alice_id, ALICE_HZ, True)
    bob = p.start_device(bob_id, BOB_HZ, False)
    wait_for(alice, parley.PhoneEvent.REGISTERED)
    wait_for(bob, parley.PhoneEvent.REGISTERED)
    # Let Bob's device list reach a published epoch before the lookup.
    time.sleep(0.5)

    call = alice.dial(BOB)
    ringing = wait_for(bob, parley.PhoneEvent.RINGING)
    bob.answer(ringing.call)
    wait_for(alice, parley.PhoneEvent.MEDIA_CONNECTED)
    wait_for(bob, parley.PhoneEvent.MEDIA_CONNECTED)
    time.sleep(2)
    bob_heard = parley.dominant_frequency(bob.heard(ringing.call))
    alice_heard = parley.dominant_frequency(alice.heard(call))
    alice.hangup(call)
    ended = wait_for(bob, parley.PhoneEvent.ENDED)
    print(f"Bob heard {bob_heard} Hz, Alice heard {alice_heard} Hz; Bob: {ended.reason}")
    assert bob_heard == ALICE_HZ, bob_heard
    assert alice_heard == BOB_HZ, alice_heard

    woken_through_fcm(alice, bob)

    carol_id = activate(p, CAROL, outbox)
    carol = p.start_device(carol_id, CAROL_HZ, False)
    wait_for(carol, parley.PhoneEvent.REGISTERED)
    time.sleep(0.5)
    group_call(alice, bob, carol)
    print("OK")


if __name__ == "__main__":
    sys.exit(main())
