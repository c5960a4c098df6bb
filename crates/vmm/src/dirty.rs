//! A set of dirty guest pages, as collected from KVM's dirty log and the monitor's write bitmap.

use crate::layout::PAGE_SIZE;

/// Dirty pages per RAM region: (guest base, region length, one bit per 4 KiB page).
#[derive(Debug, Clone, Default)]
pub struct DirtyPages {
    regions: Vec<(u64, u64, Vec<u64>)>,
}

impl DirtyPages {
    /// Wraps per-region bitmaps.
    pub fn new(regions: Vec<(u64, u64, Vec<u64>)>) -> Self {
        Self { regions }
    }

    /// Adds every page of `other` (same region layout) to this set.
    pub fn merge(&mut self, other: &DirtyPages) {
        for ((_, _, bits), (_, _, more)) in self.regions.iter_mut().zip(&other.regions) {
            for (b, m) in bits.iter_mut().zip(more) {
                *b |= m;
            }
        }
    }

    /// Number of dirty pages.
    pub fn count(&self) -> usize {
        self.regions
            .iter()
            .flat_map(|(_, _, b)| b.iter())
            .map(|w| w.count_ones() as usize)
            .sum()
    }

    /// Whether `addr`'s page is dirty.
    pub fn contains(&self, addr: u64) -> bool {
        self.regions.iter().any(|(base, len, bits)| {
            addr >= *base && addr - base < *len && {
                let page = ((addr - base) / PAGE_SIZE) as usize;
                bits.get(page / 64)
                    .is_some_and(|w| w & (1 << (page % 64)) != 0)
            }
        })
    }

    /// Guest-physical addresses of the dirty pages, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.regions.iter().flat_map(|(base, _, bits)| {
            bits.iter().enumerate().flat_map(move |(i, &w)| {
                let mut word = w;
                std::iter::from_fn(move || {
                    if word == 0 {
                        return None;
                    }
                    let bit = word.trailing_zeros() as u64;
                    word &= word - 1;
                    Some(base + (i as u64 * 64 + bit) * PAGE_SIZE)
                })
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iterates_set_bits() {
        let d = DirtyPages::new(vec![
            (0, 1 << 20, vec![0b101, 1 << 63]),
            (1 << 32, 4096, vec![1]),
        ]);
        let pages: Vec<u64> = d.iter().collect();
        assert_eq!(pages, vec![0, 2 * 4096, 127 * 4096, 1 << 32]);
        assert_eq!(d.count(), 4);
        assert!(d.contains(2 * 4096 + 17));
        assert!(!d.contains(4096));
    }
}
