//! The swap map: a count per swap slot, a checksum per slot, and the
//! cluster allocator that hands slots out.
//!
//! Analogue of `si->swap_map` and the cluster allocator of `mm/swapfile.c`
//! (`cluster_alloc_swap_entry()`): the file is cut into clusters of 512
//! slots (2 MiB). A cluster serves one allocation order at a time, so a
//! large folio gets naturally aligned contiguous slots and goes out as one
//! write; per-order cursors hand out consecutive slots, so consecutive
//! order-0 swap-outs also land next to each other and can be written as one
//! I/O. Clusters that become free go back to a free list; partly used ones
//! wait on a per-order "nonfull" list. While at least an eighth of the
//! clusters are free, a cursor that meets a used slot moves to a free
//! cluster instead of filling the holes of a sparse one (random swapins
//! leave clusters sparse, and filling them cut every write to a page or
//! two); below that, holes are filled as before.
//!
//! # Context
//! Everything here runs under the swap lock (`SwapDevice::state`).

use crate::types::{Order, SwapSlot};
use std::collections::VecDeque;

/// Slots per cluster: one PMD's worth, so an order-9 folio fills one.
pub const SLOTS_PER_CLUSTER: u64 = 512;

/// The packed count of one slot.
///
/// | bits | meaning                                                        |
/// |------|----------------------------------------------------------------|
/// | 7    | `HAS_CACHE`: a folio in the swap cache owns the slot's data    |
/// | 6..0 | count: page-table entries (`Swap` or `SwapinMarker`) naming it |
///
/// A slot is free iff the byte is 0. Guest memory is private to one VM and
/// never forked, so the count is 0 or 1; it is still a count, as in Linux.
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct SwapCount(u8);

const HAS_CACHE: u8 = 0x80;
const COUNT_MASK: u8 = 0x7f;

/// A decoded `SwapCount`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// Not allocated.
    Free,
    /// Allocated.
    Used {
        /// Entries naming the slot.
        count: u8,
        /// Owned by a swap-cache folio (writeback or swapin in flight).
        cached: bool,
    },
}

impl SwapCount {
    fn state(self) -> SlotState {
        match self.0 {
            0 => SlotState::Free,
            b => SlotState::Used {
                count: b & COUNT_MASK,
                cached: b & HAS_CACHE != 0,
            },
        }
    }
}

/// Errors from swap map updates: each one is a bookkeeping bug, reported
/// rather than allowed to corrupt the map.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SwapMapError {
    /// The slot is beyond the end of the file.
    #[error("swap slot {0} out of range")]
    OutOfRange(u32),
    /// The slot's count or cache bit is not what the operation needs.
    #[error("swap slot {slot} is {state:?}, cannot {op}")]
    BadState {
        /// The slot.
        slot: u32,
        /// Its state.
        state: SlotState,
        /// What was attempted.
        op: &'static str,
    },
}

/// A cluster of 512 slots.
#[derive(Debug, Clone, Copy, Default)]
struct Cluster {
    /// Allocated slots.
    used: u16,
    /// Order it serves; `None` while free.
    order: Option<Order>,
    /// Queued on `nonfull[order]` (possibly stale; checked when popped).
    queued: bool,
}

/// Swap counts, checksums and the cluster allocator.
#[derive(Debug)]
pub struct SwapMap {
    map: Vec<SwapCount>,
    crc: Vec<u32>,
    clusters: Vec<Cluster>,
    free_clusters: Vec<u32>,
    nonfull: [VecDeque<u32>; Order::COUNT],
    /// Per-order cursor: the next slot to try.
    next: [Option<u64>; Order::COUNT],
    nr_used: u64,
}

impl SwapMap {
    /// A map of `nr_slots` free slots (whole clusters only).
    pub fn new(nr_slots: u64) -> SwapMap {
        let nr_clusters = nr_slots / SLOTS_PER_CLUSTER;
        let nr = (nr_clusters * SLOTS_PER_CLUSTER) as usize;
        SwapMap {
            map: vec![SwapCount::default(); nr],
            crc: vec![0; nr],
            clusters: vec![Cluster::default(); nr_clusters as usize],
            free_clusters: (0..nr_clusters as u32).rev().collect(),
            nonfull: Default::default(),
            next: [None; Order::COUNT],
            nr_used: 0,
        }
    }

    /// Slots in the map.
    pub fn nr_slots(&self) -> u64 {
        self.map.len() as u64
    }

    /// Allocated slots.
    pub fn nr_used(&self) -> u64 {
        self.nr_used
    }

    /// Free slots.
    pub fn nr_free(&self) -> u64 {
        self.nr_slots() - self.nr_used
    }

