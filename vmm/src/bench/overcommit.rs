//! `foliovm bench overcommit`: the workload guest with a working set twice
//! the memory budget, under (a) kernel swap — anonymous guest memory in a
//! cgroup v1 memory limit, with a host swap file on the same disk — and (b)
//! foliovm's own swap. Each pattern's throughput is printed with the ratio
//! when both ran; a baseline that did not run (the kernel OOM-kills KVM
//! guests under a cgroup v1 limit on this host, see DESIGN.md §2) is said
//! so, and no ratio is printed for it.
//!
//! When (a) cannot run with a KVM guest (or always, on request), the same
//! patterns also run from host threads under both setups ([`mem::bench`]):
//! anonymous memory in the cgroup against foliovm's `mem` with userfaultfd,
//! which gives the ratio a real kernel baseline.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const CGROUP: &str = "/sys/fs/cgroup/memory/foliovm-bench";

/// Settings of one benchmark run.
#[derive(Debug, Clone)]
pub struct OvercommitOpts {
    /// Memory budget (cgroup limit for the kernel, pool for foliovm).
    pub budget: u64,
    /// Directory for both swap files.
    pub swap_dir: PathBuf,
    /// The foliovm binary (this executable).
    pub exe: PathBuf,
    /// Patterns to run.
    pub patterns: Vec<String>,
    /// When to run the host-thread comparison.
    pub host: HostThreads,
    /// Accessing threads of the host-thread comparison.
    pub host_threads: u64,
    /// Accesses of its `uniform` and `zipfian` patterns.
    pub host_ops: u64,
    /// Its rounds ([`mem::bench::run_rounds`]).
    pub host_rounds: u32,
}

/// When `foliovm bench overcommit` also runs the patterns from host threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostThreads {
    /// When the kernel baseline with a KVM guest did not run for a pattern.
    Auto,
    /// Always, as a second table.
    Always,
    /// Never.
    Never,
}

impl std::str::FromStr for HostThreads {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(HostThreads::Auto),
            "always" => Ok(HostThreads::Always),
            "never" => Ok(HostThreads::Never),
            o => Err(format!("expected auto, always or never, not {o:?}")),
        }
    }
}

/// The arguments before the four values of [`mem::bench::kernel_child`]:
/// `foliovm bench overcommit-child`.
pub const CHILD_ARGS: [&str; 2] = ["bench", "overcommit-child"];

/// One pattern under one setup.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// It ran and verified.
    Ran {
        /// Page touches per second of guest time.
        ops_per_sec: f64,
        /// The result line's swap object (folio only).
        swap: Option<serde_json::Value>,
    },
    /// It produced no result, and why.
    Failed(String),
}

fn spec(pattern: &str, ws: u64) -> String {
    match pattern {
        "seq" => format!("seq:{ws}B,passes=3"),
        other => format!("{other}:{ws}B,ops={}", ws / 4096 * 2),
    }
}

