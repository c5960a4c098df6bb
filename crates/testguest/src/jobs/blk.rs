//! `blk-pattern [SECTORS [EVERY_MS]]`: writes a known pattern to the first SECTORS sectors of
//! the first virtio block device in multi-sector requests, flushes, reads it back and verifies
//! it; with EVERY_MS, then rewrites one chunk every EVERY_MS, in turn over the SECTORS (a
//! steady disk load). On a read-only disk it writes all the same and reports the device's
//! answer (the monitor must refuse).
//!
//! Word `w` (0..64) of sector `s` holds `s * 0x9E37_79B9_7F4A_7C15 ^ w`, little endian.

use alloc::vec;

use crate::virtio::blk::{BlkDev, SECTOR_SIZE};
use crate::virtio::{self, DEVICE_BLOCK};
use crate::{fatal, println};

/// Sectors per request (64 KiB).
const CHUNK_SECTORS: u64 = 128;
const WORDS: usize = SECTOR_SIZE / 8;

fn word(sector: u64, w: usize) -> u64 {
    sector.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ w as u64
}

fn fill(buf: &mut [u8], first: u64) {
    for (i, sector) in buf.chunks_exact_mut(SECTOR_SIZE).enumerate() {
        let s = first + i as u64;
        for (w, bytes) in sector.chunks_exact_mut(8).enumerate() {
            bytes.copy_from_slice(&word(s, w).to_le_bytes());
        }
    }
}

/// The first sector in `buf` (starting at `first`) that does not hold the pattern.
fn check(buf: &[u8], first: u64) -> Option<u64> {
    buf.chunks_exact(SECTOR_SIZE)
        .enumerate()
        .find_map(|(i, sector)| {
            let s = first + i as u64;
            let ok = (0..WORDS).all(|w| {
                let v = u64::from_le_bytes(sector[8 * w..8 * w + 8].try_into().expect("8 bytes"));
                v == word(s, w)
            });
            (!ok).then_some(s)
        })
}

pub fn run(sectors: u64, every_ms: u64) -> ! {
    let Some(found) = virtio::find(DEVICE_BLOCK) else {
        fatal!("blk-pattern: no virtio block device");
    };
    let mut dev = match BlkDev::new(found) {
        Ok(d) => d,
        Err(e) => fatal!("blk-pattern: virtio-blk in slot {}: {:?}", found.slot, e),
    };
    if sectors == 0 || sectors > dev.capacity() {
        fatal!(
            "blk-pattern: {} sectors requested, disk has {}",
            sectors,
            dev.capacity()
        );
    }
    if dev.read_only() {
        // A real guest would stop here; the test guest writes anyway, so the monitor's refusal
        // is what gets tested (the write must fail with the device's I/O error status).
        println!("blk-pattern: the disk is read-only (VIRTIO_BLK_F_RO); writing anyway");
    }
    super::running("blk-pattern");
    println!(
        "blk-pattern: disk slot={} capacity={} sectors",
        found.slot,
        dev.capacity()
    );

    let mut buf = vec![0u8; (CHUNK_SECTORS as usize) * SECTOR_SIZE];
    let mut s = 0;
    while s < sectors {
        let n = CHUNK_SECTORS.min(sectors - s);
        let chunk = &mut buf[..n as usize * SECTOR_SIZE];
        fill(chunk, s);
        if let Err(e) = dev.write(s, chunk) {
            fatal!("blk-pattern: write at sector {}: {:?}", s, e);
        }
        s += n;
    }
    if let Err(e) = dev.flush() {
        fatal!("blk-pattern: flush: {:?}", e);
    }
    let mut s = 0;
    let mut bad = None;
    while s < sectors && bad.is_none() {
        let n = CHUNK_SECTORS.min(sectors - s);
        let chunk = &mut buf[..n as usize * SECTOR_SIZE];
        chunk.fill(0);
        if let Err(e) = dev.read(s, chunk) {
            fatal!("blk-pattern: read at sector {}: {:?}", s, e);
        }
        bad = check(chunk, s);
        s += n;
    }
    match bad {
        None => println!("blk-pattern ok sectors={}", sectors),
        Some(b) => println!("blk-pattern FAIL sector={}", b),
    }
    if every_ms == 0 {
        loop {
            core::hint::spin_loop();
        }
    }
    let mut ticker = crate::clock::Ticker::new(every_ms * 1000);
    let chunks = sectors.div_ceil(CHUNK_SECTORS);
    let mut round = 0u64;
    loop {
        let first = (round % chunks) * CHUNK_SECTORS;
        round += 1;
        ticker.wait();
        let n = CHUNK_SECTORS.min(sectors - first);
        let chunk = &mut buf[..n as usize * SECTOR_SIZE];
        fill(chunk, first);
        if let Err(e) = dev.write(first, chunk).and_then(|()| dev.flush()) {
            fatal!("blk-pattern: rewrite at sector {}: {:?}", first, e);
        }
        println!("blk-pattern rewrite {}", round);
    }
}
