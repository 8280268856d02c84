//! Folio migration: move a folio's contents to another pool block while
//! the guest runs. Analogue of `migrate_pages()` / `migrate_folio()`.
//!
//! For a mapped folio `f` (DESIGN §4.8), with `f` locked:
//! 1. take the target block (the caller allocates it);
//! 2. under the page-table lock, move `f`'s present pages out of the guest
//!    to `f`'s pool range (the atomic unmap) and set every entry to
//!    `Migration(f)`; drop the page-table lock;
//! 3. copy the pool pages to the target with no page-table lock held
//!    (faulters on the range sleep on `f`'s lock meanwhile);
//! 4. under the page-table lock again, create the new folio record with
//!    `f`'s rmap, flags and LRU generation, move it into the guest, set
//!    the entries `Present` (or `ProtNone` for pages that were sampled
//!    out), drop `f`'s mapping; unlock `f`, whose waiters retry and find
//!    the new folio. `f` is freed with its last reference.
//!
//! An unmapped swap-cache folio (a refault is waiting for it) is copied and
//! the swap cache's pointer is moved to the new folio under the swap lock,
//! as `folio_migrate_mapping()` does for the swap address space.
//!
//! Every failure after step 2 moves `f` back in and restores the entries
//! exactly as they were. Pinned and partially mapped folios are skipped.
//!
//! # Context
//! The caller holds a reference and the folio lock of the source, and no
//! page-table lock. Lock order as in the crate docs.

use crate::buddy::{Block, BlockState, Buddy};
use crate::fault::move_in;
use crate::folio::{Folio, FolioFlags, FreedRange};
use crate::inject::FaultPoint;
use crate::manager::Inner;
use crate::pte::{Pte, PteState};
use crate::rmap::{self, mask_test, PageMask, Rmap};
use crate::types::{FolioId, Order, PoolOffset, PAGE_SIZE};
use crate::vm::{log_error, Region};
use crate::vmscan::move_out;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// Why a folio was not migrated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrateError {
    /// Pinned for device access (`folio_maybe_dma_pinned()`).
    Pinned,
    /// Locked by someone else, or its entries are changing.
    Busy,
    /// Partially mapped (waiting for deferred split).
    Partial,
    /// Neither fully mapped nor an idle swap-cache folio, or its VM is gone.
    Unmovable,
    /// No target block.
    NoMemory,
    /// A step failed (injected); everything was restored.
    Failed(FaultPoint),
}

/// Take a block of `order` to migrate into: any state will do, since the
/// copy overwrites every page, so the smallest free block that fits is
/// taken (holes first); a 2 MiB folio prefers a `Ready` block, which is one
/// THP in the pool and keeps it PMD-mapped.
///
/// # Context
/// No lock held; takes the zone lock.
pub(crate) fn alloc_target(inner: &Inner, order: Order) -> Option<Block> {
    if inner.inject.hit(FaultPoint::MigrateAlloc) {
        return None;
    }
    let mut buddy = inner.buddy();
    if order == Order::PMD {
        if let Some(b) = buddy.alloc(order, BlockState::Ready) {
            return Some(b);
        }
    }
    buddy.alloc_smallest(order)
}

/// Copy `nr` pool pages from `src` to `dst`.
///
/// # Safety
/// Both ranges are owned by the caller for the duration: `src` belongs to a
/// locked folio whose pages all sit in the pool (unmapped from the guest),
/// `dst` to a block or new folio nobody else can reach; they do not overlap.
pub(crate) unsafe fn copy_pool(inner: &Inner, src: PoolOffset, dst: PoolOffset, nr: u64) {
    let t0 = std::time::Instant::now();
    if nr < Order::PMD.nr_pages() {
        inner.anchor_pool_table(dst);
    }
    // SAFETY: see the function contract; both ranges lie inside the pool
    // mapping (folio and block ranges are pool ranges).
    unsafe {
        std::ptr::copy_nonoverlapping(
            inner.pool.host_addr(src).as_ptr(),
            inner.pool.host_addr(dst).as_ptr(),
            (nr * PAGE_SIZE) as usize,
        );
    }
    let w = &inner.workers;
    w.migrate_copy_bytes.fetch_add(nr * PAGE_SIZE, Relaxed);
    w.migrate_copy_ns
        .fetch_add(t0.elapsed().as_nanos() as u64, Relaxed);
}

