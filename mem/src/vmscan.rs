//! Reclaim: reference sampling, victim choice on LRU generations, swap-out,
//! the background reclaimer (`kswapd`) and direct reclaim.
//!
//! # Access information: reference sampling
//! Neither the accessed bit nor `page_idle` is visible to us, so reclaim
//! samples references the way NUMA balancing does with `PROT_NONE` hinting
//! faults: a folio reaching the oldest generation is moved out of the guest
//! into its own pool range (one `UFFDIO_MOVE`, a PMD move for 2 MiB) and
//! its entries become `ProtNone`. It stays mapped in the rmap sense. An
//! access faults, the handler installs it back from the pool without I/O
//! (`fault::install_from_pool`: short runs by `COPY`, long ones by `MOVE`),
//! clears `SAMPLED` and promotes the folio to the youngest generation
//! ([`map_prot_none`]). A sampled folio waits on its VM's probation list
//! (`lru`), oldest sampling first; one still `ProtNone` when it reaches the
//! head was not touched in between: it is the victim. Its data already sits
//! in the pool, so swap-out needs no second unmap.
//!
//! Reclaim keeps the probation list at an eighth of the VM's LRU
//! ([`probation_target`]), sampling from the oldest generation only as
//! victims leave it, and evicts from it once it is half full. Sampling is
//! thus kept just ahead of eviction: a folio's second chance lasts while an
//! eighth of the LRU is evicted, and no reclaim has to sample a whole
//! generation before it finds a victim. Before the list, sampled folios
//! were rotated into the next generation and judged when eviction came
//! round to them: a reclaim meeting a generation nobody had sampled yet
//! sampled all of it first (a direct reclaim on a handler thread spent
//! about 20 ms of CPU doing so while its fault waited), and the second chance
//! lasted a whole generation, in which the uniform benchmark touched and
//! mapped back a fifth of the folios it sampled for nothing.
//! Sampling costs a TLB flush and, for a folio in use, a fault to map it
//! back; a folio found touched at several samplings in a row is sampled
//! exponentially less often ([`FolioFlags::sampled_touched`]). A large
//! folio touched at one page while reclaim runs is split first and only
//! that page goes back (`split_sampled`): the fault tells which page was
//! used, and the rest can go on their own.
//!
//! Write tracking was tried as a cheaper signal and measured slower here
//! (an experiment not kept on main): with `UFFD_FEATURE_WP_ASYNC` a write to a protected
//! page costs about 1 µs in the kernel, and `PAGEMAP_SCAN` reads and
//! re-arms the bits. Checking a folio that way before sampling it cut
//! uniform's sampling refaults from 27-28k to 22-23k, but the scan ioctl
//! per folio cost more CPU than the faults it saved: 9.4-10.1 s instead
//! of 7.7-8.7 s, and 30-32k instead of 33-38k accesses/s (3 runs each).
//! Zipfian gained nothing. It would also need clean tracking rebuilt: an
//! asynchronous write reaches no handler, so a clean folio could no
//! longer be known clean at its unmap.
//!
//! # Swap-out ([`shrink_folio_list`])
//! For each victim, with its folio lock (trylock) and then the page-table
//! lock: check the entries are still `ProtNone`; if every page is zero,
//! make the entries `Zero` and free the folio (no I/O); otherwise allocate
//! contiguous slots and add the folio to the swap cache, set the entries to
//! `Swap`, drop the rmap, and release the page-table lock. A large folio
//! that finds no contiguous run while enough single slots are free is
//! split and goes out as order-0 folios (counted in
//! `swapout_fallback_order0`). The writes then
//! go out without page-table locks, batched into one `pwritev` per run of
//! contiguous slots. On completion the folio leaves the swap cache and is
//! freed unless a refaulter took a reference meanwhile (it maps the folio
//! back from the cache). A failed write maps the folio back and frees the
//! slots; a full swap file leaves the folio sampled and in place.
//!
//! # Who is reclaimed
//! A VM above its `max_bytes` first; otherwise the VMs above their
//! `min_bytes`, lowest `priority` first, then the one furthest above its
//! minimum. No VM is ever taken below its minimum by reclaim for others;
//! a sampled large folio that would take it below whole is split in place
//! and the pages above the minimum go ([`split_to_fit`]).
//! A fault that finds every VM at its minimum (minimums may add up to the
//! budget) swaps out a folio of its own VM to make room for its page, at
//! most one 2 MiB folio below the minimum, which its fault puts back. For
//! a second after that, the VM's faults take order-0 folios
//! (`Inner::own_reclaim_recent`): an access needing pages of two 2 MiB
//! ranges could otherwise never hold both within that room. A fault's
//! direct reclaim stops as soon as the pool's free memory is back at the
//! low watermark, whoever freed it ([`Until::Memory`]). When the LRUs give
//! nothing, reclaim frees swap-cache folios that nothing else holds
//! (`swapin::shrink_swap_cache`).
//!
//! Analogues: `shrink_folio_list()`, `pageout()`, `try_to_free_pages()`,
//! `kswapd()`/`balance_pgdat()`, `change_prot_numa()`.

use crate::buddy::BlockState;
use crate::folio::{Folio, FolioFlags, FolioLockGuard, FolioSlab};
use crate::inject::FaultPoint;
use crate::manager::Inner;
use crate::pte::{Pte, PteState, PtlGuard};
use crate::rmap::{self, Rmap};
use crate::swap_cache::SwapDevice;
use crate::swap_map::SlotState;
use crate::swapin::{both, map_folio_pages};
use crate::types::{FolioId, Order, PageIndex, PoolOffset, SwapSlot, VmId, PAGE_SIZE};
use crate::vm::{log_error, Region, VmState};
use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Folios isolated per LRU scan step (`SWAP_CLUSTER_MAX`).
const SCAN_BATCH: usize = 32;
/// Pages a direct reclaim tries to free.
const DIRECT_RECLAIM_PAGES: u64 = 256;
/// Largest single swap write.
const MAX_WRITE_BYTES: u64 = 4 << 20;
/// How often the background reclaimer opens a new generation.
const AGE_INTERVAL: Duration = Duration::from_millis(200);

/// Per-VM reclaim limits, settable at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VmLimits {
    /// Reclaim never takes the VM's resident memory below this.
    pub min_bytes: u64,
    /// The VM's resident memory is reclaimed down to this (a memcg-like
    /// `memory.max`, enforced on its faults and by the background reclaimer).
    /// At least `min_bytes`.
    pub max_bytes: Option<u64>,
    /// Among VMs above their minimum, lower priorities are reclaimed first.
    pub priority: i32,
}

/// How long a reclaim pass goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Until {
    /// Until it has freed what it was asked (background and API reclaim,
    /// a VM's maximum).
    Target,
    /// Until then, or until the pool's free memory is back at the low
    /// watermark, whoever freed it: a fault's direct reclaim needs memory
    /// to exist, not to have freed it itself (the allocator retries after
    /// each batch, as `__alloc_pages_direct_reclaim()` does). Without
    /// this, a fault whose reclaim met failing swap writes went on through
    /// its whole scan after a VM stopped and freed the budget (the writer in
    /// `faulter::tests::a_vm_whose_last_reference_goes_in_a_sigbus_handler_is_torn_down_elsewhere`
    /// still waited a minute after, 1 run in about 15).
    Memory,
}

