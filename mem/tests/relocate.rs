//! Region relocation from host threads: the "vCPUs" address guest RAM
//! through a view that the switch callback replaces while they are held
//! off (the write lock is the pause), as the VMM does with its memslots.

mod common;

use common::*;
use mem::{
    DebugUnmap, FaultPoint, GuestAddress, InjectPlan, MemoryManager, RelocateError, RelocateOp,
    PAGE_SIZE,
};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, RwLock};

fn fill(view: &View, base: u64, pages: u64, g: u64) {
    for p in 0..pages {
        for w in [0, 1, 511] {
            view.write(base + p * PAGE_SIZE + w * 8, pattern(p, w, g));
        }
    }
}

fn verify(view: &View, base: u64, pages: u64, g: u64, what: &str) {
    for p in 0..pages {
        for w in [0, 1, 511] {
            assert_eq!(
                view.read(base + p * PAGE_SIZE + w * 8),
                pattern(p, w, g),
                "{what}: page {p} word {w}"
            );
        }
    }
}

fn relocate(
    mm: &MemoryManager,
    vm: mem::VmId,
    view: &View,
    gpa: u64,
    op: RelocateOp,
) -> Result<mem::RelocateReport, RelocateError> {
    mm.relocate(
        vm,
        GuestAddress(gpa),
        op,
        &mut |sw| view.switch(sw),
        &|_, _| {},
    )
}

/// A fault on the new region before it is live (in the switch callback,
/// as a late fault message for a reused host range would be) must neither
/// pull its table while the vCPUs still use the old range nor be served
/// from the empty table: it waits and reads the guest's data once the
/// region is live. Pulled early, the old range's table was gone and a vCPU
/// touching it faulted for ever while the switch waited for it.
#[test]
fn a_fault_on_the_new_range_before_the_switch_waits_and_pulls_nothing_early() {
    let mm = manager(64 * MIB, 2);
    let vm = mm.create_vm("early").unwrap();
    let b = mm.backend(vm, &[(GuestAddress(0), 4 * MIB)]).unwrap();
    let view = Arc::new(View::new(mem::GuestMemoryBackend::regions(&*b)));
    let pages = 4 * MIB / PAGE_SIZE;
    fill(&view, 0, pages, 3);
    let early = std::sync::Mutex::new(None);
    mm.relocate(
        vm,
        GuestAddress(0),
        RelocateOp::ToAligned,
        &mut |sw| {
            if !sw.undo {
                let at = Ram(sw.new[0]);
                *early.lock().unwrap() = Some(std::thread::spawn(move || at.read(5 * PAGE_SIZE)));
                std::thread::sleep(std::time::Duration::from_millis(100));
                // A vCPU, still on the old range, touches the same table.
                let (tx, rx) = std::sync::mpsc::channel();
                let v = view.clone();
                std::thread::spawn(move || tx.send(v.read(7 * PAGE_SIZE)));
                let read = rx.recv_timeout(std::time::Duration::from_secs(10));
                assert_eq!(read, Ok(pattern(7, 0, 3)), "a vCPU on the old range");
            }
            view.switch(sw)
        },
        &|_, _| {},
    )
    .unwrap();
    let early = early.lock().unwrap().take().unwrap().join().unwrap();
    assert_eq!(early, pattern(5, 0, 3), "the early fault reads the data");
    verify(&view, 0, pages, 3, "after");
}

#[test]
fn to_aligned_makes_misaligned_2m_folios_pmd_mapped() {
    let mm = manager(64 * MIB, 2);
    let vm = mm.create_vm("align").unwrap();
    let b = mm
        .backend_with_offset(vm, &[(GuestAddress(0), 16 * MIB)], 4096)
        .unwrap();
    let view = View::new(mem::GuestMemoryBackend::regions(&*b));
    let pages = 16 * MIB / PAGE_SIZE;
    fill(&view, 0, pages, 1);
    let old = mm.vm_regions(vm).unwrap()[0];
    assert_eq!(old.host_addr.raw() % (2 << 20), 4096);
    // We map none of it by PMD (no guest 2 MiB sits on a host 2 MiB), but
    // khugepaged may collapse a fully populated host 2 MiB of this
    // MADV_HUGEPAGE mapping in the background: seen once in CI (4 MiB).
    // Never all of it, since the region's first and last host PMD ranges
    // are only partly inside it.
    let before = anon_huge_kb(old.host_addr.raw());
    assert!(before < 16 * 1024, "misaligned, yet {before} kB PMD-mapped");
    let rep = relocate(&mm, vm, &view, 0, RelocateOp::ToAligned).unwrap();
    eprintln!("{rep:?}");
    let new = rep.new.unwrap();
    assert_eq!(mm.vm_regions(vm).unwrap(), vec![new]);
    assert_eq!(new.host_addr.raw() % (2 << 20), 0);
    assert_eq!(rep.tables, 8);
    assert_eq!(rep.remapped_huge, 8, "every 2 MiB folio remapped as a PMD");
    verify(&view, 0, pages, 1, "after relocation");
    let huge = anon_huge_kb(new.host_addr.raw());
    assert!(huge >= 16 * 1024, "PMD-mapped after relocation: {huge} kB");
    settle_and_check(&mm);
    drop(b);
    mm.destroy_vm(vm).unwrap();
    settle_and_check(&mm);
}

