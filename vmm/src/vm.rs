//! One VM: its KVM VM, guest RAM, payload, devices and vCPU threads, and
//! its lifecycle.
//!
//! ```text
//! build() --> Built --start()--> Running <--pause()/resume()--> Paused
//!                                   |                              |
//!                                   +-- guest reset/poweroff, ------+--> finish() -> RunOutcome
//!                                       workload done, error, signal
//! ```
//! Field order is drop order: vCPU threads are joined in `finish`, the KVM
//! VM goes before the guest RAM it maps.
//!
//! A Linux guest's virtio devices are served by the VM's device I/O thread
//! ([`crate::io_thread`]), started before its vCPUs. Teardown order: guest
//! memory outlives every thread that may touch it.
//!
//! 1. The stop reason is set, the vCPU threads are kicked out of
//!    `KVM_RUN` and joined: no guest code runs, no vCPU takes an MMIO exit
//!    into a device any more ([`Vm::finish`], [`Vm::reap`]).
//! 2. The device I/O thread is asked to exit and joined: the request it
//!    serves completes first (a request holds its device's transport lock
//!    to its end), then no queue is processed and no retry or balloon timer
//!    fires. A reap asks it before step 1 and does not wait on the shared
//!    event loop: while the thread is still in a request (a read from a hung
//!    disk), the reap is put off to a later round, with the memory kept.
//! 3. (reap) Every device is reset: what another thread asks of a device
//!    now (an API balloon statistics request) finds no queue to touch.
//! 4. (reap) The guest memory is discarded: its folios go back to the
//!    memory manager.
//! 5. (drop) `virtio` drops before `_kvm` and `ram`: its I/O thread is
//!    joined by then (its `Drop` joins one that was not), then the KVM VM
//!    closes, then the guest RAM is unmapped.

use crate::arch::{boot, layout, mptable, regs};
use crate::config::{GuestPayload, MemBackendKind, VmConfig};
use crate::kvm::vcpu::{RunGate, Vcpu, VcpuContext};
use crate::kvm::{KvmError, KvmVm};
use crate::pvm::HostQuirks;
use crate::stop::{ExitReason, StopSignal};
use crate::vmm::{host, RunOutcome, Subscriber, VmmError};
use crate::workload::{self, WorkloadLayout, WorkloadReport, WorkloadSpec};
use devices::legacy::{SerialDevice, SerialInput, I8042};
use devices::{Bus, EventFdTrigger};
use event_manager::{EventOps, Events, MutEventSubscriber, SubscriberId, SubscriberOps};
use kvm_bindings::{kvm_regs, kvm_sregs};
use mem::anon::AnonBackend;
use mem::{GuestMemoryBackend, MemoryManager, MmStats, RamRegion, VmId, VmStats};
use std::io::IsTerminal;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vm_memory::mmap::MmapRegion;
use vm_memory::{GuestMemoryMmap, GuestRegionMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::signal::{Killable, SIGRTMIN};

/// How often [`Vm::kick_until`] signals vCPUs that have not done what it
/// waits for.
const KICK_INTERVAL: Duration = Duration::from_millis(1);
/// How long a reap kicks the vCPUs of a stopped VM before it puts itself
/// off to the event loop's next round.
const REAP_KICKS: Duration = Duration::from_millis(20);

/// Default kernel command line, as Firecracker's.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off";
const COM1: u64 = 0x3f8;
const COM1_IRQ: u32 = 4;
const I8042_PORT: u64 = 0x60;
const I8042_KBD_IRQ: u32 = 1;
/// How long pause() waits for every vCPU to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where guest RAM comes from.
#[derive(Clone)]
pub enum MemorySource {
    /// Plain anonymous memory per VM.
    Anon,
    /// A memory manager shared by the process's VMs.
    Folio(Arc<MemoryManager>),
}

impl MemorySource {
    /// The backend kind.
    pub fn kind(&self) -> MemBackendKind {
        match self {
            MemorySource::Anon => MemBackendKind::Anon,
            MemorySource::Folio(_) => MemBackendKind::Folio,
        }
    }
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

fn memory_backend(config: &VmConfig, source: &MemorySource) -> Result<GuestRam, VmmError> {
    let layout = layout::ram_regions(config.mem_bytes);
    let mem_err = |e: Box<dyn std::error::Error + Send + Sync>| VmmError::Memory(e);
    Ok(match source {
        MemorySource::Anon => GuestRam {
            backend: Arc::new(AnonBackend::new(&layout).map_err(|e| mem_err(Box::new(e)))?),
            manager: None,
        },
        MemorySource::Folio(mm) => {
            let vm = mm
                .create_vm(&config.name)
                .map_err(|e| mem_err(Box::new(e)))?;
            mm.set_vm_limits(vm, config.limits)
                .map_err(|e| mem_err(Box::new(e)))?;
            let offset = host_offset().map_err(|e| mem_err(e.into()))?;
            let backend = mm
                .backend_with_offset(vm, &layout, offset)
                .map_err(|e| mem_err(Box::new(e)))?;
            GuestRam {
                backend,
                manager: Some((mm.clone(), vm)),
            }
        }
    })
}

/// `FOLIOVM_MEM_HOST_OFFSET=SIZE` (a multiple of 4 KiB below 2 MiB) maps
/// the folio backend's guest RAM that far past a 2 MiB boundary: a
/// diagnostic knob that shows what `foliovm ctl relocate --to-aligned`
/// repairs (a misaligned mapping cannot be PMD-mapped on the host).
fn host_offset() -> Result<u64, String> {
    let Ok(v) = std::env::var("FOLIOVM_MEM_HOST_OFFSET") else {
        return Ok(0);
    };
    let b = crate::config::parse_size(&v).map_err(|e| format!("FOLIOVM_MEM_HOST_OFFSET: {e}"))?;
    if b % 4096 != 0 || b >= 2 << 20 {
        return Err(format!(
            "FOLIOVM_MEM_HOST_OFFSET={v}: must be a multiple of 4K below 2M"
        ));
    }
    Ok(b)
}

/// What the payload needs from the VM.
struct Payload {
    vcpu_state: Vec<(kvm_regs, kvm_sregs)>,
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
        workload: Some((spec, report)),
    })
}

