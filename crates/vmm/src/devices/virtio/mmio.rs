//! The virtio-mmio transport (virtio 1.x, register layout version 2).

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{DeviceSnapshot, VirtioDevice};
use crate::devices::BusDevice;
use crate::memory::GuestMemory;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4654_564d; // "FTVM"

/// Interrupt status bit: the device used buffers.
const INT_VRING: u32 = 1;
/// Interrupt status bit: the configuration changed.
const INT_CONFIG: u32 = 2;

/// Device status bit DRIVER_OK.
const STATUS_DRIVER_OK: u32 = 4;
/// Device status bit FAILED.
const STATUS_FAILED: u32 = 0x80;

/// Snapshot of one queue's transport-visible state.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct QueueSnapshot {
    max_size: u16,
    size: u16,
    ready: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
    next_avail: u16,
    next_used: u16,
    event_idx: bool,
}

/// Snapshot of a virtio-mmio device: transport registers, queues, device state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MmioSnapshot {
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
    queues: Vec<QueueSnapshot>,
    /// The device-specific part.
    pub device: DeviceSnapshot,
}

/// Offset of the QueueNotify register (an I/O thread's ioeventfd sits here).
pub const QUEUE_NOTIFY: u64 = 0x050;

/// A descriptor chain an I/O thread took from a queue, to give back with `complete`.
pub struct PoppedChain {
    queue: usize,
    head: u16,
    generation: u64,
    /// The chain's descriptors: guest address, length, device-writable.
    pub descs: Vec<super::block_request::Desc>,
}

/// A virtio device on its MMIO window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    irq: EventFd,
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
    paused: bool,
    /// Bumped whenever the queues are replaced (reset, restore), so a chain popped before
    /// is not completed into the new queues.
    queue_generation: u64,
}

fn new_queues(max_sizes: &[u16]) -> Vec<Queue> {
    max_sizes
        .iter()
        .map(|&m| {
            Queue::new(m).unwrap_or_else(|_| Queue::new(256).expect("256 is a valid queue size"))
        })
        .collect()
}

