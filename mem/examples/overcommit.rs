//! Overcommit benchmark with host threads (no KVM): a working set twice the
//! memory budget, touched in three patterns, under two setups in one run:
//!
//! * kernel — plain anonymous memory in a child process placed in a cgroup
//!   v1 memory cgroup limited to the budget, with a host swap file on the
//!   same disk (created, `mkswap`/`swapon`ed and removed by this program;
//!   needs root, `/sys/fs/cgroup/memory` and `swapon` on a file);
//! * foliovm — the memory manager with the same budget and its own swap
//!   file in the same directory, faults served by its handler threads.
//!
//! ```text
//! cargo run --release -p mem --example overcommit -- \
//!     [--budget 256M] [--threads 4] [--dir /var/tmp] [--ops 200000]
//! ```
//!
//! Each access reads and writes one word of a 4 KiB page. `sequential`
//! makes two passes over each thread's share of the working set; `uniform`
//! and `zipfian` (θ = 0.99, ranks scattered over the pages) make `--ops`
//! accesses. It prints accesses per second per pattern and setup, the
//! ratio foliovm/kernel (only where both ran), foliovm's swapin latency
//! from file and from the swap cache, and a raw 4 KiB `O_DIRECT` pread
//! of the same disk for comparison.

use mem::{
    GuestAddress, GuestMemoryBackend, Histogram, MemoryManager, MmConfig, ReclaimConfig,
    SwapConfig, SwapTarget, PAGE_SIZE,
};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Pattern {
    Sequential,
    Zipfian,
    Uniform,
}

const PATTERNS: [Pattern; 3] = [Pattern::Sequential, Pattern::Zipfian, Pattern::Uniform];

