//! The `foliovm` command.

mod ctl;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use vmm::config::{
    parse_size, swap_config, ConfigFile, GuestPayload, MemBackendKind, MemoryConfig, RunConfig,
    VmConfig,
};
use vmm::workload::{WorkloadLayout, WorkloadSpec};

#[derive(Parser)]
#[command(
    name = "foliovm",
    version,
    about = "A KVM microVM monitor with its own guest memory manager"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a Linux guest or run the built-in workload guest.
    Run(Box<RunArgs>),
    /// Benchmarks that measure a baseline in the same run and print the ratio.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Control a running foliovm through its API socket.
    Ctl(CtlArgs),
}

#[derive(Args)]
struct CtlArgs {
    /// The socket given to `foliovm run --api-sock`.
    #[arg(long)]
    api_sock: PathBuf,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    cmd: CtlCmd,
}

#[derive(Subcommand)]
enum CtlCmd {
    /// Memory statistics per VM and host-wide.
    Stats {
        /// Refresh every second (a compact table; Ctrl-C to stop).
        #[arg(long)]
        watch: bool,
    },
    /// Pause a VM's vCPUs.
    Pause {
        /// The VM (default: the only one).
        vm: Option<String>,
    },
    /// Resume a paused VM.
    Resume {
        /// The VM (default: the only one).
        vm: Option<String>,
    },
    /// Set a VM's reclaim limits.
    Limit {
        /// The VM.
        vm: String,
        /// Reclaim never takes its resident memory below this (e.g. 128M).
        #[arg(long, default_value = "0")]
        min: String,
        /// Its resident memory is reclaimed down to this.
        #[arg(long)]
        max: Option<String>,
        /// Lower priorities are reclaimed first.
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        priority: i32,
    },
    /// Reclaim memory now, to the swap file.
    Reclaim {
        /// How much, e.g. 256M.
        size: String,
        /// From this VM (default: the VMs reclaim policy picks).
        #[arg(long)]
        vm: Option<String>,
    },
    /// Show the host memory budget, or set it (e.g. 512M): lowering it
    /// reclaims what does not fit; it can go back up to the pool mapped at
    /// start.
    Budget {
        /// The new budget (default: show it).
        size: Option<String>,
    },
    /// Show a VM's balloon (target, actual size, bytes returned), or set
    /// its target (e.g. 64M).
    Balloon {
        /// The VM (default: the only one).
        #[arg(long)]
        vm: Option<String>,
        /// The new target (default: show the balloon).
        size: Option<String>,
    },
    /// Compact a VM's memory: rebuild free 2 MiB blocks in the pool and
    /// collapse ranges of small folios into 2 MiB folios mapped as PMDs.
    Compact {
        /// The VM.
        vm: String,
    },
    /// Move a guest RAM region's host backing while the VM runs.
    #[command(group(clap::ArgGroup::new("op").required(true).args(["to_aligned", "merge_with", "grow"])))]
    Relocate {
        /// The VM.
        vm: String,
        /// A guest-physical address inside the region (default 0).
        #[arg(long, default_value = "0")]
        region: String,
        /// Move it to a 2 MiB-aligned host range (its 2 MiB folios become
        /// PMD-mapped).
        #[arg(long)]
        to_aligned: bool,
        /// Merge it with the adjacent region holding this guest address.
        #[arg(long)]
        merge_with: Option<String>,
        /// Grow it to this size (e.g. 1G).
        #[arg(long)]
        grow: Option<String>,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// A working set twice the budget under kernel swap (cgroup v1 limit)
    /// and under foliovm's swap, per pattern.
    Overcommit {
        /// Memory budget; the working set is twice this.
        #[arg(long, default_value = "256M")]
        budget: String,
        /// Directory for the swap files (same disk for both setups).
        #[arg(long, default_value = "/var/tmp")]
        swap_dir: PathBuf,
        /// Patterns, comma-separated.
        #[arg(long, default_value = "seq,zipf,uniform")]
        patterns: String,
        /// Also run the patterns from host threads (no KVM) under both
        /// setups: `auto` when the kernel baseline with a KVM guest did not
        /// run, `always`, or `never`.
        #[arg(long, default_value = "auto")]
        host_threads: vmm::bench::overcommit::HostThreads,
        /// Accessing threads of the host-thread run (each owns a word of
        /// every page, so at most 512).
        #[arg(long, default_value_t = 4,
              value_parser = clap::value_parser!(u64).range(1..=mem::bench::MAX_THREADS))]
        threads: u64,
        /// Accesses of the host-thread run's zipf and uniform patterns.
        #[arg(long, default_value_t = 200_000)]
        ops: u64,
        /// Rounds of the host-thread run, both setups each round; its
        /// verdict goes by the median ratio.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        rounds: u32,
    },
    /// The kernel-side child of the host-thread overcommit run (internal).
    #[command(hide = true)]
    OvercommitChild {
        /// Working set, threads, ops, patterns.
        values: Vec<String>,
    },
    /// The virtio-blk request path against raw pread/pwrite of the same
    /// sizes on the same image file (page cache warm). Overwrites the image.
    Blk {
        /// Scratch image file (created with --size if missing).
        #[arg(long, default_value = "/tmp/foliovm-bench-blk.img")]
        image: PathBuf,
        /// Image size when creating it.
        #[arg(long, default_value = "256M")]
        size: String,
        /// Request size.
        #[arg(long, default_value = "128K")]
        req: String,
        /// Passes per variant (the best counts).
        #[arg(long, default_value_t = 3)]
        passes: usize,
    },
    /// Touch fresh guest memory with the workload guest, on kernel anonymous
    /// memory (THP) and on foliovm's memory manager.
    FirstTouch {
        /// Memory to touch.
        #[arg(long, default_value = "1G")]
        size: String,
        /// Workload vCPUs.
        #[arg(long, default_value_t = 2)]
        vcpus: u8,
        /// Runs per backend (the median is reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
}

