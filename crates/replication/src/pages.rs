//! Guest pages in transit: copied out of guest memory while the VM is paused, compressed after
//! it resumed, applied on the backup.

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};
use vmm::dirty::DirtyPages;
use vmm::layout::PAGE_SIZE;
use vmm::memory::GuestMemory;

use crate::Error;

const PAGE: usize = PAGE_SIZE as usize;

/// Raw copies of pages, taken during the pause.
#[derive(Default)]
pub struct Staging {
    /// Page addresses.
    pub addrs: Vec<u64>,
    /// Page contents, `PAGE_SIZE` bytes each, in `addrs` order.
    pub data: Vec<u8>,
}

impl Staging {
    /// Copies every page of `dirty` (the buffers are reused between epochs).
    pub fn copy(&mut self, mem: &GuestMemory, dirty: &DirtyPages) -> Result<(), Error> {
        self.addrs.clear();
        self.addrs.extend(dirty.iter());
        self.data.resize(self.addrs.len() * PAGE, 0);
        for (i, &addr) in self.addrs.iter().enumerate() {
            mem.read_slice(&mut self.data[i * PAGE..(i + 1) * PAGE], GuestAddress(addr))
                .map_err(|e| Error::Io(format!("cannot read guest page {addr:#x}: {e}")))?;
        }
        Ok(())
    }

    /// Number of pages staged.
    pub fn len(&self) -> usize {
        self.addrs.len()
    }

    /// Whether nothing is staged.
    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }

    /// Compresses the staged pages for the wire.
    pub fn to_batch(&self) -> PageBatch {
        PageBatch::compress(self.addrs.clone(), &self.data)
    }
}

/// Pages on the wire: addresses plus LZ4-compressed contents.
#[derive(Serialize, Deserialize, Default)]
pub struct PageBatch {
    /// Page addresses.
    pub addrs: Vec<u64>,
    /// LZ4 block of the concatenated pages (size-prefixed).
    pub lz4: Vec<u8>,
}

impl PageBatch {
    /// Compresses `data` (the pages of `addrs`, concatenated).
    pub fn compress(addrs: Vec<u64>, data: &[u8]) -> Self {
        Self {
            addrs,
            lz4: lz4_flex::block::compress_prepend_size(data),
        }
    }

    /// Decompresses and checks the page count; nothing is written anywhere.
    pub fn decompress(&self) -> Result<Vec<u8>, Error> {
        let data = lz4_flex::block::decompress_size_prepended(&self.lz4)
            .map_err(|e| Error::Protocol(format!("page data does not decompress: {e}")))?;
        if data.len() != self.addrs.len() * PAGE {
            return Err(Error::Protocol(format!(
                "page batch holds {} bytes for {} pages",
                data.len(),
                self.addrs.len()
            )));
        }
        Ok(data)
    }

    /// Checks every address lies in guest memory.
    pub fn check_addresses(&self, mem: &GuestMemory) -> Result<(), Error> {
        use vm_memory::GuestMemoryBackend;
        for &a in &self.addrs {
            if a % PAGE_SIZE != 0 || mem.checked_offset(GuestAddress(a), PAGE - 1).is_none() {
                return Err(Error::Protocol(format!(
                    "page address {a:#x} is outside guest memory"
                )));
            }
        }
        Ok(())
    }
}

/// Writes decompressed pages into `mem`.
pub fn apply(mem: &GuestMemory, addrs: &[u64], data: &[u8]) -> Result<(), Error> {
    for (i, &addr) in addrs.iter().enumerate() {
        mem.write_slice(&data[i * PAGE..(i + 1) * PAGE], GuestAddress(addr))
            .map_err(|e| Error::Io(format!("cannot write guest page {addr:#x}: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn pages_round_trip_through_a_batch() {
        let src = mem();
        src.write_slice(&[7u8; PAGE], GuestAddress(0x3000)).unwrap();
        src.write_slice(&[9u8; 10], GuestAddress(0x5000)).unwrap();
        let dirty = DirtyPages::new(vec![(0, 1 << 20, vec![(1 << 3) | (1 << 5)])]);
        let mut staging = Staging::default();
        staging.copy(&src, &dirty).unwrap();
        assert_eq!(staging.addrs, vec![0x3000, 0x5000]);
        let batch = staging.to_batch();
        assert!(
            batch.lz4.len() < 2 * PAGE / 4,
            "repetitive pages should compress"
        );
        let dst = mem();
        batch.check_addresses(&dst).unwrap();
        apply(&dst, &batch.addrs, &batch.decompress().unwrap()).unwrap();
        let mut page = vec![0u8; PAGE];
        dst.read_slice(&mut page, GuestAddress(0x3000)).unwrap();
        assert!(page.iter().all(|&b| b == 7));
        dst.read_slice(&mut page, GuestAddress(0x5000)).unwrap();
        assert_eq!(&page[..11], &[9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 0]);
    }

    #[test]
    fn bad_batches_are_refused_before_anything_is_written() {
        let dst = mem();
        let outside = PageBatch::compress(vec![2 << 20], &[0u8; PAGE]);
        assert!(outside.check_addresses(&dst).is_err());
        let unaligned = PageBatch::compress(vec![0x10], &[0u8; PAGE]);
        assert!(unaligned.check_addresses(&dst).is_err());
        let short = PageBatch::compress(vec![0x1000, 0x2000], &[0u8; PAGE]);
        assert!(short.decompress().is_err());
        let garbage = PageBatch {
            addrs: vec![0x1000],
            lz4: vec![1, 2, 3],
        };
        assert!(garbage.decompress().is_err());
    }
}
