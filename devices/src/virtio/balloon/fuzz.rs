//! A hostile driver against the balloon ([`crate::virtio::fuzz`]): page
//! lists with random page numbers (outside guest RAM, duplicated, too
//! many), statistics and free page reports, well-formed ones checked for
//! exactly the discards they must cause, hostile chains for the
//! invariants only; with avail index jumps, resets while a statistics
//! buffer is held, register storms and target changes; guest memory
//! relocated (a held statistics buffer is given back in the new mapping)
//! and rings that start near the u16 wrap of their indexes.

use super::{Balloon, BalloonConfig, BalloonHandle, Role, BALLOON_PAGE, MAX_PFNS_PER_REQUEST};
use crate::virtio::fuzz::{for_each_seed, Buf, Guest, RAM0, RAM1, SCRATCH};
use crate::virtio::mmio::S_NEEDS_RESET;
use crate::virtio::{PinToken, QueueState, RamControl, RamError, VirtioDevice};
use std::sync::{Arc, Mutex};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

const STEPS: usize = 500;
const F_STATS_VQ: u64 = 1 << super::F_STATS_VQ;
const F_REPORTING: u64 = 1 << super::F_REPORTING;

/// Records discards; refuses ranges outside guest RAM as the VMM's does.
#[derive(Default)]
struct Discards(Mutex<Vec<(u64, u64)>>);

impl RamControl for Discards {
    fn pin(&self, _: u64, _: u64) -> Result<Option<PinToken>, RamError> {
        panic!("the balloon pins nothing");
    }
    fn discard(&self, gpa: u64, len: u64) -> Result<u64, RamError> {
        assert!(
            len > 0 && gpa.is_multiple_of(BALLOON_PAGE) && len.is_multiple_of(BALLOON_PAGE),
            "discard {gpa:#x}+{len:#x}"
        );
        let end = gpa.checked_add(len).expect("a discard that wraps");
        let inside = |(s, e): (u64, u64)| gpa >= s && end <= e;
        if !inside(RAM0) && !inside(RAM1) {
            return Err(RamError::OutOfRange { gpa, len });
        }
        self.0.lock().unwrap().push((gpa, len));
        Ok(len)
    }
}

struct State {
    roles: Vec<Role>,
    /// The stats buffer the device holds (its head).
    held: Option<u16>,
    /// Discards well-formed requests must cause.
    want: Vec<(u64, u64)>,
}

/// Page runs as the balloon coalesces them.
fn runs(mut pfns: Vec<u32>) -> Vec<(u64, u64)> {
    pfns.sort_unstable();
    pfns.dedup();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for p in pfns.into_iter().map(u64::from) {
        match out.last_mut() {
            Some((s, n)) if *s + *n == p => *n += 1,
            _ => out.push((p, 1)),
        }
    }
    out.into_iter()
        .map(|(p, n)| (p * BALLOON_PAGE, n * BALLOON_PAGE))
        .filter(|&(a, l)| (a >= RAM0.0 && a + l <= RAM0.1) || (a >= RAM1.0 && a + l <= RAM1.1))
        .collect()
}

/// A page number: scratch RAM, outside RAM, the largest.
fn pfn(g: &mut Guest<Balloon>) -> u32 {
    let page = |a: u64| (a / BALLOON_PAGE) as u32;
    match g.rng.below(6) {
        0 | 1 => page(g.rng.range(SCRATCH.0, SCRATCH.1)),
        2 => page(g.rng.range(RAM1.0, RAM1.1)),
        3 => page(g.rng.range(RAM0.1, RAM1.0)),
        4 => u32::MAX - g.rng.below(2) as u32,
        _ => g.rng.next_u64() as u32,
    }
}

/// A page list request for queue `q`: well-formed (its discards are
/// expected) or with one thing wrong (none are). Returns the head.
fn page_list(g: &mut Guest<Balloon>, s: &mut State, q: usize, mutate: bool) -> Option<u16> {
    let many = if mutate && g.rng.one_in(3) {
        g.rng
            .range(MAX_PFNS_PER_REQUEST + 1, 4 * MAX_PFNS_PER_REQUEST)
    } else {
        g.rng.range(1, MAX_PFNS_PER_REQUEST + 1)
    };
    let mut pfns: Vec<u32> = (0..many).map(|_| pfn(g)).collect();
    if g.rng.one_in(3) && pfns.len() > 1 {
        pfns[1] = pfns[0];
    }
    let raw: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
    let at = g.alloc_data(raw.len() as u64)?;
    g.mem.write_slice(&raw, GuestAddress(at)).unwrap();
    let cut = 4 * g.rng.below(pfns.len() as u64 + 1);
    let mut bufs = vec![
        Buf::new(at, cut as u32, false),
        Buf::new(at + cut, raw.len() as u32 - cut as u32, false),
    ];
    let mut bad = many > MAX_PFNS_PER_REQUEST;
    if mutate && !bad {
        bad = true;
        match g.rng.below(3) {
            0 => bufs[1].writable = true,
            1 => bufs[1].len += 1 + g.rng.below(3) as u32,
            _ => {
                bufs[1].addr = RAM0.1 - 2;
                bufs[1].len = bufs[1].len.max(4);
            }
        }
    }
    let indirect = g.rng.one_in(5);
    let head = g.place(q, &bufs, indirect)?[0];
    if !bad && s.roles[q] == Role::Inflate {
        s.want.extend(runs(pfns));
    }
    Some(head)
}