    /// Bytes of metadata (counts, checksums, cluster records).
    pub fn metadata_bytes(&self) -> u64 {
        (self.map.len() * (1 + 4) + self.clusters.len() * std::mem::size_of::<Cluster>()) as u64
    }

    /// The state of `slot`.
    pub fn state(&self, slot: SwapSlot) -> SlotState {
        self.map
            .get(slot.index())
            .map_or(SlotState::Free, |c| c.state())
    }

    /// Allocate `2^order` naturally aligned contiguous slots, each with
    /// count 1 and `HAS_CACHE` (the caller puts the folio in the swap cache
    /// and points the entries at them). `None` when no such run is free.
    ///
    /// Analogue of `folio_alloc_swap()`.
    pub fn alloc(&mut self, order: Order) -> Option<SwapSlot> {
        let o = order.index();
        if let Some(pos) = self.next[o].take() {
            let c = (pos / SLOTS_PER_CLUSTER) as u32;
            if self.clusters[c as usize].order == Some(order) {
                let from = pos % SLOTS_PER_CLUSTER;
                let found = match self.plenty_free() {
                    // Only the run right after the last one: it extends
                    // that write. Otherwise a fresh cluster (below) keeps
                    // the next swap-outs adjacent, where the holes of a
                    // sparse cluster would cut them into one write each.
                    true => self.scan(c, from, order).filter(|&s| s == pos),
                    false => self.scan(c, from, order).or_else(|| self.scan(c, 0, order)),
                };
                if let Some(s) = found {
                    return Some(self.take(s, order));
                }
            }
        }
        if self.plenty_free() {
            if let Some(s) = self.alloc_free_cluster(order) {
                return Some(s);
            }
        }
        while let Some(c) = self.nonfull[o].pop_front() {
            let cl = &mut self.clusters[c as usize];
            cl.queued = false;
            if cl.order == Some(order) {
                if let Some(s) = self.scan(c, 0, order) {
                    return Some(self.take(s, order));
                }
            }
        }
        if let Some(s) = self.alloc_free_cluster(order) {
            return Some(s);
        }
        // No free cluster: use holes in clusters of other orders.
        self.alloc_fragmented(order)
    }

    /// Whether at least an eighth of the clusters are free: then a new
    /// run of swap-outs starts a free cluster rather than filling holes.
    /// Below that, holes are filled so that free clusters stay for large
    /// folios.
    fn plenty_free(&self) -> bool {
        self.free_clusters.len() * 8 >= self.clusters.len()
    }

    /// The first run of a free cluster, which then serves `order`.
    fn alloc_free_cluster(&mut self, order: Order) -> Option<SwapSlot> {
        let c = self.free_clusters.pop()?;
        self.clusters[c as usize].order = Some(order);
        let s = self.scan(c, 0, order).expect("a free cluster has room");
        Some(self.take(s, order))
    }

    /// Last resort: any hole of the right alignment in any used cluster
    /// (clusters of other orders, or ones no list remembers).
    fn alloc_fragmented(&mut self, order: Order) -> Option<SwapSlot> {
        let room = SLOTS_PER_CLUSTER - order.nr_pages();
        let found = (0..self.clusters.len() as u32)
            .filter(|&c| {
                let cl = &self.clusters[c as usize];
                cl.order.is_some() && cl.used as u64 <= room
            })
            .find_map(|c| self.scan(c, 0, order))?;
        Some(self.take(found, order))
    }

    /// The first free aligned run of `order` in cluster `c` at or after
    /// cluster-relative slot `from`.
    fn scan(&self, c: u32, from: u64, order: Order) -> Option<u64> {
        let n = order.nr_pages();
        let base = c as u64 * SLOTS_PER_CLUSTER;
        let mut off = from.next_multiple_of(n);
        while off + n <= SLOTS_PER_CLUSTER {
            let s = base + off;
            let run = &self.map[s as usize..(s + n) as usize];
            match run.iter().rposition(|c| c.0 != 0) {
                None => return Some(s),
                // Skip past the last used slot of this run, aligned.
                Some(i) => off = (off + i as u64 + 1).next_multiple_of(n),
            }
        }
        None
    }

    fn take(&mut self, s: u64, order: Order) -> SwapSlot {
        let n = order.nr_pages();
        for c in &mut self.map[s as usize..(s + n) as usize] {
            debug_assert_eq!(c.0, 0);
            c.0 = HAS_CACHE | 1;
        }
        let c = (s / SLOTS_PER_CLUSTER) as usize;
        self.clusters[c].used += n as u16;
        self.nr_used += n;
        let next = s + n;
        self.next[order.index()] = (!next.is_multiple_of(SLOTS_PER_CLUSTER)).then_some(next);
        SwapSlot(s as u32)
    }

