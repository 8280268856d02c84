//! Deferred, batched zap of stale pool copies.
//!
//! A small swapin (or a sampled-out folio faulting back) can be installed by
//! `UFFDIO_COPY` from the folio's pool range instead of `UFFDIO_MOVE`: COPY
//! fills a `none` guest entry with a fresh page and needs no TLB flush,
//! where MOVE clears the pool entry with `ptep_clear_flush()`, a flush of
//! every CPU running the process. The pool range then still holds a stale
//! copy of data that now lives in the guest, while the rest of the manager
//! expects a mapped folio's pool range to be a hole (MOVE-outs need an empty
//! destination; a freed range must not keep old data behind a state that
//! says otherwise). The stale ranges are queued here and dropped together
//! by one `process_madvise(MADV_DONTNEED)`: one flush per batch instead of
//! one per swapin. Analogue of `mmu_gather` and of reclaim's batched
//! unmap flush (`try_to_unmap_flush()`).
//!
//! # Invariant
//! A queued range belongs to a live folio whose data lives in the guest
//! (the range was just copied from), so dropping it loses nothing. Before
//! anything moves pages into a folio's pool range or frees that range, it
//! calls [`ZapQueue::ensure_hole`], which zaps the whole queue if the range
//! is in it. A range enters the queue only right after its copy, under the
//! page-table lock that orders it against those paths, and only once per
//! folio lifetime (the next copy from it needs a MOVE-in first, which
//! drained it), so there is at most one entry per range.
//!
//! The queued pages are host memory beyond the budget, bounded by
//! [`ZAP_BATCH`] plus one entry per handler thread; [`ZapQueue::stale_pages`]
//! reports them. They are not pool pages of their own for the accounting:
//! each belongs to its folio, as before the copy.
//!
//! # Context
//! The queue lock is a leaf, taken under folio and page-table locks, and
//! held across the `process_madvise` so that a waiter in `ensure_hole`
//! resumes only once the range really is a hole (or, where the drop
//! failed, zeroed in place: holding no data either way).

use crate::pool::{Cleared, Pool};
use crate::types::PoolOffset;
use crate::vm::log_error;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;

/// Queued pages at which a handler drains the queue after its fault.
pub(crate) const ZAP_BATCH: u64 = 64;

/// Pool ranges waiting to be dropped, and counters.
#[derive(Debug, Default)]
pub(crate) struct ZapQueue {
    /// `(offset, pages)` of stale pool ranges. Leaf lock.
    queue: Mutex<Vec<(PoolOffset, u64)>>,
    /// Pages in `queue` (read without the lock for the fast paths).
    pending: AtomicU64,
    /// Batches dropped.
    pub batches: AtomicU64,
    /// Pages dropped.
    pub pages: AtomicU64,
    /// Drains forced by [`ZapQueue::ensure_hole`] before the batch was full.
    pub forced: AtomicU64,
}

impl ZapQueue {
    /// Queue the stale range `[off, off + nr pages)`.
    ///
    /// # Context
    /// The folio's lock or the page-table lock of its mapping is held (so
    /// no path can move into or free the range before it is queued).
    pub fn push(&self, off: PoolOffset, nr: u64) {
        let mut q = self.lock();
        debug_assert!(!overlaps(&q, off, nr), "a stale range is queued once");
        q.push((off, nr));
        self.pending.fetch_add(nr, Relaxed);
    }

    /// Pages queued now (host memory beyond the budget).
    pub fn stale_pages(&self) -> u64 {
        self.pending.load(Relaxed)
    }

    /// Drain the queue if it holds at least [`ZAP_BATCH`] pages.
    ///
    /// # Context
    /// No locks needed; called by handlers after a fault, with none held.
    pub fn drain_if_full(&self, pool: &Pool) {
        if self.pending.load(Relaxed) >= ZAP_BATCH {
            self.drain_locked(&mut self.lock(), pool);
        }
    }