/// A source entry `Present` without its host page (see
/// `fault::restore_unbacked`) cannot be moved by `UFFDIO_MOVE` (`ENOENT`).
/// The pull repairs it first, as a fault would: from the folio's pool page,
/// from its swap slot if clean, or by poisoning. It must not fail the
/// relocation, and above all not fail the same way on every retry of a
/// vCPU's fault on that table (which, with the undo waiting for that vCPU,
/// hung once); nor may it lose a clean page's slot on the way.
#[test]
fn a_present_source_entry_without_its_host_page_is_repaired_by_the_pull() {
    let mm = swap_manager(16 * MIB, 2, 64 * MIB, false);
    let vm = mm.create_vm("unbacked").unwrap();
    let b = mm
        .backend_with_offset(vm, &[(GuestAddress(0), 4 * MIB)], 4096)
        .unwrap();
    let view = View::new(mem::GuestMemoryBackend::regions(&*b));
    let pages = 4 * MIB / PAGE_SIZE;
    fill(&view, 0, pages, 3);
    for _ in 0..4 {
        mm.reclaim(Some(vm), 4 * MIB).unwrap();
    }
    // Page 9 comes back by a read, clean; pages 3 and 600 by writes.
    assert_eq!(view.read(9 * PAGE_SIZE), pattern(9, 0, 3));
    for p in [3, 600] {
        view.write(p * PAGE_SIZE, pattern(p, 0, 3));
    }
    assert!(mm.wait_idle(std::time::Duration::from_secs(30)));
    assert_eq!(mm.vm_stats(vm).unwrap().swap.clean_kept_pages, 1);
    for (p, how) in [
        (3, DebugUnmap::IntoPool),
        (600, DebugUnmap::Drop),
        (9, DebugUnmap::IntoPoolScribbled),
    ] {
        assert!(mm
            .debug_unmap_behind_entry(vm, GuestAddress(p * PAGE_SIZE), how)
            .unwrap());
    }
    let rep = relocate(&mm, vm, &view, 0, RelocateOp::ToAligned).unwrap();
    assert_eq!(rep.tables, 2);
    let f = mm.vm_stats(vm).unwrap().faults;
    assert_eq!(
        (
            f.unbacked_restored,
            f.unbacked_poisoned,
            f.unbacked_from_slot
        ),
        (1, 1, 1)
    );
    let new = rep.new.unwrap();
    // Page 600's data was gone: poisoned in the new range, never zero.
    let r = read_via_gup(new.host_addr.raw() + 600 * PAGE_SIZE as usize);
    assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EFAULT));
    for p in (0..pages).filter(|&p| p != 600) {
        for w in [0, 1, 511] {
            let got = view.read(p * PAGE_SIZE + w * 8);
            assert_eq!(got, pattern(p, w, 3), "page {p} word {w}");
        }
    }
    drop(b);
    mm.destroy_vm(vm).unwrap();
    settle_and_check(&mm);
}

#[test]
fn every_failed_step_is_undone() {
    let mm = swap_manager(24 * MIB, 2, 64 * MIB, false);
    let vm = mm.create_vm("undo").unwrap();
    let b = mm.backend(vm, &[(GuestAddress(0), 16 * MIB)]).unwrap();
    let view = View::new(mem::GuestMemoryBackend::regions(&*b));
    let pages = 16 * MIB / PAGE_SIZE;
    fill(&view, 0, pages, 1);
    // Some of it swapped out, so swap entries move (and move back) too.
    assert!(mm.reclaim(Some(vm), 4 * MIB).unwrap() > 0);
    let before = mm.vm_regions(vm).unwrap();
    for (point, skip) in [
        (FaultPoint::RelocatePrepare, 0),
        (FaultPoint::RelocateSwitch, 0),
        (FaultPoint::RelocateMove, 0),
        (FaultPoint::RelocateMove, 5),
        (FaultPoint::RelocateCommit, 0),
    ] {
        mm.inject_faults(vec![InjectPlan {
            point,
            skip,
            count: 1,
        }]);
        let e = relocate(&mm, vm, &view, 0, RelocateOp::ToAligned).unwrap_err();
        let expected = match &e {
            RelocateError::Injected(p) => *p == point,
            RelocateError::Switch(_) => point == FaultPoint::RelocateSwitch,
            _ => false,
        };
        assert!(expected, "{point:?}: {e}");
        assert_eq!(mm.vm_regions(vm).unwrap(), before, "{point:?} undone");
        assert_eq!(*view.0.read().unwrap(), before);
        verify(&view, 0, pages, 1, &format!("after failed {point:?}"));
        settle_and_check(&mm);
    }
    mm.inject_faults(vec![]);
    assert_eq!(mm.stats().migration.relocations_undone, 3);
    relocate(&mm, vm, &view, 0, RelocateOp::ToAligned).unwrap();
    verify(&view, 0, pages, 1, "relocated");
    settle_and_check(&mm);
}

