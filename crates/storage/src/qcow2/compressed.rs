//! Compressed clusters (zlib or zstd, as `qemu-img convert -c` writes them): where their data
//! lies, reading them, and the host clusters they hold references on.
//!
//! A compressed L2 entry (bit 62 set) holds, with `x = 62 - (cluster_bits - 8)`, the host byte
//! offset of the data in bits `0..x` (not aligned) and, in bits `x..62`, the number of 512-byte
//! sectors the data occupies beyond the one holding that offset. The data may straddle two host
//! clusters; each host cluster it touches carries one reference for it. Decompression stops once
//! a whole cluster has come out. Writing into a compressed cluster copies it, decompressed, to a
//! newly allocated cluster (as QEMU does) and drops the references of the old data.

use std::io::{self, Read};

use super::*;

/// How the image's compressed clusters are compressed (header byte 104).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Raw deflate, QEMU's default.
    Zlib,
    /// Zstandard (`qemu-img convert -c -o compression_type=zstd`).
    Zstd,
}

impl Compression {
    /// The compression of header field `compression_type`.
    pub(super) fn from_header(v: u8) -> io::Result<Self> {
        match v {
            0 => Ok(Compression::Zlib),
            1 => Ok(Compression::Zstd),
            other => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "compression type {other} is not supported (zlib and zstd are); convert with `qemu-img convert -O qcow2`"
                ),
            )),
        }
    }
}

/// Where one compressed cluster's data lies in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Extent {
    /// First byte of the compressed data.
    pub offset: u64,
    /// Bytes from `offset` to the end of its last sector.
    pub len: u64,
}

impl Qcow2 {
    /// Decodes a compressed L2 entry.
    pub(super) fn compressed_extent(&self, entry: u64) -> Extent {
        let x = 62 - (self.cluster_bits - 8);
        let offset = entry & ((1u64 << x) - 1);
        let sectors = ((entry & !(COPIED | COMPRESSED)) >> x) + 1;
        Extent {
            offset,
            len: sectors * 512 - (offset & 511),
        }
    }

    /// The host offsets of the clusters the compressed data of `entry` touches, after checking
    /// that they lie in the file.
    pub(super) fn compressed_clusters(&self, entry: u64) -> io::Result<Vec<u64>> {
        let ext = self.compressed_extent(entry);
        let cs = self.cluster_size;
        let first = ext.offset / cs;
        let last = (ext.offset + ext.len - 1) / cs;
        if ext.offset < cs || last > self.end_cluster.max(1) {
            return Err(corrupt(format!(
                "corrupt compressed cluster entry {entry:#x}: its data at {:#x} (+{}) lies outside the image; run qemu-img check",
                ext.offset, ext.len
            )));
        }
        Ok((first..=last).map(|c| c * cs).collect())
    }

    /// Reads and decompresses the cluster of compressed L2 entry `entry` into `out`, which has
    /// the cluster's size.
    pub(super) fn read_compressed(&self, entry: u64, out: &mut [u8]) -> io::Result<()> {
        let ext = self.compressed_extent(entry);
        self.compressed_clusters(entry)?;
        let mut data = vec![0u8; ext.len as usize];
        // The last sector may end past the end of the file.
        let got = read_upto(&self.file, &mut data, ext.offset)?;
        data.truncate(got);
        let produced = match self.compression {
            Compression::Zlib => inflate_raw(&data, out),
            Compression::Zstd => unzstd(&data, out),
        }
        .map_err(|e| {
            corrupt(format!(
                "compressed cluster at {:#x} does not decompress ({e}): the image is corrupt; run qemu-img check",
                ext.offset
            ))
        })?;
        if produced != out.len() {
            return Err(corrupt(format!(
                "compressed cluster at {:#x} decompresses to {produced} bytes, not a whole cluster of {}",
                ext.offset,
                out.len()
            )));
        }
        Ok(())
    }
}

