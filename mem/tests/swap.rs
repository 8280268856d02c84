//! Swap with host threads as vCPUs: guest RAM larger than the budget is
//! written and read back through swap-out, swapin, the swap cache and
//! reclaim; every word must verify and the accounting must balance.

mod common;

use common::*;
use mem::{GuestAddress, PAGE_SIZE};

#[test]
fn guest_larger_than_budget_round_trips_through_swap() {
    let budget = 8 * MIB;
    let guest = 32 * MIB;
    let mm = swap_manager(budget, 2, 128 * MIB, true);
    let t = TestVm::new(&mm, "swap", guest);
    let (vm, ram, pages) = (t.id, t.ram, t.pages);
    for g in 0..3 {
        for p in 0..pages {
            // Two words per page: catches pages mixed up within a folio.
            ram.write(p * PAGE_SIZE, pattern(p, 0, g));
            ram.write(p * PAGE_SIZE + 4088, pattern(p, 511, g));
        }
        for p in 0..pages {
            assert_eq!(
                ram.read(p * PAGE_SIZE),
                pattern(p, 0, g),
                "gen {g} page {p}"
            );
            assert_eq!(
                ram.read(p * PAGE_SIZE + 4088),
                pattern(p, 511, g),
                "gen {g} page {p}"
            );
        }
    }
    let s = mm.vm_stats(vm).unwrap();
    eprintln!("{:#?}", s.swap);
    assert!(
        s.swap.swapout_pages >= pages,
        "swapped out {}",
        s.swap.swapout_pages
    );
    assert!(s.swap.swapin_file_pages > 0);
    assert!(s.resident_bytes() <= budget);
    t.destroy(&mm);
    let st = mm.stats();
    assert_eq!(st.swap_device.used_bytes, 0, "teardown frees every slot");
}

#[test]
fn vm_limits_protect_minimums_and_cap_maximums() {
    use mem::VmLimits;
    let mm = swap_manager(12 * MIB, 3, 128 * MIB, true);
    let guest = 12 * MIB;
    let mk = |name: &str, limits: VmLimits| {
        let vm = mm.create_vm(name).unwrap();
        mm.set_vm_limits(vm, limits).unwrap();
        let b = mm.backend(vm, &[(GuestAddress(0), guest)]).unwrap();
        (vm, b)
    };
    // A is protected (4 MiB minimum, high priority); C may hold 2 MiB.
    let (a, ba) = mk(
        "a",
        VmLimits {
            min_bytes: 4 * MIB,
            max_bytes: None,
            priority: 10,
        },
    );
    let (c, bc) = mk(
        "c",
        VmLimits {
            min_bytes: 0,
            max_bytes: Some(2 * MIB),
            priority: 0,
        },
    );
    let (d, bd) = mk("d", VmLimits::default());
    let rams = [Ram::of(&*ba), Ram::of(&*bc), Ram::of(&*bd)];
    let pages = guest / PAGE_SIZE;
    std::thread::scope(|s| {
        for (i, ram) in rams.iter().enumerate() {
            s.spawn(move || {
                for g in 0..2 {
                    for p in 0..pages {
                        ram.write(p * PAGE_SIZE, pattern(p, i as u64, g));
                    }
                    for p in 0..pages {
                        assert_eq!(
                            ram.read(p * PAGE_SIZE),
                            pattern(p, i as u64, g),
                            "vm {i} page {p}"
                        );
                    }
                }
            });
        }
    });
    // A keeps its minimum hot: touch its first 4 MiB, then squeeze.
    for p in 0..(4 * MIB / PAGE_SIZE) {
        assert_eq!(rams[0].read(p * PAGE_SIZE), pattern(p, 0, 1));
    }
    mm.reclaim(None, 64 * MIB).unwrap();
    let res = |vm| mm.vm_stats(vm).unwrap().resident_bytes();
    assert!(res(a) >= 4 * MIB, "A fell below its minimum: {}", res(a));
    assert!(
        res(c) <= 2 * MIB + 2 * MIB,
        "C above its maximum: {}",
        res(c)
    );
    assert_eq!(mm.vm_stats(c).unwrap().limits.max_bytes, Some(2 * MIB));
    let _ = d;
}

