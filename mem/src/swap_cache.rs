//! The swap device (file + swap map) and the swap cache: slot → folio for
//! folios under writeback or being read in.
//!
//! Analogue of `mm/swap_state.c`. A folio enters the swap cache when its
//! swap-out starts (`add_to_swap()`) or when a swapin allocates it
//! (`swapcache_prepare()` + `add_to_swap_cache()`), always with its folio
//! lock held, and leaves it under the folio lock again
//! (`delete_from_swap_cache()`). Faulters look here before reading the file,
//! so a refault of a folio under writeback or in flight finds it and sleeps
//! on its folio lock instead of reading a second copy.
//!
//! Invariant: a folio is in the swap cache only while the owner of its swap
//! I/O holds its folio lock, or until the first waiter that took a
//! reference during that time gets the lock and maps it back, or until the
//! last entry naming its slots goes (a discard or teardown then takes it
//! out, `swapin::free_swap_cache`), or until reclaim finds that nothing
//! but the cache references it (`swapin::shrink_swap_cache`). Slots of a
//! cached folio carry `HAS_CACHE` in the swap map.
//!
//! # Context
//! The swap lock ([`SwapDevice::lock`]) is taken below the page-table lock
//! and above the folio-table lock; it is never held across I/O.

use crate::swap_file::{SwapConfig, SwapFile, SwapFileError};
use crate::swap_map::{SwapMap, SwapMapError};
use crate::types::{FolioId, SwapSlot};
use std::collections::BTreeMap;
use std::sync::atomic::{
    AtomicUsize,
    Ordering::{AcqRel, Acquire},
};
use std::sync::{Mutex, MutexGuard};

/// Slot → folio, one record per folio (its slots are contiguous).
#[derive(Debug, Default)]
pub struct SwapCache {
    /// First slot → (folio, number of slots).
    map: BTreeMap<u32, (FolioId, u16)>,
    nr_pages: u64,
}

impl SwapCache {
    /// The folio caching `slot`, and its first slot (`swap_cache_get_folio()`).
    pub fn lookup(&self, slot: SwapSlot) -> Option<(FolioId, SwapSlot)> {
        let (&base, &(folio, nr)) = self.map.range(..=slot.0).next_back()?;
        (slot.0 < base + nr as u32).then_some((folio, SwapSlot(base)))
    }

    /// Whether any of `[base, base + nr)` is cached.
    pub fn overlaps(&self, base: SwapSlot, nr: u64) -> bool {
        let end = base.0 as u64 + nr;
        if self.lookup(base).is_some() {
            return true;
        }
        self.map
            .range(base.0..)
            .next()
            .is_some_and(|(&b, _)| (b as u64) < end)
    }

    fn insert(&mut self, base: SwapSlot, nr: u64, folio: FolioId) {
        debug_assert!(!self.overlaps(base, nr));
        self.map.insert(base.0, (folio, nr as u16));
        self.nr_pages += nr;
    }

    fn remove(&mut self, base: SwapSlot) -> Option<(FolioId, u16)> {
        let r = self.map.remove(&base.0)?;
        self.nr_pages -= r.1 as u64;
        Some(r)
    }

    /// Point the cache record of `[base, ..)` at `new` instead of `old`
    /// (`folio_migrate_mapping()` for a swap-cache folio). Returns false,
    /// changing nothing, if `old` does not cache `base`.
    pub fn replace_folio(&mut self, base: SwapSlot, old: FolioId, new: FolioId) -> bool {
        match self.map.get_mut(&base.0) {
            Some((f, _)) if *f == old => {
                *f = new;
                true
            }
            _ => false,
        }
    }

    /// Pages cached.
    pub fn nr_pages(&self) -> u64 {
        self.nr_pages
    }

    /// Folios cached.
    pub fn nr_folios(&self) -> u64 {
        self.map.len() as u64
    }

