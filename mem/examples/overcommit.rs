//! Overcommit benchmark with host threads (no KVM): a working set twice the
//! memory budget under kernel swap (a child process in a cgroup v1 limit
//! with a host swap file) and under foliovm's swap, in one run. The logic
//! lives in [`mem::bench`], which `foliovm bench overcommit` runs too; this
//! is its command line.
//!
//! ```text
//! cargo run --release -p mem --example overcommit -- \
//!     [--budget 256M] [--threads 4] [--dir /var/tmp] [--ops 200000] \
//!     [--patterns sequential,zipfian,uniform] [--skip-kernel]
//! ```

use mem::bench::{self, ChildCommand, HostBenchOpts, Pattern};
use std::path::PathBuf;

fn parse_size(s: &str) -> Option<u64> {
    let (num, mul) = match s.as_bytes().last()? {
        b'G' | b'g' => (&s[..s.len() - 1], 1 << 30),
        b'M' | b'm' => (&s[..s.len() - 1], 1 << 20),
        _ => (s, 1),
    };
    num.parse::<u64>().ok().map(|n| n * mul)
}

fn opts(mut v: Vec<String>) -> Result<HostBenchOpts, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut o = HostBenchOpts {
        budget: 256 << 20,
        threads: 4,
        dir: PathBuf::from("/var/tmp"),
        ops: 200_000,
        patterns: Pattern::ALL.to_vec(),
        skip_kernel: false,
        child: ChildCommand {
            exe,
            args: vec!["--child".into()],
        },
    };
    if let Some(i) = v.iter().position(|x| x == "--skip-kernel") {
        o.skip_kernel = true;
        v.remove(i);
    }
    for w in v.chunks(2) {
        let val = w.get(1).map(String::as_str).unwrap_or("");
        let bad = || format!("bad value {val:?} for {}", w[0]);
        match w[0].as_str() {
            "--budget" => o.budget = parse_size(val).ok_or_else(bad)?,
            "--threads" => o.threads = val.parse().map_err(|_| bad())?,
            "--dir" => o.dir = PathBuf::from(val),
            "--ops" => o.ops = val.parse().map_err(|_| bad())?,
            "--patterns" => {
                o.patterns = val
                    .split(',')
                    .map(|p| Pattern::parse(p).ok_or_else(bad))
                    .collect::<Result<_, _>>()?
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(o)
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let result = match argv.first().map(String::as_str) {
        Some("--child") => bench::kernel_child(&argv[1..]),
        _ => opts(argv).map(|o| print!("{}", bench::run(&o))),
    };
    if let Err(e) = result {
        eprintln!("overcommit: {e}");
        std::process::exit(1);
    }
}
