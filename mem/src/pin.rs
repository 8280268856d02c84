//! Pins for device emulation: a GUP-like `pin_user_pages()` over guest RAM.
//!
//! Pinning faults the range in from the calling thread (no userfaultfd
//! round trip), then takes a reference and a pin on every folio page, so
//! discard leaves the range alone and reclaim and migration will skip it.
//!
//! Access goes through the host mapping the folio is installed at. With the
//! MOVE design a mapped folio's pages live at the guest's host address and
//! its pool range is a hole, so the pinned guest mapping *is* where the
//! folio is: while pinned it stays present and accesses never fault.

use crate::fault::{fault_in, FaultOutcome};
use crate::folio::FolioFlags;
use crate::manager::Inner;
use crate::pte::PteState;
use crate::types::{FolioId, GuestAddress, HostAddr, PageIndex, VmId, PAGE_SIZE};
use crate::vm::{Region, RegionState, VmState};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Errors from [`crate::MemoryManager::pin`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PinError {
    /// No VM has this id.
    #[error("no VM {0:?}")]
    NoSuchVm(VmId),
    /// Zero length, or the range is not inside one guest RAM region.
    #[error("pin range {gpa:#x}+{len:#x} is not inside one guest RAM region")]
    OutOfRange {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// No memory became ready within `PIN_WAIT_LIMIT` (50 ms) to populate the
    /// range. Transient: the caller may try again later (a device puts its
    /// request back; see `devices::virtio::QueueState::Deferred`).
    #[error("no memory to populate the pinned range")]
    NoMemory,
    /// The VM is being torn down (or a relocation's pull of the range
    /// stayed held back by other pins for 30 s: the relocation could not
    /// be undone, and the VM is to be stopped).
    #[error("VM is being torn down")]
    Dead,
    /// A page of the range lost its swapped-out contents and is poisoned.
    #[error("a page of the range is poisoned (swapin failed)")]
    Poisoned,
}

/// A pinned guest range; unpinned on drop.
pub struct PinGuard {
    inner: Arc<Inner>,
    /// Keeps the VM (and so the mapping) alive while pinned.
    _vm: Arc<VmState>,
    region: Arc<Region>,
    host: HostAddr,
    len: u64,
    /// Pinned folio pages, as runs `(folio, pages)`.
    pins: Vec<(FolioId, u32)>,
}

impl std::fmt::Debug for PinGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinGuard")
            .field("host", &self.host)
            .field("len", &self.len)
            .finish()
    }
}

/// One wait of a pin for memory to become ready.
const PIN_WAIT: Duration = Duration::from_millis(10);
/// A pin gives up when it has waited this long for memory in all, over
/// all of its pages.
const PIN_WAIT_LIMIT: Duration = Duration::from_millis(50);
/// A pin gives up (`Dead`) when a relocation's pull of a page's table has
/// been held back by other pins this long: as long as an undo waits for a
/// pin before it fails and the VM must be stopped.
const PULL_WAIT_LIMIT: Duration = Duration::from_secs(30);

pub(crate) fn pin(
    inner: &Arc<Inner>,
    vm: Arc<VmState>,
    gpa: GuestAddress,
    len: u64,
) -> Result<PinGuard, PinError> {
    let mut tries = 0;
    // When the pin first found no memory.
    let mut short_since = None;
    loop {
        match pin_once(inner, vm.clone(), gpa, len, &mut short_since) {
            // A relocation moved the range under us (the old region's table
            // is gone, and the new region is the VM's as soon as the
            // relocation flips them): pin again where it is now.
            Err((PinError::Dead, Some(r))) if tries < 10_000 && r.state() != RegionState::New => {
                tries += 1;
                std::thread::yield_now();
            }
            r => return r.map_err(|(e, _)| e),
        }
    }
}

fn pin_once(
    inner: &Arc<Inner>,
    vm: Arc<VmState>,
    gpa: GuestAddress,
    len: u64,
    short_since: &mut Option<Instant>,
) -> Result<PinGuard, (PinError, Option<Arc<Region>>)> {
    let range = PinError::OutOfRange {
        gpa: gpa.raw(),
        len,
    };
    if len == 0 {
        return Err((range, None));
    }
    let (region, first) = vm.region_of(gpa, len).ok_or((range, None))?;
    let last = PageIndex::from_offset(first.to_offset() + (gpa.raw() % PAGE_SIZE) + len - 1);
    let mut guard = PinGuard {
        inner: inner.clone(),
        host: region.host_addr(first).add(gpa.raw() % PAGE_SIZE),
        len,
        pins: Vec::new(),
        region,
        _vm: vm,
    };
    let mut idx = first;
    while idx <= last {
        if let Err(e) = pin_page(
            &guard.inner,
            &guard.region,
            idx,
            &mut guard.pins,
            short_since,
        ) {
            let r = guard.region.clone();
            return Err((e, Some(r)));
        }
        idx = idx.forward(1);
    }
    Ok(guard)
}

