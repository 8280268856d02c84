//! Bad input gets a clear one-line error and a non-zero exit, never a panic.

use foliovm_tests::{foliovm_bin, kvm_available};
use std::path::PathBuf;
use std::process::Command;

fn foliovm(args: &[&str]) -> (i32, String) {
    let out = Command::new(foliovm_bin())
        .args(args)
        .output()
        .expect("run foliovm");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    (out.status.code().unwrap_or(-1), stderr)
}

/// Bad input exits 1 (2 is the workload's "mismatch found").
fn expect_error(args: &[&str], want: &str) {
    let (code, stderr) = foliovm(args);
    assert_eq!(code, 1, "{args:?} should fail with 1: {stderr}");
    assert!(
        stderr.contains(want),
        "{args:?}: expected {want:?} in: {stderr}"
    );
}

struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("foliovm-cli-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn file(&self, name: &str, content: &[u8]) -> String {
        let p = self.0.join(name);
        std::fs::write(&p, content).unwrap();
        p.to_str().unwrap().to_string()
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A minimal valid ELF64 x86_64 executable with one 16-byte PT_LOAD at 16 MiB.
fn tiny_elf() -> Vec<u8> {
    let mut e = vec![0u8; 64 + 56 + 16];
    e[0..4].copy_from_slice(b"\x7fELF");
    e[4] = 2; // 64-bit
    e[5] = 1; // little endian
    e[6] = 1; // version
    let w16 = |e: &mut Vec<u8>, o: usize, v: u16| e[o..o + 2].copy_from_slice(&v.to_le_bytes());
    let w32 = |e: &mut Vec<u8>, o: usize, v: u32| e[o..o + 4].copy_from_slice(&v.to_le_bytes());
    let w64 = |e: &mut Vec<u8>, o: usize, v: u64| e[o..o + 8].copy_from_slice(&v.to_le_bytes());
    w16(&mut e, 16, 2); // ET_EXEC
    w16(&mut e, 18, 0x3e); // x86_64
    w32(&mut e, 20, 1);
    w64(&mut e, 24, 0x100_0000); // entry
    w64(&mut e, 32, 64); // phoff
    w16(&mut e, 52, 64); // ehsize
    w16(&mut e, 54, 56); // phentsize
    w16(&mut e, 56, 1); // phnum
    let ph = 64;
    w32(&mut e, ph, 1); // PT_LOAD
    w32(&mut e, ph + 4, 5);
    w64(&mut e, ph + 8, 120); // offset
    w64(&mut e, ph + 16, 0x100_0000); // vaddr
    w64(&mut e, ph + 24, 0x100_0000); // paddr
    w64(&mut e, ph + 32, 16); // filesz
    w64(&mut e, ph + 40, 16); // memsz
    w64(&mut e, ph + 48, 0x1000);
    e
}

#[test]
fn missing_and_non_kernel_images() {
    if !kvm_available() {
        return;
    }
    let d = TempDir::new("img");
    expect_error(
        &["run", "--kernel", "/nonexistent/vmlinux"],
        "cannot read kernel image /nonexistent/vmlinux",
    );
    let junk = d.file("junk", &[0x42; 8192]);
    expect_error(&["run", "--kernel", &junk], "is not a Linux kernel image");
    let truncated = d.file("trunc", b"\x7fELF\x02\x01\x01");
    expect_error(
        &["run", "--kernel", &truncated],
        "is cut short: it is 7 bytes, and its headers describe 64",
    );
    // Its segment's last byte missing.
    let elf = tiny_elf();
    let cut = d.file("cut", &elf[..elf.len() - 1]);
    expect_error(
        &["run", "--kernel", &cut],
        "is cut short: it is 135 bytes, and its headers describe 136",
    );
    // It loads at 16 MiB: an 8 MiB guest cannot hold it.
    let k = d.file("vmlinux", &tiny_elf());
    expect_error(
        &["run", "--kernel", &k, "--mem", "8M"],
        "needs guest RAM up to 17 MiB",
    );
}

#[test]
fn initrd_that_does_not_fit() {
    if !kvm_available() {
        return;
    }
    let d = TempDir::new("initrd");
    let k = d.file("vmlinux", &tiny_elf());
    let big = d.0.join("big.cpio");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(40 << 20)
        .unwrap();
    expect_error(
        &[
            "run",
            "--kernel",
            &k,
            "--initrd",
            big.to_str().unwrap(),
            "--mem",
            "32M",
        ],
        "does not fit in guest memory",
    );
    expect_error(
        &["run", "--kernel", &k, "--initrd", "/nonexistent/initrd"],
        "cannot read initrd",
    );
    // Nothing a kernel could unpack: refused, not booted into a panic.
    let empty = d.file("empty.cpio", b"");
    expect_error(&["run", "--kernel", &k, "--initrd", &empty], "is empty");
    expect_error(
        &["run", "--kernel", &k, "--initrd", "/dev/null"],
        "is not a regular file",
    );
}

#[test]
fn memory_and_vcpu_limits() {
    if !kvm_available() {
        return;
    }
    expect_error(
        &["run", "--workload", "seq:1M", "--mem", "0"],
        "memory size must be greater than 0",
    );
    expect_error(
        &["run", "--workload", "seq:1M", "--mem", "100T"],
        "exceeds the host",
    );
    expect_error(
        &["run", "--workload", "seq:1M", "--mem", "12Q"],
        "invalid size",
    );
    expect_error(
        &["run", "--workload", "seq:1M", "--vcpus", "0"],
        "vCPU count must be at least 1",
    );
    expect_error(
        &["run", "--workload", "seq:1M", "--vcpus", "1000"],
        "exceeds the maximum",
    );
    expect_error(
        &["run", "--workload", "seq:64M", "--vcpus", "255"],
        "exceeds the maximum",
    );
    expect_error(
        &["run", "--workload", "seq:64M", "--mem", "32M"],
        "needs at least",
    );
    expect_error(
        &["run", "--workload", "walk:1M"],
        "unknown workload pattern",
    );
}

#[test]
fn malformed_config_files() {
    let d = TempDir::new("cfg");
    let bad = d.file("bad.json", b"{\"machine-config\": ");
    expect_error(&["run", "--config", &bad], "malformed config file");
    let unknown = d.file(
        "unknown.json",
        br#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 64, "cpus": 2}}"#,
    );
    expect_error(&["run", "--config", &unknown], "unknown field `cpus`");
    // A key given twice, at any depth, rather than the last one winning.
    let twice = d.file(
        "twice.json",
        br#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 64, "mem_size_mib": 128}}"#,
    );
    expect_error(
        &["run", "--config", &twice],
        "key \"mem_size_mib\" given twice at line 1",
    );
    expect_error(
        &["run", "--config", "/nonexistent.json"],
        "cannot read config file",
    );
    let both = d.file(
        "x.json",
        br#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 64}}"#,
    );
    expect_error(
        &["run", "--config", &both, "--kernel", "/x"],
        "cannot be used with",
    );
    expect_error(
        &["run", "--config", &both, "--vcpus", "4"],
        "cannot be combined with --config",
    );
    let img = d.file("disk.img", &[0u8; 4096]);
    let text = format!(
        r#"{{"drives": [{{"drive_id": "d", "path_on_host": "{img}", "is_root_device": false, "is_read_only": true}}], "machine-config": {{"vcpu_count": 1, "mem_size_mib": 64}}, "foliovm": {{"workload": "seq:4M"}}}}"#
    );
    let f = d.file("wl-drive.json", text.as_bytes());
    expect_error(
        &["run", "--config", &f],
        "drives and balloon need a Linux guest",
    );
    // Names the API could not address, a thread could not carry, or a
    // Prometheus label would break on. JSON string bodies: empty, a
    // slash, a NUL, quotes.
    for name in ["", "a/b", r"a\u0000b", r#"say \"hi\""#] {
        let text = format!(
            r#"{{"vms": [{{"name": "{name}", "machine-config": {{"vcpu_count": 1, "mem_size_mib": 64}}, "foliovm": {{"workload": "seq:4M"}}}}]}}"#
        );
        let f = d.file("names.json", text.as_bytes());
        expect_error(&["run", "--config", &f], "must be 1 to 64 characters");
    }
}

#[test]
fn nothing_to_run() {
    expect_error(&["run"], "nothing to run");
}

/// Flags the chosen guest or backend has no use for are refused, not
/// ignored; a flag clap itself refuses exits 1 like any bad input, and
/// help exits 0.
#[test]
fn flags_the_guest_cannot_use_are_refused() {
    for (flag, value) in [
        ("--drive", "/nonexistent.img"),
        ("--balloon", "2M"),
        ("--initrd", "/nonexistent"),
        ("--cmdline", "foo"),
    ] {
        expect_error(
            &["run", "--workload", "seq:4M", flag, value],
            "cannot be used with",
        );
    }
    for flag in [
        ["--mem-min", "4M"],
        ["--mem-max", "8M"],
        ["--priority", "1"],
    ] {
        expect_error(
            &[
                "run",
                "--workload",
                "seq:4M",
                "--mem-backend",
                "anon",
                flag[0],
                flag[1],
            ],
            "need the folio memory backend",
        );
    }
    expect_error(&["run", "--bogus"], "unexpected argument '--bogus'");
    let (code, stdout) = {
        let out = Command::new(foliovm_bin())
            .args(["run", "--help"])
            .output()
            .expect("run foliovm");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    assert_eq!(code, Some(0));
    assert!(stdout.contains("--workload"), "{stdout}");
}

/// With `--api-sock` alone the VM comes from the API: flags that describe
/// a command-line VM would be ignored, so they are refused.
#[test]
fn vm_flags_without_a_vm_are_refused() {
    let sock = std::env::temp_dir().join(format!("foliovm-cli-flags-{}.sock", std::process::id()));
    let sock = sock.to_str().unwrap();
    for flag in [["--mem", "1G"], ["--vcpus", "4"], ["--mem-min", "64M"]] {
        expect_error(
            &["run", "--api-sock", sock, flag[0], flag[1]],
            &format!("{} describes a VM given on the command line", flag[0]),
        );
    }
    assert!(!std::path::Path::new(sock).exists(), "no API served");
    // The swap file is made only when the API starts the VM; a bad
    // swap flag is refused at once all the same.
    expect_error(
        &[
            "run",
            "--api-sock",
            sock,
            "--swap-dir",
            "/nonexistent/foliovm",
            "--swap-size",
            "64M",
        ],
        "cannot create swap file in /nonexistent/foliovm",
    );
    expect_error(
        &[
            "run",
            "--api-sock",
            sock,
            "--swap-dir",
            "/tmp",
            "--swap-size",
            "1M",
        ],
        "below the minimum",
    );
    // So is a budget no VM could be started with.
    expect_error(
        &["run", "--api-sock", sock, "--mem-budget", "3M"],
        "must be a whole number of 2 MiB blocks",
    );
    assert!(!std::path::Path::new(sock).exists(), "no API served");
}

#[test]
fn guest_exceptions_and_triple_faults_fail_with_one_line() {
    if !kvm_available() {
        return;
    }
    let (code, stderr) = foliovm(&["run", "--workload", "ud:4K"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("workload guest exception vector 6 on vCPU 0 at rip 0x"),
        "{stderr}"
    );
    let (code, stderr) = foliovm(&["run", "--workload", "triple:8K", "--vcpus", "2"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("guest triple fault (KVM_EXIT_SHUTDOWN)"),
        "{stderr}"
    );
    // One line: the reason, not a cascade.
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn logs_go_to_the_log_file_at_the_chosen_level() {
    if !kvm_available() {
        return;
    }
    let d = TempDir::new("log");
    let log = d.0.join("foliovm.log");
    let out = Command::new(foliovm_bin())
        .args([
            "run",
            "--workload",
            "seq:4M",
            "--log-level",
            "info",
            "--log-file",
        ])
        .arg(&log)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("VM built") && text.contains("VM stopped"),
        "{text}"
    );
    assert!(!text.contains('\x1b'), "no colour codes in a file: {text}");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("VM built"));
    expect_error(
        &["run", "--workload", "seq:4M", "--log-level", "loud"],
        "invalid value 'loud'",
    );
}

/// A swap size that is refused is the one line on stderr: the warning
/// that budget and swap together are below the guest's memory came
/// first, for a swap file that was never made.
#[test]
fn a_refused_swap_size_is_not_warned_of_first() {
    if !kvm_available() {
        return;
    }
    let (code, stderr) = foliovm(&[
        "run",
        "--workload",
        "seq:4M",
        "--mem",
        "64M",
        "--mem-budget",
        "32M",
        "--swap-dir",
        "/var/tmp",
        "--swap-size",
        "1M",
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("swap size 1 MiB is below the minimum of 2 MiB"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}
