//! Region relocation: move a guest region's host backing to a new host
//! range while the guest runs (DESIGN §4.9). The uses: re-align a region so
//! that its 2 MiB folios can be PMD-mapped, merge two adjacent regions into
//! one memslot, grow a region.
//!
//! # Switch, then pull
//! 1. *Prepare*: map the new range, register it MISSING on the userfaultfd,
//!    and create its region with every 2 MiB table marked *pending*: its
//!    entries are still in a source region ([`PullSource`]).
//! 2. *Switch*: the new region becomes the VM's, the sources are retired,
//!    and the VMM's callback points the KVM memslot (and anything else that
//!    addresses guest memory) at the new range. This is the only pause of
//!    the vCPUs, and it does not depend on the region's size.
//! 3. *Pull*: every table moves, one at a time, by this thread, or first by
//!    a fault on it (the fault path pulls a pending table before serving
//!    it). A pull takes the new table's lock, then the source table's lock
//!    (the one place two page-table locks nest: destination, then source),
//!    trylocks every folio mapped there and every swap-cache folio of its
//!    swap entries, moves the present pages with `UFFDIO_MOVE`, rewrites
//!    those folios' rmap (region and index), re-poisons poisoned pages, and
//!    moves the whole table of entries (PMD-level entries stay one entry).
//!    Swap entries, `Zero` and sampled-out entries move as they are. A
//!    `Migration` or `SwapinMarker` entry, or a folio lock held elsewhere,
//!    makes the pull drop every lock and sleep on that folio's lock, then
//!    start the table again. A pinned folio fails the relocation. An entry
//!    `Present` without its host page, which `UFFDIO_MOVE` refuses
//!    (`ENOENT`) however often asked, is repaired first, as its fault would
//!    repair it (`fault::restore_unbacked`).
//! 4. *Commit*: the sources are unregistered and unmapped. If they were not
//!    2 MiB aligned, their 2 MiB folios arrived PTE-mapped; each is migrated
//!    into a fresh THP block so it moves in as one PMD.
//!
//! # Undo
//! A failure before the switch drops the new region. After it, the moved
//! tables go back: the new region's pending tables are closed, every
//! source gets a [`PullSource`] naming the tables now in the new region,
//! the callback switches back, and the sources pull those tables back the
//! same way. Every step is tested with injected failures.

use crate::anon::{AnonError, AnonMapping, HUGE_PAGE_SIZE};
use crate::inject::FaultPoint;
use crate::manager::Inner;
use crate::pte::{Pte, PteState, PtlGuard, PTRS_PER_TABLE};
use crate::sys;
use crate::types::{FolioId, GuestAddress, PageIndex, SwapSlot, VmId, PAGE_SIZE};
use crate::vm::{log_error, Region, RegionState, VmState};
use crate::RamRegion;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Instant;

/// What a relocation does to the region holding its guest address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelocateOp {
    /// Move it to a fresh 2 MiB-aligned host range of the same size.
    ToAligned,
    /// Merge it with the adjacent region holding this guest address into
    /// one region (one memslot).
    MergeWith(GuestAddress),
    /// Move it to a larger host range (the tail is unpopulated memory).
    Grow(u64),
}

/// Errors from [`crate::MemoryManager::relocate`]. Nothing changed when
/// one is returned (a failure after the switch was undone).
#[derive(Debug, thiserror::Error)]
pub enum RelocateError {
    /// No VM has this id.
    #[error("no VM {0:?}")]
    NoSuchVm(VmId),
    /// No live region holds this guest address.
    #[error("no guest RAM region holds guest address {0:#x}")]
    NoSuchRegion(u64),
    /// Another relocation of this VM is running.
    #[error("a relocation of this VM is already running")]
    Busy,
    /// The request cannot be met (sizes, adjacency, alignment).
    #[error("cannot relocate: {0}")]
    BadRequest(String),
    /// The new host range could not be mapped.
    #[error("cannot map the new host range")]
    Map(#[source] AnonError),
    /// The new host range could not be registered on the userfaultfd.
    #[error("cannot register the new host range on userfaultfd")]
    Register(#[source] std::io::Error),
    /// The VMM's memslot switch failed.
    #[error("memslot switch failed: {0}")]
    Switch(String),
    /// A folio of the region is pinned for device I/O.
    #[error("a folio at guest page {0} is pinned for device I/O")]
    Pinned(u64),
    /// An undo met the grown tail's page at this index before it was
    /// discarded (transient: a fault waits and tries again).
    #[error("page {0} of a grown tail is still in use")]
    TailInUse(u64),
    /// `UFFDIO_MOVE` refused to move pages.
    #[error("moving guest pages failed: errno {0}")]
    Move(i32),
    /// An injected failure at this step.
    #[error("injected failure at {0:?}")]
    Injected(FaultPoint),
    /// Undoing a failed relocation failed as well: the VM's memory is
    /// split between two host ranges and the VM must be stopped.
    #[error("relocation failed ({0}) and could not be undone; stop the VM")]
    UndoFailed(String),
}

/// The regions the VMM must switch its memslots between.
pub struct RelocateSwitch<'a> {
    /// The regions the VM uses now (remove their memslots).
    pub old: Vec<RamRegion>,
    /// The regions it uses from now on (add memslots for them).
    pub new: Vec<RamRegion>,
    /// Whether this switch undoes a failed relocation.
    pub undo: bool,
    /// Makes `new` the regions found by guest address; runs once.
    make_live: &'a (dyn Fn() + Sync),
}

impl RelocateSwitch<'_> {
    /// Make the new regions the ones the manager finds by guest address
    /// (for pins and discards), and the old ones retired.
    ///
    /// Call it with the memslots switched and the vCPUs paused, while no
    /// device can start a request, and before the devices address the new
    /// ranges: a device pins a page by guest address and then accesses it
    /// through its own view of guest memory, and both must name the same
    /// region. (Pinning the old region's page and then writing through the
    /// new range faults on a table the pin keeps from moving: a deadlock.)
    /// If the switch callback does not call it, the manager does when the
    /// callback returns, which is right for a VMM whose devices do not pin.
    /// Once it is called the callback must not fail: the new regions are
    /// in use.
    pub fn make_live(&self) {
        (self.make_live)()
    }
}

