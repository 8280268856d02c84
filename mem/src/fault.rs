//! The fault path: userfaultfd handler threads and MISSING fault service.
//!
//! Analogue of `do_anonymous_page()` with mTHP (`alloc_anon_folio()`): pick
//! the largest order whose aligned range is wholly `None` and inside the
//! region, take a pre-zeroed block, and install it with `UFFDIO_MOVE` from
//! the pool (one PMD move for a whole 2 MiB folio). Racing faults on a
//! populated page get `UFFDIO_WAKE`. `UFFDIO_COPY` and `UFFDIO_ZEROPAGE` are
//! fallbacks for pages `MOVE` cannot serve, and every use is counted.
//!
//! Handler threads never touch guest memory and never zero memory (save one
//! pool page whose `MADV_DONTNEED` failed, see `discard_pool_copy`). When no
//! ready block exists they do not wait either: the fault is parked (the
//! faulting thread stays blocked in the kernel) and the pre-zeroing worker
//! retries it once it has prepared memory.

use crate::buddy::{Block, BlockState};
use crate::folio::FolioFlags;
use crate::inject::FaultPoint;
use crate::manager::Inner;
use crate::pte::{Pte, PteState, PtlGuard};
use crate::rmap::{self, Rmap};
use crate::stats::FaultCounters;
use crate::sys::userfaultfd::{
    PartialFill, UffdMsg, COPY_MODE_WP, EVENT_PAGEFAULT, PAGEFAULT_FLAG_WP, PAGEFAULT_FLAG_WRITE,
};
use crate::sys::{poll2, ExclusiveWait};
use crate::types::{FolioId, Order, PageIndex, PoolOffset, PAGE_SIZE};
use crate::vm::{log_error, Region};
use crate::{swapin, vmscan};
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::time::{Duration, Instant};

/// `MOVE` retries on `EAGAIN`/`EBUSY` before a page falls back to `COPY`.
const MAX_MOVE_RETRIES: u32 = 8;

/// Body of a handler thread: wait for events, read and serve them one at a
/// time until none is left.
///
/// Each handler waits on an epoll instance of its own that holds the
/// userfaultfd with `EPOLLEXCLUSIVE`, so a new fault wakes one idle
/// handler instead of all of them (with plain `poll` every fault woke
/// every handler, and all but one found nothing to read). Messages are
/// read one per `read(2)`: a handler that blocks in a swapin read must not
/// sit on further faults that another handler could serve meanwhile.
pub(crate) fn handler_thread(inner: &Inner) {
    let wait = ExclusiveWait::new(inner.uffd.raw(), inner.stop_fd.raw());
    if let Err(e) = &wait {
        log_error(&format!("epoll for a handler thread: {e}; using poll"));
    }
    let mut buf = [UffdMsg::default(); 1];
    while !inner.shutdown.load(Relaxed) {
        let (ready, stop) = match &wait {
            Ok(w) => w.wait(1000),
            Err(_) => poll2(inner.uffd.raw(), inner.stop_fd.raw(), 1000),
        };
        if stop || inner.shutdown.load(Relaxed) {
            return;
        }
        if !ready {
            continue;
        }
        loop {
            let n = match inner.uffd.read_msgs(&mut buf) {
                Ok(n) => n,
                Err(e) => {
                    log_error(&format!("userfaultfd read: {e}"));
                    break;
                }
            };
            if n == 0 || inner.shutdown.load(Relaxed) {
                break;
            }
            let start = Instant::now();
            for msg in buf[..n].iter().filter(|m| m.event == EVENT_PAGEFAULT) {
                let addr = msg.address as usize;
                if msg.flags & PAGEFAULT_FLAG_WP != 0 {
                    handle_wp_fault(inner, addr);
                } else {
                    let write = msg.flags & PAGEFAULT_FLAG_WRITE != 0;
                    handle_fault(inner, addr, start, true, write);
                }
            }
        }
    }
}

/// How a fault ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FaultOutcome {
    /// A folio of this order was installed.
    Installed(Order),
    /// A swapped, cached or sampled-out folio was mapped back.
    Refaulted,
    /// The page was already present: a racing fault served it.
    Raced,
    /// The entry changed or we slept on a folio lock: look again.
    Retry,
    /// The page's table is still in a relocation's source and cannot be
    /// pulled now: a pin holds a folio of it, an undo has not discarded its
    /// grown tail yet, the region is not live yet, or the pull failed
    /// otherwise (logged). Looking again at once cannot help: wait for an
    /// unpin or the relocation to move on.
    PullBlocked,
    /// No memory: `oom` when nothing free is left at all (reclaim may
    /// help), otherwise wait for the pre-zeroing worker.
    NoMemory { oom: bool },
    /// The page's swapped contents were lost; it is poisoned.
    Poisoned,
    /// The region is being torn down.
    Dead,
}

