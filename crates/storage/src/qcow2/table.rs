//! L1 and L2 tables: mapping guest offsets, the write path, and writing metadata back in
//! crash-safe order.

use super::*;

impl Qcow2 {
    pub(super) fn load_l2(&mut self, off: u64) -> io::Result<()> {
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

    pub(super) fn l2_entry(&mut self, l2_off: u64, idx: u64) -> io::Result<u64> {
        self.load_l2(l2_off)?;
        let e = self.l2_cache[&l2_off].entries[idx as usize];
        if e & COMPRESSED == 0 && e & L2_RESERVED != 0 {
            return Err(corrupt(format!(
                "corrupt L2 entry {e:#x} in table at {l2_off:#x}: run qemu-img check"
            )));
        }
        Ok(e)
    }

    pub(super) fn set_l2_entry(&mut self, l2_off: u64, idx: u64, e: u64) {
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
        if let Mapping::Compressed(_) = first {
            return Ok((first, run));
        }
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

    pub(super) fn map_cluster(&mut self, off: u64) -> io::Result<Mapping> {
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
            return Ok(Mapping::Compressed(e));
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

    pub(super) fn read_backing(&mut self, buf: &mut [u8], off: u64) -> io::Result<()> {
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
    pub(super) fn l2_for_write(&mut self, l1i: usize) -> io::Result<u64> {
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

    pub(super) fn write_cluster_piece(&mut self, data: &[u8], off: u64) -> io::Result<()> {
        let cs = self.cluster_size;
        let vcl = off >> self.cluster_bits;
        let in_off = (off & (cs - 1)) as usize;
        let l1i = (vcl / self.l2_entries) as usize;
        let l2i = vcl % self.l2_entries;
        let l2_off = self.l2_for_write(l1i)?;
        let e = self.l2_entry(l2_off, l2i)?;
        if e & COMPRESSED != 0 {
            // Copy-on-write of the decompressed cluster; the compressed data loses its
            // references once the new mapping is durable.
            let mut buf = vec![0u8; cs as usize];
            self.read_compressed(e, &mut buf)?;
            let old = self.compressed_clusters(e)?;
            buf[in_off..in_off + data.len()].copy_from_slice(data);
            let target = self.alloc_cluster()?;
            self.file.write_all_at(&buf, target)?;
            self.set_l2_entry(l2_off, l2i, target | COPIED);
            self.pending_free.extend(old);
            self.data_dirty = true;
            return Ok(());
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
    pub(super) fn flush_metadata(&mut self) -> io::Result<()> {
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

    pub(super) fn write_l2(&mut self, off: u64) -> io::Result<()> {
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

    pub(super) fn write_l1(&mut self) -> io::Result<()> {
        if self.l1.is_empty() {
            return Ok(());
        }
        let buf = encode_table(&self.l1);
        self.file.write_all_at(&buf, self.l1_offset)
    }

    /// Writes an L1 table into newly allocated clusters; returns its offset.
    /// An empty table takes no space: its offset is 0 (as QEMU stores it for a 0-byte disk).
    pub(super) fn write_new_table(&mut self, entries: &[u64]) -> io::Result<u64> {
        if entries.is_empty() {
            return Ok(0);
        }
        let clusters = div_ceil(entries.len() as u64 * 8, self.cluster_size);
        let off = self.alloc_at_end(clusters)? * self.cluster_size;
        let mut buf = encode_table(entries);
        buf.resize((clusters * self.cluster_size) as usize, 0);
        self.file.write_all_at(&buf, off)?;
        Ok(off)
    }

    /// Frees the clusters of a table of `entries` entries at `off`; an empty table (offset 0 or
    /// no entries) has none, and cluster 0, the header, is never freed.
    pub(super) fn free_table(&mut self, off: u64, entries: u64) -> io::Result<()> {
        if entries == 0 || off == 0 {
            return Ok(());
        }
        let clusters = div_ceil(entries * 8, self.cluster_size);
        for i in 0..clusters {
            self.adjust_refcount(off + i * self.cluster_size, -1)?;
        }
        Ok(())
    }

    /// Makes `len` bytes at `offset` read as zeros: whole clusters lose their data (which is
    /// freed once the new mapping is durable, refcounts kept exact), partial ones get zeros
    /// written.
    pub(super) fn zero_range(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        check_range(
            offset,
            usize::try_from(len).unwrap_or(usize::MAX),
            self.size,
        )?;
        let cs = self.cluster_size;
        let end = offset + len;
        let mut off = offset;
        while off < end {
            let start = off & !(cs - 1);
            let piece_end = end.min(start + cs);
            // The last cluster of a disk whose size is not a cluster multiple counts as whole.
            let whole = off == start && (piece_end == start + cs || piece_end == self.size);
            if whole {
                self.zero_cluster(start)?;
            } else {
                let zeros = vec![0u8; (piece_end - off) as usize];
                self.write_cluster_piece(&zeros, off)?;
            }
            off = piece_end;
        }
        if self.pending_allocs >= MAX_PENDING_ALLOCS
            || self.pending_free.len() >= MAX_PENDING_ALLOCS
        {
            self.flush_metadata()?;
        }
        Ok(())
    }

    /// Drops the data of the guest cluster at `off` (it reads as zeros afterwards).
    fn zero_cluster(&mut self, off: u64) -> io::Result<()> {
        let vcl = off >> self.cluster_bits;
        let l1i = (vcl / self.l2_entries) as usize;
        let l2i = vcl % self.l2_entries;
        let has_l2 = self.l1.get(l1i).is_some_and(|e| e & OFFSET_MASK != 0);
        if !has_l2 && self.backing.is_none() {
            return Ok(()); // unallocated without a backing file: zeros already
        }
        if self.version < 3 && self.backing.is_some() {
            // Version 2 has no zero flag: only real zeros hide the backing file.
            let zeros = vec![0u8; self.cluster_size as usize];
            return self.write_cluster_piece(&zeros, off);
        }
        let want = if self.backing.is_some() { ZERO } else { 0 };
        if has_l2 {
            let cur = self.l2_entry(self.l1[l1i] & OFFSET_MASK, l2i)?;
            if cur & !COPIED == want {
                return Ok(());
            }
        }
        let l2_off = self.l2_for_write(l1i)?;
        let e = self.l2_entry(l2_off, l2i)?;
        if e & COMPRESSED != 0 {
            let old = self.compressed_clusters(e)?;
            self.pending_free.extend(old);
        } else if e & OFFSET_MASK != 0 {
            self.pending_free.push(e & OFFSET_MASK);
        }
        self.set_l2_entry(l2_off, l2i, want);
        Ok(())
    }
}