impl std::fmt::Debug for RelocateSwitch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelocateSwitch")
            .field("old", &self.old)
            .field("new", &self.new)
            .field("undo", &self.undo)
            .finish_non_exhaustive()
    }
}

/// What a relocation did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelocateReport {
    /// The regions before.
    pub old: Vec<RamRegion>,
    /// The region after.
    pub new: Option<RamRegion>,
    /// Time inside the VMM's switch callback, ns (the vCPU pause).
    pub switch_ns: u64,
    /// 2 MiB tables moved.
    pub tables: u64,
    /// Of those, pulled first by a fault.
    pub pulled_by_faults: u64,
    /// Bytes of present guest pages moved.
    pub moved_bytes: u64,
    /// 2 MiB folios migrated into THP blocks to be PMD-mapped.
    pub remapped_huge: u64,
    /// Wall time, ns.
    pub elapsed_ns: u64,
}

/// Source regions with their table shift (see [`PullSource`]).
type Sources = Vec<(Arc<Region>, i64)>;

/// Where a region's pending tables still are.
#[derive(Debug)]
pub(crate) struct PullSource {
    /// Source regions and their table shift: table `t` of the destination
    /// is table `t - shift` of the source.
    sources: Vec<(Arc<Region>, i64)>,
    /// Per destination table: still in the source.
    pending: Box<[AtomicBool]>,
    /// Tables pulled by faults.
    by_faults: std::sync::atomic::AtomicU64,
}

impl PullSource {
    fn new(
        sources: Vec<(Arc<Region>, i64)>,
        nr_tables: u64,
        pending: impl Fn(u64) -> bool,
    ) -> Self {
        PullSource {
            sources,
            pending: (0..nr_tables)
                .map(|t| AtomicBool::new(pending(t)))
                .collect(),
            by_faults: Default::default(),
        }
    }

    fn source_of(&self, t: u64) -> Option<(&Arc<Region>, u64)> {
        self.sources.iter().find_map(|(r, shift)| {
            let st = t as i64 - shift;
            (st >= 0 && (st as u64) < r.pt.nr_tables()).then_some((r, st as u64))
        })
    }

    fn is_pending(&self, t: u64) -> bool {
        self.pending.get(t as usize).is_some_and(|p| p.load(SeqCst))
    }
}

/// The region whose table holds the entry of guest page `gpa` now: during
/// a relocation the entries are in the source until a pull moves them,
/// whichever region the vCPUs use. Operations by guest address (discard)
/// work on the entries where they are.
pub(crate) fn table_home(
    inner: &Inner,
    vm: &VmState,
    gpa: GuestAddress,
) -> Option<(Arc<Region>, PageIndex)> {
    // A pull may move the table between two looks (pending in one region,
    // then moved out of the other): look again; every pull ends. A table
    // still pending in a live destination is pulled here rather than
    // waited for, as a fault would.
    for _ in 0..1000 {
        let mut holders = 0;
        let mut to_pull = None;
        let home = vm.all_regions().into_iter().find_map(|r| {
            let idx = r.page_of_guest(gpa)?;
            holders += 1;
            // Pending changes only under the destination's table lock.
            let ptl = r.pt.lock(idx);
            let pending = r
                .pull_source()
                .is_some_and(|p| p.is_pending(idx.0 / PTRS_PER_TABLE));
            if pending && r.state() == RegionState::Live {
                to_pull = Some((r.clone(), idx));
            }
            (!pending && !ptl.is_moved()).then_some((r.clone(), idx))
        });
        if home.is_some() || holders == 0 {
            return home;
        }
        match to_pull {
            Some((r, idx)) => _ = ensure_pulled(inner, &r, idx),
            None => std::thread::yield_now(),
        }
    }
    None
}

