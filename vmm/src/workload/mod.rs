//! The built-in workload guest: a tiny CPL3 program that writes, reads and
//! verifies guest memory in patterns, one thread per vCPU, and reports through
//! an MMIO page. It measures the VMM and memory manager rather than the
//! emulator (guest CPL3 runs natively even on a software KVM).
//!
//! Guest-physical layout:
//! ```text
//! 0x0000_1000  GDT: null, kcode64, kdata, -, udata(DPL3), ucode64(DPL3), TSS
//! 0x0000_1100  one 128-byte TSS per vCPU (RSP0 -> its exception stack)
//! 0x0001_0000  identity page tables, 2 MiB pages, U bit set
//! 0x0006_0000  IDT; 0x61000 one 16-byte CPL0 stub per vector
//! 0x0007_0000  256-byte parameter block per vCPU
//! 0x0008_0000  512-byte exception stack per vCPU
//! 0x0010_0000  the program ([`guest::code`])
//! 0x0011_0000  2 KiB user stack per vCPU
//! 0x0019_0000  zipf bucket table
//! 0x0020_0000  epoch table: u32 per data page, rounded up to 2 MiB
//! data_base    the pattern's range, 2 MiB aligned
//! 0xd000_0000  MMIO result page (unbacked)
//! ```

pub mod guest;
pub mod spec;

use crate::arch::layout::MMIO_DEVICES_START;
use crate::arch::regs::{self, gdt_entry, segment_from_gdt, write_obj, write_slice, RegsError};
use kvm_bindings::{kvm_regs, kvm_sregs};
use mem::GuestAddress;
pub use spec::{Pattern, SpecError, WorkloadSpec};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use vm_memory::GuestMemoryMmap;

const GDT: u64 = 0x1000;
const TSS_BASE: u64 = 0x1100;
const TSS_SIZE: u64 = 128;
const PML4: u64 = 0x1_0000;
const IDT: u64 = 0x6_0000;
const STUBS: u64 = 0x6_1000;
const PARAMS_BASE: u64 = 0x7_0000;
const PARAMS_SIZE: u64 = 256;
const KSTACKS: u64 = 0x8_0000;
const KSTACK_SIZE: u64 = 512;
const CODE: u64 = 0x10_0000;
const USTACKS: u64 = 0x11_0000;
const USTACK_SIZE: u64 = 2048;
const ZIPF_TABLE: u64 = 0x19_0000;
/// log2 of the number of zipf buckets.
const ZIPF_BUCKET_BITS: u32 = 12;
const EPOCH_TABLE: u64 = 0x20_0000;
const HUGE: u64 = 2 << 20;
/// Most vCPUs the fixed layout has room for.
pub const MAX_VCPUS: u8 = 254;

/// The result page, in the MMIO gap.
pub const RESULT_MMIO: GuestAddress = MMIO_DEVICES_START;
/// Result page size.
pub const RESULT_MMIO_SIZE: u64 = 0x1000;
const REG_OPS: u64 = 0x00;
const REG_MISMATCHES: u64 = 0x08;
const REG_FIRST_BAD_ADDR: u64 = 0x10;
const REG_FIRST_BAD_VALUE: u64 = 0x18;
const REG_VERIFIED: u64 = 0x20;
const REG_TSC: u64 = 0x28;
const REG_DONE: u64 = 0x30;
const REG_TSC_MAIN: u64 = 0x38;
const REG_EXCEPTION: u64 = 0x80;

const SEL_KCODE: u16 = 1;
const SEL_UDATA: u16 = 4;
const SEL_UCODE: u16 = 5;
const SEL_TSS: u16 = 6;

