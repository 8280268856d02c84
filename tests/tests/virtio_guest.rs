//! virtio-blk and virtio-balloon with a real Linux guest, in ONE boot
//! (each boot costs minutes on a software KVM):
//!
//! * the guest boots from an ext4 root filesystem on a drive
//!   (`root=/dev/vda`, built here from the guest initramfs with
//!   `mkfs.ext4 -d`), so blk reads work from the first mount on;
//! * it writes 512 KiB to a scratch drive, and the host checks the image's
//!   checksum against the guest's; it reads a read-only drive of random
//!   bytes and prints its checksum; a write to it is refused;
//! * while the guest writes and reads back a drive in a loop, the host
//!   relocates its RAM to new host mappings through the API, again and
//!   again (once a second): the drive's queues follow the memory (every read-back matches);
//! * the balloon inflates at boot, then the guest unbinds its driver
//!   (deflate), dirties and frees memory, and binds it again: the
//!   re-inflation returns resident memory, as the memory manager's
//!   statistics in the `FOLIOVM-MEMSTATS` lines show; the freed memory that
//!   is left is returned by free page reporting.
//!
//! Without deflate_on_oom the guest's MemTotal shrinks as the balloon
//! inflates, which is how the script waits for the re-inflation. Free page
//! reporting runs at the guest's `page_reporting_order`, 4 MiB by default
//! here (tinyconfig has no hugetlbfs, so pageblock_order is MAX_ORDER - 1);
//! the script lowers it to 2 MiB, the host's folio size, so that the 32 MiB
//! it dirties and frees is reported promptly.

use foliovm_tests::{kvm_available, md5_hex, repo_root, run_foliovm, ApiVm};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(30 * 60);
const MIB: u64 = 1 << 20;
/// Balloon target, and how much the guest dirties before rebinding it.
const BALLOON_MIB: u64 = 8;
const FILL_MIB: u64 = 12;
/// What the guest dirties and frees for free page reporting to return.
const REPORT_FILL_MIB: u64 = 32;
/// Write-and-read-back rounds on a drive while the host relocates RAM.
const RELOC_IO_ROUNDS: u32 = 20;

/// The guest's script, run by /init after " -- ".
fn guest_script() -> String {
    format!(
        r#"echo BLK-ROOT $(grep " / " /proc/mounts)
dd if=/bin/busybox of=/dev/vdb bs=64k count=8 2>/dev/null; sync
echo BLK-W $(dd if=/bin/busybox bs=64k count=8 2>/dev/null | md5sum)
echo BLK-R $(md5sum < /dev/vdc)
echo BLK-RO $(dd if=/dev/zero of=/dev/vdc bs=512 count=1 2>&1 | head -1)
echo BLK-DD-START $(cut -d' ' -f1 /proc/uptime)
dd if=/dev/vdb of=/dev/null bs=1M count=4 iflag=direct 2>/dev/null
echo BLK-DD-END $(cut -d' ' -f1 /proc/uptime)
echo RELOC-IO-START
sleep 2
ok=0; bad=0; i=0
while [ $i -lt {RELOC_IO_ROUNDS} ]; do
  dd if=/bin/busybox of=/dev/vdb bs=64k count=4 skip=$((i % 4)) seek=16 conv=fsync 2>/dev/null
  A=$(dd if=/bin/busybox bs=64k count=4 skip=$((i % 4)) 2>/dev/null | md5sum)
  B=$(dd if=/dev/vdb bs=64k count=4 skip=16 iflag=direct 2>/dev/null | md5sum)
  if [ "$A" = "$B" ]; then ok=$((ok + 1)); else bad=$((bad + 1)); fi
  i=$((i + 1))
done
echo RELOC-IO ok=$ok bad=$bad
echo RELOC-IO-END
B=/sys/bus/virtio/drivers/virtio_balloon
D=$(ls $B | grep virtio)
echo $D > $B/unbind
dd if=/dev/zero of=/tmp/fill bs=1M count={FILL_MIB} 2>/dev/null
rm /tmp/fill
T0=$(awk '/MemTotal/{{print $2}}' /proc/meminfo)
echo $D > $B/bind
i=0
while [ $i -lt 600 ]; do
  T=$(awk '/MemTotal/{{print $2}}' /proc/meminfo)
  [ $((T0 - T)) -ge {balloon_kib} ] && break
  sleep 1; i=$((i + 1))
done
echo BALLOON-INFLATED after $i s
echo 9 > /sys/module/page_reporting/parameters/page_reporting_order
dd if=/dev/zero of=/tmp/fill bs=1M count={REPORT_FILL_MIB} 2>/dev/null
rm /tmp/fill
sleep 20
echo BALLOON-DONE
"#,
        balloon_kib = BALLOON_MIB * 1024
    )
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("foliovm-virtio-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn sh(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An ext4 image of the guest initramfs plus the script, for `root=/dev/vda`.
fn rootfs(dir: &Path, initramfs: &Path) -> PathBuf {
    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    sh(Command::new("cpio")
        .args(["-idm", "--quiet", "-F"])
        .arg(initramfs)
        .current_dir(&root));
    std::fs::write(root.join("guest.sh"), guest_script()).unwrap();
    let img = dir.join("rootfs.ext4");
    // No journal and no metadata checksums: less emulated guest work.
    sh(Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-O",
            "^has_journal,^metadata_csum",
            "-L",
            "root",
            "-d",
        ])
        .arg(&root)
        .arg(&img)
        .arg("16M"));
    img
}

