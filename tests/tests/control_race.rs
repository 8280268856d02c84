//! A concurrency stress of the control plane: many clients send random
//! mixes of API requests to one in-process `serve` while its workload
//! guests run, get paused and resumed, relocated, compacted and reclaimed
//! from, have their limits and the host budget changed under them, and
//! stop on their own (and are reaped) while requests still name them.
//!
//! What a user relies on, checked throughout:
//! * every request is answered within [`DEADLINE`] (one that is not is a
//!   deadlock; the test fails naming it);
//! * every answer's status is one the route documents for it, and never
//!   a 5xx;
//! * once a VM was seen stopped, it is never reported running or paused
//!   again, and no request that acts on it succeeds;
//! * a stopped VM is reaped: its vCPU threads end and its memory (resident
//!   and swapped) goes back to the memory manager while the others run;
//!
//! and at the end: every guest verified all its data (no mismatch), a
//! SIGTERM ends the process's last VM (kept paused for that) and `serve`, the
//! process has no thread more than before, and the memory manager's
//! accounting balances.
//!
//! The run is random: `FOLIOVM_RACE_SEED=N` repeats one (the seed is
//! printed).

use devices::testing::Rng;
use foliovm_tests::kvm_available;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use vmm::api::client::{request, Reply};
use vmm::config::ConfigFile;
use vmm::vm::MemorySource;
use vmm::vmm::{memory_source, serve, ServeOptions};

/// A request not answered within this is taken for a deadlock.
const DEADLINE: Duration = Duration::from_secs(30);
/// Client threads.
const CLIENTS: usize = 8;
/// The clients stop after this even if a VM still runs.
const CLIENT_PHASE: Duration = Duration::from_secs(45);
/// A stopped VM must be reaped (threads gone, memory back) within this.
const REAP_WITHIN: Duration = Duration::from_secs(15);
/// The VMs and their sizes (MiB). Each guest's working set is small next
/// to the budget's floor below, so that budget changes and reclaims make
/// it swap without thrashing for the whole run.
const VMS: [&str; 3] = ["a", "b", "c"];
const VM_MIB: u64 = 24;
/// A fourth VM, kept paused and out of the clients' way, whose guest never
/// ends: the process serves the API (which ends once every VM stopped)
/// until the test sends it SIGTERM, after the other three have stopped.
const KEEPER: &str = "k";
const KEEPER_MIB: u64 = 8;
const POOL_MIB: u64 = 3 * VM_MIB + KEEPER_MIB;
const BUDGET_FLOOR_MIB: u64 = 32;

/// The threads of this process, by name (`comm`, at most 15 bytes).
fn threads() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .flatten()
        .map(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .unwrap_or_default()
                .trim()
                .to_string()
        })
        .collect()
}

/// What every client shares.
struct Shared {
    sock: PathBuf,
    /// When each VM was first seen stopped, as an offset from `t0`, in µs
    /// (0: not yet). Kept per VM name.
    stopped_at: HashMap<&'static str, AtomicU64>,
    t0: Instant,
    /// Ids of operations the API started.
    op_ids: Mutex<Vec<u64>>,
    /// Set when the clients are to stop.
    done: AtomicBool,
    /// Answers by route and status, for the summary.
    seen: Mutex<HashMap<(String, u16), u64>>,
}

impl Shared {
    fn now_us(&self) -> u64 {
        self.t0.elapsed().as_micros() as u64 + 1
    }

    /// Whether `vm` was seen stopped before `sent_us`.
    fn stopped_before(&self, vm: &str, sent_us: u64) -> bool {
        self.stopped_at
            .get(vm)
            .map(|t| t.load(SeqCst))
            .is_some_and(|t| t != 0 && t < sent_us)
    }

    fn saw_stopped(&self, vm: &str, at_us: u64) {
        if let Some(t) = self.stopped_at.get(vm) {
            let _ = t.compare_exchange(0, at_us, SeqCst, SeqCst);
        }
    }

