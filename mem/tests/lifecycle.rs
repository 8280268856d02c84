//! Folio lifecycle across VMs: reuse is zeroed, partial discards split,
//! pins hold memory in place.

mod common;

use common::*;
use mem::{FaultPoint, GuestAddress, InjectPlan, Order, PinError, PAGE_SIZE};
use std::time::Duration;

fn fill(ram: Ram, tag: u64) {
    for off in (0..ram.0.size).step_by(8) {
        ram.write(off, tag ^ off);
    }
}

fn assert_all_zero(ram: Ram) {
    for off in (0..ram.0.size).step_by(8) {
        assert_eq!(ram.read(off), 0, "stale data at {off:#x}");
    }
}

#[test]
fn folio_freed_by_teardown_is_zero_for_the_next_vm() {
    let size = 4 * MIB + 64 * 1024;
    let mm = manager(size, 2);
    let a = mm.create_vm("a").unwrap();
    let ba = mm.backend(a, &[(GuestAddress(0), size)]).unwrap();
    fill(Ram::of(&*ba), 0xdead_beef_0000_0000);
    assert_eq!(mm.stats().free_bytes, 0, "A holds the whole budget");
    drop(ba);
    mm.destroy_vm(a).unwrap();
    let b = mm.create_vm("b").unwrap();
    let bb = mm.backend(b, &[(GuestAddress(0), size)]).unwrap();
    assert_all_zero(Ram::of(&*bb));
    assert_eq!(mm.vm_stats(b).unwrap().resident_bytes(), size);
    drop(bb);
    mm.destroy_vm(b).unwrap();
    settle_and_check(&mm);
}

#[test]
fn folio_discarded_by_one_vm_is_zero_for_another() {
    let mm = manager(4 * MIB, 2);
    let a = mm.create_vm("a").unwrap();
    let b = mm.create_vm("b").unwrap();
    let ba = mm.backend(a, &[(GuestAddress(0), 4 * MIB)]).unwrap();
    let bb = mm.backend(b, &[(GuestAddress(0), 4 * MIB)]).unwrap();
    fill(Ram::of(&*ba), 0x1234_5678_0000_0000);
    // Pages go back to the pool with A's data; the worker must zero them.
    let out = mm.discard(a, GuestAddress(0), 4 * MIB).unwrap();
    assert_eq!(out.discarded_pages, 1024);
    assert_all_zero(Ram::of(&*bb));
    assert_eq!(mm.vm_stats(a).unwrap().resident_bytes(), 0);
    assert_eq!(mm.vm_stats(b).unwrap().resident_bytes(), 4 * MIB);
    drop((ba, bb));
    mm.destroy_vm(a).unwrap();
    mm.destroy_vm(b).unwrap();
    settle_and_check(&mm);
}

#[test]
fn partial_discard_of_a_large_folio_splits_it_and_frees_the_hole() {
    let mm = manager(4 * MIB, 1);
    let vm = mm.create_vm("p").unwrap();
    let b = mm.backend(vm, &[(GuestAddress(0), 4 * MIB)]).unwrap();
    let ram = Ram::of(&*b);
    fill(ram, 0x77);
    assert_eq!(mm.stats().folios_by_order[9], 2);
    // Discard pages 5 and 256..258 of the first 2 MiB folio.
    let o1 = mm
        .discard(vm, GuestAddress(5 * PAGE_SIZE), PAGE_SIZE)
        .unwrap();
    let o2 = mm
        .discard(vm, GuestAddress(256 * PAGE_SIZE), 2 * PAGE_SIZE)
        .unwrap();
    // The second discard hits the same folio, or, if the worker split it in
    // between, the order-8 piece holding pages 256..512.
    assert_eq!(o1.partial_folios, 1);
    assert_eq!(o1.discarded_pages + o2.discarded_pages, 3);
    settle_and_check(&mm);
    let s = mm.stats();
    assert_eq!(s.folios_split, 1 + o2.partial_folios);
    assert_eq!(s.split_freed_pages, 3);
    assert_eq!(s.free_bytes, 3 * PAGE_SIZE);
    assert_eq!(s.folios_by_order[9], 1);
    let vs = mm.vm_stats(vm).unwrap();
    assert_eq!(vs.resident_bytes(), 4 * MIB - 3 * PAGE_SIZE);
    // The split is canonical: maximal aligned pieces, 128..256 and 384..512 of order 7.
    assert_eq!(vs.resident_bytes_by_order[9], 2 * MIB);
    assert_eq!(
        vs.resident_bytes_by_order[Order(7).index()],
        2 * 128 * PAGE_SIZE
    );
    // Surviving pages keep their data; discarded ones read zero.
    for p in 0..512u64 {
        let want = if p == 5 || p == 256 || p == 257 {
            0
        } else {
            0x77 ^ (p * PAGE_SIZE)
        };
        assert_eq!(ram.read(p * PAGE_SIZE), want, "page {p}");
    }
    assert_eq!(mm.vm_stats(vm).unwrap().resident_bytes(), 4 * MIB);
    drop(b);
    mm.destroy_vm(vm).unwrap();
    settle_and_check(&mm);
}

