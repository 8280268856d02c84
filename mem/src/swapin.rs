//! Lock-protected swapin: the fault path for `Swap` entries.
//!
//! Analogue of `do_swap_page()` with `swapcache_prepare()`, and of the
//! swapin-marker design proposed on linux-mm:
//!
//! 1. Look the slot up in the swap cache. A folio there is under writeback
//!    or being read: take a reference, sleep on its folio lock, and map it
//!    back once the owner is done ([`refault_swapcache`]).
//! 2. Otherwise allocate a folio, born locked, claim its slots in the swap
//!    map and cache (only one faulter can; the others find the folio in
//!    step 1 and sleep on its lock), and replace the entries with
//!    `SwapinMarker(folio)` under the page-table lock. Faulters that see the
//!    marker sleep on the folio lock too. A large folio whose slots include
//!    a neighbour's folio in the cache is not read: the faulting page is
//!    read alone instead (`non_swapcache_batch()`).
//! 3. Read the slots into the folio's pool range with no page-table lock
//!    held, verify each page's checksum, then under the page-table lock map
//!    every page whose entry is still the marker (a discard may have
//!    replaced some meanwhile: those are simply not mapped), poison pages
//!    that failed, drop the slots and the swap cache entry, unlock, and wake.
//!
//! Nobody spins or sleep-polls: every wait is on a folio lock.
//!
//! # Context
//! Runs on handler threads (or pin callers) with no lock held. Lock order:
//! folio lock → page-table lock → swap lock → folio-table lock.

use crate::buddy::{Block, BlockState};
use crate::fault::{install_from_pool, FaultOutcome};
use crate::folio::{Folio, FolioFlags, FolioSlab};
use crate::manager::Inner;
use crate::pte::{Pte, PteState, PtlGuard};
use crate::rmap::{self, full_mask, mask_test, PageMask, Rmap};
use crate::swap_cache::{SwapDevice, SwapState};
use crate::swap_file::SwapIoError;
use crate::swap_map::SlotState;
use crate::types::{FolioId, Order, PageIndex, PoolOffset, SwapSlot, PAGE_SIZE};
use crate::vm::{log_error, Region};
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::time::Instant;

/// Sleep until `folio`'s lock is free, then drop the reference the caller
/// took to keep it alive (`folio_wait_locked()` + `folio_put()`).
///
/// # Context
/// No locks held; the caller holds one reference on `folio`.
pub(crate) fn wait_on_folio(inner: &Inner, folio: FolioId) {
    drop(inner.folios.lock(folio));
    inner.put_folio(folio, 1);
}

/// Serve a fault on `Swap(slot)` at `idx`.
///
/// # Context
/// No locks held.
pub(crate) fn do_swap_page(
    inner: &Inner,
    region: &Region,
    idx: PageIndex,
    slot: SwapSlot,
    write: bool,
) -> FaultOutcome {
    let Some(dev) = inner.swap.as_ref() else {
        log_error(&format!("swap entry {slot:?} without a swap device"));
        return FaultOutcome::Poisoned;
    };
    let t0 = Instant::now();
    let cached = {
        let st = dev.lock();
        st.cache.lookup(slot).inspect(|&(f, _)| {
            let mut slab = inner.folios.slab();
            slab.get_ref(f);
            slab.live(f).flags.insert(FolioFlags::REFAULTED);
        })
    };
    if let Some((folio, base)) = cached {
        let o = refault_swapcache(inner, dev, region, idx, folio, base);
        if o == FaultOutcome::Refaulted {
            let ns = t0.elapsed().as_nanos() as u64;
            both(inner, region, |c| c.swapcache_latency.record(ns));
        }
        return o;
    }
    let o = swapin_read(inner, dev, region, idx, slot, write);
    if o == FaultOutcome::Refaulted {
        let ns = t0.elapsed().as_nanos() as u64;
        both(inner, region, |c| c.swapin_latency.record(ns));
    }
    o
}

/// Apply `f` to the VM's and the manager's swap counters.
pub(crate) fn both<R>(
    inner: &Inner,
    region: &Region,
    f: impl Fn(&crate::stats::SwapCounters) -> R,
) {
    f(&region.counters.swap);
    f(&inner.swap_counters);
}

