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
}

#[derive(Args)]
struct RunArgs {
    /// Firecracker-style JSON config file (boot-source, machine-config).
    #[arg(long, conflicts_with_all = ["kernel", "workload", "initrd", "cmdline"])]
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
}

fn run_config(a: &RunArgs) -> Result<VmConfig> {
    if let Some(path) = &a.config {
        if a.mem.is_some() {
            bail!("--mem cannot be combined with --config; set machine-config.mem_size_mib");
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
        mem_backend: MemBackendKind::Anon,
    })
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
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
