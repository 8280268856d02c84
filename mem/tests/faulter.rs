//! Faults served on the faulting thread (`FaultDelivery::Faulter`): guest
//! memory larger than the budget round-trips through swap with no handler
//! thread at all, reads keep swapped-in pages clean and the first write is
//! caught, and a `SIGBUS` that is not a guest fault (a poisoned page, a
//! foreign mapping) still kills the process instead of looping.
//!
//! Every manager in this file uses `Faulter`, so no `uffd-handler` thread
//! may exist in this process.

mod common;

use common::*;
use mem::{
    FaultDelivery, FaultPlan, GuestAddress, InjectedFault, IoOp, MemoryManager, RelocateOp, VmId,
    PAGE_SIZE,
};
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

const GUEST: u64 = 32 * MIB;
const BUDGET: u64 = 8 * MIB;
const THREADS: u64 = 4;

fn manager() -> Arc<MemoryManager> {
    swap_manager_with(BUDGET, 2, 128 * MIB, true, FaultDelivery::Faulter)
}

fn handler_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|c| c.starts_with("uffd-handler"))
        .count()
}

/// Run `f(ram, g, page)` over every page, split between `THREADS` threads.
fn each_page(ram: Ram, g: u64, f: fn(Ram, u64, u64)) {
    let pages = ram.0.size / PAGE_SIZE;
    std::thread::scope(|s| {
        for t in 0..THREADS {
            s.spawn(move || {
                for p in (t..pages).step_by(THREADS as usize) {
                    f(ram, g, p);
                }
            });
        }
    });
}

#[test]
fn a_guest_four_times_the_budget_round_trips_with_no_handler_thread() {
    let mm = manager();
    let vm = mm.create_vm("faulter").unwrap();
    let b = mm.backend(vm, &[(GuestAddress(0), GUEST)]).unwrap();
    let ram = Ram::of(&*b);
    assert_eq!(handler_threads(), 0, "Faulter mode starts no handler");
    // Two generations of writes, each read back: every page is swapped
    // out and in several times, all on the accessing threads.
    for g in 1..=2u64 {
        each_page(ram, g, |r, g, p| {
            r.write(p * PAGE_SIZE + 8, pattern(p, 1, g))
        });
        // Read, then write another word of the same page: the read may
        // keep the swapped-in page clean, and the write must then be seen.
        each_page(ram, g, |r, g, p| {
            assert_eq!(r.read(p * PAGE_SIZE + 8), pattern(p, 1, g), "page {p}");
            r.write(p * PAGE_SIZE + 16, pattern(p, 2, g));
        });
    }
    each_page(ram, 2, |r, g, p| {
        assert_eq!(r.read(p * PAGE_SIZE + 8), pattern(p, 1, g), "page {p}");
        assert_eq!(r.read(p * PAGE_SIZE + 16), pattern(p, 2, g), "page {p}");
    });
    let s = mm.vm_stats(vm).unwrap().swap;
    assert!(s.swapin_file_pages > GUEST / PAGE_SIZE, "{s:#?}");
    assert!(s.swapout_pages > GUEST / PAGE_SIZE, "{s:#?}");
    // The read passes swapped pages in for reading: some were kept clean
    // (write-protected), and the writes that followed found them through a
    // protection fault (error code PROT|WRITE), which released the slot.
    // Had the handler taken those for missing-page faults, the write would
    // loop, or a page dropped as clean would have lost it (checked above).
    assert!(s.clean_kept_pages > 0, "{s:#?}");
    assert!(s.clean_dirtied_pages > 0, "{s:#?}");
    assert_eq!(s.read_errors + s.write_errors + s.poisoned_pages, 0);
    assert_eq!(handler_threads(), 0);
    settle_and_check(&mm);
    drop(b);
    mm.destroy_vm(vm).unwrap();
    settle_and_check(&mm);
    assert_eq!(mm.stats().swap_device.used_bytes, 0);
}

/// What a child process of this test binary does (see [`run_child`]).
const CHILD_ENV: &str = "FOLIOVM_FAULTER_CHILD";

