//! Seeded hostile-driver tests, the part every device shares: a guest
//! that owns its memory and drives a device through the MMIO transport's
//! registers and through its rings as a malicious or buggy driver could,
//! and the checks that hold whatever it does. `block::fuzz` and
//! `balloon::fuzz` build their requests on it.
//!
//! What holds for any device, any input:
//! - no panic, and no queue that never drains (the event loop is run a
//!   bounded number of rounds, not for a time);
//! - every used element names a chain that was made available and not yet
//!   completed, with a length no larger than the chain's writable bytes;
//! - guest memory that no descriptor names ([`CANARY`]) is never written;
//! - a status that shows DRIVER_OK without DEVICE_NEEDS_RESET is a live
//!   device, and a live device shows DRIVER_OK;
//! - after a relocation ([`Guest::relocate`]) the old mapping of guest
//!   memory is never written again.
//!
//! The event loop ([`Guest::run`]) is the VMM's: notified queues, then
//! retries of the queues a device left [`QueueState::Deferred`], as its
//! retry timer would fire. A driver's notifications follow the ring's
//! suppression ([`Guest::kick_if_needed`]: the used ring's flags, or the
//! avail event with VIRTIO_RING_F_EVENT_IDX), as Linux's do, so a device
//! that leaves them wrong strands chains.
//!
//! Guest memory (two regions around a hole, as below and above an MMIO gap):
//!
//! ```text
//!  0x00000  rings: queue i at i * 0x4000 (table, +0x1000 avail, +0x2000 used)
//!  0x10000  request headers
//!  0x20000  data, status bytes and indirect tables of well-formed chains
//!  0x80000  canary: named by no descriptor, never written by a device
//!  0x90000  scratch: hostile chains' buffers and tables
//! 0x100000  hole
//! 0x200000  scratch, to 0x240000 (the end of RAM)
//! ```
//!
//! `FOLIOVM_FUZZ_SEED` runs one seed instead of [`SEEDS`].

use super::mmio::{
    MemorySwitch, MmioTransport, S_ACKNOWLEDGE, S_DRIVER, S_DRIVER_OK, S_FEATURES_OK, S_NEEDS_RESET,
};
use super::queue::testing::desc;
use super::{GuestMemoryMmap, IrqLine, QueueState, VirtioDevice, INT_CONFIG, INT_USED_RING};
use crate::testing::for_each_seed as each_seed;
pub use crate::testing::Rng;
use crate::BusDevice;
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

/// The seeds a run tries.
pub const SEEDS: [u64; 8] = [1, 2, 3, 4, 5, 6, 7, 0x5eed_f011];

/// Guest RAM below the hole.
pub const RAM0: (u64, u64) = (0, 0x10_0000);
/// Guest RAM above the hole.
pub const RAM1: (u64, u64) = (0x20_0000, 0x24_0000);
/// Request headers of well-formed chains.
pub const HEADERS: (u64, u64) = (0x1_0000, 0x2_0000);
/// Data, status bytes and tables of well-formed chains.
pub const DATA: (u64, u64) = (0x2_0000, 0x8_0000);
/// Named by no descriptor: never written by a device.
pub const CANARY: (u64, u64) = (0x8_0000, 0x9_0000);
/// Hostile chains' buffers and tables, below the hole.
pub const SCRATCH: (u64, u64) = (0x9_0000, RAM0.1);

/// The most rounds of the event loop one [`Guest::run`] may take.
const ROUND_LIMIT: usize = 1000;

/// Run `f` for every seed of [`SEEDS`] (or `FOLIOVM_FUZZ_SEED`'s).
pub fn for_each_seed(test: &str, f: impl Fn(u64) + std::panic::RefUnwindSafe) {
    each_seed(test, &SEEDS, f)
}

/// The guest memory laid out above.
pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(RAM0.0), (RAM0.1 - RAM0.0) as usize),
        (GuestAddress(RAM1.0), (RAM1.1 - RAM1.0) as usize),
    ])
    .unwrap()
}

