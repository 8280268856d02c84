//! LRU generations, one set per VM, like MGLRU's `lru_gen_folio`.
//!
//! Each VM has up to [`NR_GENS`] generations, numbered by a sequence
//! between `min_seq` (oldest) and `max_seq` (youngest). New and accessed
//! folios go to the youngest generation; reclaim takes folios from the
//! oldest one. Access information comes from reference sampling
//! (`vmscan`): a sampled folio that faults back is promoted to the
//! youngest generation at once (`folio_inc_gen()`/`lru_gen_look_around()`
//! find young PTEs the same way, through the accessed bit). Aging
//! (`inc_max_seq()`) opens a new youngest generation whenever eviction
//! reaches the current one, so promoted folios always land in a
//! generation younger than the one being scanned.
//!
//! Beside the generations each VM has a **probation list**: folios
//! reference sampling has moved out of the guest, oldest sampling first,
//! waiting to show whether they are still used (the kernel's inactive list,
//! where a folio's accessed bit gets its second chance). An access takes a
//! folio off it to the youngest generation; eviction takes victims from its
//! head. Its pseudo sequence number is `PROBATION`.
//!
//! The links live in the folio records ([`crate::folio::LruLink`]), so the
//! lists cost no memory of their own.
//!
//! # Context
//! Everything here runs under the folio-table lock (`&mut FolioSlab`).

use crate::folio::{FolioFlags, FolioSlab, NO_LINK};
use crate::types::{FolioId, VmId};

/// Generations per VM (`MAX_NR_GENS`).
pub const NR_GENS: usize = 4;

/// The sequence number that names the probation list: [`FolioSlab::lru_seq`]
/// gives it for a folio on that list, and [`FolioSlab::lru_add_seq`] with it
/// puts a folio there.
pub(crate) const PROBATION: u64 = u64::MAX;

/// The list index of the probation list, after the generations'.
const PROBATION_LIST: usize = NR_GENS;

#[derive(Debug, Clone, Copy)]
struct ListHead {
    head: u32,
    tail: u32,
}

impl Default for ListHead {
    fn default() -> Self {
        ListHead {
            head: NO_LINK,
            tail: NO_LINK,
        }
    }
}

/// The generations of one VM (`struct lru_gen_folio`).
#[derive(Debug, Default)]
pub struct LruVec {
    /// The generations' lists, then the probation list.
    lists: [ListHead; NR_GENS + 1],
    nr_pages: [u64; NR_GENS + 1],
    /// Oldest generation's sequence number.
    pub min_seq: u64,
    /// Youngest generation's sequence number.
    pub max_seq: u64,
}

impl LruVec {
    /// Pages on all lists.
    pub fn nr_pages(&self) -> u64 {
        self.nr_pages.iter().sum()
    }

    /// Pages in the generations (the probation list left out).
    fn gen_pages(&self) -> u64 {
        self.nr_pages[..NR_GENS].iter().sum()
    }
}

fn gen_of(seq: u64) -> usize {
    (seq % NR_GENS as u64) as usize
}

impl FolioSlab {
    fn folio_vm(&self, id: FolioId) -> usize {
        self.get(id)
            .and_then(|f| f.rmap)
            .map_or(0, |r| r.vm.0 as usize)
    }

    fn lruvec(&mut self, vm: usize) -> &mut LruVec {
        if self.lruvecs.len() <= vm {
            self.lruvecs.resize_with(vm + 1, LruVec::default);
        }
        &mut self.lruvecs[vm]
    }

    /// Add to the youngest generation of its VM (`folio_add_lru()`).
    pub fn lru_add(&mut self, id: FolioId) {
        let vm = self.folio_vm(id);
        let seq = self.lruvec(vm).max_seq;
        self.lru_add_seq(id, seq);
    }

