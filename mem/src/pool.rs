//! The pool: the host memory that guests get.
//!
//! One private anonymous mapping of the budget size, 2 MiB aligned and
//! `MADV_HUGEPAGE`, registered on the manager's userfaultfd so that it can be
//! a `UFFDIO_MOVE` destination (pages move back into it on discard).
//!
//! It is registered in WP mode only, never MISSING: the pre-zeroing worker
//! populates holes with `MADV_POPULATE_WRITE`, and those faults must be
//! served by the kernel (as THPs), not by our own handlers. We never
//! write-protect a pool page, so the WP registration never raises a fault.

use crate::anon::{AnonError, AnonMapping};
use crate::buddy::BlockState;
use crate::sys;
use crate::types::{HostAddr, Order, PoolOffset, PAGE_SIZE};
use std::io;

/// The pool mapping.
#[derive(Debug)]
pub struct Pool {
    map: AnonMapping,
    nr_pages: u64,
}

impl Pool {
    /// Map a pool of `bytes` (rounded down to pages).
    ///
    /// # Errors
    /// [`AnonError::Mmap`] if the host refuses the memory.
    pub fn new(bytes: u64) -> Result<Pool, AnonError> {
        let nr_pages = bytes / PAGE_SIZE;
        let map = AnonMapping::new(nr_pages * PAGE_SIZE)?;
        Ok(Pool { map, nr_pages })
    }

    /// Pool size in pages.
    pub fn nr_pages(&self) -> u64 {
        self.nr_pages
    }

    /// Host address of the whole mapping.
    pub fn base(&self) -> HostAddr {
        self.map.host_addr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the pool is empty.
    pub fn is_empty(&self) -> bool {
        self.nr_pages == 0
    }

    /// Host address of pool offset `off`.
    pub fn host_addr(&self, off: PoolOffset) -> HostAddr {
        debug_assert!(off.pfn() < self.nr_pages);
        self.map.host_addr().add(off.0)
    }

    /// Make the free block at `off` `Ready`: populated, zero, and for order 9
    /// one THP. Runs on the pre-zeroing worker only.
    ///
    /// Returns whether an order-9 block is known to be one THP (collapse can
    /// fail under host memory pressure; the block is still zero then).
    ///
    /// # Errors
    /// The errno of populating the range (then the block stays unprepared).
    ///
    /// # Context
    /// The block is isolated: taken from the buddy allocator, owned by the
    /// worker, mapped by no guest. No locks held.
    pub fn prepare(&self, off: PoolOffset, order: Order, state: BlockState) -> io::Result<bool> {
        let addr = self.host_addr(off).raw();
        let len = order.bytes() as usize;
        if order == Order::PMD {
            // What the block holds does not matter, only that it ends up
            // zero and one THP: drop the range (its PTE table goes with it,
            // CONFIG_PT_RECLAIM) and fault in a fresh THP, which the kernel
            // zeroes. Cheaper than filling holes, zeroing and collapsing
            // (a 2 MiB copy), and it takes the mmap lock only for reading,
            // where MADV_COLLAPSE takes it for writing and stalls every
            // fault and madvise of the process meanwhile.
            sys::dontneed(addr, len)?;
            sys::populate_write(addr, len)?;
            // A no-op on the THP just faulted in (the range is PMD-mapped,
            // the kernel only looks); when the kernel fell back to small
            // pages (no free THP on the host) it tries to collapse them. The
            // block is zero either way.
            return Ok(sys::collapse(addr, len).is_ok());
        }
        // Fill holes with zeroed pages; populated pages are left alone.
        sys::populate_write(addr, len)?;
        if state == BlockState::NeedsZero {
            // SAFETY: the block is isolated (see # Context): no guest maps it
            // and no Rust reference points into it, and populate_write just
            // made every page present and writable.
            unsafe { std::ptr::write_bytes(addr as *mut u8, 0, len) };
        }
        Ok(false)
    }

    /// The bytes of `nr` pool pages at `off`, for swap I/O.
    ///
    /// # Safety
    /// The caller owns the range for the lifetime of the slice: it belongs
    /// to a locked folio whose pages are not mapped into any guest (they
    /// sit in the pool), and no other slice of it exists.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn pages_mut(&self, off: PoolOffset, nr: u64) -> &mut [u8] {
        debug_assert!(off.pfn() + nr <= self.nr_pages);
        // SAFETY: in bounds of the live mapping (asserted); exclusivity is
        // the caller's contract.
        unsafe {
            std::slice::from_raw_parts_mut(self.host_addr(off).as_ptr(), (nr * PAGE_SIZE) as usize)
        }
    }

    /// Drop the pages of a pool range (after a COPY fallback left them here
    /// while the folio's data now lives in the guest).
    ///
    /// # Errors
    /// The errno of `MADV_DONTNEED`.
    pub fn drop_pages(&self, off: PoolOffset, nr_pages: u64) -> io::Result<()> {
        sys::dontneed(self.host_addr(off).raw(), (nr_pages * PAGE_SIZE) as usize)
    }
}
