//! Time from the TSC, scaled by `ftvm.tsc_khz`.

use core::sync::atomic::{AtomicU64, Ordering};

/// Used when the command line has no `ftvm.tsc_khz`.
pub const DEFAULT_TSC_KHZ: u64 = 2_000_000;

static TSC_KHZ: AtomicU64 = AtomicU64::new(DEFAULT_TSC_KHZ);

/// Sets the TSC frequency.
pub fn init(tsc_khz: u64) {
    TSC_KHZ.store(tsc_khz.max(1), Ordering::Relaxed);
}

/// The TSC frequency in kHz.
pub fn tsc_khz() -> u64 {
    TSC_KHZ.load(Ordering::Relaxed)
}

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC only reads the counter; CR4.TSD is cleared at boot so CPL 3 may use it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// TSC ticks in `us` microseconds.
pub fn us_to_ticks(us: u64) -> u64 {
    (us as u128 * tsc_khz() as u128 / 1000) as u64
}

/// Monotonic clock state: the TSC value last seen and the microseconds reported then.
static LAST_TSC: AtomicU64 = AtomicU64::new(0);
static LAST_US: AtomicU64 = AtomicU64::new(0);
/// Largest step [`now_us`] takes between two calls.
const MAX_STEP_US: u64 = 1_000_000;

/// A monotonic microsecond clock for protocol timers. It follows the TSC but never goes
/// backwards and advances at most one second per call, so a TSC that jumps (snapshot restore,
/// failover onto another host, a long pause) cannot stall or flood the network stack.
pub fn now_us() -> u64 {
    let tsc = rdtsc();
    let last = LAST_TSC.load(Ordering::Relaxed);
    let delta = tsc.wrapping_sub(last);
    if delta > u64::MAX / 2 {
        // The TSC went backwards: re-anchor without moving the clock.
        LAST_TSC.store(tsc, Ordering::Relaxed);
        return LAST_US.load(Ordering::Relaxed);
    }
    let khz = tsc_khz() as u128;
    let us = (delta as u128 * 1000 / khz) as u64;
    let step = if us > MAX_STEP_US {
        LAST_TSC.store(tsc, Ordering::Relaxed);
        MAX_STEP_US
    } else {
        // Advance by exactly the ticks accounted for, so remainders carry over.
        LAST_TSC.store(last + (us as u128 * khz / 1000) as u64, Ordering::Relaxed);
        us
    };
    LAST_US.fetch_add(step, Ordering::Relaxed) + step
}

/// A periodic deadline that re-anchors itself if the TSC jumps (e.g. across a snapshot
/// restore onto a host with a different TSC) instead of bursting or stalling.
pub struct Ticker {
    period: u64,
    next: u64,
}

impl Ticker {
    /// A ticker firing every `period_us` microseconds, first one period from now.
    pub fn new(period_us: u64) -> Self {
        let period = us_to_ticks(period_us).max(1);
        Self {
            period,
            next: rdtsc() + period,
        }
    }

    /// True (once) when the current period has elapsed; never blocks.
    pub fn poll(&mut self) -> bool {
        let now = rdtsc();
        if now.wrapping_add(2 * self.period) < self.next {
            // The clock went backwards: start over from now.
            self.next = now + self.period;
            return false;
        }
        if now < self.next {
            return false;
        }
        self.next += self.period;
        if now >= self.next + self.period {
            // More than a period behind (the VM was paused): skip the missed ticks.
            self.next = now + self.period;
        }
        true
    }

    /// Busy-waits for the next tick.
    pub fn wait(&mut self) {
        while !self.poll() {
            core::hint::spin_loop();
        }
    }
}
