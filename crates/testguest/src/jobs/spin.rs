//! `spin [RATE]`: CPU-bound work (an integer hash loop) that prints `spin: N per s` every
//! second, optionally while dirtying RATE pages per second. Benchmarks compare N with and
//! without FT protection.

use super::dirty::{Dirtier, DEFAULT_WORKING_SET_MIB};
use crate::clock::Ticker;
use crate::println;

/// Hash rounds between clock and dirtier checks.
const BATCH: u64 = 4096;

pub fn run(rate: u64) -> ! {
    let mut dirtier = Dirtier::new(rate, DEFAULT_WORKING_SET_MIB);
    super::running("spin");
    let mut report = Ticker::new(1_000_000);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut done: u64 = 0;
    loop {
        for _ in 0..BATCH {
            // xorshift: cheap, and the compiler cannot fold it away.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
        done += BATCH;
        dirtier.poll();
        if report.poll() {
            println!("spin: {} per s (x={:x})", done, x & 0xff);
            done = 0;
        }
    }
}
