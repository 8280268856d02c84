//! The memory manager: pool, allocator, folio table, VMs, handler threads
//! and the pre-zeroing worker, and the public API the VMM calls.

use crate::anon::{AnonError, AnonMapping};
use crate::buddy::{BlockState, Buddy};
use crate::compact::{self, CompactReport};
use crate::discard::{self, DiscardError, DiscardOutcome};
use crate::fault;
use crate::faulter::FaultDelivery;
use crate::folio::{FolioFlags, FolioTable, FreedRange};
use crate::gather::ZapQueue;
use crate::hotplug::{BudgetChange, BudgetError};
use crate::inject::{InjectPlan, Injector};
use crate::migrate;
use crate::pin::{self, PinError, PinGuard};
use crate::pool::Pool;
use crate::prezero;
use crate::pte::PteState;
use crate::relocate::{RelocateError, RelocateOp, RelocateReport, RelocateSwitch};
use crate::stats::{FaultCounters, MmStats, VmCounters, VmStats, WorkerCounters};
use crate::stats::{SwapCounters, SwapDeviceStats};
use crate::stranded::StrandedPages;
use crate::swap_cache::SwapDevice;
use crate::swap_file::{FaultPlan, ImpossibleFaultPlan, SwapConfig, SwapFileError};
use crate::swap_map::SlotState;
use crate::sys::userfaultfd::{RawUffd, FEATURE_MOVE, REGISTER_MODE_MISSING, REGISTER_MODE_WP};
use crate::sys::userfaultfd::{FEATURE_POISON, FEATURE_SIGBUS};
use crate::sys::EventFd;
use crate::types::{GuestAddress, Order, PageIndex, ShowSize, SwapSlot, VmId, PAGE_SIZE};
use crate::vm::{log_error, FolioBackend, Region, VmState};
use crate::vmscan::{self, VmLimits};
use crate::RamRegion;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The most fault handler threads a manager starts ([`MmConfig`]).
pub const MAX_HANDLER_THREADS: usize = 4096;

/// Configuration of a [`MemoryManager`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MmConfig {
    /// Pool size: the host memory all guests share (`--mem-budget`).
    pub budget_bytes: u64,
    /// Userfaultfd handler threads (none are started for
    /// [`FaultDelivery::Faulter`]).
    pub handler_threads: usize,
    /// How guest page faults reach the manager.
    pub fault_delivery: FaultDelivery,
    /// Keep at most this much free memory pre-zeroed (`None`: all of it).
    /// Pre-zeroed memory is populated host memory.
    pub prezero_limit_bytes: Option<u64>,
    /// The swap file (`--swap-file`/`--swap-dir`, `--swap-size`); `None`:
    /// no swap, and faults beyond the budget wait for a discard.
    pub swap: Option<SwapConfig>,
    /// Reclaim settings.
    pub reclaim: ReclaimConfig,
}

/// Reclaim settings of a [`MmConfig`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReclaimConfig {
    /// Run the background reclaimer (`kswapd`). Direct reclaim on faults
    /// runs either way when there is a swap file.
    pub background: bool,
    /// Wake the background reclaimer below this much free memory
    /// (`None`: 1/64 of the budget, at least 2 MiB).
    pub low_watermark_bytes: Option<u64>,
    /// It reclaims until this much is free (`None`: twice the low mark).
    pub high_watermark_bytes: Option<u64>,
    /// A fault that has waited this long for memory is reported as a
    /// memory stall ([`crate::stall`]).
    pub stall_report_after: Duration,
}

impl Default for ReclaimConfig {
    fn default() -> Self {
        ReclaimConfig {
            background: true,
            low_watermark_bytes: None,
            high_watermark_bytes: None,
            stall_report_after: Duration::from_secs(10),
        }
    }
}

/// Watermarks in pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Watermarks {
    pub low: u64,
    pub high: u64,
}

/// The watermarks now: they follow the budget ([`Watermarks::new`] of the
/// budget's pages), as the kernel sets a zone's again when memory is
/// hot-added or removed (`setup_per_zone_wmarks()`).
#[derive(Debug)]
pub(crate) struct WatermarkCell {
    low: AtomicU64,
    high: AtomicU64,
}

impl WatermarkCell {
    fn new(w: Watermarks) -> WatermarkCell {
        WatermarkCell {
            low: AtomicU64::new(w.low),
            high: AtomicU64::new(w.high),
        }
    }

    /// The current watermarks. The two are set one after the other, so a
    /// reader racing a budget change may see one old and one new: each
    /// use compares free memory with one of them at a time.
    pub fn get(&self) -> Watermarks {
        Watermarks {
            low: self.low.load(Relaxed),
            high: self.high.load(Relaxed),
        }
    }

    pub(crate) fn set(&self, w: Watermarks) {
        self.low.store(w.low, Relaxed);
        self.high.store(w.high, Relaxed);
    }
}

impl Watermarks {
    /// The watermarks for a budget of `pool_pages`: the configured ones,
    /// or a 64th of the budget (at least 2 MiB) and twice that; at most
    /// half the budget and the whole budget.
    pub(crate) fn new(c: &ReclaimConfig, pool_pages: u64) -> Watermarks {
        let low = c
            .low_watermark_bytes
            .map_or((pool_pages / 64).max(512), |b| b / PAGE_SIZE)
            .min(pool_pages / 2);
        let high = c
            .high_watermark_bytes
            .map_or(low * 2, |b| b / PAGE_SIZE)
            .max(low)
            .min(pool_pages);
        Watermarks { low, high }
    }
}

impl MmConfig {
    /// A budget of `bytes` with two handler threads and full pre-zeroing.
    pub fn with_budget(bytes: u64) -> MmConfig {
        MmConfig {
            budget_bytes: bytes,
            handler_threads: 2,
            fault_delivery: FaultDelivery::Handlers,
            prezero_limit_bytes: None,
            swap: None,
            reclaim: ReclaimConfig::default(),
        }
    }
}

/// How [`MemoryManager::debug_unmap_behind_entry`] takes a page away.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DebugUnmap {
    /// Dropped: its data is gone.
    Drop,
    /// Moved to its folio's pool page, as if an install had not moved it.
    IntoPool,
    /// Moved to its folio's pool page, which is then overwritten: the pool
    /// page is not the page's data.
    IntoPoolScribbled,
}

