//! The overcommit benchmark from host threads (no KVM): a working set twice
//! the memory budget, touched in three patterns, under two setups in one
//! run, so that foliovm's swap gets a real kernel baseline on hosts where a
//! KVM guest cannot run under kernel swap (DESIGN.md §2):
//!
//! * kernel — plain anonymous memory in a child process placed in a cgroup
//!   v1 memory cgroup limited to the budget, with a host swap file on the
//!   same disk (created, `mkswap`/`swapon`ed and removed here; needs root,
//!   `/sys/fs/cgroup/memory` and `swapon` on a file);
//! * foliovm — the [`MemoryManager`] with the same budget and its own swap
//!   file in the same directory, faults served by its handler threads.
//!
//! Each access reads and writes one word of a 4 KiB page. `sequential`
//! makes two passes over each thread's share of the working set; `uniform`
//! and `zipfian` (θ = 0.99, ranks scattered over the pages) make `ops`
//! accesses. The report ([`HostBenchReport`]) gives accesses per second per
//! pattern and setup, the ratio foliovm/kernel with its goal only where
//! both ran, foliovm's swapin latency from the file and from the swap cache
//! per pattern, and raw `O_DIRECT` preads of the same sizes on the same disk.
//!
//! Used by `mem/examples/overcommit.rs` and by `foliovm bench overcommit`.
//! The kernel side runs in a child process: the caller names the command
//! that re-enters [`kernel_child`] ([`ChildCommand`]).

use crate::{
    FaultDelivery, GuestAddress, GuestMemoryBackend, Histogram, MemoryManager, MmConfig, MmStats,
    ReclaimConfig, SwapConfig, SwapStats, SwapTarget, PAGE_SIZE,
};
use std::fmt;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// An access pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Two passes over each thread's share of the working set.
    Sequential,
    /// Zipf-distributed pages (θ = 0.99), ranks scattered.
    Zipfian,
    /// Uniformly random pages.
    Uniform,
}

impl Pattern {
    /// Every pattern, in the order they run.
    pub const ALL: [Pattern; 3] = [Pattern::Sequential, Pattern::Zipfian, Pattern::Uniform];

    /// The name printed and accepted.
    pub fn name(self) -> &'static str {
        match self {
            Pattern::Sequential => "sequential",
            Pattern::Zipfian => "zipfian",
            Pattern::Uniform => "uniform",
        }
    }

    /// Parse a name, or the workload guest's short name (`seq`, `zipf`).
    pub fn parse(s: &str) -> Option<Pattern> {
        match s {
            "seq" => Some(Pattern::Sequential),
            "zipf" => Some(Pattern::Zipfian),
            _ => Pattern::ALL.into_iter().find(|p| p.name() == s),
        }
    }

    /// The goal for the ratio foliovm/kernel.
    pub fn goal(self) -> f64 {
        match self {
            Pattern::Sequential => 2.0,
            Pattern::Zipfian => 1.3,
            Pattern::Uniform => 1.0,
        }
    }
}

/// How to start the kernel-side child: `exe args… <ws> <threads> <ops>
/// <patterns>`, which must call [`kernel_child`] with the four values.
#[derive(Clone, Debug)]
pub struct ChildCommand {
    /// The executable (usually `std::env::current_exe()`).
    pub exe: PathBuf,
    /// Arguments before the four values.
    pub args: Vec<String>,
}

/// Settings of one run.
#[derive(Clone, Debug)]
pub struct HostBenchOpts {
    /// Budget: cgroup limit for the kernel, pool for foliovm (rounded down
    /// to 2 MiB). The working set is twice this.
    pub budget: u64,
    /// Accessing threads.
    pub threads: u64,
    /// Directory of both swap files (the same disk for both).
    pub dir: PathBuf,
    /// Accesses of `uniform` and `zipfian`, all threads together.
    pub ops: u64,
    /// Patterns to run, in order.
    pub patterns: Vec<Pattern>,
    /// Skip the kernel baseline (profiling foliovm alone; no ratios).
    pub skip_kernel: bool,
    /// Rounds of both setups, one after the other ([`run_rounds`]).
    pub rounds: u32,
    /// How foliovm's faults are served: by handler threads (what VMs use)
    /// or on the faulting thread (host threads only, see
    /// [`FaultDelivery::Faulter`]).
    pub faults: FaultDelivery,
    /// The kernel-side child.
    pub child: ChildCommand,
}

impl HostBenchOpts {
    /// Parse the examples' command line: `--budget SIZE`
    /// ([`parse_size`]), `--threads N`, `--dir DIR`, `--ops N`,
    /// `--patterns a,b`, `--rounds N`, `--faults handlers|faulter` and
    /// `--skip-kernel`; the rest keeps its default (a 256M budget, four
    /// threads, /var/tmp, 200000 ops, every pattern, one round, handler
    /// threads). `child` is the command for the kernel side.
    ///
    /// # Errors
    /// An unknown option or a bad value, named.
    pub fn parse(args: &[String], child: ChildCommand) -> Result<HostBenchOpts, String> {
        let mut o = HostBenchOpts {
            budget: 256 << 20,
            threads: 4,
            dir: PathBuf::from("/var/tmp"),
            ops: 200_000,
            patterns: Pattern::ALL.to_vec(),
            skip_kernel: false,
            rounds: 1,
            faults: FaultDelivery::Handlers,
            child,
        };
        let mut args = args.to_vec();
        if let Some(i) = args.iter().position(|x| x == "--skip-kernel") {
            o.skip_kernel = true;
            args.remove(i);
        }
        for w in args.chunks(2) {
            let val = w.get(1).map(String::as_str).unwrap_or("");
            let bad = || format!("bad value {val:?} for {}", w[0]);
            match w[0].as_str() {
                "--budget" => o.budget = parse_size(val).ok_or_else(bad)?,
                "--threads" => o.threads = val.parse().map_err(|_| bad())?,
                "--dir" => o.dir = PathBuf::from(val),
                "--ops" => o.ops = val.parse().map_err(|_| bad())?,
                "--rounds" => o.rounds = val.parse().ok().filter(|&n| n > 0).ok_or_else(bad)?,
                "--faults" => {
                    o.faults = match val {
                        "handlers" => FaultDelivery::Handlers,
                        "faulter" => FaultDelivery::Faulter,
                        _ => return Err(format!("{}; expected handlers or faulter", bad())),
                    }
                }
                "--patterns" => {
                    o.patterns = val
                        .split(',')
                        .map(|p| Pattern::parse(p).ok_or_else(bad))
                        .collect::<Result<_, _>>()?
                }
                other => return Err(format!("unknown option {other}")),
            }
        }
        if o.threads == 0 || o.budget < 2 << 20 {
            return Err("the benchmark needs a thread and a budget of at least 2M".into());
        }
        if o.threads > MAX_THREADS {
            return Err(format!("--threads is at most {MAX_THREADS}"));
        }
        Ok(o)
    }

    /// The working set: twice the budget, in whole 2 MiB blocks.
    pub fn working_set(&self) -> u64 {
        2 * (self.budget / (2 << 20) * (2 << 20))
    }
}

/// Accesses that waited at least [`STALL_NS`], as the accessing thread
/// saw them: a fault (and for the kernel, also a reclaim it ran). The same
/// clock, threads and pattern under both setups, so their means compare
/// the whole cost of a fault, which a ratio of throughputs hides.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stalls {
    /// Accesses that waited.
    pub count: u64,
    /// Their total wait, ns.
    pub sum_ns: u64,
    /// Their distribution.
    pub hist: Histogram,
}

/// Every word of `words` as a number, or `None` if one is not.
fn numbers<'a>(words: impl Iterator<Item = &'a str>) -> Option<Vec<u64>> {
    words.map(|x| x.parse().ok()).collect()
}

/// An access this slow waited for something: a resident page is touched
/// in well under a microsecond.
pub const STALL_NS: u64 = 4_000;

impl Stalls {
    fn record(&mut self, ns: u64) {
        if ns < STALL_NS {
            return;
        }
        self.count += 1;
        self.sum_ns += ns;
        self.hist.record(ns);
    }

    fn merge(&mut self, o: &Stalls) {
        self.count += o.count;
        self.sum_ns += o.sum_ns;
        self.hist.add(&o.hist);
    }

    /// Mean wait, ns (0 without stalls).
    pub fn mean_ns(&self) -> u64 {
        self.sum_ns / self.count.max(1)
    }