impl MmioTransport {
    /// Wraps `device`; its interrupt is signalled through `irq` (an irqfd).
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemory, irq: EventFd) -> Self {
        let queues = new_queues(device.queue_max_sizes());
        Self {
            device,
            mem,
            irq,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
            paused: false,
            queue_generation: 0,
        }
    }

    /// Restores transport registers and queues from a snapshot taken of the same kind of device.
    pub fn restore(&mut self, s: &MmioSnapshot) -> Result<(), String> {
        if s.queues.len() != self.queues.len() {
            return Err(format!(
                "snapshot has {} queues, device has {}",
                s.queues.len(),
                self.queues.len()
            ));
        }
        self.device.restore(&s.device)?;
        self.queue_generation += 1;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.acked_features = s.acked_features;
        self.queue_sel = s.queue_sel;
        self.status = s.status;
        self.interrupt_status = s.interrupt_status;
        self.config_generation = s.config_generation;
        for (q, qs) in self.queues.iter_mut().zip(&s.queues) {
            let state = virtio_queue::QueueState {
                max_size: qs.max_size,
                next_avail: qs.next_avail,
                next_used: qs.next_used,
                event_idx_enabled: qs.event_idx,
                size: qs.size,
                ready: qs.ready,
                desc_table: qs.desc_table,
                avail_ring: qs.avail_ring,
                used_ring: qs.used_ring,
            };
            *q = Queue::try_from(state).map_err(|e| format!("invalid queue state: {e}"))?;
        }
        // An interrupt pending at snapshot time must reach the guest again.
        if self.interrupt_status != 0 {
            let _ = self.irq.write(1);
        }
        Ok(())
    }

    /// Transport and device state.
    pub fn snapshot(&self) -> MmioSnapshot {
        MmioSnapshot {
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            status: self.status,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: self
                .queues
                .iter()
                .map(|q| QueueSnapshot {
                    max_size: q.max_size(),
                    size: q.size(),
                    ready: q.ready(),
                    desc_table: q.desc_table(),
                    avail_ring: q.avail_ring(),
                    used_ring: q.used_ring(),
                    next_avail: q.next_avail(),
                    next_used: q.next_used(),
                    event_idx: q.event_idx_enabled(),
                })
                .collect(),
            device: self.device.snapshot(),
        }
    }

    /// Stops (or restarts) host-side work such as packet receive, for pause and snapshot.
    pub fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
    }

    fn driver_ok(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0 && self.status & STATUS_FAILED == 0
    }

    fn signal_used(&mut self) {
        self.interrupt_status |= INT_VRING;
        let _ = self.irq.write(1);
    }

    /// Runs host-side device work (e.g. delivers received frames) unless paused.
    pub fn poll_backend(&mut self) {
        if self.paused || !self.driver_ok() {
            return;
        }
        if self.device.poll_backend(&mut self.queues, &self.mem) {
            self.signal_used();
        }
    }

    /// Whether host-side work should wait for a kick rather than for backend input.
    pub fn backend_waiting(&self) -> bool {
        self.paused || !self.driver_ok() || self.device.backend_blocked()
    }

    /// Takes the next available chain of `queue` for an I/O thread (none unless the driver is
    /// ready). The chain's length is bounded by the queue size.
    pub fn pop_chain(&mut self, queue: usize) -> Option<PoppedChain> {
        if !self.driver_ok() {
            return None;
        }
        let q = self.queues.get_mut(queue)?;
        if !q.ready() {
            return None;
        }
        let chain = q.pop_descriptor_chain(&self.mem)?;
        let head = chain.head_index();
        let descs = chain
            .map(|d| (d.addr(), d.len(), d.is_write_only()))
            .collect();
        Some(PoppedChain {
            queue,
            head,
            generation: self.queue_generation,
            descs,
        })
    }

    /// Puts a chain served by an I/O thread in the used ring (`used` bytes written to it) and
    /// interrupts the guest; dropped if the queues were reset meanwhile.
    pub fn complete(&mut self, chain: PoppedChain, used: u32) {
        if chain.generation != self.queue_generation {
            return;
        }
        let Some(q) = self.queues.get_mut(chain.queue) else {
            return;
        };
        if q.add_used(&self.mem, chain.head, used).is_ok() {
            self.signal_used();
        }
    }

    fn reset(&mut self) {
        self.queue_generation += 1;
        self.queues = new_queues(self.device.queue_max_sizes());
        self.acked_features = 0;
        self.driver_features_sel = 0;
        self.device_features_sel = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt_status = 0;
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => self.device.device_type(),
            0x00c => VENDOR_ID,
            0x010 => {
                let f = self.device.features();
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            0x034 => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            0x044 => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            0x060 => self.interrupt_status,
            0x070 => self.status,
            0x0fc => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        // Queue layout registers may only change while the queue is not ready.
        let set_addr = |q: &mut Queue, which: u64, low: Option<u32>, high: Option<u32>| match which
        {
            0 => q.set_desc_table_address(low, high),
            1 => q.set_avail_ring_address(low, high),
            _ => q.set_used_ring_address(low, high),
        };
        match offset {
            0x014 => self.device_features_sel = v,
            0x020 => {
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                let mask = 0xffff_ffffu64 << shift;
                let offered = self.device.features();
                self.acked_features =
                    (self.acked_features & !mask) | ((u64::from(v) << shift) & offered & mask);
            }
            0x024 => self.driver_features_sel = v,
            0x030 => self.queue_sel = v,
            0x038 => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(v as u16);
                }
            }
            0x044 => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            0x050 => self.notify(v as usize),
            0x064 => self.interrupt_status &= !v,
            0x070 => {
                if v == 0 {
                    self.reset();
                } else {
                    self.status = v;
                }
            }
            0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 => {
                let which = (offset - 0x080) / 0x10;
                let high = offset & 4 != 0;
                if let Some(q) = self.selected_queue() {
                    if !q.ready() {
                        if high {
                            set_addr(q, which, None, Some(v));
                        } else {
                            set_addr(q, which, Some(v), None);
                        }
                    }
                }
            }
            _ => {}
        }
    }

    fn notify(&mut self, index: usize) {
        if !self.driver_ok() || index >= self.queues.len() {
            return;
        }
        if self
            .device
            .process_queue(index, &mut self.queues, &self.mem)
        {
            self.signal_used();
        }
    }

    /// Raises a configuration-change interrupt (e.g. link state change).
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt_status |= INT_CONFIG;
        let _ = self.irq.write(1);
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.device.read_config(offset - 0x100, data);
            return;
        }
        let v = self.read_reg(offset & !3);
        let bytes = v.to_le_bytes();
        let start = (offset & 3) as usize;
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(start + i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            return; // Neither of our devices has writable configuration.
        }
        if data.len() != 4 {
            return; // The register area only takes 32-bit accesses.
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_reg(offset, v);
    }
}

#[cfg(test)]
#[path = "mmio_tests.rs"]
mod tests;
