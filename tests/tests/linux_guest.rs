//! A real Linux guest boots to its init, which runs a user command. Slow on a
//! software KVM (minutes), so there is exactly one such boot per test run.

use foliovm_tests::{kvm_available, repo_root, run_foliovm};
use std::time::{Duration, Instant};

/// Generous: the boot takes about 4 minutes on kvm-pvm.
const LIMIT: Duration = Duration::from_secs(20 * 60);

#[test]
fn linux_guest_boots_to_init_and_runs_a_command() {
    if !kvm_available() {
        return;
    }
    let out_dir = repo_root().join("guest-images/out");
    let kernel = out_dir.join("vmlinux");
    // Uncompressed: gunzip at emulated CPL0 costs about a minute on kvm-pvm.
    let initrd = out_dir.join("initramfs.cpio");
    assert!(
        kernel.exists() && initrd.exists(),
        "guest images missing in {}: run guest-images/build.sh (the README's setup command does)",
        out_dir.display()
    );
    let start = Instant::now();
    let out = run_foliovm(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--mem",
            "256M",
            "--vcpus",
            "2",
            "--cmdline",
            "console=ttyS0 reboot=k panic=1 pci=off -- cat /sys/devices/system/cpu/present",
        ],
        LIMIT,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("boot took {:.0} s", start.elapsed().as_secs_f64());
    assert!(
        stdout.contains("FOLIOVM-INIT-OK"),
        "no init marker\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    // The command ran in user space and saw both vCPUs (MP table). On a
    // software KVM only CPU 0 is brought up (see vmm/src/pvm.rs); `present`
    // still lists both.
    let lines: Vec<&str> = stdout.lines().map(str::trim).collect();
    let marker = lines.iter().position(|l| *l == "FOLIOVM-INIT-OK").unwrap();
    assert!(
        lines[marker..].contains(&"0-1"),
        "the guest did not report CPUs 0-1 online\nstdout:\n{stdout}"
    );
    assert!(stdout.contains("FOLIOVM-CMD-EXIT=0"), "stdout:\n{stdout}");
    assert!(
        out.status.success(),
        "exit {:?}\nstderr:\n{stderr}",
        out.status
    );
}
