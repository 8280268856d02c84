//! Faults served on the faulting thread ([`FaultDelivery::Faulter`]).
//!
//! With handler threads a swapin wakes three threads: a handler for the
//! fault message, the handler again when its read completes, and the
//! faulting thread when the page is installed. The kernel's own swapin
//! wakes one: the faulting thread does the read itself and sleeps on the
//! I/O. In this mode the userfaultfd is opened with `UFFD_FEATURE_SIGBUS`,
//! so a fault on guest memory raises `SIGBUS` in the faulting thread, whose
//! signal handler runs the same fault path the handlers run
//! ([`crate::fault::fault_in`]) and returns; the access then runs again.
//!
//! What this needs from the threads that touch guest memory:
//! - No manager lock is held across an access to guest memory. That is
//!   already the rule for every thread (see the lock order in the crate
//!   docs): the signal handler takes manager locks, and would deadlock on one
//!   its own thread holds.
//! - Kernel-mode accesses to guest memory (a `read(2)` into it, for
//!   example) fail with `EFAULT` instead of waiting for a handler: the
//!   kernel cannot deliver a signal in the middle of a system call.
//!   [`crate::MemoryManager::pin`] faults a range in first, but it leaves a
//!   page kept clean write-protected, so a kernel-mode write into a pinned
//!   clean page fails too. The mode suits guests whose memory only their
//!   own threads touch.
//! - **So not KVM.** A vCPU's fault on such memory makes `KVM_RUN` fail
//!   with `EFAULT`. Measured on this host (kvm-pvm, Linux 6.18), no
//!   `KVM_EXIT_MEMORY_FAULT` comes with it to name the guest address, so
//!   the VMM could not tell which page to serve. VMs therefore use
//!   [`FaultDelivery::Handlers`]; this mode serves guests run as host
//!   threads, such as `mem`'s own tests and benchmark.
//! - An access to a poisoned guest page (see [`serve_missing`]), a memory
//!   error and a `SIGBUS` at an address no manager owns go to the handler
//!   installed before ours, or kill the process as they would without us.
//!
//! # Context
//! The signal handler runs on the faulting thread, interrupted at an access
//! to guest memory, with no manager lock held. It may sleep (folio locks,
//! swap I/O, waiting for memory) like a handler thread. It can hold the
//! last reference to another VM (direct reclaim holds each live VM for a
//! moment while another thread destroys one): that VM's teardown is then
//! handed to the pre-zeroing worker ([`serving`]), not run here.
//!
//! # Why the handler may allocate and lock
//! The fault path is not async-signal-safe: it allocates, takes `std`
//! mutexes and read-write locks (the manager's, [`MANAGERS`]), does file
//! I/O and may log to `stderr`. That is sound here only because this
//! `SIGBUS` is synchronous: the kernel raises it at the faulting thread's
//! own access to guest memory, never at an arbitrary instruction, so the
//! interrupted code is that access and not the inside of `malloc` (which
//! never touches guest memory) or of a critical section of the handler's
//! locks, provided no thread accesses guest memory while holding one of
//! them. The manager's locks obey that by the lock-order rule above;
//! `MANAGERS` is held only for a lookup; the one lock a guest thread could
//! still hold is `stderr`'s (printing bytes straight from guest memory),
//! and a thread that does that must not use this mode.

use crate::fault::{fault_in_reclaiming, handle_wp_fault, FaultOutcome};
use crate::manager::Inner;
use crate::sys::sigbus::{self, PF_PROT, PF_WRITE};
use crate::types::PAGE_SIZE;
use crate::vmscan;
use std::cell::Cell;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, RwLock, Weak};
use std::time::Instant;

/// How guest page faults reach the memory manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FaultDelivery {
    /// Userfaultfd messages, read and served by handler threads; the
    /// faulting thread sleeps in the kernel meanwhile. Kernel-mode
    /// accesses (system calls, KVM) wait like user-mode ones.
    #[default]
    Handlers,
    /// `SIGBUS` on the faulting thread, which serves its own fault (see the
    /// module docs for what that asks of the threads that touch guest memory).
    Faulter,
}

thread_local! {
    /// Whether this thread is in the `SIGBUS` handler, in [`serve`].
    static SERVING: Cell<bool> = const { Cell::new(false) };
}