    /// One line: count, mean, median and 99th percentile.
    fn summary(&self) -> String {
        format!(
            "{} waited, mean {}, p50 <= {}, p99 <= {}",
            self.count,
            us(self.mean_ns()),
            us(self.hist.quantile_ns(0.5)),
            us(self.hist.quantile_ns(0.99))
        )
    }

    /// Count, sum and buckets, comma-separated (for the child's line).
    fn encode(&self) -> String {
        let mut v = vec![self.count, self.sum_ns];
        v.extend(&self.hist.buckets);
        v.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
    }

    fn decode(s: &str) -> Option<Stalls> {
        let v = numbers(s.split(','))?;
        let (&count, rest) = v.split_first()?;
        let (&sum_ns, buckets) = rest.split_first()?;
        let hist = Histogram {
            buckets: buckets.to_vec(),
        };
        (hist.count() == count).then_some(Stalls {
            count,
            sum_ns,
            hist,
        })
    }
}

/// Requests the block device under the swap files served, from its
/// `/sys/dev/block/MAJ:MIN/stat`: counts and the time requests spent in
/// the block layer and the device, from queueing to completion. Not the
/// system call, file system and wake-up around them, so set beside the
/// accessing threads' stalls it tells the device's share from the host's.
/// The counters are the device's: anything else using it is counted too.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskIo {
    /// Read requests completed.
    pub reads: u64,
    /// Their total time, ms.
    pub read_ms: u64,
    /// Write requests completed.
    pub writes: u64,
    /// 512-byte sectors written.
    pub write_sectors: u64,
    /// Their total time, ms.
    pub write_ms: u64,
}

/// The environment variable that tells the kernel-side child which
/// device's counters to read (the parent's [`disk_stat_path`]).
const DISK_ENV: &str = "FOLIOVM_BENCH_DISK_STAT";

impl DiskIo {
    /// Parse a block device's `stat` file (see the kernel's
    /// `Documentation/block/stat.rst`); `None` if it is not one.
    pub fn parse(stat: &str) -> Option<DiskIo> {
        let v = numbers(stat.split_whitespace())?;
        (v.len() >= 11).then(|| DiskIo {
            reads: v[0],
            read_ms: v[3],
            writes: v[4],
            write_sectors: v[6],
            write_ms: v[7],
        })
    }

    /// Read the counters at `path`.
    fn read(path: &Path) -> Option<DiskIo> {
        DiskIo::parse(&std::fs::read_to_string(path).ok()?)
    }

    /// What happened between `earlier` and `self`.
    fn since(&self, earlier: &DiskIo) -> DiskIo {
        DiskIo {
            reads: self.reads.saturating_sub(earlier.reads),
            read_ms: self.read_ms.saturating_sub(earlier.read_ms),
            writes: self.writes.saturating_sub(earlier.writes),
            write_sectors: self.write_sectors.saturating_sub(earlier.write_sectors),
            write_ms: self.write_ms.saturating_sub(earlier.write_ms),
        }
    }

    /// One line: reads and writes, their mean size and time.
    fn summary(&self) -> String {
        let per = |ms: u64, n: u64| us(ms * 1_000_000 / n.max(1));
        format!(
            "{} reads, {} each; {} writes of {} KiB, {} each",
            self.reads,
            per(self.read_ms, self.reads),
            self.writes,
            self.write_sectors / 2 / self.writes.max(1),
            per(self.write_ms, self.writes)
        )
    }

    fn encode(&self) -> String {
        let v = [
            self.reads,
            self.read_ms,
            self.writes,
            self.write_sectors,
            self.write_ms,
        ];
        v.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
    }

    /// The inverse of `encode`; `-` (counters unreadable) is `Some(None)`.
    fn decode(s: &str) -> Option<Option<DiskIo>> {
        if s == "-" {
            return Some(None);
        }
        let v = numbers(s.split(','))?;
        let [reads, read_ms, writes, write_sectors, write_ms] = v[..] else {
            return None;
        };
        Some(Some(DiskIo {
            reads,
            read_ms,
            writes,
            write_sectors,
            write_ms,
        }))
    }
}

/// The `stat` file of the block device that holds `dir`, if it has one
/// (not on tmpfs or overlay file systems, whose device is anonymous).
pub fn disk_stat_path(dir: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(dir).ok()?.dev();
    let p = PathBuf::from(format!(
        "/sys/dev/block/{}:{}/stat",
        libc::major(dev),
        libc::minor(dev)
    ));
    p.exists().then_some(p)
}

/// Run `f`, and return its result with what the device at `stat` served
/// meanwhile (`None` without a readable device).
fn with_disk<R>(stat: Option<&Path>, f: impl FnOnce() -> R) -> (R, Option<DiskIo>) {
    let before = stat.and_then(DiskIo::read);
    let r = f();
    let after = stat.and_then(DiskIo::read);
    (r, before.zip(after).map(|(b, a)| a.since(&b)))
}

/// The accessing threads' scheduler accounting over a pattern, summed:
/// time on a CPU, time runnable but waiting for one, and how many times
/// they were put on one (`/proc/thread-self/schedstat`, see the kernel's
/// `Documentation/scheduler/sched-stats.rst`). With more threads than
/// CPUs, a thread woken when its fault is served may still queue for a
/// CPU, the longer the more CPU the rest of the process takes: set beside
/// the stalls, the wait per time put on a CPU is that share of a fault.
/// The kernel keeps these numbers only while `kernel.task_delayacct` (or
/// schedstats) is on; see [`DelayAcct`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuWait {
    /// Time on a CPU, ns.
    pub run_ns: u64,
    /// Time runnable, waiting for a CPU, ns.
    pub wait_ns: u64,
    /// Times put on a CPU.
    pub slices: u64,
}

impl CpuWait {
    /// Parse a `schedstat` file: three numbers.
    pub fn parse(s: &str) -> Option<CpuWait> {
        CpuWait::from_numbers(&numbers(s.split_whitespace())?)
    }

    fn from_numbers(v: &[u64]) -> Option<CpuWait> {
        let [run_ns, wait_ns, slices] = v[..] else {
            return None;
        };
        Some(CpuWait {
            run_ns,
            wait_ns,
            slices,
        })
    }

    /// The calling thread's counters.
    fn now() -> Option<CpuWait> {
        CpuWait::parse(&std::fs::read_to_string("/proc/thread-self/schedstat").ok()?)
    }

    /// What happened between `earlier` and `self`.
    fn since(&self, earlier: &CpuWait) -> CpuWait {
        CpuWait {
            run_ns: self.run_ns.saturating_sub(earlier.run_ns),
            wait_ns: self.wait_ns.saturating_sub(earlier.wait_ns),
            slices: self.slices.saturating_sub(earlier.slices),
        }
    }

    fn add(&mut self, o: &CpuWait) {
        self.run_ns += o.run_ns;
        self.wait_ns += o.wait_ns;
        self.slices += o.slices;
    }

    /// Whether the kernel kept the counters (it keeps the slices only,
    /// without delay accounting).
    fn kept(&self) -> bool {
        self.run_ns > 0
    }

    /// One line: the wait per time put on a CPU, and the totals.
    fn summary(&self) -> String {
        format!(
            "{} per time on a CPU ({} times), {:.2} s in all; on a CPU {:.2} s",
            us(self.wait_ns / self.slices.max(1)),
            self.slices,
            self.wait_ns as f64 / 1e9,
            self.run_ns as f64 / 1e9
        )
    }

    fn encode(&self) -> String {
        format!("{},{},{}", self.run_ns, self.wait_ns, self.slices)
    }

    /// The inverse of `encode`; `-` (not kept) is `Some(None)`.
    fn decode(s: &str) -> Option<Option<CpuWait>> {
        if s == "-" {
            return Some(None);
        }
        CpuWait::from_numbers(&numbers(s.split(','))?).map(Some)
    }
}

/// Turns `kernel.task_delayacct` on for its lifetime if it was off, so
/// that [`CpuWait`] is kept, and back off when dropped.
pub struct DelayAcct {
    restore: bool,
}

/// The switch [`DelayAcct`] turns.
const TASK_DELAYACCT: &str = "/proc/sys/kernel/task_delayacct";

impl DelayAcct {
    /// Turn it on (needs root); whether it is on afterwards is
    /// [`CpuWait`]'s to find out.
    pub fn enable() -> DelayAcct {
        let off = std::fs::read_to_string(TASK_DELAYACCT).is_ok_and(|v| v.trim() == "0");
        DelayAcct {
            restore: off && std::fs::write(TASK_DELAYACCT, "1").is_ok(),
        }
    }
}

impl Drop for DelayAcct {
    fn drop(&mut self) {
        if self.restore {
            let _ = std::fs::write(TASK_DELAYACCT, "0");
        }
    }
}

