//! The pre-zeroing worker: makes free blocks `Ready` off the fault path,
//! runs deferred splits, and retries parked faults.
//!
//! Like a `kcompactd`/`khugepaged`-style kernel thread: it isolates one
//! unprepared block at a time from the buddy allocator (so the fault path
//! never sees it half-prepared), prepares it in the pool without any lock
//! held (populate holes and zero pages that held guest data; a 2 MiB block
//! is dropped and faulted in again as a fresh THP, which the kernel zeroes),
//! and frees it back as `Ready`.

use crate::buddy::{BlockState, FreeAreaStats};
use crate::fault::handle_fault;
use crate::manager::Inner;
use crate::split::deferred_split_scan;
use crate::stall::StallWatch;
use crate::vm::log_error;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::time::{Duration, Instant};

/// Body of the worker thread.
pub(crate) fn worker_thread(inner: &Inner) {
    let mut stalls = StallWatch::default();
    while !inner.shutdown.load(Relaxed) {
        inner.wait_kick(Duration::from_millis(100));
        if inner.shutdown.load(Relaxed) {
            return;
        }
        inner.run_deferred_teardowns();
        deferred_split_scan(inner);
        while prepare_one(inner) {
            retry_parked(inner);
            inner.notify_memory();
            if inner.shutdown.load(Relaxed) {
                return;
            }
        }
        retry_parked(inner);
        inner.notify_memory();
        stalls.check(inner);
    }
}

/// How much free memory the worker keeps `Ready`: all of it, up to the
/// configured limit, unless reclaim is running against the budget.
///
/// Under reclaim pressure (reclaim ran within the last second,
/// [`Inner::under_reclaim`]) nearly every allocation is a swapin, whose
/// read overwrites its block: zeroing the memory reclaim frees would be
/// wasted, and each prepare also costs a `MADV_DONTNEED` flush in this mm.
/// So only a quarter of the low watermark is kept ready then, for faults
/// on untouched memory, well below the free memory reclaim maintains so
/// that swapins find unprepared blocks first; more is prepared when such
/// faults park (see [`prepare_one`]).
pub(crate) fn ready_target(inner: &Inner, fa: &FreeAreaStats) -> u64 {
    let target = inner.prezero_limit_pages.min(fa.free_pages);
    match inner.under_reclaim() {
        true => target.min(inner.watermarks.get().low / 4),
        false => target,
    }
}

/// Prepare one block if one needs it. Returns whether it did any work.
fn prepare_one(inner: &Inner) -> bool {
    let block = {
        let mut buddy = inner.buddy();
        let fa = buddy.stats();
        let parked = inner.faults_parked();
        if fa.ready_pages >= ready_target(inner, &fa) && !parked {
            return false;
        }
        // A pool compaction pass is running: the blocks it rebuilds are
        // prepared when it ends (it kicks this worker). Preparing them
        // meanwhile would only compete with it for the other CPU and for
        // memory bandwidth, and make every one of its `MADV_DONTNEED`
        // flushes interrupt this thread, in the same mm. Unless faults are
        // parked, a thread waits for memory (a pin faulting in, another
        // pass waiting for a ready 2 MiB block), or ready memory runs short.
        let waiting = parked || inner.memory_waiters.load(Relaxed) > 0;
        if inner.compacting.load(Relaxed) > 0
            && !waiting
            && fa.ready_pages >= inner.watermarks.get().low
        {
            return false;
        }
        let Some(b) = buddy.take_unprepared() else {
            return false;
        };
        // Counted under the zone lock that took it off the free lists, so
        // that `wait_idle` and `check_accounting` always find the block in
        // one of the two places.
        inner.isolated_pages.fetch_add(b.order.nr_pages(), Relaxed);
        b
    };
    let nr = block.order.nr_pages();
    let t0 = Instant::now();
    if block.order < crate::types::Order::PMD {
        inner.anchor_pool_table(block.offset);
    }
    let state = match inner.pool.prepare(block.offset, block.order, block.state) {
        Ok(huge) => {
            if block.order == crate::types::Order::PMD && !huge {
                inner.workers.collapse_failed.fetch_add(1, Relaxed);
            }
            BlockState::Ready
        }
        Err(e) => {
            log_error(&format!("prepare {block:?}: {e}"));
            inner.workers.prezero_failed.fetch_add(1, Relaxed);
            block.state
        }
    };
    let w = &inner.workers;
    w.prezero_ns
        .fetch_add(t0.elapsed().as_nanos() as u64, Relaxed);
    w.prezero_blocks.fetch_add(1, Relaxed);
    w.prezero_pages.fetch_add(nr, Relaxed);
    {
        let mut buddy = inner.buddy();
        if let Err(e) = buddy.free(block.offset, block.order, state) {
            log_error(&format!("return of prepared {block:?}: {e}"));
        }
        inner.isolated_pages.fetch_sub(nr, Relaxed);
    }
    state == BlockState::Ready
}

/// Retry the faults parked for lack of ready memory.
fn retry_parked(inner: &Inner) {
    // Set again by a fault that parks on a held-back pull once more.
    inner.pulls_parked.store(false, SeqCst);
    let parked = std::mem::take(&mut *inner.pending.lock().unwrap_or_else(|e| e.into_inner()));
    for p in parked {
        let (addr, write) = (p.addr_write & !1, p.addr_write & 1 != 0);
        // From the fault's start: its latency counts its time parked.
        handle_fault(inner, addr, p.since, false, write);
    }
}
