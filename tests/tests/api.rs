//! The control API, driven through its socket against running guests.

use foliovm_tests::{kvm_available, result_line, ApiVm};
use std::time::Duration;

#[test]
fn api_drives_a_running_workload_guest() {
    if !kvm_available() {
        return;
    }
    let vm = ApiVm::spawn(
        "wl",
        &[
            "run",
            "--workload",
            "zipf:64M,ops=100000000000",
            "--vcpus",
            "2",
        ],
    );
    let info = vm.call("GET", "/", None).json();
    assert_eq!(
        (info["app_name"].as_str(), info["state"].as_str()),
        (Some("foliovm"), Some("Running"))
    );

    // Stats show the guest's memory coming from 2 MiB folios.
    let stats = vm.call("GET", "/stats", None).json();
    let mem = &stats["vms"][0]["memory"];
    assert!(mem["resident_bytes"].as_u64().unwrap() > 0, "{stats}");
    assert!(
        mem["resident_bytes_by_order"]["2M"].as_u64().unwrap() > 0,
        "{stats}"
    );
    assert!(
        stats["host"]["pool_bytes"].as_u64().unwrap() >= 64 << 20,
        "{stats}"
    );

    // Bad requests are refused and change nothing.
    for (m, p, b) in [
        ("PATCH", "/vm", Some(r#"{"state": "Frozen"}"#)),
        ("PATCH", "/vm", Some("{")),
        (
            "PUT",
            "/boot-source",
            Some(r#"{"kernel_image_path": "/k"}"#),
        ),
        ("PATCH", "/vms/nope", Some(r#"{"state": "Paused"}"#)),
    ] {
        let r = vm.call(m, p, b);
        assert!((400..500).contains(&r.status), "{m} {p}: {}", r.status);
        assert!(r.fault().is_some(), "{m} {p}: {}", r.body);
    }
    assert_eq!(vm.call("GET", "/vms/vm0", None).json()["state"], "Running");

    // Paused vCPU threads burn no CPU; resumed ones do.
    let r = vm.call("PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(vm.call("GET", "/vms/vm0", None).json()["state"], "Paused");
    let t0 = vm.cpu_ticks("vm0-vcpu");
    std::thread::sleep(Duration::from_millis(1000));
    let paused_ticks = vm.cpu_ticks("vm0-vcpu") - t0;
    assert!(
        paused_ticks <= 2,
        "paused vCPUs used {paused_ticks} ticks in 1 s"
    );
    let r = vm.call("PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(r.status, 400, "pausing twice is refused");
    assert_eq!(
        vm.call("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#))
            .status,
        204
    );
    let t0 = vm.cpu_ticks("vm0-vcpu");
    std::thread::sleep(Duration::from_millis(1000));
    let running_ticks = vm.cpu_ticks("vm0-vcpu") - t0;
    assert!(
        running_ticks >= 10,
        "resumed vCPUs used only {running_ticks} ticks in 1 s"
    );

    let metrics = vm.call("GET", "/metrics", None);
    assert!(
        metrics.body.contains("foliovm_vm_running{vm=\"vm0\"} 1"),
        "{}",
        metrics.body
    );

    // SIGTERM stops it cleanly.
    // SAFETY: kill(2) on our own child's pid has no memory-safety impact.
    unsafe { libc::kill(vm.child.id() as i32, libc::SIGTERM) };
    let out = vm.wait(Duration::from_secs(20));
    assert_eq!(
        out.status.code(),
        Some(143),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = result_line(&out);
    assert_eq!(r["complete"], false);
}

#[test]
fn api_waits_for_configuration_and_refuses_incomplete_starts() {
    if !kvm_available() {
        return;
    }
    let vm = ApiVm::spawn("cfg", &["run"]);
    assert_eq!(vm.call("GET", "/", None).json()["state"], "Not started");
    let r = vm.call(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(r.status, 400);
    assert!(r.fault().unwrap().contains("boot source"), "{}", r.body);
    let r = vm.call(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 2, "mem_size_mib": 256}"#),
    );
    assert_eq!(r.status, 204);
    let mc = vm.call("GET", "/machine-config", None).json();
    assert_eq!(
        (mc["vcpu_count"].as_u64(), mc["mem_size_mib"].as_u64()),
        (Some(2), Some(256))
    );
    // A kernel that does not exist fails the start with a clear message
    // and leaves the VMM waiting for a good configuration.
    let r = vm.call(
        "PUT",
        "/boot-source",
        Some(r#"{"kernel_image_path": "/nonexistent/vmlinux"}"#),
    );
    assert_eq!(r.status, 204);
    let r = vm.call(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(r.status, 400);
    assert!(
        r.fault().unwrap().contains("cannot read kernel image"),
        "{}",
        r.body
    );
    assert_eq!(vm.call("GET", "/", None).json()["state"], "Not started");
    // SAFETY: kill(2) on our own child's pid has no memory-safety impact.
    unsafe { libc::kill(vm.child.id() as i32, libc::SIGINT) };
    let out = vm.wait(Duration::from_secs(20));
    assert_eq!(
        out.status.code(),
        Some(0),
        "no VM ran: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
