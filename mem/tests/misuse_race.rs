//! destroy_vm racing every operation on the same VM.

mod common;

use common::*;
use mem::{GuestAddress, RelocateOp, RelocateSwitch, PAGE_SIZE};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn no_switch(_: &RelocateSwitch) -> Result<(), String> {
    Ok(())
}

#[test]
fn destroy_vm_racing_every_operation_on_it_leaves_the_other_vm_intact() {
    let mm = swap_manager(16 * MIB, 2, 64 * MIB, true);
    let a = TestVm::new(&mm, "a", 4 * MIB);
    a.fill(1);
    let t0 = Instant::now();
    for round in 0..30u64 {
        let b = mm.create_vm("b").unwrap();
        let bb = mm
            .backend_with_offset(b, &[(GuestAddress(0), 6 * MIB)], 64 * 1024)
            .unwrap();
        let ram = Ram::of(&*bb);
        for p in 0..(6 * MIB / PAGE_SIZE) {
            ram.write(p * PAGE_SIZE, pattern(p, 0, round));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for k in 0..6u64 {
            let (mm, stop) = (mm.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                let mut rng = Rng(round * 7 + k + 1);
                while !stop.load(SeqCst) {
                    let gpa = GuestAddress(rng.below(6 * MIB / PAGE_SIZE - 16) * PAGE_SIZE);
                    let ok = match k {
                        0 => mm.reclaim(Some(b), 2 * MIB).is_ok(),
                        1 => mm.compact(Some(b), &|_, _| {}).is_ok(),
                        2 => mm.discard(b, gpa, 16 * PAGE_SIZE).is_ok(),
                        3 => mm.migrate_range(b, gpa, 64 * PAGE_SIZE).is_ok(),
                        4 => {
                            let r = mm.relocate(
                                b,
                                GuestAddress(0),
                                RelocateOp::ToAligned,
                                &mut no_switch,
                                &|_, _| {},
                            );
                            r.is_ok() || !matches!(r, Err(mem::RelocateError::UndoFailed(_)))
                        }
                        _ => match mm.pin(b, gpa, 8 * PAGE_SIZE) {
                            Ok(p) => {
                                drop(p);
                                true
                            }
                            Err(_) => false,
                        },
                    };
                    if !ok && mm.vm_stats(b).is_none() {
                        break;
                    }
                }
            }));
        }
        std::thread::sleep(Duration::from_millis(20 + round % 5 * 10));
        if round % 2 == 0 {
            drop(bb);
            mm.destroy_vm(b).unwrap();
        } else {
            mm.destroy_vm(b).unwrap();
            drop(bb);
        }
        assert_eq!(mm.destroy_vm(b), Err(mem::VmError::NoSuchVm(b)));
        std::thread::sleep(Duration::from_millis(10));
        stop.store(true, SeqCst);
        for t in threads {
            t.join().expect("an operation panicked");
        }
        a.verify(1);
        assert!(t0.elapsed() < Duration::from_secs(240), "round {round}");
    }
    settle_and_check(&mm);
    a.verify(1);
    a.destroy(&mm);
    assert_eq!(mm.stats().free_bytes, mm.stats().budget_bytes);
}
