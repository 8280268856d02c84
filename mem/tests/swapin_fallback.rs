//! A large swapin whose slot range holds a neighbour's folio in the swap
//! cache reads the faulting page alone, as `non_swapcache_batch()` makes
//! Linux's `do_swap_page()` do, and the neighbour maps back from the cache.

mod common;

use common::*;
use mem::{FaultPoint, InjectPlan, PAGE_SIZE};

#[test]
fn a_large_swapin_meeting_a_cached_neighbour_reads_its_page_alone() {
    let mm = swap_manager(16 * MIB, 2, 64 * MIB, false);
    let t = TestVm::new(&mm, "ra", 2 * MIB);
    for p in 0..t.pages {
        t.ram.write(p * PAGE_SIZE, pattern(p, 0, 1));
    }
    while mm.vm_stats(t.id).unwrap().resident_bytes() > 0 {
        assert!(mm.reclaim(Some(t.id), 2 * MIB).unwrap() > 0);
    }
    // Pages 0-7 written back one at a time, so each is an order-0 folio:
    // four reads far apart after each push its readahead stream out.
    for p in 0..8 {
        t.ram.write(p * PAGE_SIZE, pattern(p, 0, 2));
        for f in 0..4 {
            let q = 256 + 32 * p + 8 * f;
            assert_eq!(t.ram.read(q * PAGE_SIZE), pattern(q, 0, 1));
        }
    }
    let s = mm.vm_stats(t.id).unwrap();
    assert_eq!(s.resident_bytes_by_order[0], 40 * PAGE_SIZE, "{s:#?}");
    // Evicted oldest first, pages 0-7 take slots 0-7 of a fresh cluster;
    // the sixth write's folio (page 5) stays in the swap cache.
    mm.inject_faults(vec![InjectPlan {
        point: FaultPoint::SwapKeepCache,
        skip: 5,
        count: 1,
    }]);
    while mm.vm_stats(t.id).unwrap().resident_bytes() > 0 {
        assert!(mm.reclaim(Some(t.id), 2 * MIB).unwrap() > 0);
    }
    mm.inject_faults(vec![]);
    assert!(mm.wait_idle(std::time::Duration::from_secs(30)));
    let before = mm.vm_stats(t.id).unwrap().swap;
    // A sequential read: page 0 alone, 1 alone (0 is mapped), 2-3 as an
    // order-1 folio, then the stream asks for 4-7 at order 2, whose slots
    // include page 5's cached folio: page 4 is read alone, page 5 maps
    // back from the cache, 6-7 come as an order-1 folio.
    for p in 0..16 {
        let g = if p < 8 { 2 } else { 1 };
        assert_eq!(t.ram.read(p * PAGE_SIZE), pattern(p, 0, g), "page {p}");
    }
    assert!(mm.wait_idle(std::time::Duration::from_secs(30)));
    let after = mm.vm_stats(t.id).unwrap().swap;
    assert_eq!(
        after.swapin_fallback_order0 - before.swapin_fallback_order0,
        1,
        "{after:#?}"
    );
    assert_eq!(
        after.swapin_cache_folios - before.swapin_cache_folios,
        1,
        "{after:#?}"
    );
    assert_eq!(
        mm.stats().swap_device.cache_pages,
        0,
        "page 5 left the cache"
    );
    settle_and_check(&mm);
    t.destroy(&mm);
    let s = mm.stats();
    assert_eq!(
        (s.swap_device.used_bytes, s.swap_device.cache_pages),
        (0, 0)
    );
    assert_eq!(s.free_bytes, 16 * MIB);
}
