//! Counters, kept in atomics on the hot paths, and the plain snapshot
//! structs the VMM prints ([`MmStats`], [`VmStats`]).

use crate::buddy::FreeAreaStats;
use crate::types::Order;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

const NR_BUCKETS: usize = 40;

/// The bucket of a duration: `i` for `[2^i, 2^(i+1))` ns, the last one
/// open-ended.
fn bucket_of(ns: u64) -> usize {
    ((63 - ns.max(1).leading_zeros()) as usize).min(NR_BUCKETS - 1)
}

/// A log2 histogram of durations: bucket `i` counts `[2^i, 2^(i+1))` ns.
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; NR_BUCKETS],
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl LatencyHistogram {
    /// Count one duration.
    pub fn record(&self, ns: u64) {
        self.buckets[bucket_of(ns)].fetch_add(1, Relaxed);
    }

    /// A snapshot.
    pub fn snapshot(&self) -> Histogram {
        Histogram {
            buckets: self.buckets.iter().map(|b| b.load(Relaxed)).collect(),
        }
    }
}

/// A snapshot of a [`LatencyHistogram`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Histogram {
    /// `buckets[i]` counts durations in `[2^i, 2^(i+1))` ns.
    pub buckets: Vec<u64>,
}

impl Histogram {
    /// Samples.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Count one duration, bucketed as [`LatencyHistogram::record`] does
    /// (for a histogram kept by one thread).
    pub fn record(&mut self, ns: u64) {
        let b = bucket_of(ns);
        if self.buckets.len() <= b {
            self.buckets.resize(b + 1, 0);
        }
        self.buckets[b] += 1;
    }

    /// Add the samples of `other`.
    pub fn add(&mut self, other: &Histogram) {
        if self.buckets.len() < other.buckets.len() {
            self.buckets.resize(other.buckets.len(), 0);
        }
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
    }

    /// The samples recorded after `earlier` (a snapshot of the same
    /// histogram taken before this one).
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        let old = |i: usize| earlier.buckets.get(i).copied().unwrap_or(0);
        Histogram {
            buckets: (0..self.buckets.len())
                .map(|i| self.buckets[i].saturating_sub(old(i)))
                .collect(),
        }
    }

    /// Upper bound (ns) of the bucket holding quantile `q` (0.0..=1.0).
    pub fn quantile_ns(&self, q: f64) -> u64 {
        let target = (self.count() as f64 * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= target {
                return 1u64 << (i + 1);
            }
        }
        0
    }
}

/// Fault counters, per VM and for the whole manager.
#[derive(Debug, Default)]
pub struct FaultCounters {
    /// MISSING events read from the userfaultfd.
    pub events: AtomicU64,
    /// Folios installed, by order.
    pub installed: [AtomicU64; Order::COUNT],
    /// Faults that found the page already present (a racing fault won): `WAKE`.
    pub raced: AtomicU64,
    /// Faults parked until the pre-zeroing worker had a ready block.
    pub parked_prezero: AtomicU64,
    /// Faults parked because the pool was exhausted.
    pub parked_oom: AtomicU64,
    /// Faults parked because their table's relocation pull was held back
    /// (a pin on the table, an undo not done yet).
    pub parked_pull: AtomicU64,
    /// Memory stalls reported: faults that waited
    /// [`crate::ReclaimConfig::stall_report_after`] for memory (one per
    /// stall, see `crate::stall`).
    pub memory_stalls: AtomicU64,
    /// Faults served with a smaller order than wanted (fragmentation).
    pub order_fallback: AtomicU64,
    /// Pages served by `UFFDIO_COPY` instead of `MOVE`.
    pub fallback_copy_pages: AtomicU64,
    /// Pages served by `UFFDIO_ZEROPAGE` instead of `MOVE`.
    pub fallback_zeropage_pages: AtomicU64,
    /// Pages whose `COPY` or `ZEROPAGE` fallback failed too: left in the
    /// pool behind a `Present` entry until the next fault restores them
    /// (see `stranded`), or, for a fresh folio whose pool page was a hole
    /// too (`ZEROPAGE` failed), poisoned by it (`unbacked_poisoned`).
    pub fallback_failed_pages: AtomicU64,
    /// Pages `MOVE` found already populated (`EEXIST`), treated as served.
    pub move_eexist_pages: AtomicU64,
    /// `MOVE` retries after `EAGAIN`/`EBUSY` or a short move.
    pub move_retries: AtomicU64,
    /// Faults on a `Present` entry whose host page was absent, restored
    /// from the folio's pool page (see `fault::restore_unbacked`).
    pub unbacked_restored: AtomicU64,
    /// The same with no pool page either: the page was poisoned.
    pub unbacked_poisoned: AtomicU64,
    /// The same for a clean folio: its entry went back to its swap slot,
    /// and the fault read the page from there.
    pub unbacked_from_slot: AtomicU64,
    /// Fault service time, from reading the event to the waking ioctl.
    pub latency: LatencyHistogram,
}

