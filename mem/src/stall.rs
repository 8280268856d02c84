//! Memory stalls: faults that wait long for memory.
//!
//! A fault that finds the pool empty, even after direct reclaim, waits: a
//! handler thread parks it for the pre-zeroing worker to retry
//! ([`crate::manager::Inner::pending`]), a faulting thread
//! ([`crate::FaultDelivery::Faulter`]) sleeps until memory appears. The
//! wait ends when memory is freed: reclaim writes something out, the guest
//! discards or a balloon inflates, a VM is destroyed, the budget is raised.
//! Where the kernel's memory cgroup would kill a task at this point, foliovm
//! never drops guest data to make room, so a wait that nothing can end (a
//! budget below what the guests touch and no swap file, a full swap file,
//! every VM at its minimum) would stop a vCPU silently. A wait longer than
//! [`crate::ReclaimConfig::stall_report_after`] is therefore reported once,
//! on stderr and in the fault counters (`memory_stalls`), with the budget
//! and the reason reclaim cannot help; so is its end.

use crate::manager::Inner;
use crate::types::{VmId, PAGE_SIZE};
use crate::vm::log_error;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// A parked fault ([`crate::manager::Inner::pending`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Parked {
    /// The host page address, with bit 0 set for a write access.
    pub addr_write: usize,
    /// When the fault began (its latency and its wait count from here).
    pub since: Instant,
    /// Parked on a relocation pull held back (by a device pin, say), not
    /// for memory: no memory stall, whatever its wait. A pin lasts one
    /// device request.
    pub on_pull: bool,
}

/// Park a fault on host page `page` (a write if `write`), begun at `since`,
/// for lack of memory or (`on_pull`) on a held-back relocation pull.
/// A page parked already stays one entry: a faulting thread whose wait a
/// signal interrupted (a vCPU kicked for a pause) faults again and sends a
/// second message for the same page, and every retry of a duplicate would
/// reclaim on its own.
pub(crate) fn park(inner: &Inner, page: usize, write: bool, since: Instant, on_pull: bool) {
    let mut pending = inner.pending.lock().unwrap_or_else(|e| e.into_inner());
    park_in(&mut pending, page, write, since, on_pull);
}

/// [`park`] on the list itself.
fn park_in(pending: &mut Vec<Parked>, page: usize, write: bool, since: Instant, on_pull: bool) {
    match pending.iter_mut().find(|p| p.addr_write & !1 == page) {
        // The first message's start stays: the wait is the fault's. What it
        // waits for is what the latest try found.
        Some(p) => {
            p.addr_write |= usize::from(write);
            p.on_pull = on_pull;
        }
        None => pending.push(Parked {
            addr_write: page | usize::from(write),
            since,
            on_pull,
        }),
    }
}

/// The pre-zeroing worker's view of the parked faults: whether it has
/// reported the stall they are in.
#[derive(Debug, Default)]
pub(crate) struct StallWatch {
    reported: Option<Instant>,
}

impl StallWatch {
    /// After a retry round: report a stall when the oldest fault parked for
    /// memory has waited `stall_report_after`, and its end once none has.
    pub(crate) fn check(&mut self, inner: &Inner) {
        let after = inner.stall_report_after;
        let (oldest, addrs) = {
            let p = inner.pending.lock().unwrap_or_else(|e| e.into_inner());
            let memory = || p.iter().filter(|f| !f.on_pull);
            let oldest = memory().map(|f| f.since).min();
            (
                oldest,
                memory().map(|f| f.addr_write & !1).collect::<Vec<_>>(),
            )
        };
        match (oldest.map(|t| t.elapsed()), self.reported) {
            (Some(waited), None) if waited >= after => {
                self.reported = Some(Instant::now());
                report(inner, &addrs, waited);
            }
            (Some(waited), _) if waited >= after => {}
            (_, Some(t)) => {
                self.reported = None;
                over(t.elapsed());
            }
            _ => {}
        }
    }
}

/// Report that the faults at host addresses `addrs` have waited `waited`
/// for memory: which VMs, the budget, and why reclaim does not help.
///
/// # Context
/// No locks held (takes the registry, VM, zone and swap locks one at a
/// time).
pub(crate) fn report(inner: &Inner, addrs: &[usize], waited: Duration) {
    let mut vms: Vec<VmId> = addrs
        .iter()
        .filter_map(|&a| inner.lookup(a).map(|r| r.vm))
        .collect();
    vms.sort_unstable();
    vms.dedup();
    let names: Vec<String> = vms
        .iter()
        .filter_map(|&id| {
            let vm = inner.vm(id)?;
            vm.counters.faults.memory_stalls.fetch_add(1, Relaxed);
            Some(vm.name.clone())
        })
        .collect();
    inner.faults.memory_stalls.fetch_add(1, Relaxed);
    let fa = inner.buddy().stats();
    let mib = |pages: u64| (pages * PAGE_SIZE) >> 20;
    log_error(&format!(
        "memory stall: {} fault(s) of VM {} have waited {:.1} s for memory; the budget of \
         {} MiB is in use ({} MiB free) and reclaim frees nothing: {}. They wait until \
         memory is freed (a discard or balloon, a VM stopped, the budget raised).",
        addrs.len().max(1),
        match names.is_empty() {
            true => "(gone)".to_string(),
            false => names.join(", "),
        },
        waited.as_secs_f64(),
        mib(fa.total_pages - fa.offline_pages),
        mib(fa.free_pages),
        why_reclaim_cannot_help(inner),
    ));
}

/// Report the end of a stall reported `since_report` ago.
pub(crate) fn over(since_report: Duration) {
    log_error(&format!(
        "memory stall over: the faults that waited for memory proceed ({:.1} s after the \
         report)",
        since_report.as_secs_f64()
    ));
}

/// Why reclaim does not free memory now, for a stall report.
fn why_reclaim_cannot_help(inner: &Inner) -> &'static str {
    match &inner.swap {
        None => "there is no swap file, so guest memory cannot be swapped out",
        Some(dev) if dev.lock().map.nr_free() == 0 => "the swap file is full",
        Some(_) => {
            "what is resident is protected (VM minimums), pinned, or being \
             swapped in or out"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_parked_twice_is_one_entry_that_keeps_the_write_and_the_start() {
        let (t0, t1) = (Instant::now(), Instant::now() + Duration::from_millis(5));
        let mut pending = Vec::new();
        park_in(&mut pending, 0x1000, false, t0, true);
        park_in(&mut pending, 0x2000, false, t0, false);
        for _ in 0..50 {
            park_in(&mut pending, 0x1000, true, t1, false);
        }
        assert_eq!(pending.len(), 2);
        assert_eq!(pending[0].addr_write, 0x1001, "a write parked over a read");
        assert_eq!(pending[0].since, t0, "the wait counts from the first");
        assert!(!pending[0].on_pull, "the latest reason to wait stays");
        assert_eq!(pending[1].addr_write, 0x2000);
    }
}
