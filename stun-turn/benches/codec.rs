//! Micro-benchmarks of the hot paths: decoding and authenticating a STUN
//! request, and the ChannelData relay decision in the core.

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use stun_turn::message::{
    AttrType, Class, IntegrityKind, Message, MessageBuilder, Method, TransactionId,
};

fn codec(c: &mut Criterion) {
    let mut buf = Vec::new();
    let mut b = MessageBuilder::new(
        &mut buf,
        Class::Request,
        Method::Refresh,
        TransactionId([1; 12]),
    );
    b.add_attr(AttrType::Username, b"1700000000:alice");
    b.add_attr(AttrType::Realm, b"parley");
    b.add_attr(
        AttrType::Nonce,
        b"obMatJos2wAAAabcdefghijklmnopqrstuvwxyz01",
    );
    b.add_u32(AttrType::Lifetime, 600);
    b.add_integrity(IntegrityKind::Sha1, &[7; 16]);
    b.add_fingerprint();
    c.bench_function("decode_request", |bench| {
        bench.iter(|| Message::decode(black_box(&buf)).unwrap().method())
    });
    c.bench_function("decode_and_verify_sha1", |bench| {
        bench.iter(|| {
            let m = Message::decode(black_box(&buf)).unwrap();
            m.check_fingerprint().unwrap();
            m.verify_integrity(&[7; 16]).unwrap()
        })
    });
    let frame = {
        let mut f = vec![0x40, 0x00, 0x00, 120];
        f.extend_from_slice(&[0xab; 120]);
        f
    };
    c.bench_function("channel_data_decode", |bench| {
        bench.iter(|| stun_turn::channel_data::decode(black_box(&frame)).unwrap())
    });
}

criterion_group!(benches, codec);
criterion_main!(benches);
