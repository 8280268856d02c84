//! A hostile driver against virtio-blk ([`crate::virtio::fuzz`]): batches
//! of well-formed requests (checked against a shadow of the disk),
//! requests with one thing wrong (checked for their documented error) and
//! random chains (checked for the invariants only), mixed with avail index
//! jumps, resets while requests wait and register storms.
//!
//! Guest memory runs short now and then ([`FlakyRam`]: a data buffer's pin
//! finds no memory), so requests wait in the queue and are retried; every
//! one is still completed exactly once, in the order it was made
//! available, with its data. A reset or a broken queue while one waits
//! completes nothing afterwards. Guest memory relocates under running
//! requests; with EVENT_IDX the driver sets a used event and counts the
//! interrupts against `vring_need_event`; rings start near the u16 wrap.

use super::request::{ID_LEN, SECTOR_SIZE, S_IOERR, S_OK, S_UNSUPP};
use super::tests::image;
use super::{Block, DiskImage, PIN_CHUNK};
use crate::virtio::fuzz::{for_each_seed, need_event, Buf, Guest, Rng, RAM0, RAM1};
use crate::virtio::mmio::S_NEEDS_RESET;
use crate::virtio::{
    PinToken, QueueState, RamControl, RamError, VirtioDevice, INT_CONFIG, INT_USED_RING,
};
use std::sync::{Arc, Mutex};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

/// Sectors of the disk; [`GUARD`] bytes follow it in the image, which the
/// guest cannot see (not a whole sector) and the device must not touch.
const CAPACITY: u64 = 64;
const GUARD: usize = 300;
const ID: &str = "fuzz-disk-id-0123456789";
/// Steps per seed.
const STEPS: usize = 500;

/// What a request must come to.
#[derive(Debug, Clone)]
enum Expect {
    /// Completed with `status` and used length `len`. A read's data lands
    /// in `read` from `sector`; a write puts `write` at `sector`.
    Done {
        status: u8,
        len: u32,
        status_at: u64,
        sector: u64,
        read: Vec<Buf>,
        write: Vec<u8>,
        id: Vec<Buf>,
    },
    /// Refused as malformed: used length 0, the status byte untouched.
    Refused { status_at: u64 },
    /// A head past the queue: never completed, the status byte untouched.
    Dropped { status_at: u64 },
    /// A random chain: only the invariants hold.
    Any,
}

struct Req {
    head: u16,
    expect: Expect,
}

impl Req {
    /// Whether serving it pins guest memory (moves data), so that it can
    /// be made to wait for memory.
    fn pins(&self) -> bool {
        matches!(&self.expect, Expect::Done { status: S_OK, read, write, .. }
            if !read.is_empty() || !write.is_empty())
    }
}

/// How much guest memory a pin finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Memory {
    /// Every pin succeeds.
    Plenty,
    /// A pin fails once in `one_in`, never more than [`MAX_STREAK`] in a
    /// row: memory comes back after a few retries.
    Short { one_in: u64 },
    /// Every pin fails.
    Out,
}

/// The most pins in a row that fail while memory is [`Memory::Short`].
const MAX_STREAK: u32 = 5;

/// Guest memory whose pins fail ([`RamError::NoMemory`]) as [`Memory`]
/// says; counts the failures and checks every pin's range.
struct FlakyRam(Mutex<Flaky>);

struct Flaky {
    rng: Rng,
    memory: Memory,
    streak: u32,
    /// Pins that found no memory.
    failed: u64,
}

impl FlakyRam {
    fn new(seed: u64) -> Self {
        FlakyRam(Mutex::new(Flaky {
            rng: Rng::new(seed ^ 0xf1a6_f1a6),
            memory: Memory::Plenty,
            streak: 0,
            failed: 0,
        }))
    }

    fn set(&self, memory: Memory) {
        let mut f = self.0.lock().unwrap();
        f.memory = memory;
        f.streak = 0;
    }

    fn failed(&self) -> u64 {
        self.0.lock().unwrap().failed
    }
}

