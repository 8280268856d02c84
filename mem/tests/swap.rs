//! Swap with host threads as vCPUs: guest RAM larger than the budget is
//! written and read back through swap-out, swapin, the swap cache and
//! reclaim; every word must verify and the accounting must balance.

mod common;

use common::*;
use mem::{GuestAddress, PAGE_SIZE};

#[test]
fn guest_larger_than_budget_round_trips_through_swap() {
    let budget = 8 * MIB;
    let guest = 32 * MIB;
    let mm = swap_manager(budget, 2, 128 * MIB, true);
    let vm = mm.create_vm("swap").unwrap();
    let b = mm.backend(vm, &[(GuestAddress(0), guest)]).unwrap();
    let ram = Ram::of(&*b);
    let pages = guest / PAGE_SIZE;
    for g in 0..3 {
        for p in 0..pages {
            // Two words per page: catches pages mixed up within a folio.
            ram.write(p * PAGE_SIZE, pattern(p, 0, g));
            ram.write(p * PAGE_SIZE + 4088, pattern(p, 511, g));
        }
        for p in 0..pages {
            assert_eq!(
                ram.read(p * PAGE_SIZE),
                pattern(p, 0, g),
                "gen {g} page {p}"
            );
            assert_eq!(
                ram.read(p * PAGE_SIZE + 4088),
                pattern(p, 511, g),
                "gen {g} page {p}"
            );
        }
    }
    let s = mm.vm_stats(vm).unwrap();
    eprintln!("{:#?}", s.swap);
    assert!(
        s.swap.swapout_pages >= pages,
        "swapped out {}",
        s.swap.swapout_pages
    );
    assert!(s.swap.swapin_file_pages > 0);
    assert!(s.resident_bytes() <= budget);
    drop(b);
    mm.destroy_vm(vm).unwrap();
    settle_and_check(&mm);
    let st = mm.stats();
    assert_eq!(st.swap_device.used_bytes, 0, "teardown frees every slot");
}
