//! The memory manager: pool, allocator, folio table, VMs, handler threads
//! and the pre-zeroing worker, and the public API the VMM calls.

use crate::anon::{AnonError, AnonMapping};
use crate::buddy::{BlockState, Buddy};
use crate::discard::{self, DiscardError, DiscardOutcome};
use crate::fault;
use crate::folio::{FolioTable, FreedRange};
use crate::pin::{self, PinError, PinGuard};
use crate::pool::Pool;
use crate::prezero;
use crate::stats::{FaultCounters, MmStats, VmCounters, VmStats, WorkerCounters};
use crate::sys::userfaultfd::{RawUffd, FEATURE_MOVE, REGISTER_MODE_MISSING, REGISTER_MODE_WP};
use crate::sys::EventFd;
use crate::types::{GuestAddress, Order, VmId, PAGE_SIZE};
use crate::vm::{log_error, FolioBackend, Region, VmState};
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Configuration of a [`MemoryManager`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MmConfig {
    /// Pool size: the host memory all guests share (`--mem-budget`).
    pub budget_bytes: u64,
    /// Userfaultfd handler threads.
    pub handler_threads: usize,
    /// Keep at most this much free memory pre-zeroed (`None`: all of it).
    /// Pre-zeroed memory is populated host memory.
    pub prezero_limit_bytes: Option<u64>,
}

impl MmConfig {
    /// A budget of `bytes` with two handler threads and full pre-zeroing.
    pub fn with_budget(bytes: u64) -> MmConfig {
        MmConfig {
            budget_bytes: bytes,
            handler_threads: 2,
            prezero_limit_bytes: None,
        }
    }
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
}

/// Errors from VM lookups and [`MemoryManager::destroy_vm`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VmError {
    /// No VM has this id (never created, or destroyed).
    #[error("no VM {0:?}")]
    NoSuchVm(VmId),
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
    /// A region could not be mapped.
    #[error("cannot map guest RAM")]
    Mmap(#[source] AnonError),
    /// A region could not be registered on the userfaultfd.
    #[error("cannot register guest RAM on userfaultfd")]
    Register(#[source] io::Error),
}

/// Shared state of the manager, reachable from its threads.
#[derive(Debug)]
pub(crate) struct Inner {
    pub uffd: RawUffd,
    pub pool: Pool,
    /// The zone lock. Leaf.
    pub buddy: Mutex<Buddy>,
    pub folios: FolioTable,
    /// Registered guest regions by host start. Leaf, never held while faulting.
    regions: RwLock<BTreeMap<usize, Arc<Region>>>,
    /// Live VMs. Leaf.
    vms: Mutex<HashMap<VmId, Arc<VmState>>>,
    next_vm: AtomicU32,
    pub faults: FaultCounters,
    pub workers: WorkerCounters,
    /// Faults waiting for memory (host addresses). Leaf.
    pub pending: Mutex<Vec<usize>>,
    /// Worker wake-up flag. Leaf.
    kick: Mutex<bool>,
    kick_cv: Condvar,
    /// Signalled when ready memory appears (for pin's waits).
    memory_cv: Condvar,
    /// Pages taken off the allocator by the pre-zeroing worker.
    pub isolated_pages: AtomicU64,
    pub prezero_limit_pages: u64,
    pub shutdown: AtomicBool,
    pub stop_fd: EventFd,
}

impl Inner {
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

    pub fn unregister_region(&self, r: &Region) {
        let mut map = self.regions.write().unwrap_or_else(|e| e.into_inner());
        map.remove(&r.host_base().raw());
    }

    /// Region `index` of VM `vm`, if the VM is alive.
    pub fn find_region(&self, vm: crate::types::VmId, index: u32) -> Option<Arc<Region>> {
        let vms = self.vms.lock().unwrap_or_else(|e| e.into_inner());
        vms.get(&vm)?.regions().get(index as usize).cloned()
    }

    /// Return a freed folio range to the allocator.
    pub fn free_range(&self, f: FreedRange) {
        if let Err(e) = self.buddy().free(f.pool, f.order, f.state) {
            // A double free is a bug; refuse it rather than corrupt the lists.
            log_error(&format!("free of {f:?}: {e}"));
            debug_assert!(false, "free of {f:?}: {e}");
        }
        self.kick_worker();
    }

    /// Wake the pre-zeroing worker.
    pub fn kick_worker(&self) {
        *self.kick.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.kick_cv.notify_one();
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
        self.memory_cv.notify_all();
    }

    /// Wait (bounded) for the worker to make memory ready. Returns false at
    /// the timeout.
    ///
    /// # Context
    /// No manager lock held. Not for handler threads (they park instead).
    pub fn wait_for_memory(&self, timeout: Duration) -> bool {
        self.kick_worker();
        let k = self.kick.lock().unwrap_or_else(|e| e.into_inner());
        !self
            .memory_cv
            .wait_timeout(k, timeout)
            .unwrap_or_else(|e| e.into_inner())
            .1
            .timed_out()
    }

    fn vm(&self, id: VmId) -> Option<Arc<VmState>> {
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
        if config.handler_threads == 0 {
            return Err(MmError::BadConfig("no handler threads"));
        }
        let pool = Pool::new(config.budget_bytes).map_err(MmError::Pool)?;
        let uffd = RawUffd::open(FEATURE_MOVE).map_err(MmError::Userfaultfd)?;
        uffd.register(pool.base().raw(), pool.len(), REGISTER_MODE_WP)
            .map_err(MmError::RegisterPool)?;
        let limit = config
            .prezero_limit_bytes
            .map_or(u64::MAX, |b| b / PAGE_SIZE);
        let inner = Arc::new(Inner {
            buddy: Mutex::new(Buddy::new(pool.nr_pages(), BlockState::NeedsPopulate)),
            uffd,
            pool,
            folios: FolioTable::default(),
            regions: RwLock::default(),
            vms: Mutex::default(),
            next_vm: AtomicU32::new(0),
            faults: FaultCounters::default(),
            workers: WorkerCounters::default(),
            pending: Mutex::default(),
            kick: Mutex::new(true),
            kick_cv: Condvar::new(),
            memory_cv: Condvar::new(),
            isolated_pages: AtomicU64::new(0),
            prezero_limit_pages: limit,
            shutdown: AtomicBool::new(false),
            stop_fd: EventFd::new().map_err(MmError::Thread)?,
        });
        let mm = Arc::new(MemoryManager {
            inner,
            config,
            threads: Mutex::default(),
        });
        mm.spawn_threads()?;
        Ok(mm)
    }

    fn spawn_threads(&self) -> Result<(), MmError> {
        let mut threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        for i in 0..self.config.handler_threads {
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
        Ok(())
    }

    /// The configuration.
    pub fn config(&self) -> &MmConfig {
        &self.config
    }

    /// Create a VM (with no memory yet).
    ///
    /// # Errors
    /// None today; the `Result` leaves room for per-VM limits.
    pub fn create_vm(&self, name: &str) -> Result<VmId, VmError> {
        let id = VmId(self.inner.next_vm.fetch_add(1, Relaxed));
        let vm = Arc::new(VmState {
            id,
            name: name.to_owned(),
            inner: self.inner.clone(),
            regions: OnceLock::new(),
            counters: Arc::new(VmCounters::default()),
        });
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
    /// See [`BackendError`].
    pub fn backend(
        self: &Arc<Self>,
        vm: VmId,
        layout: &[(GuestAddress, u64)],
    ) -> Result<Arc<FolioBackend>, BackendError> {
        let state = self.inner.vm(vm).ok_or(BackendError::NoSuchVm(vm))?;
        check_layout(layout)?;
        let mut regions = Vec::with_capacity(layout.len());
        for (i, &(base, size)) in layout.iter().enumerate() {
            let map = AnonMapping::new(size).map_err(BackendError::Mmap)?;
            let r = Region::new(vm, i as u32, base, map, state.counters.clone());
            regions.push(Arc::new(r));
        }
        let ram = regions.iter().map(|r| r.ram_region()).collect();
        state
            .regions
            .set(regions)
            .map_err(|_| BackendError::AlreadyCreated(vm))?;
        for r in state.regions() {
            {
                let mut map = self
                    .inner
                    .regions
                    .write()
                    .unwrap_or_else(|e| e.into_inner());
                map.insert(r.host_base().raw(), r.clone());
            }
            self.inner
                .uffd
                .register(
                    r.host_base().raw(),
                    r.size() as usize,
                    REGISTER_MODE_MISSING,
                )
                .map_err(BackendError::Register)?;
        }
        Ok(Arc::new(FolioBackend {
            _mm: self.clone(),
            vm: state,
            ram,
        }))
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

    /// Pin `[gpa, gpa + len)` of `vm` for device access (GUP-like), faulting
    /// unpopulated pages in from this thread. Unpinned when the guard drops.
    ///
    /// # Errors
    /// See [`PinError`].
    pub fn pin(&self, vm: VmId, gpa: GuestAddress, len: u64) -> Result<PinGuard, PinError> {
        let state = self.inner.vm(vm).ok_or(PinError::NoSuchVm(vm))?;
        pin::pin(&self.inner, state, gpa, len)
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
            folios_split: inner.workers.folios_split.load(Relaxed),
            split_freed_pages: inner.workers.split_freed_pages.load(Relaxed),
            ..Default::default()
        };
        let (buddy_meta, fa) = {
            let b = inner.buddy();
            (b.metadata_bytes(), b.stats())
        };
        s.set_free_area(&fa);
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
        })
    }

    /// Wait until the pre-zeroing worker has prepared every free block (up
    /// to the configured limit) and the deferred-split queue is empty.
    /// Returns false at the timeout. For benchmarks and tests.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < timeout {
            let unprepared = {
                let b = self.inner.buddy();
                let fa = b.stats();
                fa.ready_pages < self.inner.prezero_limit_pages.min(fa.free_pages)
            };
            let splits = !self.inner.folios.slab().deferred_split.is_empty();
            let isolated = self.inner.isolated_pages.load(Relaxed) > 0;
            if !unprepared && !splits && !isolated {
                return true;
            }
            self.inner.kick_worker();
            self.inner.wait_for_memory(Duration::from_millis(10));
        }
        false
    }

    /// Check that the allocator balances: free + isolated + pages of live
    /// folios = pool size, and the free lists are consistent. Meant for a
    /// quiescent manager (tests, debugging).
    ///
    /// # Errors
    /// A description of the imbalance.
    pub fn check_accounting(&self) -> Result<(), String> {
        let (fa, check) = {
            let b = self.inner.buddy();
            (b.stats(), b.check())
        };
        check?;
        let folio_pages: u64 = {
            let slab = self.inner.folios.slab();
            Order::all()
                .zip(slab.count_by_order())
                .map(|(o, n)| o.nr_pages() * n)
                .sum()
        };
        let isolated = self.inner.isolated_pages.load(Relaxed);
        if fa.free_pages + folio_pages + isolated != fa.total_pages {
            return Err(format!(
                "free {} + folios {folio_pages} + isolated {isolated} != pool {}",
                fa.free_pages, fa.total_pages
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
        for t in self
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = t.join();
        }
    }
}
