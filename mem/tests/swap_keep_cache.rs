//! A folio kept in the swap cache after its write (`FaultPoint::SwapKeepCache`:
//! unmapped, unlocked, only the cache's reference) must not outlive the
//! entries that name its slots: when a discard or the VM's teardown drops
//! the last of them, the folio leaves the cache and its pool range and
//! slots are freed, as `free_swap_and_cache()` does in Linux.

mod common;

use common::*;
use mem::{FaultPoint, InjectPlan, PAGE_SIZE};

const TABLE: u64 = 512 * PAGE_SIZE;

fn keep_next(mm: &mem::MemoryManager, count: u32) {
    mm.inject_faults(vec![InjectPlan {
        point: FaultPoint::SwapKeepCache,
        skip: 0,
        count,
    }]);
}

/// A VM of one table, every page written, all of it swapped out with the
/// writes of the first `kept` folios kept in the swap cache.
fn swapped_with_kept(kept: u32) -> (std::sync::Arc<mem::MemoryManager>, TestVm) {
    let mm = swap_manager(16 * MIB, 2, 64 * MIB, false);
    let t = TestVm::new(&mm, "keep", TABLE);
    // Small folios: one page in four, the rest discarded.
    for p in 0..t.pages {
        t.ram.write(p * PAGE_SIZE, pattern(p, 0, 1));
    }
    for p in (0..t.pages).filter(|p| p % 4 != 0) {
        mm.discard(t.id, t.ram.gpa(p * PAGE_SIZE), PAGE_SIZE)
            .unwrap();
    }
    settle_and_check(&mm);
    keep_next(&mm, kept);
    while mm.vm_stats(t.id).unwrap().resident_bytes() > 0 {
        assert!(mm.reclaim(Some(t.id), TABLE).unwrap() > 0 || kept > 0);
    }
    mm.inject_faults(vec![]);
    assert!(mm.wait_idle(std::time::Duration::from_secs(30)));
    assert_eq!(mm.stats().swap_device.cache_pages, kept as u64);
    (mm, t)
}

/// Tear `t` down, then check the swap file and cache are empty and the
/// whole `budget` free.
fn destroy_leaving_nothing(mm: &mem::MemoryManager, t: TestVm, budget: u64) {
    settle_and_check(mm);
    t.destroy(mm);
    let s = mm.stats();
    assert_eq!(
        (s.swap_device.used_bytes, s.swap_device.cache_pages),
        (0, 0)
    );
    assert_eq!(s.free_bytes, budget);
}

#[test]
fn a_discard_of_a_kept_folios_page_frees_it() {
    let (mm, t) = swapped_with_kept(3);
    mm.discard(t.id, t.ram.gpa(0), TABLE).unwrap();
    let s = mm.stats();
    assert_eq!(
        s.swap_device.cache_pages, 0,
        "the kept folios left the cache"
    );
    assert_eq!(s.swap_device.used_bytes, 0, "and their slots are free");
    settle_and_check(&mm);
    assert_eq!(mm.stats().free_bytes, 16 * MIB, "and their pool ranges");
    t.destroy(&mm);
}

#[test]
fn the_teardown_of_a_vm_with_kept_folios_frees_them() {
    let (mm, t) = swapped_with_kept(3);
    t.destroy(&mm);
    let s = mm.stats();
    assert_eq!(s.swap_device.cache_pages, 0);
    assert_eq!(s.swap_device.used_bytes, 0);
    assert_eq!(s.free_bytes, 16 * MIB);
}

#[test]
fn a_kept_folio_still_maps_back_on_a_fault() {
    let (mm, t) = swapped_with_kept(3);
    for p in 0..t.pages {
        let want = if p % 4 == 0 { pattern(p, 0, 1) } else { 0 };
        assert_eq!(t.ram.read(p * PAGE_SIZE), want, "page {p}");
    }
    assert_eq!(mm.stats().swap.swapin_cache_folios, 3);
    settle_and_check(&mm);
    t.destroy(&mm);
}

