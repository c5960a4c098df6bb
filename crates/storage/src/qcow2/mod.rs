//! QCOW2 images (version 3, also reads version 2): L1/L2 mapping, refcounts, cluster
//! allocation, zero clusters, backing files and internal snapshots.
//!
//! Written from QEMU's format specification (docs/interop/qcow2.txt).
//!
//! # Crash consistency
//!
//! Metadata is cached in memory and written back at [`BlockBackend::flush`] in three phases
//! separated by `fdatasync`:
//!
//! 1. refcount blocks (and the refcount table when a block was added, after its own sync),
//!    L2 tables no durable L1 entry references yet, and all guest data already written;
//! 2. L2 tables that are already referenced, and the L1 table;
//! 3. refcount decrements of clusters the new metadata no longer references.
//!
//! So on disk a reference never points to a cluster whose contents or refcount are not yet
//! durable, and a refcount is never lower than the number of references: a crash can leak
//! clusters (which `qemu-img check -r leaks` reclaims) but never corrupt the image. Writes
//! that rewrite an already allocated, unshared cluster go straight to the file.
//!
//! Whether a cluster may be written in place is decided from its refcount (always in
//! memory), never from the `COPIED` flags; the flags are maintained for QEMU.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::raw::check_range;
use crate::{BlockBackend, OpenError};

/// The four bytes every qcow2 image starts with.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
const ZERO: u64 = 1;
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_DATA_FILE: u32 = 0x4441_5441;

const INCOMPAT_DIRTY: u64 = 1;
const INCOMPAT_CORRUPT: u64 = 2;
const INCOMPAT_DATA_FILE: u64 = 4;
const INCOMPAT_COMPRESSION: u64 = 8;
const INCOMPAT_EXTL2: u64 = 16;

const V3_HEADER_LEN: u32 = 104;
/// Most L2 tables kept in memory before the cache is written back and emptied.
const L2_CACHE_TABLES: usize = 1024;
/// Allocations tolerated before a write triggers an internal flush.
const MAX_PENDING_ALLOCS: usize = 8192;
/// Refuse images larger than this (bounds memory used by tables).
const MAX_SIZE: u64 = 1 << 50;

/// One internal snapshot as listed by `qemu-img snapshot -l`.
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    /// Unique id string (QEMU uses decimal numbers).
    pub id: String,
    /// Snapshot name (tag).
    pub name: String,
    /// Creation time, seconds since the Unix epoch.
    pub date_sec: u32,
    /// Nanoseconds part of the creation time.
    pub date_nsec: u32,
    /// Virtual disk size when the snapshot was taken.
    pub disk_size: u64,
    /// Bytes of saved VM state (0 for ours).
    pub vm_state_size: u64,
    l1_offset: u64,
    l1_size: u32,
    vm_clock_nsec: u64,
    extra: Vec<u8>,
}

/// Options for [`Qcow2::create`].
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// log2 of the cluster size (9..=21); 16 (64 KiB) when `None`.
    pub cluster_bits: Option<u32>,
    /// Backing file name as stored in the image (relative names are relative to the image).
    pub backing_file: Option<String>,
    /// Backing file format ("raw" or "qcow2"), stored in a header extension.
    pub backing_format: Option<String>,
}

#[derive(Debug)]
struct L2Table {
    entries: Vec<u64>,
    dirty: bool,
    /// Not referenced by any durable L1 entry yet: written in flush phase 1.
    fresh: bool,
}

#[derive(Debug)]
struct RefBlock {
    data: Vec<u8>,
    dirty: bool,
}

/// How a run of guest bytes is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// In this image at the given host file offset.
    Data(u64),
    /// Reads as zeros (zero cluster, or unallocated without a backing file).
    Zero,
    /// Not allocated here: comes from the backing file.
    Backing,
    /// A compressed cluster: its L2 entry (the run is never longer than the cluster).
    Compressed(u64),
}

/// A qcow2 image opened for reading or reading and writing.
pub struct Qcow2 {
    file: File,
    path: PathBuf,
    read_only: bool,
    version: u32,
    cluster_bits: u32,
    cluster_size: u64,
    l2_entries: u64,
    size: u64,
    l1_offset: u64,
    l1: Vec<u64>,
    l1_dirty: bool,
    l2_cache: HashMap<u64, L2Table>,
    rt_offset: u64,
    rt_clusters: u32,
    rt: Vec<u64>,
    rt_dirty: bool,
    refcount_order: u32,
    rb_entries: u64,
    refblocks: HashMap<u64, RefBlock>,
    end_cluster: u64,
    free_hint: u64,
    pending_free: Vec<u64>,
    pending_allocs: usize,
    data_dirty: bool,
    backing: Option<Box<dyn BlockBackend>>,
    backing_file: Option<String>,
    snapshots: Vec<SnapshotInfo>,
    snapshots_offset: u64,
    snapshots_len: u64,
    compression: Compression,
}

impl std::fmt::Debug for Qcow2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("cluster_size", &self.cluster_size)
            .field("snapshots", &self.snapshots.len())
            .finish()
    }
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}
fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}
fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn corrupt(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// A feature of the format that ftvm does not implement (told apart from corruption).
fn unsupported(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, msg.into())
}

fn div_ceil(a: u64, b: u64) -> u64 {
    a.div_ceil(b)
}

mod compressed;

pub use compressed::{ClusterCounts, Compression};
mod open;
mod refcount;
mod snapshot;
mod table;

