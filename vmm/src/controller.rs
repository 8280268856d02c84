//! The process's VMs and what the API can do to them.
//!
//! Lock order: `pending` → `source` → `vms`. The event loop thread takes
//! `vms` only briefly to see whether every VM has stopped.

use crate::api::routes::{
    ApiBackend, ApiError, BootSourceBody, InstanceInfo, LimitsBody, MachineConfigBody, RelocateBody,
};
use crate::config::{GuestPayload, HostLimits, MemoryConfig, RunConfig, VmConfig};
use crate::metrics::{MemSample, VmSample};
use crate::operations::{Job, Operations};
use crate::pvm::HostQuirks;
use crate::stop::ExitReason;
use crate::virtio::{BalloonSection, DriveSection, VirtioConfig};
use crate::vm::{MemorySource, Vm, VmState};
use crate::vmm::{memory_source, RunOutcome, Subscriber, VmmError};
use event_manager::{EventManager, RemoteEndpoint};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The VM the Firecracker-style API configures before `InstanceStart`.
#[derive(Debug, Clone)]
struct Pending {
    boot_source: Option<BootSourceBody>,
    machine: MachineConfigBody,
    /// Drives and balloon (`PUT /drives/{id}`, `PUT /balloon`).
    virtio: VirtioConfig,
}

/// The process's VMs.
pub struct Controller {
    memory: MemoryConfig,
    limits: HostLimits,
    quirks: HostQuirks,
    endpoint: RemoteEndpoint<Subscriber>,
    pending: Mutex<Pending>,
    source: Mutex<Option<MemorySource>>,
    vms: Mutex<Vec<Vm>>,
    /// Set once an exit was requested; long jobs look at it between steps.
    exit: Arc<AtomicBool>,
    /// Why the process exits, once it was asked to: VMs started after
    /// that (an InstanceStart in flight) stop for the same reason.
    exit_reason: Mutex<Option<ExitReason>>,
    ops: Operations,
}

/// Reclaim runs in steps of this many bytes, reporting progress after each.
const RECLAIM_STEP: u64 = 4 << 20;

fn state_name(s: VmState) -> &'static str {
    match s {
        VmState::Built => "Not started",
        VmState::Running => "Running",
        VmState::Paused => "Paused",
        VmState::Stopped => "Stopped",
    }
}

impl Controller {
    /// A controller with no VMs whose API-built VMs use `events`' loop.
    pub fn new(
        memory: MemoryConfig,
        limits: HostLimits,
        events: &EventManager<Subscriber>,
    ) -> Self {
        Controller {
            memory,
            limits,
            quirks: HostQuirks::detect(),
            endpoint: events.remote_endpoint(),
            pending: Mutex::new(Pending {
                boot_source: None,
                virtio: VirtioConfig::default(),
                // Firecracker's defaults.
                machine: MachineConfigBody {
                    vcpu_count: 1,
                    mem_size_mib: 128,
                    smt: false,
                    track_dirty_pages: false,
                    cpu_template: None,
                    huge_pages: None,
                },
            }),
            source: Mutex::new(None),
            vms: Mutex::new(Vec::new()),
            exit: Arc::new(AtomicBool::new(false)),
            exit_reason: Mutex::new(None),
            ops: Operations::default(),
        }
    }

    /// The memory source of the run: the one set or made before, or a new
    /// one sized for `run` (then also `true`).
    fn memory_source_for(&self, run: &RunConfig) -> Result<(MemorySource, bool), VmmError> {
        let mut src = self.source.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = src.as_ref() {
            return Ok((s.clone(), false));
        }
        let run = RunConfig {
            vms: run.vms.clone(),
            memory: self.memory.clone(),
        };
        let s = memory_source(&run)?;
        *src = Some(s.clone());
        Ok((s, true))
    }

    /// Use `source` for every VM (benchmarks share one manager across runs).
    pub fn set_memory_source(&self, source: MemorySource) {
        *self.source.lock().unwrap_or_else(|p| p.into_inner()) = Some(source);
    }