#[test]
fn reclaim_frees_kept_folios_and_their_pages_read_back_from_the_file() {
    let (mm, t) = swapped_with_kept(3);
    let before = mm.stats();
    assert_eq!(before.free_bytes + 3 * PAGE_SIZE, 16 * MIB);
    // Nothing is resident: only the kept folios can give memory back.
    assert_eq!(mm.reclaim(None, MIB).unwrap(), 3 * PAGE_SIZE);
    let s = mm.stats();
    assert_eq!(
        s.swap_device.cache_pages, 0,
        "the kept folios left the cache"
    );
    assert_eq!(s.swap.cache_dropped_pages, 3);
    assert_eq!(
        s.swap_device.used_bytes, before.swap_device.used_bytes,
        "their slots hold their data, named by the entries"
    );
    settle_and_check(&mm);
    assert_eq!(mm.stats().free_bytes, 16 * MIB, "and their pool ranges");
    for p in 0..t.pages {
        let want = if p % 4 == 0 { pattern(p, 0, 1) } else { 0 };
        assert_eq!(t.ram.read(p * PAGE_SIZE), want, "page {p}");
    }
    let s = mm.stats();
    assert_eq!(s.swap.swapin_cache_folios, 0, "read from the file");
    assert_eq!(s.swap.read_errors, 0);
    t.destroy(&mm);
}

