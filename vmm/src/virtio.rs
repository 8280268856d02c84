//! virtio-mmio devices of a VM: drives (virtio-blk) and the balloon.
//!
//! Everything the VMM does for virtio lives here: the configuration
//! (`--drive`, `--balloon`, Firecracker's `drives` and `balloon` sections),
//! placing each device's 4 KiB register window on the MMIO bus, its
//! interrupt (a KVM irqfd on the in-kernel IOAPIC) and queue notifications
//! (a KVM ioeventfd per queue, watched by the VM's device I/O thread, so
//! requests run off the vCPU threads and off the process's shared event
//! loop: see [`crate::io_thread`]), and the `virtio_mmio.device=` words of
//! the kernel command line.
//!
//! ```text
//!  0xd000_0000  workload guest result page
//!  0xd000_1000  virtio device 0 (IRQ 5)   root drive first, then drives,
//!  0xd000_2000  virtio device 1 (IRQ 6)   then the balloon
//!  ...          up to IRQ 23 (19 devices)
//! ```
//!
//! Memory statistics: with a balloon, the VMM prints one line
//! `FOLIOVM-MEMSTATS {json}` on stderr when the guest reaches a balloon
//! target and when the VM ends (see `docs/virtio.md`).

use crate::arch::layout::MMIO_DEVICES_START;
use crate::config::{option_key, parse_size, repeated_option, ConfigError};
use crate::io_thread::IoThread;
use crate::kvm::{KvmError, KvmVm};
use crate::stop::StopSignal;
use devices::virtio::balloon::{Balloon, BalloonConfig, BalloonEvent, BalloonHandle};
use devices::virtio::block::{Block, BlockCounters, DiskImage, SharedBlockCounters};
use devices::virtio::mmio::{MemorySwitch, MmioTransport, MMIO_WINDOW, QUEUE_NOTIFY_OFFSET};
use devices::virtio::{IrqLine, PinToken, QueueState, RamControl, RamError, VirtioDevice};
use devices::Bus;
use event_manager::{EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::IoEventAddress;
use mem::{MemoryManager, VmId, PAGE_SIZE};
use serde::Deserialize;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

/// First IOAPIC pin for virtio devices (COM1 has 4).
const FIRST_IRQ: u32 = 5;
/// Last usable IOAPIC pin.
const LAST_IRQ: u32 = 23;
/// First virtio window, after the workload guest's result page.
const FIRST_WINDOW: u64 = MMIO_DEVICES_START.raw() + 0x1000;

/// One drive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveConfig {
    /// Name (GET_ID answer, log label).
    pub id: String,
    /// Raw image file on the host.
    pub path: PathBuf,
    /// Refuse guest writes.
    pub read_only: bool,
    /// Boot from it: it becomes `/dev/vda` and `root=/dev/vda` is added.
    pub root: bool,
}

/// The balloon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BalloonSpec {
    /// Device settings (initial target, features).
    pub device: BalloonConfig,
    /// Ask the guest for statistics this often (0: never; stats are then
    /// not offered).
    pub stats_interval_s: u32,
}

/// All virtio devices of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VirtioConfig {
    /// Drives, in the order given (the root drive is placed first).
    pub drives: Vec<DriveConfig>,
    /// The balloon, if any.
    pub balloon: Option<BalloonSpec>,
}

impl VirtioConfig {
    /// Check the drives and balloon against each other and the guest.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the problem.
    pub fn validate(&self, mem_bytes: u64) -> Result<(), ConfigError> {
        let invalid = |s: String| Err(ConfigError::Invalid(s));
        if self.drives.iter().filter(|d| d.root).count() > 1 {
            return invalid("more than one drive has is_root_device set".into());
        }
        for (i, d) in self.drives.iter().enumerate() {
            // Firecracker's rule for ids: they go into API paths
            // (`PUT /drives/{id}`) and messages.
            let ok = |c: char| c.is_ascii_alphanumeric() || c == '_';
            if d.id.is_empty() || d.id.len() > 64 || !d.id.chars().all(ok) {
                return invalid(format!(
                    "drive id {:?}: use 1 to 64 letters, digits or '_'",
                    d.id
                ));
            }
            if self.drives[..i].iter().any(|o| o.id == d.id) {
                return invalid(format!("two drives have the id {:?}", d.id));
            }
        }
        let n = self.drives.len() + usize::from(self.balloon.is_some());
        if n > (LAST_IRQ - FIRST_IRQ + 1) as usize {
            return invalid(format!(
                "{n} virtio devices; at most {} fit",
                LAST_IRQ - FIRST_IRQ + 1
            ));
        }
        if let Some(b) = &self.balloon {
            if b.device.target_bytes > mem_bytes {
                return invalid(format!(
                    "balloon target {} MiB exceeds guest memory {} MiB",
                    b.device.target_bytes >> 20,
                    mem_bytes >> 20
                ));
            }
        }
        Ok(())
    }

    /// Drives in device order: the root drive first.
    fn ordered_drives(&self) -> Vec<&DriveConfig> {
        let mut v: Vec<_> = self.drives.iter().collect();
        v.sort_by_key(|d| !d.root);
        v
    }

    /// Window base and IRQ of device `i`.
    fn slot(i: usize) -> (u64, u32) {
        (FIRST_WINDOW + i as u64 * MMIO_WINDOW, FIRST_IRQ + i as u32)
    }

    /// Kernel command-line words: one `virtio_mmio.device=` per device, and
    /// `root=/dev/vda rw|ro` for a root drive unless `cmdline` names a root.
    pub fn cmdline_extras(&self, cmdline: &str) -> Vec<String> {
        let n = self.drives.len() + usize::from(self.balloon.is_some());
        let mut v: Vec<String> = (0..n)
            .map(|i| {
                let (base, irq) = Self::slot(i);
                format!("virtio_mmio.device=4K@{base:#x}:{irq}")
            })
            .collect();
        let kernel_part = cmdline.split(" -- ").next().unwrap_or("");
        if let Some(root) = self.drives.iter().find(|d| d.root) {
            if !kernel_part
                .split_whitespace()
                .any(|w| w.starts_with("root="))
            {
                v.push("root=/dev/vda".into());
                v.push(if root.read_only { "ro" } else { "rw" }.into());
            }
        }
        v
    }
}

/// Parse `--drive PATH[,ro][,root][,id=NAME]`; `index` names unnamed drives.
///
/// # Errors
/// [`ConfigError::Invalid`] for an unknown option.
pub fn parse_drive_flag(s: &str, index: usize) -> Result<DriveConfig, ConfigError> {
    let mut parts = s.split(',');
    let path = parts.next().filter(|p| !p.is_empty()).ok_or_else(|| {
        ConfigError::Invalid(format!(
            "--drive {s:?}: expected PATH[,ro][,root][,id=NAME]"
        ))
    })?;
    let mut d = DriveConfig {
        id: format!("drive{index}"),
        path: PathBuf::from(path),
        read_only: false,
        root: false,
    };
    let opts: Vec<&str> = parts.collect();
    // ro and rw are one setting.
    let key = |p| if p == "rw" { "ro" } else { option_key(p) };
    if let Some(p) = repeated_option(&opts, key) {
        return Err(ConfigError::Invalid(format!(
            "--drive {s:?}: option {p:?} repeats an earlier one"
        )));
    }
    for p in opts {
        match p {
            "ro" => d.read_only = true,
            "rw" => d.read_only = false,
            "root" => d.root = true,
            _ if p.starts_with("id=") && p.len() > 3 => d.id = p[3..].to_string(),
            _ => {
                return Err(ConfigError::Invalid(format!(
                    "--drive {s:?}: unknown option {p:?} (expected ro, root or id=NAME)"
                )))
            }
        }
    }
    Ok(d)
}

