//! What one `UFFDIO_MOVE` of 4 KiB pages costs, and why the count of
//! calls matters more than the count of pages: each call ends with a TLB
//! flush of the source range, which interrupts every other CPU running a
//! thread of the process. Here (a software KVM) that interrupt is an IPI
//! through the hypervisor.
//!
//! Moves 512 separately faulted 4 KiB pages (512 folios) out of an
//! unregistered range into a registered one, either by one call for the
//! whole range (the kernel batches the flush of present pages) or by one
//! call per page, with the other CPU idle or running a thread of this
//! process. Prints the median cost per page of each.
//!
//! ```text
//! cargo run --release -p mem --example move_cost [-- --rounds 30]
//! ```

use mem::anon::AnonMapping;
use mem::sys::userfaultfd::{RawUffd, FEATURE_MOVE, REGISTER_MODE_MISSING};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Instant;

const PAGE: usize = 4096;
const PAGES: usize = 512;

/// Pin the calling thread to `cpu`.
fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside
    // it; sched_setaffinity reads it for the calling thread (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) != 0 {
            eprintln!(
                "sched_setaffinity({cpu}): {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

fn madvise(addr: usize, len: usize, advice: libc::c_int) {
    // SAFETY: the ranges passed are inside mappings this program owns and
    // holds no references into; the advice values used only change THP
    // policy or drop pages.
    let rc = unsafe { libc::madvise(addr as *mut libc::c_void, len, advice) };
    assert_eq!(rc, 0, "madvise: {}", std::io::Error::last_os_error());
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rounds: usize = args
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("--rounds takes a number"))
        .unwrap_or(30);
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
    if ncpu < 2 {
        eprintln!("one CPU: there is no other CPU to interrupt; the busy rows mean nothing");
    }
    let len = PAGES * PAGE;
    let src_map = AnonMapping::new(len as u64).expect("map source");
    let dst_map = AnonMapping::new(len as u64).expect("map destination");
    let (src, dst) = (src_map.host_addr().raw(), dst_map.host_addr().raw());
    // 4 KiB folios, not one THP.
    madvise(src, len, libc::MADV_NOHUGEPAGE);
    madvise(dst, len, libc::MADV_NOHUGEPAGE);
    let uffd = RawUffd::open(FEATURE_MOVE).expect("userfaultfd with UFFD_FEATURE_MOVE");
    // SAFETY: `dst_map` is this program's own fresh mapping, reached only
    // by the moves below (pages are moved in, never read or written here).
    unsafe { uffd.register(dst, len, REGISTER_MODE_MISSING) }.expect("register the destination");
    pin_to(0);

    let stop = AtomicBool::new(false);
    let busy = AtomicBool::new(false);
    std::thread::scope(|s| {
        // The other CPU: idle until `busy`, then spinning in user space, a
        // thread of this process as a vCPU or a faulting thread would be.
        s.spawn(|| {
            pin_to(1 % ncpu);
            while !stop.load(Relaxed) {
                if busy.load(Relaxed) {
                    std::hint::spin_loop();
                } else {
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
            }
        });
        println!("UFFDIO_MOVE of {PAGES} x 4 KiB folios, median of {rounds} rounds, us per page:");
        for other_busy in [false, true] {
            busy.store(other_busy, Relaxed);
            std::thread::sleep(std::time::Duration::from_millis(20));
            for per_page in [false, true] {
                let mut samples = Vec::with_capacity(rounds);
                let calls: Vec<(usize, usize)> = match per_page {
                    true => (0..PAGES).map(|p| (p * PAGE, PAGE)).collect(),
                    false => vec![(0, len)],
                };
                for _ in 0..rounds {
                    for p in 0..PAGES {
                        // SAFETY: inside the source mapping, which nothing
                        // else references; each page becomes its own folio.
                        unsafe { std::ptr::write_volatile((src + p * PAGE) as *mut u64, p as u64) };
                    }
                    let t = Instant::now();
                    for &(off, n) in &calls {
                        // SAFETY: both ranges belong to this program and
                        // nothing references them; the source pages are
                        // present and the destination is empty.
                        unsafe { uffd.move_pages(dst + off, src + off, n as u64, 0) }
                            .expect("UFFDIO_MOVE");
                    }
                    samples.push(t.elapsed().as_secs_f64() * 1e6 / PAGES as f64);
                    madvise(dst, len, libc::MADV_DONTNEED);
                }
                println!(
                    "  other CPU {:<32} {:<22} {:>7.2}",
                    if other_busy {
                        "running a thread of this process"
                    } else {
                        "idle"
                    },
                    if per_page {
                        "one call per page"
                    } else {
                        "one call for all"
                    },
                    median(samples)
                );
            }
        }
        stop.store(true, Relaxed);
    });
}
