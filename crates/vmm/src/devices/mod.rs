//! Emulated devices and the buses that route guest port and MMIO accesses to them.

pub mod i8042;
pub mod power;
pub mod serial;
pub mod virtio;

use std::sync::{Arc, Mutex};

/// A device reachable on the port-I/O or MMIO bus.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset` into the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset` into the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A shared device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Routes accesses to the device whose range contains the address.
#[derive(Default, Clone)]
pub struct Bus {
    ranges: Vec<(u64, u64, SharedDevice)>,
}

impl Bus {
    /// Adds `device` at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) {
        self.ranges.push((base, len, device));
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        self.ranges
            .iter()
            .find(|(base, len, _)| addr >= *base && addr - *base < *len)
            .map(|(base, _, dev)| (addr - base, dev))
    }

    /// Dispatches a read; unclaimed addresses read as all ones (a floating bus).
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some((offset, dev)) => lock(dev).read(offset, data),
            None => data.fill(0xff),
        }
    }

    /// Dispatches a write; unclaimed addresses ignore it.
    pub fn write(&self, addr: u64, data: &[u8]) {
        if let Some((offset, dev)) = self.find(addr) {
            lock(dev).write(offset, data);
        }
    }
}

/// Locks a device, carrying on if a previous holder panicked (the state is still usable).
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