/// Make the next relocation fail at its commit, after every table moved.
fn fail_next_commit(mm: &MemoryManager) {
    mm.inject_faults(vec![InjectPlan {
        point: FaultPoint::RelocateCommit,
        skip: 0,
        count: 1,
    }]);
}

/// A grow that fails after the switch is undone even when the guest wrote
/// the new tail meanwhile, in the source's last, partial table and in
/// tables with no source at all: that memory has nowhere to go back to, so
/// it is discarded (nothing is moved outside the source, nothing leaks),
/// and the source's data is intact.
#[test]
fn a_failed_grow_discards_what_the_guest_wrote_in_the_new_tail() {
    let mm = swap_manager(32 * MIB, 2, 64 * MIB, false);
    let vm = mm.create_vm("grow-undo").unwrap();
    let size = 6 * MIB + 12 * 1024;
    let b = mm.backend(vm, &[(GuestAddress(0), size)]).unwrap();
    let view = View::new(mem::GuestMemoryBackend::regions(&*b));
    let pages = size / PAGE_SIZE;
    fill(&view, 0, pages, 5);
    let before = mm.vm_regions(vm).unwrap();
    fail_next_commit(&mm);
    let wrote = AtomicBool::new(false);
    let e = mm
        .relocate(
            vm,
            GuestAddress(0),
            RelocateOp::Grow(10 * MIB),
            &mut |sw| view.switch(sw),
            &|_, _| {
                // After the switch: the tail is guest memory now.
                if !wrote.swap(true, SeqCst) {
                    fill(&view, size, (10 * MIB - size) / PAGE_SIZE, 6);
                }
            },
        )
        .unwrap_err();
    assert!(wrote.load(SeqCst));
    assert!(
        matches!(e, RelocateError::Injected(FaultPoint::RelocateCommit)),
        "{e}"
    );
    assert_eq!(mm.vm_regions(vm).unwrap(), before, "undone");
    verify(&view, 0, pages, 5, "after the failed grow");
    assert_eq!(
        mm.vm_stats(vm).unwrap().resident_bytes(),
        size.next_multiple_of(PAGE_SIZE),
        "only the source's pages are resident"
    );
    settle_and_check(&mm);
    drop(b);
    mm.destroy_vm(vm).unwrap();
    settle_and_check(&mm);
    assert_eq!(mm.stats().free_bytes, 32 * MIB, "every folio was freed");
}

/// Drop `pin` on another thread after `hold`, as a device ends a request.
fn drop_after(pin: mem::PinGuard, hold: std::time::Duration) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        std::thread::sleep(hold);
        drop(pin);
    })
}

/// A device request on the page at `gpa`: pin it now, unpin after `hold`.
fn hold_pin(
    mm: &MemoryManager,
    vm: mem::VmId,
    gpa: u64,
    hold: std::time::Duration,
) -> std::thread::JoinHandle<()> {
    drop_after(mm.pin(vm, GuestAddress(gpa), PAGE_SIZE).unwrap(), hold)
}

/// A device pin on a page of a table already moved to the new range does
/// not make a failing relocation's undo fail: the undo waits for the unpin
/// (one device request) and moves the table back.
#[test]
fn an_undo_waits_for_a_transient_pin_in_a_moved_table() {
    let mm = manager(24 * MIB, 2);
    let vm = mm.create_vm("undo-pin").unwrap();
    let b = mm.backend(vm, &[(GuestAddress(0), 8 * MIB)]).unwrap();
    let view = View::new(mem::GuestMemoryBackend::regions(&*b));
    let pages = 8 * MIB / PAGE_SIZE;
    fill(&view, 0, pages, 7);
    let before = mm.vm_regions(vm).unwrap();
    fail_next_commit(&mm);
    let hold = std::time::Duration::from_millis(300);
    let released = std::sync::Mutex::new(None);
    let t0 = std::time::Instant::now();
    let e = mm
        .relocate(
            vm,
            GuestAddress(0),
            RelocateOp::ToAligned,
            &mut |sw| view.switch(sw),
            &|done, _| {
                let mut r = released.lock().unwrap();
                if done == 1 && r.is_none() {
                    // Table 0 is in the new range now: a device pins a page
                    // of it for one request.
                    *r = Some(hold_pin(&mm, vm, 8192, hold));
                }
            },
        )
        .unwrap_err();
    assert!(
        matches!(e, RelocateError::Injected(FaultPoint::RelocateCommit)),
        "{e}"
    );
    released
        .lock()
        .unwrap()
        .take()
        .expect("pinned")
        .join()
        .unwrap();
    assert!(t0.elapsed() >= hold, "the undo waited for the unpin");
    assert_eq!(mm.vm_regions(vm).unwrap(), before, "undone");
    verify(&view, 0, pages, 7, "after the undo");
    settle_and_check(&mm);
}

