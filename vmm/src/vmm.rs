//! Running VMs: the process-wide parts — the shared memory manager, signal
//! handling and the event loop that all VMs' control events use (each VM's
//! virtio devices have an event loop of their own, on its device I/O
//! thread: [`crate::io_thread`]).

use crate::api::ApiServer;
use crate::arch::{boot, mptable, regs};
use crate::config::{host_mem_bytes, HostLimits, MemBackendKind, MemoryConfig, RunConfig};
use crate::controller::Controller;
use crate::kvm::KvmError;
use crate::kvm::KvmVm;
use crate::stop::ExitReason;
use crate::vm::MemorySource;
use crate::workload;
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use mem::{MemoryManager, MmConfig, MmStats, VmStats};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

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
    /// The API server could not start.
    #[error("{0}")]
    Api(String),
    /// The event loop refused a request from another thread.
    #[error("event loop: {0}")]
    EventLoop(String),
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

impl VmmError {
    /// Whether the request (its configuration, kernel, workload or drives)
    /// is at fault, rather than the host (KVM, memory, threads).
    pub fn is_request_error(&self) -> bool {
        matches!(
            self,
            VmmError::Config(_)
                | VmmError::Boot(_)
                | VmmError::Spec(_)
                | VmmError::Workload(_)
                | VmmError::Virtio(_)
        )
    }
}

pub(crate) fn host(what: &str) -> impl FnOnce(std::io::Error) -> VmmError + '_ {
    move |source| VmmError::Host {
        what: what.to_string(),
        source,
    }
}

/// How one VM's run ended.
#[derive(Debug)]
pub struct RunOutcome {
    /// The VM's name.
    pub name: String,
    /// Why the VM stopped.
    pub reason: ExitReason,
    /// The workload guest's result, for workload runs.
    pub workload: Option<workload::WorkloadResult>,
    /// The memory manager's statistics at the end (folio backend only).
    pub mem_stats: Option<(MmStats, VmStats)>,
}

/// The event-loop subscriber type.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Host limits for validation: host RAM and the vCPU ceiling of KVM and the MP table.
///
/// # Errors
/// If /dev/kvm or /proc/meminfo cannot be read.
pub fn host_limits() -> Result<HostLimits, VmmError> {
    let vm = KvmVm::new()?;
    Ok(HostLimits {
        host_mem_bytes: host_mem_bytes()?,
        max_vcpus: vm.max_vcpus().min(mptable::MAX_VCPUS),
    })
}

/// The memory source for a run: a manager sized to the budget (default:
/// the VMs' total memory) for the folio backend.
///
/// # Errors
/// [`VmmError::Memory`] if the manager cannot be created.
pub fn memory_source(run: &RunConfig) -> Result<MemorySource, VmmError> {
    Ok(match run.memory.backend {
        MemBackendKind::Anon => MemorySource::Anon,
        MemBackendKind::Folio => {
            let budget = run
                .memory
                .budget
                .unwrap_or(run.total_mem_bytes())
                .next_multiple_of(2 << 20);
            let mut config = MmConfig::with_budget(budget);
            config.swap = run.memory.swap.clone();
            config.handler_threads = handler_threads(run);
            let mm = MemoryManager::new(config).map_err(|e| VmmError::Memory(Box::new(e)))?;
            // Once the swap file is made: not for one that is refused.
            if let Some(w) = overcommit_warning(budget, run.total_mem_bytes(), &run.memory.swap) {
                tracing::warn!("{w}");
            }
            if let Some(w) = swap_file_warning(&mm.stats().swap_device) {
                tracing::warn!("{w}");
            }
            MemorySource::Folio(mm)
        }
    })
}

