//! Virtio devices (block, net) behind the virtio-mmio transport.

pub mod block;
pub mod block_request;
pub mod block_worker;
pub mod disk_log;
pub mod mmio;
pub mod net;
pub mod output;
pub mod tap;

use serde::{Deserialize, Serialize};
use virtio_queue::Queue;

use crate::memory::GuestMemory;

/// VIRTIO_F_VERSION_1: the device speaks virtio 1.x (modern).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Device id of virtio-net.
pub const TYPE_NET: u32 = 1;
/// Device id of virtio-blk.
pub const TYPE_BLOCK: u32 = 2;

/// Device-specific state carried in snapshots.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum DeviceSnapshot {
    /// virtio-blk: nothing beyond the transport and the backing file.
    Block,
    /// virtio-net: its MAC and a received frame still waiting for a guest buffer.
    Net {
        /// The MAC the guest sees.
        mac: [u8; 6],
        /// A frame read from the tap that no receive buffer has taken yet (without the virtio
        /// header); it reaches the guest after a restore or failover as it would have here.
        rx_pending: Option<Vec<u8>>,
    },
}

/// The device half of a virtio device; the transport owns the queues and calls into it.
pub trait VirtioDevice: Send {
    /// Virtio device id.
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &'static [u16];
    /// Features the device offers.
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver notified queue `index`; returns true if used buffers were added.
    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemory) -> bool;
    /// Work from the host side (received packets); returns true if used buffers were added.
    fn poll_backend(&mut self, _queues: &mut [Queue], _mem: &GuestMemory) -> bool {
        false
    }
    /// Whether host-side work is stuck waiting for the guest (e.g. no receive buffers).
    fn backend_blocked(&self) -> bool {
        false
    }
    /// Device-specific snapshot state.
    fn snapshot(&self) -> DeviceSnapshot;
    /// Loads device-specific state taken from a device of the same kind.
    fn restore(&mut self, s: &DeviceSnapshot) -> Result<(), String>;
}

/// Copies the part of `config` at `offset` into `data`; bytes past its end read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = config.get(offset as usize + i).copied().unwrap_or(0);
    }
}
