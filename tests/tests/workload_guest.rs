//! The workload guest under KVM: every page verifies, with several patterns
//! and vCPUs, and the exit status says so.

use foliovm_tests::{kvm_available, result_line, run_foliovm};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);

fn check_run(args: &[&str], pattern: &str, vcpus: u64, size: u64) -> serde_json::Value {
    let out = run_foliovm(args, LIMIT);
    let r = result_line(&out);
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(r["pattern"], pattern);
    assert_eq!(r["vcpus"], vcpus);
    assert_eq!(r["size"], size);
    assert_eq!(r["mismatches"], 0, "{r}");
    assert_eq!(r["complete"], true, "{r}");
    r
}

#[test]
fn sequential_two_vcpus_verifies_every_page() {
    if !kvm_available() {
        return;
    }
    let r = check_run(
        &[
            "run",
            "--workload",
            "seq:256M",
            "--vcpus",
            "2",
            "--mem",
            "512M",
        ],
        "seq",
        2,
        256 << 20,
    );
    let pages = (256u64 << 20) / 4096;
    // Two passes touch every page twice; the second pass and the final sweep
    // each verify every page.
    assert_eq!(r["ops"], 2 * pages);
    assert_eq!(r["verified_pages"], 2 * pages);
    assert!(r["guest_seconds"].as_f64().unwrap() > 0.0);
}

#[test]
fn folio_backend_maps_aligned_folios_as_pmds() {
    if !kvm_available() {
        return;
    }
    // The data range is 2 MiB aligned; every 2 MiB of it that the guest
    // touched should be one folio moved in as one PMD.
    let r = check_run(
        &[
            "run",
            "--workload",
            "seq:128M",
            "--vcpus",
            "2",
            "--mem-backend",
            "folio",
        ],
        "seq",
        2,
        128 << 20,
    );
    assert_eq!(r["backend"], "folio");
    let huge = r["host_huge_bytes"].as_u64().unwrap();
    assert!(huge >= 128 << 20, "only {} MiB PMD-mapped: {r}", huge >> 20);
}

#[test]
fn random_patterns_verify() {
    if !kvm_available() {
        return;
    }
    for (spec, pattern) in [
        ("uniform:64M,ops=40000", "uniform"),
        ("zipf:64M,ops=40000", "zipf"),
    ] {
        let r = check_run(
            &["run", "--workload", spec, "--vcpus", "2"],
            pattern,
            2,
            64 << 20,
        );
        assert_eq!(r["ops"], 80000, "{spec}");
        // A touch verifies the page if it was written before, and the final
        // sweep verifies every page written once: together exactly one
        // verification per touch.
        assert_eq!(r["verified_pages"], 80000, "{spec}");
    }
}

#[test]
fn workload_from_config_file() {
    if !kvm_available() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("foliovm-wl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("vm.json");
    std::fs::write(
        &cfg,
        r#"{"machine-config": {"vcpu_count": 2, "mem_size_mib": 128}, "foliovm": {"workload": "seq:32M"}}"#,
    )
    .unwrap();
    check_run(
        &["run", "--config", cfg.to_str().unwrap()],
        "seq",
        2,
        32 << 20,
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn ctrl_c_stops_cleanly() {
    if !kvm_available() {
        return;
    }
    let mut child = std::process::Command::new(foliovm_tests::foliovm_bin())
        .args([
            "run",
            "--workload",
            "zipf:64M,ops=100000000000",
            "--vcpus",
            "2",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "still running before the signal"
    );
    // SAFETY: kill(2) on our own child's pid has no memory-safety impact.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let start = std::time::Instant::now();
    let out = loop {
        if child.try_wait().unwrap().is_some() {
            break child.wait_with_output().unwrap();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "did not stop after SIGINT"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted by signal 2"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