/// Whether reclaim can free anything at all (it needs a swap device; zero
/// folios could be dropped without one, but a guest rarely has many).
pub(crate) fn can_reclaim(inner: &Inner) -> bool {
    inner.swap.is_some()
}

/// Direct reclaim on the fault path: the pool is empty.
///
/// # Context
/// Handler thread (or pin caller); no locks held.
pub(crate) fn direct_reclaim(inner: &Inner, region: &Region) {
    both(inner, region, |c| c.direct_reclaims.fetch_add(1, Relaxed));
    inner.kick_kswapd();
    if try_to_free_pages(inner, None, DIRECT_RECLAIM_PAGES, Until::Memory) == 0 {
        reclaim_own(inner, region.vm);
    }
}

/// Direct reclaim that found nothing above any VM's minimum: make room for
/// the faulting VM's page with a folio of its own, down to one 2 MiB folio
/// below its minimum ([`Floor::Own`]), so that the fault swaps rather than
/// waits for memory no reclaim will ever free. Returns the pages freed.
///
/// Minimums may add up to the whole budget; with every VM at its minimum,
/// a VM whose working set is larger could then not run at all: its first
/// fault past its minimum waited forever with the swap file empty
/// (`a_vm_at_its_minimum_swaps_its_own_pages_when_minimums_fill_the_budget`
/// in `mem/tests/budget.rs`). Its own fault puts back what this takes, so
/// it is below its minimum only while that fault is served (or while
/// another VM below its own minimum takes the page first).
///
/// # Context
/// No locks held.
fn reclaim_own(inner: &Inner, vm: VmId) -> u64 {
    let Some(vm) = inner.vm(vm) else {
        return 0;
    };
    inner.reclaimers.fetch_add(1, Relaxed);
    let freed = shrink_vm(inner, &vm, SCAN_BATCH as u64, Floor::Own, Until::Memory);
    if freed > 0 {
        // Its faults take small folios for a while, so that what this
        // freed holds the pages of the access (`Inner::own_reclaim_recent`).
        inner.note_own_reclaim(&vm.counters);
    }
    inner.reclaimers.fetch_sub(1, Relaxed);
    freed
}

/// Reclaim the faulting VM down to its `max_bytes` before it gets more.
///
/// # Context
/// Handler thread; no locks held.
pub(crate) fn enforce_vm_max(inner: &Inner, region: &Region) {
    if !can_reclaim(inner) {
        return;
    }
    let Some(vm) = inner.vm(region.vm) else {
        return;
    };
    let excess = vm.resident_pages().saturating_sub(vm.max_pages());
    if excess > 0 {
        inner.reclaimers.fetch_add(1, Relaxed);
        shrink_vm(
            inner,
            &vm,
            excess + SCAN_BATCH as u64,
            Floor::Max,
            Until::Target,
        );
        inner.reclaimers.fetch_sub(1, Relaxed);
    }
}

/// Free about `nr_pages` pages, from `vm` or from the VMs the policy picks.
/// Returns the pages freed. Analogue of `try_to_free_pages()`.
///
/// # Context
/// No locks held.
pub(crate) fn try_to_free_pages(
    inner: &Inner,
    vm: Option<VmId>,
    nr_pages: u64,
    until: Until,
) -> u64 {
    inner.reclaimers.fetch_add(1, Relaxed);
    let freed = free_pages_from(inner, vm, nr_pages, until);
    inner.reclaimers.fetch_sub(1, Relaxed);
    freed
}

fn free_pages_from(inner: &Inner, vm: Option<VmId>, nr_pages: u64, until: Until) -> u64 {
    let mut freed = 0;
    let mut tried = HashSet::new();
    while freed < nr_pages && !memory_back(inner, until) {
        let victim = match vm {
            Some(id) if !tried.contains(&id) => inner.vm(id),
            Some(_) => None,
            None => pick_vm(inner, &tried),
        };
        let Some(victim) = victim else { break };
        let got = shrink_vm(inner, &victim, nr_pages - freed, Floor::Min, until);
        if got == 0 {
            tried.insert(victim.id);
        }
        freed += got;
    }
    // Last, swap-cache folios nothing else holds, which are off the LRU.
    if let (Some(dev), 0, false) = (inner.swap.as_ref(), freed, memory_back(inner, until)) {
        freed = crate::swapin::shrink_swap_cache(inner, dev, vm, nr_pages);
    }
    freed
}

/// The VM to reclaim from next, per the policy in the module docs.
fn pick_vm(inner: &Inner, tried: &HashSet<VmId>) -> Option<Arc<VmState>> {
    let slab_pages = |vm: &VmState| inner.folios.slab().lru_pages(vm.id);
    inner
        .live_vms()
        .into_iter()
        .filter(|v| !tried.contains(&v.id))
        .filter_map(|v| {
            // One reading of the VM's resident pages and minimum for both
            // the test and the key: faults, reclaim and `set_vm_limits`
            // change them meanwhile, and a second reading below the
            // minimum made `r - min` wrap, so that a VM at its minimum was
            // the first choice (in a debug build, kswapd panicked there).
            let (r, min) = (v.resident_pages(), v.min_pages());
            if r <= min || slab_pages(&v) == 0 {
                return None;
            }
            let over_max = r.saturating_sub(v.max_pages());
            Some(((over_max, -(v.limits().priority as i64), r - min), v))
        })
        .max_by_key(|(key, _)| *key)
        .map(|(_, v)| v)
}

/// The resident pages a reclaim of a VM stops at: its minimum, or (when
/// enforcing its maximum) its maximum, never below its minimum; only a VM
/// reclaiming for its own fault goes a little below ([`Floor::Own`]).
///
/// Read from the VM's limits at every isolation, not once per reclaim:
/// [`crate::MemoryManager::set_vm_limits`] may raise the minimum (or lift
/// the maximum) while a reclaim runs, and a reclaim that kept the floor it
/// started with took the VM down to its old one, far below the minimum just
/// set (`raising_a_minimum_stops_reclaim_in_flight` in
/// `mem/tests/budget.rs`). Limits are two separate stores too, so a
/// maximum is never trusted to be at least the minimum read beside it.
#[derive(Debug, Clone, Copy)]
enum Floor {
    /// The VM's minimum.
    Min,
    /// The VM's maximum, or its minimum if that is higher.
    Max,
    /// One 2 MiB folio below the VM's minimum: a fault of the VM itself
    /// reclaiming for itself when nothing else can be ([`reclaim_own`]).
    Own,
}

