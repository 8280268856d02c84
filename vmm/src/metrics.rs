//! Memory statistics as JSON (for the API) and in the Prometheus text
//! format (for `GET /metrics`). One source for both: [`MemSample`].

use devices::virtio::block::BlockCounters;
use mem::{FaultStats, Histogram, MmStats, Order, SwapStats, VmStats};
use serde_json::{json, Value};
use std::fmt::Write;

/// One VM's state and memory statistics at one moment.
pub struct VmSample {
    /// Name.
    pub name: String,
    /// `Not started`, `Running`, `Paused`, `Stopped`.
    pub state: &'static str,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// The manager's view (folio backend only).
    pub stats: Option<VmStats>,
    /// Each drive's id and counters.
    pub drives: Vec<(String, BlockCounters)>,
}

/// The host-wide memory statistics and every VM's.
pub struct MemSample {
    /// The shared manager's stats (folio backend only).
    pub host: Option<MmStats>,
    /// Each VM.
    pub vms: Vec<VmSample>,
}

fn by_order(v: &[u64]) -> Value {
    // Keys are folio sizes: 4K, 8K, ... 2M.
    let mut m = serde_json::Map::new();
    for (i, b) in v.iter().enumerate() {
        m.insert(size_name(i), json!(b));
    }
    Value::Object(m)
}

/// A Prometheus label value: backslash, double quote and newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn size_name(order: usize) -> String {
    let kib = 4u64 << order;
    if kib >= 1024 {
        format!("{}M", kib / 1024)
    } else {
        format!("{kib}K")
    }
}

fn latency(h: &Histogram) -> Value {
    json!({
        "count": h.count(),
        "p50_ns": h.quantile_ns(0.5),
        "p99_ns": h.quantile_ns(0.99),
        "max_bucket_ns": h.quantile_ns(1.0),
    })
}

fn faults(f: &FaultStats) -> Value {
    json!({
        "events": f.events,
        "installed_by_order": by_order(&f.installed_by_order),
        "raced": f.raced,
        "parked_prezero": f.parked_prezero,
        "parked_pull": f.parked_pull,
        "parked_oom": f.parked_oom,
        "memory_stalls": f.memory_stalls,
        "order_fallback": f.order_fallback,
        "fallback_copy_pages": f.fallback_copy_pages,
        "fallback_zeropage_pages": f.fallback_zeropage_pages,
        "fallback_failed_pages": f.fallback_failed_pages,
        "move_retries": f.move_retries,
        "move_eexist_pages": f.move_eexist_pages,
        "unbacked_restored": f.unbacked_restored,
        "unbacked_poisoned": f.unbacked_poisoned,
        "unbacked_from_slot": f.unbacked_from_slot,
        "latency": latency(&f.latency),
    })
}

/// Swap and reclaim counters as JSON.
pub fn swap_json(s: &SwapStats) -> Value {
    json!({
        "swapped_pages": s.swapped_pages,
        "swapout_pages": s.swapout_pages,
        "swapout_folios": s.swapout_folios,
        "swapout_fallback_order0": s.swapout_fallback_order0,
        "swapin_fallback_order0": s.swapin_fallback_order0,
        "swapin_file_pages": s.swapin_file_pages,
        "swapin_file_folios": s.swapin_file_folios,
        "swapin_cache_folios": s.swapin_cache_folios,
        "copied_in_pages": s.copied_in_pages,
        "zero_dropped_pages": s.zero_dropped_pages,
        "clean_dropped_pages": s.clean_dropped_pages,
        "cache_dropped_pages": s.cache_dropped_pages,
        "clean_kept_pages": s.clean_kept_pages,
        "clean_dirtied_pages": s.clean_dirtied_pages,
        "poisoned_pages": s.poisoned_pages,
        "read_errors": s.read_errors,
        "write_errors": s.write_errors,
        "swap_full": s.swap_full,
        "reclaim_scanned": s.reclaim_scanned,
        "reclaimed_pages": s.reclaimed_pages,
        "direct_reclaims": s.direct_reclaims,
        "swapin_latency": latency(&s.swapin_latency),
        "swapcache_latency": latency(&s.swapcache_latency),
    })
}

