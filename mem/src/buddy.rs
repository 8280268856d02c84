//! The buddy allocator over pool page frames.
//!
//! Analogue of `mm/page_alloc.c`: per-order free lists, split on allocation
//! (`expand()`), merge with the buddy on free (`__free_one_page()`). Free
//! lists are further split by what a block needs before a fault may hand it
//! out ([`BlockState`]), the way Linux once kept pre-zeroed pages apart. The
//! fault path only takes [`BlockState::Ready`] blocks; the pre-zeroing
//! worker ([`crate::prezero`]) turns the others into `Ready`.
//!
//! Blocks can also be taken *offline* ([`Buddy::offline`]): out of the
//! allocator for good, until [`Buddy::online`] gives them back. That is how
//! the usable budget shrinks below the pool size at run time, the way
//! memory hot-unplug isolates free pageblocks (`offline_pages()` in
//! `mm/memory_hotplug.c`) before the range goes away.
//!
//! # Context
//! All methods run under the zone lock (`Inner::buddy`), a leaf lock.

use crate::types::{Order, PoolOffset};
use std::collections::BTreeMap;

/// What a free block's pool range holds, from best to worst. Merging two
/// blocks gives the worse of the two states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BlockState {
    /// Every page is populated and zero. An order-9 `Ready` block is also a
    /// PMD-mapped THP in the pool, so it can move to a guest as one PMD.
    Ready,
    /// Pages are zero where present but some may be holes (they were moved
    /// to a guest and freed there), or an order-9 block is not one THP.
    /// Preparing it needs populate (an order-9 block: a fresh THP), not
    /// zeroing.
    NeedsPopulate,
    /// Pages may hold old guest data (moved back from a guest on discard).
    /// Preparing it needs zeroing.
    NeedsZero,
}

const NR_STATES: usize = 3;

impl BlockState {
    const ALL: [BlockState; NR_STATES] = [
        BlockState::Ready,
        BlockState::NeedsPopulate,
        BlockState::NeedsZero,
    ];
    fn index(self) -> usize {
        self as usize
    }
}

/// A block handed out by the allocator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    /// First pool page of the block.
    pub offset: PoolOffset,
    /// Its order.
    pub order: Order,
    /// What its pool range held when it was free.
    pub state: BlockState,
}

/// Errors from [`Buddy::free`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FreeError {
    /// The block is not aligned to its order or lies outside the pool.
    #[error("block at pfn {pfn:#x} order {order} is misaligned or outside the pool")]
    BadBlock {
        /// First page frame of the block.
        pfn: u64,
        /// Its order.
        order: u8,
    },
    /// The block overlaps a block that is already free.
    #[error("double free of pfn {pfn:#x} order {order}")]
    DoubleFree {
        /// First page frame of the block.
        pfn: u64,
        /// Its order.
        order: u8,
    },
}

/// Free memory by order, as reported in stats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FreeAreaStats {
    /// Free blocks of each order (all states).
    pub free_blocks: [u64; Order::COUNT],
    /// Free `Ready` blocks of each order.
    pub ready_blocks: [u64; Order::COUNT],
    /// Total free base pages.
    pub free_pages: u64,
    /// Free base pages that are `Ready`.
    pub ready_pages: u64,
    /// Pool size in base pages.
    pub total_pages: u64,
    /// Base pages taken offline (not part of the usable budget).
    pub offline_pages: u64,
    /// Free base pages parked in isolated pageblocks (not allocatable).
    pub isolated_pages: u64,
}

impl FreeAreaStats {
    /// Linux's unusable free space index for `order`, in thousandths: the
    /// share of free memory in blocks too small to serve an `order`
    /// allocation (0 = none wasted, 1000 = all of it unusable).
    pub fn unusable_index(&self, order: Order) -> u64 {
        if self.free_pages == 0 {
            return 0;
        }
        let usable: u64 = Order::all()
            .filter(|o| *o >= order)
            .map(|o| self.free_blocks[o.index()] * o.nr_pages())
            .sum();
        (self.free_pages - usable) * 1000 / self.free_pages
    }
}

/// The buddy allocator. Invariant: free and offline blocks never overlap,
/// and the free (offline) page count equals the sum over the free lists
/// (the offline set).
#[derive(Debug)]
pub struct Buddy {
    /// `free[order][state]`: first pfns of free blocks.
    free: [FreeList; Order::COUNT],
    /// Per page: the free block that starts there, if any (`PageBuddy`
    /// and `buddy_order()` of the page's `struct page`), so that lookups
    /// by address need no search of the free lists.
    head: Vec<Head>,
    /// Free pages (on the free lists) per pageblock, kept with the lists
    /// (the `NR_FREE_PAGES` of a pageblock, for compaction's choices).
    pb_free: Vec<u32>,
    nr_pages: u64,
    free_pages: u64,
    ready_pages: u64,
    /// Offline blocks: first pfn -> order.
    offline: BTreeMap<u64, Order>,
    offline_pages: u64,
    /// Isolated pageblocks (first pfn) and the free blocks parked in them,
    /// like `MIGRATE_ISOLATE` pageblocks: frees into them do not reach the
    /// free lists until the pageblock is released.
    isolated: BTreeMap<u64, Vec<(u64, Order, BlockState)>>,
    isolated_pages: u64,
}

/// A page's entry in [`Buddy::head`]: 0 when no free block starts at the
/// page, else the block's order + 1 in the low nibble and its state above,
/// with [`Head::PARKED`] set for a block parked in an isolated pageblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Head(u8);

impl Head {
    const NONE: Head = Head(0);
    const PARKED: u8 = 0x80;

    fn new(order: Order, state: BlockState) -> Head {
        Head((order.0 + 1) | ((state as u8) << 4))
    }