impl Floor {
    fn pages(self, vm: &VmState) -> u64 {
        match self {
            Floor::Min => vm.min_pages(),
            Floor::Max => vm.max_pages().max(vm.min_pages()),
            Floor::Own => vm.min_pages().saturating_sub(Order::PMD.nr_pages()),
        }
    }
}

/// Whether a pass that runs [`Until::Memory`] may stop: the pool's free
/// memory is back at the low watermark.
fn memory_back(inner: &Inner, until: Until) -> bool {
    until == Until::Memory && inner.buddy().nr_free() >= inner.watermarks.get().low
}

/// Reclaim up to `nr` pages from `vm`, not going below `floor` resident
/// pages. Returns the pages freed.
fn shrink_vm(inner: &Inner, vm: &VmState, nr: u64, floor: Floor, until: Until) -> u64 {
    let (mut freed, mut scanned) = (0, 0);
    // Each folio is at most sampled once and then evicted once per pass.
    let budget = inner.folios.slab().lru_pages(vm.id) * 2 + SCAN_BATCH as u64;
    while freed < nr && scanned < budget && !memory_back(inner, until) {
        // Pages other reclaimers are taking from this VM count against the
        // floor too, so that concurrent reclaim cannot undershoot it.
        let Isolated {
            evict,
            sample,
            reserved,
            skipped,
            split,
        } = isolate_folios(inner, vm, nr - freed, floor, scanned < budget / 2);
        if evict.is_empty() && sample.is_empty() && skipped == 0 && split.is_none() {
            break;
        }
        scanned += (evict.len() + sample.len()) as u64 + skipped + u64::from(split.is_some());
        for id in sample {
            sample_folio(inner, id);
            inner.put_folio(id, 1);
        }
        freed += shrink_folio_list(inner, evict);
        vm.reclaiming.fetch_sub(reserved, Relaxed);
        if let Some(id) = split {
            split_to_fit(inner, id);
            inner.put_folio(id, 1);
        }
    }
    if scanned > 0 {
        inner.note_reclaim();
    }
    for c in [&vm.counters.swap, &inner.swap_counters] {
        c.reclaim_scanned.fetch_add(scanned, Relaxed);
        c.reclaimed_pages.fetch_add(freed, Relaxed);
    }
    freed
}

/// What [`isolate_folios`] took off the probation list and the oldest
/// generation.
#[derive(Default)]
struct Isolated {
    /// Victims (sampled and untouched since), off the LRU.
    evict: Vec<FolioId>,
    /// Folios to sample now, rotated.
    sample: Vec<FolioId>,
    /// Pages of `evict`, reserved in the VM's `reclaiming`.
    reserved: u64,
    /// Hot folios rotated unsampled ([`FolioFlags::sample_on_pass`]).
    skipped: u64,
    /// A sampled-out large folio (referenced) too large to evict above the
    /// floor, though some of it would fit: split it ([`split_to_fit`]).
    split: Option<FolioId>,
}

/// A folio reclaim can neither sample nor evict now: locked, pinned,
/// mapped through a single page of it, or not mapped.
fn is_busy(f: &Folio) -> bool {
    f.flags.contains(FolioFlags::LOCKED)
        || f.pincount > 0
        || f.page_mapped.is_some()
        || f.mapcount == 0
}

/// How many pages reclaim keeps on a VM's probation list: an eighth of its
/// LRU. A folio's second chance lasts while the pages sampled after it are
/// evicted, so this sets how long that is; it is the same at every size of
/// the VM, as the kernel's inactive list is a share of the LRU.
fn probation_target(lru_pages: u64) -> u64 {
    (lru_pages / 8).max(SCAN_BATCH as u64)
}

/// Take a batch of victims (about `want` pages) and of folios to sample for
/// `vm`.
///
/// Victims come from the head of the probation list: folios sampled and
/// not touched since, the longest waiting first, taken off the LRU with a
/// reference, while the VM stays above `floor`'s resident pages; their pages
/// are reserved in `vm.reclaiming` (`Isolated::reserved`) until the caller
/// is done with them. The list gives victims only once it holds half its
/// target ([`probation_target`]), so that a folio sampled a moment ago is
/// not evicted before it could show it is used, unless `respect_heat` is
/// off (a reclaim that found too little in one rotation must progress) or
/// nothing is left to sample.
///
/// Then the list is topped up to its target from the oldest generation:
/// folios to sample are rotated and returned with a reference. Hot folios
/// still owed a pass, and folios just mapped by a fault (`REFERENCED`,
/// once), go by unsampled while `respect_heat`. A sampled folio met in a
/// generation (a piece of a split, one put back) is a victim too, or goes
/// to the probation list once there are victims enough.
/// Analogue of `isolate_folios()` + `sort_folio()`, with the probation
/// list as the inactive list.
fn isolate_folios(
    inner: &Inner,
    vm: &VmState,
    want: u64,
    floor: Floor,
    respect_heat: bool,
) -> Isolated {
    let mut batch = Isolated::default();
    let mut slab = inner.folios.slab();
    let target = probation_target(slab.lru_pages(vm.id));
    // Take `id` (of `nr` pages) off the LRU as a victim, its pages
    // reserved, unless that takes the VM below its minimum. If it does but
    // part of it would fit, it is to be split (once a batch), and stays.
    let evict = |slab: &mut FolioSlab, batch: &mut Isolated, id: FolioId, nr: u64| {
        let taken = vm.reclaiming.fetch_add(nr, Relaxed) + nr;
        let floor = floor.pages(vm);
        if vm.resident_pages() < floor.saturating_add(taken) {
            let taken = vm.reclaiming.fetch_sub(nr, Relaxed) - nr;
            let room = vm.resident_pages() > floor.saturating_add(taken);
            if nr > 1 && room && batch.split.is_none() {
                slab.get_ref(id);
                batch.split = Some(id);
            }
            return false;
        }
        batch.reserved += nr;
        slab.get_ref(id);
        slab.lru_del(id);
        batch.evict.push(id);
        true
    };
    let take_victims = |slab: &mut FolioSlab, batch: &mut Isolated| {
        while batch.evict.len() < SCAN_BATCH && batch.reserved < want {
            let Some(id) = slab.lru_probation_head(vm.id) else {
                break;
            };
            let f = slab.get(id).expect("LRU folios are live");
            if is_busy(f) || !f.flags.contains(FolioFlags::SAMPLED) {
                // Not evictable now: back among the generations.
                slab.lru_rotate(id);
                continue;
            }
            let nr = f.nr_pages();
            if !evict(slab, batch, id, nr) {
                break;
            }
        }
    };
    let early = !respect_heat || slab.lru_probation_pages(vm.id) > target / 2;
    if early {
        take_victims(&mut slab, &mut batch);
    }
    let mut sampling = 0;
    for _ in 0..SCAN_BATCH {
        if slab.lru_probation_pages(vm.id) + sampling >= target {
            break;
        }
        let Some(id) = slab.lru_oldest(vm.id) else {
            break;
        };
        if batch.sample.contains(&id) {
            // A whole turn of a small LRU: it is not sampled twice.
            break;
        }
        let seq = slab.lru_min_seq(vm.id);
        let f = slab.get(id).expect("LRU folios are live");
        let nr = f.nr_pages();
        if is_busy(f) {
            slab.lru_rotate(id);
            continue;
        }
        if f.flags.contains(FolioFlags::SAMPLED) {
            if batch.reserved >= want {
                // Enough victims: it waits where sampled folios wait.
                slab.lru_probation_add(id);
                continue;
            }
            if !evict(&mut slab, &mut batch, id, nr) {
                if batch.split != Some(id) {
                    slab.lru_rotate(id);
                }
                break;
            }
        } else if respect_heat && f.flags.contains(FolioFlags::REFERENCED) {
            // Just mapped by a fault: its access may not have happened yet.
            slab.get_mut(id)
                .expect("LRU folios are live")
                .flags
                .remove(FolioFlags::REFERENCED);
            slab.lru_rotate(id);
            batch.skipped += 1;
        } else if respect_heat && !f.flags.sample_on_pass(seq) {
            // Proved hot lately: let it go by unsampled this time.
            slab.lru_rotate(id);
            batch.skipped += 1;
        } else {
            slab.get_ref(id);
            slab.lru_rotate(id);
            batch.sample.push(id);
            sampling += nr;
        }
    }
    if !early && batch.evict.is_empty() && batch.sample.is_empty() && batch.skipped == 0 {
        // Nothing left to sample (the generations are empty or busy): the
        // list will not fill any further, so what is on it must do.
        take_victims(&mut slab, &mut batch);
    }
    batch
}

