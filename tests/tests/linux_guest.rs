//! A real Linux guest boots to its init, which runs a user command. Slow on a
//! software KVM (minutes), so the boots of this file take turns.

use foliovm_tests::{kvm_available, repo_root};
use serde_json::Value;
use std::time::{Duration, Instant};

/// Generous: the boot takes about 4 minutes on kvm-pvm.
const LIMIT: Duration = Duration::from_secs(20 * 60);

/// The command-line boot runs with a memory budget far below its RAM and
/// below what the boot touches, so that the guest kernel's own memory
/// (its text and data, page tables, page cache, the unpacked initramfs)
/// goes out to swap and comes back while it boots, through KVM's faults.
/// Two boots here swapped out 8,520 and 9,067 pages and read 3,075 and
/// 3,829 back, in about 75 s, as long as a boot within its RAM.
const BUDGET: &str = "16M";

#[test]
fn linux_guest_boots_to_init_and_runs_a_command() {
    if !kvm_available() {
        return;
    }
    let _serial = foliovm_tests::linux_boot_lock();
    let out_dir = repo_root().join("guest-images/out");
    let kernel = out_dir.join("vmlinux");
    // Uncompressed: gunzip at emulated CPL0 costs about a minute on kvm-pvm.
    let initrd = out_dir.join("initramfs.cpio");
    assert!(
        kernel.exists() && initrd.exists(),
        "guest images missing in {}: run guest-images/build.sh (the README's setup command does)",
        out_dir.display()
    );
    let swap_dir = std::env::temp_dir();
    let start = Instant::now();
    let vm = foliovm_tests::ApiVm::spawn(
        "linux-guest",
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
            "--mem-budget",
            BUDGET,
            "--swap-dir",
            swap_dir.to_str().unwrap(),
            "--swap-size",
            "256M",
            "--cmdline",
            "console=ttyS0 reboot=k panic=1 pci=off -- cat /sys/devices/system/cpu/present; md5sum /bin/busybox",
        ],
    );
    // The VM's statistics as the API showed them last, until it is gone.
    let mut last: Option<Value> = None;
    while let Ok(r) =
        vmm::api::client::request(vm.sock(), "GET", "/vms/vm0", None, Duration::from_secs(10))
    {
        if r.status != 200 {
            break;
        }
        last = Some(r.json());
        assert!(start.elapsed() < LIMIT, "the guest did not finish");
        std::thread::sleep(Duration::from_millis(500));
    }
    let out = vm.wait(LIMIT);
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
    // Every byte of the 1.9 MiB busybox binary the kernel unpacked from
    // the initramfs at boot (page cache, swapped out and back since) reads
    // back as the host wrote it.
    // (On stdin: `cpio -F` opens /dev/tty, which a test may not have.)
    let busybox = std::process::Command::new("cpio")
        .args(["-i", "--quiet", "--to-stdout", "bin/busybox"])
        .stdin(std::fs::File::open(&initrd).unwrap())
        .output()
        .expect("cpio");
    assert!(
        busybox.status.success() && busybox.stdout.len() > 1 << 20,
        "cpio: {}",
        String::from_utf8_lossy(&busybox.stderr)
    );
    let md5 = foliovm_tests::md5_hex(&busybox.stdout);
    assert!(
        lines.contains(&format!("{md5}  /bin/busybox").as_str()),
        "the guest's busybox does not hash to {md5}\nstdout:\n{stdout}"
    );
    assert!(stdout.contains("FOLIOVM-CMD-EXIT=0"), "stdout:\n{stdout}");
    assert!(
        out.status.success(),
        "exit {:?}\nstderr:\n{stderr}",
        out.status
    );
    // The boot went through swap, both ways, and lost nothing.
    let last = last.expect("the API never answered while the guest ran");
    let swap = &last["memory"]["swap"];
    let n = |k: &str| {
        swap[k]
            .as_u64()
            .unwrap_or_else(|| panic!("no {k} in {last}"))
    };
    eprintln!(
        "under a {BUDGET} budget: {} pages swapped out, {} read back, {} refaulted from the swap cache",
        n("swapout_pages"),
        n("swapin_file_pages"),
        n("swapin_cache_folios")
    );
    assert!(
        n("swapout_pages") > 0 && n("swapin_file_pages") > 0,
        "the boot did not swap both ways: {swap}"
    );
    assert_eq!(
        (n("poisoned_pages"), n("read_errors"), n("write_errors")),
        (0, 0, 0),
        "{swap}"
    );
}