/// Run the ignored test `name` in a child process with `CHILD_ENV` set, and
/// return how it ended; fail if it runs for more than a minute (a fault
/// served over and over).
fn run_child(name: &str) -> std::process::ExitStatus {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            name,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{name}: the child still runs after a minute: the SIGBUS loops");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A VM of 8 MiB, written and then wholly swapped out.
fn swapped_vm(mm: &Arc<MemoryManager>) -> (VmId, Arc<mem::FolioBackend>, Ram) {
    let vm = mm.create_vm("faulter-child").unwrap();
    let b = mm.backend(vm, &[(GuestAddress(0), 8 * MIB)]).unwrap();
    let ram = Ram::of(&*b);
    for p in 0..8 * MIB / PAGE_SIZE {
        ram.write(p * PAGE_SIZE, pattern(p, 0, 0));
    }
    for _ in 0..4 {
        mm.reclaim(Some(vm), 8 * MIB).unwrap();
    }
    (vm, b, ram)
}

#[test]
fn a_poisoned_guest_page_kills_its_faulter_with_sigbus() {
    let st = run_child("child_reads_a_poisoned_page");
    assert_eq!(st.signal(), Some(libc::SIGBUS), "child ended with {st:?}");
}

#[test]
#[ignore = "run by a_poisoned_guest_page_kills_its_faulter_with_sigbus in a child"]
fn child_reads_a_poisoned_page() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let mm = manager();
    let (vm, _b, ram) = swapped_vm(&mm);
    let victim = 777;
    // The first read of the victim's slot fails: the swapin poisons the
    // page, and the access that follows is a memory error, not a fault.
    mm.inject_swap_faults(vec![FaultPlan {
        op: IoOp::Read,
        fault: InjectedFault::Eio,
        skip: 0,
        count: 1,
    }])
    .unwrap();
    let v = ram.read(victim * PAGE_SIZE);
    // Not reached: the read above must kill the process.
    eprintln!("read {v:#x} from a poisoned page; vm {vm:?}");
    std::process::exit(0);
}

#[test]
fn a_sigbus_outside_guest_memory_still_kills() {
    let st = run_child("child_reads_past_the_end_of_a_file");
    assert_eq!(st.signal(), Some(libc::SIGBUS), "child ended with {st:?}");
}

#[test]
#[ignore = "run by a_sigbus_outside_guest_memory_still_kills in a child"]
fn child_reads_past_the_end_of_a_file() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    // A manager whose handler is installed, with guest memory of its own.
    let mm = manager();
    let (_vm, _b, _ram) = swapped_vm(&mm);
    // SAFETY: memfd_create takes a NUL-terminated name and flags.
    let fd = unsafe { libc::memfd_create(c"empty".as_ptr(), 0) };
    assert!(fd >= 0);
    // SAFETY: a fresh shared mapping of an empty file; touching it raises
    // SIGBUS (BUS_ADRERR), which is the point.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            PAGE_SIZE as usize,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    // SAFETY: `p` is a live mapping of one page (reading it faults).
    let v = unsafe { std::ptr::read_volatile(p.cast::<u64>()) };
    eprintln!("read {v:#x} past the end of a file");
    std::process::exit(0);
}

/// A faulting thread that waits long for memory (no swap file, the budget
/// in use) reports one memory stall and goes on when memory is freed.
#[test]
fn a_faulting_thread_that_waits_long_for_memory_reports_a_stall() {
    let mut c = config(2 * MIB, 0);
    c.fault_delivery = FaultDelivery::Faulter;
    c.reclaim.stall_report_after = Duration::from_millis(300);
    let mm = MemoryManager::new(c).unwrap();
    let vm = mm.create_vm("stalled").unwrap();
    let b = mm.backend(vm, &[(GuestAddress(0), 4 * MIB)]).unwrap();
    let ram = Ram::of(&*b);
    ram.write(0, 7);
    let t = std::thread::spawn(move || {
        ram.write(3 * MIB, 9);
        ram.read(3 * MIB)
    });
    let stalls = || mm.vm_stats(vm).unwrap().faults.memory_stalls;
    assert!(
        wait_until(Duration::from_secs(10), || stalls() > 0),
        "no stall reported"
    );
    assert!(!t.is_finished(), "a stalled fault waits, it does not fail");
    mm.discard(vm, GuestAddress(0), 2 * MIB).unwrap();
    assert_eq!(t.join().unwrap(), 9);
    assert_eq!(stalls(), 1);
    assert_eq!(mm.stats().faults.memory_stalls, 1);
    drop(b);
    mm.destroy_vm(vm).unwrap();
    settle_and_check(&mm);
}