/// Whether this thread is serving a fault in its `SIGBUS` handler. Work
/// that must not run there (a VM's teardown) is handed to a manager thread.
pub(crate) fn serving() -> bool {
    SERVING.with(Cell::get)
}

/// Marks this thread [`serving`] until dropped.
struct Serving(bool);

impl Serving {
    fn enter() -> Serving {
        Serving(SERVING.with(|s| s.replace(true)))
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        SERVING.with(|s| s.set(self.0));
    }
}

/// The managers whose faults the `SIGBUS` handler serves.
static MANAGERS: RwLock<Vec<Weak<Inner>>> = RwLock::new(Vec::new());

/// Make `inner`'s guest memory served by the faulting thread: install the
/// signal handler (once per process) and register `inner`.
///
/// # Errors
/// The errno of `sigaction`.
pub(crate) fn register(inner: &Arc<Inner>) -> std::io::Result<()> {
    sigbus::install(serve)?;
    let mut m = MANAGERS.write().unwrap_or_else(|e| e.into_inner());
    m.retain(|w| w.strong_count() > 0);
    m.push(Arc::downgrade(inner));
    Ok(())
}

/// Stop serving `inner`'s faults: its manager is being dropped. After this,
/// no `SIGBUS` handler upgrades a reference to it, so none can hold its last
/// one ([`owner`] upgrades every manager it looks at, the ones that do not
/// own the address too, and drops those in the handler). Handlers looking
/// meanwhile hold the lock this waits for.
pub(crate) fn unregister(inner: &Arc<Inner>) {
    let mut m = MANAGERS.write().unwrap_or_else(|e| e.into_inner());
    m.retain(|w| w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), Arc::as_ptr(inner)));
}

/// The manager whose guest regions or pool hold `addr`.
fn owner(addr: usize) -> Option<Arc<Inner>> {
    let m = MANAGERS.read().unwrap_or_else(|e| e.into_inner());
    m.iter().filter_map(Weak::upgrade).find(|i| {
        let (base, len) = (i.pool.base().raw(), i.pool.len());
        (base..base + len).contains(&addr) || i.lookup(addr).is_some()
    })
}

/// The `SIGBUS` callback: serve the fault at `addr` if a manager owns it.
fn serve(addr: usize, error_code: u64) -> bool {
    // The handler runs with `SA_NODEFER`, and nothing it runs touches guest
    // memory from user mode (installs and reads of guest pages are system
    // calls). Should a change ever make it do so, the nested fault is not
    // served: serving it could wait for a lock this thread holds. The
    // `SIGBUS` then goes to the previous handler, by default ending the
    // process with it, instead of hanging.
    if serving() {
        return false;
    }
    // Set before `owner`: the `Arc`s it upgrades are references too.
    let _serving = Serving::enter();
    let Some(inner) = owner(addr) else {
        return false;
    };
    if error_code & PF_PROT != 0 {
        // A write to a write-protected page (a clean folio, or the pool).
        handle_wp_fault(&inner, addr);
        return true;
    }
    serve_missing(&inner, addr, error_code & PF_WRITE != 0)
}

/// Serve a MISSING fault at `addr` on this thread until the page is there
/// (or the region went away: then the access runs again and meets what is
/// there). Unlike a handler, this thread may wait for memory: it is the one
/// that needs it.
///
/// Returns false if no region holds `addr`, or if the page is poisoned:
/// the access must then fail. The kernel reports an access to a poisoned
/// page as a memory error (`BUS_MCEERR_AR`) only when built with
/// `CONFIG_MEMORY_FAILURE`; this host's kernel reports it as `BUS_ADRERR`,
/// like a fault, so the entry decides.
pub(crate) fn serve_missing(inner: &Inner, addr: usize, write: bool) -> bool {
    let page = addr & !(PAGE_SIZE as usize - 1);
    let Some(region) = inner.lookup(page) else {
        return false;
    };
    let Some(idx) = region.page_of_host(page) else {
        return false;
    };
    let t0 = Instant::now();
    inner.reclaimers.fetch_add(1, Relaxed);
    for c in [&region.counters.faults, &inner.faults] {
        c.events.fetch_add(1, Relaxed);
    }
    vmscan::enforce_vm_max(inner, &region);
    let outcome = fault_in_reclaiming(inner, &region, idx, write, true);
    inner.zapq.drain_if_full(&inner.pool);
    let ns = t0.elapsed().as_nanos() as u64;
    region.counters.faults.latency.record(ns);
    inner.faults.latency.record(ns);
    inner.reclaimers.fetch_sub(1, Relaxed);
    outcome != FaultOutcome::Poisoned
}