/// Put an isolated folio back on the youngest generation and drop the
/// isolation reference (`folio_putback_lru()`).
fn putback(inner: &Inner, id: FolioId) {
    let freed = {
        let mut slab = inner.folios.slab();
        let live = slab.get(id).is_some_and(|f| f.mapcount > 0);
        if live
            && !slab
                .get(id)
                .is_some_and(|f| f.flags.contains(FolioFlags::LRU))
        {
            slab.lru_add(id);
        }
        slab.put_refs(id, 1)
    };
    if let Some(f) = freed {
        inner.free_range(f);
    }
}

/// Where a locked folio is mapped, if it can be unmapped now: its region
/// and first page, order and pool range.
fn victim_info(inner: &Inner, id: FolioId) -> Option<(Arc<Region>, PageIndex, Order, PoolOffset)> {
    let (rmap, order, pool) = {
        let slab = inner.folios.slab();
        let f = slab.get(id)?;
        let ok = f.pincount == 0 && f.page_mapped.is_none() && f.mapcount as u64 == f.nr_pages();
        (ok.then_some(f.rmap)??, f.order, f.pool)
    };
    let region = inner.find_region(rmap.vm, rmap.region)?;
    Some((region, rmap.index, order, pool))
}

/// Sample references: move the folio's present pages out to its pool range
/// and make their entries `ProtNone` (`change_prot_numa()`).
fn sample_folio(inner: &Inner, id: FolioId) {
    let Some(_lock) = inner.folios.trylock(id) else {
        return;
    };
    let Some((region, first, order, pool)) = victim_info(inner, id) else {
        return;
    };
    let nr = order.nr_pages();
    let mut ptl = region.pt.lock(first);
    if ptl.is_dead() {
        return;
    }
    // A pin taken since `victim_info` looked (pins need only the
    // page-table lock, which we hold now) keeps the folio mapped.
    let Some(clean) = inner
        .folios
        .slab()
        .get(id)
        .filter(|f| f.pincount == 0)
        .map(|f| f.flags.contains(FolioFlags::CLEAN))
    else {
        return;
    };
    let mut k = 0;
    while k < nr {
        if ptl.pte(first.forward(k)) != Pte::present(id, k) {
            k += 1;
            continue;
        }
        let run = (k..nr)
            .take_while(|&j| ptl.pte(first.forward(j)) == Pte::present(id, j))
            .count() as u64;
        let moved = move_out(inner, &region, first.forward(k), pool.subpage(k), run);
        if moved > 0 {
            ptl.set_range(first.forward(k), moved, Pte::prot_none(id, k));
            if clean {
                // A kernel whose MOVE keeps the uffd-wp bit leaves the pool
                // page protected; nothing must write-fault in the pool.
                let at = inner.pool.host_addr(pool.subpage(k)).raw();
                if let Err(e) = inner.uffd.write_protect(at, moved * PAGE_SIZE, false) {
                    log_error(&format!("UFFDIO_WRITEPROTECT off in the pool: {e}"));
                }
            }
        }
        k += run;
    }
    // Sampled only if every page is out now. A MOVE that came up short
    // (`EEXIST`, `ENOENT`, repeated `EBUSY`) leaves pages mapped, and a
    // folio marked sampled with mapped pages would be taken as a victim
    // on every pass and never sampled again; unmarked, it is sampled again
    // later (its pages already out stay out, and a touch maps them back).
    if !(0..nr).all(|k| ptl.pte(first.forward(k)) == Pte::prot_none(id, k)) {
        return;
    }
    {
        let mut slab = inner.folios.slab();
        if let Some(f) = slab.get_mut(id) {
            f.flags.insert(FolioFlags::SAMPLED);
            f.flags.remove(FolioFlags::REFERENCED);
            slab.lru_probation_add(id);
        }
    }
    both(inner, &region, |c| c.sampled_folios.fetch_add(1, Relaxed));
}

/// Move `nr` guest pages at `idx` out to the pool at `pool` (the atomic
/// unmap). Returns how many pages, from the start, moved.
///
/// # Context
/// Folio lock and page-table lock held; the guest pages are present pages
/// of that folio and its pool range there is a hole.
pub(crate) fn move_out(
    inner: &Inner,
    region: &Region,
    idx: PageIndex,
    pool: PoolOffset,
    nr: u64,
) -> u64 {
    // The pool range may still hold a stale copy from a COPY install.
    inner.zapq.ensure_hole(&inner.pool, pool, nr);
    let src = region.host_addr(idx).raw();
    let dst = inner.pool.host_addr(pool).raw();
    // SAFETY: the source pages are present guest pages of the locked folio,
    // whose entries we hold under the page-table lock; moving them out is
    // the atomic unmap (a vCPU touching them next faults and waits for this
    // lock). The destination is the folio's own pool range, a hole while
    // the folio is mapped, referenced by nobody.
    match unsafe { inner.uffd.move_retrying(dst, src, nr * PAGE_SIZE, 0, 8) } {
        Ok(()) => nr,
        Err(p) => p.done / PAGE_SIZE,
    }
}

