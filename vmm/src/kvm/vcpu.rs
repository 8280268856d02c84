//! vCPUs: configuration and the run loop.

use super::{ioctl, KvmError, KvmVm};
use crate::arch::{cpuid, msr, regs};
use crate::stop::{ExitReason, StopSignal};
use crate::workload::{ReportEvent, WorkloadReport, RESULT_MMIO, RESULT_MMIO_SIZE};
use devices::Bus;
use kvm_bindings::{kvm_regs, kvm_sregs, CpuId};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex};
use vm_memory::{Address, Bytes, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

thread_local! {
    /// Whether this thread is a vCPU in `KVM_RUN`. Const-initialised
    /// `Cell`s without a destructor: plain thread-local storage, which the
    /// `SIGBUS` handler may read and write.
    static IN_KVM_RUN: Cell<bool> = const { Cell::new(false) };
    /// The host address of a memory error KVM raised during this thread's
    /// `KVM_RUN`, until the vCPU loop takes it.
    static MEMORY_ERROR: Cell<Option<usize>> = const { Cell::new(None) };
}

/// For the process's `SIGBUS` handler: take the memory error `code` at
/// host address `addr` as the guest's if this thread is a vCPU in
/// `KVM_RUN` (KVM raises `BUS_MCEERR_AR` there when the guest touches a
/// poisoned page); then the handler returns, `KVM_RUN` fails with `EINTR`
/// and the vCPU stops its VM. `false`: the signal is not the guest's.
///
/// # Context
/// Signal handler: touches only this thread's const-initialised
/// thread-local cells.
pub(crate) fn take_guest_memory_error(code: libc::c_int, addr: usize) -> bool {
    if !IN_KVM_RUN.get() || !matches!(code, libc::BUS_MCEERR_AR | libc::BUS_MCEERR_AO) {
        return false;
    }
    MEMORY_ERROR.set(Some(addr));
    true
}

/// The guest-physical address of host address `host` in `mem`, if any.
fn guest_address(mem: &GuestMemoryMmap, host: usize) -> Option<u64> {
    mem.iter().find_map(|r| {
        let base = r.as_ptr() as usize;
        let off = host.checked_sub(base)? as u64;
        (off < r.len()).then(|| r.start_addr().raw_value() + off)
    })
}

/// What vCPU threads share: the buses, the workload collector, the stop signal.
pub struct VcpuContext {
    /// Port I/O devices.
    pub pio: Bus,
    /// MMIO devices.
    pub mmio: Bus,
    /// The workload guest's result collector, when running one.
    pub workload: Option<Arc<WorkloadReport>>,
    /// Where vCPUs report why the VM must stop, and learn that it is stopping.
    pub stop: Arc<StopSignal>,
    /// Where vCPUs park while the VM is paused.
    pub gate: RunGate,
    /// Guest memory, to read an exception frame for a report (replaced
    /// when a relocation moves guest RAM).
    pub mem: std::sync::RwLock<GuestMemoryMmap>,
}

/// Where vCPU threads park while their VM is paused.
///
/// `close()` makes vCPUs park the next time they are out of KVM_RUN (the
/// pauser kicks them out with a signal and waits until `parked()` counts
/// them all); `open()` releases them. A stop request must be followed by
/// `open()` so parked vCPUs see it.
#[derive(Debug, Default)]
pub struct RunGate {
    state: Mutex<GateState>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    closed: bool,
    parked: usize,
}

impl RunGate {
    /// Make vCPUs park.
    pub fn close(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
    }

    /// Release parked vCPUs.
    pub fn open(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).closed = false;
        self.cv.notify_all();
    }

    /// Whether the gate is closed (the VM is paused or pausing).
    pub fn is_paused(&self) -> bool {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).closed
    }

    /// Sleep until at least `n()` vCPUs are parked or `timeout` passes
    /// (woken by each vCPU that parks). Returns whether they are.
    pub fn wait_parked(&self, n: impl Fn() -> usize, timeout: std::time::Duration) -> bool {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (st, _) = self
            .cv
            .wait_timeout_while(st, timeout, |s| s.parked < n())
            .unwrap_or_else(|p| p.into_inner());
        st.parked >= n()
    }

    /// vCPUs parked now.
    pub fn parked(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).parked
    }

    /// Park while the gate is closed and the VM is not stopping. Returns
    /// whether it parked.
    ///
    /// # Context
    /// vCPU thread, outside KVM_RUN.
    pub fn wait_while_closed(&self, stop: &StopSignal) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !st.closed || stop.is_stopping() {
            return false;
        }
        st.parked += 1;
        // Tell a pauser waiting in `wait_parked`.
        self.cv.notify_all();
        while st.closed && !stop.is_stopping() {
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.parked -= 1;
        true
    }
}

