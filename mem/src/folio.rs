//! The folio table: one record per allocated folio, and the folio lock.
//!
//! A folio is a naturally aligned range of pool pages of some order. While it
//! is mapped into a guest its pages physically live at the guest address
//! (they got there by `UFFDIO_MOVE`) and its pool range is a hole; the record
//! still names the pool range, which is where the pages go back to.
//!
//! Records live in a slab indexed by [`FolioId`], under the folio-table lock
//! (a short leaf lock, like the `lruvec` lock). The folio lock itself is a
//! sleeping lock: a `LOCKED` flag plus a hashed wait queue, as Linux's
//! `folio_wait_table` ([`FolioTable::lock`]).
//!
//! Invariant: `refcount >= mapcount + pincount` (+1 in the swap cache, once
//! swap exists). Extra references are transient (a worker holding the folio).

use crate::buddy::BlockState;
use crate::lru::LruVec;
use crate::rmap::Rmap;
use crate::types::{FolioId, Order, PoolOffset, SwapSlot};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::{Condvar, Mutex, MutexGuard};

/// Folio flags (`PG_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FolioFlags(u16);

impl FolioFlags {
    /// `PG_locked`: the folio lock is held.
    pub const LOCKED: FolioFlags = FolioFlags(1 << 0);
    // Bits 1..2: the hot streak (`FolioFlags::hot_streak`). There is no
    // `PG_dirty` (a folio is dirty unless `CLEAN`) and no `PG_uptodate`
    // (a folio's data is always valid once it is visible).
    /// `PG_swapcache`: in the swap cache.
    pub const SWAPCACHE: FolioFlags = FolioFlags(1 << 3);
    /// `PG_writeback`: being written to swap.
    pub const WRITEBACK: FolioFlags = FolioFlags(1 << 4);
    /// `PG_anon_exclusive`: mapped by exactly one guest page table.
    pub const EXCLUSIVE: FolioFlags = FolioFlags(1 << 5);
    /// Pinned by [`crate::pin`] (`folio_maybe_dma_pinned()`).
    pub const PINNED: FolioFlags = FolioFlags(1 << 6);
    /// `PG_lru`: on the LRU list.
    pub const LRU: FolioFlags = FolioFlags(1 << 7);
    /// `PG_referenced`: mapped by a fault whose access reclaim has not yet
    /// credited. The faulting thread touches the page only once woken, so a
    /// folio sampled at once looks untouched; reclaim lets a referenced
    /// folio go by one pass unsampled instead (a young PTE in
    /// `folio_check_references()`).
    pub const REFERENCED: FolioFlags = FolioFlags(1 << 8);
    /// On the deferred-split queue (`folio_test_partially_mapped()`).
    pub const DEFERRED_SPLIT: FolioFlags = FolioFlags(1 << 9);
    /// Moved out to its pool range to sample accesses (`vmscan`);
    /// its entries are `ProtNone` until a fault maps it back.
    pub const SAMPLED: FolioFlags = FolioFlags(1 << 10);
    /// A fault found the folio in the swap cache and waits on its lock to
    /// map it back: the end of writeback must leave it there.
    pub const REFAULTED: FolioFlags = FolioFlags(1 << 11);
    /// Clean since its swapin: the order-0 folio owns one count on slot
    /// `swap`, whose file copy equals its data, and is not in the swap
    /// cache. Its guest page is write-protected (`UFFDIO_COPY_MODE_WP`), so
    /// the first write raises a WP fault, which clears the flag and frees
    /// the slot under the page-table lock before lifting the protection.
    /// Reclaim drops a clean folio without a write, back to `Swap(slot)`.
    /// Analogue of a mapped swap-cache folio without `PG_dirty`. Changed
    /// only under the page-table lock of its mapping (or with the folio
    /// unmapped and locked).
    pub const CLEAN: FolioFlags = FolioFlags(1 << 12);

