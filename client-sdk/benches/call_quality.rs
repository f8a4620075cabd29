//! Audio quality under loss (a benchmark, not a test): a 20 s call on the
//! simulated wire at 0, 5, 10 and 20% random loss in both directions,
//! with what the receiver made of it: frames from packets, rebuilt by
//! FEC, concealed, the tone's share of what it played, and the MOS
//! estimate. Run by bench/call.sh.

#[path = "../tests/sim/mod.rs"]
mod sim;

use std::time::Duration;

use client_sdk::media::audio::{tone_share, Decoded};
use sim::{Link, Net};

#[allow(clippy::print_stdout)]
fn main() {
    println!("| loss | frames from packets | rebuilt by FEC | concealed | tone share | Opus bitrate (sender) | MOS |");
    println!("|---|---|---|---|---|---|---|");
    for loss in [0.0, 0.05, 0.10, 0.20] {
        let link = Link {
            loss,
            ..Link::default()
        };
        let mut net = Net::new(42, link, false, false);
        net.gather();
        net.negotiate(|s| s.to_string()).expect("negotiation");
        net.run_until(Duration::from_secs(10), Net::connected);
        let start = net.phones[1].decoded.len();
        let heard_from = net.phones[1].heard.len();
        net.run(Duration::from_secs(20));
        let bob = &net.phones[1];
        let d = &bob.decoded[start..];
        let played = d.iter().filter(|x| x.is_some()).count().max(1) as f64;
        let share = |how| d.iter().filter(|x| **x == Some(how)).count() as f64 / played * 100.0;
        let stats = bob.session.stats(net.now);
        let alice = net.phones[0].session.stats(net.now);
        println!(
            "| {:.0}% | {:.1}% | {:.1}% | {:.1}% | {:.2} | {} bps | {:.2} |",
            loss * 100.0,
            share(Decoded::Packet),
            share(Decoded::Fec),
            share(Decoded::Concealed),
            tone_share(&bob.heard[heard_from..], 440.0),
            alice.bitrate_out,
            stats.mos
        );
    }
}
