//! Fault injection into the swap file's I/O: a failed or corrupt swapin
//! never maps wrong data (the page is poisoned and reads fail), a short read
//! is completed, and a failed or impossible swap-out maps the folio back.

mod common;

use common::*;
use mem::{
    DebugUnmap, FaultPlan, GuestAddress, InjectedFault, IoOp, MemoryManager, VmId, PAGE_SIZE,
};
use std::sync::Arc;

const GUEST: u64 = 8 * MIB;

/// A VM with `GUEST` bytes written with `pattern(.., 0)` and then wholly
/// reclaimed (swapped out), and its RAM.
fn swapped_vm(mm: &Arc<MemoryManager>) -> (VmId, Arc<mem::FolioBackend>, Ram) {
    let vm = mm.create_vm("faults").unwrap();
    let b = mm.backend(vm, &[(GuestAddress(0), GUEST)]).unwrap();
    let ram = Ram::of(&*b);
    for p in 0..GUEST / PAGE_SIZE {
        ram.write(p * PAGE_SIZE, pattern(p, 0, 0));
    }
    // Twice: the first pass samples, the second evicts.
    for _ in 0..4 {
        mm.reclaim(Some(vm), GUEST).unwrap();
    }
    assert!(mm.vm_stats(vm).unwrap().resident_bytes() < GUEST / 4);
    (vm, b, ram)
}

/// Read a word of our own memory without risking SIGBUS: a poisoned page
/// makes the read fail instead.
fn try_read(addr: usize) -> Option<u64> {
    read_via_gup(addr).ok()
}

fn plan(op: IoOp, fault: InjectedFault) -> Vec<FaultPlan> {
    vec![FaultPlan {
        op,
        fault,
        skip: 0,
        count: 1,
    }]
}

fn check_poisoning(fault: InjectedFault) {
    let mm = swap_manager(4 * MIB, 2, 64 * MIB, false);
    let (vm, b, ram) = swapped_vm(&mm);
    let victim = 777;
    mm.inject_swap_faults(plan(IoOp::Read, fault)).unwrap();
    let addr = |p: u64| ram.0.host_addr.add(p * PAGE_SIZE).raw();
    assert_eq!(
        try_read(addr(victim)),
        None,
        "{fault:?}: a failed swapin must not map data"
    );
    assert_eq!(try_read(addr(victim)), None, "still poisoned");
    // Every other page reads back right, or is poisoned: the failed read
    // covered the whole folio being swapped in (readahead may have made it
    // larger than one page), never more.
    let mut poisoned = Vec::new();
    for p in 0..GUEST / PAGE_SIZE {
        match try_read(addr(p)) {
            Some(v) => assert_eq!(v, pattern(p, 0, 0), "page {p}"),
            None => poisoned.push(p),
        }
    }
    let s = mm.vm_stats(vm).unwrap().swap;
    assert_eq!(s.read_errors, 1);
    assert_eq!(s.poisoned_pages, poisoned.len() as u64);
    assert!(poisoned.contains(&victim));
    let (lo, hi) = (poisoned[0], *poisoned.last().unwrap());
    assert!(
        hi - lo < 512 && lo / 512 == hi / 512,
        "one folio: {poisoned:?}"
    );
    if fault == InjectedFault::Corrupt {
        // Only the page whose checksum failed: the rest of the folio maps.
        assert_eq!(poisoned, vec![poisoned[0]]);
    }
    // A discard clears the poison: the pages read as zero again.
    for &p in &poisoned {
        mm.discard(vm, ram.gpa(p * PAGE_SIZE), PAGE_SIZE).unwrap();
        assert_eq!(try_read(addr(p)), Some(0));
    }
    ram.write(victim * PAGE_SIZE, 42);
    assert_eq!(ram.read(victim * PAGE_SIZE), 42);
    settle_and_check(&mm);
    drop(b);
    mm.destroy_vm(vm).unwrap();
    settle_and_check(&mm);
}

