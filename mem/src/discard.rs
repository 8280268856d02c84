//! Discard of a guest range: what balloon inflation and free page reporting
//! call. Analogue of `zap_pte_range()` under `MADV_DONTNEED`.
//!
//! Each present run is moved back to its folio's pool range with
//! `UFFDIO_MOVE` (which unmaps it from the guest atomically; the pages stay
//! ours, and the pre-zeroing worker zeroes them in place, about three times
//! cheaper here than dropping them and faulting fresh THPs into the pool).
//! If the move fails (a transient kernel pin makes it `EBUSY`), the guest
//! range is dropped with `MADV_DONTNEED` instead, counted. The entries become
//! `None`, mapcounts drop, fully unmapped folios are freed, and partially
//! unmapped large folios are queued for deferred split.

use crate::buddy::BlockState;
use crate::manager::Inner;
use crate::pte::{Pte, PteState, PtlGuard};
use crate::rmap;
use crate::sys;
use crate::sys::userfaultfd::MOVE_MODE_ALLOW_SRC_HOLES;
use crate::types::{FolioId, GuestAddress, PageIndex, SwapSlot, VmId, PAGE_SIZE};
use crate::vm::{Region, VmState};
use std::sync::atomic::Ordering::Relaxed;

/// Errors from [`crate::MemoryManager::discard`].
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DiscardError {
    /// No VM has this id.
    #[error("no VM {0:?}")]
    NoSuchVm(VmId),
    /// Address or length not a multiple of 4 KiB, or zero length.
    #[error("discard range {gpa:#x}+{len:#x} is not page aligned")]
    Unaligned {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// The range is not inside one guest RAM region.
    #[error("discard range {gpa:#x}+{len:#x} is not inside one guest RAM region")]
    OutOfRange {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
}

/// What a discard did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DiscardOutcome {
    /// Pages dropped: resident ones, and swapped, zero or poisoned entries
    /// (their slots and markers go too).
    pub discarded_pages: u64,
    /// Of those, the pages that held host memory and gave it back.
    pub resident_pages: u64,
    /// Pages left in place because their folio is pinned.
    pub skipped_pinned_pages: u64,
    /// Large folios that became partially mapped (queued for split).
    pub partial_folios: u64,
}

pub(crate) fn discard(
    inner: &Inner,
    vm: &VmState,
    gpa: GuestAddress,
    len: u64,
) -> Result<DiscardOutcome, DiscardError> {
    if len == 0 || !gpa.raw().is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
        return Err(DiscardError::Unaligned {
            gpa: gpa.raw(),
            len,
        });
    }
    let range = DiscardError::OutOfRange {
        gpa: gpa.raw(),
        len,
    };
    vm.region_of(gpa, len).ok_or(range.clone())?;
    let mut out = DiscardOutcome::default();
    let (mut at, end) = (gpa.raw(), gpa.raw() + len);
    // A relocation may move the range to a new region under us: then look
    // it up again and go on from where the old region's tables were gone.
    while at < end {
        let (region, first) =
            crate::relocate::table_home(inner, vm, GuestAddress(at)).ok_or(range.clone())?;
        let in_region = region.size() - first.to_offset();
        let last = first.forward((end - at).min(in_region) / PAGE_SIZE);
        at = match discard_in(inner, &region, first, last, &mut out) {
            None => region.guest_base.raw() + last.to_offset(),
            Some(moved) => region.guest_base.raw() + moved.to_offset(),
        };
    }
    Ok(out)
}

/// Discard pages `[first, end)` of a region no relocation pulls into
/// (the tail of a failed grow, see `relocate::undo`).
///
/// # Context
/// No locks held.
pub(crate) fn discard_pages(
    inner: &Inner,
    region: &Region,
    first: PageIndex,
    end: PageIndex,
) -> DiscardOutcome {
    let mut out = DiscardOutcome::default();
    let moved = discard_in(inner, region, first, end, &mut out);
    debug_assert!(moved.is_none(), "nothing pulls into {region:?}");
    out
}