/// A sampled folio was touched at `at`: install its `ProtNone` pages back
/// into the guest (by `COPY` or `MOVE`, see `fault::install_from_pool`)
/// and promote it (`do_numa_page()`). A large folio may be split first,
/// and then only the piece at `at` goes back ([`split_sampled`]).
///
/// # Context
/// Page-table lock held (`ptl`); an entry names the folio, so it is live.
pub(crate) fn map_prot_none(
    inner: &Inner,
    region: &Region,
    ptl: &mut PtlGuard<'_>,
    folio: FolioId,
    at: PageIndex,
    write: bool,
) {
    if let Some(piece) = split_sampled(inner, region, ptl, folio, at) {
        both(inner, region, |c| c.sampled_splits.fetch_add(1, Relaxed));
        return map_prot_none(inner, region, ptl, piece, at, write);
    }
    let (pool, order, first, mut clean) = {
        let mut slab = inner.folios.slab();
        let f = slab.live(folio);
        f.flags.remove(FolioFlags::SAMPLED);
        f.flags.insert(FolioFlags::REFERENCED);
        f.flags.sampled_touched();
        let first = f.rmap.expect("a mapped folio has an rmap").index;
        let r = (f.pool, f.order, first, f.flags.contains(FolioFlags::CLEAN));
        slab.lru_promote(folio);
        r
    };
    // A clean folio goes back write-protected, unless this is its write.
    if clean && write {
        crate::swapin::clean_folio_written(inner, region, folio);
        clean = false;
    }
    // Counted before the installs wake the faulting thread.
    both(inner, region, |c| c.sample_refaults.fetch_add(1, Relaxed));
    let nr = order.nr_pages();
    let mut k = 0;
    while k < nr {
        let idx = first.forward(k);
        if ptl.pte(idx) != Pte::prot_none(folio, k) {
            k += 1;
            continue;
        }
        let run = (k..nr)
            .take_while(|&j| ptl.pte(first.forward(j)) == Pte::prot_none(folio, j))
            .count() as u64;
        ptl.set_range(idx, run, Pte::present(folio, k));
        let protected =
            crate::fault::install_from_pool(inner, region, idx, pool.subpage(k), run, clean);
        if clean && !protected {
            inner.clear_clean(folio);
            clean = false;
        }
        k += run;
    }
}

/// A sampled-out large folio is touched at `at` while reclaim runs: cut it
/// into base folios (in its LRU generation, still sampled out) and return
/// the one at `at`, so that only the touched page goes back and the
/// others can be evicted one by one if nothing touches them. Without
/// this, a large folio of sparsely used pages (one filled by a sequential
/// swapin, say, then hit at random) is touched somewhere at every sampling
/// and stays resident whole: most of the budget held pages nobody used.
/// Analogue of splitting underused THPs under pressure
/// (`thp_underused()`, `deferred_split_scan()`), with the sampling fault
/// telling the touched page apart. Returns `None` (map the folio back
/// whole) unless reclaim ran lately and the folio is unlocked, on the LRU,
/// unpinned and wholly sampled out.
///
/// # Context
/// Page-table lock (`ptl`) held, covering the folio.
fn split_sampled(
    inner: &Inner,
    region: &Region,
    ptl: &mut PtlGuard<'_>,
    folio: FolioId,
    at: PageIndex,
) -> Option<FolioId> {
    let (order, first) = {
        let slab = inner.folios.slab();
        let f = slab.get(folio)?;
        (f.order, f.rmap?.index)
    };
    let nr = order.nr_pages();
    let k = at.0.checked_sub(first.0).filter(|&k| k < nr)?;
    // A scan enters a folio at its first page (its last, going down):
    // mapping it back whole then saves a fault on each further page.
    let scan = k == 0 || k == nr - 1;
    if order == Order::BASE || scan || !inner.under_reclaim() {
        return None;
    }
    // Lock order: folio lock before the page-table lock, so only a trylock.
    let lock = inner.folios.trylock(folio)?;
    let pieces = split_whole_sampled(inner, region, ptl, folio, false)?;
    drop(lock);
    Some(pieces[k as usize])
}

/// Split the locked large `folio`, unpinned and wholly sampled out on the
/// LRU (checked here), into base folios in place, still sampled out, on
/// its list: at the tail, or at the head with `to_head` (first for reclaim
/// to meet, in page order). Returns the pieces in page order (the first
/// keeps the folio's id), or `None` when it is not such a folio.
///
/// # Context
/// Folio lock and the page-table lock (`ptl`) covering it held.
fn split_whole_sampled(
    inner: &Inner,
    region: &Region,
    ptl: &mut PtlGuard<'_>,
    folio: FolioId,
    to_head: bool,
) -> Option<Vec<FolioId>> {
    let (order, first, pool, seq) = {
        let mut slab = inner.folios.slab();
        let f = slab.get(folio)?;
        let (order, first, pool) = (f.order, f.rmap?.index, f.pool);
        let nr = order.nr_pages();
        let whole = order > Order::BASE
            && f.flags.contains(FolioFlags::LRU)
            && f.flags.contains(FolioFlags::SAMPLED)
            && !f.flags.contains(FolioFlags::CLEAN)
            && !f.flags.contains(FolioFlags::SWAPCACHE)
            && f.pincount == 0
            && f.page_mapped.is_none()
            && f.mapcount as u64 == nr
            && ptl.first() <= first
            && first.forward(nr) <= ptl.end()
            && (0..nr).all(|k| ptl.pte(first.forward(k)) == Pte::prot_none(folio, k));
        if !whole {
            return None;
        }
        let seq = slab.lru_seq(folio)?;
        slab.lru_del(folio);
        (order, first, pool, seq)
    };
    let new = split_prot_none(inner, region, ptl, folio, first, order, pool, 0);
    let pieces: Vec<FolioId> = std::iter::once(folio).chain(new.iter().copied()).collect();
    {
        let mut slab = inner.folios.slab();
        match to_head {
            true => pieces
                .iter()
                .rev()
                .for_each(|&p| slab.lru_add_seq_head(p, seq)),
            false => pieces.iter().for_each(|&p| slab.lru_add_seq(p, seq)),
        }
    }
    // The pieces were born locked (see `split_prot_none`); nobody can have
    // found them yet, so nobody waits: unlock them (the folio stays locked).
    new.iter()
        .for_each(|&pid| drop(inner.folios.assume_locked(pid)));
    Some(pieces)
}

/// Split `id`, a sampled-out large folio that reclaim cannot evict whole
/// without taking its VM below the floor, into base folios at the head of
/// its list, so that the next isolation evicts those of them the floor
/// allows. Without this a VM above its minimum by less than its smallest
/// victim gave nothing, and another VM with nothing of its own to reclaim
/// waited for memory until a limit changed
/// (`a_vm_less_than_a_folio_above_its_minimum_gives_the_difference` in
/// `mem/tests/budget.rs`). A memory cgroup splits a THP it swaps out
/// piecewise for the same reason (`split_folio_to_list()` in
/// `shrink_folio_list()`).
///
/// # Context
/// No locks held; the caller holds a reference on `id`.
fn split_to_fit(inner: &Inner, id: FolioId) {
    let Some((region, first, _, _)) = victim_info(inner, id) else {
        return;
    };
    let Some(lock) = inner.folios.trylock(id) else {
        return;
    };
    let mut ptl = region.pt.lock(first);
    if !ptl.is_dead() && split_whole_sampled(inner, &region, &mut ptl, id, true).is_some() {
        both(inner, &region, |c| c.floor_splits.fetch_add(1, Relaxed));
    }
    drop(ptl);
    drop(lock);
}

