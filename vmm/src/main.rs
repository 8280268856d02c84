//! The `foliovm` command.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use vmm::config::{parse_size, ConfigFile, GuestPayload, MemBackendKind, VmConfig};
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
    Run(RunArgs),
    /// Benchmarks that measure a baseline in the same run and print the ratio.
    #[command(subcommand)]
    Bench(BenchCmd),
}

#[derive(Subcommand)]
enum BenchCmd {
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
}

fn bench(cmd: BenchCmd) -> Result<i32> {
    match cmd {
        BenchCmd::FirstTouch { size, vcpus, runs } => {
            let size = parse_size(&size).context("invalid --size")?;
            let (anon, folio) = vmm::bench::first_touch(size, vcpus, runs)?;
            print!(
                "{}",
                vmm::bench::first_touch_report(size, vcpus, &anon, &folio)
            );
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
    }
}

#[derive(Args)]
struct RunArgs {
    /// Firecracker-style JSON config file (boot-source, machine-config).
    #[arg(long, conflicts_with_all = ["kernel", "workload", "initrd", "cmdline", "drive", "balloon"])]
    config: Option<PathBuf>,
    /// Kernel image: ELF vmlinux or bzImage.
    #[arg(long, conflicts_with = "workload")]
    kernel: Option<PathBuf>,
    /// Initrd / initramfs image.
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Kernel command line (default: "console=ttyS0 reboot=k panic=1 pci=off").
    /// Words after " -- " are passed to init.
    #[arg(long, requires = "kernel")]
    cmdline: Option<String>,
    /// Run the workload guest: PATTERN:SIZE[,key=value...], PATTERN one of
    /// seq, uniform, zipf (e.g. seq:256M, zipf:1G,theta=0.99).
    #[arg(long)]
    workload: Option<String>,
    /// Guest memory, e.g. 512M or 2G (plain numbers are MiB). Workloads
    /// default to what their range needs; Linux guests to 256M.
    #[arg(long)]
    mem: Option<String>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Guest memory backend: `folio` (foliovm's memory manager) or `anon`
    /// (plain anonymous memory, the kernel serves faults; the baseline).
    /// Default: folio.
    #[arg(long)]
    mem_backend: Option<MemBackendKind>,
    /// Host memory the memory manager may use for this guest (default: --mem).
    #[arg(long)]
    mem_budget: Option<String>,
    /// A virtio-blk drive: PATH[,ro][,root][,id=NAME] (raw image; repeatable).
    /// `root` makes it /dev/vda and adds root=/dev/vda. See docs/virtio.md.
    #[arg(long, requires = "kernel")]
    drive: Vec<String>,
    /// A virtio-balloon with this initial target:
    /// SIZE[,deflate_on_oom][,stats=SECS][,no_reporting].
    #[arg(long, requires = "kernel")]
    balloon: Option<String>,
}

fn run_config(a: &RunArgs) -> Result<VmConfig> {
    if let Some(path) = &a.config {
        if a.mem.is_some() || a.mem_budget.is_some() || a.mem_backend.is_some() {
            bail!(
                "--mem, --mem-budget and --mem-backend cannot be combined with --config; \
                 set machine-config.mem_size_mib, foliovm.mem_budget and foliovm.mem_backend"
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
            WorkloadLayout::min_mem(&spec).next_multiple_of(2 << 20)
        }
        (None, GuestPayload::Linux { .. }) => 256 << 20,
    };
    let vcpus = u8::try_from(a.vcpus)
        .map_err(|_| anyhow::anyhow!("vCPU count {} exceeds the maximum of 254", a.vcpus))?;
    Ok(VmConfig {
        payload,
        mem_bytes,
        vcpus,
        mem_backend: a.mem_backend.unwrap_or_default(),
        mem_budget: a
            .mem_budget
            .as_deref()
            .map(parse_size)
            .transpose()
            .context("invalid --mem-budget")?,
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
                .transpose()
                .context("invalid --balloon")?,
        },
    })
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Bench(b) => bench(b).unwrap_or_else(|e| {
            eprintln!("foliovm: error: {e:#}");
            1
        }),
        Command::Run(a) => {
            match run_config(&a).and_then(|c| vmm::vmm::run(&c).map_err(anyhow::Error::from)) {
                Ok(outcome) => {
                    let mut code = outcome.reason.exit_code();
                    if let Some(w) = &outcome.workload {
                        println!("{}", w.line());
                        if code == 0 && !w.ok() {
                            eprintln!(
                                "foliovm: workload verification failed: {} mismatched pages",
                                w.mismatches
                            );
                            code = 2;
                        }
                    }
                    if code != 0 {
                        eprintln!("foliovm: {}", outcome.reason);
                    }
                    code
                }
                Err(e) => {
                    eprintln!("foliovm: error: {e:#}");
                    1
                }
            }
        }
    };
    std::process::exit(code);
}
