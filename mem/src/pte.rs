//! Guest page tables: one packed [`Pte`] per guest 4 KiB page, grouped in
//! 2 MiB tables, each under its own page-table lock.
//!
//! Like the host's own page tables, a 2 MiB table that is wholly empty, or
//! wholly mapped by one order-9 folio, is stored as a single PMD-level entry
//! ([`Pmd::None`], [`Pmd::Huge`]) instead of 512 PTEs; the 4 KiB PTE array
//! exists only for tables that are PTE-mapped. The per-page entries read
//! the same either way ([`PtlGuard::pte`]), and this is what keeps metadata
//! per guest page small for large folios.
//!
//! Analogue of `pte_t`/`pmd_t`, `pte_offset_map_lock()` and `split_huge_pmd()`.

use crate::types::{FolioId, Order, PageIndex, SwapSlot};
use std::sync::{Mutex, MutexGuard};

/// Pages covered by one page-table lock (one PMD).
pub const PTRS_PER_TABLE: u64 = 512;

/// A packed page-table entry.
///
/// | bits   | `None` | `Present` | `Swap` | `Migration` | `SwapinMarker` | `Zero` | `ProtNone` | `Poisoned` |
/// |--------|--------|-----------|--------|-------------|----------------|--------|------------|------------|
/// | 63..60 | 0      | 1         | 2      | 3           | 4              | 5      | 6          | 7          |
/// | 40..9  | 0      | folio id  | 0      | folio id    | folio id       | 0      | folio id   | 0          |
/// | 8..0   | 0      | subpage   | 0      | 0           | 0              | 0      | subpage    | 0          |
/// | 31..0  |        |           | slot   |             |                |        |            |            |
///
/// `subpage` is the page's index inside its folio (< 512, as order ≤ 9).
/// `Migration` is defined for the migration work and not produced yet.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Pte(u64);

/// A decoded [`Pte`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PteState {
    /// Never touched, or discarded: the guest page is a hole.
    None,
    /// Mapped: the guest page is subpage `subpage` of `folio`.
    Present {
        /// The folio.
        folio: FolioId,
        /// Index of this page inside the folio.
        subpage: u16,
    },
    /// Swapped out to `slot`.
    Swap {
        /// The swap slot.
        slot: SwapSlot,
    },
    /// Being migrated away from `folio`; faulters sleep on its folio lock.
    Migration {
        /// The folio being migrated.
        folio: FolioId,
    },
    /// Being swapped in into `folio`; faulters sleep on its folio lock.
    SwapinMarker {
        /// The folio being read.
        folio: FolioId,
    },
    /// Known zero-filled, not backed (reclaimed as zero).
    Zero,
    /// Still mapped in the rmap sense (counted in the mapcount) but moved
    /// out to the folio's pool range to sample accesses, like a NUMA
    /// hinting `PROT_NONE` pte: a fault moves it back and marks the folio
    /// referenced (`vmscan`).
    ProtNone {
        /// The folio.
        folio: FolioId,
        /// Index of this page inside the folio.
        subpage: u16,
    },
    /// The guest page carries a `UFFDIO_POISON` marker: its swapped-out
    /// contents could not be read back intact. Accesses get `SIGBUS`.
    Poisoned,
}

const KIND_SHIFT: u32 = 60;
const FOLIO_SHIFT: u32 = 9;
const SUBPAGE_MASK: u64 = (1 << FOLIO_SHIFT) - 1;
const KIND_NONE: u64 = 0;
const KIND_PRESENT: u64 = 1;
const KIND_SWAP: u64 = 2;
const KIND_MIGRATION: u64 = 3;
const KIND_SWAPIN: u64 = 4;
const KIND_ZERO: u64 = 5;
const KIND_PROTNONE: u64 = 6;
const KIND_POISONED: u64 = 7;

impl Pte {
    /// The empty entry.
    pub const NONE: Pte = Pte(0);