/// A 2 MiB folio that finds no 512 contiguous free slots, while enough
/// single slots are free, is split and swapped out page by page (order-0
/// fallback), and every page comes back intact.
#[test]
fn large_folio_without_contiguous_slots_falls_back_to_order_0() {
    // Three swap clusters for four 2 MiB folios; the guest fits the
    // budget, so only explicit reclaim swaps.
    let mm = swap_manager(16 * MIB, 2, 6 * MIB, false);
    let guest = 8 * MIB;
    let t = TestVm::new(&mm, "fallback", guest);
    let (vm, ram, pages) = (t.id, t.ram, t.pages);
    let check = |p: u64| {
        assert_eq!(ram.read(p * PAGE_SIZE), pattern(p, 0, 0), "page {p}");
        let last = ram.read(p * PAGE_SIZE + 4088);
        assert_eq!(last, pattern(p, 511, 0), "page {p}");
    };
    for p in 0..pages {
        ram.write(p * PAGE_SIZE, pattern(p, 0, 0));
        ram.write(p * PAGE_SIZE + 4088, pattern(p, 511, 0));
    }
    let s = mm.vm_stats(vm).unwrap();
    assert_eq!(s.resident_bytes_by_order[9], guest, "four PMD folios");
    // Sample all four, then evict them oldest first: three fill the three
    // clusters as order-9 runs; for the last no slot is left at all, so
    // it is not split (that would gain nothing) and stays.
    mm.reclaim(Some(vm), 8 * MIB).unwrap();
    let first = mm.vm_stats(vm).unwrap().swap;
    assert_eq!(
        (first.swapout_folios, first.swapout_fallback_order0),
        (3, 0),
        "{first:#?}"
    );
    // Single-page swapins of every third page of the first 6 MiB (far
    // enough apart that readahead does not join them) punch 512 holes
    // into the clusters: enough slots, but no 512-slot run.
    for p in (0..6 * MIB / PAGE_SIZE).step_by(3) {
        check(p);
    }
    // The handler counts a swapin after the move that wakes the reader.
    assert!(mm.wait_idle(std::time::Duration::from_secs(30)));
    let before = mm.vm_stats(vm).unwrap().swap;
    assert_eq!(
        (before.swapin_file_pages, before.swapin_file_folios),
        (512, 512),
        "{before:#?}"
    );
    // With the swap file full, no swapin keeps its slot as a clean copy.
    assert_eq!(before.clean_kept_pages, 0, "{before:#?}");
    // The last 2 MiB folio (sampled, untouched) is the victim now.
    mm.reclaim(Some(vm), 2 * MIB).unwrap();
    let after = mm.vm_stats(vm).unwrap().swap;
    assert_eq!(after.swapout_fallback_order0, 1, "{after:#?}");
    assert!(
        after.swapout_folios - before.swapout_folios >= 512,
        "its pages went out as order-0 folios: {after:#?}"
    );
    assert!(mm.stats().folios_split >= 1);
    // Everything reads back intact, through the order-0 slots too.
    for p in 0..pages {
        check(p);
    }
    t.destroy(&mm);
    assert_eq!(mm.stats().swap_device.used_bytes, 0);
}

/// A page swapped in by a read stays clean (write-protected, its slot
/// kept): reclaimed again, it goes back to that slot without a write.
/// A page written after its swapin is written out again. Both read back
/// right, and the slot accounting balances throughout.
#[test]
fn clean_pages_are_reclaimed_without_a_write() {
    let mm = swap_manager(16 * MIB, 2, 32 * MIB, false);
    let guest = 4 * MIB;
    let t = TestVm::new(&mm, "clean", guest);
    let (vm, ram, pages) = (t.id, t.ram, t.pages);
    let gen_of = |p: u64| u64::from(p % 6 == 3);
    let check = |p: u64, g: u64| {
        assert_eq!(ram.read(p * PAGE_SIZE), pattern(p, 0, g), "page {p}");
        assert_eq!(
            ram.read(p * PAGE_SIZE + 4088),
            pattern(p, 511, g),
            "page {p}"
        );
    };
    for p in 0..pages {
        ram.write(p * PAGE_SIZE, pattern(p, 0, 0));
        ram.write(p * PAGE_SIZE + 4088, pattern(p, 511, 0));
    }
    mm.reclaim(Some(vm), guest).unwrap();
    assert!(mm.wait_idle(std::time::Duration::from_secs(30)));
    assert_eq!(mm.vm_stats(vm).unwrap().resident_bytes(), 0, "all swapped");
    // Every third page (apart, so each swaps in alone) is read; every
    // other one of those is then written.
    let touched: Vec<u64> = (0..pages).step_by(3).collect();
    for &p in &touched {
        check(p, 0);
        if gen_of(p) == 1 {
            ram.write(p * PAGE_SIZE, pattern(p, 0, 1));
            ram.write(p * PAGE_SIZE + 4088, pattern(p, 511, 1));
        }
    }
    assert!(mm.wait_idle(std::time::Duration::from_secs(30)));
    mm.check_accounting().unwrap();
    let before = mm.vm_stats(vm).unwrap().swap;
    let written = touched.iter().filter(|&&p| gen_of(p) == 1).count() as u64;
    let clean = touched.len() as u64 - written;
    assert_eq!(before.clean_kept_pages, touched.len() as u64, "{before:#?}");
    assert_eq!(before.clean_dirtied_pages, written, "{before:#?}");
    // Reclaim them all again.
    mm.reclaim(Some(vm), guest).unwrap();
    assert!(mm.wait_idle(std::time::Duration::from_secs(30)));
    mm.check_accounting().unwrap();
    let after = mm.vm_stats(vm).unwrap().swap;
    assert_eq!(mm.vm_stats(vm).unwrap().resident_bytes(), 0, "all swapped");
    assert_eq!(
        after.clean_dropped_pages - before.clean_dropped_pages,
        clean,
        "the clean ones went without I/O: {after:#?}"
    );
    assert_eq!(
        after.swapout_pages - before.swapout_pages,
        written,
        "only the written ones were written: {after:#?}"
    );
    // Everything reads back, the written pages with their new contents.
    for p in 0..pages {
        check(p, if touched.contains(&p) { gen_of(p) } else { 0 });
    }
    assert!(mm.wait_idle(std::time::Duration::from_secs(30)));
    mm.check_accounting().unwrap();
}

