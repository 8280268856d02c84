//! Compaction: rebuild free 2 MiB blocks from fragmented pool memory
//! (`compact_zone()` with `MIGRATE_ISOLATE` pageblocks), then collapse
//! guest ranges mapped by small folios into one 2 MiB folio mapped as a
//! PMD (`khugepaged`'s `collapse_huge_page()`).
//!
//! # Pool compaction
//! The pageblocks (2 MiB of pool) with the most free pages and some used
//! ones are the cheapest to empty. A few at a time ([`COMPACT_GROUP`]):
//! isolate them (their free blocks leave the free lists and pages freed
//! into them are parked), migrate every folio in them to blocks elsewhere
//! ([`crate::migrate`]), release them: the parked pages of each merge into
//! one free order-9 block, which the pre-zeroing worker turns into a zeroed
//! THP. If any folio of a pageblock cannot move (pinned, locked, no target)
//! that pageblock is released as it is.
//!
//! # Collapse
//! For a 2 MiB-aligned guest range whose entries are all present pages of
//! small folios (up to [`MAX_PTES_NONE`] holes, no swap entries): take a
//! ready order-9 block and create the new folio locked; trylock every small
//! folio; under the page-table lock move them out and set every entry to
//! `Migration(new)`, so faulters on the range (holes included) sleep on
//! the new folio's lock; copy each small folio into place with no
//! page-table lock; then under the lock map the new folio as one PMD and
//! drop the small folios. Any failure restores the entries exactly.
//!
//! # Context
//! No locks held on entry. Several folio locks are held at once only by
//! trylock (the rule of the crate docs).

use crate::buddy::{Block, BlockState, Buddy, PAGEBLOCK_PAGES};
use crate::fault::move_in;
use crate::folio::{Folio, FolioFlags, FolioLockGuard};
use crate::inject::FaultPoint;
use crate::manager::Inner;
use crate::migrate::{copy_pool, migrate_batch_for_compaction, MigrateError};
use crate::pte::{Pte, PteState, PTRS_PER_TABLE};
use crate::rmap::{self, Rmap};
use crate::sys;
use crate::types::{FolioId, Order, PageIndex, VmId};
use crate::vm::Region;
use crate::vmscan::move_out;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Holes (`None`/`Zero` entries) a collapse may fill with zeroes, of 512
/// (`khugepaged/max_ptes_none`; the kernel's default 511 would let a
/// collapse grow a guest's footprint 512-fold).
pub const MAX_PTES_NONE: u64 = 64;

/// Pageblocks isolated and emptied together by pool compaction (their
/// targets made holes by one `process_madvise`, one TLB flush).
const COMPACT_GROUP: u64 = 8;

/// What a compaction run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactReport {
    /// 2 MiB folios mapped in the VM(s) before.
    pub pmd_folios_before: u64,
    /// And after.
    pub pmd_folios_after: u64,
    /// Free 2 MiB pool blocks before.
    pub free_pmd_blocks_before: u64,
    /// And after.
    pub free_pmd_blocks_after: u64,
    /// Pageblocks emptied into free 2 MiB blocks.
    pub blocks_rebuilt: u64,
    /// Folios migrated to do that.
    pub folios_migrated: u64,
    /// Their bytes.
    pub migrated_bytes: u64,
    /// Folios that could not move because they were pinned.
    pub skipped_pinned: u64,
    /// Guest ranges collapsed into 2 MiB folios.
    pub collapsed: u64,
    /// Collapse candidates left alone (busy, no memory, failed and undone).
    pub collapse_skipped: u64,
    /// Bytes copied.
    pub copied_bytes: u64,
    /// Wall time of the work, ns (not counting the wait for the
    /// pre-zeroing worker before the "after" counts).
    pub elapsed_ns: u64,
}

/// Progress of a long operation: units done of a total.
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Sync);

