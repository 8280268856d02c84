//! Every public operation of the memory manager at once, on three VMs
//! whose RAM is over twice the budget: "vCPU" threads write and read back
//! their own word of every page (through a `View` that relocations switch)
//! while other threads discard, pin and access pinned ranges as a device
//! does, reclaim, compact, migrate, relocate (to aligned, grow, merge),
//! change the budget and the VMs' limits, inject the failures whose
//! documented outcome keeps the data, and create and destroy a third VM
//! over and over.
//!
//! It asserts that every word read is the last one written to it (zero
//! after a discard; a word nobody owns is always zero, so no other guest's
//! data leaks in), that no operation fails except in the ways its docs
//! allow, that no operation is stuck for 30 s (a watchdog names it and
//! aborts), and at the end that every word of every VM is right, nothing
//! was poisoned, and the swap map, swap cache and allocator balance with
//! the VMs alive and after they are gone.
//!
//! One run in three (seeds 2 mod 3) has a roomy pool, where memory is
//! often free and compaction collapses 2 MiB ranges (its undo paths run
//! too, through injected migration failures); the others a tight one.
//!
//! `FOLIOVM_CHAOS_SEED` repeats a run (the seed is printed);
//! `FOLIOVM_CHAOS_SECS` sets how long the operations run (default 20).

mod common;

use common::*;
use mem::{
    FaultPlan, FaultPoint, FolioBackend, GuestAddress, GuestMemoryBackend, InjectPlan,
    InjectedFault, IoOp, MemoryManager, RelocateError, RelocateOp, VmId, VmLimits, PAGE_SIZE,
};
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// The pool mapped at start; `set_budget` moves between a third of it and
/// all. Tight: the VMs' RAM is over twice that.
const POOL: u64 = 6 * MIB;
/// The pool of one run in three: roomy, so that memory is often free and
/// compaction collapses ranges into 2 MiB folios (with `POOL`, a ready
/// 2 MiB block is rare and collapse hardly ran), while budget changes and
/// the VMs' maximums still make reclaim swap.
const ROOMY_POOL: u64 = 16 * MIB;
const WORDS: u64 = PAGE_SIZE / 8;
/// vCPU `t` of a VM owns word `t` of each of its pages.
const VCPUS: u64 = 3;
/// The pinning "device" owns this word of every page.
const PIN_WORD: u64 = VCPUS;
/// Words with an owner; the others of a page stay zero.
const OWNED: u64 = VCPUS + 1;
/// Discard granularity in pages, and the unit of the owners' locks.
const CHUNK: u64 = 16;
const CHUNKS_PER_2M: u64 = 2 * MIB / PAGE_SIZE / CHUNK;
/// The vCPUs of a VM touch pages in a window this wide that wanders.
const WINDOW: u64 = 256;
/// An operation running this long is a deadlock.
const STUCK: Duration = Duration::from_secs(30);

/// One guest and the shadow of what its owners wrote.
struct Vm {
    name: String,
    id: VmId,
    /// Dropped (before or after `destroy_vm`) when the VM goes.
    backend: Mutex<Option<Arc<FolioBackend>>>,
    view: View,
    /// Pages the owners use (a grown region's tail stays untouched).
    pages: u64,
    /// Owners hold a chunk's lock shared while they access its pages, a
    /// discard holds it exclusively.
    chunks: Vec<RwLock<()>>,
    /// Expected value of owned word `w` of page `p` at `p * OWNED + w`.
    shadow: Vec<AtomicU64>,
    /// First page of the vCPUs' window.
    window: AtomicU64,
    /// Its vCPUs stop (the VM is about to go).
    stop: AtomicBool,
    /// It is being destroyed: operations on it may fail. Set with every
    /// chunk locked, so an access under a chunk lock that saw it clear
    /// finds the memory still there.
    dead: AtomicBool,
}

impl Vm {
    fn new(mm: &Arc<MemoryManager>, name: &str, regions: &[(u64, u64)], host_offset: u64) -> Vm {
        let id = mm.create_vm(name).unwrap();
        let layout: Vec<_> = regions
            .iter()
            .map(|&(gpa, size)| (GuestAddress(gpa), size))
            .collect();
        let b = mm.backend_with_offset(id, &layout, host_offset).unwrap();
        let pages = regions.iter().map(|r| r.1).sum::<u64>() / PAGE_SIZE;
        Vm {
            name: name.to_string(),
            id,
            view: View::new(b.regions()),
            backend: Mutex::new(Some(b)),
            pages,
            chunks: (0..pages / CHUNK).map(|_| RwLock::new(())).collect(),
            shadow: (0..pages * OWNED).map(|_| AtomicU64::new(0)).collect(),
            window: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            dead: AtomicBool::new(false),
        }
    }