/// Retries of one fault before it is parked for the worker to retry.
const MAX_RETRIES: u32 = 64;

/// How long a faulting thread sleeps at most on a held-back pull before it
/// looks again (it is woken sooner by an unpin or a pull).
const PULL_BLOCKED_WAIT: Duration = Duration::from_millis(10);

/// Serve the MISSING fault at host address `addr`, parking it when there is
/// no memory even after direct reclaim. `first` is false for retries of
/// parked faults; `write` says whether the access was a write (a parked
/// fault is retried as one).
///
/// # Context
/// Handler thread or pre-zeroing worker; no locks held.
pub(crate) fn handle_fault(inner: &Inner, addr: usize, t0: Instant, first: bool, write: bool) {
    // The MOVE that serves a fault wakes the faulting thread before the
    // handler's bookkeeping is done; `wait_idle` waits for this to drop.
    inner.reclaimers.fetch_add(1, Relaxed);
    serve_fault(inner, addr, t0, first, write);
    inner.reclaimers.fetch_sub(1, Relaxed);
}

/// Serve a WP fault at host address `addr`: the first write to a page
/// installed write-protected because its folio was clean
/// ([`crate::folio::FolioFlags::CLEAN`]). Under the page-table lock, the
/// folio stops being clean (its slot is released: the file copy is about
/// to be stale), then the protection is lifted, which wakes the writer.
/// Anywhere else (a page no longer present, the pool, a region going
/// away) the protection is just lifted.
///
/// # Context
/// Handler thread; no locks held.
pub(crate) fn handle_wp_fault(inner: &Inner, addr: usize) {
    let page = addr & !(PAGE_SIZE as usize - 1);
    // `gone`: no live region has the page. The event can be read after its
    // range left the userfaultfd (a relocation's old range once every table
    // moved, a region torn down), and the kernel then refuses the ioctl with
    // `ENOENT`: expected, not logged. The writer is woken either way.
    let lift = |gone: bool| {
        if let Err(e) = inner.uffd.write_protect(page, PAGE_SIZE, false) {
            if !(gone && e.raw_os_error() == Some(libc::ENOENT)) {
                log_error(&format!("UFFDIO_WRITEPROTECT off at {page:#x}: {e}"));
            }
            let _ = inner.uffd.wake(page, PAGE_SIZE as usize);
        }
    };
    let Some((region, idx)) = inner
        .lookup(page)
        .and_then(|r| r.page_of_host(page).map(|i| (r, i)))
    else {
        lift(true);
        return;
    };
    let ptl = region.pt.lock(idx);
    if let PteState::Present { folio, .. } = ptl.pte(idx).state() {
        crate::swapin::clean_folio_written(inner, &region, folio);
    }
    report_streak(inner, "write-protect", &region, idx, page, || {
        ptl.pte(idx).state()
    });
    lift(false);
    drop(ptl);
}

