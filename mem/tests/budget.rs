//! The host budget at run time: lowering it takes memory offline (after
//! reclaim when needed), raising it gives it back, and refused changes
//! change nothing.

mod common;

use common::*;
use mem::{BudgetError, GuestAddress, VmLimits, PAGE_SIZE};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

fn fill(ram: Ram, bytes: u64, g: u64) {
    for p in 0..bytes / PAGE_SIZE {
        ram.write(p * PAGE_SIZE, pattern(p, 0, g));
    }
}

fn verify(ram: Ram, bytes: u64, g: u64) {
    for p in 0..bytes / PAGE_SIZE {
        assert_eq!(ram.read(p * PAGE_SIZE), pattern(p, 0, g), "page {p}");
    }
}

#[test]
fn budget_without_swap_offlines_only_free_memory() {
    let mm = manager(32 * MIB, 2);
    let vm = mm.create_vm("a").unwrap();
    let b = mm.backend(vm, &[(GuestAddress(0), 32 * MIB)]).unwrap();
    let ram = Ram::of(&*b);
    fill(ram, 8 * MIB, 1);
    assert_eq!(mm.budget_bytes(), 32 * MIB);

    let c = mm.set_budget(16 * MIB).unwrap();
    assert_eq!(
        (c.old_bytes, c.new_bytes, c.reclaimed_bytes),
        (32 * MIB, 16 * MIB, 0)
    );
    settle_and_check(&mm);
    let s = mm.stats();
    assert_eq!((s.budget_bytes, s.pool_bytes), (16 * MIB, 32 * MIB));
    assert_eq!(s.free_bytes, 8 * MIB, "16 MiB budget less 8 MiB in use");

    // Refused changes leave the budget alone.
    assert_eq!(
        mm.set_budget(4 * MIB),
        Err(BudgetError::CannotFree {
            requested: 4 * MIB,
            short: 4 * MIB,
            swap: false
        })
    );
    assert!(matches!(
        mm.set_budget(64 * MIB),
        Err(BudgetError::AboveMax { max, .. }) if max == 32 * MIB
    ));
    assert_eq!(mm.set_budget(4097), Err(BudgetError::Unaligned(4097)));
    assert_eq!(mm.set_budget(0), Err(BudgetError::Unaligned(0)));
    settle_and_check(&mm);
    assert_eq!(mm.stats().free_bytes, 8 * MIB);
    assert_eq!(mm.budget_bytes(), 16 * MIB);

    // The guest still gets the rest of the lowered budget...
    fill(ram, 16 * MIB, 2);
    verify(ram, 16 * MIB, 2);
    assert_eq!(mm.stats().free_bytes, 0);
    // ...and, raised again, all of the pool.
    mm.set_budget(32 * MIB).unwrap();
    fill(ram, 32 * MIB, 3);
    verify(ram, 32 * MIB, 3);
    drop(b);
    mm.destroy_vm(vm).unwrap();
    settle_and_check(&mm);
    assert_eq!(mm.stats().free_bytes, 32 * MIB);
}

#[test]
fn lowering_the_budget_reclaims_above_minimums() {
    let mm = swap_manager(16 * MIB, 2, 128 * MIB, false);
    let limits = VmLimits {
        min_bytes: 4 * MIB,
        max_bytes: None,
        priority: 0,
    };
    let t = TestVm::with_limits(&mm, "a", 16 * MIB, limits);
    let (vm, ram) = (t.id, t.ram);
    fill(ram, 16 * MIB, 1);

    assert_eq!(
        mm.set_budget(2 * MIB),
        Err(BudgetError::BelowMinimums {
            requested: 2 * MIB,
            needed: 4 * MIB
        })
    );
    assert_eq!(mm.budget_bytes(), 16 * MIB);
    // Checked alone, as the API does before it starts a lowering: the
    // same refusal, and nothing changes.
    assert_eq!(
        mm.check_budget(2 * MIB),
        Err(BudgetError::BelowMinimums {
            requested: 2 * MIB,
            needed: 4 * MIB
        })
    );
    assert_eq!(mm.check_budget(8 * MIB), Ok(()));
    assert_eq!(mm.budget_bytes(), 16 * MIB);
    assert!(mm.wait_idle(std::time::Duration::from_secs(30)));
    let free_before = mm.stats().free_bytes;
    // Progress: bytes offline out of the 8 MiB to take, after each round,
    // never going back, and all of it at the end.
    let seen = std::sync::Mutex::new(Vec::new());
    let c = mm
        .set_budget_with_progress(8 * MIB, &|done, total| {
            seen.lock().unwrap().push((done, total))
        })
        .unwrap();
    let seen = seen.into_inner().unwrap();
    assert!(seen.iter().all(|&(_, t)| t == 8 * MIB), "{seen:?}");
    assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0), "{seen:?}");
    assert_eq!(seen.last(), Some(&(8 * MIB, 8 * MIB)), "{seen:?}");
    // What was not free had to be reclaimed first.
    assert!(
        c.reclaimed_bytes + free_before >= 8 * MIB,
        "{c:?}, {free_before} free"
    );
    assert_eq!(mm.stats().budget_bytes, 8 * MIB);
    let s = mm.vm_stats(vm).unwrap();
    assert!(s.resident_bytes() <= 8 * MIB, "{}", s.resident_bytes());
    assert!(s.resident_bytes() >= 4 * MIB, "below the minimum");
    // Every page reads back within the lower budget (through swap).
    verify(ram, 16 * MIB, 1);
    assert!(mm.vm_stats(vm).unwrap().resident_bytes() <= 8 * MIB);
    mm.set_budget(16 * MIB).unwrap();
    fill(ram, 16 * MIB, 2);
    verify(ram, 16 * MIB, 2);
    t.destroy(&mm);
}

