//! virtio-blk requests: a descriptor chain parsed into a validated request (bounded segment
//! count and data length, sector range inside the disk, descriptor directions as the request
//! type needs) and its execution against a `storage::BlockBackend`. A bad request gets
//! `VIRTIO_BLK_S_IOERR` or `VIRTIO_BLK_S_UNSUPP`; nothing here panics or allocates by a size the
//! guest chose.

use vm_memory::{Bytes, GuestAddress};

use super::disk_log::DiskLog;
use crate::devices::lock;
use crate::memory::GuestMemory;

/// VIRTIO_BLK_T_IN: read.
pub const T_IN: u32 = 0;
/// VIRTIO_BLK_T_OUT: write.
pub const T_OUT: u32 = 1;
/// VIRTIO_BLK_T_FLUSH.
pub const T_FLUSH: u32 = 4;
/// VIRTIO_BLK_T_GET_ID.
pub const T_GET_ID: u32 = 8;

/// VIRTIO_BLK_S_OK.
pub const S_OK: u8 = 0;
/// VIRTIO_BLK_S_IOERR.
pub const S_IOERR: u8 = 1;
/// VIRTIO_BLK_S_UNSUPP.
pub const S_UNSUPP: u8 = 2;

/// Bytes per sector.
pub const SECTOR: u64 = 512;
/// Most data segments in one request (advertised as `seg_max`).
pub const SEG_MAX: u32 = 126;
/// Largest data segment (advertised as `size_max`).
pub const SIZE_MAX: u32 = 256 << 10;
/// Largest data length of one request: what `seg_max` × `size_max` lets a driver send.
pub const MAX_REQUEST_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64;
/// Length of the id GET_ID returns.
pub const ID_LEN: usize = 20;
/// Bytes moved per backend call (the bounce buffer's size).
pub const CHUNK: usize = 64 << 10;

/// One descriptor of a chain: guest address, length, device-writable.
pub type Desc = (GuestAddress, u32, bool);

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Read `len` bytes at byte `offset` into the data descriptors.
    In {
        /// Byte offset on the disk.
        offset: u64,
    },
    /// Write the data descriptors at byte `offset`.
    Out {
        /// Byte offset on the disk.
        offset: u64,
    },
    /// Flush the disk's write cache.
    Flush,
    /// Return the device id.
    GetId,
}

/// A validated request: what to do, its data descriptors and where its status byte goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The operation.
    pub kind: Kind,
    /// Data descriptors, in order.
    pub data: Vec<Desc>,
    /// Total length of the data descriptors.
    pub len: u64,
    /// Guest address of the status byte.
    pub status: GuestAddress,
}

/// A request that cannot be served: the status to return, and where (if the chain has a
/// usable status byte at all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// `S_IOERR` or `S_UNSUPP`.
    pub status: u8,
    /// Where the status byte goes, if anywhere.
    pub at: Option<GuestAddress>,
}

/// The status byte of a chain: the last byte of its last descriptor, if device-writable.
fn status_addr(descs: &[Desc]) -> Option<GuestAddress> {
    match descs.last() {
        Some(&(addr, len, true)) if len >= 1 && descs.len() >= 2 => {
            addr.0.checked_add(u64::from(len) - 1).map(GuestAddress)
        }
        _ => None,
    }
}

/// Parses the chain `descs` of a disk of `capacity` bytes.
pub fn parse(mem: &GuestMemory, descs: &[Desc], capacity: u64) -> Result<Request, Refused> {
    let at = status_addr(descs);
    let err = |status| Refused { status, at };
    let Some(at_status) = at else {
        return Err(err(S_IOERR));
    };
    let (hdr_addr, hdr_len, hdr_writable) = descs[0];
    if hdr_len < 16 || hdr_writable {
        return Err(err(S_IOERR));
    }
    let data = &descs[1..descs.len() - 1];
    if data.len() > SEG_MAX as usize {
        return Err(err(S_IOERR));
    }
    let req_type = mem.read_obj::<u32>(hdr_addr).map_err(|_| err(S_IOERR))?;
    let sector = hdr_addr
        .0
        .checked_add(8)
        .and_then(|a| mem.read_obj::<u64>(GuestAddress(a)).ok())
        .ok_or(err(S_IOERR))?;
    let len: u64 = data.iter().map(|d| u64::from(d.1)).sum();
    let kind = match req_type {
        T_IN | T_OUT => {
            let writable = req_type == T_IN;
            if data.is_empty()
                || len > MAX_REQUEST_BYTES
                || !len.is_multiple_of(SECTOR)
                || data.iter().any(|d| d.2 != writable)
            {
                return Err(err(S_IOERR));
            }
            let offset = sector.checked_mul(SECTOR).ok_or(err(S_IOERR))?;
            if offset.checked_add(len).is_none_or(|end| end > capacity) {
                return Err(err(S_IOERR));
            }
            if writable {
                Kind::In { offset }
            } else {
                Kind::Out { offset }
            }
        }
        T_FLUSH => Kind::Flush,
        T_GET_ID => {
            if data.len() != 1 || !data[0].2 {
                return Err(err(S_IOERR));
            }
            Kind::GetId
        }
        _ => return Err(err(S_UNSUPP)),
    };
    Ok(Request {
        kind,
        data: data.to_vec(),
        len,
        status: at_status,
    })
}

