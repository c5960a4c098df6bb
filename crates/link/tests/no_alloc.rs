//! A frame's declared length is authenticated and bounded before anything is allocated for it.
//! (Its own test binary: the counting allocator sees only this test.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use link::{Direction, LinkError, HEADER_LEN};

struct Counting;
static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; it only records sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// A reader that yields `head` and then endless zeros, as a peer streaming garbage would.
struct Endless(Vec<u8>, usize);
impl std::io::Read for Endless {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(4096);
        for b in &mut buf[..n] {
            *b = self.0.get(self.1).copied().unwrap_or(0);
            self.1 += 1;
        }
        Ok(n)
    }
}

#[test]
fn huge_declared_lengths_allocate_nothing() {
    // 1. Forged header (no key) declaring 4 GiB - 1.
    let mut forged = vec![0u8; 32];
    forged[0..4].copy_from_slice(b"FTLK");
    forged[4] = link::VERSION;
    forged[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(
        link::frame_len(&forged[..HEADER_LEN]),
        Some(u32::MAX as usize + 48)
    );
    let mut rx = Direction::new([3; 32], 1 << 30);
    LARGEST.store(0, Ordering::Relaxed);
    let e = rx.recv(&mut Endless(forged, 0)).unwrap_err();
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(matches!(e, LinkError::Auth(_)), "{e}");
    assert!(
        largest < 64 << 10,
        "allocated {largest} bytes for a forged frame"
    );

    // 2. An authentic header declaring more than the receiver's bound.
    let mut tx = Direction::new([5; 32], 8 << 20);
    let frame = tx.seal(1, &[&vec![0xa5u8; 4 << 20]]).unwrap();
    let mut rx = Direction::new([5; 32], 1 << 20);
    LARGEST.store(0, Ordering::Relaxed);
    let e = rx.recv(&mut &frame[..]).unwrap_err();
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(
        matches!(e, LinkError::TooLarge { len, max } if len == 4 << 20 && max == 1 << 20),
        "{e}"
    );
    assert!(
        largest < 64 << 10,
        "allocated {largest} bytes for an over-limit frame"
    );
}