/// Under reclaim pressure nearly every allocation is a swapin, whose read
/// overwrites its block: the pre-zeroing worker must not zero the memory
/// reclaim frees (work the swapin throws away), only keep a small reserve
/// for faults on untouched memory. Those still get served meanwhile.
#[test]
fn memory_freed_by_reclaim_is_not_zeroed_for_swapins() {
    let budget = 16 * MIB;
    let guest = 64 * MIB;
    let mm = swap_manager(budget, 2, 256 * MIB, true);
    let t = TestVm::new(&mm, "churn", guest);
    let (vm, pages) = (t.id, t.pages);
    // First touch of the whole guest: untouched memory, under pressure
    // from its second quarter on.
    t.fill(0);
    let (before, swapped_before) = (mm.stats(), mm.vm_stats(vm).unwrap().swap);
    // Read passes: every fault is a swapin.
    for _ in 0..2 {
        t.verify(0);
    }
    let (after, swapped_after) = (mm.stats(), mm.vm_stats(vm).unwrap().swap);
    let swapins = swapped_after.swapin_file_pages - swapped_before.swapin_file_pages;
    let zeroed = after.prezero_pages - before.prezero_pages;
    eprintln!("swapins {swapins}, pages pre-zeroed meanwhile {zeroed}");
    assert!(
        swapins >= pages,
        "the read passes swapped in {swapins} pages"
    );
    // Some is zeroed still: the reserve for untouched memory, refilled
    // a 2 MiB block at a time when swapins find nothing else free.
    assert!(
        zeroed * 2 < swapins,
        "{zeroed} pages pre-zeroed during {swapins} swapins"
    );
    t.destroy(&mm);
}

/// Reclaim samples only a little ahead of what it evicts: the probation
/// list, an eighth of the VM, not every folio the scan passes. Each
/// sampling unmaps a folio the guest may be using and costs it a fault, so
/// a reclaim of one page must not unmap the whole guest first.
#[test]
fn reclaim_samples_just_ahead_of_eviction() {
    let mm = swap_manager(64 * MIB, 2, 64 * MIB, false);
    let size = 32 * MIB;
    let t = TestVm::new(&mm, "ahead", size);
    let (vm, pages) = (t.id, t.pages);
    t.fill(2);
    let st = mm.vm_stats(vm).unwrap();
    assert_eq!(
        st.resident_bytes_by_order[9], size,
        "the premise: 2 MiB folios"
    );
    let folio = 2 * MIB / PAGE_SIZE;
    let mut evicted = 0;
    for (i, ask) in [PAGE_SIZE, 4 * MIB, 8 * MIB].into_iter().enumerate() {
        let freed = mm.reclaim(Some(vm), ask).unwrap();
        assert!(freed >= ask, "reclaim {i} freed {freed} of {ask}");
        evicted += freed / PAGE_SIZE;
        let st = mm.vm_stats(vm).unwrap().swap;
        assert_eq!(st.swapout_pages, evicted, "{st:#?}");
        let sampled = st.sampled_folios * folio;
        assert!(
            sampled <= evicted + pages / 8,
            "reclaim {i}: {sampled} pages sampled to evict {evicted} of {pages}"
        );
    }
    assert!(evicted < pages / 2, "the premise: most of the VM stayed");
    t.verify(2);
    t.destroy(&mm);
}