/// Parse `--balloon SIZE[,deflate_on_oom][,stats=SECS][,no_reporting]`.
/// Free page reporting is on unless `no_reporting` is given.
///
/// # Errors
/// [`ConfigError`] for a bad size or unknown option.
pub fn parse_balloon_flag(s: &str) -> Result<BalloonSpec, ConfigError> {
    let mut parts = s.split(',');
    let size = parse_size(parts.next().unwrap_or(""))
        .map_err(|e| ConfigError::Invalid(format!("--balloon {s:?}: {e}")))?;
    let mut b = BalloonSpec {
        device: BalloonConfig {
            target_bytes: size,
            deflate_on_oom: false,
            stats: false,
            free_page_reporting: true,
        },
        stats_interval_s: 0,
    };
    let opts: Vec<&str> = parts.collect();
    if let Some(p) = repeated_option(&opts, option_key) {
        return Err(ConfigError::Invalid(format!(
            "--balloon {s:?}: option {p:?} repeats an earlier one"
        )));
    }
    for p in opts {
        match p {
            "deflate_on_oom" => b.device.deflate_on_oom = true,
            "no_reporting" => b.device.free_page_reporting = false,
            _ if p.starts_with("stats=") => {
                b.stats_interval_s = p[6..].parse().map_err(|_| {
                    ConfigError::Invalid(format!("--balloon {s:?}: bad stats interval {p:?}"))
                })?;
                b.device.stats = b.stats_interval_s > 0;
            }
            _ => {
                return Err(ConfigError::Invalid(format!(
                    "--balloon {s:?}: unknown option {p:?} (expected deflate_on_oom, stats=SECS or no_reporting)"
                )))
            }
        }
    }
    Ok(b)
}

/// Firecracker's `drives` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveSection {
    /// Name.
    pub drive_id: String,
    /// Image path.
    pub path_on_host: PathBuf,
    /// Boot from it.
    pub is_root_device: bool,
    /// Refuse writes.
    pub is_read_only: bool,
    /// Firecracker's `partuuid` (root on a partition) is not supported.
    #[serde(default)]
    pub partuuid: Option<String>,
    /// Accepted for compatibility; foliovm has one I/O engine.
    #[serde(default)]
    pub io_engine: Option<String>,
    /// Accepted for compatibility; no caching modes.
    #[serde(default)]
    pub cache_type: Option<String>,
    /// Not supported.
    #[serde(default)]
    pub rate_limiter: Option<serde_json::Value>,
}

/// Firecracker's `balloon` section.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonSection {
    /// Target in MiB.
    pub amount_mib: u64,
    /// Let the guest deflate under memory pressure.
    pub deflate_on_oom: bool,
    /// Statistics interval in seconds (0: no statistics).
    #[serde(default)]
    pub stats_polling_interval_s: u32,
    /// Free page reporting (Firecracker 1.8+); foliovm's default is on.
    #[serde(default)]
    pub free_page_reporting: Option<bool>,
    /// Free page hinting is not supported; only `false` is accepted.
    #[serde(default)]
    pub free_page_hinting: Option<bool>,
}

/// Turn the config file's sections into a [`VirtioConfig`]; warnings for
/// accepted-but-ignored fields are appended to `warnings`.
///
/// # Errors
/// [`ConfigError::Invalid`] for unsupported settings.
pub fn from_sections(
    drives: Vec<DriveSection>,
    balloon: Option<BalloonSection>,
    warnings: &mut Vec<String>,
) -> Result<VirtioConfig, ConfigError> {
    let mut out = VirtioConfig::default();
    for d in drives {
        if d.partuuid.is_some() {
            return Err(ConfigError::Invalid(format!(
                "drive {:?}: partuuid is not supported (use a whole-disk filesystem image)",
                d.drive_id
            )));
        }
        if d.rate_limiter.is_some() || d.io_engine.is_some() || d.cache_type.is_some() {
            warnings.push(format!(
                "drive {:?}: rate_limiter, io_engine and cache_type are ignored",
                d.drive_id
            ));
        }
        out.drives.push(DriveConfig {
            id: d.drive_id,
            path: d.path_on_host,
            read_only: d.is_read_only,
            root: d.is_root_device,
        });
    }
    if let Some(b) = balloon {
        if b.free_page_hinting == Some(true) {
            return Err(ConfigError::Invalid(
                "balloon.free_page_hinting is not supported".into(),
            ));
        }
        out.balloon = Some(BalloonSpec {
            device: BalloonConfig {
                target_bytes: b.amount_mib.checked_mul(1 << 20).ok_or_else(|| {
                    ConfigError::Invalid(format!(
                        "balloon amount_mib {} is too large",
                        b.amount_mib
                    ))
                })?,
                deflate_on_oom: b.deflate_on_oom,
                stats: b.stats_polling_interval_s > 0,
                free_page_reporting: b.free_page_reporting.unwrap_or(true),
            },
            stats_interval_s: b.stats_polling_interval_s,
        });
    }
    Ok(out)
}

