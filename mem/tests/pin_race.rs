//! Device pins held for a while under reclaim, migration, compaction,
//! relocation and discards of the pinned folios' other pages (their splits held back
//! now and then): every write
//! through a pin must be there afterwards, every page read must hold its
//! owner's last write (zero after a discard that did not skip it).
//! `PIN_RACE_SECS` and `PIN_RACE_SEED` lengthen or vary the run.

mod common;

use common::*;
use mem::{
    FaultPoint, GuestAddress, InjectPlan, MemoryManager, RelocateError, RelocateOp, VmId, PAGE_SIZE,
};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, RwLock};
use std::time::Duration;

const WORDS: u64 = PAGE_SIZE / 8;
const PAGES: u64 = 2048; // 8 MiB
/// Threads; page `p` belongs to thread `p % THREADS`. The first `PINNERS`
/// write through pins, the others as vCPUs (and discard their pages).
const THREADS: u64 = 4;
const PINNERS: u64 = 2;

fn marker(p: u64, w: u64, g: u64) -> u64 {
    0xA5 << 56 | (p & 0xffff) << 40 | (w & 0x1ff) << 31 | (g & 0x7fff_ffff) | 1 << 30
}

struct Shared {
    id: VmId,
    ram: RwLock<Ram>,
    gen: Vec<AtomicU64>,
    stop: AtomicBool,
    pinned_ops: AtomicU64,
    skipped: AtomicU64,
}

impl Shared {
    fn want(&self, p: u64, w: u64) -> u64 {
        match self.gen[p as usize].load(SeqCst) {
            0 => 0,
            g => marker(p, w, g),
        }
    }
}

fn pinner(mm: &MemoryManager, s: &Shared, t: u64, seed: u64) {
    let mut rng = Rng(seed);
    let mine: Vec<u64> = (0..PAGES).filter(|p| p % THREADS == t).collect();
    let mut g = 1;
    while !s.stop.load(SeqCst) {
        let p = mine[rng.below(mine.len() as u64) as usize];
        let pin = match mm.pin(s.id, GuestAddress(p * PAGE_SIZE), PAGE_SIZE) {
            Ok(pin) => pin,
            Err(mem::PinError::NoMemory) => continue,
            Err(e) => panic!("pin: {e}"),
        };
        let check = |what: &str| {
            let mut b = vec![0u8; PAGE_SIZE as usize];
            pin.read_at(0, &mut b);
            for (w, word) in b.chunks(8).enumerate() {
                let got = u64::from_ne_bytes(word.try_into().unwrap());
                let want = s.want(p, w as u64);
                assert_eq!(got, want, "{what}: pinned page {p} word {w}: {got:#x}");
            }
        };
        check("pinned");
        // Hold the pin over several writes, as a device doing I/O would,
        // while the others reclaim, migrate and discard around it.
        for _ in 0..1 + rng.below(8) {
            g += 1;
            for w in 0..WORDS {
                pin.write_at(w * 8, &marker(p, w, g).to_ne_bytes());
            }
            s.gen[p as usize].store(g, SeqCst);
            std::thread::sleep(Duration::from_micros(rng.below(300)));
            check("still pinned");
        }
        drop(pin);
        s.pinned_ops.fetch_add(1, SeqCst);
        // Read it back through the guest mapping once unpinned.
        let view = s.ram.read().unwrap();
        for w in 0..WORDS {
            let got = view.read(p * PAGE_SIZE + w * 8);
            assert_eq!(got, s.want(p, w), "unpinned page {p} word {w}: {got:#x}");
        }
        drop(view);
    }
}

fn vcpu(mm: &MemoryManager, s: &Shared, t: u64, seed: u64) {
    let mut rng = Rng(seed);
    let mine: Vec<u64> = (0..PAGES).filter(|p| p % THREADS == t).collect();
    let mut g = 1;
    while !s.stop.load(SeqCst) {
        let p = mine[rng.below(mine.len() as u64) as usize];
        let view = s.ram.read().unwrap();
        let ram = *view;
        match rng.below(4) {
            0 => {
                let out = mm
                    .discard(s.id, GuestAddress(p * PAGE_SIZE), PAGE_SIZE)
                    .unwrap();
                // A page of a folio another thread pins stays as it is.
                if out.skipped_pinned_pages == 0 {
                    s.gen[p as usize].store(0, SeqCst);
                } else {
                    s.skipped.fetch_add(1, SeqCst);
                }
            }
            1 => {
                g += 1;
                for w in 0..WORDS {
                    ram.write(p * PAGE_SIZE + w * 8, marker(p, w, g));
                }
                s.gen[p as usize].store(g, SeqCst);
            }
            _ => {
                for w in 0..WORDS {
                    let got = ram.read(p * PAGE_SIZE + w * 8);
                    assert_eq!(got, s.want(p, w), "vcpu page {p} word {w}: {got:#x}");
                }
            }
        }
        drop(view);
    }
}

