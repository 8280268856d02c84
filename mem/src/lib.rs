//! foliovm guest memory.
//!
//! The VMM sees guest RAM only through [`GuestMemoryBackend`]: a list of
//! host mappings, one per guest RAM region. Two backends exist:
//!
//! * [`anon::AnonBackend`] — plain private anonymous memory, THP-advised, with
//!   the kernel serving faults. This is the baseline (`--mem-backend anon`).
//! * [`FolioBackend`], made by the [`MemoryManager`] — foliovm's own mini-mm,
//!   which owns guest memory through userfaultfd (`--mem-backend folio`).
//!
//! # How the memory manager works
//! Guest RAM regions are private anonymous mappings registered MISSING on
//! one userfaultfd per manager (shared by all its VMs). The host memory that
//! guests get is the *pool*, one anonymous mapping of the budget size. A
//! first touch of a guest page raises a MISSING fault; a handler thread picks
//! the largest folio order whose aligned guest range is wholly unpopulated,
//! allocates a pre-zeroed block of the pool from the buddy allocator and
//! installs it with `UFFDIO_MOVE` (one PMD move for an aligned 2 MiB folio,
//! so the guest gets a huge host mapping). Handlers never touch guest
//! memory and never zero: a worker prepares free blocks off the fault path.
//! A discard moves the pages back to their pool range and frees the folio
//! (or the discarded part of it: partially mapped folios are split later).
//!
//! ```text
//!   guest region (MISSING)          pool (WP-registered, never faults to us)
//!   +---------+---------+           +---------+---------+---------+
//!   | folio A | (none)  |  <-MOVE-- | A: hole | ready   | free    |
//!   +---------+---------+  --MOVE-> +---------+---------+---------+
//!         page tables (Pte per page)     buddy free lists + folio table
//! ```
//!
//! # Lock order
//! ```text
//! budget lock               MemoryManager::budget_lock (set_budget, and
//!   |                       set_vm_limits for its check of the minimums;
//!   |                       held across set_budget's reclaim, so above
//!   |                       everything)
//! folio lock                FolioTable::lock (sleeping; hashed wait queue).
//!   |                       Held across swap I/O (writeback, swapin read)
//!   |                       and a migration's copy. Several at once only by
//!   |                       trylock (reclaim, collapse, relocation pull), or
//!   |                       on a new folio nobody can reach yet.
//!   page-table lock         PageTable::lock, one per 2 MiB of a region;
//!   |                       two at once only in a relocation pull: the new
//!   |                       region's table, then the old region's; held
//!   |                       across UFFDIO_MOVE/COPY/POISON/WRITEPROTECT
//!   |                       of that range, never across I/O or a sleep.
//!   |                       Under it a folio lock only by trylock (a fault
//!   |                       splitting a sampled folio, `split_sampled`)
//!   +-- swap lock           SwapDevice::state (swap map + swap cache)
//!   |     +-- folio-table lock   (swap-cache lookup takes its reference)
//!   |     +-- clean-slot queue   SwapDevice::clean_frees (leaf; drained
//!   |                            by every SwapDevice::lock)
//!   +-- folio-table lock    FolioTable::slab (leaf; also guards the LRU lists)
//!   +-- zone lock           Inner::buddy (leaf; never nested with the above)
//!   +-- zap-queue lock      Inner::zapq (leaf; held across one
//!                           process_madvise of stale pool ranges, see `gather`)
//!   +-- stranded-pages lock Inner::stranded (leaf; see `stranded`; taken
//!                           in free_ranges before, not under, the zone lock)
//!
//! leaf locks (nothing is   Inner::regions (registry), Inner::vms,
//!   taken under them)       VmState::regions (a VM's list; a relocation's
//!                           switch sets region states under it),
//!                           Inner::pending, Inner::kick, Inner::kswapd_kick,
//!                           Inner::unpins, Inner::deferred_teardowns,
//!                           SwapFile::plans (fault injection);
//!                           taken alone, except Inner::pending under the zone
//!                           lock (the worker's `faults_parked`) and
//!                           Inner::kswapd_kick under the zone and page-table
//!                           locks (`check_watermark` on allocation)
//! inside folio_lock only:   wait-queue lock -> folio-table lock
//! ```
//! Handler threads take page-table and leaf locks (and folio locks under
//! them only by trylock), and sleep only on
//! folio locks whose holders never wait for a guest access: swap I/O is
//! file I/O, and reclaim takes folio locks by trylock only. No manager lock
//! is held while guest memory is accessed. Direct reclaim runs on the fault
//! path with no lock held. With [`FaultDelivery::Faulter`] the fault path
//! runs in the `SIGBUS` handler of the thread that touched guest memory,
//! which is why that last rule holds for every thread, not only ours.
//!
//! # Swap and reclaim
//! A `Swap(slot)` entry names a slot of the swap file ([`swap_file`],
//! [`swap_map`]); the swap cache ([`swap_cache`]) maps slots to folios under
//! writeback or being read. Swapin is lock-protected (see `swapin`):
//! one faulter owns the I/O, others sleep on the folio lock, and a
//! `SwapinMarker` tells a discard racing with the read apart. Reclaim
//! samples references by moving folios out to `ProtNone` entries, keeps
//! LRU generations per VM ([`lru`]), drops zero folios to `Zero`, drops
//! clean folios (swapped in by a read, write-protected since, see
//! `FolioFlags::CLEAN`) back to their slot, and writes the rest in batches
//! (see `vmscan`). A WP fault is the first write to a clean folio: its
//! handler frees the slot under the page-table lock, then lifts the
//! protection. A swapin whose data cannot
//! be read intact poisons the guest pages (`UFFDIO_POISON`): the guest gets
//! a memory error on access instead of wrong data.

