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
use crate::{GuestMemoryBackend, RamRegion};
use std::sync::{Arc, OnceLock};

/// One guest RAM region: its host mapping and page tables.
#[derive(Debug)]
pub struct Region {
    /// Owning VM.
    pub vm: VmId,
    /// Index in the VM's layout (the rmap's region number).
    pub index: u32,
    /// Guest-physical base.
    pub guest_base: GuestAddress,
    map: AnonMapping,
    /// The page tables.
    pub pt: PageTable,
    /// The VM's counters.
    pub counters: Arc<VmCounters>,
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
        }
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

    /// Unmap every folio (VM teardown). Returns the ranges to free once the
    /// guest pages themselves are gone.
    ///
    /// # Context
    /// Takes each page-table lock in turn; marks the tables dead so racing
    /// handlers install nothing more.
    fn unmap_all(&self, inner: &Inner) -> Vec<FreedRange> {
        let mut freed = Vec::new();
        for t in 0..self.pt.nr_tables() {
            let mut ptl = self.pt.lock(PageIndex(t * PTRS_PER_TABLE));
            ptl.set_dead();
            let entries = ptl.take_all();
            let mut slab = inner.folios.slab();
            // Entries of one folio are adjacent: unmap them run by run.
            let mut run: Option<(FolioId, u64, u64)> = None;
            for (_, pte) in entries {
                let PteState::Present { folio, subpage } = pte.state() else {
                    continue;
                };
                match &mut run {
                    Some((f, first, nr)) if *f == folio && *first + *nr == subpage as u64 => {
                        *nr += 1
                    }
                    _ => {
                        if let Some((f, first, nr)) = run.take() {
                            self.unmap_run(&mut slab, &ptl, f, first, nr, &mut freed);
                        }
                        run = Some((folio, subpage as u64, 1));
                    }
                }
            }
            if let Some((f, first, nr)) = run {
                self.unmap_run(&mut slab, &ptl, f, first, nr, &mut freed);
            }
        }
        freed
    }

    fn unmap_run(
        &self,
        slab: &mut crate::folio::FolioSlab,
        ptl: &crate::pte::PtlGuard<'_>,
        folio: FolioId,
        first: u64,
        nr: u64,
        freed: &mut Vec<FreedRange>,
    ) {
        if let Some(order) = slab.get(folio).map(|f| f.order) {
            self.counters.resident(order, -(nr as i64));
        }
        let r = rmap::remove_rmap_ptes(slab, ptl, folio, first, nr, BlockState::NeedsPopulate);
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
    /// Regions, set once by [`crate::MemoryManager::backend`].
    pub(crate) regions: OnceLock<Vec<Arc<Region>>>,
    /// Counters.
    pub counters: Arc<VmCounters>,
}

impl VmState {
    /// The regions (empty before the backend exists).
    pub fn regions(&self) -> &[Arc<Region>] {
        self.regions.get().map_or(&[], Vec::as_slice)
    }

    /// The region holding `[gpa, gpa + len)` entirely, and the first page.
    pub fn region_of(&self, gpa: GuestAddress, len: u64) -> Option<(&Arc<Region>, PageIndex)> {
        self.regions().iter().find_map(|r| {
            let first = r.page_of_guest(gpa)?;
            let off = gpa.raw() - r.guest_base.raw();
            (off.checked_add(len)? <= r.size()).then_some((r, first))
        })
    }
}

impl Drop for VmState {
    fn drop(&mut self) {
        let inner = self.inner.clone();
        let mut freed = Vec::new();
        for r in self.regions() {
            inner.unregister_region(r);
            freed.extend(r.unmap_all(&inner));
            if let Err(e) = inner
                .uffd
                .unregister(r.host_base().raw(), r.size() as usize)
            {
                log_error(&format!("vm {} teardown: unregister: {e}", self.name));
            }
            // Free the guest's pages now, before their pool ranges are reused.
            if let Err(e) = sys::dontneed(r.host_base().raw(), r.size() as usize) {
                log_error(&format!("vm {} teardown: dontneed: {e}", self.name));
            }
        }
        for f in freed {
            inner.free_range(f);
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
