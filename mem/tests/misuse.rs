//! Misuse of the public API: every bad request is refused with an error
//! naming it, and leaves the manager as it was.

mod common;

use common::*;
use mem::{
    BackendError, FaultPlan, GuestAddress, ImpossibleFaultPlan, InjectedFault, IoOp, ReclaimError,
    RelocateError, RelocateOp, RelocateSwitch, VmError, VmLimits, PAGE_SIZE,
};

#[test]
fn a_backend_whose_mapping_fails_leaves_the_vm_able_to_get_one() {
    let mm = manager(4 * MIB, 1);
    let vm = mm.create_vm("a").unwrap();
    // Valid as a layout (no wrap), far too large to map.
    let e = mm.backend(vm, &[(GuestAddress(0), 1 << 60)]).unwrap_err();
    assert!(matches!(e, BackendError::Mmap(_)), "{e:?}");
    let b = mm
        .backend(vm, &[(GuestAddress(0), 4 * MIB)])
        .expect("a second, valid backend request");
    let ram = Ram::of(&*b);
    ram.write(0, 7);
    assert_eq!(ram.read(0), 7);
    drop(b);
    mm.destroy_vm(vm).unwrap();
    settle_and_check(&mm);
}

#[test]
fn a_swap_fault_plan_that_cannot_happen_is_refused_not_a_panic() {
    let mm = swap_manager(4 * MIB, 1, 8 * MIB, false);
    let plan = FaultPlan {
        op: IoOp::Write,
        fault: InjectedFault::Corrupt,
        skip: 0,
        count: 1,
    };
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        mm.inject_swap_faults(vec![plan])
    }));
    let r = r.expect("inject_swap_faults panicked");
    assert_eq!(
        r,
        Err(ReclaimError::BadFaultPlan(ImpossibleFaultPlan(plan)))
    );
}

fn no_switch(_: &RelocateSwitch) -> Result<(), String> {
    Ok(())
}

#[test]
fn growing_a_region_past_the_top_of_the_guest_address_space_is_refused() {
    let mm = manager(8 * MIB, 1);
    let vm = mm.create_vm("top").unwrap();
    let top = 0u64.wrapping_sub(8 * MIB);
    let b = mm
        .backend(
            vm,
            &[(GuestAddress(0), 2 * MIB), (GuestAddress(top), 4 * MIB)],
        )
        .unwrap();
    let before = mm.vm_regions(vm).unwrap();
    // It would end 4 KiB past u64::MAX, wrapping onto the region at 0.
    let e = mm
        .relocate(
            vm,
            GuestAddress(top),
            RelocateOp::Grow(8 * MIB + PAGE_SIZE),
            &mut no_switch,
            &|_, _| {},
        )
        .unwrap_err();
    assert!(matches!(e, RelocateError::BadRequest(_)), "{e:?}");
    assert_eq!(mm.vm_regions(vm).unwrap(), before);
    drop(b);
    mm.destroy_vm(vm).unwrap();
    settle_and_check(&mm);
}

#[test]
fn a_huge_minimum_cannot_wrap_past_the_budget_check() {
    let mm = manager(8 * MIB, 1);
    let a = mm.create_vm("a").unwrap();
    let b = mm.create_vm("b").unwrap();
    let min = |min_bytes| VmLimits {
        min_bytes,
        ..VmLimits::default()
    };
    mm.set_vm_limits(a, min(MIB)).unwrap();
    let e = mm.set_vm_limits(b, min(u64::MAX)).unwrap_err();
    assert!(matches!(e, VmError::MinimumsAboveBudget { .. }), "{e:?}");
    assert_eq!(mm.vm_stats(b).unwrap().limits, VmLimits::default());
}

#[test]
fn a_minimum_above_the_maximum_is_refused() {
    let mm = manager(8 * MIB, 1);
    let a = mm.create_vm("a").unwrap();
    let l = VmLimits {
        min_bytes: 4 * MIB,
        max_bytes: Some(2 * MIB),
        priority: 0,
    };
    let e = mm.set_vm_limits(a, l);
    assert_eq!(
        e,
        Err(VmError::MinAboveMax {
            min: 4 * MIB,
            max: 2 * MIB
        })
    );
    assert_eq!(mm.vm_stats(a).unwrap().limits, VmLimits::default());
}

