//! Overcommit benchmark with host threads (no KVM): a working set twice the
//! memory budget under kernel swap (a child process in a cgroup v1 limit
//! with a host swap file) and under foliovm's swap, in one run. The logic
//! lives in [`mem::bench`], which `foliovm bench overcommit` runs too; this
//! is its command line.
//!
//! ```text
//! cargo run --release -p mem --example overcommit -- \
//!     [--budget 256M] [--threads 4] [--dir /var/tmp] [--ops 200000] \
//!     [--patterns sequential,zipfian,uniform] [--rounds 1] [--skip-kernel]
//! ```

use mem::bench::{self, ChildCommand, HostBenchOpts};

fn opts(v: &[String]) -> Result<HostBenchOpts, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let child = ChildCommand {
        exe,
        args: vec!["--child".into()],
    };
    HostBenchOpts::parse(v, child)
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let result = match argv.first().map(String::as_str) {
        Some("--child") => bench::kernel_child(&argv[1..]),
        _ => opts(&argv).map(|o| print!("{}", bench::run_rounds(&o))),
    };
    if let Err(e) = result {
        eprintln!("overcommit: {e}");
        std::process::exit(1);
    }
}