/// The virtio spec's `vring_need_event`: whether moving an index from
/// `old` to `new` passed `event` (the other side asked to be told once the
/// index goes past it), in u16 arithmetic that wraps.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Where a chain's buffer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buf {
    /// Guest address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Device-writable.
    pub writable: bool,
}

impl Buf {
    /// A buffer.
    pub fn new(addr: u64, len: u32, writable: bool) -> Self {
        Buf {
            addr,
            len,
            writable,
        }
    }
}

/// One queue as the guest set it up, and what it made available.
#[derive(Debug, Default)]
pub struct GuestQueue {
    /// QueueNum (0: not set up).
    pub size: u16,
    /// The avail index the guest published last.
    pub avail_idx: u16,
    /// The used index the guest has read up to.
    used_idx: u16,
    /// Chains made available and not completed: (head, writable bytes).
    outstanding: Vec<(u16, u64)>,
    /// Descriptors of this batch handed out so far.
    next_desc: u16,
}

/// A guest driving one device `D`.
pub struct Guest<D: VirtioDevice> {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The transport, shared as the VMM shares it.
    pub t: Arc<Mutex<MmioTransport<D>>>,
    /// The guest's randomness.
    pub rng: Rng,
    /// The queues as last set up.
    pub queues: Vec<GuestQueue>,
    /// Features the driver accepted at the last probe.
    pub features: u64,
    /// Bump allocator in [`DATA`] for this batch.
    data_next: u64,
    /// Bump allocator in [`HEADERS`] for this batch.
    header_next: u64,
    /// Interrupts raised (used buffers and configuration changes).
    irqs: Arc<AtomicU64>,
    /// Queues whose last processing left them deferred: the event loop
    /// retries them, as the VMM's retry timer does.
    deferred: RefCell<Vec<bool>>,
    /// The mapping guest memory had before the last relocation, and its
    /// contents then: nothing may write it afterwards.
    retired: Option<(GuestMemoryMmap, Vec<u8>)>,
}

