//! Per-vCPU CPUID built from `KVM_GET_SUPPORTED_CPUID`.
//!
//! foliovm passes through what KVM supports, then sets the topology (APIC ID,
//! logical processor counts), the hypervisor bit, and clears the feature bits
//! in [`CpuidMask`]s (the software-KVM masks live in `crate::pvm`).

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// A CPUID register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    /// EAX
    Eax,
    /// EBX
    Ebx,
    /// ECX
    Ecx,
    /// EDX
    Edx,
}

/// Feature bits to hide: in `leaf` (any subleaf index `index`, or all when
/// `None`), clear `bits` of `reg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuidMask {
    /// Leaf (EAX input).
    pub leaf: u32,
    /// Subleaf (ECX input), or all subleaves.
    pub index: Option<u32>,
    /// Register.
    pub reg: Reg,
    /// Bits to clear.
    pub bits: u32,
    /// Name, for logs.
    pub name: &'static str,
}

fn reg_mut(e: &mut kvm_cpuid_entry2, r: Reg) -> &mut u32 {
    match r {
        Reg::Eax => &mut e.eax,
        Reg::Ebx => &mut e.ebx,
        Reg::Ecx => &mut e.ecx,
        Reg::Edx => &mut e.edx,
    }
}

/// Leaf 1 ECX: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: hyper-threading / multi-core package.
const LEAF1_EDX_HTT: u32 = 1 << 28;

/// Build the CPUID for vCPU `apic_id` out of `nr_vcpus`, from KVM's supported
/// table, hiding `masks`.
pub fn vcpu_cpuid(supported: &CpuId, apic_id: u8, nr_vcpus: u8, masks: &[CpuidMask]) -> CpuId {
    let mut cpuid = supported.clone();
    // Bits needed to number every vCPU in the core level of leaf 0xB.
    let core_shift = u32::from(nr_vcpus).next_power_of_two().trailing_zeros();
    for e in cpuid.as_mut_slice().iter_mut() {
        match e.function {
            1 => {
                e.ebx = (u32::from(apic_id) << 24) | (u32::from(nr_vcpus) << 16) | (8 << 8);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if nr_vcpus > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            4 => {
                // Cores per package minus one, in EAX[31:26].
                let cores = u32::from(nr_vcpus).min(64) - 1;
                e.eax = (e.eax & 0x03ff_ffff) | (cores << 26);
            }
            0xb | 0x1f => {
                e.edx = u32::from(apic_id);
                match e.index {
                    0 => {
                        // SMT level: one thread per core.
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        // Core level: all vCPUs.
                        e.eax = core_shift;
                        e.ebx = u32::from(nr_vcpus);
                        e.ecx = (2 << 8) | 1;
                    }
                    i => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = i;
                    }
                }
            }
            _ => {}
        }
        for m in masks {
            if m.leaf == e.function && m.index.is_none_or(|i| i == e.index) {
                *reg_mut(e, m.reg) &= !m.bits;
            }
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn supported() -> CpuId {
        CpuId::from_entries(&[
            entry(0, 0, 0x1f, 0, 0, 0),
            entry(1, 0, 0x806f8, 0xff00_0000, (1 << 13) | (1 << 23), 1 << 28),
            entry(4, 0, 0xfc00_4121, 0, 0, 0),
            entry(7, 0, 0, (1 << 7) | (1 << 20) | 1, 1 << 22, 0),
            entry(0xb, 0, 1, 2, 0x100, 9),
            entry(0xb, 1, 4, 8, 0x201, 9),
            entry(0xb, 2, 0, 0, 2, 9),
        ])
        .unwrap()
    }

    fn find(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn topology_describes_every_vcpu() {
        let c = vcpu_cpuid(&supported(), 3, 4, &[]);
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 3, "APIC ID");
        assert_eq!((l1.ebx >> 16) & 0xff, 4, "logical processors");
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
        assert_eq!(find(&c, 4, 0).eax >> 26, 3);
        let smt = find(&c, 0xb, 0);
        let core = find(&c, 0xb, 1);
        assert_eq!((smt.ebx, smt.edx), (1, 3));
        assert_eq!((core.eax, core.ebx, core.ecx >> 8, core.edx), (2, 4, 2, 3));
        assert_eq!(find(&c, 0xb, 2).ebx, 0);
        // Unrelated leaves are passed through.
        assert_eq!(find(&c, 0, 0).eax, 0x1f);
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let c = vcpu_cpuid(&supported(), 0, 1, &[]);
        assert_eq!(find(&c, 1, 0).edx & LEAF1_EDX_HTT, 0);
        assert_eq!(find(&c, 4, 0).eax >> 26, 0);
    }

    #[test]
    fn masks_clear_only_their_bits() {
        let masks = [
            CpuidMask {
                leaf: 1,
                index: None,
                reg: Reg::Ecx,
                bits: 1 << 13,
                name: "cx16",
            },
            CpuidMask {
                leaf: 7,
                index: Some(0),
                reg: Reg::Ebx,
                bits: 1 << 20,
                name: "smap",
            },
        ];
        let c = vcpu_cpuid(&supported(), 0, 2, &masks);
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.ecx & (1 << 13), 0);
        assert_ne!(l1.ecx & (1 << 23), 0, "popcnt untouched");
        let l7 = find(&c, 7, 0);
        assert_eq!(l7.ebx, (1 << 7) | 1);
        assert_eq!(l7.ecx, 1 << 22);
    }
}