/// Lowering the budget while a guest thrashes just above its minimum on a
/// loaded host succeeds every time, and no word is lost. Much of what can
/// be reclaimed is then isolated by other reclaimers (kswapd, and faults
/// reclaiming for themselves) at any moment; a lowering that gave up when
/// its own reclaim found nothing failed with `CannotFree` in 1 run of this
/// test in 20 (in 4 of 26 with the minimum at 22 MiB, where the new code
/// failed 1 run in about 90; see `hotplug::lower`). One more such holder:
/// a pageblock compaction has isolated parks its free pages until it is
/// released. Lowering counted them neither as free nor as in flight, and
/// failed short by exactly those pages (508 of 512) in 1 of 5 runs of a
/// soak while this test's CPU burners ran.
#[test]
fn lowering_the_budget_holds_against_a_guest_thrashing_near_its_minimum() {
    const GUEST: u64 = 64 * MIB;
    const THREADS: u64 = 4;
    let mm = swap_manager(32 * MIB, 2, 256 * MIB, true);
    let limits = VmLimits {
        min_bytes: 21 * MIB,
        ..VmLimits::default()
    };
    let t = TestVm::with_limits(&mm, "thrash", GUEST, limits);
    let (vm, ram, pages) = (t.id, t.ram, t.pages);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let results = std::thread::scope(|s| {
        let thrashers: Vec<_> = (0..THREADS)
            .map(|t| {
                let stop = &stop;
                s.spawn(move || {
                    // This thread's pages are those with `p % THREADS == t`.
                    let mut want = vec![0u64; (pages / THREADS) as usize];
                    let mut rng = Rng(0x9e37 + t);
                    let mut n = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let i = rng.below(pages / THREADS);
                        let p = i * THREADS + t;
                        let off = p * PAGE_SIZE + t * 8;
                        assert_eq!(ram.read(off), want[i as usize], "page {p}");
                        n += 1;
                        want[i as usize] = pattern(p, t, n);
                        ram.write(off, want[i as usize]);
                    }
                    for (i, w) in want.iter().enumerate() {
                        let p = i as u64 * THREADS + t;
                        assert_eq!(ram.read(p * PAGE_SIZE + t * 8), *w, "page {p}");
                    }
                    n
                })
            })
            .collect();
        // Three threads that only burn CPU, as on a loaded host: reclaim
        // in flight then takes longer to finish (without them, the old
        // code passed every run tried).
        for _ in 0..3 {
            let stop = &stop;
            s.spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            });
        }
        // Let the guest fill the budget and thrash, then lower and raise
        // the budget under it.
        std::thread::sleep(std::time::Duration::from_millis(500));
        let mut results = Vec::new();
        for _ in 0..12 {
            results.push((24 * MIB, mm.set_budget(24 * MIB)));
            results.push((32 * MIB, mm.set_budget(32 * MIB)));
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let ops: u64 = thrashers.into_iter().map(|h| h.join().unwrap()).sum();
        assert!(ops > 1000, "the guest hardly ran: {ops} accesses");
        results
    });
    for (bytes, r) in &results {
        let change = r.as_ref().expect("a budget change under a thrashing guest");
        assert_eq!(change.new_bytes, *bytes);
    }
    let s = mm.vm_stats(vm).unwrap();
    assert!(s.swap.swapin_file_pages > 0);
    t.destroy(&mm);
}