/// A faulting thread that waits for memory sleeps until memory is freed,
/// as a parked fault does: it neither spins nor keeps the pre-zeroing
/// worker busy. Before the fix, in a second of waiting it used 470 ms of
/// CPU and kicked the worker 44,622 times (whose passes took most of the
/// rest of a core: 0.96 s for the process).
#[test]
fn a_faulting_thread_waiting_for_memory_sleeps() {
    let mut c = config(2 * MIB, 0);
    c.fault_delivery = FaultDelivery::Faulter;
    let mm = MemoryManager::new(c).unwrap();
    let vm = mm.create_vm("waiting").unwrap();
    let b = mm.backend(vm, &[(GuestAddress(0), 4 * MIB)]).unwrap();
    let ram = Ram::of(&*b);
    ram.write(0, 7);
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        tx.send(unsafe { libc::gettid() }).unwrap();
        ram.write(3 * MIB, 9);
        ram.read(3 * MIB)
    });
    let tid = rx.recv().unwrap();
    // CPU time of that thread (user + system), in clock ticks.
    let cpu = || {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<u64> = after_comm
            .split(' ')
            .skip(11)
            .take(2)
            .map(|v| v.parse().unwrap())
            .collect();
        f[0] + f[1]
    };
    std::thread::sleep(Duration::from_millis(200));
    assert!(!t.is_finished(), "the fault found memory");
    let (cpu0, kicks0) = (cpu(), mm.stats().worker_kicks);
    std::thread::sleep(Duration::from_secs(1));
    let (cpu1, kicks1) = (cpu(), mm.stats().worker_kicks);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    assert!(
        (cpu1 - cpu0) * 4 < hz && kicks1 - kicks0 < 1000,
        "a second of waiting took {} ms of CPU and kicked the worker {} times",
        (cpu1 - cpu0) * 1000 / hz,
        kicks1 - kicks0
    );
    mm.discard(vm, GuestAddress(0), 2 * MIB).unwrap();
    assert_eq!(t.join().unwrap(), 9);
    drop(b);
    mm.destroy_vm(vm).unwrap();
    settle_and_check(&mm);
}

/// A faulting thread that touches a relocation's new range in the switch,
/// before the VMM makes it live, sleeps until then and is woken by it: it
/// does not wait for its next timed look (up to 10 ms later), and reads
/// the page's data.
#[test]
fn a_fault_on_a_region_not_live_yet_wakes_when_it_goes_live() {
    let mm = manager();
    let vm = mm.create_vm("not-live").unwrap();
    let b = mm.backend(vm, &[(GuestAddress(0), 4 * MIB)]).unwrap();
    let view = View::new(mem::GuestMemoryBackend::regions(&*b));
    let gpa = 2 * MIB + 5 * PAGE_SIZE;
    let mut late = Vec::new();
    for round in 0..8u64 {
        view.write(gpa, 0x11 + round);
        mm.relocate(
            vm,
            GuestAddress(0),
            RelocateOp::ToAligned,
            &mut |sw| {
                view.switch(sw)?;
                let (ram, off) = view.ram_now(gpa);
                let reader = std::thread::spawn(move || (ram.read(off), Instant::now()));
                // Its timed looks come every 10 ms from its start: spread
                // make_live over that period.
                std::thread::sleep(Duration::from_micros(31_000 + round * 1_100));
                assert!(!reader.is_finished(), "the access waited for make_live");
                sw.make_live();
                let live = Instant::now();
                let (got, done) = reader.join().unwrap();
                assert_eq!(got, 0x11 + round, "round {round}");
                late.push(done.saturating_duration_since(live));
                Ok(())
            },
            &|_, _| {},
        )
        .unwrap();
    }
    late.sort();
    eprintln!("from make_live to the access done: {late:?}");
    // Woken at once, each access ends well within the 10 ms timed look;
    // without the wake-up they end anywhere in it, most after 2 ms.
    assert!(
        late[late.len() / 2] < Duration::from_millis(2),
        "the waiting access was not woken by make_live: {late:?}"
    );
    drop(b);
    mm.destroy_vm(vm).unwrap();
    settle_and_check(&mm);
}