/// Discard pages `[first, end)` of `region`. Returns the first page not
/// done if the region was relocated meanwhile.
fn discard_in(
    inner: &Inner,
    region: &Region,
    first: PageIndex,
    end: PageIndex,
    out: &mut DiscardOutcome,
) -> Option<PageIndex> {
    let before = *out;
    let mut idx = first;
    let mut moved = None;
    while idx < end {
        if region
            .pull_source()
            .is_some_and(|_| crate::relocate::table_pending(region, idx))
        {
            // Still in the source: look the home up again.
            moved = Some(idx);
            break;
        }
        let mut ptl = region.pt.lock(idx);
        let stop = end.min(ptl.end());
        if ptl.is_moved() {
            moved = Some(idx);
            break;
        }
        // Swap-cache folios whose slots lost their last entry here.
        let mut cached = Vec::new();
        let r = match !ptl.is_dead() && ptl.nr_used() > 0 {
            true => discard_table(inner, region, &mut ptl, (idx, stop), out, &mut cached),
            false => Ok(()),
        };
        drop(ptl);
        if let (Some(dev), false) = (inner.swap.as_ref(), cached.is_empty()) {
            crate::swapin::free_swap_cache(inner, dev, cached, false);
        }
        if let Err((at, folio)) = r {
            // A migration or collapse owns the entry: wait for it on the
            // folio lock (`discard_table` took a reference under the
            // page-table lock: the entry kept the folio alive until then).
            crate::swapin::wait_on_folio(inner, folio);
            idx = at;
            continue;
        }
        idx = stop;
    }
    let c = &region.counters;
    c.discarded_pages
        .fetch_add(out.discarded_pages - before.discarded_pages, Relaxed);
    c.discard_skipped_pinned.fetch_add(
        out.skipped_pinned_pages - before.skipped_pinned_pages,
        Relaxed,
    );
    if out.partial_folios > before.partial_folios {
        inner.kick_worker();
    }
    moved
}

/// Discard `[from, to)` inside the table locked by `ptl`. Stops at a
/// `Migration` entry, returning its page and folio (referenced) for the
/// caller to wait. Swap-cache folios whose slots lost their last entry are
/// added to `cached`, referenced (see `swapin::unnamed_cached`).
///
/// # Context
/// Page-table lock held; takes the folio-table and zone locks (not nested).
fn discard_table(
    inner: &Inner,
    region: &Region,
    ptl: &mut PtlGuard<'_>,
    (from, to): (PageIndex, PageIndex),
    out: &mut DiscardOutcome,
    cached: &mut Vec<(FolioId, SwapSlot)>,
) -> Result<(), (PageIndex, FolioId)> {
    let mut i = from;
    while i < to {
        let pte = ptl.pte(i);
        let (folio, subpage) = match pte.state() {
            PteState::Present { folio, subpage } | PteState::ProtNone { folio, subpage } => {
                (folio, subpage)
            }
            PteState::None => {
                i = i.forward(1);
                continue;
            }
            PteState::Migration { folio } => {
                inner.folios.slab().get_ref(folio);
                return Err((i, folio));
            }
            _ => {
                discard_unmapped(inner, region, ptl, i, pte, cached);
                out.discarded_pages += 1;
                i = i.forward(1);
                continue;
            }
        };
        // The run of pages of this folio with consecutive subpages.
        let mut nr = 1;
        while i.forward(nr) < to && ptl.pte(i.forward(nr)) == pte.nth(nr) {
            nr += 1;
        }
        let (order, pinned) = {
            let slab = inner.folios.slab();
            let f = slab.get(folio).expect("a mapped entry names a live folio");
            (f.order, f.pincount > 0)
        };
        if pinned {
            out.skipped_pinned_pages += nr;
            i = i.forward(nr);
            continue;
        }
        let state = match pte.state() {
            PteState::Present { .. } => move_back(inner, region, i, folio, subpage as u64, nr),
            // Sampled out: the pages sit in the pool already.
            _ => BlockState::NeedsZero,
        };
        ptl.set_range(i, nr, Pte::NONE);
        let removal = {
            let mut slab = inner.folios.slab();
            rmap::remove_rmap_ptes(&mut slab, ptl, folio, subpage as u64, nr, state)
        };
        if let Some(f) = removal.freed {
            inner.free_range(f);
        }
        region.counters.resident(order, -(nr as i64));
        out.discarded_pages += nr;
        out.resident_pages += nr;
        out.partial_folios += removal.queued_split as u64;
        i = i.forward(nr);
    }
    Ok(())
}