impl RamControl for FlakyRam {
    fn pin(&self, gpa: u64, len: u64) -> Result<Option<PinToken>, RamError> {
        let end = gpa.checked_add(len).expect("a pin that wraps");
        let inside = |(s, e): (u64, u64)| gpa >= s && end <= e;
        assert!(
            len > 0 && (inside(RAM0) || inside(RAM1)),
            "pin {gpa:#x}+{len:#x} is not inside guest RAM"
        );
        assert!(
            (end - 1) / PIN_CHUNK == gpa / PIN_CHUNK,
            "pin {gpa:#x}+{len:#x} crosses a {PIN_CHUNK:#x} boundary"
        );
        let mut f = self.0.lock().unwrap();
        let fail = match f.memory {
            Memory::Plenty => false,
            Memory::Short { one_in } => f.streak < MAX_STREAK && f.rng.one_in(one_in),
            Memory::Out => true,
        };
        if !fail {
            f.streak = 0;
            return Ok(None);
        }
        f.streak += 1;
        f.failed += 1;
        Err(RamError::NoMemory { gpa, len })
    }
    fn discard(&self, _gpa: u64, _len: u64) -> Result<u64, RamError> {
        panic!("a block device discards nothing")
    }
}

fn header(kind: u32, sector: u64, rng: &mut Rng) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[4..8].copy_from_slice(&(rng.next_u64() as u32).to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// A header for a random chain: any type but a write (whose data the
/// shadow could not know), random sectors.
fn hostile_header(rng: &mut Rng) -> [u8; 16] {
    let other = rng.next_u64() as u32 | 0x100;
    let kind = rng.pick(&[
        VIRTIO_BLK_T_IN,
        VIRTIO_BLK_T_FLUSH,
        VIRTIO_BLK_T_GET_ID,
        VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_WRITE_ZEROES,
        other,
    ]);
    let near = [
        rng.below(CAPACITY + 4),
        u64::MAX - rng.below(8),
        rng.next_u64(),
    ];
    let sector = rng.pick(&near);
    header(kind, sector, rng)
}

/// Cut `len` bytes into 1 to 3 buffers (byte boundaries, not sectors).
fn split(rng: &mut Rng, len: u64) -> Vec<u64> {
    let mut cuts: Vec<u64> = (0..rng.below(3)).map(|_| rng.below(len + 1)).collect();
    cuts.push(0);
    cuts.push(len);
    cuts.sort_unstable();
    cuts.windows(2).map(|w| w[1] - w[0]).collect()
}

struct Disk {
    ram: Arc<FlakyRam>,
    shadow: Vec<u8>,
    read_only: bool,
    /// Chains checked: served as they must be (ok, error), refused,
    /// dropped, random.
    tally: [u64; 5],
}

/// Build a well-formed request, or one with a single thing wrong
/// (`mutate`), in the guest's queue 0.
fn request(g: &mut Guest<Block>, disk: &Disk, mutate: bool) -> Option<Req> {
    let rng = &mut g.rng;
    let odd = if rng.one_in(4) { VIRTIO_BLK_T_FLUSH } else { 3 };
    let kind = rng.pick(&[
        VIRTIO_BLK_T_IN,
        VIRTIO_BLK_T_IN,
        VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_GET_ID,
        VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_WRITE_ZEROES,
        odd,
    ]);
    let rw = kind == VIRTIO_BLK_T_IN || kind == VIRTIO_BLK_T_OUT;
    let sectors = if rw { rng.range(1, 9) } else { 0 };
    let mut sector = rng.below(CAPACITY - sectors + 1);
    let data_len = match kind {
        VIRTIO_BLK_T_GET_ID => rng.range(1, 41),
        _ if rw => sectors * SECTOR_SIZE,
        _ => 0,
    };
    let writable = kind != VIRTIO_BLK_T_OUT;
    let lens = if data_len == 0 {
        vec![]
    } else {
        split(rng, data_len)
    };
    let indirect = rng.one_in(5);
    let mut bufs = Vec::new();
    let mut data = Vec::new();
    for &l in &lens {
        let at = g.alloc_data(l.max(1))?;
        bufs.push(Buf::new(at, l as u32, writable));
        data.push(Buf::new(at, l as u32, writable));
    }
    let mut write = vec![0u8; data_len as usize];
    g.rng.fill(&mut write);
    let mut off = 0;
    for b in &data {
        let piece = &write[off..off + b.len as usize];
        g.mem.write_slice(piece, GuestAddress(b.addr)).unwrap();
        off += b.len as usize;
    }
    let status_at = g.alloc_data(1)?;
    g.mem.write_obj(0xffu8, GuestAddress(status_at)).unwrap();
    bufs.push(Buf::new(status_at, 1, true));
    let (mut status, mut len) = match kind {
        VIRTIO_BLK_T_IN => (S_OK, data_len as u32 + 1),
        VIRTIO_BLK_T_OUT if disk.read_only => (S_IOERR, 1),
        VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_FLUSH => (S_OK, 1),
        VIRTIO_BLK_T_GET_ID => (S_OK, (data_len as usize).min(ID_LEN) as u32 + 1),
        _ => (S_UNSUPP, 1),
    };
    let mut refused = false;
    let mut hdr_len = 16;
    let mut fix_chain: Option<u32> = None;
    let mut head_past = false;
    if mutate {
        let ioerr = (S_IOERR, 1);
        match g.rng.below(11) {
            // Past the end of the disk, or overflowing sector * 512.
            0 | 1 if rw => {
                let past = [
                    CAPACITY - sectors + 1 + g.rng.below(8),
                    u64::MAX - g.rng.below(8),
                    u64::MAX / SECTOR_SIZE + 1,
                    1 << 55,
                ];
                sector = g.rng.pick(&past);
                (status, len) = ioerr;
            }
            // Not whole sectors.
            2 if rw => {
                let full: Vec<usize> = (0..data.len()).filter(|&i| bufs[i].len > 0).collect();
                let i = g.rng.pick(&full);
                bufs[i].len -= 1 + g.rng.below(u64::from(bufs[i].len.min(511))) as u32;
                (status, len) = ioerr;
            }
            // A data buffer of the wrong direction.
            3 if !data.is_empty() && kind != VIRTIO_BLK_T_FLUSH && status != S_UNSUPP => {
                let i = g.rng.below(data.len() as u64) as usize;
                bufs[i].writable = !bufs[i].writable;
                let order_ok = bufs.windows(2).all(|w| w[1].writable || !w[0].writable);
                refused = !order_ok;
                (status, len) = ioerr;
            }
            // A short header.
            4 => {
                hdr_len = g.rng.below(16) as u32;
                (status, len) = ioerr;
            }
            // A readable or empty status.
            5 => {
                let last = bufs.len() - 1;
                if g.rng.one_in(2) {
                    bufs[last].writable = false;
                } else {
                    bufs[last].len = 0;
                }
                refused = true;
            }
            // A data buffer outside RAM, across the hole or its end.
            6 if !data.is_empty() => {
                let i = g.rng.below(data.len() as u64) as usize;
                let l = bufs[i].len.max(2);
                bufs[i].len = l;
                let half = u64::from(l) / 2;
                let outside = [
                    RAM0.1 - half,
                    RAM1.1 - half,
                    RAM0.1 + 0x1000,
                    u64::MAX - half,
                ];
                bufs[i].addr = g.rng.pick(&outside);
                refused = true;
            }
            // The chain loops or names a next index past the queue.
            7 | 8 if !indirect => {
                fix_chain = Some(g.rng.below(2) as u32);
                refused = true;
            }
            // A head index past the queue.
            9 => head_past = true,
            // An empty data buffer far outside RAM: harmless.
            _ if !data.is_empty() => {
                let i = g.rng.below(bufs.len() as u64 - 1) as usize;
                bufs.insert(i, Buf::new(u64::MAX - 8, 0, bufs[i].writable));
            }
            _ => {}
        }
    }
    let h = header(kind, sector, &mut g.rng);
    let hdr_at = g.header(h)?;
    bufs.insert(0, Buf::new(hdr_at, hdr_len, false));
    let idx = g.place(0, &bufs, indirect)?;
    let size = g.queues[0].size;
    if let Some(how) = fix_chain {
        let last = *idx.last().unwrap();
        let b = bufs.last().unwrap();
        let next = if how == 0 {
            idx[0]
        } else {
            size + g.rng.below(100) as u16
        };
        let w = if b.writable {
            virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE
        } else {
            0
        };
        g.set_desc(
            0,
            last,
            b.addr,
            b.len,
            w | virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT,
            next,
        );
    }
    let expect = if head_past {
        return Some(Req {
            head: size + g.rng.below(u64::from(u16::MAX - size)) as u16,
            expect: Expect::Dropped { status_at },
        });
    } else if refused {
        Expect::Refused { status_at }
    } else {
        let ok = status == S_OK;
        Expect::Done {
            status,
            len,
            status_at,
            sector,
            read: if ok && kind == VIRTIO_BLK_T_IN {
                data.clone()
            } else {
                vec![]
            },
            write: if ok && kind == VIRTIO_BLK_T_OUT {
                write
            } else {
                vec![]
            },
            id: if ok && kind == VIRTIO_BLK_T_GET_ID {
                data.clone()
            } else {
                vec![]
            },
        }
    };
    Some(Req {
        head: idx[0],
        expect,
    })
}

/// A write of 255 MiB (255 one-MiB buffers through an indirect table),
/// one sector more than `seg_max` buffers of `size_max` may carry.
fn too_long(g: &mut Guest<Block>) -> Option<Req> {
    let status_at = g.alloc_data(1)?;
    g.mem.write_obj(0xffu8, GuestAddress(status_at)).unwrap();
    let h = header(VIRTIO_BLK_T_OUT, 0, &mut g.rng);
    let mut bufs = vec![Buf::new(g.header(h)?, 16, false)];
    bufs.extend((0..255).map(|_| Buf::new(0, 1 << 20, false)));
    bufs.push(Buf::new(status_at, 1, true));
    let idx = g.place(0, &bufs, true)?;
    Some(Req {
        head: idx[0],
        expect: Expect::Done {
            status: S_IOERR,
            len: 1,
            status_at,
            sector: 0,
            read: vec![],
            write: vec![],
            id: vec![],
        },
    })
}

/// The bytes of `bufs` in guest memory, in order.
fn gather(g: &Guest<Block>, bufs: &[Buf]) -> Vec<u8> {
    let mut all = Vec::new();
    for b in bufs {
        let mut got = vec![0u8; b.len as usize];
        g.mem.read_slice(&mut got, GuestAddress(b.addr)).unwrap();
        all.extend_from_slice(&got);
    }
    all
}

/// Check one request made available `times` times; the device served
/// the chains in the order they were made available, and this is its
/// `nth` time in that order (a write is applied to the shadow each time,
/// a read checked against the shadow as it was at its last time).
fn check(
    g: &Guest<Block>,
    disk: &mut Disk,
    r: &Req,
    done: &[(u16, u32)],
    times: usize,
    nth: usize,
) {
    let lens: Vec<u32> = done
        .iter()
        .filter(|&&(h, _)| h == r.head)
        .map(|&(_, l)| l)
        .collect();
    let st = |at: u64| g.mem.read_obj::<u8>(GuestAddress(at)).unwrap();
    let first = nth == 1;
    let class = match &r.expect {
        Expect::Done { status, .. } => usize::from(*status != S_OK),
        Expect::Refused { .. } => 2,
        Expect::Dropped { .. } => 3,
        Expect::Any => 4,
    };
    disk.tally[class] += 1;
    match &r.expect {
        Expect::Done {
            status,
            len,
            status_at,
            sector,
            read,
            write,
            id,
        } => {
            if first {
                assert_eq!(
                    lens.len(),
                    times,
                    "chain {} completed {} times: {:?}",
                    r.head,
                    lens.len(),
                    r.expect
                );
                assert_eq!(
                    (st(*status_at), lens[0]),
                    (*status, *len),
                    "chain {} (status, used len): {:?}",
                    r.head,
                    r.expect
                );
            }
            // Hostile sectors overflow; only a request that moves data
            // (in range, so this does not) uses the offset.
            let at = sector.wrapping_mul(SECTOR_SIZE) as usize;
            if !write.is_empty() {
                disk.shadow[at..at + write.len()].copy_from_slice(write);
            }
            if nth == times && !read.is_empty() {
                let got = gather(g, read);
                assert!(
                    got == disk.shadow[at..at + got.len()],
                    "a read of sector {sector} returned other bytes than were written there"
                );
            }
            if first && !id.is_empty() {
                let got = gather(g, id);
                let n = got.len().min(ID_LEN);
                assert_eq!(
                    String::from_utf8_lossy(&got[..n]),
                    &ID[..n],
                    "GET_ID into buffers {id:?}"
                );
            }
        }
        Expect::Refused { status_at } if first => {
            assert_eq!(
                lens.len(),
                times,
                "malformed chain {} completed {} times",
                r.head,
                lens.len()
            );
            assert!(
                lens.iter().all(|&l| l == 0),
                "malformed chain {} used len {lens:?}",
                r.head
            );
            assert_eq!(
                st(*status_at),
                0xff,
                "a malformed chain's status was written"
            );
        }
        Expect::Dropped { status_at } => {
            assert_eq!(st(*status_at), 0xff, "a dropped chain's status was written");
        }
        _ => {}
    }
}

/// One batch of requests in queue 0: all completed, each as it must be.
fn batch(g: &mut Guest<Block>, disk: &mut Disk, well_formed_only: bool) {
    g.begin_batch();
    let mut reqs = Vec::new();
    let n = g.rng.range(1, 10);
    for _ in 0..n {
        let r = match g.rng.below(20) {
            _ if well_formed_only => request(g, disk, false),
            0..=9 => request(g, disk, false),
            10..=16 => request(g, disk, true),
            17 if g.rng.one_in(4) => too_long(g),
            _ => continue,
        };
        match r {
            Some(r) => reqs.push(r),
            None => break,
        }
    }
    if !well_formed_only {
        for _ in 0..g.rng.below(4) {
            let Some(head) = g.hostile_chain(0, hostile_header) else {
                break;
            };
            reqs.push(Req {
                head,
                expect: Expect::Any,
            });
        }
    }
    // Shuffle, and now and then make a chain available twice.
    for i in (1..reqs.len()).rev() {
        let j = g.rng.below(i as u64 + 1) as usize;
        reqs.swap(i, j);
    }
    let mut order: Vec<usize> = (0..reqs.len()).collect();
    if !reqs.is_empty() && g.rng.one_in(10) {
        order.push(g.rng.below(reqs.len() as u64) as usize);
    }
    order.truncate(usize::from(g.queues[0].size));
    let heads: Vec<(u16, u64)> = order
        .iter()
        .map(|&i| {
            let r = &reqs[i];
            let bound = match r.expect {
                Expect::Dropped { .. } => u64::MAX,
                _ => g.writable_bound(0, r.head),
            };
            (r.head, bound)
        })
        .collect();
    let made: Vec<&Req> = order.iter().map(|&i| &reqs[i]).collect();
    let done = serve(g, disk, &heads, &made);
    let want: Vec<u16> = made
        .iter()
        .filter(|r| !matches!(r.expect, Expect::Dropped { .. }))
        .map(|r| r.head)
        .collect();
    let got: Vec<u16> = done.iter().map(|&(h, _)| h).collect();
    assert_eq!(
        got, want,
        "chains completed, and in the order made available"
    );
    for (pos, &i) in order.iter().enumerate() {
        let times = order.iter().filter(|&&j| j == i).count();
        let nth = order[..=pos].iter().filter(|&&j| j == i).count();
        check(g, disk, &reqs[i], &done, times, nth);
    }
    g.wr(0x064, INT_USED_RING | INT_CONFIG);
    g.check_memory();
}

/// A used event for a batch of `n` chains, as drivers pick them: the
/// used index seen (Linux's `virtqueue_enable_cb`), a few chains further
/// (`virtqueue_enable_cb_delayed`), one already passed, or any.
fn used_event(g: &mut Guest<Block>, n: usize) -> u16 {
    let seen = g.used_idx_seen(0);
    match g.rng.below(5) {
        0 | 1 => seen,
        2 => seen.wrapping_add(g.rng.below(n as u64 + 2) as u16),
        3 => seen.wrapping_sub(1 + g.rng.below(300) as u16),
        _ => g.rng.next_u64() as u16,
    }
}

/// Publish `heads` (the chains of `made`, in order), notify as the ring
/// asks and run the event loop, with guest memory short or out for a
/// while now and then, and relocated under the waiting requests now and
/// then; returns the used elements. Every chain is completed; those that
/// pin wait while memory is out; interrupts are as the ring asks.
fn serve(
    g: &mut Guest<Block>,
    disk: &Disk,
    heads: &[(u16, u64)],
    made: &[&Req],
) -> Vec<(u16, u32)> {
    let memory = match g.rng.below(10) {
        0..=5 => Memory::Plenty,
        6..=8 => Memory::Short {
            one_in: g.rng.range(2, 5),
        },
        _ => Memory::Out,
    };
    disk.ram.set(memory);
    let (old_avail, mut old_used) = (g.queues[0].avail_idx, g.used_idx_seen(0));
    let mut event = used_event(g, heads.len());
    g.wr(0x064, INT_USED_RING | INT_CONFIG);
    let mut irqs = g.irqs();
    g.publish(0, heads);
    if g.event_idx() {
        g.set_used_event(0, event);
    }
    g.kick_if_needed(0, old_avail);
    let mut states = g.run_notified();
    let mut done = Vec::new();
    if memory == Memory::Out {
        waiting_while_out(g, made, old_used);
        // The driver takes what was completed, checks its interrupt, and
        // sets a new used event (`virtqueue_enable_cb` after a callback),
        // while the rest waits.
        done = g.used(0);
        check_interrupts(g, event, old_used, irqs, !done.is_empty());
        (old_used, irqs) = (g.used_idx_seen(0), g.irqs());
        g.wr(0x064, INT_USED_RING | INT_CONFIG);
        event = used_event(g, heads.len() - done.len());
        if g.event_idx() {
            g.set_used_event(0, event);
        }
        if g.rng.one_in(3) {
            g.relocate();
        }
        disk.ram.set(Memory::Short { one_in: 3 });
    } else if g.rng.one_in(50) {
        g.relocate();
    }
    states.extend(g.run());
    disk.ram.set(Memory::Plenty);
    assert!(
        states.iter().all(|(_, s)| *s != QueueState::NeedsReset),
        "{states:?}"
    );
    done.extend(g.used(0));
    assert!(
        g.outstanding(0).is_empty(),
        "chains left: {:?} (states {states:?})",
        g.outstanding(0)
    );
    let deferred = g.t.lock().unwrap().device().counters().deferred;
    assert_eq!(deferred, disk.ram.failed(), "deferrals, one per failed pin");
    let used_now = g.used_idx_seen(0) != old_used;
    check_interrupts(g, event, old_used, irqs, used_now);
    if g.event_idx() {
        assert_eq!(
            g.avail_event(0),
            g.queues[0].avail_idx,
            "the avail event of a drained queue (the driver's next chain must notify)"
        );
    } else {
        assert_eq!(
            g.used_flags(0),
            0,
            "notifications left off on a drained queue"
        );
    }
    done
}

/// The interrupts since `irqs`, while the used index went from `old_used`
/// to the one the guest has seen, with `event` the used event all along:
/// with EVENT_IDX, exactly one if the index went past the event (it lies
/// in at most one of the stretches the device decided on), else none;
/// without, at least one if chains were completed (`used`).
fn check_interrupts(g: &Guest<Block>, event: u16, old_used: u16, irqs: u64, used: bool) {
    let new_used = g.used_idx_seen(0);
    let raised = (g.irqs() - irqs, g.rd(0x060) & INT_USED_RING != 0);
    if g.event_idx() {
        let must = need_event(event, new_used, old_used);
        assert_eq!(
            raised,
            (u64::from(must), must),
            "interrupts for used index {old_used} -> {new_used} with used event {event}"
        );
    } else if used {
        assert!(raised.1, "no interrupt for used chains");
    }
}

/// Memory is out and the event loop ran the notification: the chains
/// before the first that pins are completed (as far as random chains let
/// one know), that one and the rest wait, unanswered.
fn waiting_while_out(g: &Guest<Block>, made: &[&Req], old_used: u16) {
    let Some(p) = made.iter().position(|r| r.pins()) else {
        return;
    };
    assert!(
        g.any_deferred(),
        "a request whose pin found no memory is not waiting"
    );
    let (_, _, used) = Guest::<Block>::rings(0);
    let idx: u16 = g.mem.read_obj(GuestAddress(used + 2)).unwrap();
    let served = u64::from(idx.wrapping_sub(old_used));
    let before = &made[..p];
    let can = before
        .iter()
        .filter(|r| !matches!(r.expect, Expect::Dropped { .. }))
        .count() as u64;
    if before.iter().any(|r| matches!(r.expect, Expect::Any)) {
        assert!(
            served <= can,
            "{served} chains served, {can} before the first that waits"
        );
    } else {
        assert_eq!(served, can, "chains served before the first that waits");
    }
    if let Expect::Done { status_at, .. } = made[p].expect {
        let st: u8 = g.mem.read_obj(GuestAddress(status_at)).unwrap();
        assert_eq!(st, 0xff, "the status of a request that waits was written");
    }
}

/// A random probe: a queue size (a power of two up to 256) and features.
fn probe(g: &mut Guest<Block>) {
    let size = 1u16 << g.rng.below(9);
    let offered = g.t.lock().unwrap().device().features();
    let features = offered & (g.rng.next_u64() | 1 << crate::virtio::VIRTIO_F_VERSION_1);
    g.probe(&[size], features);
}

/// The avail index jumps more than the queue size ahead (or back): the
/// device serves nothing more, asks for a reset, and after one serves
/// well-formed requests again.
fn break_queue(g: &mut Guest<Block>, disk: &mut Disk) {
    let q = &g.queues[0];
    let idx = if g.rng.one_in(2) {
        q.avail_idx
            .wrapping_add(q.size + 1 + g.rng.below(1000) as u16)
    } else {
        q.avail_idx.wrapping_sub(1 + g.rng.below(100) as u16)
    };
    g.set_avail_idx(0, idx);
    let states = g.kick(0);
    assert!(states.contains(&(0, QueueState::NeedsReset)), "{states:?}");
    assert_ne!(g.rd(0x070) & S_NEEDS_RESET, 0);
    assert_ne!(
        g.rd(0x060) & INT_CONFIG,
        0,
        "no configuration change interrupt"
    );
    assert!(g.used(0).is_empty());
    // Requests made available now are not served.
    g.begin_batch();
    if let Some(r) = request(g, disk, false) {
        let bound = g.writable_bound(0, r.head);
        g.publish(0, &[(r.head, bound)]);
        g.kick(0);
        assert!(g.used(0).is_empty(), "a broken queue served a chain");
    }
    probe(g);
    assert_eq!(g.rd(0x070) & S_NEEDS_RESET, 0);
    batch(g, disk, true);
}

/// Requests made available and notified, then a reset before the event
/// loop gets to them: none is served, and the device works after a probe.
fn reset_in_flight(g: &mut Guest<Block>, disk: &mut Disk) {
    g.begin_batch();
    let mut heads = Vec::new();
    for _ in 0..g.rng.range(1, 4) {
        if let Some(r) = request(g, disk, false) {
            heads.push((r.head, g.writable_bound(0, r.head)));
        }
    }
    g.publish(0, &heads);
    g.wr(0x050, 0);
    g.wr(0x070, 0);
    g.run();
    let (_, _, used) = Guest::<Block>::rings(0);
    let idx: u16 = g.mem.read_obj(GuestAddress(used + 2)).unwrap();
    assert_eq!(
        idx,
        g.used_idx_seen(0),
        "a chain was served after the reset"
    );
    probe(g);
    batch(g, disk, true);
}

/// Requests wait for guest memory (every pin fails), then the driver
/// resets the device (and probes it again before the retry, or not), or
/// breaks the queue, before memory comes back: the retry completes none
/// of them and pins nothing for them, and the device works after a probe.
fn interrupted_while_waiting(g: &mut Guest<Block>, disk: &mut Disk) {
    g.begin_batch();
    let mut reqs = Vec::new();
    for _ in 0..8 {
        let Some(r) = request(g, disk, false) else {
            break;
        };
        let pins = r.pins();
        reqs.push(r);
        if pins {
            break;
        }
    }
    let Some(p) = reqs.iter().position(Req::pins) else {
        return;
    };
    disk.ram.set(Memory::Out);
    let heads: Vec<(u16, u64)> = reqs
        .iter()
        .map(|r| (r.head, g.writable_bound(0, r.head)))
        .collect();
    let old_avail = g.queues[0].avail_idx;
    g.publish(0, &heads);
    g.kick_if_needed(0, old_avail);
    g.run_notified();
    assert!(
        g.any_deferred(),
        "a request whose pin found no memory is not waiting"
    );
    let done = g.used(0);
    let got: Vec<u16> = done.iter().map(|&(h, _)| h).collect();
    let want: Vec<u16> = reqs[..p].iter().map(|r| r.head).collect();
    assert_eq!(got, want, "the requests before the first that waits");
    for r in &reqs[..p] {
        check(g, disk, r, &done, 1, 1);
    }
    let failed = disk.ram.failed();
    let how = g.rng.below(3);
    match how {
        0 | 1 => {
            if how == 0 {
                g.wr(0x070, 0);
            } else {
                let idx = g.queues[0].avail_idx.wrapping_add(g.queues[0].size + 1);
                g.set_avail_idx(0, idx);
            }
            // The retry timer fires with memory still out.
            let states = g.run();
            assert_eq!(
                states.contains(&(0, QueueState::NeedsReset)),
                how == 1,
                "{states:?}"
            );
            assert!(
                g.used(0).is_empty(),
                "a request completed after the queue was reset or broken"
            );
        }
        // Probed again before the retry fires: the retry finds the new,
        // empty queue.
        _ => {
            g.wr(0x070, 0);
            probe(g);
        }
    }
    assert!(!g.any_deferred());
    assert_eq!(
        disk.ram.failed(),
        failed,
        "a pin for a request of a reset or broken queue"
    );
    for r in &reqs[p..] {
        if let Expect::Done { status_at, .. } = r.expect {
            let st: u8 = g.mem.read_obj(GuestAddress(status_at)).unwrap();
            assert_eq!(
                st, 0xff,
                "the status of a request of a reset or broken queue was written"
            );
        }
    }
    disk.ram.set(Memory::Plenty);
    probe(g);
    batch(g, disk, true);
}

/// The rings start a few chains before their u16 indexes wrap (as after
/// 65,500 or so requests, or a device restored there), and batches run
/// across the wrap.
fn near_wrap(g: &mut Guest<Block>, disk: &mut Disk) {
    probe(g);
    let idx = 0u16.wrapping_sub(g.rng.range(1, 40) as u16);
    g.start_indices_at(0, idx);
    {
        let mut t = g.t.lock().unwrap();
        let active = t.device_mut().active.as_mut().expect("live");
        active.queues[0].set_next_avail(idx);
        active.queues[0].set_next_used(idx);
    }
    for _ in 0..g.rng.range(1, 12) {
        let well_formed_only = g.rng.one_in(2);
        batch(g, disk, well_formed_only);
    }
}

fn run_seed(seed: u64) {
    let (_t, path) = image(CAPACITY as usize * 512 + GUARD);
    let before = std::fs::read(&path).unwrap();
    let read_only = seed % 4 == 3;
    let img = DiskImage::open(&path, read_only, ID).unwrap();
    let ram = Arc::new(FlakyRam::new(seed));
    let dev = Block::new(img, ram.clone(), "vda");
    let mut g = Guest::new(dev, seed);
    let mut disk = Disk {
        ram,
        shadow: before[..CAPACITY as usize * 512].to_vec(),
        read_only,
        tally: [0; 5],
    };
    probe(&mut g);
    for _ in 0..STEPS {
        match g.rng.below(100) {
            0..=3 => break_queue(&mut g, &mut disk),
            4..=6 => reset_in_flight(&mut g, &mut disk),
            7..=8 => {
                g.register_storm(40);
                probe(&mut g);
            }
            9..=10 => probe(&mut g),
            11..=13 => interrupted_while_waiting(&mut g, &mut disk),
            14..=15 => near_wrap(&mut g, &mut disk),
            16 => g.relocate(),
            _ => batch(&mut g, &mut disk, false),
        }
    }
    g.check_retired();
    let c = g.t.lock().unwrap().device().counters();
    eprintln!(
        "block fuzz seed {seed:#x}: {STEPS} steps, chains [ok, error, refused, dropped, random] {:?}, device counters {c:?}",
        disk.tally
    );
    let after = std::fs::read(&path).unwrap();
    assert_eq!(after.len(), before.len(), "the image changed size");
    assert!(
        after[CAPACITY as usize * 512..] == before[CAPACITY as usize * 512..],
        "the bytes after the disk's last sector were written"
    );
    assert!(
        after[..CAPACITY as usize * 512] == disk.shadow[..],
        "the disk differs from what the guest wrote"
    );
}

/// Hostile drivers against the block device: no panic or hang, nothing
/// outside the disk or outside the buffers given touched, every used
/// element sound, well-formed requests served right among the others,
/// bad ones answered with their error.
#[test]
fn hostile_drivers_get_errors_and_well_formed_requests_still_work() {
    for_each_seed("block fuzz", run_seed);
}