    fn entry(&mut self, slot: SwapSlot) -> Result<&mut SwapCount, SwapMapError> {
        self.map
            .get_mut(slot.index())
            .ok_or(SwapMapError::OutOfRange(slot.0))
    }

    fn bad(&self, slot: SwapSlot, op: &'static str) -> SwapMapError {
        SwapMapError::BadState {
            slot: slot.0,
            state: self.state(slot),
            op,
        }
    }

    /// Drop one entry's reference (`swap_free()`). Returns whether the slot
    /// became free.
    ///
    /// # Errors
    /// [`SwapMapError`] if the slot has no count.
    pub fn put(&mut self, slot: SwapSlot) -> Result<bool, SwapMapError> {
        let e = self.entry(slot)?;
        if e.0 & COUNT_MASK == 0 {
            return Err(self.bad(slot, "put"));
        }
        e.0 -= 1;
        Ok(self.release_if_free(slot))
    }

    /// Mark the slot owned by a swap-cache folio (`swapcache_prepare()`).
    ///
    /// # Errors
    /// [`SwapMapError`] if the slot is free or already cached: the caller
    /// lost a race and must look the folio up in the swap cache instead.
    pub fn set_cache(&mut self, slot: SwapSlot) -> Result<(), SwapMapError> {
        let e = *self.entry(slot)?;
        if e.0 == 0 || e.0 & HAS_CACHE != 0 {
            return Err(self.bad(slot, "set cache"));
        }
        self.entry(slot)?.0 |= HAS_CACHE;
        Ok(())
    }

    /// Clear `HAS_CACHE` (`swapcache_clear()`). Returns whether the slot
    /// became free.
    ///
    /// # Errors
    /// [`SwapMapError`] if the slot is not cached.
    pub fn clear_cache(&mut self, slot: SwapSlot) -> Result<bool, SwapMapError> {
        let e = self.entry(slot)?;
        if e.0 & HAS_CACHE == 0 {
            return Err(self.bad(slot, "clear cache"));
        }
        e.0 &= !HAS_CACHE;
        Ok(self.release_if_free(slot))
    }

    fn release_if_free(&mut self, slot: SwapSlot) -> bool {
        if self.map[slot.index()].0 != 0 {
            return false;
        }
        self.crc[slot.index()] = 0;
        self.nr_used -= 1;
        let c = slot.0 as u64 / SLOTS_PER_CLUSTER;
        let cl = &mut self.clusters[c as usize];
        cl.used -= 1;
        let Some(order) = cl.order else {
            debug_assert!(false, "slot {slot:?} freed in a free cluster");
            return true;
        };
        if cl.used == 0 {
            cl.order = None;
            self.free_clusters.push(c as u32);
        } else if !cl.queued {
            cl.queued = true;
            self.nonfull[order.index()].push_back(c as u32);
        }
        true
    }

    /// Record the checksum of `slot`'s data after a successful write.
    pub fn set_crc(&mut self, slot: SwapSlot, crc: u32) {
        if let Some(c) = self.crc.get_mut(slot.index()) {
            *c = crc;
        }
    }

    /// The checksum recorded for `slot`.
    pub fn crc(&self, slot: SwapSlot) -> u32 {
        self.crc.get(slot.index()).copied().unwrap_or(0)
    }

