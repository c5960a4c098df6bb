//! virtio-blk over a `storage::BlockBackend` (raw or qcow2): read, write, flush, get-id.
//! Requests are served by the disk's I/O thread ([`super::block_worker`]), never on a vCPU
//! thread: the queue notify only signals that thread.

use std::sync::{Arc, Mutex};

use storage::BlockBackend;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::block_request::{SECTOR, SEG_MAX, SIZE_MAX};
use super::{read_config_bytes, DeviceSnapshot, VirtioDevice, TYPE_BLOCK, VIRTIO_F_VERSION_1};
use crate::memory::GuestMemory;

const VIRTIO_BLK_F_SIZE_MAX: u64 = 1 << 1;
const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

const QUEUE_SIZES: &[u16] = &[256];

/// A disk backend shared between the device and the FT engine (the backup applies writes).
pub type SharedBackend = Arc<Mutex<Box<dyn BlockBackend>>>;

/// The guest-facing half of a virtio block device: features, configuration space, and the
/// eventfd that wakes the disk's I/O thread.
pub struct Block {
    read_only: bool,
    config: Vec<u8>,
    notify: EventFd,
}

impl Block {
    /// A block device for `backend` whose queue notifications signal `notify`.
    pub fn new(backend: &SharedBackend, notify: EventFd) -> Self {
        let b = crate::devices::lock(backend);
        let sectors = b.size() / SECTOR;
        let mut config = vec![0u8; 24];
        config[0..8].copy_from_slice(&sectors.to_le_bytes());
        config[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        Self {
            read_only: b.read_only(),
            config,
            notify,
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &'static [u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        let ro = if self.read_only { VIRTIO_BLK_F_RO } else { 0 };
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_SIZE_MAX | ro
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn process_queue(&mut self, index: usize, _queues: &mut [Queue], _mem: &GuestMemory) -> bool {
        // A notify the ioeventfd did not catch (another value, or no ioeventfd): the I/O
        // thread serves the queue either way.
        if index == 0 {
            let _ = self.notify.write(1);
        }
        false
    }

    fn snapshot(&self) -> DeviceSnapshot {
        DeviceSnapshot::Block
    }

    fn restore(&mut self, s: &DeviceSnapshot) -> Result<(), String> {
        match s {
            DeviceSnapshot::Block => Ok(()),
            other => Err(format!("a block device cannot load {other:?}")),
        }
    }
}
