//! Fault injection into the steps of migration, collapse and relocation
//! (and one swap-out state), so that every undo path can be driven by a test (the swap file has its
//! own injection in [`crate::swap_file`]). Also into the system calls that
//! drop pool pages and install them into a guest, whose failures this
//! host never shows, so that the paths that must keep old data from
//! reaching another guest can be driven too.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Mutex;

/// A step that can be made to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultPoint {
    /// Migration/collapse: allocating the target folio.
    MigrateAlloc,
    /// Migration/collapse: unmapping the source (entries → `Migration`).
    MigrateUnmap,
    /// Migration/collapse: copying the contents.
    MigrateCopy,
    /// Migration/collapse: mapping the target.
    MigrateRemap,
    /// Relocation: mapping and registering the new host range.
    RelocatePrepare,
    /// Relocation: the VMM's memslot switch (the callback is not called).
    RelocateSwitch,
    /// Relocation: moving one 2 MiB table to the new range.
    RelocateMove,
    /// Relocation: after every table moved, before the old range goes.
    RelocateCommit,
    /// Swap-out: a folio whose write succeeded stays in the swap cache,
    /// unmapped and unlocked, as when a refault is waiting for it (not a
    /// failure: it drives the paths that meet such a folio; the next fault
    /// on its slots maps it from the cache, and a discard or teardown that
    /// drops the last entry naming its slots frees it).
    SwapKeepCache,
    /// Deferred split: a pass of the worker leaves the queue alone (not a
    /// failure: a partially discarded large folio stays whole and queued,
    /// which drives the paths that meet one before its split).
    SplitDefer,
    /// Dropping pool pages (`MADV_DONTNEED` through [`crate::pool::Pool`]:
    /// a stale pool copy after a `COPY` fallback, a batch of the zap queue,
    /// an offline block) reports an error and the pages stay as they were.
    PoolDrop,
    /// Installing pool pages into a guest (`fault::move_in`): the
    /// `UFFDIO_MOVE` is refused, as with an errno the fault path does not
    /// retry, so the page falls back to `UFFDIO_COPY` (the kernel is not
    /// called; nothing moved).
    PoolMoveRefused,
    /// Installing pool pages into a guest (`fault::move_in`): the first
    /// guest page of the `UFFDIO_MOVE` is populated first (with the zero
    /// page, `UFFDIO_ZEROPAGE`), as if something had filled it behind its
    /// entry, so the kernel fails the move with `EEXIST`.
    GuestPopulated,
    /// Installing pool pages into a guest (`fault::fallback_page`): the
    /// `UFFDIO_COPY` that serves a page whose `UFFDIO_MOVE` was refused
    /// fails with `ENOMEM` (the kernel is not called), so the page's data
    /// stays in its folio's pool range behind a `Present` entry.
    FallbackCopyFails,
}

/// Armed fault points: each fails its next `count` passes after `skip`
/// successful ones.
#[derive(Debug, Default)]
pub(crate) struct Injector {
    plans: Mutex<Vec<InjectPlan>>,
    /// Whether any plan is set (read without the lock on every pass).
    armed: AtomicBool,
}

/// One armed fault point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InjectPlan {
    /// Where.
    pub point: FaultPoint,
    /// Passes that succeed first.
    pub skip: u32,
    /// Passes that fail after those.
    pub count: u32,
}

impl Injector {
    /// Replace the armed plans (empty: disarm).
    pub fn set(&self, plans: Vec<InjectPlan>) {
        let mut p = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        self.armed.store(!plans.is_empty(), Relaxed);
        *p = plans;
    }

    /// Whether this pass through `point` must fail.
    pub fn hit(&self, point: FaultPoint) -> bool {
        if !self.armed.load(Relaxed) {
            return false;
        }
        let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        let Some(p) = plans.iter_mut().find(|p| p.point == point && p.count > 0) else {
            return false;
        };
        if p.skip > 0 {
            p.skip -= 1;
            return false;
        }
        p.count -= 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fails_after_skip_for_count_passes() {
        let i = Injector::default();
        i.set(vec![InjectPlan {
            point: FaultPoint::MigrateCopy,
            skip: 1,
            count: 2,
        }]);
        let got: Vec<bool> = (0..5).map(|_| i.hit(FaultPoint::MigrateCopy)).collect();
        assert_eq!(got, [false, true, true, false, false]);
        assert!(!i.hit(FaultPoint::MigrateUnmap));
    }
}
