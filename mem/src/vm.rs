//! VMs and their guest RAM regions, as the manager sees them.
//!
//! A [`Region`] is one guest RAM mapping with its page tables; a [`VmState`]
//! owns the regions of one VM. Tearing a VM down (its last reference
//! dropped, after [`crate::MemoryManager::destroy_vm`] and the backend)
//! unmaps every folio and returns it to the allocator.

use crate::anon::AnonMapping;
use crate::buddy::BlockState;
use crate::folio::FreedRange;
use crate::manager::{Inner, MemoryManager};
use crate::pte::{PageTable, PteState, PTRS_PER_TABLE};
use crate::rmap;
use crate::stats::VmCounters;
use crate::sys;
use crate::types::{FolioId, GuestAddress, HostAddr, PageIndex, VmId, PAGE_SIZE};
use crate::types::{Order, SwapSlot};
use crate::vmscan::VmLimits;
use crate::{GuestMemoryBackend, RamRegion};
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicU8, AtomicUsize};
use std::sync::{Arc, Mutex, RwLock};

/// Swapin readahead streams tracked per region.
const RA_STREAMS: usize = 4;

/// One guest RAM region: its host mapping and page tables.
#[derive(Debug)]
pub struct Region {
    /// Owning VM.
    pub vm: VmId,
    /// The region's id in its VM, never reused (the rmap's region number).
    pub index: u32,
    /// Guest-physical base.
    pub guest_base: GuestAddress,
    map: AnonMapping,
    /// The page tables.
    pub pt: PageTable,
    /// The VM's counters.
    pub counters: Arc<VmCounters>,
    /// Swapin readahead streams: `(next expected page << 8) | order`, 0
    /// when unused. Heuristic state; races only cost a smaller window.
    ra: [AtomicU64; RA_STREAMS],
    ra_next: AtomicUsize,
    /// Whether the VM uses this region ([`RegionState`]).
    state: AtomicU8,
    /// While a relocation moves tables into this region: where they are
    /// still ([`crate::relocate`]). Faults pull a table before serving it.
    pub(crate) pull: RwLock<Option<Arc<crate::relocate::PullSource>>>,
    pulling: AtomicBool,
}

/// Where a region is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RegionState {
    /// Created by a relocation, not yet the VM's memory.
    New = 0,
    /// The VM's memory.
    Live = 1,
    /// Replaced by a relocation: its tables move out (or back, on undo).
    Retired = 2,
}

impl Region {
    pub(crate) fn new(
        vm: VmId,
        index: u32,
        guest_base: GuestAddress,
        map: AnonMapping,
        counters: Arc<VmCounters>,
    ) -> Region {
        let pt = PageTable::new(map.len() as u64 / PAGE_SIZE);
        Region {
            vm,
            index,
            guest_base,
            map,
            pt,
            counters,
            ra: Default::default(),
            ra_next: AtomicUsize::new(0),
            state: AtomicU8::new(RegionState::Live as u8),
            pull: RwLock::new(None),
            pulling: AtomicBool::new(false),
        }
    }

    /// Its state.
    pub fn state(&self) -> RegionState {
        match self.state.load(SeqCst) {
            0 => RegionState::New,
            1 => RegionState::Live,
            _ => RegionState::Retired,
        }
    }

    pub(crate) fn set_state(&self, s: RegionState) {
        self.state.store(s as u8, SeqCst);
    }