/// One vCPU.
pub struct Vcpu {
    index: usize,
    fd: VcpuFd,
}

/// KVM_SYSTEM_EVENT types.
const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
/// APIC LVT delivery modes for LINT0/LINT1.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

impl Vcpu {
    /// Create vCPU `index` (its APIC ID).
    ///
    /// # Errors
    /// [`KvmError::Ioctl`].
    pub fn new(vm: &KvmVm, index: usize) -> Result<Self, KvmError> {
        let fd = vm
            .fd()
            .create_vcpu(index as u64)
            .map_err(ioctl("KVM_CREATE_VCPU"))?;
        Ok(Vcpu { index, fd })
    }

    /// This vCPU's index.
    pub fn index(&self) -> usize {
        self.index
    }

    /// CPUID, MSRs, FPU: common to every guest.
    ///
    /// # Errors
    /// [`KvmError::Ioctl`].
    pub fn configure_cpu(
        &self,
        supported: &CpuId,
        nr_vcpus: u8,
        masks: &[cpuid::CpuidMask],
    ) -> Result<(), KvmError> {
        let c = cpuid::vcpu_cpuid(supported, self.index as u8, nr_vcpus, masks);
        self.fd.set_cpuid2(&c).map_err(ioctl("KVM_SET_CPUID2"))?;
        let msrs = msr::boot_msrs();
        let n = self.fd.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
        if n != msrs.as_slice().len() {
            return Err(KvmError::MsrRefused(msrs.as_slice()[n].index));
        }
        self.fd
            .set_fpu(&regs::boot_fpu())
            .map_err(ioctl("KVM_SET_FPU"))
    }

    /// Route LINT0 to ExtINT and LINT1 to NMI on the in-kernel local APIC.
    ///
    /// # Errors
    /// [`KvmError::Ioctl`].
    pub fn set_lint(&self) -> Result<(), KvmError> {
        let mut lapic = self.fd.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
        for (off, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
            let r = &mut lapic.regs[off..off + 4];
            let v = u32::from_le_bytes([r[0] as u8, r[1] as u8, r[2] as u8, r[3] as u8]);
            let v = (v & !0x700) | (mode << 8);
            for (d, s) in r.iter_mut().zip(v.to_le_bytes()) {
                *d = s as _;
            }
        }
        self.fd.set_lapic(&lapic).map_err(ioctl("KVM_SET_LAPIC"))
    }

    /// Set the general and special registers.
    ///
    /// # Errors
    /// [`KvmError::Ioctl`].
    pub fn set_state(&self, r: &kvm_regs, s: &kvm_sregs) -> Result<(), KvmError> {
        self.fd.set_sregs(s).map_err(ioctl("KVM_SET_SREGS"))?;
        self.fd.set_regs(r).map_err(ioctl("KVM_SET_REGS"))
    }

    /// The current special registers (the Linux boot path starts from them).
    ///
    /// # Errors
    /// [`KvmError::Ioctl`].
    pub fn sregs(&self) -> Result<kvm_sregs, KvmError> {
        self.fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))
    }

    /// The guest TSC frequency in kHz, if KVM reports it.
    pub fn tsc_khz(&self) -> Option<u32> {
        self.fd.get_tsc_khz().ok().filter(|&k| k > 0)
    }

    /// Run until the VM stops or this vCPU finishes its workload.
    pub fn run(mut self, ctx: &VcpuContext) {
        while !ctx.stop.is_stopping() {
            if ctx.gate.wait_while_closed(&ctx.stop) {
                // Paused and resumed (or stopping): look at the flags again.
                continue;
            }
            IN_KVM_RUN.set(true);
            let run = self.fd.run();
            IN_KVM_RUN.set(false);
            // Whatever KVM_RUN answered (EINTR, as the signal was pending):
            // entering the guest again would touch the lost page again.
            if let Some(host) = MEMORY_ERROR.take() {
                let gpa = guest_address(&ctx.mem.read().unwrap_or_else(|p| p.into_inner()), host);
                ctx.stop.request(ExitReason::MemoryError {
                    vcpu: self.index,
                    gpa,
                    host,
                });
                return;
            }
            match run {
                Ok(exit) => {
                    if let Some(done) = handle_exit(self.index, exit, ctx) {
                        match done {
                            Step::Finished => return,
                            Step::Stop(reason) => {
                                let reason = self.annotate(reason);
                                ctx.stop.request(reason);
                                return;
                            }
                        }
                    }
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                }
                Err(e) => {
                    ctx.stop.request(ExitReason::Error(format!(
                        "KVM_RUN on vCPU {} failed: {e}",
                        self.index
                    )));
                    return;
                }
            }
        }
    }

    /// Fill in register state for reports that need it.
    fn annotate(&mut self, reason: ExitReason) -> ExitReason {
        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
        match reason {
            ExitReason::InternalError { vcpu, .. } => {
                let run = self.fd.get_kvm_run();
                // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so the
                // `internal` member of the exit union is the one KVM filled.
                let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                ExitReason::InternalError {
                    vcpu,
                    suberror,
                    rip,
                }
            }
            ExitReason::TripleFault { vcpu, .. } => ExitReason::TripleFault { vcpu, rip },
            other => other,
        }
    }
}