/// Lowering the budget waits for memory another reclaimer is writing out.
/// Such folios are unmapped, so neither resident nor free, until their
/// write completes; a lowering that counted free and resident pages up
/// front refused what it then completes. This is the likely cause of the
/// rare `CannotFree` of the thrashing test above, held open here by a swap
/// write made slow. Before the fix it was refused up front, short by the
/// 2 MiB folio being written less the margin (`short: 1835008`); with
/// that check gone, its rounds gave up within milliseconds with the folio
/// still in flight (their wait kicked the worker, whose pass ended it).
#[test]
fn lowering_the_budget_waits_for_memory_being_written_out() {
    const FILLED: u64 = 12 * MIB;
    const MARGIN: u64 = 256 * 1024;
    let mm = swap_manager(16 * MIB, 2, 64 * MIB, false);
    let t = TestVm::new(&mm, "a", 16 * MIB);
    let (vm, ram) = (t.id, t.ram);
    fill(ram, FILLED, 1);
    assert!(mm.wait_idle(std::time::Duration::from_secs(30)));
    // The first swap write takes a second, as on a congested disk.
    mm.inject_swap_faults(vec![mem::FaultPlan {
        op: mem::IoOp::Write,
        fault: mem::InjectedFault::Delay(std::time::Duration::from_secs(1)),
        skip: 0,
        count: 1,
    }])
    .unwrap();
    let lowered = std::thread::scope(|s| {
        let reclaimer = s.spawn(|| mm.reclaim(Some(vm), 8 * MIB).unwrap());
        // Its victims are unmapped before the first write starts.
        let started = std::time::Instant::now();
        while mm.stats().swap_device.writes == 0 {
            assert!(started.elapsed().as_secs() < 30, "no swap write started");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // Nothing more may be reclaimed from the VM: its minimum is what
        // it has resident now, with the reclaimer's victims unmapped.
        let resident = mm.vm_stats(vm).unwrap().resident_bytes();
        assert!(
            FILLED - resident > 4 * MARGIN,
            "only {} KiB in flight",
            (FILLED - resident) / 1024
        );
        let limits = VmLimits {
            min_bytes: resident,
            ..VmLimits::default()
        };
        mm.set_vm_limits(vm, limits).unwrap();
        assert_eq!(
            mm.stats().swap_device.write_bytes,
            0,
            "the premise: the write is still in flight (a host too loaded?)"
        );
        let change = mm.set_budget(resident + MARGIN);
        assert_eq!(
            change.map(|c| c.new_bytes),
            Ok(resident + MARGIN),
            "lowering the budget to {} KiB above a VM of {} KiB resident",
            MARGIN / 1024,
            resident / 1024
        );
        assert!(reclaimer.join().unwrap() > 0);
        resident + MARGIN
    });
    settle_and_check(&mm);
    assert_eq!(mm.stats().budget_bytes, lowered);
    assert!(mm.vm_stats(vm).unwrap().resident_bytes() <= lowered);
    mm.set_vm_limits(vm, VmLimits::default()).unwrap();
    mm.set_budget(16 * MIB).unwrap();
    verify(ram, FILLED, 1);
    t.destroy(&mm);
}

/// Minimums that would not fit in the budget are refused (reclaim never
/// goes below a minimum, so every VM would stall past its own), counting
/// every VM's, and the lowered budget's; a VM may lower its own.
#[test]
fn minimums_that_exceed_the_budget_are_refused() {
    let mm = manager(32 * MIB, 1);
    let (a, b) = (mm.create_vm("a").unwrap(), mm.create_vm("b").unwrap());
    let min = |m: u64| VmLimits {
        min_bytes: m * MIB,
        ..Default::default()
    };
    let refused = |needed, budget| {
        Err(mem::VmError::MinimumsAboveBudget {
            needed: needed * MIB,
            budget: budget * MIB,
        })
    };
    mm.set_vm_limits(a, min(16)).unwrap();
    mm.set_vm_limits(b, min(16)).unwrap();
    assert_eq!(mm.set_vm_limits(b, min(17)), refused(33, 32));
    // A's own minimum is replaced, not added to.
    mm.set_vm_limits(a, min(10)).unwrap();
    mm.set_budget(28 * MIB).unwrap();
    assert_eq!(mm.set_vm_limits(a, min(14)), refused(30, 28));
    mm.set_vm_limits(a, min(12)).unwrap();
}

/// Touch every page of `t` in a scattered order (a stride coprime with the
/// page count), reading generation `old` (if any) and writing `new`: a
/// swapped-out page comes back as an order-0 folio, as no two faults in a
/// row continue a readahead stream.
fn rewrite_scattered(t: &TestVm, old: Option<u64>, new: u64) {
    let stride = 4099;
    assert_eq!(gcd(stride, t.pages), 1);
    for i in 0..t.pages {
        let p = i * stride % t.pages;
        if let Some(g) = old {
            assert_eq!(t.ram.read(p * PAGE_SIZE), pattern(p, 0, g), "page {p}");
        }
        t.ram.write(p * PAGE_SIZE, pattern(p, 0, new));
    }
}

/// Sets its flag when dropped, on a panic too.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Relaxed);
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    match b {
        0 => a,
        b => gcd(b, a % b),
    }
}

