//! Segment descriptors, identity page tables and the register state used to
//! enter a guest directly in 64-bit mode.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use mem::GuestAddress;
use vm_memory::{Bytes, GuestMemoryMmap};

/// Errors writing boot structures into guest memory.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A boot structure does not fit in guest RAM.
    #[error("cannot write {what} at guest address {addr:#x}")]
    Write {
        /// What was being written.
        what: &'static str,
        /// Where.
        addr: u64,
        /// vm-memory's error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

pub(crate) fn write_obj<T: vm_memory::ByteValued>(
    mem: &GuestMemoryMmap,
    val: T,
    addr: u64,
    what: &'static str,
) -> Result<(), RegsError> {
    mem.write_obj(val, vm_memory::GuestAddress(addr))
        .map_err(|source| RegsError::Write { what, addr, source })
}

pub(crate) fn write_slice(
    mem: &GuestMemoryMmap,
    buf: &[u8],
    addr: u64,
    what: &'static str,
) -> Result<(), RegsError> {
    mem.write_slice(buf, vm_memory::GuestAddress(addr))
        .map_err(|source| RegsError::Write { what, addr, source })
}

/// CR0 protection enable.
pub const X86_CR0_PE: u64 = 1 << 0;
/// CR0 extension type (always 1 on modern CPUs).
pub const X86_CR0_ET: u64 = 1 << 4;
/// CR0 paging.
pub const X86_CR0_PG: u64 = 1 << 31;
/// CR4 physical address extension.
pub const X86_CR4_PAE: u64 = 1 << 5;
/// CR4 OS supports FXSAVE/FXRSTOR.
pub const X86_CR4_OSFXSR: u64 = 1 << 9;
/// CR4 OS supports unmasked SIMD exceptions.
pub const X86_CR4_OSXMMEXCPT: u64 = 1 << 10;
/// EFER long mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// EFER long mode active.
pub const EFER_LMA: u64 = 1 << 10;

/// Build a GDT entry from flags (the high nibble of byte 6 and access byte,
/// as `0xGFAA`: G/DB/L/AVL nibble, then access byte), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Decode a GDT entry into the segment KVM wants, for selector index `index`
/// with requested privilege level `rpl`.
pub fn segment_from_gdt(entry: u64, index: u16, rpl: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit_raw = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        // KVM wants the byte-granular limit.
        limit: if g == 1 {
            (limit_raw << 12) | 0xfff
        } else {
            limit_raw
        },
        selector: (index * 8) | rpl,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(((entry >> 47) & 1) == 0),
    }
}

/// Page-table entry bits.
pub const PTE_PRESENT: u64 = 1 << 0;
/// Writable.
pub const PTE_RW: u64 = 1 << 1;
/// User accessible.
pub const PTE_USER: u64 = 1 << 2;
/// Page size (a 2 MiB leaf in a PD).
pub const PTE_PS: u64 = 1 << 7;

/// Write identity page tables at `pml4` mapping `[0, map_bytes)` with 2 MiB
/// pages. `user` sets the U/S bit everywhere (the workload guest runs at CPL3).
/// Uses one PDPT page after the PML4, then one PD page per GiB.
/// Returns the guest address just past the tables.
///
/// # Errors
/// [`RegsError::Write`] if the tables fall outside guest RAM.
pub fn write_identity_page_tables(
    mem: &GuestMemoryMmap,
    pml4: GuestAddress,
    map_bytes: u64,
    user: bool,
) -> Result<GuestAddress, RegsError> {
    let flags = PTE_PRESENT | PTE_RW | if user { PTE_USER } else { 0 };
    let pdpt = pml4.raw() + 0x1000;
    let pd_base = pdpt + 0x1000;
    let gibs = map_bytes.div_ceil(1 << 30).clamp(1, 512);
    write_obj(mem, pdpt | flags, pml4.raw(), "PML4")?;
    for g in 0..gibs {
        let pd = pd_base + g * 0x1000;
        write_obj(mem, pd | flags, pdpt + g * 8, "PDPT")?;
        let mut table = [0u8; 4096];
        for (i, e) in table.chunks_exact_mut(8).enumerate() {
            let addr = (g << 30) | ((i as u64) << 21);
            e.copy_from_slice(&(addr | flags | PTE_PS).to_le_bytes());
        }
        write_slice(mem, &table, pd, "page directory")?;
    }
    Ok(GuestAddress(pd_base + gibs * 0x1000))
}

/// Control registers and EFER for 64-bit mode with paging rooted at `pml4`.
pub fn set_long_mode(sregs: &mut kvm_sregs, pml4: GuestAddress) {
    sregs.cr3 = pml4.raw();
    sregs.cr4 |= X86_CR4_PAE | X86_CR4_OSFXSR | X86_CR4_OSXMMEXCPT;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
}

