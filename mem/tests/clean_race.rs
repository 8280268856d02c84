//! Clean-kept folios (read swapins, write-protected, owning their slot)
//! racing migration, compaction, relocation, reclaim and kept swap-cache
//! folios, with injected failures of migration and relocation steps: every
//! word a vCPU wrote must read back, including after a clean folio was
//! dropped to its slot without a write.

mod common;

use common::*;
use mem::{FaultPoint, GuestAddress, InjectPlan, RelocateError, RelocateOp, PAGE_SIZE};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, RwLock};

#[test]
fn clean_folios_racing_migration_relocation_reclaim_and_injected_failures_keep_every_word() {
    race(mem::FaultDelivery::Handlers);
}

#[test]
fn clean_folios_racing_when_faulters_serve_themselves() {
    race(mem::FaultDelivery::Faulter);
}

fn race(delivery: mem::FaultDelivery) {
    const VCPUS: u64 = 3;
    const PAGES: u64 = 1024; // 4 MiB
    const OPS: u64 = 40_000;
    let mm = swap_manager_with(3 * MIB, 2, 64 * MIB, false, delivery);
    let vm = mm.create_vm("clean-race").unwrap();
    let b = mm
        .backend_with_offset(vm, &[(GuestAddress(0), PAGES * PAGE_SIZE)], 8192)
        .unwrap();
    let view = Arc::new(View::new(mem::GuestMemoryBackend::regions(&*b)));
    let expected: Arc<Vec<AtomicU64>> =
        Arc::new((0..PAGES * VCPUS).map(|_| AtomicU64::new(0)).collect());
    // Every word written once, then everything swapped out: the reads
    // below swap pages in one by one, kept clean.
    for p in 0..PAGES {
        for t in 0..VCPUS {
            let v = pattern(p, t, 1);
            view.write(p * PAGE_SIZE + t * 8, v);
            expected[(p * VCPUS + t) as usize].store(v, SeqCst);
        }
    }
    mm.reclaim(Some(vm), PAGES * PAGE_SIZE).unwrap();
    let chunks: Arc<Vec<RwLock<()>>> = Arc::new((0..PAGES / 16).map(|_| RwLock::new(())).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let vcpus: Vec<_> = (0..VCPUS)
        .map(|t| {
            let (view, expected, chunks) = (view.clone(), expected.clone(), chunks.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(0x9e37_79b9 + t);
                for i in 1..=OPS {
                    let window = (i / 400 * 131) % (PAGES - 256);
                    let page = window + rng.below(256);
                    let slot = &expected[(page * VCPUS + t) as usize];
                    let gpa = page * PAGE_SIZE + t * 8;
                    let _c = chunks[(page / 16) as usize].read().unwrap();
                    assert_eq!(
                        view.read(gpa),
                        slot.load(SeqCst),
                        "vcpu {t} page {page} op {i}"
                    );
                    if rng.below(8) == 0 {
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
            let r = mm.relocate(
                vm,
                GuestAddress(0),
                RelocateOp::ToAligned,
                &mut |sw| view.switch(sw),
                &|_, _| {},
            );
            match r {
                Ok(_) | Err(RelocateError::Pinned(_)) | Err(RelocateError::Injected(_)) => {}
                Err(e) => panic!("relocation: {e}"),
            }
            std::thread::sleep(std::time::Duration::from_millis(7));
        }))
    };
    let migrator = {
        let mm = mm.clone();
        spawn(Box::new(move |n| {
            let off = (n * 13 * PAGE_SIZE) % ((PAGES - 32) * PAGE_SIZE);
            // `OutOfRange` while a relocation switches regions.
            let _ = mm.migrate_range(vm, GuestAddress(off), 32 * PAGE_SIZE);
        }))
    };
    let compactor = {
        let mm = mm.clone();
        spawn(Box::new(move |_| {
            mm.compact(Some(vm), &|_, _| {}).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(3));
        }))
    };
    let reclaimer = {
        let mm = mm.clone();
        spawn(Box::new(move |_| {
            mm.reclaim(Some(vm), 128 * 1024).unwrap();
        }))
    };
    let discarder = spawn(chunk_discarder(
        &mm,
        vm,
        &expected,
        &chunks,
        VCPUS,
        std::time::Duration::from_millis(20),
    ));
    let pinner = {
        let (mm, expected, chunks) = (mm.clone(), expected.clone(), chunks.clone());
        spawn(Box::new(move |n| {
            // A device writing slot 0 of a page through a pin, as the
            // vCPU owning slot 0 would (under the chunk's write lock).
            let p = (n * 53) % PAGES;
            let _g = chunks[(p / 16) as usize].write().unwrap();
            if let Ok(pin) = mm.pin(vm, GuestAddress(p * PAGE_SIZE), 8) {
                let v = (n << 8) | 0xff;
                pin.write_at(0, &v.to_ne_bytes());
                expected[(p * VCPUS) as usize].store(v, SeqCst);
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }))
    };
    let injector = {
        let mm = mm.clone();
        spawn(Box::new(move |n| {
            let plan = |point, skip, count| InjectPlan { point, skip, count };
            mm.inject_faults(vec![
                plan(FaultPoint::SwapKeepCache, 0, 4),
                plan(FaultPoint::MigrateCopy, (n % 5) as u32, 1),
                plan(FaultPoint::MigrateRemap, (n % 7) as u32, 1),
                plan(FaultPoint::MigrateUnmap, (n % 3) as u32, 1),
                plan(FaultPoint::RelocateMove, (n % 4) as u32, 1),
                plan(FaultPoint::RelocateCommit, 3, 1),
            ]);
            std::thread::sleep(std::time::Duration::from_millis(5));
        }))
    };
    for v in vcpus {
        v.join().unwrap();
    }
    stop.store(true, SeqCst);
    let counts: Vec<u64> = [
        relocator, migrator, compactor, reclaimer, injector, discarder, pinner,
    ]
    .into_iter()
    .map(|h| h.join().unwrap())
    .collect();
    mm.inject_faults(vec![]);
    for p in 0..PAGES {
        for t in 0..VCPUS {
            let want = expected[(p * VCPUS + t) as usize].load(SeqCst);
            assert_eq!(view.read(p * PAGE_SIZE + t * 8), want, "page {p} slot {t}");
        }
    }
    let s = mm.stats();
    let sw = mm.vm_stats(vm).unwrap().swap;
    eprintln!(
        "rounds {counts:?}\n{:#?}\nkept clean {} dirtied {} dropped clean {} swapcache migrated {}",
        s.migration,
        sw.clean_kept_pages,
        sw.clean_dirtied_pages,
        sw.clean_dropped_pages,
        s.migration.migrated_swapcache
    );
    assert_no_unbacked(&s);
    // Reclaim everything and read it back once more (clean pages come
    // back from their slots).
    mm.reclaim(Some(vm), PAGES * PAGE_SIZE).unwrap();
    for p in 0..PAGES {
        for t in 0..VCPUS {
            let want = expected[(p * VCPUS + t) as usize].load(SeqCst);
            assert_eq!(
                view.read(p * PAGE_SIZE + t * 8),
                want,
                "final page {p} slot {t}"
            );
        }
    }
    settle_and_check(&mm);
}