/// Errors attaching virtio devices.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// A drive image is missing, unreadable or too small.
    #[error("drive {id:?}")]
    Disk {
        /// Drive id.
        id: String,
        /// What is wrong with the image.
        #[source]
        source: devices::virtio::block::DiskError,
    },
    /// An eventfd or timerfd could not be created.
    #[error("cannot create {what} for virtio device {index}")]
    Host {
        /// What.
        what: &'static str,
        /// Device index.
        index: usize,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// KVM refused the interrupt line.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// The device I/O thread's event loop could not be created.
    #[error("cannot create the device I/O event loop")]
    EventLoop(#[source] std::io::Error),
}

/// Guest RAM as devices see it: pins and discards through the memory
/// manager (folio backend), or plain `madvise` (anon backend).
struct VmRam {
    /// Used by the anon backend only, whose memory never relocates.
    mem: GuestMemoryMmap,
    manager: Option<(Arc<MemoryManager>, VmId)>,
}

impl RamControl for VmRam {
    fn pin(&self, gpa: u64, len: u64) -> Result<Option<PinToken>, RamError> {
        match &self.manager {
            Some((mm, vm)) => match mm.pin(*vm, mem::GuestAddress(gpa), len) {
                Ok(g) => Ok(Some(Box::new(g) as PinToken)),
                Err(mem::PinError::NoMemory) => Err(RamError::NoMemory { gpa, len }),
                Err(e) => Err(RamError::Backend(e.to_string())),
            },
            None => Ok(None),
        }
    }

    fn discard(&self, gpa: u64, len: u64) -> Result<u64, RamError> {
        let out_of_range = RamError::OutOfRange { gpa, len };
        match &self.manager {
            Some((mm, vm)) => match mm.discard(*vm, mem::GuestAddress(gpa), len) {
                Ok(o) => Ok(o.resident_pages * PAGE_SIZE),
                Err(mem::DiscardError::OutOfRange { .. } | mem::DiscardError::Unaligned { .. }) => {
                    Err(out_of_range)
                }
                Err(e) => Err(RamError::Backend(e.to_string())),
            },
            None => {
                // Anon backend: drop the pages; how many were resident is
                // unknown, so the whole range is counted.
                let slice = self
                    .mem
                    .get_slice(GuestAddress(gpa), len as usize)
                    .map_err(|_| out_of_range)?;
                // SAFETY: the range was bounds-checked by vm-memory against
                // one private anonymous guest mapping; MADV_DONTNEED on it
                // only makes the guest read zeros there next, which is what
                // the guest asked for by giving the pages up.
                let r = unsafe {
                    libc::madvise(
                        slice.ptr_guard_mut().as_ptr().cast(),
                        len as usize,
                        libc::MADV_DONTNEED,
                    )
                };
                if r != 0 {
                    return Err(RamError::Backend(
                        std::io::Error::last_os_error().to_string(),
                    ));
                }
                Ok(len)
            }
        }
    }
}

/// The first retry of a deferred queue comes this soon; each retry that
/// finds it deferred again waits twice as long, up to [`RETRY_MAX`], so a
/// long memory stall costs the device I/O thread a pin attempt now and then.
const RETRY_FIRST: Duration = Duration::from_millis(5);
/// The longest wait between two retries of a deferred queue.
const RETRY_MAX: Duration = Duration::from_millis(500);

/// A non-blocking timer for a transport's queue retries.
///
/// Non-blocking because [`QueueEvents`] disarms it once nothing waits: an
/// expiry already reported by epoll in the same round is then gone, and
/// reading it must not block the device I/O thread.
fn retry_timer() -> std::io::Result<TimerFd> {
    // SAFETY: timerfd_create takes no pointers; its result is checked.
    let fd = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_CLOEXEC | libc::TFD_NONBLOCK,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a timerfd just created and owned by nobody else; the
    // TimerFd takes ownership and closes it on drop.
    Ok(unsafe { TimerFd::from_raw_fd(fd) })
}

/// A device's queue notifications on the VM's device I/O thread, and the
/// retries of queues it deferred ([`QueueState::Deferred`]: a request waits
/// for guest memory) on a timer.
struct QueueEvents<D: VirtioDevice> {
    transport: Arc<Mutex<MmioTransport<D>>>,
    fds: Vec<i32>,
    retry: TimerFd,
    /// Queues left deferred by their last processing.
    deferred: Vec<bool>,
    /// Whether `retry` is armed.
    armed: bool,
    /// The wait before the next retry.
    backoff: Duration,
}

impl<D: VirtioDevice> QueueEvents<D> {
    fn process_queue(&mut self, i: usize) {
        let state = self
            .transport
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .notified(i);
        if let Some(d) = self.deferred.get_mut(i) {
            *d = state == QueueState::Deferred;
        }
    }

    /// Arm the retry timer if a queue is deferred and it is not armed yet.
    fn arm(&mut self) {
        if self.armed || !self.deferred.contains(&true) {
            return;
        }
        match self.retry.reset(self.backoff, None) {
            Ok(()) => self.armed = true,
            Err(e) => eprintln!("foliovm: warning: cannot arm a virtio retry timer: {e}"),
        }
    }
}

impl<D: VirtioDevice + 'static> MutEventSubscriber for QueueEvents<D> {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if let Some(i) = self.fds.iter().position(|&fd| fd == events.fd()) {
            self.process_queue(i);
        } else if events.fd() == self.retry.as_raw_fd() {
            if self.retry.wait().is_err() {
                // Disarmed after epoll reported it (below): nothing is due.
                return;
            }
            self.armed = false;
            for i in 0..self.deferred.len() {
                if self.deferred[i] {
                    self.process_queue(i);
                }
            }
            self.backoff = (self.backoff * 2).min(RETRY_MAX);
        }
        if !self.deferred.contains(&true) {
            // Served, by a retry or a notification: the next wait for
            // memory starts with short retries again, also if the timer
            // is still armed far ahead by the wait that just ended.
            self.backoff = RETRY_FIRST;
            if self.armed && self.retry.clear().is_ok() {
                self.armed = false;
            }
        }
        self.arm();
    }

    fn init(&mut self, ops: &mut EventOps) {
        for &fd in &self.fds {
            let _ = ops.add(Events::new_raw(fd, EventSet::IN));
        }
        let _ = ops.add(Events::new(&self.retry, EventSet::IN));
    }
}

/// The balloon's event hook: queue the event for [`BalloonEvents`] and
/// wake it. An event already waiting is not queued again: a guest that
/// resets and re-activates its balloon in a loop, from every vCPU, would
/// otherwise grow the queue faster than the event loop prints its lines.
fn balloon_event_hook(
    pending: Arc<Mutex<Vec<BalloonEvent>>>,
    wake: EventFd,
) -> impl Fn(BalloonEvent) + Send + 'static {
    move |e| {
        if e == BalloonEvent::Stats {
            return;
        }
        let mut q = pending.lock().unwrap_or_else(|p| p.into_inner());
        if !q.contains(&e) {
            q.push(e);
            let _ = wake.write(1);
        }
    }
}

/// Balloon side jobs on the VM's device I/O thread: statistics polling and
/// memory statistics lines when the guest reaches a target.
struct BalloonEvents {
    handle: BalloonHandle,
    /// Signalled by the device's event hook; the events wait in `pending`.
    reached: EventFd,
    pending: Arc<Mutex<Vec<BalloonEvent>>>,
    timer: Option<TimerFd>,
    stats: MemStats,
}

impl MutEventSubscriber for BalloonEvents {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.reached.as_raw_fd() {
            let _ = self.reached.read();
            let pending =
                std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
            for e in pending {
                let name = match e {
                    BalloonEvent::Activated => "balloon-activated",
                    BalloonEvent::TargetReached => "balloon-target-reached",
                    BalloonEvent::Stats => continue,
                };
                self.stats.print(name, Some(&self.handle));
            }
        } else if let Some(t) = &mut self.timer {
            if events.fd() == t.as_raw_fd() {
                let _ = t.wait();
                self.handle.request_stats();
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new_raw(self.reached.as_raw_fd(), EventSet::IN));
        if let Some(t) = &self.timer {
            let _ = ops.add(Events::new_raw(t.as_raw_fd(), EventSet::IN));
        }
    }
}

/// Prints `FOLIOVM-MEMSTATS {json}` lines.
#[derive(Clone)]
pub struct MemStats {
    manager: Option<(Arc<MemoryManager>, VmId)>,
}

