//! virtio-balloon (virtio 1.x §5.5): inflate, deflate, statistics,
//! `deflate_on_oom` and free page reporting. Analogue of Linux
//! `drivers/virtio/virtio_balloon.c`, device side.
//!
//! Queues, in the order the driver finds them (absent ones take no index):
//! `inflateq`, `deflateq`, `statsq` (with STATS_VQ), `reporting_vq` (with
//! REPORTING). Pages that the guest inflates or reports are discarded
//! through [`RamControl::discard`]: with the folio memory manager their
//! folios go back to the pool, and a partly discarded large folio goes to
//! deferred split.
//!
//! Target: `num_pages` in config space, in 4 KiB pages; the driver moves
//! towards it and writes how far it got to `actual`. The VMM changes the
//! target at run time through [`BalloonHandle::set_target`].

#[cfg(test)]
mod fuzz;

use super::mmio::MmioTransport;
use super::queue::{drain_queue, Chain, ChainError, Served};
use super::{ActiveQueues, QueueState, RamControl, VirtioDevice, WarnLimit, VIRTIO_F_VERSION_1};
use std::sync::{Arc, Mutex};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestMemoryMmap};

/// virtio device id of a memory balloon.
pub const TYPE_BALLOON: u32 = 5;
/// The balloon's page size (VIRTIO_BALLOON_PFN_SHIFT), whatever the guest's.
pub const BALLOON_PAGE: u64 = 4096;
/// Queue size; Linux needs at least 32 entries for reporting.
pub const QUEUE_SIZE: u16 = 256;
/// Page numbers one inflate or deflate request may carry: Linux sends at
/// most `VIRTIO_BALLOON_ARRAY_PFNS_MAX` (256) per request.
pub const MAX_PFNS_PER_REQUEST: u64 = 256;

const F_MUST_TELL_HOST: u32 = 0;
const F_STATS_VQ: u32 = 1;
const F_DEFLATE_ON_OOM: u32 = 2;
const F_REPORTING: u32 = 5;

/// Size of one statistics entry: `{tag: le16, val: le64}`, packed.
const STAT_LEN: usize = 10;

/// Names of the statistics tags (VIRTIO_BALLOON_S_*), by tag.
pub const STAT_NAMES: [&str; 10] = [
    "swap_in",
    "swap_out",
    "major_faults",
    "minor_faults",
    "free_memory",
    "total_memory",
    "available_memory",
    "disk_caches",
    "hugetlb_allocations",
    "hugetlb_failures",
];

/// How the balloon is configured at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BalloonConfig {
    /// Initial target in bytes (rounded down to 4 KiB pages).
    pub target_bytes: u64,
    /// Let the guest deflate under memory pressure (VIRTIO_BALLOON_F_DEFLATE_ON_OOM).
    pub deflate_on_oom: bool,
    /// Offer the statistics queue.
    pub stats: bool,
    /// Offer free page reporting (VIRTIO_BALLOON_F_REPORTING).
    pub free_page_reporting: bool,
}

/// What each queue index is for, given the negotiated features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Inflate,
    Deflate,
    Stats,
    Reporting,
}

/// Counters of a balloon, as reported to the VMM.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BalloonCounters {
    /// Target, in bytes.
    pub target_bytes: u64,
    /// What the guest says it has in the balloon (`actual`), in bytes.
    pub actual_bytes: u64,
    /// Pages the guest inflated, in bytes (cumulative).
    pub inflated_bytes: u64,
    /// Pages the guest deflated, in bytes (cumulative).
    pub deflated_bytes: u64,
    /// Inflated memory that was resident and went back to the host.
    pub inflate_returned_bytes: u64,
    /// Free memory the guest reported (cumulative).
    pub reported_bytes: u64,
    /// Reported memory that was resident and went back to the host.
    pub report_returned_bytes: u64,
    /// Malformed chains or page numbers outside guest RAM.
    pub malformed: u64,
    /// Times the guest reached a non-zero target: once per target the
    /// VMM sets and per device reset, however often it writes `actual`.
    pub targets_reached: u64,
}

