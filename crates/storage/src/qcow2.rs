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
    /// A compressed cluster (not supported).
    Compressed,
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

fn div_ceil(a: u64, b: u64) -> u64 {
    a.div_ceil(b)
}

impl Qcow2 {
    /// Creates a new, empty qcow2 v3 image of `size` bytes at `path` (which must not exist).
    pub fn create(path: &Path, size: u64, opts: &CreateOptions) -> io::Result<()> {
        let cluster_bits = opts.cluster_bits.unwrap_or(16);
        if !(9..=21).contains(&cluster_bits) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cluster size 2^{cluster_bits} is out of range; use 512 B to 2 MiB"),
            ));
        }
        if !size.is_multiple_of(512) || size > MAX_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("size {size} must be a multiple of 512 and at most 1 PiB"),
            ));
        }
        let cs = 1u64 << cluster_bits;
        let l2e = cs / 8;
        let l1_size = div_ceil(size, cs * l2e);
        let l1_clusters = div_ceil(l1_size * 8, cs).max(1);
        let rb_entries = cs * 8 / 16;
        let used = 3 + l1_clusters;
        if used > rb_entries {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "cluster size too small for this disk size; use a larger cluster size",
            ));
        }
        let mut header = vec![0u8; cs as usize];
        header[0..4].copy_from_slice(&QCOW2_MAGIC);
        header[4..8].copy_from_slice(&3u32.to_be_bytes());
        header[20..24].copy_from_slice(&cluster_bits.to_be_bytes());
        header[24..32].copy_from_slice(&size.to_be_bytes());
        header[36..40].copy_from_slice(&(l1_size as u32).to_be_bytes());
        header[40..48].copy_from_slice(&(3 * cs).to_be_bytes());
        header[48..56].copy_from_slice(&cs.to_be_bytes());
        header[56..60].copy_from_slice(&1u32.to_be_bytes());
        header[96..100].copy_from_slice(&4u32.to_be_bytes());
        header[100..104].copy_from_slice(&V3_HEADER_LEN.to_be_bytes());
        let mut at = V3_HEADER_LEN as usize;
        if let Some(fmt) = &opts.backing_format {
            let b = fmt.as_bytes();
            header[at..at + 4].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
            header[at + 4..at + 8].copy_from_slice(&(b.len() as u32).to_be_bytes());
            header[at + 8..at + 8 + b.len()].copy_from_slice(b);
            at += 8 + b.len().div_ceil(8) * 8;
        }
        at += 8; // end-of-extensions marker (zeros)
        if let Some(bf) = &opts.backing_file {
            let b = bf.as_bytes();
            if b.is_empty() || b.len() > 1023 || at + b.len() > header.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "backing file name must be 1 to 1023 bytes",
                ));
            }
            header[8..16].copy_from_slice(&(at as u64).to_be_bytes());
            header[16..20].copy_from_slice(&(b.len() as u32).to_be_bytes());
            header[at..at + b.len()].copy_from_slice(b);
        }
        let mut rt = vec![0u8; cs as usize];
        rt[0..8].copy_from_slice(&(2 * cs).to_be_bytes());
        let mut rb = vec![0u8; cs as usize];
        for c in 0..used as usize {
            rb[c * 2..c * 2 + 2].copy_from_slice(&1u16.to_be_bytes());
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        file.write_all_at(&rt, cs)?;
        file.write_all_at(&rb, 2 * cs)?;
        file.write_all_at(&vec![0u8; (l1_clusters * cs) as usize], 3 * cs)?;
        file.sync_data()?;
        // The header last: a crash before this leaves no valid image behind.
        file.write_all_at(&header, 0)?;
        file.sync_all()?;
        Ok(())
    }

    /// Opens the qcow2 image at `path`; its backing chain (if any) is opened read-only, at most
    /// [`crate::format::MAX_BACKING_DEPTH`] deep and never looping.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, OpenError> {
        Self::open_in_chain(path, read_only, &mut Vec::new())
    }

    pub(crate) fn open_in_chain(
        path: &Path,
        read_only: bool,
        chain: &mut crate::format::Chain,
    ) -> Result<Self, OpenError> {
        let fmt_err = |reason: String| OpenError::Format {
            path: path.display().to_string(),
            reason,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| OpenError::Open {
                path: path.display().to_string(),
                source,
            })?;
        crate::format::enter(chain, &file, path).map_err(|e| fmt_err(e.to_string()))?;
        Self::from_file(file, path, read_only, chain).map_err(|e| fmt_err(e.to_string()))
    }

    fn from_file(
        file: File,
        path: &Path,
        read_only: bool,
        chain: &mut crate::format::Chain,
    ) -> io::Result<Self> {
        let file_len = file.metadata()?.len();
        let mut h = [0u8; 112];
        let got = read_upto(&file, &mut h, 0)?;
        if got < 72 || h[0..4] != QCOW2_MAGIC {
            return Err(corrupt("not a qcow2 image (bad magic or truncated header)"));
        }
        let version = be32(&h, 4);
        if version != 2 && version != 3 {
            return Err(corrupt(format!(
                "qcow2 version {version} is not supported (2 and 3 are); convert with qemu-img convert -O qcow2"
            )));
        }
        let cluster_bits = be32(&h, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(corrupt(format!(
                "corrupt header: cluster_bits {cluster_bits} is out of range 9..21"
            )));
        }
        let cs = 1u64 << cluster_bits;
        let size = be64(&h, 24);
        if size > MAX_SIZE {
            return Err(corrupt(format!(
                "corrupt header: virtual size {size} is too large"
            )));
        }
        if be32(&h, 32) != 0 {
            return Err(corrupt(
                "encrypted qcow2 images are not supported; decrypt with qemu-img convert",
            ));
        }
        let l1_size = be32(&h, 36) as u64;
        let l1_offset = be64(&h, 40);
        let rt_offset = be64(&h, 48);
        let rt_clusters = be32(&h, 56);
        let nb_snapshots = be32(&h, 60);
        let snapshots_offset = be64(&h, 64);
        let (incompat, autoclear, refcount_order, header_len) = if version >= 3 {
            if got < 104 {
                return Err(corrupt("truncated qcow2 v3 header"));
            }
            (be64(&h, 72), be64(&h, 88), be32(&h, 96), be32(&h, 100))
        } else {
            (0, 0, 4, 72)
        };
        if (version >= 3 && header_len < V3_HEADER_LEN)
            || !header_len.is_multiple_of(8)
            || header_len as u64 > cs
        {
            return Err(corrupt(format!(
                "corrupt header: header length {header_len}"
            )));
        }
        let known = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION;
        if incompat & INCOMPAT_DATA_FILE != 0 {
            return Err(corrupt(
                "images with an external data file are not supported",
            ));
        }
        if incompat & INCOMPAT_EXTL2 != 0 {
            return Err(corrupt(
                "images with extended L2 entries (subclusters) are not supported; convert with qemu-img convert -O qcow2",
            ));
        }
        if incompat & !known != 0 {
            return Err(corrupt(format!(
                "unknown incompatible feature bits {:#x}; this image needs a newer tool",
                incompat & !known
            )));
        }
        if !read_only && incompat & INCOMPAT_DIRTY != 0 {
            return Err(corrupt(
                "image was not closed cleanly by QEMU (dirty bit set): run `qemu-img check -r all` first",
            ));
        }
        if !read_only && incompat & INCOMPAT_CORRUPT != 0 {
            return Err(corrupt(
                "image is marked corrupt: run `qemu-img check -r all` or open it read-only",
            ));
        }
        if !(3..=6).contains(&refcount_order) {
            return Err(corrupt(format!(
                "refcount width 2^{refcount_order} bits is not supported (8 to 64 are)"
            )));
        }
        let l2e = cs / 8;
        let needed_l1 = div_ceil(size, cs * l2e);
        if l1_size < needed_l1 || l1_size > (1 << 26) {
            return Err(corrupt(format!(
                "corrupt header: L1 table of {l1_size} entries cannot map {size} bytes"
            )));
        }
        let in_file = |off: u64, len: u64, what: &str| -> io::Result<()> {
            if !off.is_multiple_of(cs) {
                return Err(corrupt(format!(
                    "corrupt header: {what} offset {off:#x} is not cluster aligned"
                )));
            }
            match off.checked_add(len) {
                Some(end) if end <= file_len => Ok(()),
                _ => Err(corrupt(format!(
                    "{what} at {off:#x} (+{len} bytes) lies beyond the end of the {file_len}-byte file: the image is truncated or corrupt"
                ))),
            }
        };
        if l1_size > 0 {
            in_file(l1_offset, l1_size * 8, "L1 table")?;
        }
        if rt_clusters == 0 || rt_clusters > (1 << 20) {
            return Err(corrupt(format!(
                "corrupt header: refcount table of {rt_clusters} clusters"
            )));
        }
        in_file(rt_offset, rt_clusters as u64 * cs, "refcount table")?;

        // Header extensions and backing file.
        let first = read_vec(&file, 0, cs.min(file_len) as usize)?;
        let mut backing_format = None;
        let mut at = header_len as usize;
        if version >= 3 {
            while at + 8 <= first.len() {
                let ty = be32(&first, at);
                let len = be32(&first, at + 4) as usize;
                if ty == EXT_END {
                    break;
                }
                if at + 8 + len > first.len() {
                    return Err(corrupt(
                        "corrupt header extension (runs past the first cluster)",
                    ));
                }
                let data = &first[at + 8..at + 8 + len];
                match ty {
                    EXT_BACKING_FORMAT => {
                        backing_format = Some(String::from_utf8_lossy(data).into_owned())
                    }
                    EXT_DATA_FILE => {
                        return Err(corrupt(
                            "images with an external data file are not supported",
                        ))
                    }
                    _ => {}
                }
                at += 8 + len.div_ceil(8) * 8;
            }
        }
        let bf_off = be64(&h, 8) as usize;
        let bf_len = be32(&h, 16) as usize;
        let backing_file = if bf_off != 0 {
            if bf_len == 0 || bf_len > 1023 || bf_off + bf_len > first.len() {
                return Err(corrupt(
                    "corrupt header: backing file name lies outside the first cluster",
                ));
            }
            Some(String::from_utf8_lossy(&first[bf_off..bf_off + bf_len]).into_owned())
        } else {
            None
        };
        let backing = match &backing_file {
            None => None,
            Some(name) => {
                let p = Path::new(name);
                let full = if p.is_absolute() {
                    p.to_path_buf()
                } else {
                    path.parent().unwrap_or(Path::new(".")).join(p)
                };
                Some(crate::format::open_backing(
                    &full,
                    backing_format.as_deref(),
                    chain,
                )?)
            }
        };

        let l1_raw = read_vec(&file, l1_offset, (l1_size * 8) as usize)?;
        let l1: Vec<u64> = (0..l1_size as usize)
            .map(|i| be64(&l1_raw, i * 8))
            .collect();
        for (i, e) in l1.iter().enumerate() {
            if e & L1_RESERVED != 0 {
                return Err(corrupt(format!(
                    "corrupt L1 entry {i}: {e:#x} has reserved bits set"
                )));
            }
            let off = e & OFFSET_MASK;
            if off != 0 && !off.is_multiple_of(cs) {
                return Err(corrupt(format!(
                    "corrupt L1 entry {i}: L2 table offset {off:#x} is not aligned"
                )));
            }
            if off != 0 && off + cs > file_len {
                return Err(corrupt(format!(
                    "L2 table at {off:#x} lies beyond the end of the {file_len}-byte file: the image is truncated"
                )));
            }
        }
        let rt_raw = read_vec(&file, rt_offset, (rt_clusters as u64 * cs) as usize)?;
        let rt: Vec<u64> = (0..(rt_clusters as u64 * cs / 8) as usize)
            .map(|i| be64(&rt_raw, i * 8) & !0x1ff)
            .collect();
        let rb_entries = cs * 8 / (1u64 << refcount_order);

        let mut img = Qcow2 {
            file,
            path: path.to_path_buf(),
            read_only,
            version,
            cluster_bits,
            cluster_size: cs,
            l2_entries: l2e,
            size,
            l1_offset,
            l1,
            l1_dirty: false,
            l2_cache: HashMap::new(),
            rt_offset,
            rt_clusters,
            rt,
            rt_dirty: false,
            refcount_order,
            rb_entries,
            refblocks: HashMap::new(),
            end_cluster: div_ceil(file_len, cs),
            free_hint: 1,
            pending_free: Vec::new(),
            pending_allocs: 0,
            data_dirty: false,
            backing,
            backing_file,
            snapshots: Vec::new(),
            snapshots_offset,
            snapshots_len: 0,
        };
        img.read_snapshot_table(nb_snapshots, snapshots_offset, file_len)?;
        if !read_only {
            // Every refcount block, so allocation knows every used cluster.
            for b in 0..img.rt.len() as u64 {
                let off = img.rt[b as usize];
                if off == 0 {
                    continue;
                }
                if !off.is_multiple_of(cs) || off + cs > file_len {
                    return Err(corrupt(format!(
                        "refcount block {b} at {off:#x} lies outside the {file_len}-byte file: the image is truncated or corrupt"
                    )));
                }
                let data = read_vec(&img.file, off, cs as usize)?;
                let rb = RefBlock { data, dirty: false };
                img.refblocks.insert(b, rb);
                // Clusters referenced beyond the end of the file (a crash after allocation).
                for i in (0..rb_entries).rev() {
                    if img.refcount(b * rb_entries + i) != 0 {
                        img.end_cluster = img.end_cluster.max(b * rb_entries + i + 1);
                        break;
                    }
                }
            }
            if autoclear != 0 && version >= 3 {
                // We do not maintain bitmaps etc.: drop the features we do not know.
                img.file.write_all_at(&0u64.to_be_bytes(), 88)?;
                img.file.sync_data()?;
            }
        }
        Ok(img)
    }

    fn read_snapshot_table(&mut self, n: u32, off: u64, file_len: u64) -> io::Result<()> {
        if n == 0 {
            return Ok(());
        }
        if n > 65536 || !off.is_multiple_of(self.cluster_size) || off >= file_len {
            return Err(corrupt(format!(
                "corrupt snapshot table ({n} snapshots at {off:#x}, file {file_len} bytes)"
            )));
        }
        let mut at = off;
        for _ in 0..n {
            let mut fixed = [0u8; 40];
            self.file
                .read_exact_at(&mut fixed, at)
                .map_err(|e| corrupt(format!("snapshot table truncated at {at:#x}: {e}")))?;
            let id_len = be16(&fixed, 12) as usize;
            let name_len = be16(&fixed, 14) as usize;
            let extra_len = be32(&fixed, 36) as usize;
            if extra_len > 1024 {
                return Err(corrupt(
                    "corrupt snapshot table entry (extra data too long)",
                ));
            }
            let var = read_vec(&self.file, at + 40, extra_len + id_len + name_len)
                .map_err(|e| corrupt(format!("snapshot table truncated: {e}")))?;
            let extra = var[..extra_len].to_vec();
            let id = String::from_utf8_lossy(&var[extra_len..extra_len + id_len]).into_owned();
            let name = String::from_utf8_lossy(&var[extra_len + id_len..]).into_owned();
            let vm_state_size = if extra_len >= 8 {
                be64(&extra, 0)
            } else {
                be32(&fixed, 32) as u64
            };
            let disk_size = if extra_len >= 16 {
                be64(&extra, 8)
            } else {
                self.size
            };
            let l1_offset = be64(&fixed, 0);
            let l1_size = be32(&fixed, 8);
            if l1_size > 0
                && (!l1_offset.is_multiple_of(self.cluster_size)
                    || l1_offset + l1_size as u64 * 8 > file_len)
            {
                return Err(corrupt(format!(
                    "snapshot {name}: L1 table outside the file"
                )));
            }
            self.snapshots.push(SnapshotInfo {
                id,
                name,
                date_sec: be32(&fixed, 16),
                date_nsec: be32(&fixed, 20),
                disk_size,
                vm_state_size,
                l1_offset,
                l1_size,
                vm_clock_nsec: be64(&fixed, 24),
                extra,
            });
            at += (40 + extra_len + id_len + name_len).div_ceil(8) as u64 * 8;
        }
        self.snapshots_len = at - off;
        Ok(())
    }

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

    /// The qcow2 version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    // ---------------------------------------------------------------- refcounts

    fn refcount(&self, cluster: u64) -> u64 {
        let b = cluster / self.rb_entries;
        let i = cluster % self.rb_entries;
        let Some(rb) = self.refblocks.get(&b) else {
            return 0;
        };
        let bytes = 1usize << (self.refcount_order - 3);
        let at = i as usize * bytes;
        rb.data[at..at + bytes]
            .iter()
            .fold(0u64, |acc, &x| (acc << 8) | x as u64)
    }

    fn max_refcount(&self) -> u64 {
        if self.refcount_order >= 6 {
            u64::MAX
        } else {
            (1u64 << (1u64 << self.refcount_order)) - 1
        }
    }

    /// Sets a refcount; the cluster's refcount block must exist.
    fn set_refcount(&mut self, cluster: u64, value: u64) -> io::Result<()> {
        let b = cluster / self.rb_entries;
        let i = cluster % self.rb_entries;
        let bytes = 1usize << (self.refcount_order - 3);
        let rb = self
            .refblocks
            .get_mut(&b)
            .ok_or_else(|| corrupt(format!("no refcount block for cluster {cluster}")))?;
        let at = i as usize * bytes;
        let be = value.to_be_bytes();
        rb.data[at..at + bytes].copy_from_slice(&be[8 - bytes..]);
        rb.dirty = true;
        Ok(())
    }

    fn adjust_refcount(&mut self, host_off: u64, delta: i64) -> io::Result<()> {
        let c = host_off >> self.cluster_bits;
        let rc = self.refcount(c);
        let new = if delta < 0 {
            rc.checked_sub(delta.unsigned_abs()).ok_or_else(|| {
                corrupt(format!(
                    "refcount of cluster at {host_off:#x} would drop below zero: the image is corrupt; run qemu-img check -r all"
                ))
            })?
        } else {
            rc.checked_add(delta as u64)
                .filter(|v| *v <= self.max_refcount())
                .ok_or_else(|| corrupt(format!("refcount of cluster at {host_off:#x} overflows")))?
        };
        self.set_refcount(c, new)?;
        if new == 0 {
            self.free_hint = self.free_hint.min(c);
            self.l2_cache.remove(&host_off);
            punch_hole(&self.file, host_off, self.cluster_size);
        }
        Ok(())
    }

    fn has_block(&self, b: u64) -> bool {
        self.refblocks.contains_key(&b)
    }

    /// Allocates `n` contiguous clusters past everything in use; returns the first index.
    fn alloc_at_end(&mut self, n: u64) -> io::Result<u64> {
        loop {
            let start = self.end_cluster;
            let first_b = start / self.rb_entries;
            let last_b = (start + n - 1) / self.rb_entries;
            let missing = (first_b..=last_b).find(|b| !self.has_block(*b));
            match missing {
                None => {
                    for c in start..start + n {
                        self.set_refcount(c, 1)?;
                    }
                    self.end_cluster = start + n;
                    self.pending_allocs += 1;
                    return Ok(start);
                }
                Some(b) if b as usize >= self.rt.len() => self.grow_refcount_table(b + 1)?,
                Some(b) => {
                    // Nothing in range `b` is in use: the block describes itself.
                    let pos = start.max(b * self.rb_entries);
                    self.refblocks.insert(
                        b,
                        RefBlock {
                            data: vec![0; self.cluster_size as usize],
                            dirty: true,
                        },
                    );
                    self.rt[b as usize] = pos * self.cluster_size;
                    self.rt_dirty = true;
                    self.set_refcount(pos, 1)?;
                    self.end_cluster = self.end_cluster.max(pos + 1);
                }
            }
        }
    }

    /// Allocates one cluster, reusing a free one when there is one; returns its host offset.
    fn alloc_cluster(&mut self) -> io::Result<u64> {
        let mut c = self.free_hint.max(1);
        while c < self.end_cluster {
            if self.has_block(c / self.rb_entries) && self.refcount(c) == 0 {
                self.set_refcount(c, 1)?;
                self.free_hint = c + 1;
                self.pending_allocs += 1;
                return Ok(c * self.cluster_size);
            }
            c += 1;
        }
        self.free_hint = self.end_cluster;
        Ok(self.alloc_at_end(1)? * self.cluster_size)
    }

    fn grow_refcount_table(&mut self, min_entries: u64) -> io::Result<()> {
        self.write_refblocks()?;
        let epc = self.cluster_size / 8;
        let mut entries = min_entries.max(self.rt.len() as u64 * 2).div_ceil(epc) * epc;
        let (t, m, next, new_blocks) = loop {
            let m = entries / epc;
            let t = self.end_cluster;
            let mut next = t + m;
            let mut new_blocks: Vec<(u64, u64)> = Vec::new();
            loop {
                let lo = t / self.rb_entries;
                let hi = (next - 1) / self.rb_entries;
                let need: Vec<u64> = (lo..=hi)
                    .filter(|b| !self.has_block(*b) && !new_blocks.iter().any(|(nb, _)| nb == b))
                    .collect();
                if need.is_empty() {
                    break;
                }
                for b in need {
                    new_blocks.push((b, next));
                    next += 1;
                }
            }
            let max_b = (next - 1) / self.rb_entries;
            if max_b < entries {
                break (t, m, next, new_blocks);
            }
            entries *= 2;
        };
        let mut rt = self.rt.clone();
        rt.resize(entries as usize, 0);
        for (b, pos) in &new_blocks {
            rt[*b as usize] = pos * self.cluster_size;
            self.refblocks.insert(
                *b,
                RefBlock {
                    data: vec![0; self.cluster_size as usize],
                    dirty: true,
                },
            );
        }
        for c in t..next {
            self.set_refcount(c, 1)?;
        }
        let old_off = self.rt_offset;
        let old_clusters = self.rt_clusters as u64;
        self.rt = rt;
        self.rt_offset = t * self.cluster_size;
        self.rt_clusters = m as u32;
        self.end_cluster = next;
        self.write_refblocks()?;
        self.write_refcount_table()?;
        self.file.sync_data()?;
        self.write_header_fields()?;
        self.file.sync_data()?;
        self.rt_dirty = false;
        for i in 0..old_clusters {
            self.adjust_refcount(old_off + i * self.cluster_size, -1)?;
        }
        Ok(())
    }

    fn write_refblocks(&mut self) -> io::Result<()> {
        let mut dirty: Vec<u64> = self
            .refblocks
            .iter()
            .filter(|(_, rb)| rb.dirty)
            .map(|(b, _)| *b)
            .collect();
        dirty.sort_unstable();
        for b in dirty {
            let off = self.rt[b as usize];
            if let Some(rb) = self.refblocks.get_mut(&b) {
                self.file.write_all_at(&rb.data, off)?;
                rb.dirty = false;
            }
        }
        Ok(())
    }

    fn write_refcount_table(&mut self) -> io::Result<()> {
        let mut buf = vec![0u8; (self.rt_clusters as u64 * self.cluster_size) as usize];
        for (i, e) in self.rt.iter().enumerate() {
            buf[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
        }
        self.file.write_all_at(&buf, self.rt_offset)
    }

    /// Writes header bytes 24..72 (size, L1, refcount table, snapshots) in one sector write.
    fn write_header_fields(&mut self) -> io::Result<()> {
        let mut b = [0u8; 48];
        b[0..8].copy_from_slice(&self.size.to_be_bytes());
        b[12..16].copy_from_slice(&(self.l1.len() as u32).to_be_bytes());
        b[16..24].copy_from_slice(&self.l1_offset.to_be_bytes());
        b[24..32].copy_from_slice(&self.rt_offset.to_be_bytes());
        b[32..36].copy_from_slice(&self.rt_clusters.to_be_bytes());
        b[36..40].copy_from_slice(&(self.snapshots.len() as u32).to_be_bytes());
        b[40..48].copy_from_slice(&self.snapshots_offset.to_be_bytes());
        self.file.write_all_at(&b, 24)
    }

    // ---------------------------------------------------------------- L1/L2

    fn load_l2(&mut self, off: u64) -> io::Result<()> {
        if self.l2_cache.contains_key(&off) {
            return Ok(());
        }
        if self.l2_cache.len() >= L2_CACHE_TABLES {
            if self.read_only {
                self.l2_cache.clear();
            } else {
                self.flush_metadata()?;
                self.l2_cache.retain(|_, t| t.dirty);
            }
        }
        let raw = read_vec(&self.file, off, self.cluster_size as usize)
            .map_err(|e| corrupt(format!("cannot read L2 table at {off:#x}: {e}")))?;
        let entries: Vec<u64> = (0..self.l2_entries as usize)
            .map(|i| be64(&raw, i * 8))
            .collect();
        self.l2_cache.insert(
            off,
            L2Table {
                entries,
                dirty: false,
                fresh: false,
            },
        );
        Ok(())
    }

    fn l2_entry(&mut self, l2_off: u64, idx: u64) -> io::Result<u64> {
        self.load_l2(l2_off)?;
        let e = self.l2_cache[&l2_off].entries[idx as usize];
        if e & COMPRESSED == 0 && e & L2_RESERVED != 0 {
            return Err(corrupt(format!(
                "corrupt L2 entry {e:#x} in table at {l2_off:#x}: run qemu-img check"
            )));
        }
        Ok(e)
    }

    fn set_l2_entry(&mut self, l2_off: u64, idx: u64, e: u64) {
        if let Some(t) = self.l2_cache.get_mut(&l2_off) {
            t.entries[idx as usize] = e;
            t.dirty = true;
        }
    }

    /// Maps the run of guest bytes at `off` (at most `len`, stopping at a change of kind).
    pub fn map(&mut self, off: u64, len: u64) -> io::Result<(Mapping, u64)> {
        let cs = self.cluster_size;
        let first = self.map_cluster(off)?;
        let mut run = (cs - off % cs).min(len);
        while run < len {
            let next = self.map_cluster(off + run)?;
            let contiguous = match (first, next) {
                (Mapping::Data(a), Mapping::Data(b)) => b == a + run,
                (a, b) => a == b,
            };
            if !contiguous {
                break;
            }
            run = (run + cs).min(len);
        }
        Ok((first, run))
    }

    fn map_cluster(&mut self, off: u64) -> io::Result<Mapping> {
        let vcl = off >> self.cluster_bits;
        let in_off = off & (self.cluster_size - 1);
        let l1i = (vcl / self.l2_entries) as usize;
        let l2_off = self.l1.get(l1i).copied().unwrap_or(0) & OFFSET_MASK;
        let unalloc = if self.backing.is_some() {
            Mapping::Backing
        } else {
            Mapping::Zero
        };
        if l2_off == 0 {
            return Ok(unalloc);
        }
        let e = self.l2_entry(l2_off, vcl % self.l2_entries)?;
        if e & COMPRESSED != 0 {
            return Ok(Mapping::Compressed);
        }
        if e & ZERO != 0 && self.version >= 3 {
            return Ok(Mapping::Zero);
        }
        let host = e & OFFSET_MASK;
        if host == 0 {
            return Ok(unalloc);
        }
        Ok(Mapping::Data(host + in_off))
    }

    fn read_backing(&mut self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let Some(b) = self.backing.as_mut() else {
            buf.fill(0);
            return Ok(());
        };
        let bsize = b.size();
        let avail = bsize.saturating_sub(off).min(buf.len() as u64) as usize;
        if avail > 0 {
            b.read_at(&mut buf[..avail], off)?;
        }
        buf[avail..].fill(0);
        Ok(())
    }

    /// Returns the L2 table for guest L1 index `l1i`, allocating or un-sharing it for a write.
    fn l2_for_write(&mut self, l1i: usize) -> io::Result<u64> {
        let e = self.l1[l1i];
        let off = e & OFFSET_MASK;
        if off != 0 && self.refcount(off >> self.cluster_bits) == 1 {
            if e & COPIED == 0 {
                self.l1[l1i] = off | COPIED;
                self.l1_dirty = true;
            }
            return Ok(off);
        }
        let entries = if off == 0 {
            vec![0u64; self.l2_entries as usize]
        } else {
            self.load_l2(off)?;
            self.l2_cache[&off].entries.clone()
        };
        let new = self.alloc_cluster()?;
        self.l2_cache.insert(
            new,
            L2Table {
                entries,
                dirty: true,
                fresh: true,
            },
        );
        self.l1[l1i] = new | COPIED;
        self.l1_dirty = true;
        if off != 0 {
            self.pending_free.push(off);
        }
        Ok(new)
    }

    fn write_cluster_piece(&mut self, data: &[u8], off: u64) -> io::Result<()> {
        let cs = self.cluster_size;
        let vcl = off >> self.cluster_bits;
        let in_off = (off & (cs - 1)) as usize;
        let l1i = (vcl / self.l2_entries) as usize;
        let l2i = vcl % self.l2_entries;
        let l2_off = self.l2_for_write(l1i)?;
        let e = self.l2_entry(l2_off, l2i)?;
        if e & COMPRESSED != 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "writing over a compressed cluster is not supported; convert the image with `qemu-img convert -O qcow2` (without -c)",
            ));
        }
        let host = e & OFFSET_MASK;
        let zero = e & ZERO != 0 && self.version >= 3;
        let owned = host != 0 && self.refcount(host >> self.cluster_bits) == 1;
        if host != 0 && !zero && owned {
            self.file.write_all_at(data, host + in_off as u64)?;
            if e & COPIED == 0 {
                self.set_l2_entry(l2_off, l2i, host | COPIED);
            }
            self.data_dirty = true;
            return Ok(());
        }
        let mut buf = vec![0u8; cs as usize];
        if data.len() < cs as usize {
            let base = vcl << self.cluster_bits;
            if zero {
                // zeros already
            } else if host != 0 {
                self.file.read_exact_at(&mut buf, host)?;
            } else if self.backing.is_some() {
                self.read_backing(&mut buf, base)?;
            }
        }
        buf[in_off..in_off + data.len()].copy_from_slice(data);
        let target = if owned { host } else { self.alloc_cluster()? };
        self.file.write_all_at(&buf, target)?;
        self.set_l2_entry(l2_off, l2i, target | COPIED);
        if host != 0 && !owned {
            self.pending_free.push(host);
        }
        self.data_dirty = true;
        if self.pending_allocs >= MAX_PENDING_ALLOCS {
            self.flush_metadata()?;
        }
        Ok(())
    }

    /// Writes cached metadata back in crash-safe order (see the module documentation).
    fn flush_metadata(&mut self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        let meta = self.l1_dirty
            || self.rt_dirty
            || !self.pending_free.is_empty()
            || self.refblocks.values().any(|r| r.dirty)
            || self.l2_cache.values().any(|t| t.dirty);
        if !meta {
            if self.data_dirty {
                self.file.sync_data()?;
                self.data_dirty = false;
            }
            return Ok(());
        }
        // Phase 1: refcounts, unreferenced new L2 tables, data.
        self.write_refblocks()?;
        if self.rt_dirty {
            self.file.sync_data()?;
            self.write_refcount_table()?;
            self.rt_dirty = false;
        }
        let fresh: Vec<u64> = self
            .l2_cache
            .iter()
            .filter(|(_, t)| t.fresh)
            .map(|(o, _)| *o)
            .collect();
        for off in fresh {
            self.write_l2(off)?;
        }
        self.file.sync_data()?;
        // Phase 2: referenced metadata.
        let dirty: Vec<u64> = self
            .l2_cache
            .iter()
            .filter(|(_, t)| t.dirty)
            .map(|(o, _)| *o)
            .collect();
        for off in dirty {
            self.write_l2(off)?;
        }
        if self.l1_dirty {
            self.write_l1()?;
            self.l1_dirty = false;
        }
        self.file.sync_data()?;
        // Phase 3: clusters nothing durable references any more.
        let frees = std::mem::take(&mut self.pending_free);
        for off in frees {
            self.adjust_refcount(off, -1)?;
        }
        self.write_refblocks()?;
        self.pending_allocs = 0;
        self.data_dirty = false;
        Ok(())
    }

    fn write_l2(&mut self, off: u64) -> io::Result<()> {
        if let Some(t) = self.l2_cache.get_mut(&off) {
            let mut buf = vec![0u8; t.entries.len() * 8];
            for (i, e) in t.entries.iter().enumerate() {
                buf[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
            }
            self.file.write_all_at(&buf, off)?;
            t.dirty = false;
            t.fresh = false;
        }
        Ok(())
    }

    fn write_l1(&mut self) -> io::Result<()> {
        let buf = encode_table(&self.l1);
        self.file.write_all_at(&buf, self.l1_offset)
    }

    /// Writes an L1 table into newly allocated clusters; returns its offset.
    fn write_new_table(&mut self, entries: &[u64]) -> io::Result<u64> {
        let clusters = div_ceil(entries.len() as u64 * 8, self.cluster_size).max(1);
        let off = self.alloc_at_end(clusters)? * self.cluster_size;
        let mut buf = encode_table(entries);
        buf.resize((clusters * self.cluster_size) as usize, 0);
        self.file.write_all_at(&buf, off)?;
        Ok(off)
    }

    fn free_table(&mut self, off: u64, entries: u64) -> io::Result<()> {
        let clusters = div_ceil(entries * 8, self.cluster_size).max(1);
        for i in 0..clusters {
            self.adjust_refcount(off + i * self.cluster_size, -1)?;
        }
        Ok(())
    }

    // ---------------------------------------------------------------- resize

    /// Grows the virtual disk to `new_size` bytes (shrinking is refused).
    pub fn resize(&mut self, new_size: u64) -> io::Result<()> {
        self.check_writable()?;
        if !new_size.is_multiple_of(512) || new_size > MAX_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("new size {new_size} must be a multiple of 512 and at most 1 PiB"),
            ));
        }
        if new_size < self.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "shrinking from {} to {new_size} bytes would discard data; only growing is supported",
                    self.size
                ),
            ));
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

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "image is open read-only",
            ));
        }
        Ok(())
    }

    // ---------------------------------------------------------------- snapshots

    fn read_l1_at(&self, off: u64, n: u32) -> io::Result<Vec<u64>> {
        let raw = read_vec(&self.file, off, n as usize * 8)?;
        Ok((0..n as usize).map(|i| be64(&raw, i * 8)).collect())
    }

    /// Adds `delta` to the refcount of every L2 table and data cluster reachable from `l1`.
    fn adjust_tree(&mut self, l1: &[u64], delta: i64) -> io::Result<()> {
        for e in l1 {
            let l2_off = e & OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            self.load_l2(l2_off)?;
            let entries = self.l2_cache[&l2_off].entries.clone();
            for d in entries {
                if d & COMPRESSED != 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::Unsupported,
                        "snapshots of images with compressed clusters are not supported; convert with qemu-img convert -O qcow2",
                    ));
                }
                let host = d & OFFSET_MASK;
                if host != 0 {
                    self.adjust_refcount(host, delta)?;
                }
            }
            self.adjust_refcount(l2_off, delta)?;
        }
        Ok(())
    }

    /// Sets the COPIED flags of the active tables to "refcount is 1".
    fn fix_copied_flags(&mut self) -> io::Result<()> {
        for i in 0..self.l1.len() {
            let e = self.l1[i];
            let off = e & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            let own = self.refcount(off >> self.cluster_bits) == 1;
            let want = if own { off | COPIED } else { off };
            if want != e {
                self.l1[i] = want;
                self.l1_dirty = true;
            }
            self.load_l2(off)?;
            let entries = self.l2_cache[&off].entries.clone();
            for (j, d) in entries.iter().enumerate() {
                let host = d & OFFSET_MASK;
                if host == 0 || d & COMPRESSED != 0 {
                    continue;
                }
                let w = if self.refcount(host >> self.cluster_bits) == 1 {
                    d | COPIED
                } else {
                    d & !COPIED
                };
                if w != *d {
                    self.set_l2_entry(off, j as u64, w);
                }
            }
        }
        Ok(())
    }

    fn find_snapshot(&self, name: &str) -> Option<usize> {
        self.snapshots
            .iter()
            .position(|s| s.name == name)
            .or_else(|| self.snapshots.iter().position(|s| s.id == name))
    }

    fn write_snapshot_table(&mut self, list: Vec<SnapshotInfo>) -> io::Result<()> {
        let mut buf = Vec::new();
        for s in &list {
            let mut extra = s.extra.clone();
            if extra.len() < 16 {
                extra.resize(16, 0);
            }
            extra[0..8].copy_from_slice(&s.vm_state_size.to_be_bytes());
            extra[8..16].copy_from_slice(&s.disk_size.to_be_bytes());
            buf.extend_from_slice(&s.l1_offset.to_be_bytes());
            buf.extend_from_slice(&s.l1_size.to_be_bytes());
            buf.extend_from_slice(&(s.id.len() as u16).to_be_bytes());
            buf.extend_from_slice(&(s.name.len() as u16).to_be_bytes());
            buf.extend_from_slice(&s.date_sec.to_be_bytes());
            buf.extend_from_slice(&s.date_nsec.to_be_bytes());
            buf.extend_from_slice(&s.vm_clock_nsec.to_be_bytes());
            buf.extend_from_slice(&(s.vm_state_size.min(u32::MAX as u64) as u32).to_be_bytes());
            buf.extend_from_slice(&(extra.len() as u32).to_be_bytes());
            buf.extend_from_slice(&extra);
            buf.extend_from_slice(s.id.as_bytes());
            buf.extend_from_slice(s.name.as_bytes());
            buf.resize(buf.len().div_ceil(8) * 8, 0);
        }
        let new_off = if list.is_empty() {
            0
        } else {
            let clusters = div_ceil(buf.len() as u64, self.cluster_size);
            let off = self.alloc_at_end(clusters)? * self.cluster_size;
            buf.resize((clusters * self.cluster_size) as usize, 0);
            self.file.write_all_at(&buf, off)?;
            off
        };
        self.write_refblocks()?;
        if self.rt_dirty {
            self.file.sync_data()?;
            self.write_refcount_table()?;
            self.rt_dirty = false;
        }
        self.file.sync_data()?;
        let (old_off, old_len) = (self.snapshots_offset, self.snapshots_len);
        self.snapshots = list;
        self.snapshots_offset = new_off;
        self.snapshots_len = buf.len() as u64;
        self.write_header_fields()?;
        self.file.sync_data()?;
        if old_off != 0 && old_len > 0 {
            for i in 0..div_ceil(old_len, self.cluster_size) {
                self.adjust_refcount(old_off + i * self.cluster_size, -1)?;
            }
        }
        self.write_refblocks()
    }

    /// Creates an internal snapshot named `name` of the current disk contents.
    pub fn create_snapshot(&mut self, name: &str) -> io::Result<()> {
        self.check_writable()?;
        if name.is_empty() || name.len() > 1024 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "snapshot name must be 1 to 1024 bytes",
            ));
        }
        if self.find_snapshot(name).is_some() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("a snapshot named {name:?} already exists; pick another name or delete it first"),
            ));
        }
        if self.snapshots.len() >= 65536 {
            return Err(io::Error::other("too many snapshots (65536)"));
        }
        self.flush_metadata()?;
        let l1 = self.l1.clone();
        self.adjust_tree(&l1, 1)?;
        self.fix_copied_flags()?;
        let snap_l1: Vec<u64> = self.l1.iter().map(|e| e & !COPIED).collect();
        let l1_off = self.write_new_table(&snap_l1)?;
        self.flush_metadata()?;
        let next_id = self
            .snapshots
            .iter()
            .filter_map(|s| s.id.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut list = self.snapshots.clone();
        list.push(SnapshotInfo {
            id: next_id.to_string(),
            name: name.to_string(),
            date_sec: now.as_secs() as u32,
            date_nsec: now.subsec_nanos(),
            disk_size: self.size,
            vm_state_size: 0,
            l1_offset: l1_off,
            l1_size: snap_l1.len() as u32,
            vm_clock_nsec: 0,
            extra: Vec::new(),
        });
        self.write_snapshot_table(list)
    }

    /// Makes the disk contents those of snapshot `name` (by name or id); the snapshot stays.
    pub fn revert_snapshot(&mut self, name: &str) -> io::Result<()> {
        self.check_writable()?;
        let i = self.find_snapshot(name).ok_or_else(|| no_snapshot(name))?;
        let snap = self.snapshots[i].clone();
        self.flush_metadata()?;
        let snap_l1 = self.read_l1_at(snap.l1_offset, snap.l1_size)?;
        let needed = div_ceil(snap.disk_size, self.cluster_size * self.l2_entries) as usize;
        let mut new_l1: Vec<u64> = snap_l1.iter().map(|e| e & !COPIED).collect();
        if new_l1.len() < needed {
            new_l1.resize(needed, 0);
        }
        self.adjust_tree(&snap_l1, 1)?;
        let new_off = self.write_new_table(&new_l1)?;
        self.write_refblocks()?;
        if self.rt_dirty {
            self.file.sync_data()?;
            self.write_refcount_table()?;
            self.rt_dirty = false;
        }
        self.file.sync_data()?;
        let old_l1 = std::mem::replace(&mut self.l1, new_l1);
        let old_off = std::mem::replace(&mut self.l1_offset, new_off);
        self.size = snap.disk_size;
        self.write_header_fields()?;
        self.file.sync_data()?;
        self.adjust_tree(&old_l1, -1)?;
        self.free_table(old_off, old_l1.len() as u64)?;
        self.fix_copied_flags()?;
        self.flush_metadata()
    }

    /// Deletes snapshot `name` (by name or id), freeing clusters only it used.
    pub fn delete_snapshot(&mut self, name: &str) -> io::Result<()> {
        self.check_writable()?;
        let i = self.find_snapshot(name).ok_or_else(|| no_snapshot(name))?;
        self.flush_metadata()?;
        let mut list = self.snapshots.clone();
        let snap = list.remove(i);
        self.write_snapshot_table(list)?;
        let snap_l1 = self.read_l1_at(snap.l1_offset, snap.l1_size)?;
        self.adjust_tree(&snap_l1, -1)?;
        self.free_table(snap.l1_offset, snap.l1_size as u64)?;
        self.fix_copied_flags()?;
        self.flush_metadata()
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
                Mapping::Compressed => {
                    return Err(io::Error::new(
                        io::ErrorKind::Unsupported,
                        format!(
                            "guest offset {off} is in a compressed cluster, which ftvm does not read; convert with `qemu-img convert -O qcow2` (without -c)"
                        ),
                    ))
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