    /// Add to the tail of generation `seq` (clamped to the live range), or
    /// of the probation list for [`PROBATION`].
    pub(crate) fn lru_add_seq(&mut self, id: FolioId, seq: u64) {
        self.lru_link(id, seq, false);
    }

    /// [`FolioSlab::lru_add_seq`] at the head of the list: first for
    /// reclaim to meet.
    pub(crate) fn lru_add_seq_head(&mut self, id: FolioId, seq: u64) {
        self.lru_link(id, seq, true);
    }

    fn lru_link(&mut self, id: FolioId, seq: u64, head: bool) {
        let vm = self.folio_vm(id);
        let lv = self.lruvec(vm);
        let gen = match seq {
            PROBATION => PROBATION_LIST,
            s => gen_of(s.clamp(lv.min_seq, lv.max_seq)),
        };
        let (prev, next) = match head {
            true => (NO_LINK, lv.lists[gen].head),
            false => (lv.lists[gen].tail, NO_LINK),
        };
        let f = self.live(id);
        debug_assert!(!f.flags.contains(FolioFlags::LRU));
        f.flags.insert(FolioFlags::LRU);
        f.lru.prev = prev;
        f.lru.next = next;
        f.flags.set_gen(gen);
        let nr = f.nr_pages();
        match prev {
            NO_LINK => self.lruvecs[vm].lists[gen].head = id.0,
            p => self.live(FolioId(p)).lru.next = id.0,
        }
        match next {
            NO_LINK => self.lruvecs[vm].lists[gen].tail = id.0,
            n => self.live(FolioId(n)).lru.prev = id.0,
        }
        self.lruvecs[vm].nr_pages[gen] += nr;
    }

    /// Put `new` on the LRU where `old` is, and take `old` off
    /// (`folio_migrate_flags()` keeping the generation). No-op for `new` if
    /// `old` is not on the LRU.
    pub(crate) fn lru_replace(&mut self, old: FolioId, new: FolioId) {
        let Some(seq) = self.lru_seq(old) else {
            return;
        };
        self.lru_del(old);
        self.lru_add_seq(new, seq);
    }

    /// Move a folio on the LRU to the tail of its VM's probation list (it
    /// was just sampled). No-op if not on the LRU.
    pub(crate) fn lru_probation_add(&mut self, id: FolioId) {
        if self
            .get(id)
            .is_some_and(|f| f.flags.contains(FolioFlags::LRU))
        {
            self.lru_del(id);
            self.lru_add_seq(id, PROBATION);
        }
    }

    /// The folio longest on `vm`'s probation list.
    pub(crate) fn lru_probation_head(&mut self, vm: VmId) -> Option<FolioId> {
        let head = self.lruvec(vm.0 as usize).lists[PROBATION_LIST].head;
        (head != NO_LINK).then_some(FolioId(head))
    }

    /// Pages on `vm`'s probation list.
    pub(crate) fn lru_probation_pages(&self, vm: VmId) -> u64 {
        self.lruvecs
            .get(vm.0 as usize)
            .map_or(0, |lv| lv.nr_pages[PROBATION_LIST])
    }

    /// Take off the LRU if on it (`lruvec_del_folio()`).
    pub fn lru_del(&mut self, id: FolioId) {
        let vm = self.folio_vm(id);
        let f = self.live(id);
        if !f.flags.contains(FolioFlags::LRU) {
            return;
        }
        f.flags.remove(FolioFlags::LRU);
        let (prev, next, gen) = (f.lru.prev, f.lru.next, f.flags.gen());
        let nr = f.nr_pages();
        f.lru.prev = NO_LINK;
        f.lru.next = NO_LINK;
        match prev {
            NO_LINK => self.lruvecs[vm].lists[gen].head = next,
            p => self.live(FolioId(p)).lru.next = next,
        }
        match next {
            NO_LINK => self.lruvecs[vm].lists[gen].tail = prev,
            n => self.live(FolioId(n)).lru.prev = prev,
        }
        self.lruvecs[vm].nr_pages[gen] -= nr;
    }