    /// The LRU generation (bits 13..15: sequence number modulo
    /// [`crate::lru::NR_GENS`]), meaningful while `LRU` is set.
    pub fn gen(self) -> usize {
        ((self.0 >> GEN_SHIFT) & GEN_MASK) as usize
    }
    /// Set the LRU generation.
    pub fn set_gen(&mut self, gen: usize) {
        debug_assert!(gen as u16 <= GEN_MASK);
        self.0 = (self.0 & !(GEN_MASK << GEN_SHIFT)) | ((gen as u16 & GEN_MASK) << GEN_SHIFT);
    }
    /// Reference samplings in a row that found the folio touched (bits
    /// 1..2, at most [`MAX_HOT_STREAK`]), like MGLRU's `LRU_REFS` bits.
    pub fn hot_streak(self) -> u16 {
        (self.0 >> HOT_SHIFT) & HOT_MASK
    }
    /// A sampling found the folio touched: lengthen its streak.
    pub fn sampled_touched(&mut self) {
        let streak = (self.hot_streak() + 1).min(MAX_HOT_STREAK);
        self.0 = (self.0 & !(HOT_MASK << HOT_SHIFT)) | (streak << HOT_SHIFT);
    }
    /// Whether reclaim samples the folio on the pass that finds it in the
    /// generation of sequence number `seq`. A folio touched at `s` samplings
    /// in a row is sampled on one pass in `2^s` only: a folio that keeps
    /// proving hot is sampled exponentially less often (each sampling costs
    /// a TLB flush and, for a folio in use, a fault to map it back), as
    /// MGLRU protects the tiers that refault most; a cold one is sampled at
    /// every pass, and one that cooled is sampled again within
    /// `2^MAX_HOT_STREAK` passes.
    pub fn sample_on_pass(self, seq: u64) -> bool {
        seq.is_multiple_of(1 << self.hot_streak())
    }
    /// Whether all bits of `f` are set.
    pub fn contains(self, f: FolioFlags) -> bool {
        self.0 & f.0 == f.0
    }
    /// Set `f`.
    pub fn insert(&mut self, f: FolioFlags) {
        self.0 |= f.0;
    }
    /// Clear `f`.
    pub fn remove(&mut self, f: FolioFlags) {
        self.0 &= !f.0;
    }
}

pub(crate) const NO_LINK: u32 = u32::MAX;
const GEN_SHIFT: u16 = 13;
const GEN_MASK: u16 = 0b111;
const HOT_SHIFT: u16 = 1;
const HOT_MASK: u16 = 0b11;
/// Cap of [`FolioFlags::hot_streak`].
pub const MAX_HOT_STREAK: u16 = 3;

/// Links on an LRU generation list (folio ids; `u32::MAX` for none). The
/// generation itself lives in the flags ([`FolioFlags::gen`]), as MGLRU
/// keeps it in `folio->flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LruLink {
    pub(crate) prev: u32,
    pub(crate) next: u32,
}

impl Default for LruLink {
    fn default() -> Self {
        LruLink {
            prev: NO_LINK,
            next: NO_LINK,
        }
    }
}

/// A bitmap of mapped subpages, for a partially mapped large folio.
pub type PageMapped = Box<[u64; 8]>;

/// One folio record.
#[derive(Debug)]
pub struct Folio {
    /// First pool page.
    pub pool: PoolOffset,
    /// Size.
    pub order: Order,
    /// `PG_*` flags.
    pub flags: FolioFlags,
    /// References: mappings + pins + transient holders.
    pub refcount: u32,
    /// Guest pages mapping this folio (the total mapcount).
    pub mapcount: u32,
    /// Pins (each pinned page counts once per pin).
    pub pincount: u32,
    /// Per-page mapcount (0 or 1: a folio maps into one VM) once the folio
    /// is partially mapped; `None` means "as the total says": all or nothing.
    pub page_mapped: Option<PageMapped>,
    /// Where the folio is mapped.
    pub rmap: Option<Rmap>,
    /// What the pool range will hold when the folio is freed: `NeedsPopulate`
    /// while pages are in the guest, `NeedsZero` once some moved back.
    pub pool_state: BlockState,
    /// LRU links.
    pub lru: LruLink,
    /// First swap slot while in the swap cache (the slots are contiguous),
    /// or the slot a [`FolioFlags::CLEAN`] folio owns.
    pub swap: Option<SwapSlot>,
}

impl Folio {
    /// A record for the `2^order` pool pages at `pool`: no flags, no
    /// references, not mapped, not on the LRU or in the swap cache, its
    /// pages in the guest once mapped (`NeedsPopulate` when freed). Callers
    /// set what differs with struct update syntax.
    pub fn new(pool: PoolOffset, order: Order) -> Folio {
        Folio {
            pool,
            order,
            flags: FolioFlags::default(),
            refcount: 0,
            mapcount: 0,
            pincount: 0,
            page_mapped: None,
            rmap: None,
            pool_state: BlockState::NeedsPopulate,
            lru: LruLink::default(),
            swap: None,
        }
    }