/// Why guests of `guests` bytes in all may stall for good under `budget`
/// and `swap`, if they may.
fn overcommit_warning(budget: u64, guests: u64, swap: &Option<mem::SwapConfig>) -> Option<String> {
    let mib = |b: u64| b >> 20;
    match swap {
        None if budget < guests => Some(format!(
            "the memory budget is below the guests' memory and there is no swap file \
             ({} MiB budget, {} MiB of guest memory): a guest that touches more than the \
             budget stalls until memory is freed (give --swap-dir or --swap-file with \
             --swap-size)",
            mib(budget),
            mib(guests)
        )),
        Some(s) if budget.saturating_add(s.size_bytes) < guests => Some(format!(
            "the memory budget and the swap file together are below the guests' memory \
             ({} MiB budget, {} MiB swap, {} MiB of guest memory): guests that touch all \
             of it stall once the swap file is full (give a larger --swap-size)",
            mib(budget),
            mib(s.size_bytes),
            mib(guests)
        )),
        _ => None,
    }
}

/// Why the swap file may not give the host the memory it swaps out, if
/// it may not.
fn swap_file_warning(d: &mem::SwapDeviceStats) -> Option<String> {
    if d.total_bytes == 0 {
        return None;
    }
    if d.in_memory {
        return Some(
            "the swap file is on a file system kept in memory (tmpfs or ramfs): guest \
             memory swapped out to it still takes host RAM, so swapping frees none \
             (give a --swap-dir or --swap-file on a disk)"
                .into(),
        );
    }
    (!d.direct_io).then(|| {
        "the swap file's file system does not take O_DIRECT: swap I/O goes through the \
         host page cache, which keeps copies of swapped-out pages beyond the memory \
         budget until the host reclaims them"
            .into()
    })
}

/// Fault handler threads for a run: one per vCPU of all its VMs, so that
/// every vCPU can have its swap-in read in flight at once (a handler blocks
/// on the read it serves), and one per VM for the VMM's own accesses to
/// its guest memory (device emulation, on the VM's device I/O thread: one
/// VM's device waiting for a swap-in does not hold up another VM's); at
/// least two. Two handlers for any number of vCPUs had vCPUs queue behind
/// each other's disk reads.
fn handler_threads(run: &RunConfig) -> usize {
    let vcpus: usize = run.vms.iter().map(|v| usize::from(v.vcpus)).sum();
    (vcpus + run.vms.len()).max(2)
}

/// Signal number of the last SIGINT/SIGTERM, and the eventfd its handler pokes.
static SIGNAL_NUM: AtomicI32 = AtomicI32::new(0);
static SIGNAL_FD: AtomicI32 = AtomicI32::new(-1);
/// The eventfd behind `SIGNAL_FD`: made once and never closed, so the raw
/// fd the handler writes to can never name another file. (One per `serve`,
/// closed when it returned, left `SIGNAL_FD` naming a closed fd on
/// `serve`'s error paths, and a handler that had loaded it just before the
/// reset wrote 8 bytes into whatever file reused the number.) Each `serve`
/// watches a duplicate of it.
static SIGNAL_EVT: std::sync::OnceLock<EventFd> = std::sync::OnceLock::new();

extern "C" fn on_terminate(num: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    SIGNAL_NUM.store(num, Ordering::SeqCst);
    let fd = SIGNAL_FD.load(Ordering::SeqCst);
    if fd < 0 {
        // No `serve` loop listens (it ended and the VMs are being torn
        // down, or it failed to start): the signal does what it would
        // without foliovm, instead of vanishing. A second Ctrl-C gets out
        // of a teardown that hangs.
        // SAFETY: signal(2) and raise(3) are async-signal-safe. The signal
        // is blocked while its handler runs, so it is delivered, with the
        // default action, when this returns.
        unsafe {
            libc::signal(num, libc::SIG_DFL);
            libc::raise(num);
        }
        return;
    }
    let one: u64 = 1;
    // SAFETY: write(2) is async-signal-safe; `one` is a valid 8-byte
    // buffer, and fd is `SIGNAL_EVT`'s, which is never closed.
    unsafe { libc::write(fd, std::ptr::addr_of!(one).cast(), 8) };
}

/// Marks the end of a `serve` loop on every path out of it: from then on
/// SIGINT and SIGTERM have their default action ([`on_terminate`]).
struct SignalsUnwatched;

