//! Overcommit: two 512 MiB workload guests share a 384 MiB budget and a swap
//! file; every page of both verifies, and every page of the sequential one
//! went out to the swap file and came back several times.

use foliovm_tests::{kvm_available, run_foliovm, ApiVm};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A finished `foliovm run --config` of several VMs.
struct Run {
    /// The temporary directory holding the config (the caller removes it).
    dir: PathBuf,
    stdout: String,
    stderr: String,
    /// The `FOLIOVM-RESULT` lines, parsed.
    results: Vec<Value>,
}

/// Write `config(dir)` to `vms.json` in a fresh temporary directory and run
/// `foliovm run --config` on it with `extra` arguments, within `limit`;
/// foliovm must exit 0.
fn run_config(
    tag: &str,
    config: impl FnOnce(&Path) -> Value,
    extra: &[&str],
    limit: Duration,
) -> Run {
    let dir = std::env::temp_dir().join(format!("foliovm-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("vms.json");
    std::fs::write(&cfg, config(&dir).to_string()).unwrap();
    let mut args = vec!["run", "--config", cfg.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = run_foliovm(&args, limit);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{stderr}",
        out.status
    );
    let results = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("FOLIOVM-RESULT "))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    Run {
        dir,
        stdout,
        stderr,
        results,
    }
}

#[test]
fn two_guests_over_budget_swap_and_verify_every_page() {
    if !kvm_available() {
        return;
    }
    let config = |dir: &Path| {
        serde_json::json!({
            "foliovm": {"mem_budget": "384M", "swap_dir": dir, "swap_size": "2G"},
            "vms": [
                {"name": "seq", "machine-config": {"vcpu_count": 1, "mem_size_mib": 520},
                 "foliovm": {"workload": "seq:512M,passes=3"}},
                {"name": "zipf", "machine-config": {"vcpu_count": 1, "mem_size_mib": 520},
                 "foliovm": {"workload": "zipf:512M,ops=150000", "mem_min": "64M"}}
            ]
        })
    };
    let Run {
        dir,
        stdout,
        results,
        ..
    } = run_config("oc", config, &[], Duration::from_secs(600));
    assert_eq!(results.len(), 2, "{stdout}");
    let pages = (512u64 << 20) / 4096;
    for r in &results {
        assert_eq!(r["mismatches"], 0, "{r}");
        assert_eq!(r["complete"], true, "{r}");
        assert_eq!(r["backend"], "folio");
        let swap = &r["swap"];
        assert!(swap["swapout_pages"].as_u64().unwrap() > 0, "{r}");
        assert_eq!(swap["poisoned_pages"], 0, "{r}");
    }
    // The zipf guest's reads of swapped pages keep them clean
    // (write-protected, their slot kept), and its writes to such pages
    // raise WP faults from the vCPU that foliovm serves.
    let zipf = &results.iter().find(|r| r["vm"] == "zipf").unwrap()["swap"];
    assert!(zipf["clean_kept_pages"].as_u64().unwrap() > 0, "{zipf}");
    assert!(zipf["clean_dirtied_pages"].as_u64().unwrap() > 0, "{zipf}");
    let seq = results.iter().find(|r| r["vm"] == "seq").unwrap();
    // Three passes and the final sweep each read every page; with less than
    // 384 MiB for 1 GiB of guest memory, at least the last three find the
    // page evicted.
    let back = seq["swap"]["swapin_file_pages"].as_u64().unwrap();
    assert!(
        back >= 2 * pages,
        "only {back} pages swapped in for {pages} pages: {seq}"
    );
    assert_eq!(seq["verified_pages"], 3 * pages);
    // No swap file is left behind in the directory (it is O_TMPFILE).
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A guest that touches more than a budget with no swap file behind it
/// does not hang silently: foliovm warns at start, reports the stall on
/// stderr and in `GET /stats` once a fault has waited 10 s, and still
/// stops cleanly on SIGTERM.
#[test]
fn a_guest_over_budget_without_swap_is_warned_of_and_its_stall_reported() {
    if !kvm_available() {
        return;
    }
    let vm = ApiVm::spawn(
        "stall",
        &[
            "run",
            "--workload",
            "seq:64M",
            "--mem",
            "128M",
            "--mem-budget",
            "32M",
        ],
    );
    vm.wait_for_stderr(
        "memory stall: 1 fault(s) of VM vm0",
        Duration::from_secs(90),
    );
    let stats = vm.call("GET", "/stats", None).json();
    assert_eq!(
        stats["vms"][0]["memory"]["faults"]["memory_stalls"], 1,
        "{stats}"
    );
    assert_eq!(stats["host"]["faults"]["memory_stalls"], 1, "{stats}");
    let metrics = vm.call("GET", "/metrics", None).body;
    assert!(
        metrics.contains("foliovm_memory_stalls_total{vm=\"vm0\"} 1"),
        "{metrics}"
    );
    // SAFETY: kill(2) on our own child's pid has no memory-safety impact.
    unsafe { libc::kill(vm.child.id() as i32, libc::SIGTERM) };
    let out = vm.wait(Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the memory budget is below the guests' memory and there is no swap file"),
        "{stderr}"
    );
    assert!(
        stderr.contains("there is no swap file, so guest memory cannot be swapped out"),
        "{stderr}"
    );
    assert!(stderr.contains("interrupted by signal 15"), "{stderr}");
}

/// In a run of several VMs, one that finishes gives its guest memory back
/// at once, not when the whole run ends: here the second VM touches more
/// than the budget leaves it beside the first (no swap file), and it
/// completes only because the first's memory was released when it stopped.
/// Both touch memory at once, so the first must finish before the second
/// takes what the first still needs, or both wait for good: with the first
/// needing 128 MiB of a 384 MiB budget, the second had to run twice as
/// fast, which a CI run once saw. Now the first needs 32 MiB of 304 MiB,
/// and the second would have to run eight times as fast.
#[test]
fn a_vm_that_stops_gives_its_memory_to_the_vms_still_running() {
    if !kvm_available() {
        return;
    }
    let config = |_: &Path| {
        serde_json::json!({
            "foliovm": {"mem_budget": "304M"},
            "vms": [
                {"name": "a", "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
                 "foliovm": {"workload": "seq:32M,passes=1"}},
                {"name": "b", "machine-config": {"vcpu_count": 1, "mem_size_mib": 320},
                 "foliovm": {"workload": "seq:290M,passes=1"}}
            ]
        })
    };
    let run = run_config(
        "reap",
        config,
        &["--log-level", "info"],
        Duration::from_secs(120),
    );
    let _ = std::fs::remove_dir_all(&run.dir);
    let (stdout, stderr, results) = (run.stdout, run.stderr, run.results);
    assert!(stderr.contains("guest memory released vm=a"), "{stderr}");
    assert_eq!(results.len(), 2, "{stdout}");
    for r in &results {
        assert_eq!(r["complete"], true, "{r}");
        assert_eq!(r["mismatches"], 0, "{r}");
    }
}
