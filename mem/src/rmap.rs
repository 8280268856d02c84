//! Reverse mapping: folio → (vm, region, first page index, mapped subrange),
//! and the mapcount bookkeeping that goes with mapping and unmapping.
//!
//! Guest memory is private to one VM, so a folio has at most one mapping,
//! like an exclusive anon folio: its rmap is one record, as `folio->mapping`
//! plus `folio->index` is for anon memory. A large folio may be partially
//! mapped (a discard of part of it); then the folio keeps a per-page
//! mapcount and goes on the deferred-split queue (`deferred_split_folio()`),
//! to be split off the fault path by [`crate::split`].
//!
//! # Context
//! Every function here takes the folio-table lock (as `&mut FolioSlab`)
//! and the page-table lock of the mapping (as `&PtlGuard`): mapcounts
//! change only together with the entries they count.

use crate::buddy::{Block, BlockState};
use crate::folio::{Folio, FolioFlags, FolioSlab, FreedRange};
use crate::pte::PtlGuard;
use crate::types::{FolioId, Order, PageIndex, VmId};

/// Where a folio is mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rmap {
    /// The VM.
    pub vm: VmId,
    /// Index of the region in the VM's layout.
    pub region: u32,
    /// Guest page of the folio's subpage 0 (aligned to the folio order).
    pub index: PageIndex,
    /// Mapped subpages `[start, end)`: the bounding range of the mapped pages.
    pub mapped: (u16, u16),
}

/// Create the record of a new folio from `block` and map all of it at
/// `rmap.index` (`folio_add_new_anon_rmap()` + `folio_add_lru()`). The folio
/// is new: nobody else can reach it until the entries are set.
pub fn add_new_anon_rmap(
    slab: &mut FolioSlab,
    _ptl: &PtlGuard<'_>,
    block: Block,
    rmap: Rmap,
) -> FolioId {
    let nr = block.order.nr_pages() as u32;
    let mut flags = FolioFlags::default();
    flags.insert(FolioFlags::EXCLUSIVE);
    // Its faulting access is still to come.
    flags.insert(FolioFlags::REFERENCED);
    let id = slab.insert(Folio {
        flags,
        refcount: nr,
        mapcount: nr,
        rmap: Some(Rmap {
            mapped: (0, nr as u16),
            ..rmap
        }),
        ..Folio::new(block.offset, block.order)
    });
    slab.lru_add(id);
    id
}

/// A set of subpages of one folio (bit i: subpage i), as used for the
/// per-page mapcount.
pub type PageMask = [u64; 8];

/// A mask of subpages `[0, nr)`.
pub fn full_mask(nr: u64) -> PageMask {
    let mut m = [0u64; 8];
    (0..nr).for_each(|i| m[(i / 64) as usize] |= 1 << (i % 64));
    m
}

/// Whether subpage `i` is in `mask`.
pub fn mask_test(mask: &PageMask, i: u64) -> bool {
    bit(mask, i)
}

/// Map the subpages in `mask` of a folio that nothing maps (just read in,
/// or found in the swap cache) at its rmap location
/// (`folio_add_anon_rmap_ptes()` with `RMAP_EXCLUSIVE`, for `do_swap_page()`).
/// Returns whether the folio became partially mapped (queued for split).
///
/// Exclusivity is the state recorded at swap-out: guest memory is private
/// to the one VM in the folio's rmap, so the folio maps back exclusive.
///
/// # Context
/// The folio lock is held (the folio was visible in the swap cache), and
/// the page-table lock of the range, and the folio-table lock (`slab`).
pub fn add_anon_rmap(
    slab: &mut FolioSlab,
    _ptl: &PtlGuard<'_>,
    id: FolioId,
    mask: &PageMask,
) -> bool {
    let f = slab.live(id);
    debug_assert_eq!(f.mapcount, 0, "{id:?} is mapped already");
    debug_assert!(f.flags.contains(FolioFlags::LOCKED));
    let nr = f.nr_pages();
    let n = (0..nr).filter(|&i| bit(mask, i)).count() as u32;
    f.mapcount = n;
    f.refcount += n;
    f.flags.insert(FolioFlags::EXCLUSIVE);
    f.page_mapped = (n as u64 != nr).then(|| Box::new(*mask));
    update_mapped_range(f);
    queue_if_partial(slab, id)
}

/// Put folio `id` on the deferred-split queue if it is partly mapped and
/// not queued yet (`deferred_split_folio()`). Returns whether it was
/// queued: the caller kicks the worker.
///
/// # Context
/// Folio-table lock held (`slab`).
pub(crate) fn queue_if_partial(slab: &mut FolioSlab, id: FolioId) -> bool {
    let f = slab.live(id);
    let partial = f.mapcount > 0 && (f.mapcount as u64) < f.nr_pages();
    if !partial || f.flags.contains(FolioFlags::DEFERRED_SPLIT) {
        return false;
    }
    f.flags.insert(FolioFlags::DEFERRED_SPLIT);
    slab.deferred_split.push_back(id);
    true
}