impl<D: VirtioDevice> Guest<D> {
    /// A guest with `dev` behind a fresh transport.
    pub fn new(dev: D, seed: u64) -> Self {
        let mem = guest_memory();
        let n = dev.queue_max_sizes().len();
        let fds = (0..n)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let irqs = Arc::new(AtomicU64::new(0));
        let counted = irqs.clone();
        let irq = IrqLine::new(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            Ok(())
        });
        let t = MmioTransport::new(dev, mem.clone(), irq, fds);
        let canary: Vec<u8> = (0..CANARY.1 - CANARY.0).map(|i| i as u8 ^ 0x5a).collect();
        mem.write_slice(&canary, GuestAddress(CANARY.0)).unwrap();
        let mut rng = Rng::new(seed);
        let mut scratch = vec![0u8; (SCRATCH.1 - SCRATCH.0) as usize];
        rng.fill(&mut scratch);
        mem.write_slice(&scratch, GuestAddress(SCRATCH.0)).unwrap();
        Guest {
            mem,
            t: Arc::new(Mutex::new(t)),
            rng,
            queues: (0..n).map(|_| GuestQueue::default()).collect(),
            features: 0,
            data_next: DATA.0,
            header_next: HEADERS.0,
            irqs,
            deferred: RefCell::new(vec![false; n]),
            retired: None,
        }
    }

    /// Interrupts raised so far.
    pub fn irqs(&self) -> u64 {
        self.irqs.load(Ordering::SeqCst)
    }

    /// Guest memory moves to another host mapping with the same contents
    /// (a region relocation): the transport and the device get the new
    /// mapping, the guest uses it from now on, and the old one must stay
    /// as it was (checked at the next relocation and by
    /// [`Guest::check_retired`]). The mapping retired before that, once
    /// checked, is the new one (no mmap per relocation).
    pub fn relocate(&mut self) {
        self.check_retired();
        let new = match self.retired.take() {
            Some((mem, _)) => mem,
            None => guest_memory(),
        };
        let mut old = Vec::new();
        for (start, end) in [RAM0, RAM1] {
            let mut buf = vec![0u8; (end - start) as usize];
            self.mem.read_slice(&mut buf, GuestAddress(start)).unwrap();
            new.write_slice(&buf, GuestAddress(start)).unwrap();
            old.extend_from_slice(&buf);
        }
        MemorySwitch::set_memory(&mut *self.t.lock().unwrap(), new.clone());
        let retired = std::mem::replace(&mut self.mem, new);
        self.retired = Some((retired, old));
    }

    /// The mapping retired by the last relocation was not written since.
    pub fn check_retired(&self) {
        let Some((mem, was)) = &self.retired else {
            return;
        };
        let mut at = 0;
        for (start, end) in [RAM0, RAM1] {
            let mut now = vec![0u8; (end - start) as usize];
            mem.read_slice(&mut now, GuestAddress(start)).unwrap();
            let was = &was[at..at + now.len()];
            if now != was {
                let i = (0..now.len()).find(|&i| now[i] != was[i]).unwrap();
                panic!(
                    "guest address {:#x} of the mapping retired by a relocation was written",
                    start + i as u64
                );
            }
            at += now.len();
        }
    }

    /// Write register `off`.
    pub fn wr(&self, off: u64, v: u32) {
        self.t.lock().unwrap().write(off, &v.to_le_bytes());
    }

    /// Read register `off`.
    pub fn rd(&self, off: u64) -> u32 {
        let mut d = [0u8; 4];
        self.t.lock().unwrap().read(off, &mut d);
        u32::from_le_bytes(d)
    }

    /// Ring addresses of queue `q`: (table, avail, used).
    pub fn rings(q: usize) -> (u64, u64, u64) {
        let base = 0x4000 * q as u64;
        (base, base + 0x1000, base + 0x2000)
    }

    /// Reset the device and probe it as Linux does: `sizes[i]` entries for
    /// queue `i` (0: left unset), `features` accepted. The device is live.
    pub fn probe(&mut self, sizes: &[u16], features: u64) {
        self.wr(0x070, 0);
        self.check_status();
        let zero = vec![0u8; 0x4000 * self.queues.len()];
        self.mem.write_slice(&zero, GuestAddress(0)).unwrap();
        self.wr(0x070, S_ACKNOWLEDGE);
        self.wr(0x070, S_ACKNOWLEDGE | S_DRIVER);
        for sel in 0..2 {
            self.wr(0x024, sel);
            self.wr(0x020, (features >> (32 * sel)) as u32);
        }
        self.wr(0x070, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        assert_ne!(self.rd(0x070) & S_FEATURES_OK, 0, "features {features:#x}");
        for (i, q) in self.queues.iter_mut().enumerate() {
            *q = GuestQueue {
                size: sizes[i],
                ..GuestQueue::default()
            };
        }
        for (i, &size) in sizes.iter().enumerate() {
            if size == 0 {
                continue;
            }
            let (d, a, u) = Self::rings(i);
            self.wr(0x030, i as u32);
            self.wr(0x038, u32::from(size));
            for (off, addr) in [(0x080, d), (0x090, a), (0x0a0, u)] {
                self.wr(off, addr as u32);
                self.wr(off + 4, (addr >> 32) as u32);
            }
            self.wr(0x044, 1);
        }
        if self.rng.one_in(16) {
            // Guest memory moves while the driver sets the device up: the
            // device is given the new mapping at DRIVER_OK.
            self.relocate();
        }
        self.wr(
            0x070,
            S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
        );
        self.features = features;
        assert!(self.t.lock().unwrap().is_live(), "a proper probe goes live");
        self.check_status();
        // Activation notifies every queue once: nothing is available yet.
        self.run();
    }

    /// The transport's status and liveness agree: a device that shows
    /// DRIVER_OK and not DEVICE_NEEDS_RESET serves its queues.
    pub fn check_status(&self) {
        let status = self.rd(0x070);
        let live = self.t.lock().unwrap().is_live();
        if live {
            assert_ne!(status & S_DRIVER_OK, 0, "live with status {status:#x}");
        } else {
            assert!(
                status & S_DRIVER_OK == 0 || status & S_NEEDS_RESET != 0,
                "status {status:#x} shows DRIVER_OK, but the device is not live"
            );
        }
    }

    /// Start a batch: descriptor tables zeroed (no stale chains), the
    /// bump allocators rewound. Chains of the last batch must be done.
    pub fn begin_batch(&mut self) {
        for (i, q) in self.queues.iter_mut().enumerate() {
            q.next_desc = 0;
            let (d, _, _) = Self::rings(i);
            self.mem
                .write_slice(&[0u8; 0x1000], GuestAddress(d))
                .unwrap();
        }
        self.data_next = DATA.0;
        self.header_next = HEADERS.0;
    }

    /// `len` bytes in [`DATA`] (16-aligned), or `None` when the batch used it up.
    pub fn alloc_data(&mut self, len: u64) -> Option<u64> {
        let at = self.data_next;
        let end = at.checked_add(len)?;
        if end > DATA.1 {
            return None;
        }
        self.data_next = (end + 15) & !15;
        Some(at)
    }

    /// A 16-byte header slot in [`HEADERS`] holding `h`.
    pub fn header(&mut self, h: [u8; 16]) -> Option<u64> {
        let at = self.header_next;
        if at + 16 > HEADERS.1 {
            return None;
        }
        self.header_next += 16;
        self.mem.write_slice(&h, GuestAddress(at)).unwrap();
        Some(at)
    }

    /// Descriptors left in queue `q`'s table for this batch.
    pub fn descs_left(&self, q: usize) -> u16 {
        self.queues[q].size - self.queues[q].next_desc
    }

    /// Write descriptor `idx` of queue `q`.
    pub fn set_desc(&self, q: usize, idx: u16, addr: u64, len: u32, flags: u32, next: u16) {
        let (table, _, _) = Self::rings(q);
        self.mem
            .write_obj(
                desc(addr, len, flags, next),
                GuestAddress(table + 16 * u64::from(idx)),
            )
            .unwrap();
    }

    /// Place `bufs` as a chain in queue `q`'s table (through an indirect
    /// table in [`DATA`] if `indirect`); returns the descriptor indexes
    /// used, head first, or `None` if the batch has too few left.
    pub fn place(&mut self, q: usize, bufs: &[Buf], indirect: bool) -> Option<Vec<u16>> {
        let flags = |i: usize, b: &Buf| {
            let mut f = if b.writable { VRING_DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                f |= VRING_DESC_F_NEXT;
            }
            f
        };
        if indirect {
            let table = self.alloc_data(16 * bufs.len() as u64)?;
            if self.descs_left(q) == 0 {
                return None;
            }
            for (i, b) in bufs.iter().enumerate() {
                let d = desc(b.addr, b.len, flags(i, b), i as u16 + 1);
                self.mem
                    .write_obj(d, GuestAddress(table + 16 * i as u64))
                    .unwrap();
            }
            let head = self.take_descs(q, 1)[0];
            let len = 16 * bufs.len() as u32;
            self.set_desc(q, head, table, len, VRING_DESC_F_INDIRECT, 0);
            return Some(vec![head]);
        }
        if usize::from(self.descs_left(q)) < bufs.len() {
            return None;
        }
        let idx = self.take_descs(q, bufs.len() as u16);
        for (i, b) in bufs.iter().enumerate() {
            let next = idx.get(i + 1).copied().unwrap_or(0);
            self.set_desc(q, idx[i], b.addr, b.len, flags(i, b), next);
        }
        Some(idx)
    }

    /// `n` descriptor indexes of queue `q`, in a shuffled order.
    pub fn take_descs(&mut self, q: usize, n: u16) -> Vec<u16> {
        let first = self.queues[q].next_desc;
        self.queues[q].next_desc += n;
        let mut idx: Vec<u16> = (first..first + n).collect();
        for i in (1..idx.len()).rev() {
            let j = self.rng.below(i as u64 + 1) as usize;
            idx.swap(i, j);
        }
        idx
    }

    /// Make `heads` available in queue `q` (in this order), each with the
    /// most its chain may report written (`u64::MAX`: a head the device
    /// cannot complete, past the queue size).
    pub fn publish(&mut self, q: usize, heads: &[(u16, u64)]) {
        let (_, avail, _) = Self::rings(q);
        let gq = &mut self.queues[q];
        for &(head, bound) in heads {
            let slot = avail + 4 + 2 * u64::from(gq.avail_idx % gq.size);
            self.mem.write_obj(head, GuestAddress(slot)).unwrap();
            gq.avail_idx = gq.avail_idx.wrapping_add(1);
            if bound != u64::MAX {
                gq.outstanding.push((head, bound));
            }
        }
        self.mem
            .write_obj(gq.avail_idx, GuestAddress(avail + 2))
            .unwrap();
    }

    /// Write the avail index only (a jump the device must not follow).
    pub fn set_avail_idx(&self, q: usize, idx: u16) {
        let (_, avail, _) = Self::rings(q);
        self.mem.write_obj(idx, GuestAddress(avail + 2)).unwrap();
    }

    /// The VMM's event loop: process every notified queue until none is
    /// notified any more, and retry the deferred ones until none is left
    /// deferred; what each processing returned.
    pub fn run(&self) -> Vec<(usize, QueueState)> {
        self.run_loop(true)
    }

    /// [`Guest::run`] before the retry timer fires: notified queues only;
    /// deferred ones stay deferred.
    pub fn run_notified(&self) -> Vec<(usize, QueueState)> {
        self.run_loop(false)
    }

    /// Whether a queue is left deferred, waiting for a retry.
    pub fn any_deferred(&self) -> bool {
        self.deferred.borrow().contains(&true)
    }

    fn run_loop(&self, retry: bool) -> Vec<(usize, QueueState)> {
        let mut states = Vec::new();
        let t = &self.t;
        for _ in 0..ROUND_LIMIT {
            let mut pending: Vec<usize> = t
                .lock()
                .unwrap()
                .notify_fds()
                .enumerate()
                .filter(|(_, fd)| fd.read().is_ok())
                .map(|(i, _)| i)
                .collect();
            if pending.is_empty() && retry {
                // The retry timer fires.
                let deferred = self.deferred.borrow();
                pending = (0..deferred.len()).filter(|&i| deferred[i]).collect();
            }
            if pending.is_empty() {
                return states;
            }
            for i in pending {
                let state = t.lock().unwrap().notified(i);
                self.deferred.borrow_mut()[i] = state == QueueState::Deferred;
                states.push((i, state));
            }
        }
        panic!("the device's queues were still notified or deferred after {ROUND_LIMIT} rounds: {states:?}");
    }

    /// Notify queue `q` if its ring says the device wants to be told
    /// that the avail index moved from `old` to the one published, as
    /// Linux's `virtqueue_kick_prepare` decides: with EVENT_IDX when it
    /// passed the device's avail event, else unless the device set
    /// VRING_USED_F_NO_NOTIFY. Returns whether it notified.
    pub fn kick_if_needed(&self, q: usize, old: u16) -> bool {
        let new = self.queues[q].avail_idx;
        let kick = if self.event_idx() {
            need_event(self.avail_event(q), new, old)
        } else {
            self.used_flags(q) & 1 == 0
        };
        if kick {
            self.wr(0x050, q as u32);
        }
        kick
    }

    /// Whether the driver accepted VIRTIO_RING_F_EVENT_IDX.
    pub fn event_idx(&self) -> bool {
        self.features & (1 << super::VIRTIO_RING_F_EVENT_IDX) != 0
    }

    /// The used ring's flags of queue `q` (VRING_USED_F_NO_NOTIFY = 1).
    pub fn used_flags(&self, q: usize) -> u16 {
        let (_, _, used) = Self::rings(q);
        self.mem.read_obj(GuestAddress(used)).unwrap()
    }

    /// The avail event the device published in queue `q` (after the used
    /// ring's elements).
    pub fn avail_event(&self, q: usize) -> u16 {
        let (_, _, used) = Self::rings(q);
        let at = used + 4 + 8 * u64::from(self.queues[q].size);
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }

    /// Write the used event of queue `q` (after the avail ring's entries):
    /// the driver wants an interrupt once the used index goes past it.
    pub fn set_used_event(&self, q: usize, event: u16) {
        let (_, avail, _) = Self::rings(q);
        let at = avail + 4 + 2 * u64::from(self.queues[q].size);
        self.mem.write_obj(event, GuestAddress(at)).unwrap();
    }

    /// Queue `q` as it is after `idx` chains went through it, all
    /// completed and the device's notifications on: both ring indexes
    /// and the avail event at `idx`. The device's own queue must be moved
    /// there too (by its test, which can reach it), as a device restored
    /// from a snapshot is.
    pub fn start_indices_at(&mut self, q: usize, idx: u16) {
        assert!(self.queues[q].outstanding.is_empty());
        let (_, avail, used) = Self::rings(q);
        let size = u64::from(self.queues[q].size);
        self.mem.write_obj(idx, GuestAddress(avail + 2)).unwrap();
        self.mem.write_obj(idx, GuestAddress(used + 2)).unwrap();
        self.mem
            .write_obj(idx, GuestAddress(used + 4 + 8 * size))
            .unwrap();
        let gq = &mut self.queues[q];
        gq.avail_idx = idx;
        gq.used_idx = idx;
    }

    /// Notify queue `q` through QueueNotify and run the event loop.
    pub fn kick(&self, q: usize) -> Vec<(usize, QueueState)> {
        self.wr(0x050, q as u32);
        self.run()
    }

    /// The used elements queue `q` published since the last look, each
    /// checked against what was made available: (id, len).
    pub fn used(&mut self, q: usize) -> Vec<(u16, u32)> {
        let (_, _, used) = Self::rings(q);
        let gq = &mut self.queues[q];
        let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap();
        let n = idx.wrapping_sub(gq.used_idx);
        assert!(
            usize::from(n) <= gq.outstanding.len(),
            "queue {q}: {n} used elements published, {} chains outstanding",
            gq.outstanding.len()
        );
        let mut done = Vec::new();
        for _ in 0..n {
            let at = used + 4 + 8 * u64::from(gq.used_idx % gq.size);
            let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
            let Some(pos) = gq.outstanding.iter().position(|&(h, _)| u32::from(h) == id) else {
                panic!(
                    "queue {q}: used element {id} names no chain outstanding {:?}",
                    gq.outstanding
                );
            };
            let (head, bound) = gq.outstanding.remove(pos);
            assert!(
                u64::from(len) <= bound,
                "queue {q}: chain {head} completed with len {len}, but has {bound} writable bytes"
            );
            done.push((head, len));
            gq.used_idx = gq.used_idx.wrapping_add(1);
        }
        done
    }

    /// The used index the guest has read up to in queue `q`.
    pub fn used_idx_seen(&self, q: usize) -> u16 {
        self.queues[q].used_idx
    }

    /// Chains still outstanding in queue `q`.
    pub fn outstanding(&self, q: usize) -> &[(u16, u64)] {
        &self.queues[q].outstanding
    }

    /// An upper bound of the bytes the device may write to the chain at
    /// `head` of queue `q`: its writable descriptors, walked as far as a
    /// device could (indirect tables included).
    pub fn writable_bound(&self, q: usize, head: u16) -> u64 {
        let (table, _, _) = Self::rings(q);
        let size = self.queues[q].size;
        let read = |at: u64| -> Option<(u64, u32, u16, u16)> {
            let raw: [u8; 16] = self.mem.read_obj(GuestAddress(at)).ok()?;
            let addr = u64::from_le_bytes(raw[0..8].try_into().unwrap());
            let len = u32::from_le_bytes(raw[8..12].try_into().unwrap());
            let flags = u16::from_le_bytes([raw[12], raw[13]]);
            let next = u16::from_le_bytes([raw[14], raw[15]]);
            Some((addr, len, flags, next))
        };
        let w = |flags: u16, len: u32| {
            if u32::from(flags) & VRING_DESC_F_WRITE != 0 {
                u64::from(len)
            } else {
                0
            }
        };
        let mut total = 0u64;
        let mut idx = head;
        for _ in 0..=size {
            if idx >= size {
                break;
            }
            let Some((addr, len, flags, next)) = read(table + 16 * u64::from(idx)) else {
                break;
            };
            if u32::from(flags) & VRING_DESC_F_INDIRECT != 0 {
                let n = u64::from(len / 16);
                total += (0..n)
                    .filter_map(|i| read(addr.checked_add(16 * i)?))
                    .map(|(_, l, f, _)| w(f, l))
                    .sum::<u64>();
            } else {
                total += w(flags, len);
            }
            if u32::from(flags) & VRING_DESC_F_NEXT == 0 {
                break;
            }
            idx = next;
        }
        total
    }

    /// The canary is intact and the interrupt status holds only known bits.
    pub fn check_memory(&self) {
        let mut c = vec![0u8; (CANARY.1 - CANARY.0) as usize];
        self.mem.read_slice(&mut c, GuestAddress(CANARY.0)).unwrap();
        if let Some(i) = (0..c.len()).find(|&i| c[i] != i as u8 ^ 0x5a) {
            panic!(
                "guest memory {:#x} named by no descriptor was written",
                CANARY.0 + i as u64
            );
        }
        assert_eq!(self.rd(0x060) & !(INT_USED_RING | INT_CONFIG), 0);
    }

    /// A hostile address for a buffer of `len` bytes: in scratch, across
    /// the hole or the end of RAM, in the hole, far away, wrapping.
    pub fn hostile_addr(&mut self, len: u32) -> u64 {
        let len = u64::from(len);
        match self.rng.below(10) {
            0..=4 => self.rng.range(SCRATCH.0, SCRATCH.1),
            5 => self.rng.range(RAM1.0, RAM1.1),
            // Across the hole or the end, starting in scratch.
            6 => RAM0.1 - self.rng.below(len.clamp(1, SCRATCH.1 - SCRATCH.0)),
            7 => RAM1.1 - self.rng.below(len.clamp(1, RAM1.1 - RAM1.0)),
            8 => self.rng.range(RAM0.1, RAM1.0),
            _ => {
                let wrap = u64::MAX - self.rng.below(4096);
                self.rng.pick(&[1 << 32, 1 << 47, wrap])
            }
        }
    }

    /// A hostile chain in queue `q` from this batch's descriptors that are
    /// left: random addresses, lengths, flags and next indexes (its own,
    /// unused zeroed ones or past the queue), indirect tables in scratch.
    /// `header` fills a readable first buffer in scratch. Returns the head.
    pub fn hostile_chain(
        &mut self,
        q: usize,
        header: impl Fn(&mut Rng) -> [u8; 16],
    ) -> Option<u16> {
        let left = self.descs_left(q);
        if left == 0 {
            return None;
        }
        let n = self.rng.range(1, u64::from(left.min(6)) + 1) as u16;
        let first = self.queues[q].next_desc;
        let idx = self.take_descs(q, n);
        let size = self.queues[q].size;
        for (i, &at) in idx.iter().enumerate() {
            let len = self.hostile_len();
            let addr = self.hostile_addr(len);
            let mut flags = 0;
            if self.rng.below(3) != 0 {
                flags |= VRING_DESC_F_NEXT;
            }
            if self.rng.one_in(2) {
                flags |= VRING_DESC_F_WRITE;
            }
            let next = match self.rng.below(8) {
                0 => self.rng.range(u64::from(first), u64::from(size)) as u16,
                1 => self.rng.range(u64::from(size), 0x1_0000) as u16,
                2 => at,
                _ => idx.get(i + 1).copied().unwrap_or(idx[0]),
            };
            if self.rng.one_in(8) {
                let (addr, len) = self.hostile_table(&header);
                self.set_desc(q, at, addr, len, flags | VRING_DESC_F_INDIRECT, next);
                continue;
            }
            if i == 0 && flags & VRING_DESC_F_WRITE == 0 && len >= 16 {
                let h = header(&mut self.rng);
                let _ = self.mem.write_slice(&h, GuestAddress(addr));
            }
            self.set_desc(q, at, addr, len, flags, next);
        }
        Some(idx[0])
    }

    /// A hostile length: zero, small, sector multiples, huge.
    fn hostile_len(&mut self) -> u32 {
        match self.rng.below(8) {
            0 => 0,
            1..=3 => self.rng.below(64) as u32,
            4 | 5 => 512 * self.rng.range(1, 9) as u32,
            6 => self.rng.below(0x1_0000) as u32,
            _ => self.rng.pick(&[u32::MAX, 0x8000_0000, 1 << 20]),
        }
    }

    /// A hostile indirect table in scratch: (address, length in bytes).
    fn hostile_table(&mut self, header: &impl Fn(&mut Rng) -> [u8; 16]) -> (u64, u32) {
        let n = self.rng.range(1, 8);
        let table = self.rng.range(SCRATCH.0, SCRATCH.1 - 16 * n) & !15;
        for i in 0..n {
            let len = self.hostile_len();
            let addr = self.hostile_addr(len);
            let mut flags = self.rng.below(8) as u32 & (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE);
            if self.rng.one_in(10) {
                flags |= VRING_DESC_F_INDIRECT;
            }
            let next = if self.rng.one_in(4) {
                self.rng.below(16) as u16
            } else {
                i as u16 + 1
            };
            if i == 0 && flags & VRING_DESC_F_WRITE == 0 && len >= 16 {
                let h = header(&mut self.rng);
                let _ = self.mem.write_slice(&h, GuestAddress(addr));
            }
            self.mem
                .write_obj(desc(addr, len, flags, next), GuestAddress(table + 16 * i))
                .unwrap();
        }
        let len = match self.rng.below(6) {
            0 => self.rng.below(200) as u32,
            _ => 16 * n as u32,
        };
        (table, len)
    }

    /// Random register writes in random order, as a hostile driver's
    /// (ring addresses never in the canary), each followed by the status
    /// check, now and then the event loop.
    pub fn register_storm(&mut self, writes: usize) {
        const REGS: [u64; 20] = [
            0x014, 0x020, 0x024, 0x030, 0x038, 0x044, 0x050, 0x064, 0x070, 0x070, 0x070, 0x080,
            0x084, 0x090, 0x094, 0x0a0, 0x0a4, 0x100, 0x104, 0x0fc,
        ];
        // Rings the storm points queues at hold no chain a device could
        // take for a well-formed one.
        let zero = vec![0u8; 0x4000 * self.queues.len()];
        self.mem.write_slice(&zero, GuestAddress(0)).unwrap();
        let nq = self.queues.len() as u64;
        for _ in 0..writes {
            let off = self.rng.pick(&REGS);
            let bits = S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK;
            let v = match off {
                0x070 => match self.rng.below(6) {
                    0 => 0,
                    1 => self.rng.next_u64() as u32,
                    _ => self.rng.next_u64() as u32 & (bits | S_NEEDS_RESET | 128),
                },
                0x030 | 0x050 => self.rng.below(nq + 2) as u32,
                0x038 => {
                    let any = self.rng.next_u64() as u32;
                    self.rng.pick(&[0, 1, 3, 16, 256, 512, any])
                }
                0x044 => self.rng.below(3) as u32,
                0x080 | 0x090 | 0x0a0 => match self.rng.below(4) {
                    0 => self.rng.below(nq) as u32 * 0x4000 + 0x1000 * self.rng.below(3) as u32,
                    1 => self.rng.range(SCRATCH.0, SCRATCH.1) as u32,
                    2 => self.rng.range(RAM0.1, RAM1.1 + 0x1000) as u32,
                    // Anywhere above 2 GiB: outside RAM, or aligned or not.
                    _ => self.rng.next_u64() as u32 | 0x8000_0000,
                },
                0x084 | 0x094 | 0x0a4 => self.rng.pick(&[0, 0, 0, 1, u32::MAX]),
                0x014 | 0x024 => self.rng.below(3) as u32,
                _ => self.rng.next_u64() as u32,
            };
            if self.rng.one_in(20) {
                // An odd width or offset.
                let w = self.rng.pick(&[1usize, 2, 8]);
                let o = off + self.rng.below(4);
                self.t
                    .lock()
                    .unwrap()
                    .write(o, &v.to_le_bytes().repeat(2)[..w]);
            } else {
                self.wr(off, v);
            }
            self.check_status();
            if self.rng.one_in(4) {
                self.run();
            }
            self.check_memory();
        }
        self.run();
    }
}
