//! A block backend wrapper that fails on demand, for testing failover paths.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::BlockBackend;

/// The switch shared between a [`FaultyBackend`] and the test that controls it.
#[derive(Debug, Default)]
pub struct FaultSwitch {
    fail_reads: AtomicBool,
    fail_writes: AtomicBool,
    failures: AtomicU64,
}

impl FaultSwitch {
    /// A switch with faults off.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }
    /// Makes every read (and flush) fail from now on, or stop failing.
    pub fn fail_reads(&self, on: bool) {
        self.fail_reads.store(on, Ordering::SeqCst);
    }
    /// Makes every write (and flush) fail from now on, or stop failing.
    pub fn fail_writes(&self, on: bool) {
        self.fail_writes.store(on, Ordering::SeqCst);
    }
    /// How many operations have failed so far.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::SeqCst)
    }
    fn check(&self, flag: &AtomicBool, what: &str) -> io::Result<()> {
        if flag.load(Ordering::SeqCst) {
            self.failures.fetch_add(1, Ordering::SeqCst);
            return Err(io::Error::other(format!("injected {what} error")));
        }
        Ok(())
    }
}

/// Wraps a backend; operations fail while its [`FaultSwitch`] says so.
pub struct FaultyBackend {
    inner: Box<dyn BlockBackend>,
    switch: Arc<FaultSwitch>,
}

impl FaultyBackend {
    /// Wraps `inner`, controlled by `switch`.
    pub fn new(inner: Box<dyn BlockBackend>, switch: Arc<FaultSwitch>) -> Self {
        Self { inner, switch }
    }
}

impl BlockBackend for FaultyBackend {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.switch.check(&self.switch.fail_reads, "read")?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.switch.check(&self.switch.fail_writes, "write")?;
        self.inner.write_at(buf, offset)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.switch.check(&self.switch.fail_writes, "flush")?;
        self.inner.flush()
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.switch.check(&self.switch.fail_writes, "write")?;
        self.inner.write_zeroes(offset, len)
    }

    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
}