/// What [`remove_rmap_ptes`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RmapRemoval {
    /// The folio lost its last reference; return this range to the allocator.
    pub freed: Option<FreedRange>,
    /// The folio became partially mapped and was queued for deferred split.
    pub queued_split: bool,
}

fn bit(map: &[u64; 8], i: u64) -> bool {
    map[(i / 64) as usize] & (1 << (i % 64)) != 0
}

/// Unmap subpages `[first, first + nr)` of `id` (`folio_remove_rmap_ptes()`)
/// and drop the references the mappings held. `pool_state` says what the
/// pool range of those pages now holds (the pages moved back, or a hole).
///
/// Invariant: those subpages are mapped.
pub fn remove_rmap_ptes(
    slab: &mut FolioSlab,
    _ptl: &PtlGuard<'_>,
    id: FolioId,
    first: u64,
    nr: u64,
    pool_state: BlockState,
) -> RmapRemoval {
    let mut out = RmapRemoval::default();
    let Some(f) = slab.get_mut(id) else {
        debug_assert!(false, "unmapping dead folio {id:?}");
        return out;
    };
    debug_assert!(first + nr <= f.nr_pages());
    f.pool_state = f.pool_state.max(pool_state);
    let whole = first == 0 && nr == f.nr_pages() && f.page_mapped.is_none();
    if !whole {
        let total = f.nr_pages();
        let map = f.page_mapped.get_or_insert_with(|| {
            // Materialise the per-page mapcount: everything was mapped.
            let mut m = Box::new([0u64; 8]);
            (0..total).for_each(|i| m[(i / 64) as usize] |= 1 << (i % 64));
            m
        });
        for i in first..first + nr {
            debug_assert!(bit(map, i), "subpage {i} of {id:?} unmapped twice");
            map[(i / 64) as usize] &= !(1 << (i % 64));
        }
    }
    f.mapcount -= nr as u32;
    update_mapped_range(f);
    out.queued_split = queue_if_partial(slab, id);
    out.freed = slab.put_refs(id, nr as u32);
    out
}

/// Recompute the rmap's mapped subrange from the per-page mapcount.
fn update_mapped_range(f: &mut Folio) {
    let nr = f.nr_pages();
    let range = match (&f.page_mapped, f.mapcount) {
        (_, 0) => (0, 0),
        (None, _) => (0, nr as u16),
        (Some(map), _) => {
            let lo = (0..nr).find(|&i| bit(map, i)).unwrap_or(0);
            let hi = (0..nr).rev().find(|&i| bit(map, i)).map_or(0, |i| i + 1);
            (lo as u16, hi as u16)
        }
    };
    if let Some(r) = f.rmap.as_mut() {
        r.mapped = range;
    }
}

/// Whether subpage `i` of `f` is mapped (the per-page mapcount).
pub fn page_mapcount(f: &Folio, i: u64) -> u32 {
    match &f.page_mapped {
        Some(map) => bit(map, i) as u32,
        None => (f.mapcount as u64 == f.nr_pages()) as u32,
    }
}

/// Split plan for a partially mapped folio: maximal naturally aligned
/// pieces that are wholly mapped or wholly unmapped, as `(first subpage,
/// order, mapped)`. Analogue of the non-uniform `folio_split()`.
pub fn split_plan(f: &Folio) -> Vec<(u64, Order, bool)> {
    let mut out = Vec::new();
    plan(f, 0, f.order, &mut out);
    out
}

