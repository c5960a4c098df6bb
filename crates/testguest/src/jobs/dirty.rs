//! `dirty RATE WORKING_SET_MIB`: dirties RATE distinct 4 KiB pages per second, cycling through
//! a working set of spare RAM, in 1 ms slices; prints `dirty: total=N` every second.
//! [`Dirtier`] is the same memory load for other jobs (`kv PORT RATE`, `spin RATE`).

use crate::clock::{self, Ticker};
use crate::{fatal, heap, println};

const PAGE: usize = 4096;
/// Largest backlog (in slices) made up after a stall, so a paused VM does not burst.
const MAX_BACKLOG_SLICES: u64 = 100;
/// Working set of the load other jobs carry.
pub const DEFAULT_WORKING_SET_MIB: u64 = 64;

/// Writes one u64 into a different page of its working set, `rate` pages per second.
pub struct Dirtier {
    base: *mut u8,
    pages: usize,
    rate: u64,
    tsc_per_s: u64,
    slice: Ticker,
    owed: u128,
    last: u64,
    next_page: usize,
    total: u64,
}

impl Dirtier {
    /// Takes a working set of `working_set_mib` MiB of spare RAM (none when `rate` is 0); fails
    /// the job if it does not fit.
    pub fn new(rate: u64, working_set_mib: u64) -> Self {
        let working_set_mib = if rate == 0 { 0 } else { working_set_mib };
        let bytes = (working_set_mib as usize).saturating_mul(1 << 20);
        let pages = bytes / PAGE;
        if pages == 0 && rate > 0 {
            fatal!("dirty: the working set must be at least 1 MiB");
        }
        let Some(base) = heap::take_spare(bytes) else {
            fatal!(
                "dirty: working set of {} MiB does not fit ({} MiB spare)",
                working_set_mib,
                heap::spare_left() >> 20
            );
        };
        Self {
            base,
            pages,
            rate,
            tsc_per_s: clock::tsc_khz() * 1000,
            slice: Ticker::new(1_000),
            owed: 0,
            last: clock::rdtsc(),
            next_page: 0,
            total: 0,
        }
    }

    /// Pages written so far.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Where the working set starts.
    pub fn base(&self) -> usize {
        self.base as usize
    }

    /// Does the writes due since the last slice, if a 1 ms slice has passed; never blocks.
    pub fn poll(&mut self) {
        if self.rate > 0 && self.slice.poll() {
            self.step();
        }
    }

    /// Busy-waits for the next slice, then does its writes.
    pub fn wait_and_step(&mut self) {
        self.slice.wait();
        self.step();
    }

    fn step(&mut self) {
        let now = clock::rdtsc();
        let elapsed = now
            .saturating_sub(self.last)
            .min(MAX_BACKLOG_SLICES * self.tsc_per_s / 1000);
        self.last = now;
        self.owed += self.rate as u128 * elapsed as u128;
        let due = (self.owed / self.tsc_per_s as u128) as u64;
        self.owed -= due as u128 * self.tsc_per_s as u128;
        for _ in 0..due {
            self.total += 1;
            // SAFETY: `next_page < pages`, so the u64 lies inside the working set, which this
            // job owns (taken from spare RAM) and which is identity mapped.
            unsafe {
                core::ptr::write_volatile(
                    self.base.add(self.next_page * PAGE) as *mut u64,
                    self.total,
                )
            };
            self.next_page += 1;
            if self.next_page == self.pages {
                self.next_page = 0;
            }
        }
    }
}

pub fn run(rate: u64, working_set_mib: u64) -> ! {
    let mut dirtier = Dirtier::new(rate, working_set_mib);
    super::running("dirty");
    println!(
        "dirty: rate={} pages/s working_set={} MiB at {:#x}",
        rate,
        working_set_mib,
        dirtier.base()
    );
    let mut report = Ticker::new(1_000_000);
    loop {
        dirtier.wait_and_step();
        if report.poll() {
            println!("dirty: total={}", dirtier.total());
        }
    }
}
