//! `--workload PATTERN:SIZE[,key=value...]`.
//!
//! * `seq:256M[,passes=N]` — sweep the range `passes` times (default 2).
//! * `uniform:256M[,ops=N]` — `ops` uniformly random page touches per vCPU
//!   (default: twice the pages of the vCPU's slice).
//! * `zipf:256M[,ops=N][,theta=0.99]` — zipfian page popularity, hottest pages
//!   scattered over the range.
//!
//! * `ud:SIZE` and `triple:SIZE` — diagnostics: the guest executes `ud2`
//!   at once; with `ud` the exception stub reports vector 6, with `triple`
//!   the IDT is empty and the CPU triple-faults. Both end the run with an
//!   error, which is what they exist to show.
//!
//! Every pattern takes `seed=N`. Each touch verifies the page's last content
//! (if it was written before) and writes it again with the next epoch; a final
//! sweep verifies every page written.

use crate::config::{option_key, parse_size, repeated_option};

/// The access pattern.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pattern {
    /// In address order.
    Sequential,
    /// Uniformly random pages.
    Uniform,
    /// Zipf-distributed popularity with exponent `theta`.
    Zipf {
        /// Skew, in (0, 10].
        theta: f64,
    },
    /// Diagnostic: execute `ud2`; `triple` leaves the IDT empty.
    Crash {
        /// Triple-fault instead of reporting the exception.
        triple: bool,
    },
}

impl Pattern {
    /// Code the guest program switches on.
    pub fn code(self) -> u64 {
        match self {
            Pattern::Sequential => 0,
            Pattern::Uniform => 1,
            Pattern::Zipf { .. } => 2,
            Pattern::Crash { .. } => 3,
        }
    }

    /// Short name for the result line.
    pub fn name(self) -> &'static str {
        match self {
            Pattern::Sequential => "seq",
            Pattern::Uniform => "uniform",
            Pattern::Zipf { .. } => "zipf",
            Pattern::Crash { triple: false } => "ud",
            Pattern::Crash { triple: true } => "triple",
        }
    }
}

/// A parsed workload spec.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadSpec {
    /// Pattern.
    pub pattern: Pattern,
    /// Bytes of guest memory the pattern covers (multiple of 4 KiB).
    pub size: u64,
    /// Passes (sequential) or operations per vCPU (random); `None` = default.
    pub count: Option<u64>,
    /// PRNG seed.
    pub seed: u64,
}

/// Errors in a workload spec.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    /// Not `PATTERN:SIZE...`.
    #[error("invalid workload spec {0:?}: expected PATTERN:SIZE[,key=value...] with PATTERN one of seq, uniform, zipf")]
    Syntax(String),
    /// Unknown pattern.
    #[error("unknown workload pattern {0:?}: expected seq, uniform or zipf")]
    Pattern(String),
    /// Bad size.
    #[error("invalid workload size {0:?}: {1}")]
    Size(String, String),
    /// Unknown or invalid option.
    #[error("invalid workload option {0:?}: {1}")]
    Option(String, String),
}

impl std::str::FromStr for WorkloadSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, SpecError> {
        let (pat, rest) = s
            .split_once(':')
            .ok_or_else(|| SpecError::Syntax(s.to_string()))?;
        let mut parts = rest.split(',');
        let size_str = parts.next().unwrap_or_default();
        let size = parse_size(size_str)
            .map_err(|e| SpecError::Size(size_str.to_string(), e.to_string()))?;
        if size == 0 || size % 4096 != 0 {
            return Err(SpecError::Size(
                size_str.to_string(),
                "must be a non-zero multiple of 4 KiB".into(),
            ));
        }
        let mut pattern = match pat {
            "seq" | "sequential" => Pattern::Sequential,
            "uniform" | "random" => Pattern::Uniform,
            "zipf" | "zipfian" => Pattern::Zipf { theta: 0.99 },
            "ud" => Pattern::Crash { triple: false },
            "triple" => Pattern::Crash { triple: true },
            other => return Err(SpecError::Pattern(other.to_string())),
        };
        let mut spec = WorkloadSpec {
            pattern,
            size,
            count: None,
            seed: 0x5eed,
        };
        let opts: Vec<&str> = parts.collect();
        if let Some(opt) = repeated_option(&opts, option_key) {
            return Err(SpecError::Option(opt.to_string(), "given twice".into()));
        }
        for opt in opts {
            let (k, v) = opt
                .split_once('=')
                .ok_or_else(|| SpecError::Option(opt.to_string(), "expected key=value".into()))?;
            let num = || {
                v.parse::<u64>().map_err(|_| {
                    SpecError::Option(opt.to_string(), "expected an unsigned integer".into())
                })
            };
            match (k, &mut pattern) {
                ("passes", Pattern::Sequential)
                | ("ops", Pattern::Uniform | Pattern::Zipf { .. }) => {
                    let n = num()?;
                    if n == 0 {
                        return Err(SpecError::Option(
                            opt.to_string(),
                            "must be at least 1".into(),
                        ));
                    }
                    spec.count = Some(n);
                }
                ("seed", _) => spec.seed = num()?,
                ("theta", Pattern::Zipf { theta }) => {
                    let t: f64 = v.parse().map_err(|_| {
                        SpecError::Option(opt.to_string(), "expected a number".into())
                    })?;
                    if !(t > 0.0 && t <= 10.0) {
                        return Err(SpecError::Option(
                            opt.to_string(),
                            "theta must be in (0, 10]".into(),
                        ));
                    }
                    *theta = t;
                }
                _ => {
                    return Err(SpecError::Option(
                        opt.to_string(),
                        format!("not an option of the {} pattern", pattern.name()),
                    ))
                }
            }
        }
        spec.pattern = pattern;
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_patterns_and_options() {
        let s: WorkloadSpec = "seq:256M".parse().unwrap();
        assert_eq!(
            (s.pattern, s.size, s.count),
            (Pattern::Sequential, 256 << 20, None)
        );
        let s: WorkloadSpec = "zipf:1G,ops=1000,theta=1.2,seed=7".parse().unwrap();
        assert_eq!(s.pattern, Pattern::Zipf { theta: 1.2 });
        assert_eq!((s.size, s.count, s.seed), (1 << 30, Some(1000), 7));
        let s: WorkloadSpec = "uniform:64M,ops=5".parse().unwrap();
        assert_eq!((s.pattern, s.count), (Pattern::Uniform, Some(5)));
    }

    #[test]
    fn rejects_bad_specs() {
        for (bad, want) in [
            ("seq", "PATTERN:SIZE"),
            ("walk:1M", "unknown workload pattern"),
            ("seq:0", "non-zero"),
            ("seq:5000B", "multiple of 4 KiB"),
            ("seq:lots", "invalid workload size"),
            ("seq:1M,ops=3", "not an option of the seq"),
            ("uniform:1M,passes=3", "not an option"),
            ("zipf:1M,theta=0", "theta"),
            ("zipf:1M,ops=0", "at least 1"),
            ("zipf:1M,ops", "key=value"),
            ("seq:8M,passes=1,passes=2", "\"passes=2\": given twice"),
        ] {
            let e = bad.parse::<WorkloadSpec>().unwrap_err().to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }
}