/// One pattern under the kernel baseline.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelRun {
    /// The pattern.
    pub pattern: Pattern,
    /// Accesses per second.
    pub ops_per_sec: f64,
    /// User + system CPU seconds of the child.
    pub cpu_secs: f64,
    /// Pages swapped in and out (`/proc/vmstat` deltas).
    pub pswpin: u64,
    /// See `pswpin`.
    pub pswpout: u64,
    /// Accesses that waited.
    pub stalls: Stalls,
    /// What the swap device served meanwhile.
    pub disk: Option<DiskIo>,
    /// The accessing threads' waits for a CPU (`None`: not kept).
    pub cpu_wait: Option<CpuWait>,
}

/// One pattern under foliovm.
#[derive(Clone, Debug)]
pub struct FolioPattern {
    /// The pattern.
    pub pattern: Pattern,
    /// Accesses per second.
    pub ops_per_sec: f64,
    /// Accesses that waited.
    pub stalls: Stalls,
    /// Swapins from the file during the pattern, fault to mapped.
    pub swapin: Histogram,
    /// Refaults from the swap cache during the pattern.
    pub swapcache: Histogram,
    /// Swap reads, and pages they read.
    pub reads: u64,
    /// See `reads`.
    pub read_pages: u64,
    /// User + system CPU seconds of the whole process during the pattern.
    pub cpu_secs: f64,
    /// Counters of the pattern, one line.
    pub detail: String,
    /// What the swap device served meanwhile.
    pub disk: Option<DiskIo>,
    /// The accessing threads' waits for a CPU (`None`: not kept).
    pub cpu_wait: Option<CpuWait>,
}

impl FolioPattern {
    /// Mean bytes per swap read (4 KiB when there was none).
    pub fn mean_read_bytes(&self) -> u64 {
        (self.read_pages / self.reads.max(1)).max(1) * PAGE_SIZE
    }
}

/// The foliovm side.
#[derive(Clone, Debug)]
pub struct FolioRun {
    /// Per pattern, in run order.
    pub patterns: Vec<FolioPattern>,
    /// Totals of the whole run, one line.
    pub summary: String,
}

/// Latency of raw `O_DIRECT` preads of one size.
#[derive(Clone, Debug)]
pub struct RawPread {
    /// Bytes per read.
    pub bytes: u64,
    /// Median and 99th percentile, or why it did not run.
    pub result: Result<(Duration, Duration), String>,
}

/// Everything one run measured.
#[derive(Debug)]
pub struct HostBenchReport {
    /// The settings.
    pub opts: HostBenchOpts,
    /// The kernel baseline, or why it did not run.
    pub kernel: Result<Vec<KernelRun>, String>,
    /// Kernel-side children its memory cgroup OOM-killed before the one
    /// that ran (see [`KERNEL_ATTEMPTS`]).
    pub kernel_oom_kills: u32,
    /// foliovm, or why it did not run.
    pub folio: Result<FolioRun, String>,
    /// Raw preads of the sizes foliovm's swapins read.
    pub raw: Vec<RawPread>,
}

/// Run the patterns under both setups (the kernel first) and measure raw
/// preads of the sizes foliovm read.
pub fn run(opts: &HostBenchOpts) -> HostBenchReport {
    let _delayacct = DelayAcct::enable();
    let mut kernel_oom_kills = 0;
    let kernel = match opts.skip_kernel {
        true => Err("skipped".to_string()),
        false => kernel_baseline(opts, &mut kernel_oom_kills),
    };
    let folio = foliovm(opts);
    let mut sizes = vec![PAGE_SIZE];
    if let Ok(f) = &folio {
        for p in &f.patterns {
            let b = p.mean_read_bytes().next_power_of_two().min(1 << 20);
            if !sizes.contains(&b) {
                sizes.push(b);
            }
        }
    }
    let raw = sizes
        .into_iter()
        .map(|bytes| RawPread {
            bytes,
            result: raw_pread(&opts.dir, bytes),
        })
        .collect();
    HostBenchReport {
        opts: opts.clone(),
        kernel,
        kernel_oom_kills,
        folio,
        raw,
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

/// A size in bytes with an optional `K`, `M` or `G` suffix (for the
/// examples' command lines); `None` if malformed or too large.
pub fn parse_size(s: &str) -> Option<u64> {
    let (num, mul) = match s.as_bytes().last()? {
        b'G' | b'g' => (&s[..s.len() - 1], 1 << 30),
        b'M' | b'm' => (&s[..s.len() - 1], 1 << 20),
        b'K' | b'k' => (&s[..s.len() - 1], 1 << 10),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mul)
}

/// The pages thread `t` of `threads` touches in `pattern`, in order.
fn thread_pages(
    pattern: Pattern,
    pages: u64,
    t: u64,
    threads: u64,
    ops: u64,
    zipf: &Zipf,
) -> impl Iterator<Item = u64> + '_ {
    let mut rng = Rng(0x1234_5678_9abc_def1 ^ (t + 1).wrapping_mul(0x9E37_79B9));
    let (lo, hi) = (pages * t / threads, pages * (t + 1) / threads);
    let n = match pattern {
        Pattern::Sequential => 2 * (hi - lo),
        _ => ops / threads,
    };
    (0..n).map(move |i| match pattern {
        Pattern::Sequential => lo + i % (hi - lo),
        Pattern::Uniform => rng.next() % pages,
        Pattern::Zipfian => zipf.sample(&mut rng),
    })
}

/// The pages `pattern` touches over `pages` pages from `threads` threads,
/// the threads taking turns (a real run interleaves them by timing): the
/// access trace of a run, for simulating replacement policies on it
/// (`mem/examples/policy_bounds.rs`).
pub fn trace(pattern: Pattern, pages: u64, threads: u64, ops: u64) -> Vec<u64> {
    let zipf = Zipf::new(pages, 0.99);
    let mut its: Vec<_> = (0..threads)
        .map(|t| thread_pages(pattern, pages, t, threads, ops, &zipf))
        .collect();
    let mut out = Vec::new();
    loop {
        let before = out.len();
        out.extend(its.iter_mut().filter_map(Iterator::next));
        if out.len() == before {
            return out;
        }
    }
}

/// The most accessing threads: thread `t` uses word `t` of every page it
/// touches, and two threads sharing a word would race (non-atomic
/// accesses from two threads to one word are undefined behaviour, volatile
/// or not).
pub const MAX_THREADS: u64 = PAGE_SIZE / 8;

/// Run `pattern` over `pages` pages at `base` from `threads` threads;
/// returns accesses per second, the accesses that waited, and the threads'
/// waits for a CPU (`None` if the kernel did not keep them).
///
/// # Panics
/// If `threads` exceeds [`MAX_THREADS`].
///
/// # Safety
/// `[base, base + pages * 4 KiB)` is a live read-write mapping for the
/// whole call, and nothing else accesses the words the threads use.
unsafe fn run_pattern(
    base: usize,
    pages: u64,
    pattern: Pattern,
    threads: u64,
    ops: u64,
) -> (f64, Stalls, Option<CpuWait>) {
    assert!(
        threads <= MAX_THREADS,
        "{threads} threads would share words"
    );
    let zipf = Zipf::new(pages, 0.99);
    let start = Instant::now();
    let mut stalls = Stalls::default();
    let mut cpu_wait = Some(CpuWait::default());
    let total: u64 = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let zipf = &zipf;
                s.spawn(move || {
                    let (mut n, mut stalls) = (0, Stalls::default());
                    let cpu0 = CpuWait::now();
                    for p in thread_pages(pattern, pages, t, threads, ops, zipf) {
                        n += 1;
                        let addr = (base + (p * PAGE_SIZE) as usize + t as usize * 8) as *mut u64;
                        let t0 = Instant::now();
                        // SAFETY: inside the mapping (the caller's contract;
                        // `t < MAX_THREADS` words fit in a page); each thread
                        // owns its own word of every page.
                        unsafe {
                            let v = std::ptr::read_volatile(addr);
                            std::ptr::write_volatile(addr, v.wrapping_add(1));
                        }
                        stalls.record(t0.elapsed().as_nanos() as u64);
                    }
                    let waited = cpu0.zip(CpuWait::now()).map(|(a, b)| b.since(&a));
                    (n, stalls, waited)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                let (n, st, w) = h.join().unwrap_or_default();
                stalls.merge(&st);
                cpu_wait = cpu_wait.zip(w).map(|(mut a, w)| {
                    a.add(&w);
                    a
                });
                n
            })
            .sum()
    });
    let rate = total as f64 / start.elapsed().as_secs_f64();
    (rate, stalls, cpu_wait.filter(CpuWait::kept))
}