/// A VM with adjacent regions of 4 and 6 MiB, filled with generation `g`.
fn two_regions(
    name: &str,
    g: u64,
) -> (
    Arc<MemoryManager>,
    mem::VmId,
    Arc<mem::FolioBackend>,
    View,
    u64,
) {
    let mm = manager(64 * MIB, 2);
    let vm = mm.create_vm(name).unwrap();
    let b = mm
        .backend(
            vm,
            &[(GuestAddress(0), 4 * MIB), (GuestAddress(4 * MIB), 6 * MIB)],
        )
        .unwrap();
    let view = View::new(mem::GuestMemoryBackend::regions(&*b));
    let pages = 10 * MIB / PAGE_SIZE;
    fill(&view, 0, pages, g);
    (mm, vm, b, view, pages)
}

/// A discard during the undo of a failed merge reaches the entries where
/// they are: a table of the second region that was never pulled lives on
/// in that region, not in the closed table of the new range that comes
/// first by guest address. (Closed as dead, that table took the discard,
/// which then did nothing and reported success.)
#[test]
fn a_discard_during_an_undo_reaches_the_tables_that_never_moved() {
    let (mm, vm, _b, view, pages) = two_regions("undo-discard", 8);
    let before = mm.vm_regions(vm).unwrap();
    // Table 0 moves, table 1 fails: the undo starts with tables 1..5 of the
    // new range never pulled.
    mm.inject_faults(vec![InjectPlan {
        point: FaultPoint::RelocateMove,
        skip: 1,
        count: 1,
    }]);
    let helper = std::sync::Mutex::new(None);
    let (gap, len) = (6 * MIB, 2 * MIB);
    let e = mm
        .relocate(
            vm,
            GuestAddress(0),
            RelocateOp::MergeWith(GuestAddress(4 * MIB)),
            &mut |sw| view.switch(sw),
            &|done, _| {
                let mut h = helper.lock().unwrap();
                if done == 1 && h.is_none() {
                    // A device request pins a page of the moved table: the
                    // undo waits for it, and the discard lands meanwhile.
                    let pin = mm.pin(vm, GuestAddress(8192), PAGE_SIZE).unwrap();
                    let mm = mm.clone();
                    *h = Some(std::thread::spawn(move || {
                        std::thread::sleep(std::time::Duration::from_millis(300));
                        let out = mm.discard(vm, GuestAddress(gap), len);
                        drop(pin);
                        out
                    }));
                }
            },
        )
        .unwrap_err();
    assert!(
        matches!(e, RelocateError::Injected(FaultPoint::RelocateMove)),
        "{e}"
    );
    let out = helper
        .lock()
        .unwrap()
        .take()
        .expect("pinned")
        .join()
        .unwrap()
        .unwrap();
    assert_eq!(out.discarded_pages, len / PAGE_SIZE, "{out:?}");
    assert_eq!(mm.vm_regions(vm).unwrap(), before, "undone");
    for p in 0..pages {
        let gpa = p * PAGE_SIZE;
        let want = match (gap..gap + len).contains(&gpa) {
            true => 0,
            false => pattern(p, 0, 8),
        };
        assert_eq!(view.read(gpa), want, "page {p}");
    }
    settle_and_check(&mm);
}