/// A free page report: page-aligned writable ranges in scratch RAM
/// (discarded), or with one unaligned (skipped) or readable (ends it).
fn report(g: &mut Guest<Balloon>, s: &mut State, q: usize, mutate: bool) -> Option<u16> {
    let mut bufs = Vec::new();
    for _ in 0..g.rng.range(1, 4) {
        let pages = g.rng.range(1, 5);
        let first = g
            .rng
            .range(RAM1.0 / BALLOON_PAGE, RAM1.1 / BALLOON_PAGE - pages);
        bufs.push(Buf::new(
            first * BALLOON_PAGE,
            (pages * BALLOON_PAGE) as u32,
            true,
        ));
    }
    let bad = if mutate {
        Some(g.rng.below(bufs.len() as u64) as usize)
    } else {
        None
    };
    let readable = g.rng.one_in(2);
    if let Some(i) = bad {
        if readable {
            // A readable buffer may only come first (read before write).
            bufs[0].writable = false;
        } else {
            bufs[i].addr += 512;
        }
    }
    let head = g.place(q, &bufs, false)?[0];
    for (i, b) in bufs.iter().enumerate() {
        match bad {
            Some(_) if readable => break,
            Some(j) if j == i => continue,
            _ => s.want.push((b.addr, u64::from(b.len))),
        }
    }
    Some(head)
}

/// A statistics buffer: `{tag: le16, val: le64}` entries, readable.
fn stats(g: &mut Guest<Balloon>, q: usize, writable: bool) -> Option<u16> {
    let n = g.rng.range(1, 12);
    let mut raw = vec![0u8; 10 * n as usize];
    g.rng.fill(&mut raw);
    let at = g.alloc_data(raw.len() as u64)?;
    g.mem.write_slice(&raw, GuestAddress(at)).unwrap();
    Some(g.place(q, &[Buf::new(at, raw.len() as u32, writable)], false)?[0])
}

/// One batch: in every queue, well-formed and faulty requests and, in a
/// hostile batch, random chains; every chain is completed (but the held
/// statistics buffer) and exactly the expected discards happen.
fn batch(g: &mut Guest<Balloon>, s: &mut State, ram: &Discards, hostile: bool) {
    g.begin_batch();
    s.want.clear();
    ram.0.lock().unwrap().clear();
    let mut held_new = None;
    let old: Vec<u16> = g.queues.iter().map(|q| q.avail_idx).collect();
    for q in 0..s.roles.len() {
        let mut heads = Vec::new();
        for _ in 0..g.rng.below(5) {
            let mutate = g.rng.one_in(3);
            let head = match s.roles[q] {
                Role::Inflate | Role::Deflate => page_list(g, s, q, mutate),
                Role::Reporting => report(g, s, q, mutate),
                Role::Stats => {
                    let writable = mutate && g.rng.one_in(2);
                    let h = stats(g, q, writable);
                    if !writable && s.held.is_none() && held_new.is_none() {
                        held_new = h;
                    }
                    h
                }
            };
            heads.extend(head);
        }
        if hostile {
            let random = |r: &mut crate::virtio::fuzz::Rng| {
                r.next_u64().to_le_bytes().repeat(2).try_into().unwrap()
            };
            for _ in 0..g.rng.below(4) {
                heads.extend(g.hostile_chain(q, random));
            }
        }
        let heads: Vec<(u16, u64)> = heads
            .into_iter()
            .map(|h| (h, g.writable_bound(q, h)))
            .collect();
        g.publish(q, &heads);
    }
    for (q, &old) in old.iter().enumerate().take(s.roles.len()) {
        g.kick_if_needed(q, old);
        let states = g.run();
        assert_eq!(
            g.used_flags(q),
            0,
            "notifications left off on a drained queue"
        );
        assert!(
            states.iter().all(|(_, st)| *st != QueueState::NeedsReset),
            "{states:?}"
        );
        for (_, len) in g.used(q) {
            assert_eq!(len, 0, "the balloon writes nothing");
        }
    }
    if let Some(h) = held_new.filter(|_| !hostile) {
        s.held = Some(h);
    }
    for q in 0..s.roles.len() {
        let left: Vec<u16> = g.outstanding(q).iter().map(|&(h, _)| h).collect();
        if s.roles[q] == Role::Stats && !hostile {
            assert!(
                left.len() <= 1 && left.first().copied() == s.held,
                "stats queue holds {left:?}, not {:?}",
                s.held
            );
        } else if !hostile {
            assert!(
                left.is_empty(),
                "queue {q} ({:?}) left {left:?}",
                s.roles[q]
            );
        }
    }
    if !hostile {
        let mut got = ram.0.lock().unwrap().clone();
        got.sort_unstable();
        s.want.sort_unstable();
        assert_eq!(got, s.want, "discards");
    }
    let handle = BalloonHandle::new(g.t.clone());
    if hostile || g.rng.one_in(2) {
        // A hostile batch's stats buffer may be held: give it back too.
        let had = s.held.take().is_some();
        let asked = handle.request_stats();
        assert!(hostile || asked == had, "request_stats {asked}, held {had}");
        if let Some(q) = s.roles.iter().position(|r| *r == Role::Stats) {
            g.used(q);
            assert!(g.outstanding(q).is_empty() || hostile);
        }
    }
    if g.rng.one_in(4) {
        handle.set_target(g.rng.below(1 << 30));
    }
    g.check_memory();
}

