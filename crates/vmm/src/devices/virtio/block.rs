//! virtio-blk over a `storage::BlockBackend` (raw or qcow2): read, write, flush, get-id.
//! Requests are served synchronously when the guest notifies the queue.

use std::sync::{Arc, Mutex};

use storage::BlockBackend;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::disk_log::DiskLog;
use super::{read_config_bytes, DeviceSnapshot, VirtioDevice, TYPE_BLOCK, VIRTIO_F_VERSION_1};
use crate::memory::GuestMemory;

const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

const SECTOR: u64 = 512;
const QUEUE_SIZES: &[u16] = &[256];
const SEG_MAX: u32 = 126;

/// A disk backend shared between the device and the FT engine (the backup applies writes).
pub type SharedBackend = Arc<Mutex<Box<dyn BlockBackend>>>;

/// A virtio block device.
pub struct Block {
    backend: SharedBackend,
    id: String,
    config: Vec<u8>,
    log: Arc<DiskLog>,
}

impl Block {
    /// A block device serving `backend`; `id` is what GET_ID returns (at most 20 bytes).
    pub fn new(backend: Box<dyn BlockBackend>, id: &str) -> Self {
        let sectors = backend.size() / SECTOR;
        let backend = Arc::new(Mutex::new(backend));
        let mut config = vec![0u8; 24];
        config[0..8].copy_from_slice(&sectors.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        Self {
            backend,
            id: id.chars().take(20).collect(),
            config,
            log: Arc::default(),
        }
    }

    /// The backend, shared.
    pub fn backend(&self) -> SharedBackend {
        self.backend.clone()
    }

    /// The FT write log of this disk.
    pub fn log(&self) -> Arc<DiskLog> {
        self.log.clone()
    }

    /// Serves one request; returns the number of bytes written into guest memory and the status.
    fn serve(&mut self, mem: &GuestMemory, descs: &[(GuestAddress, u32, bool)]) -> (u32, u8) {
        let Some((&(hdr_addr, hdr_len, _), rest)) = descs.split_first() else {
            return (0, S_IOERR);
        };
        if hdr_len < 16 {
            return (0, S_IOERR);
        }
        let Ok(req_type) = mem.read_obj::<u32>(hdr_addr) else {
            return (0, S_IOERR);
        };
        let Ok(sector) = mem.read_obj::<u64>(GuestAddress(hdr_addr.0 + 8)) else {
            return (0, S_IOERR);
        };
        let data = &rest[..rest.len().saturating_sub(1)];
        let mut written = 0u32;
        let mut offset = sector.saturating_mul(SECTOR);
        let status = match req_type {
            T_IN => {
                for &(addr, len, _) in data {
                    let mut buf = vec![0u8; len as usize];
                    if crate::devices::lock(&self.backend)
                        .read_at(&mut buf, offset)
                        .is_err()
                        || mem.write_slice(&buf, addr).is_err()
                    {
                        return (written, S_IOERR);
                    }
                    written += len;
                    offset += u64::from(len);
                }
                S_OK
            }
            T_OUT => {
                for &(addr, len, _) in data {
                    let mut buf = vec![0u8; len as usize];
                    if mem.read_slice(&mut buf, addr).is_err()
                        || crate::devices::lock(&self.backend)
                            .write_at(&buf, offset)
                            .is_err()
                    {
                        return (written, S_IOERR);
                    }
                    self.log.record(offset, &buf);
                    offset += u64::from(len);
                }
                S_OK
            }
            T_FLUSH => match crate::devices::lock(&self.backend).flush() {
                Ok(()) => S_OK,
                Err(_) => S_IOERR,
            },
            T_GET_ID => {
                if let Some(&(addr, len, _)) = data.first() {
                    let mut id = self.id.as_bytes().to_vec();
                    id.resize(20.min(len as usize), 0);
                    if mem.write_slice(&id, addr).is_err() {
                        return (0, S_IOERR);
                    }
                    written += id.len() as u32;
                }
                S_OK
            }
            _ => S_UNSUPP,
        };
        (written, status)
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
        let ro = if crate::devices::lock(&self.backend).read_only() {
            VIRTIO_BLK_F_RO
        } else {
            0
        };
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_SEG_MAX | ro
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemory) -> bool {
        let Some(queue) = queues.get_mut(index) else {
            return false;
        };
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let descs: Vec<(GuestAddress, u32, bool)> = chain
                .map(|d| (d.addr(), d.len(), d.is_write_only()))
                .collect();
            let (written, status) = self.serve(mem, &descs);
            if let Some(&(status_addr, _, true)) = descs.last() {
                let _ = mem.write_obj(status, status_addr);
            }
            let _ = queue.add_used(mem, head, written + 1);
            used = true;
        }
        used
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