/// A VM too small to fill half a probation list is reclaimed all the same:
/// once nothing is left to sample, the folios on the list are the victims,
/// each sampled once.
#[test]
fn a_vm_smaller_than_half_a_probation_list_is_still_reclaimed() {
    let mm = swap_manager(16 * MIB, 2, 16 * MIB, false);
    let size = 64 * 1024;
    let t = TestVm::new(&mm, "tiny", size);
    let vm = t.id;
    t.fill(3);
    assert_eq!(mm.vm_stats(vm).unwrap().resident_bytes(), size);
    assert_eq!(mm.reclaim(Some(vm), size).unwrap(), size);
    let st = mm.vm_stats(vm).unwrap();
    assert_eq!(st.resident_bytes(), 0);
    assert_eq!(st.swap.sampled_folios, 1, "{:#?}", st.swap);
    t.verify(3);
    t.destroy(&mm);
}

/// A sampled-out 2 MiB folio touched at one page while reclaim runs is
/// cut into base folios and only that page goes back: the others can be
/// evicted on their own. Whole, a large folio of sparsely used pages is
/// touched somewhere at each sampling and never leaves (the zipfian
/// benchmark had three quarters of its budget stuck in such folios).
#[test]
fn a_sampled_large_folio_touched_at_one_page_is_split() {
    let mm = swap_manager(32 * MIB, 2, 64 * MIB, false);
    let t = TestVm::new(&mm, "split", 4 * MIB);
    let (vm, ram) = (t.id, t.ram);
    t.fill(1);
    let by_order = |o: usize| mm.vm_stats(vm).unwrap().resident_bytes_by_order[o];
    assert_eq!(by_order(9), 4 * MIB, "the premise: two 2 MiB folios");
    // While the VM's minimum holds all of it, reclaim only samples: the
    // older folio, which fills the probation list of so small a VM.
    let floor = |min_bytes| {
        let limits = mem::VmLimits {
            min_bytes,
            ..Default::default()
        };
        mm.set_vm_limits(vm, limits).unwrap();
    };
    floor(4 * MIB);
    assert_eq!(mm.reclaim(Some(vm), PAGE_SIZE).unwrap(), 0);
    let st = mm.vm_stats(vm).unwrap().swap;
    assert_eq!(st.sampled_folios, 1, "{st:#?}");
    assert_eq!(st.swapout_pages, 0, "{st:#?}");
    // A middle page of the first folio is touched.
    let touched = 100;
    assert_eq!(ram.read(touched * PAGE_SIZE), pattern(touched, 0, 1));
    let st = mm.vm_stats(vm).unwrap().swap;
    assert_eq!(st.sampled_splits, 1, "{st:#?}");
    assert_eq!(by_order(0), 2 * MIB, "the first folio is in base pieces");
    assert_eq!(by_order(9), 2 * MIB);
    // Reclaim now takes the untouched pieces, which are still sampled out,
    // then samples and takes the second folio, and leaves the touched page.
    floor(0);
    let freed = mm.reclaim(Some(vm), 2 * MIB).unwrap();
    assert!(freed >= 2 * MIB, "freed {freed}");
    let swapins = || mm.vm_stats(vm).unwrap().swap.swapin_file_pages;
    let before = swapins();
    assert_eq!(ram.read(touched * PAGE_SIZE), pattern(touched, 0, 1));
    assert_eq!(swapins(), before, "the touched page stayed");
    t.verify(1);
    assert!(swapins() > before, "untouched pages were evicted");
    t.destroy(&mm);
}