/// Run compaction for `vm` (or all VMs): rebuild enough free 2 MiB blocks
/// for its collapse candidates, then collapse them. `progress(done, total)`
/// is called per candidate.
pub(crate) fn compact(inner: &Inner, vm: Option<VmId>, progress: Progress<'_>) -> CompactReport {
    let t0 = Instant::now();
    inner.reclaimers.fetch_add(1, Relaxed);
    let regions = vm_regions(inner, vm);
    let mut rep = CompactReport {
        pmd_folios_before: pmd_folios(&regions),
        free_pmd_blocks_before: free_pmd_blocks(inner),
        ..Default::default()
    };
    let copied0 = inner.workers.migrate_copy_bytes.load(Relaxed);
    let candidates: Vec<(Arc<Region>, PageIndex)> = regions
        .iter()
        .flat_map(|r| {
            collapse_candidates(inner, r)
                .into_iter()
                .map(|i| (r.clone(), i))
        })
        .collect();
    let total = candidates.len() as u64;
    progress(0, total);
    for (n, (region, first)) in candidates.iter().enumerate() {
        ensure_ready_pmd(inner, &mut rep);
        match collapse(inner, region, *first) {
            Ok(()) => rep.collapsed += 1,
            Err(_) => rep.collapse_skipped += 1,
        }
        progress(n as u64 + 1, total);
    }
    if candidates.is_empty() {
        // Nothing to collapse: still rebuild free 2 MiB blocks for faults.
        compact_pool(inner, u64::MAX, &mut rep);
    }
    inner.reclaimers.fetch_sub(1, Relaxed);
    rep.elapsed_ns = t0.elapsed().as_nanos() as u64;
    settle_worker(inner);
    rep.pmd_folios_after = pmd_folios(&regions);
    rep.free_pmd_blocks_after = free_pmd_blocks(inner);
    rep.copied_bytes = inner.workers.migrate_copy_bytes.load(Relaxed) - copied0;
    rep
}

fn vm_regions(inner: &Inner, vm: Option<VmId>) -> Vec<Arc<Region>> {
    inner
        .live_vms()
        .into_iter()
        .filter(|v| vm.is_none_or(|id| v.id == id))
        .flat_map(|v| v.regions().to_vec())
        .collect()
}

/// 2 MiB folios mapped in `regions` (whole PMD-level tables).
fn pmd_folios(regions: &[Arc<Region>]) -> u64 {
    regions
        .iter()
        .map(|r| {
            (0..r.pt.nr_tables())
                .filter(|t| r.pt.lock(PageIndex(t * PTRS_PER_TABLE)).is_huge())
                .count() as u64
        })
        .sum()
}

fn free_pmd_blocks(inner: &Inner) -> u64 {
    inner.buddy().stats().free_blocks[Order::PMD.index()]
}

fn ready_pmd_blocks(inner: &Inner) -> u64 {
    inner.buddy().stats().ready_blocks[Order::PMD.index()]
}

/// Wait (bounded) until the pre-zeroing worker holds no block, so that the
/// free-block counts of a report include the blocks it is preparing.
fn settle_worker(inner: &Inner) {
    let t0 = Instant::now();
    while inner.isolated_pages.load(Relaxed) > 0 && t0.elapsed() < Duration::from_secs(2) {
        // The worker is at work on the block: its pass ends the wait.
        inner.wait_for_freed(Duration::from_millis(10));
    }
}

/// Wait (bounded) for the pre-zeroing worker to make a rebuilt block ready.
fn wait_ready_pmd(inner: &Inner) {
    let t0 = Instant::now();
    let mut kicked = false;
    while ready_pmd_blocks(inner) == 0
        && (free_pmd_blocks(inner) > 0 || inner.isolated_pages.load(Relaxed) > 0)
        && t0.elapsed() < Duration::from_secs(2)
    {
        // Kicked once, the worker notifies after each block it prepares.
        inner.wait_memory(
            Duration::from_millis(20),
            !std::mem::replace(&mut kicked, true),
        );
    }
}

/// Make a ready 2 MiB block available as a target (a collapse, or a 2 MiB
/// folio's migration): when none is ready, free memory is scattered, so
/// rebuild one block and wait (bounded) for the worker to prepare it.
pub(crate) fn ensure_ready_pmd(inner: &Inner, rep: &mut CompactReport) {
    if ready_pmd_blocks(inner) == 0 {
        compact_pool(inner, 1, rep);
        wait_ready_pmd(inner);
    }
}

/// Tables of `region` that [`collapse`] would take.
fn collapse_candidates(inner: &Inner, region: &Region) -> Vec<PageIndex> {
    if region.pull_source().is_some() {
        return Vec::new();
    }
    (0..region.pt.nr_tables())
        .map(|t| PageIndex(t * PTRS_PER_TABLE))
        .filter(|&first| scan_table(inner, region, first, false).is_some())
        .collect()
}