impl Drop for SignalsUnwatched {
    fn drop(&mut self) {
        SIGNAL_FD.store(-1, Ordering::SeqCst);
    }
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The `SIGBUS` action installed before ours (the default, or the memory
/// manager's faulter handler), or the errno with which installing failed.
/// Set once, before our handler can run.
static SIGBUS_PREVIOUS: std::sync::OnceLock<Result<libc::sigaction, i32>> =
    std::sync::OnceLock::new();

/// A memory error KVM raises on a vCPU in `KVM_RUN` (the guest touched a
/// page whose data is lost) stops that VM
/// ([`crate::kvm::vcpu::take_guest_memory_error`]); without this the
/// default action killed the process and every VM in it. Any other
/// `SIGBUS` goes to the action installed before ours.
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to SA_SIGINFO handlers;
    // si_addr is the address of the error for SIGBUS.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    if crate::kvm::vcpu::take_guest_memory_error(code, addr) {
        return;
    }
    match SIGBUS_PREVIOUS.get() {
        // SAFETY: called from this `SIGBUS` handler (SA_SIGINFO) with what
        // it was given.
        Some(Ok(prev)) => unsafe { mem::sys::sigbus::chain(prev, sig, info, ctx) },
        // Not read (the handler is installed only once it is): default.
        // SAFETY: as above; an all-default action.
        _ => unsafe { mem::sys::sigbus::chain(&std::mem::zeroed(), sig, info, ctx) },
    }
}

/// Install [`on_sigbus`] once per process.
fn install_sigbus_handler() -> Result<(), VmmError> {
    let got = SIGBUS_PREVIOUS.get_or_init(|| {
        // SAFETY: an all-zero `sigaction` is a valid value.
        let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: a null new action only reads the current one into
        // `previous`, a live `sigaction`.
        if unsafe { libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut previous) } != 0 {
            return Err(std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EINVAL));
        }
        Ok(previous)
    });
    if let Err(errno) = got {
        return Err(VmmError::Host {
            what: "cannot read the SIGBUS action".into(),
            source: std::io::Error::from_raw_os_error(*errno),
        });
    }
    static INSTALLED: std::sync::OnceLock<i32> = std::sync::OnceLock::new();
    let rc = *INSTALLED.get_or_init(|| {
        // SAFETY: as above; `previous` is published (SIGBUS_PREVIOUS)
        // before the handler can run.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = on_sigbus as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        // SAFETY: `act` is a live `sigaction` and the handler has the
        // SA_SIGINFO signature.
        match unsafe { libc::sigaction(libc::SIGBUS, &act, std::ptr::null_mut()) } {
            0 => 0,
            _ => std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EINVAL),
        }
    });
    match rc {
        0 => Ok(()),
        errno => Err(VmmError::Host {
            what: "cannot install the SIGBUS handler".into(),
            source: std::io::Error::from_raw_os_error(errno),
        }),
    }
}

/// Turns SIGINT/SIGTERM into a stop request for every VM and the process.
struct SignalWatch {
    evt: EventFd,
    controller: Arc<Controller>,
}

impl MutEventSubscriber for SignalWatch {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        let sig = SIGNAL_NUM.load(Ordering::SeqCst);
        tracing::info!(signal = sig, "stopping every VM");
        self.controller.request_exit(ExitReason::Interrupted(sig));
    }

    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new_raw(self.evt.as_raw_fd(), EventSet::IN));
    }
}

/// Install the SIGINT/SIGTERM handlers, the vCPU kick handler and the
/// guest memory error handler, and return the eventfd the first poke.
fn install_signal_handlers() -> Result<EventFd, VmmError> {
    let evt = match SIGNAL_EVT.get() {
        Some(e) => e,
        None => {
            let e =
                EventFd::new(libc::EFD_NONBLOCK).map_err(host("cannot create signal eventfd"))?;
            SIGNAL_EVT.get_or_init(|| e)
        }
    };
    // A poke that raced with the end of an earlier `serve` is not for us.
    let _ = evt.read();
    let watched = evt
        .try_clone()
        .map_err(host("cannot duplicate signal eventfd"))?;
    SIGNAL_FD.store(evt.as_raw_fd(), Ordering::SeqCst);
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
    install_sigbus_handler()?;
    Ok(watched)
}