#[cfg(test)]
pub(crate) mod tests {
    use crate::{
        FaultDelivery, FaultPlan, GuestAddress, GuestMemoryBackend, InjectedFault, IoOp,
        MemoryManager, MmConfig, ReclaimConfig, SwapConfig, SwapTarget, PAGE_SIZE,
    };
    use std::sync::atomic::AtomicU64;
    use std::sync::atomic::Ordering::Relaxed;
    use std::time::{Duration, Instant};

    /// `VmState`s whose last reference went on a thread in its handler.
    pub(crate) static DROPPED_IN_HANDLER: AtomicU64 = AtomicU64::new(0);
    /// VM teardowns that ran on a thread in its handler.
    pub(crate) static TORN_DOWN_IN_HANDLER: AtomicU64 = AtomicU64::new(0);

    const MIB: u64 = 1 << 20;

    /// A thread writing VM `x` runs out of memory and reclaims directly in
    /// its `SIGBUS` handler, where it holds every live VM in turn
    /// (`vmscan::pick_vm`) and VM `y`'s swap writes take 300 ms each
    /// (`SlowEio`). Meanwhile `y` is destroyed and its backend dropped, so
    /// the handler holds `y`'s last reference: the teardown must not run
    /// there, but on the pre-zeroing worker, and still free `y`'s memory
    /// (which is what lets the writer go on).
    #[test]
    fn a_vm_whose_last_reference_goes_in_a_sigbus_handler_is_torn_down_elsewhere() {
        let mm = MemoryManager::new(MmConfig {
            budget_bytes: 8 * MIB,
            handler_threads: 0,
            fault_delivery: FaultDelivery::Faulter,
            prezero_limit_bytes: None,
            swap: Some(SwapConfig {
                target: SwapTarget::Dir(std::env::temp_dir()),
                size_bytes: 64 * MIB,
            }),
            reclaim: ReclaimConfig {
                background: false,
                ..ReclaimConfig::default()
            },
        })
        .unwrap();
        let write = |b: &dyn GuestMemoryBackend, pages: u64| {
            let base = b.regions()[0].host_addr.raw();
            for p in 0..pages {
                // SAFETY: a page of a live backend's guest RAM, which Rust
                // code never borrows; the fault is served in our handler.
                unsafe { ((base + (p * PAGE_SIZE) as usize) as *mut u64).write_volatile(p + 1) };
            }
        };
        let y = mm.create_vm("victim").unwrap();
        let by = mm.backend(y, &[(GuestAddress(0), 12 * MIB)]).unwrap();
        write(&*by, 12 * MIB / PAGE_SIZE);
        let x = mm.create_vm("writer").unwrap();
        let bx = mm.backend(x, &[(GuestAddress(0), 8 * MIB)]).unwrap();
        mm.inject_swap_faults(vec![FaultPlan {
            op: IoOp::Write,
            fault: InjectedFault::SlowEio,
            skip: 0,
            count: u64::MAX,
        }])
        .unwrap();
        let before = DROPPED_IN_HANDLER.load(Relaxed);
        let writer = {
            let bx = bx.clone();
            std::thread::spawn(move || write(&*bx, 8 * MIB / PAGE_SIZE))
        };
        let t0 = Instant::now();
        while mm.vm_stats(x).unwrap().swap.direct_reclaims == 0 {
            assert!(t0.elapsed() < Duration::from_secs(30), "no direct reclaim");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(100));
        drop(by);
        mm.destroy_vm(y).unwrap();
        // With the writes failing, only `y`'s teardown frees memory.
        let t0 = Instant::now();
        while !writer.is_finished() {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "the writer still waits for memory a minute after y went"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        writer.join().unwrap();
        mm.inject_swap_faults(Vec::new()).unwrap();
        assert!(
            DROPPED_IN_HANDLER.load(Relaxed) > before,
            "the race was not reproduced: y's last reference went elsewhere"
        );
        assert_eq!(
            TORN_DOWN_IN_HANDLER.load(Relaxed),
            0,
            "a VM was torn down in a SIGBUS handler"
        );
        drop(bx);
        mm.destroy_vm(x).unwrap();
    }
}
