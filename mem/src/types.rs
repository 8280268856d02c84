//! Address newtypes. No arithmetic operators: conversions are named.

/// A guest-physical address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GuestAddress(pub u64);

impl GuestAddress {
    /// The raw value.
    pub const fn raw(self) -> u64 {
        self.0
    }
    /// This address plus `bytes`, or `None` on overflow.
    pub const fn checked_add(self, bytes: u64) -> Option<GuestAddress> {
        match self.0.checked_add(bytes) {
            Some(v) => Some(GuestAddress(v)),
            None => None,
        }
    }
}

/// A host virtual address inside a mapping owned by a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HostAddr(pub usize);

impl HostAddr {
    /// The raw value.
    pub const fn raw(self) -> usize {
        self.0
    }
    /// As a raw pointer.
    pub const fn as_ptr(self) -> *mut u8 {
        self.0 as *mut u8
    }
}