impl FaultCounters {
    /// A snapshot.
    pub fn snapshot(&self) -> FaultStats {
        FaultStats {
            events: self.events.load(Relaxed),
            installed_by_order: std::array::from_fn(|i| self.installed[i].load(Relaxed)),
            raced: self.raced.load(Relaxed),
            parked_prezero: self.parked_prezero.load(Relaxed),
            parked_oom: self.parked_oom.load(Relaxed),
            parked_pull: self.parked_pull.load(Relaxed),
            memory_stalls: self.memory_stalls.load(Relaxed),
            order_fallback: self.order_fallback.load(Relaxed),
            fallback_copy_pages: self.fallback_copy_pages.load(Relaxed),
            fallback_zeropage_pages: self.fallback_zeropage_pages.load(Relaxed),
            fallback_failed_pages: self.fallback_failed_pages.load(Relaxed),
            move_eexist_pages: self.move_eexist_pages.load(Relaxed),
            move_retries: self.move_retries.load(Relaxed),
            unbacked_restored: self.unbacked_restored.load(Relaxed),
            unbacked_poisoned: self.unbacked_poisoned.load(Relaxed),
            unbacked_from_slot: self.unbacked_from_slot.load(Relaxed),
            latency: self.latency.snapshot(),
        }
    }
}

/// Snapshot of [`FaultCounters`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// MISSING events read.
    pub events: u64,
    /// Folios installed, by order.
    pub installed_by_order: [u64; Order::COUNT],
    /// Faults on an already present page (`WAKE` only).
    pub raced: u64,
    /// Faults parked for the pre-zeroing worker.
    pub parked_prezero: u64,
    /// Faults parked on an exhausted pool.
    pub parked_oom: u64,
    /// Faults parked on a held-back relocation pull.
    pub parked_pull: u64,
    /// Memory stalls reported (faults that waited long for memory).
    pub memory_stalls: u64,
    /// Faults served below the wanted order.
    pub order_fallback: u64,
    /// Pages served by `UFFDIO_COPY`.
    pub fallback_copy_pages: u64,
    /// Pages served by `UFFDIO_ZEROPAGE`.
    pub fallback_zeropage_pages: u64,
    /// Pages whose fallback failed too (restored by their next fault).
    pub fallback_failed_pages: u64,
    /// Pages already populated at `MOVE` time.
    pub move_eexist_pages: u64,
    /// `MOVE` retries.
    pub move_retries: u64,
    /// `Present` entries found without a host page, restored from the pool.
    pub unbacked_restored: u64,
    /// The same with the data gone: poisoned.
    pub unbacked_poisoned: u64,
    /// The same for a clean folio: read again from its swap slot.
    pub unbacked_from_slot: u64,
    /// Service latency.
    pub latency: Histogram,
}