    /// Check the cluster accounting against the map (tests, debugging).
    ///
    /// # Errors
    /// A description of the first inconsistency.
    pub fn check(&self) -> Result<(), String> {
        let mut total = 0;
        for (c, cl) in self.clusters.iter().enumerate() {
            let s = c * SLOTS_PER_CLUSTER as usize;
            let used = self.map[s..s + SLOTS_PER_CLUSTER as usize]
                .iter()
                .filter(|e| e.0 != 0)
                .count();
            if used != cl.used as usize || (used == 0) != cl.order.is_none() {
                return Err(format!("cluster {c}: {used} used, record {cl:?}"));
            }
            total += used as u64;
        }
        if total != self.nr_used {
            return Err(format!("{total} slots used, counter {}", self.nr_used));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn large_runs_are_aligned_and_consecutive_small_ones_adjacent() {
        let mut m = SwapMap::new(4 * SLOTS_PER_CLUSTER);
        let a = m.alloc(Order(0)).unwrap();
        let b = m.alloc(Order(0)).unwrap();
        assert_eq!(b, a.forward(1), "order-0 slots are handed out in a row");
        let h = m.alloc(Order::PMD).unwrap();
        assert_eq!(h.0 as u64 % SLOTS_PER_CLUSTER, 0);
        let q = m.alloc(Order(2)).unwrap();
        assert_eq!(q.0 % 4, 0);
        assert_eq!(
            m.state(h),
            SlotState::Used {
                count: 1,
                cached: true
            }
        );
        m.check().unwrap();
    }

    #[test]
    fn swap_outs_after_a_sparse_cluster_stay_adjacent_while_clusters_are_free() {
        let mut m = SwapMap::new(16 * SLOTS_PER_CLUSTER);
        let first: Vec<SwapSlot> = (0..SLOTS_PER_CLUSTER)
            .map(|_| m.alloc(Order(0)).unwrap())
            .collect();
        // Swapins free every other slot of the first cluster.
        for s in first.iter().step_by(2) {
            m.clear_cache(*s).unwrap();
            m.put(*s).unwrap();
        }
        // The next swap-outs go to a fresh cluster in a row (one write),
        // not into the holes one slot apart.
        let a = m.alloc(Order(0)).unwrap();
        let run: Vec<SwapSlot> = (0..8).map(|_| m.alloc(Order(0)).unwrap()).collect();
        assert!(
            a.0 as u64 >= SLOTS_PER_CLUSTER,
            "{a:?} is in a fresh cluster"
        );
        for (k, s) in run.iter().enumerate() {
            assert_eq!(*s, a.forward(k as u64 + 1));
        }
        m.check().unwrap();
    }

    #[test]
    fn holes_are_filled_once_free_clusters_are_scarce() {
        let mut m = SwapMap::new(4 * SLOTS_PER_CLUSTER);
        for _ in 0..4 * SLOTS_PER_CLUSTER {
            m.alloc(Order(0)).unwrap();
        }
        m.clear_cache(SwapSlot(5)).unwrap();
        m.put(SwapSlot(5)).unwrap();
        assert_eq!(m.alloc(Order(0)), Some(SwapSlot(5)));
        m.check().unwrap();
    }

    #[test]
    fn slot_is_free_only_without_count_and_cache() {
        let mut m = SwapMap::new(SLOTS_PER_CLUSTER);
        let s = m.alloc(Order(0)).unwrap();
        assert!(!m.clear_cache(s).unwrap());
        assert_eq!(
            m.state(s),
            SlotState::Used {
                count: 1,
                cached: false
            }
        );
        m.set_cache(s).unwrap();
        assert!(m.set_cache(s).is_err(), "second swapcache_prepare loses");
        assert!(!m.put(s).unwrap());
        assert!(m.put(s).is_err());
        assert!(m.clear_cache(s).unwrap());
        assert_eq!(m.state(s), SlotState::Free);
        assert!(m.set_cache(s).is_err(), "a free slot cannot be cached");
        assert_eq!(m.nr_used(), 0);
        m.check().unwrap();
    }

    #[test]
    fn exhaustion_and_fragmented_fallback() {
        let mut m = SwapMap::new(2 * SLOTS_PER_CLUSTER);
        let a = m.alloc(Order::PMD).unwrap();
        let b = m.alloc(Order::PMD).unwrap();
        assert_eq!(m.alloc(Order(0)), None);
        // Free one page of a huge run: order 0 fits there, order 9 does not.
        m.clear_cache(a.forward(7)).unwrap();
        m.put(a.forward(7)).unwrap();
        assert_eq!(m.alloc(Order::PMD), None);
        assert_eq!(m.alloc(Order(0)), Some(a.forward(7)));
        let _ = b;
        m.check().unwrap();
    }

    proptest! {
        #[test]
        fn allocations_never_overlap_and_account(
            ops in prop::collection::vec((0u8..=9, any::<bool>(), any::<u16>()), 1..400)
        ) {
            let mut m = SwapMap::new(8 * SLOTS_PER_CLUSTER);
            let mut owned = vec![false; m.nr_slots() as usize];
            let mut runs: Vec<(SwapSlot, u64)> = Vec::new();
            for (order, free, pick) in ops {
                if free && !runs.is_empty() {
                    let (s, n) = runs.swap_remove(pick as usize % runs.len());
                    for k in 0..n {
                        m.clear_cache(s.forward(k)).unwrap();
                        prop_assert!(m.put(s.forward(k)).unwrap());
                        owned[s.forward(k).index()] = false;
                    }
                } else if let Some(s) = m.alloc(Order(order)) {
                    let n = Order(order).nr_pages();
                    prop_assert_eq!(s.0 as u64 % n, 0, "aligned");
                    for k in 0..n {
                        prop_assert!(!owned[s.forward(k).index()], "overlap");
                        owned[s.forward(k).index()] = true;
                    }
                    runs.push((s, n));
                } else {
                    // Only fails when no aligned free run of that order exists.
                    let n = Order(order).nr_pages() as usize;
                    prop_assert!(owned.chunks(n).all(|c| c.iter().any(|o| *o)));
                }
                prop_assert_eq!(m.nr_used(), owned.iter().filter(|o| **o).count() as u64);
            }
            m.check().map_err(TestCaseError::fail)?;
        }
    }
}