/// A device pins a page by guest address, then writes it through its own
/// view of guest memory. The switch makes the new region live before the
/// device gets the new view (`RelocateSwitch::make_live`), so the pin and
/// the write name the same region. Pinned in the old region while writing
/// through the new one, the write faulted on a table the pin kept from
/// moving, and the relocation and the device waited for each other.
#[test]
fn a_device_pinning_right_after_the_switch_writes_where_it_pinned() {
    let mm = manager(64 * MIB, 2);
    let vm = mm.create_vm("switch-pin").unwrap();
    let b = mm.backend(vm, &[(GuestAddress(0), 8 * MIB)]).unwrap();
    let view = View::new(mem::GuestMemoryBackend::regions(&*b));
    let pages = 8 * MIB / PAGE_SIZE;
    fill(&view, 0, pages, 9);
    let (tx, rx) = std::sync::mpsc::channel();
    let relocator = {
        let mm = mm.clone();
        std::thread::spawn(move || {
            let r = mm.relocate(
                vm,
                GuestAddress(0),
                RelocateOp::ToAligned,
                &mut |sw| {
                    sw.make_live();
                    view.switch(sw)?;
                    if !sw.undo {
                        // The device's next request, on the new view, in
                        // the pause (as one queued behind the switch).
                        let pin = mm.pin(vm, GuestAddress(3 * MIB + 8), 8).unwrap();
                        view.write(3 * MIB + 8, 0xfeed);
                        drop(pin);
                    }
                    Ok(())
                },
                &|_, _| {},
            );
            tx.send((r.map(|_| ()), view)).unwrap();
        })
    };
    let (r, view) = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("the relocation and the device wait for each other");
    relocator.join().unwrap();
    r.unwrap();
    for p in 0..pages {
        let want = match p == 3 * MIB / PAGE_SIZE {
            true => 0xfeed,
            false => pattern(p, 1, 9),
        };
        assert_eq!(view.read(p * PAGE_SIZE + 8), want, "page {p}");
    }
    settle_and_check(&mm);
}

#[test]
fn merge_and_grow() {
    let (mm, vm, _b, view, pages) = two_regions("merge", 3);
    // Not adjacent / not a region / shrinking: refused, nothing changes.
    assert!(matches!(
        relocate(&mm, vm, &view, 0, RelocateOp::Grow(2 * MIB)),
        Err(RelocateError::BadRequest(_))
    ));
    assert!(matches!(
        relocate(&mm, vm, &view, 0, RelocateOp::Grow(8 * MIB)),
        Err(RelocateError::BadRequest(_))
    ));
    assert!(matches!(
        relocate(&mm, vm, &view, 64 * MIB, RelocateOp::ToAligned),
        Err(RelocateError::NoSuchRegion(_))
    ));
    let rep = relocate(
        &mm,
        vm,
        &view,
        0,
        RelocateOp::MergeWith(GuestAddress(4 * MIB)),
    )
    .unwrap();
    let r = mm.vm_regions(vm).unwrap();
    assert_eq!(r.len(), 1);
    assert_eq!((r[0].guest_base, r[0].size), (GuestAddress(0), 10 * MIB));
    assert_eq!(rep.tables, 5);
    verify(&view, 0, pages, 3, "merged");
    let rep = relocate(&mm, vm, &view, 0, RelocateOp::Grow(12 * MIB)).unwrap();
    assert_eq!(rep.new.unwrap().size, 12 * MIB);
    verify(&view, 0, pages, 3, "grown");
    // The new tail is ordinary memory.
    fill(&view, 10 * MIB, 512, 4);
    verify(&view, 10 * MIB, 512, 4, "tail");
    settle_and_check(&mm);
}