/// Map back a folio found in the swap cache (refault during writeback, or
/// a second faulter of a swapin). The caller took a reference on `folio`.
/// If the folio was migrated while we slept on its lock, the cache names
/// the new one: we follow it, since the waiter that gets the lock is the
/// one that takes the folio out of the cache (nobody else would if the
/// page were discarded before another fault).
fn refault_swapcache(
    inner: &Inner,
    dev: &SwapDevice,
    region: &Region,
    idx: PageIndex,
    mut folio: FolioId,
    base: SwapSlot,
) -> FaultOutcome {
    let lock = loop {
        let lock = inner.folios.lock(folio);
        // The owner is done; is the folio still cached for these slots?
        let now = {
            let st = dev.lock();
            let now = st.cache.lookup(base);
            if let Some((moved, _)) = now.filter(|&(g, b)| g != folio && b == base) {
                // Migrated while we slept (`migrate_swapcache`): the duty of
                // the waiter passes to the new folio, which we take a
                // reference on under the swap lock, like a lookup.
                let mut slab = inner.folios.slab();
                slab.get_ref(moved);
                slab.live(moved).flags.insert(FolioFlags::REFAULTED);
            }
            now
        };
        match now {
            Some((f, b)) if f == folio && b == base => break lock,
            Some((moved, b)) if b == base => {
                drop(lock);
                inner.put_folio(folio, 1);
                folio = moved;
            }
            _ => {
                drop(lock);
                inner.put_folio(folio, 1);
                return FaultOutcome::Retry;
            }
        }
    };
    let (order, rmap) = {
        let slab = inner.folios.slab();
        let f = slab.get(folio).expect("we hold a reference");
        (f.order, f.rmap)
    };
    // A relocation may have moved the folio's entries (and rmap) to another
    // region meanwhile: map it back there, where its entries are. The
    // waiter that got the lock is the one that must take the folio out of
    // the swap cache, whatever it finds.
    let here = rmap.is_some_and(|r| r.vm == region.vm && r.region == region.index);
    let owner = match here {
        true => None,
        false => rmap.and_then(|r| inner.find_region(r.vm, r.region)),
    };
    let region = owner.as_deref().unwrap_or(region);
    let first = rmap.map_or(idx, |r| r.index);
    let nr = order.nr_pages();
    // An rmap naming a region gone since leaves `first` meaningless here:
    // then nothing maps (and nothing indexes past this region's tables).
    let fits = first.0 + nr <= region.size() / PAGE_SIZE;
    // Before the install wakes the faulting threads: the folio leaves the
    // swap cache, and the mapped entries' slot references go.
    let settle = |mask: &PageMask| {
        release_swap(inner, dev, folio, base, mask);
        both(inner, region, |c| {
            c.swapin_cache_folios.fetch_add(1, Relaxed)
        });
    };
    let mapped = match fits {
        false => {
            settle(&[0; 8]);
            [0; 8]
        }
        true => {
            let mut ptl = region.pt.lock(first);
            let mask = match ptl.is_dead() {
                true => [0; 8],
                false => entries_mask(&ptl, first, nr, |k| Pte::swap(base.forward(k))),
            };
            let m = (folio, first);
            map_folio_pages(inner, region, &mut ptl, m, &mask, false, || settle(&mask));
            mask
        }
    };
    drop(lock);
    inner.put_folio(folio, 1);
    let sub = idx.0.wrapping_sub(first.0);
    match here && sub < nr && mask_test(&mapped, sub) {
        true => FaultOutcome::Refaulted,
        false => FaultOutcome::Retry,
    }
}

/// Subpages `k` of `[first, first + nr)` whose entry equals `want(k)`.
fn entries_mask(
    ptl: &PtlGuard<'_>,
    first: PageIndex,
    nr: u64,
    want: impl Fn(u64) -> Pte,
) -> PageMask {
    let mut m = [0u64; 8];
    for k in 0..nr {
        if ptl.pte(first.forward(k)) == want(k) {
            m[(k / 64) as usize] |= 1 << (k % 64);
        }
    }
    m
}