/// Errors setting up the workload guest.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// Guest memory too small for the range.
    #[error("workload range of {size} MiB needs at least {need} MiB of guest memory (--mem or mem_size_mib), the VM has {}", crate::config::show_size(*have))]
    TooSmall {
        /// Range in MiB.
        size: u64,
        /// Needed MiB.
        need: u64,
        /// The VM's memory in bytes.
        have: u64,
    },
    /// The range would cross the 32-bit MMIO gap.
    #[error("workload range must end below {:#x} (the MMIO gap); use a smaller range", MMIO_DEVICES_START.raw())]
    CrossesGap,
    /// Too many vCPUs for the layout, or fewer pages than vCPUs.
    #[error("workload needs 1..={MAX_VCPUS} vCPUs and at least one page per vCPU")]
    Vcpus,
    /// Writing the guest image failed.
    #[error(transparent)]
    Write(#[from] RegsError),
}

/// Where things are for one workload run.
#[derive(Debug, Clone)]
pub struct WorkloadLayout {
    /// First data page.
    pub data_base: u64,
    /// Data pages in all.
    pub pages: u64,
    /// Pages per vCPU slice: vCPU i owns `[starts[i], starts[i+1])`.
    pub starts: Vec<u64>,
}

impl WorkloadLayout {
    /// Plan the layout of `spec` for `vcpus` in `mem_bytes`.
    ///
    /// # Errors
    /// [`WorkloadError::TooSmall`], [`WorkloadError::CrossesGap`] or [`WorkloadError::Vcpus`].
    pub fn plan(spec: &WorkloadSpec, vcpus: u8, mem_bytes: u64) -> Result<Self, WorkloadError> {
        let pages = spec.size / 4096;
        if vcpus == 0 || vcpus > MAX_VCPUS || pages < u64::from(vcpus) {
            return Err(WorkloadError::Vcpus);
        }
        let data_base = Self::data_base(spec);
        let end = Self::min_mem(spec)?;
        if end > mem_bytes {
            return Err(WorkloadError::TooSmall {
                size: spec.size >> 20,
                need: end.div_ceil(1 << 20),
                have: mem_bytes,
            });
        }
        let v = u64::from(vcpus);
        let starts = (0..=v).map(|i| i * pages / v).collect();
        Ok(WorkloadLayout {
            data_base,
            pages,
            starts,
        })
    }

    /// Guest memory needed for `spec` (so the CLI can default `--mem`).
    ///
    /// # Errors
    /// [`WorkloadError::CrossesGap`] if no guest memory holds the range
    /// below the MMIO gap.
    pub fn min_mem(spec: &WorkloadSpec) -> Result<u64, WorkloadError> {
        // A range of exabytes wrapped this sum past 2^64 to a small end
        // (`seq:17163108338G` ended at 0x7f400000), and the guest ran off
        // its RAM with a #GP.
        Self::data_base(spec)
            .checked_add(spec.size)
            .filter(|&end| end <= MMIO_DEVICES_START.raw())
            .ok_or(WorkloadError::CrossesGap)
    }

    /// First data page: above the epoch table (4 bytes per page), on a
    /// 2 MiB boundary.
    fn data_base(spec: &WorkloadSpec) -> u64 {
        EPOCH_TABLE + (spec.size / 4096 * 4).next_multiple_of(HUGE)
    }
}