/// Watches one VM's stop signal on the event loop.
struct Control {
    stop: Arc<StopSignal>,
}

impl MutEventSubscriber for Control {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.stop.eventfd().as_raw_fd() {
            let _ = self.stop.eventfd().read();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new_raw(
            self.stop.eventfd().as_raw_fd(),
            EventSet::IN,
        ));
    }
}

/// The i8042's output lines: IRQ 1, and the CPU reset line.
pub(crate) enum I8042Line {
    /// The keyboard interrupt (a KVM irqfd).
    Irq(EventFdTrigger),
    /// Reset: the VM stops on the spot, from the vCPU thread that pulsed
    /// it, which then leaves the guest rather than run on (a Linux guest
    /// whose reset is not seen at once goes on to other reboot methods,
    /// and its last one, a triple fault, would become the stop reason).
    Reset(Arc<StopSignal>),
}

impl devices::Trigger for I8042Line {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        match self {
            I8042Line::Irq(irq) => irq.trigger(),
            I8042Line::Reset(stop) => {
                stop.request(ExitReason::GuestReset);
                Ok(())
            }
        }
    }
}

/// The i8042 as the VM keeps it, to send Ctrl+Alt+Del.
pub(crate) type Keyboard = Arc<Mutex<I8042<I8042Line>>>;

/// An i8042 whose reset stops the VM of `stop`.
pub(crate) fn i8042(stop: Arc<StopSignal>, kbd_irq: EventFdTrigger) -> Keyboard {
    Arc::new(Mutex::new(I8042::new(
        I8042Line::Reset(stop),
        I8042Line::Irq(kbd_irq),
    )))
}

/// An eventfd registered as KVM irqfd for `gsi`.
fn irqfd(vm: &KvmVm, gsi: u32, what: &str) -> Result<EventFdTrigger, VmmError> {
    let irq = EventFdTrigger::new().map_err(host(what))?;
    vm.fd()
        .register_irqfd(&irq.0, gsi)
        .map_err(|source| KvmError::Ioctl {
            op: "KVM_IRQFD",
            source,
        })?;
    Ok(irq)
}

/// Legacy devices for a Linux guest: COM1 and the i8042 (reset line and
/// keyboard). Returns the i8042.
fn legacy_devices(
    vm: &KvmVm,
    pio: &mut Bus,
    stop: &Arc<StopSignal>,
    events: &mut dyn SubscriberOps<Subscriber = Subscriber>,
) -> Result<Keyboard, VmmError> {
    let irq = irqfd(vm, COM1_IRQ, "cannot create serial irq eventfd")?;
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
    let kbd_irq = irqfd(vm, I8042_KBD_IRQ, "cannot create keyboard irq eventfd")?;
    let keyboard = i8042(stop.clone(), kbd_irq);
    pio.insert(keyboard.clone(), I8042_PORT, 5)
        .expect("i8042 ports do not overlap COM1");
    Ok(keyboard)
}

