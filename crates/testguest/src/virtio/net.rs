//! virtio-net: polled receive and transmit of Ethernet frames.
//!
//! Receive buffers are posted once and recycled; transmit uses a fixed pool of buffers that
//! return to the pool when the device has consumed them. Notifications are batched: callers
//! queue work and then call [`NetDev::kick`].

use alloc::vec::Vec;

use super::{Buf, Found, InitError, Mmio, VirtQueue, F_VERSION_1};
use crate::heap::alloc_dma;

const F_MAC: u64 = 1 << 5;

/// `struct virtio_net_hdr_v1` (all zero: no offloads).
pub const HDR_LEN: usize = 12;
/// Room for one frame without offloads: header + 1514-byte frame, rounded up.
const BUF_LEN: usize = 2048;
/// Largest Ethernet frame (without FCS) sent or received.
pub const MAX_FRAME: usize = 1514;
const QUEUE_MAX: u16 = 256;

/// The receive side.
pub struct RxQueue {
    queue: VirtQueue,
    bufs: Vec<&'static mut [u8]>,
    kick: bool,
}

/// The transmit side.
pub struct TxQueue {
    queue: VirtQueue,
    bufs: Vec<&'static mut [u8]>,
    free: Vec<usize>,
    kick: bool,
}

/// A virtio network device.
pub struct NetDev {
    pub rx: RxQueue,
    pub tx: TxQueue,
    mac: [u8; 6],
}

impl NetDev {
    /// Brings up the device found by [`super::probe`] and posts all receive buffers.
    pub fn new(found: Found) -> Result<Self, InitError> {
        let mmio: Mmio = found.mmio;
        let features = mmio.negotiate(F_VERSION_1 | F_MAC, F_VERSION_1)?;
        let mut mac = [0u8; 6];
        if features & F_MAC != 0 {
            for (i, b) in mac.iter_mut().enumerate() {
                *b = mmio.config_u8(i);
            }
        } else {
            // Locally administered fallback.
            mac = [0x02, 0x66, 0x74, 0x76, 0x6d, found.slot as u8];
        }
        let rxq = VirtQueue::new(mmio, 0, QUEUE_MAX)?;
        let txq = VirtQueue::new(mmio, 1, QUEUE_MAX)?;
        let mut rx = RxQueue {
            bufs: (0..rxq.size()).map(|_| alloc_dma(BUF_LEN)).collect(),
            queue: rxq,
            kick: false,
        };
        let tx = TxQueue {
            bufs: (0..txq.size()).map(|_| alloc_dma(BUF_LEN)).collect(),
            free: (0..txq.size() as usize).collect(),
            queue: txq,
            kick: false,
        };
        mmio.driver_ok();
        for i in 0..rx.bufs.len() {
            rx.post(i);
        }
        rx.queue.notify();
        rx.kick = false;
        Ok(Self { rx, tx, mac })
    }

    /// The MAC address from the device configuration.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Sends pending notifications to the device.
    pub fn kick(&mut self) {
        if core::mem::take(&mut self.rx.kick) {
            self.rx.queue.notify();
        }
        if core::mem::take(&mut self.tx.kick) {
            self.tx.queue.notify();
        }
    }
}

impl RxQueue {
    fn post(&mut self, i: usize) {
        let buf = Buf::write(self.bufs[i]);
        let ok = self.queue.add(&[buf], i);
        debug_assert!(ok, "rx queue has room for every buffer");
        self.kick = true;
    }

    /// The next received frame (buffer index and frame length), if any.
    pub fn poll(&mut self) -> Option<(usize, usize)> {
        let (i, len) = self.queue.pop_used()?;
        let len = (len as usize).clamp(HDR_LEN, BUF_LEN) - HDR_LEN;
        Some((i, len))
    }

    /// The frame in buffer `i`.
    pub fn frame(&self, i: usize, len: usize) -> &[u8] {
        &self.bufs[i][HDR_LEN..HDR_LEN + len]
    }

    /// Gives buffer `i` back to the device.
    pub fn recycle(&mut self, i: usize) {
        self.post(i);
    }
}

impl TxQueue {
    fn reclaim(&mut self) {
        while let Some((i, _)) = self.queue.pop_used() {
            self.free.push(i);
        }
    }

    /// True if a frame can be queued now.
    pub fn ready(&mut self) -> bool {
        if self.free.is_empty() {
            self.reclaim();
        }
        !self.free.is_empty()
    }

    /// Queues a frame of `len` bytes filled in by `fill`; None if no buffer is free.
    pub fn send<R>(&mut self, len: usize, fill: impl FnOnce(&mut [u8]) -> R) -> Option<R> {
        assert!(len <= BUF_LEN - HDR_LEN, "frame too long");
        if !self.ready() {
            return None;
        }
        let i = self.free.pop()?;
        let buf = &mut self.bufs[i];
        buf[..HDR_LEN].fill(0);
        let r = fill(&mut buf[HDR_LEN..HDR_LEN + len]);
        let ok = self.queue.add(&[Buf::read(&buf[..HDR_LEN + len])], i);
        debug_assert!(ok, "tx queue has room for every buffer");
        self.kick = true;
        Some(r)
    }
}
