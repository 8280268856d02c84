//! Pool pages left holding a mapped folio's data because its install into
//! the guest failed.
//!
//! When `UFFDIO_MOVE` of a folio page into the guest is refused and the
//! `UFFDIO_COPY` fallback fails too (`fault::fallback_page`: `ENOMEM` when
//! the host is short of memory, for one), the page's data stays in the
//! folio's pool range while its entry says `Present`. Nothing is lost: the
//! guest's next access finds the host page absent and moves the pool page
//! in (`fault::restore_unbacked`). But a mapped folio's pool range is
//! taken for a hole: if the folio is freed before that access (the VM's
//! teardown, a discard, a migration), its range would go back to the
//! allocator as `NeedsPopulate`, whose preparation only fills holes
//! (`Pool::prepare`), and the next guest to get the block would read this
//! guest's data.
//!
//! So such a page is recorded here, and a freed range that holds one is
//! freed as `NeedsZero` ([`crate::manager::Inner::free_ranges`]), which
//! zeroes it before anyone gets it. Paths that move the folio's pages out
//! of the guest find the page already where a move-out puts it (the
//! `UFFDIO_MOVE` wrapper counts a page that is gone from the guest and
//! present in the pool as moved) and carry its data along: migration,
//! collapse and sampling copy or keep the pool page. Compaction's
//! re-labelling, which moves nothing and frees the old range, would lose
//! it, so it leaves a folio with a recorded page to be copied
//! (`migrate::relabel`). A record goes when its range is freed
//! or when the page is moved into the guest after all. A record that
//! outlives its page's data only costs one zeroing. A fresh folio's page
//! is recorded too: it holds no guest data, only zero, but its pool page
//! is the one the next access moves in, so it must not be re-labelled away.
//!
//! # Context
//! The lock is a leaf. Records are added and removed under the page-table
//! lock of the folio's mapping (which the install holds), or by the free of
//! the range, which no other path can reach at the same time.

use crate::buddy::BlockState;
use crate::folio::FreedRange;
use crate::types::PoolOffset;
use std::collections::BTreeSet;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;

/// The recorded pages.
#[derive(Debug, Default)]
pub(crate) struct StrandedPages {
    /// Pool offsets of stranded pages. Leaf lock.
    pages: Mutex<BTreeSet<PoolOffset>>,
    /// How many (read without the lock on every free).
    count: AtomicU64,
}

impl StrandedPages {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<PoolOffset>> {
        self.pages.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Record that the pool page at `off` holds guest data behind a
    /// `Present` entry.
    pub fn note(&self, off: PoolOffset) {
        let mut p = self.lock();
        if p.insert(off) {
            self.count.store(p.len() as u64, Relaxed);
        }
    }

    /// The page at `off` was moved into the guest: its pool page is a hole.
    pub fn forget(&self, off: PoolOffset) {
        if self.count.load(Relaxed) == 0 {
            return;
        }
        let mut p = self.lock();
        if p.remove(&off) {
            self.count.store(p.len() as u64, Relaxed);
        }
    }

    /// Whether a page of the `nr` pages at `off` is recorded.
    pub fn holds(&self, off: PoolOffset, nr: u64) -> bool {
        if self.count.load(Relaxed) == 0 {
            return false;
        }
        self.lock().range(off..off.subpage(nr)).next().is_some()
    }

    /// Pages recorded now.
    pub fn pages(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// The states to free `ranges` with: a range that holds a recorded page
    /// needs zeroing whatever its folio said, and its records go. `None`
    /// (the common case, one relaxed load) when nothing is recorded, so
    /// the ranges' own states stand.
    pub fn claim(&self, ranges: &[FreedRange]) -> Option<Vec<BlockState>> {
        if self.count.load(Relaxed) == 0 {
            return None;
        }
        let mut p = self.lock();
        let states = ranges
            .iter()
            .map(|f| {
                let end = f.pool.subpage(f.order.nr_pages());
                let inside: Vec<PoolOffset> = p.range(f.pool..end).copied().collect();
                if inside.is_empty() {
                    return f.state;
                }
                for off in inside {
                    p.remove(&off);
                }
                BlockState::NeedsZero
            })
            .collect();
        self.count.store(p.len() as u64, Relaxed);
        Some(states)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Order, PAGE_SIZE};

    fn range(page: u64, order: u8, state: BlockState) -> FreedRange {
        FreedRange {
            pool: PoolOffset(page * PAGE_SIZE),
            order: Order(order),
            state,
            clean_slot: None,
        }
    }

    #[test]
    fn a_range_holding_a_recorded_page_is_freed_as_needing_zero_once() {
        let s = StrandedPages::default();
        assert_eq!(s.claim(&[range(0, 2, BlockState::NeedsPopulate)]), None);
        s.note(PoolOffset(5 * PAGE_SIZE));
        s.note(PoolOffset(5 * PAGE_SIZE));
        s.note(PoolOffset(9 * PAGE_SIZE));
        assert_eq!(s.pages(), 2);
        let ranges = [
            range(0, 2, BlockState::NeedsPopulate),
            range(4, 2, BlockState::NeedsPopulate),
            range(8, 0, BlockState::Ready),
        ];
        assert_eq!(
            s.claim(&ranges),
            Some(vec![
                BlockState::NeedsPopulate,
                BlockState::NeedsZero,
                BlockState::Ready
            ])
        );
        assert_eq!(s.pages(), 1, "page 9 is outside every freed range");
        s.forget(PoolOffset(9 * PAGE_SIZE));
        assert_eq!(s.pages(), 0);
        assert_eq!(s.claim(&ranges), None);
    }
}
