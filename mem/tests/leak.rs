//! Guest data is never leaked: every folio handed to a guest is zeroed or
//! fully overwritten, across VMs and within one VM. Two VMs fill whole
//! pages with markers of their own, discard them, read them back fresh and
//! write them through pins, while another thread drives reclaim, swapin
//! read failures (EIO, checksum, truncated, short), migration (failing
//! half-way too), compaction, relocation (undone now and then) and budget
//! shrink and regrow. Every word of every page read must be the VM's own
//! last write, or zero after a discard: never a word of the other VM,
//! never an older word of its own. Collapse with holes and the tail of a
//! failed grow, which that mix rarely reaches, have tests of their own.
//! `LEAK_SECS` and `LEAK_SEED` lengthen or vary the mixed run.

mod common;

use common::*;
use mem::{
    FaultPlan, FaultPoint, FolioBackend, GuestAddress, InjectPlan, InjectedFault, IoOp,
    MemoryManager, RelocateError, RelocateOp, VmId, PAGE_SIZE,
};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, RwLock};
use std::time::Duration;

const WORDS: usize = (PAGE_SIZE / 8) as usize;

/// Word `w` of page `p` of VM number `v` in generation `g` (never zero).
fn marker(v: u64, p: u64, w: u64, g: u64) -> u64 {
    (0xA5 ^ v) << 56 | (p & 0xffff) << 40 | (w & 0x1ff) << 31 | (g & 0x7fff_ffff) | 1 << 30
}

/// What a stray word looks like, for the failure message.
fn describe(got: u64) -> String {
    let v = (got >> 56) ^ 0xA5;
    match v < 2 && got & (1 << 30) != 0 {
        true => format!(
            "{got:#x}: a marker of VM {v}, page {}, word {}, gen {}",
            (got >> 40) & 0xffff,
            (got >> 31) & 0x1ff,
            got & 0x3fff_ffff
        ),
        false => format!("{got:#x}"),
    }
}

/// `process_vm_readv` of one page: faults like a device (GUP), so a
/// poisoned page is `Err` rather than `SIGBUS`.
fn read_page(addr: usize, buf: &mut [u64; WORDS]) -> bool {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: PAGE_SIZE as usize,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: PAGE_SIZE as usize,
    };
    // SAFETY: `local` is our own buffer of one page, alive across the call;
    // the kernel reads `remote` through our page tables and fails cleanly
    // on a bad page.
    let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    n == PAGE_SIZE as isize
}

/// `process_vm_writev` of one page; false if the page is poisoned.
fn write_page(addr: usize, buf: &[u64; WORDS]) -> bool {
    let local = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: PAGE_SIZE as usize,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: PAGE_SIZE as usize,
    };
    // SAFETY: as in `read_page`; the kernel writes our own guest mapping.
    let n = unsafe { libc::process_vm_writev(libc::getpid(), &local, 1, &remote, 1, 0) };
    n == PAGE_SIZE as isize
}

const PAGES: u64 = 2048; // 8 MiB per VM
const CHUNK: u64 = 16;
const THREADS: u64 = 3;

struct Vm {
    n: u64,
    id: VmId,
    /// The VM's RAM as its vCPUs see it: a relocation's switch replaces it
    /// while it holds them off (the write lock is the pause).
    ram: RwLock<Ram>,
    _b: Arc<mem::FolioBackend>,
    /// Generation of each page's contents; 0: zero (discarded or never
    /// written).
    gen: Vec<AtomicU64>,
}

struct Shared {
    vms: [Vm; 2],
    stop: AtomicBool,
    poisoned: AtomicU64,
    checked: AtomicU64,
    /// A pin holds a whole folio, whose pages other threads own: discards
    /// hold this shared and pins exclusively, so no discard skips a page.
    pins: RwLock<()>,
}