/// Migrate the locked folio `id` into `target` (same order). Returns the
/// new folio; on any error `target` has been freed and `id` is unchanged.
pub(crate) fn migrate_locked(
    inner: &Inner,
    id: FolioId,
    target: Block,
) -> Result<FolioId, MigrateError> {
    let r = migrate_inner(inner, id, target);
    match r {
        Ok(_) => inner.workers.migrate_success.fetch_add(1, Relaxed),
        Err(MigrateError::Pinned) => inner.workers.migrate_skipped_pinned.fetch_add(1, Relaxed),
        Err(_) => inner.workers.migrate_failed.fetch_add(1, Relaxed),
    };
    r
}

fn free_target(inner: &Inner, target: Block) {
    inner.free_range(unused_target(target));
}

fn migrate_inner(inner: &Inner, id: FolioId, target: Block) -> Result<FolioId, MigrateError> {
    let (f_order, rmap, kind) = {
        let slab = inner.folios.slab();
        let f = slab.get(id).expect("the caller holds a reference");
        debug_assert!(f.flags.contains(FolioFlags::LOCKED));
        let kind = if f.pincount > 0 {
            Err(MigrateError::Pinned)
        } else if f.page_mapped.is_some() {
            Err(MigrateError::Partial)
        } else if f.mapcount as u64 == f.nr_pages() && !f.flags.contains(FolioFlags::SWAPCACHE) {
            match f.flags.contains(FolioFlags::LRU) {
                true => Ok(true),
                // Off the LRU, a mapped folio is isolated by reclaim, which
                // owns it until it puts it back (`folio_isolate_lru()`
                // failing): its replacement would never get onto the LRU.
                false => Err(MigrateError::Busy),
            }
        } else if f.mapcount == 0
            && f.flags.contains(FolioFlags::SWAPCACHE)
            && !f.flags.contains(FolioFlags::WRITEBACK)
            && f.refcount == 2
        {
            // Only the cache's reference and ours: a refaulter holding one
            // is waiting to map this very folio and take it out of the
            // cache, and must find it there.
            Ok(false)
        } else {
            Err(MigrateError::Unmovable)
        };
        (f.order, f.rmap, kind)
    };
    debug_assert_eq!(f_order, target.order);
    let mapped = match kind {
        Ok(m) => m,
        Err(e) => {
            free_target(inner, target);
            return Err(e);
        }
    };
    let region = rmap.and_then(|r| inner.find_region(r.vm, r.region));
    let r = match (mapped, region, rmap) {
        (true, Some(region), Some(rmap)) => migrate_mapped(inner, &region, id, rmap, target),
        (false, _, _) => {
            inner.clear_clean(id);
            migrate_swapcache(inner, id, target)
        }
        _ => Err(MigrateError::Unmovable),
    };
    if r.is_err() {
        free_target(inner, target);
    }
    r
}

/// Pages of `id` at `first..` that are present in the guest (the rest are
/// sampled out to the pool), or `None` if an entry is neither.
fn guest_mask(
    ptl: &crate::pte::PtlGuard<'_>,
    id: FolioId,
    first: crate::PageIndex,
    nr: u64,
) -> Option<PageMask> {
    let mut m = [0u64; 8];
    for k in 0..nr {
        let p = ptl.pte(first.forward(k));
        if p == Pte::present(id, k) {
            m[(k / 64) as usize] |= 1 << (k % 64);
        } else if p != Pte::prot_none(id, k) {
            return None;
        }
    }
    Some(m)
}

/// Runs `(first subpage, pages)` of set bits of `mask` below `nr`.
pub(crate) fn runs(mask: &PageMask, nr: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut k = 0;
    while k < nr {
        if !mask_test(mask, k) {
            k += 1;
            continue;
        }
        let n = (k..nr).take_while(|&j| mask_test(mask, j)).count() as u64;
        out.push((k, n));
        k += n;
    }
    out
}