    /// Encode `state`.
    pub fn new(state: PteState) -> Pte {
        let folio_bits = |f: FolioId| (f.0 as u64) << FOLIO_SHIFT;
        let page = |kind: u64, folio: FolioId, subpage: u16| {
            debug_assert!((subpage as u64) <= SUBPAGE_MASK);
            (kind << KIND_SHIFT) | folio_bits(folio) | (subpage as u64 & SUBPAGE_MASK)
        };
        Pte(match state {
            PteState::None => 0,
            PteState::Present { folio, subpage } => page(KIND_PRESENT, folio, subpage),
            PteState::Swap { slot } => (KIND_SWAP << KIND_SHIFT) | slot.0 as u64,
            PteState::Migration { folio } => (KIND_MIGRATION << KIND_SHIFT) | folio_bits(folio),
            PteState::SwapinMarker { folio } => (KIND_SWAPIN << KIND_SHIFT) | folio_bits(folio),
            PteState::Zero => KIND_ZERO << KIND_SHIFT,
            PteState::ProtNone { folio, subpage } => page(KIND_PROTNONE, folio, subpage),
            PteState::Poisoned => KIND_POISONED << KIND_SHIFT,
        })
    }

    /// A present entry for `subpage` of `folio`.
    pub fn present(folio: FolioId, subpage: u64) -> Pte {
        Pte::new(PteState::Present {
            folio,
            subpage: subpage as u16,
        })
    }

    /// A sampled-out entry for `subpage` of `folio`.
    pub fn prot_none(folio: FolioId, subpage: u64) -> Pte {
        Pte::new(PteState::ProtNone {
            folio,
            subpage: subpage as u16,
        })
    }

    /// A swap entry.
    pub fn swap(slot: SwapSlot) -> Pte {
        Pte::new(PteState::Swap { slot })
    }

    /// Decode.
    pub fn state(self) -> PteState {
        let folio = FolioId((self.0 >> FOLIO_SHIFT) as u32);
        let subpage = (self.0 & SUBPAGE_MASK) as u16;
        match self.0 >> KIND_SHIFT {
            KIND_NONE => PteState::None,
            KIND_PRESENT => PteState::Present { folio, subpage },
            KIND_SWAP => PteState::Swap {
                slot: SwapSlot(self.0 as u32),
            },
            KIND_MIGRATION => PteState::Migration { folio },
            KIND_SWAPIN => PteState::SwapinMarker { folio },
            KIND_ZERO => PteState::Zero,
            KIND_PROTNONE => PteState::ProtNone { folio, subpage },
            KIND_POISONED => PteState::Poisoned,
            k => unreachable!("invalid pte kind {k}"),
        }
    }

    /// Whether the entry is `None`.
    pub fn is_none(self) -> bool {
        self.0 == 0
    }

    /// The entry of the page `n` pages after this one in a uniform run:
    /// the next subpage of the same folio, the next swap slot, or the same
    /// entry for kinds without a per-page part. This is what a PMD-level
    /// entry expands to.
    pub fn nth(self, n: u64) -> Pte {
        match self.state() {
            PteState::Present { folio, subpage } => Pte::present(folio, subpage as u64 + n),
            PteState::ProtNone { folio, subpage } => Pte::prot_none(folio, subpage as u64 + n),
            PteState::Swap { slot } => Pte::swap(slot.forward(n)),
            _ => self,
        }
    }

    /// The folio this entry refers to while the folio maps the page
    /// (`Present` or `ProtNone`), with the subpage.
    pub fn mapped_folio(self) -> Option<(FolioId, u16)> {
        match self.state() {
            PteState::Present { folio, subpage } | PteState::ProtNone { folio, subpage } => {
                Some((folio, subpage))
            }
            _ => None,
        }
    }
}

impl std::fmt::Debug for Pte {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pte({:#x} {:?})", self.0, self.state())
    }
}

/// The PMD-level entry of one 2 MiB table.
#[derive(Debug, Default)]
pub enum Pmd {
    /// All 512 entries are `None`.
    #[default]
    None,
    /// All 512 entries are one uniform run: entry i is `base.nth(i)`
    /// ([`Pte::nth`]): one order-9 folio mapped (or sampled out), 512
    /// contiguous swap slots, or 512 equal entries.
    Huge(Pte),
    /// A PTE table.
    Table(Box<[Pte; PTRS_PER_TABLE as usize]>),
}

/// The entries of one table in transit between regions.
#[derive(Debug)]
pub struct TableContent {
    pmd: Pmd,
    nr_used: u16,
}

/// One 2 MiB table and its state; the data under a page-table lock.
#[derive(Debug, Default)]
pub struct PtTable {
    pmd: Pmd,
    /// Entries that are not `None`. Invariant: matches the entries.
    nr_used: u16,
    /// Set at VM teardown: nothing may be installed any more.
    dead: bool,
    /// Its entries moved to another region's table (relocation): like
    /// `dead` for installs, but the range lives on elsewhere.
    moved: bool,
}

/// The page tables of one guest RAM region.
#[derive(Debug)]
pub struct PageTable {
    /// Page-table locks, one per 2 MiB. Lock order: below the folio lock,
    /// above the folio-table, zone and LRU locks (see the crate docs).
    tables: Box<[Mutex<PtTable>]>,
    nr_pages: u64,
}

impl PageTable {
    /// Tables for a region of `nr_pages` pages, all `None`.
    pub fn new(nr_pages: u64) -> PageTable {
        let n = nr_pages.div_ceil(PTRS_PER_TABLE);
        PageTable {
            tables: (0..n).map(|_| Mutex::default()).collect(),
            nr_pages,
        }
    }