    /// Drain whatever is queued (the background reclaimer does this when
    /// idle, so stale pages do not linger).
    pub fn drain(&self, pool: &Pool) {
        if self.pending.load(Relaxed) > 0 {
            self.drain_locked(&mut self.lock(), pool);
        }
    }

    /// Make sure `[off, off + nr pages)` is not waiting for a zap: if it is
    /// queued, drop the whole queue now. Returns with the range a hole
    /// wherever the queue had it.
    ///
    /// # Context
    /// Any; the caller owns the range (folio lock or page-table lock of
    /// its mapping held, or the folio is being freed).
    pub fn ensure_hole(&self, pool: &Pool, off: PoolOffset, nr: u64) {
        self.ensure_holes(pool, [(off, nr)]);
    }

    /// [`ZapQueue::ensure_hole`] for many ranges `(offset, pages)` under
    /// one lock (for batched frees).
    pub fn ensure_holes(&self, pool: &Pool, ranges: impl IntoIterator<Item = (PoolOffset, u64)>) {
        if self.pending.load(Relaxed) == 0 {
            return;
        }
        let mut q = self.lock();
        if ranges.into_iter().any(|(off, nr)| overlaps(&q, off, nr)) {
            self.forced.fetch_add(1, Relaxed);
            self.drain_locked(&mut q, pool);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(PoolOffset, u64)>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn drain_locked(&self, q: &mut Vec<(PoolOffset, u64)>, pool: &Pool) {
        if q.is_empty() {
            return;
        }
        let nr: u64 = q.iter().map(|r| r.1).sum();
        // The ranges are pool ranges of the queue: stale copies of folios
        // whose data lives in the guest (see # Invariant), which no path
        // moves into, frees or borrows (`pages_mut`) before `ensure_hole`
        // drained them, and that drain waits for this lock.
        //
        // A failure must not leave the copies behind. Callers of
        // `ensure_hole` go on as if the range were a hole: `free_ranges`
        // frees it, and a folio whose pages are in the guest is freed as
        // `NeedsPopulate` (`vm::Region::unmap_all`), whose preparation only
        // fills holes (`Pool::prepare`), so the copy would reach the next
        // guest that gets the block. Keeping the ranges queued would not
        // help those callers either. So each range is dropped again on its
        // own (the batch may have dropped some), and one that still fails is
        // zeroed in place: then it holds no data, and a later MOVE into it
        // fails with EEXIST and moves less, which every MOVE-out handles.
        if let Err(e) = pool.drop_ranges(q) {
            log_error(&format!("zap of {} stale pool ranges: {e}", q.len()));
            for &(off, n) in q.iter() {
                clear_logged(pool, off, n, &"zap of stale pool range");
            }
        }
        q.clear();
        self.pending.fetch_sub(nr, Relaxed);
        self.batches.fetch_add(1, Relaxed);
        self.pages.fetch_add(nr, Relaxed);
    }
}

/// [`Pool::drop_or_zero`] of `[off, off + nr pages)`, whose outcome other
/// than a plain drop is logged, the range named by `what`: for pool pages
/// that must hold no data whatever `MADV_DONTNEED` does (stale copies, an
/// offline block that held a guest's data).
///
/// # Context
/// As [`Pool::drop_or_zero`]: the caller owns the range.
pub(crate) fn clear_logged(pool: &Pool, off: PoolOffset, nr: u64, what: &dyn std::fmt::Display) {
    match pool.drop_or_zero(off, nr) {
        Ok(Cleared::Dropped) => {}
        Ok(Cleared::Zeroed(e)) => log_error(&format!(
            "{what} {:#x}+{nr} pages: {e}; zeroed it instead",
            off.0
        )),
        Err(e) => log_error(&format!("{what} {:#x}+{nr} pages: {e}", off.0)),
    }
}

/// Whether any queued range overlaps `[off, off + nr pages)`.
fn overlaps(q: &[(PoolOffset, u64)], off: PoolOffset, nr: u64) -> bool {
    let (lo, hi) = (off.pfn(), off.pfn() + nr);
    q.iter().any(|&(o, n)| o.pfn() < hi && lo < o.pfn() + n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::PAGE_SIZE;

    #[test]
    fn overlap_is_by_page_range() {
        let q = [(PoolOffset::from_pfn(8), 1), (PoolOffset::from_pfn(16), 4)];
        assert!(overlaps(&q, PoolOffset::from_pfn(8), 1));
        assert!(overlaps(&q, PoolOffset::from_pfn(0), 9));
        assert!(overlaps(&q, PoolOffset::from_pfn(19), 1));
        assert!(!overlaps(&q, PoolOffset::from_pfn(9), 7));
        assert!(!overlaps(&q, PoolOffset::from_pfn(20), 512));
    }

    #[test]
    fn queued_pages_are_dropped_once_and_counted() {
        let pool = Pool::new(64 * PAGE_SIZE).expect("a small pool");
        let zq = ZapQueue::default();
        let page = |pfn: u64| pool.host_addr(PoolOffset::from_pfn(pfn)).raw() as *mut u8;
        for pfn in [3, 5] {
            // SAFETY: in bounds of the live pool mapping, which this test
            // owns; no reference into it exists.
            unsafe { page(pfn).write_volatile(0xAB) };
            zq.push(PoolOffset::from_pfn(pfn), 1);
        }
        assert_eq!(zq.stale_pages(), 2);
        // Not queued: no drain.
        zq.ensure_hole(&pool, PoolOffset::from_pfn(4), 1);
        assert_eq!(zq.batches.load(Relaxed), 0);
        // SAFETY: as above.
        assert_eq!(unsafe { page(3).read_volatile() }, 0xAB);
        // Queued: the whole queue goes, in one batch.
        zq.ensure_hole(&pool, PoolOffset::from_pfn(5), 1);
        assert_eq!(zq.batches.load(Relaxed), 1);
        assert_eq!(zq.forced.load(Relaxed), 1);
        assert_eq!(zq.pages.load(Relaxed), 2);
        assert_eq!(zq.stale_pages(), 0);
        for pfn in [3, 5] {
            // SAFETY: as above; the dropped page reads as zero.
            assert_eq!(unsafe { page(pfn).read_volatile() }, 0);
        }
    }

    /// A drain whose `MADV_DONTNEED` fails leaves no stale data: the
    /// ranges are zeroed in place, and the queue empties.
    #[test]
    fn a_failed_drain_zeroes_the_stale_copies() {
        use crate::inject::{FaultPoint, InjectPlan};
        let pool = Pool::new(64 * PAGE_SIZE).expect("a small pool");
        let zq = ZapQueue::default();
        let page = |pfn: u64| pool.host_addr(PoolOffset::from_pfn(pfn)).raw() as *mut u8;
        for pfn in [3, 5] {
            // SAFETY: in bounds of the live pool mapping, which this test
            // owns; no reference into it exists.
            unsafe { page(pfn).add(100).write_volatile(0xAB) };
            zq.push(PoolOffset::from_pfn(pfn), 1);
        }
        pool.injector().set(vec![InjectPlan {
            point: FaultPoint::PoolDrop,
            skip: 0,
            count: u32::MAX,
        }]);
        zq.ensure_hole(&pool, PoolOffset::from_pfn(3), 1);
        assert_eq!(zq.stale_pages(), 0);
        for pfn in [3, 5] {
            // SAFETY: as above.
            assert_eq!(unsafe { page(pfn).add(100).read_volatile() }, 0);
            // Zeroed, not dropped: the page is still there.
            assert_eq!(crate::sys::has_page(page(pfn) as usize).ok(), Some(true));
        }
    }
}
