//! Guest pages in transit: copied out of guest memory while the VM is paused, compressed after
//! it resumed, applied on the backup.
//!
//! **Delta encoding.** A page written again in a later epoch usually differs from what the
//! backup already holds in a few bytes. The primary keeps the copies it sent last (a bounded
//! cache, [`SentPages`]); such a page travels as its XOR with that copy, which is mostly zeros
//! and compresses to almost nothing. The backup XORs it with its own copy of the page, which is
//! the same bytes: it applied exactly what was sent, in order. A new session (reconnect,
//! resync) starts with an empty cache.

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};
use vmm::dirty::DirtyPages;
use vmm::layout::PAGE_SIZE;
use vmm::memory::GuestMemory;

use crate::Error;

const PAGE: usize = PAGE_SIZE as usize;

/// Pages the delta cache keeps at most (64 MiB of copies).
pub const SENT_PAGES_MAX: usize = 16 * 1024;

/// Copies of the pages last sent to the backup, for delta encoding.
#[derive(Default)]
pub struct SentPages {
    pages: std::collections::HashMap<u64, Box<[u8]>>,
    /// Insertion order, for eviction once full.
    order: std::collections::VecDeque<u64>,
}

impl SentPages {
    /// Forgets everything (a new session: the backup's memory is unknown).
    pub fn clear(&mut self) {
        self.pages.clear();
        self.order.clear();
    }

    /// Pages held.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// Whether no page is held.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// Replaces `page` (at `addr`) by its XOR with the copy sent last, if there is one, and
    /// keeps `page` as the new copy; returns whether it was delta-encoded.
    fn encode(&mut self, addr: u64, page: &mut [u8]) -> bool {
        if let Some(old) = self.pages.get_mut(&addr) {
            for (o, p) in old.iter_mut().zip(page.iter_mut()) {
                let new = *p;
                *p ^= *o;
                *o = new;
            }
            return true;
        }
        if self.pages.len() >= SENT_PAGES_MAX {
            if let Some(evict) = self.order.pop_front() {
                self.pages.remove(&evict);
            }
        }
        self.pages.insert(addr, page.to_vec().into_boxed_slice());
        self.order.push_back(addr);
        false
    }
}

/// Raw copies of pages, taken during the pause.
#[derive(Default)]
pub struct Staging {
    /// Page addresses.
    pub addrs: Vec<u64>,
    /// Page contents, `PAGE_SIZE` bytes each, in `addrs` order.
    pub data: Vec<u8>,
    /// What the backup holds of recently sent pages (delta encoding), if enabled.
    pub sent: Option<SentPages>,
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

    /// Turns delta encoding on (the default for checkpoints) or off.
    pub fn set_delta(&mut self, on: bool) {
        self.sent = on.then(SentPages::default);
    }

    /// Compresses the staged pages for the wire, delta-encoding those sent before.
    pub fn to_batch(&mut self) -> PageBatch {
        let Some(sent) = self.sent.as_mut() else {
            return PageBatch::compress(self.addrs.clone(), &self.data);
        };
        let mut delta = vec![0u64; self.addrs.len().div_ceil(64)];
        for (i, (&addr, page)) in self
            .addrs
            .iter()
            .zip(self.data.chunks_mut(PAGE))
            .enumerate()
        {
            if sent.encode(addr, page) {
                delta[i / 64] |= 1 << (i % 64);
            }
        }
        let mut batch = PageBatch::compress(self.addrs.clone(), &self.data);
        batch.delta = delta;
        batch
    }
}

/// Pages on the wire: addresses plus LZ4-compressed contents.
#[derive(Serialize, Deserialize, Default)]
pub struct PageBatch {
    /// Page addresses.
    pub addrs: Vec<u64>,
    /// LZ4 block of the concatenated pages (size-prefixed).
    pub lz4: Vec<u8>,
    /// Bit `i` set: page `i` is the XOR of its new contents with the copy the backup holds.
    pub delta: Vec<u64>,
}

impl PageBatch {
    /// Compresses `data` (the pages of `addrs`, concatenated).
    pub fn compress(addrs: Vec<u64>, data: &[u8]) -> Self {
        Self {
            addrs,
            lz4: lz4_flex::block::compress_prepend_size(data),
            delta: Vec::new(),
        }
    }

    /// Whether page `i` is delta-encoded.
    fn is_delta(&self, i: usize) -> bool {
        self.delta
            .get(i / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// Decompresses and resolves delta-encoded pages against `mem` (the backup's copy, which
    /// only reads here): the result is the pages' new contents. Nothing is written.
    pub fn decode(&self, mem: &GuestMemory) -> Result<Vec<u8>, Error> {
        if self.delta.len() > self.addrs.len().div_ceil(64) {
            return Err(Error::Protocol(
                "page batch has a delta map longer than its pages".into(),
            ));
        }
        let mut data = self.decompress()?;
        let mut old = vec![0u8; PAGE];
        for (i, &addr) in self.addrs.iter().enumerate() {
            if !self.is_delta(i) {
                continue;
            }
            mem.read_slice(&mut old, GuestAddress(addr))
                .map_err(|e| Error::Io(format!("cannot read guest page {addr:#x}: {e}")))?;
            for (d, o) in data[i * PAGE..(i + 1) * PAGE].iter_mut().zip(&old) {
                *d ^= o;
            }
        }
        Ok(data)
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

    /// Epoch after epoch, a page changed in a few bytes travels as a delta that compresses to
    /// a fraction of the plain page, and the backup ends up with exactly the primary's bytes.
    #[test]
    fn delta_pages_are_small_and_decode_exactly() {
        let (src, dst) = (mem(), mem());
        let dirty = DirtyPages::new(vec![(0, 1 << 20, vec![0b1111_0000])]);
        let mut staging = Staging::default();
        staging.set_delta(true);
        let mut plain = Staging::default();
        let mut rng = 12345u64;
        let mut pages: Vec<Vec<u8>> = (0..4)
            .map(|_| {
                (0..PAGE)
                    .map(|_| {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        rng as u8
                    })
                    .collect()
            })
            .collect();
        for epoch in 0..5u64 {
            for (p, page) in (4..8u64).zip(pages.iter_mut()) {
                // After the first epoch only 16 bytes of each page change.
                if epoch > 0 {
                    let at = (epoch as usize * 16) % PAGE;
                    page[at..at + 16].fill(epoch as u8);
                }
                src.write_slice(page, GuestAddress(p * PAGE_SIZE)).unwrap();
            }
            staging.copy(&src, &dirty).unwrap();
            plain.copy(&src, &dirty).unwrap();
            let batch = staging.to_batch();
            let full = plain.to_batch();
            if epoch > 0 {
                assert!(
                    batch.lz4.len() * 10 < full.lz4.len(),
                    "epoch {epoch}: delta {} bytes vs plain {}",
                    batch.lz4.len(),
                    full.lz4.len()
                );
            }
            let data = batch.decode(&dst).unwrap();
            apply(&dst, &batch.addrs, &data).unwrap();
            for p in 4..8u64 {
                let (mut a, mut b) = (vec![0u8; PAGE], vec![0u8; PAGE]);
                src.read_slice(&mut a, GuestAddress(p * PAGE_SIZE)).unwrap();
                dst.read_slice(&mut b, GuestAddress(p * PAGE_SIZE)).unwrap();
                assert!(a == b, "epoch {epoch} page {p} differs on the backup");
            }
        }
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
            delta: Vec::new(),
        };
        assert!(garbage.decompress().is_err());
    }
}