#[test]
fn pin_populates_without_faults_and_blocks_discard() {
    let mm = manager(4 * MIB, 1);
    let vm = mm.create_vm("pin").unwrap();
    let b = mm
        .backend(vm, &[(GuestAddress(0x10_0000), 4 * MIB)])
        .unwrap();
    let ram = Ram::of(&*b);
    let gpa = GuestAddress(0x10_0000 + 3 * PAGE_SIZE + 100);
    let pin = mm.pin(vm, gpa, 2 * PAGE_SIZE).unwrap();
    assert_eq!(
        mm.vm_stats(vm).unwrap().faults.events,
        0,
        "pin faults in from its own thread"
    );
    assert_eq!(mm.vm_stats(vm).unwrap().pinned_pages, 3);
    pin.write_at(0, b"virtio");
    assert_eq!(ram.read(3 * PAGE_SIZE + 96).to_le_bytes()[4..], *b"virt");
    let mut buf = [0u8; 6];
    pin.read_at(0, &mut buf);
    assert_eq!(&buf, b"virtio");
    let out = mm.discard(vm, GuestAddress(0x10_0000), 2 * MIB).unwrap();
    assert_eq!(out.skipped_pinned_pages, 512, "the pinned folio stays");
    assert_eq!(ram.read(3 * PAGE_SIZE + 96).to_le_bytes()[4..], *b"virt");
    drop(pin);
    assert_eq!(mm.vm_stats(vm).unwrap().pinned_pages, 0);
    let out = mm.discard(vm, GuestAddress(0x10_0000), 2 * MIB).unwrap();
    assert_eq!(out.discarded_pages, 512);
    assert_eq!(ram.read(3 * PAGE_SIZE + 96), 0);
    assert_eq!(
        mm.pin(vm, GuestAddress(0x10_0000 + 4 * MIB - 8), 16)
            .unwrap_err(),
        PinError::OutOfRange {
            gpa: 0x10_0000 + 4 * MIB - 8,
            len: 16
        }
    );
    drop(b);
    mm.destroy_vm(vm).unwrap();
    settle_and_check(&mm);
}

/// A pin's copies refuse an offset whose end wraps past `u64::MAX`: the
/// bounds check once added them unchecked, so in a release build
/// `write_at(u64::MAX, ..)` passed it and wrote the byte before the pin.
#[test]
fn pin_copies_refuse_offsets_that_wrap() {
    let mm = manager(4 * MIB, 1);
    let vm = mm.create_vm("pin-wrap").unwrap();
    let b = mm.backend(vm, &[(GuestAddress(0), 4 * MIB)]).unwrap();
    let ram = Ram::of(&*b);
    ram.write(PAGE_SIZE - 8, 0x1122_3344_5566_7788);
    let pin = mm.pin(vm, GuestAddress(PAGE_SIZE), 16).unwrap();
    let write = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        pin.write_at(u64::MAX, &[0xff]);
    }));
    assert!(write.is_err(), "a write at u64::MAX must panic");
    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        pin.read_at(u64::MAX - 1, &mut [0u8; 4]);
    }));
    assert!(read.is_err(), "a read wrapping past u64::MAX must panic");
    assert_eq!(ram.read(PAGE_SIZE - 8), 0x1122_3344_5566_7788);
    drop(pin);
    drop(b);
    mm.destroy_vm(vm).unwrap();
    settle_and_check(&mm);
}