fn expect(vm: &Vm, p: u64, w: u64) -> u64 {
    match vm.gen[p as usize].load(SeqCst) {
        0 => 0,
        g => marker(vm.n, p, w, g),
    }
}

fn discard(mm: &MemoryManager, s: &Shared, vm: &Vm, first: u64, nr: u64) {
    let _no_pin = s.pins.read().unwrap();
    let out = mm
        .discard(vm.id, GuestAddress(first * PAGE_SIZE), nr * PAGE_SIZE)
        .unwrap();
    assert_eq!(out.skipped_pinned_pages, 0);
    for p in first..first + nr {
        vm.gen[p as usize].store(0, SeqCst);
    }
}

/// Check page `p`; a poisoned page (a swapin whose read failed) is
/// discarded and must read zero afterwards.
fn check(mm: &MemoryManager, s: &Shared, vm: &Vm, ram: Ram, p: u64, buf: &mut [u64; WORDS]) {
    let addr = ram.0.host_addr.add(p * PAGE_SIZE).raw();
    if !read_page(addr, buf) {
        s.poisoned.fetch_add(1, SeqCst);
        discard(mm, s, vm, p, 1);
        assert!(
            read_page(addr, buf),
            "vm {} page {p}: poisoned after discard",
            vm.n
        );
    }
    for (w, &got) in buf.iter().enumerate() {
        let want = expect(vm, p, w as u64);
        assert_eq!(
            got,
            want,
            "vm {} page {p} word {w}: read {}, want {want:#x}",
            vm.n,
            describe(got)
        );
    }
    s.checked.fetch_add(1, SeqCst);
}

fn vcpu(mm: &MemoryManager, s: &Shared, v: usize, t: u64, seed: u64) {
    let vm = &s.vms[v];
    let mut rng = Rng(seed);
    let mut buf = [0u64; WORDS];
    // This thread owns the chunks c with c % THREADS == t.
    let chunks: Vec<u64> = (0..PAGES / CHUNK).filter(|c| c % THREADS == t).collect();
    let mut g = 1;
    while !s.stop.load(SeqCst) {
        let c = chunks[rng.below(chunks.len() as u64) as usize];
        let p = c * CHUNK + rng.below(CHUNK);
        let view = vm.ram.read().unwrap();
        let ram = *view;
        match rng.below(10) {
            0..=2 => check(mm, s, vm, ram, p, &mut buf),
            3..=5 => {
                // Fill a run of pages of the chunk with a new generation.
                g += 1;
                let end = (c + 1) * CHUNK;
                for q in p..(p + 1 + rng.below(8)).min(end) {
                    let a = ram.0.host_addr.add(q * PAGE_SIZE).raw();
                    (0..WORDS).for_each(|w| buf[w] = marker(vm.n, q, w as u64, g));
                    if write_page(a, &buf) {
                        vm.gen[q as usize].store(g, SeqCst);
                    } else {
                        s.poisoned.fetch_add(1, SeqCst);
                        discard(mm, s, vm, q, 1);
                    }
                }
            }
            6 | 7 => {
                // Discard part of the chunk (a large folio's middle, say)
                // and read it back fresh.
                let first = c * CHUNK + rng.below(CHUNK);
                let nr = 1 + rng.below((c + 1) * CHUNK - first);
                discard(mm, s, vm, first, nr);
                check(mm, s, vm, ram, first + rng.below(nr), &mut buf);
            }
            8 => {
                // Discard the whole chunk, then read every page of it.
                discard(mm, s, vm, c * CHUNK, CHUNK);
                for q in c * CHUNK..(c + 1) * CHUNK {
                    check(mm, s, vm, ram, q, &mut buf);
                }
            }
            _ => {
                // A device write through a pin.
                let pinning = s.pins.write().unwrap();
                match mm.pin(vm.id, GuestAddress(p * PAGE_SIZE), PAGE_SIZE) {
                    Ok(pin) => {
                        let mut b = vec![0u8; PAGE_SIZE as usize];
                        pin.read_at(0, &mut b);
                        for (w, word) in b.chunks(8).enumerate() {
                            let got = u64::from_ne_bytes(word.try_into().unwrap());
                            let want = expect(vm, p, w as u64);
                            assert_eq!(
                                got,
                                want,
                                "vm {} pinned page {p} word {w}: read {}",
                                vm.n,
                                describe(got)
                            );
                        }
                        g += 1;
                        for w in 0..WORDS {
                            let m = marker(vm.n, p, w as u64, g);
                            pin.write_at(w as u64 * 8, &m.to_ne_bytes());
                        }
                        vm.gen[p as usize].store(g, SeqCst);
                    }
                    Err(mem::PinError::Poisoned) => {
                        s.poisoned.fetch_add(1, SeqCst);
                        drop(pinning);
                        discard(mm, s, vm, p, 1);
                        continue;
                    }
                    Err(mem::PinError::NoMemory) => {}
                    Err(e) => panic!("pin: {e}"),
                }
                drop(pinning);
            }
        }
    }
}

