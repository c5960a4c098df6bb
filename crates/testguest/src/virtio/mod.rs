//! A small polled virtio driver: modern (version 2) virtio-mmio transport and split
//! virtqueues. Guest-physical addresses equal virtual ones (identity map), so any RAM address
//! can be handed to a device directly.

pub mod blk;
pub mod net;

use alloc::vec;
use alloc::vec::Vec;
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

use crate::heap::alloc_dma;

/// First virtio-mmio window and the spacing of the windows.
const MMIO_BASE: usize = 0xd000_0000;
const MMIO_STRIDE: usize = 0x1000;
const MMIO_SLOTS: usize = 8;

/// "virt" in little endian.
const MAGIC: u32 = 0x7472_6976;
/// Device IDs.
pub const DEVICE_NET: u32 = 1;
pub const DEVICE_BLOCK: u32 = 2;

// Register offsets (virtio 1.x, MMIO transport).
const REG_MAGIC: usize = 0x000;
const REG_VERSION: usize = 0x004;
const REG_DEVICE_ID: usize = 0x008;
const REG_DEVICE_FEATURES: usize = 0x010;
const REG_DEVICE_FEATURES_SEL: usize = 0x014;
const REG_DRIVER_FEATURES: usize = 0x020;
const REG_DRIVER_FEATURES_SEL: usize = 0x024;
const REG_QUEUE_SEL: usize = 0x030;
const REG_QUEUE_NUM_MAX: usize = 0x034;
const REG_QUEUE_NUM: usize = 0x038;
const REG_QUEUE_READY: usize = 0x044;
const REG_QUEUE_NOTIFY: usize = 0x050;
const REG_STATUS: usize = 0x070;
const REG_QUEUE_DESC: usize = 0x080;
const REG_QUEUE_DRIVER: usize = 0x090;
const REG_QUEUE_DEVICE: usize = 0x0a0;
const REG_CONFIG: usize = 0x100;

// Device status bits.
const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_FAILED: u32 = 128;

/// Feature bit every modern device offers.
pub const F_VERSION_1: u64 = 1 << 32;

// Descriptor flags.
const DESC_NEXT: u16 = 1;
const DESC_WRITE: u16 = 2;
/// avail.flags: do not interrupt (this guest polls).
const AVAIL_NO_INTERRUPT: u16 = 1;
/// used.flags: the device does not need notifications.
const USED_NO_NOTIFY: u16 = 1;

/// One virtio-mmio register window.
#[derive(Clone, Copy)]
pub struct Mmio {
    base: usize,
}

impl Mmio {
    fn read(&self, reg: usize) -> u32 {
        // SAFETY: `base` is a virtio-mmio window (identity mapped, user accessible) and `reg`
        // a 4-byte aligned register inside it.
        unsafe { read_volatile((self.base + reg) as *const u32) }
    }

    fn write(&self, reg: usize, value: u32) {
        // SAFETY: as for `read`.
        unsafe { write_volatile((self.base + reg) as *mut u32, value) }
    }

    fn write64(&self, reg: usize, value: u64) {
        self.write(reg, value as u32);
        self.write(reg + 4, (value >> 32) as u32);
    }

    /// Reads one byte of the device-specific configuration space.
    pub fn config_u8(&self, offset: usize) -> u8 {
        // SAFETY: the configuration space follows the registers inside the same window.
        unsafe { read_volatile((self.base + REG_CONFIG + offset) as *const u8) }
    }

    /// Reads a little-endian u32 of the configuration space.
    pub fn config_u32(&self, offset: usize) -> u32 {
        // SAFETY: as for `config_u8`; `offset` is 4-byte aligned.
        unsafe { read_volatile((self.base + REG_CONFIG + offset) as *const u32) }
    }
}

/// A device found in a virtio-mmio slot.
#[derive(Clone, Copy)]
pub struct Found {
    pub slot: usize,
    pub device_id: u32,
    pub mmio: Mmio,
}

/// Lists the devices present in the virtio-mmio windows.
pub fn probe() -> Vec<Found> {
    (0..MMIO_SLOTS)
        .map(|slot| {
            (
                slot,
                Mmio {
                    base: MMIO_BASE + slot * MMIO_STRIDE,
                },
            )
        })
        .filter(|(_, m)| m.read(REG_MAGIC) == MAGIC)
        .map(|(slot, mmio)| Found {
            slot,
            device_id: mmio.read(REG_DEVICE_ID),
            mmio,
        })
        .filter(|f| f.device_id != 0)
        .collect()
}

