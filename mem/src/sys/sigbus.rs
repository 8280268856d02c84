//! The process-wide `SIGBUS` handler behind [`crate::FaultDelivery::Faulter`].
//!
//! With `UFFD_FEATURE_SIGBUS` the kernel delivers no fault message: the
//! faulting thread gets `SIGBUS` (`BUS_ADRERR`) at the access. The handler
//! installed here asks a callback to serve the address on that same thread;
//! when the callback does, the handler returns and the access runs again.
//! Anything else (an address no manager owns, a memory error such as a
//! poisoned page, `BUS_MCEERR_AR`) goes to the handler that was installed
//! before ours, or gets the default action (the process dies with `SIGBUS`).

use std::io;
use std::sync::OnceLock;

/// x86 page-fault error code bit: the page was present (a protection fault).
pub const PF_PROT: u64 = 1;
/// x86 page-fault error code bit: the access was a write.
pub const PF_WRITE: u64 = 2;

/// Serves a fault at a host address on the faulting thread, given the x86
/// page-fault error code; returns false if the address is not its own.
pub type ServeFn = fn(addr: usize, error_code: u64) -> bool;

/// Written once, before the handler can run, and only read after. (Plain
/// data: `libc::sigaction` is `Send + Sync` by itself, so no `unsafe impl`
/// is needed for the static.)
struct Installed {
    serve: ServeFn,
    previous: libc::sigaction,
}

/// The handler's state. Published before the handler is installed, so
/// that the handler, once it can run, always finds it.
static STATE: OnceLock<Installed> = OnceLock::new();
/// Whether installing succeeded, or the errno with which it failed.
static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();

/// Install the handler once per process; later calls check that `serve` is
/// the callback already installed.
///
/// # Errors
/// The errno of `sigaction`.
pub fn install(serve: ServeFn) -> io::Result<()> {
    let errno = || {
        io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EINVAL)
    };
    let got = INSTALLED.get_or_init(|| {
        // SAFETY: an all-zero `sigaction` is a valid value (SIG_DFL, empty
        // mask, no flags); `previous` is filled in by the kernel, `act`
        // below.
        let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: a null new action only reads the current one into
        // `previous`, a live `sigaction`.
        if unsafe { libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut previous) } != 0 {
            return Err(errno());
        }
        let _ = STATE.set(Installed { serve, previous });
        // SAFETY: as above.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = on_sigbus as *const () as usize;
        // SA_NODEFER: a SIGBUS inside the callback (a write-protected pool
        // page, say) is served like any other instead of killing us.
        act.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER;
        // SAFETY: `act` is a live `sigaction` and the handler is an
        // `extern "C"` function with the SA_SIGINFO signature. `STATE` is
        // published above, so the handler finds it from its first run.
        match unsafe { libc::sigaction(libc::SIGBUS, &act, std::ptr::null_mut()) } {
            0 => Ok(()),
            _ => Err(errno()),
        }
    });
    match got {
        Ok(()) => {
            debug_assert!(STATE
                .get()
                .is_some_and(|i| i.serve as usize == serve as usize));
            Ok(())
        }
        Err(errno) => Err(io::Error::from_raw_os_error(*errno)),
    }
}

/// Restores the interrupted code's `errno` when the handler returns: the
/// serve path makes system calls, and the access it interrupted may sit
/// between a failed call and the read of its `errno`.
struct KeepErrno(libc::c_int);

impl KeepErrno {
    fn save() -> Self {
        // SAFETY: `__errno_location` returns this thread's errno slot,
        // valid for the thread's life.
        KeepErrno(unsafe { *libc::__errno_location() })
    }
}

impl Drop for KeepErrno {
    fn drop(&mut self) {
        // SAFETY: as in `save`.
        unsafe { *libc::__errno_location() = self.0 };
    }
}

/// The handler. It is not async-signal-safe, and need not be for the
/// faults it serves: see "Why the handler may allocate and lock" in
/// `crate::faulter`. For any other `SIGBUS` it only reads `STATE` (a
/// `OnceLock`, lock-free once set) and calls `serve`, which looks the
/// address up under read locks, before passing the signal on.
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo and ucontext to SA_SIGINFO
    // handlers; si_addr is the faulting address for SIGBUS.
    let (addr, code, error_code) = unsafe {
        let uc = &*(ctx as *const libc::ucontext_t);
        (
            (*info).si_addr() as usize,
            (*info).si_code,
            uc.uc_mcontext.gregs[libc::REG_ERR as usize] as u64,
        )
    };
    let _errno = KeepErrno::save();
    let Some(inst) = STATE.get() else {
        return reset_default(sig);
    };
    if code == libc::BUS_ADRERR && (inst.serve)(addr, error_code) {
        return;
    }
    // SAFETY: called from this `SIGBUS` handler with what it was given.
    unsafe { chain(&inst.previous, sig, info, ctx) };
}

/// Pass a `SIGBUS` on to `prev`, the action installed before the caller's
/// handler: call its handler, or, for the default action (or an ignore,
/// which a fault's `SIGBUS` cannot have), restore the default and raise
/// the signal again, so that it ends the process as if no handler had been
/// installed. (`SIGBUS` is blocked in its handler, so the raised one is
/// delivered as the handler returns; a fault's would also come again
/// when the access runs again.)
///
/// # Safety
/// Called from a `SIGBUS` handler installed with `SA_SIGINFO`, with the
/// `info` and `ctx` it was given.
pub unsafe fn chain(
    prev: &libc::sigaction,
    sig: libc::c_int,
    info: *mut libc::siginfo_t,
    ctx: *mut libc::c_void,
) {
    if prev.sa_sigaction == libc::SIG_DFL || prev.sa_sigaction == libc::SIG_IGN {
        reset_default(sig);
        // SAFETY: raise(3) is async-signal-safe and takes no pointer.
        unsafe { libc::raise(sig) };
        return;
    }
    if prev.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous handler was installed as an SA_SIGINFO
        // handler, so it has this signature.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(prev.sa_sigaction) };
        f(sig, info, ctx);
    } else {
        // SAFETY: a plain handler takes the signal number only.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(prev.sa_sigaction) };
        f(sig);
    }
}

/// Restore the default action; returning re-runs the access, which then
/// kills the process with `SIGBUS` as if we had never been installed.
fn reset_default(sig: libc::c_int) {
    // SAFETY: `signal` with SIG_DFL is async-signal-safe and takes no pointer.
    unsafe { libc::signal(sig, libc::SIG_DFL) };
}
