//! The persisted dirty-region bitmap of a mirrored volume.
//!
//! File layout: a 4096-byte header (magic `FTVMBMP1`, version, region size, region count,
//! the peer replica's id, crc32 of the header fields), then one bit per region. Bits are
//! updated in place a byte at a time; [`DirtyBitmap::sync`] makes them durable.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"FTVMBMP1";
const VERSION: u32 = 1;
const DATA_OFF: u64 = 4096;

/// One bit per region: set means the two replicas may differ there.
pub struct DirtyBitmap {
    file: File,
    path: PathBuf,
    region_size: u64,
    regions: u64,
    bits: Vec<u8>,
    peer_id: u64,
    count: u64,
}

impl DirtyBitmap {
    /// Opens the bitmap at `path`, or creates an all-clear one for a disk of `size` bytes.
    /// An existing bitmap keeps its region size; a grown disk gets its new regions set.
    pub fn open(path: &Path, size: u64, region_size: u64) -> io::Result<Self> {
        let exists = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let mut bm = DirtyBitmap {
            file,
            path: path.to_path_buf(),
            region_size,
            regions: size.div_ceil(region_size),
            bits: Vec::new(),
            peer_id: 0,
            count: 0,
        };
        if exists && bm.file.metadata()?.len() >= DATA_OFF {
            let mut h = [0u8; 40];
            bm.file.read_exact_at(&mut h, 0)?;
            let crc = u32::from_be_bytes([h[36], h[37], h[38], h[39]]);
            if &h[0..8] != MAGIC || crc32fast::hash(&h[..36]) != crc {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "dirty bitmap {} is damaged; delete it and run a full resync (`ftvm volume resync --full`)",
                        path.display()
                    ),
                ));
            }
            let version = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
            if version != VERSION {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "dirty bitmap {} has version {version}; use a matching ftvm",
                        path.display()
                    ),
                ));
            }
            bm.region_size = u64::from_be_bytes(h[12..20].try_into().unwrap_or_default());
            let old_regions = u64::from_be_bytes(h[20..28].try_into().unwrap_or_default());
            bm.peer_id = u64::from_be_bytes(h[28..36].try_into().unwrap_or_default());
            if bm.region_size == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "dirty bitmap has region size 0",
                ));
            }
            bm.regions = size.div_ceil(bm.region_size);
            let mut bits = vec![0u8; old_regions.div_ceil(8) as usize];
            let got = bm.file.read_at(&mut bits, DATA_OFF)?;
            bits.truncate(got);
            bits.resize(bm.regions.div_ceil(8) as usize, 0);
            bm.bits = bits;
            bm.count = (0..bm.regions).filter(|r| bm.is_set(*r)).count() as u64;
            if bm.regions > old_regions {
                for r in old_regions..bm.regions {
                    bm.set(r)?;
                }
                bm.write_header()?;
                bm.sync()?;
            }
        } else {
            bm.bits = vec![0u8; bm.regions.div_ceil(8) as usize];
            bm.file.set_len(DATA_OFF + bm.bits.len() as u64)?;
            bm.write_header()?;
            bm.sync()?;
        }
        Ok(bm)
    }

    fn write_header(&mut self) -> io::Result<()> {
        let mut h = [0u8; 40];
        h[0..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_be_bytes());
        h[12..20].copy_from_slice(&self.region_size.to_be_bytes());
        h[20..28].copy_from_slice(&self.regions.to_be_bytes());
        h[28..36].copy_from_slice(&self.peer_id.to_be_bytes());
        let crc = crc32fast::hash(&h[..36]);
        h[36..40].copy_from_slice(&crc.to_be_bytes());
        self.file.write_all_at(&h, 0)
    }

    /// The file path.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Bytes per region.
    pub fn region_size(&self) -> u64 {
        self.region_size
    }
    /// Number of regions.
    pub fn regions(&self) -> u64 {
        self.regions
    }
    /// Regions currently set.
    pub fn count(&self) -> u64 {
        self.count
    }
    /// The id of the peer replica these bits are relative to (0: none yet).
    pub fn peer_id(&self) -> u64 {
        self.peer_id
    }

    /// Records the peer replica the bitmap now tracks (durably).
    pub fn set_peer_id(&mut self, id: u64) -> io::Result<()> {
        self.peer_id = id;
        self.write_header()?;
        self.sync()
    }

    /// Whether region `r` is set.
    pub fn is_set(&self, r: u64) -> bool {
        self.bits
            .get((r / 8) as usize)
            .is_some_and(|b| b & (1 << (r % 8)) != 0)
    }

    fn write_byte(&self, r: u64) -> io::Result<()> {
        let i = (r / 8) as usize;
        self.file
            .write_all_at(&self.bits[i..i + 1], DATA_OFF + i as u64)
    }

    /// Sets region `r` (written, not yet synced); returns whether it was clear.
    pub fn set(&mut self, r: u64) -> io::Result<bool> {
        if r >= self.regions || self.is_set(r) {
            return Ok(false);
        }
        self.bits[(r / 8) as usize] |= 1 << (r % 8);
        self.count += 1;
        self.write_byte(r)?;
        Ok(true)
    }

    /// Clears region `r` (written, not synced: a lost clear only costs a resync).
    pub fn clear(&mut self, r: u64) -> io::Result<()> {
        if !self.is_set(r) {
            return Ok(());
        }
        self.bits[(r / 8) as usize] &= !(1 << (r % 8));
        self.count -= 1;
        self.write_byte(r)
    }

    /// Sets every region (a full sync), durably.
    pub fn set_all(&mut self) -> io::Result<()> {
        for b in self.bits.iter_mut() {
            *b = 0xff;
        }
        let tail = self.regions % 8;
        if tail != 0 {
            if let Some(last) = self.bits.last_mut() {
                *last = (1u8 << tail) - 1;
            }
        }
        self.count = self.regions;
        self.file.write_all_at(&self.bits, DATA_OFF)?;
        self.sync()
    }

    /// Regions overlapping `[off, off + len)`.
    pub fn range(&self, off: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        off / self.region_size..(off + len - 1) / self.region_size + 1
    }

    /// The first set region at or after `from`, wrapping around.
    pub fn next_set(&self, from: u64, skip: &dyn Fn(u64) -> bool) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let n = self.regions;
        (0..n)
            .map(|i| (from + i) % n)
            .find(|r| self.is_set(*r) && !skip(*r))
    }

    /// Makes the bits durable.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}