/// A poisoned page whose kernel marker went missing (a relocation that
/// gave up mid-table could once zap it) still gives a memory error: the
/// fault that reaches the handler puts the marker back, instead of waking
/// the access into the same fault for ever.
#[test]
fn a_poisoned_page_that_lost_its_marker_is_poisoned_again_on_access() {
    let mm = swap_manager(4 * MIB, 2, 64 * MIB, false);
    let (vm, b, ram) = swapped_vm(&mm);
    let victim = 777;
    let addr = ram.0.host_addr.add(victim * PAGE_SIZE).raw();
    mm.inject_swap_faults(plan(IoOp::Read, InjectedFault::Eio))
        .unwrap();
    assert_eq!(try_read(addr), None, "poisoned by the failed read");
    // SAFETY: a page of our guest mapping that holds only a poison marker;
    // MADV_DONTNEED drops the marker and touches no Rust object.
    let rc = unsafe {
        libc::madvise(
            addr as *mut libc::c_void,
            PAGE_SIZE as usize,
            libc::MADV_DONTNEED,
        )
    };
    assert_eq!(rc, 0);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(try_read(addr)));
    let r = rx.recv_timeout(std::time::Duration::from_secs(10));
    assert_eq!(
        r,
        Ok(None),
        "the access must fail with a memory error, not spin or read data"
    );
    assert_eq!(try_read(addr), None, "and keep failing");
    mm.discard(vm, ram.gpa(victim * PAGE_SIZE), PAGE_SIZE)
        .unwrap();
    assert_eq!(try_read(addr), Some(0), "a discard clears the poison");
    drop(b);
    mm.destroy_vm(vm).unwrap();
    settle_and_check(&mm);
}

#[test]
fn eio_on_swapin_poisons_the_page() {
    check_poisoning(InjectedFault::Eio);
}

#[test]
fn checksum_mismatch_poisons_the_page() {
    check_poisoning(InjectedFault::Corrupt);
}

#[test]
fn truncated_read_poisons_the_page() {
    check_poisoning(InjectedFault::Truncated);
}

#[test]
fn short_reads_are_completed() {
    let mm = swap_manager(4 * MIB, 2, 64 * MIB, false);
    let (vm, _b, ram) = swapped_vm(&mm);
    mm.inject_swap_faults(vec![FaultPlan {
        op: IoOp::Read,
        fault: InjectedFault::ShortRead,
        skip: 0,
        count: 50,
    }])
    .unwrap();
    for p in 0..GUEST / PAGE_SIZE {
        assert_eq!(ram.read(p * PAGE_SIZE), pattern(p, 0, 0), "page {p}");
    }
    let st = mm.stats().swap_device;
    assert!(st.injected_faults > 0);
    // Every injected short read needed a second read to complete.
    assert!(st.short_retries >= st.injected_faults, "{st:?}");
    assert_eq!(mm.vm_stats(vm).unwrap().swap.poisoned_pages, 0);
}

/// A clean page (read back from swap and not written since) whose host page
/// went missing behind its entry is read again from its swap slot, which
/// holds its data under a checksum. Its pool page is not trusted: here it
/// holds other bytes.
#[test]
fn a_clean_page_without_its_host_page_is_read_again_from_its_slot() {
    let mm = swap_manager(4 * MIB, 2, 64 * MIB, false);
    let (vm, _b, ram) = swapped_vm(&mm);
    let p = 7;
    let kept = || mm.vm_stats(vm).unwrap().swap.clean_kept_pages;
    let before = kept();
    assert_eq!(ram.read(p * PAGE_SIZE), pattern(p, 0, 0));
    // The handler counts after the install that woke this thread.
    assert!(mm.wait_idle(std::time::Duration::from_secs(30)));
    assert_eq!(kept(), before + 1, "the read swapin kept the page clean");
    assert!(mm
        .debug_unmap_behind_entry(
            vm,
            GuestAddress(p * PAGE_SIZE),
            DebugUnmap::IntoPoolScribbled
        )
        .unwrap());
    assert_eq!(
        ram.read(p * PAGE_SIZE),
        pattern(p, 0, 0),
        "read from its slot"
    );
    let f = mm.vm_stats(vm).unwrap().faults;
    assert_eq!(
        (
            f.unbacked_from_slot,
            f.unbacked_restored,
            f.unbacked_poisoned
        ),
        (1, 0, 0)
    );
    // The page works as any other: written, reclaimed, read back.
    ram.write(p * PAGE_SIZE, 77);
    for _ in 0..4 {
        mm.reclaim(Some(vm), GUEST).unwrap();
    }
    assert_eq!(ram.read(p * PAGE_SIZE), 77);
    for q in (0..GUEST / PAGE_SIZE).filter(|&q| q != p) {
        assert_eq!(ram.read(q * PAGE_SIZE), pattern(q, 0, 0), "page {q}");
    }
    settle_and_check(&mm);
}

