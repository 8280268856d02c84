//! foliovm: a KVM microVM monitor whose selling point is its guest memory
//! manager (the `mem` crate).
//!
//! * [`config`] — CLI/JSON configuration and validation.
//! * [`arch`] — x86_64 layout, boot protocol, CPUID, MSRs, MP table.
//! * [`kvm`] — the KVM VM and vCPUs.
//! * [`pvm`] — everything specific to software-KVM (kvm-pvm) hosts.
//! * [`workload`] — the built-in CPL3 workload guest.
//! * [`vmm`] — building and running a VM.
//! * [`bench`] — benchmarks with in-run baselines.
//! * [`virtio`] — drives and the balloon (virtio-mmio).

pub mod arch;
pub mod bench;
pub mod config;
pub mod kvm;
pub mod pvm;
pub mod stop;
pub mod virtio;
pub mod vmm;
pub mod workload;