    /// One request, answered within [`DEADLINE`]; panics naming it
    /// otherwise. Returns the answer and when it was sent.
    fn call(&self, method: &str, path: &str, body: Option<&str>) -> (Reply, u64) {
        let sent = self.now_us();
        let start = Instant::now();
        let r = request(&self.sock, method, path, body, DEADLINE).unwrap_or_else(|e| {
            panic!(
                "{method} {path} {} was not answered (after {:?}): {}",
                body.unwrap_or(""),
                start.elapsed(),
                vmm::controller::error_chain(&e)
            )
        });
        let route = route_of(method, path);
        *self
            .seen
            .lock()
            .unwrap()
            .entry((route, r.status))
            .or_default() += 1;
        (r, sent)
    }
}

/// The route a request is counted under: VM names and ids replaced.
fn route_of(method: &str, path: &str) -> String {
    let p: Vec<&str> = path
        .split('/')
        .map(|s| match s {
            "a" | "b" | "c" | "zz" => "{name}",
            s if s.bytes().all(|b| b.is_ascii_digit()) && !s.is_empty() => "{id}",
            s => s,
        })
        .collect();
    format!("{method} {}", p.join("/"))
}

/// Fail unless `status` is one of `allowed` for this request.
fn expect(r: &Reply, allowed: &[u16], what: &str) {
    assert!(
        allowed.contains(&r.status),
        "{what}: status {} is not one of {allowed:?}: {}",
        r.status,
        r.body
    );
}