/// Write every page once (the first touch, not timed in the results).
///
/// # Safety
/// As for [`run_pattern`].
unsafe fn populate(base: usize, pages: u64) {
    for p in 0..pages {
        // SAFETY: inside the mapping (the caller's contract).
        unsafe { std::ptr::write_volatile((base + (p * PAGE_SIZE) as usize) as *mut u64, p) };
    }
}

/// The child's arguments: working set, threads, ops, patterns.
fn parse_child_args(args: &[String]) -> Result<(u64, u64, u64, Vec<Pattern>), String> {
    let [ws, threads, ops, patterns] = args else {
        return Err(format!(
            "expected <ws> <threads> <ops> <patterns>, got {args:?}"
        ));
    };
    let num = |s: &String| s.parse::<u64>().map_err(|e| format!("{s:?}: {e}"));
    let patterns = patterns
        .split(',')
        .map(|p| Pattern::parse(p).ok_or(format!("unknown pattern {p:?}")))
        .collect::<Result<Vec<_>, _>>()?;
    let threads = num(threads)?;
    if threads == 0 || threads > MAX_THREADS {
        return Err(format!("threads must be 1 to {MAX_THREADS}, got {threads}"));
    }
    Ok((num(ws)?, threads, num(ops)?, patterns))
}

fn result_line(r: &KernelRun) -> String {
    format!(
        "RESULT {} {} {} {} {} {} {} {}",
        r.pattern.name(),
        r.ops_per_sec,
        r.cpu_secs,
        r.pswpin,
        r.pswpout,
        r.stalls.encode(),
        r.disk.map_or("-".into(), |d| d.encode()),
        r.cpu_wait.map_or("-".into(), |c| c.encode())
    )
}

fn parse_result_line(l: &str) -> Option<KernelRun> {
    let mut w = l.split_whitespace();
    (w.next()? == "RESULT").then_some(())?;
    let pattern = Pattern::parse(w.next()?)?;
    let mut num = || w.next()?.parse::<f64>().ok();
    let (ops_per_sec, cpu_secs, si, so) = (num()?, num()?, num()?, num()?);
    let stalls = Stalls::decode(w.next()?)?;
    let disk = DiskIo::decode(w.next()?)?;
    let cpu_wait = CpuWait::decode(w.next()?)?;
    w.next().is_none().then_some(KernelRun {
        pattern,
        ops_per_sec,
        cpu_secs,
        pswpin: si as u64,
        pswpout: so as u64,
        stalls,
        disk,
        cpu_wait,
    })
}

/// The kernel-side child: wait until the parent has put this process in
/// the cgroup (a line on stdin), then map, populate and run the patterns,
/// printing one `RESULT` line each. `args` are the four values the parent
/// appended to [`ChildCommand`].
///
/// # Errors
/// Bad arguments, or the mapping failed.
pub fn kernel_child(args: &[String]) -> Result<(), String> {
    let (ws, threads, ops, patterns) = parse_child_args(args)?;
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    // SAFETY: a fresh private anonymous mapping, owned by this process and
    // never unmapped (the process exits after the run).
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
    if base == libc::MAP_FAILED {
        return Err(format!("mmap: {}", std::io::Error::last_os_error()));
    }
    let pages = ws / PAGE_SIZE;
    // SAFETY: the mapping above is live and only these calls touch it.
    unsafe { populate(base as usize, pages) };
    let disk_stat = std::env::var_os(DISK_ENV).map(PathBuf::from);
    for pattern in patterns {
        let (cpu0, vm0) = (cpu_time(), vmstat_swap());
        // SAFETY: as for populate.
        let ((ops_per_sec, stalls, cpu_wait), disk) = with_disk(disk_stat.as_deref(), || unsafe {
            run_pattern(base as usize, pages, pattern, threads, ops)
        });
        let (cpu, vm1) = ((cpu_time() - cpu0).as_secs_f64(), vmstat_swap());
        let r = KernelRun {
            pattern,
            ops_per_sec,
            cpu_secs: cpu,
            pswpin: vm1.0 - vm0.0,
            pswpout: vm1.1 - vm0.1,
            stalls,
            disk,
            cpu_wait,
        };
        println!("{}", result_line(&r));
    }
    Ok(())
}