/// One VM as JSON.
pub fn vm_json(v: &VmSample) -> Value {
    let mut o = json!({
        "name": v.name,
        "state": v.state,
        "vcpus": v.vcpus,
        "mem_bytes": v.mem_bytes,
        "drives": v.drives.iter().map(|(id, c)| json!({
            "id": id,
            "ok_requests": c.ok,
            "error_requests": c.errors,
            "malformed_requests": c.malformed,
            "read_bytes": c.read_bytes,
            "write_bytes": c.write_bytes,
            "memory_waits": c.deferred,
        })).collect::<Vec<_>>(),
    });
    if let Some(s) = &v.stats {
        o["memory"] = json!({
            "resident_bytes": s.resident_bytes_by_order.iter().sum::<u64>(),
            "resident_bytes_by_order": by_order(&s.resident_bytes_by_order),
            "faults": faults(&s.faults),
            "discarded_pages": s.discarded_pages,
            "pinned_pages": s.pinned_pages,
            "swap": swap_json(&s.swap),
            "limits": {
                "min_bytes": s.limits.min_bytes,
                "max_bytes": s.limits.max_bytes,
                "priority": s.limits.priority,
            },
        });
    }
    o
}

/// The host-wide statistics as JSON.
pub fn host_json(h: &MmStats) -> Value {
    json!({
        "pool_bytes": h.pool_bytes,
        "budget_bytes": h.budget_bytes,
        "free_bytes": h.free_bytes,
        "free_bytes_by_order": by_order(&h.free_bytes_by_order),
        "prezeroed_bytes_by_order": by_order(&h.ready_bytes_by_order),
        "folios_by_order": by_order(&h.folios_by_order),
        "unusable_index_2m_permille": h.unusable_index_pmd,
        "deferred_split_queue": h.deferred_split_queue,
        "faults": faults(&h.faults),
        "move_undercounts": h.move_undercounts,
        "pool_stranded_pages": h.pool_stranded_pages,
        "metadata_bytes": h.metadata_bytes,
        "guest_pages": h.guest_pages,
        "metadata_bytes_per_guest_page": h.metadata_bytes as f64 / h.guest_pages.max(1) as f64,
        "swap": swap_json(&h.swap),
        "swap_file": {
            "total_bytes": h.swap_device.total_bytes,
            "used_bytes": h.swap_device.used_bytes,
            "swap_cache_pages": h.swap_device.cache_pages,
            "direct_io": h.swap_device.direct_io,
            "in_memory": h.swap_device.in_memory,
        },
        "migration": {
            "migrated_folios": h.migration.migrated,
            "migrated_swapcache_folios": h.migration.migrated_swapcache,
            "failed": h.migration.failed,
            "skipped_pinned": h.migration.skipped_pinned,
            "copied_bytes": h.migration.copy_bytes,
            "compacted_2m_blocks": h.migration.compact_blocks,
            "collapsed_2m_folios": h.migration.collapsed,
            "relocations": h.migration.relocations,
            "relocations_undone": h.migration.relocations_undone,
            "background_compaction_rounds": h.migration.kcompactd_rounds,
        },
    })
}

impl MemSample {
    /// `GET /stats`.
    pub fn to_json(&self) -> Value {
        json!({
            "host": self.host.as_ref().map(host_json),
            "vms": self.vms.iter().map(vm_json).collect::<Vec<_>>(),
        })
    }