fn serve_fault(inner: &Inner, addr: usize, t0: Instant, first: bool, write: bool) {
    let page = addr & !(PAGE_SIZE as usize - 1);
    let Some(region) = inner.lookup(page) else {
        // Not a guest page we serve (a region being torn down): let the
        // thread retry; once unregistered, the kernel serves it.
        let _ = inner.uffd.wake(page, PAGE_SIZE as usize);
        return;
    };
    let vmc = &region.counters.faults;
    if first {
        vmc.events.fetch_add(1, Relaxed);
        inner.faults.events.fetch_add(1, Relaxed);
    }
    let Some(idx) = region.page_of_host(page) else {
        return;
    };
    vmscan::enforce_vm_max(inner, &region);
    let pull_events = inner.pull_events.load(SeqCst);
    let outcome = fault_in_reclaiming(inner, &region, idx, write, false);
    // The faulting thread runs again already; zap stale pool copies here,
    // with no lock held, once a batch has gathered.
    inner.zapq.drain_if_full(&inner.pool);
    match outcome {
        // Parked without the retries a changed entry gets: until a pin
        // drops or the relocation moves on, every try would fail alike.
        // The unpin or pull kicks the worker to retry it (`pulls_parked`);
        // one that came since this fault began (between its failed pull
        // and the flag, say) is seen in `pull_events`, and kicks it here.
        FaultOutcome::PullBlocked => {
            for f in [vmc, &inner.faults] {
                f.parked_pull.fetch_add(1, Relaxed);
            }
            crate::stall::park(inner, page, write, t0, true);
            inner.pulls_parked.store(true, SeqCst);
            if inner.pull_events.load(SeqCst) != pull_events {
                inner.kick_worker();
            }
            return;
        }
        FaultOutcome::NoMemory { .. } | FaultOutcome::Retry => {
            let oom = matches!(outcome, FaultOutcome::NoMemory { oom: true });
            let c = |f: &FaultCounters| match oom {
                true => f.parked_oom.fetch_add(1, Relaxed),
                false => f.parked_prezero.fetch_add(1, Relaxed),
            };
            c(vmc);
            c(&inner.faults);
            crate::stall::park(inner, page, write, t0, false);
            if first {
                // Retries come from the worker itself; kicking it again
                // would spin it while the pool is exhausted.
                inner.kick_worker();
            }
            return;
        }
        FaultOutcome::Raced | FaultOutcome::Dead | FaultOutcome::Poisoned => {
            if outcome == FaultOutcome::Raced {
                report_streak(inner, "raced", &region, idx, page, || {
                    region.pt.lock(idx).pte(idx).state()
                });
            }
            let _ = inner.uffd.wake(page, PAGE_SIZE as usize);
        }
        FaultOutcome::Installed(_) | FaultOutcome::Refaulted => {}
    }
    let ns = t0.elapsed().as_nanos() as u64;
    vmc.latency.record(ns);
    inner.faults.latency.record(ns);
}

/// [`fault_in`] until it ends, retrying a changed entry up to
/// [`MAX_RETRIES`] times and reclaiming directly once when memory is out
/// (`__alloc_pages_slowpath()`). Then a handler thread (`waits` false)
/// returns, and parks the fault; the faulting thread itself (`waits`, see
/// `crate::faulter`) waits for memory and tries again.
///
/// # Context
/// No locks held.
pub(crate) fn fault_in_reclaiming(
    inner: &Inner,
    region: &Region,
    idx: PageIndex,
    write: bool,
    waits: bool,
) -> FaultOutcome {
    let (mut retries, mut reclaimed, mut kicked) = (0, false, false);
    let (start, mut reported) = (Instant::now(), None::<Instant>);
    loop {
        match fault_in(inner, region, idx, write) {
            FaultOutcome::Retry if retries < MAX_RETRIES => retries += 1,
            FaultOutcome::NoMemory { oom: true } if !reclaimed && vmscan::can_reclaim(inner) => {
                reclaimed = true;
                vmscan::direct_reclaim(inner, region);
            }
            // The faulting thread sleeps until a pin drops, a pull or undo
            // moves the relocation on, or the new region goes live, then
            // looks again.
            FaultOutcome::PullBlocked if waits => {
                let pulled = || crate::relocate::ensure_pulled(inner, region, idx).then_some(());
                _ = inner.wait_unpin(PULL_BLOCKED_WAIT, pulled);
            }
            FaultOutcome::Retry | FaultOutcome::NoMemory { .. } if waits => {
                if reported.is_none() && start.elapsed() >= inner.stall_report_after {
                    reported = Some(Instant::now());
                    let addr = region.host_addr(idx).raw();
                    crate::stall::report(inner, &[addr], start.elapsed());
                }
                let first = !std::mem::replace(&mut kicked, true);
                inner.wait_memory(Duration::from_millis(10), first);
                (retries, reclaimed) = (0, false);
            }
            o => {
                if let Some(t) = reported {
                    crate::stall::over(t.elapsed());
                }
                return o;
            }
        }
    }
}

/// Consecutive faults of one kind of one handler on one page after which
/// the state is logged: a faulter woken this often without its access
/// succeeding is livelocked (a `Present` entry without a host page, or a
/// write protection that does not go, would do that).
const STREAK_LOG: u32 = 100_000;

thread_local! {
    /// This handler's last page that raced or was write-protected, and how
    /// many times in a row.
    static STREAK: std::cell::Cell<(usize, u32)> = const { std::cell::Cell::new((0, 0)) };
}