/// Discard one page that no folio maps: a swap entry (its slot reference
/// goes; a folio caching the slot no entry names any more is added to
/// `cached`), a swapin marker (the swapin finds it gone and cleans up its
/// folio and slot), a zero entry, or a poisoned page (its kernel marker is
/// zapped).
///
/// # Context
/// Page-table lock held; takes the swap lock, then the folio-table lock.
fn discard_unmapped(
    inner: &Inner,
    region: &Region,
    ptl: &mut PtlGuard<'_>,
    idx: PageIndex,
    pte: Pte,
    cached: &mut Vec<(FolioId, SwapSlot)>,
) {
    match pte.state() {
        PteState::Swap { slot } => {
            if let Some(dev) = inner.swap.as_ref() {
                let mut st = dev.lock();
                if let Err(e) = st.swap_free_nr(slot, 1) {
                    crate::vm::log_error(&format!("discard: {e}"));
                }
                crate::swapin::unnamed_cached(inner, &st, slot, cached);
            }
            crate::swapin::both(inner, region, |c| c.swapped_pages.fetch_sub(1, Relaxed));
        }
        PteState::SwapinMarker { .. } => {
            crate::swapin::both(inner, region, |c| c.swapped_pages.fetch_sub(1, Relaxed));
        }
        PteState::Poisoned => {
            let addr = region.host_addr(idx).raw();
            // SAFETY: one guest page whose entry (`Poisoned`) we hold under
            // the page-table lock; zapping it clears the poison marker, and
            // no data or Rust reference is there.
            if let Err(e) = unsafe { sys::dontneed(addr, PAGE_SIZE as usize) } {
                crate::vm::log_error(&format!("discard of a poisoned page: {e}"));
            }
        }
        _ => {}
    }
    ptl.set_pte(idx, Pte::NONE);
}

/// Move guest pages `[idx, idx + nr)` (subpages `subpage..` of `folio`) back
/// to the folio's pool range. Returns the state of that pool range.
fn move_back(
    inner: &Inner,
    region: &Region,
    idx: PageIndex,
    folio: FolioId,
    subpage: u64,
    nr: u64,
) -> BlockState {
    let pool = inner
        .folios
        .slab()
        .get(folio)
        .map(|f| f.pool.subpage(subpage));
    let Some(pool) = pool else {
        return BlockState::NeedsZero;
    };
    // The pool range may still hold a stale copy from a COPY install.
    inner.zapq.ensure_hole(&inner.pool, pool, nr);
    let src = region.host_addr(idx).raw();
    let dst = inner.pool.host_addr(pool).raw();
    let len = nr * PAGE_SIZE;
    // SAFETY: the source pages are present guest pages of this folio, whose
    // entries we hold under the page-table lock; moving them out is the
    // atomic unmap (a vCPU touching them next faults and waits for this
    // lock). The destination is the folio's own pool range, a hole while the
    // folio is mapped, referenced by nobody.
    let r = unsafe {
        inner
            .uffd
            .move_retrying(dst, src, len, MOVE_MODE_ALLOW_SRC_HOLES, 4)
    };
    let done = match r {
        Ok(()) => return BlockState::NeedsZero,
        Err(p) => p.done,
    };
    // What could not move is dropped; the pool range keeps a hole there.
    let left = len - done;
    region
        .counters
        .discard_fallback_dontneed
        .fetch_add(left / PAGE_SIZE, Relaxed);
    // SAFETY: the guest pages of this folio that did not move, whose entries
    // we hold under the page-table lock; the guest gave them up (discard),
    // and guest memory is never borrowed by Rust code.
    if let Err(e) = unsafe { sys::dontneed(src + done as usize, left as usize) } {
        crate::vm::log_error(&format!("discard: dontneed: {e}"));
    }
    BlockState::NeedsZero
}