    fn parked(order: Order) -> Head {
        Head((order.0 + 1) | Head::PARKED)
    }

    /// The order of the block starting here, free or parked.
    fn any_order(self) -> Option<Order> {
        (self.0 != 0).then(|| Order((self.0 & 0xf) - 1))
    }

    /// The order of the free block (on the free lists) starting here.
    fn order(self) -> Option<Order> {
        self.any_order().filter(|_| self.0 & Head::PARKED == 0)
    }

    /// The state of the free block starting here, if it has `order`.
    fn state_if(self, order: Order) -> Option<BlockState> {
        (self.order() == Some(order)).then(|| BlockState::ALL[((self.0 >> 4) & 0x7) as usize])
    }
}

/// The free blocks of one order: a bitmap over the pool's order-aligned
/// positions, with per word a count of the blocks of each state and per
/// state a summary bit per word that has any. Insert and remove are O(1);
/// the lowest block of a state is found by a short scan (address order, as
/// the sorted sets this replaces gave) and the state itself is kept in the
/// [`Head`] map. About 0.35 bytes per pool page over all orders.
#[derive(Debug)]
struct FreeList {
    /// log2 of the pages per position (the order).
    shift: u8,
    /// Bit `i`: a free block (of any state) starts at pfn `i << shift`.
    words: Vec<u64>,
    /// Per word: its blocks of each state.
    count: Vec<[u8; NR_STATES]>,
    /// Per state, bit `w`: word `w` has a block of that state.
    summary: [Vec<u64>; NR_STATES],
    len: [usize; NR_STATES],
}

impl FreeList {
    fn new(nr_pages: u64, order: Order) -> FreeList {
        let words = nr_pages.div_ceil(order.nr_pages()).div_ceil(64) as usize;
        FreeList {
            shift: order.0,
            words: vec![0; words],
            count: vec![[0; NR_STATES]; words],
            summary: std::array::from_fn(|_| vec![0; words.div_ceil(64)]),
            len: [0; NR_STATES],
        }
    }

    fn insert(&mut self, pfn: u64, state: BlockState) {
        let i = (pfn >> self.shift) as usize;
        let (w, bit) = (i / 64, 1u64 << (i % 64));
        debug_assert_eq!(self.words[w] & bit, 0, "pfn {pfn:#x} inserted twice");
        self.words[w] |= bit;
        self.count[w][state.index()] += 1;
        self.summary[state.index()][w / 64] |= 1 << (w % 64);
        self.len[state.index()] += 1;
    }

    fn remove(&mut self, pfn: u64, state: BlockState) {
        let i = (pfn >> self.shift) as usize;
        let (w, bit) = (i / 64, 1u64 << (i % 64));
        debug_assert_ne!(self.words[w] & bit, 0, "pfn {pfn:#x} not in the list");
        self.words[w] &= !bit;
        let c = &mut self.count[w][state.index()];
        *c -= 1;
        if *c == 0 {
            self.summary[state.index()][w / 64] &= !(1 << (w % 64));
        }
        self.len[state.index()] -= 1;
    }

    /// The lowest word holding a block of `state`, and its bits.
    fn first_word(&self, state: BlockState) -> Option<(usize, u64)> {
        let sum = &self.summary[state.index()];
        let (sj, s) = sum.iter().enumerate().find(|(_, s)| **s != 0)?;
        let w = sj * 64 + s.trailing_zeros() as usize;
        Some((w, self.words[w]))
    }

    fn is_empty(&self, state: BlockState) -> bool {
        self.len[state.index()] == 0
    }

    fn len(&self, state: BlockState) -> usize {
        self.len[state.index()]
    }

    /// The first pfns of the free blocks (all states), in address order.
    fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(move |(w, &word)| {
            let mut word = word;
            std::iter::from_fn(move || {
                (word != 0).then(|| {
                    let b = word.trailing_zeros() as usize;
                    word &= word - 1;
                    ((w * 64 + b) as u64) << self.shift
                })
            })
        })
    }

    /// Heap bytes.
    fn bytes(&self) -> u64 {
        let summaries: usize = self.summary.iter().map(Vec::len).sum();
        (self.words.len() * (8 + NR_STATES) + summaries * 8) as u64
    }
}

/// Pages in a pageblock: the unit of isolation and compaction (2 MiB).
pub const PAGEBLOCK_PAGES: u64 = Order::PMD.nr_pages();

impl Buddy {
    /// A pool of `nr_pages` pages, all free in `state`, carved into the
    /// largest aligned blocks.
    pub fn new(nr_pages: u64, state: BlockState) -> Buddy {
        let mut b = Buddy {
            free: std::array::from_fn(|o| FreeList::new(nr_pages, Order(o as u8))),
            head: vec![Head::NONE; nr_pages as usize],
            pb_free: vec![0; nr_pages.div_ceil(PAGEBLOCK_PAGES) as usize],
            nr_pages,
            free_pages: 0,
            ready_pages: 0,
            offline: BTreeMap::new(),
            offline_pages: 0,
            isolated: BTreeMap::new(),
            isolated_pages: 0,
        };
        let mut pfn = 0;
        while pfn < nr_pages {
            let order = Order::all()
                .rev()
                .find(|o| pfn % o.nr_pages() == 0 && pfn + o.nr_pages() <= nr_pages)
                .unwrap_or(Order::BASE);
            b.insert(pfn, order, state);
            pfn += order.nr_pages();
        }
        b
    }

    fn insert(&mut self, pfn: u64, order: Order, state: BlockState) {
        self.free[order.index()].insert(pfn, state);
        self.head[pfn as usize] = Head::new(order, state);
        self.pb_free[(pfn / PAGEBLOCK_PAGES) as usize] += order.nr_pages() as u32;
        self.free_pages += order.nr_pages();
        if state == BlockState::Ready {
            self.ready_pages += order.nr_pages();
        }
    }