/// Events the VMM may want to act on (e.g. print memory statistics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BalloonEvent {
    /// The driver set DRIVER_OK (at boot, or after a driver rebind).
    Activated,
    /// The guest reports `actual == target`.
    TargetReached,
    /// New statistics arrived.
    Stats,
}

type EventHook = Box<dyn Fn(BalloonEvent) + Send>;

/// A virtio-balloon device.
pub struct Balloon {
    cfg: BalloonConfig,
    ram: Arc<dyn RamControl>,
    num_pages: u32,
    actual: u32,
    /// [`BalloonEvent::TargetReached`] was sent for the current target
    /// (re-armed by a new target or a device reset).
    reached: bool,
    queue_sizes: Vec<u16>,
    active: Option<(ActiveQueues, Vec<Role>)>,
    /// The stats buffer the driver gave us, held until we want new stats.
    stats_head: Option<u16>,
    stats: Vec<(u16, u64)>,
    counters: BalloonCounters,
    warn: WarnLimit,
    on_event: Option<EventHook>,
}

impl Balloon {
    /// A balloon over `ram`.
    pub fn new(cfg: BalloonConfig, ram: Arc<dyn RamControl>) -> Self {
        let nq = 2 + usize::from(cfg.stats) + usize::from(cfg.free_page_reporting);
        Balloon {
            cfg,
            ram,
            num_pages: pages_of(cfg.target_bytes),
            actual: 0,
            reached: false,
            queue_sizes: vec![QUEUE_SIZE; nq],
            active: None,
            stats_head: None,
            stats: Vec::new(),
            counters: BalloonCounters::default(),
            warn: WarnLimit::default(),
            on_event: None,
        }
    }

    /// Call `hook` on [`BalloonEvent`]s. It runs with the device locked, on a
    /// vCPU or event-loop thread: it should only signal someone.
    pub fn set_event_hook(&mut self, hook: impl Fn(BalloonEvent) + Send + 'static) {
        self.on_event = Some(Box::new(hook));
    }

    /// Counters.
    pub fn counters(&self) -> BalloonCounters {
        BalloonCounters {
            target_bytes: u64::from(self.num_pages) * BALLOON_PAGE,
            actual_bytes: u64::from(self.actual) * BALLOON_PAGE,
            ..self.counters
        }
    }

    /// The latest statistics from the guest, as (name, value) pairs.
    pub fn stats(&self) -> Vec<(&'static str, u64)> {
        self.stats
            .iter()
            .filter_map(|&(t, v)| STAT_NAMES.get(usize::from(t)).map(|n| (*n, v)))
            .collect()
    }

    /// Set the target; returns whether it changed.
    fn set_target_pages(&mut self, pages: u32) -> bool {
        let changed = pages != self.num_pages;
        self.num_pages = pages;
        self.reached &= !changed;
        changed
    }

    /// Give the held stats buffer back, which asks the driver for new
    /// statistics. Returns whether a request went out.
    pub fn request_stats(&mut self) -> bool {
        let Some((active, roles)) = self.active.as_mut() else {
            return false;
        };
        let Some(head) = self.stats_head.take() else {
            return false;
        };
        let Some(i) = roles.iter().position(|r| *r == Role::Stats) else {
            return false;
        };
        let mem = active.mem.clone();
        let q = &mut active.queues[i];
        if q.add_used(&mem, head, 0).is_ok() && q.needs_notification(&mem).unwrap_or(true) {
            active.irq.signal(super::INT_USED_RING);
        }
        true
    }

    fn event(&self, e: BalloonEvent) {
        if let Some(h) = &self.on_event {
            h(e);
        }
    }

    fn malformed(&mut self, what: &str, e: &dyn std::fmt::Display) {
        self.counters.malformed += 1;
        self.warn
            .warn(|| format!("balloon: malformed {what} request: {e}"));
    }