#[test]
fn the_largest_maximum_reads_back_as_set() {
    let mm = manager(8 * MIB, 1);
    let a = mm.create_vm("a").unwrap();
    let l = VmLimits {
        min_bytes: 0,
        max_bytes: Some(u64::MAX),
        priority: 0,
    };
    mm.set_vm_limits(a, l).unwrap();
    assert_eq!(mm.vm_stats(a).unwrap().limits, l);
}

#[test]
fn a_bad_host_offset_is_named_as_such() {
    let mm = manager(4 * MIB, 1);
    let vm = mm.create_vm("a").unwrap();
    let layout = [(GuestAddress(0), 4 * MIB)];
    for off in [1, PAGE_SIZE + 1, 2 * MIB, u64::MAX] {
        let e = mm.backend_with_offset(vm, &layout, off).unwrap_err();
        assert!(
            matches!(e, BackendError::BadHostOffset(o) if o == off),
            "{e:?}"
        );
    }
    // The VM still gets its memory.
    let b = mm.backend_with_offset(vm, &layout, PAGE_SIZE).unwrap();
    drop(b);
    mm.destroy_vm(vm).unwrap();
    settle_and_check(&mm);
}

#[test]
fn migrate_range_refuses_a_range_outside_the_vm_and_covers_an_unaligned_one() {
    let mm = manager(4 * MIB, 1);
    let vm = mm.create_vm("m").unwrap();
    let b = mm.backend(vm, &[(GuestAddress(0), 4 * MIB)]).unwrap();
    let ram = Ram::of(&*b);
    for (gpa, len) in [
        (4 * MIB, PAGE_SIZE),
        (0, 0),
        (4 * MIB - PAGE_SIZE, 2 * PAGE_SIZE),
    ] {
        assert_eq!(
            mm.migrate_range(vm, GuestAddress(gpa), len),
            Err(VmError::OutOfRange { gpa, len })
        );
    }
    // Page 0 alone in an order-0 folio, page 1 empty, pages 2..4 an
    // order-1 folio: what splitting a 2 MiB folio around page 1 leaves.
    for p in 0..512 {
        ram.write(p * PAGE_SIZE, pattern(p, 0, 1));
    }
    mm.discard(vm, GuestAddress(PAGE_SIZE), PAGE_SIZE).unwrap();
    settle_and_check(&mm);
    // Bytes 100..100 + 8 KiB touch pages 0, 1 and 2: two folios.
    assert_eq!(
        mm.migrate_range(vm, GuestAddress(100), 2 * PAGE_SIZE),
        Ok((2, 0))
    );
    for p in (0..512).filter(|&p| p != 1) {
        assert_eq!(ram.read(p * PAGE_SIZE), pattern(p, 0, 1), "page {p}");
    }
    drop(b);
    mm.destroy_vm(vm).unwrap();
    settle_and_check(&mm);
}

#[test]
fn an_empty_layout_is_refused_and_the_vm_may_ask_again() {
    let mm = manager(4 * MIB, 1);
    let vm = mm.create_vm("a").unwrap();
    let e = mm.backend(vm, &[]).unwrap_err();
    assert!(matches!(e, BackendError::NoRegions(v) if v == vm), "{e:?}");
    let b = mm.backend(vm, &[(GuestAddress(0), 2 * MIB)]).unwrap();
    drop(b);
    mm.destroy_vm(vm).unwrap();
    settle_and_check(&mm);
}

/// Too many handler threads are refused at once, not started one by one
/// until the host refuses one.
#[test]
fn a_handler_thread_count_beyond_the_limit_is_refused() {
    let mut c = config(4 * MIB, mem::MAX_HANDLER_THREADS + 1);
    let t = std::time::Instant::now();
    let Err(e) = mem::MemoryManager::new(c.clone()) else {
        panic!("4097 handler threads were started");
    };
    assert!(e.to_string().contains("handler threads"), "{e}");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        t.elapsed()
    );
    c.handler_threads = 2;
    assert!(mem::MemoryManager::new(c).is_ok());
}
