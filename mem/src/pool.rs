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
use crate::inject::{FaultPoint, Injector};
use crate::sys;
use crate::types::{HostAddr, Order, PoolOffset, PAGE_SIZE};
use std::io;
use std::sync::Arc;

/// How [`Pool::drop_or_zero`] cleared a range.
#[derive(Debug)]
pub enum Cleared {
    /// The pages were dropped: the range is a hole.
    Dropped,
    /// The drop failed with this error; the pages were zeroed in place.
    Zeroed(io::Error),
}

/// The pool mapping.
#[derive(Debug)]
pub struct Pool {
    map: AnonMapping,
    nr_pages: u64,
    /// The manager's fault injection ([`FaultPoint::PoolDrop`] fails the
    /// drops here); shared with `Inner::inject`.
    inject: Arc<Injector>,
}

impl Pool {
    /// Map a pool of `bytes` (rounded down to pages).
    ///
    /// # Errors
    /// [`AnonError::Mmap`] if the host refuses the memory.
    pub fn new(bytes: u64) -> Result<Pool, AnonError> {
        let nr_pages = bytes / PAGE_SIZE;
        let map = AnonMapping::new(nr_pages * PAGE_SIZE)?;
        Ok(Pool {
            map,
            nr_pages,
            inject: Arc::default(),
        })
    }

    /// The fault injection this pool obeys, for the manager to share.
    pub(crate) fn injector(&self) -> &Arc<Injector> {
        &self.inject
    }

