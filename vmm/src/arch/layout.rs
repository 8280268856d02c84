//! Guest-physical memory layout for x86_64.
//!
//! ```text
//!  0x0000_0500  GDT (boot)                 0x0000_7000  boot_params (zero page)
//!  0x0000_8ff0  boot stack                 0x0000_9000  PML4, 0xa000 PDPT, 0xb000.. PDs
//!  0x0002_0000  kernel command line        0x0009_fc00  EBDA: MP table
//!  0x0010_0000  HIMEM_START: kernel        .. top of low RAM: initrd (highest fit)
//!  0xd000_0000  MMIO_GAP_START (768 MiB gap: device MMIO, no RAM)
//!  0x1_0000_0000  RAM above 4 GiB when the guest has more than 3.25 GiB
//! ```

use mem::GuestAddress;

/// Boot GDT.
pub const BOOT_GDT_START: GuestAddress = GuestAddress(0x500);
/// Boot IDT (empty; the kernel installs its own).
pub const BOOT_IDT_START: GuestAddress = GuestAddress(0x520);
/// Linux boot_params ("zero page").
pub const ZERO_PAGE_START: GuestAddress = GuestAddress(0x7000);
/// Initial stack pointer for the boot vCPU.
pub const BOOT_STACK_POINTER: GuestAddress = GuestAddress(0x8ff0);
/// Identity page tables used to enter 64-bit mode.
pub const PML4_START: GuestAddress = GuestAddress(0x9000);
/// Kernel command line.
pub const CMDLINE_START: GuestAddress = GuestAddress(0x20000);
/// Largest command line the x86 boot protocol accepts (COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area; the MP table goes here.
pub const EBDA_START: GuestAddress = GuestAddress(0x9fc00);
/// Where the kernel is loaded.
pub const HIMEM_START: GuestAddress = GuestAddress(0x10_0000);
/// Start of the 32-bit MMIO gap.
pub const MMIO_GAP_START: GuestAddress = GuestAddress(0xd000_0000);
/// End of the 32-bit MMIO gap (4 GiB).
pub const MMIO_GAP_END: GuestAddress = GuestAddress(1 << 32);
/// IOAPIC base (inside the gap).
pub const IOAPIC_START: GuestAddress = GuestAddress(0xfec0_0000);
/// Local APIC base (inside the gap).
pub const APIC_START: GuestAddress = GuestAddress(0xfee0_0000);
/// KVM's TSS (three pages) for VMX real-mode emulation, inside the gap.
pub const KVM_TSS_START: GuestAddress = GuestAddress(0xfffb_d000);
/// First MMIO device window, for devices foliovm emulates.
pub const MMIO_DEVICES_START: GuestAddress = GuestAddress(0xd000_0000);

/// Guest RAM regions for `mem_bytes` of RAM: one region below the MMIO gap
/// and, if needed, one from 4 GiB up.
pub fn ram_regions(mem_bytes: u64) -> Vec<(GuestAddress, u64)> {
    let low = MMIO_GAP_START.raw();
    if mem_bytes <= low {
        vec![(GuestAddress(0), mem_bytes)]
    } else {
        vec![(GuestAddress(0), low), (MMIO_GAP_END, mem_bytes - low)]
    }
}

/// End of RAM below the gap (exclusive).
pub fn low_ram_end(mem_bytes: u64) -> GuestAddress {
    GuestAddress(mem_bytes.min(MMIO_GAP_START.raw()))
}

/// e820 entry types.
pub const E820_RAM: u32 = 1;
/// Reserved memory.
pub const E820_RESERVED: u32 = 2;

/// One e820 map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The e820 map the guest sees: base memory up to the EBDA, the EBDA and BIOS
/// area reserved, RAM from 1 MiB to the gap, and RAM above 4 GiB.
pub fn e820_map(mem_bytes: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START.raw(),
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START.raw(),
            size: HIMEM_START.raw() - EBDA_START.raw(),
            kind: E820_RESERVED,
        },
    ];
    for (base, size) in ram_regions(mem_bytes) {
        let start = base.raw().max(HIMEM_START.raw());
        let end = base.raw() + size;
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_region() {
        assert_eq!(ram_regions(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
        assert_eq!(low_ram_end(512 << 20), GuestAddress(512 << 20));
    }

    #[test]
    fn large_guest_is_split_around_the_gap() {
        let r = ram_regions(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), 0xd000_0000));
        assert_eq!(r[1], (GuestAddress(1 << 32), (4 << 30) - 0xd000_0000));
        assert_eq!(r[0].1 + r[1].1, 4 << 30);
        assert_eq!(low_ram_end(4 << 30), MMIO_GAP_START);
    }

    #[test]
    fn e820_covers_ram_and_reserves_bios_area() {
        let m = e820_map(256 << 20);
        assert_eq!(m.len(), 3);
        assert_eq!((m[0].addr, m[0].size, m[0].kind), (0, 0x9fc00, E820_RAM));
        assert_eq!(m[1].kind, E820_RESERVED);
        assert_eq!(m[1].addr + m[1].size, 0x10_0000);
        assert_eq!((m[2].addr, m[2].addr + m[2].size), (0x10_0000, 256 << 20));
        let ram: u64 = m
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (256 << 20) - (0x10_0000 - 0x9fc00));

        let big = e820_map(6 << 30);
        assert_eq!(big.len(), 4);
        assert_eq!(big[2].addr + big[2].size, 0xd000_0000);
        assert_eq!(big[3].addr, 1 << 32);
        assert_eq!(big[3].size, (6 << 30) - 0xd000_0000);
        // Entries are sorted and never overlap.
        for w in big.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr);
        }
    }
}