/// How an image's guest clusters are stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ClusterCounts {
    /// Plain data clusters in this image.
    pub data: u64,
    /// Compressed clusters.
    pub compressed: u64,
    /// Zero clusters (read as zeros, hold no data).
    pub zero: u64,
    /// Clusters not allocated here (zeros, or the backing file's).
    pub unallocated: u64,
}

impl Qcow2 {
    /// Counts the guest clusters of the active image by how they are stored.
    pub fn cluster_counts(&mut self) -> io::Result<ClusterCounts> {
        let mut c = ClusterCounts::default();
        let total = self.size.div_ceil(self.cluster_size);
        for i in 0..self.l1.len() {
            let l2_off = self.l1[i] & OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            self.load_l2(l2_off)?;
            let first = i as u64 * self.l2_entries;
            let n = self.l2_entries.min(total.saturating_sub(first)) as usize;
            for &e in &self.l2_cache[&l2_off].entries[..n] {
                if e & COMPRESSED != 0 {
                    c.compressed += 1;
                } else if e & ZERO != 0 && self.version >= 3 {
                    c.zero += 1;
                } else if e & OFFSET_MASK != 0 {
                    c.data += 1;
                }
            }
        }
        c.unallocated = total - c.data - c.compressed - c.zero;
        Ok(c)
    }

    /// Rewrites every compressed cluster as a plain one (same contents); returns how many.
    pub fn decompress_all(&mut self) -> io::Result<u64> {
        self.check_writable()?;
        let cs = self.cluster_size;
        let mut buf = vec![0u8; cs as usize];
        let mut n = 0;
        let mut off = 0;
        while off < self.size {
            if let Mapping::Compressed(_) = self.map_cluster(off)? {
                let len = cs.min(self.size - off) as usize;
                self.read_at(&mut buf[..len], off)?;
                self.write_at(&buf[..len], off)?;
                n += 1;
            }
            off += cs;
        }
        self.flush_metadata()?;
        Ok(n)
    }
}

/// Raw deflate (no zlib header), stopping when `out` is full; returns the bytes produced.
fn inflate_raw(input: &[u8], out: &mut [u8]) -> io::Result<usize> {
    let mut d = flate2::read::DeflateDecoder::new(input);
    let mut n = 0;
    while n < out.len() {
        match d.read(&mut out[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Zstandard frames, stopping when `out` is full; returns the bytes produced.
fn unzstd(input: &[u8], out: &mut [u8]) -> io::Result<usize> {
    use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
    let mut dec = Decoder::new()?;
    let mut inb = InBuffer::around(input);
    let mut outb = OutBuffer::around(out);
    while outb.pos() < outb.capacity() {
        let before = (inb.pos(), outb.pos());
        dec.run(&mut inb, &mut outb)?;
        if (inb.pos(), outb.pos()) == before {
            break; // no progress: input exhausted
        }
    }
    Ok(outb.pos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_codecs_stop_at_a_cluster_and_refuse_garbage() {
        use std::io::Write;
        let cluster: Vec<u8> = (0..4096u32).map(|i| (i % 7) as u8).collect();
        let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        z.write_all(&cluster).unwrap();
        let mut deflated = z.finish().unwrap();
        deflated.extend_from_slice(&[0xaa; 300]); // the rest of the last sector
        let mut out = vec![0u8; 4096];
        assert_eq!(inflate_raw(&deflated, &mut out).unwrap(), 4096);
        assert_eq!(out, cluster);
        let mut zst = zstd::bulk::compress(&cluster, 3).unwrap();
        zst.extend_from_slice(&[0; 100]);
        out.fill(0);
        assert_eq!(unzstd(&zst, &mut out).unwrap(), 4096);
        assert_eq!(out, cluster);
        let bad = inflate_raw(&[0xff; 64], &mut out);
        assert!(
            bad.map_or(true, |n| n < 4096),
            "garbage inflated to a cluster"
        );
        assert!(unzstd(&[0xff; 64], &mut out).is_err());
    }
}