/// Map the subpages in `mask` of the unmapped, locked `folio` (its pages
/// are in its pool range) at `first`: install them (`COPY` or `MOVE`, see
/// [`install_from_pool`]; write-protected if `wp`), set `Present`, add the
/// rmap and put the folio on the youngest generation. Returns whether the
/// whole folio was mapped write-protected.
///
/// `settle` runs once, after the entries and counters are set and before
/// the install: the install wakes the faulting threads, and whatever they
/// do next (a discard, a look at the statistics) must find the swap slots
/// and swap cache already settled, not a moment later.
///
/// # Context
/// Folio lock and the page-table lock (`ptl`) held.
pub(crate) fn map_folio_pages(
    inner: &Inner,
    region: &Region,
    ptl: &mut PtlGuard<'_>,
    (folio, first): (FolioId, PageIndex),
    mask: &PageMask,
    wp: bool,
    settle: impl FnOnce(),
) -> bool {
    let Some((pool, order)) = inner.folios.slab().get(folio).map(|f| (f.pool, f.order)) else {
        settle();
        return false;
    };
    let nr = order.nr_pages();
    let n: u64 = (0..nr).filter(|&k| mask_test(mask, k)).count() as u64;
    if n == 0 {
        settle();
        return false;
    }
    // Bookkeeping first: the MOVE wakes the faulting threads, and by then
    // the counters they may read must already include these pages.
    {
        let mut slab = inner.folios.slab();
        rmap::add_anon_rmap(&mut slab, ptl, folio, mask);
        slab.lru_add(folio);
    }
    region.counters.resident(order, n as i64);
    both(inner, region, |c| {
        c.swapped_pages.fetch_sub(n as i64, Relaxed)
    });
    settle();
    let mut protected = false;
    if n == nr {
        ptl.set_range(first, nr, Pte::present(folio, 0));
        protected = install_from_pool(inner, region, first, pool, nr, wp);
    } else {
        let mut k = 0;
        while k < nr {
            if !mask_test(mask, k) {
                k += 1;
                continue;
            }
            let run = (k..nr).take_while(|&j| mask_test(mask, j)).count() as u64;
            ptl.set_range(first.forward(k), run, Pte::present(folio, k));
            install_from_pool(inner, region, first.forward(k), pool.subpage(k), run, false);
            k += run;
        }
    }
    protected
}

/// After a swapin or a swap-cache refault: the entries in `replaced` were
/// turned from swap (or marker) entries into something else by this call,
/// so drop their slot counts; then take the folio out of the swap cache,
/// which frees every slot nobody names any more, and drop the cache's
/// reference.
///
/// # Context
/// Folio lock held; no page-table lock.
fn release_swap(
    inner: &Inner,
    dev: &SwapDevice,
    folio: FolioId,
    base: SwapSlot,
    replaced: &PageMask,
) {
    let nr = inner
        .folios
        .slab()
        .get(folio)
        .map_or(1, |f| f.order.nr_pages());
    let mut st = dev.lock();
    for k in (0..nr).filter(|&k| mask_test(replaced, k)) {
        if let Err(e) = st.swap_free_nr(base.forward(k), 1) {
            log_error(&format!("swapin release: {e}"));
        }
    }
    uncache(&mut st, &mut inner.folios.slab(), folio, base, nr);
}

/// Take `folio`, which caches `[base, base + nr)`, out of the swap cache
/// and drop the cache's reference (`delete_from_swap_cache()` +
/// `folio_ref_sub()`): slots no entry names are freed, the others keep
/// their data for a fault to read.
///
/// # Context
/// Folio lock held, and the swap lock (`st`) and the folio-table lock
/// (`slab`); the caller holds a reference besides the cache's.
pub(crate) fn uncache(
    st: &mut SwapState,
    slab: &mut FolioSlab,
    folio: FolioId,
    base: SwapSlot,
    nr: u64,
) {
    let f = slab.live(folio);
    f.swap = None;
    f.flags.remove(FolioFlags::SWAPCACHE);
    f.flags.remove(FolioFlags::REFAULTED);
    let freed = slab.put_refs(folio, 1);
    debug_assert!(freed.is_none(), "the caller holds a reference");
    if let Err(e) = st.delete_from_swap_cache(base, nr) {
        log_error(&format!(
            "swap cache removal of {folio:?} at slot {}: {e}",
            base.0
        ));
    }
}

/// After the count of `slot` was dropped because its entry went (a discard
/// or the VM's teardown): if no entry names it now but a folio caches it,
/// take a reference on that folio (under the swap lock, as a lookup must)
/// and add it to `found`, for [`free_swap_cache`] once no page-table lock
/// is held. First half of `free_swap_and_cache()`.
///
/// # Context
/// Swap lock held (`st`); takes the folio-table lock.
pub(crate) fn unnamed_cached(
    inner: &Inner,
    st: &SwapState,
    slot: SwapSlot,
    found: &mut Vec<(FolioId, SwapSlot)>,
) {
    let unnamed = st.map.state(slot)
        == (SlotState::Used {
            count: 0,
            cached: true,
        });
    let Some((folio, base)) = st.cache.lookup(slot).filter(|_| unnamed) else {
        return;
    };
    if !found.iter().any(|&(f, _)| f == folio) {
        inner.folios.slab().get_ref(folio);
        found.push((folio, base));
    }
}