fn chaos(mm: &MemoryManager, s: &Shared, seed: u64, budget: u64) -> u64 {
    let mut rng = Rng(seed);
    let mut n = 0;
    while !s.stop.load(SeqCst) {
        let vm = &s.vms[rng.below(2) as usize];
        match rng.below(10) {
            0 | 1 => _ = mm.reclaim(Some(vm.id), (1 + rng.below(4)) * MIB).unwrap(),
            2 => {
                let fault = [
                    InjectedFault::Eio,
                    InjectedFault::Corrupt,
                    InjectedFault::Truncated,
                    InjectedFault::ShortRead,
                ][rng.below(4) as usize];
                mm.inject_swap_faults(vec![FaultPlan {
                    op: IoOp::Read,
                    fault,
                    skip: rng.below(4),
                    count: 1,
                }])
                .unwrap();
            }
            3 => {
                let point = [
                    FaultPoint::MigrateUnmap,
                    FaultPoint::MigrateCopy,
                    FaultPoint::MigrateRemap,
                ][rng.below(3) as usize];
                mm.inject_faults(vec![InjectPlan {
                    point,
                    skip: rng.below(3) as u32,
                    count: 1,
                }]);
            }
            4 => {
                let t = rng.below(PAGES / 512);
                let _ = mm.migrate_range(vm.id, GuestAddress(t * 2 * MIB), 2 * MIB);
            }
            5 => _ = mm.compact(Some(vm.id), &|_, _| {}).unwrap(),
            6 => {
                // Lower the budget (reclaim, then offline free memory with
                // old data in it) and raise it again.
                let _ = mm.set_budget(budget - 2 * MIB);
                mm.set_budget(budget).unwrap();
            }
            7 => {
                // Move the VM's RAM to a new host range, failing part-way
                // now and then (the undo moves it back).
                if rng.below(3) == 0 {
                    let point = [FaultPoint::RelocateMove, FaultPoint::RelocateCommit]
                        [rng.below(2) as usize];
                    mm.inject_faults(vec![InjectPlan {
                        point,
                        skip: rng.below(4) as u32,
                        count: 1,
                    }]);
                }
                let r = mm.relocate(
                    vm.id,
                    GuestAddress(0),
                    RelocateOp::ToAligned,
                    &mut |sw| {
                        let mut ram = vm.ram.write().unwrap();
                        *ram = Ram(sw.new[0]);
                        Ok(())
                    },
                    &|_, _| {},
                );
                match r {
                    Ok(_) | Err(RelocateError::Injected(_)) | Err(RelocateError::Pinned(_)) => {}
                    Err(e) => panic!("relocate: {e}"),
                }
            }
            _ => std::thread::sleep(Duration::from_millis(1)),
        }
        n += 1;
    }
    n
}