impl MemStats {
    /// The JSON of one line: the VM's memory-manager statistics and, if
    /// given, the balloon's counters and latest guest statistics.
    pub fn json(&self, event: &str, balloon: Option<&BalloonHandle>) -> serde_json::Value {
        let mut v = serde_json::json!({ "event": event });
        if let Some((mm, vm)) = &self.manager {
            if let Some(s) = mm.vm_stats(*vm) {
                v["resident_bytes"] = s.resident_bytes().into();
                v["resident_bytes_by_order"] = s.resident_bytes_by_order.to_vec().into();
                v["discarded_pages"] = s.discarded_pages.into();
                v["discard_skipped_pinned"] = s.discard_skipped_pinned.into();
            }
            v["deferred_split_queue"] = mm.stats().deferred_split_queue.into();
        }
        if let Some(b) = balloon {
            let c = b.counters();
            v["balloon"] = serde_json::json!({
                "target_bytes": c.target_bytes,
                "actual_bytes": c.actual_bytes,
                "inflated_bytes": c.inflated_bytes,
                "deflated_bytes": c.deflated_bytes,
                "inflate_returned_bytes": c.inflate_returned_bytes,
                "reported_bytes": c.reported_bytes,
                "report_returned_bytes": c.report_returned_bytes,
                "malformed": c.malformed,
                "targets_reached": c.targets_reached,
                "guest_stats": b
                    .stats()
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), serde_json::Value::from(v)))
                    .collect::<serde_json::Map<_, _>>(),
            });
        }
        v
    }

    /// Print one line on stderr.
    pub fn print(&self, event: &str, balloon: Option<&BalloonHandle>) {
        eprintln!("FOLIOVM-MEMSTATS {}", self.json(event, balloon));
    }
}

/// The VM's virtio devices, once attached.
pub struct VirtioDevices {
    /// The balloon, for the API (`set_target`) and statistics.
    pub balloon: Option<BalloonHandle>,
    /// The drives' ids and counters (read without their transport lock).
    drives: DriveCounters,
    stats: MemStats,
    /// Every device's transport, for guest memory switches.
    transports: Vec<Arc<Mutex<dyn MemorySwitch>>>,
    /// The thread that serves the devices' queues and timers.
    io: IoThread,
}

/// The drives' ids and counters, in attach order.
#[derive(Default)]
struct DriveCounters(Vec<(String, Arc<SharedBlockCounters>)>);

impl DriveCounters {
    fn snapshot(&self) -> Vec<(String, BlockCounters)> {
        self.0
            .iter()
            .map(|(id, c)| (id.clone(), c.snapshot()))
            .collect()
    }
}

impl VirtioDevices {
    /// Each drive's id and counters, in attach order. Takes no device
    /// lock: the API does not wait for a request in progress (a read from
    /// a hung disk) on the VM's device I/O thread.
    pub fn drive_counters(&self) -> Vec<(String, BlockCounters)> {
        self.drives.snapshot()
    }

    /// Start the device I/O thread; a failure of its loop stops the VM
    /// through `stop`.
    ///
    /// # Errors
    /// The OS error spawning it.
    pub fn start(&mut self, stop: Arc<StopSignal>) -> std::io::Result<()> {
        self.io.start(stop)
    }

    /// Ask the device I/O thread to exit, without waiting; `true` once it
    /// has (joined), so that no device work runs any more.
    pub fn try_join_io(&mut self) -> bool {
        self.io.request_exit();
        self.io.try_join()
    }

    /// Ask the device I/O thread to exit and wait until it has: the request
    /// it serves completes first. No device work runs afterwards but what
    /// another thread asks of a device itself (an API request).
    pub fn join_io(&mut self) {
        self.io.join();
    }

    /// Guest memory moved (region relocation, vCPUs paused): every device
    /// addresses its queues through `mem` from now on. Every transport is
    /// locked (the I/O thread runs their queues under the same locks), then
    /// `between` runs, then each gets `mem`: no device is in a request from
    /// the first lock to the last unlock, so no request sees `between`'s
    /// effect with the old memory, or the new memory without it (a
    /// relocation makes its regions live there).
    pub fn switch_memory(&self, mem: &GuestMemoryMmap, between: impl FnOnce()) {
        let mut locked: Vec<_> = self
            .transports
            .iter()
            .map(|t| t.lock().unwrap_or_else(|p| p.into_inner()))
            .collect();
        between();
        for t in &mut locked {
            t.set_memory(mem.clone());
        }
    }

    /// The VM stopped and its memory is given back: reset every device, so
    /// that nothing touches (and so faults back in) its guest memory.
    ///
    /// Invariant: the device I/O thread was joined ([`Self::join_io`]), so
    /// no request of its is half-served.
    pub fn stop(&mut self) {
        debug_assert!(self.io.try_join(), "devices reset under their I/O thread");
        for t in &self.transports {
            t.lock().unwrap_or_else(|p| p.into_inner()).stop();
        }
    }