    /// `r`'s value; `None` for an error of an operation on a VM being
    /// destroyed, which may fail (counted).
    fn alive<T, E: std::fmt::Display>(
        &self,
        r: Result<T, E>,
        what: &str,
        n: &mut BTreeMap<&'static str, u64>,
    ) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(_) if self.dead.load(SeqCst) => {
                *n.entry("failed on a VM being destroyed").or_default() += 1;
                None
            }
            Err(e) => panic!("{}: {what}: {e}", self.name),
        }
    }

    fn want(&self, p: u64, w: u64) -> u64 {
        match w < OWNED {
            true => self.shadow[(p * OWNED + w) as usize].load(SeqCst),
            false => 0,
        }
    }

    fn set(&self, p: u64, w: u64, v: u64) {
        self.shadow[(p * OWNED + w) as usize].store(v, SeqCst);
    }

    fn gpa(p: u64, w: u64) -> u64 {
        p * PAGE_SIZE + w * 8
    }

    /// Check every word of every page the view maps (a grown tail too),
    /// with nothing else running on the VM.
    fn verify_all(&self, what: &str, slot: &Slot) {
        // Held: a relocation (of a VM about to be destroyed) must not
        // unmap the range read.
        let regions = self.view.0.read().unwrap();
        for &r in regions.iter() {
            for off in (0..r.size).step_by(PAGE_SIZE as usize) {
                let p = (r.guest_base.raw() + off) / PAGE_SIZE;
                slot.enter("final check", p);
                for w in 0..WORDS {
                    let got = Ram(r).read(off + w * 8);
                    let want = if p < self.pages { self.want(p, w) } else { 0 };
                    assert_eq!(
                        got, want,
                        "{what}: {} page {p} word {w}: read {got:#x}, expected {want:#x}",
                        self.name
                    );
                }
            }
        }
        slot.leave();
    }
}

/// A value nobody else writes, never zero.
fn value(tag: u64, w: u64, i: u64) -> u64 {
    0xC4 << 56 | (tag & 0xff) << 48 | (w & 0xff) << 40 | (i & 0xff_ffff_ffff) | 1
}

/// What one thread is doing, for the watchdog.
struct Slot {
    thread: String,
    op: Mutex<Option<(&'static str, u64, Instant)>>,
}

impl Slot {
    fn enter(&self, op: &'static str, arg: u64) {
        *self.op.lock().unwrap() = Some((op, arg, Instant::now()));
    }
    fn leave(&self) {
        *self.op.lock().unwrap() = None;
    }
}

struct Chaos {
    mm: Arc<MemoryManager>,
    /// The pool mapped at start ([`POOL`] or [`ROOMY_POOL`]).
    pool: u64,
    /// The VMs operations may pick.
    vms: RwLock<Vec<Arc<Vm>>>,
    stop: AtomicBool,
    slots: Mutex<Vec<Arc<Slot>>>,
    /// Operations done, by kind (each thread adds its own at its end).
    counts: Mutex<BTreeMap<&'static str, u64>>,
}

impl Chaos {
    fn roomy(&self) -> bool {
        self.pool == ROOMY_POOL
    }

    /// vCPU 0's accesses between two writes of a whole 2 MiB.
    fn sweep_every(&self) -> u64 {
        if self.roomy() {
            1000
        } else {
            5000
        }
    }

    fn slot(&self, thread: String) -> Arc<Slot> {
        let s = Arc::new(Slot {
            thread,
            op: Mutex::new(None),
        });
        self.slots.lock().unwrap().push(s.clone());
        s
    }

    fn pick(&self, rng: &mut Rng) -> Arc<Vm> {
        let vms = self.vms.read().unwrap();
        vms[rng.below(vms.len() as u64) as usize].clone()
    }

    fn add(&self, counts: BTreeMap<&'static str, u64>) {
        let mut all = self.counts.lock().unwrap();
        for (k, n) in counts {
            *all.entry(k).or_default() += n;
        }
    }