/// One client: random requests until told to stop.
fn client(shared: &Shared, seed: u64) {
    let mut rng = Rng::new(seed);
    while !shared.done.load(SeqCst) {
        let known = rng.pick(&VMS);
        // Now and then a VM that does not exist.
        let vm = if rng.below(100u64) < 5 { "zz" } else { known };
        let unknown = vm == "zz";
        let not_found = |r: &Reply, what: &str| {
            expect(r, &[404], what);
            assert!(r.body.contains("no VM named"), "{what}: {}", r.body);
        };
        match rng.below(16) {
            0 => {
                let (r, sent) = shared.call("GET", &format!("/vms/{vm}"), None);
                if unknown {
                    not_found(&r, "GET /vms/zz");
                    continue;
                }
                expect(&r, &[200], "GET /vms/{name}");
                let state = r.json()["state"].as_str().unwrap_or("?").to_string();
                assert!(
                    ["Running", "Paused", "Stopped"].contains(&state.as_str()),
                    "GET /vms/{vm}: state {state}"
                );
                if state == "Stopped" {
                    shared.saw_stopped(vm, shared.now_us());
                } else {
                    assert!(
                        !shared.stopped_before(vm, sent),
                        "VM {vm} was seen stopped, and later reported {state}"
                    );
                }
            }
            1 => {
                let (r, sent) = shared.call("GET", "/vms", None);
                let got = shared.now_us();
                expect(&r, &[200], "GET /vms");
                let list = r.json();
                let list = list.as_array().expect("GET /vms is a list");
                assert_eq!(list.len(), VMS.len() + 1, "{list:?}");
                for v in list {
                    let name = v["name"].as_str().unwrap();
                    if name == KEEPER {
                        continue;
                    }
                    let state = v["state"].as_str().unwrap();
                    if state == "Stopped" {
                        shared.saw_stopped(VMS.iter().find(|n| **n == name).unwrap(), got);
                    } else {
                        assert!(
                            !shared.stopped_before(name, sent),
                            "GET /vms: VM {name} was seen stopped, and later reported {state}"
                        );
                    }
                }
            }
            2 => {
                let path = rng.pick(&["/stats", "/metrics", "/", "/budget", "/operations"]);
                let (r, _) = shared.call("GET", path, None);
                expect(&r, &[200], &format!("GET {path}"));
            }
            3 => {
                let ids = shared.op_ids.lock().unwrap().clone();
                let id = match ids.is_empty() || rng.below(100u64) < 10 {
                    true => 999_999,
                    false => rng.pick(&ids),
                };
                let (r, _) = shared.call("GET", &format!("/operations/{id}"), None);
                match id {
                    999_999 => expect(&r, &[404], "GET /operations/{unknown id}"),
                    // Forgotten once 32 newer ones finished.
                    _ => expect(&r, &[200, 404], "GET /operations/{id}"),
                }
                if r.status == 200 {
                    let s = r.json()["state"].as_str().unwrap_or("?").to_string();
                    assert!(
                        ["running", "succeeded", "failed"].contains(&s.as_str()),
                        "operation {id}: {}",
                        r.body
                    );
                }
            }
            4 | 5 => {
                let state = rng.pick(&["Paused", "Resumed", "Resumed"]);
                let body = format!(r#"{{"state": "{state}"}}"#);
                let (r, sent) = shared.call("PATCH", &format!("/vms/{vm}"), Some(&body));
                if unknown {
                    not_found(&r, "PATCH /vms/zz");
                    continue;
                }
                expect(&r, &[204, 400], &format!("PATCH /vms/{vm} {state}"));
                acts_on_live(shared, vm, sent, &r, "PATCH /vms/{name}");
            }
            6 => {
                // Several VMs run: the paths without a name are refused,
                // and a workload guest has neither keyboard nor balloon.
                let (m, p, b) = rng.pick(&[
                    ("PATCH", "/vm", Some(r#"{"state": "Paused"}"#)),
                    ("PATCH", "/balloon", Some(r#"{"amount_mib": 4}"#)),
                    (
                        "PUT",
                        "/actions",
                        Some(r#"{"action_type": "SendCtrlAltDel"}"#),
                    ),
                    (
                        "PUT",
                        "/vms/{}/actions",
                        Some(r#"{"action_type": "SendCtrlAltDel"}"#),
                    ),
                    ("PATCH", "/vms/{}/balloon", Some(r#"{"amount_mib": 4}"#)),
                    ("GET", "/vms/{}/balloon", None),
                ]);
                let path = p.replace("{}", vm);
                let (r, _) = shared.call(m, &path, b);
                match unknown && p.contains("{}") {
                    true => not_found(&r, &format!("{m} {path}")),
                    false => expect(&r, &[400], &format!("{m} {path}")),
                }
            }
            7 => {
                let min = rng.pick(&[0u64, 2, 4]);
                let body = match rng.below(3) {
                    0 => format!(r#"{{"mem_min_mib": {min}}}"#),
                    1 => format!(r#"{{"mem_min_mib": {min}, "mem_max_mib": 16, "priority": 1}}"#),
                    _ => format!(r#"{{"mem_min_mib": {min}, "mem_max_mib": 24, "priority": -1}}"#),
                };
                let (r, sent) = shared.call("PUT", &format!("/vms/{vm}/limits"), Some(&body));
                if unknown {
                    not_found(&r, "PUT /vms/zz/limits");
                    continue;
                }
                expect(&r, &[204, 400], &format!("PUT /vms/{vm}/limits {body}"));
                acts_on_live(shared, vm, sent, &r, "PUT /vms/{name}/limits");
            }
            8 | 9 => {
                let mib = 1 + rng.below(8);
                let run_async = rng.below(100u64) < 50;
                let named = rng.below(100u64) >= 20;
                let body = match named {
                    true => format!(r#"{{"vm": "{vm}", "mib": {mib}, "async": {run_async}}}"#),
                    false => format!(r#"{{"mib": {mib}, "async": {run_async}}}"#),
                };
                let (r, sent) = shared.call("PUT", "/reclaim", Some(&body));
                if named && unknown {
                    expect(&r, &[404], "PUT /reclaim zz");
                    continue;
                }
                let ok = if run_async { 202 } else { 200 };
                let allowed: &[u16] = match (named, run_async) {
                    (true, true) => &[202, 400, 429],
                    (true, false) => &[200, 400],
                    (false, true) => &[202, 429],
                    (false, false) => &[200],
                };
                expect(&r, allowed, &format!("PUT /reclaim {body}"));
                if r.status == ok && run_async {
                    shared
                        .op_ids
                        .lock()
                        .unwrap()
                        .push(r.json()["id"].as_u64().unwrap());
                }
                if named {
                    acts_on_live(shared, vm, sent, &r, "PUT /reclaim {vm}");
                }
            }
            10 => {
                let run_async = rng.below(100u64) < 50;
                let body = format!(r#"{{"async": {run_async}}}"#);
                let (r, sent) = shared.call("PUT", &format!("/vms/{vm}/compact"), Some(&body));
                if unknown {
                    not_found(&r, "PUT /vms/zz/compact");
                    continue;
                }
                let allowed: &[u16] = match run_async {
                    true => &[202, 400, 429],
                    false => &[200, 400],
                };
                expect(&r, allowed, &format!("PUT /vms/{vm}/compact {body}"));
                if r.status == 202 {
                    shared
                        .op_ids
                        .lock()
                        .unwrap()
                        .push(r.json()["id"].as_u64().unwrap());
                }
                acts_on_live(shared, vm, sent, &r, "PUT /vms/{name}/compact");
            }
            11 => {
                let body = match rng.below(4) {
                    0 | 1 => r#"{"to_aligned": true}"#.to_string(),
                    // Mostly larger than the region (a grow); smaller or
                    // equal ones are refused.
                    2 => format!(r#"{{"grow_mib": {}}}"#, VM_MIB - 2 + 2 * rng.below(4)),
                    // No adjacent region there: refused.
                    _ => r#"{"merge_with_gpa": 4294967296}"#.to_string(),
                };
                let (r, sent) = shared.call("PUT", &format!("/vms/{vm}/relocate"), Some(&body));
                if unknown {
                    not_found(&r, "PUT /vms/zz/relocate");
                    continue;
                }
                expect(
                    &r,
                    &[200, 400, 409],
                    &format!("PUT /vms/{vm}/relocate {body}"),
                );
                acts_on_live(shared, vm, sent, &r, "PUT /vms/{name}/relocate");
            }
            12 => {
                let mib = BUDGET_FLOOR_MIB + 2 * rng.below((POOL_MIB - BUDGET_FLOOR_MIB) / 2 + 1);
                let body = format!(r#"{{"budget_mib": {mib}}}"#);
                let (r, _) = shared.call("PUT", "/budget", Some(&body));
                expect(&r, &[200, 400, 409], &format!("PUT /budget {body}"));
            }
            _ => {
                // Resume often, so that no guest stays paused for long.
                let (r, sent) = shared.call(
                    "PATCH",
                    &format!("/vms/{known}"),
                    Some(r#"{"state": "Resumed"}"#),
                );
                expect(&r, &[204, 400], "PATCH /vms/{name} Resumed");
                acts_on_live(shared, known, sent, &r, "PATCH /vms/{name}");
            }
        }
    }
}

/// A request that acts on `vm` and was sent after it was seen stopped
/// must be refused.
fn acts_on_live(shared: &Shared, vm: &str, sent: u64, r: &Reply, what: &str) {
    if shared.stopped_before(vm, sent) {
        assert!(
            r.status >= 400,
            "{what} on VM {vm}, sent after it was seen stopped, answered {}: {}",
            r.status,
            r.body
        );
    }
}

/// Wait (up to [`REAP_WITHIN`]) until every VM seen stopped is reaped:
/// its vCPU threads gone, its memory (resident and swapped) back.
fn check_reaped(shared: &Shared, reaped: &mut Vec<&'static str>) {
    for vm in VMS {
        if reaped.contains(&vm) || !shared.stopped_before(vm, shared.now_us()) {
            continue;
        }
        let start = Instant::now();
        loop {
            let prefix = format!("{vm}-vcpu");
            let live: Vec<String> = threads()
                .into_iter()
                .filter(|t| t.starts_with(&prefix))
                .collect();
            let (r, _) = shared.call("GET", &format!("/vms/{vm}"), None);
            let m = &r.json()["memory"];
            let resident = m["resident_bytes"].as_u64().unwrap();
            let swapped = m["swap"]["swapped_pages"].as_u64().unwrap();
            if live.is_empty() && resident == 0 && swapped == 0 {
                eprintln!(
                    "VM {vm} seen stopped at {:.1} s, reaped {:?} later",
                    shared.stopped_at[vm].load(SeqCst) as f64 / 1e6,
                    start.elapsed()
                );
                reaped.push(vm);
                break;
            }
            assert!(
                start.elapsed() < REAP_WITHIN,
                "VM {vm} stopped but was not reaped within {REAP_WITHIN:?}: vCPU threads \
                 {live:?}, {resident} bytes resident, {swapped} pages swapped"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn config(dir: &Path) -> String {
    let vm = |name: &str, vcpus: u32, mib: u64, workload: &str| {
        format!(
            r#"{{"name": "{name}", "machine-config": {{"vcpu_count": {vcpus}, "mem_size_mib": {mib}}},
                "foliovm": {{"workload": "{workload}"}}}}"#
        )
    };
    // Lengths that end them at different times of the client phase, the
    // first early on; the keeper's never ends.
    format!(
        r#"{{"foliovm": {{"mem_budget": "{POOL_MIB}M", "swap_dir": "{}", "swap_size": "128M"}},
            "vms": [{}, {}, {}, {}]}}"#,
        dir.display(),
        vm("a", 1, VM_MIB, "seq:4M,passes=3000"),
        vm("b", 1, VM_MIB, "seq:4M,passes=8000"),
        vm("c", 2, VM_MIB, "seq:6M,passes=12000"),
        vm(KEEPER, 1, KEEPER_MIB, "seq:1M,passes=1000000000000"),
    )
}

#[test]
fn concurrent_requests_race_vm_lifecycles_safely() {
    if !kvm_available() {
        return;
    }
    let seed = std::env::var("FOLIOVM_RACE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("FOLIOVM_RACE_SEED={seed}");
    let (run, _) =
        ConfigFile::parse(&config(Path::new("/var/tmp")), Path::new("race.json")).unwrap();
    let threads_before = threads();
    let source = memory_source(&run).unwrap();
    let MemorySource::Folio(mm) = &source else {
        panic!("the folio backend is the default");
    };
    let mm = mm.clone();
    let sock = std::env::temp_dir().join(format!("foliovm-race-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);

    let (served_tx, served) = mpsc::channel();
    let opts = ServeOptions {
        run: Some(run.clone()),
        memory: run.memory.clone(),
        source: Some(source),
        api_sock: Some(sock.clone()),
    };
    let server = std::thread::Builder::new()
        .name("serve".into())
        .spawn(move || served_tx.send(serve(opts)).unwrap())
        .unwrap();
    let start = Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < DEADLINE, "the API socket never appeared");
        std::thread::sleep(Duration::from_millis(10));
    }

    let r = request(
        &sock,
        "PATCH",
        &format!("/vms/{KEEPER}"),
        Some(r#"{"state": "Paused"}"#),
        DEADLINE,
    )
    .unwrap();
    assert_eq!(r.status, 204, "pausing the keeper: {}", r.body);
    let shared = Arc::new(Shared {
        sock: sock.clone(),
        stopped_at: VMS.iter().map(|v| (*v, AtomicU64::new(0))).collect(),
        t0: Instant::now(),
        op_ids: Mutex::new(Vec::new()),
        done: AtomicBool::new(false),
        seen: Mutex::new(HashMap::new()),
    });
    let clients: Vec<_> = (0..CLIENTS as u64)
        .map(|i| {
            let s = shared.clone();
            let seed = seed.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            std::thread::Builder::new()
                .name(format!("client{i}"))
                .spawn(move || client(&s, seed))
                .unwrap()
        })
        .collect();

    // Meanwhile: stopped VMs are reaped while the others run.
    let mut reaped = Vec::new();
    while start.elapsed() < CLIENT_PHASE && reaped.len() < VMS.len() {
        if clients.iter().any(|c| c.is_finished()) {
            break;
        }
        let (r, _) = shared.call("GET", "/vms", None);
        let got = shared.now_us();
        for v in r.json().as_array().unwrap() {
            if v["state"] == "Stopped" && v["name"] != KEEPER {
                shared.saw_stopped(
                    VMS.iter()
                        .find(|n| **n == v["name"].as_str().unwrap())
                        .unwrap(),
                    got,
                );
            }
        }
        check_reaped(&shared, &mut reaped);
        std::thread::sleep(Duration::from_millis(200));
    }
    shared.done.store(true, SeqCst);
    for c in clients {
        if let Err(p) = c.join() {
            std::panic::resume_unwind(p);
        }
    }
    eprintln!(
        "clients stopped after {:?}; VMs reaped meanwhile: {reaped:?}",
        start.elapsed()
    );
    let mut seen: Vec<_> = shared.seen.lock().unwrap().clone().into_iter().collect();
    seen.sort();
    for ((route, status), n) in &seen {
        eprintln!("{n:>6}  {status}  {route}");
    }

    // Let the guests that still run finish: none stays paused, none is
    // held to a small budget or maximum.
    let (r, _) = shared.call(
        "PUT",
        "/budget",
        Some(&format!(r#"{{"budget_mib": {POOL_MIB}}}"#)),
    );
    expect(&r, &[200], "PUT /budget (the whole pool)");
    for vm in VMS {
        let (r, _) = shared.call(
            "PATCH",
            &format!("/vms/{vm}"),
            Some(r#"{"state": "Resumed"}"#),
        );
        expect(&r, &[204, 400], "PATCH /vms/{name} Resumed");
        let (r, _) = shared.call("PUT", &format!("/vms/{vm}/limits"), Some("{}"));
        expect(&r, &[204, 400], "PUT /vms/{name}/limits {}");
    }
    let start = Instant::now();
    while reaped.len() < VMS.len() {
        let (r, _) = shared.call("GET", "/vms", None);
        let got = shared.now_us();
        for v in r.json().as_array().unwrap() {
            if let Some(vm) = VMS.iter().find(|n| v["name"] == **n) {
                if v["state"] == "Stopped" {
                    shared.saw_stopped(vm, got);
                }
            }
        }
        check_reaped(&shared, &mut reaped);
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "guests still running 90 s after the clients' end: {}",
            r.body
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The keeper (paused) is stopped as a user would: SIGTERM.
    // SAFETY: raise(3) on this thread; `serve` handles SIGTERM while it
    // runs, and it runs until the keeper has stopped.
    assert_eq!(unsafe { libc::raise(libc::SIGTERM) }, 0);
    let served = served
        .recv_timeout(DEADLINE)
        .expect("serve did not return after SIGTERM")
        .expect("serve");
    server.join().unwrap();
    assert_eq!(
        served.exit,
        Some(vmm::stop::ExitReason::Interrupted(libc::SIGTERM))
    );
    for o in &served.outcomes {
        if o.name == KEEPER {
            assert_eq!(
                o.reason,
                vmm::stop::ExitReason::Interrupted(libc::SIGTERM),
                "the keeper"
            );
            continue;
        }
        let w = o.workload.as_ref().expect("a workload result");
        eprintln!(
            "VM {}: {}; {} pages verified, {} mismatches, swap {}",
            o.name,
            o.reason,
            w.verified_pages,
            w.mismatches,
            w.swap.as_ref().map_or(String::new(), |s| s.to_string())
        );
        assert_eq!(
            o.reason,
            vmm::stop::ExitReason::WorkloadDone,
            "VM {}",
            o.name
        );
        assert!(w.complete, "VM {}: not every vCPU reported", o.name);
        assert_eq!(
            (w.mismatches, w.first_mismatch),
            (0, None),
            "VM {}: guest data lost",
            o.name
        );
    }
    assert_eq!(served.outcomes.len(), VMS.len() + 1);
    drop(served);

    // Operations still running end on their own (they hold no VM).
    let start = Instant::now();
    while threads().iter().any(|t| t.starts_with("op-")) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "operations still running 30 s after serve returned: {:?}",
            threads()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        mm.wait_idle(Duration::from_secs(30)),
        "the memory manager did not settle"
    );
    mm.check_accounting()
        .expect("allocator accounting balances");
    let s = mm.stats();
    assert_eq!(
        (s.swap.swapped_pages, s.free_bytes),
        (0, s.budget_bytes),
        "memory of the reaped VMs not given back"
    );
    // Nothing of the run (controller, VMs, operations) holds the manager,
    // and once it is gone too, no thread is left.
    assert_eq!(
        Arc::strong_count(&mm),
        1,
        "the memory manager is still held"
    );
    drop(mm);
    let start = Instant::now();
    loop {
        let now = threads();
        let extra: Vec<&String> = now
            .iter()
            .filter(|t| {
                now.iter().filter(|n| n == t).count()
                    > threads_before.iter().filter(|b| b == t).count()
            })
            .collect();
        if extra.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "threads left after every VM was reaped and serve returned: {extra:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = std::fs::remove_file(&sock);
}
