//! foliovm guest memory.
//!
//! The VMM sees guest RAM only through [`GuestMemoryBackend`]: a list of
//! host mappings, one per guest RAM region. Two backends exist:
//!
//! * [`anon::AnonBackend`] — plain private anonymous memory, THP-advised, with
//!   the kernel serving faults. This is the baseline (`--mem-backend anon`).
//! * the memory manager (issue 3), which owns guest memory through userfaultfd.

pub mod anon;
mod types;

pub use types::{GuestAddress, HostAddr};

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
