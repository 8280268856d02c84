//! Helpers for foliovm's integration tests: find the `foliovm` binary, decide
//! whether KVM tests can run, and run the binary with a time limit.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The `foliovm` binary built by the same `cargo test` invocation: it sits
/// in the profile directory, one level above this test's `deps/` directory.
pub fn foliovm_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in <target>/<profile>/deps");
    let bin = profile_dir.join("foliovm");
    assert!(
        bin.exists(),
        "{} not found: run the tests with `cargo test --workspace` so the binary is built",
        bin.display()
    );
    bin
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Whether KVM tests should run. Without /dev/kvm they are skipped, unless
/// `FOLIOVM_REQUIRE_KVM=1`, in which case they fail loudly.
pub fn kvm_available() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        assert!(
            std::env::var("FOLIOVM_REQUIRE_KVM").as_deref() != Ok("1"),
            "/dev/kvm is not usable and FOLIOVM_REQUIRE_KVM=1"
        );
        eprintln!("skipping: /dev/kvm is not usable");
    }
    ok
}

/// Run `foliovm` with `args`, killing it after `limit`.
pub fn run_foliovm(args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(foliovm_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn foliovm");
    let start = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "foliovm {args:?} did not finish within {limit:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The parsed `FOLIOVM-RESULT` line of a workload run.
pub fn result_line(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("FOLIOVM-RESULT "))
        .unwrap_or_else(|| {
            panic!(
                "no FOLIOVM-RESULT line\nstdout:\n{stdout}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    serde_json::from_str(line).expect("result line is JSON")
}