/// How often the background compactor looks.
const KCOMPACTD_INTERVAL: Duration = Duration::from_millis(500);
/// Ranges it collapses per round at most (`khugepaged/pages_to_scan`).
const KCOMPACTD_COLLAPSE_PER_ROUND: usize = 8;

/// Body of the background compactor (`kcompactd` + `khugepaged`): when
/// faults had to fall back to smaller folios since the last round (no free
/// 2 MiB block although memory was free), rebuild a few 2 MiB blocks and
/// collapse a few ranges of small folios. Idle otherwise.
pub(crate) fn kcompactd_thread(inner: &Inner) {
    let mut seen = inner.faults.order_fallback.load(Relaxed);
    while !inner.shutdown.load(Relaxed) {
        inner.wait_kcompactd(KCOMPACTD_INTERVAL);
        let now = inner.faults.order_fallback.load(Relaxed);
        if inner.shutdown.load(Relaxed) || now == seen {
            continue;
        }
        inner.reclaimers.fetch_add(1, Relaxed);
        let mut rep = CompactReport::default();
        compact_pool(inner, 4, &mut rep);
        // Rebuilt blocks become THPs on the pre-zeroing worker first.
        wait_ready_pmd(inner);
        let regions = vm_regions(inner, None);
        let mut left = KCOMPACTD_COLLAPSE_PER_ROUND;
        let mut unfinished = false;
        'outer: for r in &regions {
            for first in collapse_candidates(inner, r) {
                if left == 0 || inner.shutdown.load(Relaxed) || ready_pmd_blocks(inner) == 0 {
                    unfinished = true;
                    break 'outer;
                }
                let _ = collapse(inner, r, first);
                left -= 1;
            }
        }
        // Come back next round for what is left (a collapse that made
        // progress may have more to do), otherwise wait for new fallbacks.
        if !unfinished || left == KCOMPACTD_COLLAPSE_PER_ROUND {
            seen = now;
        }
        inner.workers.kcompactd_rounds.fetch_add(1, Relaxed);
        inner.reclaimers.fetch_sub(1, Relaxed);
    }
}

/// Empty up to `want` pageblocks into free 2 MiB blocks.
pub(crate) fn compact_pool(inner: &Inner, want: u64, rep: &mut CompactReport) {
    /// Counts the pass in `Inner::compacting` (the worker holds off while
    /// it runs), even if it unwinds, and wakes the worker at its end.
    struct Pass<'a>(&'a Inner);
    impl Drop for Pass<'_> {
        fn drop(&mut self) {
            self.0.compacting.fetch_sub(1, Relaxed);
            self.0.kick_worker();
        }
    }
    inner.compacting.fetch_add(1, Relaxed);
    let _pass = Pass(inner);
    compact_pool_inner(inner, want, rep);
}