/// Whether the table holding `idx` of `region` is still in a source.
pub(crate) fn table_pending(region: &Region, idx: PageIndex) -> bool {
    region
        .pull_source()
        .is_some_and(|p| p.is_pending(idx.0 / PTRS_PER_TABLE))
}

/// Pull the table holding `idx` into `region` if it is still pending.
/// Called by the fault path, discard and migration before they read it.
///
/// # Context
/// No locks held.
pub(crate) fn ensure_pulled(inner: &Inner, region: &Region, idx: PageIndex) -> bool {
    let Some(p) = region.pull_source() else {
        return true;
    };
    let t = idx.0 / PTRS_PER_TABLE;
    if !p.is_pending(t) {
        return true;
    }
    // Only a live region pulls: before the switch the vCPUs still use the
    // source, and a table pulled then leaves them faulting on a moved
    // table for ever (woken as `Dead`) while the switch waits for them. A
    // fault can reach a region that is not live yet: a message queued for
    // a range that was unmapped since and is mapped again for the new
    // region, read late; or a vCPU's, between the switch and the region
    // going live. Either waits (the fault is parked and retried): the
    // table must not be served before its entries arrive.
    if region.state() != RegionState::Live {
        return false;
    }
    let pulled = pull_table(inner, region, &p, t, false);
    if pulled.is_err() {
        inner.workers.relocate_pulls_blocked.fetch_add(1, Relaxed);
    }
    match pulled {
        Ok(moved) => {
            if moved {
                p.by_faults.fetch_add(1, Relaxed);
            }
            true
        }
        // The undo discards it, then the fault (parked) pulls.
        Err(RelocateError::TailInUse(_)) => false,
        // Transient, and not ours to report: the relocation fails on it
        // (and is undone), or the undo waits for the unpin. Tried again by
        // the fault when it is retried, or by a pin once woken
        // (`wait_pulled`); logged, it was one line per try.
        Err(RelocateError::Pinned(_)) => false,
        Err(e) => {
            log_error(&format!("pull of table {t} on a fault: {e}"));
            false
        }
    }
}

/// How long [`wait_pulled`] sleeps at most: the waiter is woken when it
/// can go on ([`Inner::note_unpin`], [`Inner::note_pull`]); this only
/// bounds a wake-up missed (and lets the caller look at its page again).
const PULL_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// [`ensure_pulled`] for a thread that may sleep (a device's pin): while
/// the pull cannot go on (another pin holds a folio of the table in the
/// source, or an undo has not discarded a grown tail yet), sleep until a
/// pin drops or the relocation moves on (a table pulled, the relocation
/// undone), then try again; at most [`PULL_WAIT`]. Returns whether the
/// table is in `region` (or no longer pending there: look at it again).
///
/// # Context
/// No locks held.
pub(crate) fn wait_pulled(inner: &Inner, region: &Region, idx: PageIndex) -> bool {
    inner
        .wait_unpin(PULL_WAIT, || {
            ensure_pulled(inner, region, idx).then_some(())
        })
        .is_some()
}

/// Pull table `t` into `dst` if it is still pending. Returns whether it
/// moved it (then the threads waiting for it are woken).
///
/// # Context
/// No locks held.
fn pull_table(
    inner: &Inner,
    dst: &Region,
    p: &PullSource,
    t: u64,
    inject: bool,
) -> Result<bool, RelocateError> {
    let pulled = pull_table_locked(inner, dst, p, t, inject);
    if let Ok(true) = pulled {
        // With every lock of the pull dropped.
        inner.note_pull();
    }
    pulled
}

