//! Fault service without KVM: host threads touch uffd-registered guest RAM.

mod common;

use common::*;
use mem::{DebugUnmap, GuestAddress, Order, PAGE_SIZE};
use std::time::Duration;

#[test]
fn first_touch_reads_zero_and_keeps_writes() {
    let mm = manager(8 * MIB, 2);
    let vm = mm.create_vm("vm0").unwrap();
    let b = mm
        .backend(vm, &[(GuestAddress(0), 6 * MIB + 12 * 1024)])
        .unwrap();
    let ram = Ram::of(&*b);
    let size = ram.0.size;
    for off in (0..size).step_by(PAGE_SIZE as usize) {
        assert_eq!(ram.read(off), 0, "fresh page at {off:#x} not zero");
        ram.write(off + 8, off ^ 0x5a5a);
    }
    for off in (0..size).step_by(PAGE_SIZE as usize) {
        assert_eq!(ram.read(off + 8), off ^ 0x5a5a);
    }
    let s = mm.vm_stats(vm).unwrap();
    assert_eq!(s.resident_bytes(), size, "{s:#?}");
    // Three 2 MiB folios, then the 12 KiB tail as order 1 + order 0.
    assert_eq!(s.resident_bytes_by_order[Order::PMD.index()], 6 * MIB);
    assert_eq!(s.faults.installed_by_order[9], 3);
    assert_eq!(
        s.faults.installed_by_order[1] + s.faults.installed_by_order[0],
        2
    );
    assert_eq!(
        s.faults.fallback_copy_pages + s.faults.fallback_zeropage_pages,
        0
    );
    let ms = mm.stats();
    assert!(ms.metadata_bytes_per_guest_page() < 8.0, "{ms:?}");
    drop(b);
    mm.destroy_vm(vm).unwrap();
    settle_and_check(&mm);
    assert_eq!(mm.stats().free_bytes, 8 * MIB);
}

#[test]
fn aligned_2m_first_touch_is_pmd_mapped() {
    let mm = manager(4 * MIB, 1);
    assert!(mm.wait_idle(Duration::from_secs(30)));
    let vm = mm.create_vm("thp").unwrap();
    let b = mm.backend(vm, &[(GuestAddress(0), 4 * MIB)]).unwrap();
    let ram = Ram::of(&*b);
    assert_eq!(anon_huge_kb(ram.0.host_addr.raw()), 0);
    ram.write(4096, 1);
    ram.write(2 * MIB + 8, 2);
    let huge = anon_huge_kb(ram.0.host_addr.raw());
    assert_eq!(
        huge, 4096,
        "both 2 MiB folios should be PMD-mapped, AnonHugePages={huge} kB"
    );
    assert_eq!(mm.vm_stats(vm).unwrap().faults.installed_by_order[9], 2);
    drop(b);
    mm.destroy_vm(vm).unwrap();
    settle_and_check(&mm);
}

#[test]
fn exhausted_pool_parks_the_fault_until_memory_is_discarded() {
    let mm = manager(2 * MIB, 1);
    let vm = mm.create_vm("tight").unwrap();
    let b = mm.backend(vm, &[(GuestAddress(0), 4 * MIB)]).unwrap();
    let ram = Ram::of(&*b);
    ram.write(0, 7);
    assert_eq!(mm.stats().free_bytes, 0);
    let t = std::thread::spawn(move || {
        ram.write(3 * MIB, 9);
        ram.read(3 * MIB)
    });
    std::thread::sleep(Duration::from_millis(200));
    assert!(!t.is_finished(), "a fault beyond the budget must wait");
    assert!(mm.vm_stats(vm).unwrap().faults.parked_oom >= 1);
    mm.discard(vm, GuestAddress(0), 2 * MIB).unwrap();
    assert_eq!(t.join().unwrap(), 9);
    // The parked fault took the whole freed 2 MiB; give it back, then the
    // discarded page faults in again as zero.
    mm.discard(vm, GuestAddress(2 * MIB), 2 * MIB).unwrap();
    assert_eq!(ram.read(0), 0, "discarded memory reads as zero");
    drop(b);
    mm.destroy_vm(vm).unwrap();
    settle_and_check(&mm);
}

