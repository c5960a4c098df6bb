//! virtio-blk: synchronous multi-sector reads, writes and flushes.

use alloc::boxed::Box;

use super::{Buf, Found, InitError, VirtQueue, F_VERSION_1};

/// Bytes per sector.
pub const SECTOR_SIZE: usize = 512;

const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;

const S_OK: u8 = 0;

/// The request header and status byte, kept at a stable address while a request runs.
#[repr(C)]
struct ReqBlock {
    kind: u32,
    reserved: u32,
    sector: u64,
    status: u8,
}

/// A block-device error (fields are shown through `Debug`).
#[derive(Debug)]
#[allow(dead_code)]
pub enum BlkError {
    /// The device answered with this status (1 = I/O error, 2 = unsupported).
    Status(u8),
    /// The request is past the end of the disk.
    OutOfRange,
}

/// A virtio block device.
pub struct BlkDev {
    queue: VirtQueue,
    capacity: u64,
    features: u64,
    req: Box<ReqBlock>,
}

impl BlkDev {
    /// Brings up the device found by [`super::probe`].
    pub fn new(found: Found) -> Result<Self, InitError> {
        let mmio = found.mmio;
        let features = mmio.negotiate(F_VERSION_1 | F_RO | F_FLUSH, F_VERSION_1)?;
        let capacity = mmio.config_u32(0) as u64 | (mmio.config_u32(4) as u64) << 32;
        let queue = VirtQueue::new(mmio, 0, 16)?;
        mmio.driver_ok();
        Ok(Self {
            queue,
            capacity,
            features,
            req: Box::new(ReqBlock {
                kind: 0,
                reserved: 0,
                sector: 0,
                status: 0xff,
            }),
        })
    }

    /// Size in sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// True if the device only allows reads.
    pub fn read_only(&self) -> bool {
        self.features & F_RO != 0
    }

    fn request(&mut self, kind: u32, sector: u64, data: Option<Buf>) -> Result<(), BlkError> {
        if let Some(d) = data {
            let sectors = d.len as u64 / SECTOR_SIZE as u64;
            if sector
                .checked_add(sectors)
                .is_none_or(|end| end > self.capacity)
            {
                return Err(BlkError::OutOfRange);
            }
        }
        self.req.kind = kind;
        self.req.reserved = 0;
        self.req.sector = sector;
        self.req.status = 0xff;
        let base = &mut *self.req as *mut ReqBlock as *mut u8;
        // SAFETY: the header is the first 16 bytes of `ReqBlock` and the status byte follows;
        // the box outlives the request, which completes before this function returns.
        let (header, status) = unsafe {
            (
                core::slice::from_raw_parts(base, 16),
                core::slice::from_raw_parts_mut(base.add(16), 1),
            )
        };
        let hdr = Buf::read(header);
        let st = Buf::write(status);
        match data {
            Some(d) => self.queue.submit_and_wait(&[hdr, d, st]),
            None => self.queue.submit_and_wait(&[hdr, st]),
        };
        // SAFETY: the device has finished with the status byte (the chain came back).
        match unsafe { core::ptr::read_volatile(base.add(16)) } {
            S_OK => Ok(()),
            s => Err(BlkError::Status(s)),
        }
    }

    /// Reads `buf.len() / 512` sectors starting at `sector` in one request.
    pub fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), BlkError> {
        assert!(!buf.is_empty() && buf.len() % SECTOR_SIZE == 0);
        self.request(T_IN, sector, Some(Buf::write(buf)))
    }

    /// Writes `buf.len() / 512` sectors starting at `sector` in one request.
    pub fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), BlkError> {
        assert!(!buf.is_empty() && buf.len() % SECTOR_SIZE == 0);
        self.request(T_OUT, sector, Some(Buf::read(buf)))
    }

    /// Flushes the device's write cache (a no-op if it has none).
    pub fn flush(&mut self) -> Result<(), BlkError> {
        if self.features & F_FLUSH == 0 {
            return Ok(());
        }
        self.request(T_FLUSH, 0, None)
    }
}