/// Set entries `first + k` to `present(k)` where `in_guest` has bit k and
/// `prot_none(k)` elsewhere, moving the guest pages in from `pool`.
///
/// # Context
/// Page-table lock held; the folio owning `pool` is locked or new.
fn map_back(
    inner: &Inner,
    region: &Region,
    ptl: &mut crate::pte::PtlGuard<'_>,
    (folio, pool): (FolioId, PoolOffset),
    first: crate::PageIndex,
    nr: u64,
    in_guest: &PageMask,
) {
    ptl.set_range(first, nr, Pte::prot_none(folio, 0));
    for (k, n) in runs(in_guest, nr) {
        ptl.set_range(first.forward(k), n, Pte::present(folio, k));
        move_in(inner, region, first.forward(k), pool.subpage(k), n, false);
    }
}

fn migrate_mapped(
    inner: &Inner,
    region: &Region,
    id: FolioId,
    rmap: Rmap,
    target: Block,
) -> Result<FolioId, MigrateError> {
    let (first, nr) = (rmap.index, target.order.nr_pages());
    let pool = inner.folios.slab().live(id).pool;
    let mut ptl = region.pt.lock(first);
    if ptl.is_dead() {
        return Err(MigrateError::Unmovable);
    }
    // A pin needs only the page-table lock: one taken since
    // `migrate_inner` looked would keep pointing at the old folio.
    if inner.folios.slab().live(id).pincount > 0 {
        return Err(MigrateError::Pinned);
    }
    let in_guest = guest_mask(&ptl, id, first, nr).ok_or(MigrateError::Busy)?;
    if inner.inject.hit(FaultPoint::MigrateUnmap) {
        return Err(MigrateError::Failed(FaultPoint::MigrateUnmap));
    }
    // The target's pages (or, on undo, the old ones) go back into the
    // guest by MOVE, which does not keep the write protection of a clean
    // folio: from here it stops being clean. A refusal above left it as
    // it was. (`clear_clean` takes only the folio-table lock and a leaf
    // lock, which nest below the page-table lock.)
    inner.clear_clean(id);
    // Step 2: the atomic unmap.
    let mut out: PageMask = [0; 8];
    for (k, n) in runs(&in_guest, nr) {
        let moved = move_out(inner, region, first.forward(k), pool.subpage(k), n);
        (k..k + moved).for_each(|j| out[(j / 64) as usize] |= 1 << (j % 64));
        if moved < n {
            // Put back what moved; the entries never changed.
            for (j, m) in runs(&out, nr) {
                move_in(inner, region, first.forward(j), pool.subpage(j), m, false);
            }
            return Err(MigrateError::Failed(FaultPoint::MigrateUnmap));
        }
    }
    ptl.set_range(first, nr, Pte::new(PteState::Migration { folio: id }));
    if target.order == Order::PMD {
        // Free the now empty PTE table of a PTE-mapped 2 MiB range (see
        // `compact`), so that the target moves in as one PMD.
        // SAFETY: a 2 MiB range of the region's guest mapping whose entries
        // are all `Migration` under the page-table lock we hold, its pages
        // just moved out: nothing is there to lose, and guest memory is
        // never borrowed by Rust code.
        let _ = unsafe {
            crate::sys::dontneed(region.host_addr(first).raw(), Order::PMD.bytes() as usize)
        };
    }
    drop(ptl);

    // Step 3: copy, no page-table lock.
    let copy_failed = inner.inject.hit(FaultPoint::MigrateCopy);
    if !copy_failed {
        // SAFETY: `id` is locked and all its pages are in its pool range
        // (entries are `Migration`, so no fault moves them back); `target`
        // was allocated for this call and is reachable by nobody else.
        unsafe { copy_pool(inner, pool, target.offset, nr) };
    }

    // Step 4: remap (or undo).
    let mut ptl = region.pt.lock(first);
    if ptl.is_dead() {
        // Torn down meanwhile: teardown skipped our entries, so drop the
        // mapping the folio still counts.
        let freed = {
            let mut slab = inner.folios.slab();
            rmap::remove_rmap_ptes(&mut slab, &ptl, id, 0, nr, BlockState::NeedsZero).freed
        };
        debug_assert!(freed.is_none(), "the caller holds a reference");
        region.counters.resident(target.order, -(nr as i64));
        return Err(MigrateError::Unmovable);
    }
    debug_assert!(ptl.range_is(first, nr, Pte::new(PteState::Migration { folio: id })));
    if copy_failed || inner.inject.hit(FaultPoint::MigrateRemap) {
        map_back(inner, region, &mut ptl, (id, pool), first, nr, &in_guest);
        let point = match copy_failed {
            true => FaultPoint::MigrateCopy,
            false => FaultPoint::MigrateRemap,
        };
        return Err(MigrateError::Failed(point));
    }
    let new = {
        let mut slab = inner.folios.slab();
        let old = slab.live(id);
        let mut flags = old.flags;
        for f in [
            FolioFlags::LOCKED,
            FolioFlags::LRU,
            FolioFlags::DEFERRED_SPLIT,
            FolioFlags::PINNED,
        ] {
            flags.remove(f);
        }
        let new = slab.insert(Folio {
            flags,
            refcount: nr as u32,
            mapcount: nr as u32,
            rmap: Some(Rmap {
                mapped: (0, nr as u16),
                ..rmap
            }),
            ..Folio::new(target.offset, target.order)
        });
        slab.lru_replace(id, new);
        let r = rmap::remove_rmap_ptes(&mut slab, &ptl, id, 0, nr, BlockState::NeedsZero);
        debug_assert!(r.freed.is_none(), "the caller holds a reference");
        new
    };
    map_back(
        inner,
        region,
        &mut ptl,
        (new, target.offset),
        first,
        nr,
        &in_guest,
    );
    Ok(new)
}