/// A fault parked longer than `stall_report_after` is reported once as a
/// memory stall (per VM and host-wide), keeps waiting rather than failing,
/// and proceeds when memory is freed; its latency counts the wait.
#[test]
fn a_fault_that_waits_long_for_memory_is_reported_once_as_a_stall() {
    let after = Duration::from_millis(300);
    let mut c = config(2 * MIB, 1);
    c.reclaim.stall_report_after = after;
    let mm = mem::MemoryManager::new(c).unwrap();
    let vm = mm.create_vm("stalled").unwrap();
    let b = mm.backend(vm, &[(GuestAddress(0), 4 * MIB)]).unwrap();
    let ram = Ram::of(&*b);
    ram.write(0, 7);
    let stalls = || {
        let (v, h) = (mm.vm_stats(vm).unwrap(), mm.stats());
        (v.faults.memory_stalls, h.faults.memory_stalls)
    };
    assert_eq!(stalls(), (0, 0));
    let t = std::thread::spawn(move || {
        ram.write(3 * MIB, 9);
        ram.read(3 * MIB)
    });
    assert!(
        wait_until(Duration::from_secs(10), || stalls() != (0, 0)),
        "no stall reported"
    );
    assert_eq!(stalls(), (1, 1));
    // Reported once per stall, however long it lasts.
    std::thread::sleep(after * 2);
    assert_eq!(stalls(), (1, 1));
    assert!(!t.is_finished(), "a stalled fault waits, it does not fail");
    mm.discard(vm, GuestAddress(0), 2 * MIB).unwrap();
    assert_eq!(t.join().unwrap(), 9);
    // The install wakes the thread before the handler records the latency.
    assert!(mm.wait_idle(Duration::from_secs(10)));
    let lat = mm.vm_stats(vm).unwrap().faults.latency;
    // Buckets are powers of two of ns: 2^28 ns is 268 ms.
    assert!(
        lat.buckets.iter().skip(28).sum::<u64>() >= 1,
        "the parked fault's latency counts its wait: {lat:?}"
    );
    assert_eq!(stalls(), (1, 1));
    drop(b);
    mm.destroy_vm(vm).unwrap();
    settle_and_check(&mm);
}

/// An entry `Present` whose host page is gone (seen under `swap_race`, cause
/// unknown) is repaired by the next fault on it: from its folio's pool page
/// when the data is there, or by poisoning the page, never by serving
/// zeros.
#[test]
fn a_present_entry_without_its_host_page_is_restored_or_poisoned() {
    let mm = manager(4 * MIB, 2);
    let vm = mm.create_vm("unbacked").unwrap();
    let b = mm.backend(vm, &[(GuestAddress(0), 4 * MIB)]).unwrap();
    let ram = Ram::of(&*b);
    let word = |p: u64| 0xab_0000 + p;
    for p in 0..32 {
        ram.write(p * PAGE_SIZE + 8, word(p));
    }
    let counts = || {
        let f = mm.vm_stats(vm).unwrap().faults;
        (f.unbacked_restored, f.unbacked_poisoned)
    };
    // Page 3's data goes to its folio's pool page behind its entry's back.
    assert!(mm
        .debug_unmap_behind_entry(vm, GuestAddress(3 * PAGE_SIZE), DebugUnmap::IntoPool)
        .unwrap());
    assert_eq!(
        ram.read(3 * PAGE_SIZE + 8),
        word(3),
        "restored from the pool"
    );
    assert_eq!(counts(), (1, 0));
    // Page 5's data is dropped: the page is poisoned, not served as zero.
    assert!(mm
        .debug_unmap_behind_entry(vm, GuestAddress(5 * PAGE_SIZE), DebugUnmap::Drop)
        .unwrap());
    let r = read_via_gup(ram.0.host_addr.raw() + 5 * PAGE_SIZE as usize + 8);
    assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EFAULT));
    assert_eq!(counts(), (1, 1));
    for p in (0..32).filter(|&p| p != 5) {
        assert_eq!(ram.read(p * PAGE_SIZE + 8), word(p), "page {p}");
    }
    // A discard clears the poison; the page is usable again.
    mm.discard(vm, GuestAddress(5 * PAGE_SIZE), PAGE_SIZE)
        .unwrap();
    assert_eq!(ram.read(5 * PAGE_SIZE + 8), 0);
    drop(b);
    mm.destroy_vm(vm).unwrap();
    settle_and_check(&mm);
}
