//! `foliovm bench …`: benchmarks that run a baseline and foliovm in the same
//! invocation and print both with their ratio. They are never timed tests.

pub mod overcommit;

use crate::config::{GuestPayload, MemBackendKind, MemoryConfig, RunConfig, VmConfig};
use crate::vm::MemorySource;
use crate::vmm::{run_all, RunOutcome, VmmError};
use crate::workload::{WorkloadLayout, WorkloadSpec};
use mem::{MemoryManager, MmConfig};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Errors from a benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A run could not be set up.
    #[error(transparent)]
    Vmm(#[from] VmmError),
    /// A run did not finish cleanly or did not verify.
    #[error("{backend} run failed: {reason}")]
    RunFailed {
        /// Which backend.
        backend: &'static str,
        /// Why.
        reason: String,
    },
}

/// One backend's first-touch measurements.
#[derive(Debug)]
pub struct TouchRuns {
    /// Backend name.
    pub backend: &'static str,
    /// Guest time of the touch pass alone, per run.
    pub seconds: Vec<f64>,
    /// The manager's stats after the last run (folio only).
    pub last: Option<RunOutcome>,
    /// Seconds the pool took to pre-zero, off the fault path: at creation,
    /// then after each run (folio only).
    pub prezero_seconds: Vec<f64>,
}

impl TouchRuns {
    /// Median touch time.
    pub fn median(&self) -> f64 {
        let mut v = self.seconds.clone();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }
}

fn touch_once(
    size: u64,
    vcpus: u8,
    backend: MemBackendKind,
    mm: &Arc<MemoryManager>,
) -> Result<(f64, RunOutcome), BenchError> {
    let spec = format!("seq:{size}B,passes=1");
    let parsed: WorkloadSpec = spec.parse().expect("a generated spec parses");
    let vm = VmConfig {
        name: "bench".into(),
        payload: GuestPayload::Workload(spec),
        mem_bytes: WorkloadLayout::min_mem(&parsed)
            .map_err(VmmError::from)?
            .next_multiple_of(2 << 20),
        vcpus,
        limits: mem::VmLimits::default(),
        virtio: Default::default(),
    };
    let memory = MemoryConfig {
        backend,
        budget: None,
        swap: None,
    };
    let source = match backend {
        MemBackendKind::Anon => MemorySource::Anon,
        MemBackendKind::Folio => MemorySource::Folio(mm.clone()),
    };
    let name = match backend {
        MemBackendKind::Anon => "anon",
        MemBackendKind::Folio => "folio",
    };
    let out = run_all(&RunConfig::single(vm, memory), &source)?
        .pop()
        .expect("one VM, one outcome");
    let failed = |reason: String| BenchError::RunFailed {
        backend: name,
        reason,
    };
    if out.reason.exit_code() != 0 {
        return Err(failed(out.reason.to_string()));
    }
    let w = out
        .workload
        .as_ref()
        .ok_or_else(|| failed("no workload result".into()))?;
    if !w.ok() {
        return Err(failed(format!("{} pages did not verify", w.mismatches)));
    }
    let secs = w
        .pattern_seconds
        .ok_or_else(|| failed("KVM does not report the guest TSC frequency".into()))?;
    Ok((secs, out))
}

fn wait_prezeroed(mm: &MemoryManager) -> Result<f64, BenchError> {
    let t = Instant::now();
    if !mm.wait_idle(Duration::from_secs(120)) {
        return Err(BenchError::RunFailed {
            backend: "folio",
            reason: "the pool was not pre-zeroed within 120 s".into(),
        });
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Touch `size` bytes of fresh guest memory with `vcpus` workload vCPUs,
/// `runs` times on each backend, alternating, after one discarded warm-up
/// run of each (the first touch of cold host memory costs the kernel seconds
/// either way). The folio runs share one manager, as VMs on a host do, and
/// start once its pool is pre-zeroed; that zeroing time is reported apart.
///
/// # Errors
/// [`BenchError`] if any run fails or does not verify.
pub fn first_touch(
    size: u64,
    vcpus: u8,
    runs: usize,
) -> Result<(TouchRuns, TouchRuns), BenchError> {
    let new = |backend| TouchRuns {
        backend,
        seconds: Vec::new(),
        last: None,
        prezero_seconds: Vec::new(),
    };
    let (mut anon, mut folio) = (new("anon"), new("folio"));
    let spec: WorkloadSpec = format!("seq:{size}B")
        .parse()
        .expect("a generated spec parses");
    let budget = WorkloadLayout::min_mem(&spec)
        .map_err(VmmError::from)?
        .next_multiple_of(2 << 20);
    let mm = MemoryManager::new(MmConfig::with_budget(budget))
        .map_err(|e| VmmError::Memory(Box::new(e)))?;
    folio.prezero_seconds.push(wait_prezeroed(&mm)?);
    for i in 0..=runs.max(1) {
        for (kind, acc) in [
            (MemBackendKind::Anon, &mut anon),
            (MemBackendKind::Folio, &mut folio),
        ] {
            let (s, out) = touch_once(size, vcpus, kind, &mm)?;
            if kind == MemBackendKind::Folio {
                acc.prezero_seconds.push(wait_prezeroed(&mm)?);
            }
            if i > 0 {
                acc.seconds.push(s);
                acc.last = Some(out);
            }
        }
    }
    Ok((anon, folio))
}

/// The report `foliovm bench first-touch` prints.
pub fn first_touch_report(size: u64, vcpus: u8, anon: &TouchRuns, folio: &TouchRuns) -> String {
    let gib = size as f64 / (1u64 << 30) as f64;
    let mut s = format!(
        "first-touch: {} MiB of fresh guest memory, {vcpus} vCPUs, workload seq passes=1, {} runs each after a warm-up (median of guest TSC time of the touch pass)\n",
        size >> 20,
        anon.seconds.len()
    );
    for r in [anon, folio] {
        let label = if r.backend == "anon" {
            "anon  (kernel faults, THP)"
        } else {
            "folio (foliovm memory manager)"
        };
        s += &format!(
            "  {label:32} {:8.3} s  {:6.2} GiB/s  runs: {:?}\n",
            r.median(),
            gib / r.median(),
            r.seconds
                .iter()
                .map(|x| (x * 1000.0).round() / 1000.0)
                .collect::<Vec<_>>()
        );
    }
    s += &format!(
        "  ratio anon/folio: {:.2}x   (goal >= 1.0x, target 1.5x)\n",
        anon.median() / folio.median()
    );
    s += &format!(
        "  folio pool pre-zeroing (off the fault path, before each run): {:?} s\n",
        folio
            .prezero_seconds
            .iter()
            .map(|x| (x * 1000.0).round() / 1000.0)
            .collect::<Vec<_>>()
    );
    if let Some((mm, vm)) = folio.last.as_ref().and_then(|o| o.mem_stats.as_ref()) {
        let f = &vm.faults;
        s += &format!(
            "  folio faults (last run): {} events, folios installed by order {:?}, copy/zeropage fallbacks {}/{}, raced {}, parked for pre-zeroing {}\n",
            f.events,
            f.installed_by_order,
            f.fallback_copy_pages,
            f.fallback_zeropage_pages,
            f.raced,
            f.parked_prezero
        );
        s += &format!(
            "  metadata: {} bytes for {} guest pages = {:.3} bytes per guest page (target <= 8)\n",
            mm.metadata_bytes,
            mm.guest_pages,
            mm.metadata_bytes as f64 / mm.guest_pages.max(1) as f64
        );
    }
    s
}
