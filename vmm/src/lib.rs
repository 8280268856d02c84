//! foliovm: a KVM microVM monitor whose selling point is its guest memory
//! manager (the `mem` crate).
//!
//! * [`config`] — CLI/JSON configuration and validation.
//! * [`arch`] — x86_64 layout, boot protocol, CPUID, MSRs, MP table.
//! * [`kvm`] — the KVM VM and vCPUs.
//! * [`pvm`] — everything specific to software-KVM (kvm-pvm) hosts.
//! * [`workload`] — the built-in CPL3 workload guest.
//! * [`vm`] — one VM and its lifecycle.
//! * [`io_thread`] — a VM's device I/O thread, serving its virtio queues.
//! * [`vmm`] — running VMs: shared memory, signals, the event loop.
//! * [`bench`] — benchmarks with in-run baselines.
//! * [`virtio`] — drives and the balloon (virtio-mmio).
//! * [`api`], [`controller`], [`metrics`] — the API socket, what it controls, and its statistics.
//! * [`operations`] — long API operations with progress (`GET /operations/{id}`).

pub mod api;
pub mod arch;
pub mod bench;
pub mod config;
pub mod controller;
pub mod io_thread;
pub mod kvm;
pub mod metrics;
pub mod operations;
pub mod pvm;
pub mod stop;
pub mod virtio;
pub mod vm;
pub mod vmm;
pub mod workload;

/// Run `f`; a panic in it comes back as its message. For the threads that
/// must outlive a bug in what they run (the API's, the vCPUs'): locks the
/// panic leaves poisoned are taken over by their next users, as everywhere
/// in the VMM, and the panic itself is printed by the panic hook.
pub(crate) fn catch_panic<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        p.downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default()
    })
}

/// Whether the KVM tests of this crate can run: `/dev/kvm` opens. Without
/// it they are skipped, unless `FOLIOVM_REQUIRE_KVM=1`, when they fail.
#[cfg(test)]
pub(crate) fn kvm_usable() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        assert!(
            std::env::var("FOLIOVM_REQUIRE_KVM").as_deref() != Ok("1"),
            "/dev/kvm is not usable and FOLIOVM_REQUIRE_KVM=1"
        );
        eprintln!("skipping: /dev/kvm is not usable");
    }
    ok
}