/// A folio whose pages are unmapped and in the swap cache, waiting for its
/// write. Holds the folio lock and the isolation reference.
struct Writeback<'a> {
    lock: FolioLockGuard<'a>,
    region: Arc<Region>,
    first: PageIndex,
    base: SwapSlot,
    nr: u64,
    pool: PoolOffset,
}

/// What [`prepare_pageout`] did with a victim.
enum Prepared<'a> {
    /// Freed without I/O (zero-filled): pages.
    Freed(u64),
    /// Unmapped and in the swap cache: write it (several order-0 pieces
    /// when it was split for lack of contiguous slots).
    Writeback(Vec<Writeback<'a>>),
    /// Left alone (put back on the LRU).
    Kept,
}

/// Reclaim the isolated `victims` (each with a reference). Returns the
/// pages freed. Analogue of `shrink_folio_list()`.
fn shrink_folio_list(inner: &Inner, victims: Vec<FolioId>) -> u64 {
    let Some(dev) = inner.swap.as_ref() else {
        victims.into_iter().for_each(|id| putback(inner, id));
        return 0;
    };
    let mut freed = 0;
    let mut wbs = Vec::new();
    for id in victims {
        match prepare_pageout(inner, dev, id) {
            Prepared::Freed(n) => freed += n,
            Prepared::Writeback(w) => wbs.extend(w),
            Prepared::Kept => {}
        }
    }
    wbs.sort_by_key(|w| w.base);
    let mut wbs = wbs.into_iter().peekable();
    while let Some(w) = wbs.next() {
        let mut bytes = w.nr * PAGE_SIZE;
        let mut run = vec![w];
        while let Some(next) = wbs.peek() {
            let last = run.last().expect("a run is never empty");
            if next.base != last.base.forward(last.nr)
                || bytes + next.nr * PAGE_SIZE > MAX_WRITE_BYTES
            {
                break;
            }
            bytes += next.nr * PAGE_SIZE;
            run.extend(wbs.next());
        }
        freed += pageout(inner, dev, run);
    }
    freed
}

/// Steps before the write, for one victim (see the module docs).
fn prepare_pageout<'a>(inner: &'a Inner, dev: &SwapDevice, id: FolioId) -> Prepared<'a> {
    let Some(lock) = inner.folios.trylock(id) else {
        putback(inner, id);
        return Prepared::Kept;
    };
    let Some((region, first, order, pool)) = victim_info(inner, id) else {
        drop(lock);
        putback(inner, id);
        return Prepared::Kept;
    };
    let nr = order.nr_pages();
    let mut ptl = region.pt.lock(first);
    if ptl.is_dead() || !ptl.range_is(first, nr, Pte::prot_none(id, 0)) {
        // Touched since it was sampled (or going away): keep it.
        drop(ptl);
        drop(lock);
        putback(inner, id);
        return Prepared::Kept;
    }
    if let Some(freed) = drop_clean(inner, id, &region, &mut ptl, first, order) {
        drop(ptl);
        drop(lock);
        inner.put_folio(id, 1);
        return Prepared::Freed(freed);
    }
    // SAFETY: the folio is locked and all its pages sit in its pool range
    // (the entries are `ProtNone` under the page-table lock we hold, so no
    // fault can move them back); nothing writes there meanwhile.
    let data: &[u8] = unsafe { inner.pool.pages_mut(pool, nr) };
    if data.iter().all(|&b| b == 0) {
        ptl.set_range(first, nr, Pte::new(PteState::Zero));
        let freed = {
            let mut slab = inner.folios.slab();
            slab.live(id).flags.remove(FolioFlags::SAMPLED);
            rmap::remove_rmap_ptes(&mut slab, &ptl, id, 0, nr, BlockState::NeedsPopulate).freed
        };
        debug_assert!(freed.is_none(), "we hold the isolation reference");
        region.counters.resident(order, -(nr as i64));
        drop(ptl);
        both(inner, &region, |c| {
            c.zero_dropped_pages.fetch_add(nr, Relaxed)
        });
        drop(lock);
        inner.put_folio(id, 1);
        return Prepared::Freed(nr);
    }
    match add_to_swap_locked(inner, dev, lock, &region, &mut ptl, first, order, pool) {
        Ok(w) => Prepared::Writeback(vec![w]),
        // Splitting only pays if the pages can get slots of their own.
        Err(lock) if order > Order::BASE && dev.lock().map.nr_free() >= nr => {
            swap_out_split(inner, dev, lock, &region, ptl, first, order, pool)
        }
        Err(lock) => {
            drop(ptl);
            both(inner, &region, |c| c.swap_full.fetch_add(1, Relaxed));
            drop(lock);
            putback(inner, id);
            Prepared::Kept
        }
    }
}

/// Reclaim a clean victim without I/O: its file copy is valid (it was
/// write-protected in the guest from its swapin until sampled out), so its
/// entries point back at its slot, whose count passes from the folio to
/// them, and the folio goes. Returns the pages freed, or `None` if the
/// folio is not clean. The caller drops the locks and the isolation
/// reference, which frees the folio.
///
/// # Context
/// Folio lock and the page-table lock (`ptl`) held; the entries are
/// `ProtNone`.
fn drop_clean(
    inner: &Inner,
    id: FolioId,
    region: &Region,
    ptl: &mut PtlGuard<'_>,
    first: PageIndex,
    order: Order,
) -> Option<u64> {
    let nr = order.nr_pages();
    let mut slab = inner.folios.slab();
    let f = slab.live(id);
    if !f.flags.contains(FolioFlags::CLEAN) {
        return None;
    }
    let slot = f.swap.take().expect("a clean folio owns a slot");
    f.flags.remove(FolioFlags::CLEAN);
    f.flags.remove(FolioFlags::SAMPLED);
    ptl.set_range(first, nr, Pte::swap(slot));
    let r = rmap::remove_rmap_ptes(&mut slab, ptl, id, 0, nr, BlockState::NeedsZero);
    debug_assert!(r.freed.is_none(), "we hold the isolation reference");
    drop(slab);
    region.counters.resident(order, -(nr as i64));
    both(inner, region, |c| {
        c.swapped_pages.fetch_add(nr as i64, Relaxed);
        c.clean_dropped_pages.fetch_add(nr, Relaxed);
    });
    Some(nr)
}