fn migrate_swapcache(inner: &Inner, id: FolioId, target: Block) -> Result<FolioId, MigrateError> {
    let Some(dev) = inner.swap.as_ref() else {
        return Err(MigrateError::Unmovable);
    };
    let nr = target.order.nr_pages();
    let pool = inner.folios.slab().live(id).pool;
    if inner.inject.hit(FaultPoint::MigrateCopy) {
        return Err(MigrateError::Failed(FaultPoint::MigrateCopy));
    }
    // SAFETY: `id` is locked, unmapped and not under I/O (WRITEBACK clear
    // under its lock), so its pages sit in its pool range untouched;
    // `target` is ours alone.
    unsafe { copy_pool(inner, pool, target.offset, nr) };
    if inner.inject.hit(FaultPoint::MigrateRemap) {
        return Err(MigrateError::Failed(FaultPoint::MigrateRemap));
    }
    let mut st = dev.lock();
    let mut slab = inner.folios.slab();
    let old = slab.live(id);
    let Some(base) = old.swap else {
        return Err(MigrateError::Unmovable);
    };
    let mut flags = FolioFlags::default();
    for f in [
        FolioFlags::SWAPCACHE,
        FolioFlags::REFAULTED,
        FolioFlags::EXCLUSIVE,
    ] {
        if old.flags.contains(f) {
            flags.insert(f);
        }
    }
    let rmap = old.rmap;
    let new = slab.insert(Folio {
        flags,
        refcount: 1, // the swap cache's reference
        rmap,
        pool_state: BlockState::NeedsZero,
        swap: Some(base),
        ..Folio::new(target.offset, target.order)
    });
    if !st.cache.replace_folio(base, id, new) {
        let f = slab.remove(new);
        debug_assert_eq!(f.pool, target.offset);
        return Err(MigrateError::Busy);
    }
    let old = slab.live(id);
    old.swap = None;
    old.flags.remove(FolioFlags::SWAPCACHE);
    old.flags.remove(FolioFlags::REFAULTED);
    old.pool_state = BlockState::NeedsZero;
    let freed = slab.put_refs(id, 1);
    debug_assert!(freed.is_none(), "the caller holds a reference");
    inner.workers.migrate_swapcache.fetch_add(1, Relaxed);
    Ok(new)
}