/// [`pull_table`] itself.
fn pull_table_locked(
    inner: &Inner,
    dst: &Region,
    p: &PullSource,
    t: u64,
    inject: bool,
) -> Result<bool, RelocateError> {
    loop {
        let first = PageIndex(t * PTRS_PER_TABLE);
        let mut dptl = dst.pt.lock(first);
        if !p.is_pending(t) {
            return Ok(false);
        }
        let Some((src, st)) = p.source_of(t) else {
            p.pending[t as usize].store(false, SeqCst);
            return Ok(false);
        };
        let sfirst = PageIndex(st * PTRS_PER_TABLE);
        let mut sptl = src.pt.lock(sfirst);
        // The shorter of the two: a grow's last source table is partial
        // (its undo pulls back only what the source has; `discard_tail`
        // dropped the rest).
        let n = (sptl.end().0 - sfirst.0).min(dptl.end().0 - first.0);
        // The table is taken whole, so it must fit: entries past the
        // destination's end (a grown tail the undo has not discarded yet)
        // would be carried along, out of reach.
        if let Some(k) =
            (n..sptl.end().0 - sfirst.0).find(|&k| sptl.pte(sfirst.forward(k)) != Pte::NONE)
        {
            return Err(RelocateError::TailInUse(sfirst.0 + k));
        }
        repair_unbacked(inner, src, &mut sptl, sfirst, n);
        // Dropped last: references outlive the folio locks below.
        let mut refs = Refs(inner, Vec::new());
        let mut locks = Vec::new();
        let mut fix: HashSet<FolioId> = HashSet::new();
        let mut wait = None;
        for k in 0..n {
            // The slot a folio was looked up by in the swap cache.
            let mut via = None;
            let folio = match sptl.pte(sfirst.forward(k)).state() {
                PteState::Present { folio, .. } | PteState::ProtNone { folio, .. } => {
                    let pinned = inner
                        .folios
                        .slab()
                        .get(folio)
                        .is_some_and(|f| f.pincount > 0);
                    if pinned {
                        return Err(RelocateError::Pinned(sfirst.0 + k));
                    }
                    folio
                }
                PteState::Migration { folio } | PteState::SwapinMarker { folio } => {
                    wait = Some(folio);
                    break;
                }
                PteState::Swap { slot } => {
                    // A folio in the swap cache for it (under writeback, or
                    // read and waiting for a refault) has its rmap here too.
                    // Referenced under the swap lock, as a lookup must.
                    let cached = inner.swap.as_ref().and_then(|d| {
                        let st = d.lock();
                        st.cache.lookup(slot).inspect(|&(g, _)| {
                            if !fix.contains(&g) {
                                inner.folios.slab().get_ref(g);
                                refs.1.push(g);
                            }
                        })
                    });
                    match cached {
                        Some((g, _)) => {
                            via = Some(slot);
                            g
                        }
                        None => continue,
                    }
                }
                _ => continue,
            };
            if fix.contains(&folio) {
                continue;
            }
            match inner.folios.trylock(folio) {
                // Migrated between the lookup and the lock
                // (`migrate_swapcache` put a new folio in the cache and
                // unlocked the old): the old one's rmap is no longer the
                // one to fix. Start over, and find the new one.
                Some(l) if via.is_some_and(|slot| !still_cached(inner, slot, folio)) => {
                    drop(l);
                    wait = Some(folio);
                    break;
                }
                Some(l) => {
                    // Its pages move by MOVE, which does not keep the write
                    // protection of a clean folio.
                    inner.clear_clean(folio);
                    locks.push(l);
                    fix.insert(folio);
                }
                None => {
                    wait = Some(folio);
                    break;
                }
            }
        }
        if let Some(f) = wait {
            // Sleep on the busy folio with no lock held, then start over.
            inner.folios.slab().get_ref(f);
            drop(locks);
            drop(sptl);
            drop(dptl);
            crate::swapin::wait_on_folio(inner, f);
            continue;
        }
        if inject && inner.inject.hit(FaultPoint::RelocateMove) {
            return Err(RelocateError::Injected(FaultPoint::RelocateMove));
        }
        // Move the present runs, host range to host range.
        let mut moved: Vec<(u64, u64)> = Vec::new();
        let mut poisoned: Vec<u64> = Vec::new();
        let mut k = 0;
        let mut err = None;
        while k < n {
            let present = |k: u64| {
                matches!(
                    sptl.pte(sfirst.forward(k)).state(),
                    PteState::Present { .. }
                )
            };
            if !present(k) {
                if sptl.pte(sfirst.forward(k)).state() == PteState::Poisoned {
                    poisoned.push(k);
                }
                k += 1;
                continue;
            }
            let run = (k..n).take_while(|&j| present(j)).count() as u64;
            if let Err((done, e)) = move_host(
                inner,
                dst.host_addr(first.forward(k)).raw(),
                src.host_addr(sfirst.forward(k)).raw(),
                run,
            ) {
                // The pages of the run that did move go back with the rest.
                if done > 0 {
                    moved.push((k, done));
                }
                err = Some(e);
                break;
            }
            moved.push((k, run));
            k += run;
        }
        if let Some(e) = err {
            for (k, run) in moved {
                let (to, from) = (
                    src.host_addr(sfirst.forward(k)).raw(),
                    dst.host_addr(first.forward(k)).raw(),
                );
                // Not copied back when this fails too: the vCPUs use the new
                // range since the switch and may be writing these pages, so
                // a copy could lose a write. Left where they are, a fault on
                // them repairs or poisons them (`fault::restore_unbacked`):
                // an error the guest sees, never stale data.
                if let Err((_, e)) = move_host(inner, to, from, run) {
                    log_error(&format!("relocation: moving pages back failed: errno {e}"));
                }
            }
            return Err(RelocateError::Move(e));
        }
        // Poison markers move only once nothing can fail: a pull that gave
        // up after zapping one would leave a `Poisoned` entry with no
        // marker, where the guest would fault for ever.
        for k in poisoned {
            let addr = dst.host_addr(first.forward(k)).raw();
            // SAFETY: a hole of the new region under its page-table lock
            // (`dptl`, the old one's under `sptl`) whose entry in the table
            // being pulled is `Poisoned`: its data is lost, and the marker
            // moves here from the old page.
            if let Err(e) = unsafe { inner.uffd.poison(addr, PAGE_SIZE) } {
                log_error(&format!("relocation: re-poison at {addr:#x}: {}", e.errno));
            }
            // SAFETY: the old region's poisoned page, whose table we hold
            // under its page-table lock; zapping drops only the marker (no
            // data, no Rust reference is there).
            let _ = unsafe {
                sys::dontneed(src.host_addr(sfirst.forward(k)).raw(), PAGE_SIZE as usize)
            };
        }
        {
            let mut slab = inner.folios.slab();
            for f in &fix {
                if let Some(r) = slab.get_mut(*f).and_then(|f| f.rmap.as_mut()) {
                    r.region = dst.index;
                    r.index = PageIndex(r.index.0 - sfirst.0 + first.0);
                }
            }
        }
        dptl.set_alive();
        dptl.put_table(sptl.take_table());
        sptl.set_moved();
        p.pending[t as usize].store(false, SeqCst);
        let bytes: u64 = moved_bytes(&dptl, first, n);
        inner.workers.relocate_moved_bytes.fetch_add(bytes, Relaxed);
        return Ok(true);
    }
}

