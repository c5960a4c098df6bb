//! `counter`: prints `counter N` about every 10 ms. N lives in guest memory, so a restored
//! snapshot or a failover continues the sequence.

use crate::clock::Ticker;
use crate::println;

pub fn run(_args: &[&str]) -> ! {
    super::running("counter");
    let mut ticker = Ticker::new(10_000);
    let mut n: u64 = 0;
    loop {
        n += 1;
        println!("counter {}", n);
        ticker.wait();
    }
}
