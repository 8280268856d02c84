//! The host budget at run time: lowering it takes memory offline (after
//! reclaim when needed), raising it gives it back, and refused changes
//! change nothing.

mod common;

use common::*;
use mem::{BudgetError, GuestAddress, VmLimits, PAGE_SIZE};

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
    let vm = mm.create_vm("a").unwrap();
    mm.set_vm_limits(
        vm,
        VmLimits {
            min_bytes: 4 * MIB,
            max_bytes: None,
            priority: 0,
        },
    )
    .unwrap();
    let b = mm.backend(vm, &[(GuestAddress(0), 16 * MIB)]).unwrap();
    let ram = Ram::of(&*b);
    fill(ram, 16 * MIB, 1);

    assert_eq!(
        mm.set_budget(2 * MIB),
        Err(BudgetError::BelowMinimums {
            requested: 2 * MIB,
            needed: 4 * MIB
        })
    );
    assert_eq!(mm.budget_bytes(), 16 * MIB);
    assert!(mm.wait_idle(std::time::Duration::from_secs(30)));
    let free_before = mm.stats().free_bytes;
    let c = mm.set_budget(8 * MIB).unwrap();
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
    drop(b);
    mm.destroy_vm(vm).unwrap();
    settle_and_check(&mm);
}