/// The first device of type `device_id`.
pub fn find(device_id: u32) -> Option<Found> {
    probe().into_iter().find(|f| f.device_id == device_id)
}

/// Why a device could not be brought up (fields are shown through `Debug`).
#[derive(Debug)]
#[allow(dead_code)]
pub enum InitError {
    /// Not a version-2 (modern) window.
    LegacyTransport(u32),
    /// The device lacks a feature the driver needs.
    MissingFeatures(u64),
    /// The device refused the features.
    FeaturesRejected,
    /// A queue does not exist.
    NoQueue(u16),
}

impl Mmio {
    /// Resets the device and negotiates `wanted` features, of which `required` must be
    /// offered. Returns the negotiated set; the caller then sets up queues and calls
    /// [`Mmio::driver_ok`].
    pub fn negotiate(&self, wanted: u64, required: u64) -> Result<u64, InitError> {
        let version = self.read(REG_VERSION);
        if version != 2 {
            return Err(InitError::LegacyTransport(version));
        }
        self.write(REG_STATUS, 0);
        self.write(REG_STATUS, STATUS_ACKNOWLEDGE);
        self.write(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        let mut offered = 0u64;
        for sel in 0..2 {
            self.write(REG_DEVICE_FEATURES_SEL, sel);
            offered |= (self.read(REG_DEVICE_FEATURES) as u64) << (32 * sel);
        }
        if offered & required != required {
            self.write(REG_STATUS, STATUS_FAILED);
            return Err(InitError::MissingFeatures(required & !offered));
        }
        let features = offered & wanted;
        for sel in 0..2 {
            self.write(REG_DRIVER_FEATURES_SEL, sel);
            self.write(REG_DRIVER_FEATURES, (features >> (32 * sel)) as u32);
        }
        let status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        self.write(REG_STATUS, status);
        if self.read(REG_STATUS) & STATUS_FEATURES_OK == 0 {
            self.write(REG_STATUS, STATUS_FAILED);
            return Err(InitError::FeaturesRejected);
        }
        Ok(features)
    }

    /// Tells the device the driver is ready.
    pub fn driver_ok(&self) {
        let status = self.read(REG_STATUS);
        self.write(REG_STATUS, status | STATUS_DRIVER_OK);
    }
}

/// One descriptor of a split virtqueue.
#[repr(C)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// A buffer of a request: guest address, length, and whether the device writes it.
#[derive(Clone, Copy)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub device_writes: bool,
}

impl Buf {
    /// A buffer the device reads.
    pub fn read(data: &[u8]) -> Self {
        Self {
            addr: data.as_ptr() as u64,
            len: data.len() as u32,
            device_writes: false,
        }
    }

    /// A buffer the device writes.
    pub fn write(data: &mut [u8]) -> Self {
        Self {
            addr: data.as_mut_ptr() as u64,
            len: data.len() as u32,
            device_writes: true,
        }
    }
}

/// A split virtqueue driven by polling. Each chain carries a caller-chosen token that is
/// handed back when the device returns the chain.
pub struct VirtQueue {
    mmio: Mmio,
    index: u16,
    size: u16,
    desc: *mut Desc,
    /// flags, idx, ring[size], used_event
    avail: *mut u16,
    /// flags, idx, then ring[size] of (id: u32, len: u32), avail_event
    used: *mut u16,
    free_head: u16,
    num_free: u16,
    avail_idx: u16,
    last_used: u16,
    tokens: Vec<usize>,
}

impl VirtQueue {
    /// Creates queue `index` with at most `max_size` entries (rounded down to a power of 2).
    pub fn new(mmio: Mmio, index: u16, max_size: u16) -> Result<Self, InitError> {
        mmio.write(REG_QUEUE_SEL, index as u32);
        let dev_max = mmio.read(REG_QUEUE_NUM_MAX);
        if dev_max == 0 {
            return Err(InitError::NoQueue(index));
        }
        let want = (dev_max as u16).min(max_size).max(1);
        let size = 1u16 << (15 - want.leading_zeros()); // largest power of 2 <= want
        let n = size as usize;
        let desc = alloc_dma(16 * n).as_mut_ptr() as *mut Desc;
        let avail = alloc_dma(6 + 2 * n).as_mut_ptr() as *mut u16;
        let used = alloc_dma(6 + 8 * n).as_mut_ptr() as *mut u16;
        for i in 0..n {
            // SAFETY: `desc` holds `n` zeroed descriptors; chain them into the free list.
            unsafe { (*desc.add(i)).next = (i as u16 + 1) % size };
        }
        // SAFETY: `avail` points at a zeroed avail ring; flags is its first field.
        unsafe { write_volatile(avail, AVAIL_NO_INTERRUPT) };
        mmio.write(REG_QUEUE_NUM, size as u32);
        mmio.write64(REG_QUEUE_DESC, desc as u64);
        mmio.write64(REG_QUEUE_DRIVER, avail as u64);
        mmio.write64(REG_QUEUE_DEVICE, used as u64);
        mmio.write(REG_QUEUE_READY, 1);
        Ok(Self {
            mmio,
            index,
            size,
            desc,
            avail,
            used,
            free_head: 0,
            num_free: size,
            avail_idx: 0,
            last_used: 0,
            tokens: vec![0; n],
        })
    }