fn bench(cmd: BenchCmd) -> Result<i32> {
    match cmd {
        BenchCmd::Overcommit {
            budget,
            swap_dir,
            patterns,
            host_threads,
            threads,
            ops,
            rounds,
        } => {
            let opts = vmm::bench::overcommit::OvercommitOpts {
                budget: parse_size(&budget).context("invalid --budget")?,
                swap_dir,
                exe: std::env::current_exe().context("cannot find the foliovm executable")?,
                patterns: patterns.split(',').map(str::to_string).collect(),
                host: host_threads,
                host_threads: threads,
                host_ops: ops,
                host_rounds: rounds,
            };
            for p in &opts.patterns {
                if !["seq", "zipf", "uniform"].contains(&p.as_str()) {
                    bail!("unknown pattern {p:?}: expected seq, zipf or uniform");
                }
            }
            print!("{}", vmm::bench::overcommit::overcommit(&opts));
            Ok(0)
        }
        BenchCmd::OvercommitChild { values } => {
            mem::bench::kernel_child(&values).map_err(anyhow::Error::msg)?;
            Ok(0)
        }
        BenchCmd::Blk {
            image,
            size,
            req,
            passes,
        } => {
            if !image.exists() {
                let f = std::fs::File::create(&image)?;
                f.set_len(parse_size(&size).context("invalid --size")?)?;
            }
            let req = u32::try_from(parse_size(&req).context("invalid --req")?)?;
            let r = devices::virtio::block::bench::run(&image, req, passes)
                .map_err(|e| anyhow::anyhow!(e))?;
            println!(
                "foliovm bench blk: {} requests of {req} bytes",
                image.display()
            );
            print!("{r}");
            Ok(0)
        }
        BenchCmd::FirstTouch { size, vcpus, runs } => {
            let size = parse_size(&size).context("invalid --size")?;
            let (anon, folio) = vmm::bench::first_touch(size, vcpus, runs)?;
            print!(
                "{}",
                vmm::bench::first_touch_report(size, vcpus, &anon, &folio)
            );
            Ok(0)
        }
    }
}