impl Pattern {
    fn name(self) -> &'static str {
        match self {
            Pattern::Sequential => "sequential",
            Pattern::Zipfian => "zipfian",
            Pattern::Uniform => "uniform",
        }
    }
    fn parse(s: &str) -> Option<Pattern> {
        PATTERNS.into_iter().find(|p| p.name() == s)
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Zipf over `n` ranks (Gray et al., "Quickly generating billion-record
/// synthetic databases"), ranks scattered over pages by an odd multiplier.
struct Zipf {
    n: u64,
    theta: f64,
    alpha: f64,
    zetan: f64,
    eta: f64,
}

impl Zipf {
    fn new(n: u64, theta: f64) -> Zipf {
        let zeta = |k: u64| (1..=k).map(|i| 1.0 / (i as f64).powf(theta)).sum::<f64>();
        let zetan = zeta(n);
        let zeta2 = zeta(2);
        Zipf {
            n,
            theta,
            alpha: 1.0 / (1.0 - theta),
            zetan,
            eta: (1.0 - (2.0 / n as f64).powf(1.0 - theta)) / (1.0 - zeta2 / zetan),
        }
    }
    fn sample(&self, rng: &mut Rng) -> u64 {
        let u = rng.unit();
        let uz = u * self.zetan;
        let rank = if uz < 1.0 {
            0
        } else if uz < 1.0 + 0.5f64.powf(self.theta) {
            1
        } else {
            ((self.n as f64) * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64
        };
        // Scatter ranks over the working set (n is a power of two).
        (rank.min(self.n - 1).wrapping_mul(0x9E37_79B9_7F4A_7C15 | 1)) % self.n
    }
}

/// Run `pattern` over `pages` pages at `base` from `threads` threads; returns
/// accesses per second.
fn run_pattern(base: usize, pages: u64, pattern: Pattern, threads: u64, ops: u64) -> f64 {
    let zipf = Zipf::new(pages, 0.99);
    let start = Instant::now();
    let total: u64 = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let zipf = &zipf;
                s.spawn(move || {
                    let mut rng = Rng(0x1234_5678_9abc_def1 ^ (t + 1).wrapping_mul(0x9E37_79B9));
                    let (lo, hi) = (pages * t / threads, pages * (t + 1) / threads);
                    let n = match pattern {
                        Pattern::Sequential => 2 * (hi - lo),
                        _ => ops / threads,
                    };
                    for i in 0..n {
                        let p = match pattern {
                            Pattern::Sequential => lo + i % (hi - lo),
                            Pattern::Uniform => rng.next() % pages,
                            Pattern::Zipfian => zipf.sample(&mut rng),
                        };
                        let addr =
                            (base + (p * PAGE_SIZE) as usize + (t as usize % 512) * 8) as *mut u64;
                        // SAFETY: the address is inside the working-set
                        // mapping, which outlives the scope; each thread
                        // owns its own word of every page.
                        unsafe {
                            let v = std::ptr::read_volatile(addr);
                            std::ptr::write_volatile(addr, v.wrapping_add(1));
                        }
                    }
                    n
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).sum()
    });
    total as f64 / start.elapsed().as_secs_f64()
}

/// Write every page once (the first touch, not timed in the results).
fn populate(base: usize, pages: u64) {
    for p in 0..pages {
        // SAFETY: inside the working-set mapping.
        unsafe { std::ptr::write_volatile((base + (p * PAGE_SIZE) as usize) as *mut u64, p) };
    }
}

fn parse_size(s: &str) -> Option<u64> {
    let (num, mul) = match s.as_bytes().last()? {
        b'G' | b'g' => (&s[..s.len() - 1], 1 << 30),
        b'M' | b'm' => (&s[..s.len() - 1], 1 << 20),
        _ => (s, 1),
    };
    num.parse::<u64>().ok().map(|n| n * mul)
}

struct Args {
    budget: u64,
    threads: u64,
    dir: PathBuf,
    ops: u64,
    /// Skip the kernel baseline (for profiling foliovm alone; no ratios).
    skip_kernel: bool,
}

fn args() -> Args {
    let mut a = Args {
        budget: 256 << 20,
        threads: 4,
        dir: PathBuf::from("/var/tmp"),
        ops: 200_000,
        skip_kernel: false,
    };
    let mut v: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = v.iter().position(|x| x == "--skip-kernel") {
        a.skip_kernel = true;
        v.remove(i);
    }
    for w in v.chunks(2) {
        let val = w.get(1).map(String::as_str).unwrap_or("");
        match w[0].as_str() {
            "--budget" => a.budget = parse_size(val).expect("--budget SIZE"),
            "--threads" => a.threads = val.parse().expect("--threads N"),
            "--dir" => a.dir = PathBuf::from(val),
            "--ops" => a.ops = val.parse().expect("--ops N"),
            o => panic!("unknown option {o}"),
        }
    }
    a.budget = a.budget / (2 << 20) * (2 << 20);
    a
}

/// Child side of the kernel baseline: wait until the parent has put us in
/// the cgroup, then map, populate and run, and print the rates.
fn kernel_child(ws: u64, threads: u64, ops: u64) {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).unwrap();
    // SAFETY: a fresh private anonymous mapping, owned by this process.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            ws as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(base, libc::MAP_FAILED);
    let pages = ws / PAGE_SIZE;
    populate(base as usize, pages);
    for p in PATTERNS {
        let (cpu0, vm0) = (cpu_time(), vmstat_swap());
        let r = run_pattern(base as usize, pages, p, threads, ops);
        let (cpu, vm1) = ((cpu_time() - cpu0).as_secs_f64(), vmstat_swap());
        println!(
            "RESULT {} {r} {cpu} {} {}",
            p.name(),
            vm1.0 - vm0.0,
            vm1.1 - vm0.1
        );
    }
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    match out.status.success() {
        true => Ok(()),
        false => Err(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// One pattern's kernel result: rate, CPU seconds, pages swapped in and out.
type KernelResult = (Pattern, f64, f64, u64, u64);

/// The kernel baseline: host swap file + cgroup v1 limit + child process.
fn kernel_baseline(a: &Args, ws: u64) -> Result<Vec<KernelResult>, String> {
    let swap = a
        .dir
        .join(format!("foliovm-bench-{}.swap", std::process::id()));
    let cg = PathBuf::from(format!(
        "/sys/fs/cgroup/memory/foliovm-bench-{}",
        std::process::id()
    ));
    let result = (|| {
        let f = std::fs::File::create(&swap).map_err(|e| format!("{}: {e}", swap.display()))?;
        use std::os::fd::AsRawFd;
        // SAFETY: fallocate on a file we own; no pointers.
        if unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, (2 * ws) as libc::off_t) } != 0 {
            return Err(format!("fallocate: {}", std::io::Error::last_os_error()));
        }
        drop(f);
        std::fs::set_permissions(&swap, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(|e| e.to_string())?;
        run(Command::new("mkswap").arg(&swap))?;
        run(Command::new("swapon").arg(&swap))?;
        std::fs::create_dir(&cg).map_err(|e| format!("{}: {e}", cg.display()))?;
        std::fs::write(cg.join("memory.limit_in_bytes"), a.budget.to_string())
            .map_err(|e| format!("memory.limit_in_bytes: {e}"))?;
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--child",
                &ws.to_string(),
                &a.threads.to_string(),
                &a.ops.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        std::fs::write(cg.join("cgroup.procs"), child.id().to_string())
            .map_err(|e| format!("cgroup.procs: {e}"))?;
        child.stdin.take().unwrap().write_all(b"go\n").unwrap();
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!("kernel child failed: {}", out.status));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let res: Vec<KernelResult> = text
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                (w.next()? == "RESULT").then_some(())?;
                let p = Pattern::parse(w.next()?)?;
                let mut num = || w.next()?.parse::<f64>().ok();
                let (r, cpu, si, so) = (num()?, num()?, num()?, num()?);
                Some((p, r, cpu, si as u64, so as u64))
            })
            .collect();
        match res.len() {
            3 => Ok(res),
            _ => Err(format!("kernel child printed {text:?}")),
        }
    })();
    // Teardown whatever was set up.
    let _ = std::fs::remove_dir(&cg);
    let _ = run(Command::new("swapoff").arg(&swap));
    let _ = std::fs::remove_file(&swap);
    result
}