    /// Every cached folio: its first slot, the folio and its slots.
    pub fn iter(&self) -> impl Iterator<Item = (SwapSlot, FolioId, u64)> + '_ {
        self.map
            .iter()
            .map(|(&base, &(folio, nr))| (SwapSlot(base), folio, nr as u64))
    }
}

/// Everything under the swap lock.
#[derive(Debug)]
pub struct SwapState {
    /// Counts, checksums, allocator.
    pub map: SwapMap,
    /// The swap cache.
    pub cache: SwapCache,
}

impl SwapState {
    /// Allocate `nr` (a power of two) contiguous slots for `folio` and put
    /// it in the swap cache (`add_to_swap()`). Each slot starts with count
    /// 1: the caller points one entry at each before dropping its
    /// page-table lock. `None` when the file has no such run.
    pub fn add_to_swap(&mut self, folio: FolioId, order: crate::types::Order) -> Option<SwapSlot> {
        let base = self.map.alloc(order)?;
        self.cache.insert(base, order.nr_pages(), folio);
        Some(base)
    }

    /// Claim `[base, base + nr)` for a swapin into `folio`
    /// (`swapcache_prepare()` + `add_to_swap_cache()`). Fails, changing
    /// nothing, if any slot is cached already (another swapin or a
    /// writeback owns it: look it up instead) or free (the entry changed).
    pub fn swapcache_prepare(&mut self, base: SwapSlot, nr: u64, folio: FolioId) -> bool {
        if self.cache.overlaps(base, nr) {
            return false;
        }
        for k in 0..nr {
            if self.map.set_cache(base.forward(k)).is_err() {
                for j in 0..k {
                    let _ = self.map.clear_cache(base.forward(j));
                }
                return false;
            }
        }
        self.cache.insert(base, nr, folio);
        true
    }

    /// Take the folio caching `[base, base + nr)` out of the swap cache and
    /// clear `HAS_CACHE` (`delete_from_swap_cache()` + `put_swap_folio()`).
    /// Returns the slots that became free.
    ///
    /// # Errors
    /// [`SwapMapError`] on a bookkeeping bug (a slot was not cached).
    pub fn delete_from_swap_cache(&mut self, base: SwapSlot, nr: u64) -> Result<u64, SwapMapError> {
        let removed = self.cache.remove(base);
        debug_assert!(
            removed.is_some_and(|(_, n)| n as u64 == nr),
            "delete {base:?}+{nr}: removed {removed:?}, map {:?}",
            self.map.state(base)
        );
        let mut freed = 0;
        for k in 0..nr {
            freed += self.map.clear_cache(base.forward(k))? as u64;
        }
        Ok(freed)
    }

    /// Drop the references of `nr` entries on `[base, base + nr)`
    /// (`swap_free_nr()`). Returns the slots that became free.
    ///
    /// # Errors
    /// [`SwapMapError`] on a bookkeeping bug (a slot had no count).
    pub fn swap_free_nr(&mut self, base: SwapSlot, nr: u64) -> Result<u64, SwapMapError> {
        let mut freed = 0;
        for k in 0..nr {
            freed += self.map.put(base.forward(k))? as u64;
        }
        Ok(freed)
    }
}

/// The swap file and the state under the swap lock.
#[derive(Debug)]
pub struct SwapDevice {
    /// The file.
    pub file: SwapFile,
    /// The swap lock: below the page-table lock, above the folio-table lock.
    state: Mutex<SwapState>,
    /// Slots of clean folios that were freed or dirtied, waiting for their
    /// count to be dropped under the swap lock: a queue, so that any path
    /// may release one whatever locks it holds. Leaf; drained by every
    /// [`SwapDevice::lock`] that finds it non-empty.
    clean_frees: Mutex<Vec<SwapSlot>>,
    /// Slots in `clean_frees` (read without its lock).
    nr_clean_frees: AtomicUsize,
}