/// Many threads at once: vCPUs read, check and write their word of pages in
/// a wandering window (a pin caller does the same for one more word, through
/// `pin`), while a reclaimer swaps out, a keeper keeps a few of the writes
/// in the swap cache at a time, a discarder drops chunks of the window and
/// a compactor migrates the kept folios. Every word read is the last one
/// written (zero after a discard); at the end the swap map, the swap cache
/// and the allocator balance, with the VM alive and after its teardown.
#[test]
fn kept_folios_racing_faults_pins_discards_and_compaction_balance() {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
    use std::sync::{Arc, RwLock};
    const VCPUS: u64 = 4;
    const WORDS: u64 = VCPUS + 1; // the last one is the pin caller's
    const PAGES: u64 = 2048; // 8 MiB
    const CHUNK: u64 = 16;
    const OPS: u64 = 30_000;
    let mm = swap_manager(3 * MIB, 3, 64 * MIB, false);
    let t = TestVm::new(&mm, "keep-race", PAGES * PAGE_SIZE);
    let (vm, ram) = (t.id, t.ram);
    let expected: Arc<Vec<AtomicU64>> =
        Arc::new((0..PAGES * WORDS).map(|_| AtomicU64::new(0)).collect());
    let chunks: Arc<Vec<RwLock<()>>> =
        Arc::new((0..PAGES / CHUNK).map(|_| RwLock::new(())).collect());
    let window = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    {
        // Kept folios nobody frees fill the budget and the accessors wait
        // for memory for ever: fail then, instead of hanging the run.
        let (mm, stop, done) = (mm.clone(), stop.clone(), done.clone());
        std::thread::spawn(move || {
            let mut last = u64::MAX;
            while !stop.load(SeqCst) {
                std::thread::sleep(std::time::Duration::from_secs(30));
                let now = done.load(SeqCst);
                if now == last && !stop.load(SeqCst) {
                    let s = mm.stats();
                    // Not `eprintln!`, which the harness captures and
                    // the abort would lose.
                    let _ = writeln!(
                        std::io::stderr(),
                        "STALL after {now} accesses: swap cache {} pages, free {} bytes: {s:#?}",
                        s.swap_device.cache_pages,
                        s.free_bytes
                    );
                    std::process::abort();
                }
                last = now;
            }
        });
    }
    let accessor = |w: u64, pinned: bool| {
        let (mm, expected, chunks, window, done) = (
            mm.clone(),
            expected.clone(),
            chunks.clone(),
            window.clone(),
            done.clone(),
        );
        std::thread::spawn(move || {
            let mut rng = Rng(0x5eed_0000 + w * 7919);
            let ops = if pinned { OPS / 4 } else { OPS };
            for i in 1..=ops {
                let win = (i * if pinned { 4 } else { 1 } / 300 * 211) % (PAGES - 256);
                if w == 0 {
                    window.store(win, SeqCst);
                }
                let page = win + rng.below(256);
                let off = page * PAGE_SIZE + w * 8;
                let slot = &expected[(page * WORDS + w) as usize];
                let _g = chunks[(page / CHUNK) as usize].read().unwrap();
                done.fetch_add(1, SeqCst);
                let write = rng.below(2) == 0;
                let v = (i << 8) | (w + 1);
                if pinned {
                    // `NoMemory` is transient (no memory within 50 ms): a
                    // device puts its request back and tries again.
                    let pin = loop {
                        match mm.pin(vm, ram.gpa(page * PAGE_SIZE), PAGE_SIZE) {
                            Err(mem::PinError::NoMemory) => std::thread::yield_now(),
                            r => break r.unwrap(),
                        }
                    };
                    let mut b = [0u8; 8];
                    pin.read_at(w * 8, &mut b);
                    assert_eq!(
                        u64::from_le_bytes(b),
                        slot.load(SeqCst),
                        "pin page {page} op {i}"
                    );
                    if write {
                        pin.write_at(w * 8, &v.to_le_bytes());
                        slot.store(v, SeqCst);
                    }
                } else {
                    assert_eq!(
                        ram.read(off),
                        slot.load(SeqCst),
                        "vcpu {w} page {page} op {i}"
                    );
                    if write {
                        ram.write(off, v);
                        slot.store(v, SeqCst);
                    }
                }
            }
        })
    };
    let accessors: Vec<_> = (0..WORDS).map(|w| accessor(w, w == VCPUS)).collect();
    let spawn = |f: Box<dyn Fn(u64) + Send>| spawn_until(&stop, f);
    let reclaimer = {
        let mm = mm.clone();
        spawn(Box::new(move |_| {
            mm.reclaim(Some(vm), 256 * 1024).unwrap();
        }))
    };
    let keeper = {
        let mm = mm.clone();
        spawn(Box::new(move |_| {
            keep_next(&mm, 4);
            std::thread::sleep(std::time::Duration::from_millis(2));
        }))
    };
    let skipped = Arc::new(AtomicU64::new(0));
    let discarder = {
        let (mm, expected, chunks, window, skipped) = (
            mm.clone(),
            expected.clone(),
            chunks.clone(),
            window.clone(),
            skipped.clone(),
        );
        spawn(Box::new(move |n| {
            let c = (window.load(SeqCst) / CHUNK + n * 7 % 16).min(PAGES / CHUNK - 1);
            let _g = chunks[c as usize].write().unwrap();
            // A discard leaves the pages of a pinned folio in place, and
            // the pin caller may hold a pin on a large folio that reaches
            // into this chunk from its own: discard again until nothing is
            // skipped (it drops its pin without taking this chunk's lock).
            while mm
                .discard(vm, ram.gpa(c * CHUNK * PAGE_SIZE), CHUNK * PAGE_SIZE)
                .unwrap()
                .skipped_pinned_pages
                > 0
            {
                skipped.fetch_add(1, SeqCst);
                std::thread::yield_now();
            }
            for p in c * CHUNK..(c + 1) * CHUNK {
                for w in 0..WORDS {
                    expected[(p * WORDS + w) as usize].store(0, SeqCst);
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }))
    };
    let compactor = {
        let mm = mm.clone();
        spawn(Box::new(move |_| {
            mm.compact(Some(vm), &|_, _| {}).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }))
    };
    for a in accessors {
        a.join().unwrap();
    }
    stop.store(true, SeqCst);
    let n: Vec<u64> = [reclaimer, keeper, discarder, compactor]
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    mm.inject_faults(vec![]);
    let s = mm.stats();
    eprintln!(
        "reclaims, keeps, discards, compactions: {n:?}; discards that skipped pinned \
         pages {}; swap-cache refaults {}, swap-cache migrations {}, cached pages freed \
         by reclaim {}, cached now {} pages",
        skipped.load(SeqCst),
        s.swap.swapin_cache_folios,
        s.migration.migrated_swapcache,
        s.swap.cache_dropped_pages,
        s.swap_device.cache_pages
    );
    assert!(
        s.swap.swapin_cache_folios > 0,
        "no kept folio was refaulted"
    );
    for p in 0..PAGES {
        for w in 0..WORDS {
            let want = expected[(p * WORDS + w) as usize].load(SeqCst);
            assert_eq!(ram.read(p * PAGE_SIZE + w * 8), want, "page {p} word {w}");
        }
    }
    let s = mm.stats();
    assert_eq!(
        s.swap.read_errors + s.swap.write_errors + s.swap.poisoned_pages,
        0
    );
    assert_no_unbacked(&s);
    destroy_leaving_nothing(&mm, t, 3 * MIB);
}

/// A discard that drops the last entries of folios whose swap write is in
/// flight leaves them to their writeback (it does not wait for the write);
/// a folio the write then keeps in the swap cache (`SwapKeepCache`: as if a
/// refault waited for it) must still leave the cache, since no entry names
/// its slots any more and no fault will ever map it back. Here the first
/// write of a reclaim batch fails slowly (`SlowEio`), so the batch's later
/// folios wait, locked and in the swap cache, while the discard runs; the
/// first of them whose write succeeds is kept.
#[test]
fn a_folio_kept_after_a_discard_during_its_write_leaves_the_cache() {
    use mem::{FaultPlan, InjectedFault, IoOp};
    const GUEST: u64 = 64 * MIB;
    let mm = swap_manager(96 * MIB, 2, 256 * MIB, false);
    let t = TestVm::new(&mm, "kept-discard", GUEST);
    // 2 MiB folios, so that a reclaim batch holds several runs of writes.
    let ready = || mm.stats().ready_bytes_by_order[9] >= GUEST;
    assert!(wait_until(std::time::Duration::from_secs(30), ready));
    t.fill(1);
    mm.inject_swap_faults(vec![FaultPlan {
        op: IoOp::Write,
        fault: InjectedFault::SlowEio,
        skip: 0,
        count: 1,
    }])
    .unwrap();
    keep_next(&mm, 1);
    let reclaim = {
        let (mm, vm) = (mm.clone(), t.id);
        std::thread::spawn(move || mm.reclaim(Some(vm), GUEST).unwrap())
    };
    let swapped = || mm.vm_stats(t.id).unwrap().swap.swapped_pages > 0;
    assert!(wait_until(std::time::Duration::from_secs(10), swapped));
    // The batch is prepared (every victim unmapped, in the swap cache and
    // locked) long before the slow write fails.
    std::thread::sleep(mem::SLOW_EIO_DELAY / 6);
    let cached = mm.stats().swap_device.cache_pages;
    mm.discard(t.id, t.ram.gpa(0), GUEST).unwrap();
    assert!(!reclaim.is_finished(), "the write ended first: no test");
    reclaim.join().unwrap();
    mm.inject_swap_faults(Vec::new()).unwrap();
    mm.inject_faults(vec![]);
    let s = mm.stats();
    eprintln!(
        "cached during the discard: {cached} pages; folios whose write failed {}, \
         swapped out {}, kept {} pages",
        s.swap.write_errors, s.swap.swapout_folios, s.swap_device.cache_pages
    );
    assert!(s.swap.write_errors > 0, "the slow write failed");
    assert!(
        cached > 2 * 512,
        "the batch held more than the failing run: {cached} pages"
    );
    assert_eq!(
        (s.swap_device.cache_pages, s.swap_device.used_bytes),
        (0, 0),
        "a folio no entry names stayed in the swap cache with its slots"
    );
    for p in 0..t.pages {
        assert_eq!(t.ram.read(p * PAGE_SIZE), 0, "page {p}");
    }
    destroy_leaving_nothing(&mm, t, 96 * MIB);
}
