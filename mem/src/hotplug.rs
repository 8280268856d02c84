//! Changing the host budget at run time: the pool stays one mapping of
//! the size given at start, and a lower budget takes part of it *offline*.
//!
//! Analogue of memory hot-unplug (`offline_pages()` in
//! `mm/memory_hotplug.c`): free blocks are isolated from the allocator
//! ([`crate::buddy::Buddy::offline`]); when too few are free, reclaim
//! frees more first (hot-unplug migrates instead; here the swap file takes
//! the data). Offline blocks give their host pages back (`MADV_DONTNEED`).
//! Raising the budget onlines blocks again (`online_pages()`); they come
//! back as holes for the pre-zeroing worker to populate.
//!
//! ```text
//!   pool (mapped once, budget max)
//!   +----------------------------+--------------+
//!   | usable: free + folios      |   offline    |   budget = pool - offline
//!   +----------------------------+--------------+
//! ```
//! Invariant: free + folios + isolated + offline = pool pages.

use crate::buddy::{BlockState, FreeError};
use crate::manager::Inner;
use crate::types::{Order, ShowSize, PAGE_SIZE};
use crate::vmscan;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

/// Rounds of offline-then-reclaim that gain before lowering the budget
/// gives up (guests may fault back in what reclaim frees).
const MAX_ROUNDS: usize = 128;

/// Rounds in a row that gain nothing, with no reclaim in flight, before
/// lowering the budget gives up (each after a wait of up to 20 ms).
const STALLS: u32 = 3;

/// How long lowering the budget waits without gaining while reclaim is in
/// flight: a write of a few MiB to a congested disk, with room to spare.
const IN_FLIGHT_PATIENCE: Duration = Duration::from_secs(5);

/// Errors from [`crate::MemoryManager::set_budget`]. The budget is
/// unchanged after every one of them.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BudgetError {
    /// The budget is zero or not a whole number of 4 KiB pages.
    #[error("budget {} is not a positive multiple of 4 KiB", ShowSize(*.0))]
    Unaligned(u64),
    /// The budget is above the pool mapped at start.
    #[error("budget {} is above the pool of {} mapped at start", ShowSize(*requested), ShowSize(*max))]
    AboveMax {
        /// The budget asked for.
        requested: u64,
        /// The pool size, the largest budget possible.
        max: u64,
    },
    /// The budget is below what the VMs' minimums and pinned pages hold.
    #[error("budget {} is below the {} that VM minimums and pinned pages keep resident", ShowSize(*requested), ShowSize(*needed))]
    BelowMinimums {
        /// The budget asked for.
        requested: u64,
        /// What the VMs' minimums (or pinned pages, when more) add up to.
        needed: u64,
    },
    /// Not enough memory can be freed: without a swap file only free
    /// memory can go offline; with one, reclaim found too little.
    #[error(
        "cannot lower the budget to {requested} bytes: {short} bytes more would have to be freed{}",
        why_not(.swap)
    )]
    CannotFree {
        /// The budget asked for.
        requested: u64,
        /// Bytes missing.
        short: u64,
        /// Whether a swap file exists.
        swap: bool,
    },
    /// The allocator refused an offline block back (a bug).
    #[error("the allocator refused offline memory back")]
    Online(#[source] FreeError),
}

fn why_not(swap: &bool) -> &'static str {
    if *swap {
        ", and reclaim cannot free them"
    } else {
        ", and there is no swap file to reclaim to"
    }
}

/// What [`set_budget`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetChange {
    /// The budget before.
    pub old_bytes: u64,
    /// The budget now.
    pub new_bytes: u64,
    /// Bytes reclaimed to make room (lowering only).
    pub reclaimed_bytes: u64,
}

/// The usable budget in bytes: pool minus offline memory.
pub(crate) fn budget_bytes(inner: &Inner) -> u64 {
    (inner.pool.nr_pages() - inner.buddy().nr_offline()) * PAGE_SIZE
}

/// What a lowering has done so far: `(bytes offline, bytes to take)`.
pub(crate) type BudgetProgress<'a> = &'a dyn Fn(u64, u64);