fn plan(f: &Folio, first: u64, order: Order, out: &mut Vec<(u64, Order, bool)>) {
    let n = order.nr_pages();
    let mapped = (first..first + n)
        .filter(|&i| page_mapcount(f, i) == 1)
        .count() as u64;
    match (mapped, order.lower()) {
        (0, _) => out.push((first, order, false)),
        (m, _) if m == n => out.push((first, order, true)),
        (_, Some(lower)) => {
            plan(f, first, lower, out);
            plan(f, first + lower.nr_pages(), lower, out);
        }
        (_, None) => unreachable!("an order-0 piece is wholly mapped or not"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pte::PageTable;
    use crate::types::PoolOffset;
    use proptest::prelude::*;

    fn block(order: Order) -> Block {
        Block {
            offset: PoolOffset(0),
            order,
            state: BlockState::Ready,
        }
    }

    fn rmap() -> Rmap {
        Rmap {
            vm: VmId(1),
            region: 0,
            index: PageIndex(512),
            mapped: (0, 0),
        }
    }

    #[test]
    fn whole_unmap_frees_without_split() {
        let pt = PageTable::new(1024);
        let ptl = pt.lock(PageIndex(512));
        let mut s = FolioSlab::default();
        let id = add_new_anon_rmap(&mut s, &ptl, block(Order::PMD), rmap());
        let f = s.get(id).unwrap();
        assert_eq!(
            (f.refcount, f.mapcount, f.rmap.unwrap().mapped),
            (512, 512, (0, 512))
        );
        assert_eq!(s.lru_iter().collect::<Vec<_>>(), vec![id]);
        let r = remove_rmap_ptes(&mut s, &ptl, id, 0, 512, BlockState::NeedsZero);
        assert!(!r.queued_split);
        assert_eq!(r.freed.unwrap().state, BlockState::NeedsZero);
        assert_eq!(s.nr_live(), 0);
        assert_eq!(s.lru_iter().count(), 0);
    }

    #[test]
    fn partial_unmap_tracks_pages_and_queues_split() {
        let pt = PageTable::new(1024);
        let ptl = pt.lock(PageIndex(512));
        let mut s = FolioSlab::default();
        let id = add_new_anon_rmap(&mut s, &ptl, block(Order(4)), rmap());
        let r = remove_rmap_ptes(&mut s, &ptl, id, 0, 3, BlockState::NeedsPopulate);
        assert!(r.queued_split && r.freed.is_none());
        let f = s.get(id).unwrap();
        assert_eq!((f.mapcount, f.refcount), (13, 13));
        assert_eq!(f.rmap.unwrap().mapped, (3, 16));
        assert_eq!((page_mapcount(f, 2), page_mapcount(f, 3)), (0, 1));
        assert_eq!(
            split_plan(f),
            vec![
                (0, Order(1), false),
                (2, Order(0), false),
                (3, Order(0), true),
                (4, Order(2), true),
                (8, Order(3), true)
            ]
        );
        // Queued once only.
        let r = remove_rmap_ptes(&mut s, &ptl, id, 15, 1, BlockState::NeedsPopulate);
        assert!(!r.queued_split);
        assert_eq!(s.get(id).unwrap().rmap.unwrap().mapped, (3, 15));
        assert_eq!(s.deferred_split.len(), 1);
        let r = remove_rmap_ptes(&mut s, &ptl, id, 3, 12, BlockState::NeedsZero);
        assert_eq!(r.freed.unwrap().state, BlockState::NeedsZero);
    }

    proptest! {
        #[test]
        fn mapcount_equals_mapped_pages(order in 0u8..=9, unmaps in prop::collection::vec((0u64..512, 1u64..64), 0..20)) {
            let pt = PageTable::new(512);
            let ptl = pt.lock(PageIndex(0));
            let mut s = FolioSlab::default();
            let order = Order(order);
            let nr = order.nr_pages();
            let id = add_new_anon_rmap(&mut s, &ptl, block(order), Rmap { index: PageIndex(0), ..rmap() });
            let mut model = vec![true; nr as usize];
            for (start, len) in unmaps {
                let start = start % nr;
                // Unmap the mapped pages of [start, start+len) run by run.
                let end = (start + len).min(nr);
                let mut i = start;
                while i < end {
                    if !model[i as usize] { i += 1; continue; }
                    let mut j = i;
                    while j < end && model[j as usize] { j += 1; }
                    let r = remove_rmap_ptes(&mut s, &ptl, id, i, j - i, BlockState::NeedsPopulate);
                    (i..j).for_each(|k| model[k as usize] = false);
                    let left = model.iter().filter(|m| **m).count() as u64;
                    prop_assert_eq!(r.freed.is_some(), left == 0);
                    if left == 0 { return Ok(()); }
                    i = j;
                }
                let f = s.get(id).unwrap();
                let left = model.iter().filter(|m| **m).count() as u64;
                prop_assert_eq!(f.mapcount as u64, left);
                prop_assert!(f.refcount >= f.mapcount + f.pincount);
                for k in 0..nr {
                    prop_assert_eq!(page_mapcount(f, k), model[k as usize] as u32);
                }
                let lo = model.iter().position(|m| *m).unwrap() as u16;
                let hi = model.iter().rposition(|m| *m).unwrap() as u16 + 1;
                prop_assert_eq!(f.rmap.unwrap().mapped, (lo, hi));
                prop_assert_eq!(f.flags.contains(FolioFlags::DEFERRED_SPLIT), left < nr);
                // The split plan covers the folio exactly, with aligned pieces
                // that agree with the per-page mapcount.
                let mut next = 0;
                for (first, o, mapped) in split_plan(f) {
                    prop_assert_eq!(first, next);
                    prop_assert_eq!(first % o.nr_pages(), 0);
                    for k in first..first + o.nr_pages() {
                        prop_assert_eq!(model[k as usize], mapped);
                    }
                    next += o.nr_pages();
                }
                prop_assert_eq!(next, nr);
            }
        }
    }
}