/// Swap and reclaim counters, per VM and for the whole manager.
#[derive(Debug, Default)]
pub struct SwapCounters {
    /// Guest pages whose entry is `Swap` now (a gauge).
    pub swapped_pages: AtomicI64,
    /// Pages written to the swap file.
    pub swapout_pages: AtomicU64,
    /// Folios written.
    pub swapout_folios: AtomicU64,
    /// Large folios that found no contiguous slots and were split to order 0.
    pub swapout_fallback_order0: AtomicU64,
    /// Large swapins that met a neighbouring folio in the swap cache and
    /// read the faulting page alone.
    pub swapin_fallback_order0: AtomicU64,
    /// Pages read from the swap file.
    pub swapin_file_pages: AtomicU64,
    /// Folios read from the swap file.
    pub swapin_file_folios: AtomicU64,
    /// Folios mapped back from the swap cache (refault during writeback).
    pub swapin_cache_folios: AtomicU64,
    /// Pages installed from the pool by `UFFDIO_COPY` (no TLB flush) rather
    /// than `UFFDIO_MOVE`: swapins, swap-cache and sampled-out refaults.
    pub copied_in_pages: AtomicU64,
    /// Pages reclaimed as `Zero` entries without I/O.
    pub zero_dropped_pages: AtomicU64,
    /// Pages reclaimed without a write because the file copy was valid.
    pub clean_dropped_pages: AtomicU64,
    /// Pages of unmapped swap-cache folios that reclaim freed without I/O
    /// (`swapin::shrink_swap_cache`; only fault injection leaves any).
    pub cache_dropped_pages: AtomicU64,
    /// Pages swapped in by a read fault and kept clean (write-protected,
    /// their slot kept).
    pub clean_kept_pages: AtomicU64,
    /// Clean pages written afterwards (a WP fault freed their slot).
    pub clean_dirtied_pages: AtomicU64,
    /// Guest pages poisoned after a failed swapin.
    pub poisoned_pages: AtomicU64,
    /// Failed swap writes (the folio was mapped back).
    pub write_errors: AtomicU64,
    /// Failed swap reads (I/O error, short read or checksum mismatch).
    pub read_errors: AtomicU64,
    /// Swap-outs abandoned because the swap file had no free slots.
    pub swap_full: AtomicU64,
    /// Folios unmapped to sample accesses.
    pub sampled_folios: AtomicU64,
    /// Sampled folios that were accessed and faulted back.
    pub sample_refaults: AtomicU64,
    /// Sampled large folios split into base folios when one page was
    /// touched (`vmscan::split_sampled`).
    pub sampled_splits: AtomicU64,
    /// Sampled large folios split because evicting one whole would take
    /// its VM below the floor reclaim must keep (`vmscan::split_to_fit`).
    pub floor_splits: AtomicU64,
    /// Folios looked at by reclaim.
    pub reclaim_scanned: AtomicU64,
    /// Pages freed by reclaim.
    pub reclaimed_pages: AtomicU64,
    /// Direct reclaim runs (on the fault path).
    pub direct_reclaims: AtomicU64,
    /// Swapin from the file, fault to mapped.
    pub swapin_latency: LatencyHistogram,
    /// Swapin from the swap cache, fault to mapped.
    pub swapcache_latency: LatencyHistogram,
}

impl SwapCounters {
    /// A snapshot.
    pub fn snapshot(&self) -> SwapStats {
        let l = |a: &AtomicU64| a.load(Relaxed);
        SwapStats {
            swapped_pages: self.swapped_pages.load(Relaxed).max(0) as u64,
            swapout_pages: l(&self.swapout_pages),
            swapout_folios: l(&self.swapout_folios),
            swapout_fallback_order0: l(&self.swapout_fallback_order0),
            swapin_fallback_order0: l(&self.swapin_fallback_order0),
            swapin_file_pages: l(&self.swapin_file_pages),
            swapin_file_folios: l(&self.swapin_file_folios),
            swapin_cache_folios: l(&self.swapin_cache_folios),
            copied_in_pages: l(&self.copied_in_pages),
            zero_dropped_pages: l(&self.zero_dropped_pages),
            clean_dropped_pages: l(&self.clean_dropped_pages),
            cache_dropped_pages: l(&self.cache_dropped_pages),
            clean_kept_pages: l(&self.clean_kept_pages),
            clean_dirtied_pages: l(&self.clean_dirtied_pages),
            poisoned_pages: l(&self.poisoned_pages),
            write_errors: l(&self.write_errors),
            read_errors: l(&self.read_errors),
            swap_full: l(&self.swap_full),
            sampled_folios: l(&self.sampled_folios),
            sample_refaults: l(&self.sample_refaults),
            sampled_splits: l(&self.sampled_splits),
            floor_splits: l(&self.floor_splits),
            reclaim_scanned: l(&self.reclaim_scanned),
            reclaimed_pages: l(&self.reclaimed_pages),
            direct_reclaims: l(&self.direct_reclaims),
            swapin_latency: self.swapin_latency.snapshot(),
            swapcache_latency: self.swapcache_latency.snapshot(),
        }
    }
}