/// The request sequence of Firecracker's getting-started guide, sent to
/// `foliovm run --api-sock`, boots a guest with a drive and a balloon
/// configured by `PUT /drives/{id}` and `PUT /balloon`; Firecracker's
/// `SendCtrlAltDel` then ends it.
#[test]
fn firecracker_api_sequence_boots_linux_and_ctrl_alt_del_ends_it() {
    if !kvm_available() {
        return;
    }
    let _serial = foliovm_tests::linux_boot_lock();
    let out_dir = repo_root().join("guest-images/out");
    let (kernel, initrd) = (out_dir.join("vmlinux"), out_dir.join("initramfs.cpio"));
    assert!(
        kernel.exists() && initrd.exists(),
        "run guest-images/build.sh first"
    );
    let vm = foliovm_tests::ApiVm::spawn("fc", &["run"]);
    let image = std::env::temp_dir().join(format!("foliovm-fc-drive-{}", std::process::id()));
    let mut data = b"fc-drive-ok".to_vec();
    data.resize(64 << 10, 0);
    std::fs::write(&image, &data).unwrap();
    let drive = |path: &std::path::Path| {
        serde_json::json!({
            "drive_id": "data", "path_on_host": path,
            "is_root_device": false, "is_read_only": true,
        })
        .to_string()
    };
    let r = vm.call(
        "PUT",
        "/drives/data",
        Some(&drive(std::path::Path::new("/nonexistent/img"))),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("/nonexistent/img"), "{}", r.body);
    let r = vm.call("PUT", "/drives/data", Some(&drive(&image)));
    assert_eq!(r.status, 204, "{}", r.body);
    let r = vm.call(
        "PUT",
        "/balloon",
        Some(r#"{"amount_mib": 0, "deflate_on_oom": true}"#),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    let boot = serde_json::json!({
        "kernel_image_path": kernel,
        "initrd_path": initrd,
        // The shell arithmetic proves the command ran in the guest: the
        // kernel's own log echoes the command line, not its result; the
        // drive's first bytes, that the drive reached it. The sleep keeps
        // the guest up until Ctrl+Alt+Del ends it.
        "boot_args": "console=ttyS0 reboot=k panic=1 pci=off -- \
                      echo api-$((6*7)) $(head -c 11 /dev/vda); sleep 600",
    })
    .to_string();
    let r = vm.call(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "SendCtrlAltDel"}"#),
    );
    assert_eq!(r.status, 400, "no VM to send keys to yet: {}", r.body);
    // A mistyped kernel path is refused at once, as Firecracker does.
    let r = vm.call(
        "PUT",
        "/boot-source",
        Some(r#"{"kernel_image_path": "/nonexistent/vmlinux"}"#),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("/nonexistent/vmlinux"), "{}", r.body);
    // A start that fails (a file that is no kernel, with the default
    // 128 MiB machine-config) leaves nothing behind: the memory made for
    // it is not what the corrected start below (256 MiB) runs on.
    let not_a_kernel = serde_json::json!({ "kernel_image_path": image }).to_string();
    let r = vm.call("PUT", "/boot-source", Some(&not_a_kernel));
    assert_eq!(r.status, 204, "{}", r.body);
    let start = || {
        vm.call(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "InstanceStart"}"#),
        )
    };
    let r = start();
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("not a Linux kernel image"), "{}", r.body);
    let r = vm.call("PUT", "/boot-source", Some(&boot));
    assert_eq!(r.status, 204, "{}", r.body);
    let r = vm.call(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 256, "smt": false}"#),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    let r = start();
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(vm.call("GET", "/", None).json()["state"], "Running");
    let budget = vm.call("GET", "/budget", None).json();
    assert_eq!(budget["budget_bytes"], 256 << 20, "{budget}");
    let r = vm.call("PUT", "/boot-source", Some(&boot));
    assert_eq!(r.status, 400, "configuration is refused after start");
    let r = vm.call("PUT", "/drives/data", Some(&drive(&image)));
    assert_eq!(r.status, 400, "drives are refused after start");
    let balloon = vm.call("GET", "/balloon", None);
    assert_eq!(balloon.status, 200, "{}", balloon.body);
    assert_eq!(balloon.json()["deflate_on_oom"], true, "{}", balloon.body);
    vm.wait_for_line("api-42 fc-drive-ok", LIMIT);
    let _ = std::fs::remove_file(&image);
    // kseriod binds atkbd asynchronously; until it has enabled the
    // keyboard the keys are refused (and nothing is queued).
    let start = Instant::now();
    loop {
        let r = vm.call(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "SendCtrlAltDel"}"#),
        );
        if r.status == 204 {
            break;
        }
        assert_eq!(r.status, 400, "{}", r.body);
        assert!(r.body.contains("not enabled its keyboard"), "{}", r.body);
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the guest never enabled its keyboard"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let start = Instant::now();
    let out = vm.wait(Duration::from_secs(120));
    eprintln!(
        "Ctrl+Alt+Del ended the guest in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("FOLIOVM-INIT-OK"), "stdout:\n{stdout}");
    // The command was still sleeping: the keys ended the guest, not init.
    assert!(!stdout.contains("FOLIOVM-CMD-EXIT"), "stdout:\n{stdout}");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