/// A new event manager.
///
/// # Errors
/// [`VmmError::Host`] if epoll cannot be created.
pub fn event_manager() -> Result<EventManager<Subscriber>, VmmError> {
    EventManager::<Subscriber>::new().map_err(|e| VmmError::Host {
        what: format!("cannot create event manager: {e}"),
        source: std::io::Error::other(e.to_string()),
    })
}

/// What `serve` runs.
pub struct ServeOptions {
    /// VMs to start at once (from flags or a config file); `None` waits for
    /// the API's `InstanceStart`.
    pub run: Option<RunConfig>,
    /// Memory settings (for API-started VMs too).
    pub memory: MemoryConfig,
    /// A memory source to use instead of creating one (benchmarks).
    pub source: Option<MemorySource>,
    /// Serve the API on this Unix socket.
    pub api_sock: Option<PathBuf>,
}

/// Run VMs until all have stopped (or a signal), serving the API if asked.
///
/// # Errors
/// Setup failures; a guest that fails at run time is an `Ok` outcome whose
/// reason has a non-zero exit code.
pub fn serve(opts: ServeOptions) -> Result<Served, VmmError> {
    let limits = host_limits()?;
    let mut events = event_manager()?;
    let controller = Arc::new(Controller::new(opts.memory.clone(), limits, &events));
    if let Some(source) = opts.source {
        controller.set_memory_source(source);
    }
    // Before the handlers: an error installing one leaves none watched.
    let unwatched = SignalsUnwatched;
    let signal = install_signal_handlers()?;
    events.add_subscriber(Arc::new(Mutex::new(SignalWatch {
        evt: signal,
        controller: controller.clone(),
    })));
    // VMs given up front are running before the socket appears.
    let started = match &opts.run {
        Some(run) => controller.start_local(run, &mut events),
        None => Ok(()),
    };
    let api = started.and_then(|()| match &opts.api_sock {
        Some(p) => ApiServer::spawn(p, controller.clone())
            .map(Some)
            .map_err(|e| VmmError::Api(e.to_string())),
        None => Ok(None),
    });
    let api = match api {
        Ok(api) => api,
        Err(e) => {
            controller.request_exit(ExitReason::Error(e.to_string()));
            controller.finish();
            return Err(e);
        }
    };
    while !controller.should_exit() {
        if let Err(e) = events.run_with_timeout(200) {
            controller.request_exit(ExitReason::Error(format!("event loop failed: {e}")));
        }
        // A VM that stopped while others run gives its memory back now.
        if !controller.should_exit() {
            controller.reap_stopped();
        }
    }
    if let Some(api) = api {
        api.shut_down(|| {
            let _ = events.run_with_timeout(20);
        });
    }
    drop(unwatched);
    Ok(Served {
        outcomes: controller.finish(),
        exit: controller.exit_reason(),
    })
}

/// How [`serve`] ended.
#[derive(Debug)]
pub struct Served {
    /// Each VM's outcome (none if no VM was started).
    pub outcomes: Vec<RunOutcome>,
    /// Why the process was asked to exit (a signal, an error), if it was;
    /// `None` when it ended because every VM stopped.
    pub exit: Option<ExitReason>,
}

/// Run every VM of `run` until all have stopped, on memory from `source`.
///
/// # Errors
/// As [`serve`].
pub fn run_all(run: &RunConfig, source: &MemorySource) -> Result<Vec<RunOutcome>, VmmError> {
    serve(ServeOptions {
        run: Some(run.clone()),
        memory: run.memory.clone(),
        source: Some(source.clone()),
        api_sock: None,
    })
    .map(|s| s.outcomes)
}

/// Build and run the VMs of `run` on memory of their own.
///
/// # Errors
/// As [`serve`].
pub fn run(run: &RunConfig) -> Result<Vec<RunOutcome>, VmmError> {
    serve(ServeOptions {
        run: Some(run.clone()),
        memory: run.memory.clone(),
        source: None,
        api_sock: None,
    })
    .map(|s| s.outcomes)
}