    /// The VM is over: print the final memory statistics line (with a balloon).
    pub fn finish(&self) {
        if let Some(b) = &self.balloon {
            self.stats.print("exit", Some(b));
        }
    }
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Create every configured device of the VM `vm_name`, place it on `mmio`,
/// wire its irqfd and ioeventfds, and register its queues with the VM's
/// device I/O thread (started by [`VirtioDevices::start`]).
///
/// # Errors
/// [`VirtioError`]: a bad drive image, or a host or KVM failure.
pub fn attach(
    config: &VirtioConfig,
    vm_name: &str,
    vm: &KvmVm,
    mem: &GuestMemoryMmap,
    manager: Option<(Arc<MemoryManager>, VmId)>,
    mmio: &mut Bus,
) -> Result<VirtioDevices, VirtioError> {
    let mut io = IoThread::new(vm_name).map_err(VirtioError::EventLoop)?;
    let events = io.events().expect("a new I/O thread is not started");
    let ram: Arc<dyn RamControl> = Arc::new(VmRam {
        mem: mem.clone(),
        manager: manager.clone(),
    });
    let stats = MemStats { manager };
    let mut index = 0;
    let mut transports: Vec<Arc<Mutex<dyn MemorySwitch>>> = Vec::new();
    let mut drives = DriveCounters::default();
    for d in config.ordered_drives() {
        let disk =
            DiskImage::open(&d.path, d.read_only, &d.id).map_err(|source| VirtioError::Disk {
                id: d.id.clone(),
                source,
            })?;
        let name = format!("drive {}", d.id);
        let dev = Block::new(disk, ram.clone(), &name);
        drives.0.push((d.id.clone(), dev.shared_counters()));
        let t = place(dev, index, vm, mem, mmio, events)?;
        transports.push(t);
        index += 1;
    }
    let mut balloon = None;
    if let Some(spec) = &config.balloon {
        let reached = EventFd::new(libc::EFD_NONBLOCK).map_err(host("eventfd", index))?;
        let hook = reached.try_clone().map_err(host("eventfd", index))?;
        let pending = Arc::new(Mutex::new(Vec::new()));
        let queue = pending.clone();
        let mut dev = Balloon::new(spec.device, ram.clone());
        dev.set_event_hook(balloon_event_hook(queue, hook));
        let t = place(dev, index, vm, mem, mmio, events)?;
        transports.push(t.clone());
        let handle = BalloonHandle::new(t);
        let timer = if spec.stats_interval_s > 0 {
            let mut t = TimerFd::new().map_err(errno("timerfd", index))?;
            let every = Duration::from_secs(spec.stats_interval_s.into());
            t.reset(every, Some(every))
                .map_err(errno("timerfd", index))?;
            Some(t)
        } else {
            None
        };
        let sub: Subscriber = Arc::new(Mutex::new(BalloonEvents {
            handle: handle.clone(),
            reached,
            pending,
            timer,
            stats: stats.clone(),
        }));
        events.add_subscriber(sub);
        balloon = Some(handle);
    }
    Ok(VirtioDevices {
        balloon,
        drives,
        stats,
        transports,
        io,
    })
}

fn host(what: &'static str, index: usize) -> impl Fn(std::io::Error) -> VirtioError {
    move |source| VirtioError::Host {
        what,
        index,
        source,
    }
}

fn errno(what: &'static str, index: usize) -> impl Fn(vmm_sys_util::errno::Error) -> VirtioError {
    move |e| VirtioError::Host {
        what,
        index,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

/// Put `dev` in slot `index`: transport on the bus, irqfd, ioeventfds.
fn place<D: VirtioDevice + 'static>(
    dev: D,
    index: usize,
    vm: &KvmVm,
    mem: &GuestMemoryMmap,
    mmio: &mut Bus,
    events: &mut dyn SubscriberOps<Subscriber = Subscriber>,
) -> Result<Arc<Mutex<MmioTransport<D>>>, VirtioError> {
    let (base, irq) = VirtioConfig::slot(index);
    let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(host("irq eventfd", index))?;
    vm.fd()
        .register_irqfd(&irqfd, irq)
        .map_err(|source| KvmError::Ioctl {
            op: "KVM_IRQFD",
            source,
        })?;
    let line = IrqLine::new(move || irqfd.write(1));
    let nq = dev.queue_max_sizes().len();
    let mut notify = Vec::with_capacity(nq);
    for q in 0..nq {
        let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(host("queue eventfd", index))?;
        let addr = IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET);
        if let Err(e) = vm.fd().register_ioevent(&fd, &addr, q as u32) {
            // The transport signals the same eventfd on a QueueNotify exit.
            eprintln!("foliovm: warning: no KVM ioeventfd for virtio device {index} queue {q} ({e}); notifications take a VM exit");
        }
        notify.push(fd);
    }
    let fds: Vec<i32> = notify.iter().map(|f| f.as_raw_fd()).collect();
    let t = Arc::new(Mutex::new(MmioTransport::new(
        dev,
        mem.clone(),
        line,
        notify,
    )));
    mmio.insert(t.clone(), base, MMIO_WINDOW)
        .expect("virtio windows are disjoint and nothing else is placed there");
    let sub: Subscriber = Arc::new(Mutex::new(QueueEvents {
        transport: t.clone(),
        deferred: vec![false; fds.len()],
        fds,
        retry: retry_timer().map_err(|source| VirtioError::Host {
            what: "retry timerfd",
            index,
            source,
        })?,
        armed: false,
        backoff: RETRY_FIRST,
    }));
    events.add_subscriber(sub);
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
    use std::time::Instant;
    use vm_memory::Bytes;

    #[test]
    fn balloon_events_wait_once_however_often_the_guest_raises_them() {
        let pending = Arc::new(Mutex::new(Vec::new()));
        let wake = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let hook = balloon_event_hook(pending.clone(), wake.try_clone().unwrap());
        for _ in 0..10_000 {
            hook(BalloonEvent::Activated);
            hook(BalloonEvent::TargetReached);
            hook(BalloonEvent::Stats);
        }
        assert_eq!(pending.lock().unwrap().len(), 2, "one of each waits");
        assert_eq!(
            *pending.lock().unwrap(),
            vec![BalloonEvent::Activated, BalloonEvent::TargetReached]
        );
        assert_eq!(wake.read().unwrap(), 2);
        // Once the event loop took them, they queue again.
        pending.lock().unwrap().clear();
        hook(BalloonEvent::Activated);
        assert_eq!(*pending.lock().unwrap(), vec![BalloonEvent::Activated]);
    }

    #[test]
    fn drive_flags() {
        let d = parse_drive_flag("/img/root.ext4,ro,root,id=rootfs", 0).unwrap();
        assert_eq!(
            d,
            DriveConfig {
                id: "rootfs".into(),
                path: "/img/root.ext4".into(),
                read_only: true,
                root: true
            }
        );
        assert_eq!(parse_drive_flag("a.img", 3).unwrap().id, "drive3");
        for bad in ["", ",ro", "a.img,fast", "a.img,id="] {
            assert!(parse_drive_flag(bad, 0).is_err(), "{bad}");
        }
        // An option given twice, or ro and rw both: refused, not the last wins.
        for twice in ["x,ro,ro", "x,ro,rw", "x,id=a,id=b", "x,root,root"] {
            let e = parse_drive_flag(twice, 0).unwrap_err().to_string();
            assert!(e.contains("repeats an earlier one"), "{twice}: {e}");
        }
    }

    #[test]
    fn balloon_flags() {
        let b = parse_balloon_flag("64M,deflate_on_oom,stats=2").unwrap();
        assert_eq!(b.device.target_bytes, 64 << 20);
        assert!(b.device.deflate_on_oom && b.device.stats && b.device.free_page_reporting);
        assert_eq!(b.stats_interval_s, 2);
        assert!(
            !parse_balloon_flag("0,no_reporting")
                .unwrap()
                .device
                .free_page_reporting
        );
        assert!(parse_balloon_flag("1G,bogus").is_err());
        let e = parse_balloon_flag("1G,stats=1,stats=2")
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"stats=2\" repeats an earlier one"), "{e}");
        // Every error names the flag once, a bad size too (the CLI adds
        // nothing: it said "invalid --balloon: --balloon ..." before).
        for (flag, want) in [
            ("lots", "--balloon \"lots\": invalid size \"lots\""),
            ("8M,stats=x", "--balloon \"8M,stats=x\": bad stats interval"),
            ("8M,foo", "--balloon \"8M,foo\": unknown option \"foo\""),
        ] {
            let e = parse_balloon_flag(flag).unwrap_err().to_string();
            assert!(e.starts_with(want), "{e}");
        }
    }

    #[test]
    fn cmdline_and_layout() {
        let c = VirtioConfig {
            drives: vec![
                parse_drive_flag("data.img", 0).unwrap(),
                parse_drive_flag("root.img,root", 1).unwrap(),
            ],
            balloon: Some(parse_balloon_flag("0").unwrap()),
        };
        assert_eq!(c.ordered_drives()[0].id, "drive1", "root first");
        assert_eq!(
            c.cmdline_extras("console=ttyS0 -- echo root=x"),
            vec![
                "virtio_mmio.device=4K@0xd0001000:5",
                "virtio_mmio.device=4K@0xd0002000:6",
                "virtio_mmio.device=4K@0xd0003000:7",
                "root=/dev/vda",
                "rw"
            ]
        );
        assert_eq!(
            c.cmdline_extras("root=/dev/vdb").len(),
            3,
            "the user's root wins"
        );
        assert!(c.validate(256 << 20).is_ok());
    }

    #[test]
    fn validation() {
        let two_roots = VirtioConfig {
            drives: vec![
                parse_drive_flag("a,root", 0).unwrap(),
                parse_drive_flag("b,root", 1).unwrap(),
            ],
            balloon: None,
        };
        assert!(two_roots
            .validate(1 << 30)
            .unwrap_err()
            .to_string()
            .contains("more than one"));
        let dup = VirtioConfig {
            drives: vec![
                parse_drive_flag("a,id=x", 0).unwrap(),
                parse_drive_flag("b,id=x", 1).unwrap(),
            ],
            balloon: None,
        };
        assert!(dup
            .validate(1 << 30)
            .unwrap_err()
            .to_string()
            .contains("two drives"));
        let big = VirtioConfig {
            drives: vec![],
            balloon: Some(parse_balloon_flag("2G").unwrap()),
        };
        assert!(big
            .validate(1 << 30)
            .unwrap_err()
            .to_string()
            .contains("exceeds guest memory"));
        let many = VirtioConfig {
            drives: (0..20).map(|i| parse_drive_flag("a", i).unwrap()).collect(),
            balloon: None,
        };
        assert!(many.validate(1 << 30).is_err());
        for id in ["a/b", "a-b", "é", &"x".repeat(65)] {
            let bad = VirtioConfig {
                drives: vec![parse_drive_flag(&format!("a,id={id}"), 0).unwrap()],
                balloon: None,
            };
            assert_eq!(
                bad.validate(1 << 30).unwrap_err().to_string(),
                format!("drive id {id:?}: use 1 to 64 letters, digits or '_'")
            );
        }
        let good = VirtioConfig {
            drives: vec![parse_drive_flag(&format!("a,id=Root_1{}", "x".repeat(57)), 0).unwrap()],
            balloon: None,
        };
        assert!(good.validate(1 << 30).is_ok());
    }

    #[test]
    fn firecracker_sections() {
        let drives: Vec<DriveSection> = serde_json::from_str(
            r#"[{"drive_id": "rootfs", "path_on_host": "r.ext4", "is_root_device": true, "is_read_only": false}]"#,
        )
        .unwrap();
        let balloon: BalloonSection = serde_json::from_str(
            r#"{"amount_mib": 64, "deflate_on_oom": true, "stats_polling_interval_s": 1}"#,
        )
        .unwrap();
        let mut w = Vec::new();
        let c = from_sections(drives, Some(balloon), &mut w).unwrap();
        assert!(w.is_empty());
        assert!(c.drives[0].root && !c.drives[0].read_only);
        let b = c.balloon.unwrap();
        assert_eq!(b.device.target_bytes, 64 << 20);
        assert!(b.device.stats && b.device.free_page_reporting && b.device.deflate_on_oom);
        let hinting: BalloonSection = serde_json::from_str(
            r#"{"amount_mib": 0, "deflate_on_oom": false, "free_page_hinting": true}"#,
        )
        .unwrap();
        assert!(from_sections(vec![], Some(hinting), &mut w).is_err());
    }

    /// One queue whose processing is deferred while `defer` is above zero
    /// (each deferral counts it down), then drains; the time of every
    /// processing is kept.
    struct Deferring {
        defer: Arc<AtomicU32>,
        calls: Arc<Mutex<Vec<Instant>>>,
    }

    impl VirtioDevice for Deferring {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn features(&self) -> u64 {
            1 << devices::virtio::VIRTIO_F_VERSION_1
        }
        fn read_config(&self, _offset: u64, _data: &mut [u8]) {}
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(&mut self, _queues: devices::virtio::ActiveQueues) {}
        fn reset(&mut self) {}
        fn set_memory(&mut self, _mem: GuestMemoryMmap) {}
        fn process_queue(&mut self, _index: usize) -> QueueState {
            self.calls.lock().unwrap().push(Instant::now());
            let left = self.defer.load(SeqCst);
            if left == 0 {
                return QueueState::Drained;
            }
            self.defer.store(left - 1, SeqCst);
            QueueState::Deferred
        }
    }

    /// A `Deferring` device on an event loop.
    struct DeferringLoop {
        events: event_manager::EventManager<Subscriber>,
        /// The device's deferrals left.
        defer: Arc<AtomicU32>,
        /// When the device processed its queue.
        calls: Arc<Mutex<Vec<Instant>>>,
        /// The queue's notifier, as the guest kicks it.
        kick: EventFd,
    }

    /// A `Deferring` device probed by a driver (features, one queue,
    /// DRIVER_OK) and put on an event loop.
    fn deferring_on_event_loop(defer: u32) -> DeferringLoop {
        use devices::BusDevice;
        let defer = Arc::new(AtomicU32::new(defer));
        let calls = Arc::new(Mutex::new(Vec::new()));
        let dev = Deferring {
            defer: defer.clone(),
            calls: calls.clone(),
        };
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let kick = notify.try_clone().unwrap();
        let fd = notify.as_raw_fd();
        let t = Arc::new(Mutex::new(MmioTransport::new(
            dev,
            mem,
            IrqLine::new(|| Ok(())),
            vec![notify],
        )));
        {
            let mut t = t.lock().unwrap();
            driver_probe(|off, v| t.write(off, &v.to_le_bytes()), [DESC, AVAIL, USED]);
            assert!(t.is_live());
        }
        let mut events = event_manager::EventManager::<Subscriber>::new().unwrap();
        events.add_subscriber(Arc::new(Mutex::new(QueueEvents {
            transport: t,
            fds: vec![fd],
            retry: retry_timer().unwrap(),
            deferred: vec![false],
            armed: false,
            backoff: RETRY_FIRST,
        })));
        DeferringLoop {
            events,
            defer,
            calls,
            kick,
        }
    }

    /// Run the event loop until the device was processed `n` times in all.
    fn run_until_processed(
        events: &mut event_manager::EventManager<Subscriber>,
        calls: &Mutex<Vec<Instant>>,
        n: usize,
    ) {
        let start = Instant::now();
        while calls.lock().unwrap().len() < n {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "retries stopped at {} calls",
                calls.lock().unwrap().len()
            );
            events.run_with_timeout(100).unwrap();
        }
    }

    /// A queue its device deferred (a request waiting for guest memory) is
    /// processed again by the event loop's retry timer, with no further
    /// notification from the guest, until it drains; then the retries
    /// stop. Without them the request would wait for the guest's next kick,
    /// which may never come.
    #[test]
    fn a_deferred_queue_is_retried_until_it_drains() {
        let DeferringLoop {
            mut events, calls, ..
        } = deferring_on_event_loop(4);
        // Activation notified the queue once; the rest are retries
        // (5 + 10 + 20 + 40 ms of back-off).
        run_until_processed(&mut events, &calls, 5);
        // Drained: no more retries.
        for _ in 0..5 {
            events.run_with_timeout(100).unwrap();
        }
        assert_eq!(calls.lock().unwrap().len(), 5);
    }

    /// A long memory wait that a guest notification ends (not a retry)
    /// leaves the retry timer armed far ahead; the next wait for memory
    /// must still be retried soon, not when that old timer fires. Without
    /// disarming it, the first retry came after 320 ms.
    #[test]
    fn a_new_memory_wait_starts_with_a_short_retry() {
        let DeferringLoop {
            mut events,
            defer,
            calls,
            kick,
        } = deferring_on_event_loop(u32::MAX);
        // Activation and six retries (5 + 10 + ... + 160 ms): the timer is
        // now armed for 320 ms.
        run_until_processed(&mut events, &calls, 7);
        // Memory comes and the guest notifies: served.
        defer.store(0, SeqCst);
        kick.write(1).unwrap();
        run_until_processed(&mut events, &calls, 8);
        // Short of memory again at once: the next request waits.
        defer.store(u32::MAX, SeqCst);
        kick.write(1).unwrap();
        run_until_processed(&mut events, &calls, 9);
        let deferred_at = Instant::now();
        run_until_processed(&mut events, &calls, 10);
        let first_retry = calls.lock().unwrap()[9] - deferred_at;
        assert!(
            first_retry < Duration::from_millis(100),
            "the first retry of a new memory wait came after {first_retry:?}, not about {RETRY_FIRST:?}"
        );
    }

    /// Where the drive tests put their one request in guest memory: the
    /// queue (descriptor table, available and used rings) in page 1, the
    /// request header and status byte in page 2, the data in page 4.
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x1100;
    const USED: u64 = 0x1200;
    /// A virtio-mmio driver's probe through `wr(offset, value)`: features
    /// (VERSION_1), queue 0 of 16 entries with its descriptor table, avail
    /// and used rings at `rings`, ready, then DRIVER_OK.
    fn driver_probe(mut wr: impl FnMut(u64, u32), rings: [u64; 3]) {
        wr(0x070, 1 | 2);
        wr(0x024, 1);
        wr(0x020, 1);
        wr(0x070, 1 | 2 | 8);
        wr(0x030, 0);
        wr(0x038, 16);
        wr(0x080, rings[0] as u32);
        wr(0x090, rings[1] as u32);
        wr(0x0a0, rings[2] as u32);
        wr(0x044, 1);
        wr(0x070, 1 | 2 | 8 | 4);
    }

    const HEADER: u64 = 0x2000;
    const STATUS: u64 = 0x2010;
    const DATA: u64 = 0x4000;
    const DATA_LEN: u32 = 4096;

    /// A drive image whose every byte is `fill`; removed on drop.
    struct TempImage(PathBuf);

    impl TempImage {
        fn new(fill: u8) -> Self {
            let p = std::env::temp_dir().join(format!(
                "foliovm-virtio-test-{}-{fill:#x}",
                std::process::id()
            ));
            std::fs::write(&p, vec![fill; 16 * 512]).unwrap();
            TempImage(p)
        }
    }

    impl Drop for TempImage {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// One VM as far as its devices go: a KVM VM with an irqchip (for the
    /// drive's irqfd and ioeventfd), 1 MiB of guest memory (anon backend),
    /// and one drive attached on its MMIO bus, set up by a driver.
    struct DriveVm {
        mem: GuestMemoryMmap,
        mmio: Bus,
        devices: VirtioDevices,
        _kvm: KvmVm,
        _image: TempImage,
    }

    /// A [`DriveVm`] whose image's bytes are all `fill`, its device I/O
    /// thread started.
    fn drive_vm(fill: u8) -> DriveVm {
        let kvm = KvmVm::new().unwrap();
        kvm.setup_irqchip().unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let image = TempImage::new(fill);
        let config = VirtioConfig {
            drives: vec![DriveConfig {
                id: format!("d{fill:x}"),
                path: image.0.clone(),
                read_only: true,
                root: false,
            }],
            balloon: None,
        };
        let mut mmio = Bus::new();
        let mut devices =
            attach(&config, &format!("{fill:x}"), &kvm, &mem, None, &mut mmio).unwrap();
        devices.start(Arc::new(StopSignal::new().unwrap())).unwrap();
        // The driver's probe: features (VERSION_1), one queue, DRIVER_OK.
        driver_probe(
            |off, v| assert!(mmio.write(FIRST_WINDOW + off, &v.to_le_bytes())),
            [DESC, AVAIL, USED],
        );
        let mut status = [0u8; 4];
        assert!(mmio.read(FIRST_WINDOW + 0x070, &mut status));
        assert_eq!(
            u32::from_le_bytes(status),
            1 | 2 | 8 | 4,
            "the drive is live"
        );
        DriveVm {
            mem,
            mmio,
            devices,
            _kvm: kvm,
            _image: image,
        }
    }

    impl DriveVm {
        /// Post a read of the image's first sectors into `DATA` (not yet
        /// notified).
        fn post_read(&self) {
            let m = &self.mem;
            let desc = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
                let at = DESC + 16 * i;
                m.write_obj(addr, GuestAddress(at)).unwrap();
                m.write_obj(len, GuestAddress(at + 8)).unwrap();
                m.write_obj(flags, GuestAddress(at + 12)).unwrap();
                m.write_obj(next, GuestAddress(at + 14)).unwrap();
            };
            // NEXT = 1, WRITE (device writes) = 2.
            desc(0, HEADER, 16, 1, 1);
            desc(1, DATA, DATA_LEN, 1 | 2, 2);
            desc(2, STATUS, 1, 2, 0);
            // Header: type IN (read), sector 0.
            m.write_obj(0u32, GuestAddress(HEADER)).unwrap();
            m.write_obj(0u64, GuestAddress(HEADER + 8)).unwrap();
            m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            m.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
            m.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
        }

        /// Notify the queue (a QueueNotify write, as a guest's without an
        /// ioeventfd).
        fn notify(&self) {
            assert!(self
                .mmio
                .write(FIRST_WINDOW + QUEUE_NOTIFY_OFFSET, &0u32.to_le_bytes()));
        }

        /// Whether the device completed the request (used ring index 1).
        fn completed(&self) -> bool {
            self.mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap() == 1
        }

        /// The completed request's status byte and data.
        fn result(&self) -> (u8, Vec<u8>) {
            let mut data = vec![0u8; DATA_LEN as usize];
            self.mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
            (self.mem.read_obj(GuestAddress(STATUS)).unwrap(), data)
        }
    }

    /// Counts the pokes of an eventfd on the shared event loop (as the
    /// API's or a signal's would come).
    struct Pokes {
        evt: EventFd,
        seen: Arc<AtomicU32>,
    }

    impl MutEventSubscriber for Pokes {
        fn process(&mut self, _: Events, _: &mut EventOps) {
            let _ = self.evt.read();
            self.seen.fetch_add(1, SeqCst);
        }
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new_raw(self.evt.as_raw_fd(), EventSet::IN))
                .unwrap();
        }
    }

    /// Whether `done` came true within `limit`.
    fn within(limit: Duration, done: impl Fn() -> bool) -> bool {
        let start = Instant::now();
        while !done() {
            if start.elapsed() > limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }

    /// A drive request that blocks (a read into guest memory whose page a
    /// userfaultfd that nobody serves holds back, as a read from a hung
    /// disk would block) holds up its own VM's devices only: another VM's
    /// drive read is served, with its image's data, and the process's
    /// shared event loop answers, while it waits; once it can go on, it
    /// completes with its own image's data. With every VM's devices on the
    /// shared event loop, the blocked read held up both.
    #[test]
    fn a_blocked_drive_request_holds_up_only_its_own_vm() {
        use mem::sys::userfaultfd::{RawUffd, UffdMsg, EVENT_PAGEFAULT, REGISTER_MODE_MISSING};
        if !crate::kvm_usable() {
            return;
        }
        const LIMIT: Duration = Duration::from_secs(5);
        let mut shared = crate::vmm::event_manager().unwrap();
        let mut a = drive_vm(0xa0);
        let mut b = drive_vm(0xb0);
        let poke = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let seen = Arc::new(AtomicU32::new(0));
        shared.add_subscriber(Arc::new(Mutex::new(Pokes {
            evt: poke.try_clone().unwrap(),
            seen: seen.clone(),
        })));
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let shared_loop = {
            let done = done.clone();
            std::thread::spawn(move || {
                while !done.load(SeqCst) {
                    shared.run_with_timeout(20).unwrap();
                }
            })
        };
        a.post_read();
        b.post_read();
        // VM a's data page (never touched yet) becomes a hole that only
        // this test can fill.
        let uffd = RawUffd::open(0).unwrap();
        let base = a.mem.get_host_address(GuestAddress(0)).unwrap() as usize;
        // SAFETY: [base, base + 1 MiB) is VM a's guest memory, a private
        // anonymous mapping this test made (`a.mem`) and uses for nothing
        // else; the test unregisters it below, before `a` (and the mapping)
        // is dropped, and only a's device faults there meanwhile.
        unsafe { uffd.register(base, 1 << 20, REGISTER_MODE_MISSING) }.unwrap();
        a.notify();
        // Wait until a's read is blocked on its data page.
        let mut pfd = libc::pollfd {
            fd: uffd.raw(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is one live pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, LIMIT.as_millis() as i32) };
        let mut msg = [UffdMsg::default()];
        let got = uffd.read_msgs(&mut msg).unwrap();
        let blocked = ready == 1
            && got == 1
            && msg[0].event == EVENT_PAGEFAULT
            && msg[0].address as usize & !0xfff == base + DATA as usize;
        b.notify();
        poke.write(1).unwrap();
        let b_served = blocked && within(LIMIT, || b.completed());
        let loop_answered = blocked && within(LIMIT, || seen.load(SeqCst) > 0);
        let a_waited = !a.completed();
        // The API reads a's drive counters meanwhile: no wait for the
        // request in progress. (Were there one, the watchdog lets a's read
        // go on after LIMIT, and with it the counters' reader.)
        let counters_answered = std::thread::scope(|s| {
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            let uffd = &uffd;
            let watchdog = s.spawn(move || {
                let late = rx.recv_timeout(LIMIT).is_err();
                // a's read goes on (the kernel fills the page now).
                uffd.unregister(base, 1 << 20).unwrap();
                late
            });
            let read = a.devices.drive_counters();
            let _ = tx.send(());
            let late = watchdog.join().unwrap();
            blocked && !late && read.len() == 1
        });
        let a_served = within(LIMIT, || a.completed());
        done.store(true, SeqCst);
        shared_loop.join().unwrap();
        a.devices.join_io();
        b.devices.join_io();
        assert!(blocked, "VM a's read did not block on its data page");
        assert!(
            b_served,
            "VM b's drive read was not served within {LIMIT:?} while VM a's request was blocked"
        );
        assert_eq!(
            b.result(),
            (0, vec![0xb0; DATA_LEN as usize]),
            "VM b's data"
        );
        assert!(
            loop_answered,
            "the shared event loop did not answer within {LIMIT:?} while VM a's request was blocked"
        );
        assert!(
            a_waited,
            "VM a's read completed while its page was held back"
        );
        assert!(
            counters_answered,
            "VM a's drive counters were not read within {LIMIT:?} while its request was blocked"
        );
        assert!(a_served, "VM a's read did not complete once its page came");
        assert_eq!(
            a.result(),
            (0, vec![0xa0; DATA_LEN as usize]),
            "VM a's data"
        );
    }

    /// The anon backend's discard, with ranges a balloon driver may send
    /// (inflated page numbers, reported buffers): one that leaves guest
    /// RAM, straddles its end or is empty outside it is refused as out of
    /// range; nothing outside guest RAM is touched.
    #[test]
    fn anon_discards_outside_guest_ram_are_refused() {
        const MIB: u64 = 1 << 20;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let ram = VmRam { mem, manager: None };
        for (gpa, len) in [
            (MIB, PAGE_SIZE),
            (MIB - PAGE_SIZE, 2 * PAGE_SIZE),
            (!(PAGE_SIZE - 1), 0),
            ((u64::from(u32::MAX)) * PAGE_SIZE, PAGE_SIZE),
        ] {
            assert_eq!(
                ram.discard(gpa, len),
                Err(RamError::OutOfRange { gpa, len }),
                "{gpa:#x}+{len:#x}"
            );
        }
        assert_eq!(ram.discard(0, 0), Ok(0));
        assert_eq!(ram.discard(MIB - PAGE_SIZE, PAGE_SIZE), Ok(PAGE_SIZE));
    }

    /// With the guest's budget full and nothing to reclaim (no swap), a
    /// device pin reaches the devices as the transient `NoMemory` that
    /// makes a request wait ([`QueueState::Deferred`]), not as a failure;
    /// once memory is freed the same pin succeeds.
    #[test]
    fn an_exhausted_budget_gives_devices_a_transient_pin_error() {
        use mem::GuestMemoryBackend;
        const MIB: u64 = 1 << 20;
        let mm = MemoryManager::new(mem::MmConfig {
            budget_bytes: 4 * MIB,
            handler_threads: 1,
            fault_delivery: mem::FaultDelivery::Handlers,
            prezero_limit_bytes: None,
            swap: None,
            reclaim: mem::ReclaimConfig::default(),
        })
        .unwrap();
        let vm = mm.create_vm("pin").unwrap();
        let b = mm.backend(vm, &[(mem::GuestAddress(0), 8 * MIB)]).unwrap();
        let region = b.regions()[0];
        // The guest fills its budget (host threads fault like vCPUs).
        for p in 0..4 * MIB / PAGE_SIZE {
            // SAFETY: inside the region's live host mapping, which `b`
            // keeps; guest memory is written volatile, never borrowed.
            unsafe {
                let at = region.host_addr.add(p * PAGE_SIZE).as_ptr().cast::<u64>();
                std::ptr::write_volatile(at, p + 1);
            }
        }
        let ram = VmRam {
            mem: GuestMemoryMmap::new(),
            manager: Some((mm.clone(), vm)),
        };
        let gpa = 6 * MIB;
        let t = std::time::Instant::now();
        let e = ram.pin(gpa, PAGE_SIZE).err();
        eprintln!("the pin gave up after {:?}", t.elapsed());
        assert_eq!(
            e,
            Some(RamError::NoMemory {
                gpa,
                len: PAGE_SIZE
            })
        );
        // Memory trickling in, a page every 40 ms, does not make a pin of
        // four pages wait for each in turn: the limit is the pin's, not
        // each page's, so the event loop the pin holds is held about
        // 50 ms, not 160.
        let trickle = {
            let mm = mm.clone();
            std::thread::spawn(move || {
                for p in 0..4 {
                    std::thread::sleep(Duration::from_millis(40));
                    mm.discard(vm, mem::GuestAddress(p * PAGE_SIZE), PAGE_SIZE)
                        .unwrap();
                }
            })
        };
        let t = std::time::Instant::now();
        let e = ram.pin(gpa, 4 * PAGE_SIZE).err();
        eprintln!("the pin of four pages returned after {:?}", t.elapsed());
        assert_eq!(
            e,
            Some(RamError::NoMemory {
                gpa,
                len: 4 * PAGE_SIZE
            })
        );
        trickle.join().unwrap();
        // Memory comes back (a balloon, say): the retry succeeds.
        mm.discard(vm, mem::GuestAddress(0), MIB).unwrap();
        assert!(ram.pin(gpa, PAGE_SIZE).unwrap().is_some());
        drop(b);
        mm.destroy_vm(vm).unwrap();
    }
}
