//! Guest memory: one anonymous mapping per RAM region, with a write bitmap that records
//! every page the monitor itself writes (virtio-blk reads, virtio-net receive, used rings).

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// The guest memory type used throughout the monitor.
pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

/// The RAM regions of a guest with `mem_bytes` of memory: below the MMIO gap, then above 4 GiB.
pub fn ram_regions(mem_bytes: u64) -> Vec<(GuestAddress, usize)> {
    let low = mem_bytes.min(MMIO_GAP_START);
    let mut regions = vec![(GuestAddress(0), low as usize)];
    if mem_bytes > MMIO_GAP_START {
        regions.push((
            GuestAddress(MMIO_GAP_END),
            (mem_bytes - MMIO_GAP_START) as usize,
        ));
    }
    regions
}
