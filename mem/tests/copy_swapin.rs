//! Order-0 swapins are installed by `UFFDIO_COPY` and leave a stale pool
//! copy queued for a batched zap. Every path that moves pages into a
//! folio's pool range or frees it (swap-out, migration, compaction,
//! discard, teardown) must cope with a range still in that queue: the data
//! the guest sees stays the last written, discarded pages read zero, and no
//! stale page outlives its folio.

mod common;

use common::*;
use mem::{GuestAddress, PAGE_SIZE};

const GUEST: u64 = 16 * MIB;
const PAGES: u64 = GUEST / PAGE_SIZE;

/// Read `n` random pages (order-0 swapins: random faults get no readahead)
/// and check each against `want`.
fn random_reads(ram: &Ram, want: &[u64], rng: &mut Rng, n: u64) {
    for _ in 0..n {
        let p = rng.below(PAGES);
        assert_eq!(ram.read(p * PAGE_SIZE), want[p as usize], "page {p}");
    }
}

fn check_all(ram: &Ram, want: &[u64], what: &str) {
    for p in 0..PAGES {
        assert_eq!(
            ram.read(p * PAGE_SIZE),
            want[p as usize],
            "{what}: page {p}"
        );
    }
}

#[test]
fn copied_swapins_survive_swapout_migration_compaction_discard_and_teardown() {
    // No background reclaimer: nothing drains the queue behind the test's
    // back, so the paths below meet queued ranges.
    let mm = swap_manager(4 * MIB, 2, 64 * MIB, false);
    let vm = mm.create_vm("copy").unwrap();
    let b = mm.backend(vm, &[(GuestAddress(0), GUEST)]).unwrap();
    let ram = Ram::of(&*b);
    let mut want: Vec<u64> = (0..PAGES).map(|p| pattern(p, 0, 1)).collect();
    for p in 0..PAGES {
        ram.write(p * PAGE_SIZE, want[p as usize]);
    }
    let mut rng = Rng(0x9e37_79b9);
    random_reads(&ram, &want, &mut rng, 2000);
    let s = mm.stats();
    assert!(
        s.swap.copied_in_pages > 0,
        "order-0 swapins were copied in: {:#?}",
        s.swap
    );
    // Swap-out of copied folios moves their pages into queued ranges.
    mm.reclaim(Some(vm), 2 * MIB).unwrap();
    random_reads(&ram, &want, &mut rng, 2000);
    // Migration and compaction move or re-label folios whose old ranges
    // may be queued, and free those ranges.
    mm.migrate_range(vm, GuestAddress(0), GUEST).unwrap();
    random_reads(&ram, &want, &mut rng, 1000);
    mm.compact(Some(vm), &|_, _| {}).unwrap();
    random_reads(&ram, &want, &mut rng, 1000);
    // Discard moves the guest pages of copied folios back into their pool
    // range, then frees it.
    for c in (0..PAGES).step_by(64) {
        if (c / 64) % 3 == 0 {
            mm.discard(vm, ram.gpa(c * PAGE_SIZE), 32 * PAGE_SIZE)
                .unwrap();
            want[c as usize..(c + 32) as usize].fill(0);
        }
    }
    random_reads(&ram, &want, &mut rng, 2000);
    // Write a new generation and read it all back through swap.
    for p in 0..PAGES {
        if want[p as usize] != 0 {
            want[p as usize] = pattern(p, 0, 2);
            ram.write(p * PAGE_SIZE, want[p as usize]);
        }
    }
    random_reads(&ram, &want, &mut rng, 2000);
    check_all(&ram, &want, "final");
    // Quiescent first: a COPY wakes the faulting thread before the handler
    // queues the stale copy and counts it.
    settle_and_check(&mm);
    let s = mm.stats();
    eprintln!(
        "copied in {} pages; zaps: {} batches, {} pages, {} forced, {} stale now",
        s.swap.copied_in_pages,
        s.pool_zap_batches,
        s.pool_zap_pages,
        s.pool_zap_forced,
        s.pool_stale_pages
    );
    assert_eq!(s.swap.read_errors + s.swap.write_errors, 0);
    assert_eq!(s.swap.poisoned_pages, 0);
    // Every copied page was zapped or is still queued: none counted twice.
    assert_eq!(
        s.pool_zap_pages + s.pool_stale_pages,
        s.swap.copied_in_pages
    );
    assert!(
        s.pool_stale_pages < 64 + 2,
        "bounded by a batch per handler"
    );
    drop(b);
    mm.destroy_vm(vm).unwrap();
    settle_and_check(&mm);
    let s = mm.stats();
    assert_eq!(s.pool_stale_pages, 0, "no stale copy outlives its folio");
    assert_eq!(s.swap_device.used_bytes, 0);
}