    /// A thread that runs `f` until the stop, counting its outcomes.
    fn spawn(
        self: &Arc<Self>,
        name: &str,
        seed: u64,
        f: impl Fn(&Chaos, &Slot, &mut Rng, &mut BTreeMap<&'static str, u64>) + Send + 'static,
    ) -> std::thread::JoinHandle<()> {
        let (c, slot) = (self.clone(), self.slot(name.to_string()));
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let (mut rng, mut counts) = (Rng(seed | 1), BTreeMap::new());
                while !c.stop.load(SeqCst) {
                    f(&c, &slot, &mut rng, &mut counts);
                }
                c.add(counts);
            })
            .unwrap()
    }
}

/// Read word `w` of page `p` as vCPU `t`, check it, and write `write`
/// there if given.
fn touch(vm: &Vm, slot: &Slot, t: u64, p: u64, w: u64, write: Option<u64>) {
    let _c = vm.chunks[(p / CHUNK) as usize].read().unwrap();
    slot.enter("vcpu read", p);
    let got = vm.view.read(Vm::gpa(p, w));
    slot.leave();
    let want = vm.want(p, w);
    assert_eq!(
        got, want,
        "{} vcpu {t}: page {p} word {w}: read {got:#x}, expected {want:#x}",
        vm.name
    );
    if let Some(v) = write {
        slot.enter("vcpu write", p);
        vm.view.write(Vm::gpa(p, w), v);
        slot.leave();
        vm.set(p, w, v);
    }
}

fn vcpu(c: &Chaos, vm: &Vm, t: u64, slot: &Slot, seed: u64) {
    let mut rng = Rng(seed | 1);
    let (mut reads, mut writes, mut sweeps) = (0, 0, 0);
    let mut i = 0;
    while !c.stop.load(SeqCst) && !vm.stop.load(SeqCst) {
        i += 1;
        if t == 0 && i % 300 == 0 {
            vm.window
                .store((i / 300 * 211) % (vm.pages - WINDOW), SeqCst);
        }
        if t == 0 && i % c.sweep_every() == 0 {
            // Write a whole 2 MiB at once: a range that compaction can
            // collapse into one 2 MiB folio.
            let first = rng.below(vm.pages / 512) * 512;
            for p in first..first + 512 {
                touch(vm, slot, t, p, t, Some(value(vm.id.0 as u64, t, i)));
            }
            sweeps += 1;
        }
        let p = vm.window.load(SeqCst) + rng.below(WINDOW);
        // Now and then a word nobody owns: zero, or another guest's data
        // reached this one.
        let w = match rng.below(64) {
            0 => OWNED + rng.below(WORDS - OWNED),
            _ => t,
        };
        let write = (w == t && rng.below(2) == 0).then(|| value(vm.id.0 as u64, t, i));
        touch(vm, slot, t, p, w, write);
        reads += 1;
        writes += write.is_some() as u64;
    }
    c.add(BTreeMap::from([
        ("vcpu reads", reads),
        ("vcpu writes", writes),
        ("vcpu 2 MiB sweeps", sweeps),
    ]));
}

fn spawn_vcpus(c: &Arc<Chaos>, vm: &Arc<Vm>, seed: u64) -> Vec<std::thread::JoinHandle<()>> {
    (0..VCPUS)
        .map(|t| {
            let (c, vm) = (c.clone(), vm.clone());
            let slot = c.slot(format!("{} vcpu {t}", vm.name));
            std::thread::spawn(move || vcpu(&c, &vm, t, &slot, seed ^ (t * 7919)))
        })
        .collect()
}