    /// Pages in the folio.
    pub fn nr_pages(&self) -> u64 {
        self.order.nr_pages()
    }
}

/// A pool range released by a folio whose last reference went away; the
/// caller returns it to the buddy allocator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreedRange {
    /// First pool page.
    pub pool: PoolOffset,
    /// Order.
    pub order: Order,
    /// State for [`crate::buddy::Buddy::free`].
    pub state: BlockState,
    /// The slot a [`FolioFlags::CLEAN`] folio owned a count on: freed with
    /// the range.
    pub clean_slot: Option<SwapSlot>,
}

/// The slab of folio records; only reachable through the folio-table lock.
#[derive(Debug, Default)]
pub struct FolioSlab {
    slots: Vec<Option<Folio>>,
    free_ids: Vec<u32>,
    /// LRU generations, one set per VM (indexed by VM id).
    pub(crate) lruvecs: Vec<LruVec>,
    /// Partially mapped folios waiting for the split worker.
    pub(crate) deferred_split: VecDeque<FolioId>,
    nr_live: u64,
}

impl FolioSlab {
    /// Insert a new record, returning its id.
    pub fn insert(&mut self, folio: Folio) -> FolioId {
        self.nr_live += 1;
        match self.free_ids.pop() {
            Some(id) => {
                debug_assert!(self.slots[id as usize].is_none());
                self.slots[id as usize] = Some(folio);
                FolioId(id)
            }
            None => {
                self.slots.push(Some(folio));
                FolioId(self.slots.len() as u32 - 1)
            }
        }
    }

    /// The record of a live folio.
    pub fn get(&self, id: FolioId) -> Option<&Folio> {
        self.slots.get(id.0 as usize).and_then(Option::as_ref)
    }

    /// The record of a live folio, mutably.
    pub fn get_mut(&mut self, id: FolioId) -> Option<&mut Folio> {
        self.slots.get_mut(id.0 as usize).and_then(Option::as_mut)
    }

    pub(crate) fn live(&mut self, id: FolioId) -> &mut Folio {
        self.get_mut(id)
            .unwrap_or_else(|| panic!("folio {id:?} is not live"))
    }

    /// Remove a record (the caller owns its pool range from now on).
    pub fn remove(&mut self, id: FolioId) -> Folio {
        self.lru_del(id);
        let f = self.slots[id.0 as usize]
            .take()
            .unwrap_or_else(|| panic!("folio {id:?} freed twice"));
        debug_assert!(
            !f.flags.contains(FolioFlags::LOCKED),
            "freeing locked folio {id:?}: {f:?}"
        );
        self.free_ids.push(id.0);
        self.nr_live -= 1;
        f
    }

    /// Take a reference (`folio_get()`).
    pub fn get_ref(&mut self, id: FolioId) {
        self.live(id).refcount += 1;
    }

    /// Drop `nr` references (`folio_put_refs()`); at zero the record goes
    /// and its pool range is returned for freeing.
    pub fn put_refs(&mut self, id: FolioId, nr: u32) -> Option<FreedRange> {
        let f = self.live(id);
        debug_assert!(f.refcount >= nr, "refcount underflow on {id:?}");
        f.refcount -= nr;
        debug_assert!(
            f.refcount >= f.mapcount + f.pincount,
            "refcount below mapcount+pins on {id:?}"
        );
        if f.refcount > 0 {
            return None;
        }
        let f = self.remove(id);
        Some(FreedRange {
            pool: f.pool,
            order: f.order,
            state: f.pool_state,
            clean_slot: f.swap.filter(|_| f.flags.contains(FolioFlags::CLEAN)),
        })
    }

    /// Every live folio with its id.
    pub fn iter(&self) -> impl Iterator<Item = (FolioId, &Folio)> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, f)| f.as_ref().map(|f| (FolioId(i as u32), f)))
    }

    /// Live folios.
    pub fn nr_live(&self) -> u64 {
        self.nr_live
    }

    /// Live folios of each order.
    pub fn count_by_order(&self) -> [u64; Order::COUNT] {
        let mut n = [0; Order::COUNT];
        for f in self.slots.iter().flatten() {
            n[f.order.index()] += 1;
        }
        n
    }

    /// Bytes of metadata: the slab plus per-page mapcount bitmaps.
    pub fn metadata_bytes(&self) -> u64 {
        let bitmaps = self
            .slots
            .iter()
            .flatten()
            .filter(|f| f.page_mapped.is_some())
            .count();
        (self.slots.capacity() * std::mem::size_of::<Option<Folio>>()
            + self.free_ids.capacity() * 4
            + bitmaps * std::mem::size_of::<[u64; 8]>()
            + self.deferred_split.capacity() * 4) as u64
    }
}