/// A minimum raised while reclaim is taking the VM down holds at once:
/// reclaim in flight stops at the new minimum. Each round caps the VM at
/// 4 MiB (the background reclaimer and an API reclaimer take it down),
/// then, with reclaim under way, lifts the cap and sets a minimum a little
/// under what the VM holds. Reclaim read the floor once per pass, and the
/// pass enforcing the old cap took the VM on down to it: before the fix
/// the VM ended with 4-13 MiB under a minimum of 45-51 MiB in 5 runs of 5,
/// at the first round. The folios are order 0 (swapped in one by one), so
/// what was isolated before the raise is at most a few batches of 32 pages
/// per reclaimer, well inside the 1 MiB allowed here.
#[test]
fn raising_a_minimum_stops_reclaim_in_flight() {
    const GUEST: u64 = 64 * MIB;
    let mm = swap_manager(96 * MIB, 2, 256 * MIB, true);
    let t = TestVm::new(&mm, "raised", GUEST);
    let vm = t.id;
    t.fill(0);
    // Out to swap, then back as order-0 folios.
    assert_eq!(mm.reclaim(Some(vm), GUEST).unwrap(), GUEST);
    rewrite_scattered(&t, Some(0), 1);
    let s = mm.vm_stats(vm).unwrap();
    assert!(
        s.resident_bytes_by_order[0] >= GUEST - 4 * MIB,
        "the premise: order-0 folios, {:?}",
        s.resident_bytes_by_order
    );
    let resident = || mm.vm_stats(vm).unwrap().resident_bytes();
    let limits = |min_bytes, max_bytes| VmLimits {
        min_bytes,
        max_bytes,
        priority: 0,
    };
    let (stop, squeeze) = (AtomicBool::new(false), AtomicBool::new(false));
    std::thread::scope(|s| {
        // An API reclaimer on this VM too, while the cap is on: it reads
        // the floor once per call.
        s.spawn(|| {
            while !stop.load(Relaxed) {
                match squeeze.load(Relaxed) {
                    true => drop(mm.reclaim(Some(vm), 2 * MIB).unwrap()),
                    false => std::thread::sleep(std::time::Duration::from_millis(1)),
                }
            }
        });
        // A failed assertion below must stop it too, or the scope waits.
        let _stop = StopOnDrop(&stop);
        for round in 0..5u64 {
            assert!(resident() >= GUEST - 4 * MIB, "round {round}: not back in");
            squeeze.store(true, Relaxed);
            mm.set_vm_limits(vm, limits(0, Some(4 * MIB))).unwrap();
            assert!(
                wait_until(std::time::Duration::from_secs(20), || resident()
                    < GUEST - 8 * MIB),
                "round {round}: reclaim did not start"
            );
            // A minimum a little under what the VM holds now, in whole MiB.
            let min = (resident().saturating_sub(4 * MIB) / MIB).max(8) * MIB;
            mm.set_vm_limits(vm, limits(min, None)).unwrap();
            let at_raise = resident();
            // Let every reclaim in flight end; the API reclaimer keeps
            // asking for more meanwhile.
            std::thread::sleep(std::time::Duration::from_millis(300));
            squeeze.store(false, Relaxed);
            let after = resident();
            assert!(
                after + MIB >= min.min(at_raise),
                "round {round}: {after} bytes resident under a minimum of {min} \
                 ({at_raise} when it was set)"
            );
            // Everything back in, checked, as order-0 folios again.
            mm.set_vm_limits(vm, limits(0, None)).unwrap();
            rewrite_scattered(&t, Some(round + 1), round + 2);
        }
    });
    rewrite_scattered(&t, Some(6), 7);
    t.destroy(&mm);
}

/// Minimums may add up to the whole budget. With every VM at its minimum,
/// a VM whose working set is larger still runs: its faults swap out its
/// own pages (one folio at most below its minimum), and the other VM,
/// idle at its minimum, loses none of its pages. Before, reclaim found no
/// VM above its minimum, and the first fault past the minimum waited for
/// memory forever with the swap file empty: in 3 runs of 3 the guest
/// threads stopped after 5-6 accesses (four 2 MiB folios) for the 30 s
/// allowed, until the test lowered the other VM's minimum to let them end.
#[test]
fn a_vm_at_its_minimum_swaps_its_own_pages_when_minimums_fill_the_budget() {
    const THREADS: u64 = 3;
    const ACCESSES: u64 = 20_000;
    let mm = swap_manager(16 * MIB, 2, 256 * MIB, true);
    let min = |m: u64| VmLimits {
        min_bytes: m * MIB,
        ..VmLimits::default()
    };
    let idle = TestVm::with_limits(&mm, "idle", 8 * MIB, min(8));
    idle.fill(1);
    let busy = TestVm::with_limits(&mm, "busy", 32 * MIB, min(8));
    let (ram, pages) = (busy.ram, busy.pages);
    let done = std::sync::atomic::AtomicU64::new(0);
    let unblocked: Option<u64> = std::thread::scope(|s| {
        for t in 0..THREADS {
            let done = &done;
            s.spawn(move || {
                // This thread's pages are those with `p % THREADS == t`.
                let mut want = vec![0u64; (pages / THREADS) as usize];
                let mut rng = Rng(0x5bd1 + t);
                for n in 1..=ACCESSES {
                    let i = rng.below(pages / THREADS);
                    let p = i * THREADS + t;
                    let off = p * PAGE_SIZE + t * 8;
                    assert_eq!(ram.read(off), want[i as usize], "page {p}");
                    want[i as usize] = pattern(p, t, n);
                    ram.write(off, want[i as usize]);
                    done.fetch_add(1, Relaxed);
                }
                for (i, w) in want.iter().enumerate() {
                    let p = i as u64 * THREADS + t;
                    assert_eq!(ram.read(p * PAGE_SIZE + t * 8), *w, "page {p}");
                }
            });
        }
        let all = || done.load(Relaxed) == THREADS * ACCESSES;
        let finished = wait_until(std::time::Duration::from_secs(30), all);
        let stalled_at = done.load(Relaxed);
        if !finished {
            // Let the stuck guest threads end: the idle VM's minimum goes.
            mm.set_vm_limits(idle.id, VmLimits::default()).unwrap();
        }
        (!finished).then_some(stalled_at)
    });
    assert_eq!(
        unblocked,
        None,
        "the busy VM stalled at its minimum after this many accesses: {:?}",
        mm.vm_stats(busy.id).unwrap()
    );
    let (b, i) = (mm.vm_stats(busy.id).unwrap(), mm.vm_stats(idle.id).unwrap());
    assert!(b.swap.swapout_pages > 0, "{:?}", b.swap);
    assert_eq!(
        i.swap.swapout_pages, 0,
        "the idle VM lost pages: {:?}",
        i.swap
    );
    assert_eq!(i.resident_bytes(), 8 * MIB);
    assert!(mm.wait_idle(std::time::Duration::from_secs(30)));
    let b = mm.vm_stats(busy.id).unwrap().resident_bytes();
    assert!(b + 2 * MIB >= 8 * MIB, "busy VM at {b} bytes");
    idle.verify(1);
    busy.destroy(&mm);
    idle.destroy(&mm);
}