/// Fault in (if needed) and pin page `idx`; `short_since` is when the
/// pin first found no memory, for [`PIN_WAIT_LIMIT`].
///
/// # Context
/// No locks held; takes the page-table lock, then the folio-table lock.
fn pin_page(
    inner: &Inner,
    region: &Region,
    idx: PageIndex,
    pins: &mut Vec<(FolioId, u32)>,
    short_since: &mut Option<Instant>,
) -> Result<(), PinError> {
    // When the pin first waited for a table pull held back by another pin.
    let mut held_back_since = None::<Instant>;
    loop {
        // A table a relocation has not pulled into this region yet: pull
        // it first (its entries are still in the source; a table an undo
        // pulls back is closed here until then, and would look dead). When
        // another pin holds the pull back, sleep until that pin drops or
        // the relocation moves on, instead of trying again at once: the
        // caller is the VMM's event loop.
        if crate::relocate::table_pending(region, idx)
            && !crate::relocate::wait_pulled(inner, region, idx)
        {
            let since = *held_back_since.get_or_insert_with(Instant::now);
            // Device pins last one request, and an undo gives up on a pin
            // after as long: the relocation could not be undone then, and
            // the VM is to be stopped.
            if since.elapsed() >= PULL_WAIT_LIMIT {
                return Err(PinError::Dead);
            }
            continue;
        }
        let ptl = region.pt.lock(idx);
        if ptl.is_dead() {
            return Err(PinError::Dead);
        }
        if let PteState::Present { folio, .. } = ptl.pte(idx).state() {
            let mut slab = inner.folios.slab();
            slab.get_ref(folio);
            let f = slab
                .get_mut(folio)
                .expect("present entry names a live folio");
            f.pincount += 1;
            f.flags.insert(FolioFlags::PINNED);
            // Counted per page, as the guard's drop uncounts them: a pin
            // that fails part-way drops what it pinned so far.
            region.counters.pinned_pages.fetch_add(1, Relaxed);
            match pins.last_mut() {
                Some((id, n)) if *id == folio => *n += 1,
                _ => pins.push((folio, 1)),
            }
            return Ok(());
        }
        drop(ptl);
        match fault_in(inner, region, idx, true) {
            FaultOutcome::Dead => return Err(PinError::Dead),
            FaultOutcome::NoMemory { oom } => {
                if oom && crate::vmscan::can_reclaim(inner) {
                    crate::vmscan::direct_reclaim(inner, region);
                }
                // Device threads may wait for the worker; handlers never do.
                // Briefly: the caller is the VMM's event loop, and a device
                // given `NoMemory` puts its request back and retries later
                // (see `devices::virtio::QueueState::Deferred`), rather than
                // hold every other device of every VM meanwhile.
                let first = short_since.is_none();
                let since = *short_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= PIN_WAIT_LIMIT {
                    return Err(PinError::NoMemory);
                }
                inner.wait_memory(PIN_WAIT, first);
            }
            FaultOutcome::Poisoned => return Err(PinError::Poisoned),
            FaultOutcome::Installed(_)
            | FaultOutcome::Raced
            | FaultOutcome::Refaulted
            | FaultOutcome::Retry
            | FaultOutcome::PullBlocked => {}
        }
    }
}

impl PinGuard {
    /// Host address of the first pinned byte.
    pub fn host_addr(&self) -> HostAddr {
        self.host
    }

    /// Pinned length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the pinned range is empty (never).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copy `buf.len()` bytes at `offset` out of the pinned range.
    ///
    /// # Panics
    /// If the read runs past the pinned range.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) {
        assert!(self.contains(offset, buf.len()), "read past the pin");
        // SAFETY: the range is inside the pinned guest range (checked just
        // above, without overflow), whose mapping stays mapped while `self`
        // holds its region (the region owns the mapping); guest memory is
        // shared with vCPUs, so it is copied, never borrowed as a slice.
        unsafe { std::ptr::copy(self.host.add(offset).as_ptr(), buf.as_mut_ptr(), buf.len()) }
    }

    /// Copy `data` into the pinned range at `offset`.
    ///
    /// # Panics
    /// If the write runs past the pinned range.
    pub fn write_at(&self, offset: u64, data: &[u8]) {
        assert!(self.contains(offset, data.len()), "write past the pin");
        // SAFETY: as in `read_at`; the pinned pages are present and
        // writable, and a pinned folio is never moved out.
        unsafe { std::ptr::copy(data.as_ptr(), self.host.add(offset).as_ptr(), data.len()) }
    }
}

impl PinGuard {
    /// Whether `[offset, offset + len)` lies inside the pinned range. An
    /// `offset` near `u64::MAX` must not wrap around to pass the check:
    /// the copies index host memory by it.
    fn contains(&self, offset: u64, len: usize) -> bool {
        offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= self.len)
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        let mut freed = Vec::new();
        let mut pages = 0i64;
        let (mut unpinned, mut queued) = (false, false);
        {
            let mut slab = self.inner.folios.slab();
            for &(id, n) in &self.pins {
                pages += n as i64;
                if let Some(f) = slab.get_mut(id) {
                    f.pincount -= n;
                    if f.pincount == 0 {
                        f.flags.remove(FolioFlags::PINNED);
                        unpinned = true;
                        // The split scan drops pinned folios from its
                        // queue (it cannot split them): a partly mapped
                        // one goes back now that it can be split.
                        queued |= crate::rmap::queue_if_partial(&mut slab, id);
                    }
                }
                freed.extend(slab.put_refs(id, n));
            }
        }
        if unpinned {
            self.inner.note_unpin();
        }
        if queued {
            self.inner.kick_worker();
        }
        for f in freed {
            self.inner.free_range(f);
        }
        self.region.counters.pinned_pages.fetch_sub(pages, Relaxed);
    }
}