impl SwapDevice {
    /// Create the swap file and an empty map and cache.
    ///
    /// # Errors
    /// See [`SwapFileError`].
    pub fn new(config: &SwapConfig) -> Result<SwapDevice, SwapFileError> {
        let file = SwapFile::create(config)?;
        let map = SwapMap::new(file.nr_slots());
        Ok(SwapDevice {
            file,
            state: Mutex::new(SwapState {
                map,
                cache: SwapCache::default(),
            }),
            clean_frees: Mutex::default(),
            nr_clean_frees: AtomicUsize::new(0),
        })
    }

    /// Take the swap lock. The counts of released clean slots are dropped
    /// first, so that whoever looks at the map sees them free: a slot left
    /// queued until the next swap-out made the file look fuller than it
    /// was, to the stats and to the swap-in's choice to keep pages clean.
    pub fn lock(&self) -> MutexGuard<'_, SwapState> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if self.nr_clean_frees.load(Acquire) > 0 {
            let slots =
                std::mem::take(&mut *self.clean_frees.lock().unwrap_or_else(|e| e.into_inner()));
            self.nr_clean_frees.fetch_sub(slots.len(), AcqRel);
            for slot in slots {
                if let Err(e) = st.swap_free_nr(slot, 1) {
                    crate::vm::log_error(&format!("release of clean slot {slot:?}: {e}"));
                }
            }
        }
        st
    }

    /// Queue the count a clean folio held on `slot` for release (the folio
    /// was freed, or written, or lost its write protection); the next
    /// [`SwapDevice::lock`] drops it.
    ///
    /// # Context
    /// Any; takes a leaf lock.
    pub fn release_clean(&self, slot: SwapSlot) {
        let mut q = self.clean_frees.lock().unwrap_or_else(|e| e.into_inner());
        q.push(slot);
        self.nr_clean_frees.fetch_add(1, AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::swap_map::{SlotState, SLOTS_PER_CLUSTER};
    use crate::types::Order;

    fn state() -> SwapState {
        SwapState {
            map: SwapMap::new(2 * SLOTS_PER_CLUSTER),
            cache: SwapCache::default(),
        }
    }

    #[test]
    fn lookup_finds_any_slot_of_a_cached_folio() {
        let mut s = state();
        let base = s.add_to_swap(FolioId(3), Order(2)).unwrap();
        assert_eq!(s.cache.lookup(base.forward(3)), Some((FolioId(3), base)));
        assert_eq!(s.cache.lookup(base.forward(4)), None);
        assert!(s.cache.overlaps(SwapSlot(base.0.saturating_sub(1)), 2));
        assert_eq!(s.cache.nr_pages(), 4);
        // Writeback done, nobody refaulted: leave the cache, keep the counts.
        assert_eq!(s.delete_from_swap_cache(base, 4).unwrap(), 0);
        assert_eq!(
            s.map.state(base),
            SlotState::Used {
                count: 1,
                cached: false
            }
        );
        assert_eq!(s.cache.nr_pages(), 0);
    }

    #[test]
    fn only_one_swapin_claims_a_slot() {
        let mut s = state();
        let base = s.add_to_swap(FolioId(1), Order(0)).unwrap();
        s.delete_from_swap_cache(base, 1).unwrap();
        assert!(s.swapcache_prepare(base, 1, FolioId(8)));
        assert!(
            !s.swapcache_prepare(base, 1, FolioId(9)),
            "the loser looks it up"
        );
        assert_eq!(s.cache.lookup(base), Some((FolioId(8), base)));
        // The entry is mapped: drop its count, then the cache frees the slot.
        assert_eq!(s.swap_free_nr(base, 1).unwrap(), 0);
        assert_eq!(s.delete_from_swap_cache(base, 1).unwrap(), 1);
        assert_eq!(s.map.nr_used(), 0);
        assert!(
            !s.swapcache_prepare(base, 1, FolioId(9)),
            "a free slot is not swapped"
        );
    }
}