fn run(secs: u64, seed: u64) {
    let budget = 8 * MIB;
    let mm = swap_manager(budget, 3, 64 * MIB, true);
    let mk = |n: u64| {
        let id = mm.create_vm(&format!("leak{n}")).unwrap();
        let b = mm
            .backend(id, &[(GuestAddress(0), PAGES * PAGE_SIZE)])
            .unwrap();
        Vm {
            n,
            id,
            ram: RwLock::new(Ram::of(&*b)),
            _b: b,
            gen: (0..PAGES).map(|_| AtomicU64::new(0)).collect(),
        }
    };
    let s = Arc::new(Shared {
        vms: [mk(0), mk(1)],
        stop: AtomicBool::new(false),
        poisoned: AtomicU64::new(0),
        checked: AtomicU64::new(0),
        pins: RwLock::new(()),
    });
    let mut threads = Vec::new();
    for v in 0..2 {
        for t in 0..THREADS {
            let (mm, s) = (mm.clone(), s.clone());
            threads.push(std::thread::spawn(move || {
                vcpu(&mm, &s, v, t, seed ^ (v as u64 * 131 + t * 7919 + 1))
            }));
        }
    }
    let c = {
        let (mm, s) = (mm.clone(), s.clone());
        std::thread::spawn(move || chaos(&mm, &s, seed ^ 0xc4a05, budget))
    };
    let ops = run_for(Duration::from_secs(secs), &s.stop, threads, c);
    mm.inject_swap_faults(Vec::new()).unwrap();
    mm.inject_faults(Vec::new());
    let mut buf = [0u64; WORDS];
    for vm in &s.vms {
        let ram = *vm.ram.read().unwrap();
        for p in 0..PAGES {
            check(&mm, &s, vm, ram, p, &mut buf);
        }
    }
    let st = mm.stats();
    eprintln!(
        "seed {seed:#x}: {} pages checked, {} poisoned, {ops} chaos ops, swapins {}, splits {}, \
         {:?}, faults {:?}",
        s.checked.load(SeqCst),
        s.poisoned.load(SeqCst),
        st.swap.swapin_file_folios,
        st.folios_split,
        st.migration,
        st.faults.installed_by_order,
    );
}

#[test]
fn two_vms_never_see_each_others_data_or_their_own_stale_data() {
    let secs = std::env::var("LEAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    let seed = std::env::var("LEAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x1ea5);
    run(secs, seed);
}

/// Every word of page `p` of `ram`, read directly.
fn page_words(ram: Ram, p: u64) -> impl Iterator<Item = (u64, u64)> {
    (0..WORDS as u64).map(move |w| (w, ram.read(p * PAGE_SIZE + w * 8)))
}

/// Collapse turns a table of small folios with up to `MAX_PTES_NONE`
/// holes (discarded pages, whose data went back to the pool) into one 2 MiB folio: the holes must read zero in it, not whatever the
/// target block or the members' pool ranges held, and the other VM's
/// fresh memory must read zero after the members are freed.
#[test]
fn collapse_fills_holes_with_zero_and_frees_members_zeroed() {
    let mm = manager(16 * MIB, 2);
    let a = mm.create_vm("a").unwrap();
    let ba = mm.backend(a, &[(GuestAddress(0), 2 * MIB)]).unwrap();
    let ram = Ram::of(&*ba);
    let fill = |p: u64, g: u64| {
        for w in 0..WORDS as u64 {
            ram.write(p * PAGE_SIZE + w * 8, marker(0, p, w, g));
        }
    };
    (0..512).for_each(|p| fill(p, 1));
    // Shatter the 2 MiB folio: discard every 16th page, split, refill.
    for p in (0..512).step_by(16) {
        mm.discard(a, ram.gpa(p * PAGE_SIZE), PAGE_SIZE).unwrap();
    }
    settle_and_check(&mm);
    for p in (0..512).step_by(16) {
        fill(p, 1);
    }
    // Holes: 40 discarded pages (their folios' data went to the pool).
    let holes: Vec<u64> = (100..140).collect();
    for &p in &holes {
        mm.discard(a, ram.gpa(p * PAGE_SIZE), PAGE_SIZE).unwrap();
    }
    settle_and_check(&mm);
    let rep = mm.compact(Some(a), &|_, _| {}).unwrap();
    assert_eq!(rep.collapsed, 1, "{rep:?}");
    for p in 0..512 {
        let hole = holes.contains(&p);
        for (w, got) in page_words(ram, p) {
            let want = if hole { 0 } else { marker(0, p, w, 1) };
            assert_eq!(got, want, "page {p} word {w}: {}", describe(got));
        }
    }
    // The members' ranges (A's data) are free now: B gets them zeroed.
    let (b, bb) = fresh_vm_reads_zero(&mm, 14 * MIB);
    drop((ba, bb));
    mm.destroy_vm(a).unwrap();
    mm.destroy_vm(b).unwrap();
    settle_and_check(&mm);
}