/// Repair every entry of `[first, first + n)` that is `Present` without
/// its host page (`fault::restore_unbacked`), before a pull touches the
/// table: `UFFDIO_MOVE` refuses such a page (`ENOENT`) however often it is
/// asked, and a clean folio must still be clean for its repair to fall
/// back to its swap slot (the pull releases the slots of the folios it
/// moves). One read of the pagemap per table.
///
/// # Context
/// The page-table lock of the range is held (`ptl`); no folio lock.
fn repair_unbacked(
    inner: &Inner,
    region: &Region,
    ptl: &mut PtlGuard<'_>,
    first: PageIndex,
    n: u64,
) {
    let Ok(backed) = sys::has_pages(region.host_addr(first).raw(), n as usize) else {
        return;
    };
    for (k, backed) in (0..n).zip(backed) {
        let idx = first.forward(k);
        if let (false, PteState::Present { folio, subpage }) = (backed, ptl.pte(idx).state()) {
            // Which path finds these is evidence for their cause.
            log_error(&format!(
                "relocation pull: vm {:?} index {} is present without its host page",
                region.vm, idx.0
            ));
            _ = crate::fault::restore_unbacked(inner, region, ptl, idx, folio, u64::from(subpage));
        }
    }
}

/// References taken on swap-cache folios during a pull, put on drop.
struct Refs<'a>(&'a Inner, Vec<FolioId>);

impl Drop for Refs<'_> {
    fn drop(&mut self) {
        let freed: Vec<_> = {
            let mut slab = self.0.folios.slab();
            self.1.iter().filter_map(|&f| slab.put_refs(f, 1)).collect()
        };
        freed.into_iter().for_each(|f| self.0.free_range(f));
    }
}

fn moved_bytes(ptl: &crate::pte::PtlGuard<'_>, first: PageIndex, n: u64) -> u64 {
    (0..n)
        .filter(|&k| matches!(ptl.pte(first.forward(k)).state(), PteState::Present { .. }))
        .count() as u64
        * PAGE_SIZE
}

/// Move `nr` present guest pages from host `src` to host `dst` (both
/// registered guest ranges; `dst` empty there). On failure, returns the
/// pages that moved (from the start) and the errno.
fn move_host(inner: &Inner, dst: usize, src: usize, nr: u64) -> Result<(), (u64, i32)> {
    // SAFETY: both ranges are guest ranges of one VM whose entries we hold
    // under their page-table locks, with the folios mapped there locked: the
    // source pages are ours to move, the destination is a hole nobody else
    // installs into (its table is pending, and pending tables are installed
    // only by a pull holding this lock).
    unsafe { inner.uffd.move_retrying(dst, src, nr * PAGE_SIZE, 0, 16) }
        .map_err(|p| (p.done / PAGE_SIZE, p.errno))
}