    fn remove(&mut self, pfn: u64, order: Order) -> Option<BlockState> {
        let state = self.head.get(pfn as usize)?.state_if(order)?;
        self.free[order.index()].remove(pfn, state);
        self.head[pfn as usize] = Head::NONE;
        self.pb_free[(pfn / PAGEBLOCK_PAGES) as usize] -= order.nr_pages() as u32;
        self.free_pages -= order.nr_pages();
        if state == BlockState::Ready {
            self.ready_pages -= order.nr_pages();
        }
        Some(state)
    }

    /// The lowest free block of `order` in `state`.
    fn first(&self, order: Order, state: BlockState) -> Option<u64> {
        let (w, mut word) = self.free[order.index()].first_word(state)?;
        while word != 0 {
            let pfn = ((w * 64) as u64 + u64::from(word.trailing_zeros())) << order.0;
            if self.head[pfn as usize].state_if(order) == Some(state) {
                return Some(pfn);
            }
            word &= word - 1;
        }
        debug_assert!(false, "order {} word {w}: counted but not found", order.0);
        None
    }

    /// Allocate a block of exactly `order` whose state is `state`, splitting
    /// the smallest larger free block of that state if needed. The split-off
    /// halves keep the state (a split `Ready` THP is still zeroed and populated).
    ///
    /// Analogue of `__rmqueue_smallest()` + `expand()`.
    pub fn alloc(&mut self, order: Order, state: BlockState) -> Option<Block> {
        let from = Order::all()
            .filter(|o| *o >= order)
            .find(|o| !self.free[o.index()].is_empty(state))?;
        self.take_split(from, state, order)
    }

    /// Take the first free block of `from` in `state` and split it down to
    /// `order` (`expand()`), handing the upper halves back.
    fn take_split(&mut self, from: Order, state: BlockState, order: Order) -> Option<Block> {
        let pfn = self.first(from, state)?;
        self.take_split_at(pfn, from, order)
    }

    /// Take the free block of `from` at `pfn` and split it down to `order`,
    /// handing the upper halves back (so the block's lowest pages go first).
    fn take_split_at(&mut self, pfn: u64, from: Order, order: Order) -> Option<Block> {
        let state = self.remove(pfn, from)?;
        let mut cur = from;
        while cur > order {
            cur = cur.lower()?;
            // Hand the upper half back; keep splitting the lower half.
            self.insert(pfn + cur.nr_pages(), cur, state);
        }
        Some(Block {
            offset: PoolOffset::from_pfn(pfn),
            order,
            state,
        })
    }

    /// Allocate a block of `order` from the smallest free block that fits,
    /// whatever its state, preferring the least prepared at equal size:
    /// for a migration target, which the copy overwrites entirely, so
    /// compaction fills holes instead of splitting fresh 2 MiB blocks.
    pub fn alloc_smallest(&mut self, order: Order) -> Option<Block> {
        let (from, state) = Order::all().filter(|o| *o >= order).find_map(|o| {
            BlockState::ALL
                .into_iter()
                .rev()
                .find(|s| !self.free[o.index()].is_empty(*s))
                .map(|s| (o, s))
        })?;
        self.take_split(from, state, order)
    }

    /// Allocate a block of `order` from the lowest free block of at least
    /// `order` (below order 9: a whole free 2 MiB block is never split),
    /// whatever its state, that starts in `[from, end)`: the block's lowest
    /// pages, the rest split off and handed back. Returns the block and the
    /// pfn to scan from next (its end).
    ///
    /// Compaction's free scanner (`isolate_freepages_block()`, which takes
    /// a target pageblock's free pages in address order): the targets of a
    /// batch come out mostly adjacent, so making them holes takes a few
    /// long `MADV_DONTNEED` ranges rather than one range per page.
    pub fn alloc_in_range(&mut self, from: u64, end: u64, order: Order) -> Option<(Block, u64)> {
        let end = end.min(self.nr_pages);
        let from = from.min(end);
        let (pfn, found) = self.head[from as usize..end as usize]
            .iter()
            .enumerate()
            .find_map(|(i, h)| {
                h.order()
                    .filter(|o| *o >= order && *o < Order::PMD)
                    .map(|o| (from + i as u64, o))
            })?;
        let b = self.take_split_at(pfn, found, order)?;
        Some((b, pfn + order.nr_pages()))
    }

    /// Free pages (on the free lists) of the pageblock at `pb` (its first
    /// pfn).
    pub fn pageblock_free_pages(&self, pb: u64) -> u64 {
        debug_assert!(pb.is_multiple_of(PAGEBLOCK_PAGES));
        self.pb_free
            .get((pb / PAGEBLOCK_PAGES) as usize)
            .map_or(0, |&n| u64::from(n))
    }

    /// Whether the pageblock at `pb` is one free block.
    pub fn pageblock_is_free(&self, pb: u64) -> bool {
        self.is_free_at(pb, Order::PMD)
    }

    /// Take the largest free block that is not `Ready`, for the pre-zeroing
    /// worker to prepare. It goes back with [`Buddy::free`] as `Ready`.
    pub fn take_unprepared(&mut self) -> Option<Block> {
        for order in Order::all().rev() {
            for state in [BlockState::NeedsZero, BlockState::NeedsPopulate] {
                if let Some(pfn) = self.first(order, state) {
                    self.remove(pfn, order);
                    return Some(Block {
                        offset: PoolOffset::from_pfn(pfn),
                        order,
                        state,
                    });
                }
            }
        }
        None
    }

