//! Everything foliovm does differently on a software KVM (kvm-pvm).
//!
//! kvm-pvm runs guest CPL3 code natively but emulates guest CPL0 code, and its
//! emulator lacks some instructions (see DESIGN.md §2). When
//! `/sys/module/kvm_pvm` exists foliovm hides the CPU features whose
//! instructions the emulator cannot execute, both in CPUID and on the kernel
//! command line (the command line is what sticks: a guest kernel can enable
//! some features from other CPUID leaves or quirks).
//!
//! On real KVM (VT-x/SVM) none of this applies, and a stock kernel boots
//! unchanged with the same command. The guest-kernel patches needed on top of
//! this live in `guest-images/kernel/patches/`.

use crate::arch::cpuid::{CpuidMask, Reg};
use std::path::Path;

/// Whether this host's KVM is the software kvm-pvm.
pub fn is_software_kvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// CPUID bits hidden from guests on kvm-pvm, each with the instruction the
/// emulator failed on.
pub const CPUID_MASKS: &[CpuidMask] = &[
    // cmpxchg16b in SLUB.
    CpuidMask {
        leaf: 1,
        index: None,
        reg: Reg::Ecx,
        bits: 1 << 13,
        name: "cx16",
    },
    // popcnt after alternatives.
    CpuidMask {
        leaf: 1,
        index: None,
        reg: Reg::Ecx,
        bits: 1 << 23,
        name: "popcnt",
    },
    // xsave/xrstor(s) in FPU init; OSXSAVE follows XSAVE.
    CpuidMask {
        leaf: 1,
        index: None,
        reg: Reg::Ecx,
        bits: (1 << 26) | (1 << 27),
        name: "xsave",
    },
    CpuidMask {
        leaf: 1,
        index: None,
        reg: Reg::Ecx,
        bits: 1 << 30,
        name: "rdrand",
    },
    CpuidMask {
        leaf: 7,
        index: Some(0),
        reg: Reg::Ebx,
        bits: 1 << 0,
        name: "fsgsbase",
    },
    CpuidMask {
        leaf: 7,
        index: Some(0),
        reg: Reg::Ebx,
        bits: 1 << 7,
        name: "smep",
    },
    CpuidMask {
        leaf: 7,
        index: Some(0),
        reg: Reg::Ebx,
        bits: 1 << 18,
        name: "rdseed",
    },
    // clac/stac.
    CpuidMask {
        leaf: 7,
        index: Some(0),
        reg: Reg::Ebx,
        bits: 1 << 20,
        name: "smap",
    },
    CpuidMask {
        leaf: 7,
        index: Some(0),
        reg: Reg::Ecx,
        bits: 1 << 3,
        name: "pku",
    },
    CpuidMask {
        leaf: 7,
        index: Some(0),
        reg: Reg::Ecx,
        bits: 1 << 22,
        name: "rdpid",
    },
];

/// Kernel command-line options added on kvm-pvm: the same features hidden
/// by name. One `clearcpuid=` rather than `nopku`/`noxsave`/`nofsgsbase`,
/// because Linux hands words it does not register as parameters to init as
/// arguments (`noxsave` is parsed without registration in 6.1, and `nopku`
/// exists only with CONFIG_X86_INTEL_MEMORY_PROTECTION_KEYS). `clearcpuid`
/// takes feature names since 5.19.
pub const CMDLINE_EXTRAS: &[&str] =
    &["clearcpuid=popcnt,cx16,rdrand,rdseed,rdpid,smap,smep,pku,xsave,fsgsbase"];

/// Added for Linux guests with more than one vCPU on kvm-pvm. Secondary CPUs
/// start (INIT/SIPI) in real mode at the trampoline, which kvm-pvm cannot
/// execute for a non-PVM guest kernel: the AP dies with an emulation failure
/// at 0xfff0. The guest still sees every vCPU (MP table), brings up CPU 0
/// only, and says so in `/sys/devices/system/cpu/present` vs `online`.
pub const SINGLE_CPU_BOOT: &str = "maxcpus=1";

/// What the VMM applies for the host it runs on.
#[derive(Debug, Clone, Default)]
pub struct HostQuirks {
    /// CPUID bits to hide.
    pub cpuid_masks: Vec<CpuidMask>,
    /// Extra kernel command-line options.
    pub cmdline_extras: Vec<String>,
    /// Secondary vCPUs of a Linux guest cannot be started.
    pub no_secondary_cpus: bool,
}

impl HostQuirks {
    /// The quirks for this host: the kvm-pvm set if it is a software KVM,
    /// nothing otherwise.
    pub fn detect() -> Self {
        if is_software_kvm() {
            Self::software_kvm()
        } else {
            Self::default()
        }
    }

    /// The kvm-pvm set.
    pub fn software_kvm() -> Self {
        HostQuirks {
            cpuid_masks: CPUID_MASKS.to_vec(),
            cmdline_extras: CMDLINE_EXTRAS.iter().map(|s| s.to_string()).collect(),
            no_secondary_cpus: true,
        }
    }

    /// Command-line options for a Linux guest with `vcpus` vCPUs, and a
    /// warning for the user when the host limits the guest.
    pub fn linux_cmdline_extras(&self, vcpus: u8) -> (Vec<String>, Option<String>) {
        let mut extras = self.cmdline_extras.clone();
        let mut warning = None;
        if self.no_secondary_cpus && vcpus > 1 {
            extras.push(SINGLE_CPU_BOOT.to_string());
            warning = Some(format!(
                "software KVM (kvm-pvm) cannot start secondary vCPUs of a Linux guest; \
                 the guest sees {vcpus} CPUs but runs on CPU 0 ({SINGLE_CPU_BOOT})"
            ));
        }
        (extras, warning)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_match_the_command_line() {
        let q = HostQuirks::software_kvm();
        let clear = &q.cmdline_extras[0];
        for m in &q.cpuid_masks {
            assert!(
                clear.split(&['=', ','][..]).any(|w| w == m.name),
                "{} not on the command line",
                m.name
            );
        }
        // No bare words: Linux would pass them to init as arguments.
        assert!(q.cmdline_extras.iter().all(|e| e.contains('=')));
        assert!(HostQuirks::default().cpuid_masks.is_empty());
    }

    #[test]
    fn smp_linux_guests_boot_one_cpu_on_pvm_only() {
        let q = HostQuirks::software_kvm();
        let (extras, warning) = q.linux_cmdline_extras(2);
        assert!(extras.iter().any(|e| e == "maxcpus=1"));
        assert!(warning.unwrap().contains("sees 2 CPUs"));
        let (extras, warning) = q.linux_cmdline_extras(1);
        assert!(!extras.iter().any(|e| e == "maxcpus=1") && warning.is_none());
        let (extras, warning) = HostQuirks::default().linux_cmdline_extras(4);
        assert!(extras.is_empty() && warning.is_none());
    }
}