/// The split scan cannot split a pinned folio and drops it from its queue;
/// the last unpin queues it again. Without that, a partly discarded 2 MiB
/// folio pinned at the wrong moment kept its discarded pages for good.
#[test]
fn a_partial_folio_pinned_during_the_split_scan_is_split_after_the_unpin() {
    let mm = manager(64 * MIB, 2);
    let vm = mm.create_vm("p").unwrap();
    let b = mm.backend(vm, &[(GuestAddress(0), 2 * MIB)]).unwrap();
    let ram = Ram::of(&*b);
    fill(ram, 0x5a);
    let order9 = |mm: &mem::MemoryManager| mm.vm_stats(vm).unwrap().resident_bytes_by_order[9];
    assert_eq!(order9(&mm), 2 * MIB, "one 2 MiB folio");
    // Hold the split off until the pin is in place.
    mm.inject_faults(vec![InjectPlan {
        point: FaultPoint::SplitDefer,
        skip: 0,
        count: u32::MAX,
    }]);
    mm.discard(vm, GuestAddress(0), 16 * PAGE_SIZE).unwrap();
    let pin = mm
        .pin(vm, GuestAddress(100 * PAGE_SIZE), PAGE_SIZE)
        .unwrap();
    mm.inject_faults(vec![]);
    assert!(mm.wait_idle(Duration::from_secs(10)));
    assert_eq!(order9(&mm), 2 * MIB - 16 * PAGE_SIZE, "pinned: not split");
    drop(pin);
    assert!(mm.wait_idle(Duration::from_secs(10)));
    assert_eq!(order9(&mm), 0, "split once unpinned");
    assert_eq!(
        mm.vm_stats(vm).unwrap().resident_bytes(),
        2 * MIB - 16 * PAGE_SIZE
    );
    for p in 0..512u64 {
        let want = if p < 16 { 0 } else { 0x5a ^ (p * PAGE_SIZE) };
        assert_eq!(ram.read(p * PAGE_SIZE), want, "page {p}");
    }
    drop(b);
    mm.destroy_vm(vm).unwrap();
    settle_and_check(&mm);
}

/// A pin that fails part-way (here: no memory for its second page, no
/// swap) leaves the VM's pinned-page count as it was.
#[test]
fn a_pin_that_fails_part_way_leaves_the_pinned_count_right() {
    let mm = manager(4 * MIB, 1);
    let vm = mm.create_vm("q").unwrap();
    let b = mm.backend(vm, &[(GuestAddress(0), 8 * MIB)]).unwrap();
    let ram = Ram::of(&*b);
    for p in 0..1024 {
        ram.write(p * PAGE_SIZE, p + 1);
    }
    assert!(mm.wait_idle(Duration::from_secs(10)));
    let r = mm.pin(vm, GuestAddress(1023 * PAGE_SIZE), 2 * PAGE_SIZE);
    assert_eq!(r.err(), Some(PinError::NoMemory));
    assert_eq!(mm.vm_stats(vm).unwrap().pinned_pages, 0);
    let pin = mm.pin(vm, GuestAddress(0), 2 * PAGE_SIZE).unwrap();
    assert_eq!(mm.vm_stats(vm).unwrap().pinned_pages, 2);
    drop(pin);
    assert_eq!(mm.vm_stats(vm).unwrap().pinned_pages, 0);
    drop(b);
    mm.destroy_vm(vm).unwrap();
    settle_and_check(&mm);
}