/// Discard 1-4 chunks (inside one 2 MiB, so inside one region) near the
/// vCPUs' window. Pages of a pinned folio are skipped: those must read
/// as before, every other page as zero.
fn discard(c: &Chaos, slot: &Slot, rng: &mut Rng, n: &mut BTreeMap<&'static str, u64>) {
    let vm = c.pick(rng);
    let nchunks = vm.pages / CHUNK;
    let first = match rng.below(4) {
        0 => rng.below(nchunks),
        _ => (vm.window.load(SeqCst) / CHUNK + rng.below(WINDOW / CHUNK)).min(nchunks - 1),
    };
    let nr = (1 + rng.below(4)).min(CHUNKS_PER_2M - first % CHUNKS_PER_2M);
    let _g: Vec<_> = (first..first + nr)
        .map(|ch| vm.chunks[ch as usize].write().unwrap())
        .collect();
    if vm.dead.load(SeqCst) {
        return;
    }
    let (gpa, len) = (first * CHUNK * PAGE_SIZE, nr * CHUNK * PAGE_SIZE);
    slot.enter("discard", gpa);
    let out = c.mm.discard(vm.id, GuestAddress(gpa), len).unwrap();
    slot.leave();
    *n.entry("discards").or_default() += 1;
    if out.skipped_pinned_pages > 0 {
        *n.entry("discards skipping pins").or_default() += 1;
    }
    for p in first * CHUNK..(first + nr) * CHUNK {
        if out.skipped_pinned_pages > 0 {
            slot.enter("read after discard", p);
            let got: Vec<u64> = (0..OWNED).map(|w| vm.view.read(Vm::gpa(p, w))).collect();
            slot.leave();
            let want: Vec<u64> = (0..OWNED).map(|w| vm.want(p, w)).collect();
            if got == want {
                continue; // skipped: pinned
            }
            assert!(
                got.iter().all(|&v| v == 0),
                "{} page {p} half discarded: read {got:x?}, had {want:x?}",
                vm.name
            );
        }
        for w in 0..OWNED {
            vm.set(p, w, 0);
        }
    }
}

/// A device request: pin 1-8 pages, check and write the device's word of
/// each through the pin, hold it a while, check again; then read it back
/// through the guest mapping once unpinned.
fn pin(c: &Chaos, slot: &Slot, rng: &mut Rng, n: &mut BTreeMap<&'static str, u64>) {
    let vm = c.pick(rng);
    let first = rng.below(vm.pages);
    let nr = (1 + rng.below(8)).min(512 - first % 512);
    let _g: Vec<_> = (first / CHUNK..=(first + nr - 1) / CHUNK)
        .map(|ch| vm.chunks[ch as usize].read().unwrap())
        .collect();
    if vm.dead.load(SeqCst) {
        return;
    }
    slot.enter("pin", first);
    let r =
        c.mm.pin(vm.id, GuestAddress(first * PAGE_SIZE), nr * PAGE_SIZE);
    slot.leave();
    let pin = match r {
        Ok(pin) => pin,
        Err(mem::PinError::NoMemory) => {
            *n.entry("pins without memory").or_default() += 1;
            return;
        }
        Err(e) => panic!("{} pin {first}+{nr}: {e}", vm.name),
    };
    let word = |p: u64, w: u64| {
        let mut b = [0u8; 8];
        pin.read_at((p - first) * PAGE_SIZE + w * 8, &mut b);
        u64::from_ne_bytes(b)
    };
    let check = |what: &str| {
        for p in first..first + nr {
            let w = [PIN_WORD, OWNED + p % (WORDS - OWNED)];
            for w in w {
                let (got, want) = (word(p, w), vm.want(p, w));
                assert_eq!(
                    got, want,
                    "{what}: {} page {p} word {w}: read {got:#x}, expected {want:#x}",
                    vm.name
                );
            }
        }
    };
    check("pinned");
    for p in first..first + nr {
        let v = value(vm.id.0 as u64, PIN_WORD, rng.next());
        pin.write_at((p - first) * PAGE_SIZE + PIN_WORD * 8, &v.to_ne_bytes());
        vm.set(p, PIN_WORD, v);
    }
    std::thread::sleep(Duration::from_micros(match rng.below(8) {
        0 => rng.below(5000),
        _ => rng.below(500),
    }));
    check("still pinned");
    drop(pin);
    for p in first..first + nr {
        slot.enter("read after unpin", p);
        let got = vm.view.read(Vm::gpa(p, PIN_WORD));
        slot.leave();
        let want = vm.want(p, PIN_WORD);
        assert_eq!(got, want, "unpinned: {} page {p}: read {got:#x}", vm.name);
    }
    *n.entry("pins").or_default() += 1;
}

