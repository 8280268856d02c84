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

/// Firecracker's name for the config file flag works too, with the same
/// conflicts.
#[test]
fn config_file_is_an_alias_of_config() {
    expect_error(
        &["run", "--config-file", "/nonexistent/vm.json"],
        "cannot read config file /nonexistent/vm.json",
    );
    expect_error(
        &[
            "run",
            "--config-file",
            "/nonexistent/vm.json",
            "--workload",
            "seq:1M",
        ],
        "cannot be used with",
    );
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

/// A small deterministic generator (SplitMix64) for the fuzz below: a
/// failing case prints its seed, and `FOLIOVM_CLI_FUZZ_SEED` replays it.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A flag of `foliovm run` with values it takes in some command line
/// (`good`) and values it refuses in every one (`bad`).
struct FlagValues {
    flag: &'static str,
    good: Vec<String>,
    bad: Vec<String>,
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// How messages shared with config files and the API name a flag's
/// setting ("memory size must be greater than 0" for `--mem 0`).
fn setting_words(flag: &str) -> &'static [&'static str] {
    match flag {
        "--mem" => &["memory size"],
        "--vcpus" => &["vCPU count"],
        "--mem-min" => &["mem_min"],
        "--mem-max" => &["mem_max"],
        "--priority" => &["priority"],
        "--mem-backend" => &["memory backend"],
        "--mem-budget" => &["memory budget"],
        "--swap-file" | "--swap-dir" => &["swap file", "swap directory"],
        "--swap-size" => &["swap size"],
        "--workload" => &["workload"],
        "--kernel" => &["kernel image"],
        "--config" => &["config file"],
        _ => &[],
    }
}

/// Random `foliovm run` command lines, each with at least one value no
/// command line accepts, are refused: exit status 1 within seconds, no
/// panic, one `foliovm: error:` line (or clap's `error:`) that names a
/// flag or a value given, and no swap file left behind. A hand-tried list
/// of 41 hostile command lines came before this; this mixes their parts.
#[test]
fn random_hostile_command_lines_are_refused_by_name() {
    if !kvm_available() {
        return;
    }
    let d = TempDir::new("fuzz");
    let junk = d.file("junk", &[0x42; 8192]);
    let cut_elf = d.file("cut", &tiny_elf()[..100]);
    let junk_json = d.file("junk.json", b"{\"boot-source\": ");
    let empty_json = d.file("empty.json", b"{}");
    let unknown_json = d.file(
        "unknown.json",
        b"{\"boot-source\": {\"kernel_image_path\": \"/nonexistent\"}, \"bogus\": 1}",
    );
    let existing = d.file("exists", b"x");
    let image = d.file("disk.img", &[0; 4096]);
    let dir = d.0.to_str().unwrap().to_string();
    let swap_path = d.0.join("swap");
    let swap_file = swap_path.to_str().unwrap().to_string();
    let long = "x".repeat(5000);
    let sizes_bad = [
        "",
        "-1",
        "12Q",
        "1.5G",
        "99999999999999999999",
        "M",
        "0x10M",
    ];
    let flags = [
        FlagValues {
            flag: "--mem",
            good: strings(&["64M", "32"]),
            bad: strings(&[&sizes_bad[..], &["0", "100T"]].concat()),
        },
        FlagValues {
            flag: "--vcpus",
            good: strings(&["1", "2"]),
            bad: strings(&["0", "255", "1000", "-1", "x", ""]),
        },
        FlagValues {
            flag: "--mem-budget",
            good: strings(&["32M"]),
            bad: strings(&[&sizes_bad[..], &["0", "3M", "100T"]].concat()),
        },
        FlagValues {
            flag: "--mem-min",
            good: strings(&["0", "2M"]),
            bad: strings(&sizes_bad),
        },
        FlagValues {
            flag: "--mem-max",
            good: strings(&["1G"]),
            bad: strings(&sizes_bad),
        },
        FlagValues {
            flag: "--swap-size",
            good: strings(&["64M"]),
            bad: strings(&[&sizes_bad[..], &["0", "1K"]].concat()),
        },
        FlagValues {
            flag: "--swap-file",
            good: vec![swap_file.clone()],
            bad: vec![
                "/nonexistent/dir/swap".into(),
                existing.clone(),
                "/".into(),
                String::new(),
            ],
        },
        FlagValues {
            flag: "--swap-dir",
            good: vec![dir.clone()],
            bad: strings(&["/nonexistent/foliovm", "/etc/passwd", ""]),
        },
        FlagValues {
            flag: "--priority",
            good: strings(&["3", "-2"]),
            bad: strings(&["x", "1.5", "99999999999", ""]),
        },
        FlagValues {
            flag: "--balloon",
            good: strings(&["16M", "8M,stats=1"]),
            bad: strings(&["", "abc", "1M,bogus", "1M,stats=x", "1M,stats=1,stats=2"]),
        },
        FlagValues {
            flag: "--drive",
            good: vec![image.clone(), format!("{image},ro")],
            bad: strings(&["/nonexistent.img", ",ro", "/nonexistent.img,bogus"]),
        },
        FlagValues {
            flag: "--cmdline",
            good: strings(&["console=ttyS0 -- echo hi"]),
            bad: vec![long],
        },
        FlagValues {
            flag: "--initrd",
            good: vec![existing.clone()],
            bad: strings(&["/nonexistent.cpio", "/"]),
        },
        FlagValues {
            flag: "--log-level",
            good: strings(&["info", "error"]),
            bad: strings(&["loud", ""]),
        },
        FlagValues {
            flag: "--mem-backend",
            good: strings(&["folio", "anon"]),
            bad: strings(&["file", ""]),
        },
    ];
    // The guest: a workload, a kernel or a config file; no good kernel
    // or config (those would boot), so only workloads have good values.
    let payloads = [
        FlagValues {
            flag: "--workload",
            good: strings(&["seq:1M", "uniform:2M,seed=3", "zipf:2M,ops=1000,theta=0.9"]),
            bad: strings(&[
                "seq:0",
                "seq:",
                "zipf:1M,theta=NaN",
                "zipf:1M,theta=-1",
                "zipf:1M,theta=inf",
                "walk:1M",
                "seq:1M,bogus=1",
                "seq:1M,ops=",
                "seq:99999999999999999999M",
                // Its layout's end passed 2^64 and wrapped below the MMIO
                // gap: it was accepted, and the guest faulted.
                "seq:17163108338G",
                "uniform:1M,seed=x",
                "seq:1M,seed=1,seed=2",
                ":",
                "",
            ]),
        },
        FlagValues {
            flag: "--kernel",
            good: vec![],
            bad: vec![
                "/nonexistent/vmlinux".into(),
                "/dev/null".into(),
                junk,
                cut_elf,
                dir.clone(),
            ],
        },
        FlagValues {
            flag: "--config",
            good: vec![],
            bad: vec![
                "/nonexistent.json".into(),
                junk_json,
                empty_json,
                unknown_json,
            ],
        },
    ];
    let cases: u64 = std::env::var("FOLIOVM_CLI_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let first: u64 = std::env::var("FOLIOVM_CLI_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let mut slowest = std::time::Duration::ZERO;
    for seed in first..first + cases {
        let mut rng = Rng(seed);
        // (flag, value, bad)
        let mut chosen: Vec<(&str, String, bool)> = Vec::new();
        let add = |rng: &mut Rng, f: &FlagValues, chosen: &mut Vec<(&str, String, bool)>| {
            let bad = f.good.is_empty() || rng.below(3) == 0;
            let pool = if bad { &f.bad } else { &f.good };
            let v = pool[rng.below(pool.len())].clone();
            chosen.push((f.flag, v, bad));
        };
        // One guest in three of four; none otherwise.
        if rng.below(4) != 0 {
            let p = &payloads[rng.below(payloads.len())];
            add(&mut rng, p, &mut chosen);
        }
        let mut order: Vec<usize> = (0..flags.len()).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        for &i in &order[..rng.below(5)] {
            add(&mut rng, &flags[i], &mut chosen);
        }
        if !chosen.iter().any(|c| c.2) {
            let f = &flags[rng.below(flags.len())];
            match chosen.iter_mut().find(|c| c.0 == f.flag) {
                Some(c) => (c.1, c.2) = (f.bad[0].clone(), true),
                None => chosen.push((f.flag, f.bad[0].clone(), true)),
            }
        }
        // Flag and value as one word (`--flag=value`) now and then, as
        // users write them.
        let mut args = vec!["run".to_string()];
        for (flag, v, _) in &chosen {
            if rng.below(4) == 0 {
                args.push(format!("{flag}={v}"));
            } else {
                args.push(flag.to_string());
                args.push(v.clone());
            }
        }
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let t0 = std::time::Instant::now();
        let out = foliovm_tests::run_foliovm(&argv, std::time::Duration::from_secs(30));
        slowest = slowest.max(t0.elapsed());
        let stderr = String::from_utf8_lossy(&out.stderr);
        let what = format!("seed {seed}: foliovm {argv:?}\nstderr: {stderr}");
        assert!(!stderr.contains("panicked"), "{what}");
        assert_eq!(out.status.code(), Some(1), "{what}");
        let error: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("foliovm: error:") || l.starts_with("error:"))
            .collect();
        assert_eq!(error.len(), 1, "one error line: {what}");
        // Named: a flag given (as `--flag`, or as clap shows a value's
        // flag, `--flag <FLAG>`), or a value given or one of its options
        // (`theta=inf` of `zipf:1M,theta=inf`), of 2 bytes or more.
        // Without a guest, "nothing to run" (naming the flags that give
        // one) is the problem too.
        let no_guest = !chosen
            .iter()
            .any(|c| payloads.iter().any(|p| p.flag == c.0));
        let named = chosen.iter().any(|(flag, v, _)| {
            stderr.contains(flag)
                || setting_words(flag).iter().any(|w| stderr.contains(w))
                || std::iter::once(v.as_str())
                    .chain(v.split([',', ':']))
                    .any(|part| part.len() >= 2 && stderr.contains(part))
        }) || (no_guest && stderr.contains("nothing to run: give --kernel"));
        assert!(named, "the error names no flag or value given: {what}");
        assert!(
            !swap_path.exists(),
            "a refused run left its swap file: {what}"
        );
    }
    eprintln!("{cases} command lines refused, the slowest in {slowest:?}");
}