/// Many threads in several VMs whose minimums add up to the whole budget,
/// each VM's working set three times its minimum: every fault past the
/// minimums swaps out a folio of its own VM (`vmscan::reclaim_own`), with
/// the others' faults doing the same at once. No thread may stop making
/// progress (its own page evicted before its access retried, over and
/// over, or two VMs taking the freed memory from each other for ever), and
/// every word reads back as written.
fn minimums_fill_the_budget_every_thread_progresses(delivery: mem::FaultDelivery) {
    use std::sync::atomic::AtomicU64;
    use std::time::{Duration, Instant};
    const VMS: u64 = 4;
    const THREADS: u64 = 3;
    const ACCESSES: u64 = 6_000;
    /// A thread whose count stays put this long is stuck.
    const STALL: Duration = Duration::from_secs(20);
    let mm = swap_manager_with(16 * MIB, 2, 256 * MIB, true, delivery);
    let min = VmLimits {
        min_bytes: 4 * MIB,
        ..VmLimits::default()
    };
    let vms: Vec<TestVm> = (0..VMS)
        .map(|v| TestVm::with_limits(&mm, &format!("vm{v}"), 12 * MIB, min))
        .collect();
    let done: Vec<AtomicU64> = (0..VMS * THREADS).map(|_| AtomicU64::new(0)).collect();
    let stuck: Option<(usize, u64)> = std::thread::scope(|s| {
        for (v, vm) in vms.iter().enumerate() {
            for t in 0..THREADS {
                let (ram, pages) = (vm.ram, vm.pages);
                let done = &done[v * THREADS as usize + t as usize];
                s.spawn(move || {
                    let mut want = vec![0u64; (pages / THREADS) as usize];
                    let mut rng = Rng(0x9e11 + v as u64 * 31 + t);
                    for n in 1..=ACCESSES {
                        let i = rng.below(pages / THREADS);
                        let p = i * THREADS + t;
                        let off = p * PAGE_SIZE + t * 8;
                        assert_eq!(ram.read(off), want[i as usize], "vm {v} page {p}");
                        want[i as usize] = pattern(p, t, n);
                        ram.write(off, want[i as usize]);
                        done.store(n, Relaxed);
                    }
                    for (i, w) in want.iter().enumerate() {
                        let p = i as u64 * THREADS + t;
                        assert_eq!(ram.read(p * PAGE_SIZE + t * 8), *w, "vm {v} page {p}");
                    }
                });
            }
        }
        let mut last: Vec<(u64, Instant)> = done.iter().map(|_| (0, Instant::now())).collect();
        let stuck = loop {
            std::thread::sleep(Duration::from_millis(100));
            let mut all = true;
            let mut stuck = None;
            for (k, d) in done.iter().enumerate() {
                let n = d.load(Relaxed);
                all &= n == ACCESSES;
                if n != last[k].0 {
                    last[k] = (n, Instant::now());
                } else if n < ACCESSES && last[k].1.elapsed() > STALL {
                    stuck = Some((k, n));
                }
            }
            if all || stuck.is_some() {
                break stuck;
            }
        };
        if stuck.is_some() {
            // Let the stuck threads end: the minimums go.
            for vm in &vms {
                mm.set_vm_limits(vm.id, VmLimits::default()).unwrap();
            }
        }
        stuck
    });
    let stats: Vec<_> = vms.iter().map(|v| mm.vm_stats(v.id).unwrap()).collect();
    assert_eq!(
        stuck, None,
        "(thread, accesses) made no progress for {STALL:?}: {stats:?}"
    );
    for s in &stats {
        assert!(s.swap.swapout_pages > 0, "{:?}", s.swap);
    }
    for vm in vms {
        vm.destroy(&mm);
    }
}