impl From<event_manager::Error> for VmmError {
    fn from(e: event_manager::Error) -> Self {
        VmmError::EventLoop(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigFile;
    use std::path::Path;

    #[test]
    fn the_request_is_blamed_for_its_own_errors_only() {
        let bad_kernel = VmmError::Boot(boot::BootError::NotAKernel { path: "/k".into() });
        assert!(bad_kernel.is_request_error());
        let host = VmmError::Host {
            what: "eventfd".into(),
            source: std::io::Error::from_raw_os_error(libc::EMFILE),
        };
        assert!(!host.is_request_error());
        assert!(!VmmError::Memory("no memory".into()).is_request_error());
    }

    #[test]
    fn overcommit_that_can_stall_for_good_is_warned_of() {
        const MIB: u64 = 1 << 20;
        let swap = |mib| {
            Some(mem::SwapConfig {
                target: mem::SwapTarget::Dir("/tmp".into()),
                size_bytes: mib * MIB,
            })
        };
        assert_eq!(overcommit_warning(64 * MIB, 64 * MIB, &None), None);
        let w = overcommit_warning(32 * MIB, 64 * MIB, &None).unwrap();
        assert!(
            w.contains("there is no swap file (32 MiB budget, 64 MiB"),
            "{w}"
        );
        assert_eq!(overcommit_warning(32 * MIB, 64 * MIB, &swap(32)), None);
        let w = overcommit_warning(32 * MIB, 64 * MIB, &swap(16)).unwrap();
        assert!(w.contains("(32 MiB budget, 16 MiB swap, 64 MiB"), "{w}");
    }

    #[test]
    fn a_swap_file_that_frees_no_host_memory_is_warned_of() {
        let dev = |in_memory, direct_io| mem::SwapDeviceStats {
            total_bytes: 64 << 20,
            in_memory,
            direct_io,
            ..Default::default()
        };
        assert_eq!(swap_file_warning(&dev(false, true)), None);
        assert_eq!(swap_file_warning(&mem::SwapDeviceStats::default()), None);
        let w = swap_file_warning(&dev(true, false)).unwrap();
        assert!(w.contains("kept in memory (tmpfs or ramfs)"), "{w}");
        let w = swap_file_warning(&dev(false, false)).unwrap();
        assert!(w.contains("does not take O_DIRECT"), "{w}");
    }

    fn run_of(vcpus: &[u32]) -> RunConfig {
        let vms: Vec<String> = vcpus
            .iter()
            .map(|n| {
                format!(
                    r#"{{"machine-config": {{"vcpu_count": {n}, "mem_size_mib": 64}},
                        "foliovm": {{"workload": "seq:1M"}}}}"#
                )
            })
            .collect();
        let text = format!(r#"{{"vms": [{}]}}"#, vms.join(","));
        ConfigFile::parse(&text, Path::new("t.json")).unwrap().0
    }

    /// A guest page whose data is lost (a swap read failed, so the memory
    /// manager poisoned it) makes KVM raise `SIGBUS` (`BUS_MCEERR_AR`) on
    /// the vCPU that touches it. Without a handler that signal killed the
    /// whole process: every VM of the run, no result lines, no exit status
    /// but the signal's. It must stop that VM alone, with a reason.
    #[test]
    fn a_lost_guest_page_stops_its_vm_not_the_process() {
        if !crate::kvm_usable() {
            return;
        }
        // "a" touches twice what the budget leaves it, so its second pass
        // swaps in; "b" keeps all of its memory (its minimum), so it never
        // reads the swap file and must finish cleanly.
        let text = r#"{"vms": [
            {"name": "a", "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
             "foliovm": {"workload": "seq:32M,passes=3"}},
            {"name": "b", "machine-config": {"vcpu_count": 1, "mem_size_mib": 8},
             "foliovm": {"workload": "seq:4M,passes=400", "mem_min": "8M"}}
        ]}"#;
        let run = ConfigFile::parse(text, Path::new("t.json")).unwrap().0;
        // The first reads bring back the guest's code and page tables; a
        // later one is mostly a data page, but which pages were swapped
        // out varies. A lost code page or page table is a triple fault (the
        // guest's page walk fails): that run does not count, try again.
        for attempt in 1..=5 {
            let mut config = MmConfig::with_budget(24 << 20);
            config.swap = Some(mem::SwapConfig {
                target: mem::SwapTarget::Dir(std::env::temp_dir()),
                size_bytes: 64 << 20,
            });
            let mm = MemoryManager::new(config).unwrap();
            mm.inject_swap_faults(vec![mem::FaultPlan {
                op: mem::IoOp::Read,
                fault: mem::InjectedFault::Eio,
                skip: 8,
                count: 1,
            }])
            .unwrap();
            let out = run_all(&run, &MemorySource::Folio(mm)).unwrap();
            let by_name = |n: &str| out.iter().find(|o| o.name == n).unwrap();
            let b = by_name("b");
            assert_eq!(b.reason, ExitReason::WorkloadDone);
            assert!(b.workload.as_ref().unwrap().ok(), "{:?}", b.workload);
            let a = by_name("a");
            let why = a.reason.to_string();
            if matches!(a.reason, ExitReason::TripleFault { .. }) && attempt < 5 {
                eprintln!("attempt {attempt}: {why}");
                continue;
            }
            assert!(
                matches!(
                    a.reason,
                    ExitReason::MemoryError {
                        vcpu: 0,
                        gpa: Some(_),
                        ..
                    }
                ) && why.contains("memory error on vCPU 0 at guest address 0x"),
                "{why}"
            );
            assert_eq!(a.reason.exit_code(), 1);
            return;
        }
    }

    /// Once no `serve` loop listens, SIGINT terminates the process (it
    /// vanished before: a Ctrl-C during a teardown that hung, or between
    /// `bench first-touch`'s in-process runs, did nothing). Run in a child
    /// process: this test's binary again, for this test alone.
    #[test]
    fn sigint_after_serve_ended_terminates_the_process() {
        const CHILD: &str = "FOLIOVM_TEST_SIGINT_CHILD";
        if std::env::var_os(CHILD).is_some() {
            let _watched = install_signal_handlers().unwrap();
            drop(SignalsUnwatched);
            // SAFETY: raise(3) on this thread; the handler is ours.
            unsafe { libc::raise(libc::SIGINT) };
            std::thread::sleep(std::time::Duration::from_millis(200));
            eprintln!("the child survived SIGINT");
            std::process::exit(3);
        }
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "vmm::tests::sigint_after_serve_ended_terminates_the_process",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGINT), "{status:?}");
    }

    #[test]
    fn every_vcpu_gets_a_fault_handler_and_every_vm_one_more_for_its_devices() {
        assert_eq!(handler_threads(&run_of(&[1])), 2);
        assert_eq!(handler_threads(&run_of(&[2, 3])), 7);
        assert_eq!(handler_threads(&run_of(&[4, 4, 4, 4])), 20);
    }

    /// A VM that stops while a relocation of its memory is in flight (its
    /// workload ends, a signal, the guest powers off) must not turn the
    /// relocation's undo into a failure: the undo's memslot switch holds
    /// the vCPUs off as the first switch did, and those of a stopping VM
    /// are held off for good once they have left. Here a relocation fails
    /// after its switch (an injected failure before its commit) and the VM
    /// is stopped in between (from the progress callback, which runs after
    /// the switch): the undo must bring its memory back whole, and the reap
    /// give all of it back to the memory manager.
    #[test]
    fn a_relocation_undone_after_its_vm_stopped_keeps_its_memory_whole() {
        if !crate::kvm_usable() {
            return;
        }
        let _watched = install_signal_handlers().unwrap();
        let _unwatched = SignalsUnwatched;
        let text = r#"{"vms": [{"name": "r", "machine-config": {"vcpu_count": 1, "mem_size_mib": 24},
                       "foliovm": {"workload": "seq:4M,passes=100000000"}}]}"#;
        let run = ConfigFile::parse(text, Path::new("t.json")).unwrap().0;
        let mm = MemoryManager::new(MmConfig::with_budget(24 << 20)).unwrap();
        let mut events = event_manager().unwrap();
        let mut vm = crate::vm::Vm::build(
            &run.vms[0],
            &MemorySource::Folio(mm.clone()),
            &crate::pvm::HostQuirks::detect(),
            &mut events,
        )
        .unwrap();
        vm.start().unwrap();
        let id = vm.manager().unwrap().1;
        let start = std::time::Instant::now();
        while mm.vm_stats(id).unwrap().resident_bytes() < 4 << 20 {
            assert!(start.elapsed() < std::time::Duration::from_secs(30));
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        mm.inject_faults(vec![mem::InjectPlan {
            point: mem::FaultPoint::RelocateCommit,
            skip: 0,
            count: 1,
        }]);
        let stop = vm.stop_signal().clone();
        let e = vm
            .relocate(0, mem::RelocateOp::ToAligned, &|_, _| {
                stop.request(ExitReason::Interrupted(libc::SIGTERM))
            })
            .unwrap_err();
        assert!(
            e.message.contains("injected failure at RelocateCommit")
                && !e.message.contains("could not be undone"),
            "{e:?}"
        );
        assert_eq!(
            stop.reason(),
            Some(ExitReason::Interrupted(libc::SIGTERM)),
            "the stop reason is the one given"
        );
        vm.reap();
        let regions = mm.vm_regions(id).unwrap();
        assert_eq!(
            regions.iter().map(|r| r.size).sum::<u64>(),
            24 << 20,
            "{regions:?}"
        );
        let v = mm.vm_stats(id).unwrap();
        assert_eq!(
            (v.resident_bytes(), v.swap.swapped_pages),
            (0, 0),
            "the reap gave back its memory"
        );
        let out = vm.finish(ExitReason::unexplained());
        assert_eq!(out.reason, ExitReason::Interrupted(libc::SIGTERM));
        assert!(mm.wait_idle(std::time::Duration::from_secs(30)));
        mm.check_accounting().unwrap();
        let s = mm.stats();
        assert_eq!(s.free_bytes, s.budget_bytes, "every folio is back");
    }

    /// `PATCH /vms/{name}/balloon` on a VM that has stopped (and was
    /// reaped: its devices reset, its memory given back) is refused, as
    /// pause and the other requests on its memory are; it answered 204 and
    /// recorded a target no guest would ever see. `GET` still answers.
    #[test]
    fn a_stopped_vms_balloon_target_is_refused() {
        use crate::api::routes::ApiBackend;
        if !crate::kvm_usable() {
            return;
        }
        let kernel = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-images/out/vmlinux");
        if !kernel.exists() {
            eprintln!("skipping: {} is missing", kernel.display());
            return;
        }
        let _watched = install_signal_handlers().unwrap();
        let _unwatched = SignalsUnwatched;
        let text = format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}"}},
                "machine-config": {{"vcpu_count": 1, "mem_size_mib": 64}},
                "balloon": {{"amount_mib": 0, "deflate_on_oom": false}}}}"#,
            kernel.display()
        );
        let run = ConfigFile::parse(&text, Path::new("t.json")).unwrap().0;
        let mut events = event_manager().unwrap();
        let c = Controller::new(run.memory.clone(), host_limits().unwrap(), &events);
        c.start_local(&run, &mut events).unwrap();
        c.set_balloon(Some("vm0"), 4).unwrap();
        c.request_exit(ExitReason::Interrupted(libc::SIGTERM));
        let start = std::time::Instant::now();
        while c.vm_info("vm0").unwrap()["memory"]["resident_bytes"] != 0 {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(10),
                "never reaped"
            );
            c.reap_stopped();
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(c.vm_info("vm0").unwrap()["state"], "Stopped");
        for vm in [Some("vm0"), None] {
            let e = c.set_balloon(vm, 8).unwrap_err();
            assert_eq!(e.status, 400, "{e:?}");
            assert!(e.message.contains("is not running"), "{e:?}");
        }
        let b = c.balloon(Some("vm0"), false).unwrap();
        assert_eq!(b["amount_mib"], 4, "{b}");
        assert_eq!(c.finish().len(), 1);
    }
}