/// Relocate a region: to an aligned range, grown by 2 MiB (up to half
/// again the VM's size), or merged with its neighbour.
fn relocate(c: &Chaos, slot: &Slot, rng: &mut Rng, n: &mut BTreeMap<&'static str, u64>) {
    let vm = c.pick(rng);
    let Some(regions) = c.mm.vm_regions(vm.id) else {
        assert!(vm.dead.load(SeqCst), "{}: no regions", vm.name);
        return;
    };
    let last = *regions.last().unwrap();
    let size: u64 = regions.iter().map(|r| r.size).sum();
    let (what, gpa, op) = match rng.below(4) {
        0 if regions.len() > 1 => (
            "relocations: merge",
            0,
            RelocateOp::MergeWith(regions[1].guest_base),
        ),
        1 if size + 2 * MIB <= vm.pages * PAGE_SIZE * 3 / 2 => (
            "relocations: grow",
            last.guest_base.raw(),
            RelocateOp::Grow(last.size + 2 * MIB),
        ),
        _ => ("relocations: to aligned", 0, RelocateOp::ToAligned),
    };
    slot.enter(what, vm.id.0 as u64);
    let r = c.mm.relocate(
        vm.id,
        GuestAddress(gpa),
        op,
        &mut |sw| vm.view.switch(sw),
        &|_, _| {},
    );
    slot.leave();
    match r {
        Ok(_) => *n.entry(what).or_default() += 1,
        Err(RelocateError::Pinned(_)) => *n.entry("relocations refused: pinned").or_default() += 1,
        // An injected failure of a step (of the switch: `Switch`), undone.
        Err(RelocateError::Injected(_) | RelocateError::Switch(_)) => {
            *n.entry("relocations undone").or_default() += 1
        }
        Err(e) => _ = vm.alive(Err::<(), _>(e), "relocate", n),
    }
    std::thread::sleep(Duration::from_millis(5));
}

fn migrate(c: &Chaos, slot: &Slot, rng: &mut Rng, n: &mut BTreeMap<&'static str, u64>) {
    let vm = c.pick(rng);
    let p = (vm.window.load(SeqCst) + rng.below(WINDOW)).min(vm.pages - 64) / 64 * 64;
    slot.enter("migrate_range", p);
    let r =
        c.mm.migrate_range(vm.id, GuestAddress(p * PAGE_SIZE), 64 * PAGE_SIZE);
    slot.leave();
    let Some((ok, failed)) = vm.alive(r, "migrate_range", n) else {
        return;
    };
    *n.entry("migrated folios").or_default() += ok;
    *n.entry("migrations failed").or_default() += failed;
    std::thread::sleep(Duration::from_millis(2));
}

fn reclaim(c: &Chaos, slot: &Slot, rng: &mut Rng, n: &mut BTreeMap<&'static str, u64>) {
    let vm = c.pick(rng);
    let who = (rng.below(3) > 0).then_some(vm.id);
    slot.enter("reclaim", 0);
    let r = c.mm.reclaim(who, (1 + rng.below(8)) * 256 * 1024);
    slot.leave();
    let freed = vm.alive(r, "reclaim", n).unwrap_or(0);
    *n.entry("reclaims").or_default() += 1;
    *n.entry("reclaimed KiB").or_default() += freed / 1024;
    // With a roomy pool, seldom: a range with a page swapped out is no
    // candidate for collapse.
    std::thread::sleep(Duration::from_millis(if c.roomy() { 50 } else { 2 }));
}

fn compact(c: &Chaos, slot: &Slot, rng: &mut Rng, n: &mut BTreeMap<&'static str, u64>) {
    let vm = c.pick(rng);
    let who = (rng.below(2) > 0).then_some(vm.id);
    slot.enter("compact", 0);
    let r = c.mm.compact(who, &|_, _| {});
    slot.leave();
    if vm.alive(r, "compact", n).is_some() {
        *n.entry("compactions").or_default() += 1;
    }
    std::thread::sleep(Duration::from_millis(20));
}