/// Take each folio of `found` (referenced by [`unnamed_cached`]) out of the
/// swap cache if no entry names any of its slots any more, then drop the
/// reference (`__try_to_reclaim_swap()`). Only a fault on its slots could
/// find such a folio otherwise: one left in the cache after its write with
/// nobody waiting for it (`FaultPoint::SwapKeepCache`) would stay there,
/// with its slots and pool range, for ever. Whoever holds the folio lock
/// meanwhile (its writeback or swapin, a refault waiting for it) either
/// takes it out of the cache itself, found gone here, or leaves it for
/// this; a migration leaves the new folio, which is followed.
///
/// With `wait` false a folio whose lock is held is left alone, as
/// `free_swap_and_cache()` only trylocks: a discard must not wait for a
/// swap write (up to a whole reclaim batch of them) on the VMM's event
/// loop. The holder takes it out of the cache then: a writeback that no
/// faulter met ends by doing so, and a faulter that waited on it maps what
/// entries are left, none, and does so too. The fault injection keeps a
/// folio cached only while an entry names one of its slots (its writeback
/// looks under the swap lock); one it kept whose last entry goes while
/// another holder (a migration, a relocation pull, reclaim) has the lock
/// stays, until reclaim frees it ([`shrink_swap_cache`]) or its VM is torn
/// down (`vm::Teardown::run`). The VM's teardown waits.
///
/// # Context
/// No locks held; sleeps on folio locks if `wait`. Lock order: folio lock →
/// swap lock → folio-table lock.
pub(crate) fn free_swap_cache(
    inner: &Inner,
    dev: &SwapDevice,
    found: Vec<(FolioId, SwapSlot)>,
    wait: bool,
) {
    for (mut folio, base) in found {
        let lock = loop {
            let lock = match wait {
                true => inner.folios.lock(folio),
                false => match inner.folios.trylock(folio) {
                    Some(lock) => lock,
                    None => break None,
                },
            };
            let mut st = dev.lock();
            let moved = match st.cache.lookup(base) {
                Some((f, b)) if f == folio && b == base => None,
                // Migrated while we slept: look at the new one.
                Some((moved, b)) if b == base && moved != folio => Some(moved),
                _ => break Some(lock),
            };
            let Some(moved) = moved else {
                let mut slab = inner.folios.slab();
                let f = slab.live(folio);
                let nr = f.order.nr_pages();
                let unnamed = f.mapcount == 0
                    && (0..nr).all(|k| {
                        st.map.state(base.forward(k))
                            == (SlotState::Used {
                                count: 0,
                                cached: true,
                            })
                    });
                if unnamed {
                    uncache(&mut st, &mut slab, folio, base, nr);
                }
                drop(slab);
                break Some(lock);
            };
            inner.folios.slab().get_ref(moved);
            drop(st);
            drop(lock);
            inner.put_folio(folio, 1);
            folio = moved;
        };
        drop(lock);
        inner.put_folio(folio, 1);
    }
}