/// Errors from [`MemoryManager::new`].
#[derive(Debug, thiserror::Error)]
pub enum MmError {
    /// The budget is smaller than one page or there are no handler threads.
    #[error("invalid memory manager config: {0}")]
    BadConfig(&'static str),
    /// The pool could not be mapped.
    #[error("cannot map the pool")]
    Pool(#[source] AnonError),
    /// userfaultfd could not be opened with `UFFD_FEATURE_MOVE`.
    #[error("cannot open userfaultfd with UFFD_FEATURE_MOVE")]
    Userfaultfd(#[source] io::Error),
    /// The pool could not be registered on the userfaultfd.
    #[error("cannot register the pool on userfaultfd")]
    RegisterPool(#[source] io::Error),
    /// A thread could not be started.
    #[error("cannot start a memory manager thread")]
    Thread(#[source] io::Error),
    /// The `SIGBUS` handler of [`FaultDelivery::Faulter`] could not be installed.
    #[error("cannot install the SIGBUS handler that serves faults on the faulting thread")]
    SignalHandler(#[source] io::Error),
    /// The swap file could not be set up.
    #[error("cannot set up the swap file")]
    Swap(#[source] SwapFileError),
}

/// Errors from VM lookups and [`MemoryManager::destroy_vm`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VmError {
    /// No VM has this id (never created, or destroyed).
    #[error("no VM {0:?}")]
    NoSuchVm(VmId),
    /// The VMs' minimums would add up to more than the budget; reclaim
    /// never takes a VM below its minimum, so no VM could then grow.
    #[error(
        "the VMs' minimums would add up to {needed} bytes, more than the {budget}-byte budget"
    )]
    MinimumsAboveBudget {
        /// What the minimums would add up to.
        needed: u64,
        /// The budget now.
        budget: u64,
    },
    /// The range is empty, or not inside one guest RAM region of the VM.
    #[error("range {gpa:#x}+{len:#x} is not inside one guest RAM region")]
    OutOfRange {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// Every VM id was handed out (ids are not reused).
    #[error(
        "no VM id left: this manager has handed out all 2^32 - 1 of them (ids are not reused)"
    )]
    IdsExhausted,
    /// The minimum is above the maximum: reclaim enforcing the maximum
    /// would take the VM below its minimum.
    #[error("the VM's minimum of {} is above its maximum of {}", ShowSize(*min), ShowSize(*max))]
    MinAboveMax {
        /// The minimum asked for.
        min: u64,
        /// The maximum asked for.
        max: u64,
    },
}

/// Errors from [`MemoryManager::reclaim`] and [`MemoryManager::inject_swap_faults`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReclaimError {
    /// No VM has this id.
    #[error("no VM {0:?}")]
    NoSuchVm(VmId),
    /// The manager has no swap file, so nothing can be reclaimed.
    #[error("no swap file configured")]
    NoSwap,
    /// A swap fault plan names a fault its I/O cannot have.
    #[error(transparent)]
    BadFaultPlan(#[from] ImpossibleFaultPlan),
}

/// Errors from [`MemoryManager::backend`].
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// No VM has this id.
    #[error("no VM {0:?}")]
    NoSuchVm(VmId),
    /// The VM already has its guest memory.
    #[error("VM {0:?} already has guest memory")]
    AlreadyCreated(VmId),
    /// A region is empty, unaligned, or overlaps another.
    #[error("bad guest RAM region at {guest_base:#x} size {size:#x}")]
    BadLayout {
        /// Guest base of the offending region.
        guest_base: u64,
        /// Its size.
        size: u64,
    },
    /// The layout names no region: the VM would get no memory, and could
    /// not ask again.
    #[error("VM {0:?}: a guest RAM layout needs at least one region")]
    NoRegions(VmId),
    /// The host offset of [`MemoryManager::backend_with_offset`] is not a
    /// multiple of 4 KiB below 2 MiB.
    #[error("host offset {0:#x} is not a multiple of 4 KiB below 2 MiB")]
    BadHostOffset(u64),
    /// A region could not be mapped.
    #[error("cannot map guest RAM")]
    Mmap(#[source] AnonError),
    /// A region could not be registered on the userfaultfd.
    #[error("cannot register guest RAM on userfaultfd")]
    Register(#[source] io::Error),
}

/// How guest regions are registered: missing faults, and WP faults for
/// the write protection of clean folios ([`FolioFlags::CLEAN`]).
pub(crate) const GUEST_REGISTER_MODE: u64 = REGISTER_MODE_MISSING | REGISTER_MODE_WP;

/// Shared state of the manager, reachable from its threads.
#[derive(Debug)]
pub(crate) struct Inner {
    pub uffd: RawUffd,
    pub pool: Pool,
    /// The zone lock. Leaf.
    pub buddy: Mutex<Buddy>,
    pub folios: FolioTable,
    /// Stale pool copies of folios installed by COPY, waiting for one
    /// batched zap (`gather`). Leaf.
    pub zapq: ZapQueue,
    /// Pool pages holding a mapped folio's data after a failed install
    /// (see `stranded`): a freed range with one is zeroed.
    pub stranded: StrandedPages,
    /// Registered guest regions by host start. Leaf, never held while faulting.
    regions: RwLock<BTreeMap<usize, Arc<Region>>>,
    /// Live VMs. Leaf.
    vms: Mutex<HashMap<VmId, Arc<VmState>>>,
    next_vm: AtomicU32,
    pub faults: FaultCounters,
    pub workers: WorkerCounters,
    /// Faults parked waiting for memory, retried by the pre-zeroing
    /// worker. Leaf.
    pub pending: Mutex<Vec<crate::stall::Parked>>,
    /// Worker wake-up flag. Leaf.
    kick: Mutex<bool>,
    kick_cv: Condvar,
    /// Signalled when ready memory appears (for pin's waits).
    memory_cv: Condvar,
    /// Notifications of `memory_cv` so far; changed under `kick`.
    memory_events: AtomicU64,
    /// Pages taken off the allocator by the pre-zeroing worker. Changed
    /// only under the zone lock, with the free lists, so that a reader
    /// holding that lock sees every page in one of the two.
    pub isolated_pages: AtomicU64,
    pub prezero_limit_pages: u64,
    pub shutdown: AtomicBool,
    pub stop_fd: EventFd,
    /// The swap file, swap map and swap cache.
    pub swap: Option<SwapDevice>,
    /// Swap and reclaim counters of all VMs.
    pub swap_counters: SwapCounters,
    /// Free memory below `low` wakes the background reclaimer, which frees
    /// up to `high`; they follow the budget.
    pub watermarks: WatermarkCell,
    /// See [`ReclaimConfig::stall_report_after`].
    pub stall_report_after: Duration,
    /// Reclaim passes and fault services running now (for
    /// [`MemoryManager::wait_idle`]).
    pub reclaimers: AtomicU64,
    /// Pool compaction passes running now: the pre-zeroing worker holds
    /// off while one runs (see `prezero::prepare_one`).
    pub compacting: AtomicU64,
    /// Threads in [`Inner::wait_for_memory`]: the worker never holds off
    /// while one waits.
    pub memory_waiters: AtomicU64,
    /// Unpins seen by [`Inner::wait_unpin`] waiters (a generation). Leaf.
    unpins: Mutex<u64>,
    unpin_cv: Condvar,
    /// Threads that may wait for an unpin (counted before they look).
    unpin_waiters: AtomicU64,
    /// A fault was parked because its table's pull was held back
    /// (`FaultOutcome::PullBlocked`): an unpin or a pull kicks the worker
    /// to retry it. Cleared when the worker takes the parked faults.
    pub pulls_parked: AtomicBool,
    /// Unpins and pulls so far ([`Inner::note_unpin`], [`Inner::note_pull`]):
    /// a fault that parks on a held-back pull compares it with what it read
    /// before trying, so that an unpin between its failed pull and its
    /// `pulls_parked` store still has the worker retry it.
    pub pull_events: AtomicU64,
    /// When reclaim last ran, in ns since `started` (0: never).
    last_reclaim_ns: AtomicU64,
    /// The manager's creation, the epoch of `last_reclaim_ns`.
    started: Instant,
    /// Background reclaimer wake-up flag. Leaf.
    kswapd_kick: Mutex<bool>,
    kswapd_cv: Condvar,
    /// Armed fault points of migration and relocation (tests, drills);
    /// the pool's own (it obeys [`crate::FaultPoint::PoolDrop`]).
    pub inject: Arc<Injector>,
    /// Background compaction wake-up flag. Leaf.
    kcompactd_kick: Mutex<bool>,
    kcompactd_cv: Condvar,
    /// VM teardowns handed to the pre-zeroing worker by a `SIGBUS`
    /// handler ([`Inner::defer_teardown`]). Leaf.
    deferred_teardowns: Mutex<Vec<crate::vm::Teardown>>,
}

/// How long after reclaim last ran the pool counts as under reclaim
/// pressure ([`Inner::under_reclaim`]).
const RECLAIM_RECENT: Duration = Duration::from_secs(1);

impl Inner {
    /// Reclaim just looked at a VM's folios (sampled or evicted some).
    pub fn note_reclaim(&self) {
        let ns = self.started.elapsed().as_nanos() as u64;
        self.last_reclaim_ns.store(ns.max(1), Relaxed);
    }

    /// Whether reclaim ran within [`RECLAIM_RECENT`]: the budget is
    /// spent, and new allocations are mostly swapins.
    pub fn under_reclaim(&self) -> bool {
        let last = self.last_reclaim_ns.load(Relaxed);
        let now = self.started.elapsed().as_nanos() as u64;
        last != 0 && now.saturating_sub(last) < RECLAIM_RECENT.as_nanos() as u64
    }

    /// A fault of the VM of `c` swapped out the VM's own memory to make
    /// room ([`crate::vmscan`]'s `reclaim_own`): every VM is at its minimum.
    pub(crate) fn note_own_reclaim(&self, c: &crate::stats::VmCounters) {
        let ns = self.started.elapsed().as_nanos() as u64;
        c.own_reclaim_ns.store(ns.max(1), Relaxed);
    }

    /// Whether a fault of the VM of `c` reclaimed its own memory within
    /// [`RECLAIM_RECENT`]. Its faults then take order-0 folios (first
    /// touch and swapin), like a THP fault that its memcg cannot charge:
    /// the VM lives in its minimum plus at most the 2 MiB its own reclaim
    /// may take below it, and a fault that filled that room with a large
    /// folio made the next fault of the same access evict it again. An
    /// access needing two pages in different 2 MiB ranges (an unaligned
    /// word, a page walk) then never completed: each fault evicted the
    /// other page's 2 MiB folio to install its own.
    pub(crate) fn own_reclaim_recent(&self, c: &crate::stats::VmCounters) -> bool {
        let last = c.own_reclaim_ns.load(Relaxed);
        let now = self.started.elapsed().as_nanos() as u64;
        last != 0 && now.saturating_sub(last) < RECLAIM_RECENT.as_nanos() as u64
    }

    /// Have the pre-zeroing worker run `t`: a VM's last reference went in
    /// a fault served in a `SIGBUS` handler (see `VmState`'s drop).
    pub(crate) fn defer_teardown(&self, t: crate::vm::Teardown) {
        self.deferred_teardowns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(t);
        self.kick_worker();
    }

    /// Run the teardowns [`Inner::defer_teardown`] handed over.
    ///
    /// # Context
    /// The pre-zeroing worker, or the manager's drop after it stopped; no
    /// lock held.
    pub(crate) fn run_deferred_teardowns(&self) {
        let ts = std::mem::take(
            &mut *self
                .deferred_teardowns
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for t in ts {
            t.run(self);
        }
    }

    /// Take the zone lock.
    pub fn buddy(&self) -> MutexGuard<'_, Buddy> {
        self.buddy.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The registered region holding host address `addr`.
    pub fn lookup(&self, addr: usize) -> Option<Arc<Region>> {
        let map = self.regions.read().unwrap_or_else(|e| e.into_inner());
        let (_, r) = map.range(..=addr).next_back()?;
        r.page_of_host(addr).map(|_| r.clone())
    }

    /// Make `r` findable by host address (faults on it are served).
    pub fn register_region(&self, r: &Arc<Region>) {
        let mut map = self.regions.write().unwrap_or_else(|e| e.into_inner());
        map.insert(r.host_base().raw(), r.clone());
    }

    pub fn unregister_region(&self, r: &Region) {
        let mut map = self.regions.write().unwrap_or_else(|e| e.into_inner());
        map.remove(&r.host_base().raw());
    }

    /// Region `index` of VM `vm`, if the VM is alive.
    pub fn find_region(&self, vm: crate::types::VmId, index: u32) -> Option<Arc<Region>> {
        let vms = self.vms.lock().unwrap_or_else(|e| e.into_inner());
        vms.get(&vm)?.region_by_id(index)
    }

    /// Return a freed folio range to the allocator.
    pub fn free_range(&self, f: FreedRange) {
        self.free_ranges(std::slice::from_ref(&f));
    }

    /// Return freed folio ranges to the allocator, under one zone lock.
    pub fn free_ranges(&self, ranges: &[FreedRange]) {
        if ranges.is_empty() {
            return;
        }
        for slot in ranges.iter().filter_map(|f| f.clean_slot) {
            self.release_clean_slot(slot);
        }
        // A range still queued for its zap must not be handed out again.
        self.zapq.ensure_holes(
            &self.pool,
            ranges.iter().map(|f| (f.pool, f.order.nr_pages())),
        );
        // Taken before the zone lock: both are leaves.
        let states = self.stranded.claim(ranges);
        let short_of_ready = {
            let mut buddy = self.buddy();
            for (i, f) in ranges.iter().enumerate() {
                let state = states.as_ref().map_or(f.state, |s| s[i]);
                if let Err(e) = buddy.free(f.pool, f.order, state) {
                    // A double free is a bug; refuse it rather than corrupt
                    // the lists.
                    log_error(&format!("free of {f:?}: {e}"));
                    debug_assert!(false, "free of {f:?}: {e}");
                }
            }
            let fa = buddy.stats();
            fa.ready_pages < crate::prezero::ready_target(self, &fa)
        };
        // Under reclaim the worker keeps only a little memory ready, and
        // reclaim frees a folio at a time: waking it for each (a futex
        // call, a context switch and a look at the free lists) found
        // nothing to do nearly every time. So only when it has work.
        if short_of_ready || self.awaits_worker() {
            self.kick_worker();
        }
    }

    /// Whether a fault waits for the worker: parked for lack of ready
    /// memory, or a thread in [`Inner::wait_for_memory`].
    fn awaits_worker(&self) -> bool {
        self.memory_waiters.load(Relaxed) > 0 || self.faults_parked()
    }

    /// Whether faults are parked for the worker to retry ([`Inner::pending`]).
    pub(crate) fn faults_parked(&self) -> bool {
        !self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// Queue the count a clean folio held on `slot` for release (the folio
    /// was freed, or written, or lost its write protection); see
    /// [`SwapDevice::release_clean`].
    ///
    /// # Context
    /// Any; takes a leaf lock.
    pub fn release_clean_slot(&self, slot: SwapSlot) {
        if let Some(d) = self.swap.as_ref() {
            d.release_clean(slot);
        }
    }

    /// Take away the clean state of folio `id`, if it has it, releasing its
    /// slot: a path is about to move its pages without write protection.
    ///
    /// Returns whether it was clean. The flag is tested and cleared under
    /// the folio-table lock, so of racing callers one releases the slot.
    ///
    /// # Context
    /// Any lock but the folio-table lock may be held; takes it and a leaf
    /// lock.
    pub fn clear_clean(&self, id: crate::types::FolioId) -> bool {
        let slot = {
            let mut slab = self.folios.slab();
            let Some(f) = slab.get_mut(id) else {
                return false;
            };
            if !f.flags.contains(FolioFlags::CLEAN) {
                return false;
            }
            f.flags.remove(FolioFlags::CLEAN);
            f.swap.take()
        };
        if let Some(slot) = slot {
            self.release_clean_slot(slot);
        }
        true
    }

    /// Drop `nr` references on `id` (`folio_put_refs()`) and return its pool
    /// range to the allocator if that was the last.
    ///
    /// # Context
    /// Takes the folio-table lock, then (after it) the zone lock.
    pub fn put_folio(&self, id: crate::types::FolioId, nr: u32) {
        let freed = self.folios.slab().put_refs(id, nr);
        if let Some(f) = freed {
            self.free_range(f);
        }
    }

    /// Wake the pre-zeroing worker.
    pub fn kick_worker(&self) {
        let mut k = self.kick.lock().unwrap_or_else(|e| e.into_inner());
        // Already kicked: the worker sees the flag before it sleeps again,
        // so a second wake-up (a futex syscall) would be wasted.
        if !std::mem::replace(&mut *k, true) {
            self.workers.worker_kicks.fetch_add(1, Relaxed);
            self.kick_cv.notify_one();
        }
    }

    /// Worker side: wait for a kick or `timeout`.
    pub fn wait_kick(&self, timeout: Duration) {
        let mut k = self.kick.lock().unwrap_or_else(|e| e.into_inner());
        if !*k {
            k = self
                .kick_cv
                .wait_timeout(k, timeout)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *k = false;
    }

    /// Worker side: ready memory appeared.
    pub fn notify_memory(&self) {
        let _k = self.kick.lock().unwrap_or_else(|e| e.into_inner());
        self.memory_events.fetch_add(1, Relaxed);
        self.memory_cv.notify_all();
    }

    /// Wait (bounded) for the worker to make memory ready. Returns false at
    /// the timeout.
    ///
    /// # Context
    /// No manager lock held. Not for handler threads (they park instead).
    pub fn wait_for_memory(&self, timeout: Duration) -> bool {
        self.wait_memory(timeout, true)
    }

    /// Wait (bounded) for memory to be freed: a folio freed while anyone
    /// waits kicks the worker ([`Inner::free_ranges`]'s
    /// `awaits_worker`), whose pass ends the wait; so does any other pass
    /// (a timed one, or one another thread kicked), so the caller looks
    /// again at what it waits for. Unlike [`Inner::wait_for_memory`] it
    /// does not kick the worker itself: that pass would end the wait at
    /// once, and a caller waiting for reclaim in flight would spin.
    /// Returns false at the timeout.
    ///
    /// # Context
    /// As [`Inner::wait_for_memory`].
    pub fn wait_for_freed(&self, timeout: Duration) -> bool {
        self.wait_memory(timeout, false)
    }

    /// One of a caller's successive waits for memory, each followed by a
    /// new look: [`Inner::wait_for_memory`] when `first` (the worker is
    /// kicked), [`Inner::wait_for_freed`] after that (its passes end the
    /// waits), as a parked fault is kicked once and then retried by the
    /// worker's passes. Kicking at every look ended each wait at once with
    /// the pass it started: a fault stalled for memory burned a CPU and
    /// kicked the worker 45,000 times a second
    /// (`a_faulting_thread_waiting_for_memory_sleeps` in
    /// `mem/tests/faulter.rs`).
    ///
    /// # Context
    /// As [`Inner::wait_for_memory`].
    pub fn wait_memory(&self, timeout: Duration, first: bool) -> bool {
        // Counted before the kick, so the worker it wakes sees it.
        self.memory_waiters.fetch_add(1, Relaxed);
        // A notification between the kick and the wait below still ends
        // the wait: it is counted, not only signalled.
        let seen = self.memory_events.load(Relaxed);
        if first {
            self.kick_worker();
        }
        let k = self.kick.lock().unwrap_or_else(|e| e.into_inner());
        let woken = !self
            .memory_cv
            .wait_timeout_while(k, timeout, |_| self.memory_events.load(Relaxed) == seen)
            .unwrap_or_else(|e| e.into_inner())
            .1
            .timed_out();
        self.memory_waiters.fetch_sub(1, Relaxed);
        woken
    }

    /// Give the 2 MiB of pool around the block at `off` a page table before
    /// a block smaller than 2 MiB in it is written (prepared, read into by
    /// a swapin, or copied into by a migration). Where the 2 MiB has none
    /// (it went to a guest as one PMD, or was dropped whole, and was split
    /// since), a write fault there faults in a whole THP: the pool ranges
    /// of the other blocks of that 2 MiB fill with zero pages, among them
    /// those of folios whose pages are in a guest, which must stay holes (a
    /// MOVE out of the guest into a populated range fails with `EEXIST`, so
    /// such a folio could never be sampled, reclaimed or migrated again),
    /// and of offline blocks, which must take no host memory.
    /// `UFFDIO_ZEROPAGE` of the block's first page allocates a page table
    /// instead (`mfill_atomic()` never installs a THP); `EEXIST` means the
    /// page is there, so the table is too. The zero page it maps is
    /// replaced by the write that follows.
    ///
    /// # Context
    /// The caller owns the block (no one else writes or maps its pages).
    pub(crate) fn anchor_pool_table(&self, off: crate::types::PoolOffset) {
        let addr = self.pool.host_addr(off).raw();
        if let Err(e) = self.uffd.zeropage(addr, PAGE_SIZE) {
            if e.errno != libc::EEXIST {
                log_error(&format!(
                    "UFFDIO_ZEROPAGE in the pool at {addr:#x}: errno {}",
                    e.errno
                ));
            }
        }
    }

    /// A folio's last pin went (see `pin::PinGuard`): wake the threads in
    /// [`Inner::wait_unpin`], if any. Without waiters no lock is taken.
    pub fn note_unpin(&self) {
        self.wake_unpin_waiters();
    }

    /// A relocation moved on: a table was pulled, the new region went
    /// live, or the relocation was undone (its pending tables closed).
    /// Wakes the threads in [`Inner::wait_unpin`] waiting for a pull that a
    /// pin held back (see `relocate::wait_pulled`) or for the region to go
    /// live, if any. Without waiters no lock is taken.
    ///
    /// # Context
    /// No page-table or folio lock held.
    pub(crate) fn note_pull(&self) {
        self.wake_unpin_waiters();
    }

    fn wake_unpin_waiters(&self) {
        // A fault parked on a held-back pull: have the worker retry it now
        // rather than on its next timed round. (SeqCst with the parking
        // fault's store of the flag and load of the count: either this
        // load sees the flag or that load sees the count move.)
        self.pull_events.fetch_add(1, SeqCst);
        if self.pulls_parked.load(SeqCst) {
            self.kick_worker();
        }
        if self.unpin_waiters.load(SeqCst) > 0 {
            *self.unpins.lock().unwrap_or_else(|e| e.into_inner()) += 1;
            self.unpin_cv.notify_all();
        }
    }

    /// Run `attempt` until it returns `Some`, sleeping between tries until
    /// some folio's last pin goes or a relocation moves on
    /// ([`Inner::note_pull`]), or `limit` passes: then `None`. For paths
    /// that must not fail on a transient pin (a relocation's undo, a pin
    /// whose table's pull another pin holds back). The waiter counts
    /// itself before each attempt looks at pin counts or pending tables,
    /// so an unpin or a pull after that look always wakes it.
    ///
    /// # Context
    /// No locks held.
    pub fn wait_unpin<T>(
        &self,
        limit: Duration,
        mut attempt: impl FnMut() -> Option<T>,
    ) -> Option<T> {
        let start = Instant::now();
        self.unpin_waiters.fetch_add(1, SeqCst);
        let r = loop {
            let seen = *self.unpins.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(r) = attempt() {
                break Some(r);
            }
            let Some(left) = limit.checked_sub(start.elapsed()) else {
                break None;
            };
            let g = self.unpins.lock().unwrap_or_else(|e| e.into_inner());
            let _ = self
                .unpin_cv
                .wait_timeout_while(g, left, |g| *g == seen)
                .unwrap_or_else(|e| e.into_inner());
        };
        self.unpin_waiters.fetch_sub(1, SeqCst);
        r
    }

    /// Wake the background reclaimer.
    pub fn kick_kswapd(&self) {
        *self.kswapd_kick.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.kswapd_cv.notify_one();
    }

    /// Background reclaimer side: wait for a kick or `timeout`.
    pub fn wait_kswapd(&self, timeout: Duration) {
        let mut k = self.kswapd_kick.lock().unwrap_or_else(|e| e.into_inner());
        if !*k {
            k = self
                .kswapd_cv
                .wait_timeout(k, timeout)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *k = false;
    }

    /// Wake the background compactor.
    pub fn kick_kcompactd(&self) {
        *self
            .kcompactd_kick
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = true;
        self.kcompactd_cv.notify_one();
    }

    /// Background compactor side: wait for a kick or `timeout`.
    pub fn wait_kcompactd(&self, timeout: Duration) {
        let mut k = self
            .kcompactd_kick
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if !*k {
            k = self
                .kcompactd_cv
                .wait_timeout(k, timeout)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *k = false;
    }

    /// Kick the background reclaimer if free memory is below the low mark.
    pub fn check_watermark(&self, free_pages: u64) {
        if free_pages < self.watermarks.get().low && self.swap.is_some() {
            self.kick_kswapd();
        }
    }

    /// Every live VM.
    pub fn live_vms(&self) -> Vec<Arc<VmState>> {
        self.vms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// VM `id`, if alive.
    pub fn vm(&self, id: VmId) -> Option<Arc<VmState>> {
        self.vms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    }
}

/// The memory manager. Several VMs share one manager: one pool, one
/// userfaultfd (with the pool and every guest region registered on it), one
/// set of handler threads and one pre-zeroing worker.
#[derive(Debug)]
pub struct MemoryManager {
    inner: Arc<Inner>,
    config: MmConfig,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Serialises [`MemoryManager::set_budget`]; outermost, held across
    /// its reclaim.
    budget_lock: Mutex<()>,
}

impl MemoryManager {
    /// Map the pool, open the userfaultfd and start the handler threads and
    /// the pre-zeroing worker.
    ///
    /// # Errors
    /// See [`MmError`].
    pub fn new(config: MmConfig) -> Result<Arc<MemoryManager>, MmError> {
        if config.budget_bytes < PAGE_SIZE {
            return Err(MmError::BadConfig("budget below one page"));
        }
        let faulter = config.fault_delivery == FaultDelivery::Faulter;
        if config.handler_threads == 0 && !faulter {
            return Err(MmError::BadConfig("no handler threads"));
        }
        if config.handler_threads > MAX_HANDLER_THREADS {
            // Started one by one until the host refused, they would take
            // long and end in a `Thread` error anyway.
            return Err(MmError::BadConfig("more than 4096 handler threads"));
        }
        let swap = match &config.swap {
            Some(c) => Some(SwapDevice::new(c).map_err(MmError::Swap)?),
            None => None,
        };
        let pool = Pool::new(config.budget_bytes).map_err(MmError::Pool)?;
        let sigbus = if faulter { FEATURE_SIGBUS } else { 0 };
        let uffd =
            RawUffd::open(FEATURE_MOVE | FEATURE_POISON | sigbus).map_err(MmError::Userfaultfd)?;
        let watermarks = Watermarks::new(&config.reclaim, pool.nr_pages());
        // SAFETY: the pool is the manager's own mapping, just made. WP mode
        // raises a fault only on a page write-protected through this fd, and
        // every one is answered (`fault::handle_wp_fault` lifts a protection
        // it finds in the pool); MISSING is never registered here.
        unsafe { uffd.register(pool.base().raw(), pool.len(), REGISTER_MODE_WP) }
            .map_err(MmError::RegisterPool)?;
        let limit = config
            .prezero_limit_bytes
            .map_or(u64::MAX, |b| b / PAGE_SIZE);
        let inject = pool.injector().clone();
        let inner = Arc::new(Inner {
            buddy: Mutex::new(Buddy::new(pool.nr_pages(), BlockState::NeedsPopulate)),
            uffd,
            pool,
            folios: FolioTable::default(),
            zapq: ZapQueue::default(),
            stranded: StrandedPages::default(),
            regions: RwLock::default(),
            vms: Mutex::default(),
            next_vm: AtomicU32::new(0),
            faults: FaultCounters::default(),
            workers: WorkerCounters::default(),
            pending: Mutex::default(),
            kick: Mutex::new(true),
            kick_cv: Condvar::new(),
            memory_cv: Condvar::new(),
            memory_events: AtomicU64::new(0),
            isolated_pages: AtomicU64::new(0),
            prezero_limit_pages: limit,
            shutdown: AtomicBool::new(false),
            stop_fd: EventFd::new().map_err(MmError::Thread)?,
            swap,
            swap_counters: SwapCounters::default(),
            watermarks: WatermarkCell::new(watermarks),
            stall_report_after: config.reclaim.stall_report_after,
            reclaimers: AtomicU64::new(0),
            compacting: AtomicU64::new(0),
            memory_waiters: AtomicU64::new(0),
            unpins: Mutex::new(0),
            unpin_cv: Condvar::new(),
            unpin_waiters: AtomicU64::new(0),
            pulls_parked: AtomicBool::new(false),
            pull_events: AtomicU64::new(0),
            last_reclaim_ns: AtomicU64::new(0),
            started: Instant::now(),
            kswapd_kick: Mutex::new(false),
            kswapd_cv: Condvar::new(),
            inject,
            kcompactd_kick: Mutex::new(false),
            kcompactd_cv: Condvar::new(),
            deferred_teardowns: Mutex::default(),
        });
        if faulter {
            crate::faulter::register(&inner).map_err(MmError::SignalHandler)?;
        }
        let mm = Arc::new(MemoryManager {
            inner,
            config,
            threads: Mutex::default(),
            budget_lock: Mutex::default(),
        });
        mm.spawn_threads()?;
        Ok(mm)
    }

    fn spawn_threads(&self) -> Result<(), MmError> {
        let mut threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        let handlers = match self.config.fault_delivery {
            FaultDelivery::Handlers => self.config.handler_threads,
            FaultDelivery::Faulter => 0,
        };
        for i in 0..handlers {
            let inner = self.inner.clone();
            let t = std::thread::Builder::new()
                .name(format!("uffd-handler-{i}"))
                .spawn(move || fault::handler_thread(&inner))
                .map_err(MmError::Thread)?;
            threads.push(t);
        }
        let inner = self.inner.clone();
        let t = std::thread::Builder::new()
            .name("mm-prezero".into())
            .spawn(move || prezero::worker_thread(&inner))
            .map_err(MmError::Thread)?;
        threads.push(t);
        if self.inner.swap.is_some() && self.config.reclaim.background {
            let inner = self.inner.clone();
            let t = std::thread::Builder::new()
                .name("mm-kswapd".into())
                .spawn(move || vmscan::kswapd_thread(&inner))
                .map_err(MmError::Thread)?;
            threads.push(t);
        }
        let inner = self.inner.clone();
        let t = std::thread::Builder::new()
            .name("mm-kcompactd".into())
            .spawn(move || compact::kcompactd_thread(&inner))
            .map_err(MmError::Thread)?;
        threads.push(t);
        Ok(())
    }

    /// The configuration.
    pub fn config(&self) -> &MmConfig {
        &self.config
    }

    /// The shared state, for in-crate tests that drive internals directly.
    #[cfg(test)]
    pub(crate) fn inner(&self) -> &Inner {
        &self.inner
    }

    /// Create a VM (with no memory yet).
    ///
    /// # Errors
    /// [`VmError::IdsExhausted`] once 2^32 - 1 VMs were created: ids are never
    /// reused, so a late request about a destroyed VM cannot reach a new one.
    pub fn create_vm(&self, name: &str) -> Result<VmId, VmError> {
        let id = self
            .inner
            .next_vm
            .fetch_update(Relaxed, Relaxed, |n| n.checked_add(1))
            .map(VmId)
            .map_err(|_| VmError::IdsExhausted)?;
        let vm = Arc::new(VmState::new(id, name, self.inner.clone()));
        self.inner
            .vms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, vm);
        Ok(id)
    }

    /// Create the guest RAM of `vm`: one 2 MiB-aligned anonymous mapping
    /// per `(guest base, size)`, registered MISSING on the userfaultfd.
    /// Faults are served from the moment this returns.
    ///
    /// # Errors
    /// See [`BackendError`]. After any but
    /// [`BackendError::AlreadyCreated`] the VM still has no memory, and
    /// may ask again.
    pub fn backend(
        self: &Arc<Self>,
        vm: VmId,
        layout: &[(GuestAddress, u64)],
    ) -> Result<Arc<FolioBackend>, BackendError> {
        self.backend_with_offset(vm, layout, 0)
    }

    /// [`MemoryManager::backend`] with every host mapping placed
    /// `host_offset` bytes past a 2 MiB boundary (a multiple of 4 KiB below
    /// 2 MiB). A misaligned mapping cannot be PMD-mapped on the host: this
    /// exists to show what relocation `--to-aligned` repairs.
    ///
    /// # Errors
    /// See [`BackendError`]; [`BackendError::BadHostOffset`] for a bad
    /// offset.
    pub fn backend_with_offset(
        self: &Arc<Self>,
        vm: VmId,
        layout: &[(GuestAddress, u64)],
        host_offset: u64,
    ) -> Result<Arc<FolioBackend>, BackendError> {
        if !host_offset.is_multiple_of(PAGE_SIZE) || host_offset >= crate::anon::HUGE_PAGE_SIZE {
            return Err(BackendError::BadHostOffset(host_offset));
        }
        let state = self.inner.vm(vm).ok_or(BackendError::NoSuchVm(vm))?;
        if layout.is_empty() {
            return Err(BackendError::NoRegions(vm));
        }
        check_layout(layout)?;
        if state.created.swap(true, Relaxed) {
            return Err(BackendError::AlreadyCreated(vm));
        }
        // A failure leaves the VM as it was: without memory, free to ask
        // again (the claim above only keeps two callers from racing).
        let ram = self
            .create_regions(&state, layout, host_offset)
            .inspect_err(|_| {
                state.created.store(false, Relaxed);
            })?;
        Ok(Arc::new(FolioBackend {
            _mm: self.clone(),
            vm: state,
            ram,
        }))
    }

    /// Map and register `state`'s regions; on failure, none is left
    /// mapped or registered.
    fn create_regions(
        &self,
        state: &VmState,
        layout: &[(GuestAddress, u64)],
        host_offset: u64,
    ) -> Result<Vec<RamRegion>, BackendError> {
        let mut regions = Vec::with_capacity(layout.len());
        for &(base, size) in layout {
            let map = AnonMapping::with_offset(size, host_offset).map_err(BackendError::Mmap)?;
            let id = state.next_region.fetch_add(1, Relaxed);
            let r = Region::new(state.id, id, base, map, state.counters.clone());
            regions.push(Arc::new(r));
        }
        regions.sort_by_key(|r| r.guest_base);
        let ram = regions.iter().map(|r| r.ram_region()).collect();
        *state.regions.write().unwrap_or_else(|e| e.into_inner()) = regions;
        let regions = state.regions();
        for (i, r) in regions.iter().enumerate() {
            self.inner.register_region(r);
            // SAFETY: the region's guest mapping, made just above for this
            // VM and used by nothing else; its faults are served from here on
            // (`register_region` made the region findable first).
            let registered = unsafe {
                self.inner.uffd.register(
                    r.host_base().raw(),
                    r.size() as usize,
                    GUEST_REGISTER_MODE,
                )
            };
            if let Err(e) = registered {
                // Nothing can have faulted on them: no caller has their
                // addresses yet.
                for r in &regions[..=i] {
                    self.inner.unregister_region(r);
                    let _ = self
                        .inner
                        .uffd
                        .unregister(r.host_base().raw(), r.size() as usize);
                }
                state
                    .regions
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .clear();
                return Err(BackendError::Register(e));
            }
        }
        Ok(ram)
    }

    /// Destroy a VM: it is torn down, and all its folios are returned to the
    /// allocator, as soon as its backend (and any pin) is dropped too.
    ///
    /// # Errors
    /// [`VmError::NoSuchVm`].
    pub fn destroy_vm(&self, vm: VmId) -> Result<(), VmError> {
        let state = self
            .inner
            .vms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&vm);
        state.map(drop).ok_or(VmError::NoSuchVm(vm))
    }

    /// Discard `[gpa, gpa + len)` of `vm` (balloon inflate, free page
    /// reporting): the range reads as zero afterwards and its folios go back
    /// to the allocator. Pages of pinned folios are skipped.
    ///
    /// # Errors
    /// See [`DiscardError`].
    pub fn discard(
        &self,
        vm: VmId,
        gpa: GuestAddress,
        len: u64,
    ) -> Result<DiscardOutcome, DiscardError> {
        let state = self.inner.vm(vm).ok_or(DiscardError::NoSuchVm(vm))?;
        discard::discard(&self.inner, &state, gpa, len)
    }

    /// Test support: take `vm`'s page at `gpa` out of the host page table
    /// while its entry stays `Present`, the broken state a fault then
    /// repairs (`fault::restore_unbacked`), in the way `how` says. Returns
    /// whether the entry was `Present`.
    ///
    /// # Errors
    /// [`VmError::NoSuchVm`].
    #[doc(hidden)]
    pub fn debug_unmap_behind_entry(
        &self,
        vm: VmId,
        gpa: GuestAddress,
        how: DebugUnmap,
    ) -> Result<bool, VmError> {
        let state = self.inner.vm(vm).ok_or(VmError::NoSuchVm(vm))?;
        let Some((region, idx)) = state.region_of(gpa, PAGE_SIZE) else {
            return Ok(false);
        };
        let present = |pte: crate::pte::Pte| match pte.state() {
            crate::pte::PteState::Present { folio, subpage } => Some((folio, subpage)),
            _ => None,
        };
        // A reference keeps the folio alive (and its id ours) until the
        // folio lock below is dropped, even if a fault frees it meanwhile.
        let Some((folio, sub)) = ({
            let ptl = region.pt.lock(idx);
            let p = present(ptl.pte(idx));
            if let Some((f, _)) = p {
                self.inner.folios.slab().get_ref(f);
            }
            p
        }) else {
            return Ok(false);
        };
        let unmapped = (|| {
            // Folio lock, then page-table lock, as reclaim takes them.
            let Some(_lock) = self.inner.folios.trylock(folio) else {
                return false;
            };
            let ptl = region.pt.lock(idx);
            if present(ptl.pte(idx)) != Some((folio, sub)) {
                return false;
            }
            if how == DebugUnmap::Drop {
                // SAFETY: one guest page of the region's mapping, its entry
                // held under the page-table lock and its folio locked; guest
                // memory is never borrowed by Rust code. Dropping its data is
                // the point: the fault that follows repairs the entry.
                let r = unsafe {
                    crate::sys::dontneed(region.host_addr(idx).raw(), PAGE_SIZE as usize)
                };
                return r.is_ok();
            }
            let pool = self.inner.folios.slab().get(folio).map(|f| f.pool);
            let Some(pool) = pool else { return false };
            let pool = pool.subpage(u64::from(sub));
            if crate::vmscan::move_out(&self.inner, &region, idx, pool, 1) != 1 {
                return false;
            }
            if how == DebugUnmap::IntoPoolScribbled {
                let at = self.inner.pool.host_addr(pool).raw() as *mut u64;
                // SAFETY: the folio's pool page, populated by the move just
                // made; we hold the folio lock and the page-table lock, and
                // nothing holds a reference into pool memory.
                unsafe { std::ptr::write_bytes(at, 0x5a, PAGE_SIZE as usize / 8) };
            }
            true
        })();
        self.inner.put_folio(folio, 1);
        Ok(unmapped)
    }

    /// Pin `[gpa, gpa + len)` of `vm` for device access (GUP-like), faulting
    /// unpopulated pages in from this thread. Unpinned when the guard drops.
    ///
    /// # Errors
    /// See [`PinError`].
    pub fn pin(&self, vm: VmId, gpa: GuestAddress, len: u64) -> Result<PinGuard, PinError> {
        let state = self.inner.vm(vm).ok_or(PinError::NoSuchVm(vm))?;
        pin::pin(&self.inner, state, gpa, len)
    }

    /// Set `vm`'s reclaim limits. Reclaim already running stops at the new
    /// minimum (and, enforcing the maximum, at the new maximum) from its
    /// next batch; a maximum is otherwise enforced from the VM's next fault
    /// and the next background reclaim round.
    ///
    /// # Errors
    /// [`VmError::NoSuchVm`]; [`VmError::MinAboveMax`]; and
    /// [`VmError::MinimumsAboveBudget`] when the VMs' minimums, this one's
    /// new, would not fit in the budget. The limits are unchanged then.
    pub fn set_vm_limits(&self, vm: VmId, limits: VmLimits) -> Result<(), VmError> {
        let state = self.inner.vm(vm).ok_or(VmError::NoSuchVm(vm))?;
        if let Some(max) = limits.max_bytes.filter(|&m| m < limits.min_bytes) {
            return Err(VmError::MinAboveMax {
                min: limits.min_bytes,
                max,
            });
        }
        // Against a concurrent budget change, which checks the minimums.
        let _serial = self.budget_lock.lock().unwrap_or_else(|e| e.into_inner());
        // In pages, saturating: a minimum near u64::MAX must not wrap the
        // sum below the budget.
        let others = self
            .inner
            .live_vms()
            .iter()
            .filter(|v| !Arc::ptr_eq(v, &state))
            .map(|v| v.min_pages())
            .fold(0, u64::saturating_add);
        // Whole pages, as `VmState::set_limits` keeps it.
        let needed = others
            .saturating_add(limits.min_bytes / PAGE_SIZE)
            .saturating_mul(PAGE_SIZE);
        let budget = self.budget_bytes();
        if needed > budget {
            return Err(VmError::MinimumsAboveBudget { needed, budget });
        }
        state.set_limits(limits);
        self.inner.kick_kswapd();
        Ok(())
    }

    /// Reclaim about `bytes` now, from `vm` or (with `None`) from the VMs
    /// the policy picks, never below any VM's minimum. Returns the bytes
    /// freed (less than asked when nothing more is reclaimable).
    ///
    /// # Errors
    /// [`ReclaimError`].
    ///
    /// # Context
    /// Blocks for the swap I/O; call it from a thread that may block (not
    /// a vCPU thread).
    pub fn reclaim(&self, vm: Option<VmId>, bytes: u64) -> Result<u64, ReclaimError> {
        if self.inner.swap.is_none() {
            return Err(ReclaimError::NoSwap);
        }
        if let Some(id) = vm {
            self.inner.vm(id).ok_or(ReclaimError::NoSuchVm(id))?;
        }
        Ok(vmscan::reclaim_bytes(&self.inner, vm, bytes))
    }

    /// Set the host budget: the pool memory the VMs may use, at most the
    /// pool mapped at start ([`MmConfig::budget_bytes`]). Lowering it takes
    /// free memory offline and gives its host pages back, reclaiming first
    /// (never below a VM's minimum) when too little is free; raising it
    /// brings offline memory back.
    ///
    /// # Errors
    /// [`BudgetError`]; the budget is unchanged then (reclaim that ran
    /// before a late failure stays done).
    ///
    /// # Context
    /// Blocks for reclaim's swap I/O; not for vCPU or handler threads.
    pub fn set_budget(&self, bytes: u64) -> Result<BudgetChange, BudgetError> {
        self.set_budget_with_progress(bytes, &|_, _| {})
    }

    /// [`MemoryManager::set_budget`], calling `progress(offline, to_take)`
    /// (bytes) after each round of a lowering, for an operation that
    /// reports how far it has come.
    ///
    /// # Errors
    /// As [`MemoryManager::set_budget`].
    ///
    /// # Context
    /// As [`MemoryManager::set_budget`]; `progress` runs with no lock held.
    pub fn set_budget_with_progress(
        &self,
        bytes: u64,
        progress: &dyn Fn(u64, u64),
    ) -> Result<BudgetChange, BudgetError> {
        let _serial = self.budget_lock.lock().unwrap_or_else(|e| e.into_inner());
        let change = crate::hotplug::set_budget(&self.inner, bytes, progress)?;
        let budget_pages = crate::hotplug::budget_bytes(&self.inner) / PAGE_SIZE;
        self.inner
            .watermarks
            .set(Watermarks::new(&self.config.reclaim, budget_pages));
        Ok(change)
    }

    /// Check `bytes` as a budget [`MemoryManager::set_budget`] could set
    /// now, without setting it: the refusals that need no reclaim
    /// (alignment, the pool, the VMs' minimums and pinned pages), for a
    /// caller that answers them before it starts a long lowering.
    ///
    /// # Errors
    /// [`BudgetError::Unaligned`], [`BudgetError::AboveMax`] or
    /// [`BudgetError::BelowMinimums`].
    pub fn check_budget(&self, bytes: u64) -> Result<(), BudgetError> {
        crate::hotplug::check_budget(&self.inner, bytes, &self.inner.live_vms()).map(|_| ())
    }

    /// The host budget now, in bytes (the pool size unless lowered with
    /// [`MemoryManager::set_budget`]).
    pub fn budget_bytes(&self) -> u64 {
        crate::hotplug::budget_bytes(&self.inner)
    }

    /// Inject faults into the swap file's I/O (tests and fault drills). An
    /// empty list disarms injection.
    ///
    /// # Errors
    /// [`ReclaimError::NoSwap`] without a swap file;
    /// [`ReclaimError::BadFaultPlan`] for a plan that cannot happen (the
    /// armed plans are unchanged).
    pub fn inject_swap_faults(&self, plans: Vec<FaultPlan>) -> Result<(), ReclaimError> {
        let dev = self.inner.swap.as_ref().ok_or(ReclaimError::NoSwap)?;
        dev.file.set_fault_plans(plans)?;
        Ok(())
    }

    /// Arm fault points in migration, collapse and relocation (tests and
    /// drills); an empty list disarms them.
    pub fn inject_faults(&self, plans: Vec<InjectPlan>) {
        self.inner.inject.set(plans);
    }

    /// Compact: rebuild free 2 MiB pool blocks and collapse `vm`'s (or
    /// every VM's) ranges of small folios into 2 MiB folios mapped as PMDs.
    /// `progress(done, total)` reports collapse candidates handled.
    ///
    /// # Errors
    /// [`VmError::NoSuchVm`].
    ///
    /// # Context
    /// Blocks while it copies; call it from a thread that may block.
    pub fn compact(
        &self,
        vm: Option<VmId>,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<CompactReport, VmError> {
        if let Some(id) = vm {
            self.inner.vm(id).ok_or(VmError::NoSuchVm(id))?;
        }
        Ok(compact::compact(&self.inner, vm, progress))
    }

    /// Relocate the region holding `gpa` of `vm` to a new host range while
    /// the guest runs ([`crate::relocate`]). `switch` is called once (twice
    /// if a later step fails and is undone) with the regions whose memslots
    /// the VMM must swap; it must pause the vCPUs, switch, and resume.
    /// `progress(done, total)` reports 2 MiB tables moved.
    ///
    /// # Errors
    /// [`RelocateError`]; nothing changed (failures after the switch are
    /// undone, with a second switch back), except for
    /// [`RelocateError::UndoFailed`].
    pub fn relocate(
        &self,
        vm: VmId,
        gpa: GuestAddress,
        op: RelocateOp,
        switch: &mut dyn FnMut(&RelocateSwitch) -> Result<(), String>,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<RelocateReport, RelocateError> {
        let state = self.inner.vm(vm).ok_or(RelocateError::NoSuchVm(vm))?;
        crate::relocate::relocate(&self.inner, &state, gpa, op, switch, progress)
    }

    /// The VM's guest RAM regions now (they change with relocation).
    pub fn vm_regions(&self, vm: VmId) -> Option<Vec<RamRegion>> {
        let state = self.inner.vm(vm)?;
        Some(state.regions().iter().map(|r| r.ram_region()).collect())
    }

    /// Migrate every folio mapped in `[gpa, gpa + len)` of `vm` to a new
    /// pool block (the folio-migration primitive, for tests and drills).
    /// Returns `(migrated, not migrated)`; failures were undone.
    ///
    /// # Errors
    /// [`VmError::NoSuchVm`]; [`VmError::OutOfRange`] for an empty range
    /// or one not inside one region.
    pub fn migrate_range(
        &self,
        vm: VmId,
        gpa: GuestAddress,
        len: u64,
    ) -> Result<(u64, u64), VmError> {
        let state = self.inner.vm(vm).ok_or(VmError::NoSuchVm(vm))?;
        let range = VmError::OutOfRange {
            gpa: gpa.raw(),
            len,
        };
        if len == 0 {
            return Err(range);
        }
        let (region, first) = state.region_of(gpa, len).ok_or(range)?;
        // Every page the bytes touch, the last one too when `gpa` is not
        // page aligned (inside the region: `region_of` checked the end).
        let end = PageIndex::from_offset(gpa.raw() - region.guest_base.raw() + len - 1).forward(1);
        let mut ids = Vec::new();
        let mut idx = first;
        while idx < end {
            crate::relocate::ensure_pulled(&self.inner, &region, idx);
            let ptl = region.pt.lock(idx);
            let stop = end.min(ptl.end());
            for i in idx.0..stop.0 {
                if let Some((f, _)) = ptl.pte(crate::PageIndex(i)).mapped_folio() {
                    if ids.last() != Some(&f) {
                        ids.push(f);
                    }
                }
            }
            idx = stop;
        }
        ids.dedup();
        let (mut ok, mut failed) = (0, 0);
        for id in ids {
            match migrate::migrate_folio(&self.inner, id) {
                Ok(_) => ok += 1,
                Err(_) => failed += 1,
            }
        }
        Ok((ok, failed))
    }

    /// Manager-wide statistics.
    pub fn stats(&self) -> MmStats {
        let inner = &self.inner;
        let mut s = MmStats {
            pool_bytes: inner.pool.nr_pages() * PAGE_SIZE,
            faults: inner.faults.snapshot(),
            prezero_blocks: inner.workers.prezero_blocks.load(Relaxed),
            prezero_pages: inner.workers.prezero_pages.load(Relaxed),
            prezero_ns: inner.workers.prezero_ns.load(Relaxed),
            collapse_failed: inner.workers.collapse_failed.load(Relaxed),
            worker_kicks: inner.workers.worker_kicks.load(Relaxed),
            folios_split: inner.workers.folios_split.load(Relaxed),
            split_freed_pages: inner.workers.split_freed_pages.load(Relaxed),
            pool_zap_batches: inner.zapq.batches.load(Relaxed),
            pool_zap_pages: inner.zapq.pages.load(Relaxed),
            pool_zap_forced: inner.zapq.forced.load(Relaxed),
            pool_stale_pages: inner.zapq.stale_pages(),
            pool_stranded_pages: inner.stranded.pages(),
            move_undercounts: crate::sys::userfaultfd::move_undercounts(),
            migration: inner.workers.migration(),
            ..Default::default()
        };
        let (buddy_meta, fa) = {
            let b = inner.buddy();
            (b.metadata_bytes(), b.stats())
        };
        s.set_free_area(&fa);
        s.budget_bytes = (fa.total_pages - fa.offline_pages) * PAGE_SIZE;
        let slab_meta = {
            let slab = inner.folios.slab();
            s.folios_by_order = slab.count_by_order();
            s.deferred_split_queue = slab.deferred_split.len() as u64;
            slab.metadata_bytes()
        };
        let vms: Vec<_> = inner
            .vms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let mut meta = buddy_meta + slab_meta;
        for vm in &vms {
            meta +=
                std::mem::size_of::<VmState>() as u64 + std::mem::size_of::<VmCounters>() as u64;
            for r in vm.regions() {
                meta += std::mem::size_of::<Region>() as u64 + r.pt.metadata_bytes();
                s.guest_pages += r.pt.nr_pages();
            }
        }
        s.metadata_bytes = meta;
        s.swap = inner.swap_counters.snapshot();
        if let Some(dev) = inner.swap.as_ref() {
            let st = dev.lock();
            let c = &dev.file.counters;
            s.swap_device = SwapDeviceStats {
                total_bytes: st.map.nr_slots() * PAGE_SIZE,
                used_bytes: st.map.nr_used() * PAGE_SIZE,
                cache_pages: st.cache.nr_pages(),
                direct_io: dev.file.direct_io(),
                in_memory: dev.file.in_memory(),
                reads: c.reads.load(Relaxed),
                read_bytes: c.read_bytes.load(Relaxed),
                writes: c.writes.load(Relaxed),
                write_bytes: c.write_bytes.load(Relaxed),
                io_errors: c.errors.load(Relaxed),
                short_retries: c.short_retries.load(Relaxed),
                injected_faults: c.injected.load(Relaxed),
                metadata_bytes: st.map.metadata_bytes() + st.cache.nr_folios() * 48,
            };
        }
        s
    }

    /// Statistics of one VM.
    pub fn vm_stats(&self, vm: VmId) -> Option<VmStats> {
        let state = self.inner.vm(vm)?;
        let c = &state.counters;
        Some(VmStats {
            name: state.name.clone(),
            guest_bytes: state.regions().iter().map(|r| r.size()).sum(),
            resident_bytes_by_order: std::array::from_fn(|i| {
                c.resident_pages[i].load(Relaxed).max(0) as u64 * PAGE_SIZE
            }),
            faults: c.faults.snapshot(),
            discarded_pages: c.discarded_pages.load(Relaxed),
            discard_skipped_pinned: c.discard_skipped_pinned.load(Relaxed),
            discard_fallback_dontneed: c.discard_fallback_dontneed.load(Relaxed),
            pinned_pages: c.pinned_pages.load(Relaxed).max(0) as u64,
            swap: c.swap.snapshot(),
            limits: state.limits(),
        })
    }

    /// Wait until the pre-zeroing worker has prepared the free blocks it
    /// keeps ready (all of them up to the configured limit, fewer under
    /// reclaim pressure: `prezero::ready_target`), the deferred-split queue
    /// is empty and no reclaim pass or fault service is running.
    /// Returns false at the timeout. For benchmarks and tests.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < timeout {
            let unprepared = {
                let b = self.inner.buddy();
                let fa = b.stats();
                fa.ready_pages < crate::prezero::ready_target(&self.inner, &fa)
            };
            let splits = !self.inner.folios.slab().deferred_split.is_empty();
            let isolated = self.inner.isolated_pages.load(Relaxed) > 0;
            let reclaiming = self.inner.reclaimers.load(Relaxed) > 0;
            if !unprepared && !splits && !isolated && !reclaiming {
                return true;
            }
            self.inner.kick_worker();
            self.inner.wait_for_memory(Duration::from_millis(10));
        }
        false
    }

    /// Check that the allocator balances: free + isolated + pages of live
    /// folios = pool size, and the free lists are consistent; and that the
    /// swap map, swap cache and swapped-page counts agree: every allocated
    /// slot is named by exactly one `Swap` entry of a live VM, and the
    /// swap cache is empty. Meant for a quiescent manager (tests, debugging).
    ///
    /// # Errors
    /// A description of the imbalance.
    pub fn check_accounting(&self) -> Result<(), String> {
        self.check_swap()?;
        // The worker's blocks are counted in `isolated_pages` under the
        // zone lock, so both are read under it.
        let (fa, check, held) = {
            let b = self.inner.buddy();
            let held = self.inner.isolated_pages.load(Relaxed);
            (b.stats(), b.check(), held)
        };
        check?;
        let folio_pages: u64 = {
            let slab = self.inner.folios.slab();
            // At rest nothing holds a folio isolated: a mapped folio off
            // the LRU could never be reclaimed (see `migrate_inner`).
            if let Some((id, f)) = slab
                .iter()
                .find(|(_, f)| f.mapcount > 0 && !f.flags.contains(FolioFlags::LRU))
            {
                return Err(format!("folio {id:?} is mapped but not on the LRU: {f:?}"));
            }
            Order::all()
                .zip(slab.count_by_order())
                .map(|(o, n)| o.nr_pages() * n)
                .sum()
        };
        let isolated = held + fa.isolated_pages;
        if fa.free_pages + folio_pages + isolated + fa.offline_pages != fa.total_pages {
            return Err(format!(
                "free {} + folios {folio_pages} + isolated {isolated} + offline {} != pool {}",
                fa.free_pages, fa.offline_pages, fa.total_pages
            ));
        }
        Ok(())
    }
}

impl MemoryManager {
    fn check_swap(&self) -> Result<(), String> {
        let Some(dev) = self.inner.swap.as_ref() else {
            return Ok(());
        };
        drop(dev.lock()); // drops the queued clean-slot counts
        let mut named = 0u64;
        let mut swapped_counter = 0i64;
        for vm in self.inner.live_vms() {
            swapped_counter += vm.counters.swap.swapped_pages.load(Relaxed);
            for r in vm.regions() {
                for t in 0..r.pt.nr_tables() {
                    let ptl = r.pt.lock(crate::PageIndex(t * crate::pte::PTRS_PER_TABLE));
                    let st = dev.lock();
                    for i in ptl.first().0..ptl.end().0 {
                        match ptl.pte(crate::PageIndex(i)).state() {
                            PteState::Swap { slot } => {
                                named += 1;
                                let s = st.map.state(slot);
                                if s != (SlotState::Used {
                                    count: 1,
                                    cached: false,
                                }) {
                                    return Err(format!(
                                        "vm {:?} page {i}: slot {slot:?} is {s:?}",
                                        vm.id
                                    ));
                                }
                            }
                            PteState::SwapinMarker { .. } => {
                                return Err(format!("page {i}: swapin marker left behind"));
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
        // Clean folios own a count on their slot each.
        let clean: Vec<SwapSlot> = {
            let slab = self.inner.folios.slab();
            slab.iter()
                .filter(|(_, f)| f.flags.contains(FolioFlags::CLEAN))
                .filter_map(|(_, f)| f.swap)
                .collect()
        };
        let st = dev.lock();
        for &slot in &clean {
            let s = st.map.state(slot);
            if s != (SlotState::Used {
                count: 1,
                cached: false,
            }) {
                return Err(format!("clean folio's slot {slot:?} is {s:?}"));
            }
        }
        let clean = clean.len() as u64;
        st.map.check()?;
        if st.cache.nr_pages() != 0 {
            return Err(format!(
                "{} pages left in the swap cache",
                st.cache.nr_pages()
            ));
        }
        if st.map.nr_used() != named + clean {
            return Err(format!(
                "{} slots used, {named} named by swap entries and {clean} by clean folios",
                st.map.nr_used()
            ));
        }
        if swapped_counter != named as i64 {
            return Err(format!(
                "swapped-page counters say {swapped_counter}, entries {named}"
            ));
        }
        Ok(())
    }
}

fn check_layout(layout: &[(GuestAddress, u64)]) -> Result<(), BackendError> {
    let mut sorted: Vec<_> = layout.to_vec();
    sorted.sort();
    for (i, &(base, size)) in sorted.iter().enumerate() {
        let bad = BackendError::BadLayout {
            guest_base: base.raw(),
            size,
        };
        if size == 0 || size % PAGE_SIZE != 0 || base.raw() % PAGE_SIZE != 0 {
            return Err(bad);
        }
        let end = base.checked_add(size).ok_or(bad)?;
        if sorted.get(i + 1).is_some_and(|n| n.0 < end) {
            return Err(BackendError::BadLayout {
                guest_base: base.raw(),
                size,
            });
        }
    }
    Ok(())
}

impl Drop for MemoryManager {
    fn drop(&mut self) {
        // No SIGBUS handler may take a reference to us from now on.
        crate::faulter::unregister(&self.inner);
        // Backends hold the manager, so no VM has memory any more; drop the
        // remaining VM records, then stop the threads.
        let vms: Vec<_> = self
            .inner
            .vms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect();
        drop(vms);
        self.inner.shutdown.store(true, Relaxed);
        self.inner.stop_fd.signal();
        self.inner.kick_worker();
        self.inner.kick_kcompactd();
        for t in self
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = t.join();
        }
        // Handed over by a SIGBUS handler after the worker's last look.
        self.inner.run_deferred_teardowns();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// VM ids are not reused: once the last one is handed out, creating a
    /// VM fails with a clear error instead of wrapping to an id a late
    /// request about a destroyed VM (or a live VM 0) still names.
    #[test]
    fn vm_ids_are_never_handed_out_twice() {
        let mm = MemoryManager::new(MmConfig::with_budget(2 << 20)).unwrap();
        mm.inner().next_vm.store(u32::MAX - 1, Relaxed);
        let last = mm.create_vm("last").unwrap();
        assert_eq!(last, VmId(u32::MAX - 1));
        let e = mm.create_vm("one too many").unwrap_err();
        assert!(matches!(e, VmError::IdsExhausted), "{e}");
        assert!(e.to_string().starts_with("no VM id left"), "{e}");
        mm.destroy_vm(last).unwrap();
        assert!(matches!(mm.create_vm("again"), Err(VmError::IdsExhausted)));
    }
}