    /// Inflate or deflate: the chain carries le32 page numbers, at most
    /// [`MAX_PFNS_PER_REQUEST`] of them (a guest could otherwise make the
    /// VMM allocate for a list as long as its RAM, again per descriptor).
    fn page_list(&mut self, chain: &Chain, mem: &GuestMemoryMmap) -> Result<Vec<u64>, String> {
        let mut pfns = Vec::new();
        let total: u64 = chain.buffers.iter().map(|b| u64::from(b.len)).sum();
        if total > MAX_PFNS_PER_REQUEST * 4 {
            return Err(format!(
                "page list of {total} bytes is longer than {MAX_PFNS_PER_REQUEST} page numbers"
            ));
        }
        for b in &chain.buffers {
            if b.writable {
                return Err("page list in a device-writable buffer".into());
            }
            if !b.len.is_multiple_of(4) {
                return Err(format!("page list of {} bytes is not whole le32s", b.len));
            }
            let mut raw = vec![0u8; b.len as usize];
            mem.read_slice(&mut raw, b.addr)
                .map_err(|e| format!("cannot read page list: {e}"))?;
            pfns.extend(
                raw.chunks_exact(4)
                    .map(|c| u64::from(u32::from_le_bytes(c.try_into().expect("4 bytes")))),
            );
        }
        Ok(pfns)
    }

    fn inflate(&mut self, chain: &Chain, mem: &GuestMemoryMmap) {
        let pfns = match self.page_list(chain, mem) {
            Ok(p) => p,
            Err(e) => return self.malformed("inflate", &e),
        };
        self.counters.inflated_bytes += pfns.len() as u64 * BALLOON_PAGE;
        for (pfn, n) in coalesce(pfns) {
            match self.ram.discard(pfn * BALLOON_PAGE, n * BALLOON_PAGE) {
                Ok(b) => self.counters.inflate_returned_bytes += b,
                Err(e) => self.malformed("inflate", &e),
            }
        }
    }

    fn deflate(&mut self, chain: &Chain, mem: &GuestMemoryMmap) {
        // Deflated pages need nothing: the guest's next touch faults them
        // back in, zero-filled.
        match self.page_list(chain, mem) {
            Ok(p) => self.counters.deflated_bytes += p.len() as u64 * BALLOON_PAGE,
            Err(e) => self.malformed("deflate", &e),
        }
    }

    /// A stats buffer: record it and keep the chain until the next request.
    fn stats_buffer(&mut self, chain: &Chain, mem: &GuestMemoryMmap) -> bool {
        let mut stats = Vec::new();
        for b in &chain.buffers {
            if b.writable {
                self.malformed("stats", &"device-writable stats buffer");
                return false;
            }
            let mut raw = vec![0u8; (b.len as usize).min(STAT_LEN * 64)];
            if mem.read_slice(&mut raw, b.addr).is_err() {
                self.malformed("stats", &"unreadable stats buffer");
                return false;
            }
            for e in raw.chunks_exact(STAT_LEN) {
                let tag = u16::from_le_bytes([e[0], e[1]]);
                let val = u64::from_le_bytes(e[2..10].try_into().expect("8 bytes"));
                stats.push((tag, val));
            }
        }
        self.stats = stats;
        self.stats_head = Some(chain.head);
        self.event(BalloonEvent::Stats);
        true
    }

    fn report(&mut self, chain: &Chain) {
        for b in &chain.buffers {
            if !b.writable {
                return self.malformed("free page report", &"device-readable buffer");
            }
            let (addr, len) = (b.addr.0, u64::from(b.len));
            if len == 0 {
                // Names no memory, wherever it points.
                continue;
            }
            if !addr.is_multiple_of(BALLOON_PAGE) || !len.is_multiple_of(BALLOON_PAGE) {
                self.malformed(
                    "free page report",
                    &format!("unaligned range {addr:#x}+{len:#x}"),
                );
                continue;
            }
            self.counters.reported_bytes += len;
            match self.ram.discard(addr, len) {
                Ok(r) => self.counters.report_returned_bytes += r,
                Err(e) => self.malformed("free page report", &e),
            }
        }
    }

