//! How few misses a replacement policy could have on the overcommit
//! benchmark's traces: the page-granular LRU (about what the kernel's
//! baseline does with its 4 KiB pages) against Belady's optimum (evict the
//! page used furthest in the future), with the budget as the cache, over
//! the same phases as a run (first touch of every page, then the
//! patterns in order). The optimum of each phase starts from what LRU held
//! when the phase began, so it cannot have loaded the phase's pages in
//! the one before. With equal cost per miss, a miss-bound pattern can
//! run at most LRU/OPT times faster than LRU, whatever the policy.
//!
//! Two more columns say where a phase's misses come from. `cold` counts
//! the pages the phase touches that were not resident when it began: no
//! policy misses fewer. `LFU` is a perfect LFU (every page's count kept,
//! evicted or not): what knowing the past frequencies would buy, the
//! information a frequency-aware online policy works from.
//!
//! A last table asks whether reading a missed page's neighbours with it
//! (swap readahead of an aligned block of `k` pages, which large-folio
//! swapin does) would save reads on these traces.
//!
//! ```text
//! cargo run --release -p mem --example policy_bounds -- \
//!     [--budget 256M] [--threads 4] [--ops 200000] [--patterns sequential,zipfian,uniform]
//! ```
//!
//! The threads take turns in the simulated trace; in a run, timing
//! interleaves them, which barely matters to either count.

use mem::bench::{trace, ChildCommand, HostBenchOpts};
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet};

/// Misses per phase of an exact LRU of `cap` pages, and the pages it
/// holds as each phase starts.
fn lru(accesses: &[(usize, u64)], phases: usize, cap: usize) -> (Vec<u64>, Vec<Vec<u64>>) {
    let (misses, _, at_start) = lru_readahead(accesses, phases, cap, 1);
    (misses, at_start)
}

/// [`lru`] where a miss after the first touch also reads the
/// non-resident pages of its aligned block of `k` pages, put at the most
/// recently used end as swap readahead adds them: misses (reads) and
/// pages read per phase, and the pages held as each phase starts.
fn lru_readahead(
    accesses: &[(usize, u64)],
    phases: usize,
    cap: usize,
    k: u64,
) -> (Vec<u64>, Vec<u64>, Vec<Vec<u64>>) {
    let (mut misses, mut read) = (vec![0; phases], vec![0; phases]);
    let mut at_start = vec![Vec::new(); phases];
    let (mut last, mut by_time) = (HashMap::new(), BTreeMap::new());
    let (mut phase, mut time) = (0, 0u64);
    let mut touch = |page: u64, time: u64, last: &mut HashMap<u64, u64>| {
        let old = last.insert(page, time);
        if let Some(t) = old {
            by_time.remove(&t);
        }
        by_time.insert(time, page);
        if by_time.len() > cap {
            let (_, victim) = by_time.pop_first().expect("over capacity");
            last.remove(&victim);
        }
        old.is_none()
    };
    for &(ph, page) in accesses {
        if ph != phase {
            phase = ph;
            at_start[ph] = last.keys().copied().collect();
        }
        if !last.contains_key(&page) {
            misses[ph] += 1;
            read[ph] += 1;
            if ph > 0 {
                let first = page / k * k;
                for q in (first..first + k).filter(|&q| q != page) {
                    if !last.contains_key(&q) {
                        time += 1;
                        touch(q, time, &mut last);
                        read[ph] += 1;
                    }
                }
            }
        }
        time += 1;
        touch(page, time, &mut last);
    }
    (misses, read, at_start)
}

/// Misses of Belady's optimal policy with `cap` pages over `trace`,
/// starting with `resident` held.
fn opt(trace: &[u64], resident: &[u64], cap: usize) -> u64 {
    let never = usize::MAX;
    let mut next_use = vec![never; trace.len()];
    let mut first_use = HashMap::new();
    for (time, &page) in trace.iter().enumerate().rev() {
        next_use[time] = first_use.insert(page, time).unwrap_or(never);
    }
    // Resident pages with their next use; the heap holds stale entries
    // too, skipped when they no longer match.
    let mut held: HashMap<u64, usize> = HashMap::new();
    let mut heap = BinaryHeap::new();
    for &page in resident {
        let when = first_use.get(&page).copied().unwrap_or(never);
        held.insert(page, when);
        heap.push((when, page));
    }
    let mut misses = 0;
    for (time, &page) in trace.iter().enumerate() {
        if held.insert(page, next_use[time]).is_none() {
            misses += 1;
        }
        heap.push((next_use[time], page));
        while held.len() > cap {
            let (when, victim) = heap.pop().expect("over capacity");
            if held.get(&victim) == Some(&when) {
                held.remove(&victim);
            }
        }
    }
    misses
}