struct FolioResult {
    rates: Vec<(Pattern, f64)>,
    swapin: Histogram,
    swapcache: Histogram,
    summary: String,
}

fn foliovm(a: &Args, ws: u64) -> Result<FolioResult, String> {
    let mm = MemoryManager::new(MmConfig {
        budget_bytes: a.budget,
        handler_threads: (2 * a.threads as usize).max(4),
        prezero_limit_bytes: None,
        swap: Some(SwapConfig {
            target: SwapTarget::Dir(a.dir.clone()),
            size_bytes: 2 * ws,
        }),
        reclaim: ReclaimConfig::default(),
    })
    .map_err(|e| format!("{e}: {:?}", std::error::Error::source(&e)))?;
    let vm = mm.create_vm("bench").map_err(|e| e.to_string())?;
    let b = mm
        .backend(vm, &[(GuestAddress(0), ws)])
        .map_err(|e| e.to_string())?;
    let base = b.regions()[0].host_addr.raw();
    let pages = ws / PAGE_SIZE;
    populate(base, pages);
    let mut rates = Vec::new();
    let mut per_pattern = String::new();
    for p in PATTERNS {
        let (before, cpu0) = (mm.stats(), cpu_time());
        let rate = run_pattern(base, pages, p, a.threads, a.ops);
        let (after, cpu1) = (mm.stats(), cpu_time());
        per_pattern += &pattern_summary(p, &before, &after, cpu1 - cpu0);
        rates.push((p, rate));
    }
    let s = mm.stats();
    let summary = format!(
        "swapout {} pages, swapin {} pages in {} reads (+{} from swap cache), zero-dropped {}, \
         sampled {} folios ({} refaulted), direct reclaims {}, metadata {:.2} B/guest page",
        s.swap.swapout_pages,
        s.swap.swapin_file_pages,
        s.swap.swapin_file_folios,
        s.swap.swapin_cache_folios,
        s.swap.zero_dropped_pages,
        s.swap.sampled_folios,
        s.swap.sample_refaults,
        s.swap.direct_reclaims,
        s.metadata_bytes_per_guest_page(),
    );
    drop(b);
    let _ = mm.destroy_vm(vm);
    Ok(FolioResult {
        rates,
        swapin: s.swap.swapin_latency,
        swapcache: s.swap.swapcache_latency,
        summary: summary + &per_pattern,
    })
}

/// Host-wide `pswpin` and `pswpout` from `/proc/vmstat` (the kernel
/// baseline's swap traffic, as nothing else on the host swaps).
fn vmstat_swap() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/vmstat").unwrap_or_default();
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
            .unwrap_or(0)
    };
    (get("pswpin "), get("pswpout "))
}

/// User + system CPU time of this process so far (all its threads).
fn cpu_time() -> Duration {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// What foliovm did during one pattern: counter deltas and CPU time.
fn pattern_summary(p: Pattern, b: &mem::MmStats, a: &mem::MmStats, cpu: Duration) -> String {
    let (sb, sa) = (&b.swap, &a.swap);
    let d = |f: fn(&mem::SwapStats) -> u64| f(sa) - f(sb);
    let (dv_b, dv_a) = (&b.swap_device, &a.swap_device);
    let writes = dv_a.writes - dv_b.writes;
    let wbytes = dv_a.write_bytes - dv_b.write_bytes;
    format!(
        "\n  {:<10} cpu {:.2} s; swapin {} pages in {} reads (+{} cache), swapout {} pages in {} \
         writes (avg {} KiB), clean-dropped {}, order-0 fallbacks {}, sampled {} (refaulted {}), \
         direct reclaims {}",
        p.name(),
        cpu.as_secs_f64(),
        d(|s| s.swapin_file_pages),
        d(|s| s.swapin_file_folios),
        d(|s| s.swapin_cache_folios),
        d(|s| s.swapout_pages),
        writes,
        (wbytes / writes.max(1)) >> 10,
        d(|s| s.clean_dropped_pages),
        d(|s| s.swapout_fallback_order0),
        d(|s| s.sampled_folios),
        d(|s| s.sample_refaults),
        d(|s| s.direct_reclaims),
    )
}

/// p50/p99 of 4 KiB O_DIRECT preads at random offsets of a fresh file.
fn raw_pread(dir: &Path) -> Result<(Duration, Duration), String> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let path = dir.join(format!("foliovm-bench-{}.raw", std::process::id()));
    let size: u64 = 256 << 20;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&path);
    let layout = std::alloc::Layout::from_size_align(1 << 20, 4096).unwrap();
    // SAFETY: non-zero layout; freed below with the same layout.
    let buf = unsafe { std::alloc::alloc_zeroed(layout) };
    // SAFETY: `buf` is a live allocation of 1 MiB.
    let chunk = unsafe { std::slice::from_raw_parts_mut(buf, 1 << 20) };
    for off in (0..size).step_by(1 << 20) {
        chunk.fill((off >> 20) as u8);
        f.write_all_at(chunk, off).map_err(|e| e.to_string())?;
    }
    let mut rng = Rng(42);
    let mut lat: Vec<Duration> = (0..2000)
        .map(|_| {
            let off = rng.next() % (size / PAGE_SIZE) * PAGE_SIZE;
            let t = Instant::now();
            f.read_exact_at(&mut chunk[..PAGE_SIZE as usize], off)
                .unwrap();
            t.elapsed()
        })
        .collect();
    // SAFETY: allocated above with `layout`.
    unsafe { std::alloc::dealloc(buf, layout) };
    lat.sort();
    Ok((lat[lat.len() / 2], lat[lat.len() * 99 / 100]))
}