#[test]
fn failed_swap_writes_map_the_folio_back() {
    let mm = swap_manager(16 * MIB, 2, 64 * MIB, false);
    let vm = mm.create_vm("enospc").unwrap();
    let b = mm.backend(vm, &[(GuestAddress(0), GUEST)]).unwrap();
    let ram = Ram::of(&*b);
    for p in 0..GUEST / PAGE_SIZE {
        ram.write(p * PAGE_SIZE, pattern(p, 0, 1));
    }
    for fault in [InjectedFault::Enospc, InjectedFault::Eio] {
        mm.inject_swap_faults(vec![FaultPlan {
            op: IoOp::Write,
            fault,
            skip: 0,
            count: u64::MAX,
        }])
        .unwrap();
        let before = mm.vm_stats(vm).unwrap().resident_bytes();
        for _ in 0..4 {
            assert_eq!(mm.reclaim(Some(vm), GUEST).unwrap(), 0, "{fault:?}");
        }
        let s = mm.vm_stats(vm).unwrap();
        assert!(s.swap.write_errors > 0);
        assert_eq!(s.swap.swapped_pages, 0);
        assert_eq!(s.resident_bytes(), before, "folios were mapped back");
        for p in 0..GUEST / PAGE_SIZE {
            assert_eq!(ram.read(p * PAGE_SIZE), pattern(p, 0, 1), "page {p}");
        }
    }
    // Disarmed, the same folios swap out and back in.
    mm.inject_swap_faults(Vec::new()).unwrap();
    let mut freed = 0;
    for _ in 0..4 {
        freed += mm.reclaim(Some(vm), GUEST).unwrap();
    }
    assert!(freed >= GUEST / 2, "freed {freed}");
    for p in 0..GUEST / PAGE_SIZE {
        assert_eq!(ram.read(p * PAGE_SIZE), pattern(p, 0, 1), "page {p}");
    }
    settle_and_check(&mm);
}

/// A discard (the balloon, on the VMM's event loop) of pages whose swap
/// write is in flight does not wait for the write: it drops the entries
/// and leaves the folio to its writeback, which takes it out of the swap
/// cache when the write ends. Nothing is left behind, and the pages read
/// zero. The discard used to sleep on the folio lock until the write
/// ended (here 300 ms; in a real reclaim up to a batch of writes).
#[test]
fn a_discard_does_not_wait_for_a_swap_write_in_flight() {
    let mm = swap_manager(16 * MIB, 2, 64 * MIB, false);
    let vm = mm.create_vm("discard-in-flight").unwrap();
    let b = mm.backend(vm, &[(GuestAddress(0), 2 * MIB)]).unwrap();
    let ram = Ram::of(&*b);
    for p in 0..2 * MIB / PAGE_SIZE {
        ram.write(p * PAGE_SIZE, pattern(p, 0, 1));
    }
    mm.inject_swap_faults(plan(IoOp::Write, InjectedFault::SlowEio))
        .unwrap();
    let reclaim = {
        let mm = mm.clone();
        std::thread::spawn(move || mm.reclaim(Some(vm), 2 * MIB).unwrap())
    };
    // The folio is unmapped and in the swap cache, its write begun.
    let swapped = || mm.vm_stats(vm).unwrap().swap.swapped_pages > 0;
    assert!(wait_until(std::time::Duration::from_secs(10), swapped));
    let t0 = std::time::Instant::now();
    let out = mm.discard(vm, GuestAddress(0), 2 * MIB).unwrap();
    let took = t0.elapsed();
    assert!(
        took < mem::SLOW_EIO_DELAY / 3,
        "the discard waited for the write: {took:?}"
    );
    assert!(!reclaim.is_finished(), "the write ended first: no test");
    reclaim.join().unwrap();
    assert_eq!(out.discarded_pages, 2 * MIB / PAGE_SIZE);
    mm.inject_swap_faults(Vec::new()).unwrap();
    let s = mm.vm_stats(vm).unwrap();
    assert_eq!((s.swap.write_errors, s.resident_bytes()), (1, 0));
    let d = mm.stats().swap_device;
    assert_eq!(
        (d.cache_pages, d.used_bytes),
        (0, 0),
        "left in the swap cache"
    );
    for p in 0..2 * MIB / PAGE_SIZE {
        assert_eq!(ram.read(p * PAGE_SIZE), 0, "page {p}");
    }
    drop(b);
    mm.destroy_vm(vm).unwrap();
    settle_and_check(&mm);
    assert_eq!(mm.stats().free_bytes, 16 * MIB);
}