/// Budget changes between a third of the pool (half of a roomy one) and
/// all of it; the VMs' minimums (see `limits`) stay below the third.
fn budget(c: &Chaos, slot: &Slot, rng: &mut Rng, n: &mut BTreeMap<&'static str, u64>) {
    let share = if c.roomy() { 2 } else { 3 };
    let low = c.pool / share / (64 * 1024) * (64 * 1024);
    let bytes = low + rng.below((c.pool - low) / (64 * 1024) + 1) * 64 * 1024;
    slot.enter("set_budget", bytes);
    let r = c.mm.set_budget(bytes);
    slot.leave();
    match r {
        Ok(_) => *n.entry("budget changes").or_default() += 1,
        // Pins (besides the minimums) keep memory resident, and reclaim
        // cannot free what the vCPUs fault back at once.
        Err(mem::BudgetError::BelowMinimums { .. } | mem::BudgetError::CannotFree { .. }) => {
            *n.entry("budget changes refused").or_default() += 1
        }
        Err(e) => panic!("set_budget({bytes}): {e}"),
    }
    std::thread::sleep(Duration::from_millis(30));
}

/// Minimums of at most 512 KiB each (1.5 MiB for three VMs: below any
/// budget), maximums of at least 1 MiB (4 MiB with a roomy pool), random
/// priorities.
fn limits(c: &Chaos, slot: &Slot, rng: &mut Rng, n: &mut BTreeMap<&'static str, u64>) {
    let vm = c.pick(rng);
    let min_bytes = rng.below(3) * 256 * 1024;
    // With a roomy pool, maximums a 2 MiB folio fits under several times.
    let unit = if c.roomy() { 4 * MIB } else { MIB };
    let max_bytes = match rng.below(4) {
        0 => None,
        k => Some(k * unit),
    };
    let l = VmLimits {
        min_bytes,
        max_bytes,
        priority: rng.below(5) as i32 - 2,
    };
    slot.enter("set_vm_limits", vm.id.0 as u64);
    let r = c.mm.set_vm_limits(vm.id, l);
    slot.leave();
    if vm.alive(r, "set_vm_limits", n).is_some() {
        *n.entry("limit changes").or_default() += 1;
    }
    std::thread::sleep(Duration::from_millis(20));
}

/// Arm a few failures whose documented outcome keeps the data: swap
/// writes that fail (the folio is mapped back), short swap reads (read
/// again), undone migration and relocation steps, kept swap-cache folios,
/// deferred splits, refused installs (COPY fallback, and when that fails
/// the data waits in the pool for the next access), failed pool drops.
fn inject(c: &Chaos, _: &Slot, rng: &mut Rng, n: &mut BTreeMap<&'static str, u64>) {
    use FaultPoint::*;
    const POINTS: [FaultPoint; 13] = [
        MigrateAlloc,
        MigrateUnmap,
        MigrateCopy,
        MigrateRemap,
        RelocatePrepare,
        RelocateSwitch,
        RelocateMove,
        RelocateCommit,
        SwapKeepCache,
        SplitDefer,
        PoolDrop,
        PoolMoveRefused,
        FallbackCopyFails,
    ];
    let mut plans: Vec<_> = (0..1 + rng.below(4))
        .map(|_| InjectPlan {
            point: POINTS[rng.below(POINTS.len() as u64) as usize],
            skip: rng.below(20) as u32,
            count: 1 + rng.below(3) as u32,
        })
        .collect();
    if rng.below(4) == 0 {
        // Installs that fail outright: the data waits in the pool.
        for point in [PoolMoveRefused, FallbackCopyFails] {
            plans.insert(
                0,
                InjectPlan {
                    point,
                    skip: rng.below(10) as u32,
                    count: 4,
                },
            );
        }
    }
    c.mm.inject_faults(plans);
    let fault = [
        InjectedFault::Enospc,
        InjectedFault::Eio,
        InjectedFault::SlowEio,
    ][rng.below(3) as usize];
    let swap = vec![
        FaultPlan {
            op: IoOp::Write,
            fault,
            skip: rng.below(50),
            count: 1 + rng.below(3),
        },
        FaultPlan {
            op: IoOp::Read,
            fault: InjectedFault::ShortRead,
            skip: rng.below(50),
            count: 1 + rng.below(3),
        },
    ];
    c.mm.inject_swap_faults(swap).unwrap();
    *n.entry("injection plans").or_default() += 1;
    std::thread::sleep(Duration::from_millis(50));
}

