//! Intel MultiProcessor Specification 1.4 tables, so an SMP guest finds every
//! vCPU, the IOAPIC and the ISA interrupt routing.
//!
//! Layout at the EBDA: a 16-byte floating pointer, then the configuration table
//! (header, one processor entry per vCPU, the ISA bus, the IOAPIC, one
//! interrupt-source entry per IOAPIC pin, and the two local interrupts).

use super::layout::{APIC_START, EBDA_START, IOAPIC_START};
use super::regs::{write_slice, RegsError};
use vm_memory::GuestMemoryMmap;

/// Pins on KVM's in-kernel IOAPIC; GSI n is pin n.
pub const IOAPIC_PINS: u8 = 24;
/// The MP table numbers CPUs with a u8 APIC ID, and the IOAPIC takes one more.
pub const MAX_VCPUS: u32 = 254;

const MPC_SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
/// Family 6 stepping, as a signature.
const CPU_SIGNATURE: u32 = 0x600;
/// FPU and APIC present.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;

/// Errors building the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// More vCPUs than the table can describe.
    #[error("the MP table can describe at most {MAX_VCPUS} vCPUs, not {0}")]
    TooManyCpus(u8),
    /// Writing to guest memory failed.
    #[error(transparent)]
    Write(#[from] RegsError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// The configuration table bytes (without the floating pointer) for
/// `nr_vcpus`, to live at `table_addr`.
fn config_table(nr_vcpus: u8) -> Vec<u8> {
    let ioapic_id = nr_vcpus + 1;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..nr_vcpus {
        entries.push(0); // processor
        entries.push(cpu);
        entries.push(APIC_VERSION);
        entries.push(CPU_ENABLED | if cpu == 0 { CPU_BSP } else { 0 });
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]); // bus 0
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START.raw() as u32).to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS {
        // type, irqtype, irqflag(2), srcbus, srcbusirq, dstapic, dstirq
        entries.extend_from_slice(&[3, MP_INT, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    // LINT0 is ExtINT (the 8259), LINT1 is NMI, on every local APIC.
    entries.extend_from_slice(&[4, MP_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, MP_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let len = 44 + entries.len();
    let mut t = Vec::with_capacity(len);
    t.extend_from_slice(b"PCMP");
    t.extend_from_slice(&(len as u16).to_le_bytes());
    t.push(MPC_SPEC_REV);
    t.push(0); // checksum, below
    t.extend_from_slice(b"FOLIOVM ");
    t.extend_from_slice(b"000000000000");
    t.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    t.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    t.extend_from_slice(&count.to_le_bytes());
    t.extend_from_slice(&(APIC_START.raw() as u32).to_le_bytes());
    t.extend_from_slice(&0u32.to_le_bytes()); // extended table length, checksum
    t.extend_from_slice(&entries);
    t[7] = checksum(&t);
    t
}

/// The MP floating pointer structure pointing at `table_addr`.
fn floating_pointer(table_addr: u32) -> [u8; 16] {
    let mut f = [0u8; 16];
    f[0..4].copy_from_slice(b"_MP_");
    f[4..8].copy_from_slice(&table_addr.to_le_bytes());
    f[8] = 1; // length in 16-byte units
    f[9] = MPC_SPEC_REV;
    f[10] = checksum(&f);
    f
}

/// Write the MP tables for `nr_vcpus` at the EBDA.
///
/// # Errors
/// [`MptableError::TooManyCpus`] above [`MAX_VCPUS`]; [`MptableError::Write`]
/// if guest RAM does not cover the EBDA.
pub fn setup_mptable(mem: &GuestMemoryMmap, nr_vcpus: u8) -> Result<(), MptableError> {
    if u32::from(nr_vcpus) > MAX_VCPUS {
        return Err(MptableError::TooManyCpus(nr_vcpus));
    }
    let table_addr = EBDA_START.raw() + 16;
    write_slice(
        mem,
        &floating_pointer(table_addr as u32),
        EBDA_START.raw(),
        "MP floating pointer",
    )?;
    write_slice(
        mem,
        &config_table(nr_vcpus),
        table_addr,
        "MP configuration table",
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn tables_checksum_and_list_every_cpu() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        setup_mptable(&mem, 4).unwrap();
        let mut fp = [0u8; 16];
        mem.read_slice(&mut fp, GuestAddress(EBDA_START.raw()))
            .unwrap();
        assert_eq!(&fp[0..4], b"_MP_");
        assert_eq!(sum(&fp), 0);
        let table_addr = u32::from_le_bytes(fp[4..8].try_into().unwrap()) as u64;
        let mut hdr = [0u8; 44];
        mem.read_slice(&mut hdr, GuestAddress(table_addr)).unwrap();
        assert_eq!(&hdr[0..4], b"PCMP");
        let len = u16::from_le_bytes([hdr[4], hdr[5]]) as usize;
        let mut t = vec![0u8; len];
        mem.read_slice(&mut t, GuestAddress(table_addr)).unwrap();
        assert_eq!(sum(&t), 0);
        let count = u16::from_le_bytes([t[34], t[35]]);
        // Walk the entries: 4 processors, 1 bus, 1 IOAPIC, 24 intsrc, 2 lintsrc.
        let (mut off, mut cpus, mut bsps, mut n) = (44usize, 0, 0, 0u16);
        let mut ioapic_id = None;
        while off < len {
            let step = match t[off] {
                0 => {
                    cpus += 1;
                    assert_eq!(t[off + 1], cpus - 1, "APIC IDs are 0..n");
                    if t[off + 3] & CPU_BSP != 0 {
                        bsps += 1;
                    }
                    20
                }
                2 => {
                    ioapic_id = Some(t[off + 1]);
                    8
                }
                1 | 3 | 4 => 8,
                other => panic!("unknown entry type {other}"),
            };
            off += step;
            n += 1;
        }
        assert_eq!(off, len);
        assert_eq!((cpus, bsps, n, count), (4, 1, 32, 32));
        assert_eq!(ioapic_id, Some(5), "IOAPIC ID does not collide with a CPU");
    }

    #[test]
    fn too_many_cpus_is_an_error() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        assert!(matches!(
            setup_mptable(&mem, 255),
            Err(MptableError::TooManyCpus(255))
        ));
        assert!(setup_mptable(&mem, 254).is_ok());
    }
}