/// Free up to about `nr_pages` pages of swap-cache folios that nothing but
/// the cache references (of `vm`'s, or of any VM): unmapped, unlocked, not
/// under I/O, with no faulter waiting to map them back. Their write
/// finished (checksummed), so their slots hold their data: the entries
/// naming them stay `Swap` and a fault reads the file, and slots no entry
/// names are freed. Returns the pages freed. Analogue of reclaim meeting a
/// clean swap-cache folio (`__remove_mapping()` in `shrink_folio_list()`).
///
/// Without fault injection there is none to find: a folio stays in the
/// cache after its I/O only for a faulter that holds a reference and takes
/// it out. `FaultPoint::SwapKeepCache` keeps folios there with nobody to
/// map them back, as Linux keeps a swapped-out folio cached. Left alone
/// they filled the whole budget, and every fault then waited for memory
/// for good (`kept_folios_racing_faults_pins_discards_and_compaction_balance`
/// in `mem/tests/swap_keep_cache.rs`, under CPU load); reclaim owes them
/// what Linux's gives them.
///
/// # Context
/// No locks held; only trylocks folios. Lock order: swap lock →
/// folio-table lock, then folio lock → swap lock → folio-table lock.
pub(crate) fn shrink_swap_cache(
    inner: &Inner,
    dev: &SwapDevice,
    vm: Option<crate::VmId>,
    nr_pages: u64,
) -> u64 {
    // `ours`: we hold a reference and the lock.
    let idle = |f: &Folio, ours: bool| {
        f.refcount == 1 + u32::from(ours)
            && f.mapcount == 0
            && f.pincount == 0
            && f.flags.contains(FolioFlags::LOCKED) == ours
            && !f.flags.contains(FolioFlags::WRITEBACK)
            && vm.is_none_or(|v| f.rmap.is_some_and(|r| r.vm == v))
    };
    // A reference on each, taken under the swap lock as a lookup takes it.
    let found: Vec<(FolioId, SwapSlot, u64)> = {
        let st = dev.lock();
        let mut slab = inner.folios.slab();
        let mut pages = 0;
        let mut found = Vec::new();
        for (base, folio, nr) in st.cache.iter() {
            if pages >= nr_pages {
                break;
            }
            if slab.get(folio).is_some_and(|f| idle(f, false)) {
                slab.get_ref(folio);
                found.push((folio, base, nr));
                pages += nr;
            }
        }
        found
    };
    let mut freed = 0;
    for (folio, base, nr) in found {
        if let Some(lock) = inner.folios.trylock(folio) {
            let mut st = dev.lock();
            let mut slab = inner.folios.slab();
            // Still cached for these slots, and referenced by the cache and
            // us alone: a faulter that looked it up since holds a reference
            // of its own and maps it back (`refault_swapcache`).
            let f = slab.live(folio);
            let rmap = f.rmap;
            let drop_it = st.cache.lookup(base) == Some((folio, base)) && idle(f, true);
            if drop_it {
                uncache(&mut st, &mut slab, folio, base, nr);
                freed += nr;
            }
            drop(slab);
            drop(st);
            drop(lock);
            if drop_it {
                inner
                    .swap_counters
                    .cache_dropped_pages
                    .fetch_add(nr, Relaxed);
                if let Some(r) = rmap.and_then(|r| inner.find_region(r.vm, r.region)) {
                    r.counters.swap.cache_dropped_pages.fetch_add(nr, Relaxed);
                }
            }
        }
        inner.put_folio(folio, 1);
    }
    freed
}

/// Kept clean pages a VM's recent history counts before it decides.
const CLEAN_MIN_HISTORY: u32 = 64;
/// The history halves every this many kept pages.
const CLEAN_DECAY: u32 = 1024;
/// While keeping does not pay, one read swapin in this many is kept, to
/// notice when it pays again.
const CLEAN_PROBE_EVERY: u32 = 16;

/// Whether a VM's read swapins are kept clean. Keeping one costs a WP
/// fault when the page is written soon after (a read-modify-write, where
/// the kernel needs no second fault: the hardware dirty bit tells it) and
/// saves a write when it is reclaimed unwritten. While three in four kept
/// pages of the VM's recent history were written, only one swapin in
/// [`CLEAN_PROBE_EVERY`] is kept. Analogue in spirit of the heuristics
/// around `should_try_to_free_swap()`.
#[derive(Debug, Default)]
pub(crate) struct CleanPolicy {
    kept: AtomicU32,
    dirtied: AtomicU32,
    probes: AtomicU32,
}

impl CleanPolicy {
    /// Whether to keep the next read swapin clean.
    fn should_keep(&self) -> bool {
        let (k, d) = (self.kept.load(Relaxed), self.dirtied.load(Relaxed));
        if k < CLEAN_MIN_HISTORY || d.saturating_mul(4) < k.saturating_mul(3) {
            return true;
        }
        self.probes
            .fetch_add(1, Relaxed)
            .is_multiple_of(CLEAN_PROBE_EVERY)
    }

    /// A read swapin was kept clean.
    fn kept(&self) {
        if self.kept.fetch_add(1, Relaxed) + 1 >= CLEAN_DECAY {
            // Racing updates may lose a count here; this is a heuristic.
            self.kept.store(CLEAN_DECAY / 2, Relaxed);
            self.dirtied.store(self.dirtied.load(Relaxed) / 2, Relaxed);
        }
    }

    /// A kept page was written.
    pub(crate) fn dirtied(&self) {
        self.dirtied.fetch_add(1, Relaxed);
    }
}

/// The first write to clean `folio` (a WP fault, or the write that maps a
/// sampled-out clean folio back): it stops being clean, its slot is
/// released, and the VM's policy and counters learn of it. Returns whether
/// it was clean.
///
/// # Context
/// The page-table lock of the folio's mapping is held.
pub(crate) fn clean_folio_written(inner: &Inner, region: &Region, folio: FolioId) -> bool {
    if !inner.clear_clean(folio) {
        return false;
    }
    region.counters.clean_policy.dirtied();
    both(inner, region, |c| {
        c.clean_dirtied_pages.fetch_add(1, Relaxed)
    });
    true
}