fn marker<'a>(stdout: &'a str, name: &str) -> &'a str {
    stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} line\nstdout:\n{stdout}"))
        .trim()
}

fn memstats(stderr: &str) -> Vec<Value> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("FOLIOVM-MEMSTATS "))
        .map(|j| serde_json::from_str(j).expect("MEMSTATS is JSON"))
        .collect()
}

#[test]
fn linux_guest_uses_drives_and_balloon() {
    if !kvm_available() {
        return;
    }
    let out_dir = repo_root().join("guest-images/out");
    let kernel = out_dir.join("vmlinux");
    let initramfs = out_dir.join("initramfs.cpio");
    assert!(
        kernel.exists() && initramfs.exists(),
        "guest images missing in {}: run guest-images/build.sh",
        out_dir.display()
    );
    let dir = tmpdir("guest");
    let root = rootfs(&dir, &initramfs);
    let scratch = dir.join("scratch.img");
    std::fs::write(&scratch, vec![0u8; 4 << 20]).unwrap();
    let golden = dir.join("golden.img");
    let golden_data: Vec<u8> = (0..1u32 << 18)
        .flat_map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes())
        .collect();
    std::fs::write(&golden, &golden_data).unwrap();

    let drive = |p: &Path, opts: &str| format!("{}{opts}", p.display());
    let args = [
        "run".to_string(),
        "--kernel".into(),
        kernel.display().to_string(),
        "--mem".into(),
        "256M".into(),
        "--vcpus".into(),
        "1".into(),
        "--drive".into(),
        drive(&root, ",root,id=rootfs"),
        "--drive".into(),
        drive(&scratch, ",id=scratch"),
        "--drive".into(),
        drive(&golden, ",ro,id=golden"),
        "--balloon".into(),
        format!("{BALLOON_MIB}M,stats=5"),
        "--cmdline".into(),
        "console=ttyS0 reboot=k panic=1 pci=off init=/init -- sh /guest.sh".into(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let start = Instant::now();
    let vm = ApiVm::spawn("virtio-guest", &args);
    // Relocate guest RAM while the guest does drive I/O.
    vm.wait_for_line("RELOC-IO-START", LIMIT);
    // The balloon as Firecracker's clients read it, plus its size.
    let bal = vm.call("GET", "/balloon", None).json();
    assert_eq!(
        (
            bal["amount_mib"].as_u64(),
            bal["deflate_on_oom"].as_bool(),
            bal["stats_polling_interval_s"].as_u64()
        ),
        (Some(BALLOON_MIB), Some(false), Some(5)),
        "{bal}"
    );
    let (mut relocated, mut refused) = (0, Vec::new());
    // The VM as the API showed it last while it ran.
    let mut last_seen = Value::Null;
    while !vm.has_line("RELOC-IO-END") && {
        let seen = vm.call("GET", "/vms/vm0", None).json();
        let running = seen["state"] == "Running";
        if running {
            last_seen = seen;
        }
        running
    } {
        let r = vm.call("PUT", "/vms/vm0/relocate", Some(r#"{"to_aligned": true}"#));
        match r.status {
            200 => relocated += 1,
            _ => refused.push(r.body),
        }
        std::thread::sleep(Duration::from_millis(1000));
    }
    let out = vm.wait(LIMIT);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "boot and checks took {:.0} s",
        start.elapsed().as_secs_f64()
    );
    assert!(
        stdout.contains("FOLIOVM-CMD-EXIT=0") && stdout.contains("BALLOON-DONE"),
        "guest did not finish\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        out.status.success(),
        "exit {:?}\nstderr:\n{stderr}",
        out.status
    );

    // The API counts each drive's traffic: the root filesystem was read
    // from by then, without errors.
    let drives = last_seen["drives"]
        .as_array()
        .expect("drives in GET /vms/vm0");
    let ids: Vec<&str> = drives.iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["rootfs", "scratch", "golden"], "{last_seen}");
    assert!(drives[0]["read_bytes"].as_u64().unwrap() > 0, "{last_seen}");
    assert_eq!(drives[0]["error_requests"], 0, "{last_seen}");
    assert!(drives[0]["memory_waits"].is_u64(), "{last_seen}");

    // Relocation under drive I/O: the queues followed the memory.
    eprintln!("relocations during drive I/O: {relocated} done, refused: {refused:?}");
    assert_eq!(
        marker(&stdout, "RELOC-IO"),
        format!("ok={RELOC_IO_ROUNDS} bad=0"),
        "{stdout}"
    );
    assert!(
        relocated >= 3,
        "only {relocated} relocations; refused: {refused:?}"
    );

    // Root filesystem on a drive.
    assert!(
        marker(&stdout, "BLK-ROOT").starts_with("/dev/root / ext4 rw"),
        "{stdout}"
    );
    // Write: the image holds what the guest wrote.
    let img = std::fs::read(&scratch).unwrap();
    let written = md5_hex(&img[..512 << 10]);
    assert_eq!(marker(&stdout, "BLK-W"), format!("{written} -"));
    // Read: the guest saw the host's bytes.
    assert_eq!(
        marker(&stdout, "BLK-R"),
        format!("{} -", md5_hex(&golden_data))
    );
    // Read-only: refused (the guest kernel already refuses to open it for
    // writing, because we offer VIRTIO_BLK_F_RO; the device refuses too).
    assert!(
        marker(&stdout, "BLK-RO").contains("not permitted")
            || marker(&stdout, "BLK-RO").contains("Read-only"),
        "{stdout}"
    );
    assert_eq!(std::fs::read(&golden).unwrap(), golden_data);
    let t0: f64 = marker(&stdout, "BLK-DD-START").parse().unwrap();
    let t1: f64 = marker(&stdout, "BLK-DD-END").parse().unwrap();
    eprintln!(
        "guest dd 4 MiB O_DIRECT read: {:.2} s guest time ({:.2} MiB/s)",
        t1 - t0,
        4.0 / (t1 - t0)
    );

    // Balloon: events are (activated, target reached) at boot, then a
    // reset by the unbind, then (activated, target reached) again.
    let stats = memstats(&stderr);
    let ev = |name: &str| -> Vec<&Value> { stats.iter().filter(|v| v["event"] == name).collect() };
    let activated = ev("balloon-activated");
    let reached = ev("balloon-target-reached");
    assert_eq!((activated.len(), reached.len()), (2, 2), "{stderr}");
    let exit = ev("exit");
    assert_eq!(exit.len(), 1, "{stderr}");
    let b = |v: &Value, k: &str| v["balloon"][k].as_u64().unwrap();
    let r = |v: &Value| v["resident_bytes"].as_u64().unwrap();
    for v in &reached {
        assert_eq!(b(v, "actual_bytes"), BALLOON_MIB * MIB);
    }
    // The rebind inflated the target again, from memory the guest had just
    // dirtied and freed: it came back to the host as the pages went in.
    let inflate_returned =
        b(reached[1], "inflate_returned_bytes") - b(activated[1], "inflate_returned_bytes");
    let report_returned =
        b(reached[1], "report_returned_bytes") - b(activated[1], "report_returned_bytes");
    let drop = r(activated[1]).saturating_sub(r(reached[1]));
    eprintln!(
        "rebind: resident {} -> {} MiB; inflate returned {:.1} MiB, reporting returned {:.1} MiB meanwhile",
        r(activated[1]) >> 20,
        r(reached[1]) >> 20,
        inflate_returned as f64 / MIB as f64,
        report_returned as f64 / MIB as f64,
    );
    assert!(
        inflate_returned >= BALLOON_MIB * MIB / 2,
        "inflating {BALLOON_MIB} MiB returned only {inflate_returned} bytes\n{stderr}"
    );
    assert!(
        drop >= inflate_returned * 9 / 10,
        "resident memory fell by {drop}, less than the {inflate_returned} bytes inflation returned\n{stderr}"
    );
    // Free page reporting returned the rest of what the guest freed.
    let reported = b(exit[0], "report_returned_bytes");
    eprintln!(
        "total: inflate returned {:.1} MiB, free page reporting returned {:.1} MiB",
        b(exit[0], "inflate_returned_bytes") as f64 / MIB as f64,
        reported as f64 / MIB as f64
    );
    assert!(
        reported >= 2 * MIB,
        "free page reporting returned only {reported} bytes\n{stderr}"
    );
    assert_eq!(b(exit[0], "malformed"), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_drive_and_balloon_input_are_clear_errors() {
    if !kvm_available() {
        return;
    }
    let kernel = repo_root().join("guest-images/out/vmlinux");
    let dir = tmpdir("bad");
    let small = dir.join("small.img");
    std::fs::write(&small, [0u8; 100]).unwrap();
    let k = kernel.to_str().unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--drive".into(), "/nonexistent/disk.img,id=data".into()],
            "drive \"data\": cannot open drive image /nonexistent/disk.img",
        ),
        (
            vec!["--drive".into(), small.display().to_string()],
            "smaller than one 512-byte sector",
        ),
        (
            vec!["--drive".into(), "x.img,fast".into()],
            "unknown option \"fast\"",
        ),
        (
            vec!["--balloon".into(), "1G".into()],
            "balloon target 1024 MiB exceeds guest memory 256 MiB",
        ),
    ];
    for (extra, want) in cases {
        let mut args = vec!["run", "--kernel", k, "--mem", "256M"];
        args.extend(extra.iter().map(String::as_str));
        let out = run_foliovm(&args, Duration::from_secs(60));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
