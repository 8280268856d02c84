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
//! never held across the `process_madvise`: a drain takes the queued ranges
//! out as its in-flight batch and zaps them unlocked, so a push (under a
//! page-table lock, on the fault path) never waits behind a zap. A caller
//! of `ensure_hole` whose range is in flight sleeps on a condition
//! variable until that batch is done, and resumes only once the range
//! really is a hole.

use crate::pool::Pool;
use crate::sys;
use crate::types::{PoolOffset, PAGE_SIZE};
use crate::vm::log_error;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Condvar, Mutex, MutexGuard};

/// Queued pages at which a handler drains the queue after its fault.
pub(crate) const ZAP_BATCH: u64 = 64;

/// Pool ranges waiting to be dropped, and counters.
#[derive(Debug, Default)]
pub(crate) struct ZapQueue {
    /// Queued and in-flight ranges. Leaf.
    state: Mutex<ZapState>,
    /// Signalled when an in-flight batch is done.
    done: Condvar,
    /// Pages queued or in flight (read without the lock for the fast paths).
    pending: AtomicU64,
    /// Batches dropped.
    pub batches: AtomicU64,
    /// Pages dropped.
    pub pages: AtomicU64,
    /// Drains forced by [`ZapQueue::ensure_hole`] before the batch was full.
    pub forced: AtomicU64,
}

/// Under the queue lock.
#[derive(Debug, Default)]
struct ZapState {
    /// `(offset, pages)` of stale pool ranges waiting for a drain.
    queued: Vec<(PoolOffset, u64)>,
    /// The batch a drain is zapping now (empty when none is).
    inflight: Vec<(PoolOffset, u64)>,
}

impl ZapQueue {
    /// Queue the stale range `[off, off + nr pages)`.
    ///
    /// # Context
    /// The folio's lock or the page-table lock of its mapping is held (so
    /// no path can move into or free the range before it is queued).
    pub fn push(&self, off: PoolOffset, nr: u64) {
        let mut st = self.lock();
        debug_assert!(
            !overlaps(&st.queued, off, nr) && !overlaps(&st.inflight, off, nr),
            "a stale range is queued once"
        );
        st.queued.push((off, nr));
        self.pending.fetch_add(nr, Relaxed);
    }

    /// Pages queued or being dropped now (host memory beyond the budget).
    pub fn stale_pages(&self) -> u64 {
        self.pending.load(Relaxed)
    }

    /// Drain the queue if it holds at least [`ZAP_BATCH`] pages (unless
    /// another drain is under way: the next push will see the rest).
    ///
    /// # Context
    /// No locks needed; called by handlers after a fault, with none held.
    pub fn drain_if_full(&self, pool: &Pool) {
        if self.pending.load(Relaxed) >= ZAP_BATCH {
            let st = self.lock();
            if st.inflight.is_empty() {
                drop(self.drain_locked(st, pool));
            }
        }
    }

    /// Drain whatever is queued (the background reclaimer does this when
    /// idle, so stale pages do not linger).
    pub fn drain(&self, pool: &Pool) {
        if self.pending.load(Relaxed) > 0 {
            let st = self.wait_inflight(self.lock());
            drop(self.drain_locked(st, pool));
        }
    }

    /// Make sure `[off, off + nr pages)` is not waiting for a zap: if it is
    /// queued, drop the whole queue now; if it is being dropped, wait for
    /// that. Returns with the range a hole wherever the queue had it.
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
        let ranges: Vec<(PoolOffset, u64)> = ranges.into_iter().collect();
        let hit = |q: &[(PoolOffset, u64)]| ranges.iter().any(|&(o, n)| overlaps(q, o, n));
        let mut st = self.lock();
        loop {
            if hit(&st.inflight) {
                st = self.done.wait(st).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            if !hit(&st.queued) {
                return;
            }
            if !st.inflight.is_empty() {
                // Another batch is being dropped: ours goes after it.
                st = self.done.wait(st).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            self.forced.fetch_add(1, Relaxed);
            st = self.drain_locked(st, pool);
        }
    }

    fn lock(&self) -> MutexGuard<'_, ZapState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait until no batch is in flight.
    fn wait_inflight<'a>(&'a self, mut st: MutexGuard<'a, ZapState>) -> MutexGuard<'a, ZapState> {
        while !st.inflight.is_empty() {
            st = self.done.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st
    }

    /// Take the queued ranges as the in-flight batch, drop them with the
    /// lock released, and return the lock retaken.
    ///
    /// # Context
    /// The queue lock is held (`st`) and no batch is in flight.
    fn drain_locked<'a>(
        &'a self,
        mut st: MutexGuard<'a, ZapState>,
        pool: &Pool,
    ) -> MutexGuard<'a, ZapState> {
        debug_assert!(st.inflight.is_empty());
        if st.queued.is_empty() {
            return st;
        }
        let batch = std::mem::take(&mut st.queued);
        st.inflight.clone_from(&batch);
        drop(st);
        let ranges: Vec<(usize, usize)> = batch
            .iter()
            .map(|&(off, nr)| (pool.host_addr(off).raw(), (nr * PAGE_SIZE) as usize))
            .collect();
        let nr: u64 = batch.iter().map(|r| r.1).sum();
        // A failure leaves pages behind: a later MOVE into the range then
        // fails with EEXIST and moves less, which every caller handles (the
        // data stays in the guest). Nothing is lost, so log and go on.
        if let Err(e) = sys::dontneed_many(&ranges) {
            log_error(&format!("zap of {} stale pool ranges: {e}", ranges.len()));
        }
        let mut st = self.lock();
        st.inflight.clear();
        self.pending.fetch_sub(nr, Relaxed);
        self.batches.fetch_add(1, Relaxed);
        self.pages.fetch_add(nr, Relaxed);
        self.done.notify_all();
        st
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

    /// Many threads queue stale pages and drain while others make their
    /// own pages holes: whoever returns from `ensure_hole` finds its page a
    /// hole, even when the page was in a batch another thread was zapping
    /// without the queue lock.
    #[test]
    fn ensure_hole_waits_for_a_batch_in_flight() {
        const THREADS: u64 = 4;
        const PAGES: u64 = 1024;
        let pool = Pool::new(PAGES * PAGE_SIZE).expect("a small pool");
        let zq = ZapQueue::default();
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let (pool, zq) = (&pool, &zq);
                s.spawn(move || {
                    for i in 0..4000u64 {
                        let pfn = (i * THREADS + t) % PAGES;
                        let page = pool.host_addr(PoolOffset::from_pfn(pfn)).raw() as *mut u64;
                        // Reusing the page, as a MOVE into it would.
                        zq.ensure_hole(pool, PoolOffset::from_pfn(pfn), 1);
                        // SAFETY: in bounds of the live pool mapping; this
                        // thread alone uses the pages congruent to `t`, and
                        // no reference into them exists.
                        unsafe { page.write_volatile(i + 1) };
                        zq.push(PoolOffset::from_pfn(pfn), 1);
                        zq.drain_if_full(pool);
                        if i % 3 == 0 {
                            zq.ensure_hole(pool, PoolOffset::from_pfn(pfn), 1);
                            // SAFETY: as above.
                            assert_eq!(unsafe { page.read_volatile() }, 0, "page {pfn}");
                        }
                    }
                });
            }
        });
        zq.drain(&pool);
        assert_eq!(zq.stale_pages(), 0);
        assert_eq!(zq.pages.load(Relaxed), THREADS * 4000);
    }
}
