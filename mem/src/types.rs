//! Address and index newtypes. No arithmetic operators: conversions are named.

/// Bytes in a base page.
pub const PAGE_SIZE: u64 = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;

/// A byte count as a message shows it: in MiB when whole, else in KiB
/// when whole, else in bytes ("64 MiB", "6 KiB", "1000 bytes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShowSize(pub u64);

impl std::fmt::Display for ShowSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0;
        if b != 0 && b.is_multiple_of(1 << 20) {
            write!(f, "{} MiB", b >> 20)
        } else if b != 0 && b.is_multiple_of(1 << 10) {
            write!(f, "{} KiB", b >> 10)
        } else {
            write!(f, "{b} bytes")
        }
    }
}

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
    /// This address plus `bytes` (a host mapping never wraps).
    pub const fn add(self, bytes: u64) -> HostAddr {
        HostAddr(self.0 + bytes as usize)
    }
}

/// Index of a 4 KiB page inside one guest RAM region (page 0 is the region's
/// first page). Analogue of a `pgoff_t` in an anon VMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PageIndex(pub u64);

impl PageIndex {
    /// Byte offset of this page from the start of its region.
    pub const fn to_offset(self) -> u64 {
        self.0 << PAGE_SHIFT
    }
    /// The page that contains byte `offset` of the region.
    pub const fn from_offset(offset: u64) -> PageIndex {
        PageIndex(offset >> PAGE_SHIFT)
    }
    /// The page `n` pages further on.
    pub const fn forward(self, n: u64) -> PageIndex {
        PageIndex(self.0 + n)
    }
    /// The first page of the naturally aligned `order` block containing this page.
    pub const fn align_down(self, order: Order) -> PageIndex {
        PageIndex(self.0 & !(order.nr_pages() - 1))
    }
}

/// Byte offset into the pool mapping, always page aligned. A folio is an
/// aligned range of pool offsets, the way a folio is a range of PFNs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PoolOffset(pub u64);

impl PoolOffset {
    /// The pool page frame number (offset / 4 KiB).
    pub const fn pfn(self) -> u64 {
        self.0 >> PAGE_SHIFT
    }
    /// The offset of pool page frame `pfn`.
    pub const fn from_pfn(pfn: u64) -> PoolOffset {
        PoolOffset(pfn << PAGE_SHIFT)
    }
    /// The offset of subpage `n` of a folio starting here.
    pub const fn subpage(self, n: u64) -> PoolOffset {
        PoolOffset(self.0 + (n << PAGE_SHIFT))
    }
}

/// A buddy order: a block of `2^order` base pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Order(pub u8);

impl Order {
    /// Order 0: one 4 KiB page.
    pub const BASE: Order = Order(0);
    /// The largest order: 2 MiB, one PMD.
    pub const PMD: Order = Order(9);
    /// Number of orders (`0..=9`).
    pub const COUNT: usize = 10;

    /// Base pages in a block of this order.
    pub const fn nr_pages(self) -> u64 {
        1 << self.0
    }
    /// Bytes in a block of this order.
    pub const fn bytes(self) -> u64 {
        PAGE_SIZE << self.0
    }
    /// The order as an array index.
    pub const fn index(self) -> usize {
        self.0 as usize
    }
    /// The next smaller order, if any.
    pub const fn lower(self) -> Option<Order> {
        match self.0 {
            0 => None,
            n => Some(Order(n - 1)),
        }
    }
    /// All orders from 0 to [`Order::PMD`].
    pub fn all() -> impl DoubleEndedIterator<Item = Order> {
        (0..=Order::PMD.0).map(Order)
    }
}

/// Identifies a live folio record in the folio table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct FolioId(pub u32);

/// A slot of the swap file: 4 KiB at byte offset `slot * 4096`. Analogue
/// of the offset part of a `swp_entry_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct SwapSlot(pub u32);

impl SwapSlot {
    /// The slot `n` slots further on.
    pub const fn forward(self, n: u64) -> SwapSlot {
        SwapSlot(self.0 + n as u32)
    }
    /// Byte offset of the slot in the swap file.
    pub const fn to_offset(self) -> u64 {
        (self.0 as u64) << PAGE_SHIFT
    }
    /// The slot as an array index.
    pub const fn index(self) -> usize {
        self.0 as usize
    }
}

/// Identifies one VM of a memory manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct VmId(pub u32);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_are_inverse() {
        assert_eq!(
            PageIndex::from_offset(PageIndex(77).to_offset()),
            PageIndex(77)
        );
        assert_eq!(
            PoolOffset::from_pfn(PoolOffset(8192).pfn()),
            PoolOffset(8192)
        );
        assert_eq!(PoolOffset(4096).subpage(3), PoolOffset(4 * 4096));
        assert_eq!(PageIndex(1027).align_down(Order::PMD), PageIndex(1024));
        assert_eq!(Order::PMD.bytes(), 2 << 20);
        assert_eq!(Order(3).lower(), Some(Order(2)));
        assert_eq!(Order::BASE.lower(), None);
        assert_eq!(Order::all().count(), Order::COUNT);
    }
}