/// Snapshot of [`SwapCounters`]; fields as there.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct SwapStats {
    pub swapped_pages: u64,
    pub swapout_pages: u64,
    pub swapout_folios: u64,
    pub swapout_fallback_order0: u64,
    pub swapin_fallback_order0: u64,
    pub swapin_file_pages: u64,
    pub swapin_file_folios: u64,
    pub swapin_cache_folios: u64,
    pub copied_in_pages: u64,
    pub zero_dropped_pages: u64,
    pub clean_dropped_pages: u64,
    pub cache_dropped_pages: u64,
    pub clean_kept_pages: u64,
    pub clean_dirtied_pages: u64,
    pub poisoned_pages: u64,
    pub write_errors: u64,
    pub read_errors: u64,
    pub swap_full: u64,
    pub sampled_folios: u64,
    pub sample_refaults: u64,
    pub sampled_splits: u64,
    pub floor_splits: u64,
    pub reclaim_scanned: u64,
    pub reclaimed_pages: u64,
    pub direct_reclaims: u64,
    pub swapin_latency: Histogram,
    pub swapcache_latency: Histogram,
}

/// Host-wide swap device state, in [`MmStats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SwapDeviceStats {
    /// Swap file size in bytes (0 without swap).
    pub total_bytes: u64,
    /// Bytes of allocated slots.
    pub used_bytes: u64,
    /// Pages in the swap cache.
    pub cache_pages: u64,
    /// Whether the file uses `O_DIRECT`.
    pub direct_io: bool,
    /// Whether the file is on a file system in host memory (tmpfs, ramfs),
    /// where swapped-out pages still take host RAM.
    pub in_memory: bool,
    /// Read requests / bytes, write requests / bytes.
    pub reads: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Write requests.
    pub writes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// I/O errors of any kind.
    pub io_errors: u64,
    /// Short transfers continued.
    pub short_retries: u64,
    /// Faults injected by a test plan.
    pub injected_faults: u64,
    /// Bytes of swap metadata: a count and a checksum per slot, cluster
    /// records, swap-cache records.
    pub metadata_bytes: u64,
}

/// Per-VM counters.
#[derive(Debug, Default)]
pub struct VmCounters {
    /// Faults of this VM.
    pub faults: FaultCounters,
    /// Resident guest pages, by the order of the folio mapping them.
    pub resident_pages: [AtomicI64; Order::COUNT],
    /// Pages discarded.
    pub discarded_pages: AtomicU64,
    /// Pages a discard skipped because their folio was pinned.
    pub discard_skipped_pinned: AtomicU64,
    /// Pages a discard dropped with `MADV_DONTNEED` because `MOVE` back failed.
    pub discard_fallback_dontneed: AtomicU64,
    /// Pages currently pinned.
    pub pinned_pages: AtomicI64,
    /// Swap and reclaim.
    pub swap: SwapCounters,
    /// Whether read swapins of this VM are kept clean.
    pub(crate) clean_policy: crate::swapin::CleanPolicy,
    /// When a fault of this VM last swapped out its own memory for want of
    /// any other (`vmscan::reclaim_own`), in ns of the manager's clock
    /// (0: never). See [`crate::manager::Inner::own_reclaim_recent`].
    pub(crate) own_reclaim_ns: AtomicU64,
}

impl VmCounters {
    /// Account `nr` pages of an `order` folio becoming resident (or, negative, leaving).
    pub fn resident(&self, order: Order, nr: i64) {
        self.resident_pages[order.index()].fetch_add(nr, Relaxed);
    }
}

/// Per-VM statistics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmStats {
    /// The VM's name.
    pub name: String,
    /// Guest RAM size in bytes.
    pub guest_bytes: u64,
    /// Resident bytes by folio order.
    pub resident_bytes_by_order: [u64; Order::COUNT],
    /// Faults.
    pub faults: FaultStats,
    /// Pages discarded.
    pub discarded_pages: u64,
    /// Pages a discard skipped (pinned).
    pub discard_skipped_pinned: u64,
    /// Pages a discard dropped instead of moving back.
    pub discard_fallback_dontneed: u64,
    /// Pages pinned now.
    pub pinned_pages: u64,
    /// Swap and reclaim.
    pub swap: SwapStats,
    /// Current limits.
    pub limits: crate::VmLimits,
}

impl VmStats {
    /// Total resident bytes.
    pub fn resident_bytes(&self) -> u64 {
        self.resident_bytes_by_order.iter().sum()
    }
}

