//! Helpers for the seeded robustness tests of this crate (`virtio::fuzz`),
//! of the VMM's control plane (`vmm`'s tests) and of `control_race` (both
//! through the `testing` feature): a small seeded generator and the seed
//! loop.
//! `FOLIOVM_FUZZ_SEED` runs one seed instead of a test's own list.

/// A small seeded generator (splitmix64).
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, n)` (0 for `n == 0`), in `n`'s own type (`u64`
    /// for addresses, `usize` for indices).
    pub fn below<T: TryInto<u64> + TryFrom<u64>>(&mut self, n: T) -> T {
        let n: u64 = n.try_into().ok().expect("a bound within 64 bits");
        let r = match n {
            0 => 0,
            n => self.next_u64() % n,
        };
        T::try_from(r).ok().expect("below the bound")
    }

    /// Uniform in `[lo, hi)`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo)
    }

    /// True once in `n` times.
    pub fn one_in<T: TryInto<u64> + TryFrom<u64>>(&mut self, n: T) -> bool {
        let n: u64 = n.try_into().ok().expect("a bound within 64 bits");
        self.below(n) == 0
    }

    /// One of `xs`.
    pub fn pick<T: Clone>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())].clone()
    }

    /// Random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.next_u64() as u8;
        }
    }
}

/// Run `f` for every seed of `seeds` (or `FOLIOVM_FUZZ_SEED`'s, decimal or
/// `0x` hex); a failure prints its seed and how to repeat it.
pub fn for_each_seed(test: &str, seeds: &[u64], f: impl Fn(u64) + std::panic::RefUnwindSafe) {
    let seeds = match std::env::var("FOLIOVM_FUZZ_SEED") {
        Ok(s) => {
            let v = match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            };
            vec![v.expect("FOLIOVM_FUZZ_SEED is a number")]
        }
        Err(_) => seeds.to_vec(),
    };
    for seed in seeds {
        if let Err(p) = std::panic::catch_unwind(|| f(seed)) {
            eprintln!(
                "{test}: failed with seed {seed:#x} (FOLIOVM_FUZZ_SEED={seed:#x} repeats it)"
            );
            std::panic::resume_unwind(p);
        }
    }
}