fn compact_pool_inner(inner: &Inner, want: u64, rep: &mut CompactReport) {
    // Folios by pageblock, in one pass over the folio table, kept current
    // with the folios this run creates (a pageblock emptied earlier may
    // receive some); folios faulted in meanwhile make a pageblock fail.
    let pb_of = |pool: crate::types::PoolOffset| pool.pfn() - pool.pfn() % PAGEBLOCK_PAGES;
    // A pageblock's slot in `by_pb`, from its first pfn.
    let slot = |pb: u64| (pb / PAGEBLOCK_PAGES) as usize;
    let nr_pbs = inner.pool.nr_pages().div_ceil(PAGEBLOCK_PAGES) as usize;
    let mut by_pb: Vec<Vec<FolioId>> = vec![Vec::new(); nr_pbs];
    for (id, f) in inner.folios.slab().iter() {
        by_pb[slot(pb_of(f.pool))].push(id);
    }
    let mut done = 0;
    // Candidates, the pageblocks with the most free pages (fewest to move)
    // first; each one's count is looked at again when its turn comes.
    let mut order: Vec<(u64, u64)> = inner
        .buddy()
        .free_pages_per_pageblock()
        .into_iter()
        .enumerate()
        .map(|(pb, free)| (pb as u64 * PAGEBLOCK_PAGES, free))
        .filter(|&(_, free)| free > 0 && free < PAGEBLOCK_PAGES)
        .collect();
    let mut scanner = FreeScanner::new(&order);
    order.sort_by_key(|&(pb, free)| (std::cmp::Reverse(free), pb));
    let mut order = order.into_iter();
    let mut room = true;
    while done < want && room {
        // Isolate a group of pageblocks, so that one `process_madvise`
        // makes the targets of all of them holes: each call ends with a
        // TLB flush of every CPU running the process, which cost more than
        // the zap itself for one pageblock's targets.
        let mut group: Vec<u64> = Vec::new();
        let mut reserved = 0;
        for (pb, _) in order.by_ref() {
            if scanner.used.contains(&pb) {
                // The scanners met: this one is being filled, not emptied.
                continue;
            }
            // Looked at and isolated under one zone lock.
            let mut buddy = inner.buddy();
            let free = buddy.pageblock_free_pages(pb);
            if free == 0 || free == PAGEBLOCK_PAGES {
                continue;
            }
            // Room elsewhere for what lives here and in the rest of the
            // group (the targets; each pageblock gives as much back once
            // released).
            let used = PAGEBLOCK_PAGES - free;
            if buddy.nr_free() < reserved + used + free {
                room = false;
                break;
            }
            if !buddy.isolate_pageblock(pb) {
                continue;
            }
            drop(buddy);
            reserved += used;
            group.push(pb);
            if group.len() as u64 >= (want - done).min(COMPACT_GROUP) {
                break;
            }
        }
        if group.is_empty() {
            break;
        }
        // The folios still here (not freed, nor reused elsewhere, since the
        // pass), with the index of their pageblock in the group.
        let here: Vec<(FolioId, u64, usize)> = {
            let slab = inner.folios.slab();
            group
                .iter()
                .enumerate()
                .flat_map(|(g, &pb)| {
                    std::mem::take(&mut by_pb[slot(pb)])
                        .into_iter()
                        .map(move |id| (id, pb, g))
                })
                .filter_map(|(id, pb, g)| {
                    let f = slab.get(id)?;
                    (pb_of(f.pool) == pb).then_some((id, f.order.bytes(), g))
                })
                .collect()
        };
        let ids: Vec<FolioId> = here.iter().map(|h| h.0).collect();
        let mut ok = vec![true; group.len()];
        for ((id, bytes, g), r) in
            here.iter()
                .zip(migrate_batch_for_compaction(inner, &ids, &mut |b, o| {
                    scanner.alloc(b, o)
                }))
        {
            let id = *id;
            match r {
                Ok(new) => {
                    rep.folios_migrated += 1;
                    rep.migrated_bytes += bytes;
                    if let Some(f) = inner.folios.slab().get(new) {
                        by_pb[slot(pb_of(f.pool))].push(new);
                    }
                }
                Err(MigrateError::Unmovable) if inner.folios.slab().get(id).is_none() => {}
                Err(e) => {
                    // The batch went on; this pageblock stays in use.
                    if e == MigrateError::Pinned {
                        rep.skipped_pinned += 1;
                    }
                    ok[*g] = false;
                }
            }
        }
        for (g, &pb) in group.iter().enumerate() {
            let freed = {
                let mut buddy = inner.buddy();
                buddy.unisolate_pageblock(pb);
                ok[g] && buddy.pageblock_is_free(pb)
            };
            match freed {
                true => {
                    done += 1;
                    rep.blocks_rebuilt += 1;
                    inner.workers.compact_blocks.fetch_add(1, Relaxed);
                }
                false => _ = inner.workers.compact_failed.fetch_add(1, Relaxed),
            }
        }
    }
}

/// Compaction's free scanner (`isolate_freepages()`): it hands out
/// migration targets from the free pages of the fullest pageblocks, the
/// ones compaction fills rather than empties, in address order, so that
/// the targets of a batch are mostly adjacent and a few long
/// `MADV_DONTNEED` ranges make them holes (the kernel's cost is mostly per
/// range). The pageblocks it fills are never emptied in the same run (the
/// two scanners meet, as in `compact_zone()`). When it runs out, targets
/// are the smallest free blocks anywhere ([`Buddy::alloc_smallest`]).
struct FreeScanner {
    /// Pageblocks to fill, the next one last.
    dests: Vec<u64>,
    /// The pageblock being filled and the pfn to scan on from.
    cur: Option<(u64, u64)>,
    /// Pageblocks filled (or being filled) in this run.
    used: HashSet<u64>,
}

