//! Relocation pause and compaction throughput, from host threads.
//!
//! ```text
//! cargo run --release -p mem --example migrate_bench -- [--size 1G] [--runs 3]
//! ```
//!
//! * Relocation: a region of `--size` filled with data (2 MiB folios) is
//!   relocated `--to-aligned` while a thread keeps writing to it through a
//!   view that the switch callback swaps under a write lock, as the VMM
//!   swaps memslots with the vCPUs paused. Prints the time inside the
//!   switch (the pause) per GiB, and the whole relocation's time.
//! * Compaction: the same amount of memory is fragmented (3 of every 4
//!   pages discarded), then compacted; prints the bytes copied per second
//!   against a plain `memcpy` of the same size measured in the same run.

use mem::{GuestAddress, GuestMemoryBackend, MemoryManager, MmConfig, RamRegion, RelocateOp};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

const PAGE: u64 = 4096;

fn parse_size(s: &str) -> u64 {
    let (n, m) = match s.chars().last() {
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        _ => (s, 1 << 20),
    };
    n.parse::<u64>().expect("size") * m
}

fn touch(r: &RamRegion, pages: u64, stride: u64, v: u64) {
    for p in (0..pages).step_by(stride as usize) {
        // SAFETY: inside the live region mapping; host threads act as vCPUs.
        unsafe { std::ptr::write_volatile(r.host_addr.add(p * PAGE).as_ptr().cast::<u64>(), v) };
    }
}

/// With `PERF_CTL_FIFO` set (`perf record --control fifo:PATH -D -1`),
/// profile only the compaction itself.
fn perf_ctl(cmd: &str) {
    if let Ok(path) = std::env::var("PERF_CTL_FIFO") {
        std::fs::write(path, format!("{cmd}\n")).expect("perf control fifo");
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |k: &str| {
        args.iter()
            .position(|a| a == k)
            .map(|i| args[i + 1].clone())
    };
    let size = arg("--size").map_or(1 << 30, |s| parse_size(&s));
    let runs: usize = arg("--runs").map_or(3, |s| s.parse().expect("runs"));
    // `--only compact` or `--only relocate` (for profiling one part).
    let only = arg("--only");
    let (do_reloc, do_compact) = match only.as_deref() {
        None => (true, true),
        Some("relocate") => (true, false),
        Some("compact") => (false, true),
        Some(o) => panic!("--only: unknown part {o:?} (relocate or compact)"),
    };
    let pages = size / PAGE;
    let gib = size as f64 / (1u64 << 30) as f64;
    let mm = MemoryManager::new(MmConfig::with_budget(2 * size + (64 << 20))).expect("manager");

    // Relocation.
    let (mut pauses, mut totals, mut huge_migrate) = (Vec::new(), Vec::new(), Vec::new());
    for run in (0..runs).filter(|_| do_reloc) {
        let vm = mm.create_vm(&format!("reloc{run}")).unwrap();
        let b = mm.backend(vm, &[(GuestAddress(0), size)]).unwrap();
        let view = Arc::new(RwLock::new(b.regions()[0]));
        touch(&view.read().unwrap(), pages, 1, 1);
        mm.wait_idle(Duration::from_secs(60));
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (view, stop) = (view.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(SeqCst) {
                    let r = view.read().unwrap();
                    touch(&r, pages, 4099, n);
                    n += 1;
                }
            })
        };
        let rep = mm
            .relocate(
                vm,
                GuestAddress(0),
                RelocateOp::ToAligned,
                &mut |sw| {
                    *view.write().unwrap() = sw.new[0];
                    Ok(())
                },
                &|_, _| {},
            )
            .expect("relocation");
        stop.store(true, SeqCst);
        writer.join().unwrap();
        pauses.push(rep.switch_ns as f64 / 1e3 / gib);
        totals.push(rep.elapsed_ns as f64 / 1e6);
        // Migration of the (2 MiB) folios themselves, for comparison.
        mm.wait_idle(Duration::from_secs(60));
        let t = Instant::now();
        let (ok, _) = mm.migrate_range(vm, GuestAddress(0), size).unwrap();
        let s = t.elapsed().as_secs_f64();
        huge_migrate.push(ok as f64 * (2 << 20) as f64 / s / 1e9);
        drop(b);
        mm.destroy_vm(vm).unwrap();
        mm.wait_idle(Duration::from_secs(60));
    }
    if do_reloc {
        println!(
        "relocation of {} MiB (2 MiB folios): pause {:.1} us per GiB (median of {runs}; goal <= 1000), whole relocation {:.1} ms; runs {:?} us/GiB",
        size >> 20,
        median(pauses.clone()),
        median(totals),
        pauses.iter().map(|p| p.round()).collect::<Vec<_>>()
    );
    }

    // Compaction against memcpy.
    let src = vec![1u8; size as usize];
    let mut dst = vec![0u8; size as usize];
    let mut memcpy = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        memcpy.push(size as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    std::hint::black_box(&dst);
    let mut compact = Vec::new();
    for run in (0..runs).filter(|_| do_compact) {
        let vm = mm.create_vm(&format!("frag{run}")).unwrap();
        let b = mm.backend(vm, &[(GuestAddress(0), size)]).unwrap();
        let r = b.regions()[0];
        touch(&r, pages, 1, 7);
        for p in (0..pages).filter(|p| p % 4 != 0) {
            mm.discard(vm, GuestAddress(p * PAGE), PAGE).unwrap();
        }
        mm.wait_idle(Duration::from_secs(60));
        perf_ctl("enable");
        let rep = mm.compact(None, &|_, _| {}).unwrap();
        perf_ctl("disable");
        let copy_s = rep.elapsed_ns as f64 / 1e9;
        compact.push(rep.migrated_bytes as f64 / copy_s / 1e9);
        eprintln!(
            "compaction run {run}: rebuilt {} free 2 MiB blocks ({} -> {}), migrated {} folios ({} MiB, {} MiB of it copied) in {:.1} ms",
            rep.blocks_rebuilt,
            rep.free_pmd_blocks_before,
            rep.free_pmd_blocks_after,
            rep.folios_migrated,
            rep.migrated_bytes >> 20,
            rep.copied_bytes >> 20,
            copy_s * 1e3
        );
        drop(b);
        mm.destroy_vm(vm).unwrap();
        mm.wait_idle(Duration::from_secs(60));
    }
    let m = median(memcpy);
    if do_compact {
        let c = median(compact);
        println!(
        "compaction (4 KiB folios): {c:.2} GB/s of guest memory migrated (whole run) vs memcpy {m:.2} GB/s: {:.0}% (goal >= 50%)",
        c / m * 100.0
    );
    }
    if do_reloc {
        let h = median(huge_migrate);
        println!(
            "migration of 2 MiB folios: {h:.2} GB/s vs memcpy {m:.2} GB/s: {:.0}%",
            h / m * 100.0
        );
    }
}