    /// An injected failure of a drop ([`FaultPoint::PoolDrop`]), if armed.
    fn injected_drop_failure(&self) -> io::Result<()> {
        match self.inject.hit(FaultPoint::PoolDrop) {
            true => Err(io::Error::other("injected MADV_DONTNEED failure")),
            false => Ok(()),
        }
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

    /// The host address of the pool range `[off, off + bytes)`, if it is
    /// page aligned and lies inside the mapping. Everything that hands a
    /// pool range to the kernel or writes it goes through this: an offset
    /// from a caller is not trusted to be in bounds.
    fn range(&self, off: PoolOffset, bytes: u64) -> io::Result<usize> {
        let end = off.0.checked_add(bytes);
        match end {
            Some(end) if off.0.is_multiple_of(PAGE_SIZE) && end <= self.nr_pages * PAGE_SIZE => {
                Ok(self.map.host_addr().add(off.0).raw())
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "pool range {:#x}+{bytes:#x} is not inside the pool ({:#x} bytes)",
                    off.0,
                    self.nr_pages * PAGE_SIZE
                ),
            )),
        }
    }

    /// Make the free block at `off` `Ready`: populated, zero, and for order 9
    /// one THP. Runs on the pre-zeroing worker only.
    ///
    /// Returns whether an order-9 block is known to be one THP (collapse can
    /// fail under host memory pressure; the block is still zero then).
    ///
    /// # Errors
    /// The errno of populating the range (then the block stays unprepared);
    /// [`io::ErrorKind::InvalidInput`] if the block is not inside the pool.
    ///
    /// # Context
    /// The block is isolated: taken from the buddy allocator, owned by the
    /// worker, mapped by no guest. No locks held.
    pub fn prepare(&self, off: PoolOffset, order: Order, state: BlockState) -> io::Result<bool> {
        let addr = self.range(off, order.bytes())?;
        let len = order.bytes() as usize;
        if order == Order::PMD {
            // What the block holds does not matter, only that it ends up
            // zero and one THP: drop the range (its PTE table goes with it,
            // CONFIG_PT_RECLAIM) and fault in a fresh THP, which the kernel
            // zeroes. Cheaper than filling holes, zeroing and collapsing
            // (a 2 MiB copy), and it takes the mmap lock only for reading,
            // where MADV_COLLAPSE takes it for writing and stalls every
            // fault and madvise of the process meanwhile.
            // SAFETY: a range of the pool mapping (checked above), private
            // anonymous memory that Rust code reaches only through
            // `pages_mut`, whose callers own their range alone; this block is
            // isolated (see # Context), so no such slice covers it.
            unsafe { sys::dontneed(addr, len)? };
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
            // SAFETY: `[addr, addr+len)` lies inside the pool mapping
            // (checked above) and populate_write just made every page present
            // and writable. No Rust reference points into it: pool memory is
            // borrowed only by `pages_mut`, whose callers own their range
            // alone, and this block is isolated (see # Context).
            unsafe { std::ptr::write_bytes(addr as *mut u8, 0, len) };
        }
        Ok(false)
    }

    /// The bytes of `nr` pool pages at `off`, for swap I/O.
    ///
    /// # Panics
    /// If the range is not inside the pool.
    ///
    /// # Safety
    /// The caller owns the range for the lifetime of the slice: it belongs
    /// to a locked folio whose pages are not mapped into any guest (they
    /// sit in the pool), no other slice of it exists, and nothing changes
    /// it meanwhile ([`Pool::prepare`], [`Pool::drop_pages`], a zap or a
    /// `UFFDIO_MOVE` into or out of it).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn pages_mut(&self, off: PoolOffset, nr: u64) -> &mut [u8] {
        let bytes = nr.checked_mul(PAGE_SIZE).expect("pool range overflows");
        let addr = self
            .range(off, bytes)
            .unwrap_or_else(|e| panic!("pages_mut: {e}"));
        // SAFETY: `[addr, addr+bytes)` lies inside the live pool mapping
        // (checked just above), which `&self` keeps mapped for the slice's
        // lifetime; exclusivity is the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, bytes as usize) }
    }

    /// Drop the pages of a pool range (after a COPY fallback left them here
    /// while the folio's data now lives in the guest).
    ///
    /// # Errors
    /// The errno of `MADV_DONTNEED`; [`io::ErrorKind::InvalidInput`] if the
    /// range is not inside the pool.
    pub fn drop_pages(&self, off: PoolOffset, nr_pages: u64) -> io::Result<()> {
        let bytes = nr_pages.saturating_mul(PAGE_SIZE);
        let addr = self.range(off, bytes)?;
        self.injected_drop_failure()?;
        // SAFETY: a range of the pool mapping (checked above), private
        // anonymous memory that Rust code reaches only through `pages_mut`,
        // whose callers own their range alone and let nothing drop it
        // meanwhile.
        unsafe { sys::dontneed(addr, bytes as usize) }
    }

    /// Make the pool range `[off, off + nr_pages)` hold no data: drop its
    /// pages, and where the drop fails, zero them in place with plain
    /// writes. For data that must not outlive a failed `MADV_DONTNEED`
    /// (a stale copy, or pages about to be freed as holding nothing): old
    /// guest data must never reach another guest, whatever the syscall
    /// does. Zeroed pages stay populated, so the range is then no hole: a
    /// later `MOVE` into it fails with `EEXIST` and moves less, which every
    /// `MOVE`-out handles (`vmscan::move_out`, `discard::move_back`); a
    /// free block's state says "zero where present" at worst, which holds.
    ///
    /// # Errors
    /// [`io::ErrorKind::InvalidInput`] if the range is not inside the pool
    /// (then nothing is done).
    ///
    /// # Context
    /// As [`Pool::drop_pages`]: the caller owns the range (its folio locked
    /// or new, its page-table lock held, or the block isolated) and no
    /// slice of it exists. Pool pages are never write-protected (see the
    /// module doc), so the writes raise no userfault. Zeroing is the
    /// pre-zeroing worker's job, not the fault path's; this runs only
    /// where `MADV_DONTNEED` failed.
    pub fn drop_or_zero(&self, off: PoolOffset, nr_pages: u64) -> io::Result<Cleared> {
        let bytes = nr_pages.saturating_mul(PAGE_SIZE);
        let addr = self.range(off, bytes)?;
        let Err(e) = self.drop_pages(off, nr_pages) else {
            return Ok(Cleared::Dropped);
        };
        // SAFETY: `[addr, addr+bytes)` lies inside the live pool mapping
        // (checked above): private anonymous memory, writable (a hole is
        // faulted in by the kernel: the pool is registered WP only, and its
        // pages are never write-protected). No Rust reference points into
        // it: pool memory is borrowed only by `pages_mut`, whose callers own
        // their range alone, and the caller owns this one (see # Context).
        unsafe { std::ptr::write_bytes(addr as *mut u8, 0, bytes as usize) };
        Ok(Cleared::Zeroed(e))
    }

    /// [`Pool::drop_pages`] for many ranges `(offset, pages)` at once, with
    /// one `process_madvise` (the zap queue's batches).
    ///
    /// # Errors
    /// As [`Pool::drop_pages`]; some ranges may have been dropped then.
    pub fn drop_ranges(&self, ranges: &[(PoolOffset, u64)]) -> io::Result<()> {
        let raw = ranges
            .iter()
            .map(|&(off, nr)| {
                let bytes = nr.saturating_mul(PAGE_SIZE);
                Ok((self.range(off, bytes)?, bytes as usize))
            })
            .collect::<io::Result<Vec<_>>>()?;
        self.injected_drop_failure()?;
        // SAFETY: ranges of the pool mapping (checked above), owned by the
        // caller as for `drop_pages`.
        unsafe { sys::dontneed_many(&raw) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safe call with a range outside the pool is refused, not carried
    /// out on whatever memory lies past the mapping: `prepare` zeroes and
    /// drops pages, `drop_pages` drops them.
    #[test]
    fn ranges_outside_the_pool_are_refused() {
        let pool = Pool::new(16 * PAGE_SIZE).unwrap();
        let past = PoolOffset(pool.len() as u64);
        let invalid = |r: io::Result<()>| r.is_err_and(|e| e.kind() == io::ErrorKind::InvalidInput);
        for state in [BlockState::NeedsZero, BlockState::NeedsPopulate] {
            assert!(invalid(pool.prepare(past, Order::BASE, state).map(drop)));
            assert!(invalid(
                pool.prepare(PoolOffset(!4095), Order(4), state).map(drop)
            ));
        }
        // Straddling the end, and a page count whose bytes overflow.
        assert!(invalid(
            pool.prepare(PoolOffset(8 * PAGE_SIZE), Order(4), BlockState::NeedsZero)
                .map(drop)
        ));
        assert!(invalid(pool.drop_pages(past, 1)));
        assert!(invalid(pool.drop_pages(PoolOffset(15 * PAGE_SIZE), 2)));
        assert!(invalid(pool.drop_pages(PoolOffset(0), u64::MAX / 2)));
        assert!(invalid(pool.drop_pages(PoolOffset(1), 1)));
        // In bounds they work.
        pool.prepare(PoolOffset(0), Order(4), BlockState::NeedsZero)
            .unwrap();
        pool.drop_pages(PoolOffset(15 * PAGE_SIZE), 1).unwrap();
    }

    #[test]
    #[should_panic(expected = "not inside the pool")]
    fn pages_mut_past_the_pool_panics() {
        let pool = Pool::new(4 * PAGE_SIZE).unwrap();
        // SAFETY: nothing else uses this pool; the call must panic before
        // making a slice.
        let _ = unsafe { pool.pages_mut(PoolOffset(2 * PAGE_SIZE), 3) };
    }
}
