//! Refcounts: reading and changing them, allocating clusters, growing the refcount table.

use super::*;

impl Qcow2 {
    pub(super) fn refcount(&self, cluster: u64) -> u64 {
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

    pub(super) fn max_refcount(&self) -> u64 {
        if self.refcount_order >= 6 {
            u64::MAX
        } else {
            (1u64 << (1u64 << self.refcount_order)) - 1
        }
    }

    /// Sets a refcount; the cluster's refcount block must exist.
    pub(super) fn set_refcount(&mut self, cluster: u64, value: u64) -> io::Result<()> {
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

    pub(super) fn adjust_refcount(&mut self, host_off: u64, delta: i64) -> io::Result<()> {
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

    pub(super) fn has_block(&self, b: u64) -> bool {
        self.refblocks.contains_key(&b)
    }

    /// Allocates `n` contiguous clusters past everything in use; returns the first index.
    pub(super) fn alloc_at_end(&mut self, n: u64) -> io::Result<u64> {
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
    pub(super) fn alloc_cluster(&mut self) -> io::Result<u64> {
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

    pub(super) fn grow_refcount_table(&mut self, min_entries: u64) -> io::Result<()> {
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

    pub(super) fn write_refblocks(&mut self) -> io::Result<()> {
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

    pub(super) fn write_refcount_table(&mut self) -> io::Result<()> {
        let mut buf = vec![0u8; (self.rt_clusters as u64 * self.cluster_size) as usize];
        for (i, e) in self.rt.iter().enumerate() {
            buf[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
        }
        self.file.write_all_at(&buf, self.rt_offset)
    }

    /// Writes header bytes 24..72 (size, L1, refcount table, snapshots) in one sector write.
    pub(super) fn write_header_fields(&mut self) -> io::Result<()> {
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
}