/// The order-0 fallback of a large victim that found no contiguous slots:
/// split it and swap out each page on its own slot
/// (`THP_SWPOUT_FALLBACK`). Pages left without a slot stay sampled out.
///
/// # Context
/// Folio lock (`lock`) and the page-table lock (`ptl`) held; both are
/// released here.
#[allow(clippy::too_many_arguments)]
fn swap_out_split<'a>(
    inner: &'a Inner,
    dev: &SwapDevice,
    lock: FolioLockGuard<'a>,
    region: &Arc<Region>,
    mut ptl: PtlGuard<'_>,
    first: PageIndex,
    order: Order,
    pool: PoolOffset,
) -> Prepared<'a> {
    let pieces = split_for_swap(inner, region, &mut ptl, lock, first, order, pool);
    both(inner, region, |c| {
        c.swapout_fallback_order0.fetch_add(1, Relaxed)
    });
    let (mut wbs, mut kept) = (Vec::new(), Vec::new());
    for (k, piece) in (0..).zip(pieces) {
        let (idx, at) = (first.forward(k), pool.subpage(k));
        match add_to_swap_locked(inner, dev, piece, region, &mut ptl, idx, Order::BASE, at) {
            Ok(w) => wbs.push(w),
            Err(piece) => kept.push(piece),
        }
    }
    drop(ptl);
    if !kept.is_empty() {
        both(inner, region, |c| c.swap_full.fetch_add(1, Relaxed));
    }
    for piece in kept {
        let pid = piece.id();
        drop(piece);
        putback(inner, pid);
    }
    Prepared::Writeback(wbs)
}

/// Allocate slots for the locked, sampled-out folio of `lock` (its entries
/// `[first, first + 2^order)` are `ProtNone`), put it in the swap cache,
/// point the entries at the slots and drop its rmap (`add_to_swap()` and
/// `try_to_unmap()`). `Err` gives the lock back when the swap file has no
/// suitable run of slots.
///
/// # Context
/// Folio lock (`lock`) and the page-table lock (`ptl`) held.
#[allow(clippy::too_many_arguments)]
fn add_to_swap_locked<'a>(
    inner: &'a Inner,
    dev: &SwapDevice,
    lock: FolioLockGuard<'a>,
    region: &Arc<Region>,
    ptl: &mut PtlGuard<'_>,
    first: PageIndex,
    order: Order,
    pool: PoolOffset,
) -> Result<Writeback<'a>, FolioLockGuard<'a>> {
    let id = lock.id();
    let nr = order.nr_pages();
    let base = { dev.lock().add_to_swap(id, order) };
    let Some(base) = base else {
        return Err(lock);
    };
    ptl.set_range(first, nr, Pte::swap(base));
    {
        let mut slab = inner.folios.slab();
        let f = slab.live(id);
        f.swap = Some(base);
        f.flags.insert(FolioFlags::SWAPCACHE);
        f.flags.insert(FolioFlags::WRITEBACK);
        f.flags.remove(FolioFlags::SAMPLED);
        // Only a refault during this writeback may keep the folio cached.
        f.flags.remove(FolioFlags::REFAULTED);
        f.refcount += 1; // the swap cache's reference
        let r = rmap::remove_rmap_ptes(&mut slab, ptl, id, 0, nr, BlockState::NeedsZero);
        debug_assert!(r.freed.is_none());
    }
    region.counters.resident(order, -(nr as i64));
    both(inner, region, |c| {
        c.swapped_pages.fetch_add(nr as i64, Relaxed)
    });
    Ok(Writeback {
        lock,
        region: region.clone(),
        first,
        base,
        nr,
        pool,
    })
}

/// Split the locked, isolated, sampled-out folio of `lock` (all its
/// entries `ProtNone`) into order-0 folios, each locked and isolated (off
/// the LRU, with an isolation reference) and still sampled out. The first
/// keeps the id. Returns their locks, in page order. Analogue of
/// `split_folio_to_list()` in `shrink_folio_list()`.
///
/// # Context
/// Folio lock (`lock`) and the page-table lock (`ptl`) held.
fn split_for_swap<'a>(
    inner: &'a Inner,
    region: &Region,
    ptl: &mut PtlGuard<'_>,
    lock: FolioLockGuard<'a>,
    first: PageIndex,
    order: Order,
    pool: PoolOffset,
) -> Vec<FolioLockGuard<'a>> {
    debug_assert!(
        !inner
            .folios
            .slab()
            .live(lock.id())
            .flags
            .contains(FolioFlags::LRU),
        "victims are isolated"
    );
    // Each new piece gets its own isolation reference.
    let new = split_prot_none(inner, region, ptl, lock.id(), first, order, pool, 1);
    let mut pieces = vec![lock];
    // Born locked (the flags have LOCKED) and reachable only through
    // entries under the page-table lock we hold: the locks are ours.
    pieces.extend(new.into_iter().map(|pid| inner.folios.assume_locked(pid)));
    pieces
}

/// Cut the locked folio `id`, wholly mapped at `first` by `ProtNone`
/// entries (sampled out: its data is in its pool range at `pool`), into
/// base folios in place: the first page keeps `id`, the others become new
/// folios with their own entries and rmap, returned in page order. They
/// copy its flags, so they are born locked, and hold one reference for
/// their mapping plus `piece_refs`. References beyond the mappings stay
/// with `id`. The caller handles the LRU.
///
/// # Context
/// Folio lock of `id` and the page-table lock `ptl` held.
#[allow(clippy::too_many_arguments)]
fn split_prot_none(
    inner: &Inner,
    region: &Region,
    ptl: &mut PtlGuard<'_>,
    id: FolioId,
    first: PageIndex,
    order: Order,
    pool: PoolOffset,
    piece_refs: u32,
) -> Vec<FolioId> {
    let nr = order.nr_pages();
    let mut new = Vec::with_capacity(nr as usize - 1);
    let mut slab = inner.folios.slab();
    let f = slab.live(id);
    debug_assert_eq!(f.mapcount as u64, nr, "wholly mapped");
    let rmap = f.rmap.expect("a mapped folio has an rmap");
    let extra = f.refcount - f.mapcount;
    let (mut flags, pool_state) = (f.flags, f.pool_state);
    flags.remove(FolioFlags::DEFERRED_SPLIT);
    f.order = Order::BASE;
    f.refcount = 1 + extra;
    f.mapcount = 1;
    f.rmap = Some(Rmap {
        mapped: (0, 1),
        ..rmap
    });
    for k in 1..nr {
        let idx = first.forward(k);
        let pid = slab.insert(Folio {
            flags,
            refcount: 1 + piece_refs,
            mapcount: 1,
            rmap: Some(Rmap {
                index: idx,
                mapped: (0, 1),
                ..rmap
            }),
            pool_state,
            ..Folio::new(pool.subpage(k), Order::BASE)
        });
        ptl.set_pte(idx, Pte::prot_none(pid, 0));
        new.push(pid);
    }
    drop(slab);
    region.counters.resident(order, -(nr as i64));
    region.counters.resident(Order::BASE, nr as i64);
    inner.workers.folios_split.fetch_add(1, Relaxed);
    new
}