    /// The pull source while tables are still elsewhere.
    pub(crate) fn pull_source(&self) -> Option<Arc<crate::relocate::PullSource>> {
        if !self.pulling.load(SeqCst) {
            return None;
        }
        self.pull.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn set_pull(&self, p: Option<Arc<crate::relocate::PullSource>>) {
        let mut g = self.pull.write().unwrap_or_else(|e| e.into_inner());
        self.pulling.store(p.is_some(), SeqCst);
        *g = p;
    }

    fn ra_stream(&self, idx: PageIndex) -> Option<(usize, u8)> {
        self.ra.iter().enumerate().find_map(|(i, s)| {
            let v = s.load(Relaxed);
            let (next, o) = (v >> 8, (v & 0xff) as u8);
            let window = 2 * Order(o).nr_pages();
            (v != 0 && idx.0 >= next.saturating_sub(1) && idx.0 < next + window).then_some((i, o))
        })
    }

    /// The largest swapin order the readahead state allows at `idx`: a
    /// fault just past the end of a previous swapin continues a stream and
    /// grows its window (order 0, 2, 4, … 9); any other fault starts one
    /// at order 0. Analogue of the window of `swap_vma_readahead()`.
    pub fn readahead_order(&self, idx: PageIndex) -> Order {
        match self.ra_stream(idx) {
            Some((_, o)) => Order((o + 2).min(Order::PMD.0)),
            None => Order::BASE,
        }
    }

    /// Record a swapin of `order` at `idx` in the readahead state.
    pub fn readahead_done(&self, idx: PageIndex, order: Order) {
        let next = idx.align_down(order).forward(order.nr_pages());
        let v = (next.0 << 8) | order.0 as u64;
        let i = match self.ra_stream(idx) {
            Some((i, _)) => i,
            None => self.ra_next.fetch_add(1, Relaxed) % RA_STREAMS,
        };
        self.ra[i].store(v, Relaxed);
    }

    /// Host address of the first byte.
    pub fn host_base(&self) -> HostAddr {
        self.map.host_addr()
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.map.len() as u64
    }

    /// Host address of page `idx`.
    pub fn host_addr(&self, idx: PageIndex) -> HostAddr {
        self.map.host_addr().add(idx.to_offset())
    }

    /// The page holding host address `addr`, if inside the region.
    pub fn page_of_host(&self, addr: usize) -> Option<PageIndex> {
        let off = addr.checked_sub(self.host_base().raw())? as u64;
        (off < self.size()).then(|| PageIndex::from_offset(off))
    }

    /// The page holding guest address `gpa`, if inside the region.
    pub fn page_of_guest(&self, gpa: GuestAddress) -> Option<PageIndex> {
        let off = gpa.raw().checked_sub(self.guest_base.raw())?;
        (off < self.size()).then(|| PageIndex::from_offset(off))
    }

    /// The view the VMM gets.
    pub fn ram_region(&self) -> RamRegion {
        RamRegion {
            guest_base: self.guest_base,
            host_addr: self.host_base(),
            size: self.size(),
        }
    }

    /// Unmap every folio and free every swap slot (VM teardown). Returns
    /// the ranges to free once the guest pages themselves are gone.
    ///
    /// # Context
    /// Takes each page-table lock in turn (then the swap and folio-table
    /// locks); marks the tables dead so racing handlers and swapins install
    /// nothing more (a swapin in flight finds its markers gone and cleans up).
    /// Then, with no lock held, sleeps on the folio lock of each swap-cache
    /// folio whose slots no entry names any more, to free it
    /// (`swapin::free_swap_cache`).
    fn unmap_all(&self, inner: &Inner) -> Vec<FreedRange> {
        let mut freed = Vec::new();
        // Swap-cache folios whose slots lost their last entry here.
        let mut cached = Vec::new();
        for t in 0..self.pt.nr_tables() {
            let mut ptl = self.pt.lock(PageIndex(t * PTRS_PER_TABLE));
            ptl.set_dead();
            let entries = ptl.take_all();
            let mut slots: Vec<SwapSlot> = Vec::new();
            let mut gone = 0i64;
            let mut slab = inner.folios.slab();
            // Entries of one folio are adjacent: unmap them run by run.
            let mut run: Option<(FolioId, u64, u64, bool)> = None;
            for (_, pte) in entries {
                let (folio, subpage, out) = match pte.state() {
                    PteState::Present { folio, subpage } => (folio, subpage as u64, false),
                    PteState::ProtNone { folio, subpage } => (folio, subpage as u64, true),
                    PteState::Swap { slot } => {
                        slots.push(slot);
                        gone += 1;
                        continue;
                    }
                    PteState::SwapinMarker { .. } => {
                        gone += 1;
                        continue;
                    }
                    _ => continue,
                };
                match &mut run {
                    Some((f, first, nr, o))
                        if *f == folio && *first + *nr == subpage && *o == out =>
                    {
                        *nr += 1
                    }
                    _ => {
                        if let Some(r) = run.take() {
                            self.unmap_run(&mut slab, &ptl, r, &mut freed);
                        }
                        run = Some((folio, subpage, 1, out));
                    }
                }
            }
            if let Some(r) = run {
                self.unmap_run(&mut slab, &ptl, r, &mut freed);
            }
            drop(slab);
            if let (Some(dev), false) = (inner.swap.as_ref(), slots.is_empty()) {
                let mut st = dev.lock();
                for s in slots {
                    if let Err(e) = st.swap_free_nr(s, 1) {
                        log_error(&format!("teardown: {e}"));
                    }
                    crate::swapin::unnamed_cached(inner, &st, s, &mut cached);
                }
            }
            self.counters.swap.swapped_pages.fetch_sub(gone, Relaxed);
            inner.swap_counters.swapped_pages.fetch_sub(gone, Relaxed);
        }
        if let (Some(dev), false) = (inner.swap.as_ref(), cached.is_empty()) {
            crate::swapin::free_swap_cache(inner, dev, cached, true);
        }
        freed
    }

    fn unmap_run(
        &self,
        slab: &mut crate::folio::FolioSlab,
        ptl: &crate::pte::PtlGuard<'_>,
        (folio, first, nr, out): (FolioId, u64, u64, bool),
        freed: &mut Vec<FreedRange>,
    ) {
        if let Some(order) = slab.get(folio).map(|f| f.order) {
            self.counters.resident(order, -(nr as i64));
        }
        // Sampled-out pages sit in the pool with guest data in them.
        let state = match out {
            true => BlockState::NeedsZero,
            false => BlockState::NeedsPopulate,
        };
        let r = rmap::remove_rmap_ptes(slab, ptl, folio, first, nr, state);
        freed.extend(r.freed);
    }
}

/// One VM of the manager.
#[derive(Debug)]
pub struct VmState {
    /// Its id.
    pub id: VmId,
    /// Its name.
    pub name: String,
    pub(crate) inner: Arc<Inner>,
    /// Regions by guest address: the live ones, and during a relocation
    /// also the new or retired ones ([`RegionState`]).
    pub(crate) regions: RwLock<Vec<Arc<Region>>>,
    /// Set once the backend exists.
    pub(crate) created: AtomicBool,
    /// Next region id.
    pub(crate) next_region: AtomicU32,
    /// One relocation at a time.
    pub(crate) relocation: Mutex<()>,
    /// Counters.
    pub counters: Arc<VmCounters>,
    /// Reclaim limits ([`VmLimits`]), in pages; `u64::MAX`: no maximum.
    pub(crate) min_pages: AtomicU64,
    pub(crate) max_pages: AtomicU64,
    pub(crate) priority: AtomicI32,
    /// Pages isolated for eviction right now (reserved against `min_pages`).
    pub(crate) reclaiming: AtomicU64,
}

impl VmState {
    /// A VM with no regions yet and no limits.
    pub(crate) fn new(id: VmId, name: &str, inner: Arc<Inner>) -> VmState {
        VmState {
            id,
            name: name.to_owned(),
            inner,
            regions: RwLock::new(Vec::new()),
            created: AtomicBool::new(false),
            next_region: AtomicU32::new(0),
            relocation: Mutex::new(()),
            counters: Arc::new(VmCounters::default()),
            min_pages: AtomicU64::new(0),
            max_pages: AtomicU64::new(u64::MAX),
            priority: AtomicI32::new(0),
            reclaiming: AtomicU64::new(0),
        }
    }