/// Check `bytes` as a budget now: a whole number of pages, within the
/// pool, and above what the minimums and pinned pages of `vms` (the live
/// VMs) keep resident. Returns it in pages.
pub(crate) fn check_budget(
    inner: &Inner,
    bytes: u64,
    vms: &[std::sync::Arc<crate::vm::VmState>],
) -> Result<u64, BudgetError> {
    let pool = inner.pool.nr_pages();
    if bytes == 0 || !bytes.is_multiple_of(PAGE_SIZE) {
        return Err(BudgetError::Unaligned(bytes));
    }
    let target = bytes / PAGE_SIZE;
    if target > pool {
        return Err(BudgetError::AboveMax {
            requested: bytes,
            max: pool * PAGE_SIZE,
        });
    }
    let needed: u64 = vms
        .iter()
        .map(|v| {
            let pinned = v.counters.pinned_pages.load(Relaxed).max(0) as u64;
            v.min_pages().max(pinned)
        })
        .sum();
    if target < needed {
        return Err(BudgetError::BelowMinimums {
            requested: bytes,
            needed: needed * PAGE_SIZE,
        });
    }
    Ok(target)
}

/// Set the usable budget to `bytes`, telling `progress` how far a
/// lowering has come after each of its rounds.
///
/// # Context
/// Callers serialise calls (the manager's budget lock). No other lock
/// held; blocks for reclaim's swap I/O when lowering.
pub(crate) fn set_budget(
    inner: &Inner,
    bytes: u64,
    progress: BudgetProgress<'_>,
) -> Result<BudgetChange, BudgetError> {
    let vms = inner.live_vms();
    let target = check_budget(inner, bytes, &vms)?;
    let old = inner.pool.nr_pages() - inner.buddy().nr_offline();
    let change = |reclaimed: u64| BudgetChange {
        old_bytes: old * PAGE_SIZE,
        new_bytes: bytes,
        reclaimed_bytes: reclaimed * PAGE_SIZE,
    };
    if target >= old {
        // online_pages(): the pre-zeroing worker prepares them, then
        // retries faults parked for lack of memory.
        inner
            .buddy()
            .online(target - old)
            .map_err(BudgetError::Online)?;
        inner.kick_worker();
        return Ok(change(0));
    }
    lower(inner, old - target, bytes, &vms, progress).map(change)
}

