//! Many host threads act as vCPUs: they fault the same and neighbouring
//! pages at once while another thread discards random ranges. Every value
//! read back must be the last one written (or zero after a discard), and at
//! the end the allocator must balance: no folio leaked or freed twice.

mod common;

use common::*;
use mem::{GuestAddress, PAGE_SIZE};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, RwLock};

const VCPUS: u64 = 6;
const PAGES: u64 = 2048; // 8 MiB: four 2 MiB folios when untouched
const CHUNK: u64 = 16; // discard granularity, pages
const OPS: u64 = 200_000;
const MIN_DISCARDS: u64 = 100;

struct Shared {
    ram: Ram,
    /// One lock per discard chunk: vCPUs hold it shared while they write and
    /// check their slot, the discarder exclusively while it discards.
    chunks: Vec<RwLock<()>>,
    /// Expected value of slot `t` of page `p` at `p * VCPUS + t`.
    expected: Vec<AtomicU64>,
    stop: AtomicBool,
    /// First page of vCPU 0's hot window, so discards hit where faults are.
    window: AtomicU64,
    /// Discards done so far.
    discards: AtomicU64,
}

fn vcpu(s: &Shared, t: u64, seed: u64) {
    let mut rng = Rng(seed);
    // Run at least OPS operations and until enough discards raced with them.
    for i in 1.. {
        if i > OPS && s.discards.load(SeqCst) >= MIN_DISCARDS {
            break;
        }
        // A hot window wandering over memory: threads hit the same pages
        // and their neighbours at the same time.
        let window = (i / 500 * 97) % (PAGES - 64);
        if t == 0 {
            s.window.store(window, SeqCst);
        }
        let page = window + rng.below(64);
        let off = page * PAGE_SIZE + t * 8;
        let slot = &s.expected[(page * VCPUS + t) as usize];
        let _g = s.chunks[(page / CHUNK) as usize].read().unwrap();
        let got = s.ram.read(off);
        assert_eq!(got, slot.load(SeqCst), "vcpu {t} page {page} op {i}");
        if rng.below(2) == 0 {
            let v = (i << 8) | (t + 1);
            s.ram.write(off, v);
            slot.store(v, SeqCst);
        }
    }
}

fn discarder(s: &Shared, mm: &mem::MemoryManager, vm: mem::VmId, seed: u64) -> u64 {
    let mut rng = Rng(seed);
    let mut n = 0;
    while !s.stop.load(SeqCst) {
        let first = match rng.below(4) {
            0 => rng.below(PAGES / CHUNK - 3),
            _ => (s.window.load(SeqCst) / CHUNK + rng.below(4)).min(PAGES / CHUNK - 3),
        };
        let nr = 1 + rng.below(3);
        let guards: Vec<_> = (first..first + nr)
            .map(|c| s.chunks[c as usize].write().unwrap())
            .collect();
        let out = mm
            .discard(
                vm,
                s.ram.gpa(first * CHUNK * PAGE_SIZE),
                nr * CHUNK * PAGE_SIZE,
            )
            .unwrap();
        assert_eq!(out.skipped_pinned_pages, 0);
        for p in first * CHUNK..(first + nr) * CHUNK {
            for t in 0..VCPUS {
                s.expected[(p * VCPUS + t) as usize].store(0, SeqCst);
            }
        }
        drop(guards);
        n += 1;
        s.discards.store(n, SeqCst);
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
    n
}

#[test]
fn racing_faults_and_discards_keep_every_byte() {
    // Several rounds on one manager: each VM reuses the folios of the last.
    let mm = manager(PAGES * PAGE_SIZE, 3);
    for round in 0..4 {
        one_round(&mm, round);
    }
}

fn one_round(mm: &Arc<mem::MemoryManager>, round: u64) {
    let vm = mm.create_vm("race").unwrap();
    let b = mm
        .backend(vm, &[(GuestAddress(1 << 32), PAGES * PAGE_SIZE)])
        .unwrap();
    let s = Arc::new(Shared {
        ram: Ram::of(&*b),
        chunks: (0..PAGES / CHUNK).map(|_| RwLock::new(())).collect(),
        expected: (0..PAGES * VCPUS).map(|_| AtomicU64::new(0)).collect(),
        stop: AtomicBool::new(false),
        window: AtomicU64::new(0),
        discards: AtomicU64::new(0),
    });
    let vcpus: Vec<_> = (0..VCPUS)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || vcpu(&s, t, 0x9e37_79b9 + t * 7919 + round * 104729))
        })
        .collect();
    let d = {
        let (s, mm) = (s.clone(), mm.clone());
        std::thread::spawn(move || discarder(&s, &mm, vm, 12345 + round))
    };
    for v in vcpus {
        v.join().unwrap();
    }
    s.stop.store(true, SeqCst);
    let discards = d.join().unwrap();
    // Final sweep: every slot of every page.
    for p in 0..PAGES {
        for t in 0..VCPUS {
            let want = s.expected[(p * VCPUS + t) as usize].load(SeqCst);
            assert_eq!(s.ram.read(p * PAGE_SIZE + t * 8), want, "page {p} slot {t}");
        }
    }
    let st = mm.vm_stats(vm).unwrap();
    assert!(discards >= MIN_DISCARDS, "discarder ran {discards} times");
    assert!(st.faults.raced + st.discarded_pages > 0);
    assert_eq!(st.faults.fallback_copy_pages, 0, "{st:#?}");
    let ms = mm.stats();
    eprintln!(
        "round {round}: discards {discards}, discarded pages {}, raced {}, parked {}, splits {}",
        st.discarded_pages,
        st.faults.raced,
        st.faults.parked_prezero + st.faults.parked_oom,
        ms.folios_split
    );
    drop(b);
    mm.destroy_vm(vm).unwrap();
    settle_and_check(mm);
    let ms = mm.stats();
    assert_eq!(ms.free_bytes, PAGES * PAGE_SIZE, "all memory back: {ms:#?}");
    assert_eq!(ms.folios_by_order.iter().sum::<u64>(), 0);
}