    /// The current limits.
    pub fn limits(&self) -> VmLimits {
        let max = self.max_pages.load(Relaxed);
        VmLimits {
            min_bytes: self.min_pages.load(Relaxed) * PAGE_SIZE,
            // Saturating: a maximum set near u64::MAX is kept rounded up
            // to whole pages, which is 2^64 bytes for the largest.
            max_bytes: (max != u64::MAX).then(|| max.saturating_mul(PAGE_SIZE)),
            priority: self.priority.load(Relaxed),
        }
    }

    /// Set the limits (reclaim in flight reads them at each batch; see
    /// `vmscan::Floor`).
    pub fn set_limits(&self, l: VmLimits) {
        self.min_pages.store(l.min_bytes / PAGE_SIZE, Relaxed);
        let max = l.max_bytes.map_or(u64::MAX, |b| b.div_ceil(PAGE_SIZE));
        self.max_pages.store(max, Relaxed);
        self.priority.store(l.priority, Relaxed);
    }

    /// Minimum resident pages.
    pub fn min_pages(&self) -> u64 {
        self.min_pages.load(Relaxed)
    }

    /// Maximum resident pages (`u64::MAX`: none).
    pub fn max_pages(&self) -> u64 {
        self.max_pages.load(Relaxed)
    }

    /// Resident pages now (mapped or sampled out, not swapped).
    pub fn resident_pages(&self) -> u64 {
        self.counters
            .resident_pages
            .iter()
            .map(|p| p.load(Relaxed).max(0) as u64)
            .sum()
    }