fn chaos(mm: &MemoryManager, s: &Shared, seed: u64) -> u64 {
    let mut rng = Rng(seed);
    let mut n = 0;
    while !s.stop.load(SeqCst) {
        match rng.below(7) {
            // Partly discarded folios stay whole for a while: reclaim,
            // migration, relocation and pins meet them before their split.
            5 => mm.inject_faults(vec![InjectPlan {
                point: FaultPoint::SplitDefer,
                skip: 0,
                count: 1 + rng.below(20) as u32,
            }]),
            0 | 1 => _ = mm.reclaim(Some(s.id), (1 + rng.below(4)) * MIB).unwrap(),
            2 => {
                let t = rng.below(PAGES / 512);
                let _ = mm.migrate_range(s.id, GuestAddress(t * 2 * MIB), 2 * MIB);
            }
            3 => _ = mm.compact(Some(s.id), &|_, _| {}).unwrap(),
            4 => {
                let r = mm.relocate(
                    s.id,
                    GuestAddress(0),
                    RelocateOp::ToAligned,
                    &mut |sw| {
                        *s.ram.write().unwrap() = Ram(sw.new[0]);
                        Ok(())
                    },
                    &|_, _| {},
                );
                match r {
                    Ok(_) | Err(RelocateError::Pinned(_)) => {}
                    Err(e) => panic!("relocate: {e}"),
                }
            }
            _ => std::thread::sleep(Duration::from_millis(1)),
        }
        n += 1;
    }
    n
}

#[test]
fn pinned_pages_keep_their_writes_under_reclaim_migration_relocation_and_discard() {
    let secs = std::env::var("PIN_RACE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let seed: u64 = std::env::var("PIN_RACE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x9e1);
    let mm = swap_manager(6 * MIB, 2, 64 * MIB, true);
    let id = mm.create_vm("pins").unwrap();
    let b = mm
        .backend(id, &[(GuestAddress(0), PAGES * PAGE_SIZE)])
        .unwrap();
    let s = Arc::new(Shared {
        id,
        ram: RwLock::new(Ram::of(&*b)),
        gen: (0..PAGES).map(|_| AtomicU64::new(0)).collect(),
        stop: AtomicBool::new(false),
        pinned_ops: AtomicU64::new(0),
        skipped: AtomicU64::new(0),
    });
    let mut threads = Vec::new();
    for t in 0..THREADS {
        let (mm, s) = (mm.clone(), s.clone());
        threads.push(std::thread::spawn(move || match t < PINNERS {
            true => pinner(&mm, &s, t, seed ^ (t * 7919 + 1)),
            false => vcpu(&mm, &s, t, seed ^ (t * 7919 + 1)),
        }));
    }
    let c = {
        let (mm, s) = (mm.clone(), s.clone());
        std::thread::spawn(move || chaos(&mm, &s, seed ^ 0xc4a05))
    };
    let ops = run_for(Duration::from_secs(secs), &s.stop, threads, c);
    let ram = *s.ram.read().unwrap();
    for p in 0..PAGES {
        for w in 0..WORDS {
            let got = ram.read(p * PAGE_SIZE + w * 8);
            assert_eq!(got, s.want(p, w), "final page {p} word {w}: {got:#x}");
        }
    }
    let st = mm.stats();
    eprintln!(
        "{} pinned ops, {} discards skipped, {ops} chaos ops, splits {}, {:?}",
        s.pinned_ops.load(SeqCst),
        s.skipped.load(SeqCst),
        st.folios_split,
        st.migration,
    );
    drop(b);
    mm.destroy_vm(id).unwrap();
    settle_and_check(&mm);
}