impl FreeScanner {
    /// From `(pageblock, free pages)` of the partly used pageblocks.
    fn new(partly_used: &[(u64, u64)]) -> FreeScanner {
        let mut dests = partly_used.to_vec();
        // Popped fewest free first, highest address first among equals
        // (the source list is taken from the other end).
        dests.sort_by_key(|&(pb, free)| (std::cmp::Reverse(free), pb));
        FreeScanner {
            dests: dests.into_iter().map(|d| d.0).collect(),
            cur: None,
            used: HashSet::new(),
        }
    }

    /// A target block of `order`.
    ///
    /// # Context
    /// Under the zone lock (`buddy`).
    fn alloc(&mut self, buddy: &mut Buddy, order: Order) -> Option<Block> {
        loop {
            if let Some((pb, from)) = self.cur {
                match buddy.alloc_in_range(from, pb + PAGEBLOCK_PAGES, order) {
                    Some((b, next)) => {
                        self.cur = Some((pb, next));
                        return Some(b);
                    }
                    None => self.cur = None,
                }
            }
            let Some(pb) = self.dests.pop() else {
                return buddy.alloc_smallest(order);
            };
            // Emptied meanwhile (by us or by frees): keep it whole.
            if buddy.pageblock_is_free(pb) {
                continue;
            }
            self.used.insert(pb);
            self.cur = Some((pb, pb));
        }
    }
}

/// One small folio inside a collapse range: id, first subpage's offset in
/// the range, order.
type Member = (FolioId, u64, Order);

/// Entries of the table at `first` if it can be collapsed, with its member
/// folios (each fully mapped inside the range, unpinned, not partial).
/// With `take_refs`, a reference is taken on each member here, under the
/// page-table lock that keeps it mapped and so alive: once that lock is
/// dropped, a discard or reclaim may free it.
fn scan_table(
    inner: &Inner,
    region: &Region,
    first: PageIndex,
    take_refs: bool,
) -> Option<(Vec<Pte>, Vec<Member>)> {
    let ptl = region.pt.lock(first);
    if ptl.is_dead() || ptl.is_huge() || ptl.end().0 - first.0 < PTRS_PER_TABLE {
        return None;
    }
    let ptes: Vec<Pte> = (0..PTRS_PER_TABLE)
        .map(|k| ptl.pte(first.forward(k)))
        .collect();
    let mut holes = 0;
    let mut members: Vec<Member> = Vec::new();
    let mut slab = inner.folios.slab();
    for (k, p) in ptes.iter().enumerate() {
        match p.state() {
            PteState::None | PteState::Zero => holes += 1,
            PteState::Present { folio, subpage } | PteState::ProtNone { folio, subpage } => {
                if subpage != 0 {
                    // A page of the member that starts `subpage` entries
                    // back. A folio whose first page is not mapped there
                    // (partly discarded, its split still queued) is no
                    // member: collapse would drop its pages with the range.
                    let head = k
                        .checked_sub(subpage as usize)
                        .map(|h| ptes[h].mapped_folio());
                    if head != Some(Some((folio, 0))) {
                        return None;
                    }
                    continue;
                }
                let f = slab.get(folio)?;
                let whole = f.page_mapped.is_none()
                    && f.mapcount as u64 == f.nr_pages()
                    && f.pincount == 0
                    && f.order < Order::PMD
                    && !f.flags.contains(FolioFlags::SWAPCACHE)
                    && f.rmap.is_some_and(|r| r.index == first.forward(k as u64));
                if !whole {
                    return None;
                }
                members.push((folio, k as u64, f.order));
            }
            _ => return None,
        }
    }
    if holes > MAX_PTES_NONE || members.is_empty() {
        return None;
    }
    if take_refs {
        members.iter().for_each(|m| slab.get_ref(m.0));
    }
    Some((ptes, members))
}

/// Collapse the table at `first` into one 2 MiB folio (module docs).
pub(crate) fn collapse(
    inner: &Inner,
    region: &Region,
    first: PageIndex,
) -> Result<(), MigrateError> {
    let r = collapse_inner(inner, region, first);
    match r {
        Ok(()) => inner.workers.collapsed.fetch_add(1, Relaxed),
        Err(_) => inner.workers.collapse_aborted.fetch_add(1, Relaxed),
    };
    r
}