/// Migrate the folios `ids` of a group of pageblocks for compaction (listed
/// by the caller without a reference: one may have been freed since). A
/// fully mapped small folio whose pages are all in the guest has no data
/// in the pool: its pages live at the guest address and its pool range is
/// a hole.
/// Moving it to another pool range needs no unmap and no copy, only its
/// record's pool range changes, to a range made a hole first; the targets
/// of the whole batch are made holes with one `process_madvise`, so the
/// TLB flushes are batched too. Anything else (a 2 MiB folio, whose block
/// should stay one THP; pages sampled out to the pool; a swap-cache folio)
/// is copied (`migrate_referenced`). The targets of the relabelled folios
/// come from `target(buddy, order)` (compaction's free scanner). Returns
/// per folio the new id or why not.
///
/// # Context
/// No locks held; `target` runs under the zone lock.
pub(crate) fn migrate_batch_for_compaction(
    inner: &Inner,
    ids: &[FolioId],
    target: &mut dyn FnMut(&mut Buddy, Order) -> Option<Block>,
) -> Vec<Result<FolioId, MigrateError>> {
    // One pass under the folio-table lock: the small folios still alive
    // (their ids may even name other folios now, which `relabel` checks
    // like any other), each with a reference.
    let orders: Vec<Option<Order>> = {
        let mut slab = inner.folios.slab();
        ids.iter()
            .map(|&id| {
                let order = slab.get(id)?.order;
                slab.get_ref(id);
                Some(order)
            })
            .collect()
    };
    // Targets for the small ones, in one pass under the zone lock.
    let targets: Vec<Option<Block>> = {
        let injected: Vec<bool> = orders
            .iter()
            .map(|o| {
                o.is_some_and(|o| o < Order::PMD) && inner.inject.hit(FaultPoint::MigrateAlloc)
            })
            .collect();
        let mut buddy = inner.buddy();
        orders
            .iter()
            .zip(injected)
            .map(|(o, hit)| match o {
                Some(o) if *o < Order::PMD && !hit => target(&mut buddy, *o),
                _ => None,
            })
            .collect()
    };
    // Made holes together: one flush for the batch.
    let ranges: Vec<(usize, usize)> = targets
        .iter()
        .flatten()
        .map(|t| {
            (
                inner.pool.host_addr(t.offset).raw(),
                t.order.bytes() as usize,
            )
        })
        .collect();
    // SAFETY: pool ranges of blocks just allocated for this call (free
    // ranges have no stale copy queued: `free_range` made them holes), so
    // nothing else reaches them and no slice covers them.
    let holes = match unsafe { crate::sys::dontneed_many(&ranges) } {
        Ok(()) => true,
        Err(e) => {
            log_error(&format!("compaction: dontneed of targets: {e}"));
            false
        }
    };
    let mut freed: Vec<FreedRange> = Vec::new();
    let mut regions: Vec<Arc<Region>> = Vec::new();
    let out = ids
        .iter()
        .zip(orders)
        .zip(targets)
        .map(|((&id, order), target)| {
            if order.is_none() {
                if let Some(t) = target {
                    freed.push(unused_target(t));
                }
                return Err(MigrateError::Unmovable);
            }
            let r = match target.filter(|_| holes) {
                Some(t) => match relabel(inner, id, t, &mut regions) {
                    Some((r, old)) => {
                        freed.push(old);
                        Ok(r)
                    }
                    None => {
                        freed.push(unused_target(t));
                        migrate_referenced(inner, id)
                    }
                },
                None => {
                    if let Some(t) = target {
                        freed.push(unused_target(t));
                    }
                    migrate_referenced(inner, id)
                }
            };
            inner.put_folio(id, 1);
            r
        })
        .collect();
    // The old ranges (parked in the isolated pageblock) and unused targets
    // go back under one zone lock.
    inner.free_ranges(&freed);
    out
}

/// A target left unused goes back with whatever the pool holds there.
fn unused_target(t: Block) -> FreedRange {
    FreedRange {
        pool: t.offset,
        order: t.order,
        state: BlockState::NeedsZero,
        clean_slot: None,
    }
}