/// After the swapin of an order-0 `folio` from `base`, mapped
/// write-protected: take it out of the swap cache but keep the slot's
/// count, which passes from the swap entry to the folio, and mark it
/// [`FolioFlags::CLEAN`].
///
/// # Context
/// Folio lock and the page-table lock of its mapping held.
fn keep_slot_clean(inner: &Inner, dev: &SwapDevice, folio: FolioId, base: SwapSlot) {
    if let Err(e) = dev.lock().delete_from_swap_cache(base, 1) {
        log_error(&format!("swapin keep clean: {e}"));
    }
    let freed = {
        let mut slab = inner.folios.slab();
        let f = slab.live(folio);
        debug_assert_eq!(f.swap, Some(base));
        f.flags.remove(FolioFlags::SWAPCACHE);
        f.flags.remove(FolioFlags::REFAULTED);
        f.flags.insert(FolioFlags::CLEAN);
        slab.put_refs(folio, 1)
    };
    debug_assert!(freed.is_none(), "the caller still holds a reference");
}

/// Choose the swapin order at `idx` (entry `Swap(slot)`): the largest order
/// whose aligned range is inside the table, holds contiguous aligned slots
/// in order, and that the VM's readahead state allows. Analogue of
/// `alloc_swap_folio()` + `can_swapin_thp()`, with the window of
/// `swap_vma_readahead()` deciding how far to go.
fn choose_swapin_order(
    ptl: &PtlGuard<'_>,
    region: &Region,
    idx: PageIndex,
    slot: SwapSlot,
) -> Order {
    let max = region.readahead_order(idx);
    Order::all()
        .rev()
        .filter(|o| *o <= max)
        .find(|&o| {
            let first = idx.align_down(o);
            let k = idx.0 - first.0;
            let Some(base) = slot.0.checked_sub(k as u32) else {
                return false;
            };
            (base as u64).is_multiple_of(o.nr_pages())
                && first >= ptl.first()
                && first.forward(o.nr_pages()) <= ptl.end()
                && ptl.range_is(first, o.nr_pages(), Pte::swap(SwapSlot(base)))
        })
        .unwrap_or(Order::BASE)
}

/// Take a block for a swapin: any state will do, as the read overwrites
/// it, and a block holding old data is best (no zeroing was wasted on it).
fn alloc_swapin_block(inner: &Inner, order: Order) -> Option<Block> {
    let mut buddy = inner.buddy();
    inner.check_watermark(buddy.nr_free());
    [
        BlockState::NeedsZero,
        BlockState::NeedsPopulate,
        BlockState::Ready,
    ]
    .into_iter()
    .find_map(|s| buddy.alloc(order, s))
}