enum Step {
    Finished,
    Stop(ExitReason),
}

/// Handle one exit. A panic in a device model (or here) stops the VM with
/// an error naming it: the vCPU thread unwinding on its own would leave
/// the VM running without that vCPU and without a stop reason (see
/// [`crate::catch_panic`]).
fn handle_exit(index: usize, exit: VcpuExit<'_>, ctx: &VcpuContext) -> Option<Step> {
    crate::catch_panic(|| dispatch_exit(index, exit, ctx)).unwrap_or_else(|what| {
        Some(Step::Stop(ExitReason::Error(format!(
            "vCPU {index} panicked handling a guest exit: {what}"
        ))))
    })
}

fn dispatch_exit(index: usize, exit: VcpuExit<'_>, ctx: &VcpuContext) -> Option<Step> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            ctx.pio.read(u64::from(port), data);
        }
        VcpuExit::IoOut(port, data) => {
            ctx.pio.write(u64::from(port), data);
        }
        VcpuExit::MmioRead(addr, data) => {
            ctx.mmio.read(addr, data);
        }
        VcpuExit::MmioWrite(addr, data) => return mmio_write(index, addr, data, ctx),
        VcpuExit::Hlt => return Some(Step::Stop(ExitReason::GuestPowerOff)),
        VcpuExit::Shutdown => {
            return Some(Step::Stop(ExitReason::TripleFault {
                vcpu: index,
                rip: 0,
            }))
        }
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _) => {
            return Some(Step::Stop(ExitReason::GuestPowerOff))
        }
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _) => {
            return Some(Step::Stop(ExitReason::GuestReset))
        }
        VcpuExit::InternalError => {
            return Some(Step::Stop(ExitReason::InternalError {
                vcpu: index,
                suberror: 0,
                rip: 0,
            }))
        }
        VcpuExit::FailEntry(reason, cpu) => {
            return Some(Step::Stop(ExitReason::Error(format!(
                "KVM_EXIT_FAIL_ENTRY on vCPU {index}: hardware reason {reason:#x} on host cpu {cpu}"
            ))))
        }
        VcpuExit::Intr | VcpuExit::IrqWindowOpen => {}
        other => {
            return Some(Step::Stop(ExitReason::Error(format!(
                "unexpected KVM exit on vCPU {index}: {other:?}"
            ))))
        }
    }
    None
}

fn mmio_write(index: usize, addr: u64, data: &[u8], ctx: &VcpuContext) -> Option<Step> {
    if let Some(w) = &ctx.workload {
        let base = RESULT_MMIO.raw();
        if (base..base + RESULT_MMIO_SIZE).contains(&addr) {
            let mut v = [0u8; 8];
            let n = data.len().min(8);
            v[..n].copy_from_slice(&data[..n]);
            return match w.write(index, addr - base, u64::from_le_bytes(v)) {
                ReportEvent::Continue => None,
                ReportEvent::Done { all } => {
                    if all {
                        ctx.stop.request(ExitReason::WorkloadDone);
                    }
                    Some(Step::Finished)
                }
                ReportEvent::Exception(vector) => Some(Step::Stop(ExitReason::WorkloadException {
                    vcpu: index,
                    vector,
                    frame: exception_frame(ctx, index),
                })),
            };
        }
    }
    ctx.mmio.write(addr, data);
    None
}