/// The sources and the size of the new region for `op` on `r`.
fn plan(
    vm: &VmState,
    r: Arc<Region>,
    op: RelocateOp,
) -> Result<(Sources, GuestAddress, u64), RelocateError> {
    let bad = |s: String| Err(RelocateError::BadRequest(s));
    match op {
        RelocateOp::ToAligned => {
            let size = r.size();
            Ok((vec![(r.clone(), 0)], r.guest_base, size))
        }
        RelocateOp::Grow(size) => {
            if size <= r.size() || !size.is_multiple_of(PAGE_SIZE) {
                return bad(format!(
                    "new size {size:#x} must be a multiple of 4 KiB above the current {:#x}",
                    r.size()
                ));
            }
            // A region ends at or below u64::MAX, as `backend` requires.
            let Some(end) = r.guest_base.checked_add(size).map(|e| e.raw()) else {
                return bad(format!(
                    "growing the region at {:#x} to {size:#x} ends past the top of the guest address space",
                    r.guest_base.raw()
                ));
            };
            let clash = vm.regions().into_iter().any(|o| {
                o.index != r.index && o.guest_base.raw() < end && o.guest_base > r.guest_base
            });
            if clash {
                return bad(format!("growing to {size:#x} overlaps the next region"));
            }
            Ok((vec![(r.clone(), 0)], r.guest_base, size))
        }
        RelocateOp::MergeWith(other) => {
            let (o, _) = vm
                .region_of(other, 1)
                .ok_or(RelocateError::NoSuchRegion(other.raw()))?;
            if o.index == r.index {
                return bad("a region cannot merge with itself".into());
            }
            let (a, b) = match r.guest_base < o.guest_base {
                true => (r, o),
                false => (o, r),
            };
            if a.guest_base.raw() + a.size() != b.guest_base.raw() {
                return bad(format!(
                    "regions at {:#x} and {:#x} are not adjacent",
                    a.guest_base.raw(),
                    b.guest_base.raw()
                ));
            }
            if !a.size().is_multiple_of(HUGE_PAGE_SIZE) {
                return bad(format!(
                    "the lower region's size {:#x} is not a multiple of 2 MiB",
                    a.size()
                ));
            }
            let shift = (a.size() / HUGE_PAGE_SIZE) as i64;
            let size = a.size() + b.size();
            Ok((vec![(a.clone(), 0), (b, shift)], a.guest_base, size))
        }
    }
}

/// Run a relocation (module docs).
pub(crate) fn relocate(
    inner: &Inner,
    vm: &VmState,
    gpa: GuestAddress,
    op: RelocateOp,
    switch: &mut dyn FnMut(&RelocateSwitch) -> Result<(), String>,
    progress: crate::compact::Progress<'_>,
) -> Result<RelocateReport, RelocateError> {
    let t0 = Instant::now();
    let _one = vm.relocation.try_lock().map_err(|_| RelocateError::Busy)?;
    let bytes0 = inner.workers.relocate_moved_bytes.load(Relaxed);
    let (r, _) = vm
        .region_of(gpa, 1)
        .ok_or(RelocateError::NoSuchRegion(gpa.raw()))?;
    let (sources, base, size) = plan(vm, r, op)?;
    if sources.iter().any(|(s, _)| s.pull_source().is_some()) {
        return Err(RelocateError::Busy);
    }
    let old: Vec<RamRegion> = sources.iter().map(|(s, _)| s.ram_region()).collect();
    if inner.inject.hit(FaultPoint::RelocatePrepare) {
        return Err(RelocateError::Injected(FaultPoint::RelocatePrepare));
    }
    let map = AnonMapping::new(size).map_err(RelocateError::Map)?;
    let id = vm.next_region.fetch_add(1, Relaxed);
    let dst = Arc::new(Region::new(vm.id, id, base, map, vm.counters.clone()));
    dst.set_state(RegionState::New);
    let nt = dst.pt.nr_tables();
    let pull = Arc::new(PullSource::new(sources.clone(), nt, |_| true));
    dst.set_pull(Some(pull.clone()));
    inner.register_region(&dst);
    // SAFETY: the new region's mapping, made just above and reached by
    // nothing else until the switch; its faults are served from here on
    // (`register_region` made it findable first).
    let registered = unsafe {
        inner.uffd.register(
            dst.host_base().raw(),
            dst.size() as usize,
            crate::manager::GUEST_REGISTER_MODE,
        )
    };
    if let Err(e) = registered {
        inner.unregister_region(&dst);
        return Err(RelocateError::Register(e));
    }
    vm.add_region(dst.clone());
    let drop_dst = |dst: &Arc<Region>| {
        vm.remove_region(dst.index);
        inner.unregister_region(dst);
        let _ = inner
            .uffd
            .unregister(dst.host_base().raw(), dst.size() as usize);
    };

    // The switch: the only pause. From the moment the VMM makes the new
    // region live, lookups by guest address find it: nothing may pull a
    // table while the vCPUs or devices can still reach the old range.
    // (Faults on the new range, possible from the switch on, pull.)
    let live = std::sync::Once::new();
    let make_live = || {
        live.call_once(|| {
            let mut states = vec![(&*dst, RegionState::Live)];
            states.extend(sources.iter().map(|(s, _)| (&**s, RegionState::Retired)));
            vm.set_states(&states);
            // Faults parked on its pending tables meanwhile can pull them
            // now: the worker retries the parked ones, and faulting threads
            // waiting on their own (`FaultDelivery::Faulter`) wake.
            inner.kick_worker();
            inner.note_pull();
        })
    };
    let sw = RelocateSwitch {
        old: old.clone(),
        new: vec![dst.ram_region()],
        undo: false,
        make_live: &make_live,
    };
    let ts = Instant::now();
    let switched = match inner.inject.hit(FaultPoint::RelocateSwitch) {
        true => Err(format!(
            "injected failure at {:?}",
            FaultPoint::RelocateSwitch
        )),
        false => switch(&sw),
    };
    let switch_ns = ts.elapsed().as_nanos() as u64;
    if let Err(e) = switched {
        if live.is_completed() {
            // The VMM failed after making it live: it cannot be undone
            // safely from here (devices may address the new range).
            log_error(&format!(
                "relocation: the switch failed after going live: {e}"
            ));
        } else {
            dst.set_pull(None);
            drop_dst(&dst);
            return Err(RelocateError::Switch(e));
        }
    }
    sw.make_live();

    // Pull every table.
    let mut failure = None;
    progress(0, nt);
    for t in 0..nt {
        if let Err(e) = pull_table(inner, &dst, &pull, t, true) {
            failure = Some(e);
            break;
        }
        progress(t + 1, nt);
    }
    if failure.is_none() && inner.inject.hit(FaultPoint::RelocateCommit) {
        failure = Some(RelocateError::Injected(FaultPoint::RelocateCommit));
    }
    if let Some(e) = failure {
        undo(inner, vm, &dst, &sources, &pull, switch)
            .map_err(|u| RelocateError::UndoFailed(format!("{e}; undo: {u}")))?;
        drop_dst(&dst);
        inner.workers.relocations_undone.fetch_add(1, Relaxed);
        return Err(e);
    }

    // Commit.
    dst.set_pull(None);
    for (s, _) in &sources {
        vm.remove_region(s.index);
        inner.unregister_region(s);
        if let Err(e) = inner
            .uffd
            .unregister(s.host_base().raw(), s.size() as usize)
        {
            log_error(&format!("relocation: unregister old range: {e}"));
        }
    }
    let misaligned = sources
        .iter()
        .any(|(s, _)| !(s.host_base().raw() as u64).is_multiple_of(HUGE_PAGE_SIZE));
    let remapped_huge = match misaligned {
        true => remap_huge(inner, &dst),
        false => 0,
    };
    inner.workers.relocations.fetch_add(1, Relaxed);
    Ok(RelocateReport {
        old,
        new: Some(dst.ram_region()),
        switch_ns,
        tables: nt,
        pulled_by_faults: pull.by_faults.load(Relaxed),
        moved_bytes: inner.workers.relocate_moved_bytes.load(Relaxed) - bytes0,
        remapped_huge,
        elapsed_ns: t0.elapsed().as_nanos() as u64,
    })
}

