//! Why a VM stops, and the one place every thread reports it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use vmm_sys_util::eventfd::EventFd;

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the machine (Linux `reboot` with `reboot=k`).
    GuestReset,
    /// The guest powered off.
    GuestPowerOff,
    /// Every workload vCPU reported its result.
    WorkloadDone,
    /// The user interrupted foliovm (SIGINT/SIGTERM).
    Interrupted(i32),
    /// KVM_EXIT_SHUTDOWN: a triple fault.
    TripleFault {
        /// vCPU.
        vcpu: usize,
        /// Its RIP.
        rip: u64,
    },
    /// KVM_EXIT_INTERNAL_ERROR (suberror 1 is an emulation failure).
    InternalError {
        /// vCPU.
        vcpu: usize,
        /// KVM's suberror.
        suberror: u32,
        /// Its RIP.
        rip: u64,
    },
    /// The workload guest took an exception.
    WorkloadException {
        /// vCPU.
        vcpu: usize,
        /// Vector.
        vector: u8,
        /// Words at the top of the exception stack; `[1]` is the faulting RIP.
        frame: [u64; 6],
    },
    /// KVM raised a memory error (`SIGBUS`, `BUS_MCEERR_AR`) on a vCPU
    /// that touched a guest page whose data is lost: the memory manager
    /// poisoned it (a swap read failed).
    MemoryError {
        /// vCPU.
        vcpu: usize,
        /// The guest-physical address, if the page is in guest RAM's view.
        gpa: Option<u64>,
        /// The host address KVM named.
        host: usize,
    },
    /// Any other failure.
    Error(String),
}

impl ExitReason {
    /// The reason of a VM stopped with none set: the fallback when it is
    /// summarised.
    pub fn unexplained() -> ExitReason {
        ExitReason::Error("VM stopped without a reason".into())
    }

    /// Process exit status: 0 for a clean guest stop, 130/143 for signals,
    /// 1 for errors.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::GuestReset | ExitReason::GuestPowerOff | ExitReason::WorkloadDone => 0,
            ExitReason::Interrupted(sig) => 128 + sig,
            _ => 1,
        }
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::GuestReset => write!(f, "guest reset"),
            ExitReason::GuestPowerOff => write!(f, "guest powered off"),
            ExitReason::WorkloadDone => write!(f, "workload finished"),
            ExitReason::Interrupted(sig) => write!(f, "interrupted by signal {sig}"),
            ExitReason::TripleFault { vcpu, rip } => {
                write!(f, "guest triple fault (KVM_EXIT_SHUTDOWN) on vCPU {vcpu} at rip {rip:#x}")
            }
            ExitReason::InternalError { vcpu, suberror, rip } => write!(
                f,
                "KVM_EXIT_INTERNAL_ERROR suberror {suberror}{} on vCPU {vcpu} at rip {rip:#x}",
                if *suberror == 1 { " (emulation failure)" } else { "" }
            ),
            ExitReason::WorkloadException { vcpu, vector, frame } => write!(
                f,
                "workload guest exception vector {vector} on vCPU {vcpu} at rip {:#x} (error code {:#x})",
                frame[1], frame[0]
            ),
            ExitReason::MemoryError { vcpu, gpa, host } => {
                write!(f, "guest memory error on vCPU {vcpu} at ")?;
                match gpa {
                    Some(gpa) => write!(f, "guest address {gpa:#x}")?,
                    None => write!(f, "host address {host:#x}")?,
                }
                write!(f, ": the page's data is lost (poisoned after a failed swap read)")
            }
            ExitReason::Error(s) => f.write_str(s),
        }
    }
}

/// The first stop request wins; later ones are dropped. Waking `evt` tells
/// the event loop to stop the vCPUs.
#[derive(Debug)]
pub struct StopSignal {
    reason: Mutex<Option<ExitReason>>,
    stopping: AtomicBool,
    evt: EventFd,
}

impl StopSignal {
    /// A fresh signal.
    ///
    /// # Errors
    /// eventfd creation failure.
    pub fn new() -> std::io::Result<Self> {
        Ok(StopSignal {
            reason: Mutex::new(None),
            stopping: AtomicBool::new(false),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Ask the VM to stop for `reason` (ignored if a reason is already set).
    pub fn request(&self, reason: ExitReason) {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some(reason);
        }
        self.stopping.store(true, Ordering::Release);
        // A full eventfd counter still wakes the loop.
        let _ = self.evt.write(1);
    }

    /// Whether a stop was requested.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// The stop reason, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The eventfd the event loop watches.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let s = StopSignal::new().unwrap();
        assert!(!s.is_stopping());
        s.request(ExitReason::GuestReset);
        s.request(ExitReason::Error("late".into()));
        assert!(s.is_stopping());
        assert_eq!(s.reason(), Some(ExitReason::GuestReset));
        assert_eq!(s.eventfd().read().unwrap(), 2);
    }

    #[test]
    fn exit_codes() {
        assert_eq!(ExitReason::GuestReset.exit_code(), 0);
        assert_eq!(ExitReason::Interrupted(2).exit_code(), 130);
        assert_eq!(ExitReason::TripleFault { vcpu: 0, rip: 0 }.exit_code(), 1);
        let s = ExitReason::InternalError {
            vcpu: 1,
            suberror: 1,
            rip: 0x10,
        }
        .to_string();
        assert!(s.contains("emulation failure") && s.contains("0x10"), "{s}");
    }
}
