//! Internal snapshots: the snapshot table, create, revert, delete.

use super::*;

impl Qcow2 {
    pub(super) fn read_snapshot_table(
        &mut self,
        n: u32,
        off: u64,
        file_len: u64,
    ) -> io::Result<()> {
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

    pub(super) fn read_l1_at(&self, off: u64, n: u32) -> io::Result<Vec<u64>> {
        let raw = read_vec(&self.file, off, n as usize * 8)?;
        Ok((0..n as usize).map(|i| be64(&raw, i * 8)).collect())
    }

    /// Adds `delta` to the refcount of every L2 table, data cluster and cluster holding
    /// compressed data reachable from `l1`. All or nothing: every entry is checked and every new
    /// refcount computed before the first one changes.
    pub(super) fn adjust_tree(&mut self, l1: &[u64], delta: i64) -> io::Result<()> {
        let mut counts: std::collections::BTreeMap<u64, i64> = Default::default();
        let cb = self.cluster_bits;
        for e in l1 {
            let l2_off = e & OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            self.load_l2(l2_off)?;
            let entries = self.l2_cache[&l2_off].entries.clone();
            for d in entries {
                if d & COMPRESSED != 0 {
                    for c in self.compressed_clusters(d)? {
                        *counts.entry(c >> cb).or_default() += delta;
                    }
                    continue;
                }
                if d & L2_RESERVED != 0 {
                    return Err(corrupt(format!(
                        "corrupt L2 entry {d:#x} in table at {l2_off:#x}: run qemu-img check"
                    )));
                }
                let host = d & OFFSET_MASK;
                if host != 0 {
                    *counts.entry(host >> cb).or_default() += delta;
                }
            }
            *counts.entry(l2_off >> cb).or_default() += delta;
        }
        for (&c, &d) in &counts {
            let rc = self.refcount(c);
            let fits = if d < 0 {
                rc >= d.unsigned_abs()
            } else {
                rc.checked_add(d as u64)
                    .is_some_and(|v| v <= self.max_refcount())
            };
            if c == 0 || !self.has_block(c / self.rb_entries) || !fits {
                return Err(corrupt(format!(
                    "cluster at {:#x} has refcount {rc}, which cannot change by {d}: the image is corrupt; run qemu-img check -r all (nothing was changed)",
                    c << cb
                )));
            }
        }
        for (c, d) in counts {
            self.adjust_refcount(c << cb, d)?;
        }
        Ok(())
    }

    /// Sets the COPIED flags of the active tables to "refcount is 1".
    pub(super) fn fix_copied_flags(&mut self) -> io::Result<()> {
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

    pub(super) fn find_snapshot(&self, name: &str) -> Option<usize> {
        self.snapshots
            .iter()
            .position(|s| s.name == name)
            .or_else(|| self.snapshots.iter().position(|s| s.id == name))
    }

    pub(super) fn write_snapshot_table(&mut self, list: Vec<SnapshotInfo>) -> io::Result<()> {
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