    /// An access was seen: move to the youngest generation
    /// (`folio_inc_gen()` / `folio_activate()`). No-op if not on the LRU.
    pub fn lru_promote(&mut self, id: FolioId) {
        if self
            .get(id)
            .is_some_and(|f| f.flags.contains(FolioFlags::LRU))
        {
            self.lru_del(id);
            self.lru_add(id);
        }
    }

    /// Move to the tail of the generation after the oldest, to look at it
    /// again later (`sort_folio()` rotating a folio it cannot evict yet).
    pub(crate) fn lru_rotate(&mut self, id: FolioId) {
        let vm = self.folio_vm(id);
        let seq = self.lruvec(vm).min_seq + 1;
        self.lru_del(id);
        self.lru_add_seq(id, seq);
    }

    /// The sequence number of the generation `id` is in, if on the LRU
    /// (the youngest if its generation is no longer live, which a folio on
    /// the LRU never sees), or [`PROBATION`].
    pub(crate) fn lru_seq(&mut self, id: FolioId) -> Option<u64> {
        let f = self.get(id)?;
        if !f.flags.contains(FolioFlags::LRU) {
            return None;
        }
        let gen = f.flags.gen();
        if gen == PROBATION_LIST {
            return Some(PROBATION);
        }
        let vm = self.folio_vm(id);
        let lv = self.lruvec(vm);
        let seq = (lv.min_seq..=lv.max_seq).find(|&s| gen_of(s) == gen);
        Some(seq.unwrap_or(lv.max_seq))
    }

    /// The sequence number of `vm`'s oldest generation.
    pub(crate) fn lru_min_seq(&mut self, vm: VmId) -> u64 {
        self.lruvec(vm.0 as usize).min_seq
    }

    /// The oldest folio of `vm`, retiring empty old generations and aging
    /// (opening a new youngest generation) when eviction would otherwise
    /// scan the youngest one (`try_to_inc_min_seq()`, `inc_max_seq()`).
    pub(crate) fn lru_oldest(&mut self, vm: VmId) -> Option<FolioId> {
        let lv = self.lruvec(vm.0 as usize);
        for _ in 0..=2 * NR_GENS {
            if lv.min_seq == lv.max_seq {
                if lv.gen_pages() == 0 {
                    return None;
                }
                lv.max_seq += 1;
            }
            let head = lv.lists[gen_of(lv.min_seq)].head;
            if head != NO_LINK {
                return Some(FolioId(head));
            }
            lv.min_seq += 1;
        }
        debug_assert!(false, "LRU page count {} with empty lists", lv.gen_pages());
        None
    }

    /// Open a new youngest generation if there is room (`inc_max_seq()`),
    /// so that folios promoted from now on are told apart from those
    /// promoted before. Called by the background reclaimer each round.
    pub(crate) fn lru_age(&mut self, vm: VmId) {
        let lv = self.lruvec(vm.0 as usize);
        if lv.max_seq - lv.min_seq + 1 < NR_GENS as u64 && lv.nr_pages[gen_of(lv.max_seq)] > 0 {
            lv.max_seq += 1;
        }
    }

    /// Pages on `vm`'s LRU.
    pub fn lru_pages(&self, vm: VmId) -> u64 {
        self.lruvecs.get(vm.0 as usize).map_or(0, LruVec::nr_pages)
    }