#[test]
fn minimums_fill_the_budget_every_thread_progresses_handlers() {
    minimums_fill_the_budget_every_thread_progresses(mem::FaultDelivery::Handlers);
}

#[test]
fn minimums_fill_the_budget_every_thread_progresses_faulter() {
    minimums_fill_the_budget_every_thread_progresses(mem::FaultDelivery::Faulter);
}

/// One access needing two pages at once (an unaligned word across a 2 MiB
/// boundary, as a guest page walk needs its tables and the data page) in
/// a VM at its minimum, with every other VM at its own. Its faults swap
/// out its own memory, at most 2 MiB below its minimum
/// (`vmscan::reclaim_own`); a fault that then filled that room with a
/// 2 MiB folio made the other page's fault evict it again, for ever.
/// Before, 3 runs of 3 made no access for the 30 s allowed (about 19,000
/// faults of 2 MiB folios, each evicting the other, until the test
/// lowered the other VM's minimum).
fn an_access_across_two_folios_completes_at_a_minimum(delivery: mem::FaultDelivery) {
    use std::time::Duration;
    const ROUNDS: u64 = 2000;
    let mm = swap_manager_with(8 * MIB, 2, 256 * MIB, true, delivery);
    let min = |m: u64| VmLimits {
        min_bytes: m * MIB,
        ..VmLimits::default()
    };
    let big = TestVm::with_limits(&mm, "big", 6 * MIB, min(6));
    big.fill(1);
    let small = TestVm::with_limits(&mm, "small", 24 * MIB, min(2));
    // Data in the top 8 MiB (word 1 of each page), swapped out for the
    // accesses below, which go to the untouched 16 MiB under it.
    let data = 16 * MIB / PAGE_SIZE..small.pages;
    for p in data.clone() {
        small.ram.write(p * PAGE_SIZE + 8, pattern(p, 1, 2));
    }
    std::thread::sleep(Duration::from_millis(1100));
    let base = small.ram.0.host_addr.raw();
    let done = std::sync::atomic::AtomicU64::new(0);
    let stuck = std::thread::scope(|s| {
        let done = &done;
        s.spawn(move || {
            let mut rng = Rng(7);
            let mut want = [0u64; 8];
            for n in 1..=ROUNDS {
                let b = 1 + rng.below(7) as usize;
                let at = (base + b * (2 * MIB) as usize - 4) as *mut u64;
                // SAFETY: 8 bytes inside the small VM's live region, which
                // Rust code never borrows; the fault is served for us.
                let v = unsafe { std::ptr::read_unaligned(at) };
                assert_eq!(v, want[b], "the word across 2 MiB boundary {b}");
                want[b] = pattern(b as u64, 0, n);
                // SAFETY: as above.
                unsafe { std::ptr::write_unaligned(at, want[b]) };
                done.store(n, Relaxed);
            }
        });
        let finished = wait_until(Duration::from_secs(30), || done.load(Relaxed) == ROUNDS);
        let stalled_at = done.load(Relaxed);
        let stats = mm.vm_stats(small.id).unwrap();
        if !finished {
            // Let the stuck thread end: the big VM's minimum goes.
            mm.set_vm_limits(big.id, VmLimits::default()).unwrap();
        }
        (!finished).then_some((stalled_at, stats))
    });
    assert!(
        stuck.is_none(),
        "stuck for 30 s after (accesses, stats) {stuck:?}"
    );
    for p in data {
        assert_eq!(
            small.ram.read(p * PAGE_SIZE + 8),
            pattern(p, 1, 2),
            "page {p}"
        );
    }
    big.verify(1);
    small.destroy(&mm);
    big.destroy(&mm);
}

#[test]
fn an_access_across_two_folios_completes_at_a_minimum_handlers() {
    an_access_across_two_folios_completes_at_a_minimum(mem::FaultDelivery::Handlers);
}

#[test]
fn an_access_across_two_folios_completes_at_a_minimum_faulter() {
    an_access_across_two_folios_completes_at_a_minimum(mem::FaultDelivery::Faulter);
}

