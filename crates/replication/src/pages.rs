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