/// A refault that waits on a folio whose swap write then fails finds it
/// mapped back, and the folio swaps out normally afterwards: the failed
/// writeback does not leave it marked as refaulted, which would keep it in
/// the swap cache after its next, successful write (unmapped, off the LRU,
/// its memory lost to the budget). Whether the refault retries before
/// reclaim writes the folio again is a race, so the scenario runs 16 times
/// (without the fix about one run in four showed the leak).
#[test]
fn a_refault_during_a_failed_swap_write_leaves_the_folio_reclaimable() {
    let mm = swap_manager(16 * MIB, 2, 64 * MIB, false);
    let pages = 2 * MIB / PAGE_SIZE;
    for g in 0..16 {
        // A new VM each round: one fresh 2 MiB folio.
        let vm = mm.create_vm(&format!("slow-eio-{g}")).unwrap();
        let b = mm.backend(vm, &[(GuestAddress(0), 2 * MIB)]).unwrap();
        let ram = Ram::of(&*b);
        for p in 0..pages {
            ram.write(p * PAGE_SIZE, pattern(p, 0, g));
        }
        // Reclaim samples the folio and writes it; the write fails late.
        mm.inject_swap_faults(plan(IoOp::Write, InjectedFault::SlowEio))
            .unwrap();
        let reclaim = {
            let mm = mm.clone();
            std::thread::spawn(move || mm.reclaim(Some(vm), 2 * MIB).unwrap())
        };
        std::thread::sleep(mem::SLOW_EIO_DELAY / 3);
        let t0 = std::time::Instant::now();
        assert_eq!(ram.read(5 * PAGE_SIZE), pattern(5, 0, g));
        let waited = t0.elapsed();
        let mut freed = reclaim.join().unwrap();
        assert!(
            waited >= mem::SLOW_EIO_DELAY / 3,
            "round {g}: the access should have waited on the writeback, took {waited:?}"
        );
        assert_eq!(mm.vm_stats(vm).unwrap().swap.write_errors, 1, "round {g}");
        // A handler may still be retrying the access's fault (a second
        // event, raised while reclaim had the folio out again): it would
        // refault the folio during the next writeback.
        assert!(mm.wait_idle(std::time::Duration::from_secs(10)));
        // Disarmed: the folio goes out and its memory is free again.
        mm.inject_swap_faults(Vec::new()).unwrap();
        for _ in 0..4 {
            freed += mm.reclaim(Some(vm), 2 * MIB).unwrap();
        }
        assert!(
            freed >= 2 * MIB,
            "round {g}: the folio was not freed after its write: {freed}"
        );
        assert_eq!(mm.vm_stats(vm).unwrap().resident_bytes(), 0, "round {g}");
        for p in 0..pages {
            assert_eq!(
                ram.read(p * PAGE_SIZE),
                pattern(p, 0, g),
                "round {g}, page {p}"
            );
        }
        drop(b);
        mm.destroy_vm(vm).unwrap();
    }
    settle_and_check(&mm);
}

#[test]
fn a_full_swap_file_leaves_memory_in_place() {
    // 2 MiB of swap for 8 MiB of guest: most folios cannot go out.
    let mm = swap_manager(16 * MIB, 2, 2 * MIB, false);
    let vm = mm.create_vm("full").unwrap();
    let b = mm.backend(vm, &[(GuestAddress(0), GUEST)]).unwrap();
    let ram = Ram::of(&*b);
    for p in 0..GUEST / PAGE_SIZE {
        ram.write(p * PAGE_SIZE, pattern(p, 0, 2));
    }
    let mut freed = 0;
    for _ in 0..4 {
        freed += mm.reclaim(Some(vm), GUEST).unwrap();
    }
    assert!(freed <= 2 * MIB, "freed {freed}");
    let s = mm.vm_stats(vm).unwrap().swap;
    assert!(s.swap_full > 0);
    for p in 0..GUEST / PAGE_SIZE {
        assert_eq!(ram.read(p * PAGE_SIZE), pattern(p, 0, 2), "page {p}");
    }
    settle_and_check(&mm);
}

#[test]
fn swap_file_errors_are_clear() {
    let cfg = |target, size| mem::MmConfig {
        swap: Some(mem::SwapConfig {
            target,
            size_bytes: size,
        }),
        ..mem::MmConfig::with_budget(4 * MIB)
    };
    let e = MemoryManager::new(cfg(mem::SwapTarget::Dir(std::env::temp_dir()), 4096)).unwrap_err();
    let chain = format!("{e}: {}", std::error::Error::source(&e).unwrap());
    assert!(chain.contains("below the minimum"), "{chain}");
    let e =
        MemoryManager::new(cfg(mem::SwapTarget::Dir("/nonexistent".into()), 8 * MIB)).unwrap_err();
    assert!(
        matches!(e, mem::MmError::Swap(mem::SwapFileError::Create(..))),
        "{e:?}"
    );
}