/// One hashed wait queue of the folio wait table.
#[derive(Debug, Default)]
struct WaitQueue {
    lock: Mutex<()>,
    cv: Condvar,
    /// Sleepers on this queue (any folio hashing here), changed under
    /// `lock`: unlock skips the wake-up when there are none, like
    /// `PG_waiters` lets `folio_unlock()` skip `folio_wake_bit()`.
    waiters: AtomicU32,
}

const WAIT_TABLE_SIZE: usize = 64;

/// The folio table: the slab under its lock, and the folio wait table.
#[derive(Debug)]
pub struct FolioTable {
    /// The folio-table lock: below the page-table lock, above the zone lock
    /// only in that a holder never takes the zone lock (see crate docs).
    slab: Mutex<FolioSlab>,
    wait: Box<[WaitQueue]>,
}

impl Default for FolioTable {
    fn default() -> Self {
        FolioTable {
            slab: Mutex::default(),
            wait: (0..WAIT_TABLE_SIZE).map(|_| WaitQueue::default()).collect(),
        }
    }
}

impl FolioTable {
    /// Take the folio-table lock.
    pub fn slab(&self) -> MutexGuard<'_, FolioSlab> {
        self.slab.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn queue(&self, id: FolioId) -> &WaitQueue {
        // Fibonacci hashing, as hash_ptr() does for folio_waitqueue().
        let h = (id.0 as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58;
        &self.wait[h as usize % WAIT_TABLE_SIZE]
    }

    fn try_set_locked(&self, id: FolioId) -> bool {
        let mut slab = self.slab();
        let f = slab.live(id);
        if f.flags.contains(FolioFlags::LOCKED) {
            return false;
        }
        f.flags.insert(FolioFlags::LOCKED);
        true
    }

    /// Take the folio lock, sleeping on the wait queue while another holder
    /// has it (`folio_lock()`). No spinning, no sleep-polling.
    ///
    /// # Context
    /// The caller holds a reference on the folio and no page-table lock.
    pub fn lock(&self, id: FolioId) -> FolioLockGuard<'_> {
        if self.try_set_locked(id) {
            return FolioLockGuard { table: self, id };
        }
        let q = self.queue(id);
        let mut g = q.lock.lock().unwrap_or_else(|e| e.into_inner());
        // Lost wake-ups are impossible: a sleeper counts itself in
        // `waiters` before it tests the flag (both with the queue lock
        // held); unlock clears the flag and then reads `waiters`. The two
        // flag accesses are ordered by the folio-table lock, so an unlock
        // that cleared the flag after our test sees our count, and takes
        // the queue lock (which we hold until we sleep) before notifying.
        q.waiters.fetch_add(1, SeqCst);
        while !self.try_set_locked(id) {
            g = q.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        q.waiters.fetch_sub(1, SeqCst);
        drop(g);
        FolioLockGuard { table: self, id }
    }

    /// The guard of a folio created with `LOCKED` already set
    /// (`__folio_set_locked()` on a new folio): nobody could reach it
    /// before, so the lock is ours.
    pub(crate) fn assume_locked(&self, id: FolioId) -> FolioLockGuard<'_> {
        debug_assert!(self.slab().live(id).flags.contains(FolioFlags::LOCKED));
        FolioLockGuard { table: self, id }
    }

    /// Take the folio lock if it is free (`folio_trylock()`).
    pub fn trylock(&self, id: FolioId) -> Option<FolioLockGuard<'_>> {
        // Lazily: a guard built for a failed attempt would unlock the
        // holder's lock when dropped.
        self.try_set_locked(id)
            .then(|| FolioLockGuard { table: self, id })
    }

    fn unlock(&self, id: FolioId) {
        if let Some(f) = self.slab().get_mut(id) {
            f.flags.remove(FolioFlags::LOCKED);
        }
        let q = self.queue(id);
        if q.waiters.load(SeqCst) == 0 {
            return;
        }
        let _g = q.lock.lock().unwrap_or_else(|e| e.into_inner());
        q.cv.notify_all();
    }
}

/// A held folio lock; dropping it unlocks and wakes the waiters.
#[derive(Debug)]
pub struct FolioLockGuard<'a> {
    table: &'a FolioTable,
    id: FolioId,
}