    /// Pages covered.
    pub fn nr_pages(&self) -> u64 {
        self.nr_pages
    }

    /// Number of 2 MiB tables.
    pub fn nr_tables(&self) -> u64 {
        self.tables.len() as u64
    }

    /// Take the page-table lock of the table holding `idx`.
    ///
    /// # Context
    /// May be called with a folio lock held, never with another page-table lock.
    pub fn lock(&self, idx: PageIndex) -> PtlGuard<'_> {
        let t = idx.0 / PTRS_PER_TABLE;
        let guard = self.tables[t as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let first = t * PTRS_PER_TABLE;
        PtlGuard {
            guard,
            first: PageIndex(first),
            end: PageIndex((first + PTRS_PER_TABLE).min(self.nr_pages)),
        }
    }

    /// Metadata bytes: lock array plus PTE arrays. Takes each lock briefly.
    pub fn metadata_bytes(&self) -> u64 {
        let tables = std::mem::size_of_val(&*self.tables) as u64;
        let ptes: u64 = self
            .tables
            .iter()
            .filter(|t| {
                matches!(
                    t.lock().unwrap_or_else(|e| e.into_inner()).pmd,
                    Pmd::Table(_)
                )
            })
            .count() as u64
            * PTRS_PER_TABLE
            * std::mem::size_of::<Pte>() as u64;
        tables + ptes
    }
}

/// A held page-table lock for the 2 MiB table `[first, end)`.
pub struct PtlGuard<'a> {
    guard: MutexGuard<'a, PtTable>,
    first: PageIndex,
    end: PageIndex,
}