#[derive(Args)]
struct RunArgs {
    /// Firecracker-style JSON config file (boot-source, machine-config).
    /// Also `--config-file`, Firecracker's name for it.
    #[arg(long, visible_alias = "config-file", conflicts_with_all = ["kernel", "workload", "initrd", "cmdline", "drive", "balloon"])]
    config: Option<PathBuf>,
    /// Kernel image: ELF vmlinux or bzImage.
    #[arg(long, conflicts_with = "workload")]
    kernel: Option<PathBuf>,
    /// Initrd / initramfs image.
    #[arg(long, requires = "kernel", conflicts_with = "workload")]
    initrd: Option<PathBuf>,
    /// Kernel command line (default: "console=ttyS0 reboot=k panic=1 pci=off").
    /// Words after " -- " are passed to init.
    #[arg(long, requires = "kernel", conflicts_with = "workload")]
    cmdline: Option<String>,
    /// Run the workload guest: PATTERN:SIZE[,key=value...], PATTERN one of
    /// seq, uniform, zipf (e.g. seq:256M, zipf:1G,theta=0.99).
    #[arg(long)]
    workload: Option<String>,
    /// Guest memory, e.g. 512M or 2G (plain numbers are MiB). Workloads
    /// default to what their range needs; Linux guests to 256M.
    #[arg(long)]
    mem: Option<String>,
    /// Number of vCPUs (default 1).
    #[arg(long)]
    vcpus: Option<u32>,
    /// Guest memory backend: `folio` (foliovm's memory manager) or `anon`
    /// (plain anonymous memory, the kernel serves faults; the baseline).
    /// Default: folio.
    #[arg(long)]
    mem_backend: Option<MemBackendKind>,
    /// Host memory the memory manager may use for this guest (default: --mem).
    #[arg(long)]
    mem_budget: Option<String>,
    /// Swap guest memory beyond the budget to this file (created, must not
    /// exist, unlinked at once). Needs --swap-size.
    #[arg(long, conflicts_with = "swap_dir")]
    swap_file: Option<PathBuf>,
    /// Or to an anonymous file (O_TMPFILE) in this directory.
    #[arg(long)]
    swap_dir: Option<PathBuf>,
    /// Swap file size, e.g. 2G.
    #[arg(long)]
    swap_size: Option<String>,
    /// Reclaim never takes the guest's resident memory below this.
    #[arg(long)]
    mem_min: Option<String>,
    /// The guest's resident memory is reclaimed down to this.
    #[arg(long)]
    mem_max: Option<String>,
    /// A virtio-blk drive: PATH[,ro][,root][,id=NAME] (raw image; repeatable).
    /// `root` makes it /dev/vda and adds root=/dev/vda. See docs/virtio.md.
    #[arg(long, requires = "kernel", conflicts_with = "workload")]
    drive: Vec<String>,
    /// A virtio-balloon with this initial target:
    /// SIZE[,deflate_on_oom][,stats=SECS][,no_reporting].
    #[arg(long, requires = "kernel", conflicts_with = "workload")]
    balloon: Option<String>,
    /// Reclaim priority among guests (lower is reclaimed first).
    #[arg(long, allow_negative_numbers = true)]
    priority: Option<i32>,
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, default_value = "warn")]
    log_level: tracing::Level,
    /// Write logs to this file (appended) instead of stderr.
    #[arg(long)]
    log_file: Option<PathBuf>,
    /// Serve the HTTP API on this Unix socket. Without --kernel, --workload
    /// or --config, wait for the VM to be configured and started through it
    /// (PUT /boot-source, PUT /machine-config, PUT /actions InstanceStart).
    #[arg(long)]
    api_sock: Option<PathBuf>,
}

fn memory_config(a: &RunArgs) -> Result<MemoryConfig> {
    Ok(MemoryConfig {
        swap: swap_config(
            a.swap_file.as_deref(),
            a.swap_dir.as_deref(),
            a.swap_size.as_deref(),
        )?,
        backend: a.mem_backend.unwrap_or_default(),
        budget: a
            .mem_budget
            .as_deref()
            .map(parse_size)
            .transpose()
            .context("invalid --mem-budget")?,
    })
}

fn run_config(a: &RunArgs) -> Result<RunConfig> {
    if let Some(path) = &a.config {
        let memory_flags = a.swap_file.is_some() || a.swap_dir.is_some() || a.swap_size.is_some();
        let vm_flags = a.mem_min.is_some() || a.mem_max.is_some() || a.priority.is_some();
        if a.mem.is_some()
            || a.vcpus.is_some()
            || a.mem_budget.is_some()
            || a.mem_backend.is_some()
            || memory_flags
            || vm_flags
        {
            bail!(
                "VM, memory and swap flags cannot be combined with --config; \
                 set machine-config.vcpu_count and mem_size_mib and the foliovm section's mem_budget, mem_backend, swap_*, mem_min, mem_max, priority"
            );
        }
        let (config, warnings) = ConfigFile::load(path)?;
        for w in warnings {
            eprintln!("foliovm: warning: {w}");
        }
        return Ok(config);
    }
    let payload = match (&a.kernel, &a.workload) {
        (Some(kernel), None) => GuestPayload::Linux {
            kernel: kernel.clone(),
            initrd: a.initrd.clone(),
            cmdline: a.cmdline.clone(),
        },
        (None, Some(w)) => GuestPayload::Workload(w.clone()),
        _ => bail!("nothing to run: give --kernel, --workload or --config"),
    };
    let mem_bytes = match (&a.mem, &payload) {
        (Some(m), _) => parse_size(m).context("invalid --mem")?,
        (None, GuestPayload::Workload(w)) => {
            let spec: WorkloadSpec = w.parse()?;
            WorkloadLayout::min_mem(&spec)?.next_multiple_of(2 << 20)
        }
        (None, GuestPayload::Linux { .. }) => 256 << 20,
    };
    let n = a.vcpus.unwrap_or(1);
    let vcpus = u8::try_from(n)
        .map_err(|_| anyhow::anyhow!("vCPU count {n} exceeds the maximum of 254"))?;
    let memory = memory_config(a)?;
    let vm = VmConfig {
        name: "vm0".into(),
        payload,
        mem_bytes,
        vcpus,
        limits: mem::VmLimits {
            min_bytes: a
                .mem_min
                .as_deref()
                .map(parse_size)
                .transpose()
                .context("invalid --mem-min")?
                .unwrap_or(0),
            max_bytes: a
                .mem_max
                .as_deref()
                .map(parse_size)
                .transpose()
                .context("invalid --mem-max")?,
            priority: a.priority.unwrap_or(0),
        },
        virtio: vmm::virtio::VirtioConfig {
            drives: a
                .drive
                .iter()
                .enumerate()
                .map(|(i, d)| vmm::virtio::parse_drive_flag(d, i))
                .collect::<Result<_, _>>()?,
            balloon: a
                .balloon
                .as_deref()
                .map(vmm::virtio::parse_balloon_flag)
                .transpose()?,
        },
    };
    Ok(RunConfig::single(vm, memory))
}