    /// Whether a not-yet-prepared block of at least `order` is free.
    pub fn has_unprepared(&self, order: Order) -> bool {
        Order::all().filter(|o| *o >= order).any(|o| {
            !self.free[o.index()].is_empty(BlockState::NeedsPopulate)
                || !self.free[o.index()].is_empty(BlockState::NeedsZero)
        })
    }

    fn is_free_at(&self, pfn: u64, order: Order) -> bool {
        self.head
            .get(pfn as usize)
            .is_some_and(|h| h.order() == Some(order))
    }

    /// Whether any free or parked block overlaps `[pfn, pfn + nr)` (inside
    /// the pool): one that starts inside it, or one aligned below it that
    /// reaches in.
    fn overlaps_free_or_parked(&self, pfn: u64, nr: u64) -> bool {
        let starts_inside = self.head[pfn as usize..(pfn + nr) as usize]
            .iter()
            .any(|h| *h != Head::NONE);
        starts_inside
            || Order::all().any(|o| {
                let base = pfn - pfn % o.nr_pages();
                base < pfn && self.head[base as usize].any_order() == Some(o)
            })
    }

    /// Free a block and merge it with free buddies.
    ///
    /// Merging into order 9 turns two `Ready` halves into `NeedsPopulate`,
    /// since the halves are no longer one THP (the worker collapses it).
    ///
    /// # Errors
    /// [`FreeError::BadBlock`] and [`FreeError::DoubleFree`]; the allocator
    /// is unchanged then.
    pub fn free(
        &mut self,
        offset: PoolOffset,
        order: Order,
        state: BlockState,
    ) -> Result<(), FreeError> {
        let mut pfn = offset.pfn();
        let bad = FreeError::BadBlock {
            pfn,
            order: order.0,
        };
        if !pfn.is_multiple_of(order.nr_pages())
            || pfn + order.nr_pages() > self.nr_pages
            || order > Order::PMD
        {
            return Err(bad);
        }
        if self.overlaps_free_or_parked(pfn, order.nr_pages()) {
            return Err(FreeError::DoubleFree {
                pfn,
                order: order.0,
            });
        }
        let pb = pfn - pfn % PAGEBLOCK_PAGES;
        if let Some(parked) = self.isolated.get_mut(&pb) {
            parked.push((pfn, order, state));
            self.head[pfn as usize] = Head::parked(order);
            self.isolated_pages += order.nr_pages();
            return Ok(());
        }
        let (mut order, mut state) = (order, state);
        while order < Order::PMD {
            let buddy = pfn ^ order.nr_pages();
            if buddy + order.nr_pages() > self.nr_pages || !self.is_free_at(buddy, order) {
                break;
            }
            let buddy_state = self.remove(buddy, order).unwrap_or(BlockState::NeedsZero);
            state = state.max(buddy_state);
            pfn = pfn.min(buddy);
            order = Order(order.0 + 1);
            if order == Order::PMD {
                state = state.max(BlockState::NeedsPopulate);
            }
        }
        self.insert(pfn, order, state);
        Ok(())
    }