fn collapse_inner(inner: &Inner, region: &Region, first: PageIndex) -> Result<(), MigrateError> {
    // References keep the members alive while we gather their locks.
    let (ptes, members) = scan_table(inner, region, first, true).ok_or(MigrateError::Busy)?;
    let put_all = |members: &[Member]| {
        let mut slab = inner.folios.slab();
        let freed: Vec<_> = members
            .iter()
            .filter_map(|m| slab.put_refs(m.0, 1))
            .collect();
        drop(slab);
        freed.into_iter().for_each(|f| inner.free_range(f));
    };
    let target = {
        let hit = inner.inject.hit(FaultPoint::MigrateAlloc);
        let b = (!hit).then(|| inner.buddy().alloc(Order::PMD, BlockState::Ready));
        match b.flatten() {
            Some(b) => b,
            None => {
                put_all(&members);
                return Err(MigrateError::NoMemory);
            }
        }
    };
    let mut locks: Vec<FolioLockGuard<'_>> = Vec::with_capacity(members.len());
    for m in &members {
        match inner.folios.trylock(m.0) {
            Some(l) => locks.push(l),
            None => break,
        }
    }
    // The new folio, born locked, owns the target block from here on: its
    // last reference frees it, whoever drops it.
    let new = inner.folios.slab().insert(Folio {
        flags: {
            let mut f = FolioFlags::default();
            f.insert(FolioFlags::LOCKED);
            f
        },
        refcount: 1,
        rmap: Some(Rmap {
            vm: region.vm,
            region: region.index,
            index: first,
            mapped: (0, 0),
        }),
        pool_state: BlockState::NeedsZero,
        ..Folio::new(target.offset, Order::PMD)
    });
    let new_lock = inner.folios.assume_locked(new);
    let abort = |locks: Vec<FolioLockGuard<'_>>, new_lock: FolioLockGuard<'_>, e| {
        drop(new_lock);
        drop(locks);
        inner.put_folio(new, 1);
        put_all(&members);
        Err(e)
    };
    if locks.len() < members.len() {
        return abort(locks, new_lock, MigrateError::Busy);
    }
    let mut ptl = region.pt.lock(first);
    let same = !ptl.is_dead()
        && ptes
            .iter()
            .enumerate()
            .all(|(k, p)| ptl.pte(first.forward(k as u64)) == *p);
    if !same {
        drop(ptl);
        return abort(locks, new_lock, MigrateError::Busy);
    }
    if inner.inject.hit(FaultPoint::MigrateUnmap) {
        drop(ptl);
        return abort(
            locks,
            new_lock,
            MigrateError::Failed(FaultPoint::MigrateUnmap),
        );
    }
    // Unmap every present run into its folio's pool range. A member
    // pinned since `scan_table` looked (a pin needs only the page-table
    // lock, held again now) stays where the pin expects it.
    let pools: Option<HashMap<FolioId, crate::types::PoolOffset>> = {
        let slab = inner.folios.slab();
        members
            .iter()
            .map(|m| {
                let f = slab.get(m.0).expect("we hold a reference");
                (f.pincount == 0).then_some((m.0, f.pool))
            })
            .collect()
    };
    let Some(pools) = pools else {
        drop(ptl);
        return abort(locks, new_lock, MigrateError::Pinned);
    };
    // From here their data moves into the new folio (or, on undo, back by
    // MOVE, which drops write protection): none stays clean. An abort
    // before this point left every member as it was, clean ones too.
    for l in &locks {
        inner.clear_clean(l.id());
    }
    let mut moved: Vec<(u64, u64)> = Vec::new();
    let mut unmap_ok = true;
    for &(id, k0, order) in &members {
        let pool = pools[&id];
        let nr = order.nr_pages();
        let mut j = 0;
        while j < nr && unmap_ok {
            if ptes[(k0 + j) as usize] != Pte::present(id, j) {
                j += 1;
                continue;
            }
            let run = (j..nr)
                .take_while(|&i| ptes[(k0 + i) as usize] == Pte::present(id, i))
                .count() as u64;
            let got = move_out(inner, region, first.forward(k0 + j), pool.subpage(j), run);
            if got > 0 {
                moved.push((k0 + j, got));
            }
            unmap_ok = got == run;
            j += run;
        }
    }
    let restore_moved = |moved: &[(u64, u64)]| {
        for &(k, n) in moved {
            let (id, sub) = ptes[k as usize]
                .mapped_folio()
                .expect("moved pages were present");
            move_in(
                inner,
                region,
                first.forward(k),
                pools[&id].subpage(sub as u64),
                n,
                false,
            );
        }
    };
    if !unmap_ok {
        restore_moved(&moved);
        drop(ptl);
        return abort(
            locks,
            new_lock,
            MigrateError::Failed(FaultPoint::MigrateUnmap),
        );
    }
    ptl.set_range(
        first,
        PTRS_PER_TABLE,
        Pte::new(PteState::Migration { folio: new }),
    );
    // The host range is empty now but keeps its PTE table, which would make
    // the final MOVE split the THP; MADV_DONTNEED on an empty range frees
    // the table (CONFIG_PT_RECLAIM), so the new folio moves in as one PMD.
    // SAFETY: a 2 MiB range of the guest mapping whose entries are all
    // `Migration(new)` under the page-table lock we hold, its pages moved
    // out: nothing is there to lose, and guest memory is never borrowed.
    let r = unsafe { sys::dontneed(region.host_addr(first).raw(), Order::PMD.bytes() as usize) };
    if let Err(e) = r {
        crate::vm::log_error(&format!("collapse: dontneed: {e}"));
    }
    drop(ptl);

    let copy_failed = inner.inject.hit(FaultPoint::MigrateCopy);
    if !copy_failed {
        for &(id, k0, order) in &members {
            // SAFETY: the member is locked and all its pages are in its pool
            // range (entries are `Migration(new)`); the target block belongs
            // to the new folio, which is locked and mapped nowhere. The
            // target's other pages stay zero (a `Ready` block).
            unsafe {
                copy_pool(
                    inner,
                    pools[&id],
                    target.offset.subpage(k0),
                    order.nr_pages(),
                )
            };
        }
    }

    let mut ptl = region.pt.lock(first);
    if ptl.is_dead() {
        // Torn down meanwhile: teardown skipped our entries; drop the
        // members' mappings ourselves.
        let mut slab = inner.folios.slab();
        for &(id, _, order) in &members {
            let nr = order.nr_pages();
            let r = rmap::remove_rmap_ptes(&mut slab, &ptl, id, 0, nr, BlockState::NeedsZero);
            debug_assert!(r.freed.is_none());
            region.counters.resident(order, -(nr as i64));
        }
        drop(slab);
        drop(ptl);
        return abort(locks, new_lock, MigrateError::Unmovable);
    }
    if copy_failed || inner.inject.hit(FaultPoint::MigrateRemap) {
        for (k, p) in ptes.iter().enumerate() {
            ptl.set_pte(first.forward(k as u64), *p);
        }
        restore_moved(&moved);
        drop(ptl);
        let point = match copy_failed {
            true => FaultPoint::MigrateCopy,
            false => FaultPoint::MigrateRemap,
        };
        return abort(locks, new_lock, MigrateError::Failed(point));
    }
    {
        let mut slab = inner.folios.slab();
        for &(id, _, order) in &members {
            let nr = order.nr_pages();
            slab.lru_del(id);
            let r = rmap::remove_rmap_ptes(&mut slab, &ptl, id, 0, nr, BlockState::NeedsZero);
            debug_assert!(r.freed.is_none(), "we hold a reference");
            region.counters.resident(order, -(nr as i64));
        }
        let f = slab.live(new);
        f.refcount += PTRS_PER_TABLE as u32;
        f.mapcount = PTRS_PER_TABLE as u32;
        f.pool_state = BlockState::NeedsPopulate;
        for fl in [FolioFlags::EXCLUSIVE, FolioFlags::REFERENCED] {
            f.flags.insert(fl);
        }
        if let Some(r) = f.rmap.as_mut() {
            r.mapped = (0, PTRS_PER_TABLE as u16);
        }
        slab.lru_add(new);
    }
    ptl.set_range(first, PTRS_PER_TABLE, Pte::present(new, 0));
    move_in(inner, region, first, target.offset, PTRS_PER_TABLE, false);
    region.counters.resident(Order::PMD, PTRS_PER_TABLE as i64);
    drop(ptl);
    drop(new_lock);
    drop(locks);
    inner.put_folio(new, 1);
    put_all(&members);
    Ok(())
}