impl PtlGuard<'_> {
    /// First page covered by this lock.
    pub fn first(&self) -> PageIndex {
        self.first
    }
    /// One past the last page covered (clipped to the region).
    pub fn end(&self) -> PageIndex {
        self.end
    }
    /// Whether nothing may be installed: the region is being torn down, or
    /// this table's entries moved to another region.
    pub fn is_dead(&self) -> bool {
        self.guard.dead || self.guard.moved
    }
    /// Whether this table's entries moved to another region (relocation).
    pub fn is_moved(&self) -> bool {
        self.guard.moved
    }
    /// Mark the entries moved away (they were taken by a relocation).
    pub fn set_moved(&mut self) {
        self.guard.moved = true;
    }
    /// Mark the region dead: no further installs.
    pub fn set_dead(&mut self) {
        self.guard.dead = true;
    }
    /// Entries in use.
    pub fn nr_used(&self) -> u64 {
        self.guard.nr_used as u64
    }

    fn slot(&self, idx: PageIndex) -> usize {
        debug_assert!(
            idx >= self.first && idx < self.end,
            "{idx:?} outside {:?}",
            self.first
        );
        (idx.0 - self.first.0) as usize
    }

    /// Read the entry of page `idx`.
    pub fn pte(&self, idx: PageIndex) -> Pte {
        let i = self.slot(idx);
        match &self.guard.pmd {
            Pmd::None => Pte::NONE,
            Pmd::Huge(base) => base.nth(i as u64),
            Pmd::Table(t) => t[i],
        }
    }

    /// Whether every entry of `[first, first + nr)` is `None`.
    pub fn range_is_none(&self, first: PageIndex, nr: u64) -> bool {
        match &self.guard.pmd {
            Pmd::None => true,
            Pmd::Huge(_) => false,
            Pmd::Table(t) => {
                let i = self.slot(first);
                t[i..i + nr as usize].iter().all(|p| p.is_none())
            }
        }
    }

    /// Whether every entry of `[first, first + nr)` is `None` or `Zero`:
    /// a fresh zeroed folio may fill it.
    pub fn range_is_unbacked(&self, first: PageIndex, nr: u64) -> bool {
        match &self.guard.pmd {
            Pmd::None => true,
            Pmd::Huge(base) => base.state() == PteState::Zero,
            Pmd::Table(t) => {
                let i = self.slot(first);
                t[i..i + nr as usize]
                    .iter()
                    .all(|p| matches!(p.state(), PteState::None | PteState::Zero))
            }
        }
    }

    /// Whether `[first, first + nr)` holds exactly the run `base.nth(0..nr)`.
    pub fn range_is(&self, first: PageIndex, nr: u64, base: Pte) -> bool {
        if let Pmd::Huge(b) = &self.guard.pmd {
            if nr == PTRS_PER_TABLE && first == self.first {
                return *b == base;
            }
        }
        (0..nr).all(|k| self.pte(first.forward(k)) == base.nth(k))
    }

    /// Set `[first, first + nr)` to the run `base.nth(0..nr)`, as one
    /// PMD-level entry when it covers the whole table.
    pub fn set_range(&mut self, first: PageIndex, nr: u64, base: Pte) {
        let whole = first == self.first
            && nr == PTRS_PER_TABLE
            && self.end.0 - self.first.0 == PTRS_PER_TABLE;
        if whole {
            (self.guard.pmd, self.guard.nr_used) = match base.is_none() {
                true => (Pmd::None, 0),
                false => (Pmd::Huge(base), PTRS_PER_TABLE as u16),
            };
            return;
        }
        for k in 0..nr {
            self.set_pte(first.forward(k), base.nth(k));
        }
    }

    /// Expand a PMD-level entry into a PTE table (`split_huge_pmd()`).
    fn table(&mut self) -> &mut [Pte; PTRS_PER_TABLE as usize] {
        let pmd = std::mem::take(&mut self.guard.pmd);
        self.guard.pmd = Pmd::Table(match pmd {
            Pmd::None => Box::new([Pte::NONE; PTRS_PER_TABLE as usize]),
            Pmd::Huge(base) => Box::new(std::array::from_fn(|i| base.nth(i as u64))),
            Pmd::Table(t) => t,
        });
        match &mut self.guard.pmd {
            Pmd::Table(t) => t,
            _ => unreachable!(),
        }
    }

    /// Set the entry of page `idx`.
    pub fn set_pte(&mut self, idx: PageIndex, pte: Pte) {
        let i = self.slot(idx);
        let old = self.pte(idx);
        if old == pte {
            return;
        }
        self.table()[i] = pte;
        match (old.is_none(), pte.is_none()) {
            (true, false) => self.guard.nr_used += 1,
            (false, true) => self.guard.nr_used -= 1,
            _ => {}
        }
        if self.guard.nr_used == 0 {
            // All entries None again: free the PTE table.
            self.guard.pmd = Pmd::None;
        }
    }

    /// Map every page of `folio` (of `order`) at `[first, first + 2^order)`.
    /// Invariant: the range is aligned to the order and all `None`.
    pub fn map_folio(&mut self, first: PageIndex, folio: FolioId, order: Order) {
        debug_assert_eq!(first.align_down(order), first);
        debug_assert!(self.range_is_unbacked(first, order.nr_pages()));
        self.set_range(first, order.nr_pages(), Pte::present(folio, 0));
    }

    /// Clear every entry, returning the old non-`None` ones (for teardown).
    pub fn take_all(&mut self) -> Vec<(PageIndex, Pte)> {
        let out = (self.first.0..self.end.0)
            .map(PageIndex)
            .map(|i| (i, self.pte(i)))
            .filter(|(_, p)| !p.is_none())
            .collect();
        self.guard.pmd = Pmd::None;
        self.guard.nr_used = 0;
        out
    }

    /// Take every entry out as one value (the table becomes empty): what a
    /// relocation moves to another region's table.
    pub fn take_table(&mut self) -> TableContent {
        let c = TableContent {
            pmd: std::mem::take(&mut self.guard.pmd),
            nr_used: self.guard.nr_used,
        };
        self.guard.nr_used = 0;
        c
    }

    /// Install entries taken by [`PtlGuard::take_table`].
    /// Invariant: this table is empty and at least as long as the source.
    pub fn put_table(&mut self, c: TableContent) {
        debug_assert_eq!(self.guard.nr_used, 0);
        debug_assert!(
            !matches!(c.pmd, Pmd::Huge(_)) || self.end.0 - self.first.0 == PTRS_PER_TABLE
        );
        self.guard.pmd = c.pmd;
        self.guard.nr_used = c.nr_used;
    }

    /// Allow installs again after [`PtlGuard::set_dead`] (a relocation
    /// undone moves tables back into a region it had emptied).
    pub fn set_alive(&mut self) {
        self.guard.dead = false;
        self.guard.moved = false;
    }

    /// Whether the table is one PMD-level entry mapping a whole folio.
    pub fn is_huge(&self) -> bool {
        matches!(self.guard.pmd, Pmd::Huge(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_state() -> impl Strategy<Value = PteState> {
        let folio = any::<u32>().prop_map(FolioId);
        prop_oneof![
            Just(PteState::None),
            (folio.clone(), 0u16..512)
                .prop_map(|(folio, subpage)| PteState::Present { folio, subpage }),
            any::<u32>().prop_map(|slot| PteState::Swap {
                slot: SwapSlot(slot)
            }),
            folio
                .clone()
                .prop_map(|folio| PteState::Migration { folio }),
            folio
                .clone()
                .prop_map(|folio| PteState::SwapinMarker { folio }),
            Just(PteState::Zero),
            (folio, 0u16..512).prop_map(|(folio, subpage)| PteState::ProtNone { folio, subpage }),
            Just(PteState::Poisoned),
        ]
    }

    proptest! {
        #[test]
        fn encoding_roundtrips(s in any_state()) {
            prop_assert_eq!(Pte::new(s).state(), s);
            prop_assert_eq!(Pte::new(s).is_none(), s == PteState::None);
        }

        #[test]
        fn distinct_states_encode_distinctly(a in any_state(), b in any_state()) {
            prop_assert_eq!(Pte::new(a) == Pte::new(b), a == b);
        }

        #[test]
        fn table_counts_and_collapses(ops in prop::collection::vec((0u64..512, any::<bool>()), 1..300)) {
            let pt = PageTable::new(512);
            let mut g = pt.lock(PageIndex(0));
            let mut model = [false; 512];
            for (i, set) in ops {
                let pte = if set { Pte::present(FolioId(i as u32), 0) } else { Pte::NONE };
                g.set_pte(PageIndex(i), pte);
                model[i as usize] = set;
                prop_assert_eq!(g.nr_used(), model.iter().filter(|m| **m).count() as u64);
                prop_assert_eq!(g.pte(PageIndex(i)), pte);
            }
            let used = model.iter().filter(|m| **m).count();
            prop_assert_eq!(g.take_all().len(), used);
            prop_assert!(g.range_is_none(PageIndex(0), 512));
        }
    }

    #[test]
    fn pte_is_eight_bytes() {
        assert_eq!(std::mem::size_of::<Pte>(), 8);
    }

    #[test]
    fn huge_map_splits_on_partial_clear() {
        let pt = PageTable::new(1024 + 3);
        assert_eq!(pt.nr_tables(), 3);
        let before = pt.metadata_bytes();
        let mut g = pt.lock(PageIndex(600));
        assert_eq!(g.first(), PageIndex(512));
        g.map_folio(PageIndex(512), FolioId(7), Order::PMD);
        assert!(g.is_huge());
        assert_eq!(
            g.pte(PageIndex(700)).state(),
            PteState::Present {
                folio: FolioId(7),
                subpage: 188
            }
        );
        drop(g);
        assert_eq!(
            pt.metadata_bytes(),
            before,
            "a huge entry needs no PTE table"
        );
        let mut g = pt.lock(PageIndex(512));
        g.set_pte(PageIndex(513), Pte::NONE);
        assert!(!g.is_huge());
        assert_eq!(g.nr_used(), 511);
        assert_eq!(
            g.pte(PageIndex(514)).state(),
            PteState::Present {
                folio: FolioId(7),
                subpage: 2
            }
        );
        drop(g);
        assert_eq!(pt.metadata_bytes(), before + 4096);
        // The short last table cannot hold a PMD mapping.
        let mut g = pt.lock(PageIndex(1025));
        assert_eq!(g.end(), PageIndex(1027));
        g.map_folio(PageIndex(1024), FolioId(1), Order(1));
        assert_eq!(g.nr_used(), 2);
        assert!(g.range_is_none(PageIndex(1026), 1));
    }
}
