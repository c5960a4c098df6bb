//! Creating a qcow2 image, and opening one: header, extensions, backing file, tables.

use super::*;

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

    /// Opens the qcow2 image at `path`; its backing file (if any) is opened read-only.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, OpenError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| OpenError::Open {
                path: path.display().to_string(),
                source,
            })?;
        Self::from_file(file, path, read_only, true).map_err(|e| open_error(path, e))
    }

    /// Opens the image at `path` read-only without opening its backing file (unallocated
    /// clusters read as zeros): for inspecting an image whose backing file is elsewhere.
    pub fn open_unbacked(path: &Path) -> Result<Self, OpenError> {
        let file = File::open(path).map_err(|source| OpenError::Open {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_file(file, path, true, false).map_err(|e| open_error(path, e))
    }

    pub(super) fn from_file(
        file: File,
        path: &Path,
        read_only: bool,
        open_backing: bool,
    ) -> io::Result<Self> {
        let file_len = file.metadata()?.len();
        let mut h = [0u8; 112];
        let got = read_upto(&file, &mut h, 0)?;
        if got < 72 || h[0..4] != QCOW2_MAGIC {
            return Err(corrupt("not a qcow2 image (bad magic or truncated header)"));
        }
        let version = be32(&h, 4);
        if version != 2 && version != 3 {
            return Err(unsupported(format!(
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
            return Err(unsupported(
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
        // Byte 104, present in headers longer than 104 bytes: 0 zlib, 1 zstd.
        let compression_byte = if version >= 3 && header_len > V3_HEADER_LEN {
            h[104]
        } else {
            0
        };
        if (incompat & INCOMPAT_COMPRESSION != 0) != (compression_byte != 0) {
            return Err(corrupt(format!(
                "corrupt header: compression type {compression_byte} disagrees with the compression feature bit"
            )));
        }
        let compression = Compression::from_header(compression_byte)?;
        if incompat & INCOMPAT_DATA_FILE != 0 {
            return Err(unsupported(
                "images with an external data file are not supported; merge it with `qemu-img convert -O qcow2`",
            ));
        }
        if incompat & INCOMPAT_EXTL2 != 0 {
            return Err(unsupported(
                "images with extended L2 entries (subclusters) are not supported; convert with qemu-img convert -O qcow2",
            ));
        }
        if incompat & !known != 0 {
            return Err(unsupported(format!(
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
            return Err(unsupported(format!(
                "refcount width 2^{refcount_order} bits is not supported (8 to 64 bits are); convert with `qemu-img convert -O qcow2 -o refcount_bits=16`"
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
                        return Err(unsupported(
                            "images with an external data file are not supported; merge it with `qemu-img convert -O qcow2`",
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
            Some(_) if !open_backing => None,
            Some(name) => {
                let p = Path::new(name);
                let full = if p.is_absolute() {
                    p.to_path_buf()
                } else {
                    path.parent().unwrap_or(Path::new(".")).join(p)
                };
                let cannot = |e: OpenError| {
                    io::Error::other(format!(
                        "its backing file {name:?} (looked for at {}) cannot be opened: {e}; put it there or rebase the image with `qemu-img rebase`",
                        full.display()
                    ))
                };
                let b: Box<dyn BlockBackend> = match backing_format.as_deref() {
                    Some("raw") => Box::new(crate::RawFile::open(&full, true).map_err(cannot)?),
                    _ => crate::open_backend(&full, true).map_err(cannot)?,
                };
                Some(b)
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
            compression,
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
}

/// An unsupported feature, or an unusable (corrupt, truncated) image.
fn open_error(path: &Path, e: io::Error) -> OpenError {
    let (path, reason) = (path.display().to_string(), e.to_string());
    if e.kind() == io::ErrorKind::Unsupported {
        OpenError::Unsupported { path, reason }
    } else {
        OpenError::Format { path, reason }
    }
}