fn run_cmd(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    match out.status.success() {
        true => Ok(()),
        false => Err(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// The kernel baseline: host swap file + cgroup v1 limit + child process.
/// Whatever was set up is torn down again.
/// Times the kernel-side child is started. Its memory cgroup sometimes
/// OOM-kills it (`SIGKILL`) although swap has room: a v1 memcg gives up
/// after a few reclaim rounds that free too little, which four threads
/// faulting against one disk can cause (seen here about once in ten runs).
/// A killed child measured nothing, so it is started again, and the report
/// says how often that happened.
pub const KERNEL_ATTEMPTS: u32 = 3;

fn kernel_baseline(o: &HostBenchOpts, oom_kills: &mut u32) -> Result<Vec<KernelRun>, String> {
    let ws = o.working_set();
    let id = std::process::id();
    let swap = o.dir.join(format!("foliovm-bench-{id}.swap"));
    let cg = PathBuf::from(format!("/sys/fs/cgroup/memory/foliovm-bench-{id}"));
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
        run_cmd(Command::new("mkswap").arg(&swap))?;
        run_cmd(Command::new("swapon").arg(&swap))?;
        std::fs::create_dir(&cg).map_err(|e| format!("{}: {e}", cg.display()))?;
        std::fs::write(cg.join("memory.limit_in_bytes"), o.budget.to_string())
            .map_err(|e| format!("memory.limit_in_bytes: {e}"))?;
        loop {
            match kernel_child_run(o, ws, &cg) {
                Err(ChildEnd::Killed(e)) if *oom_kills + 1 < KERNEL_ATTEMPTS => {
                    *oom_kills += 1;
                    eprintln!("overcommit: {e}; starting it again");
                }
                Err(ChildEnd::Killed(e) | ChildEnd::Failed(e)) => return Err(e),
                Ok(r) => return Ok(r),
            }
        }
    })();
    let _ = std::fs::remove_dir(&cg);
    let _ = run_cmd(Command::new("swapoff").arg(&swap));
    let _ = std::fs::remove_file(&swap);
    result
}

/// How a kernel-side child failed.
enum ChildEnd {
    /// `SIGKILL`: its memory cgroup's OOM killer.
    Killed(String),
    /// Anything else.
    Failed(String),
}

/// Start the kernel-side child in cgroup `cg` and collect its results.
fn kernel_child_run(o: &HostBenchOpts, ws: u64, cg: &Path) -> Result<Vec<KernelRun>, ChildEnd> {
    use std::os::unix::process::ExitStatusExt;
    let failed = ChildEnd::Failed;
    let names: Vec<&str> = o.patterns.iter().map(|p| p.name()).collect();
    let mut child = Command::new(&o.child.exe)
        .args(&o.child.args)
        .args([
            ws.to_string(),
            o.threads.to_string(),
            o.ops.to_string(),
            names.join(","),
        ])
        .envs(disk_stat_path(&o.dir).map(|p| (DISK_ENV, p)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| failed(format!("{}: {e}", o.child.exe.display())))?;
    let kills_before = memcg_oom_kills(cg);
    if let Err(e) = std::fs::write(cg.join("cgroup.procs"), child.id().to_string()) {
        // Outside the cgroup it must not run at all: it would run unlimited.
        let _ = child.kill();
        let _ = child.wait();
        return Err(failed(format!("cgroup.procs: {e}")));
    }
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(b"go\n")
            .map_err(|e| failed(e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| failed(e.to_string()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let res: Vec<KernelRun> = text.lines().filter_map(parse_result_line).collect();
    let oom_killed =
        out.status.signal() == Some(libc::SIGKILL) && memcg_oom_kills(cg) > kills_before;
    if oom_killed {
        return Err(ChildEnd::Killed(format!(
            "its memory cgroup OOM-killed the kernel-side child after {} of {} patterns",
            res.len(),
            o.patterns.len()
        )));
    }
    if !out.status.success() {
        return Err(failed(format!(
            "the kernel-side child failed: {}",
            out.status
        )));
    }
    match res.len() == o.patterns.len() {
        true => Ok(res),
        false => Err(failed(format!("the kernel-side child printed {text:?}"))),
    }
}

/// The `oom_kill` count of a v1 memory cgroup (0 if unreadable).
fn memcg_oom_kills(cg: &Path) -> u64 {
    std::fs::read_to_string(cg.join("memory.oom_control"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
        .unwrap_or(0)
}

fn foliovm(o: &HostBenchOpts) -> Result<FolioRun, String> {
    let ws = o.working_set();
    let mm = MemoryManager::new(MmConfig {
        budget_bytes: ws / 2,
        handler_threads: (2 * o.threads as usize).max(4),
        fault_delivery: o.faults,
        prezero_limit_bytes: None,
        swap: Some(SwapConfig {
            target: SwapTarget::Dir(o.dir.clone()),
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
    // SAFETY: the backend's region is a live mapping of `ws` bytes until
    // `b` drops below, and only these calls access it.
    unsafe { populate(base, pages) };
    let mut patterns = Vec::new();
    let disk_stat = disk_stat_path(&o.dir);
    for &p in &o.patterns {
        let (before, cpu0) = (mm.stats(), cpu_time());
        // SAFETY: as for populate.
        let ((rate, stalls, cpu_wait), disk) = with_disk(disk_stat.as_deref(), || unsafe {
            run_pattern(base, pages, p, o.threads, o.ops)
        });
        let (after, cpu1) = (mm.stats(), cpu_time());
        let mut fp = folio_pattern(p, rate, &before, &after, cpu1 - cpu0);
        fp.stalls = stalls;
        fp.disk = disk;
        fp.cpu_wait = cpu_wait;
        patterns.push(fp);
    }
    let s = mm.stats();
    let summary = format!(
        "swapout {} pages, swapin {} pages in {} reads (+{} from swap cache), zero-dropped {}, \
         sampled {} folios ({} refaulted), direct reclaims {}, installed by COPY {} pages \
         (stale pool copies zapped in {} batches), metadata {:.2} B/guest page",
        s.swap.swapout_pages,
        s.swap.swapin_file_pages,
        s.swap.swapin_file_folios,
        s.swap.swapin_cache_folios,
        s.swap.zero_dropped_pages,
        s.swap.sampled_folios,
        s.swap.sample_refaults,
        s.swap.direct_reclaims,
        s.swap.copied_in_pages,
        s.pool_zap_batches,
        s.metadata_bytes_per_guest_page(),
    );
    drop(b);
    let _ = mm.destroy_vm(vm);
    Ok(FolioRun { patterns, summary })
}

/// What foliovm did during one pattern: counter deltas and CPU time.
fn folio_pattern(p: Pattern, rate: f64, b: &MmStats, a: &MmStats, cpu: Duration) -> FolioPattern {
    let (sb, sa) = (&b.swap, &a.swap);
    let d = |f: fn(&SwapStats) -> u64| f(sa) - f(sb);
    let writes = a.swap_device.writes - b.swap_device.writes;
    let wbytes = a.swap_device.write_bytes - b.swap_device.write_bytes;
    let detail = format!(
        "cpu {:.2} s; swapin {} pages in {} reads (+{} cache), swapout {} pages in {} \
         writes (avg {} KiB), clean kept {} (written {}, dropped without I/O {}), \
         order-0 fallbacks {}, sampled {} (refaulted {}, large ones split {}), direct reclaims {}, \
         by COPY {} pages",
        cpu.as_secs_f64(),
        d(|s| s.swapin_file_pages),
        d(|s| s.swapin_file_folios),
        d(|s| s.swapin_cache_folios),
        d(|s| s.swapout_pages),
        writes,
        (wbytes / writes.max(1)) >> 10,
        d(|s| s.clean_kept_pages),
        d(|s| s.clean_dirtied_pages),
        d(|s| s.clean_dropped_pages),
        d(|s| s.swapout_fallback_order0),
        d(|s| s.sampled_folios),
        d(|s| s.sample_refaults),
        d(|s| s.sampled_splits),
        d(|s| s.direct_reclaims),
        d(|s| s.copied_in_pages),
    );
    FolioPattern {
        pattern: p,
        ops_per_sec: rate,
        stalls: Stalls::default(),
        swapin: sa.swapin_latency.since(&sb.swapin_latency),
        swapcache: sa.swapcache_latency.since(&sb.swapcache_latency),
        reads: d(|s| s.swapin_file_folios),
        read_pages: d(|s| s.swapin_file_pages),
        cpu_secs: cpu.as_secs_f64(),
        detail,
        disk: None,
        cpu_wait: None,
    }
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

/// p50/p99 of `bytes`-sized `O_DIRECT` preads at random aligned offsets of
/// a fresh 256 MiB file in `dir`.
fn raw_pread(dir: &Path, bytes: u64) -> Result<(Duration, Duration), String> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let path = dir.join(format!("foliovm-bench-{}.raw", std::process::id()));
    let size: u64 = 256 << 20;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let _ = std::fs::remove_file(&path);
    let layout = std::alloc::Layout::from_size_align(1 << 20, 4096).map_err(|e| e.to_string())?;
    // SAFETY: non-zero layout; freed below with the same layout.
    let buf = unsafe { std::alloc::alloc_zeroed(layout) };
    if buf.is_null() {
        return Err("out of memory".into());
    }
    // SAFETY: `buf` is a live allocation of 1 MiB, used only through this
    // slice until it is freed.
    let chunk = unsafe { std::slice::from_raw_parts_mut(buf, 1 << 20) };
    let mut run = || {
        for off in (0..size).step_by(1 << 20) {
            chunk.fill((off >> 20) as u8);
            f.write_all_at(chunk, off).map_err(|e| e.to_string())?;
        }
        let mut rng = Rng(42);
        let n = (2000 * PAGE_SIZE / bytes).clamp(200, 2000);
        let mut lat = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let off = rng.next() % (size / bytes) * bytes;
            let t = Instant::now();
            f.read_exact_at(&mut chunk[..bytes as usize], off)
                .map_err(|e| e.to_string())?;
            lat.push(t.elapsed());
        }
        lat.sort();
        Ok((lat[lat.len() / 2], lat[lat.len() * 99 / 100]))
    };
    let r = run();
    // SAFETY: allocated above with `layout`; the slice is dead.
    unsafe { std::alloc::dealloc(buf, layout) };
    r
}

/// [`run`] `opts.rounds` times in a row. One run measures the two setups
/// a minute apart, and on a shared host the kernel baseline alone swings
/// from one run to the next (zipfian 71k to 132k accesses/s on one
/// machine here, README); rounds give each setup several turns, and the
/// verdict goes by the median ratio.
pub fn run_rounds(opts: &HostBenchOpts) -> RoundsReport {
    RoundsReport {
        rounds: (0..opts.rounds).map(|_| run(opts)).collect(),
    }
}

/// Every round's report, and for more than one, a summary.
#[derive(Debug)]
pub struct RoundsReport {
    /// In the order they ran.
    pub rounds: Vec<HostBenchReport>,
}

impl RoundsReport {
    /// `p`'s ratio (foliovm over kernel) in each round where both setups
    /// ran it, in round order.
    pub fn ratios(&self, p: Pattern) -> Vec<f64> {
        self.rounds
            .iter()
            .filter_map(|r| match r.rates(p) {
                (Some(k), Some(f)) if k > 0.0 => Some(f / k),
                _ => None,
            })
            .collect()
    }
}

/// The median of `v` (the mean of the middle two for an even count), or
/// `None` for an empty `v`.
pub fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

impl fmt::Display for RoundsReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.rounds.len();
        let Some(first) = self.rounds.first() else {
            return writeln!(f, "no rounds ran");
        };
        if n == 1 {
            return write!(f, "{first}");
        }
        for (i, r) in self.rounds.iter().enumerate() {
            writeln!(f, "round {} of {n}:", i + 1)?;
            write!(f, "{r}")?;
        }
        writeln!(
            f,
            "summary of {n} rounds (each round's ratio, in round order; the verdict goes by the median):"
        )?;
        writeln!(
            f,
            "  {:<11} {:<40} {:>7} {:>7}  verdict",
            "pattern", "ratios", "median", "goal"
        )?;
        for &p in &first.opts.patterns {
            let ratios = self.ratios(p);
            let list: Vec<String> = ratios.iter().map(|r| format!("{r:.2}x")).collect();
            let (med, v) = match median(&ratios) {
                Some(m) if m >= p.goal() => (format!("{m:.2}x"), "met".to_string()),
                Some(m) => (format!("{m:.2}x"), "MISSED".to_string()),
                None => ("-".into(), "no round had both setups".into()),
            };
            writeln!(
                f,
                "  {:<11} {:<40} {:>7} {:>6.1}x  {v}{}",
                p.name(),
                list.join(" "),
                med,
                p.goal(),
                match ratios.len() < n {
                    true => format!(" ({} of {n} rounds without a ratio)", n - ratios.len()),
                    false => String::new(),
                }
            )?;
        }
        Ok(())
    }
}

/// The ratio column and the verdict for one pattern: a ratio only when
/// both setups ran.
pub fn verdict(p: Pattern, kernel: Option<f64>, folio: Option<f64>) -> (String, String) {
    match (kernel, folio) {
        (Some(k), Some(f)) if k > 0.0 => {
            let r = f / k;
            let v = if r >= p.goal() { "met" } else { "MISSED" };
            (format!("{r:.2}x"), v.to_string())
        }
        (None, _) => ("-".into(), "no kernel baseline".into()),
        (Some(_), None) => ("-".into(), "foliovm did not run".into()),
        (Some(_), Some(_)) => ("-".into(), "the kernel baseline made no progress".into()),
    }
}

fn us(ns: u64) -> String {
    format!("{:.0} µs", ns as f64 / 1000.0)
}

impl fmt::Display for HostBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.opts;
        let ws = o.working_set();
        writeln!(
            f,
            "overcommit from host threads (no KVM): budget {} MiB, working set {} MiB, {} threads, \
             {} ops (uniform/zipfian), swap files in {}",
            ws >> 21,
            ws >> 20,
            o.threads,
            o.ops,
            o.dir.display()
        )?;
        writeln!(
            f,
            "  kernel: a plain host process (not a KVM guest) on anonymous memory in a cgroup v1 \
             limit, with a host swap file; foliovm: the mem crate, {}, own swap file",
            match o.faults {
                FaultDelivery::Handlers => "uffd handler threads (as for VMs)",
                FaultDelivery::Faulter =>
                    "faults served on the faulting thread (SIGBUS; host threads only, not VMs)",
            }
        )?;
        writeln!(
            f,
            "  {:<11} {:>14} {:>14} {:>7} {:>7}  verdict",
            "pattern", "kernel acc/s", "foliovm acc/s", "ratio", "goal"
        )?;
        for &p in &o.patterns {
            let (k, fv) = self.rates(p);
            let num = |v: Option<f64>| v.map_or("did not run".to_string(), |v| format!("{v:.0}"));
            let (ratio, v) = verdict(p, k, fv);
            writeln!(
                f,
                "  {:<11} {:>14} {:>14} {:>7} {:>6.1}x  {v}",
                p.name(),
                num(k),
                num(fv),
                ratio,
                p.goal()
            )?;
        }
        self.fmt_stalls(f)?;
        self.fmt_cpu_wait(f)?;
        self.fmt_cpu_per_page(f)?;
        self.fmt_disk(f)?;
        self.fmt_kernel(f)?;
        self.fmt_folio(f)
    }
}

impl HostBenchReport {
    /// `p`'s accesses per second under the kernel and under foliovm, for
    /// the setups that ran it.
    pub fn rates(&self, p: Pattern) -> (Option<f64>, Option<f64>) {
        (
            self.kernel_of(p).map(|x| x.ops_per_sec),
            self.folio_of(p).map(|x| x.ops_per_sec),
        )
    }

    /// The kernel baseline's run of `p`, if it ran.
    fn kernel_of(&self, p: Pattern) -> Option<&KernelRun> {
        self.kernel.as_ref().ok()?.iter().find(|x| x.pattern == p)
    }

    /// foliovm's run of `p`, if it ran.
    fn folio_of(&self, p: Pattern) -> Option<&FolioPattern> {
        let r = self.folio.as_ref().ok()?;
        r.patterns.iter().find(|x| x.pattern == p)
    }

    /// One line per pattern: what `kernel` and `folio` say of each setup's
    /// run of it.
    fn fmt_both(
        &self,
        f: &mut fmt::Formatter<'_>,
        kernel: impl Fn(&KernelRun) -> String,
        folio: impl Fn(&FolioPattern) -> String,
    ) -> fmt::Result {
        for &p in &self.opts.patterns {
            writeln!(
                f,
                "    {:<10} kernel: {}; foliovm: {}",
                p.name(),
                self.kernel_of(p).map_or("did not run".into(), &kernel),
                self.folio_of(p).map_or("did not run".into(), &folio)
            )?;
        }
        Ok(())
    }

    fn fmt_stalls(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "  accesses that waited >= {} as the accessing thread saw them (log2 buckets: upper bounds):",
            us(STALL_NS)
        )?;
        self.fmt_both(f, |k| k.stalls.summary(), |v| v.stalls.summary())
    }

    fn fmt_cpu_wait(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "  the accessing threads' waits for a CPU once runnable (schedstat, summed over threads):"
        )?;
        let line = |c: Option<CpuWait>| {
            c.map_or("not kept (kernel.task_delayacct off)".into(), |c| {
                c.summary()
            })
        };
        self.fmt_both(f, |k| line(k.cpu_wait), |v| line(v.cpu_wait))
    }

    /// CPU per page read from swap: the whole process, and the share of
    /// the accessing threads. The kernel's reclaim of a memory cgroup runs
    /// in the accessing threads themselves (direct reclaim); foliovm's runs
    /// mostly in its background reclaimer, so its other threads' CPU is the
    /// reclaim's cost, which competes with the accessing threads for the
    /// CPUs. Kernel work outside the process (kworkers) is in neither;
    /// interrupts count to whichever thread they land on, in both setups.
    fn fmt_cpu_per_page(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "  CPU per page read from swap (process user+sys / pages read; the accessing threads' share from schedstat):"
        )?;
        let line = |cpu_secs: f64, pages: u64, c: Option<CpuWait>| {
            if pages == 0 {
                return "no page read".to_string();
            }
            let per = |secs: f64| us((secs * 1e9 / pages as f64) as u64);
            match c.filter(CpuWait::kept) {
                Some(c) => {
                    let own = c.run_ns as f64 / 1e9;
                    format!(
                        "{} (accessing threads {}, other threads {})",
                        per(cpu_secs),
                        per(own),
                        per((cpu_secs - own).max(0.0))
                    )
                }
                None => per(cpu_secs),
            }
        };
        self.fmt_both(
            f,
            |k| line(k.cpu_secs, k.pswpin, k.cpu_wait),
            |v| line(v.cpu_secs, v.read_pages, v.cpu_wait),
        )
    }

    fn fmt_disk(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let seen = self.opts.patterns.iter().any(|&p| {
            self.kernel_of(p).and_then(|k| k.disk).is_some()
                || self.folio_of(p).and_then(|v| v.disk).is_some()
        });
        if !seen {
            return writeln!(
                f,
                "  swap device: no block-device counters for {}",
                self.opts.dir.display()
            );
        }
        writeln!(
            f,
            "  swap device requests, mean time each in the block layer and device (whole device):"
        )?;
        let line = |d: Option<DiskIo>| d.map_or("no counters".into(), |d| d.summary());
        self.fmt_both(f, |k| line(k.disk), |v| line(v.disk))
    }

    fn fmt_kernel(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.kernel_oom_kills > 0 {
            writeln!(
                f,
                "  kernel child OOM-killed by its memory cgroup {} time(s) and started again",
                self.kernel_oom_kills
            )?;
        }
        match &self.kernel {
            Err(e) => writeln!(f, "  kernel baseline did not run: {e} (no ratio printed)"),
            Ok(r) => {
                writeln!(f, "  kernel child (user+sys CPU, /proc/vmstat deltas):")?;
                for x in r {
                    writeln!(
                        f,
                        "    {:<10} cpu {:.2} s; pswpin {}, pswpout {}",
                        x.pattern.name(),
                        x.cpu_secs,
                        x.pswpin,
                        x.pswpout
                    )?;
                }
                Ok(())
            }
        }
    }

    fn fmt_folio(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = match &self.folio {
            Err(e) => return writeln!(f, "  foliovm did not run: {e}"),
            Ok(r) => r,
        };
        let raw = |bytes: u64| {
            let x = self.raw.iter().find(|x| x.bytes == bytes)?;
            Some(match &x.result {
                Ok((p50, p99)) => format!(
                    "raw {} KiB O_DIRECT pread p50 {} p99 {}",
                    bytes >> 10,
                    us(p50.as_nanos() as u64),
                    us(p99.as_nanos() as u64)
                ),
                Err(e) => format!("raw pread did not run: {e}"),
            })
        };
        writeln!(
            f,
            "  foliovm latency per pattern (log2 buckets: upper bounds), against raw preads of the same size:"
        )?;
        for p in &r.patterns {
            let size = p.mean_read_bytes().next_power_of_two().min(1 << 20);
            writeln!(
                f,
                "    {:<10} swapin from file: {} reads, avg {} KiB, p50 <= {}, p99 <= {}; {}",
                p.pattern.name(),
                p.swapin.count(),
                p.mean_read_bytes() >> 10,
                us(p.swapin.quantile_ns(0.5)),
                us(p.swapin.quantile_ns(0.99)),
                raw(size).unwrap_or_default()
            )?;
            writeln!(
                f,
                "    {:<10} refault from swap cache: {} refaults, p50 <= {}, p99 <= {}",
                "",
                p.swapcache.count(),
                us(p.swapcache.quantile_ns(0.5)),
                us(p.swapcache.quantile_ns(0.99)),
            )?;
        }
        writeln!(f, "  foliovm: {}", r.summary)?;
        for p in &r.patterns {
            writeln!(f, "    {:<10} {}", p.pattern.name(), p.detail)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The examples' arguments, split at spaces.
    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    /// A kernel-side command for options that never run it.
    fn child() -> ChildCommand {
        ChildCommand {
            exe: PathBuf::new(),
            args: Vec::new(),
        }
    }

    #[test]
    fn options_parse_and_bad_ones_are_named() {
        let o = HostBenchOpts::parse(
            &args("--budget 128M --skip-kernel --patterns zipf"),
            child(),
        )
        .unwrap();
        assert_eq!(o.budget, 128 << 20);
        assert!(o.skip_kernel);
        assert_eq!(o.patterns, vec![Pattern::Zipfian]);
        assert_eq!(o.working_set(), 256 << 20);
        let err = |s: &str| HostBenchOpts::parse(&args(s), child()).unwrap_err();
        assert_eq!(err("--budget 12Q"), "bad value \"12Q\" for --budget");
        assert_eq!(
            err("--patterns seq,random"),
            "bad value \"seq,random\" for --patterns"
        );
        assert_eq!(err("--threads"), "bad value \"\" for --threads");
        // Thread t owns word t of every page: a 513th would share one.
        assert_eq!(err("--threads 513"), "--threads is at most 512");
        assert!(HostBenchOpts::parse(&args("--threads 512"), child()).is_ok());
        let child_args = |t: &str| {
            let a: Vec<String> = ["4194304", t, "10", "seq"].map(String::from).to_vec();
            parse_child_args(&a)
        };
        assert!(child_args("512").is_ok());
        assert!(child_args("513").unwrap_err().contains("1 to 512"));
        assert!(child_args("0").is_err());
        assert_eq!(err("--frobnicate 1"), "unknown option --frobnicate");
        assert!(err("--budget 1M").contains("at least 2M"));
        assert!(err("--budget 99999999999G").contains("--budget"));
        // Handler threads unless asked: that is what VMs use.
        assert_eq!(o.faults, FaultDelivery::Handlers);
        let f = HostBenchOpts::parse(&args("--faults faulter"), child()).unwrap();
        assert_eq!(f.faults, FaultDelivery::Faulter);
        assert_eq!(
            err("--faults signal"),
            "bad value \"signal\" for --faults; expected handlers or faulter"
        );
    }

    #[test]
    fn rounds_parse_and_the_median_takes_the_middle() {
        assert_eq!(HostBenchOpts::parse(&[], child()).unwrap().rounds, 1);
        let o = HostBenchOpts::parse(&args("--rounds 3"), child()).unwrap();
        assert_eq!(o.rounds, 3);
        for bad in ["--rounds 0", "--rounds x", "--rounds"] {
            let e = HostBenchOpts::parse(&args(bad), child()).unwrap_err();
            assert!(e.contains("--rounds"), "{bad}: {e}");
        }
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[1.2, 0.5, 0.9]), Some(0.9));
        assert_eq!(median(&[1.0, 0.4, 0.8, 2.0]), Some(0.9));
    }

    /// A report of one round over zipfian and uniform: the rates given
    /// (the kernel's for both, or skipped), every other number zero.
    fn round_of(
        opts: &HostBenchOpts,
        kernel: Option<f64>,
        zipf: f64,
        uniform: f64,
    ) -> HostBenchReport {
        HostBenchReport {
            opts: opts.clone(),
            kernel: kernel
                .map(|k| {
                    [Pattern::Zipfian, Pattern::Uniform]
                        .into_iter()
                        .map(|pattern| KernelRun {
                            pattern,
                            ops_per_sec: k,
                            cpu_secs: 1.0,
                            pswpin: 0,
                            pswpout: 0,
                            stalls: Stalls::default(),
                            disk: None,
                            cpu_wait: None,
                        })
                        .collect()
                })
                .ok_or_else(|| "skipped".to_string()),
            kernel_oom_kills: 0,
            folio: Ok(FolioRun {
                patterns: [(Pattern::Zipfian, zipf), (Pattern::Uniform, uniform)]
                    .into_iter()
                    .map(|(pattern, ops_per_sec)| FolioPattern {
                        pattern,
                        ops_per_sec,
                        stalls: Stalls::default(),
                        swapin: Histogram::default(),
                        swapcache: Histogram::default(),
                        reads: 0,
                        read_pages: 0,
                        cpu_secs: 0.0,
                        detail: String::new(),
                        disk: None,
                        cpu_wait: None,
                    })
                    .collect(),
                summary: String::new(),
            }),
            raw: Vec::new(),
        }
    }

    #[test]
    fn a_report_gives_the_cpu_per_page_read_and_the_accessing_threads_share() {
        let mut opts = HostBenchOpts::parse(&[], child()).unwrap();
        opts.patterns = vec![Pattern::Zipfian, Pattern::Uniform];
        // The CPU per page read: the process's, split by the accessing
        // threads' own time where the kernel kept it.
        let ran = |run_ns| {
            Some(CpuWait {
                run_ns,
                wait_ns: 0,
                slices: 1,
            })
        };
        let mut one = round_of(&opts, Some(100.0), 150.0, 80.0);
        if let Ok(k) = one.kernel.as_mut() {
            (k[1].cpu_secs, k[1].pswpin, k[1].cpu_wait) = (3.7, 100_000, ran(3_700_000_000));
        }
        if let Ok(v) = one.folio.as_mut() {
            let u = &mut v.patterns[1];
            (u.cpu_secs, u.read_pages, u.cpu_wait) = (6.1, 100_000, ran(4_100_000_000));
        }
        let text = one.to_string();
        // The pattern's line in the CPU-per-page section.
        let per_page = |name: &str| {
            text.lines()
                .skip_while(|l| !l.contains("CPU per page read from swap"))
                .find(|l| l.trim_start().starts_with(name))
                .unwrap_or_default()
                .to_string()
        };
        assert!(
            per_page("uniform").contains(
                "kernel: 37 µs (accessing threads 37 µs, other threads 0 µs); \
                 foliovm: 61 µs (accessing threads 41 µs, other threads 20 µs)"
            ),
            "{text}"
        );
        assert!(
            per_page("zipfian").contains("kernel: no page read; foliovm: no page read"),
            "{text}"
        );
    }

    #[test]
    fn a_summary_of_rounds_rates_each_round_and_judges_by_the_median() {
        let mut opts = HostBenchOpts::parse(&[], child()).unwrap();
        opts.patterns = vec![Pattern::Zipfian, Pattern::Uniform];
        let round =
            |kernel: Option<f64>, zipf: f64, uniform: f64| round_of(&opts, kernel, zipf, uniform);
        let r = RoundsReport {
            rounds: vec![
                round(Some(100.0), 150.0, 80.0),
                round(None, 500.0, 500.0),
                round(Some(200.0), 200.0, 300.0),
                round(Some(100.0), 140.0, 90.0),
            ],
        };
        assert_eq!(
            RoundsReport { rounds: Vec::new() }.to_string(),
            "no rounds ran\n"
        );
        assert_eq!(r.ratios(Pattern::Zipfian), vec![1.5, 1.0, 1.4]);
        assert_eq!(r.ratios(Pattern::Uniform), vec![0.8, 1.5, 0.9]);
        let text = r.to_string();
        let headers = text.lines().filter(|l| l.starts_with("round ")).count();
        assert_eq!(headers, 4, "{text}");
        let line = |name: &str| {
            text.lines()
                .rev()
                .find(|l| l.trim_start().starts_with(name))
                .unwrap()
                .to_string()
        };
        // Zipfian: median 1.40x against its 1.3x goal; uniform: 0.90x against 1x.
        assert!(line("zipfian").contains("1.40x"), "{text}");
        assert!(line("zipfian").contains(" met"), "{text}");
        assert!(line("uniform").contains("0.90x"), "{text}");
        assert!(line("uniform").contains("MISSED"), "{text}");
        assert!(
            line("uniform").contains("1 of 4 rounds without a ratio"),
            "{text}"
        );
    }

    #[test]
    fn patterns_parse_long_and_short_names() {
        for p in Pattern::ALL {
            assert_eq!(Pattern::parse(p.name()), Some(p));
        }
        assert_eq!(Pattern::parse("seq"), Some(Pattern::Sequential));
        assert_eq!(Pattern::parse("zipf"), Some(Pattern::Zipfian));
        assert_eq!(Pattern::parse("random"), None);
    }

    #[test]
    fn result_lines_round_trip_and_junk_is_refused() {
        let r = KernelRun {
            pattern: Pattern::Zipfian,
            ops_per_sec: 154010.5,
            cpu_secs: 0.98,
            pswpin: 30033,
            pswpout: 24811,
            stalls: Stalls::default(),
            disk: None,
            cpu_wait: None,
        };
        let mut r2 = r.clone();
        for ns in [5_000, 150_000, 160_000, 3] {
            r2.stalls.record(ns);
        }
        r2.disk = Some(DiskIo {
            reads: 101_028,
            read_ms: 9597,
            writes: 99_414,
            write_sectors: 795_312,
            write_ms: 63_664,
        });
        r2.cpu_wait = Some(CpuWait {
            run_ns: 1_653_000_000,
            wait_ns: 336_000_000,
            slices: 26_561,
        });
        assert_eq!(r2.stalls.count, 3, "3 ns is no stall");
        assert_eq!(r2.stalls.mean_ns(), 105_000);
        assert_eq!(r2.stalls.hist.quantile_ns(0.5), 1 << 18);
        for r in [r, r2] {
            assert_eq!(parse_result_line(&result_line(&r)), Some(r));
        }
        assert_eq!(parse_result_line("RESULT zipfian 1 2 3"), None);
        assert_eq!(parse_result_line("RESULT zipfian 1 2 3 4"), None);
        // The stall field must be count, sum, buckets that add up to count.
        assert_eq!(parse_result_line("RESULT zipfian 1 2 3 4 2,9,1 - -"), None);
        assert!(parse_result_line("RESULT zipfian 1 2 3 4 2,9,1,1 - -").is_some());
        // The device field: five counters, or `-` when there were none.
        assert_eq!(parse_result_line("RESULT zipfian 1 2 3 4 2,9,1,1 -"), None);
        assert_eq!(
            parse_result_line("RESULT zipfian 1 2 3 4 0,0 1,2,3,4 -"),
            None
        );
        assert!(parse_result_line("RESULT zipfian 1 2 3 4 0,0 1,2,3,4,5 -").is_some());
        // The CPU-wait field: three counters, or `-` when not kept.
        assert_eq!(parse_result_line("RESULT zipfian 1 2 3 4 0,0 - 5,6"), None);
        assert_eq!(
            parse_result_line("RESULT zipfian 1 2 3 4 0,0 - 5,6,7")
                .and_then(|r| r.cpu_wait)
                .map(|c| (c.run_ns, c.wait_ns, c.slices)),
            Some((5, 6, 7))
        );
        assert_eq!(parse_result_line("RESULT zipfian 1 2 3 4 0,0 - - 5"), None);
        assert_eq!(parse_result_line("RESULT bogus 1 2 3 4"), None);
        assert_eq!(parse_result_line("zipfian 1 2 3 4"), None);
        assert_eq!(parse_result_line("RESULT uniform x 2 3 4"), None);
    }

    #[test]
    fn cpu_waits_parse_subtract_add_and_summarise() {
        assert_eq!(CpuWait::parse("1 2"), None);
        assert_eq!(CpuWait::parse("1 2 x"), None);
        let a = CpuWait::parse("1653000000 336000000 26561\n").expect("a schedstat line");
        let b = CpuWait::parse("2653000000 786000000 56561\n").expect("a schedstat line");
        let d = b.since(&a);
        assert_eq!(
            (d.run_ns, d.wait_ns, d.slices),
            (1_000_000_000, 450_000_000, 30_000)
        );
        let mut sum = d;
        sum.add(&d);
        assert_eq!(sum.slices, 60_000);
        assert_eq!(
            sum.summary(),
            "15 µs per time on a CPU (60000 times), 0.90 s in all; on a CPU 2.00 s"
        );
        // Without delay accounting the kernel counts slices only.
        assert!(!CpuWait::parse("0 0 12").unwrap().kept());
        assert!(a.kept());
        // This thread's own counters move forward.
        let _on = DelayAcct::enable();
        if let Some(t0) = CpuWait::now().filter(CpuWait::kept) {
            let spin = Instant::now();
            let ran = || CpuWait::now().map_or(0, |t| t.since(&t0).run_ns);
            while ran() < 5_000_000 && spin.elapsed() < Duration::from_secs(10) {}
            assert!(ran() >= 5_000_000, "{t0:?} -> {:?}", CpuWait::now());
        }
    }

    #[test]
    fn disk_counters_parse_subtract_and_summarise() {
        // A `stat` line of a virtio disk (kernel 6.18: 17 fields).
        let line = "  189470     2016 10155538   105626  1009843   111180 46542642  \
                    1123915        0   511600  1279140        0        0        0        0 \
                    80906    49598\n";
        let a = DiskIo::parse(line).expect("a stat line");
        assert_eq!(
            a,
            DiskIo {
                reads: 189_470,
                read_ms: 105_626,
                writes: 1_009_843,
                write_sectors: 46_542_642,
                write_ms: 1_123_915,
            }
        );
        assert_eq!(DiskIo::parse("1 2 3"), None, "too few fields");
        assert_eq!(DiskIo::parse("1 2 x 4 5 6 7 8 9 10 11"), None);
        let b = DiskIo {
            reads: a.reads + 1000,
            read_ms: a.read_ms + 94,
            writes: a.writes + 10,
            write_sectors: a.write_sectors + 960,
            write_ms: a.write_ms + 2,
        };
        let d = b.since(&a);
        assert_eq!(
            d.summary(),
            "1000 reads, 94 µs each; 10 writes of 48 KiB, 200 µs each"
        );
        assert_eq!(
            DiskIo::default().summary(),
            "0 reads, 0 µs each; 0 writes of 0 KiB, 0 µs each"
        );
        assert_eq!(DiskIo::decode(&d.encode()), Some(Some(d)));
        assert_eq!(DiskIo::decode("-"), Some(None));
        assert_eq!(DiskIo::decode("1,2,3,4,5,6"), None);
    }

    #[test]
    fn the_disk_of_a_directory_is_found_or_named_missing() {
        // /sys itself is on an anonymous device (sysfs): no block device.
        assert_eq!(disk_stat_path(Path::new("/sys")), None);
        assert_eq!(disk_stat_path(Path::new("/no/such/dir")), None);
        // Where the tests run from is usually on a disk; when it is, its
        // counters parse.
        if let Some(p) = disk_stat_path(Path::new(env!("CARGO_MANIFEST_DIR"))) {
            assert!(DiskIo::read(&p).is_some(), "{} does not parse", p.display());
        }
    }

    #[test]
    fn child_args_need_four_values() {
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            parse_child_args(&a(&["1048576", "4", "1000", "seq,uniform"])),
            Ok((
                1 << 20,
                4,
                1000,
                vec![Pattern::Sequential, Pattern::Uniform]
            ))
        );
        assert!(parse_child_args(&a(&["1048576", "4", "1000"])).is_err());
        assert!(parse_child_args(&a(&["1M", "4", "1000", "seq"])).is_err());
        assert!(parse_child_args(&a(&["1048576", "4", "1000", "seq,nope"])).is_err());
    }

    #[test]
    fn no_ratio_without_both_setups() {
        let v = |k, f| verdict(Pattern::Zipfian, k, f);
        assert_eq!(v(Some(100.0), Some(200.0)), ("2.00x".into(), "met".into()));
        assert_eq!(
            v(Some(100.0), Some(120.0)),
            ("1.20x".into(), "MISSED".into())
        );
        assert_eq!(v(None, Some(120.0)).0, "-");
        assert_eq!(v(Some(100.0), None).0, "-");
        assert_eq!(v(Some(0.0), Some(1.0)).0, "-");
        assert_eq!(verdict(Pattern::Uniform, Some(100.0), Some(100.0)).1, "met");
    }
}
