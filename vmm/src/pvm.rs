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

/// Kernel command-line options added on kvm-pvm.
pub const CMDLINE_EXTRAS: &[&str] = &[
    "clearcpuid=popcnt,cx16,rdrand,rdseed,rdpid,smap,smep",
    "nofsgsbase",
    "nopku",
    "noxsave",
];

/// What the VMM applies for the host it runs on.
#[derive(Debug, Clone, Default)]
pub struct HostQuirks {
    /// CPUID bits to hide.
    pub cpuid_masks: Vec<CpuidMask>,
    /// Extra kernel command-line options.
    pub cmdline_extras: Vec<String>,
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_match_the_command_line() {
        let q = HostQuirks::software_kvm();
        let clear = &q.cmdline_extras[0];
        for name in [
            "popcnt", "cx16", "rdrand", "rdseed", "rdpid", "smap", "smep",
        ] {
            assert!(clear.contains(name), "{name}");
            assert!(q.cpuid_masks.iter().any(|m| m.name == name), "{name}");
        }
        assert!(HostQuirks::default().cpuid_masks.is_empty());
    }
}