/// A VM above its minimum by less than any folio it has, and another VM
/// with nothing of its own to give: reclaim for the second must split one
/// of the first's folios and take the difference, not wait. Before, every
/// victim of the first VM would have taken it below its minimum, so the
/// second VM's first fault waited for memory until a limit changed.
#[test]
fn a_vm_less_than_a_folio_above_its_minimum_gives_the_difference() {
    let mm = swap_manager(4 * MIB, 2, 64 * MIB, false);
    let limits = VmLimits {
        min_bytes: 3 * MIB,
        ..VmLimits::default()
    };
    let a = TestVm::with_limits(&mm, "a", 4 * MIB, limits);
    // Two 2 MiB folios need the pool prepared as two 2 MiB blocks first: a
    // fault that finds none falls back to smaller folios.
    let ready = || mm.stats().ready_bytes_by_order[9] == 4 * MIB;
    assert!(wait_until(std::time::Duration::from_secs(30), ready));
    a.fill(1);
    let s = mm.stats();
    assert_eq!(
        s.folios_by_order[9], 2,
        "the first VM holds the whole budget in two 2 MiB folios: {s:?}"
    );
    let b = TestVm::new(&mm, "b", 2 * MIB);
    let done = AtomicBool::new(false);
    let finished = std::thread::scope(|s| {
        s.spawn(|| {
            for p in 0..b.pages {
                b.ram.write(p * PAGE_SIZE, pattern(p, 0, 2));
            }
            done.store(true, Relaxed);
        });
        let finished = wait_until(std::time::Duration::from_secs(30), || done.load(Relaxed));
        if !finished {
            // Let the stuck thread end.
            mm.set_vm_limits(a.id, VmLimits::default()).unwrap();
        }
        finished
    });
    assert!(
        finished,
        "the second VM waited for memory: {:?}",
        mm.stats()
    );
    let r = mm.vm_stats(a.id).unwrap().resident_bytes();
    assert!(
        r >= 3 * MIB,
        "the first VM went below its minimum: {r} bytes"
    );
    assert!(mm.wait_idle(std::time::Duration::from_secs(30)));
    a.verify(1);
    for p in 0..b.pages {
        assert_eq!(b.ram.read(p * PAGE_SIZE), pattern(p, 0, 2), "page {p}");
    }
    b.destroy(&mm);
    a.destroy(&mm);
}