/// Steps 2 and 3 of the module docs.
fn swapin_read(
    inner: &Inner,
    dev: &SwapDevice,
    region: &Region,
    idx: PageIndex,
    slot: SwapSlot,
    write: bool,
) -> FaultOutcome {
    let order = {
        let ptl = region.pt.lock(idx);
        if ptl.is_dead() {
            return FaultOutcome::Dead;
        }
        if ptl.pte(idx) != Pte::swap(slot) {
            return FaultOutcome::Retry;
        }
        // Small while the VM reclaims its own memory to fault, as a first
        // touch is (`Inner::own_reclaim_recent`).
        match inner.own_reclaim_recent(&region.counters) {
            true => Order::BASE,
            false => choose_swapin_order(&ptl, region, idx, slot),
        }
    };
    let mut want = order;
    let (folio, block, base, slots_plentiful) = loop {
        let Some((order, block)) = Order::all()
            .rev()
            .filter(|o| *o <= want)
            .find_map(|o| alloc_swapin_block(inner, o).map(|b| (o, b)))
        else {
            return FaultOutcome::NoMemory { oom: true };
        };
        // A hole the read below fills: see `Inner::anchor_pool_table`. (A
        // block that held data has its pages, and so its table.)
        if order < Order::PMD && block.state == BlockState::NeedsPopulate {
            inner.anchor_pool_table(block.offset);
        }
        let first = idx.align_down(order);
        let base = SwapSlot(slot.0 - (idx.0 - first.0) as u32);
        let nr = order.nr_pages();
        // The folio is created and put in the swap cache under the swap
        // lock and the folio-table lock together: if another faulter owns
        // the slots, its record goes again before anyone (compaction looks
        // folios up by id) could have seen it. Whether slots are plentiful
        // (`!vm_swap_full()`) is looked at under the same swap lock, and so
        // is whether our own slot is the one cached.
        let (folio, plentiful, ours_cached) = {
            let mut st = dev.lock();
            let plentiful = st.map.nr_free() * 2 >= st.map.nr_slots();
            let mut slab = inner.folios.slab();
            let folio = new_swapin_folio(&mut slab, region, first, block, base);
            match st.swapcache_prepare(base, nr, folio) {
                true => (Some(folio), plentiful, false),
                false => {
                    slab.live(folio).flags.remove(FolioFlags::LOCKED);
                    slab.remove(folio);
                    (None, plentiful, st.cache.lookup(slot).is_some())
                }
            }
        };
        if let Some(folio) = folio {
            region.readahead_done(idx, order);
            break (folio, block, base, plentiful);
        }
        if let Err(e) = inner.buddy().free(block.offset, block.order, block.state) {
            log_error(&format!("swapin abandon: {e}"));
        }
        if order == Order::BASE || ours_cached {
            // Another faulter owns our slot: the next look finds its folio
            // in the swap cache and sleeps on its lock.
            return FaultOutcome::Retry;
        }
        // Only neighbours' slots are cached (a swapin or writeback of a
        // folio beside ours): read our page alone, as
        // `non_swapcache_batch()` makes `do_swap_page()` do, instead of
        // retrying the same large range.
        both(inner, region, |c| {
            c.swapin_fallback_order0.fetch_add(1, Relaxed)
        });
        want = Order::BASE;
    };
    let (order, nr) = (block.order, block.order.nr_pages());
    let first = idx.align_down(order);
    let lock = inner.folios.assume_locked(folio);
    // Place the markers, unless the entries changed since we looked.
    let placed = {
        let mut ptl = region.pt.lock(first);
        let ok = !ptl.is_dead() && ptl.range_is(first, nr, Pte::swap(base));
        if ok {
            ptl.set_range(first, nr, Pte::new(PteState::SwapinMarker { folio }));
        }
        ok
    };
    if !placed {
        release_swap(inner, dev, folio, base, &[0; 8]);
        drop(lock);
        inner.put_folio(folio, 1);
        return FaultOutcome::Retry;
    }
    let bad = read_folio(inner, dev, region, block.offset, base, nr);
    // A single page read for a read access stays clean: mapped
    // write-protected, it keeps its slot until written or dropped. Not
    // when slots run short (`vm_swap_full()`), nor while the VM writes
    // most pages it reads.
    let keep_clean = !write
        && order == Order::BASE
        && slots_plentiful
        && region.counters.clean_policy.should_keep();
    let (mapped, poisoned) = {
        let mut ptl = region.pt.lock(first);
        let marker = Pte::new(PteState::SwapinMarker { folio });
        let marked = entries_mask(&ptl, first, nr, |_| marker);
        let good: PageMask = std::array::from_fn(|w| marked[w] & !bad[w]);
        let poison: PageMask = std::array::from_fn(|w| marked[w] & bad[w]);
        // The folio leaves the swap cache before the install wakes the
        // faulting threads. Kept clean, it owns its slot; otherwise every
        // marker's slot reference goes: mapped, poisoned or removed by a
        // discard, the entry that named the slot is gone. Under the
        // page-table lock, so that a WP fault (which needs it) sees the
        // folio clean only once it owns the slot.
        let settle = || {
            match keep_clean {
                true => keep_slot_clean(inner, dev, folio, base),
                false => release_swap(inner, dev, folio, base, &full_mask(nr)),
            }
            let n_good = (0..nr).filter(|&k| mask_test(&good, k)).count() as u64;
            both(inner, region, |c| {
                c.swapin_file_folios.fetch_add(1, Relaxed);
                c.swapin_file_pages.fetch_add(n_good, Relaxed);
            });
        };
        let clean = map_folio_pages(
            inner,
            region,
            &mut ptl,
            (folio, first),
            &good,
            keep_clean,
            settle,
        );
        if keep_clean && !clean {
            // Not mapped (bad or discarded) or not write-protected.
            inner.clear_clean(folio);
        }
        poison_pages(inner, region, &mut ptl, first, nr, &poison);
        if clean {
            region.counters.clean_policy.kept();
            both(inner, region, |c| c.clean_kept_pages.fetch_add(1, Relaxed));
        }
        (good, poison)
    };
    drop(lock);
    inner.put_folio(folio, 1);
    let k = idx.0 - first.0;
    if mask_test(&mapped, k) {
        FaultOutcome::Refaulted
    } else if mask_test(&poisoned, k) {
        FaultOutcome::Poisoned
    } else {
        FaultOutcome::Retry
    }
}