    /// Number of entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Makes a chain of `bufs` available to the device (without notifying it).
    /// Returns false if there are not enough free descriptors.
    ///
    /// The buffers must stay valid and untouched by the driver until the chain comes back
    /// from [`VirtQueue::pop_used`].
    pub fn add(&mut self, bufs: &[Buf], token: usize) -> bool {
        if bufs.is_empty() || bufs.len() > self.num_free as usize {
            return false;
        }
        let head = self.free_head;
        let mut id = head;
        for (i, b) in bufs.iter().enumerate() {
            // SAFETY: `id` < size: it comes from the free list of in-range indices.
            let d = unsafe { &mut *self.desc.add(id as usize) };
            d.addr = b.addr;
            d.len = b.len;
            let last = i + 1 == bufs.len();
            d.flags =
                if b.device_writes { DESC_WRITE } else { 0 } | if last { 0 } else { DESC_NEXT };
            if last {
                self.free_head = d.next;
            } else {
                id = d.next;
            }
        }
        self.num_free -= bufs.len() as u16;
        self.tokens[head as usize] = token;
        let slot = 2 + (self.avail_idx % self.size) as usize;
        // SAFETY: `slot` indexes avail.ring, inside the allocation.
        unsafe { write_volatile(self.avail.add(slot), head) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // The descriptors and ring entry must be visible before the index.
        fence(Ordering::SeqCst);
        // SAFETY: avail.idx is the second u16.
        unsafe { write_volatile(self.avail.add(1), self.avail_idx) };
        true
    }

    /// Notifies the device that new buffers are available (unless it asked not to be).
    pub fn notify(&self) {
        fence(Ordering::SeqCst);
        // SAFETY: used.flags is the first u16 of the used ring.
        let flags = unsafe { read_volatile(self.used) };
        if flags & USED_NO_NOTIFY == 0 {
            self.mmio.write(REG_QUEUE_NOTIFY, self.index as u32);
        }
    }

    /// Takes the next chain the device has finished: its token and the number of bytes the
    /// device wrote.
    pub fn pop_used(&mut self) -> Option<(usize, u32)> {
        // SAFETY: used.idx is the second u16 of the used ring.
        let used_idx = unsafe { read_volatile(self.used.add(1)) };
        if used_idx == self.last_used {
            return None;
        }
        fence(Ordering::SeqCst);
        let slot = (self.last_used % self.size) as usize;
        // SAFETY: used.ring starts 4 bytes in; entry `slot` is in range.
        let (id, len) = unsafe {
            let elem = (self.used as *const u8).add(4 + 8 * slot) as *const u32;
            (read_volatile(elem), read_volatile(elem.add(1)))
        };
        self.last_used = self.last_used.wrapping_add(1);
        let head = (id as u16) % self.size;
        // Return the chain to the free list.
        let mut tail = head;
        let mut count = 1;
        loop {
            // SAFETY: `tail` < size (a descriptor index of this queue).
            let d = unsafe { &mut *self.desc.add(tail as usize) };
            if d.flags & DESC_NEXT == 0 {
                d.next = self.free_head;
                break;
            }
            tail = d.next;
            count += 1;
        }
        self.free_head = head;
        self.num_free += count;
        Some((self.tokens[head as usize], len))
    }

    /// Adds a chain, notifies, and busy-waits for it to come back (for synchronous requests
    /// on an otherwise idle queue). Returns the bytes written by the device.
    pub fn submit_and_wait(&mut self, bufs: &[Buf]) -> u32 {
        assert!(self.add(bufs, 0), "virtqueue full");
        self.notify();
        loop {
            if let Some((_, len)) = self.pop_used() {
                return len;
            }
            core::hint::spin_loop();
        }
    }
}