/// Count a `Raced` or write-protect fault on `page` (entry `idx` of
/// `region`, read by `entry` if logged), and log the page's state once if
/// the same page keeps coming back: a diagnostic for a livelock seen under
/// heavy load, not a recovery.
fn report_streak(
    inner: &Inner,
    kind: &str,
    region: &Region,
    idx: PageIndex,
    page: usize,
    entry: impl FnOnce() -> PteState,
) {
    let n = STREAK.with(|s| {
        let (last, n) = s.get();
        let n = if last == page { n + 1 } else { 1 };
        s.set((page, n));
        n
    });
    if n == STREAK_LOG {
        let entry = entry();
        // The folio the entry names, and whether its pool copy is there.
        let folio = match entry {
            PteState::Present { folio, subpage } => {
                let slab = inner.folios.slab();
                slab.get(folio).map(|f| {
                    let pool = inner
                        .pool
                        .host_addr(f.pool.subpage(u64::from(subpage)))
                        .raw();
                    (
                        format!("{f:?}"),
                        crate::sys::resident(pool),
                        crate::sys::pagemap(pool),
                    )
                })
            }
            _ => None,
        };
        log_error(&format!(
            "page {page:#x} (vm {:?} index {}) {kind} {n} times in a row: entry {entry:?}, \
             host page resident {:?}, pagemap {:x?}; folio and its pool page (resident, \
             pagemap): {folio:?}",
            region.vm,
            idx.0,
            crate::sys::resident(page),
            crate::sys::pagemap(page),
        ));
    }
}

/// Make page `idx` of `region` present (without parking or reclaiming),
/// for a write access if `write` (otherwise a swapped-in page may be kept
/// clean and write-protected). Used by the handlers and by [`crate::pin`].
///
/// # Context
/// No locks held. Takes the page-table lock of `idx`, then leaf locks; may
/// sleep on a folio lock and do swap I/O (never with a page-table lock held).
pub(crate) fn fault_in(
    inner: &Inner,
    region: &Region,
    idx: PageIndex,
    write: bool,
) -> FaultOutcome {
    if !crate::relocate::ensure_pulled(inner, region, idx) {
        return FaultOutcome::PullBlocked;
    }
    let mut ptl = region.pt.lock(idx);
    if ptl.is_dead() {
        return FaultOutcome::Dead;
    }
    match ptl.pte(idx).state() {
        PteState::Present { folio, subpage } => {
            for c in [&region.counters.faults, &inner.faults] {
                c.raced.fetch_add(1, Relaxed);
            }
            // Usually the install that made the entry present ran between
            // this fault and its handling, and waking the thread is enough.
            // But every install and unmap of a guest page happens under this
            // lock, so a host page absent now (neither mapped nor in host
            // swap) means the two tables disagree.
            if !crate::sys::has_page(region.host_addr(idx).raw()).unwrap_or(true) {
                return restore_unbacked(inner, region, &mut ptl, idx, folio, u64::from(subpage));
            }
            FaultOutcome::Raced
        }
        PteState::None | PteState::Zero => {
            let want = match inner.own_reclaim_recent(&region.counters) {
                true => Order::BASE,
                false => choose_order(&ptl, idx),
            };
            match alloc_for_fault(inner, region, want) {
                Ok(block) => {
                    let first = idx.align_down(block.order);
                    install(inner, region, &mut ptl, first, block);
                    FaultOutcome::Installed(block.order)
                }
                Err(oom) => FaultOutcome::NoMemory { oom },
            }
        }
        PteState::ProtNone { folio, .. } => {
            vmscan::map_prot_none(inner, region, &mut ptl, folio, idx, write);
            FaultOutcome::Refaulted
        }
        PteState::Swap { slot } => {
            drop(ptl);
            swapin::do_swap_page(inner, region, idx, slot, write)
        }
        PteState::SwapinMarker { folio } | PteState::Migration { folio } => {
            // The folio is alive while an entry names it: pin it, drop the
            // page-table lock, and sleep until its owner unlocks it.
            inner.folios.slab().get_ref(folio);
            drop(ptl);
            swapin::wait_on_folio(inner, folio);
            FaultOutcome::Retry
        }
        PteState::Poisoned => {
            // The kernel raises no MISSING fault through a poison marker:
            // if one reached us, the marker is gone. Put it back (`EEXIST`
            // if it is there after all), or the thread, woken, would fault
            // here for ever instead of getting its memory error.
            let addr = region.host_addr(idx).raw();
            // SAFETY: a guest page under the page-table lock we hold, whose
            // entry is `Poisoned`: its data is lost, accesses must fail.
            if let Err(e) = unsafe { inner.uffd.poison(addr, PAGE_SIZE) } {
                if e.errno != libc::EEXIST {
                    log_error(&format!(
                        "UFFDIO_POISON again at {addr:#x}: errno {}",
                        e.errno
                    ));
                }
            }
            FaultOutcome::Poisoned
        }
    }
}