/// Print each VM's result and return the process exit status: 0 if every
/// VM ended cleanly, 2 if a workload found mismatches, else the first
/// non-zero VM status.
fn report(outcomes: &[vmm::vmm::RunOutcome]) -> i32 {
    let many = outcomes.len() > 1;
    let mut status = 0;
    for o in outcomes {
        let prefix = if many {
            format!("{}: ", o.name)
        } else {
            String::new()
        };
        let mut code = o.reason.exit_code();
        if let Some(w) = &o.workload {
            println!("{}", w.line());
            if code == 0 && !w.ok() {
                eprintln!(
                    "foliovm: {prefix}workload verification failed: {} mismatched pages",
                    w.mismatches
                );
                code = 2;
            }
        }
        if code != 0 {
            eprintln!("foliovm: {prefix}{}", o.reason);
            if status == 0 {
                status = code;
            }
        }
    }
    status
}

/// Send `tracing` events at `level` or above to `file` (appended) or stderr.
fn init_logging(level: tracing::Level, file: Option<&std::path::Path>) -> Result<()> {
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_target(false);
    match file {
        Some(p) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("cannot open log file {}", p.display()))?;
            builder
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(f))
                .init();
        }
        None => {
            use std::io::IsTerminal;
            builder
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr)
                .init()
        }
    }
    Ok(())
}

fn run(a: &RunArgs) -> Result<vmm::vmm::Served> {
    init_logging(a.log_level, a.log_file.as_deref())?;
    let waits_for_api =
        a.api_sock.is_some() && a.kernel.is_none() && a.workload.is_none() && a.config.is_none();
    let (run, memory) = if waits_for_api {
        let vm_flags = [
            ("--mem", a.mem.is_some()),
            ("--vcpus", a.vcpus.is_some()),
            ("--mem-min", a.mem_min.is_some()),
            ("--mem-max", a.mem_max.is_some()),
            ("--priority", a.priority.is_some()),
        ];
        if let Some((flag, _)) = vm_flags.iter().find(|(_, given)| *given) {
            bail!(
                "{flag} describes a VM given on the command line (--kernel or --workload); \
                 with --api-sock alone the VM comes from the API (PUT /machine-config, \
                 PUT /vms/NAME/limits)"
            );
        }
        let memory = memory_config(a)?;
        // The memory and swap are made when the API starts the VM; a bad
        // flag is refused now, not then.
        memory.validate(&vmm::vmm::host_limits()?)?;
        if let Some(swap) = &memory.swap {
            swap.check().context("invalid swap flags")?;
        }
        (None, memory)
    } else {
        let r = run_config(a)?;
        let m = r.memory.clone();
        (Some(r), m)
    };
    Ok(vmm::vmm::serve(vmm::vmm::ServeOptions {
        run,
        memory,
        source: None,
        api_sock: a.api_sock.clone(),
    })?)
}

fn main() {
    // Bad flags exit 1, as other bad input does (clap's own code, 2, is
    // the workload's "mismatch found"); help and version exit 0.
    let cli = Cli::try_parse().unwrap_or_else(|e| {
        let _ = e.print();
        std::process::exit(if e.use_stderr() { 1 } else { 0 })
    });
    let code = match cli.command {
        Command::Bench(b) => bench(b).unwrap_or_else(|e| {
            eprintln!("foliovm: error: {e:#}");
            1
        }),
        Command::Run(a) => match run(&a) {
            // With no VM (an API that never started one), a signal still
            // exits 128 + its number, and an error 1 with its reason.
            Ok(s) if s.outcomes.is_empty() => match s.exit {
                Some(vmm::stop::ExitReason::Interrupted(sig)) => 128 + sig,
                Some(r) if r.exit_code() != 0 => {
                    eprintln!("foliovm: {r}");
                    r.exit_code()
                }
                _ => 0,
            },
            Ok(s) => report(&s.outcomes),
            Err(e) => {
                eprintln!("foliovm: error: {e:#}");
                1
            }
        },
        Command::Ctl(c) => ctl::main(&c.api_sock, c.json, c.cmd),
    };
    std::process::exit(code);
}