/// The FPU state Linux expects at entry: default control word and MXCSR.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// General registers for the Linux 64-bit boot protocol: entry point, stack,
/// and `rsi` pointing at boot_params.
pub fn linux_boot_regs(entry: GuestAddress) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry.raw(),
        rsp: super::layout::BOOT_STACK_POINTER.raw(),
        rbp: super::layout::BOOT_STACK_POINTER.raw(),
        rsi: super::layout::ZERO_PAGE_START.raw(),
        ..Default::default()
    }
}

/// Write the boot GDT (null, code64, data, TSS) and an empty IDT, and point
/// `sregs` at them with flat kernel segments: the Linux 64-bit entry state.
///
/// # Errors
/// [`RegsError::Write`] if guest RAM is too small for them.
pub fn setup_linux_segments(mem: &GuestMemoryMmap, sregs: &mut kvm_sregs) -> Result<(), RegsError> {
    use super::layout::{BOOT_GDT_START, BOOT_IDT_START};
    let gdt: [u64; 4] = [
        gdt_entry(0, 0, 0),
        gdt_entry(0xa09b, 0, 0xfffff), // code64, DPL0
        gdt_entry(0xc093, 0, 0xfffff), // data, DPL0
        gdt_entry(0x808b, 0, 0xfffff), // TSS
    ];
    for (i, e) in gdt.iter().enumerate() {
        write_obj(mem, *e, BOOT_GDT_START.raw() + i as u64 * 8, "GDT")?;
    }
    write_obj(mem, 0u64, BOOT_IDT_START.raw(), "IDT")?;
    sregs.gdt.base = BOOT_GDT_START.raw();
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START.raw();
    sregs.idt.limit = 7;
    let code = segment_from_gdt(gdt[1], 1, 0);
    let data = segment_from_gdt(gdt[2], 2, 0);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[3], 3, 0);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress as VmAddr;

    #[test]
    fn gdt_encoding_round_trips() {
        let code = gdt_entry(0xa09b, 0, 0xfffff);
        assert_eq!(code, 0x00af_9b00_0000_ffff);
        let s = segment_from_gdt(code, 1, 0);
        assert_eq!(
            (s.selector, s.type_, s.l, s.db, s.dpl, s.present, s.s, s.g),
            (8, 0xb, 1, 0, 0, 1, 1, 1)
        );
        assert_eq!(s.limit, 0xffff_ffff);
        let user_data = gdt_entry(0xc0f3, 0, 0xfffff);
        let s = segment_from_gdt(user_data, 4, 3);
        assert_eq!((s.selector, s.dpl, s.type_, s.db), (0x23, 3, 3, 1));
        let tss = gdt_entry(0x0089, 0x1234_5678, 0x67);
        let s = segment_from_gdt(tss, 6, 0);
        assert_eq!((s.base, s.limit, s.type_, s.g), (0x1234_5678, 0x67, 9, 0));
    }

    #[test]
    fn identity_tables_map_every_2m_page() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(VmAddr(0), 4 << 20)]).unwrap();
        let end = write_identity_page_tables(&mem, GuestAddress(0x9000), 3 << 30, true).unwrap();
        assert_eq!(end.raw(), 0x9000 + 0x2000 + 3 * 0x1000);
        let pml4e: u64 = mem.read_obj(VmAddr(0x9000)).unwrap();
        assert_eq!(pml4e, 0xa000 | PTE_PRESENT | PTE_RW | PTE_USER);
        // Walk a few addresses through the tables.
        for gpa in [0u64, 0x20_0000, 0x4000_1234, (3 << 30) - 1] {
            let pdpte: u64 = mem.read_obj(VmAddr(0xa000 + (gpa >> 30) * 8)).unwrap();
            let pd = pdpte & !0xfff;
            let pde: u64 = mem.read_obj(VmAddr(pd + ((gpa >> 21) & 511) * 8)).unwrap();
            assert_ne!(pde & PTE_PS, 0);
            assert_eq!((pde & !0x1f_ffff & !(1u64 << 63)) | (gpa & 0x1f_ffff), gpa);
        }
        let kernel_only = GuestMemoryMmap::<()>::from_ranges(&[(VmAddr(0), 4 << 20)]).unwrap();
        write_identity_page_tables(&kernel_only, GuestAddress(0x9000), 1 << 30, false).unwrap();
        let pde: u64 = kernel_only.read_obj(VmAddr(0xb000)).unwrap();
        assert_eq!(pde & PTE_USER, 0);
    }
}