/// Entry `idx` is `Present` (subpage `subpage` of `folio`) but its host
/// page is absent: woken, the faulting thread would fault again, forever.
///
/// This must not happen. The one cause found was a kernel bug: a short
/// `UFFDIO_MOVE` could report fewer pages than it moved (see
/// `sys::userfaultfd::RawUffd::move_pages`, which now corrects the count).
/// A move-out of the guest that stopped short left pages in the folio's
/// pool range while their entries stayed `Present`, so the data is where
/// the move took it: a pool page that holds data (mapped, or in host swap)
/// is moved in again. When that page is gone too (we believe a relabel by
/// compaction, which gives the folio a new pool range and frees the old
/// one, did that in the one loss seen), the page is poisoned, so that the
/// guest gets a memory error, never wrong data.
/// Both are counted and logged. Kept as a safety net now that the count is
/// corrected: a fault must never spin on such a page. The other way here is
/// a page whose `MOVE` and `COPY` fallback both failed
/// (`fallback_page`): its data waits in the pool page, recorded in
/// `stranded` so that a free before this fault zeroes it.
///
/// A clean folio needs no reading of evidence: its swap slot holds its data
/// (checksummed), so it is dropped back to `Swap(slot)` as reclaim drops a
/// clean folio, and the fault, retried, reads it from there. Its pool page
/// is not trusted; and moved in, it would come without the write
/// protection that keeps it clean.
///
/// # Context
/// Page-table lock held (`ptl`); the entry names a live folio.
pub(crate) fn restore_unbacked(
    inner: &Inner,
    region: &Region,
    ptl: &mut PtlGuard<'_>,
    idx: PageIndex,
    folio: FolioId,
    subpage: u64,
) -> FaultOutcome {
    let addr = region.host_addr(idx).raw();
    let (pool, order, clean_slot) = {
        let mut slab = inner.folios.slab();
        let f = slab
            .get_mut(folio)
            .expect("a mapped entry names a live folio");
        let clean_slot = match f.flags.contains(FolioFlags::CLEAN) {
            // The slot's count passes from the folio to the entry.
            true => f.swap.take(),
            false => None,
        };
        f.flags.remove(FolioFlags::CLEAN);
        (f.pool.subpage(subpage), f.order, clean_slot)
    };
    // The entry becomes `pte` and the page leaves the folio's rmap.
    let unmap = |ptl: &mut PtlGuard<'_>, pte: Pte| {
        ptl.set_pte(idx, pte);
        let removal = {
            let mut slab = inner.folios.slab();
            rmap::remove_rmap_ptes(&mut slab, ptl, folio, subpage, 1, BlockState::NeedsZero)
        };
        if let Some(f) = removal.freed {
            inner.free_range(f);
        }
        region.counters.resident(order, -1);
    };
    if let Some(slot) = clean_slot {
        unmap(ptl, Pte::swap(slot));
        swapin::both(inner, region, |c| c.swapped_pages.fetch_add(1, Relaxed));
        for c in [&region.counters.faults, &inner.faults] {
            c.unbacked_from_slot.fetch_add(1, Relaxed);
        }
        log_error(&format!(
            "page {addr:#x} (vm {:?} index {}) was present in our table but not \
             mapped; clean, so read again from its swap slot {slot:?}",
            region.vm, idx.0
        ));
        return FaultOutcome::Retry;
    }
    let pool_addr = inner.pool.host_addr(pool).raw();
    // Counted before the ioctl that wakes the faulting thread.
    if crate::sys::has_page(pool_addr).unwrap_or(false) {
        for c in [&region.counters.faults, &inner.faults] {
            c.unbacked_restored.fetch_add(1, Relaxed);
        }
        // Recorded again by `fallback_page` if this install fails too.
        inner.stranded.forget(pool);
        move_in(inner, region, idx, pool, 1, false);
        log_error(&format!(
            "page {addr:#x} (vm {:?} index {}) was present in our table but not \
             mapped; moved its folio's pool page back in",
            region.vm, idx.0
        ));
        return FaultOutcome::Raced;
    }
    unmap(ptl, Pte::new(PteState::Poisoned));
    for c in [&region.counters.faults, &inner.faults] {
        c.unbacked_poisoned.fetch_add(1, Relaxed);
    }
    // SAFETY: a guest page under the page-table lock we hold (`ptl`),
    // its entry just set `Poisoned`: its data is gone from the guest and the
    // pool, so accesses must fail rather than read zero.
    if let Err(e) = unsafe { inner.uffd.poison(addr, PAGE_SIZE) } {
        log_error(&format!("UFFDIO_POISON at {addr:#x}: errno {}", e.errno));
    }
    log_error(&format!(
        "page {addr:#x} (vm {:?} index {}) was present in our table but not mapped, \
         and its folio's pool page is gone: poisoned",
        region.vm, idx.0
    ));
    FaultOutcome::Raced
}