/// What a block device serves requests from.
pub struct BlockIo {
    /// The disk.
    pub backend: super::block::SharedBackend,
    /// The FT write log.
    pub log: std::sync::Arc<DiskLog>,
    /// The id GET_ID returns, padded with zeros.
    pub id: [u8; ID_LEN],
    /// Disk size in bytes.
    pub capacity: u64,
    bounce: Vec<u8>,
}

impl BlockIo {
    /// Serves a disk; `id` is cut to 20 bytes.
    pub fn new(
        backend: super::block::SharedBackend,
        log: std::sync::Arc<DiskLog>,
        id: &str,
    ) -> Self {
        let capacity = lock(&backend).size() / SECTOR * SECTOR;
        let mut padded = [0u8; ID_LEN];
        for (d, s) in padded.iter_mut().zip(id.as_bytes()) {
            *d = *s;
        }
        Self {
            backend,
            log,
            id: padded,
            capacity,
            bounce: vec![0; CHUNK],
        }
    }

    /// Serves the chain `descs` completely (the status byte included); returns the number of
    /// bytes written into the chain's device-writable part (what goes in the used ring).
    pub fn serve(&mut self, mem: &GuestMemory, descs: &[Desc]) -> u32 {
        let (status, at, written) = match parse(mem, descs, self.capacity) {
            Ok(req) => {
                let (status, written) = self.execute(mem, &req);
                (status, Some(req.status), written)
            }
            Err(r) => (r.status, r.at, 0),
        };
        match at {
            Some(addr) if mem.write_obj(status, addr).is_ok() => written.saturating_add(1),
            _ => written,
        }
    }

    /// Executes a parsed request; returns the status and the data bytes written to the guest.
    pub fn execute(&mut self, mem: &GuestMemory, req: &Request) -> (u8, u32) {
        match req.kind {
            Kind::In { offset } => self.read(mem, req, offset),
            Kind::Out { offset } => (self.write(mem, req, offset), 0),
            Kind::Flush => match lock(&self.backend).flush() {
                Ok(()) => (S_OK, 0),
                Err(_) => (S_IOERR, 0),
            },
            Kind::GetId => {
                let (addr, len, _) = req.data[0];
                let n = ID_LEN.min(len as usize);
                match mem.write_slice(&self.id[..n], addr) {
                    Ok(()) => (S_OK, n as u32),
                    Err(_) => (S_IOERR, 0),
                }
            }
        }
    }

    fn read(&mut self, mem: &GuestMemory, req: &Request, mut offset: u64) -> (u8, u32) {
        let mut written: u32 = 0;
        for &(addr, len, _) in &req.data {
            let mut done: u32 = 0;
            while done < len {
                let n = (len - done).min(CHUNK as u32) as usize;
                let buf = &mut self.bounce[..n];
                let ok = lock(&self.backend).read_at(buf, offset).is_ok()
                    && addr
                        .0
                        .checked_add(u64::from(done))
                        .is_some_and(|a| mem.write_slice(buf, GuestAddress(a)).is_ok());
                if !ok {
                    return (S_IOERR, written);
                }
                done += n as u32;
                written = written.saturating_add(n as u32);
                offset += n as u64;
            }
        }
        (S_OK, written)
    }

