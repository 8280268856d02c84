//! Building and running one VM: memory, payload, devices, vCPU threads and
//! the device event loop.

use crate::arch::{boot, layout, mptable, regs};
use crate::config::{host_mem_bytes, GuestPayload, HostLimits, MemBackendKind, VmConfig};
use crate::kvm::vcpu::{Vcpu, VcpuContext};
use crate::kvm::{KvmError, KvmVm};
use crate::pvm::HostQuirks;
use crate::stop::{ExitReason, StopSignal};
use crate::workload::{self, WorkloadLayout, WorkloadReport, WorkloadSpec};
use devices::legacy::{SerialDevice, SerialInput, I8042};
use devices::{Bus, EventFdTrigger};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_regs, kvm_sregs};
use mem::anon::AnonBackend;
use mem::{GuestMemoryBackend, MemoryManager, MmConfig, MmStats, RamRegion, VmId, VmStats};
use std::io::IsTerminal;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vm_memory::mmap::MmapRegion;
use vm_memory::{GuestMemoryMmap, GuestRegionMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

/// Default kernel command line, as Firecracker's.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off";
const COM1: u64 = 0x3f8;
const COM1_IRQ: u32 = 4;
const I8042_PORT: u64 = 0x60;

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// KVM setup.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// Kernel or initrd.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// Workload spec.
    #[error(transparent)]
    Spec(#[from] workload::SpecError),
    /// Workload layout.
    #[error(transparent)]
    Workload(#[from] workload::WorkloadError),
    /// Boot structures.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// MP table.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// Drives and balloon.
    #[error(transparent)]
    Virtio(#[from] crate::virtio::VirtioError),
    /// Guest memory.
    #[error("cannot allocate guest memory")]
    Memory(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Host resources: eventfds, threads, epoll, signals.
    #[error("{what}")]
    Host {
        /// What failed.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

fn host(what: &str) -> impl FnOnce(std::io::Error) -> VmmError + '_ {
    move |source| VmmError::Host {
        what: what.to_string(),
        source,
    }
}

/// How a run ended.
#[derive(Debug)]
pub struct RunOutcome {
    /// Why the VM stopped.
    pub reason: ExitReason,
    /// The workload guest's result, for workload runs.
    pub workload: Option<workload::WorkloadResult>,
    /// The memory manager's statistics at the end (folio backend only).
    pub mem_stats: Option<(MmStats, VmStats)>,
}

/// Guest RAM and, for the folio backend, the manager that owns it.
struct GuestRam {
    backend: Arc<dyn GuestMemoryBackend>,
    manager: Option<(Arc<MemoryManager>, VmId)>,
}

impl GuestRam {
    fn stats(&self) -> Option<(MmStats, VmStats)> {
        let (mm, vm) = self.manager.as_ref()?;
        Some((mm.stats(), mm.vm_stats(*vm)?))
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // The VM's folios go back to the pool once `backend` (dropped right
        // after this) is gone too.
        if let Some((mm, vm)) = &self.manager {
            let _ = mm.destroy_vm(*vm);
        }
    }
}

/// Build a vm-memory view over the backend's mappings.
fn guest_memory(regions: &[RamRegion]) -> Result<GuestMemoryMmap, VmmError> {
    let mut out = Vec::with_capacity(regions.len());
    for r in regions {
        // SAFETY: the backend guarantees [host_addr, host_addr + size) is a
        // live read/write private anonymous mapping for its whole lifetime,
        // and `run` keeps the backend alive longer than this view.
        let region = unsafe {
            MmapRegion::build_raw(
                r.host_addr.as_ptr(),
                r.size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            )
        }
        .map_err(|e| VmmError::Memory(Box::new(e)))?;
        let g = GuestRegionMmap::new(region, vm_memory::GuestAddress(r.guest_base.raw()))
            .ok_or_else(|| VmmError::Memory("guest region overflows the address space".into()))?;
        out.push(g);
    }
    GuestMemoryMmap::from_regions(out).map_err(|e| VmmError::Memory(Box::new(e)))
}

/// The guest RAM backend `config` asks for. For the folio backend this uses
/// `shared`, or creates a memory manager (pool of `mem_budget` bytes) for
/// this one VM; faults are served from the moment it returns.
fn memory_backend(
    config: &VmConfig,
    shared: Option<&Arc<MemoryManager>>,
) -> Result<GuestRam, VmmError> {
    let layout = layout::ram_regions(config.mem_bytes);
    let mem_err = |e: Box<dyn std::error::Error + Send + Sync>| VmmError::Memory(e);
    Ok(match config.mem_backend {
        MemBackendKind::Anon => GuestRam {
            backend: Arc::new(AnonBackend::new(&layout).map_err(|e| mem_err(Box::new(e)))?),
            manager: None,
        },
        MemBackendKind::Folio => {
            let budget = config
                .mem_budget
                .unwrap_or(config.mem_bytes)
                .next_multiple_of(2 << 20);
            let mm = match shared {
                Some(mm) => mm.clone(),
                None => MemoryManager::new(MmConfig::with_budget(budget))
                    .map_err(|e| mem_err(Box::new(e)))?,
            };
            let vm = mm.create_vm("vm0").map_err(|e| mem_err(Box::new(e)))?;
            let backend = mm.backend(vm, &layout).map_err(|e| mem_err(Box::new(e)))?;
            GuestRam {
                backend,
                manager: Some((mm, vm)),
            }
        }
    })
}

/// Host limits for validation: host RAM and the vCPU ceiling of KVM and the MP table.
pub fn host_limits(vm: &KvmVm) -> Result<HostLimits, VmmError> {
    Ok(HostLimits {
        host_mem_bytes: host_mem_bytes()?,
        max_vcpus: vm.max_vcpus().min(mptable::MAX_VCPUS),
    })
}

/// What the payload needs from the VM.
struct Payload {
    vcpu_state: Vec<(kvm_regs, kvm_sregs)>,
    linux: bool,
    workload: Option<(WorkloadSpec, Arc<WorkloadReport>)>,
}

fn load_linux(
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    kernel: &std::path::Path,
    initrd: Option<&std::path::Path>,
    cmdline: Option<&str>,
    quirks: &HostQuirks,
    bsp_sregs: kvm_sregs,
) -> Result<Payload, VmmError> {
    let k = boot::load_kernel(mem, kernel)?;
    let initrd = match initrd {
        Some(p) => Some(boot::load_initrd(mem, config.mem_bytes, k.end, p)?),
        None => None,
    };
    let (mut extras, warning) = quirks.linux_cmdline_extras(config.vcpus);
    extras.extend(
        config
            .virtio
            .cmdline_extras(cmdline.unwrap_or(DEFAULT_CMDLINE)),
    );
    if let Some(w) = warning {
        eprintln!("foliovm: warning: {w}");
    }
    let cmdline = boot::build_cmdline(cmdline.unwrap_or(DEFAULT_CMDLINE), &extras)?;
    boot::write_boot_params(mem, &k, &cmdline, initrd, config.mem_bytes)?;
    mptable::setup_mptable(mem, config.vcpus)?;
    let mut sregs = bsp_sregs;
    regs::setup_linux_segments(mem, &mut sregs)?;
    regs::write_identity_page_tables(mem, layout::PML4_START, 4 << 30, false)?;
    regs::set_long_mode(&mut sregs, layout::PML4_START);
    let r = regs::linux_boot_regs(k.entry);
    Ok(Payload {
        vcpu_state: vec![(r, sregs); config.vcpus as usize],
        linux: true,
        workload: None,
    })
}

fn load_workload(
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    spec_str: &str,
    base_sregs: kvm_sregs,
) -> Result<Payload, VmmError> {
    let spec: WorkloadSpec = spec_str.parse()?;
    let layout = WorkloadLayout::plan(&spec, config.vcpus, config.mem_bytes)?;
    let map = config.mem_bytes.max(layout::MMIO_GAP_END.raw());
    let vcpu_state = workload::load(mem, &spec, &layout, config.vcpus, map, base_sregs)?;
    let report = Arc::new(WorkloadReport::new(config.vcpus as usize));
    Ok(Payload {
        vcpu_state,
        linux: false,
        workload: Some((spec, report)),
    })
}

/// Signal number of the last SIGINT/SIGTERM, and the eventfd its handler pokes.
static SIGNAL_NUM: AtomicI32 = AtomicI32::new(0);
static SIGNAL_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_terminate(num: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    SIGNAL_NUM.store(num, Ordering::SeqCst);
    let fd = SIGNAL_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `one` is a valid 8-byte
        // buffer, and fd is an eventfd that stays open for the process life.
        unsafe { libc::write(fd, std::ptr::addr_of!(one).cast(), 8) };
    }
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Handles the VM's control events on the event loop: guest reset, signals.
struct Control {
    stop: Arc<StopSignal>,
    reset: EventFd,
    signal: EventFd,
}

impl MutEventSubscriber for Control {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.reset.as_raw_fd() {
            let _ = self.reset.read();
            self.stop.request(ExitReason::GuestReset);
        } else if fd == self.signal.as_raw_fd() {
            let _ = self.signal.read();
            self.stop
                .request(ExitReason::Interrupted(SIGNAL_NUM.load(Ordering::SeqCst)));
        } else if fd == self.stop.eventfd().as_raw_fd() {
            let _ = self.stop.eventfd().read();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for fd in [
            self.reset.as_raw_fd(),
            self.signal.as_raw_fd(),
            self.stop.eventfd().as_raw_fd(),
        ] {
            let _ = ops.add(Events::new_raw(fd, EventSet::IN));
        }
    }
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Legacy devices for a Linux guest: COM1 and the i8042 reset line.
fn legacy_devices(
    vm: &KvmVm,
    pio: &mut Bus,
    events: &mut EventManager<Subscriber>,
) -> Result<EventFd, VmmError> {
    let irq = EventFdTrigger::new().map_err(host("cannot create serial irq eventfd"))?;
    vm.fd()
        .register_irqfd(&irq.0, COM1_IRQ)
        .map_err(|source| KvmError::Ioctl {
            op: "KVM_IRQFD",
            source,
        })?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(irq, std::io::stdout())));
    pio.insert(serial.clone(), COM1, 8)
        .expect("COM1 is the first device on an empty bus");
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        let fd = stdin
            .as_fd()
            .try_clone_to_owned()
            .map_err(host("cannot dup stdin"))?;
        let input: Subscriber = Arc::new(Mutex::new(SerialInput::new(
            serial,
            std::fs::File::from(fd),
        )));
        events.add_subscriber(input);
    }
    let reset = EventFdTrigger::new().map_err(host("cannot create reset eventfd"))?;
    let reset_watch = reset
        .0
        .try_clone()
        .map_err(host("cannot clone reset eventfd"))?;
    pio.insert(Arc::new(Mutex::new(I8042::new(reset))), I8042_PORT, 5)
        .expect("i8042 ports do not overlap COM1");
    Ok(reset_watch)
}

use std::os::fd::AsFd;

/// Build the VM described by `config` and run it until it stops.
///
/// # Errors
/// Setup failures; a guest that fails at run time is an `Ok` outcome whose
/// reason has a non-zero exit code.
pub fn run(config: &VmConfig) -> Result<RunOutcome, VmmError> {
    run_on(config, None)
}

/// As [`run`], with the folio backend taking guest RAM from `shared` (a
/// manager that outlives the VM) instead of a manager of its own.
///
/// # Errors
/// As [`run`].
pub fn run_on(
    config: &VmConfig,
    shared: Option<&Arc<MemoryManager>>,
) -> Result<RunOutcome, VmmError> {
    let quirks = HostQuirks::detect();
    let vm = KvmVm::new()?;
    config.validate(&host_limits(&vm)?)?;
    if let GuestPayload::Workload(s) = &config.payload {
        // Reject a bad spec before allocating memory.
        let spec: WorkloadSpec = s.parse()?;
        WorkloadLayout::plan(&spec, config.vcpus, config.mem_bytes)?;
    }
    let ram = memory_backend(config, shared)?;
    let backend = &ram.backend;
    let mem = guest_memory(backend.regions())?;
    // SAFETY: `backend` is declared before `vm`'s use ends and is dropped
    // after every vCPU thread has been joined and `vm` dropped (end of this
    // function, reverse declaration order), so the mappings outlive the VM.
    unsafe { vm.set_memory(backend.regions())? };

    if let GuestPayload::Linux { .. } = config.payload {
        // The irqchip must exist before any vCPU is created.
        vm.setup_irqchip()?;
    }
    let mut vcpus = Vec::with_capacity(config.vcpus as usize);
    for i in 0..config.vcpus as usize {
        vcpus.push(Vcpu::new(&vm, i)?);
    }
    let sregs = vcpus[0].sregs()?;
    let payload = match &config.payload {
        GuestPayload::Linux {
            kernel,
            initrd,
            cmdline,
        } => load_linux(
            &mem,
            config,
            kernel,
            initrd.as_deref(),
            cmdline.as_deref(),
            &quirks,
            sregs,
        )?,
        GuestPayload::Workload(spec) => load_workload(&mem, config, spec, sregs)?,
    };
    let supported = vm.supported_cpuid()?;
    for (v, (r, s)) in vcpus.iter().zip(&payload.vcpu_state) {
        v.configure_cpu(&supported, config.vcpus, &quirks.cpuid_masks)?;
        if payload.linux {
            v.set_lint()?;
        }
        v.set_state(r, s)?;
    }
    let tsc_khz = vcpus[0].tsc_khz();

    let stop = Arc::new(StopSignal::new().map_err(host("cannot create stop eventfd"))?);
    let mut events = EventManager::<Subscriber>::new().map_err(|e| VmmError::Host {
        what: format!("cannot create event manager: {e}"),
        source: std::io::Error::other(e.to_string()),
    })?;
    let mut pio = Bus::new();
    let reset = if payload.linux {
        legacy_devices(&vm, &mut pio, &mut events)?
    } else {
        EventFd::new(libc::EFD_NONBLOCK).map_err(host("cannot create reset eventfd"))?
    };
    let mut mmio = Bus::new();
    let virtio = match payload.linux {
        true => Some(crate::virtio::attach(
            &config.virtio,
            &vm,
            &mem,
            ram.manager.clone(),
            &mut mmio,
            &mut events,
        )?),
        false => None,
    };
    let signal = EventFd::new(libc::EFD_NONBLOCK).map_err(host("cannot create signal eventfd"))?;
    SIGNAL_FD.store(signal.as_raw_fd(), Ordering::SeqCst);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        register_signal_handler(sig, on_terminate).map_err(|e| VmmError::Host {
            what: format!("cannot install handler for signal {sig}"),
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
    }
    register_signal_handler(SIGRTMIN(), on_kick).map_err(|e| VmmError::Host {
        what: "cannot install vCPU kick handler".into(),
        source: std::io::Error::from_raw_os_error(e.errno()),
    })?;
    events.add_subscriber(Arc::new(Mutex::new(Control {
        stop: stop.clone(),
        reset,
        signal,
    })));

    let ctx = Arc::new(VcpuContext {
        pio,
        mmio,
        workload: payload.workload.as_ref().map(|(_, r)| r.clone()),
        stop: stop.clone(),
        mem: mem.clone(),
    });
    let started = Instant::now();
    let mut threads = Vec::new();
    for v in vcpus {
        let ctx = ctx.clone();
        let t = std::thread::Builder::new()
            .name(format!("vcpu{}", v.index()))
            .spawn(move || v.run(&ctx))
            .map_err(host("cannot spawn vCPU thread"))?;
        threads.push(t);
    }
    while !stop.is_stopping() {
        if let Err(e) = events.run_with_timeout(500) {
            stop.request(ExitReason::Error(format!("event loop failed: {e}")));
        }
    }
    let wall = started.elapsed();
    for t in threads {
        while !t.is_finished() {
            let _ = t.kill(SIGRTMIN());
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = t.join();
    }
    SIGNAL_FD.store(-1, Ordering::SeqCst);
    if let Some(v) = &virtio {
        v.finish();
    }
    let reason = stop
        .reason()
        .unwrap_or(ExitReason::Error("VM stopped without a reason".into()));
    let workload = payload.workload.map(|(spec, report)| {
        workload::WorkloadResult::new(
            &spec,
            config,
            backend.kind(),
            &report.reports(),
            tsc_khz,
            wall,
        )
    });
    Ok(RunOutcome {
        reason,
        workload,
        mem_stats: ram.stats(),
    })
}