/// The largest order whose aligned range around `idx` is inside the region
/// and wholly `None` or `Zero`, like mTHP's `alloc_anon_folio()`.
fn choose_order(ptl: &PtlGuard<'_>, idx: PageIndex) -> Order {
    Order::all()
        .rev()
        .find(|&o| {
            let first = idx.align_down(o);
            first >= ptl.first()
                && first.forward(o.nr_pages()) <= ptl.end()
                && ptl.range_is_unbacked(first, o.nr_pages())
        })
        .unwrap_or(Order::BASE)
}

/// Take a ready block of `want`, or of a smaller order if only unready
/// memory of `want` is missing entirely. `Err(oom)` when the fault must wait.
///
/// # Context
/// Page-table lock held; takes the zone lock.
fn alloc_for_fault(inner: &Inner, region: &Region, want: Order) -> Result<Block, bool> {
    let mut buddy = inner.buddy();
    inner.check_watermark(buddy.nr_free());
    if let Some(b) = buddy.alloc(want, BlockState::Ready) {
        return Ok(b);
    }
    // A 2 MiB block the worker can prepare in ~0.1-0.3 ms beats 512 faults
    // on small folios: wait for it rather than fragmenting.
    if buddy.has_unprepared(want) {
        return Err(false);
    }
    let mut o = want;
    while let Some(lower) = o.lower() {
        o = lower;
        if let Some(b) = buddy.alloc(o, BlockState::Ready) {
            for c in [&region.counters.faults, &inner.faults] {
                c.order_fallback.fetch_add(1, Relaxed);
            }
            return Ok(b);
        }
    }
    Err(!buddy.has_unprepared(Order::BASE))
}

/// Install `block` at `[first, first + 2^order)`: move it in, create the
/// folio record and rmap, set the entries.
///
/// # Context
/// The page-table lock covering the range is held (`ptl`), the range is
/// `None`, and `block` is `Ready` and owned by this call.
fn install(inner: &Inner, region: &Region, ptl: &mut PtlGuard<'_>, first: PageIndex, block: Block) {
    // Bookkeeping first: the MOVE wakes the faulting thread, and by then the
    // counters it may read must already include this folio. Nothing else
    // sees the entries before the page-table lock is released.
    let rmap = Rmap {
        vm: region.vm,
        region: region.index,
        index: first,
        mapped: (0, 0),
    };
    let id = {
        let mut slab = inner.folios.slab();
        rmap::add_new_anon_rmap(&mut slab, ptl, block, rmap)
    };
    ptl.map_folio(first, id, block.order);
    region
        .counters
        .resident(block.order, block.order.nr_pages() as i64);
    for c in [&region.counters.faults, &inner.faults] {
        c.installed[block.order.index()].fetch_add(1, Relaxed);
    }
    move_block(inner, region, first, block);
}

/// Move the pool pages of `block` to the guest at `first`, falling back to
/// `COPY`/`ZEROPAGE` page by page where `MOVE` fails.
fn move_block(inner: &Inner, region: &Region, first: PageIndex, block: Block) {
    move_in(
        inner,
        region,
        first,
        block.offset,
        block.order.nr_pages(),
        true,
    );
}