    fn write(&mut self, mem: &GuestMemory, req: &Request, mut offset: u64) -> u8 {
        for &(addr, len, _) in &req.data {
            let mut done: u32 = 0;
            while done < len {
                let n = (len - done).min(CHUNK as u32) as usize;
                let buf = &mut self.bounce[..n];
                let read = addr
                    .0
                    .checked_add(u64::from(done))
                    .is_some_and(|a| mem.read_slice(buf, GuestAddress(a)).is_ok());
                if !read || lock(&self.backend).write_at(buf, offset).is_err() {
                    return S_IOERR;
                }
                self.log.record(offset, buf);
                done += n as u32;
                offset += n as u64;
            }
        }
        S_OK
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    const MEM: usize = 1 << 20;
    const HDR: GuestAddress = GuestAddress(0x1000);
    const DATA: GuestAddress = GuestAddress(0x10000);
    const STATUS: GuestAddress = GuestAddress(0x2000);
    const DISK: u64 = 1 << 20;

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), MEM)]).unwrap()
    }

    fn header(mem: &GuestMemory, kind: u32, sector: u64) {
        mem.write_obj(kind, HDR).unwrap();
        mem.write_obj(0u32, GuestAddress(HDR.0 + 4)).unwrap();
        mem.write_obj(sector, GuestAddress(HDR.0 + 8)).unwrap();
    }

    fn chain(data: &[Desc]) -> Vec<Desc> {
        let mut v = vec![(HDR, 16, false)];
        v.extend_from_slice(data);
        v.push((STATUS, 1, true));
        v
    }

    fn refused(mem: &GuestMemory, descs: &[Desc]) -> u8 {
        parse(mem, descs, DISK).unwrap_err().status
    }

    /// A disk file on a real raw backend, and its path.
    fn io(dir: &std::path::Path) -> (BlockIo, std::path::PathBuf) {
        let path = dir.join("disk.raw");
        std::fs::write(&path, vec![0u8; DISK as usize]).unwrap();
        let backend = storage::open_disk(&path, false, Some(storage::ImageFormat::Raw)).unwrap();
        let log = Arc::new(DiskLog::default());
        (
            BlockIo::new(
                Arc::new(Mutex::new(backend)),
                log,
                "disk-id-that-is-longer-than-20",
            ),
            path,
        )
    }

    #[test]
    fn valid_requests_parse() {
        let m = mem();
        header(&m, T_IN, 2);
        let r = parse(&m, &chain(&[(DATA, 1024, true)]), DISK).unwrap();
        assert_eq!(r.kind, Kind::In { offset: 1024 });
        assert_eq!((r.len, r.status), (1024, STATUS));
        header(&m, T_OUT, 0);
        let r = parse(&m, &chain(&[(DATA, 512, false), (DATA, 512, false)]), DISK).unwrap();
        assert_eq!((r.kind, r.len), (Kind::Out { offset: 0 }, 1024));
        header(&m, T_FLUSH, 0);
        assert_eq!(parse(&m, &chain(&[]), DISK).unwrap().kind, Kind::Flush);
        header(&m, T_GET_ID, 0);
        assert_eq!(
            parse(&m, &chain(&[(DATA, 20, true)]), DISK).unwrap().kind,
            Kind::GetId
        );
        // The status byte is the last byte of the last descriptor.
        let mut c = chain(&[(DATA, 512, true)]);
        c[2] = (STATUS, 4, true);
        header(&m, T_IN, 0);
        assert_eq!(
            parse(&m, &c, DISK).unwrap().status,
            GuestAddress(STATUS.0 + 3)
        );
    }

    #[test]
    fn malformed_chains_get_ioerr() {
        let m = mem();
        header(&m, T_IN, 0);
        // A read whose only writable buffer holds the status byte has no data.
        let e = parse(&m, &[(HDR, 16, false), (DATA, 512, true)], DISK).unwrap_err();
        assert_eq!(
            (e.status, e.at),
            (S_IOERR, Some(GuestAddress(DATA.0 + 511)))
        );
        // No status descriptor, or a read-only one: nowhere to answer.
        let e = parse(&m, &[(HDR, 16, false), (STATUS, 1, false)], DISK).unwrap_err();
        assert_eq!((e.status, e.at), (S_IOERR, None));
        assert_eq!(parse(&m, &[], DISK).unwrap_err().at, None);
        // Short or device-writable header.
        let mut c = chain(&[(DATA, 512, true)]);
        c[0].1 = 15;
        assert_eq!(refused(&m, &c), S_IOERR);
        let mut c = chain(&[(DATA, 512, true)]);
        c[0].2 = true;
        assert_eq!(refused(&m, &c), S_IOERR);
        // Header outside guest memory.
        let mut c = chain(&[(DATA, 512, true)]);
        c[0].0 = GuestAddress(u64::MAX - 4);
        assert_eq!(refused(&m, &c), S_IOERR);
        // Read with no data, data not a whole number of sectors, data in the wrong direction.
        assert_eq!(refused(&m, &chain(&[])), S_IOERR);
        assert_eq!(refused(&m, &chain(&[(DATA, 511, true)])), S_IOERR);
        assert_eq!(refused(&m, &chain(&[(DATA, 512, false)])), S_IOERR);
        header(&m, T_OUT, 0);
        assert_eq!(refused(&m, &chain(&[(DATA, 512, true)])), S_IOERR);
        // GET_ID needs exactly one writable buffer.
        header(&m, T_GET_ID, 0);
        assert_eq!(refused(&m, &chain(&[])), S_IOERR);
        assert_eq!(refused(&m, &chain(&[(DATA, 20, false)])), S_IOERR);
    }

    #[test]
    fn sizes_and_ranges_are_bounded() {
        let m = mem();
        // Past the end of the disk, straddling it, sector numbers that overflow.
        for (sector, len) in [
            (DISK / SECTOR, 512),
            (DISK / SECTOR - 1, 1024),
            (u64::MAX, 512),
        ] {
            header(&m, T_IN, sector);
            assert_eq!(
                refused(&m, &chain(&[(DATA, len, true)])),
                S_IOERR,
                "{sector}"
            );
        }
        header(&m, T_IN, 0);
        // More segments than seg_max, more data than seg_max × size_max: refused before
        // anything is read or allocated.
        let many = vec![(DATA, 512, true); SEG_MAX as usize + 1];
        assert_eq!(refused(&m, &chain(&many)), S_IOERR);
        let huge = vec![(DATA, !511u32, true); 4];
        assert_eq!(
            parse(&m, &chain(&huge), u64::MAX).unwrap_err().status,
            S_IOERR
        );
        // Unknown request types are unsupported, not errors.
        header(&m, 0x1234, 0);
        assert_eq!(refused(&m, &chain(&[(DATA, 512, true)])), S_UNSUPP);
    }

    #[test]
    fn requests_move_data_between_disk_and_guest() {
        let dir = tempfile::tempdir().unwrap();
        let (mut io, path) = io(dir.path());
        io.log.enable();
        let m = mem();
        // Write 3 sectors from two guest buffers at sector 4; more than one bounce chunk.
        let a: Vec<u8> = (0..512).map(|i| i as u8).collect();
        let b: Vec<u8> = (0..1024).map(|i| (i * 7) as u8).collect();
        m.write_slice(&a, DATA).unwrap();
        m.write_slice(&b, GuestAddress(DATA.0 + 0x8000)).unwrap();
        header(&m, T_OUT, 4);
        let descs = chain(&[
            (DATA, 512, false),
            (GuestAddress(DATA.0 + 0x8000), 1024, false),
        ]);
        assert_eq!(
            io.serve(&m, &descs),
            1,
            "a write returns only the status byte"
        );
        assert_eq!(m.read_obj::<u8>(STATUS).unwrap(), S_OK);
        let file = std::fs::read(&path).unwrap();
        assert_eq!(&file[2048..2560], &a[..]);
        assert_eq!(&file[2560..3584], &b[..]);
        let logged = io.log.seal();
        assert_eq!(logged.len(), 2);
        assert_eq!((logged[0].0, logged[1].0), (2048, 2560));
        // Read them back, in one descriptor larger than the bounce buffer.
        let big = CHUNK as u32 + 4096;
        header(&m, T_IN, 0);
        let descs = chain(&[(GuestAddress(0x40000), big, true)]);
        assert_eq!(io.serve(&m, &descs), big + 1);
        let mut back = vec![0u8; big as usize];
        m.read_slice(&mut back, GuestAddress(0x40000)).unwrap();
        assert_eq!(&back[..], &file[..big as usize]);
        // GET_ID: 20 bytes at most.
        header(&m, T_GET_ID, 0);
        assert_eq!(io.serve(&m, &chain(&[(DATA, 64, true)])), 21);
        let mut id = [0u8; 20];
        m.read_slice(&mut id, DATA).unwrap();
        assert_eq!(&id, b"disk-id-that-is-long");
        header(&m, T_FLUSH, 0);
        assert_eq!(io.serve(&m, &chain(&[])), 1);
        assert_eq!(m.read_obj::<u8>(STATUS).unwrap(), S_OK);
    }

    #[test]
    fn bad_requests_answer_with_a_status_and_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (mut io, path) = io(dir.path());
        io.log.enable();
        let m = mem();
        m.write_slice(&[0xaa; 512], DATA).unwrap();
        // Data buffer partly outside guest memory: IOERR.
        header(&m, T_OUT, 0);
        let descs = chain(&[(GuestAddress(MEM as u64 - 512), 1024, false)]);
        assert_eq!(io.serve(&m, &descs), 1);
        assert_eq!(m.read_obj::<u8>(STATUS).unwrap(), S_IOERR);
        // Out of range.
        header(&m, T_OUT, DISK / SECTOR);
        assert_eq!(io.serve(&m, &chain(&[(DATA, 512, false)])), 1);
        assert_eq!(m.read_obj::<u8>(STATUS).unwrap(), S_IOERR);
        header(&m, 99, 0);
        io.serve(&m, &chain(&[(DATA, 512, false)]));
        assert_eq!(m.read_obj::<u8>(STATUS).unwrap(), S_UNSUPP);
        assert!(std::fs::read(&path).unwrap().iter().all(|&b| b == 0));
        // Only the part of the first request that fit was written and logged, nothing else.
        assert!(io
            .log
            .seal()
            .iter()
            .all(|(off, d)| *off == 0 && d.len() <= 512));
    }
}