/// Write a run of folios with contiguous slots, then finish each one,
/// unlock it and drop the isolation reference. Returns the pages freed.
///
/// # Context
/// Each folio's lock is held (in its [`Writeback`]); no other lock.
fn pageout(inner: &Inner, dev: &SwapDevice, run: Vec<Writeback<'_>>) -> u64 {
    let bufs: Vec<&[u8]> = run
        .iter()
        .map(|w| {
            // SAFETY: as in `prepare_pageout`: the folio is locked, unmapped
            // (its entries are `Swap`), and its pages are in its pool range.
            let b: &[u8] = unsafe { inner.pool.pages_mut(w.pool, w.nr) };
            b
        })
        .collect();
    let result = dev.file.write(run[0].base, &bufs);
    drop(bufs);
    if let Err(e) = &result {
        log_error(&format!("swap write at slot {}: {e}", run[0].base.0));
    }
    let mut freed = 0;
    let mut off = 0;
    for w in run {
        let crcs = result.as_ref().ok().map(|c| &c[off..off + w.nr as usize]);
        off += w.nr as usize;
        freed += end_writeback(inner, dev, &w, crcs);
        let id = w.lock.id();
        drop(w);
        inner.put_folio(id, 1);
    }
    freed
}

/// Writeback of `w` finished (`folio_end_writeback()`): record checksums
/// and leave the swap cache, or on failure (`crcs` is `None`) map the
/// folio back. Returns the pages freed.
fn end_writeback(inner: &Inner, dev: &SwapDevice, w: &Writeback<'_>, crcs: Option<&[u32]>) -> u64 {
    let id = w.lock.id();
    let Some(crcs) = crcs else {
        {
            let mut ptl = w.region.pt.lock(w.first);
            let mut m = [0u64; 8];
            for k in 0..w.nr {
                if !ptl.is_dead() && ptl.pte(w.first.forward(k)) == Pte::swap(w.base.forward(k)) {
                    m[(k / 64) as usize] |= 1 << (k % 64);
                }
            }
            // The slots and the swap cache are settled before the install
            // wakes the faulting threads.
            let settle = || {
                let mut st = dev.lock();
                for k in (0..w.nr).filter(|&k| rmap::mask_test(&m, k)) {
                    let _ = st.swap_free_nr(w.base.forward(k), 1);
                }
                let _ = st.delete_from_swap_cache(w.base, w.nr);
                let mut slab = inner.folios.slab();
                let f = slab.live(id);
                f.swap = None;
                f.flags.remove(FolioFlags::SWAPCACHE);
                f.flags.remove(FolioFlags::WRITEBACK);
                // A refaulter waiting on the lock finds the cache empty and
                // retries; the folio is mapped again, not kept for it. Left
                // set, the flag would keep the folio in the cache after its
                // next, successful writeback, unmapped and off the LRU.
                f.flags.remove(FolioFlags::REFAULTED);
                let _ = slab.put_refs(id, 1);
            };
            map_folio_pages(inner, &w.region, &mut ptl, (id, w.first), &m, false, settle);
        }
        both(inner, &w.region, |c| c.write_errors.fetch_add(1, Relaxed));
        return 0;
    };
    let keep = inner.inject.hit(FaultPoint::SwapKeepCache);
    let refaulted = {
        let mut st = dev.lock();
        for (k, &c) in crcs.iter().enumerate() {
            st.map.set_crc(w.base.forward(k as u64), c);
        }
        // Kept only while an entry names one of its slots: a discard that
        // dropped the last of them during the write left the folio to us
        // (`swapin::free_swap_cache` does not wait for a write), and a
        // folio no fault can find would stay in the cache with its slots,
        // past the VM's teardown, until reclaim ran short of memory
        // (`a_folio_kept_after_a_discard_during_its_write_leaves_the_cache`).
        let named = (0..w.nr).any(|k| {
            matches!(
                st.map.state(w.base.forward(k)),
                SlotState::Used { count: 1.., .. }
            )
        });
        let mut slab = inner.folios.slab();
        let f = slab.live(id);
        f.flags.remove(FolioFlags::WRITEBACK);
        if keep && named {
            f.flags.insert(FolioFlags::REFAULTED);
        }
        // A refaulter waiting on the lock maps the folio from the cache
        // (it marked the folio under the swap lock, which we hold).
        let refaulted = f.flags.contains(FolioFlags::REFAULTED);
        if !refaulted {
            crate::swapin::uncache(&mut st, &mut slab, id, w.base, w.nr);
        }
        refaulted
    };
    both(inner, &w.region, |c| {
        c.swapout_folios.fetch_add(1, Relaxed);
        c.swapout_pages.fetch_add(w.nr, Relaxed);
    });
    match refaulted {
        true => 0,
        false => w.nr,
    }
}

/// Body of the background reclaimer: keep free memory between the low and
/// high watermarks, keep VMs under their maximum, and age the LRUs.
pub(crate) fn kswapd_thread(inner: &Inner) {
    let mut last_age = Instant::now();
    while !inner.shutdown.load(Relaxed) {
        inner.wait_kswapd(Duration::from_millis(50));
        if inner.shutdown.load(Relaxed) {
            return;
        }
        // Counted as a reclaim pass as a whole: VM records it holds may
        // be the last references, and their teardown runs here too.
        inner.reclaimers.fetch_add(1, Relaxed);
        if last_age.elapsed() >= AGE_INTERVAL {
            last_age = Instant::now();
            let vms = inner.live_vms();
            let mut slab = inner.folios.slab();
            vms.iter().for_each(|v| slab.lru_age(v.id));
        }
        balance(inner);
        // Stale pool copies left below a full batch go now.
        inner.zapq.drain(&inner.pool);
        inner.reclaimers.fetch_sub(1, Relaxed);
    }
}

/// One round of background reclaim (`balance_pgdat()`).
fn balance(inner: &Inner) {
    for vm in inner.live_vms() {
        let excess = vm.resident_pages().saturating_sub(vm.max_pages());
        if excess > 0 {
            inner.reclaimers.fetch_add(1, Relaxed);
            shrink_vm(inner, &vm, excess, Floor::Max, Until::Target);
            inner.reclaimers.fetch_sub(1, Relaxed);
        }
    }
    let free = inner.buddy().nr_free();
    let wm = inner.watermarks.get();
    if free >= wm.low {
        return;
    }
    let mut free = free;
    while free < wm.high && !inner.shutdown.load(Relaxed) {
        let got = try_to_free_pages(inner, None, wm.high - free, Until::Target);
        if got == 0 {
            break;
        }
        free = inner.buddy().nr_free();
    }
}

/// Reclaim for the API: about `bytes` from `vm` (or by policy from all),
/// respecting minimums. Returns bytes freed.
pub(crate) fn reclaim_bytes(inner: &Inner, vm: Option<VmId>, bytes: u64) -> u64 {
    try_to_free_pages(inner, vm, bytes.div_ceil(PAGE_SIZE), Until::Target) * PAGE_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_default_to_unlimited_and_unprotected() {
        let l = VmLimits::default();
        assert_eq!((l.min_bytes, l.max_bytes, l.priority), (0, None, 0));
    }
}