/// Zipf bucket table: `2^bits + 1` entries; entry `b` is the rank that
/// holds quantile `b / 2^bits` of the distribution `P(r) ∝ (r+1)^-theta` over
/// ranks `0..n`. The guest picks bucket `b` uniformly, then a rank uniformly in
/// `[table[b], table[b+1]]` (inclusive): a bucket inside one hot rank is that
/// rank, and a bucket spanning a cold tail spreads over it.
pub fn zipf_table(n: u64, theta: f64, bits: u32) -> Vec<u32> {
    let k = 1usize << bits;
    let weights: Vec<f64> = (1..=n).map(|r| (r as f64).powf(-theta)).collect();
    let total: f64 = weights.iter().sum();
    let mut table = Vec::with_capacity(k + 1);
    let (mut rank, mut cum) = (0u64, 0.0f64);
    for b in 0..=k {
        let target = total * b as f64 / k as f64;
        while rank + 1 < n && cum + weights[rank as usize] <= target {
            cum += weights[rank as usize];
            rank += 1;
        }
        table.push(rank as u32);
    }
    table
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// A multiplier below `n` and coprime with it, so `rank * m mod n` is a
/// permutation that scatters hot ranks across the range.
pub fn scatter_multiplier(n: u64) -> u64 {
    if n <= 2 {
        return 1;
    }
    let mut m = ((n as f64 * 0.618_033_988_7) as u64).max(1);
    while gcd(m, n) != 1 {
        m += 1;
    }
    m % n
}

/// Write the workload guest into guest memory and return each vCPU's
/// registers.
///
/// # Errors
/// [`WorkloadError::Write`] if a structure falls outside guest memory.
pub fn load(
    mem: &GuestMemoryMmap,
    spec: &WorkloadSpec,
    layout: &WorkloadLayout,
    vcpus: u8,
    map_bytes: u64,
    base_sregs: kvm_sregs,
) -> Result<Vec<(kvm_regs, kvm_sregs)>, WorkloadError> {
    let gdt: [u64; 8] = [
        0,
        gdt_entry(0xa09b, 0, 0xfffff), // kernel code64
        gdt_entry(0xc093, 0, 0xfffff), // kernel data
        0,
        gdt_entry(0xc0f3, 0, 0xfffff),            // user data, DPL3
        gdt_entry(0xa0fb, 0, 0xfffff),            // user code64, DPL3
        gdt_entry(0x008b, TSS_BASE as u32, 0x67), // busy 64-bit TSS (low half)
        0,                                        // TSS high half: base[63:32] = 0
    ];
    for (i, e) in gdt.iter().enumerate() {
        write_obj(mem, *e, GDT + i as u64 * 8, "workload GDT")?;
    }
    regs::write_identity_page_tables(mem, GuestAddress(PML4), map_bytes, true)?;
    write_idt(mem)?;
    write_slice(mem, guest::code(), CODE, "workload code")?;

    let slice_pages = layout.starts[1] - layout.starts[0];
    let (zipf_shift, mult) = match spec.pattern {
        Pattern::Zipf { theta } => {
            let t = zipf_table(slice_pages, theta, ZIPF_BUCKET_BITS);
            let bytes: Vec<u8> = t.iter().flat_map(|v| v.to_le_bytes()).collect();
            write_slice(mem, &bytes, ZIPF_TABLE, "zipf table")?;
            (
                u64::from(64 - ZIPF_BUCKET_BITS),
                scatter_multiplier(slice_pages),
            )
        }
        _ => (0, 1),
    };
    let mut out = Vec::new();
    for i in 0..u64::from(vcpus) {
        let (first, last) = (layout.starts[i as usize], layout.starts[i as usize + 1]);
        let npages = last - first;
        let count = spec.count.unwrap_or(match spec.pattern {
            Pattern::Sequential => 2,
            _ => 2 * npages,
        });
        let params: [u64; 10] = [
            spec.pattern.code(),
            layout.data_base + first * 4096,
            npages,
            EPOCH_TABLE + first * 4,
            count,
            // xorshift state must be non-zero; differ per vCPU.
            (spec.seed ^ (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1,
            ZIPF_TABLE,
            zipf_shift,
            RESULT_MMIO.raw(),
            mult,
        ];
        let p = PARAMS_BASE + i * PARAMS_SIZE;
        let mut block = [0u8; PARAMS_SIZE as usize];
        for (j, v) in params.iter().enumerate() {
            block[j * 8..j * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        write_slice(mem, &block, p, "workload parameters")?;
        // TSS: RSP0 at offset 4, I/O map base past the limit.
        let tss = TSS_BASE + i * TSS_SIZE;
        write_obj(mem, exception_stack_top(i as usize), tss + 4, "TSS")?;
        write_obj(mem, 104u16, tss + 0x66, "TSS")?;
        let mut sregs = user_sregs(base_sregs, &gdt, tss);
        if spec.pattern == (Pattern::Crash { triple: true }) {
            // No IDT: the #UD cannot be delivered, nor the #DF it becomes.
            sregs.idt.limit = 0;
        }
        out.push((user_regs(p, i), sregs));
    }
    Ok(out)
}

/// Top of vCPU `index`'s exception stack (TSS RSP0); the interrupt frame's
/// RIP is the word 40 bytes below it.
pub fn exception_stack_top(index: usize) -> u64 {
    KSTACKS + (index as u64 + 1) * KSTACK_SIZE
}

fn write_idt(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    let report = RESULT_MMIO.raw() + REG_EXCEPTION;
    let mut idt = vec![0u8; 4096];
    let mut stubs = vec![0u8; 4096];
    for v in 0..256u64 {
        // mov eax, v ; mov [report], eax ; jmp $
        let s = &mut stubs[v as usize * 16..v as usize * 16 + 16];
        s[0] = 0xb8;
        s[1..5].copy_from_slice(&(v as u32).to_le_bytes());
        s[5] = 0xa3;
        s[6..14].copy_from_slice(&report.to_le_bytes());
        s[14..16].copy_from_slice(&[0xeb, 0xfe]);
        let handler = STUBS + v * 16;
        let g = &mut idt[v as usize * 16..v as usize * 16 + 16];
        g[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
        g[2..4].copy_from_slice(&(SEL_KCODE * 8).to_le_bytes());
        g[4] = 0; // IST
        g[5] = 0x8e; // present, DPL0, 64-bit interrupt gate
        g[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
        g[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
    }
    write_slice(mem, &idt, IDT, "workload IDT")?;
    write_slice(mem, &stubs, STUBS, "workload exception stubs")
}

fn user_regs(params: u64, i: u64) -> kvm_regs {
    kvm_regs {
        rip: CODE,
        rsp: USTACKS + (i + 1) * USTACK_SIZE,
        rdi: params,
        // Interrupts off: nothing but exceptions can enter the guest kernel.
        rflags: 0x2,
        ..Default::default()
    }
}

fn user_sregs(base: kvm_sregs, gdt: &[u64; 8], tss: u64) -> kvm_sregs {
    let mut s = base;
    regs::set_long_mode(&mut s, GuestAddress(PML4));
    s.gdt.base = GDT;
    s.gdt.limit = (gdt.len() * 8 - 1) as u16;
    s.idt.base = IDT;
    s.idt.limit = 4095;
    let data = segment_from_gdt(gdt[SEL_UDATA as usize], SEL_UDATA, 3);
    s.cs = segment_from_gdt(gdt[SEL_UCODE as usize], SEL_UCODE, 3);
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    let mut tr = segment_from_gdt(gdt[SEL_TSS as usize], SEL_TSS, 0);
    // Each vCPU's hidden TR base points at its own TSS; nothing reloads TR.
    tr.base = tss;
    s.tr = tr;
    s
}

/// One vCPU's report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VcpuReport {
    /// Page touches.
    pub ops: u64,
    /// Pages whose content did not verify.
    pub mismatches: u64,
    /// Address of the first bad word, if any.
    pub first_bad_addr: u64,
    /// What it held.
    pub first_bad_value: u64,
    /// Pages verified.
    pub verified: u64,
    /// Guest TSC ticks from start to end.
    pub tsc: u64,
    /// Guest TSC ticks of the pattern itself, before the final sweep.
    pub tsc_main: u64,
    /// The guest finished.
    pub done: bool,
}

/// What a result-page write means for the vCPU that made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportEvent {
    /// Keep running.
    Continue,
    /// This vCPU finished; `all` is true when it was the last one.
    Done {
        /// Every vCPU has finished.
        all: bool,
    },
    /// The guest took an exception.
    Exception(u8),
}

/// Collects the result page writes of every vCPU.
#[derive(Debug)]
pub struct WorkloadReport {
    vcpus: Mutex<Vec<VcpuReport>>,
    remaining: AtomicUsize,
}

impl WorkloadReport {
    /// A collector for `n` vCPUs.
    pub fn new(n: usize) -> Self {
        WorkloadReport {
            vcpus: Mutex::new(vec![VcpuReport::default(); n]),
            remaining: AtomicUsize::new(n),
        }
    }

    /// Record vCPU `vcpu` writing `value` at `offset` of the result page.
    pub fn write(&self, vcpu: usize, offset: u64, value: u64) -> ReportEvent {
        let mut all = self.vcpus.lock().unwrap_or_else(|p| p.into_inner());
        let Some(r) = all.get_mut(vcpu) else {
            return ReportEvent::Continue;
        };
        match offset {
            REG_OPS => r.ops = value,
            REG_MISMATCHES => r.mismatches = value,
            REG_FIRST_BAD_ADDR => r.first_bad_addr = value,
            REG_FIRST_BAD_VALUE => r.first_bad_value = value,
            REG_VERIFIED => r.verified = value,
            REG_TSC => r.tsc = value,
            REG_TSC_MAIN => r.tsc_main = value,
            REG_DONE if !r.done => {
                r.done = true;
                let left = self.remaining.fetch_sub(1, Ordering::AcqRel) - 1;
                return ReportEvent::Done { all: left == 0 };
            }
            REG_EXCEPTION => return ReportEvent::Exception(value as u8),
            _ => {}
        }
        ReportEvent::Continue
    }

    /// Every vCPU's report so far.
    pub fn reports(&self) -> Vec<VcpuReport> {
        self.vcpus.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The machine-readable result of a workload run, printed as one JSON line
/// prefixed with `FOLIOVM-RESULT `.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WorkloadResult {
    /// The VM's name.
    pub vm: String,
    /// Pattern name.
    pub pattern: &'static str,
    /// Range in bytes.
    pub size: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Memory backend.
    pub backend: &'static str,
    /// Page touches (verify + write) over all vCPUs.
    pub ops: u64,
    /// Pages verified, including the final sweep.
    pub verified_pages: u64,
    /// Pages that did not verify.
    pub mismatches: u64,
    /// First bad word's address and content, if any.
    pub first_mismatch: Option<(u64, u64)>,
    /// Slowest vCPU's guest time in seconds (from the TSC), if KVM reports the TSC rate.
    pub guest_seconds: Option<f64>,
    /// The same for the pattern alone, without the final verification sweep.
    pub pattern_seconds: Option<f64>,
    /// Wall time from vCPU start to the last report.
    pub wall_seconds: f64,
    /// Every vCPU reported.
    pub complete: bool,
    /// Guest RAM the host maps with 2 MiB pages at the end of the run
    /// (AnonHugePages of the guest regions in /proc/self/smaps).
    pub host_huge_bytes: u64,
    /// The memory manager's swap counters for this VM (folio backend).
    pub swap: Option<serde_json::Value>,
}

impl WorkloadResult {
    /// Summarise the vCPUs' reports.
    pub fn new(
        spec: &WorkloadSpec,
        config: &crate::config::VmConfig,
        backend: &'static str,
        reports: &[VcpuReport],
        tsc_khz: Option<u32>,
        wall: std::time::Duration,
    ) -> Self {
        let max_tsc = reports.iter().map(|r| r.tsc).max().unwrap_or(0);
        let max_main = reports.iter().map(|r| r.tsc_main).max().unwrap_or(0);
        let secs = |ticks: u64| tsc_khz.map(|k| ticks as f64 / (f64::from(k) * 1000.0));
        // The guest writes these counters: sums saturate rather than wrap
        // (a wrapped mismatch count of 0 would pass a failed run).
        let sum = |f: fn(&VcpuReport) -> u64| {
            reports.iter().map(f).fold(0u64, |a, b| a.saturating_add(b))
        };
        WorkloadResult {
            vm: config.name.clone(),
            pattern: spec.pattern.name(),
            size: spec.size,
            vcpus: config.vcpus,
            backend,
            ops: sum(|r| r.ops),
            verified_pages: sum(|r| r.verified),
            mismatches: sum(|r| r.mismatches),
            first_mismatch: reports
                .iter()
                .find(|r| r.mismatches > 0)
                .map(|r| (r.first_bad_addr, r.first_bad_value)),
            guest_seconds: secs(max_tsc),
            pattern_seconds: secs(max_main),
            wall_seconds: wall.as_secs_f64(),
            complete: reports.iter().all(|r| r.done),
            host_huge_bytes: 0,
            swap: None,
        }
    }

    /// Whether every vCPU finished and every page verified.
    pub fn ok(&self) -> bool {
        self.complete && self.mismatches == 0
    }

    /// The one-line machine-readable form.
    pub fn line(&self) -> String {
        format!(
            "FOLIOVM-RESULT {}",
            serde_json::to_string(self).expect("plain numbers and strings serialise")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_splits_pages_and_checks_room() {
        let spec: WorkloadSpec = "seq:256M".parse().unwrap();
        let l = WorkloadLayout::plan(&spec, 2, 512 << 20).unwrap();
        assert_eq!(l.pages, 65536);
        assert_eq!(l.starts, vec![0, 32768, 65536]);
        assert_eq!(l.data_base % HUGE, 0);
        assert!(l.data_base >= EPOCH_TABLE + 65536 * 4);
        assert_eq!(
            WorkloadLayout::min_mem(&spec).unwrap(),
            l.data_base + (256 << 20)
        );
        let e = WorkloadLayout::plan(&spec, 2, 256 << 20)
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs at least 260 MiB"), "{e}");
        assert!(e.ends_with("the VM has 256 MiB"), "{e}");
        let e = WorkloadLayout::plan(&spec, 2, 4 << 10)
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("the VM has 4 KiB"), "{e}");
        let big: WorkloadSpec = "seq:4G".parse().unwrap();
        assert!(matches!(
            WorkloadLayout::plan(&big, 1, 8 << 30),
            Err(WorkloadError::CrossesGap)
        ));
        assert!(matches!(
            WorkloadLayout::min_mem(&big),
            Err(WorkloadError::CrossesGap)
        ));
        // Ranges so large that the layout's end passes 2^64: refused the
        // same way, never wrapped to a small end (the first was accepted,
        // and its guest faulted), and never an overflow panic.
        for huge in ["seq:17163108338G", "seq:17179869183G", "seq:16383T"] {
            let spec: WorkloadSpec = huge.parse().unwrap();
            assert!(
                matches!(
                    WorkloadLayout::plan(&spec, 1, u64::MAX),
                    Err(WorkloadError::CrossesGap)
                ),
                "{huge}"
            );
            assert!(
                matches!(
                    WorkloadLayout::min_mem(&spec),
                    Err(WorkloadError::CrossesGap)
                ),
                "{huge}"
            );
        }
        let tiny: WorkloadSpec = "seq:4K".parse().unwrap();
        assert!(matches!(
            WorkloadLayout::plan(&tiny, 2, 64 << 20),
            Err(WorkloadError::Vcpus)
        ));
    }

    #[test]
    fn zipf_buckets_are_monotone_and_skewed() {
        let n = 10_000;
        let t = zipf_table(n, 0.99, 12);
        assert_eq!(t.len(), 4097);
        assert_eq!(t[0], 0);
        assert_eq!(t[4096], n as u32 - 1);
        assert!(t.windows(2).all(|w| w[0] <= w[1]));
        // Rank 0 alone holds 1/H of the mass: that many buckets lie inside it.
        let h: f64 = (1..=n).map(|r| (r as f64).powf(-0.99)).sum();
        let hot = t.windows(2).filter(|w| w[0] == 0 && w[1] == 0).count();
        let want = 4096.0 / h;
        assert!((hot as f64 - want).abs() <= 2.0, "{hot} vs {want}");
        // The cold half of the ranks gets far less than half the buckets.
        let cold = t.windows(2).filter(|w| w[0] >= n as u32 / 2).count();
        assert!(cold < 4096 / 8, "{cold}");
        // Tiny ranges stay in bounds.
        let t = zipf_table(3, 0.99, 4);
        assert_eq!(t.len(), 17);
        assert!(t.iter().all(|&r| r < 3));
    }

    #[test]
    fn scatter_is_a_permutation() {
        for n in [1u64, 2, 3, 10, 64, 1000, 4096, 65536] {
            let m = scatter_multiplier(n);
            let mut seen = vec![false; n as usize];
            for r in 0..n {
                let p = (r * m % n) as usize;
                assert!(!seen[p], "n={n} m={m}");
                seen[p] = true;
            }
        }
    }

    #[test]
    fn report_counts_done_once_per_vcpu() {
        let r = WorkloadReport::new(2);
        assert_eq!(r.write(0, REG_OPS, 5), ReportEvent::Continue);
        assert_eq!(r.write(0, REG_DONE, 1), ReportEvent::Done { all: false });
        assert_eq!(r.write(0, REG_DONE, 1), ReportEvent::Continue);
        assert_eq!(r.write(1, REG_DONE, 1), ReportEvent::Done { all: true });
        assert_eq!(r.write(1, REG_EXCEPTION, 14), ReportEvent::Exception(14));
        assert_eq!(r.reports()[0].ops, 5);
    }

    #[test]
    fn hostile_report_values_neither_overflow_nor_hide_mismatches() {
        // The guest writes the counters; two vCPUs whose mismatch counts
        // add up to 2^64 must not make the sum wrap to 0 (a clean run).
        let spec: WorkloadSpec = "seq:1M".parse().unwrap();
        let config = crate::config::VmConfig {
            name: "vm0".into(),
            payload: crate::config::GuestPayload::Workload("seq:1M".into()),
            mem_bytes: 64 << 20,
            vcpus: 2,
            limits: mem::VmLimits::default(),
            virtio: Default::default(),
        };
        let r = WorkloadReport::new(2);
        for v in 0..2 {
            for reg in [REG_OPS, REG_MISMATCHES, REG_VERIFIED, REG_TSC, REG_TSC_MAIN] {
                r.write(v, reg, 1 << 63);
            }
            r.write(v, REG_DONE, 1);
        }
        let res = WorkloadResult::new(
            &spec,
            &config,
            "anon",
            &r.reports(),
            Some(1),
            std::time::Duration::ZERO,
        );
        assert_eq!(res.mismatches, u64::MAX);
        assert_eq!((res.ops, res.verified_pages), (u64::MAX, u64::MAX));
        assert!(!res.ok(), "mismatches reported by the guest were lost");
        assert!(res.line().starts_with("FOLIOVM-RESULT {"));
    }

    proptest::proptest! {
        /// Any size the spec parser takes, any vCPU count and any guest
        /// memory: planning never panics (debug builds check overflow),
        /// and a plan that succeeds fits the guest's RAM below the MMIO
        /// gap with at least a page per vCPU; `min_mem` agrees with it.
        #[test]
        fn any_workload_size_plans_within_ram_or_is_refused(
            // Small ranges, any range, and ranges whose layout ends past
            // 2^64 (above about 1024/1025 of it).
            pages in proptest::prop_oneof![
                1u64..1 << 20,
                1u64..(u64::MAX >> 12),
                (u64::MAX >> 12) / 1025 * 1024..(u64::MAX >> 12),
            ],
            vcpus in proptest::num::u8::ANY,
            mem_bytes in proptest::prop_oneof![0u64..8 << 30, proptest::num::u64::ANY],
        ) {
            let spec: WorkloadSpec = format!("seq:{}K", pages * 4).parse().unwrap();
            if let Ok(l) = WorkloadLayout::plan(&spec, vcpus, mem_bytes) {
                let end = l.data_base + l.pages * 4096;
                proptest::prop_assert!(end <= mem_bytes && end <= MMIO_DEVICES_START.raw());
                proptest::prop_assert_eq!(WorkloadLayout::min_mem(&spec).ok(), Some(end));
                proptest::prop_assert!(l.starts.windows(2).all(|w| w[1] > w[0]));
            }
        }
    }
}