fn probe(g: &mut Guest<Balloon>, s: &mut State) {
    let offered = g.t.lock().unwrap().device().features();
    let features = offered & (g.rng.next_u64() | 1 << crate::virtio::VIRTIO_F_VERSION_1);
    s.roles = vec![Role::Inflate, Role::Deflate];
    if features & F_STATS_VQ != 0 {
        s.roles.push(Role::Stats);
    }
    if features & F_REPORTING != 0 {
        s.roles.push(Role::Reporting);
    }
    let mut sizes = [0u16; 4];
    for size in sizes.iter_mut().take(s.roles.len()) {
        *size = 1 << g.rng.range(2, 9);
    }
    s.held = None;
    g.probe(&sizes, features);
}

/// Every queue starts a few chains before its u16 indexes wrap (as after
/// 65,500 or so requests, or a device restored there), and batches run
/// across the wrap.
fn near_wrap(g: &mut Guest<Balloon>, s: &mut State, ram: &Discards) {
    probe(g, s);
    for q in 0..s.roles.len() {
        let idx = 0u16.wrapping_sub(g.rng.range(1, 20) as u16);
        g.start_indices_at(q, idx);
        let mut t = g.t.lock().unwrap();
        let (active, _) = t.device_mut().active.as_mut().expect("live");
        active.queues[q].set_next_avail(idx);
        active.queues[q].set_next_used(idx);
    }
    for _ in 0..g.rng.range(1, 8) {
        let hostile = g.rng.one_in(3);
        batch(g, s, ram, hostile);
    }
}

fn run_seed(seed: u64) {
    let cfg = BalloonConfig {
        target_bytes: 1 << 20,
        deflate_on_oom: true,
        stats: seed % 3 != 2,
        free_page_reporting: seed % 4 != 3,
    };
    let ram = Arc::new(Discards::default());
    let mut g = Guest::new(Balloon::new(cfg, ram.clone()), seed);
    let mut s = State {
        roles: vec![],
        held: None,
        want: vec![],
    };
    probe(&mut g, &mut s);
    for _ in 0..STEPS {
        match g.rng.below(100) {
            0..=3 => {
                // The avail index jumps: the queue is stopped, the device
                // asks for a reset, and works after one.
                let q = g.rng.below(s.roles.len() as u64) as usize;
                let idx = g.queues[q].avail_idx.wrapping_add(g.queues[q].size + 1);
                g.set_avail_idx(q, idx);
                g.kick(q);
                assert_ne!(g.rd(0x070) & S_NEEDS_RESET, 0);
                probe(&mut g, &mut s);
                batch(&mut g, &mut s, &ram, false);
            }
            4..=6 => {
                g.register_storm(40);
                probe(&mut g, &mut s);
            }
            7..=9 => {
                // A reset while a statistics buffer may be held.
                g.wr(0x070, 0);
                assert!(!BalloonHandle::new(g.t.clone()).request_stats());
                probe(&mut g, &mut s);
            }
            10 => g.relocate(),
            11 => near_wrap(&mut g, &mut s, &ram),
            12..=39 => batch(&mut g, &mut s, &ram, true),
            _ => batch(&mut g, &mut s, &ram, false),
        }
    }
    g.check_retired();
    let c = g.t.lock().unwrap().device().counters();
    eprintln!("balloon fuzz seed {seed:#x}: {STEPS} steps, counters {c:?}");
}

/// Hostile drivers against the balloon: no panic or hang, no discard but
/// of pages the guest named, every used element sound, statistics held
/// and returned, a broken queue reset.
#[test]
fn hostile_drivers_cannot_make_the_balloon_discard_what_they_did_not_give() {
    for_each_seed("balloon fuzz", run_seed);
}