/// A new VM "b" of `size` bytes, every word of which reads zero.
fn fresh_vm_reads_zero(mm: &Arc<MemoryManager>, size: u64) -> (VmId, Arc<FolioBackend>) {
    let b = mm.create_vm("b").unwrap();
    let bb = mm.backend(b, &[(GuestAddress(0), size)]).unwrap();
    let rb = Ram::of(&*bb);
    for p in 0..size / PAGE_SIZE {
        for (w, got) in page_words(rb, p) {
            assert_eq!(got, 0, "B page {p} word {w}: {}", describe(got));
        }
    }
    (b, bb)
}

/// What the guest wrote in the tail of a grow that failed was discarded:
/// it must neither come back in the tail of the next grow nor reach
/// another VM.
#[test]
fn a_failed_grows_tail_reads_zero_after_the_next_grow_and_for_another_vm() {
    let mm = manager(24 * MIB, 2);
    let a = mm.create_vm("a").unwrap();
    let size = 3 * MIB + 12 * 1024;
    let ba = mm.backend(a, &[(GuestAddress(0), size)]).unwrap();
    let ram = RwLock::new(Ram::of(&*ba));
    let pages = size / PAGE_SIZE;
    let grown = 8 * MIB / PAGE_SIZE;
    let fill = |ram: Ram, from: u64, to: u64, g: u64| {
        for p in from..to {
            for w in 0..WORDS as u64 {
                ram.write(p * PAGE_SIZE + w * 8, marker(0, p, w, g));
            }
        }
    };
    fill(*ram.read().unwrap(), 0, pages, 1);
    let grow = |fail: bool| {
        if fail {
            mm.inject_faults(vec![InjectPlan {
                point: FaultPoint::RelocateCommit,
                skip: 0,
                count: 1,
            }]);
        }
        let wrote = AtomicBool::new(false);
        let r = mm.relocate(
            a,
            GuestAddress(0),
            RelocateOp::Grow(8 * MIB),
            &mut |sw| {
                *ram.write().unwrap() = Ram(sw.new[0]);
                Ok(())
            },
            &|_, _| {
                if fail && !wrote.swap(true, SeqCst) {
                    let r = *ram.read().unwrap();
                    fill(r, pages, grown, 2);
                }
            },
        );
        assert_eq!(r.is_err(), fail, "{r:?}");
    };
    grow(true);
    grow(false);
    let r = *ram.read().unwrap();
    for p in 0..grown {
        for (w, got) in page_words(r, p) {
            let want = if p < pages { marker(0, p, w, 1) } else { 0 };
            assert_eq!(got, want, "page {p} word {w}: {}", describe(got));
        }
    }
    let (b, bb) = fresh_vm_reads_zero(&mm, 16 * MIB);
    drop((ba, bb));
    mm.destroy_vm(a).unwrap();
    mm.destroy_vm(b).unwrap();
    settle_and_check(&mm);
}