/// How long an undo waits for a page of a table it must move back to be
/// unpinned (device pins last one request).
const UNDO_PIN_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Move the tables already in `dst` back to the sources, switching the
/// VMM back first (module docs).
fn undo(
    inner: &Inner,
    vm: &VmState,
    dst: &Arc<Region>,
    sources: &[(Arc<Region>, i64)],
    pull: &PullSource,
    switch: &mut dyn FnMut(&RelocateSwitch) -> Result<(), String>,
) -> Result<(), String> {
    // Switch back first: until then the vCPUs use the new range and may
    // still pull tables into it on their faults. Going live (in the pause,
    // if the VMM calls it there) closes the tables still pending (they
    // never left the sources) and sets the sources up to pull the others
    // back, before anything can reach the sources by guest address again.
    let back: std::sync::OnceLock<Vec<Arc<PullSource>>> = std::sync::OnceLock::new();
    let make_live = || {
        back.get_or_init(|| {
            // Closed as moved (their entries live elsewhere), not dead: an
            // operation by guest address (discard) that meets one looks the
            // home up again and finds the source, instead of taking the
            // empty table for it.
            for t in 0..dst.pt.nr_tables() {
                let mut ptl = dst.pt.lock(PageIndex(t * PTRS_PER_TABLE));
                if pull.is_pending(t) {
                    ptl.set_moved();
                    pull.pending[t as usize].store(false, SeqCst);
                }
            }
            dst.set_pull(None);
            let back = sources
                .iter()
                .map(|(s, shift)| {
                    let dst_has = |st: u64| {
                        let t = st as i64 + shift;
                        t >= 0 && (t as u64) < dst.pt.nr_tables() && {
                            let ptl = dst.pt.lock(PageIndex(t as u64 * PTRS_PER_TABLE));
                            !ptl.is_dead()
                        }
                    };
                    let p = Arc::new(PullSource::new(
                        vec![(dst.clone(), -shift)],
                        s.pt.nr_tables(),
                        dst_has,
                    ));
                    s.set_pull(Some(p.clone()));
                    p
                })
                .collect();
            let mut states: Vec<_> = sources
                .iter()
                .map(|(s, _)| (&**s, RegionState::Live))
                .collect();
            states.push((&**dst, RegionState::Retired));
            vm.set_states(&states);
            inner.kick_worker();
            // Pins waiting for a pending table of `dst` (`wait_pulled`)
            // look again: it is closed, their pages are in the sources.
            inner.note_pull();
            back
        });
    };
    let sw = RelocateSwitch {
        old: vec![dst.ram_region()],
        new: sources.iter().map(|(s, _)| s.ram_region()).collect(),
        undo: true,
        make_live: &make_live,
    };
    switch(&sw)?;
    sw.make_live();
    let back = back.get().expect("made live");
    // What the guest wrote in a grown tail since the switch: before the
    // pulls below, which leave a table's entries past the source's end
    // behind (and refuse while there are any).
    discard_tail(inner, dst, pull)?;
    for ((s, _), p) in sources.iter().zip(back) {
        for st in 0..s.pt.nr_tables() {
            // A device may have pinned a page of a table moved since the
            // switch: undo cannot refuse, so it waits for the unpin.
            let mut last = None;
            let pulled =
                inner.wait_unpin(UNDO_PIN_WAIT, || match pull_table(inner, s, p, st, false) {
                    Err(RelocateError::Pinned(at)) => {
                        last = Some(at);
                        None
                    }
                    r => Some(r),
                });
            match pulled {
                Some(r) => r.map_err(|e| e.to_string())?,
                None => {
                    return Err(format!(
                        "page {} stayed pinned for {UNDO_PIN_WAIT:?}",
                        last.unwrap_or_default()
                    ))
                }
            };
        }
        s.set_pull(None);
    }
    Ok(())
}