//! # Glossary
//! * **folio** — an aligned block of `2^order` pool pages (order 0..=9),
//!   mapped as a unit. Record: [`folio::Folio`].
//! * **pool offset** — a byte offset in the pool; a folio is a pool range.
//! * **Pte** — the per-guest-page entry ([`pte::Pte`]), grouped into 2 MiB
//!   tables that collapse to one PMD entry when huge.
//! * **rmap** — folio → where it is mapped ([`rmap::Rmap`]).
//! * **mapcount / refcount** — as in Linux; `refcount >= mapcount + pins`.
//! * **deferred split** — splitting a partially mapped large folio later,
//!   off the fault path ([`split`]).
//! * **Ready block** — a free block whose pool range is populated and zero.
//! * **swap slot** — 4 KiB of the swap file ([`SwapSlot`]); a large folio
//!   takes naturally aligned contiguous slots inside one 2 MiB cluster.
//! * **swap cache** — slot → folio while the folio's swap I/O is in flight.
//! * **sampling / `ProtNone`** — a folio moved out of the guest to see if
//!   it is touched again (NUMA-hinting style); the fault that brings it
//!   back is the reference.
//! * **generation** — MGLRU-style LRU age; reclaim takes the oldest.
//! * **migration entry** — `Migration(folio)`: the page's folio is being
//!   copied to a new block (`migrate`) or collapsed into
//!   a 2 MiB folio (`compact`); faulters sleep on the
//!   folio's lock.
//! * **pageblock** — 2 MiB of pool, the unit compaction isolates and empties.
//! * **relocation** — moving a region's host backing ([`relocate`]): switch
//!   the VMM's memslot, then pull the 2 MiB tables of entries across.

pub mod anon;
pub mod bench;
pub mod buddy;
mod compact;
mod discard;
mod fault;
mod faulter;
pub mod folio;
mod gather;
mod hotplug;
pub mod inject;
pub mod lru;
mod manager;
mod migrate;
mod pin;
pub mod pool;
mod prezero;
pub mod pte;
pub mod relocate;
pub mod rmap;
pub mod smaps;
mod split;
mod stall;
pub mod stats;
mod stranded;
pub mod swap_cache;
pub mod swap_file;
pub mod swap_map;
mod swapin;
pub mod sys;
mod types;
mod vm;
mod vmscan;

pub use compact::CompactReport;
pub use discard::{DiscardError, DiscardOutcome};
pub use faulter::FaultDelivery;
pub use hotplug::{BudgetChange, BudgetError};
pub use inject::{FaultPoint, InjectPlan};
pub use manager::{
    BackendError, DebugUnmap, MemoryManager, MmConfig, MmError, ReclaimConfig, ReclaimError,
    VmError, MAX_HANDLER_THREADS,
};
pub use migrate::MigrateError;
pub use pin::{PinError, PinGuard};
pub use relocate::{RelocateError, RelocateOp, RelocateReport, RelocateSwitch};
pub use stats::{
    FaultStats, Histogram, MigrationStats, MmStats, SwapDeviceStats, SwapStats, VmStats,
};
pub use swap_file::{
    FaultPlan, ImpossibleFaultPlan, InjectedFault, IoOp, SwapConfig, SwapFileError, SwapTarget,
    SLOW_EIO_DELAY,
};
pub use types::{
    FolioId, GuestAddress, HostAddr, Order, PageIndex, PoolOffset, ShowSize, SwapSlot, VmId,
    PAGE_SIZE,
};
pub use vm::FolioBackend;
pub use vmscan::VmLimits;

/// A guest RAM region as the VMM sees it: guest-physical base, host mapping, size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRegion {
    /// Guest-physical address of the first byte.
    pub guest_base: GuestAddress,
    /// Host virtual address of the first byte of the mapping that backs it.
    pub host_addr: HostAddr,
    /// Length in bytes, a multiple of 4 KiB.
    pub size: u64,
}

/// What the VMM needs from a guest-memory backend.
///
/// Invariant: the host mappings stay valid, at the same address, for the
/// lifetime of the backend (relocation, when it exists, goes through an
/// explicit memslot switch in the VMM).
pub trait GuestMemoryBackend: Send + Sync {
    /// The regions, sorted by guest address, non-overlapping.
    fn regions(&self) -> &[RamRegion];
    /// A short name for logs and result lines (`anon`, `folio`).
    fn kind(&self) -> &'static str;
}