/// Create a VM of two adjacent 2 MiB regions at a misaligned host range,
/// run its vCPUs for 1-3 s, check every word, and destroy it.
fn lifecycle(c: &Arc<Chaos>, slot: &Slot, seed: u64) {
    let mut rng = Rng(seed | 1);
    let mut round = 0;
    while !c.stop.load(SeqCst) {
        round += 1;
        let name = format!("eph{round}");
        let offset = (1 + rng.below(511)) * PAGE_SIZE;
        slot.enter("create", round);
        let vm = Arc::new(Vm::new(
            &c.mm,
            &name,
            &[(0, 2 * MIB), (2 * MIB, 2 * MIB)],
            offset,
        ));
        slot.leave();
        c.vms.write().unwrap().push(vm.clone());
        let vcpus = spawn_vcpus(c, &vm, rng.next());
        let t0 = Instant::now();
        let run = Duration::from_millis(1000 + rng.below(2000));
        while t0.elapsed() < run && !c.stop.load(SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
        vm.stop.store(true, SeqCst);
        for v in vcpus {
            v.join().unwrap();
        }
        // With every chunk locked, no discard or pin of it runs: check
        // it, then destroy it under the reclaim, compaction, migration and
        // relocation that may be running on it.
        slot.enter("lock the VM's chunks", round);
        let chunks: Vec<_> = vm.chunks.iter().map(|ch| ch.write().unwrap()).collect();
        slot.leave();
        vm.verify_all("before destroy", slot);
        vm.dead.store(true, SeqCst);
        c.vms.write().unwrap().retain(|v| !Arc::ptr_eq(v, &vm));
        slot.enter("destroy", round);
        let b = vm.backend.lock().unwrap().take();
        if round % 2 == 0 {
            drop(b);
            c.mm.destroy_vm(vm.id).unwrap();
        } else {
            c.mm.destroy_vm(vm.id).unwrap();
            drop(b);
        }
        slot.leave();
        drop(chunks);
        assert!(c.mm.vm_stats(vm.id).is_none());
    }
    c.add(BTreeMap::from([("VMs created and destroyed", round)]));
}

fn watchdog(c: Arc<Chaos>, done: Arc<AtomicBool>) {
    while !done.load(SeqCst) {
        std::thread::sleep(Duration::from_millis(500));
        let slots = c.slots.lock().unwrap().clone();
        let now: Vec<_> = slots
            .iter()
            .filter_map(|s| s.op.lock().unwrap().map(|op| (s.thread.clone(), op)))
            .collect();
        if let Some((thread, (op, arg, _))) = now.iter().find(|(_, o)| o.2.elapsed() > STUCK) {
            // Straight to stderr (the test harness captures eprintln!, and
            // loses it at the abort).
            let mut e = std::io::stderr().lock();
            let _ = writeln!(e, "DEADLOCK: {thread} stuck in {op} ({arg}) for {STUCK:?}");
            for (t, (op, arg, since)) in &now {
                let _ = writeln!(e, "  {t}: {op} ({arg}) for {:?}", since.elapsed());
            }
            let _ = writeln!(e, "{:#?}", c.mm.stats());
            std::process::abort();
        }
    }
}

fn env(name: &str) -> Option<u64> {
    let s = std::env::var(name).ok()?;
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

#[test]
fn every_operation_at_once_keeps_every_word_and_balances() {
    let seed = env("FOLIOVM_CHAOS_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    let secs = env("FOLIOVM_CHAOS_SECS").unwrap_or(20);
    eprintln!("chaos seed {seed:#x} (FOLIOVM_CHAOS_SEED={seed:#x} repeats it), {secs} s");
    let t0 = Instant::now();
    // Odd seeds have every fault served by the thread that touched guest
    // memory (its `SIGBUS` handler), even ones by handler threads.
    let delivery = match seed & 1 {
        1 => mem::FaultDelivery::Faulter,
        _ => mem::FaultDelivery::Handlers,
    };
    eprintln!("faults delivered: {delivery:?}");
    let pool = match seed % 3 {
        2 => ROOMY_POOL,
        _ => POOL,
    };
    eprintln!("pool: {} MiB", pool / MIB);
    let mm = swap_manager_with(pool, 3, 128 * MIB, true, delivery);
    let a = Arc::new(Vm::new(&mm, "a", &[(0, 6 * MIB)], 0));
    let b = Arc::new(Vm::new(
        &mm,
        "b",
        &[(0, 2 * MIB), (2 * MIB, 2 * MIB)],
        64 * 1024,
    ));
    let c = Arc::new(Chaos {
        mm: mm.clone(),
        pool,
        vms: RwLock::new(vec![a.clone(), b.clone()]),
        stop: AtomicBool::new(false),
        slots: Mutex::new(Vec::new()),
        counts: Mutex::new(BTreeMap::new()),
    });
    let main = c.slot("main".into());
    let done = Arc::new(AtomicBool::new(false));
    let dog = {
        let (c, done) = (c.clone(), done.clone());
        std::thread::spawn(move || watchdog(c, done))
    };
    let mut threads = spawn_vcpus(&c, &a, seed ^ 0xa);
    threads.extend(spawn_vcpus(&c, &b, seed ^ 0xb));
    type Op = fn(&Chaos, &Slot, &mut Rng, &mut BTreeMap<&'static str, u64>);
    let ops: [(&str, Op); 10] = [
        ("discarder", discard),
        ("pinner 1", pin),
        ("pinner 2", pin),
        ("relocator", relocate),
        ("migrator", migrate),
        ("reclaimer", reclaim),
        ("compactor", compact),
        ("budget", budget),
        ("limits", limits),
        ("injector", inject),
    ];
    for (i, (name, f)) in ops.into_iter().enumerate() {
        threads.push(c.spawn(
            name,
            seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            f,
        ));
    }
    let life = {
        let (c, slot) = (c.clone(), c.slot("lifecycle".into()));
        std::thread::spawn(move || lifecycle(&c, &slot, seed ^ 0x11fe))
    };
    run_for(Duration::from_secs(secs), &c.stop, threads, life);

    // Quiet now: no failure armed, the whole budget back.
    mm.inject_faults(Vec::new());
    mm.inject_swap_faults(Vec::new()).unwrap();
    main.enter("set_budget back", pool);
    mm.set_budget(pool).unwrap();
    main.leave();
    for vm in [&a, &b] {
        vm.verify_all("final", &main);
    }
    let st = mm.stats();
    let counts = c.counts.lock().unwrap().clone();
    eprintln!("after {:?}: {counts:#?}", t0.elapsed());
    eprintln!(
        "swap: out {} pages, in {} from the file, {} from the cache, {} clean dropped, \
         {} zero dropped, {} write errors, {} direct reclaims; splits {}; {:?}",
        st.swap.swapout_pages,
        st.swap.swapin_file_pages,
        st.swap.swapin_cache_folios,
        st.swap.clean_dropped_pages,
        st.swap.zero_dropped_pages,
        st.swap.write_errors,
        st.swap.direct_reclaims,
        st.folios_split,
        st.migration,
    );
    let f = &st.faults;
    eprintln!(
        "faults: unbacked restored {}, from slot {}, poisoned {}; fallback copies {} (failed {})",
        f.unbacked_restored,
        f.unbacked_from_slot,
        f.unbacked_poisoned,
        f.fallback_copy_pages,
        f.fallback_failed_pages
    );
    assert_eq!(f.unbacked_poisoned, 0, "a page's data was lost");
    assert_eq!(
        (st.swap.read_errors, st.swap.poisoned_pages),
        (0, 0),
        "no read fails"
    );
    // The premise: every kind of operation ran, and memory was tight.
    for k in [
        "vcpu writes",
        "discards",
        "pins",
        "relocations: to aligned",
        "migrated folios",
        "reclaims",
        "compactions",
        "budget changes",
        "limit changes",
        "VMs created and destroyed",
    ] {
        assert!(counts.get(k).copied().unwrap_or(0) > 0, "no {k}");
    }
    assert!(st.swap.swapin_file_pages > 0 && st.swap.swapout_pages > 0);

    main.enter("settle with the VMs alive", 0);
    settle_and_check(&mm);
    for vm in [a, b] {
        drop(vm.backend.lock().unwrap().take());
        mm.destroy_vm(vm.id).unwrap();
    }
    main.enter("settle after the VMs went", 0);
    settle_and_check(&mm);
    main.leave();
    done.store(true, SeqCst);
    dog.join().unwrap();
    let st = mm.stats();
    assert_eq!(st.free_bytes, st.budget_bytes, "all memory back: {st:#?}");
    assert_eq!(st.swap_device.used_bytes, 0, "no swap slot leaked");
    assert_eq!(st.pool_stranded_pages, 0, "no stranded record left");
    assert_eq!(st.pool_stale_pages, 0, "no stale pool copy left");
    eprintln!("total {:?}", t0.elapsed());
}