/// Re-label `id`'s pool range to `target` (a hole of its order); returns
/// the folio and its old range, for the caller to free, or `None` when the
/// folio must be copied instead (the caller keeps `target`). The caller
/// holds a reference. `regions` caches the regions looked up so far in the
/// batch (a region torn down meanwhile has its tables dead).
fn relabel(
    inner: &Inner,
    id: FolioId,
    target: Block,
    regions: &mut Vec<Arc<Region>>,
) -> Option<(FolioId, FreedRange)> {
    let _lock = inner.folios.trylock(id)?;
    let (nr, pool, rmap) = {
        let slab = inner.folios.slab();
        let f = slab.get(id)?;
        if f.pincount > 0 {
            return None;
        }
        let whole = f.page_mapped.is_none()
            && f.mapcount as u64 == f.nr_pages()
            && f.order == target.order
            && !f.flags.contains(FolioFlags::SWAPCACHE);
        if !whole {
            return None;
        }
        (f.nr_pages(), f.pool, f.rmap?)
    };
    let region = match regions
        .iter()
        .find(|r| r.vm == rmap.vm && r.index == rmap.region)
    {
        Some(r) => r.clone(),
        None => {
            let r = inner.find_region(rmap.vm, rmap.region)?;
            regions.push(r.clone());
            r
        }
    };
    // The page-table lock orders this against discard, which reads the
    // pool range under it without the folio lock.
    let ptl = region.pt.lock(rmap.index);
    // A `Present` entry whose install failed (`stranded`, recorded and
    // forgotten under this lock) has its data in the old range, not in
    // the guest: re-labelled, the folio would name a hole there, the old
    // range would be freed (and zeroed), and the page's next access
    // poisoned. Such a folio is copied instead (whose unmap fails on the
    // page and leaves it as it is) until that access restores it.
    let in_guest = !ptl.is_dead()
        && (0..nr).all(|k| ptl.pte(rmap.index.forward(k)) == Pte::present(id, k))
        && !inner.stranded.holds(pool, nr);
    if !in_guest {
        return None;
    }
    let old = {
        let mut slab = inner.folios.slab();
        let f = slab.get_mut(id)?;
        // The old range is a hole (or zero where a drop failed, see
        // `Pool::drop_or_zero`) unless its state says it holds data: free
        // it as no better than it is, so that data is zeroed, never handed
        // on. (A MOVE that met a populated guest page once left a folio's
        // data there; `fault::fallback_page` drops it now.)
        let old = (f.pool, f.order, f.pool_state.max(BlockState::NeedsPopulate));
        f.pool = target.offset;
        f.pool_state = BlockState::NeedsPopulate;
        old
    };
    drop(ptl);
    let w = &inner.workers;
    w.migrate_success.fetch_add(1, Relaxed);
    w.migrate_relabelled.fetch_add(1, Relaxed);
    Some((
        id,
        FreedRange {
            pool: old.0,
            order: old.1,
            state: old.2,
            clean_slot: None,
        },
    ))
}

/// Migrate folio `id` to a newly allocated block: take a reference and the
/// folio lock (by trylock: compaction must not wait behind swap I/O).
///
/// # Context
/// No locks held.
pub(crate) fn migrate_folio(inner: &Inner, id: FolioId) -> Result<FolioId, MigrateError> {
    {
        let mut slab = inner.folios.slab();
        if slab.get(id).is_none() {
            return Err(MigrateError::Unmovable);
        }
        slab.get_ref(id);
    }
    let r = migrate_referenced(inner, id);
    inner.put_folio(id, 1);
    r
}