    /// Build and start the VMs of `run` on the event loop thread itself.
    ///
    /// # Errors
    /// Validation or setup failures; VMs built before the failure are stopped.
    pub fn start_local(
        &self,
        run: &RunConfig,
        events: &mut EventManager<Subscriber>,
    ) -> Result<(), VmmError> {
        run.validate(&self.limits)?;
        let (source, _) = self.memory_source_for(run)?;
        let mut built = Vec::with_capacity(run.vms.len());
        for config in &run.vms {
            built.push(Vm::build(config, &source, &self.quirks, events)?);
        }
        self.start_built(built)
    }

    fn start_built(&self, mut built: Vec<Vm>) -> Result<(), VmmError> {
        let mut result = Ok(());
        for vm in &mut built {
            if let Err(e) = vm.start() {
                result = Err(e);
                break;
            }
        }
        let mut vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
        // Under the VM list's lock, as `request_exit` walks it: a start
        // that raced an exit request stops for its reason.
        if let Some(r) = self
            .exit_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            built
                .iter()
                .for_each(|v| v.stop_signal().request(r.clone()));
        }
        vms.extend(built);
        result
    }

    /// Ask every VM to stop and the process to exit (SIGINT/SIGTERM).
    pub fn request_exit(&self, reason: ExitReason) {
        let vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
        self.exit_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(reason.clone());
        self.exit.store(true, Ordering::SeqCst);
        for vm in vms.iter() {
            vm.stop_signal().request(reason.clone());
        }
    }

    /// Why an exit was requested, if one was ([`Controller::request_exit`]).
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.exit_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The event loop should end: an exit was requested, or VMs ran and all
    /// of them have stopped.
    ///
    /// The event loop asks this after every round: while an API request
    /// holds the VM list (a synchronous relocation holds it throughout),
    /// the VMs are looked at next round rather than the loop, which serves
    /// the API, signals and VM control, waiting for the request.
    pub fn should_exit(&self) -> bool {
        if self.exit.load(Ordering::SeqCst) {
            return true;
        }
        let vms = match self.vms.try_lock() {
            Ok(v) => v,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return false,
        };
        !vms.is_empty() && vms.iter().all(|v| v.stop_signal().is_stopping())
    }

    /// Reap the VMs that stopped while others run: their vCPUs joined,
    /// their guest memory given back ([`Vm::reap`]).
    /// Skipped this round if an API request holds the VM list (see
    /// [`Controller::should_exit`]).
    pub fn reap_stopped(&self) {
        let mut vms = match self.vms.try_lock() {
            Ok(v) => v,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return,
        };
        vms.iter_mut().for_each(Vm::reap);
    }

    /// Stop, join and summarise every VM.
    pub fn finish(&self) -> Vec<RunOutcome> {
        let vms = std::mem::take(&mut *self.vms.lock().unwrap_or_else(|p| p.into_inner()));
        vms.into_iter()
            .map(|v| v.finish(ExitReason::unexplained()))
            .collect()
    }

    fn sample(&self) -> MemSample {
        let vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
        let host = vms
            .iter()
            .find_map(|v| v.manager().map(|(mm, _)| mm.stats()));
        MemSample {
            host,
            vms: vms
                .iter()
                .map(|v| VmSample {
                    name: v.name().to_string(),
                    state: state_name(v.state()),
                    vcpus: v.config().vcpus,
                    mem_bytes: v.ram_bytes(),
                    stats: v.manager().and_then(|(mm, id)| mm.vm_stats(*id)),
                    drives: v.drive_counters(),
                })
                .collect(),
        }
    }

    fn with_vm<T>(
        &self,
        name: Option<&str>,
        f: impl FnOnce(&Vm) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
        let vm = match name {
            Some(n) => vms.iter().find(|v| v.name() == n),
            None if vms.len() > 1 => {
                return Err(ApiError::bad(format!(
                    "{} VMs run here; name one with PATCH /vms/{{name}}",
                    vms.len()
                )))
            }
            None => vms.first(),
        };
        match vm {
            Some(v) => f(v),
            None => Err(match name {
                Some(n) => ApiError::not_found(format!("no VM named {n:?}")),
                None => ApiError::bad("the microVM has not been started"),
            }),
        }
    }

    /// [`Controller::with_vm`] for a request that has no per-VM path
    /// (`what`, e.g. `PATCH /balloon`): refused when several VMs run.
    fn with_only_vm<T>(
        &self,
        what: &str,
        per_vm: &str,
        f: impl FnOnce(&Vm) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let n = self.vms.lock().unwrap_or_else(|p| p.into_inner()).len();
        if n > 1 {
            return Err(ApiError::bad(format!(
                "{what} acts on the VM of a run of one VM, and {n} VMs run here; name one with {per_vm}"
            )));
        }
        self.with_vm(None, f)
    }

    /// [`Controller::with_vm`] for the VM named `vm`, or without a name
    /// [`Controller::with_only_vm`].
    fn with_named_or_only_vm<T>(
        &self,
        vm: Option<&str>,
        what: &str,
        per_vm: &str,
        f: impl FnOnce(&Vm) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        match vm {
            Some(_) => self.with_vm(vm, f),
            None => self.with_only_vm(what, per_vm, f),
        }
    }

    /// [`Controller::with_vm`] for a request on the VM's memory: refused
    /// once the VM has stopped (its memory is released when it is reaped).
    fn with_live_vm<T>(
        &self,
        name: &str,
        f: impl FnOnce(&Vm) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        self.with_vm(Some(name), |v| {
            if v.state() == VmState::Stopped {
                return Err(ApiError::bad(
                    crate::vm::VmStateError::NotRunning(v.name().to_string()).to_string(),
                ));
            }
            f(v)
        })
    }

    /// `PUT /drives/{id}` and `PUT /balloon`: add `drives` (replacing
    /// those of the same id) and `balloon` (if given) to the devices of the
    /// VM `InstanceStart` builds, if the result is valid.
    fn put_devices(
        &self,
        drives: Vec<DriveSection>,
        balloon: Option<BalloonSection>,
    ) -> Result<(), ApiError> {
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if self.started() {
            return Err(ApiError::bad(NOT_AFTER_START));
        }
        let mut warnings = Vec::new();
        let new = crate::virtio::from_sections(drives, balloon, &mut warnings)
            .map_err(|e| ApiError::bad(e.to_string()))?;
        for w in warnings {
            eprintln!("foliovm: warning: {w}");
        }
        let mut virtio = p.virtio.clone();
        for d in new.drives {
            match virtio.drives.iter_mut().find(|o| o.id == d.id) {
                Some(old) => *old = d,
                None => virtio.drives.push(d),
            }
        }
        if new.balloon.is_some() {
            virtio.balloon = new.balloon;
        }
        virtio
            .validate(p.machine.mem_size_mib << 20)
            .map_err(|e| ApiError::bad(e.to_string()))?;
        p.virtio = virtio;
        Ok(())
    }

    /// The shared memory manager, for the host budget.
    fn manager_for_budget(&self) -> Result<std::sync::Arc<mem::MemoryManager>, ApiError> {
        match &*self.source.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(MemorySource::Folio(mm)) => Ok(mm.clone()),
            Some(MemorySource::Anon) => Err(ApiError::bad(
                "the host budget needs the folio memory backend",
            )),
            None => Err(ApiError::bad(
                "no memory manager yet: it is created with the first VM (InstanceStart)",
            )),
        }
    }

    /// The manager whose budget a request sets to `bytes`, after the
    /// check both forms of the request make first (whole 2 MiB blocks).
    fn manager_for_new_budget(
        &self,
        bytes: u64,
    ) -> Result<std::sync::Arc<mem::MemoryManager>, ApiError> {
        crate::config::check_budget_blocks(bytes).map_err(|e| ApiError::bad(e.to_string()))?;
        self.manager_for_budget()
    }

    fn started(&self) -> bool {
        !self
            .vms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }
}