/// Misses of a perfect LFU with `cap` pages over `trace`, starting with
/// `resident` held: every page's count of accesses so far is remembered,
/// resident or not, and a miss evicts the resident page with the fewest
/// (the least recently used of those tied).
fn lfu(trace: &[u64], resident: &[u64], cap: usize) -> u64 {
    let mut count: HashMap<u64, (u64, usize)> = HashMap::new();
    let mut held = BTreeSet::new();
    for (i, &page) in resident.iter().enumerate() {
        count.insert(page, (0, i));
        held.insert((0u64, i, page));
    }
    let base = resident.len();
    let mut misses = 0;
    for (t, &page) in trace.iter().enumerate() {
        let time = base + t;
        let e = count.entry(page).or_insert((0, 0));
        let old = (e.0, e.1, page);
        *e = (e.0 + 1, time);
        if !held.remove(&old) {
            misses += 1;
        }
        held.insert((e.0, e.1, page));
        if held.len() > cap {
            held.pop_first();
        }
    }
    misses
}

/// The pages `trace` touches that are not in `resident`: a miss each,
/// whatever the policy.
fn cold_misses(trace: &[u64], resident: &[u64]) -> usize {
    let resident: HashSet<u64> = resident.iter().copied().collect();
    let touched: HashSet<u64> = trace.iter().copied().collect();
    touched.difference(&resident).count()
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let child = ChildCommand {
        exe: Default::default(),
        args: Vec::new(),
    };
    let o = match HostBenchOpts::parse(&argv, child) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("policy_bounds: {e}");
            std::process::exit(1);
        }
    };
    let pages = o.working_set() / mem::PAGE_SIZE;
    let cap = (o.budget / mem::PAGE_SIZE) as usize;
    let mut accesses: Vec<(usize, u64)> = (0..pages).map(|p| (0, p)).collect();
    for (i, &p) in o.patterns.iter().enumerate() {
        let t = trace(p, pages, o.threads, o.ops);
        accesses.extend(t.into_iter().map(|page| (i + 1, page)));
    }
    let phases = o.patterns.len() + 1;
    let (l, at_start) = lru(&accesses, phases, cap);
    println!(
        "policy bounds: {pages} pages touched by {} threads, a cache of {cap} pages (the budget), \
         phases as in a run",
        o.threads
    );
    println!("  pattern       accesses  LRU misses  LFU misses  OPT misses        cold  LRU/OPT");
    for (i, p) in o.patterns.iter().enumerate() {
        let phase: Vec<u64> = accesses
            .iter()
            .filter(|a| a.0 == i + 1)
            .map(|a| a.1)
            .collect();
        let (lm, om) = (l[i + 1], opt(&phase, &at_start[i + 1], cap));
        let fm = lfu(&phase, &at_start[i + 1], cap);
        let cold = cold_misses(&phase, &at_start[i + 1]);
        println!(
            "  {:<11} {:>10} {:>11} {:>11} {:>11} {:>11} {:>7.2}x",
            p.name(),
            phase.len(),
            lm,
            fm,
            om,
            cold,
            lm as f64 / om.max(1) as f64
        );
    }
    println!(
        "  LRU with readahead: a miss also reads the rest of its aligned block of k pages \
         (misses / pages read)"
    );
    let ra: Vec<_> = [2, 4, 16]
        .into_iter()
        .map(|k| (k, lru_readahead(&accesses, phases, cap, k)))
        .collect();
    for (i, p) in o.patterns.iter().enumerate() {
        let cols: Vec<String> = ra
            .iter()
            .map(|(k, (m, r, _))| format!("k={k}: {} / {}", m[i + 1], r[i + 1]))
            .collect();
        println!("  {:<11} {}", p.name(), cols.join(", "));
    }
}
