//! Test helpers shared by the seeded robustness tests of the control
//! plane (`api::http`, `api::routes`, `config`, the `foliovm run` flags):
//! a small seeded generator and the seed loop. `FOLIOVM_FUZZ_SEED` runs
//! one seed instead of a test's own list.

/// A small seeded generator (splitmix64), as `devices`' fuzz tests use.
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, n)` (0 for `n == 0`).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    /// True once in `n` times.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    /// One of `xs`.
    pub fn pick<T: Clone>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())].clone()
    }
}

/// Run `f` for every seed of `seeds` (or `FOLIOVM_FUZZ_SEED`'s); a
/// failure prints its seed and how to repeat it.
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