    fn handle(
        &mut self,
        role: Role,
        chain: Result<Chain, (u16, ChainError)>,
        mem: &GuestMemoryMmap,
    ) -> Option<u16> {
        let chain = match chain {
            Ok(c) => c,
            Err((head, e)) => {
                self.malformed("queue", &e);
                return Some(head);
            }
        };
        match role {
            Role::Inflate => self.inflate(&chain, mem),
            Role::Deflate => self.deflate(&chain, mem),
            Role::Reporting => self.report(&chain),
            Role::Stats => {
                if self.stats_head.is_some() {
                    // A second buffer while we hold one: the new one goes
                    // back at once (unfilled); we keep the one we hold.
                    self.malformed("stats", &"a second stats buffer");
                    return Some(chain.head);
                }
                if self.stats_buffer(&chain, mem) {
                    return None;
                }
            }
        }
        Some(chain.head)
    }
}

/// Page numbers as sorted runs `(first, count)`, duplicates dropped.
fn coalesce(mut pfns: Vec<u64>) -> Vec<(u64, u64)> {
    pfns.sort_unstable();
    pfns.dedup();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for p in pfns {
        match runs.last_mut() {
            Some((s, n)) if *s + *n == p => *n += 1,
            _ => runs.push((p, 1)),
        }
    }
    runs
}