/// Reclaim frees a folio at a time as its writes complete; under reclaim
/// the pre-zeroing worker has nothing to do with that memory (swapins
/// overwrite it), so it must not be woken for each: every wake-up is a
/// futex call and a context switch, and in the host-thread benchmark they
/// were most of the process's futex calls. Two threads read random pages
/// of a guest four times the budget, checking every one.
#[test]
fn reclaim_does_not_wake_the_worker_for_each_folio_it_frees() {
    let budget = 16 * MIB;
    let guest = 64 * MIB;
    let mm = swap_manager(budget, 2, 256 * MIB, true);
    let t = TestVm::new(&mm, "random", guest);
    let (vm, ram, pages) = (t.id, t.ram, t.pages);
    t.fill(0);
    let (before, swapped_before) = (mm.stats(), mm.vm_stats(vm).unwrap().swap);
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let ram = &ram;
            s.spawn(move || {
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ t);
                for _ in 0..pages {
                    let p = rng.below(pages);
                    assert_eq!(ram.read(p * PAGE_SIZE), pattern(p, 0, 0), "page {p}");
                }
            });
        }
    });
    let (after, swapped_after) = (mm.stats(), mm.vm_stats(vm).unwrap().swap);
    let swapins = swapped_after.swapin_file_pages - swapped_before.swapin_file_pages;
    let kicks = after.worker_kicks - before.worker_kicks;
    eprintln!("swapins {swapins}, worker woken {kicks} times");
    assert!(swapins >= pages / 2, "only {swapins} swapins");
    // Woken here for each folio freed, it was woken 4.3-4.4k times in 26k
    // swapins (a wake-up already pending is not sent again); now 2.
    assert!(
        kicks * 32 < swapins,
        "the worker was woken {kicks} times during {swapins} swapins"
    );
    t.destroy(&mm);
}

/// A 4 MiB VM whose pages (`pattern(p, 0, g)` at each page's start) are
/// all swapped out.
fn swapped_out_4m(
    name: &str,
    g: u64,
) -> (
    std::sync::Arc<mem::MemoryManager>,
    mem::VmId,
    std::sync::Arc<mem::FolioBackend>,
    Ram,
    u64,
) {
    let mm = swap_manager(16 * MIB, 2, 64 * MIB, false);
    let vm = mm.create_vm(name).unwrap();
    let b = mm.backend(vm, &[(GuestAddress(0), 4 * MIB)]).unwrap();
    let ram = Ram::of(&*b);
    let pages = 4 * MIB / PAGE_SIZE;
    for p in 0..pages {
        ram.write(p * PAGE_SIZE, pattern(p, 0, g));
    }
    while mm.vm_stats(vm).unwrap().resident_bytes() > 0 {
        assert!(
            mm.reclaim(Some(vm), 4 * MIB).unwrap() > 0,
            "reclaim stalled"
        );
    }
    (mm, vm, b, ram, pages)
}

/// A discard of swapped-out pages drops their slots but returns no memory:
/// it says so (`resident_pages`, what the balloon reports as returned),
/// apart from the pages it dropped (`discarded_pages`).
#[test]
fn a_discard_counts_the_memory_it_returned_apart_from_the_entries_it_dropped() {
    let (mm, vm, b, ram, pages) = swapped_out_4m("discard-swapped", 1);
    // Two pages back in memory, the rest in swap.
    assert_eq!(ram.read(0), pattern(0, 0, 1));
    assert_eq!(ram.read(PAGE_SIZE), pattern(1, 0, 1));
    let resident = mm.vm_stats(vm).unwrap().resident_bytes() / PAGE_SIZE;
    assert!(resident >= 2, "{resident}");
    let out = mm.discard(vm, GuestAddress(0), 4 * MIB).unwrap();
    assert_eq!(out.discarded_pages, pages);
    assert_eq!(out.resident_pages, resident);
    assert_eq!(mm.vm_stats(vm).unwrap().resident_bytes(), 0);
    assert_eq!(ram.read(0), 0);
    drop(b);
    mm.destroy_vm(vm).unwrap();
    settle_and_check(&mm);
}

/// Pages swapped in by reads stay clean, each holding its slot; when they
/// are discarded their slots are free at once, not only at the next
/// swap-out (the file looked fuller than it was meanwhile).
#[test]
fn slots_of_discarded_clean_pages_are_free_at_once() {
    let (mm, vm, b, ram, pages) = swapped_out_4m("clean-discard", 2);
    for p in 0..pages {
        assert_eq!(ram.read(p * PAGE_SIZE), pattern(p, 0, 2));
    }
    let kept = mm.vm_stats(vm).unwrap().swap.clean_kept_pages;
    assert!(kept > 0, "reads keep pages clean");
    assert!(mm.stats().swap_device.used_bytes > 0);
    mm.discard(vm, GuestAddress(0), 4 * MIB).unwrap();
    assert_eq!(mm.stats().swap_device.used_bytes, 0, "{kept} clean pages");
    drop(b);
    mm.destroy_vm(vm).unwrap();
    settle_and_check(&mm);
}