/// Move `nr` pool pages at `pool` to the guest at `first`, falling back to
/// `COPY` page by page where `MOVE` fails (and to `ZEROPAGE` for a pool
/// hole when `zero_ok`: the folio is fresh and zero).
///
/// # Context
/// The page-table lock covering the guest range is held and its entries
/// say the pages are ours to install; the pool range belongs to a folio
/// this call owns (new, or locked), so nothing else references it.
pub(crate) fn move_in(
    inner: &Inner,
    region: &Region,
    first: PageIndex,
    pool: PoolOffset,
    nr: u64,
    zero_ok: bool,
) {
    let dst = region.host_addr(first).raw();
    let src = inner.pool.host_addr(pool).raw();
    let len = nr * PAGE_SIZE;
    let (mut done, mut retries) = (0u64, 0u32);
    let counters = [&region.counters.faults, &inner.faults];
    while done < len {
        let off = done as usize;
        if inner.inject.hit(FaultPoint::GuestPopulated) {
            // Fill the destination's first page behind its entry (tests).
            let _ = inner.uffd.zeropage(dst + off, PAGE_SIZE);
        }
        let r = if inner.inject.hit(FaultPoint::PoolMoveRefused) {
            Err(PartialFill {
                done: 0,
                errno: libc::EINVAL,
            })
        } else {
            // SAFETY: the destination is a hole that this call owns: its
            // entries are not `Present` under the page-table lock, so no
            // other install or discard can touch it, and the manager holds
            // no reference into guest memory. The source belongs to a folio
            // this call owns (see # Context), so nothing else maps or
            // references it.
            unsafe { inner.uffd.move_pages(dst + off, src + off, len - done, 0) }
        };
        let PartialFill { done: d, errno } = match r {
            Ok(()) => return,
            Err(p) => p,
        };
        done += d;
        let retry = (errno == libc::EAGAIN && d > 0)
            || ((errno == libc::EAGAIN || errno == libc::EBUSY) && retries < MAX_MOVE_RETRIES);
        if retry {
            retries += 1;
            counters
                .iter()
                .for_each(|c| _ = c.move_retries.fetch_add(1, Relaxed));
            continue;
        }
        let off = done as usize;
        let src_off = pool.subpage(done / PAGE_SIZE);
        fallback_page(inner, region, dst + off, src_off, errno, zero_ok);
        done += PAGE_SIZE;
        retries = 0;
    }
}

/// Runs of at most this many pages are installed from the pool by `COPY`
/// (no TLB flush; the stale pool copy is zapped later in a batch, see
/// `gather`); longer runs by `MOVE`, whose one flush covers the run.
pub(crate) const COPY_MAX_PAGES: u64 = 1;

/// Install `nr` pages of a folio whose data sits in its pool range at
/// `pool` at the guest pages from `idx` (swapin, swap-cache refault,
/// sampled-out refault): short runs by `COPY`, queueing the pool copy for
/// the batched zap, longer ones by `MOVE` ([`move_in`]). With `wp`, `COPY`
/// installs the pages write-protected; returns whether every page was
/// installed so (always false without `wp`).
///
/// # Context
/// As [`move_in`]: the page-table lock covering the guest range is held,
/// the entries say the pages are ours to install, and the folio's pool
/// range holds its data and is referenced by nothing else.
pub(crate) fn install_from_pool(
    inner: &Inner,
    region: &Region,
    idx: PageIndex,
    pool: PoolOffset,
    nr: u64,
    wp: bool,
) -> bool {
    if nr > COPY_MAX_PAGES {
        move_in(inner, region, idx, pool, nr, false);
        return false;
    }
    let dst = region.host_addr(idx).raw();
    let src = inner.pool.host_addr(pool).raw();
    let mode = if wp { COPY_MODE_WP } else { 0 };
    // SAFETY: `src` is the folio's populated pool range, which this call
    // owns (see # Context) and which nothing writes meanwhile; `dst` is a
    // hole owned under the page-table lock, with no Rust reference into it.
    let r = unsafe { inner.uffd.copy_mode(dst, src, nr * PAGE_SIZE, mode) };
    let copied = match &r {
        Ok(()) => nr,
        Err(p) => p.done / PAGE_SIZE,
    };
    if copied > 0 {
        // The data lives in the guest now; the pool copy is stale.
        inner.zapq.push(pool, copied);
        for c in [&region.counters.swap, &inner.swap_counters] {
            c.copied_in_pages.fetch_add(copied, Relaxed);
        }
    }
    if copied < nr {
        move_in(
            inner,
            region,
            idx.forward(copied),
            pool.subpage(copied),
            nr - copied,
            false,
        );
    }
    wp && copied == nr
}