/// Counters of the background workers.
#[derive(Debug, Default)]
pub struct WorkerCounters {
    /// Blocks the pre-zeroing worker prepared.
    pub prezero_blocks: AtomicU64,
    /// Pages it prepared.
    pub prezero_pages: AtomicU64,
    /// Time it spent preparing, ns.
    pub prezero_ns: AtomicU64,
    /// Order-9 blocks that could not be collapsed into a THP.
    pub collapse_failed: AtomicU64,
    /// Prepare failures (the block went back unprepared).
    pub prezero_failed: AtomicU64,
    /// Wake-ups sent to the pre-zeroing worker.
    pub worker_kicks: AtomicU64,
    /// Folios split by the deferred-split worker.
    pub folios_split: AtomicU64,
    /// Pages returned to the allocator by those splits.
    pub split_freed_pages: AtomicU64,
    /// Folios migrated.
    pub migrate_success: AtomicU64,
    /// Of those, unmapped swap-cache folios.
    pub migrate_swapcache: AtomicU64,
    /// Of those, small mapped folios moved by re-labelling their pool range.
    pub migrate_relabelled: AtomicU64,
    /// Migrations that failed or were refused (and were undone).
    pub migrate_failed: AtomicU64,
    /// Folios skipped because they were pinned.
    pub migrate_skipped_pinned: AtomicU64,
    /// Bytes copied by migration and collapse.
    pub migrate_copy_bytes: AtomicU64,
    /// Time spent copying them, ns.
    pub migrate_copy_ns: AtomicU64,
    /// Free 2 MiB blocks rebuilt by compaction.
    pub compact_blocks: AtomicU64,
    /// Compaction attempts on a pageblock that failed (undone).
    pub compact_failed: AtomicU64,
    /// Guest ranges collapsed into one 2 MiB folio.
    pub collapsed: AtomicU64,
    /// Collapse attempts that failed or were refused (undone).
    pub collapse_aborted: AtomicU64,
    /// Region relocations completed.
    pub relocations: AtomicU64,
    /// Relocations that failed and were undone.
    pub relocations_undone: AtomicU64,
    /// Present bytes moved by relocations.
    pub relocate_moved_bytes: AtomicU64,
    /// Table pulls on behalf of a fault, pin or discard that could not go
    /// on (a pinned folio, a grown tail not discarded yet).
    pub relocate_pulls_blocked: AtomicU64,
    /// Rounds of the background compactor.
    pub kcompactd_rounds: AtomicU64,
}

/// Manager-wide statistics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MmStats {
    /// Pool size in bytes (the largest budget).
    pub pool_bytes: u64,
    /// The budget now: the pool less offline memory
    /// ([`crate::MemoryManager::set_budget`]).
    pub budget_bytes: u64,
    /// Free memory by order (all free blocks), in bytes.
    pub free_bytes_by_order: [u64; Order::COUNT],
    /// Free, pre-zeroed (ready) memory by order, in bytes.
    pub ready_bytes_by_order: [u64; Order::COUNT],
    /// Total free bytes.
    pub free_bytes: u64,
    /// Unusable free space index for order 9, in thousandths.
    pub unusable_index_pmd: u64,
    /// Live folios by order.
    pub folios_by_order: [u64; Order::COUNT],
    /// Folios waiting for deferred split.
    pub deferred_split_queue: u64,
    /// All faults.
    pub faults: FaultStats,
    /// Pre-zeroed blocks / pages / time.
    pub prezero_blocks: u64,
    /// Pages pre-zeroed.
    pub prezero_pages: u64,
    /// Time spent pre-zeroing, ns.
    pub prezero_ns: u64,
    /// Order-9 blocks that stayed PTE-mapped in the pool.
    pub collapse_failed: u64,
    /// Wake-ups sent to the pre-zeroing worker.
    pub worker_kicks: u64,
    /// Folios split by deferred split.
    pub folios_split: u64,
    /// Pages those splits freed.
    pub split_freed_pages: u64,
    /// Batched zaps of stale pool copies (one TLB flush each).
    pub pool_zap_batches: u64,
    /// Pages those zaps dropped.
    pub pool_zap_pages: u64,
    /// Zaps forced early because a path needed a queued range empty.
    pub pool_zap_forced: u64,
    /// Stale pool pages queued now (host memory beyond the budget).
    pub pool_stale_pages: u64,
    /// Pool pages holding a mapped folio's data after its install into
    /// the guest failed, until the next fault moves them in (`stranded`).
    pub pool_stranded_pages: u64,
    /// `UFFDIO_MOVE` calls of this process whose reported count was short
    /// of the pages they moved, corrected from the page tables (a kernel
    /// bug, see `sys::userfaultfd::RawUffd::move_pages`).
    pub move_undercounts: u64,
    /// Metadata bytes: page tables, folio table, allocator, per-VM records.
    pub metadata_bytes: u64,
    /// Guest pages of all VMs.
    pub guest_pages: u64,
    /// Swap and reclaim, all VMs.
    pub swap: SwapStats,
    /// The swap device.
    pub swap_device: SwapDeviceStats,
    /// Migration, compaction, collapse and relocation.
    pub migration: MigrationStats,
}