/// Everything at once on one region: vCPU threads write and verify while a
/// relocator, a migrator, a compactor, a reclaimer and a discarder run.
#[test]
fn racing_relocation_migration_compaction_reclaim_and_swapin_keep_every_word() {
    const VCPUS: u64 = 4;
    const PAGES: u64 = 2048; // 8 MiB
    const OPS: u64 = 60_000;
    let mm = swap_manager(6 * MIB, 3, 64 * MIB, false);
    let vm = mm.create_vm("race").unwrap();
    let b = mm
        .backend_with_offset(vm, &[(GuestAddress(0), PAGES * PAGE_SIZE)], 8192)
        .unwrap();
    let view = Arc::new(View::new(mem::GuestMemoryBackend::regions(&*b)));
    let expected: Arc<Vec<AtomicU64>> =
        Arc::new((0..PAGES * VCPUS).map(|_| AtomicU64::new(0)).collect());
    let chunks: Arc<Vec<RwLock<()>>> = Arc::new((0..PAGES / 16).map(|_| RwLock::new(())).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let ops_done = Arc::new(AtomicU64::new(0));
    {
        // Watchdog: a stall dumps the manager's state before the harness
        // times out.
        let (mm, ops_done, stop) = (mm.clone(), ops_done.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut last = 0;
            while !stop.load(SeqCst) {
                std::thread::sleep(std::time::Duration::from_secs(10));
                let now = ops_done.load(SeqCst);
                if now == last && !stop.load(SeqCst) {
                    eprintln!(
                        "STALL at {now} ops: {:#?}\n{:#?}",
                        mm.stats(),
                        mm.vm_stats(vm)
                    );
                }
                last = now;
            }
        });
    }
    let vcpus: Vec<_> = (0..VCPUS)
        .map(|t| {
            let (view, expected, chunks) = (view.clone(), expected.clone(), chunks.clone());
            let ops_done = ops_done.clone();
            std::thread::spawn(move || {
                let mut x = 0x9e37_79b9u64 + t;
                for i in 1..=OPS {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let window = (i / 500 * 97) % (PAGES - 128);
                    let page = window + x % 128;
                    let slot = &expected[(page * VCPUS + t) as usize];
                    let gpa = page * PAGE_SIZE + t * 8;
                    let _c = chunks[(page / 16) as usize].read().unwrap();
                    assert_eq!(
                        view.read(gpa),
                        slot.load(SeqCst),
                        "vcpu {t} page {page} op {i}"
                    );
                    ops_done.fetch_add(1, SeqCst);
                    if x & 1 == 0 {
                        let v = (i << 8) | (t + 1);
                        view.write(gpa, v);
                        slot.store(v, SeqCst);
                    }
                }
            })
        })
        .collect();
    let spawn = |f: Box<dyn Fn(u64) + Send>| spawn_until(&stop, f);
    let relocator = {
        let (mm, view) = (mm.clone(), view.clone());
        spawn(Box::new(move |_| {
            match relocate(&mm, vm, &view, 0, RelocateOp::ToAligned) {
                Ok(_) | Err(RelocateError::Pinned(_)) => {}
                Err(e) => panic!("relocation: {e}"),
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }))
    };
    let migrator = {
        let mm = mm.clone();
        spawn(Box::new(move |n| {
            let off = (n * 64 * PAGE_SIZE) % (PAGES * PAGE_SIZE);
            mm.migrate_range(vm, GuestAddress(off), 64 * PAGE_SIZE)
                .unwrap();
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
    let reclaimer = {
        let mm = mm.clone();
        spawn(Box::new(move |_| {
            mm.reclaim(Some(vm), 256 * 1024).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(1));
        }))
    };
    let discarder = spawn(chunk_discarder(
        &mm,
        vm,
        &expected,
        &chunks,
        VCPUS,
        std::time::Duration::from_millis(3),
    ));
    for v in vcpus {
        v.join().unwrap();
    }
    stop.store(true, SeqCst);
    let counts: Vec<u64> = [relocator, migrator, compactor, reclaimer, discarder]
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    for p in 0..PAGES {
        for t in 0..VCPUS {
            let want = expected[(p * VCPUS + t) as usize].load(SeqCst);
            assert_eq!(view.read(p * PAGE_SIZE + t * 8), want, "page {p} slot {t}");
        }
    }
    let s = mm.stats();
    eprintln!(
        "rounds {counts:?}, MOVE counts corrected {}\n{:#?}\n{:#?}",
        s.move_undercounts, s.migration, s.swap
    );
    assert_no_unbacked(&s);
    assert!(s.migration.relocations >= 3, "{:?}", s.migration);
    assert!(s.migration.migrated > 100);
    assert!(s.swap.swapout_pages > 0 && s.swap.swapin_file_pages > 0);
    settle_and_check(&mm);
}

/// CPU time the calling thread has used.
fn thread_cpu() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_THREAD_CPUTIME_ID
    // needs nothing else.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Run `f` on a new thread, as a device would, and return its outcome
/// with the thread's CPU time and wall time spent in it.
fn timed<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<(T, std::time::Duration, std::time::Duration)> {
    std::thread::spawn(move || {
        let (c0, t0) = (thread_cpu(), std::time::Instant::now());
        let r = f();
        (r, thread_cpu() - c0, t0.elapsed())
    })
}

/// Pin `len` bytes at `gpa` on a new thread ([`timed`]).
fn timed_pin(
    mm: &Arc<MemoryManager>,
    vm: mem::VmId,
    gpa: u64,
    len: u64,
) -> std::thread::JoinHandle<(
    Result<(), mem::PinError>,
    std::time::Duration,
    std::time::Duration,
)> {
    let mm = mm.clone();
    timed(move || mm.pin(vm, GuestAddress(gpa), len).map(drop))
}

/// What a device asks of a page whose table is held back.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Request {
    /// A block request's pin.
    Pin,
    /// A balloon's discard.
    Discard,
    /// A vCPU's access, a fault served by a handler thread.
    Access,
}

/// A device request on a page whose table is still pending in the new
/// region, while another pin holds a page of that table in the source (so
/// its pull fails), neither spins on the pull nor fails: the device thread
/// is the VMM's event loop. A pin sleeps until the other pin drops (it
/// pulls the table itself then); a discard works on the entries where they
/// are, in the source, at once (here it skips the pinned folio's page, and
/// says so). Every page keeps its data.
fn a_request_behind_a_held_back_table(req: Request) {
    let hold = std::time::Duration::from_millis(250);
    // A wait on a pin is no memory stall, however long.
    let mut c = config(64 * MIB, 2);
    c.reclaim.stall_report_after = hold / 4;
    let mm = MemoryManager::new(c).unwrap();
    let vm = mm.create_vm("pin-wait").unwrap();
    let b = mm.backend(vm, &[(GuestAddress(0), 8 * MIB)]).unwrap();
    let view = View::new(mem::GuestMemoryBackend::regions(&*b));
    let pages = 8 * MIB / PAGE_SIZE;
    fill(&view, 0, pages, 11);
    // A device request in flight at the switch, on a page of table 2 of
    // the source.
    let held = std::sync::Mutex::new(Some(mm.pin(vm, GuestAddress(4 * MIB + 8192), 8).unwrap()));
    let waiter = std::sync::Mutex::new(None);
    let target = 4 * MIB + 3 * PAGE_SIZE;
    mm.relocate(
        vm,
        GuestAddress(0),
        RelocateOp::ToAligned,
        &mut |sw| view.switch(sw),
        &|done, _| {
            let Some(pin) = held.lock().unwrap().take() else {
                return;
            };
            assert_eq!(done, 0);
            let holder = drop_after(pin, hold);
            // The next request is on another page of table 2, now in the
            // new region. The relocation thread is busy elsewhere (held
            // here until the request is done, as by a large region's other
            // tables).
            let tries0 = mm.stats().migration.relocate_pulls_blocked;
            let mm2 = mm.clone();
            // The target page as the vCPUs see it now (the new region).
            let (ram, off) = view.ram_now(target);
            let r = timed(move || match req {
                Request::Access => {
                    let (p, w) = (target / PAGE_SIZE, 1);
                    let got = ram.read(off + w * 8);
                    match got == pattern(p, w, 11) {
                        true => Ok(0),
                        false => Err(format!("read {got:#x} at page {p}")),
                    }
                }
                Request::Pin => mm2
                    .pin(vm, GuestAddress(target), 8)
                    .map(|_| 0)
                    .map_err(|e| e.to_string()),
                Request::Discard => mm2
                    .discard(vm, GuestAddress(target), PAGE_SIZE)
                    .map(|o| o.skipped_pinned_pages)
                    .map_err(|e| e.to_string()),
            })
            .join()
            .unwrap();
            holder.join().unwrap();
            let tries = mm.stats().migration.relocate_pulls_blocked - tries0;
            *waiter.lock().unwrap() = Some((r, tries));
        },
    )
    .unwrap();
    let ((r, cpu, wall), tries) = waiter.lock().unwrap().take().expect("pinned");
    eprintln!(
        "{req:?} behind a pinned table: {r:?}, cpu {cpu:?} in {wall:?}, {tries} blocked pulls"
    );
    // The pinned page shares its 2 MiB folio with the target, and a
    // discard leaves a pinned folio's pages in place and says so.
    let skipped = r.unwrap();
    assert_eq!(skipped, u64::from(req == Request::Discard));
    if req != Request::Discard {
        assert!(
            wall >= hold / 2,
            "the request waited for the unpin: {wall:?}"
        );
    }
    // Woken by the unpin (a bounded wait now and then as a safety net):
    // a handful of tries, not one per spin of a loop.
    assert!(tries < 100, "the pull was tried {tries} times in {wall:?}");
    assert_eq!(
        mm.stats().faults.memory_stalls,
        0,
        "a fault waiting {wall:?} for an unpin was reported as a memory stall"
    );
    assert!(
        cpu < hold / 4,
        "the device thread spun: {cpu:?} of CPU in {wall:?}"
    );
    verify(&view, 0, pages, 11, "after");
    settle_and_check(&mm);
}

#[test]
fn a_pin_on_a_table_held_back_by_another_pin_sleeps_until_the_unpin() {
    a_request_behind_a_held_back_table(Request::Pin);
}

#[test]
fn a_discard_on_a_table_held_back_by_a_pin_neither_spins_nor_fails() {
    a_request_behind_a_held_back_table(Request::Discard);
}

/// A vCPU's fault on such a table is parked until the unpin, not retried
/// in bursts: its handler thread and the worker try the pull once each
/// time, and the unpin has the worker try it again at once.
#[test]
fn a_fault_on_a_table_held_back_by_a_pin_waits_for_the_unpin() {
    a_request_behind_a_held_back_table(Request::Access);
}

/// The same during an undo: a device pin holds a page of a table moved to
/// the new range, the undo switches back and waits for the unpin, and the
/// next request pins another page of that table, now pending in the source
/// again. It sleeps until the unpin too, and gets its pin (neither spins
/// nor fails as if the VM were torn down).
#[test]
fn a_pin_during_an_undo_on_a_table_held_back_by_another_pin_sleeps_until_the_unpin() {
    let mm = manager(24 * MIB, 2);
    let vm = mm.create_vm("undo-pin-wait").unwrap();
    let b = mm.backend(vm, &[(GuestAddress(0), 8 * MIB)]).unwrap();
    let view = View::new(mem::GuestMemoryBackend::regions(&*b));
    let pages = 8 * MIB / PAGE_SIZE;
    fill(&view, 0, pages, 12);
    let before = mm.vm_regions(vm).unwrap();
    fail_next_commit(&mm);
    let hold = std::time::Duration::from_millis(250);
    let holder = std::sync::Mutex::new(None);
    let waiter = std::sync::Mutex::new(None);
    let tries0 = mm.stats().migration.relocate_pulls_blocked;
    let e = mm
        .relocate(
            vm,
            GuestAddress(0),
            RelocateOp::ToAligned,
            &mut |sw| {
                if sw.undo {
                    sw.make_live();
                    view.switch(sw)?;
                    // The device's next request, on the old view again.
                    *waiter.lock().unwrap() = Some(timed_pin(&mm, vm, 3 * PAGE_SIZE, 8));
                    return Ok(());
                }
                view.switch(sw)
            },
            &|done, _| {
                let mut h = holder.lock().unwrap();
                if done == 1 && h.is_none() {
                    *h = Some(hold_pin(&mm, vm, 8192, hold));
                }
            },
        )
        .unwrap_err();
    assert!(
        matches!(e, RelocateError::Injected(FaultPoint::RelocateCommit)),
        "{e}"
    );
    holder
        .lock()
        .unwrap()
        .take()
        .expect("pinned")
        .join()
        .unwrap();
    let (r, cpu, wall) = waiter
        .lock()
        .unwrap()
        .take()
        .expect("switched back")
        .join()
        .unwrap();
    let tries = mm.stats().migration.relocate_pulls_blocked - tries0;
    eprintln!("pin during the undo: {r:?}, cpu {cpu:?} in {wall:?}, {tries} blocked pulls");
    r.unwrap();
    assert!(
        tries < 100,
        "the pinning thread tried the pull {tries} times in {wall:?}"
    );
    assert!(
        cpu < wall / 2,
        "the pinning thread spun: {cpu:?} of CPU in {wall:?}"
    );
    assert_eq!(mm.vm_regions(vm).unwrap(), before, "undone");
    verify(&view, 0, pages, 12, "after the undo");
    settle_and_check(&mm);
}

/// Operations by guest address (a balloon's discard, a device's pin) find
/// the VM's RAM whenever a relocation switches regions, forwards or back:
/// the regions' states change at once for them. Before, `regions()` read
/// each region's state in turn, and one that read the source as retired
/// before an undo made it live again, then the new region as retired
/// after, found no region and refused the request as out of range (seen
/// once under `clean_race`).
#[test]
fn requests_by_guest_address_always_find_the_ram_during_switches() {
    let mm = manager(32 * MIB, 2);
    let vm = mm.create_vm("switching").unwrap();
    let b = mm
        .backend_with_offset(vm, &[(GuestAddress(0), 4 * MIB)], 8192)
        .unwrap();
    let view = View::new(mem::GuestMemoryBackend::regions(&*b));
    let stop = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(AtomicU64::new(0));
    let askers: Vec<_> = (0..2u64)
        .map(|k| {
            let (mm, stop, refused) = (mm.clone(), stop.clone(), refused.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(SeqCst) {
                    let gpa = GuestAddress(((n * 7 + k * 3) % 1024) * PAGE_SIZE);
                    if let Err(e) = mm.discard(vm, gpa, PAGE_SIZE) {
                        eprintln!("discard at {:#x}: {e}", gpa.raw());
                        refused.fetch_add(1, SeqCst);
                    }
                    n += 1;
                }
                n
            })
        })
        .collect();
    let t0 = std::time::Instant::now();
    let mut switches = 0;
    while t0.elapsed() < std::time::Duration::from_secs(5) && refused.load(SeqCst) == 0 {
        fail_next_commit(&mm);
        let e = relocate(&mm, vm, &view, 0, RelocateOp::ToAligned).unwrap_err();
        assert!(matches!(e, RelocateError::Injected(_)), "{e}");
        switches += 2;
    }
    stop.store(true, SeqCst);
    let asked: u64 = askers.into_iter().map(|t| t.join().unwrap()).sum();
    eprintln!("{switches} switches, {asked} discards");
    assert_eq!(refused.load(SeqCst), 0, "discards refused during switches");
    settle_and_check(&mm);
}