/// Read the faulting RIP from the exception stack of vCPU `index`: the
/// handler runs on the TSS RSP0 stack, whose top holds the interrupt frame.
fn exception_frame(ctx: &VcpuContext, index: usize) -> [u64; 6] {
    let top = crate::workload::exception_stack_top(index);
    let mut frame = [0u64; 6];
    for (i, w) in frame.iter_mut().enumerate() {
        *w = ctx
            .mem
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .read_obj(vm_memory::GuestAddress(top - 48 + i as u64 * 8))
            .unwrap_or(0);
    }
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(pio: Bus) -> VcpuContext {
        VcpuContext {
            pio,
            mmio: Bus::new(),
            workload: None,
            stop: Arc::new(StopSignal::new().unwrap()),
            gate: RunGate::default(),
            mem: std::sync::RwLock::new(GuestMemoryMmap::default()),
        }
    }

    /// A device with a bug a guest can reach.
    struct Buggy;

    impl devices::BusDevice for Buggy {
        fn read(&mut self, _: u64, _: &mut [u8]) {
            panic!("device bug");
        }
        fn write(&mut self, _: u64, data: &[u8]) {
            let _ = data[usize::from(data[0])];
        }
    }

    #[test]
    fn a_panic_while_handling_an_exit_stops_the_vm() {
        // A vCPU thread that unwound would be gone without a stop request:
        // the VM ran on without it (a workload never finished, a Linux
        // guest waited on it forever) and nobody said why.
        let mut pio = Bus::new();
        pio.insert(Arc::new(Mutex::new(Buggy)), 0x10, 1).unwrap();
        let mut mmio = Bus::new();
        mmio.insert(Arc::new(Mutex::new(Buggy)), 0xd000_0000, 0x1000)
            .unwrap();
        let ctx = VcpuContext {
            mmio,
            ..context(pio)
        };
        let stopped = |s: Option<Step>| match s {
            Some(Step::Stop(ExitReason::Error(e))) => e,
            _ => panic!("the exit did not stop the VM"),
        };
        let e = stopped(handle_exit(2, VcpuExit::IoOut(0x10, &[9]), &ctx));
        assert!(
            e.contains("vCPU 2") && e.contains("index out of bounds"),
            "{e}"
        );
        let mut d = [0u8; 4];
        let e = stopped(handle_exit(
            0,
            VcpuExit::MmioRead(0xd000_0004, &mut d),
            &ctx,
        ));
        assert!(e.contains("device bug"), "{e}");
        // The poisoned device still takes the next access.
        let e = stopped(handle_exit(0, VcpuExit::IoOut(0x10, &[7]), &ctx));
        assert!(e.contains("panicked"), "{e}");
    }

    #[test]
    fn an_i8042_reset_stops_the_vm_before_the_vcpu_runs_on() {
        // Linux with reboot=k pulses 0x64 <- 0xfe ten times within about a
        // millisecond, then tries other reboot methods down to a triple
        // fault: the reset must have stopped the VM once the exit of the
        // first pulse is handled, not when the event loop gets to it.
        let stop = Arc::new(StopSignal::new().unwrap());
        let mut pio = Bus::new();
        let kbd = crate::vm::i8042(stop.clone(), devices::EventFdTrigger::new().unwrap());
        pio.insert(kbd, 0x60, 5).unwrap();
        let ctx = VcpuContext {
            stop: stop.clone(),
            ..context(pio)
        };
        assert!(handle_exit(0, VcpuExit::IoOut(0x64, &[0xfe]), &ctx).is_none());
        assert!(
            ctx.stop.is_stopping(),
            "the vCPU would enter the guest again"
        );
        assert_eq!(ctx.stop.reason(), Some(ExitReason::GuestReset));
        // Another vCPU's triple fault coming after it does not replace it.
        if let Some(Step::Stop(r)) = handle_exit(1, VcpuExit::Shutdown, &ctx) {
            ctx.stop.request(r);
        }
        assert_eq!(ctx.stop.reason(), Some(ExitReason::GuestReset));
    }

    #[test]
    fn gate_parks_until_opened_or_stopped() {
        let gate = Arc::new(RunGate::default());
        let stop = Arc::new(StopSignal::new().unwrap());
        assert!(!gate.wait_while_closed(&stop), "open gate does not park");
        gate.close();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (g, s) = (gate.clone(), stop.clone());
                std::thread::spawn(move || g.wait_while_closed(&s))
            })
            .collect();
        while gate.parked() < 4 {
            std::thread::yield_now();
        }
        assert!(gate.is_paused());
        gate.open();
        for t in threads {
            assert!(t.join().unwrap());
        }
        assert_eq!(gate.parked(), 0);
        // A stop releases parked vCPUs once the gate is opened for it.
        gate.close();
        let (g, s) = (gate.clone(), stop.clone());
        let t = std::thread::spawn(move || g.wait_while_closed(&s));
        while gate.parked() < 1 {
            std::thread::yield_now();
        }
        stop.request(ExitReason::GuestReset);
        gate.open();
        assert!(t.join().unwrap());
    }
}