/// Migration, compaction, collapse and relocation counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationStats {
    /// Folios migrated.
    pub migrated: u64,
    /// Of those, unmapped swap-cache folios.
    pub migrated_swapcache: u64,
    /// Of those, small mapped folios moved by re-labelling their pool range
    /// (their data lives in the guest; nothing is copied).
    pub relabelled: u64,
    /// Migrations that failed or were refused (undone).
    pub failed: u64,
    /// Folios skipped because they were pinned.
    pub skipped_pinned: u64,
    /// Bytes copied by migration and collapse.
    pub copy_bytes: u64,
    /// Time spent copying, ns.
    pub copy_ns: u64,
    /// Free 2 MiB blocks rebuilt by compaction.
    pub compact_blocks: u64,
    /// Pageblocks whose compaction failed (undone).
    pub compact_failed: u64,
    /// Guest ranges collapsed into one 2 MiB folio.
    pub collapsed: u64,
    /// Collapse attempts undone or refused.
    pub collapse_aborted: u64,
    /// Region relocations completed.
    pub relocations: u64,
    /// Relocations that failed and were undone.
    pub relocations_undone: u64,
    /// Table pulls on behalf of a fault, pin or discard that could not go
    /// on (a pinned folio, a grown tail not discarded yet); each one tried
    /// again later.
    pub relocate_pulls_blocked: u64,
    /// Rounds of the background compactor (after faults fell back to
    /// smaller folios).
    pub kcompactd_rounds: u64,
}

impl WorkerCounters {
    pub(crate) fn migration(&self) -> MigrationStats {
        MigrationStats {
            migrated: self.migrate_success.load(Relaxed),
            migrated_swapcache: self.migrate_swapcache.load(Relaxed),
            relabelled: self.migrate_relabelled.load(Relaxed),
            failed: self.migrate_failed.load(Relaxed),
            skipped_pinned: self.migrate_skipped_pinned.load(Relaxed),
            copy_bytes: self.migrate_copy_bytes.load(Relaxed),
            copy_ns: self.migrate_copy_ns.load(Relaxed),
            compact_blocks: self.compact_blocks.load(Relaxed),
            compact_failed: self.compact_failed.load(Relaxed),
            collapsed: self.collapsed.load(Relaxed),
            collapse_aborted: self.collapse_aborted.load(Relaxed),
            relocations: self.relocations.load(Relaxed),
            relocations_undone: self.relocations_undone.load(Relaxed),
            relocate_pulls_blocked: self.relocate_pulls_blocked.load(Relaxed),
            kcompactd_rounds: self.kcompactd_rounds.load(Relaxed),
        }
    }
}

impl MmStats {
    /// Metadata bytes per guest 4 KiB page (target ≤ 8).
    pub fn metadata_bytes_per_guest_page(&self) -> f64 {
        if self.guest_pages == 0 {
            return 0.0;
        }
        self.metadata_bytes as f64 / self.guest_pages as f64
    }

    pub(crate) fn set_free_area(&mut self, fa: &FreeAreaStats) {
        for o in Order::all() {
            self.free_bytes_by_order[o.index()] = fa.free_blocks[o.index()] * o.bytes();
            self.ready_bytes_by_order[o.index()] = fa.ready_blocks[o.index()] * o.bytes();
        }
        self.free_bytes = fa.free_pages * crate::types::PAGE_SIZE;
        self.unusable_index_pmd = fa.unusable_index(Order::PMD);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_quantiles() {
        let h = LatencyHistogram::default();
        for ns in [1, 1000, 1500, 3000, 1_000_000] {
            h.record(ns);
        }
        let s = h.snapshot();
        assert_eq!(s.count(), 5);
        assert_eq!(s.buckets[0], 1);
        assert_eq!(s.buckets[9], 1); // 1000 in [512, 1024)
        assert_eq!(s.buckets[10], 1); // 1500 in [1024, 2048)
        assert_eq!(s.quantile_ns(0.5), 2048);
        assert_eq!(s.quantile_ns(1.0), 1 << 20);
        h.record(3000);
        let d = h.snapshot().since(&s);
        assert_eq!(d.count(), 1);
        assert_eq!(d.quantile_ns(0.5), 4096);
    }
}