    /// `GET /metrics`, Prometheus text exposition format 0.0.4.
    pub fn to_prometheus(&self) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, rows: Vec<(String, f64)>| {
            let _ = writeln!(
                out,
                "# HELP foliovm_{name} {help}\n# TYPE foliovm_{name} {kind}"
            );
            for (labels, v) in rows {
                let _ = writeln!(out, "foliovm_{name}{labels} {v}");
            }
        };
        let vm_rows = |f: &dyn Fn(&VmSample) -> Option<f64>| -> Vec<(String, f64)> {
            self.vms
                .iter()
                .filter_map(|v| f(v).map(|x| (format!("{{vm=\"{}\"}}", v.name), x)))
                .collect()
        };
        metric(
            "vm_running",
            "gauge",
            "1 if the VM's vCPUs are running.",
            vm_rows(&|v| Some(f64::from(u8::from(v.state == "Running")))),
        );
        metric(
            "vm_memory_bytes",
            "gauge",
            "Guest RAM size.",
            vm_rows(&|v| Some(v.mem_bytes as f64)),
        );
        let mut resident = Vec::new();
        let mut faults_rows = Vec::new();
        let mut swapped = Vec::new();
        let mut swapins = Vec::new();
        let mut swapouts = Vec::new();
        let mut stalls = Vec::new();
        for v in &self.vms {
            if let Some(s) = &v.stats {
                for (o, b) in s.resident_bytes_by_order.iter().enumerate() {
                    resident.push((
                        format!("{{vm=\"{}\",folio=\"{}\"}}", v.name, size_name(o)),
                        *b as f64,
                    ));
                }
                let l = format!("{{vm=\"{}\"}}", v.name);
                faults_rows.push((l.clone(), s.faults.events as f64));
                stalls.push((l.clone(), s.faults.memory_stalls as f64));
                swapped.push((l.clone(), (s.swap.swapped_pages * 4096) as f64));
                swapins.push((l.clone(), s.swap.swapin_file_pages as f64));
                swapouts.push((l, s.swap.swapout_pages as f64));
            }
        }
        metric(
            "resident_bytes",
            "gauge",
            "Guest memory resident in host memory, by folio size.",
            resident,
        );
        metric(
            "faults_total",
            "counter",
            "userfaultfd faults served.",
            faults_rows,
        );
        metric(
            "memory_stalls_total",
            "counter",
            "Memory stalls: a fault that waited 10 s or more for memory, once per stall.",
            stalls,
        );
        metric(
            "swapped_bytes",
            "gauge",
            "Guest memory in the swap file.",
            swapped,
        );
        metric(
            "swapin_pages_total",
            "counter",
            "Pages read back from the swap file.",
            swapins,
        );
        metric(
            "swapout_pages_total",
            "counter",
            "Pages written to the swap file.",
            swapouts,
        );
        type DriveField = fn(&BlockCounters) -> u64;
        let drive_metrics: [(&str, &str, DriveField); 6] = [
            (
                "drive_ok_requests_total",
                "Drive requests answered with success.",
                |c| c.ok,
            ),
            (
                "drive_malformed_requests_total",
                "Drive requests the device could not parse (answered with an error).",
                |c| c.malformed,
            ),
            (
                "drive_read_bytes_total",
                "Bytes the guest read from a drive.",
                |c| c.read_bytes,
            ),
            (
                "drive_write_bytes_total",
                "Bytes the guest wrote to a drive.",
                |c| c.write_bytes,
            ),
            (
                "drive_errors_total",
                "Drive requests answered with an error (malformed ones included).",
                |c| c.errors,
            ),
            (
                "drive_memory_waits_total",
                "Times a drive request was put back to wait for guest memory.",
                |c| c.deferred,
            ),
        ];
        for (name, help, field) in drive_metrics {
            let rows = self
                .vms
                .iter()
                .flat_map(|v| {
                    v.drives.iter().map(move |(id, c)| {
                        let labels = format!("{{vm=\"{}\",drive=\"{}\"}}", v.name, escape(id));
                        (labels, field(c) as f64)
                    })
                })
                .collect();
            metric(name, "counter", help, rows);
        }
        if let Some(h) = &self.host {
            let free = (0..Order::COUNT)
                .map(|o| {
                    (
                        format!("{{folio=\"{}\"}}", size_name(o)),
                        h.free_bytes_by_order[o] as f64,
                    )
                })
                .collect();
            metric(
                "pool_bytes",
                "gauge",
                "Pool size: the largest host memory budget.",
                vec![(String::new(), h.pool_bytes as f64)],
            );
            metric(
                "budget_bytes",
                "gauge",
                "Host memory budget now (the pool less offline memory).",
                vec![(String::new(), h.budget_bytes as f64)],
            );
            metric(
                "pool_free_bytes",
                "gauge",
                "Free pool memory, by free block size.",
                free,
            );
            let m = &h.migration;
            for (name, help, v) in [
                (
                    "migrated_folios_total",
                    "Folios migrated to new pool blocks.",
                    m.migrated,
                ),
                (
                    "compacted_blocks_total",
                    "Free 2 MiB pool blocks rebuilt by compaction.",
                    m.compact_blocks,
                ),
                (
                    "collapsed_folios_total",
                    "Guest ranges collapsed into 2 MiB folios.",
                    m.collapsed,
                ),
                (
                    "relocations_total",
                    "Region relocations completed.",
                    m.relocations,
                ),
                (
                    "relocations_undone_total",
                    "Region relocations that failed and were undone.",
                    m.relocations_undone,
                ),
            ] {
                metric(name, "counter", help, vec![(String::new(), v as f64)]);
            }
            metric(
                "metadata_bytes",
                "gauge",
                "Memory manager metadata.",
                vec![(String::new(), h.metadata_bytes as f64)],
            );
            metric(
                "fault_fallback_pages_total",
                "counter",
                "Pages served by UFFDIO_COPY or ZEROPAGE instead of MOVE.",
                vec![(
                    String::new(),
                    (h.faults.fallback_copy_pages + h.faults.fallback_zeropage_pages) as f64,
                )],
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_name_folio_orders() {
        assert_eq!(size_name(0), "4K");
        assert_eq!(size_name(4), "64K");
        assert_eq!(size_name(8), "1M");
        assert_eq!(size_name(9), "2M");
    }

    /// The README names these counters as what to look at when the
    /// kernel's `UFFDIO_MOVE` undercounts or a present page lost its host
    /// page; `GET /stats` must carry them.
    #[test]
    fn repair_counters_are_in_the_stats() {
        let f = FaultStats {
            unbacked_restored: 1,
            unbacked_poisoned: 2,
            unbacked_from_slot: 3,
            move_eexist_pages: 4,
            fallback_failed_pages: 6,
            ..Default::default()
        };
        let j = faults(&f);
        assert_eq!(
            [
                &j["unbacked_restored"],
                &j["unbacked_poisoned"],
                &j["unbacked_from_slot"],
                &j["move_eexist_pages"],
                &j["fallback_failed_pages"]
            ],
            [1, 2, 3, 4, 6]
        );
        let h = MmStats {
            move_undercounts: 5,
            pool_stranded_pages: 2,
            ..Default::default()
        };
        assert_eq!(host_json(&h)["move_undercounts"], 5);
        assert_eq!(host_json(&h)["pool_stranded_pages"], 2);
    }

    #[test]
    fn prometheus_lines_are_well_formed() {
        let s = MemSample {
            host: None,
            vms: vec![VmSample {
                name: "a".into(),
                state: "Running",
                vcpus: 1,
                mem_bytes: 1 << 20,
                stats: None,
                drives: vec![(
                    "root\"fs".into(),
                    BlockCounters {
                        read_bytes: 4096,
                        deferred: 3,
                        ok: 7,
                        malformed: 2,
                        ..Default::default()
                    },
                )],
            }],
        };
        let text = s.to_prometheus();
        assert!(text.contains("foliovm_vm_running{vm=\"a\"} 1\n"), "{text}");
        assert!(
            text.contains("foliovm_drive_read_bytes_total{vm=\"a\",drive=\"root\\\"fs\"} 4096\n"),
            "{text}"
        );
        assert!(
            text.contains("foliovm_drive_memory_waits_total{vm=\"a\",drive=\"root\\\"fs\"} 3\n"),
            "{text}"
        );
        for (name, value) in [("ok_requests", 7), ("malformed_requests", 2)] {
            let line =
                format!("foliovm_drive_{name}_total{{vm=\"a\",drive=\"root\\\"fs\"}} {value}\n");
            assert!(text.contains(&line), "{line} in {text}");
        }
        let drive = &s.to_json()["vms"][0]["drives"][0];
        assert_eq!(drive["id"], "root\"fs");
        assert_eq!(drive["read_bytes"], 4096);
        assert_eq!(drive["memory_waits"], 3);
        assert!(
            text.contains("foliovm_vm_memory_bytes{vm=\"a\"} 1048576\n"),
            "{text}"
        );
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(name.starts_with("foliovm_"), "{line}");
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
        assert_eq!(s.to_json()["vms"][0]["name"], "a");
    }
}
