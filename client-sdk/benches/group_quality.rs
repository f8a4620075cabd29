//! Audio quality of a group call when one of eight is on a lossy network
//! (a benchmark, not a test): eight devices in one room of the SFU on
//! loopback, each saying a tone of its own, run in real time for 12 s; the
//! last 8 s are measured. The first device loses nothing, then 10% of what
//! reaches it, then 10% both ways. For each case: how the lossy one hears
//! the others, how the others hear it, and how the others hear each other
//! (each tone's share of the mix, times the seven speakers mixed, so 1.0
//! is every speaker heard in full; frames rebuilt by FEC and concealed;
//! the MOS estimate).
//! Run by bench/group-call.sh.

#[path = "../tests/group/mod.rs"]
mod group;

use std::time::Duration;

use client_sdk::group::SfuClient;
use group::{eight, run, sfu, share, start_keys, Device, EIGHT};

/// Seconds measured at the end of each call.
const MEASURED: f64 = 8.0;

/// How `listener` heard `speaker`: tone share (times the seven mixed),
/// share of frames rebuilt by FEC, concealed share, MOS.
fn heard(devices: &[Device], listener: usize, speaker: usize) -> (f64, f64, f64, f64) {
    let d = &devices[listener];
    let tone = share(d, EIGHT[speaker], MEASURED) * 7.0;
    let stats = d.session.stats();
    let h = stats
        .heard
        .get(&(speaker as u16 + 1))
        .copied()
        .unwrap_or_default();
    let fec = h.jitter.fec as f64 / h.jitter.played.max(1) as f64;
    (tone, fec, h.concealed, h.mos)
}

/// Mean and lowest tone share, mean FEC and concealed shares, mean MOS
/// over the pairs.
fn row(pairs: &[(f64, f64, f64, f64)]) -> String {
    let n = pairs.len().max(1) as f64;
    let tone = pairs.iter().map(|p| p.0).sum::<f64>() / n;
    let lowest = pairs.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
    let fec = pairs.iter().map(|p| p.1).sum::<f64>() / n;
    let concealed = pairs.iter().map(|p| p.2).sum::<f64>() / n;
    let mos = pairs.iter().map(|p| p.3).sum::<f64>() / n;
    format!(
        "{tone:.2} | {lowest:.2} | {:.1}% | {:.1}% | {mos:.2}",
        fec * 100.0,
        concealed * 100.0
    )
}

#[allow(clippy::print_stdout)]
#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    println!("| loss on the first of eight | who hears whom | tone share (mean) | lowest | rebuilt by FEC | concealed | MOS |");
    println!("|---|---|---|---|---|---|---|");
    for (case, down, up) in [
        ("none", 0.0, 0.0),
        ("10% of what reaches it", 0.10, 0.0),
        ("10% both ways", 0.10, 0.10),
    ] {
        let (sfu, roots) = sfu().await;
        let client = SfuClient::new(sfu.http, "127.0.0.1", roots).expect("SFU client");
        let mut devices = eight(&client).await;
        devices[0].loss = down;
        devices[0].uplink_loss = up;
        start_keys(&mut devices);
        run(&mut devices, Duration::from_secs(12)).await;
        let others = 1..devices.len();
        let it_hears: Vec<_> = others.clone().map(|s| heard(&devices, 0, s)).collect();
        let they_hear: Vec<_> = others.clone().map(|l| heard(&devices, l, 0)).collect();
        let each_other: Vec<_> = others
            .clone()
            .flat_map(|l| others.clone().filter(move |s| *s != l).map(move |s| (l, s)))
            .map(|(l, s)| heard(&devices, l, s))
            .collect();
        println!("| {case} | it hears the others | {} |", row(&it_hears));
        println!("| {case} | the others hear it | {} |", row(&they_hear));
        println!(
            "| {case} | the others hear each other | {} |",
            row(&each_other)
        );
        sfu.shutdown();
    }
}