/// [`migrate_folio`] for a caller that holds a reference on `id` already.
/// Exactly one: an unmapped swap-cache folio moves only when the cache's
/// reference and this one are all there is (see `migrate_inner`), so a
/// second reference of the caller's would make it unmovable.
fn migrate_referenced(inner: &Inner, id: FolioId) -> Result<FolioId, MigrateError> {
    let lock = inner.folios.trylock(id).ok_or(MigrateError::Busy)?;
    // Read under the folio lock: a split (which holds it) may have cut the
    // folio since the caller found it, and a target of the order before
    // the split would not match.
    let order = inner
        .folios
        .slab()
        .get(id)
        .expect("the caller holds a reference")
        .order;
    let target = alloc_target(inner, order).ok_or(MigrateError::NoMemory)?;
    let r = migrate_locked(inner, id, target);
    drop(lock);
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{GuestAddress, GuestMemoryBackend, MemoryManager, MmConfig};
    use std::time::Duration;

    const MIB: u64 = 1 << 20;

    /// A folio relabelled into a 2 MiB of pool with no page table (a free
    /// 2 MiB block that went to a guest as one PMD, split for targets):
    /// preparing the rest of that 2 MiB must not populate the folio's
    /// pool range, or its pages can never move out of the guest again.
    #[test]
    fn preparing_a_neighbour_leaves_a_relabelled_folios_pool_range_a_hole() {
        let mm = MemoryManager::new(MmConfig::with_budget(4 * MIB)).unwrap();
        assert!(mm.wait_idle(Duration::from_secs(30)));
        let inner = mm.inner();
        // A 2 MiB block whose pool range has no page table, as one moved
        // out to a guest as a PMD and freed there leaves it.
        let r = inner.buddy().alloc(Order::PMD, BlockState::Ready).unwrap();
        inner
            .pool
            .drop_pages(r.offset, Order::PMD.nr_pages())
            .unwrap();
        let vm = mm.create_vm("relabel").unwrap();
        let b = mm.backend(vm, &[(GuestAddress(0), 16 * 1024)]).unwrap();
        let base = b.regions()[0].host_addr.raw();
        for p in 0..4u64 {
            // SAFETY: a page of the live backend's guest RAM, which Rust
            // code never borrows; a handler thread serves the fault.
            unsafe { ((base + (p * PAGE_SIZE) as usize) as *mut u64).write_volatile(p + 7) };
        }
        let id = {
            let slab = inner.folios.slab();
            let ids: Vec<_> = slab.iter().map(|(id, f)| (id, f.order)).collect();
            assert_eq!(ids.len(), 1, "{ids:?}");
            ids[0].0
        };
        let order = inner.folios.slab().get(id).unwrap().order;
        assert_eq!(order, Order(2));
        // Relabelled into the first pages of the block, the rest freed.
        let target = Block {
            offset: r.offset,
            order,
            state: BlockState::NeedsPopulate,
        };
        let out = migrate_batch_for_compaction(inner, &[id], &mut |_, _| Some(target));
        assert_eq!(out, vec![Ok(id)]);
        let mut o = order;
        while o < Order::PMD {
            let at = r.offset.subpage(o.nr_pages());
            inner.free_range(unused_target(Block {
                offset: at,
                order: o,
                state: BlockState::NeedsPopulate,
            }));
            o = Order(o.0 + 1);
        }
        assert!(mm.wait_idle(Duration::from_secs(30)));
        let addr = inner.pool.host_addr(r.offset).raw();
        let present = crate::sys::has_pages(addr, order.nr_pages() as usize).unwrap();
        let migrated = migrate_folio(inner, id);
        assert_eq!(
            (present, migrated.is_ok()),
            (vec![false; 4], true),
            "the folio's pool range is a hole and it migrates: {migrated:?}"
        );
        for p in 0..4u64 {
            // SAFETY: as above.
            let v = unsafe { ((base + (p * PAGE_SIZE) as usize) as *const u64).read_volatile() };
            assert_eq!(v, p + 7);
        }
    }

    /// What a swapin read or a migration copy into a small block of a
    /// 2 MiB of pool with no page table does to the rest of that 2 MiB:
    /// with `Inner::anchor_pool_table` first, only the pages written
    /// appear; without it the kernel may fault in a whole THP (then every
    /// page of the 2 MiB appears, printed, not asserted: it depends on the
    /// host's THP setting).
    #[test]
    fn a_write_into_an_anchored_small_block_fills_only_that_block() {
        let mm = MemoryManager::new(MmConfig::with_budget(4 * MIB)).unwrap();
        assert!(mm.wait_idle(Duration::from_secs(30)));
        let inner = mm.inner();
        let r = inner.buddy().alloc(Order::PMD, BlockState::Ready).unwrap();
        let addr = inner.pool.host_addr(r.offset).raw();
        let nr = Order::PMD.nr_pages() as usize;
        // Pages 4..8 of the 2 MiB, as a block of order 2 there.
        let block = r.offset.subpage(4);
        let write = || {
            // SAFETY: pages of a block this test allocated and nobody else
            // can reach; no other slice of them exists.
            let buf = unsafe { inner.pool.pages_mut(block, 4) };
            buf[PAGE_SIZE as usize] = 1;
        };
        inner.pool.drop_pages(r.offset, nr as u64).unwrap();
        write();
        let unanchored = crate::sys::has_pages(addr, nr).unwrap();
        eprintln!(
            "without an anchor, a write into page 5 populated {} of {nr} pages",
            unanchored.iter().filter(|&&p| p).count()
        );
        inner.pool.drop_pages(r.offset, nr as u64).unwrap();
        inner.anchor_pool_table(block);
        write();
        let present = crate::sys::has_pages(addr, nr).unwrap();
        let want: Vec<bool> = (0..nr).map(|p| p == 4 || p == 5).collect();
        assert_eq!(present, want, "pages 4 (the anchor's zero page) and 5 only");
        inner.pool.drop_pages(r.offset, nr as u64).unwrap();
        inner.free_range(unused_target(r));
    }
}
