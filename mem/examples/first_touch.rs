//! First-touch benchmark with host threads: touch N bytes of fresh guest
//! RAM, once on plain anonymous THP memory (the kernel faults) and once on
//! the folio memory manager (userfaultfd + UFFDIO_MOVE from a pre-zeroed
//! pool), and print both times, the ratio and the metadata cost.
//!
//! `cargo run --release -p mem --example first_touch -- 1G [threads]`
//!
//! Host threads fault far more cheaply than a KVM guest (a uffd fault costs
//! a guest ~80 µs here), so this measures the manager's own overhead; the
//! guest-side benchmark is `foliovm bench first-touch`.

use mem::anon::AnonBackend;
use mem::bench::parse_size;
use mem::{GuestAddress, GuestMemoryBackend, MemoryManager, MmConfig, Order, RamRegion, PAGE_SIZE};
use std::time::{Duration, Instant};

/// Touch every page of `r` (one write per 4 KiB) from `threads` threads.
fn touch(r: RamRegion, threads: u64) -> Duration {
    let pages = r.size / PAGE_SIZE;
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let (lo, hi) = (pages * t / threads, pages * (t + 1) / threads);
            s.spawn(move || {
                for p in lo..hi {
                    // SAFETY: page `p` is inside the live mapping of `r`, and
                    // each thread writes only its own pages.
                    unsafe {
                        std::ptr::write_volatile(r.host_addr.add(p * PAGE_SIZE).as_ptr(), 1u8)
                    };
                }
            });
        }
    });
    start.elapsed()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let size = args.get(1).and_then(|s| parse_size(s)).unwrap_or(1 << 30);
    let threads = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2);
    let size = size / (2 << 20) * (2 << 20);
    println!(
        "first touch of {} MiB with {threads} host threads",
        size >> 20
    );

    // The first use of host memory can be far slower than later ones (this
    // host is itself a VM): warm it up once so both runs see warm memory.
    let warm = AnonBackend::new(&[(GuestAddress(0), size)]).expect("anon memory");
    let t_cold = touch(warm.regions()[0], threads);
    drop(warm);
    println!(
        "anon, cold host memory (warm-up, not compared): {:.3} ms",
        t_cold.as_secs_f64() * 1e3
    );

    let anon = AnonBackend::new(&[(GuestAddress(0), size)]).expect("anon memory");
    let t_anon = touch(anon.regions()[0], threads);
    drop(anon);
    println!(
        "anon  (kernel faults, THP): {:>9.3} ms",
        t_anon.as_secs_f64() * 1e3
    );

    let mm = MemoryManager::new(MmConfig::with_budget(size)).expect("memory manager");
    let prep = Instant::now();
    mm.wait_idle(Duration::from_secs(600));
    let t_prep = prep.elapsed();
    let vm = mm.create_vm("bench").expect("vm");
    let b = mm.backend(vm, &[(GuestAddress(0), size)]).expect("backend");
    let t_folio = touch(b.regions()[0], threads);
    println!(
        "folio (uffd MOVE from pool): {:>8.3} ms",
        t_folio.as_secs_f64() * 1e3
    );
    println!(
        "ratio anon/folio: {:.2}x",
        t_anon.as_secs_f64() / t_folio.as_secs_f64()
    );
    println!(
        "pool pre-zeroing beforehand (off the fault path): {:.1} ms",
        t_prep.as_secs_f64() * 1e3
    );

    let vs = mm.vm_stats(vm).expect("stats");
    let ms = mm.stats();
    let f = &vs.faults;
    println!(
        "faults: {} events, installed by order {:?}, raced {}, parked {}, copy/zeropage fallbacks {}/{}",
        f.events,
        f.installed_by_order,
        f.raced,
        f.parked_prezero + f.parked_oom,
        f.fallback_copy_pages,
        f.fallback_zeropage_pages
    );
    println!(
        "fault service latency: p50 <= {} ns, p99 <= {} ns",
        f.latency.quantile_ns(0.5),
        f.latency.quantile_ns(0.99)
    );
    println!(
        "resident: {} MiB, of it in 2 MiB folios: {} MiB",
        vs.resident_bytes() >> 20,
        vs.resident_bytes_by_order[Order::PMD.index()] >> 20
    );
    println!(
        "metadata: {} bytes for {} guest pages = {:.3} bytes/page (target <= 8)",
        ms.metadata_bytes,
        ms.guest_pages,
        ms.metadata_bytes_per_guest_page()
    );
    drop(b);
    mm.destroy_vm(vm).expect("destroy");
}