/// The event loop as a VM build sees it: every subscriber added through
/// it is remembered, so that a failed build can take them all off again.
struct Registrations<'a> {
    events: &'a mut dyn SubscriberOps<Subscriber = Subscriber>,
    added: Vec<SubscriberId>,
}

impl<'a> Registrations<'a> {
    fn new(events: &'a mut dyn SubscriberOps<Subscriber = Subscriber>) -> Self {
        Registrations {
            events,
            added: Vec::new(),
        }
    }

    /// Remove every subscriber added through `self`, newest first.
    fn roll_back(self) {
        for id in self.added.into_iter().rev() {
            // Only ids this build added are removed; each exactly once.
            let _ = self.events.remove_subscriber(id);
        }
    }
}

impl SubscriberOps for Registrations<'_> {
    type Subscriber = Subscriber;

    fn add_subscriber(&mut self, subscriber: Subscriber) -> SubscriberId {
        let id = self.events.add_subscriber(subscriber);
        self.added.push(id);
        id
    }

    fn remove_subscriber(&mut self, id: SubscriberId) -> event_manager::Result<Subscriber> {
        self.added.retain(|a| *a != id);
        self.events.remove_subscriber(id)
    }

    fn subscriber_mut(&mut self, id: SubscriberId) -> event_manager::Result<&mut Subscriber> {
        self.events.subscriber_mut(id)
    }

    fn event_ops(&mut self, id: SubscriberId) -> event_manager::Result<EventOps<'_>> {
        self.events.event_ops(id)
    }
}

/// Who a failed request is down to (for the API's status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The request cannot be met as asked (400).
    Request,
    /// Not now: something else holds what it needs (409).
    Conflict,
    /// The host failed it (500).
    Host,
}

/// A failed [`Vm::relocate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelocateFailure {
    /// Whose failure it is.
    pub blame: Blame,
    /// What failed.
    pub message: String,
}

/// Errors changing a VM's run state.
#[derive(Debug, thiserror::Error)]
pub enum VmStateError {
    /// The VM has not been started.
    #[error("VM {0:?} is not running")]
    NotRunning(String),
    /// The VM is already paused (for pause) or not paused (for resume).
    #[error("VM {name:?} is already {state}")]
    Already {
        /// The VM.
        name: String,
        /// `paused` or `running`.
        state: &'static str,
    },
    /// The vCPUs did not park in time.
    #[error("VM {0:?}: vCPUs did not pause within 5 s")]
    PauseTimeout(String),
    /// The VM has no i8042 keyboard (a workload guest).
    #[error("VM {0:?} has no keyboard (only Linux guests have an i8042)")]
    NoKeyboard(String),
    /// The keyboard refused the keys.
    #[error("VM {name:?} cannot take Ctrl+Alt+Del")]
    Keyboard {
        /// The VM.
        name: String,
        /// Why.
        source: devices::legacy::I8042Error,
    },
}

/// A VM's run state, as the API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    /// Built, vCPUs not started.
    Built,
    /// vCPUs running.
    Running,
    /// vCPUs parked.
    Paused,
    /// Stopping or stopped.
    Stopped,
}

/// One VM.
pub struct Vm {
    config: VmConfig,
    ctx: Arc<VcpuContext>,
    threads: Vec<JoinHandle<()>>,
    unstarted: Vec<Vcpu>,
    workload: Option<(WorkloadSpec, Arc<WorkloadReport>)>,
    tsc_khz: Option<u32>,
    /// Declared before `_kvm` and `ram`: its device I/O thread is joined
    /// before the guest RAM it writes is unmapped (teardown step 5).
    virtio: Option<crate::virtio::VirtioDevices>,
    keyboard: Option<Keyboard>,
    started: Option<Instant>,
    /// Holds the KVM VM (memslots, irqchip) open until after the vCPUs.
    _kvm: KvmVm,
    ram: GuestRam,
    /// Set once a stopped VM was reaped while others still run
    /// ([`Vm::reap`]).
    outcome: Option<RunOutcome>,
}