impl FolioLockGuard<'_> {
    /// The locked folio.
    pub fn id(&self) -> FolioId {
        self.id
    }
}

impl Drop for FolioLockGuard<'_> {
    fn drop(&mut self) {
        self.table.unlock(self.id);
    }
}

#[cfg(test)]
pub(crate) fn test_folio(pool: u64, order: Order) -> Folio {
    Folio {
        refcount: 1,
        ..Folio::new(PoolOffset::from_pfn(pool), order)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn ids_are_reused_and_refs_free_at_zero() {
        let t = FolioTable::default();
        let mut s = t.slab();
        let a = s.insert(test_folio(0, Order(0)));
        let b = s.insert(test_folio(1, Order(0)));
        s.get_ref(a);
        assert_eq!(s.put_refs(a, 1), None);
        let freed = s.put_refs(a, 1).unwrap();
        assert_eq!(freed.pool, PoolOffset(0));
        assert_eq!(s.insert(test_folio(2, Order(1))), a);
        assert_eq!(s.nr_live(), 2);
        assert_eq!(s.count_by_order()[1], 1);
        assert!(s.get(b).is_some());
    }

    #[test]
    fn lru_keeps_order_with_middle_removal() {
        let t = FolioTable::default();
        let mut s = t.slab();
        let ids: Vec<_> = (0..5).map(|i| s.insert(test_folio(i, Order(0)))).collect();
        for &id in &ids {
            s.lru_add(id);
        }
        s.lru_del(ids[2]);
        s.lru_del(ids[0]);
        s.lru_del(ids[4]);
        assert_eq!(s.lru_iter().collect::<Vec<_>>(), vec![ids[1], ids[3]]);
        s.remove(ids[1]);
        assert_eq!(s.lru_iter().collect::<Vec<_>>(), vec![ids[3]]);
    }

    #[test]
    fn failed_trylock_leaves_the_holder_locked() {
        let t = FolioTable::default();
        let id = t.slab().insert(test_folio(0, Order(0)));
        let held = t.trylock(id).expect("free lock");
        assert!(t.trylock(id).is_none());
        assert!(
            t.slab().get(id).unwrap().flags.contains(FolioFlags::LOCKED),
            "a failed trylock must not unlock the holder"
        );
        assert!(t.trylock(id).is_none());
        drop(held);
        assert!(t.trylock(id).is_some());
    }

    #[test]
    fn folio_lock_sleeps_until_unlocked() {
        let t = Arc::new(FolioTable::default());
        let id = t.slab().insert(test_folio(0, Order(0)));
        let g = t.lock(id);
        assert!(t.trylock(id).is_none());
        let got = Arc::new(AtomicBool::new(false));
        let waiters: Vec<_> = (0..4)
            .map(|_| {
                let (t, got) = (t.clone(), got.clone());
                std::thread::spawn(move || {
                    let g = t.lock(id);
                    // Exactly one holder at a time.
                    assert!(!got.swap(true, Ordering::SeqCst));
                    got.store(false, Ordering::SeqCst);
                    drop(g);
                })
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(
            !got.load(Ordering::SeqCst),
            "a waiter ran while the lock was held"
        );
        drop(g);
        for w in waiters {
            w.join().unwrap();
        }
        assert!(!t.slab().get(id).unwrap().flags.contains(FolioFlags::LOCKED));
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;

    #[test]
    fn hot_folios_are_sampled_exponentially_less_often() {
        let mut f = FolioFlags::default();
        f.set_gen(3);
        f.insert(FolioFlags::LRU);
        let sampled = |f: FolioFlags| (0..64).filter(|&s| f.sample_on_pass(s)).count();
        assert_eq!(sampled(f), 64, "a cold folio at every pass");
        for want in [32, 16, 8, 8] {
            f.sampled_touched();
            assert_eq!(sampled(f), want);
        }
        assert_eq!(f.hot_streak(), MAX_HOT_STREAK);
        // The streak lives beside the other flags without touching them.
        assert_eq!(f.gen(), 3);
        assert!(f.contains(FolioFlags::LRU));
        assert!(!f.contains(FolioFlags::LOCKED));
    }

    /// The per-folio metadata cost, which large folios amortise over up to
    /// 512 pages (order 0: this plus an 8-byte Pte per page).
    #[test]
    fn folio_record_stays_small() {
        let n = std::mem::size_of::<Option<Folio>>();
        eprintln!("folio record: {n} bytes");
        assert!(n <= 80, "folio record grew to {n} bytes");
    }
}
