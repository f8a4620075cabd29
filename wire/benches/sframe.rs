//! What end-to-end encryption costs a group call's devices per frame:
//! SFrame encryption and decryption of an Opus frame (20 ms, ~120 bytes)
//! and a video frame (~12 KB), and opening a sender key (HPKE and a
//! signature check) when a member joins.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use wire::group_key::{KeyMessage, SenderKey};
use wire::keys::{DeviceId, SigningKey};
use wire::sframe::{CipherSuite, Key, Receiver, Sender};

fn frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("sframe");
    for (what, len) in [("audio", 120usize), ("video", 12_000)] {
        let frame = vec![0x5a; len];
        let mut tx = Sender::new(Key::derive(CipherSuite::Aes128GcmSha256, 7, b"bench").unwrap());
        let mut rx = Receiver::default();
        rx.add(Key::derive(CipherSuite::Aes128GcmSha256, 7, b"bench").unwrap());
        let sealed = tx.encrypt(b"", &frame).unwrap();
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::new("encrypt", what), &frame, |b, f| {
            b.iter(|| tx.encrypt(b"", black_box(f)).unwrap())
        });
        g.bench_with_input(BenchmarkId::new("decrypt", what), &sealed, |b, s| {
            b.iter(|| rx.decrypt(b"", black_box(s)).unwrap())
        });
    }
    g.finish();
}

fn sender_keys(c: &mut Criterion) {
    let (alice, bob) = (SigningKey::generate(), SigningKey::generate());
    let (a, b) = (DeviceId::random(), DeviceId::random());
    let key = SenderKey {
        kid: 7,
        base_key: [3; 32],
    };
    let m = KeyMessage::seal("call", &alice, a, b, &bob.public(), &key).unwrap();
    c.bench_function("sender key seal", |bench| {
        bench.iter(|| {
            KeyMessage::seal("call", &alice, a, b, &bob.public(), black_box(&key)).unwrap()
        })
    });
    c.bench_function("sender key open", |bench| {
        bench.iter(|| {
            black_box(&m)
                .open("call", &bob, b, &alice.public())
                .unwrap()
        })
    });
}

criterion_group!(benches, frames, sender_keys);
criterion_main!(benches);