const NOT_AFTER_START: &str =
    "The requested operation is not supported after starting the microVM.";

impl ApiBackend for Controller {
    fn instance_info(&self) -> InstanceInfo {
        let vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
        InstanceInfo {
            app_name: "foliovm".into(),
            id: vms
                .first()
                .map(|v| v.name().to_string())
                .unwrap_or_else(|| "vm0".into()),
            state: vms
                .first()
                .map(|v| state_name(v.state()))
                .unwrap_or("Not started")
                .into(),
            vmm_version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    fn set_boot_source(&self, body: BootSourceBody) -> Result<(), ApiError> {
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if self.started() {
            return Err(ApiError::bad(NOT_AFTER_START));
        }
        // Read when the VM is built; a file that cannot be opened is named
        // now, as Firecracker does (what it holds is checked at the start).
        // Non-blocking: opening a FIFO would wait for a writer.
        let open = |path: &str| {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
                .open(path)
                .map_err(|e| format!("{path}: {e}"))
        };
        open(&body.kernel_image_path)
            .map_err(|e| ApiError::bad(format!("cannot open kernel image {e}")))?;
        if let Some(initrd) = &body.initrd_path {
            open(initrd).map_err(|e| ApiError::bad(format!("cannot open initrd {e}")))?;
        }
        p.boot_source = Some(body);
        Ok(())
    }

    fn put_drive(&self, drive: DriveSection) -> Result<(), ApiError> {
        // Opened when the VM is built; a path that cannot be is named now,
        // as Firecracker does.
        if let Err(e) = std::fs::metadata(&drive.path_on_host) {
            return Err(ApiError::bad(format!(
                "drive {:?}: cannot open {}: {e}",
                drive.drive_id,
                drive.path_on_host.display()
            )));
        }
        self.put_devices(vec![drive], None)
    }

    fn put_balloon(&self, balloon: BalloonSection) -> Result<(), ApiError> {
        self.put_devices(Vec::new(), Some(balloon))
    }

    fn set_machine_config(&self, body: MachineConfigBody) -> Result<(), ApiError> {
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if self.started() {
            return Err(ApiError::bad(NOT_AFTER_START));
        }
        let mem = body.mem_size_mib << 20;
        if mem > self.limits.host_mem_bytes || body.vcpu_count > self.limits.max_vcpus {
            return Err(ApiError::bad(format!(
                "the host allows at most {} MiB and {} vCPUs",
                self.limits.host_mem_bytes >> 20,
                self.limits.max_vcpus
            )));
        }
        p.machine = body;
        Ok(())
    }

    fn machine_config(&self) -> MachineConfigBody {
        if let Some(v) = self.vms.lock().unwrap_or_else(|p| p.into_inner()).first() {
            return MachineConfigBody {
                vcpu_count: u32::from(v.config().vcpus),
                mem_size_mib: v.ram_bytes() >> 20,
                smt: false,
                track_dirty_pages: false,
                cpu_template: None,
                huge_pages: None,
            };
        }
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .machine
            .clone()
    }

    fn instance_start(&self) -> Result<(), ApiError> {
        let p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if self.started() {
            return Err(ApiError::bad(NOT_AFTER_START));
        }
        let bs = p.boot_source.clone().ok_or_else(|| {
            ApiError::bad("InstanceStart needs a boot source: PUT /boot-source first")
        })?;
        let config = VmConfig {
            name: "vm0".into(),
            payload: GuestPayload::Linux {
                kernel: bs.kernel_image_path.into(),
                initrd: bs.initrd_path.map(Into::into),
                cmdline: bs.boot_args,
            },
            mem_bytes: p.machine.mem_size_mib << 20,
            vcpus: u8::try_from(p.machine.vcpu_count)
                .map_err(|_| ApiError::bad("vcpu_count too large"))?,
            limits: mem::VmLimits::default(),
            virtio: p.virtio.clone(),
        };
        let run = RunConfig::single(config.clone(), self.memory.clone());
        run.validate(&self.limits)
            .map_err(|e| ApiError::bad(e.to_string()))?;
        let (source, made) = self
            .memory_source_for(&run)
            .map_err(|e| ApiError::internal(error_chain(&e)))?;
        let quirks = self.quirks.clone();
        // Devices register on the event loop, so the VM is built there.
        let vm = self
            .endpoint
            .call_blocking(move |ops| Vm::build(&config, &source, &quirks, ops))
            .map_err(|e: VmmError| {
                // Sized for this machine-config: a retry after a fix (of
                // the boot source, or of the memory size) gets a new one.
                if made {
                    *self.source.lock().unwrap_or_else(|p| p.into_inner()) = None;
                }
                match e.is_request_error() {
                    true => ApiError::bad(error_chain(&e)),
                    false => ApiError::internal(error_chain(&e)),
                }
            })?;
        self.start_built(vec![vm])
            .map_err(|e| ApiError::internal(error_chain(&e)))
    }

    fn send_ctrl_alt_del(&self, vm: Option<&str>) -> Result<(), ApiError> {
        self.with_named_or_only_vm(vm, "SendCtrlAltDel", "PUT /vms/{name}/actions", |v| {
            v.send_ctrl_alt_del()
                .map_err(|e| ApiError::bad(error_chain(&e)))
        })
    }

    fn set_paused(&self, vm: Option<&str>, paused: bool) -> Result<(), ApiError> {
        self.with_vm(vm, |v| {
            let r = if paused { v.pause() } else { v.resume() };
            r.map_err(|e| match e {
                // The vCPUs did not answer: the host's failure, not the request's.
                crate::vm::VmStateError::PauseTimeout(_) => ApiError::internal(e.to_string()),
                _ => ApiError::bad(e.to_string()),
            })
        })
    }

    fn set_balloon(&self, vm: Option<&str>, amount_mib: u64) -> Result<(), ApiError> {
        self.with_named_or_only_vm(vm, "PATCH /balloon", "PATCH /vms/{name}/balloon", |v| {
            // A stopped VM's balloon is reset (or about to be, by its
            // reap): no guest would ever see the target.
            if v.state() == VmState::Stopped {
                return Err(ApiError::bad(
                    crate::vm::VmStateError::NotRunning(v.name().to_string()).to_string(),
                ));
            }
            if amount_mib << 20 > v.config().mem_bytes {
                return Err(ApiError::bad(format!(
                    "amount_mib {amount_mib} exceeds the guest's {} MiB",
                    v.config().mem_bytes >> 20
                )));
            }
            let b = v
                .balloon()
                .ok_or_else(|| ApiError::bad("the VM has no balloon (start it with --balloon)"))?;
            b.set_target(amount_mib << 20);
            Ok(())
        })
    }

    fn balloon(&self, vm: Option<&str>, stats: bool) -> Result<serde_json::Value, ApiError> {
        self.with_named_or_only_vm(vm, "GET /balloon", "GET /vms/{name}/balloon", |v| {
            let b = v
                .balloon()
                .ok_or_else(|| ApiError::bad("the VM has no balloon (start it with --balloon)"))?;
            if stats {
                b.request_stats();
                let mut m = serde_json::Map::new();
                for (k, val) in b.stats() {
                    m.insert(k.to_string(), serde_json::json!(val));
                }
                return Ok(serde_json::Value::Object(m));
            }
            let c = b.counters();
            let spec = v.config().virtio.balloon.as_ref();
            Ok(serde_json::json!({
                "amount_mib": c.target_bytes >> 20,
                // Firecracker's fields, as configured.
                "deflate_on_oom": spec.is_some_and(|s| s.device.deflate_on_oom),
                "stats_polling_interval_s": spec.map_or(0, |s| s.stats_interval_s),
                "actual_mib": c.actual_bytes >> 20,
                "inflated_bytes": c.inflated_bytes,
                "deflated_bytes": c.deflated_bytes,
                "inflate_returned_bytes": c.inflate_returned_bytes,
                "reported_bytes": c.reported_bytes,
                "report_returned_bytes": c.report_returned_bytes,
            }))
        })
    }

    fn set_limits(&self, vm: &str, body: LimitsBody) -> Result<(), ApiError> {
        self.with_live_vm(vm, |v| {
            let limits = mem::VmLimits {
                min_bytes: body.mem_min_mib << 20,
                max_bytes: body.mem_max_mib.map(|m| m << 20),
                priority: body.priority,
            };
            crate::config::check_limits(&limits, v.config().mem_bytes)
                .map_err(|e| ApiError::bad(e.to_string()))?;
            let (mm, id) = v
                .manager()
                .ok_or_else(|| ApiError::bad("limits need the folio memory backend"))?;
            mm.set_vm_limits(*id, limits)
                .map_err(|e| ApiError::bad(e.to_string()))
        })
    }

    fn reclaim(&self, vm: Option<&str>, bytes: u64) -> Result<Job, ApiError> {
        // Resolve the manager and VM id now, so that a bad request is
        // refused before anything runs; the job holds neither `vms` nor
        // any VM (reclaim blocks on swap I/O).
        let (mm, id) = {
            let vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
            let pick = match vm {
                Some(n) => {
                    let v = vms
                        .iter()
                        .find(|v| v.name() == n)
                        .ok_or_else(|| ApiError::not_found(format!("no VM named {n:?}")))?;
                    if v.state() == VmState::Stopped {
                        return Err(ApiError::bad(
                            crate::vm::VmStateError::NotRunning(n.to_string()).to_string(),
                        ));
                    }
                    v
                }
                None => vms
                    .first()
                    .ok_or_else(|| ApiError::bad("no VM is running"))?,
            };
            let (mm, id) = pick
                .manager()
                .ok_or_else(|| ApiError::bad("reclaim needs the folio memory backend"))?;
            (mm.clone(), vm.map(|_| *id))
        };
        if mm.config().swap.is_none() {
            return Err(ApiError::bad(
                "reclaim needs a swap file (start foliovm with --swap-dir or --swap-file)",
            ));
        }
        // mem's reclaim, driven in steps so that progress shows; it stops
        // early when a step frees nothing (nothing more is reclaimable),
        // and when the process is to exit: shutting down waits for a
        // synchronous request, and a large reclaim runs at disk speed.
        let exit = self.exit.clone();
        Ok(Job::new("reclaim", "bytes", bytes, move |progress| {
            let mut freed = 0;
            while freed < bytes {
                if exit.load(Ordering::SeqCst) {
                    return Err(format!(
                        "foliovm is exiting; stopped after reclaiming {freed} of {bytes} bytes"
                    ));
                }
                let got = mm
                    .reclaim(id, RECLAIM_STEP.min(bytes - freed))
                    .map_err(|e| error_chain(&e))?;
                if got == 0 {
                    break;
                }
                freed += got;
                progress.advance(got);
            }
            Ok(serde_json::json!({ "reclaimed_bytes": freed }))
        }))
    }

    fn operations(&self) -> &Operations {
        &self.ops
    }

    fn compact(&self, vm: &str) -> Result<Job, ApiError> {
        let (mm, id) = self.with_live_vm(vm, |v| {
            v.manager()
                .cloned()
                .ok_or_else(|| ApiError::bad("compaction needs the folio memory backend"))
        })?;
        Ok(Job::new("compact", "ranges", 0, move |progress| {
            let rep = mm
                .compact(Some(id), &|done, total| {
                    progress.set_total(total);
                    progress.set_done(done);
                })
                .map_err(|e| error_chain(&e))?;
            Ok(compact_json(&rep))
        }))
    }

    fn relocate(&self, vm: &str, body: &RelocateBody) -> Result<serde_json::Value, ApiError> {
        let op = body.op()?;
        self.with_vm(Some(vm), |v| {
            let rep = v.relocate(body.region_gpa, op, &|_, _| {}).map_err(|e| {
                let status = match e.blame {
                    crate::vm::Blame::Request => 400,
                    crate::vm::Blame::Conflict => 409,
                    crate::vm::Blame::Host => 500,
                };
                ApiError {
                    status,
                    message: e.message,
                }
            })?;
            Ok(relocate_json(&rep))
        })
    }

    fn budget(&self) -> Result<serde_json::Value, ApiError> {
        let mm = self.manager_for_budget()?;
        let s = mm.stats();
        Ok(serde_json::json!({
            "budget_bytes": s.budget_bytes,
            "max_budget_bytes": s.pool_bytes,
            "free_bytes": s.free_bytes,
        }))
    }

    fn set_budget(&self, bytes: u64) -> Result<serde_json::Value, ApiError> {
        let mm = self.manager_for_new_budget(bytes)?;
        let c = mm.set_budget(bytes).map_err(|e| budget_error(&e))?;
        Ok(budget_changed(&c))
    }

    fn budget_job(&self, bytes: u64) -> Result<Job, ApiError> {
        let mm = self.manager_for_new_budget(bytes)?;
        mm.check_budget(bytes).map_err(|e| budget_error(&e))?;
        Ok(Job::new("budget", "bytes", 0, move |progress| {
            let c = mm
                .set_budget_with_progress(bytes, &|done, total| {
                    progress.set_total(total);
                    progress.set_done(done);
                })
                .map_err(|e| error_chain(&e))?;
            Ok(budget_changed(&c))
        }))
    }

    fn list_vms(&self) -> serde_json::Value {
        let s = self.sample();
        serde_json::Value::Array(s.vms.iter().map(crate::metrics::vm_json).collect())
    }

    fn vm_info(&self, vm: &str) -> Result<serde_json::Value, ApiError> {
        self.sample()
            .vms
            .iter()
            .find(|v| v.name == vm)
            .map(crate::metrics::vm_json)
            .ok_or_else(|| ApiError::not_found(format!("no VM named {vm:?}")))
    }

    fn stats(&self) -> serde_json::Value {
        self.sample().to_json()
    }

    fn metrics(&self) -> String {
        self.sample().to_prometheus()
    }
}

/// A refused budget change as the API answers it.
fn budget_error(e: &mem::BudgetError) -> ApiError {
    match e {
        // The request is valid, but the VMs' memory cannot make room now.
        mem::BudgetError::CannotFree { .. } => ApiError {
            status: 409,
            message: e.to_string(),
        },
        mem::BudgetError::Online(_) => ApiError::internal(error_chain(e)),
        _ => ApiError::bad(e.to_string()),
    }
}

/// A budget change done: logged, and answered as JSON.
fn budget_changed(c: &mem::BudgetChange) -> serde_json::Value {
    tracing::info!(
        old_mib = c.old_bytes >> 20,
        new_mib = c.new_bytes >> 20,
        reclaimed_mib = c.reclaimed_bytes >> 20,
        "host budget changed"
    );
    serde_json::json!({
        "budget_bytes": c.new_bytes,
        "previous_budget_bytes": c.old_bytes,
        "reclaimed_bytes": c.reclaimed_bytes,
    })
}

/// `PUT /vms/{name}/compact`'s result.
fn compact_json(r: &mem::CompactReport) -> serde_json::Value {
    serde_json::json!({
        "pmd_folios_before": r.pmd_folios_before,
        "pmd_folios_after": r.pmd_folios_after,
        "free_2m_blocks_before": r.free_pmd_blocks_before,
        "free_2m_blocks_after": r.free_pmd_blocks_after,
        "blocks_rebuilt": r.blocks_rebuilt,
        "folios_migrated": r.folios_migrated,
        "skipped_pinned": r.skipped_pinned,
        "collapsed": r.collapsed,
        "collapse_skipped": r.collapse_skipped,
        "copied_bytes": r.copied_bytes,
        "elapsed_ms": r.elapsed_ns as f64 / 1e6,
    })
}

/// `PUT /vms/{name}/relocate`'s result.
fn relocate_json(r: &mem::RelocateReport) -> serde_json::Value {
    let region = |x: &mem::RamRegion| {
        serde_json::json!({
            "guest_base": x.guest_base.raw(),
            "host_addr": x.host_addr.raw(),
            "size": x.size,
        })
    };
    let gib = r.new.map_or(0.0, |n| n.size as f64 / (1u64 << 30) as f64);
    serde_json::json!({
        "old": r.old.iter().map(region).collect::<Vec<_>>(),
        "new": r.new.as_ref().map(region),
        "pause_us": r.switch_ns as f64 / 1e3,
        "pause_us_per_gib": if gib > 0.0 { r.switch_ns as f64 / 1e3 / gib } else { 0.0 },
        "tables": r.tables,
        "pulled_by_faults": r.pulled_by_faults,
        "moved_bytes": r.moved_bytes,
        "remapped_huge": r.remapped_huge,
        "elapsed_ms": r.elapsed_ns as f64 / 1e6,
    })
}

/// An error and its causes on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s += &format!(": {c}");
        cur = c.source();
    }
    s
}