    /// Take up to `nr_pages` free pages offline, and return the blocks
    /// taken: the worst-prepared blocks first (data to zero, then holes,
    /// then ready ones), the largest that fit first, splitting a larger
    /// block only for the last few pages. Fewer pages are taken when fewer
    /// are free. The caller may drop the blocks' host pages: offline
    /// blocks come back from [`Buddy::online`] as `NeedsPopulate`.
    ///
    /// Analogue of isolating free pageblocks in `offline_pages()`.
    pub fn offline(&mut self, nr_pages: u64) -> Vec<Block> {
        let mut taken = Vec::new();
        let mut left = nr_pages;
        'next: while left > 0 {
            let fit = Order::all()
                .rev()
                .find(|o| o.nr_pages() <= left)
                .unwrap_or(Order::BASE);
            for order in Order::all().rev().filter(|o| *o <= fit) {
                let worst_first = BlockState::ALL.into_iter().rev();
                for state in worst_first {
                    if let Some(b) = self.alloc(order, state) {
                        self.offline.insert(b.offset.pfn(), b.order);
                        self.offline_pages += b.order.nr_pages();
                        left -= b.order.nr_pages();
                        taken.push(b);
                        continue 'next;
                    }
                }
            }
            break;
        }
        taken
    }

    /// Bring up to `nr_pages` offline pages back as free `NeedsPopulate`
    /// memory (an offline block larger than what is left is split, and
    /// its other half stays offline). Returns the pages brought back.
    ///
    /// # Errors
    /// [`FreeError`] if an offline block overlaps a free one, which the
    /// invariant rules out; that block stays offline.
    pub fn online(&mut self, nr_pages: u64) -> Result<u64, FreeError> {
        let mut back = 0;
        while back < nr_pages {
            let Some((pfn, mut order)) = self.offline.pop_first() else {
                break;
            };
            while order.nr_pages() > nr_pages - back {
                let Some(lower) = order.lower() else { break };
                order = lower;
                self.offline.insert(pfn + order.nr_pages(), order);
            }
            if let Err(e) = self.free(PoolOffset::from_pfn(pfn), order, BlockState::NeedsPopulate) {
                self.offline.insert(pfn, order);
                return Err(e);
            }
            self.offline_pages -= order.nr_pages();
            back += order.nr_pages();
        }
        Ok(back)
    }

    /// Offline base pages.
    pub fn nr_offline(&self) -> u64 {
        self.offline_pages
    }

    /// Isolate the pageblock starting at `pb` (a multiple of
    /// [`PAGEBLOCK_PAGES`] inside the pool): its free blocks leave the free
    /// lists, and blocks freed into it later are parked too, until
    /// [`Buddy::unisolate_pageblock`]. Returns false if it is already
    /// isolated or not a whole pageblock of the pool.
    /// Analogue of `start_isolate_page_range()`.
    pub fn isolate_pageblock(&mut self, pb: u64) -> bool {
        if !pb.is_multiple_of(PAGEBLOCK_PAGES)
            || pb + PAGEBLOCK_PAGES > self.nr_pages
            || self.isolated.contains_key(&pb)
        {
            return false;
        }
        let mut parked = Vec::new();
        // The free blocks inside, found by their heads (the pageblock is
        // whole, so no free block reaches in from outside).
        let mut pfn = pb;
        while pfn < pb + PAGEBLOCK_PAGES {
            let Some(o) = self.head[pfn as usize].order() else {
                pfn += 1;
                continue;
            };
            let s = self.remove(pfn, o).expect("a head names a free block");
            parked.push((pfn, o, s));
            self.head[pfn as usize] = Head::parked(o);
            self.isolated_pages += o.nr_pages();
            pfn += o.nr_pages();
        }
        self.isolated.insert(pb, parked);
        true
    }

    /// Release an isolated pageblock: its parked blocks are freed (and
    /// merge). Returns the pages released.
    pub fn unisolate_pageblock(&mut self, pb: u64) -> u64 {
        let Some(parked) = self.isolated.remove(&pb) else {
            return 0;
        };
        let whole: u64 = parked.iter().map(|p| p.1.nr_pages()).sum();
        if whole == PAGEBLOCK_PAGES {
            // Emptied: the parked blocks tile the pageblock (they never
            // overlap), so they merge into one order-9 block, whose state
            // is the worst of theirs (and never a `Ready` THP).
            let state = parked
                .iter()
                .map(|p| p.2)
                .fold(BlockState::NeedsPopulate, BlockState::max);
            for &(pfn, _, _) in &parked {
                self.head[pfn as usize] = Head::NONE;
            }
            self.isolated_pages -= PAGEBLOCK_PAGES;
            self.insert(pb, Order::PMD, state);
            return PAGEBLOCK_PAGES;
        }
        let mut n = 0;
        for (pfn, o, s) in parked {
            self.head[pfn as usize] = Head::NONE;
            self.isolated_pages -= o.nr_pages();
            n += o.nr_pages();
            if let Err(e) = self.free(PoolOffset::from_pfn(pfn), o, s) {
                debug_assert!(false, "parked block {pfn:#x}: {e}");
            }
        }
        n
    }

    /// Free pages (on the free lists) in each pageblock of the pool, for
    /// choosing compaction sources. A pageblock holding offline memory
    /// counts 0: it cannot be emptied into a free 2 MiB block.
    pub fn free_pages_per_pageblock(&self) -> Vec<u64> {
        let whole = (self.nr_pages / PAGEBLOCK_PAGES) as usize;
        let mut out: Vec<u64> = self.pb_free[..whole]
            .iter()
            .map(|&n| u64::from(n))
            .collect();
        for &pfn in self.offline.keys() {
            if let Some(c) = out.get_mut((pfn / PAGEBLOCK_PAGES) as usize) {
                *c = 0;
            }
        }
        out
    }

    /// Free base pages (all states).
    pub fn nr_free(&self) -> u64 {
        self.free_pages
    }

    /// Free pages parked in pageblocks isolated for compaction: not
    /// allocatable, and free again once the pageblock is released.
    pub fn nr_parked(&self) -> u64 {
        self.isolated_pages
    }

    /// Free memory by order.
    pub fn stats(&self) -> FreeAreaStats {
        let mut s = FreeAreaStats {
            free_pages: self.free_pages,
            ready_pages: self.ready_pages,
            total_pages: self.nr_pages,
            offline_pages: self.offline_pages,
            isolated_pages: self.isolated_pages,
            ..Default::default()
        };
        for o in Order::all() {
            let list = &self.free[o.index()];
            s.free_blocks[o.index()] = BlockState::ALL.map(|st| list.len(st) as u64).iter().sum();
            s.ready_blocks[o.index()] = list.len(BlockState::Ready) as u64;
        }
        s
    }

    /// Bytes of allocator metadata (an estimate of the free-list nodes).
    pub fn metadata_bytes(&self) -> u64 {
        let lists: u64 = self.free.iter().map(FreeList::bytes).sum();
        lists
            + self.offline.len() as u64 * 24
            + self.head.len() as u64
            + self.pb_free.len() as u64 * 4
            + std::mem::size_of::<Self>() as u64
    }

    /// Check the invariants: blocks aligned, inside the pool, disjoint, and
    /// the counters equal to the lists. Used by tests and debug checks.
    ///
    /// # Errors
    /// A description of the first violated invariant.
    pub fn check(&self) -> Result<(), String> {
        let mut blocks: Vec<(u64, u64)> = Vec::new();
        let (mut free, mut ready) = (0, 0);
        let mut pb_free = vec![0u32; self.pb_free.len()];
        for o in Order::all() {
            let list = &self.free[o.index()];
            let mut count = vec![[0u8; NR_STATES]; list.count.len()];
            for pfn in list.iter() {
                if pfn % o.nr_pages() != 0 || pfn + o.nr_pages() > self.nr_pages {
                    return Err(format!("bad block pfn {pfn:#x} order {}", o.0));
                }
                let Some(s) = self.head[pfn as usize].state_if(o) else {
                    return Err(format!("pfn {pfn:#x}: head map disagrees with free list"));
                };
                count[((pfn >> o.0) / 64) as usize][s.index()] += 1;
                pb_free[(pfn / PAGEBLOCK_PAGES) as usize] += o.nr_pages() as u32;
                blocks.push((pfn, o.nr_pages()));
                free += o.nr_pages();
                if s == BlockState::Ready {
                    ready += o.nr_pages();
                }
            }
            let summary_ok = BlockState::ALL.iter().all(|s| {
                (0..count.len()).all(|w| {
                    let bit = list.summary[s.index()][w / 64] & (1 << (w % 64)) != 0;
                    bit == (count[w][s.index()] > 0)
                })
            });
            let lens_ok = BlockState::ALL
                .iter()
                .all(|s| list.len(*s) == count.iter().map(|c| c[s.index()] as usize).sum());
            if count != list.count || !summary_ok || !lens_ok {
                return Err(format!("order {}: free-list counts disagree", o.0));
            }
        }
        let nr_free_blocks = blocks.len();
        let mut offline = 0;
        for (&pfn, o) in &self.offline {
            if pfn % o.nr_pages() != 0 || pfn + o.nr_pages() > self.nr_pages {
                return Err(format!("bad offline block pfn {pfn:#x} order {}", o.0));
            }
            blocks.push((pfn, o.nr_pages()));
            offline += o.nr_pages();
        }
        if offline != self.offline_pages {
            return Err(format!(
                "offline counter {} but set {offline}",
                self.offline_pages
            ));
        }
        let mut parked_pages = 0;
        for parked in self.isolated.values() {
            for &(pfn, o, _) in parked {
                if self.head[pfn as usize] != Head::parked(o) {
                    return Err(format!("parked pfn {pfn:#x}: head map disagrees"));
                }
                blocks.push((pfn, o.nr_pages()));
                parked_pages += o.nr_pages();
            }
        }
        let heads = self.head.iter().filter(|h| **h != Head::NONE).count();
        let parked_blocks: usize = self.isolated.values().map(Vec::len).sum();
        if heads != nr_free_blocks + parked_blocks {
            return Err(format!(
                "{heads} head entries for {nr_free_blocks} free and {parked_blocks} parked blocks"
            ));
        }
        if parked_pages != self.isolated_pages {
            return Err(format!(
                "isolated counter {} but parked {parked_pages}",
                self.isolated_pages
            ));
        }
        blocks.sort_unstable();
        if let Some(w) = blocks.windows(2).find(|w| w[0].0 + w[0].1 > w[1].0) {
            return Err(format!(
                "free or offline blocks overlap: {:?} {:?}",
                w[0], w[1]
            ));
        }
        if pb_free != self.pb_free {
            return Err("per-pageblock free counts disagree with the lists".into());
        }
        if free != self.free_pages || ready != self.ready_pages {
            return Err(format!(
                "counters {}/{} but lists {free}/{ready}",
                self.free_pages, self.ready_pages
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const R: BlockState = BlockState::Ready;

    #[test]
    fn new_carves_largest_blocks() {
        let b = Buddy::new(512 * 3 + 7, R);
        let s = b.stats();
        assert_eq!(s.free_blocks[9], 3);
        assert_eq!(s.free_blocks[2], 1);
        assert_eq!(s.free_blocks[1], 1);
        assert_eq!(s.free_blocks[0], 1);
        assert_eq!(s.free_pages, 512 * 3 + 7);
        b.check().unwrap();
    }

    #[test]
    fn split_then_merge_restores_one_block() {
        let mut b = Buddy::new(512, R);
        let a = b.alloc(Order(0), R).unwrap();
        assert_eq!(a.offset, PoolOffset(0));
        let s = b.stats();
        // 512 = 1 + 1 + 2 + 4 + ... + 256.
        assert_eq!(s.free_blocks, [1, 1, 1, 1, 1, 1, 1, 1, 1, 0]);
        b.free(a.offset, a.order, R).unwrap();
        let s = b.stats();
        assert_eq!(s.free_blocks[9], 1);
        assert_eq!(s.free_pages, 512);
        // Two Ready halves merged into 2 MiB are no longer known to be a THP.
        assert_eq!(s.ready_blocks[9], 0);
        b.check().unwrap();
    }

    #[test]
    fn exhaustion_returns_none_and_recovers() {
        let mut b = Buddy::new(16, R);
        let blocks: Vec<_> = (0..16).map(|_| b.alloc(Order(0), R).unwrap()).collect();
        assert!(b.alloc(Order(0), R).is_none());
        assert_eq!(b.stats().free_pages, 0);
        for blk in blocks {
            b.free(blk.offset, blk.order, R).unwrap();
        }
        assert_eq!(b.stats().free_blocks[4], 1);
        b.check().unwrap();
    }

    #[test]
    fn double_free_and_bad_blocks_are_refused() {
        let mut b = Buddy::new(64, R);
        let a = b.alloc(Order(2), R).unwrap();
        b.free(a.offset, a.order, R).unwrap();
        assert!(matches!(
            b.free(a.offset, a.order, R),
            Err(FreeError::DoubleFree { .. })
        ));
        // A sub-block of a free block is a double free too.
        assert!(matches!(
            b.free(PoolOffset::from_pfn(1), Order(0), R),
            Err(FreeError::DoubleFree { .. })
        ));
        assert!(matches!(
            b.free(PoolOffset::from_pfn(2), Order(2), R),
            Err(FreeError::BadBlock { .. })
        ));
        assert!(matches!(
            b.free(PoolOffset::from_pfn(64), Order(0), R),
            Err(FreeError::BadBlock { .. })
        ));
        b.check().unwrap();
    }

    #[test]
    fn fragmentation_index_reflects_scattered_free_pages() {
        let mut b = Buddy::new(1024, R);
        let all: Vec<_> = (0..1024).map(|_| b.alloc(Order(0), R).unwrap()).collect();
        assert_eq!(b.stats().unusable_index(Order::PMD), 0);
        // Free every other page: 512 free pages, none mergeable.
        for blk in all.iter().step_by(2) {
            b.free(blk.offset, blk.order, R).unwrap();
        }
        let s = b.stats();
        assert_eq!(s.free_pages, 512);
        assert_eq!(s.free_blocks[0], 512);
        assert_eq!(s.unusable_index(Order::PMD), 1000);
        assert_eq!(s.unusable_index(Order::BASE), 0);
        assert!(b.alloc(Order(1), R).is_none());
        b.check().unwrap();
    }

    #[test]
    fn states_merge_to_the_worse_and_alloc_respects_state() {
        let mut b = Buddy::new(2, BlockState::NeedsZero);
        assert!(b.alloc(Order(0), R).is_none());
        assert!(b.has_unprepared(Order(1)));
        let blk = b.take_unprepared().unwrap();
        assert_eq!((blk.order, blk.state), (Order(1), BlockState::NeedsZero));
        b.free(blk.offset, blk.order, R).unwrap();
        let x = b.alloc(Order(0), R).unwrap();
        b.free(x.offset, x.order, BlockState::NeedsZero).unwrap();
        assert_eq!(b.stats().ready_pages, 0);
        assert_eq!(b.take_unprepared().unwrap().state, BlockState::NeedsZero);
    }

    #[test]
    fn offline_takes_free_memory_out_and_online_gives_it_back() {
        let mut b = Buddy::new(1024, R);
        let held = b.alloc(Order(0), R).unwrap();
        // 1023 free: an order-9 block and 1+2+...+256 left of the other.
        let taken = b.offline(600);
        let pages: u64 = taken.iter().map(|t| t.order.nr_pages()).sum();
        assert_eq!((pages, b.nr_offline()), (600, 600));
        assert_eq!(b.nr_free(), 1023 - 600);
        b.check().unwrap();
        // Offline memory is never handed out.
        let mut got = Vec::new();
        while let Some(x) = b.alloc(Order(0), R) {
            assert!(
                taken
                    .iter()
                    .all(|t| !(t.offset.pfn()..t.offset.pfn() + t.order.nr_pages())
                        .contains(&x.offset.pfn())),
                "allocated offline page {x:?}"
            );
            got.push(x);
        }
        assert_eq!(got.len() as u64, 1023 - 600);
        // Asking for more than is free takes what there is.
        assert!(b.offline(5).is_empty());
        for x in got {
            b.free(x.offset, x.order, R).unwrap();
        }
        // Online part of it (splitting offline blocks), then the rest.
        assert_eq!(b.online(100), Ok(100));
        assert_eq!((b.nr_offline(), b.nr_free()), (500, 523));
        b.check().unwrap();
        assert_eq!(b.online(10_000), Ok(500));
        b.free(held.offset, held.order, R).unwrap();
        assert_eq!((b.nr_offline(), b.nr_free()), (0, 1024));
        b.check().unwrap();
        // Onlined memory needs populating before a fault may take it.
        assert_eq!(b.stats().ready_pages, 0);
        assert_eq!(b.stats().free_blocks[9], 2);
    }

    #[test]
    fn offline_memory_and_isolated_pageblocks_get_along() {
        let mut b = Buddy::new(1024, R);
        // 100 pages offline: all in one pageblock, which compaction skips.
        let taken = b.offline(100);
        let pb = taken[0].offset.pfn() / PAGEBLOCK_PAGES;
        assert!(taken.iter().all(|t| t.offset.pfn() / PAGEBLOCK_PAGES == pb));
        assert_eq!(b.free_pages_per_pageblock()[pb as usize], 0);
        // Onlined into an isolated pageblock, the pages are parked and
        // merge when it is released.
        assert!(b.isolate_pageblock(pb * PAGEBLOCK_PAGES));
        assert_eq!(b.online(100), Ok(100));
        assert_eq!(b.nr_offline(), 0);
        b.check().unwrap();
        assert_eq!(b.unisolate_pageblock(pb * PAGEBLOCK_PAGES), 512);
        assert_eq!(b.stats().free_blocks[9], 2);
        b.check().unwrap();
    }

    #[test]
    fn offline_prefers_blocks_that_need_work() {
        let mut b = Buddy::new(1024, BlockState::NeedsZero);
        let t = b.take_unprepared().unwrap();
        b.free(t.offset, t.order, R).unwrap();
        let taken = b.offline(512);
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].state, BlockState::NeedsZero);
        assert_eq!(b.stats().ready_pages, 512);
    }

    #[test]
    fn isolated_pageblock_parks_frees_until_released() {
        let mut b = Buddy::new(1024, R);
        let held: Vec<_> = (0..4).map(|_| b.alloc(Order(0), R).unwrap()).collect();
        assert!(held.iter().all(|h| h.offset.pfn() < 512));
        assert_eq!(b.stats().free_pages, 1020);
        assert!(b.isolate_pageblock(0));
        assert!(!b.isolate_pageblock(0), "isolated twice");
        assert!(!b.isolate_pageblock(3), "not a pageblock");
        let s = b.stats();
        assert_eq!((s.free_pages, s.isolated_pages), (512, 508));
        // Nothing of the isolated pageblock is handed out.
        let x = b.alloc(Order(0), R).unwrap();
        assert!(x.offset.pfn() >= 512);
        b.free(x.offset, x.order, R).unwrap();
        for h in &held {
            b.free(h.offset, h.order, R).unwrap();
        }
        assert!(matches!(
            b.free(held[0].offset, Order(0), R),
            Err(FreeError::DoubleFree { .. })
        ));
        assert_eq!(b.stats().isolated_pages, 512);
        b.check().unwrap();
        assert_eq!(b.unisolate_pageblock(0), 512);
        let s = b.stats();
        assert_eq!(
            (s.free_blocks[9], s.free_pages, s.isolated_pages),
            (2, 1024, 0)
        );
        b.check().unwrap();
    }

    #[test]
    fn alloc_in_range_takes_free_pages_in_address_order() {
        let mut b = Buddy::new(1024, R);
        // Pageblock 0: page 4k used, 4k+1..4k+3 free (an order-0 and an
        // order-1 block each); pageblock 1 stays one free 2 MiB block.
        let all: Vec<_> = (0..512).map(|_| b.alloc(Order(0), R).unwrap()).collect();
        for blk in all.iter().filter(|x| x.offset.pfn() % 4 != 0) {
            b.free(blk.offset, blk.order, R).unwrap();
        }
        let mut from = 0;
        let mut got = Vec::new();
        while let Some((blk, next)) = b.alloc_in_range(from, 1024, Order(0)) {
            got.push(blk.offset.pfn());
            from = next;
        }
        let want: Vec<u64> = (0..512).filter(|p| p % 4 != 0).collect();
        assert_eq!(
            got, want,
            "in address order, and never into the free 2 MiB block"
        );
        assert_eq!(b.stats().free_blocks[9], 1);
        b.check().unwrap();
        // A larger order skips blocks too small for it.
        b.free(PoolOffset::from_pfn(8), Order(0), R).unwrap();
        b.free(PoolOffset::from_pfn(9), Order(0), R).unwrap();
        b.free(PoolOffset::from_pfn(10), Order(1), R).unwrap();
        b.free(PoolOffset::from_pfn(5), Order(0), R).unwrap();
        let (blk, next) = b.alloc_in_range(0, 512, Order(2)).unwrap();
        assert_eq!((blk.offset.pfn(), blk.order, next), (8, Order(2), 12));
        b.check().unwrap();
    }

    #[derive(Debug, Clone)]
    enum Op {
        Alloc(u8),
        Free(usize),
        Offline(u16),
        Online(u16),
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        prop::collection::vec(
            prop_oneof![
                (0u8..=9).prop_map(Op::Alloc),
                any::<usize>().prop_map(Op::Free)
            ],
            1..200,
        )
    }

    fn ops_with_offline() -> impl Strategy<Value = Vec<Op>> {
        prop::collection::vec(
            prop_oneof![
                (0u8..=9).prop_map(Op::Alloc),
                any::<usize>().prop_map(Op::Free),
                (0u16..1200).prop_map(Op::Offline),
                (0u16..1200).prop_map(Op::Online),
            ],
            1..200,
        )
    }

    proptest! {
        #[test]
        fn random_alloc_free_keeps_invariants(pages in 1u64..3000, ops in ops()) {
            let mut b = Buddy::new(pages, R);
            let mut held: Vec<Block> = Vec::new();
            for op in ops {
                match op {
                    Op::Alloc(o) => {
                        if let Some(blk) = b.alloc(Order(o), R) {
                            prop_assert_eq!(blk.offset.pfn() % Order(o).nr_pages(), 0);
                            // Never overlaps a block we already hold.
                            for h in &held {
                                let (a0, a1) = (blk.offset.pfn(), blk.offset.pfn() + blk.order.nr_pages());
                                let (b0, b1) = (h.offset.pfn(), h.offset.pfn() + h.order.nr_pages());
                                prop_assert!(a1 <= b0 || b1 <= a0);
                            }
                            held.push(blk);
                        }
                    }
                    Op::Free(i) if !held.is_empty() => {
                        let blk = held.swap_remove(i % held.len());
                        prop_assert!(b.free(blk.offset, blk.order, R).is_ok());
                    }
                    Op::Free(_) | Op::Offline(_) | Op::Online(_) => {}
                }
                let used: u64 = held.iter().map(|h| h.order.nr_pages()).sum();
                prop_assert_eq!(b.stats().free_pages + used, pages);
                prop_assert!(b.check().is_ok());
            }
            for blk in held.drain(..) {
                b.free(blk.offset, blk.order, R).unwrap();
            }
            // Everything merged back: same block count as a fresh allocator.
            let fresh = Buddy::new(pages, R).stats().free_blocks;
            prop_assert_eq!(b.stats().free_blocks, fresh);
        }
    }

    proptest! {
        /// Offline and online interleaved with allocation: offline pages
        /// are never allocated, and free + held + offline = pool.
        #[test]
        fn offline_online_keeps_invariants(pages in 1u64..3000, ops in ops_with_offline()) {
            let mut b = Buddy::new(pages, R);
            let mut held: Vec<Block> = Vec::new();
            for op in ops {
                match op {
                    Op::Alloc(o) => {
                        if let Some(blk) = b.alloc(Order(o), R) {
                            held.push(blk);
                        }
                    }
                    Op::Free(i) if !held.is_empty() => {
                        let blk = held.swap_remove(i % held.len());
                        prop_assert!(b.free(blk.offset, blk.order, R).is_ok());
                    }
                    Op::Free(_) => {}
                    Op::Offline(n) => {
                        let (free, off) = (b.nr_free(), b.nr_offline());
                        let got: u64 = b.offline(u64::from(n)).iter().map(|t| t.order.nr_pages()).sum();
                        prop_assert_eq!(got, u64::from(n).min(free));
                        prop_assert_eq!(b.nr_offline(), off + got);
                    }
                    Op::Online(n) => {
                        let off = b.nr_offline();
                        prop_assert_eq!(b.online(u64::from(n)), Ok(u64::from(n).min(off)));
                    }
                }
                let used: u64 = held.iter().map(|h| h.order.nr_pages()).sum();
                prop_assert_eq!(b.nr_free() + used + b.nr_offline(), pages);
                prop_assert!(b.check().is_ok(), "{:?}", b.check());
            }
        }
    }
}