fn us(ns: u64) -> String {
    format!("{:.0} µs", ns as f64 / 1000.0)
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("--child") {
        let n = |i: usize| argv[i].parse::<u64>().unwrap();
        kernel_child(n(2), n(3), n(4));
        return;
    }
    let a = args();
    let ws = 2 * a.budget;
    println!(
        "overcommit: budget {} MiB, working set {} MiB, {} threads, {} ops (uniform/zipfian), swap in {}",
        a.budget >> 20,
        ws >> 20,
        a.threads,
        a.ops,
        a.dir.display()
    );
    let kernel = match a.skip_kernel {
        true => Err("skipped (--skip-kernel)".to_string()),
        false => kernel_baseline(&a, ws),
    };
    let folio = foliovm(&a, ws);
    let raw = raw_pread(&a.dir);
    println!(
        "{:<11} {:>16} {:>16} {:>8}",
        "pattern", "kernel acc/s", "foliovm acc/s", "ratio"
    );
    for p in PATTERNS {
        let k = kernel
            .as_ref()
            .ok()
            .and_then(|r| r.iter().find(|x| x.0 == p))
            .map(|x| x.1);
        let f = folio
            .as_ref()
            .ok()
            .and_then(|r| r.rates.iter().find(|x| x.0 == p))
            .map(|x| x.1);
        let fmt = |v: Option<f64>| v.map_or("did not run".to_string(), |v| format!("{v:.0}"));
        let ratio = match (k, f) {
            (Some(k), Some(f)) => format!("{:.2}x", f / k),
            _ => "-".to_string(),
        };
        println!(
            "{:<11} {:>16} {:>16} {:>8}",
            p.name(),
            fmt(k),
            fmt(f),
            ratio
        );
    }
    match &kernel {
        Err(e) => {
            println!("kernel baseline (plain process, cgroup v1 + host swap file) did not run: {e}")
        }
        Ok(r) => {
            println!("kernel baseline: a plain host process (not a KVM guest) in a cgroup v1 limit with a host swap file");
            let lines: Vec<String> = r
                .iter()
                .map(|x| {
                    format!(
                        "\n  {:<10} cpu {:.2} s; pswpin {}, pswpout {}",
                        x.0.name(),
                        x.2,
                        x.3,
                        x.4
                    )
                })
                .collect();
            println!(
                "kernel child (user+sys cpu of the process, /proc/vmstat deltas):{}",
                lines.concat()
            );
        }
    }
    match &folio {
        Ok(r) => {
            println!(
                "foliovm swapin from file: p50 <= {}, p99 <= {} ({} swapins; log2 buckets)",
                us(r.swapin.quantile_ns(0.5)),
                us(r.swapin.quantile_ns(0.99)),
                r.swapin.count()
            );
            println!(
                "foliovm refault from swap cache: p50 <= {}, p99 <= {} ({} refaults)",
                us(r.swapcache.quantile_ns(0.5)),
                us(r.swapcache.quantile_ns(0.99)),
                r.swapcache.count()
            );
            println!("foliovm: {}", r.summary);
        }
        Err(e) => println!("foliovm did not run: {e}"),
    }
    match raw {
        Ok((p50, p99)) => println!(
            "raw 4 KiB O_DIRECT pread: p50 {:.0} µs, p99 {:.0} µs",
            p50.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6
        ),
        Err(e) => println!("raw pread did not run: {e}"),
    }
}