/// Serve one page that `MOVE` refused with `errno`.
fn fallback_page(
    inner: &Inner,
    region: &Region,
    dst: usize,
    src_off: PoolOffset,
    errno: i32,
    zero_ok: bool,
) {
    let counters = [&region.counters.faults, &inner.faults];
    let src = inner.pool.host_addr(src_off).raw();
    let result = match errno {
        // The guest page is populated already: serve it as is.
        //
        // For a fresh folio (`zero_ok`: `install`, whose block is `Ready`,
        // the only state `alloc_for_fault` takes, and so zero, see
        // `Pool::prepare`) the pool page stays in the pool, zero, which its
        // `NeedsPopulate` state ("zero where present") allows. For every
        // other caller (a swapin or sampled-out refault through
        // `install_from_pool`, `restore_unbacked`, migration's and
        // collapse's remap or undo) the pool page holds the folio's data,
        // which the guest will never see (its page is the one there): it
        // must go, or it stays behind a range later freed as
        // `NeedsPopulate` (a migration target or a sampled-out fresh folio
        // is one while mapped, and teardown frees it so), and reaches the
        // next guest that gets the block. So it is dropped like a COPY
        // fallback's copy, and zeroed where the drop fails.
        libc::EEXIST => {
            counters
                .iter()
                .for_each(|c| _ = c.move_eexist_pages.fetch_add(1, Relaxed));
            if !zero_ok {
                discard_pool_copy(inner, src_off, "after a MOVE met a populated guest page");
            }
            let _ = inner.uffd.wake(dst, PAGE_SIZE as usize);
            return;
        }
        // The pool page is a hole (should not be for a Ready block): the
        // kernel's zero page is the same content.
        libc::ENOENT if zero_ok => {
            counters
                .iter()
                .for_each(|c| _ = c.fallback_zeropage_pages.fetch_add(1, Relaxed));
            inner.uffd.zeropage(dst, PAGE_SIZE)
        }
        _ => {
            counters
                .iter()
                .for_each(|c| _ = c.fallback_copy_pages.fetch_add(1, Relaxed));
            let r = if inner.inject.hit(FaultPoint::FallbackCopyFails) {
                Err(PartialFill {
                    done: 0,
                    errno: libc::ENOMEM,
                })
            } else {
                // SAFETY: `src` is a populated page of a folio this call
                // owns (readable), and `dst` is a hole owned under the
                // page-table lock.
                unsafe { inner.uffd.copy(dst, src, PAGE_SIZE) }
            };
            match &r {
                // The data now lives in the guest: drop the pool copy so the
                // folio's pool range is a hole like a moved one.
                Ok(()) => discard_pool_copy(inner, src_off, "after a COPY fallback"),
                // The guest page is populated already, as in the `EEXIST`
                // of a `MOVE` above (which was refused otherwise first):
                // it is served as is, and the folio's data the guest will
                // never see must not stay in a range later freed as a hole.
                Err(e) if e.errno == libc::EEXIST && !zero_ok => {
                    discard_pool_copy(
                        inner,
                        src_off,
                        "after a COPY fallback met a populated guest page",
                    );
                }
                Err(_) => {}
            }
            r
        }
    };
    if let Err(e) = result {
        if e.errno != libc::EEXIST {
            counters
                .iter()
                .for_each(|c| _ = c.fallback_failed_pages.fetch_add(1, Relaxed));
            // The guest page is still a hole and the folio's data still in
            // its pool page: the woken access faults again and
            // `restore_unbacked` moves it in. Until then the pool page must
            // not be freed as a hole, nor the folio re-labelled away from
            // it (`migrate::relabel`). A fresh folio's page is recorded
            // too: its zero page is the one `restore_unbacked` moves in,
            // and re-labelled without it, the page was poisoned instead.
            inner.stranded.note(src_off);
            log_error(&format!(
                "fallback fill at {dst:#x} failed: errno {}",
                e.errno
            ));
        }
        let _ = inner.uffd.wake(dst, PAGE_SIZE as usize);
    }
}

/// Drop the stale pool copy of a page at `src_off` whose data now lives in
/// the guest (or that the guest will never see), and where the drop fails,
/// zero it in place ([`crate::pool::Pool::drop_or_zero`]).
///
/// Not optional: the folio's record says its pages are in the guest, so
/// the pool range is taken for a hole. When the folio goes, its range is
/// freed as `NeedsPopulate` (teardown, `vm::Region::unmap_all`; a split
/// piece or a relabelled folio too), and preparing such a block only fills
/// holes (`Pool::prepare`), so a copy left there would be handed to the
/// next guest that gets the block. Zeroed, it is what a filled hole would be.
///
/// # Context
/// The caller owns the page: it belongs to a folio this call owns (new or
/// locked), as in [`move_in`].
fn discard_pool_copy(inner: &Inner, src_off: PoolOffset, why: &str) {
    let what = format_args!("drop of the pool copy {why} at");
    crate::gather::clear_logged(&inner.pool, src_off, 1, &what);
}