    /// Every region, new and retired ones included (empty before the
    /// backend exists).
    pub fn all_regions(&self) -> Vec<Arc<Region>> {
        self.regions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn add_region(&self, r: Arc<Region>) {
        let mut v = self.regions.write().unwrap_or_else(|e| e.into_inner());
        v.push(r);
        v.sort_by_key(|r| r.guest_base);
    }

    pub(crate) fn remove_region(&self, id: u32) {
        let mut v = self.regions.write().unwrap_or_else(|e| e.into_inner());
        v.retain(|r| r.index != id);
    }

    /// The live regions: the VM's memory now. The states are read under
    /// the list's lock, so a relocation's switch ([`VmState::set_states`])
    /// is seen whole or not at all.
    pub fn regions(&self) -> Vec<Arc<Region>> {
        self.regions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|r| r.state() == RegionState::Live)
            .cloned()
            .collect()
    }

    /// Change the states of the VM's regions at once for
    /// [`VmState::regions`]: a relocation's switch makes one region live and
    /// retires others. Set one by one, a reader could find a source retired
    /// and then the new region not live yet (or, switching back, retired
    /// again), and no region for a guest address at all.
    pub(crate) fn set_states(&self, changes: &[(&Region, RegionState)]) {
        let _list = self.regions.write().unwrap_or_else(|e| e.into_inner());
        for (r, s) in changes {
            r.set_state(*s);
        }
    }

    /// Region `id`, whatever its state.
    pub fn region_by_id(&self, id: u32) -> Option<Arc<Region>> {
        self.regions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|r| r.index == id)
            .cloned()
    }

    /// The live region holding `[gpa, gpa + len)` entirely, and the first page.
    pub fn region_of(&self, gpa: GuestAddress, len: u64) -> Option<(Arc<Region>, PageIndex)> {
        self.regions().into_iter().find_map(|r| {
            let first = r.page_of_guest(gpa)?;
            let off = gpa.raw() - r.guest_base.raw();
            (off.checked_add(len)? <= r.size()).then_some((r, first))
        })
    }
}