/// Take `want` pages offline, reclaiming when too few are free. Returns
/// the pages reclaimed; on failure every page this call took is online
/// again.
///
/// Rounds go on while they gain, and while reclaim is in flight (up to
/// [`IN_FLIGHT_PATIENCE`] without a gain): folios other reclaimers
/// (kswapd, faults reclaiming for themselves) have isolated count against
/// the VMs' minimums until they are freed, so a round of our own may find
/// nothing while they are on their way back. The wait between such rounds
/// ends when memory is freed ([`Inner::wait_for_freed`]); it once kicked
/// the pre-zeroing worker, whose pass ended it at once, so the rounds ran
/// out in a few milliseconds while a write was in flight
/// (`lowering_the_budget_waits_for_memory_being_written_out`).
/// Giving up at the first such round failed lowerings under a guest
/// thrashing just above its minimum on a loaded host
/// (`lowering_the_budget_holds_against_a_guest_thrashing_near_its_minimum`
/// in `mem/tests/budget.rs`). With the guest's minimum 2 MiB below the new
/// budget, 4 runs of 26 failed, and 1 of about 90 since; with 3 MiB (as
/// the test has it), 1 of 20, and none of 40 since.
///
/// Known weakness: nothing holds the new budget against the VMs while
/// reclaim runs, so a guest's faults can take what reclaim frees before
/// it goes offline. memcg's `memory.max` sets the limit first, so that new
/// charges reclaim or wait. An allocator reserve that faults and swap-ins
/// respect was tried (session 13) and made no difference in that test
/// once the rounds waited for reclaim in flight, so it was left out.
fn lower(
    inner: &Inner,
    want: u64,
    requested: u64,
    vms: &[std::sync::Arc<crate::vm::VmState>],
    progress: BudgetProgress<'_>,
) -> Result<u64, BudgetError> {
    let swap = inner.swap.is_some();
    let cannot = |short: u64| BudgetError::CannotFree {
        requested,
        short: short * PAGE_SIZE,
        swap,
    };
    // Without swap, nothing but free memory can go: refuse up front what
    // is not free, so that nothing is taken for nothing. Free includes the
    // pages the pre-zeroing worker holds and the free pages parked in
    // pageblocks compaction has isolated: both come back.
    //
    // With swap there is no such check past `set_budget`'s against the
    // minimums. Memory on its way back is neither free nor resident:
    // folios another reclaimer (kswapd, a fault reclaiming for itself)
    // has unmapped and is writing out, and swap-ins not mapped yet. A
    // check from a snapshot of free and resident pages refused lowerings
    // the rounds below complete, short by exactly such folios
    // (`lowering_the_budget_waits_for_memory_being_written_out` in
    // `mem/tests/budget.rs`), and once counted in (the pool less what the
    // minimums keep resident) it is implied by the minimums' check. The
    // rounds decide, waiting while reclaim is in flight.
    if !swap {
        let free = {
            let buddy = inner.buddy();
            buddy.nr_free() + buddy.nr_parked() + inner.isolated_pages.load(Relaxed)
        };
        if want > free {
            return Err(cannot(want - free));
        }
    }
    let (mut taken, mut reclaimed) = (0, 0);
    let (mut gains, mut stalled) = (0, 0);
    let mut stalled_since = None;
    while gains < MAX_ROUNDS {
        let before = taken;
        let blocks = inner.buddy().offline(want - taken);
        for b in &blocks {
            // The block is offline: nothing allocates or prepares it, so
            // its host pages can go. It comes back online as
            // `NeedsPopulate` whatever it held (`Buddy::online`), and
            // preparing that only fills holes: a `NeedsZero` block (data
            // moved back from a guest) whose drop fails would come back
            // with that data. So such a block is zeroed in place then. A
            // `Ready` or `NeedsPopulate` block is zero where present
            // already, so a failed drop only leaves it populated.
            let nr = b.order.nr_pages();
            match b.state {
                BlockState::NeedsZero => {
                    let what = format_args!("dropping offline {:?} at", b.state);
                    crate::gather::clear_logged(&inner.pool, b.offset, nr, &what);
                }
                _ => {
                    if let Err(e) = inner.pool.drop_pages(b.offset, nr) {
                        crate::vm::log_error(&format!("dropping offline {b:?}: {e}"));
                    }
                }
            }
            taken += b.order.nr_pages();
        }
        progress(taken * PAGE_SIZE, want * PAGE_SIZE);
        if taken == want {
            return Ok(reclaimed);
        }
        let got = if swap {
            vmscan::reclaim_bytes(inner, None, (want - taken) * PAGE_SIZE) / PAGE_SIZE
        } else {
            0
        };
        reclaimed += got;
        if got == 0 && taken == before {
            stalled += 1;
            let since = *stalled_since.get_or_insert_with(std::time::Instant::now);
            // Memory may still be on its way back: blocks the pre-zeroing
            // worker holds, free pages parked in a pageblock compaction
            // has isolated (until it releases the pageblock), and folios
            // other reclaimers (kswapd, faults reclaiming for themselves)
            // have isolated. Those count against the VMs' minimums until
            // they are written and freed, so our own reclaim finds nothing
            // meanwhile. Wait for them; give up when nothing is in flight.
            let in_flight = inner.isolated_pages.load(Relaxed) > 0
                || inner.buddy().nr_parked() > 0
                || vms.iter().any(|v| v.reclaiming.load(Relaxed) > 0);
            if (stalled > STALLS && !in_flight) || since.elapsed() > IN_FLIGHT_PATIENCE {
                break;
            }
            inner.wait_for_freed(Duration::from_millis(20));
        } else {
            (gains, stalled, stalled_since) = (gains + 1, 0, None);
        }
    }
    // Where the memory that could not be taken was, for the log.
    let (nr_free, nr_parked) = {
        let b = inner.buddy();
        (b.nr_free(), b.nr_parked())
    };
    let folio_pages: u64 = Order::all()
        .zip(inner.folios.slab().count_by_order())
        .map(|(o, n)| o.nr_pages() * n)
        .sum();
    let vm_pages: Vec<String> = vms
        .iter()
        .map(|v| {
            format!(
                "{} resident (min {}, reclaiming {})",
                v.resident_pages(),
                v.min_pages(),
                v.reclaiming.load(Relaxed)
            )
        })
        .collect();
    crate::vm::log_error(&format!(
        "lowering the budget by {want} pages gave up {} short: free {nr_free}, parked \
         {nr_parked}, held by the worker {}, in folios {folio_pages}; VMs: {}",
        want - taken,
        inner.isolated_pages.load(Relaxed),
        vm_pages.join(", ")
    ));
    // Undo: everything this call took goes back online.
    inner.buddy().online(taken).map_err(BudgetError::Online)?;
    inner.kick_worker();
    Err(cannot(want - taken))
}