/// A new folio for a swapin: born locked and in the swap cache (its
/// references: ours and the cache's), mapped nowhere yet.
fn new_swapin_folio(
    slab: &mut crate::folio::FolioSlab,
    region: &Region,
    first: PageIndex,
    block: Block,
    base: SwapSlot,
) -> FolioId {
    let mut flags = FolioFlags::default();
    flags.insert(FolioFlags::LOCKED);
    flags.insert(FolioFlags::SWAPCACHE);
    // Read for a fault, whose access is still to come.
    flags.insert(FolioFlags::REFERENCED);
    slab.insert(Folio {
        flags,
        refcount: 2,
        rmap: Some(Rmap {
            vm: region.vm,
            region: region.index,
            index: first,
            mapped: (0, 0),
        }),
        pool_state: BlockState::NeedsZero,
        swap: Some(base),
        ..Folio::new(block.offset, block.order)
    })
}

/// Read `nr` slots from `base` into the pool at `pool`; returns the pages
/// that must not be mapped (all of them on an I/O error).
///
/// # Context
/// Folio lock held; no page-table lock.
fn read_folio(
    inner: &Inner,
    dev: &SwapDevice,
    region: &Region,
    pool: PoolOffset,
    base: SwapSlot,
    nr: u64,
) -> PageMask {
    let crcs: Vec<u32> = {
        let st = dev.lock();
        (0..nr).map(|k| st.map.crc(base.forward(k))).collect()
    };
    // SAFETY: the pool range belongs to the locked folio we just allocated;
    // its pages are in the pool (mapped into no guest), and this is the only
    // slice of it until the read returns.
    let buf = unsafe { inner.pool.pages_mut(pool, nr) };
    match dev.file.read(base, buf, &crcs) {
        Ok(()) => [0; 8],
        Err(e) => {
            log_error(&format!(
                "swapin of vm {:?} at slot {}: {e}",
                region.vm, base.0
            ));
            both(inner, region, |c| c.read_errors.fetch_add(1, Relaxed));
            match e {
                SwapIoError::Checksum { bad, .. } => {
                    let mut m = [0u64; 8];
                    bad.iter()
                        .for_each(|&k| m[(k / 64) as usize] |= 1 << (k % 64));
                    m
                }
                _ => full_mask(nr),
            }
        }
    }
}

/// Poison the guest pages of `mask` (their contents are lost): the guest
/// gets `SIGBUS`/`-EHWPOISON` on access instead of wrong data.
///
/// # Context
/// Page-table lock held; the entries are our swapin markers.
fn poison_pages(
    inner: &Inner,
    region: &Region,
    ptl: &mut PtlGuard<'_>,
    first: PageIndex,
    nr: u64,
    mask: &PageMask,
) {
    for k in (0..nr).filter(|&k| mask_test(mask, k)) {
        let idx = first.forward(k);
        ptl.set_pte(idx, Pte::new(PteState::Poisoned));
        let addr = region.host_addr(idx).raw();
        // SAFETY: a guest page under the page-table lock we hold, whose
        // entry was our swapin marker (a hole) and whose data could not be
        // read intact: its accesses must get a memory error.
        if let Err(e) = unsafe { inner.uffd.poison(addr, PAGE_SIZE) } {
            log_error(&format!("UFFDIO_POISON at {addr:#x}: errno {}", e.errno));
        }
        both(inner, region, |c| {
            c.poisoned_pages.fetch_add(1, Relaxed);
            c.swapped_pages.fetch_sub(1, Relaxed);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_policy_backs_off_when_kept_pages_get_written_and_probes() {
        let p = CleanPolicy::default();
        // Until the history is long enough, every read swapin is kept.
        for _ in 0..CLEAN_MIN_HISTORY {
            assert!(p.should_keep());
            p.kept();
            p.dirtied();
        }
        // Every kept page was written: one in CLEAN_PROBE_EVERY is kept.
        let kept = (0..160).filter(|_| p.should_keep()).count() as u32;
        assert_eq!(kept, 160 / CLEAN_PROBE_EVERY);
        // Kept pages that stay clean bring it back.
        for _ in 0..3 * CLEAN_MIN_HISTORY {
            p.kept();
        }
        assert!(p.should_keep());
    }
}