impl Qcow2 {
    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    /// The backing file name stored in the header, if any.
    pub fn backing_file(&self) -> Option<&str> {
        self.backing_file.as_deref()
    }

    /// The internal snapshots, in table order.
    pub fn snapshots(&self) -> &[SnapshotInfo] {
        &self.snapshots
    }

    /// How compressed clusters are compressed.
    pub fn compression(&self) -> Compression {
        self.compression
    }

    /// The qcow2 version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Changes the virtual disk size to `new_size` bytes; shrinking is refused while data lies
    /// past the new end.
    pub fn resize(&mut self, new_size: u64) -> io::Result<()> {
        self.check_writable()?;
        if !new_size.is_multiple_of(512) || new_size > MAX_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("new size {new_size} must be a multiple of 512 and at most 1 PiB"),
            ));
        }
        if new_size < self.size {
            return self.shrink(new_size);
        }
        self.flush_metadata()?;
        let needed = div_ceil(new_size, self.cluster_size * self.l2_entries) as usize;
        let mut old_l1 = None;
        if needed > self.l1.len() {
            let mut l1 = self.l1.clone();
            l1.resize(needed, 0);
            let off = self.write_new_table(&l1)?;
            self.write_refblocks()?;
            self.file.sync_data()?;
            old_l1 = Some((self.l1_offset, self.l1.len() as u64));
            self.l1 = l1;
            self.l1_offset = off;
        }
        self.size = new_size;
        self.write_header_fields()?;
        self.file.sync_data()?;
        if let Some((off, n)) = old_l1 {
            self.free_table(off, n)?;
            self.write_refblocks()?;
        }
        Ok(())
    }

    /// Shrinks the virtual disk to `new_size`, refused (changing nothing) while any data, of
    /// the image or of its backing file, lies past it.
    fn shrink(&mut self, new_size: u64) -> io::Result<()> {
        let cs = self.cluster_size;
        let first_gone = new_size.div_ceil(cs);
        let mut off = first_gone * cs;
        while off < self.size {
            let (m, run) = self.map(off, self.size - off)?;
            let in_use = match m {
                Mapping::Zero => false,
                Mapping::Backing => self.backing.as_ref().is_some_and(|b| b.size() > off),
                Mapping::Data(_) | Mapping::Compressed(_) => true,
            };
            if in_use {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "cannot shrink to {new_size} bytes: data lies at {off} (past the new end); discard it in the guest first (fstrim) or keep the size"
                    ),
                ));
            }
            off += run;
        }
        if !new_size.is_multiple_of(cs) {
            // The tail of the last kept cluster must read as zeros if the disk grows again.
            let (m, _) = self.map(new_size, cs - new_size % cs)?;
            if !matches!(m, Mapping::Zero) {
                let zeros = vec![0u8; (cs - new_size % cs) as usize];
                self.write_cluster_piece(&zeros, new_size)?;
            }
        }
        self.flush_metadata()?;
        self.size = new_size;
        self.write_header_fields()?;
        self.file.sync_data()
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "image is open read-only",
            ));
        }
        Ok(())
    }
}

fn no_snapshot(name: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("no snapshot named {name:?}; list them with `ftvm volume snapshot list`"),
    )
}

fn encode_table(entries: &[u64]) -> Vec<u8> {
    let mut buf = vec![0u8; entries.len() * 8];
    for (i, e) in entries.iter().enumerate() {
        buf[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
    }
    buf
}

fn read_vec(file: &File, off: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut v = vec![0u8; len];
    file.read_exact_at(&mut v, off)?;
    Ok(v)
}

/// Reads as much as is there (up to `buf.len()`), returning the count.
fn read_upto(file: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let n = file.read_at(&mut buf[got..], off + got as u64)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(got)
}

/// Returns a freed cluster's space to the file system (best effort).
fn punch_hole(file: &File, off: u64, len: u64) {
    // SAFETY: fallocate only reads its integer arguments; the descriptor is owned by `file`,
    // which outlives the call.
    let _ = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
}

impl BlockBackend for Qcow2 {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(offset, buf.len(), self.size)?;
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let (m, run) = self.map(off, (buf.len() - done) as u64)?;
            let piece = &mut buf[done..done + run as usize];
            match m {
                Mapping::Data(host) => self.file.read_exact_at(piece, host).map_err(|e| {
                    io::Error::new(e.kind(), format!("reading data cluster at {host:#x}: {e}"))
                })?,
                Mapping::Zero => piece.fill(0),
                Mapping::Backing => self.read_backing(piece, off)?,
                Mapping::Compressed(entry) => {
                    let mut cluster = vec![0u8; self.cluster_size as usize];
                    self.read_compressed(entry, &mut cluster)?;
                    let at = (off % self.cluster_size) as usize;
                    piece.copy_from_slice(&cluster[at..at + piece.len()]);
                }
            }
            done += run as usize;
        }
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_writable()?;
        check_range(offset, buf.len(), self.size)?;
        let cs = self.cluster_size;
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let n = ((cs - off % cs) as usize).min(buf.len() - done);
            self.write_cluster_piece(&buf[done..done + n], off)?;
            done += n;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_metadata()
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.zero_range(offset, len)
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        if !self.read_only {
            if let Err(e) = self.flush_metadata() {
                tracing::error!(path = %self.path.display(), "qcow2 metadata write-back failed: {e}");
            }
        }
    }
}