impl Vm {
    /// Build the VM described by `config`: memory, payload, devices, vCPUs
    /// (not yet running). Its control events go on `events`.
    ///
    /// # Errors
    /// Any setup failure, naming what failed.
    pub fn build(
        config: &VmConfig,
        source: &MemorySource,
        quirks: &HostQuirks,
        events: &mut dyn SubscriberOps<Subscriber = Subscriber>,
    ) -> Result<Vm, VmmError> {
        // A build that fails after its devices subscribed takes them off
        // the event loop again (a retried InstanceStart registers anew).
        let mut reg = Registrations::new(events);
        let vm = Self::build_on(config, source, quirks, &mut reg);
        if vm.is_err() {
            reg.roll_back();
        }
        vm
    }

    fn build_on(
        config: &VmConfig,
        source: &MemorySource,
        quirks: &HostQuirks,
        events: &mut dyn SubscriberOps<Subscriber = Subscriber>,
    ) -> Result<Vm, VmmError> {
        let kvm = KvmVm::new()?;
        if let GuestPayload::Workload(s) = &config.payload {
            // Reject a bad spec before allocating memory.
            let spec: WorkloadSpec = s.parse()?;
            WorkloadLayout::plan(&spec, config.vcpus, config.mem_bytes)?;
        }
        let ram = memory_backend(config, source)?;
        let mem = guest_memory(ram.backend.regions())?;
        // SAFETY: `ram` is a field of the returned Vm declared after `kvm`,
        // so it is dropped after the KVM VM, and vCPU threads are joined
        // before either: the mappings outlive every use by KVM.
        unsafe { kvm.set_memory(ram.backend.regions())? };
        let linux = matches!(config.payload, GuestPayload::Linux { .. });
        if linux {
            // The irqchip must exist before any vCPU is created.
            kvm.setup_irqchip()?;
        }
        let mut vcpus = Vec::with_capacity(config.vcpus as usize);
        for i in 0..config.vcpus as usize {
            vcpus.push(Vcpu::new(&kvm, i)?);
        }
        let payload = load_payload(&mem, config, quirks, vcpus[0].sregs()?)?;
        let supported = kvm.supported_cpuid()?;
        for (v, (r, s)) in vcpus.iter().zip(&payload.vcpu_state) {
            v.configure_cpu(&supported, config.vcpus, &quirks.cpuid_masks)?;
            if linux {
                v.set_lint()?;
            }
            v.set_state(r, s)?;
        }
        let stop = Arc::new(StopSignal::new().map_err(host("cannot create stop eventfd"))?);
        let mut pio = Bus::new();
        let keyboard = if linux {
            Some(legacy_devices(&kvm, &mut pio, &stop, events)?)
        } else {
            None
        };
        events.add_subscriber(Arc::new(Mutex::new(Control { stop: stop.clone() })));
        let mut mmio = Bus::new();
        let virtio = if linux {
            Some(crate::virtio::attach(
                &config.virtio,
                &config.name,
                &kvm,
                &mem,
                ram.manager.clone(),
                &mut mmio,
            )?)
        } else {
            None
        };
        let ctx = Arc::new(VcpuContext {
            pio,
            mmio,
            workload: payload.workload.as_ref().map(|(_, r)| r.clone()),
            stop,
            gate: RunGate::default(),
            mem: std::sync::RwLock::new(mem),
        });
        tracing::info!(
            vm = %config.name,
            vcpus = config.vcpus,
            mem_mib = config.mem_bytes >> 20,
            backend = ram.backend.kind(),
            "VM built"
        );
        Ok(Vm {
            config: config.clone(),
            tsc_khz: vcpus[0].tsc_khz(),
            ctx,
            threads: Vec::new(),
            unstarted: vcpus,
            workload: payload.workload,
            virtio,
            keyboard,
            started: None,
            _kvm: kvm,
            ram,
            outcome: None,
        })
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Its configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Its guest RAM now: the configured size, plus what a relocation's
    /// grow added since.
    pub fn ram_bytes(&self) -> u64 {
        self.manager()
            .and_then(|(mm, id)| mm.vm_regions(*id))
            .map_or(self.config.mem_bytes, |r| r.iter().map(|r| r.size).sum())
    }

    /// The signal every thread uses to stop this VM.
    pub fn stop_signal(&self) -> &Arc<StopSignal> {
        &self.ctx.stop
    }

    /// Each drive's id and counters.
    pub fn drive_counters(&self) -> Vec<(String, devices::virtio::block::BlockCounters)> {
        self.virtio
            .as_ref()
            .map_or_else(Vec::new, |v| v.drive_counters())
    }

    /// The balloon, if the VM has one.
    pub fn balloon(&self) -> Option<&devices::virtio::balloon::BalloonHandle> {
        self.virtio.as_ref()?.balloon.as_ref()
    }

    /// The memory manager and this VM's id in it (folio backend).
    pub fn manager(&self) -> Option<&(Arc<MemoryManager>, VmId)> {
        self.ram.manager.as_ref()
    }

    /// Current run state.
    pub fn state(&self) -> VmState {
        if self.ctx.stop.is_stopping() {
            VmState::Stopped
        } else if self.started.is_none() {
            VmState::Built
        } else if self.ctx.gate.is_paused() {
            VmState::Paused
        } else {
            VmState::Running
        }
    }

    /// Start the device I/O thread, then the vCPU threads.
    ///
    /// # Errors
    /// [`VmmError::Host`] if a thread cannot be spawned (the VM is then
    /// asked to stop).
    pub fn start(&mut self) -> Result<(), VmmError> {
        tracing::info!(vm = %self.config.name, "VM starting");
        self.started = Some(Instant::now());
        if let Some(v) = &mut self.virtio {
            if let Err(e) = v.start(self.ctx.stop.clone()) {
                self.ctx.stop.request(ExitReason::Error(format!(
                    "cannot spawn the device I/O thread: {e}"
                )));
                return Err(host("cannot spawn the device I/O thread")(e));
            }
        }
        for v in self.unstarted.drain(..) {
            let ctx = self.ctx.clone();
            let t = std::thread::Builder::new()
                .name(format!("{}-vcpu{}", self.config.name, v.index()))
                .spawn(move || v.run(&ctx));
            match t {
                Ok(t) => self.threads.push(t),
                Err(e) => {
                    self.ctx
                        .stop
                        .request(ExitReason::Error(format!("cannot spawn vCPU thread: {e}")));
                    return Err(host("cannot spawn vCPU thread")(e));
                }
            }
        }
        Ok(())
    }

    fn kick_until(&self, done: impl Fn() -> bool, timeout: Duration) -> bool {
        let start = Instant::now();
        while !done() {
            if start.elapsed() > timeout {
                return false;
            }
            for t in self.threads.iter().filter(|t| !t.is_finished()) {
                let _ = t.kill(SIGRTMIN());
            }
            // Parking vCPUs wake us; re-kick after 1 ms for one that was
            // not yet in KVM_RUN when its signal came.
            let round = Instant::now();
            let live = || self.threads.iter().filter(|t| !t.is_finished()).count();
            self.ctx.gate.wait_parked(live, KICK_INTERVAL);
            // That returns at once while released vCPUs still count as
            // parked (a paused VM being stopped: they have not left the
            // gate yet). Kicks then came back to back, and each vCPU spent
            // its time in the kernel delivering them, never reaching the
            // code that leaves the gate: stopping a paused VM hung.
            if !done() {
                if let Some(rest) = KICK_INTERVAL.checked_sub(round.elapsed()) {
                    std::thread::sleep(rest);
                }
            }
        }
        true
    }

    /// `Ok` if the VM is running (not paused, not stopped).
    fn check_running(&self) -> Result<(), VmStateError> {
        match self.state() {
            VmState::Running => Ok(()),
            VmState::Paused => Err(VmStateError::Already {
                name: self.config.name.clone(),
                state: "paused",
            }),
            _ => Err(VmStateError::NotRunning(self.config.name.clone())),
        }
    }

    /// Park every vCPU; returns once all are parked.
    ///
    /// # Errors
    /// [`VmStateError`] if the VM is not running, already paused, or its
    /// vCPUs do not park within 5 s.
    pub fn pause(&self) -> Result<(), VmStateError> {
        self.check_running()?;
        tracing::info!(vm = %self.config.name, "pausing");
        self.hold_vcpus()
    }

    /// Close the gate and wait until every vCPU thread still running is
    /// parked; the gate is opened again if they do not park within 5 s.
    /// Also for a VM that is stopping: its vCPUs leave rather than park,
    /// which holds them off for good (a relocation's switch of a VM that
    /// stopped meanwhile, [`Vm::relocate`]).
    fn hold_vcpus(&self) -> Result<(), VmStateError> {
        self.ctx.gate.close();
        let live = || self.threads.iter().filter(|t| !t.is_finished()).count();
        if self.kick_until(|| self.ctx.gate.parked() >= live(), PAUSE_TIMEOUT) {
            Ok(())
        } else {
            self.ctx.gate.open();
            Err(VmStateError::PauseTimeout(self.config.name.clone()))
        }
    }

    /// Let parked vCPUs run again.
    ///
    /// # Errors
    /// [`VmStateError`] if the VM is not paused.
    pub fn resume(&self) -> Result<(), VmStateError> {
        match self.state() {
            VmState::Paused => {
                tracing::info!(vm = %self.config.name, "resuming");
                self.ctx.gate.open();
                Ok(())
            }
            VmState::Running => Err(VmStateError::Already {
                name: self.config.name.clone(),
                state: "running",
            }),
            _ => Err(VmStateError::NotRunning(self.config.name.clone())),
        }
    }

    /// Relocate the guest RAM region holding `gpa` to a new host range
    /// while the guest runs ([`mem::relocate`]). The switch pauses the
    /// vCPUs (unless the VM is paused already; those of a VM that stopped
    /// since the relocation began are held off as they leave), swaps the
    /// KVM memslots and the vCPUs' and the virtio devices' view of guest
    /// memory (each device transport locked in turn, so none is
    /// mid-request), and resumes them.
    ///
    /// # Errors
    /// A message naming why: not the folio backend, the VM not running, or
    /// the [`mem::RelocateError`].
    pub fn relocate(
        &self,
        gpa: u64,
        op: mem::RelocateOp,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<mem::RelocateReport, RelocateFailure> {
        let refuse = |message: String| RelocateFailure {
            blame: Blame::Request,
            message,
        };
        let (mm, id) = self.ram.manager.as_ref().ok_or_else(|| {
            refuse("relocation needs the folio memory backend (--mem-backend folio)".into())
        })?;
        let paused = match self.state() {
            VmState::Running => false,
            VmState::Paused => true,
            s => {
                return Err(refuse(format!(
                    "VM {} is {s:?}, not running",
                    self.config.name
                )))
            }
        };
        let mut switch = |sw: &mem::RelocateSwitch| -> Result<(), String> {
            // What the devices and vCPUs address from now on; built first,
            // so that nothing can fail once the new regions are live.
            let now = mm.vm_regions(*id).unwrap_or_default();
            let mut view: Vec<RamRegion> = now
                .into_iter()
                .filter(|r| !sw.old.contains(r) && !sw.new.contains(r))
                .chain(sw.new.iter().copied())
                .collect();
            view.sort_by_key(|r| r.guest_base);
            let m = guest_memory(&view).map_err(|e| e.to_string())?;
            // Not `pause`, which refuses a VM that is stopping: the VM may
            // have stopped on its own since the relocation began (its
            // workload ended, the guest powered off, a signal), and an
            // undo's switch back must still be made then (it failed, and
            // the relocation was reported as not undone).
            if !paused {
                self.hold_vcpus().map_err(|e| e.to_string())?;
            }
            // SAFETY: the memory manager keeps the new ranges mapped while
            // their slots exist (see `KvmVm::switch_memory`).
            let r = unsafe { self._kvm.switch_memory(&sw.old, &sw.new) }
                .map_err(|e| e.to_string())
                .map(|()| {
                    // The devices pin by guest address and then access
                    // through their view: the manager's regions go live
                    // while every device is held off, and the devices get
                    // the new view before any runs again.
                    match &self.virtio {
                        Some(v) => v.switch_memory(&m, || sw.make_live()),
                        None => sw.make_live(),
                    }
                    *self.ctx.mem.write().unwrap_or_else(|p| p.into_inner()) = m;
                });
            if !paused {
                // Opened also for a VM that stopped meanwhile, as its reap does.
                self.ctx.gate.open();
            }
            r
        };
        if let mem::RelocateOp::Grow(size) = op {
            check_grow(&mm.vm_regions(*id).unwrap_or_default(), gpa, size).map_err(refuse)?;
        }
        tracing::info!(vm = %self.config.name, gpa, ?op, "relocating");
        let rep = mm
            .relocate(*id, mem::GuestAddress(gpa), op, &mut switch, progress)
            .map_err(|e| {
                use mem::RelocateError as E;
                if let E::UndoFailed(_) = e {
                    // Its memory is split between two host ranges, and the
                    // memory manager cannot serve it so: the VM stops (the
                    // others of the run go on).
                    tracing::error!(vm = %self.config.name, "relocation: {e}");
                    self.ctx
                        .stop
                        .request(ExitReason::Error(format!("guest memory relocation: {e}")));
                }
                let blame = match e {
                    E::NoSuchVm(_) | E::NoSuchRegion(_) | E::BadRequest(_) => Blame::Request,
                    E::Busy | E::Pinned(_) => Blame::Conflict,
                    _ => Blame::Host,
                };
                RelocateFailure {
                    blame,
                    message: e.to_string(),
                }
            })?;
        tracing::info!(vm = %self.config.name, switch_us = rep.switch_ns / 1000, "relocated");
        Ok(rep)
    }

    /// Press Ctrl+Alt+Del on the VM's keyboard (Firecracker's
    /// `SendCtrlAltDel`); a Linux guest reboots, which ends the VM.
    ///
    /// # Errors
    /// [`VmStateError`] if the VM is not running, has no keyboard, or its
    /// guest has not enabled the keyboard.
    pub fn send_ctrl_alt_del(&self) -> Result<(), VmStateError> {
        self.check_running()?;
        let kbd = self
            .keyboard
            .as_ref()
            .ok_or_else(|| VmStateError::NoKeyboard(self.config.name.clone()))?;
        tracing::info!(vm = %self.config.name, "sending Ctrl+Alt+Del");
        kbd.lock()
            .unwrap_or_else(|p| p.into_inner())
            .send_ctrl_alt_del()
            .map_err(|source| VmStateError::Keyboard {
                name: self.config.name.clone(),
                source,
            })
    }

    /// Stop the vCPUs (the stop reason must already be set, or `fallback`
    /// is used), join them and summarise the run.
    pub fn finish(mut self, fallback: ExitReason) -> RunOutcome {
        match self.outcome.take() {
            Some(o) => o,
            None => self.conclude(fallback),
        }
    }

    /// A VM that stopped while others of the run go on: join its vCPUs,
    /// summarise its run now, and give its guest memory back to the
    /// memory manager (every region discarded: its folios and swap slots
    /// freed), so that the VMs still running can use it. Nothing if the VM
    /// has not stopped or was reaped already.
    ///
    /// A device I/O thread still in a request, or a vCPU thread that does
    /// not leave when kicked, puts the reap off (looked at again the next
    /// time): the shared event loop that reaps does not wait for them, and
    /// the memory they may write stays until they are gone (teardown steps
    /// 1 and 2, module docs).
    pub fn reap(&mut self) {
        if !self.ctx.stop.is_stopping() || self.outcome.is_some() {
            return;
        }
        if let Some(v) = &mut self.virtio {
            if !v.try_join_io() {
                tracing::debug!(vm = %self.config.name, "reap waits for the device I/O thread");
                return;
            }
        }
        // So do vCPUs that do not leave at once when kicked (one blocked
        // writing the guest's console to a full stdout pipe): the shared
        // event loop does not wait for them; they are kicked again next time.
        self.ctx.gate.open();
        if !self.kick_until(|| self.threads.iter().all(|t| t.is_finished()), REAP_KICKS) {
            tracing::debug!(vm = %self.config.name, "reap waits for the vCPU threads");
            return;
        }
        let outcome = self.conclude(ExitReason::unexplained());
        // No device may fault its memory back in once it is given back
        // (an API request): teardown step 3.
        if let Some(v) = &mut self.virtio {
            v.stop();
        }
        if let Some((mm, id)) = &self.ram.manager {
            for r in mm.vm_regions(*id).unwrap_or_default() {
                if let Err(e) = mm.discard(*id, r.guest_base, r.size) {
                    tracing::warn!(vm = %self.config.name, "releasing guest memory: {e}");
                }
            }
            // Nothing is left to protect: its minimum would only keep
            // room in the budget from the VMs still running.
            if let Err(e) = mm.set_vm_limits(*id, mem::VmLimits::default()) {
                tracing::warn!(vm = %self.config.name, "clearing reclaim limits: {e}");
            }
            tracing::info!(vm = %self.config.name, "guest memory released");
        }
        self.outcome = Some(outcome);
    }

    fn conclude(&mut self, fallback: ExitReason) -> RunOutcome {
        let wall = self.started.map(|s| s.elapsed()).unwrap_or_default();
        self.ctx.stop.request(fallback);
        self.ctx.gate.open();
        self.kick_until(
            || self.threads.iter().all(|t| t.is_finished()),
            Duration::from_secs(3600),
        );
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // Teardown step 2 (module docs): vCPUs are gone, now the device
        // I/O thread; it finishes the request it serves, however long.
        if let Some(v) = &mut self.virtio {
            v.join_io();
        }
        let reason = self
            .ctx
            .stop
            .reason()
            .expect("a stop reason was just requested");
        tracing::info!(vm = %self.config.name, %reason, wall_s = wall.as_secs_f64(), "VM stopped");
        if let Some(v) = &self.virtio {
            v.finish();
        }
        // Where guest RAM is now (a relocation may have moved it).
        let regions = match &self.ram.manager {
            Some((mm, id)) => mm.vm_regions(*id).unwrap_or_default(),
            None => self.ram.backend.regions().to_vec(),
        };
        let host_huge_bytes = regions
            .iter()
            .map(|r| mem::smaps::anon_huge_bytes(r.host_addr.raw()).unwrap_or(0))
            .sum();
        let workload = self.workload.take().map(|(spec, report)| {
            let mut r = workload::WorkloadResult::new(
                &spec,
                &self.config,
                self.ram.backend.kind(),
                &report.reports(),
                self.tsc_khz,
                wall,
            );
            r.host_huge_bytes = host_huge_bytes;
            r.swap = self
                .ram
                .stats()
                .map(|(_, v)| crate::metrics::swap_json(&v.swap));
            r
        });
        RunOutcome {
            name: self.config.name.clone(),
            reason,
            workload,
            mem_stats: self.ram.stats(),
        }
    }
}

/// Refuse to grow the RAM region holding `gpa` to `size` bytes across the
/// 32-bit MMIO gap: the grown memslot would shadow the virtio-mmio
/// windows, the workload guest's result page, the IOAPIC and the LAPIC.
fn check_grow(regions: &[RamRegion], gpa: u64, size: u64) -> Result<(), String> {
    let gap = layout::MMIO_GAP_START.raw();
    let Some(r) = regions
        .iter()
        .find(|r| gpa >= r.guest_base.raw() && gpa < r.guest_base.raw() + r.size)
    else {
        // The memory manager names the missing region.
        return Ok(());
    };
    let base = r.guest_base.raw();
    match base < gap && base.saturating_add(size) > gap {
        true => Err(format!(
            "growing the RAM region at {base:#x} to {} MiB would reach into the MMIO gap at \
             {gap:#x}; it can grow to at most {} MiB",
            size >> 20,
            (gap - base) >> 20
        )),
        false => Ok(()),
    }
}

fn load_payload(
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    quirks: &HostQuirks,
    sregs: kvm_sregs,
) -> Result<Payload, VmmError> {
    match &config.payload {
        GuestPayload::Linux {
            kernel,
            initrd,
            cmdline,
        } => load_linux(
            mem,
            config,
            kernel,
            initrd.as_deref(),
            cmdline.as_deref(),
            quirks,
            sregs,
        ),
        GuestPayload::Workload(spec) => load_workload(mem, config, spec, sregs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn growing_ram_into_the_mmio_gap_is_refused() {
        let low = RamRegion {
            guest_base: mem::GuestAddress(0),
            size: 128 << 20,
            host_addr: mem::HostAddr(0x7f00_0000_0000),
        };
        let e = check_grow(&[low], 0, 3584 << 20).unwrap_err();
        assert!(
            e.contains("MMIO gap at 0xd0000000") && e.contains("at most 3328 MiB"),
            "{e}"
        );
        assert!(check_grow(&[low], 0, 3328 << 20).is_ok());
        let high = RamRegion {
            guest_base: mem::GuestAddress(1 << 32),
            ..low
        };
        assert!(check_grow(&[high], 1 << 32, 64 << 30).is_ok());
    }

    /// Subscribes one eventfd.
    struct Watch(EventFd);

    impl MutEventSubscriber for Watch {
        fn process(&mut self, _: Events, _: &mut EventOps) {}
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new_raw(self.0.as_raw_fd(), EventSet::IN))
                .expect("a fresh fd registers");
        }
    }

    fn watch() -> Subscriber {
        Arc::new(Mutex::new(Watch(EventFd::new(libc::EFD_NONBLOCK).unwrap())))
    }

    #[test]
    fn a_failed_build_takes_its_subscribers_off_the_loop() {
        let mut events = crate::vmm::event_manager().unwrap();
        let kept = events.add_subscriber(watch());
        let mut reg = Registrations::new(&mut events);
        let a = reg.add_subscriber(watch());
        let b = reg.add_subscriber(watch());
        let c = reg.add_subscriber(watch());
        // A subscriber the build removed itself is not removed twice.
        reg.remove_subscriber(b).unwrap();
        reg.roll_back();
        for id in [a, b, c] {
            assert!(
                events.subscriber_mut(id).is_err(),
                "{id:?} is still on the loop"
            );
        }
        assert!(
            events.subscriber_mut(kept).is_ok(),
            "others' subscribers stay"
        );
    }
}
