//! Deferred split of partially mapped large folios, off the fault path.
//!
//! Analogue of `deferred_split_scan()` with the non-uniform `folio_split()`:
//! a folio that lost part of its mappings (a discard of part of it) is cut
//! into maximal aligned pieces that are wholly mapped or wholly unmapped.
//! Mapped pieces become folios of their own (the first one keeps the id),
//! their entries are rewritten, and unmapped pieces go back to the
//! allocator, so a partial discard really returns memory.

use crate::buddy::BlockState;
use crate::folio::{Folio, FolioFlags, FolioSlab, FreedRange};
use crate::inject::FaultPoint;
use crate::lru::PROBATION;
use crate::manager::Inner;
use crate::pte::{Pte, PteState};
use crate::rmap::{split_plan, Rmap};
use crate::types::FolioId;
use std::sync::atomic::Ordering::Relaxed;

/// Split every folio on the deferred-split queue.
///
/// # Context
/// Pre-zeroing worker; no locks held.
pub(crate) fn deferred_split_scan(inner: &Inner) {
    if inner.inject.hit(FaultPoint::SplitDefer) {
        return;
    }
    loop {
        // Counted busy before the queue is popped, so that `wait_idle`
        // never sees an empty queue and no split in flight while a split
        // still holds the ranges it frees.
        inner.reclaimers.fetch_add(1, Relaxed);
        let next = next_queued(inner);
        if let Some((id, rmap)) = next {
            split_one(inner, id, rmap);
        }
        inner.reclaimers.fetch_sub(1, Relaxed);
        if next.is_none() {
            return;
        }
    }
}

/// Pop the next folio worth splitting and take a reference on it. Its
/// `DEFERRED_SPLIT` flag stays set until [`split_one`] holds its
/// page-table lock, so a discard meanwhile does not queue it again
/// (`deferred_split_scan()` keeps a folio on its local list likewise): the
/// one split sees that discard's holes too.
fn next_queued(inner: &Inner) -> Option<(FolioId, Rmap)> {
    let mut slab = inner.folios.slab();
    loop {
        let id = slab.deferred_split.pop_front()?;
        // The id may be stale: freed (and maybe reused) since it was queued.
        let Some(f) = slab.get_mut(id) else { continue };
        if !f.flags.contains(FolioFlags::DEFERRED_SPLIT) {
            continue;
        }
        let (Some(rmap), false) = (f.rmap, f.pincount > 0) else {
            f.flags.remove(FolioFlags::DEFERRED_SPLIT);
            continue;
        };
        slab.get_ref(id);
        return Some((id, rmap));
    }
}

fn split_one(inner: &Inner, id: FolioId, queued: Rmap) {
    let mut freed: Vec<FreedRange> = Vec::new();
    let lock = inner.folios.lock(id);
    // Read the rmap again under the folio lock, which holds it still: a
    // relocation pull (it needs the lock) may have moved the folio since
    // it was queued, and the old table, gone, would skip the split.
    let rmap = inner
        .folios
        .slab()
        .get(id)
        .and_then(|f| f.rmap)
        .unwrap_or(queued);
    if let Some(region) = inner.find_region(rmap.vm, rmap.region) {
        let mut ptl = region.pt.lock(rmap.index);
        let mut slab = inner.folios.slab();
        // From here on a discard that leaves it partial queues it again.
        let f = slab.get_mut(id).expect("we hold a reference");
        f.flags.remove(FolioFlags::DEFERRED_SPLIT);
        let f = slab.get(id).expect("we hold a reference");
        let partial = f.mapcount > 0
            && (f.mapcount as u64) < f.nr_pages()
            && f.pincount == 0
            && !f.flags.contains(FolioFlags::SWAPCACHE);
        let sampled = f.flags.contains(FolioFlags::SAMPLED);
        // Pieces go to the youngest generation, or, sampled out, to the
        // probation list where sampled folios wait for eviction.
        let lru_add = |slab: &mut FolioSlab, id| match sampled {
            true => slab.lru_add_seq(id, PROBATION),
            false => slab.lru_add(id),
        };
        if partial && !ptl.is_dead() {
            let (pool, old_order, pool_state) = (f.pool, f.order, f.pool_state);
            let mut kept_id = false;
            for (sub, order, mapped) in split_plan(f) {
                let nr = order.nr_pages();
                if !mapped {
                    freed.push(FreedRange {
                        pool: pool.subpage(sub),
                        order,
                        state: pool_state,
                        clean_slot: None,
                    });
                    continue;
                }
                let piece = Rmap {
                    index: rmap.index.forward(sub),
                    mapped: (0, nr as u16),
                    ..rmap
                };
                let pid = if kept_id {
                    let mut nf = new_piece(pool.subpage(sub), order, piece);
                    // A sampled-out folio's pieces stay sampled out.
                    if sampled {
                        nf.flags.insert(FolioFlags::SAMPLED);
                    }
                    let nid = slab.insert(nf);
                    lru_add(&mut slab, nid);
                    nid
                } else {
                    // The first mapped piece keeps the id (and our reference).
                    kept_id = true;
                    // The LRU counts pages by order: re-add after resizing.
                    let on_lru = slab
                        .get(id)
                        .is_some_and(|f| f.flags.contains(FolioFlags::LRU));
                    slab.lru_del(id);
                    let f = slab.get_mut(id).expect("we hold a reference");
                    // References beyond the mappings (ours, and a
                    // reclaimer's isolation reference) stay with the id.
                    let extra = f.refcount - f.mapcount;
                    f.pool = pool.subpage(sub);
                    f.order = order;
                    f.refcount = nr as u32 + extra;
                    f.mapcount = nr as u32;
                    f.page_mapped = None;
                    f.rmap = Some(piece);
                    f.pool_state = BlockState::NeedsPopulate;
                    if on_lru {
                        lru_add(&mut slab, id);
                    }
                    id
                };
                for k in 0..nr {
                    let idx = piece.index.forward(k);
                    // The piece's pages are mapped (`split_plan`), so their
                    // entries name this folio.
                    debug_assert_eq!(ptl.pte(idx).mapped_folio().map(|m| m.0), Some(id));
                    let pte = match ptl.pte(idx).state() {
                        PteState::ProtNone { .. } => Pte::prot_none(pid, k),
                        _ => Pte::present(pid, k),
                    };
                    ptl.set_pte(idx, pte);
                }
                region.counters.resident(old_order, -(nr as i64));
                region.counters.resident(order, nr as i64);
            }
            inner.workers.folios_split.fetch_add(1, Relaxed);
            let pages: u64 = freed.iter().map(|f| f.order.nr_pages()).sum();
            inner.workers.split_freed_pages.fetch_add(pages, Relaxed);
        }
        drop(slab);
        drop(ptl);
    } else if let Some(f) = inner.folios.slab().get_mut(id) {
        f.flags.remove(FolioFlags::DEFERRED_SPLIT);
    }
    drop(lock);
    // Drop our reference: this frees the folio if it was unmapped meanwhile.
    freed.extend(inner.folios.slab().put_refs(id, 1));
    for f in freed {
        inner.free_range(f);
    }
}

fn new_piece(pool: crate::types::PoolOffset, order: crate::types::Order, rmap: Rmap) -> Folio {
    let nr = order.nr_pages() as u32;
    let mut flags = FolioFlags::default();
    flags.insert(FolioFlags::EXCLUSIVE);
    Folio {
        flags,
        refcount: nr,
        mapcount: nr,
        rmap: Some(rmap),
        ..Folio::new(pool, order)
    }
}
