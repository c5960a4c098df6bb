//! The global allocator and the split of free RAM into heap and spare memory.
//!
//! Free RAM starts after the boot stacks (see [`crate::boot`]) and ends where the E820 RAM
//! range holding the image ends (capped at 3 GiB). The first part becomes the heap; the rest
//! is "spare" memory handed out raw (never zeroed, never touched until used), for the `dirty`
//! job's working set.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use linked_list_allocator::Heap;

use crate::cmdline::{BootParams, E820_RAM};

/// Heap size limit.
const HEAP_MAX: usize = 64 << 20;
/// Smallest usable heap.
const HEAP_MIN: usize = 4 << 20;
/// Usable memory ends here at the latest.
const RAM_LIMIT: u64 = 3 << 30;
const MIB: usize = 1 << 20;

/// A heap behind a spin lock (the guest is single-threaded; the lock just keeps it sound).
struct LockedHeap {
    locked: AtomicBool,
    heap: UnsafeCell<Heap>,
}

// SAFETY: every access to `heap` happens with `locked` held.
unsafe impl Sync for LockedHeap {}

impl LockedHeap {
    fn with<R>(&self, f: impl FnOnce(&mut Heap) -> R) -> R {
        while self
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        // SAFETY: the lock is held, so this is the only reference to the heap.
        let r = f(unsafe { &mut *self.heap.get() });
        self.locked.store(false, Ordering::Release);
        r
    }
}

// SAFETY: allocations come from `linked_list_allocator`, which hands out non-overlapping
// blocks of at least the requested size and alignment, or null.
unsafe impl GlobalAlloc for LockedHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.with(|h| h.allocate_first_fit(layout))
            .map_or(core::ptr::null_mut(), |p| p.as_ptr())
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if let Some(p) = NonNull::new(ptr) {
            // SAFETY: the caller passes a block this allocator returned, with its layout.
            self.with(|h| unsafe { h.deallocate(p, layout) });
        }
    }
}

#[global_allocator]
static ALLOCATOR: LockedHeap = LockedHeap {
    locked: AtomicBool::new(false),
    heap: UnsafeCell::new(Heap::empty()),
};

static SPARE_START: AtomicUsize = AtomicUsize::new(0);
static SPARE_END: AtomicUsize = AtomicUsize::new(0);

/// Where memory went.
pub struct MemoryLayout {
    pub heap_start: usize,
    pub heap_size: usize,
    pub spare_size: usize,
}

/// Sets up the heap from the E820 map; fails if there is too little RAM after the image.
pub fn init(params: &BootParams) -> Result<MemoryLayout, &'static str> {
    let free = crate::boot::image_end() + crate::boot::FREE_START;
    let region_end = params
        .e820()
        .filter(|e| e.kind == E820_RAM)
        .find(|e| e.addr <= free as u64 && (free as u64) < e.addr.saturating_add(e.size))
        .map(|e| e.addr.saturating_add(e.size).min(RAM_LIMIT) as usize)
        .ok_or("no E820 RAM range holds the memory after the image")?;
    let heap_start = free.next_multiple_of(2 * MIB);
    let avail = region_end.saturating_sub(heap_start);
    let heap_size = (avail / 2).min(HEAP_MAX) & !(MIB - 1);
    if heap_size < HEAP_MIN {
        return Err("too little RAM for the heap");
    }
    // SAFETY: [heap_start, heap_start + heap_size) is RAM (E820), identity mapped, past the
    // image and the boot stacks, and used for nothing else; init runs once, before any
    // allocation.
    ALLOCATOR.with(|h| unsafe { h.init(heap_start as *mut u8, heap_size) });
    let spare_start = heap_start + heap_size;
    SPARE_START.store(spare_start, Ordering::Relaxed);
    SPARE_END.store(region_end, Ordering::Relaxed);
    Ok(MemoryLayout {
        heap_start,
        heap_size,
        spare_size: region_end - spare_start,
    })
}

/// Takes `bytes` (rounded up to 4 KiB) of spare memory: 4 KiB aligned, identity mapped RAM
/// that nothing else uses, with unspecified contents (write before reading).
pub fn take_spare(bytes: usize) -> Option<*mut u8> {
    let start = SPARE_START.load(Ordering::Relaxed);
    let end = start.checked_add(bytes.next_multiple_of(4096))?;
    if end > SPARE_END.load(Ordering::Relaxed) {
        return None;
    }
    SPARE_START.store(end, Ordering::Relaxed);
    Some(start as *mut u8)
}

/// Free spare memory in bytes.
pub fn spare_left() -> usize {
    SPARE_END.load(Ordering::Relaxed) - SPARE_START.load(Ordering::Relaxed)
}

/// Allocates `size` zeroed bytes aligned to 4 KiB that live forever (DMA rings, buffers).
pub fn alloc_dma(size: usize) -> &'static mut [u8] {
    let layout = Layout::from_size_align(size.max(1), 4096).expect("valid DMA layout");
    // SAFETY: the layout has a nonzero size.
    let p = unsafe { alloc::alloc::alloc_zeroed(layout) };
    if p.is_null() {
        alloc::alloc::handle_alloc_error(layout);
    }
    // SAFETY: `p` is a fresh, zeroed allocation of `size` bytes that is never freed.
    unsafe { core::slice::from_raw_parts_mut(p, size) }
}