fn outcome_of(out: std::process::Output, what: &str) -> Outcome {
    if out.status.signal() == Some(libc::SIGKILL) {
        return Outcome::Failed(format!(
            "{what} was killed by SIGKILL (the kernel's OOM killer)"
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let result: Option<serde_json::Value> = stdout
        .lines()
        .find_map(|l| l.strip_prefix("FOLIOVM-RESULT "))
        .and_then(|l| serde_json::from_str(l).ok());
    match result {
        Some(r) if out.status.success() && r["mismatches"] == 0 && r["complete"] == true => {
            let ops = r["ops"].as_f64().unwrap_or(0.0);
            let secs = r["pattern_seconds"].as_f64().unwrap_or(0.0);
            Outcome::Ran {
                ops_per_sec: if secs > 0.0 { ops / secs } else { 0.0 },
                swap: r.get("swap").cloned().filter(|s| !s.is_null()),
            }
        }
        _ => Outcome::Failed(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        )),
    }
}

/// The kernel-swap setup: a cgroup v1 memory limit and a host swap file,
/// both removed on drop.
struct KernelSwap {
    swapfile: PathBuf,
}

impl KernelSwap {
    fn setup(budget: u64, swap_bytes: u64, dir: &Path) -> Result<KernelSwap, String> {
        if !Path::new("/sys/fs/cgroup/memory").exists() {
            return Err("no cgroup v1 memory controller at /sys/fs/cgroup/memory".into());
        }
        let swapfile = dir.join(format!("foliovm-bench-kernel-swap-{}", std::process::id()));
        let cmd = format!(
            "fallocate -l {swap_bytes} {p} && chmod 600 {p} && mkswap {p} && swapon {p}",
            p = swapfile.display()
        );
        let ks = KernelSwap { swapfile };
        let st = Command::new("sh")
            .arg("-c")
            .arg(&cmd)
            .stdout(Stdio::null())
            .status()
            .map_err(|e| e.to_string())?;
        if !st.success() {
            return Err(format!("`{cmd}` failed"));
        }
        std::fs::create_dir_all(CGROUP).map_err(|e| format!("cannot create {CGROUP}: {e}"))?;
        std::fs::write(
            format!("{CGROUP}/memory.limit_in_bytes"),
            budget.to_string(),
        )
        .map_err(|e| format!("cannot set the cgroup limit: {e}"))?;
        Ok(ks)
    }
}

impl Drop for KernelSwap {
    fn drop(&mut self) {
        let _ = Command::new("swapoff")
            .arg(&self.swapfile)
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_file(&self.swapfile);
        let _ = std::fs::remove_dir(CGROUP);
    }
}

fn run_kernel(opts: &OvercommitOpts, ws: u64, pattern: &str) -> Outcome {
    // The shell joins the cgroup, then becomes foliovm: guest memory is
    // charged to the cgroup from the first byte.
    let script = format!(
        "echo $$ > {CGROUP}/cgroup.procs && exec \"$0\" run --workload {} --vcpus 1 --mem-backend anon",
        spec(pattern, ws)
    );
    match Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(&opts.exe)
        .output()
    {
        Ok(out) => outcome_of(out, "the KVM guest on anonymous memory in the cgroup"),
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

fn run_folio(opts: &OvercommitOpts, ws: u64, pattern: &str) -> Outcome {
    let out = Command::new(&opts.exe)
        .args([
            "run",
            "--workload",
            &spec(pattern, ws),
            "--vcpus",
            "1",
            "--mem-backend",
            "folio",
        ])
        .arg("--mem-budget")
        .arg(format!("{}B", opts.budget))
        .arg("--swap-dir")
        .arg(&opts.swap_dir)
        .arg("--swap-size")
        .arg(format!("{}B", 2 * ws))
        .output();
    match out {
        Ok(out) => outcome_of(out, "foliovm"),
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

fn us(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or(0) / 1000
}

/// Run every pattern under both setups; returns the report text.
pub fn overcommit(opts: &OvercommitOpts) -> String {
    let ws = 2 * opts.budget;
    let mut s = format!(
        "overcommit: workload guest, 1 vCPU, working set {} MiB = 2 x budget {} MiB, swap files in {}; \
         throughput in page touches per second of guest time\n",
        ws >> 20,
        opts.budget >> 20,
        opts.swap_dir.display()
    );
    let kernel = KernelSwap::setup(opts.budget, 2 * ws, &opts.swap_dir);
    if let Err(e) = &kernel {
        s += &format!("  (a) kernel swap could not be set up: {e}\n");
    }
    let mut kernel_ran = true;
    for p in &opts.patterns {
        let a = match &kernel {
            Ok(_) => run_kernel(opts, ws, p),
            Err(e) => Outcome::Failed(e.clone()),
        };
        kernel_ran &= matches!(a, Outcome::Ran { .. });
        let b = run_folio(opts, ws, p);
        s += &format!("  {p}:\n");
        for (label, o) in [("(a) kernel swap, cgroup v1", &a), ("(b) foliovm swap", &b)] {
            match o {
                Outcome::Ran { ops_per_sec, .. } => {
                    s += &format!("    {label:28} {ops_per_sec:>12.0} touches/s\n")
                }
                Outcome::Failed(why) => s += &format!("    {label:28} did not run: {why}\n"),
            }
        }
        match (&a, &b) {
            (Outcome::Ran { ops_per_sec: k, .. }, Outcome::Ran { ops_per_sec: f, .. }) => {
                s += &format!("    ratio foliovm/kernel: {:.2}x\n", f / k);
            }
            _ => s += "    ratio: none (no ratio against a baseline that did not run)\n",
        }
        if let Outcome::Ran { swap: Some(sw), .. } = &b {
            s += &format!(
                "    foliovm: swapins {} pages in {} folios, latency p50 {} us p99 {} us; \
                 swap-cache refaults {} (p50 {} us); swapouts {} pages\n",
                sw["swapin_file_pages"],
                sw["swapin_file_folios"],
                us(&sw["swapin_latency"]["p50_ns"]),
                us(&sw["swapin_latency"]["p99_ns"]),
                sw["swapin_cache_folios"],
                us(&sw["swapcache_latency"]["p50_ns"]),
                sw["swapout_pages"],
            );
        }
    }
    // The host-thread run sets up its own swap file and cgroup.
    drop(kernel);
    let run_host = match opts.host {
        HostThreads::Always => true,
        HostThreads::Never => false,
        HostThreads::Auto => !kernel_ran,
    };
    if run_host {
        s += match kernel_ran {
            false => {
                "(a) did not run with a KVM guest, so the same patterns also ran from host \
                 threads (no KVM) under both setups: anonymous memory in the cgroup against \
                 foliovm's mem with userfaultfd. These ratios have a real kernel baseline.\n"
            }
            true => "The same patterns from host threads (no KVM), as a second table:\n",
        };
        s += &mem::bench::run_rounds(&host_opts(opts)).to_string();
    }
    s
}

/// The host-thread comparison's settings for these options.
fn host_opts(opts: &OvercommitOpts) -> mem::bench::HostBenchOpts {
    mem::bench::HostBenchOpts {
        budget: opts.budget,
        threads: opts.host_threads,
        dir: opts.swap_dir.clone(),
        ops: opts.host_ops,
        patterns: opts
            .patterns
            .iter()
            .filter_map(|p| mem::bench::Pattern::parse(p))
            .collect(),
        skip_kernel: false,
        rounds: opts.host_rounds,
        // What VMs use: KVM cannot hand a vCPU's fault to the faulting
        // thread here (see `mem::FaultDelivery::Faulter`).
        faults: mem::FaultDelivery::Handlers,
        child: mem::bench::ChildCommand {
            exe: opts.exe.clone(),
            args: CHILD_ARGS.iter().map(|a| a.to_string()).collect(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_cover_twice_the_pages() {
        assert_eq!(spec("seq", 512 << 20), "seq:536870912B,passes=3");
        assert_eq!(spec("zipf", 8192), "zipf:8192B,ops=4");
    }

    #[test]
    fn host_thread_modes_parse() {
        assert_eq!("auto".parse(), Ok(HostThreads::Auto));
        assert_eq!("always".parse(), Ok(HostThreads::Always));
        assert_eq!("never".parse(), Ok(HostThreads::Never));
        assert!("sometimes".parse::<HostThreads>().is_err());
    }

    #[test]
    fn host_run_takes_the_guest_pattern_names_and_re_enters_foliovm() {
        let o = OvercommitOpts {
            budget: 128 << 20,
            swap_dir: "/var/tmp".into(),
            exe: "/usr/bin/foliovm".into(),
            patterns: vec!["seq".into(), "zipf".into(), "uniform".into()],
            host: HostThreads::Auto,
            host_threads: 4,
            host_ops: 1000,
            host_rounds: 3,
        };
        let h = host_opts(&o);
        assert_eq!(h.patterns, mem::bench::Pattern::ALL.to_vec());
        assert_eq!(h.child.args, ["bench", "overcommit-child"]);
        assert_eq!((h.budget, h.threads, h.ops), (128 << 20, 4, 1000));
        assert_eq!(h.rounds, 3);
    }
}