    /// Every folio on an LRU, VM by VM: the probation list, then the
    /// generations oldest first.
    pub fn lru_iter(&self) -> impl Iterator<Item = FolioId> + '_ {
        self.lruvecs.iter().flat_map(move |lv| {
            let gens = (lv.min_seq..=lv.max_seq).map(gen_of);
            std::iter::once(PROBATION_LIST)
                .chain(gens)
                .flat_map(move |list| {
                    let mut cur = lv.lists[list].head;
                    std::iter::from_fn(move || {
                        let id = (cur != NO_LINK).then_some(FolioId(cur))?;
                        cur = self.get(id)?.lru.next;
                        Some(id)
                    })
                })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::PROBATION;
    use crate::folio::{test_folio, FolioTable};
    use crate::types::{FolioId, Order, VmId};

    #[test]
    fn probation_holds_sampled_folios_apart_from_the_generations() {
        let t = FolioTable::default();
        let mut s = t.slab();
        let ids: Vec<FolioId> = (0..3u8)
            .map(|i| s.insert(test_folio(u64::from(i), Order(i))))
            .collect();
        for &id in &ids {
            s.lru_add(id);
        }
        s.lru_probation_add(ids[0]);
        s.lru_probation_add(ids[2]);
        assert_eq!(
            s.lru_probation_head(VmId(0)),
            Some(ids[0]),
            "oldest sampling first"
        );
        assert_eq!(s.lru_probation_pages(VmId(0)), 1 + 4);
        assert_eq!(s.lru_pages(VmId(0)), 1 + 2 + 4, "probation is on the LRU");
        assert_eq!(s.lru_seq(ids[0]), Some(PROBATION));
        // Eviction's generation scan never meets a folio on probation, and
        // does not age past an empty generation list because of them.
        assert_eq!(s.lru_oldest(VmId(0)), Some(ids[1]));
        s.lru_del(ids[1]);
        assert_eq!(s.lru_oldest(VmId(0)), None);
        assert_eq!(s.lru_iter().collect::<Vec<_>>(), vec![ids[0], ids[2]]);
        // An access takes a folio off probation to the youngest generation.
        s.lru_promote(ids[0]);
        assert_eq!(s.lru_probation_head(VmId(0)), Some(ids[2]));
        assert_eq!(s.lru_oldest(VmId(0)), Some(ids[0]));
        // Migration keeps the replacement on probation.
        let new = s.insert(test_folio(7, Order(2)));
        s.lru_replace(ids[2], new);
        assert_eq!(s.lru_probation_head(VmId(0)), Some(new));
        assert_eq!(s.lru_probation_pages(VmId(0)), 4);
        s.lru_del(new);
        s.lru_del(ids[0]);
        assert_eq!(
            (s.lru_pages(VmId(0)), s.lru_probation_head(VmId(0))),
            (0, None)
        );
    }

    #[test]
    fn promotion_and_aging_keep_recent_folios_young() {
        let t = FolioTable::default();
        let mut s = t.slab();
        let ids: Vec<FolioId> = (0..4).map(|i| s.insert(test_folio(i, Order(0)))).collect();
        for &id in &ids {
            s.lru_add(id);
        }
        // Eviction reaches the youngest generation: it ages first.
        assert_eq!(s.lru_oldest(VmId(0)), Some(ids[0]));
        assert_eq!(s.lruvecs[0].max_seq, 1);
        // An access moves ids[0] to the new youngest generation.
        s.lru_promote(ids[0]);
        assert_eq!(s.lru_oldest(VmId(0)), Some(ids[1]));
        s.lru_rotate(ids[1]);
        assert_eq!(s.lru_oldest(VmId(0)), Some(ids[2]));
        s.lru_del(ids[2]);
        s.lru_del(ids[3]);
        // Generation 0 is empty now: retire it.
        assert_eq!(s.lru_oldest(VmId(0)), Some(ids[0]));
        assert_eq!(
            s.lru_iter().collect::<Vec<_>>(),
            vec![ids[0], ids[1]],
            "oldest first"
        );
        assert_eq!(s.lru_pages(VmId(0)), 2);
        s.lru_del(ids[0]);
        s.lru_del(ids[1]);
        assert_eq!(s.lru_oldest(VmId(0)), None);
        assert_eq!(s.lru_pages(VmId(0)), 0);
    }
}