/// Many threads against the floor split (`vmscan::split_to_fit`): three
/// VMs whose minimums leave each less than a 2 MiB folio to give, filled
/// with 2 MiB folios, each with two vCPU threads that check every word
/// they read and write new generations over a wandering window and
/// discard 64 KiB runs of their own pages, while compaction runs over them
/// and background and direct reclaim split and evict. Every word reads
/// back as last written (zero after a discard), no VM is seen more than a
/// 2 MiB folio below its minimum (a fault's own reclaim may go that far),
/// and the allocator, swap map and swap cache balance after.
#[test]
fn vms_at_their_minimums_split_and_evict_large_folios_without_losing_a_word() {
    use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
    const VMS: u64 = 3;
    const THREADS: u64 = 2;
    const RAM: u64 = 12 * MIB;
    const PAGES: u64 = RAM / PAGE_SIZE;
    const CHUNK: u64 = 16;
    const WORDS: [u64; 2] = [0, PAGE_SIZE / 8 - 1];
    const MIN: u64 = 7 * MIB + 3 * MIB / 4;
    const SECS: u64 = 8;
    let mm = swap_manager(24 * MIB, 3, 256 * MIB, true);
    let limits = VmLimits {
        min_bytes: MIN,
        ..VmLimits::default()
    };
    let vms: Vec<TestVm> = (0..VMS)
        .map(|v| TestVm::with_limits(&mm, &format!("floor{v}"), RAM, limits))
        .collect();
    let ready = || mm.stats().ready_bytes_by_order[9] >= 16 * MIB;
    assert!(wait_until(std::time::Duration::from_secs(30), ready));
    // Per page and word: the value last written. Thread `w` of a VM owns
    // the chunks `c` with `c % THREADS == w`.
    let expected: Vec<Vec<AtomicU64>> = (0..VMS)
        .map(|_| (0..PAGES * 2).map(|_| AtomicU64::new(0)).collect())
        .collect();
    // Every page written: each VM holds at least its minimum from here.
    for (v, vm) in vms.iter().enumerate() {
        for p in 0..PAGES {
            for (k, &word) in WORDS.iter().enumerate() {
                let val = (p << 16) | ((v as u64) << 8) | (k as u64 + 0x80);
                vm.ram.write(p * PAGE_SIZE + word * 8, val);
                expected[v][(p * 2) as usize + k].store(val, SeqCst);
            }
        }
    }
    let t0 = std::time::Instant::now();
    let running = || t0.elapsed() < std::time::Duration::from_secs(SECS);
    let below = AtomicU64::new(0);
    let accesses = AtomicU64::new(0);
    std::thread::scope(|s| {
        for (v, vm) in vms.iter().enumerate() {
            for w in 0..THREADS {
                let (vm, exp, accesses, mm) = (vm, &expected[v], &accesses, &*mm);
                s.spawn(move || {
                    let mut rng = Rng(0x51 + (v as u64) * 977 + w * 31);
                    let mut i = 0u64;
                    let mine = |p: u64| {
                        let c = p / CHUNK;
                        (c - c % THREADS + w) * CHUNK + p % CHUNK
                    };
                    while running() {
                        i += 1;
                        // A 4 MiB window wandering over the VM, so that
                        // its 2 MiB folios cool, get sampled and go.
                        let win = (i / 3000 * 256) % (PAGES - 1024);
                        let p = mine(win + rng.below(1024));
                        for (k, &word) in WORDS.iter().enumerate() {
                            let at = p * PAGE_SIZE + word * 8;
                            let e = &exp[(p * 2) as usize + k];
                            let got = vm.ram.read(at);
                            assert_eq!(
                                got,
                                e.load(SeqCst),
                                "vm {v} thread {w} page {p} word {word} at access {i}"
                            );
                            if rng.below(2) == 0 {
                                let val = (i << 16) | ((v as u64) << 8) | (w + 1);
                                vm.ram.write(at, val);
                                e.store(val, SeqCst);
                            }
                        }
                        if rng.below(3000) == 0 {
                            let c = mine(win + rng.below(1024)) / CHUNK;
                            let gpa = vm.ram.gpa(c * CHUNK * PAGE_SIZE);
                            let out = mm.discard(vm.id, gpa, CHUNK * PAGE_SIZE).unwrap();
                            assert_eq!(out.skipped_pinned_pages, 0);
                            // Read back as zero, which faults the pages
                            // in again: the VM keeps its minimum's worth.
                            for q in c * CHUNK..(c + 1) * CHUNK {
                                for (k, &word) in WORDS.iter().enumerate() {
                                    exp[(q * 2) as usize + k].store(0, SeqCst);
                                    let got = vm.ram.read(q * PAGE_SIZE + word * 8);
                                    assert_eq!(got, 0, "vm {v} page {q} after its discard");
                                }
                            }
                        }
                    }
                    accesses.fetch_add(i, SeqCst);
                });
            }
        }
        let (mmr, vmsr, running) = (&*mm, &vms, &running);
        s.spawn(move || {
            while running() {
                for vm in vmsr {
                    let _ = mmr.compact(Some(vm.id), &|_, _| {});
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        });
        let below = &below;
        s.spawn(move || {
            while running() {
                for vm in vmsr {
                    let r = mmr.vm_stats(vm.id).unwrap().resident_bytes();
                    // A fault's own reclaim may take its VM a 2 MiB folio
                    // below; each thread's discard, a chunk until read.
                    if r + 2 * MIB + THREADS * CHUNK * PAGE_SIZE < MIN {
                        below.fetch_add(1, SeqCst);
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        });
    });
    let s = mm.stats();
    eprintln!(
        "{} accesses; floor splits {}, sampled splits {}, swapped out {} pages, \
         collapsed {}, folios by order {:?}",
        accesses.load(SeqCst),
        s.swap.floor_splits,
        s.swap.sampled_splits,
        s.swap.swapout_pages,
        s.migration.collapsed,
        s.folios_by_order
    );
    assert_eq!(below.load(SeqCst), 0, "a VM went below its minimum");
    assert!(s.swap.floor_splits > 0, "no floor split: no test");
    for (v, vm) in vms.iter().enumerate() {
        for p in 0..PAGES {
            for (k, &word) in WORDS.iter().enumerate() {
                let want = expected[v][(p * 2) as usize + k].load(SeqCst);
                let got = vm.ram.read(p * PAGE_SIZE + word * 8);
                assert_eq!(got, want, "vm {v} page {p} word {word}");
            }
        }
    }
    let s = mm.stats();
    assert_eq!(s.swap.read_errors + s.swap.write_errors, 0);
    settle_and_check(&mm);
    for vm in vms {
        vm.destroy(&mm);
    }
    let s = mm.stats();
    assert_eq!(
        (s.swap_device.used_bytes, s.swap_device.cache_pages),
        (0, 0)
    );
}

/// The background reclaimer's watermarks follow the budget, as a zone's
/// follow memory hot-added or removed. Kept from a 512 MiB pool, after
/// lowering the budget to 48 MiB they made it keep up to 16 MiB (a third
/// of the budget) free: a guest writing 42 MiB was cut to about 32 MiB
/// resident. Set for 48 MiB (2 and 4 MiB), 42 MiB stays resident.
#[test]
fn the_watermarks_follow_a_lowered_budget() {
    let mm = mem::MemoryManager::new(mem::MmConfig {
        budget_bytes: 512 * MIB,
        handler_threads: 2,
        fault_delivery: mem::FaultDelivery::Handlers,
        // Not the whole 512 MiB zeroed ahead for nothing.
        prezero_limit_bytes: Some(8 * MIB),
        swap: Some(mem::SwapConfig {
            target: mem::SwapTarget::Dir(std::env::temp_dir()),
            size_bytes: 128 * MIB,
        }),
        reclaim: mem::ReclaimConfig::default(),
    })
    .unwrap();
    mm.set_budget(48 * MIB).unwrap();
    let t = TestVm::new(&mm, "wm", 64 * MIB);
    let written = 42 * MIB;
    fill(t.ram, written, 1);
    assert!(mm.wait_idle(std::time::Duration::from_secs(30)));
    // Let a background pass that the last faults woke run to its end.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(mm.wait_idle(std::time::Duration::from_secs(30)));
    let resident = mm.vm_stats(t.id).unwrap().resident_bytes();
    assert!(
        resident >= written - 2 * MIB,
        "{} MiB of the {} MiB written stayed resident in a 48 MiB budget",
        resident >> 20,
        written >> 20
    );
    verify(t.ram, written, 1);
    t.destroy(&mm);
}
