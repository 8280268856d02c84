//! x86_64 guest setup: layout, boot protocol, CPUID, MSRs, MP table, registers.

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