/// Discard the pages of `dst` that no source had (the tail of a failed
/// grow, in the source's last, partial table and in tables of their own):
/// what the guest wrote there since the switch has nowhere to go back to,
/// as memory unplugged from a guest. Moved back, such pages would land
/// outside the source (`EINVAL`); left, their folios would leak with the
/// region.
///
/// # Context
/// After the switch back: the vCPUs use the sources again.
fn discard_tail(inner: &Inner, dst: &Region, pull: &PullSource) -> Result<(), String> {
    let pages = dst.size() / PAGE_SIZE;
    for t in 0..dst.pt.nr_tables() {
        let first = PageIndex(t * PTRS_PER_TABLE);
        let end = PageIndex((first.0 + PTRS_PER_TABLE).min(pages));
        let had = pull.source_of(t).map_or(0, |(s, st)| {
            (s.size() / PAGE_SIZE - st * PTRS_PER_TABLE).min(PTRS_PER_TABLE)
        });
        // A table never pulled (closed as moved) took no fault: a fault
        // pulls its table before it installs anything.
        let never_pulled = dst.pt.lock(first).is_moved();
        if first.forward(had) >= end || never_pulled {
            continue;
        }
        // A device may hold a pin on a tail page for one request: wait for
        // it, as the pulls below do (the tail must be empty before its
        // table goes back).
        let emptied = inner.wait_unpin(UNDO_PIN_WAIT, || {
            let out = crate::discard::discard_pages(inner, dst, first.forward(had), end);
            (out.skipped_pinned_pages == 0).then_some(())
        });
        if emptied.is_none() {
            return Err(format!(
                "a page of the grown tail (table {t}) stayed pinned for {UNDO_PIN_WAIT:?}"
            ));
        }
    }
    Ok(())
}

/// Migrate every 2 MiB folio of `region` into a fresh THP block, so that
/// it is PMD-mapped at its (now aligned) host address. Returns how many.
fn remap_huge(inner: &Inner, region: &Region) -> u64 {
    let mut n = 0;
    for t in 0..region.pt.nr_tables() {
        let folio = {
            let ptl = region.pt.lock(PageIndex(t * PTRS_PER_TABLE));
            match ptl.is_huge() {
                true => ptl.pte(PageIndex(t * PTRS_PER_TABLE)).mapped_folio(),
                false => None,
            }
        };
        if let Some((f, _)) = folio {
            // A target that is one THP in the pool, or the copy is in vain.
            crate::compact::ensure_ready_pmd(inner, &mut Default::default());
            if crate::migrate::migrate_folio(inner, f).is_ok() {
                n += 1;
            }
        }
    }
    n
}

/// Whether the swap cache still holds `folio` for `slot`.
///
/// # Context
/// Takes the swap lock (under folio and page-table locks).
fn still_cached(inner: &Inner, slot: SwapSlot, folio: FolioId) -> bool {
    inner
        .swap
        .as_ref()
        .is_some_and(|d| d.lock().cache.lookup(slot).is_some_and(|(g, _)| g == folio))
}