impl Drop for VmState {
    fn drop(&mut self) {
        let regions = std::mem::take(self.regions.get_mut().unwrap_or_else(|e| e.into_inner()));
        let teardown = Teardown {
            name: std::mem::take(&mut self.name),
            regions,
        };
        let serving = crate::faulter::serving();
        #[cfg(test)]
        if serving {
            crate::faulter::tests::DROPPED_IN_HANDLER.fetch_add(1, Relaxed);
        }
        // The last reference can be dropped by a fault served in a `SIGBUS`
        // handler: direct reclaim there holds every live VM for a moment
        // (`vmscan::pick_vm`), and another thread may destroy one of them
        // meanwhile. Unregistering, zapping and unmapping another VM's RAM
        // does not belong on that faulting thread, in signal context.
        if serving {
            self.inner.defer_teardown(teardown);
        } else {
            teardown.run(&self.inner);
        }
    }
}

/// What is left to do of a VM whose last reference went: unmap, unregister
/// and free its regions.
#[derive(Debug)]
pub(crate) struct Teardown {
    name: String,
    regions: Vec<Arc<Region>>,
}

impl Teardown {
    /// Tear the regions down.
    ///
    /// # Context
    /// No lock held; not in a `SIGBUS` handler ([`crate::faulter::serving`]).
    pub(crate) fn run(self, inner: &Inner) {
        #[cfg(test)]
        if crate::faulter::serving() {
            crate::faulter::tests::TORN_DOWN_IN_HANDLER.fetch_add(1, Relaxed);
        }
        let mut freed = Vec::new();
        let vm = self.regions.first().map(|r| r.vm);
        for r in self.regions {
            inner.unregister_region(&r);
            freed.extend(r.unmap_all(inner));
            if let Err(e) = inner
                .uffd
                .unregister(r.host_base().raw(), r.size() as usize)
            {
                log_error(&format!("vm {} teardown: unregister: {e}", self.name));
            }
            // Free the guest's pages now, before their pool ranges are reused.
            // SAFETY: the region's own guest mapping, with every entry
            // unmapped above; the VM's last reference went (no backend,
            // pin or KVM slot uses it), and guest memory is never borrowed.
            if let Err(e) = unsafe { sys::dontneed(r.host_base().raw(), r.size() as usize) } {
                log_error(&format!("vm {} teardown: dontneed: {e}", self.name));
            }
        }
        for f in freed {
            inner.free_range(f);
        }
        // A folio the fault injection kept in the swap cache, whose last
        // entry went while another holder had its lock, is named by no
        // entry, so `unmap_all` did not meet it (`swapin::free_swap_cache`):
        // it goes with its VM, not at the next shortage.
        if let (Some(dev), Some(vm)) = (inner.swap.as_ref(), vm) {
            crate::swapin::shrink_swap_cache(inner, dev, Some(vm), u64::MAX);
        }
    }
}

pub(crate) fn log_error(msg: &str) {
    eprintln!("foliovm mem: {msg}");
}

/// Guest RAM served by the memory manager (`--mem-backend folio`).
///
/// Holds the manager and the VM alive; the VM is torn down once both
/// [`crate::MemoryManager::destroy_vm`] was called and this is dropped.
pub struct FolioBackend {
    pub(crate) _mm: Arc<MemoryManager>,
    pub(crate) vm: Arc<VmState>,
    pub(crate) ram: Vec<RamRegion>,
}

impl FolioBackend {
    /// The VM this backend belongs to.
    pub fn vm(&self) -> VmId {
        self.vm.id
    }
}

impl std::fmt::Debug for FolioBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FolioBackend")
            .field("vm", &self.vm.id)
            .field("ram", &self.ram)
            .finish()
    }
}

impl GuestMemoryBackend for FolioBackend {
    fn regions(&self) -> &[RamRegion] {
        &self.ram
    }
    fn kind(&self) -> &'static str {
        "folio"
    }
}
