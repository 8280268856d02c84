//! Helpers for foliovm's integration tests: find the `foliovm` binary, decide
//! whether KVM tests can run, and run the binary with a time limit.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The `foliovm` binary of the profile this test was built in: it sits in
/// the profile directory, one level above this test's `deps/` directory.
///
/// `cargo test --workspace` builds it only when something else asks for
/// it (this crate is not its package, so cargo does not count it among
/// the binaries these tests need): on a fresh target directory it would be
/// missing, and after a change to `vmm` stale. So the first call in each
/// test binary has cargo build it (a no-op when it is up to date). Run
/// outside cargo (no `CARGO` in the environment), the binary found is used
/// as it is.
pub fn foliovm_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    BIN.get_or_init(build_foliovm)
        .clone()
        .unwrap_or_else(|e| panic!("{e}"))
}

fn build_foliovm() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("test binary does not live in <target>/<profile>/deps")?;
    let bin = profile_dir.join("foliovm");
    if let (Some(cargo), Some(target), Some(profile)) = (
        std::env::var_os("CARGO"),
        profile_dir.parent(),
        profile_dir.file_name().and_then(|p| p.to_str()),
    ) {
        let mut cmd = Command::new(cargo);
        cmd.current_dir(repo_root())
            .args(["build", "--quiet", "-p", "vmm", "--bin", "foliovm"])
            .arg("--target-dir")
            .arg(target);
        match profile {
            "debug" => {}
            "release" => _ = cmd.arg("--release"),
            p => _ = cmd.args(["--profile", p]),
        }
        let out = cmd
            .output()
            .map_err(|e| format!("cannot run cargo to build foliovm: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "building foliovm failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    if bin.exists() {
        Ok(bin)
    } else {
        Err(format!(
            "{} not found: run the tests with `cargo test --workspace`",
            bin.display()
        ))
    }
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Held for the whole of each Linux boot. Guest kernel code is emulated on
/// a software KVM, and every guest timer tick costs emulated work, so a boot
/// that shares its core slows down more than in proportion; boots in one
/// test binary therefore run one at a time.
pub fn linux_boot_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
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
    // Short runs (refused flags) end in milliseconds: poll often at first.
    let mut poll = Duration::from_millis(1);
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
        std::thread::sleep(poll);
        poll = (poll * 2).min(Duration::from_millis(50));
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

/// A `foliovm run ... --api-sock` child process and its socket. Its output
/// is collected on threads, so a chatty guest never blocks on a full pipe.
pub struct ApiVm {
    /// The child.
    pub child: std::process::Child,
    /// The API socket.
    pub sock: PathBuf,
    /// stdout and stderr so far.
    output: [Arc<Mutex<Vec<u8>>>; 2],
    readers: Vec<std::thread::JoinHandle<()>>,
}

fn drain<R: std::io::Read + Send + 'static>(
    r: Option<R>,
    buf: Arc<Mutex<Vec<u8>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let Some(mut r) = r else { return };
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = r.read(&mut chunk) {
            buf.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    })
}

impl ApiVm {
    /// Start `foliovm run <args> --api-sock <tmp>` and wait for the socket.
    pub fn spawn(tag: &str, args: &[&str]) -> ApiVm {
        ApiVm::spawn_env(tag, &[], args)
    }

    /// [`ApiVm::spawn`] with extra environment variables.
    pub fn spawn_env(tag: &str, env: &[(&str, &str)], args: &[&str]) -> ApiVm {
        let sock = std::env::temp_dir().join(format!("foliovm-{tag}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&sock);
        let mut child = Command::new(foliovm_bin())
            .envs(env.iter().copied())
            .args(args)
            .arg("--api-sock")
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn foliovm");
        let output = [Arc::default(), Arc::default()];
        let readers = vec![
            drain(child.stdout.take(), Arc::clone(&output[0])),
            drain(child.stderr.take(), Arc::clone(&output[1])),
        ];
        let vm = ApiVm {
            child,
            sock,
            output,
            readers,
        };
        let start = Instant::now();
        while !vm.sock.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "API socket never appeared"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        vm
    }

    /// The foliovm process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The API socket's path.
    pub fn sock(&self) -> &std::path::Path {
        &self.sock
    }

    /// One API request; panics if the socket does not answer.
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> vmm::api::client::Reply {
        vmm::api::client::request(&self.sock, method, path, body, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// utime + stime, in clock ticks, of the process's threads whose name
    /// starts with `prefix` (vCPU threads are named `<vm>-vcpu<N>`).
    pub fn cpu_ticks(&self, prefix: &str) -> u64 {
        let dir = format!("/proc/{}/task", self.child.id());
        let mut total = 0;
        for t in std::fs::read_dir(dir).expect("task dir").flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if !comm.starts_with(prefix) {
                continue;
            }
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            // Fields after the ")" of the name; utime and stime are 14 and 15.
            let Some(end) = stat.rfind(')') else { continue };
            let f: Vec<&str> = stat[end + 2..].split_whitespace().collect();
            total += f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0);
        }
        total
    }

    /// Whether a line of the child's stdout so far is `line`.
    pub fn has_line(&self, line: &str) -> bool {
        String::from_utf8_lossy(&self.output[0].lock().unwrap())
            .lines()
            .any(|l| l.trim() == line)
    }

    /// Wait (up to `limit`) until a line of the child's stdout is `line`;
    /// panics with the output so far otherwise.
    pub fn wait_for_line(&self, line: &str, limit: Duration) {
        self.wait_for_output(&format!("line {line:?}"), limit, || self.has_line(line));
    }

    /// Wait (up to `limit`) until the child's stderr so far contains
    /// `text`; panics with the output so far otherwise.
    pub fn wait_for_stderr(&self, text: &str, limit: Duration) {
        self.wait_for_output(&format!("{text:?} on stderr"), limit, || {
            String::from_utf8_lossy(&self.output[1].lock().unwrap()).contains(text)
        });
    }

    /// Poll `seen` every 100 ms for up to `limit`; panics naming `what`,
    /// with the output so far, if it never holds.
    fn wait_for_output(&self, what: &str, limit: Duration, seen: impl Fn() -> bool) {
        let start = Instant::now();
        while !seen() {
            assert!(
                start.elapsed() < limit,
                "no {what} within {limit:?}; stdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&self.output[0].lock().unwrap()),
                String::from_utf8_lossy(&self.output[1].lock().unwrap())
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Send SIGTERM and wait (up to `limit`) for the exit, which must be
    /// 128 + SIGTERM; panics with stderr otherwise.
    pub fn terminate(self, limit: Duration) -> Output {
        // SAFETY: kill(2) on our own child's pid has no memory-safety impact.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let out = self.wait(limit);
        assert_eq!(
            out.status.code(),
            Some(143),
            "exit after SIGTERM; stderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Wait for the process to exit (up to `limit`) and return its output.
    pub fn wait(mut self, limit: Duration) -> Output {
        let start = Instant::now();
        let status = loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                break st;
            }
            assert!(
                start.elapsed() < limit,
                "foliovm did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        for r in self.readers.drain(..) {
            r.join().expect("reader");
        }
        let stdout = std::mem::take(&mut *self.output[0].lock().unwrap());
        let stderr = std::mem::take(&mut *self.output[1].lock().unwrap());
        Output {
            status,
            stdout,
            stderr,
        }
    }
}

impl Drop for ApiVm {
    /// A failing test must not leave foliovm running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.sock);
    }
}

/// The MD5 of `data` in hex, as `md5sum` (in the guests' busybox too)
/// prints it: the tests compare the host's bytes with what a guest read.
pub fn md5_hex(data: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("md5sum");
    // Written from another thread: md5sum's output is one line, but a
    // pipe full of input would block us while it waits to be read.
    let mut stdin = child.stdin.take().expect("md5sum's stdin");
    let out = std::thread::scope(|s| {
        s.spawn(move || stdin.write_all(data).expect("write to md5sum"));
        child.wait_with_output().expect("md5sum")
    });
    assert!(out.status.success(), "md5sum failed");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("md5sum printed a hash")
        .to_string()
}