fn pages_of(bytes: u64) -> u32 {
    u32::try_from(bytes / BALLOON_PAGE).unwrap_or(u32::MAX)
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        TYPE_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_F_VERSION_1 | 1 << F_MUST_TELL_HOST;
        if self.cfg.stats {
            f |= 1 << F_STATS_VQ;
        }
        if self.cfg.deflate_on_oom {
            f |= 1 << F_DEFLATE_ON_OOM;
        }
        if self.cfg.free_page_reporting {
            f |= 1 << F_REPORTING;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_balloon_config: num_pages, actual, free_page_hint_cmd_id, poison_val.
        let mut cfg = [0u8; 16];
        cfg[0..4].copy_from_slice(&self.num_pages.to_le_bytes());
        cfg[4..8].copy_from_slice(&self.actual.to_le_bytes());
        super::read_config_bytes(&cfg, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` is driver-writable.
        if offset != 4 || data.len() != 4 {
            return;
        }
        self.actual = u32::from_le_bytes(data.try_into().expect("4 bytes"));
        // Once per target: a guest writing `actual` in a loop would
        // otherwise cost the VMM a statistics line per write.
        if self.actual == self.num_pages && self.num_pages != 0 && !self.reached {
            self.reached = true;
            self.counters.targets_reached += 1;
            self.event(BalloonEvent::TargetReached);
        }
    }

    fn activate(&mut self, queues: ActiveQueues) {
        let f = queues.acked_features;
        let mut roles = vec![Role::Inflate, Role::Deflate];
        if f & (1 << F_STATS_VQ) != 0 {
            roles.push(Role::Stats);
        }
        if f & (1 << F_REPORTING) != 0 {
            roles.push(Role::Reporting);
        }
        self.active = Some((queues, roles));
        self.event(BalloonEvent::Activated);
    }

    fn reset(&mut self) {
        self.active = None;
        self.stats_head = None;
        self.actual = 0;
        self.reached = false;
    }

    fn set_memory(&mut self, mem: GuestMemoryMmap) {
        if let Some((a, _)) = &mut self.active {
            a.mem = mem;
        }
    }

    fn process_queue(&mut self, index: usize) -> QueueState {
        let Some((mut active, roles)) = self.active.take() else {
            return QueueState::Drained;
        };
        let mut state = QueueState::Drained;
        if let (Some(q), Some(&role)) = (active.queues.get_mut(index), roles.get(index)) {
            let mem = active.mem.clone();
            let served = |c| match self.handle(role, c, &mem) {
                Some(head) => Served::Used(head, 0),
                None => Served::Kept,
            };
            // The balloon pins nothing: it never defers.
            let drained = drain_queue(q, &mem, served);
            if drained.notify {
                active.irq.signal(super::INT_USED_RING);
            }
            if let Some(idx) = drained.bad_avail_idx {
                self.malformed(
                    "queue",
                    &format!("avail index {idx} is more than the queue size ahead; queue {index} stopped until the driver resets the device"),
                );
                state = QueueState::NeedsReset;
                // A stats buffer held from the stopped queue is not given
                // back (`request_stats`) until the reset forgets it.
                if role == Role::Stats {
                    self.stats_head = None;
                }
            } else if drained.more {
                state = QueueState::More;
            }
        }
        self.active = Some((active, roles));
        state
    }
}

/// What the VMM (and later its API) holds to control a running balloon.
#[derive(Clone)]
pub struct BalloonHandle(Arc<Mutex<MmioTransport<Balloon>>>);

impl BalloonHandle {
    /// A handle on the transport that owns the balloon.
    pub fn new(t: Arc<Mutex<MmioTransport<Balloon>>>) -> Self {
        BalloonHandle(t)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MmioTransport<Balloon>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Set the balloon target to `bytes` (rounded down to 4 KiB) and tell
    /// the driver.
    pub fn set_target(&self, bytes: u64) {
        let mut t = self.lock();
        if t.device_mut().set_target_pages(pages_of(bytes)) {
            t.config_changed();
        }
    }

    /// Counters.
    pub fn counters(&self) -> BalloonCounters {
        self.lock().device().counters()
    }

    /// The latest guest statistics.
    pub fn stats(&self) -> Vec<(&'static str, u64)> {
        self.lock().device().stats().to_vec()
    }

    /// Ask the guest for fresh statistics (answered asynchronously).
    pub fn request_stats(&self) -> bool {
        self.lock().device_mut().request_stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::queue::testing::{desc, memory, queue_with};
    use crate::virtio::{IrqLine, PinToken, RamError};
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::QueueT;
    use vm_memory::GuestAddress;

    /// Records discards; everything below 1 MiB counts as resident.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, u64)>>);

    impl RamControl for Recorder {
        fn pin(&self, _: u64, _: u64) -> Result<Option<PinToken>, RamError> {
            Ok(None)
        }
        fn discard(&self, gpa: u64, len: u64) -> Result<u64, RamError> {
            if gpa + len > 1 << 20 {
                return Err(RamError::OutOfRange { gpa, len });
            }
            self.0.lock().unwrap().push((gpa, len));
            Ok(len)
        }
    }

    const ALL: BalloonConfig = BalloonConfig {
        target_bytes: 64 << 10,
        deflate_on_oom: true,
        stats: true,
        free_page_reporting: true,
    };

    fn activate(
        b: &mut Balloon,
        mem: &GuestMemoryMmap,
        index: usize,
        descs: &[virtio_queue::desc::RawDescriptor],
    ) {
        // Queue `index` gets the chain; the others are empty queues.
        let queues = (0..4)
            .map(|i| {
                if i == index {
                    queue_with(mem, 0x1000 * i as u64, descs)
                } else {
                    queue_with(mem, 0x1000 * i as u64, &[])
                }
            })
            .collect();
        b.activate(ActiveQueues {
            queues,
            mem: mem.clone(),
            irq: IrqLine::new(|| Ok(())),
            acked_features: b.features(),
        });
    }

    #[test]
    fn inflate_discards_coalesced_runs_and_deflate_counts() {
        let mem = memory();
        let rec = Arc::new(Recorder::default());
        let mut b = Balloon::new(ALL, rec.clone());
        assert_eq!(b.queue_max_sizes().len(), 4);
        let pfns: [u32; 5] = [0x21, 0x20, 0x22, 0x40, 0x20];
        let raw: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        mem.write_slice(&raw, GuestAddress(0x10000)).unwrap();
        activate(&mut b, &mem, 0, &[desc(0x10000, 20, 0, 0)]);
        b.process_queue(0);
        assert_eq!(
            *rec.0.lock().unwrap(),
            vec![(0x20000, 0x3000), (0x40000, 0x1000)]
        );
        let c = b.counters();
        assert_eq!(
            (c.inflated_bytes, c.inflate_returned_bytes),
            (5 * 4096, 4 * 4096)
        );
        activate(&mut b, &mem, 1, &[desc(0x10000, 8, 0, 0)]);
        b.process_queue(1);
        assert_eq!(b.counters().deflated_bytes, 2 * 4096);
    }

    #[test]
    fn bad_page_lists_are_counted_not_fatal() {
        let mem = memory();
        let rec = Arc::new(Recorder::default());
        let mut b = Balloon::new(ALL, rec.clone());
        // A page outside RAM, a list in a writable buffer, a ragged list, a
        // loop, and a list longer than a request may be (257 pages).
        mem.write_slice(&0xfff_fffu32.to_le_bytes(), GuestAddress(0x10000))
            .unwrap();
        for d in [
            vec![desc(0x10000, 4, 0, 0)],
            vec![desc(0x10000, 4, VRING_DESC_F_WRITE, 0)],
            vec![desc(0x10000, 3, 0, 0)],
            vec![desc(0x10000, 4, VRING_DESC_F_NEXT, 0)],
            vec![desc(0x10000, (MAX_PFNS_PER_REQUEST as u32 + 1) * 4, 0, 0)],
        ] {
            activate(&mut b, &mem, 0, &d);
            b.process_queue(0);
            let q = &b.active.as_ref().unwrap().0.queues[0];
            assert_eq!(q.next_used(), 1, "the chain is returned");
        }
        assert_eq!(b.counters().malformed, 5);
        assert!(rec.0.lock().unwrap().is_empty());
    }

    /// A driver's avail index more than the queue size ahead stops the
    /// queue (nothing of it is popped), and the balloon counts it as
    /// malformed rather than dropping it silently.
    #[test]
    fn a_bogus_avail_index_is_counted_and_nothing_is_discarded() {
        let mem = memory();
        let rec = Arc::new(Recorder::default());
        let mut b = Balloon::new(ALL, rec.clone());
        mem.write_slice(&0x20u32.to_le_bytes(), GuestAddress(0x10000))
            .unwrap();
        activate(&mut b, &mem, 0, &[desc(0x10000, 4, 0, 0)]);
        // The avail ring: flags u16, then the index.
        let avail = b.active.as_ref().unwrap().0.queues[0].avail_ring();
        mem.write_obj(100u16, GuestAddress(avail + 2)).unwrap();
        assert_eq!(b.process_queue(0), QueueState::NeedsReset);
        assert_eq!(b.counters().malformed, 1);
        assert!(rec.0.lock().unwrap().is_empty());
        let q = &b.active.as_ref().unwrap().0.queues[0];
        assert_eq!(q.next_used(), 0, "nothing was served");
    }

    /// A stats queue the driver broke stops, the buffer held from it too:
    /// asking for statistics then completes nothing on that queue until a
    /// reset. It was given back (a used entry on a stopped queue).
    #[test]
    fn a_broken_stats_queue_gets_no_request() {
        let mem = memory();
        let mut b = Balloon::new(ALL, Arc::new(Recorder::default()));
        activate(&mut b, &mem, 2, &[desc(0x10000, 20, 0, 0)]);
        b.process_queue(2);
        let avail = b.active.as_ref().unwrap().0.queues[2].avail_ring();
        mem.write_obj(100u16, GuestAddress(avail + 2)).unwrap();
        assert_eq!(b.process_queue(2), QueueState::NeedsReset);
        assert!(!b.request_stats(), "no request on a stopped queue");
        let q = &b.active.as_ref().unwrap().0.queues[2];
        assert_eq!(q.next_used(), 0, "nothing completed");
    }

    #[test]
    fn stats_buffers_are_held_until_requested() {
        let mem = memory();
        let mut b = Balloon::new(ALL, Arc::new(Recorder::default()));
        let events = Arc::new(Mutex::new(Vec::new()));
        let e = events.clone();
        b.set_event_hook(move |ev| e.lock().unwrap().push(ev));
        let mut raw = Vec::new();
        for (tag, val) in [(4u16, 100u64 << 20), (5, 256 << 20)] {
            raw.extend_from_slice(&tag.to_le_bytes());
            raw.extend_from_slice(&val.to_le_bytes());
        }
        mem.write_slice(&raw, GuestAddress(0x10000)).unwrap();
        activate(&mut b, &mem, 2, &[desc(0x10000, 20, 0, 0)]);
        b.process_queue(2);
        assert_eq!(
            b.stats(),
            vec![("free_memory", 100 << 20), ("total_memory", 256 << 20)]
        );
        assert_eq!(
            b.active.as_ref().unwrap().0.queues[2].next_used(),
            0,
            "held"
        );
        assert!(b.request_stats());
        assert_eq!(b.active.as_ref().unwrap().0.queues[2].next_used(), 1);
        assert!(!b.request_stats(), "nothing held any more");
        assert_eq!(
            *events.lock().unwrap(),
            vec![BalloonEvent::Activated, BalloonEvent::Stats]
        );
    }

    #[test]
    fn free_page_reports_are_discarded() {
        let mem = memory();
        let rec = Arc::new(Recorder::default());
        let mut b = Balloon::new(ALL, rec.clone());
        activate(
            &mut b,
            &mem,
            3,
            &[
                desc(0x40000, 0x20000, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
                desc(0x80001, 0x1000, VRING_DESC_F_WRITE, 0),
            ],
        );
        b.process_queue(3);
        assert_eq!(*rec.0.lock().unwrap(), vec![(0x40000, 0x20000)]);
        let c = b.counters();
        assert_eq!(
            (c.reported_bytes, c.report_returned_bytes, c.malformed),
            (0x20000, 0x20000, 1)
        );
    }

    /// A zero-length report buffer names no memory, wherever it points:
    /// nothing is discarded for it. It was handed to the memory backend
    /// as a discard of 0 bytes (outside RAM: counted as malformed).
    #[test]
    fn an_empty_free_page_report_buffer_is_not_discarded() {
        let mem = memory();
        let rec = Arc::new(Recorder::default());
        let mut b = Balloon::new(ALL, rec.clone());
        let w = VRING_DESC_F_WRITE;
        activate(
            &mut b,
            &mem,
            3,
            &[
                desc(0x40000, 0x1000, w | VRING_DESC_F_NEXT, 1),
                desc(0x7000_0000, 0, w, 0),
            ],
        );
        b.process_queue(3);
        assert_eq!(*rec.0.lock().unwrap(), vec![(0x40000, 0x1000)]);
        assert_eq!(b.counters().malformed, 0);
    }

    #[test]
    fn target_and_actual_in_config_space() {
        let mut b = Balloon::new(ALL, Arc::new(Recorder::default()));
        let mut d = [0u8; 4];
        b.read_config(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 16);
        b.write_config(0, &[0xff; 4]);
        b.read_config(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 16, "num_pages is read-only");
        b.write_config(4, &16u32.to_le_bytes());
        let c = b.counters();
        assert_eq!((c.actual_bytes, c.targets_reached), (64 << 10, 1));
        // Without stats or reporting, only two queues and fewer features.
        let plain = Balloon::new(BalloonConfig::default(), Arc::new(Recorder::default()));
        assert_eq!(plain.queue_max_sizes().len(), 2);
        assert_eq!(
            plain.features(),
            1 << VIRTIO_F_VERSION_1 | 1 << F_MUST_TELL_HOST
        );
    }

    #[test]
    fn a_guest_rewriting_actual_reaches_each_target_once() {
        // A guest that writes `actual` = target in a loop (from every
        // vCPU) gets one event per target, not one per write: each event
        // costs the VMM a statistics line on its event loop.
        let mut b = Balloon::new(ALL, Arc::new(Recorder::default()));
        let events = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = events.clone();
        b.set_event_hook(move |e| seen.lock().unwrap().push(e));
        for i in 0..10_000u32 {
            // Alternating away and back does not re-arm it either.
            let v: u32 = if i % 2 == 0 { 16 } else { 15 };
            b.write_config(4, &v.to_le_bytes());
        }
        b.write_config(4, &16u32.to_le_bytes());
        assert_eq!(b.counters().targets_reached, 1);
        assert_eq!(*events.lock().unwrap(), vec![BalloonEvent::TargetReached]);
        // A new target, and a device reset, re-arm it.
        b.set_target_pages(32);
        b.write_config(4, &32u32.to_le_bytes());
        b.write_config(4, &32u32.to_le_bytes());
        b.reset();
        b.write_config(4, &32u32.to_le_bytes());
        assert_eq!(b.counters().targets_reached, 3);
    }

    #[test]
    fn coalescing() {
        assert_eq!(coalesce(vec![5, 3, 4, 9, 4]), vec![(3, 3), (9, 1)]);
        assert!(coalesce(vec![]).is_empty());
    }
}
